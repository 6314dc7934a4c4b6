//! The fused training ops on CUDA (feature `cuda`): the kernels of `kernels.cu` (compiled to
//! PTX by build.rs, loaded once per device) and cuBLAS's batched products, launched on Candle's
//! stream. [`super::ops`] calls these from its custom ops' `cuda_fwd` and `bwd`, so the model,
//! autograd and the trainer are the same on every device.
//!
//! Storage types are f32, bf16 and f16 (arithmetic in f32; matrix products accumulate in f32).
//! Attention keeps only the rows' log-sum-exps between forward and backward: its scores exist
//! inside one call, one block of query rows at a time ([`crate::train::attention_blocks`]),
//! never across the graph (the backward recomputes them with one more batched product, as
//! flash attention recomputes its tiles).

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::cublas::sys as cublas;
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaStream, DevicePtr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDevice, CudaStorage};
use candle_core::{CustomOp1, DType, Layout, Shape, Storage, Tensor, bail};
use half::{bf16, f16};

use super::attention_device::{
    self, AttentionDevice, BackwardInputs, ColumnMajorGemm, Elem, Matrix, SoftmaxBlock,
    SoftmaxBwdBufs, SoftmaxFwdBufs,
};
use super::kernel_launch::{self as shape, Launch};
use super::kernels::attention::Dims as AttnDims;
use super::ops::split_views;

type Result<T> = candle_core::Result<T>;

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/jobd_kernels.ptx"));
const MODULE: &str = "jobd_kernels";

/// A device buffer of one of the storage types.
pub(crate) enum Buf {
    F32(CudaSlice<f32>),
    Bf16(CudaSlice<bf16>),
    F16(CudaSlice<f16>),
}

impl Buf {
    /// Uninitialised buffer of `n` elements (every kernel writes all of its output).
    pub(crate) fn alloc(dev: &CudaDevice, dtype: DType, n: usize) -> Result<Buf> {
        // SAFETY: the kernels that fill these buffers write every element before any read.
        Ok(match dtype {
            DType::F32 => Buf::F32(unsafe { dev.alloc::<f32>(n.max(1))? }),
            DType::BF16 => Buf::Bf16(unsafe { dev.alloc::<bf16>(n.max(1))? }),
            DType::F16 => Buf::F16(unsafe { dev.alloc::<f16>(n.max(1))? }),
            other => bail!("jobd cuda kernels: unsupported type {other:?}"),
        })
    }

    pub(crate) fn ptr(&self, stream: &CudaStream) -> u64 {
        match self {
            Buf::F32(s) => s.device_ptr(stream).0,
            Buf::Bf16(s) => s.device_ptr(stream).0,
            Buf::F16(s) => s.device_ptr(stream).0,
        }
    }

    /// Zero-filled buffer of `n` elements.
    pub(crate) fn zeros(dev: &CudaDevice, dtype: DType, n: usize) -> Result<Buf> {
        Ok(match dtype {
            DType::F32 => Buf::F32(dev.alloc_zeros::<f32>(n.max(1))?),
            DType::BF16 => Buf::Bf16(dev.alloc_zeros::<bf16>(n.max(1))?),
            DType::F16 => Buf::F16(dev.alloc_zeros::<f16>(n.max(1))?),
            other => bail!("jobd cuda kernels: unsupported type {other:?}"),
        })
    }

    fn into_storage(self, dev: &CudaDevice) -> CudaStorage {
        match self {
            Buf::F32(s) => CudaStorage::wrap_cuda_slice(s, dev.clone()),
            Buf::Bf16(s) => CudaStorage::wrap_cuda_slice(s, dev.clone()),
            Buf::F16(s) => CudaStorage::wrap_cuda_slice(s, dev.clone()),
        }
    }
}

/// Kernel-name suffix and element size of a storage type.
fn suffix(dtype: DType) -> Result<(&'static str, usize)> {
    match dtype {
        DType::F32 => Ok(("f32", 4)),
        DType::BF16 => Ok(("bf16", 2)),
        DType::F16 => Ok(("f16", 2)),
        other => bail!("jobd cuda kernels: unsupported type {other:?}"),
    }
}

/// Device address of the first element of a contiguous tensor in `s` under `l`.
fn addr(s: &CudaStorage, l: &Layout, stream: &CudaStream) -> Result<u64> {
    if !l.is_contiguous() {
        bail!("jobd cuda kernels: input is not contiguous");
    }
    let (base, size) = match s.dtype() {
        DType::F32 => (s.as_cuda_slice::<f32>()?.device_ptr(stream).0, 4),
        DType::BF16 => (s.as_cuda_slice::<bf16>()?.device_ptr(stream).0, 2),
        DType::F16 => (s.as_cuda_slice::<f16>()?.device_ptr(stream).0, 2),
        DType::U32 => (s.as_cuda_slice::<u32>()?.device_ptr(stream).0, 4),
        other => bail!("jobd cuda kernels: unsupported type {other:?}"),
    };
    Ok(base + (l.start_offset() * size) as u64)
}

/// The CUDA storage of a tensor, read-locked for the duration of `f`.
fn with_storage<R>(t: &Tensor, f: impl FnOnce(&CudaStorage, &Layout) -> Result<R>) -> Result<R> {
    let (guard, layout) = t.storage_and_layout();
    match &*guard {
        Storage::Cuda(s) => f(s, layout),
        _ => bail!("jobd cuda kernels: tensor is not on a CUDA device"),
    }
}

/// Device address of a contiguous CUDA tensor. Valid while the tensor lives: the caller keeps
/// the tensor alive across the launches that use the address (all on Candle's one stream).
fn tensor_addr(t: &Tensor, stream: &CudaStream) -> Result<u64> {
    with_storage(t, |s, l| addr(s, l, stream))
}

/// Cudarc's form of a launch shape.
fn config(l: Launch) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (l.grid as u32, 1, 1),
        block_dim: (l.block as u32, 1, 1),
        shared_mem_bytes: l.shared as u32,
    }
}

/// Launches `$name` from the jobd module with the given [`Launch`] shape and arguments (each
/// argument bound to a local, so it outlives the launch builder).
macro_rules! launch {
    ($dev:expr, $name:expr, $cfg:expr; $($arg:expr),* $(,)?) => {{
        let func = $dev.get_or_load_custom_func(&$name, MODULE, PTX)?;
        let mut builder = func.builder();
        $(
            let arg = $arg;
            builder.arg(&arg);
        )*
        // SAFETY: argument types and counts match the kernel's signature in kernels.cu; every
        // address points into a live allocation of the size the kernel indexes.
        unsafe { builder.launch(config($cfg)) }
            .map_err(|e| candle_core::Error::Msg(format!("{}: {e:?}", $name)))?;
    }};
}

/// Row-major batched product `C = α·op(A)·op(B) + β·C` (op(A) m×k, op(B) k×n, C m×n) with
/// inputs of `dtype` and C in f32 when `c_f32`, through [`cublas_gemm`].
#[allow(clippy::too_many_arguments)]
fn gemm(
    dev: &CudaDevice,
    dtype: DType,
    c_f32: bool,
    trans: (bool, bool),
    mnk: (usize, usize, usize),
    a: Matrix,
    b: Matrix,
    c: Matrix,
    batch: usize,
    beta: f32,
) -> Result<()> {
    let g = ColumnMajorGemm::row_major(trans, mnk, a, b, c, c_f32, batch, beta);
    cublas_gemm(dev, dtype, &g)
}

/// One `cublasGemmStridedBatchedEx` call as `g` describes it (A and B of `dtype`, alpha 1);
/// accumulation in f32 (TF32 when Candle's reduced-precision f32 flag is set).
fn cublas_gemm(dev: &CudaDevice, dtype: DType, g: &ColumnMajorGemm) -> Result<()> {
    let ty = match dtype {
        DType::F32 => cublas::cudaDataType_t::CUDA_R_32F,
        DType::BF16 => cublas::cudaDataType_t::CUDA_R_16BF,
        DType::F16 => cublas::cudaDataType_t::CUDA_R_16F,
        other => bail!("jobd gemm: unsupported type {other:?}"),
    };
    let c_ty = if g.c_f32 {
        cublas::cudaDataType_t::CUDA_R_32F
    } else {
        ty
    };
    let compute = if dtype == DType::F32 && candle_core::cuda_backend::gemm_reduced_precision_f32()
    {
        cublas::cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_TF32
    } else {
        cublas::cublasComputeType_t::CUBLAS_COMPUTE_32F
    };
    let op = |t: bool| {
        if t {
            cublas::cublasOperation_t::CUBLAS_OP_T
        } else {
            cublas::cublasOperation_t::CUBLAS_OP_N
        }
    };
    let alpha = 1.0f32;
    let blas = dev.cublas_handle();
    let i = |v: usize| v as std::ffi::c_int;
    let l = |v: usize| v as std::ffi::c_longlong;
    let ((a, lda, stride_a), (b, ldb, stride_b), (c, ldc, stride_c)) = (g.a, g.b, g.c);
    // SAFETY: the addresses point into live device allocations holding the matrices with the
    // given leading dimensions and batch strides; the handle is bound to Candle's stream.
    unsafe {
        candle_core::cuda_backend::cudarc::cublas::result::gemm_strided_batched_ex(
            *blas.handle(),
            op(g.trans_a),
            op(g.trans_b),
            i(g.m),
            i(g.n),
            i(g.k),
            &alpha as *const f32 as *const _,
            a as *const _,
            ty,
            i(lda),
            l(stride_a),
            b as *const _,
            ty,
            i(ldb),
            l(stride_b),
            &g.beta as *const f32 as *const _,
            c as *mut _,
            c_ty,
            i(ldc),
            l(stride_c),
            i(g.batch),
            compute,
            cublas::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT_TENSOR_OP,
        )
    }
    .map_err(|e| candle_core::Error::Msg(format!("jobd gemm: {e:?}")))
}

/// Lets the device's default memory pool keep the memory it has mapped instead of returning it
/// to the driver at every synchronisation (the stream-ordered allocator's default release
/// threshold is 0). A training step synchronises a few times (the loss, the gradient norm),
/// and after each the next allocations would map their memory again. A worker then holds its
/// peak until it exits, as PyTorch's caching allocator does; the scheduler has reserved that
/// much for it, and NVML's view of the process shows its true peak.
pub(crate) fn keep_pool_memory(dev: &CudaDevice) -> Result<()> {
    use candle_core::cuda_backend::cudarc::driver::{result, sys};
    let stream = dev.cuda_stream();
    let ctx = stream.context();
    if !ctx.has_async_alloc() {
        return Ok(());
    }
    let failed = |e| candle_core::Error::Msg(format!("memory pool: {e:?}"));
    ctx.bind_to_thread().map_err(failed)?;
    let mut threshold = u64::MAX;
    // SAFETY: the device comes from the live context; the attribute takes a u64.
    unsafe {
        let pool = result::device::get_default_mem_pool(ctx.cu_device()).map_err(failed)?;
        result::mem_pool::set_attribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            &mut threshold as *mut u64 as *mut std::ffi::c_void,
        )
        .map_err(failed)
    }
}

/// A one-off custom op whose CUDA forward is the closure: how a backward pass produces a new
/// tensor from kernels (the closure reads the tensors it captured; the anchor only picks the
/// device and is not read).
struct Run<F> {
    name: &'static str,
    f: F,
}

impl<F> CustomOp1 for Run<F>
where
    F: Fn(&CudaDevice) -> Result<(CudaStorage, Shape)> + Send + Sync,
{
    fn name(&self) -> &'static str {
        self.name
    }

    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &Layout,
    ) -> Result<(candle_core::CpuStorage, Shape)> {
        bail!("{}: CUDA only", self.name)
    }

    fn cuda_fwd(&self, s: &CudaStorage, _: &Layout) -> Result<(CudaStorage, Shape)> {
        (self.f)(s.device())
    }
}

fn run<F>(anchor: &Tensor, name: &'static str, f: F) -> Result<Tensor>
where
    F: Fn(&CudaDevice) -> Result<(CudaStorage, Shape)> + Send + Sync,
{
    anchor.apply_op1_no_bwd(&Run { name, f })
}

// ---------------------------------------------------------------------------------------------
// Dropout

/// Inverted dropout's mask in `x`'s shape and type on its device: the i-th element from the
/// i-th draw of the generator at state `start` (the same bits as the CPU's
/// `kernels::dropout_mask`).
pub(crate) fn dropout_mask(x: &Tensor, start: u64, p: f64) -> Result<Tensor> {
    let n = x.elem_count();
    let dtype = x.dtype();
    let keep = (1.0 / (1.0 - p)) as f32;
    run(x, "jobd-dropout-mask", |dev| {
        let stream = dev.cuda_stream();
        let (sfx, _) = suffix(dtype)?;
        let out = Buf::alloc(dev, dtype, n)?;
        launch!(dev, format!("dropout_mask_{sfx}"), shape::elementwise(n);
            out.ptr(&stream), n as i64, start, p, keep);
        Ok((out.into_storage(dev), x.shape().clone()))
    })
}

// ---------------------------------------------------------------------------------------------
// Embedding

/// Rows of an embedding table `(V, d)` for token ids, as a custom op whose backward sums each
/// id's gradient rows (Candle's `index_select` backward is `index_add`, whose CUDA kernel runs
/// one thread per column through every id in turn: milliseconds for a batch of 8k tokens).
pub(crate) struct Embedding {
    /// The ids on the device (u32, contiguous).
    ids: Tensor,
    /// The same ids on the host, to group positions by id for the backward.
    host: Vec<u32>,
}

impl Embedding {
    pub(crate) fn new(ids: Tensor, host: Vec<u32>) -> Self {
        Embedding { ids, host }
    }
}

impl CustomOp1 for Embedding {
    fn name(&self) -> &'static str {
        "jobd-embedding"
    }

    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &Layout,
    ) -> Result<(candle_core::CpuStorage, Shape)> {
        bail!("jobd-embedding: CUDA only")
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        let dev = s.device();
        let stream = dev.cuda_stream();
        let (_, d) = l.shape().dims2()?;
        let n = self.host.len();
        let (sfx, _) = suffix(s.dtype())?;
        let out = Buf::alloc(dev, s.dtype(), n * d)?;
        launch!(dev, format!("embed_fwd_{sfx}"), shape::elementwise(n * d);
            addr(s, l, &stream)?, tensor_addr(&self.ids, &stream)?, out.ptr(&stream),
            (n * d) as i64, d as i32);
        Ok((out.into_storage(dev), Shape::from((n, d))))
    }

    fn bwd(&self, table: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let (vocab, d) = table.dims2()?;
        let grad = grad.contiguous()?;
        let crate::train::kernels::IdGroups {
            order,
            starts,
            ids: uniq,
        } = crate::train::kernels::group_by_id(&self.host);
        let dev = table.device();
        let groups = uniq.len();
        if groups == 0 {
            return Ok(Some(table.zeros_like()?));
        }
        let order = Tensor::from_vec(order, self.host.len(), dev)?;
        let starts = Tensor::from_vec(starts, groups + 1, dev)?;
        let uniq = Tensor::from_vec(uniq, groups, dev)?;
        let dt = run(table, "jobd-embedding-bwd", |cdev| {
            let stream = cdev.cuda_stream();
            let (sfx, _) = suffix(table.dtype())?;
            let out = Buf::zeros(cdev, table.dtype(), vocab * d)?;
            launch!(cdev, format!("embed_bwd_{sfx}"), shape::per_row(groups, d);
                tensor_addr(&grad, &stream)?, tensor_addr(&order, &stream)?,
                tensor_addr(&starts, &stream)?, tensor_addr(&uniq, &stream)?,
                out.ptr(&stream), d as i32);
            Ok((out.into_storage(cdev), table.shape().clone()))
        })?;
        Ok(Some(dt))
    }
}

// ---------------------------------------------------------------------------------------------
// Linear

/// `(rows, in, out)` of `x` `(..., in)` times `w` `(out, in)`.
fn linear_dims(x: &Layout, w: &Layout) -> Result<(usize, usize, usize)> {
    let (out, inp) = w.shape().dims2()?;
    if x.dims().last() != Some(&inp) {
        bail!("linear: input {:?}, weight {:?}", x.dims(), w.dims());
    }
    Ok((x.shape().elem_count() / inp.max(1), inp, out))
}

/// `y = x · wᵀ` in `x`'s type; an f32 `w` with a 16-bit `x` is cast for the product.
pub(crate) fn linear_fwd(
    x: (&CudaStorage, &Layout),
    w: (&CudaStorage, &Layout),
) -> Result<(CudaStorage, Shape)> {
    let dev = x.0.device();
    let stream = dev.cuda_stream();
    let dtype = x.0.dtype();
    let (rows, inp, out) = linear_dims(x.1, w.1)?;
    let cast;
    let w_addr = if w.0.dtype() == dtype {
        addr(w.0, w.1, &stream)?
    } else {
        cast = w.0.to_dtype(w.1, dtype)?;
        addr(&cast, &Layout::contiguous(w.1.shape()), &stream)?
    };
    let y = Buf::alloc(dev, dtype, rows * out)?;
    gemm(
        dev,
        dtype,
        false,
        (false, true),
        (rows, out, inp),
        (addr(x.0, x.1, &stream)?, inp, 0),
        (w_addr, inp, 0),
        (y.ptr(&stream), out, 0),
        1,
        0.0,
    )?;
    let mut shape = x.1.dims()[..x.1.dims().len() - 1].to_vec();
    shape.push(out);
    Ok((y.into_storage(dev), Shape::from(shape)))
}

/// `(dx, dw)` of [`linear_fwd`]: `dx = dy · w` in `x`'s type, and (when `want_dw`)
/// `dw = dyᵀ · x` written in `w`'s type and layout (f32 straight from the product for an f32
/// master).
pub(crate) fn linear_bwd(
    x: &Tensor,
    w: &Tensor,
    dy: &Tensor,
    want_dw: bool,
) -> Result<(Tensor, Option<Tensor>)> {
    let dtype = x.dtype();
    let (out, inp) = w.dims2()?;
    let rows = x.elem_count() / inp.max(1);
    let wc = w.to_dtype(dtype)?.contiguous()?;
    let dx = run(x, "jobd-linear-dx", |dev| {
        let stream = dev.cuda_stream();
        let dx = Buf::alloc(dev, dtype, rows * inp)?;
        gemm(
            dev,
            dtype,
            false,
            (false, false),
            (rows, inp, out),
            (tensor_addr(dy, &stream)?, out, 0),
            (tensor_addr(&wc, &stream)?, inp, 0),
            (dx.ptr(&stream), inp, 0),
            1,
            0.0,
        )?;
        Ok((dx.into_storage(dev), x.shape().clone()))
    })?;
    if !want_dw {
        return Ok((dx, None));
    }
    let dw = run(w, "jobd-linear-dw", |dev| {
        let stream = dev.cuda_stream();
        let dw = Buf::alloc(dev, w.dtype(), out * inp)?;
        gemm(
            dev,
            dtype,
            w.dtype() == DType::F32,
            (true, false),
            (out, inp, rows),
            (tensor_addr(dy, &stream)?, out, 0),
            (tensor_addr(x, &stream)?, inp, 0),
            (dw.ptr(&stream), inp, 0),
            1,
            0.0,
        )?;
        Ok((dw.into_storage(dev), w.shape().clone()))
    })?;
    Ok((dx, Some(dw)))
}

// ---------------------------------------------------------------------------------------------
// RMSNorm

/// RMSNorm forward of `x` (rows × d, f32, bf16 or f16) with an f32 weight.
pub(crate) fn rms_norm_fwd(
    x: (&CudaStorage, &Layout),
    w: (&CudaStorage, &Layout),
    eps: f32,
) -> Result<(CudaStorage, Shape)> {
    let dev = x.0.device();
    let stream = dev.cuda_stream();
    let d = w.1.shape().elem_count();
    let n = x.1.shape().elem_count();
    if w.0.dtype() != DType::F32 || x.1.dims().last() != Some(&d) {
        bail!(
            "rms_norm: weight {:?} for input {:?}",
            w.1.dims(),
            x.1.dims()
        );
    }
    let (sfx, _) = suffix(x.0.dtype())?;
    let rows = n / d.max(1);
    let y = Buf::alloc(dev, x.0.dtype(), n)?;
    launch!(dev, format!("rms_fwd_{sfx}"), shape::per_row(rows, d);
        addr(x.0, x.1, &stream)?, addr(w.0, w.1, &stream)?, y.ptr(&stream),
        rows as i32, d as i32, eps);
    Ok((y.into_storage(dev), x.1.shape().clone()))
}

/// RMSNorm backward: `(dx, dw)`.
pub(crate) fn rms_norm_bwd(
    x: &Tensor,
    w: &Tensor,
    dy: &Tensor,
    eps: f32,
) -> Result<(Tensor, Tensor)> {
    let d = w.elem_count();
    let n = x.elem_count();
    let rows = n / d.max(1);
    if d > shape::RMS_BWD_MAX_ROW {
        bail!(
            "rms_norm: rows of {d} are too long for the CUDA kernel (at most {})",
            shape::RMS_BWD_MAX_ROW
        );
    }
    let launch = shape::rms_bwd(rows, d);
    let blocks = launch.grid;
    let partial = std::sync::Mutex::new(None::<CudaSlice<f32>>);
    let dx = run(x, "jobd-rms-norm-bwd", |dev| {
        let stream = dev.cuda_stream();
        let (sfx, _) = suffix(x.dtype())?;
        let out = Buf::alloc(dev, x.dtype(), n)?;
        // SAFETY: rms_bwd writes every element of its block's row of partial sums.
        let part = unsafe { dev.alloc::<f32>(blocks * d)? };
        launch!(dev, format!("rms_bwd_{sfx}"), launch;
            tensor_addr(x, &stream)?, tensor_addr(w, &stream)?, tensor_addr(dy, &stream)?,
            out.ptr(&stream), part.device_ptr(&stream).0,
            rows as i32, d as i32, eps, shape::RMS_BWD_ROWS_PER_BLOCK as i32);
        *partial.lock().expect("rms partial lock") = Some(part);
        Ok((out.into_storage(dev), x.shape().clone()))
    })?;
    let part = partial
        .lock()
        .expect("rms partial lock")
        .take()
        .ok_or_else(|| {
            candle_core::Error::Msg("rms_norm: backward lost its partial sums".into())
        })?;
    let dw = run(w, "jobd-rms-norm-dw", |dev| {
        let stream = dev.cuda_stream();
        let out = Buf::alloc(dev, DType::F32, d)?;
        launch!(dev, "rms_dw_sum", shape::rms_dw_sum(d);
            part.device_ptr(&stream).0, out.ptr(&stream), blocks as i32, d as i32);
        Ok((out.into_storage(dev), w.shape().clone()))
    })?;
    Ok((dx, dw))
}

// ---------------------------------------------------------------------------------------------
// Rotary embeddings

/// Rotation (or its inverse) of `x` `(B, T, heads·hd)` with f32 tables `(T, hd)`.
pub(crate) fn rope(
    x: (&CudaStorage, &Layout),
    cos: (&CudaStorage, &Layout),
    sin: (&CudaStorage, &Layout),
    (t, heads, hd): (usize, usize, usize),
    transpose: bool,
) -> Result<(CudaStorage, Shape)> {
    let dev = x.0.device();
    let stream = dev.cuda_stream();
    if cos.0.dtype() != DType::F32 || sin.0.dtype() != DType::F32 {
        bail!("rope: the CUDA kernel takes f32 tables");
    }
    let (sfx, _) = suffix(x.0.dtype())?;
    let n = x.1.shape().elem_count();
    let rows = n / (heads * hd).max(1);
    let y = Buf::alloc(dev, x.0.dtype(), n)?;
    launch!(dev, format!("rope_{sfx}"), shape::rope(rows, heads, hd);
        addr(x.0, x.1, &stream)?, addr(cos.0, cos.1, &stream)?, addr(sin.0, sin.1, &stream)?,
        y.ptr(&stream), rows as i64, t as i32, heads as i32, hd as i32, transpose as i32);
    Ok((y.into_storage(dev), x.1.shape().clone()))
}

// ---------------------------------------------------------------------------------------------
// SwiGLU

pub(crate) fn swiglu_fwd(
    g: (&CudaStorage, &Layout),
    u: (&CudaStorage, &Layout),
) -> Result<(CudaStorage, Shape)> {
    let dev = g.0.device();
    let stream = dev.cuda_stream();
    if g.0.dtype() != u.0.dtype() || g.1.shape() != u.1.shape() {
        bail!("swiglu: {:?} and {:?}", g.1.dims(), u.1.dims());
    }
    let (sfx, _) = suffix(g.0.dtype())?;
    let n = g.1.shape().elem_count();
    let y = Buf::alloc(dev, g.0.dtype(), n)?;
    launch!(dev, format!("swiglu_fwd_{sfx}"), shape::elementwise(n);
        addr(g.0, g.1, &stream)?, addr(u.0, u.1, &stream)?, y.ptr(&stream), n as i64);
    Ok((y.into_storage(dev), g.1.shape().clone()))
}

/// `(d gate, d up)`.
pub(crate) fn swiglu_bwd(gate: &Tensor, up: &Tensor, dy: &Tensor) -> Result<(Tensor, Tensor)> {
    let n = gate.elem_count();
    let all = run(gate, "jobd-swiglu-bwd", |dev| {
        let stream = dev.cuda_stream();
        let (sfx, size) = suffix(gate.dtype())?;
        let out = Buf::alloc(dev, gate.dtype(), 2 * n)?;
        let base = out.ptr(&stream);
        launch!(dev, format!("swiglu_bwd_{sfx}"), shape::elementwise(n);
            tensor_addr(gate, &stream)?, tensor_addr(up, &stream)?, tensor_addr(dy, &stream)?,
            base, base + (n * size) as u64, n as i64);
        Ok((out.into_storage(dev), Shape::from(2 * n)))
    })?;
    let parts = split_views(&all, &[gate.shape(), up.shape()])?;
    Ok((parts[0].clone(), parts[1].clone()))
}

// ---------------------------------------------------------------------------------------------
// Cross-entropy

/// Per-row loss and log-sum-exps of logits `(n, v)` with u32 labels and an f32 mask.
pub(crate) fn cross_entropy_fwd(
    x: (&CudaStorage, &Layout),
    labels: (&CudaStorage, &Layout),
    mask: (&CudaStorage, &Layout),
) -> Result<(CudaStorage, CudaSlice<f32>, usize)> {
    let dev = x.0.device();
    let stream = dev.cuda_stream();
    let v = *x.1.dims().last().unwrap_or(&0);
    let n = x.1.shape().elem_count() / v.max(1);
    if labels.0.dtype() != DType::U32 || mask.0.dtype() != DType::F32 {
        bail!("cross_entropy: labels must be u32 and the mask f32");
    }
    if labels.1.shape().elem_count() != n || mask.1.shape().elem_count() != n {
        bail!(
            "cross_entropy: {n} rows, {} labels, {} mask",
            labels.1.shape().elem_count(),
            mask.1.shape().elem_count()
        );
    }
    let (sfx, _) = suffix(x.0.dtype())?;
    let out = Buf::alloc(dev, DType::F32, n)?;
    // SAFETY: ce_fwd writes every row's log-sum-exp.
    let lse = unsafe { dev.alloc::<f32>(n.max(1))? };
    launch!(dev, format!("ce_fwd_{sfx}"), shape::per_row(n, v);
        addr(x.0, x.1, &stream)?, addr(labels.0, labels.1, &stream)?,
        addr(mask.0, mask.1, &stream)?, out.ptr(&stream), lse.device_ptr(&stream).0,
        n as i32, v as i32);
    Ok((out.into_storage(dev), lse, n))
}

/// Gradient of the per-row losses with respect to the logits.
pub(crate) fn cross_entropy_bwd(
    logits: &Tensor,
    labels: &Tensor,
    mask: &Tensor,
    lse: &CudaSlice<f32>,
    grad: &Tensor,
) -> Result<Tensor> {
    let v = logits.dim(candle_core::D::Minus1)?;
    let n = logits.elem_count() / v.max(1);
    let grad = grad.to_dtype(DType::F32)?.contiguous()?;
    run(logits, "jobd-cross-entropy-bwd", |dev| {
        let stream = dev.cuda_stream();
        let (sfx, _) = suffix(logits.dtype())?;
        let out = Buf::alloc(dev, logits.dtype(), n * v)?;
        launch!(dev, format!("ce_bwd_{sfx}"), shape::per_row(n, v);
            tensor_addr(logits, &stream)?, tensor_addr(labels, &stream)?,
            tensor_addr(mask, &stream)?, lse.device_ptr(&stream).0,
            tensor_addr(&grad, &stream)?, out.ptr(&stream), n as i32, v as i32);
        Ok((out.into_storage(dev), logits.shape().clone()))
    })
}

// ---------------------------------------------------------------------------------------------
// Attention

/// The CUDA side of [`attention_device`]'s sequence: buffers of the call's compute type on
/// Candle's stream, cuBLAS for the products, kernels.cu for the rest.
struct CudaAttention<'a> {
    dev: &'a CudaDevice,
    dtype: DType,
    sfx: &'static str,
}

impl<'a> CudaAttention<'a> {
    fn new(dev: &'a CudaDevice, dtype: DType) -> Result<Self> {
        Ok(CudaAttention {
            dev,
            dtype,
            sfx: suffix(dtype)?.0,
        })
    }
}

impl AttentionDevice for CudaAttention<'_> {
    type Buf = Buf;

    fn compute_size(&self) -> usize {
        self.dtype.size_in_bytes()
    }

    fn alloc(&self, elem: Elem, n: usize) -> Result<Buf> {
        let dtype = match elem {
            Elem::Compute => self.dtype,
            Elem::F32 => DType::F32,
        };
        Buf::alloc(self.dev, dtype, n)
    }

    fn addr(&self, buf: &Buf) -> u64 {
        buf.ptr(&self.dev.cuda_stream())
    }

    fn gemm(&self, g: &ColumnMajorGemm) -> Result<()> {
        cublas_gemm(self.dev, self.dtype, g)
    }

    fn zero_f32(&self, addr: u64, len: usize) -> Result<()> {
        let stream = self.dev.cuda_stream();
        let zeroing = |e| candle_core::Error::Msg(format!("attention: zeroing: {e:?}"));
        // The raw driver call needs the device's context current on this thread.
        stream.context().bind_to_thread().map_err(zeroing)?;
        // SAFETY: `addr` is a live f32 allocation of at least `len` elements (the plan's
        // contract), written on this stream only.
        unsafe {
            candle_core::cuda_backend::cudarc::driver::result::memset_d8_async(
                addr,
                0,
                len * 4,
                stream.cu_stream(),
            )
        }
        .map_err(zeroing)
    }

    fn split_heads(&self, src: u64, dst: u64, m: &AttnDims, t: usize, hs: usize) -> Result<()> {
        launch!(self.dev, format!("heads_split_{}", self.sfx), shape::heads_copy(m.b * m.h * t, m.d);
            src, dst, m.b as i32, t as i32, hs as i32, m.h as i32, m.d as i32);
        Ok(())
    }

    fn merge_heads(
        &self,
        (src, from_f32): (u64, bool),
        dst: u64,
        m: &AttnDims,
        t: usize,
        hd: usize,
    ) -> Result<()> {
        let name = if from_f32 {
            format!("heads_merge_from_f32_{}", self.sfx)
        } else {
            format!("heads_merge_{}", self.sfx)
        };
        launch!(self.dev, name, shape::heads_copy(m.b * t * hd, m.d);
            src, dst, m.b as i32, t as i32, hd as i32, m.h as i32, m.d as i32);
        Ok(())
    }

    fn softmax_fwd(&self, x: SoftmaxFwdBufs, blk: SoftmaxBlock) -> Result<()> {
        let m = &blk.dims;
        launch!(self.dev, format!("attn_softmax_fwd_{}", self.sfx),
            shape::per_row(m.b * m.h * blk.rows, blk.keys_end);
            x.scores, x.p, x.lse, m.t as i32, m.s as i32, m.start as i32,
            shape::attention_window(m), shape::attention_scale(m), blk.r0 as i32,
            blk.rows as i32, blk.keys_end as i32);
        Ok(())
    }

    fn softmax_bwd(&self, x: SoftmaxBwdBufs, blk: SoftmaxBlock) -> Result<()> {
        let m = &blk.dims;
        launch!(self.dev, format!("attn_softmax_bwd_{}", self.sfx),
            shape::per_row(m.b * m.h * blk.rows, blk.keys_end);
            x.scores, x.dp, x.lse, x.d_out, x.out, x.p, x.ds, m.t as i32, m.s as i32,
            m.d as i32, m.start as i32, shape::attention_window(m), shape::attention_scale(m),
            blk.r0 as i32, blk.rows as i32, blk.keys_end as i32);
        Ok(())
    }
}

/// Causal attention forward; returns the output `(B, T, H·D)` and the rows' log-sum-exps
/// `(B·H·T)` for the backward.
pub(crate) fn attention_fwd(
    q: (&CudaStorage, &Layout),
    k: (&CudaStorage, &Layout),
    v: (&CudaStorage, &Layout),
    m: AttnDims,
) -> Result<(CudaStorage, CudaSlice<f32>)> {
    let dev = q.0.device();
    let stream = dev.cuda_stream();
    let dtype = q.0.dtype();
    if k.0.dtype() != dtype || v.0.dtype() != dtype {
        bail!("attention: q, k and v must have one type");
    }
    let at = |x: (&CudaStorage, &Layout)| addr(x.0, x.1, &stream);
    let cuda = CudaAttention::new(dev, dtype)?;
    let (out, lse) = attention_device::forward(&cuda, (at(q)?, at(k)?, at(v)?), m)?;
    let Buf::F32(lse) = lse else {
        bail!("attention: log-sum-exps not in f32");
    };
    Ok((out.into_storage(dev), lse))
}

/// Causal attention backward: `(dq, dk, dv)` from the inputs, the forward's output and its
/// log-sum-exps, and the output's gradient.
pub(crate) fn attention_bwd(
    (q, k, v): (&Tensor, &Tensor, &Tensor),
    out: &Tensor,
    lse: &CudaSlice<f32>,
    d_out: &Tensor,
    m: AttnDims,
) -> Result<(Tensor, Tensor, Tensor)> {
    let d_out = d_out.contiguous()?;
    let (nq, nk) = (m.b * m.t * m.h * m.d, m.b * m.s * m.kv * m.d);
    let all = run(q, "jobd-attention-bwd", |dev| {
        let stream = dev.cuda_stream();
        let at = |t: &Tensor| tensor_addr(t, &stream);
        let inputs = BackwardInputs {
            q: at(q)?,
            k: at(k)?,
            v: at(v)?,
            out: at(out)?,
            lse: lse.device_ptr(&stream).0,
            d_out: at(&d_out)?,
        };
        let cuda = CudaAttention::new(dev, q.dtype())?;
        let packed = attention_device::backward(&cuda, inputs, m)?;
        Ok((packed.into_storage(dev), Shape::from(nq + 2 * nk)))
    })?;
    let parts = split_views(&all, &[q.shape(), k.shape(), v.shape()])?;
    Ok((parts[0].clone(), parts[1].clone(), parts[2].clone()))
}

// ---------------------------------------------------------------------------------------------
// AdamW and the gradient norm

/// Device address of a contiguous f32 tensor of `n` elements in `s` under `l`.
pub(crate) fn f32_addr(s: &CudaStorage, l: &Layout, n: usize) -> Result<u64> {
    if s.dtype() != DType::F32 || l.shape().elem_count() != n {
        bail!("adamw: expected an f32 tensor of {n} elements");
    }
    addr(s, l, &s.device().cuda_stream())
}

/// AdamW's update in one pass: the parameter at `p` and first moment at `m` (f32, `n`
/// elements, held for writing by the caller), the second moment `v`, all in place, from the
/// gradient `g`.
pub(crate) fn adamw_step(
    (p, m): (u64, u64),
    v: (&mut CudaStorage, &Layout),
    g: (&CudaStorage, &Layout),
    n: usize,
    s: &crate::train::kernels::AdamStep,
) -> Result<()> {
    let dev = v.0.device().clone();
    let v_addr = f32_addr(v.0, v.1, n)?;
    let g_addr = f32_addr(g.0, g.1, n)?;
    launch!(dev, "adamw_step", shape::elementwise(n);
        p, m, v_addr, g_addr, n as i64, s.beta1, s.beta2, s.grad_scale, s.decay, s.step_size,
        s.bc2_sqrt, s.eps);
    Ok(())
}

/// Sums of squares of f32 tensors, one f32 per tensor (partials summed in a fixed order), read
/// back in one transfer.
pub(crate) fn sums_of_squares(grads: &[Tensor]) -> Result<Vec<f64>> {
    const BLOCKS: usize = shape::SUM_SQUARES_BLOCKS;
    let Some(first) = grads.first() else {
        return Ok(Vec::new());
    };
    let parts = run(first, "jobd-sum-squares", |dev| {
        let stream = dev.cuda_stream();
        let out = Buf::alloc(dev, DType::F32, BLOCKS * grads.len())?;
        let base = out.ptr(&stream);
        for (i, g) in grads.iter().enumerate() {
            if g.dtype() != DType::F32 {
                bail!("gradient norm: expected f32 gradients, got {:?}", g.dtype());
            }
            let g = g.contiguous()?;
            launch!(dev, "sum_squares_part", shape::sum_squares();
                tensor_addr(&g, &stream)?, g.elem_count() as i64,
                base + (i * BLOCKS * 4) as u64);
        }
        Ok((out.into_storage(dev), Shape::from((grads.len(), BLOCKS))))
    })?;
    let parts = parts.to_vec2::<f32>()?;
    Ok(parts
        .iter()
        .map(|row| row.iter().map(|&x| x as f64).sum())
        .collect())
}
