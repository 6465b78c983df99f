//! Reading and writing tensors: safetensors files and atomic file writes.

mod safetensors_file;

pub use safetensors_file::{save_safetensors, write_atomic, TensorFile};
