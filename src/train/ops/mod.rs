//! Fused training ops with backward passes: linear, RMSNorm, rotary embeddings, SwiGLU,
//! causal attention, softmax cross-entropy and lm_head + cross-entropy in one op, plus the
//! plain-op versions they are tested against. The kernels themselves (f32 slices, rayon) are in [`super::kernels`]; this module
//! wraps them as Candle custom ops.
//!
//! Candle's own fused `rms_norm`, `rope` and `softmax_last_dim` have no backward and silently
//! cut gradients, and the plain-op compositions allocate a tensor (and a zero-filled gradient)
//! per elementary op, run many of them on one thread and materialise the T×T attention scores
//! and mask. Each op here is one Candle custom op: the forward is one parallel pass over its
//! data, the backward a hand-derived kernel, and attention keeps only the row log-sum-exps for
//! its backward (the scores are recomputed block by block, as flash attention does).
//!
//! The kernels run on the CPU in f32 and, with the `cuda` feature, on CUDA in f32, bf16 and
//! f16 ([`super::cuda`]: the same ops' `cuda_fwd`, and backward passes made of CUDA kernels and
//! cuBLAS products). The ops' CPU side also takes bf16 and f16 tensors as the CUDA kernels do
//! (16-bit storage, f32 arithmetic, an f32 master weight rounded to the activations' type for
//! a product, its gradient in f32), so that the op-level step CUDA runs in those types
//! ([`super::direct_ops`]) runs and is tested on the CPU too; the entry points below send a
//! CPU in bf16 or f16 to the plain-op path in [`plain`], which computes the same mathematics
//! (and is what the tests compare against). Ops take tensors in the shapes the model
//! produces them (`(B, T, heads·dim)`, any leading dimensions for linear and the loss)
//! because every reshape node costs Candle's backward a zero-filled gradient and an addition.
//! Every kernel is deterministic: work is split into fixed pieces whose partial results are
//! combined in a fixed order, so results do not depend on the thread count or on scheduling,
//! which exact resume needs.

pub mod attention;
pub mod plain;

pub(crate) use attention::Attention;
pub use attention::attention;

#[cfg(test)]
mod tests;

use std::borrow::Cow;
use std::sync::{Arc, Mutex};

use crate::train::kernels;
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, D, DType, Layout, Shape, Storage, Tensor};
use rayon::prelude::*;

use super::model::Result;

/// Whether `t` can use the fused CPU kernels.
pub(crate) fn fusable(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == DType::F32
}

/// Whether `t` can use the fused CUDA kernels (feature `cuda`; f32, bf16 or f16).
pub(crate) fn gpu_fusable(t: &Tensor) -> bool {
    cfg!(feature = "cuda")
        && t.device().is_cuda()
        && matches!(t.dtype(), DType::F32 | DType::BF16 | DType::F16)
}

/// Row statistics (log-sum-exps) a forward keeps for its backward, where it computed them.
enum Stats {
    Cpu(Vec<f32>),
    #[cfg(feature = "cuda")]
    Cuda(candle_core::cuda_backend::cudarc::driver::CudaSlice<f32>),
}

#[cfg(feature = "cuda")]
use super::cuda;
#[cfg(feature = "cuda")]
use candle_core::CudaStorage;

/// The elements of a contiguous CPU tensor's storage in f32: borrowed when it holds f32,
/// widened when it holds bf16 or f16 (the kernels compute in f32 whatever the storage).
pub(crate) fn cpu_f32<'a>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<Cow<'a, [f32]>> {
    let Some((a, b)) = l.contiguous_offsets() else {
        candle_core::bail!("fused kernel: input is not contiguous")
    };
    match s {
        CpuStorage::F32(v) => Ok(Cow::Borrowed(&v[a..b])),
        CpuStorage::BF16(_) | CpuStorage::F16(_) => match s.to_dtype(l, DType::F32)? {
            CpuStorage::F32(v) => Ok(Cow::Owned(v)),
            other => candle_core::bail!("fused kernel: widened to {:?}", other.dtype()),
        },
        other => candle_core::bail!(
            "fused kernel: expected f32, bf16 or f16, got {:?}",
            other.dtype()
        ),
    }
}

/// [`cpu_f32`] of a weight used in a product with activations of `dtype`: an f32 master is
/// rounded to a 16-bit `dtype` first, as CUDA casts it for the product.
fn cpu_f32_as<'a>(
    s: &'a CpuStorage,
    l: &Layout,
    dtype: DType,
) -> candle_core::Result<Cow<'a, [f32]>> {
    if s.dtype() == DType::F32 && matches!(dtype, DType::BF16 | DType::F16) {
        let narrow = s.to_dtype(l, dtype)?;
        let shape = Layout::contiguous(l.shape());
        return Ok(Cow::Owned(cpu_f32(&narrow, &shape)?.into_owned()));
    }
    cpu_f32(s, l)
}

/// The f32 elements of a contiguous CPU tensor holding f32, as a slice of its storage (the
/// storage guard must outlive it).
pub(crate) fn storage_f32<'a>(
    guard: &'a candle_core::StorageRef<'a>,
    l: &Layout,
) -> candle_core::Result<&'a [f32]> {
    match storage_widened(guard, l)? {
        Cow::Borrowed(data) => Ok(data),
        Cow::Owned(_) => candle_core::bail!("fused kernel: expected f32"),
    }
}

/// [`cpu_f32`] for a whole tensor: the storage guard must outlive the slice.
pub(crate) fn storage_widened<'a>(
    guard: &'a candle_core::StorageRef<'a>,
    l: &Layout,
) -> candle_core::Result<Cow<'a, [f32]>> {
    match &**guard {
        Storage::Cpu(s) => cpu_f32(s, l),
        _ => candle_core::bail!("fused kernel: tensor is not on the CPU"),
    }
}

/// A kernel's f32 output stored in `dtype`: as it is for f32, rounded to nearest (even) for
/// bf16 and f16, as the CUDA kernels store their results.
pub(crate) fn cpu_out(y: Vec<f32>, shape: &Shape, dtype: DType) -> candle_core::Result<CpuStorage> {
    let y = CpuStorage::F32(y);
    if dtype == DType::F32 {
        return Ok(y);
    }
    y.to_dtype(&Layout::contiguous(shape), dtype)
}

/// A CPU gradient computed in f32, as a tensor of `like`'s type and shape.
fn grad_like(g: Vec<f32>, like: &Tensor) -> candle_core::Result<Tensor> {
    Tensor::from_vec(g, like.shape(), like.device())?.to_dtype(like.dtype())
}

/// Splits a buffer holding several gradients back into tensors of the given shapes, stored in
/// `dtype`.
fn split(
    buf: Vec<f32>,
    shapes: &[&Shape],
    device: &candle_core::Device,
    dtype: DType,
) -> Result<Vec<Tensor>> {
    let all = Tensor::from_vec(
        buf,
        (shapes.iter().map(|s| s.elem_count()).sum::<usize>(),),
        device,
    )?
    .to_dtype(dtype)?;
    Ok(split_views(&all, shapes)?)
}

/// Views of consecutive pieces of the 1-D `all`, in the given shapes (no copy).
pub(crate) fn split_views(all: &Tensor, shapes: &[&Shape]) -> candle_core::Result<Vec<Tensor>> {
    let mut out = Vec::with_capacity(shapes.len());
    let mut at = 0;
    for s in shapes {
        let n = s.elem_count();
        out.push(all.narrow(0, at, n)?.reshape(*s)?);
        at += n;
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Linear

/// `x · wᵀ` for `x` `(..., in)` and a PyTorch-layout weight `w` `(out, in)`, giving
/// `(..., out)`, with backward. Taking any rank spares the model reshape nodes, each of which
/// costs Candle's backward a zero-filled gradient and an addition over the activation.
/// Candle's `x.matmul(&w.t())` computes the same, but its backward produces the weight's
/// gradient transposed, which then costs a strided copy; this writes it in `w`'s layout, and
/// skips it entirely for frozen weights (LoRA).
///
/// On CUDA `w` may also be the f32 master of a bf16 or f16 `x`: the op casts it for the product
/// and writes its gradient in f32 directly (no cast node, no 16-bit gradient to convert).
pub fn linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    if gpu_fusable(x) && (w.dtype() == x.dtype() || w.dtype() == DType::F32) && w.rank() == 2 {
        return Ok(x.contiguous()?.apply_op2(&w.contiguous()?, Linear)?);
    }
    if !fusable(x) || !fusable(w) {
        return plain::linear(x, w);
    }
    Ok(x.contiguous()?.apply_op2(&w.contiguous()?, Linear)?)
}

/// The op of [`linear`]; its backward does not read the output (any tensor may stand for it).
pub(crate) struct Linear;

impl CustomOp2 for Linear {
    fn name(&self) -> &'static str {
        "jobd-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (out, inp) = l2.shape().dims2()?;
        let Some((&inp_x, lead)) = l1.dims().split_last() else {
            candle_core::bail!("linear: scalar input");
        };
        if inp != inp_x {
            candle_core::bail!("linear: input {:?}, weight {:?}", l1.dims(), l2.dims());
        }
        let rows = lead.iter().product();
        let w = cpu_f32_as(s2, l2, s1.dtype())?;
        let y = kernels::linear_fwd(&cpu_f32(s1, l1)?, &w, rows, inp, out);
        let mut shape = lead.to_vec();
        shape.push(out);
        let shape = Shape::from(shape);
        Ok((cpu_out(y, &shape, s1.dtype())?, shape))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        cuda::linear_fwd((s1, l1), (s2, l2))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let dy = dy.contiguous()?;
        let (out, inp) = w.dims2()?;
        let rows = x.elem_count() / inp;
        let want_dw = w.track_op();
        #[cfg(feature = "cuda")]
        if x.device().is_cuda() {
            let (dx, dw) = cuda::linear_bwd(x, w, &dy, want_dw)?;
            return Ok((Some(dx), dw));
        }
        let mut dx = vec![0f32; rows * inp];
        let mut dw = vec![0f32; if want_dw { out * inp } else { 0 }];
        {
            let (gx, lx) = x.storage_and_layout();
            let (gw, lw) = w.storage_and_layout();
            let (gd, ld) = dy.storage_and_layout();
            let w_as_x = match &*gw {
                Storage::Cpu(s) => cpu_f32_as(s, lw, x.dtype())?,
                _ => candle_core::bail!("fused kernel: tensor is not on the CPU"),
            };
            kernels::linear_bwd(
                &storage_widened(&gx, lx)?,
                &w_as_x,
                &storage_widened(&gd, ld)?,
                (rows, inp, out),
                &mut dx,
                want_dw.then_some(dw.as_mut_slice()),
            );
        }
        // dx in the activations' type; dw in the weight's (f32 for a master).
        let dx = grad_like(dx, x)?;
        let dw = if want_dw {
            Some(grad_like(dw, w)?)
        } else {
            None
        };
        Ok((Some(dx), dw))
    }
}

// ---------------------------------------------------------------------------------------------
// Embedding

/// Rows of `table` `(V, d)` for the token ids `ids` (any shape, u32), as `(n, d)`. On the CPU
/// this is Candle's `index_select`; on CUDA an op with a deterministic backward (each id's
/// gradient rows summed in position order). An id outside the table is an error naming it.
pub fn embedding(table: &Tensor, ids: &Tensor) -> Result<Tensor> {
    let ids = ids.flatten_all()?;
    #[cfg(feature = "cuda")]
    if gpu_fusable(table) && ids.dtype() == DType::U32 {
        let host = ids.to_vec1::<u32>()?;
        check_ids(table, &host)?;
        let op = cuda::Embedding::new(ids.contiguous()?, host);
        return Ok(table.contiguous()?.apply_op1(op)?);
    }
    Ok(table.index_select(&ids, 0)?)
}

/// An error naming the first id outside `table`'s rows, if any.
fn check_ids(table: &Tensor, ids: &[u32]) -> Result<()> {
    let vocab = table.dim(0)?;
    match ids.iter().find(|&&i| i as usize >= vocab) {
        Some(&bad) => Err(candle_core::Error::Msg(format!(
            "token id {bad} is outside the vocabulary of {vocab}"
        ))
        .into()),
        None => Ok(()),
    }
}

/// [`embedding`] for flattened u32 `ids` whose host copy is `host`, recorded in no graph: the
/// direct steps run its backward by hand ([`embedding_bwd`]).
pub(crate) fn embedding_no_graph(table: &Tensor, ids: &Tensor, host: &[u32]) -> Result<Tensor> {
    check_ids(table, host)?;
    #[cfg(feature = "cuda")]
    if gpu_fusable(table) {
        let op = cuda::Embedding::new(ids.contiguous()?, host.to_vec());
        return Ok(table.contiguous()?.apply_op1_no_bwd(&op)?);
    }
    Ok(table.detach().index_select(ids, 0)?)
}

/// The gradient of the table `(V, d)` that [`embedding_no_graph`] read rows of, from the rows'
/// gradients `d_rows` `(n, d)`: each id's rows summed in position order.
pub(crate) fn embedding_bwd(
    table: &Tensor,
    ids: &Tensor,
    host: &[u32],
    d_rows: &Tensor,
) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if gpu_fusable(table) {
        use candle_core::CustomOp1;
        let op = cuda::Embedding::new(ids.contiguous()?, host.to_vec());
        // Its backward does not read the forward's output; the rows' gradient stands in.
        return op
            .bwd(table, d_rows, d_rows)?
            .ok_or_else(|| candle_core::Error::Msg("embedding: no gradient".into()).into());
    }
    let _ = host;
    Ok(Tensor::zeros(table.shape(), d_rows.dtype(), table.device())?.index_add(ids, d_rows, 0)?)
}

// ---------------------------------------------------------------------------------------------
// RMSNorm

/// RMSNorm over the last dimension, `x · rsqrt(mean(x²) + eps) · w`, with backward.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    if gpu_fusable(x) {
        let w = w.to_dtype(DType::F32)?.contiguous()?;
        return Ok(x.contiguous()?.apply_op2(&w, RmsNorm { eps: eps as f32 })?);
    }
    if !fusable(x) || w.dtype() != DType::F32 {
        return plain::rms_norm(x, w, eps);
    }
    let x = x.contiguous()?;
    let w = w.contiguous()?;
    Ok(x.apply_op2(&w, RmsNorm { eps: eps as f32 })?)
}

/// The op of [`rms_norm`] (f32 weight); its backward does not read the output.
pub(crate) struct RmsNorm {
    pub(crate) eps: f32,
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "jobd-rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = cpu_f32(s1, l1)?;
        let w = cpu_f32(s2, l2)?;
        let d = w.len();
        if l1.dims().last() != Some(&d) {
            candle_core::bail!("rms_norm: weight of {d} for input {:?}", l1.dims());
        }
        let mut y = vec![0f32; x.len()];
        kernels::rms_norm_fwd(&x, &w, self.eps, &mut y);
        Ok((cpu_out(y, l1.shape(), s1.dtype())?, l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        cuda::rms_norm_fwd((s1, l1), (s2, l2), self.eps)
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let dy = dy.contiguous()?;
        #[cfg(feature = "cuda")]
        if x.device().is_cuda() {
            let (dx, dw) = cuda::rms_norm_bwd(x, w, &dy, self.eps)?;
            return Ok((Some(dx), Some(dw)));
        }
        let mut buf = vec![0f32; x.elem_count()];
        let dw = {
            let (gx, lx) = x.storage_and_layout();
            let (gw, lw) = w.storage_and_layout();
            let (gd, ld) = dy.storage_and_layout();
            kernels::rms_norm_bwd(
                &storage_widened(&gx, lx)?,
                &storage_widened(&gw, lw)?,
                &storage_widened(&gd, ld)?,
                self.eps,
                &mut buf,
                false,
            )
        };
        let dx = grad_like(buf, x)?;
        let dw = grad_like(dw, w)?;
        Ok((Some(dx), Some(dw)))
    }
}

// ---------------------------------------------------------------------------------------------
// Rotary embeddings

/// Rotate-half rotary embedding of `x` `(B, T, heads · head_dim)` (the projection's output)
/// with `cos`/`sin` tables `(T, head_dim)` for its positions (Hugging Face's layout), with
/// backward.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    if gpu_fusable(x) {
        return Ok(x.contiguous()?.apply_op3(
            &cos.to_dtype(DType::F32)?.contiguous()?,
            &sin.to_dtype(DType::F32)?.contiguous()?,
            Rope { transpose: false },
        )?);
    }
    if !fusable(x) || cos.dtype() != DType::F32 {
        return plain::rope(x, cos, sin);
    }
    let x = x.contiguous()?;
    Ok(x.apply_op3(
        &cos.contiguous()?,
        &sin.contiguous()?,
        Rope { transpose: false },
    )?)
}

/// The rotation (or, with `transpose`, its inverse, which is its backward), over f32 tables.
pub(crate) struct Rope {
    pub(crate) transpose: bool,
}

impl Rope {
    /// `(T, heads, head_dim)` of input `l1` with tables `l2`, `l3`.
    fn dims(l1: &Layout, l2: &Layout, l3: &Layout) -> candle_core::Result<(usize, usize, usize)> {
        let (_, t, row) = l1.shape().dims3()?;
        let (_, hd) = l2.shape().dims2()?;
        let heads = row / hd.max(1);
        if l2.dims() != [t, hd] || l3.dims() != [t, hd] || hd % 2 != 0 || heads * hd != row {
            candle_core::bail!("rope: tables {:?} for input {:?}", l2.dims(), l1.dims());
        }
        Ok((t, heads, hd))
    }
}

impl CustomOp3 for Rope {
    fn name(&self) -> &'static str {
        "jobd-rope"
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        s3: &CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let dims = Rope::dims(l1, l2, l3)?;
        cuda::rope((s1, l1), (s2, l2), (s3, l3), dims, self.transpose)
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (t, heads, hd) = Rope::dims(l1, l2, l3)?;
        let mut y = vec![0f32; l1.shape().elem_count()];
        kernels::rope(
            &cpu_f32(s1, l1)?,
            &cpu_f32(s2, l2)?,
            &cpu_f32(s3, l3)?,
            (t, heads, hd),
            self.transpose,
            &mut y,
        );
        Ok((cpu_out(y, l1.shape(), s1.dtype())?, l1.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dx = dy.contiguous()?.apply_op3_no_bwd(
            cos,
            sin,
            &Rope {
                transpose: !self.transpose,
            },
        )?;
        Ok((Some(dx), None, None))
    }
}

// ---------------------------------------------------------------------------------------------
// SwiGLU

/// `silu(gate) · up`, with backward.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if gpu_fusable(gate) && up.dtype() == gate.dtype() {
        return Ok(gate.contiguous()?.apply_op2(&up.contiguous()?, SwiGlu)?);
    }
    if !fusable(gate) || up.dtype() != DType::F32 {
        return plain::swiglu(gate, up);
    }
    Ok(gate.contiguous()?.apply_op2(&up.contiguous()?, SwiGlu)?)
}

/// The op of [`swiglu`]; its backward does not read the output.
pub(crate) struct SwiGlu;

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "jobd-swiglu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        if l1.shape() != l2.shape() {
            candle_core::bail!("swiglu: shapes {:?} and {:?}", l1.dims(), l2.dims());
        }
        let g = cpu_f32(s1, l1)?;
        let u = cpu_f32(s2, l2)?;
        let mut y = vec![0f32; g.len()];
        kernels::swiglu_fwd(&g, &u, &mut y);
        Ok((cpu_out(y, l1.shape(), s1.dtype())?, l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        cuda::swiglu_fwd((s1, l1), (s2, l2))
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let dy = dy.contiguous()?;
        #[cfg(feature = "cuda")]
        if gate.device().is_cuda() {
            let (dg, du) = cuda::swiglu_bwd(gate, up, &dy)?;
            return Ok((Some(dg), Some(du)));
        }
        let n = gate.elem_count();
        let mut buf = vec![0f32; 2 * n];
        {
            let (gg, lg) = gate.storage_and_layout();
            let (gu, lu) = up.storage_and_layout();
            let (gd, ld) = dy.storage_and_layout();
            let g = storage_widened(&gg, lg)?;
            let u = storage_widened(&gu, lu)?;
            let d = storage_widened(&gd, ld)?;
            let (dg, du) = buf.split_at_mut(n);
            kernels::swiglu_bwd(&g, &u, &d, dg, du);
        }
        let parts = split(
            buf,
            &[gate.shape(), up.shape()],
            gate.device(),
            gate.dtype(),
        )
        .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let mut it = parts.into_iter();
        Ok((it.next(), it.next()))
    }
}

// ---------------------------------------------------------------------------------------------
// Cross-entropy

/// Per-position `mask · (logsumexp(logits) − logits[label])` for `logits` `(..., V)` f32,
/// `labels` `(...)` u32 and `mask` `(...)` (any type), with backward to the logits. The backward
/// recomputes the softmax from the logits instead of keeping an N×V probability tensor.
pub fn cross_entropy(logits: &Tensor, labels: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let on_gpu = gpu_fusable(logits) && labels.dtype() == DType::U32;
    if !fusable(logits) && !on_gpu {
        let v = logits.dim(D::Minus1)?;
        let n = logits.elem_count() / v;
        let lead = &logits.dims()[..logits.rank() - 1];
        let per_row = plain::cross_entropy(
            &logits.reshape((n, v))?,
            &labels.reshape(n)?,
            &mask.reshape(n)?,
        )?;
        return Ok(per_row.reshape(lead)?);
    }
    Ok(logits.contiguous()?.apply_op3(
        &labels.contiguous()?,
        &mask.to_dtype(DType::F32)?.contiguous()?,
        CrossEntropy::new(),
    )?)
}

/// The op of [`cross_entropy`] (f32 mask); it keeps each row's log-sum-exp for its backward.
pub(crate) struct CrossEntropy {
    /// Each row's logsumexp from the forward, for the backward.
    lse: Arc<Mutex<Option<Stats>>>,
}

impl CrossEntropy {
    pub(crate) fn new() -> Self {
        CrossEntropy {
            lse: Arc::new(Mutex::new(None)),
        }
    }
}

fn labels_u32<'a>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [u32]> {
    let data = match s {
        CpuStorage::U32(v) => v.as_slice(),
        other => candle_core::bail!("cross_entropy: labels must be u32, got {:?}", other.dtype()),
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("cross_entropy: labels are not contiguous"),
    }
}

impl CustomOp3 for CrossEntropy {
    fn name(&self) -> &'static str {
        "jobd-cross-entropy"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let v = *l1.dims().last().unwrap_or(&0);
        let lead = &l1.dims()[..l1.dims().len().saturating_sub(1)];
        let n: usize = lead.iter().product();
        let x = cpu_f32(s1, l1)?;
        let labels = labels_u32(s2, l2)?;
        let mask = cpu_f32(s3, l3)?;
        if labels.len() != n || mask.len() != n {
            candle_core::bail!(
                "cross_entropy: {n} rows, {} labels, {} mask",
                labels.len(),
                mask.len()
            );
        }
        if let Some(&bad) = labels.iter().find(|&&l| l as usize >= v) {
            candle_core::bail!("cross_entropy: label {bad} outside the vocabulary of {v}");
        }
        let mut out = vec![0f32; n];
        let mut lse = vec![0f32; n];
        kernels::cross_entropy_fwd(&x, labels, &mask, v, &mut out, &mut lse);
        *self.lse.lock().expect("cross-entropy lse lock") = Some(Stats::Cpu(lse));
        Ok((CpuStorage::F32(out), Shape::from(lead.to_vec())))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        s3: &CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let lead = l1.dims()[..l1.dims().len().saturating_sub(1)].to_vec();
        let (out, lse, _) = cuda::cross_entropy_fwd((s1, l1), (s2, l2), (s3, l3))?;
        *self.lse.lock().expect("cross-entropy lse lock") = Some(Stats::Cuda(lse));
        Ok((out, Shape::from(lead)))
    }

    fn bwd(
        &self,
        logits: &Tensor,
        labels: &Tensor,
        mask: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let v = logits.dim(D::Minus1)?;
        let n = logits.elem_count() / v;
        let grad = grad.contiguous()?;
        #[cfg(feature = "cuda")]
        if let Some(Stats::Cuda(lse)) = self.lse.lock().expect("cross-entropy lse lock").as_ref() {
            let dx = cuda::cross_entropy_bwd(logits, labels, mask, lse, &grad)?;
            return Ok((Some(dx), None, None));
        }
        let mut dx = vec![0f32; n * v];
        {
            let (gx, lx) = logits.storage_and_layout();
            let (gl, ll) = labels.storage_and_layout();
            let (gm, lm) = mask.storage_and_layout();
            let (gg, lg) = grad.storage_and_layout();
            let x = storage_widened(&gx, lx)?;
            let lab = match &*gl {
                Storage::Cpu(s) => labels_u32(s, ll)?,
                _ => candle_core::bail!("cross_entropy: labels not on the CPU"),
            };
            let m = storage_widened(&gm, lm)?;
            let g = storage_widened(&gg, lg)?;
            let saved = self.lse.lock().expect("cross-entropy lse lock");
            let Some(Stats::Cpu(lse)) = saved.as_ref() else {
                candle_core::bail!("cross_entropy: backward without the forward's statistics");
            };
            kernels::cross_entropy_bwd(&x, lab, &m, lse, &g, &mut dx);
        }
        let dx = grad_like(dx, logits)?;
        Ok((Some(dx), None, None))
    }
}

// ---------------------------------------------------------------------------------------------
// lm_head + cross-entropy

/// `Σ mask · (logsumexp(z) − z[label])` over the positions of the logits `z = x · wᵀ`, for
/// hidden states `x` `(..., d)`, the lm_head weight `w` `(V, d)`, `labels` `(...)` u32 and
/// `mask` `(...)` (any type): [`linear`] then [`cross_entropy`] summed, as one op whose logits
/// never exist as a tensor. On the CPU in f32 it computes them a few hundred rows at a time
/// and, since the loss ends the graph, its gradients with respect to `x` and `w` in the same
/// pass (the logits' gradient is made and used chunk by chunk too); the backward only scales
/// them by the incoming gradient. This spares the N×V logits, their N×V gradient and the
/// zero-filled N×V buffer Candle's autograd adds that gradient to.
///
/// `with_grad: false` (evaluation) computes the loss alone, detached from the graph. A `w`
/// that does not track gradients (frozen under LoRA) gets none computed. Other devices and
/// types take the unfused path: [`linear`], [`cross_entropy`], sum.
pub fn linear_cross_entropy(
    x: &Tensor,
    w: &Tensor,
    labels: &Tensor,
    mask: &Tensor,
    with_grad: bool,
) -> Result<Tensor> {
    if !fusable(x) || !fusable(w) {
        return Ok(cross_entropy(&linear(x, w)?, labels, mask)?.sum_all()?);
    }
    if labels.dtype() != DType::U32 {
        Err(candle_core::Error::Msg(format!(
            "cross_entropy: labels must be u32, got {:?}",
            labels.dtype()
        )))?;
    }
    let op = LinearCrossEntropy::new(
        labels,
        mask,
        with_grad && x.track_op(),
        with_grad && w.track_op(),
    )?;
    let (x, w) = (x.contiguous()?, w.contiguous()?);
    Ok(if op.want_dx || op.want_dw {
        x.apply_op2(&w, op)?
    } else {
        x.apply_op2_no_bwd(&w, &op)?
    })
}

/// The op of [`linear_cross_entropy`] (CPU, f32): its forward computes the gradients it was
/// asked for, its backward scales them by the loss's gradient (a scalar).
pub(crate) struct LinearCrossEntropy {
    labels: Vec<u32>,
    mask: Vec<f32>,
    want_dx: bool,
    want_dw: bool,
    /// The gradients computed by the forward, for the backward.
    saved: Mutex<Saved>,
}

impl LinearCrossEntropy {
    /// The loss over u32 `labels` and `mask` (any type), computing the hidden states'
    /// gradient when `want_dx` and the weight's when `want_dw`.
    pub(crate) fn new(
        labels: &Tensor,
        mask: &Tensor,
        want_dx: bool,
        want_dw: bool,
    ) -> Result<Self> {
        Ok(LinearCrossEntropy {
            labels: labels.flatten_all()?.to_vec1::<u32>()?,
            mask: mask.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?,
            want_dx,
            want_dw,
            saved: Mutex::new(Saved::None),
        })
    }
}

/// The fused loss's gradients, as the forward left them or as the first backward scaled them
/// (kept for a second backward over the same graph).
enum Saved {
    None,
    Raw(Vec<f32>, Vec<f32>),
    Scaled(f32, Option<Tensor>, Option<Tensor>),
}

impl CustomOp2 for LinearCrossEntropy {
    fn name(&self) -> &'static str {
        "jobd-linear-cross-entropy"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (v, d) = l2.shape().dims2()?;
        if l1.dims().last() != Some(&d) {
            candle_core::bail!(
                "linear_cross_entropy: input {:?}, weight {:?}",
                l1.dims(),
                l2.dims()
            );
        }
        let rows = l1.shape().elem_count() / d.max(1);
        if self.labels.len() != rows || self.mask.len() != rows {
            candle_core::bail!(
                "linear_cross_entropy: {rows} rows, {} labels, {} mask",
                self.labels.len(),
                self.mask.len()
            );
        }
        if let Some(&bad) = self.labels.iter().find(|&&l| l as usize >= v) {
            candle_core::bail!("cross_entropy: label {bad} outside the vocabulary of {v}");
        }
        let mut dx = vec![0f32; if self.want_dx { rows * d } else { 0 }];
        let mut dw = vec![0f32; if self.want_dw { v * d } else { 0 }];
        let loss = kernels::linear_cross_entropy(
            &cpu_f32(s1, l1)?,
            &cpu_f32(s2, l2)?,
            &self.labels,
            &self.mask,
            (rows, d, v),
            1.0,
            self.want_dx.then_some(dx.as_mut_slice()),
            self.want_dw.then_some(dw.as_mut_slice()),
        );
        if self.want_dx || self.want_dw {
            *self.saved.lock().expect("linear cross-entropy lock") = Saved::Raw(dx, dw);
        }
        Ok((CpuStorage::F32(vec![loss]), Shape::from(())))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let g = grad.flatten_all()?.to_vec1::<f32>()?;
        let [g] = g[..] else {
            candle_core::bail!("linear_cross_entropy: gradient of shape {:?}", grad.dims());
        };
        let mut saved = self.saved.lock().expect("linear cross-entropy lock");
        match std::mem::replace(&mut *saved, Saved::None) {
            Saved::None => {
                candle_core::bail!("linear_cross_entropy: backward without the forward's gradients")
            }
            Saved::Raw(dx, dw) if g == 0.0 => {
                // Nothing to scale from later: keep the forward's gradients as they are.
                *saved = Saved::Raw(dx, dw);
                let zeros = |t: &Tensor| Tensor::zeros(t.shape(), DType::F32, t.device());
                let dx = self.want_dx.then(|| zeros(x)).transpose()?;
                let dw = self.want_dw.then(|| zeros(w)).transpose()?;
                Ok((dx, dw))
            }
            // The usual case: scale the forward's buffers in place, no copy.
            Saved::Raw(mut dx, mut dw) => {
                dx.par_iter_mut()
                    .chain(dw.par_iter_mut())
                    .with_min_len(16384)
                    .for_each(|e| *e *= g);
                let dx = self
                    .want_dx
                    .then(|| Tensor::from_vec(dx, x.shape(), x.device()))
                    .transpose()?;
                let dw = self
                    .want_dw
                    .then(|| Tensor::from_vec(dw, w.shape(), w.device()))
                    .transpose()?;
                *saved = Saved::Scaled(g, dx.clone(), dw.clone());
                Ok((dx, dw))
            }
            Saved::Scaled(s, dx, dw) => {
                let rescale = |t: &Option<Tensor>| -> candle_core::Result<Option<Tensor>> {
                    match t {
                        Some(t) if s != g => Ok(Some(t.affine((g / s) as f64, 0.0)?)),
                        other => Ok(other.clone()),
                    }
                };
                let out = (rescale(&dx)?, rescale(&dw)?);
                *saved = Saved::Scaled(s, dx, dw);
                Ok(out)
            }
        }
    }
}
