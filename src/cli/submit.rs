//! `jobctl submit` and `jobctl validate`.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;

use super::Output;
use crate::client::Client;
use crate::spec::api::{JobView, SubmitRequest};
use crate::spec::job::parse_and_resolve_with;

#[derive(Debug, Args)]
pub struct SubmitArgs {
    /// The job file (TOML); `-` reads it from standard input (relative paths in it are then
    /// relative to the current directory).
    pub file: PathBuf,
    #[command(flatten)]
    pub how: HowToQueue,
    #[command(flatten)]
    pub sweep: super::sweep::SweepAxes,
}

/// How `submit` and `resubmit` queue a job.
#[derive(Debug, Args)]
pub struct HowToQueue {
    /// Stream the job's output until it ends; exit 0 only if it succeeded.
    #[arg(short, long)]
    pub follow: bool,
    /// Queue it on hold: it starts only after `jobctl release`.
    #[arg(long, conflicts_with = "follow")]
    pub hold: bool,
    #[command(flatten)]
    pub overrides: Overrides,
}

#[derive(Debug, Args)]
pub struct ValidateArgs {
    /// The job file (TOML); `-` reads it from standard input.
    pub file: PathBuf,
    #[command(flatten)]
    pub overrides: Overrides,
    /// Check every job of a sweep, as `submit --sweep` would queue them; repeatable.
    #[arg(long = "sweep", value_name = "KEY=V1,V2,...")]
    pub sweep: Vec<String>,
}

/// Changes to a job file given on the command line, for sweeps: one file, many variants.
#[derive(Debug, Clone, Default, Args)]
pub struct Overrides {
    /// Set a key of the job file, as a dotted path and a TOML value (a bare word is a string;
    /// a key the file has as a string, and `command.env.*`, stay strings), e.g. `--set
    /// training.learning_rate=3e-4 --set name=lr-3e-4`; repeatable.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
}

/// A job file that did not pass the checks: `--json` gives its problems one by one, as the
/// daemon's `invalid_job` error does.
#[derive(Debug, thiserror::Error)]
#[error("invalid job file:\n{0}")]
pub struct InvalidJobFile(pub crate::spec::toml_source::SourceError);

/// Reads a job file (`-`: standard input) and checks it here, as the daemon will; returns the
/// request to send. Relative paths in it are relative to the file's directory, or, for a job
/// file that is no file on disk (`-`, a pipe such as `<(envsubst < tmpl.toml)`), to the
/// current directory, as for a command typed here.
pub fn load(
    file: &Path,
    overrides: &Overrides,
) -> anyhow::Result<(SubmitRequest, crate::spec::JobSpec)> {
    let f = JobFile::read(file)?;
    prepare(f.text, &f.origin, f.base_dir, f.source_path, overrides)
}

/// A job file as read, before any check.
pub(super) struct JobFile {
    pub text: String,
    /// How messages name it: its path as given, or `(stdin)`.
    pub origin: String,
    /// What its relative paths resolve against.
    pub base_dir: PathBuf,
    /// Its absolute path, when it is a file on disk.
    pub source_path: Option<PathBuf>,
}

impl JobFile {
    /// Reads a job file (`-`: standard input).
    pub fn read(file: &Path) -> anyhow::Result<JobFile> {
        use std::io::Read;
        let stdin = file == Path::new("-");
        let text = if stdin {
            let mut text = String::new();
            std::io::stdin()
                .read_to_string(&mut text)
                .context("cannot read the job file from standard input")?;
            text
        } else {
            std::fs::read_to_string(file)
                .with_context(|| format!("cannot read {}", file.display()))?
        };
        let on_disk = !stdin && std::fs::metadata(file).is_ok_and(|m| m.is_file());
        let (base_dir, source_path) = if on_disk {
            let abs = std::path::absolute(file)
                .with_context(|| format!("cannot resolve {}", file.display()))?;
            let dir = abs
                .parent()
                .map(Path::to_path_buf)
                .unwrap_or_else(|| PathBuf::from("/"));
            (dir, Some(abs))
        } else {
            let here = std::env::current_dir()
                .context("cannot find the current directory (relative paths need it)")?;
            (here, None)
        };
        let origin = if stdin {
            "(stdin)".to_string()
        } else {
            file.display().to_string()
        };
        Ok(JobFile {
            text,
            origin,
            base_dir,
            source_path,
        })
    }

    /// The name a job file without `name` gets: the file's stem (as the daemon gives it).
    pub fn stem(&self) -> String {
        self.source_path
            .as_deref()
            .and_then(Path::file_stem)
            .map_or_else(|| "job".into(), |n| n.to_string_lossy().into_owned())
    }
}

/// A job file's text checked here as the daemon will (with `overrides` applied, relative
/// paths against `base_dir`): the request to send, and the job it describes.
fn prepare(
    original: String,
    origin: &str,
    base_dir: PathBuf,
    source_path: Option<PathBuf>,
    overrides: &Overrides,
) -> anyhow::Result<(SubmitRequest, crate::spec::JobSpec)> {
    let text = crate::spec::job::apply_overrides(&original, origin, &overrides.set)?;
    let spec = check_variant(
        &original,
        &text,
        &format!("{origin} with --set"),
        origin,
        &base_dir,
    )?;
    Ok((
        SubmitRequest {
            toml: text,
            base_dir: Some(base_dir),
            source_path,
            hold: false,
        },
        spec,
    ))
}

/// Checks `variant`, the job file `original` with changes made: the file's own problems are
/// shown in the file (with their positions), and those the changes brought as `variant_origin`'s,
/// without positions (they are in a rewritten document).
pub(super) fn check_variant(
    original: &str,
    variant: &str,
    variant_origin: &str,
    origin: &str,
    base_dir: &Path,
) -> anyhow::Result<crate::spec::JobSpec> {
    let more = |s: &crate::spec::JobSpec| {
        [crate::publish::base_issues(s), crate::chat::job_issues(s)].concat()
    };
    let check = |text: &str| parse_and_resolve_with(origin, text, base_dir, &more);
    match check(variant) {
        Ok(spec) => Ok(spec),
        Err(e) if variant != original => Err(match check(original) {
            Err(in_file) => InvalidJobFile(in_file),
            Ok(_) => {
                let mut e = e;
                e.origin = variant_origin.to_string();
                for p in &mut e.problems {
                    (p.line, p.column) = (None, None);
                }
                InvalidJobFile(e)
            }
        }
        .into()),
        Err(e) => Err(InvalidJobFile(e).into()),
    }
}

pub fn validate(args: &ValidateArgs, out: &Output) -> anyhow::Result<bool> {
    if !args.sweep.is_empty() {
        return super::sweep::validate(&args.file, &args.overrides, &args.sweep, out);
    }
    let (_, spec) = load(&args.file, &args.overrides)?;
    if out.json {
        out.print_json(&serde_json::json!({"ok": true, "spec": spec}))?;
    } else {
        let r = &spec.resources;
        let gpus = if r.gpus == 0 {
            "CPU only".to_string()
        } else {
            let vram = match r.vram {
                crate::spec::job::VramRequest::Auto => "auto".to_string(),
                crate::spec::job::VramRequest::PerGpu(b) => b.to_string(),
            };
            format!(
                "{} GPU{} ({vram} VRAM each)",
                r.gpus,
                if r.gpus == 1 { "" } else { "s" }
            )
        };
        // A schedule makes submit create a schedule, not a job: say so, with its next firing
        // in UTC (the daemon's schedule_timezone may say local time instead).
        let recurring = spec
            .schedule
            .as_deref()
            .and_then(|expr| {
                let cron: crate::spec::schedule::Cron = expr.parse().ok()?;
                let next = cron.next_after(
                    crate::spec::now_ms(),
                    crate::spec::schedule::ScheduleTz::Utc,
                )?;
                Some(format!(
                    "; recurring \"{expr}\" (submit creates a schedule; next run {} if the \
                     daemon reads schedules in UTC)",
                    crate::spec::schedule::describe_time(
                        next,
                        crate::spec::schedule::ScheduleTz::Utc
                    )
                ))
            })
            .unwrap_or_default();
        let notify = spec
            .notify
            .as_ref()
            .map(|n| {
                let on: Vec<&str> = n.on.iter().map(|e| e.as_str()).collect();
                format!("; notifies when {}", on.join(", "))
            })
            .unwrap_or_default();
        outln!(
            "{}: ok — {} job, {gpus}, priority {}{notify}{recurring}",
            args.file.display(),
            spec.kind.as_str(),
            spec.priority
        );
    }
    Ok(true)
}

pub async fn submit(client: &Client, args: &SubmitArgs, out: &Output) -> anyhow::Result<bool> {
    if !args.sweep.is_empty() {
        let how = &args.how;
        return super::sweep::submit(
            client,
            &args.file,
            &how.overrides,
            &args.sweep,
            how.hold,
            out,
        )
        .await;
    }
    let (req, spec) = load(&args.file, &args.how.overrides)?;
    send(client, req, &spec, args.how.follow, args.how.hold, out).await
}

/// `jobctl resubmit`: a job again, as a new job of its owner (only the owner or an admin may).
#[derive(Debug, Args)]
pub struct ResubmitArgs {
    /// The job to run again (any state; its job file as it was submitted, `--set` included;
    /// the copy is its owner's, as a requeue would be).
    pub id: crate::spec::JobId,
    #[command(flatten)]
    pub how: HowToQueue,
}

/// Submits job `id`'s job file again, as it was submitted (with its relative paths against
/// the same directory), as a new job of its owner: pueue's `restart`, for any job (a failed
/// or cancelled one can also be requeued in place). The daemon does it (`POST
/// /jobs/{id}/resubmit`): the file and the directory are on its machine.
pub async fn resubmit(client: &Client, args: &ResubmitArgs, out: &Output) -> anyhow::Result<bool> {
    let req = crate::spec::api::ResubmitRequest {
        set: args.how.overrides.set.clone(),
        hold: args.how.hold,
    };
    let job: JobView = client
        .post(&format!("/jobs/{}/resubmit", args.id), &req)
        .await?;
    submitted(client, job, args.how.follow, out).await
}

/// Sends a checked job file: a job (followed if asked), or a schedule when it has one.
async fn send(
    client: &Client,
    mut req: SubmitRequest,
    spec: &crate::spec::JobSpec,
    follow: bool,
    hold: bool,
    out: &Output,
) -> anyhow::Result<bool> {
    req.hold = hold;
    if let Some(expr) = &spec.schedule {
        // A job file with a schedule creates a recurring schedule, not a job.
        let s: crate::spec::api::ScheduleView = client.post("/schedules", &req).await?;
        if out.json {
            out.print_json(&s)?;
        } else {
            let next = s
                .record
                .next_fire
                .map(super::when)
                .unwrap_or_else(|| "never".into());
            eprintln!(
                "created schedule {} ({}): \"{expr}\", next run {next}",
                s.record.id, s.record.name
            );
            // Not a bare number: `id=$(jobctl submit f.toml); jobctl wait $id` would wait for
            // an unrelated job with that number.
            outln!("schedule:{}", s.record.id);
        }
        if follow {
            eprintln!(
                "(--follow does not apply to a schedule; follow its jobs with jobctl logs -f)"
            );
        }
        if hold {
            eprintln!(
                "(--hold does not apply to a schedule; `jobctl schedule pause` stops its firings)"
            );
        }
        return Ok(true);
    }
    let job: JobView = client.post("/jobs", &req).await?;
    submitted(client, job, follow, out).await
}

/// Reports a job just submitted, and follows it if asked.
async fn submitted(
    client: &Client,
    job: JobView,
    follow: bool,
    out: &Output,
) -> anyhow::Result<bool> {
    let id = job.record.id;
    if out.json && !follow {
        out.print_json(&job)?;
        return Ok(true);
    }
    eprintln!("submitted job {id} ({})", job.record.name);
    if !out.json && !follow {
        outln!("{id}");
    }
    if !follow {
        return Ok(true);
    }
    if out.json {
        // stdout carries one JSON object (as without --follow): the job's output goes to
        // stderr, and the object is the job as it ended.
        super::logs::follow_both(client, id, true).await?;
        let (ok, mut views) = super::jobs::wait_for_end(client, &[id], false).await?;
        out.print_json(&views.remove(0))?;
        return Ok(ok);
    }
    super::logs::follow_both(client, id, false).await?;
    super::jobs::wait(client, &[id], out).await
}
