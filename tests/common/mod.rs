//! Helpers shared by the `train_*` integration tests: worker contexts, a small Hugging Face
//! checkpoint written from known weights, and slices of the demo data.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{Device, Tensor};
use jobd::train::config::LlamaConfig;
use jobd::train::weights::safetensors_bytes;
use jobd::train::{StopSignal, WorkerContext, model, rng::Rng, tokenizer};

/// The repository root.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A worker context whose job, checkpoint and output directories live under `dir`.
pub fn ctx(dir: &Path) -> WorkerContext {
    WorkerContext {
        job_dir: dir.to_path_buf(),
        checkpoint_dir: dir.join("checkpoints"),
        output_dir: dir.join("output"),
        stop: Arc::new(StopSignal::default()),
        grace: None,
        threads: Some(2),
        attempt: 1,
    }
}

/// The first `n` lines of the demo's training data.
pub fn tiny_lines(n: usize) -> String {
    let data = std::fs::read_to_string(repo().join("jobs/data/tiny_train.jsonl")).unwrap();
    let mut out: Vec<&str> = data.lines().take(n).collect();
    out.push("");
    out.join("\n")
}

/// Writes a llama checkpoint as a user would download it — config.json, two safetensors
/// shards with an index, tokenizer.json, tokenizer_config.json — and returns its weights.
pub fn write_base(dir: &Path, vocab: usize, max_pos: usize) -> BTreeMap<String, Tensor> {
    std::fs::create_dir_all(dir).unwrap();
    let texts: Vec<String> = tiny_lines(3000).lines().map(str::to_string).collect();
    let tok = tokenizer::train_bpe(texts.into_iter(), 300, Path::new("x")).unwrap();
    std::fs::write(dir.join("tokenizer.json"), tok.to_json().unwrap()).unwrap();
    std::fs::write(
        dir.join("tokenizer_config.json"),
        r#"{"eos_token": "<|endoftext|>", "tokenizer_class": "PreTrainedTokenizerFast"}"#,
    )
    .unwrap();
    let cfg: LlamaConfig = serde_json::from_value(serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab,
        "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": max_pos,
        "rms_norm_eps": 1e-5, "tie_word_embeddings": false, "eos_token_id": 0,
        "torch_dtype": "float32"
    }))
    .unwrap();
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_vec(&cfg.to_json()).unwrap(),
    )
    .unwrap();
    let w = model::init_weights(&cfg, &mut Rng::new(11), &Device::Cpu).unwrap();
    let (a, b): (BTreeMap<_, _>, BTreeMap<_, _>) = w
        .clone()
        .into_iter()
        .partition(|(k, _)| k.contains("layers.0") || k.contains("embed"));
    let mut index = serde_json::Map::new();
    for (file, part) in [
        ("model-00001-of-00002.safetensors", &a),
        ("model-00002-of-00002.safetensors", &b),
    ] {
        std::fs::write(
            dir.join(file),
            safetensors_bytes(part, &[("format", "pt")]).unwrap(),
        )
        .unwrap();
        for k in part.keys() {
            index.insert(k.clone(), file.into());
        }
    }
    std::fs::write(
        dir.join("model.safetensors.index.json"),
        serde_json::to_vec(&serde_json::json!({"metadata": {}, "weight_map": index})).unwrap(),
    )
    .unwrap();
    w
}

/// Trains a demo job file of `jobs/` through the library to completion in a fresh
/// directory, checking it ran its planned steps; returns the spec, the job directory and
/// its metrics.
pub fn train_demo(
    file: &str,
) -> (
    jobd::spec::JobSpec,
    tempfile::TempDir,
    Vec<jobd::train::metrics::MetricsRecord>,
) {
    let jobs = repo().join("jobs");
    let text = std::fs::read_to_string(jobs.join(file)).unwrap();
    let spec = jobd::spec::job::parse_and_resolve(file, &text, &jobs).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let t0 = std::time::Instant::now();
    let out = jobd::train::run(&spec, &ctx(dir.path())).unwrap();
    let planned = spec.training.as_ref().unwrap().max_steps as u64;
    assert_eq!(
        out,
        jobd::train::WorkerOutcome::Completed { steps: planned }
    );
    let recs = jobd::train::metrics::read_metrics(dir.path()).unwrap();
    let evals: Vec<f64> = recs.iter().filter_map(|r| r.eval_loss).collect();
    eprintln!(
        "{file}: trained in {:.1}s; eval losses {evals:?}",
        t0.elapsed().as_secs_f64()
    );
    (spec, dir, recs)
}
