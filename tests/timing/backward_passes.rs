//! Timing (ignored; `cargo test --release --test pool -- --ignored --nocapture
//! backward_passes_timing`): the memory-bound
//! CPU backward passes of an R50-FPN training step at batch 1, 800x1216, at their real
//! shapes — conv2d_frozen_bn_act's ReLU-mask x BN-scale pass, max_pool2d's backward
//! (the stem's 3x3/2 pool), the nearest-upsample backward (FPN top-down) and the
//! gradient accumulation (`add_into`). Prints the fastest and median of several runs
//! and the bytes each moves per second, beside a plain parallel copy of the same size.

use std::time::Instant;

use kestrel::autograd::{self, Tape};
use kestrel::ops::conv2d::Conv2dParams;
use kestrel::ops::elementwise::add_into;
use kestrel::ops::pool::{max_pool2d_backward, max_pool2d_with_indices, Pool2d};
use kestrel::ops::upsample::upsample_nearest_backward;
use kestrel::ops::{self, conv2d_frozen_bn_act};
use kestrel::Tensor;
use rayon::prelude::*;

const REPS: usize = 7;

fn rand(seed: u64, shape: &[usize]) -> Tensor {
    let n: usize = shape.iter().product();
    let mut r = kestrel::rng::Rng::new(seed);
    let v: Vec<f32> = (0..n).map(|_| r.range(-1.0, 1.0) as f32).collect();
    Tensor::from_vec(v, shape.to_vec()).unwrap()
}

/// Prints `name`: fastest and median milliseconds of `times` (seconds) and GB/s for
/// `bytes` moved per run.
fn report(name: &str, mut times: Vec<f64>, bytes: usize) {
    times.sort_by(f64::total_cmp);
    let (best, med) = (times[0], times[times.len() / 2]);
    println!(
        "{name:<48} best {:7.2} ms  median {:7.2} ms  {:6.1} GB/s",
        best * 1e3,
        med * 1e3,
        bytes as f64 / best / 1e9
    );
}

fn time(mut f: impl FnMut()) -> Vec<f64> {
    f();
    (0..REPS)
        .map(|_| {
            let t0 = Instant::now();
            f();
            t0.elapsed().as_secs_f64()
        })
        .collect()
}

/// A parallel copy of `n` f32 (read n, write n) into a reused buffer: the bandwidth
/// to compare with.
fn copy_reference(n: usize) {
    let src = vec![1.0f32; n];
    let mut dst = vec![0.0f32; n];
    let t = time(|| {
        dst.par_chunks_mut(1 << 16)
            .zip(src.par_chunks(1 << 16))
            .for_each(|(d, s)| d.copy_from_slice(s));
    });
    report(&format!("copy {n} f32 (reference)"), t, 8 * n);
}

/// The mask pass of conv2d_frozen_bn_act's backward (its `.mask` row), through a 1x1
/// convolution from one input channel so the convolution's own backward is cheap.
fn mask(c: usize, h: usize, w: usize, residual: bool, relu: bool) {
    let x = rand(1, &[1, 1, h, w]);
    let wt = rand(2, &[c, 1, 1, 1]);
    let scale = rand(3, &[c]);
    let shift = rand(4, &[c]);
    let res = rand(5, &[1, c, h, w]);
    let gy = rand(6, &[1, c, h, w]);
    let p = Conv2dParams::default();
    autograd::set_op_timing(true);
    let mut t = Vec::new();
    for _ in 0..=REPS {
        let tape = Tape::new();
        tape.watch(&x);
        tape.watch(&wt);
        if residual {
            tape.watch(&res);
        }
        let y = {
            let _g = tape.activate();
            conv2d_frozen_bn_act(
                &x,
                &wt,
                (&scale, &shift),
                residual.then_some(&res),
                relu,
                &p,
            )
            .unwrap()
        };
        autograd::take_op_times();
        drop(tape.backward_with(&y, gy.clone()).unwrap());
        let times = autograd::take_op_times();
        let (_, _, s) = times
            .iter()
            .find(|e| e.0 == "conv2d_frozen_bn_act.mask")
            .copied()
            .unwrap();
        t.push(s);
    }
    autograd::set_op_timing(false);
    t.remove(0);
    let n = c * h * w;
    let streams = if residual && relu { 4 } else { 3 };
    report(
        &format!("mask {c}x{h}x{w} residual={residual} relu={relu}"),
        t,
        4 * n * streams,
    );
}

fn max_pool_backward(c: usize, h: usize, w: usize, k: usize, s: usize, pad: usize) {
    let x = rand(7, &[1, c, h, w]);
    let (y, idx) = max_pool2d_with_indices(&x, k, s, pad).unwrap();
    let gy = rand(8, y.dims());
    let p = Pool2d::new(k, s, pad);
    let t = time(|| drop(max_pool2d_backward(&gy, &idx, x.shape(), p).unwrap()));
    let bytes = 4 * x.numel() + 12 * y.numel();
    report(
        &format!("max_pool2d backward {c}x{h}x{w} {k}/{s}/{pad}"),
        t,
        bytes,
    );
}

fn upsample_backward(c: usize, h: usize, w: usize) {
    let gy = rand(9, &[1, c, 2 * h, 2 * w]);
    let t = time(|| drop(upsample_nearest_backward(&gy, &[1, c, h, w]).unwrap()));
    report(
        &format!(
            "upsample_nearest backward {c}x{}x{} -> {h}x{w}",
            2 * h,
            2 * w
        ),
        t,
        4 * (gy.numel() + c * h * w),
    );
}

fn accumulate(c: usize, h: usize, w: usize) {
    let b = rand(10, &[1, c, h, w]);
    let mut acc = Some(rand(11, &[1, c, h, w]));
    let t = time(|| acc = Some(add_into(acc.take().unwrap(), &b).unwrap()));
    report(&format!("add_into {c}x{h}x{w}"), t, 12 * b.numel());
    // Shared `a` (another holder): the fresh-buffer path.
    let a = rand(11, &[1, c, h, w]);
    let t = time(|| drop(add_into(a.clone(), &b).unwrap()));
    report(
        &format!("add_into {c}x{h}x{w} (a shared)"),
        t,
        12 * b.numel(),
    );
    let t = time(|| drop(ops::add(&a, &b).unwrap()));
    report(&format!("add {c}x{h}x{w}"), t, 12 * b.numel());
}

#[test]
#[ignore = "timing: prints the memory-bound backward passes at R50-FPN's shapes"]
fn backward_passes_timing() {
    println!("rayon threads: {}", rayon::current_num_threads());
    copy_reference(256 * 200 * 304);
    mask(256, 200, 304, true, true);
    mask(64, 200, 304, false, true);
    mask(256, 200, 304, false, false);
    mask(64, 400, 608, false, true);
    mask(512, 100, 152, true, true);
    max_pool_backward(64, 400, 608, 3, 2, 1);
    max_pool_backward(256, 25, 38, 1, 2, 0);
    upsample_backward(256, 100, 152);
    upsample_backward(256, 50, 76);
    upsample_backward(256, 25, 38);
    accumulate(256, 200, 304);
    accumulate(64, 200, 304);
}
