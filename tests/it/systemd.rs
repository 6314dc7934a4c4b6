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
