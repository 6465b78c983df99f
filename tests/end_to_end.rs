//! End to end on the CPU: train the demo's small Faster R-CNN on generated shapes,
//! reach an AP50 on held-out shapes, and resume from a checkpoint to the same weights
//! as the uninterrupted run, bit for bit.

use std::path::PathBuf;
use std::sync::Arc;

use kestrel::app::{evaluate_model, ShapesRun};
use kestrel::runner::{Mode, Model};
use kestrel::Device;

/// Training iterations, and where the run is checkpointed and resumed.
const ITERS: usize = 800;
const RESUME_AT: usize = 790;
/// AP50 on the held-out shapes after ITERS iterations. Measured on the 2-core CPU:
/// 0.530 after 600 iterations before the second wave's merge and 0.469 after it (same
/// seed: the merged numerics — tiled and fused conv products, the new loader — follow
/// another trajectory; the host pool is not it, the run without it is identical), so
/// 600 iterations left no margin; 0.721 (AP 0.421) after 800. 0.5 is the floor issue 6
/// sets. Training is seeded and deterministic, so the margin is not noise.
const MIN_AP50: f64 = 0.5;

fn tmp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("kestrel-e2e-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn run_config(dir: PathBuf) -> ShapesRun {
    let mut run = ShapesRun::demo(dir, Device::Cpu, ITERS);
    run.train_count = 600;
    run.val_count = 100;
    run.warmup_iters = 50;
    run.steps = vec![ITERS * 3 / 4];
    run.checkpoint_interval = RESUME_AT;
    run.log_interval = 50;
    run.quiet = std::env::var_os("KESTREL_E2E_VERBOSE").is_none();
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

#[test]
fn shapes_train_reaches_ap50_and_resume_is_bit_exact() {
    let t0 = std::time::Instant::now();
    let dir = tmp_dir("run");
    let run = run_config(dir.clone());
    let (train, val) = run.datasets().unwrap();
    let train: Arc<dyn kestrel::data::Dataset> = Arc::new(train);

    let mut full = run.runner(train.clone()).unwrap();
    full.run(&[(Mode::Train, 1)]).unwrap();
    assert_eq!(full.iter(), ITERS);
    let train_s = t0.elapsed().as_secs_f64();

    let ev = evaluate_model(
        &full.model.model,
        &val,
        &val.ground_truth(),
        8,
        Device::Cpu,
        &|l| Some(l),
        &kestrel::eval::EvalParams::default(),
    )
    .unwrap();
    eprintln!(
        "end_to_end: {ITERS} iterations in {train_s:.1} s ({:.3} s/iter); AP50 {:.3}, AP {:.3}",
        train_s / ITERS as f64,
        ev.stats[1],
        ev.stats[0]
    );
    eprint!("{}", ev.summary());
    assert!(
        ev.stats[1] >= MIN_AP50,
        "AP50 {:.3} < {MIN_AP50} after {ITERS} iterations",
        ev.stats[1]
    );

    // Resume from the checkpoint at RESUME_AT with a fresh runner (new model, fresh
    // optimizer): counters, then weights, BatchNorm statistics included, must match.
    let ckpt = dir.join(format!("iter_{RESUME_AT}.safetensors"));
    assert!(ckpt.is_file(), "no checkpoint at {}", ckpt.display());
    let mut resumed = run.runner(train).unwrap();
    resumed.resume(&ckpt).unwrap();
    assert_eq!(resumed.iter(), RESUME_AT);
    assert_ne!(
        bits(&resumed.model),
        bits(&full.model),
        "checkpoint is the final state"
    );
    resumed.run(&[(Mode::Train, 1)]).unwrap();
    assert_eq!(resumed.iter(), ITERS);
    assert_eq!(resumed.rng.state(), full.rng.state());
    assert!(
        bits(&resumed.model) == bits(&full.model),
        "resumed run ended with different weights"
    );
    let _ = std::fs::remove_dir_all(&dir);
    eprintln!("end_to_end: total {:.1} s", t0.elapsed().as_secs_f64());
}
