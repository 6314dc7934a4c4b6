//! Job-file section `[publish]`: where and how a finished model is published to Ollama.
//!
//! Everything here is pure: the section's types, Ollama's model-name rules (so that a bad name
//! is refused at submit time with a line and column, not hours later after training) and a
//! structural check of Go `text/template` sources. The `publish` module (L2) does the IO.
//!
//! ```toml
//! [publish]
//! ollama_name = "local/tiny-chat:v1"      # required; Ollama's rules, stored lower-case
//! quantization = "q8_0"                   # f32 | f16 (default) | q8_0 | q4_0 | q4_k
//! models_dir = "/usr/share/ollama/.ollama/models"  # default: the daemon's --ollama-models
//! template = "{{ .Prompt }}"              # Go template; default from the chat template family
//! system = "You are terse."
//! license = "MIT"
//! [publish.parameters]
//! stop = ["<|im_end|>"]
//! temperature = 0.7
//! num_ctx = 2048
//! ```

use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::toml_source::Issue;

/// `[publish]`: publish the trained model into an Ollama model directory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublishSpec {
    /// The Ollama model name: `name[:tag]`, `namespace/name[:tag]` or
    /// `host/namespace/name[:tag]`; the tag defaults to `latest`. Stored lower-case.
    pub ollama_name: String,
    /// Tensor type of the 2-D weights in the GGUF (norms stay f32).
    #[serde(default)]
    pub quantization: Quantization,
    /// Ollama's models directory; default: the daemon's `--ollama-models` (usually
    /// `~/.ollama/models` for a user's `ollama serve`, `/usr/share/ollama/.ollama/models` for
    /// the systemd service installed by Ollama's script). Must be absolute.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub models_dir: Option<PathBuf>,
    /// Go `text/template` prompt template (Ollama's `TEMPLATE`). Default: ChatML or Llama-3
    /// when the tokenizer's chat template is of that family, else `{{ .Prompt }}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<String>,
    /// Default system prompt (Ollama's `SYSTEM`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system: Option<String>,
    /// Default request options (Ollama's `PARAMETER` lines).
    #[serde(default, skip_serializing_if = "Parameters::is_empty")]
    pub parameters: Parameters,
    /// License text shipped with the model (Ollama's `LICENSE`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub license: Option<String>,
}

impl PublishSpec {
    /// A `[publish]` with only a name; everything else takes its default.
    pub fn named(name: &str) -> Self {
        PublishSpec {
            ollama_name: name.to_string(),
            quantization: Quantization::default(),
            models_dir: None,
            template: None,
            system: None,
            parameters: Parameters::default(),
            license: None,
        }
    }
}

/// The tensor type of the published 2-D weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Quantization {
    /// 32-bit floats: exact, 4 bytes per weight.
    F32,
    /// 16-bit floats: 2 bytes per weight, practically lossless; Ollama's own default.
    #[default]
    F16,
    /// 8-bit blocks of 32 with an f16 scale: 1.06 bytes per weight.
    #[serde(rename = "q8_0")]
    Q8_0,
    /// 4-bit blocks of 32 with an f16 scale: 0.56 bytes per weight, noticeably lossy.
    #[serde(rename = "q4_0")]
    Q4_0,
    /// ggml's 4-bit k-quant (super-blocks of 256, 6-bit scales and minimums): 0.56 bytes per
    /// weight, better than q4_0; needs every weight's input dimension to be a multiple of 256.
    #[serde(rename = "q4_k")]
    Q4K,
}

impl Quantization {
    /// How many weights of a row one block holds: a weight's input dimension must be a
    /// multiple of it (ggml's block sizes).
    pub fn block_elements(self) -> usize {
        match self {
            Quantization::F32 | Quantization::F16 => 1,
            Quantization::Q8_0 | Quantization::Q4_0 => 32,
            Quantization::Q4K => 256,
        }
    }

    /// Every supported value, in the order documented.
    pub const ALL: [Quantization; 5] = [
        Quantization::F32,
        Quantization::F16,
        Quantization::Q8_0,
        Quantization::Q4_0,
        Quantization::Q4K,
    ];

    /// The job-file spelling (`"q8_0"`).
    pub fn as_str(self) -> &'static str {
        match self {
            Quantization::F32 => "f32",
            Quantization::F16 => "f16",
            Quantization::Q8_0 => "q8_0",
            Quantization::Q4_0 => "q4_0",
            Quantization::Q4K => "q4_k",
        }
    }
}

impl fmt::Display for Quantization {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Quantization {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Quantization::ALL
            .into_iter()
            .find(|q| q.as_str().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| format!("unknown quantization {s:?} (use f32, f16, q8_0, q4_0 or q4_k)"))
    }
}

/// `[publish.parameters]`: Ollama's request options, typed as Ollama's `api.Options` /
/// `api.Runner` so the params layer holds exactly the JSON types Ollama accepts (an unknown
/// key would only be logged and ignored by Ollama, so it is refused here instead). Floats are
/// f64 here (Ollama's are f32) so that `0.7` is written as `0.7`, not `0.699999988`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(missing_docs)] // Ollama's option names; see Ollama's api.Options docs
pub struct Parameters {
    /// Stop sequences (always an array, as Ollama writes it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    /// Context window in tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_ctx: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_predict: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_keep: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_k: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_p: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub typical_p: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repeat_last_n: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repeat_penalty: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub presence_penalty: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frequency_penalty: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_batch: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_gpu: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub main_gpu: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub use_mmap: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_thread: Option<u32>,
}

impl Parameters {
    /// True when no option is set.
    pub fn is_empty(&self) -> bool {
        *self == Parameters::default()
    }
}

/// Ollama's default host, namespace and tag (`types/model/name.go`).
pub const DEFAULT_HOST: &str = "registry.ollama.ai";
/// See [`DEFAULT_HOST`].
pub const DEFAULT_NAMESPACE: &str = "library";
/// See [`DEFAULT_HOST`].
pub const DEFAULT_TAG: &str = "latest";

/// A fully qualified, lower-case Ollama model name. Each part obeys Ollama's `isValidPart`,
/// which also guarantees it is a single, harmless path component (no `/`, no leading `.`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ModelName {
    /// Registry host, default `registry.ollama.ai` (may carry a `:port`).
    pub host: String,
    /// Namespace, default `library`.
    pub namespace: String,
    /// Model name.
    pub model: String,
    /// Tag, default `latest`.
    pub tag: String,
}

/// Why a model name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid Ollama model name {name:?}: {reason}")]
pub struct ModelNameError {
    /// The name as given.
    pub name: String,
    /// Which rule it breaks.
    pub reason: String,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum PartKind {
    Host,
    Namespace,
    Model,
    Tag,
}

impl PartKind {
    fn label(self) -> &'static str {
        match self {
            PartKind::Host => "host",
            PartKind::Namespace => "namespace",
            PartKind::Model => "model",
            PartKind::Tag => "tag",
        }
    }
}

/// Ollama's `isValidPart`: 1–80 bytes (host 350), first `[A-Za-z0-9_]`, then also `-` and `.`
/// (`.` not in a namespace) and `:` (host only, as a port). A host is also a directory name in
/// the store, so it must fit a file name (255 bytes): a longer one, which Ollama's rule allows,
/// would fail only when the manifest is written, after the whole export.
fn check_part(kind: PartKind, s: &str) -> Result<(), String> {
    let max = if kind == PartKind::Host { 255 } else { 80 };
    if s.is_empty() {
        return Err(format!("the {} is empty", kind.label()));
    }
    if s.len() > max {
        return Err(format!(
            "the {} is longer than {max} characters",
            kind.label()
        ));
    }
    let alnum = |c: char| c.is_ascii_alphanumeric() || c == '_';
    for (i, c) in s.chars().enumerate() {
        let ok = if i == 0 {
            alnum(c)
        } else {
            alnum(c)
                || c == '-'
                || (c == '.' && kind != PartKind::Namespace)
                || (c == ':' && kind == PartKind::Host)
        };
        if !ok {
            return Err(if i == 0 {
                format!(
                    "the {} {s:?} must start with a letter, digit or '_'",
                    kind.label()
                )
            } else {
                format!(
                    "the {} {s:?} may only contain letters, digits, '_', '-'{}",
                    kind.label(),
                    match kind {
                        PartKind::Namespace => "",
                        PartKind::Host => ", '.' and ':'",
                        _ => " and '.'",
                    }
                )
            });
        }
    }
    Ok(())
}

impl ModelName {
    /// Parses `[[host/]namespace/]model[:tag]` with Ollama's rules, filling Ollama's defaults
    /// (`registry.ollama.ai`, `library`, `latest`) and lower-casing every part (Ollama looks
    /// names up case-insensitively; one spelling on disk avoids duplicates).
    pub fn parse(s: &str) -> Result<ModelName, ModelNameError> {
        let err = |reason: String| ModelNameError {
            name: s.to_string(),
            reason,
        };
        if s.contains("://") {
            return Err(err("give the name without a scheme".into()));
        }
        if s.contains('@') {
            return Err(err("a digest (@sha256-...) cannot be published to".into()));
        }
        // A ':' after the last '/' starts the tag; one before it can only be a host's port.
        let last_slash = s.rfind('/');
        let (path, tag) = match s.rfind(':') {
            Some(colon) if last_slash.is_none_or(|sl| colon > sl) => {
                (&s[..colon], Some(&s[colon + 1..]))
            }
            _ => (s, None),
        };
        let parts: Vec<&str> = path.split('/').collect();
        let (host, namespace, model) = match parts.as_slice() {
            [m] => (None, None, *m),
            [n, m] => (None, Some(*n), *m),
            [h, n, m] => (Some(*h), Some(*n), *m),
            _ => {
                return Err(err(
                    "expected [host/][namespace/]model[:tag] (at most two '/')".into(),
                ));
            }
        };
        let name = ModelName {
            host: host.unwrap_or(DEFAULT_HOST).to_ascii_lowercase(),
            namespace: namespace.unwrap_or(DEFAULT_NAMESPACE).to_ascii_lowercase(),
            model: model.to_ascii_lowercase(),
            tag: tag.unwrap_or(DEFAULT_TAG).to_ascii_lowercase(),
        };
        check_part(PartKind::Host, &name.host).map_err(err)?;
        check_part(PartKind::Namespace, &name.namespace).map_err(err)?;
        check_part(PartKind::Model, &name.model).map_err(err)?;
        check_part(PartKind::Tag, &name.tag).map_err(err)?;
        Ok(name)
    }

    /// What `ollama list` shows (`DisplayShortest`): the default host and namespace are
    /// dropped, the tag is always shown (`mymodel:latest`, `local/mymodel:v1`).
    pub fn display_shortest(&self) -> String {
        let mut s = String::new();
        if self.host != DEFAULT_HOST {
            s.push_str(&self.host);
            s.push('/');
            s.push_str(&self.namespace);
            s.push('/');
        } else if self.namespace != DEFAULT_NAMESPACE {
            s.push_str(&self.namespace);
            s.push('/');
        }
        s.push_str(&self.model);
        s.push(':');
        s.push_str(&self.tag);
        s
    }

    /// The manifest's path below `<models>/manifests/`: `host/namespace/model/tag`.
    pub fn manifest_relpath(&self) -> PathBuf {
        [&self.host, &self.namespace, &self.model, &self.tag]
            .iter()
            .collect()
    }
}

impl fmt::Display for ModelName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/{}/{}:{}",
            self.host, self.namespace, self.model, self.tag
        )
    }
}

/// Functions a template may call: Go's builtins plus the ones Ollama adds
/// (`template/template.go`: `json`, `currentDate`, `toTypeScriptType`).
const TEMPLATE_FUNCS: [&str; 22] = [
    "and",
    "or",
    "not",
    "len",
    "index",
    "slice",
    "print",
    "printf",
    "println",
    "html",
    "js",
    "urlquery",
    "call",
    "eq",
    "ne",
    "lt",
    "le",
    "gt",
    "ge",
    "json",
    "currentDate",
    "toTypeScriptType",
];

/// Checks a Go `text/template` source the way Ollama's parser would reject it: unterminated
/// actions, strings or comments, unbalanced `if`/`range`/`with`/`define`/`block` and `end`,
/// `else` outside a block, unbalanced parentheses, calls to functions Ollama does not define
/// and variables used outside their scope (Go's parser: a variable lives until the `end` of
/// the control structure it is declared in, `define`/`block` bodies start with only `$`). It
/// is a structural check, not a full Go parser.
pub fn check_template(src: &str) -> Result<(), String> {
    #[derive(PartialEq)]
    enum Block {
        If,
        Range,
        With,
        Define,
    }
    // Each open block remembers the variables in scope before it.
    let mut stack: Vec<(Block, usize, Vec<String>)> = Vec::new();
    let mut vars: Vec<String> = vec!["$".into()];
    let mut rest = src;
    let mut offset = 0usize;
    let line_of = |at: usize| src[..at].matches('\n').count() + 1;
    while let Some(open) = rest.find("{{") {
        let start = offset + open;
        let after_open = &rest[open + 2..];
        let (action, consumed) = scan_action(after_open).map_err(|e| {
            format!(
                "line {}: {e} in the action starting {:?}",
                line_of(start),
                snippet(&src[start..])
            )
        })?;
        let at = format!("line {}", line_of(start));
        let body = strip_trim_markers(action);
        if !(body.starts_with("/*") && body.ends_with("*/")) {
            let words = tokenize_action(body).map_err(|e| format!("{at}: {e}"))?;
            let first = words.first().map(String::as_str).unwrap_or("");
            match first {
                "" => return Err(format!("{at}: empty action {{{{}}}}")),
                "if" => stack.push((Block::If, start, vars.clone())),
                "range" => stack.push((Block::Range, start, vars.clone())),
                "with" => stack.push((Block::With, start, vars.clone())),
                "define" | "block" => {
                    // `block` evaluates its pipeline here, then its body is a new template.
                    if first == "block" {
                        check_variables(&words, &mut vars).map_err(|e| format!("{at}: {e}"))?;
                    }
                    stack.push((Block::Define, start, vars.clone()));
                    vars = vec!["$".into()];
                }
                "else" => match stack.last() {
                    Some((Block::If | Block::Range | Block::With, _, _)) => {}
                    _ => return Err(format!("{at}: {{{{ else }}}} outside if/range/with")),
                },
                "end" => match stack.pop() {
                    Some((_, _, before)) => vars = before,
                    None => {
                        return Err(format!("{at}: {{{{ end }}}} without an opening action"));
                    }
                },
                "break" | "continue" if !stack.iter().any(|(b, _, _)| *b == Block::Range) => {
                    return Err(format!("{at}: {{{{ {first} }}}} outside range"));
                }
                _ => {}
            }
            if !matches!(first, "define" | "block") {
                check_variables(&words, &mut vars).map_err(|e| format!("{at}: {e}"))?;
            }
            for w in &words {
                let is_ident = w.chars().next().is_some_and(|c| c.is_ascii_alphabetic());
                let keyword = matches!(
                    w.as_str(),
                    "if" | "else"
                        | "end"
                        | "range"
                        | "with"
                        | "define"
                        | "block"
                        | "template"
                        | "break"
                        | "continue"
                        | "nil"
                        | "true"
                        | "false"
                );
                if is_ident && !keyword && !TEMPLATE_FUNCS.contains(&w.as_str()) {
                    return Err(format!("{at}: function {w:?} not defined"));
                }
            }
        }
        let advance = open + 2 + consumed;
        offset += advance;
        rest = &rest[advance..];
    }
    if let Some((_, start, _)) = stack.last() {
        return Err(format!(
            "line {}: {:?} has no matching {{{{ end }}}}",
            line_of(*start),
            snippet(&src[*start..])
        ));
    }
    Ok(())
}

/// Checks that every variable an action uses is in scope, then adds the ones it declares
/// (`$x := …`, `range $i, $m := …`). `$x = …` assigns, so `$x` must exist already.
fn check_variables(words: &[String], vars: &mut Vec<String>) -> Result<(), String> {
    // `$x:=1` is one word to the tokenizer; split it as Go's lexer would.
    let mut split: Vec<&str> = Vec::new();
    for w in words {
        match w.starts_with('$').then(|| w.find(":=")).flatten() {
            Some(i) if i > 0 => {
                split.push(&w[..i]);
                split.push(":=");
                if i + 2 < w.len() {
                    split.push(&w[i + 2..]);
                }
            }
            _ => split.push(w),
        }
    }
    let declares = split.iter().position(|w| *w == ":=");
    let mut declared = Vec::new();
    for (i, w) in split.iter().enumerate() {
        if !w.starts_with('$') {
            continue;
        }
        // `$m.Content` uses `$m`; `$.Messages` uses `$`.
        let name = match w[1..].find('.') {
            Some(dot) => &w[..dot + 1],
            None => w,
        };
        if declares.is_some_and(|d| i < d) {
            declared.push(name.to_string());
        } else if !vars.iter().any(|v| v == name) {
            return Err(format!("undefined variable {name:?}"));
        }
    }
    vars.extend(declared);
    Ok(())
}

/// Removes Go's trim markers: `{{- ` and ` -}}` (a `-` next to the braces followed or
/// preceded by white space; `{{-3}}` is the number -3, not a marker).
fn strip_trim_markers(action: &str) -> &str {
    let mut body = action;
    if let Some(rest) = body.strip_prefix('-')
        && rest.starts_with(char::is_whitespace)
    {
        body = rest;
    }
    if let Some(rest) = body.strip_suffix('-')
        && rest.ends_with(char::is_whitespace)
    {
        body = rest;
    }
    body.trim()
}

fn snippet(s: &str) -> String {
    s.chars().take(24).collect()
}

/// Finds the `}}` closing an action, skipping strings, raw strings, characters and comments.
/// Returns the action's text and how many bytes were consumed, `}}` included.
fn scan_action(s: &str) -> Result<(&str, usize), &'static str> {
    let bytes = s.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'}' if bytes.get(i + 1) == Some(&b'}') => return Ok((&s[..i], i + 2)),
            b'"' | b'\'' => {
                let quote = bytes[i];
                i += 1;
                loop {
                    match bytes.get(i) {
                        None | Some(b'\n') => return Err("unterminated quoted string"),
                        Some(b'\\') => i += 2,
                        Some(c) if *c == quote => break,
                        Some(_) => i += 1,
                    }
                }
            }
            b'`' => match s[i + 1..].find('`') {
                Some(end) => i += end + 1,
                None => return Err("unterminated raw string"),
            },
            b'/' if bytes.get(i + 1) == Some(&b'*') => match s[i + 2..].find("*/") {
                Some(end) => i += end + 3,
                None => return Err("unclosed comment"),
            },
            _ => {}
        }
        i += 1;
    }
    Err("unclosed action (no matching }})")
}

/// Splits an action into words: identifiers, fields (`.Content`), variables, literals and
/// operators. Strings become one word. Checks that parentheses balance.
fn tokenize_action(body: &str) -> Result<Vec<String>, String> {
    let mut words = Vec::new();
    let mut depth = 0i32;
    let chars: Vec<char> = body.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c.is_whitespace() || c == ',' || c == '|' {
            i += 1;
        } else if c == '(' || c == ')' {
            depth += if c == '(' { 1 } else { -1 };
            if depth < 0 {
                return Err("unexpected ')' in an action".into());
            }
            i += 1;
        } else if c == '"' || c == '\'' || c == '`' {
            let mut j = i + 1;
            while j < chars.len() && chars[j] != c {
                j += if chars[j] == '\\' && c != '`' { 2 } else { 1 };
            }
            words.push(chars[i..(j + 1).min(chars.len())].iter().collect());
            i = j + 1;
        } else {
            let mut j = i;
            while j < chars.len() && !(chars[j].is_whitespace() || "(),|\"'`".contains(chars[j])) {
                j += 1;
            }
            words.push(chars[i..j].iter().collect());
            i = j;
        }
    }
    if depth != 0 {
        return Err("unbalanced parentheses in an action".into());
    }
    Ok(words)
}

/// Problems in `[publish]`.
pub fn validate(publish: &PublishSpec) -> Vec<Issue> {
    let mut issues = Vec::new();
    if let Err(e) = ModelName::parse(&publish.ollama_name) {
        issues.push(Issue::new("publish.ollama_name", e.reason));
    }
    if let Some(dir) = &publish.models_dir
        && !dir.is_absolute()
    {
        issues.push(Issue::new(
            "publish.models_dir",
            "must be an absolute path, e.g. /usr/share/ollama/.ollama/models (systemd \
                 service) or /home/USER/.ollama/models (a user's `ollama serve`)",
        ));
    }
    if let Some(t) = &publish.template {
        if t.trim().is_empty() {
            issues.push(Issue::new(
                "publish.template",
                "must not be empty (leave it out for the default)",
            ));
        } else if let Err(e) = check_template(t) {
            issues.push(Issue::new(
                "publish.template",
                format!("not a valid Go template: {e}"),
            ));
        }
    }
    for (key, text) in [("system", &publish.system), ("license", &publish.license)] {
        if let Some(t) = text {
            if t.trim().is_empty() {
                issues.push(Issue::new(
                    format!("publish.{key}"),
                    "must not be empty (leave it out instead)",
                ));
            } else if t.contains('\0') {
                issues.push(Issue::new(format!("publish.{key}"), "must not contain NUL"));
            }
        }
    }
    let p = &publish.parameters;
    if let Some(stop) = &p.stop {
        for (i, s) in stop.iter().enumerate() {
            if s.is_empty() {
                issues.push(Issue::new(
                    format!("publish.parameters.stop[{i}]"),
                    "a stop sequence must not be empty",
                ));
            }
        }
    }
    let mut range = |key: &str, v: Option<f64>, lo: f64, hi: f64| {
        if let Some(v) = v
            && !(v.is_finite() && (lo..=hi).contains(&v))
        {
            issues.push(Issue::new(
                format!("publish.parameters.{key}"),
                format!("must be between {lo} and {hi}"),
            ));
        }
    };
    range("temperature", p.temperature, 0.0, 100.0);
    range("top_p", p.top_p, 0.0, 1.0);
    range("min_p", p.min_p, 0.0, 1.0);
    range("typical_p", p.typical_p, 0.0, 1.0);
    range("repeat_penalty", p.repeat_penalty, 0.0, 100.0);
    range("presence_penalty", p.presence_penalty, -100.0, 100.0);
    range("frequency_penalty", p.frequency_penalty, -100.0, 100.0);
    if p.num_ctx == Some(0) {
        issues.push(Issue::new(
            "publish.parameters.num_ctx",
            "must be at least 1",
        ));
    }
    issues
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> Result<String, String> {
        ModelName::parse(s)
            .map(|n| n.to_string())
            .map_err(|e| e.reason)
    }

    #[test]
    fn names_fill_ollama_defaults_and_lowercase() {
        assert_eq!(
            name("Tiny").unwrap(),
            "registry.ollama.ai/library/tiny:latest"
        );
        assert_eq!(
            name("local/tiny-chat:v1.2").unwrap(),
            "registry.ollama.ai/local/tiny-chat:v1.2"
        );
        assert_eq!(
            name("example.com:5000/team/m_1:Q8").unwrap(),
            "example.com:5000/team/m_1:q8"
        );
        // A ':' before the last '/' is a port, not a tag.
        assert_eq!(
            name("example.com:5000/team/m").unwrap(),
            "example.com:5000/team/m:latest"
        );
        let n = ModelName::parse("local/tiny:v1").unwrap();
        assert_eq!(n.display_shortest(), "local/tiny:v1");
        assert_eq!(
            ModelName::parse("tiny").unwrap().display_shortest(),
            "tiny:latest"
        );
        assert_eq!(
            ModelName::parse("h.io/ns/tiny:t")
                .unwrap()
                .display_shortest(),
            "h.io/ns/tiny:t"
        );
        assert_eq!(
            n.manifest_relpath(),
            PathBuf::from("registry.ollama.ai/local/tiny/v1")
        );
    }

    #[test]
    fn names_break_ollama_rules_are_refused() {
        for (bad, why) in [
            ("", "model is empty"),
            ("tiny:", "tag is empty"),
            ("../etc/passwd", "must start with"),
            ("a/../b", "must start with"),
            (".hidden", "must start with"),
            ("-x", "must start with"),
            ("my.ns/tiny", "namespace \"my.ns\" may only contain"),
            ("ti ny", "may only contain"),
            ("tïny", "may only contain"),
            ("a/b/c/d", "at most two '/'"),
            ("tiny:v1:v2", "may only contain"),
            ("https://x/y/z", "scheme"),
            ("tiny@sha256-00", "digest"),
        ] {
            let e = name(bad).unwrap_err();
            assert!(e.contains(why), "{bad:?}: {e}");
        }
        assert!(name(&"m".repeat(80)).is_ok());
        assert!(
            name(&"m".repeat(81))
                .unwrap_err()
                .contains("longer than 80")
        );
        // A host is a directory name in the store: at most 255 bytes (QA: 300 passed the
        // check and failed at the end of the export with "File name too long").
        assert!(name(&format!("{}/ns/m", "h".repeat(255))).is_ok());
        assert!(
            name(&format!("{}/ns/m", "h".repeat(256)))
                .unwrap_err()
                .contains("host is longer than 255")
        );
    }

    #[test]
    fn quantization_parses_case_insensitively() {
        assert_eq!("Q8_0".parse::<Quantization>().unwrap(), Quantization::Q8_0);
        assert!("q4_k_m".parse::<Quantization>().is_err());
        assert_eq!(Quantization::default(), Quantization::F16);
    }

    #[test]
    fn ollama_templates_pass_the_check() {
        // Ollama's own chatml.gotmpl and llama3-instruct.gotmpl.
        check_template(
            "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n",
        )
        .unwrap();
        check_template(
            "{{ if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>{{ end }}{{ if .Prompt }}<|start_header_id|>user<|end_header_id|>\n\n{{ .Prompt }}<|eot_id|>{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n{{ .Response }}<|eot_id|>",
        )
        .unwrap();
        check_template("{{ .Prompt }}").unwrap();
        check_template(
            "{{- /* a comment with }} inside */ -}}{{ if and .System (ne .System \"}}\") }}{{ json .System }}{{ else if .Tools }}x{{ else }}y{{ end }}{{ range $i, $m := .Messages }}{{ if eq $i 3 }}{{ break }}{{ end }}{{ end }}",
        )
        .unwrap();
        check_template("{{ printf `%q` .Prompt | print }}").unwrap();
        // Variables in scope, as in Ollama's llama3.1 template with tools.
        check_template(
            "{{- range $i, $_ := .Messages }}{{- $last := eq (len (slice $.Messages $i)) 1 }}{{ if $last }}{{ $_.Content }}{{ end }}{{ end }}",
        )
        .unwrap();
        check_template("{{ $x := 1 }}{{ $x = 2 }}{{ if $y:=.System }}{{ $y }}{{ else }}{{ $y }}{{ end }}{{ $x }}")
            .unwrap();
        check_template("{{ define \"t\" }}{{ $ }}{{ $.Prompt }}{{ end }}{{ template \"t\" . }}")
            .unwrap();
    }

    #[test]
    fn broken_templates_are_refused_with_a_line() {
        for (bad, why) in [
            ("{{ .Prompt }", "unclosed action"),
            (
                "a\n{{ if .System }}x",
                "line 2: \"{{ if .System }}x\" has no matching",
            ),
            ("{{ end }}", "without an opening"),
            ("{{ else }}", "outside if/range/with"),
            ("{{ .Prompt \"x }}", "unterminated quoted string"),
            ("{{ upper .Prompt }}", "function \"upper\" not defined"),
            ("{{ (len .Messages }}", "unbalanced parentheses"),
            ("{{ }}", "empty action"),
            ("{{ break }}", "outside range"),
            ("{{/* open", "unclosed comment"),
            // Found by QA: published, then Ollama failed to parse it.
            (
                "{{ range $i, $m := .Messages }}{{ $m.Content }}{{ end }}{{ $m.Role }}",
                "undefined variable \"$m\"",
            ),
            ("{{ $y }}", "undefined variable \"$y\""),
            ("{{ if true }}{{ $a := 1 }}{{ end }}{{ $a }}", "\"$a\""),
            ("{{ $z = 1 }}", "\"$z\""),
            ("{{ $x := 1 }}{{ define \"t\" }}{{ $x }}{{ end }}", "\"$x\""),
        ] {
            let e = check_template(bad).unwrap_err();
            assert!(e.contains(why), "{bad:?}: {e}");
        }
    }

    #[test]
    fn validate_names_the_keys_at_fault() {
        let spec = PublishSpec {
            ollama_name: "bad name".into(),
            quantization: Quantization::Q8_0,
            models_dir: Some("relative/models".into()),
            template: Some("{{ if .System }}".into()),
            system: Some(" ".into()),
            parameters: Parameters {
                stop: Some(vec!["".into()]),
                top_p: Some(1.5),
                num_ctx: Some(0),
                ..Parameters::default()
            },
            license: None,
        };
        let keys: Vec<String> = validate(&spec).into_iter().map(|i| i.key).collect();
        assert_eq!(
            keys,
            [
                "publish.ollama_name",
                "publish.models_dir",
                "publish.template",
                "publish.system",
                "publish.parameters.stop[0]",
                "publish.parameters.top_p",
                "publish.parameters.num_ctx",
            ]
        );
        let ok = PublishSpec {
            ollama_name: "local/tiny:v1".into(),
            quantization: Quantization::F16,
            models_dir: None,
            template: None,
            system: None,
            parameters: Parameters::default(),
            license: None,
        };
        assert!(validate(&ok).is_empty());
    }

    #[test]
    fn job_file_section_parses_and_is_located() {
        let text = "kind = \"command\"\n[command]\nargv=[\"x\"]\n";
        assert!(super::super::job::parse("j", text).is_ok());
        // [publish] in a train job: the train sections are another module's; check the
        // section's own deserialisation here.
        let spec: PublishSpec = toml::from_str(
            "ollama_name = \"local/t:v1\"\nquantization = \"q4_0\"\nsystem = \"hi\"\n[parameters]\nstop = [\"<|im_end|>\"]\ntemperature = 0.5\nnum_ctx = 256\n",
        )
        .unwrap();
        assert_eq!(spec.quantization, Quantization::Q4_0);
        assert_eq!(spec.parameters.num_ctx, Some(256));
        let e = toml::from_str::<PublishSpec>("ollama_name = \"t\"\nquantisation = \"f16\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field `quantisation`"), "{e}");
        let e = toml::from_str::<PublishSpec>("ollama_name = \"t\"\n[parameters]\nstops = []\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field `stops`"), "{e}");
        let e = toml::from_str::<PublishSpec>("ollama_name = \"t\"\nquantization = \"q5_1\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown variant `q5_1`"), "{e}");
    }
}
