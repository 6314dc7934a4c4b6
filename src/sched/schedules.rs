//! Recurring jobs: schedules live in the store and in the scheduler's memory; the event loop
//! wakes at the earliest `next_fire` and fires what is due. A firing queues an ordinary job
//! linked to its schedule (`schedule_id`) — or is skipped while the previous run is still
//! queued or running (`overlap = "skip"`), or when the job is refused (its owner at
//! `max_submitted`, a check it no longer passes); the schedule keeps why (`last_skip`).
//! After downtime a missed firing runs once at start-up (`catch_up = true`), never a burst:
//! the next firing is always computed from *now*. A firing counts as missed when its time
//! lies before this daemon process started.

use tracing::{info, warn};

use super::{SchedError, Scheduler, Submission};
use crate::spec::schedule::{Overlap, ScheduleRecord};
use crate::spec::train::is_previous;
use crate::spec::{Caller, JobRecord, JobState, Millis, Owner, now_ms};

/// What `jobctl schedule ...` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ScheduleAction {
    Pause,
    Resume,
    Delete,
    RunNow,
}

impl Scheduler {
    /// Creates a schedule from a job file with `schedule = "..."`.
    pub(super) fn create_schedule(
        &mut self,
        caller: &Caller,
        owner: Owner,
        sub: Submission,
    ) -> Result<ScheduleRecord, SchedError> {
        self.check_submitter(caller)?;
        self.check_priority(caller, sub.spec.priority, None)?;
        let expr = sub.spec.schedule.clone().ok_or_else(|| {
            SchedError::Invalid("a schedule needs schedule = \"<cron expression>\"".into())
        })?;
        let cron: crate::spec::schedule::Cron = expr.parse().map_err(SchedError::Invalid)?;
        let now = now_ms();
        // Check now what each firing would be checked against (with the first base).
        let mut probe = sub.clone();
        resolve_previous(&mut probe.spec, None);
        let probe = self.prepare_job(owner.clone(), probe, now)?;
        if let Some(p) = &probe.spec.publish {
            self.check_model_name(p, &owner.user, caller.admin)?;
        }
        let next_fire = cron.next_after(now, self.settings.schedule_tz);
        let rec = self.store.insert_schedule(&|id| ScheduleRecord {
            id,
            name: sub.name.clone(),
            owner: owner.clone(),
            spec: sub.spec.clone(),
            source: sub.source.clone(),
            source_path: sub.source_path.clone(),
            created_at: now,
            paused: false,
            next_fire,
            last_fire: None,
            last_job: None,
            runs: 0,
            skipped: 0,
            last_skip: None,
        })?;
        info!(schedule_id = rec.id, expr = %expr, "schedule created");
        self.schedules.insert(rec.id, rec.clone());
        self.schedules_changed = true;
        Ok(rec)
    }

    pub(super) fn schedule_action(
        &mut self,
        caller: &Caller,
        id: u64,
        action: ScheduleAction,
    ) -> Result<ScheduleRecord, SchedError> {
        let rec = self
            .schedules
            .get(&id)
            .cloned()
            .ok_or(SchedError::ScheduleNotFound(id))?;
        if !caller.may_change(&rec.owner.user) {
            return Err(SchedError::Forbidden(format!(
                "schedule {id} belongs to {}; only its owner or an admin may change it",
                rec.owner.user
            )));
        }
        let by = caller.user.clone().unwrap_or_default();
        let now = now_ms();
        let mut upd = rec.clone();
        match action {
            ScheduleAction::Pause => {
                upd.paused = true;
                upd.next_fire = None;
            }
            ScheduleAction::Resume => {
                upd.paused = false;
                upd.next_fire = rec
                    .cron()
                    .and_then(|c| c.next_after(now, self.settings.schedule_tz));
            }
            ScheduleAction::Delete => {
                self.store.delete_schedule(id)?;
                self.schedules.remove(&id);
                self.schedules_changed = true;
                info!(schedule_id = id, by = %by, "schedule deleted");
                return Ok(rec);
            }
            ScheduleAction::RunNow => {
                // An explicit request queues a run even while another is active.
                let (s, _) = self.fire(upd, &format!("run now by {by}"), true)?;
                return Ok(s);
            }
        }
        self.store.put_schedule(&upd)?;
        self.schedules.insert(id, upd.clone());
        self.schedules_changed = true;
        Ok(upd)
    }

    /// Fires every schedule that is due at `now`.
    pub(super) fn fire_due(&mut self, now: Millis) {
        let due: Vec<u64> = self
            .schedules
            .values()
            .filter(|s| !s.paused && s.next_fire.is_some_and(|t| t <= now))
            .map(|s| s.id)
            .collect();
        for id in due {
            let s = self.schedules[&id].clone();
            let at = s.next_fire.unwrap_or(now);
            let mut upd = s.clone();
            upd.last_fire = Some(at);
            upd.next_fire = s
                .cron()
                .and_then(|c| c.next_after(now, self.settings.schedule_tz));
            let when = crate::spec::schedule::describe_time(at, self.settings.schedule_tz);
            // Due before this daemon started: missed while it was down.
            let missed = at < self.started_at;
            let result = if missed && !s.catch_up() {
                info!(schedule_id = id, "missed firing skipped (catch_up = false)");
                self.store
                    .put_schedule(&upd)
                    .map_err(SchedError::from)
                    .map(|()| {
                        self.schedules.insert(id, upd.clone());
                        self.schedules_changed = true;
                    })
            } else {
                let why = if missed {
                    format!("catch-up of the firing missed at {when}")
                } else {
                    format!("scheduled for {when}")
                };
                self.fire(upd, &why, false).map(|_| ())
            };
            if let Err(e) = result {
                warn!(schedule_id = id, error = %e, "schedule firing failed");
            }
        }
    }

    /// One firing: queue a job (unless skipped for overlap) and store the schedule's new state
    /// in the same transaction.
    fn fire(
        &mut self,
        upd: ScheduleRecord,
        why: &str,
        force: bool,
    ) -> Result<(ScheduleRecord, Option<JobRecord>), SchedError> {
        let id = upd.id;
        let active = self
            .jobs
            .values()
            .find(|j| j.schedule_id == Some(id) && !j.state.is_terminal())
            .map(|j| j.id);
        if let (Some(run), Overlap::Skip, false) = (active, upd.overlap(), force) {
            let skip = format!("{why}: skipped, its previous run (job {run}) is still active");
            let (s, _) = self.store.fire(&upd, &skip, None)?;
            info!(
                schedule_id = id,
                active = run,
                "firing skipped: the previous run is still active"
            );
            self.schedules.insert(id, s.clone());
            self.schedules_changed = true;
            return Ok((s, None));
        }
        let mut spec = upd.spec.clone();
        let previous = self.last_success(id);
        resolve_previous(
            &mut spec,
            previous
                .map(|j| {
                    j.dir(&self.settings.jobs_dir)
                        .join(crate::spec::contract::files::OUTPUT)
                })
                .as_deref(),
        );
        let sub = Submission {
            spec,
            source: upd.source.clone(),
            source_path: upd.source_path.clone(),
            name: upd.name.clone(),
            hold: false,
            copy_of: None,
            sweep: None,
        };
        let prepared = self
            .check_submit_limit(&upd.owner.user, 1)
            .and_then(|()| self.prepare_job(upd.owner.clone(), sub, now_ms()));
        let mut rec = match prepared {
            Ok(r) => r,
            Err(e) => {
                // The schedule stays; this firing is recorded as skipped, with the reason in
                // the schedule (`last_skip`) and the log.
                let (s, _) = self
                    .store
                    .fire(&upd, &format!("{why}: skipped, {e}"), None)?;
                self.schedules.insert(id, s);
                self.schedules_changed = true;
                return Err(e);
            }
        };
        rec.schedule_id = Some(id);
        let reason = format!(
            "queued by schedule {id} ({}): {why}",
            upd.spec.schedule.as_deref().unwrap_or("?")
        );
        let (s, created) = self.store.fire(
            &upd,
            &reason,
            Some(&|jid| JobRecord {
                id: jid,
                ..rec.clone()
            }),
        )?;
        self.schedules.insert(id, s.clone());
        self.schedules_changed = true;
        let job = created.map(|(job, event)| {
            info!(schedule_id = id, job_id = job.id, "schedule fired");
            self.note_change(job.clone(), Some(event));
            job
        });
        Ok((s, job))
    }

    /// The newest succeeded run of a schedule.
    fn last_success(&self, schedule: u64) -> Option<&JobRecord> {
        self.jobs
            .values()
            .rev()
            .find(|j| j.schedule_id == Some(schedule) && j.state == JobState::Succeeded)
    }

    /// The earliest time a schedule fires.
    pub(super) fn next_schedule_fire(&self) -> Option<Millis> {
        self.schedules
            .values()
            .filter(|s| !s.paused)
            .filter_map(|s| s.next_fire)
            .min()
    }
}

/// A fired job's spec: no schedule keys, and `base = "@previous"` replaced by the last
/// successful run's model (or `first_base` when there is none).
fn resolve_previous(spec: &mut crate::spec::JobSpec, previous_output: Option<&std::path::Path>) {
    spec.schedule = None;
    spec.overlap = None;
    spec.catch_up = None;
    if let Some(m) = &mut spec.model {
        if m.base.as_deref().is_some_and(is_previous) {
            m.base = previous_output
                .map(|p| p.to_path_buf())
                .or_else(|| m.first_base.clone());
        }
        m.first_base = None;
    }
}
