//! Stop training, with a checkpoint of the last good state, when a loss turns NaN or
//! infinite.

use crate::error::{Error, Result};
use crate::runner::{Hook, Model, Priority, Runner};

/// After each training iteration and before the optimizer hook (priority HIGH, 30 <
/// 40), checks the logged values the runner has read ([`Runner::non_finite`]); on
/// the first NaN or infinite one it stops the run with an error naming the value and
/// the iteration `n` (1-based, as the log counts).
///
/// When it is caught: on the CPU the values are read every iteration, so at
/// iteration `n` itself. On a GPU the losses stay on the device and are read, in one
/// copy with a NaN flag computed there, only on logging iterations (the logger's
/// interval, [`Runner::set_readout_interval`]), so a NaN produced at iteration `n` is
/// caught at the next logging iteration `m >= n`; the error names `n`, `m` and the
/// range of iterations that read-out covered.
///
/// What is saved: if the NaN came from the iteration being checked (always on the
/// CPU; on a GPU when `n == m`), its update has not been applied yet and the guard
/// saves `work_dir/nan_iter_{n}.safetensors` (weights and optimizer state from
/// before the step, resuming at the step). If it came from an earlier iteration, the
/// weights have already been updated with it: nothing is saved, and the last
/// regular checkpoint is the state to resume from — the checkpoint hook forces a
/// read-out before every save ([`Runner::verify_finite`]) and refuses to save after a
/// non-finite value, so no checkpoint holds a NaN step's state. `latest` is never
/// moved by the guard, so `--resume` picks the last regular (verified) checkpoint.
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
        let Some(nf) = runner.non_finite().cloned() else {
            return Ok(());
        };
        let now = runner.iter() + 1;
        let mut msg = format!("`{}` is {} at iteration {}", nf.name, nf.value, nf.iter);
        if nf.iter == now {
            msg.push_str(&format!(
                " (epoch {}, batch {} of {})",
                runner.epoch() + 1,
                runner.inner_iter() + 1,
                runner.train_len()
            ));
        } else {
            msg.push_str(&format!(
                ", caught at iteration {now} by the read-out of iterations {}..={} (losses \
                 on the device are read on logging iterations only); the weights were \
                 updated with it since, so no checkpoint is saved: resume from the last \
                 regular checkpoint",
                nf.first_read, nf.read_at
            ));
        }
        if !self.no_checkpoint && nf.iter == now {
            let path = runner.work_path(format!("nan_iter_{now}.safetensors"));
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
