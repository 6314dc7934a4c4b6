//! Training and evaluation data: reading plain text and JSON lines, tokenizing (with a cache
//! in the job directory), the eval split, the seeded order of examples and batching.
//!
//! - Plain text: the file's lines are tokenized one by one (each keeps its newline) and their
//!   tokens concatenated into one stream, which is cut into `block_size` blocks; a tail
//!   shorter than a block is dropped (as `TextDataset` does). Blocks therefore span lines.
//! - JSON lines: each line is one example, `{"text"}` (loss on every token) or
//!   `{"prompt", "completion"}` (loss only on the completion), followed by the eos token, or
//!   `{"messages": [...]}`, a conversation rendered with the chat template (loss only on the
//!   assistant's replies, see [`super::chat`]; the template ends each turn, so no eos is
//!   added); cut at `block_size` tokens. Blank lines are skipped.
//!
//! The data order is a function of the seed, the epoch and the step alone, so a resumed run
//! seeks straight to its position instead of replaying batches.

use std::path::Path;

use candle_core::{Device, Tensor};
use sha2::{Digest, Sha256};

use super::TrainError;
use super::rng::Rng;
use super::tokenizer::Tok;
use super::weights::write_atomic;
use crate::chat::ChatTemplate;
use crate::spec::train::DataFormat;

/// One tokenized example.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    /// Token ids, at most `block_size` of them.
    pub ids: Vec<u32>,
    /// Ranges of token indices that count in the loss, ascending and disjoint: all of them
    /// for text, the completion for prompt/completion, each reply for a conversation.
    pub targets: Vec<(u32, u32)>,
}

impl Example {
    /// An example whose tokens from `start` on count in the loss.
    pub fn from(ids: Vec<u32>, start: usize) -> Self {
        let end = ids.len() as u32;
        Example {
            targets: vec![(start as u32, end)],
            ids,
        }
    }

    /// Positions whose next token is predicted with loss (the first token never is).
    pub fn labelled(&self) -> usize {
        self.targets
            .iter()
            .map(|&(a, b)| (b as usize).saturating_sub((a as usize).max(1)))
            .sum()
    }

    /// Cuts the example at `block` tokens; whether it was longer.
    fn truncate(&mut self, block: usize) -> bool {
        if self.ids.len() <= block {
            return false;
        }
        self.ids.truncate(block);
        let end = block as u32;
        self.targets.retain(|&(a, _)| a < end);
        if let Some(last) = self.targets.last_mut() {
            last.1 = last.1.min(end);
        }
        true
    }
}

/// A tokenized file.
#[derive(Debug, Clone, Default)]
pub struct Dataset {
    /// Examples in file order.
    pub examples: Vec<Example>,
    /// Hex SHA-256 of the file and the tokenization settings (the cache key).
    pub key: String,
    /// Whether any example is a conversation (rendered with the chat template).
    pub chat: bool,
}

/// Reads and tokenizes `path`, or reads the result from the cache in `cache_dir`.
/// Conversations are rendered with `chat`; without one, a conversation is an error.
pub fn load(
    path: &Path,
    format: DataFormat,
    tok: &Tok,
    chat: Option<&ChatTemplate>,
    block_size: usize,
    cache_dir: &Path,
) -> Result<Dataset, TrainError> {
    let bytes = std::fs::read(path).map_err(|e| TrainError::io(path, e))?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(TrainError::Data {
            path: path.to_path_buf(),
            line: None,
            reason: "the file is empty".into(),
        });
    }
    let jsonl = format.reads_jsonl(path);
    let mut h = Sha256::new();
    h.update(b"jobd-tokenized-v2\0");
    h.update(if jsonl { b"jsonl" } else { b"text\0" });
    h.update((block_size as u64).to_le_bytes());
    h.update(tok.to_json()?.as_bytes());
    h.update([tok.eos.is_some() as u8]);
    h.update(tok.eos.unwrap_or(0).to_le_bytes());
    // The template, and the special tokens it may insert, decide how conversations read.
    for part in chat.map_or(["", "", ""], |c| [c.source(), c.bos_token(), c.eos_token()]) {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part.as_bytes());
    }
    h.update(&bytes);
    let key = hex::encode(h.finalize());
    let cache = cache_dir.join(format!("tokenized-{}.bin", &key[..16]));
    if let Some((examples, chat)) = read_cache(&cache, &key) {
        tracing::info!(file = %path.display(), cache = %cache.display(), "tokenized data from cache");
        return Ok(Dataset {
            examples,
            key,
            chat,
        });
    }
    let text = utf8(path, bytes)?;
    // A byte-order mark (Windows tools write one) is not part of the data.
    let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
    let (examples, has_chat) = if jsonl {
        tokenize_jsonl(path, text, tok, chat, block_size)?
    } else {
        (tokenize_text(path, text, tok, block_size)?, false)
    };
    if examples.is_empty() {
        return Err(TrainError::Data {
            path: path.to_path_buf(),
            line: None,
            reason: if jsonl {
                "no examples with tokens to learn".into()
            } else {
                format!("shorter than one block of data.block_size = {block_size} tokens")
            },
        });
    }
    if std::fs::create_dir_all(cache_dir).is_ok()
        && let Err(e) = write_atomic(&cache, &encode_cache(&key, &examples, has_chat))
    {
        tracing::warn!(error = %e, "could not write the tokenized-data cache");
    }
    Ok(Dataset {
        examples,
        key,
        chat: has_chat,
    })
}

/// Reads a data file as text; bytes that are not UTF-8 are an error naming their line.
pub fn read_text(path: &Path) -> Result<String, TrainError> {
    let bytes = std::fs::read(path).map_err(|e| TrainError::io(path, e))?;
    utf8(path, bytes)
}

fn utf8(path: &Path, bytes: Vec<u8>) -> Result<String, TrainError> {
    String::from_utf8(bytes).map_err(|e| {
        let at = e.utf8_error().valid_up_to();
        let bytes = e.as_bytes();
        let line = bytes[..at].iter().filter(|&&b| b == b'\n').count() + 1;
        TrainError::Data {
            path: path.to_path_buf(),
            line: Some(line),
            reason: format!("not UTF-8 text (byte {at} of the file); save it as UTF-8"),
        }
    })
}

fn tokenize_text(
    path: &Path,
    text: &str,
    tok: &Tok,
    block: usize,
) -> Result<Vec<Example>, TrainError> {
    let lines: Vec<&str> = text.split_inclusive('\n').collect();
    let encodings = tok
        .inner
        .encode_batch(lines, false)
        .map_err(|e| TrainError::Tokenizer {
            path: path.to_path_buf(),
            reason: format!("encoding failed: {e}"),
        })?;
    let stream: Vec<u32> = encodings
        .iter()
        .flat_map(|e| e.get_ids().iter().copied())
        .collect();
    Ok(stream
        .chunks_exact(block)
        .map(|c| Example::from(c.to_vec(), 0))
        .collect())
}

fn tokenize_jsonl(
    path: &Path,
    text: &str,
    tok: &Tok,
    chat: Option<&ChatTemplate>,
    block: usize,
) -> Result<(Vec<Example>, bool), TrainError> {
    let mut out = Vec::new();
    let (mut truncated, mut unlearnable, mut has_chat) = (0usize, 0usize, false);
    let mut last_only = 0usize;
    let mut untrained: Vec<usize> = Vec::new();
    // Conversations calling tools, with a template that never mentions them.
    let mut tools_unrendered = 0usize;
    let renders_tools = chat.is_some_and(|c| c.source().contains("tool_calls"));
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let bad = |reason: String| TrainError::Data {
            path: path.to_path_buf(),
            line: Some(i + 1),
            reason,
        };
        let v: serde_json::Value =
            serde_json::from_str(line).map_err(|e| bad(format!("invalid JSON: {e}")))?;
        let field = |k: &str| -> Result<Option<&str>, TrainError> {
            match v.get(k) {
                None => Ok(None),
                Some(serde_json::Value::String(s)) => Ok(Some(s.as_str())),
                Some(_) => Err(bad(format!("\"{k}\" must be a string"))),
            }
        };
        let mut ex = match (
            field("text")?,
            field("prompt")?,
            field("completion")?,
            v.get("messages"),
        ) {
            (Some(t), None, None, None) => {
                let mut ids = tok.encode(t, true)?;
                ids.extend(tok.eos);
                Example::from(ids, 0)
            }
            (None, Some(p), Some(c), None) => {
                let mut ids = tok.encode(p, true)?;
                let start = ids.len();
                ids.extend(tok.encode(c, false)?);
                ids.extend(tok.eos);
                Example::from(ids, start)
            }
            (None, None, None, Some(m)) => {
                let chat = chat.ok_or_else(|| {
                    bad(
                        "a conversation (\"messages\"), but the model has no chat template: \
                         set data.chat_template to a Jinja template file"
                            .into(),
                    )
                })?;
                has_chat = true;
                let drops_tools = !renders_tools
                    && m.as_array()
                        .is_some_and(|l| l.iter().any(crate::chat::calls_tools));
                tools_unrendered += drops_tools as usize;
                let (ex, only_last) = conversation(chat, tok, m).map_err(|e| {
                    bad(if drops_tools {
                        format!(
                            "{e} (the conversation calls tools, which this chat template does \
                             not render; set data.chat_template to one that does)"
                        )
                    } else {
                        e
                    })
                })?;
                last_only += only_last as usize;
                ex
            }
            _ => {
                return Err(bad(
                    "expected {\"text\": ...}, {\"prompt\": ..., \"completion\": ...} or \
                     {\"messages\": [{\"role\": ..., \"content\": ...}, ...]}"
                        .into(),
                ));
            }
        };
        if ex.labelled() == 0 {
            // A conversation with no reply to train (none, or all of weight 0).
            untrained.push(i + 1);
            continue;
        }
        truncated += ex.truncate(block) as usize;
        if ex.labelled() == 0 {
            unlearnable += 1;
            continue;
        }
        out.push(ex);
    }
    if truncated > 0 {
        tracing::warn!(file = %path.display(), truncated, "examples cut at data.block_size tokens");
    }
    if last_only > 0 {
        tracing::warn!(file = %path.display(), conversations = last_only,
            "the chat template renders earlier turns differently once later ones follow (as \
             Qwen3's drops their reasoning): only these conversations' last reply is trained");
    }
    if unlearnable > 0 {
        tracing::warn!(file = %path.display(), skipped = unlearnable,
            "examples skipped: no completion or reply token left within data.block_size");
    }
    if tools_unrendered > 0 {
        tracing::warn!(file = %path.display(), conversations = tools_unrendered,
            "conversations call tools (\"tool_calls\"), which the chat template does not render \
             (the default ChatML does not): their calls are not trained; set \
             data.chat_template to a template that renders them");
    }
    if !untrained.is_empty() {
        let first: Vec<String> = untrained.iter().take(10).map(|l| l.to_string()).collect();
        tracing::warn!(file = %path.display(), skipped = untrained.len(),
            lines = %format!("{}{}", first.join(", "), if untrained.len() > 10 { ", ..." } else { "" }),
            "conversations skipped: no assistant reply to train (none, or all of weight 0)");
    }
    Ok((out, has_chat))
}

/// A conversation's tokens, with its replies as targets, and whether only its last reply is
/// trained. The rendering is tokenized whole, without added specials (the template writes
/// them, as `apply_chat_template` does).
fn conversation(
    chat: &ChatTemplate,
    tok: &Tok,
    messages: &serde_json::Value,
) -> Result<(Example, bool), String> {
    let messages = crate::chat::check_messages(messages)?;
    let rendered = chat.conversation(messages)?;
    let enc = tok
        .inner
        .encode(rendered.text.as_str(), false)
        .map_err(|e| format!("tokenizing the rendered conversation: {e}"))?;
    let targets = crate::chat::trained_tokens(enc.get_offsets(), &rendered.trained)
        .into_iter()
        .map(|r| (r.start as u32, r.end as u32))
        .collect();
    let ex = Example {
        ids: enc.get_ids().to_vec(),
        targets,
    };
    Ok((ex, rendered.last_only))
}

const CACHE_MAGIC: &[u8; 8] = b"JOBDTOK2";

fn encode_cache(key: &str, examples: &[Example], chat: bool) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(CACHE_MAGIC);
    out.extend_from_slice(key.as_bytes());
    out.push(chat as u8);
    out.extend_from_slice(&(examples.len() as u64).to_le_bytes());
    for e in examples {
        out.extend_from_slice(&(e.ids.len() as u32).to_le_bytes());
        out.extend_from_slice(&(e.targets.len() as u32).to_le_bytes());
        for &(a, b) in &e.targets {
            out.extend_from_slice(&a.to_le_bytes());
            out.extend_from_slice(&b.to_le_bytes());
        }
        for id in &e.ids {
            out.extend_from_slice(&id.to_le_bytes());
        }
    }
    out
}

fn read_cache(path: &Path, key: &str) -> Option<(Vec<Example>, bool)> {
    let bytes = std::fs::read(path).ok()?;
    let mut rest = bytes.strip_prefix(CACHE_MAGIC.as_slice())?;
    rest = rest.strip_prefix(key.as_bytes())?;
    let mut take = |n: usize| -> Option<&[u8]> {
        let (a, b) = (rest.get(..n)?, rest.get(n..)?);
        rest = b;
        Some(a)
    };
    let u32_at = |b: &[u8]| u32::from_le_bytes(b.try_into().expect("4 bytes"));
    let chat = take(1)?[0] != 0;
    let n = u64::from_le_bytes(take(8)?.try_into().ok()?) as usize;
    let mut out = Vec::with_capacity(n.min(1 << 24));
    for _ in 0..n {
        let len = u32_at(take(4)?) as usize;
        let spans = u32_at(take(4)?) as usize;
        let targets = take(spans.checked_mul(8)?)?
            .chunks_exact(8)
            .map(|c| (u32_at(&c[..4]), u32_at(&c[4..])))
            .collect();
        let ids = take(len.checked_mul(4)?)?
            .chunks_exact(4)
            .map(u32_at)
            .collect();
        out.push(Example { ids, targets });
    }
    rest.is_empty().then_some((out, chat))
}

/// Splits off a fraction of `examples` for evaluation, chosen with `seed`; both parts keep
/// file order.
pub fn split(
    examples: Vec<Example>,
    fraction: f64,
    seed: u64,
    path: &Path,
) -> Result<(Vec<Example>, Vec<Example>), TrainError> {
    let n = examples.len();
    if n < 2 {
        return Err(TrainError::option(
            "data.eval_split",
            format!(
                "{} has {n} example(s); a split needs at least 2",
                path.display()
            ),
        ));
    }
    let n_eval = ((n as f64 * fraction).round() as usize).clamp(1, n - 1);
    let perm = Rng::derive(seed, "eval_split", 0).permutation(n);
    let mut is_eval = vec![false; n];
    for &i in &perm[..n_eval] {
        is_eval[i] = true;
    }
    let (mut train, mut eval) = (Vec::new(), Vec::new());
    for (i, e) in examples.into_iter().enumerate() {
        if is_eval[i] { &mut eval } else { &mut train }.push(e);
    }
    Ok((train, eval))
}

/// Which examples each optimizer step uses. Each epoch visits the training examples in a
/// seeded random order; an epoch has `micro_per_epoch` micro-batches (the last may be
/// smaller) grouped into `steps_per_epoch` steps of up to `accum` micro-batches (the last
/// group may be smaller). Step `s` is thus epoch `s / steps_per_epoch`, group
/// `s % steps_per_epoch`: a position is computed, never replayed.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Training examples.
    pub n_examples: usize,
    /// Examples per micro-batch.
    pub batch: usize,
    /// Micro-batches per optimizer step.
    pub accum: usize,
    /// Seed of the order.
    pub seed: u64,
    /// Micro-batches in one epoch.
    pub micro_per_epoch: usize,
    /// Optimizer steps in one epoch.
    pub steps_per_epoch: u64,
    /// Optimizer steps in the whole run.
    pub total_steps: u64,
}

/// Where in the data a step starts (saved in checkpoints for inspection and checked).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Position {
    /// 0-based epoch.
    pub epoch: u64,
    /// Index of the next micro-batch within the epoch's order.
    pub micro_batch: u64,
}

impl Plan {
    /// The plan for `n_examples` examples. `max_steps > 0` fixes the steps; otherwise
    /// `ceil(epochs · steps_per_epoch)`.
    pub fn new(
        n_examples: usize,
        batch: usize,
        accum: usize,
        seed: u64,
        epochs: f64,
        max_steps: i64,
    ) -> Self {
        let micro_per_epoch = n_examples.div_ceil(batch).max(1);
        let steps_per_epoch = micro_per_epoch.div_ceil(accum).max(1) as u64;
        let total_steps = if max_steps > 0 {
            max_steps as u64
        } else {
            ((epochs * steps_per_epoch as f64).ceil() as u64).max(1)
        };
        Plan {
            n_examples,
            batch,
            accum,
            seed,
            micro_per_epoch,
            steps_per_epoch,
            total_steps,
        }
    }

    /// The seeded order of examples in `epoch`.
    pub fn order(&self, epoch: u64) -> Vec<usize> {
        Rng::derive(self.seed, "shuffle", epoch).permutation(self.n_examples)
    }

    /// The data position at the start of step `step` (0-based).
    pub fn position(&self, step: u64) -> Position {
        Position {
            epoch: step / self.steps_per_epoch,
            micro_batch: (step % self.steps_per_epoch) * self.accum as u64,
        }
    }

    /// Fractional epochs completed after `steps` steps.
    pub fn epoch_after(&self, steps: u64) -> f64 {
        steps as f64 / self.steps_per_epoch as f64
    }

    /// The micro-batches (lists of example indices) of step `step`, given that epoch's order.
    pub fn micro_batches(&self, step: u64, order: &[usize]) -> Vec<Vec<usize>> {
        let pos = self.position(step);
        let first = pos.micro_batch as usize;
        let last = (first + self.accum).min(self.micro_per_epoch);
        (first..last)
            .map(|m| {
                let lo = m * self.batch;
                let hi = (lo + self.batch).min(self.n_examples);
                order[lo..hi].to_vec()
            })
            .collect()
    }
}

/// An example's text with its trained tokens in `⟦ ⟧`, cut after `max_chars` characters.
pub fn marked(e: &Example, tok: &Tok, max_chars: usize) -> String {
    let decode = |ids: &[u32]| tok.inner.decode(ids, false).unwrap_or_default();
    let mut out = String::new();
    let mut at = 0usize;
    for &(a, b) in &e.targets {
        let (a, b) = (a as usize, (b as usize).min(e.ids.len()));
        out.push_str(&decode(&e.ids[at..a]));
        out.push('⟦');
        out.push_str(&decode(&e.ids[a..b]));
        out.push('⟧');
        at = b;
    }
    out.push_str(&decode(&e.ids[at.min(e.ids.len())..]));
    match out.char_indices().nth(max_chars) {
        Some((cut, _)) => format!("{}… ({} tokens)", &out[..cut], e.ids.len()),
        None => out,
    }
}

/// A padded micro-batch on the device.
pub struct Batch {
    /// Input ids `(B, T)`.
    pub ids: Tensor,
    /// Next-token labels `(B, T)` (0 where masked).
    pub labels: Tensor,
    /// 1.0 where the label counts, `(B, T)`.
    pub mask: Tensor,
    /// Number of labelled positions.
    pub labelled: usize,
    /// Number of real (non-padding) input tokens.
    pub tokens: usize,
}

/// Builds a batch from examples, right-padded with `pad` to the longest one. Position `t`'s
/// label is token `t+1`, counted when `t+1` is in one of the example's targets.
pub fn batch(examples: &[&Example], pad: u32, device: &Device) -> Result<Batch, TrainError> {
    let t = examples
        .iter()
        .map(|e| e.ids.len())
        .max()
        .unwrap_or(1)
        .max(1);
    let b = examples.len();
    let mut ids = vec![pad; b * t];
    let mut labels = vec![0u32; b * t];
    let mut mask = vec![0f32; b * t];
    let (mut labelled, mut tokens) = (0, 0);
    for (r, e) in examples.iter().enumerate() {
        let row = r * t;
        ids[row..row + e.ids.len()].copy_from_slice(&e.ids);
        tokens += e.ids.len();
        for &(a, b) in &e.targets {
            // Token `q` is predicted at position `q - 1`.
            for q in (a as usize).max(1)..(b as usize).min(e.ids.len()) {
                labels[row + q - 1] = e.ids[q];
                mask[row + q - 1] = 1.0;
                labelled += 1;
            }
        }
    }
    Ok(Batch {
        ids: Tensor::from_vec(ids, (b, t), device)?,
        labels: Tensor::from_vec(labels, (b, t), device)?,
        mask: Tensor::from_vec(mask, (b, t), device)?,
        labelled,
        tokens,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::tokenizer::train_bpe;

    fn tok() -> Tok {
        let texts = (0..50).map(|i| format!("hello world {i}\nprompt => answer\n"));
        train_bpe(texts, 280, Path::new("t")).unwrap()
    }

    #[test]
    fn text_is_cut_into_full_blocks_and_cached() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("a.txt");
        std::fs::write(&f, "hello world 1\nhello world 2\nhello world 3\n").unwrap();
        let t = tok();
        let all = t.encode("hello world 1\n", false).unwrap().len()
            + t.encode("hello world 2\n", false).unwrap().len()
            + t.encode("hello world 3\n", false).unwrap().len();
        let d = load(&f, DataFormat::Auto, &t, None, 4, dir.path()).unwrap();
        assert_eq!(d.examples.len(), all / 4);
        assert!(
            d.examples
                .iter()
                .all(|e| e.ids.len() == 4 && e.targets == [(0, 4)])
        );
        let cached = std::fs::read_dir(dir.path())
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .starts_with("tokenized-")
            })
            .count();
        assert_eq!(cached, 1);
        let again = load(&f, DataFormat::Auto, &t, None, 4, dir.path()).unwrap();
        assert_eq!(again.examples, d.examples);
        let e = load(&f, DataFormat::Text, &t, None, 1000, dir.path()).unwrap_err();
        assert!(e.to_string().contains("shorter than one block"), "{e}");
    }

    #[test]
    fn jsonl_masks_the_prompt_and_reports_bad_lines() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("a.jsonl");
        std::fs::write(
            &f,
            "{\"prompt\":\"prompt =>\",\"completion\":\" answer\"}\n\n{\"text\":\"hello\"}\n",
        )
        .unwrap();
        let t = tok();
        let d = load(&f, DataFormat::Auto, &t, None, 64, dir.path()).unwrap();
        assert_eq!(d.examples.len(), 2);
        let p = t.encode("prompt =>", true).unwrap();
        let ex = &d.examples[0];
        assert_eq!(ex.targets, [(p.len() as u32, ex.ids.len() as u32)]);
        assert_eq!(*ex.ids.last().unwrap(), t.eos.unwrap());
        let b = batch(&[ex, &d.examples[1]], 0, &Device::Cpu).unwrap();
        let mask = b.mask.to_vec2::<f32>().unwrap();
        // Labels start at the completion's first token.
        assert_eq!(mask[0][p.len() - 2], 0.0);
        assert_eq!(mask[0][p.len() - 1], 1.0);
        assert_eq!(
            b.labelled,
            ex.ids.len() - p.len() + d.examples[1].ids.len() - 1
        );
        std::fs::write(&f, "{\"text\":\"a\"}\n{\"prompt\":\"x\"}\n").unwrap();
        let e = load(&f, DataFormat::Auto, &t, None, 64, dir.path())
            .unwrap_err()
            .to_string();
        assert!(e.contains("a.jsonl:2:") && e.contains("expected"), "{e}");
        std::fs::write(&f, "  \n").unwrap();
        let e = load(&f, DataFormat::Auto, &t, None, 64, dir.path())
            .unwrap_err()
            .to_string();
        assert!(e.contains("empty"), "{e}");
    }

    #[test]
    fn conversations_train_on_replies_only_and_cache_with_their_template() {
        use crate::chat::{CHATML, CHATML_TOKENS, ChatTemplate};
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.jsonl");
        let conv = serde_json::json!({"messages": [
            {"role": "user", "content": "hello world 1"},
            {"role": "assistant", "content": "prompt => answer"},
            {"role": "user", "content": "hello world 2"},
            {"role": "assistant", "content": "answer", "weight": 0},
            {"role": "user", "content": "hello world 3"},
            {"role": "assistant", "content": "hello"},
        ]});
        // The third line has no reply to train: skipped, not an error.
        let untrained = serde_json::json!({"messages": [
            {"role": "user", "content": "hello"},
            {"role": "assistant", "content": "hi", "weight": 0},
        ]});
        std::fs::write(&f, format!("{conv}\n{{\"text\":\"hello\"}}\n{untrained}\n")).unwrap();
        let texts = (0..50).map(|i| format!("hello world {i}\nprompt => answer\n"));
        let t = crate::train::tokenizer::train_bpe_with(texts, 290, Path::new("t"), &CHATML_TOKENS)
            .unwrap();
        let chat = ChatTemplate::new(CHATML, None, None).unwrap();
        let e = load(&f, DataFormat::Auto, &t, None, 256, dir.path()).unwrap_err();
        assert!(
            e.to_string().contains("c.jsonl:1:") && e.to_string().contains("chat_template"),
            "{e}"
        );
        let d = load(&f, DataFormat::Auto, &t, Some(&chat), 256, dir.path()).unwrap();
        assert!(d.chat);
        let ex = &d.examples[0];
        // Exactly the trained replies' tokens are targets, decoded back to their text.
        let decode = |ids: &[u32]| t.inner.decode(ids, false).unwrap();
        let trained: Vec<String> = ex
            .targets
            .iter()
            .map(|&(a, b)| decode(&ex.ids[a as usize..b as usize]))
            .collect();
        assert_eq!(
            trained,
            ["prompt => answer<|im_end|>\n", "hello<|im_end|>\n"]
        );
        assert_eq!(
            marked(ex, &t, 10_000),
            "<|im_start|>user\nhello world 1<|im_end|>\n<|im_start|>assistant\n⟦prompt => \
             answer<|im_end|>\n⟧<|im_start|>user\nhello world 2<|im_end|>\n<|im_start|>assistant\n\
             answer<|im_end|>\n<|im_start|>user\nhello world 3<|im_end|>\n<|im_start|>assistant\n\
             ⟦hello<|im_end|>\n⟧"
        );
        assert!(marked(ex, &t, 20).ends_with(&format!("… ({} tokens)", ex.ids.len())));
        let b = batch(&[ex], 0, &Device::Cpu).unwrap();
        assert_eq!(b.labelled, ex.labelled());
        assert_eq!(
            b.labelled,
            ex.targets
                .iter()
                .map(|&(a, b)| (b - a) as usize)
                .sum::<usize>()
        );
        // The cache holds the targets and that the data is chat; another template misses it.
        let again = load(&f, DataFormat::Auto, &t, Some(&chat), 256, dir.path()).unwrap();
        assert_eq!((again.examples, again.chat), (d.examples.clone(), true));
        let other = ChatTemplate::new(&CHATML.replace("\\n", " "), None, None).unwrap();
        let d2 = load(&f, DataFormat::Auto, &t, Some(&other), 256, dir.path()).unwrap();
        assert_ne!(d2.key, d.key);
        // Cut at the block size, a reply keeps only the tokens inside it.
        let full = &d.examples[0].targets;
        let block = full[1].0 as usize + 1;
        let short = load(&f, DataFormat::Auto, &t, Some(&chat), block, dir.path()).unwrap();
        let ex = &short.examples[0];
        assert_eq!(ex.ids.len(), block);
        assert_eq!(ex.targets, [full[0], (full[1].0, full[1].0 + 1)]);
        // Cut before any reply, the conversation teaches nothing and is skipped.
        let none = load(&f, DataFormat::Auto, &t, Some(&chat), 4, dir.path()).unwrap();
        assert_eq!(none.examples.len(), 1);
    }

    #[test]
    fn a_template_that_cannot_render_tool_calls_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("t.jsonl");
        let call =
            serde_json::json!([{"type": "function", "function": {"name": "f", "arguments": "{}"}}]);
        let line = serde_json::json!({"messages": [
            {"role": "user", "content": "hello"},
            {"role": "assistant", "content": null, "tool_calls": call},
        ]});
        std::fs::write(&f, format!("{line}\n")).unwrap();
        let chat = crate::chat::ChatTemplate::new(crate::chat::CHATML, None, None).unwrap();
        let e = load(&f, DataFormat::Auto, &tok(), Some(&chat), 64, dir.path())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("t.jsonl:1:") && e.contains("calls tools, which this chat template"),
            "{e}"
        );
    }

    #[test]
    fn a_byte_order_mark_is_skipped_and_bad_utf8_is_located() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("a.jsonl");
        std::fs::write(&f, "\u{feff}{\"text\":\"hello\"}\n").unwrap();
        let t = tok();
        let d = load(&f, DataFormat::Auto, &t, None, 64, dir.path()).unwrap();
        assert_eq!(d.examples.len(), 1);
        std::fs::write(&f, b"{\"text\":\"a\"}\n{\"text\":\"\xff\"}\n").unwrap();
        let e = load(&f, DataFormat::Auto, &t, None, 64, dir.path())
            .unwrap_err()
            .to_string();
        assert!(e.contains("a.jsonl:2:") && e.contains("not UTF-8"), "{e}");
    }

    #[test]
    fn plan_positions_cover_every_example_once_per_epoch() {
        let p = Plan::new(10, 3, 2, 5, 2.0, -1);
        assert_eq!(
            (p.micro_per_epoch, p.steps_per_epoch, p.total_steps),
            (4, 2, 4)
        );
        for epoch in 0..2 {
            let order = p.order(epoch);
            let mut seen: Vec<usize> = (0..2)
                .flat_map(|s| p.micro_batches(epoch * 2 + s, &order).into_iter().flatten())
                .collect();
            seen.sort();
            assert_eq!(seen, (0..10).collect::<Vec<_>>());
        }
        assert_ne!(p.order(0), p.order(1));
        assert_eq!(
            p.position(3),
            Position {
                epoch: 1,
                micro_batch: 2
            }
        );
        assert_eq!(Plan::new(10, 3, 2, 5, 2.0, 7).total_steps, 7);
        let (train, eval) = split(
            (0..10).map(|i| Example::from(vec![i, i], 0)).collect(),
            0.2,
            1,
            Path::new("x"),
        )
        .unwrap();
        assert_eq!((train.len(), eval.len()), (8, 2));
    }
}
