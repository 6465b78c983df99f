//! Layers of the detector, addressed by torchvision's parameter names.
//!
//! Layers hold only their configuration and the prefix of their parameter names; the
//! tensors live in a [`ParamStore`] passed to every forward through a [`Ctx`]. An
//! optimizer can then replace parameters between steps without rebuilding the model,
//! and a torchvision state_dict loads by its own key names.

pub mod fold;
pub mod fpn;
mod layers;
mod params;
mod precision;
pub mod resnet;

pub use layers::{Conv2d, Linear, Norm2d, NormKind};
pub use params::{Init, ParamKind, ParamSpec, ParamStore};
pub use precision::{Bf16Weights, LayerOut, Precision};

use std::cell::RefCell;

/// What a forward pass needs besides its inputs: the parameters, the mode, and a
/// place to put updated BatchNorm running statistics (applied after the step).
pub struct Ctx<'a> {
    /// Parameters and buffers by name.
    pub params: &'a ParamStore,
    /// Training mode (batch statistics in BatchNorm).
    pub training: bool,
    /// (name, new value) of buffers a training forward changed.
    pub buffer_updates: RefCell<Vec<(String, crate::Tensor)>>,
    /// Which dtype the conv and linear layers compute in.
    pub precision: Precision,
    /// Where bf16 copies of the weights are kept between passes (without one, each
    /// layer call makes its own).
    pub bf16_weights: Option<&'a Bf16Weights>,
}

impl<'a> Ctx<'a> {
    /// A context over `params`.
    pub fn new(params: &'a ParamStore, training: bool) -> Self {
        Ctx {
            params,
            training,
            buffer_updates: RefCell::new(Vec::new()),
            precision: Precision::F32,
            bf16_weights: None,
        }
    }
    /// The same context computing in `precision`, keeping bf16 weight copies in
    /// `weights`.
    pub fn with_precision(mut self, precision: Precision, weights: &'a Bf16Weights) -> Self {
        self.precision = precision;
        self.bf16_weights = Some(weights);
        self
    }
    /// The bf16 copy of parameter `name` (master `w`), from the cache when there is one.
    pub fn bf16_weight(
        &self,
        name: &str,
        w: &crate::Tensor,
        conv: bool,
    ) -> crate::error::Result<std::sync::Arc<crate::ops::mixed::Bf16Weight>> {
        match self.bf16_weights {
            Some(c) => c.get(name, w, conv),
            None => Ok(std::sync::Arc::new(crate::ops::mixed::Bf16Weight::new(
                w, conv,
            )?)),
        }
    }
    /// Take the buffer updates collected so far.
    pub fn take_buffer_updates(&self) -> Vec<(String, crate::Tensor)> {
        std::mem::take(&mut self.buffer_updates.borrow_mut())
    }
}
