//! Launchers for kernels/conv.cu and the matmul kernels (f32).

use crate::device::gpu::{GpuDevice, KernelArg};
use crate::error::{Error, Result};
use crate::ops::linear::{arg_at, gpu_bias_add, gpu_gemm, BatchMode, GpuMat};
use crate::ops::{arg, gpu_dev, launch_elems};
use crate::tensor::Tensor;

use super::Geom;

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
    let y = Tensor::gpu_zeros(&dev, g.y_dims())?;
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
        let col = Tensor::gpu_zeros(&dev, [per * k * ohw])?;
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
    let gx = Tensor::gpu_zeros(&dev, g.x_dims())?;
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
    let gcol = Tensor::gpu_zeros(&dev, [per * k * ohw])?;
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
    let gw = Tensor::gpu_zeros(&dev, g.w_dims())?;
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
    let col = Tensor::gpu_zeros(&dev, [per * k * ohw])?;
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
