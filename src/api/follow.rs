//! Following files by push: one inotify watcher for the whole daemon, shared by every client
//! that follows a log (or, later, metrics). A follower wakes when its job's directory changes
//! or the job changes state — never on a timer.

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::body::Bytes;
use notify::{RecursiveMode, Watcher};
use tokio::sync::{broadcast, mpsc, oneshot};

use crate::sched::SchedHandle;
use crate::spec::JobId;

type Senders = Arc<RwLock<HashMap<PathBuf, broadcast::Sender<()>>>>;

enum WatchCmd {
    Subscribe(PathBuf, oneshot::Sender<broadcast::Receiver<()>>),
    Unsubscribe(PathBuf),
}

/// Watches job directories on behalf of followers. One manager thread owns the inotify
/// watcher and the reference counts, so `watch`/`unwatch` (which wait for notify's event
/// thread) never run under a lock the event thread needs.
pub struct DirWatcher {
    cmds: std::sync::mpsc::Sender<WatchCmd>,
    pushes: bool,
}

/// A follower's interest in one directory; dropping it stops watching when nobody else does.
pub struct DirSubscription {
    pub rx: broadcast::Receiver<()>,
    dir: PathBuf,
    cmds: std::sync::mpsc::Sender<WatchCmd>,
}

impl Drop for DirSubscription {
    fn drop(&mut self) {
        let _ = self.cmds.send(WatchCmd::Unsubscribe(self.dir.clone()));
    }
}

impl DirWatcher {
    /// Creates the watcher; without inotify (limits reached), followers fall back to checking
    /// every second.
    pub fn new() -> Arc<DirWatcher> {
        let senders: Senders = Arc::default();
        let for_events = senders.clone();
        let watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            let Ok(event) = res else { return };
            // Our own reads of the files raise access events; they are not changes.
            if matches!(event.kind, notify::EventKind::Access(_)) {
                return;
            }
            let senders = for_events.read().expect("watch map lock");
            for path in &event.paths {
                let dir = path.parent().unwrap_or(path);
                if let Some(tx) = senders.get(dir).or_else(|| senders.get(path.as_path())) {
                    let _ = tx.send(());
                }
            }
        });
        let mut watcher = match watcher {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::warn!(error = %e, "no inotify; log following falls back to 1 s checks");
                None
            }
        };
        let pushes = watcher.is_some();
        let (cmds, rx) = std::sync::mpsc::channel::<WatchCmd>();
        std::thread::Builder::new()
            .name("jobd-watch".into())
            .spawn(move || {
                let mut counts: HashMap<PathBuf, usize> = HashMap::new();
                for cmd in rx {
                    match cmd {
                        WatchCmd::Subscribe(dir, reply) => {
                            let count = counts.entry(dir.clone()).or_default();
                            if *count == 0 {
                                senders.write().expect("watch map lock").insert(dir.clone(), broadcast::channel(64).0);
                                if let Some(w) = watcher.as_mut()
                                    && let Err(e) = w.watch(&dir, RecursiveMode::NonRecursive) {
                                        tracing::debug!(dir = %dir.display(), error = %e, "cannot watch");
                                    }
                            }
                            *count += 1;
                            let rx = senders.read().expect("watch map lock")[&dir].subscribe();
                            let _ = reply.send(rx);
                        }
                        WatchCmd::Unsubscribe(dir) => {
                            let Some(count) = counts.get_mut(&dir) else { continue };
                            *count -= 1;
                            if *count == 0 {
                                counts.remove(&dir);
                                senders.write().expect("watch map lock").remove(&dir);
                                if let Some(w) = watcher.as_mut() {
                                    let _ = w.unwatch(&dir);
                                }
                            }
                        }
                    }
                }
            })
            .expect("spawn the watch thread");
        Arc::new(DirWatcher { cmds, pushes })
    }

    /// Subscribes to changes of files directly inside `dir`.
    pub async fn subscribe(&self, dir: &Path) -> Option<DirSubscription> {
        let (tx, rx) = oneshot::channel();
        self.cmds
            .send(WatchCmd::Subscribe(dir.to_path_buf(), tx))
            .ok()?;
        let rx = rx.await.ok()?;
        Some(DirSubscription {
            rx,
            dir: dir.to_path_buf(),
            cmds: self.cmds.clone(),
        })
    }

    /// True when changes are pushed (inotify works).
    pub fn pushes(&self) -> bool {
        self.pushes
    }
}

/// How long [`stream_file`] follows a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Follow {
    /// Send what is there, and end.
    No,
    /// Until the job has ended.
    UntilJobEnds,
    /// Until the job has ended and its `[notify]` command has run (its `notify.log`).
    UntilNotified,
}

/// Streams `file` of job `id` from `offset`, and as it grows for as long as `follow` says (and
/// everything is sent). Ends when the client goes away.
pub fn stream_file(
    sched: SchedHandle,
    watcher: Arc<DirWatcher>,
    id: JobId,
    dir: PathBuf,
    file: PathBuf,
    offset: u64,
    follow: Follow,
) -> mpsc::Receiver<Result<Bytes, std::io::Error>> {
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(async move {
        let mut changes = sched.subscribe();
        let mut sub: Option<DirSubscription> = None;
        let mut pos = offset;
        loop {
            if sub.is_none() && dir.is_dir() {
                sub = watcher.subscribe(&dir).await;
            }
            // Read what is there (after subscribing, so no write is missed in between).
            loop {
                match read_chunk(&file, pos) {
                    Ok(chunk) if chunk.is_empty() => break,
                    Ok(chunk) => {
                        pos += chunk.len() as u64;
                        if tx.send(Ok(Bytes::from(chunk))).await.is_err() {
                            return;
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                    // The job put something else in the log's place (a link, a FIFO): end
                    // the stream; a new request gets the refusal as a 409.
                    Err(e) if e.kind() == std::io::ErrorKind::InvalidInput => return,
                    Err(e) => {
                        let _ = tx.send(Err(e)).await;
                        return;
                    }
                }
            }
            let done = {
                let view = sched.view();
                view.jobs.get(&id).is_none_or(|j| {
                    j.state.is_terminal()
                        && !(follow == Follow::UntilNotified
                            && crate::sched::notification_pending(j, &|f| {
                                view.jobs.values().for_each(|r| f(r))
                            }))
                })
            };
            if follow == Follow::No || done {
                return;
            }
            let fallback = if watcher.pushes() {
                Duration::from_secs(3600)
            } else {
                Duration::from_secs(1)
            };
            tokio::select! {
                _ = async { match sub.as_mut() { Some(s) => { let _ = s.rx.recv().await; } None => std::future::pending().await } } => {}
                _ = changes.recv() => {}
                () = tx.closed() => return,
                () = tokio::time::sleep(fallback) => {}
            }
        }
    });
    rx
}

fn read_chunk(path: &Path, pos: u64) -> std::io::Result<Vec<u8>> {
    let mut f = crate::jobfs::open_regular(path)?;
    let len = f.metadata()?.len();
    if pos >= len {
        return Ok(Vec::new());
    }
    f.seek(SeekFrom::Start(pos))?;
    let mut buf = vec![0u8; (len - pos).min(256 * 1024) as usize];
    let n = f.read(&mut buf)?;
    buf.truncate(n);
    Ok(buf)
}
