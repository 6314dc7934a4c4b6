//! Every fused op against its plain-op version: values, and gradients of a random linear
//! function of the output with respect to every differentiable input.

use candle_core::{DType, Device, Tensor, Var};

use super::plain;
use crate::train::rng::Rng;

fn randn(rng: &mut Rng, shape: &[usize], std: f64) -> Tensor {
    let n: usize = shape.iter().product();
    let mut d = vec![0f32; n];
    rng.fill_normal(&mut d, std);
    Tensor::from_vec(d, shape, &Device::Cpu).unwrap()
}

/// Largest |a − b| relative to the largest |b| (plus a floor for all-small tensors).
fn rel_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    let d = (a - b).unwrap().abs().unwrap().max_all().unwrap();
    let s = b.abs().unwrap().max_all().unwrap();
    d.to_scalar::<f32>().unwrap() / (s.to_scalar::<f32>().unwrap() + 1e-6)
}

/// Runs `fused` and `plain` on fresh `Var`s of `inputs`, checks outputs and the gradients of
/// `sum(out · r)` for a random `r`, for the inputs listed in `grads_of`.
fn check(
    name: &str,
    inputs: &[Tensor],
    grads_of: &[usize],
    tol: f32,
    fused: impl Fn(&[Tensor]) -> Tensor,
    plain: impl Fn(&[Tensor]) -> Tensor,
) {
    let mut rng = Rng::new(99);
    let mut run = |f: &dyn Fn(&[Tensor]) -> Tensor, r: Option<Tensor>| {
        let vars: Vec<Var> = inputs
            .iter()
            .map(|t| Var::from_tensor(t).unwrap())
            .collect();
        let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let out = f(&ts);
        let r = r.unwrap_or_else(|| randn(&mut rng, out.dims(), 1.0));
        let g = (&out * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let grads: Vec<Tensor> = grads_of
            .iter()
            .map(|&i| {
                g.get(vars[i].as_tensor())
                    .unwrap_or_else(|| panic!("{name}: input {i} has no gradient"))
                    .clone()
            })
            .collect();
        (out, r, grads)
    };
    let (out_f, r, grads_f) = run(&fused, None);
    let (out_p, _, grads_p) = run(&plain, Some(r));
    let d = rel_diff(&out_f, &out_p);
    assert!(d < tol, "{name}: output differs by {d}");
    for ((gf, gp), i) in grads_f.iter().zip(&grads_p).zip(grads_of) {
        let d = rel_diff(gf, gp);
        assert!(d < tol, "{name}: gradient of input {i} differs by {d}");
        let n = gf
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(n > 0.0, "{name}: gradient of input {i} is zero");
    }
}

#[test]
fn linear_matches_plain_ops() {
    let mut rng = Rng::new(8);
    let x = randn(&mut rng, &[3, 13, 24], 1.0);
    let w = randn(&mut rng, &[19, 24], 0.5);
    check(
        "linear",
        &[x, w],
        &[0, 1],
        1e-5,
        |t| super::linear(&t[0], &t[1]).unwrap(),
        |t| plain::linear(&t[0], &t[1]).unwrap(),
    );
    // A frozen weight (a plain tensor, as LoRA's base weights) gets no gradient computed.
    let xv = Var::from_tensor(&randn(&mut rng, &[5, 24], 1.0)).unwrap();
    let frozen = randn(&mut rng, &[19, 24], 0.5);
    let g = super::linear(xv.as_tensor(), &frozen)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    assert!(g.get(xv.as_tensor()).is_some());
    assert!(g.get(&frozen).is_none());
}

#[test]
fn rms_norm_matches_plain_ops() {
    let mut rng = Rng::new(1);
    // 37 rows of 48: not a multiple of the accumulator width or of a task's rows.
    let x = randn(&mut rng, &[37, 48], 1.5);
    let w = (randn(&mut rng, &[48], 0.3) + 1.0).unwrap();
    check(
        "rms_norm",
        &[x, w],
        &[0, 1],
        1e-5,
        |t| super::rms_norm(&t[0], &t[1], 1e-6).unwrap(),
        |t| plain::rms_norm(&t[0], &t[1], 1e-6).unwrap(),
    );
}

#[test]
fn rope_matches_plain_ops() {
    let mut rng = Rng::new(2);
    let (b, t, h, d) = (2, 5, 3, 8);
    let x = randn(&mut rng, &[b, t, h * d], 1.0);
    // Tables as the model builds them: both halves hold the same angles.
    let ang: Vec<f32> = (0..t)
        .flat_map(|p| (0..d).map(move |i| p as f32 * 0.3f32.powi((i % (d / 2)) as i32)))
        .collect();
    let cos =
        Tensor::from_vec(ang.iter().map(|a| a.cos()).collect(), (t, d), &Device::Cpu).unwrap();
    let sin =
        Tensor::from_vec(ang.iter().map(|a| a.sin()).collect(), (t, d), &Device::Cpu).unwrap();
    let (c, s) = (cos.clone(), sin.clone());
    check(
        "rope",
        &[x],
        &[0],
        1e-6,
        |t| super::rope(&t[0], &cos, &sin).unwrap(),
        |t| plain::rope(&t[0], &c, &s).unwrap(),
    );
}

#[test]
fn swiglu_matches_plain_ops() {
    let mut rng = Rng::new(3);
    // More elements than one task's chunk, so several tasks run.
    let g = randn(&mut rng, &[9, 4000], 2.0);
    let u = randn(&mut rng, &[9, 4000], 1.0);
    check(
        "swiglu",
        &[g, u],
        &[0, 1],
        1e-5,
        |t| super::swiglu(&t[0], &t[1]).unwrap(),
        |t| plain::swiglu(&t[0], &t[1]).unwrap(),
    );
}

#[test]
fn cross_entropy_matches_plain_ops() {
    let mut rng = Rng::new(4);
    let (n, v) = (23, 77);
    let logits = randn(&mut rng, &[n, v], 3.0);
    let labels: Vec<u32> = (0..n).map(|_| rng.below(v as u64) as u32).collect();
    let labels = Tensor::from_vec(labels, n, &Device::Cpu).unwrap();
    // Some positions masked out: they must contribute neither loss nor gradient.
    let mask: Vec<f32> = (0..n).map(|i| if i % 4 == 1 { 0.0 } else { 1.0 }).collect();
    let mask = Tensor::from_vec(mask, n, &Device::Cpu).unwrap();
    let (l2, m2) = (labels.clone(), mask.clone());
    let (l3, m3) = (labels.clone(), mask.clone());
    check(
        "cross_entropy",
        &[logits],
        &[0],
        1e-5,
        |t| super::cross_entropy(&t[0], &labels, &mask).unwrap(),
        |t| plain::cross_entropy(&t[0], &l2, &m2).unwrap(),
    );
    // (B, T, V) logits as the model gives them: same values, no reshape needed.
    let logits3 = randn(&mut rng, &[1, n, v], 3.0);
    check(
        "cross_entropy (B, T, V)",
        &[logits3],
        &[0],
        1e-5,
        |t| {
            super::cross_entropy(
                &t[0],
                &l3.reshape((1, n)).unwrap(),
                &m3.reshape((1, n)).unwrap(),
            )
            .unwrap()
        },
        |t| {
            plain::cross_entropy(&t[0].reshape((n, v)).unwrap(), &l3, &m3)
                .unwrap()
                .reshape((1, n))
                .unwrap()
        },
    );
    let bad = Tensor::new(&[v as u32], &Device::Cpu).unwrap();
    let one = Tensor::ones(1, DType::F32, &Device::Cpu).unwrap();
    let row = randn(&mut rng, &[1, v], 1.0);
    assert!(
        super::cross_entropy(&row, &bad, &one).is_err(),
        "label out of range"
    );
}

fn attention_case(
    b: usize,
    t: usize,
    h: usize,
    kv: usize,
    d: usize,
    start: usize,
    window: Option<usize>,
) {
    let mut rng = Rng::new((t * 31 + start * 7 + kv) as u64);
    let s = start + t;
    let q = randn(&mut rng, &[b, t, h * d], 1.0);
    let k = randn(&mut rng, &[b, s, kv * d], 1.0);
    let v = randn(&mut rng, &[b, s, kv * d], 1.0);
    check(
        &format!("attention b{b} t{t} h{h} kv{kv} d{d} start{start} window{window:?}"),
        &[q, k, v],
        &[0, 1, 2],
        2e-5,
        |x| super::attention(&x[0], &x[1], &x[2], (h, kv), start, window).unwrap(),
        |x| plain::attention(&x[0], &x[1], &x[2], (h, kv), start, window).unwrap(),
    );
}

#[test]
fn attention_matches_plain_ops() {
    // Multi-head, grouped-query and multi-query layouts; more query rows than one block.
    attention_case(2, 70, 4, 4, 8, 0, None);
    attention_case(2, 70, 4, 2, 16, 0, None);
    attention_case(1, 9, 6, 1, 8, 0, None);
    // Queries after cached keys (generation), and a sliding window.
    attention_case(2, 5, 4, 2, 8, 11, None);
    attention_case(2, 70, 4, 2, 8, 0, Some(13));
    attention_case(1, 3, 2, 1, 4, 6, Some(4));
}

#[test]
fn attention_backward_survives_a_second_backward() {
    let mut rng = Rng::new(5);
    let q = Var::from_tensor(&randn(&mut rng, &[1, 4, 8], 1.0)).unwrap();
    let k = randn(&mut rng, &[1, 4, 8], 1.0);
    let y = super::attention(q.as_tensor(), &k, &k, (2, 2), 0, None).unwrap();
    let loss = y.sqr().unwrap().sum_all().unwrap();
    let a = loss.backward().unwrap();
    let b = loss.backward().unwrap();
    let (ga, gb) = (a.get(q.as_tensor()).unwrap(), b.get(q.as_tensor()).unwrap());
    assert_eq!(rel_diff(ga, gb), 0.0);
}

/// Results do not depend on the number of threads (exact resume relies on it).
#[test]
fn kernels_give_the_same_bits_on_one_and_two_threads() {
    let mut rng = Rng::new(6);
    let q = randn(&mut rng, &[2, 70, 32], 1.0);
    let k = randn(&mut rng, &[2, 70, 16], 1.0);
    let x = randn(&mut rng, &[300, 64], 1.0);
    let w = randn(&mut rng, &[64], 1.0);
    let head = randn(&mut rng, &[16384, 64], 0.1);
    assert!(crate::train::kernels::lce_rows(16384) < 300);
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            let qv = Var::from_tensor(&q).unwrap();
            let xv = Var::from_tensor(&x).unwrap();
            let wv = Var::from_tensor(&w).unwrap();
            let a = super::attention(qv.as_tensor(), &k, &k, (4, 2), 0, None).unwrap();
            let n = super::rms_norm(xv.as_tensor(), wv.as_tensor(), 1e-5).unwrap();
            let l = super::linear(&n, &x.narrow(0, 0, 64).unwrap()).unwrap();
            // 300 rows, a vocabulary of 16384: two chunks of the fused loss, the weight's
            // gradient accumulated over them.
            let hv = Var::from_tensor(&head).unwrap();
            let labels: Vec<u32> = (0..300).map(|i| i * 7919 % 16384).collect();
            let labels = Tensor::from_vec(labels, 300, &Device::Cpu).unwrap();
            let mask = Tensor::ones(300, DType::F32, &Device::Cpu).unwrap();
            let ce = super::linear_cross_entropy(&n, hv.as_tensor(), &labels, &mask, true).unwrap();
            let loss = (a.sqr().unwrap().sum_all().unwrap() + l.sqr().unwrap().sum_all().unwrap())
                .unwrap();
            let loss = (loss + ce).unwrap();
            let g = loss.backward().unwrap();
            [
                g.get(qv.as_tensor())
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap(),
                g.get(wv.as_tensor()).unwrap().to_vec1::<f32>().unwrap(),
                g.get(hv.as_tensor())
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap(),
                g.get(xv.as_tensor())
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap(),
            ]
        })
    };
    assert!(run(1) == run(2), "results depend on the thread count");
}

/// The vectorisable exp of the kernels is within a few ulp of the true value.
#[test]
fn kernel_exp_is_accurate() {
    let mut worst = 0f64;
    let mut x = -87.0f32;
    while x < 88.0 {
        let got = crate::train::kernels::exp(x) as f64;
        let want = (x as f64).exp();
        worst = worst.max((got - want).abs() / want);
        x += 0.0137;
    }
    assert!(worst < 4.0 * f32::EPSILON as f64, "relative error {worst}");
    assert_eq!(crate::train::kernels::exp(-100.0), 0.0);
    assert_eq!(crate::train::kernels::exp(f32::NEG_INFINITY), 0.0);
    assert_eq!(crate::train::kernels::exp(0.0), 1.0);
}

/// The fused lm_head + loss against `linear` + `cross_entropy` + sum from plain ops:
/// several chunks with a ragged last one, masked positions, (B, T, d) input, and the
/// gradient of every input, then the same with the weight tied to an embedding that also
/// feeds the input (its gradient is the sum of both uses).
#[test]
fn linear_cross_entropy_matches_plain_ops() {
    let mut rng = Rng::new(12);
    let (d, v) = (24, 53);
    let chunk = crate::train::kernels::lce_rows(v);
    let (b, t) = (3, chunk + 13);
    assert!(
        b * t > 2 * chunk && (b * t) % chunk != 0,
        "several chunks, ragged last"
    );
    let x = randn(&mut rng, &[b, t, d], 1.0);
    let w = randn(&mut rng, &[v, d], 0.5);
    let labels: Vec<u32> = (0..b * t).map(|_| rng.below(v as u64) as u32).collect();
    let labels = Tensor::from_vec(labels, (b, t), &Device::Cpu).unwrap();
    let mask: Vec<f32> = (0..b * t)
        .map(|i| if i % 5 == 2 { 0.0 } else { 1.0 })
        .collect();
    let mask = Tensor::from_vec(mask, (b, t), &Device::Cpu).unwrap();
    let plain_loss = |x: &Tensor, w: &Tensor| {
        let logits = plain::linear(x, w).unwrap();
        plain::cross_entropy(
            &logits.reshape((b * t, v)).unwrap(),
            &labels.flatten_all().unwrap(),
            &mask.flatten_all().unwrap(),
        )
        .unwrap()
        .sum_all()
        .unwrap()
    };
    check(
        "linear_cross_entropy",
        &[x.clone(), w.clone()],
        &[0, 1],
        1e-5,
        |t| super::linear_cross_entropy(&t[0], &t[1], &labels, &mask, true).unwrap(),
        |t| plain_loss(&t[0], &t[1]),
    );
    // Tied: the input is built from the weight too, so both gradients must reach it.
    let ids = Tensor::from_vec(
        (0..b * t).map(|i| (i * 7 % v) as u32).collect::<Vec<_>>(),
        b * t,
        &Device::Cpu,
    )
    .unwrap();
    let from_embedding = |e: &Tensor| {
        (e.index_select(&ids, 0).unwrap().reshape((b, t, d)).unwrap() + &x)
            .unwrap()
            .tanh()
            .unwrap()
    };
    check(
        "linear_cross_entropy (tied)",
        &[w],
        &[0],
        1e-5,
        |t| {
            super::linear_cross_entropy(&from_embedding(&t[0]), &t[0], &labels, &mask, true)
                .unwrap()
        },
        |t| plain_loss(&from_embedding(&t[0]), &t[0]),
    );
}

/// The fused loss's side paths: evaluation (no gradients, detached, same value), a frozen
/// weight (gradient only for the input), a second backward over the same graph, and a label
/// outside the vocabulary.
#[test]
fn linear_cross_entropy_eval_frozen_and_errors() {
    let mut rng = Rng::new(13);
    let (n, d, v) = (37, 8, 29);
    let x = Var::from_tensor(&randn(&mut rng, &[n, d], 1.0)).unwrap();
    let w = randn(&mut rng, &[v, d], 1.0);
    let labels: Vec<u32> = (0..n).map(|_| rng.below(v as u64) as u32).collect();
    let labels = Tensor::from_vec(labels, n, &Device::Cpu).unwrap();
    let mask = Tensor::ones(n, DType::U8, &Device::Cpu).unwrap();
    let train = super::linear_cross_entropy(x.as_tensor(), &w, &labels, &mask, true).unwrap();
    let eval = super::linear_cross_entropy(x.as_tensor(), &w, &labels, &mask, false).unwrap();
    assert_eq!(
        train.to_scalar::<f32>().unwrap(),
        eval.to_scalar::<f32>().unwrap()
    );
    assert!(!eval.track_op(), "evaluation loss is detached");
    // Frozen weight: only the input gets a gradient; a second backward (with another
    // upstream scale) gives the same gradient scaled.
    let a = (&train * 0.5).unwrap().backward().unwrap();
    let ga = a.get(x.as_tensor()).unwrap().clone();
    assert!(a.get(&w).is_none());
    let b = (&train * 2.0).unwrap().backward().unwrap();
    let gb = b.get(x.as_tensor()).unwrap();
    assert!(rel_diff(&(ga * 4.0).unwrap(), gb) < 1e-6);
    let bad = Tensor::from_vec(vec![v as u32], 1, &Device::Cpu).unwrap();
    let one = Tensor::ones(1, DType::F32, &Device::Cpu).unwrap();
    let row = randn(&mut rng, &[1, d], 1.0);
    assert!(
        super::linear_cross_entropy(&row, &w, &bad, &one, false).is_err(),
        "label out of range"
    );
}

#[test]
fn token_groups_list_each_ids_positions_in_order() {
    use crate::train::kernels::{IdGroups, group_by_id};
    let g = group_by_id(&[5, 2, 5, 9, 2, 5]);
    assert_eq!(
        g,
        IdGroups {
            order: vec![1, 4, 0, 2, 5, 3],
            starts: vec![0, 2, 5, 6],
            ids: vec![2, 5, 9],
        }
    );
    let empty = group_by_id(&[]);
    assert_eq!(
        (empty.order.len(), empty.starts, empty.ids.len()),
        (0, vec![0], 0)
    );
}
