//! Job-file sections for `kind = "train"`: `[model]`, `[data]`, `[training]`, `[lora]`.
//!
//! Option names and defaults follow Hugging Face `TrainingArguments` (and PEFT's `LoraConfig`
//! for `[lora]`) so that people can carry their settings over. This module only checks what
//! can be known from the job file and a `stat` of the paths it names; what needs the model or
//! the data (block size beyond the model's context, vocabulary mismatch) is checked by the
//! worker before the first step.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::job::JobSpec;
use super::toml_source::Issue;

/// Projection modules LoRA can adapt (Hugging Face llama names).
pub const LORA_MODULES: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// How a fresh model starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelInit {
    /// Random weights (Hugging Face's llama initialisation) and a byte-level BPE tokenizer
    /// trained on the training data.
    Scratch,
}

/// `[model]`: the base model (`base`, a Hugging Face checkpoint directory) or the sizes of a
/// fresh one (`init = "scratch"`). The size fields use `config.json`'s names and only apply to
/// `init = "scratch"`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    /// A directory holding `config.json`, `model.safetensors` (or a sharded
    /// `model.safetensors.index.json`) and `tokenizer.json`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<PathBuf>,
    /// With `base = "@previous"` in a schedule: the base of the first run (and of any run
    /// before one has succeeded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_base: Option<PathBuf>,
    /// `"scratch"`: build a fresh model from the sizes below.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init: Option<ModelInit>,
    /// Width of the residual stream (scratch only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hidden_size: Option<usize>,
    /// Width of the SwiGLU MLP (scratch only); default: 8/3 of `hidden_size`, rounded up to
    /// a multiple of 64.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub intermediate_size: Option<usize>,
    /// Number of decoder layers (scratch only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_hidden_layers: Option<usize>,
    /// Query heads (scratch only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_attention_heads: Option<usize>,
    /// Key/value heads for grouped-query attention (scratch only); default: the query heads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_key_value_heads: Option<usize>,
    /// Longest sequence the model supports (scratch only); default: `data.block_size`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_position_embeddings: Option<usize>,
    /// Vocabulary size (scratch only): the BPE tokenizer trained on the data gets this many
    /// tokens at most.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vocab_size: Option<usize>,
    /// Rotary embedding base (scratch only); default 10000.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_theta: Option<f64>,
    /// RMSNorm epsilon (scratch only); default 1e-6.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rms_norm_eps: Option<f64>,
    /// Share the input embedding with the output projection (scratch only); default false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tie_word_embeddings: Option<bool>,
    /// Biases on the q/k/v projections, as Qwen2 has (scratch only); default false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attention_bias: Option<bool>,
    /// A per-head RMSNorm on queries and keys before the rotary embedding, as Qwen3 has
    /// (scratch only; the model is then a `qwen3`); default false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qk_norm: Option<bool>,
    /// Standard deviation of the initial weights (scratch only); default 0.02.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initializer_range: Option<f64>,
}

/// How a data file is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DataFormat {
    /// By extension: `.jsonl` and `.json` are JSON lines (as for Hugging Face's
    /// `load_dataset("json")`), anything else plain text.
    #[default]
    Auto,
    /// Plain text: the whole file is tokenized as one text (lines stay joined by their
    /// newlines) and cut into `block_size` blocks; a shorter tail is dropped.
    Text,
    /// JSON lines: each line `{"text": ...}`, `{"prompt": ..., "completion": ...}` (loss
    /// only on the completion) or `{"messages": [...]}` (a conversation; loss only on the
    /// assistant's replies) is one example, cut at `block_size` tokens.
    Jsonl,
}

impl DataFormat {
    /// Whether `path` is read as JSON lines.
    pub fn reads_jsonl(self, path: &Path) -> bool {
        match self {
            DataFormat::Jsonl => true,
            DataFormat::Text => false,
            DataFormat::Auto => path
                .extension()
                .is_some_and(|e| e.eq_ignore_ascii_case("jsonl") || e.eq_ignore_ascii_case("json")),
        }
    }
}

/// A data file's start that says it is read the wrong way: a JSON array where JSON lines are
/// expected, or JSON-lines examples in a file `format = "auto"` reads as plain text (which
/// would train on the JSON syntax itself, with no error).
fn data_format_issue(path: &Path, format: DataFormat) -> Option<String> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let mut head = Vec::with_capacity(4096);
    // The path was a file when checked, but may be swapped for a FIFO since: never block on
    // its open (a daemon thread would wait for a writer for ever), and read only a file.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NONBLOCK)
        .open(path)
        .ok()?;
    if !file.metadata().ok()?.is_file() {
        return None;
    }
    file.take(64 * 1024).read_to_end(&mut head).ok()?;
    let text = String::from_utf8_lossy(&head);
    let text = text.trim_start_matches('\u{feff}');
    let first = text.lines().find(|l| !l.trim().is_empty())?.trim();
    if format.reads_jsonl(path) {
        return first.starts_with('[').then(|| {
            format!(
                "{} holds a JSON array; write one JSON object per line (JSON lines), e.g. \
                 jq -c '.[]' {} > data.jsonl",
                path.display(),
                path.display()
            )
        });
    }
    if format != DataFormat::Auto {
        return None;
    }
    let v: serde_json::Value = serde_json::from_str(first).ok()?;
    (["text", "prompt", "completion"]
        .iter()
        .any(|k| v.get(k).is_some_and(serde_json::Value::is_string))
        || v.get("messages").is_some_and(serde_json::Value::is_array))
    .then(|| {
        format!(
            "{} looks like JSON lines (its first line is an object with \"text\", \
                 \"prompt\" or \"messages\") but would be read as plain text, JSON syntax and \
                 all: name it .jsonl, or set data.format = \"jsonl\" (or \"text\" if it really \
                 is text)",
            path.display()
        )
    })
}

/// `[data]`: training and evaluation data.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSpec {
    /// Training data (plain text or JSON lines).
    pub train_file: PathBuf,
    /// Evaluation data, in the same format; excludes `eval_split`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_file: Option<PathBuf>,
    /// Fraction of the training examples held out for evaluation (0 < x < 1), chosen with
    /// `training.seed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_split: Option<f64>,
    /// Tokens per example; default: the smaller of 1024 and the model's context.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block_size: Option<usize>,
    /// `"auto"` (by extension), `"text"` or `"jsonl"`.
    #[serde(default)]
    pub format: DataFormat,
    /// A Jinja chat template file (Hugging Face's `chat_template` syntax) for conversations
    /// (`{"messages": [...]}`); default: the base model's, or ChatML for a model trained
    /// from scratch. It goes into the trained model's `tokenizer_config.json`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chat_template: Option<PathBuf>,
}

/// `lr_scheduler_type`: how the learning rate moves over training (as in `transformers`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LrSchedulerType {
    /// Warm up linearly, then decay linearly to 0.
    #[default]
    Linear,
    /// Warm up linearly, then follow half a cosine down to 0.
    Cosine,
    /// The same rate throughout.
    Constant,
    /// Warm up linearly, then constant.
    ConstantWithWarmup,
}

/// `eval_strategy`: when to evaluate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EvalStrategy {
    /// Never.
    #[default]
    No,
    /// Every `eval_steps` optimizer steps (and at the end).
    Steps,
    /// At the end of every epoch.
    Epoch,
}

/// Floating-point type of the forward and backward pass. Master weights and optimizer state
/// stay f32.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TrainDType {
    /// 32-bit floats (the only choice on CPU).
    #[default]
    #[serde(alias = "float32")]
    F32,
    /// bfloat16 compute (CUDA).
    #[serde(alias = "bfloat16")]
    Bf16,
    /// float16 compute (CUDA).
    #[serde(alias = "float16")]
    F16,
}

impl TrainDType {
    /// The name written in the job file.
    pub fn as_str(self) -> &'static str {
        match self {
            TrainDType::F32 => "f32",
            TrainDType::Bf16 => "bf16",
            TrainDType::F16 => "f16",
        }
    }
}

/// `resume_from_checkpoint`: `"auto"` (newest valid checkpoint in the checkpoint directory,
/// if any), a checkpoint directory, or `false` (start afresh). The last two apply to the
/// job's first start; later attempts go on from the job's own newest checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum ResumeFrom {
    /// The newest checkpoint that verifies, else a fresh start.
    #[default]
    Auto,
    /// This checkpoint directory (must verify).
    Path(PathBuf),
    /// Never resume; existing checkpoints are left alone but not used.
    Never,
}

impl Serialize for ResumeFrom {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            ResumeFrom::Auto => s.serialize_str("auto"),
            ResumeFrom::Path(p) => p.serialize(s),
            ResumeFrom::Never => s.serialize_bool(false),
        }
    }
}

impl<'de> Deserialize<'de> for ResumeFrom {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Bool(bool),
            Text(String),
        }
        match Raw::deserialize(d).map_err(|_| {
            serde::de::Error::custom("expected \"auto\", a checkpoint directory, or false")
        })? {
            // `true` means "the latest", as in transformers.
            Raw::Bool(true) => Ok(ResumeFrom::Auto),
            Raw::Bool(false) => Ok(ResumeFrom::Never),
            Raw::Text(t) if t.trim().eq_ignore_ascii_case("auto") => Ok(ResumeFrom::Auto),
            Raw::Text(t) if t.trim().is_empty() => Err(serde::de::Error::custom(
                "expected \"auto\", a checkpoint directory, or false",
            )),
            Raw::Text(t) => Ok(ResumeFrom::Path(PathBuf::from(t))),
        }
    }
}

/// `[training]`: the loop's options, named as in `TrainingArguments`, with its defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainingArgs {
    /// Passes over the training data (fractions allowed); ignored when `max_steps` > 0.
    pub num_train_epochs: f64,
    /// Optimizer steps in total; -1 = from `num_train_epochs`.
    pub max_steps: i64,
    /// Examples per micro-batch.
    pub per_device_train_batch_size: usize,
    /// Examples per evaluation batch.
    pub per_device_eval_batch_size: usize,
    /// Micro-batches whose gradients are summed before each optimizer step.
    pub gradient_accumulation_steps: usize,
    /// Peak learning rate of AdamW.
    pub learning_rate: f64,
    /// Shape of the learning-rate schedule.
    pub lr_scheduler_type: LrSchedulerType,
    /// Steps of linear warm-up; overrides `warmup_ratio` when > 0.
    pub warmup_steps: u64,
    /// Fraction of the total steps used for warm-up.
    pub warmup_ratio: f64,
    /// Decoupled weight decay (not applied to biases and norm weights).
    pub weight_decay: f64,
    /// AdamW β1.
    pub adam_beta1: f64,
    /// AdamW β2.
    pub adam_beta2: f64,
    /// AdamW ε.
    pub adam_epsilon: f64,
    /// Clip the global gradient norm to this; 0 = no clipping.
    pub max_grad_norm: f64,
    /// Seeds weight initialisation, dropout, the data order and `eval_split`.
    pub seed: u64,
    /// Write a metrics record every this many steps.
    pub logging_steps: u64,
    /// Also log after the first step.
    pub logging_first_step: bool,
    /// When to evaluate: `"no"`, `"steps"`, `"epoch"`.
    pub eval_strategy: EvalStrategy,
    /// Evaluate every this many steps (`eval_strategy = "steps"`); default `logging_steps`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval_steps: Option<u64>,
    /// Write a checkpoint every this many steps.
    pub save_steps: u64,
    /// Keep at most this many checkpoints (plus the best one with `load_best_model_at_end`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub save_total_limit: Option<u64>,
    /// Output the weights of the best checkpoint by `metric_for_best_model`, not the last.
    pub load_best_model_at_end: bool,
    /// `"loss"` or `"eval_loss"` (the same thing); default `"loss"`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metric_for_best_model: Option<String>,
    /// Whether a higher metric is better; default false for losses.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub greater_is_better: Option<bool>,
    /// Compute type: `"f32"` (CPU and CUDA), `"bf16"`/`"f16"` (CUDA only).
    pub dtype: TrainDType,
    /// Keep only each layer's input in the forward and recompute the layer in the backward:
    /// less activation memory for one more forward. Applies to full fine-tuning and LoRA in
    /// every compute type; the gradients are the same bits either way.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub gradient_checkpointing: bool,
    /// f32 matrix products on CUDA in TF32 (tensor cores, 10-bit mantissa inputs, f32
    /// accumulation), as `TrainingArguments.tf32`; no effect on the CPU or in bf16/f16.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub tf32: bool,
    /// `"auto"`, a checkpoint directory, or false.
    pub resume_from_checkpoint: ResumeFrom,
}

impl Default for TrainingArgs {
    fn default() -> Self {
        TrainingArgs {
            num_train_epochs: 3.0,
            max_steps: -1,
            per_device_train_batch_size: 8,
            per_device_eval_batch_size: 8,
            gradient_accumulation_steps: 1,
            learning_rate: 5e-5,
            lr_scheduler_type: LrSchedulerType::Linear,
            warmup_steps: 0,
            warmup_ratio: 0.0,
            weight_decay: 0.0,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_epsilon: 1e-8,
            max_grad_norm: 1.0,
            seed: 42,
            logging_steps: 500,
            logging_first_step: false,
            eval_strategy: EvalStrategy::No,
            eval_steps: None,
            save_steps: 500,
            save_total_limit: None,
            load_best_model_at_end: false,
            metric_for_best_model: None,
            greater_is_better: None,
            dtype: TrainDType::F32,
            gradient_checkpointing: false,
            tf32: false,
            resume_from_checkpoint: ResumeFrom::Auto,
        }
    }
}

impl TrainingArgs {
    /// Steps between evaluations when `eval_strategy = "steps"`.
    pub fn eval_every(&self) -> u64 {
        self.eval_steps.unwrap_or(self.logging_steps)
    }

    /// Whether a higher best-model metric is better.
    pub fn higher_is_better(&self) -> bool {
        self.greater_is_better.unwrap_or(false)
    }
}

fn default_lora_r() -> usize {
    8
}
fn default_lora_alpha() -> f64 {
    8.0
}
fn default_target_modules() -> Vec<String> {
    vec!["q_proj".into(), "v_proj".into()]
}

/// `[lora]`: train low-rank adapters instead of all weights (PEFT's `LoraConfig` names). The
/// adapters are merged into the base weights for the final model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraSpec {
    /// Rank of the adapters.
    #[serde(default = "default_lora_r")]
    pub r: usize,
    /// Scale numerator: the update is `(lora_alpha / r) · B · A`.
    #[serde(default = "default_lora_alpha")]
    pub lora_alpha: f64,
    /// Dropout on the adapter's input.
    #[serde(default)]
    pub lora_dropout: f64,
    /// Which projections get adapters (`q_proj`, `k_proj`, `v_proj`, `o_proj`, `gate_proj`,
    /// `up_proj`, `down_proj`); default `["q_proj", "v_proj"]`.
    #[serde(default = "default_target_modules")]
    pub target_modules: Vec<String>,
}

impl Default for LoraSpec {
    fn default() -> Self {
        LoraSpec {
            r: default_lora_r(),
            lora_alpha: default_lora_alpha(),
            lora_dropout: 0.0,
            target_modules: default_target_modules(),
        }
    }
}

/// The default `intermediate_size` for a fresh model of width `hidden`.
pub fn default_intermediate_size(hidden: usize) -> usize {
    (8 * hidden).div_ceil(3).next_multiple_of(64)
}

/// Problems in the train sections of a `kind = "train"` job.
pub fn validate(spec: &JobSpec) -> Vec<Issue> {
    let mut issues = Vec::new();
    match &spec.model {
        None => issues.push(Issue::new(
            "model",
            "kind = \"train\" needs a [model] table with base = \"DIR\" or init = \"scratch\"",
        )),
        Some(model) => validate_model(
            model,
            spec.data.as_ref(),
            spec.schedule.is_some(),
            &mut issues,
        ),
    }
    match &spec.data {
        None => issues.push(Issue::new(
            "data",
            "kind = \"train\" needs a [data] table with train_file",
        )),
        Some(data) => validate_data(data, &mut issues),
    }
    let default_args = TrainingArgs::default();
    let args = spec.training.as_ref().unwrap_or(&default_args);
    validate_training(args, spec, &mut issues);
    if let Some(lora) = &spec.lora {
        validate_lora(lora, &mut issues);
        if matches!(&spec.model, Some(m) if m.init == Some(ModelInit::Scratch)) {
            issues.push(Issue::new(
                "lora",
                "LoRA adapts a pretrained model: use [model] base = \"DIR\" (or drop [lora])",
            ));
        }
    }
    issues
}

fn validate_model(
    m: &ModelSpec,
    data: Option<&DataSpec>,
    scheduled: bool,
    issues: &mut Vec<Issue>,
) {
    let sizes: [(&str, bool); 13] = [
        ("hidden_size", m.hidden_size.is_some()),
        ("intermediate_size", m.intermediate_size.is_some()),
        ("num_hidden_layers", m.num_hidden_layers.is_some()),
        ("num_attention_heads", m.num_attention_heads.is_some()),
        ("num_key_value_heads", m.num_key_value_heads.is_some()),
        (
            "max_position_embeddings",
            m.max_position_embeddings.is_some(),
        ),
        ("vocab_size", m.vocab_size.is_some()),
        ("rope_theta", m.rope_theta.is_some()),
        ("rms_norm_eps", m.rms_norm_eps.is_some()),
        ("tie_word_embeddings", m.tie_word_embeddings.is_some()),
        ("attention_bias", m.attention_bias.is_some()),
        ("qk_norm", m.qk_norm.is_some()),
        ("initializer_range", m.initializer_range.is_some()),
    ];
    match (&m.base, m.init) {
        (Some(_), Some(_)) => issues.push(Issue::new(
            "model.init",
            "give either base = \"DIR\" or init = \"scratch\", not both",
        )),
        (None, None) => issues.push(Issue::new(
            "model",
            "needs base = \"DIR\" (a Hugging Face checkpoint) or init = \"scratch\"",
        )),
        (Some(base), None) => {
            if base.as_os_str().is_empty() {
                issues.push(Issue::new("model.base", "must name a directory"));
            }
            if is_previous(base) {
                if m.first_base.is_none() {
                    issues.push(Issue::new(
                        "model.first_base",
                        "base = \"@previous\" needs first_base = \"DIR\": the base of the first run",
                    ));
                }
                if !scheduled {
                    issues.push(Issue::new(
                        "model.base",
                        "\"@previous\" (the last successful run's model) needs a recurring job: add schedule = \"...\"",
                    ));
                }
            } else if m.first_base.is_some() {
                issues.push(Issue::new(
                    "model.first_base",
                    "only applies with base = \"@previous\"",
                ));
            }
            for (key, present) in sizes {
                if present {
                    issues.push(Issue::new(
                        format!("model.{key}"),
                        "only applies to init = \"scratch\" (a base model brings its config.json)",
                    ));
                }
            }
        }
        (None, Some(ModelInit::Scratch)) => {
            for (key, value) in [
                ("hidden_size", m.hidden_size),
                ("num_hidden_layers", m.num_hidden_layers),
                ("num_attention_heads", m.num_attention_heads),
                ("vocab_size", m.vocab_size),
            ] {
                match value {
                    None => issues.push(Issue::new(
                        format!("model.{key}"),
                        "is required with init = \"scratch\"",
                    )),
                    Some(0) => issues.push(Issue::new(format!("model.{key}"), "must be > 0")),
                    Some(_) => {}
                }
            }
            if let (Some(h), Some(n)) = (m.hidden_size, m.num_attention_heads) {
                if n > 0 && h % n != 0 {
                    issues.push(Issue::new(
                        "model.num_attention_heads",
                        format!("must divide hidden_size ({h})"),
                    ));
                } else if n > 0 && (h / n) % 2 != 0 {
                    issues.push(Issue::new(
                        "model.num_attention_heads",
                        format!(
                            "hidden_size / num_attention_heads = {} must be even (rotary embeddings)",
                            h / n
                        ),
                    ));
                }
            }
            if let Some(kv) = m.num_key_value_heads {
                match m.num_attention_heads {
                    _ if kv == 0 => {
                        issues.push(Issue::new("model.num_key_value_heads", "must be > 0"))
                    }
                    Some(n) if n % kv != 0 => issues.push(Issue::new(
                        "model.num_key_value_heads",
                        format!("must divide num_attention_heads ({n})"),
                    )),
                    _ => {}
                }
            }
            if m.intermediate_size == Some(0) {
                issues.push(Issue::new("model.intermediate_size", "must be > 0"));
            }
            if m.qk_norm == Some(true) && m.attention_bias == Some(true) {
                issues.push(Issue::new(
                    "model.attention_bias",
                    "cannot be combined with qk_norm = true (Qwen3's layout has no q/k/v \
                     biases, and llama.cpp, which Ollama runs, would not load the model)",
                ));
            }
            if let Some(v) = m.vocab_size
                && v > 0
                && !(260..=1 << 20).contains(&v)
            {
                issues.push(Issue::new(
                    "model.vocab_size",
                    "must be between 260 and 1048576 (a byte-level BPE has 256 byte tokens \
                         and special tokens before any merge)",
                ));
            }
            match (m.max_position_embeddings, data.and_then(|d| d.block_size)) {
                (Some(0), _) => {
                    issues.push(Issue::new("model.max_position_embeddings", "must be > 0"))
                }
                (None, None) => issues.push(Issue::new(
                    "model.max_position_embeddings",
                    "is required with init = \"scratch\" unless data.block_size is set",
                )),
                // Both are in the file: a block longer than the model's positions would fail
                // only in the worker.
                (Some(ctx), Some(block)) if block > ctx => issues.push(Issue::new(
                    "data.block_size",
                    format!(
                        "is {block}, longer than the model's model.max_position_embeddings \
                         ({ctx})"
                    ),
                )),
                _ => {}
            }
            if let Some(t) = m.rope_theta
                && !(t.is_finite() && t > 0.0)
            {
                issues.push(Issue::new("model.rope_theta", "must be > 0"));
            }
            if let Some(e) = m.rms_norm_eps
                && !(e.is_finite() && e > 0.0 && e < 1.0)
            {
                issues.push(Issue::new("model.rms_norm_eps", "must be > 0 and < 1"));
            }
            if let Some(r) = m.initializer_range
                && !(r.is_finite() && r > 0.0 && r < 10.0)
            {
                issues.push(Issue::new(
                    "model.initializer_range",
                    "must be > 0 and < 10",
                ));
            }
        }
    }
}

fn validate_data(d: &DataSpec, issues: &mut Vec<Issue>) {
    if d.train_file.as_os_str().is_empty() {
        issues.push(Issue::new("data.train_file", "must name a file"));
    }
    if let Some(f) = &d.eval_file {
        if f.as_os_str().is_empty() {
            issues.push(Issue::new("data.eval_file", "must name a file"));
        }
        if d.eval_split.is_some() {
            issues.push(Issue::new(
                "data.eval_split",
                "give either eval_file or eval_split, not both",
            ));
        }
    }
    if let Some(s) = d.eval_split
        && !(s > 0.0 && s < 1.0)
    {
        issues.push(Issue::new(
            "data.eval_split",
            "must be a fraction between 0 and 1 (exclusive)",
        ));
    }
    if let Some(b) = d.block_size
        && !(2..=1 << 20).contains(&b)
    {
        issues.push(Issue::new(
            "data.block_size",
            "must be between 2 and 1048576 tokens",
        ));
    }
}

fn validate_training(a: &TrainingArgs, spec: &JobSpec, issues: &mut Vec<Issue>) {
    let k = |name: &str| format!("training.{name}");
    let positive_f = |v: f64| v.is_finite() && v > 0.0;
    if a.max_steps == 0 || a.max_steps < -1 {
        issues.push(Issue::new(
            k("max_steps"),
            "must be > 0 (or -1 to train for num_train_epochs)",
        ));
    }
    if a.max_steps == -1 && !positive_f(a.num_train_epochs) {
        issues.push(Issue::new(k("num_train_epochs"), "must be > 0"));
    }
    for (name, v) in [
        ("per_device_train_batch_size", a.per_device_train_batch_size),
        ("per_device_eval_batch_size", a.per_device_eval_batch_size),
        ("gradient_accumulation_steps", a.gradient_accumulation_steps),
    ] {
        if v == 0 || v > 1 << 16 {
            issues.push(Issue::new(k(name), "must be between 1 and 65536"));
        }
    }
    if !positive_f(a.learning_rate) {
        issues.push(Issue::new(k("learning_rate"), "must be > 0"));
    }
    if !(a.warmup_ratio.is_finite() && (0.0..=1.0).contains(&a.warmup_ratio)) {
        issues.push(Issue::new(k("warmup_ratio"), "must be between 0 and 1"));
    }
    if a.warmup_steps > 0 && a.warmup_ratio > 0.0 {
        issues.push(Issue::new(
            k("warmup_steps"),
            "give either warmup_steps or warmup_ratio, not both",
        ));
    }
    if a.max_steps > 0 && a.warmup_steps > a.max_steps as u64 {
        issues.push(Issue::new(
            k("warmup_steps"),
            format!("must be at most max_steps ({})", a.max_steps),
        ));
    }
    if !(a.weight_decay.is_finite() && a.weight_decay >= 0.0) {
        issues.push(Issue::new(k("weight_decay"), "must be >= 0"));
    } else if a.learning_rate.is_finite() && a.learning_rate * a.weight_decay >= 1.0 {
        // AdamW's decoupled decay multiplies every weight by 1 − lr·wd at each step.
        issues.push(Issue::new(
            k("weight_decay"),
            format!(
                "{} × learning_rate {} is at least 1: each step would multiply every weight by \
                 1 − learning_rate × weight_decay ≤ 0 (typical: 0.0 to 0.1)",
                a.weight_decay, a.learning_rate
            ),
        ));
    }
    for (name, v) in [("adam_beta1", a.adam_beta1), ("adam_beta2", a.adam_beta2)] {
        if !(v.is_finite() && (0.0..1.0).contains(&v)) {
            issues.push(Issue::new(k(name), "must be >= 0 and < 1"));
        }
    }
    if !positive_f(a.adam_epsilon) {
        issues.push(Issue::new(k("adam_epsilon"), "must be > 0"));
    }
    if !(a.max_grad_norm.is_finite() && a.max_grad_norm >= 0.0) {
        issues.push(Issue::new(
            k("max_grad_norm"),
            "must be >= 0 (0 turns clipping off)",
        ));
    }
    if a.logging_steps == 0 {
        issues.push(Issue::new(k("logging_steps"), "must be > 0"));
    }
    if a.eval_steps == Some(0) {
        issues.push(Issue::new(k("eval_steps"), "must be > 0"));
    }
    if a.eval_steps.is_some() && a.eval_strategy != EvalStrategy::Steps {
        issues.push(Issue::new(
            k("eval_steps"),
            "only applies with eval_strategy = \"steps\"",
        ));
    }
    if a.save_steps == 0 {
        issues.push(Issue::new(k("save_steps"), "must be > 0"));
    }
    if a.save_total_limit == Some(0) {
        issues.push(Issue::new(
            k("save_total_limit"),
            "must be > 0 (leave it out to keep every checkpoint)",
        ));
    }
    if let Some(m) = &a.metric_for_best_model
        && !matches!(m.as_str(), "loss" | "eval_loss")
    {
        issues.push(Issue::new(
            k("metric_for_best_model"),
            format!("unknown metric {m:?}: the worker measures \"loss\" (= \"eval_loss\")"),
        ));
    }
    if a.load_best_model_at_end {
        if a.eval_strategy == EvalStrategy::No {
            issues.push(Issue::new(
                k("load_best_model_at_end"),
                "needs evaluation: set eval_strategy = \"steps\" or \"epoch\"",
            ));
        }
        if a.eval_strategy == EvalStrategy::Steps
            && !a.save_steps.is_multiple_of(a.eval_every().max(1))
        {
            issues.push(Issue::new(
                k("save_steps"),
                format!(
                    "must be a multiple of eval_steps ({}) with load_best_model_at_end, so that \
                     every checkpoint has a metric",
                    a.eval_every()
                ),
            ));
        }
    }
    let has_eval = spec
        .data
        .as_ref()
        .is_some_and(|d| d.eval_file.is_some() || d.eval_split.is_some());
    if a.eval_strategy != EvalStrategy::No && !has_eval {
        issues.push(Issue::new(
            k("eval_strategy"),
            "evaluation needs data.eval_file or data.eval_split",
        ));
    }
    let gpus = spec.resources.gpus;
    if gpus > 1 {
        issues.push(Issue::new(
            "resources.gpus",
            format!(
                "a train job trains on one GPU (jobd has no multi-GPU training); gpus = {gpus} \
                 would hold {} idle: use gpus = 1",
                if gpus == 2 {
                    "1 GPU".to_string()
                } else {
                    format!("{} GPUs", gpus - 1)
                }
            ),
        ));
    }
    if a.dtype != TrainDType::F32 && spec.resources.gpus == 0 {
        issues.push(Issue::new(
            k("dtype"),
            format!(
                "{} needs a GPU (resources.gpus >= 1); on CPU use \"f32\"",
                a.dtype.as_str()
            ),
        ));
    }
    if let ResumeFrom::Path(p) = &a.resume_from_checkpoint
        && p.as_os_str().is_empty()
    {
        issues.push(Issue::new(
            k("resume_from_checkpoint"),
            "must be \"auto\", a checkpoint directory, or false",
        ));
    }
}

fn validate_lora(l: &LoraSpec, issues: &mut Vec<Issue>) {
    if l.r == 0 || l.r > 4096 {
        issues.push(Issue::new("lora.r", "must be between 1 and 4096"));
    }
    if !(l.lora_alpha.is_finite() && l.lora_alpha > 0.0) {
        issues.push(Issue::new("lora.lora_alpha", "must be > 0"));
    }
    if !(l.lora_dropout.is_finite() && (0.0..1.0).contains(&l.lora_dropout)) {
        issues.push(Issue::new("lora.lora_dropout", "must be >= 0 and < 1"));
    }
    if l.target_modules.is_empty() {
        issues.push(Issue::new(
            "lora.target_modules",
            format!("must name at least one of {}", LORA_MODULES.join(", ")),
        ));
    }
    let mut seen = std::collections::BTreeSet::new();
    for (i, m) in l.target_modules.iter().enumerate() {
        if !LORA_MODULES.contains(&m.as_str()) {
            issues.push(Issue::new(
                format!("lora.target_modules[{i}]"),
                format!(
                    "unknown module {m:?}; expected one of {}",
                    LORA_MODULES.join(", ")
                ),
            ));
        } else if !seen.insert(m) {
            issues.push(Issue::new(
                format!("lora.target_modules[{i}]"),
                format!("{m} is listed twice"),
            ));
        }
    }
}

/// `base = "@previous"`: in a schedule, each run starts from the last successful run's model.
pub const PREVIOUS: &str = "@previous";

/// Is this `base` the `@previous` placeholder?
pub fn is_previous(base: &Path) -> bool {
    base.as_os_str() == PREVIOUS
}

/// Makes the train sections' relative paths absolute.
pub fn resolve_paths(spec: &mut JobSpec, base_dir: &Path) {
    let abs = |p: &mut PathBuf| {
        if p.as_os_str().is_empty() {
            return;
        }
        if p.is_relative() {
            *p = base_dir.join(&*p);
        }
        *p = super::job::tidy_path(p);
    };
    if let Some(m) = &mut spec.model {
        if let Some(b) = &mut m.base
            && !is_previous(b)
        {
            abs(b);
        }
        if let Some(b) = &mut m.first_base {
            abs(b);
        }
    }
    if let Some(d) = &mut spec.data {
        abs(&mut d.train_file);
        if let Some(e) = &mut d.eval_file {
            abs(e);
        }
        if let Some(t) = &mut d.chat_template {
            abs(t);
        }
    }
    if let Some(t) = &mut spec.training
        && let ResumeFrom::Path(p) = &mut t.resume_from_checkpoint
    {
        abs(p);
    }
}

/// Checks that the files the train sections name exist (and data files are not empty).
pub fn check_paths(spec: &JobSpec) -> Vec<Issue> {
    let mut issues = Vec::new();
    let model = spec.model.as_ref();
    for (key, dir) in [
        (
            "model.base",
            model
                .and_then(|m| m.base.as_ref())
                .filter(|b| !is_previous(b)),
        ),
        (
            "model.first_base",
            model.and_then(|m| m.first_base.as_ref()),
        ),
    ] {
        let Some(base) = dir else { continue };
        if !base.is_dir() {
            issues.push(Issue::new(
                key,
                format!("{} is not a directory", base.display()),
            ));
        } else {
            for f in ["config.json", "tokenizer.json"] {
                if !base.join(f).is_file() {
                    issues.push(Issue::new(key, format!("{} has no {f}", base.display())));
                }
            }
            if !base.join("model.safetensors").is_file()
                && !base.join("model.safetensors.index.json").is_file()
            {
                issues.push(Issue::new(
                    key,
                    format!(
                        "{} has neither model.safetensors nor model.safetensors.index.json",
                        base.display()
                    ),
                ));
            }
        }
    }
    if let Some(d) = &spec.data {
        let mut check = |key: &str, p: &Path| match std::fs::metadata(p) {
            Err(e) => issues.push(Issue::new(key, format!("{}: {e}", p.display()))),
            Ok(m) if !m.is_file() => {
                issues.push(Issue::new(key, format!("{} is not a file", p.display())))
            }
            Ok(m) if m.len() == 0 => {
                issues.push(Issue::new(key, format!("{} is empty", p.display())))
            }
            Ok(_) => {
                if let Some(why) = data_format_issue(p, d.format) {
                    issues.push(Issue::new(key, why));
                }
            }
        };
        check("data.train_file", &d.train_file);
        if let Some(e) = &d.eval_file {
            check("data.eval_file", e);
        }
        if let Some(t) = &d.chat_template {
            if t.as_os_str().is_empty() {
                issues.push(Issue::new(
                    "data.chat_template",
                    "is empty: name a Jinja template file, or leave the key out for the \
                     model's own template",
                ));
            } else if !t.is_file() {
                issues.push(Issue::new(
                    "data.chat_template",
                    format!("{} is not a file", t.display()),
                ));
            }
        }
    }
    if let Some(ResumeFrom::Path(p)) = spec.training.as_ref().map(|t| &t.resume_from_checkpoint)
        && !p.is_dir()
    {
        issues.push(Issue::new(
            "training.resume_from_checkpoint",
            format!("{} is not a directory", p.display()),
        ));
    }
    issues
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::job::{parse, parse_and_resolve};

    const SCRATCH: &str = "kind = \"train\"\n[model]\ninit = \"scratch\"\nhidden_size = 64\n\
        num_hidden_layers = 2\nnum_attention_heads = 4\nvocab_size = 320\n\
        [data]\ntrain_file = \"train.jsonl\"\nblock_size = 16\n";

    fn err(text: &str) -> String {
        parse("job.toml", text).unwrap_err().to_string()
    }

    /// Asserts that `section` text appended to a valid scratch job fails naming `key`.
    fn bad(extra: &str, key: &str, words: &str) {
        let e = err(&format!("{SCRATCH}{extra}"));
        assert!(e.contains(&format!("{key}: ")), "expected {key} in: {e}");
        assert!(e.contains(words), "expected {words:?} in: {e}");
    }

    #[test]
    fn a_full_job_parses_with_defaults() {
        let spec = parse(
            "job.toml",
            &format!("{SCRATCH}[training]\nmax_steps = 10\n"),
        )
        .unwrap();
        let t = spec.training.unwrap();
        assert_eq!(t.learning_rate, 5e-5);
        assert_eq!(t.per_device_train_batch_size, 8);
        assert_eq!(t.lr_scheduler_type, LrSchedulerType::Linear);
        assert_eq!(t.resume_from_checkpoint, ResumeFrom::Auto);
        assert_eq!(t.save_steps, 500);
        let spec = parse("job.toml", SCRATCH).unwrap();
        assert!(spec.training.is_none());
        let text = "kind = \"train\"\n[model]\nbase = \"m\"\n[data]\ntrain_file = \"t.txt\"\n\
            [training]\nresume_from_checkpoint = false\ndtype = \"bf16\"\n\
            [resources]\ngpus = 1\n[lora]\nr = 16\n";
        let spec = parse("job.toml", text).unwrap();
        assert_eq!(
            spec.training.as_ref().unwrap().resume_from_checkpoint,
            ResumeFrom::Never
        );
        assert_eq!(spec.lora.unwrap().target_modules, vec!["q_proj", "v_proj"]);
    }

    #[test]
    fn model_section_errors_name_the_option() {
        let e = err("kind = \"train\"\n[data]\ntrain_file = \"x\"\n");
        assert!(e.contains("model: kind = \"train\" needs a [model]"), "{e}");
        let e = err("kind = \"train\"\n[model]\n[data]\ntrain_file = \"x\"\n");
        assert!(e.contains("model: needs base"), "{e}");
        let e = err(
            "kind = \"train\"\n[model]\nbase = \"m\"\ninit = \"scratch\"\n[data]\ntrain_file = \"x\"\n",
        );
        assert!(e.contains("model.init: give either"), "{e}");
        let e = err(
            "kind = \"train\"\n[model]\nbase = \"m\"\nhidden_size = 8\n[data]\ntrain_file = \"x\"\n",
        );
        assert!(
            e.contains("job.toml:4:15: model.hidden_size: only applies"),
            "{e}"
        );
        let e = err("kind = \"train\"\n[model]\ninit = \"fresh\"\n[data]\ntrain_file = \"x\"\n");
        assert!(
            e.contains("model.init") && e.contains("unknown variant"),
            "{e}"
        );
        let e = err("kind = \"train\"\n[model]\ninit = \"scratch\"\n[data]\ntrain_file = \"x\"\n");
        for k in [
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "vocab_size",
        ] {
            assert!(e.contains(&format!("model.{k}: is required")), "{k}: {e}");
        }
        assert!(
            e.contains("model.max_position_embeddings: is required"),
            "{e}"
        );
        let s = |from: &str, to: &str| SCRATCH.replace(from, to);
        let e = err(&s("num_attention_heads = 4", "num_attention_heads = 5"));
        assert!(
            e.contains("model.num_attention_heads: must divide hidden_size"),
            "{e}"
        );
        let e = err(&s("num_attention_heads = 4", "num_attention_heads = 64"));
        assert!(e.contains("must be even"), "{e}");
        let e = err(&s("vocab_size = 320", "vocab_size = 100"));
        assert!(e.contains("model.vocab_size: must be between 260"), "{e}");
        let e = err(&s(
            "vocab_size = 320",
            "vocab_size = 320\nnum_key_value_heads = 3",
        ));
        assert!(e.contains("model.num_key_value_heads: must divide"), "{e}");
        for (k, v) in [
            ("rope_theta", "-1.0"),
            ("rms_norm_eps", "0.0"),
            ("initializer_range", "0.0"),
            ("intermediate_size", "0"),
            ("max_position_embeddings", "0"),
        ] {
            let e = err(&s(
                "vocab_size = 320",
                &format!("vocab_size = 320\n{k} = {v}"),
            ));
            assert!(e.contains(&format!("model.{k}: must be")), "{k}: {e}");
        }
        let e = err(&s("vocab_size = 320", "vocab_size = 320\nhidden_sise = 3"));
        assert!(e.contains("unknown field `hidden_sise`"), "{e}");
        let e = err(&s(
            "vocab_size = 320",
            "vocab_size = 320\nqk_norm = true\nattention_bias = true",
        ));
        assert!(
            e.contains("model.attention_bias: cannot be combined with qk_norm"),
            "{e}"
        );
        let e = err(
            "kind = \"train\"\n[model]\nbase = \"m\"\nqk_norm = true\n[data]\ntrain_file = \"x\"\n",
        );
        assert!(e.contains("model.qk_norm: only applies"), "{e}");
    }

    #[test]
    fn data_section_errors_name_the_option() {
        let e = err("kind = \"train\"\n[model]\nbase = \"m\"\n");
        assert!(e.contains("data: kind = \"train\" needs a [data]"), "{e}");
        let e = err(&SCRATCH.replace(
            "init = \"scratch\"\n",
            "init = \"scratch\"\nmax_position_embeddings = 8\n",
        ));
        assert!(
            e.contains(
                "data.block_size: is 16, longer than the model's model.max_position_embeddings (8)"
            ),
            "{e}"
        );
        let e = err(&SCRATCH.replace("block_size = 16", "block_size = 1"));
        assert!(e.contains("data.block_size: must be between 2"), "{e}");
        let e = err(&SCRATCH.replace("block_size = 16", "block_size = 16\neval_split = 1.5"));
        assert!(e.contains("data.eval_split: must be a fraction"), "{e}");
        let e = err(&SCRATCH.replace(
            "block_size = 16",
            "block_size = 16\neval_split = 0.1\neval_file = \"e.jsonl\"",
        ));
        assert!(e.contains("data.eval_split: give either"), "{e}");
        let e = err(&SCRATCH.replace("block_size = 16", "block_size = 16\nformat = \"csv\""));
        assert!(
            e.contains("data.format") && e.contains("unknown variant"),
            "{e}"
        );
    }

    #[test]
    fn training_option_errors_name_the_option() {
        let t = |s: &str| format!("[training]\n{s}\n");
        bad(&t("max_steps = 0"), "training.max_steps", "must be > 0");
        bad(
            &t("num_train_epochs = 0.0"),
            "training.num_train_epochs",
            "must be > 0",
        );
        bad(
            &t("per_device_train_batch_size = 0"),
            "training.per_device_train_batch_size",
            "between 1",
        );
        bad(
            &t("per_device_eval_batch_size = 0"),
            "training.per_device_eval_batch_size",
            "between 1",
        );
        bad(
            &t("gradient_accumulation_steps = 0"),
            "training.gradient_accumulation_steps",
            "between 1",
        );
        bad(
            &t("learning_rate = 0.0"),
            "training.learning_rate",
            "must be > 0",
        );
        bad(
            &t("learning_rate = -1e-3"),
            "training.learning_rate",
            "must be > 0",
        );
        bad(
            &t("lr_scheduler_type = \"polynomial\""),
            "training.lr_scheduler_type",
            "unknown variant",
        );
        bad(
            &t("warmup_ratio = 2.0"),
            "training.warmup_ratio",
            "between 0 and 1",
        );
        bad(
            &t("warmup_ratio = 0.1\nwarmup_steps = 5"),
            "training.warmup_steps",
            "not both",
        );
        bad(
            &t("max_steps = 3\nwarmup_steps = 5"),
            "training.warmup_steps",
            "at most max_steps",
        );
        bad(&t("weight_decay = -0.1"), "training.weight_decay", ">= 0");
        bad(
            &t("weight_decay = 1e300"),
            "training.weight_decay",
            "each step would multiply every weight",
        );
        bad(&t("adam_beta1 = 1.0"), "training.adam_beta1", "< 1");
        bad(&t("adam_beta2 = -0.5"), "training.adam_beta2", ">= 0");
        bad(&t("adam_epsilon = 0.0"), "training.adam_epsilon", "> 0");
        bad(&t("max_grad_norm = -1.0"), "training.max_grad_norm", ">= 0");
        bad(&t("seed = -1"), "training.seed", "invalid value");
        bad(&t("logging_steps = 0"), "training.logging_steps", "> 0");
        bad(
            &t("logging_first_step = 1"),
            "training.logging_first_step",
            "invalid type",
        );
        bad(
            &t("eval_strategy = \"sometimes\""),
            "training.eval_strategy",
            "unknown variant",
        );
        bad(
            &t("eval_strategy = \"steps\""),
            "training.eval_strategy",
            "needs data.eval_file",
        );
        bad(&t("eval_steps = 10"), "training.eval_steps", "only applies");
        bad(
            &t("eval_strategy = \"steps\"\neval_steps = 0"),
            "training.eval_steps",
            "> 0",
        );
        bad(&t("save_steps = 0"), "training.save_steps", "> 0");
        bad(
            &t("save_total_limit = 0"),
            "training.save_total_limit",
            "> 0",
        );
        bad(
            &t("load_best_model_at_end = true"),
            "training.load_best_model_at_end",
            "needs evaluation",
        );
        bad(
            &t("metric_for_best_model = \"accuracy\""),
            "training.metric_for_best_model",
            "unknown metric",
        );
        bad(
            &t("greater_is_better = \"yes\""),
            "training.greater_is_better",
            "invalid type",
        );
        bad(&t("dtype = \"bf16\""), "training.dtype", "needs a GPU");
        bad(
            "[resources]\ngpus = 2\n",
            "resources.gpus",
            "trains on one GPU",
        );
        bad(&t("dtype = \"f64\""), "training.dtype", "unknown variant");
        bad(&t("tf32 = \"yes\""), "training.tf32", "invalid type");
        bad(
            &t("resume_from_checkpoint = \"\""),
            "training.resume_from_checkpoint",
            "expected",
        );
        bad(
            &t("resume_from_checkpoint = 3"),
            "training.resume_from_checkpoint",
            "expected",
        );
        bad(
            &t("learning_rat = 1.0"),
            "training.learning_rat",
            "unknown field `learning_rat`",
        );
        let e = err(&format!(
            "{}\neval_split = 0.1\n[training]\neval_strategy = \"steps\"\neval_steps = 10\n\
             save_steps = 15\nload_best_model_at_end = true\n",
            SCRATCH.trim_end()
        ));
        assert!(
            e.contains("training.save_steps: must be a multiple of eval_steps (10)"),
            "{e}"
        );
    }

    #[test]
    fn lora_errors_name_the_option() {
        let base = "kind = \"train\"\n[model]\nbase = \"m\"\n[data]\ntrain_file = \"t\"\n[lora]\n";
        let e = err(&format!(
            "{base}r = 0\nlora_alpha = 0.0\nlora_dropout = 1.0\n"
        ));
        assert!(e.contains("lora.r: must be between 1"), "{e}");
        assert!(e.contains("lora.lora_alpha: must be > 0"), "{e}");
        assert!(e.contains("lora.lora_dropout: must be >= 0 and < 1"), "{e}");
        let e = err(&format!("{base}target_modules = []\n"));
        assert!(
            e.contains("lora.target_modules: must name at least one"),
            "{e}"
        );
        let e = err(&format!(
            "{base}target_modules = [\"q_proj\", \"qkv\", \"q_proj\"]\n"
        ));
        assert!(
            e.contains("lora.target_modules[1]: unknown module \"qkv\""),
            "{e}"
        );
        assert!(
            e.contains("lora.target_modules[2]: q_proj is listed twice"),
            "{e}"
        );
        let e = err(&format!("{SCRATCH}[lora]\n"));
        assert!(e.contains("lora: LoRA adapts a pretrained model"), "{e}");
    }

    /// QA: `train.json` in JSON lines (as Hugging Face users name them) trained as plain text,
    /// JSON syntax and all, with no word said.
    #[test]
    fn data_read_the_wrong_way_is_refused_and_json_means_json_lines() {
        let dir = tempfile::tempdir().unwrap();
        let job = |file: &str, extra: &str| {
            SCRATCH.replace(
                "train_file = \"train.jsonl\"",
                &format!("train_file = \"{file}\"\n{extra}"),
            )
        };
        let lines = "\u{feff}{\"text\": \"a b c\"}\n{\"text\": \"d e f\"}\n";
        for name in ["train.json", "train.txt", "train"] {
            std::fs::write(dir.path().join(name), lines).unwrap();
        }
        let spec = parse_and_resolve("job.toml", &job("train.json", ""), dir.path()).unwrap();
        let d = spec.data.unwrap();
        assert!(d.format.reads_jsonl(&d.train_file));
        for name in ["train.txt", "train"] {
            let e = parse_and_resolve("job.toml", &job(name, ""), dir.path())
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("data.train_file: ") && e.contains("looks like JSON lines"),
                "{e}"
            );
            parse_and_resolve("job.toml", &job(name, "format = \"jsonl\""), dir.path()).unwrap();
            parse_and_resolve("job.toml", &job(name, "format = \"text\""), dir.path()).unwrap();
        }
        std::fs::write(dir.path().join("train.json"), "[{\"text\": \"a\"}]\n").unwrap();
        let e = parse_and_resolve("job.toml", &job("train.json", ""), dir.path())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("holds a JSON array") && e.contains("jq -c"),
            "{e}"
        );
        // Plain text stays plain text.
        std::fs::write(dir.path().join("train.txt"), "{not json at all\nhello\n").unwrap();
        parse_and_resolve("job.toml", &job("train.txt", ""), dir.path()).unwrap();
        // A path swapped for a FIFO after its check is not opened for ever.
        let fifo = dir.path().join("fifo.jsonl");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o644)).unwrap();
        assert_eq!(data_format_issue(&fifo, DataFormat::Auto), None);
        // Conversations too are JSON lines.
        std::fs::write(
            dir.path().join("chat.txt"),
            "{\"messages\": [{\"role\": \"user\", \"content\": \"a\"}]}\n",
        )
        .unwrap();
        let e = parse_and_resolve("job.toml", &job("chat.txt", ""), dir.path())
            .unwrap_err()
            .to_string();
        assert!(e.contains("\"messages\""), "{e}");
        // A chat template file must exist, and resolves against the job file's directory.
        let e = parse_and_resolve(
            "job.toml",
            &job("train.json", "chat_template = \"nope.jinja\""),
            dir.path(),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("data.chat_template: ") && e.contains("nope.jinja"),
            "{e}"
        );
    }

    #[test]
    fn missing_and_empty_files_fail_before_training() {
        let dir = tempfile::tempdir().unwrap();
        let e = parse_and_resolve("job.toml", SCRATCH, dir.path())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("data.train_file: ") && e.contains("train.jsonl: No such file"),
            "{e}"
        );
        std::fs::write(dir.path().join("train.jsonl"), "").unwrap();
        let e = parse_and_resolve("job.toml", SCRATCH, dir.path())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("data.train_file: ") && e.contains("is empty"),
            "{e}"
        );
        std::fs::write(dir.path().join("train.jsonl"), "{\"text\": \"x\"}\n").unwrap();
        let spec = parse_and_resolve("job.toml", SCRATCH, dir.path()).unwrap();
        assert_eq!(
            spec.data.unwrap().train_file,
            dir.path().join("train.jsonl")
        );
        let with_eval = SCRATCH.replace(
            "block_size = 16",
            "block_size = 16\neval_file = \"ev.jsonl\"",
        );
        let e = parse_and_resolve("job.toml", &with_eval, dir.path())
            .unwrap_err()
            .to_string();
        assert!(e.contains("data.eval_file: "), "{e}");
        let text = "kind = \"train\"\n[model]\nbase = \"model\"\n[data]\ntrain_file = \"train.jsonl\"\n\
            [training]\nresume_from_checkpoint = \"ck/checkpoint-5\"\n";
        let e = parse_and_resolve("job.toml", text, dir.path())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("job.toml:3:8: model.base: ") && e.contains("is not a directory"),
            "{e}"
        );
        assert!(
            e.contains("training.resume_from_checkpoint: ") && e.contains("ck/checkpoint-5"),
            "{e}"
        );
        std::fs::create_dir(dir.path().join("model")).unwrap();
        let e = parse_and_resolve("job.toml", text, dir.path())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("has no config.json") && e.contains("has no tokenizer.json"),
            "{e}"
        );
        assert!(e.contains("neither model.safetensors nor"), "{e}");
    }
}
