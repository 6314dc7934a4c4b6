//! `TestDaemon`: the real `jobd` binary in a temp dir, with fake GPUs, driven by the real
//! `jobctl` binary or raw HTTP.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use jobd::spec::api::{JobView, ListResponse};
use jobd::spec::{JobEvent, JobId, JobState};

pub const JOBD: &str = env!("CARGO_BIN_EXE_jobd");
pub const JOBCTL: &str = env!("CARGO_BIN_EXE_jobctl");

/// Tokens the test config grants (users that exist on every Debian machine).
pub const TOKEN_NOBODY: &str = "tok-nobody-0123456789";
pub const TOKEN_DAEMON: &str = "tok-daemon-0123456789";

/// Polls `cond` every 20 ms until it holds or `timeout` passes (then panics with `what`).
pub fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        if start.elapsed() > timeout {
            panic!("timed out after {timeout:?} waiting for: {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub struct TestDaemon {
    pub dir: tempfile::TempDir,
    pub state: PathBuf,
    pub socket: PathBuf,
    pub config: PathBuf,
    extra: Vec<String>,
    env: Vec<(String, String)>,
    child: Option<Child>,
}

impl TestDaemon {
    /// Starts jobd with `extra` flags (e.g. `--gpus fake:24GiB`) and a config that enables TCP
    /// with two tokens. `config_extra` goes after the top-level keys, before the tokens: it
    /// may hold top-level keys, then tables.
    pub fn start(extra: &[&str]) -> TestDaemon {
        Self::start_with_config(extra, "")
    }

    /// A daemon without GPUs whose Ollama store is `models`.
    pub fn publishing_to(models: &std::path::Path) -> TestDaemon {
        Self::start(&[
            "--gpus",
            "none",
            "--ollama-models",
            models.to_str().unwrap(),
        ])
    }

    pub fn start_with_config(extra: &[&str], config_extra: &str) -> TestDaemon {
        Self::start_full(extra, config_extra, &[])
    }

    /// With extra environment variables for the daemon (e.g. `NOTIFY_SOCKET`).
    pub fn start_full(extra: &[&str], config_extra: &str, env: &[(&str, &str)]) -> TestDaemon {
        let dir = tempfile::tempdir().unwrap();
        // Jobs may run as other users (root daemon): they must reach their job directories.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
        let state = dir.path().join("state");
        let socket = state.join("jobd.sock");
        let config = dir.path().join("jobd.toml");
        let hash = |t: &str| jobd::config::hash_token(t);
        std::fs::write(
            &config,
            format!(
                "listen = \"127.0.0.1:0\"\ngrace_period = \"2s\"\ntrusted_users = [\"nobody\", \"daemon\"]\n\
                 {config_extra}\n\
                 [[tokens]]\nuser = \"nobody\"\nsha256 = \"{}\"\n[[tokens]]\nuser = \"daemon\"\nsha256 = \"{}\"\n",
                hash(TOKEN_NOBODY),
                hash(TOKEN_DAEMON)
            ),
        )
        .unwrap();
        let mut d = TestDaemon {
            dir,
            state,
            socket,
            config,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            child: None,
        };
        d.spawn();
        d
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("jobd.log"))
            .unwrap();
        let mut cmd = Command::new(JOBD);
        cmd.arg("--config")
            .arg(&self.config)
            .arg("--state-dir")
            .arg(&self.state);
        cmd.args(&self.extra)
            .stdout(Stdio::null())
            .stderr(log)
            .env("JOBD_LOG", "debug,sled=warn")
            // The default Ollama directory comes from it: only a test that sets it has one.
            .env_remove("OLLAMA_MODELS")
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        let child = cmd.spawn().expect("start jobd");
        self.child = Some(child);
        let sock = self.socket.clone();
        let addr = self.state.join("http.addr");
        wait_for("jobd to listen", Duration::from_secs(20), || {
            std::os::unix::net::UnixStream::connect(&sock).is_ok() && addr.exists()
        });
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("jobd.log")).unwrap_or_default()
    }

    /// The TCP address the daemon bound.
    pub fn addr(&self) -> SocketAddr {
        std::fs::read_to_string(self.state.join("http.addr"))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr())
    }

    /// Writes a file into the test directory and returns its path.
    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Runs jobctl over the unix socket.
    pub fn jobctl(&self, args: &[&str]) -> Output {
        jobctl_with(&self.socket.display().to_string(), None, args)
    }

    /// Runs jobctl over TCP with a token.
    pub fn jobctl_tcp(&self, token: Option<&str>, args: &[&str]) -> Output {
        jobctl_with(&self.url(), token, args)
    }

    /// Submits a job file over the socket and returns its id.
    pub fn submit(&self, file: &Path) -> JobId {
        let out = self.jobctl(&["submit", file.to_str().unwrap()]);
        assert!(
            out.status.success(),
            "submit failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
    }

    pub fn job(&self, id: JobId) -> JobView {
        let out = self.jobctl(&["show", &id.to_string(), "--json"]);
        assert!(
            out.status.success(),
            "show failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        serde_json::from_value(v["job"].clone()).unwrap()
    }

    pub fn events(&self, id: JobId) -> Vec<JobEvent> {
        let out = self.jobctl(&["show", &id.to_string(), "--json"]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        serde_json::from_value(v["events"].clone()).unwrap()
    }

    pub fn state(&self, id: JobId) -> JobState {
        self.job(id).record.state
    }

    pub fn wait_state(&self, id: JobId, want: JobState, timeout: Duration) {
        wait_for(&format!("job {id} to be {want}"), timeout, || {
            self.state(id) == want
        });
    }

    pub fn all_jobs(&self) -> Vec<JobView> {
        let out = self.jobctl(&["list", "--all", "--json", "--limit", "0"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<ListResponse>(&out.stdout)
            .unwrap()
            .jobs
    }

    /// SIGKILL: no shutdown, no flush.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("daemon running");
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(c.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        c.wait().unwrap()
    }

    /// Waits for a daemon already sent SIGTERM to exit.
    pub fn stop_wait(&mut self) -> std::process::ExitStatus {
        self.child.take().expect("daemon running").wait().unwrap()
    }

    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "stop or kill the daemon first");
        self.spawn();
    }

    /// Asserts that some event of job `id`'s history says `text`.
    #[track_caller]
    pub fn assert_said(&self, id: JobId, text: &str) {
        let events = self.events(id);
        assert!(
            events.iter().any(|e| e.reason.contains(text)),
            "no {text:?} in job {id}'s history: {events:#?}"
        );
    }

    /// Asserts that no event of job `id`'s history says `text`.
    #[track_caller]
    pub fn assert_not_said(&self, id: JobId, text: &str) {
        let events = self.events(id);
        assert!(
            !events.iter().any(|e| e.reason.contains(text)),
            "{text:?} in job {id}'s history: {events:#?}"
        );
    }

    /// Waits until job `id` has written `text` to its stdout.
    pub fn wait_output(&self, id: JobId, text: &str) {
        let log = self.state.join(format!("jobs/{id}/stdout.log"));
        wait_for(
            &format!("job {id} to print {text:?}"),
            Duration::from_secs(20),
            || std::fs::read_to_string(&log).is_ok_and(|t| t.contains(text)),
        );
    }

    /// Starts again with other environment variables in place of the first ones.
    pub fn restart_with_env(&mut self, env: &[(&str, &str)]) {
        self.env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self.restart();
    }

    /// Waits for a daemon that exits by itself; its exit status.
    pub fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("daemon running");
        let start = Instant::now();
        loop {
            if let Some(status) = c.try_wait().unwrap() {
                return status;
            }
            assert!(
                start.elapsed() < timeout,
                "jobd did not exit within {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts again with other flags in place of the first ones.
    pub fn restart_with(&mut self, extra: &[&str]) {
        self.extra = extra.iter().map(|s| s.to_string()).collect();
        self.restart();
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }
}

impl Drop for TestDaemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub fn jobctl_with(url: &str, token: Option<&str>, args: &[&str]) -> Output {
    let mut cmd = Command::new(JOBCTL);
    cmd.args(args).env("JOBD_URL", url).env_remove("JOBD_TOKEN");
    if let Some(t) = token {
        cmd.env("JOBD_TOKEN", t);
    }
    cmd.output().expect("run jobctl")
}

/// Sends raw bytes as an HTTP request and returns (status, body).
pub fn raw_http(addr: SocketAddr, request: &[u8]) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(request).unwrap();
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf).to_string();
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

/// A JSON POST as raw HTTP (with `Connection: close`).
pub fn post_json(addr: SocketAddr, path: &str, token: Option<&str>, body: &str) -> (u16, String) {
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let req = format!(
        "POST {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Type: application/json\r\n{auth}Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    raw_http(addr, req.as_bytes())
}

/// The schedule id `jobctl submit` printed for a job file with `schedule` (`schedule:ID`).
pub fn schedule_id(o: &Output) -> u64 {
    let text = stdout(o);
    text.trim()
        .strip_prefix("schedule:")
        .and_then(|id| id.parse().ok())
        .unwrap_or_else(|| panic!("not a schedule id: {text:?} ({})", stderr(o)))
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).to_string()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

/// A command job file running `script` with sh.
pub fn command_job(script: &str, extra: &str) -> String {
    format!("kind = \"command\"\n{extra}\n[command]\nargv = [\"/bin/sh\", \"-c\", {script:?}]\n")
}
