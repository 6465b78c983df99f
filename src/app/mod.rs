//! The application layer: what assembles runs from the library's pieces. Training
//! from a config (config -> model -> runner -> hooks -> evaluation), the shapes run of
//! `kestrel demo`, COCO evaluation of a model, stage profiling and `kestrel bench`,
//! the kernel-development loop, and the bodies of every CLI command (the binary only
//! parses arguments and calls these).
//!
//! Nothing below `app` imports it: `detection` knows nothing of the runner, the config
//! file or evaluation.

pub mod bench;
pub mod bench_ops;
pub mod commands;
pub mod dist;
pub mod eval;
pub mod kernel_check;
pub mod model;
pub mod profile;
pub mod train;

pub use eval::{coco_eval_fn, detect_dataset, evaluate_model, metrics, to_coco};
pub use model::{DetBatch, DetLoader, DetectorModel};
pub use train::ShapesRun;
