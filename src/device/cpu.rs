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
