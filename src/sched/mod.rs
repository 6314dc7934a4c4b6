//! L2: the scheduler — the single writer of job state.
//!
//! One tokio task owns every job record (mirrored in memory, written through the [`Store`]),
//! the GPU inventory and the running children. Everything that can change a job arrives as a
//! message: a submit, a cancel, a priority change, a child's exit, a timer. The loop takes a
//! batch of messages, applies them, runs [`plan::plan`] (a pure function) and applies its
//! decisions, then flushes the store **once for the whole batch** before answering anyone —
//! group commit: durable, and fast under load. Readers (the API) see an immutable snapshot
//! ([`View`]) that is swapped after each flush, and subscribe to [`JobChange`]s.
//!
//! There is no polling: the loop sleeps until the next message or the next deadline (a retry
//! backoff ending, a starvation limit, the periodic GPU refresh).

mod clean;
mod notify;
pub mod plan;
mod recovery;
mod schedules;
mod submit_limit;
mod usage;
mod worker_env;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tracing::{error, info, warn};

use crate::config::SchedulerConfig;
use crate::gpu::{Inventory, Snapshot};
use crate::proc::{self, ChildHandle};
use crate::spec::api::JobChange;
use crate::spec::contract::{self, EXIT_PREEMPTED, Progress};
use crate::spec::record::PublishedModel;
use crate::spec::record::{ExitInfo, Placement, StopKind};
use crate::spec::schedule::ScheduleRecord;
use crate::spec::sweep::{SweepMember, SweepValue};
use crate::spec::{
    Caller, JobEvent, JobId, JobKind, JobRecord, JobSpec, JobState, Millis, Owner, now_ms,
};
use crate::store::{Change, Store, StoreError};

pub use notify::notification_pending;
pub use plan::{Need, Wait, Waiting};
pub use schedules::ScheduleAction;
pub use submit_limit::LimitReached;

/// What the scheduler needs to know about its surroundings.
#[derive(Debug, Clone)]
pub struct SchedSettings {
    pub jobs_dir: PathBuf,
    /// The job store's directory (where its disk reserve lives).
    pub store_dir: PathBuf,
    pub grace: Duration,
    pub max_cpu_jobs: u32,
    pub policy: SchedulerConfig,
    /// The `jobd` executable, for `jobd worker` and a command's supervisor: the file this
    /// daemon runs (so that workers are its own version).
    pub worker_exe: PathBuf,
    /// The path the daemon was started as, symlinks kept: used when `worker_exe` is gone
    /// (an upgrade switched a `current` link and removed the old version before a reload).
    pub worker_exe_link: Option<PathBuf>,
    /// The daemon's `LD_LIBRARY_PATH`, passed on to `jobd worker` (the daemon's own binary,
    /// which loads the CUDA libraries at run time); command jobs set their own environment.
    pub worker_library_path: Option<String>,
    /// Run jobs as their owners (the daemon is root).
    pub run_as_owner: bool,
    /// Default Ollama models directory for `[publish]`.
    pub ollama_models: Option<PathBuf>,
    /// The zone cron expressions are read in.
    pub schedule_tz: crate::spec::schedule::ScheduleTz,
    /// Users who may change any job (root always may), as configured.
    pub admins: std::collections::BTreeSet<String>,
    /// This daemon is the next image of a restart in place: the running jobs it takes over
    /// are its children, and their history is not told of a restart nobody would notice.
    pub restarted_in_place: bool,
    /// Cancelled when a stop or restart is asked for (a signal), before the scheduler hears
    /// of it: from then on no notifier starts (it would be stopped and run again).
    pub stop_asked: tokio_util::sync::CancellationToken,
}

#[cfg(test)]
impl SchedSettings {
    /// Settings for unit tests: jobs and store under `dir`, one CPU slot, `/usr/bin/jobd` as
    /// the worker, nothing run as another user.
    pub(crate) fn for_tests(dir: &std::path::Path, policy: SchedulerConfig) -> Self {
        SchedSettings {
            jobs_dir: dir.join("jobs"),
            store_dir: dir.join("store"),
            grace: Duration::from_secs(1),
            max_cpu_jobs: 1,
            policy,
            worker_exe: "/usr/bin/jobd".into(),
            worker_exe_link: None,
            worker_library_path: None,
            run_as_owner: false,
            ollama_models: None,
            schedule_tz: Default::default(),
            admins: Default::default(),
            restarted_in_place: false,
            stop_asked: Default::default(),
        }
    }
}

/// Errors answered to callers.
#[derive(Debug, thiserror::Error)]
pub enum SchedError {
    #[error("job {0} not found")]
    NotFound(JobId),
    #[error("schedule {0} not found")]
    ScheduleNotFound(u64),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    Invalid(String),
    #[error("this job can never run here: {0}")]
    Infeasible(String),
    #[error("{0}")]
    Conflict(String),
    /// The owner is at `max_submitted` (a limit the user can wait out, unlike `Infeasible`).
    #[error("{0}")]
    TooManyJobs(LimitReached),
    #[error("the daemon is shutting down")]
    ShuttingDown,
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl SchedError {
    /// The same error, saying which of several things it is about (`sweep job 2 (lr=3e-4)`).
    fn context(self, what: &str) -> SchedError {
        match self {
            SchedError::Forbidden(m) => SchedError::Forbidden(format!("{what}: {m}")),
            SchedError::Invalid(m) => SchedError::Invalid(format!("{what}: {m}")),
            SchedError::Infeasible(m) => SchedError::Infeasible(format!("{m} ({what})")),
            SchedError::Conflict(m) => SchedError::Conflict(format!("{what}: {m}")),
            other => other,
        }
    }
}

/// Changes to a job's `[publish]` for a publish by hand.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublishOverrides {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub quantization: Option<crate::spec::publish::Quantization>,
    #[serde(default)]
    pub models_dir: Option<PathBuf>,
}

/// A job to submit, already parsed and resolved by the caller's layer.
#[derive(Debug, Clone)]
pub struct Submission {
    pub spec: JobSpec,
    pub source: String,
    pub source_path: Option<PathBuf>,
    pub name: String,
    /// Queued on hold (`jobctl submit --hold`).
    pub hold: bool,
    /// The job whose file this is, run again (`jobctl resubmit`), and the keys `--set`
    /// changed: said in the history.
    pub copy_of: Option<(JobId, Vec<String>)>,
    /// The sweep a resubmitted job of a sweep stays in (its values unchanged by `--set`).
    pub sweep: Option<SweepMember>,
}

type Reply<T> = oneshot::Sender<Result<T, SchedError>>;

enum Msg {
    Submit {
        owner: Owner,
        caller: Caller,
        sub: Box<Submission>,
        reply: Reply<JobRecord>,
    },
    SubmitSweep {
        owner: Owner,
        caller: Caller,
        members: Vec<(Submission, Vec<SweepValue>)>,
        reply: Reply<Vec<JobRecord>>,
    },
    Cancel {
        caller: Caller,
        id: JobId,
        reply: Reply<JobRecord>,
    },
    SetPriority {
        caller: Caller,
        id: JobId,
        priority: i32,
        reply: Reply<JobRecord>,
    },
    Requeue {
        caller: Caller,
        id: JobId,
        reply: Reply<JobRecord>,
    },
    Hold {
        caller: Caller,
        id: JobId,
        hold: bool,
        reply: Reply<JobRecord>,
    },
    Clean {
        caller: Caller,
        req: crate::spec::api::CleanRequest,
        reply: Reply<crate::spec::api::CleanResponse>,
    },
    Exited {
        id: JobId,
        attempt: u32,
        exit: ExitInfo,
    },
    Published {
        id: JobId,
        result: Result<PublishedModel, String>,
        by_hand: Option<Reply<JobRecord>>,
    },
    Publish {
        caller: Caller,
        id: JobId,
        overrides: PublishOverrides,
        reply: Reply<JobRecord>,
    },
    CreateSchedule {
        caller: Caller,
        owner: Owner,
        sub: Box<Submission>,
        reply: Reply<ScheduleRecord>,
    },
    ScheduleAction {
        caller: Caller,
        id: u64,
        action: ScheduleAction,
        reply: Reply<ScheduleRecord>,
    },
    Ping {
        reply: oneshot::Sender<()>,
    },
    Shutdown {
        reply: oneshot::Sender<()>,
        /// A restart in place: running jobs keep running (the next daemon takes them over).
        keep_jobs: bool,
    },
    /// A job's `[notify]` command has ended.
    Notified {
        id: JobId,
        end: crate::spec::record::JobEnd,
        outcome: notify::NotifyOutcome,
    },
    /// Before a restart in place: start nothing more, and answer once no model is being
    /// published (requests are still served meanwhile).
    Drain {
        reply: oneshot::Sender<()>,
    },
}

/// What readers see: swapped whole after every flushed batch.
#[derive(Debug, Default)]
pub struct View {
    pub jobs: BTreeMap<JobId, Arc<JobRecord>>,
    pub schedules: Arc<BTreeMap<u64, ScheduleRecord>>,
    pub waiting: BTreeMap<JobId, Waiting>,
    pub gpus: Option<Snapshot>,
    pub now: Millis,
    /// The jobs holding resources (starting, running), found once per view: readers (every
    /// dashboard stream, `/gpus`) then cost what runs, not what the store holds.
    pub active: Vec<Arc<JobRecord>>,
    /// Jobs by state, counted once per view.
    pub counts: Vec<(JobState, usize)>,
}

impl View {
    /// Jobs holding resources on the GPU with this UUID.
    pub fn jobs_on_gpu<'a>(
        &'a self,
        uuid: &'a str,
    ) -> impl Iterator<Item = &'a Arc<JobRecord>> + 'a {
        self.active.iter().filter(move |j| {
            j.placement
                .as_ref()
                .is_some_and(|p| p.gpus.iter().any(|g| g.uuid == uuid))
        })
    }

    /// Builds the derived parts ([`View::active`], [`View::counts`]) from `jobs`.
    fn derive(&mut self) {
        let mut counts = [0usize; JobState::ALL.len()];
        self.active.clear();
        for j in self.jobs.values() {
            if let Some(i) = JobState::ALL.iter().position(|s| *s == j.state) {
                counts[i] += 1;
            }
            if j.state.holds_resources() {
                self.active.push(j.clone());
            }
        }
        self.counts = JobState::ALL
            .iter()
            .zip(counts)
            .filter(|(_, n)| *n > 0)
            .map(|(s, n)| (*s, n))
            .collect();
    }
}

struct Shared {
    view: RwLock<Arc<View>>,
    changes: broadcast::Sender<JobChange>,
    /// Counts published views, so readers can wait for "the view changed" (GPU refreshes and
    /// waiting reasons change it without a [`JobChange`]).
    revision: watch::Sender<u64>,
}

/// Cheap, cloneable access to the scheduler for the API layer.
#[derive(Clone)]
pub struct SchedHandle {
    tx: mpsc::Sender<Msg>,
    shared: Arc<Shared>,
    store: Store,
    policy: Arc<SchedulerConfig>,
}

impl SchedHandle {
    async fn ask<T>(&self, make: impl FnOnce(Reply<T>) -> Msg) -> Result<T, SchedError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(make(tx))
            .await
            .map_err(|_| SchedError::ShuttingDown)?;
        rx.await.map_err(|_| SchedError::ShuttingDown)?
    }

    /// Queues a job; answers once it is durable.
    pub async fn submit(
        &self,
        caller: &Caller,
        owner: Owner,
        sub: Submission,
    ) -> Result<JobRecord, SchedError> {
        self.ask(|reply| Msg::Submit {
            owner,
            caller: caller.clone(),
            sub: Box::new(sub),
            reply,
        })
        .await
    }

    /// Queues a sweep's jobs (one per combination of its values), all or none; returns them
    /// in order, the first one's id being the sweep's.
    pub async fn submit_sweep(
        &self,
        caller: &Caller,
        owner: Owner,
        members: Vec<(Submission, Vec<SweepValue>)>,
    ) -> Result<Vec<JobRecord>, SchedError> {
        self.ask(|reply| Msg::SubmitSweep {
            owner,
            caller: caller.clone(),
            members,
            reply,
        })
        .await
    }

    /// Cancels a job (queued: at once; running: SIGTERM, grace, SIGKILL).
    pub async fn cancel(&self, caller: &Caller, id: JobId) -> Result<JobRecord, SchedError> {
        self.ask(|reply| Msg::Cancel {
            caller: caller.clone(),
            id,
            reply,
        })
        .await
    }

    /// Changes a job's priority.
    pub async fn set_priority(
        &self,
        caller: &Caller,
        id: JobId,
        priority: i32,
    ) -> Result<JobRecord, SchedError> {
        self.ask(|reply| Msg::SetPriority {
            caller: caller.clone(),
            id,
            priority,
            reply,
        })
        .await
    }

    /// Publishes a succeeded train job's model (again), with optional overrides; answers when
    /// the model is in the store.
    pub async fn publish(
        &self,
        caller: &Caller,
        id: JobId,
        overrides: PublishOverrides,
    ) -> Result<JobRecord, SchedError> {
        self.ask(|reply| Msg::Publish {
            caller: caller.clone(),
            id,
            overrides,
            reply,
        })
        .await
    }

    /// Creates a recurring schedule from a job file with `schedule = "..."`.
    pub async fn create_schedule(
        &self,
        caller: &Caller,
        owner: Owner,
        sub: Submission,
    ) -> Result<ScheduleRecord, SchedError> {
        self.ask(|reply| Msg::CreateSchedule {
            caller: caller.clone(),
            owner,
            sub: Box::new(sub),
            reply,
        })
        .await
    }

    /// Pauses, resumes, deletes or runs a schedule now.
    pub async fn schedule_action(
        &self,
        caller: &Caller,
        id: u64,
        action: ScheduleAction,
    ) -> Result<ScheduleRecord, SchedError> {
        self.ask(|reply| Msg::ScheduleAction {
            caller: caller.clone(),
            id,
            action,
            reply,
        })
        .await
    }

    /// Puts a failed or cancelled job back in the queue.
    pub async fn requeue(&self, caller: &Caller, id: JobId) -> Result<JobRecord, SchedError> {
        self.ask(|reply| Msg::Requeue {
            caller: caller.clone(),
            id,
            reply,
        })
        .await
    }

    /// Puts a queued job on hold (`hold`), or releases it.
    pub async fn hold(
        &self,
        caller: &Caller,
        id: JobId,
        hold: bool,
    ) -> Result<JobRecord, SchedError> {
        self.ask(|reply| Msg::Hold {
            caller: caller.clone(),
            id,
            hold,
            reply,
        })
        .await
    }

    /// Removes finished jobs for good (`jobctl clean`).
    pub async fn clean(
        &self,
        caller: &Caller,
        req: crate::spec::api::CleanRequest,
    ) -> Result<crate::spec::api::CleanResponse, SchedError> {
        self.ask(|reply| Msg::Clean {
            caller: caller.clone(),
            req,
            reply,
        })
        .await
    }

    /// Answers when the event loop has gone round once: proof that it is alive (for the
    /// systemd watchdog).
    pub async fn ping(&self) -> bool {
        let (tx, rx) = oneshot::channel();
        self.tx.send(Msg::Ping { reply: tx }).await.is_ok() && rx.await.is_ok()
    }

    /// The current snapshot.
    pub fn view(&self) -> Arc<View> {
        self.shared.view.read().expect("view lock").clone()
    }

    /// Every change from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<JobChange> {
        self.shared.changes.subscribe()
    }

    /// Wakes after every published view (bumped after that batch's [`JobChange`]s are sent).
    pub fn view_revisions(&self) -> watch::Receiver<u64> {
        self.shared.revision.subscribe()
    }

    /// A job's history (read from the store).
    pub fn events(&self, id: JobId) -> Result<Vec<JobEvent>, StoreError> {
        self.store.get(id)?;
        self.store.events(id)
    }

    /// The placement policy in force.
    pub fn policy(&self) -> &SchedulerConfig {
        &self.policy
    }
}

/// Why a job is where it is, for `jobctl explain`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Explanation {
    pub id: JobId,
    pub state: JobState,
    /// One line: the short reason (`jobctl list`'s column).
    pub summary: String,
    /// Full sentences.
    pub details: Vec<String>,
}

/// Explains a job's state from a snapshot.
pub fn explain(view: &View, id: JobId, now: Millis) -> Option<Explanation> {
    let job = view.jobs.get(&id)?;
    let mut details = Vec::new();
    let summary = match job.state {
        JobState::Queued => match view.waiting.get(&id) {
            Some(w) => {
                // Countdowns (retry backoff) run from the time of asking: the view is as old
                // as the scheduler's last change, which may be minutes.
                details.push(format!("Job {id} {}.", w.wait.long(now.max(view.now))));
                // What it waits for may itself be held: say so, or the wait looks endless.
                if let Wait::Dependency { on, .. } = &w.wait
                    && let Some(by) = view.jobs.get(on).and_then(|d| d.held_by.as_deref())
                {
                    details.push(format!(
                        "Job {on} is on hold (put there by {by}): it starts once released."
                    ));
                }
                let higher = view
                    .jobs
                    .values()
                    .filter(|j| j.state == JobState::Queued && j.priority > job.priority)
                    .count();
                if w.ahead > 0 {
                    details.push(format!(
                        "{} job{} ahead of it in line ({higher} with higher priority).",
                        w.ahead,
                        if w.ahead == 1 { " is" } else { "s are" }
                    ));
                }
                w.wait.short()
            }
            None => {
                details.push("It is about to be placed.".into());
                "pending".into()
            }
        },
        JobState::Starting | JobState::Running => {
            let placed = job
                .placement
                .as_ref()
                .map(describe_placement)
                .unwrap_or_else(|| "CPU".into());
            details.push(format!("Job {id} is {} on {placed}.", job.state));
            match &job.stop {
                Some(StopKind::Cancel { by }) => {
                    details.push(format!("It is being cancelled (requested by {by})."))
                }
                Some(StopKind::Preempt { for_job }) => details.push(format!(
                    "It is being preempted for higher-priority job {for_job}; it will be requeued."
                )),
                Some(StopKind::Shutdown) => {
                    details.push("The daemon is stopping; it will resume at the next start.".into())
                }
                Some(StopKind::TimeLimit) => details
                    .push("It reached its time limit and is being stopped; it will fail.".into()),
                Some(StopKind::Stalled) => details.push(
                    "It showed no sign of life for its stall_timeout and is being stopped.".into(),
                ),
                Some(StopKind::Requeue { why }) => {
                    details.push(format!("It is being stopped ({why}); it will be requeued."))
                }
                None => {
                    if let (Some(limit), Some(started)) =
                        (job.spec.resources.time_limit, job.started_at)
                    {
                        let left = (started + limit.0.as_millis() as Millis - now_ms()).max(0);
                        details.push(format!(
                            "Its time limit is {limit}: {} left.",
                            crate::spec::units::HumanDuration(Duration::from_secs(
                                (left as u64).div_ceil(1000)
                            ))
                        ));
                    }
                }
            }
            job.state.to_string()
        }
        _ => {
            let reason = job
                .reason
                .clone()
                .unwrap_or_else(|| "no reason recorded".into());
            let verb = match job.state {
                JobState::Succeeded | JobState::Failed => "",
                JobState::Cancelled | JobState::Interrupted => "was ",
                _ => "is ",
            };
            details.push(format!("Job {id} {verb}{}: {reason}.", job.state));
            reason
        }
    };
    if let Some(r) = &job.reason
        && job.state == JobState::Queued
        && (r.contains("preempt") || r.contains("retry") || r.contains("restart"))
    {
        details.push(format!("Last change: {r}."));
    }
    Some(Explanation {
        id,
        state: job.state,
        summary,
        details,
    })
}

/// The scheduler task's state.
pub struct Scheduler {
    store: Store,
    inventory: Inventory,
    settings: SchedSettings,
    jobs: BTreeMap<JobId, JobRecord>,
    children: HashMap<JobId, ChildHandle>,
    rx: mpsc::Receiver<Msg>,
    tx: mpsc::Sender<Msg>,
    shared: Arc<Shared>,
    gpus: Snapshot,
    gpus_at: Instant,
    /// `allowed_gpus` entries that selected no GPU at the last refresh (warned once a change).
    unmatched_allowed: Vec<String>,
    usage: usage::Ledger,
    waiting: BTreeMap<JobId, Waiting>,
    shutting_down: Option<oneshot::Sender<()>>,
    /// The shutdown is a restart in place: running jobs are left running.
    handing_over: bool,
    /// A restart in place is coming: nothing new starts.
    draining: bool,
    /// Answered once draining and no model is being published.
    drained: Option<oneshot::Sender<()>>,
    /// Jobs whose model is being published (shutdown waits for them).
    publishing: HashSet<JobId>,
    /// Model names being published into the shared Ollama directory, and by which job: a
    /// name is taken from the start of its publish, so that two jobs finishing together cannot
    /// both pass the ownership check.
    publishing_names: HashMap<String, JobId>,
    /// Jobs recorded `starting` in this round, spawned once that record is on disk: a crash
    /// between the two must not leave a job that ran recorded as `queued` (it ran again, with
    /// nothing in its history).
    to_spawn: Vec<JobId>,
    /// Jobs whose end is to be notified once this round is on disk (`[notify]`).
    to_notify: Vec<JobId>,
    /// Jobs whose notifier runs.
    notifying: HashMap<JobId, notify::Notifier>,
    /// Jobs removed (`clean`) since the last view: taken out of the next one.
    removed: Vec<JobId>,
    /// When `scheduler.keep_finished` was last applied.
    last_auto_clean: Millis,
    /// The state file system filled up: no job starts until it has room.
    disk_full: bool,
    schedules: BTreeMap<u64, ScheduleRecord>,
    /// Unfinished jobs per owner, for `max_submitted`; kept in step with `jobs`.
    unfinished: submit_limit::Unfinished,
    /// When this daemon started: schedule firings due before it were missed.
    started_at: Millis,
    /// A schedule changed in this batch (the view's copy must be rebuilt).
    schedules_changed: bool,
    /// Changes made in the current batch, published after the flush.
    pending: Vec<JobChange>,
}

/// Maximum messages handled per batch (and so per flush).
const BATCH: usize = 512;

/// How many exits with code 75 that jobd did not ask for requeue a job before it fails.
pub const MAX_UNREQUESTED_REQUEUES: u32 = 3;

impl Scheduler {
    /// Loads the store, recovers jobs left running by an earlier daemon (stopping leftover
    /// workers) and returns the scheduler and its handle. Run it with [`Scheduler::run`].
    pub async fn start(
        store: Store,
        inventory: Inventory,
        settings: SchedSettings,
    ) -> Result<(Scheduler, SchedHandle), StoreError> {
        let records = store.all_jobs()?;
        let (tx, rx) = mpsc::channel(4096);
        let (changes, _) = broadcast::channel(4096);
        let shared = Arc::new(Shared {
            view: RwLock::new(Arc::new(View::default())),
            changes,
            revision: watch::Sender::new(0),
        });
        let gpus = inventory.snapshot(&|_| false);
        let jobs: BTreeMap<JobId, JobRecord> = records.into_iter().map(|r| (r.id, r)).collect();
        let mut s = Scheduler {
            store,
            inventory,
            usage: usage::Ledger::new(settings.policy.fair_share_half_life),
            settings,
            unfinished: submit_limit::Unfinished::count(&jobs),
            jobs,
            children: HashMap::new(),
            rx,
            tx: tx.clone(),
            shared: shared.clone(),
            gpus,
            gpus_at: Instant::now(),
            unmatched_allowed: Vec::new(),
            waiting: BTreeMap::new(),
            shutting_down: None,
            handing_over: false,
            draining: false,
            drained: None,
            publishing: HashSet::new(),
            publishing_names: HashMap::new(),
            to_spawn: Vec::new(),
            to_notify: Vec::new(),
            notifying: HashMap::new(),
            removed: Vec::new(),
            last_auto_clean: 0,
            disk_full: false,
            schedules: BTreeMap::new(),
            started_at: now_ms(),
            schedules_changed: true,
            pending: Vec::new(),
        };
        for job in s.jobs.values() {
            s.usage.record_finished(job);
        }
        s.seed_model_owners()?;
        for (user, seconds, at) in s.store.carried_usage()? {
            s.usage.add(&user, seconds, at);
        }
        s.sweep_removed_job_dirs()?;
        s.warn_unmatched_allowed();
        recovery::recover(&mut s).await?;
        s.resume_notifications();
        s.schedules = s
            .store
            .all_schedules()?
            .into_iter()
            .map(|r| (r.id, r))
            .collect();
        // Missed firings (the daemon was down) run once now, if their schedule says so.
        s.fire_due(now_ms());
        s.store.flush().await?;
        s.check_disk_space();
        s.replan();
        s.store.flush().await?;
        s.spawn_started();
        s.store.flush().await?;
        // Notifiers start in the first round of `run`, unless a stop came first
        // (`hold_notifiers`).
        s.publish_view();
        let handle = SchedHandle {
            tx,
            shared,
            store: s.store.clone(),
            policy: Arc::new(s.settings.policy.clone()),
        };
        Ok((s, handle))
    }

    /// The event loop; returns after a shutdown request once every worker has stopped.
    pub async fn run(mut self) {
        let mut batch = Vec::with_capacity(BATCH);
        loop {
            let deadline = self.next_deadline();
            let got = tokio::select! {
                n = self.rx.recv_many(&mut batch, BATCH) => n,
                () = sleep_until(deadline) => 0,
            };
            let mut replies: Vec<Box<dyn FnOnce() + Send>> = Vec::new();
            for msg in batch.drain(..) {
                if let Some(r) = self.handle(msg) {
                    replies.push(r);
                }
            }
            if got == 0 && self.rx.is_closed() && self.idle() {
                break;
            }
            if self.shutting_down.is_none() {
                self.stop_overdue(now_ms());
                self.auto_clean(now_ms());
                self.check_disk_space();
                // Draining for a restart in place: what is due is the next image's to start.
                if !self.draining {
                    self.fire_due(now_ms());
                    self.replan();
                }
            }
            self.flush_or_stop().await;
            // Their `running` records (pids) on disk too, before anyone is told.
            if self.spawn_started() {
                self.flush_or_stop().await;
            }
            if self.start_notifications() {
                self.flush_or_stop().await;
            }
            self.publish_view();
            for r in replies {
                r();
            }
            if self.draining
                && self.publishing.is_empty()
                && self.notifying.is_empty()
                && let Some(done) = self.drained.take()
            {
                let _ = done.send(());
            }
            if self.shutting_down.is_some() && (self.idle() || self.handed_over()) {
                if let Some(done) = self.shutting_down.take() {
                    let _ = done.send(());
                }
                return;
            }
        }
    }

    /// Flushes the store; on failure jobd stops (the changes were not answered yet), saying
    /// what to do when the cause is a full file system.
    async fn flush_or_stop(&self) {
        if let Err(e) = self.store.flush().await {
            if e.is_disk_full() {
                error!(
                    "the file system of the state directory is full; jobd stops with its queue \
                     safe on disk. Started again (systemd does), it uses its disk reserve and \
                     starts no job until space is free"
                );
            }
            // A store that cannot persist must not keep accepting work.
            error!(error = %e, "cannot flush the job store; stopping");
            std::process::exit(70);
        }
    }

    /// Watches the free space of the state file system: with less than two reserves free,
    /// no job starts (a job filling it would stop the queue for everyone, or fail writing its
    /// job directory); they start again once jobd's reserve could be set aside again.
    fn check_disk_space(&mut self) {
        let dir = &self.settings.store_dir;
        let free = crate::store::free_bytes(dir).unwrap_or(u64::MAX);
        if !self.disk_full && free < 2 * crate::store::RESERVE_BYTES {
            self.disk_full = true;
            error!(
                free_bytes = free,
                "the file system of the state directory is nearly full: no job starts until \
                 space is free (old job directories, checkpoints; jobctl clean)"
            );
        } else if self.disk_full && crate::store::ensure_reserve(dir) {
            self.disk_full = false;
            info!("the state directory's file system has room again: jobs start again");
        }
    }

    /// Running jobs with a time limit not yet being stopped, and when their runs end.
    fn time_limits(&self) -> impl Iterator<Item = (JobId, Millis)> + '_ {
        // The jobs with a process (not every job ever stored: this runs every round).
        self.running_jobs()
            .filter(|j| matches!(j.state, JobState::Starting | JobState::Running))
            .filter(|j| j.stop.is_none())
            .filter_map(|j| {
                let limit = j.spec.resources.time_limit?;
                Some((j.id, j.started_at? + limit.0.as_millis() as Millis))
            })
    }

    /// The jobs whose process this daemon started and watches.
    fn running_jobs(&self) -> impl Iterator<Item = &JobRecord> + '_ {
        self.children.keys().filter_map(|id| self.jobs.get(id))
    }

    /// Running jobs with a stall timeout, not being stopped, and when they count as stalled
    /// unless they show a sign of life first: the newest change to their output, progress or
    /// metrics (or the run's start), plus the timeout.
    fn stall_deadlines(&self) -> impl Iterator<Item = (JobId, Millis)> + '_ {
        self.running_jobs()
            .filter(|j| j.state == JobState::Running && j.stop.is_none())
            .filter_map(|j| {
                let timeout = j.spec.resources.stall_timeout?;
                let newest = last_sign_of_life(&j.dir(&self.settings.jobs_dir)).unwrap_or(0);
                let since = newest.max(j.started_at?);
                Some((j.id, since + timeout.0.as_millis() as Millis))
            })
    }

    /// Stops the runs that reached their time limit (they then fail) or stalled (they are
    /// retried as a failure), as a cancel does.
    fn stop_overdue(&mut self, now: Millis) {
        let due: Vec<(JobId, StopKind)> = self
            .time_limits()
            .filter(|(_, t)| *t <= now)
            .map(|(id, _)| (id, StopKind::TimeLimit))
            .chain(
                self.stall_deadlines()
                    .filter(|(_, t)| *t <= now)
                    .map(|(id, _)| (id, StopKind::Stalled)),
            )
            .collect();
        let grace = self.settings.grace;
        for (id, kind) in due {
            if self.jobs[&id].stop.is_some() {
                continue; // both at once: the time limit came first
            }
            let resources = &self.jobs[&id].spec.resources;
            let why = match kind {
                StopKind::TimeLimit => format!(
                    "time limit of {} reached",
                    resources.time_limit.unwrap_or_default()
                ),
                _ => format!(
                    "no output or progress for {}",
                    resources.stall_timeout.unwrap_or_default()
                ),
            };
            let r = self.apply(
                id,
                None,
                format!("{why}; stopping it (grace {}s)", grace.as_secs()),
                &|r| {
                    r.stop = Some(kind.clone());
                    r.stop_at = Some(now_ms());
                },
            );
            if let Err(e) = r {
                error!(job_id = id, error = %e, "cannot record a stop");
                continue;
            }
            if let Some(child) = self.children.get(&id) {
                child.stop(grace);
            }
        }
    }

    /// No worker or notifier runs and no model is being published.
    fn idle(&self) -> bool {
        self.children.is_empty() && self.publishing.is_empty() && self.notifying.is_empty()
    }

    /// A restart in place may go ahead: no model is being published and no notifier runs
    /// (their work is done here, not in a worker the next daemon could take over).
    fn handed_over(&self) -> bool {
        self.handing_over && self.publishing.is_empty() && self.notifying.is_empty()
    }

    fn next_deadline(&self) -> Option<tokio::time::Instant> {
        let now = now_ms();
        let mut next: Option<Millis> = None;
        for w in self.waiting.values() {
            if let Wait::Backoff { until } = w.wait {
                next = Some(next.map_or(until, |n| n.min(until)));
            }
        }
        let starvation = self.settings.policy.starvation_after.as_millis() as Millis;
        // Every queued job has an entry in `waiting` (not every job ever stored).
        for job in self
            .waiting
            .keys()
            .filter_map(|id| self.jobs.get(id))
            .filter(|j| j.state == JobState::Queued)
        {
            let t = job.queued_at.max(job.submitted_at) + starvation;
            if t > now {
                next = Some(next.map_or(t, |n| n.min(t)));
            }
        }
        if let Some(t) = self.next_schedule_fire() {
            next = Some(next.map_or(t, |n| n.min(t)));
        }
        for (_, t) in self.time_limits().chain(self.stall_deadlines()) {
            next = Some(next.map_or(t, |n| n.min(t)));
        }
        let mut at = next
            .map(|t| tokio::time::Instant::now() + Duration::from_millis((t - now).max(0) as u64));
        // The inventory is refreshed even with no GPU work: `jobctl gpus` and the dashboard
        // show other processes' use to people deciding where to run.
        let refresh =
            tokio::time::Instant::from_std(self.gpus_at + self.settings.policy.gpu_refresh);
        at = Some(at.map_or(refresh, |a| a.min(refresh)));
        // Ends queued for a notifier at start-up (or waiting for a place): a round now.
        if self.notifier_may_start() {
            at = Some(tokio::time::Instant::now());
        }
        at
    }

    fn handle(&mut self, msg: Msg) -> Option<Box<dyn FnOnce() + Send>> {
        fn reply<T: Send + 'static>(
            tx: Reply<T>,
            r: Result<T, SchedError>,
        ) -> Option<Box<dyn FnOnce() + Send>> {
            Some(Box::new(move || {
                let _ = tx.send(r);
            }))
        }
        match msg {
            Msg::Submit {
                owner,
                caller,
                sub,
                reply: tx,
            } => {
                let r = self.submit(&caller, owner, *sub);
                reply(tx, r)
            }
            Msg::SubmitSweep {
                owner,
                caller,
                members,
                reply: tx,
            } => {
                let r = self.submit_sweep(&caller, owner, members);
                reply(tx, r)
            }
            Msg::Cancel {
                caller,
                id,
                reply: tx,
            } => {
                let r = self.cancel(&caller, id);
                reply(tx, r)
            }
            Msg::SetPriority {
                caller,
                id,
                priority,
                reply: tx,
            } => {
                let r = self.set_priority(&caller, id, priority);
                reply(tx, r)
            }
            Msg::Requeue {
                caller,
                id,
                reply: tx,
            } => {
                let r = self.requeue(&caller, id);
                reply(tx, r)
            }
            Msg::Hold {
                caller,
                id,
                hold,
                reply: tx,
            } => {
                let r = self.hold(&caller, id, hold);
                reply(tx, r)
            }
            Msg::Clean {
                caller,
                req,
                reply: tx,
            } => {
                let r = self.clean(&caller, &req, now_ms());
                reply(tx, r)
            }
            Msg::Exited { id, attempt, exit } => {
                self.exited(id, attempt, exit, now_ms());
                None
            }
            Msg::Notified { id, end, outcome } => {
                self.notifier_ended(id, end, outcome);
                None
            }
            Msg::Published {
                id,
                result,
                by_hand,
            } => {
                let r = self.published(id, result, by_hand.is_some());
                by_hand.and_then(|tx| reply(tx, r))
            }
            Msg::Publish {
                caller,
                id,
                overrides,
                reply: tx,
            } => match self.publish_by_hand(&caller, id, overrides, tx) {
                Ok(()) => None,
                Err((tx, e)) => reply(tx, Err(e)),
            },
            Msg::CreateSchedule {
                caller,
                owner,
                sub,
                reply: tx,
            } => {
                let r = self.create_schedule(&caller, owner, *sub);
                reply(tx, r)
            }
            Msg::ScheduleAction {
                caller,
                id,
                action,
                reply: tx,
            } => {
                let r = self.schedule_action(&caller, id, action);
                reply(tx, r)
            }
            Msg::Ping { reply } => {
                let _ = reply.send(());
                None
            }
            Msg::Drain { reply } => {
                if !self.publishing.is_empty() {
                    info!(
                        publishing = self.publishing.len(),
                        "the restart in place waits for the publishes in progress; nothing new starts meanwhile"
                    );
                }
                self.draining = true;
                self.drained = Some(reply);
                self.bound_notifiers();
                None
            }
            Msg::Shutdown { reply, keep_jobs } => {
                if keep_jobs {
                    self.begin_handover(reply);
                } else {
                    self.begin_shutdown(reply);
                }
                None
            }
        }
    }

    // ---- changes -------------------------------------------------------------------------

    /// Applies a change through the store and mirrors it; queues the change for subscribers.
    fn apply(
        &mut self,
        id: JobId,
        to: Option<JobState>,
        reason: String,
        edit: &dyn Fn(&mut JobRecord),
    ) -> Result<JobRecord, StoreError> {
        self.record(id, to, reason, edit, false)
    }

    /// Changes a job's record with no event in its history (the process of its notifier).
    fn edit_quietly(
        &mut self,
        id: JobId,
        edit: &dyn Fn(&mut JobRecord),
    ) -> Result<JobRecord, StoreError> {
        let rec = self.store.edit(id, edit)?;
        self.note_change(rec.clone(), None);
        Ok(rec)
    }

    /// Records a note in a job's history (`reason`) with `edit`, leaving its state and the
    /// reason for it as they are.
    fn add_note(
        &mut self,
        id: JobId,
        reason: String,
        edit: &dyn Fn(&mut JobRecord),
    ) -> Result<JobRecord, StoreError> {
        self.record(id, None, reason, edit, true)
    }

    fn record(
        &mut self,
        id: JobId,
        to: Option<JobState>,
        reason: String,
        edit: &dyn Fn(&mut JobRecord),
        keeps_reason: bool,
    ) -> Result<JobRecord, StoreError> {
        let (rec, event) = self.store.apply(
            id,
            &Change {
                to,
                expect: &[],
                reason,
                edit,
                keeps_reason,
            },
        )?;
        self.note_change(rec.clone(), Some(event));
        Ok(rec)
    }

    fn note_change(&mut self, rec: JobRecord, event: Option<JobEvent>) {
        if rec.state != JobState::Queued {
            self.waiting.remove(&rec.id);
        }
        // In the map first: whether a notification is due may depend on the other jobs of
        // its sweep, this one as it is now among them.
        let old = self.jobs.insert(rec.id, rec.clone());
        self.unfinished.replace(old.as_ref(), &rec);
        self.queue_notification(&rec);
        self.pending.push(JobChange {
            job: crate::spec::api::JobView {
                record: rec,
                progress: None,
                waiting: None,
                job_dir: None,
                redacted: false,
            },
            event,
        });
    }

    fn submit(
        &mut self,
        caller: &Caller,
        owner: Owner,
        sub: Submission,
    ) -> Result<JobRecord, SchedError> {
        self.check_submitter(caller)?;
        // Before the other checks: a flood is refused at the cost of a lookup.
        self.check_submit_limit(&owner.user, 1)?;
        let (rec, reason) = self.checked_job(caller, owner, sub)?;
        let (rec, event) = self
            .store
            .insert(&reason, &|id| JobRecord { id, ..rec.clone() })?;
        info!(job_id = rec.id, owner = %rec.owner.user, name = %rec.name, "job submitted");
        self.note_change(rec.clone(), Some(event));
        Ok(rec)
    }

    /// Queues a sweep's jobs, all or none: each is checked as a submitted job would be, and
    /// they are stored in one transaction with consecutive ids, the first being the sweep's.
    fn submit_sweep(
        &mut self,
        caller: &Caller,
        owner: Owner,
        members: Vec<(Submission, Vec<SweepValue>)>,
    ) -> Result<Vec<JobRecord>, SchedError> {
        self.check_submitter(caller)?;
        let size = members.len();
        self.check_submit_limit(&owner.user, size)?;
        let mut checked = Vec::with_capacity(size);
        for (i, (sub, values)) in members.into_iter().enumerate() {
            let label = crate::spec::sweep::label(&values);
            let (rec, reason) = self
                .checked_job(caller, owner.clone(), sub)
                .map_err(|e| e.context(&format!("sweep job {} ({label})", i + 1)))?;
            checked.push((rec, values, reason));
        }
        let made = self.store.insert_many(size, &|id, first| {
            let (rec, values, reason) = &checked[(id - first) as usize];
            let index = id - first + 1;
            // No values here: the history is shown to everyone, and a swept environment
            // variable may be a secret (the record's values are hidden as its spec is).
            let reason = format!("{reason}: sweep {first}, job {index} of {size}");
            let rec = JobRecord {
                id,
                sweep: Some(SweepMember {
                    id: first,
                    index: index as u32,
                    size: size as u32,
                    values: values.clone(),
                }),
                ..rec.clone()
            };
            (rec, reason)
        })?;
        let mut recs = Vec::with_capacity(size);
        for (rec, event) in made {
            info!(job_id = rec.id, owner = %rec.owner.user, name = %rec.name, sweep = rec.sweep.as_ref().map_or(0, |s| s.id), "job submitted");
            self.note_change(rec.clone(), Some(event));
            recs.push(rec);
        }
        Ok(recs)
    }

    /// A submitted job's record (id not yet assigned) after every check, and the reason its
    /// history starts with.
    fn checked_job(
        &mut self,
        caller: &Caller,
        owner: Owner,
        sub: Submission,
    ) -> Result<(JobRecord, String), SchedError> {
        if sub.spec.schedule.is_some() {
            return Err(SchedError::Invalid(
                "this job file has a schedule: submit it as a schedule (jobctl submit does; POST /api/v1/schedules)".into(),
            ));
        }
        self.check_priority(caller, sub.spec.priority, None)?;
        let hold = sub.hold;
        let sub_copy_of = sub.copy_of.clone();
        let sweep = sub.sweep.clone();
        let mut rec = self.prepare_job(owner, sub, now_ms())?;
        rec.sweep = sweep;
        if hold {
            rec.held_by = caller.user.clone();
        }
        if let Some(p) = &rec.spec.publish {
            self.check_model_name(p, &rec.owner.user, caller.admin)?;
        }
        let by = caller.user.as_deref().unwrap_or("?");
        let reason = match sub_copy_of {
            Some((of, keys)) if keys.is_empty() => {
                format!("resubmitted by {by}: job {of}'s file, run again")
            }
            Some((of, keys)) => format!(
                "resubmitted by {by}: job {of}'s file, run again with --set {}",
                keys.join(", ")
            ),
            None => format!("submitted by {by}"),
        };
        // Only a resubmitted job of a sweep has its membership yet: it stays in the sweep.
        let reason = match &rec.sweep {
            Some(s) => format!("{reason}, as job {} of sweep {}", s.index, s.id),
            None => reason,
        };
        Ok((rec, reason))
    }

    /// A priority above `scheduler.max_user_priority` puts a job ahead of other people's (and
    /// lets it preempt them): only admins may give it. Anyone may lower a priority, including
    /// one an admin raised (`current`).
    pub(super) fn check_priority(
        &self,
        caller: &Caller,
        priority: i32,
        current: Option<i32>,
    ) -> Result<(), SchedError> {
        let max = self.settings.policy.max_user_priority;
        if caller.admin || priority <= max || current.is_some_and(|c| priority <= c) {
            return Ok(());
        }
        Err(SchedError::Forbidden(format!(
            "priority {priority} is above what users may give their jobs ({max}, \
             scheduler.max_user_priority): it would put the job ahead of other people's work \
             and let it preempt them; ask an admin, or lower your other jobs' priority instead"
        )))
    }

    fn check_submitter(&self, caller: &Caller) -> Result<(), SchedError> {
        if self.shutting_down.is_some() {
            return Err(SchedError::ShuttingDown);
        }
        if !caller.can_submit {
            let who = caller.user.as_deref().unwrap_or("anonymous");
            return Err(SchedError::Forbidden(if self.settings.run_as_owner {
                format!(
                    "user {who} may not submit jobs to this daemon: it runs each job as its \
                     owner, and {who} has no account on this machine"
                )
            } else {
                format!(
                    "user {who} may not submit jobs to this daemon (it runs as another user; \
                     ask its admin to add you to trusted_users)"
                )
            }));
        }
        Ok(())
    }

    /// A new queued job's record (id not yet assigned), checked against the dependencies,
    /// the publish target and the inventory.
    fn prepare_job(
        &mut self,
        owner: Owner,
        sub: Submission,
        now: Millis,
    ) -> Result<JobRecord, SchedError> {
        for (i, dep) in sub.spec.depends_on.iter().enumerate() {
            match self.jobs.get(dep).map(|d| d.state) {
                None => {
                    return Err(SchedError::Invalid(format!(
                        "depends_on[{i}]: job {dep} does not exist"
                    )));
                }
                // It would fail at once: say so now (requeue the dependency first).
                Some(s @ (JobState::Failed | JobState::Cancelled)) => {
                    return Err(SchedError::Invalid(format!(
                        "depends_on[{i}]: job {dep} has {s}, so this job would fail at once \
                         (requeue job {dep} first)"
                    )));
                }
                Some(_) => {}
            }
        }
        // More threads than the machine has cores only slow a job down (and OMP_NUM_THREADS
        // would say that many): most likely a file written for a bigger machine.
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as u32;
        if let Some(cpus) = sub.spec.resources.cpus
            && cpus > cores
        {
            return Err(SchedError::Infeasible(format!(
                "resources.cpus = {cpus} is more than this machine's {cores} cores"
            )));
        }
        let mut rec = JobRecord::new_queued(owner, sub.name, sub.spec, sub.source, now);
        rec.source_path = sub.source_path;
        if let Some(p) = &rec.spec.publish {
            self.check_models_dir(p.models_dir.as_deref(), &rec.owner)?;
        }
        if rec.kind == JobKind::Train && rec.spec.resources.gpus > 0 {
            rec.vram_estimate = crate::estimate::per_gpu_bytes(&rec.spec);
        }
        self.refresh_gpus(true);
        plan::feasible(
            &rec,
            &self.gpus.gpus,
            &self.settings.policy,
            self.gpus.note.as_deref(),
        )
        .map_err(|why| SchedError::Infeasible(format!("{why}{}", self.smaller_variant(&rec))))?;
        Ok(rec)
    }

    /// For a train job too big for this machine: the change in its job file that would make
    /// it fit, when recomputing activations (`gradient_checkpointing`) is enough.
    fn smaller_variant(&self, rec: &JobRecord) -> String {
        let Some(t) = rec.spec.training.as_ref() else {
            return String::new();
        };
        if rec.kind != JobKind::Train
            || t.gradient_checkpointing
            || rec.spec.resources.vram != crate::spec::job::VramRequest::Auto
        {
            return String::new();
        }
        let mut with = rec.clone();
        if let Some(t) = with.spec.training.as_mut() {
            t.gradient_checkpointing = true;
        }
        with.vram_estimate = crate::estimate::per_gpu_bytes(&with.spec);
        let fits = plan::feasible(&with, &self.gpus.gpus, &self.settings.policy, None).is_ok();
        match with.vram_estimate {
            Some(b) if fits => format!(
                "; with training.gradient_checkpointing = true it needs {} and fits",
                crate::spec::units::ByteSize(b)
            ),
            _ => String::new(),
        }
    }

    fn get_for_change(&self, caller: &Caller, id: JobId) -> Result<&JobRecord, SchedError> {
        let rec = self.jobs.get(&id).ok_or(SchedError::NotFound(id))?;
        if !caller.may_change(&rec.owner.user) {
            return Err(SchedError::Forbidden(format!(
                "job {id} belongs to {}; only its owner or an admin may change it",
                rec.owner.user
            )));
        }
        Ok(rec)
    }

    fn cancel(&mut self, caller: &Caller, id: JobId) -> Result<JobRecord, SchedError> {
        let rec = self.get_for_change(caller, id)?;
        let by = caller.user.clone().unwrap_or_default();
        match rec.state {
            JobState::Queued | JobState::Interrupted => Ok(self.apply(
                id,
                Some(JobState::Cancelled),
                format!("cancelled by {by}"),
                &|r| {
                    r.finished_at = Some(now_ms());
                    r.held_by = None;
                },
            )?),
            JobState::Starting | JobState::Running => {
                if matches!(rec.stop, Some(StopKind::Cancel { .. })) {
                    return Ok(rec.clone());
                }
                let grace = self.settings.grace;
                let stop = StopKind::Cancel { by: by.clone() };
                let rec = self.apply(
                    id,
                    None,
                    format!(
                        "cancel requested by {by}; stopping the {} (grace {}s)",
                        what_runs(rec.kind),
                        grace.as_secs()
                    ),
                    &|r| {
                        r.stop = Some(stop.clone());
                        r.stop_at = Some(now_ms());
                    },
                )?;
                if let Some(child) = self.children.get(&id) {
                    child.stop(grace);
                }
                Ok(rec)
            }
            JobState::Publishing => Err(SchedError::Conflict(format!(
                "job {id} is publishing its model; wait for it to finish"
            ))),
            s => Err(SchedError::Conflict(format!(
                "job {id} has already {}",
                finished_word(s)
            ))),
        }
    }

    fn set_priority(
        &mut self,
        caller: &Caller,
        id: JobId,
        priority: i32,
    ) -> Result<JobRecord, SchedError> {
        let rec = self.get_for_change(caller, id)?;
        if !crate::spec::job::priority_in_range(priority) {
            return Err(SchedError::Invalid(format!(
                "priority must be between -{0} and {0}",
                crate::spec::job::MAX_PRIORITY
            )));
        }
        self.check_priority(caller, priority, Some(rec.priority))?;
        // A finished job's priority means nothing, and the change would replace its reason
        // (why it failed) in `list` and the dashboard.
        if rec.state.is_terminal() {
            let hint = if matches!(rec.state, JobState::Failed | JobState::Cancelled) {
                " (requeue it first)"
            } else {
                ""
            };
            return Err(SchedError::Conflict(format!(
                "job {id} has already {}; a priority applies to queued and running jobs{hint}",
                rec.state
            )));
        }
        let old = rec.priority;
        let by = caller.user.clone().unwrap_or_default();
        Ok(self.apply(
            id,
            None,
            format!("priority {old} → {priority} by {by}"),
            &|r| r.priority = priority,
        )?)
    }

    fn requeue(&mut self, caller: &Caller, id: JobId) -> Result<JobRecord, SchedError> {
        let rec = self.get_for_change(caller, id)?;
        if !matches!(rec.state, JobState::Failed | JobState::Cancelled) {
            return Err(SchedError::Conflict(format!(
                "job {id} {}; only failed or cancelled jobs can be requeued (`jobctl \
                 resubmit {id}` runs its job file again as a new job)",
                state_phrase(rec.state)
            )));
        }
        // A requeued job is unfinished again: without this, cancelling and requeueing would
        // go round the limit.
        self.check_submit_limit(&rec.owner.user, 1)?;
        let by = caller.user.clone().unwrap_or_default();
        Ok(self.apply(
            id,
            Some(JobState::Queued),
            format!("requeued by {by}"),
            &|r| {
                r.held_by = None;
                r.queued_at = now_ms();
                r.retries = 0;
                r.unrequested_requeues = 0;
                r.not_before = None;
                r.stop = None;
                r.finished_at = None;
            },
        )?)
    }

    /// Holds a queued job (it keeps its place in line but does not start) or releases it, as
    /// Slurm's `scontrol hold`/`release`: owner or admin.
    fn hold(&mut self, caller: &Caller, id: JobId, hold: bool) -> Result<JobRecord, SchedError> {
        let rec = self.get_for_change(caller, id)?.clone();
        let by = caller.user.clone().unwrap_or_default();
        if rec.state != JobState::Queued {
            let verb = if hold { "held" } else { "released" };
            return Err(SchedError::Conflict(format!(
                "job {id} {}; only queued jobs can be {verb}",
                state_phrase(rec.state)
            )));
        }
        match (hold, &rec.held_by) {
            (true, None) => Ok(self.apply(id, None, format!("held by {by}"), &|r| {
                r.held_by = Some(by.clone())
            })?),
            // An admin holding a job its owner held makes it the admin's hold, which the
            // owner cannot lift.
            (true, Some(placer)) if *placer == rec.owner.user && by != rec.owner.user => {
                Ok(self.apply(id, None, format!("held by {by}"), &|r| {
                    r.held_by = Some(by.clone())
                })?)
            }
            // A hold someone else (an admin) put on a job is an admin's to lift, as Slurm's.
            (false, Some(placer)) if *placer != rec.owner.user && !caller.admin => {
                Err(SchedError::Forbidden(format!(
                    "job {id} was put on hold by {placer}; only an admin may release it"
                )))
            }
            (false, Some(_)) => {
                // Held, it did not age: it queues from now on, so that a long hold does not
                // make it the starving first in line the moment it is released.
                let now = now_ms();
                Ok(self.apply(id, None, format!("released by {by}"), &|r| {
                    r.held_by = None;
                    r.queued_at = now;
                })?)
            }
            // Asked twice: nothing more to do.
            (true, Some(_)) | (false, None) => Ok(rec),
        }
    }

    /// Records the end of a job's attempt `attempt` at `ended_at` (Unix ms; earlier than now
    /// when recovery learns of a command that ended while jobd was down).
    fn exited(&mut self, id: JobId, attempt: u32, exit: ExitInfo, ended_at: Millis) {
        let Some(rec) = self.jobs.get(&id) else {
            return;
        };
        if rec.attempts != attempt || !rec.state.holds_resources() {
            return;
        }
        self.children.remove(&id);
        let now = ended_at;
        let gpus = rec.placement.as_ref().map_or(0, |p| p.gpus.len());
        let seconds = gpus as f64
            * rec
                .started_at
                .map_or(0.0, |s| (now - s).max(0) as f64 / 1000.0);
        self.usage.add(&rec.owner.user, seconds, now);
        let job_dir = rec.dir(&self.settings.jobs_dir);
        let peak = read_progress(&job_dir).and_then(|p| p.peak_memory_bytes);
        // A train worker's error (exit 1) or panic (101), or a command that could not be
        // started (127).
        let worker_error = (matches!(
            (rec.kind, exit.code),
            (JobKind::Train, Some(1 | 101)) | (JobKind::Command, Some(127))
        ))
        .then(|| read_worker_error(&job_dir, attempt))
        .flatten();
        // "exit code 1: data/train.jsonl:5: invalid JSON: …" rather than "exit code 1".
        let failure = match &worker_error {
            Some(message) => format!("{exit}: {message}"),
            None => exit.to_string(),
        };
        let stop = rec.stop.clone();
        let retry = rec.spec.retry.clone();
        let retries = rec.retries;
        let unrequested = rec.unrequested_requeues;
        let self_requeues = !retry.on_exit_codes.contains(&EXIT_PREEMPTED);
        let exit_info = exit.clone();
        let finish = move |r: &mut JobRecord| {
            r.exit = Some(exit_info.clone());
            r.gpu_seconds += seconds;
            r.process = None;
            r.stop = None;
            if peak.is_some() {
                r.vram_peak = peak;
            }
        };
        let result = match (&stop, exit.code) {
            (Some(StopKind::Cancel { by }), _) => {
                let reason = format!("cancelled by {by} ({exit})");
                self.apply(id, Some(JobState::Cancelled), reason, &|r| {
                    finish(r);
                    r.finished_at = Some(now);
                })
            }
            (Some(StopKind::TimeLimit), _) => {
                let limit = rec
                    .spec
                    .resources
                    .time_limit
                    .map_or_else(String::new, |l| format!(" of {l}"));
                let resumes = if rec.kind == JobKind::Train {
                    "; jobctl requeue resumes it from its last checkpoint"
                } else {
                    ""
                };
                self.apply(
                    id,
                    Some(JobState::Failed),
                    format!("reached its time limit{limit} ({exit}){resumes}"),
                    &|r| {
                        finish(r);
                        r.finished_at = Some(now);
                    },
                )
            }
            (Some(StopKind::Stalled), _) => {
                let timeout = rec
                    .spec
                    .resources
                    .stall_timeout
                    .map_or_else(String::new, |t| format!(" for {t}"));
                let stalled = format!("stalled: no output or progress{timeout} ({exit})");
                if retries < retry.max && retry.on_exit_codes.is_empty() {
                    self.retry_later(id, &stalled, &retry, retries + 1, now, &finish)
                } else {
                    self.apply(id, Some(JobState::Failed), stalled, &|r| {
                        finish(r);
                        r.finished_at = Some(now);
                    })
                }
            }
            (Some(StopKind::Shutdown), _) => self.apply(
                id,
                Some(JobState::Interrupted),
                format!("daemon stopping ({exit}); resumes at next start"),
                &finish,
            ),
            // Stopped to run again later: preempted, or its GPU gone.
            (Some(stop @ (StopKind::Preempt { .. } | StopKind::Requeue { .. })), _) => {
                let (stopped, after) = match stop {
                    StopKind::Preempt { for_job } => {
                        (format!("preempted for job {for_job}"), " after preemption")
                    }
                    StopKind::Requeue { why } => (format!("stopped: {why}"), ""),
                    _ => unreachable!("matched above"),
                };
                self.apply(
                    id,
                    Some(JobState::Interrupted),
                    format!("{stopped} ({exit})"),
                    &finish,
                )
                .and_then(|_| {
                    // A command job's program keeps its own state, if any: jobd only runs it
                    // again.
                    let again = if self.jobs[&id].kind == JobKind::Train {
                        "resumes from its last checkpoint"
                    } else {
                        "its command runs again"
                    };
                    self.requeue_now(id, format!("requeued{after}; {again}"))
                })
            }
            (None, Some(0)) if self.jobs[&id].spec.publish.is_some() => {
                let job = &self.jobs[&id];
                let spec = job
                    .spec
                    .publish
                    .clone()
                    .unwrap_or_else(|| crate::spec::publish::PublishSpec::named(&job.name));
                // Another user's job may have taken the name while this one trained.
                let taken =
                    self.check_model_name(&spec, &job.owner.user, self.is_admin(&job.owner.user));
                if let Err(e) = taken {
                    self.apply(
                        id,
                        Some(JobState::Failed),
                        format!("publishing failed: {e}"),
                        &|r| {
                            finish(r);
                            r.finished_at = Some(now);
                        },
                    )
                } else {
                    let r = self.apply(
                        id,
                        Some(JobState::Publishing),
                        "training finished; publishing the model to Ollama".into(),
                        &finish,
                    );
                    if r.is_ok() {
                        self.start_publish(id, spec, None);
                    }
                    r
                }
            }
            (None, Some(0)) => self.apply(
                id,
                Some(JobState::Succeeded),
                "finished (exit code 0)".into(),
                &|r| {
                    finish(r);
                    r.finished_at = Some(now);
                },
            ),
            // 75 that jobd did not ask for: a SIGTERM from someone else (an admin, the system
            // shutting down), or a program that returns EX_TEMPFAIL. Requeued like a
            // preemption, but the second time after the retry backoff and never more than
            // MAX_UNREQUESTED_REQUEUES times, so that it cannot spin.
            // A job whose retry policy names 75 itself gets its retries instead.
            (None, Some(EXIT_PREEMPTED))
                if self_requeues && unrequested >= MAX_UNREQUESTED_REQUEUES =>
            {
                self.apply(
                    id,
                    Some(JobState::Failed),
                    format!(
                        "failed: exit code {EXIT_PREEMPTED} (\"checkpointed, run me again\") \
                     {} times without being asked to stop; see its log",
                        unrequested + 1
                    ),
                    &|r| {
                        finish(r);
                        r.finished_at = Some(now);
                    },
                )
            }
            (None, Some(EXIT_PREEMPTED)) if self_requeues => {
                let n = unrequested + 1;
                let delay = if n == 1 {
                    Duration::ZERO
                } else {
                    retry.delay_for(n - 1)
                };
                let until = now + delay.as_millis() as Millis;
                let when = if delay.is_zero() {
                    String::new()
                } else {
                    format!(" in {}", humantime::format_duration(delay))
                };
                self.apply(
                    id,
                    Some(JobState::Interrupted),
                    format!(
                        "exited with code {EXIT_PREEMPTED} (checkpointed, run me again) \
                         without being asked to stop"
                    ),
                    &finish,
                )
                .and_then(|_| {
                    self.apply(
                        id,
                        Some(JobState::Queued),
                        format!(
                            "requeued{when} ({n} of {MAX_UNREQUESTED_REQUEUES} such exits); \
                             resumes from its last checkpoint if it has one"
                        ),
                        &|r| {
                            r.unrequested_requeues = n;
                            r.not_before = (!delay.is_zero()).then_some(until);
                            r.queued_at = now;
                        },
                    )
                })
            }
            (None, code) if retries < retry.max && retry.retries_on(code, exit.signal) => {
                self.retry_later(id, &failure, &retry, retries + 1, now, &finish)
            }
            (None, _) => self.apply(
                id,
                Some(JobState::Failed),
                format!("failed: {failure}"),
                &|r| {
                    finish(r);
                    r.finished_at = Some(now);
                },
            ),
        };
        if let Err(e) = result {
            error!(job_id = id, error = %e, "cannot record a job's exit");
        }
    }

    /// Puts a job whose run failed (`why`) back in the queue for its retry `n`, after the
    /// retry policy's backoff; `finish` records the run's end.
    fn retry_later(
        &mut self,
        id: JobId,
        why: &str,
        retry: &crate::spec::job::RetrySpec,
        n: u32,
        now: Millis,
        finish: &dyn Fn(&mut JobRecord),
    ) -> Result<JobRecord, StoreError> {
        let delay = retry.delay_for(n);
        let until = now + delay.as_millis() as Millis;
        self.apply(
            id,
            Some(JobState::Queued),
            format!(
                "{why}; retry {n} of {} in {}",
                retry.max,
                humantime::format_duration(delay)
            ),
            &|r| {
                finish(r);
                r.retries = n;
                r.not_before = Some(until);
                r.queued_at = now;
            },
        )
    }

    /// Checks that a `[publish]` target may be written for `owner`: a root daemon writes only
    /// into its configured Ollama directory or a directory the job's owner owns.
    fn check_models_dir(
        &self,
        dir: Option<&std::path::Path>,
        owner: &Owner,
    ) -> Result<(), SchedError> {
        use std::os::unix::fs::MetadataExt;
        let default = self.settings.ollama_models.as_deref();
        let Some(dir) = dir.or(default) else {
            return Err(SchedError::Invalid(
                "publish.models_dir: not set, and the daemon has no Ollama models directory \
                 (found none; its admin sets one with ollama_models in its config or jobd \
                 --ollama-models DIR). Set publish.models_dir to a directory of yours, or \
                 leave out [publish] to train without publishing (jobctl publish can do it \
                 later)"
                    .into(),
            ));
        };
        // A publish into a directory that is not there would fail only after the training.
        if !dir.is_dir() {
            let what = if dir.exists() {
                "is not a directory"
            } else {
                "does not exist"
            };
            return Err(SchedError::Invalid(format!(
                "publish: the Ollama models directory {} {what} (create it, or set \
                 publish.models_dir or jobd --ollama-models)",
                dir.display()
            )));
        }
        if !self.settings.run_as_owner || Some(dir) == default {
            return Ok(());
        }
        match std::fs::metadata(dir) {
            Ok(m) if m.uid() == owner.uid => Ok(()),
            Ok(_) => Err(SchedError::Forbidden(format!(
                "publish.models_dir {} is neither the daemon's Ollama directory nor owned by {}",
                dir.display(),
                owner.user
            ))),
            Err(e) => Err(SchedError::Invalid(format!(
                "publish.models_dir {}: {e}",
                dir.display()
            ))),
        }
    }

    /// In the daemon's own Ollama directory, which everyone's jobs share, a model name is its
    /// publisher's: a user may replace a model there only if jobd's latest publish of that
    /// name was one of their jobs (recorded in the store when it happens), and a model jobd
    /// did not publish (`ollama pull`, `ollama create`) only an admin may replace — otherwise
    /// anyone could put their weights behind a name others run. A directory a user names is
    /// theirs to manage. Checked at submit, by hand, and again before publishing after
    /// training (the name may have been taken meanwhile).
    pub(super) fn check_model_name(
        &self,
        spec: &crate::spec::publish::PublishSpec,
        publisher: &str,
        admin: bool,
    ) -> Result<(), SchedError> {
        use crate::spec::publish::ModelName;
        let Some(shared) = self.settings.ollama_models.as_deref() else {
            return Ok(());
        };
        let dir = spec.models_dir.as_deref().unwrap_or(shared);
        if admin || dir != shared {
            return Ok(());
        }
        // An invalid name is refused with its own reason elsewhere.
        let Ok(name) = ModelName::parse(&spec.ollama_name) else {
            return Ok(());
        };
        // Being published right now by someone else's job: theirs from now on.
        if let Some(j) = self
            .publishing_names
            .get(&name.to_string())
            .and_then(|id| self.jobs.get(id))
            && j.owner.user != publisher
        {
            return Err(SchedError::Forbidden(format!(
                "publish.ollama_name: {} is being published by {} (job {}) into the shared \
                 Ollama directory; choose another name",
                name.display_shortest(),
                j.owner.user,
                j.id
            )));
        }
        // The key is the configured directory, however the job file spells it.
        let taken_by = match self.store.model_owner(shared, &name.to_string())? {
            Some(o) if o.user == publisher => return Ok(()),
            Some(o) => format!("{} (job {})", o.user, o.job),
            None if dir.join("manifests").join(name.manifest_relpath()).exists() => {
                "someone outside jobd (ollama pull or create)".to_string()
            }
            None => return Ok(()),
        };
        Err(SchedError::Forbidden(format!(
            "publish.ollama_name: {} in the shared Ollama directory {} was published by \
             {taken_by}; only they or an admin may replace it (choose another name, e.g. \
             {publisher}/{}:{})",
            name.display_shortest(),
            dir.display(),
            name.model,
            name.tag
        )))
    }

    /// Whether `user` is one of the daemon's admins (root always is).
    fn is_admin(&self, user: &str) -> bool {
        user == "root" || self.settings.admins.contains(user)
    }

    /// Records who owns the name a model was just published as, in the shared directory.
    fn record_model_owner(&self, id: JobId, m: &PublishedModel) {
        let Ok(name) = crate::spec::publish::ModelName::parse(&m.name) else {
            return;
        };
        let Some(job) = self.jobs.get(&id) else {
            return;
        };
        let owner = crate::store::ModelOwner {
            user: job.owner.user.clone(),
            job: id,
            at: now_ms(),
        };
        let dir = match self.settings.ollama_models.as_deref() {
            Some(shared) if m.models_dir == shared => shared,
            _ => m.models_dir.as_path(),
        };
        if let Err(e) = self.store.set_model_owner(dir, &name.to_string(), &owner) {
            error!(job_id = id, error = %e, "cannot record who published a model");
        }
    }

    /// Fills the name registry from published jobs that predate it (latest publish wins).
    fn seed_model_owners(&self) -> Result<(), StoreError> {
        let mut latest: BTreeMap<(PathBuf, String), &JobRecord> = BTreeMap::new();
        for j in self.jobs.values() {
            let Some(p) = &j.published else { continue };
            let Ok(name) = crate::spec::publish::ModelName::parse(&p.name) else {
                continue;
            };
            let dir = match self.settings.ollama_models.as_deref() {
                Some(shared) if p.models_dir == shared => shared.to_path_buf(),
                _ => p.models_dir.clone(),
            };
            let e = latest.entry((dir, name.to_string())).or_insert(j);
            if (j.finished_at, j.id) > (e.finished_at, e.id) {
                *e = j;
            }
        }
        for ((dir, name), j) in latest {
            if self.store.model_owner(&dir, &name)?.is_none() {
                let owner = crate::store::ModelOwner {
                    user: j.owner.user.clone(),
                    job: j.id,
                    at: j.finished_at.unwrap_or(j.updated_at),
                };
                self.store.set_model_owner(&dir, &name, &owner)?;
            }
        }
        Ok(())
    }

    /// Publishes a job's model on a blocking thread; the result comes back as `Msg::Published`.
    fn start_publish(
        &mut self,
        id: JobId,
        spec: crate::spec::publish::PublishSpec,
        reply: Option<Reply<JobRecord>>,
    ) {
        let Some(rec) = self.jobs.get(&id) else {
            return;
        };
        let model_dir = rec
            .dir(&self.settings.jobs_dir)
            .join(contract::files::OUTPUT);
        let default = self.settings.ollama_models.clone();
        // A root daemon reads the owner's model with the owner's file rights.
        let read_as_user = self.settings.run_as_owner.then(|| rec.owner.user.clone());
        let tx = self.tx.clone();
        self.publishing.insert(id);
        let shared = self.settings.ollama_models.as_deref();
        if shared.is_some()
            && spec.models_dir.as_deref().is_none_or(|d| Some(d) == shared)
            && let Ok(name) = crate::spec::publish::ModelName::parse(&spec.ollama_name)
        {
            self.publishing_names.insert(name.to_string(), id);
        }
        tokio::task::spawn_blocking(move || {
            // Crash tests: die while publishing, once the `publishing` record is on disk
            // (tests/it/train.rs).
            if std::env::var_os("JOBD_FAILPOINT").is_some_and(|v| v == "exit-while-publishing") {
                std::thread::sleep(Duration::from_millis(500));
                std::process::exit(86);
            }
            let result = (|| {
                let models_dir = spec
                    .models_dir
                    .clone()
                    .or(default.clone())
                    .ok_or("no Ollama models directory")?;
                let read_as = read_as_user
                    .map(|u| crate::proc::RunAs::lookup(&u).map(|r| r.credentials()))
                    .transpose()
                    .map_err(|e| e.to_string())?;
                // The daemon's own directory is written with its rights (files handed to
                // the directory's owner); one the job's owner named, with theirs.
                let owners_dir = Some(models_dir.as_path()) != default.as_deref();
                let req = crate::publish::PublishRequest {
                    model_dir: &model_dir,
                    models_dir: &models_dir,
                    spec: &spec,
                    read_as: read_as.as_ref(),
                    write_as: read_as.as_ref().filter(|_| owners_dir),
                };
                let p =
                    crate::publish::publish(&req, |step| tracing::debug!(job_id = id, "{step}"))
                        .map_err(|e| e.to_string())?;
                Ok::<_, String>(PublishedModel {
                    name: p.name,
                    run_command: p.run_command,
                    manifest_digest: p.manifest_digest,
                    gguf_bytes: p.gguf_bytes,
                    quantization: format!("{:?}", p.quantization).to_lowercase(),
                    models_dir,
                    not_exported: p.not_exported.map(str::to_string),
                })
            })();
            let _ = tx.blocking_send(Msg::Published {
                id,
                result,
                by_hand: reply,
            });
        });
    }

    fn published(
        &mut self,
        id: JobId,
        result: Result<PublishedModel, String>,
        by_hand: bool,
    ) -> Result<JobRecord, SchedError> {
        self.publishing.remove(&id);
        self.publishing_names.retain(|_, j| *j != id);
        let now = now_ms();
        let r = match (result, by_hand) {
            (Ok(m), false) => {
                info!(job_id = id, model = %m.name, "published");
                self.record_model_owner(id, &m);
                let reason = format!("published as {} — {}", m.name, m.run_command);
                self.apply(id, Some(JobState::Succeeded), reason, &|r| {
                    r.published = Some(m.clone());
                    r.finished_at = Some(now);
                })
            }
            (Ok(m), true) => {
                self.record_model_owner(id, &m);
                let reason = format!("published as {} — {}", m.name, m.run_command);
                // A job that failed only in publishing has now done all it was for.
                let to = (self.jobs.get(&id).map(|j| j.state) == Some(JobState::Failed))
                    .then_some(JobState::Succeeded);
                self.apply(id, to, reason, &|r| r.published = Some(m.clone()))
            }
            (Err(e), false) => {
                warn!(job_id = id, error = %e, "publishing failed");
                self.apply(
                    id,
                    Some(JobState::Failed),
                    format!("publishing failed: {e}"),
                    &|r| r.finished_at = Some(now),
                )
            }
            (Err(e), true) => return Err(SchedError::Conflict(format!("publishing failed: {e}"))),
        };
        Ok(r?)
    }

    #[allow(clippy::result_large_err)]
    fn publish_by_hand(
        &mut self,
        caller: &Caller,
        id: JobId,
        overrides: PublishOverrides,
        reply: Reply<JobRecord>,
    ) -> Result<(), (Reply<JobRecord>, SchedError)> {
        let rec = match self.get_for_change(caller, id) {
            Ok(r) => r.clone(),
            Err(e) => return Err((reply, e)),
        };
        // A train job whose training finished: succeeded, or failed only in publishing (its
        // worker exited 0), so that a publish that failed (a quantization the model's shape
        // does not allow, a full disk) can be done again by hand with other settings.
        let trained = rec.state == JobState::Succeeded
            || (rec.state == JobState::Failed
                && rec.exit.as_ref().is_some_and(|e| e.code == Some(0)));
        if rec.kind != JobKind::Train || !trained {
            return Err((
                reply,
                SchedError::Conflict(format!(
                    "job {id} has no finished training to publish (it is a {} job, {}); a \
                     train job can be published once its training has finished",
                    rec.kind.as_str(),
                    rec.state
                )),
            ));
        }
        if self.publishing.contains(&id) {
            return Err((
                reply,
                SchedError::Conflict(format!("job {id} is being published already")),
            ));
        }
        let mut spec = rec
            .spec
            .publish
            .clone()
            .unwrap_or_else(|| crate::spec::publish::PublishSpec::named(""));
        if let Some(n) = overrides.name {
            spec.ollama_name = n;
        }
        if let Some(q) = overrides.quantization {
            spec.quantization = q;
        }
        if let Some(d) = overrides.models_dir {
            spec.models_dir = Some(d);
        }
        if spec.ollama_name.trim().is_empty() {
            let why = if rec.spec.publish.is_some() {
                "the model name must not be empty".to_string()
            } else {
                format!("job {id} has no [publish] section: give a name (--name)")
            };
            return Err((reply, SchedError::Invalid(why)));
        }
        let issues = crate::spec::publish::validate(&spec);
        if let Some(i) = issues.first() {
            return Err((
                reply,
                SchedError::Invalid(format!("{}: {}", i.key, i.message)),
            ));
        }
        if let Err(e) = self.check_models_dir(spec.models_dir.as_deref(), &rec.owner) {
            return Err((reply, e));
        }
        // By hand, the caller publishes: an admin may replace any name.
        if let Err(e) = self.check_model_name(&spec, &rec.owner.user, caller.admin) {
            return Err((reply, e));
        }
        self.start_publish(id, spec, Some(reply));
        Ok(())
    }

    /// Back to the queue after an interruption, keeping the job's place in line.
    fn requeue_now(&mut self, id: JobId, reason: String) -> Result<JobRecord, StoreError> {
        self.apply(id, Some(JobState::Queued), reason, &|_| {})
    }

    /// A restart in place: nothing new starts, publishes in progress finish, and the running
    /// jobs are left as they are for the next daemon to take over.
    fn begin_handover(&mut self, reply: oneshot::Sender<()>) {
        info!(
            running = self.children.len(),
            publishing = self.publishing.len(),
            "restarting in place: running jobs keep running"
        );
        self.handing_over = true;
        self.shutting_down = Some(reply);
        self.bound_notifiers();
    }

    fn begin_shutdown(&mut self, reply: oneshot::Sender<()>) {
        info!(
            running = self.children.len(),
            "shutting down: stopping workers"
        );
        let grace = self.settings.grace;
        let ids: Vec<JobId> = self.children.keys().copied().collect();
        for id in ids {
            let asking = stop_request(self.jobs.get(&id).map(|j| j.kind));
            if let Err(e) = self.apply(
                id,
                None,
                format!("daemon stopping; {asking} (grace {}s)", grace.as_secs()),
                &|r| {
                    if r.stop.is_none() {
                        r.stop = Some(StopKind::Shutdown);
                        r.stop_at = Some(now_ms());
                    }
                },
            ) {
                warn!(job_id = id, error = %e, "cannot record shutdown");
            }
            if let Some(c) = self.children.get(&id) {
                c.stop(grace);
            }
        }
        self.shutting_down = Some(reply);
        self.bound_notifiers();
    }

    // ---- planning ------------------------------------------------------------------------

    fn refresh_gpus(&mut self, force: bool) {
        if !force && self.gpus_at.elapsed() < Duration::from_millis(500) {
            return;
        }
        let pgids: HashSet<i32> = self.children.values().map(|c| c.pgid()).collect();
        self.gpus = self
            .inventory
            .snapshot(&|pid| crate::gpu::pid_in_groups(pid, &pgids));
        self.gpus_at = Instant::now();
        self.warn_unmatched_allowed();
    }

    /// Warns when `allowed_gpus` names a GPU the inventory does not have (a typo, or a card
    /// that fell off the bus), once each time that set changes.
    fn warn_unmatched_allowed(&mut self) {
        let unmatched = plan::unmatched_selectors(&self.settings.policy, &self.gpus.gpus);
        if unmatched != self.unmatched_allowed {
            if !unmatched.is_empty() {
                warn!(
                    allowed_gpus = %unmatched.join(", "),
                    gpus = self.gpus.gpus.len(),
                    "scheduler.allowed_gpus names GPUs this machine does not have; they are ignored"
                );
            }
            self.unmatched_allowed = unmatched;
        }
    }

    /// Runs `plan` and applies its decisions until nothing more changes.
    fn replan(&mut self) {
        // A job failed for its dependency fails the jobs that depend on it in turn: plan
        // again until no more fail (each round fails at least one more job, so this ends).
        while self.replan_once() {}
    }

    /// One planning round; true if it failed jobs whose dependencies failed.
    fn replan_once(&mut self) -> bool {
        let needs_gpus = self
            .jobs
            .values()
            .any(|j| j.state == JobState::Queued && j.spec.resources.gpus > 0);
        self.refresh_gpus(!needs_gpus);
        let now = now_ms();
        let usage = self.usage.snapshot(
            now,
            self.jobs.values().filter(|j| j.state.holds_resources()),
        );
        let decisions = {
            let queued: Vec<&JobRecord> = self
                .jobs
                .values()
                .filter(|j| j.state == JobState::Queued)
                .collect();
            let active: Vec<&JobRecord> = self
                .jobs
                .values()
                .filter(|j| j.state.holds_resources())
                .collect();
            let jobs = &self.jobs;
            let state_of = |id: JobId| jobs.get(&id).map(|j| j.state);
            plan::plan(&plan::PlanInput {
                now,
                queued,
                active,
                state_of: &state_of,
                gpus: &self.gpus.gpus,
                cfg: &self.settings.policy,
                max_cpu_jobs: self.settings.max_cpu_jobs,
                usage: &usage,
            })
        };
        let mut failed_some = false;
        for (id, reason) in decisions.fail {
            match self.apply(id, Some(JobState::Failed), reason, &|r| {
                r.finished_at = Some(now_ms())
            }) {
                Ok(_) => failed_some = true,
                Err(e) => error!(job_id = id, error = %e, "cannot fail job"),
            }
        }
        self.waiting = decisions.waiting;
        if self.disk_full {
            // Nothing starts (and nothing is preempted for a start) while the state file
            // system is full: a job would fail at once writing its job directory.
            for start in decisions.start {
                self.waiting.insert(
                    start.id,
                    plan::Waiting {
                        wait: Wait::DiskFull,
                        ahead: 0,
                    },
                );
            }
            return failed_some;
        }
        for p in decisions.preempt {
            self.preempt(p.victim, p.for_job);
        }
        for start in decisions.start {
            self.dispatch(start.id, start.placement);
        }
        failed_some
    }

    fn preempt(&mut self, victim: JobId, for_job: JobId) {
        let grace = self.settings.grace;
        let stop = StopKind::Preempt { for_job };
        let asking = stop_request(self.jobs.get(&victim).map(|j| j.kind));
        let reason = format!(
            "preempting for higher-priority job {for_job}: {asking} (grace {}s)",
            grace.as_secs()
        );
        match self.apply(victim, None, reason, &|r| {
            r.stop = Some(stop.clone());
            r.stop_at = Some(now_ms());
        }) {
            Ok(_) => {
                info!(job_id = victim, for_job, "preempting");
                if let Some(c) = self.children.get(&victim) {
                    c.stop(grace);
                }
            }
            Err(e) => error!(job_id = victim, error = %e, "cannot preempt"),
        }
    }

    /// Starts a job on its placement: records it `starting`; [`Self::spawn_started`] spawns
    /// it once that is on disk.
    fn dispatch(&mut self, id: JobId, placement: Placement) {
        let where_ = describe_placement(&placement);
        let attempt = self.jobs.get(&id).map_or(1, |j| j.attempts + 1);
        let now = now_ms();
        match self.apply(
            id,
            Some(JobState::Starting),
            format!("starting on {where_} (attempt {attempt})"),
            &|r| {
                r.placement = Some(placement.clone());
                r.attempts = attempt;
                r.started_at = Some(now);
                r.exit = None;
                r.not_before = None;
            },
        ) {
            Ok(_) => self.to_spawn.push(id),
            Err(e) => error!(job_id = id, error = %e, "cannot mark job starting"),
        }
    }

    /// Spawns the jobs [`Self::dispatch`] recorded `starting` (the store has been flushed
    /// since): job directory, spawn, `running`.
    fn spawn_started(&mut self) -> bool {
        let any = !self.to_spawn.is_empty();
        for id in std::mem::take(&mut self.to_spawn) {
            match self.jobs.get(&id) {
                Some(rec) if rec.state == JobState::Starting && rec.stop.is_none() => {
                    let rec = rec.clone();
                    self.spawn(rec);
                }
                _ => {}
            }
        }
        any
    }

    fn spawn(&mut self, rec: JobRecord) {
        let id = rec.id;
        let attempt = rec.attempts;
        let where_ = rec
            .placement
            .as_ref()
            .map(describe_placement)
            .unwrap_or_else(|| "CPU".into());
        let tx = self.tx.clone();
        let spawned =
            worker_env::prepare(&rec, &self.settings, self.inventory.is_fake()).and_then(|req| {
                proc::spawn(req, move |exit| send_exit(&tx, id, attempt, exit))
                    .map_err(|e| e.to_string())
            });
        match spawned {
            Ok((info, handle)) => {
                // Crash tests: die where a crash is worst, the job started but not yet
                // recorded `running` (tests/it/durability.rs).
                if std::env::var_os("JOBD_FAILPOINT").is_some_and(|v| v == "exit-after-spawn") {
                    std::process::exit(86);
                }
                let pid = info.pid;
                self.children.insert(id, handle);
                if let Err(e) = self.apply(
                    id,
                    Some(JobState::Running),
                    format!("running (pid {pid})"),
                    &|r| {
                        r.process = Some(info.clone());
                    },
                ) {
                    error!(job_id = id, error = %e, "cannot mark job running");
                }
                info!(job_id = id, pid, placement = %where_, "job started");
            }
            Err(why) => {
                // Not the job's fault: jobd's own executable (the worker, a command's
                // supervisor) was replaced or removed under the running daemon.
                let exe = worker_env::jobd_exe(&self.settings);
                let why = if exe.exists() {
                    why
                } else {
                    format!(
                        "jobd's own executable {} is gone (upgraded or removed while jobd \
                         runs: `systemctl reload jobd`, or SIGHUP, restarts it from the file \
                         at its path)",
                        exe.display()
                    )
                };
                warn!(job_id = id, error = %why, "cannot start job");
                if let Err(e) = self.apply(
                    id,
                    Some(JobState::Failed),
                    format!("cannot start: {why}"),
                    &|r| {
                        r.finished_at = Some(now_ms());
                    },
                ) {
                    error!(job_id = id, error = %e, "cannot mark job failed");
                }
            }
        }
    }

    /// Swaps in a new [`View`] and publishes the batch's changes.
    fn publish_view(&mut self) {
        let old = self.shared.view.read().expect("view lock").clone();
        let mut jobs = old.jobs.clone();
        for id in std::mem::take(&mut self.removed) {
            jobs.remove(&id);
        }
        let changed: Vec<JobId> = self.pending.iter().map(|c| c.job.record.id).collect();
        for id in &changed {
            if let Some(r) = self.jobs.get(id) {
                jobs.insert(*id, Arc::new(r.clone()));
            }
        }
        if old.jobs.is_empty() && !self.jobs.is_empty() {
            jobs = self
                .jobs
                .iter()
                .map(|(k, v)| (*k, Arc::new(v.clone())))
                .collect();
        }
        let schedules = if std::mem::take(&mut self.schedules_changed) {
            Arc::new(self.schedules.clone())
        } else {
            old.schedules.clone()
        };
        let mut view = View {
            jobs,
            schedules,
            waiting: self.waiting.clone(),
            gpus: Some(self.gpus.clone()),
            now: now_ms(),
            active: Vec::new(),
            counts: Vec::new(),
        };
        view.derive();
        *self.shared.view.write().expect("view lock") = Arc::new(view);
        for mut change in self.pending.drain(..) {
            change.job.waiting = self
                .waiting
                .get(&change.job.record.id)
                .map(|w| w.wait.short());
            let _ = self.shared.changes.send(change);
        }
        self.shared.revision.send_modify(|r| *r += 1);
    }
}

/// Asks the scheduler to stop every worker (they checkpoint) and waits until it has.
pub async fn shutdown(handle: &SchedHandle) {
    stop(handle, false).await;
}

/// Before a restart in place: asks the scheduler to start nothing more (requests are still
/// answered) and waits until no model is being published.
pub async fn drain(handle: &SchedHandle) {
    let (tx, rx) = oneshot::channel();
    if handle.tx.send(Msg::Drain { reply: tx }).await.is_ok() {
        let _ = rx.await;
    }
}

/// For a restart in place, after [`drain`] and once requests are no longer served: asks the
/// scheduler to finish the publishes in progress, leaving running jobs running, and waits
/// until it has (its queue flushed to disk).
pub async fn hand_over(handle: &SchedHandle) {
    stop(handle, true).await;
}

async fn stop(handle: &SchedHandle, keep_jobs: bool) {
    let (tx, rx) = oneshot::channel();
    if handle
        .tx
        .send(Msg::Shutdown {
            reply: tx,
            keep_jobs,
        })
        .await
        .is_ok()
    {
        let _ = rx.await;
    }
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

/// "is running", "has succeeded", "was cancelled": a state in a sentence about a job.
fn state_phrase(s: JobState) -> String {
    match s {
        JobState::Succeeded | JobState::Failed => format!("has {s}"),
        JobState::Cancelled | JobState::Interrupted => format!("was {s}"),
        _ => format!("is {s}"),
    }
}

fn finished_word(s: JobState) -> &'static str {
    match s {
        JobState::Succeeded => "succeeded",
        JobState::Failed => "failed",
        JobState::Cancelled => "been cancelled",
        _ => "finished",
    }
}

/// "GPU 0, 1 (10GiB each)", "CPU".
pub fn describe_placement(p: &Placement) -> String {
    if p.gpus.is_empty() {
        return "CPU".into();
    }
    let ids: Vec<String> = p.gpus.iter().map(|g| g.index.to_string()).collect();
    let amount = crate::spec::units::ByteSize(p.vram_per_gpu);
    if p.exclusive {
        format!(
            "GPU {} (whole card{})",
            ids.join(", "),
            if ids.len() > 1 { "s" } else { "" }
        )
    } else if ids.len() > 1 {
        format!("GPU {} ({amount} each)", ids.join(", "))
    } else {
        format!("GPU {} ({amount})", ids[0])
    }
}

/// What a job runs as, for messages.
fn what_runs(kind: JobKind) -> &'static str {
    match kind {
        JobKind::Command => "command",
        JobKind::Train => "worker",
    }
}

/// What a stop asks of a job's process, for its history.
fn stop_request(kind: Option<JobKind>) -> &'static str {
    match kind {
        Some(JobKind::Train) => "asking the worker to checkpoint and exit",
        _ => "sending its command SIGTERM",
    }
}

/// Tells the scheduler that attempt `attempt` of job `id` has ended, from the task that
/// supervised it.
fn send_exit(tx: &mpsc::Sender<Msg>, id: JobId, attempt: u32, exit: ExitInfo) {
    // The scheduler may be gone during shutdown; nothing to record then.
    let _ = tx
        .try_send(Msg::Exited { id, attempt, exit })
        .or_else(|e| match e {
            mpsc::error::TrySendError::Full(m) => {
                let tx = tx.clone();
                tokio::spawn(async move {
                    let _ = tx.send(m).await;
                });
                Ok(())
            }
            mpsc::error::TrySendError::Closed(_) => Err(()),
        });
}

/// When a job last showed a sign of life: the newest change to its output, progress or
/// metrics (Unix ms). Links are not followed: one the owner put there says nothing of the job.
pub(crate) fn last_sign_of_life(job_dir: &std::path::Path) -> Option<Millis> {
    [
        contract::files::STDOUT,
        contract::files::STDERR,
        contract::files::PROGRESS,
        contract::files::METRICS,
    ]
    .iter()
    .filter_map(|f| {
        std::fs::symlink_metadata(job_dir.join(f))
            .ok()?
            .modified()
            .ok()
    })
    .filter_map(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
    .map(|d| d.as_millis() as Millis)
    .max()
}

/// What the train worker of `attempt` said went wrong, if it said (shortened for a reason
/// line; the whole message is in the job's log).
fn read_worker_error(job_dir: &std::path::Path, attempt: u32) -> Option<String> {
    const MAX_CHARS: usize = 600;
    let bytes = crate::jobfs::read_regular(
        &job_dir.join(contract::files::WORKER_ERROR),
        contract::files::MAX_STATUS_BYTES,
    )
    .ok()?;
    let e: contract::WorkerError = serde_json::from_slice(&bytes).ok()?;
    if e.attempt != attempt {
        return None;
    }
    let message = e.message.trim();
    Some(if message.chars().count() > MAX_CHARS {
        let cut: String = message.chars().take(MAX_CHARS).collect();
        format!("{cut}… (see its log)")
    } else {
        message.to_string()
    })
}

/// The progress a train worker last reported, if any.
pub fn read_progress(job_dir: &std::path::Path) -> Option<Progress> {
    let text = crate::jobfs::read_regular(
        &job_dir.join(contract::files::PROGRESS),
        contract::files::MAX_STATUS_BYTES,
    )
    .ok()?;
    serde_json::from_slice(&text).ok()
}
