//! Greedy generation with a Hugging Face model directory (ours or a downloaded checkpoint),
//! using a key/value cache so each new token costs one position's forward pass.

use std::path::Path;

use candle_core::{D, DType, Tensor};

use super::config::{LlamaConfig, ids_of};
use super::model::{KvCache, Llama, Pass};
use super::weights::load_hf_weights;
use super::{TrainError, select_device, tokenizer};
use crate::chat::{ChatTemplate, END_OF_TURN_TOKENS};

/// A loaded model and tokenizer, ready to generate.
pub struct Generator {
    /// The model.
    pub model: Llama,
    /// Its tokenizer.
    pub tok: tokenizer::Tok,
    /// Ids that end generation.
    pub stop_ids: Vec<u32>,
    /// The chat template of the model's `tokenizer_config.json`, if any.
    pub chat_template: Option<String>,
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
        super::model::check_checkpoint(&cfg, &weights, dir)?;
        let model = Llama::new(cfg, &weights, &device)?;
        Ok(Generator {
            model,
            tok,
            stop_ids,
            chat_template: crate::chat::template_in_dir(dir),
        })
    }

    /// Greedy reply to one user `message`, rendered with the model's chat template and its
    /// generation prompt (as `apply_chat_template(..., add_generation_prompt=True)`); stops at
    /// an eos id or the end of the assistant's turn (`<|im_end|>`, `<|eot_id|>`, ...), as a
    /// token or as text. A `<think>` block the reply opens (or the prompt opened) is its
    /// reasoning, apart from the answer, as Ollama parses it; `max_tokens` counts both.
    pub fn chat(&self, message: &str, max_tokens: usize) -> Result<ChatReply, TrainError> {
        let source = self.chat_template.as_deref().ok_or_else(|| {
            TrainError::option(
                "chat_template",
                "the model has none (its tokenizer_config.json has no chat_template); give \
                 --prompt instead",
            )
        })?;
        let template = ChatTemplate::new(
            source,
            self.tok.bos_token.as_deref(),
            self.tok.eos_token.as_deref(),
        )
        .map_err(|e| TrainError::option("chat_template", e))?;
        let message = serde_json::json!({"role": "user", "content": message});
        let text = template
            .render(&[message], true)
            .map_err(|e| TrainError::option("chat_template", e))?;
        let ids = self.tok.encode(&text, false)?;
        let mut stop = self.stop_ids.clone();
        stop.extend(
            END_OF_TURN_TOKENS
                .iter()
                .filter_map(|t| self.tok.inner.token_to_id(t)),
        );
        let out = self.greedy(&ids, max_tokens, &stop)?;
        // The template's own end of turn too (`### END`), which no list of markers holds.
        let decoded = self.decode(&out)?;
        let mut reply = until_end_of_turn(&decoded);
        if let Some(end) = crate::chat::turn_end(&template)
            && let Some(at) = reply.find(&end)
        {
            reply = &reply[..at];
        }
        Ok(ChatReply::split(&text, reply.trim_end()))
    }

    fn decode(&self, ids: &[u32]) -> Result<String, TrainError> {
        self.tok
            .inner
            .decode(ids, true)
            .map_err(|e| TrainError::Tokenizer {
                path: "tokenizer.json".into(),
                reason: format!("decoding failed: {e}"),
            })
    }

    /// Greedy continuation of `prompt`, at most `max_tokens` tokens, stopping at an eos id or
    /// the model's context; returns the new text only.
    pub fn generate(&self, prompt: &str, max_tokens: usize) -> Result<String, TrainError> {
        let ids = self.tok.encode(prompt, true)?;
        let out = self.greedy(&ids, max_tokens, &self.stop_ids)?;
        self.decode(&out)
    }

    /// Greedy continuation of `prompt_ids` by ids, the loop of [`Generator::generate`]
    /// without its stop at eos: exactly `n` ids (an eos among them, and whatever follows it),
    /// fewer only when the model's context (`max_position_embeddings`) fills up, i.e. at most
    /// `max_position_embeddings + 1 - prompt_ids.len()` (the last id is never fed back). On the
    /// CPU a tie goes to the lowest id. For comparing with another runtime token by token.
    pub fn greedy_ids(&self, prompt_ids: &[u32], n: usize) -> Result<Vec<u32>, TrainError> {
        self.greedy(prompt_ids, n, &[])
    }

    /// Teacher-forced top-1: for each position `i` of `ids`, the argmax of the logits after
    /// `ids[..=i]`, from one forward pass over the whole sequence (no cache). `ids` must fit
    /// the model's context.
    pub fn top1_ids(&self, ids: &[u32]) -> Result<Vec<u32>, TrainError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let t = Tensor::new(ids, self.model.device())?.unsqueeze(0)?;
        let mut pass = Pass::new(DType::F32, None);
        let logits = self.model.forward(&t, 0, None, &mut pass)?;
        Ok(logits.squeeze(0)?.argmax(D::Minus1)?.to_vec1::<u32>()?)
    }

    /// Up to `max_tokens` argmax ids after `prompt_ids`, ending before any of `stop` or when
    /// the context is full; each step after the prompt is one position's forward pass.
    fn greedy(
        &self,
        prompt_ids: &[u32],
        max_tokens: usize,
        stop: &[u32],
    ) -> Result<Vec<u32>, TrainError> {
        if prompt_ids.is_empty() {
            return Err(TrainError::Tokenizer {
                path: "tokenizer.json".into(),
                reason: "the prompt encodes to no tokens".into(),
            });
        }
        let max_ctx = self.model.cfg.max_position_embeddings;
        if prompt_ids.len() >= max_ctx {
            return Err(TrainError::Context {
                tokens: prompt_ids.len(),
                max: max_ctx,
            });
        }
        let device = self.model.device().clone();
        let mut cache = KvCache::default();
        let mut input = prompt_ids.to_vec();
        let mut out = Vec::new();
        let mut pass = Pass::new(DType::F32, None);
        while out.len() < max_tokens && cache.len() + input.len() <= max_ctx {
            let start = cache.len();
            let t = Tensor::new(input.as_slice(), &device)?.unsqueeze(0)?;
            let logits = self.model.forward(&t, start, Some(&mut cache), &mut pass)?;
            let last = logits.squeeze(0)?.get(input.len() - 1)?;
            let next = last.argmax(D::Minus1)?.to_scalar::<u32>()?;
            if stop.contains(&next) {
                break;
            }
            out.push(next);
            input = vec![next];
        }
        Ok(out)
    }
}

/// `text` up to the first end-of-turn marker: a tokenizer without the marker as one token
/// spells it out, so the stop ids never see it.
/// A chat reply: the answer, and the reasoning of a `<think>` block before it, if any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatReply {
    /// The reasoning (`None` without a think block; empty for Qwen3's empty one).
    pub thinking: Option<String>,
    /// What follows the reasoning; empty when the reply stopped inside it.
    pub answer: String,
    /// The reply stopped inside its think block (`max_tokens` ran out there).
    pub unfinished_thinking: bool,
}

impl ChatReply {
    /// Splits `reply` after `prompt`: a think block the prompt opens (Qwen3's Thinking
    /// models, QwQ) or the reply opens (Qwen3's own, often the empty
    /// `<think>\n\n</think>\n\n` its template trains) is reasoning up to `</think>`.
    pub fn split(prompt: &str, reply: &str) -> Self {
        const OPEN: &str = "<think>";
        const CLOSE: &str = "</think>";
        let body = if prompt.trim_end().ends_with(OPEN) {
            reply
        } else if let Some(rest) = reply.trim_start().strip_prefix(OPEN) {
            rest
        } else {
            return ChatReply {
                thinking: None,
                answer: reply.to_string(),
                unfinished_thinking: false,
            };
        };
        let (thinking, answer, unfinished) = match body.find(CLOSE) {
            Some(at) => (&body[..at], &body[at + CLOSE.len()..], false),
            None => (body, "", true),
        };
        ChatReply {
            thinking: Some(thinking.trim().to_string()),
            answer: answer.trim_start().to_string(),
            unfinished_thinking: unfinished,
        }
    }
}

fn until_end_of_turn(text: &str) -> &str {
    let end = END_OF_TURN_TOKENS
        .iter()
        .filter_map(|t| text.find(t))
        .min()
        .unwrap_or(text.len());
    &text[..end]
}

/// Loads the model in `model_dir` and greedily continues `prompt`.
pub fn generate(model_dir: &Path, prompt: &str, max_tokens: usize) -> Result<String, TrainError> {
    Generator::load(model_dir)?.generate(prompt, max_tokens)
}

/// Loads the model in `model_dir` and greedily replies to the user message `message`.
pub fn chat(model_dir: &Path, message: &str, max_tokens: usize) -> Result<ChatReply, TrainError> {
    Generator::load(model_dir)?.chat(message, max_tokens)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::model::init_weights;
    use crate::train::rng::Rng;

    #[test]
    fn a_think_block_is_split_from_the_answer() {
        let split = |prompt: &str, reply: &str| {
            let r = ChatReply::split(prompt, reply);
            (r.thinking, r.answer, r.unfinished_thinking)
        };
        let asked = "<|im_start|>assistant\n";
        // Qwen3's empty block (what its template trains non-reasoning replies with).
        assert_eq!(
            split(asked, "<think>\n\n</think>\n\nb c d e"),
            (Some(String::new()), "b c d e".into(), false)
        );
        assert_eq!(
            split(asked, "<think>\nShift by one.\n</think>\n\nb c d e"),
            (Some("Shift by one.".into()), "b c d e".into(), false)
        );
        // The prompt opened it (Thinking-2507, QwQ): the reply starts inside.
        assert_eq!(
            split(
                "<|im_start|>assistant\n<think>\n",
                "\nShift.\n</think>\n\nb c"
            ),
            (Some("Shift.".into()), "b c".into(), false)
        );
        // Stopped inside the reasoning: no answer yet, and said so.
        assert_eq!(
            split(asked, "<think>\nShift by"),
            (Some("Shift by".into()), String::new(), true)
        );
        // No block: the reply is the answer, a `<think>` later in it included.
        assert_eq!(split(asked, "b c d e"), (None, "b c d e".into(), false));
        assert_eq!(
            split(asked, "say <think> </think>"),
            (None, "say <think> </think>".into(), false)
        );
    }

    /// A random 2-layer model (weights of std 0.5, so logits are far apart and argmaxes are
    /// not decided by rounding) with a byte-level tokenizer; eos is id 0.
    fn tiny() -> Generator {
        let cfg: LlamaConfig = serde_json::from_value(serde_json::json!({
            "vocab_size": 300, "hidden_size": 16, "intermediate_size": 32,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "max_position_embeddings": 12, "initializer_range": 0.5, "eos_token_id": 0
        }))
        .unwrap();
        let dev = candle_core::Device::Cpu;
        let weights = init_weights(&cfg, &mut Rng::new(3), &dev).unwrap();
        let texts = (0..50).map(|i| format!("shift a b {i} = b c\n"));
        let tok = tokenizer::train_bpe(texts, 300, Path::new("t")).unwrap();
        Generator {
            model: Llama::new(cfg, &weights, &dev).unwrap(),
            tok,
            stop_ids: vec![0],
            chat_template: None,
        }
    }

    #[test]
    fn a_reply_ends_at_an_end_of_turn_marker_spelled_out() {
        assert_eq!(
            until_end_of_turn("w w s s<|im_end|>\n<|im_start|>user"),
            "w w s s"
        );
        assert_eq!(until_end_of_turn("a<|eot_id|>b<|im_end|>"), "a");
        assert_eq!(until_end_of_turn("no marker"), "no marker");
    }

    /// `greedy_ids` (cached, one position per step) continues the prompt with the top-1 that
    /// one uncached pass over prompt + continuation gives at each position, does not stop at
    /// eos, and stops at the context's end; `generate` is the same loop cut at a stop id.
    #[test]
    fn greedy_ids_is_the_teacher_forced_top1_of_its_own_continuation() {
        let g = tiny();
        let prompt = [5u32, 17, 42];
        let ctx = g.model.cfg.max_position_embeddings;
        let cont = g.greedy_ids(&prompt, 100).unwrap();
        // The last id is predicted from a full context, never fed back.
        assert_eq!(
            cont.len(),
            ctx + 1 - prompt.len(),
            "runs until the context is full"
        );
        assert_eq!(g.greedy_ids(&prompt, 4).unwrap(), cont[..4]);
        let all: Vec<u32> = prompt
            .iter()
            .chain(&cont[..cont.len() - 1])
            .copied()
            .collect();
        let top1 = g.top1_ids(&all).unwrap();
        assert_eq!(top1.len(), all.len());
        assert_eq!(top1[prompt.len() - 1..], cont[..]);
        assert!(g.top1_ids(&[]).unwrap().is_empty());
        assert!(g.greedy_ids(&[], 3).is_err());

        // A stop id ends `generate` (which decodes what came before it), not `greedy_ids`.
        let ids = g.tok.encode("shift a b", true).unwrap();
        let cont = g.greedy_ids(&ids, 5).unwrap();
        let cut = cont.iter().position(|&t| t == cont[2]).unwrap();
        let g = Generator {
            stop_ids: vec![cont[2]],
            ..tiny()
        };
        assert_eq!(g.greedy_ids(&ids, 5).unwrap(), cont);
        let want = g.tok.inner.decode(&cont[..cut], true).unwrap();
        assert_eq!(g.generate("shift a b", 5).unwrap(), want);
    }
}
