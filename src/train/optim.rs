//! AdamW with savable state, global-norm gradient clipping and the learning-rate schedules of
//! `transformers` (`linear`, `cosine`, `constant`, `constant_with_warmup`).
//!
//! Candle-nn's `AdamW` keeps its moments private, which rules out exact resume; this one has
//! the same mathematics as `torch.optim.AdamW` and exposes `m`, `v` and the step count so a
//! checkpoint can hold them. On the CPU and on CUDA (f32) each tensor is updated in place by
//! one fused kernel: both moments and the parameter in one pass over the elements, no
//! temporaries, with the clipping factor folded in (the gradients are never rescaled into new
//! tensors). Elsewhere the update is the same formula in tensor ops on the parameters' device.

use super::kernels::{self, AdamStep};
use candle_core::{CpuStorage, DType, InplaceOp1, InplaceOp2, Layout, Tensor, Var};

use super::TrainError;
use crate::spec::train::LrSchedulerType;

/// A trainable tensor and its Hugging Face (or adapter) name.
pub struct Param {
    /// Name used in checkpoints.
    pub name: String,
    /// The tensor the model reads; updated in place.
    pub var: Var,
    /// Whether weight decay applies (not to biases and norm weights, as in `Trainer`).
    pub decay: bool,
}

/// AdamW hyper-parameters.
#[derive(Debug, Clone, Copy)]
pub struct AdamWConfig {
    /// β1.
    pub beta1: f64,
    /// β2.
    pub beta2: f64,
    /// ε.
    pub eps: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
}

/// AdamW state: first and second moments per parameter and the number of updates made.
pub struct AdamW {
    /// Hyper-parameters.
    pub cfg: AdamWConfig,
    /// First moments, in parameter order.
    pub m: Vec<Tensor>,
    /// Second moments, in parameter order.
    pub v: Vec<Tensor>,
    /// Updates made so far (bias correction uses it).
    pub step: u64,
}

impl AdamW {
    /// Zero moments for `params`.
    pub fn new(cfg: AdamWConfig, params: &[Param]) -> Result<Self, TrainError> {
        let zeros = |p: &Param| p.var.as_tensor().zeros_like();
        Ok(AdamW {
            cfg,
            m: params.iter().map(zeros).collect::<Result<_, _>>()?,
            v: params.iter().map(zeros).collect::<Result<_, _>>()?,
            step: 0,
        })
    }

    /// One update with learning rate `lr` from `grads` (in parameter order), exactly as
    /// `torch.optim.AdamW` (non-fused): decay, moments, bias correction, `p -= lr·m̂/(√v̂+ε)`.
    pub fn step(&mut self, params: &[Param], grads: &[Tensor], lr: f64) -> Result<(), TrainError> {
        self.step_scaled(params, grads, lr, 1.0)
    }

    /// [`AdamW::step`] with every gradient first multiplied by `grad_scale` (the clipping
    /// factor of [`clip_factor`]), as `clip_grad_norm_` followed by `step()` computes it.
    pub fn step_scaled(
        &mut self,
        params: &[Param],
        grads: &[Tensor],
        lr: f64,
        grad_scale: f64,
    ) -> Result<(), TrainError> {
        self.step += 1;
        let AdamWConfig {
            beta1,
            beta2,
            eps,
            weight_decay,
        } = self.cfg;
        let t = self.step as i32;
        let bc1 = 1.0 - beta1.powi(t);
        let bc2_sqrt = (1.0 - beta2.powi(t)).sqrt();
        let step_size = lr / bc1;
        for (i, (p, g)) in params.iter().zip(grads).enumerate() {
            let decay = if p.decay && weight_decay > 0.0 {
                1.0 - lr * weight_decay
            } else {
                1.0
            };
            let theta = p.var.as_tensor();
            let on_cuda = cfg!(feature = "cuda") && theta.device().is_cuda();
            let fused = [theta, g, &self.m[i], &self.v[i]]
                .iter()
                .all(|t| (t.device().is_cpu() || on_cuda) && t.dtype() == DType::F32)
                && theta.is_contiguous();
            if fused {
                let s = AdamStep {
                    lr: lr as f32,
                    beta1: beta1 as f32,
                    beta2: beta2 as f32,
                    eps: eps as f32,
                    decay: decay as f32,
                    step_size: step_size as f32,
                    bc2_sqrt: bc2_sqrt as f32,
                    grad_scale: grad_scale as f32,
                };
                let g = g.contiguous()?;
                update_in_one_pass(theta, (&self.m[i], &self.v[i]), &g, s)?;
                continue;
            }
            let g = if grad_scale == 1.0 {
                g.clone()
            } else {
                (g * grad_scale)?
            };
            let mut theta = theta.clone();
            if decay != 1.0 {
                theta = theta.affine(decay, 0.0)?;
            }
            let m = ((&self.m[i] * beta1)? + (&g * (1.0 - beta1))?)?;
            let v = ((&self.v[i] * beta2)? + (g.sqr()? * (1.0 - beta2))?)?;
            let denom = ((v.sqrt()? / bc2_sqrt)? + eps)?;
            let update = (m.div(&denom)? * step_size)?;
            p.var.set(&(theta - update)?)?;
            self.m[i] = m;
            self.v[i] = v;
        }
        Ok(())
    }
}

/// AdamW's update of `theta` and its moments `(m, v)` from the (contiguous) gradient `g`, by
/// one kernel that reads and writes each element once ([`kernels::adamw_step`], or its CUDA
/// twin). Candle lends an in-place op write access to one tensor, so the three written
/// tensors are opened by ops nested one inside the other (the parameter, then `m`, then `v`
/// with `g` read), each passing its buffer inward; the innermost runs the kernel on all three.
fn update_in_one_pass(
    theta: &Tensor,
    (m, v): (&Tensor, &Tensor),
    g: &Tensor,
    s: AdamStep,
) -> candle_core::Result<()> {
    let n = theta.elem_count();
    if [m, v, g].iter().any(|t| t.elem_count() != n) {
        candle_core::bail!(
            "adamw: {n} parameters with moments of {}/{} and a gradient of {} elements",
            m.elem_count(),
            v.elem_count(),
            g.elem_count()
        );
    }
    theta.inplace_op1(&OpenParam { m, v, g, s, n })
}

/// Where a written buffer of the update lives, handed from an outer op to the inner ones
/// (valid while the outer op holds its tensor's storage for writing).
#[derive(Clone, Copy)]
enum Written {
    Host(*mut f32),
    #[cfg(feature = "cuda")]
    Device(u64),
}

#[cfg(feature = "cuda")]
const MIXED_DEVICES: &str = "adamw: parameter, moments and gradient on different devices";

impl Written {
    fn host(self) -> candle_core::Result<*mut f32> {
        match self {
            Written::Host(p) => Ok(p),
            #[cfg(feature = "cuda")]
            Written::Device(_) => candle_core::bail!("{MIXED_DEVICES}"),
        }
    }

    #[cfg(feature = "cuda")]
    fn device(self) -> candle_core::Result<u64> {
        match self {
            Written::Device(p) => Ok(p),
            Written::Host(_) => candle_core::bail!("{MIXED_DEVICES}"),
        }
    }
}

/// The contiguous f32 elements of `s` under `l` (same element count as `n`).
fn slice_mut<'a>(
    s: &'a mut CpuStorage,
    l: &Layout,
    n: usize,
) -> candle_core::Result<&'a mut [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) if b - a == n => Ok(&mut v[a..b]),
        _ => candle_core::bail!("adamw: expected a contiguous f32 tensor of {n} elements"),
    }
}

/// Outermost: holds the parameter for writing and opens `m`.
struct OpenParam<'a> {
    m: &'a Tensor,
    v: &'a Tensor,
    g: &'a Tensor,
    s: AdamStep,
    n: usize,
}

impl OpenParam<'_> {
    fn open_m(&self, p: Written) -> candle_core::Result<()> {
        self.m.inplace_op1(&OpenFirstMoment {
            p,
            v: self.v,
            g: self.g,
            s: self.s,
            n: self.n,
        })
    }
}

impl InplaceOp1 for OpenParam<'_> {
    fn name(&self) -> &'static str {
        "jobd-adamw"
    }

    fn cpu_fwd(&self, p: &mut CpuStorage, pl: &Layout) -> candle_core::Result<()> {
        let p = slice_mut(p, pl, self.n)?;
        self.open_m(Written::Host(p.as_mut_ptr()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, p: &mut candle_core::CudaStorage, pl: &Layout) -> candle_core::Result<()> {
        self.open_m(Written::Device(super::cuda::f32_addr(p, pl, self.n)?))
    }
}

/// Middle: holds `m` for writing and opens `v` with the gradient.
struct OpenFirstMoment<'a> {
    p: Written,
    v: &'a Tensor,
    g: &'a Tensor,
    s: AdamStep,
    n: usize,
}

impl OpenFirstMoment<'_> {
    fn open_v(&self, m: Written) -> candle_core::Result<()> {
        self.v.inplace_op2(
            self.g,
            &Update {
                p: self.p,
                m,
                s: self.s,
                n: self.n,
            },
        )
    }
}

impl InplaceOp1 for OpenFirstMoment<'_> {
    fn name(&self) -> &'static str {
        "jobd-adamw"
    }

    fn cpu_fwd(&self, m: &mut CpuStorage, ml: &Layout) -> candle_core::Result<()> {
        let m = slice_mut(m, ml, self.n)?;
        self.open_v(Written::Host(m.as_mut_ptr()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, m: &mut candle_core::CudaStorage, ml: &Layout) -> candle_core::Result<()> {
        self.open_v(Written::Device(super::cuda::f32_addr(m, ml, self.n)?))
    }
}

/// Innermost: holds `v` for writing and reads the gradient; runs the kernel.
struct Update {
    p: Written,
    m: Written,
    s: AdamStep,
    n: usize,
}

impl InplaceOp2 for Update {
    fn name(&self) -> &'static str {
        "jobd-adamw"
    }

    fn cpu_fwd(
        &self,
        v: &mut CpuStorage,
        vl: &Layout,
        g: &CpuStorage,
        gl: &Layout,
    ) -> candle_core::Result<()> {
        let n = self.n;
        let g = super::ops::cpu_f32(g, gl)?;
        let v = slice_mut(v, vl, n)?;
        let (p, m) = (self.p.host()?, self.m.host()?);
        if g.len() != n {
            candle_core::bail!("adamw: gradient of {} elements for {n}", g.len());
        }
        // SAFETY: `p` and `m` point to `n` f32 each in the storages the enclosing ops hold for
        // writing until this call returns; they are distinct tensors (Candle's in-place ops
        // refuse a destination that aliases a source, and the three are separate allocations).
        let (p, m) = unsafe {
            (
                std::slice::from_raw_parts_mut(p, n),
                std::slice::from_raw_parts_mut(m, n),
            )
        };
        kernels::adamw_step(p, m, v, &g, &self.s);
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        v: &mut candle_core::CudaStorage,
        vl: &Layout,
        g: &candle_core::CudaStorage,
        gl: &Layout,
    ) -> candle_core::Result<()> {
        let (p, m) = (self.p.device()?, self.m.device()?);
        super::cuda::adamw_step((p, m), (v, vl), (g, gl), self.n, &self.s)
    }
}

/// The global L2 norm of `grads`, summed in a fixed order in f64 (so it is reproducible).
pub fn global_norm(grads: &[Tensor]) -> Result<f64, TrainError> {
    // On CUDA: every tensor's sum of squares in one launch each and one read-back, instead of a
    // device-to-host round trip per tensor.
    #[cfg(feature = "cuda")]
    if !grads.is_empty()
        && grads
            .iter()
            .all(|g| g.device().is_cuda() && g.dtype() == DType::F32)
    {
        let sums = super::cuda::sums_of_squares(grads)?;
        return Ok(sums.iter().sum::<f64>().sqrt());
    }
    let mut sum = 0f64;
    for g in grads {
        sum += if g.device().is_cpu() && g.dtype() == DType::F32 {
            let g = g.contiguous()?;
            let (guard, layout) = g.storage_and_layout();
            kernels::sum_squares(super::ops::storage_f32(&guard, layout)?)
        } else {
            g.sqr()?
                .sum_all()?
                .to_dtype(DType::F64)?
                .to_scalar::<f64>()?
        };
    }
    Ok(sum.sqrt())
}

/// The global norm of `grads` and the factor that brings it down to `max_norm` (1 when it is
/// below, or when `max_norm` is 0), as `torch.nn.utils.clip_grad_norm_` computes them; pass
/// the factor to [`AdamW::step_scaled`].
pub fn clip_factor(grads: &[Tensor], max_norm: f64) -> Result<(f64, f64), TrainError> {
    let norm = global_norm(grads)?;
    let coef = if max_norm > 0.0 {
        (max_norm / (norm + 1e-6)).min(1.0)
    } else {
        1.0
    };
    Ok((norm, coef))
}

/// Scales `grads` so their global norm is at most `max_norm` (as
/// `torch.nn.utils.clip_grad_norm_`); returns the norm before clipping.
pub fn clip(grads: &mut [Tensor], max_norm: f64) -> Result<f64, TrainError> {
    let (norm, coef) = clip_factor(grads, max_norm)?;
    if coef < 1.0 {
        for g in grads.iter_mut() {
            *g = (&*g * coef)?;
        }
    }
    Ok(norm)
}

/// The global norm of `grads` computed from a loss multiplied by `loss_scale`, and the factor
/// to pass to [`AdamW::step_scaled`]: clipping (as [`clip_factor`]) on the unscaled norm,
/// divided by the scale. With a scale of 1 this is exactly [`clip_factor`].
pub fn clip_factor_scaled(
    grads: &[Tensor],
    max_norm: f64,
    loss_scale: f64,
) -> Result<(f64, f64), TrainError> {
    let norm = global_norm(grads)? / loss_scale;
    let coef = if max_norm > 0.0 {
        (max_norm / (norm + 1e-6)).min(1.0)
    } else {
        1.0
    };
    Ok((norm, coef / loss_scale))
}

/// Dynamic loss scaling for f16 training (as `torch.cuda.amp.GradScaler`): the loss is
/// multiplied by `scale` so small gradients survive f16; a step whose gradients overflow is
/// skipped and halves the scale, and 2000 clean steps in a row double it. Saved in the
/// checkpoint so a resumed run scales exactly as the uninterrupted one.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LossScale {
    /// Current factor (a power of two).
    pub scale: f64,
    /// Steps without overflow since the scale last changed.
    pub good_steps: u32,
}

impl Default for LossScale {
    fn default() -> Self {
        LossScale {
            scale: 65536.0,
            good_steps: 0,
        }
    }
}

impl LossScale {
    /// Steps without overflow after which the scale doubles.
    pub const GROWTH_INTERVAL: u32 = 2000;

    /// Records a step whose gradients were `finite` or not; returns whether to apply it.
    pub fn update(&mut self, finite: bool) -> bool {
        if !finite {
            self.scale = (self.scale / 2.0).max(1.0);
            self.good_steps = 0;
            return false;
        }
        self.good_steps += 1;
        if self.good_steps == Self::GROWTH_INTERVAL {
            self.scale *= 2.0;
            self.good_steps = 0;
        }
        true
    }
}

/// The learning rate for optimizer step `step` (0-based) of `total`, after `warmup` warm-up
/// steps: `transformers`' schedule multipliers times `base`.
pub fn lr_at(kind: LrSchedulerType, base: f64, step: u64, total: u64, warmup: u64) -> f64 {
    let s = step as f64;
    let w = warmup as f64;
    if step < warmup && kind != LrSchedulerType::Constant {
        return base * s / w.max(1.0);
    }
    let progress = (s - w) / ((total as f64 - w).max(1.0));
    let factor = match kind {
        LrSchedulerType::Constant | LrSchedulerType::ConstantWithWarmup => 1.0,
        LrSchedulerType::Linear => ((total as f64 - s) / (total as f64 - w).max(1.0)).max(0.0),
        LrSchedulerType::Cosine => (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0),
    };
    base * factor
}

/// Warm-up steps: `warmup_steps` if set, else `ceil(warmup_ratio · total)`.
pub fn warmup_steps(warmup_steps: u64, warmup_ratio: f64, total: u64) -> u64 {
    if warmup_steps > 0 {
        warmup_steps
    } else {
        (warmup_ratio * total as f64).ceil() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn schedules_match_transformers() {
        use LrSchedulerType::*;
        // get_linear_schedule_with_warmup(warmup=2, total=10)
        let lin: Vec<f64> = (0..10).map(|s| lr_at(Linear, 1.0, s, 10, 2)).collect();
        assert_eq!(lin[0], 0.0);
        assert_eq!(lin[1], 0.5);
        assert_eq!(lin[2], 1.0);
        assert!((lin[6] - 0.5).abs() < 1e-12);
        assert!((lr_at(Cosine, 1.0, 6, 10, 2) - 0.5).abs() < 1e-12);
        assert_eq!(lr_at(Constant, 2.0, 0, 10, 2), 2.0);
        assert_eq!(lr_at(ConstantWithWarmup, 2.0, 1, 10, 2), 1.0);
        assert_eq!(lr_at(ConstantWithWarmup, 2.0, 9, 10, 2), 2.0);
        assert_eq!(warmup_steps(0, 0.1, 25), 3);
    }

    #[test]
    fn loss_scale_backs_off_on_overflow_and_grows_when_clean() {
        let mut ls = LossScale::default();
        assert!(!ls.update(false), "an overflowing step is skipped");
        assert_eq!(ls.scale, 32768.0);
        for _ in 0..LossScale::GROWTH_INTERVAL - 1 {
            assert!(ls.update(true));
        }
        assert_eq!(ls.scale, 32768.0);
        assert!(ls.update(true));
        assert_eq!((ls.scale, ls.good_steps), (65536.0, 0));
        let dev = Device::Cpu;
        let g = vec![Tensor::new(&[3.0f32 * 8.0, 4.0 * 8.0], &dev).unwrap()];
        let (norm, factor) = clip_factor_scaled(&g, 1.0, 8.0).unwrap();
        assert!((norm - 5.0).abs() < 1e-9);
        assert!((factor - (1.0 / (5.0 + 1e-6)) / 8.0).abs() < 1e-12);
        assert_eq!(clip_factor_scaled(&g, 0.0, 1.0).unwrap().1, 1.0);
    }

    /// Two clipped, decayed updates of a tensor of several kernel chunks by the one-pass
    /// kernel give the bits of the per-element f32 formulas run as three separate passes (the
    /// moments, then the parameter), which is what checkpoints written before it hold; and
    /// the tensor-op path (f64 here) agrees to rounding.
    #[test]
    fn one_pass_adamw_gives_the_bits_of_three_passes() {
        let dev = Device::Cpu;
        let n = 40_003;
        let mut rng = crate::train::rng::Rng::new(5);
        let mut draw = |k: f64| -> Vec<f32> {
            (0..n)
                .map(|_| ((rng.next_f64() * 2.0 - 1.0) * k) as f32)
                .collect()
        };
        let (p0, g1, g2) = (draw(1.0), draw(0.1), draw(0.1));
        let cfg = AdamWConfig {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
        };
        let (lr, scale) = (3e-4, 0.7);
        let run = |dtype: DType| -> Vec<f32> {
            let t = Tensor::new(p0.as_slice(), &dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let params = vec![Param {
                name: "w".into(),
                var: Var::from_tensor(&t).unwrap(),
                decay: true,
            }];
            let mut opt = AdamW::new(cfg, &params).unwrap();
            for g in [&g1, &g2] {
                let g = Tensor::new(g.as_slice(), &dev)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap();
                opt.step_scaled(&params, &[g], lr, scale).unwrap();
            }
            let out = params[0].var.as_tensor().to_dtype(DType::F32).unwrap();
            out.to_vec1::<f32>().unwrap()
        };
        let (mut p, mut m, mut v) = (p0.clone(), vec![0f32; n], vec![0f32; n]);
        for (t, g) in [(1, &g1), (2, &g2)] {
            let s = kernels::AdamStep {
                lr: lr as f32,
                beta1: 0.9,
                beta2: 0.95,
                eps: 1e-8,
                decay: (1.0 - lr * 0.1) as f32,
                step_size: (lr / (1.0 - 0.9f64.powi(t))) as f32,
                bc2_sqrt: (1.0 - 0.95f64.powi(t)).sqrt() as f32,
                grad_scale: scale as f32,
            };
            for i in 0..n {
                let gi = g[i] * s.grad_scale;
                m[i] = m[i] * s.beta1 + gi * (1.0 - s.beta1);
            }
            for i in 0..n {
                let gi = g[i] * s.grad_scale;
                v[i] = v[i] * s.beta2 + gi * gi * (1.0 - s.beta2);
            }
            for i in 0..n {
                let denom = v[i].sqrt() / s.bc2_sqrt + s.eps;
                p[i] = p[i] * s.decay - m[i] / denom * s.step_size;
            }
        }
        assert_eq!(run(DType::F32), p);
        let tensor_ops = run(DType::F64);
        for (a, b) in tensor_ops.iter().zip(&p) {
            assert!((a - b).abs() <= 1e-6 * (1.0 + b.abs()), "{a} vs {b}");
        }
    }

    #[test]
    fn adamw_matches_a_hand_computed_update() {
        let dev = Device::Cpu;
        let var = Var::from_tensor(&Tensor::new(&[1.0f32, -2.0], &dev).unwrap()).unwrap();
        let params = vec![Param {
            name: "w".into(),
            var: var.clone(),
            decay: true,
        }];
        let cfg = AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.1,
        };
        let mut opt = AdamW::new(cfg, &params).unwrap();
        let g = Tensor::new(&[0.5f32, -0.25], &dev).unwrap();
        opt.step(&params, std::slice::from_ref(&g), 0.01).unwrap();
        opt.step(&params, &[g], 0.01).unwrap();
        // Reference (torch.optim.AdamW semantics) computed in f64.
        let mut p = [1.0f64, -2.0];
        let gr = [0.5f64, -0.25];
        let (mut m, mut v) = ([0.0f64; 2], [0.0f64; 2]);
        for t in 1..=2 {
            for i in 0..2 {
                p[i] *= 1.0 - 0.01 * 0.1;
                m[i] = 0.9 * m[i] + 0.1 * gr[i];
                v[i] = 0.999 * v[i] + 0.001 * gr[i] * gr[i];
                let mh = m[i] / (1.0 - 0.9f64.powi(t));
                let vh = (v[i] / (1.0 - 0.999f64.powi(t))).sqrt();
                p[i] -= 0.01 * mh / (vh + 1e-8);
            }
        }
        let got = var.as_tensor().to_vec1::<f32>().unwrap();
        for i in 0..2 {
            assert!((got[i] as f64 - p[i]).abs() < 1e-6, "{got:?} vs {p:?}");
        }
        let mut grads = vec![Tensor::new(&[3.0f32, 4.0], &dev).unwrap()];
        let n = clip(&mut grads, 1.0).unwrap();
        assert!((n - 5.0).abs() < 1e-9);
        let c = grads[0].to_vec1::<f32>().unwrap();
        assert!((c[0] - 0.6).abs() < 1e-5 && (c[1] - 0.8).abs() < 1e-5);
    }
}
