//! CPU kernels behind jobd's fused training ops (`jobd::train::ops`): RMSNorm, rotary
//! embeddings, SwiGLU, softmax cross-entropy, flash-style causal attention and AdamW, each a
//! forward and a backward over contiguous f32 slices, parallel with rayon (on the caller's
//! pool, so a job's thread count holds).
//!
//! They live in their own crate so that debug and test builds compile them optimised (see the
//! `[profile.dev.package.jobd-kernels]` entry of jobd's `Cargo.toml`) while jobd itself stays
//! at opt-level 0 for fast rebuilds: unoptimised element loops made the training tests
//! several times slower. No Candle types here; `jobd::train::ops` wraps these as Candle custom
//! ops with backward passes.
//!
//! Determinism: work is split into pieces that depend only on the shapes, and partial sums are
//! combined in a fixed order, so results are bitwise the same whatever the thread count, which
//! exact resume relies on.

pub mod attention;

use rayon::prelude::*;

/// Rows per rayon task for row-wise kernels: enough work that scheduling costs nothing next to
/// it, few enough rows that two to a few dozen threads stay balanced.
pub fn rows_per_task(row_len: usize) -> usize {
    (16384 / row_len.max(1)).max(1)
}

/// Elements per rayon task for element-wise kernels.
const CHUNK: usize = 16384;

/// Sum of `f(i)` over `0..n` with 16 independent accumulators, so that the compiler vectorises
/// it and the order of additions (hence the rounding) is fixed.
#[inline(always)]
pub fn sum16(n: usize, f: impl Fn(usize) -> f32) -> f32 {
    let mut acc = [0f32; 16];
    let full = n / 16 * 16;
    let mut i = 0;
    while i < full {
        for (l, a) in acc.iter_mut().enumerate() {
            *a += f(i + l);
        }
        i += 16;
    }
    let mut s = 0f32;
    for &a in &acc {
        s += a;
    }
    for j in full..n {
        s += f(j);
    }
    s
}

/// RMSNorm over rows of `d`: `y = x · rsqrt(mean(x²) + eps) · w`.
pub fn rms_norm_fwd(x: &[f32], w: &[f32], eps: f32, y: &mut [f32]) {
    let d = w.len();
    let chunk = d * rows_per_task(d);
    y.par_chunks_mut(chunk)
        .zip(x.par_chunks(chunk))
        .for_each(|(ys, xs)| {
            for (yr, xr) in ys.chunks_exact_mut(d).zip(xs.chunks_exact(d)) {
                let inv = 1.0 / (sum16(d, |i| xr[i] * xr[i]) / d as f32 + eps).sqrt();
                for i in 0..d {
                    yr[i] = xr[i] * inv * w[i];
                }
            }
        });
}

/// RMSNorm backward: writes `dx`, returns `dw`. With `r = rsqrt(mean(x²) + eps)` and
/// `g = dy · w`: `dx = r · (g − x · r² · mean(g · x))`, `dw = Σ_rows dy · x · r`.
pub fn rms_norm_bwd(x: &[f32], w: &[f32], dy: &[f32], eps: f32, dx: &mut [f32]) -> Vec<f32> {
    let d = w.len();
    let rows = rows_per_task(d);
    // One partial dw per fixed block of rows, summed below in block order.
    let partials: Vec<Vec<f32>> = dx
        .par_chunks_mut(d * rows)
        .enumerate()
        .map(|(c, dxs)| {
            let mut dw = vec![0f32; d];
            let r0 = c * rows;
            for (r, dxr) in dxs.chunks_exact_mut(d).enumerate() {
                let xr = &x[(r0 + r) * d..(r0 + r + 1) * d];
                let g = &dy[(r0 + r) * d..(r0 + r + 1) * d];
                let inv = 1.0 / (sum16(d, |i| xr[i] * xr[i]) / d as f32 + eps).sqrt();
                let k = inv * inv * sum16(d, |i| g[i] * w[i] * xr[i]) / d as f32;
                for i in 0..d {
                    dxr[i] = inv * (g[i] * w[i] - xr[i] * k);
                    dw[i] += g[i] * (xr[i] * inv);
                }
            }
            dw
        })
        .collect();
    let mut dw = vec![0f32; d];
    for p in &partials {
        for (a, b) in dw.iter_mut().zip(p) {
            *a += b;
        }
    }
    dw
}

/// Rotate-half rotary embedding of `x` `(B, T, heads, hd)` with tables `(T, hd)`:
/// `y[:h] = x[:h]·cos[:h] − x[h:]·sin[:h]`, `y[h:] = x[h:]·cos[h:] + x[:h]·sin[h:]`
/// (h = hd/2). With `transpose`, the inverse rotation, which is the backward.
pub fn rope(
    x: &[f32],
    cos: &[f32],
    sin: &[f32],
    (t, heads, hd): (usize, usize, usize),
    transpose: bool,
    y: &mut [f32],
) {
    let half = hd / 2;
    let row = heads * hd;
    y.par_chunks_mut(row)
        .zip(x.par_chunks(row))
        .enumerate()
        .with_min_len(rows_per_task(row))
        .for_each(|(bt, (ys, xs))| {
            let p = bt % t;
            let c = &cos[p * hd..(p + 1) * hd];
            let s = &sin[p * hd..(p + 1) * hd];
            for (yh, xh) in ys.chunks_exact_mut(hd).zip(xs.chunks_exact(hd)) {
                for i in 0..half {
                    let (a, b) = (xh[i], xh[i + half]);
                    if transpose {
                        yh[i] = a * c[i] + b * s[i + half];
                        yh[i + half] = b * c[i + half] - a * s[i];
                    } else {
                        yh[i] = a * c[i] - b * s[i];
                        yh[i + half] = b * c[i + half] + a * s[i + half];
                    }
                }
            }
        });
}

/// `y = silu(g) · u` with Candle's `silu(x) = x / (1 + exp(−x))`.
pub fn swiglu_fwd(g: &[f32], u: &[f32], y: &mut [f32]) {
    y.par_chunks_mut(CHUNK)
        .zip(g.par_chunks(CHUNK).zip(u.par_chunks(CHUNK)))
        .for_each(|(ys, (gs, us))| {
            for i in 0..ys.len() {
                ys[i] = gs[i] / (1.0 + (-gs[i]).exp()) * us[i];
            }
        });
}

/// SwiGLU backward: `dg = dy · u · σ(g) · (1 + g · (1 − σ(g)))`, `du = dy · silu(g)`.
pub fn swiglu_bwd(g: &[f32], u: &[f32], dy: &[f32], dg: &mut [f32], du: &mut [f32]) {
    dg.par_chunks_mut(CHUNK)
        .zip(du.par_chunks_mut(CHUNK))
        .enumerate()
        .for_each(|(c, (dgs, dus))| {
            let o = c * CHUNK;
            for i in 0..dgs.len() {
                let (x, up, d) = (g[o + i], u[o + i], dy[o + i]);
                let sig = 1.0 / (1.0 + (-x).exp());
                dgs[i] = d * up * sig * (1.0 + x * (1.0 - sig));
                dus[i] = d * (x * sig);
            }
        });
}

/// `(max, logsumexp)` of a row, in the order the plain-op version computes them.
#[inline]
fn row_lse(x: &[f32]) -> (f32, f32) {
    let m = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let s = sum16(x.len(), |i| (x[i] - m).exp());
    (m, s.ln() + m)
}

/// Per row of `v` logits: `out = mask · (logsumexp(x) − x[label])`. Labels must be `< v`.
pub fn cross_entropy_fwd(x: &[f32], labels: &[u32], mask: &[f32], v: usize, out: &mut [f32]) {
    out.par_iter_mut()
        .enumerate()
        .with_min_len(rows_per_task(v))
        .for_each(|(r, o)| {
            let row = &x[r * v..(r + 1) * v];
            let (_, lse) = row_lse(row);
            *o = (lse - row[labels[r] as usize]) * mask[r];
        });
}

/// Cross-entropy backward: `dx = grad · mask · (softmax(x) − onehot(label))`, the softmax
/// recomputed from the logits (no N×V probabilities kept from the forward).
pub fn cross_entropy_bwd(
    x: &[f32],
    labels: &[u32],
    mask: &[f32],
    grad: &[f32],
    v: usize,
    dx: &mut [f32],
) {
    dx.par_chunks_mut(v)
        .enumerate()
        .with_min_len(rows_per_task(v))
        .for_each(|(r, d)| {
            let scale = grad[r] * mask[r];
            if scale == 0.0 {
                d.fill(0.0);
                return;
            }
            let row = &x[r * v..(r + 1) * v];
            let (_, lse) = row_lse(row);
            for i in 0..v {
                d[i] = (row[i] - lse).exp() * scale;
            }
            d[labels[r] as usize] -= scale;
        });
}

/// AdamW hyper-parameters of one update (as `torch.optim.AdamW`, non-fused).
#[derive(Debug, Clone, Copy)]
pub struct AdamStep {
    /// Learning rate.
    pub lr: f32,
    /// β1.
    pub beta1: f32,
    /// β2.
    pub beta2: f32,
    /// ε.
    pub eps: f32,
    /// `1 − lr · weight_decay` (1 without decay).
    pub decay: f32,
    /// `lr / (1 − β1^t)`.
    pub step_size: f32,
    /// `sqrt(1 − β2^t)`.
    pub bc2_sqrt: f32,
    /// Factor applied to the gradient first (gradient clipping), 1 for none.
    pub grad_scale: f32,
}

/// First moment in place: `m = β1·m + (1−β1)·g` with `g = grad_scale · grad`.
pub fn adamw_m(m: &mut [f32], grad: &[f32], s: &AdamStep) {
    m.par_chunks_mut(CHUNK).enumerate().for_each(|(c, ms)| {
        let o = c * CHUNK;
        for i in 0..ms.len() {
            let g = grad[o + i] * s.grad_scale;
            ms[i] = ms[i] * s.beta1 + g * (1.0 - s.beta1);
        }
    });
}

/// Second moment in place: `v = β2·v + (1−β2)·g²` with `g = grad_scale · grad`.
pub fn adamw_v(v: &mut [f32], grad: &[f32], s: &AdamStep) {
    v.par_chunks_mut(CHUNK).enumerate().for_each(|(c, vs)| {
        let o = c * CHUNK;
        for i in 0..vs.len() {
            let g = grad[o + i] * s.grad_scale;
            vs[i] = vs[i] * s.beta2 + g * g * (1.0 - s.beta2);
        }
    });
}

/// Updates the parameter in place from the new moments:
/// `p = p·decay − step_size · m / (sqrt(v)/bc2_sqrt + eps)`.
pub fn adamw_apply(p: &mut [f32], m: &[f32], v: &[f32], s: &AdamStep) {
    p.par_chunks_mut(CHUNK).enumerate().for_each(|(c, ps)| {
        let o = c * CHUNK;
        for i in 0..ps.len() {
            let denom = v[o + i].sqrt() / s.bc2_sqrt + s.eps;
            ps[i] = ps[i] * s.decay - m[o + i] / denom * s.step_size;
        }
    });
}

/// Σ x² in f64, in fixed blocks summed in order (for the global gradient norm).
pub fn sum_squares(x: &[f32]) -> f64 {
    let parts: Vec<f64> = x
        .par_chunks(CHUNK)
        .map(|c| sum16(c.len(), |i| c[i] * c[i]) as f64)
        .collect();
    parts.iter().sum()
}
