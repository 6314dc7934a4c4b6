//! `[notify]`: a command jobd runs when a job ends (pueue's callbacks, Slurm's
//! `--mail-type=END,FAIL`): run directly (no shell), as the job's owner, in the job's directory,
//! with what happened in `JOBD_*` variables, e.g. to post to a chat webhook or ntfy.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::state::JobState;
use super::toml_source::Issue;
use super::units::HumanDuration;

/// The longest `[notify] timeout` may be: a notifier is a short call, not a second job.
pub const MAX_TIMEOUT_SECS: u64 = 600;

/// `[notify]`: what to run when the job ends, and on which ends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NotifySpec {
    /// Program and arguments, run directly (no shell). A relative program path with a `/`
    /// resolves against the job file's directory; a bare name is looked up in `PATH`
    /// (`/usr/local/bin:/usr/bin:/bin`).
    pub argv: Vec<String>,
    /// The ends to notify: any of "succeeded", "failed", "cancelled" (default: all three).
    /// A run that is retried, preempted or interrupted has not ended.
    #[serde(default = "every_end")]
    pub on: Vec<NotifyOn>,
    /// How long the command may run: then SIGTERM, and SIGKILL 5 s later (default 1m, at
    /// most 10m).
    #[serde(default = "default_timeout")]
    pub timeout: HumanDuration,
    /// For the jobs of a sweep (`jobctl submit --sweep`): `"once"` (default) runs the command
    /// once, when the last of them has ended, if any of them ended as `on` lists; `"each"`
    /// runs it for each job as it ends (Slurm's `--mail-type=ARRAY_TASKS`).
    #[serde(default, skip_serializing_if = "SweepNotify::is_once")]
    pub sweep: SweepNotify,
}

/// When a sweep's jobs notify: once for the sweep, or each job.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SweepNotify {
    #[default]
    Once,
    Each,
}

impl SweepNotify {
    fn is_once(&self) -> bool {
        *self == SweepNotify::Once
    }
}

/// An end of a job that `[notify] on` may list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NotifyOn {
    Succeeded,
    Failed,
    Cancelled,
}

impl NotifyOn {
    pub fn as_str(self) -> &'static str {
        match self {
            NotifyOn::Succeeded => "succeeded",
            NotifyOn::Failed => "failed",
            NotifyOn::Cancelled => "cancelled",
        }
    }

    /// The end `state` is, if it is one.
    pub fn of(state: JobState) -> Option<NotifyOn> {
        match state {
            JobState::Succeeded => Some(NotifyOn::Succeeded),
            JobState::Failed => Some(NotifyOn::Failed),
            JobState::Cancelled => Some(NotifyOn::Cancelled),
            _ => None,
        }
    }
}

fn every_end() -> Vec<NotifyOn> {
    vec![NotifyOn::Succeeded, NotifyOn::Failed, NotifyOn::Cancelled]
}

fn default_timeout() -> HumanDuration {
    HumanDuration::secs(60)
}

impl NotifySpec {
    /// Whether a job that ended in `state` is to be notified.
    pub fn wants(&self, state: JobState) -> bool {
        NotifyOn::of(state).is_some_and(|end| self.on.contains(&end))
    }

    /// Problems that make the section meaningless, whatever the machine.
    pub fn validate(&self) -> Vec<Issue> {
        let mut issues = Vec::new();
        super::job::validate_argv("notify.argv", &self.argv, &mut issues);
        if self.on.is_empty() {
            issues.push(Issue::new(
                "notify.on",
                "lists no end: name some of \"succeeded\", \"failed\", \"cancelled\" (or leave \
                 `on` out for all three)",
            ));
        }
        let t = self.timeout.0;
        if t < std::time::Duration::from_secs(1) || t.as_secs() > MAX_TIMEOUT_SECS {
            issues.push(Issue::new(
                "notify.timeout",
                format!(
                    "must be between 1s and {}m (a notifier is a short call)",
                    MAX_TIMEOUT_SECS / 60
                ),
            ));
        }
        issues
    }

    /// Makes a relative program path (one with a `/`) absolute against `base_dir`.
    pub fn resolve_paths(&mut self, base_dir: &Path) {
        super::job::resolve_program(&mut self.argv, base_dir);
    }

    /// Checks that the program can be found as jobd will run it.
    pub fn check_paths(&self) -> Vec<Issue> {
        match self.argv.first() {
            Some(program) => super::job::find_program(program, super::contract::DEFAULT_PATH)
                .err()
                .map(|why| Issue::new("notify.argv[0]", why))
                .into_iter()
                .collect(),
            None => Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(extra: &str) -> Result<super::super::JobSpec, String> {
        let text = format!("kind = \"command\"\n[command]\nargv = [\"true\"]\n{extra}");
        super::super::job::parse("job.toml", &text).map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_notify_every_end_within_a_minute() {
        let spec = parse("[notify]\nargv = [\"notify-send\", \"done\"]\n").unwrap();
        let n = spec.notify.expect("notify parsed");
        assert_eq!(n.timeout, HumanDuration::secs(60));
        for s in [JobState::Succeeded, JobState::Failed, JobState::Cancelled] {
            assert!(n.wants(s), "{s}");
        }
        for s in [
            JobState::Queued,
            JobState::Starting,
            JobState::Running,
            JobState::Publishing,
            JobState::Interrupted,
        ] {
            assert!(!n.wants(s), "{s} is not an end");
        }
        let failed_only = parse("[notify]\nargv = [\"x\"]\non = [\"failed\"]\n")
            .unwrap()
            .notify
            .unwrap();
        assert!(failed_only.wants(JobState::Failed));
        assert!(!failed_only.wants(JobState::Succeeded));
    }

    #[test]
    fn bad_sections_are_refused_with_the_key() {
        let cases = [
            ("[notify]\nargv = []\n", "notify.argv: must name a program"),
            (
                "[notify]\nargv = [\" \"]\n",
                "notify.argv[0]: program must not be empty",
            ),
            (
                "[notify]\nargv = [\"x\"]\non = []\n",
                "notify.on: lists no end",
            ),
            (
                "[notify]\nargv = [\"x\"]\ntimeout = \"11m\"\n",
                "notify.timeout: must be between 1s and 10m",
            ),
            (
                "[notify]\nargv = [\"x\"]\ntimeout = \"0s\"\n",
                "notify.timeout: must be between",
            ),
            (
                "[notify]\nargv = [\"a\\u0000b\"]\n",
                "notify.argv[0]: must not contain NUL",
            ),
            ("[notify]\nargv = [\"x\"]\non = [\"fail\"]\n", "failed"),
            (
                "[notify]\nargv = [\"x\"]\nwhen = [\"failed\"]\n",
                "unknown field `when`",
            ),
            ("[notify]\non = [\"failed\"]\n", "missing field `argv`"),
        ];
        for (extra, want) in cases {
            let err = parse(extra).expect_err(extra);
            assert!(err.contains(want), "{extra:?}: {err}");
        }
    }

    #[test]
    fn a_relative_program_resolves_against_the_job_file_and_is_checked() {
        let dir = tempfile::tempdir().unwrap();
        let mut spec = parse("[notify]\nargv = [\"./hooks/tell.sh\", \"x\"]\n").unwrap();
        spec.resolve_paths(dir.path());
        let n = spec.notify.as_ref().unwrap();
        assert_eq!(
            n.argv[0],
            dir.path().join("hooks/tell.sh").display().to_string()
        );
        let issues = n.check_paths();
        assert_eq!(issues.len(), 1, "{issues:?}");
        assert_eq!(issues[0].key, "notify.argv[0]");
        assert!(issues[0].message.contains("does not exist"), "{issues:?}");
        let bare = parse("[notify]\nargv = [\"no-such-notifier-here\"]\n").unwrap();
        let issues = bare.notify.unwrap().check_paths();
        assert!(
            issues[0].message.contains("not found in PATH"),
            "{issues:?}"
        );
        let sh = parse("[notify]\nargv = [\"sh\", \"-c\", \"true\"]\n").unwrap();
        assert!(sh.notify.unwrap().check_paths().is_empty());
    }
}
