//! Recurring jobs: the job-file keys `schedule`, `overlap`, `catch_up`, cron parsing and the
//! stored schedule record.
//!
//! `schedule` takes standard crontab syntax — five fields `minute hour day-of-month month
//! day-of-week` (0 or 7 = Sunday; names like `MON` work too), or six with seconds first — and
//! the shortcuts `@hourly`, `@daily`, `@weekly`, `@monthly`, `@yearly`. Times are UTC unless
//! the daemon's `schedule_timezone = "local"`. As in crontab, when both day-of-month and
//! day-of-week are restricted (neither starts with `*`), a day matching either one fires
//! (`0 0 1 * MON`: every Monday and every 1st); the `cron` crate alone would need both.

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
    /// One schedule, or two whose union is the expression (crontab's day-of-month OR
    /// day-of-week).
    schedules: Vec<cron::Schedule>,
}

impl fmt::Display for Cron {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

const DAYS: [&str; 7] = ["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"];

/// Rewrites the day-of-week field in names, because the `cron` crate numbers days 1 = Sunday
/// … 7 = Saturday where crontab has 0 (or 7) = Sunday … 6 = Saturday. Ranges are written out
/// day by day, so that crontab's ranges ending on Sunday (`5-7`, `FRI-SUN`), which the crate
/// reads backwards, mean what they mean in crontab.
fn weekday_names(field: &str) -> Result<String, String> {
    // Crontab's number of a day: 0..=7 or a name.
    let number = |t: &str| -> Result<u32, String> {
        match t.parse::<u32>() {
            Ok(n @ 0..=7) => Ok(n),
            Ok(n) => Err(format!(
                "day of week {n} is out of range (0–7, 0 and 7 = Sunday)"
            )),
            Err(_) => DAYS
                .iter()
                .position(|d| d.eq_ignore_ascii_case(t))
                .map(|i| i as u32)
                .ok_or_else(|| format!("{t:?} is not a day of the week (SUN, MON, … or 0–7)")),
        }
    };
    field
        .split(',')
        .map(|item| {
            let (range, step) = match item.split_once('/') {
                Some((r, s)) => (r, Some(s)),
                None => (item, None),
            };
            if range == "*" || range == "?" {
                // `*/2` means the same days in both numberings (Sunday, Tuesday, …).
                return Ok(item.to_string());
            }
            let step: u32 =
                match step {
                    None => 1,
                    Some(s) => s.parse().ok().filter(|s| *s > 0).ok_or_else(|| {
                        format!("day-of-week step {s:?} is not a positive number")
                    })?,
                };
            let (first, last) = match range.split_once('-') {
                Some((a, b)) => {
                    let (a, b) = (number(a)?, number(b)?);
                    // SUN (0) ends a range as 7: `FRI-SUN` is Friday to Sunday.
                    let b = if b == 0 && a > 0 { 7 } else { b };
                    if a > b {
                        return Err(format!("day-of-week range {range} runs backwards"));
                    }
                    (a, b)
                }
                None if step > 1 => (number(range)?, 6),
                None => {
                    let n = number(range)?;
                    (n, n)
                }
            };
            Ok((first..=last)
                .step_by(step as usize)
                .map(|n| DAYS[(n % 7) as usize])
                .collect::<Vec<_>>()
                .join(","))
        })
        .collect::<Result<Vec<_>, String>>()
        .map(|v| v.join(","))
}

impl FromStr for Cron {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let source = s.trim().to_string();
        let fields: Vec<&str> = source.split_whitespace().collect();
        // (seconds, minute, hour, day-of-month, month, day-of-week), or a shortcut.
        let parts: Option<[&str; 6]> = match fields.len() {
            1 if source.starts_with('@') => None,
            5 => Some(["0", fields[0], fields[1], fields[2], fields[3], fields[4]]),
            6 => Some([
                fields[0], fields[1], fields[2], fields[3], fields[4], fields[5],
            ]),
            n => {
                return Err(format!(
                    "{n} fields; write 5 (minute hour day-of-month month day-of-week), 6 (seconds first) or @hourly/@daily/@weekly/@monthly/@yearly"
                ));
            }
        };
        let exprs = match parts {
            None => vec![source.clone()],
            Some([sec, min, hour, dom, month, dow]) => {
                let dow = weekday_names(dow)?;
                let restricted = |f: &str| !f.starts_with('*') && f != "?";
                let expr = |dom: &str, dow: &str| format!("{sec} {min} {hour} {dom} {month} {dow}");
                if restricted(dom) && restricted(&dow) {
                    vec![expr(dom, "*"), expr("*", &dow)]
                } else {
                    vec![expr(dom, &dow)]
                }
            }
        };
        let schedules = exprs
            .iter()
            .map(|expr| cron::Schedule::from_str(expr).map_err(|e| parse_error(&source, e)))
            .collect::<Result<Vec<_>, _>>()?;
        let c = Cron { source, schedules };
        if c.next_after(0, ScheduleTz::Utc).is_none() {
            return Err(format!("cron expression {:?} never fires", c.source));
        }
        Ok(c)
    }
}

/// The cron crate's message is the expression, a caret under the fault, and sometimes a
/// reason: keep the reason. Its range reasons say "less than" where they mean "at most"
/// ("Minutes must be less than 59", yet 59 is fine).
fn parse_error(source: &str, e: cron::error::Error) -> String {
    let e = e.to_string();
    let after_caret: Vec<&str> = e
        .lines()
        .skip_while(|l| !l.trim_start().starts_with('^'))
        .skip(1)
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let why = Some(after_caret.join(" "))
        .filter(|r| !r.is_empty())
        .map(|l| l.replace("must be less than", "must be at most"))
        .unwrap_or_else(|| {
            "not a crontab expression: write 5 fields (minute hour day-of-month month \
             day-of-week), 6 (seconds first) or @hourly/@daily/@weekly/@monthly/@yearly"
                .to_string()
        });
    format!("invalid cron expression {source:?}: {why}")
}

impl Cron {
    /// The first firing strictly after `after` (ms since the epoch).
    pub fn next_after(&self, after: Millis, tz: ScheduleTz) -> Option<Millis> {
        fn next<Z: TimeZone>(s: &cron::Schedule, after: DateTime<Z>) -> Option<Millis> {
            s.after(&after).next().map(|t| t.timestamp_millis())
        }
        let utc = Utc.timestamp_millis_opt(after).single()?;
        self.schedules
            .iter()
            .filter_map(|s| match tz {
                ScheduleTz::Utc => next(s, utc),
                ScheduleTz::Local => next(s, utc.with_timezone(&Local)),
            })
            .min()
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
    /// Firings that queued no job: the previous run was still active, or the job was
    /// refused (its owner at `max_submitted`, a check it no longer passes).
    #[serde(default)]
    pub skipped: u64,
    /// Why the last firing queued no job; cleared by the next firing that queues one, so
    /// `jobctl schedules` can say what keeps a schedule from running.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_skip: Option<String>,
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

/// The job file of `rec` to submit again as one job (`jobctl resubmit`): its file as
/// submitted, except that a job a schedule queued has its schedule's file, whose `schedule`
/// keys would create another schedule and whose `base = "@previous"` meant the model this run
/// started from.
pub fn file_of_one_run(rec: &super::JobRecord) -> Result<String, String> {
    if rec.schedule_id.is_none() {
        return Ok(rec.source.clone());
    }
    let mut doc: toml::Table = rec
        .source
        .parse()
        .map_err(|e| format!("job {}'s file does not parse: {e}", rec.id))?;
    for key in ["schedule", "overlap", "catch_up"] {
        doc.remove(key);
    }
    if let Some(model) = doc.get_mut("model").and_then(toml::Value::as_table_mut)
        && model
            .get("base")
            .and_then(toml::Value::as_str)
            .is_some_and(|b| super::train::is_previous(std::path::Path::new(b)))
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
    toml::to_string(&doc).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> Millis {
        DateTime::parse_from_rfc3339(s).unwrap().timestamp_millis()
    }

    /// crontab(5): "If both fields are restricted (i.e., do not contain the \"*\"
    /// character), the command will be run when either field matches the current time."
    #[test]
    fn day_of_month_and_day_of_week_together_fire_on_either() {
        let fires = |expr: &str, from: &str, n: usize| {
            let c: Cron = expr.parse().unwrap_or_else(|e| panic!("{expr}: {e}"));
            let mut t = at(from);
            (0..n)
                .map(|_| {
                    t = c.next_after(t, ScheduleTz::Utc).unwrap();
                    t
                })
                .collect::<Vec<_>>()
        };
        // Found by QA: on Sunday 2026-11-29 this waited for 2027-02-01, a 1st that is a
        // Monday.
        assert_eq!(
            fires("0 0 1 * MON", "2026-11-29T05:48:00Z", 3),
            [
                at("2026-11-30T00:00:00Z"),
                at("2026-12-01T00:00:00Z"),
                at("2026-12-07T00:00:00Z")
            ]
        );
        // Six fields, a range of days and a month: Fridays of December and the 24th–26th.
        assert_eq!(
            fires("0 30 9 24-26 12 FRI", "2026-12-01T00:00:00Z", 4),
            [
                at("2026-12-04T09:30:00Z"),
                at("2026-12-11T09:30:00Z"),
                at("2026-12-18T09:30:00Z"),
                at("2026-12-24T09:30:00Z")
            ]
        );
        // A `*` (with or without a step) in either field keeps "both must match": Mondays
        // that are the 1st, 11th, 21st or 31st.
        assert_eq!(
            fires("0 0 */10 * MON", "2026-11-29T00:00:00Z", 2),
            [at("2026-12-21T00:00:00Z"), at("2027-01-11T00:00:00Z")]
        );
        assert_eq!(
            fires("0 0 13 * *", "2026-11-29T00:00:00Z", 1),
            [at("2026-12-13T00:00:00Z")]
        );
    }

    #[test]
    fn weekday_ranges_may_end_on_sunday_as_in_crontab() {
        // 2026-11-27 is a Friday.
        for expr in [
            "0 3 * * 5-7",
            "0 3 * * FRI-SUN",
            "0 3 * * fri-sun",
            "0 3 * * 5,6,0",
        ] {
            let c: Cron = expr.parse().unwrap_or_else(|e| panic!("{expr}: {e}"));
            let mut t = at("2026-11-26T12:00:00Z");
            let mut fired = Vec::new();
            for _ in 0..4 {
                t = c.next_after(t, ScheduleTz::Utc).unwrap();
                fired.push(t);
            }
            assert_eq!(
                fired,
                [
                    at("2026-11-27T03:00:00Z"),
                    at("2026-11-28T03:00:00Z"),
                    at("2026-11-29T03:00:00Z"),
                    at("2026-12-04T03:00:00Z")
                ],
                "{expr}"
            );
        }
        let every_other: Cron = "0 3 * * 1-5/2".parse().unwrap();
        assert_eq!(
            every_other.next_after(at("2026-11-30T04:00:00Z"), ScheduleTz::Utc),
            Some(at("2026-12-02T03:00:00Z")),
            "Monday, Wednesday, Friday"
        );
        let e = "0 3 * * 6-2".parse::<Cron>().unwrap_err();
        assert!(e.contains("runs backwards"), "{e}");
        let e = "0 3 * * FUNDAY".parse::<Cron>().unwrap_err();
        assert!(e.contains("not a day of the week"), "{e}");
    }

    #[test]
    fn parser_messages_say_what_is_wrong() {
        let e = "61 * * * *".parse::<Cron>().unwrap_err();
        assert!(e.contains("must be at most 59"), "{e}");
        "59 23 31 12 *".parse::<Cron>().unwrap();
        let e = "@fortnightly".parse::<Cron>().unwrap_err();
        assert!(e.contains("not a crontab expression"), "{e}");
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

#[cfg(test)]
mod one_run_tests {
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
            file_of_one_run(&rec).unwrap(),
            source,
            "not a schedule's run"
        );
        rec.schedule_id = Some(3);
        let doc: toml::Table = file_of_one_run(&rec).unwrap().parse().unwrap();
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
        let doc: toml::Table = file_of_one_run(&rec).unwrap().parse().unwrap();
        assert_eq!(doc["model"]["base"].as_str(), Some("models/b"));
        assert_eq!(doc["model"]["first_base"].as_str(), Some("models/base"));
    }
}
