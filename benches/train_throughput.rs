//! Training throughput on the CPU: tokens per second of full fine-tuning steps (forward,
//! backward, AdamW) for a ~21M-parameter llama — hidden 512, 4 layers, 8 heads, MLP 1408,
//! vocab 8192, untied — on batches of 8 × 256 tokens. `benches/pytorch_train.py` runs the
//! same configuration with transformers' `LlamaForCausalLM` for comparison.
//!
//! Run: `cargo bench --bench train_throughput --profile dev` (the dev profile already builds
//! Candle at opt-level 3) or plain `cargo bench --bench train_throughput` (release).
//! Environment: `BENCH_STEPS` (default 5 timed steps after 1 warm-up), `BENCH_THREADS`
//! (default: Candle's choice), `BENCH_SAVE=1` to also time a checkpoint snapshot and write.

use std::collections::BTreeMap;
use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use jobd::train::checkpoint::{self, Rotation, SchedulerState, Snapshot, TrainerState};
use jobd::train::config::LlamaConfig;
use jobd::train::model::{Llama, Pass, init_weights, nll_sum, parameter_shapes};
use jobd::train::optim::{AdamW, AdamWConfig, Param, clip};
use jobd::train::rng::Rng;

fn main() {
    // `cargo bench` passes --bench; `cargo test --all-targets` runs this binary without it,
    // and a minute-long benchmark has no place in the test suite.
    if !std::env::args().any(|a| a == "--bench") {
        println!("train_throughput: run with `cargo bench --bench train_throughput`");
        return;
    }
    let steps: usize = std::env::var("BENCH_STEPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let threads: Option<usize> = std::env::var("BENCH_THREADS")
        .ok()
        .and_then(|s| s.parse().ok());
    let cfg: LlamaConfig = serde_json::from_value(serde_json::json!({
        "model_type": "llama", "vocab_size": 8192, "hidden_size": 512,
        "intermediate_size": 1408, "num_hidden_layers": 4, "num_attention_heads": 8,
        "num_key_value_heads": 8, "max_position_embeddings": 256, "rms_norm_eps": 1e-6,
        "tie_word_embeddings": false
    }))
    .unwrap();
    let run = move || bench(cfg, steps);
    match threads {
        Some(n) => rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build()
            .unwrap()
            .install(run),
        None => run(),
    }
}

fn bench(cfg: LlamaConfig, steps: usize) {
    let dev = Device::Cpu;
    let (batch, block) = (8usize, 256usize);
    println!(
        "config: {} parameters, batch {batch} x {block} tokens, f32, CPU, {} rayon threads",
        cfg.num_parameters(),
        rayon::current_num_threads()
    );
    let w = init_weights(&cfg, &mut Rng::new(0), &dev).unwrap();
    let mut params = Vec::new();
    let mut tensors = BTreeMap::new();
    for (name, _) in parameter_shapes(&cfg) {
        let var = Var::from_tensor(&w[&name]).unwrap();
        tensors.insert(name.clone(), var.as_tensor().clone());
        params.push(Param {
            name,
            var,
            decay: true,
        });
    }
    let model = Llama::new(cfg.clone(), &tensors, &dev).unwrap();
    let mut opt = AdamW::new(
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        },
        &params,
    )
    .unwrap();
    let mut rng = Rng::new(1);
    let mut step_secs = Vec::new();
    for s in 0..=steps {
        let ids: Vec<u32> = (0..batch * (block + 1))
            .map(|_| rng.below(cfg.vocab_size as u64) as u32)
            .collect();
        let all = Tensor::from_vec(ids, (batch, block + 1), &dev).unwrap();
        let x = all.narrow(1, 0, block).unwrap();
        let y = all.narrow(1, 1, block).unwrap().contiguous().unwrap();
        let mask = Tensor::ones((batch, block), DType::F32, &dev).unwrap();
        let t0 = Instant::now();
        let mut pass = Pass {
            dtype: DType::F32,
            rng: None,
        };
        let logits = model
            .forward(&x.contiguous().unwrap(), 0, None, &mut pass)
            .unwrap();
        let loss = (nll_sum(&logits, &y, &mask).unwrap() / (batch * block) as f64).unwrap();
        let l = loss.to_scalar::<f32>().unwrap();
        let t_fwd = t0.elapsed().as_secs_f64();
        let g = loss.backward().unwrap();
        let t_bwd = t0.elapsed().as_secs_f64() - t_fwd;
        let mut grads: Vec<Tensor> = params
            .iter()
            .map(|p| g.get(p.var.as_tensor()).unwrap().clone())
            .collect();
        drop(g);
        clip(&mut grads, 1.0).unwrap();
        opt.step(&params, &grads, 1e-4).unwrap();
        let secs = t0.elapsed().as_secs_f64();
        println!(
            "step {s}{}: {secs:.3}s (forward {t_fwd:.3}s, backward {t_bwd:.3}s, optimizer {:.3}s), \
             {:.0} tokens/s, loss {l:.3}",
            if s == 0 { " (warm-up)" } else { "" },
            secs - t_fwd - t_bwd,
            (batch * block) as f64 / secs
        );
        if s > 0 {
            step_secs.push(secs);
        }
    }
    let mean = step_secs.iter().sum::<f64>() / step_secs.len() as f64;
    println!(
        "candle: {:.0} tokens/s (mean step {mean:.3}s over {} steps)",
        (batch * block) as f64 / mean,
        step_secs.len()
    );
    if std::env::var("BENCH_SAVE").is_ok_and(|v| v == "1") {
        let dir = tempfile::tempdir().unwrap();
        let weights: BTreeMap<String, Tensor> = params
            .iter()
            .map(|p| (p.name.clone(), p.var.as_tensor().clone()))
            .collect();
        let mut moments = BTreeMap::new();
        for (i, p) in params.iter().enumerate() {
            moments.insert(format!("m.{}", p.name), opt.m[i].clone());
            moments.insert(format!("v.{}", p.name), opt.v[i].clone());
        }
        let state = TrainerState {
            version: checkpoint::FORMAT_VERSION,
            step: 1,
            total_steps: 1,
            adam_step: opt.step,
            position: jobd::train::data::Position {
                epoch: 0,
                micro_batch: 0,
            },
            accumulated_micro_batches: 0,
            lr_scheduler: SchedulerState {
                kind: "Linear".into(),
                warmup_steps: 0,
                total_steps: 1,
                next_step: 1,
            },
            rng,
            log_history: Vec::new(),
            pending_loss_sum: 0.0,
            pending_steps: 0,
            best_metric: None,
            best_checkpoint: None,
            spec_hash: String::new(),
            data_key: String::new(),
            trainable: "full".into(),
        };
        let t0 = Instant::now();
        let snap = Snapshot::take(&weights, &moments, &state, "{}").unwrap();
        let snap_secs = t0.elapsed().as_secs_f64();
        let bytes = snap.bytes();
        let t1 = Instant::now();
        snap.write(dir.path(), Rotation::default()).unwrap();
        let write_secs = t1.elapsed().as_secs_f64();
        let t2 = Instant::now();
        let (path, _) = checkpoint::latest_valid(dir.path()).unwrap();
        checkpoint::load(&path, &dev).unwrap();
        println!(
            "checkpoint: {:.1} MB; snapshot (blocks training) {snap_secs:.3}s; background write \
             {write_secs:.3}s; verify+load {:.3}s; mean step {mean:.3}s",
            bytes as f64 / 1e6,
            t2.elapsed().as_secs_f64()
        );
    }
}
