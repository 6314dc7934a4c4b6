//! Small subcommands: cancel, wait, explain, priority, requeue, hold, release, gpus, whoami.

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
#[command(
    group(clap::ArgGroup::new("which").required(true).multiple(true).args(["ids", "mine", "user"])),
    group(clap::ArgGroup::new("selector").args(["mine", "user"])),
    after_help = "Examples:\n  jobctl cancel 12 13\n  \
        jobctl cancel --mine                   all your queued and running jobs\n  \
        jobctl cancel --mine --state queued    only those not started yet\n  \
        jobctl cancel --user bob               (an admin) all of bob's"
)]
pub struct CancelArgs {
    /// Job ids.
    #[arg(value_parser = super::parse_id)]
    pub ids: Vec<JobId>,
    /// All your own jobs that have not ended (with --state: in those states).
    #[arg(long, conflicts_with = "user")]
    pub mine: bool,
    /// All of this user's jobs that have not ended (yours, or anyone's for an admin).
    #[arg(long, short = 'u', value_name = "USER")]
    pub user: Option<String>,
    /// With --mine or --user: only jobs in these states (comma-separated: queued, starting,
    /// running, interrupted; held: queued jobs on hold); default the first four.
    #[arg(long, value_name = "STATES", requires = "selector")]
    pub state: Option<String>,
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

/// Every job `/jobs?QUERY` lists, page after page (the API gives at most 1000 at a time:
/// `cancel --mine` used to stop at the newest 1000, silently).
pub(super) async fn list_every_page(
    client: &Client,
    query: &[(&str, String)],
) -> anyhow::Result<Vec<JobView>> {
    let mut all = Vec::new();
    let mut before: Option<JobId> = None;
    loop {
        let mut q = query.to_vec();
        q.retain(|(k, _)| *k != "limit" && *k != "before");
        q.push(("limit", "1000".into()));
        if let Some(b) = before {
            q.push(("before", b.to_string()));
        }
        let path = format!("/jobs?{}", serde_urlencoded::to_string(&q)?);
        let page: crate::spec::api::ListResponse = client.get(&path).await?;
        all.extend(page.jobs);
        match page.next_before {
            Some(b) => before = Some(b),
            None => return Ok(all),
        }
    }
}

pub async fn cancel(client: &Client, args: &CancelArgs, out: &Output) -> anyhow::Result<bool> {
    let mut ids = args.ids.clone();
    // What the listing already told: no need to ask again per job.
    let mut known_running = std::collections::HashSet::new();
    let mut listed = std::collections::HashSet::new();
    if args.mine || args.user.is_some() {
        // Every job of theirs that has not ended, in the states asked for.
        let states = args
            .state
            .clone()
            .unwrap_or_else(|| "queued,starting,running,interrupted".into());
        let mut query: Vec<(&str, String)> = vec![("all", "true".into()), ("state", states)];
        match &args.user {
            Some(u) => query.push(("owner", u.clone())),
            None => query.push(("mine", "true".into())),
        }
        let found = list_every_page(client, &query).await?;
        ids.extend(found.iter().map(|j| j.record.id));
        known_running.extend(
            found
                .iter()
                .filter(|j| j.record.state.holds_resources())
                .map(|j| j.record.id),
        );
        listed.extend(found.iter().map(|j| j.record.id));
        if ids.is_empty() {
            eprintln!("jobctl: no job matches; nothing cancelled");
            if out.json {
                out.print_json(&Vec::<serde_json::Value>::new())?;
            }
            return Ok(true);
        }
    }
    ids.sort_unstable();
    ids.dedup();
    // Queued jobs first: cancelling a running one frees its GPUs, and a queued job about to be
    // cancelled too could start on them in between (QA: started, then killed at once).
    if ids.len() > 1 {
        let mut running = known_running;
        for id in ids.iter().filter(|id| !listed.contains(*id)) {
            if let Ok(v) = client.get::<JobView>(&format!("/jobs/{id}")).await
                && v.record.state.holds_resources()
            {
                running.insert(*id);
            }
        }
        ids.sort_by_key(|id| running.contains(id));
    }
    let mut ok = true;
    let mut entries = Vec::new();
    for id in &ids {
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
                entries.push(serde_json::to_value(&v)?);
            }
            Err(e) if e.is_unreachable() => return Err(e.into()),
            Err(e) => {
                // jobd's messages name the job already ("job 7 has already succeeded").
                eprintln!("jobctl: {e}");
                entries.push(failed_entry(*id, e));
                ok = false;
            }
        }
    }
    if out.json {
        out.print_json(&entries)?;
    }
    Ok(ok)
}

/// The `--json` entry of an id that failed in a command taking several:
/// `{"id", "error": {"code", "message", "problems"}}`, in place of the job.
fn failed_entry(id: JobId, e: impl Into<anyhow::Error>) -> serde_json::Value {
    serde_json::json!({"id": id, "error": super::error_object(&e.into())})
}

/// Waits until every job is in a terminal state; true if all succeeded.
pub async fn wait(client: &Client, ids: &[JobId], out: &Output) -> anyhow::Result<bool> {
    // An id jobd does not know (or will not show) is reported in its place; the others are
    // still waited for.
    let mut all_ok = true;
    let mut entries = Vec::new();
    for id in ids {
        match wait_for_end(client, &[*id], !out.json).await {
            Ok((ok, finals)) => {
                all_ok &= ok;
                for v in finals {
                    entries.push(serde_json::to_value(&v)?);
                }
            }
            Err(e)
                if e.downcast_ref::<crate::client::ClientError>()
                    .is_some_and(crate::client::ClientError::is_unreachable) =>
            {
                return Err(e);
            }
            Err(e) => {
                eprintln!("jobctl: {}", super::error_chain(&e));
                entries.push(failed_entry(*id, e));
                all_ok = false;
            }
        }
    }
    if out.json {
        out.print_json(&entries)?;
    }
    Ok(all_ok)
}

/// Waits until every job is in a terminal state: whether all succeeded, and the jobs as they
/// ended; `report` prints a line per job as it ends.
pub async fn wait_for_end(
    client: &Client,
    ids: &[JobId],
    report: bool,
) -> anyhow::Result<(bool, Vec<JobView>)> {
    let mut all_ok = true;
    let mut finals = Vec::new();
    for id in ids {
        let mut last: Option<JobEvent> = None;
        // Follows the job's events until it ends. The stream also ends (or breaks) when jobd
        // stops: then wait for it to come back, as a restart keeps the queue.
        let job = loop {
            let followed = async {
                let mut events = client
                    .events(&format!("/jobs/{id}/events?follow=true"))
                    .await?;
                while let Some(ev) = events.next_event().await? {
                    if ev.event == "job-event"
                        && let Ok(e) = serde_json::from_str::<JobEvent>(&ev.data)
                    {
                        last = Some(e);
                    }
                }
                client.get::<JobView>(&format!("/jobs/{id}")).await
            }
            .await;
            match followed {
                Ok(job) if job.record.state.is_terminal() => break job,
                Ok(_) => tokio::time::sleep(std::time::Duration::from_millis(200)).await,
                Err(e) if e.is_transient() => super::logs::reconnect(client, &e).await?,
                Err(e) => return Err(e.into()),
            }
        };
        all_ok &= job.record.state == JobState::Succeeded;
        if report {
            // The record's reason is why it ended; its last event may be a note after that
            // (a notification sent).
            let reason = job
                .record
                .reason
                .clone()
                .or(last.map(|e| e.reason))
                .unwrap_or_default();
            outln!(
                "job {id}: {} — {}",
                job.record.state,
                super::printable(&reason)
            );
        }
        finals.push(job);
    }
    Ok((all_ok, finals))
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
                priority: args.priority.into(),
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

/// Requeues each job; like `cancel`, one that cannot be requeued is reported and the others
/// are still done (exit 1 if any failed).
pub async fn requeue(client: &Client, args: &IdsArgs, out: &Output) -> anyhow::Result<bool> {
    // Oldest first: a job's dependencies are older than it (they must exist at submit), so
    // `requeue B A` puts A back before B, which would otherwise fail again at once on A.
    let mut ids = args.ids.clone();
    ids.sort_unstable();
    ids.dedup();
    post_each(client, &ids, "requeue", out).await
}

#[derive(Debug, Args)]
#[command(after_help = "Examples:\n  \
    jobctl clean                       all your finished jobs\n  \
    jobctl clean --older-than 7d       yours that finished over a week ago\n  \
    jobctl clean --all-users --older-than 30d   (admins)\n\n\
    Kept: a dependency of a job not yet ended, a schedule's latest successful run (its \
    @previous model).")]
pub struct CleanArgs {
    /// Only jobs that finished at least this long ago (e.g. 7d, 12h); default: all.
    #[arg(long, value_name = "DURATION")]
    pub older_than: Option<crate::spec::units::HumanDuration>,
    /// This user's jobs (admins); default: your own.
    #[arg(long, short = 'u', value_name = "USER", conflicts_with = "all_users")]
    pub user: Option<String>,
    /// Every user's finished jobs (admins).
    #[arg(long)]
    pub all_users: bool,
}

/// `jobctl clean`: removes finished jobs and says which it kept and why.
pub async fn clean(client: &Client, args: &CleanArgs, out: &Output) -> anyhow::Result<bool> {
    let req = crate::spec::api::CleanRequest {
        older_than: args.older_than,
        owner: args.user.clone(),
        all_users: args.all_users,
    };
    let r: crate::spec::api::CleanResponse = client.post("/jobs/clean", &req).await?;
    if out.json {
        out.print_json(&r)?;
        return Ok(true);
    }
    let n = r.removed.len();
    outln!(
        "removed {n} finished job{} (records, histories, job directories)",
        if n == 1 { "" } else { "s" }
    );
    for k in &r.kept {
        outln!("kept job {}: {}", k.id, k.why);
    }
    Ok(true)
}

/// Holds (`hold`) or releases each queued job, reporting each as `requeue` does.
pub async fn hold(
    client: &Client,
    args: &IdsArgs,
    hold: bool,
    out: &Output,
) -> anyhow::Result<bool> {
    let action = if hold { "hold" } else { "release" };
    post_each(client, &args.ids, action, out).await
}

/// POSTs `/jobs/{id}/{action}` for each id: prints each job's new state (or its error, and
/// carries on), with `--json` one array of the jobs and `{id, error}` entries.
async fn post_each(
    client: &Client,
    ids: &[JobId],
    action: &str,
    out: &Output,
) -> anyhow::Result<bool> {
    let mut ok = true;
    let mut entries = Vec::new();
    for id in ids {
        match client
            .post::<_, JobView>(&format!("/jobs/{id}/{action}"), &serde_json::json!({}))
            .await
        {
            Ok(v) => {
                if !out.json {
                    let held = match &v.record.held_by {
                        Some(by) => format!(", held by {by}"),
                        None => String::new(),
                    };
                    outln!("job {id}: {}{held}", v.record.state);
                }
                entries.push(serde_json::to_value(&v)?);
            }
            Err(e) if e.is_unreachable() => return Err(e.into()),
            Err(e) => {
                eprintln!("jobctl: {e}");
                entries.push(failed_entry(*id, e));
                ok = false;
            }
        }
    }
    if out.json {
        out.print_json(&entries)?;
    }
    Ok(ok)
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
        if let Some(l) = &w.limits {
            let set_in = if l.max_submitted_set_in == "built-in" {
                "jobd's built-in default".to_string()
            } else {
                format!("max_submitted in {}", l.max_submitted_set_in)
            };
            outln!(
                "unfinished jobs: {} of at most {} ({set_in})",
                l.unfinished,
                l.max_submitted
            );
            let mut caps = Vec::new();
            if let Some(n) = l.max_running {
                caps.push(format!("{n} job{}", if n == 1 { "" } else { "s" }));
            }
            if let Some(n) = l.max_gpus {
                caps.push(format!("{n} GPU{}", if n == 1 { "" } else { "s" }));
            }
            if let Some(b) = l.max_vram {
                caps.push(format!("{} of VRAM", super::bytes(b)));
            }
            if caps.is_empty() {
                outln!("running: {} (no limit on jobs, GPUs or VRAM)", l.running);
            } else {
                outln!("running: {} (at most {})", l.running, caps.join(", "));
            }
        }
    }
    Ok(true)
}
