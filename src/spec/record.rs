//! The durable job record and its event history (stored by `store`, served by `api`).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::job::{JobKind, JobSpec};
use super::state::JobState;
use super::{JobId, Millis};

/// Version of the stored record layout; bumped with a migration in `store`.
pub const RECORD_VERSION: u32 = 1;

/// Who submitted a job; jobs run as this user when the daemon runs as root.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Owner {
    pub user: String,
    pub uid: u32,
}

/// One job as stored. Only `sched` changes it (through `store`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobRecord {
    /// Layout version of this record.
    pub v: u32,
    pub id: JobId,
    pub name: String,
    pub owner: Owner,
    pub kind: JobKind,
    /// Current priority (starts as the job file's, may be changed later).
    pub priority: i32,
    pub state: JobState,
    /// The resolved job spec the worker runs.
    pub spec: JobSpec,
    /// The job file's text as submitted.
    pub source: String,
    /// Where the job file was, if submitted from a file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_path: Option<PathBuf>,
    pub submitted_at: Millis,
    pub updated_at: Millis,
    /// When the job last became queued (submit, retry, requeue): its place in line.
    #[serde(default)]
    pub queued_at: Millis,
    /// Start of the current or last run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<Millis>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<Millis>,
    /// How many times a worker was started.
    #[serde(default)]
    pub attempts: u32,
    /// Retries used of `[retry] max`.
    #[serde(default)]
    pub retries: u32,
    /// Exits with the "checkpointed, run me again" code that jobd had not asked for (no
    /// preemption or shutdown), since the job was submitted or last requeued by hand: bounded,
    /// so that a program that simply returns 75 (`EX_TEMPFAIL`) is not restarted forever.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub unrequested_requeues: u32,
    /// Not to be started before this time (retry backoff).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_before: Option<Millis>,
    /// Resources held by the current or last run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placement: Option<Placement>,
    /// The worker process of the current run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub process: Option<ProcessInfo>,
    /// How the last run ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit: Option<ExitInfo>,
    /// Why the job is in its state (the last event's reason).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// A stop asked of the running worker (cancel or preemption), applied when it exits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop: Option<StopKind>,
    /// When `stop` was asked for (Unix ms): its SIGKILL is due a grace period after, also
    /// for a daemon that takes the run over after a restart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_at: Option<Millis>,
    /// Estimated VRAM per GPU, bytes (train jobs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vram_estimate: Option<u64>,
    /// Peak VRAM the worker measured, bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vram_peak: Option<u64>,
    /// GPU-seconds used so far (sum over runs of GPUs × wall time).
    #[serde(default)]
    pub gpu_seconds: f64,
    /// The schedule that queued this job, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule_id: Option<u64>,
    /// The Ollama model this job published, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub published: Option<PublishedModel>,
    /// Who put this queued job on hold (it does not start until released).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub held_by: Option<String>,
    /// The end of the job its `[notify]` command last ran for (a job may end again after a
    /// requeue); an end it asks to hear of that differs is still to be notified.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notified: Option<JobEnd>,
    /// The `[notify]` command running now, to find it again after a daemon crash.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notifier: Option<NotifierRun>,
    /// The sweep this job is one of (`jobctl submit --sweep`), and its values there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sweep: Option<super::sweep::SweepMember>,
    /// Number of events recorded; the next event's sequence number.
    #[serde(default)]
    pub event_count: u32,
}

/// One end of a job: the state it ended in, and when.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobEnd {
    pub state: JobState,
    pub finished_at: Millis,
}

/// A `[notify]` command started for an end of its job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NotifierRun {
    pub end: JobEnd,
    pub process: ProcessInfo,
    /// When it started (its timeout counts from then).
    pub started_at: Millis,
}

/// A model published into an Ollama store.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PublishedModel {
    /// As `ollama list` shows it.
    pub name: String,
    /// `ollama run NAME`.
    pub run_command: String,
    /// `sha256:...` of the manifest (Ollama's ID is its first 12 hex digits).
    pub manifest_digest: String,
    pub gguf_bytes: u64,
    pub quantization: String,
    pub models_dir: PathBuf,
    /// What of the model the GGUF does not carry (Qwen's NFC normalizer), if anything.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_exported: Option<String>,
}

/// Resources given to a run.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Placement {
    /// GPUs (may be empty for CPU jobs).
    pub gpus: Vec<GpuSlot>,
    /// VRAM reserved on each GPU, bytes.
    pub vram_per_gpu: u64,
    /// The job has its GPUs to itself (command jobs with `vram = "auto"`).
    #[serde(default)]
    pub exclusive: bool,
}

/// One GPU of a placement.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuSlot {
    pub index: u32,
    pub uuid: String,
}

/// The worker process of a run, enough to find it again after a daemon crash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessInfo {
    pub pid: i32,
    /// Process group (equal to `pid`: each job leads its own group).
    pub pgid: i32,
    /// Start time of `pid` in clock ticks since boot (`/proc/PID/stat` field 22), to tell our
    /// process from a later one that reused the pid.
    pub start_ticks: u64,
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitInfo {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
}

impl std::fmt::Display for ExitInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.code, self.signal) {
            (Some(c), _) => write!(f, "exit code {c}"),
            (None, Some(s)) => {
                let name = nix::sys::signal::Signal::try_from(s)
                    .map(|s| s.as_str().to_string())
                    .unwrap_or_else(|_| format!("signal {s}"));
                write!(f, "killed by {name}")
            }
            (None, None) => f.write_str("ended without a recorded exit status (killed?)"),
        }
    }
}

/// Why a running worker is being stopped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum StopKind {
    /// A user cancelled the job.
    Cancel { by: String },
    /// A higher-priority job needs the resources; requeue after.
    Preempt { for_job: JobId },
    /// The daemon is shutting down; requeue at next start.
    Shutdown,
    /// The run reached `resources.time_limit`; the job fails.
    TimeLimit,
    /// The run showed no sign of life for `resources.stall_timeout`; retried as a failure.
    Stalled,
    /// jobd cannot keep the run where it is (`why`: its GPU left the inventory when the
    /// daemon's configuration changed); requeued after, as a preemption is.
    Requeue { why: String },
}

/// One entry of a job's history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobEvent {
    pub seq: u32,
    pub at: Millis,
    pub state: JobState,
    pub reason: String,
}

impl JobRecord {
    /// A newly queued job (the store assigns the id).
    pub fn new_queued(
        owner: Owner,
        name: String,
        spec: JobSpec,
        source: String,
        now: Millis,
    ) -> JobRecord {
        JobRecord {
            v: RECORD_VERSION,
            id: 0,
            name,
            owner,
            kind: spec.kind,
            priority: spec.priority,
            state: JobState::Queued,
            spec,
            source,
            source_path: None,
            submitted_at: now,
            updated_at: now,
            queued_at: now,
            started_at: None,
            finished_at: None,
            attempts: 0,
            retries: 0,
            unrequested_requeues: 0,
            not_before: None,
            placement: None,
            process: None,
            exit: None,
            reason: None,
            stop: None,
            stop_at: None,
            held_by: None,
            vram_estimate: None,
            vram_peak: None,
            gpu_seconds: 0.0,
            schedule_id: None,
            published: None,
            notified: None,
            notifier: None,
            sweep: None,
            event_count: 0,
        }
    }

    /// How and when the job ended, if it has (succeeded, failed or cancelled).
    pub fn end(&self) -> Option<JobEnd> {
        let ended = matches!(
            self.state,
            JobState::Succeeded | JobState::Failed | JobState::Cancelled
        );
        ended
            .then_some(self.finished_at)
            .flatten()
            .map(|finished_at| JobEnd {
                state: self.state,
                finished_at,
            })
    }

    /// The job's directory under the daemon's state directory.
    pub fn dir(&self, jobs_root: &std::path::Path) -> PathBuf {
        jobs_root.join(self.id.to_string())
    }
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}
