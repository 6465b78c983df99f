//! upsample_nearest_add: the FPN top-down step,
//! `y = lateral + F.interpolate(top, size=lateral.shape[-2:], mode="nearest")`.
//!
//! PyTorch's "nearest" maps output index `d` to source `min(floor(d * (in / out)), in - 1)`
//! with the scale and the product in f32; any target size works, not only 2x (an FPN
//! input whose side is not a multiple of 32 gives odd sizes).

use rayon::prelude::*;

use crate::autograd::record;
use crate::device::gpu::KernelArg;
use crate::device::Device;
use crate::error::{Error, Result};
use crate::tensor::{same_device, same_dtype, DType, Element, Tensor};
use crate::with_dtype;

use super::{arg, gpu_dev, launch_elems};

/// Source index of output index `dst` when resizing `in_size` to `out_size` by
/// PyTorch's nearest rule (f32 arithmetic, as its CPU and CUDA kernels do).
pub fn nearest_source_index(dst: usize, in_size: usize, out_size: usize) -> usize {
    let scale = in_size as f32 / out_size as f32;
    ((dst as f32 * scale).floor() as usize).min(in_size - 1)
}

/// Sizes of one call: `planes = N * C`, lateral `H x W`, top `h x w`.
#[derive(Clone, Copy, Debug)]
struct Geom {
    planes: usize,
    hl: usize,
    wl: usize,
    ht: usize,
    wt: usize,
}

fn geometry(op: &'static str, l: &[usize], t: &[usize]) -> Result<Geom> {
    let bad = l.len() != 4 || t.len() != 4 || l[0] != t[0] || l[1] != t[1];
    if bad || t[2] == 0 || t[3] == 0 {
        return Err(Error::shape(
            op,
            format!(
                "lateral {l:?} and top {t:?} must be [N, C, H, W] and [N, C, h, w] with h, w > 0"
            ),
        ));
    }
    // The kernels index within a plane with 32-bit ints.
    if l[2] * l[3] > i32::MAX as usize {
        return Err(Error::shape(
            op,
            format!("lateral plane {}x{} exceeds 2^31 elements", l[2], l[3]),
        ));
    }
    Ok(Geom {
        planes: l[0] * l[1],
        hl: l[2],
        wl: l[3],
        ht: t[2],
        wt: t[3],
    })
}

fn float_input(op: &'static str, x: &Tensor) -> Result<()> {
    if x.dtype() == DType::I64 {
        return Err(Error::DType {
            op,
            dtype: "i64".into(),
            msg: format!("input {} must be a float tensor", x.shape()),
        });
    }
    Ok(())
}

fn geom_args(g: &Geom) -> [KernelArg; 5] {
    let i = |v: usize| KernelArg::I32(v as i32);
    [
        KernelArg::I64(g.planes as i64),
        i(g.hl),
        i(g.wl),
        i(g.ht),
        i(g.wt),
    ]
}

/// `lateral + nearest_upsample(top)`: lateral `[N, C, H, W]`, top `[N, C, h, w]`
/// (any h, w > 0), output `[N, C, H, W]`. Differentiable in both inputs.
pub fn upsample_nearest_add(lateral: &Tensor, top: &Tensor) -> Result<Tensor> {
    const OP: &str = "upsample_nearest_add";
    let g = geometry(OP, lateral.dims(), top.dims())?;
    // bf16 natively: read and written as bf16, the f32 sum rounded once.
    let bf16 = super::mixed::all_bf16(OP, &[lateral, top])?;
    float_input(OP, lateral)?;
    float_input(OP, top)?;
    let y = if bf16 {
        forward_bf16(lateral, top, &g)?
    } else {
        forward(lateral, top, &g)?
    };
    let top_shape = top.shape().clone();
    record(OP, &[lateral, top], &y, move |gy, needs| {
        let gtop = if needs[1] {
            Some(upsample_nearest_backward(gy, top_shape.dims())?)
        } else {
            None
        };
        Ok(vec![Some(gy.clone()), gtop])
    });
    Ok(y)
}

/// The f32 (or f64) forward of [`upsample_nearest_add`], not recorded.
fn forward(lateral: &Tensor, top: &Tensor, g: &Geom) -> Result<Tensor> {
    const OP: &str = "upsample_nearest_add";
    Ok(match same_device(OP, &[lateral, top])? {
        Device::Cpu => with_dtype!(same_dtype(OP, &[lateral, top])?, T => {
            let y = cpu_forward::<T>(lateral.cpu_slice::<T>()?, top.cpu_slice::<T>()?, g);
            Tensor::from_vec(y, lateral.shape().clone())?
        }),
        Device::Cuda(_) => {
            let dev = gpu_dev(OP, lateral)?;
            gpu_dev(OP, top)?;
            let y = Tensor::gpu_empty(&dev, lateral.shape().clone())?;
            let mut args = vec![arg(lateral)?, arg(top)?, arg(&y)?];
            args.extend(geom_args(g));
            launch_elems(&dev, "upsample_nearest_add_fwd_f32", y.numel(), &args)?;
            y
        }
    })
}

/// The bf16 forward of [`upsample_nearest_add`], not recorded: the CPU widens, runs
/// the f32 forward and rounds; CUDA reads and writes bf16 (the same values).
fn forward_bf16(lateral: &Tensor, top: &Tensor, g: &Geom) -> Result<Tensor> {
    const OP: &str = "upsample_nearest_add";
    match same_device(OP, &[lateral, top])? {
        Device::Cpu => super::mixed::cpu_bf16_rule(&[lateral, top], |v| forward(&v[0], &v[1], g)),
        Device::Cuda(_) => {
            let dev = super::mixed::gpu_dev_bf16(OP, lateral)?;
            super::mixed::gpu_dev_bf16(OP, top)?;
            let y = super::mixed::gpu_empty_bf16(&dev, lateral.dims())?;
            let mut args = vec![arg(lateral)?, arg(top)?, arg(&y)?];
            args.extend(geom_args(g));
            launch_elems(&dev, "upsample_nearest_add_fwd_bf16", y.numel(), &args)?;
            Ok(y)
        }
    }
}

/// Source row and column of every output row and column.
fn index_tables(g: &Geom) -> (Vec<usize>, Vec<usize>) {
    let rows = (0..g.hl).map(|d| nearest_source_index(d, g.ht, g.hl));
    let cols = (0..g.wl).map(|d| nearest_source_index(d, g.wt, g.wl));
    (rows.collect(), cols.collect())
}

fn cpu_forward<T: Element>(lateral: &[T], top: &[T], g: &Geom) -> Vec<T> {
    let (rows, cols) = index_tables(g);
    let (lhw, thw) = (g.hl * g.wl, g.ht * g.wt);
    let mut y = crate::tensor::pool::take::<T>(lateral.len());
    y.copy_from_slice(lateral);
    if lhw == 0 {
        return y;
    }
    y.par_chunks_mut(lhw).enumerate().for_each(|(plane, yp)| {
        let tp = &top[plane * thw..(plane + 1) * thw];
        for (r, &sr) in rows.iter().enumerate() {
            for (c, &sc) in cols.iter().enumerate() {
                yp[r * g.wl + c] += tp[sr * g.wt + sc];
            }
        }
    });
    y
}

/// dL/dtop `[N, C, h, w]` of the nearest upsampling from dL/dy `[N, C, H, W]`: each
/// top pixel receives the sum of the gradients of the output pixels copied from it.
pub fn upsample_nearest_backward(gy: &Tensor, top_dims: &[usize]) -> Result<Tensor> {
    const OP: &str = "upsample_nearest_backward";
    if top_dims.len() != 4 {
        return Err(Error::shape(
            OP,
            format!("top shape {top_dims:?} is not [N, C, h, w]"),
        ));
    }
    let g = geometry(OP, gy.dims(), top_dims)?;
    float_input(OP, gy)?;
    match gy.device() {
        Device::Cpu => with_dtype!(gy.dtype(), T => {
            Tensor::from_vec(cpu_backward::<T>(gy.cpu_slice::<T>()?, &g), top_dims)
        }),
        Device::Cuda(_) => {
            let dev = gpu_dev(OP, gy)?;
            let gtop = Tensor::gpu_empty(&dev, top_dims)?;
            let mut args = vec![arg(gy)?, arg(&gtop)?];
            args.extend(geom_args(&g));
            launch_elems(&dev, "upsample_nearest_bwd_f32", gtop.numel(), &args)?;
            Ok(gtop)
        }
    }
}

/// For each source index `0..in_size`, the range of output indices copied from it
/// (empty for a source no output reads). Contiguous because the nearest source index
/// never decreases along an axis.
fn source_ranges(table: &[usize], in_size: usize) -> Vec<std::ops::Range<usize>> {
    let mut ranges = vec![0..0; in_size];
    for (d, &s) in table.iter().enumerate() {
        let r = &mut ranges[s];
        if r.start == r.end {
            *r = d..d;
        }
        r.end = d + 1;
    }
    ranges
}

/// Each top pixel gathers, from zero, the gradients of the output pixels copied from
/// it, row by row and then column by column: the order in which a scatter-add over
/// the output in row-major order adds them, so the same sums bit for bit, without a
/// zero-filled buffer or a second pass over it. The source ranges are contiguous
/// ([`source_ranges`]).
fn cpu_backward<T: Element>(gy: &[T], g: &Geom) -> Vec<T> {
    let (rows, cols) = index_tables(g);
    debug_assert!(rows.windows(2).all(|p| p[0] <= p[1]) && cols.windows(2).all(|p| p[0] <= p[1]));
    let (row_src, col_src) = (source_ranges(&rows, g.ht), source_ranges(&cols, g.wt));
    // Exactly 2x along W (FPN's case): top column c takes output columns 2c and 2c+1,
    // a loop the compiler vectorises (the general one is scalar).
    let twice = g.wl == 2 * g.wt
        && col_src
            .iter()
            .enumerate()
            .all(|(c, r)| *r == (2 * c..2 * c + 2));
    let (lhw, thw) = (g.hl * g.wl, g.ht * g.wt);
    // Every element is written: a recycled buffer from the host pool will do.
    let mut gtop = crate::tensor::pool::take::<T>(g.planes * thw);
    gtop.par_chunks_mut(g.wt)
        .enumerate()
        .for_each(|(top_row, out)| {
            let (plane, sr) = (top_row / g.ht, top_row % g.ht);
            let gp = &gy[plane * lhw..(plane + 1) * lhw];
            out.fill(T::zero());
            for r in row_src[sr].clone() {
                let grow = &gp[r * g.wl..(r + 1) * g.wl];
                if twice {
                    for (o, pair) in out.iter_mut().zip(grow.chunks_exact(2)) {
                        *o = *o + pair[0] + pair[1];
                    }
                } else {
                    for (o, c) in out.iter_mut().zip(&col_src) {
                        for &v in &grow[c.clone()] {
                            *o += v;
                        }
                    }
                }
            }
        });
    gtop
}
