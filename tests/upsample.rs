//! upsample_nearest_add (kernels/upsample.cu), the FPN top-down step: parity with the
//! PyTorch fixture, PyTorch's nearest index rule, other sizes, f64 gradient checks and
//! error cases, on the CPU, the emulated device and CUDA.

mod common;

use common::*;
use kestrel::autograd::gradcheck;
use kestrel::ops::upsample::{nearest_source_index, upsample_nearest_add};
use kestrel::{Device, Tensor};

const FWD_TOL: f64 = 1e-5;
const GRAD_TOL: f64 = 1e-4;
const SEEDS: [u64; 3] = [1, 2, 3];

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

crate::device_tests! {
    upsample_nearest_add_matches_fixture => check_upsample_nearest_add_on;
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
        let (lateral, topt, gy) = (
            tensor_f32_on(&l64, dev),
            tensor_f32_on(&t64, dev),
            tensor_f32_on(&g64, dev),
        );
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

crate::device_tests! {
    upsample_nearest_add_other_sizes => check_upsample_shapes_on;
}

/// upsample_nearest_backward on the CPU (each top pixel gathering its output
/// pixels' gradients, with a vectorised path for exactly 2x along W) equals the plain
/// scatter-add over the output in row-major order bit for bit, in f32 and f64:
/// 2x with odd and even top sizes, 2x along W only, odd ratios, downsampling (top
/// pixels no output reads), identity, a 1-pixel top; signed zeros in the gradient;
/// a recycled dirty buffer.
#[test]
fn upsample_nearest_backward_equals_the_plain_scatter_bit_for_bit() {
    use kestrel::ops::upsample::upsample_nearest_backward;
    for (seed, (lat, top)) in [
        ([1, 3, 14, 10], [1, 3, 7, 5]),
        ([2, 2, 8, 12], [2, 2, 4, 6]),
        ([1, 2, 25, 38], [1, 2, 13, 19]),
        ([2, 3, 13, 19], [2, 3, 7, 10]),
        ([1, 2, 5, 6], [1, 2, 8, 9]),
        ([1, 2, 4, 5], [1, 2, 4, 5]),
        ([2, 1, 6, 3], [2, 1, 1, 1]),
        // A gradient of 67 KB (f32): from the host pool, recycled dirty (below).
        ([1, 4, 132, 128], [1, 4, 66, 64]),
    ]
    .into_iter()
    .enumerate()
    {
        let gv: Vec<f64> = randn(seed as u64 + 7, lat.iter().product())
            .into_iter()
            .enumerate()
            .map(|(i, v)| if i % 3 == 0 { -0.0 } else { v })
            .collect();
        let (hl, wl, ht, wt) = (lat[2], lat[3], top[2], top[3]);
        for dtype in [kestrel::DType::F32, kestrel::DType::F64] {
            let gy = f64_t(gv.clone(), &lat).to_dtype(dtype).unwrap();
            // A dropped tensor of the result's size, all NaN, goes back to the host
            // pool: a pooled-size result recycles it and must overwrite every element.
            let nan = vec![f64::NAN; top.iter().product()];
            drop(f64_t(nan, &top).to_dtype(dtype).unwrap());
            let got = upsample_nearest_backward(&gy, &top).unwrap();
            // The plain scatter, in the op's own precision.
            let want: Vec<u64> = if dtype == kestrel::DType::F32 {
                let g: Vec<f32> = gy.to_vec::<f32>().unwrap();
                let mut t = vec![0.0f32; top.iter().product()];
                for plane in 0..lat[0] * lat[1] {
                    for r in 0..hl {
                        for c in 0..wl {
                            let (sr, sc) = (
                                nearest_source_index(r, ht, hl),
                                nearest_source_index(c, wt, wl),
                            );
                            t[plane * ht * wt + sr * wt + sc] += g[plane * hl * wl + r * wl + c];
                        }
                    }
                }
                t.iter().map(|v| f64::from(*v).to_bits()).collect()
            } else {
                let mut t = vec![0.0f64; top.iter().product()];
                for plane in 0..lat[0] * lat[1] {
                    for r in 0..hl {
                        for c in 0..wl {
                            let (sr, sc) = (
                                nearest_source_index(r, ht, hl),
                                nearest_source_index(c, wt, wl),
                            );
                            t[plane * ht * wt + sr * wt + sc] += gv[plane * hl * wl + r * wl + c];
                        }
                    }
                }
                t.iter().map(|v| v.to_bits()).collect()
            };
            let got: Vec<u64> = got
                .to_dtype(kestrel::DType::F64)
                .unwrap()
                .to_vec::<f64>()
                .unwrap()
                .iter()
                .map(|v| v.to_bits())
                .collect();
            assert_eq!(got, want, "{lat:?} <- {top:?} {dtype:?}");
        }
    }
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

/// Inputs on two devices are an error naming the op.
fn check_mixed_devices_on(dev: Device) {
    let gpu = Tensor::zeros([1, 2, 4, 4], kestrel::DType::F32, dev).unwrap();
    let small = Tensor::zeros([1, 2, 2, 2], kestrel::DType::F32, Device::Cpu).unwrap();
    assert_err(
        "upsample",
        upsample_nearest_add(&gpu, &small),
        "upsample_nearest_add",
    );
}

crate::device_tests! {
    mixed_devices_are_an_error(emulated_errors, cuda) => check_mixed_devices_on;
}
