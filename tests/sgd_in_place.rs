//! SGD in place: a step writes into the parameters' and momentum buffers' own
//! storage (same addresses every step, nothing allocated), except where another
//! holder shares a parameter's storage, which keeps seeing the old value (copy on
//! write). On the device the pointer table is uploaded once and reused while the
//! buffers stay the same.

mod common;

use kestrel::optim::{Sgd, SgdConfig};
use kestrel::tensor::Storage;
use kestrel::{Device, Tensor};

const SHAPES: [&[usize]; 5] = [&[3, 4], &[0, 5], &[1], &[2, 3, 5, 7], &[1000]];

fn tensors(seed: u64, device: Device) -> Vec<Tensor> {
    common::rand_f32_tensors(seed, &SHAPES, device)
}

/// The address of a tensor's elements, host or device.
fn addr(t: &Tensor) -> u64 {
    match t.storage() {
        Storage::Cpu(_) => t.cpu_slice::<f32>().unwrap().as_ptr() as u64,
        Storage::Cuda(g) => g.buf.ptr(),
    }
}

fn momentum_cfg() -> SgdConfig {
    SgdConfig {
        lr: 0.05,
        momentum: 0.9,
        weight_decay: 1e-2,
        ..SgdConfig::default()
    }
}

fn values(ts: &[Tensor]) -> Vec<Vec<f32>> {
    ts.iter().map(|t| t.to_vec::<f32>().unwrap()).collect()
}

/// After the first step (which creates the momentum buffers), every later step
/// leaves the parameters and buffers at the addresses they had; each updated
/// parameter gets a fresh id (its value changed); and the values are those of an
/// independent element-by-element evaluation of PyTorch's formula in f64.
fn addresses_stay(device: Device) {
    let cfg = momentum_cfg();
    let mut sgd = Sgd::new(cfg).unwrap();
    let mut params = tensors(1, device);
    let grads: Vec<Vec<Tensor>> = (0..3).map(|s| tensors(100 + 10 * s, device)).collect();
    // Reference, f64, written out here (not by the code under test).
    let mut p_ref: Vec<Vec<f64>> = values(&params)
        .iter()
        .map(|v| v.iter().map(|&x| x as f64).collect())
        .collect();
    let mut b_ref: Vec<Vec<f64>> = p_ref.iter().map(|v| vec![0.0; v.len()]).collect();
    for (step, g) in grads.iter().enumerate() {
        let before: Vec<u64> = params.iter().map(addr).collect();
        let ids: Vec<_> = params.iter().map(Tensor::id).collect();
        let bufs_before: Vec<u64> = sgd.state().iter().map(|(_, t)| addr(t)).collect();
        sgd.step(&mut params, g).unwrap();
        for (k, gk) in values(g).iter().enumerate() {
            for i in 0..gk.len() {
                let d = gk[i] as f64 + cfg.weight_decay * p_ref[k][i];
                b_ref[k][i] = if step == 0 {
                    d
                } else {
                    cfg.momentum * b_ref[k][i] + d
                };
                p_ref[k][i] -= cfg.lr * b_ref[k][i];
            }
        }
        for (k, p) in params.iter().enumerate() {
            if p.numel() > 0 {
                assert_eq!(
                    addr(p),
                    before[k],
                    "{device}: step {step} moved parameter {k}"
                );
                assert_ne!(p.id(), ids[k], "{device}: parameter {k} kept its id");
            }
        }
        if step > 0 {
            let bufs: Vec<u64> = sgd.state().iter().map(|(_, t)| addr(t)).collect();
            assert_eq!(
                bufs, bufs_before,
                "{device}: step {step} moved a momentum buffer"
            );
        }
    }
    for (k, (got, want)) in values(&params).iter().zip(&p_ref).enumerate() {
        for (i, (a, b)) in got.iter().zip(want).enumerate() {
            assert!(
                (*a as f64 - b).abs() <= 1e-5 * (1.0 + b.abs()),
                "{device}: parameter {k}[{i}] {a} vs f64 formula {b}"
            );
        }
    }
}

#[test]
fn a_step_keeps_every_buffer_in_place_cpu() {
    addresses_stay(Device::Cpu);
}

#[test]
fn a_step_keeps_every_buffer_in_place_emulated() {
    addresses_stay(common::emulated());
}

#[test]
#[ignore = "needs a CUDA device"]
fn a_step_keeps_every_buffer_in_place_cuda() {
    addresses_stay(Device::Cuda(0));
}

/// A parameter whose storage someone else holds (an EMA copy, a checkpoint, the
/// caller) is copied before the update: the other holder still sees the old value,
/// and the result is the same as without the clone.
fn shared_parameters_are_copied(device: Device) {
    let cfg = momentum_cfg();
    let grads = tensors(7, device);
    let mut alone = tensors(1, device);
    let mut shared = tensors(1, device);
    let held: Vec<Tensor> = shared.clone();
    let held_before = values(&held);
    let mut a = Sgd::new(cfg).unwrap();
    let mut b = Sgd::new(cfg).unwrap();
    for _ in 0..2 {
        a.step(&mut alone, &grads).unwrap();
        b.step(&mut shared, &grads).unwrap();
    }
    assert_eq!(values(&held), held_before, "{device}: a held clone changed");
    assert_eq!(
        values(&shared),
        values(&alone),
        "{device}: copy on write changed the result"
    );
    for (k, (s, h)) in shared.iter().zip(&held).enumerate() {
        if s.numel() > 0 {
            assert_ne!(
                addr(s),
                addr(h),
                "{device}: parameter {k} written in place while shared"
            );
        }
    }
}

#[test]
fn shared_parameters_are_copied_not_overwritten_cpu() {
    shared_parameters_are_copied(Device::Cpu);
}

#[test]
fn shared_parameters_are_copied_not_overwritten_emulated() {
    shared_parameters_are_copied(common::emulated());
}

/// On the device: the first step uploads the pointer table (without dampening its
/// first step is a later step from a zeroed buffer, so the table has no "first
/// step" flag to flip; before, the second step uploaded it again); from the second
/// on a step uploads nothing, allocates nothing from the driver or the
/// cache, reads nothing back and waits for nothing: one launch plus one device copy
/// per non-empty gradient into the optimizer's persistent staging buffers.
#[test]
fn the_pointer_table_is_uploaded_once_emulated() {
    let emu = common::emulated();
    let mut sgd = Sgd::new(momentum_cfg()).unwrap();
    let mut params = tensors(1, emu);
    let nonempty = params.iter().filter(|p| p.numel() > 0).count() as u64;
    let mut per_step = Vec::new();
    for s in 0..5 {
        // Fresh gradient buffers every step, as the autograd gives them.
        let grads = tensors(100 + s, emu);
        let c = emu.counters();
        sgd.step(&mut params, &grads).unwrap();
        per_step.push(c.delta());
    }
    assert_eq!(per_step[0].htod, 1, "first step: {}", per_step[0]);
    for (s, d) in per_step.iter().enumerate().skip(1) {
        assert_eq!(d.htod, 0, "step {s} uploaded: {d}");
        assert_eq!(d.launches, 1, "step {s}: {d}");
        assert_eq!(d.dtod, nonempty, "step {s}: {d}");
        assert_eq!(
            (d.driver_allocs, d.cached_allocs, d.dtoh, d.syncs, d.memsets),
            (0, 0, 0, 0, 0),
            "step {s}: {d}"
        );
    }
    // A replaced parameter buffer is noticed: the table goes up again.
    params[0] = Tensor::from_vec(vec![0.5f32; 12], [3, 4])
        .unwrap()
        .to_device(emu)
        .unwrap();
    let grads = tensors(200, emu);
    let c = emu.counters();
    sgd.step(&mut params, &grads).unwrap();
    assert_eq!(c.delta().htod, 1, "replaced buffer: {}", c.delta());
}
