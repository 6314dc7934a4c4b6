//! `jobd`: the daemon (default), and its helper commands. All logic lives in the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

use jobd::config::{Config, Overrides};
use jobd::daemon::{Ended, StopRequest};
use jobd::spec::units::HumanDuration;

/// jobd — a batch scheduler for shared GPU machines. Without a subcommand it runs the daemon.
#[derive(Debug, Parser)]
#[command(
    name = "jobd",
    version,
    about,
    long_about = None,
    args_conflicts_with_subcommands = true,
    after_help = "Signals: SIGTERM or SIGINT stops the daemon (running jobs checkpoint and resume at \
                  the next start; a second one exits at once). SIGHUP (systemctl reload) restarts it \
                  in place with its configuration file and executable as they are now: running jobs \
                  keep running. Should jobd die, a restarted jobd takes over the jobs still running."
)]
struct Args {
    /// Config file (TOML; see dist/jobd.toml). Flags override it.
    #[arg(long, short = 'c', value_name = "FILE", env = "JOBD_CONFIG")]
    config: Option<PathBuf>,
    /// Directory for the job store and job directories [default: /var/lib/jobd as root,
    /// else $XDG_STATE_HOME/jobd or ~/.local/state/jobd].
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// Unix socket for jobctl [default: /run/jobd/jobd.sock as root with the default state
    /// directory, else STATE_DIR/jobd.sock].
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Also listen on TCP (dashboard, remote clients with a token), e.g. 127.0.0.1:8470.
    #[arg(long, value_name = "ADDR")]
    listen: Option<String>,
    /// GPU inventory: auto (NVML), none, fake:24GiB,80GiB (simulated; "+6GiB" adds foreign use)
    /// or fake-file:PATH.
    #[arg(long, value_name = "SPEC")]
    gpus: Option<String>,
    /// Time between SIGTERM and SIGKILL when stopping a job [default: 30s].
    #[arg(long, value_name = "DURATION")]
    grace_period: Option<HumanDuration>,
    /// Most CPU-only jobs at once [default: number of cores].
    #[arg(long, value_name = "N")]
    max_cpu_jobs: Option<u32>,
    /// Default Ollama models directory for [publish] [default: $OLLAMA_MODELS, else
    /// /usr/share/ollama/.ollama/models as root or ~/.ollama/models, if it exists]
    #[arg(long, value_name = "DIR")]
    ollama_models: Option<PathBuf>,
    /// More logging (-v debug, -vv trace); JOBD_LOG or RUST_LOG set filters.
    #[arg(short, long, action = clap::ArgAction::Count)]
    verbose: u8,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a train job's worker (started by the daemon; see ARCHITECTURE.md, worker contract).
    Worker {
        /// The job directory holding spec.json.
        #[arg(long, value_name = "DIR")]
        job_dir: PathBuf,
    },
    /// Run a command job's command and record how it ended (started by the daemon in place
    /// of the command, so that the outcome survives a daemon restart).
    #[command(name = "run-command", hide = true)]
    Supervise {
        /// Where to write the exit status.
        #[arg(long, value_name = "FILE")]
        status: PathBuf,
        /// The attempt this run is (JOBD_ATTEMPT).
        #[arg(long)]
        attempt: u32,
        /// Run the command as this uid (a root daemon's supervisor stays root).
        #[arg(long, requires_all = ["gid", "workdir"])]
        uid: Option<u32>,
        #[arg(long)]
        gid: Option<u32>,
        /// Supplementary groups, comma-separated.
        #[arg(long, value_delimiter = ',')]
        groups: Vec<u32>,
        /// The command's working directory, entered as the user.
        #[arg(long)]
        workdir: Option<PathBuf>,
        /// The command and its arguments (after `--`).
        #[arg(last = true, required = true, value_name = "COMMAND")]
        command: Vec<std::ffi::OsString>,
    },
    /// Generate text greedily from a model in Hugging Face layout (a job's output directory).
    #[command(group(clap::ArgGroup::new("input").required(true).args(["prompt", "chat"])))]
    Generate {
        /// Model directory (config.json, model.safetensors, tokenizer.json).
        #[arg(long, value_name = "DIR")]
        model: PathBuf,
        /// The prompt, continued as it is.
        #[arg(long)]
        prompt: Option<String>,
        /// A user message: rendered with the model's chat template (its
        /// tokenizer_config.json's), the reply ends with the assistant's turn. A `<think>`
        /// block's reasoning goes to stderr ("thinking: ..."), the answer to stdout.
        #[arg(long, value_name = "MESSAGE")]
        chat: Option<String>,
        /// Tokens to generate (reasoning included).
        #[arg(long, default_value_t = 64)]
        max_tokens: usize,
    },
    /// Make a bearer token for the TCP listener and print the config lines that grant it.
    Token {
        /// The Unix user the token acts as.
        #[arg(long)]
        user: String,
    },
    /// Probe the GPU inventory as the daemon would (no CUDA context) and print it.
    Gpus {
        /// auto, none, fake:..., fake-file:PATH (as the daemon's --gpus, also accepted here).
        #[arg(
            long,
            visible_alias = "gpus",
            default_value = "auto",
            value_name = "SPEC"
        )]
        source: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

fn init_logging(verbose: u8) {
    init_logging_from(match verbose {
        0 => "info",
        1 => "debug",
        _ => "trace",
    });
}

/// Logging to stderr at `default` level unless `JOBD_LOG`/`RUST_LOG` say otherwise.
fn init_logging_from(default: &str) {
    let filter = std::env::var("JOBD_LOG")
        .or_else(|_| std::env::var("RUST_LOG"))
        .ok()
        .and_then(|f| EnvFilter::try_new(f).ok())
        .unwrap_or_else(|| EnvFilter::new(default));
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

/// `println!` through `jobd::cli::write_stdout`: a reader that stops early (`jobd gpus |
/// head -1`) ends jobd quietly instead of with a panic.
macro_rules! outln {
    ($($arg:tt)*) => {
        jobd::cli::write_stdout(format_args!("{}\n", format_args!($($arg)*)))
    };
}

fn main() -> ExitCode {
    let args = Args::parse();
    match args.command {
        Some(Command::Worker { job_dir }) => jobd::worker::main(&job_dir),
        Some(Command::Supervise {
            status,
            attempt,
            uid,
            gid,
            groups,
            workdir,
            command,
        }) => {
            let user = match (uid, gid, workdir) {
                (Some(uid), Some(gid), Some(workdir)) => Some(jobd::proc::CommandUser {
                    uid,
                    gid,
                    groups,
                    workdir,
                }),
                _ => None,
            };
            jobd::proc::supervise(&status, attempt, user.as_ref(), &command[0], &command[1..])
        }
        Some(Command::Generate {
            model,
            prompt,
            chat,
            max_tokens,
        }) => {
            // Warnings only (a checkpoint's tensors the model leaves out): stdout is the text.
            init_logging_from("warn");
            let text = match chat {
                // The answer on stdout; reasoning, if the reply has any, on stderr.
                Some(message) => {
                    jobd::train::generate::chat(&model, &message, max_tokens).map(|reply| {
                        if let Some(thinking) = reply.thinking.filter(|t| !t.is_empty()) {
                            eprintln!("thinking: {thinking}");
                        }
                        if reply.unfinished_thinking {
                            eprintln!(
                                "jobd: the reply stopped inside its reasoning: --max-tokens \
                                 ({max_tokens}) counts the reasoning too"
                            );
                        }
                        reply.answer
                    })
                }
                // clap requires one of --prompt and --chat.
                None => jobd::train::generate(&model, &prompt.unwrap_or_default(), max_tokens),
            };
            match text {
                Ok(text) => {
                    outln!("{text}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("jobd: {e}");
                    ExitCode::from(1)
                }
            }
        }
        Some(Command::Token { user }) => {
            if user.trim().is_empty() || user.chars().any(char::is_control) {
                eprintln!("jobd: --user must name a Unix user");
                return ExitCode::from(2);
            }
            // A root daemon runs the token's jobs as that account: it should exist here.
            if jobd::proc::RunAs::lookup(&user).is_err() {
                eprintln!(
                    "jobd: warning: there is no user {user:?} on this machine; a root daemon \
                     refuses that token's submissions until there is"
                );
            }
            let token = jobd::config::new_token();
            outln!("token for {user} (give it to them; it is not stored anywhere):\n  {token}\n");
            outln!(
                "add to the daemon's config file:\n[[tokens]]\nuser = {user:?}\nsha256 = {:?}",
                jobd::config::hash_token(&token)
            );
            ExitCode::SUCCESS
        }
        Some(Command::Gpus { source, json }) => {
            let source = match source.parse() {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("jobd: {e}");
                    return ExitCode::from(1);
                }
            };
            let snap = jobd::gpu::Inventory::open(&source).snapshot(&|_| false);
            if json {
                outln!(
                    "{}",
                    serde_json::to_string_pretty(&snap).unwrap_or_default()
                );
            } else {
                outln!("source: {}", snap.source);
                if let Some(v) = &snap.driver_version {
                    outln!("driver: {v}");
                }
                if let Some(n) = &snap.note {
                    outln!("note: {n}");
                }
                for g in &snap.gpus {
                    outln!(
                        "GPU {}: {} {} bus {} total {} free {} foreign {} cc {} util {}",
                        g.index,
                        g.name,
                        g.uuid,
                        g.pci_bus_id.as_deref().unwrap_or("?"),
                        jobd::spec::units::ByteSize(g.total_bytes),
                        g.free_bytes
                            .map_or("?".into(), |b| jobd::spec::units::ByteSize(b).to_string()),
                        jobd::spec::units::ByteSize(g.foreign_bytes),
                        g.compute_capability.as_deref().unwrap_or("?"),
                        g.utilization_percent
                            .map_or("?".into(), |u| format!("{u}%")),
                    );
                }
            }
            ExitCode::SUCCESS
        }
        None => daemon(args),
    }
}

fn daemon(args: Args) -> ExitCode {
    init_logging(args.verbose);
    // Found now: a package upgrade replaces the file, and a restart in place must start the
    // new one from the same path (`/proc/self/exe` then names the deleted old file).
    let exe = jobd::daemon::started_as();
    let config = match load_config(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("jobd: {e}");
            return ExitCode::from(1);
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("jobd: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let running = config.clone();
    let exe_for_check = exe.clone();
    // A stop asked for during a restart in place: given to the next image, which stops as
    // asked (jobs checkpoint), rather than cutting the restart short with jobs unwatched.
    let stop_after_restart = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop_later = stop_after_restart.clone();
    let result = rt.block_on(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let stop = StopRequest::new();
        let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
            signal(SignalKind::hangup()),
        ) else {
            anyhow::bail!("cannot handle signals");
        };
        // After tokio's handlers, so that a stop signal is never only counted.
        jobd::proc::count_stop_signals();
        // A restart in place blocks these across `exec` so that none ends the new image
        // before it handles them; they are handled from here on.
        let _ = nix::sys::signal::pthread_sigmask(
            nix::sys::signal::SigmaskHow::SIG_UNBLOCK,
            Some(&stop_signals()),
            None,
        );
        let signals = stop.clone();
        tokio::spawn(async move {
            let mut stopping = false;
            let mut restarting = false;
            loop {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                    // A restart in place: the configuration file and the executable are read
                    // again, and running jobs keep running. Refused while the file has an
                    // error (jobd would not start again).
                    _ = hup.recv() => {
                        if stopping {
                            continue;
                        }
                        let checked = match load_config(&args) {
                            Ok(next) => restart_check(&running, &next, exe_for_check.as_deref()).await,
                            Err(e) => Err(format!("the configuration has an error: {e}")),
                        };
                        match checked {
                            Ok(()) => {
                                STOPS_AT_RESTART.store(
                                    jobd::proc::stop_signals(),
                                    std::sync::atomic::Ordering::SeqCst,
                                );
                                tracing::info!("SIGHUP: restarting in place with the configuration file and executable as they are now; running jobs keep running");
                                stopping = true;
                                restarting = true;
                                signals.restart();
                            }
                            Err(why) => tracing::error!("SIGHUP: not restarting (jobd goes on as it was): {why}"),
                        }
                        continue;
                    }
                }
                if restarting {
                    if !stop_later.swap(true, std::sync::atomic::Ordering::SeqCst) {
                        tracing::info!("stop signal during the restart in place: the restarted daemon stops as asked (jobs checkpoint)");
                    }
                    continue;
                }
                if stopping {
                    tracing::warn!("second stop signal: exiting now; workers still running are taken over or stopped by recovery at the next start");
                    std::process::exit(1);
                }
                stopping = true;
                tracing::info!("signal received; shutting down (a second one exits at once)");
                signals.stop();
            }
        });
        jobd::daemon::run(config, stop).await
    });
    match result {
        Ok(Ended::Stopped) => ExitCode::SUCCESS,
        Ok(Ended::Restart { listen_fds }) => {
            // Nothing of this image may run on: its tasks and threads end here.
            rt.shutdown_timeout(std::time::Duration::from_secs(2));
            let Some(exe) = exe else {
                eprintln!("jobd: cannot restart: the jobd executable's path is unknown");
                return ExitCode::from(1);
            };
            let _ = nix::sys::signal::pthread_sigmask(
                nix::sys::signal::SigmaskHow::SIG_BLOCK,
                Some(&stop_signals()),
                None,
            );
            // A stop signal that came after the restart began, seen by the signal task or not
            // (it may have come after the task ended with this image's runtime).
            let late_stop = jobd::proc::stop_signals()
                > STOPS_AT_RESTART.load(std::sync::atomic::Ordering::SeqCst);
            if stop_after_restart.load(std::sync::atomic::Ordering::SeqCst) || late_stop {
                // Pending (blocked) across `exec`: the next image takes it when it unblocks.
                // Sent to this thread, the one that execs, whose pending signals survive it.
                let _ = nix::sys::pthread::pthread_kill(
                    nix::sys::pthread::pthread_self(),
                    nix::sys::signal::Signal::SIGTERM,
                );
            }
            // execve itself, not `Command::exec`: the signal mask and the pending signal above
            // must reach the next image as they are.
            let err = exec_again(&exe, &listen_fds);
            // Still this image: exit with an error (systemd starts jobd again, and its
            // recovery takes the running jobs over).
            eprintln!("jobd: cannot restart {}: {err}", exe.display());
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("jobd: {}", jobd::cli::error_chain(&e));
            ExitCode::from(1)
        }
    }
}

/// [`jobd::proc::stop_signals`] when a restart in place began.
static STOPS_AT_RESTART: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// Replaces this process's image with `exe`, given this process's arguments and environment
/// plus the listening sockets to take over ([`jobd::daemon::ENV_LISTEN_FDS`]); returns only
/// on failure.
fn exec_again(exe: &std::path::Path, listen_fds: &str) -> std::io::Error {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let c = |b: &[u8]| CString::new(b).map_err(|_| std::io::Error::other("a NUL byte"));
    let run = || -> std::io::Result<std::convert::Infallible> {
        let path = c(exe.as_os_str().as_bytes())?;
        let argv = std::env::args_os()
            .map(|a| c(a.as_bytes()))
            .collect::<std::io::Result<Vec<_>>>()?;
        let mut env = std::env::vars_os()
            .filter(|(k, _)| k != jobd::daemon::ENV_LISTEN_FDS)
            .map(|(k, v)| c(&[k.as_bytes(), b"=", v.as_bytes()].concat()))
            .collect::<std::io::Result<Vec<_>>>()?;
        env.push(c(
            format!("{}={listen_fds}", jobd::daemon::ENV_LISTEN_FDS).as_bytes()
        )?);
        Ok(nix::unistd::execve(&path, &argv, &env)?)
    };
    match run() {
        Ok(never) => match never {},
        Err(e) => e,
    }
}

/// Whether a restart in place from `running` to `next` can work: the new image would start
/// and serve. Refused, with the reason: another state directory (the running jobs and the
/// queue are this one's), an executable that is gone or does not run, a new TCP address
/// that cannot be bound, a new socket path whose directory is missing or that another jobd
/// serves.
async fn restart_check(
    running: &Config,
    next: &Config,
    exe: Option<&std::path::Path>,
) -> Result<(), String> {
    if next.state_dir != running.state_dir {
        return Err(format!(
            "state_dir would change from {} to {}: a restart in place keeps its queue and \
             running jobs; stop jobd, move the state, and start it",
            running.state_dir.display(),
            next.state_dir.display()
        ));
    }
    let exe = exe.ok_or("the path of the jobd executable is unknown")?;
    let version = tokio::time::timeout(
        std::time::Duration::from_secs(20),
        tokio::process::Command::new(exe)
            .arg("--version")
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await;
    match version {
        Ok(Ok(out)) if out.status.success() => {}
        Ok(Ok(out)) => {
            return Err(format!(
                "{} --version failed ({}): {}",
                exe.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(Err(e)) => return Err(format!("cannot run {}: {e}", exe.display())),
        Err(_) => return Err(format!("{} --version did not answer", exe.display())),
    }
    // A port this daemon holds itself (another address, same port) is free for the next
    // image: the old listener closes before it binds.
    if let Some(addr) = next.listen
        && next.listen != running.listen
        && addr.port() != 0
        && running.listen.is_none_or(|r| r.port() != addr.port())
    {
        std::net::TcpListener::bind(addr).map_err(|e| format!("cannot listen on {addr}: {e}"))?;
    }
    if next.socket != running.socket {
        let dir = next.socket.parent().unwrap_or(std::path::Path::new("/"));
        if !dir.is_dir() {
            return Err(format!(
                "the directory of the new socket {} does not exist",
                next.socket.display()
            ));
        }
        if std::os::unix::net::UnixStream::connect(&next.socket).is_ok() {
            return Err(format!(
                "another jobd is listening on {}",
                next.socket.display()
            ));
        }
    }
    Ok(())
}

/// The daemon's configuration: the file, then the flags.
fn load_config(args: &Args) -> Result<Config, jobd::config::ConfigError> {
    let flags = Overrides {
        state_dir: args.state_dir.clone(),
        socket: args.socket.clone(),
        listen: args.listen.clone(),
        gpus: args.gpus.clone(),
        grace_period: args.grace_period,
        ollama_models: args.ollama_models.clone(),
        max_cpu_jobs: args.max_cpu_jobs,
    };
    Config::load(args.config.as_deref(), flags)
}

/// The signals that stop (or restart) the daemon.
fn stop_signals() -> nix::sys::signal::SigSet {
    use nix::sys::signal::{SigSet, Signal};
    let mut set = SigSet::empty();
    for sig in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        set.add(sig);
    }
    set
}
