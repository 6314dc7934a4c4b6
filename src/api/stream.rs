//! Server push for the dashboard, as server-sent events:
//! - `GET /api/v1/stream`: the live queue — the GPUs (when they change), "the queue changed"
//!   with counts by state (when jobs or their waiting reasons changed), and the progress of
//!   running train jobs;
//! - `GET /api/v1/jobs/{id}/stream`: one job's page — its view and events, its metrics as they
//!   are logged, its checkpoints and progress.
//!
//! Both wake only on pushes: a scheduler change, a new view revision, or an inotify event in a
//! job directory through the shared [`DirWatcher`] — never on a timer (keep-alive comments
//! aside, and the one-second fallback `follow` also uses when inotify is unavailable). They are
//! read-only, so anonymous callers may follow them where the daemon allows anonymous reads;
//! the caller's identity only decides what is redacted. The dashboard reads them with `fetch`
//! rather than `EventSource`, so it can send its bearer token.
//!
//! Event names and data types: [`crate::spec::api::stream`].

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Extension;
use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use tokio::sync::broadcast::error::{RecvError, TryRecvError};
use tokio::sync::{Notify, mpsc};
use tokio_stream::wrappers::ReceiverStream;

use super::follow::{DirSubscription, DirWatcher};
use super::jobs::{JobIdPath, gpus_response, job_view, state_counts};
use super::metrics::MetricsTail;
use super::{ApiError, AppState};
use crate::sched::{self, View};
use crate::spec::api::stream::{self as names, CheckpointView, ProgressUpdate, QueueChanged};
use crate::spec::contract::{Progress, files};
use crate::spec::{Caller, JobId, JobState};

type SseTx = mpsc::Sender<Result<Event, Infallible>>;

fn event<T: Serialize>(name: &str, data: &T) -> Result<Event, Infallible> {
    Ok(Event::default()
        .event(name)
        .data(serde_json::to_string(data).unwrap_or_default()))
}

fn sse(rx: mpsc::Receiver<Result<Event, Infallible>>) -> Response {
    Sse::new(ReceiverStream::new(rx))
        .keep_alive(KeepAlive::default())
        .into_response()
}

/// How long to wait between checks when inotify is unavailable (as `follow` does).
fn fallback(watcher: &DirWatcher) -> Duration {
    if watcher.pushes() {
        Duration::from_secs(3600)
    } else {
        Duration::from_secs(1)
    }
}

/// `GET /api/v1/stream`.
pub async fn queue_stream(State(st): State<AppState>) -> Response {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(run_queue_stream(st, tx));
    sse(rx)
}

/// Watches the directory of one running train job for the queue stream; dropping it stops
/// the forwarding task, which drops the watch.
struct ProgressWatch {
    task: tokio::task::JoinHandle<()>,
    last: Option<Progress>,
}

impl Drop for ProgressWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Jobs whose directory changed since the stream last looked, and the bell that says so:
/// many inotify events coalesce into one read of `progress.json` per job.
#[derive(Default)]
struct Dirty {
    jobs: Mutex<HashSet<JobId>>,
    bell: Notify,
}

async fn run_queue_stream(st: AppState, tx: SseTx) {
    let mut changes = st.sched.subscribe();
    let mut revisions = st.sched.view_revisions();
    revisions.mark_unchanged();
    let dirty = Arc::new(Dirty::default());
    let mut watched: HashMap<JobId, ProgressWatch> = HashMap::new();
    let mut last_gpus = String::new();
    let mut last_view: Option<Arc<View>> = None;
    let mut jobs_changed = true;
    loop {
        let view = st.sched.view();
        let gpus =
            serde_json::to_string(&gpus_response(&view, st.sched.policy())).unwrap_or_default();
        if gpus != last_gpus {
            let ev = Event::default().event(names::GPUS).data(&gpus);
            if tx.send(Ok(ev)).await.is_err() {
                return;
            }
            last_gpus = gpus;
        }
        let waiting_changed = last_view.as_ref().is_none_or(|l| l.waiting != view.waiting);
        if jobs_changed || waiting_changed {
            let data = QueueChanged {
                counts: state_counts(&view),
            };
            if tx.send(event(names::QUEUE, &data)).await.is_err() {
                return;
            }
        }
        jobs_changed = false;

        // Follow the progress of the jobs that run now (train workers report it; command
        // jobs may), and only those.
        let running: HashSet<JobId> = view
            .active
            .iter()
            .filter(|j| j.state == JobState::Running)
            .map(|j| j.id)
            .collect();
        watched.retain(|id, _| running.contains(id));
        for id in &running {
            if watched.contains_key(id) {
                continue;
            }
            let dir = view.jobs[id].dir(&st.jobs_dir);
            let task = match st.watcher.subscribe(&dir).await {
                Some(sub) => tokio::spawn(forward(sub, *id, dirty.clone())),
                None => tokio::spawn(async {}),
            };
            watched.insert(*id, ProgressWatch { task, last: None });
            dirty.jobs.lock().expect("dirty lock").insert(*id);
        }
        last_view = Some(view);
        if !send_progress(&st, &tx, &dirty, &mut watched).await {
            return;
        }

        // Sleep until the scheduler publishes a new view (or a watched directory changes).
        loop {
            tokio::select! {
                c = changes.recv() => match c {
                    Ok(_) | Err(RecvError::Lagged(_)) => jobs_changed = true,
                    Err(RecvError::Closed) => return,
                },
                r = revisions.changed() => {
                    if r.is_err() {
                        return;
                    }
                    // The batch's changes were sent before the revision: take them now so
                    // this revision's "queue changed" is not missed.
                    loop {
                        match changes.try_recv() {
                            Ok(_) | Err(TryRecvError::Lagged(_)) => jobs_changed = true,
                            Err(TryRecvError::Empty) => break,
                            Err(TryRecvError::Closed) => return,
                        }
                    }
                    break;
                }
                () = dirty.bell.notified() => {
                    if !send_progress(&st, &tx, &dirty, &mut watched).await {
                        return;
                    }
                }
                () = tokio::time::sleep(fallback(&st.watcher)), if !watched.is_empty() => {
                    dirty.jobs.lock().expect("dirty lock").extend(watched.keys().copied());
                    if !send_progress(&st, &tx, &dirty, &mut watched).await {
                        return;
                    }
                }
                () = tx.closed() => return,
            }
        }
    }
}

/// Marks `id` dirty whenever its directory changes.
async fn forward(mut sub: DirSubscription, id: JobId, dirty: Arc<Dirty>) {
    loop {
        match sub.rx.recv().await {
            Ok(()) | Err(RecvError::Lagged(_)) => {
                dirty.jobs.lock().expect("dirty lock").insert(id);
                dirty.bell.notify_one();
            }
            Err(RecvError::Closed) => return,
        }
    }
}

/// Sends the progress of every dirty watched job that changed; false when the client left.
async fn send_progress(
    st: &AppState,
    tx: &SseTx,
    dirty: &Dirty,
    watched: &mut HashMap<JobId, ProgressWatch>,
) -> bool {
    let ids: Vec<JobId> = dirty.jobs.lock().expect("dirty lock").drain().collect();
    for id in ids {
        let Some(w) = watched.get_mut(&id) else {
            continue;
        };
        let dir = st.jobs_dir.join(id.to_string());
        let Some(progress) = sched::read_progress(&dir) else {
            continue;
        };
        if w.last.as_ref() == Some(&progress) {
            continue;
        }
        w.last = Some(progress.clone());
        let data = ProgressUpdate { id, progress };
        if tx.send(event(names::PROGRESS, &data)).await.is_err() {
            return false;
        }
    }
    true
}

/// `GET /api/v1/jobs/{id}/stream`.
pub async fn job_stream(
    State(st): State<AppState>,
    Extension(caller): Extension<Caller>,
    JobIdPath(id): JobIdPath,
) -> Result<Response, ApiError> {
    // Subscribe before reading the history so nothing falls between the two.
    let changes = st.sched.subscribe();
    let history = st.sched.events(id).map_err(|e| match e {
        crate::store::StoreError::NotFound(_) => ApiError::not_found(format!("job {id} not found")),
        e => ApiError::from(sched::SchedError::from(e)),
    })?;
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        let _ = run_job_stream(st, caller, id, history, changes, tx).await;
    });
    Ok(sse(rx))
}

/// The client went away.
struct Gone;

async fn send(tx: &SseTx, ev: Result<Event, Infallible>) -> Result<(), Gone> {
    tx.send(ev).await.map_err(|_| Gone)
}

async fn run_job_stream(
    st: AppState,
    caller: Caller,
    id: JobId,
    history: Vec<crate::spec::JobEvent>,
    mut changes: tokio::sync::broadcast::Receiver<crate::spec::api::JobChange>,
    tx: SseTx,
) -> Result<(), Gone> {
    let view = st.sched.view();
    let Some(rec) = view.jobs.get(&id) else {
        return Ok(());
    };
    send(
        &tx,
        event(names::JOB, &job_view(rec, &caller, &view, &st.jobs_dir)),
    )
    .await?;
    let mut next_seq = 0;
    for e in history {
        next_seq = e.seq + 1;
        send(&tx, event(names::EVENT, &e)).await?;
    }
    let mut files = JobFiles::new(id, rec.dir(&st.jobs_dir));
    drop(view);
    let mut dir_sub: Option<DirSubscription> = None;
    let mut checkpoints_sub: Option<DirSubscription> = None;
    let mut check_files = true;
    loop {
        // The job directory appears when the job first starts, `checkpoints/` with it.
        if dir_sub.is_none() && files.dir.is_dir() {
            dir_sub = st.watcher.subscribe(&files.dir).await;
        }
        let ck = files.dir.join(files::CHECKPOINTS);
        if checkpoints_sub.is_none() && crate::jobfs::is_real_dir(&ck) {
            checkpoints_sub = st.watcher.subscribe(&ck).await;
        }
        // Read after subscribing, so no write falls in between.
        if check_files {
            files.send_changes(&tx).await?;
        }
        check_files = true;
        tokio::select! {
            c = changes.recv() => match c {
                Ok(c) if c.job.record.id == id => {
                    let view = st.sched.view();
                    let job = job_view(&c.job.record, &caller, &view, &st.jobs_dir);
                    send(&tx, event(names::JOB, &job)).await?;
                    if let Some(e) = c.event.filter(|e| e.seq >= next_seq) {
                        next_seq = e.seq + 1;
                        send(&tx, event(names::EVENT, &e)).await?;
                    }
                }
                Ok(_) => check_files = false,
                Err(RecvError::Lagged(_)) => {
                    // Missed changes: resend the job and its events from the store.
                    let view = st.sched.view();
                    if let Some(rec) = view.jobs.get(&id) {
                        send(&tx, event(names::JOB, &job_view(rec, &caller, &view, &st.jobs_dir))).await?;
                    }
                    let from = next_seq;
                    for e in st.sched.events(id).unwrap_or_default().into_iter().filter(|e| e.seq >= from) {
                        next_seq = e.seq + 1;
                        send(&tx, event(names::EVENT, &e)).await?;
                    }
                }
                Err(RecvError::Closed) => return Ok(()),
            },
            _ = recv_opt(&mut dir_sub) => {}
            _ = recv_opt(&mut checkpoints_sub) => {}
            () = tokio::time::sleep(fallback(&st.watcher)) => {}
            () = tx.closed() => return Err(Gone),
        }
    }
}

async fn recv_opt(sub: &mut Option<DirSubscription>) {
    match sub {
        Some(s) => {
            if let Err(RecvError::Closed) = s.rx.recv().await {
                std::future::pending::<()>().await;
            }
        }
        None => std::future::pending().await,
    }
}

/// What the job stream has sent of a job's files, to send only what is new.
struct JobFiles {
    id: JobId,
    dir: PathBuf,
    /// What of `metrics.jsonl` was sent.
    metrics: MetricsTail,
    progress: Option<Progress>,
    checkpoints: Option<Vec<CheckpointView>>,
}

impl JobFiles {
    fn new(id: JobId, dir: PathBuf) -> Self {
        JobFiles {
            id,
            dir,
            metrics: MetricsTail::default(),
            progress: None,
            checkpoints: None,
        }
    }

    async fn send_changes(&mut self, tx: &SseTx) -> Result<(), Gone> {
        if let Some(update) = self.metrics.read(&self.dir.join(files::METRICS)) {
            send(tx, event(names::METRICS, &update)).await?;
        }
        if let Some(p) = sched::read_progress(&self.dir)
            && self.progress.as_ref() != Some(&p)
        {
            self.progress = Some(p.clone());
            let data = ProgressUpdate {
                id: self.id,
                progress: p,
            };
            send(tx, event(names::PROGRESS, &data)).await?;
        }
        let cks = list_checkpoints(&self.dir.join(files::CHECKPOINTS));
        if self.checkpoints.as_ref() != Some(&cks) {
            send(tx, event(names::CHECKPOINTS, &cks)).await?;
            self.checkpoints = Some(cks);
        }
        Ok(())
    }
}

/// The complete `checkpoint-<step>/` directories (temporary ones are hidden), oldest first.
pub fn list_checkpoints(dir: &Path) -> Vec<CheckpointView> {
    // The owner may have replaced the directory with a link to someone else's.
    if !crate::jobfs::is_real_dir(dir) {
        return Vec::new();
    }
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<CheckpointView> = entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let step = name.strip_prefix("checkpoint-")?.parse().ok()?;
            let meta = e.metadata().ok().filter(|m| m.is_dir())?;
            let bytes = std::fs::read_dir(e.path())
                .map(|files| {
                    files
                        .filter_map(Result::ok)
                        .filter_map(|f| f.metadata().ok())
                        .filter(|m| m.is_file())
                        .map(|m| m.len())
                        .sum()
                })
                .unwrap_or(0);
            let modified = meta
                .modified()
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_millis() as crate::spec::Millis);
            Some(CheckpointView {
                name,
                step,
                bytes,
                modified,
            })
        })
        .collect();
    out.sort_by_key(|c| c.step);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpoints_list_complete_directories_by_step_with_their_size() {
        let dir = tempfile::tempdir().unwrap();
        for (name, bytes) in [
            ("checkpoint-100", 7),
            ("checkpoint-20", 3),
            (".tmp-checkpoint-200-1", 5),
        ] {
            std::fs::create_dir(dir.path().join(name)).unwrap();
            std::fs::write(dir.path().join(name).join("w"), vec![0u8; bytes]).unwrap();
        }
        std::fs::write(dir.path().join("checkpoint-5"), b"a file, not a checkpoint").unwrap();
        let list = list_checkpoints(dir.path());
        let got: Vec<(u64, u64)> = list.iter().map(|c| (c.step, c.bytes)).collect();
        assert_eq!(got, vec![(20, 3), (100, 7)]);
        assert!(list_checkpoints(&dir.path().join("missing")).is_empty());
    }
}
