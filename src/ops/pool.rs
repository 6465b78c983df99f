//! max_pool2d: PyTorch's `F.max_pool2d` (ceil_mode false, dilation 1).
//!
//! The window at output (oh, ow) covers input rows `oh * stride - padding ..` of
//! height `kernel`; padding acts as -inf, so padded cells never win. The output is
//! `floor((H + 2 * padding - kernel) / stride) + 1` per axis. The argmax of each window
//! is the first maximum in row-major scan order (a later equal value does not replace
//! it), except that a NaN always wins, as in PyTorch; the backward routes each
//! gradient to that argmax.

use rayon::prelude::*;

use crate::autograd::{is_recording, record};
use crate::device::gpu::KernelArg;
use crate::device::Device;
use crate::error::{Error, Result};
use crate::tensor::{DType, Element, Shape, Tensor};
use crate::with_dtype;

use super::{arg, gpu_dev, launch_elems};

/// A (height, width) pair of pixels: `3.into()` is `(3, 3)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Size2d {
    /// Along H (rows), in pixels.
    pub h: usize,
    /// Along W (columns), in pixels.
    pub w: usize,
}

impl From<usize> for Size2d {
    fn from(v: usize) -> Self {
        Size2d { h: v, w: v }
    }
}

impl From<(usize, usize)> for Size2d {
    fn from((h, w): (usize, usize)) -> Self {
        Size2d { h, w }
    }
}

impl From<[usize; 2]> for Size2d {
    fn from([h, w]: [usize; 2]) -> Self {
        Size2d { h, w }
    }
}

/// Kernel, stride and padding of a 2-D pooling window, in pixels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pool2d {
    /// Window size.
    pub kernel: Size2d,
    /// Step between windows.
    pub stride: Size2d,
    /// Implicit -inf border added on each side.
    pub padding: Size2d,
}

impl Pool2d {
    /// Window parameters; each accepts a `usize` (square) or an `(h, w)` pair.
    pub fn new(
        kernel: impl Into<Size2d>,
        stride: impl Into<Size2d>,
        padding: impl Into<Size2d>,
    ) -> Self {
        Pool2d {
            kernel: kernel.into(),
            stride: stride.into(),
            padding: padding.into(),
        }
    }

    /// Output `(OH, OW)` for an input of `(H, W)`, or an error naming the sizes
    /// (PyTorch's rules: kernel and stride positive, padding at most half the kernel,
    /// output not empty).
    pub fn output_size(&self, h: usize, w: usize) -> Result<(usize, usize)> {
        const OP: &str = "max_pool2d";
        let (k, s, p) = (self.kernel, self.stride, self.padding);
        if k.h == 0 || k.w == 0 || s.h == 0 || s.w == 0 {
            return Err(Error::invalid(
                OP,
                format!("kernel {k:?} and stride {s:?} must be positive"),
            ));
        }
        if p.h > k.h / 2 || p.w > k.w / 2 {
            return Err(Error::invalid(
                OP,
                format!("padding {p:?} exceeds half the kernel {k:?}"),
            ));
        }
        if h + 2 * p.h < k.h || w + 2 * p.w < k.w {
            return Err(Error::shape(
                OP,
                format!("input {h}x{w} with padding {p:?} is smaller than the kernel {k:?}"),
            ));
        }
        Ok(((h + 2 * p.h - k.h) / s.h + 1, (w + 2 * p.w - k.w) / s.w + 1))
    }
}

/// Input and output geometry of one pooling call.
#[derive(Clone, Copy, Debug)]
struct Geom {
    planes: usize,
    h: usize,
    w: usize,
    oh: usize,
    ow: usize,
    p: Pool2d,
}

fn geometry(op: &'static str, dims: &[usize], p: Pool2d) -> Result<Geom> {
    if dims.len() != 4 {
        return Err(Error::shape(
            op,
            format!("input {dims:?} is not [N, C, H, W]"),
        ));
    }
    let (oh, ow) = p.output_size(dims[2], dims[3])?;
    // The kernels index within a plane with 32-bit ints.
    if dims[2] * dims[3] > i32::MAX as usize {
        return Err(Error::shape(
            op,
            format!("input plane {}x{} exceeds 2^31 elements", dims[2], dims[3]),
        ));
    }
    Ok(Geom {
        planes: dims[0] * dims[1],
        h: dims[2],
        w: dims[3],
        oh,
        ow,
        p,
    })
}

fn float_input(op: &'static str, t: &Tensor) -> Result<()> {
    if t.dtype() == DType::I64 {
        return Err(Error::DType {
            op,
            dtype: "i64".into(),
            msg: format!("input {} must be a float tensor", t.shape()),
        });
    }
    Ok(())
}

/// Max pooling of `x` `[N, C, H, W]` to `[N, C, OH, OW]` (see the module docs for the
/// window and tie rules). `kernel`, `stride` and `padding` are pixels, a `usize` or
/// an `(h, w)` pair. Differentiable in `x`.
pub fn max_pool2d(
    x: &Tensor,
    kernel: impl Into<Size2d>,
    stride: impl Into<Size2d>,
    padding: impl Into<Size2d>,
) -> Result<Tensor> {
    let p = Pool2d::new(kernel, stride, padding);
    // bf16 runs natively through `forward` (the maximum of bf16 values is one of
    // them); the backward is the f32 one, from the indices.
    super::mixed::all_bf16("max_pool2d", &[x])?;
    // Indices are only worth their memory when a backward may follow.
    if !is_recording() {
        return forward(x, p, false).map(|(y, _)| y);
    }
    let (y, idx) = forward(x, p, true)?;
    let idx = idx.expect("forward with indices returns them");
    let in_shape = x.shape().clone();
    record("max_pool2d", &[x], &y, move |gy, _| {
        let gy = super::mixed::grad_f32(gy)?;
        Ok(vec![Some(max_pool2d_backward(&gy, &idx, &in_shape, p)?)])
    });
    Ok(y)
}

/// The output `[N, C, OH, OW]` and, per output, the argmax as a flat index `ih * W + iw`
/// into its input plane (i64, PyTorch's `return_indices=True`). Not recorded.
pub fn max_pool2d_with_indices(
    x: &Tensor,
    kernel: impl Into<Size2d>,
    stride: impl Into<Size2d>,
    padding: impl Into<Size2d>,
) -> Result<(Tensor, Tensor)> {
    let (y, idx) = forward(x, Pool2d::new(kernel, stride, padding), true)?;
    Ok((y, idx.expect("forward with indices returns them")))
}

fn forward(x: &Tensor, p: Pool2d, with_indices: bool) -> Result<(Tensor, Option<Tensor>)> {
    const OP: &str = "max_pool2d";
    float_input(OP, x)?;
    let g = geometry(OP, x.dims(), p)?;
    let out_shape = Shape::new(vec![x.dims()[0], x.dims()[1], g.oh, g.ow]);
    if x.dtype() == DType::BF16 {
        return forward_bf16(x, &g, out_shape, with_indices);
    }
    match x.device() {
        Device::Cpu => with_dtype!(x.dtype(), T => {
            let (y, idx) = cpu_forward::<T>(x.cpu_slice::<T>()?, &g, with_indices);
            let idx = idx.map(|i| Tensor::from_vec_i64(i, out_shape.clone())).transpose()?;
            Ok((Tensor::from_vec(y, out_shape)?, idx))
        }),
        Device::Cuda(_) => gpu_forward(x, &g, out_shape, with_indices),
    }
}

/// The bf16 forward: the CPU widens, pools in f32 and rounds (exact: the maximum is
/// one of the inputs); CUDA reads and writes bf16. Same values and indices.
fn forward_bf16(
    x: &Tensor,
    g: &Geom,
    out_shape: Shape,
    with_indices: bool,
) -> Result<(Tensor, Option<Tensor>)> {
    match x.device() {
        Device::Cpu => {
            let xw = x.to_dtype(DType::F32)?;
            let (y, idx) = cpu_forward::<f32>(xw.cpu_slice::<f32>()?, g, with_indices);
            let idx = idx
                .map(|i| Tensor::from_vec_i64(i, out_shape.clone()))
                .transpose()?;
            Ok((Tensor::from_vec(y, out_shape)?.to_dtype(DType::BF16)?, idx))
        }
        Device::Cuda(_) => gpu_forward(x, g, out_shape, with_indices),
    }
}

fn cpu_forward<T: Element>(x: &[T], g: &Geom, with_indices: bool) -> (Vec<T>, Option<Vec<i64>>) {
    let (ihw, ohw) = (g.h * g.w, g.oh * g.ow);
    // pool_plane writes every output: a recycled buffer from the host pool will do.
    let mut y = crate::tensor::pool::take::<T>(g.planes * ohw);
    if ohw == 0 {
        return (y, with_indices.then(Vec::new));
    }
    let plane_of = |p: usize| &x[p * ihw..(p + 1) * ihw];
    if with_indices {
        // pool_plane writes every index too.
        let mut idx = crate::tensor::pool::take::<i64>(g.planes * ohw);
        y.par_chunks_mut(ohw)
            .zip(idx.par_chunks_mut(ohw))
            .enumerate()
            .for_each(|(p, (yp, ip))| pool_plane(plane_of(p), g, yp, Some(ip)));
        (y, Some(idx))
    } else {
        y.par_chunks_mut(ohw)
            .enumerate()
            .for_each(|(p, yp)| pool_plane(plane_of(p), g, yp, None));
        (y, None)
    }
}

/// Max pooling of one input plane `xp` `[H, W]` into `yp` `[OH, OW]`, and the argmax
/// plane indices into `ip` when given.
fn pool_plane<T: Element>(xp: &[T], g: &Geom, yp: &mut [T], mut ip: Option<&mut [i64]>) {
    for oh in 0..g.oh {
        let (h0, h1) = window(oh, g.p.stride.h, g.p.padding.h, g.p.kernel.h, g.h);
        for ow in 0..g.ow {
            let (w0, w1) = window(ow, g.p.stride.w, g.p.padding.w, g.p.kernel.w, g.w);
            let mut best = T::neg_infinity();
            let mut arg = h0 * g.w + w0;
            for ih in h0..h1 {
                let row = &xp[ih * g.w + w0..ih * g.w + w1];
                for (k, &v) in row.iter().enumerate() {
                    if v > best || v.is_nan() {
                        best = v;
                        arg = ih * g.w + w0 + k;
                    }
                }
            }
            yp[oh * g.ow + ow] = best;
            if let Some(ip) = ip.as_deref_mut() {
                ip[oh * g.ow + ow] = arg as i64;
            }
        }
    }
}

/// Input range `[start, end)` covered by output `o` along one axis, clipped to the input.
fn window(o: usize, stride: usize, pad: usize, kernel: usize, size: usize) -> (usize, usize) {
    let start = (o * stride).saturating_sub(pad);
    let end = (o * stride + kernel).saturating_sub(pad).min(size);
    (start, end)
}

fn gpu_forward(
    x: &Tensor,
    g: &Geom,
    out_shape: Shape,
    with_indices: bool,
) -> Result<(Tensor, Option<Tensor>)> {
    // f32 or bf16 in, the same dtype out (the bf16 kernels compare in f32 and write
    // the maximum back unchanged: exact).
    let bf16 = x.dtype() == DType::BF16;
    let (dev, y) = if bf16 {
        let dev = super::mixed::gpu_dev_bf16("max_pool2d", x)?;
        let y = super::mixed::gpu_empty_bf16(&dev, out_shape.dims())?;
        (dev, y)
    } else {
        let dev = gpu_dev("max_pool2d", x)?;
        let y = Tensor::gpu_empty(&dev, out_shape.clone())?;
        (dev, y)
    };
    let idx = if with_indices {
        Some(Tensor::gpu_empty_i64(&dev, out_shape)?)
    } else {
        None
    };
    let mut args = vec![arg(x)?, arg(&y)?];
    if let Some(i) = &idx {
        args.push(arg(i)?);
    }
    args.extend(geom_args(g));
    let kernel = match (with_indices, bf16) {
        (true, false) => "max_pool2d_fwd_idx_f32",
        (false, false) => "max_pool2d_fwd_f32",
        (true, true) => "max_pool2d_fwd_idx_bf16",
        (false, true) => "max_pool2d_fwd_bf16",
    };
    launch_elems(&dev, kernel, y.numel(), &args)?;
    Ok((y, idx))
}

/// The geometry arguments every pooling kernel takes, in its order.
fn geom_args(g: &Geom) -> Vec<KernelArg> {
    let i = |v: usize| KernelArg::I32(v as i32);
    vec![
        KernelArg::I64(g.planes as i64),
        i(g.h),
        i(g.w),
        i(g.oh),
        i(g.ow),
        i(g.p.kernel.h),
        i(g.p.kernel.w),
        i(g.p.stride.h),
        i(g.p.stride.w),
        i(g.p.padding.h),
        i(g.p.padding.w),
    ]
}

/// dL/dx `[N, C, H, W]` of max pooling, from dL/dy `[N, C, OH, OW]` and the argmax
/// `indices` of [`max_pool2d_with_indices`]. `input_shape` is x's shape. The CPU
/// rejects an index outside its plane; the CUDA kernel gathers, for each input
/// pixel, the outputs whose window covers it and names it, so such an index is
/// dropped there.
pub fn max_pool2d_backward(
    gy: &Tensor,
    indices: &Tensor,
    input_shape: &Shape,
    p: Pool2d,
) -> Result<Tensor> {
    const OP: &str = "max_pool2d_backward";
    float_input(OP, gy)?;
    let g = geometry(OP, input_shape.dims(), p)?;
    let d = input_shape.dims();
    let out_dims = [d[0], d[1], g.oh, g.ow];
    if gy.dims() != out_dims || indices.dims() != out_dims {
        return Err(Error::shape(
            OP,
            format!(
                "gy {} and indices {} for input {input_shape} (output {out_dims:?})",
                gy.shape(),
                indices.shape()
            ),
        ));
    }
    if indices.dtype() != DType::I64 {
        return Err(Error::DType {
            op: OP,
            dtype: indices.dtype().to_string(),
            msg: "indices must be i64".into(),
        });
    }
    crate::tensor::same_device(OP, &[gy, indices])?;
    match gy.device() {
        Device::Cpu => with_dtype!(gy.dtype(), T => {
            let gx = cpu_backward::<T>(gy.cpu_slice::<T>()?, indices.cpu_i64()?, &g)?;
            Tensor::from_vec(gx, input_shape.clone())
        }),
        Device::Cuda(_) => {
            let dev = gpu_dev(OP, gy)?;
            let gx = Tensor::gpu_empty(&dev, input_shape.clone())?;
            let mut args = vec![arg(gy)?, arg(indices)?, arg(&gx)?];
            args.extend(geom_args(&g));
            launch_elems(&dev, "max_pool2d_bwd_f32", gx.numel(), &args)?;
            Ok(gx)
        }
    }
}

/// Scatter each output gradient onto its argmax, plane by plane, in output order
/// from zero (so each input pixel's sum is `((0 + g_a) + g_b) + ...` over the outputs
/// naming it, in row-major output order).
///
/// Why not a zero-filled plane first: at the stem's 64x400x608 that is a second
/// pass over 62 MB (the plane, ~1 MB, no longer sits in cache when the scatter
/// reaches its first rows). Instead each plane is zeroed just ahead of the scatter:
/// `zeroed` is how much of it is zero so far, extended to the end of the row an index
/// falls in whenever an index lies past it. Real indices move through the plane row
/// by row, so the zeroing runs a few rows ahead of the writes and both stay in
/// cache; any other in-plane index (the function is public) is still exact, since
/// everything past `zeroed` is untouched and everything before it is zero or a sum.
fn cpu_backward<T: Element>(gy: &[T], idx: &[i64], g: &Geom) -> Result<Vec<T>> {
    let (ihw, ohw) = (g.h * g.w, g.oh * g.ow);
    // Every element is written (zeroed or a sum): a recycled buffer will do.
    let mut gx = crate::tensor::pool::take::<T>(g.planes * ihw);
    let in_plane = if ihw == 0 {
        idx.is_empty()
    } else {
        gx.par_chunks_mut(ihw).enumerate().all(|(plane, gp)| {
            let range = plane * ohw..(plane + 1) * ohw;
            scatter_plane(gp, &idx[range.clone()], &gy[range], g.w)
        })
    };
    if !in_plane {
        // A plane stopped at an index outside it: name the first such in `idx`.
        let outside = |&i: &i64| i < 0 || i as usize >= ihw;
        let bad = idx.iter().copied().find(outside).unwrap_or_default();
        return Err(Error::invalid(
            "max_pool2d_backward",
            format!("index {bad} outside an input plane of {} x {}", g.h, g.w),
        ));
    }
    Ok(gx)
}

/// `gp` (one input plane, `w` wide, contents unspecified) = the sum of `gy` scattered
/// onto `idx`, zeroed ahead of the writes (see [`cpu_backward`]); false when an index
/// lies outside the plane (`gp` is then partly written).
fn scatter_plane<T: Element>(gp: &mut [T], idx: &[i64], gy: &[T], w: usize) -> bool {
    let mut zeroed = 0;
    for (&i, &v) in idx.iter().zip(gy) {
        let Some(i) = usize::try_from(i).ok().filter(|&i| i < gp.len()) else {
            return false;
        };
        if i >= zeroed {
            let end = ((i / w + 1) * w).min(gp.len());
            gp[zeroed..end].fill(T::zero());
            zeroed = end;
        }
        gp[i] += v;
    }
    gp[zeroed..].fill(T::zero());
    true
}
