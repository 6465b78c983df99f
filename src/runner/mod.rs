//! Training: mmcv's Runner and hooks, generic over a [`Model`], made resumable.
//!
//! A [`Runner`] owns the model, the [`Optimizer`], the [`DataLoader`]s, the work_dir,
//! the counters and a [`LogBuffer`]; [`Runner::run`] runs a workflow such as
//! `[(Train, 2), (Val, 1)]`, epoch- or iteration-based, calling [`Hook`]s in
//! [`Priority`] order at every stage. The update itself is a hook
//! ([`hooks::OptimizerHook`]), as are the learning-rate schedule, checkpoints, logs,
//! timing, evaluation, EMA and the NaN guard.
//!
//! Loss values on a GPU stay on the device: the runner reads them back only on
//! logging iterations (the logger's interval, [`Runner::set_readout_interval`]; every
//! iteration without a logger), all values of the interval in ONE device-to-host copy
//! together with the device's deferred kernel-error flags and a NaN flag
//! ([`Runner::read_out`]), so a non-logging iteration copies nothing back. A NaN is
//! therefore caught at the next logging iteration (the guard's error names the
//! iteration that produced it and the range the read-out covered), and every
//! checkpoint save forces a read-out first and refuses a state after a NaN
//! ([`Runner::verify_finite`]): see [`hooks::NanGuardHook`]. On the CPU values are
//! read every iteration, as before.
//!
//! Resuming ([`Runner::resume`]) restores weights, optimizer state, pending gradients,
//! counters, the RNG and the data position, so a run stopped after iteration k and
//! resumed ends with the weights, bit for bit on the CPU, of a run never stopped.
//!
//! ```no_run
//! # use kestrel::runner::*;
//! # fn demo<M: Model + 'static>(model: M, opt: Box<dyn Optimizer>,
//! #     loader: Box<dyn DataLoader<Batch = M::Batch>>) -> kestrel::Result<()> {
//! let mut runner = Runner::new(model, opt, "work_dirs/run", Schedule::Epochs(12), 0);
//! runner.set_train_loader(loader);
//! runner.register_training_hooks(
//!     Some(hooks::LrUpdaterHook::new(hooks::LrPolicy::Step { steps: vec![8, 11], gamma: 0.1, min_lr: None }, true)
//!         .with_warmup(hooks::Warmup::Linear, 500, 0.001)),
//!     hooks::OptimizerHook::new(),
//!     Some(hooks::CheckpointHook::new(1, true)),
//!     Some(50),
//! );
//! runner.resume_latest()?;
//! runner.run(&[(Mode::Train, 1)])?;
//! # Ok(()) }
//! ```

mod data;
mod grad_sync;
mod hook;
pub mod hooks;
mod log_buffer;
mod log_sink;
mod model;
mod priority;
#[allow(clippy::module_inception)]
mod runner;
mod state;
mod step_values;
mod work_dir;

pub use data::{epoch_permutation, DataLoader, VecLoader};
pub use grad_sync::GradSync;
pub use hook::{Hook, Stage};
pub use log_buffer::LogBuffer;
pub use log_sink::LogSink;
pub use model::{GraphedStep, Model, Optimizer};
pub use priority::Priority;
pub use runner::{parse_losses, Mode, NonFinite, ResumePoint, Runner, Schedule, StepOutputs};
pub use state::{
    latest_checkpoint, newest_numbered_checkpoint, read_checkpoint_meta, CheckpointMeta,
    CHECKPOINT_KEY, LATEST,
};
pub use step_values::{read_step_values, StagedValues, StepValues};
pub use work_dir::{
    has_run_output, is_temp_file, prepare_work_dir, remove_temp_files, WorkDirLock, WorkDirPolicy,
    LOCK_FILE,
};

impl<M: Model + 'static> Runner<M> {
    /// Register mmcv's default training hooks: the LR schedule (if any), the optimizer
    /// hook, the checkpoint hook (if any), the iteration timer and, with a log
    /// interval, the logger.
    pub fn register_training_hooks(
        &mut self,
        lr: Option<hooks::LrUpdaterHook>,
        optimizer: hooks::OptimizerHook,
        checkpoint: Option<hooks::CheckpointHook>,
        log_interval: Option<usize>,
    ) {
        if let Some(lr) = lr {
            self.register_hook(lr);
        }
        self.register_hook(optimizer);
        if let Some(c) = checkpoint {
            self.register_hook(c);
        }
        self.register_hook(hooks::IterTimerHook::new());
        if let Some(n) = log_interval {
            self.register_hook(hooks::LoggerHook::new(n));
        }
    }
}
