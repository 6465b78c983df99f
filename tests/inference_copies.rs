//! Inference of a batch crosses between host and device exactly twice (issue 14):
//! the 8-bit images go up in one pinned copy, the detections come back in one copy
//! of one packed buffer ([`PackedDetections`]), eagerly and under graph replay, and
//! nothing else is allocated from the driver, copied or synchronised once warm.
//!
//! - `eager_inference_copies`: `FasterRcnn::detect_u8` of the fixture batch after
//!   warm-up: htod 1 (pinned), dtoh 1, syncs 0 (the download's own wait is the only
//!   one: a device-to-host copy waits for the work queued before it, so no explicit
//!   synchronisation is needed), driver allocations 0; its detections are
//!   torchvision's (up to the order of tied scores) and `detect`'s bit for bit.
//! - `graph_replay_copies`: the same batch and a perturbed one through
//!   `GraphedDetector`: per batch 1 pinned htod, 1 graph launch, 1 dtoh, 0 other
//!   launches, 0 allocations; replay equals eager bit for bit, and the two batches'
//!   detections differ.
//! - `padded_selection`: the padded detection selection (kernel
//!   `proposals_roi_filter_padded_f32`) and the packing (`proposals_pack_detections_f32`)
//!   on rows whose padding would win every class if it were not masked: equal to the
//!   selection on the real rows alone, bit for bit on each device, and the CPU and the
//!   device agree.

mod common;

use kestrel::detection::box_coder::BoxCoder;
use kestrel::detection::graphed::GraphedDetector;
use kestrel::detection::proposals::{
    select_detections, select_detections_padded, DetectionParams, PackedDetections, Selected,
};
use kestrel::detection::transform::ImageU8;
use kestrel::detection::Detections;
use kestrel::rng::Rng;
use kestrel::{Device, Tensor};

/// The model tests measure the device's cache and counters.
static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

type Image = (Vec<u8>, usize, usize);

fn fixture_images() -> Vec<Image> {
    common::fixture_pixels()
}

fn views(imgs: &[Image]) -> Vec<ImageU8<'_>> {
    common::u8_views(imgs)
}

fn bits(d: &Detections) -> (Vec<[u32; 4]>, Vec<u32>, Vec<i64>) {
    (
        d.boxes.iter().map(|b| b.map(f32::to_bits)).collect(),
        d.scores.iter().map(|s| s.to_bits()).collect(),
        d.labels.clone(),
    )
}

fn assert_bits_equal(what: &str, got: &[Detections], want: &[Detections]) {
    assert_eq!(got.len(), want.len(), "{what}: images");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert_eq!(bits(g), bits(w), "{what}: image {i}");
    }
}

fn check_eager(device: Device) {
    let _l = LOCK.lock().unwrap_or_else(|p| p.into_inner());
    let m = common::fixture_model(device);
    let imgs = fixture_images();
    // Warm-up: the first batch of a geometry fills the allocator's cache and uploads
    // the size tables (device constants) once.
    for _ in 0..2 {
        m.detect_u8(&views(&imgs)).unwrap();
    }
    let c = device.counters();
    let got = m.detect_u8(&views(&imgs)).unwrap();
    let d = c.delta();
    eprintln!("eager inference, warm ({device}): {d}");
    assert_eq!(
        (d.htod, d.htod_pinned, d.dtoh, d.syncs, d.driver_allocs),
        (1, 1, 1, 0, 0),
        "eager inference: one pinned upload, one download, no sync, no driver allocation: {d}"
    );
    // The download is the packed buffer: 2 counts and 6 words per slot per image.
    let top = m.config.roi.detections_per_img;
    assert_eq!(d.dtoh_bytes as usize, 4 * imgs.len() * (2 + 6 * top), "{d}");
    let f = common::fixture("model/eval.safetensors");
    assert!(got.iter().map(|d| d.scores.len()).sum::<usize>() > 0);
    for (i, g) in got.iter().enumerate() {
        common::detection_ties::assert_same_order_up_to_ties(
            &format!("image {i}"),
            g,
            &common::fixture_dets(&f, i),
            1e-4,
        );
    }
    // The f32 API (images already on the device) gives the same bits.
    let t: Vec<Tensor> = imgs
        .iter()
        .map(|(d, h, w)| {
            kestrel::detection::transform::image_from_u8(d, *h, *w)
                .unwrap()
                .to_device(device)
                .unwrap()
        })
        .collect();
    let via_f32 = kestrel::autograd::no_grad(|| m.detect(&t)).unwrap();
    assert_bits_equal("detect_u8 vs detect", &got, &via_f32);
}

crate::device_tests! {
    eager_inference_copies(emulated, cuda) => check_eager;
}

fn check_graph(device: Device) {
    let _l = LOCK.lock().unwrap_or_else(|p| p.into_inner());
    let m = common::fixture_model(device);
    let a = fixture_images();
    let b = common::perturbed_pixels(&a, 5);
    let want_a = m.detect_u8(&views(&a)).unwrap();
    let want_b = m.detect_u8(&views(&b)).unwrap();
    assert_ne!(
        want_a.iter().map(bits).collect::<Vec<_>>(),
        want_b.iter().map(bits).collect::<Vec<_>>(),
        "the two batches should give different detections"
    );
    let mut g = GraphedDetector::new(&m, &views(&a)).unwrap();
    for (what, imgs, want) in [
        ("a", &a, &want_a),
        ("b", &b, &want_b),
        ("a again", &a, &want_a),
    ] {
        let c = device.counters();
        let got = g.detect(&views(imgs)).unwrap();
        let d = c.delta();
        eprintln!("graph replay of batch {what} ({device}): {d}");
        assert_eq!(
            (
                d.htod,
                d.htod_pinned,
                d.graph_replays,
                d.launches,
                d.dtoh,
                d.syncs,
                d.driver_allocs + d.cached_allocs,
                d.memsets,
                d.dtod,
            ),
            (1, 1, 1, 0, 1, 0, 0, 0, 0),
            "replay of batch {what}: one upload, one graph launch, one download: {d}"
        );
        assert_bits_equal(&format!("replay of batch {what} vs eager"), &got, want);
    }
}

crate::device_tests! {
    graph_replay_copies(emulated, cuda) => check_graph;
}

// ------------------------------------------------- the padded selection and packing

const N: usize = 2;
const P: usize = 6;
const C: usize = 4;

/// Logits `[N P, C]`, deltas `[N P, 4C]`, proposals `[N, P, 4]` and counts: image 0
/// has 4 real rows, image 1 has 2. Padding rows have class logits far above every
/// real row's and boxes of their own, so any padding row that reached the selection
/// would take the first slots.
fn padded_inputs(seed: u64) -> (Vec<f32>, Vec<f32>, Vec<f32>, Vec<i64>) {
    let counts = vec![4i64, 2];
    let mut rng = Rng::new(seed);
    let mut u = move || (rng.below(1_000_000) as f32) / 1_000_000.0;
    let mut logits = Vec::new();
    let mut deltas = Vec::new();
    let mut boxes = Vec::new();
    for &count in &counts {
        for i in 0..P {
            let real = (i as i64) < count;
            for _ in 0..C {
                logits.push(if real { 3.0 * u() - 1.0 } else { 20.0 + u() });
            }
            for _ in 0..4 * C {
                deltas.push(0.4 * u() - 0.2);
            }
            let (x, y) = (40.0 * u(), 30.0 * u());
            boxes.extend([x, y, x + 8.0 + 20.0 * u(), y + 8.0 + 20.0 * u()]);
        }
    }
    (logits, deltas, boxes, counts)
}

fn host_selected(s: &Selected) -> (Vec<i64>, Vec<u32>, Vec<u32>, Vec<i64>) {
    let b: Vec<u32> = s
        .boxes
        .to_vec::<f32>()
        .unwrap()
        .iter()
        .map(|v| v.to_bits())
        .collect();
    let sc: Vec<u32> = s
        .scores
        .to_vec::<f32>()
        .unwrap()
        .iter()
        .map(|v| v.to_bits())
        .collect();
    (
        s.counts.to_vec_i64().unwrap(),
        b,
        sc,
        s.indices.to_vec_i64().unwrap(),
    )
}

/// One selected detection: (row within its image, class, box bits, score bits).
type Picked = (usize, usize, [u32; 4], u32);

/// Per image, the detections of a selection with the candidate index mapped to the
/// row within the image and the class.
fn rows_of(s: &Selected, per_image: &[usize], classes: usize) -> Vec<Vec<Picked>> {
    let (counts, b, sc, idx) = host_selected(s);
    let top = s.scores.dims()[1];
    let starts: Vec<usize> = per_image
        .iter()
        .scan(0, |acc, &k| {
            let s = *acc;
            *acc += k;
            Some(s)
        })
        .collect();
    (0..counts.len())
        .map(|n| {
            (0..counts[n] as usize)
                .map(|k| {
                    let o = n * top + k;
                    let (row, class) = (
                        idx[o] as usize / (classes - 1),
                        idx[o] as usize % (classes - 1) + 1,
                    );
                    (
                        row - starts[n],
                        class,
                        [b[4 * o], b[4 * o + 1], b[4 * o + 2], b[4 * o + 3]],
                        sc[o],
                    )
                })
                .collect()
        })
        .collect()
}

fn check_padded_selection(device: Device) {
    let (logits, deltas, boxes, counts) = padded_inputs(11);
    let sizes = vec![(50usize, 60usize), (45, 52)];
    let coder = BoxCoder::new([10.0, 10.0, 5.0, 5.0]);
    let p = DetectionParams {
        score_thresh: 0.05,
        min_size: 1e-2,
        nms_thresh: 0.5,
        detections_per_img: 5,
    };
    let on = |v: Vec<f32>, s: &[usize]| {
        Tensor::from_vec(v, s.to_vec())
            .unwrap()
            .to_device(device)
            .unwrap()
    };
    let counts_t = Tensor::from_vec_i64(counts.clone(), [N])
        .unwrap()
        .to_device(device)
        .unwrap();
    let padded = select_detections_padded(
        &on(logits.clone(), &[N * P, C]),
        &on(deltas.clone(), &[N * P, 4 * C]),
        &on(boxes.clone(), &[N, P, 4]),
        &counts_t,
        &sizes,
        &coder,
        &p,
    )
    .unwrap();
    // The real rows alone, concatenated, through the per-image selection.
    let real: Vec<usize> = (0..N * P)
        .filter(|r| (r % P) < counts[r / P] as usize)
        .collect();
    let pick = |v: &[f32], w: usize| -> Vec<f32> {
        real.iter()
            .flat_map(|&r| v[r * w..(r + 1) * w].to_vec())
            .collect()
    };
    let k = real.len();
    let rows: Vec<usize> = counts.iter().map(|&c| c as usize).collect();
    let ragged = select_detections(
        &on(pick(&logits, C), &[k, C]),
        &on(pick(&deltas, 4 * C), &[k, 4 * C]),
        &on(pick(&boxes, 4), &[k, 4]),
        &rows,
        &sizes,
        &coder,
        &p,
    )
    .unwrap();
    let got = rows_of(&padded, &[P; N], C);
    let want = rows_of(&ragged, &rows, C);
    assert!(
        want.iter().all(|d| !d.is_empty()),
        "no real detection to compare: {want:?}"
    );
    for (n, (g, w)) in got.iter().zip(&want).enumerate() {
        // (rows_of maps padded row n P + i back to the image's row i.)
        assert!(
            g.iter().all(|d| d.0 < counts[n] as usize),
            "image {n}: a padding row was selected: {g:?}"
        );
        assert_eq!(g, w, "image {n}: padded selection vs the real rows alone");
    }
    // Packing: one buffer that reads back as the selection (labels from the indices).
    let packed = PackedDetections::new(&padded, &counts_t, C).unwrap();
    let read = packed.read().unwrap();
    assert_eq!(read.proposal_counts, vec![4, 2]);
    for (n, d) in read.detections.iter().enumerate() {
        let w = &got[n];
        assert_eq!(
            d.labels,
            w.iter().map(|x| x.1 as i64).collect::<Vec<_>>(),
            "image {n} labels"
        );
        assert_eq!(
            d.boxes
                .iter()
                .map(|b| b.map(f32::to_bits))
                .collect::<Vec<_>>(),
            w.iter().map(|x| x.2).collect::<Vec<_>>(),
            "image {n} boxes"
        );
        assert_eq!(
            d.scores.iter().map(|s| s.to_bits()).collect::<Vec<_>>(),
            w.iter().map(|x| x.3).collect::<Vec<_>>()
        );
    }
    // The slots past the counts are zeros, whatever the allocator handed out.
    let words: Vec<u32> = packed
        .words
        .to_vec::<f32>()
        .unwrap()
        .iter()
        .map(|v| v.to_bits())
        .collect();
    assert_eq!(words.len(), N * (2 + 6 * p.detections_per_img));
    for n in 0..N {
        for s in read.detections[n].scores.len()..p.detections_per_img {
            let o = 2 * N + 6 * (n * p.detections_per_img + s);
            assert_eq!(&words[o..o + 6], &[0; 6], "image {n} slot {s}");
        }
    }
    if device != Device::Cpu {
        // The device agrees with the CPU twin: the same picks, boxes and scores to
        // float tolerance (expf may differ in the last bit).
        let cpu = {
            let t = |v: Vec<f32>, s: &[usize]| Tensor::from_vec(v, s.to_vec()).unwrap();
            select_detections_padded(
                &t(logits, &[N * P, C]),
                &t(deltas, &[N * P, 4 * C]),
                &t(boxes, &[N, P, 4]),
                &Tensor::from_vec_i64(counts, [N]).unwrap(),
                &sizes,
                &coder,
                &p,
            )
            .unwrap()
        };
        let (cc, cb, cs, ci) = host_selected(&cpu);
        let (dc, db, ds, di) = host_selected(&padded);
        assert_eq!(
            (cc, ci),
            (dc, di),
            "counts and candidate indices, CPU vs device"
        );
        let f = |v: Vec<u32>| {
            v.into_iter()
                .map(|b| f32::from_bits(b) as f64)
                .collect::<Vec<_>>()
        };
        assert!(common::rel_err(&f(db), &f(cb)) <= 1e-6);
        assert!(common::rel_err(&f(ds), &f(cs)) <= 1e-6);
    }
}

crate::device_tests! {
    padded_selection(cpu, emulated, cuda) => check_padded_selection;
}

/// A model whose RPN keeps no proposal (a sigmoid never reaches 2): every row of
/// the padded tail is padding, and the packed result has no detection (and zero
/// proposal counts) on every device.
fn check_zero_proposals(device: Device) {
    let mut cfg = kestrel::app::train::small_config(3, 64);
    cfg.rpn.score_thresh = 2.0;
    let mut m = kestrel::detection::FasterRcnn::new(cfg, 0).unwrap();
    m.to_device(device).unwrap();
    let mut rng = Rng::new(3);
    let imgs: Vec<Image> = (0..2)
        .map(|_| {
            (
                (0..3 * 64 * 64).map(|_| rng.below(256) as u8).collect(),
                64,
                64,
            )
        })
        .collect();
    let dets = m.detect_u8(&views(&imgs)).unwrap();
    assert_eq!(dets.len(), 2);
    for d in &dets {
        assert!(d.boxes.is_empty() && d.scores.is_empty() && d.labels.is_empty());
    }
    if device != Device::Cpu {
        let up =
            kestrel::detection::transform::upload_u8(&views(&imgs), &m.config.transform, device)
                .unwrap();
        let il = kestrel::detection::transform::transform_uploaded(&up).unwrap();
        let pass = kestrel::autograd::no_grad(|| m.detect_packed(&il)).unwrap();
        let read = pass.packed.read().unwrap();
        assert_eq!(read.proposal_counts, vec![0, 0]);
    }
}

crate::device_tests! {
    zero_proposals_give_no_detections(cpu, emulated, cuda) => check_zero_proposals;
}
