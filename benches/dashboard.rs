//! The dashboard under a big queue: 10,000 jobs in the store (one running, the rest queued
//! behind it: every list request filters, counts and pages all of them), then
//! - the list API's latency (`GET /api/v1/jobs`, `GET /api/v1/queue`, several filters and
//!   sorts): p50 / p99 / max over sequential requests on fresh connections;
//! - the queue view's time to first render in headless Chromium (`performance` mark
//!   `jobd:queue-rendered`, set in the frame after the first page of rows is rendered, from
//!   the start of navigation): a cold load (new browser context) and warm reloads.
//!
//! Run: `cargo bench --bench dashboard --profile dev` (the jobd crate unoptimised, its
//! dependencies at opt-level 3) or `cargo bench --bench dashboard` (release). Needs
//! `bash tests/browser/install.sh` for the render part (skipped with a note otherwise).
//! Environment: `BENCH_JOBS` (default 10000), `BENCH_REQUESTS` (default 300 per query).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const JOBD: &str = env!("CARGO_BIN_EXE_jobd");
const TOKENS: [(&str, &str); 2] = [
    ("nobody", "bench-nobody-0123456789"),
    ("daemon", "bench-daemon-0123456789"),
];

fn main() {
    // `cargo test --all-targets` runs this binary without --bench; it is not a test.
    if !std::env::args().any(|a| a == "--bench") {
        println!("dashboard: run with `cargo bench --bench dashboard`");
        return;
    }
    let jobs: usize = env_or("BENCH_JOBS", 10_000);
    let requests: usize = env_or("BENCH_REQUESTS", 300);
    let dir = tempfile::tempdir().unwrap();
    let (mut daemon, addr) = start(dir.path());

    let t = Instant::now();
    populate(addr, jobs);
    println!(
        "submitted {jobs} jobs in {:.1}s ({:.0}/s, 8 concurrent clients)",
        t.elapsed().as_secs_f64(),
        jobs as f64 / t.elapsed().as_secs_f64()
    );

    println!("\nlist API, {requests} sequential requests each (ms):");
    println!(
        "{:<58} {:>7} {:>7} {:>7} {:>9}",
        "request", "p50", "p99", "max", "bytes"
    );
    for path in [
        "/api/v1/jobs",
        "/api/v1/jobs?limit=1000",
        "/api/v1/jobs?state=queued&owner=daemon",
        "/api/v1/queue",
        "/api/v1/queue?sort=priority&offset=5000",
        "/api/v1/queue?all=true&sort=owner&order=desc",
        "/api/v1/gpus",
    ] {
        let mut times = Vec::with_capacity(requests);
        let mut size = 0;
        for _ in 0..requests {
            let t = Instant::now();
            let (status, body) = get(addr, path);
            times.push(t.elapsed().as_secs_f64() * 1000.0);
            assert_eq!(status, 200, "{path}: {body}");
            size = body.len();
        }
        times.sort_by(f64::total_cmp);
        let q = |p: f64| times[((times.len() as f64 * p).ceil() as usize).min(times.len()) - 1];
        println!(
            "{path:<58} {:>7.2} {:>7.2} {:>7.2} {size:>9}",
            q(0.50),
            q(0.99),
            times[times.len() - 1]
        );
    }

    render(addr);
    let _ = daemon.kill();
    let _ = daemon.wait();
}

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

fn start(dir: &Path) -> (Child, SocketAddr) {
    let config = dir.join("jobd.toml");
    let mut text =
        String::from("listen = \"127.0.0.1:0\"\ntrusted_users = [\"nobody\", \"daemon\"]\n");
    for (user, token) in TOKENS {
        text += &format!(
            "[[tokens]]\nuser = \"{user}\"\nsha256 = \"{}\"\n",
            jobd::config::hash_token(token)
        );
    }
    std::fs::write(&config, text).unwrap();
    let state = dir.join("state");
    let child = Command::new(JOBD)
        .arg("--config")
        .arg(&config)
        .arg("--state-dir")
        .arg(&state)
        .args(["--gpus", "fake:24GiB,80GiB"])
        .env("JOBD_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .expect("start jobd");
    let addr_file = state.join("http.addr");
    let start = Instant::now();
    while !addr_file.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "jobd did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(50));
    let addr = std::fs::read_to_string(addr_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    (child, addr)
}

/// Job 1 sleeps; every other job waits for it (some on GPUs), of two owners and a spread of
/// priorities, so all 10,000 are active and the default list has to consider each.
fn populate(addr: SocketAddr, n: usize) {
    let base = std::env::temp_dir();
    let sleeper =
        "kind = \"command\"\nname = \"sleeper\"\n[command]\nargv = [\"/bin/sleep\", \"3600\"]\n";
    submit(addr, TOKENS[0].1, sleeper, &base);
    let threads = 8;
    std::thread::scope(|s| {
        for t in 0..threads {
            let base = &base;
            s.spawn(move || {
                for i in (2..=n).filter(|i| i % threads == t) {
                    let gpus = if i % 3 == 0 {
                        "[resources]\ngpus = 1\nvram = \"10GiB\"\n"
                    } else {
                        ""
                    };
                    let toml = format!(
                        "kind = \"command\"\nname = \"job-{i}\"\npriority = {}\ndepends_on = [1]\n{gpus}[command]\nargv = [\"/bin/true\"]\n",
                        ((i * 7919) % 21) as i64 - 10
                    );
                    submit(addr, TOKENS[i % 2].1, &toml, base);
                }
            });
        }
    });
}

fn submit(addr: SocketAddr, token: &str, toml: &str, base: &Path) {
    let body = serde_json::json!({"toml": toml, "base_dir": base}).to_string();
    let req = format!(
        "POST /api/v1/jobs HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let (status, resp) = http(addr, req.as_bytes());
    assert_eq!(status, 201, "{resp}");
}

fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    http(
        addr,
        format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").as_bytes(),
    )
}

fn http(addr: SocketAddr, req: &[u8]) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(req).unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).unwrap();
    let text = String::from_utf8_lossy(&buf);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// Time to first render of the queue view, by tests/browser/render_bench.mjs.
fn render(addr: SocketAddr) {
    let browser = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/browser");
    if !Path::new("/usr/bin/chromium").exists()
        || !browser.join("node_modules/.jobd-installed").exists()
    {
        println!(
            "\ntime to first render: skipped (run `bash tests/browser/install.sh` for Chromium)"
        );
        return;
    }
    let out = Command::new("node")
        .arg(browser.join("render_bench.mjs"))
        .env("JOBD_URL", format!("http://{addr}"))
        .output()
        .expect("run node");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    println!("\n{}", String::from_utf8_lossy(&out.stdout).trim_end());
}
