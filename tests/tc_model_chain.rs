//! The model's bf16 inference backbone runs its residual blocks as one tensor-core
//! chain (`ResNet::blocks_chained`, kernels/tc_conv.cu): after the stem, one pack to
//! channels-last bf16, then each block is exactly its convs' launches (a bottleneck
//! three, four with a downsample; the frozen norms folded and ReLU and the residual
//! add in the epilogues) and each stage's output one unpack for the FPN. The convs
//! are packed once per weight version: a second forward packs no weight. The values
//! are checked against torchvision by tests/mixed_precision.rs (bf16 stage parity),
//! and the chain against the unchained kernels bit for bit by tests/tc_chain.rs.

mod common;

use kestrel::detection::{FasterRcnn, FasterRcnnConfig};
use kestrel::io::TensorFile;
use kestrel::nn::resnet::BlockKind;
use kestrel::nn::Precision;
use kestrel::tensor::DType;
use kestrel::Tensor;

fn bf16_model(device: kestrel::Device) -> FasterRcnn {
    let path = common::fixtures_dir().join("model/weights.safetensors");
    let params = TensorFile::open(&path).unwrap().params().unwrap();
    let cfg = FasterRcnnConfig::from_params(&params).unwrap();
    let mut m = FasterRcnn::load(cfg, &path).unwrap();
    m.to_device(device).unwrap();
    m.set_precision(Precision::Bf16);
    m
}

#[test]
fn bf16_inference_blocks_are_their_conv_launches_emulated() {
    let dev = common::emulated();
    let m = bf16_model(dev);
    let ctx = m.ctx(false);
    let data: Vec<f32> = (0..2 * 3 * 64 * 96)
        .map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0)
        .collect();
    let x = Tensor::from_vec(data, [2, 3, 64, 96])
        .unwrap()
        .to_device(dev)
        .unwrap();
    // Warm-up: folds and weight packs are made here, once.
    let first = m.body.forward(&ctx, &x).unwrap();
    kestrel::device::emu::take_thread_launches();
    let outs = m.body.forward(&ctx, &x).unwrap();
    let kernels = kestrel::device::emu::take_thread_launches();
    assert_eq!(outs.len(), 4, "C2..C5");
    for (a, b) in first.iter().zip(&outs) {
        assert_eq!(a.dtype(), DType::BF16, "stage outputs stay bf16");
        assert_eq!(
            a.to_vec::<f32>().unwrap(),
            b.to_vec::<f32>().unwrap(),
            "a second forward gives the same bits"
        );
    }
    assert!(
        !kernels.iter().any(|k| k == "tc_pack_weight_bf16"),
        "weights packed again on a second forward: {kernels:?}"
    );
    // The chain starts at the last activation pack (the stem's conv packs its own
    // input before it).
    let start = kernels
        .iter()
        .rposition(|k| k == "tc_pack_nhwc_bf16")
        .unwrap_or_else(|| panic!("no chain entry in {kernels:?}"));
    let cfg = &m.body.config;
    let convs = match cfg.block {
        BlockKind::Bottleneck => 3,
        BlockKind::Basic => 2,
    };
    let mut want = Vec::new();
    for (s, &blocks) in cfg.layers.iter().enumerate() {
        for b in 0..blocks {
            // torchvision's ResNet: the first block of each stage has a downsample
            // (stage 1 too, for bottlenecks, whose width changes).
            let down = b == 0 && (s > 0 || cfg.block == BlockKind::Bottleneck);
            want.extend(std::iter::repeat_n(
                "tc_conv_fwd_bf16",
                convs + down as usize,
            ));
        }
        want.push("tc_unpack_nhwc_bf16");
    }
    assert_eq!(
        kernels[start + 1..].to_vec(),
        want,
        "the blocks' launches after the chain entry"
    );
}
