//! The per-thread device counters of the launch interface (src/device/gpu.rs,
//! src/device/alloc.rs) on the emulated device: each kind of call is counted once,
//! per thread; and what a small-model inference batch and training step cost after
//! a warm-up (no allocation from the driver).

mod common;

use kestrel::app::profile::train_step_profiled;
use kestrel::detection::transform::image_from_u8;
use kestrel::detection::Target;
use kestrel::device::emu;
use kestrel::device::gpu::Counters;
use kestrel::optim::{Sgd, SgdConfig};
use kestrel::rng::Rng;
use kestrel::{Device, Tensor};

/// The model tests measure the device's cache: a test running beside them would
/// hold blocks they expect to find free.
static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn each_kind_of_call_is_counted_once_emulated() {
    let device = common::emulated();
    let dev = emu::gpu_device().unwrap();
    let c = device.counters();
    let x = Tensor::from_vec(vec![-1.0f32, 2.0, -3.0], [3])
        .unwrap()
        .to_device(device)
        .unwrap();
    let after_upload = c.delta();
    assert_eq!(after_upload.htod, 1, "{after_upload}");
    assert_eq!(after_upload.htod_bytes, 12, "{after_upload}");
    assert_eq!(after_upload.launches, 0, "{after_upload}");

    let y = kestrel::ops::relu(&x).unwrap();
    assert_eq!(c.delta().launches, 1, "{}", c.delta());
    assert_eq!(y.to_vec::<f32>().unwrap(), vec![0.0, 2.0, 0.0]);
    let d = c.delta();
    assert_eq!((d.dtoh, d.dtoh_bytes), (1, 12), "{d}");
    assert_eq!(d.memsets, 0, "relu writes every element: no zero-fill, {d}");

    dev.backend.synchronize().unwrap();
    let _z = Tensor::gpu_zeros(&dev, [4]).unwrap();
    let b = dev.alloc(16).unwrap();
    dev.backend
        .copy_dtod(&y.gpu().unwrap().buf, &b, 12)
        .unwrap();
    let d = c.delta();
    assert_eq!(d.syncs, 1, "{d}");
    assert_eq!(d.memsets, 1, "{d}");
    assert_eq!(d.dtod, 1, "{d}");
    assert_eq!(
        d.driver_allocs + d.cached_allocs,
        4,
        "x, y, the zeros and b: {d}"
    );
}

#[test]
fn counters_are_per_thread_emulated() {
    let device = common::emulated();
    let c = device.counters();
    std::thread::spawn(move || {
        let x = Tensor::from_vec(vec![1.0f32; 64], [64])
            .unwrap()
            .to_device(device)
            .unwrap();
        kestrel::ops::relu(&x).unwrap().to_vec::<f32>().unwrap();
    })
    .join()
    .unwrap();
    assert_eq!(
        c.delta(),
        Counters::default(),
        "another thread's work was counted here"
    );
    assert_eq!(Device::Cpu.counters().delta(), Counters::default());
}

// ------------------------------------------------------------ the small model

fn images(device: Device) -> Vec<Tensor> {
    let f = common::fixture("model/eval.safetensors");
    (0..)
        .map(|i| format!("image{i}.u8"))
        .take_while(|n| f.contains(n))
        .map(|n| {
            let (v, s) = f.ints(&n).unwrap();
            let bytes: Vec<u8> = v.into_iter().map(|x| x as u8).collect();
            image_from_u8(&bytes, s.dim(1), s.dim(2))
                .unwrap()
                .to_device(device)
                .unwrap()
        })
        .collect()
}

fn targets(n: usize) -> Vec<Target> {
    let f = common::fixture("model/train.safetensors");
    common::fixture_targets(&f).into_iter().take(n).collect()
}

#[test]
fn inference_after_a_warm_up_allocates_nothing_from_the_driver_emulated() {
    let _l = LOCK.lock().unwrap_or_else(|p| p.into_inner());
    let device = common::emulated();
    let m = common::fixture_model(device);
    let imgs = images(device);
    m.detect(&imgs).unwrap(); // warm-up: fills the cache
    let c = device.counters();
    let dets = m.detect(&imgs).unwrap();
    let d = c.delta();
    eprintln!(
        "inference of {} images (emulated, after warm-up): {d}",
        imgs.len()
    );
    assert!(!dets.is_empty());
    assert!(d.launches > 0, "{d}");
    assert_eq!(d.driver_allocs, 0, "{d}");
}

#[test]
fn a_training_step_after_a_warm_up_allocates_nothing_from_the_driver_emulated() {
    let _l = LOCK.lock().unwrap_or_else(|p| p.into_inner());
    let device = common::emulated();
    let mut m = common::fixture_model(device);
    let imgs = images(device);
    let t = targets(imgs.len());
    let mut sgd = Sgd::new(SgdConfig {
        lr: 1e-3,
        momentum: 0.9,
        weight_decay: 1e-4,
        ..SgdConfig::default()
    })
    .unwrap();
    let mut rng = Rng::new(0);
    // Warm-up: the first step has no momentum buffers to read, the second holds the
    // old and the new ones at once, and sampled RoI counts vary a little from step
    // to step, so the cache fills over a few steps; stop at the first step that
    // needs nothing from the driver (at most four).
    let mut warm = 0;
    for _ in 0..4 {
        let c = device.counters();
        train_step_profiled(&mut m, &imgs, &t, &mut sgd, &mut rng).unwrap();
        warm += 1;
        if c.delta().driver_allocs == 0 {
            break;
        }
    }
    eprintln!("warm-up: {warm} training steps");
    device.reset_peak_memory();
    let c = device.counters();
    let (loss, stages) = train_step_profiled(&mut m, &imgs, &t, &mut sgd, &mut rng).unwrap();
    let d = c.delta();
    let mem = device.memory();
    eprintln!(
        "training step of {} images (emulated, after warm-up): {d}; peak allocated {} B, reserved {} B",
        imgs.len(),
        mem.peak_allocated,
        mem.reserved
    );
    for (name, s) in &stages.1 {
        eprintln!("  {name:<12} {s}");
    }
    assert!(loss.is_finite(), "loss {loss}");
    assert!(d.launches > 0, "{d}");
    assert_eq!(d.driver_allocs, 0, "{d}");
}
