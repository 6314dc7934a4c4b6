//! Tokenizers: loading a checkpoint's `tokenizer.json`, training a byte-level BPE on the
//! training data for `init = "scratch"`, and knowing which ids end (and begin) a sequence.
//!
//! Only the `tokenizers` crate is used (its fancy-regex backend); nothing is downloaded.

use std::path::Path;

use tokenizers::models::TrainerWrapper;
use tokenizers::models::bpe::{BPE, BpeTrainerBuilder};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer};

use super::TrainError;

/// The end-of-text token of tokenizers trained here.
pub const EOS_TOKEN: &str = "<|endoftext|>";

/// A tokenizer and its special ids.
#[derive(Clone)]
pub struct Tok {
    /// The tokenizer.
    pub inner: Tokenizer,
    /// Ends a sequence; appended to each JSON-lines example, stops generation.
    pub eos: Option<u32>,
    /// Its text, for `tokenizer_config.json`.
    pub eos_token: Option<String>,
    /// Begins a sequence, if the tokenizer adds one.
    pub bos_token: Option<String>,
}

impl Tok {
    /// Number of ids the tokenizer can produce (added tokens included).
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The tokenizer as `tokenizer.json` text.
    pub fn to_json(&self) -> Result<String, TrainError> {
        self.inner
            .to_string(false)
            .map_err(|e| TrainError::Tokenizer {
                path: "tokenizer.json".into(),
                reason: e.to_string(),
            })
    }

    /// Token ids of `text`; `special` adds the tokenizer's own specials (e.g. a llama BOS).
    pub fn encode(&self, text: &str, special: bool) -> Result<Vec<u32>, TrainError> {
        self.inner
            .encode(text, special)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| TrainError::Tokenizer {
                path: "tokenizer.json".into(),
                reason: format!("encoding failed: {e}"),
            })
    }
}

/// Loads `tokenizer.json`, finding the eos/bos tokens from `eos_ids` (the model config's),
/// `tokenizer_config.json` beside it, or well-known names.
pub fn load(path: &Path, eos_ids: &[u32]) -> Result<Tok, TrainError> {
    let inner = Tokenizer::from_file(path).map_err(|e| TrainError::Tokenizer {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    let cfg: Option<serde_json::Value> = path
        .parent()
        .map(|d| d.join("tokenizer_config.json"))
        .and_then(|p| std::fs::read_to_string(p).ok())
        .and_then(|t| serde_json::from_str(&t).ok());
    let named = |key: &str| -> Option<String> {
        let v = cfg.as_ref()?.get(key)?;
        v.as_str()
            .map(str::to_string)
            .or_else(|| v.get("content")?.as_str().map(str::to_string))
    };
    let eos_token = named("eos_token")
        .filter(|t| inner.token_to_id(t).is_some())
        .or_else(|| eos_ids.first().and_then(|&id| inner.id_to_token(id)))
        .or_else(|| {
            ["</s>", EOS_TOKEN, "<|im_end|>", "<eos>", "<|end_of_text|>"]
                .into_iter()
                .find(|t| inner.token_to_id(t).is_some())
                .map(str::to_string)
        });
    let eos = eos_token.as_deref().and_then(|t| inner.token_to_id(t));
    let bos_token = named("bos_token").filter(|t| inner.token_to_id(t).is_some());
    Ok(Tok {
        inner,
        eos,
        eos_token,
        bos_token,
    })
}

/// Parses a tokenizer from `tokenizer.json` text (a checkpoint's copy).
pub fn from_json(text: &str, origin: &Path) -> Result<Tok, TrainError> {
    let inner = Tokenizer::from_bytes(text.as_bytes()).map_err(|e| TrainError::Tokenizer {
        path: origin.to_path_buf(),
        reason: e.to_string(),
    })?;
    let eos = inner.token_to_id(EOS_TOKEN);
    Ok(Tok {
        inner,
        eos,
        eos_token: eos.map(|_| EOS_TOKEN.to_string()),
        bos_token: None,
    })
}

/// Trains a byte-level BPE (GPT-2 style: every byte has a token, so any text encodes) with
/// at most `vocab_size` ids, `<|endoftext|>` being id 0. Deterministic for the same texts.
pub fn train_bpe<I>(texts: I, vocab_size: usize, origin: &Path) -> Result<Tok, TrainError>
where
    I: Iterator<Item = String> + Send,
{
    train_bpe_with(texts, vocab_size, origin, &[])
}

/// [`train_bpe`] with more special tokens after `<|endoftext|>` (ids 1, 2, ...): markers a
/// chat template writes (ChatML's `<|im_start|>`), each then one token that text never
/// produces by accident. `texts` should not contain them: they are not learned as merges.
pub fn train_bpe_with<I>(
    texts: I,
    vocab_size: usize,
    origin: &Path,
    specials: &[&str],
) -> Result<Tok, TrainError>
where
    I: Iterator<Item = String> + Send,
{
    let err = |e: tokenizers::Error| TrainError::Tokenizer {
        path: origin.to_path_buf(),
        reason: format!("training a BPE tokenizer: {e}"),
    };
    let mut trainer: TrainerWrapper = BpeTrainerBuilder::new()
        .vocab_size(vocab_size)
        .min_frequency(2)
        .show_progress(false)
        .special_tokens(
            std::iter::once(EOS_TOKEN)
                .chain(specials.iter().copied())
                .map(|t| AddedToken::from(t, true))
                .collect(),
        )
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build()
        .into();
    let mut tokenizer = Tokenizer::new(BPE::default());
    // No prefix space: "a" at the start of a prompt and "a" after a newline stay distinct, as
    // in GPT-2.
    let byte_level = ByteLevel::new(false, true, true);
    tokenizer.with_pre_tokenizer(Some(byte_level));
    tokenizer.with_decoder(Some(byte_level));
    tokenizer.with_post_processor(Some(byte_level));
    tokenizer.train(&mut trainer, texts).map_err(err)?;
    let json = tokenizer.to_string(false).map_err(err)?;
    from_json(&json, origin)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trained_bpe_round_trips_and_is_deterministic() {
        let texts: Vec<String> = (0..200)
            .map(|i| format!("rev: a b c {} => {} c b a\n", i % 7, i % 7))
            .collect();
        let a = train_bpe(texts.clone().into_iter(), 300, Path::new("t")).unwrap();
        let b = train_bpe(texts.into_iter(), 300, Path::new("t")).unwrap();
        assert_eq!(a.to_json().unwrap(), b.to_json().unwrap());
        assert_eq!(a.eos, Some(0));
        assert!(
            a.vocab_size() <= 300 && a.vocab_size() > 257,
            "{}",
            a.vocab_size()
        );
        let ids = a.encode("rev: a b c 3 => 3 c b a", false).unwrap();
        assert!(ids.len() < 20, "merges shorten text: {ids:?}");
        let back = a.inner.decode(&ids, true).unwrap();
        assert_eq!(back, "rev: a b c 3 => 3 c b a");
        // Bytes never seen in training still encode.
        let odd = a.encode("é✓", false).unwrap();
        assert_eq!(a.inner.decode(&odd, true).unwrap(), "é✓");
    }
}
