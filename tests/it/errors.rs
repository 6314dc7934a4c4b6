//! Bad input gets a clear error naming the problem, and the daemon keeps serving.

use std::time::Duration;

use crate::daemon::*;

fn assert_serving(d: &TestDaemon) {
    let out = d.jobctl(&["list"]);
    assert!(
        out.status.success(),
        "daemon still serving: {}",
        stderr(&out)
    );
}

/// Malformed TOML, unknown fields, wrong types and missing files: located, named, refused.
#[test]
fn bad_job_files_are_refused_with_the_place_and_reason() {
    let d = TestDaemon::start(&["--gpus", "fake:24GiB"]);
    let cases: &[(&str, &str, &[&str])] = &[
        (
            "syntax.toml",
            "kind = \"command\"\n[command\nargv = [\"true\"]\n",
            &["syntax.toml:2:"],
        ),
        (
            "unknown.toml",
            "kind = \"command\"\n[command]\nargv = [\"true\"]\nworkdirr = \"/\"\n",
            &["syntax", "unknown.toml:4:1", "unknown field `workdirr`"],
        ),
        (
            "type.toml",
            "kind = \"command\"\npriority = \"high\"\n[command]\nargv = [\"true\"]\n",
            &["type.toml:2:12", "priority", "invalid type"],
        ),
        (
            "missing.toml",
            "kind = \"command\"\n[command]\nargv = [\"./no-such-script.sh\"]\n",
            &["missing.toml:3:", "command.argv[0]", "does not exist"],
        ),
        (
            "gpu.toml",
            "kind = \"command\"\n[resources]\ngpus = 1\nvram = \"200GiB\"\n[command]\nargv = [\"true\"]\n",
            &["never run here", "200GiB", "24GiB"],
        ),
        (
            "nodep.toml",
            "kind = \"command\"\ndepends_on = [42]\n[command]\nargv = [\"true\"]\n",
            &["depends_on[0]: job 42 does not exist"],
        ),
    ];
    for (name, text, wants) in cases {
        let f = d.write(name, text);
        let out = d.jobctl(&["submit", f.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(1), "{name} is refused");
        let err = stderr(&out);
        for w in wants.iter().filter(|w| **w != "syntax") {
            assert!(err.contains(w), "{name}: error lacks {w:?}:\n{err}");
        }
        let v = d.jobctl(&["validate", f.to_str().unwrap()]);
        if !name.starts_with("gpu") && !name.starts_with("nodep") {
            assert_eq!(v.status.code(), Some(1), "validate refuses {name} too");
        }
    }
    let out = d.jobctl(&["submit", "/nonexistent/job.toml"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("cannot read /nonexistent/job.toml"),
        "{}",
        stderr(&out)
    );
    assert!(d.all_jobs().is_empty(), "nothing was queued");
    assert_serving(&d);
}

/// Oversized, non-JSON and wrongly-typed bodies, bad ids and unknown routes: 4xx with the error
/// shape, never a crash.
#[test]
fn bad_http_requests_get_4xx_with_the_error_shape() {
    let d = TestDaemon::start(&["--gpus", "none"]);
    let a = d.addr();
    let check = |(status, body): (u16, String), want_status: u16, want_code: &str| {
        assert_eq!(status, want_status, "{body}");
        let v: serde_json::Value =
            serde_json::from_str(&body).unwrap_or_else(|_| panic!("JSON error body: {body}"));
        assert_eq!(v["error"]["code"], want_code, "{body}");
        assert!(!v["error"]["message"].as_str().unwrap().is_empty());
    };
    check(
        post_json(a, "/api/v1/jobs", Some(TOKEN_NOBODY), "this is not json"),
        400,
        "bad_json",
    );
    check(
        post_json(a, "/api/v1/jobs", Some(TOKEN_NOBODY), "{\"toml\": 5}"),
        400,
        "bad_json",
    );
    check(
        post_json(
            a,
            "/api/v1/jobs",
            Some(TOKEN_NOBODY),
            "{\"toml\": \"x\", \"extra\": 1}",
        ),
        400,
        "bad_json",
    );
    check(
        post_json(
            a,
            "/api/v1/jobs",
            Some(TOKEN_NOBODY),
            "{\"toml\": \"kind = 1\"}",
        ),
        400,
        "bad_request",
    );
    let body = serde_json::json!({"toml": "kind = \"command\"\n[command]\nargv=[\"true\"]\nbogus=1\n", "base_dir": "/"}).to_string();
    let (status, resp) = post_json(a, "/api/v1/jobs", Some(TOKEN_NOBODY), &body);
    assert_eq!(status, 400);
    let v: serde_json::Value = serde_json::from_str(&resp).unwrap();
    assert_eq!(v["error"]["code"], "invalid_job");
    assert_eq!(v["error"]["problems"][0]["line"], 4, "{resp}");
    let huge = format!("{{\"toml\": \"{}\"}}", "x".repeat(2 * 1024 * 1024));
    check(
        post_json(a, "/api/v1/jobs", Some(TOKEN_NOBODY), &huge),
        413,
        "too_large",
    );
    let just_under = serde_json::json!({"toml": format!("#{}\nkind=\"command\"\n[command]\nargv=[\"true\"]\n", "x".repeat(300 * 1024)), "base_dir": "/"}).to_string();
    let (status, resp) = post_json(a, "/api/v1/jobs", Some(TOKEN_NOBODY), &just_under);
    assert_eq!(status, 400, "job files over 256 KiB are refused: {resp}");
    assert!(resp.contains("the limit is"), "{resp}");
    check(
        raw_http(
            a,
            b"GET /api/v1/jobs/abc HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
        ),
        400,
        "bad_request",
    );
    check(
        raw_http(
            a,
            b"GET /api/v1/jobs/0 HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
        ),
        400,
        "bad_request",
    );
    check(
        raw_http(
            a,
            b"GET /api/v1/jobs/77 HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
        ),
        404,
        "not_found",
    );
    check(
        raw_http(
            a,
            b"GET /api/v1/jobs?limit=lots HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
        ),
        400,
        "bad_query",
    );
    check(
        raw_http(
            a,
            b"GET /api/v1/nope HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
        ),
        404,
        "not_found",
    );
    check(
        post_json(
            a,
            "/api/v1/jobs/1/priority",
            Some(TOKEN_NOBODY),
            "{\"priority\": \"high\"}",
        ),
        400,
        "bad_json",
    );
    // A priority whose absolute value overflows i32 is refused, not accepted or panicked on.
    let queued = serde_json::json!({"toml": "kind = \"command\"\n[command]\nargv=[\"sleep\", \"60\"]\n", "base_dir": "/"}).to_string();
    let (status, resp) = post_json(a, "/api/v1/jobs", Some(TOKEN_NOBODY), &queued);
    assert_eq!(status, 201, "{resp}");
    let id = serde_json::from_str::<serde_json::Value>(&resp).unwrap()["id"].clone();
    assert!(id.is_u64(), "{resp}");
    for p in [i64::from(i32::MIN), 1001, 99_999_999_999, -99_999_999_999] {
        let (status, body) = post_json(
            a,
            &format!("/api/v1/jobs/{id}/priority"),
            Some(TOKEN_NOBODY),
            &format!("{{\"priority\": {p}}}"),
        );
        assert_eq!(status, 400, "priority {p}: {body}");
        assert!(body.contains("between -1000 and 1000"), "{body}");
    }
    // Another method on a known path: 405 with the error shape.
    check(
        raw_http(
            a,
            b"DELETE /api/v1/health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
        ),
        405,
        "method_not_allowed",
    );
    // ... on the dashboard's files too (it used to be an empty 405).
    check(
        raw_http(
            a,
            b"POST /index.html HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        ),
        405,
        "method_not_allowed",
    );
    // A job id is digits: "+1" is not job 1.
    check(
        raw_http(
            a,
            b"GET /api/v1/jobs/+1 HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
        ),
        400,
        "bad_request",
    );
    // The scheme name is case-insensitive; a 401 says which scheme it wants.
    let lower = format!(
        "GET /api/v1/whoami HTTP/1.1\r\nHost: localhost\r\nAuthorization: bearer {TOKEN_NOBODY}\r\nConnection: close\r\n\r\n"
    );
    let (status, body) = raw_http(a, lower.as_bytes());
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("nobody"), "{body}");
    let mut s = std::net::TcpStream::connect(a).unwrap();
    std::io::Write::write_all(
        &mut s,
        b"GET /api/v1/jobs HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer wrong\r\nConnection: close\r\n\r\n",
    )
    .unwrap();
    let mut head = String::new();
    std::io::Read::read_to_string(&mut s, &mut head).unwrap();
    assert!(
        head.to_ascii_lowercase()
            .contains("www-authenticate: bearer"),
        "{head}"
    );
    let (status, _) = raw_http(a, b"garbage\r\n\r\n");
    assert!(status == 0 || (400..500).contains(&status));
    assert_serving(&d);
}

/// jobctl exits 3 when the daemon cannot be reached, with a hint (2 is a usage error).
#[test]
fn unreachable_daemon_exits_3() {
    let out = jobctl_with("/nonexistent/jobd.sock", None, &["list"]);
    assert_eq!(out.status.code(), Some(3));
    assert!(
        stderr(&out).contains("cannot reach jobd"),
        "{}",
        stderr(&out)
    );
    let out = jobctl_with("http://127.0.0.1:1", None, &["list"]);
    assert_eq!(out.status.code(), Some(3));
    let out = jobctl_with("http://127.0.0.1:1", None, &["list", "--no-such-flag"]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "a usage error is not 'unreachable'"
    );
}

/// A client that sends its request headers a little at a time is disconnected after
/// `header_read_timeout` (it used to keep its connection open forever: an easy way to use up
/// the daemon's file descriptors), on both listeners; streams that outlive it still work.
#[test]
fn slow_request_headers_are_cut_off() {
    use std::io::Write;
    let d = TestDaemon::start_with_config(&["--gpus", "none"], "header_read_timeout = \"1s\"");
    let check = |mut s: Box<dyn ReadWrite>| {
        s.write_all(b"GET /api/v1/health HTTP/1.1\r\nHost: localhost\r\n")
            .unwrap();
        let (took, _) = read_until_closed(&mut s);
        assert!(took >= Duration::from_millis(900), "{took:?}");
    };
    let tcp = std::net::TcpStream::connect(d.addr()).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    check(Box::new(tcp));
    let unix = std::os::unix::net::UnixStream::connect(&d.socket).unwrap();
    unix.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    check(Box::new(unix));
    // A follow that lasts longer than the timeout is not cut.
    let job = d.write("slow.toml", &command_job("echo a; sleep 2.5; echo b", ""));
    let out = d.jobctl(&["submit", "--follow", job.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).starts_with("a\nb\n"), "{}", stdout(&out));
    assert_serving(&d);
}

/// After its headers, a request's body must arrive within the same timeout (a client could
/// send it a byte at a time, or never, holding its connection); and the TCP listener, on a
/// loopback address, answers only to its own names (a page whose name an attacker points at
/// 127.0.0.1 could otherwise read the queue from a user's browser), plus `allowed_hosts`.
#[test]
fn slow_bodies_are_cut_off_and_foreign_hosts_refused() {
    use std::io::Write;
    let d = TestDaemon::start_with_config(
        &["--gpus", "none"],
        "header_read_timeout = \"1s\"\nallowed_hosts = [\"jobd.example.com\"]",
    );
    let mut s = std::net::TcpStream::connect(d.addr()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(
        format!(
            "POST /api/v1/jobs/validate HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {TOKEN_NOBODY}\r\n\
             Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n{{"
        )
        .as_bytes(),
    )
    .unwrap();
    let (_, answer) = read_until_closed(&mut s);
    assert!(
        answer.starts_with("HTTP/1.1 408") && answer.contains("\"timeout\""),
        "{answer}"
    );

    for (host, want) in [
        ("evil.example", 421),
        ("evil.example:8470", 421),
        ("localhost:8470", 200),
        ("127.0.0.1", 200),
        ("[::1]:8470", 200),
        ("JOBD.example.com", 200),
        // Only one name, written plainly.
        ("[::1].evil.com", 421),
        ("127.0.0.1:8470, evil.com", 421),
        ("localhost:evil.com", 421),
    ] {
        let (status, body) = raw_http(
            d.addr(),
            format!("GET /api/v1/health HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        );
        assert_eq!(status, want, "{host}: {body}");
        if want == 421 {
            assert!(body.contains("\"misdirected\""), "{body}");
        }
    }
    assert_serving(&d);
}

/// Reads until the daemon closes the connection, which it must do within 5 s; how long it
/// took and what came.
fn read_until_closed(s: &mut impl std::io::Read) -> (Duration, String) {
    let started = std::time::Instant::now();
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    let took = started.elapsed();
    let text = String::from_utf8_lossy(&buf).into_owned();
    assert!(
        took < Duration::from_secs(5),
        "closed after {took:?}: {text}"
    );
    (took, text)
}

trait ReadWrite: std::io::Read + std::io::Write {}
impl<T: std::io::Read + std::io::Write> ReadWrite for T {}

/// A train job that publishes, on a daemon with no Ollama directory, is refused with what the
/// user can do about it; `$OLLAMA_MODELS` (Ollama's own variable) gives the daemon its default.
#[test]
fn publishing_needs_a_models_dir_and_ollama_models_is_the_default() {
    let jobs = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("jobs");
    let text = std::fs::read_to_string(jobs.join("tiny.toml"))
        .unwrap()
        .replace("data/tiny_", &format!("{}/data/tiny_", jobs.display()));
    if jobd::config::default_ollama_models().is_none() {
        let d = TestDaemon::start(&[]);
        let file = d.write("tiny.toml", &text);
        let out = d.jobctl(&["submit", file.to_str().unwrap()]);
        assert!(!out.status.success());
        let err = stderr(&out);
        assert!(
            err.contains("publish.models_dir: not set") && err.contains("leave out [publish]"),
            "{err}"
        );
    }
    let models = tempfile::tempdir().unwrap();
    let d = TestDaemon::start_full(
        &[],
        "",
        &[("OLLAMA_MODELS", models.path().to_str().unwrap())],
    );
    let file = d.write("tiny.toml", &text);
    let id = d.submit(&file);
    assert!(d.jobctl(&["cancel", &id.to_string()]).status.success());
}

/// jobd refuses a state directory that is not its own to take over — one everyone may write
/// (it used to make /tmp-like directories private), or another user's — naming the problem.
#[test]
fn a_shared_or_foreign_state_dir_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let shared = tmp.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o1777)).unwrap();
    let start = |dir: &std::path::Path| {
        std::process::Command::new(JOBD)
            .args(["--gpus", "none", "--state-dir"])
            .arg(dir)
            .arg("--socket")
            .arg(tmp.path().join("s.sock"))
            .output()
            .unwrap()
    };
    let out = start(&shared);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("writable by everyone"),
        "{}",
        stderr(&out)
    );
    let mode = std::fs::metadata(&shared).unwrap().permissions().mode();
    assert_eq!(mode & 0o7777, 0o1777, "left as it was");
    if nix::unistd::geteuid().is_root() {
        let foreign = tmp.path().join("foreign");
        std::fs::create_dir(&foreign).unwrap();
        std::os::unix::fs::chown(&foreign, Some(65534), Some(65534)).unwrap();
        let out = start(&foreign);
        assert!(
            out.status.code() == Some(1) && stderr(&out).contains("belongs to uid 65534"),
            "{}",
            stderr(&out)
        );
    }
}

/// One unix-socket user cannot take every connection from the others: past their share
/// (a quarter of the socket's) they are answered 503, and other users still get in.
#[test]
fn one_user_cannot_hold_every_unix_connection() {
    use std::os::unix::process::CommandExt;
    if !nix::unistd::geteuid().is_root() {
        return;
    }
    let d = TestDaemon::start(&["--gpus", "none"]);
    let script = r#"
import select, socket, sys
socks, busy, seen = [], 0, set()
for i in range(300):
    s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); socks.append(s)
while True:
    ready, _, _ = select.select([s for s in socks if s not in seen], [], [], 1.0)
    if not ready:
        break
    for s in ready:
        seen.add(s)
        if s.recv(64).startswith(b"HTTP/1.1 503"):
            busy += 1
print(busy)
sys.stdout.flush()
import time; time.sleep(3)
"#;
    let mut child = std::process::Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(&d.socket)
        .uid(65534)
        .gid(65534)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    assert_eq!(
        line.trim(),
        "44",
        "connections past nobody's 256 answered 503"
    );
    // Meanwhile, others are served.
    let out = d.jobctl(&["whoami"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let _ = child.kill();
    let _ = child.wait();
}
