//! Recurring jobs: the job-file keys `schedule`, `overlap`, `catch_up`, cron parsing and the
//! stored schedule record.
//!
//! `schedule` takes standard crontab syntax — five fields `minute hour day-of-month month
//! day-of-week` (0 or 7 = Sunday; names like `MON` work too), or six with seconds first — and
//! the shortcuts `@hourly`, `@daily`, `@weekly`, `@monthly`, `@yearly`. Times are UTC unless
//! the daemon's `schedule_timezone = "local"`.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use chrono::{DateTime, Local, TimeZone, Utc};
use serde::{Deserialize, Serialize};

use super::job::JobSpec;
use super::{JobId, Millis, Owner};

/// What a firing does while the previous run of the same schedule is still queued or running.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Overlap {
    /// Skip this firing.
    #[default]
    Skip,
    /// Queue another run anyway.
    Queue,
}

/// The time zone cron expressions are read in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScheduleTz {
    #[default]
    Utc,
    /// The machine's local time zone (`/etc/localtime`, `TZ`).
    Local,
}

/// A parsed cron expression.
#[derive(Debug, Clone)]
pub struct Cron {
    source: String,
    schedule: cron::Schedule,
}

impl fmt::Display for Cron {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

const DAYS: [&str; 7] = ["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"];

/// Rewrites numeric weekdays (crontab: 0/7 = Sunday … 6 = Saturday) as names, because the
/// `cron` crate numbers them 1 = Sunday … 7 = Saturday.
fn weekday_names(field: &str) -> Result<String, String> {
    let name = |t: &str| -> Result<String, String> {
        match t.parse::<u32>() {
            Ok(n @ 0..=7) => Ok(DAYS[(n % 7) as usize].to_string()),
            Ok(n) => Err(format!(
                "day of week {n} is out of range (0–7, 0 and 7 = Sunday)"
            )),
            Err(_) => Ok(t.to_string()),
        }
    };
    field
        .split(',')
        .map(|item| {
            let (range, step) = match item.split_once('/') {
                Some((r, s)) => (r, Some(s)),
                None => (item, None),
            };
            let range = match range.split_once('-') {
                Some((a, b)) => format!("{}-{}", name(a)?, name(b)?),
                None => name(range)?,
            };
            Ok(match step {
                Some(s) => format!("{range}/{s}"),
                None => range,
            })
        })
        .collect::<Result<Vec<_>, String>>()
        .map(|v| v.join(","))
}

impl FromStr for Cron {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let source = s.trim().to_string();
        let fields: Vec<&str> = source.split_whitespace().collect();
        let expr = match fields.len() {
            1 if source.starts_with('@') => source.clone(),
            5 => format!(
                "0 {} {} {} {} {}",
                fields[0],
                fields[1],
                fields[2],
                fields[3],
                weekday_names(fields[4])?
            ),
            6 => format!(
                "{} {} {} {} {} {}",
                fields[0],
                fields[1],
                fields[2],
                fields[3],
                fields[4],
                weekday_names(fields[5])?
            ),
            n => {
                return Err(format!(
                    "{n} fields; write 5 (minute hour day-of-month month day-of-week), 6 (seconds first) or @hourly/@daily/@weekly/@monthly/@yearly"
                ));
            }
        };
        let schedule = cron::Schedule::from_str(&expr).map_err(|e| {
            // The parser's message quotes the expression with a caret; keep its last line.
            let e = e.to_string();
            let why = e
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .unwrap_or(&e)
                .trim()
                .to_string();
            format!("invalid cron expression {source:?}: {why}")
        })?;
        let c = Cron { source, schedule };
        if c.next_after(0, ScheduleTz::Utc).is_none() {
            return Err(format!("cron expression {:?} never fires", c.source));
        }
        Ok(c)
    }
}

impl Cron {
    /// The first firing strictly after `after` (ms since the epoch).
    pub fn next_after(&self, after: Millis, tz: ScheduleTz) -> Option<Millis> {
        fn next<Z: TimeZone>(s: &cron::Schedule, after: DateTime<Z>) -> Option<Millis> {
            s.after(&after).next().map(|t| t.timestamp_millis())
        }
        let utc = Utc.timestamp_millis_opt(after).single()?;
        match tz {
            ScheduleTz::Utc => next(&self.schedule, utc),
            ScheduleTz::Local => next(&self.schedule, utc.with_timezone(&Local)),
        }
    }
}

/// A firing time as people read it, in the schedule's zone.
pub fn describe_time(t: Millis, tz: ScheduleTz) -> String {
    let Some(utc) = Utc.timestamp_millis_opt(t).single() else {
        return t.to_string();
    };
    match tz {
        ScheduleTz::Utc => utc.format("%Y-%m-%d %H:%M:%S UTC").to_string(),
        ScheduleTz::Local => utc
            .with_timezone(&Local)
            .format("%Y-%m-%d %H:%M:%S %Z")
            .to_string(),
    }
}

/// A recurring job as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScheduleRecord {
    pub id: u64,
    pub name: String,
    pub owner: Owner,
    /// The job file's spec; each firing queues a job from it.
    pub spec: JobSpec,
    pub source: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_path: Option<PathBuf>,
    pub created_at: Millis,
    pub paused: bool,
    /// When it fires next (None while paused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_fire: Option<Millis>,
    /// The last firing (its scheduled time), whether it queued a job or was skipped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_fire: Option<Millis>,
    /// The job the last firing queued.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_job: Option<JobId>,
    /// Jobs queued so far.
    #[serde(default)]
    pub runs: u64,
    /// Firings skipped because the previous run was still active.
    #[serde(default)]
    pub skipped: u64,
}

impl ScheduleRecord {
    pub fn cron(&self) -> Option<Cron> {
        self.spec.schedule.as_deref()?.parse().ok()
    }
    pub fn overlap(&self) -> Overlap {
        self.spec.overlap.unwrap_or_default()
    }
    pub fn catch_up(&self) -> bool {
        self.spec.catch_up.unwrap_or(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> Millis {
        DateTime::parse_from_rfc3339(s).unwrap().timestamp_millis()
    }

    #[test]
    fn five_fields_are_crontab() {
        let c: Cron = "30 3 * * *".parse().unwrap();
        assert_eq!(
            c.next_after(at("2026-11-28T08:00:00Z"), ScheduleTz::Utc),
            Some(at("2026-11-29T03:30:00Z"))
        );
        // Weekday 1 is Monday in crontab (2026-11-30 is a Monday).
        let mon: Cron = "0 9 * * 1".parse().unwrap();
        assert_eq!(
            mon.next_after(at("2026-11-28T08:00:00Z"), ScheduleTz::Utc),
            Some(at("2026-11-30T09:00:00Z"))
        );
        let sun: Cron = "0 9 * * 0".parse().unwrap();
        assert_eq!(
            sun.next_after(at("2026-11-28T08:00:00Z"), ScheduleTz::Utc),
            Some(at("2026-11-29T09:00:00Z"))
        );
        let weekdays: Cron = "0 9 * * 1-5".parse().unwrap();
        assert_eq!(
            weekdays.next_after(at("2026-11-28T08:00:00Z"), ScheduleTz::Utc),
            Some(at("2026-11-30T09:00:00Z"))
        );
    }

    #[test]
    fn seconds_and_shortcuts() {
        let c: Cron = "*/2 * * * * *".parse().unwrap();
        assert_eq!(
            c.next_after(at("2026-11-28T08:00:01Z"), ScheduleTz::Utc),
            Some(at("2026-11-28T08:00:02Z"))
        );
        let d: Cron = "@daily".parse().unwrap();
        assert_eq!(
            d.next_after(at("2026-11-28T08:00:00Z"), ScheduleTz::Utc),
            Some(at("2026-11-29T00:00:00Z"))
        );
    }

    #[test]
    fn bad_expressions_say_why() {
        assert!("* * *".parse::<Cron>().unwrap_err().contains("3 fields"));
        assert!(
            "61 * * * *"
                .parse::<Cron>()
                .unwrap_err()
                .contains("invalid cron expression")
        );
        assert!(
            "0 0 * * 9"
                .parse::<Cron>()
                .unwrap_err()
                .contains("out of range")
        );
        assert!(
            "0 0 30 2 *"
                .parse::<Cron>()
                .unwrap_err()
                .contains("never fires")
        );
    }
}
