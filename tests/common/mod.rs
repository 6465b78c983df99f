//! Shared helpers for integration tests: fixture lookup, error metrics, devices.
#![allow(dead_code)]

use std::path::PathBuf;

use kestrel::io::TensorFile;
use kestrel::{Device, Tensor};

pub mod proposal_ties;

/// `KESTREL_FIXTURES` (any set made by make_fixtures.py), else the slim set shipped
/// in the repository, tests/fixtures (see its README).
pub fn fixtures_dir() -> PathBuf {
    match std::env::var_os("KESTREL_FIXTURES") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures"),
    }
}

/// Open a fixture file, e.g. `ops/conv2d.safetensors`. Panics with the path if absent:
/// a missing fixture is a broken test setup, not a pass.
pub fn fixture(rel: &str) -> TensorFile {
    let p = fixtures_dir().join(rel);
    TensorFile::open(&p).unwrap_or_else(|e| panic!("fixture {}: {e}", p.display()))
}

/// The case names of a fixture file (the keys of its `params`), sorted.
pub fn cases(f: &TensorFile) -> Vec<String> {
    let p = f.params().expect("params metadata");
    let mut v: Vec<String> = p
        .as_object()
        .expect("params is an object")
        .keys()
        .cloned()
        .collect();
    v.sort();
    v
}

/// ‖a − b‖ / ‖b‖ (‖a − b‖ when b is zero).
pub fn rel_err(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    let d: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y) * (x - y))
        .sum::<f64>()
        .sqrt();
    let n: f64 = b.iter().map(|y| y * y).sum::<f64>().sqrt();
    if n == 0.0 {
        d
    } else {
        d / n
    }
}

/// Assert that tensor `got` matches `want` in shape and within relative error `tol`.
pub fn assert_close(what: &str, got: &Tensor, want: &Tensor, tol: f64) {
    assert_eq!(
        got.dims(),
        want.dims(),
        "{what}: shape {:?} vs expected {:?}",
        got.dims(),
        want.dims()
    );
    let (g, w) = (got.to_vec::<f64>().unwrap(), want.to_vec::<f64>().unwrap());
    assert!(
        g.iter().all(|v| v.is_finite()) || w.iter().any(|v| !v.is_finite()),
        "{what}: non-finite output"
    );
    let e = rel_err(&g, &w);
    assert!(
        e <= tol,
        "{what}: relative error {e:.3e} > {tol:.1e} (first got {:?}, want {:?})",
        &g[..g.len().min(4)],
        &w[..w.len().min(4)]
    );
}

/// The CUDA device tests run on (`KESTREL_TEST_CUDA`, default cuda:0). Panics with a
/// clear message when none: CUDA tests are ignored ("needs a CUDA device") and only run on purpose.
pub fn cuda() -> Device {
    let n = std::env::var("KESTREL_TEST_CUDA")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    kestrel::device::gpu::device(n).unwrap_or_else(|e| panic!("CUDA test needs a device: {e}"));
    Device::Cuda(n)
}

/// Deterministic pseudo-random f64 values in [-1, 1).
pub fn randn(seed: u64, n: usize) -> Vec<f64> {
    let mut r = kestrel::rng::Rng::new(seed);
    (0..n).map(|_| r.range(-1.0, 1.0)).collect()
}

/// An f64 CPU tensor of random values.
pub fn rand_t(seed: u64, shape: &[usize]) -> Tensor {
    Tensor::from_vec(randn(seed, shape.iter().product()), shape.to_vec()).unwrap()
}

/// The emulated CUDA device (kernels/*.cu compiled for the host, run through the same
/// launch code as a GPU). Panics with the reason when this build has no emulator.
pub fn emulated() -> Device {
    kestrel::device::emu::device()
        .unwrap_or_else(|e| panic!("emulated CUDA device unavailable: {e}"))
}
