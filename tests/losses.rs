//! Losses (bce_with_logits, cross_entropy, smooth_l1, l1_loss; kernels/losses.cu):
//! parity with the PyTorch fixture, plain-loop f64 references (also at the RPN's
//! sizes), f64 gradient checks and error cases, on the CPU, the emulated device and CUDA.

mod common;

use common::*;
use kestrel::autograd::gradcheck;
use kestrel::ops::losses::{bce_with_logits, cross_entropy, l1_loss, smooth_l1, Reduction};
use kestrel::{Device, Error, Tensor};

const REDUCTIONS: [Reduction; 3] = [Reduction::Mean, Reduction::Sum, Reduction::None];

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

crate::device_tests! {
    losses_match_pytorch_fixture => check_losses_fixture_on;
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

crate::device_tests! {
    pointwise_losses_match_reference => |d| check_pointwise_losses_on(d, 1000);
    cross_entropy_matches_reference => |d| {
        check_cross_entropy_on(d, 37, 5);
        check_cross_entropy_on(d, 300, 91);
    };
    /// Sizes where the CUDA reduction runs 1024 blocks over a grid-stride loop (the
    /// RPN's 242991 anchors), cross-entropy rows need more than one pass of the grid,
    /// and the CPU splits the work into several chunks.
    losses_at_rpn_sizes => |d| {
        check_pointwise_losses_on(d, 242_991);
        check_cross_entropy_on(d, 1024, 91);
    };
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
    if device != Device::Cpu {
        let x = f32_on(&[0.1, 0.2], &[2], device);
        let t = f32_on(&[0.1, 0.2], &[2], Device::Cpu);
        assert_err_mentions(
            bce_with_logits(&x, &t, Reduction::Mean),
            &["bce_with_logits", "different devices"],
        );
    }
}

crate::device_tests! {
    loss_errors => check_loss_errors_on;
}

#[test]
fn loss_dtype_and_reduction_names() {
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
