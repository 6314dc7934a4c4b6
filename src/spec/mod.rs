//! L0: the vocabulary shared by every layer — job files, states, records, wire types and the
//! worker contract. No IO here beyond `stat` calls that check paths a job file names.

pub mod api;
pub mod contract;
pub mod job;
pub mod notify;
pub mod publish;
pub mod record;
pub mod schedule;
pub mod state;
pub mod sweep;
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

/// Who is asking: established by the API layer (peer uid on the unix socket, bearer token on
/// TCP) and checked by the scheduler before any change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// User name; `None` for an anonymous TCP reader.
    pub user: Option<String>,
    pub uid: Option<u32>,
    /// May change any job.
    pub admin: bool,
    /// May submit jobs (a root daemon: any known user; otherwise itself and trusted users).
    pub can_submit: bool,
}

impl Caller {
    /// May this caller change a job owned by `owner`?
    pub fn may_change(&self, owner: &str) -> bool {
        self.admin || self.user.as_deref() == Some(owner)
    }
}

pub use job::{JobKind, JobSpec};
pub use record::{JobEvent, JobRecord, Owner};
pub use state::JobState;
