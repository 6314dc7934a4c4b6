//! `[notify]`: running a job's notifier when it ends in a way its `on` lists.
//!
//! The end a notifier last ran for is recorded in the job (`JobRecord::notified`), in the same
//! batch as what it did, so every end is notified at least once: one whose notifier had not
//! run or finished when jobd stopped or crashed is notified by the next daemon. A notifier is
//! spawned only after the job's end is on disk (as jobs are), runs as the job's owner with a
//! cleared environment, and is stopped at its `timeout`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};

use super::{Msg, Scheduler, worker_env};
use crate::proc::{self, ChildHandle, RunAs, SpawnRequest};
use crate::spec::contract::{self, files};
use crate::spec::record::{ExitInfo, JobEnd};
use crate::spec::{JobId, JobRecord};

/// Between a notifier's SIGTERM (at its timeout) and SIGKILL.
const NOTIFY_KILL_GRACE: Duration = Duration::from_secs(5);

/// Notifiers one user may have running at once (a `cancel --mine` of a thousand jobs must not
/// start a thousand processes, nor one user's hanging webhook hold up everyone's); the others
/// wait their turn.
const MAX_NOTIFIERS_PER_USER: usize = 4;
/// Notifiers running at once, for all users.
const MAX_NOTIFIERS: usize = 32;

/// A notifier that runs.
pub(super) struct Notifier {
    handle: ChildHandle,
    owner: String,
}

/// How a notifier ended.
#[derive(Debug)]
pub(super) struct NotifyOutcome {
    pub exit: ExitInfo,
    /// It was stopped at its timeout.
    pub timed_out: bool,
}

/// The end of `rec` still to be notified, if any: it ended in a state its `[notify] on`
/// lists, and its notifier has not run for that end.
pub(super) fn due(rec: &JobRecord) -> Option<JobEnd> {
    let notify = rec.spec.notify.as_ref()?;
    let end = rec.end()?;
    (notify.wants(end.state) && rec.notified != Some(end)).then_some(end)
}

impl Scheduler {
    /// Queues `rec`'s notifier if an end of it is due and none runs for it now; it starts
    /// after the batch is flushed ([`Self::start_notifications`]).
    pub(super) fn queue_notification(&mut self, rec: &JobRecord) {
        if due(rec).is_some()
            && !self.notifying.contains_key(&rec.id)
            && !self.to_notify.contains(&rec.id)
        {
            self.to_notify.push(rec.id);
        }
    }

    /// Starts the notifiers queued (the ends they tell of are on disk now), as many as may
    /// run at once; the others stay queued. Nothing starts while jobd stops or restarts: the
    /// next daemon notifies those ends.
    pub(super) fn start_notifications(&mut self) {
        if self.draining || self.shutting_down.is_some() {
            return;
        }
        for id in std::mem::take(&mut self.to_notify) {
            let Some(rec) = self.jobs.get(&id) else {
                continue; // removed (`clean`) meanwhile
            };
            let Some(end) = due(rec) else { continue };
            if self.notifying.contains_key(&id) {
                continue;
            }
            let users = self
                .notifying
                .values()
                .filter(|n| n.owner == rec.owner.user)
                .count();
            if self.notifying.len() >= MAX_NOTIFIERS || users >= MAX_NOTIFIERS_PER_USER {
                self.to_notify.push(id);
                continue;
            }
            let rec = rec.clone();
            if let Err(why) = self.spawn_notifier(&rec, end) {
                warn!(job_id = id, error = %why, "cannot start the job's notifier");
                self.notified_note(
                    id,
                    end,
                    format!("notification failed: cannot start {}: {why}", program(&rec)),
                );
            }
        }
    }

    fn spawn_notifier(&mut self, rec: &JobRecord, end: JobEnd) -> Result<(), String> {
        let notify = rec.spec.notify.as_ref().ok_or("no [notify]")?;
        let req = request(rec, end, &self.settings)?;
        let id = rec.id;
        let tx = self.tx.clone();
        let timed_out = Arc::new(AtomicBool::new(false));
        let (ended_tx, ended_rx) = oneshot::channel::<()>();
        let flag = timed_out.clone();
        let (info, handle) = proc::spawn(req, move |exit| {
            let _ = ended_tx.send(());
            let outcome = NotifyOutcome {
                exit,
                timed_out: flag.load(Ordering::SeqCst),
            };
            send_notified(&tx, id, end, outcome);
        })
        .map_err(|e| e.to_string())?;
        let timeout = notify.timeout.0;
        let stopper = handle.clone();
        tokio::spawn(async move {
            tokio::select! {
                () = tokio::time::sleep(timeout) => {
                    timed_out.store(true, Ordering::SeqCst);
                    stopper.stop(NOTIFY_KILL_GRACE);
                }
                _ = ended_rx => {}
            }
        });
        info!(job_id = id, pid = info.pid, state = %end.state, "notifier started");
        self.notifying.insert(
            id,
            Notifier {
                handle,
                owner: rec.owner.user.clone(),
            },
        );
        Ok(())
    }

    /// A notifier has ended: its outcome goes into the job's history and the end is marked
    /// notified (a failed notifier is not run again). An end that came meanwhile (a requeue,
    /// a publish by hand) is notified in turn.
    pub(super) fn notifier_ended(&mut self, id: JobId, end: JobEnd, outcome: NotifyOutcome) {
        self.notifying.remove(&id);
        let Some(rec) = self.jobs.get(&id) else {
            return;
        };
        let what = program(rec);
        let timeout = rec.spec.notify.as_ref().map(|n| n.timeout);
        let exit = &outcome.exit;
        let reason = match (outcome.timed_out, timeout) {
            (true, Some(t)) => format!(
                "notification failed: {what} still ran after its timeout ({t}) and was stopped \
                 (its output: {} in the job directory)",
                files::NOTIFY_LOG
            ),
            _ if exit.code == Some(0) => format!("notification sent ({what} exited 0)"),
            _ => format!(
                "notification failed: {what} ended with {exit} (its output: {} in the job \
                 directory)",
                files::NOTIFY_LOG
            ),
        };
        if exit.code != Some(0) {
            warn!(job_id = id, %exit, timed_out = outcome.timed_out, "the job's notifier failed");
        }
        self.notified_note(id, end, reason);
    }

    /// Records that `end` of job `id` was notified (`reason` says how it went), as a note in
    /// its history, and queues a newer end if one is due.
    fn notified_note(&mut self, id: JobId, end: JobEnd, reason: String) {
        match self.add_note(id, reason, &|r| r.notified = Some(end)) {
            Ok(rec) => self.queue_notification(&rec),
            Err(e) => warn!(job_id = id, error = %e, "cannot record the notification"),
        }
    }

    /// Stops waiting for notifiers when jobd stops or restarts: each may run until the grace
    /// period is over, then it is killed (its end is then recorded as notified: it ran).
    pub(super) fn bound_notifiers(&self) {
        if !self.notifying.is_empty() {
            info!(
                notifiers = self.notifying.len(),
                "waiting for job notifiers to finish (at most the grace period)"
            );
        }
        for n in self.notifying.values() {
            n.handle.kill_after(self.settings.grace);
        }
    }

    /// At start-up: every end still to be notified (jobd stopped or crashed before its
    /// notifier ran or finished).
    pub(super) fn queue_due_notifications(&mut self) {
        let due: Vec<JobId> = self
            .jobs
            .values()
            .filter(|r| due(r).is_some())
            .map(|r| r.id)
            .collect();
        for id in due {
            if !self.to_notify.contains(&id) {
                self.to_notify.push(id);
            }
        }
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
