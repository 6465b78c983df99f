//! What the runner drives: a [`Model`] and an [`Optimizer`].
//!
//! Parameters are immutable [`Tensor`]s. A train step runs with an active
//! [`crate::autograd::Tape`] on which the runner has watched every parameter; the
//! optimizer hook backpropagates the total loss, the runner moves the parameters out
//! of the model ([`Model::take_params`]), the optimizer updates them (in place where
//! it holds the only handle on their storage: new values with fresh ids in the same
//! buffers) and the runner hands them back with [`Model::set_params`].

use crate::error::Result;
use crate::rng::Rng;
use crate::tensor::Tensor;

/// A trainable model, e.g. Faster R-CNN.
pub trait Model {
    /// One batch as the data loader yields it (images, targets, ...).
    type Batch;

    /// Trainable parameters with their names (torchvision's state_dict names, e.g.
    /// `backbone.body.layer1.0.conv1.weight`), always in the same order: the order of
    /// [`Model::set_params`], of the optimizer's state and of the runner's gradients.
    fn params(&self) -> Vec<(String, Tensor)>;

    /// Replace the trainable parameters; `params` is in [`Model::params`] order with
    /// the same shapes.
    fn set_params(&mut self, params: Vec<Tensor>) -> Result<()>;

    /// Move the trainable parameters out, in [`Model::params`] order, for an update
    /// in place; the runner always gives them back with [`Model::set_params`] before
    /// anything else reads the model. While the model keeps a clone the optimizer
    /// cannot write in place (it copies each parameter first), so a model that can
    /// let go of its tensors should. By default: the values of [`Model::params`].
    fn take_params(&mut self) -> Vec<Tensor> {
        self.params().into_iter().map(|(_, t)| t).collect()
    }

    /// Non-trainable state saved with the weights (frozen parameters, BatchNorm
    /// running statistics), with names. None by default.
    fn buffers(&self) -> Vec<(String, Tensor)> {
        Vec::new()
    }

    /// Replace the buffers; `buffers` is in [`Model::buffers`] order.
    fn set_buffers(&mut self, buffers: Vec<Tensor>) -> Result<()> {
        let _ = buffers;
        Ok(())
    }

    /// Forward pass of a training step: named losses (and other values to log). Runs
    /// under an active tape on which every parameter returned by [`Model::params`] is
    /// watched, so the losses are differentiable. Every entry whose name contains
    /// `loss` is summed into the total loss (see [`super::parse_losses`]); non-scalar
    /// entries are averaged first. `rng` is the runner's generator (sampling of
    /// anchors and proposals): use it, and no other, so runs are resumable.
    fn train_step(&mut self, batch: &Self::Batch, rng: &mut Rng) -> Result<Vec<(String, Tensor)>>;

    /// A validation step: named values to log, computed without a tape. By default the
    /// training losses. `rng` is a generator seeded per validation epoch, separate from
    /// the training one.
    fn val_step(&mut self, batch: &Self::Batch, rng: &mut Rng) -> Result<Vec<(String, Tensor)>> {
        self.train_step(batch, rng)
    }

    /// Whether [`Model::graphed_train_step`] may compute training steps (the model
    /// was asked to train through captured graphs and can). The runner refuses, at
    /// the start of a run, what such a step cannot give: gradient accumulation with a
    /// scaled loss, gradient reduction across ranks. False by default.
    fn trains_through_graphs(&self) -> bool {
        false
    }

    /// A training step whose forward AND backward the model computes itself (e.g.
    /// replaying captured device graphs, [`crate::detection::graphed_train`]): the
    /// named values as [`Model::train_step`] returns them and dL/d(param) of their
    /// total (the `*loss*` entries summed, as [`super::parse_losses`] sums them) in
    /// [`Model::params`] order. `Ok(None)`: not this batch (the runner then runs
    /// [`Model::train_step`] under its tape). The runner asks at every training
    /// step; `log` writes a line to the run's log. By default `None`.
    fn graphed_train_step(
        &mut self,
        batch: &Self::Batch,
        rng: &mut Rng,
        log: &mut dyn FnMut(&str),
    ) -> Result<Option<GraphedStep>> {
        let _ = (batch, rng, log);
        Ok(None)
    }

    /// Number of samples (images) in `batch`, the weight of its values in the log's
    /// running averages.
    fn num_samples(&self, batch: &Self::Batch) -> usize {
        let _ = batch;
        1
    }
}

/// What [`Model::graphed_train_step`] returns.
pub struct GraphedStep {
    /// Named values, as [`Model::train_step`] returns them.
    pub values: Vec<(String, Tensor)>,
    /// dL/d(param) of the total loss, in [`Model::params`] order; `None` where the
    /// loss does not depend on the parameter.
    pub grads: Vec<Option<Tensor>>,
    /// Per gradient: whether it lies in a buffer that stays the same from step to
    /// step and that nothing frees or reuses between steps (a captured backward
    /// graph's output), for [`Optimizer::step_fixed`].
    pub fixed: Vec<bool>,
}

/// A first-order optimizer over the model's parameters (SGD, ...).
pub trait Optimizer {
    /// One update. `params` are replaced by their new values; `grads[i]` is dL/d
    /// `params[i]`, `None` for a parameter the loss does not depend on (skipped
    /// entirely, as PyTorch skips parameters whose `.grad` is `None`).
    fn step(&mut self, params: &mut [Tensor], grads: &[Option<Tensor>]) -> Result<()>;

    /// [`Optimizer::step`] where `fixed[i]` says that `grads[i]` lies in a buffer that
    /// is the same every step (see [`GraphedStep::fixed`]), so an optimizer that keeps
    /// a table of gradient addresses may point at it instead of copying it. By
    /// default the flags are ignored.
    fn step_fixed(
        &mut self,
        params: &mut [Tensor],
        grads: &[Option<Tensor>],
        fixed: &[bool],
    ) -> Result<()> {
        let _ = fixed;
        self.step(params, grads)
    }

    /// The current learning rate.
    fn lr(&self) -> f64;

    /// Set the learning rate (the LR updater hook does, before every iteration).
    fn set_lr(&mut self, lr: f64);

    /// State to checkpoint (momentum buffers, ...), named. Tensors only: encode
    /// scalars as one-element tensors.
    fn state(&self) -> Vec<(String, Tensor)>;

    /// Restore what [`Optimizer::state`] returned.
    fn load_state(&mut self, state: Vec<(String, Tensor)>) -> Result<()>;
}
