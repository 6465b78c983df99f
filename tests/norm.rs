//! frozen_batch_norm and batch_norm (kernels/norm.cu): parity with the PyTorch fixture,
//! f64 references written here from the textbook formulas, running statistics by
//! hand, f64 gradient checks and error cases, on the CPU, the emulated device and CUDA.

mod common;

use common::*;
use kestrel::autograd::gradcheck;
use kestrel::ops::norm::{batch_norm, frozen_batch_norm, BatchNormConfig};
use kestrel::{Device, Error, Tensor};

const FWD_TOL: f64 = 1e-5;
const GRAD_TOL: f64 = 1e-4;
const SEEDS: [u64; 3] = [1, 2, 3];

fn check_frozen_batch_norm_on(dev: Device) {
    let f = fixture("ops/frozen_batch_norm.safetensors");
    let params = f.params().unwrap();
    for case in cases(&f) {
        let eps = params[&case]["eps"].as_f64().unwrap();
        let t = |n: &str| {
            f.tensor(&format!("{case}.{n}"))
                .unwrap()
                .to_device(dev)
                .unwrap()
        };
        let (x, w, b, rm, rv, gy) = (
            t("x"),
            t("weight"),
            t("bias"),
            t("running_mean"),
            t("running_var"),
            t("gy"),
        );
        let (y, grads) = with_grads(&[&x, &w, &b], &gy, || {
            frozen_batch_norm(&x, &w, &b, &rm, &rv, eps)
        });
        assert_close(&format!("frozen_bn {case} y"), &y, &t("y"), FWD_TOL);
        assert_close(
            &format!("frozen_bn {case} gx"),
            grads.get(&x).unwrap(),
            &t("gx"),
            GRAD_TOL,
        );
        // The fixture has no weight/bias gradients: per channel c, from the definition
        // y = (x - rm) * w / sqrt(rv + eps) + b, gw = sum gy * (x - rm) / sqrt(rv + eps)
        // and gb = sum gy over N, H, W.
        let v = |t: &Tensor| t.to_vec::<f64>().unwrap();
        let (xs, gys, rms, rvs) = (v(&x), v(&gy), v(&rm), v(&rv));
        let [n, c, h, wd] = x.dims().try_into().unwrap();
        let (mut gw, mut gb) = (vec![0.0; c], vec![0.0; c]);
        for i in 0..n * c * h * wd {
            let ch = i / (h * wd) % c;
            gw[ch] += gys[i] * (xs[i] - rms[ch]) / (rvs[ch] + eps).sqrt();
            gb[ch] += gys[i];
        }
        let vec_c = |v: Vec<f64>| Tensor::from_vec(v, [c]).unwrap();
        assert_close(
            &format!("frozen_bn {case} gw"),
            grads.get(&w).unwrap(),
            &vec_c(gw),
            GRAD_TOL,
        );
        assert_close(
            &format!("frozen_bn {case} gb"),
            grads.get(&b).unwrap(),
            &vec_c(gb),
            GRAD_TOL,
        );
        assert!(
            grads.get(&rm).is_none() && grads.get(&rv).is_none(),
            "running stats got gradients"
        );
    }
}

crate::device_tests! {
    // was: frozen_batch_norm_cuda, frozen_batch_norm_emulated, frozen_batch_norm_matches_fixture_cpu
    frozen_batch_norm_matches_fixture => check_frozen_batch_norm_on;
}

/// Positive variances in [0.5, 1.5).
fn rand_var(seed: u64, c: usize) -> Tensor {
    Tensor::from_vec(
        randn(seed, c)
            .iter()
            .map(|v| 1.0 + 0.5 * v)
            .collect::<Vec<_>>(),
        [c],
    )
    .unwrap()
}

#[test]
fn frozen_batch_norm_gradcheck() {
    for seed in SEEDS {
        let xs = [
            rand_t(seed, &[2, 3, 4, 5]),
            rand_t(seed + 1, &[3]),
            rand_t(seed + 2, &[3]),
            rand_t(seed + 3, &[3]),
            rand_var(seed + 4, 3),
        ];
        let f = |t: &[Tensor]| frozen_batch_norm(&t[0], &t[1], &t[2], &t[3], &t[4], 1e-5);
        gradcheck(f, &xs, &[0, 1, 2], seed, 1e-6, 1e-6).unwrap();
    }
}

#[test]
fn frozen_batch_norm_rejects_bad_input() {
    let op = "frozen_batch_norm";
    let x = Tensor::zeros([2, 3, 4, 4], kestrel::DType::F32, Device::Cpu).unwrap();
    let c3 = Tensor::full([3], 1.0, kestrel::DType::F32, Device::Cpu).unwrap();
    let c4 = Tensor::full([4], 1.0, kestrel::DType::F32, Device::Cpu).unwrap();
    let c3_64 = Tensor::full([3], 1.0, kestrel::DType::F64, Device::Cpu).unwrap();
    assert_err(
        "weight of 4 for 3 channels",
        frozen_batch_norm(&x, &c4, &c3, &c3, &c3, 1e-5),
        op,
    );
    assert_err(
        "var of 4",
        frozen_batch_norm(&x, &c3, &c3, &c3, &c4, 1e-5),
        op,
    );
    assert_err(
        "rank 1 input",
        frozen_batch_norm(&c3, &c3, &c3, &c3, &c3, 1e-5),
        op,
    );
    assert_err(
        "negative eps",
        frozen_batch_norm(&x, &c3, &c3, &c3, &c3, -1.0),
        op,
    );
    assert_err(
        "mixed dtypes",
        frozen_batch_norm(&x, &c3_64, &c3, &c3, &c3, 1e-5),
        op,
    );
}

/// What [`reference_batch_norm`] computes.
struct BnReference {
    y: Vec<f64>,
    running_mean: Vec<f64>,
    running_var: Vec<f64>,
    gx: Vec<f64>,
    gw: Vec<f64>,
    gb: Vec<f64>,
}

/// Textbook batch norm in f64 on `[N, C, H, W]` values `[x, w, b, rm, rv, gy]`: per
/// channel, the mean and variance over the N * H * W values; the gradients are for
/// upstream `gy`.
fn reference_batch_norm(
    inputs: [&[f64]; 6],
    dims: [usize; 4],
    cfg: BatchNormConfig,
) -> BnReference {
    let [x, w, b, rm, rv, gy] = inputs;
    let [n, c, h, wd] = dims;
    let hw = h * wd;
    let m = (n * hw) as f64;
    let at = |k: usize, ch: usize, i: usize| (k * c + ch) * hw + i;
    let (mut y, mut gx) = (vec![0.0; x.len()], vec![0.0; x.len()]);
    let (mut nrm, mut nrv, mut gw, mut gb) = (rm.to_vec(), rv.to_vec(), vec![0.0; c], vec![0.0; c]);
    for ch in 0..c {
        let idx: Vec<usize> = (0..n)
            .flat_map(|k| (0..hw).map(move |i| at(k, ch, i)))
            .collect();
        let mean_b = idx.iter().map(|&i| x[i]).sum::<f64>() / m;
        let var_b = idx.iter().map(|&i| (x[i] - mean_b).powi(2)).sum::<f64>() / m;
        let (mean, var) = if cfg.training {
            (mean_b, var_b)
        } else {
            (rm[ch], rv[ch])
        };
        let sd = (var + cfg.eps).sqrt();
        let xhat = |i: usize| (x[i] - mean) / sd;
        for &i in &idx {
            y[i] = xhat(i) * w[ch] + b[ch];
            gb[ch] += gy[i];
            gw[ch] += gy[i] * xhat(i);
        }
        for &i in &idx {
            gx[i] = if cfg.training {
                // d/dx of (x - mean(x)) / sqrt(var(x) + eps), through mean and var.
                w[ch] / sd * (gy[i] - gb[ch] / m - xhat(i) * gw[ch] / m)
            } else {
                w[ch] / sd * gy[i]
            };
        }
        if cfg.training {
            nrm[ch] = cfg.momentum * mean_b + (1.0 - cfg.momentum) * rm[ch];
            nrv[ch] = cfg.momentum * var_b * m / (m - 1.0) + (1.0 - cfg.momentum) * rv[ch];
        }
    }
    BnReference {
        y,
        running_mean: nrm,
        running_var: nrv,
        gx,
        gw,
        gb,
    }
}

fn check_batch_norm_on(dev: Device) {
    for (seed, dims) in [[2, 3, 4, 5], [3, 2, 33, 47], [4, 5, 1, 1]]
        .into_iter()
        .enumerate()
    {
        let seed = seed as u64 * 10;
        let c = dims[1];
        // Inputs with a nonzero mean, as activations have.
        let x = Tensor::from_vec(
            randn(seed, dims.iter().product())
                .iter()
                .map(|v| 2.0 + 3.0 * v)
                .collect::<Vec<_>>(),
            dims,
        )
        .unwrap();
        let (w, b, rm, rv, gy) = (
            rand_t(seed + 1, &[c]),
            rand_t(seed + 2, &[c]),
            rand_t(seed + 3, &[c]),
            rand_var(seed + 4, c),
            rand_t(seed + 5, &dims),
        );
        for cfg in [
            BatchNormConfig::train(),
            BatchNormConfig::eval(),
            BatchNormConfig {
                momentum: 0.3,
                eps: 1e-3,
                training: true,
            },
        ] {
            let v = |t: &Tensor| t.to_vec::<f64>().unwrap();
            let want = reference_batch_norm(
                [&v(&x), &v(&w), &v(&b), &v(&rm), &v(&rv), &v(&gy)],
                dims,
                cfg,
            );
            let on = |t: &Tensor| tensor_f32_on(t, dev);
            let (xd, wd, bd, rmd, rvd) = (on(&x), on(&w), on(&b), on(&rm), on(&rv));
            let mut stats = None;
            let (y, grads) = with_grads(&[&xd, &wd, &bd], &on(&gy), || {
                let out = batch_norm(&xd, &wd, &bd, &rmd, &rvd, cfg)?;
                stats = Some((out.running_mean, out.running_var));
                Ok(out.y)
            });
            let (nrm, nrv) = stats.unwrap();
            let what = |s: &str| format!("batch_norm {dims:?} {cfg:?} {s}");
            let t = |v: Vec<f64>, d: &[usize]| Tensor::from_vec(v, d.to_vec()).unwrap();
            assert_close(&what("y"), &y, &t(want.y, &dims), FWD_TOL);
            assert_close(
                &what("running_mean"),
                &nrm,
                &t(want.running_mean, &[c]),
                FWD_TOL,
            );
            assert_close(
                &what("running_var"),
                &nrv,
                &t(want.running_var, &[c]),
                FWD_TOL,
            );
            assert_close(
                &what("gx"),
                grads.get(&xd).unwrap(),
                &t(want.gx, &dims),
                GRAD_TOL,
            );
            assert_close(
                &what("gw"),
                grads.get(&wd).unwrap(),
                &t(want.gw, &[c]),
                GRAD_TOL,
            );
            assert_close(
                &what("gb"),
                grads.get(&bd).unwrap(),
                &t(want.gb, &[c]),
                GRAD_TOL,
            );
        }
    }
}

crate::device_tests! {
    batch_norm_matches_reference => check_batch_norm_on;
}

/// A tiny input whose statistics are worked out by hand.
fn check_batch_norm_by_hand_on(dev: Device) {
    // x [N=2, C=2, H=1, W=2]: channel 0 holds 1, 2 (n=0) and 3, 6 (n=1); channel 1
    // holds 0, 2 and 0, 2.
    let x = Tensor::from_vec(
        vec![1.0f32, 2.0, 0.0, 2.0, 3.0, 6.0, 0.0, 2.0],
        [2, 2, 1, 2],
    )
    .unwrap();
    let w = Tensor::from_vec(vec![1.0f32, 2.0], [2]).unwrap();
    let b = Tensor::from_vec(vec![0.0f32, 0.5], [2]).unwrap();
    let rm = Tensor::from_vec(vec![0.0f32, 0.5], [2]).unwrap();
    let rv = Tensor::from_vec(vec![1.0f32, 2.0], [2]).unwrap();
    let on = |t: &Tensor| t.to_device(dev).unwrap();
    let cfg = BatchNormConfig {
        training: true,
        momentum: 0.1,
        eps: 0.0,
    };
    let out = batch_norm(&on(&x), &on(&w), &on(&b), &on(&rm), &on(&rv), cfg).unwrap();
    // Channel 0: mean (1+2+3+6)/4 = 3; squared deviations 4+1+0+9 = 14, so the
    // biased variance is 3.5 and the unbiased one 14/3.
    //   running_mean = 0.1 * 3 + 0.9 * 0 = 0.3
    //   running_var  = 0.1 * 14/3 + 0.9 * 1 = 1.3666667
    // Channel 1: mean 1; squared deviations 1+1+1+1 = 4: biased 1, unbiased 4/3.
    //   running_mean = 0.1 * 1 + 0.9 * 0.5 = 0.55
    //   running_var  = 0.1 * 4/3 + 0.9 * 2 = 1.9333333
    let close = |got: Vec<f64>, want: &[f64]| {
        got.iter()
            .zip(want)
            .all(|(g, w)| (g - w).abs() <= 1e-6 * w.abs().max(1.0))
    };
    let rm_new = out.running_mean.to_vec::<f64>().unwrap();
    let rv_new = out.running_var.to_vec::<f64>().unwrap();
    assert!(
        close(rm_new.clone(), &[0.3, 0.55]),
        "running_mean {rm_new:?}"
    );
    assert!(
        close(rv_new.clone(), &[1.3666667, 1.9333333]),
        "running_var {rv_new:?}"
    );
    // Channel 1 normalised: (x - 1) / sqrt(1) = -1, 1, -1, 1; times 2 plus 0.5: -1.5, 2.5, -1.5, 2.5.
    // Channel 0: (x - 3) / sqrt(3.5) = -1.0690450, -0.5345225, 0, 1.6035675.
    let y = out.y.to_vec::<f64>().unwrap();
    let want = [-1.0690450, -0.5345225, -1.5, 2.5, 0.0, 1.6035675, -1.5, 2.5];
    assert!(close(y.clone(), &want), "y {y:?}");
    // Eval mode leaves the running statistics as they were.
    let out = batch_norm(
        &on(&x),
        &on(&w),
        &on(&b),
        &on(&rm),
        &on(&rv),
        BatchNormConfig::eval(),
    )
    .unwrap();
    assert_eq!(out.running_mean.to_vec::<f32>().unwrap(), vec![0.0, 0.5]);
    assert_eq!(out.running_var.to_vec::<f32>().unwrap(), vec![1.0, 2.0]);
}

crate::device_tests! {
    batch_norm_running_stats_by_hand => check_batch_norm_by_hand_on;
}

#[test]
fn batch_norm_gradcheck() {
    for seed in SEEDS {
        for cfg in [BatchNormConfig::train(), BatchNormConfig::eval()] {
            let xs = [
                rand_t(seed, &[3, 2, 3, 4]),
                rand_t(seed + 1, &[2]),
                rand_t(seed + 2, &[2]),
                rand_t(seed + 3, &[2]),
                rand_var(seed + 4, 2),
            ];
            let f = |t: &[Tensor]| Ok(batch_norm(&t[0], &t[1], &t[2], &t[3], &t[4], cfg)?.y);
            gradcheck(f, &xs, &[0, 1, 2], seed, 1e-6, 1e-6)
                .unwrap_or_else(|e| panic!("{cfg:?}: {e}"));
        }
    }
}

#[test]
fn batch_norm_rejects_bad_input() {
    let op = "batch_norm";
    let f32z = |d: &[usize]| Tensor::zeros(d.to_vec(), kestrel::DType::F32, Device::Cpu).unwrap();
    let c2 = Tensor::full([2], 1.0, kestrel::DType::F32, Device::Cpu).unwrap();
    let train = BatchNormConfig::train();
    let one_value = f32z(&[1, 2, 1, 1]);
    assert_err(
        "one value per channel",
        batch_norm(&one_value, &c2, &c2, &c2, &c2, train),
        op,
    );
    // Eval mode has no such limit: it normalises with the running statistics,
    // y = (x - mean) / sqrt(var + eps) * w + b = (0 - 1) / sqrt(1 + 1e-5) + 1.
    let y = batch_norm(&one_value, &c2, &c2, &c2, &c2, BatchNormConfig::eval()).unwrap();
    let want = 1.0 - 1.0 / (1.0f64 + BatchNormConfig::eval().eps).sqrt();
    for v in y.y.to_vec::<f64>().unwrap() {
        assert!((v - want).abs() < 1e-6, "eval batch_norm: {v} vs {want}");
    }
    let x = f32z(&[2, 2, 3, 3]);
    let c3 = f32z(&[3]);
    assert_err("bias of 3", batch_norm(&x, &c2, &c3, &c2, &c2, train), op);
    assert_err(
        "running_mean of 3",
        batch_norm(&x, &c2, &c2, &c3, &c2, train),
        op,
    );
    let nan_momentum = BatchNormConfig {
        momentum: f64::NAN,
        ..train
    };
    assert_err(
        "NaN momentum",
        batch_norm(&x, &c2, &c2, &c2, &c2, nan_momentum),
        op,
    );
    let neg_eps = BatchNormConfig {
        eps: -1e-5,
        ..train
    };
    assert_err(
        "negative eps",
        batch_norm(&x, &c2, &c2, &c2, &c2, neg_eps),
        op,
    );
    let ints = Tensor::from_vec_i64(vec![0; 36], [2, 2, 3, 3]).unwrap();
    let c2i = Tensor::from_vec_i64(vec![1; 2], [2]).unwrap();
    assert!(matches!(
        batch_norm(&ints, &c2i, &c2i, &c2i, &c2i, train),
        Err(Error::DType { .. })
    ));
}

/// Inputs on two devices are an error naming the op.
fn check_mixed_devices_on(dev: Device) {
    let gpu = Tensor::zeros([1, 2, 4, 4], kestrel::DType::F32, dev).unwrap();
    let c = Tensor::full([2], 1.0, kestrel::DType::F32, Device::Cpu).unwrap();
    assert_err(
        "frozen bn",
        frozen_batch_norm(&gpu, &c, &c, &c, &c, 1e-5),
        "frozen_batch_norm",
    );
    assert_err(
        "bn",
        batch_norm(&gpu, &c, &c, &c, &c, BatchNormConfig::train()),
        "batch_norm",
    );
}

crate::device_tests! {
    mixed_devices_are_an_error(emulated_errors, cuda) => check_mixed_devices_on;
}
