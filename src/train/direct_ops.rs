//! The direct step of [`super::direct`] — a forward that keeps what the backward reads and a
//! hand-written backward for the whole model, no autograd graph — written over the fused ops of
//! [`super::ops`] at the tensor level, so it runs wherever they do: on CUDA in f32, bf16 and
//! f16 (f32 master weights), and on the CPU in f32; full fine-tuning and LoRA (adapters with
//! dropout, frozen base weights possibly in the compute type). The trainer takes it on CUDA
//! and for LoRA on the CPU; full fine-tuning on the CPU takes [`super::direct`], whose reused
//! buffers and fused residual additions are faster there. The tests check this step against
//! autograd on the CPU (the CUDA kernels under the ops are checked against the plain ops by
//! `train_throughput --check`). Only trainable tensors (those that track gradients) get
//! gradients; frozen ones cost no weight-gradient product.
//!
//! Why: Candle's backward adds every gradient that reaches a tensor into a fresh zero-filled
//! one. On the 100m reference config in f32 that is a memset and an addition over about twenty
//! activation-sized tensors per layer and over every weight — ~37 GB of memory traffic in a
//! step the H200 does in 181 ms, about 9 ms of it — and the graph keeps every op's inputs
//! alive until the backward reaches them (the un-rotated queries and keys, the projections'
//! outputs). Here each op's backward is called by hand: a gradient with one consumer is used as
//! it is, only fan-outs (the residual stream, the normed input of q/k/v and of gate/up) are
//! added, the forward keeps only what the backward reads, and a layer's activations are freed
//! as soon as its backward is done. The mathematics and the ops are those of
//! [`Llama::forward_loss`]; only the order of some additions differs.

use std::collections::HashMap;

use candle_core::{CustomOp2, CustomOp3, DType, Tensor, TensorId};

use super::direct::StepGrads;
use super::model::{Block, Linear as Projection, Llama, Result, dropout_mask};
use super::op_times::timed;
use super::ops::{
    self, Attention, CrossEntropy, Linear, LinearCrossEntropy, RmsNorm, Rope, SwiGlu,
};
use super::rng::Rng;

/// Whether [`forward`] can train `model` with activations in `dtype`: fused ops for that
/// device and type (the CPU, and CUDA when built with the `cuda` feature, in f32, bf16 or f16;
/// the CPU's ops compute 16-bit types in f32 as CUDA's kernels do), every tensor on the
/// model's device, trainable weights (and LoRA adapters) as f32 masters, frozen ones in f32 or
/// in `dtype`, norm weights in f32.
pub fn supported(model: &Llama, dtype: DType) -> bool {
    let dev = model.device();
    let fused = matches!(dtype, DType::F32 | DType::BF16 | DType::F16)
        && (dev.is_cpu() || (cfg!(feature = "cuda") && dev.is_cuda()));
    let here = |t: &Tensor| t.device().same_device(dev);
    let f32 = |t: &Tensor| here(t) && t.dtype() == DType::F32;
    let weight =
        |t: &Tensor| here(t) && (t.dtype() == DType::F32 || (t.dtype() == dtype && !t.track_op()));
    fused
        && weight(&model.embed_tokens)
        && f32(&model.norm)
        && model.lm_head.as_ref().is_none_or(weight)
        && model.layers.iter().all(|b| {
            f32(&b.input_layernorm)
                && f32(&b.post_attention_layernorm)
                && b.q_norm.as_ref().is_none_or(f32)
                && b.k_norm.as_ref().is_none_or(f32)
                && b.linears().iter().all(|(_, l)| {
                    weight(&l.weight)
                        && l.bias.as_ref().is_none_or(weight)
                        && l.lora.as_ref().is_none_or(|a| f32(&a.a) && f32(&a.b))
                })
        })
}

/// The model-wide constants of a step.
#[derive(Clone)]
struct Setup {
    dtype: DType,
    eps: f32,
    heads: (usize, usize),
    window: Option<usize>,
    /// Rotary tables for positions `0..T`, f32.
    cos: Tensor,
    sin: Tensor,
}

/// What one layer's forward keeps for its backward (its input stays in the residual stream).
struct Saved {
    /// Input norm's output.
    h1: Tensor,
    /// Queries and keys before Qwen3's per-head norms (`None` without them).
    q_raw: Option<Tensor>,
    k_raw: Option<Tensor>,
    /// Rotated queries and keys, values.
    q: Tensor,
    k: Tensor,
    v: Tensor,
    /// Attention's output and its op (which holds the rows' log-sum-exps).
    att: Tensor,
    attention: Attention,
    /// Residual stream after attention.
    x1: Tensor,
    /// Post-attention norm's output.
    h2: Tensor,
    /// Gate and up projections, and SwiGLU's output.
    g: Tensor,
    u: Tensor,
    a: Tensor,
    /// Each projection's adapter activations (q, k, v, o, gate, up, down), where it has one.
    adapters: [Option<Adapted>; 7],
}

/// What a LoRA adapter's backward needs beyond its projection's input.
struct Adapted {
    /// `dropout(x) · Aᵀ`, the rank-r activation.
    low: Tensor,
    /// The dropout mask (`None`: no dropout in this pass).
    mask: Option<Tensor>,
}

/// A finished forward: the loss, and what [`Forward::backward`] needs. Dropping it instead (a
/// step abandoned on a stop request) just frees the activations.
pub struct Forward {
    /// `Σ mask · (logsumexp − logit of the label)` as a scalar f32 tensor on the model's
    /// device, not read back (reading it waits for the device).
    pub loss_sum: Tensor,
    grad_scale: f32,
    setup: Setup,
    /// Flattened ids on the device and on the host.
    ids: Tensor,
    host_ids: Vec<u32>,
    /// `stream[l]` is layer l's input; the last one is the final norm's input.
    stream: Vec<Tensor>,
    /// Each layer's activations; `None` where they are recomputed in the backward.
    saved: Vec<Option<Saved>>,
    /// The dropout generator as each recomputed layer found it (so the recomputation draws
    /// the same masks); `None` without dropout or without recomputation.
    layer_rngs: Vec<Option<Rng>>,
    /// The final norm's output, and how the lm_head and the loss were computed.
    normed: Tensor,
    loss: Loss,
}

#[cfg(test)]
thread_local! {
    /// Tests set this to run the CPU through the split lm_head + loss that CUDA takes.
    static SPLIT_HEAD: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether to compute the logits and the loss separately even where one fused op could.
fn split_head() -> bool {
    #[cfg(test)]
    return SPLIT_HEAD.with(|s| s.get());
    #[cfg(not(test))]
    false
}

/// The lm_head and the loss, as the forward computed them.
enum Loss {
    /// One op (CPU, f32) holding the gradients it computed.
    Fused(LinearCrossEntropy),
    /// The logits in f32, then the loss op with its per-row output.
    Split {
        logits: Tensor,
        labels: Tensor,
        mask: Tensor,
        op: CrossEntropy,
        per_row: Tensor,
    },
}

/// A projection `x Wᵀ (+ b)`, plus `scale · dropout(x) Aᵀ Bᵀ` with a LoRA adapter (the mask
/// drawn from `rng` as the model's forward draws it), recorded in no graph.
fn project(
    x: &Tensor,
    p: &Projection,
    dtype: DType,
    rng: &mut Option<&mut Rng>,
) -> Result<(Tensor, Option<Adapted>)> {
    let y = timed("linear", || x.apply_op2_no_bwd(&p.weight, &Linear))?;
    let y = match &p.bias {
        Some(b) => timed("bias", || y.broadcast_add(&b.detach().to_dtype(dtype)?))?,
        None => y,
    };
    let Some(lora) = &p.lora else {
        return Ok((y, None));
    };
    timed("lora", || {
        let mask = match rng.as_deref_mut() {
            Some(r) if lora.dropout > 0.0 => Some(dropout_mask(x, lora.dropout, r)?),
            _ => None,
        };
        let low = match &mask {
            Some(m) => (x * m)?,
            None => x.clone(),
        }
        .apply_op2_no_bwd(&lora.a, &Linear)?;
        let delta = low.apply_op2_no_bwd(&lora.b, &Linear)?;
        Ok((
            (y + delta.affine(lora.scale, 0.0)?)?,
            Some(Adapted { low, mask }),
        ))
    })
}

/// Stores `g` as `w`'s gradient when `w` is trainable.
fn keep(grads: &mut HashMap<TensorId, Tensor>, w: &Tensor, g: Option<Tensor>) {
    if let Some(g) = g.filter(|_| w.track_op()) {
        grads.insert(w.id(), g);
    }
}

/// The backward of [`project`]: stores the trainable weights' gradients (weight, bias,
/// adapter), returns `x`'s.
fn project_bwd(
    x: &Tensor,
    p: &Projection,
    adapted: Option<Adapted>,
    dy: &Tensor,
    grads: &mut HashMap<TensorId, Tensor>,
) -> Result<Tensor> {
    // The op's backward does not read its output; `dy` stands in for it. It computes the
    // weight's gradient only for a weight that tracks gradients.
    let (dx, dw) = timed("linear bwd", || Linear.bwd(x, &p.weight, dy, dy))?;
    keep(grads, &p.weight, dw);
    if let Some(b) = p.bias.as_ref().filter(|b| b.track_op()) {
        let rows = dy.elem_count() / b.elem_count().max(1);
        let db = timed("bias bwd", || dy.reshape((rows, b.elem_count()))?.sum(0))?;
        grads.insert(b.id(), db.to_dtype(DType::F32)?);
    }
    let dx = need(dx, "projection input")?;
    let (Some(lora), Some(Adapted { low, mask })) = (&p.lora, adapted) else {
        return Ok(dx);
    };
    timed("lora bwd", || lora_bwd(x, lora, low, mask, dx, dy, grads))
}

/// The adapter's share of a projection's backward: its gradients, and `dx` plus the
/// gradient through the adapter.
fn lora_bwd(
    x: &Tensor,
    lora: &super::model::Lora,
    low: Tensor,
    mask: Option<Tensor>,
    dx: Tensor,
    dy: &Tensor,
    grads: &mut HashMap<TensorId, Tensor>,
) -> Result<Tensor> {
    let d_delta = dy.affine(lora.scale, 0.0)?;
    let (d_low, db) = Linear.bwd(&low, &lora.b, &d_delta, &d_delta)?;
    keep(grads, &lora.b, db);
    drop((low, d_delta));
    let x_in = match &mask {
        Some(m) => (x * m)?,
        None => x.clone(),
    };
    let d_low = need(d_low, "adapter activation")?;
    let (d_in, da) = Linear.bwd(&x_in, &lora.a, &d_low, &d_low)?;
    keep(grads, &lora.a, da);
    let d_in = need(d_in, "adapter input")?;
    Ok(match &mask {
        Some(m) => (dx + (d_in * m)?)?,
        None => (dx + d_in)?,
    })
}

fn need(t: Option<Tensor>, what: &str) -> Result<Tensor> {
    t.ok_or_else(|| {
        candle_core::Error::Msg(format!("direct step: no gradient for the {what}")).into()
    })
}

/// RMSNorm of `x` with the f32 weight `w`, recorded in no graph.
fn norm(x: &Tensor, w: &Tensor, eps: f32) -> Result<Tensor> {
    Ok(timed("rms_norm", || {
        x.apply_op2_no_bwd(w, &RmsNorm { eps })
    })?)
}

/// `a + b`, timed as a residual or fan-out addition.
fn add(a: Tensor, b: Tensor) -> Result<Tensor> {
    Ok(timed("add", || a + b)?)
}

/// The backward of [`norm`]: stores the weight's gradient (when trainable), returns `x`'s.
fn norm_bwd(
    x: &Tensor,
    w: &Tensor,
    dy: &Tensor,
    eps: f32,
    grads: &mut HashMap<TensorId, Tensor>,
) -> Result<Tensor> {
    let (dx, dw) = timed("rms_norm bwd", || RmsNorm { eps }.bwd(x, w, dy, dy))?;
    keep(grads, w, dw);
    need(dx, "norm input")
}

/// Qwen3's per-head norm of `x` `(B, T, heads · head_dim)` with the f32 weight `w`
/// `(head_dim)`: the normed tensor, and `x` as the backward needs it (`x` itself and `None`
/// without a weight).
fn head_norm(
    x: Tensor,
    w: Option<&Tensor>,
    heads: usize,
    eps: f32,
) -> Result<(Tensor, Option<Tensor>)> {
    let Some(w) = w else {
        return Ok((x, None));
    };
    let (b, t, row) = x.dims3()?;
    let x = x.reshape((b, t, heads, row / heads.max(1)))?.contiguous()?;
    let y = norm(&x, w, eps)?.reshape((b, t, row))?;
    Ok((y, Some(x)))
}

/// The backward of [`head_norm`]: stores the weight's gradient (when trainable), returns the
/// gradient of the norm's input given `dy`, that of its output (`dy` itself without a norm).
fn head_norm_bwd(
    x: Option<Tensor>,
    w: Option<&Tensor>,
    dy: Tensor,
    eps: f32,
    grads: &mut HashMap<TensorId, Tensor>,
) -> Result<Tensor> {
    let (Some(x), Some(w)) = (x, w) else {
        return Ok(dy);
    };
    let (b, t, h, d) = x.dims4()?;
    let dx = norm_bwd(&x, w, &dy.reshape((b, t, h, d))?, eps, grads)?;
    Ok(dx.reshape((b, t, h * d))?)
}

/// Rotary embedding (or, with `transpose`, its inverse: the backward).
fn rotate(x: &Tensor, s: &Setup, transpose: bool) -> Result<Tensor> {
    let label = if transpose { "rope bwd" } else { "rope" };
    Ok(timed(label, || {
        x.contiguous()?
            .apply_op3_no_bwd(&s.cos, &s.sin, &Rope { transpose })
    })?)
}

/// One decoder layer's forward from its input `x`: what the backward needs, and the output.
/// LoRA dropout masks come from `rng` in the model's order (q, k, v, o, gate, up, down).
fn layer_forward(
    blk: &Block,
    x: &Tensor,
    s: &Setup,
    mut rng: Option<&mut Rng>,
) -> Result<(Saved, Tensor)> {
    let dt = s.dtype;
    let h1 = norm(x, &blk.input_layernorm, s.eps)?;
    let (q, aq) = project(&h1, &blk.q_proj, dt, &mut rng)?;
    let (k, ak) = project(&h1, &blk.k_proj, dt, &mut rng)?;
    let (v, av) = project(&h1, &blk.v_proj, dt, &mut rng)?;
    let (q, q_raw) = head_norm(q, blk.q_norm.as_ref(), s.heads.0, s.eps)?;
    let (k, k_raw) = head_norm(k, blk.k_norm.as_ref(), s.heads.1, s.eps)?;
    let q = rotate(&q, s, false)?;
    let k = rotate(&k, s, false)?;
    let v = v.contiguous()?;
    let attention = Attention::new(s.heads, 0, s.window);
    let att = timed("attention", || q.apply_op3_no_bwd(&k, &v, &attention))?;
    let (o, ao) = project(&att, &blk.o_proj, dt, &mut rng)?;
    let x1 = add(x.clone(), o)?;
    let h2 = norm(&x1, &blk.post_attention_layernorm, s.eps)?;
    let (g, ag) = project(&h2, &blk.gate_proj, dt, &mut rng)?;
    let (u, au) = project(&h2, &blk.up_proj, dt, &mut rng)?;
    let a = timed("swiglu", || g.apply_op2_no_bwd(&u, &SwiGlu))?;
    let (down, ad) = project(&a, &blk.down_proj, dt, &mut rng)?;
    let out = add(x1.clone(), down)?;
    let saved = Saved {
        h1,
        q_raw,
        k_raw,
        q,
        k,
        v,
        att,
        attention,
        x1,
        h2,
        g,
        u,
        a,
        adapters: [aq, ak, av, ao, ag, au, ad],
    };
    Ok((saved, out))
}

/// One decoder layer's backward: stores its trainable weights' gradients and returns the
/// gradient of its input, given `dx`, that of its output.
fn layer_backward(
    blk: &Block,
    x: &Tensor,
    sv: Saved,
    dx: Tensor,
    s: &Setup,
    grads: &mut HashMap<TensorId, Tensor>,
) -> Result<Tensor> {
    let Saved {
        h1,
        q_raw,
        k_raw,
        q,
        k,
        v,
        att,
        attention,
        x1,
        h2,
        g,
        u,
        a,
        adapters,
    } = sv;
    let [aq, ak, av, ao, ag, au, ad] = adapters;
    // out = x1 + down(swiglu(gate(h2), up(h2))), h2 = norm(x1)
    let da = project_bwd(&a, &blk.down_proj, ad, &dx, grads)?;
    drop(a);
    let (dg, du) = timed("swiglu bwd", || SwiGlu.bwd(&g, &u, &da, &da))?;
    drop((g, u, da));
    let dh2 = add(
        project_bwd(&h2, &blk.gate_proj, ag, &need(dg, "gate")?, grads)?,
        project_bwd(&h2, &blk.up_proj, au, &need(du, "up")?, grads)?,
    )?;
    drop(h2);
    let dx1 = add(
        dx,
        norm_bwd(&x1, &blk.post_attention_layernorm, &dh2, s.eps, grads)?,
    )?;
    drop((x1, dh2));
    // x1 = x + o(attention(rope(q(h1)), rope(k(h1)), v(h1))), h1 = norm(x)
    let datt = project_bwd(&att, &blk.o_proj, ao, &dx1, grads)?;
    let (dq, dk, dv) = timed("attention bwd", || attention.bwd(&q, &k, &v, &att, &datt))?;
    drop((q, k, v, att, datt));
    let dq = rotate(&need(dq, "queries")?, s, true)?;
    let dk = rotate(&need(dk, "keys")?, s, true)?;
    let dq = head_norm_bwd(q_raw, blk.q_norm.as_ref(), dq, s.eps, grads)?;
    let dk = head_norm_bwd(k_raw, blk.k_norm.as_ref(), dk, s.eps, grads)?;
    let dh1 = add(
        add(
            project_bwd(&h1, &blk.q_proj, aq, &dq, grads)?,
            project_bwd(&h1, &blk.k_proj, ak, &dk, grads)?,
        )?,
        project_bwd(&h1, &blk.v_proj, av, &need(dv, "values")?, grads)?,
    )?;
    drop(h1);
    add(dx1, norm_bwd(x, &blk.input_layernorm, &dh1, s.eps, grads)?)
}

/// The forward of a training step with activations in `dtype`: the summed loss of a batch,
/// kept on the device; the backward will scale the loss's gradient by `grad_scale` (the
/// trainer's `1 / labelled tokens`, times an f16 loss scale). `ids` and `labels` are `(B, T)`
/// u32 from position 0, `mask` `(B, T)`. The model must be [`supported`] for `dtype`. With
/// `checkpointing`, only each layer's input is kept and the backward runs the layer's forward
/// again (activation checkpointing: same gradients, less memory, one more forward). LoRA
/// dropout draws its masks from `rng` as the model's forward does (`None`: no dropout).
#[allow(clippy::too_many_arguments)]
pub fn forward(
    model: &Llama,
    ids: &Tensor,
    labels: &Tensor,
    mask: &Tensor,
    dtype: DType,
    grad_scale: f32,
    checkpointing: bool,
    mut rng: Option<&mut Rng>,
) -> Result<Forward> {
    if !supported(model, dtype) {
        return Err(candle_core::Error::Msg(format!(
            "direct step: not for this model in {dtype:?} on {:?}",
            model.device()
        ))
        .into());
    }
    let cfg = &model.cfg;
    let (b, t) = ids.dims2()?;
    if t > cfg.max_position_embeddings {
        return Err(super::TrainError::Context {
            tokens: t,
            max: cfg.max_position_embeddings,
        });
    }
    let (cos, sin) = model.rope_tables();
    let setup = Setup {
        dtype,
        eps: cfg.rms_norm_eps as f32,
        heads: (cfg.num_attention_heads, cfg.n_kv_heads()),
        window: cfg.window(),
        cos: cos.narrow(0, 0, t)?.contiguous()?,
        sin: sin.narrow(0, 0, t)?.contiguous()?,
    };
    let ids = ids.flatten_all()?.contiguous()?;
    let host_ids = ids.to_vec1::<u32>()?;
    let rows = timed("embedding", || {
        ops::embedding_no_graph(&model.embed_tokens, &ids, &host_ids)
    })?;
    let mut x = timed("cast", || {
        rows.reshape((b, t, cfg.hidden_size))?.to_dtype(dtype)
    })?;
    let mut stream = Vec::with_capacity(model.layers.len() + 1);
    let mut saved = Vec::with_capacity(model.layers.len());
    let mut layer_rngs = Vec::with_capacity(model.layers.len());
    for blk in &model.layers {
        layer_rngs.push(rng.as_deref().copied().filter(|_| checkpointing));
        let (sv, out) = layer_forward(blk, &x, &setup, rng.as_deref_mut())?;
        saved.push((!checkpointing).then_some(sv));
        stream.push(std::mem::replace(&mut x, out));
    }
    let normed = norm(&x, &model.norm, setup.eps)?;
    stream.push(x);
    let head = model.lm_head.as_ref().unwrap_or(&model.embed_tokens);
    let (loss_sum, loss) = if ops::fusable(&normed) && ops::fusable(head) && !split_head() {
        // On the CPU the lm_head and the loss are one op that never holds the logits and
        // computes both gradients in its forward.
        let op = LinearCrossEntropy::new(labels, mask, true, head.track_op())?;
        let loss_sum = timed("lm_head + cross_entropy", || {
            normed.apply_op2_no_bwd(head, &op)
        })?;
        (loss_sum, Loss::Fused(op))
    } else {
        let logits = timed("lm_head", || normed.apply_op2_no_bwd(head, &Linear))?;
        let logits = timed("cast", || logits.to_dtype(DType::F32))?;
        let labels = labels.contiguous()?;
        let mask = mask.to_dtype(DType::F32)?.contiguous()?;
        let op = CrossEntropy::new();
        let per_row = timed("cross_entropy", || {
            logits.apply_op3_no_bwd(&labels, &mask, &op)
        })?;
        let loss_sum = per_row.sum_all()?;
        (
            loss_sum,
            Loss::Split {
                logits,
                labels,
                mask,
                op,
                per_row,
            },
        )
    };
    Ok(Forward {
        loss_sum,
        grad_scale,
        setup,
        ids,
        host_ids,
        stream,
        saved,
        layer_rngs,
        normed,
        loss,
    })
}

impl Forward {
    /// The backward: every weight's gradient. `model` must be the one (unchanged) that
    /// [`forward`] ran. The returned loss is read back from the device once the backward's
    /// work is queued.
    pub fn backward(self, model: &Llama) -> Result<StepGrads> {
        let Forward {
            loss_sum,
            grad_scale,
            setup,
            ids,
            host_ids,
            mut stream,
            saved,
            layer_rngs,
            normed,
            loss,
        } = self;
        if saved.len() != model.layers.len() || stream.len() != saved.len() + 1 {
            return Err(candle_core::Error::Msg("direct step: another model".into()).into());
        }
        let mut grads = HashMap::new();
        let head = model.lm_head.as_ref().unwrap_or(&model.embed_tokens);
        let (dnormed, mut dhead) = match loss {
            Loss::Fused(op) => {
                let scale = Tensor::new(grad_scale, normed.device())?;
                timed("lm_head + cross_entropy bwd", || {
                    op.bwd(&normed, head, &loss_sum, &scale)
                })?
            }
            Loss::Split {
                logits,
                labels,
                mask,
                op,
                per_row,
            } => {
                // d(loss_sum)/d(per_row) is 1 everywhere; the step's scale folds in here.
                let scale = Tensor::full(grad_scale, per_row.shape(), per_row.device())?;
                let (dlogits, _, _) = timed("cross_entropy bwd", || {
                    op.bwd(&logits, &labels, &mask, &per_row, &scale)
                })?;
                drop((logits, per_row, scale));
                let dlogits = need(dlogits, "logits")?;
                let dlogits = timed("cast", || dlogits.to_dtype(setup.dtype))?;
                timed("lm_head bwd", || {
                    Linear.bwd(&normed, head, &dlogits, &dlogits)
                })?
            }
        };
        drop(normed);
        let x_last = stream.pop().expect("stream checked");
        let mut dx = norm_bwd(
            &x_last,
            &model.norm,
            &need(dnormed, "final norm")?,
            setup.eps,
            &mut grads,
        )?;
        drop(x_last);
        for ((blk, sv), mut layer_rng) in model.layers.iter().zip(saved).zip(layer_rngs).rev() {
            let x = stream.pop().expect("stream checked");
            let sv = match sv {
                Some(sv) => sv,
                None => layer_forward(blk, &x, &setup, layer_rng.as_mut())?.0,
            };
            dx = layer_backward(blk, &x, sv, dx, &setup, &mut grads)?;
        }
        let table = &model.embed_tokens;
        if table.track_op() {
            let d_rows = timed("cast", || dx.to_dtype(DType::F32))?
                .reshape((host_ids.len(), model.cfg.hidden_size))?;
            drop(dx);
            let mut d_embed = timed("embedding bwd", || {
                ops::embedding_bwd(table, &ids, &host_ids, &d_rows)
            })?;
            if model.lm_head.is_none() {
                // Tied: the table also served as the lm_head.
                d_embed = (d_embed + need(dhead.take(), "lm_head")?)?;
            }
            grads.insert(table.id(), d_embed);
        }
        if let Some(h) = &model.lm_head {
            keep(&mut grads, h, dhead);
        }
        let loss_sum = loss_sum.to_scalar::<f32>()?;
        Ok(StepGrads::new(loss_sum, grads))
    }
}

/// [`forward`] then [`Forward::backward`]: the loss of a batch and every weight's gradient.
pub fn loss_and_grads(
    model: &Llama,
    ids: &Tensor,
    labels: &Tensor,
    mask: &Tensor,
    dtype: DType,
    grad_scale: f32,
) -> Result<StepGrads> {
    forward(model, ids, labels, mask, dtype, grad_scale, false, None)?.backward(model)
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Var};

    use super::*;
    use crate::train::direct::tests::{assert_matches, batch, max_rel, model};
    use crate::train::model::Pass;
    use crate::train::rng::Rng;

    /// The step gives the loss and every weight's gradient that Candle's autograd over the same
    /// fused ops gives, with and without recomputing layers in the backward: untied multi-head
    /// llama with q/k/v/o biases, tied grouped-query Qwen2 with biases and a sliding window,
    /// untied grouped-query Qwen3 (query/key norms, heads wider than hidden / heads).
    /// The fused CPU lm_head + loss, and the split one CUDA takes, in turn.
    fn both_heads(test: impl Fn(&str)) {
        for split in [false, true] {
            SPLIT_HEAD.with(|s| s.set(split));
            test(if split { "split head" } else { "fused head" });
        }
        SPLIT_HEAD.with(|s| s.set(false));
    }

    #[test]
    fn matches_autograd_over_the_same_ops() {
        both_heads(matches_autograd_over_the_same_ops_with);
    }

    fn matches_autograd_over_the_same_ops_with(head: &str) {
        let (ids, labels, mask) = batch();
        for (kind, tied, bias, window) in [
            ("llama", false, true, None),
            ("qwen2", true, false, Some(3)),
            ("qwen3", false, false, None),
        ] {
            let (m, vars) = model(kind, tied, bias, window);
            assert!(supported(&m, DType::F32));
            let scale = 0.25f32;
            let mut pass = Pass::new(DType::F32, None);
            let loss = m
                .forward_loss(&ids, &labels, &mask, &mut pass, true)
                .unwrap();
            let expected_loss = loss.to_scalar::<f32>().unwrap();
            let expected = (loss * scale as f64).unwrap().backward().unwrap();
            for checkpointing in [false, true] {
                let got = forward(
                    &m,
                    &ids,
                    &labels,
                    &mask,
                    DType::F32,
                    scale,
                    checkpointing,
                    None,
                )
                .unwrap()
                .backward(&m)
                .unwrap();
                let what = format!("{kind} {head} checkpointing={checkpointing}");
                assert_matches(&got, expected_loss, &expected, &vars, &what);
            }
        }
    }

    /// LoRA on a frozen base (plain tensors) with dropout: the adapters' gradients match
    /// autograd's over the same ops with the same generator (so the same masks), with and
    /// without recomputing layers; the generator ends where the model's forward leaves it;
    /// frozen weights get no gradient.
    #[test]
    fn lora_with_dropout_matches_autograd() {
        both_heads(lora_with_dropout_matches_autograd_with);
    }

    fn lora_with_dropout_matches_autograd_with(head: &str) {
        use crate::train::model::Lora;
        let (ids, labels, mask) = batch();
        for (kind, tied, bias) in [
            ("llama", false, true),
            ("qwen2", true, false),
            ("qwen3", true, false),
        ] {
            let (frozen, _) = model(kind, tied, bias, None);
            // The base as the trainer holds it under LoRA: plain tensors, no gradients.
            let mut m = frozen.clone();
            let detach = |t: &mut Tensor| *t = t.detach();
            detach(&mut m.embed_tokens);
            detach(&mut m.norm);
            if let Some(h) = m.lm_head.as_mut() {
                detach(h);
            }
            let mut adapters = Vec::new();
            let mut init = Rng::new(21);
            for blk in &mut m.layers {
                detach(&mut blk.input_layernorm);
                detach(&mut blk.post_attention_layernorm);
                blk.q_norm
                    .iter_mut()
                    .chain(blk.k_norm.iter_mut())
                    .for_each(detach);
                for (name, lin) in blk.linears_mut() {
                    detach(&mut lin.weight);
                    if let Some(b) = lin.bias.as_mut() {
                        detach(b);
                    }
                    if name == "k_proj" {
                        continue; // not a target: exercises projections without adapters
                    }
                    let (out, inp) = lin.weight.dims2().unwrap();
                    let mut draw = |n: usize| {
                        let mut v = vec![0f32; n];
                        init.fill_normal(&mut v, 0.3);
                        v
                    };
                    let a = Var::from_vec(draw(2 * inp), (2, inp), &Device::Cpu).unwrap();
                    let b = Var::from_vec(draw(out * 2), (out, 2), &Device::Cpu).unwrap();
                    lin.lora = Some(Lora {
                        a: a.as_tensor().clone(),
                        b: b.as_tensor().clone(),
                        scale: 1.5,
                        dropout: 0.25,
                    });
                    adapters.extend([a, b]);
                }
            }
            assert!(supported(&m, DType::F32));
            let scale = 0.5f32;
            let mut want_rng = Rng::new(9);
            let mut pass = Pass::new(DType::F32, Some(&mut want_rng));
            let loss = m
                .forward_loss(&ids, &labels, &mask, &mut pass, true)
                .unwrap();
            let want_loss = loss.to_scalar::<f32>().unwrap();
            let want = (loss * scale as f64).unwrap().backward().unwrap();
            for checkpointing in [false, true] {
                let mut rng = Rng::new(9);
                let got = forward(
                    &m,
                    &ids,
                    &labels,
                    &mask,
                    DType::F32,
                    scale,
                    checkpointing,
                    Some(&mut rng),
                )
                .unwrap()
                .backward(&m)
                .unwrap();
                assert_eq!(rng, want_rng, "{kind}: the generator moved as the model's");
                let what = format!("{kind} LoRA {head} checkpointing={checkpointing}");
                assert_matches(&got, want_loss, &want, &adapters, &what);
                assert!(got.get(&m.embed_tokens).is_none());
                assert!(got.get(&m.layers[0].q_proj.weight).is_none());
                assert!(got.get(&m.layers[1].post_attention_layernorm).is_none());
                if let Some(w) = &m.layers[0].q_norm {
                    assert!(got.get(w).is_none(), "a frozen query norm has no gradient");
                }
            }
        }
    }

    /// The step in bf16 and f16 on the CPU, whose ops store 16-bit activations and compute in
    /// f32 as CUDA's kernels do: the loss and every master weight's gradient (in f32) are the
    /// f32 step's within the type's precision, with and without recomputing layers, and an
    /// f16 loss scale folded into the gradient's scale comes back out as a plain factor. (On
    /// these models bf16 is off by up to 5.4·10⁻² of a gradient's largest element, 7.6·10⁻²
    /// on Qwen3's, f16 by 8.5·10⁻³; Candle's autograd over the plain ops in bf16 is off by up
    /// to 4·10⁻².)
    #[test]
    fn half_precision_steps_track_the_f32_step() {
        both_heads(half_precision_steps_track_the_f32_step_with);
    }

    fn half_precision_steps_track_the_f32_step_with(head: &str) {
        let (ids, labels, mask) = batch();
        for (kind, tied, bias, window) in [
            ("llama", false, true, None),
            ("qwen2", true, false, Some(3)),
            ("qwen3", true, false, None),
        ] {
            let (m, vars) = model(kind, tied, bias, window);
            let want = loss_and_grads(&m, &ids, &labels, &mask, DType::F32, 0.25).unwrap();
            for (dtype, loss_scale, tol) in
                [(DType::BF16, 1f32, 8e-2f32), (DType::F16, 1024., 1.5e-2)]
            {
                assert!(supported(&m, dtype));
                for checkpointing in [false, true] {
                    let what = format!("{kind} {head} {dtype:?} checkpointing={checkpointing}");
                    let got = forward(
                        &m,
                        &ids,
                        &labels,
                        &mask,
                        dtype,
                        0.25 * loss_scale,
                        checkpointing,
                        None,
                    )
                    .unwrap()
                    .backward(&m)
                    .unwrap();
                    let loss_err = (got.loss_sum - want.loss_sum).abs() / want.loss_sum.abs();
                    assert!(loss_err < tol, "{what}: loss off by {loss_err}");
                    let mut worst = 0f32;
                    for (i, v) in vars.iter().enumerate() {
                        let g = got.get(v.as_tensor()).expect("a gradient for every weight");
                        assert_eq!(g.dtype(), DType::F32, "{what}: var {i}'s gradient");
                        let g = g.affine(1.0 / loss_scale as f64, 0.0).unwrap();
                        let err = max_rel(&g, want.get(v.as_tensor()).unwrap());
                        assert!(err < tol, "{what}: var {i} {:?} off by {err}", v.dims());
                        worst = worst.max(err);
                    }
                    eprintln!("{what}: loss off by {loss_err:.1e}, worst gradient {worst:.1e}");
                }
            }
        }
    }

    /// The step and [`super::super::direct`] (the CPU's own) agree, so either may train.
    #[test]
    fn agrees_with_the_cpu_direct_step() {
        let (ids, labels, mask) = batch();
        let (m, vars) = model("llama", false, false, None);
        let mut ws = super::super::direct::Workspace::default();
        let cpu =
            super::super::direct::loss_and_grads(&m, &ids, &labels, &mask, 0.5, &mut ws).unwrap();
        let ops = loss_and_grads(&m, &ids, &labels, &mask, DType::F32, 0.5).unwrap();
        assert!((cpu.loss_sum - ops.loss_sum).abs() <= 1e-5 * cpu.loss_sum.abs());
        for v in &vars {
            let err = max_rel(
                ops.get(v.as_tensor()).unwrap(),
                cpu.get(v.as_tensor()).unwrap(),
            );
            assert!(err < 2e-5, "{:?} off by {err}", v.dims());
        }
    }

    #[test]
    fn refuses_what_it_cannot_train_and_names_bad_ids() {
        let (m, _) = model("llama", false, false, None);
        let (ids, labels, mask) = batch();
        // No fused kernels in f64: the trainer takes autograd there.
        assert!(!supported(&m, DType::F64));
        let err = forward(&m, &ids, &labels, &mask, DType::F64, 1.0, false, None)
            .err()
            .expect("refused");
        assert!(err.to_string().contains("not for this model"), "{err}");
        let bad = Tensor::new(&[[1u32, 2, 40, 3, 4, 5], [0, 0, 0, 0, 0, 0]], &Device::Cpu).unwrap();
        let err = forward(&m, &bad, &labels, &mask, DType::F32, 1.0, false, None)
            .err()
            .expect("refused");
        assert!(err.to_string().contains("token id 40"), "{err}");
    }

    /// `op_times` sees every op of the step once per use: per layer one attention forward and
    /// backward, seven projections each way, two norms and two residual additions forward.
    #[test]
    fn op_times_count_the_steps_ops() {
        use crate::train::op_times;
        let (ids, labels, mask) = batch();
        let (m, _) = model("llama", false, true, None);
        let layers = m.layers.len() as u64;
        op_times::enable(&Device::Cpu);
        let fwd = forward(&m, &ids, &labels, &mask, DType::F32, 1.0, false, None).unwrap();
        fwd.backward(&m).unwrap();
        let times = op_times::take();
        op_times::disable();
        let calls = |label: &str| {
            times
                .iter()
                .find(|t| t.label == label)
                .map_or(0, |t| t.calls)
        };
        assert_eq!(calls("attention"), layers, "{times:?}");
        assert_eq!(calls("attention bwd"), layers);
        assert_eq!(calls("linear"), 7 * layers);
        assert_eq!(calls("linear bwd"), 7 * layers);
        // This llama has q, k, v and o biases.
        assert_eq!(calls("bias"), 4 * layers);
        assert_eq!(calls("rms_norm"), 2 * layers + 1);
        assert_eq!(calls("rms_norm bwd"), 2 * layers + 1);
        assert_eq!(calls("lm_head + cross_entropy"), 1);
        assert_eq!(calls("embedding bwd"), 1);
        // Forward: two residual additions per layer; backward: two fan-outs (q/k/v: two
        // additions, gate/up: one) and two residual additions.
        assert_eq!(calls("add"), 2 * layers + 5 * layers);
        assert!(times.iter().all(|t| t.seconds >= 0.0));
    }
}
