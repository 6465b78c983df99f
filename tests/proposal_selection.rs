//! RPN proposal selection (`detection::proposals::select_proposals`, kernels
//! topk.cu + proposals.cu + nms.cu) on random batches: the emulated CUDA device must
//! give the CPU's result bit for bit (boxes, scores, candidate indices, counts), and
//! the CPU's result must be one that torchvision's `filter_proposals` could give
//! (the independent rule of `common::proposal_ties`, which also covers ties).
//!
//! The batches are built to reach the corners: many equal logits (anchors over flat
//! regions, with equal deltas, so tied boxes overlap), levels larger and smaller
//! than `pre_nms_top_n`, an empty level, every box filtered out (by score or by
//! size), NaN logits, `post_nms_top_n` cutting inside a run of equal scores.

mod common;

use common::proposal_ties::{self, Rule};
use kestrel::detection::proposals::{select_proposals, ProposalParams, Selected};
use kestrel::rng::Rng;
use kestrel::{Device, Tensor};

/// One random batch and its settings.
struct Case {
    n: usize,
    level_sizes: Vec<usize>,
    logits: Vec<f32>,
    deltas: Vec<f32>,
    anchors: Vec<f32>,
    image_sizes: Vec<(usize, usize)>,
    params: ProposalParams,
    has_nan: bool,
}

/// Anchors of one level: a `gh x gw` grid with `stride`, three aspect ratios,
/// (row, column, ratio) order as torchvision's.
fn level_anchors(gh: usize, gw: usize, stride: f32, size: f32) -> Vec<f32> {
    let mut v = Vec::new();
    for y in 0..gh {
        for x in 0..gw {
            for r in [0.5f32, 1.0, 2.0] {
                let (hr, wr) = (r.sqrt(), 1.0 / r.sqrt());
                let (w, h) = ((wr * size / 2.0).round(), (hr * size / 2.0).round());
                let (cx, cy) = (x as f32 * stride, y as f32 * stride);
                v.extend([cx - w, cy - h, cx + w, cy + h]);
            }
        }
    }
    v
}

fn random_case(seed: u64) -> Case {
    let mut r = Rng::new(seed);
    let n = 1 + r.below(3) as usize;
    let levels = 1 + r.below(5) as usize;
    let (h, w) = (32 + r.below(200) as usize, 32 + r.below(200) as usize);
    let mut level_sizes = Vec::new();
    let mut anchors = Vec::new();
    let empty_level = if r.below(4) == 0 {
        Some(r.below(levels as u64) as usize)
    } else {
        None
    };
    for l in 0..levels {
        let stride = (4 << l) as f32;
        let (gh, gw) = if Some(l) == empty_level {
            (0, 0)
        } else {
            (
                (h as f32 / stride).ceil() as usize,
                (w as f32 / stride).ceil() as usize,
            )
        };
        // Anchors of 4 strides: some clipped at the borders, few clipped to one box.
        let a = level_anchors(gh, gw, stride, 4.0 * stride);
        level_sizes.push(a.len() / 4);
        anchors.extend(a);
    }
    let total: usize = level_sizes.iter().sum();
    // Few distinct logit values, so ties are everywhere; a flat "region" shares deltas.
    let distinct = 2 + r.below(30);
    let flat_deltas = r.below(2) == 0;
    let mut logits = Vec::with_capacity(n * total);
    let mut deltas = Vec::with_capacity(4 * n * total);
    let nan_rate = if r.below(4) == 0 { 0.05 } else { 0.0 };
    let mut has_nan = false;
    for _ in 0..n * total {
        let v = if r.uniform() < nan_rate {
            has_nan = true;
            f32::NAN
        } else {
            (r.below(distinct) as f32 - distinct as f32 / 2.0) * 0.5
        };
        logits.push(v);
        if flat_deltas {
            deltas.extend([0.0f32, 0.0, 0.0, 0.0]);
        } else {
            deltas.extend((0..4).map(|_| r.range(-0.3, 0.3) as f32));
        }
    }
    let image_sizes = (0..n)
        .map(|_| {
            (
                h - r.below(h as u64 / 4) as usize,
                w - r.below(w as u64 / 4) as usize,
            )
        })
        .collect();
    // CUDA's top-k takes k <= 4096 unless every level is shorter (CUDA_MAX_K).
    let largest = level_sizes.iter().copied().max().unwrap_or(0);
    let pre = match [1usize, 7, 50, 300, 5000][r.below(5) as usize] {
        k if k > kestrel::ops::topk::CUDA_MAX_K && largest > kestrel::ops::topk::CUDA_MAX_K => 4096,
        k => k,
    };
    let post = [1usize, 5, 40, 1000][r.below(4) as usize];
    let (score_thresh, min_size) = match r.below(6) {
        0 => (1.5, 1e-3), // every box filtered by score
        1 => (0.0, 1e4),  // every box filtered by size
        2 => (0.6, 1e-3), // some filtered
        _ => (0.0, 1e-3),
    };
    let nms_thresh = [0.7, 0.5, 0.3][r.below(3) as usize];
    Case {
        n,
        level_sizes,
        logits,
        deltas,
        anchors,
        image_sizes,
        params: ProposalParams {
            pre_nms_top_n: pre,
            post_nms_top_n: post,
            nms_thresh,
            score_thresh,
            min_size,
        },
        has_nan,
    }
}

fn run(c: &Case, device: Device) -> Selected {
    let total: usize = c.level_sizes.iter().sum();
    let on = |t: Tensor| t.to_device(device).unwrap();
    select_proposals(
        &on(Tensor::from_vec(c.logits.clone(), [c.n, total]).unwrap()),
        &on(Tensor::from_vec(c.deltas.clone(), [c.n, total, 4]).unwrap()),
        &on(Tensor::from_vec(c.anchors.clone(), [total, 4]).unwrap()),
        &c.level_sizes,
        &c.image_sizes,
        &c.params,
    )
    .unwrap()
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.to_vec::<f32>()
        .unwrap()
        .into_iter()
        .map(f32::to_bits)
        .collect()
}

/// The CPU result against the tie rule (an independent statement of torchvision's
/// selection), image by image; NaN logits are outside the rule's model.
fn check_rule(c: &Case, s: &Selected, seed: u64) {
    if c.has_nan {
        return;
    }
    let total: usize = c.level_sizes.iter().sum();
    let p = &c.params;
    let rule = Rule {
        pre_nms_top_n: p.pre_nms_top_n,
        post_nms_top_n: p.post_nms_top_n,
        nms_thresh: p.nms_thresh,
        score_thresh: p.score_thresh,
        min_size: p.min_size,
    };
    let counts = s.host_counts().unwrap();
    let top = s.boxes.dims()[1];
    let boxes = s.boxes.to_vec::<f32>().unwrap();
    for (i, &count) in counts.iter().enumerate() {
        let cands = proposal_ties::candidates(
            &c.logits[i * total..(i + 1) * total],
            &c.deltas[4 * i * total..4 * (i + 1) * total],
            &c.anchors,
            &c.level_sizes,
            c.image_sizes[i],
            &rule,
        );
        let b: Vec<[f32; 4]> = boxes[4 * i * top..4 * (i * top + count)]
            .chunks_exact(4)
            .map(|x| [x[0], x[1], x[2], x[3]])
            .collect();
        proposal_ties::check(&b, &cands, &rule)
            .unwrap_or_else(|e| panic!("seed {seed} image {i}: {e}"));
    }
}

const CASES: u64 = 60;

#[test]
fn random_batches_follow_torchvision_rule_cpu() {
    // The corners the cases must reach: every box filtered, an empty level, a level
    // shorter than pre_nms_top_n, NaN logits, a cut by post_nms_top_n.
    let mut seen = [0usize; 5];
    for seed in 0..CASES {
        let c = random_case(seed);
        let s = run(&c, Device::Cpu);
        check_rule(&c, &s, seed);
        let counts = s.host_counts().unwrap();
        seen[0] += counts.iter().all(|&k| k == 0) as usize;
        seen[1] += c.level_sizes.contains(&0) as usize;
        seen[2] += c
            .level_sizes
            .iter()
            .any(|&l| l > 0 && l < c.params.pre_nms_top_n) as usize;
        seen[3] += c.has_nan as usize;
        seen[4] += counts.contains(&c.params.post_nms_top_n) as usize;
    }
    assert!(seen.iter().all(|&k| k > 0), "corners reached {seen:?}");
}

#[test]
fn random_batches_emulated_equal_cpu_exactly() {
    let dev = common::emulated();
    for seed in 0..CASES {
        let c = random_case(seed);
        let (want, got) = (run(&c, Device::Cpu), run(&c, dev));
        let what = format!(
            "seed {seed} (n {}, levels {:?}, {:?})",
            c.n, c.level_sizes, c.params
        );
        assert_eq!(got.boxes.device(), dev, "{what}: result device");
        assert_eq!(
            got.host_counts().unwrap(),
            want.host_counts().unwrap(),
            "{what}: counts"
        );
        assert_eq!(
            got.indices.to_vec_i64().unwrap(),
            want.indices.to_vec_i64().unwrap(),
            "{what}: candidate indices"
        );
        assert_eq!(bits(&got.boxes), bits(&want.boxes), "{what}: boxes");
        assert_eq!(bits(&got.scores), bits(&want.scores), "{what}: scores");
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn random_batches_cuda_equal_cpu_exactly() {
    let dev = common::cuda();
    for seed in 0..CASES {
        let c = random_case(seed);
        let (want, got) = (run(&c, Device::Cpu), run(&c, dev));
        assert_eq!(
            got.host_counts().unwrap(),
            want.host_counts().unwrap(),
            "seed {seed}"
        );
        assert_eq!(
            got.indices.to_vec_i64().unwrap(),
            want.indices.to_vec_i64().unwrap(),
            "seed {seed}"
        );
        assert_eq!(bits(&got.boxes), bits(&want.boxes), "seed {seed}");
        assert_eq!(bits(&got.scores), bits(&want.scores), "seed {seed}");
    }
}

/// The tie rule itself, on a hand-made level: A (logit 3) overlaps B (1); C and D
/// (both 2) overlap each other; E (0.5) overlaps nothing. torchvision keeps A, one of
/// C and D (topk orders the tie either way), and E.
#[test]
fn tie_rule_accepts_exactly_the_lists_ties_allow() {
    let anchors = [
        [0.0f32, 0.0, 10.0, 10.0],    // A
        [1.0, 0.0, 11.0, 10.0],       // B: IoU 0.82 with A
        [50.0, 50.0, 60.0, 60.0],     // C
        [51.0, 50.0, 61.0, 60.0],     // D: IoU 0.82 with C
        [100.0, 100.0, 110.0, 110.0], // E
    ];
    let (a, b, c, d, e) = (anchors[0], anchors[1], anchors[2], anchors[3], anchors[4]);
    let logits = [3.0f32, 1.0, 2.0, 2.0, 0.5];
    let flat: Vec<f32> = anchors.iter().flatten().copied().collect();
    let rule = |pre, post| Rule {
        pre_nms_top_n: pre,
        post_nms_top_n: post,
        nms_thresh: 0.7,
        score_thresh: 0.0,
        min_size: 1e-3,
    };
    let ok = |list: &[[f32; 4]], pre, post| {
        let r = rule(pre, post);
        let cands = proposal_ties::candidates(&logits, &[0.0; 20], &flat, &[5], (200, 200), &r);
        proposal_ties::check(list, &cands, &r).is_ok()
    };
    assert!(ok(&[a, c, e], 10, 10));
    assert!(ok(&[a, d, e], 10, 10));
    assert!(!ok(&[a, c, d, e], 10, 10), "C and D overlap: NMS keeps one");
    assert!(!ok(&[a, e], 10, 10), "one of C, D must be kept");
    assert!(!ok(&[c, a, e], 10, 10), "order by score");
    assert!(!ok(&[a, b, c, e], 10, 10), "B is suppressed by A");
    assert!(!ok(&[a, c], 10, 10), "E is kept when nothing is cut");
    assert!(ok(&[a, c], 10, 2), "post_nms_top_n 2 cuts E");
    assert!(ok(&[a, d], 2, 10), "topk 2 takes A and either of C, D");
    assert!(!ok(&[a, c, e], 2, 10), "E is not in the top 2");
    assert!(
        !ok(&[a], 2, 10),
        "topk 2 takes one of C, D, which NMS keeps"
    );
}
