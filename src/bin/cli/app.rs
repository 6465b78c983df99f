//! The training commands: `demo`, `train`, `eval`, `infer`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use kestrel::config::{Config, DatasetKind};
use kestrel::data::{CocoDataset, CocoOptions, Dataset, Loader, LoaderConfig};
use kestrel::detection::draw::save_detections_png;
use kestrel::detection::trainer::{
    build_model, coco_eval_fn, detect_dataset, load_weights, model_config, small_model, DetLoader,
    DetectorModel, ShapesRun,
};
use kestrel::detection::FasterRcnn;
use kestrel::eval::{evaluate, write_results, DetBox};
use kestrel::optim::{Sgd, SgdConfig};
use kestrel::runner::hooks::{EvalHook, NanGuardHook};
use kestrel::runner::{Mode, Runner};
use kestrel::{Device, Error, Result};

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

/// `kestrel demo`.
pub fn demo(out: &Path, device_name: &str, iters: Option<usize>) -> Result<()> {
    let t0 = Instant::now();
    let dev = device(device_name)?;
    let iters = iters.unwrap_or(if dev.is_cuda() {
        DEMO_ITERS_GPU
    } else {
        DEMO_ITERS_CPU
    });
    std::fs::create_dir_all(out).map_err(io(out))?;
    let work_dir = out.join("work_dir");
    // A fresh run every time: an old `latest` would make the schedule look finished.
    let _ = std::fs::remove_dir_all(&work_dir);
    let run = ShapesRun::demo(&work_dir, dev, iters);

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
        model: small_model(4, run.image_size),
        ..Config::default()
    };
    cfg.data.dataset = DatasetKind::Shapes;
    cfg.data.batch_size = run.batch_size;
    cfg.schedule.max = kestrel::runner::Schedule::Iters(iters);
    cfg.schedule.warmup_iters = run.warmup_iters;
    cfg.schedule.steps = run.steps.clone();
    cfg.runtime.work_dir = work_dir.clone();
    std::fs::create_dir_all(&work_dir).map_err(io(&work_dir))?;
    std::fs::write(work_dir.join("config.toml"), cfg.to_toml_string()?).map_err(io(&work_dir))?;
    let t_train = Instant::now();
    let mut runner = run.runner(Arc::new(train))?;
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
    for (s, (id, d, _)) in val.samples.iter().zip(&res).take(8) {
        let p = draw_dir.join(format!("val_{id:04}.png"));
        save_detections_png(&p, &s.image, s.height, s.width, d, 0.5)?;
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

/// The datasets of a config: (train, val) with the label -> category id map of val.
type Sets = (Arc<dyn Dataset>, Arc<CocoDataset>);

fn datasets(cfg: &Config) -> Result<Sets> {
    let d = &cfg.data;
    let opts = CocoOptions {
        skip_bad_images: d.skip_bad_images,
        allow_outside_image_dir: d.allow_outside_image_dir,
        ..CocoOptions::default()
    };
    let (train, val) = match d.dataset {
        DatasetKind::Coco => (
            CocoDataset::open(&d.train_annotations, &d.train_images, opts)?,
            CocoDataset::open(&d.val_annotations, &d.val_images, opts)?,
        ),
        DatasetKind::Shapes => {
            let s = &d.shapes;
            let open = |sub: &str, seed: u64, count: usize| -> Result<CocoDataset> {
                let dir = s.root.join(sub);
                if !dir.join("annotations.json").is_file() {
                    println!("generating {count} shapes in {}", dir.display());
                    kestrel::data::generate_shapes(&dir, seed, count, s.image_size)?;
                }
                CocoDataset::open_dir(&dir, opts)
            };
            (
                open("train", s.seed, s.train_count)?,
                open("val", s.seed.wrapping_add(1_000_003), s.val_count)?,
            )
        }
    };
    Ok((Arc::new(train), Arc::new(val)))
}

fn config_device(cfg: &Config, flag: Option<&str>) -> Result<Device> {
    device(flag.unwrap_or(&cfg.runtime.device))
}

fn warn_ignored(ignored: &[String]) {
    for i in ignored {
        eprintln!("warning: not supported yet, ignored: {i}");
    }
}

/// `kestrel train CONFIG [--resume]`.
pub fn train(config: &Path, resume: bool, device_flag: Option<&str>) -> Result<()> {
    let cfg = Config::from_file(config)?;
    let dev = config_device(&cfg, device_flag)?;
    let (train_set, val_set) = datasets(&cfg)?;
    let (mut model, ignored) = build_model(&cfg.model, cfg.runtime.seed)?;
    warn_ignored(&ignored);
    model.to_device(dev)?;
    let s = &cfg.schedule;
    let sgd = Sgd::new(SgdConfig {
        lr: s.lr,
        momentum: s.momentum,
        weight_decay: s.weight_decay,
        nesterov: s.nesterov,
        ..SgdConfig::default()
    })?;
    let r = &cfg.runtime;
    let mut runner = Runner::new(
        DetectorModel::new(model, dev),
        Box::new(sgd),
        &r.work_dir,
        s.max,
        r.seed,
    );
    let loader = |set: Arc<dyn Dataset>, train: bool| -> Result<DetLoader> {
        Ok(DetLoader::new(Loader::new(
            set,
            LoaderConfig {
                batch_size: cfg.data.batch_size,
                shuffle: train && cfg.data.shuffle,
                seed: r.seed,
                drop_last: train,
                hflip_prob: if train { cfg.data.hflip_prob } else { 0.0 },
                workers: cfg.data.num_workers,
                prefetch: 2 * cfg.data.num_workers.max(1),
            },
        )?))
    };
    runner.set_train_loader(Box::new(loader(train_set, true)?));
    if r.workflow.iter().any(|(m, _)| *m == Mode::Val) {
        runner.set_val_loader(Box::new(loader(val_set.clone(), false)?));
    }
    runner.register_training_hooks(
        Some(cfg.lr_updater_hook()),
        cfg.optimizer_hook(),
        Some(cfg.checkpoint_hook()),
        Some(r.log_interval),
    );
    if r.nan_guard {
        runner.register_hook(NanGuardHook::new());
    }
    if let Some(ema) = cfg.ema_hook() {
        runner.register_hook(ema);
    }
    if r.eval_interval > 0 {
        let cats = val_set.clone();
        let by_epoch = matches!(s.max, kestrel::runner::Schedule::Epochs(_));
        let mut hook = EvalHook::new(
            coco_eval_fn(
                val_set.clone(),
                val_set.ground_truth(),
                cfg.data.batch_size,
                Arc::new(move |l| cats.category_id(l)),
            ),
            r.eval_interval,
            by_epoch,
        );
        if let Some(m) = &r.save_best {
            hook = hook.save_best(m);
        }
        runner.register_hook(hook);
    }
    std::fs::create_dir_all(&r.work_dir).map_err(io(&r.work_dir))?;
    std::fs::write(r.work_dir.join("config.toml"), cfg.to_toml_string()?)
        .map_err(io(&r.work_dir))?;
    if let Some(w) = &r.load_from {
        runner.load_weights(w)?;
    }
    if resume || r.resume {
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
) -> Result<()> {
    let cfg = Config::from_file(config)?;
    let dev = config_device(&cfg, device_flag)?;
    let (_, val) = datasets(&cfg)?;
    let (mut model, ignored) = build_model(&cfg.model, cfg.runtime.seed)?;
    warn_ignored(&ignored);
    model.to_device(dev)?;
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
    let ev = evaluate(&val.ground_truth(), &dets)?;
    println!(
        "evaluated {} images in {:.1} s",
        val.len(),
        t.elapsed().as_secs_f64()
    );
    print!("{}", ev.summary());
    Ok(())
}

/// The model of a checkpoint: `--config`, else `config.toml` next to it, else the demo's.
fn infer_model(checkpoint: &Path, config: Option<&Path>) -> Result<FasterRcnn> {
    let next_to = checkpoint
        .parent()
        .map(|p| p.join("config.toml"))
        .filter(|p| p.is_file());
    let m = match config.map(PathBuf::from).or(next_to) {
        Some(p) => {
            println!("model config: {}", p.display());
            Config::from_file(&p)?.model
        }
        None => {
            println!("model config: the demo's (no config.toml next to the checkpoint)");
            small_model(4, 128)
        }
    };
    let (cfg, ignored) = model_config(&m)?;
    warn_ignored(&ignored);
    FasterRcnn::new(cfg, 0)
}

/// `kestrel infer CHECKPOINT IMAGE... [--out DIR]`.
pub fn infer(
    checkpoint: &Path,
    images: &[PathBuf],
    out: &Path,
    config: Option<&Path>,
    min_score: f32,
    device_name: &str,
) -> Result<()> {
    let dev = device(device_name)?;
    let mut model = infer_model(checkpoint, config)?;
    model.to_device(dev)?;
    load_weights(&mut model, checkpoint)?;
    std::fs::create_dir_all(out).map_err(io(out))?;
    let mut all = Vec::new();
    for path in images {
        let rgb = kestrel::data::image_io::load_rgb(path)?;
        let t = kestrel::detection::transform::image_from_u8(&rgb.data, rgb.height, rgb.width)?
            .to_device(dev)?;
        let d = kestrel::autograd::no_grad(|| model.detect(&[t]))?
            .pop()
            .unwrap_or_default();
        let stem = path
            .file_stem()
            .map_or("image".into(), |s| s.to_string_lossy().to_string());
        let png = out.join(format!("{stem}_det.png"));
        save_detections_png(&png, &rgb.data, rgb.height, rgb.width, &d, min_score)?;
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
        all.push(serde_json::json!({
            "image": path.display().to_string(),
            "width": rgb.width, "height": rgb.height,
            "drawn": png.display().to_string(),
            "detections": dets,
        }));
    }
    let json = out.join("detections.json");
    let text =
        serde_json::to_string_pretty(&all).map_err(|e| Error::invalid("infer", e.to_string()))?;
    std::fs::write(&json, text).map_err(io(&json))?;
    println!("boxes (x1, y1, x2, y2 pixels): {}", json.display());
    Ok(())
}
