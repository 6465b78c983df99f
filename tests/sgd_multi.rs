//! SGD over every parameter in one launch (`sgd_multi_f32`, kernels/sgd.cu) on the
//! emulated device: the CPU's result for parameters of many shapes (empty ones
//! included), with and without momentum, and what a step costs on the device.

mod common;

use kestrel::optim::{Sgd, SgdConfig};
use kestrel::{Device, Tensor};

fn shapes() -> Vec<Vec<usize>> {
    vec![
        vec![3, 4],
        vec![0, 5],
        vec![1],
        vec![2, 3, 5, 7],
        vec![1000],
        vec![17],
    ]
}

fn tensors(seed: u64, device: Device) -> Vec<Tensor> {
    let shapes = shapes();
    let shapes: Vec<&[usize]> = shapes.iter().map(|s| s.as_slice()).collect();
    common::rand_f32_tensors(seed, &shapes, device)
}

/// Three steps of `cfg` on `device`; returns the parameters and momentum buffers.
fn run(cfg: SgdConfig, device: Device) -> (Vec<Vec<f32>>, Vec<Vec<f32>>) {
    let mut sgd = Sgd::new(cfg).unwrap();
    let mut params = tensors(1, device);
    for step in 0..3 {
        let grads = tensors(100 + 10 * step, device);
        sgd.step(&mut params, &grads).unwrap();
    }
    let p = params.iter().map(|t| t.to_vec::<f32>().unwrap()).collect();
    let b = sgd
        .state()
        .iter()
        .map(|(_, t)| t.to_vec::<f32>().unwrap())
        .collect();
    (p, b)
}

fn assert_near(what: &str, got: &[Vec<f32>], want: &[Vec<f32>]) {
    assert_eq!(got.len(), want.len(), "{what}: tensor count");
    for (k, (g, w)) in got.iter().zip(want).enumerate() {
        assert_eq!(g.len(), w.len(), "{what} {k}: length");
        for (i, (a, b)) in g.iter().zip(w).enumerate() {
            assert!(
                (a - b).abs() <= 1e-6 * (1.0 + b.abs()),
                "{what} tensor {k} element {i}: {a} vs CPU {b}"
            );
        }
    }
}

#[test]
fn one_launch_updates_every_parameter_as_the_cpu_does_emulated() {
    let emu = common::emulated();
    for cfg in [
        SgdConfig {
            lr: 0.1,
            ..SgdConfig::default()
        },
        SgdConfig {
            lr: 0.05,
            momentum: 0.9,
            weight_decay: 1e-2,
            dampening: 0.1,
            nesterov: false,
        },
        SgdConfig {
            lr: 0.02,
            momentum: 0.8,
            weight_decay: 1e-4,
            dampening: 0.0,
            nesterov: true,
        },
    ] {
        let (p_cpu, b_cpu) = run(cfg, Device::Cpu);
        let (p_emu, b_emu) = run(cfg, emu);
        assert_near(&format!("{cfg:?} params"), &p_emu, &p_cpu);
        assert_near(&format!("{cfg:?} buffers"), &b_emu, &b_cpu);
    }
}

#[test]
fn a_step_is_one_launch_and_one_table_upload_emulated() {
    let emu = common::emulated();
    let mut sgd = Sgd::new(SgdConfig {
        lr: 0.1,
        momentum: 0.9,
        ..SgdConfig::default()
    })
    .unwrap();
    let mut params = tensors(1, emu);
    let grads = tensors(2, emu);
    let c = emu.counters();
    sgd.step(&mut params, &grads).unwrap();
    assert_eq!(c.delta().htod, 1, "the pointer table only: {}", c.delta());
    // Without dampening the first step's table (momentum from a zeroed buffer)
    // serves the later steps: nothing goes up.
    let c = emu.counters();
    sgd.step(&mut params, &grads).unwrap();
    let d = c.delta();
    assert_eq!(d.launches, 1, "{d}");
    assert_eq!(d.htod, 0, "the table is the first step's: {d}");
    assert_eq!((d.dtoh, d.syncs, d.memsets), (0, 0, 0), "{d}");
}
