//! Faster R-CNN with a ResNet-FPN backbone, torchvision's `FasterRCNN` semantics.

use std::path::Path;

use super::proposals::{PackedDetections, Selected};
use super::roi_heads::{RoiHeads, RoiHeadsConfig};
use super::rpn::{Rpn, RpnConfig, RpnHeadOutput};
use super::transform::{
    resize_box_list, transform, transform_uploaded, upload_u8, ImageList, ImageU8, TransformConfig,
    UploadedBatch,
};
use super::{Detections, Target};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::io::TensorFile;
use crate::nn::fpn::Fpn;
use crate::nn::resnet::{BlockKind, ResNet, ResNetConfig};
use crate::nn::{Bf16Weights, Ctx, NormKind, ParamSpec, ParamStore, Precision};
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

/// Everything that shapes the model: the `[model]` section of a config, each
/// component's own config nested (`[model.backbone]`, `[model.transform]`,
/// `[model.rpn]`, `[model.roi]`). [`FasterRcnnConfig::default`] is torchvision's
/// `fasterrcnn_resnet50_fpn` for COCO's 91 classes (frozen BatchNorm eps 1e-5, three
/// trainable backbone stages).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FasterRcnnConfig {
    /// The ResNet body.
    pub backbone: ResNetConfig,
    /// Channels of every FPN level.
    pub fpn_channels: usize,
    /// Resizing and normalisation of the input images.
    pub transform: TransformConfig,
    /// Anchors, proposals and the RPN losses.
    pub rpn: RpnConfig,
    /// Pooling, the box head, its losses and post-processing.
    pub roi: RoiHeadsConfig,
}

impl Default for FasterRcnnConfig {
    fn default() -> Self {
        FasterRcnnConfig {
            backbone: ResNetConfig::default(),
            fpn_channels: 256,
            transform: TransformConfig::default(),
            rpn: RpnConfig::default(),
            roi: RoiHeadsConfig::default(),
        }
    }
}

/// Metadata key of the model config (JSON) in a safetensors file: top-level in files
/// [`FasterRcnn::save`] writes, and inside the `meta` of a training checkpoint's
/// metadata (the app puts it there).
pub const MODEL_CONFIG_KEY: &str = "model_config";

impl FasterRcnnConfig {
    /// The model config a file's metadata carries, if any: under
    /// [`MODEL_CONFIG_KEY`], top-level or in the `meta` object of a JSON metadata
    /// value (a training checkpoint's).
    pub fn from_metadata(file: &TensorFile) -> Result<Option<FasterRcnnConfig>> {
        checkpoint_config(file)
    }
}

fn checkpoint_config(file: &TensorFile) -> Result<Option<FasterRcnnConfig>> {
    let md = file.metadata();
    let parse = |v: &str| -> Result<FasterRcnnConfig> {
        serde_json::from_str(v).map_err(|e| Error::Safetensors {
            path: file.path().to_path_buf(),
            msg: format!("bad `{MODEL_CONFIG_KEY}` metadata: {e}"),
        })
    };
    if let Some(v) = md.get(MODEL_CONFIG_KEY) {
        return parse(v).map(Some);
    }
    let mut keys: Vec<&String> = md.keys().collect();
    keys.sort();
    for k in keys {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&md[k]) else {
            continue;
        };
        if let Some(c) = v.get("meta").and_then(|m| m.get(MODEL_CONFIG_KEY)) {
            let c: FasterRcnnConfig =
                serde_json::from_value(c.clone()).map_err(|e| Error::Safetensors {
                    path: file.path().to_path_buf(),
                    msg: format!("bad `{k}.meta.{MODEL_CONFIG_KEY}` metadata: {e}"),
                })?;
            return Ok(Some(c));
        }
    }
    Ok(None)
}

/// The architecture a torchvision state_dict's tensor names and shapes show.
fn infer_config(file: &TensorFile) -> Result<FasterRcnnConfig> {
    let bad = |msg: String| Error::Safetensors {
        path: file.path().to_path_buf(),
        msg: format!("{msg} (and no `{MODEL_CONFIG_KEY}` metadata)"),
    };
    let dims = |name: &str| -> Result<Vec<usize>> {
        if !file.contains(name) {
            return Err(bad(format!("not a Faster R-CNN state_dict: no `{name}`")));
        }
        Ok(file.tensor(name)?.dims().to_vec())
    };
    let names = file.names();
    let mut layers = [0usize; 4];
    for (i, l) in layers.iter_mut().enumerate() {
        let prefix = format!("backbone.body.layer{}.", i + 1);
        *l = names
            .iter()
            .filter_map(|n| {
                n.strip_prefix(&prefix)?
                    .split('.')
                    .next()?
                    .parse::<usize>()
                    .ok()
            })
            .max()
            .map_or(0, |m| m + 1);
    }
    let bottleneck = file.contains("backbone.body.layer1.0.conv3.weight");
    let width_per_group = if bottleneck {
        dims("backbone.body.layer1.0.conv1.weight")?[0]
    } else {
        64
    };
    let mut c =
        FasterRcnnConfig::resnet50_fpn(dims("roi_heads.box_predictor.cls_score.weight")?[0], 0.0)?;
    c.backbone.layers = layers;
    c.backbone.block = if bottleneck {
        BlockKind::Bottleneck
    } else {
        BlockKind::Basic
    };
    c.backbone.width_per_group = width_per_group;
    c.fpn_channels = dims("backbone.fpn.inner_blocks.0.0.weight")?[0];
    c.roi.representation_size = dims("roi_heads.box_head.fc6.weight")?[0];
    Ok(c)
}

impl FasterRcnnConfig {
    /// torchvision's `fasterrcnn_resnet50_fpn` for `num_classes` classes (with
    /// background), frozen BatchNorm with `bn_eps` (torchvision's COCO weights use 0),
    /// every parameter trainable.
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

    /// The config as JSON (what checkpoints carry).
    pub fn to_json(&self) -> Result<String> {
        serde_json::to_string(self)
            .map_err(|e| Error::invalid("FasterRcnnConfig::to_json", e.to_string()))
    }

    /// Check what types cannot (ranges, consistency); the error names the key
    /// (`rpn.nms_thresh`).
    pub fn validate(&self) -> Result<()> {
        use crate::config::under;
        self.backbone.validate().map_err(under("backbone"))?;
        crate::config::positive("fpn_channels", self.fpn_channels)?;
        self.transform.validate().map_err(under("transform"))?;
        self.rpn.validate().map_err(under("rpn"))?;
        self.roi.validate().map_err(under("roi"))?;
        if self.rpn.anchor_sizes.len() != 5 {
            return Err(crate::config::invalid(
                "rpn.anchor_sizes",
                format!(
                    "{} sizes for the 5 FPN levels P2..P6",
                    self.rpn.anchor_sizes.len()
                ),
            ));
        }
        Ok(())
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
                trainable_layers: 5,
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
    /// What shapes the model.
    pub config: FasterRcnnConfig,
    /// The ResNet body (C2..C5).
    pub body: ResNet,
    /// The feature pyramid (P2..P6).
    pub fpn: Fpn,
    /// The region proposal network.
    pub rpn: Rpn,
    /// The box branch.
    pub roi_heads: RoiHeads,
    /// Every parameter and buffer, by torchvision name (f32 masters in every
    /// precision: what the optimizer updates and checkpoints hold).
    pub params: ParamStore,
    /// Which dtype the conv and linear layers compute in ([`FasterRcnn::ctx`]).
    pub precision: Precision,
    /// bf16 copies of the weights for [`Precision::Bf16`], one per weight version.
    pub bf16_weights: Bf16Weights,
}

/// What [`FasterRcnn::detect_packed`] leaves on the device.
pub struct PackedPass {
    /// P2..P6.
    pub features: Vec<Tensor>,
    /// The proposals, padded (`[N, post_nms_top_n_test, 4]`, counts on the device).
    pub proposals: Selected,
    /// Detections (resized-image pixels) and proposal counts, in one buffer.
    pub packed: PackedDetections,
}

/// Intermediate results of an inference pass, for inspection and stage tests.
pub struct InferenceTrace {
    /// The resized, padded batch.
    pub images: ImageList,
    /// P2..P6.
    pub features: Vec<Tensor>,
    /// Proposals per image `[K, 4]`.
    pub proposals: Vec<Tensor>,
    /// Final detections, original image pixels.
    pub detections: Vec<Detections>,
}

impl FasterRcnn {
    fn build(config: FasterRcnnConfig) -> Result<(ResNet, Fpn, Rpn, RoiHeads)> {
        config.validate()?;
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

    /// Build the layers of `config`, give their parameter specs to `params`, and
    /// freeze the stages `backbone.trainable_layers` excludes.
    fn assemble(
        config: FasterRcnnConfig,
        params: impl FnOnce(&[ParamSpec]) -> Result<ParamStore>,
    ) -> Result<FasterRcnn> {
        let (body, fpn, rpn, roi_heads) = Self::build(config.clone())?;
        let params = params(&Self::specs_of(&body, &fpn, &rpn, &roi_heads))?;
        let mut m = FasterRcnn {
            config,
            body,
            fpn,
            rpn,
            roi_heads,
            params,
            precision: Precision::F32,
            bf16_weights: Bf16Weights::default(),
        };
        m.freeze_backbone();
        Ok(m)
    }

    fn specs_of(body: &ResNet, fpn: &Fpn, rpn: &Rpn, roi: &RoiHeads) -> Vec<ParamSpec> {
        let mut s = Vec::new();
        body.specs(&mut s);
        fpn.specs(&mut s);
        rpn.specs(&mut s);
        roi.specs(&mut s);
        s
    }

    /// A freshly initialised model (PyTorch's initialisers, seeded), with the backbone
    /// stages that `backbone.trainable_layers` excludes frozen.
    pub fn new(config: FasterRcnnConfig, seed: u64) -> Result<FasterRcnn> {
        Self::assemble(config, |specs| ParamStore::init(specs, seed))
    }

    /// Freeze the stem and the first `5 - trainable_layers` ResNet stages
    /// (torchvision's `trainable_backbone_layers`).
    fn freeze_backbone(&mut self) {
        let t = self.config.backbone.trainable_layers;
        if t < 5 {
            let prefixes = self.body.stage_prefixes(5 - t);
            self.params.freeze(&prefixes);
        }
    }

    /// A model with weights from a safetensors file under torchvision's key names. A
    /// missing, unexpected or mis-shaped tensor is an error naming it.
    pub fn load(config: FasterRcnnConfig, path: impl AsRef<Path>) -> Result<FasterRcnn> {
        let file = TensorFile::open(path)?;
        Self::assemble(config, |specs| ParamStore::load(&file, specs))
    }

    /// A model from a checkpoint: a Kestrel checkpoint (the model config travels in
    /// its metadata under [`MODEL_CONFIG_KEY`]; optimizer state, gradients and other
    /// extra tensors are ignored) or a torchvision Faster R-CNN state_dict saved as
    /// safetensors (no config: ResNet-FPN with the layers, block, widths and classes
    /// its tensors show, frozen BatchNorm with eps 0 as torchvision's COCO weights,
    /// the other settings torchvision's).
    ///
    /// ```no_run
    /// let model = kestrel::FasterRcnn::from_checkpoint("work_dir/iter_1800.safetensors")?;
    /// # Ok::<(), kestrel::Error>(())
    /// ```
    pub fn from_checkpoint(path: impl AsRef<Path>) -> Result<FasterRcnn> {
        let file = TensorFile::open(path)?;
        let config = match FasterRcnnConfig::from_metadata(&file)? {
            Some(c) => c,
            None => infer_config(&file)?,
        };
        Self::assemble(config, |specs| ParamStore::load_lenient(&file, specs))
    }

    /// Save the parameters and buffers under their names, with the model config as
    /// metadata ([`MODEL_CONFIG_KEY`]), so [`FasterRcnn::from_checkpoint`] rebuilds it.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let tensors: Vec<(&str, &Tensor)> =
            self.params.iter().map(|(n, t)| (n.as_str(), t)).collect();
        let mut meta = std::collections::HashMap::new();
        meta.insert(MODEL_CONFIG_KEY.to_string(), self.config.to_json()?);
        crate::io::save_safetensors(path, &tensors, Some(meta))
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

    /// The forward context of this model: its parameters, `training` mode, and its
    /// precision with its bf16 weight copies.
    pub fn ctx(&self, training: bool) -> Ctx<'_> {
        Ctx::new(&self.params, training).with_precision(self.precision, &self.bf16_weights)
    }

    /// Compute in `precision` from now on (the parameters stay f32).
    pub fn set_precision(&mut self, precision: Precision) {
        self.precision = precision;
    }

    /// P2..P6 of a batch `[N, 3, H, W]`.
    pub fn features(&self, ctx: &Ctx, batch: &Tensor) -> Result<Vec<Tensor>> {
        let c = self.body.forward(ctx, batch)?;
        self.fpn.forward_owned(ctx, c)
    }

    /// Detections for `images` (each f32 `[3, H, W]` in 0..1, on the model's
    /// device), in original image pixels. On a GPU nothing is read back until the
    /// end: the detections come back in one copy ([`FasterRcnn::detect_packed`]).
    pub fn detect(&self, images: &[Tensor]) -> Result<Vec<Detections>> {
        let il = transform(images, &self.config.transform)?;
        let orig: Vec<(usize, usize)> = images
            .iter()
            .map(|im| (im.dims()[1], im.dims()[2]))
            .collect();
        Ok(self.infer(il, &orig, false, &mut |_| Ok(()))?.detections)
    }

    /// Detections in the PNG or JPEG image at `path` (original image pixels), run on
    /// the model's device without recording gradients ([`FasterRcnn::detect_u8`]).
    pub fn detect_image(&self, path: impl AsRef<Path>) -> Result<Detections> {
        let rgb = crate::data::image_io::load_rgb(path.as_ref())?;
        let image = ImageU8 {
            data: &rgb.data,
            height: rgb.height,
            width: rgb.width,
        };
        let mut d = self.detect_u8(&[image])?;
        Ok(d.pop().unwrap_or_default())
    }

    /// Detections for 8-bit RGB images (CHW), in original image pixels, without
    /// recording gradients. On a GPU the batch goes up in ONE host-to-device copy
    /// ([`upload_u8`]), is resized and normalised there, and the detections come
    /// back in ONE device-to-host copy ([`PackedDetections`]); nothing else crosses
    /// (warm: after the first batch of a geometry, whose size table is uploaded
    /// once). The same detections as [`FasterRcnn::detect`] on the images in 0..1.
    pub fn detect_u8(&self, images: &[ImageU8]) -> Result<Vec<Detections>> {
        crate::autograd::no_grad(|| {
            let up = upload_u8(images, &self.config.transform, model_device(self))?;
            let il = transform_uploaded(&up)?;
            Ok(self
                .infer(il, up.original_sizes(), false, &mut |_| Ok(()))?
                .detections)
        })
    }

    /// [`FasterRcnn::detect`] keeping the intermediate results.
    pub fn detect_traced(&self, images: &[Tensor]) -> Result<InferenceTrace> {
        self.detect_staged(images, &mut |_| Ok(()))
    }

    /// [`FasterRcnn::detect_traced`] calling `on_stage` with the name of each stage
    /// ([`INFERENCE_STAGES`]) as it ends, so a profiler can time the real pass (it
    /// may synchronise the device inside the callback).
    pub fn detect_staged(&self, images: &[Tensor], on_stage: StageFn) -> Result<InferenceTrace> {
        self.transform_and_infer(images, true, on_stage)
    }

    /// [`FasterRcnn::detect`] calling `on_stage` as each stage ([`INFERENCE_STAGES`])
    /// ends: the same pass, so a profiler times what `detect` runs (on a GPU the
    /// detections come back in one copy and nothing is cut from the padded
    /// proposals afterwards, unlike [`FasterRcnn::detect_staged`]'s trace).
    pub fn detect_timed(&self, images: &[Tensor], on_stage: StageFn) -> Result<Vec<Detections>> {
        Ok(self
            .transform_and_infer(images, false, on_stage)?
            .detections)
    }

    /// The transform of `images` (a stage), then [`FasterRcnn::infer`].
    fn transform_and_infer(
        &self,
        images: &[Tensor],
        keep_proposals: bool,
        on_stage: StageFn,
    ) -> Result<InferenceTrace> {
        let il = transform(images, &self.config.transform)?;
        on_stage("transform")?;
        let orig: Vec<(usize, usize)> = images
            .iter()
            .map(|im| (im.dims()[1], im.dims()[2]))
            .collect();
        self.infer(il, &orig, keep_proposals, on_stage)
    }

    /// Inference from the transformed batch `il` (of images `orig` pixels before
    /// resizing). On a GPU the tail is [`FasterRcnn::detect_packed`]'s, read back in
    /// one copy; `keep_proposals` then cuts the per-image proposals for the trace
    /// from the padded ones on the device (the counts come with that copy). The CPU
    /// runs the per-image tail: the counts are on the host there anyway, and the box
    /// head runs on the real rows only.
    fn infer(
        &self,
        il: ImageList,
        orig: &[(usize, usize)],
        keep_proposals: bool,
        on_stage: StageFn,
    ) -> Result<InferenceTrace> {
        let ctx = self.ctx(false);
        let (features, proposals, dets) = if il.tensors.device() == Device::Cpu {
            let features = self.dense(&ctx, &il, on_stage)?;
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
            (features, proposals, dets)
        } else {
            let p = self.packed_staged(&ctx, &il, on_stage)?;
            let read = p.packed.read()?;
            let proposals = if keep_proposals {
                read.proposal_counts
                    .iter()
                    .enumerate()
                    .map(|(n, &k)| p.proposals.image_boxes(n, k))
                    .collect::<Result<_>>()?
            } else {
                Vec::new()
            };
            (p.features, proposals, read.detections)
        };
        let detections = dets
            .into_iter()
            .zip(orig)
            .zip(&il.image_sizes)
            .map(|((d, &o), &size)| d.resized(size, o))
            .collect::<Result<_>>()?;
        on_stage("postprocess")?;
        Ok(InferenceTrace {
            images: il,
            features,
            proposals,
            detections,
        })
    }

    /// Backbone and FPN: P2..P6 of the batch.
    fn dense(&self, ctx: &Ctx, il: &ImageList, on_stage: StageFn) -> Result<Vec<Tensor>> {
        let c = self.body.forward(ctx, &il.tensors)?;
        on_stage("backbone")?;
        // The FPN takes the maps, freeing each as soon as it is read.
        let features = self.fpn.forward_owned(ctx, c)?;
        on_stage("fpn")?;
        Ok(features)
    }

    /// Inference of a transformed batch with nothing read back and no size that
    /// depends on the data: the proposals stay padded (`[N, post_nms_top_n_test, 4]`
    /// with the counts on the device), the box head runs on every padded row, the
    /// padding rows are left out of the detection selection, and the result is one
    /// [`PackedDetections`] buffer (boxes in resized-image pixels) for the caller to
    /// read in one copy. Between its input and that buffer it can be captured as a
    /// device graph ([`super::graphed::GraphedDetector`]). Runs on the CPU too (the
    /// twin of every kernel), where [`FasterRcnn::detect`] takes a cheaper path.
    pub fn detect_packed(&self, il: &ImageList) -> Result<PackedPass> {
        self.packed_staged(&self.ctx(false), il, &mut |_| Ok(()))
    }

    fn packed_staged(&self, ctx: &Ctx, il: &ImageList, on_stage: StageFn) -> Result<PackedPass> {
        let features = self.dense(ctx, il, on_stage)?;
        let head = self.rpn.head(ctx, &features)?;
        on_stage("rpn_head")?;
        let anchors = self.anchors_tensor(il, &features)?;
        let proposals = self
            .rpn
            .proposals_padded(&head, &anchors, &il.image_sizes, false)?;
        drop(head);
        on_stage("proposals")?;
        let (n, p) = (il.image_sizes.len(), proposals.boxes.dims()[1]);
        let per_image = (0..n)
            .map(|i| proposals.image_boxes(i, p))
            .collect::<Result<Vec<_>>>()?;
        let pooled = self
            .roi_heads
            .pool(&features[..4], &per_image, &il.image_sizes)?;
        drop(per_image);
        let x = self.roi_heads.box_head(ctx, &pooled)?;
        let (logits, regs) = self.roi_heads.predictor(ctx, &x)?;
        on_stage("roi_heads")?;
        let packed = self
            .roi_heads
            .detect_padded(&logits, &regs, &proposals, &il.image_sizes)?;
        Ok(PackedPass {
            features,
            proposals,
            packed,
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
        self.losses_given(ctx, Images::F32(images), targets, None, rng, on_stage)
    }

    /// [`FasterRcnn::losses`] for a batch uploaded as u8
    /// ([`super::transform::upload_u8`], one pinned copy on a GPU): normalised and
    /// resized where it lies by [`super::transform::transform_uploaded`], which
    /// gives the f32 path's bits. `targets` are in original image pixels.
    pub fn losses_uploaded(
        &self,
        ctx: &Ctx,
        batch: &UploadedBatch,
        targets: &[Target],
        rng: &mut Rng,
    ) -> Result<Vec<(String, Tensor)>> {
        self.losses_given(ctx, Images::U8(batch), targets, None, rng, &mut |_| Ok(()))
    }

    /// [`FasterRcnn::losses`] with the RoI heads fed `proposals` (one `[K_n, 4]` per
    /// image, resized-image pixels, on the model's device) instead of the RPN's own.
    /// The RPN's selection leaves the order of equal objectness logits to the
    /// implementation (see `detection::proposals`), so this is how a test reproduces
    /// another implementation's training step exactly; the proposals carry no
    /// gradient either way.
    pub fn losses_with_proposals(
        &self,
        ctx: &Ctx,
        images: &[Tensor],
        targets: &[Target],
        proposals: &[Tensor],
        rng: &mut Rng,
    ) -> Result<Vec<(String, Tensor)>> {
        if proposals.len() != images.len() {
            return Err(Error::invalid(
                "FasterRcnn::losses_with_proposals",
                format!(
                    "{} images and {} proposal sets",
                    images.len(),
                    proposals.len()
                ),
            ));
        }
        self.losses_given(
            ctx,
            Images::F32(images),
            targets,
            Some(proposals),
            rng,
            &mut |_| Ok(()),
        )
    }

    fn losses_given(
        &self,
        ctx: &Ctx,
        images: Images,
        targets: &[Target],
        given: Option<&[Tensor]>,
        rng: &mut Rng,
        on_stage: StageFn,
    ) -> Result<Vec<(String, Tensor)>> {
        let originals: Vec<(usize, usize)> = match images {
            Images::F32(ims) => ims
                .iter()
                .map(|im| match im.dims() {
                    [_, h, w] => (*h, *w),
                    // `transform` refuses it below, naming the shape.
                    _ => (0, 0),
                })
                .collect(),
            Images::U8(b) => b.original_sizes().to_vec(),
        };
        if originals.len() != targets.len() {
            return Err(Error::invalid(
                "FasterRcnn::losses",
                format!("{} images and {} targets", originals.len(), targets.len()),
            ));
        }
        for (i, t) in targets.iter().enumerate() {
            t.validate()
                .map_err(|m| Error::invalid("FasterRcnn::losses", format!("target {i}: {m}")))?;
        }
        let il = match images {
            Images::F32(ims) => transform(ims, &self.config.transform)?,
            Images::U8(b) => transform_uploaded(b)?,
        };
        on_stage("transform")?;
        let (features, head) = self.dense_forward(ctx, &il, on_stage)?;
        self.head_losses_given(
            ctx, &il, &originals, &features, &head, targets, given, rng, on_stage,
        )
    }

    /// The dense part of a training step on the transformed batch `il`: the
    /// backbone, the FPN and the RPN head, P2..P6 and the head's objectness and
    /// deltas per level. No shape in it depends on the data, so at a fixed padded
    /// size it can be captured as a device graph (see [`super::graphed_train`]).
    /// Calls `on_stage` after `backbone`, `fpn` and `rpn_head`.
    pub fn dense_forward(
        &self,
        ctx: &Ctx,
        il: &ImageList,
        on_stage: StageFn,
    ) -> Result<(Vec<Tensor>, RpnHeadOutput)> {
        let c = self.body.forward(ctx, &il.tensors)?;
        on_stage("backbone")?;
        let features = self.fpn.forward(ctx, &c)?;
        drop(c);
        on_stage("fpn")?;
        let head = self.rpn.head(ctx, &features)?;
        on_stage("rpn_head")?;
        Ok((features, head))
    }

    /// The rest of a training step after [`FasterRcnn::dense_forward`]: anchors,
    /// proposals, the RPN losses, RoI sampling, pooling, the box head and its
    /// losses, the four losses of [`FasterRcnn::losses`]. `dense` is what
    /// [`FasterRcnn::dense_forward`] returned (P2..P6 and the RPN head's outputs),
    /// `originals` the images' sizes before the transform, `targets` in those pixels.
    pub fn head_losses(
        &self,
        ctx: &Ctx,
        il: &ImageList,
        originals: &[(usize, usize)],
        (features, head): (&[Tensor], &RpnHeadOutput),
        targets: &[Target],
        rng: &mut Rng,
    ) -> Result<Vec<(String, Tensor)>> {
        if originals.len() != targets.len() || il.image_sizes.len() != targets.len() {
            return Err(Error::invalid(
                "FasterRcnn::head_losses",
                format!(
                    "{} images ({} sizes) and {} targets",
                    il.image_sizes.len(),
                    originals.len(),
                    targets.len()
                ),
            ));
        }
        if features.len() < 4 {
            return Err(Error::invalid(
                "FasterRcnn::head_losses",
                format!("{} feature levels (P2..P5 at least)", features.len()),
            ));
        }
        for (i, t) in targets.iter().enumerate() {
            t.validate().map_err(|m| {
                Error::invalid("FasterRcnn::head_losses", format!("target {i}: {m}"))
            })?;
        }
        self.head_losses_given(
            ctx,
            il,
            originals,
            features,
            head,
            targets,
            None,
            rng,
            &mut |_| Ok(()),
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn head_losses_given(
        &self,
        ctx: &Ctx,
        il: &ImageList,
        originals: &[(usize, usize)],
        features: &[Tensor],
        head: &RpnHeadOutput,
        targets: &[Target],
        given: Option<&[Tensor]>,
        rng: &mut Rng,
        on_stage: StageFn,
    ) -> Result<Vec<(String, Tensor)>> {
        let targets: Vec<Target> = targets
            .iter()
            .zip(originals)
            .zip(&il.image_sizes)
            .map(|((t, &from), &size)| t.resized(from, size))
            .collect();
        let anchors = self.anchors_tensor(il, features)?;
        // Proposals stay padded ([N, post_nms_top_n, 4] with counts on the device):
        // nothing of the sampling reads back.
        let (prop_boxes, prop_counts) = match given {
            Some(p) => super::roi_heads::pad_proposals(p)?,
            None => {
                let sel = crate::autograd::no_grad(|| {
                    self.rpn
                        .proposals_padded(head, &anchors, &il.image_sizes, true)
                })?;
                (sel.boxes, sel.counts)
            }
        };
        // One upload of the batch's targets; one seed per step for both samplers
        // (Philox keys: the picks depend on the seed, the image and the index only).
        let tg = super::targets::PackedTargets::new(&targets, anchors.device())?;
        let seed = rng.next_u64();
        let (loss_obj, loss_rpn_box) = self.rpn.losses(head, &anchors, &tg, seed)?;
        on_stage("proposals")?;
        let samples = self
            .roi_heads
            .sample_rois(&prop_boxes, &prop_counts, &tg, seed)?;
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

/// The images of a training batch: f32 tensors, or u8 already uploaded.
#[derive(Clone, Copy)]
enum Images<'a> {
    F32(&'a [Tensor]),
    U8(&'a UploadedBatch),
}

/// The device of the model's parameters (the CPU for a model without any).
fn model_device(m: &FasterRcnn) -> Device {
    m.params
        .iter()
        .next()
        .map_or(Device::Cpu, |(_, t)| t.device())
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
