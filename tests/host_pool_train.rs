//! The host buffer pool in training: after two warm-up steps, a training step of the
//! fixture detector (forward, losses, backward, SGD) takes every tensor buffer it
//! asks the pool for from the pool, and the large allocations made outside the pool
//! (counted by a counting global allocator, whoever makes them) are printed.
//!
//! Its own binary: the allocator and the pool's counters are process-wide.

mod common;
#[path = "common/large_allocs.rs"]
mod large_allocs;

use kestrel::app::profile::train_step_profiled;
use kestrel::detection::transform::image_from_u8;
use kestrel::detection::{FasterRcnn, FasterRcnnConfig, Target};
use kestrel::io::TensorFile;
use kestrel::optim::{Sgd, SgdConfig};
use kestrel::rng::Rng;
use kestrel::tensor::pool;
use kestrel::Tensor;

#[global_allocator]
static GLOBAL: large_allocs::Counting = large_allocs::Counting;

fn batch() -> (Vec<Tensor>, Vec<Target>) {
    let e = common::fixture("model/eval.safetensors");
    let f = common::fixture("model/train.safetensors");
    let images: Vec<Tensor> = (0..)
        .map(|i| format!("image{i}.u8"))
        .take_while(|n| e.contains(n))
        .map(|n| {
            let (v, s) = e.ints(&n).unwrap();
            let bytes: Vec<u8> = v.into_iter().map(|x| x as u8).collect();
            image_from_u8(&bytes, s.dim(1), s.dim(2)).unwrap()
        })
        .collect();
    let targets = common::fixture_targets(&f)
        .into_iter()
        .take(images.len())
        .collect();
    (images, targets)
}

/// Two warm-up steps, then one measured: (pool statistics, large allocations
/// outside the pool).
fn warm_step() -> (pool::PoolStats, u64) {
    let path = common::fixtures_dir().join("model/weights.safetensors");
    let params = TensorFile::open(&path).unwrap().params().unwrap();
    let cfg = FasterRcnnConfig::from_params(&params).unwrap();
    let mut m = FasterRcnn::load(cfg, &path).unwrap();
    let (images, targets) = batch();
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
}

#[test]
fn warm_training_step_takes_its_buffers_from_the_pool() {
    let (s, large) = warm_step();
    assert!(s.hits > 20, "the step used the pool: {s:?}");
    assert_eq!(s.misses, 0, "a warm training step missed the pool: {s:?}");
    // 990 measured (566 before the CPU's 3x3 stride-1 convolutions went through
    // Winograd's F(2x2, 3x3), whose sixteen GEMMs per band of tiles each pack their
    // weight operand into an allocation of the gemm crate's own: 654 of the 990;
    // 655 before conv backward's im2col/col2im buffers moved to the per-thread
    // scratch): a regression guard until the gap below is closed.
    assert!(
        large <= 1050,
        "{large} large allocations outside the pool in a warm training step"
    );
}

#[test]
#[ignore = "known gap (issue 12): 990 large allocations per warm step remain outside \
            the pool; traced (KESTREL_TRACE_LARGE_ALLOCS=1): 892 are the gemm crate's \
            packing of an operand per GEMM call (654 in the Winograd convolutions' \
            sixteen GEMMs per band, 238 in conv backward's im2col GEMMs), the rest \
            RoIAlign backward, permute, RPN sampling, max-pool indices, NMS"]
fn warm_training_step_allocates_nothing_large_outside_the_pool() {
    let (_, large) = warm_step();
    assert_eq!(
        large, 0,
        "large allocations outside the pool in a warm step"
    );
}
