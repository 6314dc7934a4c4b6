//! The model's architecture as Hugging Face writes it in `config.json`, for the llama family
//! (Llama, TinyLlama, SmolLM, Mistral, Qwen2, Qwen3), and the one built for `init = "scratch"`.
//!
//! This module owns reading and writing `config.json` and deciding which architecture
//! variants (biases, tied embeddings, rotary scaling) a checkpoint uses; it refuses variants
//! the model code does not implement rather than training something else silently.

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::TrainError;
use crate::hf_config;
use crate::spec::train::{ModelSpec, default_intermediate_size};

fn default_model_type() -> String {
    "llama".into()
}
fn default_max_pos() -> usize {
    2048
}
fn default_eps() -> f64 {
    1e-6
}
fn default_theta() -> f64 {
    10000.0
}
fn default_act() -> String {
    "silu".into()
}
fn default_init_range() -> f64 {
    0.02
}

/// The fields of a llama-family `config.json` the model uses. Unknown fields are kept in
/// `extra` and written back, so a fine-tuned model keeps its base's configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    /// `"llama"`, `"mistral"`, `"qwen2"`, `"qwen3"`.
    #[serde(default = "default_model_type")]
    pub model_type: String,
    /// Number of token ids the embedding has rows for.
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the MLP.
    pub intermediate_size: usize,
    /// Decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (grouped-query attention); absent = `num_attention_heads`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_key_value_heads: Option<usize>,
    /// Per-head width when it is not `hidden_size / num_attention_heads`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_dim: Option<usize>,
    /// Longest supported sequence.
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    /// RMSNorm epsilon.
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    /// Rotary embedding base.
    #[serde(default = "default_theta")]
    pub rope_theta: f64,
    /// Rotary scaling (`"linear"` and `"llama3"` are implemented).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<Value>,
    /// transformers 5's form of `rope_theta` and `rope_scaling` together (see
    /// [`hf_config::rope`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_parameters: Option<Value>,
    /// The output projection reuses the input embedding.
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Llama, Qwen3: biases on q, k, v and o. (Qwen2 always has q/k/v biases and no o bias.)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attention_bias: Option<bool>,
    /// Biases in the MLP (not implemented; must be false).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mlp_bias: Option<bool>,
    /// MLP activation (only `"silu"`).
    #[serde(default = "default_act")]
    pub hidden_act: String,
    /// Mistral's sliding attention window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sliding_window: Option<usize>,
    /// Qwen2, Qwen3: whether `sliding_window` is used at all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub use_sliding_window: Option<bool>,
    /// Standard deviation of initial weights.
    #[serde(default = "default_init_range")]
    pub initializer_range: f64,
    /// Beginning-of-sequence token id (a number or a list).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bos_token_id: Option<Value>,
    /// End-of-sequence token id(s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eos_token_id: Option<Value>,
    /// Everything else in the file, kept verbatim.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, Value>,
}

impl LlamaConfig {
    /// Reads and checks `config.json`.
    pub fn load(path: &Path) -> Result<Self, TrainError> {
        let text = std::fs::read_to_string(path).map_err(|e| TrainError::io(path, e))?;
        let cfg: LlamaConfig = serde_json::from_str(&text).map_err(|e| TrainError::BadModel {
            path: path.to_path_buf(),
            reason: format!("config.json: {e}"),
        })?;
        cfg.check().map_err(|reason| TrainError::BadModel {
            path: path.to_path_buf(),
            reason,
        })?;
        Ok(cfg)
    }

    /// The configuration of a fresh model described by `[model]`.
    pub fn scratch(m: &ModelSpec, block_size: usize, vocab_size: usize) -> Self {
        let hidden = m.hidden_size.unwrap_or(64);
        let heads = m.num_attention_heads.unwrap_or(1);
        // Q/K/V biases are Qwen2's layout, normed queries and keys Qwen3's; writing the model
        // as such lets other tools load it.
        let model_type = if m.qk_norm == Some(true) {
            "qwen3"
        } else if m.attention_bias == Some(true) {
            "qwen2"
        } else {
            "llama"
        };
        let qwen = model_type != "llama";
        LlamaConfig {
            model_type: model_type.into(),
            vocab_size,
            hidden_size: hidden,
            intermediate_size: m
                .intermediate_size
                .unwrap_or_else(|| default_intermediate_size(hidden)),
            num_hidden_layers: m.num_hidden_layers.unwrap_or(1),
            num_attention_heads: heads,
            num_key_value_heads: Some(m.num_key_value_heads.unwrap_or(heads)),
            // Qwen3's configuration class defaults a missing head_dim to 128, so it is written.
            head_dim: (model_type == "qwen3").then(|| hidden / heads.max(1)),
            max_position_embeddings: m.max_position_embeddings.unwrap_or(block_size),
            rms_norm_eps: m.rms_norm_eps.unwrap_or(1e-6),
            rope_theta: m.rope_theta.unwrap_or(10000.0),
            rope_scaling: None,
            rope_parameters: None,
            tie_word_embeddings: m.tie_word_embeddings.unwrap_or(false),
            attention_bias: if model_type == "qwen2" {
                None
            } else {
                Some(false)
            },
            mlp_bias: None,
            hidden_act: "silu".into(),
            sliding_window: None,
            use_sliding_window: if qwen { Some(false) } else { None },
            initializer_range: m.initializer_range.unwrap_or(0.02),
            bos_token_id: None,
            eos_token_id: None,
            extra: Default::default(),
        }
    }

    /// Why this configuration cannot be trained by this model code, if it cannot.
    pub fn check(&self) -> Result<(), String> {
        // The architecture (what the daemon also checks at submit), then the sizes.
        let json = serde_json::to_value(self).map_err(|e| e.to_string())?;
        if let Some(why) = hf_config::unsupported(&json) {
            return Err(why);
        }
        for (name, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("max_position_embeddings", self.max_position_embeddings),
        ] {
            if v == 0 {
                return Err(format!("{name} must be > 0"));
            }
        }
        let kv = self.n_kv_heads();
        if kv == 0 || !self.num_attention_heads.is_multiple_of(kv) {
            return Err(format!(
                "num_key_value_heads ({kv}) must divide num_attention_heads ({})",
                self.num_attention_heads
            ));
        }
        if self.head_dim.is_none()
            && !self.qk_norm()
            && !self.hidden_size.is_multiple_of(self.num_attention_heads)
        {
            return Err("hidden_size must be a multiple of num_attention_heads".into());
        }
        if !self.head_dim().is_multiple_of(2) {
            return Err("the head dimension must be even for rotary embeddings".into());
        }
        self.rope_inv_freq()?;
        Ok(())
    }

    /// Key/value heads.
    pub fn n_kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// Width of one attention head: `head_dim`, else `hidden_size / num_attention_heads`
    /// (Qwen3: 128, as its configuration class defaults it).
    pub fn head_dim(&self) -> usize {
        self.head_dim.unwrap_or_else(|| {
            hf_config::default_head_dim(
                &self.model_type,
                self.hidden_size as u64,
                self.num_attention_heads as u64,
            ) as usize
        })
    }

    /// Whether q/k/v have biases.
    pub fn qkv_bias(&self) -> bool {
        self.model_type == "qwen2" || self.attention_bias == Some(true)
    }

    /// Whether queries and keys pass through a per-head RMSNorm before the rotary embedding
    /// (Qwen3's `q_norm` and `k_norm`).
    pub fn qk_norm(&self) -> bool {
        self.model_type == "qwen3"
    }

    /// Whether o_proj has a bias (Llama's `attention_bias`; never in Qwen2).
    pub fn o_bias(&self) -> bool {
        self.model_type != "qwen2" && self.attention_bias == Some(true)
    }

    /// The attention window, if attention is limited to recent tokens.
    pub fn window(&self) -> Option<usize> {
        match self.model_type.as_str() {
            "qwen2" | "qwen3" if self.use_sliding_window != Some(true) => None,
            // On all of its layers or on none (the check refuses some).
            "qwen2"
                if hf_config::qwen2_sliding_layers(
                    self.num_hidden_layers as u64,
                    self.extra.get("max_window_layers").and_then(Value::as_u64),
                    self.extra.get("layer_types"),
                ) == 0 =>
            {
                None
            }
            _ => self.sliding_window,
        }
    }

    /// The rotary frequencies, with any supported scaling applied (`rope_theta` and
    /// `rope_scaling`, or transformers 5's `rope_parameters`).
    pub fn rope_inv_freq(&self) -> Result<Vec<f64>, String> {
        let d = self.head_dim();
        let rope = hf_config::rope(
            Some(self.rope_theta),
            self.rope_scaling.as_ref(),
            self.rope_parameters.as_ref(),
        )?;
        let theta = rope.theta.unwrap_or(self.rope_theta);
        let base: Vec<f64> = (0..d / 2)
            .map(|i| 1.0 / theta.powf((2 * i) as f64 / d as f64))
            .collect();
        let Some(scaling) = &rope.scaling else {
            return Ok(base);
        };
        let kind = scaling
            .get("rope_type")
            .or_else(|| scaling.get("type"))
            .and_then(Value::as_str)
            .unwrap_or("");
        let num = |k: &str| scaling.get(k).and_then(Value::as_f64);
        match kind {
            "default" => Ok(base),
            "linear" => {
                let f = num("factor").ok_or(format!("{}.factor is missing", rope.field))?;
                Ok(base.into_iter().map(|x| x / f).collect())
            }
            "llama3" => {
                let f = num("factor").ok_or(format!("{}.factor is missing", rope.field))?;
                let low = num("low_freq_factor").unwrap_or(1.0);
                let high = num("high_freq_factor").unwrap_or(4.0);
                let old = num("original_max_position_embeddings").unwrap_or(8192.0);
                let low_wavelen = old / low;
                let high_wavelen = old / high;
                Ok(base
                    .into_iter()
                    .map(|freq| {
                        let wavelen = 2.0 * std::f64::consts::PI / freq;
                        if wavelen < high_wavelen {
                            freq
                        } else if wavelen > low_wavelen {
                            freq / f
                        } else {
                            let smooth = (old / wavelen - low) / (high - low);
                            (1.0 - smooth) * freq / f + smooth * freq
                        }
                    })
                    .collect())
            }
            other => Err(format!("{} type {other:?} is not supported", rope.field)),
        }
    }

    /// Number of parameters (tied embeddings counted once).
    pub fn num_parameters(&self) -> usize {
        let h = self.hidden_size;
        let hd = self.head_dim();
        let q = self.num_attention_heads * hd;
        let kv = self.n_kv_heads() * hd;
        let mut attn = h * q + 2 * h * kv + q * h;
        if self.qkv_bias() {
            attn += q + 2 * kv;
        }
        if self.o_bias() {
            attn += h;
        }
        let mlp = 3 * h * self.intermediate_size;
        let qk_norm = if self.qk_norm() { 2 * hd } else { 0 };
        let layer = attn + mlp + 2 * h + qk_norm;
        let emb = self.vocab_size * h;
        emb + self.num_hidden_layers * layer + h + if self.tie_word_embeddings { 0 } else { emb }
    }

    /// The eos token ids named in the config.
    pub fn eos_ids(&self) -> Vec<u32> {
        ids_of(self.eos_token_id.as_ref())
    }

    /// The file `save_pretrained` would write, with `architectures` and `torch_dtype` set. A
    /// configuration with transformers 5's `rope_parameters` also gets the `rope_theta` and
    /// `rope_scaling` they stand for, so that transformers 4 reads the model as 5 does.
    pub fn to_json(&self) -> Value {
        let mut cfg = self.clone();
        if cfg.rope_parameters.is_some()
            && let Ok(rope) = hf_config::rope(
                Some(cfg.rope_theta),
                cfg.rope_scaling.as_ref(),
                cfg.rope_parameters.as_ref(),
            )
        {
            cfg.rope_theta = rope.theta.unwrap_or(cfg.rope_theta);
            cfg.rope_scaling = rope.scaling.map(|mut s| {
                if let Value::Object(m) = &mut s {
                    m.remove("rope_theta");
                }
                s
            });
        }
        let mut v = serde_json::to_value(&cfg).expect("config serializes");
        let arch = match self.model_type.as_str() {
            "qwen2" => "Qwen2ForCausalLM",
            "qwen3" => "Qwen3ForCausalLM",
            "mistral" => "MistralForCausalLM",
            _ => "LlamaForCausalLM",
        };
        if let Value::Object(map) = &mut v {
            map.insert("architectures".into(), Value::from(vec![arch]));
            // The weights are written in f32; newer transformers read `dtype`, older
            // `torch_dtype`.
            map.insert("torch_dtype".into(), Value::from("float32"));
            if map.contains_key("dtype") {
                map.insert("dtype".into(), Value::from("float32"));
            }
        }
        v
    }
}

/// Token ids from a config value that may be a number, a list of numbers or absent.
pub fn ids_of(v: Option<&Value>) -> Vec<u32> {
    match v {
        Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(Value::as_u64)
            .map(|x| x as u32)
            .collect(),
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_llama_and_qwen2_layouts() {
        let llama: LlamaConfig = serde_json::from_str(
            r#"{"model_type":"llama","vocab_size":32000,"hidden_size":2048,
            "intermediate_size":5632,"num_hidden_layers":22,"num_attention_heads":32,
            "num_key_value_heads":4,"rms_norm_eps":1e-5,"eos_token_id":2,"pretraining_tp":1}"#,
        )
        .unwrap();
        llama.check().unwrap();
        assert_eq!(llama.head_dim(), 64);
        assert!(!llama.qkv_bias() && !llama.o_bias() && !llama.tie_word_embeddings);
        assert_eq!(llama.eos_ids(), vec![2]);
        assert_eq!(llama.extra["pretraining_tp"], 1);
        // TinyLlama: 1.1B parameters.
        assert_eq!(llama.num_parameters(), 1_100_048_384);
        let qwen: LlamaConfig = serde_json::from_str(
            r#"{"model_type":"qwen2","vocab_size":151936,"hidden_size":896,
            "intermediate_size":4864,"num_hidden_layers":24,"num_attention_heads":14,
            "num_key_value_heads":2,"tie_word_embeddings":true,"sliding_window":32768,
            "use_sliding_window":false,"eos_token_id":[151645,151643]}"#,
        )
        .unwrap();
        qwen.check().unwrap();
        assert!(qwen.qkv_bias() && !qwen.o_bias() && qwen.window().is_none());
        assert_eq!(qwen.eos_ids(), vec![151645, 151643]);
        // Qwen2-0.5B: 494M parameters.
        assert_eq!(qwen.num_parameters(), 494_032_768);
        // Qwen3-0.6B's config.json (trimmed): a head width of 128 over a 1024-wide stream.
        let qwen3: LlamaConfig = serde_json::from_str(
            r#"{"architectures":["Qwen3ForCausalLM"],"attention_bias":false,
            "attention_dropout":0.0,"bos_token_id":151643,"eos_token_id":151645,"head_dim":128,
            "hidden_act":"silu","hidden_size":1024,"initializer_range":0.02,
            "intermediate_size":3072,"max_position_embeddings":40960,"max_window_layers":28,
            "model_type":"qwen3","num_attention_heads":16,"num_hidden_layers":28,
            "num_key_value_heads":8,"rms_norm_eps":1e-06,"rope_scaling":null,
            "rope_theta":1000000,"sliding_window":null,"tie_word_embeddings":true,
            "torch_dtype":"bfloat16","use_cache":true,"use_sliding_window":false,
            "vocab_size":151936}"#,
        )
        .unwrap();
        qwen3.check().unwrap();
        assert!(qwen3.qk_norm() && !qwen3.qkv_bias() && !qwen3.o_bias());
        assert!(qwen3.window().is_none() && !qwen.qk_norm() && !llama.qk_norm());
        assert_eq!(qwen3.head_dim(), 128);
        // 596,049,920 as Hugging Face counts Qwen3-0.6B's safetensors.
        assert_eq!(qwen3.num_parameters(), 596_049_920);
        assert_eq!(qwen3.to_json()["architectures"][0], "Qwen3ForCausalLM");
        let mut biased = qwen3.clone();
        biased.attention_bias = Some(true);
        assert!(biased.check().unwrap_err().contains("attention_bias"));
        let mut windowed = qwen3.clone();
        windowed.use_sliding_window = Some(true);
        assert!(windowed.check().unwrap_err().contains("use_sliding_window"));
        // transformers 5 writes the rotary base and scaling as one object: it is what counts,
        // and the file written back also says it as transformers 4 reads it.
        let mut v5 = qwen3;
        v5.rope_theta = default_theta();
        v5.rope_parameters = Some(serde_json::json!({"rope_theta": 1e6, "rope_type": "linear",
            "factor": 2.0}));
        let want: Vec<f64> = (0..64)
            .map(|i| 1.0 / 1e6f64.powf((2 * i) as f64 / 128.0) / 2.0)
            .collect();
        assert_eq!(v5.rope_inv_freq().unwrap(), want);
        let written = v5.to_json();
        assert_eq!(written["rope_theta"], 1e6);
        assert_eq!(
            written["rope_scaling"],
            serde_json::json!({"rope_type": "linear", "factor": 2.0})
        );
        assert_eq!(written["rope_parameters"]["rope_theta"], 1e6);
    }

    #[test]
    fn refuses_what_it_cannot_train() {
        let mut c: LlamaConfig = serde_json::from_str(
            r#"{"vocab_size":10,"hidden_size":8,"intermediate_size":8,
            "num_hidden_layers":1,"num_attention_heads":2,"num_key_value_heads":3}"#,
        )
        .unwrap();
        assert!(c.check().unwrap_err().contains("num_key_value_heads"));
        c.num_key_value_heads = Some(1);
        c.check().unwrap();
        c.rope_scaling = Some(serde_json::json!({"type": "yarn", "factor": 4.0}));
        assert!(c.check().unwrap_err().contains("yarn"));
        c.rope_scaling = Some(serde_json::json!({"rope_type": "llama3", "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192}));
        c.check().unwrap();
        c.model_type = "gpt2".into();
        assert!(c.check().unwrap_err().contains("gpt2"));
    }
}
