//! Why the bf16 model's confident detections from its OWN proposals do not all match
//! torchvision's f32 ones within 1 px (from torchvision's proposals they all do:
//! tests/mixed_precision.rs). Measurement: prints, per image, how many of
//! torchvision's proposals the bf16 RPN reproduces and, for each confident
//! torchvision detection without a bf16 twin within 1 px, the nearest same-label
//! bf16 detection (IoU, largest coordinate difference, scores).

mod common;

use common::{fixture_dets, iou, orig_sizes};
use kestrel::detection::transform::image_from_u8;
use kestrel::nn::Precision;
use kestrel::{Device, Tensor};

#[test]
#[ignore = "measurement: prints how bf16's own proposals and detections differ from torchvision's"]
fn bf16_own_proposals_versus_torchvision() {
    let f = common::fixture("model/eval.safetensors");
    let device = Device::Cpu;
    let mut m = common::fixture_model(device);
    m.set_precision(Precision::Bf16);
    let imgs: Vec<Tensor> = (0..)
        .map(|i| format!("image{i}.u8"))
        .take_while(|n| f.contains(n))
        .map(|n| {
            let (v, s) = f.ints(&n).unwrap();
            let bytes: Vec<u8> = v.into_iter().map(|x| x as u8).collect();
            image_from_u8(&bytes, s.dim(1), s.dim(2)).unwrap()
        })
        .collect();
    let trace = kestrel::autograd::no_grad(|| m.detect_traced(&imgs)).unwrap();
    let _ = orig_sizes(&f);
    for (i, got) in trace.detections.iter().enumerate() {
        let tv = f.tensor(&format!("rpn.proposals{i}")).unwrap();
        let tvp = tv.to_vec::<f32>().unwrap();
        let own = trace.proposals[i].to_vec::<f32>().unwrap();
        let (nt, no) = (tvp.len() / 4, own.len() / 4);
        let same_rank = (0..nt.min(no))
            .take_while(|&k| (0..4).all(|c| (tvp[4 * k + c] - own[4 * k + c]).abs() <= 0.5))
            .count();
        let found = (0..nt)
            .filter(|&k| {
                (0..no).any(|j| (0..4).all(|c| (tvp[4 * k + c] - own[4 * j + c]).abs() <= 0.5))
            })
            .count();
        eprintln!(
            "image {i}: proposals torchvision {nt}, bf16 {no}; first {same_rank} identical in order (0.5 px); {found} of torchvision's present in bf16's list"
        );
        let want = fixture_dets(&f, i);
        let (mut n, mut ok) = (0, 0);
        for k in (0..want.scores.len()).filter(|&k| want.scores[k] > 0.5) {
            n += 1;
            let near = (0..got.scores.len())
                .filter(|&j| got.labels[j] == want.labels[k])
                .map(|j| {
                    let d = (0..4)
                        .map(|c| (got.boxes[j][c] - want.boxes[k][c]).abs())
                        .fold(0.0f32, f32::max);
                    (d, j)
                })
                .min_by(|x, y| x.0.total_cmp(&y.0));
            match near {
                Some((d, _)) if d <= 1.0 => ok += 1,
                Some((d, j)) => eprintln!(
                    "  tv det {k} label {} score {:.3} box {:?}: nearest bf16 det {j} max diff {d:.2} px, IoU {:.3}, score {:.3}",
                    want.labels[k],
                    want.scores[k],
                    want.boxes[k],
                    iou(&got.boxes[j], &want.boxes[k]),
                    got.scores[j]
                ),
                None => eprintln!(
                    "  tv det {k} label {} score {:.3}: no bf16 det of that label",
                    want.labels[k], want.scores[k]
                ),
            }
        }
        eprintln!("image {i}: {ok} of {n} confident torchvision detections within 1 px");
    }
}
