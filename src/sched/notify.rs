//! `[notify]`: running a job's notifier when it ends in a way its `on` lists.
//!
//! The end a notifier last ran for is recorded in the job (`JobRecord::notified`), so every
//! end is notified at least once and, as far as jobd can tell, once only:
//! - a notifier is spawned only after the job's end is on disk (as jobs are), runs as the
//!   job's owner with a cleared environment, and is stopped at its `timeout`;
//! - the running notifier is recorded in the job (`JobRecord::notifier`): after a daemon crash
//!   the next daemon watches it to its end (its timeout still holding), or, if it ended while
//!   jobd was down, takes the end as notified;
//! - a notifier still running when jobd stops or restarts in place gets the grace period,
//!   then SIGTERM (SIGKILL 5 s later), and the next daemon runs it again;
//! - an end due when jobd stops is notified by the next daemon.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};

use super::{Msg, Scheduler, worker_env};
use crate::proc::{self, ChildHandle, RunAs, SpawnRequest};
use crate::spec::contract::{self, files};
use crate::spec::notify::SweepNotify;
use crate::spec::record::{ExitInfo, JobEnd, NotifierRun};
use crate::spec::{JobId, JobRecord, JobState, now_ms};

/// Between a notifier's SIGTERM (at its timeout) and SIGKILL.
const NOTIFY_KILL_GRACE: Duration = Duration::from_secs(5);

/// Notifiers one user may have running at once (a `cancel --mine` of a thousand jobs must not
/// start a thousand processes, nor one user's hanging webhook hold up everyone's); the others
/// wait their turn.
const MAX_NOTIFIERS_PER_USER: usize = 4;
/// Notifiers running at once, for all users.
const MAX_NOTIFIERS: usize = 32;

/// Whether jobd stopped a notifier, and why (kept in a [`StopFlag`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(super) enum Stopped {
    /// It ran its course.
    No = 0,
    /// At its `timeout`.
    TimedOut = 1,
    /// jobd was stopping or restarting, and the grace period was over.
    JobdStopping = 2,
}

/// A [`Stopped`] shared by a notifier's watchers: the first reason to stop it wins.
#[derive(Debug, Clone, Default)]
struct StopFlag(Arc<AtomicU8>);

impl StopFlag {
    /// Records `why`; false if it was stopped already (for another reason).
    fn set(&self, why: Stopped) -> bool {
        self.0
            .compare_exchange(
                Stopped::No as u8,
                why as u8,
                Ordering::SeqCst,
                Ordering::SeqCst,
            )
            .is_ok()
    }

    fn get(&self) -> Stopped {
        match self.0.load(Ordering::SeqCst) {
            1 => Stopped::TimedOut,
            2 => Stopped::JobdStopping,
            _ => Stopped::No,
        }
    }
}

/// A notifier that runs.
pub(super) struct Notifier {
    handle: ChildHandle,
    owner: String,
    stopped: StopFlag,
}

/// How a notifier ended.
#[derive(Debug)]
pub(super) struct NotifyOutcome {
    /// `None`: it was started by an earlier daemon (not our child), its status unknown.
    pub exit: Option<ExitInfo>,
    pub stopped: Stopped,
}

/// Every job jobd knows, one by one: how [`due`] finds a sweep's other jobs in the
/// scheduler's map and in a published `View` alike.
pub type EachJob<'a> = &'a dyn Fn(&mut dyn FnMut(&JobRecord));

/// The end of `rec` still to be notified, if any: it ended in a state its `[notify] on`
/// lists, and its notifier has not run for that end. A job of a sweep notifying `once` is due
/// only as the sweep's designated job ([`SweepEnds::last`]: every job ended, this one last)
/// and if any of them ended as `on` lists: a pure function of the records, so a daemon after
/// a crash finds the same one.
pub(super) fn due(rec: &JobRecord, each_job: EachJob<'_>) -> Option<JobEnd> {
    let notify = rec.spec.notify.as_ref()?;
    let end = rec.end()?;
    if rec.notified == Some(end) {
        return None;
    }
    let Some(sweep) = once_sweep(rec) else {
        return notify.wants(end.state).then_some(end);
    };
    let ends = SweepEnds::of(sweep, each_job);
    (ends.last == Some(rec.id) && ends.states.iter().any(|s| notify.wants(*s))).then_some(end)
}

/// The sweep whose end `rec` tells of, if its `[notify]` runs once for its sweep.
pub(super) fn once_sweep(rec: &JobRecord) -> Option<JobId> {
    let notify = rec.spec.notify.as_ref()?;
    let sweep = rec.sweep.as_ref()?;
    (notify.sweep == SweepNotify::Once).then_some(sweep.id)
}

/// How a sweep stands for its notification: the newest run of each of its jobs (a resubmitted
/// job stands for the run it repeats), their states, and the job that ended last once all
/// have ended.
#[derive(Debug, Default)]
pub(super) struct SweepEnds {
    /// The state of each job's newest run.
    pub states: Vec<JobState>,
    /// The newest run that ended last (latest end, then highest id), once every one has ended.
    pub last: Option<JobId>,
}

impl SweepEnds {
    pub fn of(sweep_id: JobId, each_job: EachJob<'_>) -> SweepEnds {
        // index → (id, state, end) of its newest run
        let mut runs: std::collections::BTreeMap<u32, (JobId, JobState, Option<JobEnd>)> =
            std::collections::BTreeMap::new();
        each_job(&mut |r| {
            let Some(s) = r.sweep.as_ref().filter(|s| s.id == sweep_id) else {
                return;
            };
            let run = (r.id, r.state, r.end());
            runs.entry(s.index)
                .and_modify(|held| {
                    if r.id > held.0 {
                        *held = run;
                    }
                })
                .or_insert(run);
        });
        let all_ended = runs.values().all(|(_, _, end)| end.is_some());
        let last = all_ended
            .then(|| {
                runs.values()
                    .filter_map(|(id, _, end)| Some((end.as_ref()?.finished_at, *id)))
                    .max()
                    .map(|(_, id)| id)
            })
            .flatten();
        SweepEnds {
            states: runs.values().map(|(_, state, _)| *state).collect(),
            last,
        }
    }

    /// (succeeded, failed, cancelled), for the notifier.
    fn counts(&self) -> (u32, u32, u32) {
        let n = |want: JobState| self.states.iter().filter(|s| **s == want).count() as u32;
        (
            n(JobState::Succeeded),
            n(JobState::Failed),
            n(JobState::Cancelled),
        )
    }
}

/// Whether job `rec`'s `[notify]` command has yet to run or to end for its last end.
pub fn notification_pending(rec: &JobRecord, each_job: EachJob<'_>) -> bool {
    rec.notifier.is_some() || due(rec, each_job).is_some()
}

impl Scheduler {
    /// [`due`], with the jobs the scheduler knows.
    pub(super) fn due(&self, rec: &JobRecord) -> Option<JobEnd> {
        due(rec, &|f| self.jobs.values().for_each(f))
    }

    /// Queues `rec`'s notifier if an end of it is due and none runs for it now; it starts
    /// after the batch is flushed ([`Self::start_notifications`]).
    /// (`rec` is in `self.jobs` as it is now.) For a job of a sweep notifying once, it is the
    /// sweep's designated job that may have become due: the jobs' ends may be recorded in
    /// another order than their times say (two in the same millisecond).
    pub(super) fn queue_notification(&mut self, rec: &JobRecord) {
        // Only an end can complete a sweep.
        let designated = once_sweep(rec)
            .filter(|_| rec.end().is_some())
            .and_then(|s| SweepEnds::of(s, &|f| self.jobs.values().for_each(f)).last)
            .filter(|id| *id != rec.id);
        for id in std::iter::once(rec.id).chain(designated) {
            let is_due = self.jobs.get(&id).is_some_and(|r| self.due(r).is_some());
            if is_due && !self.notifying.contains_key(&id) && !self.to_notify.contains(&id) {
                self.to_notify.push(id);
            }
        }
    }

    /// Whether sweep `sweep_id`'s notification (once for the sweep) is still to come or under
    /// way: its jobs are all needed for it, their ends being counted.
    pub(super) fn sweep_notification_pending(&self, sweep_id: JobId) -> bool {
        let ends = SweepEnds::of(sweep_id, &|f| self.jobs.values().for_each(f));
        match ends.last {
            None => true,
            Some(id) => {
                self.notifying.contains_key(&id)
                    || self.jobs.get(&id).is_some_and(|r| self.due(r).is_some())
            }
        }
    }

    /// A stop or restart was asked for: the daemon's token, or a stop signal that arrived
    /// (counted at once, before the task that cancels the token has read it).
    fn stop_asked(&self) -> bool {
        self.settings.stop_asked.is_cancelled() || proc::stop_signals() > 0
    }

    /// Whether a queued notifier may start now (the loop then runs a round at once).
    pub(super) fn notifier_may_start(&self) -> bool {
        if self.draining || self.shutting_down.is_some() || self.stop_asked() {
            return false;
        }
        self.to_notify.iter().any(|id| {
            self.jobs
                .get(id)
                .is_some_and(|rec| self.has_room_for(&rec.owner.user))
        })
    }

    /// Whether a notifier of `user`'s may start: under both caps.
    fn has_room_for(&self, user: &str) -> bool {
        let theirs = self.notifying.values().filter(|n| n.owner == user).count();
        self.notifying.len() < MAX_NOTIFIERS && theirs < MAX_NOTIFIERS_PER_USER
    }

    /// Starts the notifiers queued (the ends they tell of are on disk now), as many as may
    /// run at once; the others stay queued. Nothing starts while jobd stops or restarts: the
    /// next daemon notifies those ends. Whether any started (their processes are to be
    /// flushed to disk, for a daemon after a crash to find them).
    pub(super) fn start_notifications(&mut self) -> bool {
        if self.draining || self.shutting_down.is_some() || self.stop_asked() {
            return false;
        }
        let mut started = false;
        for id in std::mem::take(&mut self.to_notify) {
            let Some(rec) = self.jobs.get(&id) else {
                continue; // removed (`clean`) meanwhile
            };
            let Some(end) = self.due(rec) else { continue };
            if self.notifying.contains_key(&id) {
                continue;
            }
            // Asked again before each: starting one takes a moment, and a stop may come.
            if self.stop_asked() {
                self.to_notify.push(id);
                continue;
            }
            if !self.has_room_for(&rec.owner.user) {
                self.to_notify.push(id);
                continue;
            }
            let rec = rec.clone();
            started = true;
            if let Err(why) = self.spawn_notifier(&rec, end) {
                warn!(job_id = id, error = %why, "cannot start the job's notifier");
                self.notified_note(
                    id,
                    Some(end),
                    format!("notification failed: cannot start {}: {why}", program(&rec)),
                );
            }
        }
        started
    }

    fn spawn_notifier(&mut self, rec: &JobRecord, end: JobEnd) -> Result<(), String> {
        let notify = rec.spec.notify.as_ref().ok_or("no [notify]")?;
        let sweep_ends =
            once_sweep(rec).map(|s| SweepEnds::of(s, &|f| self.jobs.values().for_each(f)).counts());
        let req = request(rec, end, sweep_ends, &self.settings)?;
        let id = rec.id;
        let stopped = StopFlag::default();
        let (ended_tx, ended_rx) = oneshot::channel::<()>();
        let on_exit = self.on_notifier_exit(id, end, stopped.clone(), ended_tx);
        let (info, handle) =
            proc::spawn(req, move |exit| on_exit(Some(exit))).map_err(|e| e.to_string())?;
        // Crash tests: die where a crash is worst for a notifier, started but not recorded
        // (tests/it/notify.rs).
        if std::env::var_os("JOBD_FAILPOINT").is_some_and(|v| v == "exit-after-notifier-spawn") {
            std::process::exit(86);
        }
        let started_at = now_ms();
        self.watch_timeout(&handle, &stopped, notify.timeout.0, ended_rx);
        info!(job_id = id, pid = info.pid, state = %end.state, "notifier started");
        let run = NotifierRun {
            end,
            process: info,
            started_at,
        };
        if let Err(e) = self.edit_quietly(id, &|r| r.notifier = Some(run.clone())) {
            warn!(job_id = id, error = %e, "cannot record the job's notifier");
        }
        self.notifying.insert(
            id,
            Notifier {
                handle,
                owner: rec.owner.user.clone(),
                stopped,
            },
        );
        Ok(())
    }

    /// What runs when a notifier has ended: the scheduler is told, and its timeout watch ends.
    fn on_notifier_exit(
        &self,
        id: JobId,
        end: JobEnd,
        stopped: StopFlag,
        ended: oneshot::Sender<()>,
    ) -> impl FnOnce(Option<ExitInfo>) + Send + 'static {
        let tx = self.tx.clone();
        move |exit| {
            let _ = ended.send(());
            let outcome = NotifyOutcome {
                exit,
                stopped: stopped.get(),
            };
            send_notified(&tx, id, end, outcome);
        }
    }

    /// Stops a notifier still running `left` from now: SIGTERM, SIGKILL 5 s later.
    fn watch_timeout(
        &self,
        handle: &ChildHandle,
        stopped: &StopFlag,
        left: Duration,
        ended: oneshot::Receiver<()>,
    ) {
        let (handle, stopped) = (handle.clone(), stopped.clone());
        tokio::spawn(async move {
            tokio::select! {
                () = tokio::time::sleep(left) => {
                    if stopped.set(Stopped::TimedOut) {
                        handle.stop(NOTIFY_KILL_GRACE);
                    }
                }
                _ = ended => {}
            }
        });
    }

    /// A notifier has ended: its outcome goes into the job's history and the end is marked
    /// notified (a failed notifier is not run again) — unless jobd stopped it on its way out,
    /// for the next daemon to run again. An end that came meanwhile (a requeue, a publish by
    /// hand) is notified in turn.
    pub(super) fn notifier_ended(&mut self, id: JobId, end: JobEnd, outcome: NotifyOutcome) {
        self.notifying.remove(&id);
        let Some(rec) = self.jobs.get(&id) else {
            return;
        };
        let what = program(rec);
        let timeout = rec
            .spec
            .notify
            .as_ref()
            .map(|n| n.timeout.to_string())
            .unwrap_or_default();
        let log = files::NOTIFY_LOG;
        let (notified, reason) = match (outcome.stopped, &outcome.exit) {
            (Stopped::TimedOut, _) => (
                true,
                format!(
                    "notification failed: {what} still ran after its timeout ({timeout}) and was \
                     stopped (its output: {log} in the job directory)"
                ),
            ),
            (Stopped::JobdStopping, _) => (
                false,
                format!(
                    "notification stopped: jobd was stopping and {what} still ran after the grace \
                     period ({}s); the next jobd runs it again",
                    self.settings.grace.as_secs()
                ),
            ),
            (_, None) => (
                true,
                format!(
                    "notification ended: {what}, started before jobd restarted, has ended (its \
                     exit status is not known; its output: {log} in the job directory)"
                ),
            ),
            (_, Some(e)) if e.code == Some(0) => {
                (true, format!("notification sent ({what} exited 0)"))
            }
            (_, Some(e)) => (
                true,
                format!(
                    "notification failed: {what} {} (its output: {log} in the job directory)",
                    ended_how(e)
                ),
            ),
        };
        if !notified || outcome.exit.as_ref().is_some_and(|e| e.code != Some(0)) {
            warn!(job_id = id, %reason, "the job's notifier did not succeed");
        }
        self.notified_note(id, notified.then_some(end), reason);
    }

    /// Records how a notifier went (`reason`) as a note in the job's history, with `end`
    /// marked notified if given, and queues an end that is due.
    fn notified_note(&mut self, id: JobId, end: Option<JobEnd>, reason: String) {
        let edit = |r: &mut JobRecord| {
            r.notifier = None;
            if end.is_some() {
                r.notified = end;
            }
        };
        match self.add_note(id, reason, &edit) {
            Ok(rec) => self.queue_notification(&rec),
            Err(e) => warn!(job_id = id, error = %e, "cannot record the notification"),
        }
    }

    /// When jobd stops or restarts in place: each notifier may run for the grace period, then
    /// it is stopped (SIGTERM, SIGKILL 5 s later), and the next daemon runs it again.
    pub(super) fn bound_notifiers(&self) {
        if self.notifying.is_empty() {
            return;
        }
        info!(
            notifiers = self.notifying.len(),
            "waiting for job notifiers to finish (at most the grace period)"
        );
        let grace = self.settings.grace;
        for n in self.notifying.values() {
            let (handle, stopped) = (n.handle.clone(), n.stopped.clone());
            tokio::spawn(async move {
                tokio::time::sleep(grace).await;
                if stopped.set(Stopped::JobdStopping) {
                    handle.stop(NOTIFY_KILL_GRACE);
                }
            });
        }
    }

    /// At start-up, after recovery: the notifiers an earlier daemon left running (it crashed)
    /// are watched to their end, their timeout still holding; one that ended while jobd was
    /// down has notified its end. Then every end still to be notified is queued.
    pub(super) fn resume_notifications(&mut self) {
        let left: Vec<(JobId, NotifierRun)> = self
            .jobs
            .values()
            .filter_map(|r| r.notifier.clone().map(|n| (r.id, n)))
            .collect();
        for (id, run) in left {
            if !self.adopt_notifier(id, &run) {
                let what = self.jobs.get(&id).map(program).unwrap_or_default();
                self.notified_note(
                    id,
                    Some(run.end),
                    format!(
                        "notification ended while jobd was down: {what} (its exit status is not \
                         known; its output: {} in the job directory)",
                        files::NOTIFY_LOG
                    ),
                );
            }
        }
        let due: Vec<(JobId, JobEnd)> = self
            .jobs
            .values()
            .filter(|r| !self.notifying.contains_key(&r.id))
            .filter_map(|r| self.due(r).map(|end| (r.id, end)))
            .collect();
        // One started just before a crash, before its process was on disk, runs still: it is
        // the job's owner's (or jobd's), leads its group, and tells of this very end.
        let found = if due.is_empty() {
            Vec::new()
        } else {
            proc::running_notifiers()
        };
        let daemon_uid = nix::unistd::geteuid().as_raw();
        for (id, end) in due {
            let Some(rec) = self.jobs.get(&id) else {
                continue;
            };
            let dir = rec.dir(&self.settings.jobs_dir);
            let running = found.iter().find(|f| {
                f.job_dir == dir
                    && f.state == end.state.as_str()
                    && (f.uid == rec.owner.uid || f.uid == daemon_uid)
            });
            if let Some(f) = running {
                let run = NotifierRun {
                    end,
                    process: f.process.clone(),
                    started_at: now_ms(),
                };
                if self.adopt_notifier(id, &run) {
                    if let Err(e) = self.edit_quietly(id, &|r| r.notifier = Some(run.clone())) {
                        warn!(job_id = id, error = %e, "cannot record the job's notifier");
                    }
                    continue;
                }
            }
            if !self.to_notify.contains(&id) {
                self.to_notify.push(id);
            }
        }
    }

    /// Watches a notifier an earlier daemon started, if it still runs.
    fn adopt_notifier(&mut self, id: JobId, run: &NotifierRun) -> bool {
        let Some(rec) = self.jobs.get(&id) else {
            return false;
        };
        let timeout = rec
            .spec
            .notify
            .as_ref()
            .map_or(Duration::ZERO, |n| n.timeout.0);
        let owner = rec.owner.user.clone();
        let stopped = StopFlag::default();
        let (ended_tx, ended_rx) = oneshot::channel::<()>();
        let on_exit = self.on_notifier_exit(id, run.end, stopped.clone(), ended_tx);
        // Its exit status is ours to read only after a restart in place (then it is our child).
        let Some(handle) = proc::adopt(&run.process, None, rec.owner.uid, on_exit) else {
            return false;
        };
        let ran = Duration::from_millis((now_ms() - run.started_at).max(0) as u64);
        self.watch_timeout(&handle, &stopped, timeout.saturating_sub(ran), ended_rx);
        info!(
            job_id = id,
            pid = run.process.pid,
            "took over a running notifier"
        );
        self.notifying.insert(
            id,
            Notifier {
                handle,
                owner,
                stopped,
            },
        );
        true
    }
}

/// "exited with code 7", "was killed by SIGKILL", for a history line.
fn ended_how(exit: &ExitInfo) -> String {
    match (exit.code, exit.signal) {
        (Some(c), _) => format!("exited with code {c}"),
        (None, Some(_)) => format!("was {exit}"),
        (None, None) => format!("{exit}"),
    }
}

/// The notifier's program as its history names it.
fn program(rec: &JobRecord) -> String {
    let name = rec
        .spec
        .notify
        .as_ref()
        .and_then(|n| n.argv.first())
        .map(String::as_str)
        .unwrap_or("?");
    format!("`{name}`")
}

/// The notifier's process: as the job's owner, in the job's directory (created for a job
/// that never started), output appended to `notify.log` after a header line.
fn request(
    rec: &JobRecord,
    end: JobEnd,
    sweep_ends: Option<(u32, u32, u32)>,
    settings: &super::SchedSettings,
) -> Result<SpawnRequest, String> {
    let notify = rec.spec.notify.as_ref().ok_or("no [notify]")?;
    let run_as = if settings.run_as_owner {
        Some(RunAs::lookup(&rec.owner.user).map_err(|e| e.to_string())?)
    } else {
        None
    };
    let owner = run_as.as_ref().map(|r| (r.uid, r.gid));
    let dir = rec.dir(&settings.jobs_dir);
    crate::jobfs::ensure_dir(&dir, 0o750, owner).map_err(|e| e.to_string())?;
    let log = dir.join(files::NOTIFY_LOG);
    {
        use std::io::Write;
        let mut f = crate::jobfs::open_append(&log, owner).map_err(|e| e.to_string())?;
        let when = chrono::DateTime::from_timestamp_millis(end.finished_at)
            .map(|t| t.format("%Y-%m-%dT%H:%M:%SZ").to_string())
            .unwrap_or_default();
        let _ = writeln!(f, "--- job {} {} at {when}", rec.id, end.state);
    }
    let (user, home) = match &run_as {
        Some(r) => (r.user.clone(), r.home.display().to_string()),
        None => worker_env::daemon_user(),
    };
    let mut env: Vec<(String, String)> = vec![
        ("HOME".into(), home),
        ("USER".into(), user.clone()),
        ("LOGNAME".into(), user),
        ("LANG".into(), "C.UTF-8".into()),
        ("PATH".into(), contract::DEFAULT_PATH.into()),
        (contract::ENV_JOB_ID.into(), rec.id.to_string()),
        (contract::ENV_JOB_NAME.into(), without_nul(&rec.name)),
        (contract::ENV_JOB_KIND.into(), rec.kind.as_str().into()),
        (contract::ENV_JOB_STATE.into(), end.state.as_str().into()),
        (
            contract::ENV_JOB_REASON.into(),
            without_nul(rec.reason.as_deref().unwrap_or_default()),
        ),
        (contract::ENV_JOB_DIR.into(), dir.display().to_string()),
        (contract::ENV_ATTEMPT.into(), rec.attempts.to_string()),
    ];
    if let Some(exit) = &rec.exit
        && let Some(code) = exit.code.or(exit.signal.map(|s| 128 + s))
    {
        env.push((contract::ENV_EXIT_CODE.into(), code.to_string()));
    }
    if let Some(model) = &rec.published {
        env.push((contract::ENV_MODEL.into(), without_nul(&model.name)));
    }
    env.extend(worker_env::sweep_env(rec));
    // Told once for a whole sweep: how its jobs ended.
    if let Some((succeeded, failed, cancelled)) = sweep_ends {
        env.extend([
            (contract::ENV_SWEEP_SUCCEEDED.into(), succeeded.to_string()),
            (contract::ENV_SWEEP_FAILED.into(), failed.to_string()),
            (contract::ENV_SWEEP_CANCELLED.into(), cancelled.to_string()),
        ]);
    }
    let mut argv = notify.argv.iter().cloned();
    let program = argv.next().ok_or("[notify] argv is empty")?;
    Ok(SpawnRequest {
        program,
        args: argv.collect(),
        env,
        cwd: dir,
        stdout: log.clone(),
        stderr: log,
        run_as,
        supervised: None,
        // Its job may be running again (requeued) while it runs: what carries the job's
        // directory in its environment is not the notifier's to kill.
        kill_escaped: false,
    })
}

/// An environment value cannot hold NUL (a reason may quote what a job wrote).
fn without_nul(s: &str) -> String {
    s.replace('\0', " ")
}

/// Tells the scheduler a notifier has ended, from the task that watched it.
fn send_notified(tx: &mpsc::Sender<Msg>, id: JobId, end: JobEnd, outcome: NotifyOutcome) {
    let msg = Msg::Notified { id, end, outcome };
    if let Err(mpsc::error::TrySendError::Full(m)) = tx.try_send(msg) {
        let tx = tx.clone();
        tokio::spawn(async move {
            let _ = tx.send(m).await;
        });
    }
}
