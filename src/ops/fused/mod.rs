//! Convolution and linear layers with a fused epilogue:
//! `y = act(acc * scale[c] + shift[c] + residual)`, where `acc` is the plain product.
//!
//! This is how inference runs a ResNet block: frozen BatchNorm folded once into a
//! per-channel `(scale, shift)` ([`crate::ops::norm::fold_frozen_bn`]), a bias as
//! `shift` alone, the residual add and ReLU applied while the output tile is hot.
//! The API is device-independent; [`cpu`] and [`cuda`] hold the implementations.
//! These ops record no backward: under an active tape they are refused, and training
//! uses the unfused, recorded ops; [`conv2d_bias_relu`] and [`conv2d_frozen_bn_act`]
//! (frozen_bn.rs) are the exceptions (their backward is the unfused chain's).

mod cpu;
mod cuda;
mod frozen_bn;

pub use frozen_bn::conv2d_frozen_bn_act;

use crate::autograd;
use crate::error::{Error, Result};
use crate::ops::conv2d::Conv2dParams;
use crate::tensor::{DType, Tensor};
use crate::Device;

/// What the epilogue applies to each output element of channel (column) `c`, in order:
/// `v = acc * scale[c]` (if scale), `+ shift[c]` (if shift), `+ residual` (if given,
/// same shape as the output), then `max(v, 0)` if `relu`.
#[derive(Clone, Copy, Debug, Default)]
pub struct Epilogue<'a> {
    /// Per-output-channel multiplier `[Cout]` (a folded frozen BN's scale).
    pub scale: Option<&'a Tensor>,
    /// Per-output-channel offset `[Cout]` (a bias, or a folded BN's shift).
    pub shift: Option<&'a Tensor>,
    /// Added after the affine part; shape of the output.
    pub residual: Option<&'a Tensor>,
    /// Apply ReLU last.
    pub relu: bool,
    /// Output dtype; `None` means the input's.
    pub out_dtype: Option<DType>,
}

impl Epilogue<'_> {
    pub(crate) fn check(
        &self,
        op: &'static str,
        cout: usize,
        out_dims: &[usize],
        device: Device,
    ) -> Result<()> {
        for (name, t) in [("scale", self.scale), ("shift", self.shift)] {
            if let Some(t) = t {
                if t.dims() != [cout] {
                    return Err(Error::shape(
                        op,
                        format!("epilogue {name} {} (expected [{cout}])", t.shape()),
                    ));
                }
                if t.device() != device {
                    return Err(Error::shape(
                        op,
                        format!("epilogue {name} on another device"),
                    ));
                }
            }
        }
        if let Some(r) = self.residual {
            if r.dims() != out_dims {
                return Err(Error::shape(
                    op,
                    format!("epilogue residual {} (expected {out_dims:?})", r.shape()),
                ));
            }
            if r.device() != device {
                return Err(Error::shape(
                    op,
                    "epilogue residual on another device".to_string(),
                ));
            }
        }
        Ok(())
    }
}

fn refuse_on_tape(op: &'static str) -> Result<()> {
    if autograd::is_recording() {
        return Err(Error::shape(
            op,
            "fused ops record no backward; use the unfused ops under a tape".to_string(),
        ));
    }
    Ok(())
}

/// `act(conv2d(x, w) * scale + shift + residual)`: x `[N, Cin, H, W]`, w
/// `[Cout, Cin, kh, kw]`, output `[N, Cout, OH, OW]`. Inference only.
pub fn conv2d_fused(x: &Tensor, w: &Tensor, p: &Conv2dParams, ep: &Epilogue) -> Result<Tensor> {
    const OP: &str = "conv2d_fused";
    refuse_on_tape(OP)?;
    let (n, _, h, wd) = dims4(OP, x)?;
    let (cout, _, kh, kw) = dims4(OP, w)?;
    let (oh, ow) = crate::ops::conv2d::conv2d_output_size((h, wd), (kh, kw), p)
        .ok_or_else(|| Error::shape(OP, format!("kernel {kh}x{kw} does not fit input {h}x{wd}")))?;
    ep.check(OP, cout, &[n, cout, oh, ow], x.device())?;
    match x.device() {
        // bf16 operands or output: the tensor-core semantics (ops::tc), whose CPU
        // side is the rounding reference.
        Device::Cpu if crate::ops::tc::wants_bf16(x, w, ep) => {
            crate::ops::tc::conv2d_bf16_reference(x, w, p, ep)
        }
        Device::Cpu => cpu::conv2d_fused(x, w, p, ep),
        Device::Cuda(_) => cuda::conv2d_fused(x, w, p, ep),
    }
}

/// `relu(conv2d(x, w) + b)` with the bias and ReLU applied in the convolution's
/// tile epilogue ([`conv2d_fused`]: no separate pass over the output), recorded on
/// the tape: its backward is ReLU's mask on the output, then
/// [`crate::ops::conv2d::conv2d_backward`] — the gradients of `relu(conv2d(x, w, b))`.
/// The forward values are those of the unfused pair too (the same accumulation; the
/// bias added and the ReLU taken on it, in the same order). How the RPN head's 3x3
/// conv trains on the CPU. x `[N, Cin, H, W]`, w `[Cout, Cin, kh, kw]`, b `[Cout]`,
/// f32 or f64.
pub fn conv2d_bias_relu(x: &Tensor, w: &Tensor, b: &Tensor, p: &Conv2dParams) -> Result<Tensor> {
    let ep = Epilogue {
        shift: Some(b),
        relu: true,
        ..Default::default()
    };
    let y = autograd::no_grad(|| conv2d_fused(x, w, p, &ep))?;
    let (xc, wc, yc, pc) = (x.clone(), w.clone(), y.clone(), *p);
    autograd::record("conv2d_bias_relu", &[x, w, b], &y, move |gy, needs| {
        let g = crate::ops::elementwise::relu_backward(&yc, gy)?;
        let needs = [needs[0], needs[1], needs[2]];
        let gr = crate::ops::conv2d::conv2d_backward(&xc, &wc, &g, &pc, needs)?;
        Ok(vec![gr.gx, gr.gw, gr.gb])
    });
    Ok(y)
}

/// `act(x @ w^T * scale + shift + residual)`: x `[M, K]`, w `[N, K]` (PyTorch's
/// linear layout), output `[M, N]`. Inference only.
pub fn linear_fused(x: &Tensor, w: &Tensor, ep: &Epilogue) -> Result<Tensor> {
    const OP: &str = "linear_fused";
    refuse_on_tape(OP)?;
    if x.dims().len() != 2 || w.dims().len() != 2 || x.dims()[1] != w.dims()[1] {
        return Err(Error::shape(
            OP,
            format!(
                "x {} and w {} (expected [M, K] and [N, K])",
                x.shape(),
                w.shape()
            ),
        ));
    }
    let (m, nout) = (x.dims()[0], w.dims()[0]);
    ep.check(OP, nout, &[m, nout], x.device())?;
    match x.device() {
        Device::Cpu if crate::ops::tc::wants_bf16(x, w, ep) => crate::ops::tc::linear_tc(x, w, ep),
        Device::Cpu => cpu::linear_fused(x, w, ep),
        Device::Cuda(_) => cuda::linear_fused(x, w, ep),
    }
}

fn dims4(op: &'static str, t: &Tensor) -> Result<(usize, usize, usize, usize)> {
    match t.dims() {
        [a, b, c, d] => Ok((*a, *b, *c, *d)),
        _ => Err(Error::shape(op, format!("{} is not 4-D", t.shape()))),
    }
}

/// `[c]` filled with `value`, of `like`'s dtype and device. On a GPU an f32 fill is
/// a device constant uploaded once per (length, value) and shared (it is only
/// read), so the epilogue makes no host copy per call and can be captured in a
/// device graph.
fn filled(c: usize, value: f32, like: &Tensor) -> Result<Tensor> {
    match like.device() {
        Device::Cuda(_) if like.dtype() == DType::F32 => {
            let dev = like.gpu()?.dev.clone();
            let bytes: Vec<u8> = std::iter::repeat_n(value.to_le_bytes(), c)
                .flatten()
                .collect();
            let buf = dev.constant(&bytes)?;
            Ok(Tensor::from_gpu(dev, buf, [c]))
        }
        device => Tensor::full([c], value as f64, like.dtype(), device),
    }
}

/// The epilogue as a sequence of unfused ops on `acc` (`[N, C, *]` or `[M, C]`): the
/// reference the fused implementations are checked against, and the fallback.
pub(crate) fn apply_unfused(acc: Tensor, ep: &Epilogue) -> Result<Tensor> {
    let c = acc.dims()[1];
    let mut v = acc;
    if ep.scale.is_some() || ep.shift.is_some() {
        let ones;
        let zeros;
        let scale = match ep.scale {
            Some(s) => s,
            None => {
                ones = filled(c, 1.0, &v)?;
                &ones
            }
        };
        let shift = match ep.shift {
            Some(s) => s,
            None => {
                zeros = filled(c, 0.0, &v)?;
                &zeros
            }
        };
        v = crate::ops::norm::channel_affine(&v, scale, shift)?;
    }
    if let Some(r) = ep.residual {
        v = crate::ops::add(&v, r)?;
    }
    if ep.relu {
        v = crate::ops::relu(&v)?;
    }
    Ok(v)
}
