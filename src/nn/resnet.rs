//! torchvision's ResNet (v1.5: stride on the 3x3 of a Bottleneck) as a detection
//! body: stem, layer1..layer4, returning the four stage outputs C2..C5.

use super::fold::{conv_bn_fused, fixed_stats, fusable, FoldCache, TcConvCache};
use super::{Conv2d, Ctx, Init, Norm2d, NormKind, ParamSpec};
use crate::autograd;
use crate::error::{Error, Result};
use crate::ops::tc::chain::TcActivation;
use crate::ops::{self, add, pool::max_pool2d, relu};
use crate::tensor::{DType, Tensor};

/// Residual block type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BlockKind {
    /// Two 3x3 convolutions (ResNet-18/34), expansion 1.
    Basic,
    /// 1x1, 3x3, 1x1 (ResNet-50/101), expansion 4.
    Bottleneck,
}

impl BlockKind {
    /// Output channels per `planes`.
    pub fn expansion(self) -> usize {
        match self {
            BlockKind::Basic => 1,
            BlockKind::Bottleneck => 4,
        }
    }
}

/// Shape and training of a ResNet body: the `[model.backbone]` section of a config.
///
/// In TOML, `depth = 50` stands for `block = "bottleneck"`, `layers = [3, 4, 6, 3]`
/// (explicit `block` / `layers` override it); `norm` is `"frozen_bn"`
/// (FrozenBatchNorm2d, torchvision's), `"batch_norm"` (batch statistics, trainable
/// affine: from-scratch training), `"sync_bn"` (as `"batch_norm"`, statistics over
/// every data-parallel rank: torch's SyncBatchNorm) or `"bn_eval"` (running statistics fixed, affine
/// trained: mmdetection's `norm_eval=True, requires_grad=True`), with `bn_eps` and
/// `bn_momentum`.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "ResNetToml", into = "ResNetToml")]
pub struct ResNetConfig {
    /// Residual block type.
    pub block: BlockKind,
    /// Blocks per stage, e.g. [3, 4, 6, 3] for ResNet-50.
    pub layers: [usize; 4],
    /// 64 for standard ResNets; the fixture model uses 16.
    pub width_per_group: usize,
    /// Normalisation of every conv.
    pub norm: NormKind,
    /// Stages trained, counted from the top: 0 (none) to 5 (all, stem included);
    /// torchvision's `trainable_backbone_layers`. The others are frozen by
    /// [`crate::detection::FasterRcnn::new`].
    pub trainable_layers: usize,
}

impl Default for ResNetConfig {
    /// torchvision's detection backbone: ResNet-50, frozen BatchNorm (eps 1e-5),
    /// three trainable stages.
    fn default() -> Self {
        ResNetConfig {
            trainable_layers: 3,
            ..ResNetConfig::depth(50).expect("50 is a ResNet depth")
        }
    }
}

impl ResNetConfig {
    /// ResNet-`depth` (18, 34, 50, 101, 152) with frozen BatchNorm (eps 1e-5), every
    /// stage trainable.
    pub fn depth(depth: usize) -> Result<Self> {
        let (block, layers) = Self::layers_of(depth).ok_or_else(|| {
            Error::invalid(
                "ResNetConfig::depth",
                format!("no ResNet-{depth} (18, 34, 50, 101, 152)"),
            )
        })?;
        Ok(ResNetConfig {
            block,
            layers,
            width_per_group: 64,
            norm: NormKind::Frozen { eps: 1e-5 },
            trainable_layers: 5,
        })
    }

    fn layers_of(depth: usize) -> Option<(BlockKind, [usize; 4])> {
        Some(match depth {
            18 => (BlockKind::Basic, [2, 2, 2, 2]),
            34 => (BlockKind::Basic, [3, 4, 6, 3]),
            50 => (BlockKind::Bottleneck, [3, 4, 6, 3]),
            101 => (BlockKind::Bottleneck, [3, 4, 23, 3]),
            152 => (BlockKind::Bottleneck, [3, 8, 36, 3]),
            _ => return None,
        })
    }

    /// Channels of C2..C5.
    pub fn out_channels(&self) -> [usize; 4] {
        let e = self.block.expansion();
        [64 * e, 128 * e, 256 * e, 512 * e]
    }

    /// Check what types cannot; the error names the key (`layers`).
    pub fn validate(&self) -> Result<()> {
        if self.layers.contains(&0) {
            return Err(crate::config::invalid(
                "layers",
                format!("{:?}: four stages of at least one block", self.layers),
            ));
        }
        crate::config::positive("width_per_group", self.width_per_group)?;
        if self.block == BlockKind::Basic && self.width_per_group != 64 {
            return Err(crate::config::invalid(
                "width_per_group",
                format!("{}: basic blocks need 64", self.width_per_group),
            ));
        }
        if self.trainable_layers > 5 {
            return Err(crate::config::invalid(
                "trainable_layers",
                format!("{} (0 to 5)", self.trainable_layers),
            ));
        }
        let (eps, momentum) = match self.norm {
            NormKind::Frozen { eps } | NormKind::FrozenStats { eps } => (eps, 0.1),
            NormKind::Batch { eps, momentum } | NormKind::SyncBatch { eps, momentum } => {
                (eps, momentum)
            }
        };
        if !(eps >= 0.0 && eps.is_finite()) {
            return Err(crate::config::invalid("bn_eps", format!("{eps}")));
        }
        if !(0.0..=1.0).contains(&momentum) {
            return Err(crate::config::invalid(
                "bn_momentum",
                format!("{momentum} is not in [0, 1]"),
            ));
        }
        Ok(())
    }
}

/// The normalisation names of `[model.backbone] norm`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
enum NormName {
    FrozenBn,
    BatchNorm,
    SyncBn,
    BnEval,
}

/// [`ResNetConfig`] as written in TOML (serde's `try_from`/`into` form): `depth` as a
/// shorthand, the norm as a name and numbers.
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
struct ResNetToml {
    #[serde(skip_serializing_if = "Option::is_none")]
    depth: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    block: Option<BlockKind>,
    #[serde(skip_serializing_if = "Option::is_none")]
    layers: Option<[usize; 4]>,
    width_per_group: usize,
    /// Groups of the 3x3 convolution (ResNeXt); only 1 is supported.
    groups: usize,
    trainable_layers: usize,
    norm: NormName,
    #[serde(alias = "frozen_bn_eps")]
    bn_eps: f64,
    bn_momentum: f64,
}

impl Default for ResNetToml {
    fn default() -> Self {
        ResNetConfig::default().into()
    }
}

impl From<ResNetConfig> for ResNetToml {
    fn from(c: ResNetConfig) -> Self {
        let (norm, bn_eps, bn_momentum) = match c.norm {
            NormKind::Frozen { eps } => (NormName::FrozenBn, eps, 0.1),
            NormKind::FrozenStats { eps } => (NormName::BnEval, eps, 0.1),
            NormKind::Batch { eps, momentum } => (NormName::BatchNorm, eps, momentum),
            NormKind::SyncBatch { eps, momentum } => (NormName::SyncBn, eps, momentum),
        };
        ResNetToml {
            depth: None,
            block: Some(c.block),
            layers: Some(c.layers),
            width_per_group: c.width_per_group,
            groups: 1,
            trainable_layers: c.trainable_layers,
            norm,
            bn_eps,
            bn_momentum,
        }
    }
}

impl TryFrom<ResNetToml> for ResNetConfig {
    type Error = String;

    fn try_from(t: ResNetToml) -> std::result::Result<Self, String> {
        let by_depth = match t.depth {
            None => None,
            Some(d) => Some(
                ResNetConfig::layers_of(d)
                    .ok_or_else(|| format!("depth {d} is not one of 18, 34, 50, 101, 152"))?,
            ),
        };
        let block = t
            .block
            .or(by_depth.map(|b| b.0))
            .ok_or("give `depth` or `block`")?;
        let layers = t
            .layers
            .or(by_depth.map(|b| b.1))
            .ok_or("give `depth` or `layers`")?;
        if t.groups != 1 {
            return Err(format!(
                "groups = {}: grouped convolutions are not supported",
                t.groups
            ));
        }
        let norm = match t.norm {
            NormName::FrozenBn => NormKind::Frozen { eps: t.bn_eps },
            NormName::BnEval => NormKind::FrozenStats { eps: t.bn_eps },
            NormName::BatchNorm => NormKind::Batch {
                eps: t.bn_eps,
                momentum: t.bn_momentum,
            },
            NormName::SyncBn => NormKind::SyncBatch {
                eps: t.bn_eps,
                momentum: t.bn_momentum,
            },
        };
        Ok(ResNetConfig {
            block,
            layers,
            width_per_group: t.width_per_group,
            norm,
            trainable_layers: t.trainable_layers,
        })
    }
}

struct Block {
    convs: Vec<(Conv2d, Norm2d)>,
    downsample: Option<(Conv2d, Norm2d)>,
}

/// The ResNet body.
pub struct ResNet {
    /// Its shape.
    pub config: ResNetConfig,
    stem: (Conv2d, Norm2d),
    stages: Vec<Vec<Block>>,
    /// Folded norms for the fused inference path.
    folds: FoldCache,
    /// Packed convs of the bf16 inference chain.
    tc_convs: TcConvCache,
}

/// He-normal (fan_out, relu), torchvision's ResNet init for convolutions.
fn kaiming_out(cout: usize, k: usize) -> Init {
    Init::Normal((2.0 / (cout * k * k) as f32).sqrt())
}

impl ResNet {
    /// A ResNet whose tensors are named `{prefix}conv1.weight`, `{prefix}layer1.0.conv1.weight`, ...
    pub fn new(prefix: &str, config: ResNetConfig) -> Result<ResNet> {
        if config.block == BlockKind::Basic && config.width_per_group != 64 {
            return Err(Error::invalid(
                "ResNet",
                "BasicBlock supports only width_per_group = 64",
            ));
        }
        let norm = |name: String, c: usize| Norm2d {
            name,
            c,
            kind: config.norm,
        };
        let conv = |name: String, cin: usize, cout: usize, k: usize, s: usize, p: usize| {
            Conv2d::new(name, cin, cout, k, s, p, false).with_init(kaiming_out(cout, k))
        };
        let stem = (
            conv(format!("{prefix}conv1"), 3, 64, 7, 2, 3),
            norm(format!("{prefix}bn1"), 64),
        );
        let mut inplanes = 64;
        let mut stages = Vec::new();
        for (si, &n) in config.layers.iter().enumerate() {
            let planes = 64 << si;
            let stride = if si == 0 { 1 } else { 2 };
            let mut blocks = Vec::new();
            for bi in 0..n {
                let s = if bi == 0 { stride } else { 1 };
                let p = format!("{prefix}layer{}.{bi}.", si + 1);
                let out = planes * config.block.expansion();
                let convs = match config.block {
                    BlockKind::Basic => vec![
                        (
                            conv(format!("{p}conv1"), inplanes, planes, 3, s, 1),
                            norm(format!("{p}bn1"), planes),
                        ),
                        (
                            conv(format!("{p}conv2"), planes, planes, 3, 1, 1),
                            norm(format!("{p}bn2"), planes),
                        ),
                    ],
                    BlockKind::Bottleneck => {
                        let width = planes * config.width_per_group / 64;
                        vec![
                            (
                                conv(format!("{p}conv1"), inplanes, width, 1, 1, 0),
                                norm(format!("{p}bn1"), width),
                            ),
                            (
                                conv(format!("{p}conv2"), width, width, 3, s, 1),
                                norm(format!("{p}bn2"), width),
                            ),
                            (
                                conv(format!("{p}conv3"), width, out, 1, 1, 0),
                                norm(format!("{p}bn3"), out),
                            ),
                        ]
                    }
                };
                let downsample = (s != 1 || inplanes != out).then(|| {
                    (
                        conv(format!("{p}downsample.0"), inplanes, out, 1, s, 0),
                        norm(format!("{p}downsample.1"), out),
                    )
                });
                blocks.push(Block { convs, downsample });
                inplanes = out;
            }
            stages.push(blocks);
        }
        Ok(ResNet {
            config,
            stem,
            stages,
            folds: FoldCache::default(),
            tc_convs: TcConvCache::default(),
        })
    }

    /// The tensors of the body.
    pub fn specs(&self, out: &mut Vec<ParamSpec>) {
        self.stem.0.specs(out);
        self.stem.1.specs(out);
        for b in self.stages.iter().flatten() {
            for (c, n) in b.convs.iter().chain(b.downsample.iter()) {
                c.specs(out);
                n.specs(out);
            }
        }
    }

    /// Prefixes of the tensors of the stem and the first `n` stages, for freezing
    /// (torchvision's `trainable_layers = 5 - n`... counted from the stem).
    pub fn stage_prefixes(&self, upto: usize) -> Vec<String> {
        let mut v = vec![self.stem.0.name.clone(), self.stem.1.name.clone()];
        for s in self.stages.iter().take(upto.saturating_sub(1)) {
            for b in s {
                for (c, n) in b.convs.iter().chain(b.downsample.iter()) {
                    v.push(c.name.clone() + ".");
                    v.push(n.name.clone() + ".");
                }
            }
        }
        v
    }

    /// `x` `[N, 3, H, W]` to [C2, C3, C4, C5]. Without a tape (and with norms that
    /// use fixed statistics) each conv runs with its norm, the residual add and ReLU
    /// fused into its epilogue ([`ResNet::forward_fused`]).
    pub fn forward(&self, ctx: &Ctx, x: &Tensor) -> Result<Vec<Tensor>> {
        if fusable(ctx, self.config.norm) {
            return self.forward_fused(ctx, x);
        }
        self.forward_unfused(ctx, x)
    }

    /// The inference forward: every conv + norm (+ residual) + ReLU is one pass over
    /// its output; the norms are folded once per weight version. Equal to
    /// [`ResNet::forward_unfused`] within f32 rounding; records nothing.
    pub fn forward_fused(&self, ctx: &Ctx, x: &Tensor) -> Result<Vec<Tensor>> {
        let f = &self.folds;
        let (c0, n0) = &self.stem;
        let x = conv_bn_fused(ctx, f, (c0, n0), x, None, true)?;
        let mut x = max_pool2d(&x, 3, 2, 1)?;
        if ctx.precision.is_bf16() {
            return self.blocks_chained(ctx, &x);
        }
        let mut outs = Vec::with_capacity(4);
        for stage in &self.stages {
            for b in stage {
                x = self.block_fused(ctx, b, &x)?;
            }
            outs.push(x.clone());
        }
        Ok(outs)
    }

    /// One block of [`ResNet::forward_fused`]: each conv with its folded norm, the
    /// residual add and ReLU in its epilogue.
    fn block_fused(&self, ctx: &Ctx, b: &Block, x: &Tensor) -> Result<Tensor> {
        let f = &self.folds;
        let identity = match &b.downsample {
            Some((c, n)) => conv_bn_fused(ctx, f, (c, n), x, None, false)?,
            None => x.clone(),
        };
        let last = b.convs.len() - 1;
        let mut h = x.clone();
        for (i, (c, n)) in b.convs.iter().enumerate() {
            let residual = (i == last).then_some(&identity);
            h = conv_bn_fused(ctx, f, (c, n), &h, residual, true)?;
        }
        Ok(h)
    }

    /// Whether a training forward may run these layers on input `x` by the fused
    /// inference path: their norms use fixed statistics and neither `x` nor any of
    /// their tensors is tracked by the active tape, so the unfused ops would record
    /// nothing either (torchvision's frozen stem and layer1, trainable_layers = 3).
    fn frozen_on_tape<'a>(
        &self,
        ctx: &Ctx,
        x: &Tensor,
        layers: impl IntoIterator<Item = &'a (Conv2d, Norm2d)>,
    ) -> Result<bool> {
        if autograd::is_tracked(x) || !fixed_stats(ctx, self.config.norm) {
            return Ok(false);
        }
        for (c, n) in layers {
            let names = [
                format!("{}.weight", c.name),
                format!("{}.weight", n.name),
                format!("{}.bias", n.name),
            ];
            for name in names {
                if autograd::is_tracked(ctx.params.get(&name)?) {
                    return Ok(false);
                }
            }
        }
        Ok(true)
    }

    /// The blocks of the bf16 inference forward as one tensor-core chain: the pooled
    /// stem output is packed to channels-last bf16 once, every block is then its
    /// convs' launches and nothing else (a bottleneck three, four with a
    /// downsample: the norms folded, ReLU and the residual add in the epilogues),
    /// and each stage's output is unpacked once for the FPN. Equal to the unchained
    /// bf16 path bit for bit (the same kernels and epilogues; see tests/tc_chain.rs).
    pub fn blocks_chained(&self, ctx: &Ctx, x: &Tensor) -> Result<Vec<Tensor>> {
        let (f, t) = (&self.folds, &self.tc_convs);
        let mut a = TcActivation::from_nchw(x)?;
        let mut outs = Vec::with_capacity(4);
        for stage in &self.stages {
            for b in stage {
                let identity = match &b.downsample {
                    Some((c, n)) => Some(t.conv(ctx, f, (c, n))?.forward(&a, None, false)?),
                    None => None,
                };
                let last = b.convs.len() - 1;
                let mut h: Option<TcActivation> = None;
                for (i, (c, n)) in b.convs.iter().enumerate() {
                    let input = h.as_ref().unwrap_or(&a);
                    let residual = (i == last).then(|| identity.as_ref().unwrap_or(&a));
                    h = Some(t.conv(ctx, f, (c, n))?.forward(input, residual, true)?);
                }
                a = h.ok_or_else(|| Error::invalid("resnet", "a block without convs"))?;
            }
            outs.push(a.to_nchw(DType::BF16)?);
        }
        Ok(outs)
    }

    /// The recorded forward (training): each conv with its norm, the residual add and
    /// ReLU ([`ResNet::conv_bn_recorded`]: one recorded op with a frozen norm on the
    /// CPU, separate ops otherwise). Frozen layers at the bottom (nothing tracked, see
    /// [`ResNet::frozen_on_tape`]) run the fused inference path instead: they
    /// record nothing either way, and the fused path makes one pass over each
    /// output instead of three or four.
    pub fn forward_unfused(&self, ctx: &Ctx, x: &Tensor) -> Result<Vec<Tensor>> {
        let x = if self.frozen_on_tape(ctx, x, [&self.stem])? {
            let (c0, n0) = &self.stem;
            autograd::no_grad(|| conv_bn_fused(ctx, &self.folds, (c0, n0), x, None, true))?
        } else {
            self.conv_bn_recorded(ctx, &self.stem, x, None, true)?
        };
        let mut x = max_pool2d(&x, 3, 2, 1)?;
        let mut outs = Vec::with_capacity(4);
        for stage in &self.stages {
            for b in stage {
                if self.frozen_on_tape(ctx, &x, b.convs.iter().chain(b.downsample.iter()))? {
                    x = autograd::no_grad(|| self.block_fused(ctx, b, &x))?;
                    continue;
                }
                let identity = match &b.downsample {
                    Some(cn) => self.conv_bn_recorded(ctx, cn, &x, None, false)?,
                    None => x.clone(),
                };
                let mut h = x;
                let last = b.convs.len() - 1;
                for (i, cn) in b.convs.iter().enumerate() {
                    let residual = (i == last).then_some(&identity);
                    h = self.conv_bn_recorded(ctx, cn, &h, residual, true)?;
                }
                x = h;
            }
            outs.push(x.clone());
        }
        Ok(outs)
    }

    /// `relu?(norm(conv(x)) + residual)`, recorded. With a frozen norm on the CPU in
    /// f32/f64 ([`ResNet::fuses_on_tape`]) it is one op,
    /// [`ops::conv2d_frozen_bn_act`]: the norm, the add and ReLU in the conv's
    /// epilogue and in one pass of its backward, equal to the unfused ops bit for
    /// bit. Otherwise (batch statistics, a trained affine, bf16, a GPU) the conv,
    /// norm, add and ReLU are separate recorded ops.
    fn conv_bn_recorded(
        &self,
        ctx: &Ctx,
        (c, n): &(Conv2d, Norm2d),
        x: &Tensor,
        residual: Option<&Tensor>,
        act: bool,
    ) -> Result<Tensor> {
        if self.fuses_on_tape(ctx, x, (c, n))? {
            let w = ctx.params.get(&format!("{}.weight", c.name))?;
            let (scale, shift) = self.folds.folded(ctx, n)?;
            return ops::conv2d_frozen_bn_act(x, w, (&scale, &shift), residual, act, &c.params);
        }
        let mut h = n.forward(ctx, &c.forward(ctx, x)?)?;
        if let Some(r) = residual {
            h = add(&h, r)?;
        }
        if act {
            h = relu(&h)?;
        }
        Ok(h)
    }

    /// Whether [`ResNet::conv_bn_recorded`] may fuse: a frozen norm whose tensors
    /// nothing tracks (its affine is not trained), a conv without a bias, f32 or
    /// f64 activations on the CPU. The device paths keep the unfused ops.
    fn fuses_on_tape(&self, ctx: &Ctx, x: &Tensor, (c, n): (&Conv2d, &Norm2d)) -> Result<bool> {
        if !matches!(n.kind, NormKind::Frozen { .. })
            || c.bias
            || ctx.precision.is_bf16()
            || x.device() != crate::Device::Cpu
            || !matches!(x.dtype(), DType::F32 | DType::F64)
        {
            return Ok(false);
        }
        for s in ["weight", "bias", "running_mean", "running_var"] {
            if autograd::is_tracked(ctx.params.get(&format!("{}.{s}", n.name))?) {
                return Ok(false);
            }
        }
        Ok(true)
    }
}
