//! Conv2d, Linear and the two BatchNorms, as torchvision names their tensors.

use super::{Ctx, Init, LayerOut, ParamSpec};
use crate::error::Result;
use crate::ops::conv2d::{conv2d, Conv2dParams};
use crate::ops::linear::linear;
use crate::ops::norm::{batch_norm, frozen_batch_norm, BatchNormConfig};
use crate::ops::{self, mixed, Epilogue};
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
    /// `x` `[N, cin, H, W]` to `[N, cout, OH, OW]`, an activation for the next layer
    /// (bf16 under [`super::Precision::Bf16`]).
    pub fn forward(&self, ctx: &Ctx, x: &Tensor) -> Result<Tensor> {
        run_conv(ctx, self, x, None, LayerOut::Activation)
    }
    /// [`Conv2d::forward`] for a layer whose output feeds box coding, scores or a
    /// loss: f32 in every precision.
    pub fn forward_head(&self, ctx: &Ctx, x: &Tensor) -> Result<Tensor> {
        run_conv(ctx, self, x, None, LayerOut::Head)
    }
    /// The layer's bias, if it has one.
    pub(crate) fn bias_of<'c>(&self, ctx: &Ctx<'c>) -> Result<Option<&'c Tensor>> {
        if self.bias {
            Ok(Some(ctx.params.get(&format!("{}.bias", self.name))?))
        } else {
            Ok(None)
        }
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
    /// `x` `[N, in]` to `[N, out]`, an activation for the next layer.
    pub fn forward(&self, ctx: &Ctx, x: &Tensor) -> Result<Tensor> {
        run_linear(ctx, self, x, None, LayerOut::Activation)
    }
    /// [`Linear::forward`] for a layer whose output feeds softmax, box coding or a
    /// loss (the box predictor): f32 in every precision.
    pub fn forward_head(&self, ctx: &Ctx, x: &Tensor) -> Result<Tensor> {
        run_linear(ctx, self, x, None, LayerOut::Head)
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
        // bf16 activations are normalised in f32 and rounded back (the statistics
        // and the affine are f32 parameters).
        // Frozen batch norm takes bf16 natively (its tape keeps the bf16 input).
        let native = matches!(self.kind, NormKind::Frozen { .. });
        if !native {
            if let Some(y) = mixed::bf16_via_f32("norm", &[x], |v| self.forward(ctx, &v[0]))? {
                return Ok(y);
            }
        }
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

/// The one place every convolution layer of the model is launched, so the launch
/// path changes here alone. `ep` is `None` for the plain recorded layer (conv + bias)
/// and the fused epilogue for inference ([`super::fold`]); `out` says what the
/// output feeds. f32: the f32 ops, as before the policy existed. bf16: the
/// tensor-core op with f32 accumulation, the bf16 copy of the weight, the epilogue
/// fused, and the output dtype the policy gives `out`.
pub(crate) fn run_conv(
    ctx: &Ctx,
    conv: &Conv2d,
    x: &Tensor,
    ep: Option<Epilogue>,
    out: LayerOut,
) -> Result<Tensor> {
    let w = ctx.params.get(&format!("{}.weight", conv.name))?;
    let b = conv.bias_of(ctx)?;
    if !ctx.precision.is_bf16() {
        return match ep {
            None => conv2d(x, w, b, &conv.params),
            Some(ep) => ops::conv2d_fused(x, w, &conv.params, &ep),
        };
    }
    let w16 = ctx.bf16_weight(&conv.name, w, true)?;
    let ep = Epilogue {
        out_dtype: Some(ctx.precision.out_dtype(out)),
        ..ep.unwrap_or(Epilogue {
            shift: b,
            ..Default::default()
        })
    };
    mixed::conv2d_bf16(x, w, &w16, &conv.params, &ep)
}

/// The one place every linear layer is launched (see [`run_conv`]).
pub(crate) fn run_linear(
    ctx: &Ctx,
    lin: &Linear,
    x: &Tensor,
    ep: Option<Epilogue>,
    out: LayerOut,
) -> Result<Tensor> {
    let w = ctx.params.get(&format!("{}.weight", lin.name))?;
    let b = ctx.params.get(&format!("{}.bias", lin.name))?;
    if !ctx.precision.is_bf16() {
        return match ep {
            None => linear(x, w, Some(b)),
            Some(ep) => ops::linear_fused(x, w, &ep),
        };
    }
    let w16 = ctx.bf16_weight(&lin.name, w, false)?;
    let ep = Epilogue {
        out_dtype: Some(ctx.precision.out_dtype(out)),
        ..ep.unwrap_or(Epilogue {
            shift: Some(b),
            ..Default::default()
        })
    };
    mixed::linear_bf16(x, w, &w16, &ep)
}
