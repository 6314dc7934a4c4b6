//! One training step of a full fine-tune on the CPU in f32 without Candle's autograd graph:
//! a forward over the fused kernels of [`super::kernels`] that keeps exactly the activations
//! the backward needs, and a hand-written backward for the whole model.
//!
//! Why: Candle's backward adds every gradient that reaches a node into a fresh zero-filled
//! tensor, so each edge of the graph costs a memset, an addition and a new allocation (whose
//! pages the kernel then zeroes again); on the 20M reference config that bookkeeping was
//! about a sixth of a CPU step. Here the residual stream's gradient is one buffer that the
//! norms' backward passes add into, the residual additions of the forward happen inside the
//! output projections' matmuls, rotary embeddings run in place, and activation buffers come
//! from a [`Workspace`] kept from step to step. The mathematics are those of
//! [`Llama::forward_loss`] (which the tests compare against, values and gradients); only the
//! order of some additions differs.
//!
//! Covers what full fine-tuning on the CPU uses: f32 weights on the CPU, tied or untied
//! embeddings, q/k/v/o biases, Qwen3's per-head query/key norms, grouped-query attention,
//! sliding windows. Anything else (LoRA adapters, other devices or types) goes through
//! [`super::direct_ops`] or Candle's autograd ([`supported`] says which).

use std::collections::HashMap;

use candle_core::{DType, Layout, StorageRef, Tensor, TensorId};
use rayon::prelude::*;

use super::kernels::{self, attention as attention_kernel};
use super::model::{Llama, Result};
use super::ops::storage_f32;

/// Buffers kept from one step to the next: the activations of a step are the same sizes every
/// time, and fresh multi-megabyte allocations cost a page fault per 4 KiB.
#[derive(Debug, Default)]
pub struct Workspace {
    free: Vec<Vec<f32>>,
}

impl Workspace {
    /// A buffer of `n` elements with unspecified contents: the smallest free one that is long
    /// enough, or a new one.
    fn take(&mut self, n: usize) -> Vec<f32> {
        let best = self
            .free
            .iter()
            .enumerate()
            .filter(|(_, v)| v.len() >= n)
            .min_by_key(|(_, v)| v.len())
            .map(|(i, _)| i);
        match best {
            Some(i) => {
                let mut v = self.free.swap_remove(i);
                v.truncate(n);
                v
            }
            None => vec![0f32; n],
        }
    }

    /// Returns a buffer for later steps, at its full capacity.
    fn give(&mut self, mut v: Vec<f32>) {
        let cap = v.capacity();
        v.resize(cap, 0.0);
        self.free.push(v);
    }

    /// Bytes held between steps.
    pub fn bytes(&self) -> usize {
        self.free.iter().map(|v| v.len() * 4).sum()
    }
}

/// The summed loss of a batch and every weight's gradient.
#[derive(Debug)]
pub struct StepGrads {
    /// `Σ mask · (logsumexp − logit of the label)` over the batch, as [`super::model::nll_sum`]
    /// gives it (not multiplied by the gradient scale).
    pub loss_sum: f32,
    grads: HashMap<TensorId, Tensor>,
}

impl StepGrads {
    /// The loss and gradients (by weight tensor id) of a step computed elsewhere.
    pub(crate) fn new(loss_sum: f32, grads: HashMap<TensorId, Tensor>) -> Self {
        StepGrads { loss_sum, grads }
    }

    /// The gradient of `weight` (one of the model's weight tensors), if it has one.
    pub fn get(&self, weight: &Tensor) -> Option<&Tensor> {
        self.grads.get(&weight.id())
    }
}

/// Whether [`loss_and_grads`] can train `model`: every weight an f32 tensor on the CPU and no
/// LoRA adapter.
pub fn supported(model: &Llama) -> bool {
    let f32_cpu = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32;
    let head_ok = model.lm_head.as_ref().is_none_or(f32_cpu);
    f32_cpu(&model.embed_tokens)
        && f32_cpu(&model.norm)
        && head_ok
        && model.layers.iter().all(|b| {
            f32_cpu(&b.input_layernorm)
                && f32_cpu(&b.post_attention_layernorm)
                && b.q_norm.as_ref().is_none_or(f32_cpu)
                && b.k_norm.as_ref().is_none_or(f32_cpu)
                && b.linears().iter().all(|(_, l)| {
                    l.lora.is_none() && f32_cpu(&l.weight) && l.bias.as_ref().is_none_or(f32_cpu)
                })
        })
}

/// A weight's storage held for reading during the step.
struct Held<'a> {
    guard: StorageRef<'a>,
    layout: &'a Layout,
}

impl<'a> Held<'a> {
    fn new(t: &'a Tensor) -> Self {
        let (guard, layout) = t.storage_and_layout();
        Held { guard, layout }
    }

    fn f32(&self) -> Result<&[f32]> {
        Ok(storage_f32(&self.guard, self.layout)?)
    }
}

/// One decoder layer's weights as slices.
struct LayerWeights<'a> {
    in_norm: &'a [f32],
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    o: &'a [f32],
    q_bias: Option<&'a [f32]>,
    k_bias: Option<&'a [f32]>,
    v_bias: Option<&'a [f32]>,
    o_bias: Option<&'a [f32]>,
    /// Qwen3's per-head query and key norms (`head_dim` weights each).
    q_norm: Option<&'a [f32]>,
    k_norm: Option<&'a [f32]>,
    post_norm: &'a [f32],
    gate: &'a [f32],
    up: &'a [f32],
    down: &'a [f32],
}

/// What one layer's forward keeps for its backward (`x`, its input, is the previous layer's
/// output and kept with the residual stream).
struct Saved {
    /// Input norm's output.
    h1: Vec<f32>,
    /// Queries and keys before Qwen3's per-head norms (`None` without them).
    q_raw: Option<Vec<f32>>,
    k_raw: Option<Vec<f32>>,
    /// Rotated queries and keys, values.
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    /// Attention output (before the output projection) and its row log-sum-exps.
    att: Vec<f32>,
    lse: Vec<f32>,
    /// Residual stream after attention.
    x1: Vec<f32>,
    /// Post-attention norm's output.
    h2: Vec<f32>,
    /// The gate and up weights stacked `(2·ff, hidden)`, and their projections of `h2` side
    /// by side `(n, 2·ff)`: one matmul each way instead of two.
    gate_up: Vec<f32>,
    gu: Vec<f32>,
    /// SwiGLU output.
    a: Vec<f32>,
}

impl Saved {
    /// Gives every buffer back to the workspace.
    fn release(self, ws: &mut Workspace) {
        let Saved {
            h1,
            q_raw,
            k_raw,
            q,
            k,
            v,
            att,
            lse,
            x1,
            h2,
            gate_up,
            gu,
            a,
        } = self;
        for buf in [h1, q, k, v, att, lse, x1, h2, gate_up, gu, a]
            .into_iter()
            .chain(q_raw)
            .chain(k_raw)
        {
            ws.give(buf);
        }
    }
}

/// Sizes of one step.
#[derive(Clone, Copy)]
struct Sizes {
    /// Rows: batch × positions.
    n: usize,
    hidden: usize,
    q_dim: usize,
    kv_dim: usize,
    ff: usize,
    eps: f32,
    attention: attention_kernel::Dims,
}

/// `dyᵀ · x`: the gradient of a weight `(out×inp)`, in a buffer of its own.
fn linear_dw(dy: &[f32], x: &[f32], dims: (usize, usize, usize)) -> Vec<f32> {
    let (_, inp, out) = dims;
    let mut dw = vec![0f32; out * inp];
    kernels::linear_dw_into(dy, x, &mut dw, dims);
    dw
}

/// Copies `src` into `dst`, in parallel.
fn copy(src: &[f32], dst: &mut [f32]) {
    dst.par_chunks_mut(16384)
        .zip(src.par_chunks(16384))
        .for_each(|(d, s)| d.copy_from_slice(s));
}

/// Every weight's storage, read-locked for one phase of the step.
struct Weights<'a> {
    held: Vec<(TensorId, Held<'a>)>,
}

/// The weights as slices, borrowed from a [`Weights`].
struct Slices<'a> {
    embed: &'a [f32],
    norm: &'a [f32],
    head: &'a [f32],
    cos: &'a [f32],
    sin: &'a [f32],
    layers: Vec<LayerWeights<'a>>,
}

impl<'a> Weights<'a> {
    fn hold(model: &'a Llama) -> Self {
        let head = model.lm_head.as_ref().unwrap_or(&model.embed_tokens);
        let (cos, sin) = model.rope_tables();
        let mut tensors: Vec<&Tensor> = vec![&model.embed_tokens, &model.norm, head, cos, sin];
        for blk in &model.layers {
            tensors.push(&blk.input_layernorm);
            tensors.push(&blk.post_attention_layernorm);
            tensors.extend(blk.q_norm.as_ref());
            tensors.extend(blk.k_norm.as_ref());
            for (_, l) in blk.linears() {
                tensors.push(&l.weight);
                tensors.extend(l.bias.as_ref());
            }
        }
        Weights {
            held: tensors
                .into_iter()
                .map(|t| (t.id(), Held::new(t)))
                .collect(),
        }
    }

    fn slices(&self, model: &Llama) -> Result<Slices<'_>> {
        let map: HashMap<TensorId, &[f32]> = self
            .held
            .iter()
            .map(|(id, h)| Ok((*id, h.f32()?)))
            .collect::<Result<_>>()?;
        let s = |t: &Tensor| map[&t.id()];
        let (cos, sin) = model.rope_tables();
        Ok(Slices {
            embed: s(&model.embed_tokens),
            norm: s(&model.norm),
            head: s(model.lm_head.as_ref().unwrap_or(&model.embed_tokens)),
            cos: s(cos),
            sin: s(sin),
            layers: model
                .layers
                .iter()
                .map(|blk| LayerWeights {
                    in_norm: s(&blk.input_layernorm),
                    q: s(&blk.q_proj.weight),
                    k: s(&blk.k_proj.weight),
                    v: s(&blk.v_proj.weight),
                    o: s(&blk.o_proj.weight),
                    q_bias: blk.q_proj.bias.as_ref().map(s),
                    k_bias: blk.k_proj.bias.as_ref().map(s),
                    v_bias: blk.v_proj.bias.as_ref().map(s),
                    o_bias: blk.o_proj.bias.as_ref().map(s),
                    q_norm: blk.q_norm.as_ref().map(s),
                    k_norm: blk.k_norm.as_ref().map(s),
                    post_norm: s(&blk.post_attention_layernorm),
                    gate: s(&blk.gate_proj.weight),
                    up: s(&blk.up_proj.weight),
                    down: s(&blk.down_proj.weight),
                })
                .collect(),
        })
    }
}

/// A finished forward: the loss, and what [`Forward::backward`] needs. Dropping it instead
/// (a step abandoned on a stop request) just frees the activations.
pub struct Forward {
    /// `Σ mask · (logsumexp − logit of the label)` over the batch, as
    /// [`super::model::nll_sum`] gives it (not multiplied by the gradient scale).
    pub loss_sum: f32,
    /// Seconds the forward took.
    pub secs: f64,
    ids: Vec<u32>,
    sz: Sizes,
    /// `stream[l]` is layer l's input; the last one is the final norm's input.
    stream: Vec<Vec<f32>>,
    /// Each layer's activations; `None` where they are recomputed in the backward.
    saved: Vec<Option<Saved>>,
    /// Gradients of the final norm's output and of the lm_head weight (computed with the loss).
    d_final: Vec<f32>,
    d_head: Vec<f32>,
}

/// The forward of a training step: the summed loss of a batch, with the loss's gradient (which
/// the lm_head pass computes at once) multiplied by `grad_scale` (the trainer's
/// `1 / labelled tokens`, times an f16 loss scale). `ids` and `labels` are `(B, T)` u32 from
/// position 0, `mask` `(B, T)`. The model must be [`supported`]; buffers come from `ws`.
/// With `checkpointing`, only each layer's input is kept and the backward runs the layer's
/// forward again (activation checkpointing: same gradients, less memory, one more forward).
#[allow(clippy::too_many_arguments)]
pub fn forward(
    model: &Llama,
    ids: &Tensor,
    labels: &Tensor,
    mask: &Tensor,
    grad_scale: f32,
    checkpointing: bool,
    ws: &mut Workspace,
) -> Result<Forward> {
    let bail = |m: String| -> Result<Forward> { Err(candle_core::Error::Msg(m).into()) };
    if !supported(model) {
        return bail("direct training step: needs f32 weights on the CPU and no LoRA".into());
    }
    let cfg = &model.cfg;
    let (b, t) = ids.dims2()?;
    if labels.dims() != [b, t] || mask.dims() != [b, t] {
        return bail(format!(
            "direct training step: ids {:?}, labels {:?}, mask {:?}",
            ids.dims(),
            labels.dims(),
            mask.dims()
        ));
    }
    if t > cfg.max_position_embeddings {
        return Err(super::TrainError::Context {
            tokens: t,
            max: cfg.max_position_embeddings,
        });
    }
    let ids = ids.flatten_all()?.to_dtype(DType::U32)?.to_vec1::<u32>()?;
    let labels = labels
        .flatten_all()?
        .to_dtype(DType::U32)?
        .to_vec1::<u32>()?;
    let mask = mask.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
    let vocab = cfg.vocab_size;
    if let Some(&bad) = ids.iter().chain(&labels).find(|&&i| i as usize >= vocab) {
        return bail(format!(
            "direct training step: token {bad} outside the vocabulary of {vocab}"
        ));
    }
    let (nh, nkv, hd) = (cfg.num_attention_heads, cfg.n_kv_heads(), cfg.head_dim());
    let sz = Sizes {
        n: b * t,
        hidden: cfg.hidden_size,
        q_dim: nh * hd,
        kv_dim: nkv * hd,
        ff: cfg.intermediate_size,
        eps: cfg.rms_norm_eps as f32,
        attention: attention_kernel::Dims {
            b,
            t,
            h: nh,
            s: t,
            kv: nkv,
            d: hd,
            start: 0,
            window: cfg.window(),
        },
    };
    sz.attention
        .check()
        .map_err(|m| super::TrainError::from(candle_core::Error::Msg(m)))?;

    let started = std::time::Instant::now();
    let held = Weights::hold(model);
    let w = held.slices(model)?;
    let rope = (&w.cos[..t * hd], &w.sin[..t * hd]);
    let (n, d) = (sz.n, sz.hidden);
    let mut x0 = ws.take(n * d);
    x0.par_chunks_mut(d)
        .zip(ids.par_iter())
        .with_min_len(kernels::rows_per_task(d))
        .for_each(|(row, &id)| {
            row.copy_from_slice(&w.embed[id as usize * d..(id as usize + 1) * d])
        });
    let mut stream = vec![x0];
    let mut saved = Vec::with_capacity(w.layers.len());
    for lw in &w.layers {
        let x = stream.last().expect("stream starts with the embeddings");
        let (sv, out) = layer_forward(x, lw, rope, sz, ws);
        if checkpointing {
            sv.release(ws);
            saved.push(None);
        } else {
            saved.push(Some(sv));
        }
        stream.push(out);
    }
    let mut xf = ws.take(n * d);
    kernels::rms_norm_fwd(stream.last().expect("stream"), w.norm, sz.eps, &mut xf);
    let mut d_final = ws.take(n * d);
    let mut d_head = vec![0f32; vocab * d];
    let loss_sum = kernels::linear_cross_entropy(
        &xf,
        w.head,
        &labels,
        &mask,
        (n, d, vocab),
        grad_scale,
        Some(&mut d_final),
        Some(&mut d_head),
    );
    ws.give(xf);
    Ok(Forward {
        loss_sum,
        secs: started.elapsed().as_secs_f64(),
        ids,
        sz,
        stream,
        saved,
        d_final,
        d_head,
    })
}

impl Forward {
    /// The backward: every weight's gradient. `model` must be the one (unchanged) that
    /// [`forward`] ran; buffers go back to `ws`.
    pub fn backward(self, model: &Llama, ws: &mut Workspace) -> Result<StepGrads> {
        let Forward {
            loss_sum,
            ids,
            sz,
            mut stream,
            saved,
            d_final,
            mut d_head,
            ..
        } = self;
        if saved.len() != model.layers.len() {
            return Err(candle_core::Error::Msg("direct backward: another model".into()).into());
        }
        let held = Weights::hold(model);
        let w = held.slices(model)?;
        let t = sz.attention.t;
        let hd = sz.attention.d;
        let rope = (&w.cos[..t * hd], &w.sin[..t * hd]);
        let (n, d, vocab) = (sz.n, sz.hidden, model.cfg.vocab_size);
        let mut grads = HashMap::new();
        let device = model.device().clone();
        let mut put = |t: &Tensor, g: Vec<f32>| -> Result<()> {
            grads.insert(t.id(), Tensor::from_vec(g, t.shape(), &device)?);
            Ok(())
        };
        // `dx` is the gradient of the residual stream, carried down the layers.
        let mut dx = ws.take(n * d);
        let x_last = stream.pop().expect("stream");
        let d_norm = kernels::rms_norm_bwd(&x_last, w.norm, &d_final, sz.eps, &mut dx, false);
        ws.give(x_last);
        ws.give(d_final);
        put(&model.norm, d_norm)?;
        for ((blk, lw), sv) in model.layers.iter().zip(&w.layers).zip(saved).rev() {
            let x = stream.pop().expect("one input per layer");
            let sv = match sv {
                Some(sv) => sv,
                None => {
                    let (sv, out) = layer_forward(&x, lw, rope, sz, ws);
                    ws.give(out);
                    sv
                }
            };
            let g = layer_backward(&x, lw, sv, &mut dx, rope, sz, ws);
            ws.give(x);
            put(&blk.input_layernorm, g.in_norm)?;
            put(&blk.post_attention_layernorm, g.post_norm)?;
            put(&blk.q_proj.weight, g.q)?;
            put(&blk.k_proj.weight, g.k)?;
            put(&blk.v_proj.weight, g.v)?;
            put(&blk.o_proj.weight, g.o)?;
            put(&blk.gate_proj.weight, g.gate)?;
            put(&blk.up_proj.weight, g.up)?;
            put(&blk.down_proj.weight, g.down)?;
            for (bias, gb) in [
                (&blk.q_proj.bias, g.q_bias),
                (&blk.k_proj.bias, g.k_bias),
                (&blk.v_proj.bias, g.v_bias),
                (&blk.o_proj.bias, g.o_bias),
                (&blk.q_norm, g.q_norm),
                (&blk.k_norm, g.k_norm),
            ] {
                if let (Some(bias), Some(gb)) = (bias, gb) {
                    put(bias, gb)?;
                }
            }
        }
        // The embedding's gradient: each row's gradient added to its token's row, in row
        // order (deterministic); tied weights start from the lm_head's gradient.
        let mut d_embed = match model.lm_head {
            Some(_) => vec![0f32; vocab * d],
            None => std::mem::take(&mut d_head),
        };
        for (r, &id) in ids.iter().enumerate() {
            let dst = &mut d_embed[id as usize * d..(id as usize + 1) * d];
            for (a, g) in dst.iter_mut().zip(&dx[r * d..(r + 1) * d]) {
                *a += g;
            }
        }
        ws.give(dx);
        if let Some(lm_head) = &model.lm_head {
            put(lm_head, d_head)?;
        }
        put(&model.embed_tokens, d_embed)?;
        Ok(StepGrads { loss_sum, grads })
    }
}

/// [`forward`] then [`Forward::backward`]: the loss of a batch and every weight's gradient.
pub fn loss_and_grads(
    model: &Llama,
    ids: &Tensor,
    labels: &Tensor,
    mask: &Tensor,
    grad_scale: f32,
    ws: &mut Workspace,
) -> Result<StepGrads> {
    forward(model, ids, labels, mask, grad_scale, false, ws)?.backward(model, ws)
}

/// One decoder layer forward from its input `x`: what the backward needs, and the output.
fn layer_forward(
    x: &[f32],
    w: &LayerWeights<'_>,
    (cos, sin): (&[f32], &[f32]),
    sz: Sizes,
    ws: &mut Workspace,
) -> (Saved, Vec<f32>) {
    let Sizes {
        n,
        hidden: d,
        q_dim,
        kv_dim,
        ff,
        eps,
        attention: dm,
        ..
    } = sz;
    let mut h1 = ws.take(n * d);
    kernels::rms_norm_fwd(x, w.in_norm, eps, &mut h1);
    let project = |ws: &mut Workspace, wt: &[f32], bias: Option<&[f32]>, out: usize| {
        let mut y = ws.take(n * out);
        match bias {
            Some(bias) => {
                y.par_chunks_mut(out).for_each(|r| r.copy_from_slice(bias));
                kernels::linear_into(&h1, wt, &mut y, (n, d, out), true);
            }
            None => kernels::linear_into(&h1, wt, &mut y, (n, d, out), false),
        }
        y
    };
    let q = project(ws, w.q, w.q_bias, q_dim);
    let k = project(ws, w.k, w.k_bias, kv_dim);
    let v = project(ws, w.v, w.v_bias, kv_dim);
    // Qwen3: each head's query and key normed on its own (rows of head_dim), before RoPE.
    let mut head_norm = |raw: Vec<f32>, norm: Option<&[f32]>| match norm {
        Some(nw) => {
            let mut y = ws.take(raw.len());
            kernels::rms_norm_fwd(&raw, nw, eps, &mut y);
            (y, Some(raw))
        }
        None => (raw, None),
    };
    let (mut q, q_raw) = head_norm(q, w.q_norm);
    let (mut k, k_raw) = head_norm(k, w.k_norm);
    kernels::rope_in_place(&mut q, cos, sin, (dm.t, dm.h, dm.d), false);
    kernels::rope_in_place(&mut k, cos, sin, (dm.t, dm.kv, dm.d), false);
    let mut att = ws.take(n * q_dim);
    let mut lse = ws.take(dm.b * dm.h * dm.t);
    attention_kernel::forward_into(&q, &k, &v, dm, &mut att, &mut lse);
    // x1 = x + att · Woᵀ (+ bias): the residual addition happens in the matmul.
    let mut x1 = ws.take(n * d);
    copy(x, &mut x1);
    if let Some(bias) = w.o_bias {
        x1.par_chunks_mut(d).for_each(|r| {
            for (a, b) in r.iter_mut().zip(bias) {
                *a += b;
            }
        });
    }
    kernels::linear_into(&att, w.o, &mut x1, (n, q_dim, d), true);
    let mut h2 = ws.take(n * d);
    kernels::rms_norm_fwd(&x1, w.post_norm, eps, &mut h2);
    let mut gate_up = ws.take(2 * ff * d);
    copy(w.gate, &mut gate_up[..ff * d]);
    copy(w.up, &mut gate_up[ff * d..]);
    let mut gu = ws.take(n * 2 * ff);
    kernels::linear_into(&h2, &gate_up, &mut gu, (n, d, 2 * ff), false);
    let mut a = ws.take(n * ff);
    kernels::swiglu_fwd_packed(&gu, ff, &mut a);
    let mut out = ws.take(n * d);
    copy(&x1, &mut out);
    kernels::linear_into(&a, w.down, &mut out, (n, ff, d), true);
    let saved = Saved {
        h1,
        q_raw,
        k_raw,
        q,
        k,
        v,
        att,
        lse,
        x1,
        h2,
        gate_up,
        gu,
        a,
    };
    (saved, out)
}

/// One layer's weight gradients.
struct LayerGrads {
    in_norm: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    o: Vec<f32>,
    q_bias: Option<Vec<f32>>,
    k_bias: Option<Vec<f32>>,
    v_bias: Option<Vec<f32>>,
    o_bias: Option<Vec<f32>>,
    q_norm: Option<Vec<f32>>,
    k_norm: Option<Vec<f32>>,
    post_norm: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    down: Vec<f32>,
}

/// One decoder layer backward: `dx` comes in as the gradient of the layer's output and leaves
/// as the gradient of its input `x`.
fn layer_backward(
    x: &[f32],
    w: &LayerWeights<'_>,
    sv: Saved,
    dx: &mut [f32],
    (cos, sin): (&[f32], &[f32]),
    sz: Sizes,
    ws: &mut Workspace,
) -> LayerGrads {
    let Sizes {
        n,
        hidden: d,
        q_dim,
        kv_dim,
        ff,
        eps,
        attention: dm,
        ..
    } = sz;
    // MLP: out = x1 + swiglu(h2·Wgᵀ, h2·Wuᵀ) · Wdᵀ.
    let down = linear_dw(dx, &sv.a, (n, ff, d));
    ws.give(sv.a);
    let mut da = ws.take(n * ff);
    kernels::linear_dx_into(dx, w.down, &mut da, (n, ff, d), false);
    let mut dgu = ws.take(n * 2 * ff);
    kernels::swiglu_bwd_packed(&sv.gu, &da, ff, &mut dgu);
    ws.give(da);
    ws.give(sv.gu);
    let mut gate = linear_dw(&dgu, &sv.h2, (n, d, 2 * ff));
    let up = gate.split_off(ff * d);
    gate.shrink_to_fit();
    ws.give(sv.h2);
    let mut dh = ws.take(n * d);
    kernels::linear_dx_into(&dgu, &sv.gate_up, &mut dh, (n, d, 2 * ff), false);
    ws.give(dgu);
    ws.give(sv.gate_up);
    let post_norm = kernels::rms_norm_bwd(&sv.x1, w.post_norm, &dh, eps, dx, true);
    ws.give(sv.x1);

    // Attention: x1 = x + attention(rope(h1·Wqᵀ), rope(h1·Wkᵀ), h1·Wvᵀ) · Woᵀ.
    let o = linear_dw(dx, &sv.att, (n, q_dim, d));
    let o_bias = w.o_bias.map(|_| kernels::column_sums(dx, d));
    let mut datt = ws.take(n * q_dim);
    kernels::linear_dx_into(dx, w.o, &mut datt, (n, q_dim, d), false);
    let mut dqkv = ws.take(n * q_dim + 2 * n * kv_dim);
    attention_kernel::backward_into(&sv.q, &sv.k, &sv.v, &sv.att, &datt, &sv.lse, dm, &mut dqkv);
    for buf in [sv.q, sv.k, sv.v, sv.att, sv.lse, datt] {
        ws.give(buf);
    }
    let (dq, dkv) = dqkv.split_at_mut(n * q_dim);
    let (dk, dv) = dkv.split_at_mut(n * kv_dim);
    kernels::rope_in_place(dq, cos, sin, (dm.t, dm.h, dm.d), true);
    kernels::rope_in_place(dk, cos, sin, (dm.t, dm.kv, dm.d), true);
    // Through Qwen3's per-head norms: the gradients of the projections' outputs replace
    // those of the norms' outputs.
    let mut head_norm_bwd = |raw: Option<Vec<f32>>, norm: Option<&[f32]>, dy: &mut [f32]| {
        let (raw, nw) = (raw?, norm?);
        let mut dx = ws.take(dy.len());
        let dw = kernels::rms_norm_bwd(&raw, nw, dy, eps, &mut dx, false);
        copy(&dx, dy);
        ws.give(dx);
        ws.give(raw);
        Some(dw)
    };
    let q_norm = head_norm_bwd(sv.q_raw, w.q_norm, dq);
    let k_norm = head_norm_bwd(sv.k_raw, w.k_norm, dk);
    let q = linear_dw(dq, &sv.h1, (n, d, q_dim));
    let k = linear_dw(dk, &sv.h1, (n, d, kv_dim));
    let v = linear_dw(dv, &sv.h1, (n, d, kv_dim));
    let q_bias = w.q_bias.map(|_| kernels::column_sums(dq, q_dim));
    let k_bias = w.k_bias.map(|_| kernels::column_sums(dk, kv_dim));
    let v_bias = w.v_bias.map(|_| kernels::column_sums(dv, kv_dim));
    ws.give(sv.h1);
    kernels::linear_dx_into(dq, w.q, &mut dh, (n, d, q_dim), false);
    kernels::linear_dx_into(dk, w.k, &mut dh, (n, d, kv_dim), true);
    kernels::linear_dx_into(dv, w.v, &mut dh, (n, d, kv_dim), true);
    ws.give(dqkv);
    let in_norm = kernels::rms_norm_bwd(x, w.in_norm, &dh, eps, dx, true);
    ws.give(dh);
    LayerGrads {
        in_norm,
        q,
        k,
        v,
        o,
        q_bias,
        k_bias,
        v_bias,
        o_bias,
        q_norm,
        k_norm,
        post_norm,
        gate,
        up,
        down,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::collections::BTreeMap;

    use candle_core::{Device, Var};

    use super::*;
    use crate::train::config::LlamaConfig;
    use crate::train::model::{Lora, Pass, random_vars};

    /// A two-layer model of `kind` (`"llama"`: 4 heads; `"qwen2"`: 4 query heads over 2
    /// key/value heads; `"qwen3"`: the same, 6 wide, with query/key norms) with random
    /// trainable weights, and its variables.
    pub(crate) fn model(
        kind: &str,
        tied: bool,
        bias: bool,
        window: Option<usize>,
    ) -> (Llama, Vec<Var>) {
        let dev = Device::Cpu;
        let mut c: LlamaConfig = serde_json::from_value(serde_json::json!({
            "model_type": kind, "vocab_size": 40, "hidden_size": 16,
            "intermediate_size": 24, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": if kind == "llama" { 4 } else { 2 },
            "max_position_embeddings": 16, "tie_word_embeddings": tied, "rms_norm_eps": 1e-5,
            "attention_bias": bias
        }))
        .unwrap();
        if kind == "qwen3" {
            // Heads wider than hidden_size / heads, as Qwen3-0.6B's (128 over 1024 / 16).
            c.head_dim = Some(6);
        }
        if let Some(w) = window {
            c.use_sliding_window = Some(true);
            c.sliding_window = Some(w);
            // On every layer (transformers' Qwen2 default starts at layer 28).
            c.extra.insert("max_window_layers".into(), 0.into());
        }
        assert_eq!(c.window(), window);
        let named = random_vars(&c, 11, &dev);
        let tensors: BTreeMap<String, Tensor> = named
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
            .collect();
        let vars = named.into_values().collect();
        (Llama::new(c, &tensors, &dev).unwrap(), vars)
    }

    /// Ids, labels and mask of a 2 × 6 batch for [`model`] (one masked position).
    pub(crate) fn batch() -> (Tensor, Tensor, Tensor) {
        let dev = Device::Cpu;
        let ids = Tensor::new(&[[1u32, 5, 7, 2, 39, 0], [3, 3, 8, 9, 10, 11]], &dev).unwrap();
        let labels = Tensor::new(&[[5u32, 7, 2, 39, 0, 0], [3, 8, 9, 10, 11, 0]], &dev).unwrap();
        let mask = Tensor::new(
            &[[1f32, 1., 1., 1., 1., 0.], [1., 1., 1., 1., 1., 1.]],
            &dev,
        )
        .unwrap();
        (ids, labels, mask)
    }

    /// A step's loss and the gradients of `vars` match autograd's (`want`): loss within 1e-5,
    /// each gradient within 2e-5 of its largest element.
    pub(crate) fn assert_matches(
        got: &StepGrads,
        want_loss: f32,
        want: &candle_core::backprop::GradStore,
        vars: &[Var],
        what: &str,
    ) {
        assert!(
            (got.loss_sum - want_loss).abs() <= 1e-5 * want_loss.abs(),
            "{what}: loss {} vs {want_loss}",
            got.loss_sum
        );
        for (i, v) in vars.iter().enumerate() {
            let w = want.get(v.as_tensor()).expect("autograd gradient");
            let g = got
                .get(v.as_tensor())
                .unwrap_or_else(|| panic!("{what}: no gradient for var {i}"));
            assert_eq!(g.dims(), v.dims());
            let err = max_rel(g, w);
            assert!(err < 2e-5, "{what}: var {i} {:?} off by {err}", v.dims());
        }
    }

    /// Largest element-wise difference relative to `b`'s largest magnitude.
    pub(crate) fn max_rel(a: &Tensor, b: &Tensor) -> f32 {
        let a = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let b = b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let scale = b.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-6);
        a.iter()
            .zip(&b)
            .fold(0f32, |m, (x, y)| m.max((x - y).abs() / scale))
    }

    /// The hand-written backward gives the loss and every weight's gradient that Candle's
    /// autograd over the plain ops gives: untied multi-head llama with o/q/k/v biases, tied
    /// grouped-query Qwen2 with biases and a sliding window, plain llama, untied and tied
    /// Qwen3 (per-head query/key norms, heads wider than hidden / heads).
    #[test]
    fn matches_autograd_over_plain_ops() {
        let (ids, labels, mask) = batch();
        for (kind, tied, bias, window) in [
            ("llama", false, true, None),
            ("qwen2", true, false, Some(3)),
            ("llama", true, false, None),
            ("qwen3", false, false, None),
            ("qwen3", true, false, None),
        ] {
            let (m, vars) = model(kind, tied, bias, window);
            assert!(supported(&m));
            let scale = 0.25f32;
            let mut pass = Pass::new(DType::F32, None);
            pass.fused = false;
            let loss = m
                .forward_loss(&ids, &labels, &mask, &mut pass, true)
                .unwrap();
            let expected_loss = loss.to_scalar::<f32>().unwrap();
            let expected = (loss * scale as f64).unwrap().backward().unwrap();
            let mut ws = Workspace::default();
            let got = loss_and_grads(&m, &ids, &labels, &mask, scale, &mut ws).unwrap();
            let what = format!("{kind} tied={tied}");
            assert_matches(&got, expected_loss, &expected, &vars, &what);
            // Buffers reused from the workspace change nothing, bit for bit.
            assert!(ws.bytes() > 0);
            let again = loss_and_grads(&m, &ids, &labels, &mask, scale, &mut ws).unwrap();
            assert_eq!(again.loss_sum.to_bits(), got.loss_sum.to_bits());
            for v in &vars {
                let (a, b) = (
                    got.get(v.as_tensor()).unwrap(),
                    again.get(v.as_tensor()).unwrap(),
                );
                let a = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                let b = b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()));
            }
        }
    }

    /// Activation checkpointing recomputes each layer in the backward: the same bits, with
    /// less memory held at the peak (the workspace ends a step holding its peak's buffers).
    #[test]
    fn checkpointing_gives_the_same_bits_with_less_memory() {
        for kind in ["qwen2", "qwen3"] {
            checkpointing_gives_the_same_bits_with_less_memory_for(kind);
        }
    }

    fn checkpointing_gives_the_same_bits_with_less_memory_for(kind: &str) {
        let (ids, labels, mask) = batch();
        let (m, vars) = model(kind, false, kind == "qwen2", None);
        let run = |checkpointing: bool| {
            let mut ws = Workspace::default();
            let f = forward(&m, &ids, &labels, &mask, 0.5, checkpointing, &mut ws).unwrap();
            let g = f.backward(&m, &mut ws).unwrap();
            let mut bits = vec![g.loss_sum.to_bits()];
            for v in &vars {
                let t = g.get(v.as_tensor()).unwrap().flatten_all().unwrap();
                bits.extend(t.to_vec1::<f32>().unwrap().iter().map(|x| x.to_bits()));
            }
            (bits, ws.bytes())
        };
        let (full, full_bytes) = run(false);
        let (ckpt, ckpt_bytes) = run(true);
        assert_eq!(full, ckpt);
        assert!(
            ckpt_bytes < full_bytes,
            "checkpointed peak {ckpt_bytes} B vs {full_bytes} B"
        );
    }

    /// The thread count does not change a bit of the result (exact resume on another machine).
    #[test]
    fn same_bits_on_any_thread_count() {
        let (ids, labels, mask) = batch();
        let (m, vars) = model("qwen2", false, false, None);
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| {
                let g = loss_and_grads(&m, &ids, &labels, &mask, 1.0, &mut Workspace::default())
                    .unwrap();
                let mut bits = vec![g.loss_sum.to_bits()];
                for v in &vars {
                    let t = g.get(v.as_tensor()).unwrap().flatten_all().unwrap();
                    bits.extend(t.to_vec1::<f32>().unwrap().iter().map(|x| x.to_bits()));
                }
                bits
            })
        };
        assert_eq!(run(1), run(3));
    }

    #[test]
    fn refuses_what_it_does_not_cover() {
        let (ids, labels, mask) = batch();
        let (mut m, _) = model("llama", false, false, None);
        let mut ws = Workspace::default();
        let bad = Tensor::new(
            &[[1u32, 5, 7, 2, 40, 0], [3, 3, 8, 9, 10, 11]],
            &Device::Cpu,
        )
        .unwrap();
        let err = loss_and_grads(&m, &bad, &labels, &mask, 1.0, &mut ws).unwrap_err();
        assert!(
            err.to_string()
                .contains("token 40 outside the vocabulary of 40"),
            "{err}"
        );
        let short = Tensor::new(&[[1f32, 1.]], &Device::Cpu).unwrap();
        assert!(loss_and_grads(&m, &ids, &labels, &short, 1.0, &mut ws).is_err());
        let q = &mut m.layers[0].q_proj;
        q.lora = Some(Lora {
            a: Tensor::zeros((2, 16), DType::F32, &Device::Cpu).unwrap(),
            b: Tensor::zeros((16, 2), DType::F32, &Device::Cpu).unwrap(),
            scale: 1.0,
            dropout: 0.0,
        });
        assert!(!supported(&m));
        assert!(loss_and_grads(&m, &ids, &labels, &mask, 1.0, &mut ws).is_err());
    }
}
