//! Tensor-core bf16 conv / linear timing on a CUDA device, layer by layer for
//! ResNet-50-FPN (scripts/resnet50_fpn_layers.txt): forward with a bf16 output, x
//! bf16 channels-last as a chain holds it between layers (`ops::tc::chain`: one
//! launch per conv, like torch's channels_last; no pack), weights packed once. Prints one JSON line per layer (ms, TFLOP/s);
//! scripts/gpu_check.sh pairs them with scripts/bench_tc_torch.py's cuDNN/cuBLAS
//! numbers. Without a CUDA device it says so and exits: emulated runs are checks,
//! not timings.
//!
//! `cargo bench --bench tc_conv`

use std::time::Instant;

use kestrel::ops::conv2d::Conv2dParams;
use kestrel::ops::tc;
use kestrel::ops::tc::chain::{conv2d_tc_nhwc, ChainEpilogue, TcActivation};
use kestrel::ops::Epilogue;
use kestrel::tensor::DType;
use kestrel::{Device, Tensor};

fn rand(n: usize, seed: u64) -> Vec<f32> {
    let mut r = kestrel::rng::Rng::new(seed);
    (0..n).map(|_| r.range(-1.0, 1.0) as f32).collect()
}

fn main() {
    let Ok(gdev) = kestrel::device::gpu::device(0) else {
        println!("tc_conv: no CUDA device; nothing timed (emulated runs are not timings)");
        return;
    };
    let dev = Device::Cuda(0);
    let layers = include_str!("../scripts/resnet50_fpn_layers.txt");
    for line in layers
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
    {
        let f: Vec<&str> = line.split_whitespace().collect();
        let num = |i: usize| f[i].parse::<usize>().expect("layer table number");
        let (name, flops, mut run): (&str, f64, Box<dyn FnMut()>) = match f[0] {
            "conv" => {
                let (n, cin, h, w, cout, k) = (num(2), num(3), num(4), num(5), num(6), num(7));
                let p = Conv2dParams::new(num(8), num(9), num(10));
                let x = Tensor::from_vec(rand(n * cin * h * w, 1), [n, cin, h, w])
                    .and_then(|t| t.to_dtype(DType::BF16))
                    .and_then(|t| t.to_device(dev))
                    .expect("x");
                let wt = Tensor::from_vec(rand(cout * cin * k * k, 2), [cout, cin, k, k])
                    .and_then(|t| t.to_device(dev))
                    .expect("w");
                let packed = tc::TcConvWeight::new(&wt).expect("pack");
                let x = TcActivation::from_nchw(&x).expect("channels-last x");
                let ep = ChainEpilogue::default();
                let y = conv2d_tc_nhwc(&x, &packed, &p, &ep).expect("conv");
                let [_, _, oh, ow] = y.dims();
                let flops = 2.0 * (n * cout * oh * ow * cin * k * k) as f64;
                (
                    f[1],
                    flops,
                    Box::new(move || {
                        conv2d_tc_nhwc(&x, &packed, &p, &ep).expect("conv");
                    }),
                )
            }
            _ => {
                let (m, kk, nn) = (num(2), num(3), num(4));
                let x = Tensor::from_vec(rand(m * kk, 3), [m, kk])
                    .and_then(|t| t.to_dtype(DType::BF16))
                    .and_then(|t| t.to_device(dev))
                    .expect("x");
                let w = Tensor::from_vec(rand(nn * kk, 4), [nn, kk])
                    .and_then(|t| t.to_dtype(DType::BF16))
                    .and_then(|t| t.to_device(dev))
                    .expect("w");
                (
                    f[1],
                    2.0 * (m * kk * nn) as f64,
                    Box::new(move || {
                        tc::linear_tc(&x, &w, &Epilogue::default()).expect("linear");
                    }),
                )
            }
        };
        run();
        gdev.backend.synchronize().expect("sync");
        let iters = 20;
        let t0 = Instant::now();
        for _ in 0..iters {
            run();
        }
        gdev.backend.synchronize().expect("sync");
        let ms = t0.elapsed().as_secs_f64() * 1e3 / iters as f64;
        println!(
            "{{\"layer\": \"{name}\", \"impl\": \"kestrel\", \"ms\": {ms:.4}, \"tflops\": {:.2}}}",
            flops / (ms * 1e-3) / 1e12
        );
    }
}
