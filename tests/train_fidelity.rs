//! Fidelity: our model's logits and loss on a fixed batch match an independent numpy
//! implementation of the Hugging Face llama forward (tests/fixtures/llama_ref.py, float64)
//! within 1e-4 relative, for an untied and a tied grouped-query-attention llama, a Qwen2
//! layout (q/k/v biases) and Qwen3 (query/key norms, a head_dim of its own or Qwen3's default). The test installs numpy into a venv under target/ when the system
//! python lacks it; it is skipped (with a message) only when python3 itself is absent.

use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{DType, Device, Tensor};
use jobd::train::config::LlamaConfig;
use jobd::train::model::{Llama, Pass, init_weights, nll_sum};
use jobd::train::rng::Rng;
use jobd::train::weights::save_safetensors;

/// A python3 that can `import numpy`, installing numpy into a venv if needed.
fn python_with_numpy() -> Option<PathBuf> {
    let has_numpy = |py: &Path| {
        Command::new(py)
            .args(["-c", "import numpy"])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    let system = PathBuf::from("python3");
    if Command::new(&system).arg("--version").output().is_err() {
        return None;
    }
    if has_numpy(&system) {
        return Some(system);
    }
    let venv = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("numpy-venv");
    let py = venv.join("bin/python3");
    if !has_numpy(&py) {
        let ok = Command::new(&system)
            .args(["-m", "venv"])
            .arg(&venv)
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "python3 -m venv {} failed", venv.display());
        let ok = Command::new(&py)
            .args(["-m", "pip", "install", "--quiet", "numpy"])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "installing numpy into {} failed", venv.display());
    }
    Some(py)
}

fn config(json: serde_json::Value) -> LlamaConfig {
    let c: LlamaConfig = serde_json::from_value(json).unwrap();
    c.check().unwrap();
    c
}

fn check(py: &Path, cfg: LlamaConfig, seed: u64) {
    let dev = Device::Cpu;
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng::new(seed);
    let mut w = init_weights(&cfg, &mut rng, &dev).unwrap();
    // Larger, non-trivial weights (and norms/biases off their initial 1/0) so that every part
    // of the computation shows in the logits.
    for (name, t) in w.iter_mut() {
        let mut d = vec![0f32; t.elem_count()];
        rng.fill_normal(&mut d, if name.contains("norm") { 0.3 } else { 0.15 });
        if name.contains("norm") {
            d.iter_mut().for_each(|x| *x += 1.0);
        }
        *t = Tensor::from_vec(d, t.shape(), &dev).unwrap();
    }
    std::fs::write(
        dir.path().join("config.json"),
        serde_json::to_vec(&cfg.to_json()).unwrap(),
    )
    .unwrap();
    save_safetensors(&dir.path().join("model.safetensors"), &w).unwrap();
    let ids: Vec<Vec<u32>> = (0..3)
        .map(|b| {
            (0..11)
                .map(|t| ((b * 37 + t * 11 + 5) % cfg.vocab_size) as u32)
                .collect()
        })
        .collect();
    let ids_path = dir.path().join("ids.json");
    std::fs::write(&ids_path, serde_json::to_vec(&ids).unwrap()).unwrap();
    let out_path = dir.path().join("out.json");
    let st = Command::new(py)
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/llama_ref.py"
        ))
        .arg(dir.path())
        .arg(&ids_path)
        .arg(&out_path)
        .status()
        .unwrap();
    assert!(st.success(), "reference failed");
    let reference: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&out_path).unwrap()).unwrap();
    let ref_logits: Vec<f64> = reference["logits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    let ref_loss = reference["loss"].as_f64().unwrap();

    // Ours, loaded back from the files like any Hugging Face checkpoint.
    let loaded = jobd::train::weights::load_hf_weights(dir.path(), &dev).unwrap();
    let cfg2 = LlamaConfig::load(&dir.path().join("config.json")).unwrap();
    let model = Llama::new(cfg2, &loaded, &dev).unwrap();
    let flat: Vec<u32> = ids.iter().flatten().copied().collect();
    let t = Tensor::from_vec(flat, (3, 11), &dev).unwrap();
    let mut pass = Pass::new(DType::F32, None);
    let logits = model.forward(&t, 0, None, &mut pass).unwrap();
    assert_eq!(
        logits.dims(),
        reference["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as usize)
            .collect::<Vec<_>>()
            .as_slice()
    );
    let ours: Vec<f32> = logits.flatten_all().unwrap().to_vec1().unwrap();
    let scale = ref_logits.iter().fold(0f64, |m, x| m.max(x.abs()));
    let max_err = ours
        .iter()
        .zip(&ref_logits)
        .fold(0f64, |m, (a, b)| m.max((*a as f64 - b).abs()));
    assert!(
        scale > 1.0,
        "logits too small to be a meaningful check: {scale}"
    );
    // Labels = ids shifted by one, all positions counted: the loss transformers computes.
    let mut labels = vec![0u32; 33];
    let mut mask = vec![0f32; 33];
    for b in 0..3 {
        for p in 0..10 {
            labels[b * 11 + p] = ids[b][p + 1];
            mask[b * 11 + p] = 1.0;
        }
    }
    let labels = Tensor::from_vec(labels, (3, 11), &dev).unwrap();
    let mask = Tensor::from_vec(mask, (3, 11), &dev).unwrap();
    let loss = (nll_sum(&logits, &labels, &mask).unwrap() / 30.0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap() as f64;
    let loss_rel = (loss - ref_loss).abs() / ref_loss.abs();
    eprintln!(
        "{}: max |logit error| {max_err:.2e} of max |logit| {scale:.2}; loss {loss:.6} vs {ref_loss:.6} (rel {loss_rel:.1e})",
        cfg.model_type
    );
    assert!(
        max_err / scale < 1e-4,
        "logits: {max_err} relative to {scale}"
    );
    assert!(loss_rel < 1e-4, "loss {loss} vs reference {ref_loss}");
}

#[test]
fn logits_and_loss_match_the_numpy_reference() {
    let Some(py) = python_with_numpy() else {
        eprintln!("SKIPPED: python3 is not installed, so the numpy reference cannot run");
        return;
    };
    let base = serde_json::json!({
        "model_type": "llama", "vocab_size": 61, "hidden_size": 32, "intermediate_size": 48,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 64, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
        "tie_word_embeddings": false
    });
    check(&py, config(base.clone()), 1);
    let mut tied = base.clone();
    tied["tie_word_embeddings"] = true.into();
    tied["num_key_value_heads"] = 1.into();
    tied["rope_theta"] = 10000.0.into();
    check(&py, config(tied), 2);
    let mut qwen = base.clone();
    qwen["model_type"] = "qwen2".into();
    qwen["tie_word_embeddings"] = true.into();
    check(&py, config(qwen), 3);
    // Qwen3: per-head query/key norms, heads wider than hidden / heads (12, not 8)...
    let mut qwen3 = base;
    qwen3["model_type"] = "qwen3".into();
    qwen3["head_dim"] = 12.into();
    check(&py, config(qwen3.clone()), 4);
    // ...its base as transformers 5 writes it, inside rope_parameters...
    let mut v5 = qwen3.clone();
    v5.as_object_mut().unwrap().remove("rope_theta");
    v5["rope_parameters"] = serde_json::json!({"rope_type": "default", "rope_theta": 1e6});
    check(&py, config(v5), 6);
    // ...and without head_dim, which Qwen3's configuration reads as 128.
    qwen3.as_object_mut().unwrap().remove("head_dim");
    qwen3["tie_word_embeddings"] = true.into();
    let no_head_dim = config(qwen3);
    assert_eq!(no_head_dim.head_dim(), 128);
    check(&py, no_head_dim, 5);
}
