//! Job states and the legal transitions between them.
//!
//! ```text
//!            submit
//!              │
//!              ▼       cancel           dependency failed / never placeable
//!  ┌──────▶ queued ─────────────▶ cancelled        queued ──▶ failed
//!  │           │ dispatch
//!  │           ▼
//!  │       starting ──▶ failed (spawn error)       starting ──▶ cancelled | interrupted
//!  │           │ spawned
//!  │           ▼
//!  │        running ──▶ succeeded | failed | cancelled
//!  │           │ preempted, daemon stop or restart
//!  │           ▼
//!  └──── interrupted
//!  (running ──▶ queued: retry by exit code;  failed | cancelled ──▶ queued: requeue by hand)
//! ```
//! Only the scheduler (`sched`) causes transitions; the store refuses illegal ones.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Where a job is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    /// Waiting for resources, a dependency or a backoff to pass.
    Queued,
    /// Placed on resources; the worker process is being set up.
    Starting,
    /// The worker process is alive.
    Running,
    /// A train job's model is being written into the Ollama store.
    Publishing,
    /// Finished with exit status 0 (and, for train jobs, all planned steps done).
    Succeeded,
    /// Finished unsuccessfully, or could never run.
    Failed,
    /// Stopped on a user's request.
    Cancelled,
    /// Stopped by preemption or a daemon restart; goes back to `queued` to resume.
    Interrupted,
}

impl JobState {
    pub const ALL: [JobState; 8] = [
        JobState::Queued,
        JobState::Starting,
        JobState::Running,
        JobState::Publishing,
        JobState::Succeeded,
        JobState::Failed,
        JobState::Cancelled,
        JobState::Interrupted,
    ];

    /// No further transition happens on its own from a terminal state.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobState::Succeeded | JobState::Failed | JobState::Cancelled
        )
    }

    /// The job holds resources (GPUs, a CPU slot) in this state.
    pub fn holds_resources(self) -> bool {
        matches!(self, JobState::Starting | JobState::Running)
    }

    /// Is `self -> to` a legal transition?
    pub fn can_become(self, to: JobState) -> bool {
        use JobState::*;
        matches!(
            (self, to),
            (Queued, Starting | Cancelled | Failed)
                | (Starting, Running | Failed | Cancelled | Interrupted)
                | (
                    Running,
                    Publishing | Succeeded | Failed | Cancelled | Interrupted | Queued
                )
                | (Publishing, Succeeded | Failed | Interrupted)
                | (Interrupted, Queued | Cancelled)
                | (Failed | Cancelled, Queued)
                // A train job whose publishing failed, published by hand afterwards.
                | (Failed, Succeeded)
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Starting => "starting",
            JobState::Running => "running",
            JobState::Publishing => "publishing",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
            JobState::Interrupted => "interrupted",
        }
    }
}

impl fmt::Display for JobState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for JobState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        JobState::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| {
                let names: Vec<_> = JobState::ALL.iter().map(|s| s.as_str()).collect();
                format!("unknown state {s:?} (one of {})", names.join(", "))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::JobState::*;
    use super::*;

    #[test]
    fn terminal_states_only_leave_by_requeue() {
        for from in [Succeeded, Failed, Cancelled] {
            for to in JobState::ALL {
                let allowed = from.can_become(to);
                // Besides a requeue: a failed publish done again by hand.
                let by_hand = from == Failed && to == Succeeded;
                assert_eq!(
                    allowed,
                    (to == Queued && from != Succeeded) || by_hand,
                    "{from} -> {to}"
                );
            }
        }
    }

    #[test]
    fn lifecycle_of_the_issue_is_legal() {
        let path = [
            Queued,
            Starting,
            Running,
            Interrupted,
            Queued,
            Starting,
            Running,
            Succeeded,
        ];
        for w in path.windows(2) {
            assert!(w[0].can_become(w[1]), "{} -> {}", w[0], w[1]);
        }
        assert!(!Queued.can_become(Running));
        assert!(!Queued.can_become(Succeeded));
    }

    #[test]
    fn parses_names() {
        assert_eq!("running".parse::<JobState>().unwrap(), Running);
        assert!("runing".parse::<JobState>().unwrap_err().contains("one of"));
    }
}
