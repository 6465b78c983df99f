//! torchvision's RegionProposalNetwork: the head, anchors, the proposal stage and the
//! RPN losses.

use super::anchors::AnchorGenerator;
use super::box_coder::BoxCoder;
use super::matcher::Matcher;
use super::proposals::{select_proposals, ProposalParams, Selected};
use super::targets::{
    match_labels, rpn_targets, sample, Candidates, LabelMode, Matched, PackedTargets, SampleSpec,
    STAGE_RPN,
};
use super::Target;
use crate::device::Device;
use crate::error::{Error, Result};
use crate::nn::{Conv2d, Ctx, Init, ParamSpec};
use crate::ops::boxes::box_iou;
use crate::ops::{self, Reduction};
use crate::tensor::{DType, Tensor, TensorId};

/// Settings of the RPN (torchvision's defaults in [`RpnConfig::default`]): the
/// `[model.rpn]` section of a config.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RpnConfig {
    /// Anchor size per level, pixels (one per feature map, finest first).
    pub anchor_sizes: Vec<f32>,
    /// Aspect ratios h/w of the anchors.
    pub aspect_ratios: Vec<f32>,
    /// Top-scoring anchors kept per level before NMS, training / testing.
    pub pre_nms_top_n_train: usize,
    /// See `pre_nms_top_n_train`.
    pub pre_nms_top_n_test: usize,
    /// Proposals kept per image after NMS, training (mmdetection: 1000) / testing.
    pub post_nms_top_n_train: usize,
    /// See `post_nms_top_n_train`.
    pub post_nms_top_n_test: usize,
    /// NMS IoU threshold.
    pub nms_thresh: f64,
    /// Anchors with IoU >= this are positive, < `bg_iou_thresh` negative.
    pub fg_iou_thresh: f32,
    /// See `fg_iou_thresh`.
    pub bg_iou_thresh: f32,
    /// Anchors sampled per image for the losses.
    pub batch_size_per_image: usize,
    /// Fraction of positives among the sampled anchors, at most.
    pub positive_fraction: f64,
    /// Proposals scoring below this (after the sigmoid) are dropped.
    pub score_thresh: f32,
    /// Proposals narrower or shorter than this (pixels) are dropped.
    pub min_size: f32,
    /// Smooth-L1 beta of the box loss (torchvision 1/9; 0 is mmdetection's L1).
    pub box_loss_beta: f64,
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
            box_loss_beta: 1.0 / 9.0,
        }
    }
}

impl RpnConfig {
    /// Check what types cannot; the error names the key (`nms_thresh`).
    pub fn validate(&self) -> Result<()> {
        use crate::config::{fraction, invalid, positive};
        let bad = |v: &[f32]| v.is_empty() || v.iter().any(|s| !(s.is_finite() && *s > 0.0));
        if bad(&self.anchor_sizes) {
            return Err(invalid("anchor_sizes", format!("{:?}", self.anchor_sizes)));
        }
        if bad(&self.aspect_ratios) {
            return Err(invalid(
                "aspect_ratios",
                format!("{:?}", self.aspect_ratios),
            ));
        }
        for (k, v) in [
            ("nms_thresh", self.nms_thresh),
            ("fg_iou_thresh", self.fg_iou_thresh as f64),
            ("bg_iou_thresh", self.bg_iou_thresh as f64),
            ("positive_fraction", self.positive_fraction),
        ] {
            fraction(k, v)?;
        }
        if self.bg_iou_thresh > self.fg_iou_thresh {
            return Err(invalid("bg_iou_thresh", "above fg_iou_thresh".into()));
        }
        positive("batch_size_per_image", self.batch_size_per_image)?;
        positive("post_nms_top_n_train", self.post_nms_top_n_train)?;
        positive("post_nms_top_n_test", self.post_nms_top_n_test)?;
        if !(self.box_loss_beta >= 0.0 && self.box_loss_beta.is_finite()) {
            return Err(invalid(
                "box_loss_beta",
                format!("{} (>= 0)", self.box_loss_beta),
            ));
        }
        Ok(())
    }
}

/// The RPN: a shared 3x3 conv, objectness and box-delta 1x1 convs.
pub struct Rpn {
    /// Its settings.
    pub config: RpnConfig,
    conv: Conv2d,
    cls_logits: Conv2d,
    bbox_pred: Conv2d,
    coder: BoxCoder,
    anchor_generator: AnchorGenerator,
    /// The objectness and box-delta weights and biases concatenated (`[5A, C, 1, 1]`,
    /// `[5A]`) for the CPU inference head, with the ids of the four tensors they were
    /// made from: remade when an optimizer step or a load replaces one.
    joint_head: std::sync::Mutex<Option<([TensorId; 4], Tensor, Tensor)>>,
}

/// Head outputs per level: objectness `[N, A, H, W]` and deltas `[N, 4A, H, W]`.
pub struct RpnHeadOutput {
    /// Objectness logits per level `[N, A, H, W]`.
    pub objectness: Vec<Tensor>,
    /// Box deltas per level `[N, 4A, H, W]`.
    pub deltas: Vec<Tensor>,
}

impl Rpn {
    /// An RPN over `channels`-channel feature maps. The anchor sizes and ratios are
    /// read here; the other settings of `config` whenever they are used.
    pub fn new(channels: usize, config: RpnConfig) -> Result<Rpn> {
        let a = config.aspect_ratios.len();
        let ratios: Vec<f64> = config.aspect_ratios.iter().map(|&r| r as f64).collect();
        let anchor_generator = AnchorGenerator::new(
            config
                .anchor_sizes
                .iter()
                .map(|&s| vec![s as f64])
                .collect(),
            vec![ratios; config.anchor_sizes.len()],
        )?;

        let init = Init::Normal(0.01);
        Ok(Rpn {
            conv: Conv2d::new("rpn.head.conv.0.0", channels, channels, 3, 1, 1, true)
                .with_init(init),
            cls_logits: Conv2d::new("rpn.head.cls_logits", channels, a, 1, 1, 0, true)
                .with_init(init),
            bbox_pred: Conv2d::new("rpn.head.bbox_pred", channels, 4 * a, 1, 1, 0, true)
                .with_init(init),
            coder: BoxCoder::new([1.0; 4]),
            anchor_generator,
            config,
            joint_head: Default::default(),
        })
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
            if let Some([o, d]) = self.head_cpu_joint(ctx, f)? {
                objectness.push(o);
                deltas.push(d);
                continue;
            }
            if let Some([o, d]) = self.head_cpu_train(ctx, f)? {
                objectness.push(o);
                deltas.push(d);
                continue;
            }
            // Without a tape the bias and ReLU ride in the conv's epilogue.
            let t = if crate::nn::fold::fusable_plain() {
                crate::nn::fold::conv_fused(ctx, &self.conv, f, true)?
            } else {
                ops::relu(&self.conv.forward(ctx, f)?)?
            };
            // Scores and deltas feed proposal selection and the losses: f32.
            objectness.push(self.cls_logits.forward_head(ctx, &t)?);
            deltas.push(self.bbox_pred.forward_head(ctx, &t)?);
        }
        Ok(RpnHeadOutput { objectness, deltas })
    }

    /// Whether the CPU head paths apply: f32 (or f64) features on the CPU, not bf16.
    fn cpu_float(ctx: &Ctx, f: &Tensor) -> bool {
        !ctx.precision.is_bf16()
            && f.device() == Device::Cpu
            && matches!(f.dtype(), DType::F32 | DType::F64)
    }

    /// The objectness and box-delta 1x1 convs' weights and biases.
    fn pointwise_params<'c>(&self, ctx: &'c Ctx) -> Result<[&'c Tensor; 4]> {
        let get = |n: String| ctx.params.get(&n);
        Ok([
            get(format!("{}.weight", self.cls_logits.name))?,
            get(format!("{}.bias", self.cls_logits.name))?,
            get(format!("{}.weight", self.bbox_pred.name))?,
            get(format!("{}.bias", self.bbox_pred.name))?,
        ])
    }

    /// CPU f32 inference: the 3x3 conv (bias, ReLU) with the objectness and
    /// box-delta 1x1 convs run as one 5A-channel conv on each of its output tiles
    /// while the tile is in cache (`conv2d_relu_pointwise_cpu`); `None` where that
    /// path does not apply (a tape records, bf16, a device tensor).
    fn head_cpu_joint(&self, ctx: &Ctx, f: &Tensor) -> Result<Option<[Tensor; 2]>> {
        if !crate::nn::fold::fusable_plain() || !Self::cpu_float(ctx, f) {
            return Ok(None);
        }
        let get = |n: &str| ctx.params.get(n);
        let w = get(&format!("{}.weight", self.conv.name))?;
        let b = self.conv.bias_of(ctx)?;
        let [cw, cb, dw, db] = self.pointwise_params(ctx)?;
        if w.device() != Device::Cpu || w.dtype() != f.dtype() {
            return Ok(None);
        }
        let ids = [cw.id(), cb.id(), dw.id(), db.id()];
        let (w2, b2) = {
            let mut joint = self.joint_head.lock().unwrap_or_else(|e| e.into_inner());
            match &*joint {
                Some((have, w2, b2)) if *have == ids => (w2.clone(), b2.clone()),
                _ => {
                    let w2 = ops::concat(&[cw, dw], 0)?;
                    let b2 = ops::concat(&[cb, db], 0)?;
                    *joint = Some((ids, w2.clone(), b2.clone()));
                    (w2, b2)
                }
            }
        };
        let splits = [self.cls_logits.cout, self.bbox_pred.cout];
        let outs = ops::conv2d::conv2d_relu_pointwise_cpu(
            f,
            (w, b),
            &self.conv.params,
            (&w2, Some(&b2)),
            &splits,
        )?;
        let [o, d]: [Tensor; 2] = outs
            .try_into()
            .map_err(|_| Error::invalid("rpn head", "expected two outputs"))?;
        Ok(Some([o, d]))
    }

    /// CPU f32 training (a tape records): the 3x3 conv with its bias and ReLU in the
    /// tile epilogue ([`ops::conv2d_bias_relu`], no separate ReLU pass), then the
    /// objectness and box-delta 1x1 convs as one 5A-channel conv (their weights
    /// concatenated, on the tape), which reads the 256-channel activation once
    /// instead of twice, split by channel. The same gradients as the unfused layers
    /// (tests/rpn_head_joint.rs). `None` where it does not apply (no tape, bf16, a
    /// device tensor).
    fn head_cpu_train(&self, ctx: &Ctx, f: &Tensor) -> Result<Option<[Tensor; 2]>> {
        if crate::nn::fold::fusable_plain() || !Self::cpu_float(ctx, f) {
            return Ok(None);
        }
        let get = |n: &str| ctx.params.get(n);
        let w = get(&format!("{}.weight", self.conv.name))?;
        let Some(b) = self.conv.bias_of(ctx)? else {
            return Ok(None);
        };
        if w.device() != Device::Cpu || w.dtype() != f.dtype() {
            return Ok(None);
        }
        let t = ops::conv2d_bias_relu(f, w, b, &self.conv.params)?;
        let [cw, cb, dw, db] = self.pointwise_params(ctx)?;
        let w2 = ops::concat(&[cw, dw], 0)?;
        let b2 = ops::concat(&[cb, db], 0)?;
        let y = ops::conv2d::conv2d(&t, &w2, Some(&b2), &self.cls_logits.params)?;
        drop(t);
        let a = self.cls_logits.cout;
        Ok(Some([
            ops::narrow(&y, 1, 0, a)?,
            ops::narrow(&y, 1, a, self.bbox_pred.cout)?,
        ]))
    }

    /// Anchors `[A, 4]` (f32, pixels) of one image of the batch on `device` (all
    /// images share them), level by level, generated there. `batch_hw` is the padded
    /// batch size, `grids` each level's (h, w).
    pub fn anchors(
        &self,
        batch_hw: (usize, usize),
        grids: &[(usize, usize)],
        device: Device,
    ) -> Result<Tensor> {
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
        self.anchor_generator.anchors(batch_hw, grids, device)
    }

    /// The selection settings of one mode (training or inference).
    pub fn proposal_params(&self, training: bool) -> ProposalParams {
        let cfg = &self.config;
        let (pre, post) = if training {
            (cfg.pre_nms_top_n_train, cfg.post_nms_top_n_train)
        } else {
            (cfg.pre_nms_top_n_test, cfg.post_nms_top_n_test)
        };
        ProposalParams {
            pre_nms_top_n: pre,
            post_nms_top_n: post,
            nms_thresh: cfg.nms_thresh,
            score_thresh: cfg.score_thresh,
            min_size: cfg.min_size,
        }
    }

    /// Proposals of the batch, padded (`boxes [N, post_nms_top_n, 4]` and `counts
    /// [N]` on the head's device), torchvision's `filter_proposals`: per level top-k
    /// on objectness, decode, clip, drop small boxes and low scores, NMS per level,
    /// keep the best `post_nms_top_n`. Reads nothing back from a CUDA device.
    pub fn proposals_padded(
        &self,
        head: &RpnHeadOutput,
        anchors: &Tensor,
        image_sizes: &[(usize, usize)],
        training: bool,
    ) -> Result<Selected> {
        let (obj, deltas) = crate::autograd::no_grad(|| flatten_head(head))?;
        let n = image_sizes.len();
        let a = anchors.dims().first().copied().unwrap_or(0);
        if obj.numel() != n * a {
            return Err(Error::shape(
                "rpn.proposals",
                format!(
                    "{} objectness values for {n} images of {a} anchors",
                    obj.numel()
                ),
            ));
        }
        let level_sizes: Vec<usize> = head
            .objectness
            .iter()
            .map(|o| o.numel() / n.max(1))
            .collect();
        select_proposals(
            &obj.reshape_detached([n, a])?,
            &deltas.reshape_detached([n, a, 4])?,
            anchors,
            &level_sizes,
            image_sizes,
            &self.proposal_params(training),
        )
    }

    /// Proposals per image (`[K_n, 4]` f32 on the head's device): [`Rpn::proposals_padded`]
    /// split by image, which reads the counts (one synchronisation on CUDA).
    pub fn proposals(
        &self,
        head: &RpnHeadOutput,
        anchors: &Tensor,
        image_sizes: &[(usize, usize)],
        training: bool,
    ) -> Result<Vec<Tensor>> {
        let sel = self.proposals_padded(head, anchors, image_sizes, training)?;
        sel.host_counts()?
            .into_iter()
            .enumerate()
            .map(|(n, k)| sel.image_boxes(n, k))
            .collect()
    }

    /// `loss_objectness` (BCE over sampled anchors) and `loss_rpn_box_reg` (smooth L1,
    /// beta `box_loss_beta`, over positives), both divided by the number of anchors
    /// sampled in the batch. Matching (with low-quality matches), sampling with the
    /// Philox keys of `seed` (stage [`STAGE_RPN`]) and the targets run on the
    /// anchors' device for all images at once, one launch per stage; the losses are
    /// weighted sums over every anchor (weight 0 where not sampled), so no size
    /// depends on the data and nothing is read back. With no anchor sampled in the
    /// batch both losses are 0 (torchvision: NaN).
    pub fn losses(
        &self,
        head: &RpnHeadOutput,
        anchors: &Tensor,
        tg: &PackedTargets,
        seed: u64,
    ) -> Result<(Tensor, Tensor)> {
        if let Some(l) = self.losses_cpu_sampled(head, anchors, tg, seed)? {
            return Ok(l);
        }
        let (obj, deltas) = flatten_head(head)?;
        let a = anchors.dims()[0];
        if obj.numel() != tg.images * a {
            return Err(Error::shape(
                "rpn.losses",
                format!(
                    "{} objectness values for {} images of {a} anchors",
                    obj.numel(),
                    tg.images
                ),
            ));
        }
        let (m, sel, counts) = self.match_and_sample(tg, anchors, a, seed)?;
        let t = rpn_targets(tg, anchors, &sel, &m.matched, &counts)?;
        let reg = self.coder.encode(&t.gt_boxes, &t.anchor_boxes)?;
        let bce = ops::bce_with_logits(&obj, &t.objectness, Reduction::None)?;
        let loss_obj = ops::sum(&ops::mul(&bce, &t.objectness_weight)?)?;
        let l1 = ops::smooth_l1(&deltas, &reg, self.config.box_loss_beta, Reduction::None)?;
        let loss_box = ops::sum(&ops::mul(&l1, &t.box_weight)?)?;
        Ok((loss_obj, loss_box))
    }

    /// The `a` anchors matched to the targets (objectness labels) and the balanced
    /// sample drawn from `seed`: (matches, selected indices, per-image counts).
    fn match_and_sample(
        &self,
        tg: &PackedTargets,
        anchors: &Tensor,
        a: usize,
        seed: u64,
    ) -> Result<(Matched, Tensor, Tensor)> {
        let cands = Candidates {
            boxes: anchors,
            stride: 0,
            counts: None,
            slots: a,
            append_gt: false,
        };
        let m = match_labels(tg, &cands, &self.matcher()?, LabelMode::Objectness)?;
        let (sel, counts) = sample(&m.labels, tg.images, self.sample_spec()?, seed, STAGE_RPN)?;
        Ok((m, sel, counts))
    }

    /// The RPN's matcher (low-quality matches allowed).
    fn matcher(&self) -> Result<Matcher> {
        Matcher::new(
            self.config.fg_iou_thresh as f64,
            self.config.bg_iou_thresh as f64,
            true,
        )
    }

    /// The RPN's balanced-sampling settings.
    fn sample_spec(&self) -> Result<SampleSpec> {
        SampleSpec::new(
            self.config.batch_size_per_image,
            self.config.positive_fraction,
        )
    }

    /// [`Rpn::losses`] on the CPU (f32 head, anchors and targets there): the same
    /// matching and sampling, then the losses over the sampled anchors only, read
    /// straight from the head's level maps (no flattened copy, no dense targets, only
    /// the positives encoded); the backward writes the sampled anchors' gradients
    /// into zeroed maps. The same values as the dense path, which stays the
    /// device's (tests/rpn_sampled_losses.rs). `None` where it does not apply.
    fn losses_cpu_sampled(
        &self,
        head: &RpnHeadOutput,
        anchors: &Tensor,
        tg: &PackedTargets,
        seed: u64,
    ) -> Result<Option<(Tensor, Tensor)>> {
        let cpu_f32 = |t: &Tensor| t.device() == Device::Cpu && t.dtype() == DType::F32;
        let all_cpu_f32 = cpu_f32(anchors)
            && cpu_f32(&tg.data)
            && head.objectness.iter().chain(&head.deltas).all(cpu_f32);
        if !all_cpu_f32 || head.objectness.len() != head.deltas.len() {
            return Ok(None);
        }
        let (n, a) = (tg.images, anchors.dims()[0]);
        // Per level: (anchors per location, h * w), checked against the deltas.
        let mut levels = Vec::with_capacity(head.objectness.len());
        for (o, d) in head.objectness.iter().zip(&head.deltas) {
            match (o.dims(), d.dims()) {
                (&[on, oa, oh, ow], &[dn, da, dh, dw])
                    if on == n && dn == n && da == 4 * oa && (dh, dw) == (oh, ow) =>
                {
                    levels.push((oa, oh * ow))
                }
                _ => {
                    return Err(Error::shape(
                        "rpn.losses",
                        format!(
                            "objectness {} and deltas {} for {n} images",
                            o.shape(),
                            d.shape()
                        ),
                    ))
                }
            }
        }
        if levels.iter().map(|&(k, hw)| k * hw).sum::<usize>() != a {
            return Err(Error::shape(
                "rpn.losses",
                format!("head maps of {levels:?} (anchors, h w) for {a} anchors"),
            ));
        }
        let (m, sel, counts) = self.match_and_sample(tg, anchors, a, seed)?;
        let (s, matched) = (sel.cpu_i64()?, m.matched.cpu_i64()?);
        let total: i64 = counts.cpu_i64()?.iter().sum();
        let w = if total > 0 { 1.0 / total as f32 } else { 0.0 };
        let (gt, anc) = (tg.data.cpu_slice::<f32>()?, anchors.cpu_slice::<f32>()?);
        let nl = levels.len();
        let (mut obj_at, mut obj_t) = (Vec::new(), Vec::new());
        let (mut del_at, mut pos_gt, mut pos_anchor) = (Vec::new(), Vec::new(), Vec::new());
        for img in 0..n {
            let mut start = 0;
            for (l, &(k, hw)) in levels.iter().enumerate() {
                let row = &s[img * a + start..img * a + start + k * hw];
                for (i, _) in row.iter().enumerate().filter(|(_, &v)| v >= 0) {
                    // Flattened order (location, base anchor); maps [N, K, H, W] and
                    // [N, 4K, H, W] (torchvision's concat_box_prediction_layers).
                    let (loc, b) = (i / k, i % k);
                    obj_at.push((l, (img * k + b) * hw + loc));
                    let pos = row[i] == 1;
                    obj_t.push(pos as u8 as f32);
                    if pos {
                        let (e, j) = (img * a + start + i, start + i);
                        for c in 0..4 {
                            del_at.push((nl + l, ((img * k + b) * 4 + c) * hw + loc));
                        }
                        let g = matched[e] as usize;
                        pos_gt.extend_from_slice(&gt[4 * g..4 * g + 4]);
                        pos_anchor.extend_from_slice(&anc[4 * j..4 * j + 4]);
                    }
                }
                start += k * hw;
            }
        }
        let p = pos_gt.len() / 4;
        let reg = self.coder.encode(
            &Tensor::from_vec(pos_gt, [p, 4])?,
            &Tensor::from_vec(pos_anchor, [p, 4])?,
        )?;
        let maps: Vec<&Tensor> = head.objectness.iter().chain(&head.deltas).collect();
        let loss_obj = ops::bce_with_logits_at(&maps, &obj_at, &obj_t, w)?;
        let loss_box = ops::smooth_l1_at(
            &maps,
            &del_at,
            reg.cpu_slice::<f32>()?,
            self.config.box_loss_beta,
            w,
        )?;
        Ok(Some((loss_obj, loss_box)))
    }

    /// Matches `[A]` (i64 on the anchors' device: GT index, -1 below 0.3, -2 between)
    /// of `anchors` `[A, 4]` to the GT boxes of `t` (box_iou and the Matcher with
    /// low-quality matches on the device).
    pub fn assign(&self, anchors: &Tensor, t: &Target) -> Result<Tensor> {
        let device = anchors.device();
        let g = t.boxes.len();
        let gt = Tensor::from_vec(
            t.boxes.iter().flatten().copied().collect::<Vec<f32>>(),
            [g, 4],
        )?
        .to_device(device)?;
        let matcher = Matcher::new(
            self.config.fg_iou_thresh as f64,
            self.config.bg_iou_thresh as f64,
            true,
        )?;
        matcher.matches(&box_iou(&gt, anchors)?)
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
