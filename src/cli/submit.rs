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

/// The job file's text with `overrides` applied (the text as written when there are none;
/// otherwise re-written from the parsed document, so its comments are not kept).
fn apply_overrides(text: &str, origin: &str, overrides: &Overrides) -> anyhow::Result<String> {
    if overrides.set.is_empty() {
        return Ok(text.to_string());
    }
    let mut doc: toml::Table = text
        .parse()
        .map_err(|e| anyhow::anyhow!("invalid job file:\n{origin}: {e}"))?;
    for item in &overrides.set {
        let Some((path, raw)) = item.split_once('=') else {
            anyhow::bail!("--set {item:?}: write KEY=VALUE, e.g. training.learning_rate=3e-4");
        };
        let keys: Vec<&str> = path.trim().split('.').map(str::trim).collect();
        if keys.iter().any(|k| k.is_empty()) {
            anyhow::bail!("--set {item:?}: {path:?} is not a dotted key path");
        }
        let (last, parents) = keys.split_last().expect("at least one key");
        // A string where the file has one and for environment variables (`command.env.LR=3e-4`
        // is the text "3e-4"); otherwise a TOML value (3e-4, true, [1, 2], "x"), else the text
        // itself as a string.
        let was_string = parents
            .iter()
            .try_fold(&doc, |t, k| t.get(*k)?.as_table())
            .and_then(|t| t.get(*last))
            .is_some_and(toml::Value::is_str);
        let in_env = keys.len() == 3 && keys[0] == "command" && keys[1] == "env";
        let value = if was_string || in_env {
            let unquoted = format!("v = {raw}")
                .parse::<toml::Table>()
                .ok()
                .and_then(|mut t| t.remove("v"))
                .and_then(|v| v.as_str().map(str::to_string));
            toml::Value::String(unquoted.unwrap_or_else(|| raw.to_string()))
        } else {
            format!("v = {raw}")
                .parse::<toml::Table>()
                .ok()
                .and_then(|mut t| t.remove("v"))
                .unwrap_or_else(|| toml::Value::String(raw.to_string()))
        };
        let mut table = &mut doc;
        for (i, k) in parents.iter().enumerate() {
            let entry = table
                .entry(k.to_string())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            table = entry.as_table_mut().ok_or_else(|| {
                anyhow::anyhow!(
                    "--set {item:?}: {} is not a table in {origin}",
                    keys[..=i].join(".")
                )
            })?;
        }
        table.insert(last.to_string(), value);
    }
    Ok(toml::to_string(&doc)?)
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
    prepare(text, &origin, base_dir, source_path, overrides)
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
    let text = apply_overrides(&original, origin, overrides)?;
    let check =
        |text: &str| parse_and_resolve_with(origin, text, &base_dir, &crate::publish::base_issues);
    let spec = match check(&text) {
        Ok(spec) => spec,
        // The positions are in the rewritten document: the file's own problems are shown in
        // the file, and those the overrides brought without positions.
        Err(e) if !overrides.set.is_empty() => {
            return Err(match check(&original) {
                Err(in_file) => InvalidJobFile(in_file),
                Ok(_) => {
                    let mut e = e;
                    e.origin = format!("{origin} with --set");
                    for p in &mut e.problems {
                        (p.line, p.column) = (None, None);
                    }
                    InvalidJobFile(e)
                }
            }
            .into());
        }
        Err(e) => return Err(InvalidJobFile(e).into()),
    };
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
    let (req, spec) = load(&args.file, &args.overrides)?;
    send(client, req, &spec, args.follow, args.hold, out).await
}

/// `jobctl resubmit`: a job again, as a new job.
#[derive(Debug, Args)]
pub struct ResubmitArgs {
    /// The job to run again (any state; its job file as it was submitted, `--set` included).
    pub id: crate::spec::JobId,
    /// Stream the new job's output until it ends; exit 0 only if it succeeded.
    #[arg(short, long)]
    pub follow: bool,
    /// Queue it on hold: it starts only after `jobctl release`.
    #[arg(long, conflicts_with = "follow")]
    pub hold: bool,
    #[command(flatten)]
    pub overrides: Overrides,
}

/// Submits job `id`'s job file again, as it was submitted (with its relative paths against
/// the same directory), as a new job of the caller: pueue's `restart`, for any finished job
/// (a failed or cancelled one can also be requeued in place).
pub async fn resubmit(client: &Client, args: &ResubmitArgs, out: &Output) -> anyhow::Result<bool> {
    let id = args.id;
    let job: JobView = client.get(&format!("/jobs/{id}")).await?;
    if job.redacted {
        anyhow::bail!(
            "job {id}'s file is hidden from you (it sets environment variables or a \
             notifier): only {} or an admin can resubmit it",
            job.record.owner.user
        );
    }
    let r = &job.record;
    let base_dir = r
        .spec
        .base_dir
        .clone()
        .ok_or_else(|| anyhow::anyhow!("job {id} has no base directory recorded"))?;
    let text = without_schedule(r)?;
    let origin = format!(
        "job {id}'s file{}",
        r.source_path
            .as_ref()
            .map(|p| format!(" ({})", p.display()))
            .unwrap_or_default()
    );
    let (req, spec) = prepare(
        text,
        &origin,
        base_dir,
        r.source_path.clone(),
        &args.overrides,
    )?;
    send(client, req, &spec, args.follow, args.hold, out).await
}

/// The job file of `rec` to submit as one job: a job a schedule queued has its schedule's
/// file, whose `schedule` keys would create another schedule and whose `base = "@previous"`
/// meant the model this run started from.
fn without_schedule(rec: &crate::spec::JobRecord) -> anyhow::Result<String> {
    if rec.schedule_id.is_none() {
        return Ok(rec.source.clone());
    }
    let mut doc: toml::Table = rec
        .source
        .parse()
        .with_context(|| format!("job {}'s file does not parse", rec.id))?;
    for key in ["schedule", "overlap", "catch_up"] {
        doc.remove(key);
    }
    if let Some(model) = doc.get_mut("model").and_then(toml::Value::as_table_mut)
        && model
            .get("base")
            .and_then(toml::Value::as_str)
            .is_some_and(|b| crate::spec::train::is_previous(Path::new(b)))
    {
        model.remove("first_base");
        match rec.spec.model.as_ref().and_then(|m| m.base.as_ref()) {
            Some(base) => model.insert(
                "base".into(),
                toml::Value::String(base.display().to_string()),
            ),
            None => model.remove("base"),
        };
    }
    Ok(toml::to_string(&doc)?)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{JobRecord, Owner};

    /// A run a schedule queued is resubmitted as one job: no schedule keys, and the model it
    /// started from in place of `@previous`.
    #[test]
    fn a_scheduled_runs_file_loses_its_schedule_and_previous() {
        let source = "name = \"nightly\"\nkind = \"train\"\nschedule = \"0 3 * * *\"\n\
                      catch_up = false\noverlap = \"queue\"\n[model]\nbase = \"@previous\"\n\
                      first_base = \"models/base\"\n[data]\ntrain_file = \"d.jsonl\"\n";
        let mut spec = crate::spec::job::parse(
            "t.toml",
            "kind = \"command\"\n[command]\nargv = [\"true\"]\n",
        )
        .unwrap();
        spec.model = Some(crate::spec::train::ModelSpec {
            base: Some("/jobs/7/output".into()),
            ..Default::default()
        });
        let owner = Owner {
            user: "ann".into(),
            uid: 1000,
        };
        let mut rec = JobRecord::new_queued(owner, "nightly".into(), spec, source.into(), 0);
        assert_eq!(
            without_schedule(&rec).unwrap(),
            source,
            "not a schedule's run"
        );
        rec.schedule_id = Some(3);
        let doc: toml::Table = without_schedule(&rec).unwrap().parse().unwrap();
        for key in ["schedule", "catch_up", "overlap"] {
            assert!(!doc.contains_key(key), "{key}: {doc}");
        }
        assert_eq!(doc["name"].as_str(), Some("nightly"));
        let model = doc["model"].as_table().unwrap();
        assert_eq!(model["base"].as_str(), Some("/jobs/7/output"));
        assert!(!model.contains_key("first_base"), "{doc}");
        assert_eq!(doc["data"]["train_file"].as_str(), Some("d.jsonl"));
        // A fixed base stays as written.
        rec.source = source.replace("base = \"@previous\"", "base = \"models/b\"");
        let doc: toml::Table = without_schedule(&rec).unwrap().parse().unwrap();
        assert_eq!(doc["model"]["base"].as_str(), Some("models/b"));
        assert_eq!(doc["model"]["first_base"].as_str(), Some("models/base"));
    }
}
