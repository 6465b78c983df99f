//! Training-time augmentations on [`Sample`]s (before the model transform resizes,
//! normalises and pads).

use super::Sample;
use crate::rng::Rng;

/// Mirror a sample left-right: pixels and boxes (`x1' = W - x2`, `x2' = W - x1`,
/// as torchvision's `RandomHorizontalFlip` for detection).
pub fn hflip(s: &Sample) -> Sample {
    let (h, w) = (s.height, s.width);
    let mut image = vec![0u8; s.image.len()];
    for (src, dst) in s.image.chunks_exact(w).zip(image.chunks_exact_mut(w)) {
        for x in 0..w {
            dst[x] = src[w - 1 - x];
        }
    }
    debug_assert_eq!(image.len(), 3 * h * w);
    let wf = w as f32;
    let boxes = s
        .boxes
        .iter()
        .map(|b| [wf - b[2], b[1], wf - b[0], b[3]])
        .collect();
    Sample {
        image,
        height: h,
        width: w,
        boxes,
        labels: s.labels.clone(),
        image_id: s.image_id,
    }
}

/// Flip with probability `prob`, drawing one number from `rng` whatever the outcome (so
/// the stream of draws does not depend on earlier outcomes).
pub fn random_hflip(s: Sample, prob: f64, rng: &mut Rng) -> Sample {
    if rng.uniform() < prob {
        hflip(&s)
    } else {
        s
    }
}
