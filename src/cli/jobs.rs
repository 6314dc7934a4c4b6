//! Small subcommands: cancel, wait, explain, priority, requeue, gpus, whoami.

use clap::Args;

use super::{Output, bytes, table};
use crate::client::Client;
use crate::sched::Explanation;
use crate::spec::api::{GpusResponse, JobView, PriorityRequest, Whoami};
use crate::spec::{JobEvent, JobId, JobState};

#[derive(Debug, Args)]
pub struct IdArgs {
    /// Job id.
    #[arg(value_parser = super::parse_id)]
    pub id: JobId,
}

#[derive(Debug, Args)]
pub struct IdsArgs {
    /// Job ids.
    #[arg(required = true, value_parser = super::parse_id)]
    pub ids: Vec<JobId>,
}

#[derive(Debug, Args)]
pub struct PriorityArgs {
    /// Job id.
    #[arg(value_parser = super::parse_id)]
    pub id: JobId,
    /// New priority (-1000..1000; higher runs first).
    #[arg(allow_negative_numbers = true, value_parser = super::parse_priority)]
    pub priority: i32,
}

pub async fn cancel(client: &Client, args: &IdsArgs, out: &Output) -> anyhow::Result<bool> {
    let mut ok = true;
    let mut views = Vec::new();
    for id in &args.ids {
        match client
            .post::<_, JobView>(&format!("/jobs/{id}/cancel"), &serde_json::json!({}))
            .await
        {
            Ok(v) => {
                if !out.json {
                    let what = if v.record.state == JobState::Cancelled {
                        "cancelled"
                    } else {
                        "stopping (SIGTERM sent)"
                    };
                    outln!("job {id}: {what}");
                }
                views.push(v);
            }
            Err(e) if e.is_unreachable() => return Err(e.into()),
            Err(e) => {
                eprintln!("jobctl: job {id}: {e}");
                ok = false;
            }
        }
    }
    if out.json {
        out.print_json(&views)?;
    }
    Ok(ok)
}

/// Waits until every job is in a terminal state; true if all succeeded.
pub async fn wait(client: &Client, ids: &[JobId], out: &Output) -> anyhow::Result<bool> {
    let mut all_ok = true;
    let mut finals = Vec::new();
    for id in ids {
        let mut events = client
            .events(&format!("/jobs/{id}/events?follow=true"))
            .await?;
        let mut last: Option<JobEvent> = None;
        while let Some(ev) = events.next_event().await? {
            if ev.event == "job-event"
                && let Ok(e) = serde_json::from_str::<JobEvent>(&ev.data)
            {
                last = Some(e);
            }
        }
        let job: JobView = client.get(&format!("/jobs/{id}")).await?;
        if !job.record.state.is_terminal() {
            anyhow::bail!(
                "lost the daemon while waiting for job {id} (it is {})",
                job.record.state
            );
        }
        all_ok &= job.record.state == JobState::Succeeded;
        if !out.json {
            let reason = last
                .map(|e| e.reason)
                .or(job.record.reason.clone())
                .unwrap_or_default();
            outln!("job {id}: {} — {reason}", job.record.state);
        }
        finals.push(job);
    }
    if out.json {
        out.print_json(&finals)?;
    }
    Ok(all_ok)
}

pub async fn explain(client: &Client, id: JobId, out: &Output) -> anyhow::Result<bool> {
    let x: Explanation = client.get(&format!("/jobs/{id}/explain")).await?;
    if out.json {
        out.print_json(&x)?;
    } else {
        outln!("job {id}: {} ({})", x.state, x.summary);
        for d in &x.details {
            outln!("  {d}");
        }
    }
    Ok(true)
}

pub async fn priority(client: &Client, args: &PriorityArgs, out: &Output) -> anyhow::Result<bool> {
    let v: JobView = client
        .post(
            &format!("/jobs/{}/priority", args.id),
            &PriorityRequest {
                priority: args.priority,
            },
        )
        .await?;
    if out.json {
        out.print_json(&v)?;
    } else {
        outln!("job {}: priority {}", args.id, v.record.priority);
    }
    Ok(true)
}

pub async fn requeue(client: &Client, args: &IdsArgs, out: &Output) -> anyhow::Result<bool> {
    let mut views = Vec::new();
    for id in &args.ids {
        let v: JobView = client
            .post(&format!("/jobs/{id}/requeue"), &serde_json::json!({}))
            .await?;
        if !out.json {
            outln!("job {id}: {}", v.record.state);
        }
        views.push(v);
    }
    if out.json {
        out.print_json(&views)?;
    }
    Ok(true)
}

pub async fn gpus(client: &Client, out: &Output) -> anyhow::Result<bool> {
    let g: GpusResponse = client.get("/gpus").await?;
    if out.json {
        out.print_json(&g)?;
        return Ok(true);
    }
    if let Some(note) = &g.note {
        eprintln!("{note}");
    }
    if g.gpus.is_empty() {
        outln!("no GPUs (source: {})", g.source);
        return Ok(true);
    }
    let rows = g
        .gpus
        .iter()
        .map(|x| {
            let free_for_jobd = x
                .total_bytes
                .saturating_sub(x.foreign_bytes + x.reserved_bytes);
            let jobs: Vec<String> = x
                .jobs
                .iter()
                .map(|j| format!("{}:{} ({})", j.id, j.owner, bytes(j.reserved_bytes)))
                .collect();
            vec![
                x.index.to_string(),
                x.name.clone(),
                bytes(x.total_bytes),
                bytes(x.reserved_bytes),
                bytes(x.foreign_bytes),
                bytes(free_for_jobd),
                if x.excluded {
                    "excluded".into()
                } else if jobs.is_empty() {
                    "-".into()
                } else {
                    jobs.join(", ")
                },
            ]
        })
        .collect();
    outln!(
        "{}",
        table(
            &[
                "GPU", "NAME", "TOTAL", "RESERVED", "FOREIGN", "FREE", "JOBS"
            ],
            rows
        )
    );
    Ok(true)
}

pub async fn whoami(client: &Client, out: &Output) -> anyhow::Result<bool> {
    let w: Whoami = client.get("/whoami").await?;
    if out.json {
        out.print_json(&w)?;
    } else {
        let who = w.user.as_deref().unwrap_or("anonymous (read-only)");
        outln!(
            "{who}{}{}{}",
            w.uid.map(|u| format!(" (uid {u})")).unwrap_or_default(),
            if w.admin { ", admin" } else { "" },
            if w.can_submit {
                ", may submit"
            } else {
                ", may not submit"
            }
        );
    }
    Ok(true)
}
