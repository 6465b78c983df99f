//! Chains of tensor-core convolutions on bf16 channels-last activations
//! (src/ops/tc/chain.rs, kernels/tc_conv.cu with TC_NHWC) and split-K weight
//! gradients (tc_conv_wgrad_bf16 with gridDim.z > 1, tc_splitk_reduce_f32).
//!
//! - A bottleneck block in inference is exactly three launches of the forward conv
//!   kernel (four with a downsample), counted by the backend's counters, and its
//!   output equals the unchained NCHW path (`conv2d_tc` with bf16 outputs, which
//!   tests/tensor_core.rs checks against the CPU bf16 reference) bit for bit.
//! - The chain on the emulated device stays within bf16 noise of the CPU chain (the
//!   CPU reference through NCHW): intermediate bf16 roundings may flip by one ulp
//!   when the f32 sums are added in another order, so the bound is a relative error.
//! - Padding channels of a chained output are zero bits (the allocator poisons fresh
//!   blocks; a NaN there would reach the next conv).
//! - Split-K weight gradients: every slice count against the CPU bf16 reference
//!   within 2 K 2^-24 S (two orders of a K-term f32 sum; splitting is one more
//!   order), bit-identical on repeat (partials added in slice order, no atomics).
//!
//! `cargo test --test tc_chain`

mod common;

use kestrel::device::gpu;
use kestrel::ops::conv2d::{conv2d_backward_weight, conv2d_forward, Conv2dParams};
use kestrel::ops::tc::chain::{TcActivation, TcBottleneck, TcConv};
use kestrel::ops::tc::{self, TcConvWeight};
use kestrel::ops::Epilogue;
use kestrel::tensor::DType;
use kestrel::{Device, Tensor};

fn t32(seed: u64, shape: &[usize]) -> Tensor {
    common::rand_t(seed, shape).to_dtype(DType::F32).unwrap()
}

fn bits(t: &Tensor) -> Vec<u16> {
    t.to_device(Device::Cpu)
        .unwrap()
        .to_vec_bf16()
        .unwrap()
        .iter()
        .map(|v| v.to_bits())
        .collect()
}

fn host(t: &Tensor) -> Vec<f64> {
    t.to_vec::<f64>().unwrap()
}

/// One conv of a block: weights and a folded-BN-like scale (positive, near 1) and
/// shift, as host tensors.
struct HostConv {
    w: Tensor,
    scale: Tensor,
    shift: Tensor,
    p: Conv2dParams,
}

fn host_conv(seed: u64, cin: usize, cout: usize, k: usize, stride: usize) -> HostConv {
    let s: Vec<f32> = common::randn(seed + 1, cout)
        .iter()
        .map(|v| 1.0 + 0.25 * *v as f32)
        .collect();
    HostConv {
        w: t32(seed, &[cout, cin, k, k]),
        scale: Tensor::from_vec(s, [cout]).unwrap(),
        shift: t32(seed + 2, &[cout]),
        p: Conv2dParams::new(stride, k / 2, 1),
    }
}

impl HostConv {
    fn on(&self, dev: Device) -> TcConv {
        TcConv::new(
            &self.w.to_device(dev).unwrap(),
            Some(self.scale.to_device(dev).unwrap()),
            Some(self.shift.to_device(dev).unwrap()),
            self.p,
        )
        .unwrap()
    }

    /// The unchained path: NCHW in, NCHW bf16 out, one pack + one conv launch.
    fn unchained(&self, dev: Device, x: &Tensor, residual: Option<&Tensor>, relu: bool) -> Tensor {
        let (w, s, h) = (
            self.w.to_device(dev).unwrap(),
            self.scale.to_device(dev).unwrap(),
            self.shift.to_device(dev).unwrap(),
        );
        let ep = Epilogue {
            scale: Some(&s),
            shift: Some(&h),
            residual,
            relu,
            out_dtype: Some(DType::BF16),
        };
        tc::conv2d_tc(x, &w, &self.p, &ep).unwrap()
    }
}

struct Block {
    conv1: HostConv,
    conv2: HostConv,
    conv3: HostConv,
    down: Option<HostConv>,
}

/// in -> mid (1x1) -> mid (3x3, stride) -> out (1x1); a 1x1/stride projection when
/// the shape changes. Odd channel counts exercise the padding.
fn block(seed: u64, cin: usize, mid: usize, cout: usize, stride: usize) -> Block {
    Block {
        conv1: host_conv(seed, cin, mid, 1, 1),
        conv2: host_conv(seed + 10, mid, mid, 3, stride),
        conv3: host_conv(seed + 20, mid, cout, 1, 1),
        down: (cin != cout || stride != 1).then(|| host_conv(seed + 30, cin, cout, 1, stride)),
    }
}

impl Block {
    fn on(&self, dev: Device) -> TcBottleneck {
        TcBottleneck {
            conv1: self.conv1.on(dev),
            conv2: self.conv2.on(dev),
            conv3: self.conv3.on(dev),
            downsample: self.down.as_ref().map(|d| d.on(dev)),
        }
    }

    fn unchained(&self, dev: Device, x: &Tensor) -> Tensor {
        let y = self.conv1.unchained(dev, x, None, true);
        let y = self.conv2.unchained(dev, &y, None, true);
        let id = self.down.as_ref().map(|d| d.unchained(dev, x, None, false));
        self.conv3
            .unchained(dev, &y, Some(id.as_ref().unwrap_or(x)), true)
    }
}

fn check_block(b: &Block, x_dims: [usize; 4], want_launches: u64) {
    let dev = common::emulated();
    let Device::Cuda(ord) = dev else {
        unreachable!("the emulated device is a CUDA ordinal")
    };
    let gdev = gpu::device(ord).unwrap();
    let x = t32(7, &x_dims)
        .to_dtype(DType::BF16)
        .unwrap()
        .to_device(dev)
        .unwrap();
    let blk = b.on(dev);
    let act = TcActivation::from_nchw(&x).unwrap();

    kestrel::device::emu::take_thread_launches();
    let c = gdev.counters();
    let y = blk.forward(&act).unwrap();
    let d = c.delta();
    let kernels = kestrel::device::emu::take_thread_launches();
    assert_eq!(
        d.launches, want_launches,
        "launches of one block in inference: {d:?}"
    );
    assert!(
        kernels.iter().all(|k| k == "tc_conv_fwd_bf16"),
        "only conv launches in a block: {kernels:?}"
    );
    assert_eq!(d.dtoh + d.htod + d.syncs, 0, "no host traffic: {d:?}");

    // Padding channels of the output are zeros (fresh blocks are poisoned).
    let [n, c_out, oh, ow] = y.dims();
    let cp = y.channels_padded();
    assert!(cp > c_out || c_out % 8 == 0);
    let raw = bits(&y.nhwc().unwrap());
    for (i, v) in raw.iter().enumerate() {
        if i % cp >= c_out {
            assert_eq!(*v, 0, "padding channel {} of pixel {}", i % cp, i / cp);
        }
    }

    // Bit for bit the unchained path.
    let chained = y.to_nchw(DType::BF16).unwrap();
    assert_eq!(chained.dims(), &[n, c_out, oh, ow]);
    let unchained = b.unchained(dev, &x);
    assert_eq!(chained.dims(), unchained.dims());
    let (g, u) = (bits(&chained), bits(&unchained));
    let differ = g.iter().zip(&u).filter(|(a, b)| a != b).count();
    assert_eq!(
        differ,
        0,
        "{differ} of {} elements differ from the unchained path",
        g.len()
    );

    // Within bf16 noise of the CPU chain.
    let cpu = b
        .on(Device::Cpu)
        .forward(&TcActivation::from_nchw(&x.to_device(Device::Cpu).unwrap()).unwrap())
        .unwrap()
        .to_nchw(DType::F32)
        .unwrap();
    common::assert_close(
        "chain vs CPU chain",
        &chained.to_dtype(DType::F32).unwrap(),
        &cpu,
        2e-2,
    );
}

#[test]
fn bottleneck_block_is_three_conv_launches_and_equals_unchained_emulated() {
    // Identity residual: 64 -> 20 -> 20 -> 64 (mid channels padded to 24).
    check_block(&block(100, 64, 20, 64, 1), [2, 64, 6, 5], 3);
}

#[test]
fn bottleneck_block_with_downsample_is_four_launches_emulated() {
    // Stride 2 in the 3x3 and the projection, 40 -> 20 -> 20 -> 72.
    check_block(&block(200, 40, 20, 72, 2), [1, 40, 9, 7], 4);
}

#[test]
fn chain_round_trip_on_the_cpu_and_device_is_bf16_rounding() {
    let x = t32(9, &[2, 13, 3, 4]);
    let want = bits(&x.to_dtype(DType::BF16).unwrap());
    for dev in [Device::Cpu, common::emulated()] {
        let a = TcActivation::from_nchw(&x.to_device(dev).unwrap()).unwrap();
        assert_eq!(a.dims(), [2, 13, 3, 4]);
        assert_eq!(a.channels_padded(), 16);
        assert_eq!(a.nhwc().unwrap().dims(), &[2, 3, 4, 16]);
        // Stored channels-last: element (n=1, c=5, h=2, w=3).
        let raw = bits(&a.nhwc().unwrap());
        assert_eq!(
            raw[((3 + 2) * 4 + 3) * 16 + 5],
            want[((13 + 5) * 3 + 2) * 4 + 3]
        );
        assert_eq!(bits(&a.to_nchw(DType::BF16).unwrap()), want, "{dev:?}");
        let f = a.to_nchw(DType::F32).unwrap();
        assert_eq!(f.dtype(), DType::F32);
        assert_eq!(
            bits(&f.to_dtype(DType::BF16).unwrap()),
            want,
            "{dev:?} f32 exit"
        );
    }
}

#[test]
fn chain_shape_errors_are_errors() {
    let dev = common::emulated();
    let x = TcActivation::from_nchw(&t32(1, &[1, 8, 4, 4]).to_device(dev).unwrap()).unwrap();
    let c = host_conv(3, 8, 16, 3, 1).on(dev);
    // Residual of the wrong shape.
    let e = c.forward(&x, Some(&x), true).unwrap_err().to_string();
    assert!(e.contains("residual"), "{e}");
    // Weights for another channel count.
    let c12 = host_conv(4, 12, 16, 3, 1).on(dev);
    let e = c12.forward(&x, None, true).unwrap_err().to_string();
    assert!(e.contains("conv2d_tc_nhwc"), "{e}");
    // Weights on another device.
    let cpu = host_conv(3, 8, 16, 3, 1).on(Device::Cpu);
    let e = cpu.forward(&x, None, true).unwrap_err().to_string();
    assert!(e.contains("device") || e.contains("Cpu"), "{e}");
    // Not 4-D.
    let e = TcActivation::from_nchw(&t32(1, &[8, 4]).to_device(dev).unwrap())
        .unwrap_err()
        .to_string();
    assert!(e.contains("4-D"), "{e}");
}

// ---------------------------------------------------------------------------------
// Split-K weight gradient
// ---------------------------------------------------------------------------------

fn abs(t: &Tensor) -> Tensor {
    let v: Vec<f32> = t.to_vec::<f32>().unwrap().iter().map(|v| v.abs()).collect();
    Tensor::from_vec(v, t.dims().to_vec()).unwrap()
}

/// The weight gradient with `splits` slices (None: the library's choice) against the
/// CPU bf16 reference; returns it.
fn wgrad_within_bound(
    x: &Tensor,
    gy: &Tensor,
    w_dims: &[usize],
    p: &Conv2dParams,
    splits: Option<usize>,
) -> Vec<f64> {
    let dev = common::emulated();
    let (xd, gyd) = (x.to_device(dev).unwrap(), gy.to_device(dev).unwrap());
    let got = match splits {
        Some(s) => tc::conv2d_tc_backward_weight_split(&xd, &gyd, w_dims, p, s).unwrap(),
        None => tc::conv2d_tc_backward_weight(&xd, &gyd, w_dims, p).unwrap(),
    };
    let want = host(&tc::conv2d_bf16_reference_backward_weight(x, gy, w_dims, p).unwrap());
    let s = host(
        &conv2d_backward_weight(
            &abs(&tc::round_to_bf16(x).unwrap()),
            &abs(&tc::round_to_bf16(gy).unwrap()),
            w_dims,
            p,
        )
        .unwrap(),
    );
    let k = (gy.dims()[0] * gy.dims()[2] * gy.dims()[3]) as f64;
    let got = host(&got);
    for i in 0..got.len() {
        let bound = 2.0 * k * 2f64.powi(-24) * s[i] + 1e-30;
        assert!(
            (got[i] - want[i]).abs() <= bound,
            "splits {splits:?}: element {i} got {} want {} (bound {bound:.3e})",
            got[i],
            want[i]
        );
    }
    got
}

#[test]
fn wgrad_split_k_matches_reference_for_every_slice_count_emulated() {
    // K = N OH OW = 2 * 12 * 11 = 264 pixels: 9 K tiles of 32.
    let p = Conv2dParams::new(1, 1, 1);
    let x = t32(51, &[2, 12, 12, 11]);
    let w_dims = [20, 12, 3, 3];
    let y = conv2d_forward(&x, &t32(52, &w_dims), None, &p).unwrap();
    let gy = t32(53, y.dims());
    let one = wgrad_within_bound(&x, &gy, &w_dims, &p, Some(1));
    // 2, 3 and 4 slices split 9 tiles unevenly; 9 gives one tile each; 13 leaves
    // slices with no tile (they add zeros).
    for s in [2, 3, 4, 9, 13] {
        let got = wgrad_within_bound(&x, &gy, &w_dims, &p, Some(s));
        // Splitting changes the summation order, so not the same bits in general,
        // but the same values to f32 noise.
        let e = common::rel_err(&got, &one);
        assert!(e < 1e-5, "splits {s}: relative error {e:.3e} vs one slice");
        // Deterministic: the same split twice gives the same bits.
        let again = wgrad_within_bound(&x, &gy, &w_dims, &p, Some(s));
        assert!(
            got.iter()
                .zip(&again)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "splits {s}: two runs differ"
        );
    }
}

#[test]
fn wgrad_default_splits_a_small_output_and_reduces_in_one_more_launch_emulated() {
    // A 64-channel 3x3 conv: 9 output tiles, K = 2 * 16 * 16 = 512 pixels (16 tiles).
    let p = Conv2dParams::new(1, 1, 1);
    let w_dims = [64, 64, 3, 3];
    let splits = tc::wgrad_splits(w_dims, 512);
    assert_eq!(splits, 2, "16 K tiles, at least 8 per slice");
    // R50 layer1 3x3 at batch 2, 200 x 336 input: 9 tiles, 8400 pixels: 29 slices
    // (264 / 9) keep the SMs busy; layer4's 1x1 2048 -> 512 has 256 tiles: no split.
    assert_eq!(tc::wgrad_splits(w_dims, 2 * 50 * 84), 29);
    assert_eq!(tc::wgrad_splits([2048, 512, 1, 1], 2 * 7 * 11), 1);

    let x = t32(61, &[2, 64, 16, 16]);
    let gy = t32(62, &[2, 64, 16, 16]);
    let dev = common::emulated();
    let Device::Cuda(ord) = dev else {
        unreachable!("the emulated device is a CUDA ordinal")
    };
    let (xd, gyd) = (x.to_device(dev).unwrap(), gy.to_device(dev).unwrap());
    kestrel::device::emu::take_thread_launches();
    let c = gpu::device(ord).unwrap().counters();
    tc::conv2d_tc_backward_weight(&xd, &gyd, &w_dims, &p).unwrap();
    let d = c.delta();
    let kernels = kestrel::device::emu::take_thread_launches();
    assert_eq!(d.launches, 4, "2 packs, wgrad, reduce: {kernels:?}");
    assert_eq!(
        kernels
            .iter()
            .filter(|k| *k == "tc_splitk_reduce_f32")
            .count(),
        1,
        "{kernels:?}"
    );
    wgrad_within_bound(&x, &gy, &w_dims, &p, None);
}

#[test]
fn packed_weights_on_the_cpu_run_the_reference() {
    let x = t32(71, &[1, 5, 4, 4]);
    let w = t32(72, &[3, 5, 3, 3]);
    let p = Conv2dParams::new(1, 1, 1);
    let packed = TcConvWeight::new(&w).unwrap();
    assert_eq!(packed.dims(), [3, 5, 3, 3]);
    let ep = Epilogue::default();
    let got = tc::conv2d_tc_packed(&x, &packed, &p, &ep).unwrap();
    let want = tc::conv2d_bf16_reference(&x, &w, &p, &ep).unwrap();
    assert_eq!(host(&got), host(&want));
}

// ---------------------------------------------------------------------------------
// Strided input gradient: one phase per (ih mod sh, iw mod sw), live taps only
// ---------------------------------------------------------------------------------

/// The input gradient against the CPU bf16 reference within 2 K 2^-24 S (K = Cout kh
/// kw bounds the live taps of any phase).
fn check_dgrad(x_dims: [usize; 4], cout: usize, k: (usize, usize), p: Conv2dParams) {
    let dev = common::emulated();
    let w_dims = [cout, x_dims[1], k.0, k.1];
    let w = t32(81, &w_dims);
    let y = conv2d_forward(&t32(80, &x_dims), &w, None, &p).unwrap();
    let gy = t32(82, y.dims());
    let got = tc::conv2d_tc_backward_input(
        &gy.to_device(dev).unwrap(),
        &w.to_device(dev).unwrap(),
        &x_dims,
        &p,
    )
    .unwrap();
    let want = host(&tc::conv2d_bf16_reference_backward_input(&gy, &w, &x_dims, &p).unwrap());
    let s = host(
        &kestrel::ops::conv2d::conv2d_backward_input(
            &abs(&tc::round_to_bf16(&gy).unwrap()),
            &abs(&tc::round_to_bf16(&w).unwrap()),
            &x_dims,
            &p,
        )
        .unwrap(),
    );
    let kk = (cout * k.0 * k.1) as f64;
    let got = host(&got);
    let mut nonzero = 0;
    for i in 0..got.len() {
        let bound = 2.0 * kk * 2f64.powi(-24) * s[i] + 1e-30;
        assert!(
            (got[i] - want[i]).abs() <= bound,
            "{x_dims:?} k {k:?} {p:?}: element {i} got {} want {} (bound {bound:.3e})",
            got[i],
            want[i]
        );
        nonzero += (want[i] != 0.0) as usize;
    }
    assert!(nonzero > 0, "{x_dims:?} {p:?}: a vacuous case");
}

#[test]
fn dgrad_strided_phases_match_reference_emulated() {
    let p = |s: (usize, usize), pad: (usize, usize), d: (usize, usize)| Conv2dParams {
        stride: s,
        padding: pad,
        dilation: d,
    };
    // Stride 2 with dilation 2: in each phase either every tap or none is live.
    check_dgrad([1, 8, 9, 8], 16, (3, 3), p((2, 2), (2, 2), (2, 2)));
    // Stride 3, dilation 2 (step 3, gcd 1), a 5x3 kernel.
    check_dgrad([2, 5, 11, 10], 12, (5, 3), p((3, 3), (2, 1), (2, 1)));
    // Different strides per axis; pixels past the last window get zeros.
    check_dgrad([1, 16, 7, 9], 24, (3, 3), p((2, 1), (0, 1), (1, 1)));
    // A 1x1 stride-2 projection: odd pixels have no live tap (zero gradient).
    check_dgrad([1, 24, 5, 6], 8, (1, 1), p((2, 2), (0, 0), (1, 1)));
    // A map smaller than the stride: phases with no pixel.
    check_dgrad([2, 8, 1, 1], 8, (3, 3), p((2, 2), (1, 1), (1, 1)));
}

#[test]
fn basic_block_is_two_conv_launches_and_equals_unchained_emulated() {
    use kestrel::ops::tc::chain::TcBasicBlock;
    let dev = common::emulated();
    let Device::Cuda(ord) = dev else {
        unreachable!("the emulated device is a CUDA ordinal")
    };
    let (c1, c2) = (host_conv(300, 24, 24, 3, 1), host_conv(310, 24, 24, 3, 1));
    let x = t32(8, &[1, 24, 6, 7])
        .to_dtype(DType::BF16)
        .unwrap()
        .to_device(dev)
        .unwrap();
    let blk = TcBasicBlock {
        conv1: c1.on(dev),
        conv2: c2.on(dev),
        downsample: None,
    };
    let act = TcActivation::from_nchw(&x).unwrap();
    let c = gpu::device(ord).unwrap().counters();
    let y = blk.forward(&act).unwrap();
    assert_eq!(c.delta().launches, 2);
    let y1 = c1.unchained(dev, &x, None, true);
    let want = c2.unchained(dev, &y1, Some(&x), true);
    assert_eq!(bits(&y.to_nchw(DType::BF16).unwrap()), bits(&want));
}
