//! The small data-parallel test model of the dist tests: `LAYERS` relu(linear) layers
//! of width `D` and a sum-of-squares loss, with seeded weights and per-rank inputs.

use kestrel::ops;
use kestrel::rng::Rng;
use kestrel::{Device, Result, Tensor};

/// Width of every layer.
pub const D: usize = 6;
/// Number of layers (one parameter each, so one bucket per layer at a small cap).
pub const LAYERS: usize = 4;

/// `LAYERS` weights `[D, D]` uniform in [-0.5, 0.5) from `seed`, on `dev`.
pub fn weights(seed: u64, dev: Device) -> Vec<Tensor> {
    let mut rng = Rng::new(seed);
    (0..LAYERS)
        .map(|_| {
            let v: Vec<f32> = (0..D * D).map(|_| rng.range(-0.5, 0.5) as f32).collect();
            Tensor::from_vec(v, [D, D]).unwrap().to_device(dev).unwrap()
        })
        .collect()
}

/// A `[3, D]` input uniform in [-1, 1) from `seed` (one per rank), on `dev`.
pub fn input(seed: u64, dev: Device) -> Tensor {
    let mut rng = Rng::new(seed);
    let v: Vec<f32> = (0..3 * D).map(|_| rng.range(-1.0, 1.0) as f32).collect();
    Tensor::from_vec(v, [3, D]).unwrap().to_device(dev).unwrap()
}

/// sum(h * h) of the last layer's output h.
pub fn forward(ws: &[Tensor], x: &Tensor) -> Result<Tensor> {
    let mut h = x.clone();
    for w in ws {
        h = ops::relu(&ops::linear::linear(&h, w, None)?)?;
    }
    ops::sum(&ops::mul(&h, &h)?)
}
