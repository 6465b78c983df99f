//! Learning-rate schedules with warmup: mmcv's `LrUpdaterHook` family (step, cosine
//! annealing, poly), with mmcv's formulas.

use crate::error::{Error, Result};
use crate::runner::{Hook, Model, Priority, Runner};

/// The regular (after-warmup) schedule. `progress` is the epoch (by epoch) or the
/// iteration (by iteration), `max_progress` the schedule's length in the same unit.
#[derive(Clone, Debug, PartialEq)]
pub enum LrPolicy {
    /// The base rate throughout.
    Fixed,
    /// `base * gamma^k`, k = number of milestones in `steps` that `progress` has
    /// reached; floored at `min_lr`.
    Step {
        /// Milestones (in `progress` units), ascending.
        steps: Vec<usize>,
        /// Factor applied at each milestone reached.
        gamma: f64,
        /// Lower bound on the rate, if any.
        min_lr: Option<f64>,
    },
    /// `base * gamma^(progress / every)` (mmcv's `step` given as one integer).
    StepEvery {
        /// Steps between decays (in `progress` units); 0 acts as 1.
        every: usize,
        /// Factor applied per `every` steps.
        gamma: f64,
        /// Lower bound on the rate, if any.
        min_lr: Option<f64>,
    },
    /// `target + (base - target) * (1 + cos(pi * progress / max_progress)) / 2`, with
    /// `target = min_lr`, or `base * min_lr_ratio` when a ratio is given.
    Cosine {
        /// The final rate, used when `min_lr_ratio` is `None`.
        min_lr: f64,
        /// The final rate as a fraction of the base rate; overrides `min_lr`.
        min_lr_ratio: Option<f64>,
    },
    /// `(base - min_lr) * (1 - progress / max_progress)^power + min_lr`.
    Poly {
        /// Exponent of the decay; 1 is linear.
        power: f64,
        /// The final rate, reached at `max_progress`.
        min_lr: f64,
    },
}

impl LrPolicy {
    /// The regular learning rate at `progress` of `max_progress`.
    pub fn lr(&self, base_lr: f64, progress: usize, max_progress: usize) -> f64 {
        match self {
            LrPolicy::Fixed => base_lr,
            LrPolicy::Step {
                steps,
                gamma,
                min_lr,
            } => {
                let exp = steps
                    .iter()
                    .position(|&s| progress < s)
                    .unwrap_or(steps.len());
                floor(base_lr * gamma.powi(exp as i32), *min_lr)
            }
            LrPolicy::StepEvery {
                every,
                gamma,
                min_lr,
            } => {
                let exp = progress / (*every).max(1);
                floor(base_lr * gamma.powi(exp as i32), *min_lr)
            }
            LrPolicy::Cosine {
                min_lr,
                min_lr_ratio,
            } => {
                let target = match min_lr_ratio {
                    Some(r) => base_lr * r,
                    None => *min_lr,
                };
                annealing_cos(base_lr, target, progress as f64 / max_progress as f64)
            }
            LrPolicy::Poly { power, min_lr } => {
                let coeff = (1.0 - progress as f64 / max_progress as f64).powf(*power);
                (base_lr - min_lr) * coeff + min_lr
            }
        }
    }
}

fn floor(lr: f64, min_lr: Option<f64>) -> f64 {
    match min_lr {
        Some(m) => lr.max(m),
        None => lr,
    }
}

/// mmcv's `annealing_cos(start, end, factor)`: `end + (start - end) / 2 * (cos(pi *
/// factor) + 1)`.
pub fn annealing_cos(start: f64, end: f64, factor: f64) -> f64 {
    let cos_out = (std::f64::consts::PI * factor).cos() + 1.0;
    end + 0.5 * (start - end) * cos_out
}

/// How the rate rises to the regular one over the first `warmup_iters` iterations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Warmup {
    /// `regular * ratio`.
    Constant,
    /// `regular * (1 - k)`, `k = (1 - iter / warmup_iters) * (1 - ratio)`.
    Linear,
    /// `regular * ratio^(1 - iter / warmup_iters)`.
    Exp,
}

impl Warmup {
    /// The warmup rate at iteration `cur_iter` (< `warmup_iters`), mmcv's
    /// `get_warmup_lr`.
    pub fn lr(self, regular_lr: f64, cur_iter: usize, warmup_iters: usize, ratio: f64) -> f64 {
        let t = cur_iter as f64 / warmup_iters as f64;
        match self {
            Warmup::Constant => regular_lr * ratio,
            Warmup::Linear => {
                let k = (1.0 - t) * (1.0 - ratio);
                regular_lr * (1.0 - k)
            }
            Warmup::Exp => regular_lr * ratio.powf(1.0 - t),
        }
    }
}

/// Sets the optimizer's learning rate before every epoch and iteration (mmcv's
/// `LrUpdaterHook`, priority VERY_HIGH). The base rate is the runner's
/// [`Runner::initial_lr`].
#[derive(Clone, Debug)]
pub struct LrUpdaterHook {
    /// The regular schedule.
    pub policy: LrPolicy,
    /// Schedule by epoch (progress = epoch) or by iteration.
    pub by_epoch: bool,
    /// Warmup kind, if any.
    pub warmup: Option<Warmup>,
    /// Warmup length in iterations (set from `warmup_epochs` when that is given).
    pub warmup_iters: usize,
    /// Warmup length in epochs, converted to iterations at the first epoch.
    pub warmup_epochs: Option<usize>,
    /// Starting fraction of the regular rate.
    pub warmup_ratio: f64,
    regular_lr: f64,
}

impl LrUpdaterHook {
    /// A schedule without warmup.
    pub fn new(policy: LrPolicy, by_epoch: bool) -> Self {
        LrUpdaterHook {
            policy,
            by_epoch,
            warmup: None,
            warmup_iters: 0,
            warmup_epochs: None,
            warmup_ratio: 0.1,
            regular_lr: 0.0,
        }
    }

    /// Add a warmup of `iters` iterations from `ratio` times the regular rate.
    pub fn with_warmup(mut self, warmup: Warmup, iters: usize, ratio: f64) -> Self {
        self.warmup = Some(warmup);
        self.warmup_iters = iters;
        self.warmup_ratio = ratio;
        self
    }

    /// Measure the warmup in epochs instead (mmcv's `warmup_by_epoch`).
    pub fn with_warmup_epochs(mut self, epochs: usize) -> Self {
        self.warmup_epochs = Some(epochs);
        self
    }

    fn check(&self) -> Result<()> {
        let bad = |m: String| Err(Error::invalid("LrUpdaterHook", m));
        if self.warmup.is_some() && self.warmup_iters == 0 && self.warmup_epochs.is_none() {
            return bad("a warmup needs warmup_iters > 0".into());
        }
        if !(self.warmup_ratio > 0.0 && self.warmup_ratio <= 1.0) && self.warmup.is_some() {
            return bad(format!(
                "warmup_ratio {} is not in (0, 1]",
                self.warmup_ratio
            ));
        }
        if let LrPolicy::Step { steps, .. } = &self.policy {
            if steps.windows(2).any(|w| w[0] >= w[1]) {
                return bad(format!("steps {steps:?} are not increasing"));
            }
        }
        Ok(())
    }

    fn regular<M: Model>(&self, runner: &Runner<M>) -> Result<f64> {
        let (progress, max) = if self.by_epoch {
            let max = runner.max_epochs().ok_or_else(|| {
                Error::invalid(
                    "LrUpdaterHook",
                    "a schedule by epoch needs an epoch-based runner",
                )
            })?;
            (runner.epoch(), max)
        } else {
            (runner.iter(), runner.max_iters())
        };
        Ok(self.policy.lr(runner.initial_lr(), progress, max))
    }

    fn warmup_lr(&self, cur_iter: usize) -> Option<f64> {
        let w = self.warmup?;
        (cur_iter < self.warmup_iters).then(|| {
            w.lr(
                self.regular_lr,
                cur_iter,
                self.warmup_iters,
                self.warmup_ratio,
            )
        })
    }
}

impl<M: Model> Hook<M> for LrUpdaterHook {
    fn priority(&self) -> Priority {
        Priority::VERY_HIGH
    }

    fn before_run(&mut self, _runner: &mut Runner<M>) -> Result<()> {
        self.check()
    }

    fn before_train_epoch(&mut self, runner: &mut Runner<M>) -> Result<()> {
        if let Some(e) = self.warmup_epochs {
            self.warmup_iters = e * runner.train_len();
        }
        if !self.by_epoch {
            return Ok(());
        }
        self.regular_lr = self.regular(runner)?;
        runner.optimizer.set_lr(self.regular_lr);
        Ok(())
    }

    fn before_train_iter(&mut self, runner: &mut Runner<M>) -> Result<()> {
        let cur = runner.iter();
        if !self.by_epoch {
            self.regular_lr = self.regular(runner)?;
            let lr = self.warmup_lr(cur).unwrap_or(self.regular_lr);
            runner.optimizer.set_lr(lr);
        } else if self.warmup.is_some() && cur <= self.warmup_iters {
            // By epoch, mmcv touches the rate only during warmup and at its end.
            let lr = self.warmup_lr(cur).unwrap_or(self.regular_lr);
            runner.optimizer.set_lr(lr);
        }
        Ok(())
    }
}
