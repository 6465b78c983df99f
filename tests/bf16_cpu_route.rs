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
