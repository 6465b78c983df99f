//! bf16 training through the runner: the demo's small model on generated shapes.
//! Checkpoints hold f32 masters and load in either precision; a bf16 run stopped and
//! resumed ends bit for bit where the uninterrupted one does; the bf16 weight copies
//! are refreshed once per step; the same run on the emulated device (tensor-core
//! kernels) trains.

use std::path::PathBuf;
use std::sync::Arc;

use kestrel::app::ShapesRun;
use kestrel::detection::FasterRcnn;
use kestrel::io::TensorFile;
use kestrel::nn::Precision;
use kestrel::runner::{Mode, Model};
use kestrel::tensor::DType;
use kestrel::Device;

mod common;

const ITERS: usize = 6;
const RESUME_AT: usize = 3;

fn tmp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("kestrel-mp-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn run_config(dir: PathBuf, device: Device, precision: Precision, iters: usize) -> ShapesRun {
    let mut run = ShapesRun::demo(dir, device, iters);
    run.train_count = 16;
    run.val_count = 4;
    run.image_size = 64;
    run.batch_size = 2;
    run.warmup_iters = 2;
    run.steps = vec![iters];
    run.checkpoint_interval = RESUME_AT;
    run.log_interval = 1;
    run.quiet = true;
    run.precision = precision;
    run
}

fn bits<M: Model>(m: &M) -> Vec<(String, Vec<u32>)> {
    m.params()
        .into_iter()
        .chain(m.buffers())
        .map(|(n, t)| {
            let v = t.to_vec::<f32>().unwrap();
            (n, v.iter().map(|x| x.to_bits()).collect())
        })
        .collect()
}

/// (all conv / linear weights, the trained ones) of a model.
fn layer_weights(m: &FasterRcnn) -> (usize, usize) {
    let is_layer = |n: &str, t: &kestrel::Tensor| n.ends_with(".weight") && t.dims().len() >= 2;
    let all = m.params.iter().filter(|(n, t)| is_layer(n, t)).count();
    let trained = m
        .params
        .trainable_names()
        .iter()
        .filter(|n| is_layer(n, m.params.get(n).unwrap()))
        .count();
    (all, trained)
}

#[test]
fn bf16_run_resumes_bit_exactly_and_checkpoints_stay_f32() {
    let dir = tmp_dir("resume");
    let run = run_config(dir.clone(), Device::Cpu, Precision::Bf16, ITERS);
    let (train, _) = run.datasets().unwrap();
    let train: Arc<dyn kestrel::data::Dataset> = Arc::new(train);
    let mut full = run.runner(train.clone()).unwrap();
    full.run(&[(Mode::Train, 1)]).unwrap();
    assert_eq!(full.iter(), ITERS);

    // One copy of every layer weight at the first forward, then the trained ones once
    // per step, however often a layer runs in the step.
    let (all, trained) = layer_weights(&full.model.model);
    assert!(trained > 0);
    assert_eq!(
        full.model.model.bf16_weights.refreshes(),
        all + (ITERS - 1) * trained,
        "bf16 copies: {all} at the first step, then {trained} per step"
    );

    // The same run in f32 ends elsewhere: bf16 was used.
    let f32_dir = tmp_dir("f32");
    let f32_run = run_config(f32_dir.clone(), Device::Cpu, Precision::F32, ITERS);
    let mut f32_full = f32_run.runner(train.clone()).unwrap();
    f32_full.run(&[(Mode::Train, 1)]).unwrap();
    assert_ne!(
        bits(&f32_full.model),
        bits(&full.model),
        "bf16 and f32 runs coincide"
    );
    assert_eq!(f32_full.model.model.bf16_weights.refreshes(), 0);

    // Checkpoints hold f32 tensors only.
    let ckpt = dir.join(format!("iter_{RESUME_AT}.safetensors"));
    let file = TensorFile::open(&ckpt).unwrap();
    for n in file.names() {
        if let Ok(t) = file.tensor(&n) {
            assert_ne!(t.dtype(), DType::BF16, "{n} saved in bf16");
        }
    }

    // It loads in either precision and detects.
    let img = kestrel::Tensor::full([3, 64, 64], 0.5, DType::F32, Device::Cpu).unwrap();
    for p in [Precision::F32, Precision::Bf16] {
        let mut m = FasterRcnn::from_checkpoint(&ckpt).unwrap();
        m.set_precision(p);
        kestrel::autograd::no_grad(|| m.detect(std::slice::from_ref(&img))).unwrap();
    }

    // Resume at RESUME_AT in bf16: the same bits as the uninterrupted run.
    let mut resumed = run.runner(train).unwrap();
    resumed.resume(&ckpt).unwrap();
    assert_eq!(resumed.iter(), RESUME_AT);
    assert_ne!(bits(&resumed.model), bits(&full.model));
    resumed.run(&[(Mode::Train, 1)]).unwrap();
    assert_eq!(resumed.iter(), ITERS);
    assert!(
        bits(&resumed.model) == bits(&full.model),
        "resumed bf16 run ended with different weights"
    );
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&f32_dir);
}

/// The small model's bf16 training steps on the emulated device: the conv and linear
/// layers on the tensor-core kernels (forward, dgrad, wgrad), SGD on the f32 masters.
/// The losses stay finite, every trained weight moves, the masters stay f32, and the
/// copies are refreshed once per step.
#[test]
fn bf16_training_steps_on_the_emulated_device() {
    common::on_emulated(|device| {
        let iters = 2;
        let dir = tmp_dir("emu");
        let mut run = run_config(dir.clone(), device, Precision::Bf16, iters);
        run.checkpoint_interval = 0;
        let (train, _) = run.datasets().unwrap();
        let train: Arc<dyn kestrel::data::Dataset> = Arc::new(train);
        let mut r = run.runner(train).unwrap();
        let before = bits(&r.model);
        r.run(&[(Mode::Train, 1)]).unwrap();
        assert_eq!(r.iter(), iters);
        let m = &r.model.model;
        let (all, trained) = layer_weights(m);
        assert_eq!(m.bf16_weights.refreshes(), all + (iters - 1) * trained);
        let after = bits(&r.model);
        let names = m.params.trainable_names();
        for ((n, b), (_, a)) in before.iter().zip(&after) {
            let t = m.params.get(n).unwrap();
            assert_eq!(t.dtype(), DType::F32, "{n}: master stays f32");
            assert_eq!(t.device(), device);
            assert!(
                a.iter().all(|&x| f32::from_bits(x).is_finite()),
                "{n}: non-finite after bf16 steps"
            );
            if names.contains(n) && n.ends_with(".weight") && t.dims().len() >= 2 {
                assert_ne!(a, b, "{n}: a trained weight did not move");
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
    });
}

/// The per-iteration mean losses of a run's log.jsonl: (iter, loss).
fn logged_losses(work_dir: &std::path::Path) -> Vec<(u64, f64)> {
    let text = std::fs::read_to_string(work_dir.join("log.jsonl")).unwrap();
    text.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["mode"] == "train")
        .filter_map(|v| Some((v["iter"].as_u64()?, v["loss"].as_f64()?)))
        .collect()
}

/// 200 iterations of the demo's recipe (its model, 2000 shapes, batch 4) in f32 and
/// in bf16 from the same seed: the logged loss (mean over each 10 iterations) of the
/// bf16 run stays within 15% of the f32 run's from iteration 50 on (after warm-up),
/// and the mean over the last 50 iterations within 5%. The band is an acceptance
/// choice, not a derivation: two trajectories with different rounding separate
/// chaotically, so their losses agree in distribution, not step by step. Prints the
/// curve as a markdown table. About 10 minutes on the loaded 2-core machine.
#[test]
#[ignore = "long: 2 x 200 training iterations (run on purpose, --nocapture prints the curve)"]
fn bf16_tracks_f32_for_200_iterations() {
    let iters = 200;
    let mut logs = Vec::new();
    for p in [Precision::F32, Precision::Bf16] {
        let dir = tmp_dir(&format!("curve-{p}"));
        let mut run = ShapesRun::demo(dir.clone(), Device::Cpu, iters);
        run.precision = p;
        run.log_interval = 10;
        run.quiet = true;
        run.checkpoint_interval = 0;
        let (train, _) = run.datasets().unwrap();
        let t0 = std::time::Instant::now();
        let mut r = run.runner(Arc::new(train)).unwrap();
        r.run(&[(Mode::Train, 1)]).unwrap();
        eprintln!(
            "{p}: {iters} iterations in {:.1} s",
            t0.elapsed().as_secs_f64()
        );
        logs.push(logged_losses(&dir));
        let _ = std::fs::remove_dir_all(&dir);
    }
    let (f, b) = (&logs[0], &logs[1]);
    assert_eq!(f.len(), b.len());
    assert!(f.len() >= iters / 10 - 1);
    println!("| iter | loss f32 | loss bf16 | bf16 / f32 |\n|---|---|---|---|");
    for ((i, lf), (j, lb)) in f.iter().zip(b) {
        assert_eq!(i, j);
        println!("| {i} | {lf:.4} | {lb:.4} | {:.3} |", lb / lf);
    }
    for ((i, lf), (_, lb)) in f.iter().zip(b) {
        if *i >= 50 {
            assert!(
                ((lb - lf) / lf).abs() <= 0.15,
                "iteration {i}: bf16 loss {lb} vs f32 {lf}"
            );
        }
    }
    let tail = |v: &[(u64, f64)]| {
        let t: Vec<f64> = v.iter().filter(|(i, _)| *i > 150).map(|x| x.1).collect();
        t.iter().sum::<f64>() / t.len() as f64
    };
    let (tf, tb) = (tail(f), tail(b));
    println!("mean loss over the last 50 iterations: f32 {tf:.4}, bf16 {tb:.4}");
    assert!(((tb - tf) / tf).abs() <= 0.05);
}

/// `[runtime] precision` parses "f32" and "bf16", defaults to f32, and anything else is
/// an error naming the key's value.
#[test]
fn runtime_precision_in_the_config() {
    use kestrel::config::Config;
    assert_eq!(Config::default().runtime.precision, Precision::F32);
    let c = Config::from_toml_str("[runtime]\nprecision = \"bf16\"\n", "test").unwrap();
    assert_eq!(c.runtime.precision, Precision::Bf16);
    let c = Config::from_toml_str("[runtime]\nprecision = \"f32\"\n", "test").unwrap();
    assert_eq!(c.runtime.precision, Precision::F32);
    let e = Config::from_toml_str("[runtime]\nprecision = \"fp16\"\n", "test")
        .expect_err("fp16 is refused");
    assert!(e.to_string().contains("fp16"), "{e}");
    assert_eq!("bf16".parse::<Precision>().unwrap(), Precision::Bf16);
    assert!("half".parse::<Precision>().is_err());
}
