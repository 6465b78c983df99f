//! CPU implementation of the fused conv / linear epilogues: the epilogue runs on each
//! output tile right after the GEMM that produced it (conv: per image and column chunk,
//! see `ops::conv2d` cpu.rs; linear: per output row), not as separate passes.

use super::Epilogue;
use crate::error::Result;
use crate::ops::conv2d::{conv2d_cpu_fused, Conv2dParams};
use crate::ops::linear::linear_cpu_fused;
use crate::tensor::Tensor;

pub(super) fn conv2d_fused(
    x: &Tensor,
    w: &Tensor,
    p: &Conv2dParams,
    ep: &Epilogue,
) -> Result<Tensor> {
    let y = conv2d_cpu_fused(x, w, p, ep.scale, ep.shift, ep.residual, ep.relu)?;
    to_out_dtype(y, ep)
}

pub(super) fn linear_fused(x: &Tensor, w: &Tensor, ep: &Epilogue) -> Result<Tensor> {
    let y = linear_cpu_fused(x, w, ep.scale, ep.shift, ep.residual, ep.relu)?;
    to_out_dtype(y, ep)
}

/// The output in the requested dtype (the CPU computes in the input's type).
fn to_out_dtype(y: Tensor, ep: &Epilogue) -> Result<Tensor> {
    match ep.out_dtype {
        Some(d) if d != y.dtype() => y.to_dtype(d),
        _ => Ok(y),
    }
}
