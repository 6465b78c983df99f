//! Criterion benches of the layer ops at the sizes Faster R-CNN runs them on an
//! 800x1216 image, named `<op>/<device>/<shape>`. CUDA variants run when
//! `kestrel::device::gpu::device(0)` opens.

mod common;

use criterion::{criterion_group, criterion_main, Criterion};
use kestrel::autograd::Tape;
use kestrel::ops::norm::{batch_norm, frozen_batch_norm, BatchNormConfig};
use kestrel::ops::pool::max_pool2d;
use kestrel::ops::upsample::upsample_nearest_add;
use kestrel::{Device, Tensor};

/// Deterministic f32 values in [-1, 1) of `dims`, on `dev`.
fn input(dims: &[usize], seed: u64, dev: Device) -> Tensor {
    let mut r = kestrel::rng::Rng::new(seed);
    let n: usize = dims.iter().product();
    let v: Vec<f32> = (0..n).map(|_| r.range(-1.0, 1.0) as f32).collect();
    Tensor::from_vec(v, dims.to_vec())
        .unwrap()
        .to_device(dev)
        .unwrap()
}

fn pool(c: &mut Criterion) {
    let mut g = c.benchmark_group("max_pool2d");
    g.sample_size(10);
    for (dev, name) in common::named_devices() {
        // The ResNet stem: conv1 output of an 800x1216 image, 3x3 stride 2 padding 1.
        let x = input(&[1, 64, 400, 608], 1, dev);
        g.bench_function(format!("{name}/1x64x400x608"), |b| {
            b.iter(|| {
                let y = max_pool2d(&x, 3, 2, 1).unwrap();
                common::sync(dev);
                y
            })
        });
        let gy = input(&[1, 64, 200, 304], 2, dev);
        g.bench_function(format!("{name}/1x64x400x608_fwd_bwd"), |b| {
            b.iter(|| {
                let tape = Tape::new();
                tape.watch(&x);
                let y = {
                    let _a = tape.activate();
                    max_pool2d(&x, 3, 2, 1).unwrap()
                };
                let grads = tape.backward_with(&y, gy.clone()).unwrap();
                common::sync(dev);
                grads
            })
        });
    }
    g.finish();
}

fn upsample(c: &mut Criterion) {
    let mut g = c.benchmark_group("upsample_nearest_add");
    g.sample_size(10);
    for (dev, name) in common::named_devices() {
        // FPN top-down steps of an 800x1216 image, 256 channels: P3 <- P4 (2x) and
        // P5 <- P6-sized map (not 2x: 25x38 <- 13x19).
        for (lat, top) in [
            ([1, 256, 100, 152], [1, 256, 50, 76]),
            ([1, 256, 25, 38], [1, 256, 13, 19]),
        ] {
            let (l, t) = (input(&lat, 3, dev), input(&top, 4, dev));
            let shape = format!("256x{}x{}<-{}x{}", lat[2], lat[3], top[2], top[3]);
            g.bench_function(format!("{name}/{shape}"), |b| {
                b.iter(|| {
                    let y = upsample_nearest_add(&l, &t).unwrap();
                    common::sync(dev);
                    y
                })
            });
            let gy = input(&lat, 5, dev);
            g.bench_function(format!("{name}/{shape}_fwd_bwd"), |b| {
                b.iter(|| {
                    let tape = Tape::new();
                    tape.watch(&t);
                    let y = {
                        let _a = tape.activate();
                        upsample_nearest_add(&l, &t).unwrap()
                    };
                    let grads = tape.backward_with(&y, gy.clone()).unwrap();
                    common::sync(dev);
                    grads
                })
            });
        }
    }
    g.finish();
}

fn norm(c: &mut Criterion) {
    let mut g = c.benchmark_group("frozen_batch_norm");
    g.sample_size(10);
    for (dev, name) in common::named_devices() {
        // layer1's output of an 800x1216 image.
        let x = input(&[1, 256, 200, 304], 6, dev);
        let p = |s| input(&[256], s, dev);
        let (w, b, rm) = (p(7), p(8), p(9));
        let rv = Tensor::full([256], 1.5, kestrel::DType::F32, dev).unwrap();
        g.bench_function(format!("{name}/1x256x200x304"), |bch| {
            bch.iter(|| {
                let y = frozen_batch_norm(&x, &w, &b, &rm, &rv, 1e-5).unwrap();
                common::sync(dev);
                y
            })
        });
    }
    g.finish();

    let mut g = c.benchmark_group("batch_norm_train");
    g.sample_size(10);
    for (dev, name) in common::named_devices() {
        let x = input(&[2, 64, 100, 152], 10, dev);
        let gy = input(&[2, 64, 100, 152], 11, dev);
        let p = |s| input(&[64], s, dev);
        let (w, b, rm) = (p(12), p(13), p(14));
        let rv = Tensor::full([64], 1.0, kestrel::DType::F32, dev).unwrap();
        g.bench_function(format!("{name}/2x64x100x152_fwd_bwd"), |bch| {
            bch.iter(|| {
                let tape = Tape::new();
                for t in [&x, &w, &b] {
                    tape.watch(t);
                }
                let out = {
                    let _a = tape.activate();
                    batch_norm(&x, &w, &b, &rm, &rv, BatchNormConfig::train()).unwrap()
                };
                let grads = tape.backward_with(&out.y, gy.clone()).unwrap();
                common::sync(dev);
                grads
            })
        });
    }
    g.finish();
}

criterion_group!(benches, pool, upsample, norm);
criterion_main!(benches);
