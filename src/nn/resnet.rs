//! torchvision's ResNet (v1.5: stride on the 3x3 of a Bottleneck) as a detection
//! body: stem, layer1..layer4, returning the four stage outputs C2..C5.

use super::fold::{conv_bn_fused, fusable, FoldCache};
use super::{Conv2d, Ctx, Init, Norm2d, NormKind, ParamSpec};
use crate::error::{Error, Result};
use crate::ops::{add, pool::max_pool2d, relu};
use crate::tensor::Tensor;

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

/// Shape of a ResNet.
#[derive(Clone, Debug, PartialEq)]
pub struct ResNetConfig {
    pub block: BlockKind,
    /// Blocks per stage, e.g. [3, 4, 6, 3] for ResNet-50.
    pub layers: [usize; 4],
    /// 64 for standard ResNets; the fixture model uses 16.
    pub width_per_group: usize,
    /// Normalisation of every conv.
    pub norm: NormKind,
}

impl ResNetConfig {
    /// ResNet-`depth` (18, 34, 50, 101, 152) with frozen BatchNorm (eps 1e-5).
    pub fn depth(depth: usize) -> Result<Self> {
        let (block, layers) = match depth {
            18 => (BlockKind::Basic, [2, 2, 2, 2]),
            34 => (BlockKind::Basic, [3, 4, 6, 3]),
            50 => (BlockKind::Bottleneck, [3, 4, 6, 3]),
            101 => (BlockKind::Bottleneck, [3, 4, 23, 3]),
            152 => (BlockKind::Bottleneck, [3, 8, 36, 3]),
            _ => {
                return Err(Error::invalid(
                    "ResNetConfig::depth",
                    format!("no ResNet-{depth}"),
                ))
            }
        };
        Ok(ResNetConfig {
            block,
            layers,
            width_per_group: 64,
            norm: NormKind::Frozen { eps: 1e-5 },
        })
    }

    /// Channels of C2..C5.
    pub fn out_channels(&self) -> [usize; 4] {
        let e = self.block.expansion();
        [64 * e, 128 * e, 256 * e, 512 * e]
    }
}

struct Block {
    convs: Vec<(Conv2d, Norm2d)>,
    downsample: Option<(Conv2d, Norm2d)>,
}

/// The ResNet body.
pub struct ResNet {
    pub config: ResNetConfig,
    stem: (Conv2d, Norm2d),
    stages: Vec<Vec<Block>>,
    /// Folded norms for the fused inference path.
    folds: FoldCache,
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
        let mut outs = Vec::with_capacity(4);
        for stage in &self.stages {
            for b in stage {
                let identity = match &b.downsample {
                    Some((c, n)) => conv_bn_fused(ctx, f, (c, n), &x, None, false)?,
                    None => x.clone(),
                };
                let last = b.convs.len() - 1;
                let mut h = x;
                for (i, (c, n)) in b.convs.iter().enumerate() {
                    let residual = (i == last).then_some(&identity);
                    h = conv_bn_fused(ctx, f, (c, n), &h, residual, true)?;
                }
                x = h;
            }
            outs.push(x.clone());
        }
        Ok(outs)
    }

    /// The recorded forward: conv, norm, add and ReLU as separate ops (training).
    pub fn forward_unfused(&self, ctx: &Ctx, x: &Tensor) -> Result<Vec<Tensor>> {
        let x = relu(&self.stem.1.forward(ctx, &self.stem.0.forward(ctx, x)?)?)?;
        let mut x = max_pool2d(&x, 3, 2, 1)?;
        let mut outs = Vec::with_capacity(4);
        for stage in &self.stages {
            for b in stage {
                let identity = match &b.downsample {
                    Some((c, n)) => n.forward(ctx, &c.forward(ctx, &x)?)?,
                    None => x.clone(),
                };
                let mut h = x;
                let last = b.convs.len() - 1;
                for (i, (c, n)) in b.convs.iter().enumerate() {
                    h = n.forward(ctx, &c.forward(ctx, &h)?)?;
                    if i != last {
                        h = relu(&h)?;
                    }
                }
                x = relu(&add(&h, &identity)?)?;
            }
            outs.push(x.clone());
        }
        Ok(outs)
    }
}
