//! Removing finished jobs for good (`jobctl clean`, `scheduler.keep_finished`): their
//! records, histories and job directories. Jobs something still needs stay: a dependency of a
//! job not yet ended, a schedule's latest successful run (its `@previous` model). Who
//! published a model name stays recorded in the store, not in the job.

use std::collections::{BTreeMap, HashMap};

use tracing::{info, warn};

use super::{SchedError, Scheduler};
use crate::spec::api::{CleanRequest, CleanResponse, KeptJob};
use crate::spec::{Caller, JobId, JobState, Millis};

impl Scheduler {
    /// `jobctl clean`: the caller's finished jobs (an admin's choice of user, or everyone's)
    /// that finished before `older_than`.
    pub(super) fn clean(
        &mut self,
        caller: &Caller,
        req: &CleanRequest,
        now: Millis,
    ) -> Result<CleanResponse, SchedError> {
        let who = caller
            .user
            .clone()
            .ok_or_else(|| SchedError::Forbidden("cleaning needs a known user".into()))?;
        let owner = match (&req.owner, req.all_users) {
            (Some(_), true) => {
                return Err(SchedError::Invalid(
                    "give a user or every user's jobs, not both".into(),
                ));
            }
            (None, true) if !caller.admin => {
                return Err(SchedError::Forbidden(
                    "only admins may clean every user's jobs".into(),
                ));
            }
            (None, true) => None,
            (Some(u), false) if *u != who && !caller.admin => {
                return Err(SchedError::Forbidden(format!(
                    "the jobs of {u} are theirs to clean (or an admin's)"
                )));
            }
            (Some(u), false) => Some(u.clone()),
            (None, false) => Some(who.clone()),
        };
        let cutoff = now - req.older_than.map_or(0, |d| d.0.as_millis() as Millis);
        let report = self.remove_finished(owner.as_deref(), cutoff)?;
        info!(by = %who, removed = report.removed.len(), kept = report.kept.len(), "cleaned finished jobs");
        Ok(report)
    }

    /// `scheduler.keep_finished`: removes every user's finished jobs older than it (checked
    /// every quarter of it, between a second and an hour).
    pub(super) fn auto_clean(&mut self, now: Millis) {
        let Some(keep) = self.settings.policy.keep_finished else {
            return;
        };
        // Often enough that nothing stays much past its time.
        let every = (keep.as_millis() as Millis / 4).clamp(1000, 3600 * 1000);
        if now < self.last_auto_clean + every {
            return;
        }
        self.last_auto_clean = now;
        match self.remove_finished(None, now - keep.as_millis() as Millis) {
            Ok(r) if !r.removed.is_empty() => info!(
                removed = r.removed.len(),
                "removed finished jobs older than keep_finished"
            ),
            Ok(_) => {}
            Err(e) => warn!(error = %e, "cannot remove old finished jobs"),
        }
    }

    fn remove_finished(
        &mut self,
        owner: Option<&str>,
        cutoff: Millis,
    ) -> Result<CleanResponse, SchedError> {
        let needed = self.needed_jobs();
        let mut report = CleanResponse::default();
        for j in self.jobs.values() {
            if !j.state.is_terminal()
                || j.finished_at.unwrap_or(j.updated_at) > cutoff
                || owner.is_some_and(|o| o != j.owner.user)
            {
                continue;
            }
            match needed.get(&j.id) {
                Some(why) => report.kept.push(KeptJob {
                    id: j.id,
                    why: why.clone(),
                }),
                None => report.removed.push(j.id),
            }
        }
        // What they used still counts for fair share (it used to be forgotten at the next
        // start, so a clean shed one's debt): carried in the store.
        let mut carried: BTreeMap<String, (f64, Millis)> = BTreeMap::new();
        for id in &report.removed {
            let j = &self.jobs[id];
            if j.gpu_seconds > 0.0 {
                let this = (j.gpu_seconds, j.finished_at.unwrap_or(j.updated_at));
                let e = carried.entry(j.owner.user.clone()).or_insert((0.0, this.1));
                *e = self.usage.merge(*e, this);
            }
        }
        if !carried.is_empty() {
            let before: BTreeMap<String, (f64, Millis)> = self
                .store
                .carried_usage()?
                .into_iter()
                .map(|(u, v, at)| (u, (v, at)))
                .collect();
            for (user, add) in carried {
                let (v, at) = match before.get(&user) {
                    Some(old) => self.usage.merge(*old, add),
                    None => add,
                };
                self.store.set_carried_usage(&user, v, at)?;
            }
        }
        self.store.remove_jobs(&report.removed)?;
        let mut dirs = Vec::new();
        for id in &report.removed {
            if let Some(j) = self.jobs.remove(id) {
                self.unfinished.remove(&j);
                dirs.push(j.dir(&self.settings.jobs_dir));
            }
            self.waiting.remove(id);
            self.removed.push(*id);
        }
        remove_dirs(dirs);
        Ok(report)
    }

    /// Removes job directories whose job is gone (a clean removes the record first; the
    /// daemon may have stopped before the directory went), off the scheduler's thread.
    pub(super) fn sweep_removed_job_dirs(&self) -> Result<(), crate::store::StoreError> {
        let last = self.store.last_id()?;
        let Ok(entries) = std::fs::read_dir(&self.settings.jobs_dir) else {
            return Ok(());
        };
        let orphans: Vec<std::path::PathBuf> = entries
            .flatten()
            .filter_map(|e| {
                let id: JobId = e.file_name().to_str()?.parse().ok()?;
                // Only ids this store gave out, whose record is gone.
                (id <= last && !self.jobs.contains_key(&id)).then(|| e.path())
            })
            .collect();
        if !orphans.is_empty() {
            info!(
                count = orphans.len(),
                "removing job directories of removed jobs"
            );
            remove_dirs(orphans);
        }
        Ok(())
    }

    /// Finished jobs that must stay, and why.
    fn needed_jobs(&self) -> BTreeMap<JobId, String> {
        let mut needed = BTreeMap::new();
        for j in self.jobs.values().filter(|j| !j.state.is_terminal()) {
            for dep in &j.spec.depends_on {
                needed
                    .entry(*dep)
                    .or_insert_with(|| format!("job {} depends on it", j.id));
            }
        }
        // An end still to be told to the job's `[notify]` command, or being told; for a sweep
        // notified once, every job of it until then (its end is counted).
        let mut sweeps_pending: HashMap<JobId, bool> = HashMap::new();
        // (A sweep's state is worked out once per sweep, not once per job of it.)
        for j in self.jobs.values() {
            let why = if self.notifying.contains_key(&j.id) {
                "its notifier is running".to_string()
            } else if let Some(sweep) = super::notify::once_sweep(j) {
                let pending = *sweeps_pending
                    .entry(sweep)
                    .or_insert_with(|| self.sweep_notification_pending(sweep));
                if !pending {
                    continue;
                }
                format!("sweep {sweep} has not been notified of its end yet")
            } else if self.due(j).is_some() {
                "its notifier has not run yet".to_string()
            } else {
                continue;
            };
            needed.entry(j.id).or_insert(why);
        }
        // A schedule's latest successful run: `base = "@previous"` trains from its model.
        let mut latest_run: BTreeMap<u64, (Millis, JobId)> = BTreeMap::new();
        for j in self.jobs.values() {
            let at = (j.finished_at.unwrap_or(0), j.id);
            if let Some(sid) = j.schedule_id
                && j.state == JobState::Succeeded
                && self.schedules.contains_key(&sid)
            {
                let e = latest_run.entry(sid).or_insert(at);
                *e = (*e).max(at);
            }
        }
        for (sid, (_, id)) in latest_run {
            needed
                .entry(id)
                .or_insert_with(|| format!("the latest successful run of schedule {sid}"));
        }
        needed
    }
}

/// Removes removed jobs' directories, off the scheduler's thread (checkpoints may be large);
/// a daemon stopped meanwhile finishes at its next start. `remove_dir_all` never follows a
/// link a job left in its directory.
fn remove_dirs(dirs: Vec<std::path::PathBuf>) {
    if dirs.is_empty() {
        return;
    }
    tokio::task::spawn_blocking(move || {
        for dir in dirs {
            if let Err(e) = std::fs::remove_dir_all(&dir)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                warn!(dir = %dir.display(), error = %e, "cannot remove a removed job's directory");
            }
        }
    });
}
