//! `device::cpu::flush_denormals` (its own test binary: it changes the floating-point
//! mode of the process's rayon threads for good).

use rayon::prelude::*;
use std::hint::black_box;

/// A denormal result (2^-127) and a denormal operand (times 1.0) on `n` values.
fn denormal_products(n: usize) -> Vec<(f32, f32)> {
    (0..n)
        .into_par_iter()
        .map(|_| {
            let tiny = black_box(f32::MIN_POSITIVE) * black_box(0.5); // 2^-127
            let operand = black_box(f32::from_bits(1)) * black_box(1.0); // smallest denormal
            (tiny, operand)
        })
        .collect()
}

#[test]
#[cfg(target_arch = "x86_64")]
fn denormals_are_flushed_on_the_calling_thread_and_rayons_after_the_call() {
    // IEEE behaviour first, so the check below can fail.
    for (tiny, operand) in denormal_products(64) {
        assert_eq!(tiny, f32::MIN_POSITIVE / 2.0);
        assert_eq!(operand.to_bits(), 1);
    }
    kestrel::device::cpu::flush_denormals().unwrap();
    let main = black_box(f32::MIN_POSITIVE) * black_box(0.5);
    assert_eq!(main, 0.0, "calling thread");
    for (tiny, operand) in denormal_products(4096) {
        assert_eq!(tiny, 0.0, "a denormal result is flushed on rayon's threads");
        assert_eq!(operand, 0.0, "a denormal operand reads as zero");
    }
    // Normal values are untouched.
    assert_eq!(
        black_box(f32::MIN_POSITIVE) * black_box(2.0),
        f32::MIN_POSITIVE * 2.0
    );
}
