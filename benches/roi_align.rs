//! RoIAlign benches at Faster R-CNN's box-head size: 1000 RoIs x 256 channels x 7x7,
//! sampling_ratio 2, on an 800x1216 image's FPN maps (P2 = 1x256x200x304 ... P5 =
//! 1x256x25x38). CPU always; CUDA when device 0 opens.
//!
//! `cargo bench --bench roi_align`

mod common;

use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use kestrel::detection::poolers::MultiScaleRoIAlign;
use kestrel::ops::roi_align::{roi_align, roi_align_backward, RoiAlignParams};
use kestrel::rng::Rng;
use kestrel::{Device, Tensor};

const IMAGE: (usize, usize) = (800, 1216);
const ROIS: usize = 1000;
const CHANNELS: usize = 256;

/// Boxes (x1, y1, x2, y2) in image pixels, sides 8..600, clipped to the image: a spread
/// over all four pyramid levels like an RPN's proposals.
fn boxes(seed: u64) -> Vec<f32> {
    let mut rng = Rng::new(seed);
    let (h, w) = (IMAGE.0 as f64, IMAGE.1 as f64);
    (0..ROIS)
        .flat_map(|_| {
            let side = 8.0 * 75f64.powf(rng.uniform()); // log-uniform in [8, 600]
            let (bw, bh) = (side * rng.range(0.5, 2.0), side);
            let (x1, y1) = (rng.range(0.0, w - 1.0), rng.range(0.0, h - 1.0));
            [x1, y1, (x1 + bw).min(w), (y1 + bh).min(h)].map(|v| v as f32)
        })
        .collect()
}

fn feature(seed: u64, h: usize, w: usize) -> Tensor {
    let mut rng = Rng::new(seed);
    let v: Vec<f32> = (0..CHANNELS * h * w)
        .map(|_| rng.range(-1.0, 1.0) as f32)
        .collect();
    Tensor::from_vec(v, [1, CHANNELS, h, w]).expect("sizes match")
}

fn bench_device(c: &mut Criterion, dev: Device, name: &str) {
    let b = boxes(1);
    let rois: Vec<f32> = b
        .chunks(4)
        .flat_map(|r| [0.0, r[0], r[1], r[2], r[3]])
        .collect();
    let rois = Tensor::from_vec(rois, [ROIS, 5])
        .unwrap()
        .to_device(dev)
        .unwrap();
    let sizes = [(200, 304), (100, 152), (50, 76), (25, 38)];
    let feats: Vec<Tensor> = sizes
        .iter()
        .enumerate()
        .map(|(i, &(h, w))| feature(10 + i as u64, h, w).to_device(dev).unwrap())
        .collect();
    let p = RoiAlignParams::new((7, 7), 0.25, 2);
    let gy = Tensor::full([ROIS, CHANNELS, 7, 7], 0.5, kestrel::DType::F32, dev).unwrap();
    let dims = [1, CHANNELS, 200, 304];

    c.bench_function(&format!("roi_align/{name}/fwd_1000x256x7x7_p2"), |bch| {
        bch.iter(|| {
            let y = roi_align(&feats[0], &rois, p).unwrap();
            common::sync(dev);
            y
        })
    });
    c.bench_function(&format!("roi_align/{name}/bwd_1000x256x7x7_p2"), |bch| {
        bch.iter(|| {
            let gx = roi_align_backward(&gy, &rois, dims, p).unwrap();
            common::sync(dev);
            gx
        })
    });
    c.bench_function(
        &format!("roi_align/{name}/fwd_bwd_1000x256x7x7_p2"),
        |bch| {
            bch.iter(|| {
                let y = roi_align(&feats[0], &rois, p).unwrap();
                let gx = roi_align_backward(&gy, &rois, dims, p).unwrap();
                common::sync(dev);
                (y, gx)
            })
        },
    );

    let m = MultiScaleRoIAlign::new((7, 7), 2);
    let props = [Tensor::from_vec(b, [ROIS, 4])
        .unwrap()
        .to_device(dev)
        .unwrap()];
    let image_sizes = [IMAGE];
    c.bench_function(
        &format!("multiscale_roi_align/{name}/fwd_1000x256x7x7_p2-p5"),
        |bch| {
            bch.iter(|| {
                let y = m.forward(&feats, &props, &image_sizes).unwrap();
                common::sync(dev);
                y
            })
        },
    );
    c.bench_function(
        &format!("multiscale_roi_align/{name}/bwd_1000x256x7x7_p2-p5"),
        |bch| {
            bch.iter(|| {
                let gs = m.backward(&gy, &feats, &props, &image_sizes).unwrap();
                common::sync(dev);
                gs
            })
        },
    );
}

fn benches(c: &mut Criterion) {
    bench_device(c, Device::Cpu, "cpu");
    if kestrel::device::gpu::device(0).is_ok() {
        bench_device(c, Device::Cuda(0), "cuda");
    }
}

criterion_group! {
    name = roi_align_benches;
    // Small samples: each iteration is tens to hundreds of milliseconds on the CPU.
    config = Criterion::default().sample_size(10).measurement_time(Duration::from_secs(4));
    targets = benches
}
criterion_main!(roi_align_benches);
