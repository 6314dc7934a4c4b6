//! Following files by push: one inotify watcher for the whole daemon, shared by every client
//! that follows a log (or, later, metrics). A follower wakes when its job's directory changes
//! or the job changes state — never on a timer.

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use notify::{RecursiveMode, Watcher};
use tokio::sync::{broadcast, mpsc};

use crate::sched::SchedHandle;
use crate::spec::{JobId, JobState};

type Dirs = Arc<Mutex<HashMap<PathBuf, (usize, broadcast::Sender<()>)>>>;

/// Watches job directories on behalf of followers.
pub struct DirWatcher {
    dirs: Dirs,
    watcher: Option<Mutex<notify::RecommendedWatcher>>,
}

/// A follower's interest in one directory; dropping it stops watching when nobody else does.
pub struct DirSubscription {
    pub rx: broadcast::Receiver<()>,
    dir: PathBuf,
    owner: Arc<DirWatcher>,
}

impl Drop for DirSubscription {
    fn drop(&mut self) {
        let mut dirs = self.owner.dirs.lock().expect("watch lock");
        if let Some((count, _)) = dirs.get_mut(&self.dir) {
            *count -= 1;
            if *count == 0 {
                dirs.remove(&self.dir);
                if let Some(w) = &self.owner.watcher {
                    let _ = w.lock().expect("watcher lock").unwatch(&self.dir);
                }
            }
        }
    }
}

impl DirWatcher {
    /// Creates the watcher; without inotify (limits reached), followers fall back to checking
    /// every second.
    pub fn new() -> Arc<DirWatcher> {
        let dirs: Dirs = Arc::default();
        let for_events = dirs.clone();
        let watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            let Ok(event) = res else { return };
            let dirs = for_events.lock().expect("watch lock");
            for path in &event.paths {
                let dir = path.parent().unwrap_or(path);
                if let Some((_, tx)) = dirs.get(dir).or_else(|| dirs.get(path.as_path())) {
                    let _ = tx.send(());
                }
            }
        });
        let watcher = match watcher {
            Ok(w) => Some(Mutex::new(w)),
            Err(e) => {
                tracing::warn!(error = %e, "no inotify; log following falls back to 1 s checks");
                None
            }
        };
        Arc::new(DirWatcher { dirs, watcher })
    }

    /// Subscribes to changes of files directly inside `dir`.
    pub fn subscribe(self: &Arc<Self>, dir: &Path) -> DirSubscription {
        let mut dirs = self.dirs.lock().expect("watch lock");
        let entry = dirs.entry(dir.to_path_buf()).or_insert_with(|| {
            if let Some(w) = &self.watcher {
                if let Err(e) = w
                    .lock()
                    .expect("watcher lock")
                    .watch(dir, RecursiveMode::NonRecursive)
                {
                    tracing::debug!(dir = %dir.display(), error = %e, "cannot watch");
                }
            }
            (0, broadcast::channel(64).0)
        });
        entry.0 += 1;
        DirSubscription {
            rx: entry.1.subscribe(),
            dir: dir.to_path_buf(),
            owner: self.clone(),
        }
    }

    /// True when changes are pushed (inotify works).
    pub fn pushes(&self) -> bool {
        self.watcher.is_some()
    }
}

/// Streams `file` of job `id` from `offset`; with `follow`, keeps streaming as it grows until
/// the job has finished and everything is sent. Ends when the client goes away.
pub fn stream_file(
    sched: SchedHandle,
    watcher: Arc<DirWatcher>,
    id: JobId,
    dir: PathBuf,
    file: PathBuf,
    offset: u64,
    follow: bool,
) -> mpsc::Receiver<Result<Bytes, std::io::Error>> {
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(async move {
        let mut changes = sched.subscribe();
        let mut sub: Option<DirSubscription> = None;
        let mut pos = offset;
        loop {
            if sub.is_none() && dir.is_dir() {
                sub = Some(watcher.subscribe(&dir));
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
                    Err(e) => {
                        let _ = tx.send(Err(e)).await;
                        return;
                    }
                }
            }
            let state = sched.view().jobs.get(&id).map(|j| j.state);
            let done = state.is_none_or(JobState::is_terminal);
            if !follow || done {
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
    let mut f = std::fs::File::open(path)?;
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
