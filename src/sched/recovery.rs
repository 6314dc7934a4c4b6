//! Start-up recovery: jobs an earlier daemon left `starting`, `running` or `publishing` (it
//! crashed, was killed, or restarted in place) and `interrupted` jobs (it stopped cleanly).
//! A `running` job whose recorded leader (pid + start time) still runs is taken over and goes
//! on: watched as if spawned here, its end recorded from what its supervisor or worker leaves
//! in its job directory. Otherwise the job goes back to the queue: its leftover processes —
//! found by the recorded leader and by a scan of `/proc/*/environ` for `JOBD_JOB_DIR` under
//! our jobs directory, which also finds a worker spawned just before a crash — are stopped
//! first: SIGTERM (train workers checkpoint), grace, SIGKILL. A job never runs twice at once.
//! A command job whose command ended while no daemon was watching left its outcome in its job
//! directory (`jobd run-command`; a train worker's too), which is recorded as if seen, not run
//! again; a job cancelled before the crash stays cancelled.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use futures_util::future::join_all;
use tracing::{info, warn};

use super::Scheduler;
use crate::proc;
use crate::spec::contract::{ENV_JOB_DIR, ExitStatus, files};
use crate::spec::record::{ExitInfo, ProcessInfo, StopKind};
use crate::spec::{JobId, JobKind, JobRecord, JobState, Millis, now_ms};
use crate::store::StoreError;

pub(super) async fn recover(s: &mut Scheduler) -> Result<(), StoreError> {
    // Only the processes of jobs that hold resources, running as their owner or as jobd: a
    // process anyone can start with a job's directory in its environment is none of ours.
    let daemon_uid = nix::unistd::geteuid().as_raw();
    let owners: BTreeMap<JobId, u32> = s
        .jobs
        .values()
        .filter(|j| j.state.holds_resources())
        .map(|j| {
            (
                j.id,
                if s.settings.run_as_owner {
                    j.owner.uid
                } else {
                    daemon_uid
                },
            )
        })
        .collect();
    let (mut leftovers, jobd_leaders) = scan_proc(&s.settings.jobs_dir, |id, uid| {
        owners
            .get(&id)
            .is_some_and(|owner| uid == *owner || uid == daemon_uid)
    });
    // A job still running under its leader is taken over, not stopped: a daemon crash or
    // restart costs no job its progress. A leader that ended as our child (before a restart
    // in place, or while it went on) is reaped here, its status known.
    let TakeOver { adopted, reaped } = take_over(s, &leftovers, &jobd_leaders);
    for id in adopted.iter().chain(reaped.keys()) {
        leftovers.remove(id);
    }
    // Whole groups are killed only where a job's process leads its own (or is the recorded
    // leader, below); a process in some other group is killed alone, by its marker, below —
    // never the group of a shell it was started from.
    let scanned: BTreeSet<JobId> = leftovers.keys().copied().collect();
    for infos in leftovers.values_mut() {
        infos.retain(|p| p.pid == p.pgid);
    }
    for job in s
        .jobs
        .values()
        .filter(|j| j.state.holds_resources() || j.state == JobState::Publishing)
        .filter(|j| !adopted.contains(&j.id) && !reaped.contains_key(&j.id))
    {
        if let Some(p) = &job.process {
            let list = leftovers.entry(job.id).or_default();
            if !list.iter().any(|q| q.pgid == p.pgid) {
                list.push(p.clone());
            }
        }
    }
    // Every live leader was taken over: what is left belongs to jobs whose leader has gone
    // (a supervisor killed while jobd was down), and is killed at once, as jobd kills what is
    // left of a job when its leader ends — start-up never waits a grace period.
    let kills = leftovers.iter().flat_map(|(id, infos)| {
        infos
            .iter()
            .map(move |info| async move { (*id, info.pid, proc::kill_leftover(info).await) })
    });
    let mut stopped: BTreeMap<JobId, Vec<i32>> = BTreeMap::new();
    for (id, pid, was_alive) in join_all(kills).await {
        if was_alive {
            warn!(
                job_id = id,
                pid, "killed what was left of a job whose leader had gone"
            );
            stopped.entry(id).or_default().push(pid);
        }
    }
    let to_sweep: BTreeSet<JobId> = scanned.iter().chain(stopped.keys()).copied().collect();
    for id in &to_sweep {
        if let Some(rec) = s.jobs.get(id) {
            let marker = format!("{ENV_JOB_DIR}={}", rec.dir(&s.settings.jobs_dir).display());
            let owner = owners.get(id).copied().unwrap_or(daemon_uid);
            let mut killed = proc::kill_marked(&marker, owner);
            if owner != daemon_uid {
                // A root daemon's command supervisor runs as root.
                killed += proc::kill_marked(&marker, daemon_uid);
            }
            if killed > 0 {
                stopped.entry(*id).or_default();
            }
        }
    }

    let ids: Vec<(JobId, JobState)> = s
        .jobs
        .values()
        .filter(|j| !adopted.contains(&j.id))
        .map(|j| (j.id, j.state))
        .collect();
    for (id, state) in ids {
        // A command or worker that ended while jobd was down left its outcome behind (`jobd
        // run-command`, `jobd worker`): record it as if jobd had seen it, rather than running
        // it again.
        let ended =
            matches!(state, JobState::Starting | JobState::Running) && !stopped.contains_key(&id);
        let outcome = ended
            .then(|| {
                let recorded = ended_meanwhile(s, id);
                match reaped.get(&id) {
                    // Its own status, from the kernel; the file's time if it has one.
                    Some(exit) => Some((exit.clone(), recorded.map_or_else(now_ms, |(_, at)| at))),
                    None => recorded,
                }
            })
            .flatten();
        if let Some((exit, ended_at)) = outcome {
            // `starting` was on disk, `running` not yet: it ran all the same.
            let running = (state == JobState::Starting).then_some(JobState::Running);
            s.apply(
                id,
                running,
                format!(
                    "daemon restarted; its {} had ended meanwhile ({exit})",
                    super::what_runs(s.jobs[&id].kind)
                ),
                &|_| {},
            )?;
            let attempt = s.jobs[&id].attempts;
            s.exited(id, attempt, exit, ended_at);
            info!(
                job_id = id,
                "recovered an outcome recorded while jobd was down"
            );
            continue;
        }
        match state {
            // The training had finished (its worker left exit 0): only the publish is done
            // again, not the training on a GPU from its last checkpoint.
            JobState::Publishing if trained(s, id) => {
                let job = &s.jobs[&id];
                let spec = job
                    .spec
                    .publish
                    .clone()
                    .unwrap_or_else(|| crate::spec::publish::PublishSpec::named(&job.name));
                let owner = job.owner.user.clone();
                match s.check_model_name(&spec, &owner, s.is_admin(&owner)) {
                    Err(e) => {
                        let now = now_ms();
                        s.apply(
                            id,
                            Some(JobState::Failed),
                            format!("publishing failed: {e}"),
                            &|r| {
                                r.process = None;
                                r.finished_at = Some(now);
                            },
                        )?;
                    }
                    Ok(()) => {
                        s.apply(
                            id,
                            None,
                            "daemon restarted while publishing; the training had finished: \
                             publishing again"
                                .into(),
                            &|r| r.process = None,
                        )?;
                        s.start_publish(id, spec, None);
                    }
                }
            }
            JobState::Starting | JobState::Running | JobState::Publishing => {
                let rec = &s.jobs[&id];
                let what = super::what_runs(rec.kind);
                let what = match stopped.get(&id) {
                    Some(pids) if !pids.is_empty() => format!(
                        "its {what} had gone, and what was left of its process group (led by \
                         pid {}) was killed",
                        join(pids)
                    ),
                    Some(_) => format!("its {what} had gone, and what was left of it was killed"),
                    None => format!("its {what} was no longer running"),
                };
                // Its program still ran without its leader (a supervisor killed while jobd
                // was down): an end nobody recorded, as if jobd had seen the leader die —
                // failed, or retried as its [retry] says of 137; not simply run again.
                if stopped.contains_key(&id) && state != JobState::Publishing {
                    let running = (state == JobState::Starting).then_some(JobState::Running);
                    s.apply(id, running, format!("daemon restarted; {what}"), &|_| {})?;
                    let attempt = s.jobs[&id].attempts;
                    let exit = ExitInfo {
                        code: None,
                        signal: None,
                    };
                    s.exited(id, attempt, exit, now_ms());
                    continue;
                }
                // The attempt's GPU time counts for fair share as if jobd had seen it end (it
                // used to be lost with the daemon): until now if its worker ran until this
                // start, else until the last sign of life in its job directory.
                let (seconds, until) = interrupted_usage(s, id, stopped.contains_key(&id));
                if seconds > 0.0 {
                    let user = s.jobs[&id].owner.user.clone();
                    s.usage.add(&user, seconds, until);
                }
                // A stop it was given before the crash still stands: a cancelled job stays
                // cancelled (it used to run again), one past its time limit fails.
                let stop = s.jobs[&id].stop.clone();
                let ended = match (&stop, state) {
                    (Some(StopKind::Cancel { by }), JobState::Starting | JobState::Running) => {
                        Some((
                            JobState::Cancelled,
                            format!("cancelled by {by}; daemon restarted meanwhile, {what}"),
                        ))
                    }
                    (Some(StopKind::TimeLimit), JobState::Starting | JobState::Running) => Some((
                        JobState::Failed,
                        format!("reached its time limit; daemon restarted meanwhile, {what}"),
                    )),
                    _ => None,
                };
                if let Some((end, reason)) = ended {
                    let now = now_ms();
                    s.apply(id, Some(end), reason, &|r| {
                        r.process = None;
                        r.gpu_seconds += seconds;
                        r.finished_at = Some(now);
                    })?;
                    info!(job_id = id, "recovered a stop given before the restart");
                    continue;
                }
                s.apply(
                    id,
                    Some(JobState::Interrupted),
                    format!("daemon restarted; {what}"),
                    &|r| {
                        r.process = None;
                        r.stop = None;
                        r.gpu_seconds += seconds;
                    },
                )?;
                let again = if s.jobs[&id].kind == JobKind::Command {
                    "requeued after daemon restart; its command runs again from the start"
                } else {
                    "requeued after daemon restart; resumes from its last checkpoint"
                };
                s.requeue_now(id, again.into())?;
                info!(job_id = id, "recovered");
            }
            JobState::Interrupted => {
                s.requeue_now(id, "requeued at daemon start".into())?;
            }
            _ => {}
        }
    }
    if !s.children.is_empty() {
        // Their GPU memory is theirs, not another program's.
        s.refresh_gpus(true);
    }
    Ok(())
}

/// Did the job's current attempt finish its training (its worker recorded exit 0)?
fn trained(s: &Scheduler, id: JobId) -> bool {
    let rec = &s.jobs[&id];
    recorded_exit(&rec.dir(&s.settings.jobs_dir), rec.attempts)
        .is_some_and(|(exit, _)| exit.code == Some(0))
}

/// The GPUs of a job's placement that this daemon's inventory does not have (its
/// configuration changed).
fn missing_gpus(s: &Scheduler, rec: &JobRecord) -> Vec<String> {
    rec.placement.as_ref().map_or_else(Vec::new, |p| {
        p.gpus
            .iter()
            .filter(|g| !s.gpus.gpus.iter().any(|have| have.uuid == g.uuid))
            .map(|g| format!("{} ({})", g.index, g.uuid))
            .collect()
    })
}

/// What [`take_over`] did.
struct TakeOver {
    /// Jobs now watched as if spawned here.
    adopted: BTreeSet<JobId>,
    /// Jobs whose leader had ended as this process's child, with its exit status.
    reaped: BTreeMap<JobId, ExitInfo>,
}

/// Takes over the `starting` and `running` jobs whose leader still runs — the recorded one,
/// or, for a job whose `running` record did not reach the disk, its group leader found in
/// `/proc` (`scanned`) — watched as if spawned here (their end recorded, stops passed on),
/// with the GPUs they hold. A stop given before the restart is given again (a cancel, a time
/// limit or a preemption is carried out; the stop of a daemon shutdown is over), and a job
/// placed on a GPU this daemon does not have (its configuration changed) is stopped and then
/// requeued — in the background, so that start-up never waits a grace period for them.
fn take_over(
    s: &mut Scheduler,
    scanned: &BTreeMap<JobId, Vec<ProcessInfo>>,
    jobd_leaders: &BTreeSet<i32>,
) -> TakeOver {
    let mut out = TakeOver {
        adopted: BTreeSet::new(),
        reaped: BTreeMap::new(),
    };
    let candidates: Vec<(JobId, ProcessInfo)> = s
        .jobs
        .values()
        .filter(|j| matches!(j.state, JobState::Starting | JobState::Running))
        .filter_map(|j| {
            let leader = j.process.clone().or_else(|| {
                scanned
                    .get(&j.id)?
                    .iter()
                    .find(|p| p.pid == p.pgid && jobd_leaders.contains(&p.pid))
                    .cloned()
            })?;
            Some((j.id, leader))
        })
        .collect();
    for (id, info) in candidates {
        if let Some(exit) = proc::reap_ended_child(&info) {
            out.reaped.insert(id, exit);
            continue;
        }
        let rec = &s.jobs[&id];
        // Its GPU gone (the configuration changed): taken over all the same, so that the stop
        // goes on in the background, and requeued once it has ended.
        let gone = missing_gpus(s, rec);
        // The user its processes run as: the owner under a root daemon.
        let uid = if s.settings.run_as_owner {
            rec.owner.uid
        } else {
            nix::unistd::geteuid().as_raw()
        };
        let (attempt, dir) = (rec.attempts, rec.dir(&s.settings.jobs_dir));
        let marker = format!("{ENV_JOB_DIR}={}", dir.display());
        let tx = s.tx.clone();
        let Some(handle) = proc::adopt(&info, Some(marker), uid, move |exit| {
            // Not this daemon's child: what the job's supervisor (or worker) recorded.
            let exit = exit
                .or_else(|| recorded_exit(&dir, attempt).map(|(e, _)| e))
                .unwrap_or(ExitInfo {
                    code: None,
                    signal: None,
                });
            super::send_exit(&tx, id, attempt, exit);
        }) else {
            continue;
        };
        let rec = &s.jobs[&id];
        let what = super::what_runs(rec.kind);
        let pid = info.pid;
        let starting = rec.state == JobState::Starting;
        let grace = s.settings.grace;
        let now = now_ms();
        // A stop under way goes on (a shutdown's is over); a job on a GPU gone is given one
        // to requeue it, unless it is being stopped already (a cancel stays a cancel).
        let recorded = match &rec.stop {
            Some(StopKind::Shutdown) | None => None,
            Some(other) => Some(other.clone()),
        };
        let imposed = (recorded.is_none() && !gone.is_empty()).then(|| StopKind::Requeue {
            why: format!(
                "its GPU {} is not in this daemon's inventory any more",
                gone.join(", ")
            ),
        });
        // A recorded stop got its SIGTERM when it was asked for: only its SIGKILL is left,
        // due a grace period after (records from before `stop_at` existed: the last event).
        let asked_at = rec
            .stop_at
            .or_else(|| {
                s.store
                    .events(id)
                    .ok()
                    .and_then(|events| events.last().map(|e| e.at))
            })
            .unwrap_or(now);
        let left = grace.saturating_sub(Duration::from_millis((now - asked_at).max(0) as u64));
        let reason = match (&imposed, &recorded) {
            (Some(StopKind::Requeue { why }), _) => format!(
                "daemon restarted; {why}: stopping its {what} (pid {pid}, grace {}s) to requeue it",
                grace.as_secs()
            ),
            (_, Some(_)) => format!(
                "daemon restarted; its {what} (pid {pid}) is still stopping (SIGKILL in {}s if \
                 it has not ended)",
                left.as_secs()
            ),
            _ => format!("daemon restarted; its {what} (pid {pid}) was still running and goes on"),
        };
        // A restart in place is nobody's news, unless something changes.
        let quiet = s.settings.restarted_in_place && !starting && imposed.is_none();
        let keep_stop = imposed.clone().or(recorded.clone());
        let changed = if quiet {
            Ok(s.jobs[&id].clone())
        } else {
            s.apply(id, starting.then_some(JobState::Running), reason, &|r| {
                r.process = Some(info.clone());
                r.stop = keep_stop.clone();
                if imposed.is_some() {
                    r.stop_at = Some(now);
                }
            })
        };
        if let Err(e) = changed {
            warn!(job_id = id, error = %e, "cannot record a job taken over");
        }
        if imposed.is_some() {
            handle.stop(grace);
        } else if recorded.is_some() {
            handle.kill_after(left);
        }
        s.children.insert(id, handle);
        out.adopted.insert(id);
        info!(job_id = id, pid, "took over a job still running");
    }
    out
}

/// The outcome `jobd run-command` recorded for a command job's current attempt, if any, and
/// when the command ended (now, if the file does not say; never before the job started).
fn ended_meanwhile(s: &Scheduler, id: JobId) -> Option<(ExitInfo, Millis)> {
    let rec = s.jobs.get(&id)?;
    let (exit, ended_at) = recorded_exit(&rec.dir(&s.settings.jobs_dir), rec.attempts)?;
    let now = now_ms();
    let ended_at = ended_at.map_or(now, |t| t.clamp(rec.started_at.unwrap_or(t), now));
    Some((exit, ended_at))
}

/// How attempt `attempt` ended, as its supervisor (`jobd run-command`) or train worker left
/// it in the job directory `dir`, and when, if the file says.
fn recorded_exit(dir: &Path, attempt: u32) -> Option<(ExitInfo, Option<Millis>)> {
    let path = dir.join(files::EXIT_STATUS);
    let status: ExitStatus =
        serde_json::from_slice(&crate::jobfs::read_regular(&path, files::MAX_STATUS_BYTES).ok()?)
            .ok()?;
    (status.attempt == attempt).then_some((
        ExitInfo {
            code: status.code,
            signal: status.signal,
        },
        status.ended_at,
    ))
}

/// GPU-seconds of an attempt that a daemon crash interrupted, and when they end.
fn interrupted_usage(s: &Scheduler, id: JobId, ran_until_now: bool) -> (f64, Millis) {
    let now = now_ms();
    let Some(rec) = s.jobs.get(&id) else {
        return (0.0, now);
    };
    let gpus = rec.placement.as_ref().map_or(0, |p| p.gpus.len());
    let (Some(started), true) = (rec.started_at, rec.state != JobState::Publishing) else {
        return (0.0, now);
    };
    let until = if ran_until_now {
        now
    } else {
        super::last_sign_of_life(&rec.dir(&s.settings.jobs_dir))
            .unwrap_or(started)
            .clamp(started, now)
    };
    (gpus as f64 * (until - started) as f64 / 1000.0, until)
}

fn join(pids: &[i32]) -> String {
    pids.iter()
        .map(|p| p.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Processes whose environment says they belong to a job under `jobs_dir`.
/// Also returns the pids that are a job's own leader as jobd starts one (`jobd worker`, `jobd
/// run-command`), not a process of the job's that leads a group of its own (`setsid`).
fn scan_proc(
    jobs_dir: &Path,
    accept: impl Fn(JobId, u32) -> bool,
) -> (BTreeMap<JobId, Vec<ProcessInfo>>, BTreeSet<i32>) {
    let mut out: BTreeMap<JobId, Vec<ProcessInfo>> = BTreeMap::new();
    let mut leaders = BTreeSet::new();
    let prefix = format!("{}/", jobs_dir.display());
    for (pid, dir, environ) in proc::environs() {
        // A job's notifier is not part of its run (see `proc::is_notifier`); a running one
        // is found by the pid its job records.
        if proc::is_notifier(&environ) {
            continue;
        }
        let Some(id) = proc::env_value(&environ, ENV_JOB_DIR).and_then(|d| {
            d.strip_prefix(&prefix)?
                .split('/')
                .next()?
                .parse::<JobId>()
                .ok()
        }) else {
            continue;
        };
        let uid = std::os::unix::fs::MetadataExt::uid(&match std::fs::metadata(&dir) {
            Ok(m) => m,
            Err(_) => continue,
        });
        if !accept(id, uid) {
            continue;
        }
        let Ok(pgid) = nix::unistd::getpgid(Some(nix::unistd::Pid::from_raw(pid))) else {
            continue;
        };
        let Some(start_ticks) = proc::start_ticks(pid) else {
            continue;
        };
        let found = ProcessInfo {
            pid,
            pgid: pgid.as_raw(),
            start_ticks,
        };
        // One process per group, its leader where it is seen (it names the job's process).
        let list = out.entry(id).or_default();
        match list.iter_mut().find(|p| p.pgid == found.pgid) {
            Some(p) if found.pid == found.pgid => *p = found,
            Some(_) => {}
            None => list.push(found),
        }
        let subcommand = std::fs::read(dir.join("cmdline"))
            .ok()
            .and_then(|c| c.split(|b| *b == 0).nth(1).map(<[u8]>::to_vec));
        if pid == pgid.as_raw() && matches!(subcommand.as_deref(), Some(b"worker" | b"run-command"))
        {
            leaders.insert(pid);
        }
    }
    (out, leaders)
}
