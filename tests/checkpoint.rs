//! Checkpoints describe themselves: `FasterRcnn::from_checkpoint` rebuilds a model
//! from a Kestrel training checkpoint (config in its metadata, optimizer state
//! ignored) or from a torchvision state_dict (architecture read off the tensors); and
//! evaluation counts as many detections per image as `eval.max_dets` says.

use std::path::PathBuf;
use std::sync::Arc;

use kestrel::app::train::small_config;
use kestrel::app::ShapesRun;
use kestrel::eval::{evaluate_with, DetBox, EvalConfig, GroundTruth, GtBox};
use kestrel::io::{save_safetensors, TensorFile};
use kestrel::nn::resnet::BlockKind;
use kestrel::nn::NormKind;
use kestrel::rng::Rng;
use kestrel::runner::Mode;
use kestrel::{Device, FasterRcnn, FasterRcnnConfig, Tensor};

fn tmp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("kestrel-ckpt-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn image(seed: u64, h: usize, w: usize) -> Tensor {
    let mut rng = Rng::new(seed);
    let v: Vec<f32> = (0..3 * h * w).map(|_| rng.uniform() as f32).collect();
    Tensor::from_vec(v, [3, h, w]).unwrap()
}

fn bits(m: &FasterRcnn) -> Vec<(String, Vec<u32>)> {
    m.params
        .iter()
        .map(|(n, t)| {
            let v = t.to_vec::<f32>().unwrap();
            (n.clone(), v.iter().map(|x| x.to_bits()).collect())
        })
        .collect()
}

/// Two SGD steps of the demo's model, then `from_checkpoint` on the checkpoint the
/// runner wrote (which also holds momentum buffers): same config, same weights,
/// same detections, with no config given by the caller.
#[test]
fn a_training_checkpoint_loads_with_its_own_config() {
    let dir = tmp_dir("train");
    let mut run = ShapesRun::demo(dir.join("work_dir"), Device::Cpu, 2);
    run.train_count = 8;
    run.val_count = 1;
    run.image_size = 64;
    run.batch_size = 2;
    run.warmup_iters = 1;
    run.quiet = true;
    let (train, _) = run.datasets().unwrap();
    let mut r = run.runner(Arc::new(train)).unwrap();
    r.run(&[(Mode::Train, 1)]).unwrap();
    let ckpt = r.latest_checkpoint().unwrap().expect("a checkpoint");
    let f = TensorFile::open(&ckpt).unwrap();
    assert!(
        f.names().iter().any(|n| n.starts_with("optimizer/")),
        "the checkpoint should hold optimizer state for this test to mean anything"
    );
    // The strict loader refuses the extra tensors; from_checkpoint ignores them.
    assert!(FasterRcnn::load(small_config(4, 64), &ckpt).is_err());
    let loaded = FasterRcnn::from_checkpoint(&ckpt).unwrap();
    assert_eq!(loaded.config, small_config(4, 64));
    assert_eq!(bits(&loaded), bits(&r.model.model));
    let x = [image(3, 64, 64)];
    assert_eq!(
        loaded.detect(&x).unwrap(),
        r.model.model.detect(&x).unwrap()
    );
}

/// A state_dict under torchvision's names and no metadata: the architecture (block,
/// layers, width, FPN channels, MLP width, classes) comes from the tensors, BatchNorm
/// is frozen with eps 0 (torchvision's COCO weights).
#[test]
fn a_torchvision_state_dict_loads_by_its_tensors() {
    let mut cfg = FasterRcnnConfig::resnet50_fpn(7, 0.0).unwrap();
    cfg.backbone.layers = [1, 2, 1, 1];
    cfg.backbone.width_per_group = 16;
    cfg.fpn_channels = 24;
    cfg.roi.representation_size = 40;
    let model = FasterRcnn::new(cfg.clone(), 5).unwrap();
    let path = tmp_dir("tv").join("state_dict.safetensors");
    let tensors: Vec<(&str, &Tensor)> = model.params.iter().map(|(n, t)| (n.as_str(), t)).collect();
    save_safetensors(&path, &tensors, None).unwrap();
    let loaded = FasterRcnn::from_checkpoint(&path).unwrap();
    let b = &loaded.config.backbone;
    assert_eq!(
        (b.block, b.layers, b.width_per_group, b.norm),
        (
            BlockKind::Bottleneck,
            [1, 2, 1, 1],
            16,
            NormKind::Frozen { eps: 0.0 }
        )
    );
    assert_eq!(
        (
            loaded.config.fpn_channels,
            loaded.config.roi.representation_size,
            loaded.config.roi.num_classes
        ),
        (24, 40, 7)
    );
    assert_eq!(bits(&loaded), bits(&model));
    // FasterRcnn::save writes the config, so the round trip keeps it exactly.
    let saved = path.with_file_name("saved.safetensors");
    model.save(&saved).unwrap();
    assert_eq!(FasterRcnn::from_checkpoint(&saved).unwrap().config, cfg);
}

/// A file of another model: the error names a few tensors and counts the rest
/// instead of listing hundreds.
#[test]
fn a_load_error_lists_a_few_names_and_the_count() {
    let small = FasterRcnn::new(small_config(4, 64), 0).unwrap();
    let path = tmp_dir("err").join("small.safetensors");
    small.save(&path).unwrap();
    let err = FasterRcnn::load(FasterRcnnConfig::resnet50_fpn(91, 0.0).unwrap(), &path)
        .err()
        .expect("a ResNet-50 cannot load the small model")
        .to_string();
    assert!(err.contains("more"), "{err}");
    let more: usize = err
        .rsplit("and ")
        .next()
        .and_then(|s| s.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no count in {err}"));
    assert!(more > 100, "{err}");
    assert!(err.len() < 1000, "{} characters: {err}", err.len());
}

/// 150 objects in one image, all detected exactly: pycocotools' maxDets 100 caps
/// recall at 100/150; `max_dets = 300` counts them all, and the summary says so.
#[test]
fn eval_max_dets_counts_dense_images() {
    let n = 150;
    let boxes: Vec<[f64; 4]> = (0..n)
        .map(|i| [(i % 15) as f64 * 20.0, (i / 15) as f64 * 20.0, 15.0, 15.0])
        .collect();
    let gt = GroundTruth {
        image_ids: vec![1],
        category_ids: vec![1],
        annotations: boxes
            .iter()
            .enumerate()
            .map(|(i, b)| GtBox {
                id: i as i64 + 1,
                image_id: 1,
                category_id: 1,
                bbox: *b,
                area: 225.0,
                iscrowd: false,
            })
            .collect(),
    };
    let dets: Vec<DetBox> = boxes
        .iter()
        .enumerate()
        .map(|(i, b)| DetBox {
            image_id: 1,
            category_id: 1,
            bbox: *b,
            score: 1.0 - i as f64 * 1e-3,
        })
        .collect();
    let default = evaluate_with(&gt, &dets, &EvalConfig::default().params()).unwrap();
    let dense = evaluate_with(&gt, &dets, &EvalConfig { max_dets: 300 }.params()).unwrap();
    assert!(
        default.stats[0] < 0.7,
        "AP at maxDets 100: {}",
        default.stats[0]
    );
    assert!(
        (default.stats[8] - 100.0 / 150.0).abs() < 1e-9,
        "{:?}",
        default.stats
    );
    assert_eq!(
        (dense.stats[0], dense.stats[1], dense.stats[8]),
        (1.0, 1.0, 1.0)
    );
    assert!(
        dense.summary().contains("maxDets=300"),
        "{}",
        dense.summary()
    );
    assert!(default.summary().contains("maxDets=100"));
}
