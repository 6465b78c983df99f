//! Fused conv / linear epilogues (src/ops/fused): `conv2d_fused` with a folded frozen
//! BatchNorm, a residual and ReLU must equal the unfused chain
//! conv2d -> frozen_batch_norm -> add -> relu. The fold uses frozen_batch_norm's own
//! arithmetic, so on the unfused implementation the results agree bit for bit; a fused
//! implementation may reassociate `acc * scale + shift` (one rounding per step at most),
//! so the check allows f32 rounding of the output scale: |d| <= 4 * 2^-24 * (|y| + 1).

mod common;

use kestrel::ops::conv2d::{conv2d, Conv2dParams};
use kestrel::ops::{self, Epilogue};
use kestrel::{DType, Device, Tensor};

/// A random f32 tensor (values in [-1, 1)).
fn rand_t(seed: u64, shape: &[usize]) -> Tensor {
    common::rand_t(seed, shape).to_dtype(DType::F32).unwrap()
}

fn assert_f32_close(what: &str, got: &Tensor, want: &Tensor) {
    assert_eq!(got.dims(), want.dims(), "{what}: shape");
    let (g, w) = (got.to_vec::<f32>().unwrap(), want.to_vec::<f32>().unwrap());
    for (i, (a, b)) in g.iter().zip(&w).enumerate() {
        let tol = 4.0 * f32::EPSILON / 2.0 * (b.abs() + 1.0);
        assert!((a - b).abs() <= tol, "{what}[{i}]: {a} vs {b}");
    }
}

fn positive(seed: u64, n: usize) -> Tensor {
    let v: Vec<f32> = common::randn(seed, n)
        .iter()
        .map(|x| (x.abs() + 0.5) as f32)
        .collect();
    Tensor::from_vec(v, [n]).unwrap()
}

fn check_conv_bn_residual_relu(device: Device) {
    let (n, cin, cout, h, w) = (2, 5, 7, 9, 8);
    for (k, p) in [
        (3, Conv2dParams::new(1, 1, 1)),
        (1, Conv2dParams::new(2, 0, 1)),
        (3, Conv2dParams::new(1, 2, 2)),
    ] {
        let x = rand_t(1, &[n, cin, h, w]).to_device(device).unwrap();
        let wt = rand_t(2, &[cout, cin, k, k]).to_device(device).unwrap();
        let (bw, bb, rm) = (rand_t(3, &[cout]), rand_t(4, &[cout]), rand_t(5, &[cout]));
        let rv = positive(6, cout);
        let [bw, bb, rm, rv] = [bw, bb, rm, rv].map(|t| t.to_device(device).unwrap());
        let y0 = conv2d(&x, &wt, None, &p).unwrap();
        let res = rand_t(7, y0.dims()).to_device(device).unwrap();
        let want = ops::relu(
            &ops::add(
                &ops::frozen_batch_norm(&y0, &bw, &bb, &rm, &rv, 1e-5).unwrap(),
                &res,
            )
            .unwrap(),
        )
        .unwrap();
        let (scale, shift) = ops::fold_frozen_bn(&bw, &bb, &rm, &rv, 1e-5).unwrap();
        let ep = Epilogue {
            scale: Some(&scale),
            shift: Some(&shift),
            residual: Some(&res),
            relu: true,
            out_dtype: None,
        };
        let got = ops::conv2d_fused(&x, &wt, &p, &ep).unwrap();
        assert_f32_close(&format!("conv2d_fused k{k} {p:?}"), &got, &want);
        // ReLU really applied: some outputs are clamped.
        assert!(got.to_vec::<f32>().unwrap().contains(&0.0));
    }
}

fn check_linear_bias_relu(device: Device) {
    let x = rand_t(11, &[6, 13]).to_device(device).unwrap();
    let w = rand_t(12, &[9, 13]).to_device(device).unwrap();
    let b = rand_t(13, &[9]).to_device(device).unwrap();
    let want = ops::relu(&ops::linear::linear(&x, &w, Some(&b)).unwrap()).unwrap();
    let ep = Epilogue {
        shift: Some(&b),
        relu: true,
        ..Default::default()
    };
    let got = ops::linear_fused(&x, &w, &ep).unwrap();
    assert_f32_close("linear_fused", &got, &want);
}

crate::device_tests! {
    fused_conv_bn_residual_relu=> check_conv_bn_residual_relu;
    fused_linear_bias_relu=> check_linear_bias_relu;
}

#[test]
fn fused_ops_refuse_bad_epilogues() {
    let x = rand_t(1, &[1, 2, 4, 4]);
    let w = rand_t(2, &[3, 2, 1, 1]);
    let bad = rand_t(3, &[2]);
    let ep = Epilogue {
        scale: Some(&bad),
        ..Default::default()
    };
    let e = ops::conv2d_fused(&x, &w, &Conv2dParams::default(), &ep).unwrap_err();
    assert!(e.to_string().contains("scale"), "{e}");
    let r = rand_t(4, &[1, 3, 3, 3]);
    let ep = Epilogue {
        residual: Some(&r),
        ..Default::default()
    };
    let e = ops::conv2d_fused(&x, &w, &Conv2dParams::default(), &ep).unwrap_err();
    assert!(e.to_string().contains("residual"), "{e}");
}
