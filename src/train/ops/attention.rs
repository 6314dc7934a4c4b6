//! Causal attention as a Candle custom op over [`crate::train::kernels::attention`]: the forward keeps
//! the row log-sum-exps `(B, H, T)` in the op for the backward instead of the T×S scores.

use std::sync::{Arc, Mutex};

use crate::train::kernels::attention::{self as kernel, Dims};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};

use super::{Stats, cpu_f32, cpu_out, fusable, gpu_fusable, split, storage_widened};
use crate::train::model::Result;
#[cfg(feature = "cuda")]
use candle_core::CudaStorage;

/// Causal attention of `q` `(B, T, H·D)` (positions `start..start+T`) over `k`, `v`
/// `(B, S, KV·D)` (positions `0..S`) — the projections' outputs as they are — each key/value
/// head serving `H / KV` query heads, optionally within a sliding window; returns
/// `(B, T, H·D)`, ready for the output projection. Same mathematics as
/// [`super::plain::attention`].
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: (usize, usize),
    start: usize,
    window: Option<usize>,
) -> Result<Tensor> {
    let on_gpu = gpu_fusable(q) && k.dtype() == q.dtype() && v.dtype() == q.dtype();
    if !on_gpu && (!fusable(q) || !fusable(k) || !fusable(v)) {
        return super::plain::attention(q, k, v, heads, start, window);
    }
    let op = Attention::new(heads, start, window);
    Ok(q.contiguous()?
        .apply_op3(&k.contiguous()?, &v.contiguous()?, op)?)
}

/// The op of [`attention`]; it keeps the rows' log-sum-exps for its backward, which reads the
/// output too.
pub(crate) struct Attention {
    /// Query heads and key/value heads.
    heads: (usize, usize),
    start: usize,
    window: Option<usize>,
    /// Row log-sum-exps of the forward, for the backward.
    lse: Arc<Mutex<Option<Stats>>>,
}

impl Attention {
    pub(crate) fn new(heads: (usize, usize), start: usize, window: Option<usize>) -> Self {
        Attention {
            heads,
            start,
            window,
            lse: Arc::new(Mutex::new(None)),
        }
    }

    fn dims(&self, lq: &Layout, lk: &Layout, lv: &Layout) -> candle_core::Result<Dims> {
        let (h, kv) = self.heads;
        let (b, t, hd) = lq.shape().dims3()?;
        let (bk, s, kvd) = lk.shape().dims3()?;
        let d = hd / h.max(1);
        if bk != b || h * d != hd || kv * d != kvd || lv.dims() != lk.dims() {
            candle_core::bail!(
                "attention: q {:?}, k {:?}, v {:?}",
                lq.dims(),
                lk.dims(),
                lv.dims()
            );
        }
        let dm = Dims {
            b,
            t,
            h,
            s,
            kv,
            d,
            start: self.start,
            window: self.window,
        };
        dm.check().map_err(candle_core::Error::Msg)?;
        Ok(dm)
    }
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "jobd-attention"
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
        let dm = self.dims(l1, l2, l3)?;
        let (q, k, v) = (cpu_f32(s1, l1)?, cpu_f32(s2, l2)?, cpu_f32(s3, l3)?);
        let (out, lse) = kernel::forward(&q, &k, &v, dm);
        *self.lse.lock().expect("attention lse lock") = Some(Stats::Cpu(lse));
        Ok((cpu_out(out, l1.shape(), s1.dtype())?, l1.shape().clone()))
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
        let dm = self.dims(l1, l2, l3)?;
        let (out, lse) = crate::train::cuda::attention_fwd((s1, l1), (s2, l2), (s3, l3), dm)?;
        *self.lse.lock().expect("attention lse lock") = Some(Stats::Cuda(lse));
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let saved = self.lse.lock().expect("attention lse lock");
        #[cfg(feature = "cuda")]
        if let Some(Stats::Cuda(lse)) = saved.as_ref() {
            let dm = self.dims(q.layout(), k.layout(), v.layout())?;
            let (dq, dk, dv) = crate::train::cuda::attention_bwd((q, k, v), res, lse, &grad, dm)?;
            return Ok((Some(dq), Some(dk), Some(dv)));
        }
        let Some(Stats::Cpu(lse)) = saved.as_ref() else {
            candle_core::bail!("attention: backward without the forward's statistics");
        };
        let buf = {
            let (gq, lq) = q.storage_and_layout();
            let (gk, lk) = k.storage_and_layout();
            let (gv, lv) = v.storage_and_layout();
            let (go, lo) = res.storage_and_layout();
            let (gd, ld) = grad.storage_and_layout();
            let dm = self.dims(lq, lk, lv)?;
            kernel::backward(
                &storage_widened(&gq, lq)?,
                &storage_widened(&gk, lk)?,
                &storage_widened(&gv, lv)?,
                &storage_widened(&go, lo)?,
                &storage_widened(&gd, ld)?,
                lse,
                dm,
            )
        };
        let parts = split(
            buf,
            &[q.shape(), k.shape(), v.shape()],
            q.device(),
            q.dtype(),
        )
        .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let mut it = parts.into_iter();
        Ok((it.next(), it.next(), it.next()))
    }
}
