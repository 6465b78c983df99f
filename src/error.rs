//! One error type for the whole engine. User input never panics: it comes back as an
//! `Error` that names the op or tensor and the shapes involved.

use std::path::PathBuf;

/// Every fallible Kestrel call returns this.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Shapes do not fit together for an op.
    #[error("{op}: shape mismatch: {msg}")]
    Shape {
        /// The op that rejected its inputs, e.g. `conv2d`.
        op: &'static str,
        /// Which shapes, and why they do not fit.
        msg: String,
    },

    /// Inputs of one op live on different devices.
    #[error("{op}: inputs on different devices: {a} and {b}")]
    DeviceMismatch {
        /// The op that rejected its inputs.
        op: &'static str,
        /// The first input's device and shape, e.g. `cpu [2, 3]`.
        a: String,
        /// The device and shape of the first input whose device differs from `a`'s.
        b: String,
    },

    /// The op does not support this dtype (or this dtype on this device).
    #[error("{op}: unsupported dtype {dtype} ({msg})")]
    DType {
        /// The op that rejected the dtype.
        op: &'static str,
        /// The rejected dtype, e.g. `f64`.
        dtype: String,
        /// What the op supports instead, or where.
        msg: String,
    },

    /// An argument is out of its domain (stride 0, negative size, ...).
    #[error("{op}: invalid argument: {msg}")]
    InvalidArgument {
        /// The op that rejected the argument.
        op: &'static str,
        /// Which argument, its value, and its domain.
        msg: String,
    },

    /// No CUDA driver, no device, or the requested ordinal does not exist.
    #[error("CUDA unavailable: {0}")]
    CudaUnavailable(String),

    /// A CUDA driver call failed.
    #[error("CUDA error in {ctx}: {msg}")]
    Cuda {
        /// The driver call, or the operation that made it.
        ctx: String,
        /// The driver's error, as text.
        msg: String,
    },

    /// NVRTC could not compile a kernel source file.
    #[error("NVRTC failed to compile {file} (needed for kernel `{kernel}`): {msg}\n{log}")]
    Nvrtc {
        /// The kernels/*.cu file that failed, e.g. `conv2d.cu`.
        file: String,
        /// The kernel that needed the file.
        kernel: String,
        /// NVRTC's error string.
        msg: String,
        /// NVRTC's compile log (the compiler's diagnostics).
        log: String,
    },

    /// A kernel name that no kernels/*.cu file declares.
    #[error("unknown kernel `{0}` (see `kestrel kernels`)")]
    UnknownKernel(String),

    /// A launch that a GPU would refuse (bad block size, null buffer, ...).
    #[error("launch of `{kernel}`: {msg}")]
    Launch {
        /// The kernel's entry-point name.
        kernel: String,
        /// What about the launch is wrong.
        msg: String,
    },

    /// A named tensor in a file is missing, has the wrong shape or dtype.
    #[error("tensor `{name}`: {msg}")]
    Tensor {
        /// The tensor's name in the file (or in the model).
        name: String,
        /// What is missing or does not fit.
        msg: String,
    },

    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file (or directory) involved.
        path: PathBuf,
        /// The underlying I/O error.
        source: std::io::Error,
    },

    /// A safetensors file is malformed.
    #[error("{path}: bad safetensors file: {msg}")]
    Safetensors {
        /// The file.
        path: PathBuf,
        /// What is malformed (header, offsets, dtype, ...).
        msg: String,
    },

    /// Backward was asked for something the tape cannot give.
    #[error("autograd: {0}")]
    Autograd(String),

    /// A configuration is malformed: an unknown key, a wrong type, a bad value.
    /// `origin` is the file (or another name for the source text).
    #[error("{origin}: {msg}")]
    Config {
        /// The file, or another name for the source text.
        origin: String,
        /// The key and what is wrong with it.
        msg: String,
    },

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
