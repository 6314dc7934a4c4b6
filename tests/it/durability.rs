//! Crash safety: kill -9 of the daemon loses or duplicates nothing, and a job never runs twice
//! at the same time.

use std::collections::BTreeSet;
use std::time::Duration;

use jobd::spec::JobState;

use crate::daemon::*;

/// kill -9 of jobd while a command job runs and 100 jobs are queued: after a restart every job
/// exists exactly once, the running one is taken over by the new daemon and runs to
/// completion once (it is neither stopped nor run again), and the queued ones all run.
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
            .any(|e| e.state == JobState::Running && e.reason.contains("still running and goes on")),
        "{events:?}"
    );
    let out = d.jobctl(&["wait", &long_id.to_string()]);
    assert!(
        out.status.success(),
        "the job taken over runs to completion: {}",
        stderr(&out)
    );
    assert_eq!(
        d.job(long_id).record.attempts,
        1,
        "{:#?}",
        d.events(long_id)
    );
    let all: Vec<String> = ids.iter().map(|i| i.to_string()).collect();
    let mut args = vec!["wait"];
    args.extend(all.iter().map(String::as_str));
    let out = d.jobctl(&args);
    assert!(out.status.success(), "{}", stderr(&out));

    let log = std::fs::read_to_string(&runs).unwrap();
    let lines: Vec<&str> = log.lines().collect();
    // One run, never stopped, and nothing started while it ran (one CPU job at a time).
    assert_eq!(lines, vec!["start 1", "end 1"], "one run:\n{log}");
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

/// `logs -f`, `wait` and `submit --follow` outlive a daemon restart: they wait for jobd to
/// come back and go on (they used to exit 1, "error reading a body from connection", which
/// `jobctl wait $id && next-step` took for a failed job). The follower prints the log exactly
/// once, from where it stopped; `wait` ends with the job's real outcome.
#[test]
fn followers_outlive_a_daemon_restart() {
    let mut d = TestDaemon::start(&["--gpus", "none"]);
    let f = d.write(
        "slow.toml",
        &command_job(
            "echo attempt $JOBD_ATTEMPT; sleep 2; echo done $JOBD_ATTEMPT",
            "",
        ),
    );
    let id = d.submit(&f);
    d.wait_state(id, JobState::Running, Duration::from_secs(20));
    let spawn = |args: &[&str]| {
        std::process::Command::new(JOBCTL)
            .args(args)
            .env("JOBD_URL", &d.socket)
            .env_remove("JOBD_TOKEN")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let logs = spawn(&["logs", "-f", &id.to_string()]);
    let wait = spawn(&["wait", &id.to_string()]);
    let follow = spawn(&["submit", "--follow", f.to_str().unwrap()]);
    std::thread::sleep(Duration::from_millis(700));
    d.kill9();
    // Long enough to be said (a daemon back within 3 s goes unremarked).
    std::thread::sleep(Duration::from_millis(3500));
    d.restart();
    let logs = logs.wait_with_output().unwrap();
    let wait = wait.wait_with_output().unwrap();
    let follow = follow.wait_with_output().unwrap();
    assert!(logs.status.success(), "{}", stderr(&logs));
    assert!(stderr(&logs).contains("jobd is back"), "{}", stderr(&logs));
    let file = std::fs::read_to_string(d.state.join(format!("jobs/{id}/stdout.log"))).unwrap();
    assert_eq!(stdout(&logs), file, "each byte once, none lost");
    assert!(file.lines().last().unwrap().starts_with("done "), "{file}");
    assert!(wait.status.success(), "{}", stderr(&wait));
    assert!(stdout(&wait).contains("succeeded"), "{}", stdout(&wait));
    assert!(follow.status.success(), "{}", stderr(&follow));
    assert!(stdout(&follow).contains("done "), "{}", stdout(&follow));
}

/// A command that ends while jobd is down is not run again: its outcome, recorded by the
/// process supervising it (`jobd run-command`), is taken at the next start as if jobd had
/// seen it — success or failure. (It used to be requeued and run a second time, its real
/// outcome lost.)
#[test]
fn a_command_that_ended_while_jobd_was_down_is_not_run_again() {
    let mut d = TestDaemon::start(&["--gpus", "none"]);
    let runs = d.path("runs");
    let job = |name: &str, code: u8| {
        d.write(
            name,
            &command_job(
                &format!(
                    "sleep 1.5; echo {name}-attempt-$JOBD_ATTEMPT >> {}; exit {code}",
                    runs.display()
                ),
                "",
            ),
        )
    };
    let (ok, bad) = (job("ok", 0), job("bad", 3));
    let (ok, bad) = (d.submit(&ok), d.submit(&bad));
    d.wait_state(ok, JobState::Running, Duration::from_secs(20));
    d.wait_state(bad, JobState::Running, Duration::from_secs(20));
    d.kill9();
    wait_for("both commands to end", Duration::from_secs(20), || {
        std::fs::read_to_string(&runs).is_ok_and(|t| t.lines().count() == 2)
    });
    let ended = jobd::spec::now_ms();
    std::thread::sleep(Duration::from_millis(2000));
    d.restart();
    d.wait_state(ok, JobState::Succeeded, Duration::from_secs(20));
    d.wait_state(bad, JobState::Failed, Duration::from_secs(20));
    let rec = d.job(bad).record;
    assert_eq!(rec.exit.and_then(|e| e.code), Some(3));
    // Finished when the command ended, not when jobd came back 2 s later.
    let finished = rec.finished_at.unwrap();
    assert!(
        finished <= ended + 500 && finished >= rec.started_at.unwrap(),
        "finished {finished}, ended by {ended}"
    );
    assert_eq!(rec.attempts, 1, "{:#?}", d.events(bad));
    d.assert_said(ok, "had ended meanwhile (exit code 0)");
    std::thread::sleep(Duration::from_millis(500));
    let mut lines: Vec<String> = std::fs::read_to_string(&runs)
        .unwrap()
        .lines()
        .map(String::from)
        .collect();
    lines.sort();
    assert_eq!(lines, ["bad-attempt-1", "ok-attempt-1"], "each ran once");
}

/// A daemon killed with -9 does not lose the GPU time its running jobs had used: recovery
/// charges it to them, so fair share comes back as it was (QA: the usage of every running job
/// was reset to 0, and the queue order flipped after the restart). A job taken over keeps its
/// GPU, is charged for the whole run, and a cancel stops it as before.
#[test]
fn gpu_time_of_running_jobs_survives_a_crash() {
    let mut d = TestDaemon::start(&["--gpus", "fake:24GiB", "--grace-period", "5s"]);
    let run = |script: &str| command_job(script, "[resources]\ngpus = 1\nvram = \"10GiB\"");
    // The first goes down with jobd (the machine did): charged until its last output; the
    // second is taken over.
    let lost = d.submit(&d.write(
        "lost.toml",
        &run("while true; do echo tick; sleep 0.2; done"),
    ));
    let kept = d.submit(&d.write(
        "kept.toml",
        &run("trap 'echo kept got TERM; exit 143' TERM; sleep 60 & wait"),
    ));
    d.wait_state(lost, JobState::Running, Duration::from_secs(20));
    d.wait_state(kept, JobState::Running, Duration::from_secs(20));
    std::thread::sleep(Duration::from_millis(2500));
    let lost_pid = d.job(lost).record.process.unwrap().pid;
    d.kill9();
    nix::sys::signal::killpg(
        nix::unistd::Pid::from_raw(lost_pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    d.restart();
    wait_for("the restarted job", Duration::from_secs(20), || {
        d.job(lost).record.attempts == 2
    });
    let used = d.job(lost).record.gpu_seconds;
    assert!(
        (2.0..30.0).contains(&used),
        "the first attempt's GPU time is kept: {used}"
    );
    assert_eq!(d.state(kept), JobState::Running);
    assert!(d.jobctl(&["cancel", &kept.to_string()]).status.success());
    d.wait_state(kept, JobState::Cancelled, Duration::from_secs(20));
    let rec = d.job(kept).record;
    assert_eq!(rec.attempts, 1, "{:#?}", d.events(kept));
    assert!(
        (2.0..30.0).contains(&rec.gpu_seconds),
        "the whole run is charged: {}",
        rec.gpu_seconds
    );
    let out = std::fs::read_to_string(d.state.join(format!("jobs/{kept}/stdout.log"))).unwrap();
    assert!(out.contains("kept got TERM"), "stopped gracefully: {out}");
    d.jobctl(&["cancel", &lost.to_string()]);
}

/// A command taken over by a restarted daemon ends as if that daemon had started it: its exit
/// code decides (a failure is a failure, with its code), and a supervisor killed from outside
/// ends the job with its processes. A job placed on a GPU the restarted daemon no longer has
/// is stopped and requeued instead of taken over.
#[test]
fn jobs_taken_over_end_as_their_commands_do() {
    let mut d = TestDaemon::start(&["--gpus", "fake:24GiB,24GiB"]);
    let marks = d.path("marks");
    std::fs::create_dir(&marks).unwrap();
    let gpu_job = |name: &str| {
        command_job(
            &format!(
                "echo $CUDA_VISIBLE_DEVICES-$JOBD_ATTEMPT >> {}/{name}; sleep 60",
                marks.display()
            ),
            "[resources]\ngpus = 1\nvram = \"20GiB\"",
        )
    };
    let on0 = d.submit(&d.write("on0.toml", &gpu_job("a")));
    d.wait_state(on0, JobState::Running, Duration::from_secs(20));
    let on1 = d.submit(&d.write("on1.toml", &gpu_job("b")));
    d.wait_state(on1, JobState::Running, Duration::from_secs(20));
    let go = d.path("go");
    let fails = d.submit(&d.write(
        "fails.toml",
        &command_job(
            &format!(
                "while [ ! -e {} ]; do sleep 0.1; done; exit 3",
                go.display()
            ),
            "",
        ),
    ));
    let victim = d.submit(&d.write(
        "victim.toml",
        &command_job(
            &format!("sleep 60; touch {}/survived", marks.display()),
            "[retry]\nmax = 1\non_exit_codes = [137]\nbackoff = \"0s\"",
        ),
    ));
    d.wait_state(fails, JobState::Running, Duration::from_secs(20));
    d.wait_state(victim, JobState::Running, Duration::from_secs(20));
    let gpu_of = |id: u64| d.job(id).record.placement.unwrap().gpus[0].index;
    let (first, second) = if gpu_of(on0) == 0 {
        (on0, on1)
    } else {
        (on1, on0)
    };
    assert_eq!(gpu_of(second), 1);

    d.kill9();
    // One GPU less: the job on GPU 1 cannot be kept.
    d.restart_with(&["--gpus", "fake:24GiB"]);
    assert_eq!(d.state(first), JobState::Running, "{:#?}", d.events(first));
    assert_eq!(d.job(first).record.attempts, 1);
    // Stopped in the background (start-up does not wait for it), then requeued.
    wait_for(
        "the job on the GPU gone to be requeued",
        Duration::from_secs(20),
        || d.state(second) == JobState::Queued,
    );
    let events = d.events(second);
    assert!(
        events.iter().any(|e| e.state == JobState::Interrupted
            && e.reason
                .contains("is not in this daemon's inventory any more")),
        "{events:#?}"
    );
    assert_eq!(
        d.job(second).record.attempts,
        1,
        "GPU 0 is taken: {events:#?}"
    );

    std::fs::write(&go, "").unwrap();
    d.wait_state(fails, JobState::Failed, Duration::from_secs(20));
    let rec = d.job(fails).record;
    assert_eq!(
        rec.exit.and_then(|e| e.code),
        Some(3),
        "{:#?}",
        d.events(fails)
    );
    assert_eq!(rec.attempts, 1);

    // Its supervisor killed from outside: no exit status was recorded; that counts as a
    // SIGKILL (137, which its retry policy names, as for the OOM killer), and its command
    // does not outlive it.
    let supervisor = d.job(victim).record.process.unwrap().pid;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(supervisor),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    wait_for("the victim's retry", Duration::from_secs(20), || {
        d.job(victim).record.attempts == 2
    });
    d.assert_said(victim, "ended without a recorded exit status");
    let marker = format!(
        "JOBD_JOB_DIR={}",
        d.state.join(format!("jobs/{victim}")).display()
    );
    std::thread::sleep(Duration::from_millis(300));
    let first_run = std::fs::read_to_string(d.state.join(format!("jobs/{victim}/stdout.log")));
    assert!(
        !std::path::Path::new(&format!("{}/survived", marks.display())).exists(),
        "{first_run:?}"
    );
    assert!(d.jobctl(&["cancel", &victim.to_string()]).status.success());
    d.wait_state(victim, JobState::Cancelled, Duration::from_secs(20));
    wait_for(
        "the victim's command to be gone",
        Duration::from_secs(10),
        || !processes_with_env(&marker),
    );
    assert!(
        d.jobctl(&["cancel", &first.to_string(), &second.to_string()])
            .status
            .success()
    );
}

/// Is any process's environment holding `entry` exactly?
fn processes_with_env(entry: &str) -> bool {
    std::fs::read_dir("/proc").unwrap().flatten().any(|e| {
        std::fs::read(e.path().join("environ"))
            .is_ok_and(|env| env.split(|b| *b == 0).any(|v| v == entry.as_bytes()))
    })
}

/// A cancel given just before a crash stands: the job ends cancelled at the next start (it
/// used to be requeued and run again), even when its command ignores SIGTERM and outlives
/// the crashed daemon.
#[test]
fn a_cancel_before_a_crash_stands() {
    // A grace period the restart surely fits in, even on a loaded machine: with the tests'
    // 2 s the supervisor could kill the command before the new daemon took it over (then the
    // job ends cancelled as well, but that is not the path this test is for).
    let mut d = TestDaemon::start(&["--gpus", "none", "--grace-period", "6s"]);
    let id = d.submit(&d.write(
        "stubborn.toml",
        &command_job(
            "trap 'echo got TERM' TERM; while true; do sleep 0.2; done",
            "",
        ),
    ));
    d.wait_state(id, JobState::Running, Duration::from_secs(20));
    assert!(d.jobctl(&["cancel", &id.to_string()]).status.success());
    d.kill9();
    d.restart();
    d.wait_state(id, JobState::Cancelled, Duration::from_secs(30));
    std::thread::sleep(Duration::from_millis(500));
    let rec = d.job(id).record;
    assert_eq!(rec.state, JobState::Cancelled, "{:#?}", d.events(id));
    assert_eq!(rec.attempts, 1, "never run again: {:#?}", d.events(id));
    // Taken over and stopped again by the new daemon, which had to SIGKILL it (and knows).
    let reason = rec.reason.unwrap_or_default();
    assert!(reason.contains("killed by SIGKILL"), "{reason}");
}

/// When a job fills the file system of the state directory, no job starts until there is
/// room again; should the queue's own writes fail there, jobd stops with its queue safe on
/// disk and, started again, opens it with its disk reserve (it used to be unable to start).
/// Needs root and tmpfs (skipped otherwise).
#[test]
fn a_full_state_disk_stops_starts_and_the_daemon_comes_back() {
    use std::process::{Command, Stdio};
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    std::fs::create_dir(&state).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=160m,mode=0711", "tmpfs"])
        .arg(&state)
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        eprintln!("skipped: cannot mount a tmpfs here");
        return;
    }
    struct Daemon(std::path::PathBuf, Option<std::process::Child>);
    impl Drop for Daemon {
        fn drop(&mut self) {
            if let Some(c) = &mut self.1 {
                let _ = c.kill();
                let _ = c.wait();
            }
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
    let config = tmp.path().join("jobd.toml");
    std::fs::write(&config, "[scheduler]\ngpu_refresh = \"1s\"\n").unwrap();
    let socket = state.join("jobd.sock");
    let start = || {
        let child = Command::new(JOBD)
            .arg("--config")
            .arg(&config)
            .args(["--gpus", "none", "--state-dir"])
            .arg(&state)
            .arg("--socket")
            .arg(&socket)
            .stdout(Stdio::null())
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(tmp.path().join("jobd.log"))
                    .unwrap(),
            )
            .spawn()
            .unwrap();
        wait_for("jobd", Duration::from_secs(20), || {
            std::os::unix::net::UnixStream::connect(&socket).is_ok()
        });
        child
    };
    let mut d = Daemon(state.clone(), Some(start()));
    let url = socket.to_str().unwrap().to_string();
    assert!(
        state.join("store/reserve").exists(),
        "the reserve is set aside"
    );
    let write = |name: &str, text: &str| {
        let p = tmp.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let fill = write(
        "fill.toml",
        &command_job(
            "head -c 400M /dev/zero > \"$JOBD_JOB_DIR/fill\"; exit 0",
            "",
        ),
    );
    let out = jobctl_with(&url, None, &["submit", fill.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    wait_for("the disk to fill", Duration::from_secs(30), || {
        nix::sys::statvfs::statvfs(&state).is_ok_and(|v| v.blocks_available() == 0)
    });
    let next = write("next.toml", &command_job("echo next", ""));
    let mut submitted = jobctl_with(&url, None, &["submit", next.to_str().unwrap()]);
    if !submitted.status.success() {
        // The store could not write: jobd stopped, as systemd would see; start it again.
        let code = d.1.as_mut().unwrap().wait().unwrap().code();
        assert_eq!(code, Some(70), "{}", stderr(&submitted));
        d.1 = Some(start());
        submitted = jobctl_with(&url, None, &["submit", next.to_str().unwrap()]);
    }
    assert!(submitted.status.success(), "{}", stderr(&submitted));
    let id = stdout(&submitted).trim().to_string();
    wait_for("the job to wait for space", Duration::from_secs(10), || {
        stdout(&jobctl_with(&url, None, &["explain", &id])).contains("is full")
    });
    std::fs::remove_file(state.join("jobs/1/fill")).unwrap();
    wait_for("the job to run", Duration::from_secs(20), || {
        stdout(&jobctl_with(&url, None, &["--json", "show", &id])).contains("\"succeeded\"")
    });
    assert!(
        state.join("store/reserve").exists(),
        "the reserve is taken back"
    );
}

/// A crash between a job's start and the record that it runs (`starting` on disk, `running`
/// not yet) does not run it twice: the restarted daemon finds its process and takes it over
/// (QA: a command ran twice after a kill -9 in that window).
#[test]
fn a_job_started_just_before_a_crash_is_taken_over() {
    let mut d = TestDaemon::start_full(
        &["--gpus", "none"],
        "",
        &[("JOBD_FAILPOINT", "exit-after-spawn")],
    );
    let runs = d.path("runs");
    let job = d.write(
        "j.toml",
        &command_job(
            &format!("echo run-$JOBD_ATTEMPT >> {}; sleep 2", runs.display()),
            "",
        ),
    );
    // jobd dies before it answers (the job is on disk: it was flushed first).
    let _ = d.jobctl(&["submit", job.to_str().unwrap()]);
    let id = 1;
    let status = d.wait_exit(Duration::from_secs(20));
    assert_eq!(status.code(), Some(86), "the failpoint: {}", d.log());
    d.restart_with_env(&[]);
    d.wait_state(id, JobState::Succeeded, Duration::from_secs(20));
    let rec = d.job(id).record;
    assert_eq!(rec.attempts, 1, "{:#?}", d.events(id));
    assert!(
        d.events(id)
            .iter()
            .any(|e| e.state == JobState::Running && e.reason.contains("still running and goes on")),
        "{:#?}",
        d.events(id)
    );
    assert_eq!(
        std::fs::read_to_string(&runs).unwrap(),
        "run-1\n",
        "one run"
    );
}

/// A job being stopped when jobd restarts in place is taken over and its stop carried on in
/// the background: clients are answered at once, not after the stop's grace period (QA: every
/// client waited the whole grace period); the job gets no second SIGTERM, its SIGKILL comes
/// when it was due, and its history says nothing of the restart.
#[test]
fn a_restart_in_place_does_not_wait_for_a_stopping_job() {
    let d = TestDaemon::start(&["--gpus", "none", "--grace-period", "4s"]);
    let id = d.submit(&d.write(
        "stubborn.toml",
        &command_job(
            "trap 'echo TERM' TERM; echo ready; while :; do sleep 0.1; done",
            "",
        ),
    ));
    d.wait_output(id, "ready");
    let cancelled_at = std::time::Instant::now();
    assert!(d.jobctl(&["cancel", &id.to_string()]).status.success());
    std::thread::sleep(Duration::from_millis(1500));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(d.pid() as i32),
        nix::sys::signal::Signal::SIGHUP,
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let asked = std::time::Instant::now();
    let out = d.jobctl(&["list", "--all"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        asked.elapsed() < Duration::from_millis(1500),
        "answered in {:?}",
        asked.elapsed()
    );
    d.wait_state(id, JobState::Cancelled, Duration::from_secs(20));
    let took = cancelled_at.elapsed();
    assert!(
        took < Duration::from_millis(5500),
        "SIGKILL when due (grace 4s), not a grace later: {took:?}"
    );
    let out = std::fs::read_to_string(d.state.join(format!("jobs/{id}/stdout.log"))).unwrap();
    assert_eq!(out.matches("TERM").count(), 1, "one SIGTERM: {out}");
    let rec = d.job(id).record;
    assert_eq!(rec.attempts, 1);
    assert!(
        rec.reason.unwrap_or_default().contains("cancelled by"),
        "{:#?}",
        d.events(id)
    );
    d.assert_not_said(id, "daemon restarted");
}

/// A job whose supervisor died while jobd was down, its command still running, is not run
/// again: what is left of it is killed at once (start-up does not wait a grace period), and
/// it ends as if jobd had seen its leader die — failed, with an end nobody recorded. A
/// process of another user that carries the job's directory in its environment is left
/// alone (QA: anyone could stall a restart, and have root signal their process).
#[test]
fn a_job_whose_leader_died_while_jobd_was_down_is_not_run_again() {
    use std::os::unix::process::CommandExt;
    let mut d = TestDaemon::start(&["--gpus", "none", "--grace-period", "10s"]);
    let runs = d.path("runs");
    let id = d.submit(&d.write(
        "once.toml",
        &command_job(
            &format!("trap '' TERM; echo run >> {}; sleep 60", runs.display()),
            "",
        ),
    ));
    d.wait_state(id, JobState::Running, Duration::from_secs(20));
    wait_for("the run", Duration::from_secs(20), || runs.exists());
    let supervisor = d.job(id).record.process.unwrap().pid;
    let job_dir = d.state.join(format!("jobs/{id}"));
    // Someone else's process, made to look like the job's.
    let mut impostor = std::process::Command::new("/bin/sleep")
        .arg("60")
        .env("JOBD_JOB_DIR", &job_dir)
        .process_group(0)
        .uid(65534)
        .gid(65534)
        .spawn()
        .unwrap();
    d.kill9();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(supervisor),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let started = std::time::Instant::now();
    d.restart();
    let out = d.jobctl(&["list", "--all"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "start-up took {:?}",
        started.elapsed()
    );
    d.wait_state(id, JobState::Failed, Duration::from_secs(20));
    let rec = d.job(id).record;
    assert_eq!(rec.attempts, 1, "{:#?}", d.events(id));
    let reason = rec.reason.unwrap_or_default();
    assert!(
        reason.contains("ended without a recorded exit status"),
        "{reason}"
    );
    d.assert_said(id, "what was left of it");
    let marker = format!("JOBD_JOB_DIR={}", job_dir.display());
    assert!(
        impostor.try_wait().unwrap().is_none(),
        "another user's process is left alone"
    );
    let _ = impostor.kill();
    let _ = impostor.wait();
    wait_for(
        "the job's command to be gone",
        Duration::from_secs(10),
        || !processes_with_env(&marker),
    );
    assert_eq!(std::fs::read_to_string(&runs).unwrap(), "run\n", "ran once");
}

/// Across restarts, a stop keeps what it is and when it ends: a job being cancelled whose GPU
/// left the inventory ends cancelled (QA: it was requeued and ran again); its SIGKILL comes a
/// grace period after the cancel however often jobd restarts meanwhile (QA: each restart put
/// it off); and a stop jobd gives to requeue a job on a GPU gone sends one SIGTERM, not one
/// per restart.
#[test]
fn stops_keep_their_kind_and_deadline_across_restarts() {
    let mut d = TestDaemon::start(&["--gpus", "fake:24GiB,24GiB", "--grace-period", "6s"]);
    let job = |name: &str| {
        command_job(
            "trap 'echo TERM' TERM; echo ready; while :; do sleep 0.1; done",
            &format!("name = \"{name}\"\n[resources]\ngpus = 1\nvram = \"20GiB\"\nonly_gpus = [1]"),
        )
    };
    let cancelled = d.submit(&d.write("c.toml", &job("c")));
    d.wait_output(cancelled, "ready");
    assert!(
        d.jobctl(&["cancel", &cancelled.to_string()])
            .status
            .success()
    );
    // Two crashes within the grace period, the second with GPU 1 gone.
    std::thread::sleep(Duration::from_millis(1500));
    d.kill9();
    d.restart();
    std::thread::sleep(Duration::from_millis(2000));
    d.kill9();
    d.restart_with(&["--gpus", "fake:24GiB", "--grace-period", "6s"]);
    d.wait_state(cancelled, JobState::Cancelled, Duration::from_secs(20));
    // Timed by the daemon's own history, from the cancel to the end.
    let events = d.events(cancelled);
    let at = |want: &str| {
        events
            .iter()
            .find(|e| e.reason.starts_with(want))
            .map(|e| e.at)
            .unwrap_or_else(|| panic!("no {want:?} in {events:#?}"))
    };
    let took = at("cancelled by") - at("cancel requested");
    // Due 6 s after the cancel; counted from either restart, it would come at 7.5 s or later.
    assert!(took < 6900, "SIGKILL when due: {took} ms");
    let rec = d.job(cancelled).record;
    assert_eq!(rec.attempts, 1, "{:#?}", d.events(cancelled));
    let state = d.state.clone();
    let log =
        |id: u64| std::fs::read_to_string(state.join(format!("jobs/{id}/stdout.log"))).unwrap();
    assert_eq!(
        log(cancelled).matches("TERM").count(),
        1,
        "{}",
        log(cancelled)
    );

    // A job on GPU 1 when it goes: stopped to be requeued, one SIGTERM over two restarts.
    d.kill9();
    d.restart_with(&["--gpus", "fake:24GiB,24GiB", "--grace-period", "6s"]);
    let moved = d.submit(&d.write(
        "m.toml",
        &job("m").replace("only_gpus = [1]", "prefer_gpus = [1]"),
    ));
    d.wait_output(moved, "ready");
    assert_eq!(d.job(moved).record.placement.unwrap().gpus[0].index, 1);
    d.kill9();
    d.restart_with(&["--gpus", "fake:24GiB", "--grace-period", "6s"]);
    std::thread::sleep(Duration::from_millis(800));
    d.kill9();
    d.restart_with(&["--gpus", "fake:24GiB", "--grace-period", "6s"]);
    wait_for(
        "the moved job to run again",
        Duration::from_secs(20),
        || d.job(moved).record.attempts == 2,
    );
    let text = log(moved);
    assert_eq!(text.matches("TERM").count(), 1, "{text}");
    d.assert_said(moved, "not in this daemon's inventory any more");
    assert!(d.jobctl(&["cancel", &moved.to_string()]).status.success());
}

/// A job started just before a crash, whose supervisor then died while jobd was down, is not
/// taken over through a process of its that leads a group of its own (`setsid`): it ends as
/// if jobd had seen its supervisor die, and all of it is killed (QA: the setsid child was
/// taken for the job's leader and held its GPU for as long as it lived).
#[test]
fn a_setsid_child_is_not_taken_for_the_jobs_leader() {
    let mut d = TestDaemon::start_full(
        &["--gpus", "none"],
        "",
        &[("JOBD_FAILPOINT", "exit-after-spawn")],
    );
    let job = d.write(
        "s.toml",
        &command_job("setsid sleep 301 & sleep 302 & echo started; sleep 30", ""),
    );
    let _ = d.jobctl(&["submit", job.to_str().unwrap()]);
    let id = 1;
    assert_eq!(d.wait_exit(Duration::from_secs(20)).code(), Some(86));
    d.wait_output(id, "started");
    let marker = format!(
        "JOBD_JOB_DIR={}",
        d.state.join(format!("jobs/{id}")).display()
    );
    // Its supervisor dies while jobd is down.
    let supervisor = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .find(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| c.split(|b| *b == 0).nth(1) == Some(b"run-command"))
                && std::fs::read(format!("/proc/{pid}/environ"))
                    .is_ok_and(|env| env.split(|b| *b == 0).any(|v| v == marker.as_bytes()))
        })
        .expect("the job's supervisor");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(supervisor),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    d.restart_with_env(&[]);
    d.wait_state(id, JobState::Failed, Duration::from_secs(20));
    let reason = d.job(id).record.reason.unwrap_or_default();
    assert!(
        reason.contains("ended without a recorded exit status"),
        "{reason}"
    );
    wait_for("all of the job to be gone", Duration::from_secs(10), || {
        !processes_with_env(&marker)
    });
}
