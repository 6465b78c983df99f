//! Training glue: Faster R-CNN as a [`runner::Model`], the data loader the runner
//! drives, COCO evaluation of the model, and the `[model]` config section mapped to a
//! [`FasterRcnnConfig`].

use std::sync::Arc;

use super::faster_rcnn::{FasterRcnn, FasterRcnnConfig};
use super::roi_heads::RoiHeadsConfig;
use super::rpn::RpnConfig;
use super::transform::{image_from_u8, TransformConfig};
use super::{Detections, Target};
use crate::config::{BlockType, ModelConfig, NormType};
use crate::data::{Dataset, Loader, LoaderState, Sample};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::eval::{evaluate, CocoEvaluation, DetBox, GroundTruth};
use crate::nn::resnet::{BlockKind, ResNetConfig};
use crate::nn::{Ctx, NormKind};
use crate::rng::Rng;
use crate::runner::{self, DataLoader};
use crate::tensor::Tensor;

/// One training or validation batch: images `[3, H, W]` in 0..1 (CPU) and their
/// ground truth in pixels.
#[derive(Clone, Debug)]
pub struct DetBatch {
    pub images: Vec<Tensor>,
    pub targets: Vec<Target>,
    pub image_ids: Vec<i64>,
}

impl DetBatch {
    /// A batch from loader samples.
    pub fn from_samples(samples: &[Sample]) -> Result<DetBatch> {
        let images = samples
            .iter()
            .map(|s| image_from_u8(&s.image, s.height, s.width))
            .collect::<Result<_>>()?;
        Ok(DetBatch {
            images,
            targets: samples
                .iter()
                .map(|s| Target {
                    boxes: s.boxes.clone(),
                    labels: s.labels.clone(),
                })
                .collect(),
            image_ids: samples.iter().map(|s| s.image_id).collect(),
        })
    }
}

/// Faster R-CNN wrapped for the [`runner::Runner`]: parameters in
/// `params.trainable_names()` order, every other tensor (BatchNorm running statistics,
/// frozen affine) a buffer. A training step applies the BatchNorm running-statistic
/// updates of its forward pass.
pub struct DetectorModel {
    pub model: FasterRcnn,
    /// Where batches are moved before the forward pass.
    pub device: Device,
    names: Vec<String>,
    buffer_names: Vec<String>,
}

impl DetectorModel {
    /// Wrap `model` (already on `device`).
    pub fn new(model: FasterRcnn, device: Device) -> DetectorModel {
        let names = model.params.trainable_names();
        let buffer_names = model
            .params
            .iter()
            .map(|(n, _)| n.clone())
            .filter(|n| !names.contains(n))
            .collect();
        DetectorModel {
            model,
            device,
            names,
            buffer_names,
        }
    }

    fn images_on_device(&self, batch: &DetBatch) -> Result<Vec<Tensor>> {
        batch
            .images
            .iter()
            .map(|t| t.to_device(self.device))
            .collect()
    }

    fn set_named(&mut self, names: &[String], values: Vec<Tensor>) -> Result<()> {
        if names.len() != values.len() {
            return Err(Error::invalid(
                "DetectorModel",
                format!("{} tensors for {} names", values.len(), names.len()),
            ));
        }
        for (n, t) in names.iter().zip(values) {
            self.model.params.set(n, t)?;
        }
        Ok(())
    }
}

impl runner::Model for DetectorModel {
    type Batch = DetBatch;

    fn params(&self) -> Vec<(String, Tensor)> {
        self.names
            .iter()
            .map(|n| {
                (
                    n.clone(),
                    self.model.params.get(n).cloned().expect("own name"),
                )
            })
            .collect()
    }

    fn set_params(&mut self, params: Vec<Tensor>) -> Result<()> {
        let names = self.names.clone();
        self.set_named(&names, params)
    }

    fn buffers(&self) -> Vec<(String, Tensor)> {
        self.buffer_names
            .iter()
            .map(|n| {
                (
                    n.clone(),
                    self.model.params.get(n).cloned().expect("own name"),
                )
            })
            .collect()
    }

    fn set_buffers(&mut self, buffers: Vec<Tensor>) -> Result<()> {
        let names = self.buffer_names.clone();
        self.set_named(&names, buffers)
    }

    fn train_step(&mut self, batch: &DetBatch, rng: &mut Rng) -> Result<Vec<(String, Tensor)>> {
        let images = self.images_on_device(batch)?;
        let (losses, updates) = {
            let ctx = Ctx::new(&self.model.params, true);
            let losses = self.model.losses(&ctx, &images, &batch.targets, rng)?;
            (losses, ctx.take_buffer_updates())
        };
        for (n, t) in updates {
            // Running statistics are state, not part of the graph.
            self.model.params.set(&n, t.detach())?;
        }
        Ok(losses)
    }

    fn val_step(&mut self, batch: &DetBatch, rng: &mut Rng) -> Result<Vec<(String, Tensor)>> {
        let images = self.images_on_device(batch)?;
        crate::autograd::no_grad(|| {
            let ctx = Ctx::new(&self.model.params, false);
            self.model.losses(&ctx, &images, &batch.targets, rng)
        })
    }

    fn num_samples(&self, batch: &DetBatch) -> usize {
        batch.images.len()
    }
}

/// The threaded, resumable [`Loader`] as a runner [`DataLoader`] of [`DetBatch`]es.
pub struct DetLoader {
    loader: Loader,
    batches: Option<crate::data::Batches>,
    skipped: Vec<String>,
}

impl DetLoader {
    /// Over `loader`.
    pub fn new(loader: Loader) -> DetLoader {
        DetLoader {
            loader,
            batches: None,
            skipped: Vec::new(),
        }
    }
}

impl DataLoader for DetLoader {
    type Batch = DetBatch;

    fn len(&self) -> usize {
        self.loader.batches_per_epoch()
    }

    fn start(&mut self, epoch: u64, position: usize) -> Result<()> {
        // Stop the previous workers before starting new ones.
        self.batches = None;
        self.batches = Some(self.loader.resume_epoch(LoaderState {
            epoch,
            batch: position,
        }));
        Ok(())
    }

    fn next_batch(&mut self) -> Option<Result<DetBatch>> {
        let b = self.batches.as_mut()?.next()?;
        Some(b.and_then(|mut b| {
            self.skipped.append(&mut b.skipped);
            DetBatch::from_samples(&b.samples)
        }))
    }

    fn take_skipped(&mut self) -> Vec<String> {
        std::mem::take(&mut self.skipped)
    }
}

/// COCO results of `model` on every image of `dataset`, `batch_size` images per
/// forward pass; `category_id` maps a label `1..=K` to its COCO category id.
pub fn detect_dataset(
    model: &FasterRcnn,
    dataset: &dyn Dataset,
    batch_size: usize,
    device: Device,
    category_id: &dyn Fn(i64) -> Option<i64>,
) -> Result<Vec<(i64, Detections, Vec<DetBox>)>> {
    let mut out = Vec::with_capacity(dataset.len());
    let idx: Vec<usize> = (0..dataset.len()).collect();
    for chunk in idx.chunks(batch_size.max(1)) {
        let samples = chunk
            .iter()
            .map(|&i| dataset.get(i))
            .collect::<Result<Vec<_>>>()?;
        let batch = DetBatch::from_samples(&samples)?;
        let images = batch
            .images
            .iter()
            .map(|t| t.to_device(device))
            .collect::<Result<Vec<_>>>()?;
        let dets = crate::autograd::no_grad(|| model.detect(&images))?;
        for (d, id) in dets.into_iter().zip(&batch.image_ids) {
            let coco = to_coco(&d, *id, category_id)?;
            out.push((*id, d, coco));
        }
    }
    Ok(out)
}

/// Detections of one image as COCO results (`[x, y, w, h]`, category ids).
pub fn to_coco(
    d: &Detections,
    image_id: i64,
    category_id: &dyn Fn(i64) -> Option<i64>,
) -> Result<Vec<DetBox>> {
    d.boxes
        .iter()
        .zip(&d.scores)
        .zip(&d.labels)
        .map(|((b, &s), &l)| {
            let cat = category_id(l).ok_or_else(|| {
                Error::invalid("to_coco", format!("label {l} has no category id"))
            })?;
            Ok(DetBox {
                image_id,
                category_id: cat,
                bbox: [
                    b[0] as f64,
                    b[1] as f64,
                    (b[2] - b[0]) as f64,
                    (b[3] - b[1]) as f64,
                ],
                score: s as f64,
            })
        })
        .collect()
}

/// Evaluate `model` on `dataset` against `gt` (pycocotools' numbers).
pub fn evaluate_model(
    model: &FasterRcnn,
    dataset: &dyn Dataset,
    gt: &GroundTruth,
    batch_size: usize,
    device: Device,
    category_id: &dyn Fn(i64) -> Option<i64>,
) -> Result<CocoEvaluation> {
    let res = detect_dataset(model, dataset, batch_size, device, category_id)?;
    let dets: Vec<DetBox> = res.into_iter().flat_map(|(_, _, c)| c).collect();
    evaluate(gt, &dets)
}

/// An [`runner::hooks::EvalHook`] function: COCO metrics of the runner's model on
/// `dataset`, as `bbox_mAP`, `bbox_mAP_50`, `bbox_mAP_75`, ... (mmdetection's names),
/// and the pycocotools summary printed to the runner's log.
pub fn coco_eval_fn(
    dataset: Arc<dyn Dataset>,
    gt: GroundTruth,
    batch_size: usize,
    category_id: Arc<dyn Fn(i64) -> Option<i64>>,
) -> impl FnMut(&mut runner::Runner<DetectorModel>) -> Result<Vec<(String, f64)>> {
    move |r| {
        let ev = evaluate_model(
            &r.model.model,
            dataset.as_ref(),
            &gt,
            batch_size,
            r.model.device,
            category_id.as_ref(),
        )?;
        r.log.line(&format!(
            "Evaluating bbox on {} images:\n{}",
            dataset.len(),
            ev.summary().trim_end()
        ));
        Ok(metrics(&ev))
    }
}

/// mmdetection's metric names for the 12 numbers.
pub fn metrics(ev: &CocoEvaluation) -> Vec<(String, f64)> {
    const NAMES: [&str; 6] = [
        "bbox_mAP",
        "bbox_mAP_50",
        "bbox_mAP_75",
        "bbox_mAP_s",
        "bbox_mAP_m",
        "bbox_mAP_l",
    ];
    NAMES
        .iter()
        .zip(ev.stats)
        .map(|(n, v)| (n.to_string(), v))
        .collect()
}

/// The detector a config's `[model]` section describes, and the settings it has no
/// counterpart for yet (ignored; the caller should warn about them).
pub fn model_config(m: &ModelConfig) -> Result<(FasterRcnnConfig, Vec<String>)> {
    let (layers, block) = m.backbone.resolved()?;
    let layers: [usize; 4] = layers.try_into().map_err(|l: Vec<usize>| {
        Error::invalid(
            "model_config",
            format!("model.backbone.layers {l:?}: four stages"),
        )
    })?;
    let mut ignored = Vec::new();
    if m.backbone.groups != 1 {
        return Err(Error::invalid(
            "model_config",
            format!(
                "model.backbone.groups = {}: grouped convolutions are not supported",
                m.backbone.groups
            ),
        ));
    }
    let norm = match m.backbone.norm {
        NormType::FrozenBn => NormKind::Frozen {
            eps: m.backbone.frozen_bn_eps,
        },
        NormType::BatchNorm => NormKind::Batch {
            eps: 1e-5,
            momentum: 0.1,
        },
    };
    let d = crate::config::RpnConfig::default();
    if m.rpn.box_loss_beta != d.box_loss_beta {
        ignored.push("model.rpn.box_loss_beta (the RPN uses 1/9)".into());
    }
    let r = crate::config::RoiConfig::default();
    if m.roi.box_loss_beta != r.box_loss_beta {
        ignored.push("model.roi.box_loss_beta (the box head uses 1/9)".into());
    }
    if m.roi.pool_output_size != 7 || m.roi.sampling_ratio != 2 {
        ignored.push("model.roi.pool_output_size / sampling_ratio (7 and 2 are used)".into());
    }
    let mut roi = RoiHeadsConfig::new(m.num_classes, m.roi.representation_size);
    roi.fg_iou_thresh = m.roi.fg_iou_thresh as f32;
    roi.bg_iou_thresh = m.roi.bg_iou_thresh as f32;
    roi.batch_size_per_image = m.roi.batch_size_per_image;
    roi.positive_fraction = m.roi.positive_fraction;
    roi.bbox_reg_weights = m.roi.bbox_reg_weights.map(|v| v as f32);
    roi.score_thresh = m.roi.score_thresh as f32;
    roi.nms_thresh = m.roi.nms_thresh;
    roi.detections_per_img = m.roi.detections_per_img;
    let rpn = RpnConfig {
        anchor_sizes: m.anchors.sizes.iter().map(|&s| s as f32).collect(),
        aspect_ratios: m.anchors.aspect_ratios.iter().map(|&s| s as f32).collect(),
        pre_nms_top_n_train: m.rpn.pre_nms_top_n_train,
        pre_nms_top_n_test: m.rpn.pre_nms_top_n_test,
        post_nms_top_n_train: m.rpn.post_nms_top_n_train,
        post_nms_top_n_test: m.rpn.post_nms_top_n_test,
        nms_thresh: m.rpn.nms_thresh,
        fg_iou_thresh: m.rpn.fg_iou_thresh as f32,
        bg_iou_thresh: m.rpn.bg_iou_thresh as f32,
        batch_size_per_image: m.rpn.batch_size_per_image,
        positive_fraction: m.rpn.positive_fraction,
        score_thresh: m.rpn.score_thresh as f32,
        ..RpnConfig::default()
    };
    let t = &m.transform;
    let transform = TransformConfig {
        min_size: t.min_size,
        max_size: t.max_size,
        mean: t.image_mean.map(|v| v as f32),
        std: t.image_std.map(|v| v as f32),
        size_divisible: t.size_divisible,
    };
    Ok((
        FasterRcnnConfig {
            backbone: ResNetConfig {
                block: match block {
                    BlockType::Basic => BlockKind::Basic,
                    BlockType::Bottleneck => BlockKind::Bottleneck,
                },
                layers,
                width_per_group: m.backbone.width_per_group,
                norm,
            },
            fpn_channels: m.fpn.out_channels,
            transform,
            rpn,
            roi,
        },
        ignored,
    ))
}

/// A fresh model for a config's `[model]` section, with the backbone stages that
/// `trainable_layers` excludes frozen (torchvision's `trainable_backbone_layers`).
pub fn build_model(m: &ModelConfig, seed: u64) -> Result<(FasterRcnn, Vec<String>)> {
    let (cfg, ignored) = model_config(m)?;
    let mut model = FasterRcnn::new(cfg, seed)?;
    freeze_backbone(&mut model, m.backbone.trainable_layers);
    Ok((model, ignored))
}

/// Freeze the stem and the first `5 - trainable_layers` ResNet stages.
pub fn freeze_backbone(model: &mut FasterRcnn, trainable_layers: usize) {
    if trainable_layers < 5 {
        let prefixes = model.body.stage_prefixes(5 - trainable_layers);
        model.params.freeze(&prefixes);
    }
}

/// The `[model]` section of the small detector of `kestrel demo` and the
/// end-to-end test: ResNet of BasicBlocks [1, 1, 1, 1] with trainable BatchNorm, FPN
/// of 32 channels, anchors 16..256, images kept at `image_size` (no resizing), fewer
/// proposals and sampled RoIs than torchvision's defaults (small images, few objects).
pub fn small_model(num_classes: usize, image_size: usize) -> ModelConfig {
    let mut m = ModelConfig {
        num_classes,
        ..ModelConfig::default()
    };
    m.backbone.depth = None;
    m.backbone.layers = Some(vec![1, 1, 1, 1]);
    m.backbone.block = Some(BlockType::Basic);
    m.backbone.norm = NormType::BatchNorm;
    m.backbone.trainable_layers = 5;
    m.fpn.out_channels = 32;
    m.transform.min_size = image_size;
    m.transform.max_size = image_size;
    m.anchors.sizes = vec![16.0, 32.0, 64.0, 128.0, 256.0];
    m.rpn.pre_nms_top_n_train = 1000;
    m.rpn.pre_nms_top_n_test = 500;
    m.rpn.post_nms_top_n_train = 500;
    m.rpn.post_nms_top_n_test = 300;
    m.roi.representation_size = 256;
    m.roi.batch_size_per_image = 128;
    m
}

/// [`small_model`] as a [`FasterRcnnConfig`].
pub fn small_config(num_classes: usize, image_size: usize) -> FasterRcnnConfig {
    model_config(&small_model(num_classes, image_size))
        .expect("the small model's config is valid")
        .0
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
    pub work_dir: std::path::PathBuf,
    pub device: Device,
    pub seed: u64,
    pub train_count: usize,
    pub val_count: usize,
    pub image_size: usize,
    pub batch_size: usize,
    pub max_iters: usize,
    pub lr: f64,
    pub warmup_iters: usize,
    /// LR steps (x0.1), iterations.
    pub steps: Vec<usize>,
    /// Checkpoint every this many iterations (0: only at the end).
    pub checkpoint_interval: usize,
    pub log_interval: usize,
    /// Print nothing (tests).
    pub quiet: bool,
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
