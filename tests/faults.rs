//! A model that proposes nothing (issue 15, part 4): eval and infer get no
//! detections, training goes on with finite losses and gradients. Before the fix the
//! box head reshaped `[0, C, 7, 7]` to `[0, 0]` (`numel() / r.max(1)`) and the first
//! linear layer refused it. The other faults are in tests/work_dir.rs,
//! tests/data_faults.rs and tests/cli_faults.rs.

use kestrel::app::train::small_config;
use kestrel::autograd::{no_grad, Tape};
use kestrel::detection::{FasterRcnn, Target};
use kestrel::nn::Ctx;
use kestrel::rng::Rng;
use kestrel::tensor::Tensor;

/// A small model whose RPN keeps no proposal: a sigmoid never reaches 2.
fn model_without_proposals() -> FasterRcnn {
    let mut cfg = small_config(3, 64);
    cfg.rpn.score_thresh = 2.0;
    FasterRcnn::new(cfg, 0).unwrap()
}

fn image(seed: u64) -> Tensor {
    let mut r = Rng::new(seed);
    let v: Vec<f32> = (0..3 * 64 * 64).map(|_| r.uniform() as f32).collect();
    Tensor::from_vec(v, [3, 64, 64]).unwrap()
}

#[test]
fn zero_proposals_give_no_detections() {
    let model = model_without_proposals();
    let dets = no_grad(|| model.detect(&[image(1), image(2)])).unwrap();
    assert_eq!(dets.len(), 2);
    for d in &dets {
        assert!(
            d.boxes.is_empty(),
            "{} boxes from no proposal",
            d.boxes.len()
        );
        assert!(d.scores.is_empty() && d.labels.is_empty());
    }
}

#[test]
fn zero_proposals_still_train() {
    let model = model_without_proposals();
    let params: Vec<Tensor> = model.params.iter().map(|(_, t)| t.clone()).collect();
    let tape = Tape::new();
    for p in &params {
        tape.watch(p);
    }
    // Image 0 has no object, so it has no RoI at all (no proposal, no ground truth
    // appended); image 1 has one, whose box is its only RoI.
    let targets = vec![
        Target {
            boxes: vec![],
            labels: vec![],
        },
        Target {
            boxes: vec![[8.0, 8.0, 40.0, 40.0]],
            labels: vec![2],
        },
    ];
    let mut rng = Rng::new(0);
    for targets in [targets[..1].to_vec(), targets.clone()] {
        let images: Vec<Tensor> = (0..targets.len() as u64).map(image).collect();
        let (losses, total) = {
            let _a = tape.activate();
            let ctx = Ctx::new(&model.params, true);
            let l = model.losses(&ctx, &images, &targets, &mut rng).unwrap();
            let total = kestrel::ops::add(&l[0].1, &l[2].1).unwrap();
            (l, total)
        };
        let names: Vec<&str> = losses.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "loss_objectness",
                "loss_rpn_box_reg",
                "loss_classifier",
                "loss_box_reg"
            ]
        );
        for (n, l) in &losses {
            let v = l.to_vec::<f32>().unwrap();
            assert!(v.len() == 1 && v[0].is_finite(), "{n} = {v:?}");
        }
        // Backward runs through the empty box head too.
        let grads = tape.backward(&total).unwrap();
        let g = grads
            .get(&params[0])
            .expect("the stem gets a gradient through the RPN")
            .to_vec::<f32>()
            .unwrap();
        assert!(g.iter().all(|v| v.is_finite()));
        // The classifier sees RoIs only when there is a ground-truth box.
        let cls = losses[2].1.to_vec::<f32>().unwrap()[0];
        if targets.len() == 1 {
            assert_eq!(cls, 0.0, "no RoI: the classifier loss is zero");
        } else {
            assert!(cls > 0.0, "one RoI: loss_classifier {cls}");
        }
    }
}
