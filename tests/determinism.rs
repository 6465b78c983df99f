//! Deterministic by default: the ops that accumulate many contributions into one
//! element (RoIAlign backward, index_select backward) use no float atomics, so runs
//! on the emulated device (whose blocks run on parallel worker threads, so the
//! order of atomics would vary) give the same bits; and whole training steps give
//! bit-identical weights.

mod common;

use kestrel::app::profile::train_step_profiled;
use kestrel::autograd::Tape;
use kestrel::ops;
use kestrel::ops::roi_align::{roi_align_backward, RoiAlignParams};
use kestrel::optim::{Sgd, SgdConfig};
use kestrel::rng::Rng;
use kestrel::{Device, Tensor};

use common::bits;

/// Many RoIs over one small map: every feature pixel receives contributions from
/// many RoIs and bins.
fn roi_case(device: Device) -> (Tensor, Tensor, [usize; 4], RoiAlignParams) {
    let (n, c, h, w) = (2usize, 3usize, 9usize, 11usize);
    let k = 300;
    let mut r = Rng::new(5);
    let mut rois = Vec::with_capacity(k * 5);
    for i in 0..k {
        let (x1, y1) = (r.range(-4.0, 30.0), r.range(-4.0, 24.0));
        let (bw, bh) = (r.range(1.0, 20.0), r.range(1.0, 16.0));
        rois.extend_from_slice(&[
            (i % n) as f32,
            x1 as f32,
            y1 as f32,
            (x1 + bw) as f32,
            (y1 + bh) as f32,
        ]);
    }
    let p = RoiAlignParams::new((7, 7), 0.5, 2);
    let gy: Vec<f32> = common::randn(6, k * c * 49)
        .into_iter()
        .map(|v| v as f32)
        .collect();
    (
        Tensor::from_vec(gy, [k, c, 7, 7])
            .unwrap()
            .to_device(device)
            .unwrap(),
        Tensor::from_vec(rois, [k, 5])
            .unwrap()
            .to_device(device)
            .unwrap(),
        [n, c, h, w],
        p,
    )
}

#[test]
fn roi_align_backward_gives_the_same_bits_every_run_emulated() {
    let emu = common::emulated();
    let (gy, rois, dims, p) = roi_case(emu);
    let first = bits(&roi_align_backward(&gy, &rois, dims, p).unwrap());
    for run in 1..4 {
        let again = bits(&roi_align_backward(&gy, &rois, dims, p).unwrap());
        assert_eq!(again, first, "run {run} differs from run 0");
    }
    // And it is the CPU's result.
    let (gy_c, rois_c, _, _) = roi_case(Device::Cpu);
    let cpu = roi_align_backward(&gy_c, &rois_c, dims, p).unwrap();
    let got = roi_align_backward(&gy, &rois, dims, p).unwrap();
    common::assert_close("roi_align backward", &got, &cpu, 1e-5);
}

#[test]
fn index_select_backward_with_repeats_gives_the_same_bits_every_run_emulated() {
    let emu = common::emulated();
    let rows = 7;
    let x = Tensor::from_vec(vec![0f32; rows * 33], [rows, 33])
        .unwrap()
        .to_device(emu)
        .unwrap();
    // Every row picked many times: each gradient element is a long sum.
    let idx: Vec<i64> = (0..500).map(|i| (i * 37 % 11 % rows) as i64).collect();
    let idx = Tensor::from_vec_i64(idx, [500])
        .unwrap()
        .to_device(emu)
        .unwrap();
    let gy_host: Vec<f32> = common::randn(8, 500 * 33)
        .into_iter()
        .map(|v| v as f32 * 1e3)
        .collect();
    let run = || {
        let tape = Tape::new();
        tape.watch(&x);
        let y = {
            let _g = tape.activate();
            ops::index_select(&x, 0, &idx).unwrap()
        };
        let gy = Tensor::from_vec(gy_host.clone(), [500, 33])
            .unwrap()
            .to_device(emu)
            .unwrap();
        let grads = tape.backward_with(&y, gy).unwrap();
        grads.expect(&x).unwrap().clone()
    };
    let first = run();
    for r in 1..4 {
        assert_eq!(bits(&run()), bits(&first), "run {r} differs from run 0");
    }
    // The CPU adds the rows in the same order: the same bits.
    let xc = x.to_device(Device::Cpu).unwrap();
    let ic = idx.to_device(Device::Cpu).unwrap();
    let tape = Tape::new();
    tape.watch(&xc);
    let y = {
        let _g = tape.activate();
        ops::index_select(&xc, 0, &ic).unwrap()
    };
    let grads = tape
        .backward_with(&y, Tensor::from_vec(gy_host, [500, 33]).unwrap())
        .unwrap();
    assert_eq!(bits(&first), bits(grads.expect(&xc).unwrap()));
}

// ------------------------------------------------------------ training steps

/// Every parameter's bits after `steps` SGD steps from the fixture's weights.
fn train(device: Device, steps: usize) -> Vec<(String, Vec<u32>)> {
    let mut m = common::fixture_model(device);
    let (images, targets) = common::fixture_training_batch(device);
    let mut sgd = Sgd::new(SgdConfig {
        lr: 1e-2,
        momentum: 0.9,
        weight_decay: 1e-4,
        ..SgdConfig::default()
    })
    .unwrap();
    let mut rng = Rng::new(3);
    for _ in 0..steps {
        train_step_profiled(&mut m, &images, &targets, &mut sgd, &mut rng).unwrap();
    }
    let mut names = m.params.trainable_names();
    names.sort();
    names
        .into_iter()
        .map(|n| {
            let b = bits(m.params.get(&n).unwrap());
            (n, b)
        })
        .collect()
}

#[test]
fn two_training_runs_give_bit_identical_weights_emulated() {
    let emu = common::emulated();
    let a = train(emu, 2);
    let b = train(emu, 2);
    assert_eq!(a.len(), b.len());
    for ((na, wa), (nb, wb)) in a.iter().zip(&b) {
        assert_eq!(na, nb);
        let diff = wa.iter().zip(wb).filter(|(x, y)| x != y).count();
        assert_eq!(
            diff,
            0,
            "{na}: {diff} of {} weights differ between two runs",
            wa.len()
        );
    }
}
