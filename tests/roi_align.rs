#![allow(clippy::type_complexity)] // fixture loaders return (pooler, maps, proposals, sizes, ...) tuples
//! RoIAlign and MultiScaleRoIAlign: parity with torchvision's fixtures (forward and
//! input gradients), a slow direct transcription of torchvision's loops as a second
//! reference on random inputs, f64 gradient checks, edge cases and errors. Every check
//! is a `check_*_on(device)` run on the CPU, the emulated device and CUDA (`device_tests!`).

mod common;

use common::{assert_close, fixture};
use kestrel::autograd::{gradcheck, Tape};
use kestrel::detection::poolers::{infer_scale, MultiScaleRoIAlign};
use kestrel::ops::roi_align::{roi_align, roi_align_backward, RoiAlignParams};
use kestrel::rng::Rng;
use kestrel::{DType, Device, Tensor};

const FWD_TOL: f64 = 1e-5;
const GRAD_TOL: f64 = 1e-4;

fn params_of(case: &serde_json::Value) -> RoiAlignParams {
    let os = case["output_size"].as_array().expect("output_size");
    RoiAlignParams {
        output_size: (
            os[0].as_u64().unwrap() as usize,
            os[1].as_u64().unwrap() as usize,
        ),
        spatial_scale: case["spatial_scale"].as_f64().unwrap(),
        sampling_ratio: case["sampling_ratio"].as_u64().unwrap() as usize,
        aligned: case["aligned"].as_bool().unwrap(),
    }
}

/// y and dL/d(input) of roi_align with the tape, upstream gradient `gy`.
fn roi_align_with_grad(
    input: &Tensor,
    rois: &Tensor,
    gy: &Tensor,
    p: RoiAlignParams,
) -> (Tensor, Tensor) {
    let tape = Tape::new();
    tape.watch(input);
    let y = {
        let _g = tape.activate();
        roi_align(input, rois, p).unwrap()
    };
    let grads = tape.backward_with(&y, gy.clone()).unwrap();
    (y, grads.expect(input).unwrap().clone())
}

// ---------------------------------------------------------------------------------
// Parity with torchvision
// ---------------------------------------------------------------------------------

fn check_roi_align_fixtures_on(dev: Device) {
    let f = fixture("ops/roi_align.safetensors");
    let params = f.params().unwrap();
    for case in common::cases(&f) {
        let p = params_of(&params[&case]);
        let t = |n: &str| f.tensor(&format!("{case}.{n}")).unwrap();
        let (input, rois) = (
            t("input").to_device(dev).unwrap(),
            t("rois").to_device(dev).unwrap(),
        );
        let gy = t("gy").to_device(dev).unwrap();
        let (y, gin) = roi_align_with_grad(&input, &rois, &gy, p);
        assert_eq!(y.device(), dev);
        assert_close(&format!("{case} y ({p:?})"), &y, &t("y"), FWD_TOL);
        assert_close(
            &format!("{case} ginput ({p:?})"),
            &gin,
            &t("ginput"),
            GRAD_TOL,
        );
    }
}

/// The fixture's pooler settings and per-image tensors.
fn multiscale_fixture(
    dev: Device,
) -> (
    MultiScaleRoIAlign,
    Vec<Tensor>,
    Vec<Tensor>,
    Vec<(usize, usize)>,
    Tensor,
) {
    let f = fixture("ops/multiscale_roi_align.safetensors");
    let params = f.params().unwrap();
    let mut pools = Vec::new();
    for case in common::cases(&f) {
        let c = &params[&case];
        let os = c["output_size"].as_u64().unwrap() as usize;
        let mut m =
            MultiScaleRoIAlign::new((os, os), c["sampling_ratio"].as_u64().unwrap() as usize);
        m.canonical_level = c["canonical_level"].as_f64().unwrap();
        m.canonical_scale = c["canonical_scale"].as_f64().unwrap();
        let sizes: Vec<(usize, usize)> = c["image_sizes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                (
                    s[0].as_u64().unwrap() as usize,
                    s[1].as_u64().unwrap() as usize,
                )
            })
            .collect();
        pools.push((m, sizes));
    }
    assert_eq!(pools.len(), 1, "one pooler case expected");
    let (m, sizes) = pools.pop().unwrap();
    let feats: Vec<Tensor> = (0..)
        .map(|i| format!("feat{i}"))
        .take_while(|n| f.contains(n))
        .map(|n| f.tensor(&n).unwrap().to_device(dev).unwrap())
        .collect();
    let props: Vec<Tensor> = (0..sizes.len())
        .map(|i| {
            f.tensor(&format!("proposals{i}"))
                .unwrap()
                .to_device(dev)
                .unwrap()
        })
        .collect();
    (m, feats, props, sizes, f.tensor("y").unwrap())
}

fn check_multiscale_fixture_on(dev: Device) {
    let (m, feats, props, sizes, want) = multiscale_fixture(dev);
    assert_eq!(feats.len(), 4, "P2..P5");
    let y = m.forward(&feats, &props, &sizes).unwrap();
    assert_eq!(y.device(), dev);
    assert_close("multiscale y", &y, &want, FWD_TOL);
}

/// The fixture's MultiScaleRoIAlign gradient against the per-level reference: each
/// level's gradient is that of torchvision's roi_align over the RoIs mapped to it.
fn check_multiscale_backward_on(dev: Device) {
    let (m, feats, props, sizes, _) = multiscale_fixture(dev);
    let k: usize = props.iter().map(|p| p.dims()[0]).sum();
    let c = feats[0].dims()[1];
    let gy_v = common::randn(7, k * c * 49);
    let gy = Tensor::from_vec(gy_v.iter().map(|&v| v as f32).collect(), [k, c, 7, 7]).unwrap();
    let tape = Tape::new();
    feats.iter().for_each(|f| tape.watch(f));
    let y = {
        let _g = tape.activate();
        m.forward(&feats, &props, &sizes).unwrap()
    };
    let grads = tape.backward_with(&y, gy.to_device(dev).unwrap()).unwrap();
    // Reference: boxes and levels on the host, torchvision's loops per level.
    let boxes: Vec<(usize, [f64; 4])> = props
        .iter()
        .enumerate()
        .flat_map(|(i, p)| {
            let v = p.to_vec::<f64>().unwrap();
            v.chunks(4)
                .map(|b| (i, [b[0], b[1], b[2], b[3]]))
                .collect::<Vec<_>>()
        })
        .collect();
    let setup = MultiScaleRoIAlign::setup(
        &feats.iter().map(|f| f.dims()[2]).collect::<Vec<_>>(),
        &sizes,
    )
    .unwrap();
    let mut levels_seen = [0usize; 4];
    for (l, feat) in feats.iter().enumerate() {
        let mut rois = Vec::new();
        let mut gy_l = Vec::new();
        for (row, (img, b)) in boxes.iter().enumerate() {
            let bf = b.map(|v| v as f32);
            if m.level_of(bf, setup.k_min, setup.k_max) == Some(l) {
                rois.push([*img as f64, b[0], b[1], b[2], b[3]]);
                gy_l.extend_from_slice(&gy_v[row * c * 49..(row + 1) * c * 49]);
            }
        }
        levels_seen[l] = rois.len();
        let p = RoiAlignParams::new((7, 7), setup.scales[l], m.sampling_ratio);
        let want = naive_backward(feat.dims(), &rois, &gy_l, p);
        let want = Tensor::from_vec(want, feat.dims().to_vec()).unwrap();
        assert_close(
            &format!("multiscale grad level {l}"),
            grads.expect(feat).unwrap(),
            &want,
            GRAD_TOL,
        );
    }
    assert!(
        levels_seen.iter().filter(|&&n| n > 0).count() >= 2,
        "fixture RoIs hit levels {levels_seen:?}"
    );
}

crate::device_tests! {
    roi_align_matches_torchvision => check_roi_align_fixtures_on;
    multiscale_roi_align_matches_torchvision => check_multiscale_fixture_on;
    multiscale_roi_align_backward_matches_per_level_reference => check_multiscale_backward_on;
}

// ---------------------------------------------------------------------------------
// A slow second reference: torchvision's loops, transcribed directly (f64)
// ---------------------------------------------------------------------------------

/// `(weights, indices)` of one sample, or None outside the map (torchvision's
/// bilinear_interpolate_gradient).
fn naive_taps(h: usize, w: usize, mut y: f64, mut x: f64) -> Option<([f64; 4], [usize; 4])> {
    let (hf, wf) = (h as f64, w as f64);
    if y < -1.0 || y > hf || x < -1.0 || x > wf || y.is_nan() || x.is_nan() {
        return None;
    }
    y = y.max(0.0);
    x = x.max(0.0);
    let (mut yl, mut xl) = (y as usize, x as usize);
    let (yh, xh);
    if yl >= h - 1 {
        yl = h - 1;
        yh = yl;
        y = yl as f64;
    } else {
        yh = yl + 1;
    }
    if xl >= w - 1 {
        xl = w - 1;
        xh = xl;
        x = xl as f64;
    } else {
        xh = xl + 1;
    }
    let (ly, lx) = (y - yl as f64, x - xl as f64);
    let (hy, hx) = (1.0 - ly, 1.0 - lx);
    Some((
        [hy * hx, hy * lx, ly * hx, ly * lx],
        [yl * w + xl, yl * w + xh, yh * w + xl, yh * w + xh],
    ))
}

/// Visit every sample of bin (ph_i, pw_i) of `roi` with its taps and the bin's count.
fn naive_samples(
    roi: &[f64; 5],
    h: usize,
    w: usize,
    p: RoiAlignParams,
    ph_i: usize,
    pw_i: usize,
    mut f: impl FnMut(Option<([f64; 4], [usize; 4])>, f64),
) {
    let off = if p.aligned { 0.5 } else { 0.0 };
    let s = p.spatial_scale;
    let (sw, sh) = (roi[1] * s - off, roi[2] * s - off);
    let (mut rw, mut rh) = (roi[3] * s - off - sw, roi[4] * s - off - sh);
    if !p.aligned {
        rw = rw.max(1.0);
        rh = rh.max(1.0);
    }
    let (ph, pw) = p.output_size;
    let (bh, bw) = (rh / ph as f64, rw / pw as f64);
    let grid = |r: f64, n: usize| {
        if p.sampling_ratio > 0 {
            p.sampling_ratio
        } else {
            (r / n as f64).ceil().max(0.0) as usize
        }
    };
    let (gh, gw) = (grid(rh, ph), grid(rw, pw));
    let count = (gh * gw).max(1) as f64;
    for iy in 0..gh {
        let y = sh + ph_i as f64 * bh + (iy as f64 + 0.5) * bh / gh as f64;
        for ix in 0..gw {
            let x = sw + pw_i as f64 * bw + (ix as f64 + 0.5) * bw / gw as f64;
            f(naive_taps(h, w, y, x), count);
        }
    }
}

fn naive_forward(input: &[f64], dims: &[usize], rois: &[[f64; 5]], p: RoiAlignParams) -> Vec<f64> {
    let (c, h, w) = (dims[1], dims[2], dims[3]);
    let (ph, pw) = p.output_size;
    let mut y = Vec::new();
    for roi in rois {
        let b = roi[0] as usize;
        for ci in 0..c {
            let plane = &input[(b * c + ci) * h * w..][..h * w];
            for ph_i in 0..ph {
                for pw_i in 0..pw {
                    let (mut acc, mut cnt) = (0.0, 1.0);
                    naive_samples(roi, h, w, p, ph_i, pw_i, |t, count| {
                        cnt = count;
                        if let Some((wt, ix)) = t {
                            acc += (0..4).map(|j| wt[j] * plane[ix[j]]).sum::<f64>();
                        }
                    });
                    y.push(acc / cnt);
                }
            }
        }
    }
    y
}

fn naive_backward(dims: &[usize], rois: &[[f64; 5]], gy: &[f64], p: RoiAlignParams) -> Vec<f64> {
    let (c, h, w) = (dims[1], dims[2], dims[3]);
    let (ph, pw) = p.output_size;
    let mut g = vec![0.0; dims.iter().product()];
    for (k, roi) in rois.iter().enumerate() {
        let b = roi[0] as usize;
        for ci in 0..c {
            let plane = &mut g[(b * c + ci) * h * w..][..h * w];
            for ph_i in 0..ph {
                for pw_i in 0..pw {
                    let gv = gy[((k * c + ci) * ph + ph_i) * pw + pw_i];
                    naive_samples(roi, h, w, p, ph_i, pw_i, |t, count| {
                        if let Some((wt, ix)) = t {
                            for j in 0..4 {
                                plane[ix[j]] += gv * wt[j] / count;
                            }
                        }
                    });
                }
            }
        }
    }
    g
}

/// Random RoIs in input pixels for a map of `h x w` at `scale`: some inside, some
/// partly outside, some tiny, some inverted.
fn random_rois(rng: &mut Rng, k: usize, n: usize, h: usize, w: usize, scale: f64) -> Vec<[f64; 5]> {
    let (ih, iw) = (h as f64 / scale, w as f64 / scale);
    (0..k)
        .map(|i| {
            let x1 = rng.range(-0.3 * iw, 1.1 * iw);
            let y1 = rng.range(-0.3 * ih, 1.1 * ih);
            let (bw, bh) = match i % 4 {
                0 => (rng.range(0.05, 0.3) / scale, rng.range(0.05, 0.3) / scale),
                1 => (rng.range(-3.0, -0.1) / scale, rng.range(0.5, 4.0) / scale),
                _ => (rng.range(0.1, 0.8) * iw, rng.range(0.1, 0.8) * ih),
            };
            [rng.below(n as u64) as f64, x1, y1, x1 + bw, y1 + bh]
        })
        .collect()
}

fn rois_tensor(rois: &[[f64; 5]]) -> Tensor {
    Tensor::from_vec(
        rois.iter().flatten().copied().collect::<Vec<f64>>(),
        [rois.len(), 5],
    )
    .unwrap()
}

fn f32_on(t: &Tensor, dev: Device) -> Tensor {
    t.to_dtype(DType::F32).unwrap().to_device(dev).unwrap()
}

/// Forward and input gradient on random inputs against the direct transcription.
fn check_random_on(dev: Device) {
    let mut rng = Rng::new(11);
    let dims = [2, 3, 9, 13];
    for (i, (ratio, aligned, scale, out)) in [
        (0, false, 0.5, (3, 4)),
        (2, false, 0.25, (2, 2)),
        (0, true, 1.0, (4, 3)),
        (3, true, 0.5, (1, 5)),
    ]
    .into_iter()
    .enumerate()
    {
        let p = RoiAlignParams {
            output_size: out,
            spatial_scale: scale,
            sampling_ratio: ratio,
            aligned,
        };
        let input = common::rand_t(100 + i as u64, &dims);
        let rois = random_rois(&mut rng, 16, dims[0], dims[2], dims[3], scale);
        let rois_t = rois_tensor(&rois);
        // f32 inputs, f64 reference on the same (rounded) values.
        let (x32, r32) = (f32_on(&input, dev), f32_on(&rois_t, dev));
        let xv = x32.to_vec::<f64>().unwrap();
        let rv: Vec<[f64; 5]> = r32
            .to_vec::<f64>()
            .unwrap()
            .chunks(5)
            .map(|r| [r[0], r[1], r[2], r[3], r[4]])
            .collect();
        let k = rois.len();
        let gy_v = common::randn(200 + i as u64, k * dims[1] * out.0 * out.1);
        let gy = f32_on(
            &Tensor::from_vec(gy_v.clone(), [k, dims[1], out.0, out.1]).unwrap(),
            dev,
        );
        let (y, gin) = roi_align_with_grad(&x32, &r32, &gy, p);
        let want_y =
            Tensor::from_vec(naive_forward(&xv, &dims, &rv, p), y.dims().to_vec()).unwrap();
        let want_g = Tensor::from_vec(naive_backward(&dims, &rv, &gy_v, p), dims.to_vec()).unwrap();
        assert_close(&format!("random y {p:?}"), &y, &want_y, FWD_TOL);
        assert_close(&format!("random ginput {p:?}"), &gin, &want_g, GRAD_TOL);
        // f64 on the CPU agrees with the reference to f64 rounding.
        if dev == Device::Cpu {
            let y64 = roi_align(&input, &rois_t, p).unwrap();
            let want = naive_forward(&input.to_vec::<f64>().unwrap(), &dims, &rois, p);
            assert_close(
                &format!("random f64 y {p:?}"),
                &y64,
                &Tensor::from_vec(want, y64.dims().to_vec()).unwrap(),
                1e-12,
            );
        }
    }
}

crate::device_tests! {
    roi_align_matches_direct_reference_on_random_inputs => check_random_on;
}

// ---------------------------------------------------------------------------------
// Gradient checks (f64, CPU)
// ---------------------------------------------------------------------------------

#[test]
fn roi_align_gradcheck() {
    for seed in 0..4u64 {
        let mut rng = Rng::new(seed);
        let dims = [2, 2, 6, 7];
        let p = RoiAlignParams {
            output_size: (2 + seed as usize % 2, 3),
            spatial_scale: 0.5,
            sampling_ratio: seed as usize % 3,
            aligned: seed % 2 == 1,
        };
        // Coordinates with irrational-ish offsets: no sample lands on a grid point.
        let rois: Vec<[f64; 5]> =
            random_rois(&mut rng, 6, dims[0], dims[2], dims[3], p.spatial_scale)
                .into_iter()
                .map(|r| {
                    [
                        r[0],
                        r[1] + 0.0137,
                        r[2] + 0.0291,
                        r[3] + 0.0173,
                        r[4] + 0.0119,
                    ]
                })
                .collect();
        let input = common::rand_t(seed + 50, &dims);
        let rep = gradcheck(
            |xs| roi_align(&xs[0], &xs[1], p),
            &[input, rois_tensor(&rois)],
            &[0],
            seed,
            1e-6,
            1e-6,
        )
        .unwrap_or_else(|e| panic!("{p:?}: {e}"));
        assert_eq!(rep.checked, dims.iter().product::<usize>());
    }
}

/// A small pyramid (P2..P5 of a 64x64 batch) with boxes of every level, f64.
fn small_pyramid(
    seed: u64,
) -> (
    MultiScaleRoIAlign,
    Vec<Tensor>,
    Vec<Tensor>,
    Vec<(usize, usize)>,
) {
    let mut rng = Rng::new(seed);
    let feats: Vec<Tensor> = [16usize, 8, 4, 2]
        .iter()
        .enumerate()
        .map(|(i, &s)| common::rand_t(seed * 10 + i as u64, &[2, 2, s, s + 1]))
        .collect();
    let sides = [40.0, 150.0, 300.0, 600.0, 20.0, 120.0];
    let props: Vec<Tensor> = (0..2)
        .map(|img| {
            let v: Vec<f64> = (0..5)
                .flat_map(|j| {
                    let side: f64 = sides[(j + img) % sides.len()] * rng.range(0.9, 1.1);
                    let (x1, y1) = (rng.range(-side * 0.5, 50.0), rng.range(-side * 0.5, 50.0));
                    [x1, y1, x1 + side * rng.range(0.7, 1.3), y1 + side]
                })
                .collect();
            Tensor::from_vec(v, [5, 4]).unwrap()
        })
        .collect();
    (
        MultiScaleRoIAlign::new((3, 2), seed as usize % 3),
        feats,
        props,
        vec![(64, 60), (60, 64)],
    )
}

#[test]
fn multiscale_roi_align_gradcheck() {
    for seed in 1..4u64 {
        let (m, feats, props, sizes) = small_pyramid(seed);
        let nf = feats.len();
        let inputs: Vec<Tensor> = feats.into_iter().chain(props).collect();
        gradcheck(
            |xs| m.forward(&xs[..nf], &xs[nf..], &sizes),
            &inputs,
            &(0..nf).collect::<Vec<_>>(),
            seed,
            1e-6,
            1e-6,
        )
        .unwrap_or_else(|e| panic!("seed {seed}: {e}"));
    }
}

// ---------------------------------------------------------------------------------
// Level mapping and scales
// ---------------------------------------------------------------------------------

#[test]
fn level_mapper_follows_torchvision() {
    let m = MultiScaleRoIAlign::new((7, 7), 2);
    let lvl = |side: f32| m.level_of([10.0f32, 10.0, 10.0 + side, 10.0 + side], 2, 5);
    // floor(4 + log2(side / 224) + 1e-6), clamped to [2, 5], minus 2.
    assert_eq!(lvl(224.0), Some(2));
    assert_eq!(lvl(223.0), Some(1));
    assert_eq!(lvl(112.0), Some(1));
    assert_eq!(lvl(111.5), Some(0));
    assert_eq!(lvl(448.0), Some(3));
    assert_eq!(lvl(5000.0), Some(3));
    assert_eq!(lvl(1.0), Some(0));
    assert_eq!(
        lvl(0.0),
        Some(0),
        "zero area maps to -inf, clamped to k_min"
    );
    assert_eq!(
        m.level_of([10.0f32, 10.0, 5.0, 20.0], 2, 5),
        None,
        "negative area"
    );
    assert_eq!(m.level_of([f32::NAN, 10.0, 5.0, 20.0], 2, 5), None);
}

#[test]
fn scales_follow_torchvision_infer_scale() {
    assert_eq!(infer_scale(200, 800), 0.25);
    assert_eq!(infer_scale(25, 800), 1.0 / 32.0);
    assert_eq!(infer_scale(13, 800), 1.0 / 64.0);
    assert_eq!(infer_scale(80, 320), 0.25);
    let s = MultiScaleRoIAlign::setup(&[200, 100, 50, 25], &[(800, 1216), (768, 1216)]).unwrap();
    assert_eq!((s.k_min, s.k_max), (2, 5));
    assert_eq!(s.scales, vec![0.25, 0.125, 0.0625, 0.03125]);
    assert!(
        MultiScaleRoIAlign::setup(&[200, 50], &[(800, 1216)]).is_err(),
        "P2, P4: not consecutive"
    );
    assert!(MultiScaleRoIAlign::setup(&[200], &[]).is_err());
}

// ---------------------------------------------------------------------------------
// Edge cases and errors
// ---------------------------------------------------------------------------------

fn check_edge_cases_on(dev: Device) {
    let dims = [1, 2, 5, 6];
    let input = f32_on(&common::rand_t(3, &dims), dev);
    let xv = input.to_vec::<f64>().unwrap();
    let p = RoiAlignParams::new((2, 2), 1.0, 0);
    let rois = |v: Vec<f32>| {
        Tensor::from_vec(v.clone(), [v.len() / 5, 5])
            .unwrap()
            .to_device(dev)
            .unwrap()
    };

    // No RoIs: an empty output; its backward is a zero gradient.
    let y = roi_align(&input, &rois(vec![]), p).unwrap();
    assert_eq!(y.dims(), [0, 2, 2, 2]);
    let gy = Tensor::zeros([0, 2, 2, 2], DType::F32, dev).unwrap();
    let g = roi_align_backward(&gy, &rois(vec![]), dims, p).unwrap();
    assert_eq!(g.dims(), dims);
    assert!(g.to_vec::<f64>().unwrap().iter().all(|&v| v == 0.0));

    // Degenerate RoIs (zero width and height): not aligned, widened to one pixel.
    let r = vec![0.0, 2.3, 1.7, 2.3, 1.7];
    let y = roi_align(&input, &rois(r.clone()), p).unwrap();
    let roi = [
        0.0,
        2.3f32 as f64,
        1.7f32 as f64,
        2.3f32 as f64,
        1.7f32 as f64,
    ];
    let want = naive_forward(&xv, &dims, &[roi], p);
    assert_close(
        "zero-size RoI",
        &y,
        &Tensor::from_vec(want, [1, 2, 2, 2]).unwrap(),
        FWD_TOL,
    );
    // Aligned: the adaptive grid is empty, so the output is 0.
    let pa = RoiAlignParams { aligned: true, ..p };
    let y = roi_align(&input, &rois(r.clone()), pa).unwrap();
    assert!(y.to_vec::<f64>().unwrap().iter().all(|&v| v == 0.0));
    // Aligned, fixed grid: every sample at one point.
    let pf = RoiAlignParams {
        aligned: true,
        sampling_ratio: 2,
        ..p
    };
    let y = roi_align(&input, &rois(r), pf).unwrap();
    let want = naive_forward(&xv, &dims, &[roi], pf);
    assert_close(
        "zero-size aligned RoI",
        &y,
        &Tensor::from_vec(want, [1, 2, 2, 2]).unwrap(),
        FWD_TOL,
    );

    // RoIs entirely outside the map: zeros.
    let y = roi_align(&input, &rois(vec![0.0, 100.0, 100.0, 120.0, 130.0]), p).unwrap();
    assert!(y.to_vec::<f64>().unwrap().iter().all(|&v| v == 0.0));

    // Non-finite coordinates: zeros and no gradient (documented rule), finite rows intact.
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let r = rois(vec![
            0.0, 1.0, 1.0, 4.0, 3.0, 0.0, bad, 1.0, 4.0, 3.0, 0.0, 0.5, 0.5, 1.5, bad,
        ]);
        let gy = Tensor::full([3, 2, 2, 2], 1.0, DType::F32, dev).unwrap();
        let (y, gin) = roi_align_with_grad(&input, &r, &gy, p);
        let yv = y.to_vec::<f64>().unwrap();
        assert!(
            yv[8..].iter().all(|&v| v == 0.0),
            "non-finite RoI ({bad}) must pool zeros: {yv:?}"
        );
        let want = naive_forward(&xv, &dims, &[[0.0, 1.0, 1.0, 4.0, 3.0]], p);
        let want = Tensor::from_vec([want, vec![0.0; 16]].concat(), [3, 2, 2, 2]).unwrap();
        assert_close(&format!("finite row beside {bad}"), &y, &want, FWD_TOL);
        let want_g = naive_backward(&dims, &[[0.0, 1.0, 1.0, 4.0, 3.0]], &[1.0; 8], p);
        assert_close(
            &format!("gradient beside {bad}"),
            &gin,
            &Tensor::from_vec(want_g, dims.to_vec()).unwrap(),
            GRAD_TOL,
        );
    }

    // Batch index out of range: an error on the CPU; zeros (no out-of-bounds read) on
    // CUDA, which cannot report it without a host synchronisation.
    for b in [1.0f32, -1.0, f32::NAN] {
        let r = rois(vec![b, 1.0, 1.0, 4.0, 3.0]);
        match dev {
            Device::Cpu => {
                let e = roi_align(&input, &r, p).unwrap_err().to_string();
                assert!(e.contains("roi_align") && e.contains("batch index"), "{e}");
                let gy = Tensor::zeros([1, 2, 2, 2], DType::F32, dev).unwrap();
                assert!(roi_align_backward(&gy, &r, dims, p).is_err());
            }
            Device::Cuda(_) => {
                let y = roi_align(&input, &r, p).unwrap();
                assert!(
                    y.to_vec::<f64>().unwrap().iter().all(|&v| v == 0.0),
                    "batch {b}"
                );
            }
        }
    }
    // A batch index of -0.5 truncates to 0, as in torchvision.
    let y = roi_align(&input, &rois(vec![-0.5, 1.0, 1.0, 4.0, 3.0]), p).unwrap();
    let want = naive_forward(&xv, &dims, &[[0.0, 1.0, 1.0, 4.0, 3.0]], p);
    assert_close(
        "batch -0.5",
        &y,
        &Tensor::from_vec(want, [1, 2, 2, 2]).unwrap(),
        FWD_TOL,
    );
}

fn check_errors_on(dev: Device) {
    let input = Tensor::zeros([1, 2, 5, 6], DType::F32, dev).unwrap();
    let rois = Tensor::zeros([3, 5], DType::F32, dev).unwrap();
    let p = RoiAlignParams::new((2, 2), 1.0, 0);
    let err = |r: kestrel::Result<Tensor>| r.unwrap_err().to_string();
    let e = err(roi_align(
        &Tensor::zeros([2, 5, 6], DType::F32, dev).unwrap(),
        &rois,
        p,
    ));
    assert!(e.contains("roi_align") && e.contains("[2, 5, 6]"), "{e}");
    let e = err(roi_align(
        &input,
        &Tensor::zeros([3, 4], DType::F32, dev).unwrap(),
        p,
    ));
    assert!(e.contains("[3, 4]"), "{e}");
    assert!(roi_align(&input, &Tensor::zeros([5], DType::F32, dev).unwrap(), p).is_err());
    for bad in [
        RoiAlignParams {
            output_size: (0, 2),
            ..p
        },
        RoiAlignParams {
            spatial_scale: 0.0,
            ..p
        },
        RoiAlignParams {
            spatial_scale: f64::NAN,
            ..p
        },
        RoiAlignParams {
            sampling_ratio: 1 << 20,
            ..p
        },
    ] {
        assert!(roi_align(&input, &rois, bad).is_err(), "{bad:?}");
    }
    assert!(roi_align(
        &Tensor::zeros([1, 2, 0, 6], DType::F32, dev).unwrap(),
        &rois,
        p
    )
    .is_err());
    let gy = Tensor::zeros([3, 2, 2, 3], DType::F32, dev).unwrap();
    assert!(roi_align_backward(&gy, &rois, [1, 2, 5, 6], p).is_err());
    if dev == Device::Cpu {
        let e = err(roi_align(
            &input,
            &Tensor::zeros([3, 5], DType::F64, dev).unwrap(),
            p,
        ));
        assert!(e.contains("dtype"), "{e}");
    } else {
        let e = err(roi_align(
            &input,
            &Tensor::zeros([3, 5], DType::F32, Device::Cpu).unwrap(),
            p,
        ));
        assert!(e.contains("different devices"), "{e}");
    }
}

fn check_multiscale_edges_on(dev: Device) {
    let (m, feats, props, sizes) = small_pyramid(2);
    let feats: Vec<Tensor> = feats.iter().map(|f| f32_on(f, dev)).collect();
    let props: Vec<Tensor> = props.iter().map(|p| f32_on(p, dev)).collect();
    // An image without proposals, and an inverted box (NaN level: zeros, as torchvision).
    let empty = Tensor::zeros([0, 4], DType::F32, dev).unwrap();
    let inv = Tensor::from_vec(
        vec![30.0f32, 30.0, 10.0, 50.0, 0.0, 0.0, 40.0, 40.0],
        [2, 4],
    )
    .unwrap()
    .to_device(dev)
    .unwrap();
    let y = m
        .forward(&feats, &[empty.clone(), inv.clone()], &sizes)
        .unwrap();
    assert_eq!(y.dims(), [2, 2, 3, 2]);
    let yv = y.to_vec::<f64>().unwrap();
    assert!(
        yv[..12].iter().all(|&v| v == 0.0),
        "inverted box pools zeros"
    );
    assert!(yv[12..].iter().any(|&v| v != 0.0));
    // Its row order: the second image's rows follow the first's.
    let y_all = m.forward(&feats, &props, &sizes).unwrap();
    let y_one = m
        .forward(&feats, &[props[0].clone(), empty.clone()], &sizes)
        .unwrap();
    let n0 = props[0].dims()[0] * 12;
    assert_eq!(
        y_all.to_vec::<f32>().unwrap()[..n0],
        y_one.to_vec::<f32>().unwrap()[..]
    );
    // No proposals at all.
    let y = m
        .forward(&feats, &[empty.clone(), empty.clone()], &sizes)
        .unwrap();
    assert_eq!(y.dims(), [0, 2, 3, 2]);
    // Errors: proposals for a third image, wrong box width, non-consecutive levels.
    assert!(m
        .forward(
            &feats,
            &[empty.clone(), empty.clone(), empty.clone()],
            &sizes
        )
        .is_err());
    assert!(m
        .forward(
            &feats,
            &[
                empty.clone(),
                Tensor::zeros([2, 5], DType::F32, dev).unwrap()
            ],
            &sizes
        )
        .is_err());
    assert!(m
        .forward(&[feats[0].clone(), feats[2].clone()], &props, &sizes)
        .is_err());
    assert!(m.forward(&feats, &props, &sizes[..1]).is_err());
    assert!(m.forward(&[], &props, &sizes).is_err());
}

crate::device_tests! {
    roi_align_edge_cases => check_edge_cases_on;
    roi_align_errors(cpu, emulated_errors, cuda) => check_errors_on;
    multiscale_roi_align_edge_cases => check_multiscale_edges_on;
}

/// The f64 CPU path and the f32 path agree on the pyramid (same plans, two dtypes).
#[test]
fn multiscale_f32_and_f64_agree() {
    let (m, feats, props, sizes) = small_pyramid(3);
    let y64 = m.forward(&feats, &props, &sizes).unwrap();
    let f32s = |v: &[Tensor]| {
        v.iter()
            .map(|t| t.to_dtype(DType::F32).unwrap())
            .collect::<Vec<_>>()
    };
    let y32 = m.forward(&f32s(&feats), &f32s(&props), &sizes).unwrap();
    assert_close("f32 vs f64", &y32, &y64, FWD_TOL);
}

/// The CPU path does torchvision's floating-point operations in torchvision's order
/// (forward sums per sample, backward accumulation per RoI, bin, sample and tap), so on
/// the fixtures its f32 results are bit-identical, not only within tolerance.
#[test]
fn roi_align_cpu_is_bit_exact_with_torchvision() {
    let f = fixture("ops/roi_align.safetensors");
    let params = f.params().unwrap();
    for case in common::cases(&f) {
        let p = params_of(&params[&case]);
        let t = |n: &str| f.tensor(&format!("{case}.{n}")).unwrap();
        let (y, gin) = roi_align_with_grad(&t("input"), &t("rois"), &t("gy"), p);
        let same =
            |a: &Tensor, b: &Tensor| a.to_vec::<f32>().unwrap() == b.to_vec::<f32>().unwrap();
        assert!(
            same(&y, &t("y")),
            "{case}: y differs from torchvision's bits"
        );
        assert!(
            same(&gin, &t("ginput")),
            "{case}: ginput differs from torchvision's bits"
        );
    }
    let (m, feats, props, sizes, want) = multiscale_fixture(Device::Cpu);
    let y = m.forward(&feats, &props, &sizes).unwrap();
    assert_eq!(
        y.to_vec::<f32>().unwrap(),
        want.to_vec::<f32>().unwrap(),
        "multiscale y bits"
    );
}

/// CPU time (user + sys of the process, all threads) of MultiScaleRoIAlign at
/// R50-FPN size, batch 2 of 800x1216 (P2..P5, 256 channels, 7x7, sampling 2):
/// forward and backward with 512 RoIs per image (training), forward with 1000
/// (inference); boxes as benches/roi_align.rs. Beside torchvision:
/// scripts/bench_multiscale_roi_align.py. `cargo test --release --test roi_align --
/// --ignored --nocapture multiscale_cpu_time`.
#[test]
#[ignore = "timing, not a check"]
fn multiscale_cpu_time() {
    const SIZES: [(usize, usize); 4] = [(200, 304), (100, 152), (50, 76), (25, 38)];
    let n = 2;
    let mut rng = Rng::new(1);
    let feats: Vec<Tensor> = SIZES
        .iter()
        .map(|&(h, w)| {
            let v: Vec<f32> = (0..n * 256 * h * w)
                .map(|_| rng.range(-1.0, 1.0) as f32)
                .collect();
            Tensor::from_vec(v, [n, 256, h, w]).unwrap()
        })
        .collect();
    let mut boxes = |k: usize| {
        let v: Vec<f32> = (0..k)
            .flat_map(|_| {
                let side = 8.0 * 75f64.powf(rng.uniform());
                let (bw, bh) = (side * rng.range(0.5, 2.0), side);
                let (x1, y1) = (rng.range(0.0, 1215.0), rng.range(0.0, 799.0));
                [x1, y1, (x1 + bw).min(1216.0), (y1 + bh).min(800.0)].map(|v| v as f32)
            })
            .collect();
        Tensor::from_vec(v, [k, 4]).unwrap()
    };
    let m = MultiScaleRoIAlign::new((7, 7), 2);
    let sizes = vec![(800, 1216); n];
    let cpu = || {
        let t = std::time::Instant::now();
        (common::cpu_seconds(), t)
    };
    let report = |what: &str, f: &mut dyn FnMut()| {
        f();
        let mut v = Vec::new();
        for _ in 0..3 {
            let (c0, w0) = cpu();
            f();
            v.push((
                (common::cpu_seconds() - c0) * 1e3,
                w0.elapsed().as_secs_f64() * 1e3,
            ));
        }
        v.sort_by(|a, b| a.0.total_cmp(&b.0));
        println!(
            "kestrel MultiScaleRoIAlign b{n} {what}: cpu {:.1} ms (wall {:.1}), median of 3",
            v[1].0, v[1].1
        );
    };
    let train: Vec<Tensor> = (0..n).map(|_| boxes(512)).collect();
    let infer: Vec<Tensor> = (0..n).map(|_| boxes(1000)).collect();
    let gy = Tensor::full([n * 512, 256, 7, 7], 0.5, DType::F32, Device::Cpu).unwrap();
    report("train 512/image forward", &mut || {
        std::hint::black_box(m.forward(&feats, &train, &sizes).unwrap());
    });
    report("train 512/image backward", &mut || {
        std::hint::black_box(m.backward(&gy, &feats, &train, &sizes).unwrap());
    });
    report("infer 1000/image forward", &mut || {
        std::hint::black_box(m.forward(&feats, &infer, &sizes).unwrap());
    });
}

/// The CPU backward scatters blocks of 8 channels through a channel-last scratch
/// (one vector operation per tap); a channel alone (and each channel of the
/// fixtures' 5) goes one at a time, which the fixtures show bit-exact with
/// torchvision. With 19 channels (two blocks and a remainder) every channel's
/// gradient equals that channel's alone bit for bit, and the direct f64
/// transcription within tolerance.
#[test]
fn roi_align_backward_channel_blocks_equal_single_channels_bit_for_bit() {
    let mut rng = Rng::new(23);
    let (n, c, h, w) = (2, 19, 17, 23);
    for (ratio, aligned, scale, out) in [(2, false, 0.5, (7, 7)), (0, true, 0.25, (3, 5))] {
        let p = RoiAlignParams {
            output_size: out,
            spatial_scale: scale,
            sampling_ratio: ratio,
            aligned,
        };
        let rv = random_rois(&mut rng, 40, n, h, w, scale);
        let rois = f32_on(&rois_tensor(&rv), Device::Cpu);
        let bins = out.0 * out.1;
        let k = rv.len();
        let gy_v: Vec<f32> = (0..k * c * bins)
            .map(|_| rng.range(-1.0, 1.0) as f32)
            .collect();
        let gy = Tensor::from_vec(gy_v.clone(), [k, c, out.0, out.1]).unwrap();
        let all = roi_align_backward(&gy, &rois, [n, c, h, w], p)
            .unwrap()
            .to_vec::<f32>()
            .unwrap();
        for ci in 0..c {
            let one: Vec<f32> = (0..k)
                .flat_map(|r| gy_v[(r * c + ci) * bins..][..bins].to_vec())
                .collect();
            let one = Tensor::from_vec(one, [k, 1, out.0, out.1]).unwrap();
            let g = roi_align_backward(&one, &rois, [n, 1, h, w], p)
                .unwrap()
                .to_vec::<f32>()
                .unwrap();
            for b in 0..n {
                let got = &all[(b * c + ci) * h * w..][..h * w];
                let want = &g[b * h * w..][..h * w];
                let same = got
                    .iter()
                    .zip(want)
                    .all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "channel {ci} of image {b} ({p:?})");
            }
        }
        let gy64: Vec<f64> = gy_v.iter().map(|&v| v as f64).collect();
        let want = naive_backward(&[n, c, h, w], &rv, &gy64, p);
        for (i, (a, b)) in all.iter().zip(&want).enumerate() {
            assert!(
                (*a as f64 - b).abs() <= 1e-4 * (1.0 + b.abs()),
                "element {i}: {a} vs {b}"
            );
        }
    }
}
