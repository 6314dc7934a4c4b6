//! L1: VRAM estimates for train jobs — weights, gradients, optimizer state, activations and
//! overhead — as pure arithmetic over the job spec and the base model's `config.json`.
//!
//! The daemon uses the total for `vram = "auto"`; `jobctl estimate` prints the breakdown and
//! the reference tiers for standard llama sizes computed by the same formula. The daemon must
//! not depend on the training engine, so the few `config.json` fields needed are read here.
//!
//! The formula, per GPU (the trainer keeps one replica per GPU):
//! - frozen weights: params × dtype bytes;
//! - trainable weights: an f32 master copy (4 B), plus a compute copy in bf16/f16 runs;
//! - gradients: trainable × 4 B; AdamW moments: trainable × 8 B;
//! - activations: what the trainer keeps per layer and token (elements), times batch × seq ×
//!   layers × dtype bytes — the trainer's hand-written step over the fused kernels
//!   (`train::direct_ops`; every GPU type) keeps 6·h + 2·kv + 3·ff (the norms' outputs,
//!   rotated q and k, v, the attention output, the residual after attention, gate, up and
//!   their SwiGLU), plus for LoRA each adapter's rank-r activation and, with dropout, its mask
//!   (the projection's input width), and for Qwen3 the queries and keys before their norms. With activation checkpointing just each layer's input
//!   (h) is kept, plus one layer recomputed;
//! - attention's working set for one layer: the fused kernels keep only row log-sum-exps
//!   across layers, but the backward of one layer holds the scores and dP (f32) and P and dS
//!   (the compute type) of one causal block of query rows against every key (batch × heads ×
//!   block rows × seq each; the block is a quarter of the rows at 512 tokens, an eighth from
//!   1024 on), plus q, k, v, the output, its gradient and dQ in the heads' layout and dK, dV
//!   summed in f32 ([`attention_working_set`], checked against the allocations of the GPU
//!   attention's sequence run on the kernel emulator);
//! - logits and their gradient in f32: batch × seq × vocab × 4 B × 2 (plus the logits in the
//!   compute type in bf16/f16);
//! - overhead: CUDA context, cuBLAS workspace, loaded kernels and allocator slack, 1.5 GiB
//!   (a 0.12M-parameter job measured 1.3 GiB at its peak on an H200).

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::spec::train::{TrainDType, TrainingArgs};
use crate::spec::{JobKind, JobSpec};

/// CUDA context + cuBLAS workspace + loaded kernels + allocator slack.
pub const OVERHEAD_BYTES: u64 = 3 << 29;

/// Query rows per causal block of the GPU attention at `seq` tokens: at least 128, at most 8
/// blocks, in multiples of 64 (never more than `seq`). This is `train::attention_blocks`'
/// rule, whose tests check this copy: the daemon estimates without the training engine.
pub fn attention_block_rows(seq: u64) -> u64 {
    seq.div_ceil(8).next_multiple_of(64).max(128).min(seq)
}

/// Bytes the backward of one layer's attention allocates at its peak (`train::
/// attention_device::backward`, `dtype_bytes` per element of the compute type): q, k, v, the
/// output, its gradient and dQ in the heads' layout, dK and dV summed in f32, and one causal
/// block's scores and dP (f32) and P and dS; or, once those four and the output's copy are
/// freed, the packed dQ, dK and dV. (The forward's working set is smaller.)
pub fn attention_working_set(shape: &ModelShape, batch: u64, seq: u64, dtype_bytes: u64) -> u64 {
    let c = dtype_bytes;
    let heads_layout = batch * shape.heads * seq * shape.head_dim;
    let block = batch * shape.heads * attention_block_rows(seq) * seq;
    let packed = batch * seq * shape.head_dim * (shape.heads + 2 * shape.kv_heads);
    let during = 6 * c * heads_layout + 8 * heads_layout + (8 + 2 * c) * block;
    let after = 5 * c * heads_layout + 8 * heads_layout + c * packed;
    during.max(after)
}

/// The sizes of a llama-family model that matter for memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelShape {
    pub hidden: u64,
    pub intermediate: u64,
    pub layers: u64,
    pub heads: u64,
    pub kv_heads: u64,
    pub head_dim: u64,
    pub vocab: u64,
    pub tied: bool,
    pub qkv_bias: bool,
    /// Qwen3's per-head query/key norms.
    #[serde(default)]
    pub qk_norm: bool,
}

/// How the model is trained.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum Tuning {
    Full,
    /// LoRA of rank `r` on `modules` (a bit set over q, k, v, o, gate, up, down), with or
    /// without dropout on the adapters' inputs.
    Lora {
        r: u64,
        modules: [bool; 7],
        #[serde(default)]
        dropout: bool,
    },
}

/// One estimate, broken down.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Breakdown {
    pub params: u64,
    pub trainable_params: u64,
    pub dtype: String,
    pub batch: u64,
    pub seq: u64,
    pub weights: u64,
    pub gradients: u64,
    pub optimizer: u64,
    pub activations: u64,
    pub activations_checkpointed: u64,
    pub overhead: u64,
    /// Without activation checkpointing.
    pub total: u64,
    pub total_checkpointed: u64,
    /// Whether the job asks for activation checkpointing and its trainer does it (full
    /// fine-tuning in f32 or bf16); then [`Self::needed`] is `total_checkpointed`.
    #[serde(default)]
    pub checkpointing: bool,
}

impl Breakdown {
    /// The bytes per GPU the job needs as it will run.
    pub fn needed(&self) -> u64 {
        if self.checkpointing {
            self.total_checkpointed
        } else {
            self.total
        }
    }
}

const MODULES: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

impl ModelShape {
    /// Total parameters.
    pub fn params(&self) -> u64 {
        let (h, ff, kv) = (
            self.hidden,
            self.intermediate,
            self.kv_heads * self.head_dim,
        );
        let q = self.heads * self.head_dim;
        let attn = h * q + 2 * h * kv + q * h + if self.qkv_bias { q + 2 * kv } else { 0 };
        let qk_norm = if self.qk_norm { 2 * self.head_dim } else { 0 };
        let per_layer = attn + 3 * h * ff + 2 * h + qk_norm;
        let embed = self.vocab * h * if self.tied { 1 } else { 2 };
        self.layers * per_layer + embed + h
    }

    /// (in, out) of each adaptable projection, in `MODULES` order.
    fn projections(&self) -> [(u64, u64); 7] {
        let (h, ff) = (self.hidden, self.intermediate);
        let (q, kv) = (self.heads * self.head_dim, self.kv_heads * self.head_dim);
        [(h, q), (h, kv), (h, kv), (q, h), (h, ff), (h, ff), (ff, h)]
    }

    /// Reads the sizes from a Hugging Face `config.json`.
    pub fn from_config_json(path: &Path) -> Result<ModelShape, String> {
        #[derive(Deserialize)]
        struct Raw {
            hidden_size: u64,
            intermediate_size: u64,
            num_hidden_layers: u64,
            num_attention_heads: u64,
            num_key_value_heads: Option<u64>,
            head_dim: Option<u64>,
            vocab_size: u64,
            #[serde(default)]
            tie_word_embeddings: bool,
            #[serde(default)]
            attention_bias: bool,
            #[serde(default)]
            model_type: Option<String>,
        }
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let r: Raw = serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        if r.num_attention_heads == 0 {
            return Err(format!("{}: num_attention_heads is 0", path.display()));
        }
        let model_type = r.model_type.as_deref().unwrap_or("llama");
        let qwen3 = model_type == "qwen3";
        let default_head_dim =
            crate::hf_config::default_head_dim(model_type, r.hidden_size, r.num_attention_heads);
        Ok(ModelShape {
            hidden: r.hidden_size,
            intermediate: r.intermediate_size,
            layers: r.num_hidden_layers,
            heads: r.num_attention_heads,
            kv_heads: r.num_key_value_heads.unwrap_or(r.num_attention_heads),
            head_dim: r.head_dim.unwrap_or(default_head_dim),
            vocab: r.vocab_size,
            tied: r.tie_word_embeddings,
            qkv_bias: r.attention_bias || r.model_type.as_deref() == Some("qwen2"),
            qk_norm: qwen3,
        })
    }
}

/// The estimate for a shape trained a given way.
pub fn estimate_shape(
    shape: &ModelShape,
    tuning: Tuning,
    dtype: TrainDType,
    batch: u64,
    seq: u64,
) -> Breakdown {
    let dtype_bytes = match dtype {
        TrainDType::F32 => 4,
        TrainDType::Bf16 | TrainDType::F16 => 2,
    };
    let params = shape.params();
    let trainable = match tuning {
        Tuning::Full => params,
        Tuning::Lora { r, modules, .. } => {
            let per_layer: u64 = shape
                .projections()
                .iter()
                .zip(modules)
                .filter(|(_, on)| *on)
                .map(|((i, o), _)| r * (i + o))
                .sum();
            per_layer * shape.layers
        }
    };
    let frozen = params.saturating_sub(if tuning == Tuning::Full { params } else { 0 });
    let compute_copy = if dtype_bytes < 4 { dtype_bytes } else { 0 };
    let weights = frozen * dtype_bytes + trainable * (4 + compute_copy);
    let gradients = trainable * 4;
    let optimizer = trainable * 8;
    let (h, ff, kv) = (
        shape.hidden,
        shape.intermediate,
        shape.kv_heads * shape.head_dim,
    );
    let adapters: u64 = match tuning {
        Tuning::Full => 0,
        Tuning::Lora {
            r,
            modules,
            dropout,
        } => shape
            .projections()
            .iter()
            .zip(modules)
            .filter(|(_, on)| *on)
            .map(|((i, _), _)| r + if dropout { *i } else { 0 })
            .sum(),
    };
    // The trainer's hand-written step keeps these (no autograd graph, no T×T tensor across
    // layers), and the queries and keys before Qwen3's norms.
    let qk_raw = if shape.qk_norm {
        (shape.heads + shape.kv_heads) * shape.head_dim
    } else {
        0
    };
    let per_token_layer = 6 * h + 2 * kv + 3 * ff + adapters + qk_raw;
    let tokens = batch * seq;
    let attention_working_set = attention_working_set(shape, batch, seq, dtype_bytes);
    let logits = tokens * shape.vocab * (8 + compute_copy);
    let activations =
        tokens * per_token_layer * shape.layers * dtype_bytes + attention_working_set + logits;
    let activations_checkpointed = tokens * (h * shape.layers + per_token_layer) * dtype_bytes
        + attention_working_set
        + logits;
    let base = weights + gradients + optimizer + OVERHEAD_BYTES;
    Breakdown {
        params,
        trainable_params: trainable,
        dtype: dtype.as_str().into(),
        batch,
        seq,
        weights,
        gradients,
        optimizer,
        activations,
        activations_checkpointed,
        overhead: OVERHEAD_BYTES,
        total: base + activations,
        total_checkpointed: base + activations_checkpointed,
        checkpointing: false,
    }
}

/// The shape a train job's `[model]` describes (reading the base model's `config.json`).
pub fn job_shape(spec: &JobSpec) -> Result<ModelShape, String> {
    let m = spec
        .model
        .as_ref()
        .ok_or("the job has no [model] section")?;
    if let Some(base) = &m.base {
        return ModelShape::from_config_json(&base.join("config.json"));
    }
    let need =
        |v: Option<usize>, k: &str| v.map(|x| x as u64).ok_or(format!("model.{k} is needed"));
    let hidden = need(m.hidden_size, "hidden_size")?;
    let heads = need(m.num_attention_heads, "num_attention_heads")?;
    Ok(ModelShape {
        hidden,
        intermediate: m
            .intermediate_size
            .map(|x| x as u64)
            .unwrap_or(crate::spec::train::default_intermediate_size(hidden as usize) as u64),
        layers: need(m.num_hidden_layers, "num_hidden_layers")?,
        heads,
        kv_heads: m.num_key_value_heads.map_or(heads, |x| x as u64),
        head_dim: hidden / heads.max(1),
        vocab: need(m.vocab_size, "vocab_size")?,
        tied: m.tie_word_embeddings.unwrap_or(false),
        qkv_bias: m.attention_bias.unwrap_or(false),
        qk_norm: m.qk_norm.unwrap_or(false),
    })
}

/// The context (`max_position_embeddings`) of a train job's model: the base's `config.json`,
/// or the scratch model's own (`None` when the job does not set it).
fn job_context(spec: &JobSpec) -> Result<Option<u64>, String> {
    let Some(m) = spec.model.as_ref() else {
        return Ok(None);
    };
    let Some(base) = &m.base else {
        return Ok(m.max_position_embeddings.map(|c| c as u64));
    };
    #[derive(Deserialize)]
    struct Raw {
        max_position_embeddings: Option<u64>,
    }
    let path = base.join("config.json");
    let text = std::fs::read_to_string(&path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let raw: Raw = serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(raw.max_position_embeddings)
}

/// The estimate for a train job, from its spec.
pub fn estimate_job(spec: &JobSpec) -> Result<Breakdown, String> {
    if spec.kind != JobKind::Train {
        return Err("only train jobs have an estimate; a command job declares its VRAM".into());
    }
    let shape = job_shape(spec)?;
    // No [training] section: every option has its default, as the trainer takes them.
    let defaults = TrainingArgs::default();
    let t = spec.training.as_ref().unwrap_or(&defaults);
    // As the trainer: block_size, else the smaller of 1024 and the model's context.
    let seq = match spec.data.as_ref().and_then(|d| d.block_size) {
        Some(b) => b as u64,
        None => job_context(spec)?.map_or(1024, |c| c.min(1024)),
    };
    let tuning = match &spec.lora {
        None => Tuning::Full,
        Some(l) => {
            let mut modules = [false; 7];
            for (i, name) in MODULES.iter().enumerate() {
                modules[i] = l
                    .target_modules
                    .iter()
                    .any(|m| m == name || m == "all-linear");
            }
            Tuning::Lora {
                r: l.r as u64,
                modules,
                dropout: l.lora_dropout > 0.0,
            }
        }
    };
    let mut b = estimate_shape(
        &shape,
        tuning,
        t.dtype,
        t.per_device_train_batch_size as u64,
        seq,
    );
    // The trainer's hand-written step (every GPU type) recomputes layers when asked.
    b.checkpointing = t.gradient_checkpointing;
    Ok(b)
}

/// Estimated VRAM per GPU for a train job, in bytes; `None` when it cannot be computed (the
/// job then gets whole GPUs).
pub fn per_gpu_bytes(spec: &JobSpec) -> Option<u64> {
    estimate_job(spec).ok().map(|b| b.needed())
}

/// Standard llama sizes for the reference table.
pub fn reference_shapes() -> Vec<(&'static str, ModelShape)> {
    let llama = |hidden, intermediate, layers, heads, kv_heads| ModelShape {
        hidden,
        intermediate,
        layers,
        heads,
        kv_heads,
        head_dim: hidden / heads,
        vocab: 32000,
        tied: false,
        qkv_bias: false,
        qk_norm: false,
    };
    vec![
        ("7B", llama(4096, 11008, 32, 32, 32)),
        ("13B", llama(5120, 13824, 40, 40, 40)),
        ("34B", llama(8192, 22016, 48, 64, 8)),
        ("70B", llama(8192, 28672, 80, 64, 8)),
    ]
}

/// LoRA as the reference tiers assume it: rank 16 on the four attention projections, no
/// dropout.
pub const REFERENCE_LORA: Tuning = Tuning::Lora {
    r: 16,
    modules: [true, true, true, true, false, false, false],
    dropout: false,
};

#[cfg(test)]
mod tests {
    use super::*;

    const GB: f64 = 1e9;
    const GIB: f64 = (1u64 << 30) as f64;
    const BF16: TrainDType = TrainDType::Bf16;

    /// The 100M-parameter reference of issue 9 (hidden 768, 14 layers, 12 heads, MLP 2048,
    /// vocab 1024, untied).
    fn ref_100m() -> ModelShape {
        ModelShape {
            hidden: 768,
            intermediate: 2048,
            layers: 14,
            heads: 12,
            kv_heads: 12,
            head_dim: 64,
            vocab: 1024,
            tied: false,
            qkv_bias: false,
            qk_norm: false,
        }
    }

    /// Peaks measured on an H200 (NVML, context included) for full fine-tuning of the 100M
    /// config at batch 16 × 512: f32 9.02 GiB, bf16 5.92 GiB. They were measured through
    /// autograd with attention's whole T×S buffers, which keeps more than the trainer's step
    /// now does: its op-level step keeps less per layer, and one causal block of 128 of the
    /// 512 query rows holds a quarter of those buffers. The estimate must cover the peaks less
    /// that exact saving (three quarters of one layer's scores, dP, P and dS), and not be far
    /// above them. The next GPU run's peaks of the trainer's own step replace these figures.
    #[test]
    fn covers_measured_peaks_without_wasting_the_gpu() {
        for (dtype, measured, bytes) in [(TrainDType::F32, 9.02, 4), (BF16, 5.92, 2)] {
            let b = estimate_shape(&ref_100m(), Tuning::Full, dtype, 16, 512);
            let est = b.total as f64 / GIB;
            let blocks_saving = (16 * 12 * 512 * (512 - 128) * (8 + 2 * bytes)) as f64 / GIB;
            let floor = measured - blocks_saving;
            assert!(
                (floor..measured * 1.3).contains(&est),
                "{dtype:?}: estimate {est:.2} GiB, measured {measured} GiB less {blocks_saving:.2}"
            );
        }
    }

    /// The fused attention keeps no T×T tensor across layers: a long context costs the
    /// quadratic working set of one layer's causal block, not of every layer; f16 runs the
    /// same kernels as bf16, so needs the same.
    #[test]
    fn long_contexts_pay_for_one_layers_scores() {
        let s = reference_shapes()[0].1;
        let lora = estimate_shape(&s, REFERENCE_LORA, BF16, 1, 4096);
        assert!(lora.total as f64 / GB < 48.0, "{}", lora.total as f64 / GB);
        // One layer's scores and dP (f32) and P and dS (bf16) for a block of 512 of the 4096
        // query rows (32 heads × 512 × 4096 × 12 B), plus its ten copies of q/k/v-sized
        // tensors (six in bf16, two in f32: 32 × 4096 × 128 × 20 B). At 2048 tokens the block
        // is 256 rows, a quarter of the quadratic part.
        let quadratic = 32 * 512 * 4096 * 12;
        let copies = 32 * 4096 * 128 * 20;
        let short = estimate_shape(&s, REFERENCE_LORA, BF16, 1, 2048);
        let linear_part = 2 * (short.activations - quadratic / 4);
        assert_eq!(lora.activations - linear_part, quadratic);
        assert_eq!(
            attention_working_set(&s, 1, 4096, 2),
            quadratic + copies,
            "the copies scale with the tokens, as the activations do"
        );
        let f16 = estimate_shape(&s, REFERENCE_LORA, TrainDType::F16, 1, 4096);
        assert_eq!(f16.total, lora.total);
    }

    #[test]
    fn llama_7b_has_7b_parameters() {
        let (_, s) = reference_shapes()[0];
        let p = s.params() as f64;
        assert!((6.6e9..6.8e9).contains(&p), "{p}");
        let (_, s70) = reference_shapes()[3];
        assert!(
            (68.5e9..69.5e9).contains(&(s70.params() as f64)),
            "{}",
            s70.params()
        );
    }

    /// Qwen3-0.6B's config.json (no head_dim: Qwen3's default of 128 applies, twice
    /// hidden / heads) gives Hugging Face's parameter count, query/key norms included.
    #[test]
    fn qwen3_config_reads_with_its_head_width() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        std::fs::write(
            &path,
            r#"{"model_type":"qwen3","hidden_size":1024,"intermediate_size":3072,
            "num_hidden_layers":28,"num_attention_heads":16,"num_key_value_heads":8,
            "vocab_size":151936,"tie_word_embeddings":true,"attention_bias":false}"#,
        )
        .unwrap();
        let s = ModelShape::from_config_json(&path).unwrap();
        assert_eq!((s.head_dim, s.qk_norm, s.qkv_bias), (128, true, false));
        assert_eq!(s.params(), 596_049_920);
        let without_norms = ModelShape {
            qk_norm: false,
            ..s
        };
        let full = |s: &ModelShape| estimate_shape(s, Tuning::Full, BF16, 4, 1024);
        assert!(full(&s).activations > full(&without_norms).activations);
    }

    #[test]
    fn rule_of_thumb_holds() {
        let shapes = reference_shapes();
        // 7B with LoRA in bf16 at a modest sequence: 12–20 GB.
        let lora7 = estimate_shape(&shapes[0].1, REFERENCE_LORA, BF16, 1, 512).total as f64 / GB;
        assert!((12.0..20.0).contains(&lora7), "7B LoRA {lora7:.1} GB");
        // 34B (25B+) needs 48 GB+ even with LoRA.
        let lora34 = estimate_shape(&shapes[2].1, REFERENCE_LORA, BF16, 1, 512).total as f64 / GB;
        assert!(lora34 >= 48.0, "34B LoRA {lora34:.1} GB");
        // Full fine-tuning costs far more than LoRA (f32 master weights + AdamW).
        let full7 = estimate_shape(&shapes[0].1, Tuning::Full, BF16, 1, 512).total as f64 / GB;
        assert!(full7 > 5.0 * lora7, "7B full {full7:.1} GB");
    }

    #[test]
    fn checkpointing_saves_activation_memory() {
        let s = reference_shapes()[0].1;
        let b = estimate_shape(&s, Tuning::Full, BF16, 8, 2048);
        // One layer's attention working set and the logits stay either way.
        assert!(b.activations_checkpointed * 3 < b.activations);
        assert!(b.total_checkpointed < b.total);
        assert_eq!(b.needed(), b.total, "not asked for");
    }

    /// A job in a temporary directory (kept alive with it: the estimate reads config.json).
    fn job(extra: &str, lora: bool) -> (tempfile::TempDir, JobSpec) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("train.jsonl"), "{\"text\": \"hi\"}\n").unwrap();
        std::fs::create_dir(dir.path().join("base")).unwrap();
        let config = serde_json::json!({
            "model_type": "llama", "hidden_size": 768, "intermediate_size": 2048,
            "num_hidden_layers": 14, "num_attention_heads": 12, "vocab_size": 1024
        });
        std::fs::write(dir.path().join("base/config.json"), config.to_string()).unwrap();
        // Resolving the job only checks that these exist.
        for f in ["tokenizer.json", "model.safetensors"] {
            std::fs::write(dir.path().join("base").join(f), "").unwrap();
        }
        let model = if lora {
            "base = \"base\"\n[lora]\nr = 8"
        } else {
            "init = \"scratch\"\nhidden_size = 768\nnum_hidden_layers = 14\n\
             num_attention_heads = 12\nvocab_size = 1024"
        };
        let text = format!(
            r#"
kind = "train"
[data]
train_file = "train.jsonl"
block_size = 512
[training]
per_device_train_batch_size = 16
{extra}
[resources]
gpus = 1
[model]
{model}
"#
        );
        let spec = crate::spec::job::parse_and_resolve("job.toml", &text, dir.path()).unwrap();
        (dir, spec)
    }

    /// A job's placement uses the checkpointed total where its trainer recomputes layers (every
    /// GPU type, full fine-tuning or LoRA), and the full total without checkpointing.
    #[test]
    fn placement_follows_what_the_trainer_does_with_checkpointing() {
        let need = |extra: &str, lora: bool| {
            let (_dir, s) = job(extra, lora);
            let b = estimate_job(&s).unwrap();
            assert_eq!(per_gpu_bytes(&s), Some(b.needed()));
            (b.checkpointing, b.needed(), b.total)
        };
        let (on, needed, total) = need("gradient_checkpointing = true\ndtype = \"bf16\"", false);
        assert!(on && needed < total);
        let (on, needed, total) = need("dtype = \"bf16\"", false);
        assert!(!on && needed == total);
        let (on, needed, total) = need("gradient_checkpointing = true\ndtype = \"f16\"", false);
        assert!(on && needed < total, "f16 recomputes too");
        let (on, needed, total) = need("gradient_checkpointing = true", true);
        assert!(on && needed < total, "LoRA recomputes too");
    }

    /// A job with no `[training]` section and no `block_size` is estimated as the trainer runs
    /// it: default options, and the base's context when it is under 1024 tokens (the estimate
    /// used to fail, and the job got a whole GPU; or it counted 1024 tokens for a 64-token
    /// model).
    #[test]
    fn defaults_are_the_trainers() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("base")).unwrap();
        let config = serde_json::json!({
            "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 300,
            "max_position_embeddings": 64
        });
        std::fs::write(dir.path().join("base/config.json"), config.to_string()).unwrap();
        for f in ["tokenizer.json", "model.safetensors"] {
            std::fs::write(dir.path().join("base").join(f), "").unwrap();
        }
        std::fs::write(dir.path().join("train.jsonl"), "{\"text\": \"a\"}\n").unwrap();
        let text = "kind = \"train\"\n[model]\nbase = \"base\"\n[data]\ntrain_file = \"train.jsonl\"\n\
                    [resources]\ngpus = 1\n";
        let spec = crate::spec::job::parse_and_resolve("job.toml", text, dir.path()).unwrap();
        assert!(spec.training.is_none());
        let b = estimate_job(&spec).unwrap();
        let defaults = TrainingArgs::default();
        assert_eq!(
            (b.batch, b.seq),
            (defaults.per_device_train_batch_size as u64, 64)
        );
        assert!(per_gpu_bytes(&spec).is_some());
    }

    /// LoRA dropout keeps a mask as wide as each adapted projection's input.
    #[test]
    fn lora_dropout_masks_are_counted() {
        let s = reference_shapes()[0].1;
        let plain = estimate_shape(&s, REFERENCE_LORA, BF16, 2, 512);
        let Tuning::Lora { r, modules, .. } = REFERENCE_LORA else {
            unreachable!()
        };
        let masked = Tuning::Lora {
            r,
            modules,
            dropout: true,
        };
        let with = estimate_shape(&s, masked, BF16, 2, 512);
        // q, k, v and o of 32 layers read 4096 wide: 4 × 4096 × 1024 tokens × 32 × 2 B.
        assert_eq!(
            with.activations - plain.activations,
            4 * 4096 * 1024 * 32 * 2
        );
    }

    #[test]
    fn lora_trainable_count() {
        let s = reference_shapes()[0].1;
        let b = estimate_shape(&s, REFERENCE_LORA, BF16, 1, 512);
        // 32 layers × 4 projections × 16 × (4096 + 4096).
        assert_eq!(b.trainable_params, 32 * 4 * 16 * 8192);
    }
}
