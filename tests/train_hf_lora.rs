//! Hugging Face checkpoints: a small sharded HF-layout model with known weights is
//! fine-tuned with LoRA through the library; the merged output keeps untouched modules
//! bit-equal to the base and equals W + (alpha/r)·B·A on the adapted ones. Also the
//! worker-side checks that need the model: block size beyond its context, and a tokenizer
//! larger than its vocabulary.

mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use candle_core::{Device, Tensor};
use common::{ctx, tiny_lines, write_base};
use jobd::train::weights::load_safetensors;
use jobd::train::{self, TrainError, WorkerOutcome};

fn job(extra: &str) -> String {
    format!(
        r#"
kind = "train"
[model]
base = "base"
[data]
train_file = "train.jsonl"
block_size = 16
[training]
max_steps = 10
per_device_train_batch_size = 8
learning_rate = 1e-2
logging_steps = 5
save_steps = 5
{extra}
[lora]
r = 4
lora_alpha = 8
lora_dropout = 0.1
target_modules = ["q_proj", "v_proj", "down_proj"]
"#
    )
}

fn setup(dir: &Path, vocab: usize, max_pos: usize) -> BTreeMap<String, Tensor> {
    let w = write_base(&dir.join("base"), vocab, max_pos);
    std::fs::write(dir.join("train.jsonl"), tiny_lines(200)).unwrap();
    w
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar()
        .unwrap()
}

#[test]
fn lora_on_a_sharded_hf_checkpoint_merges_into_the_base() {
    let dir = tempfile::tempdir().unwrap();
    let base = setup(dir.path(), 300, 64);
    let spec = jobd::spec::job::parse_and_resolve("j.toml", &job(""), dir.path()).unwrap();
    let job_dir = dir.path().join("job");
    let out = train::run(&spec, &ctx(&job_dir)).unwrap();
    assert_eq!(out, WorkerOutcome::Completed { steps: 10 });
    let output = job_dir.join("output");
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        let mode = std::fs::metadata(output.join(f))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o644, "{f}");
    }
    let merged = load_safetensors(&output.join("model.safetensors"), &Device::Cpu).unwrap();
    assert_eq!(
        merged.len(),
        base.len(),
        "same tensors as the base, no adapter names"
    );
    let adapters = load_safetensors(
        &job_dir.join("checkpoints/checkpoint-10/weights.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!(
        adapters.len(),
        2 * 2 * 3,
        "A and B for 3 modules in 2 layers"
    );
    let mut adapted = 0;
    for (name, w) in &base {
        let module = name.trim_end_matches(".weight");
        match adapters.get(&format!("{module}.lora_A.weight")) {
            None => assert_eq!(max_diff(&merged[name], w), 0.0, "{name} must be untouched"),
            Some(a) => {
                let b = &adapters[&format!("{module}.lora_B.weight")];
                let want = (w + b.matmul(a).unwrap().affine(8.0 / 4.0, 0.0).unwrap()).unwrap();
                assert!(max_diff(&merged[name], &want) < 1e-6, "{name}");
                assert!(
                    max_diff(&merged[name], w) > 1e-4,
                    "{name} should have moved"
                );
                adapted += 1;
            }
        }
    }
    assert_eq!(adapted, 6);
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(output.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["architectures"][0], "LlamaForCausalLM");
    assert_eq!(cfg["num_key_value_heads"], 2);
    // The output is a model `generate` can use.
    train::generate(&output, "shift a b c d =", 4).unwrap();
}

#[test]
fn model_dependent_problems_are_reported_before_training() {
    let dir = tempfile::tempdir().unwrap();
    setup(dir.path(), 300, 8);
    let spec = jobd::spec::job::parse_and_resolve("j.toml", &job(""), dir.path()).unwrap();
    let e = train::run(&spec, &ctx(&dir.path().join("job"))).unwrap_err();
    assert!(
        matches!(&e, TrainError::Option { option, .. } if option == "data.block_size"),
        "{e}"
    );
    assert!(
        e.to_string().contains("exceeds the model's context of 8"),
        "{e}"
    );
    assert!(!dir.path().join("job/checkpoints/checkpoint-5").exists());

    let dir = tempfile::tempdir().unwrap();
    setup(dir.path(), 200, 64);
    let spec = jobd::spec::job::parse_and_resolve("j.toml", &job(""), dir.path()).unwrap();
    let e = train::run(&spec, &ctx(&dir.path().join("job"))).unwrap_err();
    assert!(
        e.to_string().contains("tokenizer and model do not match"),
        "{e}"
    );
}
