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

use futures_util::future::join_all;
use tracing::{info, warn};

use super::Scheduler;
use crate::proc;
use crate::spec::contract::{ENV_JOB_DIR, ExitStatus, files};
use crate::spec::record::{ExitInfo, ProcessInfo, StopKind};
use crate::spec::{JobId, JobKind, JobState, Millis, now_ms};
use crate::store::StoreError;

pub(super) async fn recover(s: &mut Scheduler) -> Result<(), StoreError> {
    let mut leftovers: BTreeMap<JobId, Vec<ProcessInfo>> = scan_proc(&s.settings.jobs_dir);
    for job in s
        .jobs
        .values()
        .filter(|j| j.state.holds_resources() || j.state == JobState::Publishing)
    {
        if let Some(p) = &job.process {
            let list = leftovers.entry(job.id).or_default();
            if !list.iter().any(|q| q.pgid == p.pgid) {
                list.push(p.clone());
            }
        }
    }
    // A job still running under its recorded leader is taken over, not stopped: a daemon
    // crash or restart costs no job its progress.
    let adopted = adopt_running(s);
    for id in &adopted {
        leftovers.remove(id);
    }
    let grace = s.settings.grace;
    let stops = leftovers.iter().flat_map(|(id, infos)| {
        infos
            .iter()
            .map(move |info| async move { (*id, info.pid, proc::stop_leftover(info, grace).await) })
    });
    let mut stopped: BTreeMap<JobId, Vec<i32>> = BTreeMap::new();
    for (id, pid, was_alive) in join_all(stops).await {
        if was_alive {
            warn!(
                job_id = id,
                pid, "stopped a worker left over from an earlier daemon"
            );
            stopped.entry(id).or_default().push(pid);
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
        if let Some((exit, ended_at)) = ended.then(|| ended_meanwhile(s, id)).flatten() {
            // `starting` was on disk, `running` not yet: it ran all the same.
            let running = (state == JobState::Starting).then_some(JobState::Running);
            s.apply(
                id,
                running,
                format!(
                    "daemon restarted; its {} had ended meanwhile ({exit})",
                    if s.jobs[&id].kind == JobKind::Command {
                        "command"
                    } else {
                        "worker"
                    }
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
            JobState::Starting | JobState::Running | JobState::Publishing => {
                let what = match stopped.get(&id) {
                    Some(pids) => format!("its worker (pid {}) was stopped", join(pids)),
                    None => "its worker was no longer running".into(),
                };
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
        // Stray workers of finished jobs (should not exist) were stopped above as well.
    }
    for id in adopted {
        let rec = &s.jobs[&id];
        let what = match rec.kind {
            JobKind::Command => "command",
            JobKind::Train => "worker",
        };
        let pid = rec.process.as_ref().map_or(0, |p| p.pid);
        s.apply(
            id,
            None,
            format!("daemon restarted; its {what} (pid {pid}) was still running and goes on"),
            &|_| {},
        )?;
        info!(job_id = id, pid, "took over a job still running");
    }
    if !s.children.is_empty() {
        // Their GPU memory is theirs, not another program's.
        s.refresh_gpus(true);
    }
    Ok(())
}

/// Takes over the `running` jobs whose recorded leader still runs: watched as if spawned
/// here (their end recorded, stops passed on), with the GPUs they hold. Not taken over: a job
/// given a stop before the crash (recovery carries the stop out), and one placed on a GPU
/// this daemon does not have (its configuration changed): both are stopped as before.
fn adopt_running(s: &mut Scheduler) -> BTreeSet<JobId> {
    let uuids: BTreeSet<&str> = s.gpus.gpus.iter().map(|g| g.uuid.as_str()).collect();
    let candidates: Vec<(JobId, u32, ProcessInfo, u32, std::path::PathBuf)> = s
        .jobs
        .values()
        .filter(|j| j.state == JobState::Running && j.stop.is_none())
        .filter(|j| {
            j.placement
                .as_ref()
                .is_none_or(|p| p.gpus.iter().all(|g| uuids.contains(g.uuid.as_str())))
        })
        .filter_map(|j| {
            let p = j.process.clone()?;
            // The user its processes run as: the owner under a root daemon.
            let uid = if s.settings.run_as_owner {
                j.owner.uid
            } else {
                nix::unistd::geteuid().as_raw()
            };
            Some((j.id, j.attempts, p, uid, j.dir(&s.settings.jobs_dir)))
        })
        .collect();
    let mut adopted = BTreeSet::new();
    for (id, attempt, info, uid, dir) in candidates {
        let marker = format!("{ENV_JOB_DIR}={}", dir.display());
        let tx = s.tx.clone();
        let handle = proc::adopt(&info, marker, uid, move |exit| {
            // Not this daemon's child: what the job's supervisor (or worker) recorded.
            let exit = exit
                .or_else(|| recorded_exit(&dir, attempt).map(|(e, _)| e))
                .unwrap_or(ExitInfo {
                    code: None,
                    signal: None,
                });
            super::send_exit(&tx, id, attempt, exit);
        });
        if let Some(handle) = handle {
            s.children.insert(id, handle);
            adopted.insert(id);
        }
    }
    adopted
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
fn scan_proc(jobs_dir: &Path) -> BTreeMap<JobId, Vec<ProcessInfo>> {
    let mut out: BTreeMap<JobId, Vec<ProcessInfo>> = BTreeMap::new();
    let prefix = format!("{ENV_JOB_DIR}={}/", jobs_dir.display());
    let me = std::process::id() as i32;
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return out;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(environ) = std::fs::read(entry.path().join("environ")) else {
            continue;
        };
        let Some(id) = environ.split(|b| *b == 0).find_map(|var| {
            let var = std::str::from_utf8(var).ok()?;
            var.strip_prefix(&prefix)?
                .split('/')
                .next()?
                .parse::<JobId>()
                .ok()
        }) else {
            continue;
        };
        let Ok(pgid) = nix::unistd::getpgid(Some(nix::unistd::Pid::from_raw(pid))) else {
            continue;
        };
        let Some(start_ticks) = proc::start_ticks(pid) else {
            continue;
        };
        let list = out.entry(id).or_default();
        if !list.iter().any(|p| p.pgid == pgid.as_raw()) {
            list.push(ProcessInfo {
                pid,
                pgid: pgid.as_raw(),
                start_ticks,
            });
        }
    }
    out
}
