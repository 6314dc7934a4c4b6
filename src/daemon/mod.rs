//! L4: the daemon's wiring — directories, store, inventory, recovery, listeners, scheduler —
//! and its orderly shutdown: stop accepting, stop dispatching, SIGTERM the workers (they
//! checkpoint), wait out the grace period, SIGKILL, record them interrupted, flush.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
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

/// Runs the daemon until `shutdown` is cancelled; returns after every worker has stopped.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
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
        worker_library_path: std::env::var("LD_LIBRARY_PATH")
            .ok()
            .filter(|v| !v.is_empty()),
        run_as_owner: crate::config::running_as_root(),
        ollama_models: config.ollama_models.clone(),
        schedule_tz: config.schedule_timezone,
        admins: config.admins.clone(),
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
    let unix = Arc::new(bind_unix(&config.socket)?);
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
    if let Some(addr) = config.listen {
        let tcp = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr}"))?;
        let local = tcp.local_addr()?;
        info!(address = %local, "listening on TCP");
        // The bound address (useful with port 0), for tools and tests.
        std::fs::write(config.state_dir.join("http.addr"), format!("{local}\n"))
            .context("cannot write http.addr")?;
        let tcp = Arc::new(tcp);
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
    info!(state_dir = %config.state_dir.display(), "jobd ready");
    systemd::ready(&systemd::status_line(&handle));
    let keepalive = CancellationToken::new();
    systemd::spawn_keepalive(handle.clone(), keepalive.clone());

    // The scheduler is the only writer of job state: if it ever ends by itself (a bug that
    // panicked in it), serving on would answer every change with "shutting down" while
    // `/health` said ok. Exit with an error instead, so that systemd (`Restart=on-failure`)
    // restarts jobd, whose recovery takes the queue back from disk.
    tokio::select! {
        () = shutdown.cancelled() => {}
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
    info!("stopping: no new connections");
    systemd::stopping();
    stop_serving.cancel();
    sched::shutdown(&handle).await;
    // Followers (log streams) would keep graceful shutdown waiting forever: give open requests
    // a moment, then drop them.
    for s in servers {
        if tokio::time::timeout(Duration::from_secs(2), s)
            .await
            .is_err()
        {
            warn!("closing open streams");
        }
    }
    keepalive.cancel();
    drop(sched_task);
    let _ = std::fs::remove_file(&config.socket);
    let _ = std::fs::remove_file(config.state_dir.join("http.addr"));
    info!("stopped");
    Ok(())
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
