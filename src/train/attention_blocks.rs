//! Causal block skipping for attention computed as batched matrix products (the GPU path of
//! `train::cuda`). Query rows are cut into blocks; each block's products stop at the last key
//! that any of its rows may see, so most of the products above the diagonal — close to half
//! of the T×S work at training lengths — are never computed, and the masked-softmax kernels
//! stop at the same bound.
//!
//! The plan is plain arithmetic on element offsets, kept apart from the device so that the
//! CPU tests run it (with a reference product and the kernels' bounds) against plain
//! attention: the offsets are where such a change goes wrong.
//!
//! Layouts, per head (batch item `0..B·H`, heads already split): queries-like `(T, D)`,
//! keys-like `(S, D)`, scores-like `(T, S)`, all row-major and contiguous per item.

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
/// `trans` says which operands are read transposed), as `train::cuda`'s gemm takes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Product<B> {
    pub trans: (bool, bool),
    pub mnk: (usize, usize, usize),
    pub a: Operand<B>,
    pub b: Operand<B>,
    pub c: Operand<B>,
    pub batch: usize,
}

/// Query rows per block at length `t`: at least 128 (smaller products run below the GPU's
/// rate), at most 8 blocks (each block is one more launch per product), in multiples of 64.
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

    /// Query rows per block, as the softmax kernels take it.
    pub(crate) fn block_rows(&self) -> usize {
        self.rows
    }

    /// One past the last key whose score, probability and gradient are computed for query row
    /// `i`: the last key its block's rows may see (causality), and all `S` keys for the last
    /// block, so that keys no query sees still get zero gradients. The softmax kernels compute
    /// the same bound (`keys_end` in `kernels.cu`).
    pub(crate) fn keys_end(&self, i: usize) -> usize {
        let block_end = (i / self.rows + 1) * self.rows;
        if block_end >= self.t {
            self.s
        } else {
            self.s.min(self.start + block_end)
        }
    }

    /// `(first row, end row, keys end)` of each row block.
    fn row_blocks(&self) -> impl Iterator<Item = (usize, usize, usize)> + '_ {
        (0..self.t)
            .step_by(self.rows)
            .map(|r0| (r0, (r0 + self.rows).min(self.t), self.keys_end(r0)))
    }

    fn rows_like<B>(&self, buf: B, first_row: usize) -> Operand<B> {
        Operand {
            buf,
            offset: first_row * self.d,
            ld: self.d,
            stride: self.t * self.d,
        }
    }

    fn keys_like<B>(&self, buf: B, first_key: usize) -> Operand<B> {
        Operand {
            buf,
            offset: first_key * self.d,
            ld: self.d,
            stride: self.s * self.d,
        }
    }

    fn scores_like<B>(&self, buf: B, row: usize, key: usize) -> Operand<B> {
        Operand {
            buf,
            offset: row * self.s + key,
            ld: self.s,
            stride: self.t * self.s,
        }
    }

    /// `C = X·Yᵀ` over each row block's keys: the scores `Q·Kᵀ`, or `dP = dO·Vᵀ`.
    /// X `(T, D)`, Y `(S, D)`, C `(T, S)`.
    pub(crate) fn scores<B: Copy>(&self, x: B, y: B, c: B) -> Vec<Product<B>> {
        self.row_blocks()
            .map(|(r0, r1, e)| Product {
                trans: (false, true),
                mnk: (r1 - r0, e, self.d),
                a: self.rows_like(x, r0),
                b: self.keys_like(y, 0),
                c: self.scores_like(c, r0, 0),
                batch: self.items,
            })
            .collect()
    }

    /// `O = P·Y` over each row block's keys: the output `P·V`, or `dQ = dS·K`.
    /// P `(T, S)`, Y `(S, D)`, O `(T, D)`.
    pub(crate) fn rows_times_keys<B: Copy>(&self, p: B, y: B, o: B) -> Vec<Product<B>> {
        self.row_blocks()
            .map(|(r0, r1, e)| Product {
                trans: (false, false),
                mnk: (r1 - r0, self.d, e),
                a: self.scores_like(p, r0, 0),
                b: self.keys_like(y, 0),
                c: self.rows_like(o, r0),
                batch: self.items,
            })
            .collect()
    }

    /// `dY = Pᵀ·X` per block of keys, over the rows that see them: `dV = Pᵀ·dO`, or
    /// `dK = dSᵀ·Q`. The keys a row block adds to the one before it are seen by that block's
    /// rows and every later row. P `(T, S)`, X `(T, D)`, dY `(S, D)`.
    pub(crate) fn key_grads<B: Copy>(&self, p: B, x: B, dy: B) -> Vec<Product<B>> {
        let mut first_key = 0;
        let mut out = Vec::new();
        for (r0, _, e) in self.row_blocks() {
            if e > first_key {
                out.push(Product {
                    trans: (true, false),
                    mnk: (e - first_key, self.d, self.t - r0),
                    a: self.scores_like(p, r0, first_key),
                    b: self.rows_like(x, r0),
                    c: self.keys_like(dy, first_key),
                    batch: self.items,
                });
            }
            first_key = e;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::kernels::attention::allowed;

    /// The buffers of one attention call, by name.
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

    /// Runs products on host buffers with the device wrapper's semantics (C overwritten).
    fn run(bufs: &mut [Vec<f32>; 12], products: &[Product<Buf>]) {
        for pr in products {
            let (m, n, k) = pr.mnk;
            for item in 0..pr.batch {
                let mut c = vec![0.0f64; m * n];
                {
                    let a = &bufs[pr.a.buf as usize];
                    let b = &bufs[pr.b.buf as usize];
                    let at = |i: usize, l: usize| {
                        let o = pr.a.offset + item * pr.a.stride;
                        if pr.trans.0 {
                            a[o + l * pr.a.ld + i]
                        } else {
                            a[o + i * pr.a.ld + l]
                        }
                    };
                    let bt = |l: usize, j: usize| {
                        let o = pr.b.offset + item * pr.b.stride;
                        if pr.trans.1 {
                            b[o + j * pr.b.ld + l]
                        } else {
                            b[o + l * pr.b.ld + j]
                        }
                    };
                    for i in 0..m {
                        for j in 0..n {
                            c[i * n + j] = (0..k).map(|l| at(i, l) as f64 * bt(l, j) as f64).sum();
                        }
                    }
                }
                let cb = &mut bufs[pr.c.buf as usize];
                for i in 0..m {
                    for j in 0..n {
                        cb[pr.c.offset + item * pr.c.stride + i * pr.c.ld + j] =
                            c[i * n + j] as f32;
                    }
                }
            }
        }
    }

    /// Forward and backward through the blocked products and the softmax kernels' loops
    /// (bounded by `keys_end` as in `kernels.cu`), every intermediate buffer starting as NaN
    /// like uninitialised device memory. Returns O, dQ, dK, dV.
    fn blocked(
        m: &Dims,
        blocks: Blocks,
        (q, k, v, d_out): (&[f32], &[f32], &[f32], &[f32]),
    ) -> [Vec<f32>; 4] {
        let items = m.b * m.h;
        let (nq, nk, ns) = (items * m.t * m.d, items * m.s * m.d, items * m.t * m.s);
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
        let scale = 1.0 / (m.d as f32).sqrt();
        let rows = items * m.t;
        // Forward: scores, softmax rows (attn_softmax_fwd), P·V.
        run(&mut bufs, &blocks.scores(Buf::Q, Buf::K, Buf::Scores));
        let mut lse = vec![0.0f32; rows];
        for (row, l) in lse.iter_mut().enumerate() {
            let i = row % m.t;
            let o = row * m.s;
            let end = blocks.keys_end(i);
            let ok = |j: usize| allowed(i, j, m.start, m.window);
            let sc = &bufs[Buf::Scores as usize];
            let mx = (0..end)
                .filter(|&j| ok(j))
                .map(|j| sc[o + j] * scale)
                .fold(f32::NEG_INFINITY, f32::max);
            let sum: f32 = (0..end)
                .filter(|&j| ok(j))
                .map(|j| (sc[o + j] * scale - mx).exp())
                .sum();
            *l = mx + sum.ln();
            let p: Vec<f32> = (0..end)
                .map(|j| {
                    if ok(j) {
                        (sc[o + j] * scale - *l).exp()
                    } else {
                        0.0
                    }
                })
                .collect();
            bufs[Buf::P as usize][o..o + end].copy_from_slice(&p);
        }
        run(&mut bufs, &blocks.rows_times_keys(Buf::P, Buf::V, Buf::O));
        let out = bufs[Buf::O as usize].clone();
        // Backward: recomputed scores, dP, softmax rows (attn_softmax_bwd), dV, dQ, dK.
        bufs[Buf::Scores as usize] = nan(ns);
        bufs[Buf::P as usize] = nan(ns);
        run(&mut bufs, &blocks.scores(Buf::Q, Buf::K, Buf::Scores));
        run(&mut bufs, &blocks.scores(Buf::DO, Buf::V, Buf::DP));
        for (row, &l) in lse.iter().enumerate() {
            let i = row % m.t;
            let o = row * m.s;
            let dot: f32 = (0..m.d)
                .map(|c| bufs[Buf::DO as usize][row * m.d + c] * out[row * m.d + c])
                .sum();
            for j in 0..blocks.keys_end(i) {
                let ok = allowed(i, j, m.start, m.window);
                let pv = if ok {
                    (bufs[Buf::Scores as usize][o + j] * scale - l).exp()
                } else {
                    0.0
                };
                let ds = if ok {
                    scale * pv * (bufs[Buf::DP as usize][o + j] - dot)
                } else {
                    0.0
                };
                bufs[Buf::P as usize][o + j] = pv;
                bufs[Buf::DS as usize][o + j] = ds;
            }
        }
        run(&mut bufs, &blocks.key_grads(Buf::P, Buf::DO, Buf::DV));
        run(&mut bufs, &blocks.rows_times_keys(Buf::DS, Buf::K, Buf::DQ));
        run(&mut bufs, &blocks.key_grads(Buf::DS, Buf::Q, Buf::DK));
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

    #[test]
    fn blocks_skip_the_upper_triangle() {
        let m = dims(512, 512, 0, None);
        let blocks = Blocks::new(&m);
        assert_eq!(blocks.block_rows(), 128);
        let work = |ps: Vec<Product<u8>>| -> usize {
            ps.iter().map(|p| p.mnk.0 * p.mnk.1 * p.mnk.2).sum()
        };
        let full = 512 * 512 * 4;
        // 4 blocks: 1 + 2 + 3 + 4 of 16 parts.
        assert_eq!(work(blocks.scores(0, 1, 2)), full * 10 / 16);
        assert_eq!(work(blocks.rows_times_keys(0, 1, 2)), full * 10 / 16);
        assert_eq!(work(blocks.key_grads(0, 1, 2)), full * 10 / 16);
        assert_eq!(Blocks::new(&dims(4096, 4096, 0, None)).block_rows(), 512);
        assert_eq!(Blocks::new(&dims(64, 64, 0, None)).block_rows(), 128);
        // No skipping: one block of all rows, the whole T×S products.
        let whole = Blocks::with_setting(&m, 0);
        assert_eq!(whole.block_rows(), 512);
        assert_eq!(work(whole.scores(0, 1, 2)), full);
        assert_eq!(work(whole.key_grads(0, 1, 2)), full);
        assert_eq!(Blocks::with_setting(&m, 64).scores(0, 1, 2).len(), 8);
    }
}
