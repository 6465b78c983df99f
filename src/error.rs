//! One error type for the whole engine. User input never panics: it comes back as an
//! `Error` that names the op or tensor and the shapes involved.

use std::path::PathBuf;

/// Every fallible Kestrel call returns this.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Shapes do not fit together for an op.
    #[error("{op}: shape mismatch: {msg}")]
    Shape { op: &'static str, msg: String },

    /// Inputs of one op live on different devices.
    #[error("{op}: inputs on different devices: {a} and {b}")]
    DeviceMismatch {
        op: &'static str,
        a: String,
        b: String,
    },

    /// The op does not support this dtype (or this dtype on this device).
    #[error("{op}: unsupported dtype {dtype} ({msg})")]
    DType {
        op: &'static str,
        dtype: String,
        msg: String,
    },

    /// An argument is out of its domain (stride 0, negative size, ...).
    #[error("{op}: invalid argument: {msg}")]
    InvalidArgument { op: &'static str, msg: String },

    /// No CUDA driver, no device, or the requested ordinal does not exist.
    #[error("CUDA unavailable: {0}")]
    CudaUnavailable(String),

    /// A CUDA driver call failed.
    #[error("CUDA error in {ctx}: {msg}")]
    Cuda { ctx: String, msg: String },

    /// NVRTC could not compile a kernel source file.
    #[error("NVRTC failed to compile {file} (needed for kernel `{kernel}`): {msg}\n{log}")]
    Nvrtc {
        file: String,
        kernel: String,
        msg: String,
        log: String,
    },

    /// A kernel name that no kernels/*.cu file declares.
    #[error("unknown kernel `{0}` (see `kestrel kernels`)")]
    UnknownKernel(String),

    /// A launch that a GPU would refuse (bad block size, null buffer, ...).
    #[error("launch of `{kernel}`: {msg}")]
    Launch { kernel: String, msg: String },

    /// A named tensor in a file is missing, has the wrong shape or dtype.
    #[error("tensor `{name}`: {msg}")]
    Tensor { name: String, msg: String },

    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },

    /// A safetensors file is malformed.
    #[error("{path}: bad safetensors file: {msg}")]
    Safetensors { path: PathBuf, msg: String },

    /// Backward was asked for something the tape cannot give.
    #[error("autograd: {0}")]
    Autograd(String),

    /// A configuration is malformed: an unknown key, a wrong type, a bad value.
    /// `origin` is the file (or another name for the source text).
    #[error("{origin}: {msg}")]
    Config { origin: String, msg: String },

    /// Training had to stop: a non-finite loss, a data loader that ran dry, a
    /// checkpoint that does not fit the model.
    #[error("training stopped: {0}")]
    Training(String),

    /// A collective of a data-parallel group failed: a rank did not arrive within the
    /// timeout, died, or called a different collective. The message names the rank.
    #[error("distributed: {0}")]
    Distributed(String),
}

/// `Result` with Kestrel's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Shorthand for [`Error::Shape`].
    pub fn shape(op: &'static str, msg: impl Into<String>) -> Self {
        Error::Shape {
            op,
            msg: msg.into(),
        }
    }
    /// Shorthand for [`Error::InvalidArgument`].
    pub fn invalid(op: &'static str, msg: impl Into<String>) -> Self {
        Error::InvalidArgument {
            op,
            msg: msg.into(),
        }
    }
    /// Shorthand for [`Error::Cuda`].
    pub fn cuda(ctx: impl Into<String>, e: impl std::fmt::Display) -> Self {
        Error::Cuda {
            ctx: ctx.into(),
            msg: e.to_string(),
        }
    }
}
