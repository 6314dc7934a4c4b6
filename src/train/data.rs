//! Training and evaluation data: reading plain text and JSON lines, tokenizing (with a cache
//! in the job directory), the eval split, the seeded order of examples and batching.
//!
//! - Plain text: the file's lines are tokenized one by one (each keeps its newline) and their
//!   tokens concatenated into one stream, which is cut into `block_size` blocks; a tail
//!   shorter than a block is dropped (as `TextDataset` does). Blocks therefore span lines.
//! - JSON lines: each line is one example, `{"text"}` (loss on every token) or
//!   `{"prompt", "completion"}` (loss only on the completion), followed by the eos token and
//!   cut at `block_size` tokens. Blank lines are skipped.
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
use crate::spec::train::DataFormat;

/// One tokenized example.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    /// Token ids, at most `block_size` of them.
    pub ids: Vec<u32>,
    /// Index of the first token that counts in the loss (0 for text; the completion's first
    /// token for prompt/completion).
    pub loss_start: u32,
}

impl Example {
    /// Positions whose next token is predicted with loss.
    pub fn labelled(&self) -> usize {
        let start = (self.loss_start as usize).max(1);
        self.ids.len().saturating_sub(start)
    }
}

/// A tokenized file.
#[derive(Debug, Clone, Default)]
pub struct Dataset {
    /// Examples in file order.
    pub examples: Vec<Example>,
    /// Hex SHA-256 of the file and the tokenization settings (the cache key).
    pub key: String,
}

/// Reads and tokenizes `path`, or reads the result from the cache in `cache_dir`.
pub fn load(
    path: &Path,
    format: DataFormat,
    tok: &Tok,
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
    h.update(b"jobd-tokenized-v1\0");
    h.update(if jsonl { b"jsonl" } else { b"text\0" });
    h.update((block_size as u64).to_le_bytes());
    h.update(tok.to_json()?.as_bytes());
    h.update([tok.eos.is_some() as u8]);
    h.update(tok.eos.unwrap_or(0).to_le_bytes());
    h.update(&bytes);
    let key = hex::encode(h.finalize());
    let cache = cache_dir.join(format!("tokenized-{}.bin", &key[..16]));
    if let Some(examples) = read_cache(&cache, &key) {
        tracing::info!(file = %path.display(), cache = %cache.display(), "tokenized data from cache");
        return Ok(Dataset { examples, key });
    }
    let text = String::from_utf8(bytes).map_err(|e| {
        let at = e.utf8_error().valid_up_to();
        let bytes = e.as_bytes();
        let line = bytes[..at].iter().filter(|&&b| b == b'\n').count() + 1;
        TrainError::Data {
            path: path.to_path_buf(),
            line: Some(line),
            reason: format!("not UTF-8 text (byte {at} of the file); save it as UTF-8"),
        }
    })?;
    // A byte-order mark (Windows tools write one) is not part of the data.
    let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
    let examples = if jsonl {
        tokenize_jsonl(path, text, tok, block_size)?
    } else {
        tokenize_text(path, text, tok, block_size)?
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
        && let Err(e) = write_atomic(&cache, &encode_cache(&key, &examples))
    {
        tracing::warn!(error = %e, "could not write the tokenized-data cache");
    }
    Ok(Dataset { examples, key })
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
        .map(|c| Example {
            ids: c.to_vec(),
            loss_start: 0,
        })
        .collect())
}

fn tokenize_jsonl(
    path: &Path,
    text: &str,
    tok: &Tok,
    block: usize,
) -> Result<Vec<Example>, TrainError> {
    let mut out = Vec::new();
    let (mut truncated, mut unlearnable) = (0usize, 0usize);
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
        let (mut ids, loss_start) = match (field("text")?, field("prompt")?, field("completion")?) {
            (Some(t), None, None) => (tok.encode(t, true)?, 0),
            (None, Some(p), Some(c)) => {
                let mut ids = tok.encode(p, true)?;
                let start = ids.len();
                ids.extend(tok.encode(c, false)?);
                (ids, start)
            }
            _ => {
                return Err(bad(
                    "expected {\"text\": ...} or {\"prompt\": ..., \"completion\": ...}".into(),
                ));
            }
        };
        ids.extend(tok.eos);
        if ids.len() > block {
            ids.truncate(block);
            truncated += 1;
        }
        let ex = Example {
            ids,
            loss_start: loss_start as u32,
        };
        if ex.labelled() == 0 {
            unlearnable += 1;
            continue;
        }
        out.push(ex);
    }
    if truncated > 0 {
        tracing::warn!(file = %path.display(), truncated, "examples cut at data.block_size tokens");
    }
    if unlearnable > 0 {
        tracing::warn!(file = %path.display(), skipped = unlearnable,
            "examples skipped: no completion token left within data.block_size");
    }
    Ok(out)
}

const CACHE_MAGIC: &[u8; 8] = b"JOBDTOK1";

fn encode_cache(key: &str, examples: &[Example]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(CACHE_MAGIC);
    out.extend_from_slice(key.as_bytes());
    out.extend_from_slice(&(examples.len() as u64).to_le_bytes());
    for e in examples {
        out.extend_from_slice(&(e.ids.len() as u32).to_le_bytes());
        out.extend_from_slice(&e.loss_start.to_le_bytes());
        for id in &e.ids {
            out.extend_from_slice(&id.to_le_bytes());
        }
    }
    out
}

fn read_cache(path: &Path, key: &str) -> Option<Vec<Example>> {
    let bytes = std::fs::read(path).ok()?;
    let mut rest = bytes.strip_prefix(CACHE_MAGIC.as_slice())?;
    rest = rest.strip_prefix(key.as_bytes())?;
    let mut take = |n: usize| -> Option<&[u8]> {
        let (a, b) = (rest.get(..n)?, rest.get(n..)?);
        rest = b;
        Some(a)
    };
    let u32_at = |b: &[u8]| u32::from_le_bytes(b.try_into().expect("4 bytes"));
    let n = u64::from_le_bytes(take(8)?.try_into().ok()?) as usize;
    let mut out = Vec::with_capacity(n.min(1 << 24));
    for _ in 0..n {
        let len = u32_at(take(4)?) as usize;
        let loss_start = u32_at(take(4)?);
        let ids = take(len * 4)?.chunks_exact(4).map(u32_at).collect();
        out.push(Example { ids, loss_start });
    }
    rest.is_empty().then_some(out)
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
/// label is token `t+1`, counted when `t+1 >= loss_start`.
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
        for p in 0..e.ids.len().saturating_sub(1) {
            if p + 1 >= e.loss_start as usize {
                labels[row + p] = e.ids[p + 1];
                mask[row + p] = 1.0;
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
        let d = load(&f, DataFormat::Auto, &t, 4, dir.path()).unwrap();
        assert_eq!(d.examples.len(), all / 4);
        assert!(
            d.examples
                .iter()
                .all(|e| e.ids.len() == 4 && e.loss_start == 0)
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
        let again = load(&f, DataFormat::Auto, &t, 4, dir.path()).unwrap();
        assert_eq!(again.examples, d.examples);
        let e = load(&f, DataFormat::Text, &t, 1000, dir.path()).unwrap_err();
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
        let d = load(&f, DataFormat::Auto, &t, 64, dir.path()).unwrap();
        assert_eq!(d.examples.len(), 2);
        let p = t.encode("prompt =>", true).unwrap();
        let ex = &d.examples[0];
        assert_eq!(ex.loss_start as usize, p.len());
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
        let e = load(&f, DataFormat::Auto, &t, 64, dir.path())
            .unwrap_err()
            .to_string();
        assert!(e.contains("a.jsonl:2:") && e.contains("expected"), "{e}");
        std::fs::write(&f, "  \n").unwrap();
        let e = load(&f, DataFormat::Auto, &t, 64, dir.path())
            .unwrap_err()
            .to_string();
        assert!(e.contains("empty"), "{e}");
    }

    #[test]
    fn a_byte_order_mark_is_skipped_and_bad_utf8_is_located() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("a.jsonl");
        std::fs::write(&f, "\u{feff}{\"text\":\"hello\"}\n").unwrap();
        let t = tok();
        let d = load(&f, DataFormat::Auto, &t, 64, dir.path()).unwrap();
        assert_eq!(d.examples.len(), 1);
        std::fs::write(&f, b"{\"text\":\"a\"}\n{\"text\":\"\xff\"}\n").unwrap();
        let e = load(&f, DataFormat::Auto, &t, 64, dir.path())
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
            (0..10)
                .map(|i| Example {
                    ids: vec![i, i],
                    loss_start: 0,
                })
                .collect(),
            0.2,
            1,
            Path::new("x"),
        )
        .unwrap();
        assert_eq!((train.len(), eval.len()), (8, 2));
    }
}
