//! Evaluation at an interval (mmcv's `EvalHook`): a user function computes metrics
//! (COCO AP for detection), the hook logs them and can keep the best checkpoint.

use super::checkpoint::{save_best, Rule};
use super::ema::ema_params;
use crate::error::{Error, Result};
use crate::runner::{Hook, Model, Priority, Runner};

/// Computes named metrics of the runner's model (e.g. `bbox_mAP`, `bbox_mAP_50`).
pub type EvalFn<M> = Box<dyn FnMut(&mut Runner<M>) -> Result<Vec<(String, f64)>>>;

/// Calls its evaluation function after every `interval`-th training epoch (or
/// iteration), from `start` on; puts the metrics in the log (the logger prints them)
/// and in [`Runner::metrics`]; with `save_best`, keeps the checkpoint with the best
/// value of that metric. When an EMA hook keeps averaged weights and `use_ema` is set,
/// the model is evaluated with them (and its own weights put back after). Priority
/// LOW.
pub struct EvalHook<M: Model> {
    eval: EvalFn<M>,
    /// Every this many epochs (iterations when not `by_epoch`).
    pub interval: usize,
    /// Count epochs or iterations.
    pub by_epoch: bool,
    /// First epoch (iteration), 1-based, to evaluate at; `None`: at every interval.
    pub start: Option<usize>,
    /// Metric whose best value keeps a checkpoint.
    pub save_best: Option<String>,
    /// Greater or less is better for `save_best` (inferred from the name if `None`).
    pub rule: Option<Rule>,
    /// Evaluate the EMA weights when there are any.
    pub use_ema: bool,
}

impl<M: Model> EvalHook<M> {
    /// Evaluate with `eval` every `interval` epochs (`by_epoch`) or iterations.
    pub fn new(
        eval: impl FnMut(&mut Runner<M>) -> Result<Vec<(String, f64)>> + 'static,
        interval: usize,
        by_epoch: bool,
    ) -> Self {
        EvalHook {
            eval: Box::new(eval),
            interval,
            by_epoch,
            start: None,
            save_best: None,
            rule: None,
            use_ema: true,
        }
    }

    /// Keep the best checkpoint by `metric`.
    pub fn save_best(mut self, metric: &str) -> Self {
        self.save_best = Some(metric.to_string());
        self
    }

    /// mmcv's `_should_evaluate`: `current` is the 1-based epoch or iteration just done.
    fn due(&self, current: usize) -> bool {
        match self.start {
            None => self.interval > 0 && current % self.interval == 0,
            Some(s) if current < s => false,
            Some(s) => self.interval > 0 && (current - s) % self.interval == 0,
        }
    }

    fn evaluate(&mut self, runner: &mut Runner<M>) -> Result<()> {
        let ema = if self.use_ema {
            ema_params(runner)
        } else {
            None
        };
        let metrics = match ema {
            Some(ema) => {
                let own: Vec<_> = runner.model.params().into_iter().map(|(_, t)| t).collect();
                runner.model.set_params(ema)?;
                let r = (self.eval)(runner);
                runner.model.set_params(own)?;
                r?
            }
            None => (self.eval)(runner)?,
        };
        for (k, v) in &metrics {
            runner.log_buffer.set_output(k, *v);
        }
        runner.log_buffer.ready = true;
        runner.metrics = metrics.clone();
        if let Some(key) = self.save_best.clone() {
            let score = metrics
                .iter()
                .find(|(k, _)| *k == key)
                .map(|(_, v)| *v)
                .ok_or_else(|| {
                    let names: Vec<&str> = metrics.iter().map(|(k, _)| k.as_str()).collect();
                    Error::invalid(
                        "EvalHook",
                        format!("save_best metric `{key}` is not among the results {names:?}"),
                    )
                })?;
            let rule = self.rule.unwrap_or_else(|| Rule::infer(&key));
            save_best(runner, &key, rule, score, self.by_epoch)?;
        }
        Ok(())
    }
}

impl<M: Model> Hook<M> for EvalHook<M> {
    fn priority(&self) -> Priority {
        Priority::LOW
    }

    fn before_run(&mut self, _runner: &mut Runner<M>) -> Result<()> {
        if self.interval == 0 {
            return Err(Error::invalid("EvalHook", "interval must be positive"));
        }
        Ok(())
    }

    fn after_train_epoch(&mut self, runner: &mut Runner<M>) -> Result<()> {
        if self.by_epoch && runner.by_epoch() && self.due(runner.epoch() + 1) {
            self.evaluate(runner)?;
        }
        Ok(())
    }

    fn after_train_iter(&mut self, runner: &mut Runner<M>) -> Result<()> {
        if !self.by_epoch && self.due(runner.iter() + 1) {
            self.evaluate(runner)?;
        }
        Ok(())
    }
}
