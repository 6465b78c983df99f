//! The [`Hook`] trait: code the runner calls at fixed points of a run (mmcv's hooks).

use super::{Model, Priority, Runner};
use crate::error::Result;

/// The points of a run at which hooks are called.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Stage {
    /// Once, when [`Runner::run`] starts, before any epoch or iteration.
    BeforeRun,
    /// Once, when the run ends (the schedule is done).
    AfterRun,
    /// Before each training epoch.
    BeforeTrainEpoch,
    /// After each training epoch.
    AfterTrainEpoch,
    /// Before each training iteration (one batch: forward, backward, optimizer step).
    BeforeTrainIter,
    /// After each training iteration.
    AfterTrainIter,
    /// Before each validation epoch.
    BeforeValEpoch,
    /// After each validation epoch.
    AfterValEpoch,
    /// Before each validation iteration (one batch, forward only).
    BeforeValIter,
    /// After each validation iteration.
    AfterValIter,
}

impl Stage {
    /// Every stage, in the order a run first meets them.
    pub const ALL: [Stage; 10] = [
        Stage::BeforeRun,
        Stage::BeforeTrainEpoch,
        Stage::BeforeTrainIter,
        Stage::AfterTrainIter,
        Stage::AfterTrainEpoch,
        Stage::BeforeValEpoch,
        Stage::BeforeValIter,
        Stage::AfterValIter,
        Stage::AfterValEpoch,
        Stage::AfterRun,
    ];

    /// mmcv's name, e.g. `after_train_iter`.
    pub fn name(self) -> &'static str {
        match self {
            Stage::BeforeRun => "before_run",
            Stage::AfterRun => "after_run",
            Stage::BeforeTrainEpoch => "before_train_epoch",
            Stage::AfterTrainEpoch => "after_train_epoch",
            Stage::BeforeTrainIter => "before_train_iter",
            Stage::AfterTrainIter => "after_train_iter",
            Stage::BeforeValEpoch => "before_val_epoch",
            Stage::AfterValEpoch => "after_val_epoch",
            Stage::BeforeValIter => "before_val_iter",
            Stage::AfterValIter => "after_val_iter",
        }
    }
}

/// Code run at the stages of a run. Every method does nothing by default. A hook
/// reads and changes the run through the [`Runner`] it is given; state that must
/// survive a resume belongs on the runner (`meta`, `extra_tensors`), which checkpoints
/// save, not in the hook.
#[allow(unused_variables)]
pub trait Hook<M: Model> {
    /// The name printed in the hook order, by default the type's name.
    fn name(&self) -> String {
        short_type_name(std::any::type_name::<Self>())
    }

    /// The priority used by [`Runner::register_hook`].
    fn priority(&self) -> Priority {
        Priority::NORMAL
    }

    /// How often this hook needs the training values read back to the host (the
    /// logger: its interval). A rank that drops the hook (data-parallel ranks other
    /// than 0) keeps reading at that interval rather than every iteration.
    fn readout_interval(&self) -> Option<usize> {
        None
    }

    /// Called at [`Stage::BeforeRun`].
    fn before_run(&mut self, runner: &mut Runner<M>) -> Result<()> {
        Ok(())
    }
    /// Called at [`Stage::AfterRun`].
    fn after_run(&mut self, runner: &mut Runner<M>) -> Result<()> {
        Ok(())
    }
    /// Called at [`Stage::BeforeTrainEpoch`].
    fn before_train_epoch(&mut self, runner: &mut Runner<M>) -> Result<()> {
        Ok(())
    }
    /// Called at [`Stage::AfterTrainEpoch`].
    fn after_train_epoch(&mut self, runner: &mut Runner<M>) -> Result<()> {
        Ok(())
    }
    /// Called at [`Stage::BeforeTrainIter`].
    fn before_train_iter(&mut self, runner: &mut Runner<M>) -> Result<()> {
        Ok(())
    }
    /// Called at [`Stage::AfterTrainIter`].
    fn after_train_iter(&mut self, runner: &mut Runner<M>) -> Result<()> {
        Ok(())
    }
    /// Called at [`Stage::BeforeValEpoch`].
    fn before_val_epoch(&mut self, runner: &mut Runner<M>) -> Result<()> {
        Ok(())
    }
    /// Called at [`Stage::AfterValEpoch`].
    fn after_val_epoch(&mut self, runner: &mut Runner<M>) -> Result<()> {
        Ok(())
    }
    /// Called at [`Stage::BeforeValIter`].
    fn before_val_iter(&mut self, runner: &mut Runner<M>) -> Result<()> {
        Ok(())
    }
    /// Called at [`Stage::AfterValIter`].
    fn after_val_iter(&mut self, runner: &mut Runner<M>) -> Result<()> {
        Ok(())
    }
}

/// Call the method of `hook` for `stage`.
pub(crate) fn dispatch<M: Model>(
    hook: &mut dyn Hook<M>,
    stage: Stage,
    runner: &mut Runner<M>,
) -> Result<()> {
    match stage {
        Stage::BeforeRun => hook.before_run(runner),
        Stage::AfterRun => hook.after_run(runner),
        Stage::BeforeTrainEpoch => hook.before_train_epoch(runner),
        Stage::AfterTrainEpoch => hook.after_train_epoch(runner),
        Stage::BeforeTrainIter => hook.before_train_iter(runner),
        Stage::AfterTrainIter => hook.after_train_iter(runner),
        Stage::BeforeValEpoch => hook.before_val_epoch(runner),
        Stage::AfterValEpoch => hook.after_val_epoch(runner),
        Stage::BeforeValIter => hook.before_val_iter(runner),
        Stage::AfterValIter => hook.after_val_iter(runner),
    }
}

/// `kestrel::runner::hooks::lr_updater::LrUpdaterHook` -> `LrUpdaterHook`; generic
/// arguments are dropped.
fn short_type_name(full: &str) -> String {
    let base = full.split('<').next().unwrap_or(full);
    base.rsplit("::").next().unwrap_or(base).to_string()
}
