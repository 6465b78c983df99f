//! torchvision's RoIHeads for boxes: MultiScaleRoIAlign, TwoMLPHead,
//! FastRCNNPredictor, training-sample selection, the Fast R-CNN losses and the
//! postprocessing of detections.

use super::box_utils::{self, BoxCoder};
use super::poolers::MultiScaleRoIAlign;
use super::{Detections, Target};
use crate::error::{Error, Result};
use crate::nn::{Ctx, Linear, ParamSpec};
use crate::ops::{self, Reduction};
use crate::rng::Rng;
use crate::tensor::Tensor;

/// Settings of the box head (torchvision's defaults in [`RoiHeadsConfig::new`]).
#[derive(Clone, Debug, PartialEq)]
pub struct RoiHeadsConfig {
    /// Classes including background (index 0).
    pub num_classes: usize,
    /// Width of the two MLP layers.
    pub representation_size: usize,
    pub fg_iou_thresh: f32,
    pub bg_iou_thresh: f32,
    /// RoIs sampled per image for the losses.
    pub batch_size_per_image: usize,
    pub positive_fraction: f64,
    pub bbox_reg_weights: [f32; 4],
    pub score_thresh: f32,
    pub nms_thresh: f64,
    pub detections_per_img: usize,
    /// Detections narrower or shorter than this (pixels) are dropped.
    pub min_size: f32,
}

impl RoiHeadsConfig {
    /// torchvision's settings for `num_classes` classes (with background).
    pub fn new(num_classes: usize, representation_size: usize) -> Self {
        RoiHeadsConfig {
            num_classes,
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
        }
    }
}

/// The box branch.
pub struct RoiHeads {
    pub config: RoiHeadsConfig,
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
    /// Per image encoded GT box per RoI (weights 10, 10, 5, 5).
    pub regression_targets: Vec<Vec<[f32; 4]>>,
}

impl RoiHeads {
    /// A box head over `channels`-channel P2..P5.
    pub fn new(channels: usize, config: RoiHeadsConfig) -> RoiHeads {
        let pooler = MultiScaleRoIAlign::new((7, 7), 2);
        let (rep, c) = (config.representation_size, config.num_classes);
        RoiHeads {
            fc6: Linear::new("roi_heads.box_head.fc6", channels * 49, rep),
            fc7: Linear::new("roi_heads.box_head.fc7", rep, rep),
            cls_score: Linear::new("roi_heads.box_predictor.cls_score", rep, c),
            bbox_pred: Linear::new("roi_heads.box_predictor.bbox_pred", rep, 4 * c),
            coder: BoxCoder::new(config.bbox_reg_weights),
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

    /// Pooled features `[R, C, 7, 7]` of the proposals over P2..P5.
    pub fn pool(
        &self,
        feats: &[Tensor],
        proposals: &[Tensor],
        image_sizes: &[(usize, usize)],
    ) -> Result<Tensor> {
        self.pooler.forward(feats, proposals, image_sizes)
    }

    /// TwoMLPHead: `[R, C, 7, 7]` to `[R, representation_size]`.
    pub fn box_head(&self, ctx: &Ctx, pooled: &Tensor) -> Result<Tensor> {
        let r = pooled.dims()[0];
        let x = ops::reshape(pooled, [r, pooled.numel() / r.max(1)])?;
        let x = ops::relu(&self.fc6.forward(ctx, &x)?)?;
        ops::relu(&self.fc7.forward(ctx, &x)?)
    }

    /// FastRCNNPredictor: class logits `[R, classes]` and box deltas `[R, 4 classes]`.
    pub fn predictor(&self, ctx: &Ctx, x: &Tensor) -> Result<(Tensor, Tensor)> {
        Ok((
            self.cls_score.forward(ctx, x)?,
            self.bbox_pred.forward(ctx, x)?,
        ))
    }

    /// Detections per image in resized-image pixels (torchvision's
    /// `postprocess_detections`): softmax, per-class boxes, clip, score > thresh, drop
    /// tiny boxes, per-class NMS, best `detections_per_img`.
    pub fn postprocess(
        &self,
        class_logits: &Tensor,
        box_regression: &Tensor,
        proposals: &[Tensor],
        image_sizes: &[(usize, usize)],
    ) -> Result<Vec<Detections>> {
        let c = self.config.num_classes;
        let logits = class_logits.to_vec::<f32>()?;
        let regs = box_regression.to_vec::<f32>()?;
        let mut row = 0;
        let mut out = Vec::with_capacity(proposals.len());
        for (p, &(h, w)) in proposals.iter().zip(image_sizes) {
            let pv = p.to_vec::<f32>()?;
            let (mut boxes, mut scores, mut labels) = (Vec::new(), Vec::new(), Vec::new());
            for (k, pb) in pv.chunks_exact(4).enumerate() {
                let r = row + k;
                let probs = softmax(&logits[r * c..(r + 1) * c]);
                let pb = [pb[0], pb[1], pb[2], pb[3]];
                for (j, &s) in probs.iter().enumerate().skip(1) {
                    let b = self
                        .coder
                        .decode(&regs[(r * c + j) * 4..(r * c + j) * 4 + 4], &pb);
                    let b = [
                        b[0].clamp(0.0, w as f32),
                        b[1].clamp(0.0, h as f32),
                        b[2].clamp(0.0, w as f32),
                        b[3].clamp(0.0, h as f32),
                    ];
                    if s > self.config.score_thresh
                        && b[2] - b[0] >= self.config.min_size
                        && b[3] - b[1] >= self.config.min_size
                    {
                        boxes.extend_from_slice(&b);
                        scores.push(s);
                        labels.push(j as i64);
                    }
                }
            }
            row += pv.len() / 4;
            let k = scores.len();
            let keep = ops::nms::batched_nms(
                &Tensor::from_vec(boxes.clone(), [k, 4])?,
                &Tensor::from_vec(scores.clone(), [k])?,
                &Tensor::from_vec_i64(labels.clone(), [k])?,
                self.config.nms_thresh,
            )?;
            let keep: Vec<usize> = keep
                .to_vec_i64()?
                .into_iter()
                .take(self.config.detections_per_img)
                .map(|i| i as usize)
                .collect();
            out.push(Detections {
                boxes: keep
                    .iter()
                    .map(|&i| {
                        [
                            boxes[4 * i],
                            boxes[4 * i + 1],
                            boxes[4 * i + 2],
                            boxes[4 * i + 3],
                        ]
                    })
                    .collect(),
                scores: keep.iter().map(|&i| scores[i]).collect(),
                labels: keep.iter().map(|&i| labels[i]).collect(),
            });
        }
        Ok(out)
    }

    /// torchvision's `select_training_samples`: append GT boxes to the proposals,
    /// match (0.5 / 0.5, no low-quality matches), sample, encode targets.
    pub fn select_training_samples(
        &self,
        proposals: &[Tensor],
        targets: &[Target],
        rng: &mut Rng,
    ) -> Result<TrainingSamples> {
        let cfg = &self.config;
        let mut out = TrainingSamples {
            proposals: Vec::new(),
            labels: Vec::new(),
            regression_targets: Vec::new(),
        };
        for (p, t) in proposals.iter().zip(targets) {
            let device = p.device();
            let mut boxes: Vec<[f32; 4]> = p
                .to_vec::<f32>()?
                .chunks_exact(4)
                .map(|b| [b[0], b[1], b[2], b[3]])
                .collect();
            boxes.extend(t.boxes.iter().copied());
            let n = boxes.len();
            let (matches, labels) = if t.boxes.is_empty() {
                (vec![0i64; n], vec![0i64; n])
            } else {
                let mut iou = vec![0f32; t.boxes.len() * n];
                for (g, gt) in t.boxes.iter().enumerate() {
                    for (i, b) in boxes.iter().enumerate() {
                        iou[g * n + i] = box_utils::iou(gt, b);
                    }
                }
                let m = box_utils::match_boxes(
                    &iou,
                    t.boxes.len(),
                    n,
                    cfg.fg_iou_thresh,
                    cfg.bg_iou_thresh,
                    false,
                );
                let labels = m.iter().map(|&v| match v {
                    -1 => 0,
                    -2 => -1,
                    g => t.labels[g as usize],
                });
                (m.clone(), labels.collect())
            };
            let (pos, neg) = box_utils::sample(
                &labels,
                cfg.batch_size_per_image,
                cfg.positive_fraction,
                rng,
            );
            let mut sampled: Vec<usize> = pos.into_iter().chain(neg).collect();
            sampled.sort_unstable();
            let gt_of = |i: usize| {
                t.boxes
                    .get(matches[i].max(0) as usize)
                    .copied()
                    .unwrap_or([0.0; 4])
            };
            out.regression_targets.push(
                sampled
                    .iter()
                    .map(|&i| self.coder.encode(&gt_of(i), &boxes[i]))
                    .collect(),
            );
            out.labels
                .push(sampled.iter().map(|&i| labels[i]).collect());
            let flat: Vec<f32> = sampled.iter().flat_map(|&i| boxes[i]).collect();
            out.proposals
                .push(Tensor::from_vec(flat, [sampled.len(), 4])?.to_device(device)?);
        }
        Ok(out)
    }

    /// `loss_classifier` (cross-entropy, mean) and `loss_box_reg` (smooth L1, beta
    /// 1/9, over positives of their class, divided by the number of sampled RoIs).
    pub fn losses(
        &self,
        class_logits: &Tensor,
        box_regression: &Tensor,
        samples: &TrainingSamples,
    ) -> Result<(Tensor, Tensor)> {
        let device = class_logits.device();
        let labels: Vec<i64> = samples.labels.iter().flatten().copied().collect();
        let targets: Vec<[f32; 4]> = samples
            .regression_targets
            .iter()
            .flatten()
            .copied()
            .collect();
        let r = labels.len();
        if r == 0 {
            return Err(Error::invalid("roi_heads.losses", "no RoIs sampled"));
        }
        let c = self.config.num_classes;
        let lab_t = Tensor::from_vec_i64(labels.clone(), [r])?.to_device(device)?;
        let loss_cls = ops::cross_entropy(class_logits, &lab_t, Reduction::Mean)?;
        let pos: Vec<usize> = (0..r).filter(|&i| labels[i] > 0).collect();
        let rows: Vec<i64> = pos.iter().map(|&i| (i * c) as i64 + labels[i]).collect();
        let tg: Vec<f32> = pos.iter().flat_map(|&i| targets[i]).collect();
        let np = pos.len();
        let per_class = ops::reshape(box_regression, [r * c, 4])?;
        let picked = ops::index_select(
            &per_class,
            0,
            &Tensor::from_vec_i64(rows, [np])?.to_device(device)?,
        )?;
        let sum = ops::smooth_l1(
            &picked,
            &Tensor::from_vec(tg, [np, 4])?.to_device(device)?,
            1.0 / 9.0,
            Reduction::Sum,
        )?;
        Ok((loss_cls, ops::scale(&sum, 1.0 / r as f64)?))
    }
}

/// Softmax of one row in f32, as torch computes it (max-shifted).
fn softmax(x: &[f32]) -> Vec<f32> {
    let m = x.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let e: Vec<f32> = x.iter().map(|v| (v - m).exp()).collect();
    let s: f32 = e.iter().sum();
    e.iter().map(|v| v / s).collect()
}
