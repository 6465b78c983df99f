use std::fmt;

/// Element type of a tensor. f32 is the working type; f64 exists on the CPU for
/// gradient checks; bf16 (crate `half`) feeds the tensor-core conv and GEMM kernels
/// on CUDA and their CPU reference ([`crate::ops::tc`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    /// 32-bit IEEE float: the working type, CPU and CUDA.
    F32,
    /// 64-bit IEEE float, CPU only (gradient checks).
    F64,
    /// Indices, labels and keep lists (CPU and CUDA).
    I64,
    /// bfloat16 (8-bit significand, f32's exponent range), CPU and CUDA. Conversions
    /// from f32 round to nearest even.
    BF16,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F64 => 8,
            DType::I64 => 8,
            DType::BF16 => 2,
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DType::F32 => "f32",
            DType::F64 => "f64",
            DType::I64 => "i64",
            DType::BF16 => "bf16",
        })
    }
}

/// A float element type the CPU implementations are generic over.
pub trait Element:
    num_traits::Float
    + num_traits::FromPrimitive
    + std::iter::Sum
    + std::ops::AddAssign
    + std::ops::SubAssign
    + std::ops::MulAssign
    + Send
    + Sync
    + Default
    + fmt::Debug
    + fmt::Display
    + bytemuck::Pod
    + 'static
{
    /// The [`DType`] of this element type.
    const DTYPE: DType;
    /// Lossy conversion from f64 (for constants).
    fn of(v: f64) -> Self;
    /// Widening to f64.
    fn f64(self) -> f64;
}

impl Element for f32 {
    const DTYPE: DType = DType::F32;
    fn of(v: f64) -> Self {
        v as f32
    }
    fn f64(self) -> f64 {
        self as f64
    }
}

impl Element for f64 {
    const DTYPE: DType = DType::F64;
    fn of(v: f64) -> Self {
        v
    }
    fn f64(self) -> f64 {
        self
    }
}
