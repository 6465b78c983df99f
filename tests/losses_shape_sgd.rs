//! Losses (bce_with_logits, cross_entropy, smooth_l1, l1_loss), shape ops (concat,
//! narrow, stack, flatten, permute, index_select) and SGD: parity with the PyTorch
//! fixtures, f64 gradient checks, plain-loop references, error cases. Each
//! `check_*_on(device)` runs on the CPU here and on CUDA in the ignored tests.

mod common;

use common::{assert_close, cases, cuda, fixture, rand_t, randn, rel_err};
use kestrel::autograd::{gradcheck, Tape};
use kestrel::ops::losses::{bce_with_logits, cross_entropy, l1_loss, smooth_l1, Reduction};
use kestrel::ops::shape::{concat, flatten, index_select, narrow, permute, stack};
use kestrel::optim::{Sgd, SgdConfig};
use kestrel::{DType, Device, Error, Result, Tensor};

const REDUCTIONS: [Reduction; 3] = [Reduction::Mean, Reduction::Sum, Reduction::None];

// ------------------------------------------------------------------ helpers

/// An f32 tensor of `v` on `device`.
fn f32_on(v: &[f64], shape: &[usize], device: Device) -> Tensor {
    let v32: Vec<f32> = v.iter().map(|&x| x as f32).collect();
    Tensor::from_vec(v32, shape.to_vec())
        .unwrap()
        .to_device(device)
        .unwrap()
}

fn i64_on(v: &[i64], device: Device) -> Tensor {
    Tensor::from_vec_i64(v.to_vec(), [v.len()])
        .unwrap()
        .to_device(device)
        .unwrap()
}

/// Run `f` on a tape watching `inputs[wrt]`, backpropagate `gy` (ones for a scalar
/// when `None`), return the output and the gradients of `inputs[wrt]`.
fn run_with_grads(
    f: impl Fn(&[Tensor]) -> Result<Tensor>,
    inputs: &[Tensor],
    wrt: &[usize],
    gy: Option<Tensor>,
) -> (Tensor, Vec<Tensor>) {
    let tape = Tape::new();
    for &i in wrt {
        tape.watch(&inputs[i]);
    }
    let y = {
        let _g = tape.activate();
        f(inputs).unwrap()
    };
    let grads = match gy {
        None => tape.backward(&y),
        Some(g) => tape.backward_with(&y, g),
    }
    .unwrap();
    let gs = wrt
        .iter()
        .map(|&i| grads.expect(&inputs[i]).unwrap().clone())
        .collect();
    (y, gs)
}

fn assert_vec_close(what: &str, got: &[f64], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let e = rel_err(got, want);
    assert!(
        e <= tol,
        "{what}: relative error {e:.3e} > {tol:.1e} (got {:?}, want {:?})",
        &got[..got.len().min(4)],
        &want[..want.len().min(4)]
    );
}

fn assert_err_mentions(r: Result<Tensor>, words: &[&str]) {
    let msg = match r {
        Ok(t) => panic!("expected an error mentioning {words:?}, got {t:?}"),
        Err(e) => e.to_string(),
    };
    for w in words {
        assert!(msg.contains(w), "error `{msg}` does not mention `{w}`");
    }
}

// ------------------------------------------------------------------ fixture parity

/// Every case of ops/losses.safetensors: loss and gradient of the input, with the
/// settings (reduction, beta) read from `params`.
fn check_losses_fixture_on(device: Device) {
    let f = fixture("ops/losses.safetensors");
    let params = f.params().unwrap();
    let names = cases(&f);
    assert!(!names.is_empty(), "no cases in losses.safetensors");
    for case in names {
        let p = &params[&case];
        let reduction: Reduction = p["reduction"].as_str().unwrap().parse().unwrap();
        let t = |n: &str| {
            f.tensor(&format!("{case}.{n}"))
                .unwrap()
                .to_device(device)
                .unwrap()
        };
        let (inputs, grad_name): (Vec<Tensor>, &str) = match case.as_str() {
            "bce" => (vec![t("logits"), t("targets")], "glogits"),
            "ce" => {
                let labels = f
                    .int_tensor("ce.labels")
                    .unwrap()
                    .to_device(device)
                    .unwrap();
                (vec![t("logits"), labels], "glogits")
            }
            "smooth_l1" => (vec![t("input"), t("target")], "ginput"),
            other => panic!("losses fixture has a case `{other}` this test does not know"),
        };
        let beta = p.get("beta").and_then(|b| b.as_f64());
        let op = |xs: &[Tensor]| match case.as_str() {
            "bce" => bce_with_logits(&xs[0], &xs[1], reduction),
            "ce" => cross_entropy(&xs[0], &xs[1], reduction),
            _ => smooth_l1(
                &xs[0],
                &xs[1],
                beta.expect("smooth_l1 params give beta"),
                reduction,
            ),
        };
        let (loss, grads) = run_with_grads(op, &inputs, &[0], None);
        let want_loss = f.tensor(&format!("{case}.loss")).unwrap();
        let got_loss = loss.reshape_detached(want_loss.shape().clone()).unwrap();
        assert_close(
            &format!("{case} loss on {device}"),
            &got_loss,
            &want_loss,
            1e-5,
        );
        let want_grad = f.tensor(&format!("{case}.{grad_name}")).unwrap();
        assert_close(
            &format!("{case} gradient on {device}"),
            &grads[0],
            &want_grad,
            1e-4,
        );
    }
}

#[test]
fn losses_match_pytorch_fixture_cpu() {
    check_losses_fixture_on(Device::Cpu);
}

#[test]
#[ignore = "needs a CUDA device"]
fn losses_match_pytorch_fixture_cuda() {
    check_losses_fixture_on(cuda());
}

// ------------------------------------------------------------------ plain-loop references

fn bce_ref(x: f64, t: f64) -> (f64, f64, f64) {
    let loss = x.max(0.0) - x * t + (-x.abs()).exp().ln_1p();
    (loss, 1.0 / (1.0 + (-x).exp()) - t, -x)
}

fn smooth_l1_ref(x: f64, t: f64, beta: f64) -> (f64, f64, f64) {
    let d = x - t;
    let (loss, g) = if d.abs() < beta {
        (0.5 * d * d / beta, d / beta)
    } else {
        (d.abs() - 0.5 * beta, d.signum())
    };
    (loss, g, -g)
}

/// Reduce per-element losses and scale per-element gradients the PyTorch way.
fn reduce_ref(losses: &[f64], reduction: Reduction) -> (Vec<f64>, f64) {
    let n = losses.len() as f64;
    match reduction {
        Reduction::Mean => (vec![losses.iter().sum::<f64>() / n], 1.0 / n),
        Reduction::Sum => (vec![losses.iter().sum::<f64>()], 1.0),
        Reduction::None => (losses.to_vec(), 1.0),
    }
}

/// Upstream gradient for a loss output: a scalar 0.7 or a random tensor.
fn upstream(reduction: Reduction, shape: &[usize], device: Device) -> (Tensor, Vec<f64>) {
    match reduction {
        Reduction::None => {
            let g = randn(77, shape.iter().product());
            (f32_on(&g, shape, device), g)
        }
        _ => (f32_on(&[0.7], &[], device), vec![0.7]),
    }
}

type PointRef = fn(f64, f64, f64) -> (f64, f64, f64);

/// Pointwise losses at `n` elements for every reduction against the reference
/// formulas: loss, d/dinput and d/dtarget.
fn check_pointwise_losses_on(device: Device, n: usize) {
    let x: Vec<f64> = randn(1, n).iter().map(|v| v * 4.0).collect();
    let t01: Vec<f64> = randn(2, n).iter().map(|v| (v + 1.0) / 2.0).collect();
    let t: Vec<f64> = randn(3, n).iter().map(|v| v * 0.5).collect();
    let losses: [(&str, PointRef, &[f64], f64); 4] = [
        ("bce_with_logits", |x, t, _| bce_ref(x, t), &t01, 0.0),
        ("smooth_l1 beta 1/9", smooth_l1_ref, &t, 1.0 / 9.0),
        ("smooth_l1 beta 1", smooth_l1_ref, &t, 1.0),
        ("l1_loss", smooth_l1_ref, &t, 0.0),
    ];
    for (name, reference, targets, beta) in losses {
        for reduction in REDUCTIONS {
            let inputs = [f32_on(&x, &[n], device), f32_on(targets, &[n], device)];
            let (g_t, g) = upstream(reduction, &[n], device);
            let op = |xs: &[Tensor]| match name {
                "bce_with_logits" => bce_with_logits(&xs[0], &xs[1], reduction),
                "l1_loss" => l1_loss(&xs[0], &xs[1], reduction),
                _ => smooth_l1(&xs[0], &xs[1], beta, reduction),
            };
            let (y, grads) = run_with_grads(op, &inputs, &[0, 1], Some(g_t));
            let per: Vec<(f64, f64, f64)> =
                (0..n).map(|i| reference(x[i], targets[i], beta)).collect();
            let (want_y, k) = reduce_ref(&per.iter().map(|p| p.0).collect::<Vec<_>>(), reduction);
            let gi = |i: usize| if reduction == Reduction::None { g[i] } else { g[0] } * k;
            let want_gx: Vec<f64> = (0..n).map(|i| per[i].1 * gi(i)).collect();
            let want_gt: Vec<f64> = (0..n).map(|i| per[i].2 * gi(i)).collect();
            let what = format!("{name} {reduction:?} n={n} on {device}");
            let want_dims: &[usize] = if reduction == Reduction::None {
                &[n]
            } else {
                &[]
            };
            assert_eq!(y.dims(), want_dims, "{what}: output shape");
            assert_vec_close(
                &format!("{what}: loss"),
                &y.to_vec().unwrap(),
                &want_y,
                1e-5,
            );
            assert_vec_close(
                &format!("{what}: d/dinput"),
                &grads[0].to_vec().unwrap(),
                &want_gx,
                1e-5,
            );
            assert_vec_close(
                &format!("{what}: d/dtarget"),
                &grads[1].to_vec().unwrap(),
                &want_gt,
                1e-5,
            );
        }
    }
}

/// Cross-entropy over `[n, c]` for every reduction against log-sum-exp in f64.
fn check_cross_entropy_on(device: Device, n: usize, c: usize) {
    let x: Vec<f64> = randn(4, n * c).iter().map(|v| v * 6.0).collect();
    let mut rng = kestrel::rng::Rng::new(5);
    let labels: Vec<i64> = (0..n).map(|_| rng.below(c as u64) as i64).collect();
    for reduction in REDUCTIONS {
        let inputs = [f32_on(&x, &[n, c], device), i64_on(&labels, device)];
        let (g_t, g) = upstream(reduction, &[n], device);
        let op = |xs: &[Tensor]| cross_entropy(&xs[0], &xs[1], reduction);
        let (y, grads) = run_with_grads(op, &inputs, &[0], Some(g_t));
        let mut rows = Vec::new();
        let mut want_gx = Vec::new();
        for r in 0..n {
            let row = &x[r * c..(r + 1) * c];
            let m = row.iter().cloned().fold(f64::MIN, f64::max);
            let lse = m + row.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
            rows.push(lse - row[labels[r] as usize]);
            for (j, v) in row.iter().enumerate() {
                let onehot = if j as i64 == labels[r] { 1.0 } else { 0.0 };
                want_gx.push((v - lse).exp() - onehot);
            }
        }
        let (want_y, k) = reduce_ref(&rows, reduction);
        for (i, gx) in want_gx.iter_mut().enumerate() {
            *gx *= if reduction == Reduction::None {
                g[i / c]
            } else {
                g[0]
            } * k;
        }
        let what = format!("cross_entropy {reduction:?} [{n}, {c}] on {device}");
        assert_vec_close(
            &format!("{what}: loss"),
            &y.to_vec().unwrap(),
            &want_y,
            1e-5,
        );
        assert_vec_close(
            &format!("{what}: d/dlogits"),
            &grads[0].to_vec().unwrap(),
            &want_gx,
            1e-5,
        );
    }
}

#[test]
fn pointwise_losses_match_reference_cpu() {
    check_pointwise_losses_on(Device::Cpu, 1000);
    check_pointwise_losses_on(Device::Cpu, 100_000);
}

#[test]
fn cross_entropy_matches_reference_cpu() {
    check_cross_entropy_on(Device::Cpu, 37, 5);
    check_cross_entropy_on(Device::Cpu, 300, 91);
}

#[test]
#[ignore = "needs a CUDA device"]
fn pointwise_losses_match_reference_cuda() {
    check_pointwise_losses_on(cuda(), 1000);
}

#[test]
#[ignore = "needs a CUDA device"]
fn cross_entropy_matches_reference_cuda() {
    check_cross_entropy_on(cuda(), 37, 5);
    check_cross_entropy_on(cuda(), 300, 91);
}

/// Sizes where the CUDA reduction runs 1024 blocks over a grid-stride loop (the RPN's
/// 242991 anchors) and cross-entropy rows need more than one pass of the grid.
#[test]
#[ignore = "needs a CUDA device"]
fn losses_at_rpn_sizes_cuda() {
    check_pointwise_losses_on(cuda(), 242_991);
    check_cross_entropy_on(cuda(), 1024, 91);
}

#[test]
fn bce_is_stable_for_large_logits() {
    let x = Tensor::from_vec(vec![100.0f32, -100.0, 80.0, -80.0], [4]).unwrap();
    let t = Tensor::from_vec(vec![0.0f32, 1.0, 1.0, 0.0], [4]).unwrap();
    let y = bce_with_logits(&x, &t, Reduction::None)
        .unwrap()
        .to_vec::<f64>()
        .unwrap();
    // Exact values: 100, 100, log1p(e^-80) ~ 1.8e-35, same.
    assert_vec_close(
        "bce at |x| = 100",
        &y,
        &[100.0, 100.0, 1.8e-35, 1.8e-35],
        1e-6,
    );
    assert!(y.iter().all(|v| v.is_finite()), "{y:?}");
}

// ------------------------------------------------------------------ loss gradchecks

#[test]
fn gradcheck_losses() {
    for seed in 0..3u64 {
        let x = rand_t(10 + seed, &[4, 6]).to_vec::<f64>().unwrap();
        let x = Tensor::from_vec(x.iter().map(|v| v * 3.0).collect::<Vec<_>>(), [4, 6]).unwrap();
        let probs: Vec<f64> = randn(20 + seed, 24)
            .iter()
            .map(|v| (v + 1.0) / 2.0)
            .collect();
        let probs = Tensor::from_vec(probs, [4, 6]).unwrap();
        let t = rand_t(30 + seed, &[4, 6]);
        let mut rng = kestrel::rng::Rng::new(seed);
        let labels =
            Tensor::from_vec_i64((0..4).map(|_| rng.below(6) as i64).collect(), [4]).unwrap();
        for reduction in REDUCTIONS {
            let checks: [(&str, Vec<Tensor>, Vec<usize>); 5] = [
                (
                    "bce_with_logits",
                    vec![x.clone(), probs.clone()],
                    vec![0, 1],
                ),
                ("smooth_l1", vec![x.clone(), t.clone()], vec![0, 1]),
                ("l1_loss", vec![x.clone(), t.clone()], vec![0, 1]),
                // gradcheck takes f64 inputs only: the labels are captured instead.
                ("cross_entropy", vec![x.clone()], vec![0]),
                ("smooth_l1 beta 0", vec![x.clone(), t.clone()], vec![0, 1]),
            ];
            for (name, inputs, wrt) in checks {
                let f = |xs: &[Tensor]| match name {
                    "bce_with_logits" => bce_with_logits(&xs[0], &xs[1], reduction),
                    "smooth_l1" => smooth_l1(&xs[0], &xs[1], 0.5, reduction),
                    "smooth_l1 beta 0" => smooth_l1(&xs[0], &xs[1], 0.0, reduction),
                    "l1_loss" => l1_loss(&xs[0], &xs[1], reduction),
                    _ => cross_entropy(&xs[0], &labels, reduction),
                };
                let r = gradcheck(f, &inputs, &wrt, seed, 1e-6, 1e-6);
                assert!(
                    r.is_ok(),
                    "{name} {reduction:?} seed {seed}: {}",
                    r.unwrap_err()
                );
            }
        }
    }
}

// ------------------------------------------------------------------ loss errors

fn check_loss_errors_on(device: Device) {
    let x = f32_on(&randn(1, 6), &[2, 3], device);
    let other = f32_on(&randn(2, 6), &[3, 2], device);
    assert_err_mentions(
        bce_with_logits(&x, &other, Reduction::Mean),
        &["bce_with_logits", "[2, 3]", "[3, 2]"],
    );
    assert_err_mentions(
        smooth_l1(&x, &other, 1.0, Reduction::Sum),
        &["smooth_l1", "[2, 3]"],
    );
    assert_err_mentions(l1_loss(&x, &other, Reduction::None), &["l1_loss", "[3, 2]"]);
    assert_err_mentions(
        smooth_l1(&x, &x, -1.0, Reduction::Sum),
        &["smooth_l1", "beta"],
    );
    assert_err_mentions(
        smooth_l1(&x, &x, f64::NAN, Reduction::Sum),
        &["smooth_l1", "beta"],
    );
    let ints = i64_on(&[0, 1, 0, 1, 0, 1], device)
        .reshape_detached([2, 3])
        .unwrap();
    assert_err_mentions(
        bce_with_logits(&x, &ints, Reduction::Mean),
        &["bce_with_logits", "i64"],
    );
    // cross_entropy: labels out of range (above and negative), wrong dtype, shapes.
    assert_err_mentions(
        cross_entropy(&x, &i64_on(&[0, 3], device), Reduction::Mean),
        &["cross_entropy", "labels[1]", "[0, 3)"],
    );
    assert_err_mentions(
        cross_entropy(&x, &i64_on(&[-1, 0], device), Reduction::Sum),
        &["cross_entropy", "labels[0]"],
    );
    let float_labels = f32_on(&[0.0, 1.0], &[2], device);
    assert_err_mentions(
        cross_entropy(&x, &float_labels, Reduction::Mean),
        &["cross_entropy", "i64"],
    );
    assert_err_mentions(
        cross_entropy(&x, &i64_on(&[0, 1, 2], device), Reduction::Mean),
        &["cross_entropy", "[2, 3]", "[3]"],
    );
    let flat = f32_on(&randn(1, 6), &[6], device);
    assert_err_mentions(
        cross_entropy(&flat, &i64_on(&[0], device), Reduction::Mean),
        &["cross_entropy", "[6]"],
    );
}

#[test]
fn loss_errors_cpu() {
    check_loss_errors_on(Device::Cpu);
    let x = Tensor::from_vec(vec![0.5f64; 4], [4]).unwrap();
    let t = Tensor::from_vec(vec![0.5f32; 4], [4]).unwrap();
    assert_err_mentions(
        bce_with_logits(&x, &t, Reduction::Mean),
        &["bce_with_logits", "f32"],
    );
    assert!(matches!(
        "avg".parse::<Reduction>(),
        Err(Error::InvalidArgument { .. })
    ));
    assert_eq!("none".parse::<Reduction>().unwrap(), Reduction::None);
}

#[test]
#[ignore = "needs a CUDA device"]
fn loss_errors_cuda() {
    let dev = cuda();
    check_loss_errors_on(dev);
    let x = f32_on(&[0.1, 0.2], &[2], dev);
    let t = f32_on(&[0.1, 0.2], &[2], Device::Cpu);
    assert_err_mentions(
        bce_with_logits(&x, &t, Reduction::Mean),
        &["bce_with_logits", "different devices"],
    );
}

// ------------------------------------------------------------------ shape ops: reference

fn strides(dims: &[usize]) -> Vec<usize> {
    let mut s = vec![1; dims.len()];
    for d in (0..dims.len().saturating_sub(1)).rev() {
        s[d] = s[d + 1] * dims[d + 1];
    }
    s
}

fn unravel(mut i: usize, dims: &[usize]) -> Vec<usize> {
    let mut idx = vec![0; dims.len()];
    for d in (0..dims.len()).rev() {
        idx[d] = i % dims[d];
        i /= dims[d];
    }
    idx
}

fn ravel(idx: &[usize], dims: &[usize]) -> usize {
    idx.iter().zip(strides(dims)).map(|(i, s)| i * s).sum()
}

/// A shape op as a gather: output element `i` is element `src[i].1` of input `src[i].0`.
struct Gather {
    out_dims: Vec<usize>,
    src: Vec<(usize, usize)>,
}

fn concat_ref(dims: &[Vec<usize>], dim: usize) -> Gather {
    let mut out_dims = dims[0].clone();
    out_dims[dim] = dims.iter().map(|d| d[dim]).sum();
    let n: usize = out_dims.iter().product();
    let src = (0..n)
        .map(|i| {
            let mut idx = unravel(i, &out_dims);
            let mut k = 0;
            while idx[dim] >= dims[k][dim] {
                idx[dim] -= dims[k][dim];
                k += 1;
            }
            (k, ravel(&idx, &dims[k]))
        })
        .collect();
    Gather { out_dims, src }
}

fn narrow_ref(dims: &[usize], dim: usize, start: usize, len: usize) -> Gather {
    let mut out_dims = dims.to_vec();
    out_dims[dim] = len;
    let n: usize = out_dims.iter().product();
    let src = (0..n)
        .map(|i| {
            let mut idx = unravel(i, &out_dims);
            idx[dim] += start;
            (0, ravel(&idx, dims))
        })
        .collect();
    Gather { out_dims, src }
}

fn permute_ref(dims: &[usize], perm: &[usize]) -> Gather {
    let out_dims: Vec<usize> = perm.iter().map(|&p| dims[p]).collect();
    let n: usize = out_dims.iter().product();
    let src = (0..n)
        .map(|i| {
            let o = unravel(i, &out_dims);
            let mut idx = vec![0; dims.len()];
            for (a, &p) in perm.iter().enumerate() {
                idx[p] = o[a];
            }
            (0, ravel(&idx, dims))
        })
        .collect();
    Gather { out_dims, src }
}

fn index_select_ref(dims: &[usize], dim: usize, ids: &[i64]) -> Gather {
    let mut out_dims = dims.to_vec();
    out_dims[dim] = ids.len();
    let n: usize = out_dims.iter().product();
    let src = (0..n)
        .map(|i| {
            let mut idx = unravel(i, &out_dims);
            idx[dim] = ids[idx[dim]] as usize;
            (0, ravel(&idx, dims))
        })
        .collect();
    Gather { out_dims, src }
}

/// Check a shape op on `device` against its gather: f32 values and gradients (the
/// scatter-add of a random upstream gradient), and i64 values when `ints` is given.
fn check_gather(
    what: &str,
    device: Device,
    in_dims: &[Vec<usize>],
    g: &Gather,
    op: impl Fn(&[Tensor]) -> Result<Tensor>,
) {
    let what = format!("{what} on {device}");
    let values: Vec<Vec<f64>> = in_dims
        .iter()
        .enumerate()
        .map(|(k, d)| randn(100 + k as u64, d.iter().product()))
        .collect();
    let inputs: Vec<Tensor> = values
        .iter()
        .zip(in_dims)
        .map(|(v, d)| f32_on(v, d, device))
        .collect();
    let n_out = g.src.len();
    let gy = randn(200, n_out);
    let wrt: Vec<usize> = (0..inputs.len()).collect();
    let (y, grads) = run_with_grads(&op, &inputs, &wrt, Some(f32_on(&gy, &g.out_dims, device)));
    assert_eq!(y.dims(), &g.out_dims[..], "{what}: output shape");
    let want: Vec<f32> = g.src.iter().map(|&(k, j)| values[k][j] as f32).collect();
    assert_eq!(y.to_vec::<f32>().unwrap(), want, "{what}: values");
    let mut want_g: Vec<Vec<f64>> = in_dims
        .iter()
        .map(|d| vec![0.0; d.iter().product()])
        .collect();
    for (i, &(k, j)) in g.src.iter().enumerate() {
        want_g[k][j] += gy[i] as f32 as f64;
    }
    for (k, gk) in grads.iter().enumerate() {
        assert_eq!(gk.dims(), &in_dims[k][..], "{what}: gradient {k} shape");
        assert_vec_close(
            &format!("{what}: gradient {k}"),
            &gk.to_vec().unwrap(),
            &want_g[k],
            1e-6,
        );
    }
    // The same gather on i64 tensors (labels, indices) is exact.
    let ints: Vec<Tensor> = in_dims
        .iter()
        .enumerate()
        .map(|(k, d)| {
            let n: usize = d.iter().product();
            let v: Vec<i64> = (0..n as i64)
                .map(|j| j * 1_000_003 + k as i64 - (1 << 40))
                .collect();
            Tensor::from_vec_i64(v, d.clone())
                .unwrap()
                .to_device(device)
                .unwrap()
        })
        .collect();
    let yi = op(&ints).unwrap();
    assert_eq!(yi.dtype(), DType::I64, "{what}: i64 output dtype");
    let want_i: Vec<i64> = g
        .src
        .iter()
        .map(|&(k, j)| j as i64 * 1_000_003 + k as i64 - (1 << 40))
        .collect();
    assert_eq!(yi.to_vec_i64().unwrap(), want_i, "{what}: i64 values");
}

fn check_shape_ops_on(device: Device) {
    // concat along each axis, including inputs of different sizes and an empty one.
    let dims = [vec![2, 3, 4], vec![2, 1, 4], vec![2, 0, 4], vec![2, 5, 4]];
    check_gather("concat dim 1", device, &dims, &concat_ref(&dims, 1), |xs| {
        concat(&xs.iter().collect::<Vec<_>>(), 1)
    });
    let dims = [vec![3, 2, 4], vec![1, 2, 4]];
    check_gather("concat dim 0", device, &dims, &concat_ref(&dims, 0), |xs| {
        concat(&xs.iter().collect::<Vec<_>>(), 0)
    });
    let dims = [vec![2, 3, 1], vec![2, 3, 4]];
    check_gather("concat dim 2", device, &dims, &concat_ref(&dims, 2), |xs| {
        concat(&xs.iter().collect::<Vec<_>>(), 2)
    });
    for (dim, start, len) in [(0, 1, 2), (1, 2, 3), (2, 0, 1), (1, 5, 0)] {
        let d = vec![3, 5, 4];
        check_gather(
            &format!("narrow dim {dim} start {start} len {len}"),
            device,
            std::slice::from_ref(&d),
            &narrow_ref(&d, dim, start, len),
            |xs| narrow(&xs[0], dim, start, len),
        );
    }
    let perms: [(Vec<usize>, Vec<usize>); 5] = [
        (vec![2, 12, 5, 7], vec![0, 2, 3, 1]), // RPN head [N, A*4, H, W] -> [N, H, W, A*4]
        (vec![3, 4], vec![1, 0]),
        (vec![2, 3, 4, 5], vec![3, 1, 0, 2]),
        (vec![1, 6, 1, 5], vec![3, 2, 1, 0]),
        (vec![4, 3, 2], vec![0, 1, 2]),
    ];
    for (d, perm) in perms {
        check_gather(
            &format!("permute {d:?} by {perm:?}"),
            device,
            std::slice::from_ref(&d),
            &permute_ref(&d, &perm),
            |xs| permute(&xs[0], &perm),
        );
    }
    let d = vec![6, 3, 2];
    for (dim, ids) in [
        (0, vec![5i64, 0, 2, 2, 5, 1]),
        (1, vec![2, 0]),
        (2, vec![1, 1, 1]),
        (0, vec![]),
    ] {
        let idx = i64_on(&ids, device);
        check_gather(
            &format!("index_select dim {dim} {ids:?}"),
            device,
            std::slice::from_ref(&d),
            &index_select_ref(&d, dim, &ids),
            |xs| index_select(&xs[0], dim, &idx),
        );
    }
    // stack = concat of unsqueezed inputs; flatten keeps the order.
    let dims = [vec![2, 3], vec![2, 3], vec![2, 3]];
    let unsqueezed: Vec<Vec<usize>> = dims.iter().map(|_| vec![2, 1, 3]).collect();
    let g = concat_ref(&unsqueezed, 1);
    check_gather("stack dim 1", device, &dims, &g, |xs| {
        stack(&xs.iter().collect::<Vec<_>>(), 1)
    });
    let d = vec![2, 3, 4, 5];
    let g = Gather {
        out_dims: vec![2, 60],
        src: (0..120).map(|i| (0, i)).collect(),
    };
    check_gather(
        "flatten 1..=3",
        device,
        std::slice::from_ref(&d),
        &g,
        |xs| flatten(&xs[0], 1, 3),
    );
}

#[test]
fn shape_ops_match_reference_cpu() {
    check_shape_ops_on(Device::Cpu);
    // Large enough for the CPU permute to split the output into several chunks.
    let d = vec![2, 12, 40, 64];
    for perm in [[0, 2, 3, 1], [3, 0, 2, 1]] {
        let g = permute_ref(&d, &perm);
        check_gather(
            "permute, several chunks",
            Device::Cpu,
            std::slice::from_ref(&d),
            &g,
            |xs| permute(&xs[0], &perm),
        );
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn shape_ops_match_reference_cuda() {
    check_shape_ops_on(cuda());
}

/// The RPN head's regression output at its real size, NCHW -> NHWC.
#[test]
#[ignore = "needs a CUDA device"]
fn permute_rpn_head_size_cuda() {
    let d = vec![1, 12, 200, 304];
    let g = permute_ref(&d, &[0, 2, 3, 1]);
    check_gather(
        "permute rpn head",
        cuda(),
        std::slice::from_ref(&d),
        &g,
        |xs| permute(&xs[0], &[0, 2, 3, 1]),
    );
}

#[test]
fn gradcheck_shape_ops() {
    for seed in 0..3u64 {
        let a = rand_t(seed, &[2, 3, 4]);
        let b = rand_t(seed + 10, &[2, 2, 4]);
        let c = rand_t(seed + 20, &[2, 3, 4]);
        let idx = Tensor::from_vec_i64(vec![2, 0, 2, 1], [4]).unwrap();
        type Case<'a> = (
            &'a str,
            Vec<Tensor>,
            Box<dyn Fn(&[Tensor]) -> Result<Tensor> + 'a>,
        );
        let checks: Vec<Case> = vec![
            (
                "concat",
                vec![a.clone(), b.clone()],
                Box::new(|xs| concat(&[&xs[0], &xs[1]], 1)),
            ),
            (
                "narrow",
                vec![a.clone()],
                Box::new(|xs| narrow(&xs[0], 2, 1, 2)),
            ),
            (
                "permute",
                vec![a.clone()],
                Box::new(|xs| permute(&xs[0], &[2, 0, 1])),
            ),
            (
                "index_select",
                vec![a.clone()],
                Box::new(|xs| index_select(&xs[0], 1, &idx)),
            ),
            (
                "stack",
                vec![a.clone(), c.clone()],
                Box::new(|xs| stack(&[&xs[0], &xs[1]], 3)),
            ),
            (
                "flatten",
                vec![a.clone()],
                Box::new(|xs| flatten(&xs[0], 0, 1)),
            ),
        ];
        for (name, inputs, f) in checks {
            let wrt: Vec<usize> = (0..inputs.len()).collect();
            let r = gradcheck(f, &inputs, &wrt, seed, 1e-6, 1e-7);
            assert!(r.is_ok(), "{name} seed {seed}: {}", r.unwrap_err());
        }
    }
}

// ------------------------------------------------------------------ shape op errors

fn check_shape_errors_on(device: Device) {
    let a = f32_on(&randn(1, 24), &[2, 3, 4], device);
    let b = f32_on(&randn(2, 12), &[3, 4], device);
    let c = f32_on(&randn(3, 16), &[2, 2, 4], device);
    assert_err_mentions(concat(&[], 0), &["concat"]);
    assert_err_mentions(concat(&[&a, &b], 0), &["concat", "[2, 3, 4]", "[3, 4]"]);
    assert_err_mentions(concat(&[&a, &c], 2), &["concat", "[2, 2, 4]"]);
    assert_err_mentions(concat(&[&a, &c], 3), &["concat", "dim 3"]);
    let ints = i64_on(&[1; 16], device)
        .reshape_detached([2, 2, 4])
        .unwrap();
    assert_err_mentions(concat(&[&a, &ints], 1), &["concat", "i64"]);
    assert_err_mentions(narrow(&a, 1, 2, 2), &["narrow", "[2, 3, 4]"]);
    assert_err_mentions(narrow(&a, 3, 0, 1), &["narrow", "dim 3"]);
    assert_err_mentions(narrow(&a, 0, usize::MAX, 2), &["narrow"]);
    assert_err_mentions(permute(&a, &[0, 1]), &["permute", "[2, 3, 4]"]);
    assert_err_mentions(permute(&a, &[0, 1, 1]), &["permute", "[0, 1, 1]"]);
    assert_err_mentions(permute(&a, &[0, 1, 3]), &["permute"]);
    assert_err_mentions(
        index_select(&a, 1, &i64_on(&[0, 3], device)),
        &["index_select", "idx[1]", "[0, 3)", "[2, 3, 4]"],
    );
    assert_err_mentions(
        index_select(&a, 0, &i64_on(&[-1], device)),
        &["index_select", "idx[0]"],
    );
    assert_err_mentions(
        index_select(&a, 3, &i64_on(&[0], device)),
        &["index_select", "dim 3"],
    );
    let float_idx = f32_on(&[0.0], &[1], device);
    assert_err_mentions(index_select(&a, 0, &float_idx), &["index_select", "i64"]);
    assert_err_mentions(stack(&[&a, &c], 0), &["stack", "[2, 3, 4]", "[2, 2, 4]"]);
    assert_err_mentions(stack(&[&a], 4), &["stack", "dim 4"]);
    assert_err_mentions(flatten(&a, 2, 1), &["flatten"]);
    assert_err_mentions(flatten(&a, 0, 3), &["flatten", "[2, 3, 4]"]);
}

#[test]
fn shape_errors_cpu() {
    check_shape_errors_on(Device::Cpu);
}

#[test]
#[ignore = "needs a CUDA device"]
fn shape_errors_cuda() {
    let dev = cuda();
    check_shape_errors_on(dev);
    let a = f32_on(&[1.0, 2.0], &[2], dev);
    let b = f32_on(&[1.0, 2.0], &[2], Device::Cpu);
    assert_err_mentions(concat(&[&a, &b], 0), &["concat", "different devices"]);
    assert_err_mentions(
        index_select(&a, 0, &i64_on(&[0], Device::Cpu)),
        &["index_select", "different devices"],
    );
}

// ------------------------------------------------------------------ SGD

/// torch.optim.SGD's update written out in f64 for one parameter.
struct SgdRef {
    buf: Option<Vec<f64>>,
}

impl SgdRef {
    fn step(&mut self, c: &SgdConfig, p: &mut [f64], g: &[f64]) {
        let mut d: Vec<f64> = g
            .iter()
            .zip(p.iter())
            .map(|(g, p)| g + c.weight_decay * p)
            .collect();
        if c.momentum != 0.0 {
            let buf = match self.buf.take() {
                None => d.clone(),
                Some(b) => b
                    .iter()
                    .zip(&d)
                    .map(|(b, d)| c.momentum * b + (1.0 - c.dampening) * d)
                    .collect(),
            };
            d = if c.nesterov {
                d.iter()
                    .zip(&buf)
                    .map(|(d, b)| d + c.momentum * b)
                    .collect()
            } else {
                buf.clone()
            };
            self.buf = Some(buf);
        }
        for (p, d) in p.iter_mut().zip(&d) {
            *p -= c.lr * d;
        }
    }
}

fn sgd_configs() -> Vec<SgdConfig> {
    let c = |lr, momentum, weight_decay, dampening, nesterov| SgdConfig {
        lr,
        momentum,
        weight_decay,
        dampening,
        nesterov,
    };
    vec![
        c(0.1, 0.0, 0.0, 0.0, false),
        c(0.1, 0.0, 0.01, 0.0, false),
        c(0.02, 0.9, 1e-4, 0.0, false), // torchvision's detection recipe
        c(0.05, 0.9, 5e-4, 0.1, false),
        c(0.1, 0.8, 0.01, 0.0, true),
        c(0.01, 0.5, 0.0, 0.5, false),
    ]
}

/// Several steps over two parameters with a learning-rate change halfway, against the
/// f64 loop; `tol` is the relative tolerance of the final parameters and buffers.
fn check_sgd_on(device: Device, dtype: DType, tol: f64) {
    let shapes = [vec![3, 4], vec![5]];
    for cfg in sgd_configs() {
        let mut opt = Sgd::new(cfg).unwrap();
        let mut refs: Vec<SgdRef> = shapes.iter().map(|_| SgdRef { buf: None }).collect();
        let mut ref_p: Vec<Vec<f64>> = shapes
            .iter()
            .enumerate()
            .map(|(i, s)| randn(i as u64, s.iter().product()))
            .collect();
        let to_dev = |v: &[f64], s: &[usize]| {
            let t = Tensor::from_vec(v.to_vec(), s.to_vec()).unwrap();
            t.to_dtype(dtype).unwrap().to_device(device).unwrap()
        };
        let mut params: Vec<Tensor> = ref_p
            .iter()
            .zip(&shapes)
            .map(|(v, s)| to_dev(v, s))
            .collect();
        let mut ref_cfg = cfg;
        for step in 0..5u64 {
            if step == 3 {
                opt.set_lr(cfg.lr * 0.1).unwrap();
                ref_cfg.lr = cfg.lr * 0.1;
            }
            let g: Vec<Vec<f64>> = shapes
                .iter()
                .enumerate()
                .map(|(i, s)| randn(50 + 10 * step + i as u64, s.iter().product()))
                .collect();
            // The reference sees the gradients as the optimizer does (rounded to dtype).
            let g_round: Vec<Vec<f64>> = g
                .iter()
                .map(|v| {
                    v.iter()
                        .map(|&x| {
                            if dtype == DType::F32 {
                                x as f32 as f64
                            } else {
                                x
                            }
                        })
                        .collect()
                })
                .collect();
            let grads: Vec<Tensor> = g.iter().zip(&shapes).map(|(v, s)| to_dev(v, s)).collect();
            let ids: Vec<_> = params.iter().map(|p| p.id()).collect();
            opt.step(&mut params, &grads).unwrap();
            for (i, r) in refs.iter_mut().enumerate() {
                r.step(&ref_cfg, &mut ref_p[i], &g_round[i]);
                assert_ne!(
                    params[i].id(),
                    ids[i],
                    "step must replace parameter {i} with a new tensor"
                );
                assert_eq!(params[i].device(), device);
            }
        }
        let state = opt.state();
        for (i, p) in params.iter().enumerate() {
            let what = format!("{cfg:?} on {device} {dtype}: param {i}");
            assert_vec_close(&what, &p.to_vec().unwrap(), &ref_p[i], tol);
            match &refs[i].buf {
                Some(b) => {
                    let (name, t) = &state[i];
                    assert_eq!(name, &format!("momentum_buffer.{i}"));
                    assert_vec_close(&format!("{what} buffer"), &t.to_vec().unwrap(), b, tol);
                }
                None => assert!(state.is_empty(), "{what}: no momentum, no state"),
            }
        }
    }
}

#[test]
fn sgd_matches_pytorch_formula_cpu() {
    check_sgd_on(Device::Cpu, DType::F64, 1e-13);
    check_sgd_on(Device::Cpu, DType::F32, 1e-6);
}

#[test]
#[ignore = "needs a CUDA device"]
fn sgd_matches_pytorch_formula_cuda() {
    check_sgd_on(cuda(), DType::F32, 1e-6);
}

/// Stopping after two steps, saving the state and resuming in a new optimizer ends
/// exactly where four uninterrupted steps end.
fn check_sgd_resume_on(device: Device) {
    let cfg = SgdConfig {
        lr: 0.05,
        momentum: 0.9,
        weight_decay: 1e-4,
        dampening: 0.0,
        nesterov: false,
    };
    let p0 = vec![
        f32_on(&randn(1, 8), &[2, 4], device),
        f32_on(&randn(2, 3), &[3], device),
    ];
    let grads: Vec<Vec<Tensor>> = (0..4)
        .map(|s| {
            vec![
                f32_on(&randn(10 + s, 8), &[2, 4], device),
                f32_on(&randn(20 + s, 3), &[3], device),
            ]
        })
        .collect();
    let mut straight = p0.clone();
    let mut opt = Sgd::new(cfg).unwrap();
    for g in &grads {
        opt.step(&mut straight, g).unwrap();
    }
    let mut resumed = p0.clone();
    let mut first = Sgd::new(cfg).unwrap();
    for g in &grads[..2] {
        first.step(&mut resumed, g).unwrap();
    }
    // A checkpoint is read on the CPU: the buffers come back as CPU tensors.
    let saved: Vec<(String, Tensor)> = first
        .state()
        .into_iter()
        .map(|(n, t)| (n, t.to_device(Device::Cpu).unwrap()))
        .collect();
    let mut second = Sgd::new(cfg).unwrap();
    second.load_state(&saved).unwrap();
    for g in &grads[2..] {
        second.step(&mut resumed, g).unwrap();
    }
    for (a, b) in straight.iter().zip(&resumed) {
        assert_eq!(
            a.to_vec::<f32>().unwrap(),
            b.to_vec::<f32>().unwrap(),
            "resume on {device} differs"
        );
    }
}

#[test]
fn sgd_resume_is_exact_cpu() {
    check_sgd_resume_on(Device::Cpu);
}

#[test]
#[ignore = "needs a CUDA device"]
fn sgd_resume_is_exact_cuda() {
    check_sgd_resume_on(cuda());
}

#[test]
fn sgd_skips_parameters_without_gradient() {
    let cfg = SgdConfig {
        lr: 0.1,
        momentum: 0.9,
        ..SgdConfig::default()
    };
    let mut opt = Sgd::new(cfg).unwrap();
    let mut params = vec![
        f32_on(&[1.0, 2.0], &[2], Device::Cpu),
        f32_on(&[3.0], &[1], Device::Cpu),
    ];
    let g0 = f32_on(&[1.0, 1.0], &[2], Device::Cpu);
    let g1 = f32_on(&[2.0], &[1], Device::Cpu);
    opt.step(&mut params, &[g0.clone(), g1.clone()]).unwrap();
    let before = params[1].clone();
    opt.step_optional(&mut params, &[Some(&g0), None]).unwrap();
    assert_eq!(
        params[1].id(),
        before.id(),
        "parameter without gradient replaced"
    );
    // buf0 = 0.9 * 1 + 1 = 1.9; p0 = (1 - 0.1) - 0.19 = 0.71 and (2 - 0.1) - 0.19 = 1.71.
    assert_vec_close("p0", &params[0].to_vec().unwrap(), &[0.71, 1.71], 1e-6);
    let state = opt.state();
    assert_vec_close("buf1 untouched", &state[1].1.to_vec().unwrap(), &[2.0], 0.0);
}

#[test]
fn sgd_errors() {
    let bad = [
        SgdConfig {
            lr: -0.1,
            ..SgdConfig::default()
        },
        SgdConfig {
            momentum: -0.5,
            ..SgdConfig::default()
        },
        SgdConfig {
            weight_decay: f64::NAN,
            ..SgdConfig::default()
        },
        SgdConfig {
            nesterov: true,
            ..SgdConfig::default()
        },
        SgdConfig {
            nesterov: true,
            momentum: 0.9,
            dampening: 0.1,
            ..SgdConfig::default()
        },
    ];
    for cfg in bad {
        let e = Sgd::new(cfg).unwrap_err().to_string();
        assert!(e.contains("Sgd"), "{cfg:?}: {e}");
    }
    let mut opt = Sgd::new(SgdConfig {
        momentum: 0.9,
        ..SgdConfig::default()
    })
    .unwrap();
    assert!(opt.set_lr(-1.0).is_err());
    assert_eq!(opt.lr(), 1e-3);
    let mut params = vec![f32_on(&[1.0, 2.0], &[2], Device::Cpu)];
    let wrong = f32_on(&[1.0, 2.0, 3.0], &[3], Device::Cpu);
    let e = opt.step(&mut params, &[wrong]).unwrap_err().to_string();
    assert!(
        e.contains("Sgd::step") && e.contains("[3]") && e.contains("[2]"),
        "{e}"
    );
    let e = opt.step(&mut params, &[]).unwrap_err().to_string();
    assert!(e.contains("0 gradients for 1 parameters"), "{e}");
    let e = opt
        .load_state(&[("velocity.0".into(), params[0].clone())])
        .unwrap_err()
        .to_string();
    assert!(e.contains("velocity.0"), "{e}");
    let wrong_buf = f32_on(&[1.0], &[1], Device::Cpu);
    opt.load_state(&[("momentum_buffer.0".into(), wrong_buf)])
        .unwrap();
    let g = f32_on(&[1.0, 1.0], &[2], Device::Cpu);
    let before = params[0].clone();
    let e = opt.step(&mut params, &[g]).unwrap_err().to_string();
    assert!(e.contains("momentum buffer [1]"), "{e}");
    assert_eq!(
        params[0].id(),
        before.id(),
        "a failed step must not change the parameters"
    );
}

// The CUDA paths above, on the emulated device (kernels run on the host).

#[test]
fn losses_match_pytorch_fixture_emulated() {
    check_losses_fixture_on(common::emulated());
}

#[test]
fn pointwise_losses_match_reference_emulated() {
    check_pointwise_losses_on(common::emulated(), 1000);
}

#[test]
fn cross_entropy_matches_reference_emulated() {
    check_cross_entropy_on(common::emulated(), 37, 5);
    check_cross_entropy_on(common::emulated(), 300, 91);
}

#[test]
fn loss_errors_emulated() {
    let dev = common::emulated();
    check_loss_errors_on(dev);
    let x = f32_on(&[0.1, 0.2], &[2], dev);
    let t = f32_on(&[0.1, 0.2], &[2], Device::Cpu);
    assert_err_mentions(
        bce_with_logits(&x, &t, Reduction::Mean),
        &["bce_with_logits", "different devices"],
    );
}

#[test]
fn shape_ops_match_reference_emulated() {
    check_shape_ops_on(common::emulated());
}

#[test]
fn shape_errors_emulated() {
    let dev = common::emulated();
    check_shape_errors_on(dev);
    let a = f32_on(&[1.0, 2.0], &[2], dev);
    let b = f32_on(&[1.0, 2.0], &[2], Device::Cpu);
    assert_err_mentions(concat(&[&a, &b], 0), &["concat", "different devices"]);
    assert_err_mentions(
        index_select(&a, 0, &i64_on(&[0], Device::Cpu)),
        &["index_select", "different devices"],
    );
}

#[test]
fn sgd_matches_pytorch_formula_emulated() {
    check_sgd_on(common::emulated(), DType::F32, 1e-6);
}

#[test]
fn sgd_resume_is_exact_emulated() {
    check_sgd_resume_on(common::emulated());
}
