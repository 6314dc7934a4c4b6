//! Checkpoints and exact resume (issue 5), through the library: a run interrupted by the
//! stop flag or by a simulated kill and then resumed gives weights bit-identical to an
//! uninterrupted run with the same seed and the same metrics records, for several seeds and
//! interruption points, full fine-tuning and LoRA with dropout; a corrupt or truncated newest
//! checkpoint is skipped for the previous one; a stop mid-step abandons the step when finishing
//! it would not fit in the grace period; rotation keeps the newest N plus the best;
//! a checkpoint from a different job file is refused.

mod common;

use std::path::Path;

use common::{ctx, tiny_lines, write_base};
use jobd::spec::JobSpec;
use jobd::train::checkpoint;
use jobd::train::metrics::{DeterministicFields, MetricsRecord, read_metrics};
use jobd::train::trainer::{Hooks, run_with};
use jobd::train::{self, TrainError, WorkerOutcome};

/// A scratch job small enough to run in about a second: 2 epochs of 150 examples in
/// micro-batches of 8 with 2-step accumulation (10 steps per epoch, the last group short),
/// evaluation every 4 steps, a checkpoint every 4 steps.
fn scratch_job(seed: u64, extra: &str) -> String {
    format!(
        r#"
kind = "train"
[model]
init = "scratch"
hidden_size = 32
intermediate_size = 64
num_hidden_layers = 2
num_attention_heads = 4
num_key_value_heads = 2
vocab_size = 300
[data]
train_file = "train.jsonl"
eval_split = 0.1
block_size = 16
[training]
num_train_epochs = 2
per_device_train_batch_size = 8
gradient_accumulation_steps = 2
learning_rate = 3e-3
lr_scheduler_type = "cosine"
warmup_steps = 3
weight_decay = 0.01
logging_steps = 3
logging_first_step = true
eval_strategy = "steps"
eval_steps = 4
save_steps = 4
seed = {seed}
{extra}
"#
    )
}

fn lora_job(seed: u64) -> String {
    lora_job_with(seed, "")
}

fn lora_job_with(seed: u64, extra: &str) -> String {
    format!(
        r#"
kind = "train"
[model]
base = "base"
[data]
train_file = "train.jsonl"
block_size = 16
[training]
max_steps = 12
per_device_train_batch_size = 8
learning_rate = 1e-2
logging_steps = 2
save_steps = 5
seed = {seed}
{extra}
[lora]
r = 4
lora_alpha = 8
lora_dropout = 0.2
target_modules = ["q_proj", "v_proj", "gate_proj"]
"#
    )
}

fn spec(dir: &Path, text: &str) -> JobSpec {
    jobd::spec::job::parse_and_resolve("job.toml", text, dir).unwrap()
}

fn workspace() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("train.jsonl"), tiny_lines(167)).unwrap();
    dir
}

fn weights(job: &Path) -> Vec<u8> {
    std::fs::read(job.join("output/model.safetensors")).unwrap()
}

fn records(job: &Path) -> Vec<DeterministicFields> {
    read_metrics(job)
        .unwrap()
        .iter()
        .map(MetricsRecord::deterministic)
        .collect()
}

/// Runs the job uninterrupted in `dir/reference`; returns the job dir.
fn reference(dir: &Path, s: &JobSpec) -> std::path::PathBuf {
    let job = dir.join("reference");
    let out = train::run(s, &ctx(&job)).unwrap();
    assert!(matches!(out, WorkerOutcome::Completed { .. }));
    job
}

fn assert_same_result(a: &Path, b: &Path) {
    assert!(
        weights(a) == weights(b),
        "final weights differ between {a:?} and {b:?}"
    );
    let (ra, rb) = (records(a), records(b));
    assert_eq!(ra, rb, "metrics records differ");
    let steps: Vec<u64> = ra.iter().map(|r| r.0).collect();
    let mut dedup = steps.clone();
    dedup.dedup();
    assert_eq!(steps, dedup, "one record per logged step");
}

#[test]
fn stop_and_resume_is_bit_identical() {
    for (seed, stop_at) in [(1u64, 5u64), (7, 10), (7, 13)] {
        let dir = workspace();
        let s = spec(dir.path(), &scratch_job(seed, ""));
        let reference = reference(dir.path(), &s);
        let job = dir.path().join(format!("interrupted-{stop_at}"));
        let hooks = Hooks {
            stop_after_step: Some(stop_at),
            ..Hooks::default()
        };
        let out = run_with(&s, &ctx(&job), &hooks).unwrap();
        assert_eq!(out, WorkerOutcome::Stopped { step: stop_at });
        assert!(checkpoint::verify(&job.join(format!("checkpoints/checkpoint-{stop_at}"))).is_ok());
        assert!(!job.join("output/model.safetensors").exists());
        let out = train::run(&s, &ctx(&job)).unwrap();
        assert_eq!(out, WorkerOutcome::Completed { steps: 20 });
        assert_same_result(&reference, &job);
    }
}

/// Runs `plain` uninterrupted (in `dir/reference`, returned), then stopped after `stop_at`
/// steps and resumed as `resumed` (the same job with `gradient_checkpointing` on), all with
/// `hooks`; the two runs must end with the same bits and records after `steps` steps.
fn stop_and_resume_with_checkpointing(
    dir: &Path,
    (plain, resumed): (&JobSpec, &JobSpec),
    hooks: &Hooks,
    stop_at: u64,
    steps: u64,
) -> std::path::PathBuf {
    let reference = dir.join("reference");
    let out = run_with(plain, &ctx(&reference), hooks).unwrap();
    assert_eq!(out, WorkerOutcome::Completed { steps });
    let interrupted = dir.join("interrupted");
    let stopping = Hooks {
        stop_after_step: Some(stop_at),
        ..hooks.clone()
    };
    assert_eq!(
        run_with(plain, &ctx(&interrupted), &stopping).unwrap(),
        WorkerOutcome::Stopped { step: stop_at }
    );
    let out = run_with(resumed, &ctx(&interrupted), hooks).unwrap();
    assert_eq!(out, WorkerOutcome::Completed { steps });
    assert_same_result(&reference, &interrupted);
    reference
}

/// Whether the mean loss of the last record is below `factor` times the first's.
fn learned(job: &Path, factor: f64) -> bool {
    let losses: Vec<f64> = read_metrics(job).unwrap().iter().map(|r| r.loss).collect();
    losses.last().unwrap() < &(losses[0] * factor)
}

/// The trainer's path through `direct_ops` (the op-level step CUDA takes), run here on the
/// CPU: a run stopped and resumed (with `gradient_checkpointing` turned on for the second
/// part) ends with the same bits and records as an uninterrupted one, and learns.
#[test]
fn op_level_step_resumes_bit_identically() {
    let dir = workspace();
    let ops = Hooks {
        direct_ops_on_cpu: true,
        ..Hooks::default()
    };
    let jobs = (
        &spec(dir.path(), &scratch_job(5, "")),
        &spec(dir.path(), &scratch_job(5, "gradient_checkpointing = true")),
    );
    let reference = stop_and_resume_with_checkpointing(dir.path(), jobs, &ops, 9, 20);
    assert!(learned(&reference, 0.8), "the loss went down");
}

/// The same trainer path in bf16 and in f16 (the CPU's ops store 16-bit activations and
/// compute in f32, as CUDA's kernels do; f16 with the dynamic loss scale): each learns, and a
/// run stopped and resumed (with `gradient_checkpointing` for the second part) ends with the
/// same bits and records as an uninterrupted one, so the loss scale's state is checkpointed
/// exactly. Without the hook such a job is refused on the CPU.
#[test]
fn op_level_step_in_bf16_and_f16_resumes_bit_identically() {
    for dtype in ["bf16", "f16"] {
        let dir = workspace();
        let job = |extra: &str| {
            let text = scratch_job(5, &format!("dtype = \"{dtype}\"\n{extra}"));
            spec(dir.path(), &format!("{text}\n[resources]\ngpus = 1\n"))
        };
        let err = train::run(&job(""), &ctx(&dir.path().join("refused"))).unwrap_err();
        assert!(err.to_string().contains("needs a CUDA device"), "{err}");
        // f16 starts with a loss scale so large that the first steps overflow.
        let ops = Hooks {
            direct_ops_on_cpu: true,
            initial_loss_scale: (dtype == "f16").then_some(2f64.powi(24)),
            ..Hooks::default()
        };
        let jobs = (&job(""), &job("gradient_checkpointing = true"));
        let reference = stop_and_resume_with_checkpointing(dir.path(), jobs, &ops, 9, 20);
        // (f16 skips its first few steps.)
        assert!(learned(&reference, 0.85), "{dtype}: the loss went down");
        if dtype == "f16" {
            // Some steps overflowed at the start: skipped, and the scale halved each time; the
            // first (logged) one records no gradient norm.
            let first = &read_metrics(&reference).unwrap()[0];
            assert_eq!((first.step, first.grad_norm), (1, None));
            let state = reference.join("checkpoints/checkpoint-20/trainer_state.json");
            let state: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(state).unwrap()).unwrap();
            let scale = state["loss_scale"]["scale"].as_f64().unwrap();
            assert!(scale < 2f64.powi(24), "the scale backed off: {scale}");
            assert!(scale >= 1.0, "{scale}");
            // Each skipped step halved the scale and advanced neither AdamW nor the schedule.
            let skipped = 24 - scale.log2() as u64;
            assert_eq!(state["adam_step"], 20 - skipped);
            assert_eq!(state["lr_scheduler"]["next_step"], 20 - skipped);
        }
    }
}

/// LoRA in bf16 on the CPU through the op-level step, as CUDA runs it: the frozen base held in
/// bf16, f32 adapters with dropout; a run stopped and resumed with `gradient_checkpointing`
/// ends with the same bits as an uninterrupted one.
#[test]
fn lora_in_bf16_resumes_bit_identically() {
    let dir = workspace();
    write_base(&dir.path().join("base"), 300, 64);
    let job = |extra: &str| {
        let text = lora_job_with(4, &format!("dtype = \"bf16\"\n{extra}"));
        spec(dir.path(), &format!("{text}\n[resources]\ngpus = 1\n"))
    };
    let ops = Hooks {
        direct_ops_on_cpu: true,
        ..Hooks::default()
    };
    let jobs = (&job(""), &job("gradient_checkpointing = true"));
    stop_and_resume_with_checkpointing(dir.path(), jobs, &ops, 5, 12);
}

/// `gradient_checkpointing` recomputes activations instead of keeping them: a run stopped
/// without it and resumed with it ends with the same bits as an uninterrupted run without it
/// (and its checkpoints are accepted: the flag is not part of the spec hash).
#[test]
fn resuming_with_gradient_checkpointing_is_bit_identical() {
    let dir = workspace();
    let s = spec(dir.path(), &scratch_job(11, ""));
    let reference = reference(dir.path(), &s);
    let job = dir.path().join("interrupted");
    let hooks = Hooks {
        stop_after_step: Some(7),
        ..Hooks::default()
    };
    run_with(&s, &ctx(&job), &hooks).unwrap();
    let checkpointed = spec(
        dir.path(),
        &scratch_job(11, "gradient_checkpointing = true"),
    );
    assert!(
        checkpointed
            .training
            .as_ref()
            .unwrap()
            .gradient_checkpointing
    );
    assert_eq!(
        checkpoint::spec_hash(&checkpointed),
        checkpoint::spec_hash(&s)
    );
    let out = train::run(&checkpointed, &ctx(&job)).unwrap();
    assert_eq!(out, WorkerOutcome::Completed { steps: 20 });
    assert_same_result(&reference, &job);
}

#[test]
fn crash_and_resume_is_bit_identical() {
    for (seed, crash_at) in [(3u64, 6u64), (5, 11)] {
        let dir = workspace();
        let s = spec(dir.path(), &scratch_job(seed, ""));
        let reference = reference(dir.path(), &s);
        let job = dir.path().join("crashed");
        let hooks = Hooks {
            crash_after_step: Some(crash_at),
            ..Hooks::default()
        };
        run_with(&s, &ctx(&job), &hooks).unwrap_err();
        // Records after the last checkpoint were written before the crash...
        let before: Vec<u64> = read_metrics(&job).unwrap().iter().map(|r| r.step).collect();
        let (_, last) = checkpoint::latest_valid(&job.join("checkpoints")).unwrap();
        assert!(last.step < crash_at);
        assert!(
            *before.last().unwrap() > last.step,
            "{before:?} vs checkpoint {}",
            last.step
        );
        // ...and are replaced, not duplicated, on resume from the last checkpoint.
        let out = train::run(&s, &ctx(&job)).unwrap();
        assert_eq!(out, WorkerOutcome::Completed { steps: 20 });
        assert_same_result(&reference, &job);
    }
}

#[test]
fn lora_with_dropout_resumes_bit_identically() {
    let dir = workspace();
    write_base(&dir.path().join("base"), 300, 64);
    // The second run resumes with gradient_checkpointing on: recomputed layers draw the same
    // dropout masks, so the bits still match.
    for (seed, stop_at, resume_extra) in [(2u64, 3u64, ""), (9, 7, "gradient_checkpointing = true")]
    {
        let s = spec(dir.path(), &lora_job(seed));
        let reference = dir.path().join(format!("reference-{seed}"));
        train::run(&s, &ctx(&reference)).unwrap();
        let job = dir.path().join(format!("interrupted-{seed}"));
        let hooks = Hooks {
            stop_after_step: Some(stop_at),
            ..Hooks::default()
        };
        let out = run_with(&s, &ctx(&job), &hooks).unwrap();
        assert_eq!(out, WorkerOutcome::Stopped { step: stop_at });
        let resumed = spec(dir.path(), &lora_job_with(seed, resume_extra));
        train::run(&resumed, &ctx(&job)).unwrap();
        assert_same_result(&reference, &job);
    }
}

#[test]
fn damaged_newest_checkpoint_falls_back_to_the_previous_one() {
    let dir = workspace();
    let s = spec(dir.path(), &scratch_job(4, ""));
    let reference = reference(dir.path(), &s);
    for damage in ["corrupt", "truncate", "no-manifest"] {
        let job = dir.path().join(damage);
        let hooks = Hooks {
            crash_after_step: Some(13),
            ..Hooks::default()
        };
        run_with(&s, &ctx(&job), &hooks).unwrap_err();
        let ck = job.join("checkpoints");
        let newest = ck.join("checkpoint-12");
        match damage {
            "corrupt" => {
                let f = newest.join("weights.safetensors");
                let mut b = std::fs::read(&f).unwrap();
                let i = b.len() - 7;
                b[i] ^= 0x40;
                std::fs::write(&f, b).unwrap();
            }
            "truncate" => {
                let f = newest.join("optimizer.safetensors");
                let b = std::fs::read(&f).unwrap();
                std::fs::write(&f, &b[..b.len() / 2]).unwrap();
            }
            _ => std::fs::remove_file(newest.join("manifest.json")).unwrap(),
        }
        let reason = checkpoint::verify(&newest).unwrap_err();
        let want = match damage {
            "corrupt" => "checksum",
            "truncate" => "truncated",
            _ => "manifest.json",
        };
        assert!(reason.contains(want), "{damage}: {reason}");
        // A half-written checkpoint from a kill during saving is ignored and cleaned up.
        std::fs::create_dir_all(ck.join(".tmp-checkpoint-16-999")).unwrap();
        let (path, state) = checkpoint::latest_valid(&ck).unwrap();
        assert_eq!((path, state.step), (ck.join("checkpoint-8"), 8));
        train::run(&s, &ctx(&job)).unwrap();
        assert!(!ck.join(".tmp-checkpoint-16-999").exists());
        assert_same_result(&reference, &job);
    }
}

#[test]
fn rotation_keeps_the_newest_and_the_best() {
    let dir = workspace();
    // greater_is_better = true makes the first evaluation (highest loss) the "best", so the
    // protected checkpoint is not among the newest two.
    let extra = "save_total_limit = 2\nload_best_model_at_end = true\ngreater_is_better = true\n";
    let s = spec(dir.path(), &scratch_job(6, extra));
    let job = dir.path().join("job");
    train::run(&s, &ctx(&job)).unwrap();
    let mut left: Vec<u64> = checkpoint::list(&job.join("checkpoints"))
        .into_iter()
        .map(|(s, _)| s)
        .collect();
    left.sort();
    assert_eq!(left, vec![4, 16, 20]);
    let evals: Vec<(u64, f64)> = read_metrics(&job)
        .unwrap()
        .iter()
        .filter_map(|r| r.eval_loss.map(|e| (r.step, e)))
        .collect();
    let best = evals
        .iter()
        .fold((0, f64::MIN), |b, &(s, e)| if e > b.1 { (s, e) } else { b });
    assert_eq!(best.0, 4, "{evals:?}");
    // The output holds the best checkpoint's weights, not the last step's.
    let ck = jobd::train::weights::load_safetensors(
        &job.join("checkpoints/checkpoint-4/weights.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let out = jobd::train::weights::load_safetensors(
        &job.join("output/model.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    for (name, t) in &out {
        let a = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let b = ck[name].flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(a == b, "{name} differs from checkpoint-4");
    }
}

/// Runs `s` in `job` until it stops after step `stop` (as SIGTERM would there); returns the
/// steps of the metrics records the job has then.
fn run_until(s: &JobSpec, job: &Path, stop: u64) -> Vec<u64> {
    let hooks = Hooks {
        stop_after_step: Some(stop),
        ..Hooks::default()
    };
    run_with(s, &ctx(job), &hooks).unwrap();
    logged_steps(job)
}

/// The steps of `job`'s metrics records.
fn logged_steps(job: &Path) -> Vec<u64> {
    read_metrics(job).unwrap().iter().map(|r| r.step).collect()
}

#[test]
fn a_checkpoint_of_another_job_file_is_refused() {
    let dir = workspace();
    let s = spec(dir.path(), &scratch_job(1, ""));
    let job = dir.path().join("job");
    let hooks = Hooks {
        stop_after_step: Some(4),
        ..Hooks::default()
    };
    run_with(&s, &ctx(&job), &hooks).unwrap();
    let changed = spec(
        dir.path(),
        &scratch_job(1, "").replace("learning_rate = 3e-3", "learning_rate = 1e-3"),
    );
    let e = train::run(&changed, &ctx(&job)).unwrap_err();
    assert!(matches!(e, TrainError::CheckpointMismatch { .. }), "{e}");
    assert!(
        e.to_string().contains("different job file")
            && e.to_string()
                .contains("training.learning_rate: 0.003 there, 0.001 here"),
        "the error names what differs: {e}"
    );
    // Options that do not change the computation may change between attempts: saving,
    // logging, how evaluation is batched.
    let relaxed = spec(
        dir.path(),
        &scratch_job(1, "save_total_limit = 3\nper_device_eval_batch_size = 3")
            .replace("logging_steps = 3", "logging_steps = 1"),
    );
    let hooks = Hooks {
        stop_after_step: Some(5),
        ..Hooks::default()
    };
    assert_eq!(
        run_with(&relaxed, &ctx(&job), &hooks).unwrap(),
        WorkerOutcome::Stopped { step: 5 }
    );
    // An explicit checkpoint path resumes another job from that checkpoint...
    let ck4 = job.join("checkpoints/checkpoint-4");
    let explicit = spec(
        dir.path(),
        &scratch_job(
            1,
            &format!("resume_from_checkpoint = {:?}", ck4.display().to_string()),
        ),
    );
    let other = dir.path().join("other");
    let steps = run_until(&explicit, &other, 6);
    assert_eq!(
        steps,
        vec![1, 3, 4, 6],
        "the records up to step 4 come with it"
    );
    // ...on its first start only: interrupted again, it goes on from its own checkpoint-6,
    // even once the checkpoint it started from is gone (QA: it went back to step 4 at every
    // interruption, and failed for good after the source was deleted).
    let moved = dir.path().join("moved-checkpoint-4");
    std::fs::rename(&ck4, &moved).unwrap();
    let steps = run_until(&explicit, &other, 9);
    assert_eq!(steps, vec![1, 3, 4, 6, 8, 9]);
    std::fs::rename(&moved, &ck4).unwrap();
    // The same holds for resume_from_checkpoint = false once the job has checkpoints.
    let never = spec(
        dir.path(),
        &scratch_job(1, "resume_from_checkpoint = false"),
    );
    assert_eq!(
        checkpoint::spec_hash(&never),
        checkpoint::spec_hash(&s),
        "where a job starts is not part of what it computes"
    );
    // A fresh start would reach step 5 and crash there; going on from step 9 never does.
    let hooks = Hooks {
        stop_after_step: Some(10),
        crash_after_step: Some(5),
        ..Hooks::default()
    };
    assert_eq!(
        run_with(&never, &ctx(&other), &hooks).unwrap(),
        WorkerOutcome::Stopped { step: 10 }
    );
    assert_eq!(logged_steps(&other), vec![1, 3, 4, 6, 8, 9]);
    assert!(checkpoint::verify(&other.join("checkpoints/checkpoint-10")).is_ok());
    // resume_from_checkpoint = false starts afresh and replaces a checkpoint of the same step.
    let fresh = spec(
        dir.path(),
        &scratch_job(2, "resume_from_checkpoint = false"),
    );
    let hooks = Hooks {
        stop_after_step: Some(4),
        ..Hooks::default()
    };
    run_with(&fresh, &ctx(&job), &hooks).unwrap();
    let state = checkpoint::verify(&ck4).unwrap();
    assert_eq!(state.spec_hash, checkpoint::spec_hash(&fresh));
    let steps: Vec<u64> = read_metrics(&job).unwrap().iter().map(|r| r.step).collect();
    assert_eq!(steps, vec![1, 3, 4]);
}

#[test]
fn a_stop_mid_step_abandons_the_step_when_finishing_would_not_fit() {
    let dir = workspace();
    write_base(&dir.path().join("base"), 300, 64);
    let scratch = spec(dir.path(), &scratch_job(6, ""));
    let scratch_ref = reference(dir.path(), &scratch);
    let lora = spec(dir.path(), &lora_job(4));
    let lora_ref = dir.path().join("lora-reference");
    train::run(&lora, &ctx(&lora_ref)).unwrap();
    // (job, reference, step the stop comes in, grace, step the checkpoint holds). Checkpoints
    // are every 4 (scratch) and 5 (LoRA) steps.
    let cases = [
        // No time to finish step 7: abandoned, the state after step 6 saved.
        (&scratch, &scratch_ref, 7, Some(0), 6),
        // The grace is unknown: the step is finished, as before.
        (&scratch, &scratch_ref, 7, None, 7),
        // Plenty of time, but the step's start is already checkpointed: nothing to save.
        (&scratch, &scratch_ref, 5, Some(1000), 4),
        // LoRA with dropout: the dropout stream is rewound with the step.
        (&lora, &lora_ref, 4, Some(0), 3),
        // The first step: nothing to save, the next attempt starts afresh.
        (&lora, &lora_ref, 1, Some(0), 0),
    ];
    for (i, (s, reference, during, grace, held)) in cases.into_iter().enumerate() {
        let job = dir.path().join(format!("mid-step-{i}"));
        let mut c = ctx(&job);
        c.grace = grace.map(std::time::Duration::from_secs);
        let hooks = Hooks {
            stop_during_step: Some(during),
            ..Hooks::default()
        };
        let out = run_with(s, &c, &hooks).unwrap();
        assert_eq!(out, WorkerOutcome::Stopped { step: held }, "case {i}");
        let newest = checkpoint::latest_valid(&job.join("checkpoints")).map(|(_, s)| s.step);
        assert_eq!(newest, (held > 0).then_some(held), "case {i}");
        train::run(s, &ctx(&job)).unwrap();
        assert_same_result(reference, &job);
    }
}

/// A best checkpoint damaged while the job was stopped is found when the job resumes, and the
/// best is chosen again from the evaluations to come. (QA: the job trained to the end, then
/// failed with "best checkpoint unusable" — and again at every requeue.)
#[test]
fn a_damaged_best_checkpoint_is_found_at_resume_not_after_training() {
    let dir = workspace();
    let extra = "load_best_model_at_end = true\ngreater_is_better = true\n";
    let s = spec(dir.path(), &scratch_job(6, extra));
    let job = dir.path().join("job");
    let hooks = Hooks {
        stop_after_step: Some(9),
        ..Hooks::default()
    };
    assert_eq!(
        run_with(&s, &ctx(&job), &hooks).unwrap(),
        WorkerOutcome::Stopped { step: 9 }
    );
    let state = checkpoint::verify(&job.join("checkpoints/checkpoint-9")).unwrap();
    let best = state.best_checkpoint.expect("evaluated at 4 and 8");
    let weights = job
        .join("checkpoints")
        .join(&best)
        .join("weights.safetensors");
    let mut bytes = std::fs::read(&weights).unwrap();
    let at = bytes.len() - 10;
    bytes[at] ^= 0xff;
    std::fs::write(&weights, bytes).unwrap();
    assert_eq!(
        train::run(&s, &ctx(&job)).unwrap(),
        WorkerOutcome::Completed { steps: 20 }
    );
    assert!(job.join("output/model.safetensors").exists());
}
