//! Data loaders the runner can resume: the order of an epoch depends only on the
//! loader's seed and the epoch number, and a loader can start mid-epoch.

use crate::error::Result;
use crate::rng::Rng;

/// A source of batches whose order is a function of (seed, epoch), so that a run
/// resumed at batch `position` of epoch `epoch` sees the batches an uninterrupted run
/// would have seen.
pub trait DataLoader {
    /// What one step consumes.
    type Batch;

    /// Number of batches in one epoch.
    fn len(&self) -> usize;

    /// True when an epoch has no batch.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Start epoch `epoch` (0-based) at batch `position` (0 for a fresh epoch). A
    /// loader that prepares batches ahead may start its workers here.
    fn start(&mut self, epoch: u64, position: usize) -> Result<()>;

    /// The next batch of the current epoch, `None` after its last.
    fn next_batch(&mut self) -> Option<Result<Self::Batch>>;

    /// Why samples of the batch just returned were skipped (unreadable images under
    /// `skip_bad_images`), one message each; the runner logs and counts them.
    fn take_skipped(&mut self) -> Vec<String> {
        Vec::new()
    }
}

/// A permutation of `0..n` that depends only on `(seed, epoch)` (Fisher-Yates on a
/// SplitMix64 stream seeded by both).
pub fn epoch_permutation(n: usize, seed: u64, epoch: u64) -> Vec<usize> {
    // Mix the epoch in with a multiplier so (seed, epoch) and (seed + 1, epoch - 1)
    // give unrelated streams.
    let mut rng = Rng::new(seed ^ epoch.wrapping_add(1).wrapping_mul(0xD1B5_4A32_D192_ED03));
    let mut idx: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        idx.swap(i, j);
    }
    idx
}

/// An in-memory loader over items `T`, yielding batches `Vec<T>` of up to
/// `batch_size` items (the last one may be smaller unless `drop_last`), shuffled per
/// epoch by [`epoch_permutation`] when `shuffle` is set.
pub struct VecLoader<T> {
    items: Vec<T>,
    batch_size: usize,
    shuffle: bool,
    drop_last: bool,
    seed: u64,
    order: Vec<usize>,
    position: usize,
}

impl<T: Clone> VecLoader<T> {
    /// A loader over `items`; `batch_size` must be positive.
    pub fn new(items: Vec<T>, batch_size: usize, shuffle: bool, seed: u64) -> Result<Self> {
        if batch_size == 0 {
            return Err(crate::Error::invalid(
                "VecLoader",
                "batch_size must be positive",
            ));
        }
        Ok(VecLoader {
            items,
            batch_size,
            shuffle,
            drop_last: false,
            seed,
            order: Vec::new(),
            position: 0,
        })
    }

    /// Drop the last, incomplete batch of each epoch.
    pub fn drop_last(mut self, yes: bool) -> Self {
        self.drop_last = yes;
        self
    }
}

impl<T: Clone> DataLoader for VecLoader<T> {
    type Batch = Vec<T>;

    fn len(&self) -> usize {
        if self.drop_last {
            self.items.len() / self.batch_size
        } else {
            self.items.len().div_ceil(self.batch_size)
        }
    }

    fn start(&mut self, epoch: u64, position: usize) -> Result<()> {
        if position > self.len() {
            return Err(crate::Error::invalid(
                "VecLoader",
                format!(
                    "position {position} past the end of an epoch of {} batches",
                    self.len()
                ),
            ));
        }
        self.order = if self.shuffle {
            epoch_permutation(self.items.len(), self.seed, epoch)
        } else {
            (0..self.items.len()).collect()
        };
        self.position = position;
        Ok(())
    }

    fn next_batch(&mut self) -> Option<Result<Vec<T>>> {
        if self.position >= self.len() {
            return None;
        }
        let lo = self.position * self.batch_size;
        let hi = (lo + self.batch_size).min(self.order.len());
        self.position += 1;
        Some(Ok(self.order[lo..hi]
            .iter()
            .map(|&i| self.items[i].clone())
            .collect()))
    }
}
