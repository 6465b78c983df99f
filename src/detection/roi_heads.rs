//! torchvision's RoIHeads for boxes: MultiScaleRoIAlign, TwoMLPHead,
//! FastRCNNPredictor, training-sample selection, the Fast R-CNN losses and the
//! postprocessing of detections.

use super::box_coder::BoxCoder;
use super::matcher::{Matcher, BELOW_LOW_THRESHOLD};
use super::poolers::MultiScaleRoIAlign;
use super::proposals::{select_detections, DetectionParams};
use super::sampler::BalancedPositiveNegativeSampler;
use super::{Detections, Target};
use crate::error::Result;
use crate::nn::{Ctx, Linear, ParamSpec};
use crate::ops::boxes::box_iou;
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

/// Sampled RoIs of a batch with their classification and regression targets.
pub struct TrainingSamples {
    /// Per image `[K_i, 4]` proposals (GT appended, then sampled in index order).
    pub proposals: Vec<Tensor>,
    /// Per image class label per RoI (0 = background).
    pub labels: Vec<Vec<i64>>,
    /// Per image `[K_i, 4]` encoded GT box per RoI (weights 10, 10, 5, 5), on the
    /// proposals' device.
    pub regression_targets: Vec<Tensor>,
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
        let rows: Vec<usize> = proposals.iter().map(|p| p.dims()[0]).collect();
        let all = ops::concat(&proposals.iter().collect::<Vec<_>>(), 0)?;
        let sel = select_detections(
            class_logits,
            box_regression,
            &all,
            &rows,
            image_sizes,
            &self.coder,
            &DetectionParams {
                score_thresh: cfg.score_thresh,
                min_size: cfg.min_size,
                nms_thresh: cfg.nms_thresh,
                detections_per_img: cfg.detections_per_img,
            },
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

    /// torchvision's `select_training_samples`: append GT boxes to the proposals,
    /// match (0.5 / 0.5, no low-quality matches) on the proposals' device, sample on
    /// the host (it reads each image's matches), encode targets on the device.
    pub fn select_training_samples(
        &self,
        proposals: &[Tensor],
        targets: &[Target],
        rng: &mut Rng,
    ) -> Result<TrainingSamples> {
        let cfg = &self.config;
        let matcher = Matcher::new(cfg.fg_iou_thresh as f64, cfg.bg_iou_thresh as f64, false)?;
        let sampler =
            BalancedPositiveNegativeSampler::new(cfg.batch_size_per_image, cfg.positive_fraction)?;
        let mut out = TrainingSamples {
            proposals: Vec::new(),
            labels: Vec::new(),
            regression_targets: Vec::new(),
        };
        for (p, t) in proposals.iter().zip(targets) {
            let device = p.device();
            let g = t.boxes.len();
            let gt_flat: Vec<f32> = t.boxes.iter().flatten().copied().collect();
            let gt = Tensor::from_vec(gt_flat, [g, 4])?.to_device(device)?;
            let boxes = ops::concat(&[p, &gt], 0)?;
            let matches = matcher.matches(&box_iou(&gt, &boxes)?)?.to_vec_i64()?;
            let labels: Vec<i64> = matches
                .iter()
                .map(|&m| match m {
                    BELOW_LOW_THRESHOLD => 0,
                    m if m < 0 => -1,
                    m => t.labels[m as usize],
                })
                .collect();
            let s = sampler.sample_labels(&labels, rng)?;
            let mut sampled: Vec<i64> = s.positive.into_iter().chain(s.negative).collect();
            sampled.sort_unstable();
            let k = sampled.len();
            // torchvision matches background RoIs to GT 0 (or a zero box without GT).
            let matched: Vec<f32> = sampled
                .iter()
                .flat_map(|&i| {
                    t.boxes
                        .get(matches[i as usize].max(0) as usize)
                        .copied()
                        .unwrap_or([0.0; 4])
                })
                .collect();
            let idx = Tensor::from_vec_i64(sampled.clone(), [k])?.to_device(device)?;
            let rois = ops::index_select(&boxes, 0, &idx)?;
            let matched = Tensor::from_vec(matched, [k, 4])?.to_device(device)?;
            out.regression_targets
                .push(self.coder.encode(&matched, &rois)?);
            out.labels
                .push(sampled.iter().map(|&i| labels[i as usize]).collect());
            out.proposals.push(rois);
        }
        Ok(out)
    }

    /// `loss_classifier` (cross-entropy, mean) and `loss_box_reg` (smooth L1, beta
    /// `box_loss_beta`, over positives of their class, divided by the number of sampled RoIs).
    pub fn losses(
        &self,
        class_logits: &Tensor,
        box_regression: &Tensor,
        samples: &TrainingSamples,
    ) -> Result<(Tensor, Tensor)> {
        let device = class_logits.device();
        let labels: Vec<i64> = samples.labels.iter().flatten().copied().collect();
        let r = labels.len();
        if r == 0 {
            // No proposal and no ground truth in the whole batch: nothing to
            // classify. Zero losses (sums over the empty outputs, so still on the
            // graph) let training go on, where torchvision's mean over no element
            // would be NaN.
            return Ok((ops::sum(class_logits)?, ops::sum(box_regression)?));
        }
        let c = self.config.num_classes;
        let lab_t = Tensor::from_vec_i64(labels.clone(), [r])?.to_device(device)?;
        let loss_cls = ops::cross_entropy(class_logits, &lab_t, Reduction::Mean)?;
        let pos: Vec<usize> = (0..r).filter(|&i| labels[i] > 0).collect();
        let rows: Vec<i64> = pos.iter().map(|&i| (i * c) as i64 + labels[i]).collect();
        let np = pos.len();
        let targets = ops::concat(&samples.regression_targets.iter().collect::<Vec<_>>(), 0)?;
        let pos_t = Tensor::from_vec_i64(pos.iter().map(|&i| i as i64).collect(), [np])?
            .to_device(device)?;
        let tg = ops::index_select(&targets, 0, &pos_t)?;
        let per_class = ops::reshape(box_regression, [r * c, 4])?;
        let picked = ops::index_select(
            &per_class,
            0,
            &Tensor::from_vec_i64(rows, [np])?.to_device(device)?,
        )?;
        let sum = ops::smooth_l1(&picked, &tg, self.config.box_loss_beta, Reduction::Sum)?;
        Ok((loss_cls, ops::scale(&sum, 1.0 / r as f64)?))
    }
}
