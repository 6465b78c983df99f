//! Ops: one file per op family, each with its forward and backward, a CPU
//! implementation (generic over f32/f64) and a CUDA launcher (f32) for the kernel of
//! the same name in kernels/. Every differentiable op records its backward on the
//! active tape (see [`crate::autograd`]).

pub mod boxes;
pub mod conv2d;
pub mod elementwise;
pub mod fused;
pub mod linear;
pub mod losses;
pub mod mixed;
pub mod nms;
pub mod norm;
pub mod pool;
pub mod reduce;
pub mod reshape;
pub mod roi_align;
pub mod shape;
pub mod tc;
pub mod topk;
pub mod upsample;

pub use elementwise::{add, mul, relu, scale};
pub use fused::{conv2d_bias_relu, conv2d_frozen_bn_act, conv2d_fused, linear_fused, Epilogue};
pub use losses::{
    bce_with_logits, bce_with_logits_at, cross_entropy, l1_loss, smooth_l1, smooth_l1_at, Reduction,
};
pub use norm::{
    batch_norm, channel_affine, fold_frozen_bn, frozen_batch_norm, BatchNormConfig, BatchNormOutput,
};
pub use pool::max_pool2d;
pub use reduce::{mean, sum};
pub use reshape::reshape;
pub use shape::{concat, flatten, index_select, narrow, permute, stack};
pub use upsample::upsample_nearest_add;

/// Run `$body` with `$T` bound to the Rust type of `$dtype`.
#[macro_export]
#[doc(hidden)]
macro_rules! with_dtype {
    ($dtype:expr, $T:ident => $body:expr) => {
        match $dtype {
            $crate::tensor::DType::F32 => {
                type $T = f32;
                $body
            }
            $crate::tensor::DType::F64 => {
                type $T = f64;
                $body
            }
            $crate::tensor::DType::I64 => {
                return Err($crate::Error::DType {
                    op: "float op",
                    dtype: "i64".into(),
                    msg: "integer tensor where a float tensor is expected".into(),
                })
            }
            $crate::tensor::DType::BF16 => {
                return Err($crate::Error::DType {
                    op: "float op",
                    dtype: "bf16".into(),
                    msg: "bf16 runs in the tensor-core ops (ops::tc); convert with to_dtype(F32)"
                        .into(),
                })
            }
        }
    };
}

use crate::device::gpu::{GpuDevice, KernelArg, LaunchCfg};
use crate::error::{Error, Result};
use crate::tensor::{DType, Tensor};

/// The GPU device of a CUDA tensor; errors for non-f32 tensors (CUDA ops are f32).
pub(crate) fn gpu_dev(op: &'static str, t: &Tensor) -> Result<GpuDevice> {
    if t.dtype() != DType::F32 {
        return Err(Error::DType {
            op,
            dtype: t.dtype().to_string(),
            msg: "CUDA ops take f32".into(),
        });
    }
    Ok(t.gpu()?.dev.clone())
}

/// Kernel argument for a CUDA tensor's buffer.
pub(crate) fn arg(t: &Tensor) -> Result<KernelArg> {
    Ok(t.gpu()?.buf.arg())
}

/// Launch a grid-stride elementwise kernel over `n` elements.
pub(crate) fn launch_elems(
    dev: &GpuDevice,
    kernel: &str,
    n: usize,
    args: &[KernelArg],
) -> Result<()> {
    if n == 0 {
        return Ok(());
    }
    dev.launch(kernel, LaunchCfg::for_elems(n), args)
}

/// Error unless `a` and `b` have the same shape.
pub(crate) fn check_same_shape(op: &'static str, a: &Tensor, b: &Tensor) -> Result<()> {
    if a.shape() != b.shape() {
        return Err(Error::shape(op, format!("{} vs {}", a.shape(), b.shape())));
    }
    Ok(())
}
