//! The worker contract: what a job's process is given and what it may leave behind.
//!
//! Every job runs in its own process group with a cleared environment plus the variables
//! below. Its job directory (`JOBD_JOB_DIR`) holds:
//!
//! | file | written by | what |
//! |---|---|---|
//! | `job.toml` | daemon | the job file as submitted |
//! | `spec.json` | daemon | the resolved job spec (absolute paths); `jobd worker` reads it |
//! | `stdout.log`, `stderr.log` | the job | its output, appended across attempts |
//! | `checkpoints/` | the job | `JOBD_CHECKPOINT_DIR`: survives retries and preemption |
//! | `output/` | the job | `JOBD_OUTPUT_DIR`: the result (train jobs: the model) |
//! | `metrics.jsonl` | train worker | one JSON object per logged step |
//! | `progress.json` | train worker | step / planned steps, replaced atomically |
//!
//! Exit codes: `0` success; [`EXIT_PREEMPTED`] "I saved my state after SIGTERM, run me again";
//! anything else is a failure (retried per `[retry]`). On SIGTERM a job should save what it
//! can and exit within the grace period (`JOBD_GRACE_SECONDS`); after it, the whole process
//! group gets SIGKILL.

/// Exit code meaning "stopped on request after checkpointing; requeue me" (BSD `EX_TEMPFAIL`).
pub const EXIT_PREEMPTED: i32 = 75;

/// `PATH` given to jobs that do not set their own.
pub const DEFAULT_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// The job's id.
pub const ENV_JOB_ID: &str = "JOBD_JOB_ID";
/// The job's name (from its job file, or the file's name).
pub const ENV_JOB_NAME: &str = "JOBD_JOB_NAME";
/// The job's directory (see the module docs).
pub const ENV_JOB_DIR: &str = "JOBD_JOB_DIR";
/// Where to save checkpoints; kept across attempts.
pub const ENV_CHECKPOINT_DIR: &str = "JOBD_CHECKPOINT_DIR";
/// Where to put the job's result.
pub const ENV_OUTPUT_DIR: &str = "JOBD_OUTPUT_DIR";
/// 1 for the first run, 2 after the first retry or resume, and so on.
pub const ENV_ATTEMPT: &str = "JOBD_ATTEMPT";
/// Seconds between SIGTERM and SIGKILL.
pub const ENV_GRACE_SECONDS: &str = "JOBD_GRACE_SECONDS";
/// VRAM reserved for the job on each of its GPUs, in bytes (absent for CPU jobs); for whole
/// cards of different sizes, what the smallest of them had free for jobd.
pub const ENV_VRAM_BYTES: &str = "JOBD_VRAM_BYTES";
/// The exit code that means "preempted, requeue me" (`75`).
pub const ENV_PREEMPT_EXIT_CODE: &str = "JOBD_PREEMPT_EXIT_CODE";
/// GPUs given to the job, as UUIDs (comma separated); empty for CPU jobs.
pub const ENV_GPU_UUIDS: &str = "JOBD_GPU_UUIDS";
/// For a job of a sweep (`jobctl submit --sweep`): the sweep's id (its first job's), as
/// Slurm's `SLURM_ARRAY_JOB_ID`. Absent for other jobs.
pub const ENV_SWEEP_ID: &str = "JOBD_SWEEP_ID";
/// For a job of a sweep: its place in it, from 1 (`SLURM_ARRAY_TASK_ID`).
pub const ENV_SWEEP_INDEX: &str = "JOBD_SWEEP_INDEX";
/// For a job of a sweep: how many jobs the sweep has.
pub const ENV_SWEEP_SIZE: &str = "JOBD_SWEEP_SIZE";
/// For a sweep's `[notify]` command run once for the sweep: how many of its jobs succeeded.
pub const ENV_SWEEP_SUCCEEDED: &str = "JOBD_SWEEP_SUCCEEDED";
/// For a sweep's `[notify]` command run once for the sweep: how many of its jobs failed.
pub const ENV_SWEEP_FAILED: &str = "JOBD_SWEEP_FAILED";
/// For a sweep's `[notify]` command run once for the sweep: how many were cancelled.
pub const ENV_SWEEP_CANCELLED: &str = "JOBD_SWEEP_CANCELLED";
/// Set to `1` when the GPUs are simulated (`--gpus fake:...`): the job must run on CPU.
pub const ENV_FAKE_GPUS: &str = "JOBD_FAKE_GPUS";

/// For a `[notify]` command: how the job ended (`succeeded`, `failed`, `cancelled`). Only a
/// notifier has it in its environment (`proc::is_notifier`).
pub const ENV_JOB_STATE: &str = "JOBD_JOB_STATE";
/// For a `[notify]` command: why, as its history says it ("exit code 1", "cancelled by ann").
pub const ENV_JOB_REASON: &str = "JOBD_JOB_REASON";
/// For a `[notify]` command: the last run's exit code, killed by signal N counting as 128 + N
/// (absent when no run ended with one, e.g. a job cancelled while queued).
pub const ENV_EXIT_CODE: &str = "JOBD_EXIT_CODE";
/// For a `[notify]` command: the job's kind (`command` or `train`).
pub const ENV_JOB_KIND: &str = "JOBD_JOB_KIND";
/// For a `[notify]` command: the Ollama model the job published (`ollama run` takes it).
pub const ENV_MODEL: &str = "JOBD_MODEL";

/// File names inside a job directory.
pub mod files {
    pub const JOB_TOML: &str = "job.toml";
    pub const SPEC_JSON: &str = "spec.json";
    pub const STDOUT: &str = "stdout.log";
    pub const STDERR: &str = "stderr.log";
    pub const CHECKPOINTS: &str = "checkpoints";
    pub const OUTPUT: &str = "output";
    pub const METRICS: &str = "metrics.jsonl";
    pub const PROGRESS: &str = "progress.json";
    /// A command job's outcome, written by its supervisor (`jobd run-command`) when the
    /// command ends: [`super::ExitStatus`].
    pub const EXIT_STATUS: &str = "exit-status.json";
    /// What went wrong when a train worker fails: [`super::WorkerError`].
    pub const WORKER_ERROR: &str = "worker-error.json";
    /// What the job's `[notify]` command printed (stdout and stderr), each run after a
    /// header line.
    pub const NOTIFY_LOG: &str = "notify.log";
    /// The most jobd reads of a small status file a job writes (progress, exit status,
    /// worker error): a bigger one is ignored, as the owner could make it any size.
    pub const MAX_STATUS_BYTES: u64 = 64 << 10;
    /// The most of `metrics.jsonl` jobd serves at once: its newest records.
    pub const MAX_METRICS_BYTES: u64 = 32 << 20;
    /// The longest line of `metrics.jsonl` taken for a record (a worker's are ~300 bytes).
    pub const MAX_METRICS_LINE_BYTES: usize = 16 << 10;
}

/// A train worker's failure, left in [`files::WORKER_ERROR`] before it exits 1: the daemon
/// makes it the job's failure reason, so `jobctl show`/`list` say what went wrong without
/// the log.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct WorkerError {
    /// `JOBD_ATTEMPT` of the run that failed.
    pub attempt: u32,
    pub message: String,
}

/// How a command job's attempt ended, left in [`files::EXIT_STATUS`] by the process that
/// supervises it, so that a daemon that was down when it ended still learns the outcome
/// instead of running the command again.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ExitStatus {
    /// `JOBD_ATTEMPT` of the run this describes.
    pub attempt: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
    /// When it ended (Unix ms). Absent in files written before it was recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_at: Option<super::Millis>,
}

/// Progress a worker reports in `progress.json` (replaced atomically), read by the daemon.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Progress {
    /// Optimizer steps completed.
    pub step: u64,
    /// Steps planned in total.
    pub total_steps: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss: Option<f64>,
    /// Peak device memory measured by the worker, bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peak_memory_bytes: Option<u64>,
    /// Current stage, e.g. "tokenizing", "training", "saving".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stage: Option<String>,
}
