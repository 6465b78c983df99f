//! Shared helpers for integration tests: fixture lookup, error metrics, devices.
#![allow(dead_code)]

pub mod reference;

use std::collections::BTreeSet;
use std::path::PathBuf;

use kestrel::autograd::{Gradients, Tape};
use kestrel::io::TensorFile;
use kestrel::rng::Rng;
use kestrel::{Device, Result, Tensor};
use serde_json::Value;

pub mod detection_ties;
pub mod dist_mlp;
pub mod proposal_ties;
pub mod runner_counters;

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

/// One f32 tensor of random values per shape, on `device` (shape `i` seeded
/// `seed + i`).
pub fn rand_f32_tensors(seed: u64, shapes: &[&[usize]], device: Device) -> Vec<Tensor> {
    shapes
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let v: Vec<f32> = randn(seed + i as u64, s.iter().product())
                .into_iter()
                .map(|x| x as f32)
                .collect();
            Tensor::from_vec(v, s.to_vec())
                .unwrap()
                .to_device(device)
                .unwrap()
        })
        .collect()
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

/// Runs `check` on the emulated device and fails unless it launched a kernel from
/// this thread: an emulated test that never reaches a kernel would pass without
/// testing one (e.g. because the op fell back to the host).
pub fn on_emulated(check: impl FnOnce(Device)) {
    let dev = emulated();
    kestrel::device::emu::take_thread_launches();
    check(dev);
    let launched = kestrel::device::emu::take_thread_launches();
    assert!(
        !launched.is_empty(),
        "the emulated check launched no kernel: it tested the host, not a kernel"
    );
}

/// One device-parametrised check, three tests. For each `name => check;` (where
/// `check` is a `fn(Device)` or a closure taking the device) this makes a module
/// `name` with the tests `cpu`, `emulated` (the CUDA code path on the emulated device,
/// which must launch a kernel) and `cuda` (ignored: "needs a CUDA device"). A list in
/// parentheses picks devices, e.g. `name(emulated, cuda) => check;` for a check that
/// compares a device with the CPU. `emulated_errors` instead of `emulated` makes the
/// same `emulated` test without the kernel requirement, for checks of error paths
/// (inputs on two devices) that must fail before any launch. Filter with
/// `cargo test --test T -- name::` or `-- emulated`.
#[macro_export]
macro_rules! device_tests {
    ($($(#[doc = $doc:expr])* $name:ident $(($($dev:ident),+))? => $check:expr;)*) => {$(
        $(#[doc = $doc])*
        mod $name {
            #[allow(unused_imports)]
            use super::*;
            $crate::device_tests!(@devs ($check) $($($dev),+)?);
        }
    )*};
    (@devs ($check:expr)) => {
        $crate::device_tests!(@devs ($check) cpu, emulated, cuda);
    };
    (@devs ($check:expr) $($dev:ident),+) => {
        $($crate::device_tests!(@one $dev ($check));)+
    };
    (@one cpu ($check:expr)) => {
        #[test]
        fn cpu() {
            ($check)(kestrel::Device::Cpu)
        }
    };
    (@one emulated ($check:expr)) => {
        #[test]
        fn emulated() {
            $crate::common::on_emulated(|d| ($check)(d))
        }
    };
    (@one emulated_errors ($check:expr)) => {
        #[test]
        fn emulated() {
            ($check)($crate::common::emulated())
        }
    };
    (@one cuda ($check:expr)) => {
        #[test]
        #[ignore = "needs a CUDA device"]
        fn cuda() {
            ($check)($crate::common::cuda())
        }
    };
}

// ---------------------------------------------------------------- detection-op helpers

/// Case names of a fixture file: the `<case>` prefixes of its tensor names.
pub fn tensor_cases(f: &TensorFile) -> Vec<String> {
    let set: BTreeSet<String> = f
        .names()
        .iter()
        .filter_map(|n| n.rsplit_once('.').map(|(c, _)| c.to_string()))
        .collect();
    set.into_iter().collect()
}

/// `params[case]` of a fixture file (an empty object when the case has none).
pub fn case_params(f: &TensorFile, case: &str) -> Value {
    f.params()
        .expect("params")
        .get(case)
        .cloned()
        .unwrap_or(Value::Object(Default::default()))
}

pub fn f64_param(p: &Value, key: &str) -> f64 {
    p[key]
        .as_f64()
        .unwrap_or_else(|| panic!("param {key} missing in {p}"))
}

pub fn on(t: &Tensor, device: Device) -> Tensor {
    t.to_device(device).unwrap()
}

pub fn ints(t: &Tensor) -> Vec<i64> {
    t.to_vec_i64().unwrap()
}

pub fn floats(t: &Tensor) -> Vec<f32> {
    t.to_vec::<f32>().unwrap()
}

pub fn f32_t(v: Vec<f32>, shape: &[usize]) -> Tensor {
    Tensor::from_vec(v, shape.to_vec()).unwrap()
}

/// An f64 CPU tensor of `v`.
pub fn f64_t(v: Vec<f64>, shape: &[usize]) -> Tensor {
    Tensor::from_vec(v, shape.to_vec()).unwrap()
}

pub fn i64_t(v: Vec<i64>) -> Tensor {
    let n = v.len();
    Tensor::from_vec_i64(v, [n]).unwrap()
}

/// Random boxes clustered like detector outputs: `n` boxes around `clusters`
/// centres in an image of `w` x `h` pixels, with jittered sizes; scores in [0, 1).
pub fn clustered_boxes(
    seed: u64,
    n: usize,
    clusters: usize,
    w: f64,
    h: f64,
) -> (Vec<f32>, Vec<f32>) {
    let mut r = Rng::new(seed);
    let centres: Vec<(f64, f64, f64, f64)> = (0..clusters.max(1))
        .map(|_| {
            let (bw, bh) = (r.range(8.0, w / 4.0), r.range(8.0, h / 4.0));
            (r.range(0.0, w), r.range(0.0, h), bw, bh)
        })
        .collect();
    let mut boxes = Vec::with_capacity(4 * n);
    let mut scores = Vec::with_capacity(n);
    for _ in 0..n {
        let (cx, cy, bw, bh) = centres[r.below(centres.len() as u64) as usize];
        let (jx, jy) = (r.normal() * 0.15 * bw, r.normal() * 0.15 * bh);
        let (sw, sh) = (bw * r.range(0.7, 1.3), bh * r.range(0.7, 1.3));
        let (x1, y1) = (cx + jx - sw / 2.0, cy + jy - sh / 2.0);
        boxes.extend_from_slice(&[x1 as f32, y1 as f32, (x1 + sw) as f32, (y1 + sh) as f32]);
        scores.push(r.uniform() as f32);
    }
    (boxes, scores)
}

// ---------------------------------------------------------------- op-test helpers

/// An f32 tensor of `v` on `device`.
pub fn f32_on(v: &[f64], shape: &[usize], device: Device) -> Tensor {
    let v32: Vec<f32> = v.iter().map(|&x| x as f32).collect();
    Tensor::from_vec(v32, shape.to_vec())
        .unwrap()
        .to_device(device)
        .unwrap()
}

pub fn i64_on(v: &[i64], device: Device) -> Tensor {
    Tensor::from_vec_i64(v.to_vec(), [v.len()])
        .unwrap()
        .to_device(device)
        .unwrap()
}

/// Run `f` on a tape watching `inputs[wrt]`, backpropagate `gy` (ones for a scalar
/// when `None`), return the output and the gradients of `inputs[wrt]`.
pub fn run_with_grads(
    f: impl Fn(&[Tensor]) -> Result<Tensor>,
    inputs: &[Tensor],
    wrt: &[usize],
    gy: Option<Tensor>,
) -> (Tensor, Vec<Tensor>) {
    let tape = Tape::new();
    for &i in wrt {
        tape.watch(&inputs[i]);
    }
    let y = {
        let _g = tape.activate();
        f(inputs).unwrap()
    };
    let grads = match gy {
        None => tape.backward(&y),
        Some(g) => tape.backward_with(&y, g),
    }
    .unwrap();
    let gs = wrt
        .iter()
        .map(|&i| grads.expect(&inputs[i]).unwrap().clone())
        .collect();
    (y, gs)
}

pub fn assert_vec_close(what: &str, got: &[f64], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let e = rel_err(got, want);
    assert!(
        e <= tol,
        "{what}: relative error {e:.3e} > {tol:.1e} (got {:?}, want {:?})",
        &got[..got.len().min(4)],
        &want[..want.len().min(4)]
    );
}

pub fn assert_err_mentions(r: Result<Tensor>, words: &[&str]) {
    let msg = match r {
        Ok(t) => panic!("expected an error mentioning {words:?}, got {t:?}"),
        Err(e) => e.to_string(),
    };
    for w in words {
        assert!(msg.contains(w), "error `{msg}` does not mention `{w}`");
    }
}

/// Run `f` on a fresh tape watching `inputs`; return its output and the gradients of
/// `sum(y * gy)`.
pub fn with_grads(
    inputs: &[&Tensor],
    gy: &Tensor,
    f: impl FnOnce() -> kestrel::Result<Tensor>,
) -> (Tensor, Gradients) {
    let tape = Tape::new();
    for t in inputs {
        tape.watch(t);
    }
    let y = {
        let _g = tape.activate();
        f().unwrap()
    };
    let grads = tape.backward_with(&y, gy.clone()).unwrap();
    (y, grads)
}

/// `t` as f32 on `dev`.
pub fn tensor_f32_on(t: &Tensor, dev: Device) -> Tensor {
    t.to_dtype(kestrel::DType::F32)
        .unwrap()
        .to_device(dev)
        .unwrap()
}

/// `r` is an error whose message names `op`.
pub fn assert_err(what: &str, r: kestrel::Result<impl std::fmt::Debug>, op: &str) {
    match r {
        Ok(v) => panic!("{what}: expected an error, got {v:?}"),
        Err(e) => assert!(
            e.to_string().contains(op),
            "{what}: error does not name {op}: {e}"
        ),
    }
}

/// `got` (any float tensor) within relative error `tol` of the f64 values `want`.
pub fn assert_tensor_close(what: &str, got: &Tensor, want: &[f64], tol: f64) {
    let g = got.to_vec::<f64>().unwrap();
    assert_eq!(g.len(), want.len(), "{what}: length");
    let e = rel_err(&g, want);
    assert!(
        e <= tol,
        "{what}: relative error {e:.3e} > {tol:.1e} (got {:?}, want {:?})",
        &g[..g.len().min(4)],
        &want[..want.len().min(4)]
    );
}

/// The training targets `target{i}.boxes` / `target{i}.labels` of a model fixture
/// (train.safetensors), in original image pixels.
pub fn fixture_targets(f: &TensorFile) -> Vec<kestrel::detection::Target> {
    (0..)
        .take_while(|i| f.contains(&format!("target{i}.boxes")))
        .map(|i| {
            let b = f
                .tensor(&format!("target{i}.boxes"))
                .unwrap()
                .to_vec::<f32>()
                .unwrap();
            kestrel::detection::Target {
                boxes: b
                    .chunks_exact(4)
                    .map(|c| [c[0], c[1], c[2], c[3]])
                    .collect(),
                labels: f.ints(&format!("target{i}.labels")).unwrap().0,
            }
        })
        .collect()
}

/// The original image sizes `(h, w)` of a model fixture (its `original_sizes` param).
pub fn orig_sizes(f: &TensorFile) -> Vec<(usize, usize)> {
    f.params().unwrap()["original_sizes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s[0].as_u64().unwrap() as usize,
                s[1].as_u64().unwrap() as usize,
            )
        })
        .collect()
}

/// torchvision's detections of image `i` of a model fixture (original-image pixels).
pub fn fixture_dets(f: &TensorFile, i: usize) -> kestrel::detection::Detections {
    let b = f
        .tensor(&format!("det{i}.boxes"))
        .unwrap()
        .to_vec::<f32>()
        .unwrap();
    kestrel::detection::Detections {
        boxes: b
            .chunks_exact(4)
            .map(|c| [c[0], c[1], c[2], c[3]])
            .collect(),
        scores: f
            .tensor(&format!("det{i}.scores"))
            .unwrap()
            .to_vec::<f32>()
            .unwrap(),
        labels: f.ints(&format!("det{i}.labels")).unwrap().0,
    }
}

/// IoU of two boxes (x1, y1, x2, y2) in f32.
pub fn iou(a: &[f32; 4], b: &[f32; 4]) -> f32 {
    let area = |b: &[f32; 4]| (b[2] - b[0]) * (b[3] - b[1]);
    let w = (a[2].min(b[2]) - a[0].max(b[0])).max(0.0);
    let h = (a[3].min(b[3]) - a[1].max(b[1])).max(0.0);
    w * h / (area(a) + area(b) - w * h)
}

/// The fixture's model (tests/fixtures/model/weights.safetensors, its own config) on
/// `device`, f32.
pub fn fixture_model(device: Device) -> kestrel::detection::FasterRcnn {
    let path = fixtures_dir().join("model/weights.safetensors");
    let params = TensorFile::open(&path).unwrap().params().unwrap();
    let cfg = kestrel::detection::FasterRcnnConfig::from_params(&params).unwrap();
    let mut m = kestrel::detection::FasterRcnn::load(cfg, &path).unwrap();
    m.to_device(device).unwrap();
    m
}

/// One image's u8 pixels (`3 * H * W` bytes, channel-major), H and W.
pub type Pixels = (Vec<u8>, usize, usize);

/// The fixture's training images as u8 pixels (`3 * H * W` bytes, H, W), as the
/// data loader yields them, with their targets (what [`fixture_training_batch`]
/// holds as f32).
pub fn fixture_training_pixels() -> (Vec<Pixels>, Vec<kestrel::detection::Target>) {
    let f = fixture("model/train.safetensors");
    let pixels = fixture_pixels();
    let targets = fixture_targets(&f).into_iter().take(pixels.len()).collect();
    (pixels, targets)
}

/// The fixture's images as u8 pixels (`3 * H * W` bytes, H, W).
pub fn fixture_pixels() -> Vec<Pixels> {
    let e = fixture("model/eval.safetensors");
    (0..)
        .map(|i| format!("image{i}.u8"))
        .take_while(|n| e.contains(n))
        .map(|n| {
            let (v, s) = e.ints(&n).unwrap();
            let bytes: Vec<u8> = v.into_iter().map(|x| x as u8).collect();
            (bytes, s.dim(1), s.dim(2))
        })
        .collect()
}

/// `images` with every byte moved by a uniform offset in [-20, 20) (clamped), from
/// `seed`: a second batch of the same sizes with other pixels.
pub fn perturbed_pixels(images: &[Pixels], seed: u64) -> Vec<Pixels> {
    let mut rng = kestrel::rng::Rng::new(seed);
    images
        .iter()
        .map(|(d, h, w)| {
            let d = d
                .iter()
                .map(|&v| v.saturating_add(rng.below(40) as u8).saturating_sub(20))
                .collect();
            (d, *h, *w)
        })
        .collect()
}

/// torchvision's recipe SGD (momentum 0.9, weight decay 1e-4) at a small learning
/// rate (1e-3), as the device step tests run it.
pub fn recipe_sgd() -> kestrel::optim::Sgd {
    kestrel::optim::Sgd::new(kestrel::optim::SgdConfig {
        lr: 1e-3,
        momentum: 0.9,
        weight_decay: 1e-4,
        ..kestrel::optim::SgdConfig::default()
    })
    .unwrap()
}

/// Borrowed 8-bit views of `images`, as `upload_u8` and `detect_u8` take them.
pub fn u8_views(images: &[Pixels]) -> Vec<kestrel::detection::transform::ImageU8<'_>> {
    images
        .iter()
        .map(|(d, h, w)| kestrel::detection::transform::ImageU8 {
            data: d,
            height: *h,
            width: *w,
        })
        .collect()
}

/// The fixture's images (u8, through `image_from_u8`) on `device` and its training
/// targets, one per image.
pub fn fixture_training_batch(device: Device) -> (Vec<Tensor>, Vec<kestrel::detection::Target>) {
    let e = fixture("model/eval.safetensors");
    let f = fixture("model/train.safetensors");
    let images: Vec<Tensor> = (0..)
        .map(|i| format!("image{i}.u8"))
        .take_while(|n| e.contains(n))
        .map(|n| {
            let (v, s) = e.ints(&n).unwrap();
            let bytes: Vec<u8> = v.into_iter().map(|x| x as u8).collect();
            kestrel::detection::transform::image_from_u8(&bytes, s.dim(1), s.dim(2))
                .unwrap()
                .to_device(device)
                .unwrap()
        })
        .collect();
    let targets = fixture_targets(&f).into_iter().take(images.len()).collect();
    (images, targets)
}

/// User + system CPU seconds of the process (all threads), CLOCK_PROCESS_CPUTIME_ID.
pub fn cpu_seconds() -> f64 {
    #[repr(C)]
    struct Timespec {
        sec: i64,
        nsec: i64,
    }
    extern "C" {
        fn clock_gettime(clock: i32, ts: *mut Timespec) -> i32;
    }
    let mut ts = Timespec { sec: 0, nsec: 0 };
    // SAFETY: clock_gettime writes one timespec (64-bit Linux layout) into `ts`.
    let rc = unsafe { clock_gettime(2, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_PROCESS_CPUTIME_ID)");
    ts.sec as f64 + ts.nsec as f64 * 1e-9
}

/// The f32 elements of `t` as bit patterns (for bit-for-bit comparisons).
pub fn bits(t: &kestrel::Tensor) -> Vec<u32> {
    t.to_vec::<f32>()
        .unwrap()
        .iter()
        .map(|v| v.to_bits())
        .collect()
}
