//! L0: the vocabulary shared by every layer — job files, states, records, wire types and the
//! worker contract. No IO here beyond `stat` calls that check paths a job file names.

pub mod api;
pub mod contract;
pub mod job;
pub mod publish;
pub mod record;
pub mod state;
pub mod toml_source;
pub mod train;
pub mod units;

/// A job's id: a positive number, assigned in submit order, never reused.
pub type JobId = u64;

/// Milliseconds since the Unix epoch.
pub type Millis = i64;

/// Now, in milliseconds since the Unix epoch.
pub fn now_ms() -> Millis {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as Millis)
        .unwrap_or(0)
}

pub use job::{JobKind, JobSpec};
pub use record::{JobEvent, JobRecord, Owner};
pub use state::JobState;
