//! The same operations as the fused kernels, built from Candle's differentiable ops. They run
//! wherever the kernels do not (CUDA, half precision) and are the reference the kernels are
//! tested against. Candle's fused `rms_norm`/`rope`/`softmax_last_dim` are deliberately not
//! used: they have no backward.

use crate::train::kernels::attention::allowed;
use candle_core::{D, DType, Device, Tensor};

use super::super::model::Result;

fn cast(t: &Tensor, dtype: DType) -> Result<Tensor> {
    if t.dtype() == dtype {
        Ok(t.clone())
    } else {
        Ok(t.to_dtype(dtype)?)
    }
}

/// RMSNorm in f32 (as Hugging Face computes it), result cast back to the input type.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let xf = cast(x, DType::F32)?;
    let var = xf.sqr()?.mean_keepdim(D::Minus1)?;
    let inv = (var + eps)?.sqrt()?.recip()?;
    let normed = cast(&xf.broadcast_mul(&inv)?, dtype)?;
    Ok(normed.broadcast_mul(&cast(weight, dtype)?)?)
}

/// `x · wᵀ` for `x` `(..., in)` and `w` `(out, in)`.
pub fn linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let (last, lead) = dims.split_last().expect("rank >= 1");
    let rows: usize = lead.iter().product();
    let y = x.reshape((rows, *last))?.matmul(&w.t()?)?;
    let mut shape = lead.to_vec();
    shape.push(w.dim(0)?);
    Ok(y.reshape(shape)?)
}

/// Rotate-half rotary embedding of `x` `(B, T, heads · head_dim)`; `cos`/`sin` are
/// `(T, head_dim)`.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (b, t, row) = x.dims3()?;
    let d = cos.dim(1)?;
    let x3 = x;
    let x = &x3.reshape((b, t, row / d, d))?;
    let cos = cast(cos, x.dtype())?.reshape((1, t, 1, d))?;
    let sin = cast(sin, x.dtype())?.reshape((1, t, 1, d))?;
    let half = d / 2;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    Ok((x.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?)?.reshape((b, t, row))?)
}

/// `silu(gate) · up`.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    Ok((gate.silu()? * up)?)
}

/// Per-position `mask · (logsumexp(logits) − logits[label])`, `logits` `(N, V)`.
pub fn cross_entropy(logits: &Tensor, labels: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let (n, _) = logits.dims2()?;
    let x = cast(logits, DType::F32)?;
    // The max only keeps exp() in range and cancels out of the gradient, so it is detached:
    // the backward pass then skips a full-size comparison.
    let m = x.max_keepdim(D::Minus1)?.detach();
    let lse = (x.broadcast_sub(&m)?.exp()?.sum_keepdim(D::Minus1)?.log()? + &m)?;
    let picked = x.gather(&labels.reshape((n, 1))?, 1)?;
    let nll = (lse - picked)?.squeeze(1)?;
    Ok((nll * cast(mask, DType::F32)?.reshape(n)?)?)
}

/// Causal attention for queries `(B, T, H·D)` at positions `start..start+T` over keys and
/// values `(B, S, KV·D)` at positions `0..S`, each key/value head serving `H / KV` query
/// heads, optionally limited to a sliding window; returns `(B, T, H·D)`. Softmax in f32.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    (h, kv): (usize, usize),
    start: usize,
    window: Option<usize>,
) -> Result<Tensor> {
    let (b, t, hd) = q.dims3()?;
    let s = k.dim(1)?;
    let d = hd / h;
    let q = q.reshape((b, t, h, d))?;
    let k = k.reshape((b, s, kv, d))?;
    let v = v.reshape((b, s, kv, d))?;
    let scale = 1.0 / (d as f64).sqrt();
    let q = q.transpose(1, 2)?.contiguous()?;
    let k = repeat_kv(&k.transpose(1, 2)?.contiguous()?, h / kv)?;
    let v = repeat_kv(&v.transpose(1, 2)?.contiguous()?, h / kv)?;
    let mask = causal_mask(t, start, s, window, q.device())?;
    let scores = (q.matmul(&k.t()?)? * scale)?;
    let scores = cast(&scores, DType::F32)?.broadcast_add(&mask)?;
    let att = cast(&candle_nn::ops::softmax(&scores, D::Minus1)?, q.dtype())?;
    let y = att.matmul(&v)?.transpose(1, 2)?;
    Ok(y.reshape((b, t, h * d))?)
}

/// `(T, S)` additive mask: 0 where allowed, -inf elsewhere.
fn causal_mask(
    t: usize,
    start: usize,
    s: usize,
    window: Option<usize>,
    device: &Device,
) -> Result<Tensor> {
    let mut m = vec![0f32; t * s];
    for i in 0..t {
        for j in 0..s {
            if !allowed(i, j, start, window) {
                m[i * s + j] = f32::NEG_INFINITY;
            }
        }
    }
    Ok(Tensor::from_vec(m, (t, s), device)?)
}

/// `(B, kv, T, D)` → `(B, kv·n, T, D)`, each key/value head serving `n` query heads.
fn repeat_kv(x: &Tensor, n: usize) -> Result<Tensor> {
    if n == 1 {
        return Ok(x.clone());
    }
    let (b, kv, t, d) = x.dims4()?;
    Ok(x.unsqueeze(2)?
        .broadcast_as((b, kv, n, t, d))?
        .reshape((b, kv * n, t, d))?)
}
