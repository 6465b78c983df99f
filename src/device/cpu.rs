//! CPU execution helpers. Ops use rayon's global pool; these helpers keep the
//! parallel loops of the CPU references short and uniform.

use rayon::prelude::*;

/// Below this many elements an elementwise loop runs on the calling thread.
pub const PAR_THRESHOLD: usize = 1 << 15;

/// `out[i] = f(i)` for every i, in parallel when `out` is large.
pub fn fill_indexed<T: Send, F: Fn(usize) -> T + Sync + Send>(out: &mut [T], f: F) {
    if out.len() < PAR_THRESHOLD {
        out.iter_mut().enumerate().for_each(|(i, o)| *o = f(i));
    } else {
        out.par_iter_mut()
            .with_min_len(4096)
            .enumerate()
            .for_each(|(i, o)| *o = f(i));
    }
}

/// Run `f(chunk_index, chunk)` over `chunk`-sized pieces of `out`, in parallel.
pub fn for_chunks<T: Send, F: Fn(usize, &mut [T]) + Sync + Send>(
    out: &mut [T],
    chunk: usize,
    f: F,
) {
    if chunk == 0 {
        return;
    }
    out.par_chunks_mut(chunk)
        .enumerate()
        .for_each(|(i, c)| f(i, c));
}

/// Flush denormal floats to zero on the CPU: sets the flush-to-zero and
/// denormals-are-zero bits of MXCSR on the calling thread and on every thread of
/// rayon's global pool (where the CPU ops run). Opt-in, off by default, like
/// PyTorch's `torch.set_flush_denormal`: results then differ from the IEEE ones
/// wherever a value below 2^-126 appears (it becomes 0), in exchange for avoiding the
/// microcode assists that make each denormal operand of an FMA cost tens to
/// hundreds of cycles on Intel CPUs (measured: a R50-FPN CPU training step that
/// took 6 s took 12 s once its operands went denormal after the first update).
/// Threads started later (outside rayon's pool) keep IEEE behaviour. Errors on a
/// CPU without SSE's MXCSR (other than x86-64).
pub fn flush_denormals() -> crate::error::Result<()> {
    #[cfg(target_arch = "x86_64")]
    {
        #[allow(deprecated)] // the intrinsics are the documented way to reach MXCSR
        fn set() {
            use std::arch::x86_64::{_mm_getcsr, _mm_setcsr};
            const FTZ: u32 = 1 << 15;
            const DAZ: u32 = 1 << 6;
            // SAFETY: x86-64 always has SSE; only the two rounding-mode-neutral
            // flush bits change.
            unsafe { _mm_setcsr(_mm_getcsr() | FTZ | DAZ) };
        }
        set();
        rayon::broadcast(|_| set());
        Ok(())
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        Err(crate::error::Error::invalid(
            "flush_denormals",
            "only on x86-64 (MXCSR's flush-to-zero and denormals-are-zero bits)",
        ))
    }
}
