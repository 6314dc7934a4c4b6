//! Grid and block shapes of the CUDA kernels' launches (`src/train/cuda/kernels.cu`): plain
//! arithmetic, kept apart from the device so that the CUDA path (`train::cuda`, feature `cuda`)
//! and the kernel emulator's tests (`train::kernel_emulator`) launch every kernel the same way.

use super::kernels::attention::Dims;

/// One launch: `grid` blocks of `block` threads (x only) with `shared` bytes of dynamic shared
/// memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Launch {
    pub grid: usize,
    pub block: usize,
    pub shared: usize,
}

/// Threads of an elementwise launch's blocks.
const ELEMENTWISE_BLOCK: usize = 256;

/// Rows of RMSNorm's backward per block: enough blocks to fill the GPU, few partial weight
/// gradients to sum after.
pub(crate) const RMS_BWD_ROWS_PER_BLOCK: usize = 4;

/// Blocks of the sum-of-squares partials per tensor (the H100/H200's SM count).
pub(crate) const SUM_SQUARES_BLOCKS: usize = 132;

/// Longest RMSNorm row the backward takes: its per-block weight-gradient sums live in the
/// 48 KiB of shared memory a launch gets without opting in.
pub(crate) const RMS_BWD_MAX_ROW: usize = 48 * 1024 / 4;

/// One thread per element (or per rotated pair, for RoPE), 256 per block.
pub(crate) fn elementwise(n: usize) -> Launch {
    Launch {
        grid: n.div_ceil(ELEMENTWISE_BLOCK).max(1),
        block: ELEMENTWISE_BLOCK,
        shared: 0,
    }
}

/// Threads of a block that walks a row of `len` elements: a multiple of 32 (the block
/// reductions' shuffles need whole warps), at most 256.
pub(crate) fn row_block(len: usize) -> usize {
    len.next_multiple_of(32).clamp(32, 256)
}

/// One block per row, for `rows` rows of `len` elements (RMSNorm forward, cross-entropy, the
/// attention softmaxes, the embedding backward's groups).
pub(crate) fn per_row(rows: usize, len: usize) -> Launch {
    Launch {
        grid: rows.max(1),
        block: row_block(len),
        shared: 0,
    }
}

/// RoPE over `rows` rows of `heads` heads of `hd`: a block per row, a thread per rotated pair.
pub(crate) fn rope(rows: usize, heads: usize, hd: usize) -> Launch {
    per_row(rows, heads * hd / 2)
}

/// The attention's head copies, split `(B, T, hs, D)` → `(B, H, T, D)` or merge back: a block
/// per destination row of `d` (`rows` of them: `B·H·T` for a split, `B·T·hd` for a merge).
pub(crate) fn heads_copy(rows: usize, d: usize) -> Launch {
    per_row(rows, d)
}

/// RMSNorm backward over `rows` rows of `d`: [`RMS_BWD_ROWS_PER_BLOCK`] rows per block, each
/// block's weight-gradient sums in `d` floats of shared memory.
pub(crate) fn rms_bwd(rows: usize, d: usize) -> Launch {
    Launch {
        grid: rows.div_ceil(RMS_BWD_ROWS_PER_BLOCK).max(1),
        block: row_block(d),
        shared: d * 4,
    }
}

/// The column sums of RMSNorm's per-block weight gradients: 32 columns per block of 1024.
pub(crate) fn rms_dw_sum(d: usize) -> Launch {
    Launch {
        grid: d.div_ceil(32).max(1),
        block: 1024,
        shared: 0,
    }
}

/// One tensor's sum-of-squares partials.
pub(crate) fn sum_squares() -> Launch {
    Launch {
        grid: SUM_SQUARES_BLOCKS,
        block: 256,
        shared: 0,
    }
}

/// The attention kernels' score scale, `1/√D`.
pub(crate) fn attention_scale(m: &Dims) -> f32 {
    1.0 / (m.d as f32).sqrt()
}

/// The sliding window as the attention kernels take it (0: none).
pub(crate) fn attention_window(m: &Dims) -> i32 {
    m.window.map_or(0, |w| w as i32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_are_whole_warps_and_cover_their_work() {
        for len in [1, 31, 32, 33, 255, 256, 257, 100_000] {
            let b = row_block(len);
            assert!(
                b.is_multiple_of(32) && (32..=256).contains(&b),
                "{len} → {b}"
            );
        }
        for n in [1, 255, 256, 257, 1_000_000] {
            let l = elementwise(n);
            assert!(
                l.grid * l.block >= n && (l.grid - 1) * l.block < n,
                "{n}: {l:?}"
            );
        }
        assert_eq!(elementwise(0).grid, 1);
        let l = rms_bwd(10, 768);
        assert_eq!((l.grid, l.shared), (3, 768 * 4));
        assert_eq!(rms_dw_sum(33).grid, 2);
    }
}
