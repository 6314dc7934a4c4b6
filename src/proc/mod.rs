//! L1: child processes — the only module that spawns or signals them.
//!
//! Every job runs as the leader of its own process group, with a cleared environment plus the
//! variables the caller gives, stdout/stderr appended to files, and (when the daemon is root)
//! the owner's uid, gid and supplementary groups. One tokio task supervises each child; the
//! caller holds a cheap [`ChildHandle`] to stop it: SIGTERM to the group, a grace period, then
//! SIGKILL to the group. When the leader exits, stragglers left in its group are killed, so a
//! job never leaves orphans behind.

use std::ffi::{CString, OsStr, OsString};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::{Gid, Pid, Uid};
use tokio::sync::mpsc;

use crate::spec::record::{ExitInfo, ProcessInfo};

/// Errors starting a process, naming what failed.
#[derive(Debug, thiserror::Error)]
pub enum ProcError {
    #[error("cannot open the job's log file: {source}")]
    Output {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot enter the working directory {path}: {source}")]
    Workdir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "cannot start {program} as {user} in {}: {source} (the job's owner must be able to \
         enter its working directory and run its program)",
        cwd.display()
    )]
    SpawnAs {
        program: String,
        user: String,
        cwd: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot start {program}: {source}")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    #[error(
        "cannot start {program}: its arguments and environment ({bytes} bytes) exceed the \
         system's limit (ARG_MAX, and 128 KiB for any one of them); pass large inputs in a file"
    )]
    TooLong { program: String, bytes: usize },
    #[error("unknown user {0:?}: jobs run as their owner, who needs an account on this machine")]
    UnknownUser(String),
    #[error("cannot look up user {user:?}: {source}")]
    UserLookup { user: String, source: nix::Error },
}

/// A Unix account to run a process as.
#[derive(Debug, Clone)]
pub struct RunAs {
    pub user: String,
    pub uid: u32,
    pub gid: u32,
    pub home: PathBuf,
    pub groups: Vec<u32>,
}

impl RunAs {
    /// Looks up `user` in the system's account database.
    pub fn lookup(user: &str) -> Result<RunAs, ProcError> {
        let u = nix::unistd::User::from_name(user)
            .map_err(|source| ProcError::UserLookup {
                user: user.into(),
                source,
            })?
            .ok_or_else(|| ProcError::UnknownUser(user.into()))?;
        let name = CString::new(user).map_err(|_| ProcError::UnknownUser(user.into()))?;
        let groups = nix::unistd::getgrouplist(&name, u.gid)
            .map(|g| g.into_iter().map(Gid::as_raw).collect())
            .unwrap_or_else(|_| vec![u.gid.as_raw()]);
        Ok(RunAs {
            user: user.into(),
            uid: u.uid.as_raw(),
            gid: u.gid.as_raw(),
            home: u.dir,
            groups,
        })
    }

    /// This account's file access rights, for reading its files in a root daemon's thread.
    pub fn credentials(&self) -> crate::jobfs::Credentials {
        crate::jobfs::Credentials {
            uid: self.uid,
            gid: self.gid,
            groups: self.groups.clone(),
        }
    }
}

/// Runs `program` as a command job's supervisor (`jobd run-command`, which jobd starts in
/// place of the command): waits for it, writes how it ended to `status` (attempt `attempt`),
/// then ends the same way (its exit code, or its signal raised again), so that jobd sees no
/// difference. The outcome stays on disk for a daemon that was not running when it came.
///
/// Stop signals are handled here, not ignored: the job's whole process group gets them, the
/// command included, and a handled signal is reset to its default in the command at exec (an
/// ignored one would stay ignored there).
///
/// Processes that leave the job's process group (`setsid`, Python's `start_new_session`, a
/// daemonising tool) would miss the group's signals and outlive the job, holding its GPU
/// memory after jobd has given the GPU to someone else. The supervisor is therefore a child
/// subreaper: whatever the command starts stays its descendant. A stop signal is passed on to
/// descendants outside the group, which are killed shortly before the grace period ends (when
/// jobd kills the group, this supervisor included); and when the command ends, every
/// descendant left is killed before the supervisor ends, as the group's are.
pub fn supervise(
    status: &Path,
    attempt: u32,
    user: Option<&CommandUser>,
    program: &OsStr,
    args: &[OsString],
) -> ExitCode {
    use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, sigaction};
    use nix::sys::wait::{WaitStatus, waitpid};
    use std::sync::atomic::{AtomicI32, Ordering};
    static STOP_SIGNAL: AtomicI32 = AtomicI32::new(0);
    extern "C" fn note(sig: nix::libc::c_int) {
        STOP_SIGNAL.store(sig, Ordering::SeqCst);
    }
    let stop_signals = [
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGHUP,
        Signal::SIGQUIT,
    ];
    // No SA_RESTART: the wait below returns EINTR, so a stop is passed on at once.
    let handled = SigAction::new(SigHandler::Handler(note), SaFlags::empty(), SigSet::empty());
    for sig in stop_signals {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        let _ = unsafe { sigaction(sig, &handled) };
    }
    if let Err(e) = nix::sys::prctl::set_child_subreaper(true) {
        eprintln!(
            "jobd: cannot keep the command's processes together (PR_SET_CHILD_SUBREAPER): {e}"
        );
    }
    let record = |code: Option<i32>, signal: Option<i32>| {
        let st = crate::spec::contract::ExitStatus {
            attempt,
            code,
            signal,
            ended_at: Some(crate::spec::now_ms()),
        };
        let bytes = serde_json::to_vec(&st).unwrap_or_default();
        // In the owner's job directory, as theirs.
        let owner = user.map(|u| (u.uid, u.gid));
        if let Err(e) = crate::jobfs::write_atomic(status, &bytes, owner) {
            eprintln!("jobd: cannot record the command's exit status: {e}");
        }
    };
    let mut command = std::process::Command::new(program);
    command.args(args);
    // SAFETY: sigprocmask is async-signal-safe.
    unsafe {
        command.pre_exec(|| {
            // The command starts with every signal deliverable, whatever this process blocks.
            let _ = nix::sys::signal::sigprocmask(
                nix::sys::signal::SigmaskHow::SIG_SETMASK,
                Some(&nix::sys::signal::SigSet::empty()),
                None,
            );
            Ok(())
        });
    }
    if let Some(u) = user
        && become_user(&mut command, u.uid, u.gid, &u.groups, &u.workdir).is_err()
    {
        eprintln!("jobd: the working directory contains a NUL byte");
        record(Some(127), None);
        return ExitCode::from(127);
    }
    let child = match command.spawn() {
        Ok(c) => Pid::from_raw(c.id() as i32),
        Err(e) => {
            let who = user.map_or_else(String::new, |u| {
                let name = nix::unistd::User::from_uid(Uid::from_raw(u.uid))
                    .ok()
                    .flatten()
                    .map_or_else(|| u.uid.to_string(), |n| n.name);
                format!(" as {name} in {}", u.workdir.display())
            });
            let message = format!("cannot start {}{who}: {e}", program.to_string_lossy());
            eprintln!("jobd: {message}");
            // For the job's failure reason, as a train worker leaves its error.
            if let Some(dir) = status.parent() {
                let why = crate::spec::contract::WorkerError { attempt, message };
                let bytes = serde_json::to_vec(&why).unwrap_or_default();
                let path = dir.join(crate::spec::contract::files::WORKER_ERROR);
                let _ = crate::jobfs::write_atomic(&path, &bytes, user.map(|u| (u.uid, u.gid)));
            }
            // 127: the shell's "command not found".
            record(Some(127), None);
            return ExitCode::from(127);
        }
    };
    let me = nix::unistd::getpid().as_raw();
    let grace = std::env::var(crate::spec::contract::ENV_GRACE_SECONDS)
        .ok()
        .and_then(|g| g.parse::<f64>().ok())
        .unwrap_or(30.0);
    let mut kill_timer_armed = false;
    let (code, signal) = loop {
        match waitpid(child, None) {
            Ok(WaitStatus::Exited(_, code)) => break (Some(code), None),
            Ok(WaitStatus::Signaled(_, sig, _)) => break (None, Some(sig as i32)),
            Ok(_) => continue,
            Err(nix::errno::Errno::EINTR) => {
                let sig = STOP_SIGNAL.swap(0, Ordering::SeqCst);
                let Ok(sig) = Signal::try_from(sig) else {
                    continue;
                };
                for pid in descendants(me, true) {
                    let _ = nix::sys::signal::kill(Pid::from_raw(pid), sig);
                }
                if !kill_timer_armed {
                    kill_timer_armed = true;
                    // jobd kills the group (this supervisor too) when the grace period ends:
                    // the processes outside it are killed just before, while they are still
                    // this supervisor's to find.
                    let wait = Duration::from_secs_f64((grace - 0.5).max(0.0));
                    std::thread::spawn(move || {
                        std::thread::sleep(wait);
                        for pid in descendants(me, true) {
                            let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
                        }
                    });
                }
            }
            Err(e) => {
                eprintln!("jobd: cannot wait for the command: {e}");
                return ExitCode::FAILURE;
            }
        }
    };
    record(code, signal);
    end_descendants(me);
    if let Some(sig) = signal.and_then(|s| Signal::try_from(s).ok()) {
        // End by the same signal, so that jobd records "killed by signal N" as before.
        // SAFETY: restoring the default disposition.
        let _ = unsafe {
            sigaction(
                sig,
                &SigAction::new(SigHandler::SigDfl, SaFlags::empty(), SigSet::empty()),
            )
        };
        let _ = nix::sys::signal::raise(sig);
    }
    ExitCode::from(code.unwrap_or(1).clamp(0, 255) as u8)
}

/// The live (not zombie) descendants of `root`, found through `/proc`; with `outside_group`,
/// only those in another process group than `root`'s (the group's own get its signals).
fn descendants(root: i32, outside_group: bool) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let procs: Vec<(i32, char, i32, i32)> = entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(|pid| {
            let f = stat_fields(pid)?;
            Some((pid, f.state, f.ppid, f.pgrp))
        })
        .collect();
    let mut found = vec![root];
    let mut i = 0;
    while i < found.len() {
        let parent = found[i];
        found.extend(procs.iter().filter(|p| p.2 == parent).map(|p| p.0));
        i += 1;
    }
    let root_group = nix::unistd::getpgid(Some(Pid::from_raw(root)))
        .map(Pid::as_raw)
        .unwrap_or(root);
    procs
        .iter()
        .filter(|p| found[1..].contains(&p.0))
        .filter(|p| p.1 != 'Z' && p.1 != 'X')
        .filter(|p| !outside_group || p.3 != root_group)
        .map(|p| p.0)
        .collect()
}

/// After the command has ended: SIGKILL every descendant still there (whatever its group) and
/// reap them, for up to a few seconds, so that the job's processes are gone (and their GPU
/// memory free) when jobd learns that it ended.
fn end_descendants(me: i32) {
    use nix::sys::wait::{WaitPidFlag, waitpid};
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let left = descendants(me, false);
        for pid in &left {
            let _ = nix::sys::signal::kill(Pid::from_raw(*pid), Signal::SIGKILL);
        }
        // Reap what was handed to this subreaper.
        while let Ok(status) = waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            if status == nix::sys::wait::WaitStatus::StillAlive {
                break;
            }
        }
        if left.is_empty() || std::time::Instant::now() > deadline {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The soft limit on open files jobd started with, given back to every job it starts.
static JOB_NOFILE_LIMIT: std::sync::OnceLock<(u64, u64)> = std::sync::OnceLock::new();

/// Raises this process's soft limit on open files to its hard limit (connections, log
/// followers and stores all hold descriptors; 1024 is soon too few), and returns the new
/// soft limit. Jobs still start with the limit jobd was given: some programs break with
/// descriptors above 1024 (`select`).
pub fn raise_fd_limit() -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return 1024;
    };
    let _ = JOB_NOFILE_LIMIT.set((soft, hard));
    if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        return hard;
    }
    soft
}

/// Makes `cmd` run as `uid`/`gid`/`groups` and start in `cwd`, entered after the switch,
/// never as root (std's `current_dir` runs before `pre_exec`): a root chdir would let a job
/// start in a directory its owner cannot reach and read what is there. Err: `cwd` holds NUL.
fn become_user(
    cmd: &mut std::process::Command,
    uid: u32,
    gid: u32,
    groups: &[u32],
    cwd: &Path,
) -> Result<(), std::ffi::NulError> {
    let groups: Vec<Gid> = groups.iter().map(|g| Gid::from_raw(*g)).collect();
    let cwd = CString::new(cwd.as_os_str().as_encoded_bytes())?;
    // SAFETY: only async-signal-safe syscalls between fork and exec; the group list and the
    // path were made in the parent.
    unsafe {
        cmd.pre_exec(move || {
            nix::unistd::setgroups(&groups)?;
            nix::unistd::setgid(Gid::from_raw(gid))?;
            nix::unistd::setuid(Uid::from_raw(uid))?;
            nix::unistd::chdir(cwd.as_c_str())?;
            Ok(())
        });
    }
    Ok(())
}

/// Who a root supervisor runs the command as (`jobd run-command --uid ...`).
#[derive(Debug, Clone)]
pub struct CommandUser {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
    /// The working directory, entered as the user.
    pub workdir: PathBuf,
}

/// What to run.
#[derive(Debug, Clone)]
pub struct SpawnRequest {
    pub program: String,
    pub args: Vec<String>,
    /// The complete environment (nothing is inherited).
    pub env: Vec<(String, String)>,
    pub cwd: PathBuf,
    /// Appended to; created if missing.
    pub stdout: PathBuf,
    pub stderr: PathBuf,
    /// Run as this account (only when the daemon is root); `None` runs as the daemon.
    pub run_as: Option<RunAs>,
    /// The job's own program when `program` is its supervisor (`jobd run-command`): named
    /// instead of jobd when the job's arguments and environment are too long to start.
    pub supervised: Option<String>,
    /// When the leader ends, also kill the processes of the same user that left its group
    /// but carry its `JOBD_JOB_DIR` (a job's run: nothing of it may outlive it).
    pub kill_escaped: bool,
}

/// Handle to a supervised child; cheap to clone.
#[derive(Debug, Clone)]
pub struct ChildHandle {
    pgid: i32,
    stop: mpsc::UnboundedSender<StopOrder>,
}

/// What a [`ChildHandle`] asks of the task watching its child.
#[derive(Debug)]
enum StopOrder {
    /// SIGTERM to the group now, SIGKILL after the grace period.
    Term(Duration),
    /// SIGKILL to the group then, if it has not ended (its SIGTERM was sent already).
    KillAt(tokio::time::Instant),
}

impl ChildHandle {
    /// Asks the child to stop: SIGTERM to its group now, SIGKILL after `grace`.
    pub fn stop(&self, grace: Duration) {
        // If the supervisor is gone the child has exited already.
        let _ = self.stop.send(StopOrder::Term(grace));
    }

    /// Ends a stop begun before (its SIGTERM sent, by an earlier daemon): SIGKILL to the
    /// group once `left` has passed, with no second SIGTERM (which many programs take as
    /// "exit now", abandoning their checkpoint).
    pub fn kill_after(&self, left: Duration) {
        let _ = self
            .stop
            .send(StopOrder::KillAt(tokio::time::Instant::now() + left));
    }

    pub fn pgid(&self) -> i32 {
        self.pgid
    }
}

/// Starts a child as described and supervises it; `on_exit` runs once when it has exited and
/// its group is gone.
pub fn spawn(
    req: SpawnRequest,
    on_exit: impl FnOnce(ExitInfo) + Send + 'static,
) -> Result<(ProcessInfo, ChildHandle), ProcError> {
    // The log files sit in the owner's job directory: opened without following links and
    // given to the owner through the handle (see `jobfs`).
    let owner = req.run_as.as_ref().map(|r| (r.uid, r.gid));
    let open = |path: &Path| {
        crate::jobfs::open_append(path, owner).map_err(|source| ProcError::Output {
            path: path.into(),
            source,
        })
    };
    let stdout = open(&req.stdout)?;
    let stderr = open(&req.stderr)?;

    let mut cmd = std::process::Command::new(&req.program);
    cmd.args(&req.args)
        .env_clear()
        .envs(req.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr)
        .process_group(0);
    let nofile = JOB_NOFILE_LIMIT.get().copied();
    // SAFETY: setrlimit and sigprocmask are async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            if let Some((soft, hard)) = nofile {
                let _ = nix::sys::resource::setrlimit(
                    nix::sys::resource::Resource::RLIMIT_NOFILE,
                    soft,
                    hard,
                );
            }
            // Every signal deliverable, whatever the spawning thread blocks (after a restart
            // in place jobd's threads block the stop signals, and a mask is inherited): a job
            // must get its SIGTERM to checkpoint.
            let _ = nix::sys::signal::sigprocmask(
                nix::sys::signal::SigmaskHow::SIG_SETMASK,
                Some(&nix::sys::signal::SigSet::empty()),
                None,
            );
            Ok(())
        });
    }
    match req.run_as.clone() {
        // A command job's supervisor stays root (it drops to the owner for the command
        // itself, `--uid`): a job cannot kill it, so nothing the job starts escapes it.
        Some(_) if req.supervised.is_some() => {
            cmd.current_dir("/");
        }
        Some(r) => become_user(&mut cmd, r.uid, r.gid, &r.groups, &req.cwd).map_err(|_| {
            ProcError::Workdir {
                path: req.cwd.clone(),
                source: std::io::Error::other("contains a NUL byte"),
            }
        })?,
        None => {
            cmd.current_dir(&req.cwd);
        }
    }
    let mut child = tokio::process::Command::from(cmd)
        .kill_on_drop(false)
        .spawn()
        .map_err(|source| {
            // exec's ENOENT is also what a missing working directory gives: name the right one.
            match std::fs::metadata(&req.cwd) {
                Err(e) => ProcError::Workdir {
                    path: req.cwd.clone(),
                    source: e,
                },
                Ok(m) if !m.is_dir() => ProcError::Workdir {
                    path: req.cwd.clone(),
                    source: std::io::Error::other("not a directory"),
                },
                Ok(_) => match &req.run_as {
                    _ if source.raw_os_error() == Some(nix::libc::E2BIG) => ProcError::TooLong {
                        program: req
                            .supervised
                            .clone()
                            .unwrap_or_else(|| req.program.clone()),
                        bytes: req
                            .args
                            .iter()
                            .chain(req.env.iter().flat_map(|(k, v)| [k, v]))
                            .map(|a| a.len() + 1)
                            .sum(),
                    },
                    Some(r) => ProcError::SpawnAs {
                        program: req.program.clone(),
                        user: r.user.clone(),
                        cwd: req.cwd.clone(),
                        source,
                    },
                    None => ProcError::Spawn {
                        program: req.program.clone(),
                        source,
                    },
                },
            }
        })?;
    let pid = child.id().expect("a just-spawned child has a pid") as i32;
    let info = ProcessInfo {
        pid,
        pgid: pid,
        start_ticks: start_ticks(pid).unwrap_or(0),
    };
    let job_marker = req
        .env
        .iter()
        .find(|(k, _)| k == crate::spec::contract::ENV_JOB_DIR)
        .filter(|_| req.kill_escaped)
        .map(|(k, v)| format!("{k}={v}"));
    let uid = req
        .run_as
        .as_ref()
        .map_or_else(|| nix::unistd::geteuid().as_raw(), |r| r.uid);
    let (tx, rx) = mpsc::unbounded_channel::<StopOrder>();
    let handle = ChildHandle {
        pgid: pid,
        stop: tx,
    };

    tokio::spawn(async move {
        let ended = async {
            child.wait().await.ok().map(|s| {
                use std::os::unix::process::ExitStatusExt;
                ExitInfo {
                    code: s.code(),
                    signal: s.signal(),
                }
            })
        };
        let exit = watch_group(pid, ended, rx, job_marker, uid).await;
        on_exit(exit.unwrap_or(ExitInfo {
            code: None,
            signal: None,
        }));
    });
    Ok((info, handle))
}

/// Watches a job's process group until its leader has ended (`ended` resolves), passing on
/// stop requests: SIGTERM to the group, SIGKILL when the grace period is over. Then nothing
/// of the job may outlive its leader: its group is killed, and what left the group and lost
/// its supervisor (found by the job's environment, `marker`, among `uid`'s processes).
async fn watch_group(
    pgid: i32,
    ended: impl std::future::Future<Output = Option<ExitInfo>>,
    mut stop: mpsc::UnboundedReceiver<StopOrder>,
    marker: Option<String>,
    uid: u32,
) -> Option<ExitInfo> {
    let mut kill_at: Option<tokio::time::Instant> = None;
    let mut killed = false;
    let mut ended = std::pin::pin!(ended);
    let exit = loop {
        let deadline = async {
            match kill_at {
                Some(t) => tokio::time::sleep_until(t).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            exit = &mut ended => break exit,
            Some(order) = stop.recv() => {
                let at = match order {
                    StopOrder::Term(grace) => {
                        signal_group(pgid, Signal::SIGTERM);
                        tokio::time::Instant::now() + grace
                    }
                    StopOrder::KillAt(at) => at,
                };
                kill_at = Some(kill_at.map_or(at, |k| k.min(at)));
            }
            () = deadline => {
                signal_group(pgid, Signal::SIGKILL);
                killed = true;
                kill_at = None;
            }
        }
    };
    // A leader that is not our child leaves no status; one we SIGKILLed is known to be that.
    let exit = exit.or(killed.then_some(ExitInfo {
        code: None,
        signal: Some(Signal::SIGKILL as i32),
    }));
    signal_group(pgid, Signal::SIGKILL);
    if let Some(entry) = &marker {
        kill_marked(entry, uid);
    }
    exit
}

/// Takes over a job's process left running by an earlier daemon (it crashed, was killed, or
/// restarted in place): when the leader recorded in `info` is still that process and running,
/// it is watched and stopped as [`spawn`]'s children are, and `on_exit` runs once when it has
/// ended and its group is gone — with its exit status when this process is its parent (after
/// a restart in place), `None` when it is not (the status then is only what the job left in
/// its directory). Returns `None`, and does nothing, when the leader is no longer running.
///
/// `marker` is the job's `JOBD_JOB_DIR=…` entry and `uid` the user its processes run as, to
/// find what escaped its group when it ends (as for a spawned child).
pub fn adopt(
    info: &ProcessInfo,
    marker: Option<String>,
    uid: u32,
    on_exit: impl FnOnce(Option<ExitInfo>) + Send + 'static,
) -> Option<ChildHandle> {
    if !leader_running(info) {
        return None;
    }
    let (tx, rx) = mpsc::unbounded_channel::<StopOrder>();
    let handle = ChildHandle {
        pgid: info.pgid,
        stop: tx,
    };
    let info = info.clone();
    tokio::spawn(async move {
        let exit = watch_group(info.pgid, leader_ended(info.clone()), rx, marker, uid).await;
        on_exit(exit);
    });
    Some(handle)
}

/// When the leader recorded in `info` has ended as this process's child (a zombie: it ended
/// around a restart in place), reaps it and returns its exit status; else `None`.
pub fn reap_ended_child(info: &ProcessInfo) -> Option<ExitInfo> {
    use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
    match stat_fields(info.pid) {
        Some(f) if f.start == info.start_ticks && f.state == 'Z' => {}
        _ => return None,
    }
    match waitpid(Pid::from_raw(info.pid), Some(WaitPidFlag::WNOHANG)) {
        Ok(WaitStatus::Exited(_, code)) => Some(ExitInfo {
            code: Some(code),
            signal: None,
        }),
        Ok(WaitStatus::Signaled(_, sig, _)) => Some(ExitInfo {
            code: None,
            signal: Some(sig as i32),
        }),
        _ => None,
    }
}

/// Is the process recorded in `info` still that process (same start time), and not ended?
pub fn leader_running(info: &ProcessInfo) -> bool {
    matches!(stat_fields(info.pid), Some(f) if f.start == info.start_ticks && f.state != 'Z' && f.state != 'X')
}

/// Resolves when the adopted leader `info` has ended: with its status if it is this
/// process's child (reaped here), else `None`. No notification exists for a process that is
/// not our child, so it looks every 200 ms (one `/proc` read).
async fn leader_ended(info: ProcessInfo) -> Option<ExitInfo> {
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    loop {
        tick.tick().await;
        if !leader_running(&info) {
            // Ended: reaped here with its status if it is our child (a zombie until then).
            return reap_ended_child(&info);
        }
    }
}

/// Every other process's pid, `/proc/PID` directory and environment (`/proc/PID/environ`:
/// `NUL`-separated `KEY=value`), as far as this process may read them: the walk of `/proc`
/// that finds a job's processes by the `JOBD_JOB_DIR` they carry.
pub fn environs() -> impl Iterator<Item = (i32, PathBuf, Vec<u8>)> {
    let me = std::process::id() as i32;
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(move |e| {
            let pid = e.file_name().to_str()?.parse::<i32>().ok()?;
            if pid == me {
                return None;
            }
            let environ = std::fs::read(e.path().join("environ")).ok()?;
            Some((pid, e.path(), environ))
        })
}

/// The value of `key` in an environment as [`environs`] gives it.
pub fn env_value<'a>(environ: &'a [u8], key: &str) -> Option<&'a str> {
    environ.split(|b| *b == 0).find_map(|var| {
        std::str::from_utf8(var)
            .ok()?
            .strip_prefix(key)?
            .strip_prefix('=')
    })
}

/// SIGKILLs every process of `uid` whose environment holds `entry` exactly (`JOBD_JOB_DIR=…`
/// of an ended job): what escaped its process group and its supervisor. Returns how many.
pub fn kill_marked(entry: &str, uid: u32) -> usize {
    use std::os::unix::fs::MetadataExt;
    let mut killed = 0;
    for (pid, dir, environ) in environs() {
        if std::fs::metadata(&dir).map_or(true, |m| m.uid() != uid) {
            continue;
        }
        if environ
            .split(|b| *b == 0)
            .any(|var| var == entry.as_bytes())
            && !is_notifier(&environ)
            && nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL).is_ok()
        {
            killed += 1;
        }
    }
    if killed > 0 {
        tracing::info!(
            killed,
            marker = entry,
            "killed processes that outlived their job"
        );
    }
    killed
}

/// Whether a process's environment (`/proc/PID/environ`) is a job's `[notify]` command's (it
/// has `JOBD_JOB_STATE`, which no job has): it carries its job's `JOBD_JOB_DIR`, but it is not
/// part of a run of the job, which may run again while it tells of the last end.
pub fn is_notifier(environ: &[u8]) -> bool {
    let key = format!("{}=", crate::spec::contract::ENV_JOB_STATE);
    environ
        .split(|b| *b == 0)
        .any(|var| var.starts_with(key.as_bytes()))
}

/// Stop signals (SIGTERM, SIGINT) this process image has received, counted when they arrive.
static STOP_SIGNALS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// Counts stop signals as they arrive, beside tokio's own handling of them (call it after
/// tokio's handlers are installed, so that a stop signal is never only counted): a signal's
/// arrival is then known at once, before any task has read it, and also once no task is
/// left to read it (the last instants of an image restarting in place).
pub fn count_stop_signals() {
    for sig in [nix::libc::SIGTERM, nix::libc::SIGINT] {
        // SAFETY: the action only increments an atomic, which is async-signal-safe.
        let _ = unsafe {
            signal_hook_registry::register(sig, || {
                STOP_SIGNALS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            })
        };
    }
}

/// How many stop signals this process image has received so far (see
/// [`count_stop_signals`]).
pub fn stop_signals() -> u32 {
    STOP_SIGNALS.load(std::sync::atomic::Ordering::SeqCst)
}

/// A `[notify]` command found running (see [`running_notifiers`]).
#[derive(Debug, Clone)]
pub struct FoundNotifier {
    /// Its job's directory (`JOBD_JOB_DIR`).
    pub job_dir: PathBuf,
    /// The end it tells of (`JOBD_JOB_STATE`).
    pub state: String,
    pub process: ProcessInfo,
    pub uid: u32,
}

/// The `[notify]` commands running now that lead their own process group, as jobd starts
/// them: for a daemon after a crash to find one started just before it, not yet recorded.
pub fn running_notifiers() -> Vec<FoundNotifier> {
    let mut found = Vec::new();
    for (pid, _, environ) in environs() {
        if !is_notifier(&environ) {
            continue;
        }
        let (Some(job_dir), Some(state)) = (
            env_value(&environ, crate::spec::contract::ENV_JOB_DIR),
            env_value(&environ, crate::spec::contract::ENV_JOB_STATE),
        ) else {
            continue;
        };
        let (Some(uid), Some(fields)) = (single_uid(pid), stat_fields(pid)) else {
            continue;
        };
        if fields.pgrp != pid || fields.state == 'Z' {
            continue;
        }
        found.push(FoundNotifier {
            job_dir: job_dir.into(),
            state: state.to_string(),
            process: ProcessInfo {
                pid,
                pgid: pid,
                start_ticks: fields.start,
            },
            uid,
        });
    }
    found
}

/// The uid process `pid` runs as when its real, effective, saved and file-system uids are
/// one (as for a process jobd starts for a user); `None` otherwise: a setuid program a user
/// started is not the program's owner's.
fn single_uid(pid: i32) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find_map(|l| l.strip_prefix("Uid:"))?;
    let uids: Vec<u32> = line
        .split_whitespace()
        .map(str::parse)
        .collect::<Result<_, _>>()
        .ok()?;
    (uids.len() == 4 && uids.iter().all(|u| *u == uids[0])).then(|| uids[0])
}

/// Sends `sig` to process group `pgid`, ignoring a group that is already gone.
pub fn signal_group(pgid: i32, sig: Signal) {
    let _ = killpg(Pid::from_raw(pgid), sig);
}

/// Is any process of group `pgid` alive? Zombies (dead, waiting to be reaped by init) do
/// not count.
pub fn group_alive(pgid: i32) -> bool {
    if killpg(Pid::from_raw(pgid), None).is_err() {
        return false;
    }
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return true;
    };
    entries.flatten().any(|e| {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            return false;
        };
        matches!(stat_fields(pid), Some(f) if f.pgrp == pgid && f.state != 'Z' && f.state != 'X')
    })
}

/// What `/proc/PID/stat` says of a process.
struct ProcStat {
    state: char,
    ppid: i32,
    pgrp: i32,
    /// Start time in clock ticks since boot.
    start: u64,
}

/// `/proc/PID/stat` of `pid`.
fn stat_fields(pid: i32) -> Option<ProcStat> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Field 2 (comm) may contain spaces and parentheses: parse after the last ')'.
    let mut rest = stat[stat.rfind(')')? + 2..].split_whitespace();
    let state = rest.next()?.chars().next()?;
    let ppid = rest.next()?.parse().ok()?;
    let pgrp = rest.next()?.parse().ok()?;
    let start = rest.nth(16)?.parse().ok()?;
    Some(ProcStat {
        state,
        ppid,
        pgrp,
        start,
    })
}

/// Start time of `pid` in clock ticks since boot (`/proc/PID/stat` field 22).
pub fn start_ticks(pid: i32) -> Option<u64> {
    stat_fields(pid).map(|f| f.start)
}

/// Is the worker recorded in `info` (from an earlier daemon run) still around? True when its
/// leader is alive with the same start time, or when members of its group remain.
pub fn worker_alive(info: &ProcessInfo) -> bool {
    match stat_fields(info.pid) {
        // A zombie has ended: orphaned by the earlier daemon, it waits for init to reap it.
        Some(f) if f.start == info.start_ticks && f.state != 'Z' && f.state != 'X' => true,
        Some(f) if f.start == info.start_ticks => group_alive(info.pgid),
        // Another process has the pid now: Linux never reuses a pid that still names a
        // process group, so our group is gone.
        Some(_) => false,
        // The leader is gone; members of its group may remain (the pgid cannot have been
        // reused while they exist).
        None => group_alive(info.pgid),
    }
}

/// Kills what is left of a job whose leader has gone (an earlier daemon's, not ours to
/// watch): its process group, as jobd kills what is left of a job when its leader ends.
/// Waits (briefly: SIGKILL is not caught) until the group is gone, so that its GPU memory is
/// free before the job is placed again; reaps the leader if it was our child. Returns
/// whether anything of it was alive.
pub async fn kill_leftover(info: &ProcessInfo) -> bool {
    if !worker_alive(info) {
        let _ = reap_ended_child(info);
        return false;
    }
    signal_group(info.pgid, Signal::SIGKILL);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while group_alive(info.pgid) && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Our child still, after a restart in place: reaped, not left a zombie.
    let _ = reap_ended_child(info);
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    fn req(dir: &Path, script: &str) -> SpawnRequest {
        SpawnRequest {
            program: "/bin/sh".into(),
            args: vec!["-c".into(), script.into()],
            env: vec![
                ("PATH".into(), "/usr/bin:/bin".into()),
                ("GREETING".into(), "hi".into()),
            ],
            cwd: dir.to_path_buf(),
            stdout: dir.join("out"),
            stderr: dir.join("err"),
            run_as: None,
            supervised: None,
            kill_escaped: true,
        }
    }

    /// A process whose uids are all one is that user's; this test process's are.
    #[test]
    fn single_uid_reads_all_four_uids() {
        let me = nix::unistd::geteuid().as_raw();
        assert_eq!(single_uid(std::process::id() as i32), Some(me));
        assert_eq!(single_uid(i32::MAX), None);
    }

    /// A worker that ended but was not reaped yet (its daemon died; init reaps it later) is
    /// a zombie: not alive, so recovery takes its recorded outcome instead of "stopping" it.
    #[test]
    fn a_zombie_worker_is_not_alive() {
        let mut child = std::process::Command::new("/bin/true")
            .process_group(0)
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        let start = start_ticks(pid).unwrap();
        // Not waited for: once it has exited it stays a zombie.
        let deadline = Instant::now() + Duration::from_secs(5);
        while stat_fields(pid).is_some_and(|f| f.state != 'Z') && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(stat_fields(pid).map(|f| f.state), Some('Z'));
        let info = ProcessInfo {
            pid,
            pgid: pid,
            start_ticks: start,
        };
        assert!(!worker_alive(&info));
        child.wait().unwrap();
    }

    #[tokio::test]
    async fn a_missing_working_directory_is_named_not_the_program() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = req(dir.path(), "true");
        r.cwd = dir.path().join("gone");
        let e = spawn(r, |_| {}).unwrap_err().to_string();
        assert!(e.contains("working directory") && e.contains("gone"), "{e}");
        let mut r = req(dir.path(), "true");
        r.program = "/no/such/program".into();
        let e = spawn(r, |_| {}).unwrap_err().to_string();
        assert!(e.starts_with("cannot start /no/such/program"), "{e}");
    }

    /// A job whose arguments exceed exec's limits is told so, naming its own program rather
    /// than the supervisor that jobd starts it under.
    #[tokio::test]
    async fn arguments_too_long_name_the_jobs_program() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = req(dir.path(), &"x".repeat(200 * 1024));
        r.supervised = Some("train.py".into());
        let e = spawn(r, |_| {}).unwrap_err().to_string();
        assert!(
            e.starts_with("cannot start train.py: its arguments and environment")
                && e.contains("pass large inputs in a file"),
            "{e}"
        );
    }

    #[tokio::test]
    async fn runs_with_cleared_env_and_own_group() {
        let dir = tempfile::tempdir().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let (info, _h) = spawn(
            req(
                dir.path(),
                "echo $GREETING ${HOME:-nohome}; echo oops >&2; ps -o pgid= -p $$; exit 3",
            ),
            move |e| tx.send(e).unwrap(),
        )
        .unwrap();
        let exit = rx.await.unwrap();
        assert_eq!(exit.code, Some(3));
        let out = std::fs::read_to_string(dir.path().join("out")).unwrap();
        let mut lines = out.lines();
        assert_eq!(lines.next(), Some("hi nohome"));
        if let Some(pgid) = lines.next() {
            assert_eq!(
                pgid.trim(),
                info.pid.to_string(),
                "leads its own process group"
            );
        }
        assert_eq!(
            std::fs::read_to_string(dir.path().join("err")).unwrap(),
            "oops\n"
        );
        assert!(info.start_ticks > 0);
    }

    #[tokio::test]
    async fn stop_escalates_to_sigkill_and_leaves_no_orphans() {
        let dir = tempfile::tempdir().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel();
        // The shell and its background child both ignore SIGTERM.
        let (info, h) = spawn(
            req(dir.path(), "trap '' TERM; sleep 1000 & echo started; wait"),
            move |e| tx.send(e).unwrap(),
        )
        .unwrap();
        while !std::fs::read_to_string(dir.path().join("out"))
            .unwrap_or_default()
            .contains("started")
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let t = Instant::now();
        h.stop(Duration::from_millis(300));
        let exit = rx.await.unwrap();
        assert!(
            t.elapsed() >= Duration::from_millis(300),
            "waited for the grace period"
        );
        assert_eq!(exit.signal, Some(9));
        // SIGKILL has reached the whole group; a member the kernel has not yet scheduled to
        // die may linger for a moment on a busy machine, so allow it a bounded wait.
        let mut alive = group_alive(info.pgid);
        for _ in 0..200 {
            if !alive {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
            alive = group_alive(info.pgid);
        }
        assert!(!alive, "no process of the job survives");
    }

    #[tokio::test]
    async fn leftover_processes_are_found_and_killed() {
        let dir = tempfile::tempdir().unwrap();
        // Simulate a worker of a crashed daemon: a process group we do not supervise.
        let child = std::process::Command::new("/bin/sh")
            .args(["-c", "sleep 1000"])
            .process_group(0)
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        let info = ProcessInfo {
            pid,
            pgid: pid,
            start_ticks: start_ticks(pid).unwrap(),
        };
        assert!(worker_alive(&info));
        let reused = ProcessInfo {
            start_ticks: info.start_ticks + 1,
            ..info.clone()
        };
        assert!(
            !worker_alive(&reused),
            "a pid with another start time is another process"
        );
        assert!(kill_leftover(&info).await);
        // Our child (as after a restart in place): reaped, not left a zombie.
        assert!(
            stat_fields(pid).is_none_or(|f| f.start != info.start_ticks),
            "reaped"
        );
        let _ = child.wait_with_output();
        assert!(!group_alive(pid));
        assert!(!worker_alive(&info));
        drop(dir);
    }

    fn info_of(pid: i32) -> ProcessInfo {
        ProcessInfo {
            pid,
            pgid: pid,
            start_ticks: start_ticks(pid).unwrap(),
        }
    }

    /// A job's leader left by an earlier daemon image that is still this process's child (a
    /// restart in place): taken over, its real exit status reaped; a stop reaches its group.
    #[tokio::test]
    // The children are reaped by `adopt`, which is what this tests.
    #[allow(clippy::zombie_processes)]
    async fn an_adopted_child_gives_its_exit_status() {
        let child = std::process::Command::new("/bin/sh")
            .args(["-c", "sleep 0.3; exit 7"])
            .process_group(0)
            .spawn()
            .unwrap();
        let info = info_of(child.id() as i32);
        let (tx, rx) = tokio::sync::oneshot::channel();
        let handle = adopt(&info, Some("JOBD_TEST_NONE=1".into()), 0, move |e| {
            let _ = tx.send(e);
        })
        .expect("running");
        assert_eq!(handle.pgid(), info.pgid);
        let exit = tokio::time::timeout(Duration::from_secs(10), rx)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(exit.and_then(|e| e.code), Some(7));
        assert!(!leader_running(&info));
        assert!(
            adopt(&info, None, 0, |_| {}).is_none(),
            "an ended leader is not taken over"
        );

        let stubborn = std::process::Command::new("/bin/sh")
            .args(["-c", "trap '' TERM; sleep 1000"])
            .process_group(0)
            .spawn()
            .unwrap();
        let info = info_of(stubborn.id() as i32);
        let (tx, rx) = tokio::sync::oneshot::channel();
        let handle = adopt(&info, Some("JOBD_TEST_NONE=1".into()), 0, move |e| {
            let _ = tx.send(e);
        })
        .unwrap();
        // Its trap set before the stop comes.
        tokio::time::sleep(Duration::from_millis(300)).await;
        handle.stop(Duration::from_millis(300));
        let exit = tokio::time::timeout(Duration::from_secs(10), rx)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(exit.and_then(|e| e.signal), Some(Signal::SIGKILL as i32));
        // The leader's end is seen first; under load the rest of the group (its `sleep`)
        // may take a moment more to die of the same SIGKILL.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while group_alive(info.pgid) && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(!group_alive(info.pgid));
    }

    /// A leader that is not this process's child (its parent daemon died): watched through
    /// `/proc` until it ends; its exit status is not ours to know.
    #[tokio::test]
    async fn an_adopted_orphan_is_watched_until_it_ends() {
        let dir = tempfile::tempdir().unwrap();
        let pid_file = dir.path().join("pid");
        // The shell starts a new group's leader in the background and exits: the leader's
        // parent is gone, as a worker's is after a daemon crash.
        let status = std::process::Command::new("/bin/sh")
            .args([
                "-c",
                &format!(
                    "setsid sh -c 'sleep 0.5' & echo $! > {}",
                    pid_file.display()
                ),
            ])
            .status()
            .unwrap();
        assert!(status.success());
        let pid: i32 = std::fs::read_to_string(&pid_file)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        // setsid forks when it leads a group already; wait for the session leader to exist.
        let mut info = None;
        for _ in 0..100 {
            if let Some(p) = (pid..pid + 5).find(|p| {
                stat_fields(*p).is_some_and(|f| f.pgrp == *p && f.state != 'Z')
                    && std::fs::read_to_string(format!("/proc/{p}/cmdline"))
                        .is_ok_and(|c| c.contains("sleep 0.5"))
            }) {
                info = Some(info_of(p));
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let info = info.expect("the orphan leader");
        assert!(
            nix::sys::wait::waitpid(
                Pid::from_raw(info.pid),
                Some(nix::sys::wait::WaitPidFlag::WNOHANG)
            )
            .is_err(),
            "not our child"
        );
        let (tx, rx) = tokio::sync::oneshot::channel();
        adopt(&info, Some("JOBD_TEST_NONE=1".into()), 0, move |e| {
            let _ = tx.send(e);
        })
        .expect("running");
        let exit = tokio::time::timeout(Duration::from_secs(10), rx)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(exit, None, "not our child: no status");
        assert!(!leader_running(&info));
    }
}
