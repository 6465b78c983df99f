//! relu, add, mul, scale: elementwise on same-shaped tensors.

use crate::autograd::record;
use crate::device::Device;
use crate::error::Result;
use crate::tensor::{same_device, same_dtype, DType, Element, Tensor};
use crate::with_dtype;
use num_traits::Zero;

use super::{arg, check_same_shape, gpu_dev, launch_elems};

fn map1<T: Element>(x: &Tensor, f: impl Fn(T) -> T + Sync + Send) -> Result<Tensor> {
    let xs = x.cpu_slice::<T>()?;
    // Every element is written: a recycled buffer from the host pool will do.
    let mut out = crate::tensor::pool::take::<T>(xs.len());
    crate::device::cpu::fill_indexed(&mut out, |i| f(xs[i]));
    Tensor::from_vec(out, x.shape().clone())
}

fn map2<T: Element>(a: &Tensor, b: &Tensor, f: impl Fn(T, T) -> T + Sync + Send) -> Result<Tensor> {
    let (xa, xb) = (a.cpu_slice::<T>()?, b.cpu_slice::<T>()?);
    let mut out = crate::tensor::pool::take::<T>(xa.len());
    crate::device::cpu::fill_indexed(&mut out, |i| f(xa[i], xb[i]));
    Tensor::from_vec(out, a.shape().clone())
}

fn gpu_binary(op: &'static str, kernel: &str, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let dev = gpu_dev(op, a)?;
    let y = Tensor::gpu_empty(&dev, a.shape().clone())?;
    launch_elems(
        &dev,
        kernel,
        a.numel(),
        &[
            arg(a)?,
            arg(b)?,
            arg(&y)?,
            crate::device::gpu::KernelArg::I64(a.numel() as i64),
        ],
    )?;
    Ok(y)
}

/// `max(x, 0)`, any shape.
pub fn relu(x: &Tensor) -> Result<Tensor> {
    // bf16 natively: the tape keeps the bf16 output, not an f32 copy.
    if super::mixed::all_bf16("relu", &[x])? {
        return super::mixed::relu_bf16(x);
    }
    let y = match x.device() {
        Device::Cpu => {
            with_dtype!(x.dtype(), T => map1::<T>(x, |v| if v > T::zero() { v } else { T::zero() }))?
        }
        Device::Cuda(_) => {
            let dev = gpu_dev("relu", x)?;
            let y = Tensor::gpu_empty(&dev, x.shape().clone())?;
            launch_elems(
                &dev,
                "relu_fwd_f32",
                x.numel(),
                &[
                    arg(x)?,
                    arg(&y)?,
                    crate::device::gpu::KernelArg::I64(x.numel() as i64),
                ],
            )?;
            y
        }
    };
    let yc = y.clone();
    record("relu", &[x], &y, move |gy, _| {
        Ok(vec![Some(relu_backward(&yc, gy)?)])
    });
    Ok(y)
}

/// dL/dx of relu from its output `y` and dL/dy.
pub fn relu_backward(y: &Tensor, gy: &Tensor) -> Result<Tensor> {
    check_same_shape("relu_backward", y, gy)?;
    match same_device("relu_backward", &[y, gy])? {
        Device::Cpu => {
            with_dtype!(same_dtype("relu_backward", &[y, gy])?, T => map2::<T>(y, gy, |y, g| if y > T::zero() { g } else { T::zero() }))
        }
        Device::Cuda(_) => gpu_binary("relu_backward", "relu_bwd_f32", y, gy),
    }
}

/// `a + b` for same-shaped tensors.
pub fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    check_same_shape("add", a, b)?;
    if super::mixed::all_bf16("add", &[a, b])? {
        return super::mixed::add_bf16(a, b);
    }
    let y = match same_device("add", &[a, b])? {
        Device::Cpu => {
            with_dtype!(same_dtype("add", &[a, b])?, T => map2::<T>(a, b, |x, y| x + y))?
        }
        Device::Cuda(_) => gpu_binary("add", "add_f32", a, b)?,
    };
    record("add", &[a, b], &y, |gy, _| {
        Ok(vec![Some(gy.clone()), Some(gy.clone())])
    });
    Ok(y)
}

/// `a + b` for same-shaped tensors, written into `a`'s buffer when nothing else
/// holds it (a CPU f32/f64 tensor: [`Tensor::storage_mut`]), else into a fresh one
/// as [`add`]. The same values as [`add`] either way (IEEE addition commutes).
/// Records nothing: how a backward pass accumulates a gradient without allocating
/// a sum per contribution.
pub fn add_into(mut a: Tensor, b: &Tensor) -> Result<Tensor> {
    check_same_shape("add_into", &a, b)?;
    if a.dtype() == b.dtype() && b.device() == Device::Cpu {
        use crate::tensor::{CpuStorage, Storage};
        match (a.storage_mut(), b.dtype()) {
            (Some(Storage::Cpu(CpuStorage::F32(v))), DType::F32) => {
                add_slices(v, b.cpu_slice::<f32>()?);
                return Ok(a);
            }
            (Some(Storage::Cpu(CpuStorage::F64(v))), DType::F64) => {
                add_slices(v, b.cpu_slice::<f64>()?);
                return Ok(a);
            }
            _ => {}
        }
    }
    crate::autograd::no_grad(|| add(&a, b))
}

/// `acc[i] += b[i]`, in parallel when large.
fn add_slices<T: Element>(acc: &mut [T], b: &[T]) {
    use rayon::prelude::*;
    if acc.len() < crate::device::cpu::PAR_THRESHOLD {
        acc.iter_mut().zip(b).for_each(|(a, &b)| *a += b);
    } else {
        acc.par_iter_mut()
            .with_min_len(4096)
            .zip(b.par_iter())
            .for_each(|(a, &b)| *a += b);
    }
}

/// `a * b` elementwise for same-shaped tensors.
pub fn mul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    check_same_shape("mul", a, b)?;
    let y = mul_plain(a, b)?;
    let (ac, bc) = (a.clone(), b.clone());
    record("mul", &[a, b], &y, move |gy, needs| {
        let ga = if needs[0] {
            Some(mul_plain(gy, &bc)?)
        } else {
            None
        };
        let gb = if needs[1] {
            Some(mul_plain(gy, &ac)?)
        } else {
            None
        };
        Ok(vec![ga, gb])
    });
    Ok(y)
}

fn mul_plain(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    match same_device("mul", &[a, b])? {
        Device::Cpu => with_dtype!(same_dtype("mul", &[a, b])?, T => map2::<T>(a, b, |x, y| x * y)),
        Device::Cuda(_) => gpu_binary("mul", "mul_f32", a, b),
    }
}

/// `s * x` for a host scalar `s`.
pub fn scale(x: &Tensor, s: f64) -> Result<Tensor> {
    let y = scale_plain(x, s)?;
    record("scale", &[x], &y, move |gy, _| {
        Ok(vec![Some(scale_plain(gy, s)?)])
    });
    Ok(y)
}

fn scale_plain(x: &Tensor, s: f64) -> Result<Tensor> {
    match x.device() {
        Device::Cpu => with_dtype!(x.dtype(), T => map1::<T>(x, |v| v * T::of(s))),
        Device::Cuda(_) => {
            let dev = gpu_dev("scale", x)?;
            let y = Tensor::gpu_empty(&dev, x.shape().clone())?;
            use crate::device::gpu::KernelArg;
            launch_elems(
                &dev,
                "scale_f32",
                x.numel(),
                &[
                    arg(x)?,
                    KernelArg::F32(s as f32),
                    arg(&y)?,
                    KernelArg::I64(x.numel() as i64),
                ],
            )?;
            Ok(y)
        }
    }
}
