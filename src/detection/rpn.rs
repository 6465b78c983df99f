//! torchvision's RegionProposalNetwork: the head, anchors, the proposal stage and the
//! RPN losses.

use super::box_utils::{self, BoxCoder};
use super::Target;
use crate::error::{Error, Result};
use crate::nn::{Conv2d, Ctx, Init, ParamSpec};
use crate::ops::{self, Reduction};
use crate::rng::Rng;
use crate::tensor::Tensor;

/// Settings of the RPN (torchvision's defaults in [`RpnConfig::default`]).
#[derive(Clone, Debug, PartialEq)]
pub struct RpnConfig {
    /// Anchor size per level, pixels (one per feature map, finest first).
    pub anchor_sizes: Vec<f32>,
    /// Aspect ratios h/w of the anchors.
    pub aspect_ratios: Vec<f32>,
    pub pre_nms_top_n_train: usize,
    pub pre_nms_top_n_test: usize,
    pub post_nms_top_n_train: usize,
    pub post_nms_top_n_test: usize,
    pub nms_thresh: f64,
    pub fg_iou_thresh: f32,
    pub bg_iou_thresh: f32,
    /// Anchors sampled per image for the losses.
    pub batch_size_per_image: usize,
    pub positive_fraction: f64,
    pub score_thresh: f32,
    /// Proposals narrower or shorter than this (pixels) are dropped.
    pub min_size: f32,
}

impl Default for RpnConfig {
    fn default() -> Self {
        RpnConfig {
            anchor_sizes: vec![32.0, 64.0, 128.0, 256.0, 512.0],
            aspect_ratios: vec![0.5, 1.0, 2.0],
            pre_nms_top_n_train: 2000,
            pre_nms_top_n_test: 1000,
            post_nms_top_n_train: 2000,
            post_nms_top_n_test: 1000,
            nms_thresh: 0.7,
            fg_iou_thresh: 0.7,
            bg_iou_thresh: 0.3,
            batch_size_per_image: 256,
            positive_fraction: 0.5,
            score_thresh: 0.0,
            min_size: 1e-3,
        }
    }
}

/// The RPN: a shared 3x3 conv, objectness and box-delta 1x1 convs.
pub struct Rpn {
    pub config: RpnConfig,
    conv: Conv2d,
    cls_logits: Conv2d,
    bbox_pred: Conv2d,
    coder: BoxCoder,
}

/// Head outputs per level: objectness `[N, A, H, W]` and deltas `[N, 4A, H, W]`.
pub struct RpnHeadOutput {
    pub objectness: Vec<Tensor>,
    pub deltas: Vec<Tensor>,
}

impl Rpn {
    /// An RPN over `channels`-channel feature maps.
    pub fn new(channels: usize, config: RpnConfig) -> Rpn {
        let a = config.aspect_ratios.len();
        let init = Init::Normal(0.01);
        Rpn {
            conv: Conv2d::new("rpn.head.conv.0.0", channels, channels, 3, 1, 1, true)
                .with_init(init),
            cls_logits: Conv2d::new("rpn.head.cls_logits", channels, a, 1, 1, 0, true)
                .with_init(init),
            bbox_pred: Conv2d::new("rpn.head.bbox_pred", channels, 4 * a, 1, 1, 0, true)
                .with_init(init),
            coder: BoxCoder::new([1.0; 4]),
            config,
        }
    }

    /// The tensors of the head (weights N(0, 0.01²), biases 0, as torchvision's).
    pub fn specs(&self, out: &mut Vec<ParamSpec>) {
        for c in [&self.conv, &self.cls_logits, &self.bbox_pred] {
            let start = out.len();
            c.specs(out);
            for s in &mut out[start..] {
                if s.name.ends_with(".bias") {
                    s.init = Init::Const(0.0);
                }
            }
        }
    }

    /// Objectness and deltas for every level.
    pub fn head(&self, ctx: &Ctx, feats: &[Tensor]) -> Result<RpnHeadOutput> {
        let mut objectness = Vec::with_capacity(feats.len());
        let mut deltas = Vec::with_capacity(feats.len());
        for f in feats {
            let t = ops::relu(&self.conv.forward(ctx, f)?)?;
            objectness.push(self.cls_logits.forward(ctx, &t)?);
            deltas.push(self.bbox_pred.forward(ctx, &t)?);
        }
        Ok(RpnHeadOutput { objectness, deltas })
    }

    /// Anchors of one image of the batch (all images share them), level by level.
    /// `batch_hw` is the padded batch size, `grids` each level's (h, w).
    pub fn anchors(
        &self,
        batch_hw: (usize, usize),
        grids: &[(usize, usize)],
    ) -> Result<Vec<[f32; 4]>> {
        if grids.len() != self.config.anchor_sizes.len() {
            return Err(Error::invalid(
                "rpn",
                format!(
                    "{} feature maps for {} anchor sizes",
                    grids.len(),
                    self.config.anchor_sizes.len()
                ),
            ));
        }
        Ok(box_utils::grid_anchors(
            batch_hw,
            grids,
            &self.config.anchor_sizes,
            &self.config.aspect_ratios,
        ))
    }

    /// Proposals per image (`[K, 4]` f32 on the features' device), torchvision's
    /// `filter_proposals`: per level top-k on objectness, decode, clip, drop small
    /// boxes and low scores, NMS per level, keep the best `post_nms_top_n`.
    pub fn proposals(
        &self,
        head: &RpnHeadOutput,
        anchors: &[[f32; 4]],
        image_sizes: &[(usize, usize)],
        training: bool,
    ) -> Result<Vec<Tensor>> {
        let cfg = &self.config;
        let (pre, post) = if training {
            (cfg.pre_nms_top_n_train, cfg.post_nms_top_n_train)
        } else {
            (cfg.pre_nms_top_n_test, cfg.post_nms_top_n_test)
        };
        let device = head.objectness[0].device();
        let levels: Vec<LevelScores> = head
            .objectness
            .iter()
            .zip(&head.deltas)
            .map(|(o, d)| LevelScores::read(o, d))
            .collect::<Result<_>>()?;
        let mut out = Vec::with_capacity(image_sizes.len());
        for (n, &(h, w)) in image_sizes.iter().enumerate() {
            let mut boxes = Vec::new();
            let mut scores = Vec::new();
            let mut lvls = Vec::new();
            let mut offset = 0;
            for (l, lv) in levels.iter().enumerate() {
                let obj = lv.objectness(n);
                for i in box_utils::topk(obj, pre.min(obj.len())) {
                    let b = self.coder.decode(&lv.delta(n, i), &anchors[offset + i]);
                    let b = [
                        b[0].clamp(0.0, w as f32),
                        b[1].clamp(0.0, h as f32),
                        b[2].clamp(0.0, w as f32),
                        b[3].clamp(0.0, h as f32),
                    ];
                    let s = sigmoid(obj[i]);
                    if b[2] - b[0] >= cfg.min_size
                        && b[3] - b[1] >= cfg.min_size
                        && s >= cfg.score_thresh
                    {
                        boxes.extend_from_slice(&b);
                        scores.push(s);
                        lvls.push(l as i64);
                    }
                }
                offset += obj.len();
            }
            let k = scores.len();
            let bt = Tensor::from_vec(boxes, [k, 4])?;
            let keep = ops::nms::batched_nms(
                &bt,
                &Tensor::from_vec(scores, [k])?,
                &Tensor::from_vec_i64(lvls, [k])?,
                cfg.nms_thresh,
            )?;
            let keep: Vec<i64> = keep.to_vec_i64()?.into_iter().take(post).collect();
            let kept =
                ops::index_select(&bt, 0, &Tensor::from_vec_i64(keep.clone(), [keep.len()])?)?;
            out.push(kept.to_device(device)?);
        }
        Ok(out)
    }

    /// `loss_objectness` (BCE over sampled anchors) and `loss_rpn_box_reg` (smooth L1,
    /// beta 1/9, over positives, divided by the number sampled).
    pub fn losses(
        &self,
        head: &RpnHeadOutput,
        anchors: &[[f32; 4]],
        targets: &[Target],
        rng: &mut Rng,
    ) -> Result<(Tensor, Tensor)> {
        let (obj, deltas) = flatten_head(head)?;
        let total = anchors.len();
        let device = obj.device();
        let mut labels = Vec::with_capacity(targets.len() * total);
        let mut reg_targets = Vec::new();
        let (mut pos_all, mut neg_all) = (Vec::new(), Vec::new());
        for (n, t) in targets.iter().enumerate() {
            let (lab, matched) = self.assign(anchors, t);
            let lab_i: Vec<i64> = lab.iter().map(|&v| v as i64).collect();
            let (pos, neg) = box_utils::sample(
                &lab_i,
                self.config.batch_size_per_image,
                self.config.positive_fraction,
                rng,
            );
            for &i in &pos {
                let gt = t.boxes[matched[i].max(0) as usize];
                reg_targets.extend_from_slice(&self.coder.encode(&gt, &anchors[i]));
            }
            pos_all.extend(pos.iter().map(|&i| (n * total + i) as i64));
            neg_all.extend(neg.iter().map(|&i| (n * total + i) as i64));
            labels.extend(lab);
        }
        let sampled: Vec<i64> = pos_all.iter().chain(&neg_all).copied().collect();
        let num_sampled = sampled.len();
        if num_sampled == 0 {
            return Err(Error::invalid(
                "rpn.losses",
                "no anchors sampled (empty images?)",
            ));
        }
        let idx = Tensor::from_vec_i64(sampled.clone(), [num_sampled])?.to_device(device)?;
        let sampled_labels: Vec<f32> = sampled.iter().map(|&i| labels[i as usize]).collect();
        let lab_t = Tensor::from_vec(sampled_labels, [num_sampled])?.to_device(device)?;
        let loss_obj =
            ops::bce_with_logits(&ops::index_select(&obj, 0, &idx)?, &lab_t, Reduction::Mean)?;
        let np = pos_all.len();
        let pos_idx = Tensor::from_vec_i64(pos_all, [np])?.to_device(device)?;
        let tgt = Tensor::from_vec(reg_targets, [np, 4])?.to_device(device)?;
        let box_sum = ops::smooth_l1(
            &ops::index_select(&deltas, 0, &pos_idx)?,
            &tgt,
            1.0 / 9.0,
            Reduction::Sum,
        )?;
        let loss_box = ops::scale(&box_sum, 1.0 / num_sampled as f64)?;
        Ok((loss_obj, loss_box))
    }

    /// Labels (1 fg, 0 bg, -1 ignored) and matched GT index per anchor.
    pub fn assign(&self, anchors: &[[f32; 4]], t: &Target) -> (Vec<f32>, Vec<i64>) {
        if t.boxes.is_empty() {
            return (vec![0.0; anchors.len()], vec![-1; anchors.len()]);
        }
        let n = anchors.len();
        let mut iou = vec![0f32; t.boxes.len() * n];
        for (g, gt) in t.boxes.iter().enumerate() {
            for (i, a) in anchors.iter().enumerate() {
                iou[g * n + i] = box_utils::iou(gt, a);
            }
        }
        let m = box_utils::match_boxes(
            &iou,
            t.boxes.len(),
            n,
            self.config.fg_iou_thresh,
            self.config.bg_iou_thresh,
            true,
        );
        let labels = m
            .iter()
            .map(|&v| {
                if v >= 0 {
                    1.0
                } else if v == -1 {
                    0.0
                } else {
                    -1.0
                }
            })
            .collect();
        (labels, m)
    }
}

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// One level's objectness and deltas on the host, indexed as torchvision flattens
/// them: anchor i of image n is (row, column, base anchor).
struct LevelScores {
    obj: Vec<f32>,
    deltas: Vec<f32>,
    a: usize,
    hw: usize,
}

impl LevelScores {
    fn read(o: &Tensor, d: &Tensor) -> Result<Self> {
        let dims = o.dims();
        if dims.len() != 4 || d.dims() != [dims[0], 4 * dims[1], dims[2], dims[3]] {
            return Err(Error::shape(
                "rpn",
                format!("objectness {} and deltas {}", o.shape(), d.shape()),
            ));
        }
        let (n, a, hw) = (dims[0], dims[1], dims[2] * dims[3]);
        let (ov, dv) = (o.to_vec::<f32>()?, d.to_vec::<f32>()?);
        // Reorder [N, A, H, W] to [N, HW, A] and [N, A, 4, H, W] to [N, HW, A, 4].
        let mut obj = vec![0f32; n * hw * a];
        let mut deltas = vec![0f32; n * hw * a * 4];
        for b in 0..n {
            for ai in 0..a {
                for p in 0..hw {
                    obj[(b * hw + p) * a + ai] = ov[(b * a + ai) * hw + p];
                    for c in 0..4 {
                        deltas[((b * hw + p) * a + ai) * 4 + c] =
                            dv[((b * a + ai) * 4 + c) * hw + p];
                    }
                }
            }
        }
        Ok(LevelScores { obj, deltas, a, hw })
    }
    fn objectness(&self, n: usize) -> &[f32] {
        let k = self.hw * self.a;
        &self.obj[n * k..(n + 1) * k]
    }
    fn delta(&self, n: usize, i: usize) -> [f32; 4] {
        let o = (n * self.hw * self.a + i) * 4;
        [
            self.deltas[o],
            self.deltas[o + 1],
            self.deltas[o + 2],
            self.deltas[o + 3],
        ]
    }
}

/// Differentiable flattening of the head outputs (torchvision's
/// `concat_box_prediction_layers`): objectness `[N * total]`, deltas `[N * total, 4]`,
/// image-major, anchors in (level, row, column, base anchor) order.
pub fn flatten_head(head: &RpnHeadOutput) -> Result<(Tensor, Tensor)> {
    let mut objs = Vec::new();
    let mut dels = Vec::new();
    for (o, d) in head.objectness.iter().zip(&head.deltas) {
        let [n, a, h, w] = <[usize; 4]>::try_from(o.dims())
            .map_err(|_| Error::shape("rpn", format!("objectness {}", o.shape())))?;
        objs.push(ops::reshape(
            &ops::permute(o, &[0, 2, 3, 1])?,
            [n, h * w * a],
        )?);
        let d5 = ops::reshape(d, [n, a, 4, h, w])?;
        dels.push(ops::reshape(
            &ops::permute(&d5, &[0, 3, 4, 1, 2])?,
            [n, h * w * a, 4],
        )?);
    }
    let obj = ops::concat(&objs.iter().collect::<Vec<_>>(), 1)?;
    let del = ops::concat(&dels.iter().collect::<Vec<_>>(), 1)?;
    let total = obj.numel();
    Ok((
        ops::reshape(&obj, [total])?,
        ops::reshape(&del, [total, 4])?,
    ))
}
