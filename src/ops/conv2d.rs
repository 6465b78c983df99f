//! 2-D convolution (groups = 1), PyTorch semantics, forward and backward.
//!
//! Both devices lower the convolution to matrix products over the im2col matrix of an
//! image, `[Cin * kh * kw, OH * OW]` (row `(c * kh + ki) * kw + kj`, column
//! `oh * OW + ow`): `y = W @ col`, `gcol = Wᵀ @ gy` (folded back by col2im),
//! `gW = gy @ colᵀ`. A 1x1 stride-1 unpadded convolution skips im2col: the image is
//! its own col matrix.
//!
//! CPU: the output columns are cut into chunks whose im2col slice stays in L2; the
//! chunks of all images run as parallel tasks, each an im2col and a single-threaded
//! `gemm` call. CUDA: kernels/conv.cu (im2col, col2im) and the matmul kernels.

use gemm::Parallelism;
use rayon::prelude::*;

use crate::autograd::record;
use crate::device::gpu::{GpuDevice, KernelArg};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::tensor::{same_device, same_dtype, Element, Tensor};
use crate::with_dtype;

use super::linear::{
    arg_at, gemm_into, gemm_ptr, gpu_bias_add, gpu_bias_grad, gpu_gemm, BatchMode, GpuMat, MatRef,
};
use super::{arg, gpu_dev, launch_elems};

/// Stride, padding and dilation of a convolution as (vertical, horizontal), in
/// pixels. Padding is zero padding on both sides.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Conv2dParams {
    pub stride: (usize, usize),
    pub padding: (usize, usize),
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
            let bs = match b {
                Some(b) => Some(b.cpu_slice::<T>()?),
                None => None,
            };
            let y = cpu::forward(x.cpu_slice::<T>()?, w.cpu_slice::<T>()?, bs, &g);
            Tensor::from_vec(y, g.y_dims())
        }),
        Device::Cuda(_) => cuda::forward(x, w, b, &g),
    }
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
    Ok(Conv2dGrads {
        gx: needs[0]
            .then(|| conv2d_backward_input(gy, w, x.dims(), p))
            .transpose()?,
        gw: needs[1]
            .then(|| conv2d_backward_weight(x, gy, w.dims(), p))
            .transpose()?,
        gb: needs[2].then(|| conv2d_backward_bias(gy)).transpose()?,
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

mod cpu {
    //! im2col + `gemm` on the CPU, generic over f32/f64.

    use super::*;

    /// Target size of one task's im2col slice, in elements: 1 MiB of f32, so the slice
    /// a task writes is still in L2 when its GEMM reads it.
    const COL_ELEMS: usize = 1 << 18;
    /// Fewest output columns per task: narrower GEMMs spend too long packing W.
    const MIN_COLS: usize = 256;
    /// Fewest output columns per task when there are too few tasks for the threads.
    const MIN_SPLIT_COLS: usize = 64;

    /// Output columns per task for an im2col matrix of `k` rows and `ohw` columns in
    /// each of `images` images: wide enough for the GEMM, small enough for L2, and
    /// cut so that every thread has work. Chunks of one image are of equal width.
    pub(super) fn cols_per_task(k: usize, ohw: usize, images: usize) -> usize {
        let threads = rayon::current_num_threads();
        let mut cols = cols_for_rows(k);
        let wanted = 2 * threads;
        if images * ohw.div_ceil(cols) < wanted {
            let per_image = wanted.div_ceil(images.max(1));
            cols = cols.min(ohw.div_ceil(per_image).max(MIN_SPLIT_COLS));
        }
        let chunks = ohw.div_ceil(cols.max(1)).max(1);
        ohw.div_ceil(chunks).max(1)
    }

    /// Output columns per chunk for an im2col slice of `rows` rows.
    fn cols_for_rows(rows: usize) -> usize {
        (COL_ELEMS / rows.max(1)).max(MIN_COLS)
    }

    /// A raw pointer that tasks writing disjoint parts of one buffer may share.
    #[derive(Clone, Copy)]
    struct SharedPtr<T>(*mut T);
    // SAFETY: only used where each task writes elements no other task touches.
    unsafe impl<T: Send> Send for SharedPtr<T> {}
    unsafe impl<T: Send> Sync for SharedPtr<T> {}
    impl<T> SharedPtr<T> {
        fn get(self) -> *mut T {
            self.0
        }
    }

    /// Calls `f(oh, ow_begin, ow_end, offset)` for each output-row piece of columns
    /// `[p0, p0 + pc)`; `offset` is the piece's first column relative to `p0`.
    fn row_pieces(ow: usize, p0: usize, pc: usize, mut f: impl FnMut(usize, usize, usize, usize)) {
        let (mut p, end) = (p0, p0 + pc);
        while p < end {
            let (oh, o0) = (p / ow, p % ow);
            let o1 = ow.min(o0 + (end - p));
            f(oh, o0, o1, p - p0);
            p += o1 - o0;
        }
    }

    /// The output columns in `[o0, o1)` whose input column `o * s + off` lies in
    /// `[0, len)`, as `(lo, hi)` with `o0 <= lo <= hi <= o1`.
    fn inside(o0: usize, o1: usize, len: usize, s: usize, off: isize) -> (usize, usize) {
        let lo = if off >= 0 {
            0
        } else {
            (off.unsigned_abs()).div_ceil(s)
        };
        let last = len as isize - 1 - off;
        let hi = if last < 0 { 0 } else { last as usize / s + 1 };
        let lo = lo.clamp(o0, o1);
        (lo, hi.clamp(lo, o1))
    }

    /// Where tap `(ki, kj)` of output row `oh` reads: the input row, or `None` in the
    /// padding, and the input column offset of output column 0.
    fn tap(g: &Geom, oh: usize, ki: usize, kj: usize) -> (Option<usize>, isize) {
        let ih = (oh * g.p.stride.0 + ki * g.p.dilation.0) as isize - g.p.padding.0 as isize;
        let off = (kj * g.p.dilation.1) as isize - g.p.padding.1 as isize;
        let row = (ih >= 0 && (ih as usize) < g.h).then_some(ih as usize);
        (row, off)
    }

    /// Columns `[p0, p0 + pc)` of the im2col matrix of one image `x: [Cin, H, W]` into
    /// `col: [K, pc]`.
    pub(super) fn im2col<T: Element>(x: &[T], g: &Geom, p0: usize, pc: usize, col: &mut [T]) {
        let (khw, sw) = (g.kh * g.kw, g.p.stride.1);
        for (r, row) in col.chunks_exact_mut(pc).enumerate() {
            let (c, ki, kj) = (r / khw, (r / g.kw) % g.kh, r % g.kw);
            let plane = &x[c * g.hw()..(c + 1) * g.hw()];
            row_pieces(g.ow, p0, pc, |oh, o0, o1, at| {
                let piece = &mut row[at..at + (o1 - o0)];
                let (ih, off) = tap(g, oh, ki, kj);
                let Some(ih) = ih else {
                    piece.fill(T::zero());
                    return;
                };
                let src = &plane[ih * g.w..(ih + 1) * g.w];
                let (lo, hi) = inside(o0, o1, g.w, sw, off);
                piece[..lo - o0].fill(T::zero());
                piece[hi - o0..].fill(T::zero());
                let dst = &mut piece[lo - o0..hi - o0];
                if dst.is_empty() {
                    return;
                }
                let iw0 = (lo * sw) as isize + off;
                let iw0 = iw0 as usize;
                let n = dst.len();
                match sw {
                    1 => dst.copy_from_slice(&src[iw0..iw0 + n]),
                    // The stem's case: whole pairs let the compiler vectorise the gather.
                    2 if iw0 + 2 * n <= src.len() => {
                        let pairs = src[iw0..iw0 + 2 * n].chunks_exact(2);
                        dst.iter_mut().zip(pairs).for_each(|(o, p)| *o = p[0]);
                    }
                    _ => {
                        let taps = src[iw0..].iter().step_by(sw);
                        dst.iter_mut().zip(taps).for_each(|(o, &v)| *o = v);
                    }
                }
            });
        }
    }

    /// The adjoint of [`im2col`]: adds `col: [nc * kh * kw, pc]` (columns
    /// `[p0, p0 + pc)`) into the `nc` channel planes `x: [nc, H, W]` it was read from.
    fn col2im_add<T: Element>(col: &[T], g: &Geom, p0: usize, pc: usize, x: &mut [T]) {
        let (khw, sw, hw) = (g.kh * g.kw, g.p.stride.1, g.hw());
        for (r, row) in col.chunks_exact(pc).enumerate() {
            let (c, ki, kj) = (r / khw, (r / g.kw) % g.kh, r % g.kw);
            let plane = &mut x[c * hw..(c + 1) * hw];
            row_pieces(g.ow, p0, pc, |oh, o0, o1, at| {
                let (Some(ih), off) = tap(g, oh, ki, kj) else {
                    return;
                };
                let (lo, hi) = inside(o0, o1, g.w, sw, off);
                if lo == hi {
                    return;
                }
                let src = &row[at + lo - o0..at + hi - o0];
                let iw0 = ((lo * sw) as isize + off) as usize;
                let dst = &mut plane[ih * g.w..(ih + 1) * g.w];
                for (j, &v) in src.iter().enumerate() {
                    dst[iw0 + j * sw] += v;
                }
            });
        }
    }

    /// `y [N, Cout, OH * OW] = W @ col (+ b)`, one task per (image, column chunk).
    pub(super) fn forward<T: Element>(x: &[T], w: &[T], b: Option<&[T]>, g: &Geom) -> Vec<T> {
        let (k, ohw, chw) = (g.k(), g.ohw(), g.cin * g.hw());
        let mut y = vec![T::zero(); g.n * g.cout * ohw];
        let cols = cols_per_task(k, ohw, g.n);
        let chunks = ohw.div_ceil(cols);
        let wm = MatRef::row_major(w, g.cout, k);
        let yp = SharedPtr(y.as_mut_ptr());
        (0..g.n * chunks)
            .into_par_iter()
            .for_each_init(Vec::new, |buf: &mut Vec<T>, t| {
                let (img, p0) = (t / chunks, (t % chunks) * cols);
                let pc = cols.min(ohw - p0);
                let xi = &x[img * chw..(img + 1) * chw];
                let rhs = if g.pointwise() {
                    MatRef::rows_ld(&xi[p0..], g.cin, pc, ohw)
                } else {
                    buf.resize(k * pc, T::zero());
                    im2col(xi, g, p0, pc, buf);
                    MatRef::row_major(&buf[..], k, pc)
                };
                // SAFETY: columns [p0, p0 + pc) of image `img` belong to this task
                // alone, and y outlives the parallel loop.
                unsafe {
                    let dst = yp.get().add(img * g.cout * ohw + p0);
                    if let Some(b) = b {
                        for (co, &bv) in b.iter().enumerate() {
                            std::slice::from_raw_parts_mut(dst.add(co * ohw), pc).fill(bv);
                        }
                    }
                    gemm_ptr(dst, ohw, b.is_some(), wm, rhs, Parallelism::None);
                }
            });
        y
    }

    /// `gx = col2im(Wᵀ @ gy)`, one task per (image, group of input channels); each
    /// task owns its channels' planes of gx, so col2im needs no synchronisation.
    pub(super) fn grad_input<T: Element>(gy: &[T], w: &[T], g: &Geom) -> Vec<T> {
        let (k, ohw, hw, khw) = (g.k(), g.ohw(), g.hw(), g.kh * g.kw);
        let mut gx = vec![T::zero(); g.n * g.cin * hw];
        if gx.is_empty() {
            return gx;
        }
        let threads = rayon::current_num_threads();
        let groups = (2 * threads).div_ceil(g.n.max(1)).clamp(1, g.cin.max(1));
        let cg = g.cin.div_ceil(groups);
        gx.par_chunks_mut(g.cin * hw)
            .enumerate()
            .for_each(|(img, gxi)| {
                let gyi = &gy[img * g.cout * ohw..(img + 1) * g.cout * ohw];
                gxi.par_chunks_mut(cg * hw).enumerate().for_each_init(
                    Vec::new,
                    |buf: &mut Vec<T>, (gi, gxg)| {
                        let rows = gxg.len() / hw * khw;
                        // Wᵀ restricted to this group's rows of the col matrix.
                        let wt = MatRef {
                            data: &w[gi * cg * khw..],
                            rows,
                            cols: g.cout,
                            rs: 1,
                            cs: k,
                        };
                        if g.pointwise() {
                            let gym = MatRef::row_major(gyi, g.cout, ohw);
                            gemm_into(gxg, hw, false, wt, gym, Parallelism::None);
                            return;
                        }
                        let cols = cols_for_rows(rows);
                        for p0 in (0..ohw).step_by(cols) {
                            let pc = cols.min(ohw - p0);
                            buf.resize(rows * pc, T::zero());
                            let gym = MatRef::rows_ld(&gyi[p0..], g.cout, pc, ohw);
                            gemm_into(buf, pc, false, wt, gym, Parallelism::None);
                            col2im_add(buf, g, p0, pc, gxg);
                        }
                    },
                );
            });
        gx
    }

    /// `gw = sum over images and column chunks of gy @ colᵀ`. The tasks are cut into
    /// a fixed number of consecutive runs, each summed into its own partial, and the
    /// partials are added in order: the result does not depend on thread scheduling.
    pub(super) fn grad_weight<T: Element>(x: &[T], gy: &[T], g: &Geom) -> Vec<T> {
        let (k, ohw, chw) = (g.k(), g.ohw(), g.cin * g.hw());
        let len = g.cout * k;
        let cols = cols_per_task(k, ohw, g.n);
        let chunks = ohw.div_ceil(cols);
        let tasks = g.n * chunks;
        let runs = rayon::current_num_threads().min(tasks).max(1);
        let per_run = tasks.div_ceil(runs);
        let partials: Vec<Vec<T>> = (0..runs)
            .into_par_iter()
            .map(|run| {
                let mut acc = vec![T::zero(); len];
                let mut buf = Vec::new();
                for t in run * per_run..tasks.min((run + 1) * per_run) {
                    let (img, p0) = (t / chunks, (t % chunks) * cols);
                    let pc = cols.min(ohw - p0);
                    let xi = &x[img * chw..(img + 1) * chw];
                    let gym = MatRef::rows_ld(&gy[img * g.cout * ohw + p0..], g.cout, pc, ohw);
                    let col_t = if g.pointwise() {
                        MatRef::rows_ld(&xi[p0..], g.cin, pc, ohw).t()
                    } else {
                        buf.resize(k * pc, T::zero());
                        im2col(xi, g, p0, pc, &mut buf);
                        MatRef::row_major(&buf[..], k, pc).t()
                    };
                    gemm_into(&mut acc, k, true, gym, col_t, Parallelism::None);
                }
                acc
            })
            .collect();
        let mut parts = partials.into_iter();
        let mut gw = parts.next().unwrap_or_else(|| vec![T::zero(); len]);
        for p in parts {
            gw.iter_mut().zip(&p).for_each(|(a, &b)| *a += b);
        }
        gw
    }

    /// `gb[c] = sum over images and positions of gy[n, c, p]`, accumulated in f64.
    pub(super) fn grad_bias<T: Element>(gy: &[T], n: usize, c: usize, hw: usize) -> Vec<T> {
        (0..c)
            .into_par_iter()
            .map(|ch| {
                let s: f64 = (0..n)
                    .map(|i| {
                        let plane = &gy[(i * c + ch) * hw..(i * c + ch + 1) * hw];
                        plane.iter().map(|v| v.f64()).sum::<f64>()
                    })
                    .sum();
                T::of(s)
            })
            .collect()
    }
}

mod cuda {
    //! Launchers for kernels/conv.cu and the matmul kernels (f32).

    use super::*;

    /// Device memory for one batch of im2col matrices: as many images as fit, at
    /// least one.
    const COL_BYTES: usize = 256 << 20;

    fn images_per_batch(g: &Geom) -> usize {
        (COL_BYTES / (g.k() * g.ohw() * 4).max(1)).clamp(1, g.n.max(1))
    }

    fn i32_arg(what: &str, v: usize) -> Result<KernelArg> {
        i32::try_from(v)
            .map(KernelArg::I32)
            .map_err(|_| Error::invalid("conv2d", format!("{what} = {v} exceeds i32")))
    }

    /// The geometry arguments shared by conv2d_im2col_f32 and conv2d_col2im_f32.
    fn geom_args(g: &Geom, images: usize) -> Result<Vec<KernelArg>> {
        let p = &g.p;
        [
            ("Cin", g.cin),
            ("H", g.h),
            ("W", g.w),
            ("kh", g.kh),
            ("kw", g.kw),
            ("stride", p.stride.0),
            ("stride", p.stride.1),
            ("padding", p.padding.0),
            ("padding", p.padding.1),
            ("dilation", p.dilation.0),
            ("dilation", p.dilation.1),
            ("OH", g.oh),
            ("OW", g.ow),
            ("images", images),
        ]
        .iter()
        .map(|&(what, v)| i32_arg(what, v))
        .collect()
    }

    /// col ← im2col of images `[n0, n0 + images)` of x.
    fn im2col(
        dev: &GpuDevice,
        x: &Tensor,
        col: &Tensor,
        g: &Geom,
        n0: usize,
        images: usize,
    ) -> Result<()> {
        let mut args = vec![arg_at(x, n0 * g.cin * g.hw())?, arg(col)?];
        args.extend(geom_args(g, images)?);
        launch_elems(dev, "conv2d_im2col_f32", images * g.k() * g.ohw(), &args)
    }

    /// Images `[n0, n0 + images)` of gx ← col2im of col.
    fn col2im(
        dev: &GpuDevice,
        col: &Tensor,
        gx: &Tensor,
        g: &Geom,
        n0: usize,
        images: usize,
    ) -> Result<()> {
        let mut args = vec![arg(col)?, arg_at(gx, n0 * g.cin * g.hw())?];
        args.extend(geom_args(g, images)?);
        launch_elems(dev, "conv2d_col2im_f32", images * g.cin * g.hw(), &args)
    }

    fn devices(op: &'static str, ts: &[&Tensor]) -> Result<GpuDevice> {
        let dev = gpu_dev(op, ts[0])?;
        for t in &ts[1..] {
            gpu_dev(op, t)?;
        }
        Ok(dev)
    }

    pub(super) fn forward(x: &Tensor, w: &Tensor, b: Option<&Tensor>, g: &Geom) -> Result<Tensor> {
        let mut all = vec![x, w];
        all.extend(b);
        let dev = devices("conv2d", &all)?;
        let (k, ohw, hw) = (g.k(), g.ohw(), g.hw());
        let y = Tensor::gpu_empty(&dev, g.y_dims())?;
        if g.n == 0 {
            return Ok(y);
        }
        let wm = GpuMat::dense(w, k);
        let y_items = (0, ohw, g.cout * ohw);
        if g.pointwise() {
            let xm = GpuMat::dense(x, hw).at(0, g.cin * hw);
            gpu_gemm(
                &dev,
                (g.cout, ohw, k),
                wm,
                xm,
                &y,
                y_items,
                g.n,
                BatchMode::Each,
                false,
            )?;
        } else {
            let per = images_per_batch(g);
            let col = Tensor::gpu_empty(&dev, [per * k * ohw])?;
            let colm = GpuMat::dense(&col, ohw).at(0, k * ohw);
            for n0 in (0..g.n).step_by(per) {
                let cnt = per.min(g.n - n0);
                im2col(&dev, x, &col, g, n0, cnt)?;
                let items = (n0 * g.cout * ohw, ohw, g.cout * ohw);
                gpu_gemm(
                    &dev,
                    (g.cout, ohw, k),
                    wm,
                    colm,
                    &y,
                    items,
                    cnt,
                    BatchMode::Each,
                    false,
                )?;
            }
        }
        if let Some(b) = b {
            gpu_bias_add(&dev, &y, b, ohw)?;
        }
        Ok(y)
    }

    pub(super) fn grad_input(gy: &Tensor, w: &Tensor, g: &Geom) -> Result<Tensor> {
        let dev = devices("conv2d_backward_input", &[gy, w])?;
        let (k, ohw, hw) = (g.k(), g.ohw(), g.hw());
        let gx = Tensor::gpu_empty(&dev, g.x_dims())?;
        if g.n == 0 {
            return Ok(gx);
        }
        let wt = GpuMat::dense(w, k).t();
        if g.pointwise() {
            let gym = GpuMat::dense(gy, ohw).at(0, g.cout * ohw);
            let items = (0, hw, g.cin * hw);
            gpu_gemm(
                &dev,
                (k, ohw, g.cout),
                wt,
                gym,
                &gx,
                items,
                g.n,
                BatchMode::Each,
                false,
            )?;
            return Ok(gx);
        }
        let per = images_per_batch(g);
        let gcol = Tensor::gpu_empty(&dev, [per * k * ohw])?;
        for n0 in (0..g.n).step_by(per) {
            let cnt = per.min(g.n - n0);
            let gym = GpuMat::dense(gy, ohw).at(n0 * g.cout * ohw, g.cout * ohw);
            let items = (0, ohw, k * ohw);
            gpu_gemm(
                &dev,
                (k, ohw, g.cout),
                wt,
                gym,
                &gcol,
                items,
                cnt,
                BatchMode::Each,
                false,
            )?;
            col2im(&dev, &gcol, &gx, g, n0, cnt)?;
        }
        Ok(gx)
    }

    pub(super) fn grad_weight(x: &Tensor, gy: &Tensor, g: &Geom) -> Result<Tensor> {
        let dev = devices("conv2d_backward_weight", &[x, gy])?;
        let (k, ohw, hw) = (g.k(), g.ohw(), g.hw());
        let gw = Tensor::gpu_empty(&dev, g.w_dims())?;
        if g.n == 0 {
            return Ok(gw);
        }
        let gw_item = (0, k, 0);
        if g.pointwise() {
            let gym = GpuMat::dense(gy, ohw).at(0, g.cout * ohw);
            let xt = GpuMat::dense(x, hw).at(0, g.cin * hw).t();
            gpu_gemm(
                &dev,
                (g.cout, k, ohw),
                gym,
                xt,
                &gw,
                gw_item,
                g.n,
                BatchMode::Sum,
                false,
            )?;
            return Ok(gw);
        }
        let per = images_per_batch(g);
        let col = Tensor::gpu_empty(&dev, [per * k * ohw])?;
        let colt = GpuMat::dense(&col, ohw).at(0, k * ohw).t();
        for n0 in (0..g.n).step_by(per) {
            let cnt = per.min(g.n - n0);
            im2col(&dev, x, &col, g, n0, cnt)?;
            let gym = GpuMat::dense(gy, ohw).at(n0 * g.cout * ohw, g.cout * ohw);
            gpu_gemm(
                &dev,
                (g.cout, k, ohw),
                gym,
                colt,
                &gw,
                gw_item,
                cnt,
                BatchMode::Sum,
                n0 > 0,
            )?;
        }
        Ok(gw)
    }
}
