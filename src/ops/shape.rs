//! Copies that rearrange elements: concat, narrow, stack, flatten, permute and
//! index_select. Every dtype (f32/f64/i64 on the CPU, f32/i64 on CUDA) and
//! differentiable for float tensors.
//!
//! The CUDA kernels (kernels/shape.cu) move 32-bit words, so the same kernel copies
//! f32 (one word per element) and i64 (two words) tensors.

use crate::autograd::record;
use crate::device::gpu::{GpuBuffer, GpuDevice, KernelArg};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::tensor::{same_device, same_dtype, DType, Shape, Tensor};

use super::launch_elems;

/// Run `$body` with `$T` the Rust type of any dtype (shape ops copy i64 too).
macro_rules! with_any_dtype {
    ($dtype:expr, $T:ident => $body:expr) => {
        match $dtype {
            DType::F32 => {
                type $T = f32;
                $body
            }
            DType::F64 => {
                type $T = f64;
                $body
            }
            DType::I64 => {
                type $T = i64;
                $body
            }
            DType::BF16 => {
                return Err(Error::DType {
                    op: "shape op",
                    dtype: "bf16".into(),
                    msg: "convert bf16 tensors with to_dtype(F32) first".into(),
                })
            }
        }
    };
}

/// Concatenate along `dim`: inputs of the same rank, dtype and device whose sizes
/// agree except along `dim`. E.g. per-level anchors `[A_l, 4]` -> `[sum A_l, 4]`.
pub fn concat(xs: &[&Tensor], dim: usize) -> Result<Tensor> {
    const OP: &str = "concat";
    let first = xs
        .first()
        .ok_or_else(|| Error::invalid(OP, "no tensors to concatenate"))?;
    same_device(OP, xs)?;
    let dtype = same_dtype(OP, xs)?;
    let rank = first.shape().rank();
    if dim >= rank {
        return Err(Error::invalid(
            OP,
            format!("dim {dim} out of range for shape {}", first.shape()),
        ));
    }
    for x in xs {
        let fits = x.shape().rank() == rank
            && (0..rank).all(|d| d == dim || x.dims()[d] == first.dims()[d]);
        if !fits {
            return Err(Error::shape(
                OP,
                format!(
                    "{} vs {} (sizes must agree except in dim {dim})",
                    first.shape(),
                    x.shape()
                ),
            ));
        }
    }
    let sizes: Vec<usize> = xs.iter().map(|x| x.dims()[dim]).collect();
    let mut out_dims = first.dims().to_vec();
    out_dims[dim] = sizes.iter().sum();
    let out_shape = Shape::new(out_dims);
    let (outer, total, inner) = split(&out_shape, dim);
    let mut out = Filler::new(&out_shape, dtype, first.device(), false)?;
    let mut offset = 0;
    for (x, &s) in xs.iter().zip(&sizes) {
        out.copy_rows(
            x,
            outer,
            s * inner,
            0,
            total * inner,
            offset * inner,
            s * inner,
        )?;
        offset += s;
    }
    let y = out.finish()?;
    record(OP, xs, &y, move |gy, needs| {
        let mut grads = Vec::with_capacity(sizes.len());
        let mut offset = 0;
        for (&s, &need) in sizes.iter().zip(needs) {
            grads.push(if need {
                Some(narrow_plain(gy, dim, offset, s)?)
            } else {
                None
            });
            offset += s;
        }
        Ok(grads)
    });
    Ok(y)
}

/// Elements `start .. start + len` of `x` along `dim` (a copy); the other dims keep
/// their sizes. Also known as slicing.
#[doc(alias = "slice")]
pub fn narrow(x: &Tensor, dim: usize, start: usize, len: usize) -> Result<Tensor> {
    let rank = x.shape().rank();
    if dim >= rank || start.checked_add(len).is_none_or(|end| end > x.dims()[dim]) {
        return Err(Error::invalid(
            "narrow",
            format!(
                "dim {dim}, start {start}, len {len} out of range for shape {}",
                x.shape()
            ),
        ));
    }
    let y = narrow_plain(x, dim, start, len)?;
    let full = x.shape().clone();
    record("narrow", &[x], &y, move |gy, _| {
        Ok(vec![Some(narrow_backward(gy, &full, dim, start)?)])
    });
    Ok(y)
}

/// Stack same-shaped tensors along a new axis `dim` (0 ..= rank).
pub fn stack(xs: &[&Tensor], dim: usize) -> Result<Tensor> {
    let first = xs
        .first()
        .ok_or_else(|| Error::invalid("stack", "no tensors to stack"))?;
    if dim > first.shape().rank() {
        return Err(Error::invalid(
            "stack",
            format!("dim {dim} out of range for shape {}", first.shape()),
        ));
    }
    if let Some(x) = xs.iter().find(|x| x.shape() != first.shape()) {
        return Err(Error::shape(
            "stack",
            format!("{} vs {}", first.shape(), x.shape()),
        ));
    }
    let mut dims = first.dims().to_vec();
    dims.insert(dim, 1);
    let expanded = xs
        .iter()
        .map(|x| super::reshape(x, dims.clone()))
        .collect::<Result<Vec<_>>>()?;
    concat(&expanded.iter().collect::<Vec<_>>(), dim)
}

/// Merge dims `start_dim ..= end_dim` into one (PyTorch's `flatten`); shares storage.
/// E.g. `flatten(x, 1, 3)` maps `[N, C, H, W]` to `[N, C*H*W]`.
pub fn flatten(x: &Tensor, start_dim: usize, end_dim: usize) -> Result<Tensor> {
    let dims = x.dims();
    if start_dim > end_dim || end_dim >= dims.len() {
        return Err(Error::invalid(
            "flatten",
            format!(
                "dims {start_dim}..={end_dim} out of range for shape {}",
                x.shape()
            ),
        ));
    }
    let mut out = dims[..start_dim].to_vec();
    out.push(dims[start_dim..=end_dim].iter().product());
    out.extend_from_slice(&dims[end_dim + 1..]);
    super::reshape(x, out)
}

/// Reorder the axes: output axis `a` is input axis `perm[a]` (a copy, contiguous).
/// E.g. `permute(x, &[0, 2, 3, 1])` maps the RPN head's `[N, A*4, H, W]` to
/// `[N, H, W, A*4]`.
pub fn permute(x: &Tensor, perm: &[usize]) -> Result<Tensor> {
    let rank = x.shape().rank();
    let mut seen = vec![false; rank];
    let valid = perm.len() == rank
        && perm
            .iter()
            .all(|&p| p < rank && !std::mem::replace(&mut seen[p], true));
    if !valid {
        return Err(Error::invalid(
            "permute",
            format!("{perm:?} is not a permutation of the axes of {}", x.shape()),
        ));
    }
    let y = permute_plain(x, perm)?;
    let mut inverse = vec![0; rank];
    for (a, &p) in perm.iter().enumerate() {
        inverse[p] = a;
    }
    record("permute", &[x], &y, move |gy, _| {
        Ok(vec![Some(permute_plain(gy, &inverse)?)])
    });
    Ok(y)
}

/// Gather slices of `x` along `dim`: `y[.., r, ..] = x[.., idx[r], ..]` with `idx` an
/// i64 tensor `[K]` of indices in `[0, x.dims()[dim])` (repeats allowed), so `y` has
/// size `K` in `dim`. E.g. the sampled anchors' rows `[K, 4]` of `[A, 4]` with dim 0.
/// The backward adds each output slice into the slice it came from.
pub fn index_select(x: &Tensor, dim: usize, idx: &Tensor) -> Result<Tensor> {
    const OP: &str = "index_select";
    same_device(OP, &[x, idx])?;
    if idx.dtype() != DType::I64 || idx.shape().rank() != 1 {
        return Err(Error::DType {
            op: OP,
            dtype: idx.dtype().to_string(),
            msg: format!("indices must be a rank-1 i64 tensor, got {}", idx.shape()),
        });
    }
    if dim >= x.shape().rank() {
        return Err(Error::invalid(
            OP,
            format!("dim {dim} out of range for shape {}", x.shape()),
        ));
    }
    let mut dims = x.dims().to_vec();
    dims[dim] = idx.numel();
    let out_shape = Shape::new(dims);
    let y = match x.device() {
        Device::Cpu => {
            with_any_dtype!(x.dtype(), T => cpu_index_select::<T>(x, dim, idx, &out_shape))?
        }
        Device::Cuda(_) => gpu_index_select(x, dim, idx, &out_shape)?,
    };
    let (full, ic) = (x.shape().clone(), idx.clone());
    record(OP, &[x], &y, move |gy, _| {
        Ok(vec![Some(index_add(gy, &full, dim, &ic)?)])
    });
    Ok(y)
}

// ------------------------------------------------------------------ geometry

/// `(outer, size, inner)` of a shape around `dim`: the element at `(o, s, i)` sits at
/// `(o * size + s) * inner + i`.
fn split(shape: &Shape, dim: usize) -> (usize, usize, usize) {
    let d = shape.dims();
    (
        d[..dim].iter().product(),
        d[dim],
        d[dim + 1..].iter().product(),
    )
}

/// An element type the CPU paths copy.
trait HostElem: crate::tensor::pool::Pooled + Default {
    fn host(t: &Tensor) -> Result<&[Self]>;
    fn tensor(v: Vec<Self>, shape: Shape) -> Result<Tensor>;
}

impl HostElem for f32 {
    fn host(t: &Tensor) -> Result<&[Self]> {
        t.cpu_slice()
    }
    fn tensor(v: Vec<Self>, shape: Shape) -> Result<Tensor> {
        Tensor::from_vec(v, shape)
    }
}

impl HostElem for f64 {
    fn host(t: &Tensor) -> Result<&[Self]> {
        t.cpu_slice()
    }
    fn tensor(v: Vec<Self>, shape: Shape) -> Result<Tensor> {
        Tensor::from_vec(v, shape)
    }
}

impl HostElem for i64 {
    fn host(t: &Tensor) -> Result<&[Self]> {
        t.cpu_i64()
    }
    fn tensor(v: Vec<Self>, shape: Shape) -> Result<Tensor> {
        Tensor::from_vec_i64(v, shape)
    }
}

// ------------------------------------------------------------------ block copies

/// 32-bit words per element of a CUDA tensor.
fn words(dtype: DType) -> usize {
    dtype.size() / 4
}

/// The device of a CUDA tensor for a shape op (f32 or i64).
fn shape_dev(t: &Tensor) -> Result<GpuDevice> {
    Ok(t.gpu()?.dev.clone())
}

/// An output that block copies write into (zero-filled where they leave gaps), then becomes a tensor.
enum Filler {
    Cpu(CpuFill),
    Gpu {
        dev: GpuDevice,
        buf: GpuBuffer,
        shape: Shape,
        dtype: DType,
    },
}

enum CpuFill {
    F32(Vec<f32>, Shape),
    F64(Vec<f64>, Shape),
    I64(Vec<i64>, Shape),
}

impl Filler {
    /// `zeroed`: whether the copies leave part of the output unwritten.
    fn new(shape: &Shape, dtype: DType, device: Device, zeroed: bool) -> Result<Filler> {
        let n = shape.numel();
        Ok(match device {
            Device::Cpu => Filler::Cpu(match dtype {
                // Zeroed, recycled from the host pool when one of this size is free.
                DType::F32 => CpuFill::F32(crate::tensor::pool::take_zeroed(n), shape.clone()),
                DType::F64 => CpuFill::F64(crate::tensor::pool::take_zeroed(n), shape.clone()),
                DType::I64 => CpuFill::I64(vec![0; n], shape.clone()),
                DType::BF16 => {
                    return Err(Error::DType {
                        op: "shape op",
                        dtype: "bf16".into(),
                        msg: "convert bf16 tensors with to_dtype(F32) first".into(),
                    })
                }
            }),
            Device::Cuda(o) => {
                let dev = crate::device::gpu::device(o)?;
                let buf = if zeroed {
                    dev.alloc_zeroed(n * dtype.size())?
                } else {
                    dev.alloc(n * dtype.size())?
                };
                Filler::Gpu {
                    dev,
                    buf,
                    shape: shape.clone(),
                    dtype,
                }
            }
        })
    }

    /// `out[r * dst_stride + dst_off + j] = src[r * src_stride + src_off + j]` for
    /// `r < rows`, `j < len`, in elements. `src` has the output's dtype and device.
    #[allow(clippy::too_many_arguments)]
    fn copy_rows(
        &mut self,
        src: &Tensor,
        rows: usize,
        src_stride: usize,
        src_off: usize,
        dst_stride: usize,
        dst_off: usize,
        len: usize,
    ) -> Result<()> {
        let g = [src_stride, src_off, dst_stride, dst_off, len];
        match self {
            Filler::Cpu(CpuFill::F32(v, _)) => host_copy_rows(f32::host(src)?, v, rows, g),
            Filler::Cpu(CpuFill::F64(v, _)) => host_copy_rows(f64::host(src)?, v, rows, g),
            Filler::Cpu(CpuFill::I64(v, _)) => host_copy_rows(i64::host(src)?, v, rows, g),
            Filler::Gpu {
                dev, buf, dtype, ..
            } => {
                let w = words(*dtype) as i64;
                let [ss, so, ds, dof, l] = g.map(|v| v as i64 * w);
                let src_arg = src.gpu()?.buf.arg();
                launch_elems(
                    dev,
                    "block_copy_u32",
                    rows * len * w as usize,
                    &[
                        src_arg,
                        KernelArg::I64(ss),
                        KernelArg::I64(so),
                        buf.arg(),
                        KernelArg::I64(ds),
                        KernelArg::I64(dof),
                        KernelArg::I64(rows as i64),
                        KernelArg::I64(l),
                    ],
                )
            }
        }
    }

    fn finish(self) -> Result<Tensor> {
        match self {
            Filler::Cpu(CpuFill::F32(v, s)) => Tensor::from_vec(v, s),
            Filler::Cpu(CpuFill::F64(v, s)) => Tensor::from_vec(v, s),
            Filler::Cpu(CpuFill::I64(v, s)) => Tensor::from_vec_i64(v, s),
            Filler::Gpu {
                dev,
                buf,
                shape,
                dtype,
            } => Ok(Tensor::from_gpu_typed(dev, buf, shape, dtype)),
        }
    }
}

/// `g` = [src_stride, src_off, dst_stride, dst_off, len]. The caller ensures the
/// ranges lie inside both slices; a dtype mismatch was an error before.
fn host_copy_rows<T: Copy>(src: &[T], dst: &mut [T], rows: usize, g: [usize; 5]) -> Result<()> {
    let [ss, so, ds, dof, len] = g;
    for r in 0..rows {
        dst[r * ds + dof..r * ds + dof + len].copy_from_slice(&src[r * ss + so..r * ss + so + len]);
    }
    Ok(())
}

/// narrow without checks or recording (also the backward of concat).
fn narrow_plain(x: &Tensor, dim: usize, start: usize, len: usize) -> Result<Tensor> {
    let mut dims = x.dims().to_vec();
    dims[dim] = len;
    let out_shape = Shape::new(dims);
    let (outer, size, inner) = split(x.shape(), dim);
    let mut out = Filler::new(&out_shape, x.dtype(), x.device(), false)?;
    out.copy_rows(
        x,
        outer,
        size * inner,
        start * inner,
        len * inner,
        0,
        len * inner,
    )?;
    out.finish()
}

/// Backward of narrow: zeros of `full` with `gy` placed at `start` along `dim`.
fn narrow_backward(gy: &Tensor, full: &Shape, dim: usize, start: usize) -> Result<Tensor> {
    let (outer, size, inner) = split(full, dim);
    let len = gy.dims()[dim];
    let mut out = Filler::new(full, gy.dtype(), gy.device(), true)?;
    out.copy_rows(
        gy,
        outer,
        len * inner,
        0,
        size * inner,
        start * inner,
        len * inner,
    )?;
    out.finish()
}

// ------------------------------------------------------------------ permute

/// Output dims and, per output axis, the source stride, with size-1 axes dropped and
/// axes that are contiguous in the source merged (`[N, C, H, W] -> [N, H, W, C]`
/// becomes a rank-3 gather `[N, H*W, C]`). Never empty: a single element is `[1]`.
fn permute_plan(dims: &[usize], perm: &[usize]) -> (Vec<usize>, Vec<usize>) {
    let mut in_strides = vec![1; dims.len()];
    for d in (0..dims.len().saturating_sub(1)).rev() {
        in_strides[d] = in_strides[d + 1] * dims[d + 1];
    }
    let mut out: Vec<(usize, usize)> = Vec::new();
    for &p in perm {
        if dims[p] == 1 {
            continue;
        }
        match out.last_mut() {
            Some((size, stride)) if *stride == in_strides[p] * dims[p] => {
                *size *= dims[p];
                *stride = in_strides[p];
            }
            _ => out.push((dims[p], in_strides[p])),
        }
    }
    if out.is_empty() {
        out.push((1, 1));
    }
    out.into_iter().unzip()
}

fn permute_plain(x: &Tensor, perm: &[usize]) -> Result<Tensor> {
    let out_shape = Shape::new(perm.iter().map(|&p| x.dims()[p]).collect::<Vec<_>>());
    match x.device() {
        Device::Cpu => with_any_dtype!(x.dtype(), T => cpu_permute::<T>(x, perm, out_shape)),
        Device::Cuda(_) => gpu_permute(x, perm, out_shape),
    }
}

fn cpu_permute<T: HostElem>(x: &Tensor, perm: &[usize], out_shape: Shape) -> Result<Tensor> {
    let src = T::host(x)?;
    let (dims, strides) = permute_plan(x.dims(), perm);
    // Every element is written.
    let mut out = crate::tensor::pool::take::<T>(x.numel());
    // Fixed-size chunks of the output in parallel; within a chunk an odometer over
    // the output index advances the source offset without divisions.
    const CHUNK: usize = 1 << 14;
    crate::device::cpu::for_chunks(&mut out, CHUNK, |c, chunk| {
        let mut idx = vec![0; dims.len()];
        let (mut rem, mut off) = (c * CHUNK, 0);
        for d in (0..dims.len()).rev() {
            idx[d] = rem % dims[d];
            off += idx[d] * strides[d];
            rem /= dims[d];
        }
        for o in chunk.iter_mut() {
            *o = src[off];
            for d in (0..dims.len()).rev() {
                idx[d] += 1;
                off += strides[d];
                if idx[d] < dims[d] {
                    break;
                }
                off -= idx[d] * strides[d];
                idx[d] = 0;
            }
        }
    });
    T::tensor(out, out_shape)
}

/// Largest rank kernels/shape.cu's permute takes after merging axes.
const PERMUTE_MAX_RANK: usize = 16;

fn gpu_permute(x: &Tensor, perm: &[usize], out_shape: Shape) -> Result<Tensor> {
    let dev = shape_dev(x)?;
    let (mut dims, mut strides) = permute_plan(x.dims(), perm);
    let w = words(x.dtype());
    if w > 1 {
        // An i64 element is `w` consecutive words: one more axis, always innermost.
        strides.iter_mut().for_each(|s| *s *= w);
        dims.push(w);
        strides.push(1);
    }
    if dims.len() > PERMUTE_MAX_RANK {
        return Err(Error::invalid(
            "permute",
            format!(
                "{} axes remain after merging for shape {} (CUDA takes at most {PERMUTE_MAX_RANK})",
                dims.len(),
                x.shape()
            ),
        ));
    }
    let meta: Vec<i64> = dims.iter().chain(&strides).map(|&v| v as i64).collect();
    // Uploaded once per distinct shape and kept (GpuDevice::constant): no host
    // copy per call, so a permute can be captured in a device graph.
    let meta_buf = dev.constant(bytemuck::cast_slice(&meta))?;
    let buf = dev.alloc(x.numel() * x.dtype().size())?;
    let n = x.numel() * w;
    launch_elems(
        &dev,
        "permute_u32",
        n,
        &[
            x.gpu()?.buf.arg(),
            buf.arg(),
            meta_buf.arg(),
            KernelArg::I32(dims.len() as i32),
            KernelArg::I64(n as i64),
        ],
    )?;
    Ok(Tensor::from_gpu_typed(dev, buf, out_shape, x.dtype()))
}

// ------------------------------------------------------------------ index_select

fn index_error(x_shape: &Shape, dim: usize, r: usize, value: Option<i64>) -> Error {
    let v = value.map(|v| format!(" = {v}")).unwrap_or_default();
    Error::invalid(
        "index_select",
        format!(
            "idx[{r}]{v} outside [0, {}) for dim {dim} of shape {x_shape}",
            x_shape.dims()[dim]
        ),
    )
}

fn cpu_index_select<T: HostElem>(
    x: &Tensor,
    dim: usize,
    idx: &Tensor,
    out_shape: &Shape,
) -> Result<Tensor> {
    let (src, ids) = (T::host(x)?, idx.cpu_i64()?);
    let (outer, size, inner) = split(x.shape(), dim);
    if let Some((r, &v)) = ids
        .iter()
        .enumerate()
        .find(|(_, &v)| v < 0 || v as usize >= size)
    {
        return Err(index_error(x.shape(), dim, r, Some(v)));
    }
    let k = ids.len();
    let mut out = vec![T::default(); out_shape.numel()];
    for o in 0..outer {
        for (r, &s) in ids.iter().enumerate() {
            let from = (o * size + s as usize) * inner;
            let to = (o * k + r) * inner;
            out[to..to + inner].copy_from_slice(&src[from..from + inner]);
        }
    }
    T::tensor(out, out_shape.clone())
}

fn gpu_index_select(x: &Tensor, dim: usize, idx: &Tensor, out_shape: &Shape) -> Result<Tensor> {
    let dev = shape_dev(x)?;
    let (outer, size, inner) = split(x.shape(), dim);
    let w = words(x.dtype());
    let k = idx.numel();
    let buf = dev.alloc(out_shape.numel() * x.dtype().size())?;
    // Eager: read back after the launch; in a deferred scope (a training step) the
    // device's flag table, read at the step's next check.
    let bad =
        crate::device::error_flags::flag(&dev, "index_select", "idx[{}] outside the source rows")?;
    launch_elems(
        &dev,
        "index_select_u32",
        outer * k * inner * w,
        &[
            x.gpu()?.buf.arg(),
            idx.gpu()?.buf.arg(),
            buf.arg(),
            bad.arg(),
            KernelArg::I64(outer as i64),
            KernelArg::I64(size as i64),
            KernelArg::I64(k as i64),
            KernelArg::I64((inner * w) as i64),
        ],
    )?;
    bad.finish(&dev, |r| index_error(x.shape(), dim, r, None))?;
    Ok(Tensor::from_gpu_typed(
        dev,
        buf,
        out_shape.clone(),
        x.dtype(),
    ))
}

/// Backward of index_select: zeros of `full` with each slice of `gy` added at
/// `idx[r]` along `dim`.
fn index_add(gy: &Tensor, full: &Shape, dim: usize, idx: &Tensor) -> Result<Tensor> {
    let (outer, size, inner) = split(full, dim);
    let k = idx.numel();
    let expected = {
        let mut d = full.dims().to_vec();
        d[dim] = k;
        Shape::new(d)
    };
    if gy.shape() != &expected {
        return Err(Error::shape(
            "index_select backward",
            format!("upstream gradient {} for output {expected}", gy.shape()),
        ));
    }
    match gy.device() {
        Device::Cpu => crate::with_dtype!(gy.dtype(), T => {
            let (g, ids) = (gy.cpu_slice::<T>()?, idx.cpu_i64()?);
            let mut out = crate::tensor::pool::take_zeroed::<T>(full.numel());
            for o in 0..outer {
                for (r, &s) in ids.iter().enumerate() {
                    let to = (o * size + s as usize) * inner;
                    let from = (o * k + r) * inner;
                    for (a, &b) in out[to..to + inner].iter_mut().zip(&g[from..from + inner]) {
                        *a += b;
                    }
                }
            }
            Tensor::from_vec(out, full.clone())
        }),
        Device::Cuda(_) => {
            let dev = super::gpu_dev("index_select backward", gy)?;
            let gx = Tensor::gpu_zeros(&dev, full.clone())?;
            if k == 0 {
                return Ok(gx); // nothing was selected: a zero gradient
            }
            launch_elems(
                &dev,
                "index_add_f32",
                outer * inner,
                &[
                    super::arg(gy)?,
                    super::arg(idx)?,
                    super::arg(&gx)?,
                    KernelArg::I64(outer as i64),
                    KernelArg::I64(size as i64),
                    KernelArg::I64(k as i64),
                    KernelArg::I64(inner as i64),
                ],
            )?;
            Ok(gx)
        }
    }
}
