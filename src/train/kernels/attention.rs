//! Causal (optionally sliding-window) grouped-query attention on the CPU, flash-style: the
//! forward keeps only each query row's log-sum-exp, never the T×S scores or a mask, and the
//! backward recomputes the scores block by block.
//!
//! Tensors stay in the projections' `(B, T, heads, head_dim)` layout (no transposes): the
//! per-head matrices are read with strides by `gemm`, single-threaded inside one rayon task per
//! head (forward) or per key/value head (backward, which accumulates dK and dV over the query
//! heads that share it, so no two tasks write the same element and the sums keep a fixed
//! order).

use gemm::Parallelism;
use rayon::prelude::*;

use super::{exp, gemm_strided, simd, sum16};

/// Query rows per block: the scores of one block (`BLOCK × S` floats) live in a per-task
/// scratch buffer.
const BLOCK: usize = 64;

/// A raw pointer that rayon tasks share; each task writes a disjoint set of elements.
#[derive(Clone, Copy)]
struct SharedMut(*mut f32);
// SAFETY: tasks write disjoint elements and the buffer outlives the parallel section.
unsafe impl Send for SharedMut {}
unsafe impl Sync for SharedMut {}

impl SharedMut {
    /// The pointer (a method, so that closures capture the whole `Sync` wrapper).
    fn ptr(self) -> *mut f32 {
        self.0
    }
}

/// A raw pointer to data that rayon tasks only read.
#[derive(Clone, Copy)]
struct SharedConst(*const f32);
// SAFETY: the data is only read while the parallel section runs.
unsafe impl Send for SharedConst {}
unsafe impl Sync for SharedConst {}

impl SharedConst {
    fn ptr(self) -> *const f32 {
        self.0
    }
}

/// Whether query `i` (at position `start + i`) may attend key `j`.
#[inline]
pub fn allowed(i: usize, j: usize, start: usize, window: Option<usize>) -> bool {
    let qpos = start + i;
    j <= qpos && window.is_none_or(|w| qpos - j < w)
}

/// Sizes of one call.
#[derive(Debug, Clone, Copy)]
pub struct Dims {
    /// Batch.
    pub b: usize,
    /// Query positions.
    pub t: usize,
    /// Query heads.
    pub h: usize,
    /// Key/value positions (`start + t` at most).
    pub s: usize,
    /// Key/value heads (dividing `h`).
    pub kv: usize,
    /// Head dimension.
    pub d: usize,
    /// Position of the first query.
    pub start: usize,
    /// Sliding window: a query sees at most this many keys, itself included.
    pub window: Option<usize>,
}

impl Dims {
    /// Checks that the sizes fit together.
    pub fn check(&self) -> Result<(), String> {
        let ok = self.kv > 0
            && self.h.is_multiple_of(self.kv)
            && self.start + self.t <= self.s
            && self.window != Some(0);
        if ok {
            Ok(())
        } else {
            Err(format!("attention: inconsistent sizes {self:?}"))
        }
    }

    /// Offset of query row `(b, i, h)`.
    fn q_at(&self, b: usize, i: usize, h: usize) -> usize {
        ((b * self.t + i) * self.h + h) * self.d
    }

    /// Offset of key/value row `(b, j, kvh)`.
    fn k_at(&self, b: usize, j: usize, kvh: usize) -> usize {
        ((b * self.s + j) * self.kv + kvh) * self.d
    }

    /// Keys `[lo, hi)` that some query of `i0..i1` may attend.
    fn key_range(&self, i0: usize, i1: usize) -> (usize, usize) {
        let lo = match self.window {
            Some(w) => (self.start + i0 + 1).saturating_sub(w),
            None => 0,
        };
        (lo, (self.start + i1).min(self.s))
    }

    /// The keys query `i` may attend, as `[a, z)` relative to the block's first key `lo`.
    fn row_keys(&self, i: usize, lo: usize) -> (usize, usize) {
        let qpos = self.start + i;
        let first = match self.window {
            Some(w) => (qpos + 1).saturating_sub(w),
            None => 0,
        };
        (first - lo, qpos + 1 - lo)
    }

    fn scale(&self) -> f32 {
        1.0 / (self.d as f32).sqrt()
    }
}

/// [`super::gemm_strided`] on the calling thread: attention's tiles already run inside rayon
/// tasks.
#[allow(clippy::too_many_arguments)]
#[inline]
unsafe fn mm(
    mnk: (usize, usize, usize),
    dst: *mut f32,
    dst_s: (usize, usize),
    accumulate: bool,
    lhs: *const f32,
    lhs_s: (usize, usize),
    rhs: *const f32,
    rhs_s: (usize, usize),
    beta: f32,
) {
    // SAFETY: the caller passes pointers valid for the given shapes and strides.
    unsafe {
        gemm_strided(
            mnk,
            dst,
            dst_s,
            accumulate,
            lhs,
            lhs_s,
            rhs,
            rhs_s,
            beta,
            Parallelism::None,
        )
    }
}

/// Forward: returns the output `(B, T, H, D)` and the row log-sum-exps `(B, H, T)`.
/// `q` is `(B, T, H, D)`, `k` and `v` `(B, S, KV, D)`, all contiguous; sizes must pass
/// [`Dims::check`].
pub fn forward(q: &[f32], k: &[f32], v: &[f32], dm: Dims) -> (Vec<f32>, Vec<f32>) {
    let mut out = vec![0f32; q.len()];
    let mut lse = vec![0f32; dm.b * dm.h * dm.t];
    forward_into(q, k, v, dm, &mut out, &mut lse);
    (out, lse)
}

/// [`forward`] into the caller's buffers: `out` like `q`, `lse` `(B, H, T)`; both are
/// overwritten.
pub fn forward_into(q: &[f32], k: &[f32], v: &[f32], dm: Dims, out: &mut [f32], lse: &mut [f32]) {
    assert!(dm.check().is_ok() && q.len() == dm.b * dm.t * dm.h * dm.d);
    assert!(k.len() == dm.b * dm.s * dm.kv * dm.d && v.len() == k.len());
    let Dims { b, t, h, kv, d, .. } = dm;
    assert!(out.len() == q.len() && lse.len() == b * h * t);
    let (o_ptr, lse_ptr) = (SharedMut(out.as_mut_ptr()), SharedMut(lse.as_mut_ptr()));
    let (qp, kp, vp) = (
        SharedConst(q.as_ptr()),
        SharedConst(k.as_ptr()),
        SharedConst(v.as_ptr()),
    );
    let rep = h / kv;
    let scale = dm.scale();
    (0..b * h).into_par_iter().for_each(|bh| {
        simd(|| {
            let (bi, hi) = (bh / h, bh % h);
            let kvh = hi / rep;
            let mut scores = vec![0f32; BLOCK * dm.s];
            for i0 in (0..t).step_by(BLOCK) {
                let i1 = (i0 + BLOCK).min(t);
                let rows = i1 - i0;
                let (lo, hi_k) = dm.key_range(i0, i1);
                let nk = hi_k - lo;
                // SAFETY: offsets are within q/k/v/out (checked shapes); this task alone writes
                // the output rows of head `hi` in batch `bi` and their log-sum-exps.
                unsafe {
                    mm(
                        (rows, nk, d),
                        scores.as_mut_ptr(),
                        (nk, 1),
                        false,
                        qp.ptr().add(dm.q_at(bi, i0, hi)),
                        (h * d, 1),
                        kp.ptr().add(dm.k_at(bi, lo, kvh)),
                        (1, kv * d),
                        scale,
                    );
                }
                for r in 0..rows {
                    let row = &mut scores[r * nk..(r + 1) * nk];
                    let i = i0 + r;
                    let (a, z) = dm.row_keys(i, lo);
                    row[..a].fill(0.0);
                    row[z..].fill(0.0);
                    let valid = &mut row[a..z];
                    let m = valid.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    for x in valid.iter_mut() {
                        *x = exp(*x - m);
                    }
                    let sum = sum16(valid.len(), |j| valid[j]);
                    let inv = 1.0 / sum;
                    for x in valid.iter_mut() {
                        *x *= inv;
                    }
                    // SAFETY: see above.
                    unsafe { *lse_ptr.ptr().add((bi * h + hi) * t + i) = m + sum.ln() };
                }
                // SAFETY: see above.
                unsafe {
                    mm(
                        (rows, d, nk),
                        o_ptr.ptr().add(dm.q_at(bi, i0, hi)),
                        (h * d, 1),
                        false,
                        scores.as_ptr(),
                        (nk, 1),
                        vp.ptr().add(dm.k_at(bi, lo, kvh)),
                        (kv * d, 1),
                        1.0,
                    );
                }
            }
        })
    });
}

/// Backward from the forward's inputs, output `o`, its gradient `dout` and the row
/// log-sum-exps: returns the gradients of q, k and v, concatenated in that order.
pub fn backward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    o: &[f32],
    dout: &[f32],
    lse: &[f32],
    dm: Dims,
) -> Vec<f32> {
    let mut buf = vec![0f32; q.len() + 2 * k.len()];
    backward_into(q, k, v, o, dout, lse, dm, &mut buf);
    buf
}

/// [`backward`] into the caller's buffer `buf` (`len(q) + 2·len(k)`, overwritten): the
/// gradients of q, k and v, in that order.
#[allow(clippy::too_many_arguments)]
pub fn backward_into(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    o: &[f32],
    dout: &[f32],
    lse: &[f32],
    dm: Dims,
    buf: &mut [f32],
) {
    assert!(dm.check().is_ok() && q.len() == dm.b * dm.t * dm.h * dm.d);
    assert!(k.len() == dm.b * dm.s * dm.kv * dm.d && v.len() == k.len());
    assert!(o.len() == q.len() && dout.len() == q.len() && lse.len() == dm.b * dm.h * dm.t);
    let Dims { b, t, h, kv, d, .. } = dm;
    let (nq, nk_all) = (q.len(), k.len());
    assert!(buf.len() == nq + 2 * nk_all);
    // dq is written block by block; dk and dv are accumulated over the query heads.
    buf[nq..].par_chunks_mut(16384).for_each(|c| c.fill(0.0));
    let base = SharedMut(buf.as_mut_ptr());
    let (qp, kp, vp) = (
        SharedConst(q.as_ptr()),
        SharedConst(k.as_ptr()),
        SharedConst(v.as_ptr()),
    );
    let dop = SharedConst(dout.as_ptr());
    let rep = h / kv;
    let scale = dm.scale();
    (0..b * kv).into_par_iter().for_each(|bk| {
        simd(|| {
            let (bi, kvh) = (bk / kv, bk % kv);
            // SAFETY: the three gradients are disjoint ranges of `buf`.
            let (dq, dk, dv) =
                unsafe { (base.ptr(), base.ptr().add(nq), base.ptr().add(nq + nk_all)) };
            let mut p = vec![0f32; BLOCK * dm.s];
            let mut dp = vec![0f32; BLOCK * dm.s];
            let mut delta = [0f32; BLOCK];
            for hi in kvh * rep..(kvh + 1) * rep {
                for i0 in (0..t).step_by(BLOCK) {
                    let i1 = (i0 + BLOCK).min(t);
                    let rows = i1 - i0;
                    let (lo, hi_k) = dm.key_range(i0, i1);
                    let nk = hi_k - lo;
                    let q_blk = dm.q_at(bi, i0, hi);
                    let k_blk = dm.k_at(bi, lo, kvh);
                    // SAFETY (all blocks below): offsets are within the checked shapes; this task
                    // alone writes dq of the heads of `kvh` and dk/dv of `kvh` in batch `bi`.
                    unsafe {
                        mm(
                            (rows, nk, d),
                            p.as_mut_ptr(),
                            (nk, 1),
                            false,
                            qp.ptr().add(q_blk),
                            (h * d, 1),
                            kp.ptr().add(k_blk),
                            (1, kv * d),
                            scale,
                        );
                    }
                    for r in 0..rows {
                        let i = i0 + r;
                        let l = lse[(bi * h + hi) * t + i];
                        let (a, z) = dm.row_keys(i, lo);
                        let row = &mut p[r * nk..(r + 1) * nk];
                        row[..a].fill(0.0);
                        row[z..].fill(0.0);
                        for x in row[a..z].iter_mut() {
                            *x = exp(*x - l);
                        }
                        let at = dm.q_at(bi, i, hi);
                        delta[r] = sum16(d, |c| dout[at + c] * o[at + c]);
                    }
                    unsafe {
                        // dV += Pᵀ · dO
                        mm(
                            (nk, d, rows),
                            dv.add(k_blk),
                            (kv * d, 1),
                            true,
                            p.as_ptr(),
                            (1, nk),
                            dop.ptr().add(q_blk),
                            (h * d, 1),
                            1.0,
                        );
                        // dP = dO · Vᵀ
                        mm(
                            (rows, nk, d),
                            dp.as_mut_ptr(),
                            (nk, 1),
                            false,
                            dop.ptr().add(q_blk),
                            (h * d, 1),
                            vp.ptr().add(k_blk),
                            (1, kv * d),
                            1.0,
                        );
                    }
                    // dS = P ∘ (dP − rowsum(dO ∘ O)); masked entries have P = 0.
                    for r in 0..rows {
                        let pr = &p[r * nk..(r + 1) * nk];
                        let dr = &mut dp[r * nk..(r + 1) * nk];
                        for j in 0..nk {
                            dr[j] = pr[j] * (dr[j] - delta[r]);
                        }
                    }
                    unsafe {
                        // dQ = scale · dS · K
                        mm(
                            (rows, d, nk),
                            dq.add(q_blk),
                            (h * d, 1),
                            false,
                            dp.as_ptr(),
                            (nk, 1),
                            kp.ptr().add(k_blk),
                            (kv * d, 1),
                            scale,
                        );
                        // dK += scale · dSᵀ · Q
                        mm(
                            (nk, d, rows),
                            dk.add(k_blk),
                            (kv * d, 1),
                            true,
                            dp.as_ptr(),
                            (1, nk),
                            qp.ptr().add(q_blk),
                            (h * d, 1),
                            scale,
                        );
                    }
                }
            }
        })
    });
}
