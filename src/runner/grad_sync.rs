//! The runner's hook-in for data-parallel training: something that sees the gradients
//! of each backward pass as they become final and replaces them by their average over
//! the ranks (implemented by `kestrel::dist::GradReducer`).

use crate::autograd::Tape;
use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// Averages gradients across data-parallel ranks around [`super::Runner::backward`].
pub trait GradSync: Send {
    /// Called before the backward pass of `tape`, with the step's parameters in
    /// [`super::Model::params`] order: register a [`Tape::on_grad_ready`] hook to start
    /// communicating during the pass.
    fn attach(&mut self, tape: &Tape, params: &[Tensor]) -> Result<()>;

    /// Called after the pass with this step's gradients (`None`: the loss does not
    /// depend on the parameter on this rank): wait for the communication and replace
    /// each by the average over the ranks.
    fn finish(&mut self, grads: &mut [Option<Tensor>]) -> Result<()>;

    /// Called after [`GradSync::attach`] when earlier micro-steps of a gradient
    /// accumulation were not reduced (DDP's `no_sync`): `accumulated[i]` is added to
    /// this pass's gradient of parameter `i` before reduction, so [`GradSync::finish`]
    /// returns the average of the ranks' accumulated totals.
    fn attach_accumulated(&mut self, accumulated: &[Option<Tensor>]) -> Result<()> {
        let _ = accumulated;
        Err(Error::Distributed(
            "this gradient synchroniser cannot reduce accumulated gradients".into(),
        ))
    }
}
