//! Queue benchmarks (not tests): `cargo bench --bench queue`.
//!
//! 1. The live daemon (the real `jobd` binary, unix socket): durable submits per second at
//!    several client concurrencies (every answered submit is flushed to disk), and submit →
//!    running latency percentiles on an idle daemon (from the client's submit call to the job's
//!    process writing its first line), and a 256-job sweep in one request against the same jobs
//!    submitted one by one.
//! 2. The scheduler's policy on a seeded synthetic trace replayed through the real
//!    `sched::plan::plan` on a simulated clock, against a FIFO first-fit baseline (strict
//!    arrival order, head-of-line blocking, first GPUs that fit — what GPU-aware task spoolers
//!    do): VRAM-time utilisation, mean job completion time, and the cost of one `plan` call.
//!
//! The trace generator (documented in `Trace::generate`): Poisson arrivals; per-GPU VRAM drawn
//! from four size classes; 1, 2 or 4 GPUs; log-normal durations; 10% high-priority jobs.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use jobd::client::{Client, Endpoint};
use jobd::config::SchedulerConfig;
use jobd::gpu::GpuInfo;
use jobd::sched::plan::{PlanInput, plan};
use jobd::spec::api::{JobView, SubmitRequest, SweepRequest, SweepView};
use jobd::spec::job::{CommandSpec, JobSpec, Resources, RetrySpec, VramRequest};
use jobd::spec::record::{Placement, StopKind};
use jobd::spec::sweep::SweepAxis;
use jobd::spec::units::ByteSize;
use jobd::spec::{JobId, JobKind, JobRecord, JobState, Millis, Owner};

const GIB: u64 = 1 << 30;

fn main() {
    // `cargo test --all-targets` builds and runs bench targets too: do nothing unless benching.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let only = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    if only.as_deref().is_none_or(|o| o == "daemon") {
        daemon_bench();
    }
    if only.as_deref().is_none_or(|o| o == "trace") {
        trace_bench();
    }
}

// ---- live daemon --------------------------------------------------------------------------

struct Daemon {
    child: std::process::Child,
    _dir: tempfile::TempDir,
    socket: std::path::PathBuf,
    dir: std::path::PathBuf,
}

impl Daemon {
    fn start(extra: &[&str]) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let socket = state.join("jobd.sock");
        let child = Command::new(env!("CARGO_BIN_EXE_jobd"))
            .arg("--state-dir")
            .arg(&state)
            .args(extra)
            .env("JOBD_LOG", "warn")
            .stderr(Stdio::null())
            .spawn()
            .expect("start jobd");
        let t = Instant::now();
        while std::os::unix::net::UnixStream::connect(&socket).is_err() {
            assert!(t.elapsed() < Duration::from_secs(20), "jobd did not start");
            std::thread::sleep(Duration::from_millis(10));
        }
        Daemon {
            child,
            socket,
            dir: dir.path().to_path_buf(),
            _dir: dir,
        }
    }

    fn client(&self) -> Client {
        Client::new(Endpoint::Unix(self.socket.clone()), None)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
    }
}

fn request(toml: &str, base: &Path) -> SubmitRequest {
    SubmitRequest {
        toml: toml.to_string(),
        base_dir: Some(base.to_path_buf()),
        source_path: None,
        hold: false,
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn daemon_bench() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    println!("== live daemon (unix socket, every submit flushed before the answer)");
    println!(
        "{:<28} {:>12} {:>14}",
        "clients × submits", "submits/s", "mean latency"
    );
    for (clients, per_client) in [(1usize, 300usize), (4, 150), (16, 60)] {
        // One CPU slot held by a blocker: the benchmark's jobs stay queued (pure queue work).
        let d = Daemon::start(&["--gpus", "none", "--max-cpu-jobs", "1"]);
        let base = d.dir.clone();
        rt.block_on(async {
            let c = d.client();
            let _: JobView = c
                .post(
                    "/jobs",
                    &request(
                        "kind = \"command\"\n[command]\nargv = [\"sleep\", \"600\"]\n",
                        &base,
                    ),
                )
                .await
                .unwrap();
            let job = "kind = \"command\"\n[command]\nargv = [\"true\"]\n";
            let start = Instant::now();
            let mut tasks = Vec::new();
            for _ in 0..clients {
                let c = d.client();
                let base = base.clone();
                tasks.push(tokio::spawn(async move {
                    for _ in 0..per_client {
                        let _: JobView = c.post("/jobs", &request(job, &base)).await.unwrap();
                    }
                }));
            }
            for t in tasks {
                t.await.unwrap();
            }
            let secs = start.elapsed().as_secs_f64();
            let n = clients * per_client;
            println!(
                "{:<28} {:>12.0} {:>11.2} ms",
                format!("{clients} × {per_client}"),
                n as f64 / secs,
                secs * 1000.0 * clients as f64 / n as f64
            );
        });
    }

    // A sweep of 256 jobs in one request (one transaction, one flush) against the same 256
    // jobs submitted one by one (what a shell loop over `jobctl submit --set` does).
    {
        let d = Daemon::start(&["--gpus", "none", "--max-cpu-jobs", "1"]);
        let base = d.dir.clone();
        rt.block_on(async {
            let c = d.client();
            let job = "kind = \"command\"\n[command]\nargv = [\"true\"]\n";
            let hold = |mut r: SubmitRequest| {
                r.hold = true;
                r
            };
            let start = Instant::now();
            for i in 0..256 {
                let text = format!("{job}env = {{ I = \"{i}\" }}\n");
                let _: JobView = c.post("/jobs", &hold(request(&text, &base))).await.unwrap();
            }
            let one_by_one = start.elapsed().as_secs_f64();
            let sweep = SweepRequest {
                job: hold(request(job, &base)),
                sweep: vec![SweepAxis {
                    key: "command.env.I".into(),
                    values: (0..256).map(|i| i.to_string()).collect(),
                }],
            };
            let mut times = Vec::new();
            for _ in 0..5 {
                let start = Instant::now();
                let v: SweepView = c.post("/sweeps", &sweep).await.unwrap();
                assert_eq!(v.jobs.len(), 256);
                times.push(start.elapsed().as_secs_f64());
            }
            times.sort_by(f64::total_cmp);
            println!(
                "\n256 jobs: one sweep (POST /sweeps, median of 5) {:.1} ms   one by one (256 × POST \
                 /jobs) {:.1} ms",
                times[2] * 1000.0,
                one_by_one * 1000.0
            );
        });
    }

    // Submit → running on an idle daemon: the job's first action stamps the clock.
    let d = Daemon::start(&["--gpus", "fake:24GiB"]);
    let base = d.dir.clone();
    let mut lat = Vec::new();
    rt.block_on(async {
        let c = d.client();
        for _ in 0..200 {
            let job = "kind = \"command\"\n[resources]\ngpus = 1\nvram = \"1GiB\"\n[command]\nargv = [\"/bin/date\", \"+%s%N\"]\n";
            let t0 = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as f64;
            let v: JobView = c.post("/jobs", &request(job, &base)).await.unwrap();
            let out = base.join(format!("state/jobs/{}/stdout.log", v.record.id));
            let started = loop {
                if let Ok(s) = std::fs::read_to_string(&out)
                    && let Ok(ns) = s.trim().parse::<f64>()
                {
                    break ns;
                }
                tokio::time::sleep(Duration::from_micros(200)).await;
            };
            lat.push((started - t0) / 1e6);
        }
    });
    lat.sort_by(f64::total_cmp);
    println!(
        "\nsubmit → running (GPU job on an idle daemon, client call to the job's first instruction), 200 jobs:\n  \
         p50 {:.1} ms   p90 {:.1} ms   p99 {:.1} ms   max {:.1} ms",
        percentile(&lat, 0.5),
        percentile(&lat, 0.9),
        percentile(&lat, 0.99),
        lat.last().unwrap()
    );
    println!(
        "  reference (../shared/docs/landscape.md, Slurm 22.05 on a 2-core VM): sbatch 12–72 ms, ~70 submits/s \
         from one client, 0.35 s submit → COMPLETED; pueue polls every 300 ms"
    );
}

// ---- trace replay -------------------------------------------------------------------------

/// A tiny deterministic generator (SplitMix64), so the trace is the same on every machine.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    fn normal(&mut self) -> f64 {
        let (u, v) = (self.unit().max(1e-12), self.unit());
        (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
    }
}

#[derive(Debug, Clone)]
struct TraceJob {
    id: JobId,
    arrival: f64,
    duration: f64,
    gpus: u32,
    vram: u64,
    priority: i32,
    user: usize,
}

struct Trace;

impl Trace {
    /// `n` jobs from `seed`: Poisson arrivals (mean gap `gap` seconds); per-GPU VRAM from four
    /// classes (35% 2–10 GiB, 35% 10–24 GiB, 20% 24–48 GiB, 10% 48–76 GiB; the last two only
    /// fit the larger cards), capped at what `n` GPUs of the inventory can hold (the daemon
    /// refuses impossible jobs at submit); 80% 1 GPU, 15% 2, 5% 4; durations log-normal
    /// (median 20 min, σ 1.0, capped at 12 h); 10% of jobs have priority 10; 6 users.
    fn generate(seed: u64, n: usize, gap: f64) -> Vec<TraceJob> {
        let mut r = Rng(seed);
        let mut t = 0.0;
        (0..n)
            .map(|i| {
                t += -gap * r.unit().max(1e-12).ln();
                let class = r.unit();
                let (lo, hi) = match class {
                    c if c < 0.35 => (2.0, 10.0),
                    c if c < 0.70 => (10.0, 24.0),
                    c if c < 0.90 => (24.0, 48.0),
                    _ => (48.0, 76.0),
                };
                let g = r.unit();
                let gpus: u32 = if g < 0.80 {
                    1
                } else if g < 0.95 {
                    2
                } else {
                    4
                };
                let mut sizes: Vec<u64> = inventory().iter().map(|g| g.total_bytes).collect();
                sizes.sort_unstable_by(|a, b| b.cmp(a));
                let vram = (((lo + (hi - lo) * r.unit()) * GIB as f64) as u64)
                    .min(sizes[gpus as usize - 1]);
                let duration = (1200.0 * (1.0 * r.normal()).exp()).min(12.0 * 3600.0);
                let priority = if r.unit() < 0.10 { 10 } else { 0 };
                TraceJob {
                    id: i as JobId + 1,
                    arrival: t,
                    duration,
                    gpus,
                    vram,
                    priority,
                    user: (r.next() % 6) as usize,
                }
            })
            .collect()
    }
}

fn inventory() -> Vec<GpuInfo> {
    [80u64, 80, 48, 48, 24, 24, 24, 24]
        .iter()
        .enumerate()
        .map(|(i, gib)| GpuInfo {
            index: i as u32,
            uuid: format!("GPU-{i}"),
            name: format!("sim {gib}GiB"),
            pci_bus_id: None,
            total_bytes: gib * GIB,
            free_bytes: None,
            foreign_bytes: 0,
            compute_capability: None,
            utilization_percent: None,
        })
        .collect()
}

fn record(j: &TraceJob) -> JobRecord {
    let spec = JobSpec {
        name: None,
        priority: j.priority,
        kind: JobKind::Command,
        depends_on: Vec::new(),
        resources: Resources {
            gpus: j.gpus,
            vram: VramRequest::PerGpu(ByteSize(j.vram)),
            ..Resources::default()
        },
        command: Some(CommandSpec {
            argv: vec!["true".into()],
            env: Default::default(),
            workdir: None,
        }),
        retry: RetrySpec::default(),
        model: None,
        data: None,
        training: None,
        lora: None,
        publish: None,
        notify: None,
        schedule: None,
        overlap: None,
        catch_up: None,
        base_dir: None,
    };
    let t = (j.arrival * 1000.0) as Millis;
    let mut r = JobRecord::new_queued(
        Owner {
            user: format!("user{}", j.user),
            uid: 1000 + j.user as u32,
        },
        format!("job{}", j.id),
        spec,
        String::new(),
        t,
    );
    r.id = j.id;
    r
}

#[derive(Default, Debug)]
struct Outcome {
    makespan: f64,
    mean_completion: f64,
    utilisation: f64,
    preemptions: usize,
    plan_calls: usize,
    plan_micros: Vec<f64>,
}

/// Which policy places jobs.
#[derive(Clone, Copy, PartialEq)]
enum Policy {
    Jobd,
    FifoFirstFit,
}

/// FIFO first-fit: in arrival order, stop at the first job that does not fit.
fn fifo_first_fit(
    queued: &[&JobRecord],
    active: &[&JobRecord],
    gpus: &[GpuInfo],
) -> Vec<(JobId, Placement)> {
    let mut room: Vec<i128> = gpus.iter().map(|g| g.total_bytes as i128).collect();
    for a in active {
        if let Some(p) = &a.placement {
            for s in &p.gpus {
                room[s.index as usize] -= p.vram_per_gpu as i128;
            }
        }
    }
    let mut order: Vec<&&JobRecord> = queued.iter().collect();
    order.sort_by_key(|j| (j.queued_at, j.id));
    let mut out = Vec::new();
    for j in order {
        let need = match j.spec.resources.vram {
            VramRequest::PerGpu(b) => b.0 as i128,
            VramRequest::Auto => unreachable!(),
        };
        let fit: Vec<usize> = (0..room.len())
            .filter(|&i| room[i] >= need)
            .take(j.spec.resources.gpus as usize)
            .collect();
        if fit.len() < j.spec.resources.gpus as usize {
            break;
        }
        for &i in &fit {
            room[i] -= need;
        }
        out.push((
            j.id,
            Placement {
                gpus: fit
                    .iter()
                    .map(|&i| jobd::spec::record::GpuSlot {
                        index: i as u32,
                        uuid: gpus[i].uuid.clone(),
                    })
                    .collect(),
                vram_per_gpu: need as u64,
                exclusive: false,
            },
        ));
    }
    out
}

/// Event-driven simulation: arrivals and completions advance the clock; after each event the
/// policy places what it can. A preempted job checkpoints (60 s lost) and is requeued.
fn simulate(trace: &[TraceJob], policy: Policy) -> Outcome {
    let gpus = inventory();
    let cfg = SchedulerConfig {
        vram_margin: 0,
        starvation_after: Duration::from_secs(1800),
        ..SchedulerConfig::default()
    };
    let mut jobs: BTreeMap<JobId, JobRecord> = BTreeMap::new();
    let mut remaining: HashMap<JobId, f64> = trace.iter().map(|j| (j.id, j.duration)).collect();
    let mut started: HashMap<JobId, f64> = HashMap::new();
    let mut finished: HashMap<JobId, f64> = HashMap::new();
    let arrivals: HashMap<JobId, f64> = trace.iter().map(|j| (j.id, j.arrival)).collect();
    let mut next_arrival = 0usize;
    let mut now = 0.0f64;
    let mut out = Outcome::default();
    let mut vram_seconds = 0.0f64;
    let usage: HashMap<String, f64> = HashMap::new();
    loop {
        // Next event: an arrival or the earliest completion.
        let next_done = jobs
            .values()
            .filter(|j| j.state == JobState::Running)
            .map(|j| (started[&j.id] + remaining[&j.id], j.id))
            .min_by(|a, b| a.0.total_cmp(&b.0));
        let arrival_t = trace.get(next_arrival).map(|j| j.arrival);
        match (arrival_t, next_done) {
            (None, None) => break,
            (Some(a), Some((d, _))) if a <= d => {
                now = a;
                let j = &trace[next_arrival];
                jobs.insert(j.id, record(j));
                next_arrival += 1;
            }
            (Some(a), None) => {
                now = a;
                let j = &trace[next_arrival];
                jobs.insert(j.id, record(j));
                next_arrival += 1;
            }
            (_, Some((d, id))) => {
                now = d;
                let j = jobs.get_mut(&id).unwrap();
                let p = j.placement.as_ref().unwrap();
                vram_seconds +=
                    (p.vram_per_gpu * p.gpus.len() as u64) as f64 * (now - started[&id]);
                j.state = JobState::Succeeded;
                finished.insert(id, now);
            }
        }
        // Preemptions requested earlier take effect now (the victim checkpoints and leaves).
        let stopping: Vec<JobId> = jobs
            .values()
            .filter(|j| j.state == JobState::Running && j.stop.is_some())
            .map(|j| j.id)
            .collect();
        for id in stopping {
            let j = jobs.get_mut(&id).unwrap();
            let p = j.placement.as_ref().unwrap();
            let ran = now - started[&id];
            vram_seconds += (p.vram_per_gpu * p.gpus.len() as u64) as f64 * ran;
            *remaining.get_mut(&id).unwrap() += 60.0 - ran;
            j.state = JobState::Queued;
            j.stop = None;
            j.placement = None;
            out.preemptions += 1;
        }
        let now_ms = (now * 1000.0) as Millis;
        let decisions: Vec<(JobId, Placement)> = {
            let queued: Vec<&JobRecord> = jobs
                .values()
                .filter(|j| j.state == JobState::Queued)
                .collect();
            let active: Vec<&JobRecord> = jobs
                .values()
                .filter(|j| j.state == JobState::Running)
                .collect();
            match policy {
                Policy::FifoFirstFit => fifo_first_fit(&queued, &active, &gpus),
                Policy::Jobd => {
                    let state_of = |id: JobId| jobs.get(&id).map(|j| j.state);
                    let t = Instant::now();
                    let p = plan(&PlanInput {
                        now: now_ms,
                        queued,
                        active,
                        state_of: &state_of,
                        gpus: &gpus,
                        cfg: &cfg,
                        max_cpu_jobs: 1,
                        usage: &usage,
                    });
                    out.plan_micros.push(t.elapsed().as_secs_f64() * 1e6);
                    out.plan_calls += 1;
                    for pre in &p.preempt {
                        jobs.get_mut(&pre.victim).unwrap().stop = Some(StopKind::Preempt {
                            for_job: pre.for_job,
                        });
                    }
                    p.start.into_iter().map(|s| (s.id, s.placement)).collect()
                }
            }
        };
        for (id, placement) in decisions {
            let j = jobs.get_mut(&id).unwrap();
            j.state = JobState::Running;
            j.placement = Some(placement);
            j.started_at = Some(now_ms);
            started.insert(id, now);
        }
    }
    assert_eq!(
        finished.len(),
        trace.len(),
        "every job of the trace ran to completion"
    );
    out.makespan = now;
    out.mean_completion =
        finished.iter().map(|(id, t)| t - arrivals[id]).sum::<f64>() / finished.len() as f64;
    let capacity: f64 = inventory()
        .iter()
        .map(|g| g.total_bytes as f64)
        .sum::<f64>()
        * now;
    out.utilisation = vram_seconds / capacity;
    out
}

fn trace_bench() {
    println!(
        "\n== trace replay through sched::plan (simulated clock; 8 GPUs: 2×80, 2×48, 4×24 GiB)"
    );
    println!(
        "{:<34} {:>10} {:>12} {:>14} {:>10}",
        "trace (seed, jobs, mean gap)", "policy", "VRAM util", "mean JCT", "makespan"
    );
    for (seed, n, gap) in [
        (1u64, 2000usize, 150.0f64),
        (2, 2000, 100.0),
        (3, 1000, 60.0),
    ] {
        let trace = Trace::generate(seed, n, gap);
        let ours = simulate(&trace, Policy::Jobd);
        let base = simulate(&trace, Policy::FifoFirstFit);
        for (name, o) in [("jobd", &ours), ("fifo-ff", &base)] {
            println!(
                "{:<34} {:>10} {:>11.1}% {:>12.1} h {:>8.1} h",
                format!("seed {seed}, {n} jobs, {gap:.0} s"),
                name,
                100.0 * o.utilisation,
                o.mean_completion / 3600.0,
                o.makespan / 3600.0
            );
        }
        let mut us = ours.plan_micros.clone();
        us.sort_by(f64::total_cmp);
        println!(
            "{:<34} ratio jobd/fifo: utilisation {:.2}×, mean completion time {:.2}× ({} preemptions; plan() p50 {:.0} µs, p99 {:.0} µs over {} calls)",
            "",
            ours.utilisation / base.utilisation,
            ours.mean_completion / base.mean_completion,
            ours.preemptions,
            percentile(&us, 0.5),
            percentile(&us, 0.99),
            ours.plan_calls
        );
    }
}
