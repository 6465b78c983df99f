//! Anchor generation (kernels/anchors.cu) against torchvision (fixture ops/detection)
//! and edge cases.

mod common;

use common::*;
use kestrel::detection::anchors::AnchorGenerator;
use kestrel::Device;
use serde_json::Value;

fn usize_pairs(v: &Value) -> Vec<(usize, usize)> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p[0].as_u64().unwrap() as usize,
                p[1].as_u64().unwrap() as usize,
            )
        })
        .collect()
}

fn check_anchors_fixtures_on(device: Device) {
    let f = fixture("ops/detection.safetensors");
    let params = f.params().unwrap();
    let cases: Vec<&String> = params
        .as_object()
        .unwrap()
        .keys()
        .filter(|k| k.starts_with("anchors"))
        .collect();
    assert!(cases.len() >= 2, "no anchor cases");
    for case in cases {
        let p = &params[case.as_str()];
        let sizes: Vec<Vec<f64>> = p["sizes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| vec![s.as_f64().unwrap()])
            .collect();
        let ratios: Vec<f64> = p["ratios"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r.as_f64().unwrap())
            .collect();
        let gen = AnchorGenerator::new(sizes.clone(), vec![ratios; sizes.len()]).unwrap();
        let image = usize_pairs(&Value::Array(vec![p["image_size"].clone()]))[0];
        let got = gen
            .anchors(image, &usize_pairs(&p["grids"]), device)
            .unwrap();
        assert_eq!(got.device(), device);
        let want = f.tensor(case).unwrap();
        assert_eq!(got.dims(), want.dims(), "{device} {case}");
        assert_eq!(
            floats(&got),
            floats(&want),
            "{device} {case}: anchors differ"
        );
    }
}

crate::device_tests! {
    anchors_match_torchvision => check_anchors_fixtures_on;
}

/// Hand-worked cell anchors and strides, a 1x1 grid, non-divisible image sizes,
/// several sizes per level.
fn check_anchors_edge_cases_on(device: Device) {
    let gen = AnchorGenerator::fpn_default();
    // size 32: ratio 0.5 -> w = 32 / sqrt(0.5) = 45.25, h = 22.63 -> round(+-22.63,
    // +-11.31) = (-23, -11, 23, 11); ratio 1 -> 16; ratio 2 -> (-11, -23, 11, 23).
    assert_eq!(
        gen.cell_anchors()[0],
        vec![
            [-23., -11., 23., 11.],
            [-16., -16., 16., 16.],
            [-11., -23., 11., 23.]
        ]
    );
    assert_eq!(
        AnchorGenerator::strides((800, 1216), &[(13, 19)]).unwrap(),
        vec![(61, 64)]
    );
    let one = AnchorGenerator::new(vec![vec![16.0, 32.0]], vec![vec![1.0]]).unwrap();
    let a = floats(&one.anchors((7, 9), &[(1, 1)], device).unwrap());
    assert_eq!(a, vec![-8., -8., 8., 8., -16., -16., 16., 16.]);
    // Grid 2 x 3 on a 7 x 10 image: strides (3, 3); second row starts at y = 3.
    let a = one.anchors((7, 10), &[(2, 3)], device).unwrap();
    assert_eq!(a.dims(), &[12, 4]);
    let a = floats(&a);
    assert_eq!(
        &a[4 * 6..4 * 7],
        &[-8., -5., 8., 11.],
        "row 1, column 0, size 16"
    );
    assert_eq!(
        &a[4 * 5..4 * 6],
        &[-10., -16., 22., 16.],
        "row 0, column 2, size 32"
    );
    assert!(one.anchors((7, 10), &[(0, 3)], device).is_err());
    assert!(one.anchors((7, 10), &[(1, 1), (1, 1)], device).is_err());
}

crate::device_tests! {
    anchors_edge_cases => check_anchors_edge_cases_on;
}

#[test]
fn anchor_generator_rejects_bad_config() {
    assert!(AnchorGenerator::new(vec![vec![32.0]], vec![]).is_err());
    assert!(AnchorGenerator::new(vec![vec![-32.0]], vec![vec![1.0]]).is_err());
    assert!(AnchorGenerator::new(vec![vec![32.0]], vec![vec![f64::NAN]]).is_err());
    assert!(AnchorGenerator::new(vec![vec![]], vec![vec![1.0]]).is_err());
    assert_eq!(
        AnchorGenerator::fpn_default().num_anchors_per_location(),
        vec![3; 5]
    );
}
