//! Shared by the publish tests: builds Hugging Face-layout model directories (random llama
//! weights with a chosen shape, a byte-level BPE tokenizer trained here on synthetic text), an
//! independent f64 reference forward pass over the *unpermuted* HF weights (rotate-half
//! RoPE), and a runner for the node-llama-cpp harness in `tests/llama_cpp/`.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{BPE, BpeTrainerBuilder};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::processors::byte_level::ByteLevel as ByteLevelProcessor;
use tokenizers::{
    AddedToken, DecoderWrapper, NormalizerWrapper, PostProcessorWrapper, PreTokenizerWrapper,
    Tokenizer, TokenizerBuilder,
};

/// The shape of a test model.
#[derive(Debug, Clone)]
pub struct Shape {
    pub hidden: usize,
    pub ff: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    /// Model vocab; at least the tokenizer's (the rest become `[PAD]` slots).
    pub vocab: usize,
    /// Vocabulary the tokenizer is trained to.
    pub tokenizer_vocab: usize,
    pub ctx: usize,
    pub tied: bool,
    /// Qwen2-style q/k/v biases (`model_type = "qwen2"`).
    pub bias: bool,
    /// Llama's `attention_bias`: q/k/v and o biases.
    pub llama_bias: bool,
    /// `head_dim` when it is not `hidden / heads`.
    pub head_dim: Option<usize>,
    /// `rope_scaling` in config.json.
    pub rope_scaling: Option<serde_json::Value>,
    /// `model_type` (default "llama", "qwen2" when `bias`).
    pub model_type: Option<&'static str>,
    /// The rotary base.
    pub rope_theta: f64,
    /// Write the rotary base and scaling as transformers 5 does: one `rope_parameters`
    /// object instead of `rope_theta` and `rope_scaling`.
    pub rope_parameters: bool,
    pub seed: u64,
    /// Write a ChatML `chat_template` in tokenizer_config.json.
    pub chat_template: bool,
    /// The pre-tokenizer family: "gpt-2", "smollm", "llama-bpe" or "qwen2".
    pub pre: &'static str,
}

impl Shape {
    /// A tiny GQA model: 2 layers, 4 heads over 2 KV heads, head dim 16.
    pub fn tiny() -> Shape {
        Shape {
            hidden: 64,
            ff: 128,
            layers: 2,
            heads: 4,
            kv_heads: 2,
            vocab: 384,
            tokenizer_vocab: 360,
            ctx: 256,
            tied: false,
            bias: false,
            llama_bias: false,
            head_dim: None,
            rope_scaling: None,
            model_type: None,
            rope_theta: 10000.0,
            rope_parameters: false,
            seed: 7,
            chat_template: true,
            pre: "gpt-2",
        }
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim.unwrap_or(if self.qk_norm() {
            128 // Qwen3Config's default
        } else {
            self.hidden / self.heads
        })
    }

    /// Qwen3's per-head query/key norms (`model_type = "qwen3"`).
    pub fn qk_norm(&self) -> bool {
        self.model_type == Some("qwen3")
    }

    /// Rotary frequencies as Hugging Face computes them (`rope_init_fn`), in f64.
    pub fn inv_freq(&self) -> Vec<f64> {
        let d = self.head_dim();
        let base: Vec<f64> = (0..d / 2)
            .map(|i| 1.0 / self.rope_theta.powf((2 * i) as f64 / d as f64))
            .collect();
        let Some(sc) = &self.rope_scaling else {
            return base;
        };
        let num = |k: &str| sc[k].as_f64().unwrap();
        match sc["rope_type"].as_str().unwrap() {
            "linear" => base.iter().map(|f| f / num("factor")).collect(),
            "llama3" => {
                let (factor, low, high, old) = (
                    num("factor"),
                    num("low_freq_factor"),
                    num("high_freq_factor"),
                    num("original_max_position_embeddings"),
                );
                base.iter()
                    .map(|&freq| {
                        let wavelen = 2.0 * std::f64::consts::PI / freq;
                        if wavelen < old / high {
                            freq
                        } else if wavelen > old / low {
                            freq / factor
                        } else {
                            let smooth = (old / wavelen - low) / (high - low);
                            (1.0 - smooth) * freq / factor + smooth * freq
                        }
                    })
                    .collect()
            }
            other => panic!("{other}"),
        }
    }
}

/// Weights by HF name, row-major, with their shape.
pub type Weights = BTreeMap<String, (Vec<usize>, Vec<f32>)>;

/// Special tokens the test tokenizer has (ids 0, 1, 2).
pub const SPECIALS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];

/// Texts for tokenizer checks: punctuation, digits, runs of spaces, tabs, newlines (LF and
/// CRLF), contractions and non-ASCII (accents, CJK, an emoji).
pub const SAMPLES: [&str; 5] = [
    "Hello world! The quick brown fox",
    "Hello  world!!\n\n  12345 3.14 don't I'VE  tabs\there ünïcødé 🦙 ...--== end   \n",
    "x=1; y = (a,b) -- 2048 jobs, 7 GPUs; naïve café über 日本語!?",
    "  leading spaces\r\nand CRLF\nnumbers 000123 4.5e-3 1,000,000\t\ttabs",
    "we'll publish the llama model: train, queue, job... 99 bottles",
];

/// Deterministic text with words, punctuation, digits, newlines, tabs and non-ASCII.
pub fn synthetic_text(seed: u64, bytes: usize) -> String {
    let words = [
        "the",
        "quick",
        "brown",
        "fox",
        "jumps",
        "over",
        "lazy",
        "dog",
        "model",
        "token",
        "GPU",
        "queue",
        "job",
        "train",
        "publish",
        "llama",
        "don't",
        "I'VE",
        "we'll",
        "café",
        "naïve",
        "über",
        "日本語",
        "🦙",
        "3.14",
        "2048",
        "x=1;",
        "--flag",
        "(a,b)",
        "end.",
        "Hello",
        "world!",
        "ünïcødé",
        "tab\there",
        "?!",
        "...",
    ];
    let mut rng = StdRng::seed_from_u64(seed);
    let mut s = String::new();
    while s.len() < bytes {
        s.push_str(words[rng.random_range(0..words.len())]);
        s.push_str(match rng.random_range(0..12) {
            0 => "\n",
            1 => "\n\n",
            2 => ", ",
            3 => "  ",
            _ => " ",
        });
        if rng.random_range(0..9) == 0 {
            s.push_str(&rng.random_range(0..100_000).to_string());
            s.push(' ');
        }
    }
    s
}

/// Trains a byte-level BPE with the pre-tokenizer of `pre` (see [`Shape::pre`]) on
/// synthetic text and saves it as `tokenizer.json`.
pub fn train_tokenizer(dir: &Path, vocab: usize, seed: u64, pre: &str) -> Tokenizer {
    let mut trainer = BpeTrainerBuilder::new()
        .vocab_size(vocab)
        .min_frequency(2)
        .show_progress(false)
        .special_tokens(
            SPECIALS
                .iter()
                .map(|s| AddedToken::from(s.to_string(), true))
                .collect(),
        )
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build();
    let mut tok = TokenizerBuilder::<
        BPE,
        NormalizerWrapper,
        PreTokenizerWrapper,
        PostProcessorWrapper,
        DecoderWrapper,
    >::new()
    .with_model(BPE::default())
    // Qwen's tokenizers apply NFC, which the exporter leaves out as llama.cpp's does.
    .with_normalizer((pre == "qwen2").then(|| tokenizers::normalizers::NFC.into()))
    .with_pre_tokenizer(Some(pre_tokenizer(pre)))
    .with_post_processor(Some(ByteLevelProcessor::new(false, true, true).into()))
    .with_decoder(Some(ByteLevelDecoder::default().into()))
    .build()
    .unwrap();
    let text = synthetic_text(seed, 24_000);
    let lines: Vec<String> = text.split_inclusive('\n').map(str::to_string).collect();
    tok.train(&mut trainer, lines.into_iter()).unwrap();
    let path = dir.join("tokenizer.json");
    tok.save(&path, true).unwrap();
    if pre == "llama-bpe" {
        // Llama 3's tokenizer takes whole pre-tokens found in the vocabulary.
        let mut j: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        j["model"]["ignore_merges"] = true.into();
        std::fs::write(&path, j.to_string()).unwrap();
    }
    Tokenizer::from_file(&path).unwrap()
}

fn pre_tokenizer(pre: &str) -> PreTokenizerWrapper {
    use tokenizers::pre_tokenizers::digits::Digits;
    use tokenizers::pre_tokenizers::sequence::Sequence;
    use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
    let split = |regex: &str| -> PreTokenizerWrapper {
        Split::new(
            SplitPattern::Regex(regex.into()),
            tokenizers::SplitDelimiterBehavior::Isolated,
            false,
        )
        .unwrap()
        .into()
    };
    match pre {
        "gpt-2" => ByteLevel::new(false, true, true).into(),
        "smollm" => Sequence::new(vec![
            Digits::new(true).into(),
            ByteLevel::new(false, true, true).into(),
        ])
        .into(),
        "llama-bpe" => Sequence::new(vec![
            split(jobd::publish::tokenizer::LLAMA3_REGEX),
            ByteLevel::new(false, true, false).into(),
        ])
        .into(),
        "qwen2" => Sequence::new(vec![
            split(jobd::publish::tokenizer::QWEN2_REGEX),
            ByteLevel::new(false, true, false).into(),
        ])
        .into(),
        other => panic!("unknown pre-tokenizer {other}"),
    }
}

fn uniform(rng: &mut StdRng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-scale..scale)).collect()
}

/// Random weights with activations of order 1 (uniform with std 1/sqrt(fan-in)) so logits
/// are well separated and greedy decoding is not decided by rounding.
pub fn random_weights(s: &Shape) -> Weights {
    let mut rng = StdRng::seed_from_u64(s.seed);
    let mut w = Weights::new();
    let hd = s.head_dim();
    let lin = |rng: &mut StdRng, out: usize, inp: usize| {
        (
            vec![out, inp],
            uniform(rng, out * inp, (3.0 / inp as f32).sqrt()),
        )
    };
    let norm = |rng: &mut StdRng, n: usize| {
        (
            vec![n],
            uniform(rng, n, 0.3).into_iter().map(|x| 1.0 + x).collect(),
        )
    };
    w.insert(
        "model.embed_tokens.weight".into(),
        (
            vec![s.vocab, s.hidden],
            uniform(&mut rng, s.vocab * s.hidden, 1.7),
        ),
    );
    for i in 0..s.layers {
        let p = |n: &str| format!("model.layers.{i}.{n}");
        w.insert(p("input_layernorm.weight"), norm(&mut rng, s.hidden));
        w.insert(
            p("self_attn.q_proj.weight"),
            lin(&mut rng, s.heads * hd, s.hidden),
        );
        w.insert(
            p("self_attn.k_proj.weight"),
            lin(&mut rng, s.kv_heads * hd, s.hidden),
        );
        w.insert(
            p("self_attn.v_proj.weight"),
            lin(&mut rng, s.kv_heads * hd, s.hidden),
        );
        w.insert(
            p("self_attn.o_proj.weight"),
            lin(&mut rng, s.hidden, s.heads * hd),
        );
        if s.qk_norm() {
            w.insert(p("self_attn.q_norm.weight"), norm(&mut rng, hd));
            w.insert(p("self_attn.k_norm.weight"), norm(&mut rng, hd));
        }
        if s.bias || s.llama_bias {
            for (n, rows) in [
                ("q", s.heads * hd),
                ("k", s.kv_heads * hd),
                ("v", s.kv_heads * hd),
            ] {
                w.insert(
                    p(&format!("self_attn.{n}_proj.bias")),
                    (vec![rows], uniform(&mut rng, rows, 0.5)),
                );
            }
        }
        if s.llama_bias {
            w.insert(
                p("self_attn.o_proj.bias"),
                (vec![s.hidden], uniform(&mut rng, s.hidden, 0.5)),
            );
        }
        w.insert(
            p("post_attention_layernorm.weight"),
            norm(&mut rng, s.hidden),
        );
        w.insert(p("mlp.gate_proj.weight"), lin(&mut rng, s.ff, s.hidden));
        w.insert(p("mlp.up_proj.weight"), lin(&mut rng, s.ff, s.hidden));
        w.insert(p("mlp.down_proj.weight"), lin(&mut rng, s.hidden, s.ff));
    }
    w.insert("model.norm.weight".into(), norm(&mut rng, s.hidden));
    if !s.tied {
        // Logits with a standard deviation of about 4: near-ties are rare.
        let (shape, v) = lin(&mut rng, s.vocab, s.hidden);
        w.insert(
            "lm_head.weight".into(),
            (shape, v.into_iter().map(|x| 4.0 * x).collect()),
        );
    }
    w
}

/// Writes `weights` as `model.safetensors` (f32).
pub fn write_safetensors(path: &Path, weights: &Weights) {
    let bytes: BTreeMap<&String, Vec<u8>> = weights
        .iter()
        .map(|(k, (_, v))| (k, v.iter().flat_map(|x| x.to_le_bytes()).collect()))
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = weights
        .iter()
        .map(|(k, (shape, _))| {
            (
                k.clone(),
                safetensors::tensor::TensorView::new(
                    safetensors::Dtype::F32,
                    shape.clone(),
                    &bytes[k],
                )
                .unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

/// A model directory built for a test.
pub struct TestModel {
    pub dir: PathBuf,
    pub shape: Shape,
    pub weights: Weights,
    pub tokenizer: Tokenizer,
}

/// Writes a complete HF-layout model directory into `dir`.
pub fn build_model(dir: &Path, shape: Shape) -> TestModel {
    std::fs::create_dir_all(dir).unwrap();
    let tokenizer = train_tokenizer(dir, shape.tokenizer_vocab, shape.seed, shape.pre);
    assert!(tokenizer.get_vocab_size(true) <= shape.vocab);
    let weights = random_weights(&shape);
    write_safetensors(&dir.join("model.safetensors"), &weights);
    let mut config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": shape.hidden,
        "intermediate_size": shape.ff,
        "num_hidden_layers": shape.layers,
        "num_attention_heads": shape.heads,
        "num_key_value_heads": shape.kv_heads,
        "vocab_size": shape.vocab,
        "max_position_embeddings": shape.ctx,
        "rms_norm_eps": 1e-5,
        "rope_theta": shape.rope_theta,
        "hidden_act": "silu",
        "tie_word_embeddings": shape.tied,
        "bos_token_id": 0,
        "eos_token_id": 0,
        "torch_dtype": "float32",
    });
    if shape.bias {
        config["model_type"] = "qwen2".into();
    }
    if shape.llama_bias {
        config["attention_bias"] = true.into();
    }
    if let Some(t) = shape.model_type {
        config["model_type"] = t.into();
        if t == "qwen3" {
            config["architectures"] = serde_json::json!(["Qwen3ForCausalLM"]);
        }
    }
    if let Some(hd) = shape.head_dim {
        config["head_dim"] = hd.into();
    }
    if let Some(sc) = &shape.rope_scaling {
        config["rope_scaling"] = sc.clone();
    }
    if shape.rope_parameters {
        let mut p = shape
            .rope_scaling
            .clone()
            .unwrap_or_else(|| serde_json::json!({"rope_type": "default"}));
        p["rope_theta"] = shape.rope_theta.into();
        let c = config.as_object_mut().unwrap();
        c.remove("rope_theta");
        c.remove("rope_scaling");
        c.insert("rope_parameters".into(), p);
    }
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(&config).unwrap(),
    )
    .unwrap();
    if shape.chat_template {
        let cfg = serde_json::json!({
            "bos_token": "<|endoftext|>",
            "eos_token": "<|endoftext|>",
            "chat_template": "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
        });
        std::fs::write(dir.join("tokenizer_config.json"), cfg.to_string()).unwrap();
    }
    TestModel {
        dir: dir.to_path_buf(),
        shape,
        weights,
        tokenizer,
    }
}

fn get<'a>(w: &'a Weights, name: &str) -> &'a [f32] {
    &w.get(name).unwrap_or_else(|| panic!("no {name}")).1
}

/// y = W x (+ b) for W [out, in] row-major.
fn matvec(w: &[f32], b: Option<&[f32]>, x: &[f64], out: usize) -> Vec<f64> {
    let inp = x.len();
    (0..out)
        .map(|o| {
            let row = &w[o * inp..(o + 1) * inp];
            let dot: f64 = row.iter().zip(x).map(|(a, b)| *a as f64 * b).sum();
            dot + b.map_or(0.0, |b| b[o] as f64)
        })
        .collect()
}

fn rms_norm(x: &[f64], w: &[f32], eps: f64) -> Vec<f64> {
    let ms = x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64;
    let inv = 1.0 / (ms + eps).sqrt();
    x.iter().zip(w).map(|(v, w)| v * inv * *w as f64).collect()
}

/// Hugging Face's rotate-half RoPE on one head: pairs (i, i + hd/2).
fn rope_rotate_half(v: &mut [f64], pos: usize, inv_freq: &[f64]) {
    let hd = v.len();
    for (i, freq) in inv_freq.iter().enumerate() {
        let (sin, cos) = (pos as f64 * freq).sin_cos();
        let (a, b) = (v[i], v[i + hd / 2]);
        v[i] = a * cos - b * sin;
        v[i + hd / 2] = b * cos + a * sin;
    }
}

/// Keys and values of one layer, one vector per position.
type KvCache = (Vec<Vec<f64>>, Vec<Vec<f64>>);

/// An incremental f64 forward pass over the HF weights with a KV cache.
pub struct Reference<'a> {
    m: &'a TestModel,
    /// Per layer: keys and values of every position so far (RoPE applied to keys).
    cache: Vec<KvCache>,
    inv_freq: Vec<f64>,
}

impl<'a> Reference<'a> {
    pub fn new(m: &'a TestModel) -> Self {
        Reference {
            m,
            cache: vec![(Vec::new(), Vec::new()); m.shape.layers],
            inv_freq: m.shape.inv_freq(),
        }
    }

    /// Feeds one token and returns the next-token logits.
    pub fn step(&mut self, token: u32) -> Vec<f64> {
        let s = &self.m.shape;
        let w = &self.m.weights;
        let (h, hd) = (s.hidden, s.head_dim());
        let group = s.heads / s.kv_heads;
        let pos = self.cache[0].0.len();
        let embed = get(w, "model.embed_tokens.weight");
        let mut x: Vec<f64> = embed[token as usize * h..(token as usize + 1) * h]
            .iter()
            .map(|&v| v as f64)
            .collect();
        for l in 0..s.layers {
            let p = |n: &str| format!("model.layers.{l}.{n}");
            let bias = |n: &str| w.get(&p(n)).map(|(_, v)| v.as_slice());
            let hn = rms_norm(&x, get(w, &p("input_layernorm.weight")), 1e-5);
            let mut q = matvec(
                get(w, &p("self_attn.q_proj.weight")),
                bias("self_attn.q_proj.bias"),
                &hn,
                s.heads * hd,
            );
            let mut k = matvec(
                get(w, &p("self_attn.k_proj.weight")),
                bias("self_attn.k_proj.bias"),
                &hn,
                s.kv_heads * hd,
            );
            let v = matvec(
                get(w, &p("self_attn.v_proj.weight")),
                bias("self_attn.v_proj.bias"),
                &hn,
                s.kv_heads * hd,
            );
            if s.qk_norm() {
                // Qwen3: each head normed on its own, before the rotation.
                let qn = get(w, &p("self_attn.q_norm.weight"));
                let kn = get(w, &p("self_attn.k_norm.weight"));
                q = q.chunks(hd).flat_map(|c| rms_norm(c, qn, 1e-5)).collect();
                k = k.chunks(hd).flat_map(|c| rms_norm(c, kn, 1e-5)).collect();
            }
            q.chunks_mut(hd)
                .for_each(|c| rope_rotate_half(c, pos, &self.inv_freq));
            k.chunks_mut(hd)
                .for_each(|c| rope_rotate_half(c, pos, &self.inv_freq));
            let (ks, vs) = &mut self.cache[l];
            ks.push(k);
            vs.push(v);
            let mut attn = vec![0.0; s.heads * hd];
            for head in 0..s.heads {
                let kvh = head / group;
                let q = &q[head * hd..(head + 1) * hd];
                let scores: Vec<f64> = ks
                    .iter()
                    .map(|k| {
                        let k = &k[kvh * hd..(kvh + 1) * hd];
                        q.iter().zip(k).map(|(a, b)| a * b).sum::<f64>() / (hd as f64).sqrt()
                    })
                    .collect();
                let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let exps: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                let sum: f64 = exps.iter().sum();
                for (e, v) in exps.iter().zip(vs.iter()) {
                    let v = &v[kvh * hd..(kvh + 1) * hd];
                    for d in 0..hd {
                        attn[head * hd + d] += e / sum * v[d];
                    }
                }
            }
            let o = matvec(
                get(w, &p("self_attn.o_proj.weight")),
                bias("self_attn.o_proj.bias"),
                &attn,
                h,
            );
            x.iter_mut().zip(&o).for_each(|(a, b)| *a += b);
            let hn = rms_norm(&x, get(w, &p("post_attention_layernorm.weight")), 1e-5);
            let g = matvec(get(w, &p("mlp.gate_proj.weight")), None, &hn, s.ff);
            let u = matvec(get(w, &p("mlp.up_proj.weight")), None, &hn, s.ff);
            let act: Vec<f64> = g
                .iter()
                .zip(&u)
                .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
                .collect();
            let d = matvec(get(w, &p("mlp.down_proj.weight")), None, &act, h);
            x.iter_mut().zip(&d).for_each(|(a, b)| *a += b);
        }
        let head = if s.tied {
            get(w, "model.embed_tokens.weight")
        } else {
            get(w, "lm_head.weight")
        };
        let hn = rms_norm(&x, get(w, "model.norm.weight"), 1e-5);
        matvec(head, None, &hn, s.vocab)
    }
}

/// Next-token logits after every position of `ids`, computed in f64 from the HF weights.
pub fn reference_logits(m: &TestModel, ids: &[u32]) -> Vec<Vec<f64>> {
    let mut r = Reference::new(m);
    ids.iter().map(|&t| r.step(t)).collect()
}

/// Argmax (lowest id on ties) and the gap to the runner-up.
pub fn top1(row: &[f64]) -> (u32, f64) {
    let mut best = (0usize, f64::NEG_INFINITY);
    let mut second = f64::NEG_INFINITY;
    for (i, &v) in row.iter().enumerate() {
        if v > best.1 {
            second = best.1;
            best = (i, v);
        } else if v > second {
            second = v;
        }
    }
    (best.0 as u32, best.1 - second)
}

/// Greedy continuation with the reference forward; also the smallest top-1 margin seen.
pub fn reference_greedy(m: &TestModel, prompt: &[u32], n: usize) -> (Vec<u32>, f64) {
    let mut r = Reference::new(m);
    let mut logits = Vec::new();
    for &t in prompt {
        logits = r.step(t);
    }
    let mut out = Vec::new();
    let mut min_margin = f64::INFINITY;
    for _ in 0..n {
        let (t, margin) = top1(&logits);
        min_margin = min_margin.min(margin);
        out.push(t);
        logits = r.step(t);
    }
    (out, min_margin)
}

/// The weights a GGUF actually holds (dequantized by candle, q/k rows permuted back to
/// Hugging Face order, HF names): the model llama.cpp should be computing if it reads the
/// bytes the way candle wrote them.
pub fn weights_from_gguf(path: &Path, m: &TestModel) -> Weights {
    use candle_core::quantized::gguf_file::Content;
    let mut f = std::fs::File::open(path).unwrap();
    let c = Content::read(&mut f).unwrap();
    let hd = m.shape.head_dim();
    let mut out = Weights::new();
    for name in c.tensor_infos.keys() {
        let hf = match name.as_str() {
            "token_embd.weight" => "model.embed_tokens.weight".to_string(),
            "output_norm.weight" => "model.norm.weight".to_string(),
            "output.weight" => "lm_head.weight".to_string(),
            "rope_freqs.weight" => continue,
            n => {
                let rest = n.strip_prefix("blk.").unwrap();
                let (layer, t) = rest.split_once('.').unwrap();
                let hf_t = match t {
                    "attn_norm.weight" => "input_layernorm.weight",
                    "ffn_norm.weight" => "post_attention_layernorm.weight",
                    "attn_q.weight" => "self_attn.q_proj.weight",
                    "attn_k.weight" => "self_attn.k_proj.weight",
                    "attn_v.weight" => "self_attn.v_proj.weight",
                    "attn_output.weight" => "self_attn.o_proj.weight",
                    "attn_q.bias" => "self_attn.q_proj.bias",
                    "attn_k.bias" => "self_attn.k_proj.bias",
                    "attn_v.bias" => "self_attn.v_proj.bias",
                    "attn_output.bias" => "self_attn.o_proj.bias",
                    "attn_q_norm.weight" => "self_attn.q_norm.weight",
                    "attn_k_norm.weight" => "self_attn.k_norm.weight",
                    "ffn_gate.weight" => "mlp.gate_proj.weight",
                    "ffn_up.weight" => "mlp.up_proj.weight",
                    "ffn_down.weight" => "mlp.down_proj.weight",
                    other => panic!("unexpected tensor {other}"),
                };
                format!("model.layers.{layer}.{hf_t}")
            }
        };
        let t = c.tensor(&mut f, name, &candle_core::Device::Cpu).unwrap();
        let shape = t.shape().dims().to_vec();
        let data: Vec<f32> = t
            .dequantize(&candle_core::Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        // llama's q and k rows are permuted for ggml's pairwise RoPE; qwen3's are not.
        let permuted =
            !m.shape.qk_norm() && (name.contains(".attn_q.") || name.contains(".attn_k."));
        let data = if permuted {
            let cols = data.len() / shape[0];
            let mut hf_data = vec![0f32; data.len()];
            for r in 0..shape[0] {
                // W_gguf[h*hd + 2i + j] = W_hf[h*hd + j*hd/2 + i]
                let (h, w) = (r / hd, r % hd);
                let src = h * hd + (w % 2) * hd / 2 + w / 2;
                hf_data[src * cols..(src + 1) * cols]
                    .copy_from_slice(&data[r * cols..(r + 1) * cols]);
            }
            hf_data
        } else {
            data
        };
        out.insert(hf, (shape, data));
    }
    out
}

/// The node-llama-cpp harness in `tests/llama_cpp/`.
pub struct LlamaCpp {
    dir: PathBuf,
}

impl LlamaCpp {
    /// Installs node-llama-cpp via `tests/llama_cpp/install.sh` if needed (the script is a
    /// no-op once installed).
    pub fn setup() -> LlamaCpp {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/llama_cpp");
        let status = Command::new("bash")
            .arg(dir.join("install.sh"))
            .status()
            .expect("run tests/llama_cpp/install.sh (needs bash, node >= 20 and npm)");
        assert!(status.success(), "tests/llama_cpp/install.sh failed");
        LlamaCpp { dir }
    }

    /// Runs the harness on `model` with `ops` and returns the results array.
    pub fn run(&self, model: &Path, ops: serde_json::Value) -> Vec<serde_json::Value> {
        let req = serde_json::json!({"model": model, "context_size": 256, "ops": ops});
        let tmp = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(tmp.path(), req.to_string()).unwrap();
        let out = Command::new("node")
            .arg(self.dir.join("harness.mjs"))
            .arg(tmp.path())
            .output()
            .expect("run node");
        assert!(
            out.status.success(),
            "harness failed on {}:\n{}",
            model.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "bad harness output ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        });
        v["results"].as_array().unwrap().clone()
    }
}

/// How llama.cpp on a GGUF agrees with another implementation of the same model.
#[derive(Debug, Clone, PartialEq)]
pub struct Agreement {
    /// Per prompt: llama.cpp's greedy continuation and the other's.
    pub greedy: Vec<(Vec<u32>, Vec<u32>)>,
    /// Fraction of teacher-forced positions with the same top-1 next token.
    pub top1: f64,
    /// Teacher-forced positions compared (over all sequences).
    pub positions: usize,
}

impl Agreement {
    /// Prompts whose whole greedy continuation is identical.
    pub fn exact_prompts(&self) -> usize {
        self.greedy.iter().filter(|(a, b)| a == b).count()
    }

    /// Per prompt: how many leading ids of the two continuations are equal.
    pub fn equal_prefixes(&self) -> Vec<usize> {
        self.greedy
            .iter()
            .map(|(a, b)| a.iter().zip(b).take_while(|(x, y)| x == y).count())
            .collect()
    }
}

/// Runs llama.cpp on `gguf` and compares it with another implementation given as two
/// closures: `greedy(prompt_ids, n)` (argmax continuation, e.g. `jobd generate`'s loop on
/// ids) and `top1(ids)` (argmax next token after each prefix of `ids`, from one forward pass),
/// the latter over each of `teacher_forced` (agreement pooled over all their positions).
/// For the Candle model (`tests/it/llama_cpp.rs`):
/// ```ignore
/// let a = compare_with(&lcp, &gguf, &prompts, 16, &sequences,
///     |p, n| generator.greedy_ids(p, n).unwrap(), |ids| generator.top1_ids(ids).unwrap());
/// assert!(a.exact_prompts() == prompts.len());   // f32
/// assert!(a.top1 >= 0.9);                         // f16, q8_0
/// ```
pub fn compare_with(
    lcp: &LlamaCpp,
    gguf: &Path,
    prompts: &[Vec<u32>],
    n: usize,
    teacher_forced: &[Vec<u32>],
    greedy: impl Fn(&[u32], usize) -> Vec<u32>,
    top1: impl Fn(&[u32]) -> Vec<u32>,
) -> Agreement {
    let mut ops: Vec<serde_json::Value> = prompts
        .iter()
        .map(|p| serde_json::json!({"op": "greedy", "prompt": p, "n": n}))
        .collect();
    ops.extend(
        teacher_forced
            .iter()
            .map(|ids| serde_json::json!({"op": "teacher_forced", "ids": ids})),
    );
    let r = lcp.run(gguf, serde_json::Value::Array(ops));
    let greedy_pairs = prompts
        .iter()
        .zip(&r)
        .map(|(p, got)| (ids(&got["ids"]), greedy(p, n)))
        .collect();
    let (mut same, mut positions) = (0, 0);
    for (seq, got) in teacher_forced.iter().zip(&r[prompts.len()..]) {
        let lcp_top1 = ids(&got["top1"]);
        let other = top1(seq);
        assert_eq!(lcp_top1.len(), seq.len(), "one prediction per position");
        assert_eq!(other.len(), seq.len(), "one prediction per position");
        same += lcp_top1.iter().zip(&other).filter(|(a, b)| a == b).count();
        positions += seq.len();
    }
    Agreement {
        greedy: greedy_pairs,
        top1: same as f64 / positions.max(1) as f64,
        positions,
    }
}

/// The GGUF blob the manifest of `name` in the Ollama store `models` points to, as Ollama
/// would find it.
pub fn model_blob(models: &Path, name: &str) -> PathBuf {
    use jobd::publish::{self, store};
    let n = publish::parse_model_name(name).unwrap();
    let manifest = store::read_manifest(&store::manifest_path(models, &n).unwrap()).unwrap();
    let layer = manifest
        .layers
        .iter()
        .find(|l| l.media_type == store::MODEL_MEDIA_TYPE)
        .unwrap_or_else(|| panic!("{name}: no model layer in its manifest"));
    store::blob_path(models, &layer.digest).unwrap()
}

/// JSON array of ids.
pub fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap_or_else(|| panic!("not an array: {v}"))
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}
