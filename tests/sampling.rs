//! Matching, sampling and training targets of a batch (kernels/sampling.cu,
//! src/detection/targets.rs): the device picks exactly what the CPU picks (same
//! Philox keys) on many random batches, including images with fewer positives than
//! wanted, images without gt and all-ignored anchors; the matching agrees with the
//! per-image box_iou + Matcher path (itself checked against torchvision); the picks
//! are the k smallest Philox keys computed here independently; sampling is uniform
//! enough and the Philox function matches Random123's known answers.

mod common;

use kestrel::detection::matcher::Matcher;
use kestrel::detection::targets::{
    match_labels, roi_gather, roi_loss_inputs, rpn_targets, sample, Candidates, LabelMode,
    PackedTargets, SampleSpec, STAGE_ROI, STAGE_RPN,
};
use kestrel::detection::Target;
use kestrel::ops::boxes::box_iou;
use kestrel::rng::{philox4x32_10, philox_sample_key, Rng};
use kestrel::{Device, Tensor};

fn rand_box(rng: &mut Rng, w: f64, h: f64) -> [f32; 4] {
    let bw = rng.range(4.0, w / 2.0);
    let bh = rng.range(4.0, h / 2.0);
    let x = rng.range(0.0, w - bw);
    let y = rng.range(0.0, h - bh);
    [x as f32, y as f32, (x + bw) as f32, (y + bh) as f32]
}

/// A random batch: `n` images with 0..=`max_g` gt boxes each (classes 1..=5), and
/// `a` anchors, some of them copies of gt boxes so that positives exist.
fn random_case(rng: &mut Rng, n: usize, max_g: usize, a: usize) -> (Vec<Target>, Vec<f32>) {
    let targets: Vec<Target> = (0..n)
        .map(|_| {
            let g = rng.below(max_g as u64 + 1) as usize;
            Target {
                boxes: (0..g).map(|_| rand_box(rng, 200.0, 160.0)).collect(),
                labels: (0..g).map(|_| 1 + rng.below(5) as i64).collect(),
            }
        })
        .collect();
    let mut anchors = Vec::new();
    for j in 0..a {
        let b = match targets.get(j % n.max(1)).and_then(|t| t.boxes.first()) {
            Some(b) if j % 7 == 0 => {
                // A jittered copy of a gt box: IoU near 1.
                let d = rng.range(-1.0, 1.0) as f32;
                [b[0] + d, b[1], b[2] + d, b[3]]
            }
            _ => rand_box(rng, 200.0, 160.0),
        };
        anchors.extend(b);
    }
    (targets, anchors)
}

fn ints(t: &Tensor) -> Vec<i64> {
    t.to_vec_i64().unwrap()
}
fn floats(t: &Tensor) -> Vec<f32> {
    t.to_vec::<f32>().unwrap()
}

/// Every stage of both heads on `device` and on the CPU for one random batch.
struct Outcome {
    rpn: Vec<Vec<i64>>,
    rpn_f: Vec<Vec<f32>>,
    roi: Vec<Vec<i64>>,
    roi_f: Vec<Vec<f32>>,
}

fn run_case(
    device: Device,
    targets: &[Target],
    anchors: &[f32],
    props: &[Vec<f32>],
    spec: SampleSpec,
    matcher: (&Matcher, &Matcher),
    seed: u64,
) -> Outcome {
    let n = targets.len();
    let tg = PackedTargets::new(targets, device).unwrap();
    let a = anchors.len() / 4;
    let anc = Tensor::from_vec(anchors.to_vec(), [a, 4])
        .unwrap()
        .to_device(device)
        .unwrap();
    let cands = Candidates {
        boxes: &anc,
        stride: 0,
        counts: None,
        slots: a,
        append_gt: false,
    };
    let m = match_labels(&tg, &cands, matcher.0, LabelMode::Objectness).unwrap();
    let (sel, counts) = sample(&m.labels, n, spec, seed, STAGE_RPN).unwrap();
    let t = rpn_targets(&tg, &anc, &sel, &m.matched, &counts).unwrap();
    let rpn = vec![ints(&m.labels), ints(&m.matched), ints(&sel), ints(&counts)];
    let rpn_f = [
        &t.objectness,
        &t.objectness_weight,
        &t.box_weight,
        &t.gt_boxes,
        &t.anchor_boxes,
    ]
    .iter()
    .map(|x| floats(x))
    .collect();

    // RoI stage: padded proposals, appended gt.
    let p = props.iter().map(|v| v.len() / 4).max().unwrap_or(0);
    let mut flat = Vec::new();
    for v in props {
        flat.extend_from_slice(v);
        flat.extend([0.0f32, 0.0, 1.0, 1.0].repeat(p - v.len() / 4));
    }
    let pb = Tensor::from_vec(flat, [n, p, 4])
        .unwrap()
        .to_device(device)
        .unwrap();
    let pc = Tensor::from_vec_i64(props.iter().map(|v| (v.len() / 4) as i64).collect(), [n])
        .unwrap()
        .to_device(device)
        .unwrap();
    let cands = Candidates {
        boxes: &pb,
        stride: 4 * p,
        counts: Some(&pc),
        slots: p,
        append_gt: true,
    };
    let m = match_labels(&tg, &cands, matcher.1, LabelMode::Class).unwrap();
    let (sel, counts2) = sample(&m.labels, n, spec, seed, STAGE_ROI).unwrap();
    let cap = spec.batch.min(cands.len(&tg));
    let g = roi_gather(&tg, &cands, &sel, &m, cap).unwrap();
    // Targets: encode is box_coder's own (tested there); use fixed codes here so the
    // weights kernel's masking is what is compared.
    let codes: Vec<f32> = (0..4 * n * cap).map(|i| i as f32 * 0.5 - 3.0).collect();
    let codes = Tensor::from_vec(codes, [n * cap, 4])
        .unwrap()
        .to_device(device)
        .unwrap();
    let li = roi_loss_inputs(&g, &codes, n, cap, 6).unwrap();
    let roi = vec![
        ints(&m.labels),
        ints(&m.matched),
        ints(&sel),
        ints(&counts2),
        ints(&g.labels),
        ints(&g.counts),
        ints(&li.rows),
    ];
    let roi_f = [
        &g.rois,
        &g.gt_boxes,
        &li.class_weight,
        &li.box_weight,
        &li.box_target,
    ]
    .iter()
    .map(|x| floats(x))
    .collect();
    Outcome {
        rpn,
        rpn_f,
        roi,
        roi_f,
    }
}

fn random_props(rng: &mut Rng, n: usize, max_p: usize) -> Vec<Vec<f32>> {
    (0..n)
        .map(|_| {
            let k = rng.below(max_p as u64 + 1) as usize;
            (0..k).flat_map(|_| rand_box(rng, 200.0, 160.0)).collect()
        })
        .collect()
}

/// 40 random batches: the device's integers and floats equal the CPU's bit for bit,
/// and the corners were reached.
fn check_device_equals_cpu(device: Device) {
    let mut rng = Rng::new(0x5a3e);
    let rpn_m = Matcher::new(0.7, 0.3, true).unwrap();
    let roi_m = Matcher::new(0.5, 0.5, false).unwrap();
    let (mut short_pos, mut no_gt, mut drew, mut all_ignored) = (0, 0, 0, 0);
    for case in 0..40 {
        let n = 1 + rng.below(3) as usize;
        let a = 50 + rng.below(400) as usize;
        let (targets, anchors) = random_case(&mut rng, n, 6, a);
        let props = random_props(&mut rng, n, 60);
        let spec = SampleSpec::new(1 + rng.below(64) as usize, rng.range(0.1, 0.9)).unwrap();
        // Every fifth case: thresholds that leave every anchor between (ignored).
        let ignore_all = Matcher::new(1.0, 0.0, false).unwrap();
        let m = if case % 5 == 4 {
            (&ignore_all, &ignore_all)
        } else {
            (&rpn_m, &roi_m)
        };
        let seed = rng.next_u64();
        let cpu = run_case(Device::Cpu, &targets, &anchors, &props, spec, m, seed);
        let dev = run_case(device, &targets, &anchors, &props, spec, m, seed);
        assert_eq!(cpu.rpn, dev.rpn, "case {case}: RPN labels/matches/picks");
        assert_eq!(cpu.roi, dev.roi, "case {case}: RoI labels/matches/picks");
        for (i, (c, d)) in cpu.rpn_f.iter().zip(&dev.rpn_f).enumerate() {
            let same = c.iter().zip(d).all(|(x, y)| x.to_bits() == y.to_bits());
            assert!(same && c.len() == d.len(), "case {case}: RPN output {i}");
        }
        for (i, (c, d)) in cpu.roi_f.iter().zip(&dev.roi_f).enumerate() {
            let same = c.iter().zip(d).all(|(x, y)| x.to_bits() == y.to_bits());
            assert!(same && c.len() == d.len(), "case {case}: RoI output {i}");
        }
        let (labels, counts) = (&cpu.rpn[0], &cpu.rpn[3]);
        let a = anchors.len() / 4;
        for img in 0..n {
            let npos = labels[img * a..(img + 1) * a]
                .iter()
                .filter(|&&l| l >= 1)
                .count();
            if npos > 0 && npos < spec.want_pos {
                short_pos += 1;
            }
            if npos > spec.want_pos {
                drew += 1;
            }
            if targets[img].boxes.is_empty() {
                no_gt += 1;
            }
            if labels[img * a..(img + 1) * a].iter().all(|&l| l == -1) {
                all_ignored += 1;
                assert_eq!(counts[2 * img..2 * img + 2], [0, 0], "case {case}");
            }
        }
    }
    assert!(short_pos > 0, "no image had fewer positives than wanted");
    assert!(drew > 0, "no image drew positives at random");
    assert!(no_gt > 0, "no image without gt");
    assert!(all_ignored > 0, "no all-ignored image");
}

/// The batched matching against the per-image box_iou + Matcher path (checked
/// against torchvision in tests/matcher.rs), as labels.
fn check_matching_equals_matcher(device: Device) {
    let mut rng = Rng::new(17);
    let matcher = Matcher::new(0.7, 0.3, true).unwrap();
    for _ in 0..10 {
        let n = 2;
        let (targets, anchors) = random_case(&mut rng, n, 5, 300);
        let a = anchors.len() / 4;
        let tg = PackedTargets::new(&targets, device).unwrap();
        let anc = Tensor::from_vec(anchors, [a, 4])
            .unwrap()
            .to_device(device)
            .unwrap();
        let cands = Candidates {
            boxes: &anc,
            stride: 0,
            counts: None,
            slots: a,
            append_gt: false,
        };
        let m = match_labels(&tg, &cands, &matcher, LabelMode::Objectness).unwrap();
        let (labels, matched) = (ints(&m.labels), ints(&m.matched));
        let mut g0 = 0i64;
        for (img, t) in targets.iter().enumerate() {
            let g = t.boxes.len();
            let want: Vec<i64> = if g == 0 {
                vec![-1; a]
            } else {
                let gt = Tensor::from_vec(t.boxes.concat(), [g, 4])
                    .unwrap()
                    .to_device(device)
                    .unwrap();
                ints(&matcher.matches(&box_iou(&gt, &anc).unwrap()).unwrap())
            };
            for (j, &w) in want.iter().enumerate() {
                let e = img * a + j;
                let want_label = match w {
                    m if m >= 0 => 1,
                    -1 => 0,
                    _ => -1,
                };
                assert_eq!(labels[e], want_label, "image {img} anchor {j}");
                if w >= 0 {
                    assert_eq!(matched[e], g0 + w, "image {img} anchor {j}");
                }
            }
            g0 += g as i64;
        }
    }
}

/// The picks are the k members of smallest (Philox key, index), k = min(wanted,
/// members), computed here from the labels alone.
fn check_picks_are_smallest_keys(device: Device) {
    let mut rng = Rng::new(99);
    for case in 0..20 {
        let (n, l) = (2usize, 100 + rng.below(900) as usize);
        let labels: Vec<i64> = (0..n * l)
            .map(|_| match rng.below(10) {
                0 => 1 + rng.below(3) as i64,
                1..=6 => 0,
                _ => -1,
            })
            .collect();
        let spec = SampleSpec::new(8 + rng.below(120) as usize, 0.25).unwrap();
        let seed = rng.next_u64();
        let lt = Tensor::from_vec_i64(labels.clone(), [n * l])
            .unwrap()
            .to_device(device)
            .unwrap();
        let (sel, counts) = sample(&lt, n, spec, seed, STAGE_ROI).unwrap();
        let (sel, counts) = (ints(&sel), ints(&counts));
        for img in 0..n {
            let row = &labels[img * l..(img + 1) * l];
            let pick = |pos: bool, want: usize| -> Vec<usize> {
                let mut m: Vec<(u32, usize)> = (0..l)
                    .filter(|&j| if pos { row[j] >= 1 } else { row[j] == 0 })
                    .map(|j| (philox_sample_key(seed, img as u32, STAGE_ROI, j as u32), j))
                    .collect();
                m.sort();
                let mut v: Vec<usize> = m.into_iter().take(want).map(|(_, j)| j).collect();
                v.sort();
                v
            };
            let pos = pick(true, spec.want_pos);
            let neg = pick(false, spec.batch - pos.len());
            let got_pos: Vec<usize> = (0..l).filter(|&j| sel[img * l + j] == 1).collect();
            let got_neg: Vec<usize> = (0..l).filter(|&j| sel[img * l + j] == 0).collect();
            assert_eq!(got_pos, pos, "case {case} image {img} positives");
            assert_eq!(got_neg, neg, "case {case} image {img} negatives");
            assert_eq!(
                counts[2 * img..2 * img + 2],
                [pos.len() as i64, neg.len() as i64]
            );
        }
    }
}

crate::device_tests! {
    /// Device == CPU on 40 random batches (both stages).
    device_equals_cpu => check_device_equals_cpu;
    /// Batched matching == box_iou + Matcher per image.
    matching_equals_matcher => check_matching_equals_matcher;
    /// Picks == k smallest Philox keys.
    picks_are_smallest_keys => check_picks_are_smallest_keys;
}

/// Random123's known-answer vectors for philox4x32_10 (kat_vectors).
#[test]
fn philox_matches_random123_known_answers() {
    assert_eq!(
        philox4x32_10([0; 4], [0; 2]),
        [0x6627_e8d5, 0xe169_c58d, 0xbc57_ac4c, 0x9b00_dbd8]
    );
    assert_eq!(
        philox4x32_10([u32::MAX; 4], [u32::MAX; 2]),
        [0x408f_276d, 0x41c8_3b0e, 0xa20b_c7c6, 0x6d54_51fd]
    );
    assert_eq!(
        philox4x32_10(
            [0x243f_6a88, 0x85a3_08d3, 0x1319_8a2e, 0x0370_7344],
            [0xa409_3822, 0x299f_31d0]
        ),
        [0xd16c_fe09, 0x94fd_cceb, 0x5001_e420, 0x2412_6ea1]
    );
}

/// Each of 40 candidates is picked 10 of 40 times in about 1/4 of 4000 seeds
/// (binomial sd 27: a band of +-5 sd), and pairs are not tied together.
#[test]
fn sampling_is_uniform() {
    let (l, k, draws) = (40usize, 10usize, 4000u64);
    let labels = Tensor::from_vec_i64(vec![1; l], [l]).unwrap();
    let spec = SampleSpec {
        want_pos: k,
        batch: k,
    };
    let mut hits = vec![0u32; l];
    let mut both01 = 0u32;
    for seed in 0..draws {
        let (sel, _) = sample(&labels, 1, spec, seed, STAGE_RPN).unwrap();
        let sel = ints(&sel);
        for j in 0..l {
            hits[j] += (sel[j] == 1) as u32;
        }
        both01 += (sel[0] == 1 && sel[1] == 1) as u32;
    }
    for (j, &h) in hits.iter().enumerate() {
        assert!((865..=1135).contains(&h), "candidate {j}: {h} of {draws}");
    }
    // P(both) = (10/40)(9/39) = 0.0577: 231 expected, sd 15.
    assert!((156..=306).contains(&both01), "pair: {both01}");
}
