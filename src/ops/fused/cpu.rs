//! CPU implementation of the fused conv / linear epilogues.
//! Today: the plain product followed by the unfused epilogue (to be fused).

use super::{apply_unfused, Epilogue};
use crate::error::Result;
use crate::ops::conv2d::{conv2d_forward, Conv2dParams};
use crate::tensor::Tensor;

pub(super) fn conv2d_fused(
    x: &Tensor,
    w: &Tensor,
    p: &Conv2dParams,
    ep: &Epilogue,
) -> Result<Tensor> {
    apply_unfused(conv2d_forward(x, w, None, p)?, ep)
}

pub(super) fn linear_fused(x: &Tensor, w: &Tensor, ep: &Epilogue) -> Result<Tensor> {
    apply_unfused(crate::ops::linear::linear(x, w, None)?, ep)
}
