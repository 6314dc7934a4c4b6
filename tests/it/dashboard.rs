//! The web dashboard: its files are served from the binary, its API (`/queue`) sorts, filters
//! and pages, its streams push, and — in real headless Chromium driven by
//! `tests/browser/dashboard.mjs` — a person sees jobs, reservations, progress and loss curves
//! and can act on their jobs only with a token.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use jobd::spec::JobState;
use jobd::spec::api::QueueResponse;

use crate::daemon::*;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// GET over TCP: (status, headers, body).
fn get(d: &TestDaemon, path: &str, extra: &str) -> (u16, String, String) {
    let mut s = std::net::TcpStream::connect(d.addr()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n{extra}\r\n"
    )
    .unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).unwrap();
    let text = String::from_utf8_lossy(&buf).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, head.to_ascii_lowercase(), body.to_string())
}

fn queue(d: &TestDaemon, query: &str) -> QueueResponse {
    let (status, _, body) = get(d, &format!("/api/v1/queue?{query}"), "");
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

/// The page and its files come from the binary, with a strict CSP and ETags; they load even
/// where anonymous reads are off (the page is where the user pastes a token), while the API
/// then still refuses.
#[test]
fn dashboard_files_are_served_from_the_binary() {
    let mut d = TestDaemon::start(&["--gpus", "none"]);
    // A top-level key must come before the config's [[tokens]] tables.
    d.stop();
    let config = std::fs::read_to_string(&d.config).unwrap();
    std::fs::write(&d.config, format!("anonymous_read = false\n{config}")).unwrap();
    d.restart();
    let (status, head, body) = get(&d, "/", "");
    assert_eq!(status, 200);
    assert!(head.contains("content-type: text/html"), "{head}");
    assert!(
        head.contains("content-security-policy: default-src 'none'; script-src 'self'"),
        "{head}"
    );
    assert_eq!(
        body,
        std::fs::read_to_string(repo().join("web/index.html")).unwrap()
    );
    let etag = head
        .lines()
        .find_map(|l| l.strip_prefix("etag: "))
        .unwrap()
        .to_string();
    let (status, _, body) = get(&d, "/", &format!("If-None-Match: {etag}\r\n"));
    assert_eq!((status, body.as_str()), (304, ""));

    for (path, ty) in [
        ("/js/main.js", "text/javascript"),
        ("/app.css", "text/css"),
        ("/vendor/uplot/uPlot.iife.min.js", "text/javascript"),
        ("/vendor/uplot/LICENSE", "text/plain"),
    ] {
        let (status, head, body) = get(&d, path, "");
        assert_eq!(status, 200, "{path}");
        assert!(
            head.contains(&format!("content-type: {ty}")),
            "{path}: {head}"
        );
        let on_disk = std::fs::read(repo().join("web").join(&path[1..])).unwrap();
        assert_eq!(body.len(), on_disk.len(), "{path}");
    }
    let (status, _, body) = get(&d, "/nope.js", "");
    assert_eq!(status, 404, "{body}");
    let (status, _, body) = get(&d, "/api/v1/queue", "");
    assert_eq!(status, 401, "the API still needs a token here: {body}");
    let (status, _, _) = get(
        &d,
        "/api/v1/queue",
        &format!("Authorization: Bearer {TOKEN_NOBODY}\r\n"),
    );
    assert_eq!(status, 200);
}

/// `/queue` filters like `/jobs`, sorts by any column (ties newest first), pages by offset,
/// counts every job by state, and shows each row's resources and waiting reason.
#[test]
fn queue_sorts_filters_and_pages() {
    // Users may give priorities up to 10 here (the default is 0: only admins go higher).
    let d = TestDaemon::start_with_config(
        &["--gpus", "fake:24GiB"],
        "[scheduler]\nmax_user_priority = 10\n",
    );
    // Job 1 holds 20 GiB (at a priority nothing preempts); jobs 2..=7 wait behind it, of two
    // owners and several priorities.
    let hold = d.write(
        "hold.toml",
        &command_job(
            "sleep 60",
            "name = \"hold\"\npriority = 10\n[resources]\ngpus = 1\nvram = \"20GiB\"",
        ),
    );
    let out = d.jobctl_tcp(Some(TOKEN_NOBODY), &["submit", hold.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    for (i, prio) in [3, -1, 5, 0, 5, 2].iter().enumerate() {
        let f = d.write(
            &format!("w{i}.toml"),
            &command_job(
                "true",
                &format!(
                    "name = \"w{i}\"\npriority = {prio}\n[resources]\ngpus = 1\nvram = \"10GiB\""
                ),
            ),
        );
        let token = if i % 2 == 0 {
            TOKEN_NOBODY
        } else {
            TOKEN_DAEMON
        };
        let out = d.jobctl_tcp(Some(token), &["submit", f.to_str().unwrap()]);
        assert!(out.status.success(), "{}", stderr(&out));
    }
    d.wait_state(1, JobState::Running, Duration::from_secs(20));

    let all = queue(&d, "");
    assert_eq!(all.total, 7, "{:#?}", queue(&d, "all=true"));
    let ids: Vec<u64> = all.jobs.iter().map(|j| j.id).collect();
    assert_eq!(ids, vec![7, 6, 5, 4, 3, 2, 1], "newest first by default");
    assert_eq!(
        all.counts,
        vec![(JobState::Queued, 6), (JobState::Running, 1)]
    );
    let running = all.jobs.iter().find(|j| j.id == 1).unwrap();
    assert_eq!(running.gpu_indices, vec![0]);
    assert_eq!(running.vram_per_gpu, Some(20 << 30));
    let waiting = all.jobs.iter().find(|j| j.id == 2).unwrap();
    assert_eq!(waiting.vram_per_gpu, Some(10 << 30), "what it needs");
    assert_eq!(waiting.waiting.as_deref(), Some("vram: 10GiB"));

    let by_prio = queue(&d, "sort=priority&state=queued");
    let got: Vec<(i32, u64)> = by_prio.jobs.iter().map(|j| (j.priority, j.id)).collect();
    assert_eq!(
        got,
        vec![(5, 6), (5, 4), (3, 2), (2, 7), (0, 5), (-1, 3)],
        "highest first, ties newest first"
    );
    let asc = queue(&d, "sort=priority&order=asc&state=queued&offset=1&limit=2");
    let got: Vec<u64> = asc.jobs.iter().map(|j| j.id).collect();
    assert_eq!((asc.total, asc.offset, got), (6, 1, vec![5, 7]));
    let daemon_only = queue(&d, "owner=daemon&sort=id&order=asc");
    let got: Vec<u64> = daemon_only.jobs.iter().map(|j| j.id).collect();
    assert_eq!(got, vec![3, 5, 7]);
    let (status, _, body) = get(
        &d,
        "/api/v1/queue?mine=true",
        &format!("Authorization: Bearer {TOKEN_DAEMON}\r\n"),
    );
    assert_eq!(status, 200);
    assert_eq!(
        serde_json::from_str::<QueueResponse>(&body).unwrap().total,
        3
    );
    let (status, _, body) = get(&d, "/api/v1/queue?sort=colour", "");
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("\"code\""), "the API's error shape: {body}");
}

/// Reads server-sent events from a GET until `until` holds for one of them (or times out).
fn read_events(
    d: &TestDaemon,
    path: &str,
    timeout: Duration,
    mut until: impl FnMut(&str, &serde_json::Value) -> bool,
) -> Vec<(String, serde_json::Value)> {
    let mut s = std::net::TcpStream::connect(d.addr()).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").unwrap();
    let mut r = BufReader::new(s);
    let start = Instant::now();
    let mut events = Vec::new();
    let mut name = String::new();
    let mut line = String::new();
    while start.elapsed() < timeout {
        line.clear();
        match r.read_line(&mut line) {
            Ok(0) => break,
            Ok(_) => {}
            Err(_) => continue, // read timeout: check the clock
        }
        let l = line.trim_end();
        if let Some(n) = l.strip_prefix("event: ") {
            name = n.to_string();
        } else if let Some(data) = l.strip_prefix("data: ") {
            let v: serde_json::Value = serde_json::from_str(data).unwrap();
            let done = until(&name, &v);
            events.push((name.clone(), v));
            if done {
                return events;
            }
        }
    }
    panic!("timed out reading {path}; got {events:?}");
}

/// The queue stream pushes the GPUs, "the queue changed" when a job is submitted, and the
/// progress of a running train job; the job stream pushes its events, metrics as they are
/// logged, checkpoints and progress.
#[test]
fn streams_push_queue_changes_progress_and_metrics() {
    let d = TestDaemon::start(&["--gpus", "fake:24GiB"]);
    let first = read_events(&d, "/api/v1/stream", Duration::from_secs(10), |n, _| {
        n == "queue"
    });
    assert_eq!(first[0].0, "gpus", "{first:?}");
    assert_eq!(first[0].1["gpus"][0]["total_bytes"], 24u64 << 30);

    let job = d.write(
        "train.toml",
        &train_job(60, 30, "[resources]\ngpus = 1\nvram = \"4GiB\""),
    );
    let out = d.jobctl_tcp(Some(TOKEN_NOBODY), &["submit", job.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    // Progress and the reservation arrive by push.
    let mut steps = Vec::new();
    let mut reserved = false;
    read_events(&d, "/api/v1/stream", Duration::from_secs(60), |n, v| {
        if n == "gpus" && v["gpus"][0]["reserved_bytes"] == 4u64 << 30 {
            reserved = true;
        }
        if n == "progress" {
            assert_eq!(v["id"], 1);
            // Stage changes (loading, training, evaluating) come with the same step.
            let step = v["progress"]["step"].as_u64().unwrap();
            if steps.last() != Some(&step) {
                steps.push(step);
            }
        }
        reserved && steps.len() >= 3
    });
    assert!(steps.windows(2).all(|w| w[0] < w[1]), "{steps:?}");

    let events = read_events(
        &d,
        "/api/v1/jobs/1/stream",
        Duration::from_secs(90),
        |n, v| n == "event" && v["state"] == "succeeded",
    );
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names[0], "job");
    let metrics: Vec<&serde_json::Value> = events
        .iter()
        .filter(|(n, _)| n == "metrics")
        .map(|(_, v)| v)
        .collect();
    assert_eq!(metrics[0]["reset"], true);
    let steps: Vec<u64> = metrics
        .iter()
        .flat_map(|m| m["records"].as_array().unwrap())
        .map(|r| r["step"].as_u64().unwrap())
        .collect();
    assert_eq!(
        steps,
        (1..=6).map(|i| i * 10).collect::<Vec<_>>(),
        "every logged step once, in order"
    );
    let states: Vec<&str> = events
        .iter()
        .filter(|(n, _)| n == "event")
        .map(|(_, v)| v["state"].as_str().unwrap())
        .collect();
    assert_eq!(states, ["queued", "starting", "running", "succeeded"]);
    let checkpoints = events
        .iter()
        .rev()
        .find(|(n, _)| n == "checkpoints")
        .unwrap();
    assert!(
        checkpoints
            .1
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["step"] == 60),
        "{checkpoints:?}"
    );
    assert!(names.contains(&"progress"));
}

/// A job file for the tiny demo with `steps` steps, metrics every 10, eval and a checkpoint
/// every `every` steps, and `extra` appended.
fn train_job(steps: u64, every: u64, extra: &str) -> String {
    let data = repo().join("jobs/data");
    let text = std::fs::read_to_string(repo().join("jobs/tiny.toml")).unwrap();
    let text = text.split("[publish]").next().unwrap();
    format!(
        "{}\n{extra}\n",
        text.replace("data/tiny_", &format!("{}/tiny_", data.display()))
            .replace("max_steps = 400", &format!("max_steps = {steps}"))
            .replace("logging_steps = 25", "logging_steps = 10")
            .replace("eval_steps = 100", &format!("eval_steps = {every}"))
            .replace("save_steps = 100", &format!("save_steps = {every}"))
    )
}

/// Installs Chromium and playwright-core with the project's script when missing; `None` (the
/// test is skipped, saying why) only when they cannot be installed on this machine.
fn browser_ready() -> Option<()> {
    let dir = repo().join("tests/browser");
    let ready = Path::new("/usr/bin/chromium").exists()
        && dir.join("node_modules/.jobd-installed").exists();
    if ready {
        return Some(());
    }
    let out = Command::new("bash")
        .arg(dir.join("install.sh"))
        .output()
        .expect("run tests/browser/install.sh");
    if out.status.success() {
        return Some(());
    }
    eprintln!(
        "SKIPPED dashboard_in_headless_chromium: Chromium or playwright-core cannot be installed here:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    None
}

fn artifacts() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .unwrap()
        .join("test-artifacts/dashboard")
}

/// In real headless Chromium against jobd with fake GPUs (see tests/browser/dashboard.mjs for
/// each check): the page shows the submitted jobs and why one waits, the GPU bar shows the
/// 10 GiB reservation, progress advances by push, the loss chart is drawn and grows, a cancel
/// without a token is refused, and with the owner's token priority, cancel and requeue work
/// from the page. Screenshots go to target/test-artifacts/dashboard/.
#[test]
fn dashboard_in_headless_chromium() {
    if browser_ready().is_none() {
        return;
    }
    let models = tempfile::tempdir().unwrap();
    // The page raises a priority as its owner: allowed up to 10 here.
    let d = TestDaemon::start_with_config(
        &[
            "--gpus",
            "fake:24GiB,80GiB",
            "--ollama-models",
            models.path().to_str().unwrap(),
        ],
        "[scheduler]\nmax_user_priority = 10\n",
    );
    let submit = |name: &str, text: &str, token: &str| -> u64 {
        let f = d.write(name, text);
        let out = d.jobctl_tcp(Some(token), &["submit", f.to_str().unwrap()]);
        assert!(out.status.success(), "{}", stderr(&out));
        stdout(&out).trim().parse().unwrap()
    };
    // A short CPU job that publishes, a long job on a fake GPU that runs until the page
    // cancels it, and a job waiting for the long one.
    let publish = submit(
        "publish.toml",
        &train_job(
            40,
            20,
            "[resources]\ncpus = 1\n[publish]\nollama_name = \"jobd/web-test:latest\"\nquantization = \"f16\"",
        ),
        TOKEN_NOBODY,
    );
    let train = submit(
        "long.toml",
        &train_job(
            100_000,
            20,
            "[resources]\ngpus = 1\nvram = \"10GiB\"\ncpus = 1",
        ),
        TOKEN_NOBODY,
    );
    let dep = submit(
        "dep.toml",
        &command_job(
            "true",
            &format!("name = \"after-train\"\ndepends_on = [{train}]"),
        ),
        TOKEN_DAEMON,
    );

    // A schedule that will not fire during the test (1 January), for the schedules panel.
    let nightly = d.write(
        "nightly.toml",
        &command_job("true", "name = \"new-year\"\nschedule = \"0 0 1 1 *\""),
    );
    let out = d.jobctl_tcp(Some(TOKEN_NOBODY), &["submit", nightly.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let schedule: u64 = schedule_id(&out);

    // Two short train jobs of a sweep, for the sweep page: held until the page's sweep step.
    let sweep_file = d.write("sweep.toml", &train_job(20, 10, "[resources]\ncpus = 1"));
    let out = d.jobctl_tcp(
        Some(TOKEN_NOBODY),
        &[
            "submit",
            sweep_file.to_str().unwrap(),
            "--hold",
            "--sweep",
            "training.learning_rate=1e-3,1e-2",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let sweep: u64 = stdout(&out).lines().next().unwrap().parse().unwrap();

    let out_dir = artifacts();
    let _ = std::fs::remove_dir_all(&out_dir);
    let start = Instant::now();
    let mut child = Command::new("node")
        .arg(repo().join("tests/browser/dashboard.mjs"))
        .env("JOBD_URL", d.url())
        .env("JOBD_TOKEN", TOKEN_NOBODY)
        .env("TRAIN_JOB", train.to_string())
        .env("DEP_JOB", dep.to_string())
        .env("PUBLISH_JOB", publish.to_string())
        .env("PUBLISH_NAME", "jobd/web-test:latest")
        .env("SCHEDULE", schedule.to_string())
        .env("SWEEP", sweep.to_string())
        .env("ARTIFACTS", &out_dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run node");
    let mut out = String::new();
    let mut err = String::new();
    let (mut so, mut se) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
    let reader = std::thread::spawn(move || {
        let mut e = String::new();
        let _ = se.read_to_string(&mut e);
        e
    });
    let _ = so.read_to_string(&mut out);
    err.push_str(&reader.join().unwrap());
    let status = child.wait().unwrap();
    eprintln!(
        "browser test: {:.1}s, saw {out}",
        start.elapsed().as_secs_f64()
    );
    assert!(
        status.success(),
        "the browser test failed (screenshots in {}):\n{err}\n{out}\njobd log tail:\n{}",
        out_dir.display(),
        tail(&d.log(), 3000)
    );

    // What the page did, as the daemon recorded it.
    let events = d.events(train);
    let reasons: Vec<&str> = events.iter().map(|e| e.reason.as_str()).collect();
    assert!(reasons.contains(&"priority 0 → 7 by nobody"), "{reasons:?}");
    let cancels = reasons
        .iter()
        .filter(|r| r.starts_with("cancelled by nobody"))
        .count();
    assert_eq!(cancels, 2, "cancelled, requeued, cancelled: {reasons:?}");
    assert_eq!(d.state(train), JobState::Cancelled);
    assert_eq!(
        d.state(dep),
        JobState::Failed,
        "its dependency was cancelled"
    );
    let out = d.jobctl(&["--json", "schedules"]);
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let paused = list["schedules"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == schedule)
        .map(|s| s["paused"].clone());
    assert_eq!(
        paused,
        Some(serde_json::Value::Bool(true)),
        "paused from the page: {list}"
    );
    for shot in [
        "queue-desktop.png",
        "job-refused.png",
        "job-cancelled.png",
        "job-published.png",
        "queue-phone.png",
        "job-phone.png",
    ] {
        let bytes = std::fs::read(out_dir.join(shot)).unwrap();
        assert!(
            bytes.starts_with(b"\x89PNG") && bytes.len() > 10_000,
            "{shot}"
        );
    }
}

fn tail(s: &str, n: usize) -> &str {
    let mut i = s.len().saturating_sub(n);
    while !s.is_char_boundary(i) {
        i += 1;
    }
    &s[i..]
}
