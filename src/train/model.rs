//! A llama-family decoder written for training: RMSNorm, rotary embeddings (rotate-half, as
//! Hugging Face), grouped-query attention, SwiGLU MLP, optional tied embeddings and q/k/v
//! biases, optional LoRA adapters — built only from differentiable Candle ops.
//!
//! Candle's fused `rope`, `rms_norm`, `softmax_last_dim` and `layer_norm` have no backward
//! pass and silently cut gradients, so none of them is used here: norms, rotary embeddings,
//! attention, SwiGLU and the loss go through [`super::ops`], whose kernels have backward
//! passes (and which falls back to plain differentiable ops off the CPU or outside f32).
//! Activations keep the projections' `(B, T, heads, head_dim)` layout throughout attention. The model holds clones of
//! its weight tensors; trainable ones are `Var`s owned by the trainer, whose in-place updates
//! the model sees. Parameter names are Hugging Face's (`model.layers.0.self_attn.q_proj.weight`)
//! so checkpoints load and save without renaming. Nothing here assumes a device: tensors stay
//! where their weights are, and host-side helpers (masks, dropout) are uploaded to that device.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use super::TrainError;
use super::config::LlamaConfig;
use super::ops::{self, plain};
use super::rng::Rng;

/// Result type of tensor code; Candle errors become [`TrainError::Candle`].
pub type Result<T> = std::result::Result<T, TrainError>;

/// A low-rank adapter on a projection: `y += scale · B · A · dropout(x)`.
#[derive(Debug, Clone)]
pub struct Lora {
    /// `lora_A`, shape `(r, in)`.
    pub a: Tensor,
    /// `lora_B`, shape `(out, r)`, zero at the start so training starts from the base model.
    pub b: Tensor,
    /// `lora_alpha / r`.
    pub scale: f64,
    /// Dropout probability on the adapter's input.
    pub dropout: f64,
}

/// A projection `y = x Wᵀ (+ b)` with an optional LoRA adapter.
#[derive(Debug, Clone)]
pub struct Linear {
    /// Shape `(out, in)` as in PyTorch.
    pub weight: Tensor,
    /// Shape `(out,)`.
    pub bias: Option<Tensor>,
    /// The adapter, when this module is a LoRA target.
    pub lora: Option<Lora>,
}

/// Per-forward settings: compute type and, when training with dropout, the generator.
pub struct Pass<'a> {
    /// Type of activations and matmuls (weights are cast to it on the fly).
    pub dtype: DType,
    /// Generator for dropout masks; `None` disables dropout (evaluation, generation).
    pub rng: Option<&'a mut Rng>,
    /// Use the fused kernels of [`super::ops`] where the device and type allow; `false` runs
    /// the plain-op versions (to compare against them).
    pub fused: bool,
}

impl<'a> Pass<'a> {
    /// Fused kernels, compute type `dtype`, dropout from `rng` (or none).
    pub fn new(dtype: DType, rng: Option<&'a mut Rng>) -> Self {
        Pass {
            dtype,
            rng,
            fused: true,
        }
    }
}

impl Linear {
    fn forward(&self, x: &Tensor, pass: &mut Pass<'_>) -> Result<Tensor> {
        // Any rank in, any rank out: no reshape nodes (each costs the backward a pass). On
        // CUDA the fused op takes the f32 master as it is and casts inside (no cast node).
        let uncast = pass.fused
            && ops::gpu_fusable(x)
            && x.dtype() == pass.dtype
            && (self.weight.dtype() == DType::F32 || self.weight.dtype() == pass.dtype);
        let mut y = if uncast {
            ops::linear(x, &self.weight)?
        } else if pass.fused {
            ops::linear(x, &cast(&self.weight, pass.dtype)?)?
        } else {
            plain::linear(x, &cast(&self.weight, pass.dtype)?)?
        };
        if let Some(b) = &self.bias {
            y = y.broadcast_add(&cast(b, pass.dtype)?)?;
        }
        if let Some(lora) = &self.lora {
            let xin = match pass.rng.as_deref_mut() {
                Some(rng) if lora.dropout > 0.0 => dropout(x, lora.dropout, rng)?,
                _ => x.clone(),
            };
            let a = cast(&lora.a, pass.dtype)?;
            let b = cast(&lora.b, pass.dtype)?;
            let delta = plain::linear(&plain::linear(&xin, &a)?, &b)?;
            y = (y + delta.affine(lora.scale, 0.0)?)?;
        }
        Ok(y)
    }

    /// The weight with the adapter folded in, `W + scale · B · A`, in f32 (a frozen base
    /// weight may be held in the compute type).
    pub fn merged_weight(&self) -> Result<Tensor> {
        let w = cast(&self.weight, DType::F32)?;
        match &self.lora {
            None => Ok(w),
            Some(l) => Ok((w + l.b.matmul(&l.a)?.affine(l.scale, 0.0)?)?),
        }
    }
}

fn cast(t: &Tensor, dtype: DType) -> Result<Tensor> {
    if t.dtype() == dtype {
        Ok(t.clone())
    } else {
        Ok(t.to_dtype(dtype)?)
    }
}

/// Inverted dropout with a mask drawn from our own generator (so resumed runs repeat it).
fn dropout(x: &Tensor, p: f64, rng: &mut Rng) -> Result<Tensor> {
    Ok((x * dropout_mask(x, p, rng)?)?)
}

/// The mask [`dropout`] multiplies `x` by: 0 with probability `p`, else `1 / (1 − p)`, in
/// `x`'s shape, type and device; one uniform draw of `rng` per element, in order (drawn in
/// parallel, on the GPU where `x` is — a host-made mask would cost a draw and an upload per
/// element of every adapted projection's input).
pub fn dropout_mask(x: &Tensor, p: f64, rng: &mut Rng) -> Result<Tensor> {
    let n = x.elem_count();
    let start = rng.state;
    rng.skip(n as u64);
    #[cfg(feature = "cuda")]
    if ops::gpu_fusable(x) {
        return Ok(super::cuda::dropout_mask(x, start, p)?);
    }
    let mut mask = vec![0f32; n];
    super::kernels::dropout_mask(start, p, &mut mask);
    Ok(Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?)
}

/// RMSNorm: fused, or the plain version for comparison.
fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64, pass: &Pass<'_>) -> Result<Tensor> {
    if pass.fused {
        ops::rms_norm(x, weight, eps)
    } else {
        plain::rms_norm(x, weight, eps)
    }
}

/// Qwen3's per-head norm of `x` `(B, T, heads · head_dim)` with `weight` `(head_dim)`: each
/// head's row normalised on its own; `x` unchanged without a weight.
fn head_norm(
    x: &Tensor,
    weight: Option<&Tensor>,
    heads: usize,
    eps: f64,
    pass: &Pass<'_>,
) -> Result<Tensor> {
    let Some(w) = weight else {
        return Ok(x.clone());
    };
    let (b, t, row) = x.dims3()?;
    let per_head = x.reshape((b, t, heads, row / heads.max(1)))?;
    Ok(rms_norm(&per_head, w, eps, pass)?.reshape((b, t, row))?)
}

/// Rotary tables for every position, `(max_positions, head_dim)`, in f32.
#[derive(Debug, Clone)]
pub struct Rope {
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    fn new(cfg: &LlamaConfig, device: &Device) -> Result<Self> {
        let inv = cfg.rope_inv_freq().map_err(|reason| TrainError::BadModel {
            path: "config.json".into(),
            reason,
        })?;
        let d = cfg.head_dim();
        let n = cfg.max_position_embeddings;
        let mut cos = Vec::with_capacity(n * d);
        let mut sin = Vec::with_capacity(n * d);
        for p in 0..n {
            // Hugging Face builds the angle in f32; doing the same keeps the rounding equal.
            let angles: Vec<f32> = inv.iter().map(|&f| (f as f32) * (p as f32)).collect();
            for _ in 0..2 {
                cos.extend(angles.iter().map(|a| a.cos()));
                sin.extend(angles.iter().map(|a| a.sin()));
            }
        }
        Ok(Rope {
            cos: Tensor::from_vec(cos, (n, d), device)?,
            sin: Tensor::from_vec(sin, (n, d), device)?,
        })
    }

    /// Rotates `x` of shape `(B, T, heads · head_dim)` for positions `start..start+T`.
    fn apply(&self, x: &Tensor, start: usize, pass: &Pass<'_>) -> Result<Tensor> {
        let t = x.dim(1)?;
        // The tables stay f32: the fused kernels read them so, the plain ops cast them.
        let cos = self.cos.narrow(0, start, t)?;
        let sin = self.sin.narrow(0, start, t)?;
        if pass.fused {
            ops::rope(x, &cos, &sin)
        } else {
            plain::rope(x, &cos, &sin)
        }
    }
}

/// One decoder layer's weights.
#[derive(Debug, Clone)]
pub struct Block {
    /// RMSNorm before attention.
    pub input_layernorm: Tensor,
    /// Query projection.
    pub q_proj: Linear,
    /// Key projection.
    pub k_proj: Linear,
    /// Value projection.
    pub v_proj: Linear,
    /// Output projection.
    pub o_proj: Linear,
    /// Qwen3's per-head RMSNorm of the queries and of the keys (`head_dim` weights each),
    /// before the rotary embedding; `None` for the other architectures.
    pub q_norm: Option<Tensor>,
    /// See `q_norm`.
    pub k_norm: Option<Tensor>,
    /// RMSNorm before the MLP.
    pub post_attention_layernorm: Tensor,
    /// SwiGLU gate.
    pub gate_proj: Linear,
    /// SwiGLU up projection.
    pub up_proj: Linear,
    /// SwiGLU down projection.
    pub down_proj: Linear,
}

impl Block {
    /// The projections with their module names (`q_proj`, ...).
    pub fn linears_mut(&mut self) -> [(&'static str, &mut Linear); 7] {
        [
            ("q_proj", &mut self.q_proj),
            ("k_proj", &mut self.k_proj),
            ("v_proj", &mut self.v_proj),
            ("o_proj", &mut self.o_proj),
            ("gate_proj", &mut self.gate_proj),
            ("up_proj", &mut self.up_proj),
            ("down_proj", &mut self.down_proj),
        ]
    }

    /// The projections with their module names, read-only.
    pub fn linears(&self) -> [(&'static str, &Linear); 7] {
        [
            ("q_proj", &self.q_proj),
            ("k_proj", &self.k_proj),
            ("v_proj", &self.v_proj),
            ("o_proj", &self.o_proj),
            ("gate_proj", &self.gate_proj),
            ("up_proj", &self.up_proj),
            ("down_proj", &self.down_proj),
        ]
    }
}

/// Keys and values of earlier positions, for generation one token at a time.
#[derive(Debug, Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
}

impl KvCache {
    /// Positions already cached.
    pub fn len(&self) -> usize {
        self.layers
            .first()
            .and_then(|l| l.as_ref())
            .map_or(0, |(k, _)| k.dim(1).unwrap_or(0))
    }

    /// Whether nothing is cached yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The decoder: embedding, layers, final norm, output projection.
#[derive(Debug, Clone)]
pub struct Llama {
    /// The architecture.
    pub cfg: LlamaConfig,
    /// `model.embed_tokens.weight`, `(vocab, hidden)`.
    pub embed_tokens: Tensor,
    /// The decoder layers.
    pub layers: Vec<Block>,
    /// `model.norm.weight`.
    pub norm: Tensor,
    /// `lm_head.weight`; `None` when tied to the embedding.
    pub lm_head: Option<Tensor>,
    rope: Rope,
}

/// Names and shapes of every base parameter of a configuration, in a fixed order.
pub fn parameter_shapes(cfg: &LlamaConfig) -> Vec<(String, Vec<usize>)> {
    let h = cfg.hidden_size;
    let q = cfg.num_attention_heads * cfg.head_dim();
    let kv = cfg.n_kv_heads() * cfg.head_dim();
    let i = cfg.intermediate_size;
    let mut out = vec![(
        "model.embed_tokens.weight".to_string(),
        vec![cfg.vocab_size, h],
    )];
    for l in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{l}");
        out.push((format!("{p}.input_layernorm.weight"), vec![h]));
        out.push((format!("{p}.self_attn.q_proj.weight"), vec![q, h]));
        out.push((format!("{p}.self_attn.k_proj.weight"), vec![kv, h]));
        out.push((format!("{p}.self_attn.v_proj.weight"), vec![kv, h]));
        if cfg.qkv_bias() {
            out.push((format!("{p}.self_attn.q_proj.bias"), vec![q]));
            out.push((format!("{p}.self_attn.k_proj.bias"), vec![kv]));
            out.push((format!("{p}.self_attn.v_proj.bias"), vec![kv]));
        }
        if cfg.qk_norm() {
            out.push((format!("{p}.self_attn.q_norm.weight"), vec![cfg.head_dim()]));
            out.push((format!("{p}.self_attn.k_norm.weight"), vec![cfg.head_dim()]));
        }
        out.push((format!("{p}.self_attn.o_proj.weight"), vec![h, q]));
        if cfg.o_bias() {
            out.push((format!("{p}.self_attn.o_proj.bias"), vec![h]));
        }
        out.push((format!("{p}.post_attention_layernorm.weight"), vec![h]));
        out.push((format!("{p}.mlp.gate_proj.weight"), vec![i, h]));
        out.push((format!("{p}.mlp.up_proj.weight"), vec![i, h]));
        out.push((format!("{p}.mlp.down_proj.weight"), vec![h, i]));
    }
    out.push(("model.norm.weight".to_string(), vec![h]));
    if !cfg.tie_word_embeddings {
        out.push(("lm_head.weight".to_string(), vec![cfg.vocab_size, h]));
    }
    out
}

/// Tensors of a checkpoint that a model of `cfg` does not read (transformers calls them
/// UNEXPECTED): a sign that `config.json` names another architecture than the weights'
/// (a Qwen3 labelled `llama` loses its query/key norms). Rotary buffers of old checkpoints
/// and a tied model's copy of its embeddings are expected and not listed.
pub fn unused_tensors(cfg: &LlamaConfig, weights: &BTreeMap<String, Tensor>) -> Vec<String> {
    let used: std::collections::HashSet<String> =
        parameter_shapes(cfg).into_iter().map(|(n, _)| n).collect();
    weights
        .keys()
        .filter(|n| !used.contains(*n))
        .filter(|n| !n.ends_with("rotary_emb.inv_freq"))
        .filter(|n| !(cfg.tie_word_embeddings && n.as_str() == "lm_head.weight"))
        .cloned()
        .collect()
}

/// Checks a model directory's weights against its configuration: a tensor the model needs
/// and the checkpoint lacks is an error naming the directory and the likely cause (a
/// `model_type` that is not the checkpoint's architecture); tensors it leaves out are a
/// warning ([`unused_tensors`]).
pub fn check_checkpoint(
    cfg: &LlamaConfig,
    weights: &BTreeMap<String, Tensor>,
    dir: &Path,
) -> Result<()> {
    let missing: Vec<String> = parameter_shapes(cfg)
        .into_iter()
        .map(|(n, _)| n)
        .filter(|n| !weights.contains_key(n))
        .collect();
    if let Some(first) = missing.first() {
        return Err(TrainError::BadModel {
            path: dir.to_path_buf(),
            reason: format!(
                "the checkpoint lacks {} tensors a {:?} model of this config.json needs (the \
                 first: {first}); is model_type (or tie_word_embeddings) the checkpoint's own?",
                missing.len(),
                cfg.model_type
            ),
        });
    }
    warn_unused_tensors(cfg, weights, dir);
    Ok(())
}

/// Logs a warning naming [`unused_tensors`], if there are any.
fn warn_unused_tensors(cfg: &LlamaConfig, weights: &BTreeMap<String, Tensor>, dir: &Path) {
    let unused = unused_tensors(cfg, weights);
    if let Some(first) = unused.first() {
        tracing::warn!(
            model = %dir.display(),
            "{} tensors of the checkpoint are not part of a {:?} model and are left out \
             (the first: {first}); if config.json's model_type is not the checkpoint's \
             architecture, the model trains and answers without them",
            unused.len(),
            cfg.model_type
        );
    }
}

/// The module path of a projection (`model.layers.3.self_attn.q_proj`).
pub fn module_path(layer: usize, module: &str) -> String {
    let group = match module {
        "gate_proj" | "up_proj" | "down_proj" => "mlp",
        _ => "self_attn",
    };
    format!("model.layers.{layer}.{group}.{module}")
}

/// Every parameter of `cfg` drawn at random (std 0.2; norm weights around 1, biases too, so
/// that no gradient is trivially zero), as variables under their names: a model for tests.
#[cfg(test)]
pub(crate) fn random_vars(
    cfg: &LlamaConfig,
    seed: u64,
    dev: &Device,
) -> BTreeMap<String, candle_core::Var> {
    let mut rng = Rng::new(seed);
    let w = init_weights(cfg, &mut rng, dev).expect("weights for a valid config");
    w.iter()
        .map(|(k, t)| {
            let mut d = vec![0f32; t.elem_count()];
            rng.fill_normal(&mut d, 0.2);
            if k.contains("norm") {
                d.iter_mut().for_each(|x| *x += 1.0);
            }
            let v = candle_core::Var::from_vec(d, t.shape(), dev).expect("a tensor of its shape");
            (k.clone(), v)
        })
        .collect()
}

/// A frozen base (LoRA's) as training holds it: every weight in the compute type `dtype`
/// (a bf16 run keeps 2 bytes per base parameter, as PEFT users load their base models and as
/// the VRAM estimate counts them), except the norms' weights, which the fused norms read in
/// f32. Converted one tensor at a time, so two full copies are never held.
pub fn frozen_base(
    weights: BTreeMap<String, Tensor>,
    dtype: DType,
) -> Result<BTreeMap<String, Tensor>> {
    weights
        .into_iter()
        .map(|(name, t)| {
            let t = if name.contains("norm") {
                t
            } else {
                cast(&t, dtype)?
            };
            Ok((name, t))
        })
        .collect()
}

/// Fresh weights as Hugging Face initialises a llama: normal(0, `initializer_range`) for
/// projections and embeddings, zero biases, unit norms. Drawn on the host in the fixed order
/// of [`parameter_shapes`], so a seed gives the same model on every device.
pub fn init_weights(
    cfg: &LlamaConfig,
    rng: &mut Rng,
    device: &Device,
) -> Result<BTreeMap<String, Tensor>> {
    let mut out = BTreeMap::new();
    for (name, shape) in parameter_shapes(cfg) {
        let n: usize = shape.iter().product();
        let mut data = vec![0f32; n];
        if name.ends_with("norm.weight") {
            data.fill(1.0);
        } else if !name.ends_with(".bias") {
            rng.fill_normal(&mut data, cfg.initializer_range);
        }
        out.insert(name, Tensor::from_vec(data, shape, device)?);
    }
    Ok(out)
}

impl Llama {
    /// Builds the model from named weights (Hugging Face names); every expected tensor must
    /// be present with the expected shape. Weights are used as given (no copy).
    pub fn new(
        cfg: LlamaConfig,
        weights: &BTreeMap<String, Tensor>,
        device: &Device,
    ) -> Result<Self> {
        for (name, shape) in parameter_shapes(&cfg) {
            match weights.get(&name) {
                None => return Err(TrainError::MissingTensor { name }),
                Some(t) if t.dims() != shape.as_slice() => {
                    return Err(TrainError::TensorShape {
                        name,
                        expected: shape,
                        found: t.dims().to_vec(),
                    });
                }
                Some(_) => {}
            }
        }
        let get = |n: &str| weights[n].clone();
        let opt = |n: String| weights.get(&n).cloned();
        let linear = |l: usize, m: &str| {
            let p = module_path(l, m);
            Linear {
                weight: get(&format!("{p}.weight")),
                bias: opt(format!("{p}.bias")),
                lora: None,
            }
        };
        let layers = (0..cfg.num_hidden_layers)
            .map(|l| Block {
                input_layernorm: get(&format!("model.layers.{l}.input_layernorm.weight")),
                q_proj: linear(l, "q_proj"),
                k_proj: linear(l, "k_proj"),
                v_proj: linear(l, "v_proj"),
                o_proj: linear(l, "o_proj"),
                q_norm: opt(format!("model.layers.{l}.self_attn.q_norm.weight"))
                    .filter(|_| cfg.qk_norm()),
                k_norm: opt(format!("model.layers.{l}.self_attn.k_norm.weight"))
                    .filter(|_| cfg.qk_norm()),
                post_attention_layernorm: get(&format!(
                    "model.layers.{l}.post_attention_layernorm.weight"
                )),
                gate_proj: linear(l, "gate_proj"),
                up_proj: linear(l, "up_proj"),
                down_proj: linear(l, "down_proj"),
            })
            .collect();
        let rope = Rope::new(&cfg, device)?;
        Ok(Llama {
            embed_tokens: get("model.embed_tokens.weight"),
            norm: get("model.norm.weight"),
            lm_head: if cfg.tie_word_embeddings {
                None
            } else {
                Some(get("lm_head.weight"))
            },
            layers,
            rope,
            cfg,
        })
    }

    /// The rotary tables `(max_positions, head_dim)`: cosines and sines.
    pub(crate) fn rope_tables(&self) -> (&Tensor, &Tensor) {
        (&self.rope.cos, &self.rope.sin)
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        self.embed_tokens.device()
    }

    /// Logits `(B, T, vocab)` in f32 for token ids `(B, T)` at positions `start..start+T`.
    /// With a cache, keys and values of earlier positions are reused and extended.
    pub fn forward(
        &self,
        ids: &Tensor,
        start: usize,
        cache: Option<&mut KvCache>,
        pass: &mut Pass<'_>,
    ) -> Result<Tensor> {
        let x = self.hidden(ids, start, cache, pass)?;
        let head = self.head(pass)?;
        let logits = if pass.fused {
            ops::linear(&x, &head)?
        } else {
            plain::linear(&x, &head)?
        };
        cast(&logits, DType::F32)
    }

    /// [`nll_sum`] of the logits [`Self::forward`] gives for `ids` (from position 0), computed
    /// without them where the fused kernels run: the lm_head and the loss are one op
    /// ([`ops::linear_cross_entropy`]) that never holds the whole logits or their gradient.
    /// `with_grad: false` (evaluation) returns the loss detached, without computing the
    /// gradients the fused op would otherwise compute in its forward.
    pub fn forward_loss(
        &self,
        ids: &Tensor,
        labels: &Tensor,
        mask: &Tensor,
        pass: &mut Pass<'_>,
        with_grad: bool,
    ) -> Result<Tensor> {
        let x = self.hidden(ids, 0, None, pass)?;
        let head = self.head(pass)?;
        if pass.fused && ops::fusable(&x) && ops::fusable(&head) {
            return ops::linear_cross_entropy(&x, &head, labels, mask, with_grad);
        }
        let logits = if pass.fused {
            ops::linear(&x, &head)?
        } else {
            plain::linear(&x, &head)?
        };
        let loss = nll_sum(&cast(&logits, DType::F32)?, labels, mask)?;
        Ok(if with_grad { loss } else { loss.detach() })
    }

    /// The lm_head weight (the embeddings when tied) in the compute type.
    fn head(&self, pass: &Pass<'_>) -> Result<Tensor> {
        cast(
            self.lm_head.as_ref().unwrap_or(&self.embed_tokens),
            pass.dtype,
        )
    }

    /// The final norm's output `(B, T, hidden)` in the compute type: everything before the
    /// lm_head.
    fn hidden(
        &self,
        ids: &Tensor,
        start: usize,
        mut cache: Option<&mut KvCache>,
        pass: &mut Pass<'_>,
    ) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let cfg = &self.cfg;
        if start + t > cfg.max_position_embeddings {
            return Err(TrainError::Context {
                tokens: start + t,
                max: cfg.max_position_embeddings,
            });
        }
        if let Some(c) = cache.as_deref_mut() {
            c.layers.resize(cfg.num_hidden_layers, None);
        }
        let mut x = ops::embedding(&self.embed_tokens, ids)?.reshape((b, t, cfg.hidden_size))?;
        x = cast(&x, pass.dtype)?;
        let nh = cfg.num_attention_heads;
        let nkv = cfg.n_kv_heads();
        for (l, blk) in self.layers.iter().enumerate() {
            let h = rms_norm(&x, &blk.input_layernorm, cfg.rms_norm_eps, pass)?;
            // (B, T, heads·head_dim) throughout: the kernels read heads with strides.
            let q = blk.q_proj.forward(&h, pass)?;
            let k = blk.k_proj.forward(&h, pass)?;
            let v = blk.v_proj.forward(&h, pass)?;
            let q = head_norm(&q, blk.q_norm.as_ref(), nh, cfg.rms_norm_eps, pass)?;
            let k = head_norm(&k, blk.k_norm.as_ref(), nkv, cfg.rms_norm_eps, pass)?;
            let q = self.rope.apply(&q, start, pass)?;
            let mut k = self.rope.apply(&k, start, pass)?;
            let mut v = v;
            if let Some(c) = cache.as_deref_mut() {
                if let Some((pk, pv)) = &c.layers[l] {
                    k = Tensor::cat(&[pk, &k], 1)?;
                    v = Tensor::cat(&[pv, &v], 1)?;
                }
                c.layers[l] = Some((k.clone(), v.clone()));
            }
            let y = if pass.fused {
                ops::attention(&q, &k, &v, (nh, nkv), start, cfg.window())?
            } else {
                plain::attention(&q, &k, &v, (nh, nkv), start, cfg.window())?
            };
            let y = blk.o_proj.forward(&y, pass)?;
            x = (x + y)?;
            let h = rms_norm(&x, &blk.post_attention_layernorm, cfg.rms_norm_eps, pass)?;
            let g = blk.gate_proj.forward(&h, pass)?;
            let u = blk.up_proj.forward(&h, pass)?;
            let gu = if pass.fused {
                ops::swiglu(&g, &u)?
            } else {
                plain::swiglu(&g, &u)?
            };
            let y = blk.down_proj.forward(&gu, pass)?;
            x = (x + y)?;
        }
        rms_norm(&x, &self.norm, cfg.rms_norm_eps, pass)
    }

    /// Every weight under its Hugging Face name, adapters merged in (what `save_pretrained`
    /// of the merged model writes), in f32. Tied models have no `lm_head.weight`.
    pub fn merged_weights(&self) -> Result<BTreeMap<String, Tensor>> {
        let f32 = |t: &Tensor| cast(t, DType::F32);
        let mut out = BTreeMap::new();
        out.insert("model.embed_tokens.weight".into(), f32(&self.embed_tokens)?);
        for (l, blk) in self.layers.iter().enumerate() {
            let p = format!("model.layers.{l}");
            out.insert(
                format!("{p}.input_layernorm.weight"),
                f32(&blk.input_layernorm)?,
            );
            out.insert(
                format!("{p}.post_attention_layernorm.weight"),
                f32(&blk.post_attention_layernorm)?,
            );
            for (name, w) in [("q_norm", &blk.q_norm), ("k_norm", &blk.k_norm)] {
                if let Some(w) = w {
                    out.insert(format!("{p}.self_attn.{name}.weight"), f32(w)?);
                }
            }
            for (m, lin) in blk.linears() {
                let mp = module_path(l, m);
                out.insert(format!("{mp}.weight"), lin.merged_weight()?);
                if let Some(bias) = &lin.bias {
                    out.insert(format!("{mp}.bias"), f32(bias)?);
                }
            }
        }
        out.insert("model.norm.weight".into(), f32(&self.norm)?);
        if let Some(h) = &self.lm_head {
            out.insert("lm_head.weight".into(), f32(h)?);
        }
        Ok(out)
    }
}

/// Sum over labelled positions of `-log p(label)`. `labels` `(B, T)` u32 and `mask` `(B, T)`
/// f32 (1 = counts); masked labels must still be valid ids (use 0). Fused on the CPU in f32:
/// the backward then writes the logits' gradient in one pass, without a softmax tensor.
pub fn nll_sum(logits: &Tensor, labels: &Tensor, mask: &Tensor) -> Result<Tensor> {
    // The fused loss takes (B, T, V) as it is: a reshape node would cost the backward a pass
    // over the whole logits gradient.
    Ok(ops::cross_entropy(logits, labels, mask)?.sum_all()?)
}

/// [`nll_sum`] from plain ops (the reference the fused loss is tested against).
pub fn nll_sum_plain(logits: &Tensor, labels: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let (b, t, v) = logits.dims3()?;
    let per_row = plain::cross_entropy(
        &logits.reshape((b * t, v))?,
        &labels.reshape(b * t)?,
        &mask.reshape(b * t)?,
    )?;
    Ok(per_row.sum_all()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;

    fn cfg(model_type: &str, tied: bool) -> LlamaConfig {
        let mut c: LlamaConfig = serde_json::from_value(serde_json::json!({
            "model_type": model_type, "vocab_size": 40, "hidden_size": 16,
            "intermediate_size": 24, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "max_position_embeddings": 16,
            "tie_word_embeddings": tied, "rms_norm_eps": 1e-5
        }))
        .unwrap();
        if model_type == "qwen3" {
            // Heads wider than hidden_size / heads, as Qwen3-0.6B's.
            c.head_dim = Some(6);
        }
        c
    }

    fn ids(dev: &Device) -> Tensor {
        Tensor::new(&[[1u32, 5, 7, 2, 39, 0], [3, 3, 8, 9, 10, 11]], dev).unwrap()
    }

    /// Candle's fused ops silently drop gradients; this proves every weight of every layout
    /// (untied llama, tied Qwen2 with q/k/v biases, tied Qwen3 with query/key norms, and LoRA
    /// adapters) receives a non-zero one.
    #[test]
    fn every_parameter_gets_a_gradient() {
        let dev = Device::Cpu;
        for (kind, tied) in [("llama", false), ("qwen2", true), ("qwen3", true)] {
            let c = cfg(kind, tied);
            let mut rng = Rng::new(1);
            let w = init_weights(&c, &mut rng, &dev).unwrap();
            let vars: BTreeMap<String, Var> = w
                .iter()
                .map(|(k, t)| (k.clone(), Var::from_tensor(t).unwrap()))
                .collect();
            // Random norm weights and biases, so no gradient vanishes by symmetry.
            for (k, v) in &vars {
                if k.ends_with("norm.weight") || k.ends_with(".bias") {
                    let mut d = vec![0f32; v.elem_count()];
                    rng.fill_normal(&mut d, 0.5);
                    v.set(&Tensor::from_vec(d, v.shape(), &dev).unwrap())
                        .unwrap();
                }
            }
            let tensors = vars
                .iter()
                .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
                .collect();
            let m = Llama::new(c.clone(), &tensors, &dev).unwrap();
            let mut pass = Pass::new(DType::F32, None);
            let logits = m.forward(&ids(&dev), 0, None, &mut pass).unwrap();
            let labels =
                Tensor::new(&[[5u32, 7, 2, 39, 0, 0], [3, 8, 9, 10, 11, 0]], &dev).unwrap();
            let mask = Tensor::ones((2, 6), DType::F32, &dev).unwrap();
            let loss = nll_sum(&logits, &labels, &mask).unwrap();
            let g = loss.backward().unwrap();
            assert_eq!(vars.len(), parameter_shapes(&c).len());
            assert_eq!(vars.contains_key("lm_head.weight"), !tied);
            assert_eq!(
                vars.contains_key("model.layers.0.self_attn.q_proj.bias"),
                kind == "qwen2"
            );
            assert_eq!(
                vars.contains_key("model.layers.1.self_attn.k_norm.weight"),
                kind == "qwen3"
            );
            for (name, v) in &vars {
                let gr = g
                    .get(v.as_tensor())
                    .unwrap_or_else(|| panic!("{kind}: {name} has no gradient"));
                let norm = gr
                    .sqr()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                assert!(
                    norm > 0.0 && norm.is_finite(),
                    "{kind}: {name} gradient norm {norm}"
                );
            }
        }
    }

    /// The fused kernels compute what the plain ops do, for the whole model: logits, loss and
    /// every parameter's gradient (untied multi-head llama, tied grouped-query Qwen2 with
    /// biases, a sliding window, untied Qwen3 with query/key norms).
    #[test]
    fn fused_model_matches_plain_ops() {
        let dev = Device::Cpu;
        for (kind, tied, window) in [
            ("llama", false, None),
            ("qwen2", true, Some(3)),
            ("qwen3", false, None),
        ] {
            let mut c = cfg(kind, tied);
            if kind == "llama" {
                c.num_key_value_heads = Some(4);
            }
            if let Some(w) = window {
                c.use_sliding_window = Some(true);
                c.sliding_window = Some(w);
                // On every layer (transformers' Qwen2 default starts at layer 28).
                c.extra.insert("max_window_layers".into(), 0.into());
            }
            assert_eq!(c.window(), window, "{kind}: window configured");
            let vars = random_vars(&c, 7, &dev);
            let tensors = vars
                .iter()
                .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
                .collect();
            let m = Llama::new(c.clone(), &tensors, &dev).unwrap();
            let labels =
                Tensor::new(&[[5u32, 7, 2, 39, 0, 0], [3, 8, 9, 10, 11, 0]], &dev).unwrap();
            let mask = Tensor::new(
                &[[1f32, 1., 1., 1., 1., 0.], [1., 1., 1., 1., 1., 1.]],
                &dev,
            )
            .unwrap();
            let run = |fused: bool| {
                let mut pass = Pass::new(DType::F32, None);
                pass.fused = fused;
                let logits = m.forward(&ids(&dev), 0, None, &mut pass).unwrap();
                let loss = if fused {
                    nll_sum(&logits, &labels, &mask).unwrap()
                } else {
                    nll_sum_plain(&logits, &labels, &mask).unwrap()
                };
                let g = loss.backward().unwrap();
                (logits, loss.to_scalar::<f32>().unwrap(), g)
            };
            let (lf, loss_f, gf) = run(true);
            let (lp, loss_p, gp) = run(false);
            let max_abs = |t: &Tensor| {
                t.abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap()
            };
            let d = max_abs(&(&lf - &lp).unwrap()) / max_abs(&lp);
            assert!(d < 1e-5, "{kind}: logits differ by {d}");
            assert!(
                (loss_f - loss_p).abs() < 1e-5 * loss_p.abs(),
                "{kind}: {loss_f} vs {loss_p}"
            );
            for (name, v) in &vars {
                let a = gf
                    .get(v.as_tensor())
                    .unwrap_or_else(|| panic!("{kind} {name}: no grad"));
                let b = gp.get(v.as_tensor()).unwrap();
                let d = max_abs(&(a - b).unwrap()) / (max_abs(b) + 1e-12);
                assert!(d < 1e-4, "{kind}: gradient of {name} differs by {d}");
            }
            // The trainer's path: lm_head and loss as one op (the tied model's embedding gets
            // the gradients of both its uses), and evaluation's detached loss.
            let mut pass = Pass::new(DType::F32, None);
            let loss = m
                .forward_loss(&ids(&dev), &labels, &mask, &mut pass, true)
                .unwrap();
            let gl = loss.backward().unwrap();
            let loss = loss.to_scalar::<f32>().unwrap();
            assert!(
                (loss - loss_p).abs() < 1e-5 * loss_p.abs(),
                "{kind}: forward_loss {loss} vs {loss_p}"
            );
            for (name, v) in &vars {
                let a = gl
                    .get(v.as_tensor())
                    .unwrap_or_else(|| panic!("{kind} {name}: no grad from forward_loss"));
                let b = gp.get(v.as_tensor()).unwrap();
                let d = max_abs(&(a - b).unwrap()) / (max_abs(b) + 1e-12);
                assert!(
                    d < 1e-4,
                    "{kind}: forward_loss gradient of {name} differs by {d}"
                );
            }
            let mut pass = Pass::new(DType::F32, None);
            let eval = m
                .forward_loss(&ids(&dev), &labels, &mask, &mut pass, false)
                .unwrap();
            assert!(!eval.track_op(), "{kind}: evaluation loss is detached");
            assert_eq!(eval.to_scalar::<f32>().unwrap(), loss, "{kind}: eval loss");
        }
    }

    /// Largest difference between a merged weight and `base + scale · B · A` (in f32).
    fn merge_error(merged: &Tensor, base: &Tensor, a: &Var, b: &Var, scale: f64) -> f32 {
        let delta = b.as_tensor().matmul(a.as_tensor()).unwrap();
        let want =
            (base.to_dtype(DType::F32).unwrap() + delta.affine(scale, 0.0).unwrap()).unwrap();
        (merged - want)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    #[test]
    fn lora_adapters_get_gradients_and_merge() {
        let dev = Device::Cpu;
        let c = cfg("llama", false);
        let w = init_weights(&c, &mut Rng::new(2), &dev).unwrap();
        let mut m = Llama::new(c, &w, &dev).unwrap();
        let a = Var::from_tensor(&Tensor::randn(0f32, 0.3, (3, 16), &dev).unwrap()).unwrap();
        // B starts non-zero here so that A's gradient is non-zero too.
        let b = Var::from_tensor(&Tensor::randn(0f32, 0.3, (8, 3), &dev).unwrap()).unwrap();
        m.layers[1].v_proj.lora = Some(Lora {
            a: a.as_tensor().clone(),
            b: b.as_tensor().clone(),
            scale: 2.0,
            dropout: 0.1,
        });
        let mut rng = Rng::new(5);
        let mut pass = Pass::new(DType::F32, Some(&mut rng));
        let logits = m.forward(&ids(&dev), 0, None, &mut pass).unwrap();
        let loss = logits.sqr().unwrap().sum_all().unwrap();
        let g = loss.backward().unwrap();
        for v in [&a, &b] {
            let n = g
                .get(v.as_tensor())
                .unwrap()
                .abs()
                .unwrap()
                .sum_all()
                .unwrap();
            assert!(n.to_scalar::<f32>().unwrap() > 0.0);
        }
        // Frozen base weights are plain tensors: no gradient is computed for them.
        assert!(g.get(&m.layers[1].v_proj.weight).is_none());
        let merged = m.merged_weights().unwrap();
        let name = "model.layers.1.self_attn.v_proj.weight";
        let diff = merge_error(&merged[name], &w[name], &a, &b, 2.0);
        assert!(diff < 1e-6, "{diff}");
        assert_eq!(merged.len(), w.len());
    }

    /// The reduced-precision path (bf16/f16 compute on CUDA, f32 master weights) casts
    /// correctly: f16 on the CPU gives logits close to f32 and gradients reach the f32 weights.
    #[test]
    fn half_precision_compute_keeps_f32_weights_and_gradients() {
        let dev = Device::Cpu;
        let c = cfg("qwen2", false);
        let w = init_weights(&c, &mut Rng::new(4), &dev).unwrap();
        let vars: BTreeMap<String, Var> = w
            .iter()
            .map(|(k, t)| (k.clone(), Var::from_tensor(t).unwrap()))
            .collect();
        let tensors = vars
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
            .collect();
        let m = Llama::new(c, &tensors, &dev).unwrap();
        let run = |dtype| {
            let mut pass = Pass::new(dtype, None);
            m.forward(&ids(&dev), 0, None, &mut pass).unwrap()
        };
        let full = run(DType::F32);
        let half = run(DType::F16);
        assert_eq!(half.dtype(), DType::F32, "logits come back in f32");
        let diff = (&full - &half)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let scale = full
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff < 0.02 * scale + 1e-3, "{diff} vs {scale}");
        let labels = Tensor::zeros((2, 6), DType::U32, &dev).unwrap();
        let mask = Tensor::ones((2, 6), DType::F32, &dev).unwrap();
        let g = nll_sum(&half, &labels, &mask).unwrap().backward().unwrap();
        for (name, v) in &vars {
            let gr = g
                .get(v.as_tensor())
                .unwrap_or_else(|| panic!("{name}: no gradient"));
            assert_eq!(gr.dtype(), DType::F32, "{name}");
        }
    }

    /// LoRA over base weights held in the compute type (how the trainer keeps them in bf16/f16
    /// runs): the adapters get f32 gradients, the base none, and the merged weights are f32.
    #[test]
    fn lora_over_half_precision_base_weights() {
        let dev = Device::Cpu;
        let c = cfg("llama", false);
        let w = init_weights(&c, &mut Rng::new(6), &dev).unwrap();
        for dtype in [DType::BF16, DType::F16] {
            let half = frozen_base(w.clone(), dtype).unwrap();
            let mut m = Llama::new(c.clone(), &half, &dev).unwrap();
            let a = Var::from_tensor(&Tensor::randn(0f32, 0.3, (3, 16), &dev).unwrap()).unwrap();
            let b = Var::from_tensor(&Tensor::randn(0f32, 0.3, (8, 3), &dev).unwrap()).unwrap();
            m.layers[0].v_proj.lora = Some(Lora {
                a: a.as_tensor().clone(),
                b: b.as_tensor().clone(),
                scale: 2.0,
                dropout: 0.0,
            });
            let mut pass = Pass::new(dtype, None);
            let logits = m.forward(&ids(&dev), 0, None, &mut pass).unwrap();
            let labels = Tensor::zeros((2, 6), DType::U32, &dev).unwrap();
            let mask = Tensor::ones((2, 6), DType::F32, &dev).unwrap();
            let g = nll_sum(&logits, &labels, &mask)
                .unwrap()
                .backward()
                .unwrap();
            for v in [&a, &b] {
                let gr = g.get(v.as_tensor()).expect("adapter gradient");
                assert_eq!(gr.dtype(), DType::F32);
                let n = gr
                    .abs()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                assert!(n > 0.0, "{dtype:?}");
            }
            assert!(g.get(&m.layers[0].v_proj.weight).is_none());
            let merged = m.merged_weights().unwrap();
            assert!(merged.values().all(|t| t.dtype() == DType::F32));
            let name = "model.layers.0.self_attn.v_proj.weight";
            let diff = merge_error(&merged[name], &half[name], &a, &b, 2.0);
            assert!(diff < 1e-6, "{dtype:?}: {diff}");
        }
    }

    /// Dropout masks drawn in parallel are exactly the sequential draws of the generator
    /// (what checkpoints and resumed runs rely on), and leave it where those draws would.
    #[test]
    fn dropout_masks_are_the_sequential_draws() {
        let n = 3 * (1 << 14) + 7;
        let x = Tensor::zeros(n, DType::F32, &Device::Cpu).unwrap();
        let p = 0.3;
        let mut rng = Rng::new(77);
        let got: Vec<f32> = dropout_mask(&x, p, &mut rng).unwrap().to_vec1().unwrap();
        let mut seq = Rng::new(77);
        let keep = (1.0 / (1.0 - p)) as f32;
        let want: Vec<f32> = (0..n)
            .map(|_| if seq.next_f64() < p { 0.0 } else { keep })
            .collect();
        assert!(
            got.iter()
                .zip(&want)
                .all(|(a, b)| a.to_bits() == b.to_bits())
        );
        assert_eq!(rng, seq);
        let dropped = got.iter().filter(|&&v| v == 0.0).count() as f64 / n as f64;
        assert!((dropped - p).abs() < 0.01, "{dropped}");
    }

    /// A Qwen3 checkpoint read as a llama leaves its query/key norms out, and they are
    /// named; a tied model's copy of its embeddings and old rotary buffers are not.
    #[test]
    fn tensors_a_model_does_not_read_are_named() {
        let dev = Device::Cpu;
        let qwen3 = cfg("qwen3", true);
        let mut w = init_weights(&qwen3, &mut Rng::new(1), &dev).unwrap();
        assert!(unused_tensors(&qwen3, &w).is_empty());
        w.insert(
            "lm_head.weight".into(),
            w["model.embed_tokens.weight"].clone(),
        );
        let inv = Tensor::zeros(3, DType::F32, &dev).unwrap();
        w.insert("model.layers.0.self_attn.rotary_emb.inv_freq".into(), inv);
        assert!(unused_tensors(&qwen3, &w).is_empty());
        let mut as_llama = qwen3.clone();
        as_llama.model_type = "llama".into();
        assert_eq!(
            unused_tensors(&as_llama, &w),
            [
                "model.layers.0.self_attn.k_norm.weight",
                "model.layers.0.self_attn.q_norm.weight",
                "model.layers.1.self_attn.k_norm.weight",
                "model.layers.1.self_attn.q_norm.weight",
            ]
        );
        check_checkpoint(&as_llama, &w, Path::new("m")).unwrap();
        // The other way round: a llama checkpoint labelled qwen3 lacks the norms.
        let llama = init_weights(&as_llama, &mut Rng::new(1), &dev).unwrap();
        let e = check_checkpoint(&qwen3, &llama, Path::new("m"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("m")
                && e.contains("lacks 4 tensors a \"qwen3\" model")
                && e.contains("model.layers.0.self_attn.q_norm.weight")
                && e.contains("model_type"),
            "{e}"
        );
    }

    /// Generation's cached path computes what the full forward does.
    #[test]
    fn kv_cache_matches_full_forward() {
        let dev = Device::Cpu;
        let mut pass = Pass::new(DType::F32, None);
        // Qwen3 caches keys after their norm.
        let c = cfg("qwen3", true);
        let vars = random_vars(&c, 3, &dev);
        let w = vars
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
            .collect();
        let m = Llama::new(c, &w, &dev).unwrap();
        assert_cached_matches_full(&m, &mut pass);
        let c = cfg("llama", true);
        let w = init_weights(&c, &mut Rng::new(3), &dev).unwrap();
        let m = Llama::new(c, &w, &dev).unwrap();
        let cache = assert_cached_matches_full(&m, &mut pass);
        assert_eq!(cache.len(), 5);
        let e = m.forward(
            &Tensor::zeros((1, 17), DType::U32, &dev).unwrap(),
            0,
            None,
            &mut pass,
        );
        assert!(matches!(
            e,
            Err(TrainError::Context {
                tokens: 17,
                max: 16
            })
        ));
    }

    /// Logits of 5 tokens in one forward and in three cached ones agree; the cache returned.
    fn assert_cached_matches_full(m: &Llama, pass: &mut Pass<'_>) -> KvCache {
        let dev = Device::Cpu;
        let all = Tensor::new(&[[1u32, 5, 7, 2, 39]], &dev).unwrap();
        let full = m.forward(&all, 0, None, pass).unwrap();
        let mut cache = KvCache::default();
        let head = m
            .forward(&all.narrow(1, 0, 3).unwrap(), 0, Some(&mut cache), pass)
            .unwrap();
        let t3 = m
            .forward(&all.narrow(1, 3, 1).unwrap(), 3, Some(&mut cache), pass)
            .unwrap();
        let t4 = m
            .forward(&all.narrow(1, 4, 1).unwrap(), 4, Some(&mut cache), pass)
            .unwrap();
        let inc = Tensor::cat(&[head, t3, t4], 1).unwrap();
        let diff = (full - inc)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff < 1e-5, "{} {diff}", m.cfg.model_type);
        cache
    }
}
