//! Conv2d, Linear and the two BatchNorms, as torchvision names their tensors.

use super::{Ctx, Init, ParamSpec};
use crate::error::Result;
use crate::ops::conv2d::{conv2d, Conv2dParams};
use crate::ops::linear::linear;
use crate::ops::norm::{batch_norm, frozen_batch_norm, BatchNormConfig};
use crate::tensor::Tensor;

/// A convolution whose tensors are `{name}.weight` `[cout, cin, kh, kw]` and, with a
/// bias, `{name}.bias` `[cout]`.
#[derive(Clone, Debug)]
pub struct Conv2d {
    /// Prefix of the tensor names, e.g. `backbone.conv1`.
    pub name: String,
    /// Input channels.
    pub cin: usize,
    /// Output channels.
    pub cout: usize,
    /// Kernel size `(kh, kw)`.
    pub kernel: (usize, usize),
    /// Stride, padding and dilation.
    pub params: Conv2dParams,
    /// Whether the layer has a `{name}.bias`.
    pub bias: bool,
    /// Initialiser of the weight for training from scratch.
    pub init: Init,
}

impl Conv2d {
    /// A square-kernel convolution with PyTorch's default initialiser.
    pub fn new(
        name: impl Into<String>,
        cin: usize,
        cout: usize,
        k: usize,
        stride: usize,
        padding: usize,
        bias: bool,
    ) -> Self {
        let bound = 1.0 / ((cin * k * k) as f32).sqrt();
        Conv2d {
            name: name.into(),
            cin,
            cout,
            kernel: (k, k),
            params: Conv2dParams::new(stride, padding, 1),
            bias,
            init: Init::Uniform(bound),
        }
    }
    /// Use `init` for the weight.
    pub fn with_init(mut self, init: Init) -> Self {
        self.init = init;
        self
    }
    /// `x` `[N, cin, H, W]` to `[N, cout, OH, OW]`.
    pub fn forward(&self, ctx: &Ctx, x: &Tensor) -> Result<Tensor> {
        let w = ctx.params.get(&format!("{}.weight", self.name))?;
        let b = if self.bias {
            Some(ctx.params.get(&format!("{}.bias", self.name))?)
        } else {
            None
        };
        conv2d(x, w, b, &self.params)
    }
    /// The tensors this layer expects.
    pub fn specs(&self, out: &mut Vec<ParamSpec>) {
        let (kh, kw) = self.kernel;
        out.push(ParamSpec::param(
            format!("{}.weight", self.name),
            [self.cout, self.cin, kh, kw],
            self.init,
        ));
        if self.bias {
            let bias_init = match self.init {
                Init::Uniform(_) => Init::Uniform(1.0 / ((self.cin * kh * kw) as f32).sqrt()),
                _ => Init::Const(0.0),
            };
            out.push(ParamSpec::param(
                format!("{}.bias", self.name),
                [self.cout],
                bias_init,
            ));
        }
    }
}

/// `y = x W^T + b` with `{name}.weight` `[out, in]` and `{name}.bias` `[out]`.
#[derive(Clone, Debug)]
pub struct Linear {
    /// Prefix of the tensor names, e.g. `roi_heads.box_head.fc6`.
    pub name: String,
    /// Input features.
    pub fin: usize,
    /// Output features.
    pub fout: usize,
    /// Initialiser of the weight for training from scratch.
    pub init: Init,
}

impl Linear {
    /// A linear layer with PyTorch's default initialiser.
    pub fn new(name: impl Into<String>, fin: usize, fout: usize) -> Self {
        Linear {
            name: name.into(),
            fin,
            fout,
            init: Init::Uniform(1.0 / (fin as f32).sqrt()),
        }
    }
    /// Use `init` for the weight (the bias then starts at zero).
    pub fn with_init(mut self, init: Init) -> Self {
        self.init = init;
        self
    }
    /// `x` `[N, in]` to `[N, out]`.
    pub fn forward(&self, ctx: &Ctx, x: &Tensor) -> Result<Tensor> {
        let w = ctx.params.get(&format!("{}.weight", self.name))?;
        let b = ctx.params.get(&format!("{}.bias", self.name))?;
        linear(x, w, Some(b))
    }
    /// The tensors this layer expects.
    pub fn specs(&self, out: &mut Vec<ParamSpec>) {
        out.push(ParamSpec::param(
            format!("{}.weight", self.name),
            [self.fout, self.fin],
            self.init,
        ));
        let bias_init = match self.init {
            Init::Uniform(_) => Init::Uniform(1.0 / (self.fin as f32).sqrt()),
            _ => Init::Const(0.0),
        };
        out.push(ParamSpec::param(
            format!("{}.bias", self.name),
            [self.fout],
            bias_init,
        ));
    }
}

/// Which normalisation a [`Norm2d`] applies.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum NormKind {
    /// FrozenBatchNorm2d: fixed statistics and affine (torchvision's detection default).
    Frozen {
        /// Added to the variance before the square root.
        eps: f64,
    },
    /// BatchNorm2d: batch statistics in training, running ones in eval.
    Batch {
        /// Added to the variance before the square root.
        eps: f64,
        /// Running-statistics update, `momentum * batch + (1 - momentum) * running`.
        momentum: f64,
    },
    /// SyncBatchNorm: [`NormKind::Batch`] whose training statistics cover every
    /// data-parallel rank's batch (`kestrel::dist::sync_batch_norm`); plain batch
    /// norm outside a data-parallel run.
    SyncBatch {
        /// Added to the variance before the square root.
        eps: f64,
        /// Running-statistics update, `momentum * batch + (1 - momentum) * running`.
        momentum: f64,
    },
    /// BatchNorm2d kept in eval mode (running statistics fixed) with a trainable
    /// affine: mmdetection's ResNet with `norm_eval=True, requires_grad=True`.
    FrozenStats {
        /// Added to the variance before the square root.
        eps: f64,
    },
}

/// A batch norm over `c` channels with `{name}.weight/bias/running_mean/running_var`.
#[derive(Clone, Debug)]
pub struct Norm2d {
    /// Prefix of the tensor names, e.g. `backbone.bn1`.
    pub name: String,
    /// Number of channels `C` (of an `[N, C, H, W]` input).
    pub c: usize,
    /// Which normalisation, and its settings.
    pub kind: NormKind,
}

impl Norm2d {
    /// `x` `[N, c, H, W]` normalised per channel.
    pub fn forward(&self, ctx: &Ctx, x: &Tensor) -> Result<Tensor> {
        let p = |s: &str| ctx.params.get(&format!("{}.{s}", self.name));
        let (w, b, rm, rv) = (
            p("weight")?,
            p("bias")?,
            p("running_mean")?,
            p("running_var")?,
        );
        match self.kind {
            NormKind::Frozen { eps } => frozen_batch_norm(x, w, b, rm, rv, eps),
            // Eval-mode batch norm: the running statistics normalise, and its
            // backward still reaches weight and bias.
            NormKind::FrozenStats { eps } => Ok(batch_norm(
                x,
                w,
                b,
                rm,
                rv,
                BatchNormConfig {
                    training: false,
                    momentum: 0.0,
                    eps,
                },
            )?
            .y),
            NormKind::Batch { eps, momentum } | NormKind::SyncBatch { eps, momentum } => {
                let cfg = BatchNormConfig {
                    training: ctx.training,
                    momentum,
                    eps,
                };
                let out = if matches!(self.kind, NormKind::SyncBatch { .. }) {
                    crate::dist::sync_batch_norm(x, w, b, rm, rv, cfg)?
                } else {
                    batch_norm(x, w, b, rm, rv, cfg)?
                };
                if ctx.training {
                    let mut u = ctx.buffer_updates.borrow_mut();
                    u.push((format!("{}.running_mean", self.name), out.running_mean));
                    u.push((format!("{}.running_var", self.name), out.running_var));
                }
                Ok(out.y)
            }
        }
    }
    /// The tensors this layer expects. Frozen norms' affine is not trained.
    pub fn specs(&self, out: &mut Vec<ParamSpec>) {
        let c = self.c;
        match self.kind {
            NormKind::Frozen { .. } => {
                out.push(ParamSpec::buffer(
                    format!("{}.weight", self.name),
                    [c],
                    Init::Const(1.0),
                ));
                out.push(ParamSpec::buffer(
                    format!("{}.bias", self.name),
                    [c],
                    Init::Const(0.0),
                ));
            }
            NormKind::Batch { .. } | NormKind::SyncBatch { .. } | NormKind::FrozenStats { .. } => {
                out.push(ParamSpec::param(
                    format!("{}.weight", self.name),
                    [c],
                    Init::Const(1.0),
                ));
                out.push(ParamSpec::param(
                    format!("{}.bias", self.name),
                    [c],
                    Init::Const(0.0),
                ));
            }
        }
        out.push(ParamSpec::buffer(
            format!("{}.running_mean", self.name),
            [c],
            Init::Const(0.0),
        ));
        out.push(ParamSpec::buffer(
            format!("{}.running_var", self.name),
            [c],
            Init::Const(1.0),
        ));
    }
}
