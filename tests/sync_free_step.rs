//! A training step of the small fixture model (batch 2) on the emulated device that
//! talks to the host only when it must: after a warm-up, a non-logging iteration
//! makes no driver allocation, no synchronisation and no device-to-host copy (the
//! sampling, matching and targets run on the device, kernel errors are deferred to
//! a flag table), and a logging iteration adds exactly one device-to-host copy
//! (every loss, the NaN flag and the error table together). Also: a planted bad
//! index or label is reported at that check naming the op, with no read-back per
//! op; two runs are bit-identical and a stop-and-resume equals the uninterrupted run.

mod common;

use kestrel::autograd::Tape;
use kestrel::detection::targets::PackedTargets;
use kestrel::detection::{FasterRcnn, Target};
use kestrel::device::error_flags;
use kestrel::nn::Ctx;
use kestrel::optim::Sgd;
use kestrel::rng::Rng;
use kestrel::runner::{read_step_values, StepValues};
use kestrel::{Device, Tensor};

/// The cache measurements need the device to themselves.
static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn sgd() -> Sgd {
    common::recipe_sgd()
}

/// One step: losses, backward, SGD, with kernel errors deferred; on a logging
/// iteration the losses and their total are read back with [`read_step_values`].
fn step(
    m: &mut FasterRcnn,
    images: &[Tensor],
    targets: &[Target],
    sgd: &mut Sgd,
    rng: &mut Rng,
    log: bool,
) -> kestrel::Result<Option<StepValues>> {
    let _defer = error_flags::defer();
    let names = m.params.trainable_names();
    let tape = Tape::new();
    for n in &names {
        tape.watch(m.params.get(n)?);
    }
    let (mut logged, grads) = {
        let ctx = Ctx::new(&m.params, true);
        let guard = tape.activate();
        let losses = m.losses(&ctx, images, targets, rng)?;
        let mut total = losses[0].1.clone();
        for (_, l) in &losses[1..] {
            total = kestrel::ops::add(&total, l)?;
        }
        drop(guard);
        let grads = tape.backward(&total)?;
        let mut logged: Vec<Tensor> = losses.into_iter().map(|(_, t)| t).collect();
        logged.push(total);
        (logged, grads)
    };
    drop(tape);
    // Moved out of the store (not cloned), so the optimizer updates them in place.
    let mut params: Vec<Tensor> = names
        .iter()
        .map(|n| m.params.take(n))
        .collect::<kestrel::Result<_>>()?;
    let g: Vec<Option<&Tensor>> = params.iter().map(|p| grads.get(p)).collect();
    let stepped = sgd.step_optional(&mut params, &g);
    drop(g);
    drop(grads);
    for (n, t) in names.iter().zip(params) {
        m.params.put(n, t)?;
    }
    stepped?;
    if !log {
        return Ok(None);
    }
    let values = read_step_values(&logged)?;
    logged.clear();
    Ok(Some(values))
}

#[test]
fn a_non_logging_step_reads_nothing_back_and_a_logging_step_reads_once_emulated() {
    let _l = LOCK.lock().unwrap_or_else(|p| p.into_inner());
    let device = common::emulated();
    let mut m = common::fixture_model(device);
    let (images, targets) = common::fixture_training_batch(device);
    let (mut opt, mut rng) = (sgd(), Rng::new(0));
    // Warm-up: ONE step, a logging one (a non-logging step makes the same
    // allocations less the read-out's). Long-lived state (momentum, staging
    // buffers, cached tables) has a pool of its own in the caching allocator, and
    // a request takes only a block of its own class, so the next steps find every
    // block they need (src/device/alloc.rs).
    let c = device.counters();
    step(&mut m, &images, &targets, &mut opt, &mut rng, true).unwrap();
    let warm = c.delta();
    let c = device.counters();
    let none = step(&mut m, &images, &targets, &mut opt, &mut rng, false).unwrap();
    let quiet = c.delta();
    let c = device.counters();
    let logged = step(&mut m, &images, &targets, &mut opt, &mut rng, true)
        .unwrap()
        .unwrap();
    let loud = c.delta();
    eprintln!("warm-up: one logging step: {warm}");
    eprintln!(
        "non-logging training step of {} images (emulated, after warm-up): {quiet}",
        images.len()
    );
    eprintln!("logging training step: {loud}; values {:?}", logged.values);
    assert!(none.is_none());
    assert!(quiet.launches > 0, "{quiet}");
    assert_eq!(quiet.driver_allocs, 0, "{quiet}");
    assert_eq!(quiet.syncs, 0, "{quiet}");
    assert_eq!(quiet.dtoh, 0, "{quiet}");
    // With the images already on the device, the step's only upload is the batch's
    // targets, in one copy (PackedTargets: checked to be one copy here). It was 51
    // before the frozen-BN backward's zero shift became a device constant, 4 before
    // the image-size table of the proposal stage was cached, the backward's seed
    // became a device constant and the SGD pointer table was cached (SGD in place).
    let c = device.counters();
    let _tg = PackedTargets::new(&targets, device).unwrap();
    assert_eq!(c.delta().htod, 1, "{}", c.delta());
    assert_eq!(quiet.htod, 1, "the targets only: {quiet}");
    assert_eq!(loud.htod, 1, "the targets only: {loud}");
    assert_eq!(loud.dtoh, 1, "{loud}");
    assert_eq!(loud.driver_allocs, 0, "{loud}");
    assert_eq!(logged.values.len(), 5, "four losses and the total");
    assert!(!logged.non_finite, "{:?}", logged.values);
    let sum: f64 = logged.values[..4].iter().sum();
    assert!(
        (sum - logged.values[4]).abs() <= 1e-5 * sum.abs(),
        "{:?}",
        logged.values
    );
}

#[test]
fn a_planted_bad_index_or_label_is_reported_at_the_check_naming_the_op_emulated() {
    let device = common::emulated();
    let x = Tensor::from_vec((0..12).map(|v| v as f32).collect(), [4, 3])
        .unwrap()
        .to_device(device)
        .unwrap();
    let bad_idx = Tensor::from_vec_i64(vec![0, 7, 1], [3])
        .unwrap()
        .to_device(device)
        .unwrap();
    let logits = Tensor::from_vec(vec![0.5f32; 6], [2, 3])
        .unwrap()
        .to_device(device)
        .unwrap();
    let bad_label = Tensor::from_vec_i64(vec![1, 3], [2])
        .unwrap()
        .to_device(device)
        .unwrap();
    let one = Tensor::from_vec(vec![1.0f32], [1])
        .unwrap()
        .to_device(device)
        .unwrap();
    {
        let _d = error_flags::defer();
        let c = device.counters();
        let y = kestrel::ops::index_select(&x, 0, &bad_idx);
        let d = c.delta();
        assert!(y.is_ok(), "deferred: no error yet");
        assert_eq!((d.dtoh, d.syncs), (0, 0), "no read-back per op: {d}");
        let c = device.counters();
        let err = read_step_values(std::slice::from_ref(&one)).unwrap_err();
        let d = c.delta();
        assert_eq!(d.dtoh, 1, "the check is the one read-back: {d}");
        let msg = err.to_string();
        assert!(
            msg.contains("index_select") && msg.contains("idx[1]"),
            "{msg}"
        );
        // Reported once: the table is clear again.
        assert_eq!(
            read_step_values(std::slice::from_ref(&one)).unwrap().values,
            vec![1.0]
        );

        let c = device.counters();
        let ce = kestrel::ops::cross_entropy(&logits, &bad_label, kestrel::ops::Reduction::None);
        assert!(ce.is_ok(), "deferred: no error yet");
        assert_eq!(c.delta().dtoh, 0, "{}", c.delta());
        let msg = error_flags::check(&emu_dev()).unwrap_err().to_string();
        assert!(
            msg.contains("cross_entropy") && msg.contains("labels[1]"),
            "{msg}"
        );
        error_flags::check(&emu_dev()).unwrap();
    }
    // Outside a deferred scope the op reports at once, as before.
    let err = kestrel::ops::index_select(&x, 0, &bad_idx).unwrap_err();
    assert!(err.to_string().contains("idx[1]"), "{err}");
}

fn emu_dev() -> kestrel::device::gpu::GpuDevice {
    kestrel::device::emu::gpu_device().unwrap()
}

fn weights(m: &FasterRcnn) -> Vec<(String, Vec<u32>)> {
    let mut names = m.params.trainable_names();
    names.sort();
    names
        .into_iter()
        .map(|n| {
            let v = m.params.get(&n).unwrap().to_vec::<f32>().unwrap();
            (n, v.into_iter().map(f32::to_bits).collect())
        })
        .collect()
}

fn same(a: &[(String, Vec<u32>)], b: &[(String, Vec<u32>)], what: &str) {
    assert_eq!(a.len(), b.len());
    for ((na, wa), (nb, wb)) in a.iter().zip(b) {
        assert_eq!(na, nb);
        let diff = wa.iter().zip(wb).filter(|(x, y)| x != y).count();
        assert_eq!(
            diff,
            0,
            "{what}: {na}: {diff} of {} weights differ",
            wa.len()
        );
    }
}

#[test]
fn runs_are_bit_identical_and_a_resume_equals_the_uninterrupted_run_emulated() {
    let _l = LOCK.lock().unwrap_or_else(|p| p.into_inner());
    let device = common::emulated();
    let (images, targets) = common::fixture_training_batch(device);
    let run = |steps: usize| {
        let mut m = common::fixture_model(device);
        let (mut opt, mut rng) = (sgd(), Rng::new(11));
        for _ in 0..steps {
            step(&mut m, &images, &targets, &mut opt, &mut rng, false).unwrap();
        }
        (m, opt, rng)
    };
    let (a, _, _) = run(2);
    let (b, _, _) = run(2);
    let (wa, wb) = (weights(&a), weights(&b));
    same(&wa, &wb, "two runs");
    drop((a, b));

    // Stop after one step: keep only what a checkpoint keeps (weights, momentum and
    // the generator's one-word state, on the host), then resume in a fresh model.
    let (m, opt, rng) = run(1);
    let saved: Vec<(String, Tensor)> = m
        .params
        .trainable_names()
        .into_iter()
        .map(|n| {
            let t = m.params.get(&n).unwrap().to_device(Device::Cpu).unwrap();
            (n, t)
        })
        .collect();
    let momentum: Vec<(String, Tensor)> = opt
        .state()
        .into_iter()
        .map(|(n, t)| (n, t.to_device(Device::Cpu).unwrap()))
        .collect();
    let rng_state = rng.state();
    drop((m, opt, rng));
    let mut m = common::fixture_model(device);
    for (n, t) in &saved {
        m.params.set(n, t.to_device(device).unwrap()).unwrap();
    }
    let mut opt = sgd();
    let momentum: Vec<(String, Tensor)> = momentum
        .into_iter()
        .map(|(n, t)| (n, t.to_device(device).unwrap()))
        .collect();
    opt.load_state(&momentum).unwrap();
    let mut rng = Rng::new(rng_state);
    step(&mut m, &images, &targets, &mut opt, &mut rng, false).unwrap();
    same(&weights(&m), &wa, "resume after step 1 vs uninterrupted");
}
