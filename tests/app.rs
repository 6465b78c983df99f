//! The application layer: stage profiling times the model's real passes.

use kestrel::app::profile::{detect_profiled, train_step_profiled, INFERENCE_STAGES};
use kestrel::app::train::small_config;
use kestrel::detection::Target;
use kestrel::optim::{Sgd, SgdConfig};
use kestrel::rng::Rng;
use kestrel::{FasterRcnn, Tensor};

fn image(seed: u64, h: usize, w: usize) -> Tensor {
    let mut rng = Rng::new(seed);
    let v: Vec<f32> = (0..3 * h * w).map(|_| rng.uniform() as f32).collect();
    Tensor::from_vec(v, [3, h, w]).unwrap()
}

/// The profiled pass is the real one: same detections as `detect`, every inference
/// stage reported once, in order, with a non-negative time.
#[test]
fn detect_profiled_matches_detect_and_names_every_stage() {
    let model = FasterRcnn::new(small_config(4, 64), 3).unwrap();
    let images = [image(1, 64, 64), image(2, 48, 64)];
    let want = model.detect(&images).unwrap();
    let (got, times) = detect_profiled(&model, &images).unwrap();
    assert_eq!(got, want);
    let names: Vec<&str> = times.0.iter().map(|s| s.0).collect();
    assert_eq!(names, INFERENCE_STAGES.to_vec());
    assert!(times.0.iter().all(|s| s.1 >= 0.0), "{times:?}");
}

/// The profiled training step is `losses` + backward + SGD: its summed loss equals the
/// sum of `losses` with the same random stream, and the step changes the weights.
#[test]
fn train_step_profiled_sums_the_real_losses_and_steps() {
    let mut model = FasterRcnn::new(small_config(4, 64), 5).unwrap();
    let images = [image(7, 64, 64)];
    let targets = [Target {
        boxes: vec![[8.0, 10.0, 40.0, 44.0]],
        labels: vec![2],
    }];
    let want: f64 = {
        let ctx = kestrel::nn::Ctx::new(&model.params, true);
        let losses = model
            .losses(&ctx, &images, &targets, &mut Rng::new(11))
            .unwrap();
        losses.iter().map(|(_, l)| l.item().unwrap()).sum()
    };
    let name = "roi_heads.box_predictor.cls_score.weight";
    let before = model.params.get(name).unwrap().to_vec::<f32>().unwrap();
    let mut sgd = Sgd::new(SgdConfig {
        lr: 0.01,
        ..SgdConfig::default()
    })
    .unwrap();
    let (loss, times) =
        train_step_profiled(&mut model, &images, &targets, &mut sgd, &mut Rng::new(11)).unwrap();
    assert!(
        (loss - want).abs() <= 1e-5 * want.abs().max(1.0),
        "{loss} vs {want}"
    );
    let names: Vec<&str> = times.0.iter().map(|s| s.0).collect();
    assert_eq!(
        names,
        kestrel::app::profile::TRAINING_STAGES.to_vec(),
        "stages"
    );
    let after = model.params.get(name).unwrap().to_vec::<f32>().unwrap();
    assert_ne!(before, after, "the SGD step changed nothing");
}
