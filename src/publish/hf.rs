//! Reading a finished model in Hugging Face layout (`config.json` + `model.safetensors`) and
//! planning its GGUF tensors: names, shapes, types and the q/k RoPE permutation.
//!
//! The safetensors files are read tensor by tensor with positioned reads when each tensor is
//! written, so exporting never holds more than one tensor's worth of data. They are not
//! memory-mapped: they belong to the job's owner, who could truncate one while the daemon
//! reads it, and a mapped read past the new end is a SIGBUS that would end the daemon, where a
//! positioned read is an error for this publish alone. Llama, Mistral
//! (without an effective sliding window) and Qwen2 (q/k/v biases) map to llama.cpp's `llama`
//! architecture, including an explicit `head_dim` and linear or Llama-3.1 RoPE scaling;
//! Qwen3 (per-head query/key norms) to its `qwen3`.
//! Anything this module cannot map exactly (an unknown tensor, YaRN scaling, a sliding
//! window, a non-SiLU MLP) is refused: a GGUF that loads but computes something else is worse
//! than an error.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use candle_core::quantized::GgmlDType;
use candle_core::safetensors::Load;
use candle_core::{DType, Device, Tensor};
use serde::Deserialize;

use super::PublishError;
use crate::spec::publish::Quantization;

/// `config.json` fields that matter for a llama GGUF. Unknown fields are allowed: Hugging Face
/// configs carry many that do not affect inference.
#[derive(Debug, Clone, Deserialize)]
struct RawConfig {
    hidden_size: u64,
    intermediate_size: u64,
    num_hidden_layers: u64,
    num_attention_heads: u64,
    #[serde(default)]
    num_key_value_heads: Option<u64>,
    vocab_size: u64,
    #[serde(default = "default_context")]
    max_position_embeddings: u64,
    #[serde(default = "default_eps")]
    rms_norm_eps: f64,
    #[serde(default)]
    rope_theta: Option<f64>,
    #[serde(default)]
    tie_word_embeddings: Option<bool>,
    #[serde(default)]
    bos_token_id: Option<TokenIds>,
    #[serde(default)]
    eos_token_id: Option<TokenIds>,
    #[serde(default)]
    pad_token_id: Option<TokenIds>,
    #[serde(default)]
    attention_bias: Option<bool>,
    #[serde(default)]
    mlp_bias: Option<bool>,
    #[serde(default)]
    rope_scaling: Option<serde_json::Value>,
    #[serde(default)]
    rope_parameters: Option<serde_json::Value>,
    #[serde(default)]
    head_dim: Option<u64>,
    #[serde(default)]
    hidden_act: Option<String>,
    #[serde(default)]
    model_type: Option<String>,
    #[serde(default)]
    use_sliding_window: Option<bool>,
    #[serde(default)]
    sliding_window: Option<u64>,
    #[serde(default)]
    max_window_layers: Option<u64>,
    #[serde(default)]
    layer_types: Option<serde_json::Value>,
}

// Hugging Face's LlamaConfig defaults, which the trainer uses too.
fn default_context() -> u64 {
    2048
}
fn default_eps() -> f64 {
    1e-6
}

/// Token ids in `config.json`: one id or, for some models (Llama 3), a list.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum TokenIds {
    One(u32),
    Many(Vec<u32>),
}

impl TokenIds {
    fn first(&self) -> Option<u32> {
        match self {
            TokenIds::One(id) => Some(*id),
            TokenIds::Many(ids) => ids.first().copied(),
        }
    }
}

/// The llama.cpp architecture a model is written as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    /// `llama`: Llama, Mistral and Qwen2 (ggml's pairwise RoPE, so q and k rows are
    /// permuted).
    Llama,
    /// `qwen3`: per-head query/key norms (`attn_q_norm`, `attn_k_norm`) and the rotate-half
    /// RoPE Hugging Face uses (NEOX in ggml's terms), so nothing is permuted.
    Qwen3,
}

impl Arch {
    /// `general.architecture`, and the prefix of the model's own metadata keys.
    pub fn name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Qwen3 => "qwen3",
        }
    }
}

/// The validated hyper-parameters of a llama-family model.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    /// The llama.cpp architecture.
    pub arch: Arch,
    /// `hidden_size` (`llama.embedding_length`).
    pub hidden_size: u32,
    /// `intermediate_size` (`llama.feed_forward_length`).
    pub intermediate_size: u32,
    /// `num_hidden_layers` (`llama.block_count`).
    pub num_layers: u32,
    /// `num_attention_heads`.
    pub num_heads: u32,
    /// `num_key_value_heads` (defaults to the number of heads).
    pub num_kv_heads: u32,
    /// Width of one head (`head_dim`, else hidden / heads).
    pub head_dim: u32,
    /// Rows of the embedding (may exceed the tokenizer's ids: padding).
    pub vocab_size: u32,
    /// `max_position_embeddings` (`llama.context_length`).
    pub context_length: u32,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f32,
    /// RoPE base frequency.
    pub rope_theta: f32,
    /// The output projection is the embedding (no `output.weight`).
    pub tie_word_embeddings: bool,
    /// From `config.json` (the first, if a list).
    pub bos_token_id: Option<u32>,
    /// From `config.json` (the first, if a list).
    pub eos_token_id: Option<u32>,
    /// From `config.json`.
    pub pad_token_id: Option<u32>,
    /// q/k/v biases are required (Qwen2, or Llama's `attention_bias`).
    pub qkv_bias: bool,
    /// The o_proj bias is required (Llama's `attention_bias`, never Qwen2).
    pub o_bias: bool,
    /// RoPE scaling as llama.cpp represents it.
    pub rope_scaling: RopeScaling,
}

/// How the rotary frequencies are scaled, in llama.cpp's terms.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE.
    None,
    /// Positions divided by `factor`: `llama.rope.scaling.type = "linear"`,
    /// `llama.rope.scaling.factor`.
    Linear {
        /// Hugging Face's `factor`.
        factor: f32,
    },
    /// Llama 3.1's per-frequency scaling: llama.cpp divides frequency i by
    /// `rope_freqs.weight[i]`, which the exporter computes as Hugging Face's converter does.
    Llama3 {
        /// One divisor per frequency (head_dim / 2 of them).
        freq_factors: Vec<f32>,
    },
}

impl LlamaConfig {
    /// Whether `head_dim` differs from `hidden_size / num_heads`, which llama.cpp then needs
    /// as `attention.key_length`/`value_length`.
    pub fn explicit_head_dim(&self) -> bool {
        self.head_dim != self.hidden_size / self.num_heads
    }
}

impl LlamaConfig {
    /// Reads and checks `config.json`.
    pub fn read(path: &Path) -> Result<LlamaConfig, PublishError> {
        let text = super::read_model_text(path).map_err(|e| PublishError::io("read", path, e))?;
        let raw: RawConfig = serde_json::from_str(&text).map_err(|e| PublishError::Config {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        Self::from_raw(raw).map_err(|reason| PublishError::Config {
            path: path.to_path_buf(),
            reason,
        })
    }

    fn from_raw(raw: RawConfig) -> Result<LlamaConfig, String> {
        let model_type = raw.model_type.as_deref().unwrap_or("llama");
        if !matches!(model_type, "llama" | "mistral" | "qwen2" | "qwen3") {
            return Err(format!(
                "model_type {model_type:?} is not exported (llama-family only: \"llama\", \"mistral\", \"qwen2\", \"qwen3\")"
            ));
        }
        let arch = if model_type == "qwen3" {
            Arch::Qwen3
        } else {
            Arch::Llama
        };
        if arch == Arch::Qwen3 && raw.attention_bias == Some(true) {
            return Err(
                "qwen3 with attention_bias = true: llama.cpp's qwen3 has no \
                        attention biases"
                    .into(),
            );
        }
        if let Some(act) = raw.hidden_act.as_deref()
            && act != "silu"
        {
            return Err(format!(
                "hidden_act {act:?}: llama's feed-forward is SiLU-gated"
            ));
        }
        if raw.mlp_bias == Some(true) {
            return Err("mlp_bias = true: feed-forward biases are not exported".into());
        }
        // A sliding window that never takes effect within the context is plain attention;
        // llama.cpp's llama architecture has no window, so any other is refused.
        let window = match model_type {
            "qwen2" | "qwen3" if raw.use_sliding_window != Some(true) => None,
            // Qwen2's window is on the layers from max_window_layers on (or as layer_types
            // says): on none of them, it is plain attention.
            "qwen2"
                if crate::hf_config::qwen2_sliding_layers(
                    raw.num_hidden_layers,
                    raw.max_window_layers,
                    raw.layer_types.as_ref(),
                ) == 0 =>
            {
                None
            }
            _ => raw.sliding_window,
        };
        if let Some(w) = window
            && w < raw.max_position_embeddings
        {
            return Err(format!(
                "sliding_window = {w} is shorter than max_position_embeddings = {}; \
                     sliding-window attention is not exported",
                raw.max_position_embeddings
            ));
        }
        let u32_field = |name: &str, v: u64| -> Result<u32, String> {
            if v == 0 {
                return Err(format!("{name} must be positive"));
            }
            u32::try_from(v).map_err(|_| format!("{name} = {v} does not fit in 32 bits"))
        };
        let hidden_size = u32_field("hidden_size", raw.hidden_size)?;
        let num_heads = u32_field("num_attention_heads", raw.num_attention_heads)?;
        let num_kv_heads = u32_field(
            "num_key_value_heads",
            raw.num_key_value_heads.unwrap_or(raw.num_attention_heads),
        )?;
        if num_heads % num_kv_heads != 0 {
            return Err(format!(
                "num_attention_heads {num_heads} is not a multiple of num_key_value_heads {num_kv_heads}"
            ));
        }
        let head_dim = match raw.head_dim {
            Some(hd) => u32_field("head_dim", hd)?,
            // What transformers' Qwen3Config gives a config.json without head_dim.
            None if arch == Arch::Qwen3 => crate::hf_config::QWEN3_HEAD_DIM as u32,
            None if hidden_size % num_heads != 0 => {
                return Err(format!(
                    "hidden_size {hidden_size} is not a multiple of num_attention_heads {num_heads}"
                ));
            }
            None => hidden_size / num_heads,
        };
        if head_dim % 2 != 0 {
            return Err(format!("head dimension {head_dim} must be even for RoPE"));
        }
        let float = |name: &str, v: f64| -> Result<f32, String> {
            if v.is_finite() && v > 0.0 {
                Ok(v as f32)
            } else {
                Err(format!("{name} must be a positive number"))
            }
        };
        let rope = crate::hf_config::rope(
            raw.rope_theta,
            raw.rope_scaling.as_ref(),
            raw.rope_parameters.as_ref(),
        )?;
        let rope_theta = rope.theta.unwrap_or(10_000.0);
        let rope_scaling = rope_scaling(rope.scaling.as_ref(), rope_theta, head_dim)
            .map_err(|e| e.replacen("rope_scaling", rope.field, 1))?;
        if arch == Arch::Qwen3 && matches!(rope_scaling, RopeScaling::Llama3 { .. }) {
            return Err(format!(
                "qwen3 with Llama 3.1's {}: llama.cpp's qwen3 has no per-frequency factors",
                rope.field
            ));
        }
        let attention_bias = raw.attention_bias == Some(true);
        Ok(LlamaConfig {
            arch,
            hidden_size,
            intermediate_size: u32_field("intermediate_size", raw.intermediate_size)?,
            num_layers: u32_field("num_hidden_layers", raw.num_hidden_layers)?,
            num_heads,
            num_kv_heads,
            head_dim,
            vocab_size: u32_field("vocab_size", raw.vocab_size)?,
            context_length: u32_field("max_position_embeddings", raw.max_position_embeddings)?,
            rms_norm_eps: float("rms_norm_eps", raw.rms_norm_eps)?,
            rope_theta: float("rope_theta", rope_theta)?,
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
            bos_token_id: raw.bos_token_id.and_then(|t| t.first()),
            eos_token_id: raw.eos_token_id.and_then(|t| t.first()),
            pad_token_id: raw.pad_token_id.and_then(|t| t.first()),
            qkv_bias: model_type == "qwen2" || attention_bias,
            o_bias: model_type != "qwen2" && attention_bias,
            rope_scaling,
        })
    }
}

/// Maps `rope_scaling` to llama.cpp's representation, refusing kinds it cannot express.
fn rope_scaling(
    v: Option<&serde_json::Value>,
    theta: f64,
    head_dim: u32,
) -> Result<RopeScaling, String> {
    let Some(v) = v.filter(|v| !v.is_null()) else {
        return Ok(RopeScaling::None);
    };
    let kind = v
        .get("rope_type")
        .or_else(|| v.get("type"))
        .and_then(serde_json::Value::as_str)
        .unwrap_or("");
    let num = |k: &str| v.get(k).and_then(serde_json::Value::as_f64);
    let factor = || {
        num("factor")
            .filter(|f| f.is_finite() && *f > 0.0)
            .ok_or_else(|| format!("rope_scaling {kind:?} needs a positive factor"))
    };
    match kind {
        "default" => Ok(RopeScaling::None),
        "linear" => Ok(RopeScaling::Linear {
            factor: factor()? as f32,
        }),
        "llama3" => {
            // Hugging Face's _compute_llama3_parameters, expressed as the divisor of each
            // frequency (what convert_hf_to_gguf writes as rope_freqs.weight).
            let f = factor()?;
            let low = num("low_freq_factor").unwrap_or(1.0);
            let high = num("high_freq_factor").unwrap_or(4.0);
            let old = num("original_max_position_embeddings").unwrap_or(8192.0);
            if high <= low {
                return Err("rope_scaling: high_freq_factor must exceed low_freq_factor".into());
            }
            let (low_wavelen, high_wavelen) = (old / low, old / high);
            let d = f64::from(head_dim);
            let freq_factors = (0..head_dim / 2)
                .map(|i| {
                    let freq = 1.0 / theta.powf(f64::from(2 * i) / d);
                    let wavelen = 2.0 * std::f64::consts::PI / freq;
                    let divisor = if wavelen < high_wavelen {
                        1.0
                    } else if wavelen > low_wavelen {
                        f
                    } else {
                        let smooth = (old / wavelen - low) / (high - low);
                        1.0 / ((1.0 - smooth) / f + smooth)
                    };
                    divisor as f32
                })
                .collect();
            Ok(RopeScaling::Llama3 { freq_factors })
        }
        other => Err(format!(
            "rope_scaling type {other:?} is not exported (only linear and llama3)"
        )),
    }
}

/// One tensor of the GGUF and where its data comes from.
#[derive(Debug, Clone)]
pub struct TensorPlan {
    /// The GGUF name (`blk.0.attn_q.weight`).
    pub gguf_name: String,
    /// The safetensors name it is read from.
    pub hf_name: String,
    /// Shape in PyTorch order (`[out, in]`); written reversed, data unchanged.
    pub shape: Vec<usize>,
    /// The type it is stored as.
    pub dtype: GgmlDType,
    /// `Some(n_heads)` for q/k weights and biases: rows are permuted from Hugging Face's
    /// rotate-half RoPE layout to ggml's interleaved one.
    pub permute_heads: Option<usize>,
    /// Data computed by the exporter instead of read (`rope_freqs.weight`).
    pub computed: Option<Vec<f32>>,
}

impl TensorPlan {
    /// Number of elements.
    pub fn elements(&self) -> u64 {
        self.shape.iter().map(|&d| d as u64).product()
    }

    /// Bytes of its data in the GGUF (before alignment padding).
    pub fn data_bytes(&self) -> u64 {
        self.elements() / self.dtype.block_size() as u64 * self.dtype.type_size() as u64
    }
}

/// A model directory opened for export.
pub struct HfModel {
    /// `model.safetensors` (or the shard index), for messages.
    pub weights_path: PathBuf,
    /// The checked `config.json`.
    pub config: LlamaConfig,
    weights: WeightFiles,
    /// GGUF tensors in file order.
    pub tensors: Vec<TensorPlan>,
}

/// Maps the tensor type of the published 2-D weights to ggml's.
pub fn ggml_dtype(q: Quantization) -> GgmlDType {
    match q {
        Quantization::F32 => GgmlDType::F32,
        Quantization::F16 => GgmlDType::F16,
        Quantization::Q8_0 => GgmlDType::Q8_0,
        Quantization::Q4_0 => GgmlDType::Q4_0,
        Quantization::Q4K => GgmlDType::Q4K,
    }
}

impl HfModel {
    /// Opens `config.json` and the weights in `dir` (`model.safetensors`, or the shards named
    /// by `model.safetensors.index.json`) and plans every GGUF tensor.
    pub fn open(dir: &Path, quantization: Quantization) -> Result<HfModel, PublishError> {
        let config = LlamaConfig::read(&dir.join("config.json"))?;
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        let (weights_path, files) = if single.is_file() {
            (single.clone(), vec![single])
        } else if index.is_file() {
            (index.clone(), shard_files(&index)?)
        } else {
            return Err(PublishError::Config {
                path: single,
                reason: "missing, and no model.safetensors.index.json (.bin checkpoints are \
                         not exported)"
                    .into(),
            });
        };
        let weights = WeightFiles::open(&files)?;
        let tensors = plan_tensors(&config, &weights, &weights_path, quantization)?;
        Ok(HfModel {
            weights_path,
            config,
            weights,
            tensors,
        })
    }

    /// Total number of parameters written (tied embeddings counted once).
    pub fn parameter_count(&self) -> u64 {
        self.tensors.iter().map(TensorPlan::elements).sum()
    }

    /// Reads one planned tensor as f32, permuted if needed, ready to quantize.
    pub fn load_f32(&self, plan: &TensorPlan) -> Result<Tensor, PublishError> {
        let err = |reason: String| PublishError::Tensor {
            path: self.weights_path.clone(),
            name: plan.hf_name.clone(),
            reason,
        };
        if let Some(data) = &plan.computed {
            return Tensor::from_slice(data, plan.shape.as_slice(), &Device::Cpu)
                .map_err(|e| err(e.to_string()));
        }
        let t = self
            .weights
            .load(&plan.hf_name)?
            .to_dtype(DType::F32)
            .map_err(|e| err(e.to_string()))?;
        let Some(n_heads) = plan.permute_heads else {
            return Ok(t);
        };
        permute_rope_rows(&t, n_heads).map_err(|e| err(e.to_string()))
    }
}

/// Where one tensor's bytes lie in the weight files.
struct WeightEntry {
    /// Index into [`WeightFiles::files`].
    file: usize,
    dtype: safetensors::Dtype,
    shape: Vec<usize>,
    /// Absolute byte offset of the data in the file.
    offset: u64,
    len: usize,
}

/// The safetensors files of a model, opened once and read with positioned reads.
struct WeightFiles {
    files: Vec<(PathBuf, File)>,
    tensors: BTreeMap<String, WeightEntry>,
}

/// Safetensors' own limit on the JSON header (`MAX_HEADER_SIZE` in the crate).
const MAX_SAFETENSORS_HEADER: u64 = 100_000_000;

impl WeightFiles {
    /// Opens each file and reads its header. A file whose length differs from what its header
    /// describes (truncated, or with trailing bytes) is refused here, before anything is
    /// written.
    fn open(paths: &[PathBuf]) -> Result<WeightFiles, PublishError> {
        let mut files = Vec::with_capacity(paths.len());
        let mut tensors = BTreeMap::new();
        for path in paths {
            let bad = |reason: String| PublishError::Config {
                path: path.clone(),
                reason,
            };
            let file =
                super::open_model_file(path).map_err(|e| PublishError::io("open", path, e))?;
            let len = file
                .metadata()
                .map_err(|e| PublishError::io("stat", path, e))?
                .len();
            let mut prefix = [0u8; 8];
            read_at(&file, path, &mut prefix, 0)?;
            let header_len = u64::from_le_bytes(prefix);
            if header_len > MAX_SAFETENSORS_HEADER || header_len + 8 > len {
                return Err(bad(format!(
                    "not a safetensors file: a header of {header_len} bytes in a file of {len}"
                )));
            }
            let mut header = vec![0u8; header_len as usize];
            read_at(&file, path, &mut header, 8)?;
            let meta: safetensors::tensor::Metadata = serde_json::from_slice(&header)
                .map_err(|e| bad(format!("not a safetensors file: {e}")))?;
            let data_start = 8 + header_len;
            let mut data_end = data_start;
            for (name, info) in meta.tensors() {
                let (begin, end) = info.data_offsets;
                data_end = data_end.max(data_start + end as u64);
                let entry = WeightEntry {
                    file: files.len(),
                    dtype: info.dtype,
                    shape: info.shape.clone(),
                    offset: data_start + begin as u64,
                    len: end - begin,
                };
                if tensors.insert(name.clone(), entry).is_some() {
                    return Err(bad(format!("tensor {name} is in more than one shard")));
                }
            }
            if data_end != len {
                return Err(bad(format!(
                    "the header describes {data_end} bytes but the file has {len} (truncated or \
                     still being written?)"
                )));
            }
            files.push((path.clone(), file));
        }
        Ok(WeightFiles { files, tensors })
    }

    /// Reads one tensor in its stored type. A file shortened since [`WeightFiles::open`] gives
    /// an error naming it.
    fn load(&self, name: &str) -> Result<Tensor, PublishError> {
        let Some(entry) = self.tensors.get(name) else {
            let path = self
                .files
                .first()
                .map(|(p, _)| p.clone())
                .unwrap_or_default();
            return Err(PublishError::Tensor {
                path,
                name: name.into(),
                reason: "not in the weight files".into(),
            });
        };
        let (path, file) = &self.files[entry.file];
        let mut data = vec![0u8; entry.len];
        read_at(file, path, &mut data, entry.offset)?;
        let err = |reason: String| PublishError::Tensor {
            path: path.clone(),
            name: name.into(),
            reason,
        };
        let view = safetensors::tensor::TensorView::new(entry.dtype, entry.shape.clone(), &data)
            .map_err(|e| err(e.to_string()))?;
        view.load(&Device::Cpu).map_err(|e| err(e.to_string()))
    }
}

/// `read_exact_at` whose short read says that the file was truncated.
fn read_at(file: &File, path: &Path, buf: &mut [u8], offset: u64) -> Result<(), PublishError> {
    file.read_exact_at(buf, offset).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            PublishError::Config {
                path: path.to_path_buf(),
                reason: format!(
                    "ends before byte {} (truncated while being read?)",
                    offset + buf.len() as u64
                ),
            }
        } else {
            PublishError::io("read", path, e)
        }
    })
}

/// The shard files an index names (`weight_map` values), each inside the model directory.
fn shard_files(index: &Path) -> Result<Vec<PathBuf>, PublishError> {
    let err = |reason: String| PublishError::Config {
        path: index.to_path_buf(),
        reason,
    };
    let text = super::read_model_text(index).map_err(|e| PublishError::io("read", index, e))?;
    let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| err(e.to_string()))?;
    let map = json
        .get("weight_map")
        .and_then(serde_json::Value::as_object)
        .ok_or_else(|| err("no weight_map".into()))?;
    let dir = index.parent().unwrap_or(Path::new("."));
    let mut files: Vec<String> = map
        .values()
        .map(|v| {
            v.as_str()
                .map(str::to_string)
                .ok_or_else(|| err("a weight_map value is not a file name".into()))
        })
        .collect::<Result<_, _>>()?;
    files.sort();
    files.dedup();
    files
        .into_iter()
        .map(|f| {
            // Shards are plain file names beside the index; anything else could read outside
            // the model directory.
            let p = Path::new(&f);
            if p.components().count() != 1
                || !matches!(p.components().next(), Some(std::path::Component::Normal(_)))
            {
                return Err(err(format!(
                    "shard {f:?} is not a file name in the model directory"
                )));
            }
            Ok(dir.join(p))
        })
        .collect()
}

/// Hugging Face's rotate-half RoPE pairs dimensions (i, i + hd/2) of each head; ggml's llama
/// RoPE pairs (2i, 2i + 1). Viewing each head's rows as (2, hd/2) and transposing to (hd/2, 2)
/// moves row `j*hd/2 + i` to `2i + j`, so q·k products are unchanged after RoPE.
/// Works for weights `[n_heads*hd, in]` and biases `[n_heads*hd]`.
pub fn permute_rope_rows(t: &Tensor, n_heads: usize) -> candle_core::Result<Tensor> {
    let dims = t.dims().to_vec();
    let rows = dims[0];
    let half = rows / n_heads / 2;
    match dims.len() {
        1 => t
            .reshape((n_heads, 2, half))?
            .transpose(1, 2)?
            .contiguous()?
            .reshape(rows),
        2 => t
            .reshape((n_heads, 2, half, dims[1]))?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((rows, dims[1])),
        _ => candle_core::bail!("cannot permute a tensor of shape {dims:?}"),
    }
}

/// (Hugging Face name, GGUF name, expected shape, required, heads to permute by).
type Wanted = (String, String, Vec<usize>, bool, Option<usize>);

fn plan_tensors(
    c: &LlamaConfig,
    weights: &WeightFiles,
    path: &Path,
    quantization: Quantization,
) -> Result<Vec<TensorPlan>, PublishError> {
    let (h, ff, v) = (
        c.hidden_size as usize,
        c.intermediate_size as usize,
        c.vocab_size as usize,
    );
    let q_rows = (c.num_heads * c.head_dim) as usize;
    let kv_rows = (c.num_kv_heads * c.head_dim) as usize;
    let present: BTreeMap<String, Vec<usize>> = weights
        .tensors
        .iter()
        .map(|(name, entry)| (name.clone(), entry.shape.clone()))
        .collect();
    let mut used = std::collections::BTreeSet::new();
    let mut plans = Vec::new();
    let weight_type = ggml_dtype(quantization);

    let mut want: Vec<Wanted> = vec![(
        "model.embed_tokens.weight".into(),
        "token_embd.weight".into(),
        vec![v, h],
        true,
        None,
    )];
    for i in 0..c.num_layers {
        let hf = |s: &str| format!("model.layers.{i}.{s}");
        let gg = |s: &str| format!("blk.{i}.{s}");
        // ggml's llama RoPE pairs neighbouring dimensions, so llama's q and k rows are
        // permuted; qwen3 rotates halves as Hugging Face does.
        let (nh, nkv) = match c.arch {
            Arch::Llama => (Some(c.num_heads as usize), Some(c.num_kv_heads as usize)),
            Arch::Qwen3 => (None, None),
        };
        let qk_norm = c.arch == Arch::Qwen3;
        let hd = c.head_dim as usize;
        let (bias, o_bias) = (c.qkv_bias, c.o_bias);
        want.extend([
            (
                hf("input_layernorm.weight"),
                gg("attn_norm.weight"),
                vec![h],
                true,
                None,
            ),
            (
                hf("self_attn.q_proj.weight"),
                gg("attn_q.weight"),
                vec![q_rows, h],
                true,
                nh,
            ),
            (
                hf("self_attn.q_proj.bias"),
                gg("attn_q.bias"),
                vec![q_rows],
                bias,
                nh,
            ),
            (
                hf("self_attn.k_proj.weight"),
                gg("attn_k.weight"),
                vec![kv_rows, h],
                true,
                nkv,
            ),
            (
                hf("self_attn.k_proj.bias"),
                gg("attn_k.bias"),
                vec![kv_rows],
                bias,
                nkv,
            ),
            (
                hf("self_attn.v_proj.weight"),
                gg("attn_v.weight"),
                vec![kv_rows, h],
                true,
                None,
            ),
            (
                hf("self_attn.v_proj.bias"),
                gg("attn_v.bias"),
                vec![kv_rows],
                bias,
                None,
            ),
            (
                hf("self_attn.q_norm.weight"),
                gg("attn_q_norm.weight"),
                vec![hd],
                qk_norm,
                None,
            ),
            (
                hf("self_attn.k_norm.weight"),
                gg("attn_k_norm.weight"),
                vec![hd],
                qk_norm,
                None,
            ),
            (
                hf("self_attn.o_proj.weight"),
                gg("attn_output.weight"),
                vec![h, q_rows],
                true,
                None,
            ),
            (
                hf("self_attn.o_proj.bias"),
                gg("attn_output.bias"),
                vec![h],
                o_bias,
                None,
            ),
            (
                hf("post_attention_layernorm.weight"),
                gg("ffn_norm.weight"),
                vec![h],
                true,
                None,
            ),
            (
                hf("mlp.gate_proj.weight"),
                gg("ffn_gate.weight"),
                vec![ff, h],
                true,
                None,
            ),
            (
                hf("mlp.up_proj.weight"),
                gg("ffn_up.weight"),
                vec![ff, h],
                true,
                None,
            ),
            (
                hf("mlp.down_proj.weight"),
                gg("ffn_down.weight"),
                vec![h, ff],
                true,
                None,
            ),
        ]);
    }
    want.push((
        "model.norm.weight".into(),
        "output_norm.weight".into(),
        vec![h],
        true,
        None,
    ));
    if c.tie_word_embeddings {
        // A tied checkpoint may still carry a copy of the head; llama.cpp reuses
        // token_embd when output.weight is absent, so the copy is not exported.
        used.insert("lm_head.weight".to_string());
    } else {
        want.push((
            "lm_head.weight".into(),
            "output.weight".into(),
            vec![v, h],
            true,
            None,
        ));
    }

    for (hf_name, gguf_name, shape, required, permute_heads) in want {
        let Some(actual) = present.get(&hf_name) else {
            if required {
                return Err(PublishError::Tensor {
                    path: path.to_path_buf(),
                    name: hf_name,
                    reason: "missing".into(),
                });
            }
            continue;
        };
        if *actual != shape {
            return Err(PublishError::Tensor {
                path: path.to_path_buf(),
                name: hf_name,
                reason: format!("has shape {actual:?}, config.json implies {shape:?}"),
            });
        }
        let dtype = if shape.len() == 1 {
            // Norms and biases stay f32, as llama.cpp's converter keeps them.
            GgmlDType::F32
        } else {
            let block = weight_type.block_size();
            if shape[1] % block != 0 {
                return Err(PublishError::Tensor {
                    path: path.to_path_buf(),
                    name: hf_name,
                    reason: format!(
                        "its input dimension {} is not a multiple of {block}, which {quantization} \
                         needs; choose f16 or f32{}",
                        shape[1],
                        if shape[1] % 32 == 0 {
                            " (or q8_0, q4_0)"
                        } else {
                            ""
                        }
                    ),
                });
            }
            weight_type
        };
        used.insert(hf_name.clone());
        plans.push(TensorPlan {
            gguf_name,
            hf_name,
            shape,
            dtype,
            permute_heads,
            computed: None,
        });
    }
    if let RopeScaling::Llama3 { freq_factors } = &c.rope_scaling {
        plans.push(TensorPlan {
            gguf_name: "rope_freqs.weight".into(),
            hf_name: "rope_scaling (config.json)".into(),
            shape: vec![freq_factors.len()],
            dtype: GgmlDType::F32,
            permute_heads: None,
            computed: Some(freq_factors.clone()),
        });
    }
    for name in present.keys() {
        // Old checkpoints store RoPE frequencies as a buffer; llama.cpp computes them.
        if used.contains(name) || name.ends_with("rotary_emb.inv_freq") {
            continue;
        }
        return Err(PublishError::Tensor {
            path: path.to_path_buf(),
            name: name.clone(),
            reason: format!(
                "not part of a {} model (llama.cpp refuses files with extra tensors)",
                c.arch.name()
            ),
        });
    }
    Ok(plans)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permutation_interleaves_the_two_halves_of_each_head() {
        // 2 heads of dim 4, one input column: row r holds value r.
        let t = Tensor::arange(0f32, 8., &Device::Cpu)
            .unwrap()
            .reshape((8, 1))
            .unwrap();
        let p = permute_rope_rows(&t, 2).unwrap();
        let rows: Vec<f32> = p.flatten_all().unwrap().to_vec1().unwrap();
        // W_gguf[h*hd + 2i + j] = W_hf[h*hd + j*hd/2 + i]
        assert_eq!(rows, [0., 2., 1., 3., 4., 6., 5., 7.]);
        let b = permute_rope_rows(&Tensor::arange(0f32, 8., &Device::Cpu).unwrap(), 2).unwrap();
        assert_eq!(b.to_vec1::<f32>().unwrap(), rows);
    }

    fn raw(json: &str) -> Result<LlamaConfig, String> {
        LlamaConfig::from_raw(serde_json::from_str(json).unwrap())
    }

    const BASE: &str = r#""hidden_size":64,"intermediate_size":128,"num_hidden_layers":2,"num_attention_heads":4,"vocab_size":300,"max_position_embeddings":256,"rms_norm_eps":1e-5"#;

    #[test]
    fn config_defaults_and_refusals() {
        let c = raw(&format!("{{{BASE}}}")).unwrap();
        assert_eq!((c.num_kv_heads, c.head_dim, c.rope_theta), (4, 16, 10000.0));
        assert!(!c.tie_word_embeddings && !c.qkv_bias && !c.o_bias && !c.explicit_head_dim());
        assert_eq!(c.rope_scaling, RopeScaling::None);
        let c = raw(&format!(
            "{{{BASE},\"eos_token_id\":[7,9],\"pad_token_id\":null,\"num_key_value_heads\":2,\"head_dim\":32}}"
        ))
        .unwrap();
        assert_eq!(
            (c.eos_token_id, c.pad_token_id, c.num_kv_heads),
            (Some(7), None, 2)
        );
        assert!(c.explicit_head_dim());
        let c = raw(&format!(
            "{{{BASE},\"model_type\":\"qwen2\",\"sliding_window\":32,\"use_sliding_window\":false}}"
        ))
        .unwrap();
        // A Qwen2 window on no layer (transformers' max_window_layers defaults to 28) is
        // plain attention.
        raw(&format!(
            "{{{BASE},\"model_type\":\"qwen2\",\"sliding_window\":32,\"use_sliding_window\":true}}"
        ))
        .unwrap();
        assert!(c.qkv_bias && !c.o_bias, "Qwen2 always has q/k/v biases");
        let c = raw(&format!(
            "{{{BASE},\"model_type\":\"mistral\",\"sliding_window\":4096}}"
        ))
        .unwrap();
        assert_eq!(c.context_length, 256);
        let c = raw(&format!("{{{BASE},\"attention_bias\":true}}")).unwrap();
        assert!(c.qkv_bias && c.o_bias);
        assert_eq!(c.arch, Arch::Llama);
        // Qwen3: its own architecture, and Qwen3Config's head width when none is given.
        let c = raw(&format!(
            "{{{BASE},\"model_type\":\"qwen3\",\"attention_bias\":false,\"sliding_window\":null,\"use_sliding_window\":false}}"
        ))
        .unwrap();
        assert_eq!(
            (c.arch, c.arch.name(), c.head_dim),
            (Arch::Qwen3, "qwen3", 128)
        );
        assert!(!c.qkv_bias && !c.o_bias && c.explicit_head_dim());
        // transformers 5's rope_parameters: its base and scaling are the ones exported.
        let c = raw(&format!(
            "{{{BASE},\"rope_theta\":10000.0,\"rope_parameters\":{{\"rope_theta\":500000.0,\"rope_type\":\"linear\",\"factor\":4.0}}}}"
        ))
        .unwrap();
        assert_eq!(c.rope_theta, 500000.0);
        assert_eq!(c.rope_scaling, RopeScaling::Linear { factor: 4.0 });
        let c = raw(&format!(
            "{{{BASE},\"rope_scaling\":{{\"type\":\"linear\",\"factor\":2.0}}}}"
        ))
        .unwrap();
        assert_eq!(c.rope_scaling, RopeScaling::Linear { factor: 2.0 });
        for (extra, why) in [
            (
                r#""rope_scaling":{"rope_type":"yarn","factor":2.0}"#,
                "\"yarn\" is not exported",
            ),
            (
                r#""rope_scaling":{"rope_type":"linear"}"#,
                "positive factor",
            ),
            (r#""hidden_act":"gelu""#, "SiLU"),
            (r#""model_type":"gemma""#, "model_type"),
            (
                r#""num_key_value_heads":3"#,
                "multiple of num_key_value_heads",
            ),
            (r#""head_dim":15"#, "must be even"),
            (r#""mlp_bias":true"#, "mlp_bias"),
            (
                r#""model_type":"mistral","sliding_window":128"#,
                "sliding_window = 128",
            ),
            (
                r#""model_type":"qwen2","sliding_window":128,"use_sliding_window":true,"max_window_layers":0"#,
                "sliding_window = 128",
            ),
            (
                r#""model_type":"qwen3","sliding_window":128,"use_sliding_window":true"#,
                "sliding_window = 128",
            ),
            (
                r#""model_type":"qwen3","attention_bias":true"#,
                "no attention biases",
            ),
            (
                r#""model_type":"qwen3","rope_scaling":{"rope_type":"llama3","factor":8.0}"#,
                "per-frequency",
            ),
        ] {
            let e = raw(&format!("{{{BASE},{extra}}}")).unwrap_err();
            assert!(e.contains(why), "{extra}: {e}");
        }
    }

    /// Two tensors in a safetensors file in a fresh temp dir.
    fn weights_file() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.safetensors");
        let a = Tensor::arange(0f32, 6., &Device::Cpu)
            .unwrap()
            .reshape((2, 3))
            .unwrap();
        let b = Tensor::arange(0f32, 256., &Device::Cpu)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        let tensors: std::collections::HashMap<String, Tensor> =
            [("a".to_string(), a), ("b".to_string(), b)].into();
        candle_core::safetensors::save(&tensors, &path).unwrap();
        (dir, path)
    }

    #[test]
    fn weight_files_read_each_tensor_in_its_stored_type() {
        let (_dir, path) = weights_file();
        let w = WeightFiles::open(std::slice::from_ref(&path)).unwrap();
        assert_eq!(w.tensors["a"].shape, [2, 3]);
        let a = w.load("a").unwrap();
        assert_eq!(a.to_vec2::<f32>().unwrap(), [[0., 1., 2.], [3., 4., 5.]]);
        let b = w.load("b").unwrap();
        assert_eq!(b.dtype(), DType::BF16);
        let b: Vec<f32> = b.to_dtype(DType::F32).unwrap().to_vec1().unwrap();
        assert_eq!(b[255], 255.0);
        let e = w.load("c").unwrap_err().to_string();
        assert!(e.contains("tensor c: not in the weight files"), "{e}");
    }

    #[test]
    fn a_weight_file_truncated_before_or_while_publishing_is_an_error() {
        // Before: the header describes more bytes than the file has.
        let (_dir, path) = weights_file();
        let len = std::fs::metadata(&path).unwrap().len();
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len(len - 1).unwrap();
        let e = WeightFiles::open(std::slice::from_ref(&path))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("truncated"), "{e}");
        f.set_len(10).unwrap();
        let e = WeightFiles::open(std::slice::from_ref(&path))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("not a safetensors file"), "{e}");

        // While: the owner truncates it after it was opened. A mapped file would read zeros
        // up to the end of the last page and end this process with SIGBUS beyond it.
        let (_dir, path) = weights_file();
        let w = WeightFiles::open(std::slice::from_ref(&path)).unwrap();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(100)
            .unwrap();
        let e = w.load("b").unwrap_err().to_string();
        assert!(e.contains("truncated while being read"), "{e}");
    }

    #[test]
    fn a_fifo_in_place_of_the_weights_is_refused_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.safetensors");
        nix::unistd::mkfifo(&path, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let e = WeightFiles::open(std::slice::from_ref(&path))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("not a regular file"), "{e}");
    }

    #[test]
    fn llama3_rope_factors_follow_hugging_face() {
        // Llama 3.1's parameters: head_dim 128, theta 500000, factor 8, low 1, high 4, 8192.
        let v = serde_json::json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192});
        let RopeScaling::Llama3 { freq_factors } = rope_scaling(Some(&v), 500000.0, 128).unwrap()
        else {
            panic!()
        };
        assert_eq!(freq_factors.len(), 64);
        // Short wavelengths are untouched, long ones divided by the factor, a smooth ramp
        // between.
        assert_eq!(freq_factors[0], 1.0);
        assert_eq!(freq_factors[63], 8.0);
        assert!(freq_factors.windows(2).all(|w| w[0] <= w[1]));
        assert!(freq_factors.iter().any(|&f| f > 1.0 && f < 8.0));
    }
}
