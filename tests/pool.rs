//! max_pool2d (kernels/pool.cu): parity with the PyTorch fixture (outputs and
//! gradients), an f64 reference, ties, f64 gradient checks and error cases, on the CPU,
//! the emulated device and CUDA.

mod common;
// The memory-bound backward passes' timing (ignored), here rather than in a test
// binary of its own.
#[path = "timing/backward_passes.rs"]
mod backward_passes_timing;

use common::*;
use kestrel::autograd::gradcheck;
use kestrel::ops::pool::{max_pool2d, max_pool2d_backward, max_pool2d_with_indices, Pool2d};
use kestrel::{Device, Tensor};

const FWD_TOL: f64 = 1e-5;
const GRAD_TOL: f64 = 1e-4;
const SEEDS: [u64; 3] = [1, 2, 3];

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
        let y = max_pool2d(&tensor_f32_on(&x, dev), p.kernel, p.stride, p.padding).unwrap();
        assert_close(&format!("max_pool2d {p:?}"), &y, &want, FWD_TOL);
    }
}

crate::device_tests! {
    max_pool2d_matches_fixture => check_max_pool2d_on;
    max_pool2d_ties_go_to_first_index => check_max_pool2d_ties_on;
    max_pool2d_rectangular_matches_reference => check_max_pool2d_rectangular_on;
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

/// The plain backward: a zeroed plane, each output gradient added onto its index in
/// row-major output order.
fn reference_backward(gy: &[f64], idx: &[i64], planes: usize, ihw: usize) -> Vec<f64> {
    let ohw = idx.len() / planes;
    let mut gx = vec![0.0; planes * ihw];
    for (o, (&i, &g)) in idx.iter().zip(gy).enumerate() {
        gx[o / ohw * ihw + i as usize] += g;
    }
    gx
}

/// max_pool2d_backward on the CPU (each plane zeroed just ahead of its scatter, into a
/// recycled buffer) equals the plain zero-then-scatter bit for bit, in f32 and f64:
/// odd and rectangular sizes, padding, overlapping and disjoint windows, ties (so
/// one input collects several gradients), signed zeros in the gradient, and indices
/// that are not their window's (any in-plane index, in any order, is accepted), and
/// a recycled dirty buffer.
#[test]
fn max_pool2d_backward_equals_the_plain_scatter_bit_for_bit() {
    let cases = [
        ([2, 3, 13, 11], Pool2d::new(3, 2, 1)),
        ([1, 2, 9, 17], Pool2d::new((3, 2), (1, 2), (1, 0))),
        ([1, 3, 8, 8], Pool2d::new(2, 2, 0)),
        ([2, 2, 7, 5], Pool2d::new(1, 2, 0)),
        ([1, 1, 1, 1], Pool2d::new(1, 1, 0)),
        ([1, 2, 2, 2], Pool2d::new(3, 1, 1)),
        // Gradients of 69 KB (f32): from the host pool, recycled dirty (below); with
        // kernel 1 stride 2 no index falls in the last row.
        ([1, 2, 96, 90], Pool2d::new(3, 2, 1)),
        ([1, 2, 96, 90], Pool2d::new(1, 2, 0)),
    ];
    for (seed, (dims, p)) in cases.into_iter().enumerate() {
        let (planes, ihw) = (dims[0] * dims[1], dims[2] * dims[3]);
        // Values on a coarse grid: many ties.
        let xv: Vec<f64> = randn(seed as u64, planes * ihw)
            .into_iter()
            .map(|v| (v * 3.0).round())
            .collect();
        for dtype in [kestrel::DType::F32, kestrel::DType::F64] {
            let x = f64_t(xv.clone(), &dims).to_dtype(dtype).unwrap();
            let (y, window_idx) =
                max_pool2d_with_indices(&x, p.kernel, p.stride, p.padding).unwrap();
            let n = y.numel();
            let gv: Vec<f64> = randn(seed as u64 + 40, n)
                .into_iter()
                .enumerate()
                .map(|(i, v)| if i % 4 == 1 { -0.0 } else { v })
                .collect();
            let gy = f64_t(gv.clone(), y.dims()).to_dtype(dtype).unwrap();
            // Any in-plane index, in scrambled order (rows backwards and far ahead).
            let scrambled: Vec<i64> = (0..n)
                .map(|o| ((o * 7919 + seed * 31) % ihw) as i64)
                .collect();
            for (which, idx) in [
                ("window", window_idx.to_vec_i64().unwrap()),
                ("scrambled", scrambled),
            ] {
                let idx_t = Tensor::from_vec_i64(idx.clone(), y.dims().to_vec()).unwrap();
                // A dropped tensor of gx's size, all NaN, goes back to the host pool: a
                // pooled-size gx recycles it and must overwrite every element.
                drop(
                    f64_t(vec![f64::NAN; planes * ihw], &dims)
                        .to_dtype(dtype)
                        .unwrap(),
                );
                let gx = max_pool2d_backward(&gy, &idx_t, x.shape(), p).unwrap();
                let got = gx
                    .to_dtype(kestrel::DType::F64)
                    .unwrap()
                    .to_vec::<f64>()
                    .unwrap();
                // The reference sums in f64 what the op sums in f32: compare the f32 case
                // after the same rounding per addition.
                let want = if dtype == kestrel::DType::F32 {
                    let g32: Vec<f32> = gv.iter().map(|&v| v as f32).collect();
                    let ohw = n / planes;
                    let mut gx = vec![0.0f32; planes * ihw];
                    for (o, (&i, &g)) in idx.iter().zip(&g32).enumerate() {
                        gx[o / ohw * ihw + i as usize] += g;
                    }
                    gx.into_iter().map(f64::from).collect()
                } else {
                    reference_backward(&gv, &idx, planes, ihw)
                };
                let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&got), bits(&want), "{dims:?} {p:?} {dtype:?} {which}");
            }
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
    // One bad index in the last plane, another before it in the first: the error
    // names the first in `indices` order (the planes run in parallel).
    let mut v = idx.to_vec_i64().unwrap();
    let last = v.len() - 1;
    v[last] = -3;
    v[2] = 25;
    let two_bad = Tensor::from_vec_i64(v, idx.dims().to_vec()).unwrap();
    let e = max_pool2d_backward(&y, &two_bad, x.shape(), p).unwrap_err();
    assert!(e.to_string().contains("index 25 outside"), "{e}");
}

/// Inputs on two devices are an error naming the op.
fn check_mixed_devices_on(dev: Device) {
    let cpu = Tensor::zeros([1, 2, 4, 4], kestrel::DType::F32, Device::Cpu).unwrap();
    let gpu = cpu.to_device(dev).unwrap();
    let (y, idx) = max_pool2d_with_indices(&gpu, 2, 2, 0).unwrap();
    let idx_cpu = idx.to_device(Device::Cpu).unwrap();
    assert_err(
        "pool backward",
        max_pool2d_backward(&y, &idx_cpu, gpu.shape(), Pool2d::new(2, 2, 0)),
        "max_pool2d_backward",
    );
}

crate::device_tests! {
    mixed_devices_are_an_error(emulated_errors, cuda) => check_mixed_devices_on;
}
