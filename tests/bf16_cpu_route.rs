//! The CPU's bf16 conv and linear layers (ops::mixed::{conv2d_bf16, linear_bf16}) are
//! the f32 model's own CPU ops on bf16-rounded operands, bit for bit: output = the f32
//! op on the widened activations and the rounded weight, rounded once to nearest
//! even; dL/dx and dL/dw = the f32 backward with the upstream gradient rounded to
//! bf16 (what the tensor-core kernels read). This is what lets the bf16 CPU path
//! take the f32 fast routes (the conv's fused bias, one GEMM for a linear layer)
//! instead of a separate slower reference: any extra or missing rounding, or a
//! different summation route, shows up as a differing bit.
//!
//! The conv's bias rides in the f32 convolution's epilogue: the check also asks that
//! this equals adding the bias in a separate f32 pass after the convolution (the
//! route before the change), so the bf16 conv outputs did not move.

mod common;

use common::run_with_grads;
use kestrel::ops::conv2d::{
    conv2d, conv2d_backward_input, conv2d_backward_weight, conv2d_forward, Conv2dParams,
};
use kestrel::ops::fused::Epilogue;
use kestrel::ops::linear::{linear, linear_backward};
use kestrel::ops::mixed::{conv2d_bf16, linear_bf16, Bf16Weight};
use kestrel::tensor::DType;
use kestrel::{Device, Tensor};

/// Random activations that bf16 represents exactly (the policy's bf16 inputs).
fn bf16_acts(seed: u64, dims: &[usize]) -> Tensor {
    common::rand_t(seed, dims)
        .to_dtype(DType::BF16)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
}

/// f32 values (weights, gradients) that are not bf16-exact in general.
fn f32_t(seed: u64, dims: &[usize]) -> Tensor {
    common::rand_t(seed, dims).to_dtype(DType::F32).unwrap()
}

fn rounded(t: &Tensor) -> Tensor {
    t.to_dtype(DType::BF16)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
}

fn bits16(t: &Tensor) -> Vec<u16> {
    t.to_vec_bf16()
        .unwrap()
        .iter()
        .map(|v| v.to_bits())
        .collect()
}

fn bits32(t: &Tensor) -> Vec<u32> {
    assert_eq!(t.dtype(), DType::F32);
    t.to_vec::<f32>()
        .unwrap()
        .iter()
        .map(|v| v.to_bits())
        .collect()
}

#[test]
fn conv2d_bf16_cpu_is_the_f32_conv_on_rounded_operands_bit_for_bit() {
    // A 3x3 stride-1 conv with padding and a strided 1x1 (the pointwise route).
    for (k, stride, pad) in [(3usize, 1usize, 1usize), (1, 2, 0)] {
        let (n, cin, cout, h, w) = (2, 16, 24, 13, 11);
        let x = bf16_acts(1, &[n, cin, h, w]);
        let wt = f32_t(2, &[cout, cin, k, k]);
        let b = f32_t(3, &[cout]);
        let p = Conv2dParams::new(stride, pad, 1);
        let w16 = Bf16Weight::new(&wt, true).unwrap();
        let x16 = x.to_dtype(DType::BF16).unwrap();
        let f16 = |v: &[Tensor]| {
            let ep = Epilogue {
                shift: Some(&v[2]),
                out_dtype: Some(DType::BF16),
                ..Default::default()
            };
            conv2d_bf16(&v[0], &v[1], &w16, &p, &ep)
        };
        let y_dims = conv2d_forward(&x, &wt, None, &p).unwrap().dims().to_vec();
        let gy = f32_t(4, &y_dims);
        let (y, g) = run_with_grads(
            f16,
            &[x16.clone(), wt.clone(), b.clone()],
            &[0, 1],
            Some(gy.clone()),
        );
        let what = format!("conv {k}x{k} stride {stride}");
        assert_eq!(y.dtype(), DType::BF16, "{what}: bf16 out");

        let wr = rounded(&wt);
        let y_ref = conv2d(&x, &wr, Some(&b), &p).unwrap();
        assert_eq!(
            bits16(&y),
            bits16(&y_ref.to_dtype(DType::BF16).unwrap()),
            "{what}: output is not the f32 conv (fused bias) on the rounded operands, rounded"
        );
        // The bias added in its own pass after the convolution: the same f32 values.
        let acc = conv2d_forward(&x, &wr, None, &p).unwrap();
        let plane: usize = y_dims[2] * y_dims[3];
        let bs = b.to_vec::<f32>().unwrap();
        let sep: Vec<f32> = acc
            .to_vec::<f32>()
            .unwrap()
            .iter()
            .enumerate()
            .map(|(i, &v)| v + bs[(i / plane) % cout])
            .collect();
        assert_eq!(
            bits32(&y_ref),
            sep.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            "{what}: fused bias differs from the separate bias pass"
        );

        let gyr = rounded(&gy);
        let gx_ref = conv2d_backward_input(&gyr, &wr, x.dims(), &p).unwrap();
        let gw_ref = conv2d_backward_weight(&x, &gyr, wt.dims(), &p).unwrap();
        assert_eq!(bits32(&g[0]), bits32(&gx_ref), "{what}: dL/dx");
        assert_eq!(bits32(&g[1]), bits32(&gw_ref), "{what}: dL/dw");
    }
}

#[test]
fn linear_bf16_cpu_is_the_f32_linear_on_rounded_operands_bit_for_bit() {
    // Row counts and widths like the box head's (ragged: not multiples of 16).
    let (m, k, nout) = (37, 200, 24);
    let x = bf16_acts(5, &[m, k]);
    let wt = f32_t(6, &[nout, k]);
    let b = f32_t(7, &[nout]);
    let w16 = Bf16Weight::new(&wt, false).unwrap();
    let f16 = |v: &[Tensor]| {
        let ep = Epilogue {
            shift: Some(&v[2]),
            out_dtype: Some(DType::BF16),
            ..Default::default()
        };
        linear_bf16(&v[0], &v[1], &w16, &ep)
    };
    let gy = f32_t(8, &[m, nout]);
    let (y, g) = run_with_grads(
        f16,
        &[x.to_dtype(DType::BF16).unwrap(), wt.clone(), b.clone()],
        &[0, 1],
        Some(gy.clone()),
    );
    assert_eq!(y.dtype(), DType::BF16);
    let wr = rounded(&wt);
    let y_ref = linear(&x, &wr, Some(&b)).unwrap();
    assert_eq!(
        bits16(&y),
        bits16(&y_ref.to_dtype(DType::BF16).unwrap()),
        "linear: output is not the f32 linear on the rounded operands, rounded"
    );
    let (gx_ref, gw_ref, _) =
        linear_backward(&x, &wr, &rounded(&gy), false, &[true, true]).unwrap();
    assert_eq!(bits32(&g[0]), bits32(&gx_ref.unwrap()), "linear: dL/dx");
    assert_eq!(bits32(&g[1]), bits32(&gw_ref.unwrap()), "linear: dL/dw");
    assert_eq!(y.device(), Device::Cpu);
}

/// The inference epilogue `relu(acc * scale + shift + residual)` by its definition:
/// the f32 product of the rounded operands, then the affine, the residual add and
/// relu as separate f32 ops, rounded once (the CPU reference's route before the
/// epilogue rode in the convolution's tiles).
fn epilogue_by_passes(
    x: &Tensor,
    wt: &Tensor,
    p: &Conv2dParams,
    (scale, shift): (&Tensor, &Tensor),
    residual: Option<&Tensor>,
    relu: bool,
) -> Tensor {
    let acc = conv2d_forward(&rounded(x), &rounded(wt), None, p).unwrap();
    let mut v = kestrel::ops::channel_affine(&acc, scale, shift).unwrap();
    if let Some(r) = residual {
        v = kestrel::ops::add(&v, &rounded(r)).unwrap();
    }
    if relu {
        v = kestrel::ops::relu(&v).unwrap();
    }
    v.to_dtype(DType::BF16).unwrap()
}

#[test]
fn inference_epilogue_in_the_tiles_is_the_separate_passes_bit_for_bit() {
    use kestrel::ops::tc::chain::{TcActivation, TcConv};
    use kestrel::ops::tc::conv2d_tc;
    // Zero patches, negative scales, -0 shifts and residuals, a NaN and an infinity:
    // where a tile's `t < 0 ? 0 : t` keeps -0 or NaN, relu gives +0.
    let (n, cin, cout, h, w) = (2, 16, 24, 9, 7);
    let mut xv = bf16_acts(11, &[n, cin, h, w]).to_vec::<f32>().unwrap();
    // Image 0 all zeros: its products are 0, times a negative scale -0.
    xv[..cin * h * w].iter_mut().for_each(|v| *v = 0.0);
    let mut sc = f32_t(12, &[cout]).to_vec::<f32>().unwrap();
    let mut sh = f32_t(13, &[cout]).to_vec::<f32>().unwrap();
    for c in 0..cout / 2 {
        sc[c] = -sc[c].abs();
        sh[c] = -0.0;
    }
    let (scale, shift) = (
        Tensor::from_vec(sc, [cout]).unwrap(),
        Tensor::from_vec(sh, [cout]).unwrap(),
    );
    for (k, stride, pad) in [(3usize, 1usize, 1usize), (1, 1, 0), (1, 2, 0)] {
        let p = Conv2dParams::new(stride, pad, 1);
        let x = Tensor::from_vec(xv.clone(), [n, cin, h, w]).unwrap();
        let wt = f32_t(14, &[cout, cin, k, k]);
        let y_dims = conv2d_forward(&x, &wt, None, &p).unwrap().dims().to_vec();
        let mut rv = bf16_acts(15, &y_dims).to_vec::<f32>().unwrap();
        let plane = y_dims[2] * y_dims[3];
        rv[..plane * cout / 2].iter_mut().for_each(|v| *v = -0.0);
        rv[3] = f32::NAN;
        rv[plane * cout + 1] = f32::INFINITY;
        let res = Tensor::from_vec(rv, y_dims.clone()).unwrap();
        for (residual, relu) in [
            (None, true),
            (None, false),
            (Some(&res), true),
            (Some(&res), false),
        ] {
            let what = format!(
                "conv {k}x{k}/{stride}, residual {}, relu {relu}",
                residual.is_some()
            );
            let want = bits16(&epilogue_by_passes(
                &x,
                &wt,
                &p,
                (&scale, &shift),
                residual,
                relu,
            ));
            let res16 = residual.map(|r| r.to_dtype(DType::BF16).unwrap());
            let ep = Epilogue {
                scale: Some(&scale),
                shift: Some(&shift),
                residual: res16.as_ref(),
                relu,
                out_dtype: Some(DType::BF16),
            };
            let y = conv2d_tc(&x.to_dtype(DType::BF16).unwrap(), &wt, &p, &ep).unwrap();
            assert_eq!(bits16(&y), want, "{what}: conv2d_tc");
            let conv = TcConv::new(&wt, Some(scale.clone()), Some(shift.clone()), p).unwrap();
            let ra = residual.map(|r| TcActivation::from_nchw(r).unwrap());
            let ya = conv
                .forward(&TcActivation::from_nchw(&x).unwrap(), ra.as_ref(), relu)
                .unwrap();
            let y16 = ya.to_nchw(DType::BF16).unwrap();
            assert_eq!(bits16(&y16), want, "{what}: chained");
            // Its f32 exit is the same values, widened.
            assert_eq!(
                bits32(&ya.to_nchw(DType::F32).unwrap()),
                bits32(&y16.to_dtype(DType::F32).unwrap()),
                "{what}: chained f32 exit"
            );
        }
    }
}
