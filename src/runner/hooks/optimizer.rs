//! The update: backward, optional gradient clipping, optimizer step, with optional
//! gradient accumulation (mmcv's `OptimizerHook` and
//! `GradientCumulativeOptimizerHook`).

use crate::error::{Error, Result};
use crate::runner::{Hook, Model, Priority, Runner};

/// Clip gradients by their total norm, as `torch.nn.utils.clip_grad_norm_`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GradClip {
    /// Largest total norm allowed.
    pub max_norm: f64,
    /// Which norm: 2 (Euclidean), 1, ..., or `f64::INFINITY`.
    pub norm_type: f64,
}

/// After every training iteration: zero the gradients, backpropagate the total loss,
/// clip, step (priority ABOVE_NORMAL). With `cumulative_iters = n > 1` the loss is
/// divided by `n`, gradients add up over `n` iterations and the step is taken every
/// `n`-th iteration and at the last one (the last `max_iters % n` iterations divide by
/// that remainder instead), as mmcv's GradientCumulativeOptimizerHook does. The total
/// norm before clipping is logged as `grad_norm`. In data-parallel training the
/// gradients are reduced across ranks only in the backward of the step's last
/// micro-batch (DDP's `no_sync` for the others).
///
/// With a model that trains through graphs ([`Model::trains_through_graphs`],
/// `runtime.graph`) the backward already ran in the step: [`Runner::backward`] takes
/// its gradients, clipping works on them as on eager ones (reading their norms back,
/// as eagerly), and accumulation (`cumulative_iters > 1`) is refused at the start of
/// the run.
#[derive(Clone, Debug)]
pub struct OptimizerHook {
    /// Clipping, if any.
    pub grad_clip: Option<GradClip>,
    /// Iterations whose gradients make one step (1: no accumulation).
    pub cumulative_iters: usize,
}

impl Default for OptimizerHook {
    fn default() -> Self {
        OptimizerHook {
            grad_clip: None,
            cumulative_iters: 1,
        }
    }
}

impl OptimizerHook {
    /// Step every iteration, no clipping.
    pub fn new() -> Self {
        Self::default()
    }

    /// Clip by total norm.
    pub fn with_grad_clip(mut self, max_norm: f64, norm_type: f64) -> Self {
        self.grad_clip = Some(GradClip {
            max_norm,
            norm_type,
        });
        self
    }

    /// Accumulate gradients over `n` iterations per step.
    pub fn with_cumulative_iters(mut self, n: usize) -> Self {
        self.cumulative_iters = n;
        self
    }

    /// The divisor of the loss at iteration `iter` of `max_iters`: `n`, or the
    /// remainder `max_iters % n` within the last, incomplete group. Computed from the
    /// start of training (not from the resume point as mmcv does), so a resumed run
    /// accumulates exactly as an uninterrupted one.
    pub fn loss_factor(&self, iter: usize, max_iters: usize) -> usize {
        let n = self.cumulative_iters;
        let remainder = max_iters % n;
        if iter < max_iters - remainder {
            n
        } else {
            remainder
        }
    }

    fn clip_and_step<M: Model>(&self, runner: &mut Runner<M>) -> Result<()> {
        if let Some(c) = self.grad_clip {
            let norm = runner.clip_grad_norm(c.max_norm, c.norm_type)?;
            let n = runner.outputs.as_ref().map_or(1, |o| o.num_samples);
            runner.log_buffer.update_one("grad_norm", norm, n);
        }
        runner.optimizer_step()
    }
}

impl<M: Model> Hook<M> for OptimizerHook {
    fn priority(&self) -> Priority {
        Priority::ABOVE_NORMAL
    }

    fn before_run(&mut self, runner: &mut Runner<M>) -> Result<()> {
        if self.cumulative_iters == 0 {
            return Err(Error::invalid(
                "OptimizerHook",
                "cumulative_iters must be positive",
            ));
        }
        if self.cumulative_iters > 1 && runner.model.trains_through_graphs() {
            return Err(Error::invalid(
                "OptimizerHook",
                format!(
                    "cumulative_iters {} scales each step's loss before its backward, which \
                     a graphed step (runtime.graph) cannot: set cumulative_iters = 1 or \
                     graph = false",
                    self.cumulative_iters
                ),
            ));
        }
        if let Some(c) = self.grad_clip {
            if !(c.max_norm > 0.0 && c.norm_type > 0.0) {
                return Err(Error::invalid(
                    "OptimizerHook",
                    format!(
                        "grad_clip max_norm {} norm_type {}",
                        c.max_norm, c.norm_type
                    ),
                ));
            }
        }
        Ok(())
    }

    fn after_train_iter(&mut self, runner: &mut Runner<M>) -> Result<()> {
        if self.cumulative_iters == 1 {
            runner.zero_grad();
            runner.backward(1.0)?;
            self.clip_and_step(runner)?;
            // Dropped now, not at the next backward: gradients held through the
            // next step's forward would raise its peak and make its blocks differ
            // from the first step's (driver allocations after warm-up).
            runner.zero_grad();
            return Ok(());
        }
        let factor = self.loss_factor(runner.iter(), runner.max_iters());
        let step = runner.every_n_iters(self.cumulative_iters) || runner.is_last_iter();
        // Data parallel: only the step's last micro-batch reduces across ranks (DDP's
        // no_sync); the average of the ranks' sums is the sum of their averages.
        runner.backward_sync(1.0 / factor as f64, step)?;
        if step {
            self.clip_and_step(runner)?;
            runner.zero_grad();
        }
        Ok(())
    }
}
