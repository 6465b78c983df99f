//! Mixed precision: the recorded dtype conversion, the bf16 convolution and linear
//! layers with f32 master weights and f32 gradients, and the rule by which the f32
//! ops accept bf16 activations.
//!
//! The precision policy (see [`crate::nn::Precision`]) gives the conv and linear
//! layers bf16 activations; every other op the model runs computes in f32. The rule
//! for such an op called with bf16 activations: its output is the f32 op on the
//! widened inputs, rounded back to bf16 once, and its gradients are the f32 op's, f32
//! (the CPU reference semantics of bf16: inputs in bf16, compute in f32, outputs
//! rounded). The ops between the model's convolutions (relu, add, frozen batch norm,
//! the FPN's nearest-upsample + add, max pooling) follow it natively: their kernels
//! (kernels/bf16_ops.cu) read and write bf16 and their tapes keep bf16 tensors, which
//! is what makes bf16's peak device memory lower than f32's; the others run on f32
//! copies ([`bf16_via_f32`]), the same values. Mixing a bf16
//! activation with an f32 one in one op is not something the policy produces, so it
//! is an error naming the op rather than a silent promotion.
//!
//! Gradients are always f32, whatever the dtype of the tensor they belong to: the
//! tensor-core backward kernels read an f32 upstream gradient (rounding it to bf16 in
//! their tile loads) and write f32, and the master weights are f32. No loss scaling
//! is needed: bf16 has f32's 8-bit exponent, so a gradient that is representable in
//! f32 does not underflow in bf16 (fp16's 5-bit exponent is what makes loss scaling
//! necessary there); and the gradients here are stored in f32 anyway.

use crate::autograd::record;
use crate::device::gpu::{GpuDevice, KernelArg};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::ops::conv2d::{
    conv2d_backward_bias, conv2d_backward_input, conv2d_backward_weight, Conv2dParams,
};
use crate::ops::fused::Epilogue;
use crate::ops::tc::{self, TcConvWeight};
use crate::ops::{arg, launch_elems};
use crate::tensor::{bf16, DType, Tensor};

/// `x` converted to `dtype` (f32 <-> bf16 on CUDA, any float pair on the CPU),
/// recorded on the tape: the gradient passes through, as f32.
pub fn cast(x: &Tensor, dtype: DType) -> Result<Tensor> {
    if x.dtype() == dtype {
        return Ok(x.clone());
    }
    let y = x.to_dtype(dtype)?;
    record("cast", &[x], &y, |gy, _| Ok(vec![Some(grad_f32(gy)?)]));
    Ok(y)
}

/// `g` as f32 (gradients are f32 whatever the dtype of their tensor).
pub fn grad_f32(g: &Tensor) -> Result<Tensor> {
    match g.dtype() {
        DType::BF16 => g.to_dtype(DType::F32),
        _ => Ok(g.clone()),
    }
}

/// For an op that computes in f32 on activations `acts`: `None` when none is bf16
/// (the caller goes on as before); when all are bf16, `f` runs on f32 copies and its
/// output comes back rounded to bf16 (the conversions are recorded, so the op's own
/// backward is reused). Some bf16 and some f32 activations: an error naming `op`.
pub fn bf16_via_f32(
    op: &'static str,
    acts: &[&Tensor],
    f: impl FnOnce(&[Tensor]) -> Result<Tensor>,
) -> Result<Option<Tensor>> {
    if !all_bf16(op, acts)? {
        return Ok(None);
    }
    let xs = acts
        .iter()
        .map(|t| cast(t, DType::F32))
        .collect::<Result<Vec<_>>>()?;
    let y = f(&xs)?;
    cast(&y, DType::BF16).map(Some)
}

/// Whether `op` runs on bf16 activations: `false` when none of `acts` is bf16, `true`
/// when all are; some of each is an error naming `op` (the policy never produces it).
pub fn all_bf16(op: &'static str, acts: &[&Tensor]) -> Result<bool> {
    let n16 = acts.iter().filter(|t| t.dtype() == DType::BF16).count();
    if n16 == 0 {
        return Ok(false);
    }
    if n16 != acts.len() {
        let dts: Vec<String> = acts.iter().map(|t| t.dtype().to_string()).collect();
        return Err(Error::DType {
            op,
            dtype: "bf16".into(),
            msg: format!(
                "activations of mixed dtypes ({}): the precision policy gives an op \
                 activations of one dtype; convert explicitly",
                dts.join(", ")
            ),
        });
    }
    Ok(true)
}

/// The device of a bf16 CUDA tensor (the f32 ops' `gpu_dev` takes f32 only).
pub(crate) fn gpu_dev_bf16(op: &'static str, t: &Tensor) -> Result<GpuDevice> {
    if t.dtype() != DType::BF16 {
        return Err(Error::DType {
            op,
            dtype: t.dtype().to_string(),
            msg: "the bf16 path takes bf16 activations".into(),
        });
    }
    Ok(t.gpu()?.dev.clone())
}

/// A bf16 CUDA tensor of `dims` with unspecified contents.
pub(crate) fn gpu_empty_bf16(dev: &GpuDevice, dims: &[usize]) -> Result<Tensor> {
    let n: usize = dims.iter().product();
    let buf = dev.alloc(n.max(1) * DType::BF16.size())?;
    Ok(Tensor::from_gpu_typed(
        dev.clone(),
        buf,
        dims.to_vec(),
        DType::BF16,
    ))
}

/// The CPU reference of a bf16 op: `f` on the inputs widened to f32 (not recorded),
/// its f32 output rounded to bf16 once, to nearest even.
pub(crate) fn cpu_bf16_rule(
    xs: &[&Tensor],
    f: impl FnOnce(&[Tensor]) -> Result<Tensor>,
) -> Result<Tensor> {
    let wide = xs
        .iter()
        .map(|t| t.to_dtype(DType::F32))
        .collect::<Result<Vec<_>>>()?;
    crate::autograd::no_grad(|| f(&wide))?.to_dtype(DType::BF16)
}

/// relu of a bf16 tensor, bf16 out (the sign decides, so the value is exact); the
/// tape keeps the bf16 output, not an f32 copy. The gradient is f32.
pub(crate) fn relu_bf16(x: &Tensor) -> Result<Tensor> {
    const OP: &str = "relu";
    let y = match x.device() {
        Device::Cpu => {
            let v = bf16::map(x.cpu_bf16()?, |v| {
                if positive(v) {
                    v
                } else {
                    half::bf16::ZERO
                }
            });
            Tensor::from_vec_bf16(v, x.shape().clone())?
        }
        Device::Cuda(_) => {
            let dev = gpu_dev_bf16(OP, x)?;
            let y = gpu_empty_bf16(&dev, x.dims())?;
            launch_elems(
                &dev,
                "relu_fwd_bf16",
                x.numel(),
                &[arg(x)?, arg(&y)?, KernelArg::I64(x.numel() as i64)],
            )?;
            y
        }
    };
    let yc = y.clone();
    record(OP, &[x], &y, move |gy, _| {
        Ok(vec![Some(relu_backward_bf16(&yc, &grad_f32(gy)?)?)])
    });
    Ok(y)
}

/// Whether a bf16 value is above zero, from its bits (`to_f32() > 0.0`: 0x0001 up to
/// +infinity; zeros, negatives and NaNs are not).
#[inline(always)]
fn positive(v: half::bf16) -> bool {
    v.to_bits().wrapping_sub(1) < 0x7f80
}

/// Fewest elements for which a CPU pass is split across threads, and the elements per
/// task (as in [`crate::tensor::bf16`]).
const PAR_MIN: usize = 1 << 16;
const CHUNK: usize = 1 << 14;

/// dL/dx (f32) of relu from its bf16 output `y` and dL/dy (f32): the f32 backward
/// of the widened output.
pub fn relu_backward_bf16(y: &Tensor, gy: &Tensor) -> Result<Tensor> {
    const OP: &str = "relu_backward";
    super::check_same_shape(OP, y, gy)?;
    if y.dtype() != DType::BF16 || gy.dtype() != DType::F32 {
        return Err(Error::DType {
            op: OP,
            dtype: format!("{}/{}", y.dtype(), gy.dtype()),
            msg: "the bf16 backward takes a bf16 output and an f32 gradient".into(),
        });
    }
    match crate::tensor::same_device(OP, &[y, gy])? {
        Device::Cpu => {
            let (ys, gs) = (y.cpu_bf16()?, gy.cpu_slice::<f32>()?);
            let mut g = crate::tensor::pool::take::<f32>(ys.len());
            let run = |ys: &[half::bf16], gs: &[f32], out: &mut [f32]| {
                for ((o, &y), &g) in out.iter_mut().zip(ys).zip(gs) {
                    *o = if positive(y) { g } else { 0.0 };
                }
            };
            if ys.len() < PAR_MIN {
                run(ys, gs, &mut g);
            } else {
                use rayon::prelude::*;
                g.par_chunks_mut(CHUNK)
                    .zip(ys.par_chunks(CHUNK).zip(gs.par_chunks(CHUNK)))
                    .for_each(|(o, (y, g))| run(y, g, o));
            }
            Tensor::from_vec(g, y.shape().clone())
        }
        Device::Cuda(_) => {
            let dev = gpu_dev_bf16(OP, y)?;
            let gx = Tensor::gpu_empty(&dev, y.shape().clone())?;
            launch_elems(
                &dev,
                "relu_bwd_bf16",
                y.numel(),
                &[
                    arg(y)?,
                    arg(gy)?,
                    arg(&gx)?,
                    KernelArg::I64(y.numel() as i64),
                ],
            )?;
            Ok(gx)
        }
    }
}

/// `a + b` for same-shaped bf16 tensors: the f32 sum rounded once. The gradient
/// passes through to both, as f32.
pub(crate) fn add_bf16(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    const OP: &str = "add";
    let y = match crate::tensor::same_device(OP, &[a, b])? {
        Device::Cpu => {
            super::check_same_shape(OP, a, b)?;
            let v = bf16::zip_map(a.cpu_bf16()?, b.cpu_bf16()?, |x, y| x + y);
            Tensor::from_vec_bf16(v, a.shape().clone())?
        }
        Device::Cuda(_) => {
            let dev = gpu_dev_bf16(OP, a)?;
            gpu_dev_bf16(OP, b)?;
            let y = gpu_empty_bf16(&dev, a.dims())?;
            launch_elems(
                &dev,
                "add_bf16",
                a.numel(),
                &[arg(a)?, arg(b)?, arg(&y)?, KernelArg::I64(a.numel() as i64)],
            )?;
            y
        }
    };
    record(OP, &[a, b], &y, |gy, _| {
        let g = grad_f32(gy)?;
        Ok(vec![Some(g.clone()), Some(g)])
    });
    Ok(y)
}

/// The bf16 copy of an f32 master weight as the tensor-core kernels read it: the
/// rounded tensor (both devices) and, for a convolution on CUDA, the packed forward
/// layout. Made once per weight version ([`crate::nn::Bf16Weights`]).
#[derive(Clone, Debug)]
pub struct Bf16Weight {
    /// The weight rounded to bf16, same shape and device as the master.
    pub bf16: Tensor,
    /// The forward kernel's packed layout (CUDA convolutions only).
    pub packed: Option<TcConvWeight>,
}

impl Bf16Weight {
    /// Round `w` (and pack it for the forward kernel when `conv` and on CUDA).
    pub fn new(w: &Tensor, conv: bool) -> Result<Self> {
        let bf16 = w.to_dtype(DType::BF16)?;
        let packed = match (conv, bf16.device()) {
            (true, Device::Cuda(_)) => Some(TcConvWeight::new(&bf16)?),
            _ => None,
        };
        Ok(Bf16Weight { bf16, packed })
    }
}

fn plain_epilogue(op: &'static str, ep: &Epilogue) -> Result<()> {
    if crate::autograd::is_recording() && (ep.scale.is_some() || ep.residual.is_some() || ep.relu) {
        return Err(Error::invalid(
            op,
            "under a tape only a bias may ride in the epilogue (norm, residual and ReLU \
             run as their own recorded ops)",
        ));
    }
    Ok(())
}

/// A convolution in bf16 with f32 accumulation on the tensor-core kernels (the CPU
/// reference on the CPU): `x` `[N, Cin, H, W]` (f32 or bf16), master weight `w`
/// (f32, the tensor gradients go to) read through its bf16 copy `w16`, epilogue `ep`
/// (a bias as `shift`; under a tape nothing else), output in `ep.out_dtype`.
/// Records dL/dx, dL/dw (tensor-core dgrad / wgrad, f32) and dL/dbias (f32).
pub fn conv2d_bf16(
    x: &Tensor,
    w: &Tensor,
    w16: &Bf16Weight,
    p: &Conv2dParams,
    ep: &Epilogue,
) -> Result<Tensor> {
    const OP: &str = "conv2d_bf16";
    plain_epilogue(OP, ep)?;
    if w16.bf16.dims() != w.dims() {
        return Err(Error::shape(
            OP,
            format!("bf16 copy {} of weight {}", w16.bf16.shape(), w.shape()),
        ));
    }
    let y = match &w16.packed {
        Some(packed) if x.device() != Device::Cpu => tc::conv2d_tc_packed(x, packed, p, ep)?,
        _ => tc::conv2d_tc(x, &w16.bf16, p, ep)?,
    };
    let (xc, wc, pc) = (x.clone(), w16.bf16.clone(), *p);
    let mut inputs = vec![x, w];
    inputs.extend(ep.shift);
    let has_bias = ep.shift.is_some();
    record(OP, &inputs, &y, move |gy, needs| {
        let gy = grad_f32(gy)?;
        let (gx, gw) = if gy.device() == Device::Cpu {
            // The CPU reference, with gy rounded once for both products (each
            // `conv2d_tc_backward_*` would round it again: the same values).
            let gyr = tc::round_to_bf16(&gy)?;
            let gx = needs[0]
                .then(|| conv2d_backward_input(&gyr, &tc::round_to_bf16(&wc)?, xc.dims(), &pc))
                .transpose()?;
            let gw = needs[1]
                .then(|| conv2d_backward_weight(&tc::round_to_bf16(&xc)?, &gyr, wc.dims(), &pc))
                .transpose()?;
            (gx, gw)
        } else {
            let gx = needs[0]
                .then(|| tc::conv2d_tc_backward_input(&gy, &wc, xc.dims(), &pc))
                .transpose()?;
            let gw = needs[1]
                .then(|| tc::conv2d_tc_backward_weight(&xc, &gy, wc.dims(), &pc))
                .transpose()?;
            (gx, gw)
        };
        let mut out = vec![gx, gw];
        if has_bias {
            out.push(if needs[2] {
                Some(conv2d_backward_bias(&gy)?)
            } else {
                None
            });
        }
        Ok(out)
    });
    Ok(y)
}

/// `x Wᵀ (+ bias in ep.shift)` in bf16 with f32 accumulation: `x` `[M, K]`, master
/// weight `w` `[N, K]` read through its bf16 copy `w16`, output `[M, N]` in
/// `ep.out_dtype`. Records f32 gradients of x, w and the bias.
pub fn linear_bf16(x: &Tensor, w: &Tensor, w16: &Bf16Weight, ep: &Epilogue) -> Result<Tensor> {
    const OP: &str = "linear_bf16";
    plain_epilogue(OP, ep)?;
    if w16.bf16.dims() != w.dims() {
        return Err(Error::shape(
            OP,
            format!("bf16 copy {} of weight {}", w16.bf16.shape(), w.shape()),
        ));
    }
    let y = tc::linear_tc(x, &w16.bf16, ep)?;
    let (xc, wc) = (x.clone(), w16.bf16.clone());
    let mut inputs = vec![x, w];
    inputs.extend(ep.shift);
    let has_bias = ep.shift.is_some();
    record(OP, &inputs, &y, move |gy, needs| {
        let gy = grad_f32(gy)?;
        let gx = if needs[0] {
            Some(tc::linear_tc_backward_input(&gy, &wc)?)
        } else {
            None
        };
        let gw = if needs[1] {
            Some(tc::linear_tc_backward_weight(&xc, &gy)?)
        } else {
            None
        };
        let mut out = vec![gx, gw];
        if has_bias {
            out.push(if needs[2] {
                let (m, n) = (gy.dims()[0], gy.dims()[1]);
                Some(conv2d_backward_bias(&gy.reshape_detached([m, n, 1, 1])?)?)
            } else {
                None
            });
        }
        Ok(out)
    });
    Ok(y)
}
