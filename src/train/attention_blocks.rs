//! Causal blocks for attention computed as batched matrix products (the GPU path of
//! `train::cuda`). Query rows are cut into blocks and each block runs on its own: scores,
//! masked softmax, products. Two gains:
//! - each block's products stop at the last key that any of its rows may see, so most of the
//!   products above the diagonal — close to half of the T×S work at training lengths — are
//!   never computed, and the softmax kernels stop at the same bound;
//! - the scores, probabilities and their gradients exist for one block of rows at a time
//!   (`items × rows × S`), not for all T rows: at T = 4096 an eighth of the T×S buffers.
//!   The keys' gradients are summed over the blocks in f32.
//!
//! The plan is a list of [`Step`]s with plain offset arithmetic, kept apart from the device
//! so that the CPU tests run it (with a reference product and the kernels' index arithmetic)
//! against plain attention: the offsets are where such code goes wrong.
//!
//! Layouts, per head (batch item `0..B·H`, heads already split), row-major and contiguous per
//! item: queries-like `(T, D)`, keys-like `(S, D)`; a block's scores-like buffers are
//! `(rows, S)` per item, with only the block's keys written.

// Only the CUDA build runs the plan outside the tests.
#![cfg_attr(not(feature = "cuda"), allow(dead_code))]

use std::sync::atomic::{AtomicUsize, Ordering};

use crate::train::kernels::attention::Dims;

/// The block size [`set_block_rows`] chose; `AUTO` for [`block_rows`]'s choice.
static BLOCK_ROWS: AtomicUsize = AtomicUsize::new(AUTO);
const AUTO: usize = usize::MAX;

/// Sets the query rows per causal block for this process's GPU attention: `None` for the
/// automatic size, `Some(0)` for no skipping (one block: the whole T×S products). For
/// benchmarks that measure the skipping against the whole products in one run.
pub fn set_block_rows(rows: Option<usize>) {
    BLOCK_ROWS.store(rows.unwrap_or(AUTO), Ordering::Relaxed);
}

/// One matrix operand of a [`Product`]: the buffer, the element offset of the first batch
/// item's matrix, its leading dimension (row-major) and the element stride between items.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Operand<B> {
    pub buf: B,
    pub offset: usize,
    pub ld: usize,
    pub stride: usize,
}

/// A row-major strided batched product `C = op(A)·op(B)` (`op(A)` m×k, `op(B)` k×n, C m×n;
/// `trans` says which operands are read transposed), added to C when `accumulate`, as
/// `train::cuda`'s gemm takes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Product<B> {
    pub trans: (bool, bool),
    pub mnk: (usize, usize, usize),
    pub a: Operand<B>,
    pub b: Operand<B>,
    pub c: Operand<B>,
    pub batch: usize,
    pub accumulate: bool,
}

/// One step of the plan, run in order on one stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Step<B> {
    Product(Product<B>),
    /// The phase's masked-softmax kernel (`attn_softmax_fwd` or `_bwd`) over query rows
    /// `first_row..first_row + rows` of every item, whose scores-like buffers hold those rows
    /// (`(items, rows, S)`), for keys `0..keys_end`.
    Softmax {
        first_row: usize,
        rows: usize,
        keys_end: usize,
    },
    /// Sets the first `len` elements of the buffer to zero.
    Zero {
        buf: B,
        len: usize,
    },
}

/// The buffers of the forward: the heads' q, k, v and output, and the block scratch.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Forward<B> {
    pub q: B,
    pub k: B,
    pub v: B,
    pub out: B,
    /// f32 scores of one block.
    pub scores: B,
    /// Probabilities of one block, in the compute type.
    pub p: B,
}

/// The buffers of the backward.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Backward<B> {
    pub q: B,
    pub k: B,
    pub v: B,
    pub d_out: B,
    /// f32 scores and dP = dO·Vᵀ of one block.
    pub scores: B,
    pub dp: B,
    /// P and dS of one block, in the compute type.
    pub p: B,
    pub ds: B,
    /// dQ in the compute type; dK and dV in f32 (summed over the blocks).
    pub dq: B,
    pub dk: B,
    pub dv: B,
}

/// Query rows per block at length `t`: at least 128 (smaller products run below the GPU's
/// rate), at most 8 blocks (each block is one more launch per product), in multiples of 64.
/// `crate::estimate` has a copy of this rule (the daemon estimates VRAM without the training
/// engine); a test here checks that the two agree.
fn block_rows(t: usize) -> usize {
    t.div_ceil(8).next_multiple_of(64).max(128)
}

/// The causal blocking of one attention call.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Blocks {
    /// Batch items (`B·H`).
    items: usize,
    t: usize,
    s: usize,
    d: usize,
    start: usize,
    /// Query rows per block.
    rows: usize,
}

impl Blocks {
    /// The blocking of `m` at the size [`set_block_rows`] chose.
    pub(crate) fn new(m: &Dims) -> Self {
        Self::with_setting(m, BLOCK_ROWS.load(Ordering::Relaxed))
    }

    /// `setting`: rows per block, `AUTO`, or 0 for one block.
    fn with_setting(m: &Dims, setting: usize) -> Self {
        Blocks {
            items: m.b * m.h,
            t: m.t,
            s: m.s,
            d: m.d,
            start: m.start,
            rows: match setting {
                AUTO => block_rows(m.t),
                0 => m.t.max(1),
                n => n,
            },
        }
    }

    /// Elements of each block scratch buffer (scores, dP, P, dS).
    pub(crate) fn scratch_len(&self) -> usize {
        self.items * self.rows.min(self.t) * self.s
    }

    /// One past the last key computed for the block of query row `i`: the last key its rows
    /// may see (causality). Keys that no query sees keep the zero gradients the backward
    /// starts from.
    fn keys_end(&self, i: usize) -> usize {
        let block_end = ((i / self.rows + 1) * self.rows).min(self.t);
        self.s.min(self.start + block_end)
    }

    /// `(first row, rows, keys end)` of each block.
    fn row_blocks(&self) -> impl Iterator<Item = (usize, usize, usize)> + '_ {
        (0..self.t)
            .step_by(self.rows)
            .map(|r0| (r0, self.rows.min(self.t - r0), self.keys_end(r0)))
    }

    fn rows_like<B>(&self, buf: B, first_row: usize) -> Operand<B> {
        Operand {
            buf,
            offset: first_row * self.d,
            ld: self.d,
            stride: self.t * self.d,
        }
    }

    fn keys_like<B>(&self, buf: B) -> Operand<B> {
        Operand {
            buf,
            offset: 0,
            ld: self.d,
            stride: self.s * self.d,
        }
    }

    /// A block buffer of `rows` rows per item.
    fn block_like<B>(&self, buf: B, rows: usize) -> Operand<B> {
        Operand {
            buf,
            offset: 0,
            ld: self.s,
            stride: rows * self.s,
        }
    }

    /// `C = X·Yᵀ` for one block's rows over its keys: the scores `Q·Kᵀ`, or `dP = dO·Vᵀ`.
    fn block_scores<B>(&self, (r0, rows, e): (usize, usize, usize), x: B, y: B, c: B) -> Step<B> {
        Step::Product(Product {
            trans: (false, true),
            mnk: (rows, e, self.d),
            a: self.rows_like(x, r0),
            b: self.keys_like(y),
            c: self.block_like(c, rows),
            batch: self.items,
            accumulate: false,
        })
    }

    /// `O = P·Y` for one block's rows over its keys: the output `P·V`, or `dQ = dS·K`.
    fn block_rows_out<B>(&self, (r0, rows, e): (usize, usize, usize), p: B, y: B, o: B) -> Step<B> {
        Step::Product(Product {
            trans: (false, false),
            mnk: (rows, self.d, e),
            a: self.block_like(p, rows),
            b: self.keys_like(y),
            c: self.rows_like(o, r0),
            batch: self.items,
            accumulate: false,
        })
    }

    /// `dY += Pᵀ·X` for one block's keys from its rows: `dV += Pᵀ·dO`, or `dK += dSᵀ·Q`.
    fn block_keys_grad<B>(
        &self,
        (r0, rows, e): (usize, usize, usize),
        p: B,
        x: B,
        dy: B,
    ) -> Step<B> {
        Step::Product(Product {
            trans: (true, false),
            mnk: (e, self.d, rows),
            a: self.block_like(p, rows),
            b: self.rows_like(x, r0),
            c: self.keys_like(dy),
            batch: self.items,
            accumulate: true,
        })
    }

    fn softmax<B>(&self, (first_row, rows, keys_end): (usize, usize, usize)) -> Step<B> {
        Step::Softmax {
            first_row,
            rows,
            keys_end,
        }
    }

    /// The forward: per block, scores, softmax (which writes the rows' log-sum-exps), P·V.
    pub(crate) fn forward<B: Copy>(&self, f: Forward<B>) -> Vec<Step<B>> {
        let mut steps = Vec::new();
        for blk in self.row_blocks() {
            steps.push(self.block_scores(blk, f.q, f.k, f.scores));
            steps.push(self.softmax(blk));
            steps.push(self.block_rows_out(blk, f.p, f.v, f.out));
        }
        steps
    }

    /// The backward: dK and dV zeroed, then per block the recomputed scores, dP, softmax
    /// backward (P and dS), and dV, dQ, dK.
    pub(crate) fn backward<B: Copy>(&self, g: Backward<B>) -> Vec<Step<B>> {
        let keys = self.items * self.s * self.d;
        let mut steps = vec![
            Step::Zero {
                buf: g.dk,
                len: keys,
            },
            Step::Zero {
                buf: g.dv,
                len: keys,
            },
        ];
        for blk in self.row_blocks() {
            steps.push(self.block_scores(blk, g.q, g.k, g.scores));
            steps.push(self.block_scores(blk, g.d_out, g.v, g.dp));
            steps.push(self.softmax(blk));
            steps.push(self.block_keys_grad(blk, g.p, g.d_out, g.dv));
            steps.push(self.block_rows_out(blk, g.ds, g.k, g.dq));
            steps.push(self.block_keys_grad(blk, g.ds, g.q, g.dk));
        }
        steps
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::attention_device::{
        AttentionDevice, SoftmaxBlock, SoftmaxBwdBufs, SoftmaxFwdBufs,
    };
    use crate::train::kernel_emulator as emulated;
    use crate::train::kernels::attention::allowed;

    /// The buffers of one attention call, by name (an index into the host buffers).
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Buf {
        Q,
        K,
        V,
        O,
        DO,
        Scores,
        DP,
        P,
        DS,
        DQ,
        DK,
        DV,
    }

    const FORWARD: Forward<Buf> = Forward {
        q: Buf::Q,
        k: Buf::K,
        v: Buf::V,
        out: Buf::O,
        scores: Buf::Scores,
        p: Buf::P,
    };
    const BACKWARD: Backward<Buf> = Backward {
        q: Buf::Q,
        k: Buf::K,
        v: Buf::V,
        d_out: Buf::DO,
        scores: Buf::Scores,
        dp: Buf::DP,
        p: Buf::P,
        ds: Buf::DS,
        dq: Buf::DQ,
        dk: Buf::DK,
        dv: Buf::DV,
    };

    /// Element `(row, col)` of batch item `item`'s matrix of operand `o` (transposed: of its
    /// transpose) in `x`.
    fn element(x: &[f32], o: &Operand<Buf>, trans: bool, item: usize, at: (usize, usize)) -> f32 {
        let (r, c) = if trans { (at.1, at.0) } else { at };
        x[o.offset + item * o.stride + r * o.ld + c]
    }

    /// A product on host buffers with the device wrapper's semantics.
    fn product(bufs: &mut [Vec<f32>; 12], pr: &Product<Buf>) {
        let (m, n, k) = pr.mnk;
        for item in 0..pr.batch {
            let mut c = vec![0.0f64; m * n];
            {
                let a = &bufs[pr.a.buf as usize];
                let b = &bufs[pr.b.buf as usize];
                let at = |i, l| element(a, &pr.a, pr.trans.0, item, (i, l));
                let bt = |l, j| element(b, &pr.b, pr.trans.1, item, (l, j));
                for i in 0..m {
                    for j in 0..n {
                        c[i * n + j] = (0..k).map(|l| at(i, l) as f64 * bt(l, j) as f64).sum();
                    }
                }
            }
            let cb = &mut bufs[pr.c.buf as usize];
            for i in 0..m {
                for j in 0..n {
                    let x = &mut cb[pr.c.offset + item * pr.c.stride + i * pr.c.ld + j];
                    let prev = if pr.accumulate { *x as f64 } else { 0.0 };
                    *x = (prev + c[i * n + j]) as f32;
                }
            }
        }
    }

    /// Runs a plan on host buffers; `softmax(bufs, first_row, rows, keys_end)` stands for
    /// the phase's kernel.
    fn run(
        bufs: &mut [Vec<f32>; 12],
        steps: &[Step<Buf>],
        mut softmax: impl FnMut(&mut [Vec<f32>; 12], usize, usize, usize),
    ) {
        for step in steps {
            match *step {
                Step::Product(pr) => product(bufs, &pr),
                Step::Softmax {
                    first_row,
                    rows,
                    keys_end,
                } => softmax(bufs, first_row, rows, keys_end),
                Step::Zero { buf, len } => bufs[buf as usize][..len].fill(0.0),
            }
        }
    }

    /// Forward and backward through the plan, with the softmax steps run by the CUDA kernels
    /// themselves (`attn_softmax_fwd`/`_bwd` of `kernels.cu`, in the CPU emulator, launched as
    /// `train::cuda` launches them), every buffer not an input starting as NaN like
    /// uninitialised device memory. Returns O, dQ, dK, dV.
    fn blocked(
        m: &Dims,
        blocks: Blocks,
        (q, k, v, d_out): (&[f32], &[f32], &[f32], &[f32]),
    ) -> [Vec<f32>; 4] {
        let items = m.b * m.h;
        let (nq, nk, ns) = (items * m.t * m.d, items * m.s * m.d, blocks.scratch_len());
        let nan = |n: usize| vec![f32::NAN; n];
        let mut bufs = [
            q.to_vec(),
            k.to_vec(),
            v.to_vec(),
            nan(nq),
            d_out.to_vec(),
            nan(ns),
            nan(ns),
            nan(ns),
            nan(ns),
            nan(nq),
            nan(nk),
            nan(nk),
        ];
        let mut lse = nan(items * m.t);
        let dev = emulated::HostAttention::<f32>::new();
        let block = |r0, rows, keys_end| SoftmaxBlock {
            dims: *m,
            r0,
            rows,
            keys_end,
        };
        let lse_p = lse.as_mut_ptr() as u64;
        run(&mut bufs, &blocks.forward(FORWARD), |bufs, r0, rows, e| {
            let x = SoftmaxFwdBufs {
                scores: bufs[Buf::Scores as usize].as_ptr() as u64,
                p: bufs[Buf::P as usize].as_mut_ptr() as u64,
                lse: lse_p,
            };
            dev.softmax_fwd(x, block(r0, rows, e)).unwrap();
        });
        let out = bufs[Buf::O as usize].clone();
        for b in [Buf::Scores, Buf::P] {
            bufs[b as usize] = nan(ns);
        }
        run(
            &mut bufs,
            &blocks.backward(BACKWARD),
            |bufs, r0, rows, e| {
                let x = SoftmaxBwdBufs {
                    scores: bufs[Buf::Scores as usize].as_ptr() as u64,
                    dp: bufs[Buf::DP as usize].as_ptr() as u64,
                    lse: lse_p,
                    d_out: bufs[Buf::DO as usize].as_ptr() as u64,
                    out: out.as_ptr() as u64,
                    p: bufs[Buf::P as usize].as_mut_ptr() as u64,
                    ds: bufs[Buf::DS as usize].as_mut_ptr() as u64,
                };
                dev.softmax_bwd(x, block(r0, rows, e)).unwrap();
            },
        );
        let [.., dq, dk, dv] = bufs;
        [out, dq, dk, dv]
    }

    /// Plain attention per head, in f64, with its gradients: O, dQ, dK, dV.
    fn reference(m: &Dims, (q, k, v, d_out): (&[f32], &[f32], &[f32], &[f32])) -> [Vec<f32>; 4] {
        let (t, s, d) = (m.t, m.s, m.d);
        let scale = 1.0 / (d as f64).sqrt();
        let items = m.b * m.h;
        let mut res = [
            vec![0.0f32; items * t * d],
            vec![0.0f32; items * t * d],
            vec![0.0f32; items * s * d],
            vec![0.0f32; items * s * d],
        ];
        for it in 0..items {
            let (qo, ko) = (it * t * d, it * s * d);
            let mut dk = vec![0.0f64; s * d];
            let mut dv = vec![0.0f64; s * d];
            for i in 0..t {
                let keys: Vec<usize> = (0..s)
                    .filter(|&j| allowed(i, j, m.start, m.window))
                    .collect();
                let sc: Vec<f64> = keys
                    .iter()
                    .map(|&j| {
                        (0..d)
                            .map(|c| q[qo + i * d + c] as f64 * k[ko + j * d + c] as f64)
                            .sum::<f64>()
                            * scale
                    })
                    .collect();
                let mx = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = sc.iter().map(|x| (x - mx).exp()).sum();
                let p: Vec<f64> = sc.iter().map(|x| (x - mx).exp() / z).collect();
                let dor = |c: usize| d_out[qo + i * d + c] as f64;
                let dp: Vec<f64> = keys
                    .iter()
                    .map(|&j| (0..d).map(|c| dor(c) * v[ko + j * d + c] as f64).sum())
                    .collect();
                let dot: f64 = p.iter().zip(&dp).map(|(a, b)| a * b).sum();
                for c in 0..d {
                    let o: f64 = keys
                        .iter()
                        .zip(&p)
                        .map(|(&j, pj)| pj * v[ko + j * d + c] as f64)
                        .sum();
                    res[0][qo + i * d + c] = o as f32;
                    let dq: f64 = keys
                        .iter()
                        .enumerate()
                        .map(|(n, &j)| p[n] * (dp[n] - dot) * scale * k[ko + j * d + c] as f64)
                        .sum();
                    res[1][qo + i * d + c] = dq as f32;
                }
                for (n, &j) in keys.iter().enumerate() {
                    let ds = p[n] * (dp[n] - dot) * scale;
                    for c in 0..d {
                        dk[j * d + c] += ds * q[qo + i * d + c] as f64;
                        dv[j * d + c] += p[n] * dor(c);
                    }
                }
            }
            for (dst, src) in [(2, &dk), (3, &dv)] {
                for (x, y) in res[dst][ko..ko + s * d].iter_mut().zip(src.iter()) {
                    *x = *y as f32;
                }
            }
        }
        res
    }

    /// Checks the automatic blocking of `m`, and the whole products and 32-row blocks.
    fn check(m: Dims) {
        for setting in [AUTO, 0, 32] {
            check_blocks(&m, Blocks::with_setting(&m, setting));
        }
    }

    fn check_blocks(m: &Dims, blocks: Blocks) {
        let items = m.b * m.h;
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut draw = |n: usize| -> Vec<f32> {
            (0..n)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    (seed >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
                })
                .collect()
        };
        let q = draw(items * m.t * m.d);
        let k = draw(items * m.s * m.d);
        let v = draw(items * m.s * m.d);
        let d_out = draw(items * m.t * m.d);
        let inputs = (&q[..], &k[..], &v[..], &d_out[..]);
        let got = blocked(m, blocks, inputs);
        let want = reference(m, inputs);
        for (name, (g, w)) in ["out", "dq", "dk", "dv"].iter().zip(got.iter().zip(&want)) {
            for (n, (a, b)) in g.iter().zip(w).enumerate() {
                assert!(
                    (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                    "{m:?}, {} rows per block: {name}[{n}] = {a}, plain attention gives {b}",
                    blocks.rows
                );
            }
        }
    }

    fn dims(t: usize, s: usize, start: usize, window: Option<usize>) -> Dims {
        Dims {
            b: 2,
            t,
            h: 2,
            s,
            kv: 2,
            d: 4,
            start,
            window,
        }
    }

    #[test]
    fn blocked_products_match_plain_attention() {
        // One block; several whole blocks; a short last block.
        check(dims(96, 96, 0, None));
        check(dims(256, 256, 0, None));
        check(dims(300, 300, 0, None));
        // Keys before the first query (a prefix), and keys no query sees (zero gradients).
        check(dims(300, 340, 17, None));
        check(dims(260, 300, 0, None));
        check(dims(256, 300, 0, None));
        // A sliding window: rows masked below as well.
        check(dims(300, 300, 0, Some(100)));
    }

    /// Multiply-adds of a plan's products.
    fn work(steps: &[Step<u8>]) -> usize {
        steps
            .iter()
            .map(|s| match s {
                Step::Product(p) => p.mnk.0 * p.mnk.1 * p.mnk.2,
                _ => 0,
            })
            .sum()
    }

    fn fwd(b: &Blocks) -> Vec<Step<u8>> {
        b.forward(Forward {
            q: 0,
            k: 1,
            v: 2,
            out: 3,
            scores: 4,
            p: 5,
        })
    }

    fn bwd(b: &Blocks) -> Vec<Step<u8>> {
        b.backward(Backward {
            q: 0,
            k: 1,
            v: 2,
            d_out: 3,
            scores: 4,
            dp: 5,
            p: 6,
            ds: 7,
            dq: 8,
            dk: 9,
            dv: 10,
        })
    }

    #[test]
    fn blocks_skip_the_upper_triangle_and_hold_one_block() {
        let m = dims(512, 512, 0, None);
        let blocks = Blocks::new(&m);
        assert_eq!(blocks.rows, 128);
        // Two T×S×D products forward, five backward; with 4 blocks, 1 + 2 + 3 + 4 of 16 parts.
        let full = 512 * 512 * 4;
        assert_eq!(work(&fwd(&blocks)), 2 * full * 10 / 16);
        assert_eq!(work(&bwd(&blocks)), 5 * full * 10 / 16);
        // Scratch of one block of rows.
        assert_eq!(blocks.scratch_len(), m.b * m.h * 128 * 512);
        assert_eq!(Blocks::new(&dims(4096, 4096, 0, None)).rows, 512);
        assert_eq!(Blocks::new(&dims(64, 64, 0, None)).rows, 128);
        assert_eq!(
            Blocks::new(&dims(64, 64, 0, None)).scratch_len(),
            m.b * m.h * 64 * 64
        );
        // No skipping: one block of all rows, the whole T×S products.
        let whole = Blocks::with_setting(&m, 0);
        assert_eq!(whole.rows, 512);
        assert_eq!(work(&fwd(&whole)), 2 * full);
        assert_eq!(work(&bwd(&whole)), 5 * full);
        assert_eq!(whole.scratch_len(), m.b * m.h * 512 * 512);
        let softmaxes = |steps: Vec<Step<u8>>| {
            steps
                .iter()
                .filter(|s| matches!(s, Step::Softmax { .. }))
                .count()
        };
        assert_eq!(softmaxes(fwd(&Blocks::with_setting(&m, 64))), 8);
    }

    /// The VRAM estimate (which the daemon computes without the training engine) uses the
    /// same rows per block, at every length.
    #[test]
    fn the_vram_estimate_uses_the_plans_block_rows() {
        for t in [
            1, 2, 64, 127, 128, 129, 300, 512, 1000, 1025, 4096, 32768, 131072,
        ] {
            let rows = block_rows(t).min(t) as u64;
            assert_eq!(
                crate::estimate::attention_block_rows(t as u64),
                rows,
                "{t} tokens"
            );
        }
    }
}
