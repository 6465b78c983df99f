//! Training runs: the model a config describes, and the shapes run of `kestrel demo`
//! and the end-to-end test.

use std::sync::Arc;

use super::eval::coco_eval_fn;
use super::model::{DetLoader, DetectorModel};
use crate::config::{Config, DatasetKind};
use crate::data::{CocoDataset, CocoOptions, Dataset, Loader, LoaderConfig};
use crate::detection::faster_rcnn::{FasterRcnn, FasterRcnnConfig};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::nn::resnet::BlockKind;
use crate::nn::NormKind;
use crate::optim::{Sgd, SgdConfig};
use crate::runner::hooks::{EvalHook, NanGuardHook};
use crate::runner::{self, Mode, Runner};

/// The small detector of `kestrel demo` and the end-to-end test: ResNet of
/// BasicBlocks [1, 1, 1, 1] with trainable BatchNorm, FPN of 32 channels, anchors
/// 16..256, images kept at `image_size` (no resizing), fewer proposals and sampled RoIs
/// than torchvision's defaults (small images, few objects).
pub fn small_config(num_classes: usize, image_size: usize) -> FasterRcnnConfig {
    let mut m = FasterRcnnConfig::default();
    m.roi.num_classes = num_classes;
    m.backbone.block = BlockKind::Basic;
    m.backbone.layers = [1, 1, 1, 1];
    m.backbone.norm = NormKind::Batch {
        eps: 1e-5,
        momentum: 0.1,
    };
    m.backbone.trainable_layers = 5;
    m.fpn_channels = 32;
    m.transform.min_size = image_size;
    m.transform.max_size = image_size;
    m.rpn.anchor_sizes = vec![16.0, 32.0, 64.0, 128.0, 256.0];
    m.rpn.pre_nms_top_n_train = 1000;
    m.rpn.pre_nms_top_n_test = 500;
    m.rpn.post_nms_top_n_train = 500;
    m.rpn.post_nms_top_n_test = 300;
    m.roi.representation_size = 256;
    m.roi.batch_size_per_image = 128;
    m
}

/// Load the parameters and buffers of `model` from a checkpoint or state_dict holding
/// them under their names (other tensors, such as optimizer state, are ignored).
pub fn load_weights(model: &mut FasterRcnn, path: &std::path::Path) -> Result<()> {
    let f = crate::io::TensorFile::open(path)?;
    let device = model
        .params
        .iter()
        .next()
        .map_or(Device::Cpu, |(_, t)| t.device());
    let names: Vec<String> = model.params.iter().map(|(n, _)| n.clone()).collect();
    let missing: Vec<&String> = names.iter().filter(|n| !f.contains(n)).collect();
    if !missing.is_empty() {
        return Err(Error::Tensor {
            name: path.display().to_string(),
            msg: format!(
                "{} model tensors missing, e.g. `{}` (a checkpoint of another model?)",
                missing.len(),
                missing[0]
            ),
        });
    }
    for n in &names {
        let t = f.tensor(n)?.to_dtype(crate::tensor::DType::F32)?;
        model.params.set(n, t.to_device(device)?)?;
    }
    Ok(())
}

/// Settings of a training run on generated shapes (`kestrel demo`, the end-to-end
/// test).
#[derive(Clone, Debug)]
pub struct ShapesRun {
    /// Checkpoints and logs.
    pub work_dir: std::path::PathBuf,
    /// Where the model trains.
    pub device: Device,
    /// Seeds the weights, the data and the sampling.
    pub seed: u64,
    /// Generated training images.
    pub train_count: usize,
    /// Generated validation images (another seed).
    pub val_count: usize,
    /// Side of the square images, pixels.
    pub image_size: usize,
    /// Images per iteration.
    pub batch_size: usize,
    /// Training iterations.
    pub max_iters: usize,
    /// Base learning rate of SGD.
    pub lr: f64,
    /// Iterations of linear warmup.
    pub warmup_iters: usize,
    /// LR steps (x0.1), iterations.
    pub steps: Vec<usize>,
    /// Checkpoint every this many iterations (0: only at the end).
    pub checkpoint_interval: usize,
    /// Log every this many iterations.
    pub log_interval: usize,
    /// Print nothing (tests).
    pub quiet: bool,
    /// The dtype the conv and linear layers compute in.
    pub precision: crate::nn::Precision,
}

impl ShapesRun {
    /// The demo's recipe for `max_iters` iterations: batch 4, SGD 0.02 with momentum
    /// 0.9 and weight decay 1e-4, 100 iterations of linear warmup, x0.1 at 75%.
    pub fn demo(work_dir: impl Into<std::path::PathBuf>, device: Device, max_iters: usize) -> Self {
        ShapesRun {
            work_dir: work_dir.into(),
            device,
            seed: 0,
            train_count: 2000,
            val_count: 200,
            image_size: 128,
            batch_size: 4,
            max_iters,
            lr: 0.02,
            warmup_iters: 100.min(max_iters / 4).max(1),
            steps: vec![max_iters * 3 / 4],
            checkpoint_interval: 0,
            log_interval: 20,
            quiet: false,
            precision: crate::nn::Precision::F32,
        }
    }

    /// The generated training and validation sets (disjoint: different seeds).
    pub fn datasets(&self) -> Result<(crate::data::ShapesData, crate::data::ShapesData)> {
        use crate::data::{generate_shapes_in_memory, ShapesConfig};
        let train = generate_shapes_in_memory(&ShapesConfig::new(
            self.seed,
            self.train_count,
            self.image_size,
        ))?;
        let val = generate_shapes_in_memory(&ShapesConfig::new(
            self.seed.wrapping_add(1_000_003),
            self.val_count,
            self.image_size,
        ))?;
        Ok((train, val))
    }

    /// A runner with its model, SGD, loader and hooks (LR, optimizer, checkpoint,
    /// timer, logger, NaN guard), ready to `run(&[(Mode::Train, 1)])`.
    pub fn runner(&self, train: Arc<dyn Dataset>) -> Result<runner::Runner<DetectorModel>> {
        use crate::optim::{Sgd, SgdConfig};
        use crate::runner::hooks::{
            CheckpointHook, LrPolicy, LrUpdaterHook, NanGuardHook, OptimizerHook, Warmup,
        };
        let num_classes = crate::data::shapes::SHAPE_CLASSES.len() + 1;
        let mut model = FasterRcnn::new(small_config(num_classes, self.image_size), self.seed)?;
        model.to_device(self.device)?;
        model.set_precision(self.precision);
        let sgd = Sgd::new(SgdConfig {
            lr: self.lr,
            momentum: 0.9,
            weight_decay: 1e-4,
            ..SgdConfig::default()
        })?;
        let mut r = runner::Runner::new(
            DetectorModel::new(model, self.device),
            Box::new(sgd),
            &self.work_dir,
            runner::Schedule::Iters(self.max_iters),
            self.seed,
        );
        r.log.quiet = self.quiet;
        record_model_config(&mut r)?;
        let names = crate::data::shapes::SHAPE_CLASSES
            .map(String::from)
            .to_vec();
        record_class_names(&mut r, &names);
        let loader = Loader::new(
            train,
            crate::data::LoaderConfig {
                batch_size: self.batch_size,
                shuffle: true,
                seed: self.seed,
                drop_last: true,
                hflip_prob: 0.5,
                workers: 1,
                prefetch: 2,
            },
        )?;
        r.set_train_loader(Box::new(DetLoader::new(loader)));
        let lr = LrUpdaterHook::new(
            LrPolicy::Step {
                steps: self.steps.clone(),
                gamma: 0.1,
                min_lr: None,
            },
            false,
        )
        .with_warmup(Warmup::Linear, self.warmup_iters, 0.001);
        let interval = if self.checkpoint_interval == 0 {
            self.max_iters
        } else {
            self.checkpoint_interval
        };
        let mut ckpt = CheckpointHook::new(interval, false);
        ckpt.max_keep_ckpts = Some(2);
        r.register_training_hooks(
            Some(lr),
            OptimizerHook::new(),
            Some(ckpt),
            Some(self.log_interval),
        );
        r.register_hook(NanGuardHook::new());
        Ok(r)
    }
}

/// The datasets of a config: (train, val); val also maps labels to category ids.
pub type Sets = (Arc<dyn Dataset>, Arc<CocoDataset>);

/// The training and validation sets a config's `[data]` section names (generated
/// shapes are written under `data.shapes.root` first when absent).
pub fn config_datasets(cfg: &Config) -> Result<Sets> {
    let d = &cfg.data;
    let opts = CocoOptions {
        skip_bad_images: d.skip_bad_images,
        allow_outside_image_dir: d.allow_outside_image_dir,
        ..CocoOptions::default()
    };
    let (train, val) = match d.dataset {
        DatasetKind::Coco => (
            CocoDataset::open(&d.train_annotations, &d.train_images, opts)?,
            CocoDataset::open(&d.val_annotations, &d.val_images, opts)?,
        ),
        DatasetKind::Shapes => {
            let s = &d.shapes;
            let open = |sub: &str, seed: u64, count: usize| -> Result<CocoDataset> {
                let dir = s.root.join(sub);
                if !dir.join("annotations.json").is_file() {
                    println!("generating {count} shapes in {}", dir.display());
                    crate::data::generate_shapes(&dir, seed, count, s.image_size)?;
                }
                CocoDataset::open_dir(&dir, opts)
            };
            (
                open("train", s.seed, s.train_count)?,
                open("val", s.seed.wrapping_add(1_000_003), s.val_count)?,
            )
        }
    };
    // A category the model has no class for fails much later, inside the loss:
    // check now and name it.
    train.check_num_classes(cfg.model.roi.num_classes)?;
    val.check_num_classes(cfg.model.roi.num_classes)?;
    Ok((Arc::new(train), Arc::new(val)))
}

/// The runner a config describes on `dev`: model (with `load_from` weights), SGD,
/// loaders, the default hooks (LR, optimizer, checkpoint, logger), the NaN guard, EMA
/// and COCO evaluation as configured; `config.toml` written to the work_dir.
pub fn config_runner(cfg: &Config, dev: Device) -> Result<Runner<DetectorModel>> {
    let (train_set, val_set) = config_datasets(cfg)?;
    let mut model = FasterRcnn::new(cfg.model.clone(), cfg.runtime.seed)?;
    model.to_device(dev)?;
    model.set_precision(cfg.runtime.precision);
    let s = &cfg.schedule;
    let sgd = Sgd::new(SgdConfig {
        lr: s.lr,
        momentum: s.momentum,
        weight_decay: s.weight_decay,
        nesterov: s.nesterov,
        ..SgdConfig::default()
    })?;
    let r = &cfg.runtime;
    let mut runner = Runner::new(
        DetectorModel::new(model, dev).with_graphs(r.graph),
        Box::new(sgd),
        &r.work_dir,
        s.max,
        r.seed,
    );
    record_model_config(&mut runner)?;
    let loader = |set: Arc<dyn Dataset>, train: bool| -> Result<DetLoader> {
        Ok(DetLoader::new(Loader::new(
            set,
            LoaderConfig {
                batch_size: cfg.data.batch_size,
                shuffle: train && cfg.data.shuffle,
                seed: r.seed,
                drop_last: train,
                hflip_prob: if train { cfg.data.hflip_prob } else { 0.0 },
                workers: cfg.data.num_workers,
                prefetch: 2 * cfg.data.num_workers.max(1),
            },
        )?))
    };
    let names: Vec<String> = val_set
        .categories()
        .iter()
        .map(|c| c.name.clone())
        .collect();
    record_class_names(&mut runner, &names);
    runner.set_train_loader(Box::new(loader(train_set, true)?));
    if r.workflow.iter().any(|(m, _)| *m == Mode::Val) {
        runner.set_val_loader(Box::new(loader(val_set.clone(), false)?));
    }
    runner.register_training_hooks(
        Some(cfg.lr_updater_hook()),
        cfg.optimizer_hook(),
        Some(cfg.checkpoint_hook()),
        Some(r.log_interval),
    );
    if r.nan_guard {
        runner.register_hook(NanGuardHook::new());
    }
    if let Some(ema) = cfg.ema_hook() {
        runner.register_hook(ema);
    }
    if r.eval_interval > 0 {
        let cats = val_set.clone();
        let by_epoch = matches!(s.max, runner::Schedule::Epochs(_));
        let mut hook = EvalHook::new(
            coco_eval_fn(
                val_set.clone(),
                val_set.ground_truth(),
                cfg.data.batch_size,
                cfg.eval.params(),
                Arc::new(move |l| cats.category_id(l)),
            ),
            r.eval_interval,
            by_epoch,
        );
        if let Some(m) = &r.save_best {
            hook = hook.save_best(m);
        }
        runner.register_hook(hook);
    }
    std::fs::create_dir_all(&r.work_dir).map_err(|source| Error::Io {
        path: r.work_dir.clone(),
        source,
    })?;
    let cfg_path = r.work_dir.join("config.toml");
    std::fs::write(&cfg_path, cfg.to_toml_string()?).map_err(|source| Error::Io {
        path: cfg_path.clone(),
        source,
    })?;
    if let Some(w) = &r.load_from {
        runner.load_weights(w)?;
    }
    Ok(runner)
}

/// Put the model config in the runner's `meta`, which every checkpoint carries, so
/// [`FasterRcnn::from_checkpoint`] rebuilds the model from the file alone.
pub fn record_model_config(r: &mut Runner<DetectorModel>) -> Result<()> {
    let v = serde_json::to_value(&r.model.model.config)
        .map_err(|e| Error::invalid("record_model_config", e.to_string()))?;
    r.meta
        .insert(crate::detection::faster_rcnn::MODEL_CONFIG_KEY.into(), v);
    Ok(())
}

/// Runner `meta` key of the class names (label `k` is `names[k - 1]`).
pub const CLASS_NAMES_KEY: &str = "class_names";

/// Put the class names in the runner's `meta`, so a checkpoint's drawn detections
/// name their classes.
pub fn record_class_names(r: &mut Runner<DetectorModel>, names: &[String]) {
    r.meta.insert(CLASS_NAMES_KEY.into(), names.into());
}
