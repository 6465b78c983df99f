//! 3x3 stride-1 convolutions on the CPU by Winograd's minimal filtering F(2x2, 3x3)
//! (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks", 2016).
//!
//! Each 2x2 block of outputs (a tile) is `Aᵀ [(G g Gᵀ) ⊙ (Bᵀ d B)] A` over the 4x4
//! input patch `d` it reads: 16 products per input channel instead of 36, so the
//! GEMMs that carry the work shrink 2.25x. Per task (one image, a band of tile
//! rows): the input patches are transformed into `V: [16][Cin][tiles]`, sixteen
//! GEMMs `M[ξ] = U[ξ] @ V[ξ]` (`U: [16][Cout][Cin]`, the transformed weights, made
//! once per call) give `M: [16][Cout][tiles]`, and the output transform writes each
//! 2x2 block once, then the tile epilogue (scale, shift, residual, ReLU) runs over
//! the band's rows while they are in cache.
//!
//! The transforms' coefficients are 0, ±1 and ±1/2, so they add no rounding of their
//! own beyond the additions; the result differs from the direct sum by a few units
//! in the last place of the sum of |products| (unit tests against direct f64 sums;
//! tests/conv2d.rs through `conv2d` and its backward). Used where it pays
//! ([`pays`]): the FPN's and the RPN head's 256-channel 3x3 layers, ResNet's 3x3
//! stride-1 layers, the dL/dx of each of them (a stride-1 3x3 convolution of dL/dy,
//! see `cpu::grad_input`) and their dL/dw ([`grad_weight`]). Sums are in the same
//! order run to run; like the im2col path's, the band sizes (and so the GEMM shapes)
//! of the forward follow the thread count.

use gemm::Parallelism;
use rayon::prelude::*;

use crate::ops::linear::{gemm_into, MatRef};
use crate::tensor::{pool, Element};

use super::cpu::{PointwiseHead, SharedPtr, TileEpilogue};
use super::Geom;

/// Transformed-domain points: a 4x4 patch per tile.
const XI: usize = 16;
/// f32 lanes of an AVX-512 register: GEMM column counts are padded to a multiple
/// (the gemm crate then reads the operands in place).
const LANES: usize = 16;
/// Target tiles per task: wide enough GEMMs, `V` and `M` within L2/L3.
const TILES_PER_TASK: usize = 320;

/// Fewest tiles (over the batch) for which F(2x2, 3x3) pays: the weight transform,
/// made once per call, costs about as much as the GEMMs of ~100 tiles, and the
/// 25x38 maps of 512 channels (247 tiles) measured slower than im2col.
const MIN_TILES: usize = 600;

/// Whether the CPU convolutions may use F(2x2, 3x3): yes unless the environment
/// sets `KESTREL_CPU_WINOGRAD=0` (read once; for A/B timing against the im2col
/// path, which computes the direct sums).
pub(super) fn enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("KESTREL_CPU_WINOGRAD").map_or(true, |v| v != "0"))
}

/// Whether the CPU runs the convolution `g` by F(2x2, 3x3): [`enabled`] and it
/// [`pays`] (the one test at each of cpu.rs's entry points).
pub(super) fn serves(g: &Geom) -> bool {
    enabled() && pays(g)
}

/// Whether F(2x2, 3x3) pays for the convolution `g`: a 3x3 kernel, stride 1,
/// dilation 1, padding at most 2 (the patch of a tile then starts inside or next to
/// the input), at least 16 input and output channels, and at least [`MIN_TILES`]
/// tiles.
pub(super) fn pays(g: &Geom) -> bool {
    let p = &g.p;
    g.kh == 3
        && g.kw == 3
        && p.stride == (1, 1)
        && p.dilation == (1, 1)
        && p.padding.0 <= 2
        && p.padding.1 <= 2
        && g.cin >= 16
        && g.cout >= 16
        && g.oh >= 2
        && g.ow >= 2
        && g.n * g.oh.div_ceil(2) * g.ow.div_ceil(2) >= MIN_TILES
}

/// `U: [16][Cout][Cin]`, `U[·][co][ci] = G g Gᵀ` of the kernel `w[co][ci]: 3x3`,
/// G = [[1, 0, 0], [½, ½, ½], [½, -½, ½], [0, 0, 1]] (computed in f64, the halves
/// exact, then rounded once to `T`).
pub(super) fn transform_weights<T: Element>(w: &[T], cout: usize, cin: usize) -> Vec<T> {
    let plane = cout * cin;
    let mut u = pool::take::<T>(XI * plane);
    let up = SharedPtr(u.as_mut_ptr());
    (0..plane).into_par_iter().with_min_len(256).for_each(|i| {
        let g: [f64; 9] = std::array::from_fn(|j| w[i * 9 + j].f64());
        let rows = |a: usize, c: usize| -> f64 {
            // (G g)[a][c]
            let (g0, g1, g2) = (g[c], g[3 + c], g[6 + c]);
            match a {
                0 => g0,
                1 => 0.5 * (g0 + g1 + g2),
                2 => 0.5 * (g0 - g1 + g2),
                _ => g2,
            }
        };
        for a in 0..4 {
            let (r0, r1, r2) = (rows(a, 0), rows(a, 1), rows(a, 2));
            let vals = [r0, 0.5 * (r0 + r1 + r2), 0.5 * (r0 - r1 + r2), r2];
            for (b, &v) in vals.iter().enumerate() {
                // SAFETY: element (a * 4 + b, i) belongs to this iteration alone.
                unsafe { *up.get().add((a * 4 + b) * plane + i) = T::of(v) };
            }
        }
    });
    u
}

/// Tile rows per task for `th x tw` tiles per image over `n` images: about
/// [`TILES_PER_TASK`] tiles, and at least two tasks per thread where the images
/// allow.
fn band_rows(n: usize, th: usize, tw: usize) -> usize {
    let threads = rayon::current_num_threads();
    let mut band = (TILES_PER_TASK / tw.max(1)).clamp(1, th.max(1));
    while band > 1 && n * th.div_ceil(band) < 2 * threads {
        band = band.div_ceil(2);
    }
    band
}

/// Scratch elements one task needs for `bt` tiles: `V` and `M` (columns padded to
/// lanes), then the transforms' rows: four padded input rows, their row
/// combinations split into even and odd columns, and the output transform's sums.
fn scratch_len(g: &Geom, bt: usize, tw: usize) -> usize {
    let ntp = bt.next_multiple_of(LANES);
    XI * (g.cin + g.cout) * ntp + 4 * 2 * (tw + 1) + 8 * (tw + 1) + 12 * tw
}

/// `a - b`, `a + b`, elementwise into `out` (all of one length): small loops the
/// compiler turns into vector code (no bounds checks inside).
#[inline(always)]
fn sub_into<T: Element>(out: &mut [T], a: &[T], b: &[T]) {
    out.iter_mut()
        .zip(a.iter().zip(b))
        .for_each(|(o, (&x, &y))| *o = x - y);
}
#[inline(always)]
fn add_into<T: Element>(out: &mut [T], a: &[T], b: &[T]) {
    out.iter_mut()
        .zip(a.iter().zip(b))
        .for_each(|(o, (&x, &y))| *o = x + y);
}

/// Splits `buf` into consecutive rows of `len` elements.
fn rows_of<T>(buf: &mut [T], len: usize) -> std::slice::ChunksExactMut<'_, T> {
    buf.chunks_exact_mut(len)
}

/// The input transform of tile rows `[ti0, ti1)` of image `xi`: `v: [16][Cin][ntp]`
/// gets `V[a * 4 + k][ci][t] = (Bᵀ d B)[a][k]` of tile `t`'s 4x4 patch `d`, its
/// padding columns `[nt, ntp)` zeroed. `prows` (4 x 2 (tw + 1)) and `eo`
/// (8 x (tw + 1)) are scratch.
fn input_transform<T: Element>(
    xi: &[T],
    g: &Geom,
    (ti0, ti1): (usize, usize),
    ntp: usize,
    v: &mut [T],
    prows: &mut [T],
    eo: &mut [T],
) {
    let tw = g.ow.div_ceil(2);
    let nt = (ti1 - ti0) * tw;
    let (ph, pw) = (g.p.padding.0 as isize, g.p.padding.1 as isize);
    let zero = T::zero();
    let pl = 2 * (tw + 1);
    // Input transform: V[a * 4 + k][ci][t] = (Bᵀ d B)[a][k] of tile t's 4x4 patch d,
    // Bᵀ = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]]. Bᵀ acts on the
    // patch rows and B on its columns; the rows are combined first (whole padded
    // rows), then the columns (tile j's columns 2j..2j+3 are e[j], o[j], e[j+1],
    // o[j+1] of the combined row split into even and odd columns).
    for ci in 0..g.cin {
        let plane = &xi[ci * g.hw()..(ci + 1) * g.hw()];
        for ti in ti0..ti1 {
            for (r, prow) in rows_of(prows, pl).enumerate() {
                let ih = (2 * ti) as isize - ph + r as isize;
                if ih < 0 || ih >= g.h as isize {
                    prow.fill(zero);
                } else {
                    let src = &plane[ih as usize * g.w..(ih as usize + 1) * g.w];
                    // prow[c] = x[ih][c - pw]
                    let lo = pw as usize;
                    let hi = (lo + g.w).min(pl);
                    prow[..lo].fill(zero);
                    prow[lo..hi].copy_from_slice(&src[..hi - lo]);
                    prow[hi..].fill(zero);
                }
            }
            let (p0, rest) = prows.split_at(pl);
            let (p1, rest) = rest.split_at(pl);
            let (p2, p3) = rest.split_at(pl);
            // Combined rows a = 0..4, split into even (e) and odd (o) columns.
            let mut eo_rows = rows_of(eo, tw + 1);
            for a in 0..4 {
                let (x, y): (&[T], &[T]) = match a {
                    0 => (p0, p2),
                    1 => (p1, p2),
                    2 => (p2, p1),
                    _ => (p1, p3),
                };
                let e = eo_rows.next().expect("8 rows");
                let o = eo_rows.next().expect("8 rows");
                let pairs = x.chunks_exact(2).zip(y.chunks_exact(2));
                let (e, o) = (&mut e[..], &mut o[..]);
                if a == 1 {
                    for ((ej, oj), (xp, yp)) in e.iter_mut().zip(o.iter_mut()).zip(pairs) {
                        *ej = xp[0] + yp[0];
                        *oj = xp[1] + yp[1];
                    }
                } else {
                    for ((ej, oj), (xp, yp)) in e.iter_mut().zip(o.iter_mut()).zip(pairs) {
                        *ej = xp[0] - yp[0];
                        *oj = xp[1] - yp[1];
                    }
                }
            }
            let t0 = (ti - ti0) * tw;
            for a in 0..4 {
                let e = &eo[2 * a * (tw + 1)..][..tw + 1];
                let o = &eo[(2 * a + 1) * (tw + 1)..][..tw + 1];
                let row = |k: usize| (((a * 4 + k) * g.cin + ci) * ntp + t0, tw);
                let (at, n) = row(0);
                sub_into(&mut v[at..at + n], &e[..tw], &e[1..]);
                let (at, n) = row(1);
                add_into(&mut v[at..at + n], &o[..tw], &e[1..]);
                let (at, n) = row(2);
                sub_into(&mut v[at..at + n], &e[1..], &o[..tw]);
                let (at, n) = row(3);
                sub_into(&mut v[at..at + n], &o[..tw], &o[1..]);
            }
        }
    }
    // The padding columns: zero, so that no stale NaN or denormal reaches the
    // GEMMs (the forward never reads their products; dL/dw sums over them).
    if ntp > nt {
        for r in v.chunks_exact_mut(ntp) {
            r[nt..].fill(zero);
        }
    }
}

/// One task's work: tile rows `[ti0, ti1)` of image `xi: [Cin, H, W]`, written as
/// output rows `[2 ti0, min(2 ti1, OH))` of every channel to `dst`, channel `co`'s
/// first row at `dst + co * dst_cs` (rows `OW` apart). No epilogue.
///
/// # Safety
/// `dst` must be valid for those writes and no other thread may touch them.
unsafe fn band<T: Element>(
    xi: &[T],
    u: &[T],
    g: &Geom,
    (ti0, ti1): (usize, usize),
    scratch: &mut [T],
    dst: *mut T,
    dst_cs: usize,
) {
    let tw = g.ow.div_ceil(2);
    let nt = (ti1 - ti0) * tw;
    let ntp = nt.next_multiple_of(LANES);
    let (v, rest) = scratch.split_at_mut(XI * g.cin * ntp);
    let (m, rest) = rest.split_at_mut(XI * g.cout * ntp);
    let (prows, rest) = rest.split_at_mut(4 * 2 * (tw + 1));
    let (eo, rest) = rest.split_at_mut(8 * (tw + 1));
    let sums = &mut rest[..12 * tw];

    input_transform(xi, g, (ti0, ti1), ntp, v, prows, eo);

    // Sixteen GEMMs: M[ξ] = U[ξ] @ V[ξ].
    let plane = g.cout * g.cin;
    for x in 0..XI {
        let um = MatRef::row_major(&u[x * plane..(x + 1) * plane], g.cout, g.cin);
        let vm = MatRef::row_major(&v[x * g.cin * ntp..(x + 1) * g.cin * ntp], g.cin, ntp);
        gemm_into(
            &mut m[x * g.cout * ntp..(x + 1) * g.cout * ntp],
            ntp,
            false,
            um,
            vm,
            Parallelism::None,
        );
    }

    // Output transform: Y = Aᵀ M A, Aᵀ = [[1, 1, 1, 0], [0, 1, -1, -1]]: first the
    // columns (q0 = m0 + m1 + m2, q1 = m1 - m2 - m3 of each of the four rows), then
    // the rows.
    let rows_out = (2 * ti1).min(g.oh) - 2 * ti0;
    let full = g.ow / 2;
    for co in 0..g.cout {
        for ti in ti0..ti1 {
            let t0 = (ti - ti0) * tw;
            let mrow = |x: usize| &m[(x * g.cout + co) * ntp + t0..][..tw];
            let mut q = rows_of(sums, tw);
            let mut qs: [&mut [T]; 12] = std::array::from_fn(|_| q.next().expect("12 rows"));
            for a in 0..4 {
                let (m0, m1, m2, m3) = (
                    mrow(4 * a),
                    mrow(4 * a + 1),
                    mrow(4 * a + 2),
                    mrow(4 * a + 3),
                );
                let (lo, hi) = qs.split_at_mut(4 + a);
                let q0 = &mut lo[a];
                let q1 = &mut hi[0];
                for (((((o0, o1), &x0), &x1), &x2), &x3) in q0
                    .iter_mut()
                    .zip(q1.iter_mut())
                    .zip(m0)
                    .zip(m1)
                    .zip(m2)
                    .zip(m3)
                {
                    *o0 = x0 + x1 + x2;
                    *o1 = x1 - x2 - x3;
                }
            }
            // qs[0..4] = q0 of rows 0..4, qs[4..8] = q1 of rows 0..4.
            let (q, y) = qs.split_at_mut(8);
            let (q0s, q1s) = q.split_at(4);
            for (half, qq) in [q0s, q1s].into_iter().enumerate() {
                let (top, bottom) = y.split_at_mut(2);
                let (yt, yb) = (&mut top[half], &mut bottom[half]);
                for ((((ot, ob), &s0), &s1), (&s2, &s3)) in yt
                    .iter_mut()
                    .zip(yb.iter_mut())
                    .zip(&*qq[0])
                    .zip(&*qq[1])
                    .zip(qq[2].iter().zip(&*qq[3]))
                {
                    *ot = s0 + s1 + s2;
                    *ob = s1 - s2 - s3;
                }
            }
            // y[0] = row 2ti even columns, y[1] = its odd columns, y[2], y[3] = row
            // 2ti + 1.
            let r = 2 * (ti - ti0);
            let out0 = dst.add(co * dst_cs + r * g.ow);
            let (y00, y01, y10, y11) = (&*y[0], &*y[1], &*y[2], &*y[3]);
            let r0 = std::slice::from_raw_parts_mut(out0, g.ow);
            for ((pair, &a), &b) in r0.chunks_exact_mut(2).zip(y00).zip(y01) {
                pair[0] = a;
                pair[1] = b;
            }
            if g.ow % 2 == 1 {
                r0[g.ow - 1] = y00[full];
            }
            if r + 1 < rows_out {
                let r1 = std::slice::from_raw_parts_mut(out0.add(g.ow), g.ow);
                for ((pair, &a), &b) in r1.chunks_exact_mut(2).zip(y10).zip(y11) {
                    pair[0] = a;
                    pair[1] = b;
                }
                if g.ow % 2 == 1 {
                    r1[g.ow - 1] = y10[full];
                }
            }
        }
    }
}

/// `y [N, Cout, OH * OW] = epilogue(conv3x3(x, w))` by F(2x2, 3x3), one task per
/// (image, band of tile rows); the output buffer comes from the host pool and every
/// element is written once.
pub(super) fn forward<T: Element>(x: &[T], w: &[T], ep: &TileEpilogue<'_, T>, g: &Geom) -> Vec<T> {
    let (ohw, chw) = (g.ohw(), g.cin * g.hw());
    let mut y = pool::take::<T>(g.n * g.cout * ohw);
    let u = transform_weights(w, g.cout, g.cin);
    let (th, tw) = (g.oh.div_ceil(2), g.ow.div_ceil(2));
    let band_t = band_rows(g.n, th, tw);
    let bands = th.div_ceil(band_t);
    let yp = SharedPtr(y.as_mut_ptr());
    (0..g.n * bands).into_par_iter().for_each(|t| {
        let (img, b) = (t / bands, t % bands);
        let (ti0, ti1) = (b * band_t, th.min((b + 1) * band_t));
        let xi = &x[img * chw..(img + 1) * chw];
        let (r0, r1) = (2 * ti0, (2 * ti1).min(g.oh));
        let base = img * g.cout * ohw + r0 * g.ow;
        pool::with_scratch(scratch_len(g, (ti1 - ti0) * tw, tw), |s: &mut [T]| {
            // SAFETY: rows [r0, r1) of every channel of image `img` belong to this
            // task alone, and y outlives the parallel loop.
            unsafe {
                let dst = yp.get().add(base);
                band(xi, &u, g, (ti0, ti1), s, dst, ohw);
                if !ep.is_identity() {
                    for co in 0..g.cout {
                        let row =
                            std::slice::from_raw_parts_mut(dst.add(co * ohw), (r1 - r0) * g.ow);
                        ep.apply_row(row, co, base + co * ohw);
                    }
                }
            }
        });
    });
    pool::give(u);
    y
}

/// [`super::cpu::forward_pointwise_head`] with the 3x3 convolution by F(2x2, 3x3):
/// each task's band of the 3x3 output (after the epilogue) feeds the 1x1 head from
/// cache and is never stored.
pub(super) fn forward_pointwise_head<T: Element>(
    x: &[T],
    w: &[T],
    ep: &TileEpilogue<'_, T>,
    head: &PointwiseHead<'_, T>,
    g: &Geom,
) -> Vec<Vec<T>> {
    let (ohw, chw) = (g.ohw(), g.cin * g.hw());
    let c2: usize = head.splits.iter().sum();
    let mut outs = head.outputs(g.n, ohw);
    let ptrs: Vec<SharedPtr<T>> = outs.iter_mut().map(|o| SharedPtr(o.as_mut_ptr())).collect();
    let u = transform_weights(w, g.cout, g.cin);
    let (th, tw) = (g.oh.div_ceil(2), g.ow.div_ceil(2));
    let band_t = band_rows(g.n, th, tw);
    let bands = th.div_ceil(band_t);
    (0..g.n * bands).into_par_iter().for_each(|t| {
        let (img, b) = (t / bands, t % bands);
        let (ti0, ti1) = (b * band_t, th.min((b + 1) * band_t));
        let xi = &x[img * chw..(img + 1) * chw];
        let (r0, r1) = (2 * ti0, (2 * ti1).min(g.oh));
        let (p0, pc) = (r0 * g.ow, (r1 - r0) * g.ow);
        let pcp = pc.next_multiple_of(LANES);
        let own = scratch_len(g, (ti1 - ti0) * tw, tw);
        pool::with_scratch(own + (g.cout + c2) * pcp, |s: &mut [T]| {
            let (s, rest) = s.split_at_mut(own);
            let (tile, prod) = rest.split_at_mut(g.cout * pcp);
            // SAFETY: `tile` holds Cout rows of `pcp >= pc` elements.
            unsafe { band(xi, &u, g, (ti0, ti1), s, tile.as_mut_ptr(), pcp) };
            let base = img * g.cout * ohw + p0;
            for (co, row) in tile.chunks_exact_mut(pcp).enumerate() {
                row[pc..].fill(T::zero());
                if !ep.is_identity() {
                    ep.apply_row(&mut row[..pc], co, base + co * ohw);
                }
            }
            // SAFETY: columns [p0, p0 + pc) of image `img` belong to this task alone,
            // and the outputs outlive the parallel loop.
            unsafe { head.write_tile(tile, (g.cout, pcp, pc), prod, &ptrs, (img, ohw, p0)) };
        });
    });
    pool::give(u);
    outs
}

/// Partial sums of [`grad_weight`]: a fixed number, so that the summation order
/// depends on the shapes alone (not on the thread count).
const WGRAD_PARTS: usize = 4;

/// dL/dw `[Cout, Cin, 3, 3]` of the convolution `g` by F(2x2, 3x3) transposed:
/// dL/dg = Gᵀ [Σ over tiles (A dY Aᵀ) ⊙ (Bᵀ d B)] G (the forward's
/// Y = Aᵀ [(G g Gᵀ) ⊙ (Bᵀ d B)] A read backwards), where `dY` is a tile's
/// 2x2 block of dL/dy and `d` its 4x4 input patch. The sum over tiles is sixteen
/// GEMMs `S[ξ] += Z[ξ] @ V[ξ]ᵀ` (reduction over the tiles: long and dense), cut
/// into [`WGRAD_PARTS`] contiguous ranges of (image, band) chunks whose sums are
/// added in order, then the 4x4 -> 3x3 transform of each kernel.
pub(super) fn grad_weight<T: Element>(x: &[T], gy: &[T], g: &Geom) -> Vec<T> {
    let (ohw, chw) = (g.ohw(), g.cin * g.hw());
    let plane = g.cout * g.cin;
    let (th, tw) = (g.oh.div_ceil(2), g.ow.div_ceil(2));
    // Bands independent of the thread count: the same sums in the same order on
    // any machine.
    let band_t = (TILES_PER_TASK / tw.max(1)).clamp(1, th.max(1));
    let per_image = th.div_ceil(band_t);
    let chunks = g.n * per_image;
    let parts = WGRAD_PARTS.min(chunks).max(1);
    let mut sums = pool::take::<T>(parts * XI * plane);
    let max_nt = band_t * tw;
    let ntp_max = max_nt.next_multiple_of(LANES);
    let scratch = XI * (g.cin + g.cout) * ntp_max + 4 * 2 * (tw + 1) + 8 * (tw + 1) + 6 * tw;
    sums.par_chunks_mut(XI * plane)
        .enumerate()
        .for_each(|(part, acc)| {
            let (c0, c1) = (part * chunks / parts, (part + 1) * chunks / parts);
            pool::with_scratch(scratch, |s: &mut [T]| {
                for c in c0..c1 {
                    let (img, b) = (c / per_image, c % per_image);
                    let (ti0, ti1) = (b * band_t, th.min((b + 1) * band_t));
                    let nt = (ti1 - ti0) * tw;
                    let ntp = nt.next_multiple_of(LANES);
                    let (v, rest) = s.split_at_mut(XI * g.cin * ntp);
                    let (z, rest) = rest.split_at_mut(XI * g.cout * ntp);
                    let (prows, rest) = rest.split_at_mut(4 * 2 * (tw + 1));
                    let (eo, rest) = rest.split_at_mut(8 * (tw + 1));
                    let tmp = &mut rest[..6 * tw];
                    let xi = &x[img * chw..(img + 1) * chw];
                    input_transform(xi, g, (ti0, ti1), ntp, v, prows, eo);
                    let gyi = &gy[img * g.cout * ohw..(img + 1) * g.cout * ohw];
                    grad_transform(gyi, g, (ti0, ti1), ntp, z, tmp);
                    for xx in 0..XI {
                        let zm =
                            MatRef::row_major(&z[xx * g.cout * ntp..][..g.cout * ntp], g.cout, ntp);
                        let vm =
                            MatRef::row_major(&v[xx * g.cin * ntp..][..g.cin * ntp], g.cin, ntp);
                        gemm_into(
                            &mut acc[xx * plane..(xx + 1) * plane],
                            g.cin,
                            c > c0,
                            zm,
                            vm.t(),
                            Parallelism::None,
                        );
                    }
                }
            });
        });
    // dL/dg = Gᵀ S G per kernel, S the parts added in order.
    let mut gw = pool::take::<T>(plane * 9);
    gw.par_chunks_mut(9)
        .enumerate()
        .with_min_len(256)
        .for_each(|(i, out)| {
            let s: [f64; XI] = std::array::from_fn(|xx| {
                let mut v = sums[xx * plane + i];
                for p in 1..parts {
                    v += sums[(p * XI + xx) * plane + i];
                }
                v.f64()
            });
            // (Gᵀ S)[r][b], Gᵀ = [[1, ½, ½, 0], [0, ½, -½, 0], [0, ½, ½, 1]].
            let t = |r: usize, b: usize| {
                let (s0, s1, s2, s3) = (s[b], s[4 + b], s[8 + b], s[12 + b]);
                match r {
                    0 => s0 + 0.5 * (s1 + s2),
                    1 => 0.5 * (s1 - s2),
                    _ => 0.5 * (s1 + s2) + s3,
                }
            };
            for r in 0..3 {
                let (t0, t1, t2, t3) = (t(r, 0), t(r, 1), t(r, 2), t(r, 3));
                out[r * 3] = T::of(t0 + 0.5 * (t1 + t2));
                out[r * 3 + 1] = T::of(0.5 * (t1 - t2));
                out[r * 3 + 2] = T::of(0.5 * (t1 + t2) + t3);
            }
        });
    pool::give(sums);
    gw
}

/// The transform of dL/dy over tile rows `[ti0, ti1)` of one image:
/// `z: [16][Cout][ntp]` gets `Z[a * 4 + b][co][t] = (A dY Aᵀ)[a][b]` of tile `t`'s
/// 2x2 block `dY` (zero past the output's edge), A = [[1, 0], [1, 1], [1, -1],
/// [0, -1]]; padding columns zeroed. `tmp` holds 6 rows of `tw`.
fn grad_transform<T: Element>(
    gyi: &[T],
    g: &Geom,
    (ti0, ti1): (usize, usize),
    ntp: usize,
    z: &mut [T],
    tmp: &mut [T],
) {
    let tw = g.ow.div_ceil(2);
    let nt = (ti1 - ti0) * tw;
    let zero = T::zero();
    let ohw = g.ohw();
    let odd_w = g.ow % 2 == 1;
    for co in 0..g.cout {
        let plane = &gyi[co * ohw..(co + 1) * ohw];
        for ti in ti0..ti1 {
            let mut rows = tmp.chunks_exact_mut(tw);
            let (e0, o0, e1, o1) = (
                rows.next().expect("6 rows"),
                rows.next().expect("6 rows"),
                rows.next().expect("6 rows"),
                rows.next().expect("6 rows"),
            );
            let (re, ro) = (rows.next().expect("6 rows"), rows.next().expect("6 rows"));
            // The block's two rows split into even and odd columns.
            for (r, (e, o)) in [(&mut *e0, &mut *o0), (&mut *e1, &mut *o1)]
                .into_iter()
                .enumerate()
            {
                let oh = 2 * ti + r;
                if oh >= g.oh {
                    e.fill(zero);
                    o.fill(zero);
                    continue;
                }
                let src = &plane[oh * g.ow..(oh + 1) * g.ow];
                for ((ej, oj), pair) in e.iter_mut().zip(o.iter_mut()).zip(src.chunks_exact(2)) {
                    *ej = pair[0];
                    *oj = pair[1];
                }
                if odd_w {
                    e[tw - 1] = src[g.ow - 1];
                    o[tw - 1] = zero;
                }
            }
            let t0 = (ti - ti0) * tw;
            for a in 0..4 {
                // (A dY)[a] = dY0, dY0 + dY1, dY0 - dY1, -dY1 (as even/odd columns).
                match a {
                    0 => {
                        re.copy_from_slice(e0);
                        ro.copy_from_slice(o0);
                    }
                    1 => {
                        add_into(re, e0, e1);
                        add_into(ro, o0, o1);
                    }
                    2 => {
                        sub_into(re, e0, e1);
                        sub_into(ro, o0, o1);
                    }
                    _ => {
                        re.iter_mut().zip(&*e1).for_each(|(d, &v)| *d = -v);
                        ro.iter_mut().zip(&*o1).for_each(|(d, &v)| *d = -v);
                    }
                }
                let at = |b: usize| ((a * 4 + b) * g.cout + co) * ntp + t0;
                z[at(0)..at(0) + tw].copy_from_slice(re);
                add_into(&mut z[at(1)..at(1) + tw], re, ro);
                sub_into(&mut z[at(2)..at(2) + tw], re, ro);
                z[at(3)..at(3) + tw]
                    .iter_mut()
                    .zip(&*ro)
                    .for_each(|(d, &v)| *d = -v);
            }
        }
    }
    if ntp > nt {
        for r in z.chunks_exact_mut(ntp) {
            r[nt..].fill(zero);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Conv2dParams, Geom};
    use super::*;
    use crate::rng::Rng;

    fn geom(
        n: usize,
        cin: usize,
        (h, w): (usize, usize),
        cout: usize,
        pad: (usize, usize),
    ) -> Geom {
        Geom {
            n,
            cin,
            h,
            w,
            cout,
            kh: 3,
            kw: 3,
            oh: h + 2 * pad.0 - 2,
            ow: w + 2 * pad.1 - 2,
            p: Conv2dParams {
                stride: (1, 1),
                padding: pad,
                dilation: (1, 1),
            },
        }
    }

    fn values<T: Element>(rng: &mut Rng, len: usize) -> Vec<T> {
        (0..len).map(|_| T::of(rng.uniform() * 2.0 - 1.0)).collect()
    }

    /// The direct sums in f64 and the sums of |products| (the error scale).
    fn direct<T: Element>(x: &[T], w: &[T], g: &Geom) -> (Vec<f64>, Vec<f64>) {
        let (mut y, mut mag) = (
            vec![0.0; g.n * g.cout * g.ohw()],
            vec![0.0; g.n * g.cout * g.ohw()],
        );
        for img in 0..g.n {
            for co in 0..g.cout {
                for oh in 0..g.oh {
                    for ow in 0..g.ow {
                        let (mut s, mut a) = (0.0, 0.0);
                        for ci in 0..g.cin {
                            for ki in 0..3 {
                                for kj in 0..3 {
                                    let ih = (oh + ki) as isize - g.p.padding.0 as isize;
                                    let iw = (ow + kj) as isize - g.p.padding.1 as isize;
                                    if ih < 0 || iw < 0 || ih >= g.h as isize || iw >= g.w as isize
                                    {
                                        continue;
                                    }
                                    let xv = x[((img * g.cin + ci) * g.h + ih as usize) * g.w
                                        + iw as usize]
                                        .f64();
                                    let wv = w[((co * g.cin + ci) * 3 + ki) * 3 + kj].f64();
                                    s += xv * wv;
                                    a += (xv * wv).abs();
                                }
                            }
                        }
                        let at = ((img * g.cout + co) * g.oh + oh) * g.ow + ow;
                        y[at] = s;
                        mag[at] = a;
                    }
                }
            }
        }
        (y, mag)
    }

    fn check<T: Element>(g: &Geom, rel: f64, seed: u64) {
        let mut rng = Rng::new(seed);
        let x: Vec<T> = values(&mut rng, g.n * g.cin * g.hw());
        let w: Vec<T> = values(&mut rng, g.cout * g.cin * 9);
        let scale: Vec<T> = values(&mut rng, g.cout);
        let shift: Vec<T> = values(&mut rng, g.cout);
        let res: Vec<T> = values(&mut rng, g.n * g.cout * g.ohw());
        let (want, mag) = direct(&x, &w, g);
        // Plain, then scale + shift + residual + ReLU in the epilogue.
        let plain = forward(&x, &w, &TileEpilogue::default(), g);
        let ep = TileEpilogue {
            scale: Some(&scale),
            shift: Some(&shift),
            residual: Some(&res),
            relu: true,
        };
        let fused = forward(&x, &w, &ep, g);
        let ohw = g.ohw();
        for (i, (&got, (&y, &m))) in plain.iter().zip(want.iter().zip(&mag)).enumerate() {
            let err = (got.f64() - y).abs();
            assert!(
                err <= rel * (m + 1e-30),
                "{g:?} plain at {i}: {} vs {y} (|.| sum {m})",
                got.f64()
            );
            let co = (i / ohw) % g.cout;
            let t = y * scale[co].f64() + shift[co].f64() + res[i].f64();
            let want_f = t.max(0.0);
            let tol = rel
                * (m * scale[co].f64().abs() + shift[co].f64().abs() + res[i].f64().abs() + 1e-30);
            assert!(
                (fused[i].f64() - want_f).abs() <= tol,
                "{g:?} fused at {i}: {} vs {want_f}",
                fused[i].f64()
            );
        }
    }

    #[test]
    fn f2x2_3x3_equals_the_direct_sums() {
        // Paddings 0, 1, 2 (unequal per axis), odd and even output sides, output
        // sides of 2 and 3, two images, bands of several tile rows.
        let shapes = [
            geom(1, 16, (10, 12), 16, (1, 1)),
            geom(2, 17, (9, 7), 19, (1, 1)),
            geom(1, 16, (5, 4), 16, (0, 0)),
            geom(1, 20, (6, 5), 18, (2, 0)),
            geom(2, 16, (3, 33), 24, (1, 2)),
            geom(1, 32, (41, 37), 16, (1, 1)),
        ];
        for (i, g) in shapes.iter().enumerate() {
            check::<f32>(g, 1e-5, 10 + i as u64);
            check::<f64>(g, 1e-14, 20 + i as u64);
        }
    }

    /// The fused head equals the 3x3 conv's Winograd output followed by the 1x1
    /// product in f64 (the 3x3 output after the epilogue is the head's input).
    #[test]
    fn f2x2_3x3_pointwise_head_equals_conv_then_1x1() {
        let g = geom(2, 16, (13, 11), 24, (1, 1));
        let mut rng = Rng::new(5);
        let x: Vec<f64> = values(&mut rng, g.n * g.cin * g.hw());
        let w: Vec<f64> = values(&mut rng, g.cout * g.cin * 9);
        let b: Vec<f64> = values(&mut rng, g.cout);
        let w2: Vec<f64> = values(&mut rng, 5 * g.cout);
        let b2: Vec<f64> = values(&mut rng, 5);
        let ep = TileEpilogue {
            shift: Some(&b),
            relu: true,
            ..Default::default()
        };
        let head = PointwiseHead {
            w2: &w2,
            b2: Some(&b2),
            splits: &[2, 3],
        };
        let outs = forward_pointwise_head(&x, &w, &ep, &head, &g);
        let y = forward(&x, &w, &ep, &g);
        let ohw = g.ohw();
        for img in 0..g.n {
            for c in 0..5 {
                let (out, cc, j) = if c < 2 {
                    (&outs[0], 2, c)
                } else {
                    (&outs[1], 3, c - 2)
                };
                for p in 0..ohw {
                    let want: f64 = b2[c]
                        + (0..g.cout)
                            .map(|k| w2[c * g.cout + k] * y[(img * g.cout + k) * ohw + p])
                            .sum::<f64>();
                    let got = out[(img * cc + j) * ohw + p];
                    assert!(
                        (got - want).abs() <= 1e-12 * (1.0 + want.abs()),
                        "{c} {p}: {got} vs {want}"
                    );
                }
            }
        }
    }

    /// dL/dw by the transposed F(2x2, 3x3) against the direct sums in f64.
    #[test]
    fn f2x2_3x3_weight_gradient_equals_the_direct_sums() {
        let shapes = [
            geom(1, 16, (10, 12), 16, (1, 1)),
            geom(2, 17, (9, 7), 19, (1, 1)),
            geom(1, 16, (5, 4), 18, (0, 0)),
            geom(3, 20, (6, 5), 16, (2, 0)),
            geom(2, 16, (3, 33), 24, (1, 2)),
            geom(1, 16, (41, 37), 17, (1, 1)),
        ];
        for (i, g) in shapes.iter().enumerate() {
            let mut rng = Rng::new(40 + i as u64);
            let x: Vec<f64> = values(&mut rng, g.n * g.cin * g.hw());
            let gy: Vec<f64> = values(&mut rng, g.n * g.cout * g.ohw());
            let (mut want, mut mag) =
                (vec![0.0; g.cout * g.cin * 9], vec![0.0; g.cout * g.cin * 9]);
            for img in 0..g.n {
                for co in 0..g.cout {
                    for ci in 0..g.cin {
                        for ki in 0..3 {
                            for kj in 0..3 {
                                let at = ((co * g.cin + ci) * 3 + ki) * 3 + kj;
                                for oh in 0..g.oh {
                                    for ow in 0..g.ow {
                                        let ih = (oh + ki) as isize - g.p.padding.0 as isize;
                                        let iw = (ow + kj) as isize - g.p.padding.1 as isize;
                                        if ih < 0
                                            || iw < 0
                                            || ih >= g.h as isize
                                            || iw >= g.w as isize
                                        {
                                            continue;
                                        }
                                        let p = gy[((img * g.cout + co) * g.oh + oh) * g.ow + ow]
                                            * x[((img * g.cin + ci) * g.h + ih as usize) * g.w
                                                + iw as usize];
                                        want[at] += p;
                                        mag[at] += p.abs();
                                    }
                                }
                            }
                        }
                    }
                }
            }
            let got = grad_weight(&x, &gy, g);
            let got32 = grad_weight(
                &x.iter().map(|&v| v as f32).collect::<Vec<_>>(),
                &gy.iter().map(|&v| v as f32).collect::<Vec<_>>(),
                g,
            );
            for (j, ((&a, &b), (&w, &m))) in got
                .iter()
                .zip(&got32)
                .zip(want.iter().zip(&mag))
                .enumerate()
            {
                assert!(
                    (a - w).abs() <= 1e-13 * (m + 1e-30),
                    "{g:?} f64 at {j}: {a} vs {w}"
                );
                assert!(
                    (b as f64 - w).abs() <= 1e-5 * (m + 1e-30),
                    "{g:?} f32 at {j}: {b} vs {w}"
                );
            }
        }
    }

    #[test]
    fn pays_only_for_dense_3x3_stride_1() {
        let g = geom(1, 64, (60, 60), 64, (1, 1));
        assert!(pays(&g));
        assert!(!pays(&geom(1, 64, (40, 40), 64, (1, 1))));
        assert!(!pays(&Geom { cin: 8, ..g }));
        assert!(!pays(&Geom {
            p: Conv2dParams::new(2, 1, 1),
            ..g
        }));
        assert!(!pays(&Geom {
            p: Conv2dParams::new(1, 2, 2),
            ..g
        }));
        assert!(!pays(&Geom { kh: 1, kw: 1, ..g }));
        assert!(!pays(&geom(1, 64, (6, 6), 64, (1, 1))));
        assert!(!pays(&geom(1, 512, (25, 38), 512, (1, 1))));
    }
}
