//! Detection benches: NMS, top-k, anchors, box decoding, the RPN proposal stage, on the CPU and (when one is
//! present) CUDA. Names: `<op>/<device>/<shape>`.
//!
//! `cargo bench --bench detection` (filter with e.g. `-- nms/cpu`).

mod common;

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use kestrel::detection::anchors::AnchorGenerator;
use kestrel::detection::box_coder::BoxCoder;
use kestrel::detection::rpn::{Rpn, RpnConfig, RpnHeadOutput};
use kestrel::ops::{nms, topk};
use kestrel::rng::Rng;
use kestrel::{Device, Tensor};

/// `n` boxes clustered like a detector's raw outputs on a 1216 x 800 image: about
/// one object per 50 boxes, object sizes log-uniform in 16..400 pixels, each output
/// a jittered copy of its object's box; scores in [0, 1).
pub fn detector_like_boxes(seed: u64, n: usize) -> (Vec<f32>, Vec<f32>) {
    let mut r = Rng::new(seed);
    let objects: Vec<[f64; 4]> = (0..(n / 50).max(1))
        .map(|_| {
            let (w, h) = (
                (r.range(16f64.ln(), 400f64.ln())).exp(),
                (r.range(16f64.ln(), 400f64.ln())).exp(),
            );
            [r.range(0.0, 1216.0), r.range(0.0, 800.0), w, h]
        })
        .collect();
    let mut boxes = Vec::with_capacity(4 * n);
    let mut scores = Vec::with_capacity(n);
    for _ in 0..n {
        let [cx, cy, w, h] = objects[r.below(objects.len() as u64) as usize];
        let (cx, cy) = (cx + 0.1 * w * r.normal(), cy + 0.1 * h * r.normal());
        let (w, h) = (w * r.range(0.8, 1.25), h * r.range(0.8, 1.25));
        boxes.extend_from_slice(&[
            (cx - w / 2.0) as f32,
            (cy - h / 2.0) as f32,
            (cx + w / 2.0) as f32,
            (cy + h / 2.0) as f32,
        ]);
        scores.push(r.uniform() as f32);
    }
    (boxes, scores)
}

fn bench_nms(c: &mut Criterion) {
    for device in common::devices() {
        for n in [1000usize, 5000, 20000, 100_000] {
            let (b, s) = detector_like_boxes(n as u64, n);
            let boxes = Tensor::from_vec(b, [n, 4])
                .unwrap()
                .to_device(device)
                .unwrap();
            let scores = Tensor::from_vec(s, [n]).unwrap().to_device(device).unwrap();
            let mut g = c.benchmark_group(format!("nms/{device}"));
            if n >= 20000 {
                g.sample_size(10).measurement_time(Duration::from_secs(5));
            }
            g.bench_function(format!("{n}"), |bch| {
                bch.iter(|| {
                    let out = nms::nms_device(&boxes, &scores, None, 0.7).unwrap();
                    common::sync(device);
                    black_box(out)
                })
            });
            g.finish();
        }
    }
}

/// FPN grids of an 800 x 1216 image (P2..P6): 242,991 anchors with 3 per location.
const GRIDS_800X1216: [(usize, usize); 5] = [(200, 304), (100, 152), (50, 76), (25, 38), (13, 19)];

fn level_sizes() -> Vec<usize> {
    GRIDS_800X1216.iter().map(|(h, w)| h * w * 3).collect()
}

fn bench_topk(c: &mut Criterion) {
    let levels = level_sizes();
    let a: usize = levels.iter().sum();
    let mut r = Rng::new(7);
    for device in common::devices() {
        let mut g = c.benchmark_group(format!("topk_levels/{device}"));
        for batch in [1usize, 2] {
            let scores: Vec<f32> = (0..batch * a).map(|_| r.normal() as f32 * 3.0).collect();
            let x = Tensor::from_vec(scores, [batch, a])
                .unwrap()
                .to_device(device)
                .unwrap();
            g.bench_function(format!("{batch}x{a}_k1000"), |bch| {
                bch.iter(|| {
                    let out = topk::topk_levels(&x, &levels, 1000).unwrap();
                    common::sync(device);
                    black_box(out)
                })
            });
        }
        g.finish();
    }
}

fn bench_anchors(c: &mut Criterion) {
    let gen = AnchorGenerator::fpn_default();
    for device in common::devices() {
        c.bench_function(&format!("anchors/{device}/800x1216"), |bch| {
            bch.iter(|| {
                let out = gen.anchors((800, 1216), &GRIDS_800X1216, device).unwrap();
                common::sync(device);
                black_box(out)
            })
        });
    }
}

fn bench_decode(c: &mut Criterion) {
    let a: usize = level_sizes().iter().sum();
    let gen = AnchorGenerator::fpn_default();
    let coder = BoxCoder::new([1.0; 4]);
    let mut r = Rng::new(8);
    let deltas: Vec<f32> = (0..4 * a).map(|_| r.normal() as f32 * 0.5).collect();
    for device in common::devices() {
        let anchors = gen.anchors((800, 1216), &GRIDS_800X1216, device).unwrap();
        let d = Tensor::from_vec(deltas.clone(), [a, 4])
            .unwrap()
            .to_device(device)
            .unwrap();
        c.bench_function(&format!("box_decode/{device}/{a}"), |bch| {
            bch.iter(|| {
                let out = coder.decode(&d, &anchors).unwrap();
                common::sync(device);
                black_box(out)
            })
        });
    }
}

/// The RPN head outputs of a batch at 800 x 1216 (P2..P6, 3 anchors per location):
/// objectness logits mostly negative with a tail of confident ones, deltas of a
/// trained head's spread.
fn rpn_head_800x1216(batch: usize, seed: u64, device: Device) -> RpnHeadOutput {
    let mut r = Rng::new(seed);
    let mut t = |shape: [usize; 4], f: &mut dyn FnMut(&mut Rng) -> f32| {
        let v: Vec<f32> = (0..shape.iter().product()).map(|_| f(&mut r)).collect();
        Tensor::from_vec(v, shape)
            .unwrap()
            .to_device(device)
            .unwrap()
    };
    let (mut objectness, mut deltas) = (Vec::new(), Vec::new());
    for &(h, w) in &GRIDS_800X1216 {
        objectness.push(t([batch, 3, h, w], &mut |r| {
            (r.normal() * 2.5 - 4.0) as f32
        }));
        deltas.push(t([batch, 12, h, w], &mut |r| (r.normal() * 0.3) as f32));
    }
    RpnHeadOutput { objectness, deltas }
}

/// The whole proposal stage of a batch of 2 (test mode: 1000 per level, NMS 0.7,
/// 1000 per image), padded outputs, no read back.
fn bench_proposals(c: &mut Criterion) {
    let rpn = Rpn::new(256, RpnConfig::default()).unwrap();
    for device in common::devices() {
        let head = rpn_head_800x1216(2, 9, device);
        let anchors = rpn.anchors((800, 1216), &GRIDS_800X1216, device).unwrap();
        let sizes = [(800, 1216), (800, 1216)];
        c.bench_function(&format!("proposals/{device}/batch2_800x1216"), |bch| {
            bch.iter(|| {
                let out = rpn
                    .proposals_padded(&head, &anchors, &sizes, false)
                    .unwrap();
                common::sync(device);
                black_box(out)
            })
        });
    }
}

criterion_group!(
    benches,
    bench_nms,
    bench_topk,
    bench_anchors,
    bench_decode,
    bench_proposals
);
criterion_main!(benches);
