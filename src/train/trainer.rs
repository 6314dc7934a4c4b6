//! The training loop: builds the tokenizer, data, model and optimizer for a job (or restores
//! them from a checkpoint), runs the planned optimizer steps with gradient accumulation,
//! clipping, the schedule, evaluation, logging and checkpoints, honours the stop flag, and
//! writes the final model in Hugging Face layout.
//!
//! Exactness: the data order, dropout and initial weights depend only on the seed and the
//! step; the loss of a step is normalised by the labelled tokens of its whole accumulation
//! group (known before the first micro-batch); and everything a later step depends on is in
//! the checkpoint. A resumed run therefore reproduces an uninterrupted one bit for bit on the
//! same device.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};

use super::checkpoint::{self, Rotation, SchedulerState, Snapshot, TrainerState};
use super::config::LlamaConfig;
use super::data::{self, Dataset, Example, Plan};
use super::metrics::{MetricsRecord, Reporter, early_stage, peak_memory_bytes};
use super::model::{self, Linear, Llama, Lora, Pass};
use super::optim::{self, AdamW, AdamWConfig, Param};
use super::rng::Rng;
use super::tokenizer::{self, Tok};
use super::weights::{load_hf_weights, save_safetensors, write_atomic};
use super::{TrainError, WorkerContext, WorkerOutcome, select_device, with_threads};
use super::{direct, direct_ops};
use crate::chat::{CHATML, CHATML_TOKENS, ChatTemplate};
use crate::spec::JobSpec;
use crate::spec::train::{
    DataFormat, DataSpec, EvalStrategy, LoraSpec, ModelSpec, ResumeFrom, TrainDType, TrainingArgs,
};

/// Test hooks: ways to interrupt a run at a chosen step. `Hooks::default()` does nothing.
#[derive(Debug, Clone, Default)]
pub struct Hooks {
    /// Set the stop flag once this many steps are done (as SIGTERM would).
    pub stop_after_step: Option<u64>,
    /// Fail right after this many steps are done, writing nothing more (as SIGKILL would).
    pub crash_after_step: Option<u64>,
    /// Request a stop right after the first forward pass of this step (1-based), as a SIGTERM
    /// arriving mid-step would.
    pub stop_during_step: Option<u64>,
    /// Train full fine-tunes through [`direct_ops`] (CUDA's step) even on the CPU, where
    /// [`direct`] would run, and accept `dtype = "bf16"` / `"f16"` there (the CPU's ops
    /// store 16-bit activations and compute in f32, as CUDA's do): how the tests reach that
    /// step's trainer path, mixed precision and loss scaling included, without a GPU.
    pub direct_ops_on_cpu: bool,
    /// Start f16's dynamic loss scale here instead of at 2¹⁶ (a scale too large for the
    /// gradients makes steps overflow, so the tests can reach the skip-and-halve path).
    pub initial_loss_scale: Option<f64>,
}

/// Like [`super::run`], with test hooks.
pub fn run_with(
    spec: &JobSpec,
    ctx: &WorkerContext,
    hooks: &Hooks,
) -> Result<WorkerOutcome, TrainError> {
    with_threads(ctx.threads, || run_inner(spec, ctx, hooks))
}

/// The job's train sections, with defaults filled in.
struct Sections<'a> {
    model: &'a ModelSpec,
    data: &'a DataSpec,
    args: TrainingArgs,
    lora: Option<&'a LoraSpec>,
}

fn sections(spec: &JobSpec) -> Result<Sections<'_>, TrainError> {
    Ok(Sections {
        model: spec
            .model
            .as_ref()
            .ok_or_else(|| TrainError::NotTrain("no [model] section".into()))?,
        data: spec
            .data
            .as_ref()
            .ok_or_else(|| TrainError::NotTrain("no [data] section".into()))?,
        args: spec.training.clone().unwrap_or_default(),
        lora: spec.lora.as_ref(),
    })
}

/// Everything needed to run steps.
struct Session {
    model: Llama,
    params: Vec<Param>,
    tok: Tok,
    train: Vec<Example>,
    eval: Vec<Example>,
    data_key: String,
    lora: bool,
    /// The chat template to write into the output's `tokenizer_config.json`.
    chat_template: Option<String>,
}

fn run_inner(
    spec: &JobSpec,
    ctx: &WorkerContext,
    hooks: &Hooks,
) -> Result<WorkerOutcome, TrainError> {
    let s = sections(spec)?;
    let args = &s.args;
    let device = select_device(spec.resources.gpus > 0)?;
    if args.dtype != TrainDType::F32 && !device.is_cuda() && !hooks.direct_ops_on_cpu {
        return Err(TrainError::option(
            "training.dtype",
            format!(
                "{} needs a CUDA device; this worker trains on the CPU",
                args.dtype.as_str()
            ),
        ));
    }
    let compute = compute_dtype(args.dtype);
    if args.tf32 {
        if device.is_cuda() && compute == DType::F32 {
            // Process-wide in Candle; a worker trains one job.
            #[cfg(feature = "cuda")]
            candle_core::cuda_backend::set_gemm_reduced_precision_f32(true);
            tracing::info!("tf32: f32 matrix products on tensor cores");
        } else {
            tracing::warn!("tf32 applies to f32 training on CUDA; ignored here");
        }
    }
    early_stage(&ctx.job_dir, "loading")?;
    let hash = checkpoint::spec_hash(spec);
    std::fs::create_dir_all(&ctx.checkpoint_dir)
        .map_err(|e| TrainError::io(&ctx.checkpoint_dir, e))?;
    checkpoint::clean_temporaries(&ctx.checkpoint_dir);

    let t_resume = Instant::now();
    let resume = find_resume(args, &ctx.checkpoint_dir, spec)?;
    let loaded = match &resume {
        Some((dir, _)) => Some(checkpoint::load(dir, &device)?),
        None => None,
    };
    let mut sess = build_session(&s, ctx, &device, loaded.as_ref())?;
    let plan = Plan::new(
        sess.train.len(),
        args.per_device_train_batch_size,
        args.gradient_accumulation_steps,
        args.seed,
        args.num_train_epochs,
        args.max_steps,
    );
    let total = plan.total_steps;
    let warmup = optim::warmup_steps(args.warmup_steps, args.warmup_ratio, total);
    let mut opt = AdamW::new(
        AdamWConfig {
            beta1: args.adam_beta1,
            beta2: args.adam_beta2,
            eps: args.adam_epsilon,
            weight_decay: args.weight_decay,
        },
        &sess.params,
    )?;
    let mut st = TrainerState {
        version: checkpoint::FORMAT_VERSION,
        step: 0,
        total_steps: total,
        adam_step: 0,
        position: plan.position(0),
        accumulated_micro_batches: 0,
        lr_scheduler: SchedulerState {
            kind: format!("{:?}", args.lr_scheduler_type),
            warmup_steps: warmup,
            total_steps: total,
            next_step: 0,
        },
        rng: Rng::derive(args.seed, "dropout", 0),
        log_history: Vec::new(),
        pending_loss_sum: 0.0,
        pending_steps: 0,
        best_metric: None,
        best_checkpoint: None,
        spec_hash: hash.clone(),
        settings: Some(checkpoint::settings(spec)),
        data_key: sess.data_key.clone(),
        trainable: if sess.lora { "lora" } else { "full" }.into(),
        // f16 needs loss scaling to keep small gradients; bf16 has f32's range.
        loss_scale: (compute == DType::F16).then(|| {
            let mut ls = optim::LossScale::default();
            if let Some(scale) = hooks.initial_loss_scale {
                ls.scale = scale;
            }
            ls
        }),
    };
    if let (Some((dir, saved)), Some(loaded)) = (&resume, &loaded) {
        restore(dir, saved, loaded, &mut sess, &mut opt, &st)?;
        st = saved.clone();
        // Checkpoints written from here on describe this job file (it may differ from the
        // checkpoint's in logging or evaluation options, or the checkpoint may predate them).
        st.spec_hash = hash.clone();
        st.settings = Some(checkpoint::settings(spec));
        // The best checkpoint is loaded only at the very end: one damaged since it was saved
        // would fail the job after all its training, and again at every requeue. Found now,
        // it is forgotten, and the evaluations still to come choose a new best (or the final
        // weights are the output).
        if args.load_best_model_at_end
            && let Some(best) = st.best_checkpoint.clone()
            && let Err(reason) = checkpoint::verify(&ctx.checkpoint_dir.join(&best))
        {
            tracing::warn!(checkpoint = %best, %reason, "the best checkpoint is unusable; choosing the best again from the evaluations still to come");
            eprintln!(
                "jobd worker: the best checkpoint {best} is unusable ({reason}); the best is \
                 chosen again from the evaluations still to come"
            );
            st.best_checkpoint = None;
            st.best_metric = None;
        }
        let msg = format!("resumed from step {} ({})", st.step, dir.display());
        tracing::info!(step = st.step, checkpoint = %dir.display(), "resumed");
        eprintln!("jobd worker: {msg}");
        tracing::info!(
            seconds = t_resume.elapsed().as_secs_f64(),
            "resume start-up"
        );
    }
    let mut reporter = Reporter::new(&ctx.job_dir, &st.log_history, total)?;
    reporter.progress.step = st.step;
    reporter.progress.epoch = Some(plan.epoch_after(st.step));
    if resume.is_some() {
        reporter.stage(&format!("resumed from step {}", st.step))?;
    }
    reporter.stage("training")?;
    tracing::info!(
        parameters = sess.model.cfg.num_parameters(),
        trainable = sess.params.iter().map(|p| p.var.elem_count()).sum::<usize>(),
        examples = sess.train.len(),
        // What the loss is over: all tokens of text, completions only, or replies only.
        tokens = sess.train.iter().map(|e| e.ids.len()).sum::<usize>(),
        trained_tokens = sess.train.iter().map(Example::labelled).sum::<usize>(),
        eval_examples = sess.eval.len(),
        steps = total,
        start = st.step,
        attempt = ctx.attempt,
        device = ?device,
        "training"
    );
    if let Some(first) = sess.train.first() {
        // What the model is asked to learn, as LLaMA-Factory and axolotl show it: a wrong
        // template or mask is seen here before hours of training.
        tracing::info!(example = ?data::marked(first, &sess.tok, 2000), "first training example, ⟦trained⟧");
    }

    let pad = sess.tok.eos.unwrap_or(0);
    let rotation = |st: &TrainerState| Rotation {
        limit: args.save_total_limit,
        protect: if args.load_best_model_at_end {
            st.best_checkpoint.clone()
        } else {
            None
        },
    };
    let mut writer = checkpoint::Writer::default();
    let mut order_cache: Option<(u64, Vec<usize>)> = None;
    let mut last_saved = resume.as_ref().map(|(_, s)| s.step);
    let (mut tokens_since, mut since) = (0usize, Instant::now());
    let mut last_progress = Instant::now();
    let mut step_secs = Vec::new();

    // The last checkpoint's snapshot time: with the writer's last write time, what saving on
    // a stop will cost.
    let mut snapshot_secs: Option<f64> = None;
    // A hand-written backward (no autograd graph) where the fused kernels run: `direct` for
    // full fine-tuning in f32 on the CPU (buffers reused from step to step), `direct_ops` over
    // the fused ops otherwise (LoRA on the CPU; everything on CUDA in f32, bf16 or f16);
    // Candle's autograd for the rest (types or devices without fused ops).
    let backward =
        if compute == DType::F32 && direct::supported(&sess.model) && !hooks.direct_ops_on_cpu {
            Backward::Direct
        } else if direct_ops::supported(&sess.model, compute) {
            Backward::DirectOps
        } else {
            Backward::Autograd
        };
    let checkpointing = args.gradient_checkpointing && backward != Backward::Autograd;
    let mut workspace = direct::Workspace::default();
    tracing::info!(
        backward = backward.name(),
        activation_checkpointing = checkpointing,
        "training step"
    );
    if args.gradient_checkpointing && !checkpointing {
        tracing::warn!(
            "gradient_checkpointing applies where the fused kernels run (f32 on the CPU; f32, \
             bf16 or f16 on CUDA); this run keeps every activation"
        );
    }
    if ctx.stop.is_requested() {
        // Asked to stop while loading: nothing new to save.
        reporter.stage("stopped")?;
        return Ok(WorkerOutcome::Stopped { step: st.step });
    }
    while st.step < total {
        let step = st.step;
        let t_step = Instant::now();
        let pos = plan.position(step);
        if order_cache.as_ref().is_none_or(|(e, _)| *e != pos.epoch) {
            order_cache = Some((pos.epoch, plan.order(pos.epoch)));
        }
        let order = &order_cache.as_ref().expect("order cached").1;
        let micro = plan.micro_batches(step, order);
        let group_labelled: usize = micro
            .iter()
            .flatten()
            .map(|&i| sess.train[i].labelled())
            .sum::<usize>()
            .max(1);
        let mut grads: Vec<Option<Tensor>> = vec![None; sess.params.len()];
        let mut step_loss = 0f64;
        // A stop that comes mid-step may abandon it: the state goes back to the step's start
        // (only the dropout stream moved) and is saved as it was.
        let rng_at_start = st.rng;
        let mean_step =
            (!step_secs.is_empty()).then(|| step_secs.iter().sum::<f64>() / step_secs.len() as f64);
        let abandon_now = |fraction_done: f64| {
            ctx.stop.is_requested()
                && abandon_step(&StepStop {
                    saved_at_step: last_saved == Some(step),
                    fraction_done,
                    elapsed: t_step.elapsed().as_secs_f64(),
                    mean_step,
                    save_secs: match (snapshot_secs, writer.last_write_secs()) {
                        (Some(s), Some(w)) => s + w,
                        _ => save_secs_guess(&sess),
                    },
                    grace_left: ctx
                        .grace
                        .zip(ctx.stop.requested_at())
                        .map(|(g, at)| g.as_secs_f64() - at.elapsed().as_secs_f64()),
                })
        };
        let mut abandoned = false;
        for (k, idx) in micro.iter().enumerate() {
            let exs: Vec<&Example> = idx.iter().map(|&i| &sess.train[i]).collect();
            let b = data::batch(&exs, pad, &device)?;
            tokens_since += b.tokens;
            let scale = st.loss_scale.map_or(1.0, |ls| ls.scale) / group_labelled as f64;
            let pending = match backward {
                Backward::Direct => {
                    let fwd = direct::forward(
                        &sess.model,
                        &b.ids,
                        &b.labels,
                        &b.mask,
                        scale as f32,
                        checkpointing,
                        &mut workspace,
                    )?;
                    step_loss += fwd.loss_sum as f64 / group_labelled as f64;
                    Pending::Direct(Box::new(fwd))
                }
                // The loss is read back after the backward is queued, so the device never
                // waits for the host between the two.
                Backward::DirectOps => Pending::DirectOps(Box::new(direct_ops::forward(
                    &sess.model,
                    &b.ids,
                    &b.labels,
                    &b.mask,
                    compute,
                    scale as f32,
                    checkpointing,
                    Some(&mut st.rng),
                )?)),
                Backward::Autograd => {
                    let mut pass = Pass::new(compute, Some(&mut st.rng));
                    let loss = sess
                        .model
                        .forward_loss(&b.ids, &b.labels, &b.mask, &mut pass, true)?;
                    let loss = (loss / group_labelled as f64)?;
                    step_loss += loss.to_scalar::<f32>()? as f64;
                    Pending::Autograd(loss)
                }
            };
            if k == 0 && hooks.stop_during_step == Some(step + 1) {
                ctx.stop.request();
            }
            // The backward costs about twice the forward.
            let per_micro = 1.0 / micro.len() as f64;
            if abandon_now((k as f64 + 1.0 / 3.0) * per_micro) {
                abandoned = true;
                break;
            }
            let g = match pending {
                Pending::Direct(fwd) => Grads::Direct(fwd.backward(&sess.model, &mut workspace)?),
                Pending::DirectOps(fwd) => {
                    let g = fwd.backward(&sess.model)?;
                    step_loss += g.loss_sum as f64 / group_labelled as f64;
                    Grads::Direct(g)
                }
                Pending::Autograd(loss) => Grads::Autograd(
                    match &st.loss_scale {
                        Some(ls) => (loss * ls.scale)?,
                        None => loss,
                    }
                    .backward()?,
                ),
            };
            for (slot, p) in grads.iter_mut().zip(&sess.params) {
                let gi = g
                    .get(p.var.as_tensor())
                    .ok_or_else(|| TrainError::NoGradient {
                        name: p.name.clone(),
                    })?;
                *slot = Some(match slot.take() {
                    None => gi.clone(),
                    Some(acc) => (acc + gi)?,
                });
            }
            if k + 1 < micro.len() && abandon_now((k + 1) as f64 * per_micro) {
                abandoned = true;
                break;
            }
        }
        if abandoned {
            drop(grads);
            st.rng = rng_at_start;
            reporter.stage("saving")?;
            // At step 0 there is nothing to save: a restart from scratch is the same run.
            if last_saved != Some(step) && step > 0 {
                let snap = snapshot(&sess, &opt, &st)?;
                writer.start(snap, ctx.checkpoint_dir.clone(), rotation(&st))?;
            }
            writer.wait()?;
            reporter.stage("stopped")?;
            tracing::info!(
                step,
                "stopped on request: step {} abandoned to checkpoint within the grace period",
                step + 1
            );
            return Ok(WorkerOutcome::Stopped { step });
        }
        if !step_loss.is_finite() {
            return Err(TrainError::NonFinite {
                step: step + 1,
                loss: step_loss,
                f16: compute == DType::F16,
            });
        }
        let grads: Vec<Tensor> = grads.into_iter().map(|g| g.expect("filled")).collect();
        // Clipping (and f16's loss scale) is folded into the update: no rescaled copy of
        // every gradient.
        let scale = st.loss_scale.map_or(1.0, |ls| ls.scale);
        let (grad_norm, grad_factor) =
            optim::clip_factor_scaled(&grads, args.max_grad_norm, scale)?;
        // The schedule's own position: an f16 step skipped on overflow does not advance it
        // (as Trainer steps its scheduler only when the optimizer ran).
        let lr = optim::lr_at(
            args.lr_scheduler_type,
            args.learning_rate,
            st.lr_scheduler.next_step,
            total,
            warmup,
        );
        let apply = match &mut st.loss_scale {
            Some(ls) => ls.update(grad_norm.is_finite()),
            None => true,
        };
        if apply {
            opt.step_scaled(&sess.params, &grads, lr, grad_factor)?;
            st.lr_scheduler.next_step += 1;
        } else {
            tracing::info!(
                step = step + 1,
                loss_scale = scale,
                "f16 gradients overflowed; step skipped"
            );
        }
        drop(grads);

        let done = step + 1;
        st.step = done;
        st.adam_step = opt.step;
        st.position = plan.position(done);
        st.pending_loss_sum += step_loss;
        st.pending_steps += 1;
        step_secs.push(t_step.elapsed().as_secs_f64());

        let epoch_end = done.is_multiple_of(plan.steps_per_epoch);
        let evaluate = match args.eval_strategy {
            EvalStrategy::No => false,
            EvalStrategy::Steps => done.is_multiple_of(args.eval_every()) || done == total,
            EvalStrategy::Epoch => epoch_end || done == total,
        };
        let save = done.is_multiple_of(args.save_steps) || done == total;
        let eval_loss = if evaluate {
            let t_eval = Instant::now();
            reporter.stage("evaluating")?;
            let l = eval_loss(&sess, &device, compute, args.per_device_eval_batch_size)?;
            reporter.stage("training")?;
            // tokens_per_second is training throughput: the evaluation's time is left out.
            since += t_eval.elapsed();
            Some(l)
        } else {
            None
        };
        if let Some(metric) = eval_loss {
            let better = match st.best_metric {
                None => true,
                Some(best) if args.higher_is_better() => metric > best,
                Some(best) => metric < best,
            };
            // Only a metric whose weights are saved can be loaded back at the end.
            if better && save {
                st.best_metric = Some(metric);
                st.best_checkpoint = Some(checkpoint::dir_name(done));
            }
        }
        let log = done.is_multiple_of(args.logging_steps)
            || (done == 1 && args.logging_first_step)
            || done == total
            || eval_loss.is_some();
        if log {
            let secs = since.elapsed().as_secs_f64().max(1e-9);
            let rec = MetricsRecord {
                step: done,
                epoch: plan.epoch_after(done),
                loss: st.pending_loss_sum / st.pending_steps as f64,
                learning_rate: lr,
                grad_norm: grad_norm.is_finite().then_some(grad_norm),
                tokens_per_second: tokens_since as f64 / secs,
                eval_loss,
                peak_memory_bytes: peak_memory_bytes(&device),
            };
            // Debug only: the reporter prints the same record on stdout, which the job's
            // output (`jobctl logs`, `submit --follow`) shows next to this log.
            tracing::debug!(step = done, loss = rec.loss, eval_loss = ?eval_loss, lr, grad_norm,
                tokens_per_second = rec.tokens_per_second, "step");
            let line = reporter.append(&rec)?;
            st.log_history.push(line);
            st.pending_loss_sum = 0.0;
            st.pending_steps = 0;
            (tokens_since, since) = (0, Instant::now());
            reporter.progress.loss = Some(rec.loss);
            reporter.progress.peak_memory_bytes = rec.peak_memory_bytes;
        }
        reporter.progress.step = done;
        reporter.progress.epoch = Some(plan.epoch_after(done));
        if log || last_progress.elapsed().as_secs() >= 2 {
            reporter.write()?;
            last_progress = Instant::now();
        }
        if hooks.crash_after_step == Some(done) {
            writer.wait()?;
            return Err(TrainError::Checkpoint {
                path: PathBuf::new(),
                reason: format!("simulated crash after step {done}"),
            });
        }
        if hooks.stop_after_step == Some(done) {
            ctx.stop.request();
        }
        let stopping = ctx.stop.is_requested();
        if save || (stopping && last_saved != Some(done)) {
            let t0 = Instant::now();
            let snap = snapshot(&sess, &opt, &st)?;
            let bytes = snap.bytes();
            let secs = t0.elapsed().as_secs_f64();
            snapshot_secs = Some(secs);
            writer.start(snap, ctx.checkpoint_dir.clone(), rotation(&st))?;
            last_saved = Some(done);
            tracing::info!(
                step = done,
                bytes,
                snapshot_seconds = secs,
                "checkpoint snapshot taken; writing in the background"
            );
        }
        if stopping {
            reporter.stage("saving")?;
            writer.wait()?;
            reporter.stage("stopped")?;
            tracing::info!(step = done, "stopped on request after checkpointing");
            return Ok(WorkerOutcome::Stopped { step: done });
        }
    }
    writer.wait()?;
    if st.step != total {
        return Err(TrainError::Incomplete {
            done: st.step,
            planned: total,
        });
    }
    if !step_secs.is_empty() {
        let mean = step_secs.iter().sum::<f64>() / step_secs.len() as f64;
        tracing::info!(
            steps = step_secs.len(),
            mean_step_seconds = mean,
            "training finished"
        );
    }
    if args.load_best_model_at_end
        && let Some(best) = &st.best_checkpoint
    {
        let dir = ctx.checkpoint_dir.join(best);
        checkpoint::verify(&dir).map_err(|reason| TrainError::Checkpoint {
            path: dir.clone(),
            reason: format!("best checkpoint unusable: {reason}"),
        })?;
        let loaded = checkpoint::load(&dir, &device)?;
        for p in &sess.params {
            let t = loaded
                .weights
                .get(&p.name)
                .ok_or_else(|| TrainError::MissingTensor {
                    name: p.name.clone(),
                })?;
            p.var.set(t)?;
        }
        tracing::info!(checkpoint = %dir.display(), metric = ?st.best_metric, "loaded the best model");
    }
    reporter.stage("saving")?;
    save_pretrained(
        &sess.model,
        &sess.tok,
        s.model.base.as_deref(),
        sess.chat_template.as_deref(),
        &ctx.output_dir,
    )?;
    reporter.stage("done")?;
    Ok(WorkerOutcome::Completed { steps: st.step })
}

/// Chooses the checkpoint to resume from, refusing one of another job file.
fn find_resume(
    args: &TrainingArgs,
    root: &Path,
    spec: &JobSpec,
) -> Result<Option<(PathBuf, TrainerState)>, TrainError> {
    let own = checkpoint::latest_valid(root);
    let found = match &args.resume_from_checkpoint {
        ResumeFrom::Auto => own,
        // The setting says where the job's first start begins. Once this job has checkpoints
        // of its own (it was preempted, stopped with the daemon, or requeued), later attempts
        // go on from them: starting over, or from the given checkpoint, would throw away its
        // progress at every interruption, and fail for good once that checkpoint is gone.
        _ if own
            .as_ref()
            .is_some_and(|(_, state)| checkpoint::matches(state, spec).is_ok()) =>
        {
            tracing::info!(
                "resume_from_checkpoint applies to the job's first start; this attempt goes on \
                 from the job's own newest checkpoint"
            );
            own
        }
        ResumeFrom::Never => None,
        ResumeFrom::Path(p) => {
            let state = checkpoint::verify(p).map_err(|reason| TrainError::Checkpoint {
                path: p.clone(),
                reason,
            })?;
            Some((p.clone(), state))
        }
    };
    if let Some((dir, state)) = &found
        && let Err(differences) = checkpoint::matches(state, spec)
    {
        return Err(TrainError::CheckpointMismatch {
            path: dir.clone(),
            expected: checkpoint::spec_hash(spec)[..12].to_string(),
            found: state.spec_hash.chars().take(12).collect(),
            differences,
        });
    }
    Ok(found)
}

/// Texts to train a tokenizer on: the lines of a text file, or the fields of JSON lines, and
/// conversations as `chat` renders them, their turn markers left out (they become special
/// tokens). Also whether there were conversations.
fn tokenizer_texts(
    path: &Path,
    format: DataFormat,
    chat: &ChatTemplate,
) -> Result<(Vec<String>, bool), TrainError> {
    let text = data::read_text(path)?;
    let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
    let jsonl = format.reads_jsonl(path);
    if !jsonl {
        return Ok((
            text.split_inclusive('\n').map(str::to_string).collect(),
            false,
        ));
    }
    let mut out = Vec::new();
    let mut has_chat = false;
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        // Malformed lines are reported with their line number by the data loader later.
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        for k in ["text", "prompt", "completion"] {
            if let Some(s) = v.get(k).and_then(|s| s.as_str()) {
                out.push(s.to_string());
            }
        }
        if let Some(Ok(messages)) = v.get("messages").map(crate::chat::check_messages) {
            has_chat = true;
            if let Ok(rendered) = chat.render(messages, false) {
                let mut pieces = vec![rendered];
                for marker in CHATML_TOKENS {
                    pieces = pieces
                        .iter()
                        .flat_map(|p| p.split(marker).map(str::to_string))
                        .collect();
                }
                out.extend(pieces.into_iter().filter(|p| !p.is_empty()));
            }
        }
    }
    Ok((out, has_chat))
}

/// The chat template conversations are rendered with: `data.chat_template`'s file, else the
/// base model's (`tokenizer_config.json`), else, from scratch, ChatML. `None`: a base without
/// a template (conversations in its data are then an error naming the line).
fn chat_template(s: &Sections<'_>, tok: Option<&Tok>) -> Result<Option<ChatTemplate>, TrainError> {
    let source = match (&s.data.chat_template, &s.model.base) {
        (Some(file), _) => Some(crate::chat::read_template_file(file).map_err(|e| {
            TrainError::option("data.chat_template", format!("{}: {e}", file.display()))
        })?),
        (None, Some(base)) => crate::chat::template_in_dir(base),
        (None, None) => Some(CHATML.to_string()),
    };
    let Some(source) = source else {
        return Ok(None);
    };
    let (bos, eos) = match tok {
        Some(t) => (t.bos_token.as_deref(), t.eos_token.as_deref()),
        None => (None, Some(tokenizer::EOS_TOKEN)),
    };
    ChatTemplate::new(&source, bos, eos)
        .map(Some)
        .map_err(|e| TrainError::option("data.chat_template", e))
}

fn build_session(
    s: &Sections<'_>,
    ctx: &WorkerContext,
    device: &Device,
    loaded: Option<&checkpoint::Loaded>,
) -> Result<Session, TrainError> {
    let args = &s.args;
    let saved_tokenizer = loaded.and_then(|l| l.tokenizer_json.as_deref());
    let (cfg, tok, chat) = match &s.model.base {
        Some(base) => {
            let cfg = LlamaConfig::load(&base.join("config.json"))?;
            let tok = tokenizer::load(&base.join("tokenizer.json"), &cfg.eos_ids())?;
            if tok.vocab_size() > cfg.vocab_size {
                return Err(TrainError::option(
                    "model.base",
                    format!(
                        "tokenizer.json has {} tokens but the model's vocab_size is {}: \
                         tokenizer and model do not match",
                        tok.vocab_size(),
                        cfg.vocab_size
                    ),
                ));
            }
            let chat = chat_template(s, Some(&tok))?;
            (cfg, tok, chat)
        }
        None => {
            let vocab = s.model.vocab_size.unwrap_or(512);
            let chat = chat_template(s, None)?.expect("from scratch, ChatML at least");
            let tok = match saved_tokenizer {
                Some(json) => tokenizer::from_json(json, &ctx.checkpoint_dir)?,
                None => {
                    early_stage(&ctx.job_dir, "training tokenizer")?;
                    let (texts, has_chat) =
                        tokenizer_texts(&s.data.train_file, s.data.format, &chat)?;
                    // The markers get their own tokens when the data is chat and the
                    // template writes them (ChatML does).
                    let specials: Vec<&str> = CHATML_TOKENS
                        .into_iter()
                        .filter(|m| has_chat && chat.source().contains(m))
                        .collect();
                    tokenizer::train_bpe_with(
                        texts.into_iter(),
                        vocab,
                        &s.data.train_file,
                        &specials,
                    )?
                }
            };
            let block = s.data.block_size.unwrap_or(1024);
            let mut cfg = LlamaConfig::scratch(s.model, block, vocab);
            cfg.eos_token_id = tok.eos.map(serde_json::Value::from);
            cfg.check()
                .map_err(|reason| TrainError::option("model", reason))?;
            (cfg, tok, Some(chat))
        }
    };
    let block = s
        .data
        .block_size
        .unwrap_or_else(|| cfg.max_position_embeddings.min(1024));
    if block > cfg.max_position_embeddings {
        return Err(TrainError::option(
            "data.block_size",
            format!(
                "{block} exceeds the model's context of {} tokens (max_position_embeddings)",
                cfg.max_position_embeddings
            ),
        ));
    }
    early_stage(&ctx.job_dir, "tokenizing")?;
    let load = |file: &Path| {
        data::load(
            file,
            s.data.format,
            &tok,
            chat.as_ref(),
            block,
            &ctx.job_dir,
        )
    };
    let train_ds = load(&s.data.train_file)?;
    let data_key = train_ds.key.clone();
    let mut has_chat = train_ds.chat;
    let (train, eval) = match (&s.data.eval_file, s.data.eval_split) {
        (Some(f), _) => {
            let e: Dataset = load(f)?;
            has_chat |= e.chat;
            (train_ds.examples, e.examples)
        }
        (None, Some(frac)) => data::split(train_ds.examples, frac, args.seed, &s.data.train_file)?,
        (None, None) => (train_ds.examples, Vec::new()),
    };
    let max_id = train
        .iter()
        .chain(&eval)
        .flat_map(|e| e.ids.iter())
        .max()
        .copied()
        .unwrap_or(0);
    if max_id as usize >= cfg.vocab_size {
        return Err(TrainError::option(
            "model",
            format!(
                "the tokenizer produced id {max_id} but the model has only {} embeddings: \
                 tokenizer and model vocabularies do not match",
                cfg.vocab_size
            ),
        ));
    }
    let weights = match (loaded, s.lora, &s.model.base) {
        // Resuming full fine-tuning: the checkpoint holds every weight, so the base model
        // or the initialisation would only be overwritten.
        (Some(l), None, _) => l.weights.clone(),
        (_, _, Some(base)) => {
            early_stage(&ctx.job_dir, "loading model")?;
            let weights = load_hf_weights(base, device)?;
            model::check_checkpoint(&cfg, &weights, base)?;
            weights
        }
        (_, _, None) => {
            let mut rng = Rng::derive(args.seed, "init", 0);
            model::init_weights(&cfg, &mut rng, device)?
        }
    };
    let (model, params) = match s.lora {
        None => full_params(cfg, weights, device)?,
        Some(l) => lora_params(
            cfg,
            weights,
            l,
            args.seed,
            compute_dtype(args.dtype),
            device,
        )?,
    };
    // The trained model keeps the template it learned: a base's own stays in the copy of its
    // tokenizer_config.json, so only one given in the job file, or ChatML for a model from
    // scratch that learned conversations, is written.
    let chat_template = chat
        .filter(|_| s.data.chat_template.is_some() || (s.model.base.is_none() && has_chat))
        .map(|c| c.source().to_string());
    Ok(Session {
        model,
        params,
        tok,
        train,
        eval,
        data_key,
        lora: s.lora.is_some(),
        chat_template,
    })
}

/// Every weight trainable: each becomes a `Var` the model reads.
fn full_params(
    cfg: LlamaConfig,
    weights: BTreeMap<String, Tensor>,
    device: &Device,
) -> Result<(Llama, Vec<Param>), TrainError> {
    let mut vars = BTreeMap::new();
    let mut params = Vec::new();
    for (name, _) in model::parameter_shapes(&cfg) {
        let t = weights
            .get(&name)
            .ok_or_else(|| TrainError::MissingTensor { name: name.clone() })?;
        let var = Var::from_tensor(t)?;
        vars.insert(name.clone(), var.as_tensor().clone());
        // As Trainer does: no weight decay on biases and norm weights.
        let decay = !(name.ends_with(".bias") || name.contains("norm"));
        params.push(Param { name, var, decay });
    }
    Ok((Llama::new(cfg, &vars, device)?, params))
}

/// The Candle type of a job's compute type.
fn compute_dtype(dtype: TrainDType) -> DType {
    match dtype {
        TrainDType::F32 => DType::F32,
        TrainDType::Bf16 => DType::BF16,
        TrainDType::F16 => DType::F16,
    }
}

/// LoRA: base weights frozen (plain tensors, no gradient, held as [`model::frozen_base`]
/// says in the compute type `frozen`), adapters trainable. `A` starts uniform in
/// ±1/√in (PEFT's Kaiming-uniform with a = √5), `B` at zero.
fn lora_params(
    cfg: LlamaConfig,
    weights: BTreeMap<String, Tensor>,
    l: &LoraSpec,
    seed: u64,
    frozen: DType,
    device: &Device,
) -> Result<(Llama, Vec<Param>), TrainError> {
    let weights = model::frozen_base(weights, frozen)?;
    let mut model = Llama::new(cfg, &weights, device)?;
    drop(weights);
    let mut rng = Rng::derive(seed, "lora_init", 0);
    let mut params = Vec::new();
    let scale = l.lora_alpha / l.r as f64;
    for (li, blk) in model.layers.iter_mut().enumerate() {
        for (name, lin) in blk.linears_mut() {
            if !l.target_modules.iter().any(|t| t == name) {
                continue;
            }
            let (out, inp) = lin.weight.dims2()?;
            let mut a = vec![0f32; l.r * inp];
            rng.fill_uniform(&mut a, 1.0 / (inp as f64).sqrt());
            let a = Var::from_tensor(&Tensor::from_vec(a, (l.r, inp), device)?)?;
            let b = Var::from_tensor(&Tensor::zeros((out, l.r), DType::F32, device)?)?;
            attach(lin, &a, &b, scale, l.lora_dropout);
            let path = model::module_path(li, name);
            params.push(Param {
                name: format!("{path}.lora_A.weight"),
                var: a,
                decay: true,
            });
            params.push(Param {
                name: format!("{path}.lora_B.weight"),
                var: b,
                decay: true,
            });
        }
    }
    Ok((model, params))
}

fn attach(lin: &mut Linear, a: &Var, b: &Var, scale: f64, dropout: f64) {
    lin.lora = Some(Lora {
        a: a.as_tensor().clone(),
        b: b.as_tensor().clone(),
        scale,
        dropout,
    });
}

/// Loads a checkpoint's weights and moments into the session and optimizer.
fn restore(
    dir: &Path,
    saved: &TrainerState,
    loaded: &checkpoint::Loaded,
    sess: &mut Session,
    opt: &mut AdamW,
    fresh: &TrainerState,
) -> Result<(), TrainError> {
    let bad = |reason: String| TrainError::Checkpoint {
        path: dir.to_path_buf(),
        reason,
    };
    if saved.data_key != fresh.data_key {
        return Err(bad(
            "the training data changed since this checkpoint was written (a data file, \
             data.block_size, data.format, the tokenizer, or data.chat_template's file): put \
             it back as it was to go on from here, or start over (`jobctl resubmit`, or a job \
             with resume_from_checkpoint = false)"
                .into(),
        ));
    }
    if saved.total_steps != fresh.total_steps || saved.trainable != fresh.trainable {
        return Err(bad(format!(
            "planned {} {} steps, this run plans {} {} steps",
            saved.total_steps, saved.trainable, fresh.total_steps, fresh.trainable
        )));
    }
    for (i, p) in sess.params.iter().enumerate() {
        let get = |map: &BTreeMap<String, Tensor>, what: &str| {
            map.get(&p.name)
                .cloned()
                .ok_or_else(|| bad(format!("{what} of {} missing", p.name)))
        };
        let w = get(&loaded.weights, "weights")?;
        if w.dims() != p.var.dims() {
            return Err(bad(format!(
                "{} has shape {:?}, expected {:?}",
                p.name,
                w.dims(),
                p.var.dims()
            )));
        }
        p.var.set(&w)?;
        opt.m[i] = get(&loaded.m, "moment m")?;
        opt.v[i] = get(&loaded.v, "moment v")?;
    }
    opt.step = saved.adam_step;
    Ok(())
}

fn snapshot(sess: &Session, opt: &AdamW, st: &TrainerState) -> Result<Snapshot, TrainError> {
    let mut weights = BTreeMap::new();
    let mut moments = BTreeMap::new();
    for (i, p) in sess.params.iter().enumerate() {
        weights.insert(p.name.clone(), p.var.as_tensor().clone());
        moments.insert(format!("m.{}", p.name), opt.m[i].clone());
        moments.insert(format!("v.{}", p.name), opt.v[i].clone());
    }
    Snapshot::take(&weights, &moments, st, &sess.tok.to_json()?)
}

/// Which backward the trainer runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backward {
    /// [`direct`]: f32 on the CPU.
    Direct,
    /// [`direct_ops`]: the fused ops without a graph (CUDA; LoRA on the CPU).
    DirectOps,
    /// Candle's autograd over the model's ops.
    Autograd,
}

impl Backward {
    fn name(self) -> &'static str {
        match self {
            Backward::Direct => "direct",
            Backward::DirectOps => "direct over ops",
            Backward::Autograd => "autograd",
        }
    }
}

/// A micro-batch's forward, waiting for its backward.
enum Pending {
    Direct(Box<direct::Forward>),
    DirectOps(Box<direct_ops::Forward>),
    Autograd(Tensor),
}

/// A micro-batch's gradients, by weight.
enum Grads {
    Direct(direct::StepGrads),
    Autograd(candle_core::backprop::GradStore),
}

impl Grads {
    fn get(&self, weight: &Tensor) -> Option<&Tensor> {
        match self {
            Grads::Direct(g) => g.get(weight),
            Grads::Autograd(g) => g.get(weight),
        }
    }
}

/// What the trainer knows when a stop request finds it mid-step.
#[derive(Debug, Clone, Copy)]
struct StepStop {
    /// The state at the step's start is already checkpointed (or being written).
    saved_at_step: bool,
    /// Fraction of the step's work done (0..1).
    fraction_done: f64,
    /// Seconds since the step began.
    elapsed: f64,
    /// Mean seconds per step in this run so far (`None` on the first step).
    mean_step: Option<f64>,
    /// Expected seconds to snapshot and write a checkpoint.
    save_secs: f64,
    /// Seconds left before SIGKILL (`None`: unknown).
    grace_left: Option<f64>,
}

/// Whether to abandon the step in progress rather than finish it before checkpointing.
/// Abandoning loses only the step's partial work; finishing first is worth it unless it would
/// not fit in the grace period. Where the step's start is already checkpointed, abandoning
/// loses nothing and exits soonest.
fn abandon_step(s: &StepStop) -> bool {
    if s.saved_at_step {
        return true;
    }
    let Some(left) = s.grace_left else {
        return false;
    };
    let finish = match s.mean_step {
        Some(mean) => (mean - s.elapsed).max(0.0),
        None => s.elapsed * (1.0 - s.fraction_done) / s.fraction_done.max(1e-3),
    };
    // A margin for the estimates and for the process's exit.
    (finish + s.save_secs) * 1.25 + 1.0 > left
}

/// A first guess of a checkpoint's cost before one was measured: the trainable weights and
/// their two AdamW moments in f32, written and hashed at a conservative 50 MB/s.
fn save_secs_guess(sess: &Session) -> f64 {
    let elements: usize = sess
        .params
        .iter()
        .map(|p| p.var.as_tensor().elem_count())
        .sum();
    0.5 + (elements * 12) as f64 / 50e6
}

/// Mean loss per labelled token over the evaluation examples (no dropout).
fn eval_loss(
    sess: &Session,
    device: &Device,
    compute: DType,
    batch: usize,
) -> Result<f64, TrainError> {
    let pad = sess.tok.eos.unwrap_or(0);
    let (mut sum, mut count) = (0f64, 0usize);
    for chunk in sess.eval.chunks(batch.max(1)) {
        let exs: Vec<&Example> = chunk.iter().collect();
        let b = data::batch(&exs, pad, device)?;
        let mut pass = Pass::new(compute, None);
        let loss = sess
            .model
            .forward_loss(&b.ids, &b.labels, &b.mask, &mut pass, false)?;
        sum += loss.to_scalar::<f32>()? as f64;
        count += b.labelled;
    }
    Ok(sum / count.max(1) as f64)
}

/// Writes the model as `save_pretrained` would: `config.json`, `model.safetensors` (adapters
/// merged), `generation_config.json`, `tokenizer.json`, `tokenizer_config.json` (the base's,
/// with `chat_template` set to `chat_template` if given); files 0644.
pub fn save_pretrained(
    model: &Llama,
    tok: &Tok,
    base: Option<&Path>,
    chat_template: Option<&str>,
    out: &Path,
) -> Result<(), TrainError> {
    std::fs::create_dir_all(out).map_err(|e| TrainError::io(out, e))?;
    let mut cfg = model.cfg.clone();
    if cfg.eos_token_id.is_none() {
        cfg.eos_token_id = tok.eos.map(serde_json::Value::from);
    }
    let json = |v: &serde_json::Value| serde_json::to_vec_pretty(v).expect("json serializes");
    write_atomic(&out.join("config.json"), &json(&cfg.to_json()))?;
    save_safetensors(&out.join("model.safetensors"), &model.merged_weights()?)?;
    write_atomic(&out.join("tokenizer.json"), tok.to_json()?.as_bytes())?;
    let copy_or = |name: &str,
                   fallback: serde_json::Value,
                   set: Option<(&str, &str)>|
     -> Result<(), TrainError> {
        let src = base.map(|b| b.join(name)).filter(|p| p.is_file());
        let mut bytes = match src {
            Some(p) => std::fs::read(&p).map_err(|e| TrainError::io(&p, e))?,
            None => json(&fallback),
        };
        if let Some((key, value)) = set {
            let mut v: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| {
                TrainError::option("model.base", format!("{name} is not valid JSON: {e}"))
            })?;
            if let Some(obj) = v.as_object_mut() {
                obj.insert(key.into(), value.into());
            }
            bytes = json(&v);
        }
        write_atomic(&out.join(name), &bytes)
    };
    copy_or(
        "generation_config.json",
        serde_json::json!({
            "bos_token_id": cfg.bos_token_id,
            "eos_token_id": cfg.eos_token_id,
            "do_sample": false,
        }),
        None,
    )?;
    copy_or(
        "tokenizer_config.json",
        serde_json::json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "model_max_length": cfg.max_position_embeddings,
            "eos_token": tok.eos_token,
            "bos_token": tok.bos_token,
            "pad_token": tok.eos_token,
            "clean_up_tokenization_spaces": false,
        }),
        chat_template.map(|t| ("chat_template", t)),
    )?;
    // What rendering the model's template shows, for publishing (the daemon never renders
    // a user's template).
    let template = chat_template
        .map(str::to_string)
        .or_else(|| base.and_then(crate::chat::template_in_dir));
    let defaults = template
        .and_then(|t| {
            ChatTemplate::new(&t, tok.bos_token.as_deref(), tok.eos_token.as_deref()).ok()
        })
        .map(|t| crate::chat::ChatDefaults::of(&t))
        .unwrap_or_default();
    let defaults_path = out.join(crate::chat::ChatDefaults::FILE);
    if defaults == crate::chat::ChatDefaults::default() {
        let _ = std::fs::remove_file(&defaults_path);
    } else {
        write_atomic(&defaults_path, &json(&serde_json::json!(defaults)))?;
    }
    if let Some(b) = base {
        let p = b.join("special_tokens_map.json");
        if p.is_file() {
            let bytes = std::fs::read(&p).map_err(|e| TrainError::io(&p, e))?;
            write_atomic(&out.join("special_tokens_map.json"), &bytes)?;
        }
    }
    tracing::info!(dir = %out.display(), "model written");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{StepStop, abandon_step};

    fn stop(grace_left: Option<f64>) -> StepStop {
        StepStop {
            saved_at_step: false,
            fraction_done: 0.5,
            elapsed: 10.0,
            mean_step: Some(20.0),
            save_secs: 5.0,
            grace_left,
        }
    }

    #[test]
    fn a_step_is_finished_when_that_and_the_save_fit_in_the_grace() {
        // 10 s left of the step + 5 s to save, with the margin: 19.75 s.
        assert!(!abandon_step(&stop(Some(30.0))));
        assert!(!abandon_step(&stop(Some(20.0))));
        assert!(abandon_step(&stop(Some(19.0))));
        assert!(abandon_step(&stop(Some(-1.0))));
        // Unknown grace: finish, as a plain SIGTERM handler would.
        assert!(!abandon_step(&stop(None)));
    }

    #[test]
    fn without_a_step_time_the_rest_is_extrapolated_from_the_part_done() {
        let s = StepStop {
            mean_step: None,
            fraction_done: 0.25,
            elapsed: 4.0,
            ..stop(Some(25.0))
        };
        // 12 s more + 5 s: 22.25 s with the margin.
        assert!(!abandon_step(&s));
        assert!(abandon_step(&StepStop {
            grace_left: Some(22.0),
            ..s
        }));
    }

    #[test]
    fn a_step_whose_start_is_saved_is_abandoned_whatever_the_grace() {
        let s = StepStop {
            saved_at_step: true,
            ..stop(None)
        };
        assert!(abandon_step(&s));
    }
}
