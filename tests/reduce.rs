//! Reductions (sum, mean; kernels/reduce.cu) and the broadcast of their gradient
//! against f64 sums written here, on one block and on many (partial sums, then one
//! block), on the CPU, the emulated device and CUDA.

mod common;

use common::*;
use kestrel::autograd::Tape;
use kestrel::{ops, DType, Device, Tensor};

fn check_sum_and_mean_on(dev: Device) {
    for n in [1usize, 1000, 100_000] {
        let v: Vec<f64> = randn(5, n).iter().map(|&x| x as f32 as f64).collect();
        let x = Tensor::from_vec(v.clone(), [n])
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .to_device(dev)
            .unwrap();
        let want: f64 = v.iter().sum();
        let scale = v.iter().map(|x| x.abs()).sum::<f64>();
        for (what, got, want) in [
            ("sum", ops::sum(&x).unwrap(), want),
            ("mean", ops::mean(&x).unwrap(), want / n as f64),
        ] {
            assert_eq!(got.device(), dev, "{what} left the device");
            let g = got.to_vec::<f64>().unwrap();
            assert_eq!(g.len(), 1, "{what} is one value");
            // f32 accumulation: the error is bounded by the sum of magnitudes.
            let tol = 1e-6 * scale / if what == "mean" { n as f64 } else { 1.0 };
            assert!(
                (g[0] - want).abs() <= tol,
                "{what} of {n} on {dev}: {} vs {want} (tolerance {tol:.2e})",
                g[0]
            );
        }
        // d mean / dx = 1/n everywhere (the gradient broadcast from the device scalar).
        let tape = Tape::new();
        tape.watch(&x);
        let m = {
            let _g = tape.activate();
            ops::mean(&x).unwrap()
        };
        let g = tape.backward(&m).unwrap().expect(&x).unwrap().clone();
        assert_eq!(g.device(), dev);
        let g = g.to_vec::<f64>().unwrap();
        let want = 1.0 / n as f64;
        assert!(
            g.iter().all(|&v| (v - want).abs() <= 1e-6 * want),
            "d mean/dx of {n} on {dev}: {:?}, want {want}",
            &g[..g.len().min(4)]
        );
    }
}

crate::device_tests! {
    sum_and_mean_match_f64_sums => check_sum_and_mean_on;
}
