//! Stage timings of [`FasterRcnn`] for `kestrel bench`: the model's own
//! [`FasterRcnn::detect_staged`] and [`FasterRcnn::losses_staged`] passes with a
//! device synchronisation and a clock reading at each stage boundary, then the
//! backward pass and an SGD step.
//!
//! Timing the real pass (not a copy of it) keeps the profile true when the model
//! changes. Synchronising at each cut makes CUDA times per stage honest at the price
//! of a few idle gaps.

use std::time::Instant;

use crate::autograd::Tape;
use crate::detection::{FasterRcnn, Target};
use crate::device::gpu::{CounterScope, Counters};
use crate::device::Device;
use crate::error::Result;
use crate::optim::sgd::Sgd;
use crate::rng::Rng;
use crate::tensor::Tensor;
use crate::Detections;

pub use crate::detection::faster_rcnn::{INFERENCE_STAGES, TRAINING_STAGES};

/// Seconds per stage of one pass, in stage order, and the device work each stage
/// asked for ([`Counters`] of the calling thread; zero on the CPU). The
/// synchronisation at each cut is the profiler's own and is not counted.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StageTimes(
    pub Vec<(&'static str, f64)>,
    pub Vec<(&'static str, Counters)>,
);

impl StageTimes {
    /// Sum of the stages, seconds.
    pub fn total(&self) -> f64 {
        self.0.iter().map(|s| s.1).sum()
    }

    /// Sum of the stages' counters.
    pub fn total_counters(&self) -> Counters {
        self.1
            .iter()
            .fold(Counters::default(), |acc, s| acc.plus(&s.1))
    }
}

/// Wait for the device's queued work (a no-op on the CPU).
pub fn synchronize(device: Device) -> Result<()> {
    if let Device::Cuda(n) = device {
        crate::device::gpu::device(n)?.backend.synchronize()?;
    }
    Ok(())
}

/// Cuts a pass into stages: each `lap` waits for the device and books the time since
/// the previous cut under a name.
struct Laps {
    device: Device,
    last: Instant,
    counters: CounterScope,
    times: StageTimes,
}

impl Laps {
    fn start(device: Device) -> Result<Laps> {
        synchronize(device)?;
        Ok(Laps {
            device,
            last: Instant::now(),
            counters: device.counters(),
            times: StageTimes::default(),
        })
    }

    fn lap(&mut self, name: &'static str) -> Result<()> {
        let counted = self.counters.delta();
        synchronize(self.device)?;
        let now = Instant::now();
        self.times
            .0
            .push((name, now.duration_since(self.last).as_secs_f64()));
        self.times.1.push((name, counted));
        self.counters.reset();
        self.last = now;
        Ok(())
    }
}

/// The device of the model's parameters.
fn model_device(m: &FasterRcnn) -> Device {
    m.params
        .iter()
        .next()
        .map(|(_, t)| t.device())
        .unwrap_or(Device::Cpu)
}

/// [`FasterRcnn::detect`] timed per stage ([`INFERENCE_STAGES`]).
pub fn detect_profiled(
    model: &FasterRcnn,
    images: &[Tensor],
) -> Result<(Vec<Detections>, StageTimes)> {
    let mut laps = Laps::start(model_device(model))?;
    let trace = model.detect_staged(images, &mut |s| laps.lap(s))?;
    Ok((trace.detections, laps.times))
}

/// One training step timed per stage ([`TRAINING_STAGES`]): the four losses of
/// [`FasterRcnn::losses`], their sum's backward into every trainable parameter, and
/// an `sgd` step that replaces the parameters. Returns the summed loss and the times.
pub fn train_step_profiled(
    model: &mut FasterRcnn,
    images: &[Tensor],
    targets: &[Target],
    sgd: &mut Sgd,
    rng: &mut Rng,
) -> Result<(f64, StageTimes)> {
    let mut laps = Laps::start(model_device(model))?;
    let names = model.params.trainable_names();
    let tape = Tape::new();
    for n in &names {
        tape.watch(model.params.get(n)?);
    }
    let (total, grads) = {
        let ctx = model.ctx(true);
        let guard = tape.activate();
        let losses = model.losses_staged(&ctx, images, targets, rng, &mut |s| laps.lap(s))?;
        let mut total = losses[0].1.clone();
        for (_, l) in &losses[1..] {
            total = crate::ops::add(&total, l)?;
        }
        drop(guard);
        let grads = tape.backward(&total)?;
        laps.lap("backward")?;
        (total.item()?, grads)
    };
    drop(tape);
    let mut params: Vec<Tensor> = Vec::with_capacity(names.len());
    for n in &names {
        params.push(model.params.get(n)?.clone());
    }
    let g: Vec<Option<&Tensor>> = params.iter().map(|p| grads.get(p)).collect();
    let mut new = params.clone();
    sgd.step_optional(&mut new, &g)?;
    drop(g);
    drop(grads);
    for (n, t) in names.iter().zip(new) {
        model.params.set(n, t)?;
    }
    laps.lap("optimizer")?;
    Ok((total, laps.times))
}
