//! A recorded convolution with a frozen BatchNorm, the residual add and ReLU in its
//! tile epilogue: how a trainable ResNet block trains without separate norm, add and
//! ReLU passes, forward or backward.
//!
//! Forward: `y = act(conv2d(x, w) * scale + shift + residual)`, the epilogue of
//! [`super::conv2d_fused`] — the same arithmetic, in the same order, as the unfused
//! chain conv2d -> frozen_batch_norm -> add -> relu, so the output is that chain's
//! bit for bit. Backward, from the saved output alone (no pre-activation is kept):
//! `g1 = relu'(y) * gy` (gy itself without ReLU) is the residual's gradient, and
//! `g2 = g1 * scale + 0` (frozen_batch_norm's backward arithmetic) feeds the
//! convolution's input and weight gradients — one pass over the output where the
//! unfused backward makes two (ReLU's mask, the norm's scale) and a copy for the add.
//! The frozen `scale` and `shift` get no gradient.

use crate::autograd::{self, record};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::ops::conv2d::{conv2d_backward, Conv2dParams};
use crate::tensor::{DType, Element, Tensor};
use crate::with_dtype;
use rayon::prelude::*;

use super::{conv2d_fused, filled, Epilogue};

/// `act(conv2d(x, w) * scale[c] + shift[c] + residual)` recorded on the tape, with
/// `scale`/`shift` a frozen BatchNorm folded by [`crate::ops::fold_frozen_bn`]: x
/// `[N, Cin, H, W]`, w `[Cout, Cin, kh, kw]`, scale and shift `[Cout]`, residual
/// (optional) and output `[N, Cout, OH, OW]`; ReLU last when `relu`. f32 or f64 (the
/// CPU), f32 on a GPU. Gradients flow to x, w and the residual; `scale` and `shift`
/// are constants, and a tracked one is an error (a trainable affine needs the
/// unfused norm).
pub fn conv2d_frozen_bn_act(
    x: &Tensor,
    w: &Tensor,
    (scale, shift): (&Tensor, &Tensor),
    residual: Option<&Tensor>,
    relu: bool,
    p: &Conv2dParams,
) -> Result<Tensor> {
    const OP: &str = "conv2d_frozen_bn_act";
    if x.dtype() == DType::BF16 || w.dtype() == DType::BF16 {
        return Err(Error::DType {
            op: OP,
            dtype: "bf16".into(),
            msg: "trains in f32 or f64; bf16 training uses the unfused layers".into(),
        });
    }
    if autograd::is_tracked(scale) || autograd::is_tracked(shift) {
        return Err(Error::invalid(
            OP,
            "scale and shift are a frozen norm's constants; a trained affine needs frozen_batch_norm",
        ));
    }
    let ep = Epilogue {
        scale: Some(scale),
        shift: Some(shift),
        residual,
        relu,
        out_dtype: None,
    };
    let y = autograd::no_grad(|| conv2d_fused(x, w, p, &ep))?;
    let (xc, wc, yc, sc, pc) = (x.clone(), w.clone(), y.clone(), scale.clone(), *p);
    let mut inputs = vec![x, w];
    inputs.extend(residual);
    let has_residual = residual.is_some();
    record(OP, &inputs, &y, move |gy, needs| {
        let need_conv = needs[0] || needs[1];
        let need_res = has_residual && needs[2];
        let (g1, g2) = autograd::timed("conv2d_frozen_bn_act.mask", || {
            mask_and_scale(&yc, gy, &sc, relu, need_res, need_conv)
        })?;
        let mut out = match g2 {
            Some(g2) => {
                let g = conv2d_backward(&xc, &wc, &g2, &pc, [needs[0], needs[1], false])?;
                vec![g.gx, g.gw]
            }
            None => vec![None, None],
        };
        if has_residual {
            out.push(g1);
        }
        Ok(out)
    });
    Ok(y)
}

/// `(g1, g2)` of the backward (see the module doc): `g1 = relu'(y) * gy` when
/// `want_g1`, `g2 = g1 * scale + 0` when `want_g2`; one pass over `y` and `gy`.
fn mask_and_scale(
    y: &Tensor,
    gy: &Tensor,
    scale: &Tensor,
    relu: bool,
    want_g1: bool,
    want_g2: bool,
) -> Result<(Option<Tensor>, Option<Tensor>)> {
    const OP: &str = "conv2d_frozen_bn_act_backward";
    if gy.dims() != y.dims() || gy.dtype() != y.dtype() {
        return Err(Error::shape(
            OP,
            format!("gradient {} for output {}", gy.shape(), y.shape()),
        ));
    }
    // Without ReLU the residual's gradient is the upstream gradient itself.
    let g1_plain = (!relu && want_g1).then(|| gy.clone());
    if !(want_g2 || relu && want_g1) {
        return Ok((g1_plain, None));
    }
    let (c, hw) = (y.dims()[1], y.dims()[2..].iter().product::<usize>());
    match y.device() {
        Device::Cpu => with_dtype!(y.dtype(), T => {
            let (ys, gs, s) = (y.cpu_slice::<T>()?, gy.cpu_slice::<T>()?, scale.cpu_slice::<T>()?);
            let (g1, g2) = cpu_mask_and_scale(ys, gs, s, (c, hw), relu, want_g1, want_g2);
            let shape = y.shape().clone();
            let g1 = g1.map(|v| Tensor::from_vec(v, shape.clone())).transpose()?;
            let g2 = g2.map(|v| Tensor::from_vec(v, shape)).transpose()?;
            Ok((g1.or(g1_plain), g2))
        }),
        // A GPU runs the unfused pair (ReLU's mask, the norm's scale) on its kernels.
        Device::Cuda(_) => {
            let g1 = if relu {
                crate::ops::elementwise::relu_backward(y, gy)?
            } else {
                gy.clone()
            };
            let g2 = if want_g2 {
                let zero = filled(c, 0.0, y)?;
                Some(crate::ops::channel_affine(&g1, scale, &zero)?)
            } else {
                None
            };
            Ok((want_g1.then_some(g1), g2))
        }
    }
}

/// The CPU pass of [`mask_and_scale`], plane by plane (`dims` = (C, H*W)), each
/// buffer from the host pool and written in full.
///
/// Why one loop per case, each over equal-length slices and branch-free: the ReLU
/// mask is a data-dependent choice, and written as a branch (or with `relu` tested
/// per element) it did not vectorise and mispredicted on about half the elements
/// (4 ns per element with both outputs at 256x200x304, against ~1 ns a memory-bound
/// pass needs). A select on `y > 0` keeps the same values: `g` or `0`, then `* s + 0`.
fn cpu_mask_and_scale<T: Element>(
    y: &[T],
    gy: &[T],
    scale: &[T],
    (c, hw): (usize, usize),
    relu: bool,
    want_g1: bool,
    want_g2: bool,
) -> (Option<Vec<T>>, Option<Vec<T>>) {
    let mut g1 = (relu && want_g1).then(|| crate::tensor::pool::take::<T>(y.len()));
    let mut g2 = want_g2.then(|| crate::tensor::pool::take::<T>(y.len()));
    if hw == 0 || y.is_empty() {
        return (g1, g2);
    }
    let planes = y.par_chunks(hw).zip(gy.par_chunks(hw)).enumerate();
    match (g1.as_mut(), g2.as_mut()) {
        (Some(a), Some(b)) => planes
            .zip(a.par_chunks_mut(hw).zip(b.par_chunks_mut(hw)))
            .for_each(|((p, (yp, gp)), (ap, bp))| {
                relu_mask_scale_plane(yp, gp, scale[p % c], ap, bp)
            }),
        (Some(a), None) => planes
            .zip(a.par_chunks_mut(hw))
            .for_each(|((_, (yp, gp)), ap)| relu_mask_plane(yp, gp, ap)),
        (None, Some(b)) if relu => planes
            .zip(b.par_chunks_mut(hw))
            .for_each(|((p, (yp, gp)), bp)| relu_scale_plane(yp, gp, scale[p % c], bp)),
        (None, Some(b)) => planes
            .zip(b.par_chunks_mut(hw))
            .for_each(|((p, (_, gp)), bp)| scale_plane(gp, scale[p % c], bp)),
        (None, None) => {}
    }
    (g1, g2)
}

/// `g` where `y > 0`, else 0 (not a NaN `y`): relu's backward as a select.
#[inline(always)]
fn relu_mask<T: Element>(y: T, g: T) -> T {
    if y > T::zero() {
        g
    } else {
        T::zero()
    }
}

/// `g1 = relu'(y) * gy` and `g2 = g1 * s + 0` over one plane.
fn relu_mask_scale_plane<T: Element>(y: &[T], gy: &[T], s: T, g1: &mut [T], g2: &mut [T]) {
    let n = y.len();
    let (gy, g1, g2) = (&gy[..n], &mut g1[..n], &mut g2[..n]);
    for i in 0..n {
        let m = relu_mask(y[i], gy[i]);
        g1[i] = m;
        g2[i] = m * s + T::zero();
    }
}

/// `g1 = relu'(y) * gy` over one plane.
fn relu_mask_plane<T: Element>(y: &[T], gy: &[T], g1: &mut [T]) {
    let n = y.len();
    let (gy, g1) = (&gy[..n], &mut g1[..n]);
    for i in 0..n {
        g1[i] = relu_mask(y[i], gy[i]);
    }
}

/// `g2 = relu'(y) * gy * s + 0` over one plane.
fn relu_scale_plane<T: Element>(y: &[T], gy: &[T], s: T, g2: &mut [T]) {
    let n = y.len();
    let (gy, g2) = (&gy[..n], &mut g2[..n]);
    for i in 0..n {
        g2[i] = relu_mask(y[i], gy[i]) * s + T::zero();
    }
}

/// `g2 = gy * s + 0` over one plane (no ReLU).
fn scale_plane<T: Element>(gy: &[T], s: T, g2: &mut [T]) {
    let n = gy.len();
    let g2 = &mut g2[..n];
    for i in 0..n {
        g2[i] = gy[i] * s + T::zero();
    }
}
