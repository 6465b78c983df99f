//! GeneralizedRCNNTransform (kernels/transform.cu) parity with torchvision
//! (fixtures/model/eval.safetensors) on the CPU, the emulated device and CUDA.

mod common;

use kestrel::detection::transform::{
    image_from_u8, resize_boxes, resized_size, transform, TransformConfig,
};
use kestrel::{Device, Tensor};

fn model_cfg() -> TransformConfig {
    let w = common::fixture("model/weights.safetensors");
    let p = w.params().unwrap();
    TransformConfig::new(
        p["min_size"].as_u64().unwrap() as usize,
        p["max_size"].as_u64().unwrap() as usize,
    )
}

fn fixture_images() -> Vec<Tensor> {
    let f = common::fixture("model/eval.safetensors");
    (0..)
        .map(|i| format!("image{i}.u8"))
        .take_while(|n| f.contains(n))
        .map(|n| {
            let (v, s) = f.ints(&n).unwrap();
            let bytes: Vec<u8> = v.into_iter().map(|x| x as u8).collect();
            image_from_u8(&bytes, s.dim(1), s.dim(2)).unwrap()
        })
        .collect()
}

fn check_transform_on(device: Device) {
    let f = common::fixture("model/eval.safetensors");
    let imgs: Vec<Tensor> = fixture_images()
        .iter()
        .map(|t| t.to_device(device).unwrap())
        .collect();
    let il = transform(&imgs, &model_cfg()).unwrap();
    let (sizes, _) = f.ints("transform.image_sizes").unwrap();
    let want: Vec<(usize, usize)> = sizes
        .chunks(2)
        .map(|s| (s[0] as usize, s[1] as usize))
        .collect();
    assert_eq!(il.image_sizes, want, "resized sizes");
    common::assert_close(
        "transform.batch",
        &il.tensors,
        &f.tensor("transform.batch").unwrap(),
        1e-5,
    );
}

crate::device_tests! {
    transform_matches_torchvision => check_transform_on;
}

#[test]
fn resized_size_rounds_like_torchvision() {
    // 300x451 with (320, 480): 451 * (480/451) is just under 480 in f64, so 479.
    let f = common::fixture("model/eval.safetensors");
    let p = f.params().unwrap();
    let cfg = model_cfg();
    for (o, r) in p["original_sizes"]
        .as_array()
        .unwrap()
        .iter()
        .zip(p["image_sizes"].as_array().unwrap())
    {
        let (h, w) = (
            o[0].as_u64().unwrap() as usize,
            o[1].as_u64().unwrap() as usize,
        );
        let got = resized_size(h, w, cfg.min_size, cfg.max_size);
        assert_eq!(
            got,
            (
                r[0].as_u64().unwrap() as usize,
                r[1].as_u64().unwrap() as usize
            ),
            "from {h}x{w}"
        );
    }
}

#[test]
fn bad_images_are_errors() {
    let cfg = TransformConfig::new(32, 64);
    assert!(transform(&[], &cfg).is_err());
    let gray = Tensor::from_vec(vec![0.5f32; 16], [1, 4, 4]).unwrap();
    assert!(transform(&[gray], &cfg)
        .unwrap_err()
        .to_string()
        .contains("[1, 4, 4]"));
    assert!(image_from_u8(&[0u8; 10], 2, 2).is_err());
    let boxes = Tensor::from_vec(vec![1.0f32, 2.0, 3.0], [3]).unwrap();
    assert!(resize_boxes(&boxes, (10, 10), (20, 20)).is_err());
}

#[test]
fn resize_boxes_scales_each_axis() {
    let b = Tensor::from_vec(vec![10.0f32, 20.0, 30.0, 40.0], [1, 4]).unwrap();
    let r = resize_boxes(&b, (100, 200), (50, 400))
        .unwrap()
        .to_vec::<f32>()
        .unwrap();
    assert_eq!(r, vec![20.0, 10.0, 60.0, 20.0]);
}
