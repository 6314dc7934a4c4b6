//! `jobctl schedules` and `jobctl schedule pause|resume|delete|run-now`.

use clap::{Args, ValueEnum};

use super::{Output, table, when};
use crate::client::Client;
use crate::spec::api::{ScheduleView, SchedulesResponse};

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Action {
    /// Stop firing until resumed.
    Pause,
    /// Fire again from the next matching time.
    Resume,
    /// Remove the schedule (its past jobs stay).
    Delete,
    /// Queue a run now (even while another run is active).
    RunNow,
}

#[derive(Debug, Args)]
pub struct ScheduleArgs {
    /// What to do.
    #[arg(value_enum)]
    pub action: Action,
    /// Schedule id (see `jobctl schedules`; `schedule:N` as `submit` prints it works too).
    #[arg(value_parser = super::parse_schedule_id)]
    pub id: u64,
}

pub async fn list(client: &Client, out: &Output) -> anyhow::Result<bool> {
    let r: SchedulesResponse = client.get("/schedules").await?;
    if out.json {
        out.print_json(&r)?;
        return Ok(true);
    }
    if r.schedules.is_empty() {
        eprintln!("no schedules (a job file with schedule = \"...\" creates one)");
        return Ok(true);
    }
    let rows = r
        .schedules
        .iter()
        .map(|s| {
            let rec = &s.record;
            vec![
                rec.id.to_string(),
                rec.name.clone(),
                rec.owner.user.clone(),
                rec.spec.schedule.clone().unwrap_or_default(),
                if rec.paused {
                    "paused".into()
                } else {
                    rec.next_fire.map(when).unwrap_or_else(|| "never".into())
                },
                match (rec.last_job, s.last_state) {
                    (Some(j), Some(st)) => format!("job {j} ({st})"),
                    (Some(j), None) => format!("job {j}"),
                    _ => "-".into(),
                },
                format!(
                    "{} run{}, {} skipped",
                    rec.runs,
                    if rec.runs == 1 { "" } else { "s" },
                    rec.skipped
                ),
            ]
        })
        .collect();
    outln!(
        "{}",
        table(
            &["ID", "NAME", "USER", "SCHEDULE", "NEXT", "LAST RUN", "RUNS"],
            rows
        )
    );
    // Below the table: a reason is a sentence, too long for a column.
    for s in &r.schedules {
        if let Some(why) = &s.record.last_skip {
            outln!("schedule {}: {why}", s.record.id);
        }
    }
    Ok(true)
}

pub async fn action(client: &Client, args: &ScheduleArgs, out: &Output) -> anyhow::Result<bool> {
    let name = match args.action {
        Action::Pause => "pause",
        Action::Resume => "resume",
        Action::Delete => "delete",
        Action::RunNow => "run-now",
    };
    let s: ScheduleView = client
        .post(
            &format!("/schedules/{}/{name}", args.id),
            &serde_json::json!({}),
        )
        .await?;
    if out.json {
        out.print_json(&s)?;
        return Ok(true);
    }
    let r = &s.record;
    match args.action {
        Action::Pause => outln!("schedule {}: paused", r.id),
        Action::Resume => outln!(
            "schedule {}: next run {}",
            r.id,
            r.next_fire.map(when).unwrap_or_else(|| "never".into())
        ),
        Action::Delete => outln!("schedule {}: deleted", r.id),
        Action::RunNow => outln!(
            "schedule {}: queued job {}",
            r.id,
            r.last_job.map(|j| j.to_string()).unwrap_or_default()
        ),
    }
    Ok(true)
}
