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
pub mod resnet;

pub use layers::{Conv2d, Linear, Norm2d, NormKind};
pub use params::{Init, ParamKind, ParamSpec, ParamStore};

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
}

impl<'a> Ctx<'a> {
    /// A context over `params`.
    pub fn new(params: &'a ParamStore, training: bool) -> Self {
        Ctx {
            params,
            training,
            buffer_updates: RefCell::new(Vec::new()),
        }
    }
    /// Take the buffer updates collected so far.
    pub fn take_buffer_updates(&self) -> Vec<(String, crate::Tensor)> {
        std::mem::take(&mut self.buffer_updates.borrow_mut())
    }
}
