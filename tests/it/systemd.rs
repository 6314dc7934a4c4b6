//! jobd as a systemd service: the sd_notify protocol, checkpoint-before-exit, and the unit file.

use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use jobd::spec::JobState;

use crate::daemon::*;

fn recv_until(sock: &UnixDatagram, want: &str, timeout: Duration, seen: &mut Vec<String>) {
    let start = Instant::now();
    let mut buf = [0u8; 4096];
    while start.elapsed() < timeout {
        if let Ok(n) = sock.recv(&mut buf) {
            let msg = String::from_utf8_lossy(&buf[..n]).to_string();
            let hit = msg.lines().any(|l| l.starts_with(want));
            seen.push(msg);
            if hit {
                return;
            }
        }
    }
    panic!("no {want} within {timeout:?}; got {seen:?}");
}

/// READY=1 with a STATUS after start-up, WATCHDOG=1 keep-alives, STATUS updates, STOPPING=1
/// on SIGTERM — and a running train job is checkpointed and recorded as interrupted before
/// jobd exits.
#[test]
fn notify_protocol_and_checkpoint_on_stop() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut d = TestDaemon::start_full(
        &["--gpus", "none", "--grace-period", "20s"],
        "",
        &[
            ("NOTIFY_SOCKET", path.to_str().unwrap()),
            ("WATCHDOG_USEC", "400000"),
        ],
    );
    let mut seen = Vec::new();
    recv_until(&sock, "READY=1", Duration::from_secs(5), &mut seen);
    assert!(
        seen.last().unwrap().contains("STATUS=0 running, 0 queued"),
        "{seen:?}"
    );
    recv_until(&sock, "WATCHDOG=1", Duration::from_secs(3), &mut seen);

    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(repo.join("jobs/tiny.toml")).unwrap();
    let text = text
        .split("[publish]")
        .next()
        .unwrap()
        .replace("data/tiny_", &format!("{}/jobs/data/tiny_", repo.display()));
    let job = d.write("tiny.toml", &text);
    let id = d.submit(&job);
    recv_until(
        &sock,
        "STATUS=1 running",
        Duration::from_secs(10),
        &mut seen,
    );
    wait_for("training to make progress", Duration::from_secs(60), || {
        std::fs::read_to_string(d.state.join(format!("jobs/{id}/progress.json")))
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .and_then(|v| v["step"].as_u64())
            .is_some_and(|s| s >= 30)
    });
    let pid = d.pid() as i32;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    recv_until(&sock, "STOPPING=1", Duration::from_secs(5), &mut seen);
    let status = d.stop_wait();
    assert!(
        status.success(),
        "jobd exits cleanly after checkpointing its workers"
    );

    // A checkpoint from the stop exists (not only the save_steps ones), and the job was
    // recorded interrupted before the daemon exited.
    let ckpts: Vec<u64> = std::fs::read_dir(d.state.join(format!("jobs/{id}/checkpoints")))
        .unwrap()
        .filter_map(|e| {
            e.ok()?
                .file_name()
                .to_str()?
                .strip_prefix("checkpoint-")?
                .parse()
                .ok()
        })
        .collect();
    assert!(
        ckpts.iter().any(|s| s % 100 != 0),
        "checkpoint written on SIGTERM: {ckpts:?}"
    );
    d.restart();
    let events = d.events(id);
    let interrupted = events
        .iter()
        .find(|e| e.state == JobState::Interrupted)
        .expect("interrupted event");
    assert!(
        interrupted.reason.contains("daemon stopping"),
        "{}",
        interrupted.reason
    );
    assert!(
        events
            .iter()
            .any(|e| e.reason.contains("requeued at daemon start")),
        "{events:?}"
    );
    let out = d.jobctl(&["wait", &id.to_string()]);
    assert!(
        out.status.success(),
        "the job resumes and finishes: {}",
        stderr(&out)
    );
    let log = std::fs::read_to_string(d.state.join(format!("jobs/{id}/stderr.log"))).unwrap();
    assert!(log.contains("resumed from step"), "{log}");
}

/// SIGHUP (`systemctl reload`) restarts jobd in place: the same process runs the executable
/// again with the configuration file as it is now, keeps its listening sockets (the TCP port
/// stays; clients asking meanwhile are answered), and takes its running jobs over — they
/// neither stop nor run again, and, being its children still, their real exit status is
/// known. A configuration with an error refuses the restart. (SIGHUP used to be ignored.)
#[test]
fn sighup_restarts_in_place_and_jobs_keep_running() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let d = TestDaemon::start_full(
        &["--gpus", "none"],
        "",
        &[("NOTIFY_SOCKET", path.to_str().unwrap())],
    );
    let mut seen = Vec::new();
    recv_until(&sock, "READY=1", Duration::from_secs(5), &mut seen);
    let marks = d.path("marks");
    let ok = d.submit(&d.write(
        "ok.toml",
        &command_job(
            &format!(
                "echo start-$JOBD_ATTEMPT | tee -a {0}; sleep 3; echo end-$JOBD_ATTEMPT | tee -a {0}",
                marks.display()
            ),
            "",
        ),
    ));
    let killed = d.submit(&d.write("killed.toml", &command_job("sleep 60", "")));
    d.wait_state(ok, JobState::Running, Duration::from_secs(20));
    d.wait_state(killed, JobState::Running, Duration::from_secs(20));
    let pid = d.pid() as i32;
    let addr = d.addr();

    // An error in the configuration file: refused, nothing changes.
    let good = std::fs::read_to_string(&d.config).unwrap();
    std::fs::write(&d.config, format!("{good}\nno_such_key = 1\n")).unwrap();
    let hup = || {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGHUP,
        )
        .unwrap()
    };
    hup();
    wait_for("the refusal", Duration::from_secs(10), || {
        d.log().contains("SIGHUP: not restarting")
    });
    assert!(d.log().contains("no_such_key"), "{}", d.log());
    std::fs::write(&d.config, &good).unwrap();

    // A follower of the job's log goes on through the restart.
    let follower = std::process::Command::new(JOBCTL)
        .args(["logs", "-f", &ok.to_string()])
        .env("JOBD_URL", &d.socket)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    hup();
    // Clients keep being answered while it restarts.
    let until = Instant::now() + Duration::from_millis(1500);
    let mut asked = 0;
    while Instant::now() < until {
        let out = d.jobctl(&["list", "--all"]);
        assert!(
            out.status.success(),
            "answered during the restart: {}",
            stderr(&out)
        );
        asked += 1;
    }
    recv_until(&sock, "RELOADING=1", Duration::from_secs(5), &mut seen);
    recv_until(&sock, "READY=1", Duration::from_secs(10), &mut seen);
    assert!(asked > 3, "{asked}");
    assert_eq!(d.pid() as i32, pid, "the same process");
    assert_eq!(d.addr(), addr, "the same TCP socket");
    assert!(
        d.log().contains("handing over to the next daemon image"),
        "{}",
        d.log()
    );

    for id in [ok, killed] {
        let rec = d.job(id).record;
        assert_eq!(
            (rec.state, rec.attempts),
            (JobState::Running, 1),
            "{:#?}",
            d.events(id)
        );
        // Nobody's news: the job's history does not change.
        d.assert_not_said(id, "daemon restarted");
    }
    let supervisor = d.job(killed).record.process.unwrap().pid;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(supervisor),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    d.wait_state(killed, JobState::Failed, Duration::from_secs(20));
    let reason = d.job(killed).record.reason.unwrap_or_default();
    assert!(
        reason.contains("killed by SIGKILL"),
        "its own exit status: {reason}"
    );

    d.wait_state(ok, JobState::Succeeded, Duration::from_secs(20));
    assert_eq!(
        std::fs::read_to_string(&marks).unwrap(),
        "start-1\nend-1\n",
        "one run, never stopped"
    );
    let follower = follower.wait_with_output().unwrap();
    assert!(follower.status.success(), "{}", stderr(&follower));
    assert!(
        !stderr(&follower).contains("lost jobd"),
        "a restart in place goes unremarked: {}",
        stderr(&follower)
    );
    assert_eq!(
        stdout(&follower),
        "start-1\nend-1\n",
        "each line once: {}",
        stderr(&follower)
    );
    // Still a daemon that works: a new job runs, and a cancel reaches it as SIGTERM (the new
    // image's threads block the stop signals; jobs must not inherit that).
    let again = d.submit(&d.write("again.toml", &command_job("true", "")));
    d.wait_state(again, JobState::Succeeded, Duration::from_secs(20));
    let trap = d.submit(&d.write(
        "trap.toml",
        &command_job(
            "trap 'echo got TERM; exit 0' TERM; echo ready; while :; do sleep 0.1; done",
            "",
        ),
    ));
    d.wait_output(trap, "ready");
    // Its supervisor passes stop signals on to what left the job's group: none blocked.
    let supervisor = d.job(trap).record.process.unwrap().pid;
    let status = std::fs::read_to_string(format!("/proc/{supervisor}/status")).unwrap();
    let blocked = status.lines().find(|l| l.starts_with("SigBlk:")).unwrap();
    assert!(blocked.ends_with("0000000000000000"), "{blocked}");
    assert!(d.jobctl(&["cancel", &trap.to_string()]).status.success());
    d.wait_state(trap, JobState::Cancelled, Duration::from_secs(20));
    let out = std::fs::read_to_string(d.state.join(format!("jobs/{trap}/stdout.log"))).unwrap();
    assert!(out.contains("got TERM"), "the job got SIGTERM: {out}");
    let reason = d.job(trap).record.reason.unwrap_or_default();
    assert!(reason.contains("exit code 0"), "{reason}");
}

/// `systemd-analyze verify` accepts dist/jobd.service (with ExecStart pointed at the built
/// binary), where systemd is installed.
#[test]
fn unit_file_verifies() {
    let Ok(out) = std::process::Command::new("systemd-analyze")
        .arg("--version")
        .output()
    else {
        eprintln!(
            "SKIPPED: systemd-analyze is not installed here (scripts/test.sh installs it with apt-get where it can)"
        );
        return;
    };
    assert!(out.status.success());
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let unit = std::fs::read_to_string(repo.join("dist/jobd.service")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("jobd.service");
    std::fs::write(&path, unit.replace("/usr/local/bin/jobd", JOBD)).unwrap();
    let out = std::process::Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&path)
        .output()
        .unwrap();
    let text = format!("{}{}", stdout(&out), stderr(&out));
    assert!(
        out.status.success(),
        "systemd-analyze verify failed:\n{text}"
    );
    assert!(
        !text.contains("jobd.service:"),
        "warnings about the unit:\n{text}"
    );
}

/// A stop asked for while jobd restarts in place (`systemctl reload` then `systemctl stop`)
/// is a normal stop done by the restarted daemon: jobs are asked to checkpoint and recorded
/// interrupted, and jobd exits 0. (It used to exit at once as on a second stop signal,
/// leaving the jobs running unwatched.)
#[test]
fn a_stop_during_a_restart_in_place_is_a_clean_stop() {
    let mut d = TestDaemon::start(&["--gpus", "none"]);
    let id = d.submit(&d.write(
        "j.toml",
        &command_job(
            "trap 'echo got TERM; exit 75' TERM; echo ready; while :; do sleep 0.1; done",
            "",
        ),
    ));
    d.wait_output(id, "ready");
    // An open log stream makes the restart take a moment.
    let mut follower = std::process::Command::new(JOBCTL)
        .args(["logs", "-f", &id.to_string()])
        .env("JOBD_URL", &d.socket)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let pid = nix::unistd::Pid::from_raw(d.pid() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let status = d.wait_exit(Duration::from_secs(30));
    let _ = follower.kill();
    let _ = follower.wait();
    assert_eq!(status.code(), Some(0), "{}", d.log());
    assert!(
        d.log().contains("handing over"),
        "it did restart: {}",
        d.log()
    );
    let out = std::fs::read_to_string(d.state.join(format!("jobs/{id}/stdout.log"))).unwrap();
    assert!(out.contains("got TERM"), "the job was asked to stop: {out}");
    d.restart();
    let events = d.events(id);
    assert!(
        events
            .iter()
            .any(|e| e.state == JobState::Interrupted && e.reason.contains("daemon stopping")),
        "{events:#?}"
    );
    assert!(d.jobctl(&["cancel", &id.to_string()]).status.success());
}
