//! The emulated device's plan mode (`kestrel::device::emu::set_plan_mode`): kernels
//! are checked and counted but not run. Its figures (driver allocations and frees,
//! bytes, launches, copies, the caching allocator's peak) stand for a real run only
//! if the plan makes exactly the allocations and frees of a real run. These tests
//! run the same passes for real and as a plan on the emulated device and compare
//! every counter and every stage's memory; they also show that the comparison fails
//! when a size is read from device data, and that plan mode refuses such a
//! read-back naming the op.

mod common;

use kestrel::app::profile::{detect_profiled, train_step_profiled, StageTimes};
use kestrel::detection::FasterRcnn;
use kestrel::device::emu;
use kestrel::device::gpu::{Counters, MemoryStats};
use kestrel::nn::Precision;
use kestrel::optim::Sgd;
use kestrel::rng::Rng;
use kestrel::{Device, Tensor};

/// Peaks and cache state are per device: the comparisons need it to themselves.
static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Turns plan mode off again when a test ends, even by a failed assertion.
struct Plan;
impl Plan {
    fn on(on: bool) -> Plan {
        emu::set_plan_mode(on);
        Plan
    }
}
impl Drop for Plan {
    fn drop(&mut self) {
        emu::set_plan_mode(false);
    }
}

/// What one pass did to the device: the whole pass's counters, each stage's counters
/// and memory, and the allocator's state after it.
#[derive(Debug, PartialEq)]
struct PassFigures {
    total: Counters,
    stages: StageTimesNoClock,
    after: MemoryStats,
}

/// A [`StageTimes`] without its clock readings (they differ between any two runs).
#[derive(Debug, PartialEq)]
struct StageTimesNoClock(
    Vec<(&'static str, Counters)>,
    Vec<(&'static str, kestrel::app::profile::StageMemory)>,
);

fn figures(device: Device, total: Counters, t: StageTimes) -> PassFigures {
    PassFigures {
        total,
        stages: StageTimesNoClock(t.1, t.2),
        after: device.memory(),
    }
}

fn sgd() -> Sgd {
    common::recipe_sgd()
}

/// A fresh fixture model on the emulated device in `precision`, and the device's
/// cache emptied, so a real run and a plan start from the same allocator state.
fn fresh_model(device: Device, precision: Precision) -> FasterRcnn {
    let mut m = common::fixture_model(device);
    m.set_precision(precision);
    emu::gpu_device().unwrap().empty_cache();
    device.reset_peak_memory();
    m
}

/// `steps` profiled training steps (the bench's step) of the fixture model, batch 2,
/// from an empty cache, in plan mode or for real.
fn training(plan: bool, precision: Precision, steps: usize) -> Vec<PassFigures> {
    let device = common::emulated();
    let (images, targets) = common::fixture_training_batch(device);
    let mut m = fresh_model(device, precision);
    let (mut opt, mut rng) = (sgd(), Rng::new(0));
    let _p = Plan::on(plan);
    (0..steps)
        .map(|i| {
            let c = device.counters();
            let (loss, t) = train_step_profiled(&mut m, &images, &targets, &mut opt, &mut rng)
                .unwrap_or_else(|e| panic!("step {i} (plan {plan}): {e}"));
            if !plan {
                assert!(loss.is_finite(), "real step {i}: loss {loss}");
            }
            figures(device, c.delta(), t)
        })
        .collect()
}

/// Every counter and every stage's memory of each step equal, step by step.
fn assert_same(real: &[PassFigures], plan: &[PassFigures], what: &str) {
    assert_eq!(real.len(), plan.len());
    for (i, (r, p)) in real.iter().zip(plan).enumerate() {
        assert!(
            r.total.launches > 0,
            "{what} {i}: nothing launched: {}",
            r.total
        );
        assert_eq!(
            r.total, p.total,
            "{what} {i}: counters\n real {}\n plan {}",
            r.total, p.total
        );
        assert_eq!(
            r.stages, p.stages,
            "{what} {i}: per-stage counters or memory"
        );
        assert_eq!(
            r.after, p.after,
            "{what} {i}: allocator state after the pass"
        );
    }
    let peak = |f: &[PassFigures]| {
        f.iter()
            .flat_map(|x| x.stages.1.iter().map(|s| s.1.peak))
            .max()
    };
    eprintln!(
        "{what}: plan == real over {} passes; peak allocated {:?} B, first pass {}",
        real.len(),
        peak(real),
        real[0].total
    );
}

/// Constants (shape tables uploaded once per process) and the kernel-error table are
/// made by the first pass of a process: a throwaway plan pass makes them, so the
/// real run and the plan that follow start alike.
fn warm_process_state(precision: Precision) {
    training(true, precision, 1);
}

#[test]
fn a_training_step_planned_equals_the_real_step_f32_emulated() {
    let _l = LOCK.lock().unwrap_or_else(|p| p.into_inner());
    warm_process_state(Precision::F32);
    // Three steps: the cache fills over the first two (momentum buffers appear at
    // the first step, old and new parameters overlap at the second).
    let real = training(false, Precision::F32, 3);
    let plan = training(true, Precision::F32, 3);
    assert_same(&real, &plan, "f32 training step");
}

#[test]
fn a_training_step_planned_equals_the_real_step_bf16_emulated() {
    let _l = LOCK.lock().unwrap_or_else(|p| p.into_inner());
    warm_process_state(Precision::Bf16);
    let real = training(false, Precision::Bf16, 2);
    let plan = training(true, Precision::Bf16, 2);
    assert_same(&real, &plan, "bf16 training step");
}

/// Plan mode refuses a read-back outside an end-of-step read-out and names the op
/// that made it (here `index_select`, whose eager error flag is read back after its
/// launch); inside `allow_readout` the copy is let through and reads zeros.
#[test]
fn a_read_back_in_plan_mode_is_refused_naming_the_op_emulated() {
    let device = common::emulated();
    let x = Tensor::from_vec((0..12).map(|v| v as f32).collect(), [4, 3])
        .unwrap()
        .to_device(device)
        .unwrap();
    let idx = Tensor::from_vec_i64(vec![0, 2], [2])
        .unwrap()
        .to_device(device)
        .unwrap();
    // For real first: the op works and reads its flag back.
    let c = device.counters();
    let y = kestrel::ops::index_select(&x, 0, &idx).unwrap();
    assert_eq!(c.delta().dtoh, 1, "{}", c.delta());
    assert_eq!(y.to_vec::<f32>().unwrap(), vec![0., 1., 2., 6., 7., 8.]);

    let _p = Plan::on(true);
    let err = kestrel::ops::index_select(&x, 0, &idx)
        .unwrap_err()
        .to_string();
    // Named twice: by the function that read back and by the last kernel launched.
    assert!(
        err.contains("plan mode")
            && err.contains("index_select (src/ops/")
            && err.contains("after kernel index_select"),
        "{err}"
    );
    let err = y.to_vec::<f32>().unwrap_err().to_string();
    assert!(
        err.contains("plan mode") && err.contains("read 24 bytes back"),
        "{err}"
    );
    {
        let _r = emu::allow_readout("test read-out");
        assert_eq!(
            y.to_vec::<f32>().unwrap(),
            vec![0.0; 6],
            "plan read-outs read zeros"
        );
    }
    assert!(y.to_vec::<f32>().is_err(), "the scope ended with its guard");
}

/// The comparison above can fail: a pass that sizes a buffer by a count read from
/// the device (smuggled past plan mode's refusal inside `allow_readout`, as no
/// honest caller would) allocates differently as a plan, and the figures differ.
#[test]
fn the_plan_comparison_fails_when_a_size_depends_on_device_data_emulated() {
    let _l = LOCK.lock().unwrap_or_else(|p| p.into_inner());
    let device = common::emulated();
    let host: Vec<f32> = (0..4096)
        .map(|i| if i % 3 == 0 { 1.0 } else { -1.0 })
        .collect();
    let x = Tensor::from_vec(host, [4096])
        .unwrap()
        .to_device(device)
        .unwrap();
    let pass = |plan: bool| {
        let _p = Plan::on(plan);
        emu::gpu_device().unwrap().empty_cache();
        device.reset_peak_memory();
        let c = device.counters();
        let y = kestrel::ops::relu(&x).unwrap();
        let positives = {
            let _r = emu::allow_readout("a size read from device data (wrong on purpose)");
            y.to_vec::<f32>()
                .unwrap()
                .iter()
                .filter(|v| **v > 0.0)
                .count()
        };
        let sized = Tensor::zeros([positives.max(1) * 256], kestrel::DType::F32, device).unwrap();
        drop(sized);
        (c.delta(), device.memory().peak_allocated)
    };
    let real = pass(false);
    let plan = pass(true);
    eprintln!("real {real:?}\nplan {plan:?}");
    assert_ne!(
        real, plan,
        "a data-dependent size must show in the comparison"
    );
    assert_ne!(real.1, plan.1, "the peaks differ");
}

/// Inference of the fixture model's two images: a plan gives the real pass's
/// counters and per-stage memory, or it is refused naming the op that reads back.
/// The profiled pass is `detect`'s (`FasterRcnn::detect_timed`): its one read-out is
/// the packed detections, after which nothing on the device depends on the counts
/// read (the trace's per-image proposal cut, whose row copies follow the counts,
/// is not part of it), so the plan must equal the real pass exactly.
#[test]
fn inference_planned_equals_the_real_pass_or_is_refused_emulated() {
    let _l = LOCK.lock().unwrap_or_else(|p| p.into_inner());
    let device = common::emulated();
    let (images, _) = common::fixture_training_batch(device);
    let run = |plan: bool| {
        let m = fresh_model(device, Precision::F32);
        let _p = Plan::on(plan);
        let mut out = Vec::new();
        for _ in 0..2 {
            emu::take_thread_launches();
            let c = device.counters();
            let t = detect_profiled(&m, &images);
            let launched = emu::take_thread_launches();
            eprintln!("plan {plan}: {} kernels: {launched:?}", launched.len());
            match t {
                Ok((_, t)) => out.push(figures(device, c.delta(), t)),
                Err(e) => return Err(e.to_string()),
            }
        }
        Ok(out)
    };
    // A first pass of the process uploads shape tables and caches anchors: a
    // throwaway plan pass does that, so the real run and the plan start alike.
    let _ = run(true);
    let real = run(false).expect("the real pass runs");
    match run(true) {
        Ok(plan) => assert_same(&real, &plan, "inference"),
        Err(e) => {
            // Refused: then the refusal must say who read back (a kestrel function,
            // found in the backtrace) and after which kernel.
            eprintln!("inference refused in plan mode (as it must while it reads back): {e}");
            assert!(e.contains("plan mode") && e.contains("after kernel"), "{e}");
            assert!(e.contains("(src/"), "the reading op is named: {e}");
        }
    }
}
