//! NMS on a CUDA device (kernels/nms.cu): key sort, IoU bitmask, one-block walk;
//! the keep list and its count stay on the device.

use crate::device::gpu::{GpuBuffer, GpuDevice, KernelArg, LaunchCfg};
use crate::error::{Error, Result};
use crate::tensor::Tensor;

use super::NmsOutput;

/// Keys sorted per block in shared memory (NMS_TILE in kernels/nms.cu).
const SORT_TILE: usize = 2048;
/// Removed-words the walk keeps in shared memory (NMS_SMEM_WORDS in kernels/nms.cu).
const NMS_SMEM_WORDS: usize = 4096;
/// The mask grid is (blocks, blocks): CUDA caps grid.y at 65535.
const MAX_GRID_Y: usize = 65535;

pub(super) fn nms_cuda(
    boxes: &Tensor,
    scores: &Tensor,
    idxs: Option<&Tensor>,
    n: usize,
    thr: f64,
) -> Result<NmsOutput> {
    let dev = boxes.gpu()?.dev.clone();
    if n == 0 {
        return Ok(NmsOutput {
            keep: Tensor::gpu_empty_i64(&dev, [0])?,
            count: Tensor::gpu_zeros_i64(&dev, [1])?,
        });
    }
    // nms_reduce_f32 writes the count and every keep entry (-1 past the count).
    let count = Tensor::gpu_empty_i64(&dev, [1])?;
    let col_blocks = n.div_ceil(64);
    if col_blocks > MAX_GRID_Y {
        return Err(Error::invalid(
            "nms",
            format!("{n} boxes on CUDA (at most {} supported)", MAX_GRID_Y * 64),
        ));
    }
    let keys = sort_keys_cuda(&dev, scores, n)?;

    let sboxes = dev.alloc(n * 16)?;
    let areas = dev.alloc(n * 4)?;
    let order = dev.alloc(n * 8)?;
    let scls = dev.alloc(if idxs.is_some() { n * 8 } else { 8 })?;
    let cls_arg = match idxs {
        Some(c) => c.gpu()?.buf.arg(),
        None => order.arg(),
    };
    dev.launch(
        "nms_gather_f32",
        LaunchCfg::for_elems(n),
        &[
            boxes.gpu()?.buf.arg(),
            keys.arg(),
            KernelArg::I64(n as i64),
            sboxes.arg(),
            areas.arg(),
            order.arg(),
            cls_arg,
            scls.arg(),
            KernelArg::I32(idxs.is_some() as i32),
        ],
    )?;

    let mask = dev.alloc(n * col_blocks * 8)?;
    let grid = LaunchCfg {
        grid: (col_blocks as u32, col_blocks as u32, 1),
        block: (64, 1, 1),
        shared_bytes: 0,
    };
    let common = [KernelArg::I64(n as i64), KernelArg::I64(col_blocks as i64)];
    match idxs {
        None => dev.launch(
            "nms_mask_f32",
            grid,
            &[
                sboxes.arg(),
                areas.arg(),
                common[0],
                common[1],
                KernelArg::F64(thr),
                mask.arg(),
            ],
        )?,
        Some(_) => dev.launch(
            "nms_mask_batched_f32",
            grid,
            &[
                sboxes.arg(),
                areas.arg(),
                scls.arg(),
                common[0],
                common[1],
                KernelArg::F64(thr),
                mask.arg(),
            ],
        )?,
    }

    let keep = Tensor::gpu_empty_i64(&dev, [n])?;
    // The walk zeroes its removed-words itself when they fit in shared memory.
    let removed = if col_blocks > NMS_SMEM_WORDS {
        dev.alloc_zeroed(col_blocks * 8)?
    } else {
        dev.alloc(8)?
    };
    let threads = (col_blocks.div_ceil(32) * 32).clamp(32, 1024) as u32;
    dev.launch(
        "nms_reduce_f32",
        LaunchCfg::linear(threads as usize, threads),
        &[
            mask.arg(),
            order.arg(),
            common[0],
            common[1],
            removed.arg(),
            keep.gpu()?.buf.arg(),
            count.gpu()?.buf.arg(),
        ],
    )?;
    Ok(NmsOutput { keep, count })
}

/// Device buffer of `next_pow2(max(n, 64))` u64 keys `(desc_key(score) << 32) | i`,
/// sorted ascending (padding last): the stable descending order of `scores`.
fn sort_keys_cuda(dev: &GpuDevice, scores: &Tensor, n: usize) -> Result<GpuBuffer> {
    let padded = n.next_power_of_two().max(64);
    let keys = dev.alloc(padded * 8)?;
    dev.launch(
        "nms_keys_f32",
        LaunchCfg::for_elems(padded),
        &[
            scores.gpu()?.buf.arg(),
            KernelArg::I64(n as i64),
            keys.arg(),
            KernelArg::I64(padded as i64),
        ],
    )?;
    sort_keys(dev, &keys, padded, "nms_sort")?;
    Ok(keys)
}

/// Sort `padded` (a power of two >= 64) keys ascending in place with the bitonic
/// kernels `{family}_tile_f32`, `_step_f32` and `_merge_f32` (`nms_sort` for u64
/// keys, `nms_sort128` for 128-bit keys).
fn sort_keys(dev: &GpuDevice, keys: &GpuBuffer, padded: usize, family: &str) -> Result<()> {
    let tile = padded.min(SORT_TILE);
    dev.launch(
        &format!("{family}_tile_f32"),
        LaunchCfg {
            grid: ((padded / tile) as u32, 1, 1),
            block: ((tile / 2) as u32, 1, 1),
            shared_bytes: 0,
        },
        &[keys.arg(), KernelArg::I32(tile as i32)],
    )?;
    let mut k = 2 * SORT_TILE;
    while k <= padded {
        let mut j = k / 2;
        while j >= SORT_TILE {
            dev.launch(
                &format!("{family}_step_f32"),
                LaunchCfg::for_elems(padded / 2),
                &[
                    keys.arg(),
                    KernelArg::I64(padded as i64),
                    KernelArg::I64(k as i64),
                    KernelArg::I64(j as i64),
                ],
            )?;
            j /= 2;
        }
        dev.launch(
            &format!("{family}_merge_f32"),
            LaunchCfg {
                grid: ((padded / SORT_TILE) as u32, 1, 1),
                block: ((SORT_TILE / 2) as u32, 1, 1),
                shared_bytes: 0,
            },
            &[keys.arg(), KernelArg::I64(k as i64)],
        )?;
        k *= 2;
    }
    Ok(())
}

/// Threads per block of the grouped walk, and most blocks (they stride over the
/// groups, whose number only the device knows).
const WALK_THREADS: u32 = 256;
const WALK_MAX_BLOCKS: usize = 4096;

/// Grouped NMS on the device (kernels/nms.cu, "Grouped NMS"): every group is walked
/// by its own block, all groups in parallel, in O(n) memory; candidates of a
/// negative group are left out. The keep list is in global descending score order.
pub(super) fn nms_groups_cuda(
    boxes: &Tensor,
    scores: &Tensor,
    groups: &Tensor,
    n: usize,
    thr: f64,
) -> Result<NmsOutput> {
    let dev = boxes.gpu()?.dev.clone();
    if n == 0 {
        return Ok(NmsOutput {
            keep: Tensor::gpu_empty_i64(&dev, [0])?,
            count: Tensor::gpu_zeros_i64(&dev, [1])?,
        });
    }
    let padded = n.next_power_of_two().max(64);
    let (b, s, g) = (boxes.gpu()?, scores.gpu()?, groups.gpu()?);
    // 1-2: (group, score, index) order.
    let keys = dev.alloc(padded * 16)?;
    dev.launch(
        "nms_group_keys_f32",
        LaunchCfg::for_elems(padded),
        &[
            s.buf.arg(),
            g.buf.arg(),
            KernelArg::I64(n as i64),
            keys.arg(),
            KernelArg::I64(padded as i64),
        ],
    )?;
    sort_keys(&dev, &keys, padded, "nms_sort128")?;
    // 3: where each group starts.
    let seg_start = dev.alloc(n * 8)?;
    let nseg = dev.alloc(8)?;
    let nvalid = dev.alloc(8)?;
    dev.launch(
        "nms_group_segments_f32",
        LaunchCfg::linear(1024, 1024),
        &[
            keys.arg(),
            KernelArg::I64(n as i64),
            seg_start.arg(),
            nseg.arg(),
            nvalid.arg(),
        ],
    )?;
    // 4: the walks. `kept` is written for every candidate that takes part; the
    // final keys read it only for those.
    let removed = dev.alloc(n * 4)?;
    let kept = dev.alloc(n * 4)?;
    dev.launch(
        "nms_group_walk_f32",
        LaunchCfg {
            grid: (n.min(WALK_MAX_BLOCKS) as u32, 1, 1),
            block: (WALK_THREADS, 1, 1),
            shared_bytes: 0,
        },
        &[
            b.buf.arg(),
            keys.arg(),
            seg_start.arg(),
            nseg.arg(),
            nvalid.arg(),
            KernelArg::F64(thr),
            removed.arg(),
            kept.arg(),
        ],
    )?;
    drop((seg_start, removed, keys));
    // 5: the kept candidates in global score order.
    let order = dev.alloc(padded * 8)?;
    dev.launch(
        "nms_group_final_keys_f32",
        LaunchCfg::for_elems(padded),
        &[
            s.buf.arg(),
            g.buf.arg(),
            kept.arg(),
            KernelArg::I64(n as i64),
            order.arg(),
            KernelArg::I64(padded as i64),
        ],
    )?;
    sort_keys(&dev, &order, padded, "nms_sort")?;
    let keep = Tensor::gpu_empty_i64(&dev, [n])?;
    let count = Tensor::gpu_empty_i64(&dev, [1])?;
    dev.launch(
        "nms_keep_from_keys_f32",
        LaunchCfg::for_elems(n),
        &[
            order.arg(),
            KernelArg::I64(n as i64),
            keep.gpu()?.buf.arg(),
            count.gpu()?.buf.arg(),
        ],
    )?;
    Ok(NmsOutput { keep, count })
}

/// Most candidates one pass of [`nms_groups_top_cuda`] takes: whole images per pass,
/// at least one, so its scratch is about 40 bytes times this (or one image's
/// candidates if larger), whatever the batch.
const TOP_PASS_CANDIDATES: usize = 1 << 17;

/// A kernel argument `bytes_in` bytes into `buf`.
fn at(buf: &GpuBuffer, bytes_in: usize) -> KernelArg {
    KernelArg::Ptr {
        ptr: buf.ptr() + bytes_in as u64,
        bytes: buf.bytes() - bytes_in,
    }
}

/// Grouped NMS keeping each image's first `top` (kernels/nms.cu, "nms_groups_top"):
/// the `n` candidates are `images` equal image-major chunks, and the passes take
/// whole images, so the scratch is that of one pass ([`TOP_PASS_CANDIDATES`]) and
/// the keep list is `images * top` long. The keep list holds each image's selection
/// in image order, each in descending score order (ties by index).
pub(super) fn nms_groups_top_cuda(
    boxes: &Tensor,
    scores: &Tensor,
    groups: &Tensor,
    n: usize,
    thr: f64,
    images: usize,
    top: usize,
) -> Result<NmsOutput> {
    let dev = boxes.gpu()?.dev.clone();
    // Entries past the count are -1 (all bits set); the passes append at the count.
    let keep = Tensor::gpu_empty_i64(&dev, [images * top])?;
    if images * top > 0 {
        dev.backend.memset(&keep.gpu()?.buf, 0xff)?;
    }
    let count = Tensor::gpu_zeros_i64(&dev, [1])?;
    if n == 0 || images == 0 || top == 0 {
        return Ok(NmsOutput { keep, count });
    }
    let chunk = n / images;
    let per_pass = (TOP_PASS_CANDIDATES / chunk).clamp(1, images);
    let m = chunk * per_pass;
    let (b, s, g) = (boxes.gpu()?, scores.gpu()?, groups.gpu()?);
    let keys = dev.alloc(m.next_power_of_two().max(64) * 16)?;
    let seg_start = dev.alloc(m * 8)?;
    let nseg = dev.alloc(8)?;
    let nvalid = dev.alloc(8)?;
    let removed = dev.alloc(m * 4)?;
    let kept = dev.alloc(m * 4)?;
    for first in (0..images).step_by(per_pass) {
        let imgs = per_pass.min(images - first);
        let (len, base) = (imgs * chunk, first * chunk);
        let padded = len.next_power_of_two().max(64);
        let (sp, gp, bp) = (
            at(&s.buf, 4 * base),
            at(&g.buf, 8 * base),
            at(&b.buf, 16 * base),
        );
        dev.launch(
            "nms_group_keys_f32",
            LaunchCfg::for_elems(padded),
            &[
                sp,
                gp,
                KernelArg::I64(len as i64),
                keys.arg(),
                KernelArg::I64(padded as i64),
            ],
        )?;
        sort_keys(&dev, &keys, padded, "nms_sort128")?;
        dev.launch(
            "nms_group_segments_f32",
            LaunchCfg::linear(1024, 1024),
            &[
                keys.arg(),
                KernelArg::I64(len as i64),
                seg_start.arg(),
                nseg.arg(),
                nvalid.arg(),
            ],
        )?;
        dev.launch(
            "nms_group_walk_f32",
            LaunchCfg {
                grid: (len.min(WALK_MAX_BLOCKS) as u32, 1, 1),
                block: (WALK_THREADS, 1, 1),
                shared_bytes: 0,
            },
            &[
                bp,
                keys.arg(),
                seg_start.arg(),
                nseg.arg(),
                nvalid.arg(),
                KernelArg::F64(thr),
                removed.arg(),
                kept.arg(),
            ],
        )?;
        dev.launch(
            "nms_group_top_keys_f32",
            LaunchCfg::for_elems(padded),
            &[
                sp,
                gp,
                kept.arg(),
                KernelArg::I64(len as i64),
                KernelArg::I64(chunk as i64),
                keys.arg(),
                KernelArg::I64(padded as i64),
            ],
        )?;
        sort_keys(&dev, &keys, padded, "nms_sort128")?;
        dev.launch(
            "nms_group_top_f32",
            LaunchCfg::linear(256, 256),
            &[
                keys.arg(),
                KernelArg::I64(len as i64),
                KernelArg::I64(imgs as i64),
                KernelArg::I64(top as i64),
                KernelArg::I64(base as i64),
                keep.gpu()?.buf.arg(),
                count.gpu()?.buf.arg(),
            ],
        )?;
    }
    Ok(NmsOutput { keep, count })
}
