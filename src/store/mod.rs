//! L1: the durable store — the only user of sled.
//!
//! Trees: `jobs` (id → [`JobRecord`] as JSON), `events` (id ‖ seq → [`JobEvent`]), `meta`
//! (schema version, the id counter). Every change to a job is one transaction over the job and
//! its new event, so a record and its history never disagree. Changes become durable at
//! [`Store::flush`]; the scheduler flushes before it answers a request, so a submit that
//! returned an id is never lost, even to `kill -9`.
//!
//! The store refuses illegal state transitions (see [`JobState::can_become`]); it does not
//! decide anything else. Only `sched` calls its mutators.

use std::path::{Path, PathBuf};

use sled::transaction::{ConflictableTransactionError, TransactionError, Transactional};

use crate::spec::record::RECORD_VERSION;
use crate::spec::schedule::ScheduleRecord;
use crate::spec::{JobEvent, JobId, JobRecord, JobState, Millis, now_ms};

/// Layout version of the trees; a store written by a newer jobd is refused.
pub const SCHEMA_VERSION: u64 = 1;

const META_SCHEMA: &[u8] = b"schema";
const META_LAST_ID: &[u8] = b"last_job_id";
const META_LAST_SCHEDULE: &[u8] = b"last_schedule_id";
const META_USAGE_PREFIX: &[u8] = b"usage/";
const META_MODEL_PREFIX: &[u8] = b"model/";

/// Errors of the store, naming the job or path involved.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the job store at {path}: {source}")]
    Open { path: PathBuf, source: sled::Error },
    #[error(
        "the job store at {path} has schema version {found}; this jobd understands up to {SCHEMA_VERSION} (upgrade jobd)"
    )]
    Schema { path: PathBuf, found: u64 },
    #[error("job {0} not found")]
    NotFound(JobId),
    #[error("job {id} cannot go from {from} to {to}")]
    IllegalTransition {
        id: JobId,
        from: JobState,
        to: JobState,
    },
    #[error("job {id} is {found}, expected {expected}")]
    UnexpectedState {
        id: JobId,
        expected: String,
        found: JobState,
    },
    #[error("the job store's record of job {id} is unreadable: {source}")]
    Corrupt {
        id: JobId,
        source: serde_json::Error,
    },
    #[error("job store i/o error: {0}")]
    Io(#[from] sled::Error),
}

impl StoreError {
    /// Whether the file system holding the store is full.
    pub fn is_disk_full(&self) -> bool {
        let sled_err = match self {
            StoreError::Open { source, .. } | StoreError::Io(source) => source,
            _ => return false,
        };
        match sled_err {
            sled::Error::Io(e) => {
                e.raw_os_error() == Some(nix::libc::ENOSPC)
                    || e.to_string().contains("No space left")
            }
            _ => false,
        }
    }
}

/// Who published a model name into an Ollama directory through jobd: the name is theirs
/// there (only they or an admin replace it), whatever becomes of the job.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ModelOwner {
    pub user: String,
    /// The job whose model it was.
    pub job: JobId,
    pub at: Millis,
}

fn model_key(dir: &Path, name: &str) -> Vec<u8> {
    let mut key = META_MODEL_PREFIX.to_vec();
    key.extend_from_slice(dir.as_os_str().as_encoded_bytes());
    key.push(0);
    key.extend_from_slice(name.as_bytes());
    key
}

/// Space jobd keeps taken in the store's directory (a file of zeros, really allocated), given
/// back when the file system fills: the queue can still be written (and jobd restarted) while
/// a job's checkpoints take the rest.
pub const RESERVE_BYTES: u64 = 32 << 20;
const RESERVE_FILE: &str = "reserve";

/// Makes sure the reserve exists in the store directory `dir`, if the file system has room
/// for it and more; returns whether it exists now.
pub fn ensure_reserve(dir: &Path) -> bool {
    use std::os::fd::AsFd;
    let path = dir.join(RESERVE_FILE);
    if std::fs::metadata(&path).is_ok_and(|m| m.len() >= RESERVE_BYTES) {
        return true;
    }
    // Only with room to spare: taking the last free bytes back at once would fill it again.
    if free_bytes(dir).unwrap_or(0) < 4 * RESERVE_BYTES {
        return false;
    }
    let made = std::fs::File::create(&path).and_then(|f| {
        nix::fcntl::posix_fallocate(f.as_fd(), 0, RESERVE_BYTES as i64)
            .map_err(std::io::Error::from)?;
        f.sync_all()
    });
    if made.is_err() {
        let _ = std::fs::remove_file(&path);
    }
    made.is_ok()
}

/// Bytes an unprivileged user may still write on the file system holding `dir`.
pub fn free_bytes(dir: &Path) -> Option<u64> {
    let v = nix::sys::statvfs::statvfs(dir).ok()?;
    Some(v.blocks_available() * v.fragment_size())
}

/// Gives the reserve back to the file system; returns whether there was one.
pub fn release_reserve(dir: &Path) -> bool {
    std::fs::remove_file(dir.join(RESERVE_FILE)).is_ok()
}

/// Handle to the store; cheap to clone.
#[derive(Clone)]
pub struct Store {
    db: sled::Db,
    jobs: sled::Tree,
    events: sled::Tree,
    meta: sled::Tree,
    schedules: sled::Tree,
}

/// A change to one job: an optional state transition, a reason for the history, and edits.
pub struct Change<'a> {
    /// New state; `None` records an event in the current state (e.g. a priority change).
    pub to: Option<JobState>,
    /// Only apply if the job is in one of these states (empty: any).
    pub expect: &'a [JobState],
    pub reason: String,
    pub edit: &'a dyn Fn(&mut JobRecord),
    /// The event is a note in the history (a notification sent), not why the job is in its
    /// state: the record's `reason` stays as it was.
    pub keeps_reason: bool,
}

impl Store {
    /// Opens (or creates) the store in `dir`.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        let db = sled::Config::new()
            .path(dir)
            .mode(sled::Mode::HighThroughput)
            .open()
            .map_err(|source| StoreError::Open {
                path: dir.to_path_buf(),
                source,
            })?;
        let open_err = |source| StoreError::Open {
            path: dir.to_path_buf(),
            source,
        };
        let jobs = db.open_tree("jobs").map_err(open_err)?;
        let events = db.open_tree("events").map_err(open_err)?;
        let meta = db.open_tree("meta").map_err(open_err)?;
        let schedules = db.open_tree("schedules").map_err(open_err)?;
        match meta.get(META_SCHEMA)? {
            None => {
                meta.insert(META_SCHEMA, &SCHEMA_VERSION.to_be_bytes())?;
                db.flush()?;
            }
            Some(v) => {
                let found = decode_u64(&v);
                if found > SCHEMA_VERSION {
                    return Err(StoreError::Schema {
                        path: dir.to_path_buf(),
                        found,
                    });
                }
            }
        }
        Ok(Store {
            db,
            jobs,
            events,
            meta,
            schedules,
        })
    }

    /// Makes every change so far durable.
    pub async fn flush(&self) -> Result<(), StoreError> {
        self.db.flush_async().await?;
        Ok(())
    }

    /// Makes every change so far durable (blocking).
    pub fn flush_blocking(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        Ok(())
    }

    /// Inserts a new job: `make` receives the fresh id and returns the record. The first event
    /// (`queued`, `reason`) is written in the same transaction.
    pub fn insert(
        &self,
        reason: &str,
        make: &dyn Fn(JobId) -> JobRecord,
    ) -> Result<(JobRecord, JobEvent), StoreError> {
        let mut made = self.insert_many(1, &|id, _| (make(id), reason.to_string()))?;
        Ok(made.remove(0))
    }

    /// Inserts `count` new jobs in one transaction, all or none, with consecutive ids: `make`
    /// receives each one's id and the first one's, and returns its record and the reason of its
    /// first event.
    pub fn insert_many(
        &self,
        count: usize,
        make: &dyn Fn(JobId, JobId) -> (JobRecord, String),
    ) -> Result<Vec<(JobRecord, JobEvent)>, StoreError> {
        let result = (&self.jobs, &self.events, &self.meta).transaction(|(jobs, events, meta)| {
            let last = meta.get(META_LAST_ID)?.map(|v| decode_u64(&v)).unwrap_or(0);
            let first = last + 1;
            let mut made = Vec::with_capacity(count);
            for id in (first..).take(count) {
                let (mut record, reason) = make(id, first);
                record.id = id;
                record.v = RECORD_VERSION;
                let event = JobEvent {
                    seq: 0,
                    at: record.submitted_at,
                    state: record.state,
                    reason: reason.clone(),
                };
                record.event_count = 1;
                record.reason = Some(reason);
                jobs.insert(&id.to_be_bytes(), encode(&record))?;
                events.insert(&event_key(id, 0), encode(&event))?;
                made.push((record, event));
            }
            meta.insert(META_LAST_ID, &(last + count as u64).to_be_bytes())?;
            Ok(made)
        });
        result.map_err(unwrap_tx)
    }

    /// Applies a change to one job in one transaction and returns the job and its new event.
    pub fn apply(
        &self,
        id: JobId,
        change: &Change<'_>,
    ) -> Result<(JobRecord, JobEvent), StoreError> {
        let result = (&self.jobs, &self.events).transaction(|(jobs, events)| {
            let mut record = read_in(jobs, id)?;
            if !change.expect.is_empty() && !change.expect.contains(&record.state) {
                let expected: Vec<_> = change.expect.iter().map(|s| s.as_str()).collect();
                return Err(ConflictableTransactionError::Abort(
                    StoreError::UnexpectedState {
                        id,
                        expected: expected.join(" or "),
                        found: record.state,
                    },
                ));
            }
            let from = record.state;
            let to = change.to.unwrap_or(from);
            if change.to.is_some() && !from.can_become(to) {
                return Err(ConflictableTransactionError::Abort(
                    StoreError::IllegalTransition { id, from, to },
                ));
            }
            (change.edit)(&mut record);
            let now = now_ms();
            record.state = to;
            record.updated_at = now;
            if !change.keeps_reason {
                record.reason = Some(change.reason.clone());
            }
            let event = JobEvent {
                seq: record.event_count,
                at: now,
                state: to,
                reason: change.reason.clone(),
            };
            record.event_count += 1;
            jobs.insert(&id.to_be_bytes(), encode(&record))?;
            events.insert(&event_key(id, event.seq), encode(&event))?;
            Ok((record, event))
        });
        result.map_err(unwrap_tx)
    }

    /// Changes a job's record with no event in its history (what jobd keeps to find a process
    /// again, not something that happened to the job).
    pub fn edit(&self, id: JobId, edit: &dyn Fn(&mut JobRecord)) -> Result<JobRecord, StoreError> {
        let result = self.jobs.transaction(|jobs| {
            let mut record = read_in(jobs, id)?;
            edit(&mut record);
            jobs.insert(&id.to_be_bytes(), encode(&record))?;
            Ok(record)
        });
        result.map_err(unwrap_tx)
    }

    /// One job.
    pub fn get(&self, id: JobId) -> Result<JobRecord, StoreError> {
        let raw = self
            .jobs
            .get(id.to_be_bytes())?
            .ok_or(StoreError::NotFound(id))?;
        decode(id, &raw)
    }

    /// Every job, in id order.
    pub fn all_jobs(&self) -> Result<Vec<JobRecord>, StoreError> {
        self.jobs
            .iter()
            .map(|kv| {
                let (k, v) = kv?;
                decode(decode_u64(&k), &v)
            })
            .collect()
    }

    /// A job's history, oldest first.
    pub fn events(&self, id: JobId) -> Result<Vec<JobEvent>, StoreError> {
        self.events
            .scan_prefix(id.to_be_bytes())
            .map(|kv| {
                let (_, v) = kv?;
                serde_json::from_slice(&v).map_err(|source| StoreError::Corrupt { id, source })
            })
            .collect()
    }

    /// Removes jobs for good: each record, then its history. Ids are never given again (the
    /// counter stays). A crash between the two leaves history no record points to: unread.
    pub fn remove_jobs(&self, ids: &[JobId]) -> Result<(), StoreError> {
        for id in ids {
            self.jobs.remove(id.to_be_bytes())?;
            let mut batch = sled::Batch::default();
            for key in self.events.scan_prefix(id.to_be_bytes()).keys() {
                batch.remove(key?);
            }
            self.events.apply_batch(batch)?;
        }
        Ok(())
    }

    /// Who last published model `name` (fully qualified) into the Ollama directory `dir`.
    pub fn model_owner(&self, dir: &Path, name: &str) -> Result<Option<ModelOwner>, StoreError> {
        Ok(self
            .meta
            .get(model_key(dir, name))?
            .and_then(|v| serde_json::from_slice(&v).ok()))
    }

    /// Records who published model `name` into `dir` (see [`Store::model_owner`]).
    pub fn set_model_owner(
        &self,
        dir: &Path,
        name: &str,
        owner: &ModelOwner,
    ) -> Result<(), StoreError> {
        let value = serde_json::to_vec(owner).expect("owner serializes");
        self.meta.insert(model_key(dir, name), value)?;
        Ok(())
    }

    /// GPU use of removed jobs, per user, as (seconds, as of): fair share must not forget it.
    pub fn carried_usage(&self) -> Result<Vec<(String, f64, Millis)>, StoreError> {
        let mut out = Vec::new();
        for kv in self.meta.scan_prefix(META_USAGE_PREFIX) {
            let (k, v) = kv?;
            let user = String::from_utf8_lossy(&k[META_USAGE_PREFIX.len()..]).into_owned();
            if let Ok((seconds, at)) = serde_json::from_slice::<(f64, Millis)>(&v) {
                out.push((user, seconds, at));
            }
        }
        Ok(out)
    }

    /// Records `user`'s carried GPU use (see [`Store::carried_usage`]).
    pub fn set_carried_usage(
        &self,
        user: &str,
        seconds: f64,
        at: Millis,
    ) -> Result<(), StoreError> {
        let mut key = META_USAGE_PREFIX.to_vec();
        key.extend_from_slice(user.as_bytes());
        let value = serde_json::to_vec(&(seconds, at)).expect("numbers serialize");
        self.meta.insert(key, value)?;
        Ok(())
    }

    /// The highest job id ever assigned.
    pub fn last_id(&self) -> Result<JobId, StoreError> {
        Ok(self
            .meta
            .get(META_LAST_ID)?
            .map(|v| decode_u64(&v))
            .unwrap_or(0))
    }

    /// Inserts a new schedule; `make` receives its fresh id.
    pub fn insert_schedule(
        &self,
        make: &dyn Fn(u64) -> ScheduleRecord,
    ) -> Result<ScheduleRecord, StoreError> {
        let result = (&self.schedules, &self.meta).transaction(|(schedules, meta)| {
            let id = meta
                .get(META_LAST_SCHEDULE)?
                .map(|v| decode_u64(&v))
                .unwrap_or(0)
                + 1;
            let mut rec = make(id);
            rec.id = id;
            meta.insert(META_LAST_SCHEDULE, &id.to_be_bytes())?;
            schedules.insert(&id.to_be_bytes(), encode(&rec))?;
            Ok(rec)
        });
        result.map_err(unwrap_tx)
    }

    /// Replaces a schedule record.
    pub fn put_schedule(&self, rec: &ScheduleRecord) -> Result<(), StoreError> {
        self.schedules.insert(rec.id.to_be_bytes(), encode(rec))?;
        Ok(())
    }

    /// Removes a schedule (its past jobs stay).
    pub fn delete_schedule(&self, id: u64) -> Result<(), StoreError> {
        self.schedules.remove(id.to_be_bytes())?;
        Ok(())
    }

    /// Every schedule, in id order.
    pub fn all_schedules(&self) -> Result<Vec<ScheduleRecord>, StoreError> {
        self.schedules
            .iter()
            .map(|kv| {
                let (k, v) = kv?;
                serde_json::from_slice(&v).map_err(|source| StoreError::Corrupt {
                    id: decode_u64(&k),
                    source,
                })
            })
            .collect()
    }

    /// One firing of a schedule, in one transaction: the schedule's new record and, unless
    /// the firing is skipped (`make_job` is `None`), the job it queues with its first event.
    /// `reason` is that event's reason, or for a skipped firing why (kept in `last_skip`).
    pub fn fire(
        &self,
        schedule: &ScheduleRecord,
        reason: &str,
        make_job: Option<&dyn Fn(JobId) -> JobRecord>,
    ) -> Result<(ScheduleRecord, Option<(JobRecord, JobEvent)>), StoreError> {
        let result = (&self.jobs, &self.events, &self.meta, &self.schedules).transaction(
            |(jobs, events, meta, schedules)| {
                let mut sched = schedule.clone();
                let mut created = None;
                if let Some(make) = make_job {
                    let id = meta.get(META_LAST_ID)?.map(|v| decode_u64(&v)).unwrap_or(0) + 1;
                    let mut record = make(id);
                    record.id = id;
                    record.v = RECORD_VERSION;
                    record.event_count = 1;
                    record.reason = Some(reason.to_string());
                    let event = JobEvent {
                        seq: 0,
                        at: record.submitted_at,
                        state: record.state,
                        reason: reason.to_string(),
                    };
                    meta.insert(META_LAST_ID, &id.to_be_bytes())?;
                    jobs.insert(&id.to_be_bytes(), encode(&record))?;
                    events.insert(&event_key(id, 0), encode(&event))?;
                    sched.last_job = Some(id);
                    sched.runs += 1;
                    sched.last_skip = None;
                    created = Some((record, event));
                } else {
                    sched.skipped += 1;
                    sched.last_skip = Some(reason.to_string());
                }
                schedules.insert(&sched.id.to_be_bytes(), encode(&sched))?;
                Ok((sched, created))
            },
        );
        result.map_err(unwrap_tx)
    }
}

fn event_key(id: JobId, seq: u32) -> [u8; 12] {
    let mut key = [0u8; 12];
    key[..8].copy_from_slice(&id.to_be_bytes());
    key[8..].copy_from_slice(&seq.to_be_bytes());
    key
}

fn decode_u64(bytes: &[u8]) -> u64 {
    let mut buf = [0u8; 8];
    let n = bytes.len().min(8);
    buf[8 - n..].copy_from_slice(&bytes[bytes.len() - n..]);
    u64::from_be_bytes(buf)
}

fn encode<T: serde::Serialize>(value: &T) -> Vec<u8> {
    // Serialising our own plain structs to JSON cannot fail.
    serde_json::to_vec(value).expect("job records serialise to JSON")
}

fn decode(id: JobId, raw: &[u8]) -> Result<JobRecord, StoreError> {
    serde_json::from_slice(raw).map_err(|source| StoreError::Corrupt { id, source })
}

/// Job `id`'s record, read within a transaction over the `jobs` tree.
fn read_in(
    jobs: &sled::transaction::TransactionalTree,
    id: JobId,
) -> Result<JobRecord, ConflictableTransactionError<StoreError>> {
    let raw = jobs
        .get(id.to_be_bytes())?
        .ok_or(ConflictableTransactionError::Abort(StoreError::NotFound(
            id,
        )))?;
    decode(id, &raw).map_err(ConflictableTransactionError::Abort)
}

fn unwrap_tx(e: TransactionError<StoreError>) -> StoreError {
    match e {
        TransactionError::Abort(e) => e,
        TransactionError::Storage(e) => StoreError::Io(e),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::spec::Owner;
    use crate::spec::job::parse;

    /// A queued command job record for tests.
    pub(crate) fn sample_record(id: JobId) -> JobRecord {
        let spec = parse(
            "t.toml",
            "kind = \"command\"\n[command]\nargv = [\"true\"]\n",
        )
        .unwrap();
        let mut r = JobRecord::new_queued(
            Owner {
                user: "alice".into(),
                uid: 1000,
            },
            "t".into(),
            spec,
            String::new(),
            now_ms(),
        );
        r.id = id;
        r
    }

    fn to(state: JobState, reason: &str) -> Change<'static> {
        Change {
            to: Some(state),
            expect: &[],
            reason: reason.into(),
            edit: &|_| {},
            keeps_reason: false,
        }
    }

    #[test]
    fn ids_are_dense_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            for expected in 1..=3 {
                let (rec, ev) = store.insert("submitted", &sample_record).unwrap();
                assert_eq!(rec.id, expected);
                assert_eq!(ev.seq, 0);
            }
            store.flush_blocking().unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.all_jobs().unwrap().len(), 3);
        assert_eq!(store.insert("submitted", &sample_record).unwrap().0.id, 4);
    }

    /// A batch gets consecutive ids, each knows the first, and each has its first event.
    #[test]
    fn insert_many_is_one_batch_of_consecutive_ids() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store.insert("submitted", &sample_record).unwrap();
        let made = store
            .insert_many(3, &|id, first| {
                let mut r = sample_record(id);
                r.name = format!("t-{}", id - first + 1);
                (r, format!("submitted as {id} of {first}"))
            })
            .unwrap();
        let ids: Vec<JobId> = made.iter().map(|(r, _)| r.id).collect();
        assert_eq!(ids, [2, 3, 4]);
        assert_eq!(made[2].0.name, "t-3");
        assert_eq!(made[2].1.reason, "submitted as 4 of 2");
        assert_eq!(store.events(3).unwrap()[0].reason, "submitted as 3 of 2");
        assert_eq!(store.insert("submitted", &sample_record).unwrap().0.id, 5);
    }

    /// Removed jobs leave no record and no history, and their ids are not given again.
    #[test]
    fn removed_jobs_are_gone_and_their_ids_not_reused() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        for _ in 0..3 {
            store.insert("submitted", &sample_record).unwrap();
        }
        store.remove_jobs(&[1, 3]).unwrap();
        let left: Vec<JobId> = store.all_jobs().unwrap().iter().map(|j| j.id).collect();
        assert_eq!(left, [2]);
        assert!(store.events(1).unwrap().is_empty());
        assert_eq!(store.events(2).unwrap().len(), 1);
        assert_eq!(store.insert("submitted", &sample_record).unwrap().0.id, 4);
    }

    /// Removed jobs' GPU use is kept per user, across a reopen.
    #[test]
    fn carried_usage_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            store.set_carried_usage("alice", 3600.0, 1_000).unwrap();
            store.set_carried_usage("bob", 60.0, 2_000).unwrap();
            store.set_carried_usage("alice", 7200.0, 3_000).unwrap();
            store.flush_blocking().unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        let mut got = store.carried_usage().unwrap();
        got.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(
            got,
            [
                ("alice".to_string(), 7200.0, 3_000),
                ("bob".to_string(), 60.0, 2_000)
            ]
        );
    }

    #[test]
    fn transitions_record_history_and_refuse_illegal_moves() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let (rec, _) = store.insert("submitted", &sample_record).unwrap();
        store
            .apply(rec.id, &to(JobState::Starting, "placed"))
            .unwrap();
        let err = store
            .apply(rec.id, &to(JobState::Queued, "nope"))
            .unwrap_err();
        assert!(matches!(err, StoreError::IllegalTransition { .. }), "{err}");
        let (rec, ev) = store
            .apply(
                rec.id,
                &Change {
                    to: Some(JobState::Running),
                    expect: &[JobState::Starting],
                    reason: "spawned".into(),
                    edit: &|r| r.attempts += 1,
                    keeps_reason: false,
                },
            )
            .unwrap();
        assert_eq!((rec.state, rec.attempts, ev.seq), (JobState::Running, 1, 2));
        let history: Vec<_> = store
            .events(rec.id)
            .unwrap()
            .into_iter()
            .map(|e| (e.state, e.reason))
            .collect();
        assert_eq!(
            history,
            vec![
                (JobState::Queued, "submitted".to_string()),
                (JobState::Starting, "placed".to_string()),
                (JobState::Running, "spawned".to_string())
            ]
        );
        let err = store
            .apply(
                rec.id,
                &Change {
                    to: Some(JobState::Cancelled),
                    expect: &[JobState::Queued],
                    reason: "x".into(),
                    edit: &|_| {},
                    keeps_reason: false,
                },
            )
            .unwrap_err();
        assert!(matches!(err, StoreError::UnexpectedState { .. }), "{err}");
        assert!(matches!(
            store.apply(99, &to(JobState::Starting, "x")),
            Err(StoreError::NotFound(99))
        ));
        // A note goes into the history and leaves the record's reason alone.
        let (rec, ev) = store
            .apply(
                rec.id,
                &Change {
                    to: None,
                    expect: &[],
                    reason: "notification sent".into(),
                    edit: &|_| {},
                    keeps_reason: true,
                },
            )
            .unwrap();
        assert_eq!(rec.reason.as_deref(), Some("spawned"));
        assert_eq!(
            (ev.seq, ev.state, ev.reason.as_str()),
            (3, JobState::Running, "notification sent")
        );
        assert_eq!(
            store.get(rec.id).unwrap().reason.as_deref(),
            Some("spawned")
        );
    }

    #[test]
    fn newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            store
                .meta
                .insert(META_SCHEMA, &(SCHEMA_VERSION + 1).to_be_bytes())
                .unwrap();
            store.flush_blocking().unwrap();
        }
        let err = Store::open(dir.path()).err().unwrap().to_string();
        assert!(err.contains("schema version 2"), "{err}");
    }
}
