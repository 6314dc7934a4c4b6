//! Greedy generation with a Hugging Face model directory (ours or a downloaded checkpoint),
//! using a key/value cache so each new token costs one position's forward pass.

use std::path::Path;

use candle_core::{D, DType, Tensor};

use super::config::{LlamaConfig, ids_of};
use super::model::{KvCache, Llama, Pass};
use super::weights::load_hf_weights;
use super::{TrainError, select_device, tokenizer};

/// A loaded model and tokenizer, ready to generate.
pub struct Generator {
    /// The model.
    pub model: Llama,
    /// Its tokenizer.
    pub tok: tokenizer::Tok,
    /// Ids that end generation.
    pub stop_ids: Vec<u32>,
}

impl Generator {
    /// Loads `config.json`, the weights and `tokenizer.json` from `dir`.
    pub fn load(dir: &Path) -> Result<Self, TrainError> {
        let cfg = LlamaConfig::load(&dir.join("config.json"))?;
        let device = match select_device(cfg!(feature = "cuda")) {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(error = %e, "no GPU; generating on the CPU");
                candle_core::Device::Cpu
            }
        };
        let tok = tokenizer::load(&dir.join("tokenizer.json"), &cfg.eos_ids())?;
        let mut stop_ids = cfg.eos_ids();
        let gen_cfg: Option<serde_json::Value> =
            std::fs::read_to_string(dir.join("generation_config.json"))
                .ok()
                .and_then(|t| serde_json::from_str(&t).ok());
        if let Some(g) = &gen_cfg {
            stop_ids.extend(ids_of(g.get("eos_token_id")));
        }
        stop_ids.extend(tok.eos);
        stop_ids.sort_unstable();
        stop_ids.dedup();
        let weights = load_hf_weights(dir, &device)?;
        let model = Llama::new(cfg, &weights, &device)?;
        Ok(Generator {
            model,
            tok,
            stop_ids,
        })
    }

    /// Greedy continuation of `prompt`, at most `max_tokens` tokens, stopping at an eos id or
    /// the model's context; returns the new text only.
    pub fn generate(&self, prompt: &str, max_tokens: usize) -> Result<String, TrainError> {
        let ids = self.tok.encode(prompt, true)?;
        if ids.is_empty() {
            return Err(TrainError::Tokenizer {
                path: "tokenizer.json".into(),
                reason: "the prompt encodes to no tokens".into(),
            });
        }
        let max_ctx = self.model.cfg.max_position_embeddings;
        if ids.len() >= max_ctx {
            return Err(TrainError::Context {
                tokens: ids.len(),
                max: max_ctx,
            });
        }
        let device = self.model.device().clone();
        let mut cache = KvCache::default();
        let mut input = ids.clone();
        let mut out = Vec::new();
        let mut pass = Pass::new(DType::F32, None);
        while out.len() < max_tokens && cache.len() + input.len() <= max_ctx {
            let start = cache.len();
            let t = Tensor::new(input.as_slice(), &device)?.unsqueeze(0)?;
            let logits = self.model.forward(&t, start, Some(&mut cache), &mut pass)?;
            let last = logits.squeeze(0)?.get(input.len() - 1)?;
            let next = last.argmax(D::Minus1)?.to_scalar::<u32>()?;
            if self.stop_ids.contains(&next) {
                break;
            }
            out.push(next);
            input = vec![next];
        }
        self.tok
            .inner
            .decode(&out, true)
            .map_err(|e| TrainError::Tokenizer {
                path: "tokenizer.json".into(),
                reason: format!("decoding failed: {e}"),
            })
    }
}

/// Loads the model in `model_dir` and greedily continues `prompt`.
pub fn generate(model_dir: &Path, prompt: &str, max_tokens: usize) -> Result<String, TrainError> {
    Generator::load(model_dir)?.generate(prompt, max_tokens)
}
