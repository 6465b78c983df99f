//! The Runner's loss read-out on the emulated device (issue 14, item 6): a real
//! [`Runner`] trains the fixture model (batch 2) through [`DetectorModel`]; the loss
//! values stay on the device and are read back only on logging iterations, in ONE
//! device-to-host copy for all losses of the interval, the kernel-error flags and the
//! NaN flag. The counters are taken per iteration by a hook that wraps every other
//! hook (highest priority before, lowest after). Also: the values logged equal the
//! CPU run's; a planted NaN is caught at the next logging iteration, naming both
//! iterations, and no checkpoint of the NaN state is written.

mod common;

use common::runner_counters as rc;

use std::path::PathBuf;

use kestrel::app::model::{DetBatch, DetectorModel};
use kestrel::device::gpu::Counters;
use kestrel::optim::{Sgd, SgdConfig};
use kestrel::runner::{hooks, Hook, Mode, Model, Priority, Runner, Schedule};
use kestrel::{Device, Tensor};

/// The emulated tests of this file run one at a time: the device's caching
/// allocator is shared by every thread of the process, so a test running beside
/// them could take the blocks a Runner freed and turn their steady-state cache
/// hits (asserted: 0 driver allocations) into misses.
static EMULATED: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// u8 pixels on the host, as the loader gives them; the model uploads them to its
/// device in one copy.
fn batch() -> DetBatch {
    rc::fixture_batch()
}

/// The same batch as f32 host tensors (the path for batches built from tensors).
fn batch_f32() -> DetBatch {
    let (images, targets) = common::fixture_training_batch(Device::Cpu);
    let n = images.len();
    DetBatch {
        images,
        pixels: Vec::new(),
        targets,
        image_ids: (0..n as i64).collect(),
    }
}

/// Sets the box classifier's bias to NaN before iteration `at` (1-based).
struct PlantNan {
    at: usize,
}

impl<M: Model> Hook<M> for PlantNan {
    fn before_train_iter(&mut self, r: &mut Runner<M>) -> kestrel::Result<()> {
        if r.iter() + 1 != self.at {
            return Ok(());
        }
        let named = r.model.params();
        let mut hit = false;
        let params = named
            .into_iter()
            .map(|(n, t)| {
                if n == "roi_heads.box_predictor.cls_score.bias" {
                    hit = true;
                    Tensor::full(t.shape().clone(), f64::NAN, t.dtype(), t.device())
                } else {
                    Ok(t)
                }
            })
            .collect::<kestrel::Result<Vec<_>>>()?;
        assert!(hit, "the planted parameter exists");
        r.model.set_params(params)
    }
}

/// A runner over the fixture model on `device`: SGD, a logger every `log` iterations
/// (no progress bar), the counting hooks, and whatever `extra` adds.
fn runner(
    device: Device,
    dir: &PathBuf,
    iters: usize,
    log: usize,
    extra: impl FnOnce(&mut Runner<DetectorModel>),
) -> (Runner<DetectorModel>, rc::IterationLog) {
    let model = DetectorModel::new(common::fixture_model(device), device);
    let sgd = Sgd::new(SgdConfig {
        lr: 1e-3,
        momentum: 0.9,
        weight_decay: 1e-4,
        ..SgdConfig::default()
    })
    .unwrap();
    let mut r = Runner::new(model, Box::new(sgd), dir, Schedule::Iters(iters), 0);
    r.log.quiet = true;
    r.set_train_loader(Box::new(rc::Cycle::new(vec![batch()], iters)));
    let mut logger = hooks::LoggerHook::new(log);
    logger.progress_bar = false;
    r.register_hook(hooks::OptimizerHook::new());
    r.register_hook(logger);
    let out = rc::count_iterations(&mut r, device, false);
    extra(&mut r);
    (r, out)
}

/// The JSON log's lines: (iter, loss averages by name). Every line is a training
/// line here (no validation phase; without a timer hook the logger tags them `val`).
fn json_log(dir: &std::path::Path) -> Vec<(u64, Vec<(String, f64)>)> {
    let text = std::fs::read_to_string(dir.join("log.jsonl")).unwrap();
    text.lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .map(|v| {
            let o = v.as_object().unwrap();
            let losses = o
                .iter()
                .filter(|(k, _)| k.contains("loss"))
                .map(|(k, x)| (k.clone(), x.as_f64().unwrap()))
                .collect();
            (v["iter"].as_u64().unwrap(), losses)
        })
        .collect()
}

#[test]
fn a_runner_reads_the_losses_back_once_per_logging_iteration_emulated() {
    let _serial = EMULATED.lock().unwrap_or_else(|p| p.into_inner());
    const ITERS: usize = 4;
    const LOG: usize = 2;
    let device = common::emulated();
    let dir = rc::tmp_dir("emu");
    let (mut r, log) = runner(device, &dir, ITERS, LOG, |_| {});
    r.run(&[(Mode::Train, 1)]).unwrap();
    drop(r);
    let emu = rc::take(&log);
    assert_eq!(emu.len(), ITERS);
    for (i, it) in emu.iter().enumerate() {
        eprintln!(
            "iteration {} (emulated runner, log every {LOG}): {}",
            i + 1,
            it.counters
        );
    }
    // The first iteration warms the allocator and the caches; from the second on
    // the steady state (see check_steady_state: this is its log-every-2 case):
    for (i, it) in emu.iter().enumerate().skip(WARM_UP) {
        let n = i + 1;
        let c = it.counters;
        assert!(c.launches > 0, "iteration {n} ran on the device: {c}");
        steady(n, LOG, c);
        if n % LOG == 0 {
            assert_eq!(c.dtoh, 1, "logging iteration {n}: one read-out: {c}");
            // The losses and the total of the interval's iterations, the error table
            // and the NaN flag, as f32, in that one copy.
            let k = it.log_vars.len();
            assert_eq!(k, 5, "four losses and the total: {:?}", it.log_vars);
            let slots = kestrel::device::error_flags::SLOTS;
            assert_eq!(c.dtoh_bytes, 4 * (LOG * k + slots + 1) as u64, "{c}");
        } else {
            assert_eq!(c.dtoh, 0, "non-logging iteration {n}: nothing read: {c}");
            assert!(it.log_vars.is_empty(), "iteration {n} was not read");
        }
    }

    // The same run reading every iteration (log interval 1, the eager behaviour),
    // over the first logging interval: the deferred read-out gives the same values
    // bit for bit, and the log's interval average is the same.
    let edir = rc::tmp_dir("eager");
    let (mut e, elog) = runner(device, &edir, LOG, LOG, |r| {
        r.register_hook_with_priority(ReadEvery, Priority::HIGHEST);
    });
    e.run(&[(Mode::Train, 1)]).unwrap();
    drop(e);
    let eager = rc::take(&elog);
    for (i, it) in eager.iter().enumerate().skip(1) {
        assert_eq!(
            it.counters.dtoh,
            1,
            "eager iteration {}: {}",
            i + 1,
            it.counters
        );
    }
    for n in [LOG] {
        let (d, g) = (&emu[n - 1].log_vars, &eager[n - 1].log_vars);
        assert_eq!(d.len(), 5);
        for ((dn, dv), (gn, gv)) in d.iter().zip(g) {
            assert_eq!(dn, gn);
            assert_eq!(
                dv.to_bits(),
                gv.to_bits(),
                "iteration {n}: {dn}: deferred {dv}, read every iteration {gv}"
            );
        }
    }
    let (jd, je) = (json_log(&dir), json_log(&edir));
    assert_eq!(jd.len(), ITERS / LOG, "{jd:?}");
    assert_eq!(jd[..1], je, "the logged interval averages");
    assert!(jd.iter().all(|(_, l)| l.len() == 5), "{jd:?}");
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&edir);
}

/// Sets the read-out interval to 1 after the logger set its own: values are read
/// every iteration, as before deferral.
struct ReadEvery;

impl<M: Model> Hook<M> for ReadEvery {
    fn before_train_iter(&mut self, r: &mut Runner<M>) -> kestrel::Result<()> {
        r.set_readout_interval(1);
        Ok(())
    }
}

#[test]
fn a_planted_nan_is_caught_at_the_next_logging_iteration_and_never_checkpointed_emulated() {
    let _serial = EMULATED.lock().unwrap_or_else(|p| p.into_inner());
    let device = common::emulated();
    let dir = rc::tmp_dir("nan");
    // Log and checkpoint every 2 iterations; NaN planted before iteration 3, a
    // non-logging one: its update is applied before anything is read.
    let (mut r, log) = runner(device, &dir, 4, 2, |r| {
        r.register_hook(hooks::NanGuardHook::new());
        r.register_hook(hooks::CheckpointHook::new(2, false));
        r.register_hook(PlantNan { at: 3 });
    });
    let err = r.run(&[(Mode::Train, 1)]).unwrap_err().to_string();
    eprintln!("{err}");
    assert!(err.contains("at iteration 3"), "{err}");
    assert!(err.contains("caught at iteration 4"), "{err}");
    assert!(err.contains("iterations 3..=4"), "{err}");
    assert!(err.contains("no checkpoint is saved"), "{err}");
    let its = rc::take(&log);
    // Iteration 4's hooks stopped at the guard: three complete iterations.
    assert_eq!(its.len(), 3);
    assert_eq!(its[2].counters.dtoh, 0, "iteration 3 read nothing");
    assert!(
        dir.join("iter_2.safetensors").exists(),
        "the good checkpoint"
    );
    let files: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".safetensors"))
        .collect();
    assert_eq!(files, vec!["iter_2.safetensors".to_string()], "{files:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_checkpoint_hook_refuses_a_state_after_a_nan_without_a_guard() {
    // On the CPU the values are read every iteration; without a NaN guard the run
    // goes on, and the checkpoint hook's forced read-out refuses to save.
    let dir = rc::tmp_dir("nan_noguard");
    let (mut r, _log) = runner(Device::Cpu, &dir, 2, 1, |r| {
        r.register_hook(hooks::CheckpointHook::new(2, false));
        r.register_hook(PlantNan { at: 1 });
    });
    let err = r.run(&[(Mode::Train, 1)]).unwrap_err().to_string();
    assert!(err.contains("not saving a checkpoint"), "{err}");
    assert!(err.contains("at iteration 1"), "{err}");
    assert!(!dir.join("iter_2.safetensors").exists());
    let _ = std::fs::remove_dir_all(&dir);
}

/// Iterations that warm the allocator and the caches: the first (from a cold
/// cache). Measured 2026-12-02, log every 2, driver blocks per iteration: 242,
/// 105, 5, 2, then 0 before the caching allocator kept long-lived state (momentum
/// and staging buffers, cached tables) in a pool of its own, gave a request only a
/// block of its own class (a larger one only when the driver is out of memory),
/// and the optimizer hook dropped the gradients after the step instead of at the
/// next backward; 379 then 0 since (see src/device/alloc.rs).
const WARM_UP: usize = 1;

/// The steady state of iteration `n` of a Runner logging every `log` (last
/// iteration `last`): it uploads exactly the batch's images (one pinned copy of the
/// u8 pixels) and its targets (one copy), takes no block from the driver (all from
/// the caching allocator), waits for nothing, and reads nothing back unless it
/// logs, and then exactly once.
fn steady_at(n: usize, log: usize, last: usize, c: Counters) {
    assert_eq!(c.htod, 2, "iteration {n}: images and targets only: {c}");
    assert_eq!(
        c.htod_pinned, 1,
        "iteration {n}: the images go up pinned: {c}"
    );
    assert_eq!(c.driver_allocs, 0, "iteration {n} (log every {log}): {c}");
    assert_eq!(c.syncs, 0, "iteration {n}: {c}");
    let reads = if n % log == 0 || n == last { 1 } else { 0 };
    assert_eq!(c.dtoh, reads, "iteration {n}: {c}");
}

/// [`steady_at`] within a run longer than `n` iterations.
fn steady(n: usize, log: usize, c: Counters) {
    steady_at(n, log, usize::MAX, c)
}

/// After warm-up ([`WARM_UP`] iteration), EVERY Runner iteration is in the steady
/// state ([`steady_at`]). Logging every `log` for `iters` iterations, so the check
/// covers several positions in a logging interval (log every 2: the first test).
/// Before the logged values were staged in one persistent buffer
/// (src/runner/step_values.rs), iterations 1..=6 logging every 3 took 240, 110, 9,
/// 1, 0, 2 driver blocks: the steps' own scalars waiting for the read-out made each
/// place in the interval meet the allocator in another state, so no number of
/// warm-up iterations sufficed.
fn check_steady_state(iters: usize, log: usize) {
    let _serial = EMULATED.lock().unwrap_or_else(|p| p.into_inner());
    let device = common::emulated();
    let dir = rc::tmp_dir(&format!("uploads_{iters}_{log}"));
    let (mut r, out) = runner(device, &dir, iters, log, |_| {});
    r.run(&[(Mode::Train, 1)]).unwrap();
    drop(r);
    let its = rc::take(&out);
    assert_eq!(its.len(), iters);
    for (i, it) in its.iter().enumerate() {
        eprintln!("iteration {} (log every {log}): {}", i + 1, it.counters);
    }
    for (i, it) in its.iter().enumerate().skip(WARM_UP) {
        steady_at(i + 1, log, iters, it.counters);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Logging every 3 over 4 iterations: iteration 2 logs nothing, 3 logs, 4 (the
/// last) reads what is left. Log every 2: the first test of this file.
#[test]
fn a_runner_step_uploads_only_images_and_targets_emulated() {
    check_steady_state(4, 3);
}

/// On the CPU the u8 path (the loader's pixels, `upload_u8` + `transform_uploaded`)
/// gives the f32 path's losses bit for bit: torchvision converts u8 to float then
/// normalises, as both do.
#[test]
fn u8_and_f32_batches_give_the_same_losses_cpu() {
    let mut losses = Vec::new();
    for b in [batch(), batch_f32()] {
        let mut m = DetectorModel::new(common::fixture_model(Device::Cpu), Device::Cpu);
        let mut rng = kestrel::rng::Rng::new(7);
        let l = m.train_step(&b, &mut rng).unwrap();
        losses.push(
            l.iter()
                .map(|(n, t)| (n.clone(), t.to_vec::<f32>().unwrap()[0]))
                .collect::<Vec<_>>(),
        );
    }
    assert_eq!(losses[0].len(), 4, "{:?}", losses[0]);
    for ((n, a), (_, b)) in losses[0].iter().zip(&losses[1]) {
        assert_eq!(a.to_bits(), b.to_bits(), "{n}: u8 path {a}, f32 path {b}");
    }
}
