//! The job's metrics (`metrics.jsonl`: one JSON object per logged step) and progress
//! (`progress.json`, replaced atomically) files, and peak-memory measurement.
//!
//! After a resume the metrics file is rewritten from the checkpoint's history, so it holds
//! exactly one record per logged step however often the job was interrupted.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::TrainError;
use super::weights::write_atomic;
use crate::spec::contract::{Progress, files};

/// One line of `metrics.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetricsRecord {
    /// Optimizer steps completed.
    pub step: u64,
    /// Fractional epochs completed.
    pub epoch: f64,
    /// Mean training loss over the steps since the previous record.
    pub loss: f64,
    /// Learning rate used by this step's update.
    pub learning_rate: f64,
    /// Global gradient norm of this step, before clipping; `null` for an f16 step whose
    /// gradients overflowed (the step was skipped and the loss scale halved). JSON has no
    /// infinity, and a bare non-finite number would be written as a `null` that did not say so.
    pub grad_norm: Option<f64>,
    /// Input tokens processed per second since the previous record (wall clock).
    pub tokens_per_second: f64,
    /// Evaluation loss, when this step evaluated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_loss: Option<f64>,
    /// Peak memory so far: the process's peak RSS on CPU.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peak_memory_bytes: Option<u64>,
}

/// A record's fields that do not depend on the wall clock, as bits: step, epoch, loss,
/// learning rate, gradient norm, evaluation loss.
pub type DeterministicFields = (u64, u64, u64, u64, Option<u64>, Option<u64>);

impl MetricsRecord {
    /// The record without its wall-clock-dependent fields (for reproducibility checks).
    pub fn deterministic(&self) -> DeterministicFields {
        (
            self.step,
            self.epoch.to_bits(),
            self.loss.to_bits(),
            self.learning_rate.to_bits(),
            self.grad_norm.map(f64::to_bits),
            self.eval_loss.map(f64::to_bits),
        )
    }
}

/// Appends records to `metrics.jsonl` and replaces `progress.json` in the job directory.
pub struct Reporter {
    metrics: PathBuf,
    progress_path: PathBuf,
    /// The latest progress written.
    pub progress: Progress,
}

impl Reporter {
    /// A reporter for `job_dir`, starting a new metrics file holding exactly the lines of
    /// `history` (records already logged, from a checkpoint).
    pub fn new(job_dir: &Path, history: &[String], total_steps: u64) -> Result<Self, TrainError> {
        std::fs::create_dir_all(job_dir).map_err(|e| TrainError::io(job_dir, e))?;
        let metrics = job_dir.join(files::METRICS);
        let mut text = String::new();
        for line in history {
            text.push_str(line);
            text.push('\n');
        }
        write_atomic(&metrics, text.as_bytes())?;
        Ok(Reporter {
            metrics,
            progress_path: job_dir.join(files::PROGRESS),
            progress: Progress {
                total_steps,
                ..Progress::default()
            },
        })
    }

    /// Appends one record (and flushes it to the file); returns its line.
    pub fn append(&mut self, r: &MetricsRecord) -> Result<String, TrainError> {
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&self.metrics)
            .map_err(|e| TrainError::io(&self.metrics, e))?;
        let line = serde_json::to_string(r).expect("record serializes");
        f.write_all(format!("{line}\n").as_bytes())
            .map_err(|e| TrainError::io(&self.metrics, e))?;
        // The same record for people reading the job's output (`jobctl logs -f`).
        let eval = r
            .eval_loss
            .map(|e| format!("  eval_loss {e:.4}"))
            .unwrap_or_default();
        let norm = r.grad_norm.map_or_else(
            || "overflow (f16 step skipped)".to_string(),
            |n| format!("{n:.3}"),
        );
        println!(
            "step {}/{}  epoch {:.2}  loss {:.4}  lr {:.2e}  grad_norm {norm}  tokens/s {:.0}{eval}",
            r.step,
            self.progress.total_steps,
            r.epoch,
            r.loss,
            r.learning_rate,
            r.tokens_per_second
        );
        Ok(line)
    }

    /// Replaces `progress.json` with the current progress, in stage `stage`.
    pub fn stage(&mut self, stage: &str) -> Result<(), TrainError> {
        self.progress.stage = Some(stage.to_string());
        self.write()
    }

    /// Replaces `progress.json`.
    pub fn write(&mut self) -> Result<(), TrainError> {
        let text = serde_json::to_vec_pretty(&self.progress).expect("progress serializes");
        write_atomic(&self.progress_path, &text)
    }
}

/// Writes `progress.json` for a stage before the reporter exists (loading, tokenizing).
pub fn early_stage(job_dir: &Path, stage: &str) -> Result<(), TrainError> {
    std::fs::create_dir_all(job_dir).map_err(|e| TrainError::io(job_dir, e))?;
    let p = Progress {
        stage: Some(stage.to_string()),
        ..Progress::default()
    };
    write_atomic(
        &job_dir.join(files::PROGRESS),
        &serde_json::to_vec_pretty(&p).expect("progress serializes"),
    )
}

/// Peak memory of the computation on `device`: on CPU the process's peak resident set
/// (`VmHWM`); on CUDA the most GPU memory NVML has seen this process use (CUDA context
/// included) over the calls so far — Candle keeps no allocation statistics, so call this
/// where the peak is likely (after a forward). `None` when NVML is unavailable.
pub fn peak_memory_bytes(device: &candle_core::Device) -> Option<u64> {
    if device.is_cuda() {
        return gpu_peak_bytes();
    }
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// This process's GPU memory now (NVML, no CUDA context needed), folded into a running peak.
fn gpu_peak_bytes() -> Option<u64> {
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicU64, Ordering};
    static INVENTORY: OnceLock<crate::gpu::Inventory> = OnceLock::new();
    static PEAK: AtomicU64 = AtomicU64::new(0);
    let inv =
        INVENTORY.get_or_init(|| crate::gpu::Inventory::open(&crate::config::GpuSource::Auto));
    let me = std::process::id();
    let snap = inv.snapshot(&|pid| pid == me);
    if snap.source != "nvml" {
        return None;
    }
    // NVML reports memory used by others ("foreign"); ours is the rest of what is in use.
    let ours: u64 = snap
        .gpus
        .iter()
        .map(|g| {
            let used = g.total_bytes - g.free_bytes.unwrap_or(g.total_bytes);
            used.saturating_sub(g.foreign_bytes)
        })
        .sum();
    Some(PEAK.fetch_max(ours, Ordering::Relaxed).max(ours))
}

/// Reads `metrics.jsonl` (for tests and tools).
pub fn read_metrics(job_dir: &Path) -> Result<Vec<MetricsRecord>, TrainError> {
    let p = job_dir.join(files::METRICS);
    let text = std::fs::read_to_string(&p).map_err(|e| TrainError::io(&p, e))?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .enumerate()
        .map(|(i, l)| {
            serde_json::from_str(l).map_err(|e| TrainError::Data {
                path: p.clone(),
                line: Some(i + 1),
                reason: e.to_string(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A record of an f16 step whose gradients overflowed (no norm) is written and read back
    /// like any other, its norm an explicit `null`.
    #[test]
    fn a_record_without_a_gradient_norm_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let mut reporter = Reporter::new(dir.path(), &[], 10).unwrap();
        let mut rec = MetricsRecord {
            step: 1,
            epoch: 0.1,
            loss: 5.5,
            learning_rate: 1e-3,
            grad_norm: None,
            tokens_per_second: 100.0,
            eval_loss: None,
            peak_memory_bytes: None,
        };
        let line = reporter.append(&rec).unwrap();
        assert!(line.contains(r#""grad_norm":null"#), "{line}");
        rec.step = 2;
        rec.grad_norm = Some(1.25);
        reporter.append(&rec).unwrap();
        let back = read_metrics(dir.path()).unwrap();
        assert_eq!(back.len(), 2);
        assert_eq!(back[0].grad_norm, None);
        assert_eq!(back[1], rec);
    }

    #[test]
    fn peak_rss_is_measured_on_cpu() {
        let b = peak_memory_bytes(&candle_core::Device::Cpu).unwrap();
        assert!(b > 1 << 20, "{b}");
    }
}
