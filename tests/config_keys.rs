//! Every key of the shipped configs changes the model it builds: each test builds
//! two models that differ in one key and shows the difference where the key acts
//! (a loss, a pooled feature, a proposal count, a parameter shape, what trains).

use std::path::PathBuf;

use kestrel::app::train::small_config;
use kestrel::config::Config;
use kestrel::detection::transform::transform;
use kestrel::detection::Target;
use kestrel::nn::{Ctx, NormKind};
use kestrel::rng::Rng;
use kestrel::{FasterRcnn, FasterRcnnConfig, Tensor};

fn shipped(name: &str) -> Config {
    Config::from_file(
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("configs")
            .join(name),
    )
    .unwrap()
}

fn image(seed: u64, h: usize, w: usize) -> Tensor {
    let mut rng = Rng::new(seed);
    let v: Vec<f32> = (0..3 * h * w).map(|_| rng.uniform() as f32).collect();
    Tensor::from_vec(v, [3, h, w]).unwrap()
}

fn targets() -> Vec<Target> {
    vec![Target {
        boxes: vec![[8.0, 10.0, 40.0, 44.0], [30.0, 5.0, 60.0, 30.0]],
        labels: vec![2, 1],
    }]
}

/// The four losses of one training forward pass, by name, with a fixed sampler seed.
fn losses(cfg: FasterRcnnConfig) -> Vec<(String, f64)> {
    let model = FasterRcnn::new(cfg, 3).unwrap();
    let ctx = Ctx::new(&model.params, true);
    model
        .losses(&ctx, &[image(1, 64, 64)], &targets(), &mut Rng::new(9))
        .unwrap()
        .into_iter()
        .map(|(n, t)| (n, t.item().unwrap()))
        .collect()
}

fn loss(l: &[(String, f64)], name: &str) -> f64 {
    l.iter().find(|(n, _)| n == name).unwrap().1
}

/// `box_loss_beta = 0` is mmdetection's L1: larger than smooth L1 (beta 1/9) on the
/// same sampled anchors and RoIs, since smooth L1 <= L1 elementwise (equal only where
/// every |d| is 0); the classification losses do not change.
#[test]
fn box_loss_beta_selects_l1_or_smooth_l1_in_both_heads() {
    let torchvision = losses(small_config(4, 64));
    let mut cfg = small_config(4, 64);
    cfg.rpn.box_loss_beta = 0.0;
    cfg.roi.box_loss_beta = 0.0;
    let l1 = losses(cfg);
    for name in ["loss_rpn_box_reg", "loss_box_reg"] {
        let (s, l) = (loss(&torchvision, name), loss(&l1, name));
        assert!(l > s && s > 0.0, "{name}: L1 {l} vs smooth L1 {s}");
    }
    for name in ["loss_objectness", "loss_classifier"] {
        assert_eq!(loss(&torchvision, name), loss(&l1, name), "{name}");
    }
    // Only one head's key set: only that head's box loss changes.
    let mut cfg = small_config(4, 64);
    cfg.rpn.box_loss_beta = 0.0;
    let rpn_only = losses(cfg);
    assert_ne!(
        loss(&rpn_only, "loss_rpn_box_reg"),
        loss(&torchvision, "loss_rpn_box_reg")
    );
    assert_eq!(
        loss(&rpn_only, "loss_box_reg"),
        loss(&torchvision, "loss_box_reg")
    );
}

/// Pooled features of the same proposals under two box-head configs.
fn pooled(cfg: FasterRcnnConfig) -> Tensor {
    let model = FasterRcnn::new(cfg, 3).unwrap();
    let ctx = Ctx::new(&model.params, false);
    let il = transform(&[image(2, 64, 64)], &model.config.transform).unwrap();
    let feats = model.features(&ctx, &il.tensors).unwrap();
    let props = Tensor::from_vec(
        vec![
            3.0f32, 4.5, 41.0, 30.0, 10.0, 12.0, 60.0, 63.0, 0.5, 0.5, 20.3, 9.7,
        ],
        [3, 4],
    )
    .unwrap();
    model
        .roi_heads
        .pool(&feats[..4], &[props], &il.image_sizes)
        .unwrap()
}

#[test]
fn pool_output_size_shapes_the_pooled_features_and_fc6() {
    let mut cfg = small_config(4, 64);
    cfg.roi.pool_output_size = 5;
    let p = pooled(cfg.clone());
    assert_eq!(p.dims(), &[3, 32, 5, 5]);
    let model = FasterRcnn::new(cfg, 0).unwrap();
    let fc6 = model.params.get("roi_heads.box_head.fc6.weight").unwrap();
    assert_eq!(fc6.dims(), &[256, 32 * 5 * 5]);
    assert_eq!(pooled(small_config(4, 64)).dims(), &[3, 32, 7, 7]);
}

#[test]
fn sampling_ratio_and_aligned_change_roi_align() {
    let base = pooled(small_config(4, 64)).to_vec::<f32>().unwrap();
    let mut adaptive = small_config(4, 64);
    adaptive.roi.sampling_ratio = 0;
    let mut aligned = small_config(4, 64);
    aligned.roi.aligned = true;
    for (what, cfg) in [("sampling_ratio 0", adaptive), ("aligned", aligned)] {
        let v = pooled(cfg).to_vec::<f32>().unwrap();
        assert_eq!(v.len(), base.len());
        let diff = v
            .iter()
            .zip(&base)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(diff > 1e-4, "{what}: max difference {diff}");
    }
}

/// Training proposals per image are capped by `post_nms_top_n_train` and inference
/// ones by `post_nms_top_n_test`.
#[test]
fn post_nms_top_n_caps_the_proposals_of_each_mode() {
    let mut cfg = small_config(4, 128);
    cfg.rpn.post_nms_top_n_train = 7;
    cfg.rpn.post_nms_top_n_test = 300;
    let model = FasterRcnn::new(cfg, 3).unwrap();
    let ctx = Ctx::new(&model.params, false);
    let il = transform(&[image(4, 128, 128)], &model.config.transform).unwrap();
    let feats = model.features(&ctx, &il.tensors).unwrap();
    let train = model.proposals(&ctx, &il, &feats, true).unwrap();
    let test = model.proposals(&ctx, &il, &feats, false).unwrap();
    assert_eq!(train[0].dims()[0], 7);
    assert!(test[0].dims()[0] > 7, "{:?}", test[0].dims());
    // The shipped mmdetection config keeps 1000 in training, torchvision's 2000.
    let mm = FasterRcnn::new(shipped("faster_rcnn_r50_fpn_1x.toml").model, 0).unwrap();
    assert_eq!(mm.rpn.proposal_params(true).post_nms_top_n, 1000);
    let tv = FasterRcnn::new(shipped("fasterrcnn_resnet50_fpn.toml").model, 0).unwrap();
    assert_eq!(tv.rpn.proposal_params(true).post_nms_top_n, 2000);
}

/// `norm = "bn_eval"` trains the BatchNorm affine with the running statistics fixed
/// (a training pass updates no statistics and gives the inference output);
/// `"frozen_bn"` trains neither; `trainable_layers` freezes the stem and early stages.
#[test]
fn norm_and_trainable_layers_decide_what_trains() {
    let name = "backbone.body.layer2.0.bn1.weight";
    let mut cfg = small_config(4, 64);
    cfg.backbone.norm = NormKind::FrozenStats { eps: 1e-5 };
    cfg.backbone.trainable_layers = 3;
    let model = FasterRcnn::new(cfg.clone(), 1).unwrap();
    let trainable = model.params.trainable_names();
    assert!(
        trainable.contains(&name.to_string()),
        "bn_eval trains {name}"
    );
    assert!(!trainable.iter().any(|n| n.contains("running_")));
    assert!(
        !trainable.iter().any(|n| n.starts_with("backbone.body.layer1.")
            || n.starts_with("backbone.body.conv1")),
        "trainable_layers 3 freezes the stem and layer1"
    );
    assert!(trainable
        .iter()
        .any(|n| n.starts_with("backbone.body.layer2.")));
    let x = transform(&[image(5, 64, 64)], &cfg.transform)
        .unwrap()
        .tensors;
    let train_ctx = Ctx::new(&model.params, true);
    let a = model.features(&train_ctx, &x).unwrap();
    assert!(
        train_ctx.take_buffer_updates().is_empty(),
        "bn_eval keeps its statistics"
    );
    let b = model.features(&Ctx::new(&model.params, false), &x).unwrap();
    assert_eq!(a[0].to_vec::<f32>().unwrap(), b[0].to_vec::<f32>().unwrap());

    cfg.backbone.norm = NormKind::Frozen { eps: 1e-5 };
    let frozen = FasterRcnn::new(cfg.clone(), 1).unwrap();
    assert!(!frozen.params.trainable_names().contains(&name.to_string()));
    cfg.backbone.trainable_layers = 5;
    let all = FasterRcnn::new(cfg, 1).unwrap();
    assert!(all
        .params
        .trainable_names()
        .contains(&"backbone.body.conv1.weight".to_string()));
}

/// The shipped mmdetection config builds mmdetection's model, key by key.
#[test]
fn mmdet_config_builds_mmdetections_model() {
    let m = FasterRcnn::new(shipped("faster_rcnn_r50_fpn_1x.toml").model, 0).unwrap();
    let p = &m.roi_heads.pooler;
    assert_eq!(
        (p.output_size, p.sampling_ratio, p.aligned),
        ((7, 7), 0, true)
    );
    assert_eq!(m.config.rpn.box_loss_beta, 0.0);
    assert_eq!(m.config.roi.box_loss_beta, 0.0);
    assert_eq!(
        m.params
            .get("roi_heads.box_predictor.cls_score.weight")
            .unwrap()
            .dims(),
        &[81, 1024]
    );
    let t = m.params.trainable_names();
    assert!(t.contains(&"backbone.body.layer4.2.bn3.bias".to_string()));
    assert!(!t.iter().any(|n| n.starts_with("backbone.body.layer1.")));
}
