//! L2: fine-tuning with Candle. Runs only inside `jobd worker` (and `jobd generate`), never in
//! the daemon process, so a CUDA fault can only take a worker down.
//!
//! This module owns the model ([`model`]), its configuration ([`config`]), tokenizers
//! ([`tokenizer`]), data ([`data`]), the optimizer and schedule ([`optim`]), metrics and
//! progress files ([`metrics`]), checkpoints ([`checkpoint`]), the loop ([`trainer`]) and
//! greedy generation ([`generate`](fn@generate)). It reads the resolved job spec and the
//! directories the daemon gives it; it must not use the store, scheduler, API or daemon.
//!
//! Every random choice comes from [`rng::Rng`] (seeded, savable), so an interrupted and
//! resumed run reproduces an uninterrupted one bit for bit.

pub mod attention_blocks;
#[cfg(any(test, feature = "cuda"))]
mod attention_device;
pub mod checkpoint;
pub mod config;
#[cfg(feature = "cuda")]
pub(crate) mod cuda;
pub mod data;
pub mod direct;
pub mod direct_ops;
pub mod generate;
#[cfg(test)]
mod kernel_emulator;
#[cfg(any(test, feature = "cuda"))]
mod kernel_launch;
pub mod kernels;
pub mod metrics;
pub mod model;
pub mod op_times;
pub mod ops;
pub mod optim;
pub mod rng;
pub mod tokenizer;
pub mod trainer;
pub mod weights;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use crate::spec::JobSpec;

/// What the daemon gives a worker (from the worker contract's environment).
#[derive(Debug, Clone)]
pub struct WorkerContext {
    /// The job directory (`JOBD_JOB_DIR`): metrics, progress and the tokenized-data cache go
    /// here.
    pub job_dir: PathBuf,
    /// Where checkpoints go (`JOBD_CHECKPOINT_DIR`); persists across attempts.
    pub checkpoint_dir: PathBuf,
    /// Where the final model goes, in Hugging Face layout (`JOBD_OUTPUT_DIR`).
    pub output_dir: PathBuf,
    /// Raised on SIGTERM: the worker finishes (or abandons) its step, checkpoints and returns
    /// `Stopped`.
    pub stop: Arc<StopSignal>,
    /// How long the daemon waits after SIGTERM before SIGKILL (`JOBD_GRACE_SECONDS`); the
    /// worker abandons a step it could not finish and checkpoint within it. `None`: unknown,
    /// the step is always finished.
    pub grace: Option<Duration>,
    /// CPU threads for this job (`None`: Candle's default).
    pub threads: Option<usize>,
    /// 1 for the first run, then 2, 3, ... (informational: resume is decided by the
    /// checkpoints on disk, not by this number).
    pub attempt: u32,
}

/// A request to stop (SIGTERM), with the moment it came.
#[derive(Debug, Default)]
pub struct StopSignal {
    requested: AtomicBool,
    at: OnceLock<Instant>,
}

impl StopSignal {
    /// Records the request (the first one's time counts).
    pub fn request(&self) {
        let _ = self.at.set(Instant::now());
        self.requested.store(true, Ordering::SeqCst);
    }

    /// Whether a stop was requested.
    pub fn is_requested(&self) -> bool {
        self.requested.load(Ordering::SeqCst)
    }

    /// When the first request came.
    pub fn requested_at(&self) -> Option<Instant> {
        self.at.get().copied()
    }
}

/// How a worker run ended without error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerOutcome {
    /// Every planned step ran and the model is in the output directory.
    Completed {
        /// Optimizer steps completed (equals the planned steps).
        steps: u64,
    },
    /// Stopped on request after writing a checkpoint at `step`; run again to resume.
    Stopped {
        /// The step the checkpoint holds.
        step: u64,
    },
}

/// Why training or generation failed. Variants name the option or file concerned.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// A job-file option is wrong in a way only the worker can see (e.g. a block size beyond
    /// the model's context).
    #[error("{option}: {reason}")]
    Option {
        /// Dotted job-file key, e.g. `data.block_size`.
        option: String,
        /// What is wrong.
        reason: String,
    },
    /// The job spec is not a train job or lacks a section.
    #[error("not a train job: {0}")]
    NotTrain(String),
    /// Reading or writing a file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// A model directory or its config cannot be used.
    #[error("model {}: {reason}", path.display())]
    BadModel {
        /// The file or directory.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A weight the architecture needs is missing from the checkpoint.
    #[error("weights: tensor {name} is missing")]
    MissingTensor {
        /// Hugging Face name of the tensor.
        name: String,
    },
    /// A weight has the wrong shape for the configuration.
    #[error("weights: tensor {name} has shape {found:?}, the config needs {expected:?}")]
    TensorShape {
        /// Hugging Face name of the tensor.
        name: String,
        /// Shape the config implies.
        expected: Vec<usize>,
        /// Shape in the file.
        found: Vec<usize>,
    },
    /// A sequence longer than the model's context.
    #[error("{tokens} tokens exceed the model's context of {max} (max_position_embeddings)")]
    Context {
        /// Positions asked for.
        tokens: usize,
        /// The model's maximum.
        max: usize,
    },
    /// A data file is malformed.
    #[error("{}{}: {reason}", path.display(), line.map(|l| format!(":{l}")).unwrap_or_default())]
    Data {
        /// The data file.
        path: PathBuf,
        /// 1-based line, for JSON lines.
        line: Option<usize>,
        /// What is wrong.
        reason: String,
    },
    /// A tokenizer could not be loaded, trained or used.
    #[error("tokenizer {}: {reason}", path.display())]
    Tokenizer {
        /// The tokenizer file (or the data it was trained on).
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// No usable compute device.
    #[error("device: {0}")]
    Device(String),
    /// A checkpoint cannot be written or used.
    #[error("checkpoint {}: {reason}", path.display())]
    Checkpoint {
        /// The checkpoint directory.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The checkpoint was written for a different job file.
    #[error(
        "checkpoint {} was written by a different job file ({}); use a new checkpoint \
         directory or resume_from_checkpoint = false",
        path.display(),
        if differences.is_empty() {
            format!("training settings hash {found}, this job {expected}")
        } else {
            differences.join("; ")
        }
    )]
    CheckpointMismatch {
        /// The checkpoint directory.
        path: PathBuf,
        /// This job's hash.
        expected: String,
        /// The checkpoint's hash.
        found: String,
        /// The settings that differ, when the checkpoint records its own.
        differences: Vec<String>,
    },
    /// The loop ended before the planned number of steps.
    #[error("training ended after {done} of {planned} planned steps")]
    Incomplete {
        /// Steps completed.
        done: u64,
        /// Steps planned.
        planned: u64,
    },
    /// A trainable parameter took no part in the loss (a bug in the model code).
    #[error("parameter {name} received no gradient")]
    NoGradient {
        /// The parameter's name.
        name: String,
    },
    /// Training diverged (or, in f16, an activation overflowed f16's range).
    #[error(
        "loss became {loss} at step {step}; lower training.learning_rate{hint}",
        hint = if *.f16 {
            ", or train in a type with more range: in f16 an activation past 65504 overflows \
             (dtype = \"bf16\" where the GPU has it, else \"f32\")"
        } else {
            ""
        }
    )]
    NonFinite {
        /// The step.
        step: u64,
        /// The loss value.
        loss: f64,
        /// Whether the run computes in f16.
        f16: bool,
    },
    /// A tensor operation failed.
    #[error("tensor operation: {0}")]
    Candle(#[from] candle_core::Error),
}

impl TrainError {
    /// An IO error on `path`.
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        TrainError::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    /// A worker-side problem with job-file option `option`.
    pub fn option(option: &str, reason: impl Into<String>) -> Self {
        TrainError::Option {
            option: option.to_string(),
            reason: reason.into(),
        }
    }

    /// Whether the device ran out of memory (CUDA's allocator, or cuBLAS's workspace).
    pub fn is_out_of_memory(&self) -> bool {
        let TrainError::Candle(e) = self else {
            return false;
        };
        let text = format!("{e} {e:?}");
        [
            "CUDA_ERROR_OUT_OF_MEMORY",
            "CUBLAS_STATUS_ALLOC_FAILED",
            "out of memory",
        ]
        .iter()
        .any(|m| text.contains(m))
    }
}

/// What to change in `spec` when its training ran out of GPU memory, each with the memory
/// it saves, and the reservation the scheduler made (`vram_bytes`, per GPU), for the
/// worker's last words. The options named are the job file's.
pub fn out_of_memory_hint(spec: &JobSpec, vram_bytes: Option<u64>) -> String {
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    let mut lines = vec![match vram_bytes {
        Some(b) => format!(
            "out of GPU memory: the job had {:.1} GiB reserved per GPU (its VRAM estimate, or \
             resources.vram); it needs more than that, or other processes on the GPU use more \
             than they did when it was placed",
            gib(b)
        ),
        None => "out of GPU memory".to_string(),
    }];
    lines.push("to need less:".into());
    let t = spec.training.clone().unwrap_or_default();
    if !t.gradient_checkpointing {
        lines.push(
            "  - [training] gradient_checkpointing = true: keeps only each layer's input and \
             recomputes the layer in the backward (one more forward per step)"
                .into(),
        );
    }
    if t.per_device_train_batch_size > 1 {
        let b = t.per_device_train_batch_size;
        lines.push(format!(
            "  - [training] per_device_train_batch_size = {} with gradient_accumulation_steps = \
             {}: the same effective batch, half the activations",
            b / 2,
            t.gradient_accumulation_steps.max(1) * 2
        ));
    }
    if t.dtype == crate::spec::train::TrainDType::F32 {
        lines.push(
            "  - [training] dtype = \"bf16\": activations (and LoRA's frozen base) in half the \
             bytes; trained weights stay f32 masters"
                .into(),
        );
    }
    if spec.lora.is_none() {
        lines.push(
            "  - a [lora] section: gradients and AdamW state only for the adapters, not for \
             every weight"
                .into(),
        );
    }
    let block = spec.data.as_ref().and_then(|d| d.block_size);
    lines.push(format!(
        "  - a smaller [data] block_size{}: activations grow with it, attention's scores with \
         its square",
        block.map_or(String::new(), |b| format!(" (now {b})"))
    ));
    lines.push(
        "`jobctl estimate JOB.toml` shows what a change saves; resources.vram reserves more".into(),
    );
    lines.join("\n")
}

/// Trains the job described by `spec` (a resolved `kind = "train"` spec): resumes from the
/// newest valid checkpoint unless told otherwise, writes metrics, progress and checkpoints,
/// and puts the final model in `ctx.output_dir`.
pub fn run(spec: &JobSpec, ctx: &WorkerContext) -> Result<WorkerOutcome, TrainError> {
    trainer::run_with(spec, ctx, &trainer::Hooks::default())
}

/// Greedy generation of up to `max_tokens` new tokens after `prompt` with the Hugging Face
/// model in `model_dir`; returns the generated text (without the prompt).
pub fn generate(model_dir: &Path, prompt: &str, max_tokens: usize) -> Result<String, TrainError> {
    generate::generate(model_dir, prompt, max_tokens)
}

/// The device to compute on: with the `cuda` feature, the first visible GPU when the job has
/// GPUs and they are not simulated (`JOBD_FAKE_GPUS=1`); the CPU otherwise.
pub fn select_device(wants_gpu: bool) -> Result<candle_core::Device, TrainError> {
    let fake = std::env::var(crate::spec::contract::ENV_FAKE_GPUS).is_ok_and(|v| v == "1");
    if wants_gpu && !fake {
        #[cfg(feature = "cuda")]
        {
            // CUDA_VISIBLE_DEVICES (set by the daemon) makes our GPU number 0.
            let dev = candle_core::Device::new_cuda(0)
                .map_err(|e| TrainError::Device(format!("CUDA device 0: {e}")))?;
            if let candle_core::Device::Cuda(d) = &dev {
                // cudarc records an event on every read and write of every buffer, for
                // programs that share buffers between streams; that costs several driver
                // calls per kernel, and a training step launches thousands of small ones.
                // SAFETY: a worker issues all its CUDA work from the one thread that trains,
                // on this device's one stream, so stream order alone orders every use.
                unsafe { d.disable_event_tracking() };
                if let Err(e) = cuda::keep_pool_memory(d) {
                    tracing::warn!(error = %e, "the memory pool returns memory at each sync");
                }
            }
            return Ok(dev);
        }
        #[cfg(not(feature = "cuda"))]
        tracing::warn!("this jobd was built without the cuda feature; training on the CPU");
    }
    Ok(candle_core::Device::Cpu)
}

/// Runs `f` on a thread pool of `threads` threads (Candle's CPU kernels use the current
/// rayon pool), or on the default pool.
pub(crate) fn with_threads<T: Send>(threads: Option<usize>, f: impl FnOnce() -> T + Send) -> T {
    match threads.filter(|&n| n > 0) {
        Some(n) => match rayon::ThreadPoolBuilder::new().num_threads(n).build() {
            Ok(pool) => pool.install(f),
            Err(e) => {
                tracing::warn!(error = %e, "could not build a {n}-thread pool; using the default");
                f()
            }
        },
        None => f(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(text: &str) -> JobSpec {
        crate::spec::job::parse("job.toml", text).unwrap()
    }

    /// A diverged f16 run is told about f16's range as well as the learning rate.
    #[test]
    fn non_finite_loss_names_f16_range_only_in_f16() {
        let msg = |f16| {
            TrainError::NonFinite {
                step: 7,
                loss: f64::NAN,
                f16,
            }
            .to_string()
        };
        assert_eq!(
            msg(false),
            "loss became NaN at step 7; lower training.learning_rate"
        );
        let m = msg(true);
        assert!(m.starts_with("loss became NaN at step 7; lower training.learning_rate, or"));
        assert!(m.contains("65504") && m.contains("dtype = \"bf16\""), "{m}");
    }

    #[test]
    fn out_of_memory_is_told_apart_and_answered_with_what_to_change() {
        let oom = TrainError::Candle(candle_core::Error::Msg(
            "jobd gemm: DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")".into(),
        ));
        assert!(oom.is_out_of_memory());
        let other = TrainError::Candle(candle_core::Error::Msg("shape mismatch".into()));
        assert!(!other.is_out_of_memory());
        assert!(!TrainError::NotTrain("command job".into()).is_out_of_memory());

        let full = spec(
            "kind = \"train\"\n[model]\nbase = \"m\"\n[data]\ntrain_file = \"t.jsonl\"\n\
             block_size = 2048\n[training]\nper_device_train_batch_size = 8\n\
             gradient_accumulation_steps = 2\n",
        );
        let hint = out_of_memory_hint(&full, Some(20 << 30));
        for want in [
            "20.0 GiB reserved",
            "gradient_checkpointing = true",
            "per_device_train_batch_size = 4 with gradient_accumulation_steps = 4",
            "dtype = \"bf16\"",
            "a [lora] section",
            "block_size (now 2048)",
            "jobctl estimate",
        ] {
            assert!(hint.contains(want), "{want:?} missing from:\n{hint}");
        }
        // What the job already does is not suggested again.
        let lean = spec(
            "kind = \"train\"\n[model]\nbase = \"m\"\n[data]\ntrain_file = \"t.jsonl\"\n\
             [training]\nper_device_train_batch_size = 1\ndtype = \"bf16\"\n\
             gradient_checkpointing = true\n[lora]\nr = 8\n[resources]\ngpus = 1\n",
        );
        let hint = out_of_memory_hint(&lean, None);
        for absent in [
            "gradient_checkpointing",
            "per_device_train_batch_size",
            "dtype",
            "[lora]",
            "reserved",
        ] {
            assert!(!hint.contains(absent), "{absent:?} in:\n{hint}");
        }
        assert!(hint.starts_with("out of GPU memory"), "{hint}");
    }
}
