//! `jobctl submit --sweep`, `jobctl validate --sweep` and `jobctl sweep ID`: one job file,
//! one job per combination of some keys' values, compared side by side.

use std::path::Path;

use clap::Args;

use super::submit::{JobFile, Overrides, check_variant};
use super::{Output, table};
use crate::client::Client;
use crate::spec::JobSpec;
use crate::spec::api::{SweepJobView, SweepRequest, SweepView, TrainResult};
use crate::spec::sweep::{self, Member, SweepAxis};

/// `--sweep` of `submit` and `validate`.
#[derive(Debug, Clone, Default, Args)]
pub struct SweepAxes {
    /// Queue a job per value instead of one job (with several --sweep, a job per combination):
    /// a dotted key as for --set, and TOML values separated by commas, or a TOML array for
    /// values holding commas; e.g. `--sweep training.learning_rate=1e-4,3e-4 --sweep
    /// lora.r=8,16` queues 4 jobs, all or none. Each job's name gets `-N` (and its Ollama
    /// model the tag `TAG-N`); compare them with `jobctl sweep ID`; repeatable.
    #[arg(
        long = "sweep",
        value_name = "KEY=V1,V2,...",
        conflicts_with = "follow"
    )]
    pub sweep: Vec<String>,
}

impl SweepAxes {
    pub fn is_empty(&self) -> bool {
        self.sweep.is_empty()
    }
}

/// The sweep a job file makes, checked here as the daemon will: the request to send, and its
/// jobs with the specs they describe.
pub fn load(
    file: &Path,
    overrides: &Overrides,
    axes: &[String],
) -> anyhow::Result<(SweepRequest, Vec<(Member, JobSpec)>)> {
    let f = JobFile::read(file)?;
    let parsed = axes
        .iter()
        .map(|a| SweepAxis::parse(a))
        .collect::<Result<Vec<_>, _>>()?;
    let text = crate::spec::job::apply_overrides(&f.text, &f.origin, &overrides.set)?;
    let set_keys: Vec<&str> = overrides
        .set
        .iter()
        .map(|s| s.split_once('=').map_or(s.as_str(), |(k, _)| k))
        .collect();
    let origin = if overrides.set.is_empty() {
        f.origin.clone()
    } else {
        format!("{} with --set", f.origin)
    };
    let members = sweep::members(&text, &origin, &f.stem(), &parsed, &set_keys)?;
    let mut checked = Vec::with_capacity(members.len());
    for m in members {
        let spec = check_variant(&f.text, &m.text, &m.origin, &f.origin, &f.base_dir)?;
        if spec.schedule.is_some() {
            anyhow::bail!("{}", sweep::NO_SCHEDULE);
        }
        checked.push((m, spec));
    }
    Ok((
        SweepRequest {
            job: crate::spec::api::SubmitRequest {
                toml: text,
                base_dir: Some(f.base_dir),
                source_path: f.source_path,
                hold: false,
            },
            sweep: parsed,
        },
        checked,
    ))
}

/// `jobctl validate --sweep`: every job of the sweep checked.
pub fn validate(
    file: &Path,
    overrides: &Overrides,
    axes: &[String],
    out: &Output,
) -> anyhow::Result<bool> {
    let (req, members) = load(file, overrides, axes)?;
    if out.json {
        let jobs: Vec<_> = members
            .iter()
            .map(|(m, spec)| serde_json::json!({"values": m.values, "spec": spec}))
            .collect();
        out.print_json(&serde_json::json!({"ok": true, "jobs": jobs}))?;
        return Ok(true);
    }
    let spec = &members[0].1;
    let lowest = members.iter().map(|(_, s)| s.priority).min().unwrap_or(0);
    let highest = members.iter().map(|(_, s)| s.priority).max().unwrap_or(0);
    let priority = if lowest == highest {
        format!("priority {lowest}")
    } else {
        format!("priorities {lowest} to {highest}")
    };
    outln!(
        "{}: ok — a sweep of {} {} jobs ({}), {priority}",
        file.display(),
        members.len(),
        spec.kind.as_str(),
        dimensions(&req.sweep),
    );
    for (i, (m, spec)) in members.iter().enumerate() {
        outln!(
            "  {}. {}: {}",
            i + 1,
            spec.name.as_deref().unwrap_or("?"),
            sweep::label(&m.values)
        );
    }
    Ok(true)
}

/// `training.learning_rate (3) × lora.r (2)`.
fn dimensions(axes: &[SweepAxis]) -> String {
    axes.iter()
        .map(|a| format!("{} ({})", a.key, a.values.len()))
        .collect::<Vec<_>>()
        .join(" × ")
}

/// `jobctl submit --sweep`: queues the sweep's jobs, all or none, and prints their ids, one per
/// line (`jobctl wait $(jobctl submit job.toml --sweep ...)` waits for all of them).
pub async fn submit(
    client: &Client,
    file: &Path,
    overrides: &Overrides,
    axes: &SweepAxes,
    hold: bool,
    out: &Output,
) -> anyhow::Result<bool> {
    let (mut req, _) = load(file, overrides, &axes.sweep)?;
    req.job.hold = hold;
    let dims = dimensions(&req.sweep);
    let view: SweepView = client.post("/sweeps", &req).await?;
    if out.json {
        out.print_json(&view)?;
        return Ok(true);
    }
    let (first, last) = (
        view.jobs.first().map_or(0, |j| j.id),
        view.jobs.last().map_or(0, |j| j.id),
    );
    eprintln!(
        "submitted sweep {}: {} jobs, {first} to {last}, over {dims}{}",
        view.id,
        view.jobs.len(),
        if hold { ", on hold" } else { "" }
    );
    // A long sweep's list would scroll the summary away: its head, then how many more.
    const LISTED: usize = 20;
    for j in view.jobs.iter().take(LISTED) {
        eprintln!("  {}  {}  {}", j.id, j.name, j.sweep.label());
    }
    if view.jobs.len() > LISTED {
        eprintln!("  … and {} more", view.jobs.len() - LISTED);
    }
    eprintln!("compare them with `jobctl sweep {}`", view.id);
    for j in &view.jobs {
        outln!("{}", j.id);
    }
    Ok(true)
}

#[derive(Debug, Args)]
pub struct SweepArgs {
    /// The sweep's id (its first job's; any of its jobs' ids finds it).
    pub id: crate::spec::JobId,
    /// Print only its jobs' ids, one per line (for `jobctl wait $(jobctl sweep ID --ids)`).
    #[arg(long)]
    pub ids: bool,
    /// With --ids: only the jobs that have not ended (for `jobctl cancel $(jobctl sweep ID
    /// --ids --active)`).
    #[arg(long, requires = "ids")]
    pub active: bool,
}

/// `jobctl sweep ID`: the sweep's jobs side by side — their values, state, and what the train
/// jobs reached — with the best one (lowest evaluation loss, else training loss) marked.
pub async fn show(client: &Client, args: &SweepArgs, out: &Output) -> anyhow::Result<bool> {
    let view: SweepView = client.get(&format!("/sweeps/{}", args.id)).await?;
    if args.ids {
        for j in view
            .jobs
            .iter()
            .filter(|j| !args.active || !j.state.is_terminal())
        {
            outln!("{}", j.id);
        }
        return Ok(true);
    }
    if out.json {
        out.print_json(&view)?;
        return Ok(true);
    }
    let best = best(&view.jobs);
    let any_result = view.jobs.iter().any(|j| j.result.is_some());
    let any_eval = view.jobs.iter().any(|j| {
        j.result
            .as_ref()
            .is_some_and(|r| r.best_eval_loss.is_some())
    });
    let mut header: Vec<&str> = vec!["ID", "NAME", "STATE"];
    header.extend(view.keys.iter().map(String::as_str));
    if any_result {
        header.extend(["STEP", "LOSS"]);
    }
    if any_eval {
        header.extend(["EVAL LOSS", "BEST EVAL"]);
    }
    let rows = view
        .jobs
        .iter()
        .map(|j| {
            let mark = if Some(j.id) == best { "*" } else { "" };
            let mut row = vec![format!("{}{mark}", j.id), j.name.clone(), state_of(j)];
            row.extend(view.keys.iter().map(|k| {
                j.sweep
                    .values
                    .iter()
                    .find(|v| &v.key == k)
                    .map_or("-".into(), |v| v.value.clone())
            }));
            let r = j.result.as_ref();
            if any_result {
                row.push(r.map_or("-".into(), |r| step_of(j, r)));
                row.push(r.map_or("-".into(), |r| format!("{:.4}", r.loss)));
            }
            if any_eval {
                row.push(
                    r.and_then(|r| r.eval_loss)
                        .map_or("-".into(), |l| format!("{l:.4}")),
                );
                row.push(
                    r.and_then(|r| {
                        Some(format!("{:.4} @{}", r.best_eval_loss?, r.best_eval_step?))
                    })
                    .unwrap_or_else(|| "-".into()),
                );
            }
            row
        })
        .collect();
    outln!("{}", table(&header, rows));
    if let Some(j) = view.jobs.iter().find(|j| Some(j.id) == best) {
        let r = j.result.as_ref().expect("the best has a result");
        let how = match (r.best_eval_loss, r.best_eval_step) {
            (Some(l), Some(s)) => format!("eval loss {l:.4} at step {s}"),
            _ => format!("loss {:.4} at step {}", r.loss, r.step),
        };
        let ended = view.jobs.iter().all(|j| j.state.is_terminal());
        eprintln!(
            "* best{}: job {} ({}), {how}",
            if ended { "" } else { " so far" },
            j.id,
            j.sweep.label()
        );
        // Its model is under the sweep's tag (`TAG-N`): offer the name the file gave, unless
        // the sweep chose the names itself.
        let named_by_sweep = view
            .keys
            .iter()
            .any(|k| sweep::keys_overlap(k, "publish.ollama_name"));
        if j.state == crate::spec::JobState::Succeeded
            && !named_by_sweep
            && let Some(model) = &j.published
            && let Some(name) = model.strip_suffix(&format!("-{}", j.sweep.index))
        {
            eprintln!(
                "  publish it under the file's name with `jobctl publish {} --name {name}`",
                j.id
            );
        }
    }
    Ok(true)
}

/// The job with the lowest best evaluation loss, else (when none evaluated) the lowest
/// training loss among those that logged one; lower is better for both.
fn best(jobs: &[SweepJobView]) -> Option<crate::spec::JobId> {
    let pick = |score: &dyn Fn(&TrainResult) -> Option<f64>| {
        jobs.iter()
            .filter_map(|j| Some((j.id, score(j.result.as_ref()?)?)))
            .filter(|(_, l)| l.is_finite())
            .min_by(|a, b| a.1.total_cmp(&b.1))
            .map(|(id, _)| id)
    };
    pick(&|r| r.best_eval_loss).or_else(|| pick(&|r| Some(r.loss)))
}

/// `running`, `failed (exit code 1)`, `queued (held)`.
fn state_of(j: &SweepJobView) -> String {
    let state = j.state.to_string();
    match (&j.exit, j.state) {
        (_, crate::spec::JobState::Queued) if j.held_by.is_some() => format!("{state} (held)"),
        (Some(e), crate::spec::JobState::Failed) => format!("{state} ({e})"),
        _ => state,
    }
}

/// `40/100` while the planned steps are known, else the step.
fn step_of(j: &SweepJobView, r: &TrainResult) -> String {
    match &j.progress {
        Some(p) if p.total_steps > 0 => format!("{}/{}", r.step, p.total_steps),
        _ => r.step.to_string(),
    }
}
