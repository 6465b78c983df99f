//! Native bf16 paths of the ops the bf16 model runs between its convolutions (relu,
//! add, frozen batch norm, the FPN's nearest-upsample + add, max pooling;
//! kernels/bf16_ops.cu), and what they are for: peak device memory in bf16 below f32.
//!
//! The rule (src/ops/mixed.rs): a bf16 op's output is the f32 op on the widened
//! inputs, rounded once to nearest even; its gradients are the f32 op's gradients at
//! the widened inputs, f32. So each check below computes the reference with the f32
//! op on the same device (f32 inputs holding exactly the bf16 values) and asks for
//! bit equality: any f32 copy left on the tape, a double rounding or a different
//! expression in a kernel shows up as a differing bit. The CPU bf16 path is the
//! reference for the emulated kernels (bit-equal too). The f32 ops' own f64
//! gradchecks are in their op tests (elementwise, norm, upsample, pool).

mod common;

use common::{emulated, fixture_model, fixture_training_batch, run_with_grads};
use kestrel::autograd::Tape;
use kestrel::nn::Precision;
use kestrel::ops::{self, norm, pool, upsample};
use kestrel::rng::Rng;
use kestrel::tensor::DType;
use kestrel::{Device, Result, Tensor};

/// Random f32 values that bf16 represents exactly (rounded from uniform [-2, 2)),
/// some repeated so max pooling meets ties.
fn bf16_exact(seed: u64, dims: &[usize]) -> Tensor {
    let n: usize = dims.iter().product();
    let v: Vec<f32> = common::randn(seed, n)
        .into_iter()
        .enumerate()
        .map(|(i, x)| {
            let x = if i % 7 == 3 { 0.5 } else { 2.0 * x as f32 };
            half::bf16::from_f32(x).to_f32()
        })
        .collect();
    Tensor::from_vec(v, dims.to_vec()).unwrap()
}

fn bits(t: &Tensor) -> Vec<u16> {
    t.to_device(Device::Cpu)
        .unwrap()
        .to_vec_bf16()
        .unwrap()
        .iter()
        .map(|v| v.to_bits())
        .collect()
}

fn f32s(t: &Tensor) -> Vec<u32> {
    assert_eq!(t.dtype(), DType::F32, "gradients are f32");
    t.to_device(Device::Cpu)
        .unwrap()
        .to_vec::<f32>()
        .unwrap()
        .iter()
        .map(|v| v.to_bits())
        .collect()
}

/// `f` on bf16 activations `acts` (plus f32 parameters `params`) against the rule,
/// on `dev`: output bits equal the f32 output rounded, every gradient (activations
/// and parameters) bit-equal to the f32 gradient. Returns the bf16 output.
fn check_rule(
    what: &str,
    dev: Device,
    acts: &[Tensor],
    params: &[Tensor],
    f: impl Fn(&[Tensor]) -> Result<Tensor>,
) -> Tensor {
    let wide: Vec<Tensor> = acts
        .iter()
        .chain(params)
        .map(|t| t.to_device(dev).unwrap())
        .collect();
    let narrow: Vec<Tensor> = acts
        .iter()
        .map(|t| t.to_dtype(DType::BF16).unwrap().to_device(dev).unwrap())
        .chain(params.iter().map(|t| t.to_device(dev).unwrap()))
        .collect();
    // Frozen batch norm's running statistics get no gradient: the activations and
    // at most two parameters (weight, bias) are watched.
    let wrt: Vec<usize> = (0..wide.len().min(acts.len() + 2)).collect();
    // The upstream gradient: random f32 (not bf16-exact: gradients stay f32).
    let y0 = f(&wide).unwrap();
    let gy = common::rand_t(99, y0.dims())
        .to_dtype(DType::F32)
        .unwrap()
        .to_device(dev)
        .unwrap();
    let (y_ref, g_ref) = run_with_grads(&f, &wide, &wrt, Some(gy.clone()));
    let (y, g) = run_with_grads(&f, &narrow, &wrt, Some(gy));
    assert_eq!(y.dtype(), DType::BF16, "{what}: bf16 in, bf16 out");
    assert_eq!(
        bits(&y),
        bits(&y_ref.to_dtype(DType::BF16).unwrap()),
        "{what} on {dev:?}: output is not the f32 output rounded once"
    );
    for (i, (a, b)) in g.iter().zip(&g_ref).enumerate() {
        assert_eq!(
            f32s(a),
            f32s(b),
            "{what} on {dev:?}: gradient {i} is not the f32 gradient at the widened inputs"
        );
    }
    y
}

/// Each op on the CPU and on the emulated device; the two bf16 outputs bit-equal.
fn both(what: &str, acts: &[Tensor], params: &[Tensor], f: impl Fn(&[Tensor]) -> Result<Tensor>) {
    let cpu = check_rule(what, Device::Cpu, acts, params, &f);
    let mut emu = None;
    common::on_emulated(|d| emu = Some(check_rule(what, d, acts, params, &f)));
    assert_eq!(
        bits(&emu.unwrap()),
        bits(&cpu),
        "{what}: emulated kernel differs from the CPU reference"
    );
}

#[test]
fn relu_bf16_follows_the_rule_cpu_and_emulated() {
    both("relu", &[bf16_exact(1, &[2, 3, 5, 7])], &[], |v| {
        ops::relu(&v[0])
    });
}

#[test]
fn add_bf16_follows_the_rule_cpu_and_emulated() {
    // Sums of two bf16 values need rounding (and hit round-to-even ties often).
    both(
        "add",
        &[bf16_exact(2, &[2, 3, 5, 7]), bf16_exact(3, &[2, 3, 5, 7])],
        &[],
        |v| ops::add(&v[0], &v[1]),
    );
}

#[test]
fn frozen_batch_norm_bf16_follows_the_rule_cpu_and_emulated() {
    let c = 6;
    let pos = |s: u64| {
        let v: Vec<f32> = common::randn(s, c)
            .iter()
            .map(|x| 0.5 + x.abs() as f32)
            .collect();
        Tensor::from_vec(v, vec![c]).unwrap()
    };
    let any = |s: u64| common::rand_t(s, &[c]).to_dtype(DType::F32).unwrap();
    // weight and bias are watched too: their gradients read the saved bf16 input.
    both(
        "frozen_batch_norm",
        &[bf16_exact(4, &[2, c, 5, 9])],
        &[pos(5), any(6), any(7), pos(8)],
        |v| norm::frozen_batch_norm(&v[0], &v[1], &v[2], &v[3], &v[4], 1e-5),
    );
}

#[test]
fn upsample_nearest_add_bf16_follows_the_rule_cpu_and_emulated() {
    // A non-integer ratio (7 -> 3, 10 -> 5) exercises the nearest rule.
    both(
        "upsample_nearest_add",
        &[bf16_exact(9, &[2, 3, 7, 10]), bf16_exact(10, &[2, 3, 3, 5])],
        &[],
        |v| upsample::upsample_nearest_add(&v[0], &v[1]),
    );
}

#[test]
fn max_pool2d_bf16_follows_the_rule_cpu_and_emulated() {
    // The stem's pooling: 3x3, stride 2, padding 1; repeated values give ties.
    both("max_pool2d", &[bf16_exact(11, &[2, 3, 9, 11])], &[], |v| {
        pool::max_pool2d(&v[0], 3, 2, 1)
    });
    // Without a tape the forward skips the indices (the other kernel).
    let x = bf16_exact(12, &[1, 2, 8, 8]);
    let want = bits(
        &ops::max_pool2d(&x, 3, 2, 1)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap(),
    );
    common::on_emulated(|d| {
        let x16 = x.to_dtype(DType::BF16).unwrap().to_device(d).unwrap();
        assert_eq!(bits(&ops::max_pool2d(&x16, 3, 2, 1).unwrap()), want);
    });
}

/// A bf16 activation with an f32 one is refused, naming the op, on both devices.
#[test]
fn mixed_dtypes_are_an_error_naming_the_op_cpu_and_emulated() {
    let a = bf16_exact(13, &[1, 2, 4, 4]);
    let t = bf16_exact(14, &[1, 2, 2, 2]);
    for dev in [Device::Cpu, emulated()] {
        let a32 = a.to_device(dev).unwrap();
        let a16 = a.to_dtype(DType::BF16).unwrap().to_device(dev).unwrap();
        let t32 = t.to_device(dev).unwrap();
        common::assert_err("add", ops::add(&a16, &a32), "add");
        common::assert_err(
            "upsample",
            upsample::upsample_nearest_add(&a16, &t32),
            "upsample_nearest_add",
        );
        // bf16 statistics are not what the policy gives frozen batch norm.
        let s16 = Tensor::from_vec(vec![1.0f32, 2.0], vec![2])
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap()
            .to_device(dev)
            .unwrap();
        common::assert_err(
            "frozen_batch_norm",
            norm::frozen_batch_norm(&a32, &s16, &s16, &s16, &s16, 1e-5),
            "frozen_batch_norm",
        );
    }
}

/// Peak device memory (the caching allocator's peak of bytes in use) of one fixture
/// training step, forward + losses + backward, on the emulated device.
fn training_peak(device: Device, p: Precision) -> (u64, u64) {
    let mut m = fixture_model(device);
    m.set_precision(p);
    let (imgs, targets) = fixture_training_batch(device);
    device.reset_peak_memory();
    let base = device.memory().peak_allocated;
    let tape = Tape::new();
    for n in m.params.trainable_names() {
        tape.watch(m.params.get(&n).unwrap());
    }
    let ctx = m.ctx(true);
    let total = {
        let _g = tape.activate();
        let losses = m.losses(&ctx, &imgs, &targets, &mut Rng::new(0)).unwrap();
        let mut t = losses[0].1.clone();
        for (_, l) in &losses[1..] {
            t = ops::add(&t, l).unwrap();
        }
        t
    };
    let grads = tape.backward(&total).unwrap();
    let peak = device.memory().peak_allocated;
    drop(grads);
    (peak, base)
}

fn inference_peak(device: Device, p: Precision) -> (u64, u64) {
    let mut m = fixture_model(device);
    m.set_precision(p);
    let (imgs, _) = fixture_training_batch(device);
    m.detect(&imgs).unwrap(); // warm-up: bf16 weight copies, caches
    device.reset_peak_memory();
    let base = device.memory().peak_allocated;
    let dets = m.detect(&imgs).unwrap();
    assert!(!dets.is_empty());
    (device.memory().peak_allocated, base)
}

fn mib(b: u64) -> f64 {
    b as f64 / 1048576.0
}

/// The point of the native paths: a bf16 training step holds less device memory at
/// its peak than f32 (before them the widening ops kept f32 copies on the tape and
/// bf16 peaked above f32: 441.5 vs 395.4 MiB), and a bf16 inference adds less over
/// the weights it starts with (its total also carries the bf16 weight copies, which
/// in the fixture's tiny model are as large as the activations; at R50-FPN scale
/// bf16's total is below f32's: `kestrel bench --device emu --plan`).
#[test]
fn bf16_peak_device_memory_is_below_f32_emulated() {
    let device = emulated();
    let (t32, b32) = training_peak(device, Precision::F32);
    let (t16, b16) = training_peak(device, Precision::Bf16);
    let (i32_, ib32) = inference_peak(device, Precision::F32);
    let (i16, ib16) = inference_peak(device, Precision::Bf16);
    eprintln!(
        "fixture model, emulated device, peak bytes in use:\n  training step: f32 {:.1} MiB, bf16 {:.1} MiB (ratio {:.3}; in use before: {:.1} / {:.1} MiB)\n  inference:     f32 {:.1} MiB, bf16 {:.1} MiB (ratio {:.3}; in use before: {:.1} / {:.1} MiB)",
        mib(t32),
        mib(t16),
        t16 as f64 / t32 as f64,
        mib(b32),
        mib(b16),
        mib(i32_),
        mib(i16),
        i16 as f64 / i32_ as f64,
        mib(ib32),
        mib(ib16),
    );
    assert!(
        t16 < t32,
        "training: bf16 peak {t16} B is not below f32 {t32} B"
    );
    // Inference holds the f32 masters and their bf16 copies (19.4 MiB here) for the
    // whole pass; in this tiny model they are as large as the activations, so the
    // total can go either way. What bf16 must shrink is what the pass adds on top.
    assert!(
        i16 - ib16 < i32_ - ib32,
        "inference: bf16 adds {} B over what was in use before, f32 {} B",
        i16 - ib16,
        i32_ - ib32
    );
}
