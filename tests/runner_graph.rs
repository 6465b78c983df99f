//! The Runner trains through captured graphs (issue 14 item 7, `runtime.graph`): a
//! real [`Runner`] over [`DetectorModel::with_graphs`] on the emulated device, the
//! fixture model at batch 2, two batches of the same sizes in turn. Its losses and
//! every weight equal an eager Runner's bit for bit; after warm-up an iteration
//! replays the two graphs, takes nothing from the driver, never synchronises,
//! uploads the images (pinned) and the targets, reads nothing back unless it logs
//! (then once), and launches far fewer kernels than the eager iteration; a graphed
//! run stopped and resumed equals the uninterrupted one. What the graphs cannot do
//! is refused (gradient accumulation) or trains eagerly with a log line (the CPU).

mod common;

use common::runner_counters as rc;
use kestrel::app::model::{DetBatch, DetectorModel};
use kestrel::runner::{hooks, Hook, Mode, Model, Runner, Schedule};
use kestrel::Device;

/// The emulated tests of this file run one at a time: they count the device's
/// allocations, and a run beside them would take the blocks their cache holds.
static EMULATED: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Iterations the counters skip: the first, which captures (from the second on,
/// every iteration is a replay that takes nothing from the driver).
const WARM_UP: usize = 1;

/// The iteration after which the graphed run's state is saved for the resume: the
/// capturing one (the save's read-backs change the cache, which the next, warm-up
/// iteration absorbs).
const STOP: usize = 1;

/// The fixture batch and a copy with other pixels (same sizes, same targets).
fn batches() -> Vec<DetBatch> {
    let a = rc::fixture_batch();
    let b = rc::batch_of(common::perturbed_pixels(&a.pixels, 5), a.targets.clone());
    vec![a, b]
}

/// A runner over the fixture model on `device`: the recipe SGD, the optimizer hook,
/// a logger every `log` iterations (no progress bar), graphs when `graph`, and the
/// counting hooks (reading each step's values when `values`).
fn runner(
    device: Device,
    dir: &std::path::Path,
    iters: usize,
    log: usize,
    graph: bool,
    values: bool,
) -> (Runner<DetectorModel>, rc::IterationLog) {
    // Half the fixture's image sides (min_size 160 instead of 320): the dense part,
    // most of each step, costs a quarter; what is compared does not need full size.
    let mut m = common::fixture_model(device);
    m.config.transform.min_size /= 2;
    m.config.transform.max_size /= 2;
    let model = DetectorModel::new(m, device).with_graphs(graph);
    let mut r = Runner::new(
        model,
        Box::new(common::recipe_sgd()),
        dir,
        Schedule::Iters(iters),
        0,
    );
    r.log.quiet = true;
    r.set_train_loader(Box::new(rc::Cycle::new(batches(), iters)));
    let mut logger = hooks::LoggerHook::new(log);
    logger.progress_bar = false;
    r.register_hook(hooks::OptimizerHook::new());
    r.register_hook(logger);
    let counted = rc::count_iterations(&mut r, device, values);
    (r, counted)
}

fn weight_bits(r: &Runner<DetectorModel>) -> Vec<(String, Vec<u32>)> {
    r.model
        .params()
        .into_iter()
        .map(|(n, t)| (n, bits(&t)))
        .collect()
}

use common::bits;

fn assert_same_weights(what: &str, got: &[(String, Vec<u32>)], want: &[(String, Vec<u32>)]) {
    assert_eq!(got.len(), want.len(), "{what}: parameter count");
    for ((gn, g), (wn, w)) in got.iter().zip(want) {
        assert_eq!(gn, wn);
        if let Some(i) = (0..g.len()).find(|&i| g[i] != w[i]) {
            panic!(
                "{what}: {gn}[{i}] differs: {} vs {}",
                f32::from_bits(g[i]),
                f32::from_bits(w[i])
            );
        }
    }
}

fn log_text(dir: &std::path::Path) -> String {
    std::fs::read_to_string(dir.join("log.txt")).unwrap()
}

/// Saves a checkpoint (optimizer state included) after iteration `at` (1-based), as
/// the checkpoint hook would: the state of a run stopped there.
struct SaveAt {
    at: usize,
    path: std::path::PathBuf,
}

impl<M: Model> Hook<M> for SaveAt {
    fn after_train_iter(&mut self, r: &mut Runner<M>) -> kestrel::Result<()> {
        if r.iter() + 1 == self.at {
            r.save_checkpoint(&self.path, true)?;
        }
        Ok(())
    }
}

/// A graphed and an eager Runner, same seed, five iterations over batches a, b, a,
/// b, a, logging every 3: every step's losses and total, the logged values and every
/// weight after the run are equal bit for bit (the replays read the new pixels:
/// a's and b's losses differ). The graphed run captured once (one geometry) and
/// said so in its log. Per iteration after warm-up the graphed one replays the two
/// graphs, takes nothing from the driver, never synchronises, uploads the images
/// pinned and the targets, reads nothing back on non-logging iterations and once
/// on logging ones, and launches under a third of the eager iteration's kernels.
/// Last, a graphed Runner resumed from the graphed run's state after iteration 1
/// (saved by a hook) captures its own graphs over the loaded weights and ends with
/// the uninterrupted run's weights bit for bit. (One test, as the three runs share
/// the device's cache; at half the fixture's image sides, ~75 s in the test
/// profile on an idle 2-core machine.)
#[test]
fn a_graphed_runner_trains_as_the_eager_one_bit_for_bit_only_uploads_and_resumes_emulated() {
    let _serial = EMULATED.lock().unwrap_or_else(|p| p.into_inner());
    const ITERS: usize = 4;
    const LOG: usize = 3;
    let device = common::emulated();
    let stop = rc::tmp_dir("runner_graph_stop").join("iter_1.safetensors");
    std::fs::create_dir_all(stop.parent().unwrap()).unwrap();
    let mut runs = Vec::new();
    for graph in [false, true] {
        let dir = rc::tmp_dir(&format!("runner_graph_{graph}"));
        let (mut r, counted) = runner(device, &dir, ITERS, LOG, graph, true);
        if graph {
            r.register_hook(SaveAt {
                at: STOP,
                path: stop.clone(),
            });
        }
        r.run(&[(Mode::Train, 1)]).unwrap();
        assert_eq!(r.model.captured_geometries(), usize::from(graph));
        let w = weight_bits(&r);
        let text = log_text(&dir);
        drop(r);
        let its = rc::take(&counted);
        assert_eq!(its.len(), ITERS);
        for (i, it) in its.iter().enumerate() {
            eprintln!(
                "iteration {} ({}, log every {LOG}): {}",
                i + 1,
                if graph { "graphed" } else { "eager" },
                it.counters
            );
        }
        let captures = text.matches("runtime.graph: capturing").count();
        assert_eq!(captures, usize::from(graph), "{text}");
        runs.push((its, w));
        let _ = std::fs::remove_dir_all(&dir);
    }
    let (eager, graphed) = (&runs[0], &runs[1]);
    for (k, (e, g)) in eager.0.iter().zip(&graphed.0).enumerate() {
        assert_eq!(e.value_bits.len(), 5, "four losses and the total");
        assert_eq!(
            g.value_bits,
            e.value_bits,
            "iteration {}: graphed vs eager values",
            k + 1
        );
        assert_eq!(g.log_vars.len(), e.log_vars.len());
        for ((gn, gv), (en, ev)) in g.log_vars.iter().zip(&e.log_vars) {
            assert_eq!(
                (gn, gv.to_bits()),
                (en, ev.to_bits()),
                "iteration {}",
                k + 1
            );
        }
    }
    assert_ne!(
        eager.0[0].value_bits, eager.0[1].value_bits,
        "batches a and b give different losses"
    );
    assert_same_weights("graphed vs eager after the run", &graphed.1, &eager.1);

    for (i, it) in graphed.0.iter().enumerate().skip(WARM_UP) {
        let n = i + 1;
        let c = it.counters;
        assert_eq!(c.graph_replays, 2, "iteration {n}: graphs A and B: {c}");
        assert_eq!(c.driver_allocs, 0, "iteration {n}: {c}");
        assert_eq!(c.syncs, 0, "iteration {n}: {c}");
        assert_eq!((c.htod, c.htod_pinned), (2, 1), "iteration {n}: {c}");
        let reads = u64::from(n % LOG == 0 || n == ITERS);
        assert_eq!(c.dtoh, reads, "iteration {n}: {c}");
        let e = eager.0[i].counters;
        assert!(
            c.launches * 3 < e.launches,
            "iteration {n}: graphed {c}\neager {e}"
        );
    }

    let rdir = rc::tmp_dir("runner_graph_resumed");
    let (mut r, counted) = runner(device, &rdir, ITERS, LOG, true, false);
    r.resume(&stop).unwrap();
    assert_eq!(r.iter(), STOP);
    r.run(&[(Mode::Train, 1)]).unwrap();
    assert_eq!(rc::take(&counted).len(), ITERS - STOP);
    assert_eq!(r.model.captured_geometries(), 1);
    assert_same_weights(
        "resumed graphed vs uninterrupted graphed",
        &weight_bits(&r),
        &graphed.1,
    );
    drop(r);
    let _ = std::fs::remove_dir_all(&rdir);
    let _ = std::fs::remove_dir_all(stop.parent().unwrap());
}

/// Gradient accumulation scales each step's loss before its backward, which a
/// graphed step cannot: the run is refused before its first step, naming the
/// hook's setting. A CPU model asked for graphs trains eagerly and logs why, once
/// (no step is run: the model declines before any work).
#[test]
fn what_graphs_cannot_run_is_refused_or_logged() {
    let _serial = EMULATED.lock().unwrap_or_else(|p| p.into_inner());
    let device = common::emulated();
    let dir = rc::tmp_dir("runner_graph_accumulate");
    let model = DetectorModel::new(common::fixture_model(device), device).with_graphs(true);
    let mut r = Runner::new(
        model,
        Box::new(common::recipe_sgd()),
        &dir,
        Schedule::Iters(2),
        0,
    );
    r.log.quiet = true;
    r.set_train_loader(Box::new(rc::Cycle::new(batches(), 2)));
    r.register_hook(hooks::OptimizerHook::new().with_cumulative_iters(2));
    let err = r.run(&[(Mode::Train, 1)]).unwrap_err().to_string();
    assert!(
        err.contains("cumulative_iters 2") && err.contains("graph"),
        "{err}"
    );
    assert_eq!(r.iter(), 0, "no step ran");
    drop(r);
    let _ = std::fs::remove_dir_all(&dir);

    // On the CPU the model asks for no step of its own: the runner trains eagerly.
    let mut cpu =
        DetectorModel::new(common::fixture_model(Device::Cpu), Device::Cpu).with_graphs(true);
    assert!(!cpu.trains_through_graphs());
    let mut lines = Vec::new();
    let mut rng = kestrel::rng::Rng::new(0);
    for _ in 0..2 {
        let step = cpu
            .graphed_train_step(&batches()[0], &mut rng, &mut |l| lines.push(l.to_string()))
            .unwrap();
        assert!(step.is_none(), "the CPU trains eagerly");
    }
    assert_eq!(lines.len(), 1, "said once: {lines:?}");
    assert!(
        lines[0].contains("runtime.graph: training eagerly: the CPU has no graphs"),
        "{lines:?}"
    );
    assert_eq!(cpu.captured_geometries(), 0);
}
