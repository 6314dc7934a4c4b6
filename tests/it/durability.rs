//! Crash safety: kill -9 of the daemon loses or duplicates nothing, and a job never runs twice
//! at the same time.

use std::collections::BTreeSet;
use std::time::Duration;

use jobd::spec::JobState;

use crate::daemon::*;

/// kill -9 of jobd while a command job runs and 100 jobs are queued: after a restart every job
/// exists exactly once, the running one is requeued (its old worker stopped first) and runs to
/// completion, and the queued ones all run.
#[test]
fn kill9_loses_and_duplicates_nothing() {
    let mut d = TestDaemon::start(&[
        "--gpus",
        "none",
        "--max-cpu-jobs",
        "1",
        "--grace-period",
        "5s",
    ]);
    let runs = d.path("runs.log");
    // Each run appends "start N" and, when it finishes, "end N"; overlapping runs would show.
    let long = d.write(
        "long.toml",
        &command_job(
            &format!(
                "echo start $JOBD_ATTEMPT >> {0}; sleep 2; echo end $JOBD_ATTEMPT >> {0}",
                runs.display()
            ),
            "name = \"long\"",
        ),
    );
    let long_id = d.submit(&long);
    d.wait_state(long_id, JobState::Running, Duration::from_secs(10));
    let quick = d.write("quick.toml", &command_job("true", "name = \"quick\""));
    let mut ids = vec![long_id];
    for _ in 0..100 {
        ids.push(d.submit(&quick));
    }
    // Every submit answered with an id is durable: kill at once.
    d.kill9();
    d.restart();

    let jobs = d.all_jobs();
    let seen: Vec<u64> = jobs.iter().map(|j| j.record.id).collect();
    let unique: BTreeSet<u64> = seen.iter().copied().collect();
    assert_eq!(seen.len(), 101, "every job exists");
    assert_eq!(unique.len(), 101, "exactly once");
    assert_eq!(unique, ids.iter().copied().collect::<BTreeSet<_>>());

    let events = d.events(long_id);
    assert!(
        events
            .iter()
            .any(|e| e.state == JobState::Interrupted && e.reason.contains("daemon restarted")),
        "{events:?}"
    );
    let out = d.jobctl(&["wait", &long_id.to_string()]);
    assert!(
        out.status.success(),
        "the interrupted job runs to completion: {}",
        stderr(&out)
    );
    let all: Vec<String> = ids.iter().map(|i| i.to_string()).collect();
    let mut args = vec!["wait"];
    args.extend(all.iter().map(String::as_str));
    let out = d.jobctl(&args);
    assert!(out.status.success(), "{}", stderr(&out));

    let log = std::fs::read_to_string(&runs).unwrap();
    let lines: Vec<&str> = log.lines().collect();
    // The first run was stopped (no "end 1"); the second ran alone to the end.
    assert_eq!(
        lines,
        vec!["start 1", "start 2", "end 2"],
        "no overlapping runs:\n{log}"
    );
}

/// A clean stop (SIGTERM) interrupts running jobs and they resume at the next start.
#[test]
fn clean_stop_interrupts_and_restart_resumes() {
    let mut d = TestDaemon::start(&["--gpus", "none", "--grace-period", "5s"]);
    let job = d.write(
        "j.toml",
        &command_job(
            "trap 'echo got-term; exit 75' TERM; echo attempt $JOBD_ATTEMPT; sleep 1000 & wait",
            "",
        ),
    );
    let id = d.submit(&job);
    wait_for("job output", Duration::from_secs(10), || {
        std::fs::read_to_string(d.state.join(format!("jobs/{id}/stdout.log")))
            .unwrap_or_default()
            .contains("attempt 1")
    });
    let status = d.stop();
    assert!(status.success(), "jobd exits 0 after a clean stop");
    let out = std::fs::read_to_string(d.state.join(format!("jobs/{id}/stdout.log"))).unwrap();
    assert!(out.contains("got-term"), "the worker got SIGTERM: {out}");
    d.restart();
    wait_for("second attempt", Duration::from_secs(10), || {
        std::fs::read_to_string(d.state.join(format!("jobs/{id}/stdout.log")))
            .unwrap_or_default()
            .contains("attempt 2")
    });
    let states: Vec<JobState> = d.events(id).iter().map(|e| e.state).collect();
    assert!(
        states
            .windows(2)
            .any(|w| w == [JobState::Interrupted, JobState::Queued]),
        "{states:?}"
    );
    assert!(d.jobctl(&["cancel", &id.to_string()]).status.success());
}
