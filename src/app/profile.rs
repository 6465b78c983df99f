//! Stage timings of [`FasterRcnn`] for `kestrel bench`: the model's own
//! [`FasterRcnn::detect_timed`] and [`FasterRcnn::losses_staged`] passes with a
//! device synchronisation and a clock reading at each stage boundary, then the
//! backward pass and an SGD step.
//!
//! Timing the real pass (not a copy of it) keeps the profile true when the model
//! changes. Synchronising at each cut makes CUDA times per stage honest at the price
//! of a few idle gaps.

use std::time::Instant;

use crate::autograd::Tape;
use crate::detection::graphed_train::GraphedTrainer;
use crate::detection::transform::ImageU8;
use crate::detection::{FasterRcnn, Target};
use crate::device::gpu::{CounterScope, Counters};
use crate::device::op_memory::{self, OpMemory};
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
/// On a device, also the caching allocator's bytes per stage ([`StageMemory`]), and
/// per stage the bytes of the ops that measure themselves ([`OpMemory`]: the NMS).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StageTimes(
    pub Vec<(&'static str, f64)>,
    pub Vec<(&'static str, Counters)>,
    pub Vec<(&'static str, StageMemory)>,
    pub Vec<(&'static str, OpMemory)>,
);

/// Device memory of one stage, bytes of blocks lent to tensors (the caching
/// allocator's `allocated`, as PyTorch's `memory_allocated`); zero on the CPU.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StageMemory {
    /// Bytes in use when the stage began.
    pub before: u64,
    /// Highest bytes in use during the stage.
    pub peak: u64,
    /// Bytes in use when the stage ended.
    pub after: u64,
}

impl StageMemory {
    /// What the stage itself needed on top of what was live before it.
    pub fn added(&self) -> u64 {
        self.peak.saturating_sub(self.before)
    }
}

impl StageTimes {
    /// Sum of the stages, seconds.
    pub fn total(&self) -> f64 {
        self.0.iter().map(|s| s.1).sum()
    }

    /// Highest bytes in use over the stages (zero on the CPU).
    pub fn peak_allocated(&self) -> u64 {
        self.2.iter().map(|s| s.1.peak).max().unwrap_or(0)
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
    /// Bytes in use at the last cut.
    live: u64,
}

impl Laps {
    fn start(device: Device) -> Result<Laps> {
        synchronize(device)?;
        // Each stage's peak is measured from its own start: the device's peak is
        // restarted at every cut (the pass's peak is the largest stage peak).
        device.reset_peak_memory();
        op_memory::record(true);
        Ok(Laps {
            device,
            last: Instant::now(),
            counters: device.counters(),
            times: StageTimes::default(),
            live: device.memory().allocated,
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
        let m = self.device.memory();
        self.times.2.push((
            name,
            StageMemory {
                before: self.live,
                peak: m.peak_allocated,
                after: m.allocated,
            },
        ));
        self.live = m.allocated;
        for op in op_memory::take() {
            self.times.3.push((name, op));
        }
        self.device.reset_peak_memory();
        self.counters.reset();
        self.last = now;
        Ok(())
    }
}

impl Drop for Laps {
    fn drop(&mut self) {
        op_memory::record(false);
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
    let detections = model.detect_timed(images, &mut |s| laps.lap(s))?;
    Ok((detections, std::mem::take(&mut laps.times)))
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
    // Kernel errors go to the device's flag table, read with the loss (as in the
    // Runner's step), not back per op.
    let _defer = crate::device::error_flags::defer();
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
        // The step's one read-out, as the Runner's logging iteration makes it: the
        // loss, the NaN flag and the deferred kernel errors in one copy.
        let read = crate::runner::read_step_values(std::slice::from_ref(&total))?;
        (read.values[0], grads)
    };
    drop(tape);
    // The parameters are moved out of the model, not cloned, so the step updates
    // their buffers in place (a held copy would make SGD copy them first).
    let mut params: Vec<Tensor> = Vec::with_capacity(names.len());
    for n in &names {
        params.push(model.params.take(n)?);
    }
    let g: Vec<Option<Tensor>> = params.iter().map(|p| grads.get(p).cloned()).collect();
    drop(grads);
    let g: Vec<Option<&Tensor>> = g.iter().map(Option::as_ref).collect();
    let stepped = sgd.step_optional(&mut params, &g);
    for (n, t) in names.iter().zip(params) {
        model.params.put(n, t)?;
    }
    stepped?;
    laps.lap("optimizer")?;
    Ok((total, std::mem::take(&mut laps.times)))
}

/// One [`GraphedTrainer`] step timed per stage ([`GRAPHED_TRAINING_STAGES`]): the
/// upload and graph A, the head part, the seed copies and graph B, then the SGD
/// step on the fixed gradients ([`Sgd::step_fixed_grads`]). The step's one read-out
/// (the total loss, the NaN flag and the deferred kernel errors in one copy, as a
/// logging iteration makes it) is booked under `optimizer`. Returns the total loss
/// and the times.
///
/// [`GRAPHED_TRAINING_STAGES`]: crate::detection::graphed_train::GRAPHED_TRAINING_STAGES
pub fn train_step_graphed_profiled(
    trainer: &mut GraphedTrainer,
    model: &mut FasterRcnn,
    images: &[ImageU8],
    targets: &[Target],
    sgd: &mut Sgd,
    rng: &mut Rng,
) -> Result<(f64, StageTimes)> {
    let _defer = crate::device::error_flags::defer();
    let mut laps = Laps::start(model_device(model))?;
    let step =
        trainer.forward_backward_staged(model, images, targets, rng, &mut |s| laps.lap(s))?;
    trainer.update(model, &step, |p, g, fixed| {
        sgd.step_fixed_grads(p, g, fixed)
    })?;
    let read = crate::runner::read_step_values(std::slice::from_ref(&step.total))?;
    laps.lap("optimizer")?;
    Ok((read.values[0], std::mem::take(&mut laps.times)))
}
