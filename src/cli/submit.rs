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
    /// Stream the job's output until it ends; exit 0 only if it succeeded.
    #[arg(short, long)]
    pub follow: bool,
    /// Queue it on hold: it keeps its place in line but starts only after `jobctl release`.
    #[arg(long, conflicts_with = "follow")]
    pub hold: bool,
}

#[derive(Debug, Args)]
pub struct ValidateArgs {
    /// The job file (TOML); `-` reads it from standard input.
    pub file: PathBuf,
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
pub fn load(file: &Path) -> anyhow::Result<(SubmitRequest, crate::spec::JobSpec)> {
    use std::io::Read;
    let stdin = file == Path::new("-");
    let text = if stdin {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .context("cannot read the job file from standard input")?;
        text
    } else {
        std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?
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
    let spec = parse_and_resolve_with(&origin, &text, &base_dir, &crate::publish::base_issues)
        .map_err(InvalidJobFile)?;
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

pub fn validate(args: &ValidateArgs, out: &Output) -> anyhow::Result<bool> {
    let (_, spec) = load(&args.file)?;
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
        outln!(
            "{}: ok — {} job, {gpus}, priority {}{recurring}",
            args.file.display(),
            spec.kind.as_str(),
            spec.priority
        );
    }
    Ok(true)
}

pub async fn submit(client: &Client, args: &SubmitArgs, out: &Output) -> anyhow::Result<bool> {
    let (mut req, spec) = load(&args.file)?;
    req.hold = args.hold;
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
        if args.follow {
            eprintln!(
                "(--follow does not apply to a schedule; follow its jobs with jobctl logs -f)"
            );
        }
        if args.hold {
            eprintln!(
                "(--hold does not apply to a schedule; `jobctl schedule pause` stops its firings)"
            );
        }
        return Ok(true);
    }
    let job: JobView = client.post("/jobs", &req).await?;
    let id = job.record.id;
    if out.json && !args.follow {
        out.print_json(&job)?;
        return Ok(true);
    }
    eprintln!("submitted job {id} ({})", job.record.name);
    if !out.json && !args.follow {
        outln!("{id}");
    }
    if !args.follow {
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
