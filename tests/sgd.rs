//! SGD with momentum and weight decay (kernels/sgd.cu) against PyTorch's update
//! formula written out in f64, exact resume, and error cases, on the CPU, the emulated
//! device and CUDA.

mod common;

use common::*;
use kestrel::optim::{Sgd, SgdConfig};
use kestrel::{DType, Device, Tensor};

/// torch.optim.SGD's update written out in f64 for one parameter.
struct SgdRef {
    buf: Option<Vec<f64>>,
}

impl SgdRef {
    fn step(&mut self, c: &SgdConfig, p: &mut [f64], g: &[f64]) {
        let mut d: Vec<f64> = g
            .iter()
            .zip(p.iter())
            .map(|(g, p)| g + c.weight_decay * p)
            .collect();
        if c.momentum != 0.0 {
            let buf = match self.buf.take() {
                None => d.clone(),
                Some(b) => b
                    .iter()
                    .zip(&d)
                    .map(|(b, d)| c.momentum * b + (1.0 - c.dampening) * d)
                    .collect(),
            };
            d = if c.nesterov {
                d.iter()
                    .zip(&buf)
                    .map(|(d, b)| d + c.momentum * b)
                    .collect()
            } else {
                buf.clone()
            };
            self.buf = Some(buf);
        }
        for (p, d) in p.iter_mut().zip(&d) {
            *p -= c.lr * d;
        }
    }
}

fn sgd_configs() -> Vec<SgdConfig> {
    let c = |lr, momentum, weight_decay, dampening, nesterov| SgdConfig {
        lr,
        momentum,
        weight_decay,
        dampening,
        nesterov,
    };
    vec![
        c(0.1, 0.0, 0.0, 0.0, false),
        c(0.1, 0.0, 0.01, 0.0, false),
        c(0.02, 0.9, 1e-4, 0.0, false), // torchvision's detection recipe
        c(0.05, 0.9, 5e-4, 0.1, false),
        c(0.1, 0.8, 0.01, 0.0, true),
        c(0.01, 0.5, 0.0, 0.5, false),
    ]
}

/// Several steps over two parameters with a learning-rate change halfway, against the
/// f64 loop; `tol` is the relative tolerance of the final parameters and buffers.
fn check_sgd_on(device: Device, dtype: DType, tol: f64) {
    let shapes = [vec![3, 4], vec![5]];
    for cfg in sgd_configs() {
        let mut opt = Sgd::new(cfg).unwrap();
        let mut refs: Vec<SgdRef> = shapes.iter().map(|_| SgdRef { buf: None }).collect();
        let mut ref_p: Vec<Vec<f64>> = shapes
            .iter()
            .enumerate()
            .map(|(i, s)| randn(i as u64, s.iter().product()))
            .collect();
        let to_dev = |v: &[f64], s: &[usize]| {
            let t = Tensor::from_vec(v.to_vec(), s.to_vec()).unwrap();
            t.to_dtype(dtype).unwrap().to_device(device).unwrap()
        };
        let mut params: Vec<Tensor> = ref_p
            .iter()
            .zip(&shapes)
            .map(|(v, s)| to_dev(v, s))
            .collect();
        let mut ref_cfg = cfg;
        for step in 0..5u64 {
            if step == 3 {
                opt.set_lr(cfg.lr * 0.1).unwrap();
                ref_cfg.lr = cfg.lr * 0.1;
            }
            let g: Vec<Vec<f64>> = shapes
                .iter()
                .enumerate()
                .map(|(i, s)| randn(50 + 10 * step + i as u64, s.iter().product()))
                .collect();
            // The reference sees the gradients as the optimizer does (rounded to dtype).
            let g_round: Vec<Vec<f64>> = g
                .iter()
                .map(|v| {
                    v.iter()
                        .map(|&x| {
                            if dtype == DType::F32 {
                                x as f32 as f64
                            } else {
                                x
                            }
                        })
                        .collect()
                })
                .collect();
            let grads: Vec<Tensor> = g.iter().zip(&shapes).map(|(v, s)| to_dev(v, s)).collect();
            let ids: Vec<_> = params.iter().map(|p| p.id()).collect();
            opt.step(&mut params, &grads).unwrap();
            for (i, r) in refs.iter_mut().enumerate() {
                r.step(&ref_cfg, &mut ref_p[i], &g_round[i]);
                assert_ne!(
                    params[i].id(),
                    ids[i],
                    "step must replace parameter {i} with a new tensor"
                );
                assert_eq!(params[i].device(), device);
            }
        }
        let state = opt.state();
        for (i, p) in params.iter().enumerate() {
            let what = format!("{cfg:?} on {device} {dtype}: param {i}");
            assert_vec_close(&what, &p.to_vec().unwrap(), &ref_p[i], tol);
            match &refs[i].buf {
                Some(b) => {
                    let (name, t) = &state[i];
                    assert_eq!(name, &format!("momentum_buffer.{i}"));
                    assert_vec_close(&format!("{what} buffer"), &t.to_vec().unwrap(), b, tol);
                }
                None => assert!(state.is_empty(), "{what}: no momentum, no state"),
            }
        }
    }
}

crate::device_tests! {
    sgd_matches_pytorch_formula => |d| {
        check_sgd_on(d, DType::F32, 1e-6);
        // f64 parameters exist on the CPU only (gradient checks).
        if d == Device::Cpu {
            check_sgd_on(d, DType::F64, 1e-13);
        }
    };
}

/// Stopping after two steps, saving the state and resuming in a new optimizer ends
/// exactly where four uninterrupted steps end.
fn check_sgd_resume_on(device: Device) {
    let cfg = SgdConfig {
        lr: 0.05,
        momentum: 0.9,
        weight_decay: 1e-4,
        dampening: 0.0,
        nesterov: false,
    };
    let p0 = vec![
        f32_on(&randn(1, 8), &[2, 4], device),
        f32_on(&randn(2, 3), &[3], device),
    ];
    let grads: Vec<Vec<Tensor>> = (0..4)
        .map(|s| {
            vec![
                f32_on(&randn(10 + s, 8), &[2, 4], device),
                f32_on(&randn(20 + s, 3), &[3], device),
            ]
        })
        .collect();
    let mut straight = p0.clone();
    let mut opt = Sgd::new(cfg).unwrap();
    for g in &grads {
        opt.step(&mut straight, g).unwrap();
    }
    let mut resumed = p0.clone();
    let mut first = Sgd::new(cfg).unwrap();
    for g in &grads[..2] {
        first.step(&mut resumed, g).unwrap();
    }
    // A checkpoint is read on the CPU: the buffers come back as CPU tensors.
    let saved: Vec<(String, Tensor)> = first
        .state()
        .into_iter()
        .map(|(n, t)| (n, t.to_device(Device::Cpu).unwrap()))
        .collect();
    let mut second = Sgd::new(cfg).unwrap();
    second.load_state(&saved).unwrap();
    for g in &grads[2..] {
        second.step(&mut resumed, g).unwrap();
    }
    for (a, b) in straight.iter().zip(&resumed) {
        assert_eq!(
            a.to_vec::<f32>().unwrap(),
            b.to_vec::<f32>().unwrap(),
            "resume on {device} differs"
        );
    }
}

crate::device_tests! {
    sgd_resume_is_exact => check_sgd_resume_on;
}

#[test]
fn sgd_skips_parameters_without_gradient() {
    let cfg = SgdConfig {
        lr: 0.1,
        momentum: 0.9,
        ..SgdConfig::default()
    };
    let mut opt = Sgd::new(cfg).unwrap();
    let mut params = vec![
        f32_on(&[1.0, 2.0], &[2], Device::Cpu),
        f32_on(&[3.0], &[1], Device::Cpu),
    ];
    let g0 = f32_on(&[1.0, 1.0], &[2], Device::Cpu);
    let g1 = f32_on(&[2.0], &[1], Device::Cpu);
    opt.step(&mut params, &[g0.clone(), g1.clone()]).unwrap();
    let before = params[1].clone();
    opt.step_optional(&mut params, &[Some(&g0), None]).unwrap();
    assert_eq!(
        params[1].id(),
        before.id(),
        "parameter without gradient replaced"
    );
    // buf0 = 0.9 * 1 + 1 = 1.9; p0 = (1 - 0.1) - 0.19 = 0.71 and (2 - 0.1) - 0.19 = 1.71.
    assert_vec_close("p0", &params[0].to_vec().unwrap(), &[0.71, 1.71], 1e-6);
    let state = opt.state();
    assert_vec_close("buf1 untouched", &state[1].1.to_vec().unwrap(), &[2.0], 0.0);
}

#[test]
fn sgd_errors() {
    let bad = [
        SgdConfig {
            lr: -0.1,
            ..SgdConfig::default()
        },
        SgdConfig {
            momentum: -0.5,
            ..SgdConfig::default()
        },
        SgdConfig {
            weight_decay: f64::NAN,
            ..SgdConfig::default()
        },
        SgdConfig {
            nesterov: true,
            ..SgdConfig::default()
        },
        SgdConfig {
            nesterov: true,
            momentum: 0.9,
            dampening: 0.1,
            ..SgdConfig::default()
        },
    ];
    for cfg in bad {
        let e = Sgd::new(cfg).unwrap_err().to_string();
        assert!(e.contains("Sgd"), "{cfg:?}: {e}");
    }
    let mut opt = Sgd::new(SgdConfig {
        momentum: 0.9,
        ..SgdConfig::default()
    })
    .unwrap();
    assert!(opt.set_lr(-1.0).is_err());
    assert_eq!(opt.lr(), 1e-3);
    let mut params = vec![f32_on(&[1.0, 2.0], &[2], Device::Cpu)];
    let wrong = f32_on(&[1.0, 2.0, 3.0], &[3], Device::Cpu);
    let e = opt.step(&mut params, &[wrong]).unwrap_err().to_string();
    assert!(
        e.contains("Sgd::step") && e.contains("[3]") && e.contains("[2]"),
        "{e}"
    );
    let e = opt.step(&mut params, &[]).unwrap_err().to_string();
    assert!(e.contains("0 gradients for 1 parameters"), "{e}");
    let e = opt
        .load_state(&[("velocity.0".into(), params[0].clone())])
        .unwrap_err()
        .to_string();
    assert!(e.contains("velocity.0"), "{e}");
    let wrong_buf = f32_on(&[1.0], &[1], Device::Cpu);
    opt.load_state(&[("momentum_buffer.0".into(), wrong_buf)])
        .unwrap();
    let g = f32_on(&[1.0, 1.0], &[2], Device::Cpu);
    let before = params[0].clone();
    let e = opt.step(&mut params, &[g]).unwrap_err().to_string();
    assert!(e.contains("momentum buffer [1]"), "{e}");
    assert_eq!(
        params[0].id(),
        before.id(),
        "a failed step must not change the parameters"
    );
}
