//! Placement and policy as one pure function: [`plan`] looks at the queue, the running jobs and
//! the GPU inventory and decides what to start, what to preempt and what must fail — and, for
//! every job left waiting, why. No IO, no clock, no randomness: the scheduler loop calls it on
//! every event and applies the decisions; tests and the trace benchmark call it directly.
//!
//! Policy, in order:
//! 1. Order waiting jobs by priority (high first), then fair share (owner's decayed GPU time,
//!    low first), then time in line (FIFO).
//! 2. Skip jobs whose dependencies, retry backoff or owner's limits hold them back.
//! 3. CPU-only jobs take CPU slots; GPU jobs take GPUs where reservations + foreign use +
//!    the safety margin leave room, best-fit (the fullest GPU that still fits) to limit
//!    fragmentation, preferred GPUs first.
//! 4. A job that does not fit lets later jobs backfill — until it has waited longer than
//!    `starvation_after`: then it holds the GPUs it will use and nothing else lands on them.
//! 5. A job that does not fit may preempt running jobs of strictly lower priority: as few and
//!    as low as possible.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;

use crate::config::{SchedulerConfig, UserLimits};
use crate::gpu::GpuInfo;
use crate::spec::job::{GpuSelector, VramRequest};
use crate::spec::record::{GpuSlot, Placement, StopKind};
use crate::spec::units::ByteSize;
use crate::spec::{JobId, JobKind, JobRecord, JobState, Millis};

/// VRAM a job needs on each of its GPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    Bytes(u64),
    /// The whole card, alone (command jobs that did not say how much they use).
    Whole,
}

impl fmt::Display for Need {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Need::Bytes(b) => write!(f, "{}", ByteSize(*b)),
            Need::Whole => f.write_str("a whole GPU"),
        }
    }
}

/// What a job needs on each GPU: its explicit request, else its estimate (train jobs), else the
/// whole card.
pub fn vram_need(rec: &JobRecord) -> Need {
    match rec.spec.resources.vram {
        VramRequest::PerGpu(b) => Need::Bytes(b.0),
        VramRequest::Auto => match (rec.kind, rec.vram_estimate) {
            (JobKind::Train, Some(e)) => Need::Bytes(e),
            _ => Need::Whole,
        },
    }
}

/// Everything `plan` looks at.
pub struct PlanInput<'a> {
    pub now: Millis,
    /// Jobs in state `queued`.
    pub queued: Vec<&'a JobRecord>,
    /// Jobs holding resources (`starting`, `running`).
    pub active: Vec<&'a JobRecord>,
    /// State of any job, for dependencies.
    pub state_of: &'a dyn Fn(JobId) -> Option<JobState>,
    pub gpus: &'a [GpuInfo],
    pub cfg: &'a SchedulerConfig,
    pub max_cpu_jobs: u32,
    /// Decayed GPU-seconds per user (fair share), including running jobs.
    pub usage: &'a HashMap<String, f64>,
}

/// A decision to start a job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Start {
    pub id: JobId,
    pub placement: Placement,
}

/// A decision to stop a running job so that another can run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Preempt {
    pub victim: JobId,
    pub for_job: JobId,
}

/// Why a job is still waiting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Wait {
    /// A dependency has not succeeded yet.
    Dependency { on: JobId, state: JobState },
    /// Retry backoff.
    Backoff { until: Millis },
    /// The owner is at one of their limits.
    UserLimit { what: String },
    /// All CPU slots are taken.
    CpuSlots { max: u32 },
    /// No set of GPUs has room now.
    Vram {
        need: Need,
        gpus: u32,
        best_gpu: Option<u32>,
        best_free: u64,
    },
    /// Fewer eligible GPUs than the job asks for could hold it even with no jobd job on them
    /// (the daemon's GPUs changed after it was accepted, or other programs hold memory).
    TooBig {
        need: Need,
        gpus: u32,
        largest_gpu: Option<u32>,
        largest: u64,
    },
    /// Fewer eligible GPUs exist than the job asks for (or none at all).
    NoGpus { need: u32, eligible: u32 },
    /// The GPUs with room are held for a job that has waited too long.
    Held { for_job: JobId },
    /// Lower-priority jobs are being stopped to make room.
    Preempting { victims: Vec<JobId> },
    /// Put on hold (`jobctl hold`) until released.
    OnHold { by: String },
    /// The state directory's file system is full: nothing starts until it has room.
    DiskFull,
}

impl Wait {
    /// One short line for `jobctl list` (Slurm's Reason column).
    pub fn short(&self) -> String {
        match self {
            Wait::Dependency { on, .. } => format!("dependency {on}"),
            Wait::Backoff { .. } => "retry backoff".into(),
            Wait::UserLimit { what } => format!("user limit ({what})"),
            Wait::CpuSlots { .. } => "CPU slots busy".into(),
            Wait::Vram { need, gpus, .. } if *gpus > 1 => format!("vram: {gpus}x {need}"),
            Wait::Vram { need, .. } => format!("vram: {need}"),
            Wait::TooBig { need, .. } => format!("vram: {need} (no GPU that big)"),
            Wait::NoGpus { .. } => "not enough GPUs".into(),
            Wait::Held { for_job } => format!("GPUs held for {for_job}"),
            Wait::Preempting { victims } => format!("preempting {}", join_ids(victims)),
            Wait::OnHold { by } => format!("held by {by}"),
            Wait::DiskFull => "state disk full".into(),
        }
    }

    /// A full sentence for `jobctl explain`.
    pub fn long(&self, now: Millis) -> String {
        match self {
            Wait::Dependency { on, state } => {
                format!("waits for job {on} to succeed (it is {state})")
            }
            Wait::Backoff { until } => format!(
                "waits {:.0}s more before its next retry (backoff)",
                ((until - now).max(0) as f64 / 1000.0).ceil()
            ),
            Wait::UserLimit { what } => format!("waits because its owner is at a limit: {what}"),
            Wait::CpuSlots { max } => format!(
                "waits for a CPU job slot (all {max} are in use); it starts when one frees up"
            ),
            Wait::Vram {
                need,
                gpus,
                best_gpu,
                best_free,
            } => {
                let per = match (*gpus > 1, need) {
                    (true, _) => format!("{gpus} GPUs with {need} each"),
                    (false, Need::Whole) => "a whole GPU".to_string(),
                    (false, _) => format!("{need} on one GPU"),
                };
                match (best_gpu, need) {
                    // Room is not what a whole card waits for: a card without jobd jobs.
                    (_, Need::Whole) => format!(
                        "needs {per} to itself: it starts on an eligible GPU once no other \
                         jobd job runs there"
                    ),
                    (Some(g), _) => format!(
                        "needs {per}; the best GPU now is GPU {g} with {} free for jobd",
                        ByteSize(*best_free)
                    ),
                    (None, _) => format!("needs {per}; no eligible GPU has room now"),
                }
            }
            Wait::TooBig {
                need,
                gpus,
                largest_gpu,
                largest,
            } => {
                let per = if *gpus > 1 {
                    format!("{gpus} GPUs with {need} each")
                } else {
                    format!("{need} on one GPU")
                };
                let biggest = largest_gpu.map_or_else(
                    || "there is no eligible GPU".to_string(),
                    |g| {
                        format!(
                            "the most any eligible GPU could give jobd is GPU {g}'s {}",
                            ByteSize(*largest)
                        )
                    },
                );
                format!(
                    "needs {per}, but {biggest}: it cannot start unless the daemon's GPUs \
                     change or other programs free memory (cancel it, or lower its vram)"
                )
            }
            Wait::NoGpus { need, eligible } => format!(
                "needs {need} GPU{} but only {eligible} eligible GPU{} exist{} (check only_gpus and the allow-list)",
                if *need == 1 { "" } else { "s" },
                if *eligible == 1 { "" } else { "s" },
                if *eligible == 1 { "s" } else { "" },
            ),
            Wait::Held { for_job } => format!(
                "the GPUs that could take it are held for job {for_job}, which has waited longer than the starvation limit"
            ),
            Wait::Preempting { victims } => format!(
                "lower-priority jobs {} are being stopped (checkpoint, then requeue) to make room",
                join_ids(victims)
            ),
            Wait::OnHold { by } => {
                format!("is on hold (put there by {by}); jobctl release starts it again")
            }
            Wait::DiskFull => "would start, but the file system of jobd's state directory is \
                full: it starts once space is freed (old job directories, checkpoints; \
                jobctl clean)"
                .into(),
        }
    }
}

fn join_ids(ids: &[JobId]) -> String {
    ids.iter()
        .map(|i| i.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// A waiting job: why, and how many jobs are ahead of it in line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Waiting {
    pub wait: Wait,
    pub ahead: usize,
}

/// The decisions of one planning round.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    pub start: Vec<Start>,
    pub preempt: Vec<Preempt>,
    /// Jobs that can never run, with the reason (e.g. a failed dependency).
    pub fail: Vec<(JobId, String)>,
    pub waiting: BTreeMap<JobId, Waiting>,
}

/// Free room on one GPU during planning.
#[derive(Debug, Clone)]
struct GpuRoom<'a> {
    info: &'a GpuInfo,
    /// Room for jobd: total − margin − foreign − reservations (may be negative when
    /// foreign use grew).
    room: i128,
    /// Room if every jobd job on it left: total − margin − foreign.
    ceiling: i128,
    /// Has an exclusive job, or jobs at all (for `Need::Whole`).
    exclusive: bool,
    jobs: usize,
    allowed: bool,
    held_for: Option<JobId>,
}

/// The `allowed_gpus` entries that select none of `gpus`, as written.
pub(super) fn unmatched_selectors(cfg: &SchedulerConfig, gpus: &[GpuInfo]) -> Vec<String> {
    cfg.allowed_gpus
        .iter()
        .filter(|s| !gpus.iter().any(|g| selects(s, g)))
        .map(ToString::to_string)
        .collect()
}

fn selects(sel: &GpuSelector, g: &GpuInfo) -> bool {
    match sel {
        GpuSelector::Index(i) => *i == g.index,
        GpuSelector::Uuid(u) => u.eq_ignore_ascii_case(&g.uuid),
    }
}

fn fits(room: &GpuRoom<'_>, need: Need) -> bool {
    match need {
        Need::Bytes(b) => !room.exclusive && room.room >= b as i128,
        Need::Whole => room.jobs == 0 && room.room > 0,
    }
}

/// Decides what to do now. See the module docs for the policy.
pub fn plan(input: &PlanInput<'_>) -> Plan {
    let cfg = input.cfg;
    let margin = cfg.vram_margin as i128;
    let mut rooms: Vec<GpuRoom<'_>> = input
        .gpus
        .iter()
        .map(|g| {
            let ceiling = g.total_bytes as i128 - margin - g.foreign_bytes as i128;
            GpuRoom {
                info: g,
                room: ceiling,
                ceiling,
                exclusive: false,
                jobs: 0,
                allowed: cfg.allowed_gpus.is_empty()
                    || cfg.allowed_gpus.iter().any(|s| selects(s, g)),
                held_for: None,
            }
        })
        .collect();
    let mut cpu_used = 0u32;
    // Looked up once per queued job: a few users, so an ordered map's short string compares
    // cost less than hashing each name (profiled: a tenth of a submit's time at 10k queued).
    let mut per_user: BTreeMap<&str, UserUse> = BTreeMap::new();
    for job in &input.active {
        let use_ = per_user.entry(job.owner.user.as_str()).or_default();
        use_.running += 1;
        match &job.placement {
            Some(p) if !p.gpus.is_empty() => {
                use_.gpus += p.gpus.len() as u32;
                for slot in &p.gpus {
                    // A whole card counts against its owner's VRAM limit by its size, as
                    // documented, not by the room it had when the job started.
                    use_.vram += match rooms.iter().find(|r| r.info.uuid == slot.uuid) {
                        Some(r) if p.exclusive => r.info.total_bytes.max(p.vram_per_gpu),
                        _ => p.vram_per_gpu,
                    };
                    if let Some(r) = rooms.iter_mut().find(|r| r.info.uuid == slot.uuid) {
                        // A card held whole has no room left, whatever its size (with cards
                        // of several sizes, `vram_per_gpu` is the smallest one's).
                        r.room = if p.exclusive {
                            r.room.min(0)
                        } else {
                            r.room - p.vram_per_gpu as i128
                        };
                        r.jobs += 1;
                        r.exclusive |= p.exclusive;
                    }
                }
            }
            _ => cpu_used += 1,
        }
    }

    // Preemptions already under way, by the job they make room for.
    let mut in_flight: BTreeMap<JobId, Vec<JobId>> = BTreeMap::new();
    for job in &input.active {
        if let Some(StopKind::Preempt { for_job }) = &job.stop {
            in_flight.entry(*for_job).or_default().push(job.id);
        }
    }

    let mut order: Vec<&JobRecord> = input.queued.clone();
    // Usage is a non-negative float, so its bit pattern orders like the value; the key is
    // computed once per job rather than once per comparison (queues reach 10,000s of jobs).
    order.sort_by_cached_key(|j| {
        let usage = input
            .usage
            .get(&j.owner.user)
            .copied()
            .unwrap_or(0.0)
            .max(0.0);
        (
            std::cmp::Reverse(j.priority),
            usage.to_bits(),
            queued_since(j),
            j.id,
        )
    });

    let mut out = Plan::default();
    let mut held_one = false;
    let mut preempted: BTreeSet<JobId> = BTreeSet::new();
    for job in &order {
        let mut wait = |wait: Wait| {
            // Ahead in line: the jobs before it that wait too (not those starting in this
            // round, which leave the line).
            let ahead = out.waiting.len();
            out.waiting.insert(job.id, Waiting { wait, ahead });
        };
        if let Some(by) = &job.held_by {
            wait(Wait::OnHold { by: by.clone() });
            continue;
        }
        // Dependencies.
        let mut blocked = None;
        for dep in &job.spec.depends_on {
            match (input.state_of)(*dep) {
                Some(JobState::Succeeded) => {}
                Some(s @ (JobState::Failed | JobState::Cancelled)) => {
                    blocked = Some(Err(format!("dependency job {dep} {s}")));
                    break;
                }
                Some(s) => {
                    blocked = Some(Ok(Wait::Dependency { on: *dep, state: s }));
                    break;
                }
                None => {
                    blocked = Some(Err(format!("dependency job {dep} does not exist")));
                    break;
                }
            }
        }
        match blocked {
            Some(Err(reason)) => {
                out.fail.push((job.id, reason));
                continue;
            }
            Some(Ok(w)) => {
                wait(w);
                continue;
            }
            None => {}
        }
        if let Some(until) = job.not_before.filter(|t| *t > input.now) {
            wait(Wait::Backoff { until });
            continue;
        }
        let n = job.spec.resources.gpus;
        let need = vram_need(job);
        let limits = cfg.limits_for(&job.owner.user);
        let user = per_user.entry(job.owner.user.as_str()).or_default();
        if let Some(what) = user.exceeds(&limits, n, need) {
            wait(Wait::UserLimit { what });
            continue;
        }

        if n == 0 {
            if cpu_used < input.max_cpu_jobs {
                cpu_used += 1;
                user.running += 1;
                out.start.push(Start {
                    id: job.id,
                    placement: Placement::default(),
                });
            } else if let Some(victim) = cfg
                .preemption
                .then(|| cpu_victim(&input.active, job, &preempted, &in_flight))
                .flatten()
            {
                preempted.insert(victim);
                out.preempt.push(Preempt {
                    victim,
                    for_job: job.id,
                });
                wait(Wait::Preempting {
                    victims: vec![victim],
                });
            } else {
                wait(Wait::CpuSlots {
                    max: input.max_cpu_jobs,
                });
            }
            continue;
        }

        let eligible: Vec<usize> = rooms
            .iter()
            .enumerate()
            .filter(|(_, r)| {
                r.allowed
                    && (job.spec.resources.only_gpus.is_empty()
                        || job
                            .spec
                            .resources
                            .only_gpus
                            .iter()
                            .any(|s| selects(s, r.info)))
            })
            .map(|(i, _)| i)
            .collect();
        if (eligible.len() as u32) < n {
            wait(Wait::NoGpus {
                need: n,
                eligible: eligible.len() as u32,
            });
            continue;
        }
        if let Some(victims) = in_flight.get(&job.id) {
            // Room is being made; keep others off the victims' GPUs meanwhile.
            for v in victims {
                if let Some(p) = input
                    .active
                    .iter()
                    .find(|a| a.id == *v)
                    .and_then(|a| a.placement.as_ref())
                {
                    for slot in &p.gpus {
                        if let Some(r) = rooms.iter_mut().find(|r| r.info.uuid == slot.uuid) {
                            r.held_for.get_or_insert(job.id);
                        }
                    }
                }
            }
            wait(Wait::Preempting {
                victims: victims.clone(),
            });
            continue;
        }

        let prefer = &job.spec.resources.prefer_gpus;
        let is_preferred = |r: &GpuRoom<'_>| prefer.iter().any(|s| selects(s, r.info));
        let mut candidates: Vec<usize> = eligible
            .iter()
            .copied()
            .filter(|&i| fits(&rooms[i], need) && rooms[i].held_for.is_none_or(|h| h == job.id))
            .collect();
        // A whole card counts against the owner's VRAM limit by its size (the limit check
        // above knows only sizes asked for in bytes): only cards that fit what is left of
        // the limit.
        if let (Some(max), Need::Whole) = (limits.max_vram, need) {
            let allowance = max.0.saturating_sub(user.vram) / u64::from(n.max(1));
            let before = candidates.len();
            candidates.retain(|&i| rooms[i].info.total_bytes <= allowance);
            if (candidates.len() as u32) < n && before as u32 >= n {
                wait(Wait::UserLimit {
                    what: format!(
                        "{} of {max} VRAM in use, and the whole GPUs free now are larger than \
                         the {} left",
                        ByteSize(user.vram),
                        ByteSize(allowance * u64::from(n))
                    ),
                });
                continue;
            }
        }
        // Best fit: preferred first, then the least room left after placing, then index.
        candidates.sort_by_key(|&i| {
            let r = &rooms[i];
            let after = match need {
                Need::Bytes(b) => r.room - b as i128,
                Need::Whole => 0,
            };
            (!is_preferred(r), after, r.info.index)
        });
        if candidates.len() as u32 >= n {
            let chosen = &candidates[..n as usize];
            let per_gpu = match need {
                Need::Bytes(b) => b,
                Need::Whole => chosen
                    .iter()
                    .map(|&i| rooms[i].room.max(0) as u64)
                    .min()
                    .unwrap_or(0),
            };
            for &i in chosen {
                rooms[i].room = match need {
                    Need::Bytes(_) => rooms[i].room - per_gpu as i128,
                    Need::Whole => rooms[i].room.min(0),
                };
                rooms[i].jobs += 1;
                rooms[i].exclusive |= need == Need::Whole;
            }
            user.running += 1;
            user.gpus += n;
            user.vram += match need {
                Need::Bytes(b) => b * u64::from(n),
                Need::Whole => chosen.iter().map(|&i| rooms[i].info.total_bytes).sum(),
            };
            let mut gpus: Vec<GpuSlot> = chosen
                .iter()
                .map(|&i| GpuSlot {
                    index: rooms[i].info.index,
                    uuid: rooms[i].info.uuid.clone(),
                })
                .collect();
            gpus.sort_by_key(|g| g.index);
            out.start.push(Start {
                id: job.id,
                placement: Placement {
                    gpus,
                    vram_per_gpu: per_gpu,
                    exclusive: need == Need::Whole,
                },
            });
            continue;
        }

        // It does not fit now. Preempt lower-priority work if that makes room.
        if cfg.preemption
            && let Some((gpu_ids, victims)) =
                gpu_victims(&rooms, &eligible, &input.active, job, need, &preempted)
        {
            for v in &victims {
                preempted.insert(*v);
                out.preempt.push(Preempt {
                    victim: *v,
                    for_job: job.id,
                });
            }
            for i in gpu_ids {
                rooms[i].held_for = Some(job.id);
            }
            wait(Wait::Preempting { victims });
            continue;
        }
        // Held GPUs block this job?
        if let Some(holder) = eligible
            .iter()
            .find(|&&i| fits(&rooms[i], need) && rooms[i].held_for.is_some_and(|h| h != job.id))
            .and_then(|&i| rooms[i].held_for)
        {
            wait(Wait::Held { for_job: holder });
            continue;
        }
        // Starving: hold the GPUs it will get so that smaller jobs stop backfilling onto them.
        if !held_one && input.now - queued_since(job) >= cfg.starvation_after.as_millis() as i64 {
            let mut could: Vec<usize> = eligible
                .iter()
                .copied()
                .filter(|&i| rooms[i].held_for.is_none() && ceiling_fits(&rooms[i], need))
                .collect();
            could.sort_by_key(|&i| (std::cmp::Reverse(rooms[i].room), rooms[i].info.index));
            if could.len() as u32 >= n {
                for &i in &could[..n as usize] {
                    rooms[i].held_for = Some(job.id);
                }
                held_one = true;
            }
        }
        // Not even empty GPUs would do (the inventory shrank after it was accepted).
        let could_ever = eligible
            .iter()
            .filter(|&&i| ceiling_fits(&rooms[i], need))
            .count() as u32;
        if could_ever < n {
            let largest = eligible
                .iter()
                .copied()
                .max_by_key(|&i| (rooms[i].ceiling, std::cmp::Reverse(rooms[i].info.index)));
            wait(Wait::TooBig {
                need,
                gpus: n,
                largest_gpu: largest.map(|i| rooms[i].info.index),
                largest: largest.map_or(0, |i| rooms[i].ceiling.max(0) as u64),
            });
            continue;
        }
        let best = eligible
            .iter()
            .copied()
            .max_by_key(|&i| (rooms[i].room, std::cmp::Reverse(rooms[i].info.index)));
        wait(Wait::Vram {
            need,
            gpus: n,
            best_gpu: best.map(|i| rooms[i].info.index),
            best_free: best.map_or(0, |i| rooms[i].room.max(0) as u64),
        });
    }
    out
}

fn ceiling_fits(r: &GpuRoom<'_>, need: Need) -> bool {
    match need {
        Need::Bytes(b) => r.ceiling >= b as i128,
        Need::Whole => r.ceiling > 0,
    }
}

fn queued_since(job: &JobRecord) -> Millis {
    if job.queued_at > 0 {
        job.queued_at
    } else {
        job.submitted_at
    }
}

#[derive(Debug, Default)]
struct UserUse {
    running: u32,
    gpus: u32,
    vram: u64,
}

impl UserUse {
    fn exceeds(&self, l: &UserLimits, gpus: u32, need: Need) -> Option<String> {
        if let Some(max) = l.max_running
            && self.running >= max
        {
            return Some(format!("{} of {max} running jobs", self.running));
        }
        if let Some(max) = l.max_gpus
            && self.gpus + gpus > max
        {
            return Some(format!(
                "{} of {max} GPUs in use, job needs {gpus}",
                self.gpus
            ));
        }
        if let (Some(max), Need::Bytes(b)) = (l.max_vram, need) {
            let want = b * gpus as u64;
            if self.vram + want > max.0 {
                return Some(format!(
                    "{} of {max} VRAM in use, job needs {}",
                    ByteSize(self.vram),
                    ByteSize(want)
                ));
            }
        }
        None
    }
}

/// The lowest-priority, most recently started CPU job below `job`'s priority.
fn cpu_victim(
    active: &[&JobRecord],
    job: &JobRecord,
    taken: &BTreeSet<JobId>,
    in_flight: &BTreeMap<JobId, Vec<JobId>>,
) -> Option<JobId> {
    if in_flight.contains_key(&job.id) {
        return None;
    }
    active
        .iter()
        .filter(|a| {
            a.priority < job.priority
                && a.stop.is_none()
                && !taken.contains(&a.id)
                && a.placement.as_ref().is_none_or(|p| p.gpus.is_empty())
        })
        .min_by_key(|a| (a.priority, std::cmp::Reverse(a.started_at.unwrap_or(0))))
        .map(|a| a.id)
}

/// The cheapest set of lower-priority running jobs whose removal lets `job` fit on `n` GPUs:
/// lowest maximum victim priority first, then fewest victims. Returns the GPUs and victims.
fn gpu_victims(
    rooms: &[GpuRoom<'_>],
    eligible: &[usize],
    active: &[&JobRecord],
    job: &JobRecord,
    need: Need,
    taken: &BTreeSet<JobId>,
) -> Option<(Vec<usize>, Vec<JobId>)> {
    let n = job.spec.resources.gpus as usize;
    // Per GPU: victims needed (sorted cheapest first) or None if impossible.
    let mut options: Vec<(i32, usize, usize, Vec<JobId>)> = Vec::new();
    for &i in eligible {
        let r = &rooms[i];
        if r.held_for.is_some_and(|h| h != job.id) || !ceiling_fits(r, need) {
            continue;
        }
        if fits(r, need) {
            options.push((i32::MIN, 0, i, Vec::new()));
            continue;
        }
        let mut on_gpu: Vec<&&JobRecord> = active
            .iter()
            .filter(|a| {
                a.placement
                    .as_ref()
                    .is_some_and(|p| p.gpus.iter().any(|s| s.uuid == r.info.uuid))
            })
            .collect();
        // Every job on the GPU must be preemptable for a whole-card need; for bytes, only
        // enough of them.
        if on_gpu
            .iter()
            .any(|a| (a.priority >= job.priority || a.stop.is_some()) && need == Need::Whole)
        {
            continue;
        }
        on_gpu.retain(|a| a.priority < job.priority && a.stop.is_none() && !taken.contains(&a.id));
        on_gpu.sort_by_key(|a| (a.priority, std::cmp::Reverse(a.started_at.unwrap_or(0))));
        let mut room = r.room;
        let mut exclusive = r.exclusive;
        let mut jobs = r.jobs;
        let mut victims = Vec::new();
        let mut max_prio = i32::MIN;
        for a in on_gpu {
            let fits_now = match need {
                Need::Bytes(b) => !exclusive && room >= b as i128,
                Need::Whole => jobs == 0,
            };
            if fits_now {
                break;
            }
            let p = a.placement.as_ref().expect("filtered on placement");
            room += p.vram_per_gpu as i128;
            jobs -= 1;
            if p.exclusive {
                exclusive = false;
            }
            victims.push(a.id);
            max_prio = max_prio.max(a.priority);
        }
        let ok = match need {
            Need::Bytes(b) => !exclusive && room >= b as i128,
            Need::Whole => jobs == 0,
        };
        if ok {
            options.push((max_prio, victims.len(), i, victims));
        }
    }
    if options.len() < n {
        return None;
    }
    options.sort_by_key(|(p, count, i, _)| (*p, *count, *i));
    let chosen = &options[..n];
    let mut victims: Vec<JobId> = chosen.iter().flat_map(|o| o.3.iter().copied()).collect();
    if victims.is_empty() {
        return None;
    }
    victims.sort_unstable();
    victims.dedup();
    Some((chosen.iter().map(|o| o.2).collect(), victims))
}

/// Can the job ever run on this inventory (ignoring what runs now)? `Err` says why not, with
/// the numbers; used to refuse impossible jobs at submit.
pub fn feasible(
    rec: &JobRecord,
    gpus: &[GpuInfo],
    cfg: &SchedulerConfig,
    source_note: Option<&str>,
) -> Result<(), String> {
    let n = rec.spec.resources.gpus;
    if n == 0 {
        return Ok(());
    }
    // The owner's own limits: a job beyond them would wait forever.
    let limits = cfg.limits_for(&rec.owner.user);
    let user = &rec.owner.user;
    if let Some(max) = limits.max_gpus
        && n > max
    {
        return Err(format!(
            "the job needs {n} GPUs but {user} may hold at most {max} at once (scheduler limits)"
        ));
    }
    if let (Some(max), Need::Bytes(b)) = (limits.max_vram, vram_need(rec))
        && b * n as u64 > max.0
    {
        return Err(format!(
            "the job needs {} of VRAM but {user} may hold at most {max} at once (scheduler limits)",
            ByteSize(b * n as u64)
        ));
    }
    let eligible: Vec<&GpuInfo> = gpus
        .iter()
        .filter(|g| cfg.allowed_gpus.is_empty() || cfg.allowed_gpus.iter().any(|s| selects(s, g)))
        .filter(|g| {
            rec.spec.resources.only_gpus.is_empty()
                || rec.spec.resources.only_gpus.iter().any(|s| selects(s, g))
        })
        .collect();
    if gpus.is_empty() {
        return Err(format!(
            "the job needs {n} GPU{} but this machine has none{}",
            if n == 1 { "" } else { "s" },
            source_note.map(|s| format!(" ({s})")).unwrap_or_default()
        ));
    }
    let unknown: Vec<String> = rec
        .spec
        .resources
        .only_gpus
        .iter()
        .filter(|s| !gpus.iter().any(|g| selects(s, g)))
        .map(ToString::to_string)
        .collect();
    // Even when the others are enough: a misspelt UUID is a mistake to name now, not a
    // preference that silently never applies.
    if !unknown.is_empty() {
        return Err(format!(
            "resources.only_gpus names {} that this machine does not have (its GPUs are {})",
            unknown.join(", "),
            gpus.iter()
                .map(|g| g.index.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    if (eligible.len() as u32) < n {
        return Err(format!(
            "the job needs {n} GPUs but only {} of the {} GPUs are eligible (only_gpus / allowed_gpus)",
            eligible.len(),
            gpus.len()
        ));
    }
    // Whole cards count against the owner's VRAM limit by their size: with none of the
    // eligible cards small enough, the job could never start.
    if let (Some(max), Need::Whole) = (limits.max_vram, vram_need(rec)) {
        let allowance = max.0 / u64::from(n.max(1));
        let small = eligible
            .iter()
            .filter(|g| g.total_bytes <= allowance)
            .count();
        if (small as u32) < n {
            let smallest = eligible.iter().map(|g| g.total_bytes).min().unwrap_or(0);
            return Err(format!(
                "the job takes {n} whole GPU{}, which count against {user}'s VRAM limit ({max}, \
                 scheduler limits) by their size, and the smallest eligible GPU has {}: ask for \
                 a VRAM amount instead of a whole card",
                if n == 1 { "" } else { "s" },
                ByteSize(smallest)
            ));
        }
    }
    if let Need::Bytes(b) = vram_need(rec) {
        let mut caps: Vec<u64> = eligible
            .iter()
            .map(|g| g.total_bytes.saturating_sub(cfg.vram_margin))
            .collect();
        caps.sort_unstable_by(|a, b| b.cmp(a));
        let nth = caps[n as usize - 1];
        if b > nth && n > 1 && b <= caps[0] {
            // Some GPUs are big enough, just not n of them.
            let big = caps.iter().filter(|c| **c >= b).count();
            return Err(format!(
                "the job needs {} on each of {n} GPUs but only {big} eligible GPU{} {} that much \
                 (after the {} safety margin); the next largest has {} usable",
                ByteSize(b),
                if big == 1 { "" } else { "s" },
                if big == 1 { "has" } else { "have" },
                ByteSize(cfg.vram_margin),
                ByteSize(caps[big]),
            ));
        }
        if b > nth {
            let largest = eligible.iter().map(|g| g.total_bytes).max().unwrap_or(0);
            return Err(format!(
                "the job needs {} per GPU on {n} GPU{} but the largest eligible GPU has {} ({} usable after the {} safety margin)",
                ByteSize(b),
                if n == 1 { "" } else { "s" },
                ByteSize(largest),
                ByteSize(caps[0]),
                ByteSize(cfg.vram_margin),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::tests::sample_record;
    use std::time::Duration;

    const GIB: u64 = 1 << 30;

    fn gpu(index: u32, total_gib: u64, foreign_gib: u64) -> GpuInfo {
        GpuInfo {
            index,
            uuid: format!("GPU-{index}"),
            name: "test".into(),
            pci_bus_id: None,
            total_bytes: total_gib * GIB,
            free_bytes: None,
            foreign_bytes: foreign_gib * GIB,
            compute_capability: None,
            utilization_percent: None,
        }
    }

    fn cfg() -> SchedulerConfig {
        SchedulerConfig {
            vram_margin: 0,
            ..SchedulerConfig::default()
        }
    }

    /// A queued job needing `gpus` × `vram_gib`, submitted at `t`.
    fn job(id: JobId, gpus: u32, vram_gib: u64, t: Millis) -> JobRecord {
        let mut r = sample_record(id);
        r.id = id;
        r.spec.resources.gpus = gpus;
        if gpus > 0 {
            r.spec.resources.vram = VramRequest::PerGpu(ByteSize(vram_gib * GIB));
        }
        r.submitted_at = t;
        r.queued_at = t;
        r
    }

    fn running(mut r: JobRecord, gpu_indices: &[u32]) -> JobRecord {
        r.state = JobState::Running;
        let per = match vram_need(&r) {
            Need::Bytes(b) => b,
            Need::Whole => 0,
        };
        r.placement = Some(Placement {
            gpus: gpu_indices
                .iter()
                .map(|i| GpuSlot {
                    index: *i,
                    uuid: format!("GPU-{i}"),
                })
                .collect(),
            vram_per_gpu: per,
            exclusive: false,
        });
        r.started_at = Some(1);
        r
    }

    struct World {
        queued: Vec<JobRecord>,
        active: Vec<JobRecord>,
        gpus: Vec<GpuInfo>,
        cfg: SchedulerConfig,
        usage: HashMap<String, f64>,
        now: Millis,
        cpu: u32,
    }

    impl World {
        fn new(gpus: Vec<GpuInfo>) -> Self {
            World {
                queued: vec![],
                active: vec![],
                gpus,
                cfg: cfg(),
                usage: HashMap::new(),
                now: 1_000,
                cpu: 2,
            }
        }
        fn plan(&self) -> Plan {
            let all: Vec<&JobRecord> = self.queued.iter().chain(self.active.iter()).collect();
            let state_of = |id: JobId| all.iter().find(|j| j.id == id).map(|j| j.state);
            plan(&PlanInput {
                now: self.now,
                queued: self.queued.iter().collect(),
                active: self.active.iter().collect(),
                state_of: &state_of,
                gpus: &self.gpus,
                cfg: &self.cfg,
                max_cpu_jobs: self.cpu,
                usage: &self.usage,
            })
        }
    }

    fn started(p: &Plan) -> Vec<(JobId, Vec<u32>)> {
        p.start
            .iter()
            .map(|s| (s.id, s.placement.gpus.iter().map(|g| g.index).collect()))
            .collect()
    }

    #[test]
    fn two_small_jobs_share_one_gpu() {
        let mut w = World::new(vec![gpu(0, 24, 0)]);
        w.queued = vec![job(1, 1, 10, 1), job(2, 1, 10, 2), job(3, 1, 10, 3)];
        let p = w.plan();
        assert_eq!(started(&p), vec![(1, vec![0]), (2, vec![0])]);
        assert!(matches!(p.waiting[&3].wait, Wait::Vram { best_free, .. } if best_free == 4 * GIB));
    }

    #[test]
    fn best_fit_limits_fragmentation() {
        // 10 GiB fits on both; best fit picks the fuller 24 GiB card and keeps the 80 GiB free.
        let mut w = World::new(vec![gpu(0, 80, 0), gpu(1, 24, 0)]);
        w.queued = vec![job(1, 1, 10, 1), job(2, 1, 70, 2)];
        assert_eq!(started(&w.plan()), vec![(1, vec![1]), (2, vec![0])]);
    }

    #[test]
    fn large_job_waits_for_the_big_card_and_foreign_use_counts() {
        let mut w = World::new(vec![gpu(0, 24, 0), gpu(1, 80, 60)]);
        w.queued = vec![job(1, 1, 30, 1)];
        let p = w.plan();
        assert!(p.start.is_empty());
        // Other programs hold so much of the big card that no GPU could take it now: said so.
        assert_eq!(
            p.waiting[&1].wait,
            Wait::TooBig {
                need: Need::Bytes(30 * GIB),
                gpus: 1,
                largest_gpu: Some(0),
                largest: 24 * GIB
            }
        );
        assert!(p.waiting[&1].wait.long(0).contains("cannot start unless"));
        w.gpus[1].foreign_bytes = 10 * GIB;
        assert_eq!(started(&w.plan()), vec![(1, vec![1])]);
    }

    #[test]
    fn safety_margin_is_kept() {
        let mut w = World::new(vec![gpu(0, 24, 0)]);
        w.cfg.vram_margin = GIB;
        w.queued = vec![job(1, 1, 24, 1)];
        assert!(w.plan().start.is_empty());
        w.queued = vec![job(1, 1, 23, 1)];
        assert_eq!(started(&w.plan()).len(), 1);
    }

    #[test]
    fn multi_gpu_jobs_get_distinct_gpus() {
        let mut w = World::new(vec![gpu(0, 24, 0), gpu(1, 24, 0), gpu(2, 24, 0)]);
        w.queued = vec![job(1, 2, 20, 1), job(2, 2, 20, 2)];
        let p = w.plan();
        assert_eq!(started(&p), vec![(1, vec![0, 1])]);
        assert!(matches!(p.waiting[&2].wait, Wait::Vram { gpus: 2, .. }));
    }

    #[test]
    fn allow_lists_and_preferences() {
        let mut w = World::new(vec![gpu(0, 24, 0), gpu(1, 24, 0), gpu(2, 24, 0)]);
        let mut a = job(1, 1, 5, 1);
        a.spec.resources.only_gpus = vec![GpuSelector::Index(2)];
        let mut b = job(2, 1, 5, 2);
        b.spec.resources.prefer_gpus = vec![GpuSelector::Uuid("gpu-1".into())];
        w.queued = vec![a, b];
        assert_eq!(started(&w.plan()), vec![(1, vec![2]), (2, vec![1])]);
        w.cfg.allowed_gpus = vec![GpuSelector::Index(0)];
        let p = w.plan();
        assert_eq!(started(&p), vec![(2, vec![0])]);
        assert_eq!(
            p.waiting[&1].wait,
            Wait::NoGpus {
                need: 1,
                eligible: 0
            }
        );
    }

    #[test]
    fn priority_first_then_fifo() {
        let mut w = World::new(vec![gpu(0, 24, 0)]);
        let mut hi = job(3, 1, 20, 30);
        hi.priority = 10;
        w.queued = vec![job(1, 1, 20, 10), job(2, 1, 20, 20), hi];
        let p = w.plan();
        assert_eq!(started(&p), vec![(3, vec![0])]);
        // Job 3 started: it is no longer in line ahead of them (QA: explain said "1 job is
        // ahead" of the only job left waiting).
        assert_eq!(p.waiting[&1].ahead, 0);
        assert_eq!(p.waiting[&2].ahead, 1);
    }

    #[test]
    fn backfill_until_the_head_starves() {
        let mut w = World::new(vec![gpu(0, 24, 0)]);
        w.active = vec![running(job(9, 1, 16, 0), &[0])];
        // The head needs 20 GiB (8 free); a 4 GiB job behind it may backfill.
        w.queued = vec![job(1, 1, 20, 900), job(2, 1, 4, 950)];
        w.cfg.starvation_after = Duration::from_secs(60);
        assert_eq!(started(&w.plan()), vec![(2, vec![0])]);
        // Once the head has waited past the limit, the GPU is held for it.
        w.now = 900 + 61_000;
        let p = w.plan();
        assert!(p.start.is_empty(), "{p:?}");
        assert_eq!(p.waiting[&2].wait, Wait::Held { for_job: 1 });
    }

    #[test]
    fn fair_share_among_equal_priority() {
        let mut w = World::new(vec![gpu(0, 24, 0)]);
        let mut heavy = job(1, 1, 20, 1);
        heavy.owner.user = "heavy".into();
        let mut light = job(2, 1, 20, 2);
        light.owner.user = "light".into();
        w.queued = vec![heavy, light];
        w.usage.insert("heavy".into(), 3600.0);
        assert_eq!(started(&w.plan()), vec![(2, vec![0])]);
    }

    #[test]
    fn user_limits() {
        let mut w = World::new(vec![gpu(0, 80, 0)]);
        w.cfg.default_limits = UserLimits {
            max_running: Some(1),
            ..Default::default()
        };
        w.queued = vec![job(1, 1, 10, 1), job(2, 1, 10, 2)];
        let p = w.plan();
        assert_eq!(started(&p), vec![(1, vec![0])]);
        assert!(
            matches!(&p.waiting[&2].wait, Wait::UserLimit { what } if what.contains("1 of 1 running"))
        );
        w.cfg.default_limits = UserLimits {
            max_vram: Some(ByteSize(15 * GIB)),
            ..Default::default()
        };
        let p = w.plan();
        assert_eq!(started(&p), vec![(1, vec![0])]);
        assert!(matches!(&p.waiting[&2].wait, Wait::UserLimit { what } if what.contains("VRAM")));
    }

    #[test]
    fn dependencies_wait_or_fail() {
        let mut w = World::new(vec![]);
        let mut dep = job(1, 0, 0, 1);
        dep.state = JobState::Running;
        let mut a = job(2, 0, 0, 2);
        a.spec.depends_on = vec![1];
        w.active = vec![dep];
        w.queued = vec![a.clone()];
        assert_eq!(
            w.plan().waiting[&2].wait,
            Wait::Dependency {
                on: 1,
                state: JobState::Running
            }
        );
        w.active[0].state = JobState::Failed;
        assert_eq!(
            w.plan().fail,
            vec![(2, "dependency job 1 failed".to_string())]
        );
        w.active[0].state = JobState::Succeeded;
        assert_eq!(started(&w.plan()), vec![(2, vec![])]);
    }

    #[test]
    fn cpu_jobs_use_slots_and_never_wait_behind_gpu_jobs() {
        let mut w = World::new(vec![gpu(0, 24, 0)]);
        w.cpu = 1;
        w.queued = vec![job(1, 1, 30, 1), job(2, 0, 0, 2), job(3, 0, 0, 3)];
        let p = w.plan();
        assert_eq!(started(&p), vec![(2, vec![])]);
        assert_eq!(p.waiting[&3].wait, Wait::CpuSlots { max: 1 });
    }

    #[test]
    fn backoff_holds_a_retry() {
        let mut w = World::new(vec![]);
        let mut a = job(1, 0, 0, 1);
        a.not_before = Some(5_000);
        w.queued = vec![a];
        assert_eq!(w.plan().waiting[&1].wait, Wait::Backoff { until: 5_000 });
        w.now = 5_000;
        assert_eq!(started(&w.plan()).len(), 1);
    }

    #[test]
    fn preemption_picks_few_and_low() {
        let mut w = World::new(vec![gpu(0, 24, 0), gpu(1, 24, 0)]);
        let mut low = running(job(1, 1, 12, 0), &[0]);
        low.priority = -5;
        let mut mid = running(job(2, 1, 12, 0), &[0]);
        mid.priority = 0;
        let mut mid2 = running(job(3, 1, 20, 0), &[1]);
        mid2.priority = 0;
        w.active = vec![low, mid, mid2];
        let mut hi = job(4, 1, 12, 5);
        hi.priority = 10;
        w.queued = vec![hi];
        let p = w.plan();
        assert_eq!(
            p.preempt,
            vec![Preempt {
                victim: 1,
                for_job: 4
            }]
        );
        assert_eq!(p.waiting[&4].wait, Wait::Preempting { victims: vec![1] });
        // While that preemption is under way, nothing more is preempted for it.
        w.active[0].stop = Some(StopKind::Preempt { for_job: 4 });
        let p = w.plan();
        assert!(p.preempt.is_empty());
        assert_eq!(p.waiting[&4].wait, Wait::Preempting { victims: vec![1] });
    }

    #[test]
    fn no_preemption_of_equal_priority_or_when_disabled() {
        let mut w = World::new(vec![gpu(0, 24, 0)]);
        w.active = vec![running(job(1, 1, 20, 0), &[0])];
        w.queued = vec![job(2, 1, 20, 5)];
        assert!(w.plan().preempt.is_empty());
        w.queued[0].priority = 1;
        assert_eq!(w.plan().preempt.len(), 1);
        w.cfg.preemption = false;
        assert!(w.plan().preempt.is_empty());
    }

    #[test]
    fn whole_card_jobs_are_exclusive() {
        let mut w = World::new(vec![gpu(0, 24, 0)]);
        let mut whole = job(1, 1, 0, 1);
        whole.spec.resources.vram = VramRequest::Auto;
        w.queued = vec![whole, job(2, 1, 1, 2)];
        let p = w.plan();
        assert_eq!(started(&p), vec![(1, vec![0])]);
        assert!(p.start[0].placement.exclusive);
        assert_eq!(p.start[0].placement.vram_per_gpu, 24 * GIB);
    }

    /// Whole cards of different sizes: each is full, not just the smallest one's room (a job
    /// on 24 + 80 GiB cards used to leave "56GiB free" on the 80 GiB one in `explain`), in
    /// the round that starts it and in later rounds.
    #[test]
    fn whole_cards_of_different_sizes_are_full() {
        let mut w = World::new(vec![gpu(0, 24, 0), gpu(1, 80, 0)]);
        let mut whole = job(1, 2, 0, 1);
        whole.spec.resources.vram = VramRequest::Auto;
        w.queued = vec![whole.clone(), job(2, 1, 8, 2)];
        let p = w.plan();
        assert_eq!(started(&p), vec![(1, vec![0, 1])]);
        assert_eq!(p.start[0].placement.vram_per_gpu, 24 * GIB);
        assert!(
            matches!(p.waiting[&2].wait, Wait::Vram { best_free: 0, .. }),
            "{p:?}"
        );
        let mut held = running(whole, &[0, 1]);
        held.placement.as_mut().unwrap().exclusive = true;
        held.placement.as_mut().unwrap().vram_per_gpu = 24 * GIB;
        w.active = vec![held];
        w.queued = vec![job(2, 1, 8, 2)];
        let p = w.plan();
        assert!(p.start.is_empty(), "{p:?}");
        assert!(
            matches!(p.waiting[&2].wait, Wait::Vram { best_free: 0, .. }),
            "{p:?}"
        );
    }

    /// A whole card counts against max_vram by its size (it used to bypass the limit: only
    /// sizes in bytes were checked).
    #[test]
    fn a_whole_card_counts_against_the_vram_limit() {
        let mut w = World::new(vec![gpu(0, 80, 0), gpu(1, 24, 0)]);
        w.cfg.default_limits.max_vram = Some(ByteSize::gib(30));
        let mut whole = job(1, 1, 0, 1);
        whole.spec.resources.vram = VramRequest::Auto;
        whole.spec.resources.only_gpus = vec![crate::spec::job::GpuSelector::Index(0)];
        w.queued = vec![whole.clone()];
        let p = w.plan();
        assert!(p.start.is_empty(), "{p:?}");
        assert!(
            matches!(&p.waiting[&1].wait, Wait::UserLimit { what } if what.contains("larger than the 30GiB left")),
            "{p:?}"
        );
        // The 24 GiB card fits the limit.
        whole.spec.resources.only_gpus.clear();
        w.queued = vec![whole.clone()];
        assert_eq!(started(&w.plan()), vec![(1, vec![1])]);

        // By its size, not by the room other processes leave on it (QA: a 24 GiB card with
        // 10 GiB in foreign use passed a 20 GiB limit, and kept counting as 13.5 GiB).
        let mut w = World::new(vec![gpu(0, 24, 10)]);
        w.cfg.default_limits.max_vram = Some(ByteSize::gib(20));
        w.queued = vec![whole.clone()];
        assert!(w.plan().start.is_empty());
        let e = feasible(&whole, &w.gpus, &w.cfg, None).unwrap_err();
        assert!(
            e.contains("count against") && e.contains("smallest eligible GPU has 24GiB"),
            "{e}"
        );
        // A running whole-card job counts its card's size: nothing more fits a 30 GiB limit.
        let mut w = World::new(vec![gpu(0, 24, 10), gpu(1, 80, 0)]);
        w.cfg.default_limits.max_vram = Some(ByteSize::gib(30));
        let p = {
            w.queued = vec![whole.clone()];
            w.plan()
        };
        assert_eq!(started(&p), vec![(1, vec![0])]);
        let mut running = whole;
        running.state = JobState::Running;
        running.placement = Some(p.start[0].placement.clone());
        w.active = vec![running];
        w.queued = vec![job(2, 1, 8, 0)];
        let p = w.plan();
        assert!(p.start.is_empty(), "24 + 8 > 30: {p:?}");
    }

    #[test]
    fn impossible_jobs_are_refused_with_numbers() {
        let gpus = vec![gpu(0, 24, 0), gpu(1, 80, 0)];
        let c = cfg();
        assert!(feasible(&job(1, 1, 30, 0), &gpus, &c, None).is_ok());
        let e = feasible(&job(1, 1, 100, 0), &gpus, &c, None).unwrap_err();
        assert!(e.contains("100GiB") && e.contains("80GiB"), "{e}");
        // One GPU is big enough, the other not: say so, not "the largest has 80GiB".
        let e = feasible(&job(1, 2, 30, 0), &gpus, &c, None).unwrap_err();
        assert!(
            e.contains("30GiB on each of 2 GPUs but only 1 eligible GPU has that much"),
            "{e}"
        );
        let e = feasible(&job(1, 2, 100, 0), &gpus, &c, None).unwrap_err();
        assert!(
            e.contains("100GiB per GPU on 2 GPUs") && e.contains("80GiB"),
            "{e}"
        );
        let e = feasible(&job(1, 3, 1, 0), &gpus, &c, None).unwrap_err();
        assert!(e.contains("only 2 of the 2"), "{e}");
        let mut limited = cfg();
        limited.default_limits.max_gpus = Some(1);
        limited.default_limits.max_vram = Some(ByteSize::gib(30));
        let e = feasible(&job(1, 2, 10, 0), &gpus, &limited, None).unwrap_err();
        assert!(e.contains("may hold at most 1 at once"), "{e}");
        let e = feasible(&job(1, 1, 40, 0), &gpus, &limited, None).unwrap_err();
        assert!(
            e.contains("needs 40GiB of VRAM") && e.contains("at most 30GiB"),
            "{e}"
        );
        assert!(feasible(&job(1, 1, 30, 0), &gpus, &limited, None).is_ok());
        let mut seven = job(1, 1, 1, 0);
        seven.spec.resources.only_gpus = vec![crate::spec::job::GpuSelector::Index(7)];
        let e = feasible(&seven, &gpus, &c, None).unwrap_err();
        assert!(
            e.contains("only_gpus names 7 that this machine does not have (its GPUs are 0, 1)"),
            "{e}"
        );
        // A misspelt selector beside one that is there is named too (it used to be ignored).
        seven
            .spec
            .resources
            .only_gpus
            .insert(0, crate::spec::job::GpuSelector::Index(1));
        let e = feasible(&seven, &gpus, &c, None).unwrap_err();
        assert!(e.contains("only_gpus names 7"), "{e}");
        let e = feasible(&job(1, 1, 1, 0), &[], &c, Some("no NVML")).unwrap_err();
        assert!(e.contains("has none (no NVML)"), "{e}");
    }
}
