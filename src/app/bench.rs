//! `kestrel bench`: stage timings of full-size ResNet-50-FPN Faster R-CNN (random
//! seeded weights, a synthetic image) in inference and, with `--train`, one training
//! step (forward, losses, backward, SGD). Prints ms per stage (median over the timed
//! iterations after a warm-up), images/s and peak memory; `--json` writes the same
//! numbers for scripts/bench_side_by_side.sh, which prints them beside torchvision's
//! (scripts/bench_torchvision.py prints the same table).
//!
//! `--plan` (emulated device only) runs the same passes in the emulator's plan mode
//! ([`crate::device::emu::set_plan_mode`]): kernels are checked and counted but not
//! computed, so the device memory and counters of R50-FPN at full size and batch 16
//! come in seconds instead of hours; the figures are those of a real run (plan mode
//! refuses any read-back that could make them differ; tests/emu_plan.rs compares
//! plans with real runs). Times are then meaningless and are not the point.

use std::path::PathBuf;

use super::profile::{
    detect_profiled, train_step_graphed_profiled, train_step_profiled, StageMemory, StageTimes,
    INFERENCE_STAGES, TRAINING_STAGES,
};
use crate::detection::graphed_train::{GraphedTrainer, GRAPHED_TRAINING_STAGES};
use crate::detection::transform::ImageU8;
use crate::detection::{FasterRcnn, FasterRcnnConfig, Target};
use crate::device::gpu::Counters;
use crate::device::op_memory::OpMemory;
use crate::nn::NormKind;
use crate::optim::{Sgd, SgdConfig};
use crate::rng::Rng;
use crate::{Device, Error, Result, Tensor};

/// Options of `kestrel bench` (the CLI's flags of the same names).
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// cpu, cuda, cuda:N, emu or auto.
    pub device: String,
    /// Images per batch; one column per entry.
    pub batch: Vec<usize>,
    /// Image size HxW in pixels (the transform keeps 800x1216 as it is).
    pub size: String,
    /// Timed iterations per configuration (the median is reported).
    pub iters: usize,
    /// Untimed warm-up iterations per configuration.
    pub warmup: usize,
    /// Also time one training step (forward, losses, backward, SGD step).
    pub train: bool,
    /// Skip inference (with `train`: time training only).
    pub no_infer: bool,
    /// With `train` on a device: also time the graphed training step
    /// ([`crate::detection::graphed_train`]), a `train-graph` column.
    pub graph: bool,
    /// Seed of the weights, the image and the targets.
    pub seed: u64,
    /// Also write the results as JSON to this file.
    pub json: Option<PathBuf>,
    /// The precisions to time, side by side (a column each).
    pub precision: Vec<crate::nn::Precision>,
    /// On the CPU, also print the per-layer conv vs square-GEMM table and an SGD
    /// step's time ([`super::bench_ops`]).
    pub ops: bool,
    /// `r50` (ResNet-50-FPN) or `small` (the demo's model: BasicBlock [1,1,1,1],
    /// FPN 32, 91 classes, images kept at the larger side of `size`).
    pub model: String,
    /// Emulated device only: run in plan mode (memory and counters, no compute).
    pub plan: bool,
    /// CPU: flush denormal floats to zero ([`crate::device::cpu::flush_denormals`]).
    pub flush_denormals: bool,
    /// Training: also print the last step's backward time by op
    /// ([`crate::autograd::set_op_timing`]).
    pub op_times: bool,
}

/// Timings of one configuration (mode and batch size).
struct Row {
    mode: &'static str,
    /// Whether the model ran in bf16 (the mode's `-bf16`).
    bf16: bool,
    batch: usize,
    /// Median ms per stage, in stage order.
    stages: Vec<(&'static str, f64)>,
    /// Median of the per-iteration totals, ms.
    total_ms: f64,
    /// Peak memory during this configuration, MiB (None where not tracked).
    peak_mib: Option<f64>,
    /// Device work per stage of the last timed iteration (zero on the CPU).
    counters: Vec<(&'static str, Counters)>,
    /// Device memory per stage of the last timed iteration (zero on the CPU).
    memory: Vec<(&'static str, StageMemory)>,
    /// Ops measured on their own within a stage (the NMS), last timed iteration:
    /// (stage, op's memory).
    op_memory: Vec<(&'static str, OpMemory)>,
}

/// Parse `800x1216` into (800, 1216).
fn parse_size(s: &str) -> Result<(usize, usize)> {
    let bad = || {
        Error::invalid(
            "bench",
            format!("--size `{s}`: expected HxW, e.g. 800x1216"),
        )
    };
    let (h, w) = s.split_once(['x', 'X']).ok_or_else(bad)?;
    let h: usize = h.trim().parse().map_err(|_| bad())?;
    let w: usize = w.trim().parse().map_err(|_| bad())?;
    if h == 0 || w == 0 {
        return Err(bad());
    }
    if h > MAX_BENCH_SIDE || w > MAX_BENCH_SIDE {
        return Err(Error::invalid(
            "bench",
            format!("--size `{s}`: each side at most {MAX_BENCH_SIDE} pixels"),
        ));
    }
    Ok((h, w))
}

/// Largest image side `bench` accepts, pixels: the synthetic images are made at this
/// size before the transform resizes them, and a side of 100000 would abort on
/// allocation.
pub const MAX_BENCH_SIDE: usize = 4096;
/// Largest batch `bench` accepts.
pub const MAX_BENCH_BATCH: usize = 32;

/// `n` images `[3, H, W]` of seeded uniform noise in 0..1 on `device`.
fn synthetic_images(
    n: usize,
    (h, w): (usize, usize),
    seed: u64,
    device: Device,
) -> Result<Vec<Tensor>> {
    let mut rng = Rng::new(seed);
    (0..n)
        .map(|_| {
            let v: Vec<f32> = (0..3 * h * w).map(|_| rng.uniform() as f32).collect();
            Tensor::from_vec(v, [3, h, w])?.to_device(device)
        })
        .collect()
}

/// Four seeded boxes per image (sides 32..400 px) with labels in 1..=90.
fn synthetic_targets(n: usize, (h, w): (usize, usize), seed: u64) -> Vec<Target> {
    let mut rng = Rng::new(seed ^ 0x7a11);
    (0..n)
        .map(|_| {
            let mut t = Target::default();
            for _ in 0..4 {
                let bw = rng.range(32.0, 400.0_f64.min(w as f64 - 1.0));
                let bh = rng.range(32.0, 400.0_f64.min(h as f64 - 1.0));
                let x1 = rng.range(0.0, w as f64 - bw);
                let y1 = rng.range(0.0, h as f64 - bh);
                t.boxes.push([x1, y1, x1 + bw, y1 + bh].map(|v| v as f32));
                t.labels.push(1 + rng.below(90) as i64);
            }
            t
        })
        .collect()
}

/// Reset the kernel's peak-RSS counter (VmHWM) so each configuration reports its own
/// peak; returns false where that is not possible (not Linux). The host buffer pool
/// is emptied first: buffers pooled by the previous configuration would otherwise
/// count in this one's peak.
fn reset_peak_rss() -> bool {
    crate::tensor::pool::clear();
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// Peak resident set size since the last reset, MiB (VmHWM of /proc/self/status).
fn peak_rss_mib() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// The host pool's counters of a configuration (to stderr), then reset: after the
/// warm-up a pass should miss nothing.
fn pool_note(label: &str) {
    let s = crate::tensor::pool::stats();
    eprintln!(
        "  {label}: host pool {} hits, {} misses, {} evictions over warm-up + timed passes, \
         {:.0} MiB pooled, peak {:.0} MiB handed out, {:.0} MiB handed out + pooled",
        s.hits,
        s.misses,
        s.evictions,
        mib(s.pooled_bytes),
        mib(s.live_peak_bytes),
        mib(s.footprint_peak_bytes)
    );
    crate::tensor::pool::reset_stats();
}

fn mib(bytes: usize) -> f64 {
    bytes as f64 / (1 << 20) as f64
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Median per stage and of the totals over `runs`, in ms.
fn summarize(mode: &'static str, batch: usize, runs: &[StageTimes], peak: Option<f64>) -> Row {
    let names: Vec<&'static str> = runs
        .first()
        .map(|r| r.0.iter().map(|s| s.0).collect())
        .unwrap_or_default();
    let stages = names
        .iter()
        .enumerate()
        .map(|(i, &n)| (n, median(runs.iter().map(|r| r.0[i].1 * 1e3).collect())))
        .collect();
    Row {
        mode,
        bf16: mode.ends_with("-bf16"),
        batch,
        stages,
        total_ms: median(runs.iter().map(|r| r.total() * 1e3).collect()),
        peak_mib: peak,
        counters: runs.last().map(|r| r.1.clone()).unwrap_or_default(),
        memory: runs.last().map(|r| r.2.clone()).unwrap_or_default(),
        op_memory: runs.last().map(|r| r.3.clone()).unwrap_or_default(),
    }
}

/// Run `f` `warmup` times untimed, then `iters` times, printing progress to stderr.
fn repeat(
    label: &str,
    warmup: usize,
    iters: usize,
    mut f: impl FnMut() -> Result<StageTimes>,
) -> Result<Vec<StageTimes>> {
    let mut runs = Vec::with_capacity(iters);
    for i in 0..warmup + iters {
        let t = f()?;
        let kind = if i < warmup { "warm-up" } else { "timed" };
        eprintln!("  {label} {kind} {}: {:.0} ms", i + 1, t.total() * 1e3);
        if i >= warmup {
            runs.push(t);
        }
    }
    Ok(runs)
}

/// `kestrel bench`.
pub fn run(a: &BenchOptions) -> Result<()> {
    let device = Device::parse(&a.device)?;
    let size = parse_size(&a.size)?;
    if a.plan {
        if device != Device::Cuda(crate::device::emu::EMU_ORDINAL) {
            return Err(Error::invalid(
                "bench",
                format!("--plan needs --device emu (the emulator's plan mode), not {device}"),
            ));
        }
        if a.ops {
            return Err(Error::invalid(
                "bench",
                "--plan with --ops: --ops times the CPU",
            ));
        }
        // This thread runs every pass of the bench.
        crate::device::emu::set_plan_mode(true);
    }
    if a.flush_denormals {
        crate::device::cpu::flush_denormals()?;
        eprintln!("denormal floats flushed to zero on the CPU (--flush-denormals)");
    }
    if let Some(b) = a.batch.iter().find(|&&b| b > MAX_BENCH_BATCH) {
        return Err(Error::invalid(
            "bench",
            format!("--batch {b}: at most {MAX_BENCH_BATCH} images"),
        ));
    }
    if a.iters == 0 || a.batch.is_empty() || a.batch.contains(&0) {
        return Err(Error::invalid(
            "bench",
            "--iters and every --batch must be at least 1",
        ));
    }
    if a.graph && (!a.train || !device.is_cuda() || a.plan) {
        return Err(Error::invalid(
            "bench",
            "--graph needs --train on a CUDA or emulated device, without --plan",
        ));
    }
    if a.no_infer && !a.train && !a.ops {
        return Err(Error::invalid(
            "bench",
            "--no-infer without --train or --ops times nothing",
        ));
    }
    let cfg = match a.model.as_str() {
        "r50" => FasterRcnnConfig::resnet50_fpn(91, 0.0)?,
        "small" => super::train::small_config(91, size.0.max(size.1)),
        m => {
            return Err(Error::invalid(
                "bench",
                format!("--model {m}: r50 or small"),
            ))
        }
    };
    let mut model = FasterRcnn::new(cfg, a.seed)?;
    model.to_device(device)?;
    let max_batch = *a.batch.iter().max().expect("checked non-empty");
    let images = synthetic_images(max_batch, size, a.seed, device)?;
    let targets = synthetic_targets(max_batch, size, a.seed);
    let tracks_rss = !device.is_cuda() && reset_peak_rss();
    eprintln!(
        "kestrel bench: {} trainable parameters, device {device}",
        model.params.num_trainable()
    );

    let mut rows = Vec::new();
    // On a device: the caching allocator's peak (bytes in use, as PyTorch's
    // max_memory_allocated); on the CPU: the process's peak RSS.
    let peak = |tracks: bool, runs: &[StageTimes]| {
        if device.is_cuda() {
            // The profiler restarts the device's peak at every stage cut.
            let p = runs
                .iter()
                .map(StageTimes::peak_allocated)
                .max()
                .unwrap_or(0);
            Some(p as f64 / (1024.0 * 1024.0))
        } else if tracks {
            peak_rss_mib()
        } else {
            None
        }
    };
    let precisions = if a.precision.is_empty() {
        vec![crate::nn::Precision::F32]
    } else {
        a.precision.clone()
    };
    for &precision in &precisions {
        model.set_precision(precision);
        let bf16 = precision.is_bf16();
        rows.extend(bench_precision(
            a,
            &mut model,
            (&images, &targets),
            bf16,
            &peak,
            tracks_rss,
        )?);
    }
    // f32 and bf16 of one configuration side by side (a column each, then bf16's
    // ratio to f32), not all of f32 then all of bf16.
    let kind = |r: &Row| usize::from(r.mode.starts_with("train"));
    rows.sort_by_key(|r| (kind(r), r.batch, r.bf16));
    print_results(a, device, size, tracks_rss, &rows)?;
    if a.ops && !device.is_cuda() {
        super::bench_ops::sgd_time(&model, a.iters.max(3))?;
        super::bench_ops::conv_table(a.iters.max(3))?;
        if a.train {
            super::bench_ops::conv_backward_table(a.iters.max(3))?;
        }
    }
    Ok(())
}

/// The inference and training columns of one precision.
fn bench_precision(
    a: &BenchOptions,
    model: &mut FasterRcnn,
    (images, targets): (&[Tensor], &[Target]),
    bf16: bool,
    peak: &dyn Fn(bool, &[StageTimes]) -> Option<f64>,
    tracks_rss: bool,
) -> Result<Vec<Row>> {
    let device = model_device_of(model);
    let mut rows = Vec::new();
    let (infer_mode, train_mode) = if bf16 {
        ("infer-bf16", "train-bf16")
    } else {
        ("infer", "train")
    };
    if !a.no_infer {
        for &b in &a.batch {
            reset_peak_rss();
            device.reset_peak_memory();
            let label = format!("infer b{b}");
            let runs = repeat(&label, a.warmup, a.iters, || {
                Ok(detect_profiled(model, &images[..b])?.1)
            })?;
            rows.push(summarize(infer_mode, b, &runs, peak(tracks_rss, &runs)));
            pool_note(&label);
        }
    }
    if a.train {
        let mut sgd = bench_sgd()?;
        let mut rng = Rng::new(a.seed);
        for &b in &a.batch {
            reset_peak_rss();
            device.reset_peak_memory();
            let label = format!("train b{b}");
            crate::autograd::set_op_timing(a.op_times);
            let mut op_times = Vec::new();
            let runs = repeat(&label, a.warmup, a.iters, || {
                crate::autograd::take_op_times();
                let (loss, t) =
                    train_step_profiled(model, &images[..b], &targets[..b], &mut sgd, &mut rng)?;
                op_times = crate::autograd::take_op_times();
                if !loss.is_finite() && !a.plan {
                    eprintln!("  (loss is {loss}: timings still stand)");
                }
                Ok(t)
            })?;
            crate::autograd::set_op_timing(false);
            if a.op_times {
                print_op_times(&label, &op_times);
            }
            rows.push(summarize(train_mode, b, &runs, peak(tracks_rss, &runs)));
            pool_note(&label);
        }
    }
    if a.train && a.graph && !bf16 {
        rows.extend(bench_graphed(a, model, targets, peak)?);
    }
    Ok(rows)
}

/// The `train-graph` columns: [`GraphedTrainer`] steps on u8 noise images of the
/// bench's size (the graphs are captured per batch size).
fn bench_graphed(
    a: &BenchOptions,
    model: &mut FasterRcnn,
    targets: &[Target],
    peak: &dyn Fn(bool, &[StageTimes]) -> Option<f64>,
) -> Result<Vec<Row>> {
    let size = parse_size(&a.size)?;
    let mut rng = Rng::new(a.seed ^ 0x9a7);
    let pixels: Vec<Vec<u8>> = (0..targets.len())
        .map(|_| {
            (0..3 * size.0 * size.1)
                .map(|_| rng.below(256) as u8)
                .collect()
        })
        .collect();
    let views: Vec<ImageU8> = pixels
        .iter()
        .map(|d| ImageU8 {
            data: d,
            height: size.0,
            width: size.1,
        })
        .collect();
    let mut sgd = bench_sgd()?;
    // The graphs need frozen BatchNorm (no running statistics): the small model's
    // trainable BatchNorm is replaced by frozen BatchNorm, same seed, for this column.
    let mut frozen;
    let model: &mut FasterRcnn = match model.config.backbone.norm {
        NormKind::Frozen { .. } | NormKind::FrozenStats { .. } => model,
        NormKind::Batch { eps, .. } | NormKind::SyncBatch { eps, .. } => {
            let mut cfg = model.config.clone();
            cfg.backbone.norm = NormKind::Frozen { eps };
            eprintln!("  train-graph: the model's BatchNorm frozen (graphs need fixed statistics)");
            frozen = FasterRcnn::new(cfg, a.seed)?;
            frozen.to_device(model_device_of(model))?;
            &mut frozen
        }
    };
    let mut rows = Vec::new();
    for &b in &a.batch {
        let device = model_device_of(model);
        device.reset_peak_memory();
        let label = format!("train-graph b{b}");
        let mut trainer = GraphedTrainer::new(model, &views[..b], &targets[..b])?;
        let s = trainer.sizes();
        eprintln!(
            "  {label}: graph A {} nodes, graph B {} nodes, {} seed copies, {} gradients in place",
            s.forward_nodes, s.backward_nodes, s.seeds, s.fixed_grads
        );
        let runs = repeat(&label, a.warmup, a.iters, || {
            let (loss, t) = train_step_graphed_profiled(
                &mut trainer,
                model,
                &views[..b],
                &targets[..b],
                &mut sgd,
                &mut rng,
            )?;
            if !loss.is_finite() {
                eprintln!("  (loss is {loss}: timings still stand)");
            }
            Ok(t)
        })?;
        rows.push(summarize("train-graph", b, &runs, peak(false, &runs)));
        pool_note(&label);
    }
    Ok(rows)
}

/// The last step's backward by op, slowest first (to stderr, beside the progress).
fn print_op_times(label: &str, times: &[(&'static str, usize, f64)]) {
    let mut v = times.to_vec();
    v.sort_by(|a, b| b.2.total_cmp(&a.2));
    let total: f64 = v.iter().filter(|e| !e.0.contains('.')).map(|e| e.2).sum();
    eprintln!("{label} backward by op (last step; `op.part` rows are inside their op's row):");
    for (op, calls, s) in v {
        eprintln!("  {op:<24} {calls:>5} calls {:>9.1} ms", s * 1e3);
    }
    eprintln!("  {:<24} {:>15.1} ms", "sum of ops", total * 1e3);
}

fn model_device_of(m: &FasterRcnn) -> Device {
    m.params
        .iter()
        .next()
        .map(|(_, t)| t.device())
        .unwrap_or(Device::Cpu)
}

fn print_results(
    a: &BenchOptions,
    device: Device,
    size: (usize, usize),
    tracks_rss: bool,
    rows: &[Row],
) -> Result<()> {
    let memory_note = if a.plan {
        "plan mode (emulated device, kernels checked and counted but not run): times are not kernel times; \
         peak memory: the caching allocator's peak of bytes in use, exact (tests/emu_plan.rs)"
    } else if device.is_cuda() {
        "peak memory: the caching allocator's peak of bytes in use (blocks lent to tensors), reset per column"
    } else if tracks_rss {
        "peak memory: peak RSS of the process (VmHWM, reset per column)"
    } else {
        "peak memory: peak RSS of the process (VmHWM, since start)"
    };
    println!(
        "kestrel bench: {} (random weights, seed {}), input {}x{}, device {device} ({} CPU threads), warm-up {}, median of {}",
        match a.model.as_str() {
            "small" => "the demo's small ResNet-FPN Faster R-CNN",
            _ => "fasterrcnn_resnet50_fpn",
        },
        a.seed,
        size.0,
        size.1,
        rayon::current_num_threads(),
        a.warmup,
        a.iters
    );
    print_table(rows);
    println!("{memory_note}");
    if device.is_cuda() {
        print_counters(rows);
        print_stage_memory(rows);
    }
    if let Some(path) = &a.json {
        write_json(path, device, size, a, rows)?;
    }
    Ok(())
}

/// The table scripts/bench_torchvision.py also prints: a row per stage, a column per
/// configuration. A bf16 column that follows its f32 twin (same mode and batch) is
/// followed by a `bf16/f32` column: each row's bf16 value over its f32 value (ms
/// and MiB below 1, images/s above 1: bf16 is the better).
fn print_table(rows: &[Row]) {
    let mut stages: Vec<&str> = Vec::new();
    for s in INFERENCE_STAGES
        .iter()
        .chain(TRAINING_STAGES.iter())
        .chain(GRAPHED_TRAINING_STAGES.iter())
    {
        if !stages.contains(s) && rows.iter().any(|r| r.stages.iter().any(|x| x.0 == *s)) {
            stages.push(s);
        }
    }
    // Each column: a row, and the f32 twin it is compared with (for a ratio column).
    let mut cols: Vec<(&Row, Option<&Row>)> = Vec::new();
    for (i, r) in rows.iter().enumerate() {
        cols.push((r, None));
        let twin = i
            .checked_sub(1)
            .map(|j| &rows[j])
            .filter(|p| r.bf16 && !p.bf16 && p.batch == r.batch && r.mode.starts_with(p.mode));
        if let Some(p) = twin {
            cols.push((r, Some(p)));
        }
    }
    let ratio = |v: Option<f64>, base: Option<f64>| match (v, base) {
        (Some(v), Some(b)) if b > 0.0 => format!("{:>12.2}", v / b),
        _ => format!("{:>12}", "-"),
    };
    let stage_ms = |r: &Row, s: &str| r.stages.iter().find(|x| x.0 == s).map(|x| x.1);
    let line = |label: &str, value: &dyn Fn(&Row) -> Option<f64>, fmt: &dyn Fn(f64) -> String| {
        print!("{label:<14}");
        for (r, twin) in &cols {
            match twin {
                Some(p) => print!(" {}", ratio(value(r), value(p))),
                None => match value(r) {
                    Some(v) => print!(" {}", fmt(v)),
                    None => print!(" {:>12}", "-"),
                },
            }
        }
        println!();
    };
    print!("{:<14}", "ms");
    for (r, twin) in &cols {
        let head = match twin {
            Some(_) => "bf16/f32".to_string(),
            None => format!("{} b{}", r.mode, r.batch),
        };
        print!(" {head:>12}");
    }
    println!();
    let ms = |v: f64| format!("{v:>12.1}");
    for s in &stages {
        line(s, &|r| stage_ms(r, s), &ms);
    }
    line("total", &|r| Some(r.total_ms), &ms);
    line(
        "images/s",
        &|r| Some(r.batch as f64 * 1e3 / r.total_ms),
        &|v| format!("{v:>12.3}"),
    );
    line("peak MiB", &|r| r.peak_mib, &|m| format!("{m:>12.0}"));
}

/// Device work per stage and per step (last timed iteration): launches, driver
/// allocations, memsets, copies each way and synchronisations.
fn print_counters(rows: &[Row]) {
    println!("device work per stage (last timed iteration; the profiler's own syncs not counted):");
    for r in rows {
        println!("  {} b{}:", r.mode, r.batch);
        println!(
            "    {:<12} {:>9} {:>12} {:>8} {:>6} {:>6} {:>6} {:>6}",
            "stage", "launches", "drv allocs", "memsets", "htod", "dtoh", "dtod", "syncs"
        );
        let mut total = Counters::default();
        let line = |name: &str, c: &Counters| {
            println!(
                "    {:<12} {:>9} {:>12} {:>8} {:>6} {:>6} {:>6} {:>6}",
                name, c.launches, c.driver_allocs, c.memsets, c.htod, c.dtoh, c.dtod, c.syncs
            )
        };
        for (name, c) in &r.counters {
            line(name, c);
            total = total.plus(c);
        }
        line("step", &total);
    }
}

/// Device memory per stage (last timed iteration): bytes in use before the stage,
/// its peak, and what the stage added over what was live before it.
fn print_stage_memory(rows: &[Row]) {
    println!(
        "device memory per stage, MiB (last timed iteration; added = stage peak - live before it):"
    );
    for r in rows {
        println!("  {} b{}:", r.mode, r.batch);
        println!(
            "    {:<12} {:>12} {:>12} {:>12} {:>12}",
            "stage", "live before", "peak", "added", "live after"
        );
        for (name, m) in &r.memory {
            println!(
                "    {:<12} {:>12.1} {:>12.1} {:>12.1} {:>12.1}",
                name,
                mib(m.before as usize),
                mib(m.peak as usize),
                mib(m.added() as usize),
                mib(m.after as usize)
            );
            // The stage's ops measured on their own: what each added over what was
            // live when it began (scratch and outputs).
            for (_, o) in r.op_memory.iter().filter(|(s, _)| s == name) {
                println!(
                    "      {:<10} {:>12.1} {:>12.1} {:>12.1} {:>12.1}",
                    o.op,
                    mib(o.before as usize),
                    mib(o.peak as usize),
                    mib(o.added() as usize),
                    mib(o.after as usize)
                );
            }
        }
    }
}

fn write_json(
    path: &std::path::Path,
    device: Device,
    size: (usize, usize),
    a: &BenchOptions,
    rows: &[Row],
) -> Result<()> {
    use serde_json::json;
    let results: Vec<serde_json::Value> = rows
        .iter()
        .map(|r| {
            let stages: serde_json::Map<String, serde_json::Value> = r
                .stages
                .iter()
                .map(|(n, ms)| (n.to_string(), json!(ms)))
                .collect();
            json!({
                "mode": r.mode,
                "batch": r.batch,
                "stages_ms": stages,
                "total_ms": r.total_ms,
                "images_per_s": r.batch as f64 * 1e3 / r.total_ms,
                "peak_mib": r.peak_mib,
                "memory": r.memory.iter().map(|(n, m)| json!({
                    "stage": n,
                    "before_bytes": m.before,
                    "peak_bytes": m.peak,
                    "added_bytes": m.added(),
                    "after_bytes": m.after,
                })).collect::<Vec<_>>(),
                "op_memory": r.op_memory.iter().map(|(s, o)| json!({
                    "stage": s,
                    "op": o.op,
                    "before_bytes": o.before,
                    "peak_bytes": o.peak,
                    "added_bytes": o.added(),
                    "after_bytes": o.after,
                })).collect::<Vec<_>>(),
                "counters": r.counters.iter().map(|(n, c)| json!({
                    "stage": n,
                    "launches": c.launches,
                    "driver_allocs": c.driver_allocs,
                    "driver_alloc_bytes": c.driver_alloc_bytes,
                    "driver_frees": c.driver_frees,
                    "cached_allocs": c.cached_allocs,
                    "memsets": c.memsets,
                    "htod": c.htod,
                    "dtoh": c.dtoh,
                    "dtod": c.dtod,
                    "syncs": c.syncs,
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    let doc = json!({
        "impl": "kestrel",
        "device": device.to_string(),
        "threads": rayon::current_num_threads(),
        "size": [size.0, size.1],
        "warmup": a.warmup,
        "iters": a.iters,
        "plan": a.plan,
        "results": results,
    });
    let text = serde_json::to_string_pretty(&doc).expect("numbers serialise");
    std::fs::write(path, text).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// torchvision's reference recipe (momentum 0.9, weight decay 1e-4) at a small
/// learning rate (1e-4), which keeps random weights finite over the timed steps.
pub(crate) fn bench_sgd() -> Result<Sgd> {
    Sgd::new(SgdConfig {
        lr: 1e-4,
        momentum: 0.9,
        weight_decay: 1e-4,
        ..SgdConfig::default()
    })
}
