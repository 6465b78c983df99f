//! A training step whose dense part (transform, backbone, FPN, RPN head) and its
//! backward replay as two device graphs.
//!
//! At a fixed batch shape the dense part of a step has no data-dependent shape
//! ([`FasterRcnn::dense_forward`]); the rest (anchors, proposals, matching and
//! sampling, the RoI heads, the losses) runs eagerly, as its sizes are padded but its
//! bookkeeping is host-side. [`GraphedTrainer`] splits a step at the dense part's
//! outputs (P2..P6, the RPN objectness and deltas per level):
//!
//! 1. one pinned host-to-device copy of the batch into the captured input buffer;
//! 2. replay of graph A: the transform, backbone, FPN and RPN head forward;
//! 3. the head part eagerly ([`FasterRcnn::head_losses`]) on a tape that watches
//!    A's outputs as leaves and the RoI heads' parameters; its backward gives their
//!    gradients and the gradients of the leaves;
//! 4. the leaves' gradients copied (device to device) into fixed seed buffers;
//! 5. replay of graph B: the backward of the tape recorded while A was captured,
//!    seeded from those buffers ([`crate::autograd::Tape::backward_seeded`]),
//!    writing the dense parameters' gradients into the same buffers every step;
//!    the optimizer reads them there ([`crate::optim::Sgd::step_fixed_grads`]).
//!
//! Losses and every gradient equal the eager step's ([`FasterRcnn::losses_uploaded`]
//! and one backward of the summed losses) bit for bit: the same kernels run on the
//! same values, and a gradient that the two parts both feed (a P-level used by the
//! RPN head and the RoI pooling) is summed in the order a single pass sums it.
//!
//! What must hold for the graphs to stay valid, and is checked where it can be:
//! the parameters keep their buffers (the optimizer updates them in place; a
//! parameter moved to a new buffer is an error at the next step), frozen BatchNorm
//! statistics (`Frozen` or `FrozenStats`: nothing of the dense part carries state
//! from step to step), f32 precision (bf16
//! keeps per-version weight copies the graph could not follow), and the same image
//! sizes every batch ([`super::transform::UploadedBatch::refill`] refuses others).
//!
//! Building ([`GraphedTrainer::new`]) runs the split step several times on the first
//! batch, updating nothing: once eagerly (it uploads the constant tables and fills
//! the caching allocator), then with graph A captured and its backward run eagerly
//! until a round takes nothing from the driver (so the cache holds what the
//! backward needs while A keeps its blocks: a capture must not allocate from the
//! driver), and once capturing both graphs. The random generator of the warm-up
//! is its own.

use crate::autograd::{Gradients, Tape};
use crate::device::graph::{capture, Graph};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::nn::NormKind;
use crate::rng::Rng;
use crate::tensor::Tensor;

use super::faster_rcnn::StageFn;
use super::rpn::RpnHeadOutput;
use super::transform::{transform_uploaded, upload_u8, ImageList, ImageU8, UploadedBatch};
use super::{FasterRcnn, Target};

/// Stage names of a graphed training step: the upload and graph A; the head part
/// with its losses and backward; the seed copies and graph B; the optimizer
/// (timed by the caller).
pub const GRAPHED_TRAINING_STAGES: [&str; 4] =
    ["graph_forward", "heads", "graph_backward", "optimizer"];

/// What graph A produces; each replay rewrites these tensors in place.
pub struct DenseOutputs {
    /// The normalised, resized, padded batch.
    pub images: ImageList,
    /// P2..P6.
    pub features: Vec<Tensor>,
    /// RPN objectness and deltas per level.
    pub head: RpnHeadOutput,
}

impl DenseOutputs {
    /// The tensors the head part reads, in a fixed order: features, objectness, deltas.
    fn leaves(&self) -> Vec<&Tensor> {
        self.features
            .iter()
            .chain(&self.head.objectness)
            .chain(&self.head.deltas)
            .collect()
    }
}

/// One replayed training step's results, before the optimizer.
pub struct TrainStep {
    /// The four losses of [`FasterRcnn::losses`], named.
    pub losses: Vec<(String, Tensor)>,
    /// Their sum, the loss that was backpropagated.
    pub total: Tensor,
    /// dL/d(parameter) in [`crate::nn::ParamStore::trainable_names`] order; `None`
    /// for a parameter the loss does not depend on.
    pub grads: Vec<Option<Tensor>>,
    /// Per parameter: whether its gradient lies in graph B's fixed buffer (for
    /// [`crate::optim::Sgd::step_fixed_grads`]).
    pub fixed: Vec<bool>,
}

/// Node and copy counts of the two graphs, for reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GraphSizes {
    /// Nodes of graph A (forward).
    pub forward_nodes: usize,
    /// Nodes of graph B (backward).
    pub backward_nodes: usize,
    /// Seed copies per step (device to device).
    pub seeds: usize,
    /// Parameters whose gradients graph B writes.
    pub fixed_grads: usize,
}

/// A model trained with its dense part replayed as graphs (see the module docs).
pub struct GraphedTrainer {
    names: Vec<String>,
    input: UploadedBatch,
    forward: Graph,
    backward: Graph,
    outputs: DenseOutputs,
    /// (index into [`DenseOutputs::leaves`], seed buffer graph B reads).
    seeds: Vec<(usize, Tensor)>,
    /// Graph B's gradient per trainable parameter (`None`: the head part's).
    dense_grads: Vec<Option<Tensor>>,
    /// Every parameter's and buffer's device address at capture, by name.
    addresses: Vec<(String, u64)>,
}

/// Most rounds of the second warm-up stage (see [`GraphedTrainer::new`]).
const WARM_ROUNDS: usize = 4;

/// The dense part on `input` with `tape` active.
fn dense(model: &FasterRcnn, input: &UploadedBatch, tape: &Tape) -> Result<DenseOutputs> {
    let _g = tape.activate();
    let images = transform_uploaded(input)?;
    let ctx = model.ctx(true);
    let (features, head) = model.dense_forward(&ctx, &images, &mut |_| Ok(()))?;
    Ok(DenseOutputs {
        images,
        features,
        head,
    })
}

/// The head part's results: losses, total, and the gradients of the leaves and of
/// every watched parameter the head uses.
struct Head {
    losses: Vec<(String, Tensor)>,
    total: Tensor,
    grads: Gradients,
}

fn head(
    model: &FasterRcnn,
    names: &[String],
    input: &UploadedBatch,
    out: &DenseOutputs,
    targets: &[Target],
    rng: &mut Rng,
) -> Result<Head> {
    let tape = Tape::new();
    for n in names {
        tape.watch(model.params.get(n)?);
    }
    for t in out.leaves() {
        tape.watch(t);
    }
    let (losses, total) = {
        let _g = tape.activate();
        let ctx = model.ctx(true);
        let losses = model.head_losses(
            &ctx,
            &out.images,
            input.original_sizes(),
            (&out.features, &out.head),
            targets,
            rng,
        )?;
        let mut total = losses[0].1.clone();
        for (_, l) in &losses[1..] {
            total = crate::ops::add(&total, l)?;
        }
        (losses, total)
    };
    let grads = tape.backward(&total)?;
    Ok(Head {
        losses,
        total,
        grads,
    })
}

/// Copy each leaf's gradient into its seed buffer (device to device).
fn fill_seeds(seeds: &[(usize, Tensor)], out: &DenseOutputs, grads: &Gradients) -> Result<()> {
    let leaves = out.leaves();
    for (k, seed) in seeds {
        let g = grads.get(leaves[*k]).ok_or_else(|| {
            Error::invalid(
                "GraphedTrainer",
                format!("dense output {k} got no gradient this step (it had one at capture)"),
            )
        })?;
        let (src, dst) = (g.gpu()?, seed.gpu()?);
        dst.dev
            .backend
            .copy_dtod(&src.buf, &dst.buf, seed.numel() * 4)?;
    }
    Ok(())
}

/// A tape watching every trainable parameter of `model`.
fn param_tape(model: &FasterRcnn, names: &[String]) -> Result<Tape> {
    let tape = Tape::new();
    for n in names {
        tape.watch(model.params.get(n)?);
    }
    Ok(tape)
}

fn seeded<'a>(seeds: &[(usize, Tensor)], out: &'a DenseOutputs) -> Vec<(&'a Tensor, Tensor)> {
    let leaves = out.leaves();
    seeds.iter().map(|(k, s)| (leaves[*k], s.clone())).collect()
}

/// The device of `model`'s first parameter.
fn model_device(model: &FasterRcnn) -> Result<Device> {
    model
        .params
        .iter()
        .next()
        .map(|(_, t)| t.device())
        .ok_or_else(|| Error::invalid("GraphedTrainer", "the model has no parameters"))
}

fn addresses(model: &FasterRcnn) -> Result<Vec<(String, u64)>> {
    model
        .params
        .iter()
        .map(|(n, t)| Ok((n.clone(), t.gpu()?.buf.ptr())))
        .collect()
}

impl GraphedTrainer {
    /// Capture the training step of batches shaped like `images` (8-bit CHW, on the
    /// model's device), with `targets` for the warm-up passes (original pixels). The
    /// model must be on a CUDA or emulated device, in f32; see the module docs
    /// ([`GraphedTrainer::unsupported`]). The trainer does not hold the model: each
    /// step takes it again, and refuses one whose parameters left the buffers the
    /// graphs read ([`GraphedTrainer::reads_params_of`]).
    pub fn new(model: &FasterRcnn, images: &[ImageU8], targets: &[Target]) -> Result<Self> {
        if let Some(why) = Self::unsupported(model) {
            return Err(Error::invalid("GraphedTrainer", why));
        }
        let device = model_device(model)?;
        let _defer = crate::device::error_flags::defer();
        let names = model.params.trainable_names();
        let input = upload_u8(images, &model.config.transform, device)?;
        let mut rng = Rng::new(0);

        // 1. Eagerly: constants uploaded, the cache filled; the seed buffers made.
        let seeds = {
            let tape = param_tape(model, &names)?;
            let out = dense(model, &input, &tape)?;
            let h = head(model, &names, &input, &out, targets, &mut rng)?;
            let mut seeds = Vec::new();
            for (k, leaf) in out.leaves().into_iter().enumerate() {
                if h.grads.get(leaf).is_some() {
                    let g = leaf.gpu()?;
                    seeds.push((k, Tensor::gpu_empty(&g.dev, leaf.shape().clone())?));
                }
            }
            fill_seeds(&seeds, &out, &h.grads)?;
            drop(h);
            tape.backward_seeded(seeded(&seeds, &out))?;
            seeds
        };
        // 2. Graph A captured, the backward eager: warms the cache for capture B,
        // until a round needs nothing from the driver (then the next round, whose
        // capture B takes the blocks this one took, needs nothing either).
        for _ in 0..WARM_ROUNDS {
            let c = device.counters();
            let tape = param_tape(model, &names)?;
            let (forward, out) = capture(device, || dense(model, &input, &tape))?;
            forward.replay()?;
            let h = head(model, &names, &input, &out, targets, &mut rng)?;
            fill_seeds(&seeds, &out, &h.grads)?;
            drop(h);
            tape.backward_seeded(seeded(&seeds, &out))?;
            drop((forward, out));
            if c.delta().driver_allocs == 0 {
                break;
            }
        }
        // 3. Both graphs.
        let tape = param_tape(model, &names)?;
        let (forward, outputs) = capture(device, || dense(model, &input, &tape))?;
        forward.replay()?;
        let h = head(model, &names, &input, &outputs, targets, &mut rng)?;
        fill_seeds(&seeds, &outputs, &h.grads)?;
        drop(h);
        let (backward, grads) = capture(device, || tape.backward_seeded(seeded(&seeds, &outputs)))?;
        drop(tape);
        let dense_grads = names
            .iter()
            .map(|n| Ok(grads.get(model.params.get(n)?).cloned()))
            .collect::<Result<Vec<_>>>()?;
        drop(grads);
        let addresses = addresses(model)?;
        Ok(GraphedTrainer {
            names,
            input,
            forward,
            backward,
            outputs,
            seeds,
            dense_grads,
            addresses,
        })
    }

    /// Why `model` cannot be trained through graphs (the CPU, bf16, BatchNorm with
    /// running statistics, parameters on several devices), or `None` when it can.
    pub fn unsupported(model: &FasterRcnn) -> Option<String> {
        let device = match model_device(model) {
            Ok(d) => d,
            Err(e) => return Some(e.to_string()),
        };
        if !matches!(device, Device::Cuda(_)) {
            return Some(
                "the CPU has no graphs: put the model on a CUDA or emulated device".into(),
            );
        }
        if model.precision.is_bf16() {
            return Some(
                "bf16 keeps weight copies per version that a graph cannot follow: train in f32"
                    .into(),
            );
        }
        if !matches!(
            model.config.backbone.norm,
            NormKind::Frozen { .. } | NormKind::FrozenStats { .. }
        ) {
            return Some(
                "BatchNorm with running statistics changes state every step: use frozen \
                 BatchNorm"
                    .into(),
            );
        }
        if let Some((n, t)) = model.params.iter().find(|(_, t)| t.device() != device) {
            return Some(format!(
                "parameter {n} is on {}, the model on {device}",
                t.device()
            ));
        }
        None
    }

    /// Whether every parameter and buffer of `model` lies where it lay at the
    /// capture (same names, same device addresses): the graphs read those buffers.
    pub fn reads_params_of(&self, model: &FasterRcnn) -> bool {
        self.moved_param(model).ok().flatten().is_none()
    }

    /// The first parameter (or buffer) whose buffer is not the captured one.
    fn moved_param(&self, model: &FasterRcnn) -> Result<Option<String>> {
        let now = addresses(model)?;
        if now.len() != self.addresses.len() {
            return Ok(Some(format!(
                "({} tensors now, {} at capture)",
                now.len(),
                self.addresses.len()
            )));
        }
        Ok(now
            .iter()
            .zip(&self.addresses)
            .find(|((na, a), (nb, b))| na != nb || a != b)
            .map(|((n, _), _)| n.clone()))
    }

    /// The (height, width) of each image of the captured batch.
    pub fn image_sizes(&self) -> Vec<(usize, usize)> {
        self.input.original_sizes().to_vec()
    }

    /// The trainable parameters' names, the order of [`TrainStep::grads`].
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// Sizes of the two graphs and of the per-step copies.
    pub fn sizes(&self) -> GraphSizes {
        GraphSizes {
            forward_nodes: self.forward.nodes(),
            backward_nodes: self.backward.nodes(),
            seeds: self.seeds.len(),
            fixed_grads: self.dense_grads.iter().filter(|g| g.is_some()).count(),
        }
    }

    /// What graph A wrote at the last replay.
    pub fn outputs(&self) -> &DenseOutputs {
        &self.outputs
    }

    /// The losses and gradients of a training step on `images` (same sizes as at
    /// capture) with `targets` (original pixels): one pinned upload, graph A, the
    /// head part eagerly, the seed copies, graph B. Nothing is read back; `rng`
    /// draws the sampling seed as [`FasterRcnn::losses`] does. Run it inside
    /// [`crate::device::error_flags::defer`] to keep kernel checks off the host.
    pub fn forward_backward(
        &mut self,
        model: &FasterRcnn,
        images: &[ImageU8],
        targets: &[Target],
        rng: &mut Rng,
    ) -> Result<TrainStep> {
        self.forward_backward_staged(model, images, targets, rng, &mut |_| Ok(()))
    }

    /// [`GraphedTrainer::forward_backward`] calling `on_stage` as each of
    /// [`GRAPHED_TRAINING_STAGES`] but the optimizer ends.
    pub fn forward_backward_staged(
        &mut self,
        model: &FasterRcnn,
        images: &[ImageU8],
        targets: &[Target],
        rng: &mut Rng,
        on_stage: StageFn,
    ) -> Result<TrainStep> {
        if let Some(n) = self.moved_param(model)? {
            return Err(Error::invalid(
                "GraphedTrainer",
                format!(
                    "parameter {n} moved to another buffer since the capture (an update \
                     that was not in place): the graphs would read the old one"
                ),
            ));
        }
        self.input.refill(images)?;
        self.forward.replay()?;
        on_stage("graph_forward")?;
        let h = head(model, &self.names, &self.input, &self.outputs, targets, rng)?;
        on_stage("heads")?;
        fill_seeds(&self.seeds, &self.outputs, &h.grads)?;
        self.backward.replay()?;
        on_stage("graph_backward")?;
        let mut grads = Vec::with_capacity(self.names.len());
        let mut fixed = Vec::with_capacity(self.names.len());
        for (n, d) in self.names.iter().zip(&self.dense_grads) {
            match d {
                Some(g) => {
                    grads.push(Some(g.clone()));
                    fixed.push(true);
                }
                None => {
                    grads.push(h.grads.get(model.params.get(n)?).cloned());
                    fixed.push(false);
                }
            }
        }
        Ok(TrainStep {
            losses: h.losses,
            total: h.total,
            grads,
            fixed,
        })
    }

    /// Update the trainable parameters with `update` (e.g. SGD): it gets them moved
    /// out of the model (so an in-place update needs no copy), the step's gradients
    /// and fixed flags, in [`GraphedTrainer::names`] order. They go back whatever
    /// `update` returns; a parameter that left its buffer is an error at the next
    /// [`GraphedTrainer::forward_backward`].
    pub fn update(
        &self,
        model: &mut FasterRcnn,
        step: &TrainStep,
        update: impl FnOnce(&mut [Tensor], &[Option<&Tensor>], &[bool]) -> Result<()>,
    ) -> Result<()> {
        let mut params = Vec::with_capacity(self.names.len());
        for n in &self.names {
            params.push(model.params.take(n)?);
        }
        let g: Vec<Option<&Tensor>> = step.grads.iter().map(Option::as_ref).collect();
        let done = update(&mut params, &g, &step.fixed);
        for (n, t) in self.names.iter().zip(params) {
            model.params.put(n, t)?;
        }
        done
    }
}
