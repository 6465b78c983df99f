//! The host buffer pool in training: after two warm-up steps, a training step of the
//! fixture detector (forward, losses, backward, SGD) takes every tensor buffer it
//! asks the pool for from the pool, and makes no large allocation outside it
//! (counted by a counting global allocator, whoever makes them; issue 12).
//!
//! Its own binary, and one test in it: the allocator and the pool's counters are
//! process-wide (a second test running beside it would be counted too).

mod common;
#[path = "common/large_allocs.rs"]
mod large_allocs;

use kestrel::app::profile::train_step_profiled;
use kestrel::optim::{Sgd, SgdConfig};
use kestrel::rng::Rng;
use kestrel::tensor::pool;
use kestrel::Device;

#[global_allocator]
static GLOBAL: large_allocs::Counting = large_allocs::Counting;

/// Two warm-up steps, then one measured: (pool statistics, large allocations
/// outside the pool).
///
/// On a 2-thread rayon pool whatever the machine: per-thread scratch (the gemm
/// crate's packing buffer, the im2col/Winograd scratch, RoIAlign backward's
/// accumulator) grows on a thread the first time that thread runs the largest task
/// of its kind, and with many threads two warm-up steps do not reach every thread
/// (8 or 16 threads on a 2-core machine: 1 to 10 large allocations in the measured
/// step, all from those buffers).
fn warm_step() -> (pool::PoolStats, u64) {
    let threads = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .unwrap();
    threads.install(|| {
        let mut m = common::fixture_model(Device::Cpu);
        let (images, targets) = common::fixture_training_batch(Device::Cpu);
        let mut sgd = Sgd::new(SgdConfig {
            lr: 1e-2,
            momentum: 0.9,
            weight_decay: 1e-4,
            ..SgdConfig::default()
        })
        .unwrap();
        let mut rng = Rng::new(3);
        for _ in 0..2 {
            train_step_profiled(&mut m, &images, &targets, &mut sgd, &mut rng).unwrap();
        }
        pool::reset_stats();
        let before = large_allocs::large();
        large_allocs::trace(true);
        train_step_profiled(&mut m, &images, &targets, &mut sgd, &mut rng).unwrap();
        large_allocs::trace(false);
        let large = large_allocs::large() - before;
        let s = pool::stats();
        eprintln!("warm training step: pool {s:?}, large allocations outside the pool {large}");
        (s, large)
    })
}

#[test]
fn warm_training_step_allocates_nothing_large_outside_the_pool() {
    let (s, large) = warm_step();
    assert!(s.hits > 20, "the step used the pool: {s:?}");
    assert_eq!(s.misses, 0, "a warm training step missed the pool: {s:?}");
    // 990 before (892 of them the gemm crate's packing buffer, one per GEMM call,
    // now reused per thread: third_party/gemm-common/KESTREL_PATCH.md; the rest
    // RoIAlign backward, conv dL/dx's flipped weight, RPN sampling, permute, top-k,
    // proposals, NMS, max-pool indices, now pooled). KESTREL_TRACE_LARGE_ALLOCS=1
    // prints a backtrace of each.
    assert_eq!(
        large, 0,
        "large allocations outside the pool in a warm training step"
    );
}
