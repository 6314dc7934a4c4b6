//! L4: the daemon's wiring — directories, store, inventory, recovery, listeners, scheduler —
//! and its orderly shutdown: stop accepting, stop dispatching, SIGTERM the workers (they
//! checkpoint), wait out the grace period, SIGKILL, record them interrupted, flush. Or, for a
//! restart in place (`SIGHUP`, `systemctl reload`), the same without stopping the workers:
//! the listening sockets are handed to the next daemon image, which takes the jobs over.

use std::os::fd::{AsFd, FromRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::api::{self, AppState, AuthPolicy, UnixPeer};
use crate::config::Config;
use crate::gpu::Inventory;
use crate::sched::{self, SchedSettings, Scheduler};
use crate::spec::now_ms;
use crate::store::Store;

mod systemd;

/// Connections served at once on the unix socket (`jobctl`, `logs -f` followers).
const UNIX_CONNECTIONS: usize = 1024;

/// The environment variable that hands listening sockets to the next daemon image at a
/// restart in place: `unix=FD,tcp=FD` (descriptors left open across `exec`).
pub const ENV_LISTEN_FDS: &str = "JOBD_LISTEN_FDS";

/// The path this executable was started from, symlinks kept (a `current` link switched to a
/// new version is followed at the next restart in place): `argv[0]` made absolute, or found
/// on `PATH`; else what `/proc/self/exe` names.
pub fn started_as() -> Option<PathBuf> {
    let argv0 = PathBuf::from(std::env::args_os().next()?);
    if argv0.components().count() > 1 {
        return std::path::absolute(&argv0).ok();
    }
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join(&argv0))
                .find(|p| p.is_file())
                .and_then(|p| std::path::absolute(p).ok())
        })
        .or_else(|| std::env::current_exe().ok())
}

/// How the daemon is asked to end; cheap to clone (the signal handler holds one).
#[derive(Debug, Clone, Default)]
pub struct StopRequest {
    token: CancellationToken,
    keep_jobs: Arc<AtomicBool>,
}

impl StopRequest {
    pub fn new() -> StopRequest {
        StopRequest::default()
    }

    /// Stop: running jobs checkpoint and are recorded interrupted (they resume at the next
    /// start).
    pub fn stop(&self) {
        self.token.cancel();
    }

    /// Restart in place: running jobs keep running; [`run`] returns [`Ended::Restart`], and
    /// the caller starts the daemon's executable again in this process.
    pub fn restart(&self) {
        self.keep_jobs.store(true, Ordering::SeqCst);
        self.token.cancel();
    }
}

/// How [`run`] ended.
#[derive(Debug)]
pub enum Ended {
    /// Every worker has stopped.
    Stopped,
    /// Running jobs were left running for the next daemon image; `listen_fds` is the value
    /// of [`ENV_LISTEN_FDS`] for it (its descriptors are not closed at `exec`).
    Restart { listen_fds: String },
}

/// Runs the daemon until `stop` is asked; returns after every worker has stopped, or, for a
/// restart in place, once the queue is on disk with the running jobs left running.
pub async fn run(config: Config, stop: StopRequest) -> anyhow::Result<Ended> {
    let fd_limit = crate::proc::raise_fd_limit();
    if fd_limit < u64::from(config.max_connections) + UNIX_CONNECTIONS as u64 + 256 {
        tracing::warn!(
            open_files = fd_limit,
            max_connections = config.max_connections,
            "the limit on open files leaves little room beyond max_connections (raise LimitNOFILE or ulimit -n)"
        );
    }
    prepare_dirs(&config)?;
    // A full file system where the store lives: its reserve makes room to open it.
    let store = match Store::open(&config.store_dir()) {
        Err(e) if e.is_disk_full() && crate::store::release_reserve(&config.store_dir()) => {
            warn!("the state directory's file system is full: gave back jobd's reserve to start");
            Store::open(&config.store_dir())
        }
        other => other,
    };
    if !crate::store::ensure_reserve(&config.store_dir()) {
        warn!(
            dir = %config.store_dir().display(),
            "cannot set aside jobd's disk reserve (little free space): a full disk would stop the queue"
        );
    }
    let store = store.map_err(|e| {
        let text = e.to_string();
        if text.contains("lock") {
            anyhow::anyhow!(
                "{e}\n(is another jobd already using {}?)",
                config.state_dir.display()
            )
        } else if text.contains("orrupt") {
            anyhow::anyhow!(
                "{e}\nthe job store {} is damaged (a disk fault, or a file cut short). Move it \
                 aside (mv {0} {0}.damaged) to start with an empty queue: each job's files, \
                 its job file (job.toml) included, stay in {}",
                config.store_dir().display(),
                config.jobs_dir().display()
            )
        } else if text.contains("No space left") {
            anyhow::anyhow!(
                "{e}\nthe file system of {} is full: free some space (old job directories in \
                 {}, checkpoints) and start jobd again",
                config.state_dir.display(),
                config.jobs_dir().display()
            )
        } else {
            e.into()
        }
    })?;
    let inventory = Inventory::open(&config.gpus);
    let snap = inventory.snapshot(&|_| false);
    match &snap.note {
        Some(note) if snap.gpus.is_empty() => info!(source = snap.source, "{note}"),
        _ => info!(
            source = snap.source,
            gpus = snap.gpus.len(),
            "GPU inventory"
        ),
    }
    for g in &snap.gpus {
        info!(index = g.index, name = %g.name, uuid = %g.uuid, total = %crate::spec::units::ByteSize(g.total_bytes), "GPU");
    }
    let settings = SchedSettings {
        store_dir: config.store_dir(),
        jobs_dir: config.jobs_dir(),
        grace: config.grace_period,
        max_cpu_jobs: config.max_cpu_jobs,
        policy: config.scheduler.clone(),
        worker_exe: std::env::current_exe()
            .context("cannot find the jobd executable for workers")?,
        worker_exe_link: started_as(),
        worker_library_path: std::env::var("LD_LIBRARY_PATH")
            .ok()
            .filter(|v| !v.is_empty()),
        run_as_owner: crate::config::running_as_root(),
        ollama_models: config.ollama_models.clone(),
        schedule_tz: config.schedule_timezone,
        admins: config.admins.clone(),
        restarted_in_place: std::env::var_os(ENV_LISTEN_FDS).is_some(),
        stop_asked: stop.token.clone(),
    };
    if let Some(m) = &config.ollama_models
        && !m.is_dir()
    {
        warn!(
            dir = %m.display(),
            "the Ollama models directory does not exist: train jobs that publish there are refused until it does"
        );
    }
    // Bound before recovery, which may wait a grace period for an earlier run's workers:
    // clients that come meanwhile wait in the backlog, answered once it is done, rather than
    // being told that no daemon runs.
    let mut inherited = inherited_listeners();
    let inherited_unix = inherited.unix.take().and_then(|l| {
        let path = l
            .local_addr()
            .ok()
            .and_then(|a| a.as_pathname().map(Path::to_path_buf))?;
        if path == config.socket && path.exists() {
            return Some(l);
        }
        // The configuration moved the socket: the old one's file goes with it.
        drop(l);
        if std::fs::symlink_metadata(&path)
            .is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()))
        {
            let _ = std::fs::remove_file(&path);
        }
        None
    });
    let unix = Arc::new(match inherited_unix {
        Some(l) => l,
        None => bind_unix(&config.socket)?,
    });
    let unix_for_next = unix.clone();
    let mut tcp_for_next = None;
    let (scheduler, handle) = Scheduler::start(store, inventory, settings)
        .await
        .context("cannot recover the job queue")?;
    let mut sched_task = tokio::spawn(scheduler.run());

    let state = AppState {
        sched: handle.clone(),
        auth: Arc::new(AuthPolicy::from_config(&config)),
        jobs_dir: Arc::new(config.jobs_dir()),
        watcher: api::follow::DirWatcher::new(),
        started_at: now_ms(),
        ollama_models: Arc::new(config.ollama_models.clone()),
        train_results: Arc::default(),
    };
    let router = api::router(state);

    info!(socket = %config.socket.display(), "listening on unix socket");
    let stop_serving = CancellationToken::new();
    let mut servers = Vec::new();
    let unix_limits = api::ServeLimits {
        request_timeout: config.header_read_timeout,
        max_connections: UNIX_CONNECTIONS,
        max_per_user: Some(UNIX_CONNECTIONS / 4),
        allowed_hosts: None,
    };
    servers.push(tokio::spawn(api::serve(
        move || {
            let unix = unix.clone();
            async move {
                let (stream, _) = unix.accept().await?;
                let peer = UnixPeer::of(&stream);
                Ok((stream, Some(peer)))
            }
        },
        router.clone(),
        unix_limits,
        stop_serving.clone(),
    )));
    if config.listen.is_none() {
        // Left by an earlier run (or image) that listened: it names nothing any more.
        let _ = std::fs::remove_file(config.state_dir.join("http.addr"));
    }
    if let Some(addr) = config.listen {
        // The listener of the daemon image before a restart in place, if it listened there.
        let tcp = match inherited.tcp.take().filter(|l| {
            l.local_addr()
                .is_ok_and(|a| a.ip() == addr.ip() && (addr.port() == 0 || a.port() == addr.port()))
        }) {
            Some(l) => l,
            None => tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on {addr}"))?,
        };
        let local = tcp.local_addr()?;
        info!(address = %local, "listening on TCP");
        // The bound address (useful with port 0), for tools and tests.
        // Written whole or not at all (a reader must never see it empty): a temp file renamed.
        let tmp = config.state_dir.join("http.addr.tmp");
        std::fs::write(&tmp, format!("{local}\n"))
            .and_then(|()| std::fs::rename(&tmp, config.state_dir.join("http.addr")))
            .context("cannot write http.addr")?;
        let tcp = Arc::new(tcp);
        tcp_for_next = Some(tcp.clone());
        servers.push(tokio::spawn(api::serve(
            move || {
                let tcp = tcp.clone();
                async move {
                    let (stream, _) = tcp.accept().await?;
                    let _ = stream.set_nodelay(true);
                    Ok((stream, None))
                }
            },
            router,
            api::ServeLimits {
                request_timeout: config.header_read_timeout,
                max_connections: config.max_connections as usize,
                max_per_user: None,
                allowed_hosts: api::ServeLimits::hosts_for(local, &config.allowed_hosts),
            },
            stop_serving.clone(),
        )));
    }
    // A socket handed over for a listener the configuration no longer has: closed, so that
    // its clients are refused rather than left waiting.
    drop(inherited);
    info!(state_dir = %config.state_dir.display(), "jobd ready");
    systemd::ready(&systemd::status_line(&handle));
    let keepalive = CancellationToken::new();
    systemd::spawn_keepalive(handle.clone(), keepalive.clone());

    // The scheduler is the only writer of job state: if it ever ends by itself (a bug that
    // panicked in it), serving on would answer every change with "shutting down" while
    // `/health` said ok. Exit with an error instead, so that systemd (`Restart=on-failure`)
    // restarts jobd, whose recovery takes the queue back from disk.
    tokio::select! {
        () = stop.token.cancelled() => {}
        ended = &mut sched_task => {
            let why = match ended {
                Err(e) if e.is_panic() => "it panicked (see above)".to_string(),
                Err(e) => e.to_string(),
                Ok(()) => "it returned".to_string(),
            };
            error!("the scheduler stopped unexpectedly: {why}; exiting so that jobd restarts");
            stop_serving.cancel();
            keepalive.cancel();
            anyhow::bail!("the scheduler stopped unexpectedly ({why}); the queue is safe on disk: start jobd again");
        }
    }
    let restart = stop.keep_jobs.load(Ordering::SeqCst);
    if restart {
        systemd::reloading();
        // A publish in progress (minutes for a big model) ends first; requests are served
        // meanwhile.
        sched::drain(&handle).await;
        info!("restarting in place: no new connections until the next image serves them");
    } else {
        info!("stopping: no new connections");
        systemd::stopping();
    }
    stop_serving.cancel();
    // Followers (log streams) would keep graceful shutdown waiting forever: give open requests
    // a moment, then drop them. A restart lets them end before the scheduler hands over, so
    // that what they asked is done or refused by this image, never cut off.
    let servers_ended = async {
        for s in servers {
            if tokio::time::timeout(Duration::from_secs(2), s)
                .await
                .is_err()
            {
                warn!("closing open streams");
            }
        }
    };
    if restart {
        servers_ended.await;
        sched::hand_over(&handle).await;
    } else {
        sched::shutdown(&handle).await;
        servers_ended.await;
    }
    keepalive.cancel();
    if restart {
        // The store is closed (its lock released) before the next image opens it.
        let _ = sched_task.await;
        // Connections that come meanwhile wait in the sockets' backlogs for the next image.
        let mut fds = Vec::new();
        let keep = |fd: std::os::fd::BorrowedFd<'_>| -> anyhow::Result<i32> {
            // A duplicate has no close-on-exec flag: it stays open for the next image.
            let dup = nix::unistd::dup(fd).context("cannot keep a listening socket open")?;
            Ok(std::os::fd::IntoRawFd::into_raw_fd(dup))
        };
        fds.push(format!("unix={}", keep(unix_for_next.as_fd())?));
        if let Some(tcp) = &tcp_for_next {
            fds.push(format!("tcp={}", keep(tcp.as_fd())?));
        }
        info!("handing over to the next daemon image");
        return Ok(Ended::Restart {
            listen_fds: fds.join(","),
        });
    }
    drop(sched_task);
    let _ = std::fs::remove_file(&config.socket);
    let _ = std::fs::remove_file(config.state_dir.join("http.addr"));
    info!("stopped");
    Ok(Ended::Stopped)
}

/// Listening sockets handed over by the daemon image before a restart in place.
#[derive(Default)]
struct Inherited {
    unix: Option<tokio::net::UnixListener>,
    tcp: Option<tokio::net::TcpListener>,
}

/// Takes the listening sockets named in [`ENV_LISTEN_FDS`], each checked to be a listening
/// socket of its kind (anything else is left alone: a stale variable must not take over an
/// unrelated descriptor). A unix socket is kept only if it is still bound where the
/// configuration says (see `run`); a TCP one only for the address configured.
fn inherited_listeners() -> Inherited {
    let mut out = Inherited::default();
    let Ok(value) = std::env::var(ENV_LISTEN_FDS) else {
        return out;
    };
    for entry in value.split(',') {
        let Some((kind, fd)) = entry.split_once('=') else {
            continue;
        };
        let Ok(fd) = fd.parse::<i32>() else {
            continue;
        };
        if fd < 3 || !is_listening_socket(fd) {
            continue;
        }
        // SAFETY: `fd` is an open listening socket (checked above) that nothing else in this
        // process owns: the previous image left it for us and named it only here.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        let _ = nix::fcntl::fcntl(
            &owned,
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
        );
        match kind {
            "unix" => {
                let l = std::os::unix::net::UnixListener::from(owned);
                if l.set_nonblocking(true).is_ok() {
                    out.unix = tokio::net::UnixListener::from_std(l).ok();
                }
            }
            "tcp" => {
                let l = std::net::TcpListener::from(owned);
                if l.set_nonblocking(true).is_ok() {
                    out.tcp = tokio::net::TcpListener::from_std(l).ok();
                }
            }
            _ => {}
        }
    }
    out
}

/// Is `fd` an open socket that listens?
fn is_listening_socket(fd: i32) -> bool {
    use nix::sys::socket::{getsockopt, sockopt::AcceptConn};
    // SAFETY: borrowed only for the call; a closed descriptor makes it fail.
    let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    getsockopt(&fd, AcceptConn).unwrap_or(false)
}

fn prepare_dirs(config: &Config) -> anyhow::Result<()> {
    let mk = |p: &Path, mode: u32| -> anyhow::Result<()> {
        std::fs::create_dir_all(p).with_context(|| format!("cannot create {}", p.display()))?;
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))
            .with_context(|| format!("cannot set permissions of {}", p.display()))
    };
    // The state directory's mode is set below (others may enter it, not list it): only a
    // directory of jobd's own may have its mode changed so.
    if let Ok(m) = std::fs::metadata(&config.state_dir) {
        use std::os::unix::fs::MetadataExt;
        let dir = config.state_dir.display();
        let me = nix::unistd::geteuid().as_raw();
        if m.uid() != me {
            bail!(
                "the state directory {dir} belongs to uid {} (jobd runs as uid {me}): jobd keeps \
                 its queue and job directories in a directory of its own; choose another \
                 --state-dir",
                m.uid()
            );
        }
        if m.mode() & 0o1002 != 0 {
            bail!(
                "the state directory {dir} is writable by everyone (like /tmp), and jobd would \
                 make it private: use a directory of its own, e.g. {dir}/jobd"
            );
        }
    }
    // Job directories belong to their owners, who must be able to reach them.
    mk(&config.state_dir, 0o711)?;
    mk(&config.jobs_dir(), 0o711)?;
    mk(&config.store_dir(), 0o700)?;
    if let Some(parent) = config.socket.parent()
        && !parent.exists()
    {
        mk(parent, 0o755)?;
    }
    Ok(())
}

/// Binds the unix socket, replacing a stale one, and lets every local user connect (identity
/// comes from the kernel; authorisation is the daemon's).
fn bind_unix(path: &Path) -> anyhow::Result<tokio::net::UnixListener> {
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            bail!("another jobd is listening on {}", path.display());
        }
        std::fs::remove_file(path)
            .with_context(|| format!("cannot remove stale socket {}", path.display()))?;
    }
    let listener = tokio::net::UnixListener::bind(path)
        .with_context(|| format!("cannot bind {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))
        .with_context(|| format!("cannot set permissions of {}", path.display()))?;
    Ok(listener)
}
