//! The bodies of the CLI commands: `demo`, `train`, `eval`, `infer`, `coco-eval`,
//! `shapes`, `devices` (`bench` is [`super::bench::run`], `kernels` and
//! `kernel-check` are in [`super::kernel_check`]). Each prints its progress and
//! results; the binary parses arguments and calls these.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use super::eval::detect_dataset;
use super::train::{config_datasets, config_runner, load_weights, small_config};
use super::ShapesRun;
use crate::config::{Config, DatasetKind};
use crate::detection::draw::save_detections_png;
use crate::detection::{FasterRcnn, FasterRcnnConfig};
use crate::eval::{evaluate, evaluate_with, write_results, DetBox};
use crate::nn::Precision;
use crate::runner::{prepare_work_dir, Mode, WorkDirPolicy};
use crate::{Device, Error, Result};

/// Iterations of the demo on a CPU, sized to finish in about 10 minutes on 2 cores.
const DEMO_ITERS_CPU: usize = 1800;
/// Iterations of the demo on a GPU.
const DEMO_ITERS_GPU: usize = 3000;

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn device(s: &str) -> Result<Device> {
    let d = Device::parse(s)?;
    println!(
        "device: {}",
        match d {
            Device::Cpu => format!("cpu ({} threads)", rayon::current_num_threads()),
            Device::Cuda(n) => format!("cuda:{n}"),
        }
    );
    Ok(d)
}

/// Flush denormal floats to zero on the CPU when `on` (`--flush-denormals`, or
/// `[runtime] flush_denormals`; see [`crate::device::cpu::flush_denormals`]), saying
/// so. Call it before any CPU work starts: it sets the calling thread and rayon's
/// pool.
pub(crate) fn flush_denormals_if(on: bool) -> Result<()> {
    if on {
        crate::device::cpu::flush_denormals()?;
        println!("denormal floats flushed to zero on the CPU");
    }
    Ok(())
}

/// `kestrel demo`.
pub fn demo(
    out: &Path,
    device_name: &str,
    iters: Option<usize>,
    precision: Precision,
    flush_denormals: bool,
) -> Result<()> {
    let t0 = Instant::now();
    let dev = device(device_name)?;
    flush_denormals_if(flush_denormals)?;
    let iters = iters.unwrap_or(if dev.is_cuda() {
        DEMO_ITERS_GPU
    } else {
        DEMO_ITERS_CPU
    });
    std::fs::create_dir_all(out).map_err(io(out))?;
    let work_dir = out.join("work_dir");
    // A fresh run every time: an old `latest` would make the schedule look finished.
    // Lock first: another demo writing into the same folder must not lose its files.
    let lock = prepare_work_dir(&work_dir, WorkDirPolicy::Overwrite)?;
    let mut run = ShapesRun::demo(&work_dir, dev, iters);
    run.precision = precision;
    println!("precision: {precision}");

    println!(
        "[1/4] generating {} training and {} validation shape images ({}x{})...",
        run.train_count, run.val_count, run.image_size, run.image_size
    );
    let (train, val) = run.datasets()?;
    let val_json = out.join("val_annotations.json");
    val.coco.write(&val_json)?;
    println!("      {:.1} s", t0.elapsed().as_secs_f64());

    println!(
        "[2/4] training a ResNet-FPN Faster R-CNN (BasicBlock [1,1,1,1], trainable BN, FPN 32) \
         for {iters} iterations of {} images...",
        run.batch_size
    );
    let mut cfg = Config {
        model: small_config(4, run.image_size),
        ..Config::default()
    };
    cfg.data.dataset = DatasetKind::Shapes;
    cfg.data.batch_size = run.batch_size;
    cfg.schedule.max = crate::runner::Schedule::Iters(iters);
    cfg.schedule.warmup_iters = run.warmup_iters;
    cfg.schedule.steps = run.steps.clone();
    cfg.runtime.work_dir = work_dir.clone();
    cfg.runtime.precision = precision;
    cfg.runtime.flush_denormals = flush_denormals;
    std::fs::create_dir_all(&work_dir).map_err(io(&work_dir))?;
    std::fs::write(work_dir.join("config.toml"), cfg.to_toml_string()?).map_err(io(&work_dir))?;
    let t_train = Instant::now();
    let mut runner = run.runner(Arc::new(train))?;
    runner.hold_work_dir_lock(lock);
    runner.run(&[(Mode::Train, 1)])?;
    let train_s = t_train.elapsed().as_secs_f64();
    println!(
        "      {:.1} s ({:.3} s per iteration)",
        train_s,
        train_s / iters as f64
    );

    println!(
        "[3/4] evaluating on {} held-out images...",
        val.samples.len()
    );
    let t_eval = Instant::now();
    let model = &runner.model.model;
    let res = detect_dataset(model, &val, 8, dev, &|l| Some(l))?;
    let dets: Vec<DetBox> = res.iter().flat_map(|(_, _, c)| c.clone()).collect();
    let results_json = out.join("val_results.json");
    write_results(&results_json, &dets)?;
    let ev = evaluate(&val.ground_truth(), &dets)?;
    println!("      {:.1} s", t_eval.elapsed().as_secs_f64());

    println!("[4/4] drawing detections...");
    let draw_dir = out.join("detections");
    std::fs::create_dir_all(&draw_dir).map_err(io(&draw_dir))?;
    let mut drawn = Vec::new();
    let names: Vec<String> = val.coco.categories.iter().map(|c| c.name.clone()).collect();
    for (s, (id, d, _)) in val.samples.iter().zip(&res).take(8) {
        let p = draw_dir.join(format!("val_{id:04}.png"));
        save_detections_png(&p, &s.image, s.height, s.width, d, 0.5, &names)?;
        drawn.push(p);
    }

    println!("\nCOCO box evaluation on the held-out shapes (pycocotools' summary):");
    print!("{}", ev.summary());
    let ckpt = runner.latest_checkpoint()?;
    println!(
        "\nDone in {:.1} s. Everything is under {}:",
        t0.elapsed().as_secs_f64(),
        out.display()
    );
    if let Some(c) = &ckpt {
        println!("  checkpoint       {}", c.display());
    }
    println!(
        "  config           {}",
        work_dir.join("config.toml").display()
    );
    println!("  training log     {}", work_dir.join("log.txt").display());
    println!("  ground truth     {}", val_json.display());
    println!("  detections       {}", results_json.display());
    println!(
        "  drawn images     {} ({} PNGs)",
        draw_dir.display(),
        drawn.len()
    );
    println!(
        "Check the numbers with: kestrel coco-eval {} {}",
        val_json.display(),
        results_json.display()
    );
    println!(
        "AP50 {:.3}, AP {:.3} after {iters} iterations.",
        ev.stats[1], ev.stats[0]
    );
    Ok(())
}

fn config_device(cfg: &Config, flag: Option<&str>) -> Result<Device> {
    device(flag.unwrap_or(&cfg.runtime.device))
}

/// The config, with `--precision` (when given) in place of `runtime.precision` and
/// `--flush-denormals` turning `runtime.flush_denormals` on; denormals are flushed
/// here when that is on.
fn config_with_flags(config: &Path, precision: Option<Precision>, flush: bool) -> Result<Config> {
    let mut cfg = Config::from_file(config)?;
    if let Some(p) = precision {
        cfg.runtime.precision = p;
    }
    cfg.runtime.flush_denormals |= flush;
    println!("precision: {}", cfg.runtime.precision);
    flush_denormals_if(cfg.runtime.flush_denormals)?;
    Ok(cfg)
}

/// `kestrel train CONFIG [--resume | --overwrite]`; `graph` (`--graph`) turns
/// `runtime.graph` on.
pub fn train(
    config: &Path,
    resume: bool,
    overwrite: bool,
    device_flag: Option<&str>,
    precision: Option<Precision>,
    flush_denormals: bool,
    graph: bool,
) -> Result<()> {
    let mut cfg = config_with_flags(config, precision, flush_denormals)?;
    cfg.runtime.graph |= graph;
    let dev = config_device(&cfg, device_flag)?;
    let r = &cfg.runtime;
    let resume = resume || r.resume;
    // Lock the work_dir before anything is written there (config_runner writes
    // config.toml): a second run, or a fresh run over an earlier one, is refused.
    let policy = match (resume, overwrite) {
        (true, _) => WorkDirPolicy::Resume,
        (false, true) => WorkDirPolicy::Overwrite,
        (false, false) => WorkDirPolicy::Fresh,
    };
    let lock = prepare_work_dir(&r.work_dir, policy)?;
    let mut runner = config_runner(&cfg, dev)?;
    runner.hold_work_dir_lock(lock);
    if resume {
        match runner.resume_latest()? {
            Some(p) => println!("resuming from {}", p.display()),
            None => println!("nothing to resume in {}: starting", r.work_dir.display()),
        }
    }
    runner.run(&r.workflow)?;
    if let Some(c) = runner.latest_checkpoint()? {
        println!("latest checkpoint: {}", c.display());
    }
    Ok(())
}

/// `kestrel eval CONFIG CHECKPOINT`.
pub fn eval(
    config: &Path,
    checkpoint: &Path,
    device_flag: Option<&str>,
    results: Option<&Path>,
    precision: Option<Precision>,
    flush_denormals: bool,
) -> Result<()> {
    let cfg = config_with_flags(config, precision, flush_denormals)?;
    let dev = config_device(&cfg, device_flag)?;
    let (_, val) = config_datasets(&cfg)?;
    let mut model = FasterRcnn::new(cfg.model.clone(), cfg.runtime.seed)?;
    model.to_device(dev)?;
    model.set_precision(cfg.runtime.precision);
    load_weights(&mut model, checkpoint)?;
    let t = Instant::now();
    let res = detect_dataset(
        &model,
        val.as_ref(),
        cfg.data.batch_size.min(8),
        dev,
        &|l| val.category_id(l),
    )?;
    let dets: Vec<DetBox> = res.into_iter().flat_map(|(_, _, c)| c).collect();
    if let Some(p) = results {
        write_results(p, &dets)?;
        println!("results: {}", p.display());
    }
    let params = cfg.eval.params();
    let ev = evaluate_with(&val.ground_truth(), &dets, &params)?;
    println!(
        "evaluated {} images in {:.1} s (maxDets {:?}: eval.max_dets)",
        val.len(),
        t.elapsed().as_secs_f64(),
        params.max_dets
    );
    print!("{}", ev.summary());
    Ok(())
}

/// The model of a checkpoint: `--config`, else the config in the checkpoint's
/// metadata, else `config.toml` next to it (checkpoints of older builds), else the
/// architecture a torchvision state_dict shows.
fn infer_model(checkpoint: &Path, config: Option<&Path>) -> Result<FasterRcnn> {
    if let Some(p) = config {
        println!("model config: {}", p.display());
        let mut m = FasterRcnn::new(Config::from_file(p)?.model, 0)?;
        load_weights(&mut m, checkpoint)?;
        return Ok(m);
    }
    let file = crate::io::TensorFile::open(checkpoint)?;
    let next_to = checkpoint
        .parent()
        .map(|p| p.join("config.toml"))
        .filter(|p| p.is_file());
    if FasterRcnnConfig::from_metadata(&file)?.is_none() {
        if let Some(p) = next_to {
            println!("model config: {}", p.display());
            let mut m = FasterRcnn::new(Config::from_file(&p)?.model, 0)?;
            load_weights(&mut m, checkpoint)?;
            return Ok(m);
        }
        println!("model config: inferred from the tensors (torchvision state_dict)");
    } else {
        println!("model config: the checkpoint's");
    }
    FasterRcnn::from_checkpoint(checkpoint)
}

/// The class names a training checkpoint carries (`class_names` in its runner
/// meta), or none (labels are then drawn as numbers).
fn class_names(checkpoint: &Path) -> Vec<String> {
    let Ok(f) = crate::io::TensorFile::open(checkpoint) else {
        return Vec::new();
    };
    f.metadata()
        .values()
        .filter_map(|v| serde_json::from_str::<serde_json::Value>(v).ok())
        .find_map(|v| {
            let names = v.get("meta")?.get(super::train::CLASS_NAMES_KEY)?;
            serde_json::from_value(names.clone()).ok()
        })
        .unwrap_or_default()
}

/// `kestrel infer CHECKPOINT IMAGE... [--out DIR]`. Each image gets its own drawing
/// (`STEM_det.png`, with the image's position added when two inputs share a stem);
/// an image that fails is reported in `detections.json` with its error, the others'
/// results are kept, and the command then fails naming the bad ones.
/// `flush_denormals`: `--flush-denormals` (the config's `runtime.flush_denormals`
/// does not apply here).
#[allow(clippy::too_many_arguments)]
pub fn infer(
    checkpoint: &Path,
    images: &[PathBuf],
    out: &Path,
    config: Option<&Path>,
    min_score: f32,
    device_name: &str,
    precision: Precision,
    flush_denormals: bool,
) -> Result<()> {
    if !(0.0..=1.0).contains(&min_score) {
        return Err(Error::invalid(
            "infer",
            format!("--min-score {min_score}: a score between 0 and 1"),
        ));
    }
    let dev = device(device_name)?;
    flush_denormals_if(flush_denormals)?;
    let mut model = infer_model(checkpoint, config)?;
    model.to_device(dev)?;
    model.set_precision(precision);
    let names = class_names(checkpoint);
    std::fs::create_dir_all(out).map_err(io(out))?;
    let files = drawing_names(images);
    let mut all = Vec::new();
    let mut failed = Vec::new();
    for (path, file) in images.iter().zip(&files) {
        let png = out.join(file);
        match infer_one(&model, dev, path, &png, min_score, &names) {
            Ok(v) => all.push(v),
            Err(e) => {
                eprintln!("error: {}: {e}", path.display());
                all.push(serde_json::json!({
                    "image": path.display().to_string(),
                    "error": e.to_string(),
                }));
                failed.push(path.display().to_string());
            }
        }
    }
    let json = out.join("detections.json");
    let text =
        serde_json::to_string_pretty(&all).map_err(|e| Error::invalid("infer", e.to_string()))?;
    std::fs::write(&json, text).map_err(io(&json))?;
    println!("boxes (x1, y1, x2, y2 pixels): {}", json.display());
    if !failed.is_empty() {
        return Err(Error::invalid(
            "infer",
            format!(
                "{} of {} images failed ({}); the others' results are in {}",
                failed.len(),
                images.len(),
                failed.join(", "),
                json.display()
            ),
        ));
    }
    Ok(())
}

/// Output file names of the drawings, one per input and all distinct: `STEM_det.png`,
/// or `STEM_N_det.png` (N the image's 1-based position) when another input has the
/// same stem (`a/x.png` and `b/x.png`) or the name is taken.
fn drawing_names(images: &[PathBuf]) -> Vec<String> {
    let stems: Vec<String> = images
        .iter()
        .map(|p| {
            p.file_stem()
                .map_or("image".into(), |s| s.to_string_lossy().to_string())
        })
        .collect();
    let mut used = std::collections::HashSet::new();
    let mut names = Vec::with_capacity(images.len());
    for (i, stem) in stems.iter().enumerate() {
        let shared = stems.iter().filter(|s| *s == stem).count() > 1;
        let mut name = if shared {
            format!("{stem}_{}_det.png", i + 1)
        } else {
            format!("{stem}_det.png")
        };
        let mut k = 1;
        while !used.insert(name.clone()) {
            k += 1;
            name = format!("{stem}_{}_{k}_det.png", i + 1);
        }
        names.push(name);
    }
    names
}

/// Detect, draw to `png` and describe one image (JSON).
fn infer_one(
    model: &FasterRcnn,
    dev: Device,
    path: &Path,
    png: &Path,
    min_score: f32,
    class_names: &[String],
) -> Result<serde_json::Value> {
    let rgb = crate::data::image_io::load_rgb(path)?;
    let t = crate::detection::transform::image_from_u8(&rgb.data, rgb.height, rgb.width)?
        .to_device(dev)?;
    let d = crate::autograd::no_grad(|| model.detect(&[t]))?
        .pop()
        .unwrap_or_default();
    save_detections_png(
        png,
        &rgb.data,
        rgb.height,
        rgb.width,
        &d,
        min_score,
        class_names,
    )?;
    let kept = d.scores.iter().filter(|&&s| s >= min_score).count();
    println!(
        "{}: {} detections ({kept} scoring >= {min_score}) -> {}",
        path.display(),
        d.boxes.len(),
        png.display()
    );
    let dets: Vec<serde_json::Value> = (0..d.boxes.len())
        .map(|i| {
            serde_json::json!({
                "box": d.boxes[i], "score": d.scores[i], "label": d.labels[i]
            })
        })
        .collect();
    Ok(serde_json::json!({
        "image": path.display().to_string(),
        "width": rgb.width, "height": rgb.height,
        "drawn": png.display().to_string(),
        "detections": dets,
    }))
}

/// `kestrel coco-eval GT RESULTS`.
pub fn coco_eval(
    gt: &std::path::Path,
    results: &std::path::Path,
    stats_json: Option<&std::path::Path>,
) -> crate::Result<()> {
    let gt = crate::eval::GroundTruth::from_json_file(gt)?;
    let dets = crate::eval::load_results(results, &gt)?;
    let ev = crate::eval::evaluate(&gt, &dets)?;
    print!("{}", ev.summary());
    if let Some(path) = stats_json {
        let map: serde_json::Map<String, serde_json::Value> = crate::eval::STAT_NAMES
            .iter()
            .zip(ev.stats)
            .map(|(k, v)| (k.to_string(), v.into()))
            .collect();
        let text = serde_json::to_string_pretty(&map).expect("numbers serialise");
        std::fs::write(path, text).map_err(|source| crate::Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
    }
    Ok(())
}

/// `kestrel shapes --out DIR --seed S --count N --size PX`.
pub fn shapes(out: &std::path::Path, seed: u64, count: usize, size: usize) -> crate::Result<()> {
    let t = std::time::Instant::now();
    let s = crate::data::generate_shapes(out, seed, count, size)?;
    println!(
        "wrote {} images ({} objects) to {} and {} in {:.1} s",
        s.images,
        s.objects,
        s.image_dir.display(),
        s.json_path.display(),
        t.elapsed().as_secs_f64()
    );
    Ok(())
}

/// `kestrel devices`: which devices are usable here.
pub fn devices() -> Result<()> {
    println!("cpu: {} threads", rayon::current_num_threads());
    match crate::device::gpu::device(0) {
        Ok(d) => println!("cuda:0: {}", d.backend.name()),
        Err(e) => println!("cuda: {e}"),
    }
    match crate::device::emu::gpu_device() {
        Ok(d) => println!("emu: {}", d.backend.name()),
        Err(e) => println!("emu: {e}"),
    }
    Ok(())
}
