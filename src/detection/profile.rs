//! Stage timings of [`FasterRcnn`]: the same passes as
//! [`FasterRcnn::detect`] and [`FasterRcnn::losses`] + backward + SGD, cut into
//! stages with a device synchronisation at each cut, for `kestrel bench`.
//!
//! The staged passes call the model's public pieces in the order the unstaged ones
//! do, so a stage's time is what it costs inside a real pass. Synchronising at each
//! cut makes CUDA times per stage honest at the price of a few idle gaps.

use std::time::Instant;

use super::faster_rcnn::FasterRcnn;
use super::transform::transform;
use super::{Detections, Target};
use crate::autograd::{no_grad, Tape};
use crate::device::gpu::{CounterScope, Counters};
use crate::device::Device;
use crate::error::Result;
use crate::nn::Ctx;
use crate::optim::sgd::Sgd;
use crate::rng::Rng;
use crate::tensor::Tensor;

/// Stage names of an inference pass, in order.
pub const INFERENCE_STAGES: [&str; 7] = [
    "transform",
    "backbone",
    "fpn",
    "rpn_head",
    "proposals",
    "roi_heads",
    "postprocess",
];

/// Stage names of a training step, in order. `proposals` holds anchors, proposal
/// filtering and the RPN losses; `roi_heads` holds sampling, pooling, the box head and
/// its losses.
pub const TRAINING_STAGES: [&str; 8] = [
    "transform",
    "backbone",
    "fpn",
    "rpn_head",
    "proposals",
    "roi_heads",
    "backward",
    "optimizer",
];

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

impl FasterRcnn {
    /// [`FasterRcnn::detect`] timed per stage ([`INFERENCE_STAGES`]).
    pub fn detect_profiled(&self, images: &[Tensor]) -> Result<(Vec<Detections>, StageTimes)> {
        let mut laps = Laps::start(model_device(self))?;
        let ctx = Ctx::new(&self.params, false);
        let il = transform(images, &self.config.transform)?;
        laps.lap("transform")?;
        let c = self.body.forward(&ctx, &il.tensors)?;
        laps.lap("backbone")?;
        let features = self.fpn.forward(&ctx, &c)?;
        drop(c);
        laps.lap("fpn")?;
        let head = self.rpn.head(&ctx, &features)?;
        laps.lap("rpn_head")?;
        let anchors = self.anchors_tensor(&il, &features)?;
        let proposals = self
            .rpn
            .proposals(&head, &anchors, &il.image_sizes, false)?;
        drop(head);
        laps.lap("proposals")?;
        let pooled = self
            .roi_heads
            .pool(&features[..4], &proposals, &il.image_sizes)?;
        let x = self.roi_heads.box_head(&ctx, &pooled)?;
        let (logits, regs) = self.roi_heads.predictor(&ctx, &x)?;
        laps.lap("roi_heads")?;
        let dets = self
            .roi_heads
            .postprocess(&logits, &regs, &proposals, &il.image_sizes)?;
        let detections = dets
            .into_iter()
            .zip(images)
            .zip(&il.image_sizes)
            .map(|((d, im), &size)| d.resized(size, (im.dims()[1], im.dims()[2])))
            .collect::<Result<Vec<_>>>()?;
        laps.lap("postprocess")?;
        Ok((detections, laps.times))
    }

    /// One training step timed per stage ([`TRAINING_STAGES`]): the
    /// four losses of [`FasterRcnn::losses`], their sum's backward into every
    /// trainable parameter, and an `sgd` step that replaces the parameters. Returns
    /// the summed loss and the times.
    pub fn train_step_profiled(
        &mut self,
        images: &[Tensor],
        targets: &[Target],
        sgd: &mut Sgd,
        rng: &mut Rng,
    ) -> Result<(f64, StageTimes)> {
        let mut laps = Laps::start(model_device(self))?;
        let names = self.params.trainable_names();
        let tape = Tape::new();
        for n in &names {
            tape.watch(self.params.get(n)?);
        }
        let (total, grads) = {
            let ctx = Ctx::new(&self.params, true);
            let guard = tape.activate();
            let il = transform(images, &self.config.transform)?;
            let targets: Vec<Target> = targets
                .iter()
                .zip(images)
                .zip(&il.image_sizes)
                .map(|((t, im), &size)| t.resized((im.dims()[1], im.dims()[2]), size))
                .collect();
            laps.lap("transform")?;
            let c = self.body.forward(&ctx, &il.tensors)?;
            laps.lap("backbone")?;
            let features = self.fpn.forward(&ctx, &c)?;
            laps.lap("fpn")?;
            let head = self.rpn.head(&ctx, &features)?;
            laps.lap("rpn_head")?;
            let anchors = self.anchors_tensor(&il, &features)?;
            let proposals = no_grad(|| self.rpn.proposals(&head, &anchors, &il.image_sizes, true))?;
            let (loss_obj, loss_rpn_box) = self.rpn.losses(&head, &anchors, &targets, rng)?;
            laps.lap("proposals")?;
            let samples = self
                .roi_heads
                .select_training_samples(&proposals, &targets, rng)?;
            let pooled =
                self.roi_heads
                    .pool(&features[..4], &samples.proposals, &il.image_sizes)?;
            let x = self.roi_heads.box_head(&ctx, &pooled)?;
            let (logits, regs) = self.roi_heads.predictor(&ctx, &x)?;
            let (loss_cls, loss_box) = self.roi_heads.losses(&logits, &regs, &samples)?;
            let mut total = crate::ops::add(&loss_obj, &loss_rpn_box)?;
            total = crate::ops::add(&total, &loss_cls)?;
            total = crate::ops::add(&total, &loss_box)?;
            laps.lap("roi_heads")?;
            drop(guard);
            let grads = tape.backward(&total)?;
            laps.lap("backward")?;
            (total.item()?, grads)
        };
        drop(tape);
        let mut params: Vec<Tensor> = Vec::with_capacity(names.len());
        for n in &names {
            params.push(self.params.get(n)?.clone());
        }
        let g: Vec<Option<&Tensor>> = params.iter().map(|p| grads.get(p)).collect();
        let mut new = params.clone();
        sgd.step_optional(&mut new, &g)?;
        drop(g);
        drop(grads);
        for (n, t) in names.iter().zip(new) {
            self.params.set(n, t)?;
        }
        laps.lap("optimizer")?;
        Ok((total, laps.times))
    }
}
