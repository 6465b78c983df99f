//! The balanced positive/negative sampler: balance, reproducibility, edge cases, and
//! labels made on a device (by the matcher kernel) sampled as on the host.

mod common;

use common::*;
use kestrel::detection::matcher::Matcher;
use kestrel::detection::sampler::{BalancedPositiveNegativeSampler, Sampled};
use kestrel::ops::boxes;
use kestrel::rng::Rng;
use kestrel::Device;

fn sampler_labels() -> Vec<i64> {
    // 10 positives (labels 1..3), 30 negatives, 10 ignored, interleaved.
    (0..50)
        .map(|i| match i % 5 {
            0 => 1 + (i / 5) % 3,
            1..=3 => 0,
            _ => -1,
        })
        .collect()
}

#[test]
fn sampler_takes_every_candidate_when_the_batch_allows() {
    let labels = sampler_labels();
    let s = BalancedPositiveNegativeSampler::new(1_000_000, 0.5).unwrap();
    let mut rng = Rng::new(5);
    let got = s.sample(&i64_t(labels.clone()), &mut rng).unwrap();
    let pos: Vec<i64> = (0..50).filter(|&i| labels[i as usize] >= 1).collect();
    let neg: Vec<i64> = (0..50).filter(|&i| labels[i as usize] == 0).collect();
    assert_eq!(
        got,
        Sampled {
            positive: pos,
            negative: neg
        }
    );
    assert_eq!(
        rng,
        Rng::new(5),
        "taking everything must not draw random numbers"
    );
}

#[test]
fn sampler_is_balanced_reproducible_and_valid() {
    let labels = sampler_labels();
    let s = BalancedPositiveNegativeSampler::new(16, 0.25).unwrap();
    let draw = |seed| s.sample_labels(&labels, &mut Rng::new(seed)).unwrap();
    let a = draw(1);
    assert_eq!(a, draw(1), "same seed, same sample");
    assert_ne!(a, draw(2), "another seed, another sample");
    // floor(16 * 0.25) = 4 positives, 12 negatives; ascending, unique, right labels.
    assert_eq!((a.positive.len(), a.negative.len()), (4, 12));
    for (list, ok) in [
        (&a.positive, &(|l: i64| l >= 1) as &dyn Fn(i64) -> bool),
        (&a.negative, &|l| l == 0),
    ] {
        assert!(list.windows(2).all(|w| w[0] < w[1]), "{list:?}");
        assert!(list.iter().all(|&i| ok(labels[i as usize])), "{list:?}");
    }
    // Few positives: negatives fill the batch.
    let s = BalancedPositiveNegativeSampler::new(30, 0.5).unwrap();
    let b = s.sample_labels(&labels, &mut Rng::new(3)).unwrap();
    assert_eq!((b.positive.len(), b.negative.len()), (10, 20));
    // Every positive is about equally likely (4 of 10 per draw).
    let s = BalancedPositiveNegativeSampler::new(8, 0.5).unwrap();
    let mut counts = [0usize; 50];
    let mut rng = Rng::new(9);
    for _ in 0..4000 {
        for i in s.sample_labels(&labels, &mut rng).unwrap().positive {
            counts[i as usize] += 1;
        }
    }
    for i in (0..50).filter(|&i| labels[i] >= 1) {
        assert!(
            (1400..=1800).contains(&counts[i]),
            "positive {i} drawn {} times of ~1600",
            counts[i]
        );
    }
}

/// The training path that feeds the sampler, on `device`: proposals and gt boxes ->
/// `box_iou` -> `Matcher` (0.5 / 0.5, the RoI heads' setting) run there (on the
/// emulated device and CUDA by their kernels), the matches read back, mapped to
/// labels (background 0, between thresholds -1, else the gt's class) and sampled.
/// The labels must equal those of the f64 reference matcher on the same boxes, and
/// the sample must be the one the reference labels give with the same seed: a
/// balanced draw of unique, ascending indices with the right labels.
fn check_sampler_on(device: Device) {
    let (n, g) = (600, 6);
    let (p, _) = clustered_boxes(41, n, 8, 640.0, 480.0);
    // The same seed: the gt boxes are the first proposals, and the other proposals of
    // their clusters overlap them (positives), while other clusters do not (negatives).
    let (gt, _) = clustered_boxes(41, g, 8, 640.0, 480.0);
    let classes: Vec<i64> = (0..g as i64).map(|i| 1 + i % 3).collect();
    let (rp, rg) = (reference::boxes_of(&p), reference::boxes_of(&gt));
    let q32: Vec<f32> = reference::iou(&rg, &rp).iter().map(|&v| v as f32).collect();
    let want_matches = reference::matches(&q32, g, n, 0.5, 0.5, false);
    let label = |m: i64| match m {
        -1 => 0,
        m if m < 0 => -1,
        m => classes[m as usize],
    };
    let want_labels: Vec<i64> = want_matches.iter().map(|&m| label(m)).collect();
    let (np, nn) = (
        want_labels.iter().filter(|&&l| l >= 1).count(),
        want_labels.iter().filter(|&&l| l == 0).count(),
    );
    assert!(
        np > 4 && nn > 12,
        "weak case: {np} positives, {nn} negatives"
    );

    let q = boxes::box_iou(
        &on(&f32_t(gt, &[g, 4]), device),
        &on(&f32_t(p, &[n, 4]), device),
    )
    .unwrap();
    let matches = Matcher::new(0.5, 0.5, false).unwrap().matches(&q).unwrap();
    assert_eq!(matches.device(), device);
    let labels: Vec<i64> = ints(&matches).into_iter().map(label).collect();
    assert_eq!(
        labels, want_labels,
        "{device}: labels from the device's matches"
    );
    let labels_t = on(&i64_t(labels), device);

    let s = BalancedPositiveNegativeSampler::new(16, 0.25).unwrap();
    let got = s.sample(&labels_t, &mut Rng::new(4)).unwrap();
    assert_eq!(
        got,
        s.sample_labels(&want_labels, &mut Rng::new(4)).unwrap(),
        "{device}: sample of the device's labels"
    );
    assert_eq!((got.positive.len(), got.negative.len()), (4, 12));
    for (list, ok) in [
        (&got.positive, &(|l: i64| l >= 1) as &dyn Fn(i64) -> bool),
        (&got.negative, &|l| l == 0),
    ] {
        assert!(list.windows(2).all(|w| w[0] < w[1]), "{list:?}");
        assert!(
            list.iter().all(|&i| ok(want_labels[i as usize])),
            "{list:?}"
        );
    }
}

crate::device_tests! {
    sampler_labels_on_any_device => check_sampler_on;
}

#[test]
fn sampler_edge_cases() {
    let s = BalancedPositiveNegativeSampler::new(4, 0.5).unwrap();
    let mut rng = Rng::new(0);
    let empty = Sampled {
        positive: vec![],
        negative: vec![],
    };
    assert_eq!(s.sample_labels(&[], &mut rng).unwrap(), empty);
    assert_eq!(s.sample_labels(&[-1, -1, -2], &mut rng).unwrap(), empty);
    assert_eq!(
        s.sample_labels(&[0, 0], &mut rng).unwrap().negative,
        vec![0, 1]
    );
    let none = BalancedPositiveNegativeSampler::new(0, 0.5).unwrap();
    assert_eq!(
        none.sample_labels(&sampler_labels(), &mut rng).unwrap(),
        empty
    );
    assert!(BalancedPositiveNegativeSampler::new(4, 1.5).is_err());
    assert!(BalancedPositiveNegativeSampler::new(4, f64::NAN).is_err());
    assert!(s.sample(&f32_t(vec![1.0], &[1]), &mut rng).is_err());
    let batch = s
        .sample_batch(&[i64_t(vec![1, 0]), i64_t(vec![0, 1])], &mut rng)
        .unwrap();
    assert_eq!(
        batch[1],
        Sampled {
            positive: vec![1],
            negative: vec![0]
        }
    );
}
