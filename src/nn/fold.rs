//! Inference with fused epilogues: a BatchNorm in inference form (frozen, or a
//! BatchNorm2d in eval mode: both normalise with fixed statistics) is folded once
//! into a per-channel `(scale, shift)` and applied, with the residual add and ReLU,
//! inside the convolution's epilogue ([`crate::ops::conv2d_fused`]).
//!
//! Folds are cached per norm and per weight version: the cache remembers the
//! [`TensorId`]s of the four statistics tensors it folded, and an optimizer step or a
//! checkpoint load (which replace those tensors) makes it fold again.

use std::collections::HashMap;
use std::sync::Mutex;

use super::layers::{run_conv, run_linear};
use super::{Conv2d, Ctx, LayerOut, Linear, Norm2d, NormKind};
use crate::autograd;
use crate::error::{Error, Result};
use crate::ops::tc::chain::TcConv;
use crate::ops::tc::TcConvWeight;
use crate::ops::{self, Epilogue};
use crate::tensor::{Tensor, TensorId};

/// Folded `(scale, shift)` of norms by name, valid for the tensor ids recorded.
#[derive(Default)]
pub struct FoldCache(Mutex<HashMap<String, Fold>>);

/// The ids of a norm's (weight, bias, running_mean, running_var) and its fold.
type Fold = ([TensorId; 4], Tensor, Tensor);

impl Clone for FoldCache {
    /// An empty cache: folds are cheap to redo and tied to one parameter store.
    fn clone(&self) -> Self {
        FoldCache::default()
    }
}

impl std::fmt::Debug for FoldCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.0.lock().map(|m| m.len()).unwrap_or(0);
        write!(f, "FoldCache({n} folds)")
    }
}

impl FoldCache {
    /// Number of folds held (for tests).
    pub fn len(&self) -> usize {
        self.0.lock().map(|m| m.len()).unwrap_or(0)
    }

    /// True when nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// `(scale, shift)` of `norm` for the tensors now in `ctx`, folded at most once
    /// per weight version.
    pub fn folded(&self, ctx: &Ctx, norm: &Norm2d) -> Result<(Tensor, Tensor)> {
        let p = |s: &str| ctx.params.get(&format!("{}.{s}", norm.name));
        let (w, b, rm, rv) = (
            p("weight")?,
            p("bias")?,
            p("running_mean")?,
            p("running_var")?,
        );
        let ids = [w.id(), b.id(), rm.id(), rv.id()];
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((have, s, t)) = m.get(&norm.name) {
            if *have == ids {
                return Ok((s.clone(), t.clone()));
            }
        }
        let eps = match norm.kind {
            NormKind::Frozen { eps }
            | NormKind::FrozenStats { eps }
            | NormKind::Batch { eps, .. }
            | NormKind::SyncBatch { eps, .. } => eps,
        };
        // Kept while the weights stay: not of the step that folds them.
        let (s, t) = {
            let _long = crate::device::alloc::long_lived();
            ops::fold_frozen_bn(w, b, rm, rv, eps)?
        };
        m.insert(norm.name.clone(), (ids, s.clone(), t.clone()));
        Ok((s, t))
    }
}

/// The packed tensor-core convolutions (with their folded norm) of the bf16
/// inference chain ([`crate::ops::tc::chain`]), packed at most once per version of
/// the conv's weight and of its fold.
#[derive(Default)]
pub struct TcConvCache(Mutex<HashMap<String, ([TensorId; 3], TcConv)>>);

impl Clone for TcConvCache {
    /// An empty cache: packs are redone from the parameter store they belong to.
    fn clone(&self) -> Self {
        TcConvCache::default()
    }
}

impl std::fmt::Debug for TcConvCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.0.lock().map(|m| m.len()).unwrap_or(0);
        write!(f, "TcConvCache({n} convs)")
    }
}

impl TcConvCache {
    /// `conv` packed for the chain with `norm` folded into its epilogue (through
    /// `folds`), for the tensors now in `ctx`.
    pub fn conv(
        &self,
        ctx: &Ctx,
        folds: &FoldCache,
        (conv, norm): (&Conv2d, &Norm2d),
    ) -> Result<TcConv> {
        let w = ctx.params.get(&format!("{}.weight", conv.name))?;
        // The layer's bf16 copy (one per weight version, counted by `Bf16Weights`,
        // packed on CUDA) is what the chain multiplies by.
        let w16 = ctx.bf16_weight(&conv.name, w, true)?;
        let (scale, shift) = folds.folded(ctx, norm)?;
        let ids = [w16.bf16.id(), scale.id(), shift.id()];
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((have, c)) = m.get(&conv.name) {
            if *have == ids {
                return Ok(c.clone());
            }
        }
        let weight = match &w16.packed {
            Some(p) => p.clone(),
            None => TcConvWeight::new(&w16.bf16)?,
        };
        let c = TcConv {
            weight,
            scale: Some(scale),
            shift: Some(shift),
            params: conv.params,
        };
        m.insert(conv.name.clone(), (ids, c.clone()));
        Ok(c)
    }
}

/// Whether a forward may take the fused path: nothing is being recorded, and the
/// norms use fixed statistics (frozen, frozen statistics with a trained affine, or
/// BatchNorm2d outside training).
pub fn fusable(ctx: &Ctx, norm: NormKind) -> bool {
    !autograd::is_recording() && fixed_stats(ctx, norm)
}

/// Whether a norm normalises with fixed statistics in this pass (frozen, frozen
/// statistics with a trained affine, or BatchNorm2d outside training), so that it
/// folds into a per-channel `(scale, shift)`.
pub fn fixed_stats(ctx: &Ctx, norm: NormKind) -> bool {
    match norm {
        NormKind::Frozen { .. } | NormKind::FrozenStats { .. } => true,
        NormKind::Batch { .. } | NormKind::SyncBatch { .. } => !ctx.training,
    }
}

/// Whether a layer without a norm (FPN, RPN and box-head layers) may be fused.
pub fn fusable_plain() -> bool {
    !autograd::is_recording()
}

/// `relu?(bn(conv(x)) + residual)` in one pass over the output, with `bn` folded
/// through `cache`.
pub fn conv_bn_fused(
    ctx: &Ctx,
    cache: &FoldCache,
    (conv, norm): (&Conv2d, &Norm2d),
    x: &Tensor,
    residual: Option<&Tensor>,
    relu: bool,
) -> Result<Tensor> {
    if conv.bias {
        return Err(Error::invalid(
            "conv_bn_fused",
            format!("{} has a bias; a conv before a norm has none", conv.name),
        ));
    }
    let (scale, shift) = cache.folded(ctx, norm)?;
    let ep = Epilogue {
        scale: Some(&scale),
        shift: Some(&shift),
        residual,
        relu,
        out_dtype: None,
    };
    run_conv(ctx, conv, x, Some(ep), LayerOut::Activation)
}

/// `relu?(conv(x) + bias)` with the bias and ReLU in the conv's epilogue.
pub fn conv_fused(ctx: &Ctx, conv: &Conv2d, x: &Tensor, relu: bool) -> Result<Tensor> {
    let ep = Epilogue {
        shift: conv.bias_of(ctx)?,
        relu,
        ..Default::default()
    };
    run_conv(ctx, conv, x, Some(ep), LayerOut::Activation)
}

/// `relu?(x Wᵀ + b)` with the bias and ReLU in the product's epilogue.
pub fn linear_fused(ctx: &Ctx, lin: &Linear, x: &Tensor, relu: bool) -> Result<Tensor> {
    let b = ctx.params.get(&format!("{}.bias", lin.name))?;
    let ep = Epilogue {
        shift: Some(b),
        relu,
        ..Default::default()
    };
    run_linear(ctx, lin, x, Some(ep), LayerOut::Activation)
}
