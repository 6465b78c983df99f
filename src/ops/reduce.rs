//! sum and mean of all elements, to a rank-0 tensor.

use crate::autograd::record;
use crate::device::gpu::{GpuDevice, KernelArg, LaunchCfg};
use crate::device::Device;
use crate::error::Result;
use crate::tensor::{Element, Shape, Tensor};
use crate::with_dtype;

use super::{arg, gpu_dev, launch_elems};

/// Sum of all elements, shape `[]`.
pub fn sum(x: &Tensor) -> Result<Tensor> {
    scaled_sum("sum", x, 1.0)
}

/// Mean of all elements, shape `[]` (NaN for an empty tensor, as in PyTorch).
pub fn mean(x: &Tensor) -> Result<Tensor> {
    scaled_sum("mean", x, 1.0 / x.numel() as f64)
}

fn scaled_sum(op: &'static str, x: &Tensor, k: f64) -> Result<Tensor> {
    let y = match x.device() {
        Device::Cpu => with_dtype!(x.dtype(), T => {
            let xs = x.cpu_slice::<T>()?;
            // Pairwise-ish: f64 accumulation keeps f32 sums close to PyTorch's.
            let s: f64 = xs.iter().map(|v| v.f64()).sum();
            Tensor::from_vec(vec![T::of(s * k)], Shape::new(vec![]))
        })?,
        Device::Cuda(_) => {
            let dev = gpu_dev(op, x)?;
            two_pass_sum(&dev, "sum_partial_f32", vec![arg(x)?], x.numel(), k)?
        }
    };
    let shape = x.shape().clone();
    record(op, &[x], &y, move |gy, _| {
        Ok(vec![Some(broadcast_scalar(gy, &shape, k)?)])
    });
    Ok(y)
}

/// `k * sum` on the device in two launches: `partial_kernel(leading..., partial, n)`
/// writes one sum per block (at most 1024 blocks of 256 threads), then
/// `sum_final_f32` adds the partials into a `[]` tensor. `sum`/`mean` and the fused
/// losses (whose partial kernels compute the loss on the fly) share it.
pub(crate) fn two_pass_sum(
    dev: &GpuDevice,
    partial_kernel: &str,
    mut leading: Vec<KernelArg>,
    n: usize,
    k: f64,
) -> Result<Tensor> {
    // At most 1024 partials, so the final pass is one block of 1024 threads.
    let blocks = n.div_ceil(256).clamp(1, 1024);
    let partial = Tensor::gpu_empty(dev, [blocks])?;
    let y = Tensor::gpu_empty(dev, Shape::new(vec![]))?;
    leading.extend([arg(&partial)?, KernelArg::I64(n as i64)]);
    let cfg = LaunchCfg {
        grid: (blocks as u32, 1, 1),
        block: (256, 1, 1),
        shared_bytes: 0,
    };
    dev.launch(partial_kernel, cfg, &leading)?;
    let one_block = LaunchCfg {
        grid: (1, 1, 1),
        block: (1024, 1, 1),
        shared_bytes: 0,
    };
    dev.launch(
        "sum_final_f32",
        one_block,
        &[
            arg(&partial)?,
            arg(&y)?,
            KernelArg::I32(blocks as i32),
            KernelArg::F32(k as f32),
        ],
    )?;
    Ok(y)
}

/// A tensor of `shape` filled with `k * g` for a one-element `g` (on g's device).
pub fn broadcast_scalar(g: &Tensor, shape: &Shape, k: f64) -> Result<Tensor> {
    match g.device() {
        Device::Cpu => with_dtype!(g.dtype(), T => {
            let v = g.cpu_slice::<T>()?[0] * T::of(k);
            Tensor::from_vec(vec![v; shape.numel()], shape.clone())
        }),
        Device::Cuda(_) => {
            let dev = gpu_dev("broadcast_scalar", g)?;
            let y = Tensor::gpu_empty(&dev, shape.clone())?;
            launch_elems(
                &dev,
                "fill_from_dev_f32",
                shape.numel(),
                &[
                    arg(g)?,
                    KernelArg::F32(k as f32),
                    arg(&y)?,
                    KernelArg::I64(shape.numel() as i64),
                ],
            )?;
            Ok(y)
        }
    }
}
