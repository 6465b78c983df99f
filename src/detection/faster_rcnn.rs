//! Faster R-CNN with a ResNet-FPN backbone, torchvision's `FasterRCNN` semantics.

use std::path::Path;

use super::roi_heads::{RoiHeads, RoiHeadsConfig};
use super::rpn::{Rpn, RpnConfig};
use super::transform::{resize_box_list, transform, ImageList, TransformConfig};
use super::{Detections, Target};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::io::TensorFile;
use crate::nn::fpn::Fpn;
use crate::nn::resnet::{BlockKind, ResNet, ResNetConfig};
use crate::nn::{Ctx, NormKind, ParamSpec, ParamStore};
use crate::rng::Rng;
use crate::tensor::Tensor;

/// Stage names of an inference pass, in the order [`FasterRcnn::detect_staged`]
/// reports them.
pub const INFERENCE_STAGES: [&str; 7] = [
    "transform",
    "backbone",
    "fpn",
    "rpn_head",
    "proposals",
    "roi_heads",
    "postprocess",
];

/// Stage names of a training step: the six [`FasterRcnn::losses_staged`] reports,
/// then the backward pass and the optimizer step (timed by the caller).
pub const TRAINING_STAGES: [&str; 8] = [
    "transform",
    "backbone",
    "fpn",
    "rpn_head",
    "proposals",
    "roi_heads",
    "backward",
    "optimizer",
];

/// Called with a stage's name as the stage ends (see [`INFERENCE_STAGES`]); an error
/// aborts the pass.
pub type StageFn<'a> = &'a mut dyn FnMut(&'static str) -> Result<()>;

/// Everything that shapes the model.
#[derive(Clone, Debug, PartialEq)]
pub struct FasterRcnnConfig {
    pub backbone: ResNetConfig,
    pub fpn_channels: usize,
    pub transform: TransformConfig,
    pub rpn: RpnConfig,
    pub roi: RoiHeadsConfig,
}

impl FasterRcnnConfig {
    /// torchvision's `fasterrcnn_resnet50_fpn` for `num_classes` classes (with
    /// background), frozen BatchNorm with `bn_eps` (torchvision's COCO weights use 0).
    pub fn resnet50_fpn(num_classes: usize, bn_eps: f64) -> Result<Self> {
        let mut backbone = ResNetConfig::depth(50)?;
        backbone.norm = NormKind::Frozen { eps: bn_eps };
        Ok(FasterRcnnConfig {
            backbone,
            fpn_channels: 256,
            transform: TransformConfig::new(800, 1333),
            rpn: RpnConfig::default(),
            roi: RoiHeadsConfig::new(num_classes, 1024),
        })
    }

    /// The configuration in the `params` of a fixture's weights file (block, layers,
    /// width_per_group, fpn_channels, representation_size, num_classes, min_size,
    /// max_size, bn_eps).
    pub fn from_params(p: &serde_json::Value) -> Result<Self> {
        let bad = |k: &str| {
            Error::invalid(
                "FasterRcnnConfig::from_params",
                format!("missing or invalid `{k}`"),
            )
        };
        let u = |k: &str| {
            p.get(k)
                .and_then(|v| v.as_u64())
                .map(|v| v as usize)
                .ok_or_else(|| bad(k))
        };
        let block = match p.get("block").and_then(|v| v.as_str()) {
            Some("bottleneck") => BlockKind::Bottleneck,
            Some("basic") => BlockKind::Basic,
            _ => return Err(bad("block")),
        };
        let layers: Vec<usize> = p
            .get("layers")
            .and_then(|v| v.as_array())
            .ok_or_else(|| bad("layers"))?
            .iter()
            .filter_map(|v| v.as_u64().map(|x| x as usize))
            .collect();
        let layers: [usize; 4] = layers.try_into().map_err(|_| bad("layers"))?;
        let eps = p
            .get("bn_eps")
            .and_then(|v| v.as_f64())
            .ok_or_else(|| bad("bn_eps"))?;
        Ok(FasterRcnnConfig {
            backbone: ResNetConfig {
                block,
                layers,
                width_per_group: u("width_per_group")?,
                norm: NormKind::Frozen { eps },
            },
            fpn_channels: u("fpn_channels")?,
            transform: TransformConfig::new(u("min_size")?, u("max_size")?),
            rpn: RpnConfig::default(),
            roi: RoiHeadsConfig::new(u("num_classes")?, u("representation_size")?),
        })
    }
}

/// The detector: backbone body, FPN, RPN, box head, and its parameters.
pub struct FasterRcnn {
    pub config: FasterRcnnConfig,
    pub body: ResNet,
    pub fpn: Fpn,
    pub rpn: Rpn,
    pub roi_heads: RoiHeads,
    pub params: ParamStore,
}

/// Intermediate results of an inference pass, for inspection and stage tests.
pub struct InferenceTrace {
    pub images: ImageList,
    pub features: Vec<Tensor>,
    pub proposals: Vec<Tensor>,
    pub detections: Vec<Detections>,
}

impl FasterRcnn {
    fn build(config: FasterRcnnConfig) -> Result<(ResNet, Fpn, Rpn, RoiHeads)> {
        let body = ResNet::new("backbone.body.", config.backbone.clone())?;
        let fpn = Fpn::new(
            "backbone.fpn.",
            &config.backbone.out_channels(),
            config.fpn_channels,
        );
        let rpn = Rpn::new(config.fpn_channels, config.rpn.clone())?;
        let roi = RoiHeads::new(config.fpn_channels, config.roi.clone());
        Ok((body, fpn, rpn, roi))
    }

    fn specs_of(body: &ResNet, fpn: &Fpn, rpn: &Rpn, roi: &RoiHeads) -> Vec<ParamSpec> {
        let mut s = Vec::new();
        body.specs(&mut s);
        fpn.specs(&mut s);
        rpn.specs(&mut s);
        roi.specs(&mut s);
        s
    }

    /// A freshly initialised model (PyTorch's initialisers, seeded).
    pub fn new(config: FasterRcnnConfig, seed: u64) -> Result<FasterRcnn> {
        let (body, fpn, rpn, roi_heads) = Self::build(config.clone())?;
        let params = ParamStore::init(&Self::specs_of(&body, &fpn, &rpn, &roi_heads), seed)?;
        Ok(FasterRcnn {
            config,
            body,
            fpn,
            rpn,
            roi_heads,
            params,
        })
    }

    /// A model with weights from a safetensors file under torchvision's key names. A
    /// missing, unexpected or mis-shaped tensor is an error naming it.
    pub fn load(config: FasterRcnnConfig, path: impl AsRef<Path>) -> Result<FasterRcnn> {
        let (body, fpn, rpn, roi_heads) = Self::build(config.clone())?;
        let file = TensorFile::open(path)?;
        let params = ParamStore::load(&file, &Self::specs_of(&body, &fpn, &rpn, &roi_heads))?;
        Ok(FasterRcnn {
            config,
            body,
            fpn,
            rpn,
            roi_heads,
            params,
        })
    }

    /// The tensors the model expects.
    pub fn specs(&self) -> Vec<ParamSpec> {
        Self::specs_of(&self.body, &self.fpn, &self.rpn, &self.roi_heads)
    }

    /// Move every parameter to `device`.
    pub fn to_device(&mut self, device: Device) -> Result<()> {
        self.params = self.params.to_device(device)?;
        Ok(())
    }

    /// P2..P6 of a batch `[N, 3, H, W]`.
    pub fn features(&self, ctx: &Ctx, batch: &Tensor) -> Result<Vec<Tensor>> {
        let c = self.body.forward(ctx, batch)?;
        self.fpn.forward(ctx, &c)
    }

    /// Detections for `images` (each f32 `[3, H, W]` in 0..1, on the model's
    /// device), in original image pixels.
    pub fn detect(&self, images: &[Tensor]) -> Result<Vec<Detections>> {
        Ok(self.detect_traced(images)?.detections)
    }

    /// [`FasterRcnn::detect`] keeping the intermediate results.
    pub fn detect_traced(&self, images: &[Tensor]) -> Result<InferenceTrace> {
        self.detect_staged(images, &mut |_| Ok(()))
    }

    /// [`FasterRcnn::detect_traced`] calling `on_stage` with the name of each stage
    /// ([`INFERENCE_STAGES`]) as it ends, so a profiler can time the real pass (it
    /// may synchronise the device inside the callback).
    pub fn detect_staged(&self, images: &[Tensor], on_stage: StageFn) -> Result<InferenceTrace> {
        let ctx = Ctx::new(&self.params, false);
        let il = transform(images, &self.config.transform)?;
        on_stage("transform")?;
        let c = self.body.forward(&ctx, &il.tensors)?;
        on_stage("backbone")?;
        let features = self.fpn.forward(&ctx, &c)?;
        drop(c);
        on_stage("fpn")?;
        let head = self.rpn.head(&ctx, &features)?;
        on_stage("rpn_head")?;
        let anchors = self.anchors_tensor(&il, &features)?;
        let proposals = self
            .rpn
            .proposals(&head, &anchors, &il.image_sizes, false)?;
        drop(head);
        on_stage("proposals")?;
        let pooled = self
            .roi_heads
            .pool(&features[..4], &proposals, &il.image_sizes)?;
        let x = self.roi_heads.box_head(&ctx, &pooled)?;
        let (logits, regs) = self.roi_heads.predictor(&ctx, &x)?;
        on_stage("roi_heads")?;
        let dets = self
            .roi_heads
            .postprocess(&logits, &regs, &proposals, &il.image_sizes)?;
        let detections = dets
            .into_iter()
            .zip(images)
            .zip(&il.image_sizes)
            .map(|((d, im), &size)| d.resized(size, (im.dims()[1], im.dims()[2])))
            .collect::<Result<_>>()?;
        on_stage("postprocess")?;
        Ok(InferenceTrace {
            images: il,
            features,
            proposals,
            detections,
        })
    }

    /// RPN proposals per image for a batch's features.
    pub fn proposals(
        &self,
        ctx: &Ctx,
        il: &ImageList,
        features: &[Tensor],
        training: bool,
    ) -> Result<Vec<Tensor>> {
        let head = self.rpn.head(ctx, features)?;
        let anchors = self.anchors_tensor(il, features)?;
        self.rpn
            .proposals(&head, &anchors, &il.image_sizes, training)
    }

    /// Anchors of one image of the batch, on the host (for inspection; the model
    /// itself uses them on the features' device).
    pub fn anchors(&self, il: &ImageList, features: &[Tensor]) -> Result<Vec<[f32; 4]>> {
        let v = self.anchors_tensor(il, features)?.to_vec::<f32>()?;
        Ok(v.chunks_exact(4)
            .map(|b| [b[0], b[1], b[2], b[3]])
            .collect())
    }

    /// Anchors `[A, 4]` of one image of the batch on the features' device.
    pub fn anchors_tensor(&self, il: &ImageList, features: &[Tensor]) -> Result<Tensor> {
        let d = il.tensors.dims();
        let grids: Vec<(usize, usize)> = features
            .iter()
            .map(|f| (f.dims()[2], f.dims()[3]))
            .collect();
        let device = features.first().map_or(Device::Cpu, |f| f.device());
        self.rpn.anchors((d[2], d[3]), &grids, device)
    }

    /// Box-head detections (resized-image pixels) for given proposals.
    pub fn detect_from(
        &self,
        ctx: &Ctx,
        il: &ImageList,
        features: &[Tensor],
        proposals: &[Tensor],
    ) -> Result<Vec<Detections>> {
        let pooled = self
            .roi_heads
            .pool(&features[..4], proposals, &il.image_sizes)?;
        let x = self.roi_heads.box_head(ctx, &pooled)?;
        let (logits, regs) = self.roi_heads.predictor(ctx, &x)?;
        self.roi_heads
            .postprocess(&logits, &regs, proposals, &il.image_sizes)
    }

    /// The four training losses for `images` and their `targets` (original image
    /// pixels): loss_objectness, loss_rpn_box_reg, loss_classifier, loss_box_reg.
    /// Run it under an active tape with the parameters watched to train.
    pub fn losses(
        &self,
        ctx: &Ctx,
        images: &[Tensor],
        targets: &[Target],
        rng: &mut Rng,
    ) -> Result<Vec<(String, Tensor)>> {
        self.losses_staged(ctx, images, targets, rng, &mut |_| Ok(()))
    }

    /// [`FasterRcnn::losses`] calling `on_stage` with the name of each stage as it
    /// ends (the first six of [`TRAINING_STAGES`]): `proposals` holds anchors,
    /// proposal filtering and the RPN losses; `roi_heads` holds sampling, pooling, the
    /// box head and its losses.
    pub fn losses_staged(
        &self,
        ctx: &Ctx,
        images: &[Tensor],
        targets: &[Target],
        rng: &mut Rng,
        on_stage: StageFn,
    ) -> Result<Vec<(String, Tensor)>> {
        if images.len() != targets.len() {
            return Err(Error::invalid(
                "FasterRcnn::losses",
                format!("{} images and {} targets", images.len(), targets.len()),
            ));
        }
        for (i, t) in targets.iter().enumerate() {
            t.validate()
                .map_err(|m| Error::invalid("FasterRcnn::losses", format!("target {i}: {m}")))?;
        }
        let il = transform(images, &self.config.transform)?;
        let targets: Vec<Target> = targets
            .iter()
            .zip(images)
            .zip(&il.image_sizes)
            .map(|((t, im), &size)| t.resized((im.dims()[1], im.dims()[2]), size))
            .collect();
        on_stage("transform")?;
        let c = self.body.forward(ctx, &il.tensors)?;
        on_stage("backbone")?;
        let features = self.fpn.forward(ctx, &c)?;
        drop(c);
        on_stage("fpn")?;
        let head = self.rpn.head(ctx, &features)?;
        on_stage("rpn_head")?;
        let anchors = self.anchors_tensor(&il, &features)?;
        let proposals = crate::autograd::no_grad(|| {
            self.rpn.proposals(&head, &anchors, &il.image_sizes, true)
        })?;
        let (loss_obj, loss_rpn_box) = self.rpn.losses(&head, &anchors, &targets, rng)?;
        on_stage("proposals")?;
        let samples = self
            .roi_heads
            .select_training_samples(&proposals, &targets, rng)?;
        let pooled = self
            .roi_heads
            .pool(&features[..4], &samples.proposals, &il.image_sizes)?;
        let x = self.roi_heads.box_head(ctx, &pooled)?;
        let (logits, regs) = self.roi_heads.predictor(ctx, &x)?;
        let (loss_cls, loss_box) = self.roi_heads.losses(&logits, &regs, &samples)?;
        on_stage("roi_heads")?;
        Ok(vec![
            ("loss_objectness".into(), loss_obj),
            ("loss_rpn_box_reg".into(), loss_rpn_box),
            ("loss_classifier".into(), loss_cls),
            ("loss_box_reg".into(), loss_box),
        ])
    }
}

impl Detections {
    /// The same detections with boxes scaled from an image of size `from` to `to`.
    pub fn resized(self, from: (usize, usize), to: (usize, usize)) -> Result<Detections> {
        Ok(Detections {
            boxes: resize_box_list(&self.boxes, from, to),
            ..self
        })
    }
}

impl Target {
    /// The same boxes scaled from an image of size `from` to `to`.
    pub fn resized(&self, from: (usize, usize), to: (usize, usize)) -> Target {
        Target {
            boxes: resize_box_list(&self.boxes, from, to),
            labels: self.labels.clone(),
        }
    }

    /// Error text unless boxes are finite with positive width and height and labels
    /// are positive and as many as boxes.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.boxes.len() != self.labels.len() {
            return Err(format!(
                "{} boxes and {} labels",
                self.boxes.len(),
                self.labels.len()
            ));
        }
        for (i, b) in self.boxes.iter().enumerate() {
            if b.iter().any(|v| !v.is_finite()) || b[2] <= b[0] || b[3] <= b[1] {
                return Err(format!("box {i} {b:?} is degenerate or not finite"));
            }
        }
        if let Some(l) = self.labels.iter().find(|&&l| l < 1) {
            return Err(format!("label {l}: labels start at 1 (0 is background)"));
        }
        Ok(())
    }
}
