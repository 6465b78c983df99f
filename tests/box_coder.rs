//! Box coding (kernels/box_coder.cu) against torchvision (fixture ops/detection),
//! hand-worked values and an independent f64 reference on random boxes.

mod common;

use common::*;
use kestrel::detection::box_coder::BoxCoder;
use kestrel::Device;
use serde_json::Value;

fn coder_of(p: &Value) -> BoxCoder {
    let w: Vec<f64> = p["weights"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    BoxCoder {
        weights: [w[0], w[1], w[2], w[3]],
        bbox_xform_clip: f64_param(p, "bbox_xform_clip"),
    }
}

fn check_box_coder_fixtures_on(device: Device) {
    let f = fixture("ops/detection.safetensors");
    let params = f.params().unwrap();
    let cases: Vec<&String> = params
        .as_object()
        .unwrap()
        .keys()
        .filter(|k| k.starts_with("coder"))
        .collect();
    assert!(cases.len() >= 2, "no coder cases");
    for case in cases {
        let coder = coder_of(&params[case.as_str()]);
        let t = |n: &str| on(&f.tensor(&format!("{case}.{n}")).unwrap(), device);
        let enc = coder.encode(&t("gt"), &t("reference")).unwrap();
        assert_eq!(enc.device(), device);
        assert_close(
            &format!("{device} {case} encode"),
            &enc,
            &f.tensor(&format!("{case}.encoded")).unwrap(),
            1e-5,
        );
        let dec = coder.decode(&t("deltas"), &t("reference")).unwrap();
        assert_close(
            &format!("{device} {case} decode"),
            &dec,
            &f.tensor(&format!("{case}.decoded")).unwrap(),
            1e-5,
        );
    }
}

crate::device_tests! {
    box_coder_matches_torchvision => check_box_coder_fixtures_on;
}

/// Hand-worked values, the clamp, several code sets per box, empty and NaN inputs.
fn check_box_coder_edge_cases_on(device: Device) {
    let coder = BoxCoder::new([10.0, 10.0, 5.0, 5.0]);
    let anchor = on(&f32_t(vec![0., 0., 10., 20.], &[1, 4]), device);
    // gt = anchor shifted by (1, 2) and doubled in width: centre (6, 12) vs (5, 10).
    let gt = on(&f32_t(vec![-4., 2., 16., 22.], &[1, 4]), device);
    let enc = floats(&coder.encode(&gt, &anchor).unwrap());
    let want = [1.0, 1.0, 5.0 * 2f32.ln(), 0.0];
    assert!(
        enc.iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-6),
        "{enc:?}"
    );
    // Decoding the targets gives the gt back; the second code set hits the clamp:
    // dw = 100 / 5 = 20 -> ln(1000/16), so the width is 10 * 62.5 = 625.
    let codes = on(
        &f32_t(
            vec![enc[0], enc[1], enc[2], enc[3], 0., 0., 100., 0.],
            &[1, 8],
        ),
        device,
    );
    let dec = floats(&coder.decode(&codes, &anchor).unwrap());
    let want = [-4., 2., 16., 22., 5. - 312.5, 0., 5. + 312.5, 20.];
    assert!(
        dec.iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-3),
        "{dec:?}"
    );
    // Empty inputs.
    let e = on(&f32_t(vec![], &[0, 4]), device);
    assert_eq!(coder.encode(&e, &e).unwrap().dims(), &[0, 4]);
    assert_eq!(coder.decode(&e, &e).unwrap().dims(), &[0, 4]);
    // NaN codes give NaN boxes; a NaN dw is not clamped away.
    let nan = on(&f32_t(vec![0., 0., f32::NAN, 0.], &[1, 4]), device);
    let dec = floats(&coder.decode(&nan, &anchor).unwrap());
    assert!(
        dec[0].is_nan() && dec[2].is_nan() && dec[1] == 0.0 && dec[3] == 20.0,
        "{dec:?}"
    );
    // A zero-width reference encodes to a non-finite target, as in torchvision.
    let flat = on(&f32_t(vec![0., 0., 0., 20.], &[1, 4]), device);
    let enc = floats(&coder.encode(&gt, &flat).unwrap());
    assert!(!enc[0].is_finite() && !enc[2].is_finite(), "{enc:?}");
}

crate::device_tests! {
    box_coder_edge_cases => check_box_coder_edge_cases_on;
}

/// Random anchors, boxes and codes (large enough for `dw` to hit the clamp) against
/// the f64 definitions in `common::reference`, for the RPN's and the box head's weights.
fn check_box_coder_random_on(device: Device) {
    for (seed, weights) in [(21u64, [1.0, 1.0, 1.0, 1.0]), (22, [10.0, 10.0, 5.0, 5.0])] {
        let coder = BoxCoder::new(weights);
        let n = 500;
        let (a, _) = clustered_boxes(seed, n, 10, 1216.0, 800.0);
        let (g, _) = clustered_boxes(seed + 1, n, 10, 1216.0, 800.0);
        let (ra, rg) = (reference::boxes_of(&a), reference::boxes_of(&g));
        let (at, gt) = (
            on(&f32_t(a, &[n, 4]), device),
            on(&f32_t(g, &[n, 4]), device),
        );
        let want = f64_t(reference::encode(weights, &rg, &ra), &[n, 4]);
        let got = coder.encode(&gt, &at).unwrap();
        assert_eq!(got.device(), device);
        assert_close(&format!("{device} encode seed {seed}"), &got, &want, 1e-5);
        let codes: Vec<f32> = randn(seed, n * 8)
            .iter()
            .map(|v| (v * 3.0) as f32)
            .collect();
        let codes64: Vec<f64> = codes.iter().map(|&v| v as f64).collect();
        let want = reference::decode(weights, coder.bbox_xform_clip, &codes64, &ra);
        let got = coder
            .decode(&on(&f32_t(codes, &[n, 8]), device), &at)
            .unwrap();
        assert_close(
            &format!("{device} decode seed {seed}"),
            &got,
            &f64_t(want, &[n, 8]),
            1e-6,
        );
    }
}

crate::device_tests! {
    box_coder_random => check_box_coder_random_on;
}

#[test]
fn box_coder_rejects_bad_input() {
    let coder = BoxCoder::new([1.0; 4]);
    let b = f32_t(vec![0.0; 8], &[2, 4]);
    assert!(coder.encode(&b, &f32_t(vec![0.0; 4], &[1, 4])).is_err());
    assert!(coder.decode(&f32_t(vec![0.0; 6], &[2, 3]), &b).is_err());
    assert!(coder.decode(&f32_t(vec![0.0; 8], &[1, 8]), &b).is_err());
    assert!(BoxCoder::new([1.0, 0.0, 1.0, 1.0]).decode(&b, &b).is_err());
    let b64 = b.to_dtype(kestrel::DType::F64).unwrap();
    assert!(coder.decode(&b64, &b).is_err());
    // f64 on the CPU works: decoding zero codes gives the boxes back, in f64.
    let boxes = [[1.5, 2.25, 10.0, 20.5], [0.0, 0.0, 3.0, 4.0]];
    let bt = f64_t(boxes.concat(), &[2, 4]);
    let d64 = coder.decode(&f64_t(vec![0.0; 8], &[2, 4]), &bt).unwrap();
    assert_eq!(d64.dtype(), kestrel::DType::F64);
    assert_eq!(d64.to_vec::<f64>().unwrap(), boxes.concat());
    // and equals the reference on non-zero codes.
    let codes = vec![0.1, -0.2, 0.3, -0.4, 1.0, 2.0, 9.0, -9.0];
    let want = reference::decode([1.0; 4], coder.bbox_xform_clip, &codes, &boxes);
    assert_close(
        "decode f64",
        &coder.decode(&f64_t(codes, &[2, 4]), &bt).unwrap(),
        &f64_t(want, &[2, 4]),
        1e-14,
    );
}
