//! The proposal matcher (kernels/matcher.cu) against torchvision (fixture
//! ops/detection), edge cases and an independent f64 reference on random boxes.

mod common;

use common::*;
use kestrel::detection::matcher::Matcher;
use kestrel::ops::boxes;
use kestrel::Device;
use serde_json::Value;

fn matcher_of(p: &Value) -> Matcher {
    Matcher::new(
        f64_param(p, "high"),
        f64_param(p, "low"),
        p["allow_low_quality_matches"].as_bool().unwrap(),
    )
    .unwrap()
}

fn check_matcher_fixtures_on(device: Device) {
    let f = fixture("ops/detection.safetensors");
    let params = f.params().unwrap();
    let cases: Vec<&String> = params
        .as_object()
        .unwrap()
        .keys()
        .filter(|k| k.starts_with("matcher"))
        .collect();
    assert!(cases.len() >= 2, "no matcher cases");
    for case in cases {
        let m = matcher_of(&params[case.as_str()]);
        let t = |n: &str| on(&f.tensor(&format!("{case}.{n}")).unwrap(), device);
        let want = ints(&f.int_tensor(&format!("{case}.matches")).unwrap());
        let got = m.matches(&t("iou")).unwrap();
        assert_eq!(got.device(), device);
        assert_eq!(ints(&got), want, "{device} {case} on the fixture IoU");
        // The whole path: our IoU of gt and proposals, then the matcher.
        let iou = boxes::box_iou(&t("gt"), &t("proposals")).unwrap();
        assert_close(
            &format!("{device} {case} iou"),
            &iou,
            &f.tensor(&format!("{case}.iou")).unwrap(),
            1e-6,
        );
        assert_eq!(
            ints(&m.matches(&iou).unwrap()),
            want,
            "{device} {case} on our IoU"
        );
    }
}

crate::device_tests! {
    matcher_matches_torchvision => check_matcher_fixtures_on;
}

/// Hand-worked matrices: thresholds, low-quality ties (restoring each anchor's own
/// best gt), duplicate gts, NaN, a gt without overlaps, empty inputs.
fn check_matcher_edge_cases_on(device: Device) {
    let run = |m: &Matcher, v: Vec<f32>, g: usize| {
        let a = v.len().checked_div(g).unwrap_or(0);
        ints(&m.matches(&on(&f32_t(v, &[g, a]), device)).unwrap())
    };
    let rpn = Matcher::new(0.7, 0.3, true).unwrap();
    let plain = Matcher::new(0.7, 0.3, false).unwrap();
    let iou = vec![0.9, 0.5, 0.65, 0.2, 0.3, 0.6, 0.6, 0.1];
    assert_eq!(run(&plain, iou.clone(), 2), vec![0, -2, -2, -1]);
    // gt 1's maximum 0.6 is reached by anchors 1 and 2: anchor 1's best gt is 1,
    // anchor 2's best gt is 0 (0.65), and that is what it gets back.
    assert_eq!(run(&rpn, iou, 2), vec![0, 1, 0, -1]);
    // Duplicate gts: the first one wins.
    assert_eq!(run(&plain, vec![0.8, 0.1, 0.8, 0.1], 2), vec![0, -1]);
    // A NaN best IoU keeps its gt index; a NaN row maximum restores nothing.
    let nan = f32::NAN;
    assert_eq!(run(&plain, vec![0.9, 0.1, nan, 0.2], 2), vec![1, -1]);
    assert_eq!(run(&rpn, vec![0.9, 0.1, nan, 0.2], 2), vec![1, -1]);
    // A gt with no overlap has maximum 0: every anchor with IoU 0 to it is restored
    // to its own best gt (torchvision's rule, ties included).
    assert_eq!(
        run(&rpn, vec![0.8, 0.0, 0.0, 0.0, 0.0, 0.0], 2),
        vec![0, 0, 0]
    );
    // Thresholds are compared in f32: 0.7f32 < 0.7 in f64, but it is a match here.
    assert_eq!(run(&plain, vec![0.7], 1), vec![0]);
    // Equal thresholds: nothing is "between".
    let head = Matcher::new(0.5, 0.5, false).unwrap();
    assert_eq!(run(&head, vec![0.5, 0.49, 0.51], 1), vec![0, -1, 0]);
    // No gts: every anchor is below the low threshold. No anchors: empty.
    assert_eq!(run(&rpn, vec![], 0), Vec::<i64>::new());
    let none = on(&f32_t(vec![], &[0, 3]), device);
    assert_eq!(ints(&rpn.matches(&none).unwrap()), vec![-1, -1, -1]);
    let no_anchors = on(&f32_t(vec![], &[2, 0]), device);
    assert_eq!(ints(&rpn.matches(&no_anchors).unwrap()), Vec::<i64>::new());
}

crate::device_tests! {
    matcher_edge_cases => check_matcher_edge_cases_on;
}

/// Random anchors and 1, 7 or 40 gt boxes: the quality matrix (f64 IoU from
/// `common::reference`, rounded to f32) matched on `device` against the reference
/// matcher on the same f32 values, with and without low-quality matches.
fn check_matcher_random_on(device: Device) {
    for (seed, g) in [(31u64, 1usize), (32, 7), (33, 40)] {
        let n = 2000;
        let (a, _) = clustered_boxes(seed, n, 30, 640.0, 480.0);
        let (gt, _) = clustered_boxes(seed + 7, g, 30, 640.0, 480.0);
        let q: Vec<f32> = reference::iou(&reference::boxes_of(&gt), &reference::boxes_of(&a))
            .iter()
            .map(|&v| v as f32)
            .collect();
        let qt = on(&f32_t(q.clone(), &[g, n]), device);
        for (high, low, lq) in [(0.7, 0.3, true), (0.5, 0.5, false)] {
            let m = Matcher::new(high, low, lq).unwrap();
            let want = reference::matches(&q, g, n, high, low, lq);
            assert!(
                want.iter().any(|&v| v >= 0),
                "seed {seed}: no anchor matched, the check would be weak"
            );
            let got = m.matches(&qt).unwrap();
            assert_eq!(got.device(), device);
            assert_eq!(ints(&got), want, "{device} seed {seed} {m:?}");
        }
    }
}

crate::device_tests! {
    matcher_random => check_matcher_random_on;
}

#[test]
fn matcher_rejects_bad_input() {
    assert!(Matcher::new(0.3, 0.7, true).is_err());
    assert!(Matcher::new(f64::NAN, 0.3, true).is_err());
    let m = Matcher::new(0.7, 0.3, true).unwrap();
    assert!(m.matches(&f32_t(vec![0.0; 4], &[4])).is_err());
    assert!(m
        .matches(&i64_t(vec![0; 4]).reshape_detached([2, 2]).unwrap())
        .is_err());
    let f64_iou = f32_t(vec![0.9, 0.1], &[1, 2])
        .to_dtype(kestrel::DType::F64)
        .unwrap();
    assert_eq!(ints(&m.matches(&f64_iou).unwrap()), vec![0, -1]);
}
