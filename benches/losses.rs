//! Losses, shape ops and the SGD step at Faster R-CNN sizes, named
//! `<op>/<device>/<shape>`. Losses are timed forward + backward through a tape (what a
//! training step pays); CUDA timings synchronise the device after each iteration.
//! CUDA runs when `kestrel::device::gpu::device(0)` opens.

mod common;

use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use kestrel::autograd::Tape;
use kestrel::ops::losses::{bce_with_logits, cross_entropy, smooth_l1, Reduction};
use kestrel::ops::shape::{concat, permute};
use kestrel::optim::{Sgd, SgdConfig};
use kestrel::{Device, Result, Tensor};

fn rand_f32(seed: u64, shape: &[usize], scale: f64, device: Device) -> Tensor {
    let mut r = kestrel::rng::Rng::new(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|_| (r.range(-1.0, 1.0) * scale) as f32)
        .collect();
    Tensor::from_vec(v, shape.to_vec())
        .unwrap()
        .to_device(device)
        .unwrap()
}

/// Forward and backward of `loss(x, rest)` with respect to `x`.
fn fwd_bwd(x: &Tensor, loss: impl Fn(&Tensor) -> Result<Tensor>) {
    let tape = Tape::new();
    tape.watch(x);
    let y = {
        let _g = tape.activate();
        loss(x).unwrap()
    };
    let grads = tape.backward(&y).unwrap();
    std::hint::black_box(grads.get(x));
}

fn bench_on(g: &mut Criterion, name: String, device: Device, f: impl Fn()) {
    g.bench_function(&name, |b| {
        b.iter(|| {
            f();
            common::sync(device);
        })
    });
}

fn losses(g: &mut Criterion) {
    for device in common::devices() {
        // RPN objectness: 256 sampled anchors x 2 images, and every anchor of an
        // 800x1216 batch of one (242991 over P2..P6).
        for n in [512usize, 242_991] {
            let x = rand_f32(1, &[n], 4.0, device);
            let t = rand_f32(2, &[n], 0.5, device);
            let name = format!("bce_with_logits/{device}/{n}");
            bench_on(g, name, device, || {
                fwd_bwd(&x, |x| bce_with_logits(x, &t, Reduction::Mean))
            });
        }
        // Box head: 512 RoIs x 2 images, 91 COCO classes.
        let logits = rand_f32(3, &[1024, 91], 3.0, device);
        let labels: Vec<i64> = (0..1024).map(|i| (i * 7 % 91) as i64).collect();
        let labels = Tensor::from_vec_i64(labels, [1024])
            .unwrap()
            .to_device(device)
            .unwrap();
        bench_on(g, format!("cross_entropy/{device}/1024x91"), device, || {
            fwd_bwd(&logits, |x| cross_entropy(x, &labels, Reduction::Mean))
        });
        // Box regression of the sampled RoIs, beta 1/9, sum.
        let x = rand_f32(4, &[512, 4], 0.3, device);
        let t = rand_f32(5, &[512, 4], 0.3, device);
        bench_on(g, format!("smooth_l1/{device}/512x4"), device, || {
            fwd_bwd(&x, |x| smooth_l1(x, &t, 1.0 / 9.0, Reduction::Sum))
        });
    }
}

fn shape_ops(g: &mut Criterion) {
    for device in common::devices() {
        // RPN head regression output of P2 for an 800x1216 image: [1, A*4, H, W] -> NHWC.
        let x = rand_f32(6, &[1, 12, 200, 304], 1.0, device);
        bench_on(g, format!("permute/{device}/1x12x200x304"), device, || {
            std::hint::black_box(permute(&x, &[0, 2, 3, 1]).unwrap());
        });
        // Concatenating the five levels' flattened deltas [H*W*A, 4].
        let levels: Vec<Tensor> = [(200, 304), (100, 152), (50, 76), (25, 38), (13, 19)]
            .iter()
            .enumerate()
            .map(|(i, &(h, w))| rand_f32(10 + i as u64, &[h * w * 3, 4], 1.0, device))
            .collect();
        let refs: Vec<&Tensor> = levels.iter().collect();
        bench_on(g, format!("concat/{device}/5x[HWA,4]"), device, || {
            std::hint::black_box(concat(&refs, 0).unwrap());
        });
    }
}

fn sgd(g: &mut Criterion) {
    // ResNet-50-FPN: about 41M parameters in about 160 tensors.
    let (tensors, each) = (164usize, 250_000usize);
    for device in common::devices() {
        let cfg = SgdConfig {
            lr: 0.02,
            momentum: 0.9,
            weight_decay: 1e-4,
            ..SgdConfig::default()
        };
        let mut opt = Sgd::new(cfg).unwrap();
        let mut params: Vec<Tensor> = (0..tensors)
            .map(|i| rand_f32(i as u64, &[each], 1.0, device))
            .collect();
        let grads: Vec<Tensor> = (0..tensors)
            .map(|i| rand_f32(1000 + i as u64, &[each], 0.01, device))
            .collect();
        // The first step only creates the momentum buffers; time the steady state.
        opt.step(&mut params, &grads).unwrap();
        g.bench_function(&format!("sgd_step/{device}/41M"), |b| {
            b.iter(|| {
                opt.step(&mut params, &grads).unwrap();
                common::sync(device);
            })
        });
    }
}

criterion_group! {
    name = benches;
    // Small samples: the SGD step over 41M parameters takes a while on the CPU.
    config = Criterion::default().sample_size(10).measurement_time(Duration::from_secs(2));
    targets = losses, shape_ops, sgd
}
criterion_main!(benches);
