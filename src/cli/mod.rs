//! L4: `jobctl` — one file per subcommand. Results go to stdout (a table, or JSON with
//! `--json`); diagnostics to stderr. Exit codes: 0 ok, 1 error (or a job that did not
//! succeed, for `wait`/`submit --follow`), 2 usage error (clap's), [`EXIT_UNREACHABLE`] daemon
//! unreachable, so that a script can tell "retry later" from "fix the command". A reader that stops reading
//! early (`jobctl list | head -3`) ends jobctl quietly with 0, as it would a C tool, rather
//! than with a panic: output goes through [`outln!`]/[`out!`] and [`write_stdout`].

/// `println!` for the command's output, through [`write_stdout`].
macro_rules! outln {
    () => {
        $crate::cli::write_stdout(format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::cli::write_stdout(format_args!("{}\n", format_args!($($arg)*)))
    };
}

/// `print!` for the command's output, through [`write_stdout`].
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::cli::write_stdout(format_args!($($arg)*))
    };
}

mod estimate;
mod jobs;
mod list;
mod logs;
mod models;
mod schedules;
mod show;
mod submit;
mod sweep;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};

use crate::client::{Client, ClientError, Endpoint};
use crate::spec::units::ByteSize;
use crate::spec::{JobId, Millis};

/// The exit code when the daemon cannot be reached (2 is clap's, for a usage error).
pub const EXIT_UNREACHABLE: u8 = 3;

/// jobctl — submit and control jobs on a jobd GPU scheduler.
#[derive(Debug, Parser)]
#[command(
    name = "jobctl",
    version,
    about,
    long_about = None,
    propagate_version = true,
    after_help = "Exit status: 0 ok; 1 an error, or (wait, submit --follow) a job that did not \
                  succeed; 2 a usage error; 3 jobd could not be reached."
)]
pub struct Cli {
    /// Daemon address: a unix socket path or http://HOST:PORT [default: your own daemon's
    /// socket if it exists, else /run/jobd/jobd.sock]
    #[arg(long, global = true, env = "JOBD_URL", value_name = "URL")]
    pub url: Option<String>,
    /// Bearer token for a TCP address (not needed on the unix socket).
    #[arg(
        long,
        global = true,
        env = "JOBD_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    pub token: Option<String>,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Queue a job file (`kind = "command"` or `"train"`).
    Submit(submit::SubmitArgs),
    /// Check a job file without submitting it: syntax, fields, values and the paths it names,
    /// here, without the daemon. Whether it fits the daemon's GPUs and its dependencies exist
    /// is checked when it is submitted.
    Validate(submit::ValidateArgs),
    /// List jobs (queued and active; --all for finished too).
    #[command(alias = "ls")]
    List(list::ListArgs),
    /// Show one job: spec, placement, history.
    Show(show::ShowArgs),
    /// Print a job's output; -f follows it until the job ends.
    Logs(logs::LogsArgs),
    /// Cancel jobs: queued ones at once, running ones get SIGTERM, then SIGKILL after the grace period.
    Cancel(jobs::CancelArgs),
    /// Wait until jobs end; exits 0 only if all succeeded.
    Wait(jobs::IdsArgs),
    /// Say why a job waits (or why it is where it is).
    Explain(jobs::IdArgs),
    /// Change a job's priority.
    Priority(jobs::PriorityArgs),
    /// Put failed or cancelled jobs back in the queue.
    Requeue(jobs::IdsArgs),
    /// Submit a job's file again as a new job of its owner (any state, e.g. a succeeded one):
    /// the file as it was submitted; its owner may change it with `--set`.
    Resubmit(submit::ResubmitArgs),
    /// Keep queued jobs from starting until released.
    Hold(jobs::IdsArgs),
    /// Let held jobs start again (they queue from then on; an admin's hold on someone else's
    /// job only an admin releases).
    Release(jobs::IdsArgs),
    /// Remove finished jobs for good: record, history and job directory (logs, checkpoints,
    /// output). Published models stay in Ollama.
    Clean(jobs::CleanArgs),
    /// Show the GPUs and what is placed on them.
    Gpus,
    /// Estimate the VRAM a train job needs, and where it fits.
    Estimate(estimate::EstimateArgs),
    /// Publish a succeeded train job's model to Ollama (again).
    Publish(models::PublishArgs),
    /// Write a train job's model as a GGUF file (for llama.cpp, LM Studio, ...).
    Export(models::ExportArgs),
    /// List the models in the daemon's Ollama store, as `ollama list` would.
    Models {
        /// List this Ollama models directory instead (one a job's `[publish] models_dir` or
        /// `jobctl publish --models-dir` named), read by jobctl itself.
        #[arg(long, value_name = "DIR")]
        models_dir: Option<std::path::PathBuf>,
    },
    /// List recurring schedules with their next run.
    Schedules,
    /// Pause, resume, delete or run a schedule now.
    Schedule(schedules::ScheduleArgs),
    /// Compare a sweep's jobs (`submit --sweep`): their values, states and losses, the best
    /// marked.
    Sweep(sweep::SweepArgs),
    /// Print the jobctl man page (roff), e.g. `jobctl man > jobctl.1`.
    Man,
    /// Show who the daemon thinks you are.
    Whoami,
    /// Print shell completions (bash, zsh, fish, elvish, powershell).
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

/// Writes the command's output to stdout. When the reader has gone away (a closed pipe),
/// jobctl ends at once with 0: nobody is left to read the rest. Any other failure to write
/// ends it with a message and 1.
pub fn write_stdout(args: std::fmt::Arguments) {
    use std::io::Write;
    if let Err(e) = std::io::stdout().lock().write_fmt(args) {
        stdout_failed(&e)
    }
}

/// Ends jobctl after a failed write to stdout (see [`write_stdout`]).
fn stdout_failed(e: &std::io::Error) -> ! {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        std::process::exit(0)
    }
    eprintln!("jobctl: cannot write the output: {e}");
    std::process::exit(1)
}

/// Whether `e` comes from writing to a reader that went away.
fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// The `{"code", "message", "problems"}` object `--json` gives for a failure: jobd's own, or
/// one made here (an invalid job file, no daemon).
pub fn error_object(e: &anyhow::Error) -> serde_json::Value {
    if let Some(submit::InvalidJobFile(source)) = e.downcast_ref::<submit::InvalidJobFile>() {
        return serde_json::json!({
            "code": "invalid_job",
            "message": source.to_string(),
            "problems": source.problems,
        });
    }
    match e.downcast_ref::<ClientError>() {
        Some(ClientError::Api {
            code,
            message,
            problems,
            ..
        }) => serde_json::json!({"code": code, "message": message, "problems": problems}),
        other => serde_json::json!({
            "code": if other.is_some_and(ClientError::is_unreachable) { "unreachable" } else { "error" },
            "message": error_chain(e),
            "problems": [],
        }),
    }
}

/// Runs `jobctl` and returns its exit code.
pub async fn run(cli: Cli) -> ExitCode {
    let json = cli.json;
    match dispatch(cli).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        // Streamed output (logs, the man page) whose reader stopped early.
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            let unreachable = e
                .downcast_ref::<ClientError>()
                .is_some_and(ClientError::is_unreachable);
            // With --json, every failure also leaves one error object on stdout: jobd's own,
            // or one made here (an invalid job file, no daemon).
            if json {
                outln!("{}", serde_json::json!({ "error": error_object(&e) }));
            }
            eprintln!("jobctl: {}", error_chain(&e));
            ExitCode::from(if unreachable { EXIT_UNREACHABLE } else { 1 })
        }
    }
}

async fn dispatch(cli: Cli) -> anyhow::Result<bool> {
    let out = Output { json: cli.json };
    // Both are rendered in memory first: clap_complete panics on a failed write.
    if let Command::Completions { shell } = cli.command {
        let mut script = Vec::new();
        clap_complete::generate(shell, &mut Cli::command(), "jobctl", &mut script);
        out!("{}", String::from_utf8_lossy(&script));
        return Ok(true);
    }
    if let Command::Man = cli.command {
        out!("{}", man_page()?);
        return Ok(true);
    }
    if let Command::Validate(args) = &cli.command {
        return submit::validate(args, &out);
    }
    let client = connect(cli.url.as_deref(), cli.token.clone())?;
    match cli.command {
        Command::Submit(args) => submit::submit(&client, &args, &out).await,
        Command::List(args) => list::list(&client, &args, &out).await,
        Command::Show(args) => show::show(&client, &args, &out).await,
        Command::Logs(args) => {
            // Followers wait for a daemon that went away meanwhile; one that was never there
            // is said at once (exit 3), not after the reconnect window.
            if args.follow {
                client.get::<serde_json::Value>("/health").await?;
            }
            logs::logs(&client, &args, &out).await
        }
        Command::Cancel(args) => jobs::cancel(&client, &args, &out).await,
        Command::Wait(args) => {
            client.get::<serde_json::Value>("/health").await?;
            jobs::wait(&client, &args.ids, &out).await
        }
        Command::Explain(args) => jobs::explain(&client, args.id, &out).await,
        Command::Priority(args) => jobs::priority(&client, &args, &out).await,
        Command::Requeue(args) => jobs::requeue(&client, &args, &out).await,
        Command::Resubmit(args) => submit::resubmit(&client, &args, &out).await,
        Command::Hold(args) => jobs::hold(&client, &args, true, &out).await,
        Command::Release(args) => jobs::hold(&client, &args, false, &out).await,
        Command::Clean(args) => jobs::clean(&client, &args, &out).await,
        Command::Gpus => jobs::gpus(&client, &out).await,
        Command::Estimate(args) => estimate::estimate(&client, &args, &out).await,
        Command::Publish(args) => models::publish(&client, &args, &out).await,
        Command::Export(args) => models::export(&client, &args, &out).await,
        Command::Models { models_dir } => models::models(&client, models_dir, &out).await,
        Command::Schedules => schedules::list(&client, &out).await,
        Command::Schedule(args) => schedules::action(&client, &args, &out).await,
        Command::Sweep(args) => sweep::show(&client, &args, &out).await,
        Command::Whoami => jobs::whoami(&client, &out).await,
        Command::Validate(_) | Command::Completions { .. } | Command::Man => {
            unreachable!("handled above")
        }
    }
}

/// The daemon address: `--url`/`JOBD_URL`, else the caller's own daemon's socket if it exists,
/// else the system daemon's.
pub fn connect(url: Option<&str>, token: Option<String>) -> anyhow::Result<Client> {
    let endpoint = match url {
        Some(u) => u.parse::<Endpoint>().map_err(anyhow::Error::msg)?,
        None => {
            let own = crate::config::default_socket(&crate::config::default_state_dir());
            let system = PathBuf::from("/run/jobd/jobd.sock");
            Endpoint::Unix(if own.exists() || !system.exists() {
                own
            } else {
                system
            })
        }
    };
    Ok(Client::new(endpoint, token))
}

/// How results are printed.
pub struct Output {
    pub json: bool,
}

impl Output {
    /// Prints `value` as pretty JSON.
    pub fn print_json<T: serde::Serialize>(&self, value: &T) -> anyhow::Result<()> {
        outln!("{}", serde_json::to_string_pretty(value)?);
        Ok(())
    }
}

/// A plain table: aligned columns, no borders (readable in a terminal and in `grep`).
pub fn table(header: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut t = comfy_table::Table::new();
    t.load_preset(comfy_table::presets::NOTHING)
        .set_content_arrangement(if std::io::stdout().is_terminal() {
            comfy_table::ContentArrangement::Dynamic
        } else {
            comfy_table::ContentArrangement::Disabled
        })
        .set_header(header.iter().map(comfy_table::Cell::new));
    for r in rows {
        t.add_row(r);
    }
    // Trim the padding comfy-table puts at line ends.
    t.to_string()
        .lines()
        .map(|l| l.trim_end().strip_prefix(' ').unwrap_or(l).to_string())
        .collect::<Vec<_>>()
        .join("\n")
}

/// "3s", "5m", "2h", "4d" since `t`.
pub fn age(now: Millis, t: Millis) -> String {
    let s = ((now - t).max(0) / 1000) as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m", s / 60),
        3600..86400 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86400),
    }
}

/// Local date and time of `t`, with the zone's offset (the daemon's schedules may be in
/// another zone than this terminal).
pub fn when(t: Millis) -> String {
    chrono::DateTime::from_timestamp_millis(t)
        .map(|d| {
            d.with_timezone(&chrono::Local)
                .format("%Y-%m-%d %H:%M:%S %:z")
                .to_string()
        })
        .unwrap_or_else(|| t.to_string())
}

/// Formats bytes for tables.
pub fn bytes(b: u64) -> String {
    ByteSize(b).to_string()
}

/// Parses job ids given on the command line.
pub fn parse_id(s: &str) -> Result<JobId, String> {
    if s.starts_with("schedule:") {
        return Err(format!(
            "{s:?} is a schedule, not a job: `jobctl schedules` lists schedules and the job \
             each last queued"
        ));
    }
    s.trim_start_matches('#')
        .parse::<JobId>()
        .ok()
        .filter(|i| *i > 0)
        .ok_or_else(|| format!("{s:?} is not a job id"))
}

/// A schedule id: `N`, or `schedule:N` as `jobctl submit` prints it.
pub fn parse_schedule_id(s: &str) -> Result<u64, String> {
    s.strip_prefix("schedule:")
        .unwrap_or(s)
        .parse::<u64>()
        .ok()
        .filter(|i| *i > 0)
        .ok_or_else(|| format!("{s:?} is not a schedule id"))
}

/// jobctl(1): one page with every command (clap_mangen's own page points at a page per
/// command, jobctl-submit(1) and so on, that nothing installs) and the exit status.
pub fn man_page() -> anyhow::Result<String> {
    fn roff(text: &str) -> String {
        text.lines()
            .map(|l| {
                let l = l.replace('\\', "\\e").replace('-', "\\-");
                if l.starts_with('.') || l.starts_with('\'') {
                    format!("\\&{l}")
                } else {
                    l
                }
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
    let mut cmd = Cli::command();
    cmd.build();
    let man = clap_mangen::Man::new(cmd.clone());
    let mut page = Vec::new();
    man.render_title(&mut page)?;
    man.render_name_section(&mut page)?;
    man.render_synopsis_section(&mut page)?;
    man.render_description_section(&mut page)?;
    man.render_options_section(&mut page)?;
    let mut text = String::from_utf8_lossy(&page).into_owned();
    text.push_str(".SH COMMANDS\n");
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        let usage = sub
            .clone()
            .bin_name(format!("jobctl {}", sub.get_name()))
            .render_usage()
            .to_string();
        let usage = usage.trim_start_matches("Usage:").trim();
        text.push_str(&format!(".TP\n\\fB{}\\fR\n", roff(usage)));
        if let Some(about) = sub.get_long_about().or_else(|| sub.get_about()) {
            text.push_str(&roff(&about.to_string()));
            text.push('\n');
        }
    }
    text.push_str(
        ".PP\nEach command's options: \\fBjobctl\\fR \\fIcommand\\fR \\fB\\-\\-help\\fR.\n\
         .SH \"EXIT STATUS\"\n\
         .TP\n0\nSuccess.\n\
         .TP\n1\nAn error, or a job that did not succeed (\\fBwait\\fR, \\fBsubmit \\-\\-follow\\fR).\n\
         .TP\n2\nThe daemon cannot be reached (for \\fBlogs \\-f\\fR, \\fBwait\\fR and \\fBsubmit \\-\\-follow\\fR: not \
         within 2 minutes), or a usage error.\n\
         .SH ENVIRONMENT\n\
         .TP\nJOBD_URL\nThe daemon: a unix socket path or http://HOST:PORT.\n\
         .TP\nJOBD_TOKEN\nA bearer token for a TCP address.\n",
    );
    let mut version = Vec::new();
    man.render_version_section(&mut version)?;
    text.push_str(&String::from_utf8_lossy(&version));
    Ok(text)
}

/// An error and its causes, joined by ": " like `{:#}`, leaving out a cause whose text the
/// message before it already includes (many errors quote their source: "cannot read X: No
/// such file or directory" would otherwise end in the OS error twice).
pub fn error_chain(e: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in e.chain() {
        let part = cause.to_string();
        if text.is_empty() {
            text = part;
        } else if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
    }
    text
}

/// `s` with control characters shown escaped (`\u{1b}`), for text from job files and logs
/// printed to a terminal: an argv holding escape sequences must not clear or recolour the
/// screen of whoever runs `jobctl show`.
pub fn printable(s: &str) -> std::borrow::Cow<'_, str> {
    if s.chars().any(char::is_control) {
        s.chars()
            .map(|c| {
                if c.is_control() {
                    c.escape_default().to_string()
                } else {
                    c.to_string()
                }
            })
            .collect::<String>()
            .into()
    } else {
        s.into()
    }
}

/// Parses a priority argument, refusing words and out-of-range numbers with the range in the
/// message (clap's own `i32` parser only says "invalid digit found in string").
pub fn parse_priority(s: &str) -> Result<i32, String> {
    use crate::spec::job::{MAX_PRIORITY, priority_in_range};
    s.parse::<i32>()
        .ok()
        .filter(|p| priority_in_range(*p))
        .ok_or_else(|| {
            format!(
                "{s:?} is not a priority: give an integer from -{MAX_PRIORITY} to {MAX_PRIORITY} \
                 (higher runs first, 0 is the default)"
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_man_page_lists_every_command_and_the_exit_status() {
        let page = man_page().unwrap();
        assert!(
            !page.contains("jobctl-submit(1)"),
            "no pages that do not exist"
        );
        for sub in Cli::command()
            .get_subcommands()
            .filter(|s| !s.is_hide_set())
        {
            let name = sub.get_name().replace('-', "\\-");
            assert!(
                page.contains(&format!("\\fBjobctl {name}")),
                "{name}:\n{page}"
            );
        }
        assert!(page.contains(".SH \"EXIT STATUS\""));
        assert!(page.contains(".SH OPTIONS"));
    }

    #[test]
    fn error_chains_do_not_repeat_a_quoted_cause() {
        let os = std::io::Error::from_raw_os_error(2);
        let quoted = anyhow::Error::new(crate::publish::PublishError::Io {
            action: "read",
            path: "/x/config.json".into(),
            source: os,
        });
        let text = error_chain(&quoted);
        assert_eq!(text.matches("os error 2").count(), 1, "{text}");
        let wrapped = anyhow::anyhow!("inner cause").context("outer");
        assert_eq!(error_chain(&wrapped), "outer: inner cause");
    }

    #[test]
    fn control_characters_are_shown_escaped() {
        assert_eq!(printable("plain text, ünïcode"), "plain text, ünïcode");
        assert_eq!(
            printable("echo \u{1b}[2J\u{1b}[31mHACKED\r\n"),
            "echo \\u{1b}[2J\\u{1b}[31mHACKED\\r\\n"
        );
    }

    #[test]
    fn priority_arguments_name_the_range() {
        assert_eq!(parse_priority("-1000"), Ok(-1000));
        assert_eq!(parse_priority("7"), Ok(7));
        for bad in ["high", "1001", "-2147483648", "1.5", ""] {
            let e = parse_priority(bad).unwrap_err();
            assert!(e.contains("from -1000 to 1000"), "{bad}: {e}");
        }
        let e = Cli::try_parse_from(["jobctl", "priority", "3", "high"]).unwrap_err();
        assert!(e.to_string().contains("\"high\" is not a priority"), "{e}");
        let ok = Cli::try_parse_from(["jobctl", "priority", "3", "-5"]).unwrap();
        assert!(matches!(ok.command, Command::Priority(ref a) if a.priority == -5 && a.id == 3));
    }
}
