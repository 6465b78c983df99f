//! Top-k along the last dimension, per row and per segment of a row (FPN levels).
//!
//! Order: descending values, NaN first (torch.topk ranks NaN above `+inf`), `-0.0`
//! equal to `+0.0`, and ties by lower index. torch.topk leaves the order of ties
//! unspecified (its CPU kernel uses `std::nth_element` / `partial_sort`); this is
//! the deterministic choice, the same on the CPU and CUDA.
//!
//! CUDA (kernels/topk.cu): all segments of all rows in one launch, one block each;
//! a sampled threshold gathers the candidates in one pass (an exact radix select
//! when the sample misjudges), then a shared-memory sort. `k <= 4096` on CUDA.
//!
//! Not differentiable: the RPN selects proposals by index and gathers from detached
//! scores.

use rayon::prelude::*;

use crate::device::gpu::{KernelArg, LaunchCfg};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::ops::nms::descending_key;
use crate::tensor::{pool, DType, Element, Tensor};
use crate::with_dtype;

/// Largest `k` the CUDA kernel takes (TOPK_CAP in kernels/topk.cu).
pub const CUDA_MAX_K: usize = 4096;
/// Most segments per row the CUDA kernel takes (TOPK_MAX_LEVELS).
pub const CUDA_MAX_LEVELS: usize = 8;

/// The `k` largest values of each row of `x` `[R, C]` and their column indices:
/// `(values [R, k], indices [R, k] i64)`, each row in descending order. Errors when
/// `k > C`, as torch.topk does.
pub fn topk(x: &Tensor, k: usize) -> Result<(Tensor, Tensor)> {
    let c = match x.dims() {
        [_, c] => *c,
        d => return Err(Error::shape("topk", format!("x must be [R, C], got {d:?}"))),
    };
    if k > c {
        return Err(Error::invalid(
            "topk",
            format!("k = {k} is larger than the {c} columns of {:?}", x.dims()),
        ));
    }
    topk_levels(x, &[c], k)
}

/// Top-k per level: each row of `x` `[B, A]` is split into consecutive segments of
/// `level_sizes` (summing to `A`), and each segment keeps its `min(k, len)` largest
/// values. Returns `(values [B, K], indices [B, K] i64)` with `K = sum_l min(k,
/// len_l)`, segments in order, each descending; indices are columns of `x` (the
/// segment offset added), as torchvision's RPN `_get_top_n_idx` returns them.
pub fn topk_levels(x: &Tensor, level_sizes: &[usize], k: usize) -> Result<(Tensor, Tensor)> {
    let (rows, a) = match x.dims() {
        [r, a] => (*r, *a),
        d => {
            return Err(Error::shape(
                "topk_levels",
                format!("x must be [B, A], got {d:?}"),
            ))
        }
    };
    if level_sizes.iter().sum::<usize>() != a {
        return Err(Error::shape(
            "topk_levels",
            format!("level sizes {level_sizes:?} do not sum to the {a} columns of x"),
        ));
    }
    if x.dtype() == DType::I64 {
        return Err(Error::DType {
            op: "topk_levels",
            dtype: "i64".into(),
            msg: "x must be a float tensor".into(),
        });
    }
    let out_row: usize = level_sizes.iter().map(|&l| l.min(k)).sum();
    match x.device() {
        Device::Cpu => with_dtype!(x.dtype(), T => {
            let (v, i) = topk_cpu::<T>(x.cpu_slice::<T>()?, rows, a, level_sizes, k);
            Ok((Tensor::from_vec(v, [rows, out_row])?, Tensor::from_vec_i64(i, [rows, out_row])?))
        }),
        Device::Cuda(_) => topk_cuda(x, rows, a, level_sizes, k, out_row),
    }
}

/// The `min(k, len)` positions of `seg` in top-k order; `keyed` (`seg.len()` long) is
/// scratch.
fn segment_topk<T: Element>(seg: &[T], k: usize, keyed: &mut [u128]) -> Vec<u32> {
    let kk = k.min(seg.len());
    if kk == 0 {
        return Vec::new();
    }
    // (key, index) packed as key << 32 | index: u128 order is the pairs' order, and
    // the pairs are unique, so selecting and sorting them gives the stable order.
    for (kv, (i, v)) in keyed.iter_mut().zip(seg.iter().enumerate()) {
        *kv = (descending_key(v.f64()) as u128) << 32 | i as u128;
    }
    if kk < keyed.len() {
        keyed.select_nth_unstable(kk - 1);
    }
    let top = &mut keyed[..kk];
    top.sort_unstable();
    top.iter().map(|&kv| kv as u32).collect()
}

fn topk_cpu<T: Element>(
    x: &[T],
    rows: usize,
    a: usize,
    level_sizes: &[usize],
    k: usize,
) -> (Vec<T>, Vec<i64>) {
    let mut offsets = vec![0usize];
    for &l in level_sizes {
        offsets.push(offsets.last().copied().unwrap_or(0) + l);
    }
    let segs: Vec<(usize, usize)> = (0..rows)
        .flat_map(|r| (0..level_sizes.len()).map(move |l| (r, l)))
        .collect();
    // The segments tile `x` in order: one pooled key buffer, cut the same way.
    let mut keys = pool::take::<u128>(rows * a);
    let mut scratch: Vec<&mut [u128]> = Vec::with_capacity(segs.len());
    let mut rest = &mut keys[..];
    for &(_, l) in &segs {
        let (seg, tail) = rest.split_at_mut(level_sizes[l]);
        scratch.push(seg);
        rest = tail;
    }
    let picked: Vec<Vec<u32>> = segs
        .par_iter()
        .zip(scratch)
        .map(|(&(r, l), keyed)| {
            segment_topk(&x[r * a + offsets[l]..r * a + offsets[l + 1]], k, keyed)
        })
        .collect();
    pool::give(keys);
    let total = picked.iter().map(Vec::len).sum();
    let mut values = pool::take_empty::<T>(total);
    let mut indices = pool::take_empty::<i64>(total);
    for (&(r, l), p) in segs.iter().zip(&picked) {
        for &i in p {
            let col = offsets[l] + i as usize;
            values.push(x[r * a + col]);
            indices.push(col as i64);
        }
    }
    (values, indices)
}

fn topk_cuda(
    x: &Tensor,
    rows: usize,
    a: usize,
    level_sizes: &[usize],
    k: usize,
    out_row: usize,
) -> Result<(Tensor, Tensor)> {
    let dev = crate::ops::gpu_dev("topk_levels", x)?;
    if level_sizes.len() > CUDA_MAX_LEVELS || level_sizes.is_empty() {
        return Err(Error::invalid(
            "topk_levels",
            format!(
                "{} levels on CUDA (1 to {CUDA_MAX_LEVELS})",
                level_sizes.len()
            ),
        ));
    }
    if k > CUDA_MAX_K && level_sizes.iter().any(|&l| l > CUDA_MAX_K) {
        return Err(Error::invalid(
            "topk_levels",
            format!("k = {k} on CUDA (at most {CUDA_MAX_K})"),
        ));
    }
    if level_sizes.iter().any(|&l| l > u32::MAX as usize) {
        return Err(Error::invalid(
            "topk_levels",
            "a level longer than 2^32 - 1",
        ));
    }
    let values = Tensor::gpu_empty(&dev, [rows, out_row])?;
    let indices = Tensor::gpu_empty_i64(&dev, [rows, out_row])?;
    let segments = rows * level_sizes.len();
    if segments == 0 || out_row == 0 {
        return Ok((values, indices));
    }
    let mut args = vec![
        x.gpu()?.buf.arg(),
        KernelArg::I64(a as i64),
        KernelArg::I32(level_sizes.len() as i32),
    ];
    args.extend(
        (0..CUDA_MAX_LEVELS)
            .map(|l| KernelArg::I64(level_sizes.get(l).copied().unwrap_or(0) as i64)),
    );
    args.extend([
        KernelArg::I64(k as i64),
        KernelArg::I64(out_row as i64),
        values.gpu()?.buf.arg(),
        indices.gpu()?.buf.arg(),
    ]);
    dev.launch(
        "topk_segments_f32",
        LaunchCfg {
            grid: (segments as u32, 1, 1),
            block: (1024, 1, 1),
            shared_bytes: 0,
        },
        &args,
    )?;
    Ok((values, indices))
}
