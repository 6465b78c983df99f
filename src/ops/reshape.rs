//! Reshape (differentiable; shares storage).

use crate::autograd::record;
use crate::error::Result;
use crate::tensor::{Shape, Tensor};

/// The same elements under `shape` (same number of elements).
pub fn reshape(x: &Tensor, shape: impl Into<Shape>) -> Result<Tensor> {
    let y = x.reshape_detached(shape)?;
    let orig = x.shape().clone();
    record("reshape", &[x], &y, move |gy, _| {
        Ok(vec![Some(gy.reshape_detached(orig)?)])
    });
    Ok(y)
}
