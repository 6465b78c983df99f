//! CUDA implementation of the fused conv / linear epilogues.
//! bf16 operands or a bf16 output run on the tensor-core kernels with the epilogue
//! fused (kernels/tc_conv.cu via [`crate::ops::tc`]); f32 keeps the f32 SIMT product
//! followed by the unfused epilogue, so its results do not change.

use super::{apply_unfused, Epilogue};
use crate::error::Result;
use crate::ops::conv2d::{conv2d_forward, Conv2dParams};
use crate::ops::tc;
use crate::tensor::Tensor;

pub(super) fn conv2d_fused(
    x: &Tensor,
    w: &Tensor,
    p: &Conv2dParams,
    ep: &Epilogue,
) -> Result<Tensor> {
    if tc::wants_bf16(x, w, ep) {
        return tc::conv2d_tc(x, w, p, ep);
    }
    apply_unfused(conv2d_forward(x, w, None, p)?, ep)
}

pub(super) fn linear_fused(x: &Tensor, w: &Tensor, ep: &Epilogue) -> Result<Tensor> {
    if tc::wants_bf16(x, w, ep) {
        return tc::linear_tc(x, w, ep);
    }
    apply_unfused(crate::ops::linear::linear(x, w, None)?, ep)
}
