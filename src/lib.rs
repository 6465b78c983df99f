//! Kestrel: a CUDA-kernel-centric Faster R-CNN engine.
//!
//! Tensors live on the CPU or a CUDA device ([`Device`]); every op has a CPU
//! implementation and a hand-written CUDA kernel (kernels/*.cu, compiled by build.rs
//! with nvcc or at run time with NVRTC). A thin reverse-mode [`autograd::Tape`] records
//! backward closures during training.
//!
//! ```
//! use kestrel::{ops, Tensor};
//! let x = Tensor::from_vec(vec![-1.0f32, 2.0], [2])?;
//! let y = ops::relu(&x)?;
//! assert_eq!(y.to_vec::<f32>()?, vec![0.0, 2.0]);
//! # Ok::<(), kestrel::Error>(())
//! ```

// Every public item is documented, fields and enum variants included.
#![warn(missing_docs)]

pub mod app;
pub mod autograd;
pub mod config;
pub mod data;
pub mod detection;
pub mod device;
pub mod dist;
pub mod error;
pub mod eval;
pub mod io;
pub mod nn;
pub mod ops;
pub mod optim;
mod progress;
pub mod rng;
pub mod runner;
pub mod tensor;

pub use detection::{Detections, FasterRcnn, FasterRcnnConfig};
pub use device::Device;
pub use error::{Error, Result};
pub use tensor::{DType, Shape, Tensor};
