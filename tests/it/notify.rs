//! `[notify]`: a command run as the job's owner when the job ends, once per end, recorded in
//! the job's history; an end whose notifier had not finished when jobd died is notified by
//! the next daemon.

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::PathBuf;
use std::time::Duration;

use jobd::spec::{JobId, JobState};

use crate::daemon::*;

/// A notifier script in the test directory (readable by every user: jobs of `nobody` run it).
fn notifier(d: &TestDaemon, name: &str, body: &str) -> PathBuf {
    let p = d.write(name, &format!("#!/bin/sh\n{body}\n"));
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    p
}

/// A command job running `script`, notified by `argv` with the rest of `[notify]` in `more`.
fn notified_job(script: &str, argv: &[&str], more: &str) -> String {
    format!(
        "{}\n[notify]\nargv = {argv:?}\n{more}\n",
        command_job(script, "")
    )
}

fn job_file(d: &TestDaemon, id: JobId, name: &str) -> PathBuf {
    d.state.join(format!("jobs/{id}/{name}"))
}

/// The `JOBD_*` (and `USER`) variables the notifier of job `id` saw, once it has run.
fn seen_env(d: &TestDaemon, id: JobId) -> BTreeMap<String, String> {
    let seen = job_file(d, id, "seen");
    wait_for(
        &format!("job {id}'s notifier"),
        Duration::from_secs(20),
        || std::fs::read_to_string(&seen).is_ok_and(|t| t.contains("END")),
    );
    std::fs::read_to_string(&seen)
        .unwrap()
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn wait_note(d: &TestDaemon, id: JobId, text: &str) {
    wait_for(
        &format!("{text:?} in job {id}'s history"),
        Duration::from_secs(20),
        || d.events(id).iter().any(|e| e.reason.contains(text)),
    );
}

/// Each end a job lists is told to its notifier, with what happened in its environment, as
/// the job's owner; the history says so without changing why the job is in its state; an
/// end it does not list runs nothing.
#[test]
fn notifiers_run_for_the_ends_they_list_with_the_job_in_their_environment() {
    let d = TestDaemon::start(&["--gpus", "fake:24GiB"]);
    let tell = notifier(
        &d,
        "tell.sh",
        "env | grep -E '^(JOBD_|USER=|HOME=|PATH=)' > \"$JOBD_JOB_DIR/seen\"\n\
         pwd >> \"$JOBD_JOB_DIR/seen.cwd\"\necho told\necho END >> \"$JOBD_JOB_DIR/seen\"",
    );
    let tell = tell.to_str().unwrap();

    // Listed only failures: a success runs nothing.
    let quiet = d.write(
        "quiet.toml",
        &notified_job("true", &[tell], "on = [\"failed\"]"),
    );
    let quiet = d.submit(&quiet);
    d.wait_state(quiet, JobState::Succeeded, Duration::from_secs(20));

    // A failure, by a job of `nobody` (over TCP): its notifier runs as `nobody`.
    let failing = d.write(
        "failing.toml",
        &notified_job(
            "echo oops; exit 3",
            &[tell, "--secret-webhook"],
            "on = [\"failed\", \"succeeded\"]",
        ),
    );
    let valid = stdout(&d.jobctl(&["validate", failing.to_str().unwrap()]));
    assert!(
        valid.contains("; notifies when failed, succeeded"),
        "{valid}"
    );
    let out = d.jobctl_tcp(Some(TOKEN_NOBODY), &["submit", failing.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let failing: JobId = stdout(&out).trim().parse().unwrap();
    let env = seen_env(&d, failing);
    assert_eq!(env["JOBD_JOB_ID"], failing.to_string());
    assert_eq!(env["JOBD_JOB_STATE"], "failed");
    assert_eq!(env["JOBD_EXIT_CODE"], "3");
    assert_eq!(env["JOBD_JOB_KIND"], "command");
    assert_eq!(env["JOBD_JOB_NAME"], "failing");
    assert_eq!(env["JOBD_ATTEMPT"], "1");
    assert!(env["JOBD_JOB_REASON"].contains("exit code 3"), "{env:?}");
    assert_eq!(
        env["JOBD_JOB_DIR"],
        d.state
            .join(format!("jobs/{failing}"))
            .display()
            .to_string()
    );
    assert!(!env.contains_key("JOBD_MODEL"), "no model was published");
    wait_note(&d, failing, "notification sent");
    d.assert_said(failing, "tell.sh` exited 0");
    let rec = d.job(failing).record;
    assert!(
        rec.reason
            .as_deref()
            .unwrap_or_default()
            .contains("exit code 3"),
        "the reason it failed stays its reason: {:?}",
        rec.reason
    );
    assert_eq!(rec.state, JobState::Failed);
    let cwd = std::fs::read_to_string(job_file(&d, failing, "seen.cwd")).unwrap();
    assert_eq!(
        cwd.trim(),
        env["JOBD_JOB_DIR"],
        "runs in the job's directory"
    );
    let log = std::fs::read_to_string(job_file(&d, failing, "notify.log")).unwrap();
    assert!(
        log.starts_with(&format!("--- job {failing} failed at ")) && log.contains("told\n"),
        "{log}"
    );
    if nix::unistd::geteuid().is_root() {
        assert_eq!(env["USER"], "nobody", "{env:?}");
        let owner = std::fs::metadata(job_file(&d, failing, "seen"))
            .unwrap()
            .uid();
        assert_eq!(owner, 65534, "the notifier ran as the job's owner");
        // Others see the program, not its arguments (a webhook URL is a secret).
        let shown = stdout(&d.jobctl_tcp(
            Some(TOKEN_DAEMON),
            &["show", "--json", &failing.to_string()],
        ));
        assert!(
            shown.contains("tell.sh") && !shown.contains("--secret-webhook"),
            "{shown}"
        );
    }
    let show = stdout(&d.jobctl(&["show", &failing.to_string()]));
    assert!(
        show.contains("notify:") && show.contains("tell.sh when failed, succeeded (timeout 1m)"),
        "{show}"
    );

    // A job cancelled while queued (it never ran): notified by default, no exit code.
    let held = d.write("held.toml", &notified_job("true", &[tell], ""));
    let out = d.jobctl(&["submit", "--hold", held.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let held: JobId = stdout(&out).trim().parse().unwrap();
    let c = d.jobctl(&["cancel", &held.to_string()]);
    assert!(c.status.success(), "{}", stderr(&c));
    let env = seen_env(&d, held);
    assert_eq!(env["JOBD_JOB_STATE"], "cancelled");
    assert!(!env.contains_key("JOBD_EXIT_CODE"), "{env:?}");
    wait_note(&d, held, "notification sent");

    // By now the success's round is long past: it ran nothing.
    assert!(!job_file(&d, quiet, "seen").exists());
    assert!(!job_file(&d, quiet, "notify.log").exists());
    d.assert_not_said(quiet, "notification");
}

/// A notifier that fails or hangs is recorded as such (and a hanging one stopped at its
/// timeout); the job's own outcome stands.
#[test]
fn failing_and_hanging_notifiers_are_recorded_and_stopped() {
    let d = TestDaemon::start(&["--gpus", "none"]);
    let fail = notifier(&d, "fail.sh", "echo 'webhook said 403' >&2; exit 7");
    let hang = notifier(
        &d,
        "hang.sh",
        "echo $$ > \"$JOBD_JOB_DIR/hang.pid\"; exec sleep 60",
    );
    let a = d.submit(&d.write(
        "a.toml",
        &notified_job("true", &[fail.to_str().unwrap()], ""),
    ));
    let b = d.submit(&d.write(
        "b.toml",
        &notified_job("true", &[hang.to_str().unwrap()], "timeout = \"1s\""),
    ));
    wait_note(&d, a, "notification failed");
    d.assert_said(a, "fail.sh` ended with exit code 7");
    let log = std::fs::read_to_string(job_file(&d, a, "notify.log")).unwrap();
    assert!(log.contains("webhook said 403"), "{log}");
    assert_eq!(d.state(a), JobState::Succeeded);

    wait_note(&d, b, "still ran after its timeout (1s) and was stopped");
    assert_eq!(d.state(b), JobState::Succeeded);
    let pid: i32 = std::fs::read_to_string(job_file(&d, b, "hang.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_err(),
        "the hanging notifier is gone"
    );
    // Once each: nothing runs again.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        std::fs::read_to_string(job_file(&d, a, "notify.log"))
            .unwrap()
            .matches("--- job")
            .count(),
        1
    );
}

/// An end whose notifier had not finished when jobd was killed is notified again by the next
/// daemon (at least once); one that was recorded, or whose notifier a clean stop waited for,
/// is not.
#[test]
fn an_end_not_notified_when_jobd_died_is_notified_after_the_restart() {
    let mut d = TestDaemon::start(&["--gpus", "none"]);
    let slow = notifier(
        &d,
        "slow.sh",
        "echo run >> \"$JOBD_JOB_DIR/runs\"; sleep 1.5; echo done >> \"$JOBD_JOB_DIR/runs\"",
    );
    let slow = slow.to_str().unwrap();
    let jobs = d.state.join("jobs");
    let runs = |id: JobId| {
        std::fs::read_to_string(jobs.join(format!("{id}/runs")))
            .unwrap_or_default()
            .matches("run\n")
            .count()
    };
    let a = d.submit(&d.write("a.toml", &notified_job("true", &[slow], "")));
    wait_for("a's notifier to start", Duration::from_secs(20), || {
        runs(a) == 1
    });
    d.kill9();
    d.restart();
    wait_note(&d, a, "notification sent");
    assert_eq!(runs(a), 2, "run again by the next daemon");

    // A clean stop waits for the notifier under way; the next daemon does not run it again.
    let b = d.submit(&d.write("b.toml", &notified_job("true", &[slow], "")));
    wait_for("b's notifier to start", Duration::from_secs(20), || {
        runs(b) == 1
    });
    assert!(d.stop().success());
    d.restart();
    d.assert_said(b, "notification sent");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(runs(b), 1);
    assert_eq!(runs(a), 2);
    let done = std::fs::read_to_string(jobs.join(format!("{b}/runs"))).unwrap();
    assert!(
        done.ends_with("done\n"),
        "it finished before jobd stopped: {done}"
    );

    // So does a restart in place (SIGHUP).
    let c = d.submit(&d.write("c.toml", &notified_job("true", &[slow], "")));
    wait_for("c's notifier to start", Duration::from_secs(20), || {
        runs(c) == 1
    });
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(d.pid() as i32),
        nix::sys::signal::Signal::SIGHUP,
    )
    .unwrap();
    wait_note(&d, c, "notification sent");
    wait_for("the restart in place", Duration::from_secs(20), || {
        d.log().matches("jobd ready").count() >= 4
    });
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(runs(c), 1);
}

/// Many ends at once (a `cancel --mine`) start at most four notifiers of one user at a time;
/// the others wait their turn and all run.
#[test]
fn one_users_notifiers_run_at_most_four_at_once() {
    let d = TestDaemon::start(&["--gpus", "none"]);
    let trace = d.path("trace");
    let busy = notifier(
        &d,
        "busy.sh",
        &format!(
            "echo start >> {0}; sleep 1; echo end >> {0}",
            trace.display()
        ),
    );
    let file = d.write(
        "many.toml",
        &notified_job(
            "sleep 30",
            &[busy.to_str().unwrap()],
            "on = [\"cancelled\"]",
        ),
    );
    let ids: Vec<JobId> = (0..6).map(|_| d.submit(&file)).collect();
    let out = d.jobctl(&["cancel", "--mine"]);
    assert!(out.status.success(), "{}", stderr(&out));
    for id in &ids {
        wait_note(&d, *id, "notification sent");
    }
    let (mut running, mut most, mut started) = (0, 0, 0);
    for line in std::fs::read_to_string(&trace).unwrap().lines() {
        if line == "start" {
            running += 1;
            started += 1;
            most = most.max(running);
        } else {
            running -= 1;
        }
    }
    assert_eq!(started, 6);
    assert!(most <= 4, "{most} notifiers of one user ran at once");
    assert!(most >= 2, "they do run side by side ({most})");
}
