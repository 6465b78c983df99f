//! Grouped NMS (`nms::nms_groups_device`, kernels/nms.cu "Grouped NMS"): each group
//! walked on its own, in O(N) memory, boxes of different groups never compared.
//! Checked against torchvision's fixtures and the transcribed reference loop, on the
//! CPU and the emulated device, and for what it costs on the device (no read-back,
//! no N x N mask).

mod common;

use std::sync::Mutex;

use kestrel::ops::nms;
use kestrel::rng::Rng;
use kestrel::{Device, Tensor};

/// The memory test reads the device-wide peak: keep the other emulated tests of
/// this file from running beside it.
static LOCK: Mutex<()> = Mutex::new(());

fn on(t: &Tensor, device: Device) -> Tensor {
    t.to_device(device).unwrap()
}

fn i64_t(v: Vec<i64>) -> Tensor {
    let n = v.len();
    Tensor::from_vec_i64(v, [n]).unwrap()
}

/// The keep list (the first `count` entries) after checking the padding is -1.
fn kept(out: &nms::NmsOutput) -> Vec<i64> {
    let k = out.count.to_vec_i64().unwrap()[0] as usize;
    let all = out.keep.to_vec_i64().unwrap();
    assert!(all[k..].iter().all(|&v| v == -1), "padding not -1: {all:?}");
    all[..k].to_vec()
}

/// Random boxes around `clusters` centres (heavy overlap), scores in [0, 1) with
/// some ties.
fn clustered(seed: u64, n: usize, clusters: usize) -> (Tensor, Tensor) {
    let mut r = Rng::new(seed);
    let centres: Vec<(f64, f64, f64, f64)> = (0..clusters)
        .map(|_| {
            (
                r.range(0.0, 600.0),
                r.range(0.0, 400.0),
                r.range(8.0, 150.0),
                r.range(8.0, 100.0),
            )
        })
        .collect();
    let mut b = Vec::with_capacity(4 * n);
    let mut s = Vec::with_capacity(n);
    for i in 0..n {
        let (cx, cy, bw, bh) = centres[r.below(clusters as u64) as usize];
        let (x1, y1) = (cx + r.normal() * 0.15 * bw, cy + r.normal() * 0.15 * bh);
        let (w, h) = (bw * r.range(0.7, 1.3), bh * r.range(0.7, 1.3));
        b.extend_from_slice(&[x1 as f32, y1 as f32, (x1 + w) as f32, (y1 + h) as f32]);
        // Every 7th score repeats the previous one: ties resolved by index.
        s.push(if i % 7 == 6 {
            s[i - 1]
        } else {
            r.uniform() as f32
        });
    }
    (
        Tensor::from_vec(b, [n, 4]).unwrap(),
        Tensor::from_vec(s, [n]).unwrap(),
    )
}

/// The transcribed torchvision loop over all candidates with their groups, the
/// left-out (negative) groups then dropped: the definition of the grouped result.
fn reference(boxes: &Tensor, scores: &Tensor, groups: &[i64], thr: f64) -> Vec<i64> {
    let all = nms::nms_reference(boxes, scores, Some(&i64_t(groups.to_vec())), thr).unwrap();
    all.to_vec_i64()
        .unwrap()
        .into_iter()
        .filter(|&i| groups[i as usize] >= 0)
        .collect()
}

fn check_fixtures_on(device: Device) {
    let f = common::fixture("ops/nms.safetensors");
    let params = f.params().unwrap();
    let cases = params.as_object().unwrap();
    assert!(cases.len() >= 7, "ops/nms has {} cases", cases.len());
    for (case, p) in cases {
        let t = |n: &str| on(&f.tensor(&format!("{case}.{n}")).unwrap(), device);
        let thr = p["iou_threshold"].as_f64().unwrap();
        let want = f
            .int_tensor(&format!("{case}.keep"))
            .unwrap()
            .to_vec_i64()
            .unwrap();
        let boxes = t("boxes");
        let groups = if p["batched"].as_bool().unwrap() {
            f.int_tensor(&format!("{case}.idxs")).unwrap()
        } else {
            i64_t(vec![0; boxes.dims()[0]])
        };
        let out = nms::nms_groups_device(&boxes, &t("scores"), &on(&groups, device), thr).unwrap();
        assert_eq!(out.keep.device(), device);
        assert_eq!(kept(&out), want, "{device} grouped nms, case {case}");
    }
}

#[test]
fn grouped_nms_matches_torchvision_cpu() {
    check_fixtures_on(Device::Cpu);
}

#[test]
fn grouped_nms_matches_torchvision_emulated() {
    let _l = LOCK.lock().unwrap_or_else(|p| p.into_inner());
    check_fixtures_on(common::emulated());
}

#[test]
#[ignore = "needs a CUDA device"]
fn grouped_nms_matches_torchvision_cuda() {
    check_fixtures_on(common::cuda());
}

fn check_random_on(device: Device) {
    for (seed, n, groups, thr) in [
        (1u64, 300usize, 1i64, 0.5),
        (2, 2000, 12, 0.7),
        (3, 1500, 40, 0.3),
        (4, 700, 3, 0.0),
    ] {
        let (b, s) = clustered(seed, n, 25);
        // Groups interleaved, one in nine candidates left out.
        let g: Vec<i64> = (0..n as i64)
            .map(|i| if i % 9 == 4 { -1 } else { (i * 7919) % groups })
            .collect();
        let want = reference(&b, &s, &g, thr);
        let out = nms::nms_groups_device(
            &on(&b, device),
            &on(&s, device),
            &on(&i64_t(g.clone()), device),
            thr,
        )
        .unwrap();
        assert_eq!(
            kept(&out),
            want,
            "{device}: seed {seed}, n {n}, {groups} groups, thr {thr}"
        );
    }
}

#[test]
fn grouped_nms_equals_the_reference_loop_cpu() {
    check_random_on(Device::Cpu);
}

#[test]
fn grouped_nms_equals_the_reference_loop_emulated() {
    let _l = LOCK.lock().unwrap_or_else(|p| p.into_inner());
    check_random_on(common::emulated());
}

#[test]
#[ignore = "needs a CUDA device"]
fn grouped_nms_equals_the_reference_loop_cuda() {
    check_random_on(common::cuda());
}

/// Identical boxes in different groups are all kept; in one group only the best;
/// a left-out candidate suppresses nothing even where it overlaps and scores higher.
fn check_groups_are_separate_on(device: Device) {
    let b: Vec<f32> = [0., 0., 10., 10.].repeat(5);
    let boxes = on(&Tensor::from_vec(b, [5, 4]).unwrap(), device);
    let scores = on(
        &Tensor::from_vec(vec![0.9f32, 0.8, 0.7, 0.6, 0.95], [5]).unwrap(),
        device,
    );
    let groups = on(&i64_t(vec![3, 1, 3, 2, -1]), device);
    let out = nms::nms_groups_device(&boxes, &scores, &groups, 0.5).unwrap();
    assert_eq!(kept(&out), vec![0, 1, 3]);
}

#[test]
fn groups_are_separate_cpu() {
    check_groups_are_separate_on(Device::Cpu);
}

#[test]
fn groups_are_separate_emulated() {
    let _l = LOCK.lock().unwrap_or_else(|p| p.into_inner());
    check_groups_are_separate_on(common::emulated());
}

/// On the device: no read-back, no synchronisation, and memory linear in N: far
/// below the N x N/64 words of one mask over all candidates.
#[test]
fn grouped_nms_reads_nothing_back_and_stays_linear_in_memory_emulated() {
    let _l = LOCK.lock().unwrap_or_else(|p| p.into_inner());
    let device = common::emulated();
    let n = 24_000;
    let (b, s) = clustered(9, n, 400);
    let g: Vec<i64> = (0..n as i64).map(|i| i % 240).collect();
    let (bd, sd, gd) = (
        on(&b, device),
        on(&s, device),
        on(&i64_t(g.clone()), device),
    );
    device.reset_peak_memory();
    let base = device.memory().allocated;
    let c = device.counters();
    let out = nms::nms_groups_device(&bd, &sd, &gd, 0.5).unwrap();
    let d = c.delta();
    let peak = device.memory().peak_allocated - base;
    assert_eq!((d.dtoh, d.syncs, d.htod), (0, 0, 0), "{d}");
    let mask_bytes = (n * n.div_ceil(64) * 8) as u64;
    let bound = 48 * n.next_power_of_two() as u64;
    eprintln!(
        "grouped NMS of {n} boxes in 240 groups: peak {peak} B (a full mask: {mask_bytes} B); {d}"
    );
    assert!(peak <= bound, "peak {peak} B above {bound} B");
    assert!(
        peak * 20 < mask_bytes,
        "peak {peak} B vs mask {mask_bytes} B"
    );
    assert_eq!(kept(&out), reference(&b, &s, &g, 0.5));
}

/// `images` chunks of `chunk` clustered candidates, `classes` groups per image
/// (group `image * classes + class`), one in `left_out` candidates left out (-1).
fn image_major(
    seed: u64,
    images: usize,
    chunk: usize,
    classes: i64,
    left_out: i64,
) -> (Tensor, Tensor, Vec<i64>) {
    let n = images * chunk;
    let (b, s) = clustered(seed, n, 30);
    let g = (0..n as i64)
        .map(|i| {
            let (img, j) = (i / chunk as i64, i % chunk as i64);
            if (j * 31 + 5) % left_out == 0 {
                -1
            } else {
                img * classes + (j * 7919) % classes
            }
        })
        .collect();
    (b, s, g)
}

/// Each image's first `top` entries of a grouped keep list, images in order.
fn first_per_image(keep: &[i64], images: usize, chunk: usize, top: usize) -> Vec<i64> {
    (0..images)
        .flat_map(|img| {
            keep.iter()
                .copied()
                .filter(move |&i| i as usize / chunk == img)
                .take(top)
        })
        .collect()
}

fn top_on(
    device: Device,
    b: &Tensor,
    s: &Tensor,
    g: &[i64],
    thr: f64,
    images: usize,
    top: usize,
) -> Vec<i64> {
    let out = nms::nms_groups_top_device(
        &on(b, device),
        &on(s, device),
        &on(&i64_t(g.to_vec()), device),
        thr,
        images,
        top,
    )
    .unwrap();
    assert_eq!(out.keep.dims(), [images * top]);
    kept(&out)
}

/// `nms_groups_top_device`: per image, the reference loop's keep list cut at `top`,
/// images in order; small cases against the transcribed loop.
fn check_top_on(device: Device) {
    for (seed, images, chunk, classes, top, thr) in [
        (11u64, 3usize, 500usize, 4i64, 20usize, 0.5),
        (12, 4, 300, 2, 1000, 0.7),
        (13, 1, 900, 6, 50, 0.3),
        (14, 2, 400, 3, 0, 0.5),
    ] {
        let (b, s, g) = image_major(seed, images, chunk, classes, 9);
        let want = first_per_image(&reference(&b, &s, &g, thr), images, chunk, top);
        assert_eq!(
            top_on(device, &b, &s, &g, thr, images, top),
            want,
            "{device}: seed {seed}, {images} images of {chunk}, {classes} classes, top {top}"
        );
    }
}

#[test]
fn grouped_nms_top_per_image_equals_the_reference_loop_cpu() {
    check_top_on(Device::Cpu);
}

#[test]
fn grouped_nms_top_per_image_equals_the_reference_loop_emulated() {
    let _l = LOCK.lock().unwrap_or_else(|p| p.into_inner());
    check_top_on(common::emulated());
}

#[test]
#[ignore = "needs a CUDA device"]
fn grouped_nms_top_per_image_equals_the_reference_loop_cuda() {
    check_top_on(common::cuda());
}

/// Images large enough that the device takes them in several passes (one pass holds
/// at most 2^17 candidates, whole images): the CPU's result (checked against the
/// loop above), most candidates left out as the score filter leaves them.
#[test]
fn grouped_nms_top_in_several_passes_equals_the_cpu_emulated() {
    let _l = LOCK.lock().unwrap_or_else(|p| p.into_inner());
    let (images, chunk, top) = (5usize, 50_000usize, 100usize);
    let (b, s) = clustered(21, images * chunk, 30);
    // One candidate in 40 takes part, 90 classes per image.
    let g: Vec<i64> = (0..images * chunk)
        .map(|i| {
            let (img, j) = (i / chunk, i % chunk);
            if j % 40 == 3 {
                (img * 90 + (j / 40) % 90) as i64
            } else {
                -1
            }
        })
        .collect();
    let want = top_on(Device::Cpu, &b, &s, &g, 0.5, images, top);
    assert_eq!(want.len(), images * top, "every image fills its {top} rows");
    assert_eq!(
        top_on(common::emulated(), &b, &s, &g, 0.5, images, top),
        want
    );
}

/// The detection NMS's own peak at the size of R50-FPN inference at batch 16 with 91
/// classes (1000 proposals x 90 classes per image, 100 detections per image), in
/// the emulator's plan mode (exact allocator bytes, no compute): what the op
/// allocates above what was in use when it began is one pass's scratch (16 bytes per
/// sorted key slot, 16 per candidate of the pass, size classes up to 5/4) plus the
/// `[images, top]` keep list: not the batch's candidates. The batch-wide grouped NMS
/// on the same input is shown far above that bound, so the bound can fail.
#[test]
fn detection_nms_memory_is_one_pass_not_the_batch_plan_emulated() {
    use kestrel::device::op_memory;
    let _l = LOCK.lock().unwrap_or_else(|p| p.into_inner());
    let device = common::emulated();
    let (images, chunk, top) = (16usize, 1000 * 90, 100usize);
    let n = images * chunk;
    kestrel::device::emu::set_plan_mode(true);
    op_memory::record(true);
    let run = |batched: bool| {
        let b = Tensor::zeros([n, 4], kestrel::DType::F32, device).unwrap();
        let s = Tensor::zeros([n], kestrel::DType::F32, device).unwrap();
        let g = Tensor::zeros([n], kestrel::DType::I64, device).unwrap();
        op_memory::take();
        let out = if batched {
            nms::nms_groups_device(&b, &s, &g, 0.5)
        } else {
            nms::nms_groups_top_device(&b, &s, &g, 0.5, images, top)
        };
        drop(out.unwrap());
        let m = op_memory::take();
        assert_eq!(m.len(), 1, "{m:?}");
        m[0].added()
    };
    let (own, batch_wide) = (run(false), run(true));
    op_memory::record(false);
    kestrel::device::emu::set_plan_mode(false);
    // Candidates per pass: whole images, up to 2^17 (at least one image).
    let pass = chunk * ((1usize << 17) / chunk).clamp(1, images);
    let bound =
        (16 * pass.next_power_of_two() + 16 * pass + 8 * images * top) as u64 * 5 / 4 + 4096;
    eprintln!(
        "detection NMS, {images} images x {chunk} candidates: own peak {own} B ({:.2} MiB), \
         bound {bound} B; batch-wide grouped NMS {batch_wide} B ({:.1} MiB)",
        own as f64 / 1048576.0,
        batch_wide as f64 / 1048576.0
    );
    assert!(own <= bound, "own peak {own} B above one pass's {bound} B");
    assert!(
        batch_wide > 4 * bound,
        "the batch-wide NMS ({batch_wide} B) would fail the bound"
    );
}
