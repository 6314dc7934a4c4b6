//! The model the tiny demo job publishes runs in real llama.cpp (node-llama-cpp, installed by
//! `publish_support::LlamaCpp::setup`) as it runs in Candle: published again by hand with
//! `jobctl publish` as f32, f16 and q8_0, each blob the manifest points to loads; llama.cpp
//! tokenizes text to the ids of the `tokenizers` crate; f32 greedy continuations equal
//! Candle's (`Generator::greedy_ids`, the loop of `jobd generate`) for 16 tokens on held-out
//! prompts; f16 and q8_0 agree with Candle's teacher-forced top-1 (`Generator::top1_ids`) on
//! at least 90% of the positions of held-out examples (f32: 99%). All figures are printed
//! (`--nocapture`). Called by the tiny demo's test in `train.rs`, so the job is trained once.
//! (Without the q/k RoPE permutation in the exporter this fails: 0 of 16 greedy tokens, 39%
//! top-1.)

use std::path::{Path, PathBuf};
use std::process::Command;

use jobd::train::generate::Generator;

use crate::daemon::*;
use crate::publish_support::{self, LlamaCpp, SAMPLES, ids, model_blob};

/// Greedy tokens compared per prompt.
const GREEDY_TOKENS: usize = 16;

/// Held-out examples (`jobs/data/tiny_eval.jsonl`, never trained on): prompt and completion.
fn held_out(repo: &Path, n: usize) -> Vec<(String, String)> {
    std::fs::read_to_string(repo.join("jobs/data/tiny_eval.jsonl"))
        .unwrap()
        .lines()
        .take(n)
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (
                v["prompt"].as_str().unwrap().to_string(),
                v["completion"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// Publishes job `id` by hand as `jobd/tiny-shift:<q>` and returns the GGUF blob its manifest
/// in `models` points to.
fn publish(d: &TestDaemon, id: u64, models: &Path, q: &str) -> PathBuf {
    let name = format!("jobd/tiny-shift:{q}");
    let out = d.jobctl(&[
        "publish",
        &id.to_string(),
        "--name",
        &name,
        "--quantization",
        q,
    ]);
    assert!(out.status.success(), "publish {q}: {}", stderr(&out));
    assert!(
        stdout(&out).contains(&format!("published {name} ({q},")),
        "{}",
        stdout(&out)
    );
    model_blob(models, &name)
}

/// `jobd generate`'s text for `prompt` (the CLI over the same loop as `greedy_ids`).
fn jobd_generate(model: &Path, prompt: &str, max_tokens: usize) -> String {
    let out = Command::new(JOBD)
        .args(["generate", "--model", model.to_str().unwrap(), "--prompt"])
        .arg(prompt)
        .args(["--max-tokens", &max_tokens.to_string()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    stdout(&out).strip_suffix('\n').unwrap().to_string()
}

/// Job `id` of `d` is the succeeded tiny demo, its output in Hugging Face layout; `models` is
/// the daemon's Ollama store.
pub fn published_tiny_runs_in_llama_cpp_like_candle(
    d: &TestDaemon,
    id: u64,
    models: &Path,
    repo: &Path,
) {
    let t0 = std::time::Instant::now();
    let lcp = LlamaCpp::setup();
    let output = d.state.join(format!("jobs/{id}/output"));
    let candle = Generator::load(&output).unwrap();
    let blobs: Vec<(&str, PathBuf)> = ["f32", "f16", "q8_0"]
        .into_iter()
        .map(|q| (q, publish(d, id, models, q)))
        .collect();
    eprintln!(
        "llama.cpp: installed and published after {:?}",
        t0.elapsed()
    );

    let examples = held_out(repo, 24);
    let enc = |text: &str, special: bool| candle.tok.encode(text, special).unwrap();
    // Held-out prompts, whole and cut short (so the model writes the rest of the prompt
    // before the answer and eos), encoded as `jobd generate` encodes them; each leaves room
    // for 16 tokens in the model's 32-position context.
    let prompt_texts: Vec<String> = examples[..6]
        .iter()
        .enumerate()
        .map(|(i, (p, _))| match i % 3 {
            0 => p.clone(),
            1 => p.trim_end_matches(" =").to_string(),
            _ => p[.."shift m".len()].to_string(),
        })
        .collect();
    let prompts: Vec<Vec<u32>> = prompt_texts.iter().map(|p| enc(p, true)).collect();
    let ctx = candle.model.cfg.max_position_embeddings;
    for p in &prompts {
        assert!(p.len() + GREEDY_TOKENS <= ctx + 1, "{p:?} leaves no room");
    }
    // Teacher-forced: held-out examples exactly as training lays them out.
    let eos = candle.tok.eos.expect("the tiny tokenizer has an eos");
    let sequences: Vec<Vec<u32>> = examples[6..]
        .iter()
        .map(|(p, c)| [enc(p, true), enc(c, false), vec![eos]].concat())
        .collect();
    let greedy = |p: &[u32], n: usize| candle.greedy_ids(p, n).unwrap();
    let top1 = |s: &[u32]| candle.top1_ids(s).unwrap();

    // f32: the file loads with the model's shape and tokenizer, tokenizes like the
    // tokenizers crate, and continues exactly like Candle.
    let (_, f32_blob) = &blobs[0];
    let mut texts: Vec<String> = SAMPLES.iter().map(|s| s.to_string()).collect();
    texts.extend(examples[..4].iter().map(|(p, c)| format!("{p}{c}\n")));
    texts.push("shift a b =\n\nshift y z = z a\r\n\tshift Ä ß 9 = ?".into());
    let mut ops = vec![serde_json::json!({"op": "info"})];
    ops.extend(
        texts
            .iter()
            .map(|t| serde_json::json!({"op": "tokenize", "text": t})),
    );
    let r = lcp.run(f32_blob, serde_json::Value::Array(ops));
    assert_eq!(r[0]["n_vocab"], candle.model.cfg.vocab_size);
    assert_eq!(r[0]["train_context_size"], ctx);
    assert_eq!(r[0]["eos"], eos);
    for (t, got) in texts.iter().zip(&r[1..]) {
        let want = enc(t, false);
        assert!(want.len() > 5, "{t:?}");
        assert_eq!(ids(&got["ids"]), want, "tokenizing {t:?}");
    }
    eprintln!(
        "llama.cpp f32: {} texts tokenize as the tokenizers crate does",
        texts.len()
    );

    for (q, blob) in &blobs {
        let a = publish_support::compare_with(
            &lcp,
            blob,
            &prompts,
            GREEDY_TOKENS,
            &sequences,
            greedy,
            top1,
        );
        for (((lcp_ids, candle_ids), equal), p) in
            a.greedy.iter().zip(a.equal_prefixes()).zip(&prompt_texts)
        {
            assert_eq!(candle_ids.len(), GREEDY_TOKENS, "Candle stopped early");
            eprintln!(
                "llama.cpp {q}: greedy after {p:?}: {equal}/{GREEDY_TOKENS} tokens equal to \
                 Candle's (llama.cpp {lcp_ids:?}, Candle {candle_ids:?})"
            );
        }
        eprintln!(
            "llama.cpp {q}: teacher-forced top-1 agreement with Candle {:.1}% of {} positions",
            a.top1 * 100.0,
            a.positions
        );
        match *q {
            "f32" => {
                assert_eq!(a.exact_prompts(), prompts.len(), "f32 greedy: {a:?}");
                assert!(a.top1 >= 0.99, "f32 top-1 agreement {}", a.top1);
            }
            _ => assert!(a.top1 >= 0.90, "{q}: top-1 agreement {}", a.top1),
        }
    }

    // Candle's greedy ids are what `jobd generate` prints: the same continuation, decoded,
    // up to the first eos.
    for (p, prompt) in prompt_texts.iter().zip(&prompts) {
        let cont = candle.greedy_ids(prompt, GREEDY_TOKENS).unwrap();
        let end = cont
            .iter()
            .position(|t| candle.stop_ids.contains(t))
            .unwrap_or(cont.len());
        let want = candle.tok.inner.decode(&cont[..end], true).unwrap();
        assert_eq!(jobd_generate(&output, p, GREEDY_TOKENS), want, "{p:?}");
    }
    eprintln!("llama.cpp: all checks done after {:?}", t0.elapsed());
}
