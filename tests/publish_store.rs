//! The GGUF and the Ollama store checked against the spec (shared/docs/ollama-gguf.md), without
//! llama.cpp: every metadata key and its type, tensor names, shapes, types and the q/k
//! permutation read back with candle's independent GGUF reader; the manifest schema, every
//! digest and size, the config blob, layer media types, params JSON types, the template;
//! idempotent re-publish; and clear errors that leave nothing half-written.

mod publish_support;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use candle_core::quantized::GgmlDType;
use candle_core::quantized::gguf_file::{Content, Value};
use jobd::publish::{
    self, ModelName, Parameters, PublishError, PublishRequest, PublishSpec, Quantization,
    store::{self, Manifest},
};
use publish_support::{Shape, build_model};
use sha2::{Digest, Sha256};

fn spec(name: &str, q: Quantization) -> PublishSpec {
    PublishSpec {
        ollama_name: name.into(),
        quantization: q,
        models_dir: None,
        template: None,
        system: None,
        parameters: Parameters::default(),
        license: None,
    }
}

fn publish_to(
    model: &Path,
    models: &Path,
    spec: &PublishSpec,
) -> Result<publish::Published, PublishError> {
    let mut log = Vec::new();
    let r = publish::publish(
        &PublishRequest {
            model_dir: model,
            models_dir: models,
            spec,
            read_as: None,
            write_as: None,
        },
        |m| log.push(m.to_string()),
    );
    if r.is_ok() {
        assert!(log.iter().any(|l| l.starts_with("published ")), "{log:?}");
    }
    r
}

/// Every file below `root`, relative, sorted.
fn tree(root: &Path) -> BTreeSet<String> {
    fn walk(dir: &Path, root: &Path, out: &mut BTreeSet<String>) {
        let Ok(rd) = fs::read_dir(dir) else { return };
        for e in rd.flatten() {
            let p = e.path();
            out.insert(p.strip_prefix(root).unwrap().display().to_string());
            if p.is_dir() {
                walk(&p, root, out);
            }
        }
    }
    let mut out = BTreeSet::new();
    walk(root, root, &mut out);
    out
}

fn sha256_hex(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

/// Checks a store the way Ollama reads it, and returns the manifest of `name`.
fn check_store(root: &Path, name: &str) -> Manifest {
    let n = ModelName::parse(name).unwrap();
    let mpath = root.join("manifests").join(n.manifest_relpath());
    let bytes = fs::read(&mpath).unwrap();
    // Compact JSON with one trailing newline, as Go's json.Encoder writes it.
    assert_eq!(bytes.last(), Some(&b'\n'));
    assert_eq!(bytes.iter().filter(|&&b| b == b'\n').count(), 1);
    let raw: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    let obj = raw.as_object().unwrap();
    let keys: BTreeSet<&str> = obj.keys().map(String::as_str).collect();
    assert_eq!(
        keys,
        ["config", "layers", "mediaType", "schemaVersion"].into()
    );
    assert_eq!(raw["schemaVersion"], 2);
    assert_eq!(
        raw["mediaType"],
        "application/vnd.docker.distribution.manifest.v2+json"
    );
    assert_eq!(
        raw["config"]["mediaType"],
        "application/vnd.docker.container.image.v1+json"
    );
    let manifest: Manifest = serde_json::from_slice(&bytes).unwrap();
    // Every referenced blob exists under blobs/sha256-<hex>, hashes to its name and has the
    // size the manifest says; file modes let an `ollama` user read it.
    for layer in manifest.layers.iter().chain([&manifest.config]) {
        let hex = layer.digest.strip_prefix("sha256:").unwrap();
        assert_eq!(hex.len(), 64);
        assert!(
            hex.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        );
        let blob = root.join("blobs").join(format!("sha256-{hex}"));
        let data = fs::read(&blob).unwrap();
        assert_eq!(sha256_hex(&data), hex, "{}", blob.display());
        assert_eq!(data.len() as u64, layer.size);
        assert_eq!(
            fs::metadata(&blob).unwrap().permissions().mode() & 0o777,
            0o644
        );
    }
    assert_eq!(
        fs::metadata(&mpath).unwrap().permissions().mode() & 0o777,
        0o644
    );
    for dir in [
        root.join("blobs"),
        root.join("manifests"),
        mpath.parent().unwrap().to_path_buf(),
    ] {
        assert_eq!(
            fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
            0o755
        );
    }
    // Media types: one model layer first, at most one of each other kind, all known.
    assert_eq!(
        manifest.layers[0].media_type,
        "application/vnd.ollama.image.model"
    );
    let mut kinds = BTreeMap::new();
    for l in &manifest.layers {
        *kinds.entry(l.media_type.as_str()).or_insert(0) += 1;
        assert!(
            [
                "application/vnd.ollama.image.model",
                "application/vnd.ollama.image.template",
                "application/vnd.ollama.image.system",
                "application/vnd.ollama.image.params",
                "application/vnd.ollama.image.license",
            ]
            .contains(&l.media_type.as_str()),
            "{}",
            l.media_type
        );
    }
    assert!(kinds.values().all(|&c| c == 1), "{kinds:?}");
    assert_eq!(
        kinds.get("application/vnd.ollama.image.template"),
        Some(&1),
        "always a template"
    );
    let blob = |media: &str| -> Option<Vec<u8>> {
        let l = manifest.layers.iter().find(|l| l.media_type == media)?;
        Some(fs::read(store::blob_path(root, &l.digest).unwrap()).unwrap())
    };
    // Config blob: Ollama's ConfigV2 fields with their JSON types.
    let config: serde_json::Value = serde_json::from_slice(
        &fs::read(store::blob_path(root, &manifest.config.digest).unwrap()).unwrap(),
    )
    .unwrap();
    assert_eq!(config["model_format"], "gguf");
    assert_eq!(config["model_family"], "llama");
    assert_eq!(config["model_families"], serde_json::json!(["llama"]));
    assert_eq!(config["architecture"], "amd64");
    assert_eq!(config["os"], "linux");
    assert!(config["model_type"].is_string() && config["file_type"].is_string());
    // Template: UTF-8 and structurally a valid Go template.
    let template =
        String::from_utf8(blob("application/vnd.ollama.image.template").unwrap()).unwrap();
    jobd::spec::publish::check_template(&template).unwrap();
    // Params: a JSON object with Ollama's types (stop an array of strings, numbers, bools).
    if let Some(params) = blob("application/vnd.ollama.image.params") {
        assert_eq!(params.last(), Some(&b'\n'));
        let v: serde_json::Value = serde_json::from_slice(&params).unwrap();
        for (k, v) in v.as_object().unwrap() {
            match k.as_str() {
                "stop" => assert!(v.as_array().unwrap().iter().all(|s| s.is_string()), "{v}"),
                "use_mmap" => assert!(v.is_boolean()),
                _ => assert!(v.is_number(), "{k}: {v}"),
            }
        }
        let keys: Vec<&String> = v.as_object().unwrap().keys().collect();
        let mut sorted = keys.clone();
        sorted.sort();
        assert_eq!(keys, sorted, "keys sorted like Go's encoder");
    }
    // Nothing but digest-named files in blobs/ (Ollama deletes anything else at start-up),
    // no temp files beside the manifest and no staging left behind.
    for e in fs::read_dir(root.join("blobs")).unwrap().flatten() {
        let name = e.file_name().into_string().unwrap();
        assert!(
            store::digest_hex(&name).is_some() && name.starts_with("sha256-"),
            "{name}"
        );
    }
    let siblings: Vec<_> = fs::read_dir(mpath.parent().unwrap())
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(
        siblings
            .iter()
            .all(|s| !s.to_string_lossy().starts_with('.')),
        "{siblings:?}"
    );
    assert!(!root.join(".jobd-staging").exists());
    manifest
}

fn content(path: &Path) -> (Content, fs::File) {
    let mut f = fs::File::open(path).unwrap();
    (Content::read(&mut f).unwrap(), f)
}

#[test]
fn gguf_has_exactly_the_llama_keys_types_and_permuted_tensors() {
    let tmp = tempfile::tempdir().unwrap();
    let m = build_model(&tmp.path().join("model"), Shape::tiny());
    let out = tmp.path().join("out.gguf");
    let summary = publish::export_gguf(&m.dir, Quantization::F32, &out).unwrap();
    let bytes = fs::read(&out).unwrap();
    assert_eq!(summary.bytes, bytes.len() as u64);
    assert_eq!(summary.sha256, sha256_hex(&bytes));
    assert_eq!(&bytes[..8], b"GGUF\x03\0\0\0", "GGUF v3, little-endian");
    assert_eq!(
        fs::read_dir(tmp.path()).unwrap().count(),
        2,
        "no partial file left"
    );

    let (c, mut f) = content(&out);
    let s = &m.shape;
    let u32_keys = [
        ("general.file_type", 0),
        ("llama.context_length", s.ctx as u32),
        ("llama.embedding_length", s.hidden as u32),
        ("llama.block_count", s.layers as u32),
        ("llama.feed_forward_length", s.ff as u32),
        ("llama.attention.head_count", s.heads as u32),
        ("llama.attention.head_count_kv", s.kv_heads as u32),
        ("llama.rope.dimension_count", s.head_dim() as u32),
        ("llama.vocab_size", s.vocab as u32),
        ("tokenizer.ggml.bos_token_id", 0),
        ("tokenizer.ggml.eos_token_id", 0),
    ];
    for (k, v) in u32_keys {
        assert!(
            matches!(c.metadata[k], Value::U32(x) if x == v),
            "{k}: {:?}",
            c.metadata[k]
        );
    }
    assert!(matches!(c.metadata["llama.rope.freq_base"], Value::F32(x) if x == 10000.0));
    assert!(
        matches!(c.metadata["llama.attention.layer_norm_rms_epsilon"], Value::F32(x) if x == 1e-5)
    );
    assert!(matches!(&c.metadata["general.architecture"], Value::String(x) if x == "llama"));
    assert!(matches!(&c.metadata["tokenizer.ggml.model"], Value::String(x) if x == "gpt2"));
    assert!(matches!(&c.metadata["tokenizer.ggml.pre"], Value::String(x) if x == "gpt-2"));
    assert!(matches!(
        c.metadata["tokenizer.ggml.add_bos_token"],
        Value::Bool(false)
    ));
    assert!(matches!(
        c.metadata["tokenizer.ggml.add_eos_token"],
        Value::Bool(false)
    ));
    assert!(
        matches!(&c.metadata["tokenizer.chat_template"], Value::String(x) if x.contains("<|im_start|>"))
    );
    // Tokens: every id in byte-level form, specials CONTROL, holes UNUSED [PADn].
    let Value::Array(tokens) = &c.metadata["tokenizer.ggml.tokens"] else {
        panic!()
    };
    let Value::Array(types) = &c.metadata["tokenizer.ggml.token_type"] else {
        panic!()
    };
    assert_eq!((tokens.len(), types.len()), (s.vocab, s.vocab));
    let vocab = m.tokenizer.get_vocab(true);
    for (text, id) in &vocab {
        assert!(
            matches!(&tokens[*id as usize], Value::String(t) if t == text),
            "{id}"
        );
    }
    for (i, t) in types.iter().enumerate() {
        let Value::I32(t) = t else {
            panic!("token_type must be INT32")
        };
        let want = if i < 3 {
            3
        } else if i < vocab.len() {
            1
        } else {
            5
        };
        assert_eq!(*t, want, "token {i}");
    }
    assert!(
        matches!(&tokens[s.vocab - 1], Value::String(t) if *t == format!("[PAD{}]", s.vocab - 1))
    );
    let Value::Array(merges) = &c.metadata["tokenizer.ggml.merges"] else {
        panic!()
    };
    let json: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(m.dir.join("tokenizer.json")).unwrap()).unwrap();
    let hf_merges = json["model"]["merges"].as_array().unwrap();
    assert_eq!(merges.len(), hf_merges.len());
    for (g, h) in merges.iter().zip(hf_merges) {
        let want = format!("{} {}", h[0].as_str().unwrap(), h[1].as_str().unwrap());
        assert!(matches!(g, Value::String(x) if *x == want));
    }
    // Nothing extra.
    let expected: BTreeSet<&str> = u32_keys
        .iter()
        .map(|(k, _)| *k)
        .chain([
            "general.architecture",
            "general.name",
            "llama.rope.freq_base",
            "llama.attention.layer_norm_rms_epsilon",
            "tokenizer.ggml.model",
            "tokenizer.ggml.pre",
            "tokenizer.ggml.tokens",
            "tokenizer.ggml.token_type",
            "tokenizer.ggml.merges",
            "tokenizer.ggml.add_bos_token",
            "tokenizer.ggml.add_eos_token",
            "tokenizer.chat_template",
        ])
        .collect();
    assert_eq!(
        c.metadata
            .keys()
            .map(String::as_str)
            .collect::<BTreeSet<_>>(),
        expected
    );

    // Tensors: llama.cpp's names and GGUF dims, f32 data equal to HF's, q/k permuted.
    let mut names: BTreeSet<String> = ["token_embd.weight", "output_norm.weight", "output.weight"]
        .map(String::from)
        .into();
    for i in 0..s.layers {
        for t in [
            "attn_norm",
            "attn_q",
            "attn_k",
            "attn_v",
            "attn_output",
            "ffn_norm",
            "ffn_gate",
            "ffn_up",
            "ffn_down",
        ] {
            names.insert(format!("blk.{i}.{t}.weight"));
        }
    }
    assert_eq!(
        c.tensor_infos.keys().cloned().collect::<BTreeSet<_>>(),
        names
    );
    assert_eq!(summary.tensor_count, names.len());
    let hd = s.head_dim();
    let check = |f: &mut fs::File, gguf: &str, hf: &str, heads: Option<usize>| {
        let t = c.tensor(f, gguf, &candle_core::Device::Cpu).unwrap();
        let (shape, data) = &m.weights[hf];
        assert_eq!(t.shape().dims(), shape.as_slice(), "{gguf}");
        let got: Vec<f32> = t
            .dequantize(&candle_core::Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let cols = if shape.len() == 2 { shape[1] } else { 1 };
        for r in 0..shape[0] {
            // W_gguf[h*hd + 2i + j] = W_hf[h*hd + j*hd/2 + i]
            let src = match heads {
                Some(_) => {
                    let (h, within) = (r / hd, r % hd);
                    h * hd + (within % 2) * hd / 2 + within / 2
                }
                None => r,
            };
            assert_eq!(
                &got[r * cols..(r + 1) * cols],
                &data[src * cols..(src + 1) * cols],
                "{gguf} row {r}"
            );
        }
    };
    check(
        &mut f,
        "token_embd.weight",
        "model.embed_tokens.weight",
        None,
    );
    check(&mut f, "output.weight", "lm_head.weight", None);
    check(
        &mut f,
        "blk.1.attn_q.weight",
        "model.layers.1.self_attn.q_proj.weight",
        Some(s.heads),
    );
    check(
        &mut f,
        "blk.1.attn_k.weight",
        "model.layers.1.self_attn.k_proj.weight",
        Some(s.kv_heads),
    );
    check(
        &mut f,
        "blk.1.attn_v.weight",
        "model.layers.1.self_attn.v_proj.weight",
        None,
    );
    check(
        &mut f,
        "blk.0.ffn_down.weight",
        "model.layers.0.mlp.down_proj.weight",
        None,
    );
    check(
        &mut f,
        "blk.0.attn_norm.weight",
        "model.layers.0.input_layernorm.weight",
        None,
    );
    // GGUF dims are innermost first: [in, out].
    assert_eq!(
        c.tensor_infos["blk.0.ffn_down.weight"].shape.dims(),
        [s.hidden, s.ff]
    );
}

#[test]
fn quantized_exports_keep_norms_f32_and_tied_models_have_no_output() {
    let tmp = tempfile::tempdir().unwrap();
    let m = build_model(
        &tmp.path().join("model"),
        Shape {
            tied: true,
            bias: true,
            chat_template: false,
            ..Shape::tiny()
        },
    );
    for (q, dtype, ftype) in [
        (Quantization::F16, GgmlDType::F16, 1),
        (Quantization::Q8_0, GgmlDType::Q8_0, 7),
        (Quantization::Q4_0, GgmlDType::Q4_0, 2),
    ] {
        let out = tmp.path().join(format!("{q}.gguf"));
        let summary = publish::export_gguf(&m.dir, q, &out).unwrap();
        assert_eq!(summary.file_type, ftype);
        let (c, mut f) = content(&out);
        assert!(matches!(c.metadata["general.file_type"], Value::U32(x) if x == ftype));
        assert!(
            !c.tensor_infos.contains_key("output.weight"),
            "tied: token_embd is reused"
        );
        assert!(!c.metadata.contains_key("tokenizer.chat_template"));
        for (name, info) in &c.tensor_infos {
            let want = if info.shape.rank() == 1 {
                GgmlDType::F32
            } else {
                dtype
            };
            assert_eq!(info.ggml_dtype, want, "{name}");
        }
        // Biases are exported and the q/k ones permuted like their weights' rows.
        let hd = m.shape.head_dim();
        let qb = c
            .tensor(&mut f, "blk.0.attn_q.bias", &candle_core::Device::Cpu)
            .unwrap();
        let got: Vec<f32> = qb
            .dequantize(&candle_core::Device::Cpu)
            .unwrap()
            .to_vec1()
            .unwrap();
        let src = &m.weights["model.layers.0.self_attn.q_proj.bias"].1;
        for (r, g) in got.iter().enumerate() {
            let (h, w) = (r / hd, r % hd);
            assert_eq!(*g, src[h * hd + (w % 2) * hd / 2 + w / 2]);
        }
        assert!(c.tensor_infos.contains_key("blk.1.attn_v.bias"));
        // Quantized weights stay close to the originals (dequantized).
        let w = c
            .tensor(&mut f, "blk.0.ffn_up.weight", &candle_core::Device::Cpu)
            .unwrap();
        let got: Vec<f32> = w
            .dequantize(&candle_core::Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let src = &m.weights["model.layers.0.mlp.up_proj.weight"].1;
        let rms = (got
            .iter()
            .zip(src)
            .map(|(a, b)| ((a - b) as f64).powi(2))
            .sum::<f64>()
            / got.len() as f64)
            .sqrt();
        let tol = match q {
            Quantization::F16 => 1e-3,
            Quantization::Q8_0 => 3e-3,
            _ => 3e-2,
        };
        assert!(rms < tol && rms > 0.0, "{q}: rms {rms}");
    }
}

#[test]
fn publish_writes_a_store_ollama_can_read_and_republish_is_idempotent() {
    let tmp = tempfile::tempdir().unwrap();
    let m = build_model(&tmp.path().join("model"), Shape::tiny());
    let models = tmp.path().join("ollama/models");
    fs::create_dir_all(models.parent().unwrap()).unwrap();
    let mut sp = spec("Local/Tiny-Chat:V1", Quantization::Q8_0);
    sp.system = Some("You are terse.".into());
    sp.license = Some("MIT".into());
    sp.parameters.temperature = Some(0.7);
    sp.parameters.num_ctx = Some(256);
    let p = publish_to(&m.dir, &models, &sp).unwrap();
    assert_eq!(p.name, "local/tiny-chat:v1");
    assert_eq!(p.full_name, "registry.ollama.ai/local/tiny-chat:v1");
    assert_eq!(p.run_command, "ollama run local/tiny-chat:v1");
    assert_eq!(
        p.manifest_path,
        models.join("manifests/registry.ollama.ai/local/tiny-chat/v1")
    );
    let manifest = check_store(&models, "local/tiny-chat:v1");
    assert_eq!(
        p.manifest_digest,
        format!(
            "sha256:{}",
            sha256_hex(&fs::read(&p.manifest_path).unwrap())
        )
    );
    assert_eq!(manifest.layers[0].digest, p.gguf_digest);
    assert_eq!(manifest.layers[0].size, p.gguf_bytes);
    assert_eq!(fs::metadata(&p.gguf_path).unwrap().len(), p.gguf_bytes);
    let media: Vec<&str> = manifest
        .layers
        .iter()
        .map(|l| l.media_type.rsplit('.').next().unwrap())
        .collect();
    assert_eq!(media, ["model", "template", "system", "params", "license"]);
    let blob = |i: usize| {
        fs::read_to_string(store::blob_path(&models, &manifest.layers[i].digest).unwrap()).unwrap()
    };
    // ChatML family from the tokenizer's chat template, with its stops added.
    assert!(blob(1).contains("<|im_start|>{{ .Role }}"), "{}", blob(1));
    assert_eq!(blob(2), "You are terse.");
    assert_eq!(
        blob(3),
        "{\"num_ctx\":256,\"stop\":[\"<|im_start|>\",\"<|im_end|>\"],\"temperature\":0.7}\n"
    );
    assert_eq!(blob(4), "MIT");
    let config: serde_json::Value = serde_json::from_slice(
        &fs::read(store::blob_path(&models, &manifest.config.digest).unwrap()).unwrap(),
    )
    .unwrap();
    assert_eq!(config["file_type"], "Q8_0");
    assert_eq!(config["model_type"], store::human_number(p.parameter_count));

    // The same publish again: same manifest digest, no new files.
    let before = tree(&models);
    let again = publish_to(&m.dir, &models, &sp).unwrap();
    assert_eq!(again.manifest_digest, p.manifest_digest);
    assert_eq!(again.gguf_digest, p.gguf_digest);
    assert_eq!(tree(&models), before);

    // Another model and a re-publish of the first as f16: the old q8_0 GGUF, used by no
    // manifest any more, is removed; shared small blobs stay.
    publish_to(&m.dir, &models, &spec("other", Quantization::F32)).unwrap();
    let f16 = publish_to(
        &m.dir,
        &models,
        &PublishSpec {
            quantization: Quantization::F16,
            ..sp.clone()
        },
    )
    .unwrap();
    assert!(!p.gguf_path.exists(), "unreferenced old GGUF removed");
    assert!(f16.gguf_path.exists());
    check_store(&models, "local/tiny-chat:v1");
    check_store(&models, "other");

    // ollama list
    let list = publish::list_models(&models).unwrap();
    assert_eq!(list.len(), 2);
    let names: BTreeSet<&str> = list.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names, ["local/tiny-chat:v1", "other:latest"].into());
    let e = list
        .iter()
        .find(|e| e.name == "local/tiny-chat:v1")
        .unwrap();
    assert_eq!(e.digest, f16.manifest_digest);
    assert_eq!(e.id, &f16.manifest_digest[7..19]);
    let m16: Manifest = serde_json::from_slice(&fs::read(&f16.manifest_path).unwrap()).unwrap();
    assert_eq!(
        e.size,
        m16.layers.iter().map(|l| l.size).sum::<u64>() + m16.config.size
    );
    assert_eq!(e.quantization.as_deref(), Some("F16"));
    let table = publish::render_list(&list, std::time::SystemTime::now());
    let lines: Vec<&str> = table.lines().collect();
    assert!(
        lines[0].starts_with("NAME")
            && lines[0].contains("ID")
            && lines[0].contains("SIZE")
            && lines[0].ends_with("MODIFIED"),
        "{table}"
    );
    assert!(
        table.contains(&e.id) && table.contains(&store::human_bytes(e.size)),
        "{table}"
    );
    assert_eq!(lines.len(), 3);
}

#[test]
fn a_custom_template_is_kept_and_no_chat_family_means_prompt_template() {
    let tmp = tempfile::tempdir().unwrap();
    let m = build_model(
        &tmp.path().join("model"),
        Shape {
            chat_template: false,
            ..Shape::tiny()
        },
    );
    let models = tmp.path().join("models");
    // The tokenizer has <|im_start|> as a token: ChatML is inferred from the vocabulary.
    publish_to(&m.dir, &models, &spec("a", Quantization::F16)).unwrap();
    let man = check_store(&models, "a");
    assert_eq!(
        man.layers.len(),
        3,
        "model, template, params (ChatML stops)"
    );
    let mut sp = spec("b", Quantization::F16);
    sp.template = Some("{{ if .System }}{{ .System }} {{ end }}{{ .Prompt }}".into());
    publish_to(&m.dir, &models, &sp).unwrap();
    let man = check_store(&models, "b");
    assert_eq!(man.layers.len(), 2, "custom template and no default stops");
    let t = fs::read_to_string(store::blob_path(&models, &man.layers[1].digest).unwrap()).unwrap();
    assert_eq!(t, sp.template.unwrap());
}

fn assert_nothing_written(models: &Path, before: &BTreeSet<String>) {
    assert_eq!(&tree(models), before, "the store is unchanged");
}

#[test]
fn bad_names_unwritable_dirs_and_unsupported_tokenizers_fail_cleanly() {
    let tmp = tempfile::tempdir().unwrap();
    let m = build_model(&tmp.path().join("model"), Shape::tiny());
    let models = tmp.path().join("models");
    publish_to(&m.dir, &models, &spec("keep", Quantization::F16)).unwrap();
    let before = tree(&models);

    for bad in ["../escape", "a/b/c/d", "ns.x/m", "m:", "-m", "m/../../x"] {
        let e = publish_to(&m.dir, &models, &spec(bad, Quantization::F16)).unwrap_err();
        assert!(matches!(e, PublishError::Spec { .. }), "{bad}: {e}");
        assert!(e.to_string().contains("publish.ollama_name"), "{bad}: {e}");
        assert_nothing_written(&models, &before);
    }

    // A models directory that cannot be written: a file in its place, blobs/ a file, a
    // missing parent, and (unless root, who may write anywhere) a read-only directory.
    let file = tmp.path().join("not-a-dir");
    fs::write(&file, "x").unwrap();
    let e = publish_to(&m.dir, &file, &spec("m", Quantization::F16)).unwrap_err();
    assert!(
        matches!(e, PublishError::ModelsDir { .. }) && e.to_string().contains("not-a-dir"),
        "{e}"
    );
    let broken = tmp.path().join("broken");
    fs::create_dir(&broken).unwrap();
    fs::write(broken.join("blobs"), "x").unwrap();
    let e = publish_to(&m.dir, &broken, &spec("m", Quantization::F16)).unwrap_err();
    assert!(e.to_string().contains("blobs/"), "{e}");
    assert_eq!(tree(&broken), ["blobs".to_string()].into());
    let e = publish_to(
        &m.dir,
        &tmp.path().join("no/such/models"),
        &spec("m", Quantization::F16),
    )
    .unwrap_err();
    assert!(e.to_string().contains("does not exist"), "{e}");
    if !nix::unistd::geteuid().is_root() {
        let ro = tmp.path().join("ro");
        fs::create_dir(&ro).unwrap();
        fs::set_permissions(&ro, fs::Permissions::from_mode(0o555)).unwrap();
        let e = publish_to(&m.dir, &ro, &spec("m", Quantization::F16)).unwrap_err();
        assert!(matches!(e, PublishError::ModelsDir { .. }), "{e}");
    }
    let e = publish_to(
        &m.dir,
        Path::new("relative/models"),
        &spec("m", Quantization::F16),
    )
    .unwrap_err();
    assert!(e.to_string().contains("absolute"), "{e}");

    // Tokenizers llama.cpp cannot reproduce: named, and nothing reaches the store.
    type Edit = fn(&mut serde_json::Value);
    let variants: [(&str, Edit); 3] = [
        ("pre-tokenizer ByteLevel", |j| {
            j["pre_tokenizer"]["add_prefix_space"] = true.into()
        }),
        ("normalizer (NFKC", |j| {
            j["normalizer"] = serde_json::json!({"type": "NFKC"})
        }),
        ("pre-tokenizer Sequence", |j| {
            j["pre_tokenizer"] = serde_json::json!({"type": "Sequence", "pretokenizers": [
                {"type": "Digits", "individual_digits": false}, j["pre_tokenizer"].clone()]})
        }),
    ];
    for (why, edit) in variants {
        let dir = tmp.path().join(format!("tok-{}", why.replace(' ', "-")));
        copy_dir(&m.dir, &dir);
        let mut j: serde_json::Value =
            serde_json::from_str(&fs::read_to_string(dir.join("tokenizer.json")).unwrap()).unwrap();
        edit(&mut j);
        fs::write(dir.join("tokenizer.json"), j.to_string()).unwrap();
        tokenizers::Tokenizer::from_file(dir.join("tokenizer.json"))
            .expect("still a valid HF tokenizer");
        let e = publish_to(&dir, &models, &spec("keep", Quantization::F16)).unwrap_err();
        assert!(
            matches!(e, PublishError::UnsupportedTokenizer { .. }),
            "{e}"
        );
        assert!(
            e.to_string().contains(why) && e.to_string().contains("tokenizer.json"),
            "{e}"
        );
        assert_nothing_written(&models, &before);
        let e =
            publish::export_gguf(&dir, Quantization::F16, &tmp.path().join("x.gguf")).unwrap_err();
        assert!(matches!(e, PublishError::UnsupportedTokenizer { .. }));
        assert!(!tmp.path().join("x.gguf").exists());
    }

    // A broken model (a tensor missing, an extra tensor, a dimension q8_0 cannot block)
    // fails before anything reaches the store; the existing "keep" model is untouched.
    let dir = tmp.path().join("broken-model");
    copy_dir(&m.dir, &dir);
    let mut w = m.weights.clone();
    w.remove("model.layers.1.mlp.up_proj.weight");
    publish_support::write_safetensors(&dir.join("model.safetensors"), &w);
    let e = publish_to(&dir, &models, &spec("keep", Quantization::F16)).unwrap_err();
    assert!(
        e.to_string()
            .contains("model.layers.1.mlp.up_proj.weight: missing"),
        "{e}"
    );
    let mut w = m.weights.clone();
    w.insert("model.extra.weight".into(), (vec![2], vec![0.0, 1.0]));
    publish_support::write_safetensors(&dir.join("model.safetensors"), &w);
    let e = publish_to(&dir, &models, &spec("keep", Quantization::F16)).unwrap_err();
    assert!(
        e.to_string()
            .contains("tensor model.extra.weight: not part of a llama model"),
        "{e}"
    );
    assert_nothing_written(&models, &before);
    check_store(&models, "keep");
}

#[test]
fn q8_0_needs_block_aligned_inputs() {
    let tmp = tempfile::tempdir().unwrap();
    // hidden 48 is not a multiple of 32: q8_0 is refused with the tensor named, f16 works.
    let m = build_model(
        &tmp.path().join("model"),
        Shape {
            hidden: 48,
            heads: 3,
            kv_heads: 1,
            ff: 96,
            ..Shape::tiny()
        },
    );
    let e =
        publish::export_gguf(&m.dir, Quantization::Q8_0, &tmp.path().join("q.gguf")).unwrap_err();
    assert!(
        e.to_string().contains("tensor model.embed_tokens.weight")
            && e.to_string().contains("multiple of 32"),
        "{e}"
    );
    publish::export_gguf(&m.dir, Quantization::F16, &tmp.path().join("h.gguf")).unwrap();
    // q4_k blocks 256 inputs: the tiny model (hidden 64) is refused, not padded.
    let m = build_model(&tmp.path().join("tiny"), Shape::tiny());
    let e = publish::export_gguf(&m.dir, Quantization::Q4K, &tmp.path().join("k.gguf"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("multiple of 256") && e.contains("q4_k"), "{e}");
    assert!(!tmp.path().join("k.gguf").exists());
}

/// Sharded checkpoints (model.safetensors.index.json) in bf16 export like a single f32 file
/// of the bf16 values; a shard name that leaves the directory is refused.
#[test]
fn sharded_bf16_checkpoints_export() {
    use candle_core::{DType, Device, Tensor};
    let tmp = tempfile::tempdir().unwrap();
    let m = build_model(&tmp.path().join("model"), Shape::tiny());
    fs::remove_file(m.dir.join("model.safetensors")).unwrap();
    let mut shards: [std::collections::HashMap<String, Tensor>; 2] = Default::default();
    let mut weight_map = serde_json::Map::new();
    for (i, (name, (shape, data))) in m.weights.iter().enumerate() {
        let t = Tensor::from_slice(data, shape.as_slice(), &Device::Cpu)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        shards[i % 2].insert(name.clone(), t);
        weight_map.insert(
            name.clone(),
            format!("model-0000{}-of-00002.safetensors", i % 2 + 1).into(),
        );
    }
    for (i, shard) in shards.iter().enumerate() {
        candle_core::safetensors::save(
            shard,
            m.dir
                .join(format!("model-0000{}-of-00002.safetensors", i + 1)),
        )
        .unwrap();
    }
    let index = m.dir.join("model.safetensors.index.json");
    fs::write(
        &index,
        serde_json::json!({"metadata": {}, "weight_map": weight_map}).to_string(),
    )
    .unwrap();
    let out = tmp.path().join("s.gguf");
    publish::export_gguf(&m.dir, Quantization::F32, &out).unwrap();
    let (c, mut f) = content(&out);
    let got: Vec<f32> = c
        .tensor(&mut f, "blk.1.ffn_gate.weight", &Device::Cpu)
        .unwrap()
        .dequantize(&Device::Cpu)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let (shape, data) = &m.weights["model.layers.1.mlp.gate_proj.weight"];
    let want: Vec<f32> = Tensor::from_slice(data, shape.as_slice(), &Device::Cpu)
        .unwrap()
        .to_dtype(DType::BF16)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_eq!(got, want);
    assert_ne!(got.as_slice(), data.as_slice(), "bf16 rounding is visible");
    let mut j: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(&index).unwrap()).unwrap();
    j["weight_map"]["model.norm.weight"] = "../../etc/passwd".into();
    fs::write(&index, j.to_string()).unwrap();
    let e = publish::export_gguf(&m.dir, Quantization::F32, &out)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("is not a file name in the model directory"),
        "{e}"
    );
}

/// Files of the model directory that are not what they seem fail the publish with an error
/// naming them, and nothing is written: a FIFO (which a plain read would wait on forever, with
/// the daemon's publishing thread) and a truncated weights file.
#[test]
fn a_fifo_or_a_truncated_weights_file_fails_cleanly() {
    let tmp = tempfile::tempdir().unwrap();
    let models = tmp.path().join("models");
    fs::create_dir(&models).unwrap();
    let good = build_model(&tmp.path().join("good"), Shape::tiny());
    publish_to(&good.dir, &models, &spec("m", Quantization::F16)).unwrap();
    let before = tree(&models);
    for file in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
        let m = build_model(&tmp.path().join(file), Shape::tiny());
        let path = m.dir.join(file);
        let _ = fs::remove_file(&path);
        nix::unistd::mkfifo(&path, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let e = publish_to(&m.dir, &models, &spec("m", Quantization::F16))
            .unwrap_err()
            .to_string();
        assert!(e.contains(file) && e.contains("not a regular file"), "{e}");
        assert_nothing_written(&models, &before);
    }
    let m = build_model(&tmp.path().join("short"), Shape::tiny());
    let weights = m.dir.join("model.safetensors");
    let len = fs::metadata(&weights).unwrap().len();
    fs::OpenOptions::new()
        .write(true)
        .open(&weights)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let e = publish_to(&m.dir, &models, &spec("m", Quantization::F16))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("model.safetensors") && e.contains("truncated"),
        "{e}"
    );
    assert_nothing_written(&models, &before);
}

/// A root daemon publishing into another user's store (the systemd `ollama` user) gives what
/// it creates to that user, so `ollama rm` and Ollama's pruning can delete it.
#[test]
fn files_created_as_root_belong_to_the_stores_owner() {
    use std::os::unix::fs::MetadataExt;
    if !nix::unistd::geteuid().is_root() {
        eprintln!("not root: ownership hand-over does not apply");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let m = build_model(&tmp.path().join("model"), Shape::tiny());
    let models = tmp.path().join("models");
    fs::create_dir(&models).unwrap();
    std::os::unix::fs::chown(&models, Some(4242), Some(4343)).unwrap();
    publish_to(&m.dir, &models, &spec("local/owned:v1", Quantization::F16)).unwrap();
    check_store(&models, "local/owned:v1");
    for rel in tree(&models) {
        let meta = fs::symlink_metadata(models.join(&rel)).unwrap();
        assert_eq!((meta.uid(), meta.gid()), (4242, 4343), "{rel}");
    }
}

/// Two publishes of the same name at once both succeed and leave one consistent model.
#[test]
fn concurrent_publishes_of_one_name_leave_a_consistent_store() {
    let tmp = tempfile::tempdir().unwrap();
    let m = build_model(&tmp.path().join("model"), Shape::tiny());
    let models = tmp.path().join("models");
    let results: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = [Quantization::F16, Quantization::Q8_0]
            .into_iter()
            .map(|q| {
                let (dir, models) = (&m.dir, &models);
                s.spawn(move || publish_to(dir, models, &spec("race", q)))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for r in &results {
        assert!(r.is_ok(), "{r:?}");
    }
    let manifest = check_store(&models, "race");
    let winner = results
        .iter()
        .flatten()
        .find(|p| p.gguf_digest == manifest.layers[0].digest)
        .expect("the manifest is one of the two publishes");
    assert!(winner.gguf_path.exists());
}

/// A one-layer manifest for `layer` (the config is the same layer: enough for the store).
fn tiny_manifest(layer: &store::Layer) -> Manifest {
    Manifest {
        schema_version: 2,
        media_type: store::MANIFEST_MEDIA_TYPE.into(),
        config: layer.clone(),
        layers: vec![layer.clone()],
    }
}

/// Every blob `name`'s manifest references is there, with the bytes its digest names.
fn assert_blobs_intact(root: &Path, name: &str) {
    let n = ModelName::parse(name).unwrap();
    let m = store::read_manifest(&root.join("manifests").join(n.manifest_relpath())).unwrap();
    for layer in m.layers.iter().chain([&m.config]) {
        let path = store::blob_path(root, &layer.digest).unwrap();
        let bytes = fs::read(&path).unwrap_or_else(|e| panic!("{name}: {}: {e}", path.display()));
        assert_eq!(
            format!("sha256:{}", sha256_hex(&bytes)),
            layer.digest,
            "{name}"
        );
    }
}

/// Interleavings of two publishes sharing blobs, replayed step by step (QA found them with
/// concurrent `jobctl publish`, 26 of 40 runs for the first):
/// - a publish that fails must not delete a blob it staged when another publish's manifest,
///   committed meanwhile, uses the same bytes (that manifest was left naming missing blobs);
/// - a publish whose blob was "already present" must not fail because another publish's
///   clean-up removed that blob before the commit;
/// - re-publishing replaces a damaged blob of the right size instead of keeping it.
#[test]
fn interleaved_publishes_never_lose_a_blob_and_republish_repairs_one() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("models");
    let name = |n: &str| ModelName::parse(n).unwrap();
    let shared = b"shared template".as_slice();

    // 1. A stages the shared bytes, B publishes them, A fails: B's blob stays.
    let mut a = store::Store::open(&root).unwrap();
    a.add_bytes(store::TEMPLATE_MEDIA_TYPE, shared).unwrap();
    let mut b = store::Store::open(&root).unwrap();
    let layer = b.add_bytes(store::TEMPLATE_MEDIA_TYPE, shared).unwrap();
    b.commit(&name("victim"), &tiny_manifest(&layer)).unwrap();
    drop(b);
    drop(a);
    let blob = store::blob_path(&root, &layer.digest).unwrap();
    assert_eq!(
        fs::read(&blob).unwrap(),
        shared,
        "the committed manifest's blob is kept"
    );
    assert_blobs_intact(&root, "victim");

    // 2. A finds the blob present; B re-points "victim" elsewhere, which removes it; A's
    //    commit still succeeds with the blob in place.
    let mut a = store::Store::open(&root).unwrap();
    let a_layer = a.add_bytes(store::TEMPLATE_MEDIA_TYPE, shared).unwrap();
    let mut b = store::Store::open(&root).unwrap();
    let other = b.add_bytes(store::TEMPLATE_MEDIA_TYPE, b"other").unwrap();
    b.commit(&name("victim"), &tiny_manifest(&other)).unwrap();
    assert!(!blob.exists(), "the replaced manifest's blob was removed");
    a.commit(&name("second"), &tiny_manifest(&a_layer)).unwrap();
    assert_blobs_intact(&root, "second");
    assert_blobs_intact(&root, "victim");

    // 3. A damaged blob of the right size is replaced by a re-publish.
    let mut bytes = fs::read(&blob).unwrap();
    bytes[0] ^= 0xff;
    fs::write(&blob, &bytes).unwrap();
    let mut c = store::Store::open(&root).unwrap();
    let layer = c.add_bytes(store::TEMPLATE_MEDIA_TYPE, shared).unwrap();
    c.commit(&name("second"), &tiny_manifest(&layer)).unwrap();
    assert_eq!(fs::read(&blob).unwrap(), shared, "repaired");

    // A publish that fails leaves blobs/ exactly as it was.
    let before = tree(&root);
    let mut d = store::Store::open(&root).unwrap();
    d.add_bytes(store::TEMPLATE_MEDIA_TYPE, b"never committed")
        .unwrap();
    drop(d);
    assert_nothing_written(&root, &before);
}

fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for e in fs::read_dir(from).unwrap().flatten() {
        fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

/// Export figures for the closing note: a small model and a ~100M-parameter llama
/// (d 768, 14 layers, 12 heads, ff 2048, vocab 1024) at each quantization.
/// `cargo test --release --test publish_store -- --ignored --nocapture export_figures`
#[test]
#[ignore = "benchmark; run by hand for figures"]
fn export_figures() {
    let tmp = tempfile::tempdir().unwrap();
    let big = Shape {
        hidden: 768,
        ff: 2048,
        layers: 14,
        heads: 12,
        kv_heads: 12,
        vocab: 1024,
        tokenizer_vocab: 1000,
        ctx: 2048,
        seed: 1,
        ..Shape::tiny()
    };
    let peak_rss_kib = || -> u64 {
        let status = fs::read_to_string("/proc/self/status").unwrap();
        let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    };
    let rss_kib = || -> u64 {
        let status = fs::read_to_string("/proc/self/status").unwrap();
        let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    };
    for (label, shape) in [("tiny", Shape::tiny()), ("100M", big)] {
        let dir = tmp.path().join(label);
        // Build the model and drop its in-memory weights before measuring.
        drop(build_model(&dir, shape));
        let models = tmp.path().join("models");
        for q in Quantization::ALL {
            let out: PathBuf = tmp.path().join(format!("{label}-{q}.gguf"));
            // Reset the peak-RSS counter (Linux: "5" to clear_refs), so VmHWM is this export's.
            let _ = fs::write("/proc/self/clear_refs", "5");
            let before = rss_kib();
            let s = match publish::export_gguf(&dir, q, &out) {
                Ok(s) => s,
                Err(e) => {
                    println!("{label:>5} {q:>5}: {e}");
                    continue;
                }
            };
            let peak = peak_rss_kib().saturating_sub(before);
            let started = std::time::Instant::now();
            let p = publish_to(&dir, &models, &spec(&format!("fig-{label}:{q}"), q)).unwrap();
            println!(
                "{label:>5} {q:>5}: {:>11} params, {:>11} bytes, export {:6.2} s, publish {:6.2} s, peak RSS +{} MiB (mapped input pages included)",
                s.parameter_count,
                s.bytes,
                s.seconds,
                started.elapsed().as_secs_f64(),
                peak / 1024
            );
            assert_eq!(p.gguf_bytes, s.bytes);
            fs::remove_file(out).unwrap();
        }
    }
}

/// A root daemon reads a user's model with the user's file rights (`read_as`): a link the
/// user put in the model directory to a root-only file is not followed into the published
/// model, while an ordinary model still publishes into the root-owned store. Root only.
#[test]
fn a_root_daemon_reads_the_model_with_its_owners_rights() {
    if !nix::unistd::geteuid().is_root() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let m = build_model(&tmp.path().join("model"), Shape::tiny());
    let models = tmp.path().join("models");
    fs::create_dir(&models).unwrap();
    let nobody = jobd::jobfs::Credentials {
        uid: 65534,
        gid: 65534,
        groups: vec![65534],
    };
    let with = |dir: &Path, name: &str, read_as| {
        publish::publish(
            &PublishRequest {
                model_dir: dir,
                models_dir: &models,
                spec: &spec(name, Quantization::F16),
                read_as,
                write_as: None,
            },
            |_| {},
        )
    };
    for e in fs::read_dir(&m.dir).unwrap().flatten() {
        fs::set_permissions(e.path(), fs::Permissions::from_mode(0o644)).unwrap();
    }
    fs::set_permissions(&m.dir, fs::Permissions::from_mode(0o755)).unwrap();
    with(&m.dir, "readable", Some(&nobody)).expect("a model its owner can read publishes");

    // The owner's directory links its tokenizer to a file only root may read.
    let secret = tmp.path().join("secret");
    fs::create_dir(&secret).unwrap();
    fs::set_permissions(&secret, fs::Permissions::from_mode(0o700)).unwrap();
    let linked = tmp.path().join("linked");
    copy_dir(&m.dir, &linked);
    fs::rename(linked.join("tokenizer.json"), secret.join("tokenizer.json")).unwrap();
    std::os::unix::fs::symlink(secret.join("tokenizer.json"), linked.join("tokenizer.json"))
        .unwrap();
    let e = with(&linked, "linked", Some(&nobody)).unwrap_err();
    assert!(
        e.to_string().contains("tokenizer.json") && e.to_string().contains("ermission denied"),
        "{e}"
    );
    // With root's own rights the link is followed: what `read_as` prevents.
    with(&linked, "linked", None).expect("root reads through the link");
}

/// A models directory the job's owner named is written with their file rights (`write_as`):
/// a link they put in its place after the submit-time check, to a directory only root may
/// write (or another user's private store), gets nothing; their own directory works, and
/// what is created there is theirs. Root only.
#[test]
fn a_users_models_dir_is_written_with_their_rights() {
    use std::os::unix::fs::MetadataExt;
    if !nix::unistd::geteuid().is_root() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let m = build_model(&tmp.path().join("model"), Shape::tiny());
    for e in fs::read_dir(&m.dir).unwrap().flatten() {
        fs::set_permissions(e.path(), fs::Permissions::from_mode(0o644)).unwrap();
    }
    fs::set_permissions(&m.dir, fs::Permissions::from_mode(0o755)).unwrap();
    let nobody = jobd::jobfs::Credentials {
        uid: 65534,
        gid: 65534,
        groups: vec![65534],
    };
    let publish_into = |models: &Path| {
        publish::publish(
            &PublishRequest {
                model_dir: &m.dir,
                models_dir: models,
                spec: &spec("mine", Quantization::F16),
                read_as: Some(&nobody),
                write_as: Some(&nobody),
            },
            |_| {},
        )
    };
    let own = tmp.path().join("own");
    fs::create_dir(&own).unwrap();
    std::os::unix::fs::lchown(&own, Some(65534), Some(65534)).unwrap();
    publish_into(&own).expect("the owner's own directory");
    for f in tree(&own) {
        assert_eq!(fs::metadata(own.join(&f)).unwrap().uid(), 65534, "{f}");
    }

    let root_only = tmp.path().join("root-only");
    fs::create_dir(&root_only).unwrap();
    fs::set_permissions(&root_only, fs::Permissions::from_mode(0o700)).unwrap();
    let swapped = tmp.path().join("swapped");
    std::os::unix::fs::symlink(&root_only, &swapped).unwrap();
    let e = publish_into(&swapped).unwrap_err();
    assert!(e.to_string().contains("ermission denied"), "{e}");
    assert!(tree(&root_only).is_empty(), "{:?}", tree(&root_only));
}

/// A publish removes the staging directories that crashed publishes left (a partial GGUF of
/// gigabytes, kept forever before): older than a minute and locked by no live publish; a
/// fresh one and a held one stay.
#[test]
fn crashed_publishes_staging_is_swept() {
    let tmp = tempfile::tempdir().unwrap();
    let m = build_model(&tmp.path().join("model"), Shape::tiny());
    let models = tmp.path().join("models");
    let staging = models.join(".jobd-staging");
    let make = |name: &str, old: bool| {
        let d = staging.join(name);
        fs::create_dir_all(&d).unwrap();
        fs::write(d.join("model.gguf"), vec![0u8; 4096]).unwrap();
        if old {
            let t = std::time::SystemTime::now() - std::time::Duration::from_secs(600);
            fs::File::open(&d).unwrap().set_modified(t).unwrap();
        }
        d
    };
    let crashed = make("4242-1", true);
    let fresh = make("4243-2", false);
    let held = make("4244-3", true);
    let _lock = nix::fcntl::Flock::lock(
        fs::File::open(&held).unwrap(),
        nix::fcntl::FlockArg::LockExclusive,
    )
    .unwrap();
    publish_to(&m.dir, &models, &spec("swept", Quantization::F16)).unwrap();
    assert!(!crashed.exists(), "a crashed publish's staging is removed");
    assert!(fresh.exists() && held.exists());
}

/// The submit-time check of a base model for `[publish]`: a sweep's jobs name the same base,
/// so its result is kept while the base's files stay as they were, and found again when one
/// changes.
#[test]
fn base_checks_are_kept_while_the_base_is_unchanged() {
    let tmp = tempfile::tempdir().unwrap();
    let m = build_model(&tmp.path().join("model"), Shape::tiny());
    std::fs::write(tmp.path().join("t.txt"), "hello\n").unwrap();
    let job = |q: &str| {
        let text = format!(
            "kind = \"train\"\n[model]\nbase = \"{}\"\n[data]\ntrain_file = \"t.txt\"\n\
             [publish]\nollama_name = \"x/y\"\nquantization = \"{q}\"\n",
            m.dir.display()
        );
        jobd::spec::job::parse_and_resolve("job.toml", &text, tmp.path()).unwrap()
    };
    assert!(publish::base_issues(&job("f16")).is_empty());
    // The same base with another quantization: the kept dimensions decide it.
    let issues = publish::base_issues(&job("q4_k"));
    assert_eq!(issues.len(), 1, "{issues:?}");
    assert!(issues[0].message.contains("multiple of 256"), "{issues:?}");
    let tok = m.dir.join("tokenizer.json");
    let good = fs::read(&tok).unwrap();
    fs::write(&tok, "{}").unwrap();
    let issues = publish::base_issues(&job("f16"));
    assert!(
        issues.len() == 1 && issues[0].key == "model.base",
        "a changed tokenizer.json is read again: {issues:?}"
    );
    fs::write(&tok, good).unwrap();
    assert!(publish::base_issues(&job("f16")).is_empty());
}

/// A base the trainer does not implement is refused at submit, with or without `[publish]`,
/// naming the reason; so is a schedule's `first_base`, and a block size beyond the base's
/// context. (They used to be accepted, and their workers failed.)
#[test]
fn bases_the_trainer_cannot_train_are_refused_at_submit() {
    let tmp = tempfile::tempdir().unwrap();
    let m = build_model(&tmp.path().join("model"), Shape::tiny());
    std::fs::write(tmp.path().join("t.txt"), "hello\n").unwrap();
    let job = |publish: bool| {
        let text = format!(
            "kind = \"train\"\n[model]\nbase = \"{}\"\n[data]\ntrain_file = \"t.txt\"\n{}",
            m.dir.display(),
            if publish {
                "[publish]\nollama_name = \"x/y\"\n"
            } else {
                ""
            }
        );
        jobd::spec::job::parse_and_resolve("job.toml", &text, tmp.path()).unwrap()
    };
    assert!(publish::base_issues(&job(false)).is_empty());
    let path = m.dir.join("config.json");
    let good: serde_json::Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
    for (change, why) in [
        (
            serde_json::json!({"model_type": "gemma3_text"}),
            "model_type \"gemma3_text\" is not supported (supported: llama, mistral, qwen2, qwen3)",
        ),
        (
            serde_json::json!({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}),
            "rope_parameters type \"yarn\" is not supported",
        ),
    ] {
        let mut bad = good.clone();
        bad.as_object_mut()
            .unwrap()
            .extend(change.as_object().unwrap().clone());
        fs::write(&path, bad.to_string()).unwrap();
        for publish in [false, true] {
            let issues = publish::base_issues(&job(publish));
            assert!(
                issues.len() == 1
                    && issues[0].key == "model.base"
                    && issues[0].message.contains(why),
                "publish={publish}: {issues:?}"
            );
        }
    }
    // Examples longer than the base's context are refused too, naming the block size.
    fs::write(&path, good.to_string()).unwrap();
    let context = good["max_position_embeddings"].as_u64().unwrap();
    let mut long = job(false);
    long.data.as_mut().unwrap().block_size = Some(context as usize + 1);
    let issues = publish::base_issues(&long);
    assert!(
        issues.len() == 1
            && issues[0].key == "data.block_size"
            && issues[0]
                .message
                .contains("exceeds the base model's context"),
        "{issues:?}"
    );
    long.data.as_mut().unwrap().block_size = Some(context as usize);
    assert!(publish::base_issues(&long).is_empty());
    fs::write(&path, "{not json").unwrap();
    let issues = publish::base_issues(&job(false));
    assert!(
        issues[0]
            .message
            .contains("config.json: key must be a string"),
        "{issues:?}"
    );
    // A schedule's first base is checked as its base is.
    fs::write(&path, serde_json::json!({"model_type": "phi3"}).to_string()).unwrap();
    let text = format!(
        "kind = \"train\"\nschedule = \"@daily\"\n[model]\nbase = \"@previous\"\nfirst_base = \"{}\"\n\
         [data]\ntrain_file = \"t.txt\"\n",
        m.dir.display()
    );
    let spec = jobd::spec::job::parse_and_resolve("job.toml", &text, tmp.path()).unwrap();
    let issues = publish::base_issues(&spec);
    assert!(
        issues.len() == 1 && issues[0].key == "model.first_base",
        "{issues:?}"
    );
}

/// A model whose `generation_config.json` samples (Qwen3's: temperature 0.6, top_k 20,
/// top_p 0.95) is published with those as Ollama parameters, as Ollama's own Qwen3 carries
/// them; `[publish.parameters]` wins; a greedy `generation_config.json` adds nothing.
#[test]
fn a_models_recommended_sampling_becomes_its_ollama_parameters() {
    let tmp = tempfile::tempdir().unwrap();
    let m = build_model(&tmp.path().join("model"), Shape::tiny());
    let models = tmp.path().join("models");
    fs::create_dir_all(&models).unwrap();
    let params = |sp: &PublishSpec| {
        publish_to(&m.dir, &models, sp).unwrap();
        let manifest = check_store(&models, &sp.ollama_name);
        let layer = manifest
            .layers
            .iter()
            .find(|l| l.media_type.ends_with(".params"))
            .expect("a params layer");
        let text = fs::read(store::blob_path(&models, &layer.digest).unwrap()).unwrap();
        serde_json::from_slice::<serde_json::Value>(&text).unwrap()
    };
    let gen_path = m.dir.join("generation_config.json");
    fs::write(
        &gen_path,
        r#"{"bos_token_id": 0, "do_sample": true, "eos_token_id": [0, 1],
            "temperature": 0.6, "top_k": 20, "top_p": 0.95, "repetition_penalty": 1.0,
            "min_p": 0.0}"#,
    )
    .unwrap();
    let v = params(&spec("q/sampled", Quantization::F16));
    assert_eq!(
        (
            &v["temperature"],
            &v["top_k"],
            &v["top_p"],
            &v["repeat_penalty"],
            &v["min_p"]
        ),
        (
            &serde_json::json!(0.6),
            &serde_json::json!(20),
            &serde_json::json!(0.95),
            &serde_json::json!(1.0),
            &serde_json::json!(0.0)
        ),
        "{v}"
    );
    assert!(v["stop"].is_array(), "the family's stops stay: {v}");
    let mut mine = spec("q/mine", Quantization::F16);
    mine.parameters.temperature = Some(0.2);
    assert_eq!(params(&mine)["temperature"], 0.2);
    fs::write(&gen_path, r#"{"do_sample": false, "temperature": 0.6}"#).unwrap();
    let v = params(&spec("q/greedy", Quantization::F16));
    assert!(
        v.get("temperature").is_none() && v.get("top_k").is_none(),
        "{v}"
    );
}
