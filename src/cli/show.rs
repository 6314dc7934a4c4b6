//! `jobctl show`.

use clap::Args;

use super::{Output, bytes, when};
use crate::client::Client;
use crate::sched::Explanation;
use crate::spec::JobId;
use crate::spec::api::{EventsResponse, JobView};

#[derive(Debug, Args)]
pub struct ShowArgs {
    /// Job id.
    #[arg(value_parser = super::parse_id)]
    pub id: JobId,
}

pub async fn show(client: &Client, args: &ShowArgs, out: &Output) -> anyhow::Result<bool> {
    let id = args.id;
    let job: JobView = client.get(&format!("/jobs/{id}")).await?;
    let events: EventsResponse = client.get(&format!("/jobs/{id}/events")).await?;
    if out.json {
        out.print_json(&serde_json::json!({"job": job, "events": events.events}))?;
        return Ok(true);
    }
    let r = &job.record;
    let mut lines = vec![
        ("job", format!("{} ({})", r.id, r.name)),
        ("state", r.state.to_string()),
        ("owner", format!("{} (uid {})", r.owner.user, r.owner.uid)),
        ("kind", r.kind.as_str().to_string()),
        ("priority", r.priority.to_string()),
        ("submitted", when(r.submitted_at)),
    ];
    if let Some(p) = &r.source_path {
        lines.push(("job file", p.display().to_string()));
    }
    if let Some(sid) = r.schedule_id {
        lines.push(("schedule", format!("{sid} (jobctl schedules)")));
    }
    if let Some(cmd) = &r.spec.command {
        lines.push(("command", shell_words(&cmd.argv)));
        if let Some(w) = &cmd.workdir {
            lines.push(("workdir", w.display().to_string()));
        }
    }
    lines.push(("resources", super::list::gpus_column(&job)));
    if let Some(p) = &r.placement
        && r.state.holds_resources()
    {
        lines.push(("placement", crate::sched::describe_placement(p)));
    }
    if let Some(e) = r.vram_estimate {
        let measured = r.vram_peak.map_or("not measured yet".to_string(), bytes);
        lines.push((
            "vram",
            format!("estimate {} per GPU, measured peak {measured}", bytes(e)),
        ));
    }
    if let Some(p) = &job.progress {
        lines.push(("progress", format!("step {}/{}", p.step, p.total_steps)));
    }
    if let Some(t) = r.started_at {
        lines.push(("started", when(t)));
    }
    if let Some(t) = r.finished_at {
        lines.push(("finished", when(t)));
    }
    if r.attempts > 1 || r.retries > 0 {
        lines.push((
            "attempts",
            format!(
                "{} (retries used: {} of {})",
                r.attempts, r.retries, r.spec.retry.max
            ),
        ));
    }
    if let Some(e) = &r.exit {
        lines.push(("exit", e.to_string()));
    }
    if let Some(m) = &r.published {
        lines.push((
            "model",
            format!("{} ({}, {})", m.name, m.quantization, bytes(m.gguf_bytes)),
        ));
        lines.push(("run it", m.run_command.clone()));
    }
    if r.kind == crate::spec::JobKind::Train {
        if let Ok(metrics) = client
            .get::<Vec<serde_json::Value>>(&format!("/jobs/{id}/metrics"))
            .await
        {
            let last = |key: &str| {
                metrics
                    .iter()
                    .rev()
                    .find_map(|m| m.get(key).and_then(|v| v.as_f64()))
            };
            if let Some(loss) = last("loss") {
                let eval = last("eval_loss")
                    .map(|e| format!(", eval_loss {e:.4}"))
                    .unwrap_or_default();
                let first = metrics
                    .first()
                    .and_then(|m| m.get("loss"))
                    .and_then(|v| v.as_f64())
                    .unwrap_or(loss);
                lines.push((
                    "loss",
                    format!("{first:.4} → {loss:.4}{eval} ({} records)", metrics.len()),
                ));
            }
        }
        if let Some(d) = &job.job_dir {
            lines.push((
                "output",
                d.join(crate::spec::contract::files::OUTPUT)
                    .display()
                    .to_string(),
            ));
        }
    }
    if r.gpu_seconds > 0.0 {
        let t = r.gpu_seconds;
        let text = if t >= 3600.0 {
            format!("{:.1} GPU-hours", t / 3600.0)
        } else if t >= 60.0 {
            format!("{:.1} GPU-minutes", t / 60.0)
        } else {
            format!("{t:.1} GPU-seconds")
        };
        lines.push(("gpu time", text));
    }
    let width = lines.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    for (k, v) in &lines {
        outln!("{k:>width$}: {}", super::printable(v));
    }
    if let Ok(x) = client
        .get::<Explanation>(&format!("/jobs/{id}/explain"))
        .await
        && !r.state.is_terminal()
    {
        for d in &x.details {
            outln!("{:>width$}  {}", "", super::printable(d));
        }
    }
    outln!("\nhistory:");
    for e in &events.events {
        outln!(
            "  {}  {:<11} {}",
            when(e.at),
            e.state.as_str(),
            super::printable(&e.reason)
        );
    }
    Ok(true)
}

/// Quotes argv for display.
fn shell_words(argv: &[String]) -> String {
    argv.iter()
        .map(|a| {
            if !a.is_empty()
                && a.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c))
            {
                a.clone()
            } else {
                format!("'{}'", a.replace('\'', "'\\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}
