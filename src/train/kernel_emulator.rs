//! The CUDA kernels (`src/train/cuda/kernels.cu`) run on the CPU, for tests: build.rs compiles
//! the kernels' own source as C++ into an emulator (`src/train/cuda/emulator.cc`) that runs
//! every CUDA thread of a block as a fiber, so barriers, shared memory and warp shuffles behave
//! as on a GPU, and a barrier not every thread reaches fails the launch instead of hanging.
//! Launches take the shapes `train::cuda` gives them ([`super::kernel_launch`]).
//!
//! The tests compare each kernel, in f32 and bf16 storage, with the CPU kernels of
//! [`super::kernels`] (what the bench's `--check` compares the device with); the attention
//! softmaxes are also run inside the blocked attention plan by `attention_blocks`' tests. This
//! checks the kernels' indexing and synchronisation on every CI run, without a GPU. The device's
//! own arithmetic (`__expf`, contractions into fused multiply-adds) differs by rounding and is
//! checked by `--check` on a GPU.

use std::cell::Cell;
use std::ffi::c_void;
use std::rc::Rc;

use super::attention_device::{
    AttentionDevice, ColumnMajorGemm, Elem, SoftmaxBlock, SoftmaxBwdBufs, SoftmaxFwdBufs,
};
use super::kernel_launch::{self as shape, Launch};
use super::kernels::attention::Dims;

#[link(name = "jobd_kernel_emulator", kind = "static")]
#[link(name = "stdc++")]
unsafe extern "C" {
    fn jobd_emu_launch(
        grid: u32,
        block: u32,
        shared: usize,
        body: extern "C" fn(*mut c_void),
        ctx: *mut c_void,
    ) -> i32;
    fn rms_dw_sum(part: *const f32, dw: *mut f32, blocks: i32, d: i32);
    fn adamw_step(
        p: *mut f32,
        m: *mut f32,
        v: *mut f32,
        g: *const f32,
        n: i64,
        beta1: f32,
        beta2: f32,
        gs: f32,
        decay: f32,
        step_size: f32,
        bc2_sqrt: f32,
        eps: f32,
    );
    fn sum_squares_part(g: *const f32, n: i64, part: *mut f32);
    fn jobd_emu_f16_from_f32(v: f32) -> u16;
    fn jobd_emu_f16_to_f32(bits: u16) -> f32;
}

/// Runs `kernel` (a call of one kernel entry point) as every thread of every block of `l`.
/// Panics when the launch fails (threads of a block diverging at a barrier).
pub(crate) fn launch(l: Launch, kernel: impl Fn()) {
    extern "C" fn body<F: Fn()>(ctx: *mut c_void) {
        // SAFETY: `ctx` is the `&F` given to the launch below, alive until it returns.
        let f = unsafe { &*(ctx as *const F) };
        f();
    }
    fn start<F: Fn()>(l: Launch, f: &F) -> i32 {
        // SAFETY: the emulator calls `body` only during this call, on this thread.
        unsafe {
            jobd_emu_launch(
                l.grid as u32,
                l.block as u32,
                l.shared,
                body::<F>,
                f as *const F as *mut c_void,
            )
        }
    }
    match start(l, &kernel) {
        0 => {}
        1 => panic!("launch {l:?}: threads of a block met different barriers"),
        2 => panic!("launch {l:?}: no memory for the threads' stacks"),
        other => panic!("launch {l:?}: status {other}"),
    }
}

/// The entry points of one storage type (`<kernel>_f32` or `<kernel>_bf16` in kernels.cu).
#[allow(clippy::type_complexity)]
pub(crate) struct Entries<T> {
    pub rms_fwd: unsafe extern "C" fn(*const T, *const f32, *mut T, i32, i32, f32),
    pub rms_bwd:
        unsafe extern "C" fn(*const T, *const f32, *const T, *mut T, *mut f32, i32, i32, f32, i32),
    pub rope:
        unsafe extern "C" fn(*const T, *const f32, *const f32, *mut T, i64, i32, i32, i32, i32),
    pub swiglu_fwd: unsafe extern "C" fn(*const T, *const T, *mut T, i64),
    pub swiglu_bwd: unsafe extern "C" fn(*const T, *const T, *const T, *mut T, *mut T, i64),
    pub ce_fwd:
        unsafe extern "C" fn(*const T, *const u32, *const f32, *mut f32, *mut f32, i32, i32),
    pub ce_bwd: unsafe extern "C" fn(
        *const T,
        *const u32,
        *const f32,
        *const f32,
        *const f32,
        *mut T,
        i32,
        i32,
    ),
    pub heads_split: unsafe extern "C" fn(*const T, *mut T, i32, i32, i32, i32, i32),
    pub heads_merge: unsafe extern "C" fn(*const T, *mut T, i32, i32, i32, i32, i32),
    pub heads_merge_from_f32: unsafe extern "C" fn(*const f32, *mut T, i32, i32, i32, i32, i32),
    pub attn_softmax_fwd:
        unsafe extern "C" fn(*const f32, *mut T, *mut f32, i32, i32, i32, i32, f32, i32, i32, i32),
    pub attn_softmax_bwd: unsafe extern "C" fn(
        *const f32,
        *const f32,
        *const f32,
        *const T,
        *const T,
        *mut T,
        *mut T,
        i32,
        i32,
        i32,
        i32,
        i32,
        f32,
        i32,
        i32,
        i32,
    ),
    pub embed_fwd: unsafe extern "C" fn(*const T, *const u32, *mut T, i64, i32),
    pub embed_bwd: unsafe extern "C" fn(*const T, *const u32, *const u32, *const u32, *mut T, i32),
    pub dropout_mask: unsafe extern "C" fn(*mut T, i64, u64, f64, f32),
}

/// A storage type the kernels take: f32, bf16 as its bit pattern (`u16`), or `half::f16`.
pub(crate) trait Storage: Copy + 'static {
    const ENTRIES: Entries<Self>;
    /// The relative error the type's rounding allows on the tests' results (and, in 16 bits,
    /// on the arithmetic between rounded inputs).
    const TOLERANCE: f32;
    /// The stored value nearest `x` (round to nearest even).
    fn store(x: f32) -> Self;
    fn load(self) -> f32;
}

/// Declares one storage type's entry points and implements [`Storage`] with them.
macro_rules! entries {
    ($t:ty, $tol:expr, $store:expr, $load:expr;
     $($field:ident = $name:ident: fn($($arg:ty),*);)*) => {
        unsafe extern "C" {
            $(fn $name($(_: $arg),*);)*
        }
        impl Storage for $t {
            const ENTRIES: Entries<$t> = Entries { $($field: $name),* };
            const TOLERANCE: f32 = $tol;
            fn store(x: f32) -> Self {
                $store(x)
            }
            fn load(self) -> f32 {
                $load(self)
            }
        }
    };
}

macro_rules! storage {
    ($t:ty, $tol:expr, $store:expr, $load:expr, [$($n:ident),*]) => {
        storage!(@ $t, $tol, $store, $load, $($n),*);
    };
    (@ $t:ty, $tol:expr, $store:expr, $load:expr, $rms_fwd:ident, $rms_bwd:ident, $rope:ident,
     $swiglu_fwd:ident, $swiglu_bwd:ident, $ce_fwd:ident, $ce_bwd:ident, $split:ident,
     $merge:ident, $merge_f32:ident, $sm_fwd:ident, $sm_bwd:ident, $embed_fwd:ident,
     $embed_bwd:ident, $dropout:ident) => {
        entries! { $t, $tol, $store, $load;
            rms_fwd = $rms_fwd: fn(*const $t, *const f32, *mut $t, i32, i32, f32);
            rms_bwd = $rms_bwd:
                fn(*const $t, *const f32, *const $t, *mut $t, *mut f32, i32, i32, f32, i32);
            rope = $rope: fn(*const $t, *const f32, *const f32, *mut $t, i64, i32, i32, i32, i32);
            swiglu_fwd = $swiglu_fwd: fn(*const $t, *const $t, *mut $t, i64);
            swiglu_bwd = $swiglu_bwd: fn(*const $t, *const $t, *const $t, *mut $t, *mut $t, i64);
            ce_fwd = $ce_fwd: fn(*const $t, *const u32, *const f32, *mut f32, *mut f32, i32, i32);
            ce_bwd = $ce_bwd: fn(
                *const $t, *const u32, *const f32, *const f32, *const f32, *mut $t, i32, i32);
            heads_split = $split: fn(*const $t, *mut $t, i32, i32, i32, i32, i32);
            heads_merge = $merge: fn(*const $t, *mut $t, i32, i32, i32, i32, i32);
            heads_merge_from_f32 = $merge_f32: fn(*const f32, *mut $t, i32, i32, i32, i32, i32);
            attn_softmax_fwd = $sm_fwd: fn(
                *const f32, *mut $t, *mut f32, i32, i32, i32, i32, f32, i32, i32, i32);
            attn_softmax_bwd = $sm_bwd: fn(
                *const f32, *const f32, *const f32, *const $t, *const $t, *mut $t, *mut $t,
                i32, i32, i32, i32, i32, f32, i32, i32, i32);
            embed_fwd = $embed_fwd: fn(*const $t, *const u32, *mut $t, i64, i32);
            embed_bwd = $embed_bwd:
                fn(*const $t, *const u32, *const u32, *const u32, *mut $t, i32);
            dropout_mask = $dropout: fn(*mut $t, i64, u64, f64, f32);
        }
    };
}

storage!(
    f32,
    2e-5,
    |x: f32| x,
    |x: f32| x,
    [
        rms_fwd_f32,
        rms_bwd_f32,
        rope_f32,
        swiglu_fwd_f32,
        swiglu_bwd_f32,
        ce_fwd_f32,
        ce_bwd_f32,
        heads_split_f32,
        heads_merge_f32,
        heads_merge_from_f32_f32,
        attn_softmax_fwd_f32,
        attn_softmax_bwd_f32,
        embed_fwd_f32,
        embed_bwd_f32,
        dropout_mask_f32
    ]
);

storage!(
    u16,
    2e-2,
    |x: f32| half::bf16::from_f32(x).to_bits(),
    |x: u16| half::bf16::from_bits(x).to_f32(),
    [
        rms_fwd_bf16,
        rms_bwd_bf16,
        rope_bf16,
        swiglu_fwd_bf16,
        swiglu_bwd_bf16,
        ce_fwd_bf16,
        ce_bwd_bf16,
        heads_split_bf16,
        heads_merge_bf16,
        heads_merge_from_f32_bf16,
        attn_softmax_fwd_bf16,
        attn_softmax_bwd_bf16,
        embed_fwd_bf16,
        embed_bwd_bf16,
        dropout_mask_bf16
    ]
);

storage!(
    half::f16,
    2e-3,
    half::f16::from_f32,
    half::f16::to_f32,
    [
        rms_fwd_f16,
        rms_bwd_f16,
        rope_f16,
        swiglu_fwd_f16,
        swiglu_bwd_f16,
        ce_fwd_f16,
        ce_bwd_f16,
        heads_split_f16,
        heads_merge_f16,
        heads_merge_from_f32_f16,
        attn_softmax_fwd_f16,
        attn_softmax_bwd_f16,
        embed_fwd_f16,
        embed_bwd_f16,
        dropout_mask_f16
    ]
);

/// [`AttentionDevice`] on the host: buffers are host memory (their addresses are pointers, as
/// the emulated kernels take them), starting as NaN like uninitialised device memory; the
/// kernels run in the emulator with `train::cuda`'s launch shapes; products follow cuBLAS's
/// column-major interface exactly as [`ColumnMajorGemm`] describes the call. It also keeps
/// count of the bytes its buffers hold, and their peak, as the device's memory would see them.
pub(crate) struct HostAttention<T> {
    meter: Rc<Meter>,
    _elem: std::marker::PhantomData<T>,
}

/// Bytes held by live [`HostBuf`]s, and the most held at once since the last reset.
#[derive(Default)]
pub(crate) struct Meter {
    live: Cell<usize>,
    peak: Cell<usize>,
}

impl<T: Storage> HostAttention<T> {
    pub(crate) fn new() -> Self {
        HostAttention {
            meter: Rc::default(),
            _elem: std::marker::PhantomData,
        }
    }

    /// Bytes its buffers hold now.
    pub(crate) fn live_bytes(&self) -> usize {
        self.meter.live.get()
    }

    /// The most bytes held at once since the last [`Self::reset_peak`].
    pub(crate) fn peak_bytes(&self) -> usize {
        self.meter.peak.get()
    }

    pub(crate) fn reset_peak(&self) {
        self.meter.peak.set(self.meter.live.get());
    }
}

/// A host buffer of [`HostAttention`]: 4-byte words (so that f32 buffers are aligned), its
/// requested size counted in the meter while it lives.
pub(crate) struct HostBuf {
    words: Vec<u32>,
    bytes: usize,
    meter: Rc<Meter>,
}

impl std::ops::Deref for HostBuf {
    type Target = [u32];
    fn deref(&self) -> &[u32] {
        &self.words
    }
}

impl Drop for HostBuf {
    fn drop(&mut self) {
        self.meter.live.set(self.meter.live.get() - self.bytes);
    }
}

/// Element `i` of a compute-type buffer (`T`) or an f32 one at `addr`.
///
/// # Safety
/// `addr` must point to a live host buffer of the type with more than `i` elements.
unsafe fn read<T: Storage>(addr: u64, f32_elems: bool, i: usize) -> f32 {
    unsafe {
        if f32_elems {
            *(addr as *const f32).add(i)
        } else {
            (*(addr as *const T).add(i)).load()
        }
    }
}

impl<T: Storage> AttentionDevice for HostAttention<T> {
    type Buf = HostBuf;

    fn compute_size(&self) -> usize {
        std::mem::size_of::<T>()
    }

    fn alloc(&self, elem: Elem, n: usize) -> candle_core::Result<HostBuf> {
        let bytes = n * match elem {
            Elem::Compute => std::mem::size_of::<T>(),
            Elem::F32 => 4,
        };
        let m = &self.meter;
        m.live.set(m.live.get() + bytes);
        m.peak.set(m.peak.get().max(m.live.get()));
        Ok(HostBuf {
            // All-ones bits: NaN in f32 and in bf16.
            words: vec![u32::MAX; bytes.max(1).div_ceil(4)],
            bytes,
            meter: m.clone(),
        })
    }

    fn addr(&self, buf: &HostBuf) -> u64 {
        buf.as_ptr() as u64
    }

    fn gemm(&self, g: &ColumnMajorGemm) -> candle_core::Result<()> {
        let (m, n, k) = (g.m, g.n, g.k);
        for item in 0..g.batch {
            let (a, b, c) = (g.a, g.b, g.c);
            let (a0, b0, c0) = (item * a.2, item * b.2, item * c.2);
            for j in 0..n {
                for i in 0..m {
                    let mut acc = 0.0f64;
                    for l in 0..k {
                        // Column-major: element (r, c) of a matrix with leading dimension ld is
                        // at r + c·ld; op(X) = Xᵀ reads (c, r).
                        let ai = if g.trans_a { l + i * a.1 } else { i + l * a.1 };
                        let bi = if g.trans_b { j + l * b.1 } else { l + j * b.1 };
                        // SAFETY: the plan's operands lie inside their buffers (asserted by
                        // the callers' sizes; a stray index reads NaN or faults the test).
                        let (x, y) = unsafe {
                            (
                                read::<T>(a.0, false, a0 + ai),
                                read::<T>(b.0, false, b0 + bi),
                            )
                        };
                        acc += x as f64 * y as f64;
                    }
                    let ci = c0 + i + j * c.1;
                    // SAFETY: as above, for C.
                    unsafe {
                        if g.beta != 0.0 {
                            acc += g.beta as f64 * read::<T>(c.0, g.c_f32, ci) as f64;
                        }
                        if g.c_f32 {
                            *(c.0 as *mut f32).add(ci) = acc as f32;
                        } else {
                            *(c.0 as *mut T).add(ci) = T::store(acc as f32);
                        }
                    }
                }
            }
        }
        Ok(())
    }

    fn zero_f32(&self, addr: u64, len: usize) -> candle_core::Result<()> {
        // SAFETY: the plan zeroes `len` f32 of a buffer it allocated with at least that many.
        unsafe { std::slice::from_raw_parts_mut(addr as *mut f32, len).fill(0.0) };
        Ok(())
    }

    fn split_heads(
        &self,
        src: u64,
        dst: u64,
        m: &Dims,
        t: usize,
        hs: usize,
    ) -> candle_core::Result<()> {
        let (src, dst) = (src as *const T, dst as *mut T);
        let a = [m.b, t, hs, m.h, m.d].map(|x| x as i32);
        launch(shape::heads_copy(m.b * m.h * t, m.d), || unsafe {
            (T::ENTRIES.heads_split)(src, dst, a[0], a[1], a[2], a[3], a[4])
        });
        Ok(())
    }

    fn merge_heads(
        &self,
        (src, from_f32): (u64, bool),
        dst: u64,
        m: &Dims,
        t: usize,
        hd: usize,
    ) -> candle_core::Result<()> {
        let dst = dst as *mut T;
        let a = [m.b, t, hd, m.h, m.d].map(|x| x as i32);
        let l = shape::heads_copy(m.b * t * hd, m.d);
        if from_f32 {
            let src = src as *const f32;
            launch(l, || unsafe {
                (T::ENTRIES.heads_merge_from_f32)(src, dst, a[0], a[1], a[2], a[3], a[4])
            });
        } else {
            let src = src as *const T;
            launch(l, || unsafe {
                (T::ENTRIES.heads_merge)(src, dst, a[0], a[1], a[2], a[3], a[4])
            });
        }
        Ok(())
    }

    fn softmax_fwd(&self, x: SoftmaxFwdBufs, blk: SoftmaxBlock) -> candle_core::Result<()> {
        let m = &blk.dims;
        let (sc, p, lse) = (x.scores as *const f32, x.p as *mut T, x.lse as *mut f32);
        let (window, scale) = (shape::attention_window(m), shape::attention_scale(m));
        launch(
            shape::per_row(m.b * m.h * blk.rows, blk.keys_end),
            || unsafe {
                (T::ENTRIES.attn_softmax_fwd)(
                    sc,
                    p,
                    lse,
                    m.t as i32,
                    m.s as i32,
                    m.start as i32,
                    window,
                    scale,
                    blk.r0 as i32,
                    blk.rows as i32,
                    blk.keys_end as i32,
                )
            },
        );
        Ok(())
    }

    fn softmax_bwd(&self, x: SoftmaxBwdBufs, blk: SoftmaxBlock) -> candle_core::Result<()> {
        let m = &blk.dims;
        let (sc, dp, lse) = (
            x.scores as *const f32,
            x.dp as *const f32,
            x.lse as *const f32,
        );
        let (d_out, out) = (x.d_out as *const T, x.out as *const T);
        let (p, ds) = (x.p as *mut T, x.ds as *mut T);
        let (window, scale) = (shape::attention_window(m), shape::attention_scale(m));
        launch(
            shape::per_row(m.b * m.h * blk.rows, blk.keys_end),
            || unsafe {
                (T::ENTRIES.attn_softmax_bwd)(
                    sc,
                    dp,
                    lse,
                    d_out,
                    out,
                    p,
                    ds,
                    m.t as i32,
                    m.s as i32,
                    m.d as i32,
                    m.start as i32,
                    window,
                    scale,
                    blk.r0 as i32,
                    blk.rows as i32,
                    blk.keys_end as i32,
                )
            },
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::kernels::{self as cpu, AdamStep};
    use crate::train::rng::Rng;

    /// `n` values in `[-scale, scale)`.
    fn values(seed: u64, n: usize, scale: f32) -> Vec<f32> {
        let mut rng = Rng::new(seed);
        (0..n)
            .map(|_| (rng.next_f64() * 2.0 - 1.0) as f32 * scale)
            .collect()
    }

    fn store<T: Storage>(x: &[f32]) -> Vec<T> {
        x.iter().map(|&v| T::store(v)).collect()
    }

    fn load<T: Storage>(x: &[T]) -> Vec<f32> {
        x.iter().map(|v| v.load()).collect()
    }

    /// An output buffer as uninitialised device memory might be: NaN.
    fn garbage<T: Storage>(n: usize) -> Vec<T> {
        vec![T::store(f32::NAN); n]
    }

    fn tolerance<T: Storage>() -> f32 {
        T::TOLERANCE
    }

    #[track_caller]
    fn assert_close(what: &str, got: &[f32], want: &[f32], tol: f32) {
        assert_eq!(got.len(), want.len(), "{what}: lengths");
        let scale = want.iter().fold(1e-3f32, |m, w| m.max(w.abs()));
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!(
                (g - w).abs() <= tol * (scale + w.abs()),
                "{what}[{i}]: {g} vs {w} (tolerance {tol} relative to {scale})"
            );
        }
    }

    fn rms<T: Storage>(rows: usize, d: usize) {
        let eps = 1e-5;
        let x = load(&store::<T>(&values(1, rows * d, 2.0)));
        let dy = load(&store::<T>(&values(2, rows * d, 1.0)));
        let w = values(3, d, 1.5);
        let (xs, dys) = (store::<T>(&x), store::<T>(&dy));
        let mut y = garbage::<T>(rows * d);
        let (xp, wp, yp) = (xs.as_ptr(), w.as_ptr(), y.as_mut_ptr());
        launch(shape::per_row(rows, d), || unsafe {
            (T::ENTRIES.rms_fwd)(xp, wp, yp, rows as i32, d as i32, eps)
        });
        let mut want = vec![0.0; rows * d];
        cpu::rms_norm_fwd(&x, &w, eps, &mut want);
        let tol = tolerance::<T>();
        assert_close("rms_norm y", &load(&y), &want, tol);

        let bwd = shape::rms_bwd(rows, d);
        assert!(bwd.shared <= shape::RMS_BWD_MAX_ROW * 4);
        let mut dx = garbage::<T>(rows * d);
        let mut part = vec![f32::NAN; bwd.grid * d];
        let (dyp, dxp, pp) = (dys.as_ptr(), dx.as_mut_ptr(), part.as_mut_ptr());
        let rpb = shape::RMS_BWD_ROWS_PER_BLOCK as i32;
        launch(bwd, || unsafe {
            (T::ENTRIES.rms_bwd)(xp, wp, dyp, dxp, pp, rows as i32, d as i32, eps, rpb)
        });
        let mut dw = vec![f32::NAN; d];
        let (pp, dwp) = (part.as_ptr(), dw.as_mut_ptr());
        launch(shape::rms_dw_sum(d), || unsafe {
            rms_dw_sum(pp, dwp, bwd.grid as i32, d as i32)
        });
        let mut want_dx = vec![0.0; rows * d];
        let want_dw = cpu::rms_norm_bwd(&x, &w, &dy, eps, &mut want_dx, false);
        assert_close("rms_norm dx", &load(&dx), &want_dx, tol);
        assert_close("rms_norm dw", &dw, &want_dw, 2e-5);
    }

    /// kernels.cu's f16 conversions as the emulator runs them (the device uses its conversion
    /// instructions) round as IEEE binary16 does, as the `half` crate does.
    #[test]
    fn f16_conversions_round_to_nearest_even() {
        let same = |a: f32, b: f32| a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan());
        let to_f16 = |x: f32| unsafe { jobd_emu_f16_from_f32(x) };
        let check = |x: f32| {
            let (got, want) = (to_f16(x), half::f16::from_f32(x));
            assert!(
                got == want.to_bits() || (want.is_nan() && half::f16::from_bits(got).is_nan()),
                "{x:e} ({:#010x}): {got:#06x}, want {:#06x}",
                x.to_bits(),
                want.to_bits()
            );
        };
        for bits in 0..=u16::MAX {
            let want = half::f16::from_bits(bits).to_f32();
            let got = unsafe { jobd_emu_f16_to_f32(bits) };
            assert!(same(got, want), "{bits:#06x}: {got:e}, want {want:e}");
            if !want.is_finite() {
                continue;
            }
            check(want);
            // Halfway to the next value up (ties to even), and one f32 step either side.
            let next = half::f16::from_bits(bits.wrapping_add(1)).to_f32();
            if next.is_finite() || bits & 0x7fff == 0x7bff {
                let mid = if next.is_finite() {
                    (want as f64 + next as f64) / 2.0
                } else {
                    // Past 65504: halfway to 2¹⁶, where rounding goes to infinity.
                    65520.0 * want.signum() as f64
                };
                let mid = mid as f32;
                for m in [
                    mid,
                    f32::from_bits(mid.to_bits() - 1),
                    f32::from_bits(mid.to_bits() + 1),
                ] {
                    check(m);
                }
            }
        }
        // A sweep of f32 bit patterns: every exponent, both signs, NaNs and infinities.
        for bits in (0..=u32::MAX).step_by(997) {
            check(f32::from_bits(bits));
        }
        for x in [
            0.0,
            -0.0,
            f32::MIN_POSITIVE,
            1e-45,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::MAX,
        ] {
            check(x);
        }
    }

    #[test]
    fn rms_norm_kernels_match_the_cpu() {
        // Rows shorter than the block, longer than it, and a last block of rows cut short;
        // many short rows, as Qwen3's per-head query/key norms give (rows of head_dim).
        for (rows, d) in [(10, 100), (9, 300), (4, 32), (601, 8), (257, 128)] {
            rms::<f32>(rows, d);
            rms::<u16>(rows, d);
            rms::<half::f16>(rows, d);
        }
    }

    fn rope<T: Storage>((b, t, heads, hd): (usize, usize, usize, usize)) {
        let n = b * t * heads * hd;
        let x = load(&store::<T>(&values(4, n, 1.0)));
        let (cos, sin) = (values(5, t * hd, 1.0), values(6, t * hd, 1.0));
        let xs = store::<T>(&x);
        for transpose in [false, true] {
            let mut y = garbage::<T>(n);
            let (xp, cp, sp, yp) = (xs.as_ptr(), cos.as_ptr(), sin.as_ptr(), y.as_mut_ptr());
            let rows = b * t;
            launch(shape::rope(rows, heads, hd), || unsafe {
                (T::ENTRIES.rope)(
                    xp,
                    cp,
                    sp,
                    yp,
                    rows as i64,
                    t as i32,
                    heads as i32,
                    hd as i32,
                    transpose as i32,
                )
            });
            let mut want = vec![0.0; n];
            cpu::rope(&x, &cos, &sin, (t, heads, hd), transpose, &mut want);
            assert_close("rope", &load(&y), &want, tolerance::<T>());
        }
    }

    #[test]
    fn rope_kernel_matches_the_cpu() {
        // Rows of fewer pairs than a block's threads, and of more (each thread takes several).
        for dims in [(2, 5, 3, 8), (1, 3, 3, 200)] {
            rope::<f32>(dims);
            rope::<u16>(dims);
            rope::<half::f16>(dims);
        }
    }

    fn swiglu<T: Storage>(n: usize) {
        let g = load(&store::<T>(&values(7, n, 4.0)));
        let u = load(&store::<T>(&values(8, n, 2.0)));
        let dy = load(&store::<T>(&values(9, n, 1.0)));
        let (gs, us, dys) = (store::<T>(&g), store::<T>(&u), store::<T>(&dy));
        let (gp, up, dyp) = (gs.as_ptr(), us.as_ptr(), dys.as_ptr());
        let mut y = garbage::<T>(n);
        let yp = y.as_mut_ptr();
        launch(shape::elementwise(n), || unsafe {
            (T::ENTRIES.swiglu_fwd)(gp, up, yp, n as i64)
        });
        let (mut dg, mut du) = (garbage::<T>(n), garbage::<T>(n));
        let (dgp, dup) = (dg.as_mut_ptr(), du.as_mut_ptr());
        launch(shape::elementwise(n), || unsafe {
            (T::ENTRIES.swiglu_bwd)(gp, up, dyp, dgp, dup, n as i64)
        });
        let mut want = vec![0.0; n];
        cpu::swiglu_fwd(&g, &u, &mut want);
        let tol = tolerance::<T>();
        assert_close("swiglu y", &load(&y), &want, tol);
        let (mut want_dg, mut want_du) = (vec![0.0; n], vec![0.0; n]);
        cpu::swiglu_bwd(&g, &u, &dy, &mut want_dg, &mut want_du);
        assert_close("swiglu dg", &load(&dg), &want_dg, tol);
        assert_close("swiglu du", &load(&du), &want_du, tol);
    }

    #[test]
    fn swiglu_kernels_match_the_cpu() {
        for n in [1000, 256, 1] {
            swiglu::<f32>(n);
            swiglu::<u16>(n);
            swiglu::<half::f16>(n);
        }
    }

    fn cross_entropy<T: Storage>() {
        let (n, v) = (7, 300);
        let x = load(&store::<T>(&values(10, n * v, 6.0)));
        let mut rng = Rng::new(11);
        let mut labels: Vec<u32> = (0..n).map(|_| (rng.next_u64() % v as u64) as u32).collect();
        let mask: Vec<f32> = (0..n).map(|r| if r == 3 { 0.0 } else { 1.0 }).collect();
        let grad = values(12, n, 1.0);
        let xs = store::<T>(&x);
        let run_fwd = |labels: &[u32]| {
            let (mut out, mut lse) = (vec![f32::NAN; n], vec![f32::NAN; n]);
            let (xp, lp, mp) = (xs.as_ptr(), labels.as_ptr(), mask.as_ptr());
            let (op, lsep) = (out.as_mut_ptr(), lse.as_mut_ptr());
            launch(shape::per_row(n, v), || unsafe {
                (T::ENTRIES.ce_fwd)(xp, lp, mp, op, lsep, n as i32, v as i32)
            });
            (out, lse)
        };
        let (out, lse) = run_fwd(&labels);
        let (mut want, mut want_lse) = (vec![0.0; n], vec![0.0; n]);
        cpu::cross_entropy_fwd(&x, &labels, &mask, v, &mut want, &mut want_lse);
        // The loss is a difference of values ~6 apart: relative to the logits, not the loss.
        assert_close("cross-entropy lse", &lse, &want_lse, 1e-5);
        assert_close("cross-entropy loss", &out, &want, 1e-4);
        let mut dx = garbage::<T>(n * v);
        let (xp, lp, mp, lsep, gp, dxp) = (
            xs.as_ptr(),
            labels.as_ptr(),
            mask.as_ptr(),
            lse.as_ptr(),
            grad.as_ptr(),
            dx.as_mut_ptr(),
        );
        launch(shape::per_row(n, v), || unsafe {
            (T::ENTRIES.ce_bwd)(xp, lp, mp, lsep, gp, dxp, n as i32, v as i32)
        });
        let mut want_dx = vec![0.0; n * v];
        cpu::cross_entropy_bwd(&x, &labels, &mask, &want_lse, &grad, &mut want_dx);
        assert_close(
            "cross-entropy dx",
            &load(&dx),
            &want_dx,
            tolerance::<T>().max(1e-4),
        );
        // A label outside the vocabulary makes that row's loss NaN (reported as non-finite).
        labels[5] = v as u32;
        let (out, _) = run_fwd(&labels);
        assert!(out[5].is_nan() && out.iter().filter(|x| x.is_nan()).count() == 1);
    }

    #[test]
    fn cross_entropy_kernels_match_the_cpu() {
        cross_entropy::<f32>();
        cross_entropy::<u16>();
        cross_entropy::<half::f16>();
    }

    /// Grouped heads: (B, T, hs, D) → (B, H, T, D), query head `h` reading source head
    /// `h / (H / hs)` (the CPU attention's grouping), and back, summing each group.
    fn heads<T: Storage>((b, t, h, hs, d): (usize, usize, usize, usize, usize)) {
        let rep = h / hs;
        let src = load(&store::<T>(&values(13, b * t * hs * d, 1.0)));
        let srcs = store::<T>(&src);
        let mut split = garbage::<T>(b * h * t * d);
        let (sp, dp) = (srcs.as_ptr(), split.as_mut_ptr());
        let dims = [b, t, hs, h, d].map(|x| x as i32);
        launch(shape::heads_copy(b * h * t, d), || unsafe {
            (T::ENTRIES.heads_split)(sp, dp, dims[0], dims[1], dims[2], dims[3], dims[4])
        });
        let split = load(&split);
        for (bb, hh, p, c) in itertools_4(b, h, t, d) {
            assert_eq!(
                split[((bb * h + hh) * t + p) * d + c],
                src[((bb * t + p) * hs + hh / rep) * d + c]
            );
        }
        // Merging the split heads back sums `rep` copies of each source head.
        let heads = values(14, b * h * t * d, 1.0);
        let want: Vec<f32> = (0..b * t * hs * d)
            .map(|i| {
                let (c, r) = (i % d, i / d);
                let (g, r) = (r % hs, r / hs);
                let (p, bb) = (r % t, r / t);
                (0..rep)
                    .map(|k| heads[((bb * h + g * rep + k) * t + p) * d + c])
                    .sum()
            })
            .collect();
        let n = b * t * hs * d;
        let from_f32 = {
            let mut out = garbage::<T>(n);
            let (sp, op) = (heads.as_ptr(), out.as_mut_ptr());
            launch(shape::heads_copy(b * t * hs, d), || unsafe {
                (T::ENTRIES.heads_merge_from_f32)(
                    sp, op, dims[0], dims[1], dims[2], dims[3], dims[4],
                )
            });
            load(&out)
        };
        assert_close("heads merge from f32", &from_f32, &want, tolerance::<T>());
        let stored = store::<T>(&heads);
        let mut out = garbage::<T>(n);
        let (sp, op) = (stored.as_ptr(), out.as_mut_ptr());
        launch(shape::heads_copy(b * t * hs, d), || unsafe {
            (T::ENTRIES.heads_merge)(sp, op, dims[0], dims[1], dims[2], dims[3], dims[4])
        });
        assert_close("heads merge", &load(&out), &want, tolerance::<T>());
    }

    fn itertools_4(a: usize, b: usize, c: usize, d: usize) -> Vec<(usize, usize, usize, usize)> {
        let mut v = Vec::new();
        for i in 0..a {
            for j in 0..b {
                for k in 0..c {
                    for l in 0..d {
                        v.push((i, j, k, l));
                    }
                }
            }
        }
        v
    }

    #[test]
    fn head_split_and_merge_kernels_group_heads_like_the_cpu_attention() {
        // Grouped and one-to-one heads; rows shorter and longer than a block's threads.
        for dims in [(2, 5, 4, 2, 3), (1, 3, 2, 2, 300), (2, 2, 6, 3, 64)] {
            heads::<f32>(dims);
            heads::<u16>(dims);
            heads::<half::f16>(dims);
        }
    }

    fn embedding<T: Storage>() {
        let (vocab, d) = (11, 40);
        let ids: Vec<u32> = [3, 7, 3, 0, 10, 7, 3, 2, 2].to_vec();
        let n = ids.len();
        let table = load(&store::<T>(&values(15, vocab * d, 1.0)));
        let ts = store::<T>(&table);
        let mut out = garbage::<T>(n * d);
        let (tp, ip, op) = (ts.as_ptr(), ids.as_ptr(), out.as_mut_ptr());
        launch(shape::elementwise(n * d), || unsafe {
            (T::ENTRIES.embed_fwd)(tp, ip, op, (n * d) as i64, d as i32)
        });
        let want: Vec<f32> = ids
            .iter()
            .flat_map(|&id| table[id as usize * d..(id as usize + 1) * d].to_vec())
            .collect();
        assert_eq!(load(&out), want);

        let dy = load(&store::<T>(&values(16, n * d, 1.0)));
        let dys = store::<T>(&dy);
        let groups = cpu::group_by_id(&ids);
        // The table's gradient starts as zeros (rows of ids that do not occur stay so).
        let mut dt = store::<T>(&vec![0.0; vocab * d]);
        let (dyp, op, sp, up, dtp) = (
            dys.as_ptr(),
            groups.order.as_ptr(),
            groups.starts.as_ptr(),
            groups.ids.as_ptr(),
            dt.as_mut_ptr(),
        );
        launch(shape::per_row(groups.ids.len(), d), || unsafe {
            (T::ENTRIES.embed_bwd)(dyp, op, sp, up, dtp, d as i32)
        });
        let mut want = vec![0.0f32; vocab * d];
        for (pos, &id) in ids.iter().enumerate() {
            for c in 0..d {
                want[id as usize * d + c] += dy[pos * d + c];
            }
        }
        assert_close("embedding backward", &load(&dt), &want, tolerance::<T>());
    }

    #[test]
    fn embedding_kernels_match_the_cpu() {
        embedding::<f32>();
        embedding::<u16>();
        embedding::<half::f16>();
    }

    fn dropout<T: Storage>() {
        let (n, start, p) = (5000, 0x1234_5678_9abc_def0u64, 0.1);
        let keep = (1.0 / (1.0 - p)) as f32;
        let mut out = garbage::<T>(n);
        let op = out.as_mut_ptr();
        launch(shape::elementwise(n), || unsafe {
            (T::ENTRIES.dropout_mask)(op, n as i64, start, p, keep)
        });
        let mut want = vec![0.0; n];
        cpu::dropout_mask(start, p, &mut want);
        let want = load(&store::<T>(&want));
        assert_eq!(load(&out), want, "the same draws, bit for bit");
    }

    #[test]
    fn dropout_mask_kernel_draws_the_cpu_generator_bit_for_bit() {
        dropout::<f32>();
        dropout::<u16>();
        dropout::<half::f16>();
    }

    #[test]
    fn adamw_and_gradient_norm_kernels_match_the_cpu() {
        let n = 70_001;
        let s = AdamStep {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            decay: 1.0 - 1e-3 * 0.01,
            step_size: 1e-3 / (1.0 - 0.9f32.powi(3)),
            bc2_sqrt: (1.0 - 0.999f32.powi(3)).sqrt(),
            grad_scale: 0.5,
        };
        let g = values(17, n, 1.0);
        let (m0, v0, p0) = (values(18, n, 0.1), values(19, n, 0.01), values(20, n, 1.0));
        let v0: Vec<f32> = v0.iter().map(|x| x.abs()).collect();
        let (mut m, mut v, mut p) = (m0.clone(), v0.clone(), p0.clone());
        let (mp, vp, pp, gp) = (m.as_mut_ptr(), v.as_mut_ptr(), p.as_mut_ptr(), g.as_ptr());
        launch(shape::elementwise(n), || unsafe {
            adamw_step(
                pp,
                mp,
                vp,
                gp,
                n as i64,
                s.beta1,
                s.beta2,
                s.grad_scale,
                s.decay,
                s.step_size,
                s.bc2_sqrt,
                s.eps,
            )
        });
        let (mut wm, mut wv, mut wp) = (m0, v0, p0);
        cpu::adamw_step(&mut wp, &mut wm, &mut wv, &g, &s);
        // The same f32 operations in the same order: the same bits.
        assert_eq!((m, v, p), (wm, wv, wp));

        let l = shape::sum_squares();
        let mut part = vec![f32::NAN; l.grid];
        let pp = part.as_mut_ptr();
        launch(l, || unsafe { sum_squares_part(gp, n as i64, pp) });
        // Summed on the host as `train::cuda::sums_of_squares` does.
        let total: f64 = part.iter().map(|&x| x as f64).sum();
        let want = cpu::sum_squares(&g);
        assert!((total - want).abs() <= 1e-5 * want, "{total} vs {want}");
    }

    /// bf16 and f16 softmax kernels against the f32 ones (which the blocked attention plan's
    /// test runs against plain attention) on one block of rows with a prefix and a window.
    #[test]
    fn attention_softmax_kernels_in_16_bits_follow_f32() {
        let m = Dims {
            b: 1,
            t: 40,
            h: 2,
            s: 50,
            kv: 2,
            d: 8,
            start: 10,
            window: Some(24),
        };
        let (r0, rows) = (8, 24);
        let e = (m.start + r0 + rows).min(m.s);
        let bh = m.b * m.h;
        let n = bh * rows * m.s;
        let scores = values(21, n, 8.0);
        let dp = values(22, n, 1.0);
        let d_out = load(&store::<u16>(&values(23, bh * m.t * m.d, 1.0)));
        let out = load(&store::<u16>(&values(24, bh * m.t * m.d, 1.0)));
        let mut results = Vec::new();
        let mut lses = Vec::new();
        fn run<T: Storage>(
            m: &Dims,
            (r0, rows, keys_end): (usize, usize, usize),
            (scores, dp, d_out, out): (&[f32], &[f32], &[f32], &[f32]),
        ) -> (Vec<f32>, [Vec<f32>; 3]) {
            let dev = HostAttention::<T>::new();
            let block = SoftmaxBlock {
                dims: *m,
                r0,
                rows,
                keys_end,
            };
            let n = scores.len();
            let mut lse = vec![f32::NAN; m.b * m.h * m.t];
            let mut p = garbage::<T>(n);
            let fwd = SoftmaxFwdBufs {
                scores: scores.as_ptr() as u64,
                p: p.as_mut_ptr() as u64,
                lse: lse.as_mut_ptr() as u64,
            };
            dev.softmax_fwd(fwd, block).unwrap();
            let p_fwd = load(&p);
            let (mut p, mut ds) = (garbage::<T>(n), garbage::<T>(n));
            let (d_out, out) = (store::<T>(d_out), store::<T>(out));
            let bwd = SoftmaxBwdBufs {
                scores: scores.as_ptr() as u64,
                dp: dp.as_ptr() as u64,
                lse: lse.as_ptr() as u64,
                d_out: d_out.as_ptr() as u64,
                out: out.as_ptr() as u64,
                p: p.as_mut_ptr() as u64,
                ds: ds.as_mut_ptr() as u64,
            };
            dev.softmax_bwd(bwd, block).unwrap();
            (lse, [p_fwd, load(&p), load(&ds)])
        }
        let inputs = (&scores[..], &dp[..], &d_out[..], &out[..]);
        for (lse, r) in [
            run::<f32>(&m, (r0, rows, e), inputs),
            run::<u16>(&m, (r0, rows, e), inputs),
            run::<half::f16>(&m, (r0, rows, e), inputs),
        ] {
            lses.push(lse);
            results.push(r);
        }
        // Only the block's rows have log-sum-exps; the keys past `e` are neither read nor
        // written (they stay NaN).
        for (item, row) in itertools_4(bh, m.t, 1, 1)
            .into_iter()
            .map(|(a, b, _, _)| (a, b))
        {
            let inside = (r0..r0 + rows).contains(&row);
            assert_eq!(
                lses[0][item * m.t + row].is_nan(),
                !inside,
                "lse {item} {row}"
            );
        }
        let block_rows = |l: &[f32]| -> Vec<f32> {
            (0..bh)
                .flat_map(|item| l[item * m.t + r0..item * m.t + r0 + rows].to_vec())
                .collect()
        };
        for (half, tol) in [(1, 2e-2), (2, 2e-3)] {
            for (name, (a, b)) in ["p (forward)", "p (backward)", "ds"]
                .iter()
                .zip(results[0].iter().zip(&results[half]))
            {
                for r in 0..bh * rows {
                    for x in [a, b] {
                        let row = &x[r * m.s..(r + 1) * m.s];
                        assert!(
                            row[e..].iter().all(|x| x.is_nan()),
                            "{name}: written past e"
                        );
                        assert!(
                            row[..e].iter().all(|x| x.is_finite()),
                            "{name}: not written"
                        );
                    }
                    let (a, b) = (&a[r * m.s..r * m.s + e], &b[r * m.s..r * m.s + e]);
                    assert_close(name, b, a, tol);
                }
            }
            assert_close("lse", &block_rows(&lses[half]), &block_rows(&lses[0]), 1e-6);
        }
        // Each forward row of P sums to one over the keys it may see.
        for r in 0..bh * rows {
            let s: f32 = results[0][0][r * m.s..r * m.s + e].iter().sum();
            assert!((s - 1.0).abs() < 1e-5, "row {r} sums to {s}");
        }
    }

    /// The whole attention call as `train::cuda` runs it (`attention_device`'s sequence: head
    /// copies, blocked products through cuBLAS's column-major interface, softmax kernels, dK/dV
    /// summed in f32 and merged back), on the emulated device, against the CPU's flash
    /// attention: output, log-sum-exps and the three gradients, with grouped heads, a prefix of
    /// keys, a sliding window and several blocks of rows.
    fn attention_call<T: Storage>(m: Dims, tol: f32) {
        use crate::train::attention_device::{self, BackwardInputs};
        use crate::train::kernels::attention as cpu_attention;
        let rounded = |seed, n| load(&store::<T>(&values(seed, n, 1.0)));
        let (nq, nk) = (m.b * m.t * m.h * m.d, m.b * m.s * m.kv * m.d);
        let (q, k, v) = (rounded(30, nq), rounded(31, nk), rounded(32, nk));
        let d_out = rounded(33, nq);
        let (qs, ks, vs, dos) = (
            store::<T>(&q),
            store::<T>(&k),
            store::<T>(&v),
            store::<T>(&d_out),
        );
        let dev = HostAttention::<T>::new();
        let addr = |x: &[T]| x.as_ptr() as u64;
        let (out, lse) =
            attention_device::forward(&dev, (addr(&qs), addr(&ks), addr(&vs)), m).unwrap();
        // SAFETY: `forward` returns buffers of the output's and the log-sum-exps' sizes.
        let out_t: &[T] = unsafe { std::slice::from_raw_parts(out.as_ptr() as *const T, nq) };
        let lse_f: &[f32] =
            unsafe { std::slice::from_raw_parts(lse.as_ptr() as *const f32, m.b * m.h * m.t) };
        let (want_out, want_lse) = cpu_attention::forward(&q, &k, &v, m);
        assert_close("attention output", &load(out_t), &want_out, tol);
        assert_close("attention lse", lse_f, &want_lse, 1e-5);
        let inputs = BackwardInputs {
            q: addr(&qs),
            k: addr(&ks),
            v: addr(&vs),
            out: addr(out_t),
            lse: lse_f.as_ptr() as u64,
            d_out: addr(&dos),
        };
        let packed = attention_device::backward(&dev, inputs, m).unwrap();
        // SAFETY: `backward` returns dQ, dK and dV packed in one buffer of the compute type.
        let grads: &[T] =
            unsafe { std::slice::from_raw_parts(packed.as_ptr() as *const T, nq + 2 * nk) };
        let want = cpu_attention::backward(&q, &k, &v, &load(out_t), &d_out, lse_f, m);
        for (name, range) in [
            ("dq", 0..nq),
            ("dk", nq..nq + nk),
            ("dv", nq + nk..nq + 2 * nk),
        ] {
            assert_close(name, &load(&grads[range.clone()]), &want[range], tol);
        }
    }

    /// The VRAM estimate's attention working set is what the GPU attention's sequence
    /// (`attention_device`) allocates at its peak, counted on the emulated device: the
    /// backward's bytes beyond the forward's output and log-sum-exps, which the estimate counts
    /// with the layer's activations, in f32, bf16 and f16, for one block, several blocks and
    /// grouped heads.
    fn attention_allocations<T: Storage>(m: Dims) {
        use crate::estimate::{ModelShape, attention_working_set};
        use crate::train::attention_device::{self, BackwardInputs};
        let (nq, nk) = (m.b * m.t * m.h * m.d, m.b * m.s * m.kv * m.d);
        let (q, k, v, d_out) = (
            store::<T>(&values(40, nq, 1.0)),
            store::<T>(&values(41, nk, 1.0)),
            store::<T>(&values(42, nk, 1.0)),
            store::<T>(&values(43, nq, 1.0)),
        );
        let dev = HostAttention::<T>::new();
        let addr = |x: &[T]| x.as_ptr() as u64;
        let (out, lse) =
            attention_device::forward(&dev, (addr(&q), addr(&k), addr(&v)), m).unwrap();
        let c = std::mem::size_of::<T>();
        let kept = dev.live_bytes();
        assert_eq!(
            kept,
            nq * c + m.b * m.h * m.t * 4,
            "the forward keeps its output and lse"
        );
        let forward_peak = dev.peak_bytes();
        dev.reset_peak();
        let inputs = BackwardInputs {
            q: addr(&q),
            k: addr(&k),
            v: addr(&v),
            out: out.as_ptr() as u64,
            lse: lse.as_ptr() as u64,
            d_out: addr(&d_out),
        };
        let packed = attention_device::backward(&dev, inputs, m).unwrap();
        assert_eq!(
            dev.live_bytes() - kept,
            (nq + 2 * nk) * c,
            "only dQ, dK, dV remain"
        );
        let backward = dev.peak_bytes() - kept;
        drop(packed);
        let shape = ModelShape {
            hidden: (m.h * m.d) as u64,
            intermediate: 1,
            layers: 1,
            heads: m.h as u64,
            kv_heads: m.kv as u64,
            head_dim: m.d as u64,
            vocab: 1,
            tied: false,
            qkv_bias: false,
            qk_norm: false,
        };
        let estimate = attention_working_set(&shape, m.b as u64, m.t as u64, c as u64);
        assert_eq!(estimate, backward as u64, "{m:?}, {c}-byte type");
        assert!(
            forward_peak < backward + kept,
            "the backward's peak is the larger"
        );
    }

    #[test]
    fn the_vram_estimate_counts_what_the_attention_call_allocates() {
        let dims = |b, t, h, kv, d| Dims {
            b,
            t,
            h,
            s: t,
            kv,
            d,
            start: 0,
            window: None,
        };
        // A few tokens (the packed gradients are the peak), one block, three blocks of 128
        // rows with a short last one, grouped heads.
        for m in [
            dims(2, 3, 4, 4, 64),
            dims(2, 40, 4, 2, 8),
            dims(1, 300, 4, 2, 8),
        ] {
            attention_allocations::<f32>(m);
            attention_allocations::<u16>(m);
            attention_allocations::<half::f16>(m);
        }
    }

    #[test]
    fn attention_call_on_the_emulated_device_matches_the_cpu_attention() {
        let dims = |t, s, start, window| Dims {
            b: 2,
            t,
            h: 4,
            s,
            kv: 2,
            d: 8,
            start,
            window,
        };
        // One block; three blocks of 128 rows with a short last one, a prefix of keys and a
        // window.
        for m in [dims(40, 40, 0, None), dims(300, 320, 20, Some(150))] {
            attention_call::<f32>(m, 2e-5);
            attention_call::<u16>(m, 2e-2);
            attention_call::<half::f16>(m, 2e-3);
        }
    }
}
