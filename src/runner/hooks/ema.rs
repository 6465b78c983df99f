//! Exponential moving average of the weights (mmdet's `EMAHook` /
//! `ExpMomentumEMAHook`).

use crate::error::{Error, Result};
use crate::ops;
use crate::runner::{Hook, Model, Priority, Runner};
use crate::tensor::Tensor;

/// Prefix of the EMA weights in [`Runner::extra_tensors`] (`ema.<param name>`).
pub const EMA_PREFIX: &str = "ema.";

/// Keeps `ema.<name>` in [`Runner::extra_tensors`] for every parameter and updates it
/// every `interval` iterations after the optimizer step (priority 49, mmdet's):
/// `ema = (1 - m) * ema + m * param`. `m` is `momentum`, or with `total_iter` set,
/// mmdet's ExpMomentumEMA `(1 - momentum) * exp(-(1 + iter) / total_iter) + momentum`
/// (large at first, so the average follows the fast early changes). The eval hook
/// evaluates with these weights; checkpoints carry them, so a resume continues the
/// average.
#[derive(Clone, Debug)]
pub struct EmaHook {
    /// Weight of the new parameters (mmdet's default 0.0002).
    pub momentum: f64,
    /// Update every this many iterations.
    pub interval: usize,
    /// Exponential momentum warmup length, if any.
    pub total_iter: Option<usize>,
}

impl EmaHook {
    /// Plain EMA with `momentum`, every iteration.
    pub fn new(momentum: f64) -> Self {
        EmaHook {
            momentum,
            interval: 1,
            total_iter: None,
        }
    }

    /// mmdet's ExpMomentumEMAHook (YOLOX): `momentum` 0.0001, `total_iter` 2000 there.
    pub fn exp_momentum(momentum: f64, total_iter: usize) -> Self {
        EmaHook {
            momentum,
            interval: 1,
            total_iter: Some(total_iter),
        }
    }

    /// The momentum used after iteration `iter` (0-based).
    pub fn momentum_at(&self, iter: usize) -> f64 {
        match self.total_iter {
            Some(t) => {
                (1.0 - self.momentum) * (-(1.0 + iter as f64) / t as f64).exp() + self.momentum
            }
            None => self.momentum,
        }
    }
}

/// `(1 - m) * ema + m * p`, elementwise on the tensors' device.
pub fn ema_update(ema: &Tensor, p: &Tensor, m: f64) -> Result<Tensor> {
    ops::add(&ops::scale(ema, 1.0 - m)?, &ops::scale(p, m)?)
}

/// The EMA weights of the runner's model, in parameter order, if an EMA hook keeps
/// them.
pub fn ema_params<M: Model>(runner: &Runner<M>) -> Option<Vec<Tensor>> {
    runner
        .model
        .params()
        .iter()
        .map(|(n, _)| {
            runner
                .extra_tensors
                .get(&format!("{EMA_PREFIX}{n}"))
                .cloned()
        })
        .collect()
}

impl<M: Model> Hook<M> for EmaHook {
    fn priority(&self) -> Priority {
        Priority(49)
    }

    fn before_run(&mut self, runner: &mut Runner<M>) -> Result<()> {
        if !(self.momentum > 0.0 && self.momentum < 1.0) || self.interval == 0 {
            return Err(Error::invalid(
                "EmaHook",
                format!(
                    "momentum {} (needs 0 < m < 1), interval {}",
                    self.momentum, self.interval
                ),
            ));
        }
        // Start the average at the current weights unless a checkpoint brought one.
        for (n, p) in runner.model.params() {
            runner
                .extra_tensors
                .entry(format!("{EMA_PREFIX}{n}"))
                .or_insert_with(|| p.detach());
        }
        Ok(())
    }

    fn after_train_iter(&mut self, runner: &mut Runner<M>) -> Result<()> {
        if !runner.every_n_iters(self.interval) {
            return Ok(());
        }
        let m = self.momentum_at(runner.iter());
        for (n, p) in runner.model.params() {
            let key = format!("{EMA_PREFIX}{n}");
            let ema = runner.extra_tensors.get(&key).ok_or_else(|| {
                Error::Training(format!(
                    "EMA weights `{key}` missing (a parameter added mid-run?)"
                ))
            })?;
            let next = ema_update(ema, &p, m)?;
            runner.extra_tensors.insert(key, next);
        }
        Ok(())
    }
}
