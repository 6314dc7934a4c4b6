//! `max_submitted`: the most unfinished jobs one user may have at once (Slurm's
//! `MaxSubmitJobs`). Checked before a submit, a sweep, a requeue or a schedule's firing adds
//! jobs, so that a runaway submit loop cannot fill the store; jobs already queued are never
//! touched by it (a lowered limit only refuses new ones).
//!
//! The count per owner is kept as the job map changes (every change goes through
//! `Scheduler::note_change`, every removal through `clean`), so a check is one map lookup
//! however many jobs the daemon holds.

use std::collections::{BTreeMap, HashMap};

use super::{SchedError, Scheduler};
use crate::config::SubmitLimit;
use crate::spec::{JobId, JobRecord};

/// Unfinished jobs (every state but succeeded, failed and cancelled) per owner.
#[derive(Debug, Default)]
pub(super) struct Unfinished {
    by_owner: HashMap<String, u32>,
}

impl Unfinished {
    /// Counts the jobs of a freshly loaded store.
    pub(super) fn count(jobs: &BTreeMap<JobId, JobRecord>) -> Unfinished {
        let mut u = Unfinished::default();
        for job in jobs.values() {
            u.replace(None, job);
        }
        u
    }

    /// A job changed from `old` (absent: a new job) to `new`.
    pub(super) fn replace(&mut self, old: Option<&JobRecord>, new: &JobRecord) {
        if let Some(old) = old {
            self.remove(old);
        }
        if !new.state.is_terminal() {
            *self.by_owner.entry(new.owner.user.clone()).or_default() += 1;
        }
    }

    /// A job left the map (`clean`).
    pub(super) fn remove(&mut self, job: &JobRecord) {
        if job.state.is_terminal() {
            return;
        }
        if let Some(n) = self.by_owner.get_mut(&job.owner.user) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.by_owner.remove(&job.owner.user);
            }
        }
    }

    /// How many unfinished jobs `user` has.
    pub(super) fn of(&self, user: &str) -> u32 {
        self.by_owner.get(user).copied().unwrap_or(0)
    }
}

/// A submit refused because it would take its owner past `max_submitted`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitReached {
    pub user: String,
    /// Unfinished jobs the user has now.
    pub unfinished: u32,
    /// Jobs the refused request would have added (a sweep's size; else 1).
    pub adding: u32,
    pub limit: SubmitLimit,
}

impl std::fmt::Display for LimitReached {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let LimitReached {
            user,
            unfinished,
            adding,
            limit,
        } = self;
        let jobs = |n: u32| if n == 1 { "job" } else { "jobs" };
        if *adding > limit.max {
            // No wait or cancel makes room for it: only a smaller request can pass.
            write!(
                f,
                "a sweep of {adding} jobs is more than {} allows {user} at once ({}): split it \
                 into sweeps of at most {} jobs",
                limit.source, limit.max, limit.max
            )
        } else if *unfinished < limit.max {
            // Only a request of several jobs can fail while there is still room for one.
            write!(
                f,
                "these {adding} jobs would bring {user} to {} unfinished jobs ({unfinished} now); \
                 {} allows {}: submit fewer at once, or wait for some to finish or cancel some",
                u64::from(*unfinished) + u64::from(*adding),
                limit.source,
                limit.max
            )
        } else {
            write!(
                f,
                "{user} has {unfinished} unfinished {}; {} allows {}: wait for some to finish \
                 or cancel some",
                jobs(*unfinished),
                limit.source,
                limit.max
            )
        }
    }
}

impl Scheduler {
    /// Refuses `adding` more unfinished jobs for `user` when they would take the user past
    /// their `max_submitted`.
    pub(super) fn check_submit_limit(&self, user: &str, adding: usize) -> Result<(), SchedError> {
        let limit = self.settings.policy.submit_limit(user);
        let unfinished = self.unfinished.of(user);
        let adding = u32::try_from(adding).unwrap_or(u32::MAX);
        if u64::from(unfinished) + u64::from(adding) <= u64::from(limit.max) {
            return Ok(());
        }
        Err(SchedError::TooManyJobs(LimitReached {
            user: user.to_string(),
            unfinished,
            adding,
            limit,
        }))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;
    use crate::config::{
        DEFAULT_MAX_SUBMITTED, GpuSource, LimitSource, SchedulerConfig, UserLimits,
    };
    use crate::gpu::Inventory;
    use crate::spec::sweep::SweepValue;
    use crate::spec::{Caller, JobState, Owner};
    use crate::store::Store;

    use super::super::{SchedSettings, Submission};

    const COMMAND: &str = "kind = \"command\"\n[command]\nargv = [\"true\"]\n";

    /// A scheduler over an empty store in `dir`, with no GPUs, never run: jobs stay where
    /// the calls below put them.
    async fn scheduler(dir: &std::path::Path, policy: SchedulerConfig) -> Scheduler {
        let store = Store::open(&dir.join("store")).unwrap();
        let settings = SchedSettings::for_tests(dir, policy);
        let (s, _handle) = Scheduler::start(store, Inventory::open(&GpuSource::None), settings)
            .await
            .unwrap();
        s
    }

    fn limited(default: Option<u32>, users: &[(&str, u32)]) -> SchedulerConfig {
        SchedulerConfig {
            default_limits: UserLimits {
                max_submitted: default,
                ..Default::default()
            },
            user_limits: users
                .iter()
                .map(|(u, n)| {
                    (
                        u.to_string(),
                        UserLimits {
                            max_submitted: Some(*n),
                            ..Default::default()
                        },
                    )
                })
                .collect(),
            ..Default::default()
        }
    }

    fn caller(user: &str) -> Caller {
        Caller {
            user: Some(user.into()),
            uid: Some(1000),
            admin: false,
            can_submit: true,
        }
    }

    fn owner(user: &str) -> Owner {
        Owner {
            user: user.into(),
            uid: 1000,
        }
    }

    fn submission(hold: bool) -> Submission {
        Submission {
            spec: crate::spec::job::parse("t.toml", COMMAND).unwrap(),
            source: COMMAND.into(),
            source_path: None,
            name: "t".into(),
            hold,
            copy_of: None,
            sweep: None,
        }
    }

    fn submit(s: &mut Scheduler, user: &str) -> Result<JobRecord, SchedError> {
        s.submit(&caller(user), owner(user), submission(false))
    }

    fn sweep(s: &mut Scheduler, user: &str, size: usize) -> Result<Vec<JobRecord>, SchedError> {
        let members = (0..size)
            .map(|i| {
                (
                    submission(false),
                    vec![SweepValue {
                        key: "command.argv".into(),
                        value: i.to_string(),
                    }],
                )
            })
            .collect();
        s.submit_sweep(&caller(user), owner(user), members)
    }

    fn message(r: Result<impl std::fmt::Debug, SchedError>) -> String {
        match r {
            Err(e @ SchedError::TooManyJobs(_)) => e.to_string(),
            other => panic!("expected a refusal for the submit limit, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_submit_past_the_limit_is_refused_until_a_job_ends() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = scheduler(dir.path(), limited(None, &[("alice", 2)])).await;
        let first = submit(&mut s, "alice").unwrap();
        // Held, it still counts: it is queued and will run once released.
        let held = s
            .submit(&caller("alice"), owner("alice"), submission(true))
            .unwrap();
        assert!(held.held_by.is_some());
        let err = message(submit(&mut s, "alice"));
        assert_eq!(
            err,
            "alice has 2 unfinished jobs; [scheduler.limits.alice] max_submitted allows 2: \
             wait for some to finish or cancel some"
        );
        // Another user has their own count (and here the built-in limit).
        submit(&mut s, "bob").unwrap();

        s.cancel(&caller("alice"), first.id).unwrap();
        let third = submit(&mut s, "alice").unwrap();
        message(submit(&mut s, "alice"));

        // A job that finishes frees its place as a cancelled one does.
        for to in [JobState::Starting, JobState::Running, JobState::Succeeded] {
            s.apply(third.id, Some(to), "test".into(), &|_| {}).unwrap();
        }
        submit(&mut s, "alice").unwrap();
        message(submit(&mut s, "alice"));

        // Requeueing the cancelled job would make a third unfinished one.
        message(s.requeue(&caller("alice"), first.id));
        assert_eq!(s.jobs[&first.id].state, JobState::Cancelled);
    }

    #[tokio::test]
    async fn a_sweep_is_queued_whole_or_not_at_all() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = scheduler(dir.path(), limited(Some(5), &[])).await;
        submit(&mut s, "alice").unwrap();
        submit(&mut s, "alice").unwrap();
        let err = message(sweep(&mut s, "alice", 4));
        assert_eq!(
            err,
            "these 4 jobs would bring alice to 6 unfinished jobs (2 now); \
             [scheduler.limits.default] max_submitted allows 5: submit fewer at once, or wait \
             for some to finish or cancel some"
        );
        assert_eq!(s.jobs.len(), 2, "none of the sweep's jobs was queued");
        // A sweep larger than the limit could never pass: it is told to split, not to wait.
        assert_eq!(
            message(sweep(&mut s, "alice", 6)),
            "a sweep of 6 jobs is more than [scheduler.limits.default] max_submitted allows \
             alice at once (5): split it into sweeps of at most 5 jobs"
        );
        assert_eq!(sweep(&mut s, "alice", 3).unwrap().len(), 3);
        assert_eq!(s.unfinished.of("alice"), 5);
        message(submit(&mut s, "alice"));
    }

    #[tokio::test]
    async fn a_schedules_firing_past_the_limit_is_skipped_and_says_why() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = scheduler(dir.path(), limited(Some(1), &[])).await;
        let mut sub = submission(false);
        let text = format!("schedule = \"* * * * *\"\n{COMMAND}");
        sub.spec = crate::spec::job::parse("t.toml", &text).unwrap();
        sub.source = text;
        let sched = s
            .create_schedule(&caller("alice"), owner("alice"), sub)
            .unwrap();
        submit(&mut s, "alice").unwrap();
        let due = s.schedules[&sched.id].next_fire.unwrap();
        s.fire_due(due);
        let after = &s.schedules[&sched.id];
        assert_eq!((after.runs, after.skipped), (0, 1));
        let why = after.last_skip.as_deref().unwrap_or_default();
        assert!(
            why.contains("alice has 1 unfinished job;") && why.contains("allows 1"),
            "{why}"
        );
        assert_eq!(s.jobs.len(), 1, "the firing queued no job");
        // Run now is refused with the same message, rather than queued past the limit.
        let err = s
            .schedule_action(
                &caller("alice"),
                sched.id,
                super::super::ScheduleAction::RunNow,
            )
            .unwrap_err();
        assert!(matches!(err, SchedError::TooManyJobs(_)), "{err}");
    }

    /// The built-in limit applies with nothing configured, names itself as such, and the
    /// count is kept exactly as a full recount would find it. Also measures what the check
    /// costs next to an O(n) recount with 10,000 jobs (printed; run with --nocapture).
    #[tokio::test]
    async fn the_built_in_limit_bounds_a_flood() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = scheduler(dir.path(), SchedulerConfig::default()).await;
        let n = DEFAULT_MAX_SUBMITTED as usize;
        sweep(&mut s, "alice", n).unwrap();
        let err = s.check_submit_limit("alice", 1).unwrap_err();
        match &err {
            SchedError::TooManyJobs(r) => assert_eq!(r.limit.source, LimitSource::BuiltIn),
            other => panic!("{other:?}"),
        }
        assert!(
            err.to_string().starts_with(
                "alice has 10000 unfinished jobs; max_submitted (jobd's built-in default"
            ),
            "{err}"
        );
        message(submit(&mut s, "alice"));

        let rounds = 1000;
        let t = Instant::now();
        for _ in 0..rounds {
            assert!(s.check_submit_limit("alice", 1).is_err());
        }
        let check = t.elapsed() / rounds;
        let t = Instant::now();
        let mut recount = 0;
        for _ in 0..rounds {
            recount = s
                .jobs
                .values()
                .filter(|j| j.owner.user == "alice" && !j.state.is_terminal())
                .count();
        }
        let scan = t.elapsed() / rounds;
        assert_eq!(recount, n);
        assert_eq!(s.unfinished.of("alice") as usize, recount);
        eprintln!("with {n} jobs: limit check {check:?}, O(n) recount {scan:?}");
    }
}
