//! `jobctl list`.

use clap::Args;

use super::{Output, age, bytes, table};
use crate::client::Client;
use crate::spec::api::{JobView, ListResponse};
use crate::spec::job::VramRequest;
use crate::spec::{JobId, JobState, now_ms};

#[derive(Debug, Args)]
pub struct ListArgs {
    /// Include finished jobs.
    #[arg(short, long)]
    pub all: bool,
    /// Only jobs in these states (comma separated: queued,running,...; `held`: queued jobs
    /// on hold).
    #[arg(long, value_name = "STATES")]
    pub state: Option<String>,
    /// Only this user's jobs.
    #[arg(long, short = 'u', value_name = "USER")]
    pub user: Option<String>,
    /// Only your own jobs.
    #[arg(long, conflicts_with = "user")]
    pub mine: bool,
    /// At most this many jobs (running ones first, then the newest); 0: all of them.
    #[arg(long, default_value_t = 100)]
    pub limit: u32,
}

pub async fn list(client: &Client, args: &ListArgs, out: &Output) -> anyhow::Result<bool> {
    // Encoded: a filter value is the user's text (spaces, '&').
    let mut query: Vec<(&str, String)> = vec![("all", args.all.to_string())];
    if let Some(s) = &args.state {
        query.push(("state", s.clone()));
    }
    if let Some(u) = &args.user {
        query.push(("owner", u.clone()));
    }
    if args.mine {
        query.push(("mine", "true".into()));
    }
    let resp = fetch(client, &query, args).await?;
    if out.json {
        out.print_json(&resp)?;
        return Ok(true);
    }
    if resp.jobs.is_empty() {
        eprintln!(
            "no jobs{}",
            if args.all {
                ""
            } else {
                " (use --all to include finished ones)"
            }
        );
        return Ok(true);
    }
    let now = now_ms();
    let rows = resp.jobs.iter().map(|j| row(j, now)).collect();
    outln!(
        "{}",
        table(
            &[
                "ID", "NAME", "USER", "STATE", "PRI", "KIND", "GPUS", "PROGRESS", "AGE", "REASON"
            ],
            rows
        )
    );
    if resp.total > resp.jobs.len() {
        eprintln!(
            "({} of {} jobs shown; --limit N for more, --limit 0 for all)",
            resp.jobs.len(),
            resp.total
        );
    }
    Ok(true)
}

/// The jobs to list: those running (starting, publishing) first, whatever their age — a big
/// sweep queued after them used to push them out of the newest `--limit` — then the newest
/// others, page after page up to `--limit` (0: all).
async fn fetch(
    client: &Client,
    query: &[(&str, String)],
    args: &ListArgs,
) -> anyhow::Result<ListResponse> {
    let limit = if args.limit == 0 {
        usize::MAX
    } else {
        args.limit as usize
    };
    let page = |extra: Vec<(&'static str, String)>| {
        let mut q = query.to_vec();
        q.extend(extra);
        q
    };
    let mut jobs: Vec<JobView> = Vec::new();
    if args.state.is_none() {
        let active = page(vec![("state", "starting,running,publishing".into())]);
        jobs = super::jobs::list_every_page(client, &active).await?;
        jobs.truncate(limit);
    }
    // The total of the query as asked (one small page says it).
    let first: ListResponse = client
        .get(&format!(
            "/jobs?{}",
            serde_urlencoded::to_string(page(vec![("limit", "1".into())]))?
        ))
        .await?;
    let mut before: Option<JobId> = None;
    while jobs.len() < limit {
        let want = (limit - jobs.len()).clamp(1, 1000);
        let mut extra = vec![("limit", want.to_string())];
        if let Some(b) = before {
            extra.push(("before", b.to_string()));
        }
        let path = format!("/jobs?{}", serde_urlencoded::to_string(page(extra))?);
        let resp: ListResponse = client.get(&path).await?;
        for j in resp.jobs {
            if jobs.len() < limit && !jobs.iter().any(|k| k.record.id == j.record.id) {
                jobs.push(j);
            }
        }
        match resp.next_before {
            Some(b) => before = Some(b),
            None => break,
        }
    }
    Ok(ListResponse {
        jobs,
        next_before: None,
        total: first.total,
    })
}

fn row(j: &JobView, now: i64) -> Vec<String> {
    let r = &j.record;
    vec![
        r.id.to_string(),
        r.name.clone(),
        r.owner.user.clone(),
        r.state.to_string(),
        r.priority.to_string(),
        r.kind.as_str().to_string(),
        gpus_column(j),
        progress_column(j),
        age(now, r.submitted_at),
        reason_column(j),
    ]
}

/// Placed: "[0,1] 10GiB" (which GPUs, in brackets so that one index is not read as a
/// count); waiting: "2x 20GiB" (how many, each); CPU: "-".
pub fn gpus_column(j: &JobView) -> String {
    let r = &j.record;
    if r.spec.resources.gpus == 0 {
        return "-".into();
    }
    match (&r.placement, r.state.holds_resources()) {
        (Some(p), true) => {
            let ids: Vec<_> = p.gpus.iter().map(|g| g.index.to_string()).collect();
            if p.exclusive {
                format!("[{}] whole", ids.join(","))
            } else {
                format!("[{}] {}", ids.join(","), bytes(p.vram_per_gpu))
            }
        }
        _ => {
            let vram = match (r.spec.resources.vram, r.vram_estimate) {
                (VramRequest::PerGpu(b), _) => b.to_string(),
                (VramRequest::Auto, Some(e)) => format!("~{}", bytes(e)),
                (VramRequest::Auto, None) => "whole".into(),
            };
            format!("{}x {vram}", r.spec.resources.gpus)
        }
    }
}

fn progress_column(j: &JobView) -> String {
    match &j.progress {
        Some(p) if p.total_steps > 0 => {
            format!(
                "{}/{} {:.0}%",
                p.step,
                p.total_steps,
                100.0 * p.step as f64 / p.total_steps as f64
            )
        }
        _ => "-".into(),
    }
}

fn reason_column(j: &JobView) -> String {
    let r = &j.record;
    match r.state {
        JobState::Queued => j.waiting.clone().unwrap_or_else(|| "pending".into()),
        JobState::Failed | JobState::Cancelled | JobState::Interrupted => {
            let reason = super::printable(r.reason.as_deref().unwrap_or_default()).into_owned();
            let mut s: String = reason.chars().take(48).collect();
            if reason.chars().count() > 48 {
                s.push('…');
            }
            s
        }
        JobState::Running if r.stop.is_some() => "stopping".into(),
        _ => String::new(),
    }
}
