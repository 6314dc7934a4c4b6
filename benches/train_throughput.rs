//! Training throughput of jobd's Candle trainer on the reference configurations, for a fixed
//! time: tokens/s, the step split into data, forward, backward and optimizer, peak memory and
//! model FLOPs utilisation. `benches/pytorch_train.py` trains the same configurations with
//! transformers' `LlamaForCausalLM` and prints the same table; `benches/compare.py` runs both
//! and prints the ratio.
//!
//! Configurations (full fine-tuning from a random init, AdamW, clipping at 1.0, random tokens):
//! - `tiny`: jobs/tiny.toml's model — hidden 64, 2 layers, 4 heads (2 kv), MLP 192, vocab 320,
//!   tied; batch 32 × 16.
//! - `20m`: hidden 512, 4 layers, 8 heads, MLP 1408, vocab 8192, untied (21.2M); batch 8 × 256.
//! - `100m`: hidden 768, 14 layers, 12 heads, MLP 2048, vocab 1024, untied (100.7M); batch
//!   16 × 512 (the GPU reference of issue 9).
//!
//! Run: `cargo bench --bench train_throughput -- --config 20m [--arch llama|qwen3] --seconds 60 [--threads 2]
//! [--dtype f32|bf16|f16] [--device cpu|cuda] [--plain|--autograd|--ops-step] [--json]
//! [--peak-tflops X] [--save] [--checkpointing] [--tf32] [--cuda-events]
//! [--attention-block-rows N] [--batch N] [--seq N] [--op-times]`; `-- --check --device
//! cuda` instead compares every fused op and a whole model step on the GPU (f32, bf16 and f16,
//! the steps with several causal blocks in the attention) with the plain ops on the CPU. The
//! step is the trainer's: on the CPU in f32
//! [`jobd::train::direct`]'s forward and hand-written backward, on CUDA
//! [`jobd::train::direct_ops`] (the fused ops without an autograd graph; `--ops-step` runs it on
//! the CPU too). `--autograd` runs the same fused kernels through Candle's autograd instead
//! (what other devices and types use); `--checkpointing` recomputes each layer in the backward
//! (`gradient_checkpointing`); `--plain` uses the plain-op versions of the fused kernels (the
//! "before"); `--attention-block-rows N` sets the GPU attention's causal blocks (0: whole T×S
//! products, no skipping; default: automatic); `--batch` and `--seq` replace the
//! configuration's batch; on CUDA the measured peak is printed beside the VRAM estimate the
//! scheduler would reserve for the run; `--op-times` adds each kind of op's time per step in
//! the op-level step (device time from CUDA events; the clock on the CPU); `--json` ends with
//! one JSON line for scripts. MFU counts 6·N + 12·L·T·d FLOPs per token (N: parameters less
//! the input embedding) against `--peak-tflops`, by default on the CPU the rate this machine
//! reaches in a 2048³ f32 matmul (measured first), on CUDA the H100/H200 dense peak of the
//! compute type. `--arch qwen3` trains the same sizes as a Qwen3 (per-head query/key norms).

use std::collections::BTreeMap;
use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use jobd::train::checkpoint::{self, Rotation, SchedulerState, Snapshot, TrainerState};
use jobd::train::config::LlamaConfig;
use jobd::train::metrics::peak_memory_bytes;
use jobd::train::model::{
    Llama, Lora, Pass, frozen_base, init_weights, nll_sum_plain, parameter_shapes,
};
use jobd::train::optim::{self, AdamW, AdamWConfig, Param};
use jobd::train::rng::Rng;
use jobd::train::{direct, direct_ops};

struct Args {
    config: String,
    arch: String,
    seconds: f64,
    warmup: usize,
    max_steps: usize,
    threads: Option<usize>,
    dtype: DType,
    device: String,
    plain: bool,
    autograd: bool,
    ops_step: bool,
    lora: Option<usize>,
    lora_dropout: f64,
    checkpointing: bool,
    json: bool,
    peak_tflops: Option<f64>,
    save: bool,
    check: bool,
    tf32: bool,
    cuda_events: bool,
    attention_block_rows: Option<usize>,
    batch: Option<usize>,
    seq: Option<usize>,
    op_times: bool,
}

fn parse_args() -> Args {
    let mut a = Args {
        config: "20m".into(),
        arch: "llama".into(),
        seconds: 30.0,
        warmup: 1,
        max_steps: 10_000,
        threads: None,
        dtype: DType::F32,
        device: "cpu".into(),
        plain: false,
        autograd: false,
        ops_step: false,
        lora: None,
        lora_dropout: 0.05,
        checkpointing: false,
        json: false,
        peak_tflops: None,
        save: false,
        check: false,
        tf32: false,
        cuda_events: false,
        attention_block_rows: None,
        batch: None,
        seq: None,
        op_times: false,
    };
    let mut it = std::env::args().skip(1).filter(|s| s != "--bench");
    while let Some(flag) = it.next() {
        let mut val = || it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--config" => a.config = val(),
            "--arch" => a.arch = val(),
            "--seconds" => a.seconds = val().parse().expect("--seconds N"),
            "--warmup" => a.warmup = val().parse().expect("--warmup N"),
            "--max-steps" => a.max_steps = val().parse().expect("--max-steps N"),
            "--threads" => a.threads = Some(val().parse().expect("--threads N")),
            "--dtype" => {
                a.dtype = match val().as_str() {
                    "f32" => DType::F32,
                    "bf16" => DType::BF16,
                    "f16" => DType::F16,
                    other => panic!("--dtype {other}: f32, bf16 or f16"),
                }
            }
            "--device" => a.device = val(),
            "--plain" => a.plain = true,
            "--autograd" => a.autograd = true,
            "--ops-step" => a.ops_step = true,
            "--lora" => a.lora = Some(val().parse().expect("--lora RANK")),
            "--lora-dropout" => a.lora_dropout = val().parse().expect("--lora-dropout P"),
            "--checkpointing" => a.checkpointing = true,
            "--json" => a.json = true,
            "--peak-tflops" => a.peak_tflops = Some(val().parse().expect("--peak-tflops X")),
            "--save" => a.save = true,
            "--check" => a.check = true,
            "--tf32" => a.tf32 = true,
            "--cuda-events" => a.cuda_events = true,
            "--op-times" => a.op_times = true,
            "--batch" => a.batch = Some(val().parse().expect("--batch N")),
            "--seq" => a.seq = Some(val().parse().expect("--seq N")),
            "--attention-block-rows" => {
                a.attention_block_rows = Some(val().parse().expect("--attention-block-rows N"))
            }
            other => panic!("unknown option {other}"),
        }
    }
    a
}

/// The model and batch of a reference configuration.
fn reference(name: &str) -> (LlamaConfig, usize, usize) {
    let (json, batch, block) = match name {
        "tiny" => (
            serde_json::json!({
                "vocab_size": 320, "hidden_size": 64, "intermediate_size": 192,
                "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                "max_position_embeddings": 32, "tie_word_embeddings": true
            }),
            32,
            16,
        ),
        "20m" => (
            serde_json::json!({
                "vocab_size": 8192, "hidden_size": 512, "intermediate_size": 1408,
                "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 8,
                "max_position_embeddings": 256, "tie_word_embeddings": false
            }),
            8,
            256,
        ),
        "100m" => (
            serde_json::json!({
                "vocab_size": 1024, "hidden_size": 768, "intermediate_size": 2048,
                "num_hidden_layers": 14, "num_attention_heads": 12, "num_key_value_heads": 12,
                "max_position_embeddings": 512, "tie_word_embeddings": false
            }),
            16,
            512,
        ),
        other => panic!("--config {other}: tiny, 20m or 100m"),
    };
    let mut json = json;
    json["model_type"] = "llama".into();
    json["rms_norm_eps"] = 1e-6.into();
    (serde_json::from_value(json).unwrap(), batch, block)
}

/// Model FLOPs per trained token (forward and backward), PaLM's count; with LoRA the frozen
/// weights' gradient products (2·N) are not done, and the adapters' are left out.
fn flops_per_token(cfg: &LlamaConfig, block: usize, lora: bool) -> f64 {
    let n = cfg.num_parameters() - cfg.vocab_size * cfg.hidden_size
        + if cfg.tie_word_embeddings {
            cfg.vocab_size * cfg.hidden_size
        } else {
            0
        };
    let attn = 12 * cfg.num_hidden_layers * block * cfg.num_attention_heads * cfg.head_dim();
    ((if lora { 4 } else { 6 }) * n + attn) as f64
}

/// Every weight of `w` as a trainable variable on `dev` (full fine-tuning), with the model
/// that reads them; `w` itself is dropped (before anything is measured).
fn trainable(cfg: &LlamaConfig, w: BTreeMap<String, Tensor>, dev: &Device) -> (Llama, Vec<Param>) {
    let mut params = Vec::new();
    let mut tensors = BTreeMap::new();
    for (name, _) in parameter_shapes(cfg) {
        let var = Var::from_tensor(&w[&name].to_device(dev).unwrap()).unwrap();
        tensors.insert(name.clone(), var.as_tensor().clone());
        let decay = !name.contains("norm");
        params.push(Param { name, var, decay });
    }
    (Llama::new(cfg.clone(), &tensors, dev).unwrap(), params)
}

/// LoRA adapters of rank `r` (scale 2, dropout `p`) on every projection of `model`, `init`
/// giving the values of A `(r, in)` and B `(out, r)` for a projection `(out, in)`; returns
/// them as the parameters to train.
fn attach_adapters(
    model: &mut Llama,
    r: usize,
    p: f64,
    mut init: impl FnMut((usize, usize)) -> (Vec<f32>, Vec<f32>),
) -> Vec<Param> {
    let dev = model.device().clone();
    let mut params = Vec::new();
    for blk in &mut model.layers {
        for (_, lin) in blk.linears_mut() {
            let (out, inp) = lin.weight.dims2().unwrap();
            let (av, bv) = init((out, inp));
            let am = Var::from_vec(av, (r, inp), &dev).unwrap();
            let bm = Var::from_vec(bv, (out, r), &dev).unwrap();
            lin.lora = Some(Lora {
                a: am.as_tensor().clone(),
                b: bm.as_tensor().clone(),
                scale: 2.0,
                dropout: p,
            });
            for var in [am, bm] {
                let name = format!("lora.{}", params.len());
                params.push(Param {
                    name,
                    var,
                    decay: true,
                });
            }
        }
    }
    params
}

fn main() {
    // `cargo test --all-targets` runs bench binaries without --bench; a minute-long benchmark
    // has no place in the test suite.
    if !std::env::args().any(|a| a == "--bench") {
        println!("train_throughput: run with `cargo bench --bench train_throughput -- [options]`");
        return;
    }
    let args = parse_args();
    jobd::train::attention_blocks::set_block_rows(args.attention_block_rows);
    if args.check {
        let ok = check::run(&device(&args.device));
        std::process::exit(if ok { 0 } else { 1 });
    }
    if args.tf32 {
        #[cfg(feature = "cuda")]
        candle_core::cuda_backend::set_gemm_reduced_precision_f32(true);
    }
    match args.threads {
        Some(n) => rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build()
            .unwrap()
            .install(|| bench(&args)),
        None => bench(&args),
    }
}

fn device(name: &str) -> Device {
    match name {
        "cpu" => Device::Cpu,
        "cuda" => {
            let d = jobd::train::select_device(true).unwrap();
            assert!(
                d.is_cuda(),
                "--device cuda: this build has no CUDA (--features cuda)"
            );
            d
        }
        other => panic!("--device {other}: cpu or cuda"),
    }
}

/// The f32 matmul rate of this CPU (best of 3 runs of 2048³), in TFLOP/s.
fn cpu_peak_tflops() -> f64 {
    let n = 2048;
    let a = Tensor::ones((n, n), DType::F32, &Device::Cpu).unwrap();
    let mut best = f64::MAX;
    for _ in 0..4 {
        let t = Instant::now();
        let c = a.matmul(&a).unwrap();
        drop(c);
        best = best.min(t.elapsed().as_secs_f64());
    }
    2.0 * (n * n * n) as f64 / best / 1e12
}

/// Per step: each kind of op's time (device time on CUDA) and share of the forward +
/// backward, from `--op-times`.
fn print_op_times(
    times: &[jobd::train::op_times::OpTime],
    steps: f64,
    fwd_bwd: f64,
    ops_step: bool,
) {
    if !ops_step {
        println!("op times: only the op-level step is timed op by op (CUDA, or --ops-step)");
        return;
    }
    // "op › part" labels time parts inside an op already timed: listed under it, not added.
    let part_of = |t: &jobd::train::op_times::OpTime| t.label.split_once(" › ").map(|(op, _)| op);
    let total: f64 = times
        .iter()
        .filter(|t| part_of(t).is_none())
        .map(|t| t.seconds)
        .sum::<f64>()
        / steps;
    println!(
        "op times per step ({:.1} ms timed of {:.1} ms data + forward + backward; the \
         indented lines are parts of the op above):",
        1e3 * total,
        1e3 * fwd_bwd
    );
    let line = |t: &jobd::train::op_times::OpTime, indent: &str| {
        let per_step = t.seconds / steps;
        println!(
            "  {indent}{:<w$} {:>8.2} ms {:>5.1}%  {:>5.0} calls",
            t.label,
            1e3 * per_step,
            100.0 * per_step / fwd_bwd,
            t.calls as f64 / steps,
            w = 30 - indent.len(),
        );
    };
    for t in times.iter().filter(|t| part_of(t).is_none()) {
        line(t, "");
        for part in times.iter().filter(|p| part_of(p) == Some(t.label)) {
            line(part, "  ");
        }
    }
    // Parts whose op was not timed (none in the op-level step), so that nothing is hidden.
    let ops: Vec<&str> = times.iter().map(|t| t.label).collect();
    for t in times
        .iter()
        .filter(|t| part_of(t).is_some_and(|op| !ops.contains(&op)))
    {
        line(t, "");
    }
}

/// The GPU memory `jobctl estimate` gives for this run ([`jobd::estimate`]): what the
/// scheduler reserves, to set beside the measured peak.
fn vram_estimate(cfg: &LlamaConfig, a: &Args, batch: usize, seq: usize) -> u64 {
    use jobd::estimate::{ModelShape, Tuning, estimate_shape};
    use jobd::spec::train::TrainDType;
    let heads = cfg.num_attention_heads as u64;
    let shape = ModelShape {
        hidden: cfg.hidden_size as u64,
        intermediate: cfg.intermediate_size as u64,
        layers: cfg.num_hidden_layers as u64,
        heads,
        kv_heads: cfg.num_key_value_heads.map_or(heads, |k| k as u64),
        head_dim: cfg.head_dim() as u64,
        vocab: cfg.vocab_size as u64,
        tied: cfg.tie_word_embeddings,
        qkv_bias: cfg.attention_bias == Some(true),
        qk_norm: cfg.qk_norm(),
    };
    let tuning = match a.lora {
        Some(r) => Tuning::Lora {
            r: r as u64,
            modules: [true; 7],
            dropout: a.lora_dropout > 0.0,
        },
        None => Tuning::Full,
    };
    let dtype = match a.dtype {
        DType::BF16 => TrainDType::Bf16,
        DType::F16 => TrainDType::F16,
        _ => TrainDType::F32,
    };
    let b = estimate_shape(&shape, tuning, dtype, batch as u64, seq as u64);
    if a.checkpointing {
        b.total_checkpointed
    } else {
        b.total
    }
}

/// Dense peak of an H100/H200 SXM for the compute type, in TFLOP/s (TF32 products: the
/// tensor cores' TF32 rate, as `pytorch_train.py` uses for its TF32 variant).
fn gpu_peak_tflops(dtype: DType, tf32: bool) -> f64 {
    match dtype {
        DType::F32 if tf32 => 495.0,
        DType::F32 => 67.0,
        _ => 989.0,
    }
}

fn bench(a: &Args) {
    let dev = if a.cuda_events && a.device == "cuda" {
        // cudarc's per-buffer event tracking left on (the trainer turns it off).
        Device::new_cuda(0).unwrap()
    } else {
        device(&a.device)
    };
    let (mut cfg, batch, block) = reference(&a.config);
    match a.arch.as_str() {
        "llama" => {}
        // The same sizes with Qwen3's per-head query/key norms (head width hidden / heads).
        "qwen3" => {
            cfg.head_dim = Some(cfg.head_dim());
            cfg.model_type = "qwen3".into();
        }
        other => panic!("--arch {other}: llama or qwen3"),
    }
    let (batch, block) = (a.batch.unwrap_or(batch), a.seq.unwrap_or(block));
    cfg.max_position_embeddings = cfg.max_position_embeddings.max(block);
    let threads = rayon::current_num_threads();
    let peak_tflops = a.peak_tflops.unwrap_or_else(|| {
        if dev.is_cuda() {
            gpu_peak_tflops(a.dtype, a.tf32)
        } else {
            cpu_peak_tflops()
        }
    });
    let dtype_name = if a.tf32 && a.dtype == DType::F32 {
        "tf32".to_string()
    } else {
        format!("{:?}", a.dtype).to_lowercase()
    };
    let w = init_weights(&cfg, &mut Rng::new(0), &dev).unwrap();
    let (model, params) = match a.lora {
        // Adapters on every projection: A uniform in ±1/√in, B zero (PEFT's start).
        Some(r) => {
            let mut init = Rng::new(3);
            let frozen = frozen_base(w, a.dtype).unwrap();
            let mut model = Llama::new(cfg.clone(), &frozen, &dev).unwrap();
            let params = attach_adapters(&mut model, r, a.lora_dropout, |(out, inp)| {
                let mut v = vec![0f32; r * inp];
                init.fill_uniform(&mut v, 1.0 / (inp as f64).sqrt());
                (v, vec![0f32; out * r])
            });
            (model, params)
        }
        None => trainable(&cfg, w, &dev),
    };
    let direct = !a.plain
        && !a.autograd
        && !a.ops_step
        && a.dtype == DType::F32
        && direct::supported(&model);
    let ops_step = !a.plain && !a.autograd && !direct && direct_ops::supported(&model, a.dtype);
    let kernels = if a.plain {
        "plain ops"
    } else if ops_step && a.checkpointing {
        "fused, direct over ops, activation checkpointing"
    } else if ops_step {
        "fused, direct over ops"
    } else if !direct {
        "fused, autograd"
    } else if a.checkpointing {
        "fused, direct backward, activation checkpointing"
    } else {
        "fused, direct backward"
    };
    let kernels = match a.lora {
        Some(r) => format!("{kernels}, LoRA r{r}"),
        None => kernels.to_string(),
    };
    eprintln!(
        "candle: config {} ({}, {} parameters), batch {batch} x {block}, {dtype_name}, \
         {kernels}, {:?}, {threads} threads, peak {peak_tflops:.2} TFLOP/s",
        a.config,
        cfg.model_type,
        cfg.num_parameters(),
        dev
    );
    let mut workspace = direct::Workspace::default();
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
    // LoRA dropout's masks (the trainer's generator).
    let mut drop_rng = Rng::new(2);
    let sync = || dev.synchronize().unwrap();
    let mut timed: Vec<[f64; 6]> = Vec::new();
    let start = Instant::now();
    let mut timed_since = None;
    let mut last_loss = 0f32;
    for s in 0..a.max_steps + a.warmup {
        if a.op_times && ops_step && s == a.warmup {
            jobd::train::op_times::enable(&dev);
        }
        let t0 = Instant::now();
        let ids: Vec<u32> = (0..batch * (block + 1))
            .map(|_| rng.below(cfg.vocab_size as u64) as u32)
            .collect();
        let all = Tensor::from_vec(ids, (batch, block + 1), &dev).unwrap();
        let x = all.narrow(1, 0, block).unwrap().contiguous().unwrap();
        let y = all.narrow(1, 1, block).unwrap().contiguous().unwrap();
        let mask = Tensor::ones((batch, block), DType::F32, &dev).unwrap();
        sync();
        let t_data = t0.elapsed().as_secs_f64();
        let mut t_enqueue = f64::NAN;
        let (grads, t_fwd) = if ops_step {
            // The trainer's path on CUDA: the fused ops without an autograd graph.
            let scale = 1.0 / (batch * block) as f32;
            let fwd = direct_ops::forward(
                &model,
                &x,
                &y,
                &mask,
                a.dtype,
                scale,
                a.checkpointing,
                Some(&mut drop_rng),
            )
            .unwrap();
            // The forward is only queued so far: wait for it, so that the fwd / bwd columns
            // split the step where the device does (one wait, microseconds of idle device).
            sync();
            let _ = peak_memory_bytes(&dev);
            let t_fwd = t0.elapsed().as_secs_f64() - t_data;
            // Returns once the loss is read back, i.e. when the device has done the backward.
            let g = fwd.backward(&model).unwrap();
            last_loss = g.loss_sum * scale;
            let grads: Vec<Tensor> = params
                .iter()
                .map(|p| g.get(p.var.as_tensor()).unwrap().clone())
                .collect();
            (grads, t_fwd)
        } else if direct {
            // The trainer's path on the CPU: forward and hand-written backward in one call.
            let scale = 1.0 / (batch * block) as f32;
            let fwd = direct::forward(
                &model,
                &x,
                &y,
                &mask,
                scale,
                a.checkpointing,
                &mut workspace,
            )
            .unwrap();
            let t_fwd = t0.elapsed().as_secs_f64() - t_data;
            last_loss = fwd.loss_sum * scale;
            let g = fwd.backward(&model, &mut workspace).unwrap();
            let _ = peak_memory_bytes(&dev);
            let grads: Vec<Tensor> = params
                .iter()
                .map(|p| g.get(p.var.as_tensor()).unwrap().clone())
                .collect();
            (grads, t_fwd)
        } else {
            let mut pass = Pass::new(a.dtype, Some(&mut drop_rng));
            pass.fused = !a.plain;
            // lm_head and loss in one op, no logits tensor (as the trainer off the direct path).
            let nll = if a.plain {
                let logits = model.forward(&x, 0, None, &mut pass).unwrap();
                nll_sum_plain(&logits, &y, &mask)
            } else {
                model.forward_loss(&x, &y, &mask, &mut pass, true)
            };
            let loss = (nll.unwrap() / (batch * block) as f64).unwrap();
            last_loss = loss.to_scalar::<f32>().unwrap();
            // On CUDA each call samples NVML into a running peak (the peak is near the end of
            // the forward); on the CPU the kernel keeps VmHWM.
            let _ = peak_memory_bytes(&dev);
            let t_fwd = t0.elapsed().as_secs_f64() - t_data;
            let g = loss.backward().unwrap();
            // When the backward's kernels are queued: close to the synchronised backward time
            // below means the host, not the GPU, sets the pace.
            t_enqueue = t0.elapsed().as_secs_f64() - t_data - t_fwd;
            let grads: Vec<Tensor> = params
                .iter()
                .map(|p| g.get(p.var.as_tensor()).unwrap().clone())
                .collect();
            drop(g);
            (grads, t_fwd)
        };
        sync();
        let _ = peak_memory_bytes(&dev);
        let t_bwd = t0.elapsed().as_secs_f64() - t_data - t_fwd;
        let (_, clip) = optim::clip_factor(&grads, 1.0).unwrap();
        opt.step_scaled(&params, &grads, 1e-4, clip).unwrap();
        drop(grads);
        sync();
        let secs = t0.elapsed().as_secs_f64();
        let t_opt = secs - t_data - t_fwd - t_bwd;
        eprintln!(
            "step {s}{}: {secs:.3}s (data {t_data:.3}s, forward {t_fwd:.3}s, backward \
             {t_bwd:.3}s, optimizer {t_opt:.3}s), {:.0} tokens/s, loss {last_loss:.3}",
            if s < a.warmup { " (warm-up)" } else { "" },
            (batch * block) as f64 / secs
        );
        if s >= a.warmup {
            let since = *timed_since.get_or_insert(t0);
            timed.push([secs, t_data, t_fwd, t_bwd, t_opt, t_enqueue]);
            if since.elapsed().as_secs_f64() >= a.seconds && timed.len() >= 2 {
                break;
            }
        }
    }
    let n = timed.len() as f64;
    let mean = |i: usize| timed.iter().map(|t| t[i]).sum::<f64>() / n;
    let step = mean(0);
    let op_times = jobd::train::op_times::take();
    jobd::train::op_times::disable();
    let tokens_per_s = (batch * block) as f64 / step;
    let mfu = tokens_per_s * flops_per_token(&cfg, block, a.lora.is_some()) / (peak_tflops * 1e12);
    let peak = peak_memory_bytes(&dev);
    // What placement reserves for this run (GPU memory; the CPU's figure is resident memory).
    let estimate = dev.is_cuda().then(|| vram_estimate(&cfg, a, batch, block));
    let row = serde_json::json!({
        "trainer": format!("candle {kernels}"),
        "config": a.config,
        "dtype": dtype_name,
        "device": if dev.is_cuda() { "cuda" } else { "cpu" },
        "threads": threads,
        "steps": timed.len(),
        "tokens_per_s": tokens_per_s,
        "step_s": step,
        "data_s": mean(1),
        "forward_s": mean(2),
        "backward_s": mean(3),
        "optimizer_s": mean(4),
        "backward_enqueued_s": mean(5),
        "peak_memory_bytes": peak,
        "estimate_bytes": estimate,
        "batch": batch,
        "seq": block,
        "mfu": mfu,
        "peak_tflops": peak_tflops,
        "loss": last_loss,
        "wall_s": start.elapsed().as_secs_f64(),
    });
    println!(
        "{:<22} {:>5} {:>5} {:>10.0} tokens/s  step {:.3}s = data {:.3} + fwd {:.3} + bwd {:.3} \
         + opt {:.3}{}  peak {}{}  MFU {:.1}%",
        format!("candle {kernels}"),
        a.config,
        dtype_name,
        tokens_per_s,
        step,
        mean(1),
        mean(2),
        mean(3),
        mean(4),
        if mean(5).is_nan() {
            String::new()
        } else {
            format!(" (backward queued after {:.3})", mean(5))
        },
        peak.map_or("?".into(), |b| format!(
            "{:.2} GiB",
            b as f64 / (1u64 << 30) as f64
        )),
        estimate.map_or(String::new(), |b| format!(
            " (estimate {:.2} GiB)",
            b as f64 / (1u64 << 30) as f64
        )),
        100.0 * mfu
    );
    if a.op_times {
        print_op_times(&op_times, n, step - mean(4), ops_step);
    }
    if a.json {
        println!("{row}");
    }
    if a.save {
        time_checkpoint(&params, &opt, rng, step, &dev);
    }
}

/// Times taking a checkpoint snapshot (blocks training), writing it and loading it back.
fn time_checkpoint(params: &[Param], opt: &AdamW, rng: Rng, step: f64, dev: &Device) {
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
        settings: None,
        data_key: String::new(),
        trainable: "full".into(),
        loss_scale: None,
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
    checkpoint::load(&path, dev).unwrap();
    println!(
        "checkpoint: {:.1} MB; snapshot (blocks training) {snap_secs:.3}s; background write \
         {write_secs:.3}s; verify+load {:.3}s; mean step {step:.3}s",
        bytes as f64 / 1e6,
        t2.elapsed().as_secs_f64()
    );
}

/// `--check`: each fused op (values and input gradients) and one whole training step of a small
/// model (loss, every parameter's gradient, AdamW) on `dev` in f32, bf16 and f16, against the plain
/// ops on the CPU in f32. Prints ‖got − want‖ / ‖want‖ per output; fails above the type's
/// tolerance.
mod check {
    use super::*;
    use jobd::train::ops::{self, plain};

    fn rel(got: &Tensor, want: &Tensor) -> f64 {
        let g = got
            .to_device(&Device::Cpu)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let w = want
            .to_dtype(DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        assert_eq!(g.len(), w.len(), "shapes differ");
        if g.iter().any(|x| !x.is_finite()) {
            return f64::INFINITY;
        }
        let num: f64 = g.iter().zip(&w).map(|(a, b)| (a - b) * (a - b)).sum();
        let den: f64 = w.iter().map(|b| b * b).sum();
        (num / den.max(1e-30)).sqrt()
    }

    fn randn(rng: &mut Rng, shape: &[usize], scale: f64) -> Tensor {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|_| {
                // Box-Muller from the bench's own generator.
                let u1 = rng.next_f64().max(1e-12);
                let u2 = rng.next_f64();
                ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos() * scale) as f32
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    type OpFn<'a> = dyn Fn(&[Tensor]) -> Tensor + 'a;

    /// Runs `fused` on `dev` in `dtype` and `reference` on the CPU in f32 over the same inputs
    /// (the first `grads` of which are differentiated), loss = Σ out · r.
    #[allow(clippy::too_many_arguments)]
    fn case(
        name: &str,
        dev: &Device,
        dtype: DType,
        inputs: &[Tensor],
        grads: usize,
        fused: &OpFn<'_>,
        reference: &OpFn<'_>,
        tol: f64,
        rng: &mut Rng,
    ) -> bool {
        let cpu_vars: Vec<Var> = inputs[..grads]
            .iter()
            .map(|t| Var::from_tensor(t).unwrap())
            .collect();
        let mut cpu_in: Vec<Tensor> = cpu_vars.iter().map(|v| v.as_tensor().clone()).collect();
        cpu_in.extend(inputs[grads..].iter().cloned());
        let want = reference(&cpu_in);
        let r = randn(rng, want.dims(), 1.0);
        let want_g = (want.to_dtype(DType::F32).unwrap() * &r)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let gpu_vars: Vec<Var> = inputs[..grads]
            .iter()
            .map(|t| Var::from_tensor(&t.to_device(dev).unwrap().to_dtype(dtype).unwrap()).unwrap())
            .collect();
        let mut gpu_in: Vec<Tensor> = gpu_vars.iter().map(|v| v.as_tensor().clone()).collect();
        gpu_in.extend(inputs[grads..].iter().map(|t| t.to_device(dev).unwrap()));
        let got = fused(&gpu_in);
        let got_g = (got.to_dtype(DType::F32).unwrap() * r.to_device(dev).unwrap())
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let mut errs = vec![rel(&got, &want)];
        for (gv, cv) in gpu_vars.iter().zip(&cpu_vars) {
            let Some(g) = got_g.get(gv.as_tensor()) else {
                println!("{name:<34} {dtype:?}: no gradient reached an input");
                return false;
            };
            errs.push(rel(g, want_g.get(cv.as_tensor()).unwrap()));
        }
        let worst = errs.iter().cloned().fold(0.0, f64::max);
        let ok = worst <= tol;
        println!(
            "{name:<34} {:<5} value {:.2e}  grads {}  {}",
            format!("{dtype:?}").to_lowercase(),
            errs[0],
            errs[1..]
                .iter()
                .map(|e| format!("{e:.2e}"))
                .collect::<Vec<_>>()
                .join(" "),
            if ok { "ok" } else { "FAIL" }
        );
        ok
    }

    pub fn run(dev: &Device) -> bool {
        let mut rng = Rng::new(7);
        let mut ok = true;
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let tol = match dtype {
                DType::F32 => 1e-4,
                DType::F16 => 1e-2,
                _ => 2e-2,
            };
            let rng = &mut rng;
            let (b, t, d) = (2, 96, 256);
            // Weights in the compute type (LoRA's frozen base in bf16), then an f32 master
            // cast inside the op (full fine-tuning; its gradient is checked by the model step).
            let x = randn(rng, &[b, t, 192], 1.0);
            let w = randn(rng, &[160, 192], 0.1);
            for (label, grads) in [("linear", 2), ("linear (f32 weight)", 1)] {
                ok &= case(
                    label,
                    dev,
                    dtype,
                    &[x.clone(), w.clone()],
                    grads,
                    &|i| {
                        // Only the CUDA op casts an f32 weight itself; the model casts it
                        // first elsewhere.
                        if i[0].device().is_cuda() || i[1].dtype() == i[0].dtype() {
                            ops::linear(&i[0], &i[1]).unwrap()
                        } else {
                            ops::linear(&i[0], &i[1].to_dtype(i[0].dtype()).unwrap()).unwrap()
                        }
                    },
                    &|i| plain::linear(&i[0], &i[1]).unwrap(),
                    tol,
                    rng,
                );
            }
            let x = randn(rng, &[b, t, d], 1.0);
            let w = (randn(rng, &[d], 0.1) + 1.0).unwrap();
            ok &= case(
                "rms_norm",
                dev,
                dtype,
                &[x, w],
                2,
                &|i| ops::rms_norm(&i[0], &i[1], 1e-6).unwrap(),
                &|i| plain::rms_norm(&i[0], &i[1], 1e-6).unwrap(),
                tol,
                rng,
            );
            let (h, hd) = (4, 64);
            let x = randn(rng, &[b, t, h * hd], 1.0);
            let ang = randn(rng, &[t, hd / 2], 3.0);
            let ang = Tensor::cat(&[&ang, &ang], 1).unwrap();
            let (cos, sin) = (ang.cos().unwrap(), ang.sin().unwrap());
            ok &= case(
                "rope",
                dev,
                dtype,
                &[x, cos, sin],
                1,
                &|i| ops::rope(&i[0], &i[1], &i[2]).unwrap(),
                &|i| plain::rope(&i[0], &i[1], &i[2]).unwrap(),
                tol,
                rng,
            );
            let table = randn(rng, &[300, 128], 1.0);
            // Repeated ids (every fifth is 7) exercise the backward's summing.
            let ids: Vec<u32> = (0..b * t)
                .map(|i| if i % 5 == 0 { 7 } else { rng.below(300) as u32 })
                .collect();
            let ids = Tensor::from_vec(ids, (b, t), &Device::Cpu).unwrap();
            ok &= case(
                "embedding",
                dev,
                dtype,
                &[table, ids],
                1,
                &|i| ops::embedding(&i[0], &i[1]).unwrap(),
                &|i| i[0].index_select(&i[1].flatten_all().unwrap(), 0).unwrap(),
                tol,
                rng,
            );
            let g = randn(rng, &[b, t, 384], 2.0);
            let u = randn(rng, &[b, t, 384], 1.0);
            ok &= case(
                "swiglu",
                dev,
                dtype,
                &[g, u],
                2,
                &|i| ops::swiglu(&i[0], &i[1]).unwrap(),
                &|i| plain::swiglu(&i[0], &i[1]).unwrap(),
                tol,
                rng,
            );
            let v = 1000;
            let logits = randn(rng, &[b * t, v], 3.0);
            let labels: Vec<u32> = (0..b * t).map(|_| rng.below(v as u64) as u32).collect();
            let labels = Tensor::from_vec(labels, b * t, &Device::Cpu).unwrap();
            let mask: Vec<f32> = (0..b * t).map(|i| (i % 7 != 3) as u8 as f32).collect();
            let mask = Tensor::from_vec(mask, b * t, &Device::Cpu).unwrap();
            ok &= case(
                "cross_entropy",
                dev,
                dtype,
                &[logits, labels, mask],
                1,
                &|i| ops::cross_entropy(&i[0], &i[1], &i[2]).unwrap(),
                &|i| plain::cross_entropy(&i[0], &i[1], &i[2]).unwrap(),
                tol,
                rng,
            );
            for (label, heads, s, start, window) in [
                ("attention (MHA)", (4, 4), t, 0, None),
                ("attention (GQA 8/2, window 40)", (8, 2), t, 0, Some(40)),
                ("attention (GQA 4/2, 32 new of 96)", (4, 2), t, 64, None),
                // Long enough for the GPU's causal blocks (128 rows): a short last block, and
                // a prefix of keys before the first query.
                ("attention (MHA, 300 rows)", (4, 4), 300, 0, None),
                (
                    "attention (GQA 4/2, 300 new of 340: causal blocks)",
                    (4, 2),
                    340,
                    40,
                    None,
                ),
            ] {
                let tq = s - start;
                let q = randn(rng, &[b, tq, heads.0 * 32], 1.0);
                let k = randn(rng, &[b, s, heads.1 * 32], 1.0);
                let vv = randn(rng, &[b, s, heads.1 * 32], 1.0);
                ok &= case(
                    label,
                    dev,
                    dtype,
                    &[q, k, vv],
                    3,
                    &|i| ops::attention(&i[0], &i[1], &i[2], heads, start, window).unwrap(),
                    &|i| plain::attention(&i[0], &i[1], &i[2], heads, start, window).unwrap(),
                    tol,
                    rng,
                );
            }
            ok &= dropout_mask_case(dev, dtype);
            // Whole steps with several causal blocks in the GPU attention (4 of 8 rows at the
            // step's 32 tokens; the automatic size would make one).
            jobd::train::attention_blocks::set_block_rows(Some(8));
            for step in [
                Step::Autograd,
                Step::DirectOps(false),
                Step::DirectOps(true),
            ] {
                for lora in [false, true] {
                    ok &= model_step(dev, dtype, step, lora, false, tol * 2.0);
                }
            }
            // Qwen3's per-head query/key norms (the RMSNorm kernels over rows of head_dim),
            // full fine-tuning's step and LoRA's.
            for (step, lora) in [(Step::DirectOps(false), false), (Step::Autograd, true)] {
                ok &= model_step(dev, dtype, step, lora, true, tol * 2.0);
            }
            jobd::train::attention_blocks::set_block_rows(None);
        }
        println!("{}", if ok { "check: all ok" } else { "check: FAILED" });
        ok
    }

    /// LoRA dropout's mask made on the device: the same bits as on the CPU (the same
    /// generator draws), so a run's masks do not depend on where it trains.
    fn dropout_mask_case(dev: &Device, dtype: DType) -> bool {
        let n = 3 * 96 * 500 + 3;
        let draw = |device: &Device, dt: DType| {
            let x = Tensor::zeros(n, dt, device).unwrap();
            let mut rng = Rng::new(41);
            let m = jobd::train::model::dropout_mask(&x, 0.1, &mut rng).unwrap();
            let v: Vec<f32> = m
                .to_device(&Device::Cpu)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap()
                .to_vec1()
                .unwrap();
            (v, rng)
        };
        let (got, got_rng) = draw(dev, dtype);
        let (want, want_rng) = draw(&Device::Cpu, dtype);
        let differ = got
            .iter()
            .zip(&want)
            .filter(|(a, b)| a.to_bits() != b.to_bits())
            .count();
        let ok = differ == 0 && got_rng == want_rng;
        println!(
            "{:<34} {:<5} {differ} of {n} elements differ from the CPU's  {}",
            "dropout mask",
            format!("{dtype:?}").to_lowercase(),
            if ok { "ok" } else { "FAIL" }
        );
        ok
    }

    /// How a model step computes its gradients.
    #[derive(Clone, Copy, PartialEq)]
    enum Step {
        /// Plain ops through autograd (the reference).
        Plain,
        /// The fused ops through autograd (LoRA's path).
        Autograd,
        /// The fused ops without a graph (full fine-tuning's path on CUDA), with or without
        /// recomputing each layer in the backward.
        DirectOps(bool),
    }

    /// One step of a small untied GQA llama: loss and every gradient against the CPU's plain
    /// ops in f32, then (f32) the parameters after one AdamW update with clipping.
    /// With `lora`, the base is frozen (in the compute type but for the norms, as the
    /// trainer holds it) and adapters with dropout on every projection are trained; the
    /// dropout masks are the same on every device (the same generator draws). With `qwen3`
    /// the model is a Qwen3 (per-head query/key norms).
    fn model_step(
        dev: &Device,
        dtype: DType,
        step: Step,
        lora: bool,
        qwen3: bool,
        tol: f64,
    ) -> bool {
        let (mut cfg, _, _) = reference("tiny");
        cfg.tie_word_embeddings = false;
        if qwen3 {
            cfg.head_dim = Some(cfg.head_dim());
            cfg.model_type = "qwen3".into();
        }
        let (batch, block) = (4, 32);
        let run = |device: &Device, dtype: DType, step: Step| {
            let w = init_weights(&cfg, &mut Rng::new(3), &Device::Cpu).unwrap();
            let (model, params) = if lora {
                let on_device = w
                    .into_iter()
                    .map(|(k, t)| (k, t.to_device(device).unwrap()))
                    .collect();
                let frozen = frozen_base(on_device, dtype).unwrap();
                let mut model = Llama::new(cfg.clone(), &frozen, device).unwrap();
                let mut init = Rng::new(8);
                let params = attach_adapters(&mut model, 4, 0.1, |(out, inp)| {
                    let mut draw = |n: usize| {
                        let mut v = vec![0f32; n];
                        init.fill_normal(&mut v, 0.05);
                        v
                    };
                    (draw(4 * inp), draw(out * 4))
                });
                (model, params)
            } else {
                trainable(&cfg, w, device)
            };
            let mut drop_rng = Rng::new(13);
            let mut rng = Rng::new(5);
            let ids: Vec<u32> = (0..batch * (block + 1))
                .map(|_| rng.below(cfg.vocab_size as u64) as u32)
                .collect();
            let all = Tensor::from_vec(ids, (batch, block + 1), device).unwrap();
            let x = all.narrow(1, 0, block).unwrap().contiguous().unwrap();
            let y = all.narrow(1, 1, block).unwrap().contiguous().unwrap();
            let mask = Tensor::ones((batch, block), DType::F32, device).unwrap();
            let scale = 1.0 / (batch * block) as f64;
            // f16 gradients need a loss scale to stay out of f16's subnormals (the trainer's
            // starts at 2¹⁶ and adapts); a power of two, so unscaling is exact.
            let loss_scale = if dtype == DType::F16 { 1024.0 } else { 1.0 };
            let unscale = |g: &Tensor| (g / loss_scale).unwrap();
            let (loss, grads) = if let Step::DirectOps(recompute) = step {
                if !direct_ops::supported(&model, dtype) {
                    return None;
                }
                let fwd = direct_ops::forward(
                    &model,
                    &x,
                    &y,
                    &mask,
                    dtype,
                    (scale * loss_scale) as f32,
                    recompute,
                    Some(&mut drop_rng),
                )
                .unwrap();
                let loss = (&fwd.loss_sum * scale).unwrap();
                let g = fwd.backward(&model).unwrap();
                let grads: Vec<Tensor> = params
                    .iter()
                    .map(|p| unscale(g.get(p.var.as_tensor()).unwrap()))
                    .collect();
                (loss, grads)
            } else {
                let mut pass = Pass::new(dtype, Some(&mut drop_rng));
                pass.fused = step != Step::Plain;
                let nll = if pass.fused {
                    model.forward_loss(&x, &y, &mask, &mut pass, true).unwrap()
                } else {
                    let logits = model.forward(&x, 0, None, &mut pass).unwrap();
                    nll_sum_plain(&logits, &y, &mask).unwrap()
                };
                let loss = (nll * scale).unwrap();
                let g = (&loss * loss_scale).unwrap().backward().unwrap();
                let grads: Vec<Tensor> = params
                    .iter()
                    .map(|p| unscale(g.get(p.var.as_tensor()).unwrap()))
                    .collect();
                (loss, grads)
            };
            let (norm, clip) = optim::clip_factor(&grads, 0.5).unwrap();
            let mut opt = AdamW::new(
                AdamWConfig {
                    beta1: 0.9,
                    beta2: 0.999,
                    eps: 1e-8,
                    weight_decay: 0.1,
                },
                &params,
            )
            .unwrap();
            opt.step_scaled(&params, &grads, 1e-3, clip).unwrap();
            let after: Vec<Tensor> = params.iter().map(|p| p.var.as_tensor().clone()).collect();
            Some((loss, grads, norm, after))
        };
        let (want_loss, want_g, want_norm, want_p) =
            run(&Device::Cpu, DType::F32, Step::Plain).expect("plain ops run everywhere");
        let Some((loss, grads, norm, after)) = run(dev, dtype, step) else {
            // The CPU has no fused bf16 kernels (the trainer uses autograd there); CUDA must
            // run the step.
            let ok = !dev.is_cuda();
            println!(
                "{:<34} {:<5} not supported here  {}",
                "model step, direct ops",
                format!("{dtype:?}").to_lowercase(),
                if ok { "skipped" } else { "FAIL" }
            );
            return ok;
        };
        let loss_err = rel(&loss.to_dtype(DType::F32).unwrap(), &want_loss);
        let grad_err = grads
            .iter()
            .zip(&want_g)
            .map(|(g, w)| rel(g, w))
            .fold(0.0, f64::max);
        let norm_err = (norm - want_norm).abs() / want_norm;
        let param_err = after
            .iter()
            .zip(&want_p)
            .map(|(g, w)| rel(g, w))
            .fold(0.0, f64::max);
        // After one step the parameters differ from the start by ~lr; bf16 gradients move them
        // by a different ~lr·error, so only f32 is held to the tolerance here.
        let ok = loss_err <= tol
            && grad_err <= tol
            && norm_err <= tol
            && (dtype != DType::F32 || param_err <= tol);
        println!(
            "{:<34} {:<5} loss {loss_err:.2e}  worst grad {grad_err:.2e}  norm {norm_err:.2e}  \
             params after AdamW {param_err:.2e}  {}",
            match (lora, step) {
                _ if qwen3 && lora => "Qwen3 LoRA step, autograd",
                _ if qwen3 => "Qwen3 model step, direct ops",
                (false, Step::DirectOps(false)) => "model step (tiny, GQA), direct ops",
                (false, Step::DirectOps(true)) => "model step, direct ops, recompute",
                (false, _) => "model step (tiny, GQA), autograd",
                (true, Step::DirectOps(false)) => "LoRA step (dropout), direct ops",
                (true, Step::DirectOps(true)) => "LoRA step, direct ops, recompute",
                (true, _) => "LoRA step (dropout), autograd",
            },
            format!("{dtype:?}").to_lowercase(),
            if ok { "ok" } else { "FAIL" }
        );
        ok
    }
}
