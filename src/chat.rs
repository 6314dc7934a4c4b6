//! Chat templates. Conversation data, `{"messages": [{"role": ..., "content": ...}, ...]}`,
//! is rendered with the model's Jinja chat template as Hugging Face's `apply_chat_template`
//! renders it, and the bytes of the rendering that are the assistant's replies (the only
//! text trained on) are found. Also: where a model directory keeps its template, and the
//! submit-time checks of a job's conversations and template.
//!
//! A reply's bytes are found by rendering the conversation up to it: the messages before it
//! with the generation prompt (`<|im_start|>assistant\n`), then the messages through it. The
//! bytes between the two renderings are the reply and its end-of-turn marker, so the model
//! learns to end its turn. A template that renders earlier turns differently once later ones
//! follow (e.g. one that drops the reasoning of earlier replies) has no such split, and is
//! refused naming the message. `strftime_now` is the real date, as in `transformers`: a job
//! renders its data once (the tokenized cache in its job directory keeps it for resumes).

use std::ops::Range;
use std::path::Path;

use minijinja::syntax::SyntaxConfig;
use minijinja::value::{Kwargs, Serde, Value};
use minijinja::{Environment, Error, ErrorKind};
use serde_json::Value as Json;

use crate::spec::JobSpec;
use crate::spec::toml_source::Issue;

/// The template used when the model has none of its own: ChatML, whose markers
/// ([`CHATML_TOKENS`]) a tokenizer trained here keeps as single special tokens, and which
/// publishing recognises (Ollama gets its ChatML template and stop words).
pub const CHATML: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' \
     + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ \
     '<|im_start|>assistant\\n' }}{% endif %}";

/// ChatML's turn markers.
pub const CHATML_TOKENS: [&str; 2] = ["<|im_start|>", "<|im_end|>"];

/// Tokens that end a turn in common chat templates (a chat reply stops at any of them).
pub const END_OF_TURN_TOKENS: [&str; 5] = [
    "<|im_end|>",
    "<|eot_id|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
];

/// Work one rendering may do (minijinja's fuel): generous for any real conversation, but a
/// template looping without end stops with an error instead of hanging the worker.
const FUEL: u64 = 50_000_000;

/// A compiled chat template with the special tokens it may use.
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    bos_token: String,
    eos_token: String,
}

/// A rendered conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered {
    /// The whole conversation as the template renders it.
    pub text: String,
    /// Byte ranges of `text` that are trained on: each assistant reply (with `"weight"`
    /// absent or 1) and the template's end-of-turn text after it. Found by comparing
    /// renderings character by character, a range may end a few bytes into the next turn's
    /// marker when it begins like the conversation's end (`<|user|>` after `<eos>`): tokens
    /// are trained only when they end within a range ([`trained_tokens`]).
    pub trained: Vec<Range<usize>>,
    /// Whether only the last reply is trained, the template rendering earlier turns
    /// differently once later ones follow.
    pub last_only: bool,
}

fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message))
}

/// Today's date and time in a Python `strftime` format (templates that print the date, such
/// as Llama 3.2's and Mistral Small's, call it).
fn strftime_now(format: String) -> Result<Value, Error> {
    use std::fmt::Write;
    let mut out = String::new();
    write!(out, "{}", chrono::Local::now().format(&format)).map_err(|_| {
        Error::new(
            ErrorKind::InvalidOperation,
            format!("strftime_now: bad format {format:?}"),
        )
    })?;
    Ok(Value::from(out))
}

/// `tojson` as Hugging Face defines it for chat templates (`json.dumps` with
/// `ensure_ascii=False`): no HTML escaping, an optional `indent`.
fn tojson(value: Value, kwargs: Kwargs) -> Result<Value, Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let _: Option<bool> = kwargs.get("ensure_ascii")?;
    let _: Option<bool> = kwargs.get("sort_keys")?;
    kwargs.assert_all_used()?;
    let json = serde_json::to_value(&value)
        .map_err(|e| Error::new(ErrorKind::InvalidOperation, e.to_string()))?;
    let text = match indent {
        None => write_json(&json, PythonSeparators),
        Some(n) => write_json(
            &json,
            serde_json::ser::PrettyFormatter::with_indent(&vec![b' '; n]),
        ),
    };
    Ok(Value::from_safe_string(text))
}

fn write_json(json: &Json, fmt: impl serde_json::ser::Formatter) -> String {
    let mut out = Vec::new();
    let mut ser = serde_json::Serializer::with_formatter(&mut out, fmt);
    serde::Serialize::serialize(json, &mut ser).expect("a JSON value serializes");
    String::from_utf8(out).expect("serde_json writes UTF-8")
}

/// Python's default `json.dumps` separators: `", "` and `": "`.
struct PythonSeparators;

impl serde_json::ser::Formatter for PythonSeparators {
    fn begin_array_value<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        if first { Ok(()) } else { w.write_all(b", ") }
    }

    fn begin_object_key<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        if first { Ok(()) } else { w.write_all(b", ") }
    }

    fn begin_object_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        w.write_all(b": ")
    }
}

/// The template with each backslash-newline inside a string literal of a tag removed:
/// Jinja reads string literals with Python's escapes, where that is a line continuation
/// (Mistral Small 3.1's default system prompt is written so), while minijinja keeps both
/// characters. The literals are found with minijinja's own lexer, so text, comments and raw
/// blocks are left alone; a template the lexer refuses is returned as it is (compiling it
/// reports the error).
fn python_line_continuations(src: &str) -> String {
    use minijinja::machinery::{Token, tokenize};
    if !src.contains("\\\n") && !src.contains("\\\r\n") {
        return src.to_string();
    }
    let mut literals = Vec::new();
    for item in tokenize(src, false, SyntaxConfig::default()) {
        match item {
            Ok((Token::Str(_) | Token::String(_), span)) => {
                literals.push(span.start_offset as usize..span.end_offset as usize);
            }
            Ok(_) => {}
            Err(_) => return src.to_string(),
        }
    }
    let mut out = String::with_capacity(src.len());
    let mut at = 0;
    for lit in literals {
        let Some(text) = src.get(lit.clone()) else {
            return src.to_string();
        };
        out.push_str(&src[at..lit.start]);
        let mut chars = text.chars().peekable();
        while let Some(c) = chars.next() {
            if c != '\\' {
                out.push(c);
                continue;
            }
            match chars.peek() {
                Some('\n') => {
                    chars.next();
                }
                Some('\r') => {
                    let mut ahead = chars.clone();
                    ahead.next();
                    if ahead.peek() == Some(&'\n') {
                        chars.next();
                        chars.next();
                    } else {
                        out.push(c);
                    }
                }
                // Any other escape stays as it is (an escaped backslash is no continuation).
                Some(&d) => {
                    out.push(c);
                    out.push(d);
                    chars.next();
                }
                None => out.push(c),
            }
        }
        at = lit.end;
    }
    out.push_str(&src[at..]);
    out
}

/// Most tokens in one tag (`{{ }}`, `{% %}`); real templates' longest have under 100.
const MAX_TAG_TOKENS: usize = 1024;

/// Refuses a tag of more than [`MAX_TAG_TOKENS`] tokens, counted with minijinja's own lexer
/// (which loops, never recurses). minijinja's parser recurses once per operator of an
/// expression without a limit (`- - - ... 1`, `x.a.a.a...`): a few thousand levels overflow
/// a 2 MiB thread stack, which aborts the process (the daemon's, at submit), and long
/// operator chains take time quadratic in their length. Short tags keep every expression
/// shallow and quick.
fn check_tag_lengths(src: &str) -> Result<(), String> {
    use minijinja::machinery::{Token, tokenize};
    let mut open: Option<(usize, usize)> = None; // (line, tokens so far)
    for item in tokenize(src, false, SyntaxConfig::default()) {
        let (token, span) = item.map_err(|e| describe(&e))?;
        match (token, &mut open) {
            (Token::VariableStart | Token::BlockStart, _) => {
                open = Some((span.start_line as usize, 0));
            }
            (Token::VariableEnd | Token::BlockEnd, _) => open = None,
            (_, Some((line, tokens))) => {
                *tokens += 1;
                if *tokens > MAX_TAG_TOKENS {
                    return Err(format!(
                        "chat template line {line}: a tag of more than {MAX_TAG_TOKENS} \
                         tokens; no more are taken"
                    ));
                }
            }
            (_, None) => {}
        }
    }
    Ok(())
}

/// Checks a template's syntax; the error names the line.
pub fn check_syntax(source: &str) -> Result<(), String> {
    ChatTemplate::new(source, None, None).map(|_| ())
}

impl ChatTemplate {
    /// Compiles `source` with Hugging Face's settings (`trim_blocks`, `lstrip_blocks`,
    /// `raise_exception`, Python string methods). `bos`/`eos` fill `bos_token`/`eos_token`.
    pub fn new(source: &str, bos: Option<&str>, eos: Option<&str>) -> Result<Self, String> {
        let mut env = Environment::new();
        env.set_syntax(
            SyntaxConfig::builder()
                .trim_blocks(true)
                .lstrip_blocks(true)
                .build()
                .expect("the default delimiters are valid"),
        );
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.set_fuel(Some(FUEL));
        // What is checked is what is compiled.
        let compiled = python_line_continuations(source);
        check_tag_lengths(&compiled)?;
        env.add_template_owned("chat_template", compiled)
            .map_err(|e| describe(&e))?;
        Ok(ChatTemplate {
            env,
            source: source.to_string(),
            bos_token: bos.unwrap_or_default().to_string(),
            eos_token: eos.unwrap_or_default().to_string(),
        })
    }

    /// The template's text.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// What `bos_token` renders as.
    pub fn bos_token(&self) -> &str {
        &self.bos_token
    }

    /// What `eos_token` renders as.
    pub fn eos_token(&self) -> &str {
        &self.eos_token
    }

    /// Renders `messages`; `add_generation_prompt` appends the start of an assistant turn.
    pub fn render(&self, messages: &[Json], add_generation_prompt: bool) -> Result<String, String> {
        self.render_with(messages, add_generation_prompt, &serde_json::Map::new())
    }

    /// [`ChatTemplate::render`] with more variables for the template, as the keyword
    /// arguments of `apply_chat_template` give them (`enable_thinking`, `tools`).
    pub fn render_with(
        &self,
        messages: &[Json],
        add_generation_prompt: bool,
        extra: &serde_json::Map<String, Json>,
    ) -> Result<String, String> {
        let tmpl = self
            .env
            .get_template("chat_template")
            .expect("added at construction");
        tmpl.render(minijinja::context! {
            messages => Value::from(Serde(messages)),
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.as_str(),
            eos_token => self.eos_token.as_str(),
            ..Value::from(Serde(extra))
        })
        .map_err(|e| describe(&e))
    }

    /// Renders a conversation and finds the bytes of its trained replies. `messages` must
    /// have been checked with [`check_messages`].
    ///
    /// For reply `i`, three renderings are compared with the whole: the messages before it
    /// (`prior`), the same with the generation prompt (`prompted`), and the messages through
    /// it (`through`). The reply starts where `through` leaves both `prior` and `prompted`
    /// (so a generation prompt the reply's rendering does not repeat, such as a `<think>`
    /// opener, is not trained on), and ends where `through` leaves the whole. What a
    /// rendering adds only at the end of a conversation (Phi's final eos) may differ.
    ///
    /// Any other difference means the template renders an earlier turn differently once
    /// later ones follow (Qwen3's drops the reasoning of replies before the last question).
    /// The whole is then the
    /// conversation as the model sees it writing its last reply, so only that reply is
    /// trained (`last_only`); if the last message is no trained reply, the conversation is
    /// refused naming the message.
    pub fn conversation(&self, messages: &[Json]) -> Result<Rendered, String> {
        let text = self.render(messages, false)?;
        let mut trained = Vec::new();
        for (i, m) in messages.iter().enumerate() {
            if !is_trained(m) {
                continue;
            }
            if i == 0 {
                return Err(
                    "the first message is the assistant's: a reply needs a message \
                            to answer"
                        .into(),
                );
            }
            match self.reply(messages, i, &text)? {
                Some(span) => trained.extend(Some(span).filter(|s| !s.is_empty())),
                None => return self.last_reply_only(messages, i, text),
            }
        }
        Ok(Rendered {
            text,
            trained,
            last_only: false,
        })
    }

    /// The bytes of reply `i` in `text`, the whole conversation; `None` when the template
    /// renders the conversation up to it differently from the whole.
    fn reply(
        &self,
        messages: &[Json],
        i: usize,
        text: &str,
    ) -> Result<Option<Range<usize>>, String> {
        // A rendering's tail after the common part may only be what the template writes at
        // a conversation's end.
        let ends_only = |rest: &str| rest.is_empty() || text.ends_with(rest);
        let prior = self.render(&messages[..i], false)?;
        let prompted = self.render(&messages[..i], true)?;
        let through = if i + 1 == messages.len() {
            text.to_string()
        } else {
            self.render(&messages[..=i], false)?
        };
        let kept = common_prefix(&prior, &through);
        let end = common_prefix(&through, text);
        if !ends_only(&prior[kept..]) || !ends_only(&through[end..]) {
            return Ok(None);
        }
        let start = kept.max(common_prefix(&prompted, &through));
        Ok((start <= end).then_some(start..end))
    }

    /// The conversation with only its last reply trained (see [`ChatTemplate::conversation`]);
    /// `first` is the reply the template rewrites.
    fn last_reply_only(
        &self,
        messages: &[Json],
        first: usize,
        text: String,
    ) -> Result<Rendered, String> {
        let last = messages.len() - 1;
        let ends_with_reply = is_trained(&messages[last]);
        let span = if ends_with_reply {
            self.reply(messages, last, &text)?
        } else {
            None
        };
        let Some(span) = span else {
            return Err(format!(
                "the chat template renders the conversation differently once message {} (the \
                 assistant's) follows, so its reply cannot be told apart; {} (a template that \
                 rewrites earlier turns, e.g. drops the reasoning of earlier replies, is \
                 trained on the last reply only; or set data.chat_template)",
                first + 1,
                if ends_with_reply {
                    "nor can the last reply, which would be trained alone: the template renders \
                     even the turns before it differently once it follows"
                } else {
                    "and the conversation does not end with a reply to train alone instead"
                }
            ));
        };
        Ok(Rendered {
            text,
            trained: vec![span].into_iter().filter(|s| !s.is_empty()).collect(),
            last_only: true,
        })
    }
}

/// Length in bytes of the longest common prefix of `a` and `b` (whole characters).
fn common_prefix(a: &str, b: &str) -> usize {
    a.char_indices()
        .zip(b.chars())
        .find(|((_, x), y)| x != y)
        .map_or(a.len().min(b.len()), |((at, _), _)| at)
}

/// What a model's chat template does on its own that a publisher should know, found by
/// rendering it (which only the worker does: see [`crate::publish`]). Written beside the
/// trained model as [`ChatDefaults::FILE`].
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChatDefaults {
    /// The system prompt the template writes when a conversation has none (Qwen2.5's "You
    /// are Qwen, ..."): Ollama's family template does not, so publishing sets it as the
    /// model's SYSTEM, and the model is asked as it was trained.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_system: Option<String>,
}

impl ChatDefaults {
    /// The file in a model directory.
    pub const FILE: &str = "jobd-chat.json";

    /// Finds them by rendering `template`.
    pub fn of(template: &ChatTemplate) -> Self {
        ChatDefaults {
            default_system: default_system(template),
        }
    }

    /// Reads them from model directory `dir` (none when the file is missing or unreadable:
    /// a model not trained by jobd, or by an older one).
    pub fn read(dir: &Path) -> Self {
        crate::jobfs::read_linked_regular(&dir.join(Self::FILE), 1 << 20)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }
}

/// The system prompt `template` writes for a conversation without one: the text it puts
/// where a given system message's content would go. Found by rendering a question alone and
/// with a system message whose content is a marker, and comparing what surrounds it.
fn default_system(template: &ChatTemplate) -> Option<String> {
    const MARK: &str = "\u{E000}jobd-system\u{E001}";
    let user = serde_json::json!({"role": "user", "content": "Hi"});
    let alone = template.render(std::slice::from_ref(&user), true).ok()?;
    let system = serde_json::json!({"role": "system", "content": MARK});
    let with = template.render(&[system, user], true).ok()?;
    let at = with.find(MARK)?;
    let (before, after) = (&with[..at], &with[at + MARK.len()..]);
    let text = alone.strip_prefix(before)?.strip_suffix(after)?;
    (!text.trim().is_empty()).then(|| text.to_string())
}

/// The text `template` ends an assistant's turn with (`<|im_end|>`, `<|eot_id|>`, `### END`),
/// without surrounding whitespace; `None` if it writes nothing after a reply.
pub fn turn_end(template: &ChatTemplate) -> Option<String> {
    const MARK: &str = "\u{E000}jobd-reply\u{E001}";
    let messages = [
        serde_json::json!({"role": "user", "content": "Hi"}),
        serde_json::json!({"role": "assistant", "content": MARK}),
    ];
    let text = template.render(&messages, false).ok()?;
    let after = text[text.find(MARK)? + MARK.len()..].trim();
    // Only the first line: what follows may be the conversation's end (Phi's eos).
    let end = after.lines().next().unwrap_or_default().trim();
    (!end.is_empty()).then(|| end.to_string())
}

/// Whether a message calls tools.
pub fn calls_tools(m: &Json) -> bool {
    m.get("tool_calls")
        .and_then(Json::as_array)
        .is_some_and(|calls| !calls.is_empty())
}

/// Whether a (checked) message is trained on: the assistant's, without `"weight": 0`.
fn is_trained(m: &Json) -> bool {
    m.get("role").and_then(Json::as_str) == Some("assistant")
        && m.get("weight").and_then(Json::as_f64) != Some(0.0)
}

/// Checks the shape of a `messages` value: a non-empty array of objects, each with a string
/// `role` and `content` (OpenAI's and TRL's conversational format; other keys, such as
/// `tool_calls` or `name`, are passed to the template; an assistant message with
/// `tool_calls` may have no or null content), and `weight` only 0 or 1 on an assistant
/// message (OpenAI's fine-tuning format).
pub fn check_messages(messages: &Json) -> Result<&[Json], String> {
    let list = messages
        .as_array()
        .ok_or("\"messages\" must be an array of {\"role\", \"content\"} objects")?;
    if list.is_empty() {
        return Err("\"messages\" is empty".into());
    }
    for (i, m) in list.iter().enumerate() {
        let n = i + 1;
        let obj = m
            .as_object()
            .ok_or_else(|| format!("message {n} is not an object"))?;
        let role = match obj.get("role") {
            Some(Json::String(r)) if !r.is_empty() => r.as_str(),
            Some(_) => return Err(format!("message {n}: \"role\" must be a non-empty string")),
            None => return Err(format!("message {n} has no \"role\"")),
        };
        // An assistant message calling tools may have no content (OpenAI's format).
        let calls_tools = role == "assistant" && obj.get("tool_calls").is_some_and(Json::is_array);
        match obj.get("content") {
            Some(Json::String(_)) => {}
            None | Some(Json::Null) if calls_tools => {}
            Some(Json::Array(_)) => {
                return Err(format!(
                    "message {n}: \"content\" is a list of parts (text and images); only \
                     text content (a string) can be trained on"
                ));
            }
            Some(_) => return Err(format!("message {n}: \"content\" must be a string")),
            None => return Err(format!("message {n} has no \"content\"")),
        }
        if let Some(w) = obj.get("weight") {
            if role != "assistant" {
                return Err(format!(
                    "message {n}: \"weight\" applies only to assistant messages"
                ));
            }
            if w.as_f64() != Some(0.0) && w.as_f64() != Some(1.0) {
                return Err(format!("message {n}: \"weight\" must be 0 or 1"));
            }
        }
    }
    Ok(list)
}

/// A template error as one line with its place in the template (a `raise_exception` gives
/// the template's own words, e.g. "Conversation roles must alternate").
fn describe(e: &Error) -> String {
    let place = match e.line() {
        Some(l) => format!("chat template line {l}"),
        None => "chat template".to_string(),
    };
    match e.detail() {
        Some(d) => format!("{place}: {}: {d}", e.kind()),
        None => format!("{place}: {}", e.kind()),
    }
}

/// The chat template of a `tokenizer_config.json`: its `chat_template` string, or in the
/// newer list form (`[{"name": "default", "template": ...}, ...]`) the one named "default".
pub fn template_in_config(cfg: &Json) -> Option<String> {
    match cfg.get("chat_template")? {
        Json::String(s) => Some(s.clone()),
        Json::Array(list) => list
            .iter()
            .find(|t| t.get("name").and_then(Json::as_str) == Some("default"))
            .and_then(|t| t.get("template")?.as_str().map(str::to_string)),
        _ => None,
    }
}

/// Most of a `tokenizer_config.json` read (real ones are kilobytes to about a megabyte).
const MAX_TOKENIZER_CONFIG: u64 = 16 << 20;

/// Most of a chat template file read (real templates are a few kilobytes).
const MAX_TEMPLATE_FILE: u64 = 1 << 20;

/// The chat template in model directory `dir`'s `tokenizer_config.json`, if any. The file is
/// read as a root daemon reads a user's files: never blocking on a FIFO, never gigabytes.
pub fn template_in_dir(dir: &Path) -> Option<String> {
    read_template_in_dir(dir).ok().flatten()
}

/// [`template_in_dir`], saying why a `tokenizer_config.json` could not be read.
fn read_template_in_dir(dir: &Path) -> Result<Option<String>, String> {
    let path = dir.join("tokenizer_config.json");
    let bytes = crate::jobfs::read_linked_regular(&path, MAX_TOKENIZER_CONFIG)
        .map_err(|e| e.to_string())?;
    let cfg: Json = serde_json::from_slice(&bytes).map_err(|e| format!("not JSON: {e}"))?;
    Ok(template_in_config(&cfg))
}

/// Whether a data file's first example is a conversation (`{"messages": [...]}`).
fn starts_with_conversation(path: &Path) -> bool {
    use std::io::{BufRead, BufReader};
    let Ok(f) = crate::jobfs::open_linked_regular(path) else {
        return false;
    };
    // A first line longer than this is not inspected (the worker still reads it in full).
    let reader = BufReader::new(std::io::Read::take(f, 1 << 20));
    reader
        .lines()
        .map_while(Result::ok)
        .find(|l| !l.trim().is_empty())
        .and_then(|l| serde_json::from_str::<Json>(l.trim_start_matches('\u{feff}')).ok())
        .is_some_and(|v| v.get("messages").is_some_and(Json::is_array))
}

/// Submit-time checks of a train job's chat template: a `data.chat_template` file must be
/// UTF-8 and parse; conversation data needs a template (a base model without one, and no
/// `data.chat_template`, is refused now rather than after the model loads). Paths must be
/// resolved and checked (`JobSpec::check_paths`) first.
pub fn job_issues(spec: &JobSpec) -> Vec<Issue> {
    let Some(data) = &spec.data else {
        return Vec::new();
    };
    // One check at a time (a tokenizer_config.json parses into many times its size), and a
    // sweep's jobs, which share their template file, have it parsed once.
    type Checked = (
        std::path::PathBuf,
        crate::jobfs::FileStamp,
        Result<(), String>,
    );
    static ONE_AT_A_TIME: std::sync::Mutex<Option<Checked>> = std::sync::Mutex::new(None);
    let mut last = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(file) = &data.chat_template {
        let issue = |why: String| vec![Issue::new("data.chat_template", why)];
        let opened = crate::jobfs::open_linked_regular(file).and_then(|f| {
            let stamp = crate::jobfs::FileStamp::from_metadata(&f.metadata()?);
            Ok((f, stamp))
        });
        let (f, stamp) = match opened {
            Ok(o) => o,
            Err(e) => return issue(format!("{}: {e}", file.display())),
        };
        let checked = match last.as_ref() {
            Some((path, s, result)) if path == file && *s == stamp => result.clone(),
            _ => {
                let result = read_template(f).and_then(|src| check_syntax(&src));
                *last = Some((file.clone(), stamp, result.clone()));
                result
            }
        };
        return match checked {
            Err(e) => issue(format!("{}: {e}", file.display())),
            Ok(()) => Vec::new(),
        };
    }
    let Some(base) = spec
        .model
        .as_ref()
        .and_then(|m| m.base.as_deref())
        .filter(|b| !crate::spec::train::is_previous(b))
    else {
        return Vec::new();
    };
    let files = std::iter::once(("data.train_file", &data.train_file))
        .chain(data.eval_file.iter().map(|e| ("data.eval_file", e)));
    for (key, file) in files {
        if !data.format.reads_jsonl(file) || !starts_with_conversation(file) {
            continue;
        }
        let problem = match read_template_in_dir(base) {
            Ok(Some(_)) => return Vec::new(),
            Ok(None) => "has no chat_template in tokenizer_config.json".to_string(),
            Err(e) => format!("has no readable tokenizer_config.json ({e})"),
        };
        return vec![Issue::new(
            key,
            format!(
                "{} holds conversations (\"messages\"), but {} {problem}: set \
                 data.chat_template to a Jinja template file (e.g. the chat model's of the \
                 same family)",
                file.display(),
                base.display()
            ),
        )];
    }
    Vec::new()
}

/// A template file's text: a regular file (links followed, never blocking on a FIFO), at
/// most [`MAX_TEMPLATE_FILE`] bytes, UTF-8, without a byte-order mark.
pub fn read_template_file(path: &Path) -> Result<String, String> {
    let file = crate::jobfs::open_linked_regular(path).map_err(|e| e.to_string())?;
    read_template(file)
}

/// [`read_template_file`] of an opened file.
fn read_template(file: std::fs::File) -> Result<String, String> {
    use std::io::Read;
    let len = file.metadata().map_err(|e| e.to_string())?.len();
    if len > MAX_TEMPLATE_FILE {
        return Err(format!(
            "{len} bytes, more than the {MAX_TEMPLATE_FILE} jobd reads of a template"
        ));
    }
    let mut bytes = Vec::new();
    file.take(MAX_TEMPLATE_FILE)
        .read_to_end(&mut bytes)
        .map_err(|e| e.to_string())?;
    let text = String::from_utf8(bytes).map_err(|_| "not UTF-8 text".to_string())?;
    Ok(match text.strip_prefix('\u{feff}') {
        Some(rest) => rest.to_string(),
        None => text,
    })
}

/// Marks which tokens are trained: a token is when it ends within a trained range and
/// reaches into it (a token that begins in the generation prompt and ends in the reply, as
/// `" Hello"` after a prompt ending in a space, is the reply's; one that begins in the reply
/// and ends beyond it is the next turn's). An empty-offset token counts when it starts inside
/// a range. Returns runs of token indices.
pub fn trained_tokens(offsets: &[(usize, usize)], trained: &[Range<usize>]) -> Vec<Range<usize>> {
    let mut runs: Vec<Range<usize>> = Vec::new();
    for (t, &(start, end)) in offsets.iter().enumerate() {
        let hit = trained
            .iter()
            .any(|r| start < r.end && end <= r.end && (end > r.start || start >= r.start));
        if hit {
            match runs.last_mut() {
                Some(last) if last.end == t => last.end = t + 1,
                _ => runs.push(t..t + 1),
            }
        }
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Llama 3's template (as in Meta's tokenizer_config.json, shortened to its core).
    const LLAMA3: &str = "{{ bos_token }}{% for message in messages %}{% set content = \
        '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + \
        message['content'] | trim + '<|eot_id|>' %}{{ content }}{% endfor %}{% if \
        add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% \
        endif %}";

    /// Mistral-style: roles must alternate, system folded into the first user turn.
    const STRICT: &str = "{%- if messages[0]['role'] == 'system' %}\n    {%- set system = \
        messages[0]['content'] %}\n    {%- set loop_messages = messages[1:] %}\n{%- else %}\n    \
        {%- set loop_messages = messages %}\n{%- endif %}\n{{- bos_token }}\n{%- for message in \
        loop_messages %}\n    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}\n  \
        {{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') \
        }}\n    {%- endif %}\n    {%- if message['role'] == 'user' %}\n        {%- if loop.first \
        and system is defined %}\n            {{- ' [INST] ' + system + '\\n\\n' + \
        message['content'].strip() + ' [/INST]' }}\n        {%- else %}\n            {{- ' [INST] \
        ' + message['content'].strip() + ' [/INST]' }}\n        {%- endif %}\n    {%- else %}\n   \
        {{- ' ' + message['content'] + eos_token }}\n    {%- endif %}\n{%- endfor %}\n";

    fn msgs(v: Json) -> Vec<Json> {
        check_messages(&v).unwrap().to_vec()
    }

    fn spans(r: &Rendered) -> Vec<&str> {
        r.trained.iter().map(|s| &r.text[s.clone()]).collect()
    }

    #[test]
    fn chatml_trains_each_reply_with_its_end_of_turn() {
        let t = ChatTemplate::new(CHATML, None, None).unwrap();
        let m = msgs(json!([
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "bye"},
            {"role": "assistant", "content": "see you"},
        ]));
        let r = t.conversation(&m).unwrap();
        assert_eq!(
            r.text,
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n\
             <|im_start|>assistant\nhello<|im_end|>\n<|im_start|>user\nbye<|im_end|>\n\
             <|im_start|>assistant\nsee you<|im_end|>\n"
        );
        assert_eq!(spans(&r), ["hello<|im_end|>\n", "see you<|im_end|>\n"]);
        // weight 0 leaves a reply out (OpenAI's fine-tuning format).
        let mut m2 = m.clone();
        m2[2]["weight"] = json!(0);
        let r2 = t.conversation(&m2).unwrap();
        assert_eq!(spans(&r2), ["see you<|im_end|>\n"]);
        assert_eq!(
            t.render(&m[..2], true).unwrap(),
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n\
             <|im_start|>assistant\n"
        );
    }

    #[test]
    fn llama3_and_strict_templates_render_with_special_tokens_and_methods() {
        let t = ChatTemplate::new(LLAMA3, Some("<|begin_of_text|>"), None).unwrap();
        let m = msgs(json!([
            {"role": "user", "content": " hi "},
            {"role": "assistant", "content": "hello"},
        ]));
        let r = t.conversation(&m).unwrap();
        assert!(
            r.text
                .starts_with("<|begin_of_text|><|start_header_id|>user")
        );
        assert_eq!(spans(&r), ["hello<|eot_id|>"]);
        let t = ChatTemplate::new(STRICT, Some("<s>"), Some("</s>")).unwrap();
        let m = msgs(json!([
            {"role": "system", "content": "S"},
            {"role": "user", "content": " q1 "},
            {"role": "assistant", "content": "a1"},
            {"role": "user", "content": "q2"},
            {"role": "assistant", "content": "a2"},
        ]));
        let r = t.conversation(&m).unwrap();
        assert_eq!(
            r.text,
            "<s> [INST] S\n\nq1 [/INST] a1</s> [INST] q2 [/INST] a2</s>"
        );
        assert_eq!(spans(&r), [" a1</s>", " a2</s>"]);
        // The template's own refusal reaches the user in its words.
        let bad = msgs(json!([
            {"role": "user", "content": "a"},
            {"role": "user", "content": "b"},
        ]));
        let e = t.conversation(&bad).unwrap_err();
        assert!(
            e.contains("line 10") && e.contains("roles must alternate"),
            "{e}"
        );
    }

    #[test]
    fn templates_that_rewrite_earlier_turns_train_the_last_reply_only() {
        // Drops every reply but the last, as Qwen3's drops earlier replies' reasoning.
        let src = "{% for m in messages %}{% if m.role != 'assistant' or loop.last %}[{{ m.role \
                   }}]{{ m.content }}{% endif %}{% endfor %}{% if add_generation_prompt \
                   %}[assistant]{% endif %}";
        let t = ChatTemplate::new(src, None, None).unwrap();
        let mut m = msgs(json!([
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c"},
            {"role": "assistant", "content": "d"},
        ]));
        let r = t.conversation(&m).unwrap();
        assert_eq!(r.text, "[user]a[user]c[assistant]d");
        assert_eq!((spans(&r), r.last_only), (vec!["d"], true));
        // Without a reply at the end there is nothing to train: refused, naming the reply.
        m.push(json!({"role": "user", "content": "e"}));
        let e = t.conversation(&m).unwrap_err();
        assert!(
            e.contains("message 2") && e.contains("does not end with a reply"),
            "{e}"
        );
        let e = t
            .conversation(&msgs(json!([{"role": "assistant", "content": "x"}])))
            .unwrap_err();
        assert!(e.contains("first message"), "{e}");
    }

    #[test]
    fn an_end_of_conversation_eos_and_an_unrepeated_generation_prompt_are_not_trained() {
        // Phi-style: eos only after the last turn; R1-style: the generation prompt opens a
        // reasoning block that the reply's own rendering does not have.
        let src = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}<|end|>{% endfor %}{% if \
                   add_generation_prompt %}<|assistant|><think>\n{% else %}{{ eos_token }}{% \
                   endif %}";
        let t = ChatTemplate::new(src, None, Some("<eos>")).unwrap();
        let m = msgs(json!([
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c"},
            {"role": "assistant", "content": "d"},
        ]));
        let r = t.conversation(&m).unwrap();
        assert_eq!(
            r.text,
            "<|user|>a<|end|><|assistant|>b<|end|><|user|>c<|end|><|assistant|>d<|end|><eos>"
        );
        // The role marker is shared with the generation prompt; the last reply learns eos.
        // The first range reaches one byte into `<|user|>`, which begins like `<eos>`: as a
        // token, `<|user|>` ends beyond it and is not trained (`trained_tokens`).
        assert_eq!(spans(&r), ["b<|end|><", "d<|end|><eos>"]);
    }

    #[test]
    fn bad_messages_and_templates_are_named() {
        for (v, words) in [
            (json!({"role": "user"}), "must be an array"),
            (json!([]), "empty"),
            (json!([1]), "message 1 is not an object"),
            (json!([{"content": "x"}]), "message 1 has no \"role\""),
            (json!([{"role": "user"}]), "message 1 has no \"content\""),
            (
                json!([{"role": "user", "content": [{"type": "text"}]}]),
                "list of parts",
            ),
            (
                json!([{"role": "user", "content": "x", "weight": 0}]),
                "only to assistant",
            ),
            (
                json!([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y", "weight": 0.5}]),
                "0 or 1",
            ),
        ] {
            let e = check_messages(&v).unwrap_err();
            assert!(e.contains(words), "{v}: {e}");
        }
        // An assistant calling tools may have no content (OpenAI's format); others may not.
        let call = json!({"type": "function", "function": {"name": "f", "arguments": "{}"}});
        for content in [json!(null), json!("")] {
            let mut v = json!([
                {"role": "user", "content": "x"},
                {"role": "assistant", "tool_calls": [call], "content": content},
            ]);
            check_messages(&v).unwrap();
            v[1].as_object_mut().unwrap().remove("content");
            check_messages(&v).unwrap();
        }
        let v = json!([{"role": "user", "content": null, "tool_calls": [call]}]);
        assert!(check_messages(&v).unwrap_err().contains("must be a string"));
        let e = check_syntax("{% for m in messages %}{{ m.content }").unwrap_err();
        assert!(e.contains("line 1"), "{e}");
        let t = ChatTemplate::new("{{ messages[0].content.bogus() }}", None, None).unwrap();
        let e = t
            .render(&msgs(json!([{"role": "user", "content": "x"}])), false)
            .unwrap_err();
        assert!(e.contains("chat template"), "{e}");
        let t = ChatTemplate::new(
            "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
            None,
            None,
        )
        .unwrap();
        let e = t.render(&[], false).unwrap_err();
        assert!(e.contains("fuel"), "{e}");
    }

    #[test]
    fn submit_checks_name_a_missing_or_broken_template() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(
            d.join("chat.jsonl"),
            "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}\n",
        )
        .unwrap();
        std::fs::write(d.join("text.jsonl"), "{\"text\": \"hi\"}\n").unwrap();
        std::fs::write(d.join("tokenizer_config.json"), "{}").unwrap();
        let job = |data: &str, extra: &str| {
            let text = format!(
                "kind = \"train\"\n[model]\nbase = \"{}\"\n[data]\ntrain_file = \"{}\"\n{extra}",
                d.display(),
                d.join(data).display()
            );
            crate::spec::job::parse("job.toml", &text).unwrap()
        };
        let issues = job_issues(&job("chat.jsonl", ""));
        assert_eq!(issues.len(), 1);
        assert_eq!(issues[0].key, "data.train_file");
        assert!(issues[0].message.contains("no chat_template"), "{issues:?}");
        assert!(job_issues(&job("text.jsonl", "")).is_empty());
        // A base with a template, or a template file that parses, is fine.
        std::fs::write(d.join("t.jinja"), CHATML).unwrap();
        let with_file = format!("chat_template = \"{}\"\n", d.join("t.jinja").display());
        assert!(job_issues(&job("chat.jsonl", &with_file)).is_empty());
        std::fs::write(d.join("t.jinja"), "{% for m in messages %}").unwrap();
        let issues = job_issues(&job("chat.jsonl", &with_file));
        assert_eq!(issues[0].key, "data.chat_template");
        assert!(
            issues[0].message.contains("t.jinja: chat template"),
            "{issues:?}"
        );
        std::fs::write(
            d.join("tokenizer_config.json"),
            serde_json::json!({"chat_template": [{"name": "default", "template": CHATML}]})
                .to_string(),
        )
        .unwrap();
        assert_eq!(template_in_dir(d).as_deref(), Some(CHATML));
        assert!(job_issues(&job("chat.jsonl", "")).is_empty());
        // A FIFO in a user's model directory never blocks the daemon's check.
        std::fs::remove_file(d.join("tokenizer_config.json")).unwrap();
        nix::unistd::mkfifo(
            &d.join("tokenizer_config.json"),
            nix::sys::stat::Mode::from_bits_truncate(0o644),
        )
        .unwrap();
        assert_eq!(template_in_dir(d), None);
        assert_eq!(job_issues(&job("chat.jsonl", "")).len(), 1);
    }

    #[test]
    fn a_backslash_newline_in_a_string_literal_continues_the_line_as_in_python() {
        let src = "{% set s = \"one.\\\ntwo \\\"q\\\" \\n\" %}{{ s }}|a\\\nb|{{ 'x\\\r\ny' }}";
        let t = ChatTemplate::new(src, None, None).unwrap();
        // In strings: the continuation goes, other escapes work; outside, text is text.
        assert_eq!(t.render(&[], false).unwrap(), "one.two \"q\" \n|a\\\nb|xy");
        assert_eq!(python_line_continuations("{{ 'a' }}"), "{{ 'a' }}");
        // Comments and raw blocks are no strings: a quote there opens nothing (this one,
        // read as a string, joined `{\<newline>{` into a tag no check had counted).
        for src in [
            "{# {{ ' #}{\\\n{ 1 }}",
            "{% raw %}{{ '{% endraw %}{\\\n{ 1 }}",
        ] {
            assert_eq!(python_line_continuations(src), src);
        }
        let deep = format!("{{# {{{{ ' #}}{{\\\n{{ {}1 }}}}", "- ".repeat(20_000));
        let t = ChatTemplate::new(&deep, None, None).unwrap();
        assert!(t.render(&[], false).unwrap().starts_with("{\\\n{ - -"));
    }

    #[test]
    fn deep_expressions_are_refused_before_the_parser_can_overflow_its_stack() {
        // Each of these, 200000 deep, aborts the process with a stack overflow in the parser.
        let n = 200_000;
        for deep in [
            format!("{{{{ {}1 }}}}", "-".repeat(n)),
            format!("{{{{ x{} }}}}", ".a".repeat(n)),
            format!("{{{{ 1{} }}}}", " ~ 1".repeat(n)),
            format!("\n{{% if {}1 %}}{{% endif %}}", "not ".repeat(n)),
        ] {
            let e = check_syntax(&deep).unwrap_err();
            assert!(e.contains("more than 1024 tokens"), "{e}");
        }
        let e = check_syntax(&format!("a\n\n{{{{ {}1 }}}}", "-".repeat(3000))).unwrap_err();
        assert!(e.starts_with("chat template line 3:"), "{e}");
        // A `}}` inside a dict literal does not end the tag (as minijinja's lexer reads it).
        let e =
            check_syntax(&format!("{{{{ ({{'a': {{}}}}) ~ {}1 }}}}", "- ".repeat(n))).unwrap_err();
        assert!(e.contains("more than 1024 tokens"), "{e}");
        // Long strings, comments and text are no depth.
        let long = "x".repeat(n);
        check_syntax(&format!("{long}{{{{ '{long}' }}}}{{# {long} #}}")).unwrap();
        check_syntax(&format!("{{% set s = \"{long}\\\"\" %}}{{{{ s }}}}")).unwrap();
    }

    #[test]
    fn a_templates_own_system_prompt_is_found() {
        // Qwen2.5-style: a default system turn when the conversation has none.
        let own = "{% if messages[0].role != 'system' %}<|im_start|>system\nYou are Tiny.\
                   <|im_end|>\n{% endif %}";
        let t = ChatTemplate::new(&format!("{own}{CHATML}"), None, None).unwrap();
        assert_eq!(
            ChatDefaults::of(&t).default_system.as_deref(),
            Some("You are Tiny.")
        );
        // None: plain ChatML, or a preamble around the system text that is not a prompt.
        let plain = ChatTemplate::new(CHATML, None, None).unwrap();
        assert_eq!(ChatDefaults::of(&plain), ChatDefaults::default());
        let preamble = "<|im_start|>system\nDate: today\n{% if messages[0].role == 'system' \
                        %}{{ messages[0].content }}{% endif %}<|im_end|>\n{% for m in messages \
                        %}{% if m.role != 'system' %}<|im_start|>{{ m.role }}\n{{ m.content \
                        }}<|im_end|>\n{% endif %}{% endfor %}";
        let t = ChatTemplate::new(preamble, None, None).unwrap();
        assert_eq!(ChatDefaults::of(&t).default_system, None);
        // Written and read back beside a model.
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(ChatDefaults::read(dir.path()), ChatDefaults::default());
        let d = ChatDefaults {
            default_system: Some("You are Tiny.".into()),
        };
        std::fs::write(
            dir.path().join(ChatDefaults::FILE),
            serde_json::to_vec(&d).unwrap(),
        )
        .unwrap();
        assert_eq!(ChatDefaults::read(dir.path()), d);
    }

    #[test]
    fn a_turns_end_is_found_by_rendering() {
        let t = |src: &str| turn_end(&ChatTemplate::new(src, None, Some("<eos>")).unwrap());
        assert_eq!(t(CHATML).as_deref(), Some("<|im_end|>"));
        let custom = "{% for m in messages %}{{ '### ' + m['role'] + ':\\n' + m['content'] + \
                      '\\n### END\\n' }}{% endfor %}";
        assert_eq!(t(custom).as_deref(), Some("### END"));
        assert_eq!(
            t("{% for m in messages %}{{ m.content }} {% endfor %}"),
            None
        );
    }

    #[test]
    fn tojson_matches_python_json_dumps() {
        let t = ChatTemplate::new(
            "{{ messages[0] | tojson }}|{{ messages[0].content | tojson }}",
            None,
            None,
        )
        .unwrap();
        let out = t
            .render(&[json!({"content": "a<b>\"é", "role": "user"})], false)
            .unwrap();
        assert_eq!(
            out,
            "{\"content\": \"a<b>\\\"é\", \"role\": \"user\"}|\"a<b>\\\"é\""
        );
    }

    #[test]
    fn tokens_overlapping_a_trained_range_are_trained() {
        // Tokens with byte offsets (one empty); a token reaching past a range is not its.
        let offsets = [(0, 2), (2, 4), (4, 5), (5, 5), (5, 7)];
        let one = |r: Range<usize>| vec![r];
        assert_eq!(trained_tokens(&offsets, &one(3..6)), one(1..4));
        assert_eq!(trained_tokens(&offsets, &one(3..7)), one(1..5));
        assert_eq!(trained_tokens(&offsets, &[0..1, 5..7]), one(3..5));
        assert!(trained_tokens(&offsets, &one(7..9)).is_empty());
    }
}
