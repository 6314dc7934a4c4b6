//! Turning a Hugging Face `tokenizer.json` into llama.cpp's `tokenizer.ggml.*` keys, and
//! choosing a default Ollama prompt template from the tokenizer's chat-template family.
//!
//! Only tokenizers llama.cpp reproduces exactly are accepted: a byte-level BPE whose
//! pre-tokenizer is one llama.cpp has by name (GPT-2's, SmolLM's, Llama 3's, Qwen2's; see
//! [`pre_tokenizer_family`]), no normalizer, plain added tokens. llama.cpp selects its pre-tokenizer regex by the `tokenizer.ggml.pre` name,
//! so anything else would load and silently tokenize differently from training; it is refused
//! with the feature at fault named instead. One exception: Qwen's tokenizers (Qwen2, 2.5, 3)
//! all apply Unicode NFC, which GGUF cannot say; llama.cpp's own converter drops it (so do
//! Ollama's Qwen models), and so does this one, saying so ([`GgufTokenizer::dropped`]):
//! text already in NFC, as typed text is, tokenizes the same.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use serde_json::Value as Json;

use super::PublishError;
use super::hf::LlamaConfig;

/// llama.cpp token types (`llama_token_type`).
pub mod token_type {
    /// A regular vocabulary token.
    pub const NORMAL: i32 = 1;
    /// A special added token (`special: true`): matched in text only when parsing specials.
    pub const CONTROL: i32 = 3;
    /// A non-special added token: always matched as a whole in text.
    pub const USER_DEFINED: i32 = 4;
    /// A `[PAD{id}]` hole between the tokenizer's ids and the model's vocab_size.
    pub const UNUSED: i32 = 5;
}

/// The tokenizer as GGUF wants it.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufTokenizer {
    /// `tokenizer.ggml.model`: always `"gpt2"` (byte-level BPE).
    pub model: &'static str,
    /// `tokenizer.ggml.pre`: the pre-tokenizer regex family.
    pub pre: &'static str,
    /// Every id `0..vocab_size` in byte-level form as in `tokenizer.json`.
    pub tokens: Vec<String>,
    /// One [`token_type`] per token.
    pub token_types: Vec<i32>,
    /// `"left right"`, rank = index.
    pub merges: Vec<String>,
    /// Always written: llama.cpp's BPE default (11) would be an arbitrary token.
    pub bos_token_id: u32,
    /// Always written; llama.cpp also ends generation on it.
    pub eos_token_id: u32,
    /// `pad_token_id` / `pad_token`, if any.
    pub padding_token_id: Option<u32>,
    /// Whether encoding adds BOS (from the tokenizer's post-processor), so llama.cpp and
    /// Ollama feed the model the way it was trained.
    pub add_bos_token: bool,
    /// Whether encoding appends EOS (from the post-processor).
    pub add_eos_token: bool,
    /// `tokenizer_config.json`'s Jinja `chat_template`, if any.
    pub chat_template: Option<String>,
    /// What of the tokenizer GGUF does not carry: `Some` for the NFC normalizer of Qwen's
    /// tokenizers (text not in NFC, such as decomposed accents, may tokenize differently in
    /// llama.cpp and Ollama than in training).
    pub dropped: Option<&'static str>,
}

/// GPT-2's byte-to-unicode table: printable bytes map to themselves, the rest to U+0100.. in
/// order. A byte-level BPE token is a string over exactly these 256 characters.
pub fn byte_level_alphabet() -> HashMap<char, u8> {
    let mut printable: Vec<u8> = (b'!'..=b'~').collect();
    printable.extend(0xA1u8..=0xAC);
    printable.extend(0xAEu8..=0xFF);
    let mut map = HashMap::new();
    let mut n = 0u32;
    for b in 0u8..=255 {
        let c = if printable.contains(&b) {
            char::from(b)
        } else {
            n += 1;
            char::from_u32(255 + n).expect("U+0100..U+0143 are chars")
        };
        map.insert(c, b);
    }
    map
}

fn unsupported(path: &Path, feature: impl Into<String>) -> PublishError {
    PublishError::UnsupportedTokenizer {
        path: path.to_path_buf(),
        feature: feature.into(),
    }
}

/// The normalizers `n` applies in order, `Sequence`s flattened (none for null or an empty
/// one).
fn normalizer_steps<'a>(n: Option<&'a Json>, out: &mut Vec<&'a Json>) {
    match n {
        None | Some(Json::Null) => {}
        Some(n) if n.get("type").and_then(Json::as_str) == Some("Sequence") => {
            for step in n
                .get("normalizers")
                .and_then(Json::as_array)
                .into_iter()
                .flatten()
            {
                normalizer_steps(Some(step), out);
            }
        }
        Some(n) => out.push(n),
    }
}

fn is_null_or(v: Option<&Json>, ok: impl Fn(&Json) -> bool) -> bool {
    v.is_none_or(|v| v.is_null() || ok(v))
}

/// Hugging Face's Llama 3 pre-tokenizer regex (llama.cpp: `llama-bpe`).
pub const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Hugging Face's Qwen2 pre-tokenizer regex (llama.cpp: `qwen2`): Llama 3's with single digits.
pub const QWEN2_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

fn byte_level(p: &Json, use_regex: bool) -> bool {
    p.get("type").and_then(Json::as_str) == Some("ByteLevel")
        && p.get("add_prefix_space").and_then(Json::as_bool) == Some(false)
        && p.get("use_regex").and_then(Json::as_bool).unwrap_or(true) == use_regex
}

/// The llama.cpp pre-tokenizer (`tokenizer.ggml.pre`) whose splitting is exactly this
/// Hugging Face pre-tokenizer's, if there is one:
/// - `gpt-2`: `ByteLevel` with its built-in GPT-2 regex and no prefix space;
/// - `smollm`: `Digits(individual)` then that `ByteLevel`;
/// - `llama-bpe` / `qwen2`: a `Split` on Llama 3's / Qwen2's regex (isolated), then a
///   `ByteLevel` without its regex.
pub fn pre_tokenizer_family(p: &Json) -> Option<&'static str> {
    let list: Vec<&Json> = match p.get("type").and_then(Json::as_str)? {
        "Sequence" => p.get("pretokenizers")?.as_array()?.iter().collect(),
        _ => vec![p],
    };
    match list.as_slice() {
        [bl] if byte_level(bl, true) => Some("gpt-2"),
        [digits, bl]
            if digits.get("type").and_then(Json::as_str) == Some("Digits")
                && digits.get("individual_digits").and_then(Json::as_bool) == Some(true)
                && byte_level(bl, true) =>
        {
            Some("smollm")
        }
        [split, bl]
            if split.get("type").and_then(Json::as_str) == Some("Split")
                && split.get("behavior").and_then(Json::as_str) == Some("Isolated")
                && split.get("invert").and_then(Json::as_bool) == Some(false)
                && byte_level(bl, false) =>
        {
            match split.get("pattern")?.get("Regex")?.as_str()? {
                LLAMA3_REGEX => Some("llama-bpe"),
                QWEN2_REGEX => Some("qwen2"),
                _ => None,
            }
        }
        _ => None,
    }
}

/// The special tokens a post-processor adds around a single sequence: (before, after).
fn post_processor_specials(p: &Json, path: &Path) -> Result<(Vec<u32>, Vec<u32>), PublishError> {
    match p.get("type").and_then(Json::as_str) {
        // ByteLevel only adjusts offsets.
        Some("ByteLevel") => Ok((vec![], vec![])),
        Some("Sequence") => {
            let mut before = vec![];
            let mut after = vec![];
            for item in p
                .get("processors")
                .and_then(Json::as_array)
                .into_iter()
                .flatten()
            {
                let (b, a) = post_processor_specials(item, path)?;
                before.extend(b);
                after.extend(a);
            }
            Ok((before, after))
        }
        Some("TemplateProcessing") => {
            let single = p.get("single").and_then(Json::as_array).ok_or_else(|| {
                unsupported(path, "TemplateProcessing post-processor without `single`")
            })?;
            let specials = p.get("special_tokens");
            let mut before = vec![];
            let mut after = vec![];
            let mut seen_sequence = false;
            for piece in single {
                if let Some(seq) = piece.get("Sequence") {
                    if seq.get("id").and_then(Json::as_str) != Some("A") || seen_sequence {
                        return Err(unsupported(
                            path,
                            "a post-processor template other than [BOS] $A [EOS]",
                        ));
                    }
                    seen_sequence = true;
                } else if let Some(tok) = piece.get("SpecialToken") {
                    let name = tok.get("id").and_then(Json::as_str).unwrap_or_default();
                    let ids: Vec<u32> = specials
                        .and_then(|s| s.get(name))
                        .and_then(|s| s.get("ids"))
                        .and_then(Json::as_array)
                        .map(|ids| {
                            ids.iter()
                                .filter_map(|i| i.as_u64().and_then(|i| u32::try_from(i).ok()))
                                .collect()
                        })
                        .unwrap_or_default();
                    if ids.len() != 1 {
                        return Err(unsupported(
                            path,
                            format!("post-processor special token {name:?} without exactly one id"),
                        ));
                    }
                    if seen_sequence {
                        after.push(ids[0]);
                    } else {
                        before.push(ids[0]);
                    }
                } else {
                    return Err(unsupported(path, "unknown post-processor template piece"));
                }
            }
            Ok((before, after))
        }
        Some(other) => Err(unsupported(path, format!("post-processor {other:?}"))),
        None => Ok((vec![], vec![])),
    }
}

/// A special token named in `tokenizer_config.json` (a string or `{"content": ...}`).
fn config_token(cfg: &Json, key: &str) -> Option<String> {
    match cfg.get(key)? {
        Json::String(s) => Some(s.clone()),
        v => v.get("content")?.as_str().map(str::to_string),
    }
}

/// Reads `tokenizer.json` (and `tokenizer_config.json` when present) from `dir`.
pub fn read_tokenizer(dir: &Path, config: &LlamaConfig) -> Result<GgufTokenizer, PublishError> {
    let path = dir.join("tokenizer.json");
    let text = super::read_model_text(&path).map_err(|e| PublishError::io("read", &path, e))?;
    // Parse it with the real library too: a file it rejects is not a tokenizer the model was
    // trained with, whatever its JSON says.
    <tokenizers::Tokenizer as std::str::FromStr>::from_str(&text).map_err(|e| {
        PublishError::Config {
            path: path.clone(),
            reason: format!("the tokenizers library cannot load it: {e}"),
        }
    })?;
    let json: Json = serde_json::from_str(&text).map_err(|e| PublishError::Config {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    let cfg_path = dir.join("tokenizer_config.json");
    let tok_cfg: Json = match super::read_model_text(&cfg_path) {
        Ok(t) => serde_json::from_str(&t).map_err(|e| PublishError::Config {
            path: cfg_path.clone(),
            reason: e.to_string(),
        })?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Json::Null,
        Err(e) => return Err(PublishError::io("read", &cfg_path, e)),
    };
    convert(&path, &json, &tok_cfg, config)
}

fn convert(
    path: &Path,
    json: &Json,
    tok_cfg: &Json,
    config: &LlamaConfig,
) -> Result<GgufTokenizer, PublishError> {
    let model = json
        .get("model")
        .ok_or_else(|| unsupported(path, "no `model`"))?;
    let kind = model.get("type").and_then(Json::as_str).unwrap_or("?");
    if kind != "BPE" {
        return Err(unsupported(
            path,
            format!("model type {kind:?} (only byte-level BPE is exported)"),
        ));
    }
    for (key, what) in [
        ("dropout", "BPE dropout"),
        ("continuing_subword_prefix", "continuing_subword_prefix"),
        ("end_of_word_suffix", "end_of_word_suffix"),
    ] {
        if !is_null_or(model.get(key), |v| v.as_str() == Some("")) {
            return Err(unsupported(path, what));
        }
    }
    if model.get("byte_fallback").and_then(Json::as_bool) == Some(true) {
        return Err(unsupported(
            path,
            "byte_fallback (a SentencePiece-style BPE)",
        ));
    }
    // NFC is what every Qwen tokenizer has: dropped as llama.cpp's converter drops it. A
    // Sequence counts as its steps.
    let mut steps = Vec::new();
    normalizer_steps(json.get("normalizer"), &mut steps);
    let kind = |v: &Json| {
        v.get("type")
            .and_then(Json::as_str)
            .unwrap_or("?")
            .to_string()
    };
    if let Some(other) = steps.iter().find(|n| kind(n) != "NFC") {
        return Err(unsupported(
            path,
            format!(
                "a normalizer ({}; llama.cpp's BPE applies none)",
                kind(other)
            ),
        ));
    }
    let dropped = (!steps.is_empty()).then_some(
        "the tokenizer's NFC normalizer (GGUF has none; as in llama.cpp's own conversions of \
         Qwen models, text not already in NFC may tokenize differently than in training)",
    );
    let pre = match json.get("pre_tokenizer") {
        Some(p) if !p.is_null() => pre_tokenizer_family(p).ok_or_else(|| {
            unsupported(
                path,
                format!(
                    "pre-tokenizer {} (llama.cpp reproduces exactly: GPT-2's ByteLevel with \
                     add_prefix_space = false, SmolLM's Digits + ByteLevel, and Llama 3's or \
                     Qwen2's Split regex + ByteLevel)",
                    p.get("type").and_then(Json::as_str).unwrap_or("?")
                ),
            )
        })?,
        _ => return Err(unsupported(path, "no pre-tokenizer (not byte-level)")),
    };
    // llama.cpp ignores merges (takes a whole pre-token found in the vocabulary as one
    // token) exactly for llama-bpe; the tokenizer must do the same.
    let ignore_merges = model.get("ignore_merges").and_then(Json::as_bool) == Some(true);
    if ignore_merges != (pre == "llama-bpe") {
        return Err(unsupported(
            path,
            format!(
                "ignore_merges = {ignore_merges} with a {pre:?} pre-tokenizer (llama.cpp uses {})",
                pre == "llama-bpe"
            ),
        ));
    }
    if json
        .get("decoder")
        .and_then(|d| d.get("type"))
        .and_then(Json::as_str)
        != Some("ByteLevel")
    {
        return Err(unsupported(path, "a decoder other than ByteLevel"));
    }

    let alphabet = byte_level_alphabet();
    let vocab = model
        .get("vocab")
        .and_then(Json::as_object)
        .ok_or_else(|| unsupported(path, "BPE model without a vocab"))?;
    let mut by_id: BTreeMap<u32, (String, i32)> = BTreeMap::new();
    for (token, id) in vocab {
        let id = id
            .as_u64()
            .and_then(|i| u32::try_from(i).ok())
            .ok_or_else(|| unsupported(path, format!("vocab entry {token:?} without an id")))?;
        if !token.chars().all(|c| alphabet.contains_key(&c)) {
            return Err(unsupported(
                path,
                format!("vocab token {token:?} (id {id}) is not in byte-level form"),
            ));
        }
        if by_id
            .insert(id, (token.clone(), token_type::NORMAL))
            .is_some()
        {
            return Err(unsupported(path, format!("two vocab tokens share id {id}")));
        }
    }
    for added in json
        .get("added_tokens")
        .and_then(Json::as_array)
        .into_iter()
        .flatten()
    {
        let content = added
            .get("content")
            .and_then(Json::as_str)
            .unwrap_or_default();
        let id = added
            .get("id")
            .and_then(Json::as_u64)
            .and_then(|i| u32::try_from(i).ok())
            .ok_or_else(|| unsupported(path, format!("added token {content:?} without an id")))?;
        for flag in ["single_word", "lstrip", "rstrip"] {
            if added.get(flag).and_then(Json::as_bool) == Some(true) {
                return Err(unsupported(
                    path,
                    format!("added token {content:?} with {flag} = true"),
                ));
            }
        }
        if content.is_empty() {
            return Err(unsupported(path, format!("empty added token (id {id})")));
        }
        let special = added
            .get("special")
            .and_then(Json::as_bool)
            .unwrap_or(false);
        let ty = if special {
            token_type::CONTROL
        } else {
            token_type::USER_DEFINED
        };
        match by_id.get(&id) {
            // tokenizers lists special tokens found in the vocab as added tokens too.
            Some((existing, _)) if existing != content => {
                return Err(unsupported(
                    path,
                    format!("added token {content:?} reuses id {id} of vocab token {existing:?}"),
                ));
            }
            _ => {
                by_id.insert(id, (content.to_string(), ty));
            }
        }
    }
    let max_id = by_id.keys().next_back().copied().unwrap_or(0);
    if max_id >= config.vocab_size {
        return Err(unsupported(
            path,
            format!(
                "token id {max_id} does not fit the model's vocab_size {}",
                config.vocab_size
            ),
        ));
    }
    let mut tokens = Vec::with_capacity(config.vocab_size as usize);
    let mut token_types = Vec::with_capacity(config.vocab_size as usize);
    let mut seen = HashMap::new();
    for id in 0..config.vocab_size {
        let (text, ty) = by_id
            .remove(&id)
            .unwrap_or_else(|| (format!("[PAD{id}]"), token_type::UNUSED));
        if let Some(other) = seen.insert(text.clone(), id) {
            return Err(unsupported(
                path,
                format!("token {text:?} appears twice (ids {other} and {id})"),
            ));
        }
        tokens.push(text);
        token_types.push(ty);
    }

    let merges = model
        .get("merges")
        .and_then(Json::as_array)
        .ok_or_else(|| unsupported(path, "BPE model without merges"))?
        .iter()
        .map(|m| {
            let (a, b) = match m {
                Json::String(s) => s
                    .split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| unsupported(path, format!("merge {s:?} is not \"a b\"")))?,
                Json::Array(pair) if pair.len() == 2 => (
                    pair[0].as_str().unwrap_or_default().to_string(),
                    pair[1].as_str().unwrap_or_default().to_string(),
                ),
                other => return Err(unsupported(path, format!("merge {other}"))),
            };
            // llama.cpp splits a merge at its first space after index 0.
            if a.is_empty() || b.is_empty() || a.contains(' ') || b.contains(' ') {
                return Err(unsupported(path, format!("merge ({a:?}, {b:?})")));
            }
            Ok(format!("{a} {b}"))
        })
        .collect::<Result<Vec<_>, _>>()?;

    let lookup = |text: &str| seen.get(text).copied();
    let named = |key: &str| config_token(tok_cfg, key).and_then(|t| lookup(&t));
    let eos_token_id = config
        .eos_token_id
        .or_else(|| named("eos_token"))
        .or_else(|| lookup("<|endoftext|>"))
        .ok_or_else(|| {
            unsupported(
                path,
                "no end-of-sequence token (set eos_token_id in config.json)",
            )
        })?;
    // GPT-2 style tokenizers use one token for both; llama.cpp's BPE default (id 11) would be
    // an arbitrary token, so BOS is always written.
    let bos_token_id = config
        .bos_token_id
        .or_else(|| named("bos_token"))
        .unwrap_or(eos_token_id);
    let padding_token_id = config.pad_token_id.or_else(|| named("pad_token"));
    for (what, id) in [
        ("bos", Some(bos_token_id)),
        ("eos", Some(eos_token_id)),
        ("pad", padding_token_id),
    ] {
        if let Some(id) = id
            && id >= config.vocab_size
        {
            return Err(PublishError::Config {
                path: path.to_path_buf(),
                reason: format!("{what} token id {id} is outside the vocabulary"),
            });
        }
    }

    let (before, after) = match json.get("post_processor") {
        Some(p) if !p.is_null() => post_processor_specials(p, path)?,
        _ => (vec![], vec![]),
    };
    let add_bos_token = match before.as_slice() {
        [] => false,
        [id] if *id == bos_token_id => true,
        _ => {
            return Err(unsupported(
                path,
                format!("the post-processor prepends {before:?}, not just BOS {bos_token_id}"),
            ));
        }
    };
    let add_eos_token = match after.as_slice() {
        [] => false,
        [id] if *id == eos_token_id => true,
        _ => {
            return Err(unsupported(
                path,
                format!("the post-processor appends {after:?}, not just EOS {eos_token_id}"),
            ));
        }
    };

    let chat_template = crate::chat::template_in_config(tok_cfg);

    Ok(GgufTokenizer {
        model: "gpt2",
        pre,
        tokens,
        token_types,
        merges,
        bos_token_id,
        eos_token_id,
        padding_token_id,
        add_bos_token,
        add_eos_token,
        chat_template,
        dropped,
    })
}

/// Qwen3's chat template as an Ollama Go template up to its generation prompt (see
/// [`ChatFamily::Qwen3`]); each variant ends it its own way. Ollama has no arithmetic in
/// templates, so the last user message's index is found in a first pass, and a tool message
/// looks back through `$prev` and ahead through `slice`.
macro_rules! qwen3_conversation {
    () => {
        r#"{{- $lastQuery := len .Messages }}
{{- range $i, $_ := .Messages }}{{ if eq .Role "user" }}{{ $lastQuery = $i }}{{ end }}{{ end }}
{{- if .Tools }}<|im_start|>system
{{ if .System }}{{ .System }}

{{ end }}# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{{- range .Tools }}
{{ json . }}
{{- end }}
</tools>

For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:
<tool_call>
{"name": <function-name>, "arguments": <args-json-object>}
</tool_call><|im_end|>
{{ else if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}
{{- $prev := "" }}
{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}
{{- if eq .Role "user" }}<|im_start|>user
{{ .Content }}<|im_end|>
{{ else if eq .Role "assistant" }}<|im_start|>assistant
{{ if and (gt $i $lastQuery) (or $last .Thinking) }}<think>
{{ .Thinking }}
</think>

{{ end }}{{ .Content }}
{{- $content := .Content }}
{{- range $j, $_ := .ToolCalls }}{{ if or $j $content }}
{{ end }}<tool_call>
{"name": "{{ .Function.Name }}", "arguments": {{ .Function.Arguments }}}
</tool_call>
{{- end }}
{{- if not $last }}<|im_end|>
{{ end }}
{{- else if eq .Role "tool" }}
{{- if ne $prev "tool" }}<|im_start|>user{{ end }}
<tool_response>
{{ .Content }}
</tool_response>
{{- if or $last (ne (index (slice $.Messages $i) 1).Role "tool") }}<|im_end|>
{{ end }}
{{- end }}
{{- $prev = .Role }}
{{- if and $last (ne .Role "assistant") }}<|im_start|>assistant
"#
    };
}

/// [`ChatFamily::Qwen3`]'s Go template: the reply starts as it is, or with the empty think
/// block when thinking is off (`think: false`, Qwen3's `enable_thinking=False`).
const QWEN3_TEMPLATE: &str = concat!(
    qwen3_conversation!(),
    r#"{{ if and $.IsThinkSet (not $.Think) }}<think>

</think>

{{ end }}
{{- end }}
{{- end }}"#
);

/// [`ChatFamily::Qwen3Thinking`]'s Go template: the reply opens the think block, as the
/// template's generation prompt does (with thinking off, the empty block instead).
const QWEN3_THINKING_TEMPLATE: &str = concat!(
    qwen3_conversation!(),
    r#"{{ if and $.IsThinkSet (not $.Think) }}<think>

</think>

{{ else }}<think>
{{ end }}
{{- end }}
{{- end }}"#
);

/// A chat-template family Ollama has a Go template for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChatFamily {
    /// ChatML with `<think>` reasoning blocks (Qwen3, QwQ...). Its Go template mirrors
    /// Qwen3's Jinja: the empty `<think>\n\n</think>\n\n` before a reply when thinking is
    /// off (`think: false`), reasoning kept only for replies after the last user message,
    /// tool calls and grouped `<tool_response>`s. `{{ .Thinking }}` between `<think>` and
    /// `</think>` in its range over `.Messages` is how Ollama learns the model thinks: it
    /// then parses reasoning out of replies instead of showing it, and prefers this template
    /// to the GGUF's Jinja one.
    Qwen3,
    /// Qwen3's template whose generation prompt always opens the think block
    /// (`<|im_start|>assistant\n<think>\n`: Qwen3's Thinking-2507 models, QwQ): as
    /// [`ChatFamily::Qwen3`], but the reply starts inside `<think>`, as the model was trained.
    Qwen3Thinking,
    /// `<|im_start|>role\n...<|im_end|>` (Qwen, SmolLM, many fine-tunes).
    ChatMl,
    /// `<|start_header_id|>role<|end_header_id|>\n\n...<|eot_id|>`.
    Llama3,
    /// `<start_of_turn>user\n...<end_of_turn>` (Gemma 2 and 3; the assistant is "model").
    Gemma,
    /// `<|user|>\n...<|end|>\n<|assistant|>\n` (Phi-3, Phi-3.5).
    Phi3,
    /// `[INST] ... [/INST]` (Mistral and Mixtral instruct).
    Mistral,
}

impl ChatFamily {
    /// Every family, in the order they are recognised.
    pub const ALL: [ChatFamily; 7] = [
        ChatFamily::Qwen3Thinking,
        ChatFamily::Qwen3,
        ChatFamily::ChatMl,
        ChatFamily::Llama3,
        ChatFamily::Gemma,
        ChatFamily::Phi3,
        ChatFamily::Mistral,
    ];

    /// Ollama's Go template for the family (as in Ollama's `template/*.gotmpl`; Qwen3's is
    /// jobd's own, Ollama's library keeps its in the registry).
    pub fn template(self) -> &'static str {
        match self {
            ChatFamily::Qwen3 => QWEN3_TEMPLATE,
            ChatFamily::Qwen3Thinking => QWEN3_THINKING_TEMPLATE,
            ChatFamily::ChatMl => {
                "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n"
            }
            ChatFamily::Llama3 => {
                "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>\n{{- end }}<|start_header_id|>assistant<|end_header_id|>\n\n"
            }
            ChatFamily::Gemma => {
                "{{- $system := .System }}\n{{- range $i, $_ := .Messages }}\n{{- $last := eq (len (slice $.Messages $i)) 1 }}\n{{- if eq .Role \"user\" }}<start_of_turn>user\n{{- if and (eq $i 1) $system }}\n{{ $system }}\n{{ end }}\n{{ .Content }}<end_of_turn>\n{{ else if eq .Role \"assistant\" }}<start_of_turn>model\n{{ .Content }}<end_of_turn>\n{{ end }}\n{{- if $last }}<start_of_turn>model\n{{ end }}\n{{- end }}"
            }
            ChatFamily::Phi3 => {
                "{{- range .Messages }}{{ if or (eq .Role \"user\" \"assistant\") (and (eq .Role \"system\") .Content) }}<|{{ .Role }}|>\n{{ .Content }}<|end|>\n{{ end }}{{ end }}<|assistant|>\n"
            }
            ChatFamily::Mistral => {
                "{{- if .Messages }}\n{{- range $index, $_ := .Messages }}\n{{- if eq .Role \"user\" }}[INST] {{ if and $.System (eq (len (slice $.Messages $index)) 1) }}{{ $.System }}\n\n{{ end }}{{ .Content }}\n{{- else if eq .Role \"assistant\" }}[/INST] {{ .Content }}</s>\n{{- end }}\n{{- end }}[/INST]\n{{- else -}}\n[INST] {{ if .System }}{{ .System }} {{ end }}{{ .Prompt }}[/INST] {{ .Response }}</s>\n{{- end -}}"
            }
        }
    }

    /// Stop sequences that end a turn in the family.
    pub fn stop(self) -> &'static [&'static str] {
        match self {
            ChatFamily::Qwen3 | ChatFamily::Qwen3Thinking | ChatFamily::ChatMl => {
                &["<|im_start|>", "<|im_end|>"]
            }
            ChatFamily::Llama3 => &["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
            ChatFamily::Gemma => &["<end_of_turn>"],
            ChatFamily::Phi3 => &["<|end|>", "<|system|>", "<|user|>", "<|assistant|>"],
            ChatFamily::Mistral => &["[INST]", "[/INST]"],
        }
    }

    /// The family's control token, as a vocabulary or a template holds it.
    fn marker(self) -> &'static str {
        match self {
            ChatFamily::Qwen3 | ChatFamily::Qwen3Thinking | ChatFamily::ChatMl => "<|im_start|>",
            ChatFamily::Llama3 => "<|start_header_id|>",
            ChatFamily::Gemma => "<start_of_turn>",
            ChatFamily::Phi3 => "<|assistant|>",
            ChatFamily::Mistral => "[INST]",
        }
    }

    /// Whether a chat template's text is of the family. Phi-3's also ends its turns with
    /// `<|end|>` and puts a line break after the role (Phi-4-mini's has none, and Ollama's
    /// Phi-3 template would give it one).
    fn in_template(self, source: &str) -> bool {
        match self {
            // Reasoning blocks in a ChatML template: Qwen3 (also QwQ's); a generation prompt
            // that opens the block (as a Jinja string literal, or written out).
            ChatFamily::Qwen3 => source.contains("<|im_start|>") && source.contains("</think>"),
            ChatFamily::Qwen3Thinking => {
                ChatFamily::Qwen3.in_template(source)
                    && (source.contains("<|im_start|>assistant\\n<think>\\n'")
                        || source.contains("<|im_start|>assistant\n<think>\n'"))
            }
            ChatFamily::Phi3 => {
                source.contains("<|end|>")
                    && (source.contains("<|assistant|>\n") || source.contains("<|assistant|>\\n"))
            }
            f => source.contains(f.marker()),
        }
    }
}

/// The family of the tokenizer's chat template, judged by its markers; without a chat
/// template, ChatML or Llama 3 by whether the vocabulary has the family's control tokens.
///
/// The template is not rendered: the daemon publishes, and a user's template could make a
/// renderer allocate without bound (`'x' * 10**10`); rendering is for the worker, which is
/// the user's own process.
pub fn chat_family(tok: &GgufTokenizer) -> Option<ChatFamily> {
    match &tok.chat_template {
        Some(source) => ChatFamily::ALL.into_iter().find(|f| f.in_template(source)),
        None => [ChatFamily::ChatMl, ChatFamily::Llama3]
            .into_iter()
            .find(|f| tok.tokens.iter().any(|t| t == f.marker())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(vocab: u32) -> LlamaConfig {
        LlamaConfig {
            arch: crate::publish::hf::Arch::Llama,
            hidden_size: 8,
            intermediate_size: 8,
            num_layers: 1,
            num_heads: 1,
            num_kv_heads: 1,
            head_dim: 8,
            vocab_size: vocab,
            context_length: 16,
            rms_norm_eps: 1e-5,
            rope_theta: 1e4,
            tie_word_embeddings: true,
            bos_token_id: None,
            eos_token_id: None,
            pad_token_id: None,
            qkv_bias: false,
            o_bias: false,
            rope_scaling: crate::publish::hf::RopeScaling::None,
        }
    }

    fn tokenizer_json(pre: Json, post: Json) -> Json {
        serde_json::json!({
            "version": "1.0",
            "added_tokens": [{"id": 4, "content": "<|endoftext|>", "single_word": false,
                "lstrip": false, "rstrip": false, "normalized": false, "special": true}],
            "normalizer": null,
            "pre_tokenizer": pre,
            "post_processor": post,
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": null,
                "continuing_subword_prefix": null, "end_of_word_suffix": null, "fuse_unk": false,
                "byte_fallback": false, "ignore_merges": false,
                "vocab": {"a": 0, "b": 1, "Ġ": 2, "ab": 3},
                "merges": [["a", "b"]]}
        })
    }

    fn gpt2_pre() -> Json {
        serde_json::json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true})
    }

    #[test]
    fn byte_level_alphabet_matches_gpt2() {
        let a = byte_level_alphabet();
        assert_eq!(a.len(), 256);
        assert_eq!(a[&'Ġ'], b' ');
        assert_eq!(a[&'Ċ'], b'\n');
        assert_eq!(a[&'A'], b'A');
        assert_eq!(a[&'\u{100}'], 0);
    }

    #[test]
    fn converts_a_gpt2_bpe_with_padding_and_specials() {
        let json = tokenizer_json(gpt2_pre(), Json::Null);
        let t = convert(Path::new("t.json"), &json, &Json::Null, &config(7)).unwrap();
        assert_eq!(
            t.tokens,
            ["a", "b", "Ġ", "ab", "<|endoftext|>", "[PAD5]", "[PAD6]"]
        );
        assert_eq!(t.token_types, [1, 1, 1, 1, 3, 5, 5]);
        assert_eq!(t.merges, ["a b"]);
        assert_eq!((t.bos_token_id, t.eos_token_id), (4, 4));
        assert!(!t.add_bos_token && !t.add_eos_token);
        assert_eq!((t.model, t.pre), ("gpt2", "gpt-2"));
    }

    #[test]
    fn template_post_processor_sets_add_bos() {
        let post = serde_json::json!({"type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [], "special_tokens": {"<|endoftext|>": {"id": "<|endoftext|>", "ids": [4], "tokens": ["<|endoftext|>"]}}});
        let t = convert(
            Path::new("t.json"),
            &tokenizer_json(gpt2_pre(), post),
            &Json::Null,
            &config(5),
        )
        .unwrap();
        assert!(t.add_bos_token && !t.add_eos_token);
    }

    #[test]
    fn unrepresentable_tokenizers_name_the_feature() {
        let split = serde_json::json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": "\\d"}, "behavior": "Isolated", "invert": false},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}]});
        let prefix = serde_json::json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true});
        let p = Path::new("t.json");
        for (json, why) in [
            (tokenizer_json(split, Json::Null), "pre-tokenizer Sequence"),
            (
                tokenizer_json(prefix, Json::Null),
                "pre-tokenizer ByteLevel",
            ),
            (tokenizer_json(Json::Null, Json::Null), "no pre-tokenizer"),
        ] {
            let e = convert(p, &json, &Json::Null, &config(5))
                .unwrap_err()
                .to_string();
            assert!(e.contains(why) && e.contains("t.json"), "{e}");
        }
        let mut j = tokenizer_json(gpt2_pre(), Json::Null);
        j["normalizer"] = serde_json::json!({"type": "NFKC"});
        let e = convert(p, &j, &Json::Null, &config(5))
            .unwrap_err()
            .to_string();
        assert!(e.contains("normalizer (NFKC"), "{e}");
        // Qwen's NFC is left out, as llama.cpp's converter leaves it out, and said so.
        j["normalizer"] = serde_json::json!({"type": "NFC"});
        let t = convert(p, &j, &Json::Null, &config(5)).unwrap();
        assert!(t.dropped.is_some_and(|d| d.contains("NFC")));
        j["normalizer"] = Json::Null;
        assert_eq!(
            convert(p, &j, &Json::Null, &config(5)).unwrap().dropped,
            None
        );
        // Sequences count as their steps: NFC alone (nested or twice) is NFC, an empty one
        // nothing, and the step at fault is named.
        let nfc = serde_json::json!({"type": "NFC"});
        let seq = |steps: Vec<Json>| serde_json::json!({"type": "Sequence", "normalizers": steps});
        for (n, dropped) in [
            (seq(vec![nfc.clone()]), true),
            (seq(vec![nfc.clone(), seq(vec![nfc.clone()])]), true),
            (seq(vec![]), false),
        ] {
            j["normalizer"] = n;
            let t = convert(p, &j, &Json::Null, &config(5)).unwrap();
            assert_eq!(t.dropped.is_some(), dropped);
        }
        j["normalizer"] = seq(vec![nfc, serde_json::json!({"type": "Lowercase"})]);
        let e = convert(p, &j, &Json::Null, &config(5))
            .unwrap_err()
            .to_string();
        assert!(e.contains("normalizer (Lowercase"), "{e}");
        let mut j = tokenizer_json(gpt2_pre(), Json::Null);
        j["model"]["type"] = "Unigram".into();
        let e = convert(p, &j, &Json::Null, &config(5))
            .unwrap_err()
            .to_string();
        assert!(e.contains("\"Unigram\""), "{e}");
        let mut j = tokenizer_json(gpt2_pre(), Json::Null);
        j["model"]["vocab"]["a b"] = 9.into();
        let e = convert(p, &j, &Json::Null, &config(10))
            .unwrap_err()
            .to_string();
        assert!(e.contains("not in byte-level form"), "{e}");
        let mut j = tokenizer_json(gpt2_pre(), Json::Null);
        j["added_tokens"][0]["lstrip"] = true.into();
        let e = convert(p, &j, &Json::Null, &config(5))
            .unwrap_err()
            .to_string();
        assert!(e.contains("lstrip"), "{e}");
        let e = convert(
            p,
            &tokenizer_json(gpt2_pre(), Json::Null),
            &Json::Null,
            &config(4),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("vocab_size 4"), "{e}");
    }

    #[test]
    fn pre_tokenizer_families_and_ignore_merges() {
        let bl = |regex: bool| serde_json::json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": regex});
        let split = |re: &str| serde_json::json!({"type": "Split", "pattern": {"Regex": re}, "behavior": "Isolated", "invert": false});
        let seq = |v: Vec<Json>| serde_json::json!({"type": "Sequence", "pretokenizers": v});
        let digits = |individual: bool| serde_json::json!({"type": "Digits", "individual_digits": individual});
        assert_eq!(pre_tokenizer_family(&bl(true)), Some("gpt-2"));
        assert_eq!(pre_tokenizer_family(&seq(vec![bl(true)])), Some("gpt-2"));
        assert_eq!(
            pre_tokenizer_family(&seq(vec![digits(true), bl(true)])),
            Some("smollm")
        );
        assert_eq!(
            pre_tokenizer_family(&seq(vec![split(LLAMA3_REGEX), bl(false)])),
            Some("llama-bpe")
        );
        assert_eq!(
            pre_tokenizer_family(&seq(vec![split(QWEN2_REGEX), bl(false)])),
            Some("qwen2")
        );
        for other in [
            bl(false),
            seq(vec![digits(false), bl(true)]),
            seq(vec![split(LLAMA3_REGEX), bl(true)]),
            seq(vec![split("\\p{N}"), bl(false)]),
            seq(vec![bl(true), digits(true)]),
        ] {
            assert_eq!(pre_tokenizer_family(&other), None, "{other}");
        }
        let mut j = tokenizer_json(seq(vec![split(LLAMA3_REGEX), bl(false)]), Json::Null);
        let e = convert(Path::new("t"), &j, &Json::Null, &config(5))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("ignore_merges = false with a \"llama-bpe\""),
            "{e}"
        );
        j["model"]["ignore_merges"] = true.into();
        assert_eq!(
            convert(Path::new("t"), &j, &Json::Null, &config(5))
                .unwrap()
                .pre,
            "llama-bpe"
        );
        let mut j = tokenizer_json(gpt2_pre(), Json::Null);
        j["model"]["ignore_merges"] = true.into();
        assert!(convert(Path::new("t"), &j, &Json::Null, &config(5)).is_err());
    }

    #[test]
    fn chat_family_from_template_or_tokens() {
        let json = tokenizer_json(gpt2_pre(), Json::Null);
        let family = |template: &str| {
            let cfg = serde_json::json!({ "chat_template": template });
            chat_family(&convert(Path::new("t"), &json, &cfg, &config(5)).unwrap())
        };
        let role_turns = |open: &str, close: &str, assistant: &str| {
            format!(
                "{{% for m in messages %}}{open}{{{{ m.role }}}}\n{{{{ m.content }}}}{close}{{% \
                 endfor %}}{{% if add_generation_prompt %}}{open}{assistant}\n{{% endif %}}"
            )
        };
        assert_eq!(family(crate::chat::CHATML), Some(ChatFamily::ChatMl));
        // The real templates: Qwen3's reasoning blocks make it Qwen3, Qwen2.5's is ChatML.
        let fixture = |name: &str| {
            let path = Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/fixtures/chat_templates")
                .join(name);
            std::fs::read_to_string(path).unwrap()
        };
        assert_eq!(family(&fixture("qwen3.jinja")), Some(ChatFamily::Qwen3));
        assert_eq!(
            family(&fixture("qwen3-thinking.jinja")),
            Some(ChatFamily::Qwen3Thinking)
        );
        assert_eq!(family(&fixture("qwen2.5.jinja")), Some(ChatFamily::ChatMl));
        assert_eq!(family(&fixture("llama3.1.jinja")), Some(ChatFamily::Llama3));
        assert_eq!(family(&fixture("gemma2.jinja")), Some(ChatFamily::Gemma));
        assert_eq!(family(&fixture("gemma3.jinja")), Some(ChatFamily::Gemma));
        assert_eq!(family(&fixture("phi3.5.jinja")), Some(ChatFamily::Phi3));
        assert_eq!(family(&fixture("mistral.jinja")), Some(ChatFamily::Mistral));
        assert_eq!(
            family(&role_turns("<start_of_turn>", "<end_of_turn>\n", "model")),
            Some(ChatFamily::Gemma)
        );
        let phi = "{% for m in messages %}{{ '<|' + m.role + '|>\\n' + m.content + '<|end|>\\n' }}\
                   {% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}";
        assert_eq!(family(phi), Some(ChatFamily::Phi3));
        assert_eq!(family(&phi.replace("|>\\n", "|>")), None);
        let mistral = "{{ bos_token }}{% for m in messages %}{% if m.role == 'user' %}{{ '[INST] ' \
                       + m.content + ' [/INST]' }}{% else %}{{ m.content + eos_token }}{% endif \
                       %}{% endfor %}";
        assert_eq!(family(mistral), Some(ChatFamily::Mistral));
        assert_eq!(
            family("{% for m in messages %}<|start_header_id|>{{ m.bogus() }}{% endfor %}"),
            Some(ChatFamily::Llama3)
        );
        // A template is never rendered here: a renderer's memory is not bounded.
        assert_eq!(family("{{ 'x' * 100000000000 }}"), None);
        assert_eq!(family("{{ messages[0].content }}"), None);
        let mut t = convert(Path::new("t"), &json, &Json::Null, &config(5)).unwrap();
        assert_eq!(chat_family(&t), None);
        t.tokens[4] = "<|start_header_id|>".into();
        assert_eq!(chat_family(&t), Some(ChatFamily::Llama3));
        for f in ChatFamily::ALL {
            crate::spec::publish::check_template(f.template()).unwrap();
        }
    }
}
