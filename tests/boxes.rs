//! Box ops (box_area, box_iou, clip_boxes_to_image, remove_small_boxes; kernels/boxes.cu)
//! against torchvision (fixture ops/boxes), hand-computed edge cases, and an
//! independent f64 reference on random boxes, on the CPU, the emulated device and CUDA.

mod common;

use common::*;
use kestrel::ops::boxes;
use kestrel::Device;

fn check_box_ops_on(device: Device) {
    let f = fixture("ops/boxes.safetensors");
    let cases = tensor_cases(&f);
    assert!(!cases.is_empty(), "no cases in ops/boxes");
    for case in &cases {
        let p = case_params(&f, case);
        let t = |n: &str| f.tensor(&format!("{case}.{n}")).unwrap();
        match case.as_str() {
            "iou" => {
                let got =
                    boxes::box_iou(&on(&t("boxes1"), device), &on(&t("boxes2"), device)).unwrap();
                assert_close(&format!("{device} iou"), &got, &t("iou"), 1e-5);
            }
            "clip" => {
                let size = (
                    f64_param(&p, "height") as usize,
                    f64_param(&p, "width") as usize,
                );
                let got = boxes::clip_boxes_to_image(&on(&t("boxes"), device), size).unwrap();
                assert_close(&format!("{device} clip"), &got, &t("clipped"), 1e-5);
            }
            "small" => {
                let got =
                    boxes::remove_small_boxes(&on(&t("boxes"), device), f64_param(&p, "min_size"))
                        .unwrap();
                let want = ints(&f.int_tensor(&format!("{case}.keep")).unwrap());
                assert_eq!(got.device(), device);
                assert_eq!(ints(&got), want, "{device} remove_small_boxes");
            }
            other => panic!("ops/boxes: unknown case {other}"),
        }
    }
}

crate::device_tests! {
    box_ops_match_torchvision => check_box_ops_on;
}

/// Hand-computed values and the edge cases: empty sets, zero-width boxes, NaN and
/// infinite coordinates.
fn check_box_edge_cases_on(device: Device) {
    let b = on(
        &f32_t(
            vec![0., 0., 2., 3., 1., 1., 3., 4., 5., 5., 5., 9.],
            &[3, 4],
        ),
        device,
    );
    assert_eq!(floats(&boxes::box_area(&b).unwrap()), vec![6.0, 6.0, 0.0]);
    let iou = floats(&boxes::box_iou(&b, &b).unwrap());
    // [0,0,2,3] and [1,1,3,4] overlap in [1,1,2,3]: 2 / (6 + 6 - 2) = 0.2.
    assert_eq!(iou[0], 1.0);
    assert!(
        (iou[1] - 0.2).abs() < 1e-7 && (iou[3] - 0.2).abs() < 1e-7,
        "{iou:?}"
    );
    assert_eq!(iou[2], 0.0);
    // A zero-width box against itself: 0 / 0 is NaN, as in torchvision.
    assert!(iou[8].is_nan(), "{iou:?}");

    let empty = on(&f32_t(vec![], &[0, 4]), device);
    assert_eq!(boxes::box_iou(&empty, &b).unwrap().dims(), &[0, 3]);
    assert_eq!(boxes::box_iou(&b, &empty).unwrap().dims(), &[3, 0]);
    assert_eq!(boxes::box_area(&empty).unwrap().dims(), &[0]);
    assert_eq!(
        boxes::clip_boxes_to_image(&empty, (10, 10)).unwrap().dims(),
        &[0, 4]
    );
    assert_eq!(
        ints(&boxes::remove_small_boxes(&empty, 1.0).unwrap()),
        Vec::<i64>::new()
    );

    let nan = f32::NAN;
    let odd = on(
        &f32_t(
            vec![
                nan,
                0.,
                4.,
                4.,
                -5.,
                -1.,
                f32::INFINITY,
                20.,
                1.,
                1.,
                1.,
                3.,
                0.,
                0.,
                1.0,
                0.5,
            ],
            &[4, 4],
        ),
        device,
    );
    let clipped = floats(&boxes::clip_boxes_to_image(&odd, (10, 8)).unwrap());
    assert!(clipped[0].is_nan());
    assert_eq!(&clipped[1..8], &[0., 4., 4., 0., 0., 8., 10.]);
    // Widths 4 (NaN x1: NaN >= m is false), inf, 0, 1; heights 4, 21, 2, 0.5.
    assert_eq!(
        ints(&boxes::remove_small_boxes(&odd, 0.5).unwrap()),
        vec![1, 3]
    );
    assert_eq!(
        ints(&boxes::remove_small_boxes(&odd, 0.0).unwrap()),
        vec![1, 2, 3]
    );
    let iou = floats(&boxes::box_iou(&odd, &b).unwrap());
    assert!(
        iou[0..3].iter().all(|v| v.is_nan()),
        "NaN box gives NaN IoU: {iou:?}"
    );
}

crate::device_tests! {
    box_edge_cases => check_box_edge_cases_on;
}

#[test]
fn box_ops_f64_match_the_reference() {
    let (b, _) = clustered_boxes(3, 50, 5, 300.0, 200.0);
    let r = reference::boxes_of(&b);
    let b64 = f32_t(b, &[50, 4]).to_dtype(kestrel::DType::F64).unwrap();
    let got = boxes::box_iou(&b64, &b64).unwrap();
    assert_eq!(got.dtype(), kestrel::DType::F64);
    // Same f64 arithmetic as the reference: equal to rounding of the last bit.
    assert_close(
        "iou f64",
        &got,
        &f64_t(reference::iou(&r, &r), &[50, 50]),
        1e-14,
    );
    let area: Vec<f64> = r.iter().map(reference::area).collect();
    assert_close(
        "area f64",
        &boxes::box_area(&b64).unwrap(),
        &f64_t(area, &[50]),
        1e-14,
    );
    assert!(!reference::near_min_size(&r, 30.0, 1e-9));
    assert_eq!(
        ints(&boxes::remove_small_boxes(&b64, 30.0).unwrap()),
        reference::keep_large(&r, 30.0)
    );
    let clipped = boxes::clip_boxes_to_image(&b64, (150, 250)).unwrap();
    assert_eq!(
        clipped.to_vec::<f64>().unwrap(),
        reference::clip(&r, (150.0, 250.0))
    );
}

#[test]
fn box_ops_reject_bad_input() {
    let bad = f32_t(vec![0.0; 6], &[2, 3]);
    let ok = f32_t(vec![0.0; 8], &[2, 4]);
    for e in [
        boxes::box_area(&bad).unwrap_err(),
        boxes::box_iou(&bad, &ok).unwrap_err(),
        boxes::box_iou(&ok, &bad).unwrap_err(),
        boxes::remove_small_boxes(&bad, 1.0).unwrap_err(),
        boxes::clip_boxes_to_image(&bad, (4, 4)).unwrap_err(),
    ] {
        assert!(matches!(e, kestrel::Error::Shape { .. }), "{e}");
    }
    let idx = i64_t(vec![0, 1]);
    assert!(boxes::box_area(&idx).is_err());
    assert!(boxes::remove_small_boxes(&ok, f64::NAN).is_err());
    let ok64 = ok.to_dtype(kestrel::DType::F64).unwrap();
    assert!(boxes::box_iou(&ok, &ok64).is_err());
}

/// Random clustered boxes against the f64 definitions in `common::reference` (not
/// against another device of the engine): IoU and area to f32 rounding, clipping and
/// the kept indices exactly.
fn check_box_ops_random_on(device: Device) {
    for seed in 0..3 {
        let (b1, _) = clustered_boxes(seed, 300, 7, 640.0, 480.0);
        let (b2, _) = clustered_boxes(seed + 100, 200, 7, 640.0, 480.0);
        let (r1, r2) = (reference::boxes_of(&b1), reference::boxes_of(&b2));
        let (t1, t2) = (
            on(&f32_t(b1, &[300, 4]), device),
            on(&f32_t(b2, &[200, 4]), device),
        );
        let want = f64_t(reference::iou(&r1, &r2), &[300, 200]);
        let got = boxes::box_iou(&t1, &t2).unwrap();
        assert_eq!(got.device(), device);
        assert_close(&format!("{device} box_iou seed {seed}"), &got, &want, 1e-6);
        // Clamping an f32 to integer bounds is exact.
        let want = reference::clip(&r1, (480.0, 640.0));
        let got = boxes::clip_boxes_to_image(&t1, (480, 640)).unwrap();
        let got: Vec<f64> = floats(&got).iter().map(|&v| v as f64).collect();
        assert_eq!(got, want, "{device} clip seed {seed}");
        assert!(
            !reference::near_min_size(&r1, 60.0, 1e-3),
            "seed {seed}: a box side within 1e-3 of min_size makes the reference ambiguous"
        );
        let got = boxes::remove_small_boxes(&t1, 60.0).unwrap();
        assert_eq!(
            ints(&got),
            reference::keep_large(&r1, 60.0),
            "{device} remove_small seed {seed}"
        );
        let want: Vec<f64> = r2.iter().map(reference::area).collect();
        let got = boxes::box_area(&t2).unwrap();
        assert_close(
            &format!("{device} area seed {seed}"),
            &got,
            &f64_t(want, &[200]),
            1e-6,
        );
    }
}

crate::device_tests! {
    box_ops_random => check_box_ops_random_on;
}
