//! Bulk f32 <-> bf16 conversion on the host.
//!
//! The CPU's bf16 is an emulation by rounding (widen, f32 op, round once), so every
//! bf16 op converts its activations twice: done one element at a time through `half`
//! (and, for the widening, through f64) those passes cost about a fifth of a bf16
//! training step. Here each conversion is a branch-free loop over the bit patterns,
//! which the compiler vectorises, run in parallel chunks above [`PAR_MIN`] elements.
//!
//! The results are bit for bit `half`'s scalar conversions, which the device kernels
//! match: rounding to nearest even (`(x + 0x7fff + lsb) >> 16` in effect), overflow
//! to infinity, subnormals kept (not flushed: AVX-512 BF16's `vcvtneps2bf16` flushes
//! them, which is why it is not used), and a NaN keeps its sign and high payload with
//! the quiet bit (0x40 of the bf16) set, in both directions.

use rayon::prelude::*;

use super::pool;

/// Fewest elements for which a conversion is split across threads: below it the
/// hand-off costs more than the pass (a pass runs at several GB/s per core).
const PAR_MIN: usize = 1 << 16;
/// Elements per parallel task.
const CHUNK: usize = 1 << 14;

/// The bf16 bits nearest (ties to even) to the f32 with bits `x`.
#[inline(always)]
pub fn round_bits(x: u32) -> u16 {
    let nan = (x & 0x7fff_ffff) > 0x7f80_0000;
    // Round up when the dropped half is above 0x8000, or exactly 0x8000 with an odd
    // kept part: bit 15 set and any of bits 0..15 or bit 16 set.
    let up = ((x & 0x8000) != 0) & ((x & 0x1_7fff) != 0);
    let r = (x >> 16) + up as u32;
    (if nan { (x >> 16) | 0x40 } else { r }) as u16
}

/// The f32 bits of the bf16 with bits `b` (exact; a NaN gets the quiet bit).
#[inline(always)]
pub fn widen_bits(b: u16) -> u32 {
    let quiet = if (b & 0x7fff) > 0x7f80 { 0x40 } else { 0 };
    ((b | quiet) as u32) << 16
}

/// Runs `f` on matching chunks of `src` and `dst`, in parallel when large.
fn zip_chunks<A: Sync, B: Send>(src: &[A], dst: &mut [B], f: impl Fn(&[A], &mut [B]) + Sync) {
    debug_assert_eq!(src.len(), dst.len());
    if src.len() < PAR_MIN {
        f(src, dst);
    } else {
        src.par_chunks(CHUNK)
            .zip(dst.par_chunks_mut(CHUNK))
            .for_each(|(s, d)| f(s, d));
    }
}

/// `src` rounded to bf16.
pub fn round_vec(src: &[f32]) -> Vec<half::bf16> {
    let mut out = vec![half::bf16::ZERO; src.len()];
    zip_chunks(src, &mut out, |s, d| {
        for (o, &v) in d.iter_mut().zip(s) {
            *o = half::bf16::from_bits(round_bits(v.to_bits()));
        }
    });
    out
}

/// `src` widened to f32, into a buffer from the host pool.
pub fn widen_vec(src: &[half::bf16]) -> Vec<f32> {
    let mut out = pool::take::<f32>(src.len());
    zip_chunks(src, &mut out, |s, d| {
        for (o, &v) in d.iter_mut().zip(s) {
            *o = f32::from_bits(widen_bits(v.to_bits()));
        }
    });
    out
}

/// `src` rounded to bf16 and widened back to f32 in one pass (what the bf16 CPU
/// reference feeds the f32 ops), into a buffer from the host pool.
pub fn round_f32_vec(src: &[f32]) -> Vec<f32> {
    let mut out = pool::take::<f32>(src.len());
    zip_chunks(src, &mut out, |s, d| {
        for (o, &v) in d.iter_mut().zip(s) {
            *o = f32::from_bits(widen_bits(round_bits(v.to_bits())));
        }
    });
    out
}

/// `v` after ReLU when `relu` (`v > 0 ? v : 0`, the f32 relu op's rule: zeros,
/// negatives and NaN give +0), then rounded to bf16.
#[inline(always)]
fn relu_round_bits(v: f32, relu: bool) -> u16 {
    let v = if !relu || v > 0.0 { v } else { 0.0 };
    round_bits(v.to_bits())
}

/// `src` after ReLU when `relu` (see [`round_in_place`]), rounded to bf16: the bf16
/// output of an f32 product whose epilogue left ReLU to the rounding pass.
pub fn round_relu_vec(src: &[f32], relu: bool) -> Vec<half::bf16> {
    let mut out = vec![half::bf16::ZERO; src.len()];
    zip_chunks(src, &mut out, |s, d| {
        for (o, &v) in d.iter_mut().zip(s) {
            *o = half::bf16::from_bits(relu_round_bits(v, relu));
        }
    });
    out
}

/// `v` after ReLU when `relu` (`v > 0 ? v : 0`, the f32 relu op's rule), rounded
/// to bf16 and kept as f32 (exactly the widened bf16), in place: the CPU's bf16
/// activation, in one pass over a freshly written output.
pub fn round_in_place(v: &mut [f32], relu: bool) {
    let run = |d: &mut [f32]| {
        for o in d.iter_mut() {
            *o = f32::from_bits(widen_bits(relu_round_bits(*o, relu)));
        }
    };
    if v.len() < PAR_MIN {
        run(v);
    } else {
        v.par_chunks_mut(CHUNK).for_each(run);
    }
}

/// `f(a, b)` element by element over two bf16 slices, computed in f32 and rounded:
/// the CPU rule for a binary bf16 op, in one pass.
pub fn zip_map(
    a: &[half::bf16],
    b: &[half::bf16],
    f: impl Fn(f32, f32) -> f32 + Sync,
) -> Vec<half::bf16> {
    debug_assert_eq!(a.len(), b.len());
    let mut out = vec![half::bf16::ZERO; a.len()];
    let run = |a: &[half::bf16], b: &[half::bf16], d: &mut [half::bf16]| {
        for ((o, &x), &y) in d.iter_mut().zip(a).zip(b) {
            let v = f(
                f32::from_bits(widen_bits(x.to_bits())),
                f32::from_bits(widen_bits(y.to_bits())),
            );
            *o = half::bf16::from_bits(round_bits(v.to_bits()));
        }
    };
    if a.len() < PAR_MIN {
        run(a, b, &mut out);
    } else {
        out.par_chunks_mut(CHUNK)
            .zip(a.par_chunks(CHUNK).zip(b.par_chunks(CHUNK)))
            .for_each(|(d, (a, b))| run(a, b, d));
    }
    out
}

/// `f` over a bf16 slice element by element, writing `U`s (in parallel when large).
pub fn map<U: Send + Copy + Default>(
    src: &[half::bf16],
    f: impl Fn(half::bf16) -> U + Sync,
) -> Vec<U> {
    let mut out = vec![U::default(); src.len()];
    zip_chunks(src, &mut out, |s, d| {
        for (o, &v) in d.iter_mut().zip(s) {
            *o = f(v);
        }
    });
    out
}
