//! The RPN losses on the CPU (src/detection/rpn.rs `losses_cpu_sampled`: matching in
//! one IoU sweep, the losses over the sampled anchors read from the head's level
//! maps, gradients scattered into zeroed maps) against the dense formulation the
//! CUDA code path keeps (per-anchor weights, on the emulated device): the same
//! labels, matches and picks, the same losses and gradients, on batches with
//! several matching chunks (24 480 anchors), an image without gt and a gt clear of
//! every anchor. The ignored `stage_cpu_time` times the training proposal stage at
//! R50-FPN size (CPU time, for A/B runs). About 3 s in the test profile.

mod common;

use common::{emulated, floats, ints, on};
use kestrel::autograd::Tape;
use kestrel::detection::matcher::Matcher;
use kestrel::detection::rpn::{Rpn, RpnConfig, RpnHeadOutput};
use kestrel::detection::targets::{
    match_labels, sample, Candidates, LabelMode, PackedTargets, SampleSpec, STAGE_RPN,
};
use kestrel::detection::Target;
use kestrel::rng::Rng;
use kestrel::{ops, Device, Tensor};

/// P2..P6 of a 256 x 384 image.
const GRIDS: [(usize, usize); 5] = [(64, 96), (32, 48), (16, 24), (8, 12), (4, 6)];

fn head(rng: &mut Rng, n: usize, grids: &[(usize, usize)]) -> RpnHeadOutput {
    let mut t = |shape: [usize; 4], scale: f64, shift: f64| {
        let v: Vec<f32> = (0..shape.iter().product())
            .map(|_| (rng.normal() * scale + shift) as f32)
            .collect();
        Tensor::from_vec(v, shape).unwrap()
    };
    let (mut objectness, mut deltas) = (Vec::new(), Vec::new());
    for &(h, w) in grids {
        objectness.push(t([n, 3, h, w], 2.5, -2.0));
        deltas.push(t([n, 12, h, w], 0.3, 0.0));
    }
    RpnHeadOutput { objectness, deltas }
}

fn boxes(rng: &mut Rng, k: usize, (h, w): (f64, f64)) -> Target {
    let mut b = Vec::new();
    for _ in 0..k {
        let (bw, bh) = (rng.range(8.0, 200.0), rng.range(8.0, 160.0));
        let (x, y) = (rng.range(0.0, w - bw), rng.range(0.0, h - bh));
        b.push([x as f32, y as f32, (x + bw) as f32, (y + bh) as f32]);
    }
    Target {
        labels: vec![1; b.len()],
        boxes: b,
    }
}

/// Losses and the gradients of their sum into every head map.
fn losses_and_grads(
    rpn: &Rpn,
    head: &RpnHeadOutput,
    anchors: &Tensor,
    targets: &[Target],
    seed: u64,
    device: Device,
) -> ([f32; 2], Vec<Vec<f32>>) {
    let maps: Vec<Tensor> = head
        .objectness
        .iter()
        .chain(&head.deltas)
        .map(|t| on(t, device))
        .collect();
    let l = head.objectness.len();
    let h = RpnHeadOutput {
        objectness: maps[..l].to_vec(),
        deltas: maps[l..].to_vec(),
    };
    let tg = PackedTargets::new(targets, device).unwrap();
    let tape = Tape::new();
    maps.iter().for_each(|m| tape.watch(m));
    let (lo, lb) = {
        let _g = tape.activate();
        rpn.losses(&h, &on(anchors, device), &tg, seed).unwrap()
    };
    let total = {
        let _g = tape.activate();
        ops::add(&lo, &lb).unwrap()
    };
    let grads = tape.backward(&total).unwrap();
    let g = maps
        .iter()
        .map(|m| floats(&grads.expect(m).unwrap().to_device(Device::Cpu).unwrap()))
        .collect();
    let v = |t: &Tensor| floats(&t.to_device(Device::Cpu).unwrap())[0];
    ([v(&lo), v(&lb)], g)
}

fn close(a: f32, b: f32) -> bool {
    (a - b).abs() <= 1e-5 * a.abs().max(b.abs()) + 1e-7
}

#[test]
fn sampled_losses_equal_dense_device_losses() {
    let dev = emulated();
    let mut rng = Rng::new(0x7e6);
    let mut cfg = RpnConfig::default();
    let image = (256.0, 384.0);
    for case in 0..3 {
        cfg.batch_size_per_image = [256, 64, 512][case];
        let rpn = Rpn::new(8, cfg.clone()).unwrap();
        let anchors = rpn.anchors((256, 384), &GRIDS, Device::Cpu).unwrap();
        let h = head(&mut rng, 2, &GRIDS);
        let mut targets = vec![boxes(&mut rng, 4, image), boxes(&mut rng, 2, image)];
        match case {
            // An image without gt: negatives only.
            1 => targets[1] = boxes(&mut rng, 0, image),
            // A gt clear of every anchor: its maximum IoU is 0 and every anchor at
            // 0 is a low-quality match.
            2 => targets[0].boxes.push([2000.0, 2000.0, 2100.0, 2100.0]),
            _ => {}
        }
        let g0 = targets[0].boxes.len();
        targets[0].labels.resize(g0, 1);
        let seed = rng.next_u64();
        let (lc, gc) = losses_and_grads(&rpn, &h, &anchors, &targets, seed, Device::Cpu);
        let (ld, gd) = losses_and_grads(&rpn, &h, &anchors, &targets, seed, dev);
        for i in 0..2 {
            assert!(
                close(lc[i], ld[i]),
                "case {case} loss {i}: cpu {} dense {}",
                lc[i],
                ld[i]
            );
            assert!(lc[i].is_finite() && lc[i] >= 0.0, "case {case} loss {i}");
        }
        let mut sampled = 0;
        for (k, (c, d)) in gc.iter().zip(&gd).enumerate() {
            assert_eq!(c.len(), d.len());
            for (e, (&x, &y)) in c.iter().zip(d).enumerate() {
                assert!(
                    close(x, y),
                    "case {case} map {k} element {e}: cpu {x} dense {y}"
                );
            }
            if k < GRIDS.len() {
                sampled += c.iter().filter(|&&x| x != 0.0).count();
            }
        }
        // Every sampled anchor has a nonzero BCE gradient (finite logits).
        let want = 2 * cfg.batch_size_per_image;
        assert!(
            sampled > 0 && sampled <= want,
            "case {case}: {sampled} sampled"
        );
    }
}

/// The one-sweep CPU matching against the device's two kernels on many chunks,
/// with ties (duplicate anchors) and a gt whose maximum IoU is 0.
#[test]
fn chunked_matching_equals_device() {
    let dev = emulated();
    let mut rng = Rng::new(0x3a7);
    let rpn = Rpn::new(8, RpnConfig::default()).unwrap();
    let grid = rpn.anchors((256, 384), &GRIDS, Device::Cpu).unwrap();
    // The anchors twice: every maximum is reached at least twice, chunks apart.
    let a = grid.dims()[0];
    let twice = ops::concat(&[&grid, &grid], 0).unwrap();
    let mut t0 = boxes(&mut rng, 5, (256.0, 384.0));
    t0.boxes.push([2000.0, 2000.0, 2100.0, 2100.0]);
    t0.labels.push(3);
    let targets = vec![
        t0,
        boxes(&mut rng, 0, (256.0, 384.0)),
        boxes(&mut rng, 3, (256.0, 384.0)),
    ];
    for matcher in [Matcher::new(0.7, 0.3, true), Matcher::new(0.5, 0.5, false)] {
        let matcher = matcher.unwrap();
        let run = |device: Device| {
            let tg = PackedTargets::new(&targets, device).unwrap();
            let anc = on(&twice, device);
            let cands = Candidates {
                boxes: &anc,
                stride: 0,
                counts: None,
                slots: 2 * a,
                append_gt: false,
            };
            let m = match_labels(&tg, &cands, &matcher, LabelMode::Class).unwrap();
            let (sel, counts) = sample(
                &m.labels,
                3,
                SampleSpec::new(256, 0.5).unwrap(),
                11,
                STAGE_RPN,
            )
            .unwrap();
            [ints(&m.labels), ints(&m.matched), ints(&sel), ints(&counts)]
        };
        let (c, d) = (run(Device::Cpu), run(dev));
        for (i, (x, y)) in c.iter().zip(&d).enumerate() {
            assert!(x == y, "output {i} ({matcher:?}) differs from the device");
        }
        // The far gt's maximum IoU is 0: with low-quality matches every anchor of
        // image 0 clear of all its gt gets its own best gt back (foreground).
        let fg = c[0][..2 * a].iter().filter(|&&l| l >= 1).count();
        assert_eq!(fg > a, matcher.allow_low_quality_matches, "{fg} foreground");
    }
}

/// CPU time (user + sys of the process) of the training proposal stage at R50-FPN
/// size: proposals (training settings), targets, the RPN losses and their backward
/// into the head maps. `cargo test --release --test rpn_sampled_losses -- --ignored
/// --nocapture`; batches from KESTREL_STAGE_BATCH (default 1,2).
#[test]
#[ignore = "timing, not a check"]
fn stage_cpu_time() {
    const R50: [(usize, usize); 5] = [(200, 304), (100, 152), (50, 76), (25, 38), (13, 19)];
    let batches = std::env::var("KESTREL_STAGE_BATCH").unwrap_or_else(|_| "1,2".into());
    let rpn = Rpn::new(256, RpnConfig::default()).unwrap();
    let anchors = rpn.anchors((800, 1216), &R50, Device::Cpu).unwrap();
    for n in batches.split(',').map(|b| b.parse::<usize>().unwrap()) {
        let mut rng = Rng::new(5);
        let h = head(&mut rng, n, &R50);
        let targets: Vec<Target> = (0..n)
            .map(|_| boxes(&mut rng, 4, (800.0, 1216.0)))
            .collect();
        let sizes = vec![(800, 1216); n];
        let mut times = Vec::new();
        for it in 0..6 {
            let tape = Tape::new();
            h.objectness
                .iter()
                .chain(&h.deltas)
                .for_each(|m| tape.watch(m));
            let (c0, w0) = (common::cpu_seconds(), std::time::Instant::now());
            let _g = tape.activate();
            let sel =
                kestrel::autograd::no_grad(|| rpn.proposals_padded(&h, &anchors, &sizes, true))
                    .unwrap();
            let ca = common::cpu_seconds();
            let tg = PackedTargets::new(&targets, Device::Cpu).unwrap();
            let (lo, lb) = rpn.losses(&h, &anchors, &tg, it).unwrap();
            let total = ops::add(&lo, &lb).unwrap();
            let (c1, w1) = (common::cpu_seconds(), std::time::Instant::now());
            drop(_g);
            let grads = tape.backward(&total).unwrap();
            let (c2, w2) = (common::cpu_seconds(), std::time::Instant::now());
            std::hint::black_box((sel, grads));
            if it > 0 {
                times.push([
                    (ca - c0) * 1e3,
                    (c1 - c0) * 1e3,
                    (c2 - c1) * 1e3,
                    (w1 - w0).as_secs_f64() * 1e3,
                    (w2 - w1).as_secs_f64() * 1e3,
                ]);
            }
        }
        let med = |k: usize| {
            let mut v: Vec<f64> = times.iter().map(|t| t[k]).collect();
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        println!(
            "stage b{n}: forward cpu {:.1} ms (wall {:.1}; proposals cpu {:.1}), backward cpu {:.1} ms (wall {:.1}), median of {}",
            med(1),
            med(3),
            med(0),
            med(2),
            med(4),
            times.len()
        );
    }
}
