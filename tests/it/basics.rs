//! The everyday path: submit, list, show, logs, wait, cancel — over the unix socket and TCP.

use std::path::Path;
use std::time::{Duration, Instant};

use jobd::spec::JobState;

use crate::daemon::*;

/// submit / list / show / logs -f / wait / cancel over the unix socket: each does what it says.
#[test]
fn submit_list_show_logs_wait_cancel_over_the_socket() {
    let d = TestDaemon::start(&["--gpus", "fake:24GiB"]);
    let job = d.write(
        "hello.toml",
        &command_job(
            "echo \"job $JOBD_JOB_ID ($JOBD_JOB_NAME) attempt $JOBD_ATTEMPT gpus=[$CUDA_VISIBLE_DEVICES] order=$CUDA_DEVICE_ORDER fake=$JOBD_FAKE_GPUS\"; echo to-stderr >&2; sleep 0.3; echo bye",
            "name = \"hello\"\n[resources]\ngpus = 1\nvram = \"10GiB\"",
        ),
    );
    let id = d.submit(&job);
    let list = stdout(&d.jobctl(&["list", "--all"]));
    assert!(list.contains("hello") && list.contains("ID"), "{list}");

    // logs -f returns when the job ends, with everything it printed.
    let logs = d.jobctl(&["logs", "-f", &id.to_string()]);
    assert!(logs.status.success());
    assert_eq!(
        stdout(&logs),
        format!("job {id} (hello) attempt 1 gpus=[0] order=PCI_BUS_ID fake=1\nbye\n"),
        "stdout of the job, in full"
    );
    let err = stdout(&d.jobctl(&["logs", "--stderr", &id.to_string()]));
    assert_eq!(err, "to-stderr\n");

    let wait = d.jobctl(&["wait", &id.to_string()]);
    assert!(wait.status.success(), "{}", stderr(&wait));
    assert!(stdout(&wait).contains("succeeded"));

    let show = stdout(&d.jobctl(&["show", &id.to_string()]));
    for want in [
        "state: succeeded",
        "GPU 0 (10GiB)",
        "exit code 0",
        "history:",
    ] {
        assert!(show.contains(want), "show lacks {want:?}:\n{show}");
    }
    let v = d.job(id);
    assert_eq!(v.record.placement.unwrap().gpus[0].index, 0);
    let states: Vec<_> = d.events(id).iter().map(|e| e.state).collect();
    assert_eq!(
        states,
        vec![
            JobState::Queued,
            JobState::Starting,
            JobState::Running,
            JobState::Succeeded
        ]
    );

    // Cancel a running job: it ends as cancelled.
    let long = d.write("long.toml", &command_job("echo started; sleep 30", ""));
    let id2 = d.submit(&long);
    d.wait_state(id2, JobState::Running, Duration::from_secs(10));
    let c = d.jobctl(&["cancel", &id2.to_string()]);
    assert!(c.status.success(), "{}", stderr(&c));
    let w = d.jobctl(&["wait", &id2.to_string()]);
    assert_eq!(
        w.status.code(),
        Some(1),
        "wait exits 1 when the job did not succeed"
    );
    assert_eq!(d.state(id2), JobState::Cancelled);
    // Cancelling it again is a clear conflict.
    let again = d.jobctl(&["cancel", &id2.to_string()]);
    assert_eq!(again.status.code(), Some(1));
    assert!(
        stderr(&again).contains("already been cancelled"),
        "{}",
        stderr(&again)
    );
}

/// The same operations over TCP with a bearer token.
#[test]
fn submit_logs_wait_cancel_over_tcp_with_a_token() {
    let d = TestDaemon::start(&["--gpus", "none"]);
    let job = d.write("t.toml", &command_job("echo over-tcp; whoami", ""));
    let out = d.jobctl_tcp(Some(TOKEN_NOBODY), &["submit", job.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let id: u64 = stdout(&out).trim().parse().unwrap();
    let logs = d.jobctl_tcp(Some(TOKEN_NOBODY), &["logs", "-f", &id.to_string()]);
    assert!(logs.status.success(), "{}", stderr(&logs));
    let text = stdout(&logs);
    assert!(text.starts_with("over-tcp\n"), "{text}");
    if nix::unistd::geteuid().is_root() {
        // A root daemon runs the job as its owner, never as root.
        assert_eq!(text, "over-tcp\nnobody\n");
    }
    let w = d.jobctl_tcp(Some(TOKEN_NOBODY), &["wait", &id.to_string()]);
    assert!(w.status.success(), "{}", stderr(&w));
    let v = d.job(id);
    assert_eq!(v.record.owner.user, "nobody");

    let long = d.write("long.toml", &command_job("sleep 30", ""));
    let out = d.jobctl_tcp(Some(TOKEN_NOBODY), &["submit", long.to_str().unwrap()]);
    let id2 = stdout(&out).trim().to_string();
    let c = d.jobctl_tcp(Some(TOKEN_NOBODY), &["cancel", &id2]);
    assert!(c.status.success(), "{}", stderr(&c));
    let list = d.jobctl_tcp(None, &["list", "--all"]);
    assert!(
        list.status.success(),
        "anyone may read the queue: {}",
        stderr(&list)
    );
}

/// `submit --follow` streams the output and exits with the job's success.
#[test]
fn submit_follow_streams_and_reports_the_outcome() {
    let d = TestDaemon::start(&["--gpus", "none"]);
    let ok = d.write("ok.toml", &command_job("echo one; sleep 0.2; echo two", ""));
    let out = d.jobctl(&["submit", "--follow", ok.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).starts_with("one\ntwo\n"), "{}", stdout(&out));
    let bad = d.write("bad.toml", &command_job("echo failing; exit 3", ""));
    let out = d.jobctl(&["submit", "--follow", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stdout(&out).contains("failed: exit code 3"),
        "{}",
        stdout(&out)
    );
    // With --json, stdout is one JSON object (the job as it ended); its output goes to stderr.
    let out = d.jobctl(&["--json", "submit", "--follow", ok.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", stdout(&out)));
    assert_eq!(v["state"], "succeeded", "{v}");
    assert!(stderr(&out).contains("one\ntwo\n"), "{}", stderr(&out));
    // Errors found by jobctl itself leave an error object too.
    let broken = d.write("broken.toml", "kind = \"command\"\n[command\n");
    let out = d.jobctl(&["--json", "submit", broken.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", stdout(&out)));
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("broken.toml:2"),
        "{v}"
    );
}

/// A job whose processes ignore SIGTERM is killed after the grace period, leaving nothing.
#[test]
fn cancel_escalates_to_sigkill_after_the_grace_period() {
    let d = TestDaemon::start(&["--gpus", "none", "--grace-period", "1s"]);
    let marker = format!("jobd-test-marker-{}", std::process::id());
    let script = d.write(
        "stubborn.sh",
        &format!("#!/bin/sh\ntrap '' TERM\nsh -c 'while :; do sleep 1; done' {marker} &\necho ready\nwait\nwait\n"),
    );
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let job = d.write(
        "stubborn.toml",
        "kind = \"command\"\n[command]\nargv = [\"./stubborn.sh\"]\n",
    );
    let id = d.submit(&job);
    let logs_ready = || {
        std::fs::read_to_string(d.state.join(format!("jobs/{id}/stdout.log")))
            .unwrap_or_default()
            .contains("ready")
    };
    wait_for("job to start", Duration::from_secs(10), logs_ready);
    let alive = || {
        std::process::Command::new("pgrep")
            .args(["-f", &marker])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    };
    assert!(alive(), "the stubborn child runs");
    let t = Instant::now();
    assert!(d.jobctl(&["cancel", &id.to_string()]).status.success());
    d.wait_state(id, JobState::Cancelled, Duration::from_secs(10));
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(900),
        "waited for the grace period ({took:?})"
    );
    assert!(took < Duration::from_secs(6), "then killed ({took:?})");
    wait_for("no orphan left", Duration::from_secs(3), || !alive());
    let reason = d.job(id).record.reason.unwrap();
    assert!(reason.contains("SIGKILL"), "{reason}");
}

/// jobctl's output read by a reader that stops early (`jobctl list | head -3`): jobctl ends at
/// once with 0 and says nothing, as a C tool would, whatever the command (tables, streamed
/// logs, completions, the man page); `logs -f` and `submit --follow` do not wait for the job.
#[test]
fn a_reader_that_stops_early_ends_jobctl_quietly() {
    use std::process::{Command, Stdio};
    let d = TestDaemon::start(&[]);
    // Far more than a pipe holds, then a long wait.
    let long = d.write(
        "long.toml",
        &command_job("seq 1 300000; sleep 60", "name = \"long\""),
    );
    let id = d.submit(&long).to_string();
    wait_for("the job's output", Duration::from_secs(20), || {
        std::fs::metadata(d.state.join(format!("jobs/{id}/stdout.log")))
            .is_ok_and(|m| m.len() > 1 << 20)
    });
    let socket = d.socket.display().to_string();
    let file = long.to_str().unwrap();
    for args in [
        vec!["list", "--all"],
        vec!["show", &id],
        vec!["logs", &id],
        vec!["logs", "-f", &id],
        vec!["submit", "--follow", file],
        vec!["completions", "bash"],
        vec!["man"],
    ] {
        let t = Instant::now();
        let mut child = Command::new(JOBCTL)
            .args(&args)
            .env("JOBD_URL", &socket)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // The reader goes away before reading anything.
        drop(child.stdout.take());
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {:?} {}",
            out.status,
            stderr(&out)
        );
        assert!(
            !stderr(&out).contains("panicked"),
            "{args:?}: {}",
            stderr(&out)
        );
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "{args:?} waited for the job"
        );
    }
    // The job, and the second one `submit --follow` queued, still wait; cancel both.
    let second = (id.parse::<u64>().unwrap() + 1).to_string();
    let cancel = d.jobctl(&["cancel", &id, &second]);
    assert!(cancel.status.success(), "{}", stderr(&cancel));
}

/// `logs -n N` starts with the last N lines (QA: `--tail` counts bytes and cut lines in two);
/// `--json logs` is one object with the text, and with `-f` one object per chunk, whole
/// characters only (QA: `--json` was ignored and printed raw text).
#[test]
fn logs_by_lines_and_as_json() {
    let d = TestDaemon::start(&["--gpus", "none"]);
    // 200 lines of multi-byte text, the last one without a newline; then more while followed.
    let script = "for i in $(seq 1 200); do echo \"línea $i ✓\"; done; printf 'último'; sleep 1; printf ' fin\\n'";
    let id = d.submit(&d.write("lines.toml", &command_job(script, "")));
    let job = id.to_string();
    wait_for("the first 200 lines", Duration::from_secs(20), || {
        stdout(&d.jobctl(&["logs", &job])).contains("último")
    });
    let out = d.jobctl(&["logs", "-n", "3", &job]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(
        text == "línea 199 ✓\nlínea 200 ✓\núltimo" || text == "línea 200 ✓\núltimo fin\n",
        "{text:?}"
    );
    let all = d.jobctl(&["logs", "-f", "-n", "2", &job]);
    assert_eq!(stdout(&all), "línea 200 ✓\núltimo fin\n");
    let out = d.jobctl(&["--json", "logs", "-n", "1", &job]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["text"], "último fin\n", "{v}");
    assert_eq!(v["stream"], "stdout");
    let whole = std::fs::read(d.state.join(format!("jobs/{id}/stdout.log"))).unwrap();
    assert_eq!(
        v["offset"].as_u64().unwrap() as usize,
        whole.len() - "último fin\n".len()
    );
    // -f with --json: JSON lines whose texts join to the whole log, offsets in order.
    let out = d.jobctl(&["--json", "logs", "-f", &job]);
    assert!(out.status.success(), "{}", stderr(&out));
    let mut joined = String::new();
    let mut next = 0;
    for line in stdout(&out).lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(v["offset"].as_u64().unwrap(), next, "{line}");
        let t = v["text"].as_str().unwrap();
        next += t.len() as u64;
        joined.push_str(t);
    }
    assert_eq!(joined.as_bytes(), whole.as_slice());
}

/// Several ids under `--json`: each gets its job or an error entry, and the rest go on (QA:
/// failures vanished from the array, and `wait` lost the jobs it had). Cancelling a running
/// job and the queued job waiting for its GPU cancels the queued one first, so it never starts
/// in between.
#[test]
fn several_ids_report_each_and_cancel_queued_first() {
    let d = TestDaemon::start(&["--gpus", "fake:24GiB"]);
    let gpu = "[resources]\ngpus = 1\nvram = \"20GiB\"";
    let running = d.submit(&d.write("r.toml", &command_job("sleep 60", gpu)));
    d.wait_state(running, JobState::Running, Duration::from_secs(20));
    let queued = d.submit(&d.write("q.toml", &command_job("sleep 60", gpu)));
    let out = d.jobctl(&[
        "--json",
        "cancel",
        &running.to_string(),
        &queued.to_string(),
        "999",
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let entries: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(entries.len(), 3, "{entries:?}");
    let missing = entries.iter().find(|e| e["id"] == 999).unwrap();
    assert_eq!(missing["error"]["code"], "not_found", "{missing}");
    assert!(
        entries
            .iter()
            .any(|e| e["id"] == running && e["error"].is_null())
    );
    d.wait_state(running, JobState::Cancelled, Duration::from_secs(20));
    let states: Vec<JobState> = d.events(queued).iter().map(|e| e.state).collect();
    assert_eq!(
        states,
        [JobState::Queued, JobState::Cancelled],
        "never started"
    );

    // Filters are the user's text: encoded, and "a, b" is a list like "a,b" (QA: "invalid
    // uri character", and an owner of 'x&state=failed' applied a state filter).
    let out = d.jobctl(&["list", "--all", "--state", "queued, cancelled"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains(&queued.to_string()),
        "{}",
        stdout(&out)
    );
    let out = d.jobctl(&["--json", "list", "--all", "--user", "root&state=failed"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["total"], 0, "no user has that name: {v}");

    let out = d.jobctl(&["--json", "wait", "999", &running.to_string()]);
    assert_eq!(out.status.code(), Some(1));
    let entries: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(entries[0]["error"]["code"], "not_found", "{entries:?}");
    assert_eq!(entries[1]["id"], running, "{entries:?}");
    assert_eq!(entries[1]["state"], "cancelled", "{entries:?}");
}

/// `cancel --mine` (like `scancel -u`): every job of the caller's that has not ended, or only
/// those in `--state`; other users' jobs are left alone. `logs` on a job that has not started
/// says so instead of printing nothing.
#[test]
fn cancel_mine_by_state_and_logs_of_a_queued_job() {
    let d = TestDaemon::start(&["--gpus", "fake:24GiB"]);
    let gpu = "[resources]\ngpus = 1\nvram = \"20GiB\"";
    let f = d.write("g.toml", &command_job("sleep 60", gpu));
    let submit_as = |token: &str| -> u64 {
        let out = d.jobctl_tcp(Some(token), &["submit", f.to_str().unwrap()]);
        assert!(out.status.success(), "{}", stderr(&out));
        stdout(&out).trim().parse().unwrap()
    };
    let running = submit_as(TOKEN_NOBODY);
    d.wait_state(running, JobState::Running, Duration::from_secs(20));
    let (queued, theirs) = (submit_as(TOKEN_NOBODY), submit_as(TOKEN_DAEMON));

    let out = d.jobctl_tcp(Some(TOKEN_NOBODY), &["logs", &queued.to_string()]);
    assert!(
        out.status.success() && stderr(&out).contains("has not started yet"),
        "{}",
        stderr(&out)
    );
    let out = d.jobctl_tcp(
        Some(TOKEN_NOBODY),
        &["cancel", "--mine", "--state", "queued"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out).trim(), format!("job {queued}: cancelled"));
    assert_eq!(d.state(running), JobState::Running);
    let out = d.jobctl_tcp(Some(TOKEN_NOBODY), &["cancel", "--mine"]);
    assert!(out.status.success(), "{}", stderr(&out));
    d.wait_state(running, JobState::Cancelled, Duration::from_secs(20));
    // Another user's job is left alone (it takes the freed GPU).
    d.wait_state(theirs, JobState::Running, Duration::from_secs(20));
    let out = d.jobctl_tcp(Some(TOKEN_NOBODY), &["cancel", "--mine"]);
    assert!(
        out.status.success() && stderr(&out).contains("no job matches"),
        "{}",
        stderr(&out)
    );
}

/// `estimate --json` says, per GPU, whether the job fits now, once jobs there finish, or not
/// at all, with the figures behind it (it used to give only the index and a yes/no).
#[test]
fn estimate_json_gives_each_gpus_fit() {
    let d = TestDaemon::start(&["--gpus", "fake:64MiB,24GiB+24GiB,80GiB"]);
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("jobs");
    let text = std::fs::read_to_string(data.join("tiny.toml"))
        .unwrap()
        .replace("data/tiny_", &format!("{}/data/tiny_", data.display()));
    let file = d.write("tiny.toml", &text);
    let out = d.jobctl(&["--json", "estimate", file.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let need = v["needed_bytes"].as_u64().unwrap();
    assert!(need > 64 << 20 && need < 24 << 30, "{need}");
    let gpus = v["gpus"].as_array().unwrap();
    let fits: Vec<&str> = gpus.iter().map(|g| g["fit"].as_str().unwrap()).collect();
    assert_eq!(fits, ["too_small", "when_jobs_finish", "now"], "{v}");
    assert_eq!(gpus[1]["free_bytes"].as_u64(), Some(0), "{v}");
    assert_eq!(gpus[2]["total_bytes"].as_u64(), Some(80 << 30), "{v}");
    assert_eq!(gpus[0]["fits"], false);
    assert_eq!(gpus[1]["fits"], true);
}

/// `jobctl submit -` reads the job file from standard input, and relative paths in a job
/// file that is no file on disk (stdin, a pipe) are relative to the current directory (the
/// job ran in `/dev`); `--json` gives a bad job file's problems one by one.
#[test]
fn a_job_file_from_stdin_and_structured_problems() {
    use std::io::Write;
    let d = TestDaemon::start(&["--gpus", "none"]);
    let here = tempfile::tempdir().unwrap();
    std::fs::write(here.path().join("hello.sh"), "echo hello from $(pwd)\n").unwrap();
    let run = |args: &[&str], input: &str| {
        let mut child = std::process::Command::new(JOBCTL)
            .args(args)
            .env("JOBD_URL", &d.socket)
            .current_dir(here.path())
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    };
    let job = "kind = \"command\"\n[command]\nargv = [\"sh\", \"hello.sh\"]\n";
    let out = run(&["submit", "--follow", "-"], job);
    assert!(out.status.success(), "{}", stderr(&out));
    let dir = std::fs::canonicalize(here.path()).unwrap();
    assert!(
        stdout(&out).contains(&format!("hello from {}", dir.display())),
        "{}",
        stdout(&out)
    );
    let out = run(
        &["--json", "validate", "-"],
        "kind = \"command\"\n[resources]\ngpu = 1\n[command]\nargv = [\"true\"]\n",
    );
    assert_eq!(out.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["error"]["code"], "invalid_job", "{v}");
    let p = &v["error"]["problems"][0];
    assert_eq!(
        (p["key"].as_str(), p["line"].as_u64()),
        (Some("resources.gpu"), Some(3)),
        "{v}"
    );
}

/// A job that wrote only to stderr: `logs` says where its output is, and `show` of a failed
/// job ends with the last lines of its stderr (a traceback says why it failed).
#[test]
fn stderr_is_pointed_at_and_shown_for_a_failed_job() {
    let d = TestDaemon::start(&["--gpus", "none"]);
    let id = d.submit(&d.write(
        "boom.toml",
        &command_job(
            "echo 'Traceback: CUDA error: out of memory' >&2; exit 3",
            "",
        ),
    ));
    d.wait_state(id, JobState::Failed, Duration::from_secs(20));
    let out = d.jobctl(&["logs", &id.to_string()]);
    assert!(out.status.success());
    assert!(stdout(&out).is_empty());
    assert!(
        stderr(&out).contains(&format!("jobctl logs --stderr {id}")),
        "{}",
        stderr(&out)
    );
    let show = stdout(&d.jobctl(&["show", &id.to_string()]));
    assert!(
        show.contains("last lines of stderr") && show.contains("CUDA error: out of memory"),
        "{show}"
    );
}

/// A command job that writes `$JOBD_JOB_DIR/progress.json` has its progress shown, as a
/// train job has (it used to be ignored).
#[test]
fn a_command_job_can_report_progress() {
    let d = TestDaemon::start(&["--gpus", "none"]);
    let id = d.submit(&d.write(
        "progress.toml",
        &command_job(
            "printf '{\"step\": 3, \"total_steps\": 10}' > \"$JOBD_JOB_DIR/p.tmp\" && \
             mv \"$JOBD_JOB_DIR/p.tmp\" \"$JOBD_JOB_DIR/progress.json\" && sleep 30",
            "",
        ),
    ));
    wait_for("the progress", Duration::from_secs(20), || {
        d.job(id)
            .progress
            .is_some_and(|p| p.step == 3 && p.total_steps == 10)
    });
    let list = stdout(&d.jobctl(&["list"]));
    assert!(list.contains("3/10 30%"), "{list}");
    assert!(d.jobctl(&["cancel", &id.to_string()]).status.success());
}

/// `--set KEY=VALUE` changes a job file for one submission (sweeps from one file): values are
/// TOML (a bare word is a string), tables are made as needed, and a path through a value is
/// refused with its name.
#[test]
fn set_overrides_keys_of_the_job_file() {
    let d = TestDaemon::start(&["--gpus", "none"]);
    let file = d.write(
        "sweep.toml",
        "# a sweep\nname = \"base\"\nkind = \"command\"\n[command]\nargv = [\"sh\", \"-c\", \"echo $LR\"]\n",
    );
    let f = file.to_str().unwrap();
    let out = d.jobctl(&[
        "submit",
        "--follow",
        f,
        "--set",
        "name=lr-3e-4",
        "--set",
        "command.env.LR=3e-4",
        "--set",
        "resources.cpus=1",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).starts_with("3e-4\n"), "{}", stdout(&out));
    let job = d.all_jobs().into_iter().next().unwrap().record;
    assert_eq!(job.name, "lr-3e-4");
    assert_eq!(job.spec.resources.cpus, Some(1));
    let out = d.jobctl(&["validate", f, "--set", "name.first=x"]);
    assert!(
        out.status.code() == Some(1) && stderr(&out).contains("name is not a table"),
        "{}",
        stderr(&out)
    );
    let out = d.jobctl(&["validate", f, "--set", "resources.gpu=1"]);
    assert!(
        stderr(&out).contains("did you mean `gpus`"),
        "{}",
        stderr(&out)
    );
}

/// `cancel --mine` and `list` go past the API's pages of 1000 (cancel used to stop at the
/// newest 1000, silently); `list` shows running jobs first, however many newer jobs wait.
#[test]
fn cancel_mine_and_list_go_past_a_thousand_jobs() {
    let d = TestDaemon::start(&["--gpus", "none", "--max-cpu-jobs", "1"]);
    let running = d.submit(&d.write("long.toml", &command_job("sleep 60", "")));
    d.wait_state(running, JobState::Running, Duration::from_secs(20));
    let held = d.write("held.toml", &command_job("true", ""));
    // Through the API directly: 1100 jobctl processes would take longer than needed.
    let toml = std::fs::read_to_string(&held).unwrap();
    let body = serde_json::json!({
        "toml": toml, "base_dir": d.dir.path(), "hold": true,
    })
    .to_string();
    for _ in 0..1100 {
        let (status, text) = post_json(d.addr(), "/api/v1/jobs", Some(TOKEN_NOBODY), &body);
        assert_eq!(status, 201, "{text}");
    }
    let list = stdout(&d.jobctl(&["list", "--limit", "5"]));
    assert!(
        list.lines().nth(1).is_some_and(|l| l.contains("running")),
        "{list}"
    );
    let all = d.jobctl(&["list", "--limit", "0"]);
    assert_eq!(stdout(&all).lines().count(), 1 + 1101, "{}", stderr(&all));
    let out = d.jobctl_tcp(
        Some(TOKEN_NOBODY),
        &["cancel", "--mine", "--state", "queued"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let queued = d
        .all_jobs()
        .iter()
        .filter(|j| j.record.state == JobState::Queued)
        .count();
    assert_eq!(queued, 0);
}

/// `resubmit` runs a job's file again as a new job — a succeeded one too, which `requeue`
/// refuses (saying so) — with its relative paths where they were, `--set` on top; a job a
/// schedule queued makes a job, not a schedule; another user may resubmit a job only when
/// nothing in its file is hidden from them, and the copy is theirs.
#[test]
fn resubmit_runs_a_job_file_again_as_a_new_job() {
    let d = TestDaemon::start(&["--gpus", "none"]);
    let dir = d.path("exp");
    std::fs::create_dir(&dir).unwrap();
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let script = dir.join("run.sh");
    std::fs::write(&script, "#!/bin/sh\necho \"ran $JOBD_JOB_NAME as $USER\"\n").unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let file = dir.join("exp.toml");
    std::fs::write(
        &file,
        "kind = \"command\"\n[command]\nargv = [\"./run.sh\"]\n",
    )
    .unwrap();
    let out = d.jobctl(&["submit", file.to_str().unwrap(), "--set", "name=first"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let first: u64 = stdout(&out).trim().parse().unwrap();
    d.wait_state(first, JobState::Succeeded, Duration::from_secs(20));
    let requeue = d.jobctl(&["requeue", &first.to_string()]);
    assert!(
        stderr(&requeue).contains(&format!(
            "`jobctl resubmit {first}` runs its job file again"
        )),
        "{}",
        stderr(&requeue)
    );
    // From elsewhere, with the job file gone: the job's own copy is run.
    std::fs::remove_file(&file).unwrap();
    let again = std::process::Command::new(JOBCTL)
        .args([
            "--url",
            d.socket.to_str().unwrap(),
            "resubmit",
            &first.to_string(),
        ])
        .current_dir("/")
        .output()
        .unwrap();
    assert!(again.status.success(), "{}", stderr(&again));
    let second: u64 = stdout(&again).trim().parse().unwrap();
    assert_ne!(second, first);
    d.wait_state(second, JobState::Succeeded, Duration::from_secs(20));
    d.wait_output(second, "ran first as");
    let out = d.jobctl(&[
        "resubmit",
        &first.to_string(),
        "--set",
        "name=fourth",
        "--hold",
    ]);
    let held: u64 = stdout(&out).trim().parse().unwrap();
    d.assert_said(held, "run again with --set name");
    let out = d.jobctl(&[
        "resubmit",
        &first.to_string(),
        "--set",
        "name=third",
        "--follow",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("ran third as"), "{}", stdout(&out));

    d.assert_said(second, &format!("job {first}'s file, run again"));

    // Someone else's job: only its owner or an admin may run it again, and the copy is its
    // owner's (a copy as the caller would run the owner's `./run.sh` as someone else).
    let out = d.jobctl_tcp(Some(TOKEN_NOBODY), &["resubmit", &first.to_string()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("only its owner or an admin can resubmit it"),
        "{}",
        stderr(&out)
    );
    if nix::unistd::geteuid().is_root() {
        std::fs::write(
            &file,
            "kind = \"command\"\n[command]\nargv = [\"./run.sh\"]\n",
        )
        .unwrap();
        let out = d.jobctl_tcp(Some(TOKEN_NOBODY), &["submit", file.to_str().unwrap()]);
        assert!(out.status.success(), "{}", stderr(&out));
        let theirs: u64 = stdout(&out).trim().parse().unwrap();
        d.wait_state(theirs, JobState::Succeeded, Duration::from_secs(20));
        let out = d.jobctl(&["resubmit", &theirs.to_string()]);
        assert!(out.status.success(), "{}", stderr(&out));
        let copy: u64 = stdout(&out).trim().parse().unwrap();
        d.wait_state(copy, JobState::Succeeded, Duration::from_secs(20));
        assert_eq!(d.job(copy).record.owner.user, "nobody");
        d.wait_output(copy, "ran exp as nobody");
        d.assert_said(copy, &format!("resubmitted by root: job {theirs}'s file"));
        // An admin reruns it as its owner wrote it: no --set (their commands, its rights).
        let out = d.jobctl(&[
            "resubmit",
            &theirs.to_string(),
            "--set",
            "command.argv=[\"id\"]",
        ]);
        assert_eq!(out.status.code(), Some(1));
        assert!(
            stderr(&out).contains("only they can change its file (--set)"),
            "{}",
            stderr(&out)
        );
    }
    // Errors in a file changed by --set name the job, with no line of a text nobody wrote.
    let out = d.jobctl(&["resubmit", &first.to_string(), "--set", "priority=x"]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains(&format!(
            "job {first}'s file (exp.toml) with --set: priority: invalid type"
        )),
        "{err}"
    );

    // A run a schedule queued: one job, no second schedule.
    let sched = d.write(
        "nightly.toml",
        "kind = \"command\"\nschedule = \"0 3 * * *\"\ncatch_up = false\n[command]\nargv = [\"true\"]\n",
    );
    let sid = schedule_id(&d.jobctl(&["submit", sched.to_str().unwrap()]));
    let out = d.jobctl(&["schedule", "run-now", &sid.to_string()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let fired = d
        .all_jobs()
        .into_iter()
        .find(|j| j.record.schedule_id == Some(sid))
        .expect("the schedule's run")
        .record
        .id;
    let out = d.jobctl(&["resubmit", &fired.to_string()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let copy: u64 = stdout(&out).trim().parse().unwrap();
    assert_eq!(d.job(copy).record.schedule_id, None);
    d.wait_state(copy, JobState::Succeeded, Duration::from_secs(20));
    let schedules = stdout(&d.jobctl(&["--json", "schedules"]));
    let n: serde_json::Value = serde_json::from_str(&schedules).unwrap();
    assert_eq!(
        n["schedules"].as_array().map(Vec::len),
        Some(1),
        "{schedules}"
    );

    // The directory it was submitted from is gone: said so, with the way out.
    let gone = d.path("gone");
    std::fs::create_dir(&gone).unwrap();
    let f = gone.join("g.toml");
    std::fs::write(&f, "kind = \"command\"\n[command]\nargv = [\"true\"]\n").unwrap();
    let g = d.submit(&f);
    std::fs::remove_dir_all(&gone).unwrap();
    let out = d.jobctl(&["resubmit", &g.to_string()]);
    assert!(
        stderr(&out).contains("which is gone") && stderr(&out).contains("command.workdir"),
        "{}",
        stderr(&out)
    );
}
