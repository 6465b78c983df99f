//! COCO box evaluation: parity with pycocotools on the fixtures and on small embedded
//! cases, hand-computed cases (perfect, empty, crowd, IoU exactly at a threshold,
//! maxDets), the CLI's output format, and errors.

mod common;

use std::path::Path;
use std::process::Command;

use kestrel::eval::{
    evaluate, format_summary, load_results, CocoEvaluation, DetBox, GroundTruth, GtBox, STAT_NAMES,
};

fn stats_of(ev: &CocoEvaluation) -> String {
    STAT_NAMES
        .iter()
        .zip(ev.stats)
        .map(|(n, v)| format!("{n}={v:.6}"))
        .collect::<Vec<_>>()
        .join(" ")
}

fn assert_stats(what: &str, ev: &CocoEvaluation, want: &[f64; 12], tol: f64) {
    for (i, name) in STAT_NAMES.iter().enumerate() {
        assert!(
            (ev.stats[i] - want[i]).abs() <= tol,
            "{what}: {name} = {} but expected {} (all: {})",
            ev.stats[i],
            want[i],
            stats_of(ev)
        );
    }
}

/// The fixture's expected stats, in [`STAT_NAMES`] order, read by name.
fn fixture_stats() -> [f64; 12] {
    let p = common::fixtures_dir().join("cocoeval/stats.json");
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    std::array::from_fn(|i| {
        v[STAT_NAMES[i]]
            .as_f64()
            .unwrap_or_else(|| panic!("{} has no number `{}`", p.display(), STAT_NAMES[i]))
    })
}

#[test]
fn fixture_parity_with_pycocotools() {
    let dir = common::fixtures_dir().join("cocoeval");
    let gt = GroundTruth::from_json_file(&dir.join("gt.json")).unwrap();
    let dets = load_results(&dir.join("dt.json"), &gt).unwrap();
    let ev = evaluate(&gt, &dets).unwrap();
    assert_stats("fixtures/cocoeval", &ev, &fixture_stats(), 1e-4);
}

// ---------------------------------------------------------------------------------
// Hand-computed cases. Boxes are COCO [x, y, w, h]; T = 10 IoU thresholds, R = 101
// recall thresholds; AP of a category = mean over (t, r) of the interpolated precision.
// ---------------------------------------------------------------------------------

fn gt_box(id: i64, image_id: i64, category_id: i64, bbox: [f64; 4]) -> GtBox {
    GtBox {
        id,
        image_id,
        category_id,
        bbox,
        area: bbox[2] * bbox[3],
        iscrowd: false,
    }
}

fn det(image_id: i64, category_id: i64, bbox: [f64; 4], score: f64) -> DetBox {
    DetBox {
        image_id,
        category_id,
        bbox,
        score,
    }
}

/// Two images, two categories, one object of each category per image at most, with a
/// small (10x10), a medium (40x40) and a large (100x120) object.
fn three_sizes() -> GroundTruth {
    GroundTruth {
        image_ids: vec![1, 2],
        category_ids: vec![1, 2],
        annotations: vec![
            gt_box(1, 1, 1, [5.0, 5.0, 10.0, 10.0]),
            gt_box(2, 1, 2, [50.0, 20.0, 40.0, 40.0]),
            gt_box(3, 2, 1, [10.0, 10.0, 100.0, 120.0]),
        ],
    }
}

#[test]
fn perfect_detections_give_one() {
    // Every detection equals a ground-truth box (IoU 1 >= every threshold): precision
    // is 1 at every recall, and every object is found with one detection per image and
    // category, so all 12 numbers are 1 (precision is tp / (tp + fp + eps) with
    // eps = 2^-52, as in pycocotools, hence the 1e-12).
    let gt = three_sizes();
    let dets: Vec<DetBox> = gt
        .annotations
        .iter()
        .map(|a| det(a.image_id, a.category_id, a.bbox, 0.9))
        .collect();
    let ev = evaluate(&gt, &dets).unwrap();
    assert_stats("perfect", &ev, &[1.0; 12], 1e-12);
}

#[test]
fn no_detections_give_zero() {
    // Ground truth exists in every area range, nothing is detected: precision and
    // recall are 0 (not -1, which means "no ground truth").
    let ev = evaluate(&three_sizes(), &[]).unwrap();
    assert_stats("no detections", &ev, &[0.0; 12], 0.0);
    assert!(ev.precision.iter().all(|&p| p == 0.0 || p == -1.0));
}

#[test]
fn crowd_region_absorbs_detections() {
    // Image 1, category 1: object A = [0, 0, 20, 20] and a crowd region C = [50, 50,
    // 100, 100]. Detections: d1 = A (0.9), d2 and d3 small boxes inside C (0.8, 0.7),
    // d4 far from both (0.6).
    // With C a crowd: IoU(d, C) = |d ∩ C| / |d| = 1, so d2 and d3 both match C (a crowd
    // may be matched many times) and are ignored. Sorted: d1 TP, d4 FP; one object to
    // find: recall [1, 1], precision [1, 0.5] -> envelope [1, 0.5]; every recall
    // threshold r <= 1 lands on index 0 -> precision 1 everywhere: AP = 1, AR = 1.
    let crowd = |iscrowd| GroundTruth {
        image_ids: vec![1],
        category_ids: vec![1],
        annotations: vec![
            gt_box(1, 1, 1, [0.0, 0.0, 20.0, 20.0]),
            GtBox {
                iscrowd,
                ..gt_box(2, 1, 1, [50.0, 50.0, 100.0, 100.0])
            },
        ],
    };
    let dets = vec![
        det(1, 1, [0.0, 0.0, 20.0, 20.0], 0.9),
        det(1, 1, [60.0, 60.0, 10.0, 10.0], 0.8),
        det(1, 1, [100.0, 100.0, 12.0, 12.0], 0.7),
        det(1, 1, [300.0, 300.0, 20.0, 20.0], 0.6),
    ];
    let ev = evaluate(&crowd(true), &dets).unwrap();
    assert!((ev.stats[0] - 1.0).abs() < 1e-12, "{}", stats_of(&ev));
    assert!((ev.stats[8] - 1.0).abs() < 1e-12, "{}", stats_of(&ev));
    // The crowd region is "large" (area 10000 > 96²) but ignored, and the only object
    // A is small (400): AP_large has no ground truth to find -> -1.
    assert_eq!(ev.stats[5], -1.0, "{}", stats_of(&ev));

    // Same boxes with C an ordinary object: d2, d3 have IoU 0.01 and 0.0144 with C,
    // so they are false positives. Sorted: TP, FP, FP, FP with 2 objects: recall
    // [.5, .5, .5, .5], precision [1, .5, .33, .25]. Thresholds r <= 0.5 (51 of the
    // 101) get precision 1, those above find no index and get 0: AP = 51/101 at every
    // IoU threshold; AR = 0.5.
    let ev = evaluate(&crowd(false), &dets).unwrap();
    assert!(
        (ev.stats[0] - 51.0 / 101.0).abs() < 1e-12,
        "{}",
        stats_of(&ev)
    );
    assert!((ev.stats[8] - 0.5).abs() < 1e-12, "{}", stats_of(&ev));
}

#[test]
fn iou_exactly_at_threshold_matches() {
    // GT [0, 0, 10, 10], detection [0, 0, 20, 10]: IoU = 100 / 200 = 0.5 exactly. A
    // match needs IoU >= threshold, so it is a TP at 0.50 only: AP50 = 1, AP75 = 0,
    // AP = (1 + 9 * 0) / 10 = 0.1; same for AR. The object (area 100) is small, so the
    // medium and large numbers are -1 (no ground truth there); the detection's own
    // area (200) is small too.
    let gt = GroundTruth {
        image_ids: vec![7],
        category_ids: vec![3],
        annotations: vec![gt_box(1, 7, 3, [0.0, 0.0, 10.0, 10.0])],
    };
    let ev = evaluate(&gt, &[det(7, 3, [0.0, 0.0, 20.0, 10.0], 0.5)]).unwrap();
    let want = [
        0.1, 1.0, 0.0, 0.1, -1.0, -1.0, 0.1, 0.1, 0.1, 0.1, -1.0, -1.0,
    ];
    assert_stats("IoU 0.5", &ev, &want, 1e-12);
}

#[test]
fn max_dets_limits_recall() {
    // One image with two objects of one category and two perfect detections (0.9 on
    // the first, 0.8 on the second). With maxDets = 1 only the best is kept: recall
    // 1/2 -> AR1 = 0.5; AR10 = AR100 = 1.
    let gt = GroundTruth {
        image_ids: vec![1],
        category_ids: vec![1],
        annotations: vec![
            gt_box(1, 1, 1, [0.0, 0.0, 40.0, 40.0]),
            gt_box(2, 1, 1, [60.0, 0.0, 40.0, 40.0]),
        ],
    };
    let dets = vec![
        det(1, 1, [0.0, 0.0, 40.0, 40.0], 0.9),
        det(1, 1, [60.0, 0.0, 40.0, 40.0], 0.8),
    ];
    let ev = evaluate(&gt, &dets).unwrap();
    assert_eq!((ev.stats[6], ev.stats[7], ev.stats[8]), (0.5, 1.0, 1.0));
}

#[test]
fn categories_without_ground_truth_are_left_out_of_the_mean() {
    // Category 2 has no ground truth: its precision is -1 and the mean is category
    // 1's alone. Its detections (and those of category 9, which the ground truth does
    // not list) change nothing.
    let gt = GroundTruth {
        image_ids: vec![1],
        category_ids: vec![1, 2],
        annotations: vec![gt_box(1, 1, 1, [0.0, 0.0, 40.0, 40.0])],
    };
    let dets = vec![
        det(1, 1, [0.0, 0.0, 40.0, 40.0], 0.5),
        det(1, 2, [0.0, 0.0, 40.0, 40.0], 0.9),
        det(1, 9, [0.0, 0.0, 40.0, 40.0], 0.9),
    ];
    let ev = evaluate(&gt, &dets).unwrap();
    assert!((ev.stats[0] - 1.0).abs() < 1e-12, "{}", stats_of(&ev));
    let per_cat = ev.per_category_ap();
    assert_eq!((per_cat[0].0, per_cat[1]), (1, (2, -1.0)), "{per_cat:?}");
    assert!((per_cat[0].1 - 1.0).abs() < 1e-12, "{per_cat:?}");
}

// ---------------------------------------------------------------------------------
// Small cases whose expected numbers come from pycocotools 2.0.11:
//   cg = COCO("gt.json"); E = COCOeval(cg, cg.loadRes("dt.json"), "bbox")
//   E.evaluate(); E.accumulate(); E.summarize(); print(list(E.stats))
// ---------------------------------------------------------------------------------

fn run_json(gt: &str, dt: &str, name: &str) -> CocoEvaluation {
    let dir = temp_dir(name);
    std::fs::write(dir.join("gt.json"), gt).unwrap();
    std::fs::write(dir.join("dt.json"), dt).unwrap();
    let g = GroundTruth::from_json_file(&dir.join("gt.json")).unwrap();
    let d = load_results(&dir.join("dt.json"), &g).unwrap();
    let ev = evaluate(&g, &d).unwrap();
    std::fs::remove_dir_all(&dir).ok();
    ev
}

fn temp_dir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("kestrel-coco-eval-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn crowd_and_size_mix_matches_pycocotools() {
    // Two images; a crowd region on image 10 that a lower-scored detection hits
    // exactly; objects from 3 to 135 pixels.
    let gt = r#"{"images": [{"id": 3, "width": 200, "height": 160}, {"id": 10, "width": 200, "height": 160}], "annotations": [{"id": 1, "image_id": 3, "category_id": 5, "bbox": [73.16831233532795, 33.36310290049387, 8.521009735279904, 9.751615523810052], "area": 83.0936108130921, "iscrowd": 0}, {"id": 2, "image_id": 3, "category_id": 5, "bbox": [46.23293531419844, 48.08429248453537, 4.854275439938862, 2.75546270556739], "area": 13.375774937303268, "iscrowd": 0}, {"id": 3, "image_id": 3, "category_id": 5, "bbox": [105.2452638398643, 53.31970700401077, 135.23870369275858, 138.93241951324987], "area": 18789.04031587043, "iscrowd": 0}, {"id": 4, "image_id": 3, "category_id": 5, "bbox": [84.12528389144315, 108.76041502016103, 93.95076108252263, 58.37871550077752], "area": 4363.802749530025, "iscrowd": 0}, {"id": 5, "image_id": 3, "category_id": 5, "bbox": [65.8927773061939, 47.52355806960571, 32.35547810606023, 44.98849454423579], "area": 327.0385806406375, "iscrowd": 0}, {"id": 6, "image_id": 3, "category_id": 5, "bbox": [82.09875239454739, 83.78970925502526, 123.79302124187208, 111.77296753266121], "area": 3638.5776180892963, "iscrowd": 0}, {"id": 7, "image_id": 10, "category_id": 5, "bbox": [36.81897071830363, 11.585558189479821, 21.41348561468517, 35.13742623930146], "area": 451.4488627874059, "iscrowd": 1}, {"id": 8, "image_id": 10, "category_id": 5, "bbox": [75.51140972300304, 29.608052784968493, 4.4331240653317545, 3.215341784988442], "area": 8.552405427179412, "iscrowd": 0}], "categories": [{"id": 5, "name": "5"}]}"#;
    let dt = r#"[{"image_id": 10, "category_id": 5, "bbox": [75.51140972300304, 29.608052784968493, 4.4331240653317545, 3.215341784988442], "score": 0.5027774747187527}, {"image_id": 10, "category_id": 5, "bbox": [37.21763716603912, 12.716921488766149, 22.13492261899589, 33.60348475220545], "score": 0.6553682540340371}, {"image_id": 10, "category_id": 5, "bbox": [36.81897071830363, 11.585558189479821, 21.41348561468517, 35.13742623930146], "score": 0.1}]"#;
    let want = [
        0.14108910891089102,
        0.14851485148514848,
        0.14851485148514848,
        0.2445544554455445,
        0.0,
        0.0,
        0.0,
        0.14285714285714285,
        0.14285714285714285,
        0.25,
        0.0,
        0.0,
    ];
    assert_stats("pycocotools case", &run_json(gt, dt, "mix"), &want, 1e-12);
}

#[test]
fn only_crowd_ground_truth_gives_zero_and_minus_one_like_pycocotools() {
    // Category 11's only object is a crowd region (matched by the detection and so
    // ignored); category 9 has one small object and no detection. Categories 1 and 3
    // have nothing.
    let gt = r#"{"images": [{"id": 3, "width": 200, "height": 160}], "annotations": [{"id": 1, "image_id": 3, "category_id": 11, "bbox": [70, 12, 80.0, 40], "area": 1920.0, "iscrowd": 1}, {"id": 2, "image_id": 3, "category_id": 9, "bbox": [6, 56, 8.0, 8], "area": 52.97465758547641, "iscrowd": 0}], "categories": [{"id": 11, "name": "11"}, {"id": 3, "name": "3"}, {"id": 1, "name": "1"}, {"id": 9, "name": "9"}]}"#;
    let dt = r#"[{"image_id": 3, "category_id": 11, "bbox": [72.2187504896199, 13.474714160912594, 77.23477318414825, 38.15212413879466], "score": 0.5387734132621766}]"#;
    let want = [
        0.0, 0.0, 0.0, 0.0, -1.0, -1.0, 0.0, 0.0, 0.0, 0.0, -1.0, -1.0,
    ];
    assert_stats(
        "pycocotools crowd-only case",
        &run_json(gt, dt, "crowd"),
        &want,
        1e-12,
    );
}

// ---------------------------------------------------------------------------------
// Output format and CLI.
// ---------------------------------------------------------------------------------

/// pycocotools' own lines (from `COCOeval.summarize()`), without the values.
const PYCOCOTOOLS_LINES: [&str; 12] = [
    " Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ] = ",
    " Average Precision  (AP) @[ IoU=0.50      | area=   all | maxDets=100 ] = ",
    " Average Precision  (AP) @[ IoU=0.75      | area=   all | maxDets=100 ] = ",
    " Average Precision  (AP) @[ IoU=0.50:0.95 | area= small | maxDets=100 ] = ",
    " Average Precision  (AP) @[ IoU=0.50:0.95 | area=medium | maxDets=100 ] = ",
    " Average Precision  (AP) @[ IoU=0.50:0.95 | area= large | maxDets=100 ] = ",
    " Average Recall     (AR) @[ IoU=0.50:0.95 | area=   all | maxDets=  1 ] = ",
    " Average Recall     (AR) @[ IoU=0.50:0.95 | area=   all | maxDets= 10 ] = ",
    " Average Recall     (AR) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ] = ",
    " Average Recall     (AR) @[ IoU=0.50:0.95 | area= small | maxDets=100 ] = ",
    " Average Recall     (AR) @[ IoU=0.50:0.95 | area=medium | maxDets=100 ] = ",
    " Average Recall     (AR) @[ IoU=0.50:0.95 | area= large | maxDets=100 ] = ",
];

fn expected_summary(stats: &[f64; 12]) -> String {
    PYCOCOTOOLS_LINES
        .iter()
        .zip(stats)
        .map(|(l, v)| format!("{l}{v:.3}\n"))
        .collect()
}

#[test]
fn summary_format_is_pycocotools() {
    let stats = [
        0.5, 0.25, -1.0, 0.0, 1.0, 0.1234, 0.9876, 0.4, 0.4, 0.3, 0.2, 0.1,
    ];
    assert_eq!(format_summary(&stats), expected_summary(&stats));
    assert!(format_summary(&stats).contains("] = -1.000\n"));
}

#[test]
fn cli_coco_eval_prints_the_summary() {
    let dir = common::fixtures_dir().join("cocoeval");
    let out = Command::new(env!("CARGO_BIN_EXE_kestrel"))
        .arg("coco-eval")
        .arg(dir.join("gt.json"))
        .arg(dir.join("dt.json"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(text, expected_summary(&fixture_stats()), "got:\n{text}");
}

#[test]
fn cli_coco_eval_reports_bad_files() {
    let dir = temp_dir("cli-bad");
    let gt = common::fixtures_dir().join("cocoeval/gt.json");
    let bad = dir.join("results.json");
    std::fs::write(&bad, r#"[{"image_id": 10, "category_id": 1, "bbox": [1, 2"#).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_kestrel"))
        .args(["coco-eval".as_ref(), gt.as_os_str(), bad.as_os_str()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("results.json") && err.contains("line 1"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

// ---------------------------------------------------------------------------------
// Errors.
// ---------------------------------------------------------------------------------

#[test]
fn results_on_unknown_images_are_an_error() {
    let gt = three_sizes();
    let e = evaluate(&gt, &[det(99, 1, [0.0, 0.0, 1.0, 1.0], 0.5)]).unwrap_err();
    assert!(e.to_string().contains("image id 99"), "{e}");

    let dir = temp_dir("unknown-image");
    let p = dir.join("dt.json");
    std::fs::write(
        &p,
        r#"[{"image_id": 5, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 1}]"#,
    )
    .unwrap();
    let e = load_results(&p, &gt).unwrap_err().to_string();
    assert!(e.contains("dt.json") && e.contains("image id 5"), "{e}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn malformed_results_name_the_file_and_item() {
    let dir = temp_dir("bad-results");
    let gt = three_sizes();
    let cases = [
        ("not_a_list.json", r#"{"image_id": 1}"#, "line 1"),
        (
            "short_box.json",
            r#"[{"image_id": 1, "category_id": 1, "bbox": [0, 0, 1], "score": 1}]"#,
            "result 0",
        ),
        (
            "no_score.json",
            r#"[{"image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 1]}]"#,
            "score",
        ),
    ];
    for (name, text, needle) in cases {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        let e = load_results(&p, &gt).unwrap_err().to_string();
        assert!(e.contains(name) && e.contains(needle), "{name}: {e}");
    }
    let missing = load_results(Path::new("/nonexistent/kestrel.json"), &gt).unwrap_err();
    assert!(
        missing.to_string().contains("/nonexistent/kestrel.json"),
        "{missing}"
    );
    std::fs::remove_dir_all(&dir).ok();
}
