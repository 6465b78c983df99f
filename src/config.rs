//! Training configuration: a TOML file with the sections `model`, `data`, `schedule`
//! and `runtime`.
//!
//! Every key has a default; the defaults ([`Config::default`]) reproduce torchvision's
//! reference recipe for `fasterrcnn_resnet50_fpn` (references/detection: SGD lr 0.02
//! for 16 images per iteration, momentum 0.9, weight decay 1e-4, 1000 iterations of
//! linear warmup from 0.001, steps at epochs 16 and 22 of 26), and [`Config::mmdet_1x`]
//! mmdetection's `faster_rcnn_r50_fpn_1x_coco` (warmup 500, steps at 8 and 11 of 12).
//! Both are shipped in `configs/`. A file sets only what differs. Unknown keys and
//! wrong types are errors naming the file and the key (`schedule.lr`).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::detection::FasterRcnnConfig;
use crate::error::{Error, Result};
pub use crate::eval::EvalConfig;
use crate::runner::hooks::{
    CheckpointHook, EmaHook, LrPolicy, LrUpdaterHook, OptimizerHook, Warmup,
};
use crate::runner::{Mode, Schedule};

/// A whole configuration.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The detector (each component's own config nested).
    pub model: FasterRcnnConfig,
    /// Training and validation data.
    pub data: DataConfig,
    /// Optimizer and learning-rate schedule.
    pub schedule: ScheduleConfig,
    /// Where and how the run goes.
    pub runtime: RuntimeConfig,
    /// COCO evaluation.
    pub eval: EvalConfig,
}

// ---- data -------------------------------------------------------------------------

/// Which dataset format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DatasetKind {
    /// COCO JSON annotations and an image folder.
    Coco,
    /// Generated shapes (see `[data.shapes]`), written as COCO under `root`.
    Shapes,
}

/// Training and validation data.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// COCO files or generated shapes.
    pub dataset: DatasetKind,
    /// Image folder and COCO JSON of the training set.
    pub train_images: PathBuf,
    /// COCO JSON of the training set.
    pub train_annotations: PathBuf,
    /// Image folder and COCO JSON of the validation set.
    pub val_images: PathBuf,
    /// COCO JSON of the validation set.
    pub val_annotations: PathBuf,
    /// Images per iteration (the reference recipes: 2 per GPU on 8 GPUs).
    pub batch_size: usize,
    /// Threads preparing batches ahead.
    pub num_workers: usize,
    /// Shuffle the training set each epoch (order depends on runtime.seed and epoch).
    pub shuffle: bool,
    /// Probability of a horizontal flip of a training image.
    pub hflip_prob: f64,
    /// Skip unreadable images with a warning instead of stopping: when the dataset
    /// is opened (a bad header) and when an image fails to decode during training
    /// (replaced by the next readable one, logged and counted).
    pub skip_bad_images: bool,
    /// Accept COCO `file_name`s that are absolute or contain `..` (they read
    /// outside the image folder; refused by default).
    pub allow_outside_image_dir: bool,
    /// The generated shapes (`dataset = "shapes"`).
    pub shapes: ShapesConfig,
}

impl Default for DataConfig {
    fn default() -> Self {
        DataConfig {
            dataset: DatasetKind::Coco,
            train_images: "data/coco/train2017".into(),
            train_annotations: "data/coco/annotations/instances_train2017.json".into(),
            val_images: "data/coco/val2017".into(),
            val_annotations: "data/coco/annotations/instances_val2017.json".into(),
            batch_size: 16,
            num_workers: 4,
            shuffle: true,
            hflip_prob: 0.5,
            skip_bad_images: false,
            allow_outside_image_dir: false,
            shapes: ShapesConfig::default(),
        }
    }
}

/// The synthetic shapes dataset.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShapesConfig {
    /// Where it is written.
    pub root: PathBuf,
    /// Seed of the training images (validation: another seed).
    pub seed: u64,
    /// Training images.
    pub train_count: usize,
    /// Validation images.
    pub val_count: usize,
    /// Side of the square images, pixels.
    pub image_size: usize,
}

impl Default for ShapesConfig {
    fn default() -> Self {
        ShapesConfig {
            root: "data/shapes".into(),
            seed: 0,
            train_count: 2000,
            val_count: 200,
            image_size: 128,
        }
    }
}

// ---- schedule ---------------------------------------------------------------------

/// Regular learning-rate schedule.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PolicyKind {
    /// The base rate throughout.
    Fixed,
    /// Times `gamma` at each of `steps`.
    Step,
    /// Cosine annealing to `min_lr`.
    Cosine,
    /// Polynomial decay with `power`.
    Poly,
}

/// Warmup kind (`none` for no warmup).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WarmupKind {
    /// No warmup.
    None,
    /// `warmup_ratio` times the rate during warmup.
    Constant,
    /// Linear from `warmup_ratio` to 1.
    Linear,
    /// Exponential from `warmup_ratio` to 1.
    Exp,
}

/// Gradient clipping by total norm.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GradClipConfig {
    /// Largest total gradient norm.
    pub max_norm: f64,
    #[serde(default = "two")]
    /// The norm (2: Euclidean).
    pub norm_type: f64,
}

fn two() -> f64 {
    2.0
}

/// Optimizer and learning-rate schedule.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScheduleConfig {
    /// Length: `{ epochs = 26 }` or `{ iters = 90000 }`.
    pub max: Schedule,
    /// SGD: base learning rate, momentum, weight decay, Nesterov.
    pub lr: f64,
    /// SGD momentum.
    pub momentum: f64,
    /// L2 weight decay.
    pub weight_decay: f64,
    /// Nesterov momentum.
    pub nesterov: bool,
    /// Regular schedule, and whether it counts epochs or iterations (by default the
    /// unit of `max`).
    pub policy: PolicyKind,
    /// Whether the schedule counts epochs (default: the unit of `max`).
    pub lr_by_epoch: Option<bool>,
    /// `step`: milestones (epochs or iterations) and factor.
    pub steps: Vec<usize>,
    /// `step`: factor at each step.
    pub gamma: f64,
    /// `step`, `cosine`, `poly`: floor of the rate; `cosine`: or a fraction of the base.
    pub min_lr: Option<f64>,
    /// `cosine`: floor as a fraction of the base rate.
    pub min_lr_ratio: Option<f64>,
    /// `poly`: exponent.
    pub power: f64,
    /// Warmup kind, length in iterations and starting fraction.
    pub warmup: WarmupKind,
    /// Warmup length, iterations.
    pub warmup_iters: usize,
    /// Warmup starting fraction of the rate.
    pub warmup_ratio: f64,
    /// Clip gradients by total norm.
    pub grad_clip: Option<GradClipConfig>,
    /// Iterations whose gradients make one step.
    pub cumulative_iters: usize,
}

impl Default for ScheduleConfig {
    fn default() -> Self {
        ScheduleConfig {
            max: Schedule::Epochs(26),
            lr: 0.02,
            momentum: 0.9,
            weight_decay: 1e-4,
            nesterov: false,
            policy: PolicyKind::Step,
            lr_by_epoch: None,
            steps: vec![16, 22],
            gamma: 0.1,
            min_lr: None,
            min_lr_ratio: None,
            power: 1.0,
            warmup: WarmupKind::Linear,
            warmup_iters: 1000,
            warmup_ratio: 0.001,
            grad_clip: None,
            cumulative_iters: 1,
        }
    }
}

// ---- runtime ----------------------------------------------------------------------

/// EMA of the weights.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmaConfig {
    /// Weight of the new parameters per update.
    pub momentum: f64,
    /// Exponential momentum warmup (mmdet's ExpMomentumEMA), iterations.
    pub total_iter: Option<usize>,
}

/// Where and how the run goes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RuntimeConfig {
    /// Checkpoints and logs.
    pub work_dir: PathBuf,
    /// Seeds the training random stream and the data order.
    pub seed: u64,
    /// `auto`, `cpu` or `cuda:N`.
    pub device: String,
    /// `"f32"` (default) or `"bf16"`: the dtype the conv and linear layers compute in
    /// (see [`crate::nn::Precision`]); parameters and checkpoints stay f32 either way.
    pub precision: crate::nn::Precision,
    /// Phases, e.g. `[["train", 1], ["val", 1]]`.
    pub workflow: Vec<(Mode, usize)>,
    /// Checkpoint every this many epochs (iterations when the schedule is in iterations).
    pub checkpoint_interval: usize,
    /// Keep the newest this many checkpoints (all when absent).
    pub max_keep_ckpts: Option<usize>,
    /// Put optimizer state in checkpoints (needed to resume exactly).
    pub save_optimizer: bool,
    /// Log every this many iterations.
    pub log_interval: usize,
    /// Evaluate every this many epochs (iterations); 0: never.
    pub eval_interval: usize,
    /// Keep the checkpoint with the best value of this metric.
    pub save_best: Option<String>,
    /// Average the weights.
    pub ema: Option<EmaConfig>,
    /// Stop with a checkpoint when a loss turns NaN or infinite.
    pub nan_guard: bool,
    /// Show a progress bar on a terminal.
    pub progress_bar: bool,
    /// Continue from `work_dir/latest` when it exists.
    pub resume: bool,
    /// Weights to start from (a checkpoint or a state_dict), if any.
    pub load_from: Option<PathBuf>,
    /// CPU: flush denormal floats to zero (FTZ/DAZ,
    /// [`crate::device::cpu::flush_denormals`]; `--flush-denormals` on `train`,
    /// `eval`, `infer`, `demo` and `bench` does the same). Off by default, as in
    /// PyTorch (`torch.set_flush_denormal(False)`): results are then IEEE's and match
    /// torchvision's; on, values below 2^-126 become zero, which changes results only
    /// there, and the CPU no longer takes its slow path for them (on an Intel Xeon a
    /// R50-FPN training step with random weights went from 6 s to 12 s once its
    /// operands turned denormal: BENCH_RESULTS.md at 97da0f7). No effect on a GPU's
    /// kernels.
    pub flush_denormals: bool,
    /// Train through captured device graphs (`kestrel train --graph` does the same):
    /// on a CUDA or emulated device, in f32 with frozen BatchNorm, each training
    /// step replays the dense part's forward and backward as two graphs
    /// ([`crate::detection::graphed_train`]), captured on the first batch of each
    /// geometry (image sizes; up to 4 kept, [`crate::app::model::DetectorModel`]).
    /// The same losses and weights as eager training, bit for bit. Elsewhere (CPU,
    /// bf16, BatchNorm with running statistics) training runs eagerly with one log
    /// line saying why; gradient accumulation (`cumulative_iters > 1`) and
    /// data-parallel training are refused with it. Off by default.
    pub graph: bool,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            work_dir: "work_dirs/fasterrcnn_resnet50_fpn".into(),
            seed: 0,
            device: "auto".into(),
            precision: crate::nn::Precision::F32,
            workflow: vec![(Mode::Train, 1)],
            checkpoint_interval: 1,
            max_keep_ckpts: None,
            save_optimizer: true,
            log_interval: 20,
            eval_interval: 1,
            save_best: None,
            ema: None,
            nan_guard: true,
            progress_bar: true,
            resume: false,
            load_from: None,
            flush_denormals: false,
            graph: false,
        }
    }
}

// ---- loading ----------------------------------------------------------------------

impl Config {
    /// mmdetection's `faster_rcnn_r50_fpn_1x_coco`: 12 epochs, warmup 500, steps at 8
    /// and 11, L1 box losses, aligned RoIAlign with adaptive sampling, RPN keeping 1000
    /// proposals in training, BatchNorm with fixed statistics and a trained affine
    /// (`norm_eval`), 80 classes plus background, log every 50 iterations.
    pub fn mmdet_1x() -> Config {
        let mut c = Config::default();
        c.model.roi.num_classes = 81;
        c.model.backbone.norm = crate::nn::NormKind::FrozenStats { eps: 1e-5 };
        c.model.rpn.post_nms_top_n_train = 1000;
        c.model.rpn.box_loss_beta = 0.0;
        c.model.roi.sampling_ratio = 0;
        c.model.roi.aligned = true;
        c.model.roi.box_loss_beta = 0.0;
        c.schedule.max = Schedule::Epochs(12);
        c.schedule.steps = vec![8, 11];
        c.schedule.warmup_iters = 500;
        c.runtime.work_dir = "work_dirs/faster_rcnn_r50_fpn_1x".into();
        c.runtime.log_interval = 50;
        c
    }

    /// Read and check a TOML file.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Config> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_toml_str(&text, &path.display().to_string())
    }

    /// Parse and check TOML text; `origin` names it in errors (the file name).
    pub fn from_toml_str(text: &str, origin: &str) -> Result<Config> {
        let c: Config = toml::from_str(text).map_err(|e| Error::Config {
            origin: origin.to_string(),
            msg: describe_toml_error(text, &e),
        })?;
        c.validate().map_err(|e| match e {
            Error::Config { msg, .. } => Error::Config {
                origin: origin.to_string(),
                msg,
            },
            other => other,
        })?;
        Ok(c)
    }

    /// The configuration as TOML (every key written out).
    pub fn to_toml_string(&self) -> Result<String> {
        toml::to_string_pretty(self).map_err(|e| Error::Config {
            origin: "<serialise>".into(),
            msg: e.to_string(),
        })
    }

    /// Check values that types cannot (ranges, consistency); the error names the key.
    pub fn validate(&self) -> Result<()> {
        self.model.validate().map_err(under("model"))?;
        fraction("data.hflip_prob", self.data.hflip_prob)?;
        positive("data.batch_size", self.data.batch_size)?;
        if self.data.num_workers > crate::data::loader::MAX_WORKERS {
            return Err(invalid(
                "data.num_workers",
                format!(
                    "{} (at most {})",
                    self.data.num_workers,
                    crate::data::loader::MAX_WORKERS
                ),
            ));
        }
        self.validate_schedule()?;
        let r = &self.runtime;
        crate::Device::parse(&r.device).map_err(|e| invalid("runtime.device", e.to_string()))?;
        if !r.workflow.iter().any(|(m, n)| *m == Mode::Train && *n > 0) {
            return Err(invalid(
                "runtime.workflow",
                format!("{:?} has no training phase", r.workflow),
            ));
        }
        positive("runtime.checkpoint_interval", r.checkpoint_interval)?;
        positive("runtime.log_interval", r.log_interval)?;
        positive("eval.max_dets", self.eval.max_dets)?;
        if let Some(e) = &r.ema {
            if !(e.momentum > 0.0 && e.momentum < 1.0) {
                return Err(invalid(
                    "runtime.ema.momentum",
                    format!("{} (0 < m < 1)", e.momentum),
                ));
            }
        }
        Ok(())
    }

    fn validate_schedule(&self) -> Result<()> {
        let s = &self.schedule;
        match s.max {
            Schedule::Epochs(0) | Schedule::Iters(0) => {
                return Err(invalid("schedule.max", "zero length".into()))
            }
            Schedule::Iters(_) if s.lr_by_epoch == Some(true) => {
                return Err(invalid(
                    "schedule.lr_by_epoch",
                    "true with a schedule in iterations (`max = { iters = .. }`)".into(),
                ))
            }
            _ => {}
        }
        if s.lr.is_nan() || s.lr <= 0.0 {
            return Err(invalid(
                "schedule.lr",
                format!("{} (must be positive)", s.lr),
            ));
        }
        if !(0.0..1.0).contains(&s.momentum) {
            return Err(invalid(
                "schedule.momentum",
                format!("{} (0 <= m < 1)", s.momentum),
            ));
        }
        if s.weight_decay.is_nan() || s.weight_decay < 0.0 {
            return Err(invalid(
                "schedule.weight_decay",
                format!("{}", s.weight_decay),
            ));
        }
        if s.policy == PolicyKind::Step && s.steps.windows(2).any(|w| w[0] >= w[1]) {
            return Err(invalid(
                "schedule.steps",
                format!("{:?} are not increasing", s.steps),
            ));
        }
        if s.warmup != WarmupKind::None {
            positive("schedule.warmup_iters", s.warmup_iters)?;
            if !(s.warmup_ratio > 0.0 && s.warmup_ratio <= 1.0) {
                return Err(invalid(
                    "schedule.warmup_ratio",
                    format!("{} (0 < r <= 1)", s.warmup_ratio),
                ));
            }
        }
        if let Some(c) = &s.grad_clip {
            if !(c.max_norm > 0.0 && c.norm_type > 0.0) {
                return Err(invalid(
                    "schedule.grad_clip",
                    format!("max_norm {} norm_type {}", c.max_norm, c.norm_type),
                ));
            }
        }
        positive("schedule.cumulative_iters", s.cumulative_iters)
    }

    // ---- what the runner gets ----

    /// The regular LR policy.
    pub fn lr_policy(&self) -> LrPolicy {
        let s = &self.schedule;
        match s.policy {
            PolicyKind::Fixed => LrPolicy::Fixed,
            PolicyKind::Step => LrPolicy::Step {
                steps: s.steps.clone(),
                gamma: s.gamma,
                min_lr: s.min_lr,
            },
            PolicyKind::Cosine => LrPolicy::Cosine {
                min_lr: s.min_lr.unwrap_or(0.0),
                min_lr_ratio: s.min_lr_ratio,
            },
            PolicyKind::Poly => LrPolicy::Poly {
                power: s.power,
                min_lr: s.min_lr.unwrap_or(0.0),
            },
        }
    }

    /// The LR updater hook of the schedule.
    pub fn lr_updater_hook(&self) -> LrUpdaterHook {
        let s = &self.schedule;
        let by_epoch = s
            .lr_by_epoch
            .unwrap_or(matches!(s.max, Schedule::Epochs(_)));
        let hook = LrUpdaterHook::new(self.lr_policy(), by_epoch);
        let warmup = match s.warmup {
            WarmupKind::None => return hook,
            WarmupKind::Constant => Warmup::Constant,
            WarmupKind::Linear => Warmup::Linear,
            WarmupKind::Exp => Warmup::Exp,
        };
        hook.with_warmup(warmup, s.warmup_iters, s.warmup_ratio)
    }

    /// The optimizer hook (clipping, accumulation).
    pub fn optimizer_hook(&self) -> OptimizerHook {
        let s = &self.schedule;
        let mut h = OptimizerHook::new().with_cumulative_iters(s.cumulative_iters);
        if let Some(c) = &s.grad_clip {
            h = h.with_grad_clip(c.max_norm, c.norm_type);
        }
        h
    }

    /// The checkpoint hook (by epoch when the schedule is in epochs).
    pub fn checkpoint_hook(&self) -> CheckpointHook {
        let r = &self.runtime;
        let by_epoch = matches!(self.schedule.max, Schedule::Epochs(_));
        let mut h = CheckpointHook::new(r.checkpoint_interval, by_epoch);
        h.save_optimizer = r.save_optimizer;
        h.max_keep_ckpts = r.max_keep_ckpts;
        h
    }

    /// The EMA hook, if configured.
    pub fn ema_hook(&self) -> Option<EmaHook> {
        self.runtime.ema.as_ref().map(|e| match e.total_iter {
            Some(t) => EmaHook::exp_momentum(e.momentum, t),
            None => EmaHook::new(e.momentum),
        })
    }
}

/// A config error naming `key` (relative to the section that checks it; see
/// [`under`]).
pub fn invalid(key: &str, msg: String) -> Error {
    Error::Config {
        origin: "<config>".into(),
        msg: format!("key `{key}`: {msg}"),
    }
}

/// An error naming `key` unless `v > 0`.
pub fn positive(key: &str, v: usize) -> Result<()> {
    if v == 0 {
        return Err(invalid(key, "must be positive".into()));
    }
    Ok(())
}

/// An error naming `key` unless `0 <= v <= 1`.
pub fn fraction(key: &str, v: f64) -> Result<()> {
    if !(0.0..=1.0).contains(&v) {
        return Err(invalid(key, format!("{v} is not in [0, 1]")));
    }
    Ok(())
}

/// Prefix the key a section's `validate` named with the section's own key
/// (`nms_thresh` -> `model.rpn.nms_thresh`), for `map_err`.
pub fn under(section: &str) -> impl Fn(Error) -> Error + '_ {
    move |e| match e {
        Error::Config { origin, msg } => Error::Config {
            origin,
            msg: match msg.strip_prefix("key `") {
                Some(rest) => format!("key `{section}.{rest}"),
                None => format!("{section}: {msg}"),
            },
        },
        other => other,
    }
}

/// `key `schedule.lr`: invalid type: string "a", expected f64 (line 3, column 6)`:
/// serde's message with the dotted key and position found from the error's span.
fn describe_toml_error(text: &str, e: &toml::de::Error) -> String {
    let msg = e.message().trim_end().to_string();
    let Some(span) = e.span() else {
        return msg;
    };
    let at = span.start.min(text.len());
    let line_start = text[..at].rfind('\n').map_or(0, |i| i + 1);
    let line_no = text[..at].matches('\n').count() + 1;
    let col = text[line_start..at].chars().count() + 1;
    let line_end = text[at..].find('\n').map_or(text.len(), |i| at + i);
    let line = &text[line_start..line_end];
    let table = text[..line_start]
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('['))
        .map(|l| l.trim_matches(|c| c == '[' || c == ']').trim().to_string());
    let key = if line.trim_start().starts_with('[') {
        Some(
            line.trim()
                .trim_matches(|c| c == '[' || c == ']')
                .trim()
                .to_string(),
        )
    } else {
        line.split_once('=').map(|(k, _)| {
            let k = k.trim().trim_matches('"').to_string();
            match &table {
                Some(t) => format!("{t}.{k}"),
                None => k,
            }
        })
    };
    match key {
        Some(k) => format!("key `{k}`: {msg} (line {line_no}, column {col})"),
        None => format!("{msg} (line {line_no}, column {col})"),
    }
}
