//! torchvision's RoIHeads for boxes: MultiScaleRoIAlign, TwoMLPHead,
//! FastRCNNPredictor, training-sample selection, the Fast R-CNN losses and the
//! postprocessing of detections.

use super::box_coder::BoxCoder;
use super::matcher::Matcher;
use super::poolers::MultiScaleRoIAlign;
use super::proposals::{
    select_detections, select_detections_padded, DetectionParams, PackedDetections, Selected,
};
use super::targets::{
    match_labels, roi_gather, roi_loss_inputs, sample, Candidates, LabelMode, PackedTargets,
    RoiLossInputs, SampleSpec, STAGE_ROI,
};
use super::{Detections, Target};
use crate::error::{Error, Result};
use crate::nn::{Ctx, Linear, ParamSpec};
use crate::ops::{self, Reduction};
use crate::rng::Rng;
use crate::tensor::Tensor;

/// Settings of the box branch (torchvision's defaults in [`RoiHeadsConfig::new`]):
/// the `[model.roi]` section of a config.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RoiHeadsConfig {
    /// Classes including background (index 0).
    pub num_classes: usize,
    /// MultiScaleRoIAlign output side, bins (7).
    pub pool_output_size: usize,
    /// RoIAlign samples per bin and axis; 0 is adaptive, `ceil(roi side / bins)`
    /// (torchvision 2; mmdetection 0).
    pub sampling_ratio: usize,
    /// RoIAlign with the half-pixel offset (mmdetection's `aligned=True`).
    pub aligned: bool,
    /// Width of the two MLP layers.
    pub representation_size: usize,
    /// Proposals with IoU >= this are foreground, < `bg_iou_thresh` background.
    pub fg_iou_thresh: f32,
    /// See `fg_iou_thresh`.
    pub bg_iou_thresh: f32,
    /// RoIs sampled per image for the losses.
    pub batch_size_per_image: usize,
    /// Fraction of positives among the sampled RoIs, at most.
    pub positive_fraction: f64,
    /// Box coder weights (wx, wy, ww, wh).
    pub bbox_reg_weights: [f32; 4],
    /// Detections scoring at most this are dropped.
    pub score_thresh: f32,
    /// Per-class NMS IoU threshold.
    pub nms_thresh: f64,
    /// Detections kept per image.
    pub detections_per_img: usize,
    /// Detections narrower or shorter than this (pixels) are dropped.
    pub min_size: f32,
    /// Smooth-L1 beta of the box loss (torchvision 1/9; 0 is mmdetection's L1).
    pub box_loss_beta: f64,
}

impl Default for RoiHeadsConfig {
    /// torchvision's COCO head: 91 classes, 1024-wide MLP.
    fn default() -> Self {
        RoiHeadsConfig::new(91, 1024)
    }
}

impl RoiHeadsConfig {
    /// torchvision's settings for `num_classes` classes (with background).
    pub fn new(num_classes: usize, representation_size: usize) -> Self {
        RoiHeadsConfig {
            num_classes,
            pool_output_size: 7,
            sampling_ratio: 2,
            aligned: false,
            representation_size,
            fg_iou_thresh: 0.5,
            bg_iou_thresh: 0.5,
            batch_size_per_image: 512,
            positive_fraction: 0.25,
            bbox_reg_weights: [10.0, 10.0, 5.0, 5.0],
            score_thresh: 0.05,
            nms_thresh: 0.5,
            detections_per_img: 100,
            min_size: 1e-2,
            box_loss_beta: 1.0 / 9.0,
        }
    }

    /// Check what types cannot; the error names the key (`nms_thresh`).
    pub fn validate(&self) -> Result<()> {
        use crate::config::{fraction, invalid, positive};
        positive("num_classes", self.num_classes.saturating_sub(1))?;
        positive("pool_output_size", self.pool_output_size)?;
        positive("representation_size", self.representation_size)?;
        positive("batch_size_per_image", self.batch_size_per_image)?;
        positive("detections_per_img", self.detections_per_img)?;
        if self.sampling_ratio > crate::ops::roi_align::MAX_GRID {
            return Err(invalid(
                "sampling_ratio",
                format!(
                    "{} exceeds {}",
                    self.sampling_ratio,
                    crate::ops::roi_align::MAX_GRID
                ),
            ));
        }
        for (k, v) in [
            ("fg_iou_thresh", self.fg_iou_thresh as f64),
            ("bg_iou_thresh", self.bg_iou_thresh as f64),
            ("positive_fraction", self.positive_fraction),
            ("nms_thresh", self.nms_thresh),
            ("score_thresh", self.score_thresh as f64),
        ] {
            fraction(k, v)?;
        }
        if self.bg_iou_thresh > self.fg_iou_thresh {
            return Err(invalid("bg_iou_thresh", "above fg_iou_thresh".into()));
        }
        if !(self.box_loss_beta >= 0.0 && self.box_loss_beta.is_finite()) {
            return Err(invalid(
                "box_loss_beta",
                format!("{} (>= 0)", self.box_loss_beta),
            ));
        }
        Ok(())
    }
}

/// The box branch.
pub struct RoiHeads {
    /// Its settings.
    pub config: RoiHeadsConfig,
    /// MultiScaleRoIAlign over P2..P5.
    pub pooler: MultiScaleRoIAlign,
    fc6: Linear,
    fc7: Linear,
    cls_score: Linear,
    bbox_pred: Linear,
    coder: BoxCoder,
}

/// Sampled RoIs of a batch with their classification and regression targets, `cap`
/// rows per image of which the first `counts[n]` are real (sizes never depend on
/// the data, so nothing is read back).
pub struct TrainingSamples {
    /// Per image `[cap, 4]` RoIs (proposals with GT appended, sampled in index order;
    /// unit boxes past the count).
    pub proposals: Vec<Tensor>,
    /// `[N cap]` i64 class label per RoI (0 = background, and on padding rows).
    pub labels: Tensor,
    /// `[N cap, 4]` encoded GT box per RoI (weights 10, 10, 5, 5).
    pub regression_targets: Tensor,
    /// `[N]` i64 real rows per image.
    pub counts: Tensor,
    /// Rows per image.
    pub cap: usize,
    /// Loss weights and targets, with the normalisers folded in.
    pub loss: RoiLossInputs,
}

/// [`TrainingSamples`] cut to the real rows on the host (tests and inspection: reads
/// the counts back).
pub struct TrimmedSamples {
    /// Per image `[K_n, 4]` RoIs.
    pub proposals: Vec<Tensor>,
    /// Per image class labels.
    pub labels: Vec<Vec<i64>>,
    /// Per image `[K_n, 4]` regression targets.
    pub regression_targets: Vec<Tensor>,
}

impl TrainingSamples {
    /// The real rows of each image (one read of the counts and labels).
    pub fn trimmed(&self) -> Result<TrimmedSamples> {
        let counts = self.counts.to_vec_i64()?;
        let labels = self.labels.to_vec_i64()?;
        let mut out = TrimmedSamples {
            proposals: Vec::new(),
            labels: Vec::new(),
            regression_targets: Vec::new(),
        };
        for (n, &k) in counts.iter().enumerate() {
            let (o, k) = (n * self.cap, k as usize);
            out.proposals
                .push(ops::narrow(&self.proposals[n], 0, 0, k)?);
            out.labels.push(labels[o..o + k].to_vec());
            out.regression_targets
                .push(ops::narrow(&self.regression_targets, 0, o, k)?);
        }
        Ok(out)
    }
}

impl RoiHeads {
    /// A box head over `channels`-channel P2..P5.
    pub fn new(channels: usize, config: RoiHeadsConfig) -> RoiHeads {
        let side = config.pool_output_size;
        let mut pooler = MultiScaleRoIAlign::new((side, side), config.sampling_ratio);
        pooler.aligned = config.aligned;
        let (rep, c) = (config.representation_size, config.num_classes);
        RoiHeads {
            fc6: Linear::new("roi_heads.box_head.fc6", channels * side * side, rep),
            fc7: Linear::new("roi_heads.box_head.fc7", rep, rep),
            cls_score: Linear::new("roi_heads.box_predictor.cls_score", rep, c),
            bbox_pred: Linear::new("roi_heads.box_predictor.bbox_pred", rep, 4 * c),
            coder: BoxCoder::new(config.bbox_reg_weights.map(f64::from)),
            pooler,
            config,
        }
    }

    /// The tensors of the head.
    pub fn specs(&self, out: &mut Vec<ParamSpec>) {
        for l in [&self.fc6, &self.fc7, &self.cls_score, &self.bbox_pred] {
            l.specs(out);
        }
    }

    /// Pooled features `[R, C, S, S]` (S = `pool_output_size`) of the proposals over
    /// P2..P5.
    pub fn pool(
        &self,
        feats: &[Tensor],
        proposals: &[Tensor],
        image_sizes: &[(usize, usize)],
    ) -> Result<Tensor> {
        // RoIAlign interpolates and accumulates in f32: bf16 feature maps are widened
        // at this boundary (exactly; the conversion is recorded).
        let f32s = feats
            .iter()
            .map(|f| crate::ops::mixed::cast(f, crate::tensor::DType::F32))
            .collect::<Result<Vec<_>>>()?;
        self.pooler.forward(&f32s, proposals, image_sizes)
    }

    /// TwoMLPHead: `[R, C, S, S]` to `[R, representation_size]`.
    pub fn box_head(&self, ctx: &Ctx, pooled: &Tensor) -> Result<Tensor> {
        // Features per RoI from the shape, not numel / R: with no RoI (nothing
        // proposed) numel is 0 and the row length must still be C * S * S.
        let (r, per_roi) = (
            pooled.dims()[0],
            pooled.dims()[1..].iter().product::<usize>(),
        );
        let x = ops::reshape(pooled, [r, per_roi])?;
        if crate::nn::fold::fusable_plain() {
            // Inference: bias and ReLU in the products' epilogues.
            let x = crate::nn::fold::linear_fused(ctx, &self.fc6, &x, true)?;
            return crate::nn::fold::linear_fused(ctx, &self.fc7, &x, true);
        }
        let x = ops::relu(&self.fc6.forward(ctx, &x)?)?;
        ops::relu(&self.fc7.forward(ctx, &x)?)
    }

    /// FastRCNNPredictor: class logits `[R, classes]` and box deltas `[R, 4 classes]`.
    pub fn predictor(&self, ctx: &Ctx, x: &Tensor) -> Result<(Tensor, Tensor)> {
        Ok((
            // Logits and deltas feed softmax, box coding and the losses: f32.
            self.cls_score.forward_head(ctx, x)?,
            self.bbox_pred.forward_head(ctx, x)?,
        ))
    }

    /// The post-processing settings of this head ([`select_detections`]).
    pub fn detection_params(&self) -> DetectionParams {
        let cfg = &self.config;
        DetectionParams {
            score_thresh: cfg.score_thresh,
            min_size: cfg.min_size,
            nms_thresh: cfg.nms_thresh,
            detections_per_img: cfg.detections_per_img,
        }
    }

    /// [`select_detections`] with this head's box coder and the given settings: the
    /// selected boxes with their candidate indices, on the inputs' device. With
    /// `nms_thresh = 1` and `detections_per_img` = rows x (classes - 1) it returns
    /// every candidate that passes the filters (what NMS chose from).
    pub fn select(
        &self,
        class_logits: &Tensor,
        box_regression: &Tensor,
        proposals: &[Tensor],
        image_sizes: &[(usize, usize)],
        params: &DetectionParams,
    ) -> Result<Selected> {
        let rows: Vec<usize> = proposals.iter().map(|p| p.dims()[0]).collect();
        let all = ops::concat(&proposals.iter().collect::<Vec<_>>(), 0)?;
        select_detections(
            class_logits,
            box_regression,
            &all,
            &rows,
            image_sizes,
            &self.coder,
            params,
        )
    }

    /// Detections per image in resized-image pixels (torchvision's
    /// `postprocess_detections`): softmax, per-class boxes, clip, score > thresh, drop
    /// tiny boxes, per-class NMS, best `detections_per_img`. Runs on the inputs'
    /// device ([`select_detections`]); the result is read back once at the end.
    pub fn postprocess(
        &self,
        class_logits: &Tensor,
        box_regression: &Tensor,
        proposals: &[Tensor],
        image_sizes: &[(usize, usize)],
    ) -> Result<Vec<Detections>> {
        let cfg = &self.config;
        let sel = self.select(
            class_logits,
            box_regression,
            proposals,
            image_sizes,
            &self.detection_params(),
        )?;
        let counts = sel.host_counts()?;
        let (boxes, scores) = (sel.boxes.to_vec::<f32>()?, sel.scores.to_vec::<f32>()?);
        let indices = sel.indices.to_vec_i64()?;
        let (top, per_row) = (cfg.detections_per_img, cfg.num_classes as i64 - 1);
        Ok(counts
            .iter()
            .enumerate()
            .map(|(n, &k)| {
                let rows = n * top..n * top + k;
                Detections {
                    boxes: rows
                        .clone()
                        .map(|o| {
                            [
                                boxes[4 * o],
                                boxes[4 * o + 1],
                                boxes[4 * o + 2],
                                boxes[4 * o + 3],
                            ]
                        })
                        .collect(),
                    scores: scores[rows.clone()].to_vec(),
                    labels: indices[rows].iter().map(|&i| i % per_row + 1).collect(),
                }
            })
            .collect())
    }

    /// [`RoiHeads::postprocess`] without a read-back, for proposals padded as
    /// [`super::rpn::Rpn::proposals_padded`] gives them (`proposals.boxes` `[N, P, 4]`,
    /// `proposals.counts` on the device): the logits and deltas are those of all `N P`
    /// rows, padding included, and the padding rows are left out of the selection
    /// ([`select_detections_padded`]). The selection and the proposal counts are
    /// packed into one buffer ([`PackedDetections`]) for the caller to read in one
    /// copy.
    pub fn detect_padded(
        &self,
        class_logits: &Tensor,
        box_regression: &Tensor,
        proposals: &Selected,
        image_sizes: &[(usize, usize)],
    ) -> Result<PackedDetections> {
        let sel = select_detections_padded(
            class_logits,
            box_regression,
            &proposals.boxes,
            &proposals.counts,
            image_sizes,
            &self.coder,
            &self.detection_params(),
        )?;
        PackedDetections::new(&sel, &proposals.counts, self.config.num_classes)
    }

    /// torchvision's `select_training_samples` for proposals given per image (`[K_n,
    /// 4]` each): packs them and the targets, draws the step's sampling seed from
    /// `rng` and runs [`RoiHeads::sample_rois`].
    pub fn select_training_samples(
        &self,
        proposals: &[Tensor],
        targets: &[Target],
        rng: &mut Rng,
    ) -> Result<TrainingSamples> {
        let device = proposals
            .first()
            .map(|p| p.device())
            .unwrap_or(crate::device::Device::Cpu);
        let (boxes, counts) = pad_proposals(proposals)?;
        let tg = PackedTargets::new(targets, device)?;
        self.sample_rois(&boxes, &counts, &tg, rng.next_u64())
    }

    /// torchvision's `select_training_samples` on the device, every image in one
    /// launch per stage and nothing read back: append each image's GT boxes to its
    /// proposals (`boxes` `[N, P, 4]`, the first `counts[n]` real), match (0.5 / 0.5, no
    /// low-quality matches), sample with the Philox keys of `seed` (stage
    /// [`STAGE_ROI`]), gather the sampled RoIs in candidate order into `cap` rows per
    /// image and encode their targets.
    pub fn sample_rois(
        &self,
        boxes: &Tensor,
        counts: &Tensor,
        tg: &PackedTargets,
        seed: u64,
    ) -> Result<TrainingSamples> {
        let cfg = &self.config;
        let (n, p) = match boxes.dims() {
            [n, p, 4] if *n == tg.images => (*n, *p),
            d => {
                return Err(Error::shape(
                    "RoiHeads::sample_rois",
                    format!("proposals {d:?} for {} images", tg.images),
                ))
            }
        };
        let matcher = Matcher::new(cfg.fg_iou_thresh as f64, cfg.bg_iou_thresh as f64, false)?;
        let spec = SampleSpec::new(cfg.batch_size_per_image, cfg.positive_fraction)?;
        let cands = Candidates {
            boxes,
            stride: 4 * p,
            counts: Some(counts),
            slots: p,
            append_gt: true,
        };
        let m = match_labels(tg, &cands, &matcher, LabelMode::Class)?;
        let (sel, _) = sample(&m.labels, n, spec, seed, STAGE_ROI)?;
        let cap = spec.batch.min(cands.len(tg));
        let g = roi_gather(tg, &cands, &sel, &m, cap)?;
        let targets = self.coder.encode(&g.gt_boxes, &g.rois)?;
        let loss = roi_loss_inputs(&g, &targets, n, cap, cfg.num_classes)?;
        let proposals = (0..n)
            .map(|i| ops::narrow(&g.rois, 0, i * cap, cap))
            .collect::<Result<Vec<_>>>()?;
        Ok(TrainingSamples {
            proposals,
            labels: g.labels,
            regression_targets: targets,
            counts: g.counts,
            cap,
            loss,
        })
    }

    /// `loss_classifier` (cross-entropy, mean) and `loss_box_reg` (smooth L1, beta
    /// `box_loss_beta`, over positives of their class, divided by the number of sampled RoIs).
    pub fn losses(
        &self,
        class_logits: &Tensor,
        box_regression: &Tensor,
        samples: &TrainingSamples,
    ) -> Result<(Tensor, Tensor)> {
        let r = samples.labels.numel();
        if r == 0 {
            // No candidate slot in the whole batch: nothing to classify. Zero losses
            // (sums over the empty outputs, so still on the graph) let training go
            // on, where torchvision's mean over no element would be NaN.
            return Ok((ops::sum(class_logits)?, ops::sum(box_regression)?));
        }
        let c = self.config.num_classes;
        let li = &samples.loss;
        // Means over the sampled RoIs as weighted sums: the weights carry 1 / (RoIs
        // sampled in the batch), counted on the device, and 0 on padding rows.
        let ce = ops::cross_entropy(class_logits, &samples.labels, Reduction::None)?;
        let loss_cls = ops::sum(&ops::mul(&ce, &li.class_weight)?)?;
        let per_class = ops::reshape(box_regression, [r * c, 4])?;
        let picked = ops::index_select(&per_class, 0, &li.rows)?;
        let l1 = ops::smooth_l1(
            &picked,
            &li.box_target,
            self.config.box_loss_beta,
            Reduction::None,
        )?;
        Ok((loss_cls, ops::sum(&ops::mul(&l1, &li.box_weight)?)?))
    }
}

/// Per-image proposals `[K_n, 4]` as one `[N, max K, 4]` tensor (rows past `K_n` unit
/// boxes) and the counts `[N]` i64, on the proposals' device.
pub fn pad_proposals(proposals: &[Tensor]) -> Result<(Tensor, Tensor)> {
    let device = proposals
        .first()
        .map(|p| p.device())
        .unwrap_or(crate::device::Device::Cpu);
    let p = proposals.iter().map(|t| t.dims()[0]).max().unwrap_or(0);
    let mut parts = Vec::new();
    for t in proposals {
        parts.push(t.clone());
        let k = t.dims()[0];
        if k < p {
            let unit: Vec<f32> = [0.0, 0.0, 1.0, 1.0].repeat(p - k);
            parts.push(Tensor::from_vec(unit, [p - k, 4])?.to_device(device)?);
        }
    }
    let n = proposals.len();
    let boxes = if n == 0 || p == 0 {
        Tensor::zeros([n, p, 4], crate::tensor::DType::F32, device)?
    } else {
        ops::reshape(
            &ops::concat(&parts.iter().collect::<Vec<_>>(), 0)?,
            [n, p, 4],
        )?
    };
    let counts: Vec<i64> = proposals.iter().map(|t| t.dims()[0] as i64).collect();
    Ok((boxes, Tensor::from_vec_i64(counts, [n])?.to_device(device)?))
}
