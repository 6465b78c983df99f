//! Elementwise ops (relu, relu_backward, add, mul, scale; kernels/elementwise.cu)
//! against f64 definitions written here, forward and through the tape, on the CPU,
//! the emulated device and CUDA.

mod common;

use common::*;
use kestrel::autograd::Tape;
use kestrel::device::gpu::{self, KernelArg, LaunchCfg};
use kestrel::{ops, DType, Device, Tensor};

/// `v` rounded to f32 (the inputs the f32 ops see), as f64.
fn as_f32(v: &[f64]) -> Vec<f64> {
    v.iter().map(|&x| x as f32 as f64).collect()
}

fn assert_values(what: &str, got: &Tensor, want: &[f64], dev: Device) {
    assert_eq!(got.device(), dev, "{what} left the device");
    let g = got.to_vec::<f64>().unwrap();
    assert_eq!(g.len(), want.len(), "{what}: length");
    let e = rel_err(&g, want);
    assert!(
        e <= 1e-6,
        "{what} on {dev}: relative error {e:.3e} (got {:?}, want {:?})",
        &g[..4],
        &want[..4]
    );
}

fn check_elementwise_on(dev: Device) {
    let n = 3000;
    let (a, b) = (as_f32(&randn(1, n)), as_f32(&randn(2, n)));
    let t = |v: &[f64]| {
        Tensor::from_vec(v.to_vec(), [3, 1000])
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .to_device(dev)
            .unwrap()
    };
    let (ad, bd) = (t(&a), t(&b));
    let relu: Vec<f64> = a.iter().map(|&x| x.max(0.0)).collect();
    assert_values("relu", &ops::relu(&ad).unwrap(), &relu, dev);
    let add: Vec<f64> = a.iter().zip(&b).map(|(x, y)| x + y).collect();
    assert_values("add", &ops::add(&ad, &bd).unwrap(), &add, dev);
    let mul: Vec<f64> = a.iter().zip(&b).map(|(x, y)| x * y).collect();
    assert_values("mul", &ops::mul(&ad, &bd).unwrap(), &mul, dev);
    let scale: Vec<f64> = a.iter().map(|x| -2.5 * x).collect();
    assert_values("scale", &ops::scale(&ad, -2.5).unwrap(), &scale, dev);
    // relu_backward passes the gradient where the output is positive.
    let gx: Vec<f64> = a
        .iter()
        .zip(&b)
        .map(|(&x, &g)| if x > 0.0 { g } else { 0.0 })
        .collect();
    let y = ops::relu(&ad).unwrap();
    assert_values(
        "relu_backward",
        &ops::elementwise::relu_backward(&y, &bd).unwrap(),
        &gx,
        dev,
    );
    // Through the tape: d/da sum(relu(a) * b) = b where a > 0.
    let tape = Tape::new();
    tape.watch(&ad);
    let loss = {
        let _g = tape.activate();
        ops::sum(&ops::mul(&ops::relu(&ad).unwrap(), &bd).unwrap()).unwrap()
    };
    let g = tape.backward(&loss).unwrap().expect(&ad).unwrap().clone();
    assert_values("grad of sum(relu(a) * b)", &g, &gx, dev);

    // scale_by_dev_f32 (y = s[0] * x, the scale read on the device): no op launches
    // it yet, so it is launched directly.
    if let Device::Cuda(ord) = dev {
        let gdev = gpu::device(ord).unwrap();
        let s = Tensor::from_vec(vec![0.5f32], [1])
            .unwrap()
            .to_device(dev)
            .unwrap();
        let y = Tensor::gpu_zeros(&gdev, vec![3, 1000]).unwrap();
        gdev.launch(
            "scale_by_dev_f32",
            LaunchCfg::for_elems(n),
            &[
                ad.gpu().unwrap().buf.arg(),
                s.gpu().unwrap().buf.arg(),
                y.gpu().unwrap().buf.arg(),
                KernelArg::I64(n as i64),
            ],
        )
        .unwrap();
        let half: Vec<f64> = a.iter().map(|x| 0.5 * x).collect();
        assert_values("scale_by_dev", &y, &half, dev);
    }
}

crate::device_tests! {
    elementwise_ops_match_their_definition => check_elementwise_on;
}
