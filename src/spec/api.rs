//! Wire types of the HTTP API `/api/v1`, shared by the daemon (`api`) and `jobctl` (`client`).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::contract::Progress;
use super::record::{JobEvent, JobRecord};
use super::state::JobState;
use super::toml_source::Problem;
use super::{JobId, Millis};

/// API version prefix.
pub const PREFIX: &str = "/api/v1";

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
    pub priority: i32,
}

/// A change pushed on event streams: the job after the change and the event that made it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobChange {
    pub job: JobView,
    pub event: Option<JobEvent>,
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
