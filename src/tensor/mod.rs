//! Tensors: a shape, a dtype and storage on the CPU or a CUDA device.
//!
//! Tensors are immutable values, cheap to clone (the storage is shared). Every tensor
//! has a fresh [`TensorId`] (a reshape shares storage but gets a new id), which the
//! autograd tape uses as the key of its gradients.

pub mod bf16;
mod dtype;
pub mod pool;
mod shape;

pub use dtype::{DType, Element};
pub use shape::Shape;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::device::gpu::{self, GpuBuffer, GpuDevice};
use crate::device::Device;
use crate::error::{Error, Result};

/// Identity of a tensor value, unique in the process.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TensorId(u64);

impl TensorId {
    fn fresh() -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        TensorId(NEXT.fetch_add(1, Ordering::Relaxed))
    }
}

/// Host storage.
#[derive(Clone, Debug)]
pub enum CpuStorage {
    /// [`DType::F32`] elements.
    F32(Vec<f32>),
    /// [`DType::F64`] elements.
    F64(Vec<f64>),
    /// [`DType::I64`] elements.
    I64(Vec<i64>),
    /// bfloat16 values (see [`DType::BF16`]).
    BF16(Vec<half::bf16>),
}

/// Device storage: a buffer and the device that owns it (f32, i64 or bf16; the
/// dtype is the tensor's).
#[derive(Clone, Debug)]
pub struct GpuStorage {
    /// The GPU that owns the buffer.
    pub dev: GpuDevice,
    /// The device allocation holding the elements.
    pub buf: GpuBuffer,
}

/// Where the elements of a tensor are.
#[derive(Clone, Debug)]
pub enum Storage {
    /// In host memory.
    Cpu(CpuStorage),
    /// In the memory of a GPU.
    Cuda(GpuStorage),
}

struct Inner {
    id: TensorId,
    shape: Shape,
    dtype: DType,
    storage: Arc<Storage>,
}

impl Drop for Inner {
    /// The last owner of a CPU float or i64 buffer gives it to the [`pool`], where
    /// the next op asking for that many elements picks it up.
    fn drop(&mut self) {
        if let Some(Storage::Cpu(cs)) = Arc::get_mut(&mut self.storage) {
            match cs {
                CpuStorage::F32(v) => pool::give(std::mem::take(v)),
                CpuStorage::F64(v) => pool::give(std::mem::take(v)),
                CpuStorage::I64(v) => pool::give(std::mem::take(v)),
                CpuStorage::BF16(_) => {}
            }
        }
    }
}

/// A contiguous, row-major n-dimensional array.
#[derive(Clone)]
pub struct Tensor(Arc<Inner>);

impl std::fmt::Debug for Tensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Tensor({:?}, {}, {}, {:?})",
            self.0.id,
            self.0.shape,
            self.0.dtype,
            self.device()
        )
    }
}

impl Tensor {
    fn make(shape: Shape, dtype: DType, storage: Arc<Storage>) -> Tensor {
        Tensor(Arc::new(Inner {
            id: TensorId::fresh(),
            shape,
            dtype,
            storage,
        }))
    }

    /// A CPU tensor from its elements. Errors when `data.len()` differs from the shape.
    pub fn from_vec<T: Element>(data: Vec<T>, shape: impl Into<Shape>) -> Result<Tensor> {
        let shape = shape.into();
        if data.len() != shape.numel() {
            return Err(Error::shape(
                "Tensor::from_vec",
                format!("{} elements for shape {shape}", data.len()),
            ));
        }
        // Move the Vec in (no copy): `T` is f32 or f64, the only `Element`s.
        let any: Box<dyn std::any::Any> = Box::new(data);
        let storage = match any.downcast::<Vec<f32>>() {
            Ok(v) => CpuStorage::F32(*v),
            Err(any) => match any.downcast::<Vec<f64>>() {
                Ok(v) => CpuStorage::F64(*v),
                Err(_) => unreachable!("Element is implemented for f32 and f64 only"),
            },
        };
        Ok(Self::make(shape, T::DTYPE, Arc::new(Storage::Cpu(storage))))
    }

    /// A CPU tensor from a slice.
    pub fn from_slice<T: Element>(data: &[T], shape: impl Into<Shape>) -> Result<Tensor> {
        Self::from_vec(data.to_vec(), shape)
    }

    /// A CPU tensor of i64 (indices, labels, keep lists).
    pub fn from_vec_i64(data: Vec<i64>, shape: impl Into<Shape>) -> Result<Tensor> {
        let shape = shape.into();
        if data.len() != shape.numel() {
            return Err(Error::shape(
                "Tensor::from_vec_i64",
                format!("{} elements for shape {shape}", data.len()),
            ));
        }
        Ok(Self::make(
            shape,
            DType::I64,
            Arc::new(Storage::Cpu(CpuStorage::I64(data))),
        ))
    }

    /// A CPU tensor of bf16 values.
    pub fn from_vec_bf16(data: Vec<half::bf16>, shape: impl Into<Shape>) -> Result<Tensor> {
        let shape = shape.into();
        if data.len() != shape.numel() {
            return Err(Error::shape(
                "Tensor::from_vec_bf16",
                format!("{} elements for shape {shape}", data.len()),
            ));
        }
        Ok(Self::make(
            shape,
            DType::BF16,
            Arc::new(Storage::Cpu(CpuStorage::BF16(data))),
        ))
    }

    /// An empty f32 tensor of shape `[0]` that owns no memory: what a slot holds
    /// while its tensor is moved out for an update in place.
    pub(crate) fn placeholder() -> Tensor {
        Self::make(
            Shape::new(vec![0]),
            DType::F32,
            Arc::new(Storage::Cpu(CpuStorage::F32(Vec::new()))),
        )
    }

    /// A rank-0 f32 tensor on the CPU.
    pub fn scalar(v: f32) -> Tensor {
        Self::make(
            Shape::new(vec![]),
            DType::F32,
            Arc::new(Storage::Cpu(CpuStorage::F32(vec![v]))),
        )
    }

    /// Zeros of `dtype` on `device`.
    pub fn zeros(shape: impl Into<Shape>, dtype: DType, device: Device) -> Result<Tensor> {
        Self::full(shape, 0.0, dtype, device)
    }

    /// A tensor filled with `value`.
    pub fn full(
        shape: impl Into<Shape>,
        value: f64,
        dtype: DType,
        device: Device,
    ) -> Result<Tensor> {
        let shape = shape.into();
        let n = shape.numel();
        let t = match dtype {
            DType::F32 => Tensor::from_vec(vec![value as f32; n], shape)?,
            DType::F64 => Tensor::from_vec(vec![value; n], shape)?,
            DType::I64 => Tensor::from_vec_i64(vec![value as i64; n], shape)?,
            DType::BF16 => {
                Tensor::from_vec_bf16(vec![half::bf16::from_f32(value as f32); n], shape)?
            }
        };
        t.to_device(device)
    }

    /// Wrap a device buffer holding `shape.numel()` f32 values (used by CUDA launchers).
    pub fn from_gpu(dev: GpuDevice, buf: GpuBuffer, shape: impl Into<Shape>) -> Tensor {
        Self::make(
            shape.into(),
            DType::F32,
            Arc::new(Storage::Cuda(GpuStorage { dev, buf })),
        )
    }

    /// Wrap a device buffer holding `shape.numel()` values of `dtype`.
    pub fn from_gpu_typed(
        dev: GpuDevice,
        buf: GpuBuffer,
        shape: impl Into<Shape>,
        dtype: DType,
    ) -> Tensor {
        Self::make(
            shape.into(),
            dtype,
            Arc::new(Storage::Cuda(GpuStorage { dev, buf })),
        )
    }

    /// A zero-filled i64 device tensor (one memset: only where a kernel accumulates
    /// into it or leaves elements unwritten; else [`Tensor::gpu_empty_i64`]).
    pub fn gpu_zeros_i64(dev: &GpuDevice, shape: impl Into<Shape>) -> Result<Tensor> {
        let shape = shape.into();
        let buf = dev.alloc_zeroed(shape.numel() * 8)?;
        Ok(Self::from_gpu_typed(dev.clone(), buf, shape, DType::I64))
    }

    /// A zero-filled f32 device tensor (one memset: only where a kernel accumulates
    /// into it or leaves elements unwritten; else [`Tensor::gpu_empty`]).
    pub fn gpu_zeros(dev: &GpuDevice, shape: impl Into<Shape>) -> Result<Tensor> {
        let shape = shape.into();
        let buf = dev.alloc_zeroed(shape.numel() * 4)?;
        Ok(Self::from_gpu(dev.clone(), buf, shape))
    }

    /// An f32 device tensor whose contents are unspecified (poisoned with NaN on
    /// the emulated device), for kernels that write every element.
    pub fn gpu_empty(dev: &GpuDevice, shape: impl Into<Shape>) -> Result<Tensor> {
        let shape = shape.into();
        let buf = dev.alloc(shape.numel() * 4)?;
        Ok(Self::from_gpu(dev.clone(), buf, shape))
    }

    /// An i64 device tensor whose contents are unspecified (-1 on the emulated
    /// device), for kernels that write every element.
    pub fn gpu_empty_i64(dev: &GpuDevice, shape: impl Into<Shape>) -> Result<Tensor> {
        let shape = shape.into();
        let buf = dev.alloc(shape.numel() * 8)?;
        Ok(Self::from_gpu_typed(dev.clone(), buf, shape, DType::I64))
    }

    /// This value's identity (the key of its gradient).
    pub fn id(&self) -> TensorId {
        self.0.id
    }
    /// The shape.
    pub fn shape(&self) -> &Shape {
        &self.0.shape
    }
    /// The dimensions.
    pub fn dims(&self) -> &[usize] {
        self.0.shape.dims()
    }
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.0.shape.numel()
    }
    /// Element type.
    pub fn dtype(&self) -> DType {
        self.0.dtype
    }
    /// The storage.
    pub fn storage(&self) -> &Storage {
        &self.0.storage
    }
    /// The device holding the elements.
    pub fn device(&self) -> Device {
        match &*self.0.storage {
            Storage::Cpu(_) => Device::Cpu,
            Storage::Cuda(g) => Device::Cuda(g.dev.ordinal),
        }
    }

    /// The elements of a bf16 CPU tensor, borrowed (no copy).
    pub fn cpu_bf16(&self) -> Result<&[half::bf16]> {
        match &*self.0.storage {
            Storage::Cpu(CpuStorage::BF16(v)) => Ok(v),
            _ => Err(Error::DType {
                op: "cpu_bf16",
                dtype: format!("{} on {}", self.dtype(), self.device()),
                msg: "not a bf16 CPU tensor".into(),
            }),
        }
    }

    /// The host elements, when the tensor is on the CPU with element type `T`.
    pub fn cpu_slice<T: Element>(&self) -> Result<&[T]> {
        match &*self.0.storage {
            Storage::Cpu(CpuStorage::F32(v)) if T::DTYPE == DType::F32 => {
                Ok(bytemuck::cast_slice(v))
            }
            Storage::Cpu(CpuStorage::F64(v)) if T::DTYPE == DType::F64 => {
                Ok(bytemuck::cast_slice(v))
            }
            Storage::Cpu(_) => Err(Error::DType {
                op: "cpu_slice",
                dtype: self.dtype().to_string(),
                msg: format!("asked for {}", T::DTYPE),
            }),
            Storage::Cuda(_) => Err(Error::invalid(
                "cpu_slice",
                format!("tensor {} is on {}", self.shape(), self.device()),
            )),
        }
    }

    /// Exclusive access to the elements, for an in-place update (the optimizer's
    /// step): `Some` only when no other tensor, view or buffer handle shares this
    /// storage, so no holder of the old value can see the change. The tensor then
    /// gets a fresh [`TensorId`]: its value is about to change, and gradients or
    /// caches keyed by the old id (bf16 weight copies) must not apply to it.
    pub fn storage_mut(&mut self) -> Option<&mut Storage> {
        let inner = Arc::get_mut(&mut self.0)?;
        let storage = Arc::get_mut(&mut inner.storage)?;
        if let Storage::Cuda(g) = storage {
            if !g.buf.is_unique() {
                return None;
            }
        }
        inner.id = TensorId::fresh();
        Some(storage)
    }

    /// The device buffer, when the tensor is on a CUDA device.
    pub fn gpu(&self) -> Result<&GpuStorage> {
        match &*self.0.storage {
            Storage::Cuda(g) => Ok(g),
            Storage::Cpu(_) => Err(Error::invalid(
                "gpu",
                format!("tensor {} is on the CPU", self.shape()),
            )),
        }
    }

    /// The host elements of a CPU i64 tensor.
    pub fn cpu_i64(&self) -> Result<&[i64]> {
        match &*self.0.storage {
            Storage::Cpu(CpuStorage::I64(v)) => Ok(v),
            Storage::Cpu(_) => Err(Error::DType {
                op: "cpu_i64",
                dtype: self.dtype().to_string(),
                msg: "asked for i64".into(),
            }),
            Storage::Cuda(_) => Err(Error::invalid(
                "cpu_i64",
                format!("tensor {} is on {}", self.shape(), self.device()),
            )),
        }
    }

    /// Copy of the elements on the host, converting between float types (and from
    /// i64) if needed.
    pub fn to_vec<T: Element>(&self) -> Result<Vec<T>> {
        match &*self.0.storage {
            Storage::Cpu(CpuStorage::F32(v)) => Ok(v.iter().map(|&x| T::of(x as f64)).collect()),
            Storage::Cpu(CpuStorage::F64(v)) => Ok(v.iter().map(|&x| T::of(x)).collect()),
            Storage::Cpu(CpuStorage::I64(v)) => Ok(v.iter().map(|&x| T::of(x as f64)).collect()),
            Storage::Cpu(CpuStorage::BF16(v)) => Ok(v.iter().map(|&x| T::of(x.to_f64())).collect()),
            Storage::Cuda(g) => match self.dtype() {
                DType::I64 => Ok(self
                    .to_vec_i64()?
                    .into_iter()
                    .map(|x| T::of(x as f64))
                    .collect()),
                DType::BF16 => Ok(self
                    .to_vec_bf16()?
                    .into_iter()
                    .map(|x| T::of(x.to_f64()))
                    .collect()),
                _ => {
                    let mut host = vec![0f32; self.numel()];
                    g.dev
                        .backend
                        .copy_dtoh(&g.buf, bytemuck::cast_slice_mut(&mut host))?;
                    Ok(host.into_iter().map(|x| T::of(x as f64)).collect())
                }
            },
        }
    }

    /// Copy of the elements of an i64 tensor on the host.
    pub fn to_vec_i64(&self) -> Result<Vec<i64>> {
        if self.dtype() != DType::I64 {
            return Err(Error::DType {
                op: "to_vec_i64",
                dtype: self.dtype().to_string(),
                msg: "not an integer tensor".into(),
            });
        }
        match &*self.0.storage {
            Storage::Cpu(CpuStorage::I64(v)) => Ok(v.clone()),
            Storage::Cpu(_) => unreachable!("dtype is I64"),
            Storage::Cuda(g) => {
                let mut host = vec![0i64; self.numel()];
                g.dev
                    .backend
                    .copy_dtoh(&g.buf, bytemuck::cast_slice_mut(&mut host))?;
                Ok(host)
            }
        }
    }

    /// Copy of the elements of a bf16 tensor on the host.
    pub fn to_vec_bf16(&self) -> Result<Vec<half::bf16>> {
        if self.dtype() != DType::BF16 {
            return Err(Error::DType {
                op: "to_vec_bf16",
                dtype: self.dtype().to_string(),
                msg: "not a bf16 tensor (convert with to_dtype)".into(),
            });
        }
        match &*self.0.storage {
            Storage::Cpu(CpuStorage::BF16(v)) => Ok(v.clone()),
            Storage::Cpu(_) => unreachable!("dtype is BF16"),
            Storage::Cuda(g) => {
                let mut host = vec![0u16; self.numel()];
                g.dev
                    .backend
                    .copy_dtoh(&g.buf, bytemuck::cast_slice_mut(&mut host))?;
                Ok(host.into_iter().map(half::bf16::from_bits).collect())
            }
        }
    }

    /// The single value of a one-element tensor, as f64.
    pub fn item(&self) -> Result<f64> {
        if self.numel() != 1 {
            return Err(Error::shape(
                "item",
                format!("tensor of shape {} is not a scalar", self.shape()),
            ));
        }
        Ok(self.to_vec::<f64>()?[0])
    }

    /// The same elements on `device` (a no-op returning a clone when already there).
    /// f32, i64 and bf16 tensors can move to CUDA (f64 cannot).
    pub fn to_device(&self, device: Device) -> Result<Tensor> {
        if self.device() == device {
            return Ok(self.clone());
        }
        let storage = match (device, self.dtype()) {
            (Device::Cpu, DType::I64) => Storage::Cpu(CpuStorage::I64(self.to_vec_i64()?)),
            (Device::Cpu, DType::BF16) => Storage::Cpu(CpuStorage::BF16(self.to_vec_bf16()?)),
            (Device::Cpu, _) => Storage::Cpu(CpuStorage::F32(self.to_vec::<f32>()?)),
            (Device::Cuda(_), DType::F64) => {
                return Err(Error::DType {
                    op: "to_device",
                    dtype: "f64".into(),
                    msg: "CUDA tensors are f32 or i64".into(),
                });
            }
            (Device::Cuda(n), dtype) => {
                let dev = gpu::device(n)?;
                let bytes: Vec<u8> = match dtype {
                    DType::I64 => bytemuck::cast_slice(&self.to_vec_i64()?).to_vec(),
                    DType::BF16 => self
                        .to_vec_bf16()?
                        .iter()
                        .flat_map(|v| v.to_bits().to_le_bytes())
                        .collect(),
                    _ => bytemuck::cast_slice(&self.to_vec::<f32>()?).to_vec(),
                };
                let buf = dev.alloc(bytes.len())?;
                dev.backend.copy_htod(&bytes, &buf)?;
                Storage::Cuda(GpuStorage { dev, buf })
            }
        };
        let dtype = match self.dtype() {
            DType::I64 | DType::BF16 => self.dtype(),
            _ => DType::F32,
        };
        Ok(Self::make(self.shape().clone(), dtype, Arc::new(storage)))
    }

    /// The same values as `dtype` (a clone if already that type). On the CPU any
    /// conversion; on CUDA f32 <-> bf16 (a kernel). To bf16 rounds to nearest even.
    pub fn to_dtype(&self, dtype: DType) -> Result<Tensor> {
        if dtype == self.dtype() {
            return Ok(self.clone());
        }
        if self.device() != Device::Cpu {
            if let Some(t) = crate::ops::tc::cast_on_device(self, dtype)? {
                return Ok(t);
            }
            return Err(Error::DType {
                op: "to_dtype",
                dtype: dtype.to_string(),
                msg: "dtype conversion runs on the CPU".into(),
            });
        }
        // f32 <-> bf16, the conversions the CPU's bf16 emulation runs around every
        // op: one vectorised pass over the bits (same values as the scalar path below).
        match (&*self.0.storage, dtype) {
            (Storage::Cpu(CpuStorage::BF16(v)), DType::F32) => {
                return Tensor::from_vec(bf16::widen_vec(v), self.shape().clone());
            }
            (Storage::Cpu(CpuStorage::F32(v)), DType::BF16) => {
                return Tensor::from_vec_bf16(bf16::round_vec(v), self.shape().clone());
            }
            _ => {}
        }
        match dtype {
            DType::F32 => Tensor::from_vec(self.to_vec::<f32>()?, self.shape().clone()),
            DType::F64 => Tensor::from_vec(self.to_vec::<f64>()?, self.shape().clone()),
            DType::I64 => Tensor::from_vec_i64(
                self.to_vec::<f64>()?
                    .into_iter()
                    .map(|v| v as i64)
                    .collect(),
                self.shape().clone(),
            ),
            // Through f32 (exact for f32 tensors): half's `bf16::from_f64` does not
            // round to nearest even (it drops the bits below f32's, e.g. 0x3f288004
            // goes down), and the device kernels round from f32.
            DType::BF16 => Tensor::from_vec_bf16(
                self.to_vec::<f32>()?
                    .into_iter()
                    .map(half::bf16::from_f32)
                    .collect(),
                self.shape().clone(),
            ),
        }
    }

    /// A tensor sharing this one's storage under a new shape and a new id. Not
    /// recorded on the tape: use [`crate::ops::reshape`] inside a differentiated graph.
    pub fn reshape_detached(&self, shape: impl Into<Shape>) -> Result<Tensor> {
        let shape = shape.into();
        if shape.numel() != self.numel() {
            return Err(Error::shape(
                "reshape",
                format!("{} to {shape}", self.shape()),
            ));
        }
        Ok(Self::make(shape, self.dtype(), self.0.storage.clone()))
    }

    /// A copy with a new id that no tape links to this one.
    pub fn detach(&self) -> Tensor {
        Self::make(self.shape().clone(), self.dtype(), self.0.storage.clone())
    }
}

/// The common device of an op's inputs; an error naming the op and both devices
/// otherwise.
pub fn same_device(op: &'static str, ts: &[&Tensor]) -> Result<Device> {
    let d = ts.first().map(|t| t.device()).unwrap_or(Device::Cpu);
    for t in ts.iter().skip(1) {
        if t.device() != d {
            return Err(Error::DeviceMismatch {
                op,
                a: format!("{} {}", d, ts[0].shape()),
                b: format!("{} {}", t.device(), t.shape()),
            });
        }
    }
    Ok(d)
}

/// The common dtype of an op's inputs.
pub fn same_dtype(op: &'static str, ts: &[&Tensor]) -> Result<DType> {
    let d = ts.first().map(|t| t.dtype()).unwrap_or(DType::F32);
    for t in ts.iter().skip(1) {
        if t.dtype() != d {
            return Err(Error::DType {
                op,
                dtype: t.dtype().to_string(),
                msg: format!("mixed with {d}"),
            });
        }
    }
    Ok(d)
}
