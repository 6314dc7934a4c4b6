//! A job's directory belongs to its owner, who can put links, FIFOs and other surprises in
//! it between attempts. A root daemon must never act on them with its own rights, and no
//! reader may hang on them.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::{Duration, Instant};

use jobd::spec::JobState;

use crate::daemon::*;

/// A root-only file (0600) or directory (0700) with known content.
fn victim(d: &TestDaemon, name: &str, dir: bool) -> std::path::PathBuf {
    let p = d.path(name);
    if dir {
        std::fs::create_dir(&p).unwrap();
        std::fs::write(p.join("inside"), b"secret\n").unwrap();
    } else {
        std::fs::write(&p, b"secret\n").unwrap();
    }
    let mode = if dir { 0o700 } else { 0o600 };
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
    p
}

fn assert_untouched(p: &Path, dir: bool) {
    let m = std::fs::metadata(p).unwrap();
    assert_eq!(m.uid(), 0, "{} still belongs to root", p.display());
    let mode = if dir { 0o700 } else { 0o600 };
    assert_eq!(m.mode() & 0o777, mode, "{} keeps its mode", p.display());
    let file = if dir {
        p.join("inside")
    } else {
        p.to_path_buf()
    };
    assert_eq!(std::fs::read(file).unwrap(), b"secret\n", "{}", p.display());
}

/// The attacks a QA pass reproduced against a root daemon: on the next attempt the daemon
/// appended to and chowned a planted `stdout.log` link, wrote and chowned through `job.tmp`,
/// chmodded and chowned a linked `output/`, and served a linked `stderr.log` (/etc/shadow) as
/// the job's log. Now the links are refused (the attempt fails, saying why) and the targets
/// keep their owner, mode and content. Only meaningful when the tests run as root.
#[test]
fn links_planted_in_a_job_directory_are_never_followed_by_a_root_daemon() {
    if !nix::unistd::geteuid().is_root() {
        return;
    }
    let d = TestDaemon::start(&["--gpus", "none"]);
    let (log_victim, tmp_victim, dir_victim, read_victim) = (
        victim(&d, "log-victim", false),
        victim(&d, "tmp-victim", false),
        victim(&d, "dir-victim", true),
        victim(&d, "read-victim", false),
    );
    let retry = "[retry]\nmax = 1\nbackoff = \"1s\"\n";
    let submit = |name: &str, script: String, extra: &str| -> u64 {
        let f = d.write(name, &command_job(&script, extra));
        let out = d.jobctl_tcp(Some(TOKEN_NOBODY), &["submit", f.to_str().unwrap()]);
        assert!(out.status.success(), "{}", stderr(&out));
        stdout(&out).trim().parse().unwrap()
    };
    let files = submit(
        "files.toml",
        format!(
            "cd \"$JOBD_JOB_DIR\" && rm -f stdout.log && ln -s {} stdout.log && ln -s {} job.tmp; exit 1",
            log_victim.display(),
            tmp_victim.display()
        ),
        retry,
    );
    let dir = submit(
        "dir.toml",
        format!(
            "cd \"$JOBD_JOB_DIR\" && rm -rf output && ln -s {} output; exit 1",
            dir_victim.display()
        ),
        retry,
    );
    let read = submit(
        "read.toml",
        format!(
            "cd \"$JOBD_JOB_DIR\" && rm -f stderr.log && ln -s {} stderr.log",
            read_victim.display()
        ),
        "",
    );
    for id in [files, dir] {
        d.wait_state(id, JobState::Failed, Duration::from_secs(30));
        let reason = d.job(id).record.reason.unwrap_or_default();
        assert!(reason.contains("is a symbolic link"), "job {id}: {reason}");
    }
    d.wait_state(read, JobState::Succeeded, Duration::from_secs(30));
    let logs = d.jobctl_tcp(Some(TOKEN_NOBODY), &["logs", "--stderr", &read.to_string()]);
    assert!(!stdout(&logs).contains("secret"), "{}", stdout(&logs));
    assert_untouched(&log_victim, false);
    assert_untouched(&tmp_victim, false);
    assert_untouched(&dir_victim, true);
    assert_untouched(&read_victim, false);
    assert!(!d.log().contains("panicked"), "{}", d.log());
}

/// A FIFO in place of `metrics.jsonl` or `stdout.log` is not a log: the metrics, logs and
/// job-stream endpoints answer at once (a blocking open used to wait for a writer forever,
/// holding a runtime thread, until the daemon stopped answering even `/health`).
#[test]
fn a_fifo_in_a_job_directory_hangs_no_reader() {
    let d = TestDaemon::start(&["--gpus", "none"]);
    let f = d.write(
        "fifo.toml",
        &command_job(
            "cd \"$JOBD_JOB_DIR\" && mkfifo metrics.jsonl && rm -f stdout.log && mkfifo stdout.log && echo ready >&2 && sleep 60",
            "",
        ),
    );
    let id = d.submit(&f);
    wait_for("the FIFOs", Duration::from_secs(20), || {
        std::fs::read_to_string(d.state.join(format!("jobs/{id}/stderr.log")))
            .is_ok_and(|s| s.contains("ready"))
    });
    let get = |path: &str| {
        let started = Instant::now();
        let r = raw_http(
            d.addr(),
            format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        );
        (r, started.elapsed())
    };
    for _ in 0..3 {
        let ((status, body), took) = get(&format!("/api/v1/jobs/{id}/metrics"));
        assert!(took < Duration::from_secs(5), "metrics took {took:?}");
        assert_eq!(status, 409, "{body}");
        assert!(body.contains("not a regular file"), "{body}");
        let ((status, body), took) = get(&format!("/api/v1/jobs/{id}/logs"));
        assert!(
            took < Duration::from_secs(5),
            "logs took {took:?}: {status} {body}"
        );
    }
    // jobctl says what is wrong and ends (it used to take the broken stream for a daemon
    // restart: exit 2, and `-f` reconnected forever).
    for args in [vec!["logs"], vec!["logs", "-f"]] {
        let started = Instant::now();
        let mut all = args.clone();
        let id_s = id.to_string();
        all.push(&id_s);
        let out = d.jobctl(&all);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {}", stderr(&out));
        assert!(
            stderr(&out).contains("not a regular file"),
            "{}",
            stderr(&out)
        );
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{:?}",
            started.elapsed()
        );
    }
    let ((status, _), took) = get("/api/v1/health");
    assert_eq!(status, 200);
    assert!(took < Duration::from_secs(2), "{took:?}");
    let out = d.jobctl(&["cancel", &id.to_string()]);
    assert!(out.status.success(), "{}", stderr(&out));
    d.wait_state(id, JobState::Cancelled, Duration::from_secs(20));
}

/// Files a job owns cannot make the daemon read gigabytes: a sparse 8 GiB `metrics.jsonl`
/// (its newest records are served) and `progress.json` (ignored) cost the daemon no more
/// than their limits (both used to be read whole, per request, on the async threads).
#[test]
fn huge_job_files_are_read_only_up_to_a_limit() {
    let d = TestDaemon::start(&["--gpus", "none"]);
    let f = d.write(
        "huge.toml",
        &command_job(
            "cd \"$JOBD_JOB_DIR\" && truncate -s 8G metrics.jsonl && \
             printf '\\n{\"step\": 7, \"loss\": 1.5}\\n' >> metrics.jsonl && \
             truncate -s 8G progress.json && echo ready >&2 && sleep 60",
            "",
        ),
    );
    let id = d.submit(&f);
    wait_for("the files", Duration::from_secs(20), || {
        std::fs::read_to_string(d.state.join(format!("jobs/{id}/stderr.log")))
            .is_ok_and(|s| s.contains("ready"))
    });
    let get = |path: &str| {
        raw_http(
            d.addr(),
            format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
    };
    let (status, body) = get(&format!("/api/v1/jobs/{id}/metrics"));
    assert_eq!(status, 200, "{body}");
    let records: serde_json::Value = serde_json::from_str(body.trim()).unwrap();
    assert_eq!(records, serde_json::json!([{"step": 7, "loss": 1.5}]));
    let (status, body) = get(&format!("/api/v1/jobs/{id}"));
    assert_eq!(status, 200, "{body}");
    let (status, _) = get("/api/v1/queue");
    assert_eq!(status, 200);
    let rss_kib = std::fs::read_to_string(format!("/proc/{}/status", d.pid()))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap();
    assert!(rss_kib < 1 << 20, "the daemon's peak RSS is {rss_kib} KiB");
    let out = d.jobctl(&["cancel", &id.to_string()]);
    assert!(out.status.success(), "{}", stderr(&out));
}

/// A root daemon acts on a job file's paths with its owner's rights only: a job cannot start
/// in a working directory its owner cannot enter (the daemon used to enter it as root before
/// switching users, and the job read what was there), and checking a file names no path its
/// owner could not see (root's checks told "does not exist" from "not executable" in closed
/// directories). Only meaningful as root.
#[test]
fn a_job_file_is_checked_and_run_with_its_owners_rights() {
    if !nix::unistd::geteuid().is_root() {
        return;
    }
    let d = TestDaemon::start(&["--gpus", "none"]);
    let closed = d.path("closed");
    std::fs::create_dir_all(closed.join("open")).unwrap();
    std::fs::write(closed.join("open/secret.txt"), "secret\n").unwrap();
    std::fs::write(closed.join("present"), "").unwrap();
    std::fs::set_permissions(&closed, std::fs::Permissions::from_mode(0o755)).unwrap();
    let post = |path: &str, toml: String| {
        let body = serde_json::json!({"toml": toml, "base_dir": "/"}).to_string();
        post_json(d.addr(), path, Some(TOKEN_NOBODY), &body)
    };
    let id_of = |resp: &str| {
        serde_json::from_str::<serde_json::Value>(resp).unwrap()["id"]
            .as_u64()
            .unwrap()
    };
    // Submitted while the directory is open; closed before the job starts.
    let (status, resp) = post(
        "/api/v1/jobs",
        "kind = \"command\"\n[command]\nargv = [\"sleep\", \"1\"]\n".into(),
    );
    assert_eq!(status, 201, "{resp}");
    let blocker = id_of(&resp);
    let job = format!(
        "kind = \"command\"\ndepends_on = [{blocker}]\n[command]\nargv = [\"/bin/cat\", \"secret.txt\"]\nworkdir = \"{}\"\n",
        closed.join("open").display()
    );
    let (status, resp) = post("/api/v1/jobs", job.clone());
    assert_eq!(status, 201, "{resp}");
    let id = id_of(&resp);
    std::fs::set_permissions(&closed, std::fs::Permissions::from_mode(0o700)).unwrap();
    d.wait_state(id, JobState::Failed, Duration::from_secs(20));
    let reason = d.job(id).record.reason.unwrap_or_default();
    assert!(reason.contains("as nobody in"), "{reason}");
    let log =
        std::fs::read_to_string(d.state.join(format!("jobs/{id}/stdout.log"))).unwrap_or_default();
    assert!(!log.contains("secret"), "{log}");
    // Now closed: refused at submit, saying nothing about what is inside.
    let (status, resp) = post("/api/v1/jobs", job);
    assert_eq!(status, 400, "{resp}");
    // A working directory that is there but closed to the owner is refused at submit too,
    // not at the job's start (QA: accepted, then "cannot start … Permission denied").
    let private = d.path("private");
    std::fs::create_dir(&private).unwrap();
    std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700)).unwrap();
    let (status, resp) = post(
        "/api/v1/jobs",
        format!(
            "kind = \"command\"\n[command]\nargv = [\"true\"]\nworkdir = \"{}\"\n",
            private.display()
        ),
    );
    assert!(
        status == 400 && resp.contains("command.workdir") && resp.contains("cannot enter it"),
        "{status} {resp}"
    );
    let probe = |name: &str| {
        let toml = format!(
            "kind = \"command\"\n[command]\nargv = [\"{}\"]\n",
            closed.join(name).display()
        );
        let (status, resp) = post("/api/v1/jobs/validate", toml);
        (status, resp.replace(name, "NAME"))
    };
    assert_eq!(
        probe("present"),
        probe("absent"),
        "no difference to learn from"
    );
}

/// `logs` of a job whose job directory was removed says so (it printed nothing and exited 0).
#[test]
fn logs_of_a_removed_job_directory_say_so() {
    let d = TestDaemon::start(&["--gpus", "none"]);
    let id = d.submit(&d.write("hi.toml", &command_job("echo hi", "")));
    d.wait_state(id, JobState::Succeeded, Duration::from_secs(20));
    std::fs::remove_dir_all(d.state.join(format!("jobs/{id}"))).unwrap();
    let out = d.jobctl(&["logs", &id.to_string()]);
    assert!(
        out.status.code() == Some(1) && stderr(&out).contains("job directory"),
        "{}",
        stderr(&out)
    );
}
