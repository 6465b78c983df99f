//! Tensor-core bf16 convolution and linear (kernels/tc_conv.cu, src/ops/tc.rs):
//! forward with fused epilogue, input gradient and weight gradient, on every conv
//! shape class of ResNet-18..101 + FPN and the edge shapes, against
//!
//! 1. the CPU bf16 reference (same bf16-rounded inputs, f32 accumulation). The only
//!    difference is the order of the f32 sums, so each element may differ by the
//!    classic bound for two orders of a K-term f32 sum: |got - ref| <= 2 K 2^-24 S,
//!    S = sum_k |a_k b_k| (computed on the CPU from |x| and |w|), plus one bf16 ulp of
//!    the value (2^-7 |ref|) when the output is rounded to bf16 (an accumulator
//!    difference can flip one rounding), plus f32 epilogue rounding (4 2^-24 of the
//!    epilogue's terms).
//! 2. the f32 PyTorch fixtures (tests/fixtures/ops/conv2d, linear). bf16 keeps 8
//!    significant bits, so rounding a and b to nearest changes each by a relative
//!    u = 2^-8 at most, and each product by (1 + u)^2 - 1 = 2^-7 + 2^-16; the f32
//!    sums add K 2^-24 each side:
//!    |got - y| <= (2^-7 + 2^-16 + 2 K 2^-24) S + 2^-20 |y|.
//!    K = Cin kh kw for y, Cout kh kw for gx, N OH OW for gw.
//!
//! The emulated runs are kept small (seconds per case): the emulator executes every
//! mma, ldmatrix and cp.async of the real kernels.
//!
//! `cargo test --test tensor_core`

mod common;

use kestrel::ops::conv2d::{
    conv2d_backward_input, conv2d_backward_weight, conv2d_forward, Conv2dParams,
};
use kestrel::ops::tc;
use kestrel::ops::Epilogue;
use kestrel::tensor::DType;
use kestrel::{Device, Tensor};

fn t32(seed: u64, shape: &[usize]) -> Tensor {
    common::rand_t(seed, shape).to_dtype(DType::F32).unwrap()
}

fn abs(t: &Tensor) -> Tensor {
    let v: Vec<f32> = t.to_vec::<f32>().unwrap().iter().map(|v| v.abs()).collect();
    Tensor::from_vec(v, t.dims().to_vec()).unwrap()
}

fn host(t: &Tensor) -> Vec<f64> {
    t.to_vec::<f64>().unwrap()
}

/// Every element within its own bound; the message names the worst one.
fn assert_within(what: &str, got: &[f64], want: &[f64], bound: &[f64]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let mut worst = (0.0f64, 0usize);
    for i in 0..got.len() {
        assert!(got[i].is_finite(), "{what}: element {i} is {}", got[i]);
        let r = (got[i] - want[i]).abs() / bound[i].max(1e-30);
        if r > worst.0 {
            worst = (r, i);
        }
    }
    let i = worst.1;
    assert!(
        worst.0 <= 1.0,
        "{what}: element {i} got {} want {} (|diff| {:.3e} > bound {:.3e})",
        got[i],
        want[i],
        (got[i] - want[i]).abs(),
        bound[i]
    );
}

/// One conv shape class.
#[derive(Clone, Copy, Debug)]
struct Case {
    name: &'static str,
    x: [usize; 4],
    cout: usize,
    k: (usize, usize),
    p: Conv2dParams,
}

const fn case(
    name: &'static str,
    x: [usize; 4],
    cout: usize,
    k: usize,
    stride: usize,
    pad: usize,
    dil: usize,
) -> Case {
    Case {
        name,
        x,
        cout,
        k: (k, k),
        p: Conv2dParams {
            stride: (stride, stride),
            padding: (pad, pad),
            dilation: (dil, dil),
        },
    }
}

/// The conv shape classes of ResNet-18..101 + FPN (+ RPN head), at small spatial
/// sizes, and the edge shapes.
const CASES: &[Case] = &[
    case("stem 7x7/2 Cin 3", [2, 3, 20, 18], 64, 7, 2, 3, 1),
    case("basic 3x3/1 64", [2, 64, 9, 8], 64, 3, 1, 1, 1),
    case("downsample 3x3/2 128", [1, 64, 9, 10], 128, 3, 2, 1, 1),
    case(
        "bottleneck 1x1 reduce 256->64",
        [2, 256, 5, 4],
        64,
        1,
        1,
        0,
        1,
    ),
    case(
        "bottleneck 1x1 expand 64->256",
        [1, 64, 6, 5],
        256,
        1,
        1,
        0,
        1,
    ),
    case("projection 1x1/2 256->512", [1, 256, 7, 6], 512, 1, 2, 0, 1),
    case("dilated 3x3 d2", [1, 32, 11, 9], 48, 3, 1, 2, 2),
    case("FPN lateral 1x1 512->64", [1, 512, 4, 5], 64, 1, 1, 0, 1),
    case("FPN output / RPN 3x3 64", [1, 64, 7, 7], 64, 3, 1, 1, 1),
    case("RPN cls 1x1 Cout 3", [2, 64, 5, 6], 3, 1, 1, 0, 1),
    case("odd channels 5->70, K=45", [2, 5, 7, 9], 70, 3, 1, 1, 1),
    case("Cout 1", [1, 24, 6, 6], 1, 3, 1, 1, 1),
    case("one output element", [1, 7, 3, 3], 1, 3, 1, 0, 1),
    case("1x1 map, 3x3 pad 1", [3, 40, 1, 1], 20, 3, 1, 1, 1),
    case("stride 2 even map, no pad", [1, 16, 8, 8], 16, 2, 2, 0, 1),
    case("batch 0", [0, 16, 5, 5], 8, 3, 1, 1, 1),
];

fn w_of(c: &Case, seed: u64) -> Tensor {
    t32(seed, &[c.cout, c.x[1], c.k.0, c.k.1])
}

/// Forward with a fused epilogue vs the CPU bf16 reference.
fn check_forward_on(dev: Device, c: &Case, out: DType, with_epilogue: bool) {
    let x = t32(1, &c.x);
    let w = w_of(c, 2);
    let want0 = tc::conv2d_bf16_reference(&x, &w, &c.p, &Epilogue::default()).unwrap();
    let y_dims = want0.dims().to_vec();
    let cout = c.cout;
    let scale = t32(3, &[cout]);
    let shift = t32(4, &[cout]);
    let res = t32(5, &y_dims);
    // bf16 inputs for the bf16-output case: the kernel takes either.
    let (xd, wd) = if out == DType::BF16 {
        (
            x.to_dtype(DType::BF16).unwrap().to_device(dev).unwrap(),
            w.to_device(dev).unwrap(),
        )
    } else {
        (x.to_device(dev).unwrap(), w.to_device(dev).unwrap())
    };
    let (sd, hd, rd) = (
        scale.to_device(dev).unwrap(),
        shift.to_device(dev).unwrap(),
        res.to_device(dev).unwrap(),
    );
    let ep = |s, h, r| Epilogue {
        scale: with_epilogue.then_some(s),
        shift: with_epilogue.then_some(h),
        residual: with_epilogue.then_some(r),
        relu: with_epilogue,
        out_dtype: Some(out),
    };
    let got = tc::conv2d_tc(&xd, &wd, &c.p, &ep(&sd, &hd, &rd)).unwrap();
    assert_eq!(got.dtype(), out, "{}: output dtype", c.name);
    assert_eq!(got.dims(), &y_dims[..], "{}: shape", c.name);
    let want = tc::conv2d_bf16_reference(&x, &w, &c.p, &ep(&scale, &shift, &res)).unwrap();
    let kk = (c.x[1] * c.k.0 * c.k.1) as f64;
    let s = host(
        &conv2d_forward(
            &abs(&tc::round_to_bf16(&x).unwrap()),
            &abs(&tc::round_to_bf16(&w).unwrap()),
            None,
            &c.p,
        )
        .unwrap(),
    );
    let (sc, rs) = (host(&scale), host(&res));
    let ohw = y_dims[2] * y_dims[3];
    let want_v = host(&want);
    let bound: Vec<f64> = (0..want_v.len())
        .map(|i| {
            let ch = (i / ohw) % cout;
            let m = if with_epilogue { sc[ch].abs() } else { 1.0 };
            let mut b = 2.0 * kk * 2f64.powi(-24) * s[i] * m;
            b += 4.0 * 2f64.powi(-24) * (s[i] * m + 1.0 + rs[i].abs());
            if out == DType::BF16 {
                b += 2f64.powi(-7) * want_v[i].abs();
            }
            b + 1e-30
        })
        .collect();
    assert_within(
        &format!("{} forward ({out}, epilogue {with_epilogue})", c.name),
        &host(&got),
        &want_v,
        &bound,
    );
}

fn check_backward_on(dev: Device, c: &Case) {
    let x = t32(11, &c.x);
    let w = w_of(c, 12);
    let y_dims = conv2d_forward(&x, &w, None, &c.p).unwrap().dims().to_vec();
    let gy = t32(13, &y_dims);
    let (xd, wd, gyd) = (
        x.to_device(dev).unwrap(),
        w.to_device(dev).unwrap(),
        gy.to_dtype(DType::BF16).unwrap().to_device(dev).unwrap(),
    );
    let (xr, wr, gyr) = (
        abs(&tc::round_to_bf16(&x).unwrap()),
        abs(&tc::round_to_bf16(&w).unwrap()),
        abs(&tc::round_to_bf16(&gy).unwrap()),
    );
    // Input gradient: K = Cout kh kw.
    let gx = tc::conv2d_tc_backward_input(&gyd, &wd, &c.x, &c.p).unwrap();
    let want = tc::conv2d_bf16_reference_backward_input(&gy, &w, &c.x, &c.p).unwrap();
    let s = host(&conv2d_backward_input(&gyr, &wr, &c.x, &c.p).unwrap());
    let kk = (c.cout * c.k.0 * c.k.1) as f64;
    let bound: Vec<f64> = s
        .iter()
        .map(|s| 2.0 * kk * 2f64.powi(-24) * s + 1e-30)
        .collect();
    assert_within(
        &format!("{} input gradient", c.name),
        &host(&gx),
        &host(&want),
        &bound,
    );
    // Weight gradient: K = N OH OW.
    let gw = tc::conv2d_tc_backward_weight(&xd, &gyd, w.dims(), &c.p).unwrap();
    let want = tc::conv2d_bf16_reference_backward_weight(&x, &gy, w.dims(), &c.p).unwrap();
    let s = host(&conv2d_backward_weight(&xr, &gyr, w.dims(), &c.p).unwrap());
    let kk = (y_dims[0] * y_dims[2] * y_dims[3]) as f64;
    let bound: Vec<f64> = s
        .iter()
        .map(|s| 2.0 * kk * 2f64.powi(-24) * s + 1e-30)
        .collect();
    assert_within(
        &format!("{} weight gradient", c.name),
        &host(&gw),
        &host(&want),
        &bound,
    );
}

#[test]
fn conv_forward_every_shape_class_emulated() {
    let dev = common::emulated();
    for (i, c) in CASES.iter().enumerate() {
        // Alternate f32 and bf16 outputs, epilogue on and off, over the classes.
        check_forward_on(dev, c, DType::F32, i % 2 == 0);
        check_forward_on(dev, c, DType::BF16, i % 2 == 1);
    }
}

#[test]
fn conv_backward_every_shape_class_emulated() {
    let dev = common::emulated();
    for c in CASES {
        check_backward_on(dev, c);
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn conv_forward_every_shape_class_cuda() {
    let dev = common::cuda();
    for (i, c) in CASES.iter().enumerate() {
        check_forward_on(dev, c, DType::F32, i % 2 == 0);
        check_forward_on(dev, c, DType::BF16, i % 2 == 1);
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn conv_backward_every_shape_class_cuda() {
    let dev = common::cuda();
    for c in CASES {
        check_backward_on(dev, c);
    }
}

#[test]
fn cpu_reference_rounds_inputs_and_outputs_to_bf16() {
    let w = Tensor::from_vec(vec![3.0f32], [1, 1, 1, 1]).unwrap();
    let p = Conv2dParams::default();
    // Input rounding: bf16 has 7 fraction bits, so 1 + 2^-8 is a tie between 1 and
    // 1 + 2^-7; even is 1, and 1 * 3 = 3.
    let x = Tensor::from_vec(vec![1.0f32 + 2f32.powi(-8)], [1, 1, 1, 1]).unwrap();
    let y = tc::conv2d_bf16_reference(&x, &w, &p, &Epilogue::default()).unwrap();
    assert_eq!(y.to_vec::<f32>().unwrap(), vec![3.0]);
    // Output rounding: (1 + 2^-7) * 3 = 3 + 3 * 2^-7 is exact in f32; bf16 spacing in
    // [2, 4) is 2^-6, so it is a tie between 3 + 2^-6 (odd) and 3 + 2^-5 (even).
    let x = Tensor::from_vec(vec![1.0f32 + 2f32.powi(-7)], [1, 1, 1, 1]).unwrap();
    let ep = Epilogue {
        out_dtype: Some(DType::BF16),
        ..Default::default()
    };
    let y = tc::conv2d_bf16_reference(&x, &w, &p, &ep).unwrap();
    assert_eq!(y.dtype(), DType::BF16);
    assert_eq!(y.to_vec::<f32>().unwrap(), vec![3.03125]);
}

// ---------------------------------------------------------------------------------
// Against the f32 fixtures
// ---------------------------------------------------------------------------------

fn fixture_bound(s: &[f64], y: &[f64], k: f64) -> Vec<f64> {
    s.iter()
        .zip(y)
        .map(|(s, y)| {
            (2f64.powi(-7) + 2f64.powi(-16) + 2.0 * k * 2f64.powi(-24)) * s
                + 2f64.powi(-20) * y.abs()
                + 1e-30
        })
        .collect()
}

fn check_conv_fixtures_on(dev: Device) {
    let f = common::fixture("ops/conv2d.safetensors");
    let params = f.params().unwrap();
    for case in common::cases(&f) {
        let p = &params[&case];
        let get = |n: &str| f.tensor(&format!("{case}.{n}")).unwrap();
        let pair = |k: &str| -> (usize, usize) {
            let v = &p[k];
            match v.as_array() {
                Some(a) => (
                    a[0].as_u64().unwrap() as usize,
                    a[1].as_u64().unwrap() as usize,
                ),
                None => (v.as_u64().unwrap() as usize, v.as_u64().unwrap() as usize),
            }
        };
        let cp = Conv2dParams {
            stride: pair("stride"),
            padding: pair("padding"),
            dilation: pair("dilation"),
        };
        let (x, w, gy) = (get("x"), get("w"), get("gy"));
        let b = p["bias"].as_bool().unwrap_or(false).then(|| get("b"));
        let bd = b.as_ref().map(|b| b.to_device(dev).unwrap());
        let ep = Epilogue {
            shift: bd.as_ref(),
            out_dtype: Some(DType::F32),
            ..Default::default()
        };
        let (xd, wd, gyd) = (
            x.to_device(dev).unwrap(),
            w.to_device(dev).unwrap(),
            gy.to_device(dev).unwrap(),
        );
        let y = tc::conv2d_tc(&xd, &wd, &cp, &ep).unwrap();
        let (ax, aw, agy) = (abs(&x), abs(&w), abs(&gy));
        let wdims = w.dims().to_vec();
        let k = (wdims[1] * wdims[2] * wdims[3]) as f64;
        let s = host(&conv2d_forward(&ax, &aw, None, &cp).unwrap());
        let yw = host(&get("y"));
        assert_within(
            &format!("fixture {case} y"),
            &host(&y),
            &yw,
            &fixture_bound(&s, &yw, k),
        );

        let gx = tc::conv2d_tc_backward_input(&gyd, &wd, x.dims(), &cp).unwrap();
        let s = host(&conv2d_backward_input(&agy, &aw, x.dims(), &cp).unwrap());
        let k = (wdims[0] * wdims[2] * wdims[3]) as f64;
        let gxw = host(&get("gx"));
        assert_within(
            &format!("fixture {case} gx"),
            &host(&gx),
            &gxw,
            &fixture_bound(&s, &gxw, k),
        );

        let gw = tc::conv2d_tc_backward_weight(&xd, &gyd, &wdims, &cp).unwrap();
        let s = host(&conv2d_backward_weight(&ax, &agy, &wdims, &cp).unwrap());
        let gd = gy.dims();
        let k = (gd[0] * gd[2] * gd[3]) as f64;
        let gww = host(&get("gw"));
        assert_within(
            &format!("fixture {case} gw"),
            &host(&gw),
            &gww,
            &fixture_bound(&s, &gww, k),
        );
    }
}

fn check_linear_fixtures_on(dev: Device) {
    let f = common::fixture("ops/linear.safetensors");
    for case in common::cases(&f) {
        let get = |n: &str| f.tensor(&format!("{case}.{n}")).unwrap();
        let (x, w, b, gy) = (get("x"), get("w"), get("b"), get("gy"));
        let (xd, wd, bd, gyd) = (
            x.to_device(dev).unwrap(),
            w.to_device(dev).unwrap(),
            b.to_device(dev).unwrap(),
            gy.to_device(dev).unwrap(),
        );
        let ep = Epilogue {
            shift: Some(&bd),
            out_dtype: Some(DType::F32),
            ..Default::default()
        };
        let (m, kin) = (x.dims()[0], x.dims()[1]);
        let nout = w.dims()[0];
        let (ax, aw, agy) = (host(&abs(&x)), host(&abs(&w)), host(&abs(&gy)));
        // S by plain loops: S_y[i,j] = sum_k |x_ik||w_jk|, and so on.
        let mut sy = vec![0.0; m * nout];
        let mut sx = vec![0.0; m * kin];
        let mut sw = vec![0.0; nout * kin];
        for i in 0..m {
            for j in 0..nout {
                for k in 0..kin {
                    sy[i * nout + j] += ax[i * kin + k] * aw[j * kin + k];
                    sx[i * kin + k] += agy[i * nout + j] * aw[j * kin + k];
                    sw[j * kin + k] += agy[i * nout + j] * ax[i * kin + k];
                }
            }
        }
        let y = tc::linear_tc(&xd, &wd, &ep).unwrap();
        let yw = host(&get("y"));
        assert_within(
            &format!("linear {case} y"),
            &host(&y),
            &yw,
            &fixture_bound(&sy, &yw, kin as f64),
        );
        let gx = tc::linear_tc_backward_input(&gyd, &wd).unwrap();
        let gxw = host(&get("gx"));
        assert_within(
            &format!("linear {case} gx"),
            &host(&gx),
            &gxw,
            &fixture_bound(&sx, &gxw, nout as f64),
        );
        let gw = tc::linear_tc_backward_weight(&xd, &gyd).unwrap();
        let gww = host(&get("gw"));
        assert_within(
            &format!("linear {case} gw"),
            &host(&gw),
            &gww,
            &fixture_bound(&sw, &gww, m as f64),
        );
    }
}

#[test]
fn conv_matches_f32_fixtures_within_bf16_bound_emulated() {
    check_conv_fixtures_on(common::emulated());
}

#[test]
fn conv_cpu_reference_matches_f32_fixtures_within_bf16_bound() {
    check_conv_fixtures_on(Device::Cpu);
}

#[test]
fn linear_matches_f32_fixtures_within_bf16_bound_emulated() {
    check_linear_fixtures_on(common::emulated());
}

#[test]
fn linear_cpu_reference_matches_f32_fixtures_within_bf16_bound() {
    check_linear_fixtures_on(Device::Cpu);
}

#[test]
#[ignore = "needs a CUDA device"]
fn conv_and_linear_match_f32_fixtures_cuda() {
    check_conv_fixtures_on(common::cuda());
    check_linear_fixtures_on(common::cuda());
}

// ---------------------------------------------------------------------------------
// Linear (box head fc6/fc7, predictor) vs the CPU bf16 reference
// ---------------------------------------------------------------------------------

fn check_linear_on(dev: Device, m: usize, k: usize, n: usize) {
    let (x, w) = (t32(21, &[m, k]), t32(22, &[n, k]));
    let shift = t32(23, &[n]);
    let (xd, wd, sd) = (
        x.to_device(dev).unwrap(),
        w.to_device(dev).unwrap(),
        shift.to_device(dev).unwrap(),
    );
    let ep = Epilogue {
        shift: Some(&sd),
        relu: true,
        out_dtype: Some(DType::BF16),
        ..Default::default()
    };
    let got = tc::linear_tc(&xd, &wd, &ep).unwrap();
    let ep_cpu = Epilogue {
        shift: Some(&shift),
        ..ep
    };
    let want = tc::linear_tc(&x, &w, &ep_cpu).unwrap();
    let (ax, aw) = (
        abs(&tc::round_to_bf16(&x).unwrap()),
        abs(&tc::round_to_bf16(&w).unwrap()),
    );
    let s = host(&kestrel::ops::linear::linear(&ax, &aw, None).unwrap());
    let wv = host(&want);
    let bound: Vec<f64> = s
        .iter()
        .zip(&wv)
        .map(|(s, y)| {
            2.0 * k as f64 * 2f64.powi(-24) * s
                + 4.0 * 2f64.powi(-24) * (s + 1.0)
                + 2f64.powi(-7) * y.abs()
                + 1e-30
        })
        .collect();
    assert_within(&format!("linear {m}x{k}x{n}"), &host(&got), &wv, &bound);
}

#[test]
fn linear_box_head_shapes_emulated() {
    let dev = common::emulated();
    // fc6-like (K = 256 * 2 * 2 here, 256 * 7 * 7 on a real model), fc7, predictor
    // (cls 91, box 364 outputs: not tile multiples).
    check_linear_on(dev, 12, 1024, 128);
    check_linear_on(dev, 12, 128, 128);
    check_linear_on(dev, 12, 128, 91);
    check_linear_on(dev, 5, 33, 364);
}

// ---------------------------------------------------------------------------------
// Planted bugs: the emulator must catch each
// ---------------------------------------------------------------------------------

fn planted(bug: i32) -> (Result<Tensor, kestrel::Error>, Tensor) {
    let dev = common::emulated();
    let c = case("planted", [1, 64, 8, 8], 64, 3, 1, 1, 1);
    let (x, w) = (t32(31, &c.x), w_of(&c, 32));
    let want = tc::conv2d_bf16_reference(&x, &w, &c.p, &Epilogue::default()).unwrap();
    let got = tc::conv2d_tc_planted_bug(
        &x.to_device(dev).unwrap(),
        &w.to_device(dev).unwrap(),
        &c.p,
        bug,
    );
    (got, want)
}

#[test]
fn planted_missing_wait_group_fails() {
    let e = planted(1).0.unwrap_err().to_string();
    assert!(e.contains("wait_group"), "{e}");
}

#[test]
fn planted_missing_barrier_between_stages_fails() {
    let e = planted(2).0.unwrap_err().to_string();
    assert!(e.contains("barrier"), "{e}");
}

#[test]
fn planted_transposed_b_fragment_gives_wrong_results() {
    let (got, want) = planted(3);
    let got = got.expect("a wrong fragment is not an error the emulator can see");
    let e = common::rel_err(&host(&got), &host(&want));
    assert!(
        e > 0.1,
        "relative error {e}: the transposed fragment went unnoticed"
    );
}

// ---------------------------------------------------------------------------------
// Device memory: no im2col buffer
// ---------------------------------------------------------------------------------

mod counting {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use kestrel::device::gpu::{GpuBackend, GpuBuffer, KernelArg, LaunchCfg};
    use kestrel::Result;

    /// Wraps a backend and counts the bytes it allocates.
    pub struct Counting {
        pub inner: Arc<dyn GpuBackend>,
        pub bytes: AtomicUsize,
        pub largest: AtomicUsize,
    }

    impl GpuBackend for Counting {
        fn name(&self) -> String {
            format!("counting {}", self.inner.name())
        }
        fn alloc(&self, bytes: usize) -> Result<GpuBuffer> {
            self.bytes.fetch_add(bytes, Ordering::Relaxed);
            self.largest.fetch_max(bytes, Ordering::Relaxed);
            self.inner.alloc(bytes)
        }
        fn copy_htod(&self, src: &[u8], dst: &GpuBuffer) -> Result<()> {
            self.inner.copy_htod(src, dst)
        }
        fn copy_dtoh(&self, src: &GpuBuffer, dst: &mut [u8]) -> Result<()> {
            self.inner.copy_dtoh(src, dst)
        }
        fn copy_dtod(&self, src: &GpuBuffer, dst: &GpuBuffer, bytes: usize) -> Result<()> {
            self.inner.copy_dtod(src, dst, bytes)
        }
        fn memset(&self, dst: &GpuBuffer, value: u8) -> Result<()> {
            self.inner.memset(dst, value)
        }
        fn poison(&self, buf: &GpuBuffer) -> Result<()> {
            self.inner.poison(buf)
        }
        fn launch(&self, kernel: &str, cfg: &LaunchCfg, args: &[KernelArg]) -> Result<()> {
            self.inner.launch(kernel, cfg, args)
        }
        fn synchronize(&self) -> Result<()> {
            self.inner.synchronize()
        }
    }
}

#[test]
fn conv_forward_allocates_no_im2col_buffer() {
    use std::sync::atomic::Ordering;
    use std::sync::Arc;
    let Device::Cuda(emu) = common::emulated() else {
        unreachable!()
    };
    let inner = kestrel::device::gpu::device(emu).unwrap().backend;
    let counting = Arc::new(counting::Counting {
        inner,
        bytes: Default::default(),
        largest: Default::default(),
    });
    // An ordinal of its own, so no other test sees the wrapper.
    const ORD: usize = 901;
    // The device's own allocator sits on top of the wrapper: its counters say how
    // many blocks the call takes, its statistics how many bytes (size classes round
    // a request up by at most a quarter).
    let gdev = kestrel::device::gpu::register_backend(ORD, counting.clone());
    let dev = Device::Cuda(ORD);
    let (n, cin, h, w, cout) = (2, 64, 16, 16, 64);
    let x = t32(41, &[n, cin, h, w]).to_device(dev).unwrap();
    let wt = t32(42, &[cout, cin, 3, 3]).to_device(dev).unwrap();
    let packed = tc::TcConvWeight::new(&wt).unwrap();
    gdev.reset_peak_memory();
    let before = gdev.memory().allocated as usize;
    let c = gdev.counters();
    let p = Conv2dParams::new(1, 1, 1);
    let ep = Epilogue {
        out_dtype: Some(DType::BF16),
        ..Default::default()
    };
    let y = tc::conv2d_tc_packed(&x, &packed, &p, &ep).unwrap();
    let d = c.delta();
    let peak = gdev.memory().peak_allocated as usize - before;
    // What the call needs: the bf16 NHWC copy of x and the bf16 output.
    let needed = n * h * w * cin * 2 + y.numel() * 2;
    // What an im2col matrix of the batch would take in bf16: K x (N OH OW).
    let im2col = cin * 9 * n * h * w * 2;
    assert_eq!(
        d.driver_allocs + d.cached_allocs,
        2,
        "blocks taken by one conv (the NHWC copy and the output): {d:?}"
    );
    assert!(
        peak >= needed && peak <= needed + needed / 4 + 2 * 512,
        "peak {peak} bytes for {needed} needed"
    );
    assert!(peak * 4 < im2col, "{peak} vs im2col {im2col}");
    let _ = counting.bytes.load(Ordering::Relaxed);
}

// ---------------------------------------------------------------------------------
// DType::BF16 tensors
// ---------------------------------------------------------------------------------

#[test]
fn bf16_tensors_convert_on_cpu_and_device_and_move_between_them() {
    let vals: Vec<f32> = vec![
        1.0,
        f32::from_bits(0x3f28_8004), // just above a tie: rounds up (half's from_f64 did not)
        f32::from_bits(0x3f80_8000), // a tie: to even (down)
        -3.0e38,
        1e-40,
        0.1,
    ];
    let want: Vec<u16> = vals
        .iter()
        .map(|&v| half::bf16::from_f32(v).to_bits())
        .collect();
    let t = Tensor::from_vec(vals.clone(), [2, 3]).unwrap();
    let b = t.to_dtype(DType::BF16).unwrap();
    assert_eq!(b.dtype(), DType::BF16);
    let bits = |t: &Tensor| -> Vec<u16> {
        t.to_vec_bf16()
            .unwrap()
            .iter()
            .map(|v| v.to_bits())
            .collect()
    };
    assert_eq!(bits(&b), want, "CPU f32 -> bf16");
    let dev = common::emulated();
    // Host bf16 -> device -> host keeps the bits.
    let on_dev = b.to_device(dev).unwrap();
    assert_eq!(on_dev.dtype(), DType::BF16);
    assert_eq!(bits(&on_dev.to_device(Device::Cpu).unwrap()), want);
    // f32 on the device -> bf16 by the cast kernel.
    let cast = t.to_device(dev).unwrap().to_dtype(DType::BF16).unwrap();
    assert_eq!(bits(&cast), want, "device f32 -> bf16");
    // And back: bf16 widens exactly.
    let back = cast.to_dtype(DType::F32).unwrap().to_vec::<f32>().unwrap();
    let exact: Vec<f32> = want
        .iter()
        .map(|&b| half::bf16::from_bits(b).to_f32())
        .collect();
    assert_eq!(back, exact, "device bf16 -> f32");
    // relu takes bf16 by the reference rule (widen, f32 op, round back): the
    // bf16 values clamped at zero, still bf16.
    let r = kestrel::ops::relu(&b).unwrap();
    assert_eq!(r.dtype(), DType::BF16);
    let clamped: Vec<f32> = exact
        .iter()
        .map(|&v| if v > 0.0 { v } else { 0.0 })
        .collect();
    assert_eq!(
        r.to_dtype(DType::F32).unwrap().to_vec::<f32>().unwrap(),
        clamped
    );
    // A bf16 tensor mixed with an f32 one is refused, naming the op.
    let e = kestrel::ops::add(&b, &t).unwrap_err().to_string();
    assert!(e.contains("add") && e.contains("bf16"), "{e}");
}
