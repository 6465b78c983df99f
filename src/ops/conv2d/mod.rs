//! 2-D convolution (groups = 1), PyTorch semantics, forward and backward.
//!
//! Both devices lower the convolution to matrix products over the im2col matrix of an
//! image, `[Cin * kh * kw, OH * OW]` (row `(c * kh + ki) * kw + kj`, column
//! `oh * OW + ow`): `y = W @ col`, `gcol = Wᵀ @ gy` (folded back by col2im),
//! `gW = gy @ colᵀ`. A 1x1 stride-1 unpadded convolution skips im2col: the image is
//! its own col matrix.
//!
//! CPU (cpu.rs): the output columns are cut into chunks whose
//! im2col slice stays in L2; the chunks of all images run as parallel tasks, each an
//! im2col and a single-threaded `gemm` call. In the CPU backward, dL/dx of a stride-1
//! conv is a forward conv of dL/dy (no col2im); dL/dw cuts the reduction into fixed
//! partial sums when dL/dw is small beside it (the stem's from pixel-major im2col
//! slices, which the GEMM reads without repacking). 3x3 stride-1 convolutions with enough
//! tiles (the FPN's, the RPN head's, ResNet's 3x3 layers) take Winograd's F(2x2, 3x3)
//! instead, forward and both gradients (winograd.rs). CUDA (cuda.rs):
//! kernels/conv.cu (im2col, col2im) and the matmul kernels.
//!
//! This file holds the API, the shape checks and the dispatch by device; cpu.rs (with
//! winograd.rs) and cuda.rs hold one backend each.

use crate::autograd::record;
use crate::device::Device;
use crate::error::{Error, Result};
use crate::tensor::{same_device, same_dtype, Tensor};
use crate::with_dtype;

use super::gpu_dev;
use super::linear::gpu_bias_grad;

mod cpu;
mod cuda;
mod winograd;

/// Stride, padding and dilation of a convolution as (vertical, horizontal), in
/// pixels. Padding is zero padding on both sides.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Conv2dParams {
    /// Step between output positions `(sh, sw)`.
    pub stride: (usize, usize),
    /// Zero rows and columns added on each side `(ph, pw)`.
    pub padding: (usize, usize),
    /// Spacing between kernel taps `(dh, dw)`; 1 is a dense kernel.
    pub dilation: (usize, usize),
}

impl Default for Conv2dParams {
    /// Stride 1, no padding, no dilation.
    fn default() -> Self {
        Conv2dParams {
            stride: (1, 1),
            padding: (0, 0),
            dilation: (1, 1),
        }
    }
}

impl Conv2dParams {
    /// The same stride, padding and dilation along both axes.
    pub fn new(stride: usize, padding: usize, dilation: usize) -> Self {
        Conv2dParams {
            stride: (stride, stride),
            padding: (padding, padding),
            dilation: (dilation, dilation),
        }
    }
}

/// Output height and width of a convolution of an `h x w` input with a `kh x kw`
/// kernel: `(h + 2 ph - dh (kh - 1) - 1) / sh + 1`, per axis. `None` when the dilated
/// kernel does not fit in the padded input (or a stride or dilation is zero).
pub fn conv2d_output_size(
    (h, w): (usize, usize),
    (kh, kw): (usize, usize),
    p: &Conv2dParams,
) -> Option<(usize, usize)> {
    let axis = |n: usize, k: usize, s: usize, pad: usize, d: usize| {
        let span = d.checked_mul(k.checked_sub(1)?)?.checked_add(1)?;
        let padded = n + 2 * pad;
        (s > 0 && d > 0 && padded >= span).then(|| (padded - span) / s + 1)
    };
    Some((
        axis(h, kh, p.stride.0, p.padding.0, p.dilation.0)?,
        axis(w, kw, p.stride.1, p.padding.1, p.dilation.1)?,
    ))
}

/// The sizes of one convolution, checked against each other.
#[derive(Clone, Copy, Debug)]
struct Geom {
    n: usize,
    cin: usize,
    h: usize,
    w: usize,
    cout: usize,
    kh: usize,
    kw: usize,
    oh: usize,
    ow: usize,
    p: Conv2dParams,
}

impl Geom {
    /// Rows of the im2col matrix.
    fn k(&self) -> usize {
        self.cin * self.kh * self.kw
    }
    fn hw(&self) -> usize {
        self.h * self.w
    }
    fn ohw(&self) -> usize {
        self.oh * self.ow
    }
    /// A 1x1 stride-1 unpadded convolution: the input is already the col matrix.
    fn pointwise(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.p.stride == (1, 1) && self.p.padding == (0, 0)
    }
    fn x_dims(&self) -> [usize; 4] {
        [self.n, self.cin, self.h, self.w]
    }
    fn w_dims(&self) -> [usize; 4] {
        [self.cout, self.cin, self.kh, self.kw]
    }
    fn y_dims(&self) -> [usize; 4] {
        [self.n, self.cout, self.oh, self.ow]
    }
}

fn geometry(op: &'static str, x: &[usize], w: &[usize], p: &Conv2dParams) -> Result<Geom> {
    let (&[n, cin, h, wd], &[cout, wcin, kh, kw]) = (x, w) else {
        return Err(Error::shape(
            op,
            format!(
                "input must be [N, C, H, W] and weight [Cout, Cin, kh, kw], got {x:?} and {w:?}"
            ),
        ));
    };
    if cin != wcin {
        return Err(Error::shape(
            op,
            format!("input {x:?} has {cin} channels but weight {w:?} expects {wcin}"),
        ));
    }
    if p.stride.0 == 0 || p.stride.1 == 0 || p.dilation.0 == 0 || p.dilation.1 == 0 {
        return Err(Error::invalid(
            op,
            format!(
                "stride {:?} and dilation {:?} must be positive",
                p.stride, p.dilation
            ),
        ));
    }
    if kh == 0 || kw == 0 {
        return Err(Error::shape(
            op,
            format!("weight {w:?} has an empty kernel"),
        ));
    }
    let (oh, ow) = conv2d_output_size((h, wd), (kh, kw), p).ok_or_else(|| {
        Error::shape(
            op,
            format!(
                "kernel {kh}x{kw} with dilation {:?} is larger than input {x:?} padded by {:?}",
                p.dilation, p.padding
            ),
        )
    })?;
    Ok(Geom {
        n,
        cin,
        h,
        w: wd,
        cout,
        kh,
        kw,
        oh,
        ow,
        p: *p,
    })
}

fn check_bias(op: &'static str, b: Option<&Tensor>, cout: usize) -> Result<()> {
    match b {
        Some(b) if b.dims() != [cout] => Err(Error::shape(
            op,
            format!("bias {} for {cout} output channels", b.shape()),
        )),
        _ => Ok(()),
    }
}

/// 2-D convolution of `x: [N, Cin, H, W]` with `w: [Cout, Cin, kh, kw]` plus an
/// optional bias `b: [Cout]`, giving `[N, Cout, OH, OW]` (see [`conv2d_output_size`]).
/// Cross-correlation as in PyTorch, zero padding, groups = 1. Records the backward
/// (gx, gw, gb) when a tape is active.
pub fn conv2d(x: &Tensor, w: &Tensor, b: Option<&Tensor>, p: &Conv2dParams) -> Result<Tensor> {
    let y = conv2d_forward(x, w, b, p)?;
    let (xc, wc, pc) = (x.clone(), w.clone(), *p);
    let has_bias = b.is_some();
    let mut inputs = vec![x, w];
    inputs.extend(b);
    record("conv2d", &inputs, &y, move |gy, needs| {
        let needs = [needs[0], needs[1], has_bias && needs[2]];
        let g = conv2d_backward(&xc, &wc, gy, &pc, needs)?;
        let mut out = vec![g.gx, g.gw];
        if has_bias {
            out.push(g.gb);
        }
        Ok(out)
    });
    Ok(y)
}

/// [`conv2d`] without recording anything.
pub fn conv2d_forward(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    p: &Conv2dParams,
) -> Result<Tensor> {
    const OP: &str = "conv2d";
    let g = geometry(OP, x.dims(), w.dims(), p)?;
    check_bias(OP, b, g.cout)?;
    let mut all = vec![x, w];
    all.extend(b);
    match same_device(OP, &all)? {
        Device::Cpu => with_dtype!(same_dtype(OP, &all)?, T => {
            let ep = cpu::TileEpilogue {
                shift: b.map(|b| b.cpu_slice::<T>()).transpose()?,
                ..Default::default()
            };
            let y = cpu::forward(x.cpu_slice::<T>()?, w.cpu_slice::<T>()?, &ep, &g);
            Tensor::from_vec(y, g.y_dims())
        }),
        Device::Cuda(_) => cuda::forward(x, w, b, &g),
    }
}

/// The CPU forward with the fused epilogue `relu?(acc * scale + shift + residual)`
/// applied per output tile (see [`crate::ops::conv2d_fused`], which checks the
/// epilogue's shapes and devices before calling this).
pub(crate) fn conv2d_cpu_fused(
    x: &Tensor,
    w: &Tensor,
    p: &Conv2dParams,
    scale: Option<&Tensor>,
    shift: Option<&Tensor>,
    residual: Option<&Tensor>,
    relu: bool,
) -> Result<Tensor> {
    const OP: &str = "conv2d_fused";
    let g = geometry(OP, x.dims(), w.dims(), p)?;
    let mut all = vec![x, w];
    all.extend(scale);
    all.extend(shift);
    all.extend(residual);
    if same_device(OP, &all)? != Device::Cpu {
        return Err(Error::invalid(OP, "the CPU path got device tensors"));
    }
    with_dtype!(same_dtype(OP, &all)?, T => {
        let ep = cpu::TileEpilogue {
            scale: scale.map(|t| t.cpu_slice::<T>()).transpose()?,
            shift: shift.map(|t| t.cpu_slice::<T>()).transpose()?,
            residual: residual.map(|t| t.cpu_slice::<T>()).transpose()?,
            relu,
        };
        let y = cpu::forward(x.cpu_slice::<T>()?, w.cpu_slice::<T>()?, &ep, &g);
        Tensor::from_vec(y, g.y_dims())
    })
}

/// Inference on the CPU: `relu(conv(x, w) + b)` (`x: [N, Cin, H, W]`,
/// `w: [Cout, Cin, kh, kw]`, `b: [Cout]`) followed by a 1x1 convolution
/// `w2: [C2, Cout, 1, 1]` plus `b2: [C2]`, computed tile by tile so the first
/// conv's output is never stored. Returns the second conv's output split by
/// channel into `[N, splits[i], OH, OW]` tensors (`splits` sums to `C2`): the RPN
/// head's objectness and box deltas. Records nothing; f32 or f64, CPU tensors only.
pub fn conv2d_relu_pointwise_cpu(
    x: &Tensor,
    (w, b): (&Tensor, Option<&Tensor>),
    p: &Conv2dParams,
    (w2, b2): (&Tensor, Option<&Tensor>),
    splits: &[usize],
) -> Result<Vec<Tensor>> {
    const OP: &str = "conv2d_relu_pointwise_cpu";
    if crate::autograd::is_recording() {
        return Err(Error::invalid(
            OP,
            "records no backward; use conv2d, relu and conv2d under a tape",
        ));
    }
    let g = geometry(OP, x.dims(), w.dims(), p)?;
    check_bias(OP, b, g.cout)?;
    let c2: usize = splits.iter().sum();
    if w2.dims() != [c2, g.cout, 1, 1] {
        return Err(Error::shape(
            OP,
            format!(
                "second weight {} for {} input and {c2} output channels (splits {splits:?})",
                w2.shape(),
                g.cout
            ),
        ));
    }
    check_bias(OP, b2, c2)?;
    let mut all = vec![x, w, w2];
    all.extend(b);
    all.extend(b2);
    if same_device(OP, &all)? != Device::Cpu {
        return Err(Error::invalid(OP, "the CPU path got device tensors"));
    }
    with_dtype!(same_dtype(OP, &all)?, T => {
        let ep = cpu::TileEpilogue {
            shift: b.map(|t| t.cpu_slice::<T>()).transpose()?,
            relu: true,
            ..Default::default()
        };
        let head = cpu::PointwiseHead {
            w2: w2.cpu_slice::<T>()?,
            b2: b2.map(|t| t.cpu_slice::<T>()).transpose()?,
            splits,
        };
        let outs = cpu::forward_pointwise_head(x.cpu_slice::<T>()?, w.cpu_slice::<T>()?, &ep, &head, &g);
        outs.into_iter()
            .zip(splits)
            .map(|(y, &c)| Tensor::from_vec(y, [g.n, c, g.oh, g.ow]))
            .collect()
    })
}

/// The gradients of [`conv2d`]; each is `None` unless asked for.
#[derive(Clone, Debug, Default)]
pub struct Conv2dGrads {
    /// dL/dx, `[N, Cin, H, W]`.
    pub gx: Option<Tensor>,
    /// dL/dw, `[Cout, Cin, kh, kw]`.
    pub gw: Option<Tensor>,
    /// dL/db, `[Cout]`.
    pub gb: Option<Tensor>,
}

/// The backward of [`conv2d`] for upstream `gy: [N, Cout, OH, OW]`: the gradients
/// flagged in `needs` (x, w, b). Records nothing.
pub fn conv2d_backward(
    x: &Tensor,
    w: &Tensor,
    gy: &Tensor,
    p: &Conv2dParams,
    needs: [bool; 3],
) -> Result<Conv2dGrads> {
    use crate::autograd::timed;
    Ok(Conv2dGrads {
        gx: needs[0]
            .then(|| timed("conv2d.dgrad", || conv2d_backward_input(gy, w, x.dims(), p)))
            .transpose()?,
        gw: needs[1]
            .then(|| {
                timed("conv2d.wgrad", || {
                    conv2d_backward_weight(x, gy, w.dims(), p)
                })
            })
            .transpose()?,
        gb: needs[2]
            .then(|| timed("conv2d.bias", || conv2d_backward_bias(gy)))
            .transpose()?,
    })
}

fn check_grad_out(op: &'static str, gy: &Tensor, g: &Geom) -> Result<()> {
    if gy.dims() != g.y_dims() {
        return Err(Error::shape(
            op,
            format!("gradient {} for output {:?}", gy.shape(), g.y_dims()),
        ));
    }
    Ok(())
}

/// dL/dx `[N, Cin, H, W]` (`x_dims`) of a convolution with weight `w` given
/// `gy: [N, Cout, OH, OW]`: `col2im(Wᵀ @ gy)`.
pub fn conv2d_backward_input(
    gy: &Tensor,
    w: &Tensor,
    x_dims: &[usize],
    p: &Conv2dParams,
) -> Result<Tensor> {
    const OP: &str = "conv2d_backward_input";
    let g = geometry(OP, x_dims, w.dims(), p)?;
    check_grad_out(OP, gy, &g)?;
    match same_device(OP, &[gy, w])? {
        Device::Cpu => with_dtype!(same_dtype(OP, &[gy, w])?, T => {
            let gx = cpu::grad_input(gy.cpu_slice::<T>()?, w.cpu_slice::<T>()?, &g);
            Tensor::from_vec(gx, g.x_dims())
        }),
        Device::Cuda(_) => cuda::grad_input(gy, w, &g),
    }
}

/// dL/dw `[Cout, Cin, kh, kw]` (`w_dims`) of a convolution of `x` given
/// `gy: [N, Cout, OH, OW]`: `sum over images of gy @ colᵀ`.
pub fn conv2d_backward_weight(
    x: &Tensor,
    gy: &Tensor,
    w_dims: &[usize],
    p: &Conv2dParams,
) -> Result<Tensor> {
    const OP: &str = "conv2d_backward_weight";
    let g = geometry(OP, x.dims(), w_dims, p)?;
    check_grad_out(OP, gy, &g)?;
    match same_device(OP, &[x, gy])? {
        Device::Cpu => with_dtype!(same_dtype(OP, &[x, gy])?, T => {
            let gw = cpu::grad_weight(x.cpu_slice::<T>()?, gy.cpu_slice::<T>()?, &g);
            Tensor::from_vec(gw, g.w_dims())
        }),
        Device::Cuda(_) => cuda::grad_weight(x, gy, &g),
    }
}

/// dL/db `[Cout]` given `gy: [N, Cout, OH, OW]`: the sum over images and positions.
pub fn conv2d_backward_bias(gy: &Tensor) -> Result<Tensor> {
    const OP: &str = "conv2d_backward_bias";
    let &[n, c, oh, ow] = gy.dims() else {
        return Err(Error::shape(
            OP,
            format!("gradient must be [N, C, H, W], got {}", gy.shape()),
        ));
    };
    match gy.device() {
        Device::Cpu => with_dtype!(gy.dtype(), T => {
            let gb = cpu::grad_bias(gy.cpu_slice::<T>()?, n, c, oh * ow);
            Tensor::from_vec(gb, [c])
        }),
        Device::Cuda(_) => {
            let dev = gpu_dev(OP, gy)?;
            gpu_bias_grad(&dev, gy, (n, c, oh * ow))
        }
    }
}
