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
    if let Some(by) = &r.held_by {
        lines.push(("held", format!("by {by} (jobctl release {})", r.id)));
    }
    if let Some(sid) = r.schedule_id {
        lines.push(("schedule", format!("{sid} (jobctl schedules)")));
    }
    if let Some(s) = &r.sweep {
        lines.push((
            "sweep",
            format!(
                "{}, job {} of {}: {} (jobctl sweep {})",
                s.id,
                s.index,
                s.size,
                s.label(),
                s.id
            ),
        ));
    }
    if let Some(cmd) = &r.spec.command {
        lines.push(("command", shell_words(&cmd.argv)));
        if let Some(w) = &cmd.workdir {
            lines.push(("workdir", w.display().to_string()));
        }
    }
    if let Some(m) = &r.spec.model {
        let what = match (&m.base, m.hidden_size) {
            (Some(b), _) => b.display().to_string(),
            (None, Some(h)) => format!(
                "from scratch: hidden {h}, {} layers, {} heads, vocabulary {}",
                m.num_hidden_layers.unwrap_or(0),
                m.num_attention_heads.unwrap_or(0),
                m.vocab_size.unwrap_or(0)
            ),
            (None, None) => "from scratch".into(),
        };
        lines.push(("model", what));
    }
    if let Some(d) = &r.spec.data {
        let mut data = d.train_file.display().to_string();
        if let Some(e) = &d.eval_file {
            data += &format!(", eval {}", e.display());
        }
        if let Some(t) = &d.chat_template {
            data += &format!(", chat template {}", t.display());
        }
        lines.push(("data", data));
    }
    if r.kind == crate::spec::JobKind::Train {
        let t = r.spec.training.clone().unwrap_or_default();
        let length = if t.max_steps > 0 {
            format!("{} steps", t.max_steps)
        } else {
            format!("{} epochs", t.num_train_epochs)
        };
        let mut training = format!(
            "{length}, batch {} × {} accumulated, lr {:e} ({}), {}",
            t.per_device_train_batch_size,
            t.gradient_accumulation_steps,
            t.learning_rate,
            serde_json::to_value(t.lr_scheduler_type)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default(),
            t.dtype.as_str()
        );
        if let Some(l) = &r.spec.lora {
            training += &format!(", LoRA r {} on {}", l.r, l.target_modules.join(","));
        }
        lines.push(("training", training));
    }
    lines.push(("resources", super::list::gpus_column(&job)));
    if let Some(c) = r.spec.resources.cpus {
        lines.push(("cpus", c.to_string()));
    }
    if let Some(t) = r.spec.resources.time_limit {
        lines.push(("time limit", format!("{t} per run")));
    }
    if let Some(t) = r.spec.resources.stall_timeout {
        lines.push(("stall timeout", format!("{t} without output or progress")));
    }
    if !r.spec.depends_on.is_empty() {
        let ids: Vec<String> = r.spec.depends_on.iter().map(ToString::to_string).collect();
        lines.push(("depends on", ids.join(", ")));
    }
    if r.spec.retry.max > 0 {
        let on = if r.spec.retry.on_exit_codes.is_empty() {
            "any failure".to_string()
        } else {
            let codes: Vec<String> = r
                .spec
                .retry
                .on_exit_codes
                .iter()
                .map(ToString::to_string)
                .collect();
            format!("exit codes {}", codes.join(", "))
        };
        lines.push((
            "retry",
            format!(
                "up to {} times on {on}, backoff {} (doubling)",
                r.spec.retry.max, r.spec.retry.backoff
            ),
        ));
    }
    if let Some(n) = &r.spec.notify {
        let on: Vec<&str> = n.on.iter().map(|e| e.as_str()).collect();
        // The program only: its arguments may hold a webhook's secret URL.
        let program = n.argv.first().map(String::as_str).unwrap_or_default();
        lines.push((
            "notify",
            format!(
                "{} when {} (timeout {})",
                super::printable(program),
                on.join(", "),
                n.timeout
            ),
        ));
    }
    if let Some(cmd) = &r.spec.command
        && !cmd.env.is_empty()
    {
        // Names only: values may be credentials (WANDB_API_KEY); `--json` has them.
        let names: Vec<&str> = cmd.env.keys().map(String::as_str).collect();
        lines.push(("env", names.join(", ")));
    }
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
        if let Some(note) = &m.not_exported {
            lines.push(("not in GGUF", note.clone()));
        }
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
                    format!(
                        "{first:.4} → {loss:.4}{eval} ({} record{})",
                        metrics.len(),
                        if metrics.len() == 1 { "" } else { "s" }
                    ),
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
    // Why a job failed is usually at the end of its stderr (a traceback, CUDA's error): its
    // owner (and admins) see the last lines here, as `sacct` users look for them in the .err file.
    if r.state == crate::spec::JobState::Failed
        && let Ok((_, tail)) = super::logs::last_lines(client, id, "stderr", 8).await
        && !tail.is_empty()
    {
        outln!("\nlast lines of stderr (jobctl logs --stderr {id}):");
        for line in String::from_utf8_lossy(&tail).lines() {
            outln!("  {}", super::printable(line));
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
