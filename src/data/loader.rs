//! A batching loader that prepares the next batches on worker threads, in an order
//! that depends only on the seed and the epoch, so that a run can stop after any
//! batch and resume with the same data.
//!
//! - Order of epoch `e`: a Fisher-Yates permutation drawn from `Rng::new(seed ^ e)`
//!   (or `0..n` without shuffling).
//! - Augmentation of dataset item `i` in epoch `e` draws from its own generator
//!   (a function of seed, epoch and `i`), so it does not depend on which thread
//!   prepared it, nor on where the run resumed.
//! - Batch `b` of the stream is prepared by worker `b % workers` and handed over in
//!   order; each worker keeps at most `ceil(prefetch / workers)` finished batches.

use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;

use serde::{Deserialize, Serialize};

use super::sampler::Shard;
use super::transforms::random_hflip;
use super::Sample;
use crate::error::{Error, Result};
use crate::rng::Rng;

/// Most worker threads a [`Loader`] starts: each is an OS thread with its own
/// prefetched batches; far more than cores only costs memory (and 100000 threads
/// abort the process).
pub const MAX_WORKERS: usize = 256;
/// Most batches a [`Loader`] prepares ahead.
pub const MAX_PREFETCH: usize = 1024;

/// Anything that yields samples by index. Implementations must be deterministic:
/// `get(i)` returns the same sample every time.
pub trait Dataset: Send + Sync {
    /// Number of samples.
    fn len(&self) -> usize;
    /// Whether there are none.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Sample `index` (`0..len()`).
    fn get(&self, index: usize) -> Result<Sample>;
    /// Whether a [`Loader`] should replace a sample that fails to load (an image
    /// that is truncated or corrupt past its header) instead of stopping: the
    /// dataset's `skip_bad_images`. False unless the dataset says so.
    fn skips_bad_samples(&self) -> bool {
        false
    }
}

/// Samples held in memory, as a [`Dataset`].
#[derive(Clone, Debug, Default, PartialEq)]
pub struct InMemory(pub Vec<Sample>);

impl Dataset for InMemory {
    fn len(&self) -> usize {
        self.0.len()
    }
    fn get(&self, index: usize) -> Result<Sample> {
        self.0.get(index).cloned().ok_or_else(|| {
            Error::invalid("Dataset::get", format!("index {index} of {}", self.0.len()))
        })
    }
}

/// Settings of a [`Loader`].
#[derive(Clone, Debug, PartialEq)]
pub struct LoaderConfig {
    /// Samples per batch (> 0).
    pub batch_size: usize,
    /// Shuffle each epoch (training) or keep dataset order (evaluation).
    pub shuffle: bool,
    /// Seed of the order and of the augmentations.
    pub seed: u64,
    /// Drop a last, incomplete batch.
    pub drop_last: bool,
    /// Probability of a horizontal flip per sample (0 for evaluation).
    pub hflip_prob: f64,
    /// Threads preparing batches; 0 prepares each batch on the caller's thread when asked.
    pub workers: usize,
    /// Batches prepared ahead of the consumer (at least one per worker).
    pub prefetch: usize,
}

impl Default for LoaderConfig {
    fn default() -> Self {
        LoaderConfig {
            batch_size: 2,
            shuffle: true,
            seed: 0,
            drop_last: false,
            hflip_prob: 0.5,
            workers: 1,
            prefetch: 2,
        }
    }
}

/// Where a loader stands: the next batch to hand out is batch `batch` of epoch `epoch`.
/// Save it in a checkpoint; [`Loader::iter_from`] resumes from it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct LoaderState {
    /// Epoch number, from 0; seeds that epoch's shuffle.
    pub epoch: u64,
    /// Index of the next batch within the epoch, from 0.
    pub batch: usize,
}

/// A batch of samples, with where it came from.
#[derive(Clone, Debug, PartialEq)]
pub struct Batch {
    /// The samples, in batch order.
    pub samples: Vec<Sample>,
    /// Dataset index of each sample.
    pub indices: Vec<usize>,
    /// The epoch the batch belongs to, from 0.
    pub epoch: u64,
    /// Batch number within the epoch.
    pub batch: usize,
    /// Samples that failed to load and were replaced (only when the dataset
    /// [skips bad samples](Dataset::skips_bad_samples)): the error of each.
    pub skipped: Vec<String>,
}

/// Batches of a [`Dataset`] in a reproducible order (see the module docs).
#[derive(Clone)]
pub struct Loader {
    dataset: Arc<dyn Dataset>,
    cfg: LoaderConfig,
    shard: Shard,
}

impl Loader {
    /// A loader over `dataset`. An empty dataset or a batch size of 0 is an error.
    pub fn new(dataset: Arc<dyn Dataset>, cfg: LoaderConfig) -> Result<Loader> {
        let n = dataset.len();
        if cfg.batch_size == 0 {
            return Err(Error::invalid("Loader", "batch_size must be > 0"));
        }
        if n == 0 || (cfg.drop_last && n < cfg.batch_size) {
            return Err(Error::invalid(
                "Loader",
                format!("{n} samples make no batch of {}", cfg.batch_size),
            ));
        }
        if cfg.workers > MAX_WORKERS {
            return Err(Error::invalid(
                "Loader",
                format!(
                    "{} workers: at most {MAX_WORKERS} threads prepare batches",
                    cfg.workers
                ),
            ));
        }
        if cfg.prefetch > MAX_PREFETCH {
            return Err(Error::invalid(
                "Loader",
                format!(
                    "prefetch {}: at most {MAX_PREFETCH} batches are prepared ahead",
                    cfg.prefetch
                ),
            ));
        }
        if !(0.0..=1.0).contains(&cfg.hflip_prob) {
            return Err(Error::invalid(
                "Loader",
                format!("hflip_prob {}", cfg.hflip_prob),
            ));
        }
        Ok(Loader {
            dataset,
            cfg,
            shard: Shard::default(),
        })
    }

    /// This loader reading only `shard`'s part of each epoch (data-parallel training,
    /// see [`Shard`]): every rank shuffles the same way and takes its stride of the
    /// padded order. Batches, positions and [`LoaderState`] count this rank's batches,
    /// which are as many on every rank, so one state describes the whole world.
    pub fn sharded(mut self, shard: Shard) -> Result<Loader> {
        Shard::new(shard.rank, shard.world_size)?;
        let n = shard.len(self.dataset.len());
        if n == 0 || (self.cfg.drop_last && n < self.cfg.batch_size) {
            return Err(Error::invalid(
                "Loader",
                format!(
                    "a shard of {n} samples (rank {} of {}) makes no batch of {}",
                    shard.rank, shard.world_size, self.cfg.batch_size
                ),
            ));
        }
        self.shard = shard;
        Ok(self)
    }

    /// The part of each epoch this loader reads.
    pub fn shard(&self) -> Shard {
        self.shard
    }

    /// The settings.
    pub fn config(&self) -> &LoaderConfig {
        &self.cfg
    }

    /// The dataset.
    pub fn dataset(&self) -> &Arc<dyn Dataset> {
        &self.dataset
    }

    /// Batches per epoch.
    pub fn batches_per_epoch(&self) -> usize {
        let (n, b) = (self.shard.len(self.dataset.len()), self.cfg.batch_size);
        if self.cfg.drop_last {
            n / b
        } else {
            n.div_ceil(b)
        }
    }

    /// The dataset indices this loader reads in epoch `epoch`, in order: the epoch's
    /// order restricted to the loader's shard.
    pub fn order(&self, epoch: u64) -> Vec<usize> {
        let order = self.full_order(epoch);
        if self.shard.world_size > 1 {
            self.shard.select(&order)
        } else {
            order
        }
    }

    /// The order of every dataset index in epoch `epoch` (the same on every rank).
    pub fn full_order(&self, epoch: u64) -> Vec<usize> {
        let n = self.dataset.len();
        let mut order: Vec<usize> = (0..n).collect();
        if self.cfg.shuffle {
            let mut rng = Rng::new(self.cfg.seed ^ epoch);
            for i in (1..n).rev() {
                let j = rng.below(i as u64 + 1) as usize;
                order.swap(i, j);
            }
        }
        order
    }

    /// Dataset indices of batch `batch` of epoch `epoch`.
    pub fn batch_indices(&self, epoch: u64, batch: usize) -> Vec<usize> {
        let order = self.order(epoch);
        let b = self.cfg.batch_size;
        order[(batch * b).min(order.len())..((batch + 1) * b).min(order.len())].to_vec()
    }

    /// Prepare one batch (on the calling thread): load, then augment each sample.
    ///
    /// When the dataset [skips bad samples](Dataset::skips_bad_samples), a sample
    /// that fails to load is replaced by the next dataset index (wrapping) that
    /// loads, so batches keep their size and the choice depends only on the data;
    /// the failures are listed in [`Batch::skipped`].
    pub fn load_batch(&self, epoch: u64, batch: usize) -> Result<Batch> {
        let mut indices = self.batch_indices(epoch, batch);
        let mut skipped = Vec::new();
        let mut samples = Vec::with_capacity(indices.len());
        for i in indices.iter_mut() {
            let s = match self.dataset.get(*i) {
                Ok(s) => s,
                Err(e) if self.dataset.skips_bad_samples() => {
                    skipped.push(e.to_string());
                    let (j, s) = self.replacement(*i, &mut skipped)?;
                    *i = j;
                    s
                }
                Err(e) => return Err(e),
            };
            let mut rng = sample_rng(self.cfg.seed, epoch, *i);
            samples.push(random_hflip(s, self.cfg.hflip_prob, &mut rng));
        }
        Ok(Batch {
            samples,
            indices,
            epoch,
            batch,
            skipped,
        })
    }

    /// The first dataset index after `bad` (wrapping) whose sample loads; the errors
    /// of those that do not are added to `skipped`.
    fn replacement(&self, bad: usize, skipped: &mut Vec<String>) -> Result<(usize, Sample)> {
        let n = self.dataset.len();
        for k in 1..n {
            let j = (bad + k) % n;
            match self.dataset.get(j) {
                Ok(s) => return Ok((j, s)),
                Err(e) => skipped.push(e.to_string()),
            }
        }
        Err(Error::invalid(
            "Loader",
            format!("no sample of the {n} in the dataset loads (skip_bad_images is on)"),
        ))
    }

    /// The batches of one epoch, from its start.
    pub fn epoch(&self, epoch: u64) -> Batches {
        self.spawn(LoaderState { epoch, batch: 0 }, Some(epoch + 1))
    }

    /// Batches from `state` on, through the following epochs without end (for
    /// iteration-based training); [`Batches::state`] says where it stands.
    pub fn iter_from(&self, state: LoaderState) -> Batches {
        self.spawn(state, None)
    }

    /// The rest of `state`'s epoch, from batch `state.batch` (for resuming an
    /// epoch-based run).
    pub fn resume_epoch(&self, state: LoaderState) -> Batches {
        self.spawn(state, Some(state.epoch + 1))
    }

    fn spawn(&self, start: LoaderState, end_epoch: Option<u64>) -> Batches {
        let per_epoch = self.batches_per_epoch();
        let total = end_epoch.map(|e| {
            let left_in_first = per_epoch.saturating_sub(start.batch);
            left_in_first + per_epoch * (e.saturating_sub(start.epoch + 1) as usize)
        });
        let mut b = Batches {
            loader: self.clone(),
            start,
            per_epoch,
            next: 0,
            total,
            receivers: Vec::new(),
            handles: Vec::new(),
        };
        let w = self.cfg.workers;
        if w == 0 {
            return b;
        }
        let cap = self.cfg.prefetch.div_ceil(w).max(1);
        for k in 0..w {
            let (tx, rx) = sync_channel::<Result<Batch>>(cap);
            let loader = self.clone();
            let handle = std::thread::spawn(move || {
                let mut j = k;
                while total.is_none_or(|t| j < t) {
                    let (epoch, batch) = position(start, per_epoch, j);
                    // A closed channel means the consumer is gone: stop.
                    if tx.send(loader.load_batch(epoch, batch)).is_err() {
                        return;
                    }
                    j += w;
                }
            });
            b.receivers.push(rx);
            b.handles.push(handle);
        }
        b
    }
}

/// The (epoch, batch) of the `j`-th batch of a stream that starts at `start`.
fn position(start: LoaderState, per_epoch: usize, j: usize) -> (u64, usize) {
    let abs = start.batch + j;
    (start.epoch + (abs / per_epoch) as u64, abs % per_epoch)
}

/// The generator of sample `index`'s augmentations in `epoch`.
fn sample_rng(seed: u64, epoch: u64, index: usize) -> Rng {
    let mut r = Rng::new(
        seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15)
            ^ (index as u64).wrapping_mul(0xC2B2_AE3D_27D4_EB4F),
    );
    Rng::new(r.next_u64())
}

/// An iterator over prepared batches; dropping it stops the workers.
pub struct Batches {
    loader: Loader,
    start: LoaderState,
    per_epoch: usize,
    /// Batches handed out so far.
    next: usize,
    /// Batches in the stream (`None`: endless).
    total: Option<usize>,
    receivers: Vec<Receiver<Result<Batch>>>,
    handles: Vec<JoinHandle<()>>,
}

impl Batches {
    /// The position of the next batch to be handed out: save it to resume there.
    pub fn state(&self) -> LoaderState {
        let (epoch, batch) = position(self.start, self.per_epoch, self.next);
        LoaderState { epoch, batch }
    }

    /// Batches left (`None`: endless).
    pub fn remaining(&self) -> Option<usize> {
        self.total.map(|t| t - self.next)
    }
}

impl Iterator for Batches {
    type Item = Result<Batch>;

    fn next(&mut self) -> Option<Result<Batch>> {
        if self.total.is_some_and(|t| self.next >= t) {
            return None;
        }
        let j = self.next;
        self.next += 1;
        if self.receivers.is_empty() {
            let (epoch, batch) = position(self.start, self.per_epoch, j);
            return Some(self.loader.load_batch(epoch, batch));
        }
        let rx = &self.receivers[j % self.receivers.len()];
        Some(rx.recv().unwrap_or_else(|_| {
            Err(Error::invalid(
                "Loader",
                "a worker thread stopped (it panicked)",
            ))
        }))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        match self.remaining() {
            Some(r) => (r, Some(r)),
            None => (usize::MAX, None),
        }
    }
}

impl Drop for Batches {
    fn drop(&mut self) {
        // Closing the channels makes every worker's next send fail, so it returns.
        self.receivers.clear();
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}
