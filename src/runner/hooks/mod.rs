//! The hooks that come with the runner, with mmcv's default priorities:
//! LrUpdater VERY_HIGH (10), NanGuard HIGH (30), Optimizer ABOVE_NORMAL (40), EMA 49,
//! Checkpoint NORMAL (50), IterTimer LOW (70), Eval LOW (70), Logger VERY_LOW (90).

pub mod checkpoint;
pub mod ema;
pub mod eval;
pub mod iter_timer;
pub mod logger;
pub mod lr_updater;
pub mod nan_guard;
pub mod optimizer;

pub use checkpoint::{CheckpointHook, Rule};
pub use ema::EmaHook;
pub use eval::{EvalFn, EvalHook};
pub use iter_timer::IterTimerHook;
pub use logger::LoggerHook;
pub use lr_updater::{LrPolicy, LrUpdaterHook, Warmup};
pub use nan_guard::NanGuardHook;
pub use optimizer::{GradClip, OptimizerHook};
