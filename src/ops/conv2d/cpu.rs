//! im2col + `gemm` on the CPU, generic over f32/f64 (the 3x3 stride-1 convolutions
//! that pay go to winograd.rs from [`forward`], [`forward_pointwise_head`] and
//! [`grad_weight`]).

use gemm::Parallelism;
use rayon::prelude::*;

use crate::ops::linear::{gemm_into, gemm_ptr, MatRef};
use crate::tensor::{pool, Element};

use super::Geom;

/// Target size of one task's im2col slice, in elements: 1 MiB of f32, so the slice
/// a task writes is still in L2 when its GEMM reads it.
const COL_ELEMS: usize = 1 << 18;
/// Fewest output columns per task: narrower GEMMs spend too long packing W.
const MIN_COLS: usize = 256;
/// Fewest output columns per task when there are too few tasks for the threads.
const MIN_SPLIT_COLS: usize = 64;

/// Output columns per task for `k` rows per column (the im2col matrix's, plus the
/// output tile's where that is to stay in cache too) and `ohw` columns in each of
/// `images` images: wide enough for the GEMM, small enough for L2, and cut so that
/// every thread has work. Chunks of one image are of equal width.
pub(super) fn cols_per_task(k: usize, ohw: usize, images: usize) -> usize {
    let threads = rayon::current_num_threads();
    let mut cols = cols_for_rows(k);
    let wanted = 2 * threads;
    if images * ohw.div_ceil(cols) < wanted {
        let per_image = wanted.div_ceil(images.max(1));
        cols = cols.min(ohw.div_ceil(per_image).max(MIN_SPLIT_COLS));
    }
    let chunks = ohw.div_ceil(cols.max(1)).max(1);
    // A whole number of vector lanes: the gemm crate copies (into a fresh allocation,
    // every call) an operand whose column count is not one; only the last chunk of an
    // image is ragged, and `forward` pads it.
    ohw.div_ceil(chunks).max(1).next_multiple_of(LANES)
}

/// f32 lanes of an AVX-512 register: the column granularity that lets the gemm
/// crate read the im2col slice in place.
const LANES: usize = 16;

/// Output columns per chunk for an im2col slice of `rows` rows.
fn cols_for_rows(rows: usize) -> usize {
    (COL_ELEMS / rows.max(1)).max(MIN_COLS)
}

/// A raw pointer that tasks writing disjoint parts of one buffer may share.
#[derive(Clone, Copy)]
pub(super) struct SharedPtr<T>(pub(super) *mut T);
// SAFETY: only used where each task writes elements no other task touches.
unsafe impl<T: Send> Send for SharedPtr<T> {}
unsafe impl<T: Send> Sync for SharedPtr<T> {}
impl<T> SharedPtr<T> {
    pub(super) fn get(self) -> *mut T {
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
    im2col_ld(x, g, p0, pc, col, pc)
}

/// [`im2col`] into rows `ld >= pc` elements apart (the columns past `pc` are left
/// as they are).
fn im2col_ld<T: Element>(x: &[T], g: &Geom, p0: usize, pc: usize, col: &mut [T], ld: usize) {
    im2col_rows(x, g, 0..g.k(), p0, pc, col, ld)
}

/// Rows `rows` of [`im2col`]'s matrix (columns `[p0, p0 + pc)`) into `col`, rows
/// `ld >= pc` elements apart.
fn im2col_rows<T: Element>(
    x: &[T],
    g: &Geom,
    rows: std::ops::Range<usize>,
    p0: usize,
    pc: usize,
    col: &mut [T],
    ld: usize,
) {
    let (khw, sw) = (g.kh * g.kw, g.p.stride.1);
    for (r, row) in rows.zip(col.chunks_mut(ld)) {
        let row = &mut row[..pc];
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
            add_strided(&mut dst[iw0..], src, sw);
        });
    }
}

/// `dst[j * s] += src[j]` for every `j`. Stride 2 (the strided 3x3 convolutions'
/// dL/dx) as whole pairs, as [`im2col_rows`] reads them, so that the loop
/// vectorises; the generic loop indexes with a run-time stride and does not.
fn add_strided<T: Element>(dst: &mut [T], src: &[T], s: usize) {
    match s {
        1 => dst.iter_mut().zip(src).for_each(|(d, &v)| *d += v),
        2 => {
            // Whole pairs while they fit in `dst`; a last element without its
            // pair's second half on its own.
            let pairs = src.len().min(dst.len() / 2);
            dst[..2 * pairs]
                .chunks_exact_mut(2)
                .zip(&src[..pairs])
                .for_each(|(d, &v)| d[0] += v);
            if let Some(&v) = src.get(pairs) {
                dst[2 * pairs] += v;
            }
        }
        _ => {
            for (j, &v) in src.iter().enumerate() {
                dst[j * s] += v;
            }
        }
    }
}

/// What [`forward`] applies to each output element of channel `c` while its tile is
/// still in cache: `v * scale[c] + shift[c] + residual`, then ReLU (each part
/// optional). A bias is a shift alone.
#[derive(Clone, Copy, Default)]
pub(crate) struct TileEpilogue<'a, T> {
    pub scale: Option<&'a [T]>,
    pub shift: Option<&'a [T]>,
    /// Same layout as the output, `[N, Cout, OH * OW]`.
    pub residual: Option<&'a [T]>,
    pub relu: bool,
}

impl<T: Element> TileEpilogue<'_, T> {
    pub(super) fn is_identity(&self) -> bool {
        self.scale.is_none() && self.shift.is_none() && self.residual.is_none() && !self.relu
    }

    /// Applies the epilogue to `row`, the elements of channel `c` starting at flat
    /// output offset `at`.
    #[inline]
    pub(crate) fn apply_row(&self, row: &mut [T], c: usize, at: usize) {
        let a = self.scale.map_or(T::one(), |s| s[c]);
        let b = self.shift.map_or(T::zero(), |s| s[c]);
        let zero = T::zero();
        // One loop per case, so each compiles to a branch-free vector loop.
        match (self.residual, self.relu) {
            (Some(r), relu) => {
                let r = &r[at..at + row.len()];
                for (v, &rv) in row.iter_mut().zip(r) {
                    let t = *v * a + b + rv;
                    *v = if relu && t < zero { zero } else { t };
                }
            }
            (None, true) => row.iter_mut().for_each(|v| {
                let t = *v * a + b;
                *v = if t < zero { zero } else { t };
            }),
            (None, false) => row.iter_mut().for_each(|v| *v = *v * a + b),
        }
    }
}

/// `y [N, Cout, OH * OW] = epilogue(W @ col)`, one task per (image, column chunk);
/// each task applies the epilogue to its own output tile right after its GEMM.
/// The output buffer comes from the host pool and is written, never zero-filled.
pub(crate) fn forward<T: Element>(x: &[T], w: &[T], ep: &TileEpilogue<'_, T>, g: &Geom) -> Vec<T> {
    if super::winograd::serves(g) {
        return super::winograd::forward(x, w, ep, g);
    }
    forward_with(x, MatRef::row_major(w, g.cout, g.k()), ep, g)
}

/// [`forward`] with the weight as a `[Cout, K]` view (any strides): dL/dx of a 1x1
/// convolution passes `Wᵀ` without moving it. No Winograd here (it needs `W`'s
/// elements in their own layout).
fn forward_with<T: Element>(
    x: &[T],
    wm: MatRef<'_, T>,
    ep: &TileEpilogue<'_, T>,
    g: &Geom,
) -> Vec<T> {
    let (k, ohw, chw) = (g.k(), g.ohw(), g.cin * g.hw());
    debug_assert_eq!((wm.rows, wm.cols), (g.cout, k));
    let mut y = pool::take::<T>(g.n * g.cout * ohw);
    // Chunks sized for the operand slice and the output tile together, so that the
    // epilogue reads the tile from L2: sized for the operand alone, a 64 -> 256 1x1
    // conv at 200x304 wrote 4 MiB tiles (l1.conv3, l1.downsample: 53-61% of the
    // square GEMM on an Intel Xeon with 2 MiB of L2 per core; 65-70% sized so).
    let cols = cols_per_task(k + g.cout, ohw, g.n);
    let chunks = ohw.div_ceil(cols);
    let yp = SharedPtr(y.as_mut_ptr());
    (0..g.n * chunks).into_par_iter().for_each(|t| {
        let (img, p0) = (t / chunks, (t % chunks) * cols);
        let pc = cols.min(ohw - p0);
        let xi = &x[img * chw..(img + 1) * chw];
        let base = img * g.cout * ohw + p0;
        // SAFETY (for both writers below): columns [p0, p0 + pc) of image `img`
        // belong to this task alone, and y outlives the parallel loop.
        let epilogue = |dst: *mut T| unsafe {
            if !ep.is_identity() {
                for co in 0..g.cout {
                    let row = std::slice::from_raw_parts_mut(dst.add(co * ohw), pc);
                    ep.apply_row(row, co, base + co * ohw);
                }
            }
        };
        if pc % LANES != 0 {
            // The ragged last chunk: its columns padded to whole lanes in scratch
            // (operand and product), then the real columns copied out, so that the
            // gemm crate allocates nothing.
            let pcp = pc.next_multiple_of(LANES);
            pool::with_scratch(k * pcp + g.cout * pcp, |buf: &mut [T]| {
                let (col, prod) = buf.split_at_mut(k * pcp);
                if g.pointwise() {
                    for (r, row) in col.chunks_exact_mut(pcp).enumerate() {
                        row[..pc].copy_from_slice(&xi[r * ohw + p0..r * ohw + p0 + pc]);
                    }
                } else {
                    im2col_ld(xi, g, p0, pc, col, pcp);
                }
                let rhs = MatRef::row_major(&*col, k, pcp);
                gemm_into(prod, pcp, false, wm, rhs, Parallelism::None);
                unsafe {
                    let dst = yp.get().add(base);
                    for (co, row) in prod.chunks_exact(pcp).enumerate() {
                        std::ptr::copy_nonoverlapping(row.as_ptr(), dst.add(co * ohw), pc);
                    }
                    epilogue(dst);
                }
            });
            return;
        }
        let run = |rhs: MatRef<'_, T>| unsafe {
            let dst = yp.get().add(base);
            gemm_ptr(dst, ohw, false, wm, rhs, Parallelism::None);
            epilogue(dst);
        };
        if g.pointwise() {
            run(MatRef::rows_ld(&xi[p0..], g.cin, pc, ohw));
        } else {
            // The im2col slice lives in this thread's scratch buffer (no
            // allocation per task).
            pool::with_scratch(k * pc, |buf: &mut [T]| {
                im2col(xi, g, p0, pc, buf);
                run(MatRef::row_major(&*buf, k, pc));
            });
        }
    });
    y
}

/// A 1x1 convolution applied to [`forward`]'s output tile while the tile is in
/// cache: `w2: [c2, Cout]`, `b2: [c2]`. The RPN head's objectness and box-delta
/// convs (3 + 12 channels over 256) are such a pair: run on their own they read the
/// 256-channel map from memory twice for 15 output channels (memory-bound, under a
/// fifth of the square GEMM's GFLOP/s); here each tile of the 3x3 conv's output
/// feeds them straight from L2, and the 3x3 output is never stored.
#[derive(Clone, Copy)]
pub(crate) struct PointwiseHead<'a, T> {
    pub w2: &'a [T],
    pub b2: Option<&'a [T]>,
    /// Output channels of each result, in order: `w2`'s rows are split among them.
    pub splits: &'a [usize],
}

impl<T: Element> PointwiseHead<'_, T> {
    /// One pooled `[N, splits[i], OH * OW]` buffer per split.
    pub(super) fn outputs(&self, n: usize, ohw: usize) -> Vec<Vec<T>> {
        self.splits
            .iter()
            .map(|&c| pool::take::<T>(n * c * ohw))
            .collect()
    }

    /// `W2 @ tile + b2` for output columns `[p0, p0 + pc)` of image `img`, written
    /// to the split outputs `outs`: `tile: [Cout, pcp]` (the first conv's output
    /// after its epilogue, columns padded to `pcp`), `prod: [C2, pcp]` scratch.
    ///
    /// # Safety
    /// `outs` point at [`Self::outputs`]' buffers, and columns `[p0, p0 + pc)` of
    /// image `img` in them belong to the caller alone.
    pub(super) unsafe fn write_tile(
        &self,
        tile: &[T],
        (cout, pcp, pc): (usize, usize, usize),
        prod: &mut [T],
        outs: &[SharedPtr<T>],
        (img, ohw, p0): (usize, usize, usize),
    ) {
        let c2: usize = self.splits.iter().sum();
        let w2m = MatRef::row_major(self.w2, c2, cout);
        let tm = MatRef::row_major(tile, cout, pcp);
        gemm_into(prod, pcp, false, w2m, tm, Parallelism::None);
        let mut rows = prod.chunks_exact(pcp).enumerate();
        for (&c, out) in self.splits.iter().zip(outs) {
            for (j, (co, row)) in rows.by_ref().take(c).enumerate() {
                let b = self.b2.map_or(T::zero(), |b| b[co]);
                let dst =
                    std::slice::from_raw_parts_mut(out.get().add((img * c + j) * ohw + p0), pc);
                dst.iter_mut()
                    .zip(&row[..pc])
                    .for_each(|(d, &v)| *d = v + b);
            }
        }
    }
}

/// `heads = W2 @ epilogue(W @ col) + b2`, one task per (image, column chunk) as in
/// [`forward`]; returns one `[N, splits[i], OH * OW]` buffer per split. Each
/// output element is the same sum of the same products as [`forward`] followed by
/// a 1x1 [`forward`] (the tiles are as wide, or wider, per GEMM call); the
/// tests check it against that pair.
pub(crate) fn forward_pointwise_head<T: Element>(
    x: &[T],
    w: &[T],
    ep: &TileEpilogue<'_, T>,
    head: &PointwiseHead<'_, T>,
    g: &Geom,
) -> Vec<Vec<T>> {
    if super::winograd::serves(g) {
        return super::winograd::forward_pointwise_head(x, w, ep, head, g);
    }
    let (k, ohw, chw) = (g.k(), g.ohw(), g.cin * g.hw());
    let c2: usize = head.splits.iter().sum();
    let mut outs = head.outputs(g.n, ohw);
    let ptrs: Vec<SharedPtr<T>> = outs.iter_mut().map(|o| SharedPtr(o.as_mut_ptr())).collect();
    let cols = cols_per_task(k, ohw, g.n);
    let chunks = ohw.div_ceil(cols);
    let wm = MatRef::row_major(w, g.cout, k);
    (0..g.n * chunks).into_par_iter().for_each(|t| {
        let (img, p0) = (t / chunks, (t % chunks) * cols);
        let pc = cols.min(ohw - p0);
        let pcp = pc.next_multiple_of(LANES);
        let xi = &x[img * chw..(img + 1) * chw];
        // Operand, tile and head product in this thread's scratch, columns padded
        // to whole lanes (the padding columns are never read back).
        pool::with_scratch((k + g.cout + c2) * pcp, |buf: &mut [T]| {
            let (col, rest) = buf.split_at_mut(k * pcp);
            let (tile, prod) = rest.split_at_mut(g.cout * pcp);
            im2col_ld(xi, g, p0, pc, col, pcp);
            let rhs = MatRef::row_major(&*col, k, pcp);
            gemm_into(tile, pcp, false, wm, rhs, Parallelism::None);
            if !ep.is_identity() {
                let base = img * g.cout * ohw + p0;
                for (co, row) in tile.chunks_exact_mut(pcp).enumerate() {
                    ep.apply_row(&mut row[..pc], co, base + co * ohw);
                }
            }
            // SAFETY: columns [p0, p0 + pc) of image `img` belong to this task alone,
            // and the outputs outlive the parallel loop.
            unsafe { head.write_tile(tile, (g.cout, pcp, pc), prod, &ptrs, (img, ohw, p0)) };
        });
    });
    outs
}

/// dL/dx of the convolution `g` given `gy: [N, Cout, OH * OW]`.
///
/// Stride 1 (any kernel, padding at most the dilated kernel's reach): dL/dx is
/// itself a stride-1 convolution of `gy` with the flipped, transposed kernel
/// ([`transposed_geometry`]), so it runs as [`forward`] does: tasks over output
/// columns, each GEMM's operand an L2-sized im2col slice of `gy` and its result
/// written once, no zero-filled buffer and no col2im. A 1x1 unpadded kernel of
/// stride s is the 1x1 product at the `OH x OW` positions it read, scattered into
/// an otherwise zero gradient. Other shapes: [`grad_input_col2im`].
pub(super) fn grad_input<T: Element>(gy: &[T], w: &[T], g: &Geom) -> Vec<T> {
    // A 1x1 kernel needs no flip: its transposed weight is a view of `w` (a copied
    // transpose of l4.downsample's 2M-element weight took about a third of its dL/dx).
    let pointwise_t = || MatRef::row_major(w, g.cout, g.cin).t();
    if let Some(gt) = transposed_geometry(g) {
        if g.kh == 1 && g.kw == 1 {
            return forward_with(gy, pointwise_t(), &TileEpilogue::default(), &gt);
        }
        let wt = flipped_transposed(w, g);
        let gx = forward(gy, &wt, &TileEpilogue::default(), &gt);
        pool::give(wt);
        return gx;
    }
    if g.kh == 1 && g.kw == 1 && g.p.padding == (0, 0) && g.p.dilation == (1, 1) {
        let gt = Geom {
            cin: g.cout,
            h: g.oh,
            w: g.ow,
            cout: g.cin,
            p: super::Conv2dParams::default(),
            ..*g
        };
        let z = forward_with(gy, pointwise_t(), &TileEpilogue::default(), &gt);
        let gx = scatter_strided(&z, g);
        pool::give(z);
        return gx;
    }
    grad_input_col2im(gy, w, g)
}

/// The geometry of dL/dx as a convolution of `gy` when `g` has stride 1: input
/// `[N, Cout, OH, OW]`, `Cin` output channels, the same kernel and dilation,
/// padding `d (k - 1) - p` (output `H x W` again). `None` for other strides, or
/// a padding beyond the dilated kernel's reach.
fn transposed_geometry(g: &Geom) -> Option<Geom> {
    if g.p.stride != (1, 1) {
        return None;
    }
    let pad = |d: usize, k: usize, p: usize| (d * (k - 1)).checked_sub(p);
    let p = super::Conv2dParams {
        stride: (1, 1),
        padding: (
            pad(g.p.dilation.0, g.kh, g.p.padding.0)?,
            pad(g.p.dilation.1, g.kw, g.p.padding.1)?,
        ),
        dilation: g.p.dilation,
    };
    let gt = Geom {
        cin: g.cout,
        h: g.oh,
        w: g.ow,
        cout: g.cin,
        oh: g.h,
        ow: g.w,
        p,
        ..*g
    };
    // The output size must come back to H x W (it does whenever the forward's
    // output size is exact, which stride 1 guarantees).
    let back = super::conv2d_output_size((g.oh, g.ow), (g.kh, g.kw), &p);
    (back == Some((g.h, g.w))).then_some(gt)
}

/// `w: [Cout, Cin, kh, kw]` as `[Cin, Cout, kh, kw]` with each kernel rotated by
/// 180 degrees: the weight of dL/dx as a convolution of dL/dy (every element
/// written, into a host-pool buffer).
fn flipped_transposed<T: Element>(w: &[T], g: &Geom) -> Vec<T> {
    let khw = g.kh * g.kw;
    let mut wt = pool::take::<T>(w.len());
    for co in 0..g.cout {
        for ci in 0..g.cin {
            let src = &w[(co * g.cin + ci) * khw..][..khw];
            let dst = &mut wt[(ci * g.cout + co) * khw..][..khw];
            for (d, &v) in dst.iter_mut().zip(src.iter().rev()) {
                *d = v;
            }
        }
    }
    wt
}

/// `z: [N, Cin, OH * OW]`, the 1x1 product at the positions a strided 1x1
/// unpadded convolution read, placed at `(oh * sh, ow * sw)` of a `[N, Cin, H, W]`
/// gradient that is zero elsewhere (every element written once).
fn scatter_strided<T: Element>(z: &[T], g: &Geom) -> Vec<T> {
    let (hw, ohw, (sh, sw)) = (g.hw(), g.ohw(), g.p.stride);
    let mut gx = pool::take::<T>(g.n * g.cin * hw);
    gx.par_chunks_mut(hw)
        .zip(z.par_chunks(ohw))
        .for_each(|(plane, zp)| {
            for (ih, row) in plane.chunks_exact_mut(g.w).enumerate() {
                row.fill(T::zero());
                if ih % sh == 0 && ih / sh < g.oh {
                    let src = &zp[(ih / sh) * g.ow..][..g.ow];
                    for (d, &v) in row.iter_mut().step_by(sw).zip(src) {
                        *d = v;
                    }
                }
            }
        });
    gx
}

/// `gx = col2im(Wᵀ @ gy)`, one task per (image, group of input channels); each
/// task owns its channels' planes of gx, so col2im needs no synchronisation.
fn grad_input_col2im<T: Element>(gy: &[T], w: &[T], g: &Geom) -> Vec<T> {
    let (k, ohw, hw, khw) = (g.k(), g.ohw(), g.hw(), g.kh * g.kw);
    let mut gx = pool::take_zeroed::<T>(g.n * g.cin * hw);
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
            gxi.par_chunks_mut(cg * hw)
                .enumerate()
                .for_each(|(gi, gxg)| {
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
                    // This thread's scratch, not a vector per task: a warm
                    // training step allocates nothing here.
                    pool::with_scratch(rows * cols.min(ohw), |scratch: &mut [T]| {
                        for p0 in (0..ohw).step_by(cols) {
                            let pc = cols.min(ohw - p0);
                            let buf = &mut scratch[..rows * pc];
                            let gym = MatRef::rows_ld(&gyi[p0..], g.cout, pc, ohw);
                            gemm_into(buf, pc, false, wt, gym, Parallelism::None);
                            col2im_add(buf, g, p0, pc, gxg);
                        }
                    });
                });
        });
    gx
}

/// `gw = sum over images and column chunks of gy @ colᵀ`.
///
/// When dL/dw is small beside the reduction (`K` at most 256 and far below
/// `N * OH * OW`: the stem, the 64-channel layers, the first downsample), the
/// reduction is cut instead ([`grad_weight_split_sum`]; for a spatial kernel, the
/// stem's, from pixel-major im2col slices: [`grad_weight_pixel_major`]): each task
/// reads its own columns of `gy` and `x` once. Otherwise the rows of col (the
/// columns of gw) are cut into one range per task: each task makes only its rows of
/// every im2col slice and accumulates its own columns of gw over the whole batch,
/// so the part of gw a GEMM reads and writes stays in L2 and no partial sums are
/// added afterwards.
/// Either way every element is summed in the same order whatever the thread
/// scheduling.
pub(super) fn grad_weight<T: Element>(x: &[T], gy: &[T], g: &Geom) -> Vec<T> {
    if super::winograd::serves(g) {
        return super::winograd::grad_weight(x, gy, g);
    }
    let (k, ohw, chw) = (g.k(), g.ohw(), g.cin * g.hw());
    let mut gw = pool::take::<T>(g.cout * k);
    if gw.is_empty() {
        return gw;
    }
    if ohw == 0 || g.n == 0 {
        gw.fill(T::zero());
        return gw;
    }
    // Measured (conv6, BENCH_RESULTS.md at 97da0f7): better for K <= 256 except a
    // pointwise conv with fewer output than input channels (l1.conv1: there the row
    // cut re-reads only the smaller gy, and its GEMMs keep long reductions); worse
    // for K = 1152 (l2.conv2.first: chunks of 240 columns).
    let pointwise_narrow = g.pointwise() && g.cout < k;
    if k <= SPLIT_SUM_MAX_K
        && k * SPLIT_SUM_RATIO <= g.n * ohw
        && g.cout * k <= SPLIT_SUM_MAX_ELEMS
        && !pointwise_narrow
    {
        grad_weight_split_sum(x, gy, g, &mut gw);
        return gw;
    }
    let tasks = (2 * rayon::current_num_threads())
        .min(k.div_ceil(MIN_WGRAD_ROWS))
        .max(1);
    let per = k.div_ceil(tasks);
    let gwp = SharedPtr(gw.as_mut_ptr());
    (0..k.div_ceil(per)).into_par_iter().for_each(|t| {
        let (r0, r1) = (t * per, k.min((t + 1) * per));
        let rows = r1 - r0;
        let cols = cols_for_rows(rows).next_multiple_of(LANES).min(ohw);
        let scratch_len = if g.pointwise() { 0 } else { rows * cols };
        pool::with_scratch(scratch_len, |scratch: &mut [T]| {
            let mut first = true;
            for img in 0..g.n {
                let xi = &x[img * chw..(img + 1) * chw];
                for p0 in (0..ohw).step_by(cols) {
                    let pc = cols.min(ohw - p0);
                    let gym = MatRef::rows_ld(&gy[img * g.cout * ohw + p0..], g.cout, pc, ohw);
                    let col_t = if g.pointwise() {
                        MatRef::rows_ld(&xi[r0 * ohw + p0..], rows, pc, ohw).t()
                    } else {
                        let buf = &mut scratch[..rows * pc];
                        im2col_rows(xi, g, r0..r1, p0, pc, buf, pc);
                        MatRef::row_major(&*buf, rows, pc).t()
                    };
                    // SAFETY: columns [r0, r1) of gw belong to this task alone, and
                    // gw outlives the parallel loop.
                    unsafe {
                        gemm_ptr(gwp.get().add(r0), k, !first, gym, col_t, Parallelism::None);
                    }
                    first = false;
                }
            }
        });
    });
    gw
}

/// Fewest rows of the im2col matrix (columns of gw) per weight-gradient task.
const MIN_WGRAD_ROWS: usize = 16;
/// [`grad_weight`] cuts the reduction when `K` is at most this...
const SPLIT_SUM_MAX_K: usize = 256;
/// ... the reduction is at least this many times `K`...
const SPLIT_SUM_RATIO: usize = 8;
/// ... and dL/dw has at most this many elements (each partial sum stays in L2).
const SPLIT_SUM_MAX_ELEMS: usize = 1 << 18;
/// Partial sums of [`grad_weight_split_sum`]: a fixed number (not one per thread),
/// so that the summation order depends on the shapes alone.
const SPLIT_SUM_PARTS: usize = 4;

/// dL/dw with the reduction over (image, column) cut into [`SPLIT_SUM_PARTS`]
/// contiguous ranges of L2-sized column chunks: part `i` sums its chunks' `gy @
/// colᵀ` in order into its own `[Cout, K]` buffer, and `gw` is part 0 + part 1 +
/// ... in that order, element by element. Each task reads its columns of `gy` and
/// `x` once (the row-cut order re-reads all of `gy` once per task, and its GEMMs'
/// few output columns made poor use of the packed `gy`).
fn grad_weight_split_sum<T: Element>(x: &[T], gy: &[T], g: &Geom, gw: &mut [T]) {
    if g.kh * g.kw > 1 {
        return grad_weight_pixel_major(x, gy, g, gw);
    }
    let (k, ohw, chw, m) = (g.k(), g.ohw(), g.cin * g.hw(), g.cout * g.k());
    let cols = cols_for_rows(k).next_multiple_of(LANES).min(ohw);
    let per_image = ohw.div_ceil(cols);
    let chunks = g.n * per_image;
    let parts = SPLIT_SUM_PARTS.min(chunks);
    let mut partial = pool::take::<T>((parts - 1) * m);
    // Part 0 sums straight into gw, the others into `partial`.
    let dsts: Vec<SharedPtr<T>> = std::iter::once(SharedPtr(gw.as_mut_ptr()))
        .chain((1..parts).map(|i| SharedPtr(partial[(i - 1) * m..].as_mut_ptr())))
        .collect();
    (0..parts).into_par_iter().for_each(|part| {
        let (c0, c1) = (part * chunks / parts, (part + 1) * chunks / parts);
        let scratch_len = if g.pointwise() { 0 } else { k * cols };
        pool::with_scratch(scratch_len, |scratch: &mut [T]| {
            for c in c0..c1 {
                let (img, p0) = (c / per_image, (c % per_image) * cols);
                let pc = cols.min(ohw - p0);
                let xi = &x[img * chw..(img + 1) * chw];
                let gym = MatRef::rows_ld(&gy[img * g.cout * ohw + p0..], g.cout, pc, ohw);
                let col_t = if g.pointwise() {
                    MatRef::rows_ld(&xi[p0..], k, pc, ohw).t()
                } else {
                    let buf = &mut scratch[..k * pc];
                    im2col(xi, g, p0, pc, buf);
                    MatRef::row_major(&*buf, k, pc).t()
                };
                // SAFETY: part `part`'s buffer belongs to this task alone and
                // outlives the parallel loop.
                unsafe {
                    gemm_ptr(dsts[part].get(), k, c > c0, gym, col_t, Parallelism::None);
                }
            }
        });
    });
    if parts > 1 {
        let per = m.div_ceil(2 * rayon::current_num_threads()).max(4096);
        gw.par_chunks_mut(per).enumerate().for_each(|(i, out)| {
            let at = i * per;
            for p in 0..parts - 1 {
                let src = &partial[p * m + at..][..out.len()];
                out.iter_mut().zip(src).for_each(|(o, &v)| *o += v);
            }
        });
    }
    pool::give(partial);
}

/// Output channels per GEMM of [`grad_weight_pixel_major`]: the gemm crate reads
/// an operand laid out as its micro-kernel wants in place only while the product
/// has at most 8 column panels (48 columns of its AVX-512 f32 kernel); above that
/// it copies it into packed panels first.
const PIXEL_MAJOR_GROUP: usize = 48;

/// [`grad_weight_split_sum`] for a spatial kernel (the stem): the same fixed parts
/// over the same kind of L2-sized column chunks, but each chunk's im2col slice is
/// made pixel-major (`[pixels, K]`, rows padded to whole vectors:
/// [`im2col_pixel_major`]), the layout the gemm crate's micro-kernel reads in
/// place, and the product runs in groups of [`PIXEL_MAJOR_GROUP`] output channels
/// (`dL/dy` is read in place too). With the row-major slice the crate repacked
/// both operands of every chunk: 31% of the stem's dL/dw in a perf profile, more
/// than its im2col. Part `i` sums its chunks into its own `[Cout, K padded]` buffer;
/// `gw` is part 0 + part 1 + ... in that order, element by element.
fn grad_weight_pixel_major<T: Element>(x: &[T], gy: &[T], g: &Geom, gw: &mut [T]) {
    let (k, ohw, chw) = (g.k(), g.ohw(), g.cin * g.hw());
    let ldk = k.next_multiple_of(LANES);
    let m = g.cout * ldk;
    let cols = cols_for_rows(ldk).next_multiple_of(LANES).min(ohw);
    let per_image = ohw.div_ceil(cols);
    let chunks = g.n * per_image;
    let parts = SPLIT_SUM_PARTS.min(chunks);
    let mut sums = pool::take::<T>(parts * m);
    let dsts: Vec<SharedPtr<T>> = sums
        .chunks_exact_mut(m)
        .map(|p| SharedPtr(p.as_mut_ptr()))
        .collect();
    let row_len = g.w + 2 * g.p.padding.1;
    (0..parts).into_par_iter().for_each(|part| {
        let (c0, c1) = (part * chunks / parts, (part + 1) * chunks / parts);
        pool::with_scratch(cols * ldk + row_len, |scratch: &mut [T]| {
            let (colt, row) = scratch.split_at_mut(cols * ldk);
            for c in c0..c1 {
                let (img, p0) = (c / per_image, (c % per_image) * cols);
                let pc = cols.min(ohw - p0);
                let xi = &x[img * chw..(img + 1) * chw];
                let colt = &mut colt[..pc * ldk];
                im2col_pixel_major(xi, g, p0, pc, colt, ldk, row);
                let col_t = MatRef::row_major(&*colt, pc, ldk);
                for co in (0..g.cout).step_by(PIXEL_MAJOR_GROUP) {
                    let nc = PIXEL_MAJOR_GROUP.min(g.cout - co);
                    let at = (img * g.cout + co) * ohw + p0;
                    let gym = MatRef::rows_ld(&gy[at..], nc, pc, ohw);
                    // SAFETY: part `part`'s buffer belongs to this task alone and
                    // outlives the parallel loop; rows co..co + nc of it are in it.
                    unsafe {
                        let dst = dsts[part].get().add(co * ldk);
                        gemm_ptr(dst, ldk, c > c0, gym, col_t, Parallelism::None);
                    }
                }
            }
        });
    });
    gw.par_chunks_mut(k).enumerate().for_each(|(co, out)| {
        for (r, o) in out.iter_mut().enumerate() {
            let mut v = sums[co * ldk + r];
            for p in 1..parts {
                v += sums[p * m + co * ldk + r];
            }
            *o = v;
        }
    });
    pool::give(sums);
}

/// Columns `[p0, p0 + pc)` of [`im2col`]'s matrix of one image, transposed: pixel
/// `j`'s `K` taps at `colt[j * ldk..][..K]`, in im2col's row order, then zeros up
/// to `ldk`. `row`: scratch of `W + 2 * pw` elements (one zero-padded input row).
fn im2col_pixel_major<T: Element>(
    x: &[T],
    g: &Geom,
    p0: usize,
    pc: usize,
    colt: &mut [T],
    ldk: usize,
    row: &mut [T],
) {
    let (k, pw) = (g.k(), g.p.padding.1);
    let row = &mut row[..g.w + 2 * pw];
    for px in colt.chunks_exact_mut(ldk) {
        px[k..].fill(T::zero());
    }
    row_pieces(g.ow, p0, pc, |oh, o0, o1, at| {
        let dst = &mut colt[at * ldk..(at + o1 - o0) * ldk];
        for c in 0..g.cin {
            for ki in 0..g.kh {
                let t0 = (c * g.kh + ki) * g.kw;
                let Some(ih) = tap(g, oh, ki, 0).0 else {
                    for px in dst.chunks_exact_mut(ldk) {
                        px[t0..t0 + g.kw].fill(T::zero());
                    }
                    continue;
                };
                // The input row with the padding's zeros either side: every tap of
                // every output column then lies inside it (the output size
                // guarantees (OW - 1) sw + (kw - 1) dw < W + 2 pw).
                row[..pw].fill(T::zero());
                row[pw..pw + g.w].copy_from_slice(&x[(c * g.h + ih) * g.w..][..g.w]);
                row[pw + g.w..].fill(T::zero());
                let src = &row[o0 * g.p.stride.1..];
                put_taps(dst, ldk, t0, src, g);
            }
        }
    });
}

/// Tap `kj` of pixel `j` of `dst` (pixel rows `ldk` apart, taps from `t0`) is
/// `src[j * sw + kj * dw]`, for `kw` taps; runs of 3, 5 and 7 taps (dilation 1)
/// are fixed-size copies.
fn put_taps<T: Element>(dst: &mut [T], ldk: usize, t0: usize, src: &[T], g: &Geom) {
    fn runs<T: Copy, const R: usize>(dst: &mut [T], ldk: usize, t0: usize, src: &[T], sw: usize) {
        for (j, px) in dst.chunks_exact_mut(ldk).enumerate() {
            let s: &[T; R] = src[j * sw..j * sw + R].try_into().expect("R taps");
            px[t0..t0 + R].copy_from_slice(s);
        }
    }
    let (sw, dw, kw) = (g.p.stride.1, g.p.dilation.1, g.kw);
    match (dw, kw) {
        (1, 3) => runs::<T, 3>(dst, ldk, t0, src, sw),
        (1, 5) => runs::<T, 5>(dst, ldk, t0, src, sw),
        (1, 7) => runs::<T, 7>(dst, ldk, t0, src, sw),
        _ => {
            for (j, px) in dst.chunks_exact_mut(ldk).enumerate() {
                for (kj, t) in px[t0..t0 + kw].iter_mut().enumerate() {
                    *t = src[j * sw + kj * dw];
                }
            }
        }
    }
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
