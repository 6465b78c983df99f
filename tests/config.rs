//! The TOML configuration: shipped files, defaults, errors naming file and key.

use std::path::PathBuf;

use kestrel::config::{Config, PolicyKind, WarmupKind};
use kestrel::nn::resnet::BlockKind;
use kestrel::nn::NormKind;
use kestrel::runner::hooks::{LrPolicy, Warmup};
use kestrel::runner::{Mode, Schedule};
use kestrel::Error;

fn shipped(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("configs")
        .join(name)
}

/// The message of a config error, checking it is one and names `origin`.
fn config_err(text: &str, origin: &str) -> String {
    match Config::from_toml_str(text, origin) {
        Err(e @ Error::Config { .. }) => {
            let msg = e.to_string();
            assert!(msg.starts_with(&format!("{origin}: ")), "{msg}");
            msg
        }
        Err(e) => panic!("not a config error: {e}"),
        Ok(c) => panic!("accepted: {c:?}"),
    }
}

#[test]
fn defaults_are_torchvisions_reference_recipe() {
    let c = Config::default();
    // references/detection/train.py: --lr 0.02 (8 GPUs x 2 images), --momentum 0.9,
    // --wd 1e-4, --epochs 26, --lr-steps 16 22, --lr-gamma 0.1, warmup 1000 iterations
    // linear from 1/1000.
    let s = &c.schedule;
    assert_eq!((s.lr, s.momentum, s.weight_decay), (0.02, 0.9, 1e-4));
    assert_eq!(s.max, Schedule::Epochs(26));
    assert_eq!(
        (s.policy, s.steps.clone(), s.gamma),
        (PolicyKind::Step, vec![16, 22], 0.1)
    );
    assert_eq!(
        (s.warmup, s.warmup_iters, s.warmup_ratio),
        (WarmupKind::Linear, 1000, 0.001)
    );
    assert_eq!(c.data.batch_size, 16);
    // fasterrcnn_resnet50_fpn's model.
    let m = &c.model;
    assert_eq!(m.roi.num_classes, 91);
    assert_eq!(
        (m.backbone.layers, m.backbone.block),
        ([3, 4, 6, 3], BlockKind::Bottleneck)
    );
    assert_eq!(
        (m.backbone.trainable_layers, m.backbone.norm),
        (3, NormKind::Frozen { eps: 1e-5 })
    );
    assert_eq!((m.fpn_channels, m.roi.representation_size), (256, 1024));
    assert_eq!((m.transform.min_size, m.transform.max_size), (800, 1333));
    assert_eq!(m.rpn.anchor_sizes, [32.0, 64.0, 128.0, 256.0, 512.0]);
    assert_eq!(
        (m.roi.pool_output_size, m.roi.sampling_ratio, m.roi.aligned),
        (7, 2, false)
    );
    assert_eq!(
        (m.rpn.box_loss_beta, m.roi.box_loss_beta),
        (1.0 / 9.0, 1.0 / 9.0)
    );
    assert_eq!(c.eval.max_dets, 100, "pycocotools' maxDets");
    assert_eq!(
        (m.rpn.fg_iou_thresh, m.rpn.bg_iou_thresh, m.rpn.nms_thresh),
        (0.7, 0.3, 0.7)
    );
    assert_eq!(
        (m.rpn.batch_size_per_image, m.rpn.positive_fraction),
        (256, 0.5)
    );
    assert_eq!(
        (m.rpn.pre_nms_top_n_train, m.rpn.post_nms_top_n_train),
        (2000, 2000)
    );
    assert_eq!(
        (m.rpn.pre_nms_top_n_test, m.rpn.post_nms_top_n_test),
        (1000, 1000)
    );
    assert_eq!(
        (m.roi.batch_size_per_image, m.roi.positive_fraction),
        (512, 0.25)
    );
    assert_eq!(
        (
            m.roi.score_thresh,
            m.roi.nms_thresh,
            m.roi.detections_per_img
        ),
        (0.05, 0.5, 100)
    );
    assert_eq!(m.roi.bbox_reg_weights, [10.0, 10.0, 5.0, 5.0]);
    c.validate().unwrap();
}

#[test]
fn shipped_torchvision_config_equals_the_defaults() {
    let c = Config::from_file(shipped("fasterrcnn_resnet50_fpn.toml")).unwrap();
    assert_eq!(c, Config::default());
}

#[test]
fn shipped_mmdet_1x_config_is_mmdetections_schedule() {
    let c = Config::from_file(shipped("faster_rcnn_r50_fpn_1x.toml")).unwrap();
    assert_eq!(c, Config::mmdet_1x());
    // faster_rcnn_r50_fpn_1x_coco: lr 0.02, warmup 500 linear 0.001, steps 8 and 11 of 12.
    let s = &c.schedule;
    assert_eq!((s.lr, s.momentum, s.weight_decay), (0.02, 0.9, 1e-4));
    assert_eq!(
        (s.max, s.steps.clone()),
        (Schedule::Epochs(12), vec![8, 11])
    );
    assert_eq!(
        (s.warmup, s.warmup_iters, s.warmup_ratio),
        (WarmupKind::Linear, 500, 0.001)
    );
    // mmdetection's model: 80 classes + background, L1 box losses, aligned RoIAlign
    // with adaptive sampling, 1000 post-NMS training proposals, BN with fixed
    // statistics and a trained affine.
    let m = &c.model;
    assert_eq!(m.roi.num_classes, 81);
    assert_eq!((m.rpn.box_loss_beta, m.roi.box_loss_beta), (0.0, 0.0));
    assert_eq!((m.roi.sampling_ratio, m.roi.aligned), (0, true));
    assert_eq!(m.rpn.post_nms_top_n_train, 1000);
    assert_eq!(m.backbone.norm, NormKind::FrozenStats { eps: 1e-5 });
    let hook = c.lr_updater_hook();
    assert_eq!(
        hook.policy,
        LrPolicy::Step {
            steps: vec![8, 11],
            gamma: 0.1,
            min_lr: None
        }
    );
    assert!(hook.by_epoch);
    assert_eq!(
        (hook.warmup, hook.warmup_iters, hook.warmup_ratio),
        (Some(Warmup::Linear), 500, 0.001)
    );
}

#[test]
fn an_empty_file_is_the_defaults_and_a_file_sets_only_what_differs() {
    assert_eq!(
        Config::from_toml_str("", "empty.toml").unwrap(),
        Config::default()
    );
    let c = Config::from_toml_str(
        r#"
[model]
fpn_channels = 32
[model.roi]
num_classes = 5
[model.backbone]
depth = 50
layers = [1, 1, 1, 1]
block = "basic"
norm = "batch_norm"
[schedule]
max = { iters = 1070 }
steps = [800]
warmup_iters = 100
grad_clip = { max_norm = 10.0 }
[runtime]
workflow = [["train", 200], ["val", 1]]
ema = { momentum = 0.0002, total_iter = 2000 }
"#,
        "shapes.toml",
    )
    .unwrap();
    // Explicit layers and block override the depth's.
    assert_eq!(
        (c.model.backbone.layers, c.model.backbone.block),
        ([1, 1, 1, 1], BlockKind::Basic)
    );
    assert_eq!(
        c.model.backbone.norm,
        NormKind::Batch {
            eps: 1e-5,
            momentum: 0.1
        }
    );
    assert_eq!(c.model.fpn_channels, 32);
    assert_eq!(c.model.roi.num_classes, 5);
    assert_eq!(c.schedule.max, Schedule::Iters(1070));
    assert_eq!(c.schedule.lr, 0.02, "unset keys keep their defaults");
    assert_eq!(c.runtime.workflow, [(Mode::Train, 200), (Mode::Val, 1)]);
    let oh = c.optimizer_hook();
    assert_eq!(
        oh.grad_clip.map(|g| (g.max_norm, g.norm_type)),
        Some((10.0, 2.0))
    );
    let ema = c.ema_hook().unwrap();
    assert_eq!((ema.momentum, ema.total_iter), (0.0002, Some(2000)));
    assert!(!c.checkpoint_hook().by_epoch);
    // The LR schedule counts the unit of `max` unless told otherwise.
    assert!(!c.lr_updater_hook().by_epoch);
}

#[test]
fn configs_round_trip_through_toml() {
    for c in [Config::default(), Config::mmdet_1x()] {
        let text = c.to_toml_string().unwrap();
        assert_eq!(
            Config::from_toml_str(&text, "round-trip").unwrap(),
            c,
            "{text}"
        );
    }
}

#[test]
fn unknown_keys_are_errors_naming_file_and_key() {
    let msg = config_err("[schedule]\nlr = 0.01\nlr_steps = [8, 11]\n", "my.toml");
    assert!(msg.contains("key `schedule.lr_steps`"), "{msg}");
    assert!(msg.contains("unknown field `lr_steps`"), "{msg}");
    assert!(msg.contains("line 3"), "{msg}");

    let msg = config_err("[model.rpn]\nnms_threshold = 0.7\n", "my.toml");
    assert!(msg.contains("key `model.rpn.nms_threshold`"), "{msg}");

    let msg = config_err("[optimizer]\nlr = 0.02\n", "my.toml");
    assert!(msg.contains("unknown field `optimizer`"), "{msg}");

    let msg = config_err("seed = 3\n", "my.toml");
    assert!(msg.contains("key `seed`"), "{msg}");
}

#[test]
fn wrong_types_are_errors_naming_file_and_key() {
    let msg = config_err("[schedule]\nlr = \"0.02\"\n", "typed.toml");
    assert!(msg.contains("key `schedule.lr`"), "{msg}");
    assert!(msg.contains("invalid type"), "{msg}");

    let msg = config_err("[schedule]\nsteps = [16, \"22\"]\n", "typed.toml");
    assert!(msg.contains("key `schedule.steps`"), "{msg}");

    let msg = config_err("[schedule]\npolicy = \"linear\"\n", "typed.toml");
    assert!(msg.contains("key `schedule.policy`"), "{msg}");
    assert!(msg.contains("linear"), "{msg}");

    let msg = config_err("[model.backbone]\ntrainable_layers = -1\n", "typed.toml");
    assert!(
        msg.contains("key `model.backbone.trainable_layers`"),
        "{msg}"
    );

    let msg = config_err("[runtime]\nworkflow = [[\"test\", 1]]\n", "typed.toml");
    assert!(msg.contains("key `runtime.workflow`"), "{msg}");
}

#[test]
fn bad_values_are_errors_naming_file_and_key() {
    let cases = [
        (
            "[schedule]\nmax = { iters = 100 }\nlr_by_epoch = true\n",
            "schedule.lr_by_epoch",
        ),
        ("[schedule]\nwarmup_ratio = 0.0\n", "schedule.warmup_ratio"),
        ("[schedule]\nsteps = [22, 16]\n", "schedule.steps"),
        ("[schedule]\nlr = -0.1\n", "schedule.lr"),
        ("[schedule]\nmax = { epochs = 0 }\n", "schedule.max"),
        (
            "[model.rpn]\nfg_iou_thresh = 0.2\n",
            "model.rpn.bg_iou_thresh",
        ),
        (
            "[model.roi]\npositive_fraction = 1.5\n",
            "model.roi.positive_fraction",
        ),
        (
            "[model.backbone]\nlayers = [1, 0, 1, 1]\n",
            "model.backbone.layers",
        ),
        (
            "[model.roi]\nbox_loss_beta = -1.0\n",
            "model.roi.box_loss_beta",
        ),
        (
            "[model.rpn]\nbox_loss_beta = -1.0\n",
            "model.rpn.box_loss_beta",
        ),
        (
            "[model.roi]\npool_output_size = 0\n",
            "model.roi.pool_output_size",
        ),
        (
            "[model.rpn]\nanchor_sizes = [32.0]\n",
            "model.rpn.anchor_sizes",
        ),
        (
            "[model.backbone]\ntrainable_layers = 6\n",
            "model.backbone.trainable_layers",
        ),
        ("[eval]\nmax_dets = 0\n", "eval.max_dets"),
        (
            "[model.transform]\nmin_size = 1400\n",
            "model.transform.max_size",
        ),
        ("[runtime]\ndevice = \"tpu\"\n", "runtime.device"),
        ("[runtime]\nworkflow = [[\"val\", 1]]\n", "runtime.workflow"),
        ("[data]\nbatch_size = 0\n", "data.batch_size"),
    ];
    for (text, key) in cases {
        let msg = config_err(text, "bad.toml");
        assert!(msg.contains(&format!("key `{key}`")), "{text:?}: {msg}");
    }
}

#[test]
fn backbone_shape_errors_name_the_section_and_the_value() {
    let msg = config_err("[model.backbone]\ndepth = 42\n", "bad.toml");
    assert!(msg.contains("model.backbone"), "{msg}");
    assert!(msg.contains("depth 42"), "{msg}");
    let msg = config_err("[model.backbone]\nlayers = [1, 1, 1]\n", "bad.toml");
    assert!(msg.contains("model.backbone.layers"), "{msg}");
    let msg = config_err("[model.backbone]\ngroups = 32\n", "bad.toml");
    assert!(
        msg.contains("grouped convolutions are not supported"),
        "{msg}"
    );
}

#[test]
fn from_file_names_the_file_in_errors() {
    let dir = std::env::temp_dir().join(format!("kestrel-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("typo.toml");
    std::fs::write(&p, "[runtime]\nlog_intervall = 10\n").unwrap();
    let msg = Config::from_file(&p).unwrap_err().to_string();
    assert!(msg.starts_with(&p.display().to_string()), "{msg}");
    assert!(msg.contains("key `runtime.log_intervall`"), "{msg}");
    let missing = dir.join("missing.toml");
    let err = Config::from_file(&missing).unwrap_err();
    assert!(
        matches!(err, Error::Io { .. }) && err.to_string().contains("missing.toml"),
        "{err}"
    );
}
