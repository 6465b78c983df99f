//! max_pool2d, upsample_nearest_add, frozen_batch_norm and batch_norm: parity with the
//! PyTorch fixtures (outputs and gradients), f64 references written here from the
//! textbook formulas, finite-difference gradient checks and error cases. Each
//! `check_*_on(device)` runs on the CPU here and on CUDA in the ignored tests.

mod common;

use common::{assert_close, cases, fixture, rand_t, randn};
use kestrel::autograd::{gradcheck, Gradients, Tape};
use kestrel::ops::norm::{batch_norm, frozen_batch_norm, BatchNormConfig};
use kestrel::ops::pool::{max_pool2d, max_pool2d_backward, max_pool2d_with_indices, Pool2d};
use kestrel::ops::upsample::{nearest_source_index, upsample_nearest_add};
use kestrel::{Device, Error, Tensor};

const FWD_TOL: f64 = 1e-5;
const GRAD_TOL: f64 = 1e-4;
const SEEDS: [u64; 3] = [1, 2, 3];

/// Run `f` on a fresh tape watching `inputs`; return its output and the gradients of
/// `sum(y * gy)`.
fn with_grads(
    inputs: &[&Tensor],
    gy: &Tensor,
    f: impl FnOnce() -> kestrel::Result<Tensor>,
) -> (Tensor, Gradients) {
    let tape = Tape::new();
    for t in inputs {
        tape.watch(t);
    }
    let y = {
        let _g = tape.activate();
        f().unwrap()
    };
    let grads = tape.backward_with(&y, gy.clone()).unwrap();
    (y, grads)
}

fn f32_on(t: &Tensor, dev: Device) -> Tensor {
    t.to_dtype(kestrel::DType::F32)
        .unwrap()
        .to_device(dev)
        .unwrap()
}

fn assert_err(what: &str, r: kestrel::Result<impl std::fmt::Debug>, op: &str) {
    match r {
        Ok(v) => panic!("{what}: expected an error, got {v:?}"),
        Err(e) => assert!(
            e.to_string().contains(op),
            "{what}: error does not name {op}: {e}"
        ),
    }
}

// ---------------------------------------------------------------------------------
// max_pool2d

fn check_max_pool2d_on(dev: Device) {
    let f = fixture("ops/max_pool2d.safetensors");
    let params = f.params().unwrap();
    for case in cases(&f) {
        let p = &params[&case];
        let get = |k: &str| p[k].as_u64().unwrap_or_else(|| panic!("{case}.{k}")) as usize;
        let (k, s, pad) = (get("kernel"), get("stride"), get("padding"));
        let t = |n: &str| {
            f.tensor(&format!("{case}.{n}"))
                .unwrap()
                .to_device(dev)
                .unwrap()
        };
        let (x, gy) = (t("x"), t("gy"));
        let (y, grads) = with_grads(&[&x], &gy, || max_pool2d(&x, k, s, pad));
        // The output is a selection of input values: exact.
        assert_close(&format!("max_pool2d {case} y"), &y, &t("y"), 0.0);
        assert_close(
            &format!("max_pool2d {case} gx"),
            grads.get(&x).unwrap(),
            &t("gx"),
            GRAD_TOL,
        );
    }
}

/// Equal values: the first in row-major window order takes the gradient (PyTorch);
/// a NaN wins over numbers.
fn check_max_pool2d_ties_on(dev: Device) {
    // 3x3 windows, stride 1, padding 1 on a 2x2 plane of ones: every window holds all
    // four pixels, so (0, 0) wins everywhere and collects the sum of gy.
    let x = Tensor::from_vec(vec![1.0f32; 4], [1, 1, 2, 2])
        .unwrap()
        .to_device(dev)
        .unwrap();
    let gy = Tensor::from_vec(vec![1.0f32, 2.0, 3.0, 4.0], [1, 1, 2, 2])
        .unwrap()
        .to_device(dev)
        .unwrap();
    let (y, grads) = with_grads(&[&x], &gy, || max_pool2d(&x, 3, 1, 1));
    assert_eq!(y.to_vec::<f32>().unwrap(), vec![1.0; 4]);
    assert_eq!(
        grads.get(&x).unwrap().to_vec::<f32>().unwrap(),
        vec![10.0, 0.0, 0.0, 0.0]
    );

    // Rows [5, 7, 7] and [7, 2, 7], kernel 2 stride 1: the first 7 in scan order wins.
    let x = Tensor::from_vec(vec![5.0f32, 7.0, 7.0, 7.0, 2.0, 7.0], [1, 1, 2, 3])
        .unwrap()
        .to_device(dev)
        .unwrap();
    let (y, idx) = max_pool2d_with_indices(&x, 2, 1, 0).unwrap();
    assert_eq!(y.to_vec::<f32>().unwrap(), vec![7.0, 7.0]);
    assert_eq!(idx.to_vec_i64().unwrap(), vec![1, 1]);

    // A NaN in the window wins (PyTorch propagates NaN through max pooling).
    let x = Tensor::from_vec(vec![1.0f32, f32::NAN, 3.0, 2.0], [1, 1, 2, 2])
        .unwrap()
        .to_device(dev)
        .unwrap();
    let (y, idx) = max_pool2d_with_indices(&x, 2, 2, 0).unwrap();
    assert!(y.to_vec::<f32>().unwrap()[0].is_nan());
    assert_eq!(idx.to_vec_i64().unwrap(), vec![1]);
}

/// Slow max pooling in f64 straight from the definition (-inf padding).
fn reference_max_pool(x: &[f64], dims: [usize; 4], p: Pool2d) -> (Vec<f64>, [usize; 4]) {
    let [n, c, h, w] = dims;
    let oh = (h + 2 * p.padding.h - p.kernel.h) / p.stride.h + 1;
    let ow = (w + 2 * p.padding.w - p.kernel.w) / p.stride.w + 1;
    let mut y = Vec::new();
    for plane in 0..n * c {
        for i in 0..oh {
            for j in 0..ow {
                let mut best = f64::NEG_INFINITY;
                for a in 0..p.kernel.h {
                    for b in 0..p.kernel.w {
                        let r = (i * p.stride.h + a) as isize - p.padding.h as isize;
                        let s = (j * p.stride.w + b) as isize - p.padding.w as isize;
                        if r >= 0 && s >= 0 && (r as usize) < h && (s as usize) < w {
                            best = best.max(x[plane * h * w + r as usize * w + s as usize]);
                        }
                    }
                }
                y.push(best);
            }
        }
    }
    (y, [n, c, oh, ow])
}

/// Non-square kernels, strides and paddings (the fixtures are square).
fn check_max_pool2d_rectangular_on(dev: Device) {
    let dims = [2, 3, 9, 11];
    for (seed, p) in [
        Pool2d::new((3, 2), (2, 1), (1, 0)),
        Pool2d::new((2, 4), (1, 3), (0, 2)),
        Pool2d::new(5, (3, 2), 2),
    ]
    .into_iter()
    .enumerate()
    {
        let x = rand_t(seed as u64 + 10, &dims);
        let (want, out_dims) = reference_max_pool(&x.to_vec::<f64>().unwrap(), dims, p);
        let want = Tensor::from_vec(want, out_dims).unwrap();
        let y = max_pool2d(&f32_on(&x, dev), p.kernel, p.stride, p.padding).unwrap();
        assert_close(&format!("max_pool2d {p:?}"), &y, &want, FWD_TOL);
    }
}

#[test]
fn max_pool2d_matches_fixture() {
    check_max_pool2d_on(Device::Cpu);
}

#[test]
fn max_pool2d_ties_go_to_first_index() {
    check_max_pool2d_ties_on(Device::Cpu);
}

#[test]
fn max_pool2d_rectangular_matches_reference() {
    check_max_pool2d_rectangular_on(Device::Cpu);
}

/// Distinct values at least 0.01 apart (a shuffled ramp), so a finite-difference step
/// never changes a window's argmax.
fn tie_free(seed: u64, dims: &[usize]) -> Tensor {
    let n: usize = dims.iter().product();
    let mut rng = kestrel::rng::Rng::new(seed);
    let mut v: Vec<f64> = (0..n).map(|i| i as f64 * 0.01 - 1.0).collect();
    for i in (1..n).rev() {
        v.swap(i, rng.below(i as u64 + 1) as usize);
    }
    Tensor::from_vec(v, dims.to_vec()).unwrap()
}

#[test]
fn max_pool2d_gradcheck() {
    for seed in SEEDS {
        for p in [
            Pool2d::new(3, 2, 1),
            Pool2d::new(2, 2, 0),
            Pool2d::new(3, 1, 1),
            Pool2d::new((3, 2), (1, 2), (1, 0)),
        ] {
            let x = tie_free(seed, &[2, 2, 7, 9]);
            let f = |xs: &[Tensor]| max_pool2d(&xs[0], p.kernel, p.stride, p.padding);
            gradcheck(f, &[x], &[0], seed, 1e-6, 1e-6).unwrap_or_else(|e| panic!("{p:?}: {e}"));
        }
    }
}

#[test]
fn max_pool2d_rejects_bad_input() {
    let x = Tensor::from_vec(vec![0.0f32; 2 * 3 * 5 * 5], [2, 3, 5, 5]).unwrap();
    let op = "max_pool2d";
    let rank3 = x.reshape_detached([6, 5, 5]).unwrap();
    assert_err("rank 3", max_pool2d(&rank3, 3, 2, 1), op);
    assert_err("stride 0", max_pool2d(&x, 3, 0, 1), op);
    assert_err("kernel 0", max_pool2d(&x, 0, 1, 0), op);
    assert_err("padding > kernel / 2", max_pool2d(&x, 3, 1, 2), op);
    assert_err("kernel larger than input", max_pool2d(&x, 7, 1, 0), op);
    let ints = Tensor::from_vec_i64(vec![0; 25], [1, 1, 5, 5]).unwrap();
    assert_err("i64 input", max_pool2d(&ints, 3, 1, 1), op);
    let p = Pool2d::new(3, 2, 1);
    let (y, idx) = max_pool2d_with_indices(&x, 3, 2, 1).unwrap();
    let bad_gy = Tensor::from_vec(vec![0.0f32; 2 * 3 * 2 * 2], [2, 3, 2, 2]).unwrap();
    assert_err(
        "gy of the wrong shape",
        max_pool2d_backward(&bad_gy, &idx, x.shape(), p),
        "max_pool2d_backward",
    );
    assert_err(
        "float indices",
        max_pool2d_backward(&y, &y, x.shape(), p),
        "max_pool2d_backward",
    );
    let far = Tensor::from_vec_i64(vec![99; idx.numel()], idx.dims().to_vec()).unwrap();
    assert_err(
        "index outside the plane",
        max_pool2d_backward(&y, &far, x.shape(), p),
        "max_pool2d_backward",
    );
}

// ---------------------------------------------------------------------------------
// upsample_nearest_add

fn check_upsample_nearest_add_on(dev: Device) {
    let f = fixture("ops/upsample_nearest_add.safetensors");
    for case in cases(&f) {
        let t = |n: &str| {
            f.tensor(&format!("{case}.{n}"))
                .unwrap()
                .to_device(dev)
                .unwrap()
        };
        let (lateral, top, gy) = (t("lateral"), t("top"), t("gy"));
        let (y, grads) = with_grads(&[&lateral, &top], &gy, || {
            upsample_nearest_add(&lateral, &top)
        });
        assert_close(&format!("upsample {case} y"), &y, &t("y"), FWD_TOL);
        let g = |x: &Tensor| grads.get(x).unwrap().clone();
        assert_close(
            &format!("upsample {case} glateral"),
            &g(&lateral),
            &t("glateral"),
            GRAD_TOL,
        );
        assert_close(
            &format!("upsample {case} gtop"),
            &g(&top),
            &t("gtop"),
            GRAD_TOL,
        );
    }
}

#[test]
fn upsample_nearest_add_matches_fixture() {
    check_upsample_nearest_add_on(Device::Cpu);
}

/// PyTorch's index rule at sizes that are not 2x: `F.interpolate(torch.arange(n_in)
/// [None, None, None].float(), size=(1, n_out), mode="nearest")` gives these sources.
#[test]
fn nearest_index_follows_pytorch() {
    let src = |n_in, n_out| -> Vec<usize> {
        (0..n_out)
            .map(|d| nearest_source_index(d, n_in, n_out))
            .collect()
    };
    // 5 -> 9: scale 5/9 = 0.5556: floor(d * 0.5556) = 0 0 1 1 2 2 3 3 4.
    assert_eq!(src(5, 9), vec![0, 0, 1, 1, 2, 2, 3, 3, 4]);
    // 4 -> 7: scale 0.5714: 0 0 1 1 2 2 3.
    assert_eq!(src(4, 7), vec![0, 0, 1, 1, 2, 2, 3]);
    // 3 -> 2 (down): scale 1.5: 0, 1.
    assert_eq!(src(3, 2), vec![0, 1]);
    // 2x is the plain halving.
    assert_eq!(src(3, 6), vec![0, 0, 1, 1, 2, 2]);
}

/// Lateral/top sizes beyond the fixtures: odd, downsampling, identity, 1-pixel top.
fn check_upsample_shapes_on(dev: Device) {
    for (seed, (lat, top)) in [
        ([2, 3, 13, 19], [2, 3, 7, 10]),
        ([1, 2, 5, 6], [1, 2, 8, 9]),
        ([1, 2, 4, 5], [1, 2, 4, 5]),
        ([2, 1, 6, 3], [2, 1, 1, 1]),
        // An FPN level of an 800x1216 image: 25x38 <- 13x19.
        ([1, 2, 25, 38], [1, 2, 13, 19]),
    ]
    .into_iter()
    .enumerate()
    {
        let seed = seed as u64;
        let (l64, t64, g64) = (
            rand_t(seed, &lat),
            rand_t(seed + 50, &top),
            rand_t(seed + 99, &lat),
        );
        // f64 reference: y = lateral + top[src(r), src(c)]; gtop = sum of gy over the
        // output pixels copied from each top pixel.
        let (l, t, g) = (
            l64.to_vec::<f64>().unwrap(),
            t64.to_vec::<f64>().unwrap(),
            g64.to_vec::<f64>().unwrap(),
        );
        let (hl, wl, ht, wt) = (lat[2], lat[3], top[2], top[3]);
        let mut y = l.clone();
        let mut gtop = vec![0.0; t.len()];
        for plane in 0..lat[0] * lat[1] {
            for r in 0..hl {
                for c in 0..wl {
                    let sr = ((r as f32 * (ht as f32 / hl as f32)).floor() as usize).min(ht - 1);
                    let sc = ((c as f32 * (wt as f32 / wl as f32)).floor() as usize).min(wt - 1);
                    let (o, s) = (plane * hl * wl + r * wl + c, plane * ht * wt + sr * wt + sc);
                    y[o] += t[s];
                    gtop[s] += g[o];
                }
            }
        }
        let (lateral, topt, gy) = (f32_on(&l64, dev), f32_on(&t64, dev), f32_on(&g64, dev));
        let (got, grads) = with_grads(&[&lateral, &topt], &gy, || {
            upsample_nearest_add(&lateral, &topt)
        });
        let what = format!("upsample {lat:?} <- {top:?}");
        assert_close(&what, &got, &Tensor::from_vec(y, lat).unwrap(), FWD_TOL);
        assert_close(&what, grads.get(&lateral).unwrap(), &g64, GRAD_TOL);
        assert_close(
            &what,
            grads.get(&topt).unwrap(),
            &Tensor::from_vec(gtop, top).unwrap(),
            GRAD_TOL,
        );
    }
}

#[test]
fn upsample_nearest_add_other_sizes() {
    check_upsample_shapes_on(Device::Cpu);
}

#[test]
fn upsample_nearest_add_gradcheck() {
    for seed in SEEDS {
        for (lat, top) in [
            ([2, 2, 5, 7], [2, 2, 3, 4]),
            ([1, 3, 6, 8], [1, 3, 3, 4]),
            ([1, 2, 3, 4], [1, 2, 5, 5]),
        ] {
            let xs = [rand_t(seed, &lat), rand_t(seed + 7, &top)];
            let f = |xs: &[Tensor]| upsample_nearest_add(&xs[0], &xs[1]);
            gradcheck(f, &xs, &[0, 1], seed, 1e-6, 1e-6).unwrap();
        }
    }
}

#[test]
fn upsample_nearest_add_rejects_bad_input() {
    let op = "upsample_nearest_add";
    let z = |d: &[usize]| Tensor::zeros(d.to_vec(), kestrel::DType::F32, Device::Cpu).unwrap();
    let lat = z(&[2, 3, 8, 8]);
    assert_err(
        "batch mismatch",
        upsample_nearest_add(&lat, &z(&[1, 3, 4, 4])),
        op,
    );
    assert_err(
        "channel mismatch",
        upsample_nearest_add(&lat, &z(&[2, 4, 4, 4])),
        op,
    );
    assert_err("rank 3 top", upsample_nearest_add(&lat, &z(&[6, 4, 4])), op);
    assert_err(
        "empty top",
        upsample_nearest_add(&lat, &z(&[2, 3, 0, 4])),
        op,
    );
    let top64 = Tensor::zeros([2, 3, 4, 4], kestrel::DType::F64, Device::Cpu).unwrap();
    assert_err("mixed dtypes", upsample_nearest_add(&lat, &top64), op);
    let ints = Tensor::from_vec_i64(vec![0; 96], [2, 3, 4, 4]).unwrap();
    assert_err("i64 top", upsample_nearest_add(&lat, &ints), op);
}

// ---------------------------------------------------------------------------------
// frozen_batch_norm

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

#[test]
fn frozen_batch_norm_matches_fixture() {
    check_frozen_batch_norm_on(Device::Cpu);
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

// ---------------------------------------------------------------------------------
// batch_norm

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
            let on = |t: &Tensor| f32_on(t, dev);
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

#[test]
fn batch_norm_matches_reference() {
    check_batch_norm_on(Device::Cpu);
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

#[test]
fn batch_norm_running_stats_by_hand() {
    check_batch_norm_by_hand_on(Device::Cpu);
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
    // Eval mode has no such limit.
    assert!(batch_norm(&one_value, &c2, &c2, &c2, &c2, BatchNormConfig::eval()).is_ok());
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

// ---------------------------------------------------------------------------------
// CUDA: the same checks on a device (run with `--ignored` where one exists).

/// Inputs on two devices are an error naming the op, for every op here.
fn check_mixed_devices_on(dev: Device) {
    let cpu = Tensor::zeros([1, 2, 4, 4], kestrel::DType::F32, Device::Cpu).unwrap();
    let gpu = cpu.to_device(dev).unwrap();
    let small = Tensor::zeros([1, 2, 2, 2], kestrel::DType::F32, Device::Cpu).unwrap();
    assert_err(
        "upsample",
        upsample_nearest_add(&gpu, &small),
        "upsample_nearest_add",
    );
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
    let (y, idx) = max_pool2d_with_indices(&gpu, 2, 2, 0).unwrap();
    let idx_cpu = idx.to_device(Device::Cpu).unwrap();
    assert_err(
        "pool backward",
        max_pool2d_backward(&y, &idx_cpu, gpu.shape(), Pool2d::new(2, 2, 0)),
        "max_pool2d_backward",
    );
}

#[test]
#[ignore = "needs a CUDA device"]
fn max_pool2d_cuda() {
    let dev = common::cuda();
    check_max_pool2d_on(dev);
    check_max_pool2d_ties_on(dev);
    check_max_pool2d_rectangular_on(dev);
}

#[test]
#[ignore = "needs a CUDA device"]
fn upsample_nearest_add_cuda() {
    let dev = common::cuda();
    check_upsample_nearest_add_on(dev);
    check_upsample_shapes_on(dev);
}

#[test]
#[ignore = "needs a CUDA device"]
fn frozen_batch_norm_cuda() {
    check_frozen_batch_norm_on(common::cuda());
}

#[test]
#[ignore = "needs a CUDA device"]
fn batch_norm_cuda() {
    let dev = common::cuda();
    check_batch_norm_on(dev);
    check_batch_norm_by_hand_on(dev);
}

#[test]
#[ignore = "needs a CUDA device"]
fn layers_cuda_reject_mixed_devices() {
    check_mixed_devices_on(common::cuda());
}

// The CUDA paths above, on the emulated device (kernels run on the host).

#[test]
fn max_pool2d_emulated() {
    let dev = common::emulated();
    check_max_pool2d_on(dev);
    check_max_pool2d_ties_on(dev);
    check_max_pool2d_rectangular_on(dev);
}

#[test]
fn upsample_nearest_add_emulated() {
    let dev = common::emulated();
    check_upsample_nearest_add_on(dev);
    check_upsample_shapes_on(dev);
}

#[test]
fn frozen_batch_norm_emulated() {
    check_frozen_batch_norm_on(common::emulated());
}

#[test]
fn batch_norm_emulated() {
    let dev = common::emulated();
    check_batch_norm_on(dev);
    check_batch_norm_by_hand_on(dev);
}

#[test]
fn layers_emulated_reject_mixed_devices() {
    check_mixed_devices_on(common::emulated());
}
