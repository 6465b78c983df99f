//! Timing of iterations: `data_time` (waiting for the batch) and `time` (the whole
//! iteration), as mmcv's `IterTimerHook`.

use std::time::Instant;

use crate::error::Result;
use crate::runner::{Hook, Model, Priority, Runner};

/// Logs `data_time` before each iteration and `time` after it, in seconds since the
/// end of the previous iteration (priority LOW).
#[derive(Clone, Debug)]
pub struct IterTimerHook {
    t: Instant,
}

impl Default for IterTimerHook {
    fn default() -> Self {
        IterTimerHook { t: Instant::now() }
    }
}

impl IterTimerHook {
    /// A timer.
    pub fn new() -> Self {
        Self::default()
    }

    fn before_epoch(&mut self) -> Result<()> {
        self.t = Instant::now();
        Ok(())
    }

    fn before_iter<M: Model>(&mut self, runner: &mut Runner<M>) -> Result<()> {
        runner
            .log_buffer
            .update_one("data_time", self.t.elapsed().as_secs_f64(), 1);
        Ok(())
    }

    fn after_iter<M: Model>(&mut self, runner: &mut Runner<M>) -> Result<()> {
        runner
            .log_buffer
            .update_one("time", self.t.elapsed().as_secs_f64(), 1);
        self.t = Instant::now();
        Ok(())
    }
}

impl<M: Model> Hook<M> for IterTimerHook {
    fn priority(&self) -> Priority {
        Priority::LOW
    }
    fn before_train_epoch(&mut self, _runner: &mut Runner<M>) -> Result<()> {
        self.before_epoch()
    }
    fn before_val_epoch(&mut self, _runner: &mut Runner<M>) -> Result<()> {
        self.before_epoch()
    }
    fn before_train_iter(&mut self, runner: &mut Runner<M>) -> Result<()> {
        self.before_iter(runner)
    }
    fn before_val_iter(&mut self, runner: &mut Runner<M>) -> Result<()> {
        self.before_iter(runner)
    }
    fn after_train_iter(&mut self, runner: &mut Runner<M>) -> Result<()> {
        self.after_iter(runner)
    }
    fn after_val_iter(&mut self, runner: &mut Runner<M>) -> Result<()> {
        self.after_iter(runner)
    }
}
