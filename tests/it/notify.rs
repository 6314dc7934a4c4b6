//! `[notify]`: a command run as the job's owner when the job ends, once per end, recorded in
//! the job's history; an end whose notifier had not finished when jobd died is notified by
//! the next daemon.

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use jobd::spec::{JobId, JobState};

use crate::daemon::*;

/// Whether process `pid` runs (an orphan's zombie waits for init to reap it: it does not run).
fn running(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(") ").map(|(_, rest)| !rest.starts_with('Z')))
        .unwrap_or(false)
}

/// Submits a command job `true` notified by `argv` (and `more` of `[notify]`).
fn submit_notified(d: &TestDaemon, name: &str, argv: &[&str], more: &str) -> JobId {
    d.submit(&d.write(&format!("{name}.toml"), &notified_job("true", argv, more)))
}

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
    d.assert_said(a, "fail.sh` exited with code 7");
    let log = std::fs::read_to_string(job_file(&d, a, "notify.log")).unwrap();
    assert!(log.contains("webhook said 403"), "{log}");
    let shown = d.jobctl(&["logs", "--notify", &a.to_string()]);
    assert!(shown.status.success(), "{}", stderr(&shown));
    assert_eq!(stdout(&shown), log, "jobctl logs --notify shows it");
    // -f follows it until the notifier has ended, not the job.
    let talk = notifier(&d, "talk.sh", "echo first; sleep 1; echo second");
    let c = d.submit(&d.write(
        "c.toml",
        &notified_job("true", &[talk.to_str().unwrap()], ""),
    ));
    d.wait_state(c, JobState::Succeeded, Duration::from_secs(20));
    let followed = d.jobctl(&["logs", "-f", "--notify", &c.to_string()]);
    assert!(
        stdout(&followed).ends_with("first\nsecond\n"),
        "{}",
        stdout(&followed)
    );
    let none = d.jobctl(&[
        "logs",
        "--notify",
        &d.submit(&d.write("p.toml", &command_job("true", "")))
            .to_string(),
    ]);
    assert!(
        stderr(&none).contains("has no [notify]"),
        "{}",
        stderr(&none)
    );
    assert_eq!(d.state(a), JobState::Succeeded);

    wait_note(&d, b, "still ran after its timeout (1s) and was stopped");
    assert_eq!(d.state(b), JobState::Succeeded);
    let pid: i32 = std::fs::read_to_string(job_file(&d, b, "hang.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(!running(pid), "the hanging notifier is gone");
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

/// Across a daemon crash a notifier is neither lost nor run twice: one still running is
/// watched by the next daemon to its end, its timeout still holding; one that ended while jobd
/// was down has told its end. A clean stop waits for a notifier up to the grace period; one
/// still running then is stopped and run again by the next daemon; so is one under way at a
/// restart in place.
#[test]
fn notifiers_across_crashes_stops_and_restarts() {
    let mut d = TestDaemon::start(&["--gpus", "none"]);
    let slow = notifier(
        &d,
        "slow.sh",
        "echo run >> \"$JOBD_JOB_DIR/runs\"; sleep ${PAUSE:-1.5}; echo done >> \"$JOBD_JOB_DIR/runs\"",
    );
    let slow = slow.to_str().unwrap();
    let jobs = d.state.join("jobs");
    let runs = |id: JobId| {
        std::fs::read_to_string(jobs.join(format!("{id}/runs")))
            .unwrap_or_default()
            .matches("run\n")
            .count()
    };
    let done = |id: JobId| {
        std::fs::read_to_string(jobs.join(format!("{id}/runs")))
            .unwrap_or_default()
            .matches("done\n")
            .count()
    };
    let started = |id: JobId| {
        wait_for(
            &format!("{id}'s notifier to start"),
            Duration::from_secs(20),
            || runs(id) == 1,
        )
    };

    // Killed while it runs: the next daemon watches it; it is not run again.
    let a = submit_notified(&d, "a", &[slow], "");
    started(a);
    d.kill9();
    d.restart();
    wait_note(&d, a, "started before jobd restarted, has ended");
    assert_eq!((runs(a), done(a)), (1, 1));

    // Killed between starting a notifier and recording it: the next daemon finds it running.
    d.kill9();
    d.restart_with_env(&[("JOBD_FAILPOINT", "exit-after-notifier-spawn")]);
    let n = submit_notified(&d, "n", &[slow], "");
    assert_eq!(d.wait_exit(Duration::from_secs(20)).code(), Some(86));
    d.restart_with_env(&[]);
    wait_note(&d, n, "started before jobd restarted, has ended");
    assert_eq!((runs(n), done(n)), (1, 1));

    // Killed, and the notifier ends while jobd is down: its end has been told.
    let b = submit_notified(&d, "b", &[slow], "");
    started(b);
    d.kill9();
    wait_for("b's notifier to end", Duration::from_secs(20), || {
        done(b) == 1
    });
    d.restart();
    wait_note(&d, b, "notification ended while jobd was down");
    assert_eq!(runs(b), 1);

    // Killed while a notifier hangs: its timeout still stops it.
    let hang = notifier(
        &d,
        "hang.sh",
        "echo $$ > \"$JOBD_JOB_DIR/hang.pid\"; exec sleep 60",
    );
    let c = submit_notified(&d, "c", &[hang.to_str().unwrap()], "timeout = \"2s\"");
    let pid_file = jobs.join(format!("{c}/hang.pid"));
    wait_for("c's notifier to start", Duration::from_secs(20), || {
        pid_file.exists()
    });
    d.kill9();
    d.restart();
    wait_note(&d, c, "still ran after its timeout (2s) and was stopped");
    let pid: i32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(!running(pid), "the hanging notifier is gone");

    // A clean stop waits for a notifier under way; the next daemon does not run it again.
    let e = submit_notified(&d, "e", &[slow], "");
    started(e);
    assert!(d.stop().success());
    d.restart();
    d.assert_said(e, "notification sent");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!((runs(e), done(e)), (1, 1));

    // One that outlasts the grace period (2 s here) is stopped, and run again by the next daemon.
    let f = submit_notified(&d, "f", &["/usr/bin/env", "PAUSE=4", slow], "");
    started(f);
    assert!(d.stop().success());
    assert_eq!(done(f), 0);
    d.restart();
    d.assert_said(f, "notification stopped: jobd was stopping");
    wait_note(&d, f, "notification sent");
    assert_eq!((runs(f), done(f)), (2, 1));

    // So does a restart in place (SIGHUP): the notifier under way ends first.
    let g = submit_notified(&d, "g", &[slow], "");
    started(g);
    let readies = d.log().matches("jobd ready").count();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(d.pid() as i32),
        nix::sys::signal::Signal::SIGHUP,
    )
    .unwrap();
    wait_note(&d, g, "notification sent");
    wait_for("the restart in place", Duration::from_secs(20), || {
        d.log().matches("jobd ready").count() > readies
    });
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!((runs(g), done(g)), (1, 1));
}

/// A notifier runs on while its job is requeued and runs again: the sweep of what outlived
/// the new run leaves it alone. `jobctl clean` keeps an end not yet told.
#[test]
fn a_requeue_or_a_clean_does_not_cut_a_notification_short() {
    let d = TestDaemon::start(&["--gpus", "none"]);
    let slow = notifier(
        &d,
        "slow.sh",
        "echo run >> \"$JOBD_JOB_DIR/runs\"; sleep 2; echo done >> \"$JOBD_JOB_DIR/runs\"",
    );
    let id = d.submit(&d.write(
        "f.toml",
        &notified_job("exit 4", &[slow.to_str().unwrap()], "on = [\"failed\"]"),
    ));
    let runs = d.state.join(format!("jobs/{id}/runs"));
    wait_for("the notifier to start", Duration::from_secs(20), || {
        runs.exists()
    });
    let out = d.jobctl(&["--json", "clean"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        report["removed"].as_array().map(Vec::len),
        Some(0),
        "{report}"
    );
    assert!(
        report["kept"][0]["why"]
            .as_str()
            .is_some_and(|w| w.contains("its notifier is running")),
        "{report}"
    );
    assert!(d.jobctl(&["requeue", &id.to_string()]).status.success());
    wait_note(&d, id, "notification sent");
    let text = std::fs::read_to_string(&runs).unwrap();
    assert!(
        text.starts_with("run\n") && text.contains("done\n"),
        "{text}"
    );
    // The second failure is told in turn.
    wait_for("the second end's notifier", Duration::from_secs(20), || {
        d.events(id)
            .iter()
            .filter(|e| e.reason.contains("notification sent"))
            .count()
            == 2
    });
    let out = d.jobctl(&["--json", "clean"]);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        report["removed"].as_array().map(Vec::len),
        Some(1),
        "{report}"
    );
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

/// The lines a notifier appended to `path` so far.
fn lines_of(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

/// `jobctl submit FILE ARGS...` of a sweep: its jobs' ids.
fn submit_sweep(d: &TestDaemon, file: &Path, args: &[&str]) -> Vec<JobId> {
    let mut all = vec!["submit", file.to_str().unwrap()];
    all.extend(args);
    let out = d.jobctl(&all);
    assert!(out.status.success(), "{}", stderr(&out));
    stdout(&out).lines().map(|l| l.parse().unwrap()).collect()
}

/// A sweep's `[notify]` runs once, when its last job has ended, with how its jobs ended
/// (`sweep = "each"`: once per job); `on = ["failed"]` runs it if any of them failed.
#[test]
fn a_sweep_notifies_once_when_its_last_job_ends() {
    let d = TestDaemon::start(&["--gpus", "none"]);
    let calls = d.path("calls");
    let tell = notifier(
        &d,
        "tell.sh",
        &format!(
            "echo \"$JOBD_JOB_ID $JOBD_SWEEP_INDEX $JOBD_SWEEP_SUCCEEDED/$JOBD_SWEEP_FAILED/$JOBD_SWEEP_CANCELLED $JOBD_JOB_STATE\" >> {}",
            calls.display()
        ),
    );
    let file = |name: &str, more: &str| {
        d.write(
            name,
            &notified_job("sleep $T; exit $CODE", &[tell.to_str().unwrap()], more),
        )
    };
    let submit = |f: &Path, extra: &[&str]| -> Vec<JobId> {
        let mut args = vec![
            "--sweep",
            r#"command.env=[{T="0", CODE="0"}, {T="1.5", CODE="1"}, {T="0.5", CODE="0"}]"#,
        ];
        args.extend(extra);
        submit_sweep(&d, f, &args)
    };
    let lines = || lines_of(&calls);

    // Once: for the second job, the last to end (a failure), with the sweep's counts.
    let ids = submit(&file("once.toml", ""), &[]);
    wait_note(&d, ids[1], "notification sent");
    for id in &ids {
        assert!(d.state(*id).is_terminal());
    }
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(lines(), [format!("{} 2 2/1/0 failed", ids[1])]);
    d.assert_not_said(ids[0], "notification");
    d.assert_not_said(ids[2], "notification");
    // Only failures listed, and one failed: told; none failed would tell nothing.
    let _ = std::fs::remove_file(&calls);
    let ids = submit(&file("failed.toml", "on = [\"failed\"]"), &[]);
    wait_note(&d, ids[1], "notification sent");
    assert_eq!(lines().len(), 1);
    let _ = std::fs::remove_file(&calls);
    let ids = submit(
        &file("failed.toml", "on = [\"failed\"]"),
        &["--set", "command.argv=[\"true\"]"],
    );
    for id in &ids {
        d.wait_state(*id, JobState::Succeeded, Duration::from_secs(20));
    }
    std::thread::sleep(Duration::from_millis(700));
    assert!(lines().is_empty(), "none failed: {:?}", lines());

    // Each: three calls, each job as it ends, without the sweep's counts.
    let _ = std::fs::remove_file(&calls);
    let ids = submit(&file("each.toml", "sweep = \"each\""), &[]);
    for id in &ids {
        wait_note(&d, *id, "notification sent");
    }
    let mut got = lines();
    got.sort();
    let mut want = vec![
        format!("{} 1 // succeeded", ids[0]),
        format!("{} 2 // failed", ids[1]),
        format!("{} 3 // succeeded", ids[2]),
    ];
    want.sort();
    assert_eq!(got, want);
}

/// A sweep's one notification does not depend on the order its jobs' ends are recorded in
/// (three failing at once when their dependency fails), `clean` keeps its jobs until it has
/// run, and a job resubmitted stands for the run it repeats in the counts.
#[test]
fn a_sweep_notification_survives_same_time_ends_cleaning_and_resubmits() {
    let d = TestDaemon::start(&["--gpus", "none"]);
    let calls = d.path("calls");
    let tell = notifier(
        &d,
        "tell.sh",
        &format!(
            "echo \"$JOBD_SWEEP_ID $JOBD_SWEEP_SUCCEEDED/$JOBD_SWEEP_FAILED/$JOBD_SWEEP_CANCELLED\" >> {}",
            calls.display()
        ),
    );
    let lines = || lines_of(&calls);
    let tell = tell.to_str().unwrap();
    let sweep = |script: &str, more: &str, extra: &[&str]| -> Vec<JobId> {
        submit_sweep(
            &d,
            &d.write("s.toml", &notified_job(script, &[tell], more)),
            extra,
        )
    };

    // All three fail in one batch when their dependency fails, the later ones first.
    let prep = d.submit(&d.write("prep.toml", &command_job("sleep 1; exit 1", "")));
    let ids = sweep(
        "true",
        "",
        &[
            "--set",
            &format!("depends_on=[{prep}]"),
            "--sweep",
            "command.env.K=1,2,3",
        ],
    );
    for (id, p) in [(ids[2], "5"), (ids[1], "3")] {
        assert!(d.jobctl(&["priority", &id.to_string(), p]).status.success());
    }
    wait_for("the sweep's notification", Duration::from_secs(20), || {
        lines().len() == 1
    });
    assert_eq!(lines(), [format!("{} 0/3/0", ids[0])]);

    // One fails at once, the other runs on: `clean` meanwhile keeps the failed one, counted.
    let _ = std::fs::remove_file(&calls);
    let ids = sweep(
        "[ \"$RC\" = 3 ] && exit 3; sleep 2",
        "on = [\"failed\"]",
        &["--sweep", "command.env.RC=3,0"],
    );
    d.wait_state(ids[0], JobState::Failed, Duration::from_secs(20));
    let out = d.jobctl(&["clean"]);
    assert!(
        stdout(&out).contains(&format!(
            "kept job {}: sweep {} has not been notified",
            ids[0], ids[0]
        )),
        "{}",
        stdout(&out)
    );
    wait_for("the sweep's notification", Duration::from_secs(20), || {
        lines().len() == 1
    });
    assert_eq!(lines(), [format!("{} 1/1/0", ids[0])]);

    // Resubmitted, the failed job's new run replaces it in the counts.
    let _ = std::fs::remove_file(&calls);
    let ok = d.path("ok");
    let ids = sweep(
        &format!("[ \"$K\" = 2 ] || test -e {}", ok.display()),
        "",
        &["--sweep", "command.env.K=1,2"],
    );
    wait_for("the first notification", Duration::from_secs(20), || {
        lines().len() == 1
    });
    assert_eq!(lines(), [format!("{} 1/1/0", ids[0])]);
    std::fs::write(&ok, "").unwrap();
    assert!(
        d.jobctl(&["resubmit", &ids[0].to_string()])
            .status
            .success()
    );
    wait_for("the second notification", Duration::from_secs(20), || {
        lines().len() == 2
    });
    assert_eq!(lines()[1], format!("{} 2/0/0", ids[0]));
}
