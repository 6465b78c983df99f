//! conv2d (kernels/conv.cu: im2col/col2im; the GEMM in matmul.cu): parity with
//! PyTorch (fixture ops/conv2d), a direct-loop f64 reference for the chunked code
//! paths, f64 gradient checks, and error cases, on the CPU, the emulated device and CUDA.

mod common;

use common::*;
use kestrel::autograd::{gradcheck, Tape};
use kestrel::ops::conv2d::{
    conv2d, conv2d_backward, conv2d_backward_bias, conv2d_backward_input, conv2d_backward_weight,
    conv2d_forward, Conv2dParams,
};
use kestrel::{DType, Device, Error, Tensor};

const FWD_TOL: f64 = 1e-5;
const GRAD_TOL: f64 = 1e-4;

fn param_usize(p: &serde_json::Value, key: &str) -> usize {
    p[key]
        .as_u64()
        .unwrap_or_else(|| panic!("params.{key} missing in {p}")) as usize
}

/// The fixture settings of one conv2d case: (params, bias?).
fn conv_case_params(p: &serde_json::Value) -> (Conv2dParams, bool) {
    let (s, pad, d) = (
        param_usize(p, "stride"),
        param_usize(p, "padding"),
        param_usize(p, "dilation"),
    );
    let bias = p["bias"].as_bool().expect("params.bias");
    (Conv2dParams::new(s, pad, d), bias)
}

/// Every conv2d fixture case on `dev`: y, gx, gw and gb through the tape.
fn check_conv2d_on(dev: Device) {
    let f = fixture("ops/conv2d.safetensors");
    let params = f.params().unwrap();
    let names = cases(&f);
    assert!(!names.is_empty(), "conv2d fixture has no cases");
    for case in names {
        let (p, bias) = conv_case_params(&params[&case]);
        let get = |n: &str| f.tensor(&format!("{case}.{n}")).unwrap();
        let on = |n: &str| get(n).to_device(dev).unwrap();
        let (x, w, b, gy) = (on("x"), on("w"), on("b"), on("gy"));
        let b = bias.then_some(&b);

        let tape = Tape::new();
        tape.watch(&x);
        tape.watch(&w);
        if let Some(b) = b {
            tape.watch(b);
        }
        let y = {
            let _g = tape.activate();
            conv2d(&x, &w, b, &p).unwrap()
        };
        assert_eq!(y.device(), dev, "{case}: output device");
        assert_close(&format!("conv2d {case} y ({p:?})"), &y, &get("y"), FWD_TOL);
        let grads = tape.backward_with(&y, gy).unwrap();
        assert_close(
            &format!("conv2d {case} gx"),
            grads.expect(&x).unwrap(),
            &get("gx"),
            GRAD_TOL,
        );
        assert_close(
            &format!("conv2d {case} gw"),
            grads.expect(&w).unwrap(),
            &get("gw"),
            GRAD_TOL,
        );
        if let Some(b) = b {
            assert_close(
                &format!("conv2d {case} gb"),
                grads.expect(b).unwrap(),
                &get("gb"),
                GRAD_TOL,
            );
        }
    }
}

crate::device_tests! {
    conv2d_matches_torch => check_conv2d_on;
}

// ---------------------------------------------------------------------------------
// A direct-loop reference (f64), for shapes large enough to cut the work into chunks,
// channel groups and split reductions.
// ---------------------------------------------------------------------------------

struct Direct {
    y: Vec<f64>,
    gx: Vec<f64>,
    gw: Vec<f64>,
    gb: Vec<f64>,
}

/// Convolution and its gradients by the definition, in f64.
fn direct_conv(x: &Tensor, w: &Tensor, gy: &Tensor, p: &Conv2dParams) -> Direct {
    let (xs, ws, gys) = (
        x.to_vec::<f64>().unwrap(),
        w.to_vec::<f64>().unwrap(),
        gy.to_vec::<f64>().unwrap(),
    );
    let [n, ci, h, wd]: [usize; 4] = x.dims().try_into().unwrap();
    let [co, _, kh, kw]: [usize; 4] = w.dims().try_into().unwrap();
    let [_, _, oh, ow]: [usize; 4] = gy.dims().try_into().unwrap();
    let mut d = Direct {
        y: vec![0.0; n * co * oh * ow],
        gx: vec![0.0; xs.len()],
        gw: vec![0.0; ws.len()],
        gb: vec![0.0; co],
    };
    for b in 0..n {
        for o in 0..co {
            for y in 0..oh {
                for xo in 0..ow {
                    let yi = ((b * co + o) * oh + y) * ow + xo;
                    d.gb[o] += gys[yi];
                    for c in 0..ci {
                        for i in 0..kh {
                            for j in 0..kw {
                                let ih = (y * p.stride.0 + i * p.dilation.0) as isize
                                    - p.padding.0 as isize;
                                let iw = (xo * p.stride.1 + j * p.dilation.1) as isize
                                    - p.padding.1 as isize;
                                if ih < 0 || iw < 0 || ih >= h as isize || iw >= wd as isize {
                                    continue;
                                }
                                let xi = ((b * ci + c) * h + ih as usize) * wd + iw as usize;
                                let wi = ((o * ci + c) * kh + i) * kw + j;
                                d.y[yi] += xs[xi] * ws[wi];
                                d.gx[xi] += gys[yi] * ws[wi];
                                d.gw[wi] += gys[yi] * xs[xi];
                            }
                        }
                    }
                }
            }
        }
    }
    d
}

/// conv2d (f32 on `dev`) and its backward pieces against [`direct_conv`].
fn compare_with_direct(
    dev: Device,
    x_dims: &[usize],
    w_dims: &[usize],
    p: Conv2dParams,
    seed: u64,
) {
    let what = format!("x {x_dims:?} w {w_dims:?} {p:?}");
    let x64 = rand_t(seed, x_dims);
    let w64 = rand_t(seed + 1, w_dims);
    let b64 = rand_t(seed + 2, &w_dims[..1]);
    let on = |t: &Tensor| t.to_dtype(DType::F32).unwrap().to_device(dev).unwrap();
    let (x, w, b) = (on(&x64), on(&w64), on(&b64));
    let y = conv2d_forward(&x, &w, Some(&b), &p).unwrap();
    let gy64 = rand_t(seed + 3, y.dims());
    let gy = on(&gy64);
    let mut d = direct_conv(&x64, &w64, &gy64, &p);
    let plane = y.dims()[2] * y.dims()[3];
    let bs = b64.to_vec::<f64>().unwrap();
    for (i, v) in d.y.iter_mut().enumerate() {
        *v += bs[(i / plane) % bs.len()];
    }
    assert_tensor_close(&format!("y, {what}"), &y, &d.y, FWD_TOL);
    let g = conv2d_backward(&x, &w, &gy, &p, [true, true, true]).unwrap();
    assert_tensor_close(
        &format!("gx, {what}"),
        g.gx.as_ref().unwrap(),
        &d.gx,
        GRAD_TOL,
    );
    assert_tensor_close(
        &format!("gw, {what}"),
        g.gw.as_ref().unwrap(),
        &d.gw,
        GRAD_TOL,
    );
    assert_tensor_close(
        &format!("gb, {what}"),
        g.gb.as_ref().unwrap(),
        &d.gb,
        GRAD_TOL,
    );
}

/// Moderate shapes that still take the interesting paths: several column chunks per
/// image, 1x1 fast path, split reductions on CUDA (reduction length over 1024).
fn check_conv2d_vs_direct_on(dev: Device) {
    let p = |s: (usize, usize), pad: (usize, usize), d: (usize, usize)| Conv2dParams {
        stride: s,
        padding: pad,
        dilation: d,
    };
    compare_with_direct(
        dev,
        &[2, 4, 32, 40],
        &[8, 4, 3, 3],
        p((1, 1), (1, 1), (1, 1)),
        10,
    );
    compare_with_direct(
        dev,
        &[1, 6, 33, 40],
        &[5, 6, 1, 1],
        p((1, 1), (0, 0), (1, 1)),
        20,
    );
    compare_with_direct(
        dev,
        &[2, 3, 21, 18],
        &[4, 3, 3, 2],
        p((2, 1), (1, 2), (2, 1)),
        30,
    );
    compare_with_direct(
        dev,
        &[1, 3, 19, 23],
        &[70, 3, 7, 7],
        p((2, 2), (3, 3), (1, 1)),
        40,
    );
    compare_with_direct(
        dev,
        &[1, 2, 13, 31],
        &[3, 2, 3, 3],
        p((1, 3), (2, 1), (1, 2)),
        70,
    );
    // dL/dx on the CPU: stride 1 runs as a convolution of dL/dy with the flipped
    // kernel (asymmetric kernel, dilation and padding here), a strided 1x1 as a
    // scatter of the 1x1 product (odd sizes, unequal strides), and a padding beyond
    // the kernel's reach falls back to col2im.
    compare_with_direct(
        dev,
        &[2, 3, 15, 17],
        &[5, 3, 3, 2],
        p((1, 1), (2, 1), (2, 1)),
        80,
    );
    compare_with_direct(
        dev,
        &[2, 5, 17, 23],
        &[6, 5, 1, 1],
        p((2, 3), (0, 0), (1, 1)),
        90,
    );
    compare_with_direct(
        dev,
        &[1, 3, 9, 10],
        &[4, 3, 1, 1],
        p((1, 1), (1, 2), (1, 1)),
        100,
    );
}

crate::device_tests! {
    conv2d_matches_direct_reference => check_conv2d_vs_direct_on;
}

/// dL/dx of strided convolutions on the CPU (col2im of `Wᵀ @ dL/dy`; an unpadded
/// strided 1x1 takes the scatter path): kernels smaller than, equal to and larger
/// than the stride (input positions no tap reaches), paddings up to the kernel's
/// size, unequal axes, odd sizes.
#[test]
fn strided_conv2d_input_gradient_matches_direct_reference() {
    let mut seed = 500;
    for (s, k) in [
        ((2, 2), (3, 3)),
        ((2, 3), (1, 2)),
        ((3, 2), (5, 4)),
        ((2, 2), (2, 2)),
        ((3, 3), (1, 1)),
        ((2, 2), (7, 7)),
    ] {
        for pad in [(0, 0), (1, 0), (0, 1), (1, 1), (2, 3), (k.0, k.1)] {
            for (h, w) in [(11, 9), (12, 14)] {
                seed += 1;
                compare_with_direct(
                    Device::Cpu,
                    &[2, 3, h, w],
                    &[4, 3, k.0, k.1],
                    Conv2dParams {
                        stride: s,
                        padding: pad,
                        dilation: (1, 1),
                    },
                    seed,
                );
            }
        }
    }
}

/// Shapes whose im2col slices exceed one CPU task's budget: several column chunks in
/// the input-gradient loop and in the forward of a wide layer.
#[test]
fn conv2d_cpu_large_shapes_match_direct_reference() {
    compare_with_direct(
        Device::Cpu,
        &[1, 64, 48, 40],
        &[4, 64, 3, 3],
        Conv2dParams::new(1, 1, 1),
        50,
    );
    compare_with_direct(
        Device::Cpu,
        &[3, 128, 9, 11],
        &[16, 128, 3, 3],
        Conv2dParams::new(1, 2, 2),
        60,
    );
    // A strided 1x1 (a ResNet downsample) over several column chunks.
    compare_with_direct(
        Device::Cpu,
        &[2, 96, 60, 70],
        &[40, 96, 1, 1],
        Conv2dParams::new(2, 0, 1),
        61,
    );
    // dL/dx of a strided 3x3 (odd sizes), over several tasks.
    compare_with_direct(
        Device::Cpu,
        &[2, 16, 41, 37],
        &[12, 16, 3, 3],
        Conv2dParams::new(2, 1, 1),
        62,
    );
    // 3x3 stride 1 over enough 2x2 tiles that the CPU takes Winograd's F(2x2, 3x3)
    // (forward, and dL/dx as a 3x3 convolution of dL/dy): odd output width, and
    // padding 0, 1 and 2 (unequal per axis).
    for (i, pad) in [(1, 1), (0, 2), (2, 1)].into_iter().enumerate() {
        compare_with_direct(
            Device::Cpu,
            &[2, 24, 40, 37],
            &[20, 24, 3, 3],
            Conv2dParams {
                stride: (1, 1),
                padding: pad,
                dilation: (1, 1),
            },
            70 + i as u64,
        );
    }
    // A stem-like dL/dw (K = 147 far below the 2 x 2250 columns): the reduction cut
    // into partial sums over several column chunks and both images.
    compare_with_direct(
        Device::Cpu,
        &[2, 3, 90, 100],
        &[8, 3, 7, 7],
        Conv2dParams::new(2, 3, 1),
        63,
    );
    // The same path (pixel-major im2col slices) with runs of 5 and 3 taps per
    // kernel row, unequal strides and paddings.
    let cases = [
        ([2, 4, 41, 57], [6, 4, 3, 5], (1, 2), (1, 2)),
        ([1, 5, 48, 61], [7, 5, 3, 3], (2, 1), (0, 1)),
    ];
    for (i, (xd, wd, stride, padding)) in cases.into_iter().enumerate() {
        let p = Conv2dParams {
            stride,
            padding,
            dilation: (1, 1),
        };
        compare_with_direct(Device::Cpu, &xd, &wd, p, 64 + i as u64);
    }
}

/// The CPU backward is the same bits run to run: dL/dw's partial sums over the
/// reduction (stem-like shape, and a 1x1 with more output than input channels) are
/// added in a fixed order, whichever thread finishes first. Under a second.
#[test]
fn conv2d_cpu_backward_is_bit_for_bit_run_to_run() {
    let cases = [
        ([2, 3, 90, 100], [8, 3, 7, 7], Conv2dParams::new(2, 3, 1)),
        ([1, 16, 41, 37], [12, 16, 3, 3], Conv2dParams::new(2, 1, 1)),
        ([2, 8, 40, 44], [16, 8, 1, 1], Conv2dParams::default()),
    ];
    for (i, (xd, wd, p)) in cases.iter().enumerate() {
        let f32t = |t: Tensor| t.to_dtype(DType::F32).unwrap();
        let x = f32t(rand_t(700 + i as u64, xd));
        let w = f32t(rand_t(710 + i as u64, wd));
        let y = conv2d_forward(&x, &w, None, p).unwrap();
        let gy = f32t(rand_t(720 + i as u64, y.dims()));
        let run = || {
            let g = conv2d_backward(&x, &w, &gy, p, [true, true, false]).unwrap();
            let bits = |t: Option<Tensor>| -> Vec<u32> {
                t.unwrap()
                    .to_vec::<f32>()
                    .unwrap()
                    .iter()
                    .map(|v| v.to_bits())
                    .collect()
            };
            (bits(g.gx), bits(g.gw))
        };
        let first = run();
        for _ in 0..3 {
            assert!(
                run() == first,
                "x {xd:?} w {wd:?} {p:?}: backward changed between runs"
            );
        }
    }
}

// ---------------------------------------------------------------------------------
// Gradient checks (f64, central differences)
// ---------------------------------------------------------------------------------

#[test]
fn conv2d_gradcheck() {
    let configs = [
        ([2, 3, 6, 5], [4, 3, 3, 3], Conv2dParams::new(1, 1, 1), true),
        (
            [1, 2, 7, 8],
            [3, 2, 3, 2],
            Conv2dParams {
                stride: (2, 1),
                padding: (1, 0),
                dilation: (1, 2),
            },
            true,
        ),
        (
            [2, 2, 9, 7],
            [2, 2, 2, 3],
            Conv2dParams {
                stride: (3, 2),
                padding: (2, 1),
                dilation: (2, 1),
            },
            false,
        ),
        ([2, 4, 4, 5], [3, 4, 1, 1], Conv2dParams::default(), true),
        ([1, 3, 6, 6], [2, 3, 1, 1], Conv2dParams::new(2, 0, 1), true),
        (
            [1, 2, 5, 11],
            [2, 2, 2, 2],
            Conv2dParams {
                stride: (1, 3),
                padding: (0, 1),
                dilation: (1, 2),
            },
            true,
        ),
    ];
    for (i, (xd, wd, p, bias)) in configs.iter().enumerate() {
        for seed in 0..3u64 {
            let s = 100 * i as u64 + 10 * seed;
            let mut inputs = vec![rand_t(s, xd), rand_t(s + 1, wd)];
            if *bias {
                inputs.push(rand_t(s + 2, &wd[..1]));
            }
            let wrt: Vec<usize> = (0..inputs.len()).collect();
            let f = |t: &[Tensor]| conv2d(&t[0], &t[1], t.get(2), p);
            gradcheck(f, &inputs, &wrt, s + 3, 1e-6, 1e-6)
                .unwrap_or_else(|e| panic!("conv2d x {xd:?} w {wd:?} {p:?}: {e}"));
        }
    }
}

// ---------------------------------------------------------------------------------
// Tape behaviour and errors
// ---------------------------------------------------------------------------------

#[test]
fn conv2d_backward_computes_only_what_is_watched() {
    let (x, w, b) = (
        rand_t(1, &[1, 2, 5, 5]),
        rand_t(2, &[3, 2, 3, 3]),
        rand_t(3, &[3]),
    );
    let p = Conv2dParams::new(1, 1, 1);
    let tape = Tape::new();
    tape.watch(&w);
    let y = {
        let _g = tape.activate();
        conv2d(&x, &w, Some(&b), &p).unwrap()
    };
    let gy = rand_t(4, y.dims());
    let grads = tape.backward_with(&y, gy.clone()).unwrap();
    assert!(grads.get(&x).is_none() && grads.get(&b).is_none());
    let want = conv2d_backward_weight(&x, &gy, w.dims(), &p).unwrap();
    assert_close("gw", grads.expect(&w).unwrap(), &want, 0.0);
}

fn shape_err(r: kestrel::Result<Tensor>, what: &str, op: &str) {
    match r {
        Err(e @ Error::Shape { .. }) => {
            assert!(
                e.to_string().contains(op),
                "{what}: error does not name {op}: {e}"
            )
        }
        Err(e) => panic!("{what}: expected a shape error, got {e}"),
        Ok(t) => panic!(
            "{what}: expected an error, got a tensor of shape {}",
            t.shape()
        ),
    }
}

#[test]
fn conv2d_rejects_bad_inputs() {
    let p = Conv2dParams::default();
    let x = rand_t(1, &[1, 3, 8, 8]);
    let w = rand_t(2, &[4, 3, 3, 3]);
    shape_err(
        conv2d(&x, &rand_t(3, &[4, 2, 3, 3]), None, &p),
        "channel mismatch",
        "conv2d",
    );
    shape_err(
        conv2d(&rand_t(1, &[3, 8, 8]), &w, None, &p),
        "rank-3 input",
        "conv2d",
    );
    shape_err(
        conv2d(&x, &rand_t(2, &[4, 3, 3]), None, &p),
        "rank-3 weight",
        "conv2d",
    );
    shape_err(
        conv2d(&x, &w, Some(&rand_t(3, &[5])), &p),
        "bias length",
        "conv2d",
    );
    shape_err(
        conv2d(&x, &w, Some(&rand_t(3, &[4, 1])), &p),
        "bias rank",
        "conv2d",
    );
    shape_err(
        conv2d(&x, &rand_t(2, &[4, 3, 9, 3]), None, &p),
        "kernel taller than input",
        "conv2d",
    );
    shape_err(
        conv2d(&x, &w, None, &Conv2dParams::new(1, 0, 4)),
        "dilated kernel too large",
        "conv2d",
    );
    // One pixel of padding is exactly enough for a 10-high kernel on 8 rows.
    let tall = rand_t(2, &[4, 3, 10, 3]);
    assert_eq!(
        conv2d(&x, &tall, None, &Conv2dParams::new(1, 1, 1))
            .unwrap()
            .dims(),
        [1, 4, 1, 8]
    );

    let zero_stride = Conv2dParams {
        stride: (0, 1),
        ..p
    };
    assert!(matches!(
        conv2d(&x, &w, None, &zero_stride),
        Err(Error::InvalidArgument { .. })
    ));
    let zero_dil = Conv2dParams {
        dilation: (1, 0),
        ..p
    };
    assert!(matches!(
        conv2d(&x, &w, None, &zero_dil),
        Err(Error::InvalidArgument { .. })
    ));

    let w32 = w.to_dtype(DType::F32).unwrap();
    assert!(
        matches!(conv2d(&x, &w32, None, &p), Err(Error::DType { .. })),
        "mixed dtypes"
    );
    let xi = x.to_dtype(DType::I64).unwrap();
    let wi = w.to_dtype(DType::I64).unwrap();
    assert!(
        matches!(conv2d(&xi, &wi, None, &p), Err(Error::DType { .. })),
        "integer tensors"
    );
}

#[test]
fn conv2d_backward_pieces_reject_bad_gradients() {
    let p = Conv2dParams::default();
    let (x, w) = (rand_t(1, &[1, 3, 8, 8]), rand_t(2, &[4, 3, 3, 3]));
    let bad = rand_t(3, &[1, 4, 5, 6]);
    shape_err(
        conv2d_backward_input(&bad, &w, x.dims(), &p),
        "gx",
        "conv2d_backward_input",
    );
    shape_err(
        conv2d_backward_weight(&x, &bad, w.dims(), &p),
        "gw",
        "conv2d_backward_weight",
    );
    shape_err(
        conv2d_backward_bias(&rand_t(3, &[4, 6])),
        "gb",
        "conv2d_backward_bias",
    );
    let gy = rand_t(3, &[1, 4, 6, 6]);
    let g = conv2d_backward(&x, &w, &gy, &p, [false, false, true]).unwrap();
    assert!(g.gx.is_none() && g.gw.is_none());
    // The bias gradient is gy summed over batch and positions, per output channel.
    let gyv = gy.to_vec::<f64>().unwrap();
    let want: Vec<f64> = gyv.chunks(36).map(|c| c.iter().sum()).collect();
    let gb = g.gb.unwrap();
    assert_eq!(gb.dims(), [4]);
    assert_close(
        "bias gradient",
        &gb,
        &Tensor::from_vec(want, [4]).unwrap(),
        1e-12,
    );
}
