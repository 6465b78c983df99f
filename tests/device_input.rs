//! Inputs without stalls (issue 14 item 3): 8-bit images go up in one pinned
//! host-to-device copy per batch, and normalisation, bilinear resizing and padding
//! run on the device in one launch (`transform_batch_u8`, kernels/transform.cu).
//!
//! The device batch is compared bit for bit with the CPU transform
//! (`image_from_u8` then `transform`, which matches torchvision) on random sizes
//! and aspect ratios, up- and down-scaling, and against torchvision's transformed
//! batch of the fixture images.

mod common;

use kestrel::detection::transform::{
    image_from_u8, transform, transform_u8, transform_uploaded, upload_u8, ImageU8, TransformConfig,
};
use kestrel::rng::Rng;
use kestrel::{Device, Tensor};

/// Random 8-bit images: `n` of them, sides in `lo..=hi` (independent, so every
/// aspect ratio occurs), values uniform in 0..=255.
fn random_images(rng: &mut Rng, n: usize, lo: usize, hi: usize) -> Vec<(Vec<u8>, usize, usize)> {
    (0..n)
        .map(|_| {
            let h = lo + rng.below((hi - lo + 1) as u64) as usize;
            let w = lo + rng.below((hi - lo + 1) as u64) as usize;
            let data = (0..3 * h * w).map(|_| rng.below(256) as u8).collect();
            (data, h, w)
        })
        .collect()
}

fn views(imgs: &[(Vec<u8>, usize, usize)]) -> Vec<ImageU8<'_>> {
    imgs.iter()
        .map(|(d, h, w)| ImageU8 {
            data: d,
            height: *h,
            width: *w,
        })
        .collect()
}

/// The CPU transform of the same bytes: the reference.
fn cpu_batch(
    imgs: &[(Vec<u8>, usize, usize)],
    cfg: &TransformConfig,
) -> (Tensor, Vec<(usize, usize)>) {
    let t: Vec<Tensor> = imgs
        .iter()
        .map(|(d, h, w)| image_from_u8(d, *h, *w).unwrap())
        .collect();
    let il = transform(&t, cfg).unwrap();
    (il.tensors, il.image_sizes)
}

fn assert_bits_equal(what: &str, got: &Tensor, want: &Tensor) {
    assert_eq!(got.dims(), want.dims(), "{what}: shapes");
    let (g, w) = (got.to_vec::<f32>().unwrap(), want.to_vec::<f32>().unwrap());
    let d = want.dims().to_vec();
    for (i, (a, b)) in g.iter().zip(&w).enumerate() {
        if a.to_bits() != b.to_bits() {
            let (hw, c) = (d[2] * d[3], d[1]);
            panic!(
                "{what}: element {i} (image {}, channel {}, y {}, x {}) is {a:e} on the device, {b:e} on the CPU",
                i / (c * hw),
                (i / hw) % c,
                (i % hw) / d[3],
                i % d[3]
            );
        }
    }
}

/// 40 random batches of 1..=3 images, sides 3..=90, with configs that shrink,
/// enlarge, hit max_size, and pad to 1, 8 or 32: the device batch equals the CPU
/// batch bit for bit (the padding included: the output block is poisoned with NaN
/// on the emulated device, so a pixel the kernel skipped would show), and each
/// batch costs exactly one host-to-device copy (pinned) and one launch.
fn check_random_batches(device: Device) {
    let mut rng = Rng::new(14);
    for case in 0..40 {
        let n = 1 + rng.below(3) as usize;
        let imgs = random_images(&mut rng, n, 3, 90);
        let min_size = 8 + rng.below(80) as usize;
        let max_size = min_size + rng.below(100) as usize;
        let mut cfg = TransformConfig::new(min_size, max_size);
        cfg.size_divisible = [1, 8, 32][case % 3];
        if case % 4 == 1 {
            cfg.mean = [0.5, 0.25, 0.0];
            cfg.std = [0.5, 1.0, 0.125];
        }
        let (want, want_sizes) = cpu_batch(&imgs, &cfg);
        let c = device.counters();
        let il = transform_u8(&views(&imgs), &cfg, device).unwrap();
        let d = c.delta();
        let sizes: Vec<_> = imgs.iter().map(|i| (i.1, i.2)).collect();
        let what = format!("case {case}: {sizes:?} with min {min_size} max {max_size}");
        assert_eq!(il.image_sizes, want_sizes, "{what}: resized sizes");
        if device.is_cuda() {
            assert_eq!(
                (d.htod, d.htod_pinned, d.launches),
                (1, 1, 1),
                "{what}: {d}"
            );
            assert_eq!((d.dtoh, d.memsets, d.syncs), (0, 0, 0), "{what}: {d}");
        }
        assert_bits_equal(&what, &il.tensors, &want);
    }
}

/// The fixture images (8-bit, as torchvision read them) against torchvision's
/// transformed batch, through the 8-bit device path.
fn check_fixture_batch(device: Device) {
    let f = common::fixture("model/eval.safetensors");
    let w = common::fixture("model/weights.safetensors");
    let p = w.params().unwrap();
    let cfg = TransformConfig::new(
        p["min_size"].as_u64().unwrap() as usize,
        p["max_size"].as_u64().unwrap() as usize,
    );
    let imgs: Vec<(Vec<u8>, usize, usize)> = (0..)
        .map(|i| format!("image{i}.u8"))
        .take_while(|n| f.contains(n))
        .map(|n| {
            let (v, s) = f.ints(&n).unwrap();
            (v.into_iter().map(|x| x as u8).collect(), s.dim(1), s.dim(2))
        })
        .collect();
    assert!(imgs.len() >= 2, "the fixture has {} images", imgs.len());
    let il = transform_u8(&views(&imgs), &cfg, device).unwrap();
    let (sizes, _) = f.ints("transform.image_sizes").unwrap();
    let want: Vec<(usize, usize)> = sizes
        .chunks(2)
        .map(|s| (s[0] as usize, s[1] as usize))
        .collect();
    assert_eq!(il.image_sizes, want, "resized sizes");
    // Same tolerance as tests/transform.rs: torchvision resizes with its vectorised
    // CPU kernel, whose sums are ordered differently (float rounding only).
    common::assert_close(
        "transform.batch",
        &il.tensors,
        &f.tensor("transform.batch").unwrap(),
        1e-5,
    );
    // And bit for bit the CPU transform of the same bytes.
    let (cpu, _) = cpu_batch(&imgs, &cfg);
    assert_bits_equal("fixture batch", &il.tensors, &cpu);
}

crate::device_tests! {
    u8_batches_equal_the_cpu_transform_bit_for_bit(emulated, cuda) => check_random_batches;
    u8_fixture_batch_matches_torchvision => check_fixture_batch;
}

/// Refilling an uploaded batch costs one copy and the transform then sees the new
/// images; other sizes are refused with an error naming both.
#[test]
fn refill_reuses_the_buffer_and_refuses_other_sizes_emulated() {
    common::on_emulated(|device| {
        let mut rng = Rng::new(3);
        let cfg = TransformConfig::new(24, 40);
        let a = random_images(&mut rng, 2, 10, 30);
        let b: Vec<_> = a
            .iter()
            .map(|(_, h, w)| {
                let d = (0..3 * h * w).map(|_| rng.below(256) as u8).collect();
                (d, *h, *w)
            })
            .collect();
        let mut up = upload_u8(&views(&a), &cfg, device).unwrap();
        let first = transform_uploaded(&up).unwrap();
        assert_bits_equal("batch a", &first.tensors, &cpu_batch(&a, &cfg).0);
        let c = device.counters();
        up.refill(&views(&b)).unwrap();
        let d = c.delta();
        assert_eq!(
            (d.htod, d.htod_pinned, d.driver_allocs + d.cached_allocs),
            (1, 1, 0),
            "{d}"
        );
        let second = transform_uploaded(&up).unwrap();
        assert_bits_equal("batch b", &second.tensors, &cpu_batch(&b, &cfg).0);
        let other = random_images(&mut rng, 2, 31, 40);
        let err = up.refill(&views(&other)).unwrap_err().to_string();
        assert!(err.contains("differ"), "{err}");
    });
}

#[test]
fn bad_images_are_errors_not_panics() {
    let cfg = TransformConfig::new(24, 40);
    for device in [Device::Cpu, common::emulated()] {
        let short = vec![0u8; 3 * 4 * 5 - 1];
        let r = transform_u8(
            &[ImageU8 {
                data: &short,
                height: 4,
                width: 5,
            }],
            &cfg,
            device,
        );
        let e = r.unwrap_err().to_string();
        assert!(e.contains("59 bytes for a 3x4x5 image"), "{e}");
        let e = transform_u8(&[], &cfg, device).unwrap_err().to_string();
        assert!(e.contains("no images"), "{e}");
        let empty = ImageU8 {
            data: &[],
            height: 0,
            width: 7,
        };
        let e = transform_u8(&[empty], &cfg, device)
            .unwrap_err()
            .to_string();
        assert!(e.contains("3x0x7"), "{e}");
    }
}
