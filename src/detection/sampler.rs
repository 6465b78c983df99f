//! Balanced positive / negative sampling of anchors or proposals (torchvision's
//! `BalancedPositiveNegativeSampler`), seeded with [`Rng`] so that a run is
//! reproducible and resumable.
//!
//! Labels: `>= 1` positive, `0` negative, `-1` (any negative value) ignored. Up to
//! `floor(batch_size_per_image * positive_fraction)` positives are drawn uniformly
//! without replacement, then negatives fill the rest of the batch. A draw that
//! would take every candidate takes every candidate and uses no random numbers, so
//! a batch size of at least the number of candidates makes sampling deterministic
//! (the fixtures use 10^6). Results are index lists in ascending order, what
//! torchvision's `torch.where(mask)` gives.
//!
//! This sampler runs on the host (labels on a CUDA device are copied back first) and
//! draws from a sequential [`Rng`]; the model's training step uses the batched device
//! sampler of [`super::targets`] instead (Philox keys, same on the CPU and the device).

use crate::error::{Error, Result};
use crate::rng::Rng;
use crate::tensor::{DType, Tensor};

/// Sampled indices of one image, each list ascending.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sampled {
    /// Indices of the sampled positives.
    pub positive: Vec<i64>,
    /// Indices of the sampled negatives.
    pub negative: Vec<i64>,
}

/// Samples `batch_size_per_image` elements per image with at most
/// `positive_fraction` of them positive: (256, 0.5) for the RPN, (512, 0.25) for the
/// box head.
#[derive(Clone, Debug, PartialEq)]
pub struct BalancedPositiveNegativeSampler {
    /// Samples per image.
    pub batch_size_per_image: usize,
    /// Fraction of positives, at most.
    pub positive_fraction: f64,
}

impl BalancedPositiveNegativeSampler {
    /// Errors unless `positive_fraction` is in [0, 1].
    pub fn new(batch_size_per_image: usize, positive_fraction: f64) -> Result<Self> {
        let s = BalancedPositiveNegativeSampler {
            batch_size_per_image,
            positive_fraction,
        };
        s.check()?;
        Ok(s)
    }

    fn check(&self) -> Result<()> {
        if !(0.0..=1.0).contains(&self.positive_fraction) {
            return Err(Error::invalid(
                "BalancedPositiveNegativeSampler",
                format!(
                    "positive_fraction {} is not in [0, 1]",
                    self.positive_fraction
                ),
            ));
        }
        Ok(())
    }

    /// Sample one image's labels `[N]` (i64, CPU or CUDA).
    pub fn sample(&self, labels: &Tensor, rng: &mut Rng) -> Result<Sampled> {
        if labels.dtype() != DType::I64 || labels.dims().len() != 1 {
            return Err(Error::shape(
                "BalancedPositiveNegativeSampler",
                format!(
                    "labels must be i64 [N], got {} {:?}",
                    labels.dtype(),
                    labels.dims()
                ),
            ));
        }
        self.sample_labels(&labels.to_vec_i64()?, rng)
    }

    /// Sample each image of a batch in turn with the same generator.
    pub fn sample_batch(&self, labels: &[Tensor], rng: &mut Rng) -> Result<Vec<Sampled>> {
        labels.iter().map(|l| self.sample(l, rng)).collect()
    }

    /// Sample one image's labels given as a slice.
    pub fn sample_labels(&self, labels: &[i64], rng: &mut Rng) -> Result<Sampled> {
        self.check()?;
        let positive: Vec<i64> = (0..labels.len() as i64)
            .filter(|&i| labels[i as usize] >= 1)
            .collect();
        let negative: Vec<i64> = (0..labels.len() as i64)
            .filter(|&i| labels[i as usize] == 0)
            .collect();
        // int(batch * fraction) in Python: the product in f64, truncated.
        let want_pos = (self.batch_size_per_image as f64 * self.positive_fraction) as usize;
        let num_pos = want_pos.min(positive.len());
        let num_neg = (self.batch_size_per_image - num_pos).min(negative.len());
        Ok(Sampled {
            positive: choose(positive, num_pos, rng),
            negative: choose(negative, num_neg, rng),
        })
    }
}

/// `k` of `items` uniformly without replacement (partial Fisher-Yates), ascending.
/// Taking all of them draws nothing.
fn choose(mut items: Vec<i64>, k: usize, rng: &mut Rng) -> Vec<i64> {
    if k < items.len() {
        for i in 0..k {
            let j = i + rng.below((items.len() - i) as u64) as usize;
            items.swap(i, j);
        }
        items.truncate(k);
        items.sort_unstable();
    }
    items
}
