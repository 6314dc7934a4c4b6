//! Reading a train job's `metrics.jsonl` as it grows: the job stream sends its new records,
//! and the sweep view keeps each job's [`TrainResult`] up to date from them, so that a page
//! refreshed every few seconds reads only what was appended, not the whole file again.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Mutex;

use crate::spec::JobId;
use crate::spec::api::TrainResult;
use crate::spec::api::stream::MetricsUpdate;
use crate::spec::contract::files;

/// Where reading a `metrics.jsonl` got to.
#[derive(Debug, Default)]
pub struct MetricsTail {
    /// Bytes read (complete lines only), and the inode they came from: the worker rewrites the
    /// file (new inode) when it resumes from a checkpoint.
    pos: u64,
    ino: Option<u64>,
    sent: bool,
}

impl MetricsTail {
    /// New complete records of the `metrics.jsonl` at `path` (all of them, with `reset`, the
    /// first time and after the file was replaced). Blocking (small reads).
    pub fn read(&mut self, path: &Path) -> Option<MetricsUpdate> {
        use std::io::{Read, Seek, SeekFrom};
        let opened = crate::jobfs::open_regular(path).and_then(|f| Ok((f.metadata()?, f)));
        let (meta, mut file) = match opened {
            Ok(x) => x,
            Err(_) => {
                let first = !self.sent;
                self.sent = true;
                return first.then(|| MetricsUpdate {
                    reset: true,
                    records: Vec::new(),
                });
            }
        };
        let reset = !self.sent || self.ino != Some(meta.ino()) || meta.len() < self.pos;
        if reset {
            self.pos = 0;
            self.ino = Some(meta.ino());
        }
        // Never more than the newest MAX_METRICS_BYTES at once (the owner could make the file
        // any size): what came before them is skipped, from a line's start.
        let limit = files::MAX_METRICS_BYTES;
        let skipped = meta.len().saturating_sub(self.pos) > limit;
        if skipped {
            self.pos = meta.len() - limit;
        }
        let mut buf = Vec::new();
        if meta.len() > self.pos {
            let read = file.seek(SeekFrom::Start(self.pos)).and_then(|_| {
                file.by_ref()
                    .take((meta.len() - self.pos).min(limit))
                    .read_to_end(&mut buf)
            });
            if read.is_err() {
                buf.clear();
            }
        }
        let mut from = 0;
        if skipped {
            from = buf
                .iter()
                .position(|b| *b == b'\n')
                .map_or(buf.len(), |i| i + 1);
        }
        // A line being appended right now may be incomplete: keep it for next time (unless a
        // whole window holds no line end: then it is no line, and is skipped).
        let complete = buf.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
        let complete = if complete == 0 && buf.len() as u64 >= limit {
            buf.len()
        } else {
            complete.max(from)
        };
        self.pos += complete as u64;
        let buf = &buf[from..complete];
        let records: Vec<serde_json::Value> = buf
            .split(|b| *b == b'\n')
            .filter(|l| l.len() <= files::MAX_METRICS_LINE_BYTES)
            .filter_map(|l| serde_json::from_slice(l).ok())
            .collect();
        self.sent = true;
        (reset || !records.is_empty()).then_some(MetricsUpdate { reset, records })
    }
}

/// The newest records of a `metrics.jsonl` (none when there is no such file), oldest first.
/// Blocking.
pub fn read_all(path: &Path) -> std::io::Result<Vec<serde_json::Value>> {
    let text = match crate::jobfs::read_regular_tail(path, files::MAX_METRICS_BYTES) {
        Ok((t, _)) => String::from_utf8_lossy(&t).into_owned(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e),
    };
    // A line being appended right now may be incomplete: skip what does not parse.
    Ok(text
        .lines()
        // A record is well under 1 KiB: a longer line (the owner's) would cost many times its
        // size parsed, and is no record anyway.
        .filter(|l| l.len() <= files::MAX_METRICS_LINE_BYTES)
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect())
}

/// Each train job's result so far, kept up to date from what its `metrics.jsonl` gained since
/// it was last asked (`GET /sweeps/{id}`).
#[derive(Default)]
pub struct TrainResults {
    jobs: Mutex<HashMap<JobId, (MetricsTail, Option<TrainResult>)>>,
}

impl TrainResults {
    /// The results of `jobs` (id and `metrics.jsonl` path; `None`: no metrics to read), in
    /// order. Blocking.
    pub fn of(&self, jobs: &[(JobId, Option<std::path::PathBuf>)]) -> Vec<Option<TrainResult>> {
        let mut known = self.jobs.lock().unwrap_or_else(|e| e.into_inner());
        jobs.iter()
            .map(|(id, path)| {
                let path = path.as_deref()?;
                let (tail, result) = known.entry(*id).or_default();
                if let Some(update) = tail.read(path) {
                    let before = if update.reset { None } else { result.take() };
                    *result = TrainResult::fold(before, &update.records);
                }
                result.clone()
            })
            .collect()
    }

    /// Forgets the jobs `alive` says are gone (cleaned away).
    pub fn retain(&self, alive: impl Fn(JobId) -> bool) {
        let mut known = self.jobs.lock().unwrap_or_else(|e| e.into_inner());
        known.retain(|id, _| alive(*id));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_are_read_once_whole_then_by_complete_line_and_again_after_a_rewrite() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(files::METRICS);
        let mut tail = MetricsTail::default();
        let mut read = || tail.read(&path);
        let first = read().expect("the first call says what there is");
        assert!(first.reset && first.records.is_empty());
        assert_eq!(read(), None, "nothing new");

        std::fs::write(&path, "{\"step\":10,\"loss\":2.5}\n{\"step\":20,").unwrap();
        let u = read().unwrap();
        assert!(u.reset, "the file appeared: a new inode");
        assert_eq!(u.records.len(), 1, "the incomplete line waits");
        assert_eq!(read(), None);

        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        std::io::Write::write_all(&mut file, b"\"loss\":2.0}\n").unwrap();
        let u = read().unwrap();
        assert!(!u.reset);
        assert_eq!(
            u.records,
            vec![serde_json::json!({"step": 20, "loss": 2.0})]
        );

        // A resumed worker replaces the file (write to temp + rename).
        let tmp = dir.path().join("m.tmp");
        std::fs::write(&tmp, "{\"step\":10,\"loss\":2.5}\n").unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        let u = read().unwrap();
        assert!(u.reset);
        assert_eq!(u.records.len(), 1);
    }

    /// A job's result follows its file: appended records update it, a rewrite (a resume)
    /// starts it again, and a job asked about no more is forgotten.
    #[test]
    fn train_results_follow_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(files::METRICS);
        let results = TrainResults::default();
        let jobs = [(1, Some(path.clone())), (2, None)];
        assert_eq!(results.of(&jobs), [None, None]);
        std::fs::write(&path, "{\"step\":10,\"loss\":2.5,\"eval_loss\":2.0}\n").unwrap();
        let r = results.of(&jobs)[0].clone().unwrap();
        assert_eq!((r.step, r.best_eval_loss), (10, Some(2.0)));
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        std::io::Write::write_all(&mut file, b"{\"step\":20,\"loss\":1.5,\"eval_loss\":2.2}\n")
            .unwrap();
        let r = results.of(&jobs)[0].clone().unwrap();
        assert_eq!((r.step, r.loss, r.eval_loss), (20, 1.5, Some(2.2)));
        assert_eq!(
            (r.best_eval_loss, r.best_eval_step),
            (Some(2.0), Some(10)),
            "kept"
        );
        let tmp = dir.path().join("m.tmp");
        std::fs::write(&tmp, "{\"step\":10,\"loss\":2.4}\n").unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        let r = results.of(&jobs)[0].clone().unwrap();
        assert_eq!(
            (r.step, r.best_eval_loss),
            (10, None),
            "a rewrite starts again"
        );
        results.retain(|id| id != 1);
        assert!(results.jobs.lock().unwrap().is_empty());
    }
}
