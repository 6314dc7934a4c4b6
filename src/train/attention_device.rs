//! Causal attention's forward and backward as the sequence of device calls the GPU runs: the
//! head copies between the projections' layout `(B, T, heads·D)` and the heads' `(B·H, T, D)`,
//! then the plan of [`super::attention_blocks`] (cuBLAS's batched products, the masked-softmax
//! kernels, the zeroing of the dK/dV sums), then the copies back. It is written once, over the
//! [`AttentionDevice`] trait: `train::cuda` implements the trait with cuBLAS and `kernels.cu`,
//! and the kernel emulator's tests implement it on the host with the same kernels and a host
//! product of cuBLAS's column-major interface. So the whole sequence (buffer sizes, offsets,
//! the row-major to column-major mapping, every launch's arguments) is tested without a GPU.

use candle_core::Result;

use super::attention_blocks::{Backward, Blocks, Forward, Operand, Step};
use super::kernels::attention::Dims;
use super::op_times::timed;

/// The element type of a buffer: the call's compute type (f32 or bf16), or f32.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Elem {
    Compute,
    F32,
}

/// A matrix operand of cuBLAS's strided batched product: address, leading dimension, batch
/// stride (in elements).
pub(crate) type Matrix = (u64, usize, usize);

/// One `cublasGemmStridedBatchedEx` call, column-major: `C = op(A)·op(B) + β·C` for each of
/// `batch` items, op(A) m×k, op(B) k×n; A and B in the compute type, C in f32 when `c_f32`
/// (accumulation in f32).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct ColumnMajorGemm {
    pub trans_a: bool,
    pub trans_b: bool,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub a: Matrix,
    pub b: Matrix,
    pub c: Matrix,
    pub c_f32: bool,
    pub batch: usize,
    pub beta: f32,
}

impl ColumnMajorGemm {
    /// The call computing the row-major `C = op(A)·op(B) + β·C` (op(A) m×k, op(B) k×n): the
    /// column-major view of a row-major matrix is its transpose, so it computes
    /// `Cᵀ = op(B)ᵀ·op(A)ᵀ`, with the operands swapped.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn row_major(
        (trans_a, trans_b): (bool, bool),
        (m, n, k): (usize, usize, usize),
        a: Matrix,
        b: Matrix,
        c: Matrix,
        c_f32: bool,
        batch: usize,
        beta: f32,
    ) -> Self {
        ColumnMajorGemm {
            trans_a: trans_b,
            trans_b: trans_a,
            m: n,
            n: m,
            k,
            a: b,
            b: a,
            c,
            c_f32,
            batch,
            beta,
        }
    }
}

/// The arguments of `attn_softmax_fwd` / `_bwd` besides their buffers: one block of query rows
/// `r0..r0 + rows` of every item, keys `0..keys_end`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SoftmaxBlock {
    pub dims: Dims,
    pub r0: usize,
    pub rows: usize,
    pub keys_end: usize,
}

/// Buffers of the forward softmax: scores (f32) in, P (compute type) and the rows'
/// log-sum-exps (f32, `(B·H, T)`) out.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SoftmaxFwdBufs {
    pub scores: u64,
    pub p: u64,
    pub lse: u64,
}

/// Buffers of the backward softmax: scores and dP (f32), the log-sum-exps, dO and O (compute
/// type, `(B·H, T, D)`) in; P and dS (compute type) out.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SoftmaxBwdBufs {
    pub scores: u64,
    pub dp: u64,
    pub lse: u64,
    pub d_out: u64,
    pub out: u64,
    pub p: u64,
    pub ds: u64,
}

/// What attention needs from a device. Addresses are plain integers into buffers the caller
/// keeps alive; every call is queued in order (one stream).
pub(crate) trait AttentionDevice {
    /// An owned buffer.
    type Buf;
    /// Bytes per element of the compute type.
    fn compute_size(&self) -> usize;
    /// A buffer of `n` elements whose contents are undefined.
    fn alloc(&self, elem: Elem, n: usize) -> Result<Self::Buf>;
    fn addr(&self, buf: &Self::Buf) -> u64;
    fn gemm(&self, g: &ColumnMajorGemm) -> Result<()>;
    /// Sets `len` f32 at `addr` to zero.
    fn zero_f32(&self, addr: u64, len: usize) -> Result<()>;
    /// `heads_split`: `(B, t, hs·D)` at `src` → `(B, H, t, D)` at `dst`.
    fn split_heads(&self, src: u64, dst: u64, m: &Dims, t: usize, hs: usize) -> Result<()>;
    /// `heads_merge` (from the compute type, or from f32 when `from_f32`): `(B, H, t, D)` →
    /// `(B, t, hd·D)`, summing each group's H/hd heads.
    fn merge_heads(&self, src: (u64, bool), dst: u64, m: &Dims, t: usize, hd: usize) -> Result<()>;
    fn softmax_fwd(&self, bufs: SoftmaxFwdBufs, block: SoftmaxBlock) -> Result<()>;
    fn softmax_bwd(&self, bufs: SoftmaxBwdBufs, block: SoftmaxBlock) -> Result<()>;
}

/// The labels under which `--op-times` records the parts of one attention call (inside the
/// whole op's own label; the bench keeps parts out of its total).
struct Parts {
    /// The copies between the projections' layout and the heads' (split and merge).
    heads: &'static str,
    /// The batched products, and the zeroing of the accumulated dK/dV.
    products: &'static str,
    /// The masked softmax kernels.
    softmax: &'static str,
}

const FORWARD_PARTS: Parts = Parts {
    heads: "attention › heads copies",
    products: "attention › products",
    softmax: "attention › softmax",
};

const BACKWARD_PARTS: Parts = Parts {
    heads: "attention bwd › heads copies",
    products: "attention bwd › products",
    softmax: "attention bwd › softmax",
};

/// Runs a plan of [`Blocks`] for a call of `dims`: products with A and B in the compute type
/// (offsets in its elements), C in f32 when it is one of `f32_outputs`; `softmax(block)` for
/// the phase's softmax; zeroed buffers are f32.
fn run_plan<D: AttentionDevice>(
    dev: &D,
    (plan, parts, dims): (&[Step<u64>], &Parts, Dims),
    f32_outputs: &[u64],
    softmax: impl Fn(SoftmaxBlock) -> Result<()>,
) -> Result<()> {
    let size = dev.compute_size();
    let at = |o: &Operand<u64>, size: usize| (o.buf + (o.offset * size) as u64, o.ld, o.stride);
    for step in plan {
        match *step {
            Step::Product(p) => {
                let c_f32 = f32_outputs.contains(&p.c.buf);
                let c = at(&p.c, if c_f32 { 4 } else { size });
                let beta = if p.accumulate { 1.0 } else { 0.0 };
                let (a, b) = (at(&p.a, size), at(&p.b, size));
                let g = ColumnMajorGemm::row_major(p.trans, p.mnk, a, b, c, c_f32, p.batch, beta);
                timed(parts.products, || dev.gemm(&g))?;
            }
            Step::Softmax {
                first_row,
                rows,
                keys_end,
            } => {
                let block = SoftmaxBlock {
                    dims,
                    r0: first_row,
                    rows,
                    keys_end,
                };
                timed(parts.softmax, || softmax(block))?
            }
            Step::Zero { buf, len } => timed(parts.products, || dev.zero_f32(buf, len))?,
        }
    }
    Ok(())
}

/// The forward of causal attention on `q` `(B, T, H·D)`, `k` and `v` `(B, S, kv·D)` (compute
/// type): the output `(B, T, H·D)` and the rows' log-sum-exps `(B·H·T)` in f32, kept for the
/// backward.
pub(crate) fn forward<D: AttentionDevice>(
    dev: &D,
    (q, k, v): (u64, u64, u64),
    m: Dims,
) -> Result<(D::Buf, D::Buf)> {
    let Dims {
        b, t, h, s, kv, d, ..
    } = m;
    let bh = b * h;
    let qh = dev.alloc(Elem::Compute, bh * t * d)?;
    let kh = dev.alloc(Elem::Compute, bh * s * d)?;
    let vh = dev.alloc(Elem::Compute, bh * s * d)?;
    let (qh_p, kh_p, vh_p) = (dev.addr(&qh), dev.addr(&kh), dev.addr(&vh));
    timed(FORWARD_PARTS.heads, || -> Result<()> {
        dev.split_heads(q, qh_p, &m, t, h)?;
        dev.split_heads(k, kh_p, &m, s, kv)?;
        dev.split_heads(v, vh_p, &m, s, kv)
    })?;
    let blocks = Blocks::new(&m);
    let scores = dev.alloc(Elem::F32, blocks.scratch_len())?;
    let p = dev.alloc(Elem::Compute, blocks.scratch_len())?;
    let oh = dev.alloc(Elem::Compute, bh * t * d)?;
    let lse = dev.alloc(Elem::F32, bh * t)?;
    let (sc_p, p_p, oh_p) = (dev.addr(&scores), dev.addr(&p), dev.addr(&oh));
    let bufs = SoftmaxFwdBufs {
        scores: sc_p,
        p: p_p,
        lse: dev.addr(&lse),
    };
    let plan = blocks.forward(Forward {
        q: qh_p,
        k: kh_p,
        v: vh_p,
        out: oh_p,
        scores: sc_p,
        p: p_p,
    });
    run_plan(dev, (&plan, &FORWARD_PARTS, m), &[sc_p], |block| {
        dev.softmax_fwd(bufs, block)
    })?;
    drop((scores, p));
    let out = dev.alloc(Elem::Compute, b * t * h * d)?;
    let out_p = dev.addr(&out);
    timed(FORWARD_PARTS.heads, || {
        dev.merge_heads((oh_p, false), out_p, &m, t, h)
    })?;
    Ok((out, lse))
}

/// The inputs of [`backward`]: q, k, v and the forward's output in their projections' layout,
/// the forward's log-sum-exps, and the output's gradient (compute type, contiguous).
#[derive(Debug, Clone, Copy)]
pub(crate) struct BackwardInputs {
    pub q: u64,
    pub k: u64,
    pub v: u64,
    pub out: u64,
    pub lse: u64,
    pub d_out: u64,
}

/// The backward of [`forward`]: dQ, dK and dV packed in one buffer of the compute type, in
/// that order, each in its input's layout.
pub(crate) fn backward<D: AttentionDevice>(dev: &D, x: BackwardInputs, m: Dims) -> Result<D::Buf> {
    let Dims {
        b, t, h, s, kv, d, ..
    } = m;
    let bh = b * h;
    let (nq, nk) = (b * t * h * d, b * s * kv * d);
    let size = dev.compute_size();
    let to_heads = |src: u64, len: usize, hs: usize| -> Result<D::Buf> {
        let buf = dev.alloc(Elem::Compute, bh * len * d)?;
        let dst = dev.addr(&buf);
        timed(BACKWARD_PARTS.heads, || {
            dev.split_heads(src, dst, &m, len, hs)
        })?;
        Ok(buf)
    };
    let qh = to_heads(x.q, t, h)?;
    let kh = to_heads(x.k, s, kv)?;
    let vh = to_heads(x.v, s, kv)?;
    let oh = to_heads(x.out, t, h)?;
    let doh = to_heads(x.d_out, t, h)?;
    let blocks = Blocks::new(&m);
    let n = blocks.scratch_len();
    let (scores, dp) = (dev.alloc(Elem::F32, n)?, dev.alloc(Elem::F32, n)?);
    let (p, ds) = (dev.alloc(Elem::Compute, n)?, dev.alloc(Elem::Compute, n)?);
    let dqh = dev.alloc(Elem::Compute, bh * t * d)?;
    // dK and dV are summed over the blocks, in f32 (the plan zeroes them first).
    let dkh = dev.alloc(Elem::F32, bh * s * d)?;
    let dvh = dev.alloc(Elem::F32, bh * s * d)?;
    let g = Backward {
        q: dev.addr(&qh),
        k: dev.addr(&kh),
        v: dev.addr(&vh),
        d_out: dev.addr(&doh),
        scores: dev.addr(&scores),
        dp: dev.addr(&dp),
        p: dev.addr(&p),
        ds: dev.addr(&ds),
        dq: dev.addr(&dqh),
        dk: dev.addr(&dkh),
        dv: dev.addr(&dvh),
    };
    let bufs = SoftmaxBwdBufs {
        scores: g.scores,
        dp: g.dp,
        lse: x.lse,
        d_out: g.d_out,
        out: dev.addr(&oh),
        p: g.p,
        ds: g.ds,
    };
    let f32_outputs = [g.scores, g.dp, g.dk, g.dv];
    let plan = blocks.backward(g);
    run_plan(dev, (&plan, &BACKWARD_PARTS, m), &f32_outputs, |block| {
        dev.softmax_bwd(bufs, block)
    })?;
    drop((scores, dp, p, ds, oh));
    let packed = dev.alloc(Elem::Compute, nq + 2 * nk)?;
    let base = dev.addr(&packed);
    timed(BACKWARD_PARTS.heads, || -> Result<()> {
        dev.merge_heads((g.dq, false), base, &m, t, h)?;
        dev.merge_heads((g.dk, true), base + (nq * size) as u64, &m, s, kv)?;
        dev.merge_heads((g.dv, true), base + ((nq + nk) * size) as u64, &m, s, kv)
    })?;
    Ok(packed)
}
