//! CPU kernels behind jobd's fused training ops ([`super::ops`]): RMSNorm, rotary
//! embeddings, SwiGLU, softmax cross-entropy (alone, or with the lm_head matmul and its
//! gradients in one chunked pass), flash-style causal attention and AdamW, each a
//! forward and a backward over contiguous f32 slices, parallel with rayon (on the caller's
//! pool, so a job's thread count holds).
//!
//! No Candle types here; [`super::ops`] wraps these as Candle custom ops with backward
//! passes. They are written for the optimiser (16-wide accumulators, slices rather than
//! indexing where it matters): release builds vectorise them; debug builds run them several
//! times slower, which the tests' tiny models can afford (`opt-level = 1` for the whole crate
//! would cost CI more in compile time than it saves in test time).
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

/// Runs `f` compiled for the widest instruction set this CPU has (AVX-512, AVX2 + FMA, or
/// the baseline), chosen at run time as gemm does: the element-wise loops here then vectorise
/// 16 or 8 lanes wide instead of the default target's 4. Everything `f` calls must inline
/// into it (`#[inline(always)]`). Results are the same bits on every path: Rust never fuses a
/// multiply and an add on its own, and the loops' summation orders are fixed.
#[inline(always)]
pub fn simd<R>(f: impl FnOnce() -> R) -> R {
    pulp::Arch::new().dispatch(f)
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

/// `e^x` to about 2 ulp, written without calls or branches so that loops over it vectorise
/// (libm's `expf` is a call per element and took 7% of a CPU training step). Cephes' method:
/// `x = n·ln2 + r` with |r| ≤ ln2/2, a degree-6 polynomial for `e^r`, `2^n` put in the
/// exponent bits. Gives 0 below −87.3 (where f32 underflows) and is not meant for x > 88.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let xc = x.clamp(-87.3, 88.0);
    // Round to nearest by adding and subtracting 1.5·2²³ (plain SSE2; `round()` would be a
    // call on CPUs without SSE4.1 code generation, which is the default target).
    const MAGIC: f32 = 12_582_912.0;
    let shifted = xc * LOG2E + MAGIC;
    let n = shifted - MAGIC;
    let r = xc - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let er = p * r * r + r + 1.0;
    // n as an integer is in the low mantissa bits of `shifted` (no float-to-int conversion,
    // whose saturating semantics keep the loop from vectorising).
    let ni = shifted.to_bits() as i32 - MAGIC.to_bits() as i32;
    let scale = f32::from_bits(((ni + 127) as u32) << 23);
    let y = er * scale;
    if x < -87.3 { 0.0 } else { y }
}

/// RMSNorm over rows of `d`: `y = x · rsqrt(mean(x²) + eps) · w`.
pub fn rms_norm_fwd(x: &[f32], w: &[f32], eps: f32, y: &mut [f32]) {
    let d = w.len();
    let chunk = d * rows_per_task(d);
    y.par_chunks_mut(chunk)
        .zip(x.par_chunks(chunk))
        .for_each(|(ys, xs)| {
            simd(|| {
                for (yr, xr) in ys.chunks_exact_mut(d).zip(xs.chunks_exact(d)) {
                    let inv = 1.0 / (sum16(d, |i| xr[i] * xr[i]) / d as f32 + eps).sqrt();
                    for i in 0..d {
                        yr[i] = xr[i] * inv * w[i];
                    }
                }
            })
        });
}

/// RMSNorm backward: writes `dx` (or with `accumulate` adds to it: the residual stream's
/// gradient), returns `dw`. With `r = rsqrt(mean(x²) + eps)` and `g = dy · w`:
/// `dx = r · (g − x · r² · mean(g · x))`, `dw = Σ_rows dy · x · r`.
pub fn rms_norm_bwd(
    x: &[f32],
    w: &[f32],
    dy: &[f32],
    eps: f32,
    dx: &mut [f32],
    accumulate: bool,
) -> Vec<f32> {
    let d = w.len();
    let rows = rows_per_task(d);
    // One partial dw per fixed block of rows, summed below in block order.
    let partials: Vec<Vec<f32>> = dx
        .par_chunks_mut(d * rows)
        .enumerate()
        .map(|(c, dxs)| {
            simd(|| {
                let mut dw = vec![0f32; d];
                let r0 = c * rows;
                for (r, dxr) in dxs.chunks_exact_mut(d).enumerate() {
                    let xr = &x[(r0 + r) * d..(r0 + r + 1) * d];
                    let g = &dy[(r0 + r) * d..(r0 + r + 1) * d];
                    let inv = 1.0 / (sum16(d, |i| xr[i] * xr[i]) / d as f32 + eps).sqrt();
                    let k = inv * inv * sum16(d, |i| g[i] * w[i] * xr[i]) / d as f32;
                    if accumulate {
                        for i in 0..d {
                            dxr[i] += inv * (g[i] * w[i] - xr[i] * k);
                        }
                    } else {
                        for i in 0..d {
                            dxr[i] = inv * (g[i] * w[i] - xr[i] * k);
                        }
                    }
                    for i in 0..d {
                        dw[i] += g[i] * (xr[i] * inv);
                    }
                }
                dw
            })
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
    dims: (usize, usize, usize),
    transpose: bool,
    y: &mut [f32],
) {
    y.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .for_each(|(ys, xs)| ys.copy_from_slice(xs));
    rope_in_place(y, cos, sin, dims, transpose);
}

/// [`rope`] overwriting its input.
pub fn rope_in_place(
    x: &mut [f32],
    cos: &[f32],
    sin: &[f32],
    (t, heads, hd): (usize, usize, usize),
    transpose: bool,
) {
    let half = hd / 2;
    let row = heads * hd;
    x.par_chunks_mut(row)
        .enumerate()
        .with_min_len(rows_per_task(row))
        .for_each(|(bt, xs)| {
            simd(|| {
                let p = bt % t;
                let c = &cos[p * hd..(p + 1) * hd];
                let s = &sin[p * hd..(p + 1) * hd];
                for xh in xs.chunks_exact_mut(hd) {
                    let (lo, hi) = xh.split_at_mut(half);
                    for i in 0..half {
                        let (a, b) = (lo[i], hi[i]);
                        if transpose {
                            lo[i] = a * c[i] + b * s[i + half];
                            hi[i] = b * c[i + half] - a * s[i];
                        } else {
                            lo[i] = a * c[i] - b * s[i];
                            hi[i] = b * c[i + half] + a * s[i + half];
                        }
                    }
                }
            })
        });
}

/// `y = silu(g) · u` with Candle's `silu(x) = x / (1 + exp(−x))`.
pub fn swiglu_fwd(g: &[f32], u: &[f32], y: &mut [f32]) {
    y.par_chunks_mut(CHUNK)
        .zip(g.par_chunks(CHUNK).zip(u.par_chunks(CHUNK)))
        .for_each(|(ys, (gs, us))| simd(|| swiglu_span(gs, us, ys)));
}

/// SwiGLU backward: `dg = dy · u · σ(g) · (1 + g · (1 − σ(g)))`, `du = dy · silu(g)`.
pub fn swiglu_bwd(g: &[f32], u: &[f32], dy: &[f32], dg: &mut [f32], du: &mut [f32]) {
    dg.par_chunks_mut(CHUNK)
        .zip(du.par_chunks_mut(CHUNK))
        .enumerate()
        .for_each(|(c, (dgs, dus))| {
            let span = c * CHUNK..c * CHUNK + dgs.len();
            simd(|| swiglu_bwd_span(&g[span.clone()], &u[span.clone()], &dy[span], dgs, dus));
        });
}

/// [`swiglu_fwd`] of gate and up projections packed in one matrix: each row of `gu` is the
/// row's `f` gate values, then its `f` up values (one matmul computes both); `y` is `(rows, f)`.
pub fn swiglu_fwd_packed(gu: &[f32], f: usize, y: &mut [f32]) {
    y.par_chunks_mut(f)
        .zip(gu.par_chunks(2 * f))
        .with_min_len(rows_per_task(2 * f))
        .for_each(|(ys, row)| {
            let (g, u) = row.split_at(f);
            simd(|| swiglu_span(g, u, ys));
        });
}

/// [`swiglu_bwd`] in the layout of [`swiglu_fwd_packed`]: writes each row's gate then up
/// gradients into `dgu` `(rows, 2f)`.
pub fn swiglu_bwd_packed(gu: &[f32], dy: &[f32], f: usize, dgu: &mut [f32]) {
    dgu.par_chunks_mut(2 * f)
        .zip(gu.par_chunks(2 * f).zip(dy.par_chunks(f)))
        .with_min_len(rows_per_task(2 * f))
        .for_each(|(drow, (row, dys))| {
            let (g, u) = row.split_at(f);
            let (dg, du) = drow.split_at_mut(f);
            simd(|| swiglu_bwd_span(g, u, dys, dg, du));
        });
}

#[inline(always)]
fn swiglu_span(g: &[f32], u: &[f32], y: &mut [f32]) {
    let (g, u) = (&g[..y.len()], &u[..y.len()]);
    for i in 0..y.len() {
        y[i] = g[i] / (1.0 + exp(-g[i])) * u[i];
    }
}

#[inline(always)]
fn swiglu_bwd_span(g: &[f32], u: &[f32], dy: &[f32], dg: &mut [f32], du: &mut [f32]) {
    let n = dg.len();
    let (g, u, dy, du) = (&g[..n], &u[..n], &dy[..n], &mut du[..n]);
    for i in 0..n {
        let (x, up, d) = (g[i], u[i], dy[i]);
        let sig = 1.0 / (1.0 + exp(-x));
        dg[i] = d * up * sig * (1.0 + x * (1.0 - sig));
        du[i] = d * (x * sig);
    }
}

/// Largest element, with 16 independent lanes so that it vectorises.
#[inline(always)]
fn max16(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 16];
    let full = x.len() / 16 * 16;
    for c in x[..full].chunks_exact(16) {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a = if v > *a { v } else { *a };
        }
    }
    let mut m = f32::NEG_INFINITY;
    for &a in acc.iter().chain(&x[full..]) {
        m = if a > m { a } else { m };
    }
    m
}

/// `logsumexp` of a row: `ln Σ exp(x − max) + max`.
#[inline(always)]
fn row_lse(x: &[f32]) -> f32 {
    let m = max16(x);
    let s = sum16(x.len(), |i| exp(x[i] - m));
    s.ln() + m
}

/// Per row of `v` logits: `out = mask · (logsumexp(x) − x[label])`; each row's logsumexp goes
/// to `lse` for the backward. Labels must be `< v`.
pub fn cross_entropy_fwd(
    x: &[f32],
    labels: &[u32],
    mask: &[f32],
    v: usize,
    out: &mut [f32],
    lse: &mut [f32],
) {
    out.par_iter_mut()
        .zip(lse.par_iter_mut())
        .enumerate()
        .with_min_len(rows_per_task(v))
        .for_each(|(r, (o, l))| {
            simd(|| {
                let row = &x[r * v..(r + 1) * v];
                *l = row_lse(row);
                *o = (*l - row[labels[r] as usize]) * mask[r];
            })
        });
}

/// Cross-entropy backward: `dx = grad · mask · (softmax(x) − onehot(label))`, the softmax
/// recomputed from the logits and the forward's logsumexps (no N×V probabilities kept).
pub fn cross_entropy_bwd(
    x: &[f32],
    labels: &[u32],
    mask: &[f32],
    lse: &[f32],
    grad: &[f32],
    dx: &mut [f32],
) {
    let v = x.len() / lse.len().max(1);
    dx.par_chunks_mut(v)
        .enumerate()
        .with_min_len(rows_per_task(v))
        .for_each(|(r, d)| {
            simd(|| {
                let scale = grad[r] * mask[r];
                if scale == 0.0 {
                    d.fill(0.0);
                    return;
                }
                let row = &x[r * v..(r + 1) * v];
                let l = lse[r];
                for i in 0..v {
                    d[i] = exp(row[i] - l) * scale;
                }
                d[labels[r] as usize] -= scale;
            })
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

/// AdamW's update of one tensor in one pass over its elements, in place: with
/// `g = grad_scale · grad`, `m = β1·m + (1−β1)·g`, `v = β2·v + (1−β2)·g²`, then
/// `p = p·decay − step_size · m / (sqrt(v)/bc2_sqrt + eps)` from the new moments. Each element
/// is read once and written once (four streams in, three out), in the same f32 operations
/// per element as `torch.optim.AdamW`'s non-fused loop.
pub fn adamw_step(p: &mut [f32], m: &mut [f32], v: &mut [f32], grad: &[f32], s: &AdamStep) {
    assert!(m.len() == p.len() && v.len() == p.len() && grad.len() == p.len());
    p.par_chunks_mut(CHUNK)
        .zip(m.par_chunks_mut(CHUNK).zip(v.par_chunks_mut(CHUNK)))
        .zip(grad.par_chunks(CHUNK))
        .for_each(|((ps, (ms, vs)), gs)| {
            simd(|| {
                for i in 0..ps.len() {
                    let g = gs[i] * s.grad_scale;
                    let mi = ms[i] * s.beta1 + g * (1.0 - s.beta1);
                    let vi = vs[i] * s.beta2 + g * g * (1.0 - s.beta2);
                    ms[i] = mi;
                    vs[i] = vi;
                    let denom = vi.sqrt() / s.bc2_sqrt + s.eps;
                    ps[i] = ps[i] * s.decay - mi / denom * s.step_size;
                }
            })
        });
}

/// Token positions grouped by id: `order` lists the positions of `ids[0]`'s group, then the
/// next id's, each group in position order; group `g` is `order[starts[g]..starts[g + 1]]`.
#[derive(Debug, PartialEq, Eq)]
pub struct IdGroups {
    /// Positions, grouped by id.
    pub order: Vec<u32>,
    /// Where each group starts in `order`, plus its length at the end.
    pub starts: Vec<u32>,
    /// The distinct ids, ascending.
    pub ids: Vec<u32>,
}

/// Groups the positions of `tokens` by id (for an embedding's backward: each id's gradient is
/// the sum of its positions' rows, added in position order so the result is reproducible).
pub fn group_by_id(tokens: &[u32]) -> IdGroups {
    let mut order: Vec<u32> = (0..tokens.len() as u32).collect();
    // A stable sort keeps each group in position order.
    order.sort_by_key(|&p| tokens[p as usize]);
    let mut ids = Vec::new();
    let mut starts = Vec::new();
    for (k, &p) in order.iter().enumerate() {
        let id = tokens[p as usize];
        if ids.last() != Some(&id) {
            ids.push(id);
            starts.push(k as u32);
        }
    }
    starts.push(order.len() as u32);
    IdGroups { order, starts, ids }
}

/// Column sums of `x` `(rows, cols)` (a bias's gradient), in fixed blocks of rows summed in
/// order.
pub fn column_sums(x: &[f32], cols: usize) -> Vec<f32> {
    let partials: Vec<Vec<f32>> = x
        .par_chunks(cols * rows_per_task(cols))
        .map(|block| {
            simd(|| {
                let mut s = vec![0f32; cols];
                for row in block.chunks_exact(cols) {
                    for (a, b) in s.iter_mut().zip(row) {
                        *a += b;
                    }
                }
                s
            })
        })
        .collect();
    let mut out = vec![0f32; cols];
    for p in &partials {
        for (a, b) in out.iter_mut().zip(p) {
            *a += b;
        }
    }
    out
}

/// Σ x² in f64, in fixed blocks summed in order (for the global gradient norm).
pub fn sum_squares(x: &[f32]) -> f64 {
    let parts: Vec<f64> = x
        .par_chunks(CHUNK)
        .map(|c| simd(|| sum16(c.len(), |i| c[i] * c[i]) as f64))
        .collect();
    parts.iter().sum()
}

/// `dst (m×n) = lhs (m×k) · rhs (k×n)`, strides given as (row, column), on the current rayon
/// pool's threads.
///
/// # Safety
/// The pointers must be valid for the shapes and strides given, `dst` must not overlap the
/// inputs, and nothing else may access `dst` meanwhile.
#[allow(clippy::too_many_arguments)]
pub unsafe fn matmul(
    mnk: (usize, usize, usize),
    dst: *mut f32,
    dst_s: (usize, usize),
    lhs: *const f32,
    lhs_s: (usize, usize),
    rhs: *const f32,
    rhs_s: (usize, usize),
) {
    // SAFETY: forwarded to the caller.
    unsafe { matmul_acc(mnk, dst, dst_s, lhs, lhs_s, rhs, rhs_s, false) }
}

/// [`matmul`], or with `accumulate` `dst += lhs · rhs`.
///
/// # Safety
/// As for [`matmul`]; with `accumulate`, `dst` must also be initialised.
#[allow(clippy::too_many_arguments)]
pub unsafe fn matmul_acc(
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    (dst_rs, dst_cs): (usize, usize),
    lhs: *const f32,
    (lhs_rs, lhs_cs): (usize, usize),
    rhs: *const f32,
    (rhs_rs, rhs_cs): (usize, usize),
    accumulate: bool,
) {
    let threads = rayon::current_num_threads();
    let par = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: forwarded to the caller.
    unsafe {
        gemm_strided(
            (m, n, k),
            dst,
            (dst_rs, dst_cs),
            accumulate,
            lhs,
            (lhs_rs, lhs_cs),
            rhs,
            (rhs_rs, rhs_cs),
            1.0,
            par,
        )
    }
}

/// `dst (m×n) = [dst +] beta · lhs (m×k) · rhs (k×n)`, strides given as (row, column): the one
/// place that calls gemm (whose own argument order is column stride first).
///
/// # Safety
/// As for [`matmul_acc`].
#[allow(clippy::too_many_arguments)]
#[inline]
pub(crate) unsafe fn gemm_strided(
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    (dst_rs, dst_cs): (usize, usize),
    accumulate: bool,
    lhs: *const f32,
    (lhs_rs, lhs_cs): (usize, usize),
    rhs: *const f32,
    (rhs_rs, rhs_cs): (usize, usize),
    beta: f32,
    par: gemm::Parallelism,
) {
    // SAFETY: forwarded to the caller. `alpha` only scales `dst` when it is read.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            dst_cs as isize,
            dst_rs as isize,
            accumulate,
            lhs,
            lhs_cs as isize,
            lhs_rs as isize,
            rhs,
            rhs_cs as isize,
            rhs_rs as isize,
            1.0,
            beta,
            false,
            false,
            false,
            par,
        )
    }
}

/// `y (rows×out) = x (rows×inp) · wᵀ` for a PyTorch-layout weight `w (out×inp)`.
pub fn linear_fwd(x: &[f32], w: &[f32], rows: usize, inp: usize, out: usize) -> Vec<f32> {
    let mut y = vec![0f32; rows * out];
    linear_into(x, w, &mut y, (rows, inp, out), false);
    y
}

/// [`linear_fwd`] into `y`, or with `accumulate` `y += x · wᵀ` (a residual addition done by the
/// matmul).
pub fn linear_into(
    x: &[f32],
    w: &[f32],
    y: &mut [f32],
    (rows, inp, out): (usize, usize, usize),
    accumulate: bool,
) {
    assert!(x.len() == rows * inp && w.len() == out * inp && y.len() == rows * out);
    // SAFETY: sizes checked; `y` is an exclusive borrow distinct from the inputs.
    unsafe {
        matmul_acc(
            (rows, out, inp),
            y.as_mut_ptr(),
            (out, 1),
            x.as_ptr(),
            (inp, 1),
            w.as_ptr(),
            (1, inp),
            accumulate,
        );
    }
}

/// Linear backward: `dx = dy · w` and, when wanted, `dw = dyᵀ · x`, written straight in the
/// weight's `(out, inp)` layout (no transposed gradient to copy later).
pub fn linear_bwd(
    x: &[f32],
    w: &[f32],
    dy: &[f32],
    dims: (usize, usize, usize),
    dx: &mut [f32],
    dw: Option<&mut [f32]>,
) {
    linear_dx_into(dy, w, dx, dims, false);
    if let Some(dw) = dw {
        linear_dw_into(dy, x, dw, dims);
    }
}

/// The input's gradient of a linear layer: `dx (rows×inp) = dy (rows×out) · w`, or with
/// `accumulate` `dx += dy · w` (several projections of one input).
pub fn linear_dx_into(
    dy: &[f32],
    w: &[f32],
    dx: &mut [f32],
    (rows, inp, out): (usize, usize, usize),
    accumulate: bool,
) {
    assert!(dy.len() == rows * out && w.len() == out * inp && dx.len() == rows * inp);
    // SAFETY: sizes checked; `dx` is an exclusive borrow distinct from the inputs.
    unsafe {
        matmul_acc(
            (rows, inp, out),
            dx.as_mut_ptr(),
            (inp, 1),
            dy.as_ptr(),
            (out, 1),
            w.as_ptr(),
            (inp, 1),
            accumulate,
        );
    }
}

/// The weight's gradient of a linear layer, `dw (out×inp) = dyᵀ · x`, in the weight's layout.
pub fn linear_dw_into(
    dy: &[f32],
    x: &[f32],
    dw: &mut [f32],
    (rows, inp, out): (usize, usize, usize),
) {
    assert!(dy.len() == rows * out && x.len() == rows * inp && dw.len() == out * inp);
    // SAFETY: sizes checked; `dw` is an exclusive borrow distinct from the inputs.
    unsafe {
        matmul(
            (out, inp, rows),
            dw.as_mut_ptr(),
            (inp, 1),
            dy.as_ptr(),
            (1, out),
            x.as_ptr(),
            (inp, 1),
        );
    }
}

/// Rows of logits the fused lm_head + cross-entropy computes at a time for a vocabulary of
/// `v`: its only N×V-sized buffer is about 4M elements (16 MB: 512 rows at a vocabulary of
/// 8192), and the weight-gradient update per chunk is a matmul with this inner size, kept at
/// 64 or more so that it runs at full speed. Depends only on the shape (determinism).
pub fn lce_rows(v: usize) -> usize {
    ((1 << 22) / v.max(1)).clamp(64, 1024)
}

/// Fused lm_head + cross-entropy: returns `Σ_rows mask · (logsumexp(z) − z[label])` for the
/// logits `z = x · wᵀ` (`x` `(rows, d)`, `w` `(v, d)`), computed [`lce_rows`] rows at a time
/// and never kept whole. Since the loss ends the graph, the same pass writes, when asked, its
/// gradients with respect to `x` (`dx = dz · w`) and `w` (`dw = Σ_chunks dzᵀ · x`) for
/// `dz = grad_scale · mask · (softmax(z) − onehot(label))` (`grad_scale`: the gradient of
/// whatever the summed loss is multiplied by afterwards). Labels must be `< v`.
///
/// Deterministic: the chunks depend only on the shapes, `dw` accumulates them in order, and the
/// per-row losses are summed in row order.
#[allow(clippy::too_many_arguments)]
pub fn linear_cross_entropy(
    x: &[f32],
    w: &[f32],
    labels: &[u32],
    mask: &[f32],
    (rows, d, v): (usize, usize, usize),
    grad_scale: f32,
    mut dx: Option<&mut [f32]>,
    mut dw: Option<&mut [f32]>,
) -> f32 {
    assert!(x.len() == rows * d && w.len() == v * d);
    assert!(labels.len() == rows && mask.len() == rows);
    assert!(dx.as_ref().is_none_or(|g| g.len() == rows * d));
    assert!(dw.as_ref().is_none_or(|g| g.len() == v * d));
    let want_grad = dx.is_some() || dw.is_some();
    let chunk = lce_rows(v).min(rows).max(1);
    let mut z = vec![0f32; chunk * v];
    let mut losses = vec![0f32; rows];
    for (c, r0) in (0..rows).step_by(chunk).enumerate() {
        let n = chunk.min(rows - r0);
        let z = &mut z[..n * v];
        let xc = &x[r0 * d..(r0 + n) * d];
        // SAFETY: sizes checked above; z is our own buffer.
        unsafe {
            matmul(
                (n, v, d),
                z.as_mut_ptr(),
                (v, 1),
                xc.as_ptr(),
                (d, 1),
                w.as_ptr(),
                (1, d),
            );
        }
        z.par_chunks_mut(v)
            .zip(losses[r0..r0 + n].par_iter_mut())
            .enumerate()
            .with_min_len(rows_per_task(v))
            .for_each(|(i, (row, loss))| {
                simd(|| {
                    let label = labels[r0 + i] as usize;
                    let m = mask[r0 + i];
                    let target = row[label];
                    if !want_grad {
                        *loss = (row_lse(row) - target) * m;
                        return;
                    }
                    // The row becomes its gradient: exp(z − max) once, for the sum and the softmax.
                    let mx = max16(row);
                    for e in row.iter_mut() {
                        *e = exp(*e - mx);
                    }
                    let s = sum16(v, |j| row[j]);
                    *loss = (s.ln() + mx - target) * m;
                    let gm = m * grad_scale;
                    if gm == 0.0 {
                        row.fill(0.0);
                    } else {
                        let k = gm / s;
                        for e in row.iter_mut() {
                            *e *= k;
                        }
                        row[label] -= gm;
                    }
                })
            });
        // SAFETY: sizes checked above; dx and dw are exclusive borrows distinct from the
        // inputs, and dw has been written by the first chunk before later ones accumulate.
        unsafe {
            if let Some(dx) = dx.as_deref_mut() {
                matmul(
                    (n, d, v),
                    dx[r0 * d..].as_mut_ptr(),
                    (d, 1),
                    z.as_ptr(),
                    (v, 1),
                    w.as_ptr(),
                    (d, 1),
                );
            }
            if let Some(dw) = dw.as_deref_mut() {
                matmul_acc(
                    (v, d, n),
                    dw.as_mut_ptr(),
                    (d, 1),
                    z.as_ptr(),
                    (1, v),
                    xc.as_ptr(),
                    (d, 1),
                    c > 0,
                );
            }
        }
    }
    losses.iter().map(|&l| l as f64).sum::<f64>() as f32
}

/// Elements per task of [`dropout_mask`].
const MASK_CHUNK: usize = 1 << 14;

/// Inverted dropout's mask: element i is 0 when the i-th uniform draw of the generator
/// starting at `start` is below `p`, else `1 / (1 − p)` — the values sequential draws of
/// [`super::rng::Rng::next_f64`] give, filled in parallel (each chunk starts its own copy of
/// the generator where the sequence would be). The CUDA kernel computes the same bits.
pub fn dropout_mask(start: u64, p: f64, out: &mut [f32]) {
    let keep = (1.0 / (1.0 - p)) as f32;
    out.par_chunks_mut(MASK_CHUNK)
        .enumerate()
        .for_each(|(c, chunk)| {
            let mut rng = super::rng::Rng::new(start);
            rng.skip((c * MASK_CHUNK) as u64);
            for v in chunk {
                *v = if rng.next_f64() < p { 0.0 } else { keep };
            }
        });
}
