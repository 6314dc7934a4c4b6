//! Wire types of the HTTP API `/api/v1`, shared by the daemon (`api`) and `jobctl` (`client`).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::contract::Progress;
use super::job::JobKind;
use super::record::{JobEvent, JobRecord};
use super::state::JobState;
use super::toml_source::Problem;
use super::{JobId, Millis};

/// API version prefix.
pub const PREFIX: &str = "/api/v1";

/// Response header of `GET /jobs/{id}/logs`: the byte offset in the log where the body starts.
pub const LOG_OFFSET_HEADER: &str = "x-jobd-log-offset";

/// `POST /api/v1/jobs`: submit a job file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubmitRequest {
    /// The job file's text.
    pub toml: String,
    /// Directory relative paths resolve against (the job file's directory). Without it,
    /// relative paths are refused.
    #[serde(default)]
    pub base_dir: Option<PathBuf>,
    /// Path of the job file, for messages and `jobctl show`.
    #[serde(default)]
    pub source_path: Option<PathBuf>,
    /// Queue it on hold: it does not start until released (`jobctl submit --hold`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub hold: bool,
}

/// `POST /api/v1/jobs/{id}/resubmit`: job `id`'s file again, as a new job of the caller.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResubmitRequest {
    /// Changes to the file, as `jobctl --set KEY=VALUE` takes them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub set: Vec<String>,
    /// Queue it on hold.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub hold: bool,
}

/// `POST /api/v1/sweeps`: a job file and the keys to sweep; one job is queued for every
/// combination of their values (`jobctl submit --sweep`), all or none.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SweepRequest {
    /// The job file (with any `--set` changes already made), as for `POST /jobs`; `hold`
    /// holds every job.
    pub job: SubmitRequest,
    /// The swept keys and their values (as TOML value texts, `"3e-4"`, `"\"q_proj\""`), the
    /// first varying slowest.
    pub sweep: Vec<super::sweep::SweepAxis>,
}

/// `GET /api/v1/sweeps/{id}` (and the answer to `POST /sweeps`): a sweep's jobs side by side.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SweepView {
    /// The sweep's id: its first job's.
    pub id: JobId,
    /// The swept keys, in the order they were given.
    pub keys: Vec<String>,
    /// Its jobs in order (those not cleaned away).
    pub jobs: Vec<SweepJobView>,
}

/// One job of a sweep, with what it reached: what a side-by-side table needs (not the job's
/// file and spec, which a sweep of big files would repeat hundreds of times).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SweepJobView {
    pub id: JobId,
    pub name: String,
    /// Its owner's user name.
    pub owner: String,
    pub kind: JobKind,
    pub state: JobState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub held_by: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit: Option<super::record::ExitInfo>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Its place and values in the sweep (values that may be secrets hidden from others).
    pub sweep: super::sweep::SweepMember,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<Progress>,
    /// The Ollama model it published.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub published: Option<String>,
    /// What its `metrics.jsonl` says (train jobs, once they logged a step).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<TrainResult>,
}

impl SweepJobView {
    /// The row of a job of a sweep (`None` for a job of none), from the job as the caller
    /// may see it.
    pub fn of(job: JobView, result: Option<TrainResult>) -> Option<SweepJobView> {
        let r = job.record;
        Some(SweepJobView {
            id: r.id,
            name: r.name,
            owner: r.owner.user,
            kind: r.kind,
            state: r.state,
            held_by: r.held_by,
            exit: r.exit,
            reason: r.reason,
            sweep: r.sweep?,
            progress: job.progress,
            published: r.published.map(|p| p.name),
            result,
        })
    }
}

/// A train job's results so far, from its newest `metrics.jsonl` records.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainResult {
    /// The last logged step.
    pub step: u64,
    /// Training loss at the last logged step.
    pub loss: f64,
    /// The last evaluation loss, if it evaluated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_loss: Option<f64>,
    /// The lowest evaluation loss and its step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub best_eval_loss: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub best_eval_step: Option<u64>,
}

impl TrainResult {
    /// The result the records say (each a `metrics.jsonl` object, oldest first); `None`
    /// before the first logged step.
    pub fn from_records(records: &[serde_json::Value]) -> Option<TrainResult> {
        TrainResult::fold(None, records)
    }

    /// `before` (the result of the records before these), brought up to date with `records`.
    pub fn fold(before: Option<TrainResult>, records: &[serde_json::Value]) -> Option<TrainResult> {
        let number = |r: &serde_json::Value, k: &str| r.get(k).and_then(serde_json::Value::as_f64);
        let step = |r: &serde_json::Value| r.get("step").and_then(serde_json::Value::as_u64);
        let mut result = before;
        for r in records {
            let Some(s) = step(r) else { continue };
            if let Some(loss) = number(r, "loss") {
                let prev = result.take();
                result = Some(TrainResult {
                    step: s,
                    loss,
                    ..prev.unwrap_or(TrainResult {
                        step: s,
                        loss,
                        eval_loss: None,
                        best_eval_loss: None,
                        best_eval_step: None,
                    })
                });
            }
            if let (Some(eval), Some(res)) = (number(r, "eval_loss"), result.as_mut()) {
                res.eval_loss = Some(eval);
                if res.best_eval_loss.is_none_or(|b| eval < b) {
                    res.best_eval_loss = Some(eval);
                    res.best_eval_step = Some(s);
                }
            }
        }
        result
    }
}

/// A job as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobView {
    #[serde(flatten)]
    pub record: JobRecord,
    /// Latest progress a train worker reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<Progress>,
    /// Why a queued job is not running yet (short form of `explain`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting: Option<String>,
    /// The job's directory on the daemon's machine (outputs, logs, checkpoints).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_dir: Option<PathBuf>,
    /// Secrets in the job file (environment values, a notifier's arguments) are hidden from
    /// this caller, and so is the file's text.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub redacted: bool,
}

/// `GET /api/v1/models` entry: a model in the daemon's Ollama store, as `ollama list` shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelView {
    pub name: String,
    pub id: String,
    pub size: u64,
    pub modified: Millis,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parameter_size: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quantization: Option<String>,
}

/// `GET /api/v1/models` answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelsResponse {
    pub models_dir: Option<PathBuf>,
    pub models: Vec<ModelView>,
}

/// `GET /api/v1/jobs` query.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    /// Only jobs in these states (comma separated).
    #[serde(default)]
    pub state: Option<String>,
    /// Only jobs of this user.
    #[serde(default)]
    pub owner: Option<String>,
    /// Only the caller's jobs.
    #[serde(default)]
    pub mine: Option<bool>,
    /// Include finished jobs (default: only queued and active ones, unless `state` is given).
    #[serde(default)]
    pub all: Option<bool>,
    /// Jobs with an id below this (newest first), for the next page.
    #[serde(default)]
    pub before: Option<JobId>,
    /// Page size (default 100, at most 1000).
    #[serde(default)]
    pub limit: Option<usize>,
}

/// `POST /api/v1/jobs/clean`: remove finished jobs (record, history, job directory).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CleanRequest {
    /// Only jobs that finished at least this long ago; default: every finished job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub older_than: Option<super::units::HumanDuration>,
    /// This user's jobs (another user's: admins only); default: the caller's own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// Every user's finished jobs (admins only).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub all_users: bool,
}

/// What `POST /api/v1/jobs/clean` did.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CleanResponse {
    /// Jobs removed.
    pub removed: Vec<JobId>,
    /// Finished jobs that matched but are still needed, and why.
    pub kept: Vec<KeptJob>,
}

/// A finished job kept by a clean.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KeptJob {
    pub id: JobId,
    pub why: String,
}

/// `GET /api/v1/jobs` answer: newest first.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ListResponse {
    pub jobs: Vec<JobView>,
    /// Pass as `before` to get the next page; absent on the last page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_before: Option<JobId>,
    /// Number of jobs matching the filter.
    pub total: usize,
}

/// `GET /api/v1/jobs/{id}/events` answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EventsResponse {
    pub events: Vec<JobEvent>,
}

/// `POST /api/v1/jobs/{id}/priority` body.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PriorityRequest {
    /// Wider than a job's `i32` so that any integer gets the range message rather than a
    /// JSON type error.
    pub priority: i64,
}

/// A change pushed on event streams: the job after the change and the event that made it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobChange {
    pub job: JobView,
    pub event: Option<JobEvent>,
}

/// `GET /api/v1/queue` query: the dashboard's queue page. Filters as `GET /jobs`, plus a sort
/// key and an offset (pages of any sort order, not just newest first).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueueQuery {
    /// Only jobs in these states (comma separated).
    #[serde(default)]
    pub state: Option<String>,
    /// Only jobs of this user.
    #[serde(default)]
    pub owner: Option<String>,
    /// Only the caller's jobs.
    #[serde(default)]
    pub mine: Option<bool>,
    /// Include finished jobs (default: only queued and active ones, unless `state` is given).
    #[serde(default)]
    pub all: Option<bool>,
    /// Sort key (see [`QueueSort`]); default `id`.
    #[serde(default)]
    pub sort: Option<QueueSort>,
    /// `asc` or `desc`; default: [`QueueSort::default_order`] (newest, highest priority, most
    /// GPUs and VRAM, oldest first; names and states A to Z).
    #[serde(default)]
    pub order: Option<SortOrder>,
    /// Skip this many matching jobs.
    #[serde(default)]
    pub offset: Option<usize>,
    /// Page size (default 50, at most 1000).
    #[serde(default)]
    pub limit: Option<usize>,
}

/// What `GET /api/v1/queue` sorts by; ties are broken by id, newest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QueueSort {
    Id,
    Name,
    State,
    Owner,
    Priority,
    Kind,
    Gpus,
    Vram,
    /// Time since submission.
    Age,
}

impl QueueSort {
    /// The order used when the query names none: what a person expects on first click.
    pub fn default_order(self) -> SortOrder {
        match self {
            QueueSort::Id
            | QueueSort::Priority
            | QueueSort::Gpus
            | QueueSort::Vram
            | QueueSort::Age => SortOrder::Desc,
            QueueSort::Name | QueueSort::State | QueueSort::Owner | QueueSort::Kind => {
                SortOrder::Asc
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SortOrder {
    Asc,
    Desc,
}

/// `GET /api/v1/queue` answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct QueueResponse {
    pub jobs: Vec<JobSummary>,
    /// Number of jobs matching the filter.
    pub total: usize,
    pub offset: usize,
    /// Every job in the daemon by state (not just the filtered ones).
    pub counts: Vec<(JobState, usize)>,
}

/// One row of the dashboard's queue: what a person scans for, without the job file and spec
/// (a page of 50 stays a few kilobytes).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobSummary {
    pub id: JobId,
    pub name: String,
    pub owner: String,
    pub kind: JobKind,
    pub state: JobState,
    pub priority: i32,
    /// GPUs asked for (0: a CPU job).
    pub gpus: u32,
    /// Indices of the GPUs the job holds now.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gpu_indices: Vec<u32>,
    /// VRAM per GPU: reserved while placed, else what it needs (request or estimate); absent
    /// for CPU jobs and whole-card jobs (`whole_gpu`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vram_per_gpu: Option<u64>,
    /// The job takes whole GPUs.
    #[serde(default)]
    pub whole_gpu: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<Progress>,
    /// Why a queued job is not running yet (short form of `explain`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting: Option<String>,
    /// The last event's reason.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub submitted_at: Millis,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<Millis>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<Millis>,
    pub attempts: u32,
    /// A cancel or preemption is in progress.
    #[serde(default)]
    pub stopping: bool,
    /// The sweep the job is one of (its id).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sweep: Option<JobId>,
}

/// Server-sent events of `GET /api/v1/stream` (the dashboard's live queue) and
/// `GET /api/v1/jobs/{id}/stream` (one job's page). Each message is `event: NAME` with one
/// JSON `data:` line. Both streams are read-only: anonymous callers may follow them where the
/// daemon allows anonymous reads; the caller's identity only decides what is redacted.
pub mod stream {
    use serde::{Deserialize, Serialize};

    use super::{JobId, JobState, Progress};

    /// `/stream`: [`super::GpusResponse`], first and whenever it changes.
    pub const GPUS: &str = "gpus";
    /// `/stream`: [`QueueChanged`], first and whenever jobs or their waiting reasons changed:
    /// refetch the page of `/queue` on show.
    pub const QUEUE: &str = "queue";
    /// Both: [`ProgressUpdate`] when a running train job's `progress.json` changes.
    pub const PROGRESS: &str = "progress";
    /// `/jobs/{id}/stream`: the [`super::JobView`], first and after each change.
    pub const JOB: &str = "job";
    /// `/jobs/{id}/stream`: every [`crate::spec::JobEvent`] of the job, oldest first, then
    /// each new one.
    pub const EVENT: &str = "event";
    /// `/jobs/{id}/stream`: [`MetricsUpdate`]: the metrics so far, then new records.
    pub const METRICS: &str = "metrics";
    /// `/jobs/{id}/stream`: the job's checkpoints ([`CheckpointView`] list), first and when
    /// they change.
    pub const CHECKPOINTS: &str = "checkpoints";

    /// Data of [`QUEUE`].
    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    pub struct QueueChanged {
        /// Every job by state.
        pub counts: Vec<(JobState, usize)>,
    }

    /// Data of [`PROGRESS`].
    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    pub struct ProgressUpdate {
        pub id: JobId,
        pub progress: Progress,
    }

    /// Data of [`METRICS`].
    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    pub struct MetricsUpdate {
        /// Replace what was received so far (first message, or `metrics.jsonl` was rewritten
        /// after a resume); else append.
        pub reset: bool,
        /// `metrics.jsonl` records (step, epoch, loss, learning_rate, ...), oldest first.
        pub records: Vec<serde_json::Value>,
    }

    /// One `checkpoint-<step>/` directory of a job.
    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    pub struct CheckpointView {
        pub name: String,
        pub step: u64,
        /// Sum of the sizes of its files.
        pub bytes: u64,
        /// Modification time, ms since the epoch.
        pub modified: crate::spec::Millis,
    }
}

/// `GET /api/v1/gpus` entry.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GpuView {
    pub index: u32,
    pub uuid: String,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pci_bus_id: Option<String>,
    pub total_bytes: u64,
    /// Free memory as the driver reports it (or the fake inventory simulates it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub free_bytes: Option<u64>,
    /// Used by processes jobd does not own.
    pub foreign_bytes: u64,
    /// Reserved by jobd jobs.
    pub reserved_bytes: u64,
    /// Jobs placed on this GPU with their reservation.
    pub jobs: Vec<GpuJob>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compute_capability: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub utilization_percent: Option<u32>,
    /// Excluded by the daemon's allow-list.
    #[serde(default)]
    pub excluded: bool,
}

/// A job's reservation on a GPU.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GpuJob {
    pub id: JobId,
    pub name: String,
    pub owner: String,
    pub reserved_bytes: u64,
}

/// `GET /api/v1/gpus` answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GpusResponse {
    /// "nvml", "fake" or "none".
    pub source: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub driver_version: Option<String>,
    /// Why there are no real GPUs, when there are none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    pub gpus: Vec<GpuView>,
}

/// `GET /api/v1/health` answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Health {
    pub status: String,
    pub version: String,
    pub started_at: Millis,
    pub counts: Vec<(JobState, usize)>,
}

/// `GET /api/v1/whoami` answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Whoami {
    /// None for an anonymous (read-only) TCP caller.
    pub user: Option<String>,
    pub uid: Option<u32>,
    pub admin: bool,
    pub can_submit: bool,
    /// The caller's limits and where they stand (none for an anonymous caller).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<LimitsView>,
}

/// A user's `[scheduler.limits]` and their use of them, so they need not be refused to learn
/// them (Slurm users read theirs with `sacctmgr show assoc`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LimitsView {
    /// Most jobs running at once (none: no limit).
    pub max_running: Option<u32>,
    /// Most GPUs held at once.
    pub max_gpus: Option<u32>,
    /// Most VRAM reserved at once, in bytes.
    pub max_vram: Option<u64>,
    /// Most unfinished jobs at once.
    pub max_submitted: u32,
    /// Where `max_submitted` is set: `[scheduler.limits.USER]`, `[scheduler.limits.default]`
    /// or `built-in`.
    pub max_submitted_set_in: String,
    /// The user's unfinished jobs now (every state but succeeded, failed and cancelled).
    pub unfinished: u32,
    /// The user's jobs starting or running now.
    pub running: u32,
}

/// Error body of every 4xx/5xx answer: `{"error": {"code": .., "message": ..}}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorDetail {
    /// Stable machine-readable code, e.g. `not_found`, `invalid_job`, `forbidden`.
    pub code: String,
    pub message: String,
    /// For `invalid_job`: each located problem in the job file.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub problems: Vec<Problem>,
}

/// A recurring schedule as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ScheduleView {
    #[serde(flatten)]
    pub record: super::schedule::ScheduleRecord,
    /// State of the job the last firing queued.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_state: Option<JobState>,
}

/// `GET /api/v1/schedules` answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SchedulesResponse {
    pub schedules: Vec<ScheduleView>,
}

#[cfg(test)]
mod tests {
    use super::TrainResult;

    #[test]
    fn a_train_result_is_the_last_step_and_the_best_evaluation() {
        let records: Vec<serde_json::Value> = [
            r#"{"step": 10, "loss": 3.0, "eval_loss": 2.9}"#,
            r#"{"step": 20, "loss": 2.0, "eval_loss": 1.5}"#,
            r#"{"step": 30, "loss": 1.0, "eval_loss": 1.7}"#,
            r#"{"step": 35, "loss": 0.9}"#,
            // What is no record (a line cut short, a foreign object) is passed over.
            r#"{"note": "x"}"#,
        ]
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
        assert_eq!(
            TrainResult::from_records(&records),
            Some(TrainResult {
                step: 35,
                loss: 0.9,
                eval_loss: Some(1.7),
                best_eval_loss: Some(1.5),
                best_eval_step: Some(20),
            })
        );
        // Read in two parts (a page refreshed while the job logs), the same result.
        let first = TrainResult::from_records(&records[..2]);
        assert_eq!(
            TrainResult::fold(first, &records[2..]),
            TrainResult::from_records(&records)
        );
        let no_eval = TrainResult::from_records(&records[3..]).unwrap();
        assert_eq!((no_eval.eval_loss, no_eval.best_eval_step), (None, None));
        assert_eq!(TrainResult::from_records(&records[4..]), None);
        assert_eq!(TrainResult::from_records(&[]), None);
    }
}
