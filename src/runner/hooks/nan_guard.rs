//! Stop training, with a checkpoint of the last good state, when a loss turns NaN or
//! infinite.

use crate::error::{Error, Result};
use crate::runner::{Hook, Model, Priority, Runner};

/// After each training iteration and before the optimizer hook (priority HIGH, 30 <
/// 40), checks every logged value of the step; on the first NaN or infinite one it
/// saves `work_dir/nan_iter_{n}.safetensors` (weights and optimizer state from before
/// the step, resuming at the step) and stops the run with an error naming the value,
/// the iteration `n` (1-based, as the log counts) and the checkpoint. `latest` is not
/// moved, so `--resume` still picks the last regular checkpoint.
#[derive(Clone, Debug, Default)]
pub struct NanGuardHook {
    /// Do not save a checkpoint, only stop.
    pub no_checkpoint: bool,
}

impl NanGuardHook {
    /// A guard that saves a checkpoint before stopping.
    pub fn new() -> Self {
        Self::default()
    }
}

impl<M: Model> Hook<M> for NanGuardHook {
    fn priority(&self) -> Priority {
        Priority::HIGH
    }

    fn after_train_iter(&mut self, runner: &mut Runner<M>) -> Result<()> {
        let Some(out) = runner.outputs.as_ref() else {
            return Ok(());
        };
        let Some((name, value)) = out.log_vars.iter().find(|(_, v)| !v.is_finite()).cloned() else {
            return Ok(());
        };
        let n = runner.iter() + 1;
        let mut msg = format!(
            "`{name}` is {value} at iteration {n} (epoch {}, batch {} of {})",
            runner.epoch() + 1,
            runner.inner_iter() + 1,
            runner.train_len()
        );
        if !self.no_checkpoint {
            let path = runner.work_path(format!("nan_iter_{n}.safetensors"));
            let point = runner.point_before_current_iter();
            match runner.save_checkpoint_at(&path, true, point) {
                Ok(()) => msg.push_str(&format!(
                    "; the state before this iteration is saved in {}",
                    path.display()
                )),
                Err(e) => msg.push_str(&format!("; saving a checkpoint failed too: {e}")),
            }
        }
        runner.log.line(&format!("error: {msg}"));
        Err(Error::Training(msg))
    }
}
