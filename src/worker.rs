//! L4: `jobd worker --job-dir DIR` — the process a train job runs as. It reads the job's
//! `spec.json` (the worker contract, see `spec::contract`), turns SIGTERM into "finish (or abandon)
//! the step, checkpoint, exit 75", and runs the Candle trainer. The daemon never trains in-process: a
//! CUDA fault or an out-of-memory kill ends this process only.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::{SigSet, Signal};

use crate::spec::JobSpec;
use crate::spec::contract::{self, files};
use crate::train::{self, StopSignal, WorkerContext, WorkerOutcome};

/// Runs the worker; returns the exit code of the worker contract.
pub fn main(job_dir: &Path) -> ExitCode {
    // The trainer's log (checkpoints written, resumes, evaluations) goes to the job's
    // stderr.log; metrics lines go to stdout.
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_target(false)
        .with_env_filter(tracing_subscriber::EnvFilter::new("info"))
        .init();
    // Block SIGTERM/SIGINT in every thread (threads created later inherit the mask) and take
    // them in one thread that raises the stop flag: the trainer checks it between steps.
    let stop = Arc::new(StopSignal::default());
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGTERM);
    signals.add(Signal::SIGINT);
    if let Err(e) = signals.thread_block() {
        eprintln!("jobd worker: cannot block signals: {e}");
        return ExitCode::from(1);
    }
    {
        let stop = stop.clone();
        std::thread::spawn(move || {
            if let Ok(sig) = signals.wait() {
                stop.request();
                eprintln!(
                    "jobd worker: {sig} received: checkpointing (the current step is finished \
                     if that fits in the grace period, else abandoned)"
                );
            }
        });
    }

    let attempt: u32 = std::env::var(contract::ENV_ATTEMPT)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    // A panic (a bug) ends the worker with 101: its message and that exit are left for the
    // daemon as an error is, so that a daemon that is not this worker's parent (it restarted
    // meanwhile) still learns how it ended, and the failure says why.
    {
        let job_dir = job_dir.to_path_buf();
        let default_hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            default_hook(info);
            record_end(
                &job_dir,
                attempt,
                101,
                Some(&format!("the worker panicked: {info}")),
            );
        }));
    }
    let spec_path = job_dir.join(files::SPEC_JSON);
    let spec: JobSpec = match std::fs::read(&spec_path)
        .map_err(|e| e.to_string())
        .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
    {
        Ok(s) => s,
        Err(e) => {
            let message = format!("cannot read {}: {e}", spec_path.display());
            eprintln!("jobd worker: {message}");
            record_end(job_dir, attempt, 1, Some(&message));
            return ExitCode::from(1);
        }
    };
    let env_path = |var: &str, default: &str| {
        std::env::var_os(var)
            .map(PathBuf::from)
            .unwrap_or_else(|| job_dir.join(default))
    };
    let threads = spec.resources.cpus.map(|c| c as usize).or_else(|| {
        std::env::var("RAYON_NUM_THREADS")
            .ok()
            .and_then(|v| v.parse().ok())
    });
    let ctx = WorkerContext {
        job_dir: job_dir.to_path_buf(),
        checkpoint_dir: env_path(contract::ENV_CHECKPOINT_DIR, files::CHECKPOINTS),
        output_dir: env_path(contract::ENV_OUTPUT_DIR, files::OUTPUT),
        stop,
        grace: std::env::var(contract::ENV_GRACE_SECONDS)
            .ok()
            .and_then(|v| v.parse().ok())
            .map(Duration::from_secs),
        threads,
        attempt,
    };
    match train::run(&spec, &ctx) {
        Ok(WorkerOutcome::Completed { steps }) => {
            eprintln!("jobd worker: training complete ({steps} steps)");
            record_end(job_dir, attempt, 0, None);
            ExitCode::SUCCESS
        }
        Ok(WorkerOutcome::Stopped { step }) => {
            eprintln!(
                "jobd worker: stopped at step {step} after checkpointing; exit {}",
                contract::EXIT_PREEMPTED
            );
            record_end(job_dir, attempt, contract::EXIT_PREEMPTED, None);
            ExitCode::from(contract::EXIT_PREEMPTED as u8)
        }
        Err(e) => {
            eprintln!("jobd worker: {e}");
            if e.is_out_of_memory() {
                let vram = std::env::var(contract::ENV_VRAM_BYTES)
                    .ok()
                    .and_then(|v| v.parse().ok());
                eprintln!("jobd worker: {}", train::out_of_memory_hint(&spec, vram));
            }
            record_end(job_dir, attempt, 1, Some(&e.to_string()));
            ExitCode::from(1)
        }
    }
}

/// Leaves how attempt `attempt` ends in the job directory, as `jobd run-command` leaves a
/// command's: its error, if any (`worker-error.json`, for the failure reason), and its exit
/// code (`exit-status.json`), so that a daemon that was down, or is not this worker's parent
/// since it restarted, learns it (a finished training is then published, not resumed).
fn record_end(job_dir: &Path, attempt: u32, code: i32, error: Option<&str>) {
    if let Some(message) = error {
        let record = contract::WorkerError {
            attempt,
            message: message.to_string(),
        };
        let bytes = serde_json::to_vec(&record).unwrap_or_default();
        if let Err(e) = crate::jobfs::write_atomic(&job_dir.join(files::WORKER_ERROR), &bytes, None)
        {
            eprintln!("jobd worker: cannot record the error for the daemon: {e}");
        }
    }
    let status = contract::ExitStatus {
        attempt,
        code: Some(code),
        signal: None,
        ended_at: Some(crate::spec::now_ms()),
    };
    let bytes = serde_json::to_vec(&status).unwrap_or_default();
    if let Err(e) = crate::jobfs::write_atomic(&job_dir.join(files::EXIT_STATUS), &bytes, None) {
        eprintln!("jobd worker: cannot record how it ended: {e}");
    }
}
