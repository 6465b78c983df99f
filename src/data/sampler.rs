//! PyTorch's `DistributedSampler` semantics: which dataset indices a rank of a
//! data-parallel group reads in an epoch.
//!
//! Every rank draws the same seeded order of the epoch (the loader's shuffle); the
//! order is padded by repeating its beginning until its length is a multiple of the
//! world size (or, with `drop_last`, cut down to one), and rank `r` takes every
//! `world_size`-th index starting at position `r`. The shards are disjoint except for
//! the padding and together cover the dataset; every rank has the same number of
//! samples, so every rank runs the same number of steps.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// A rank's part of a data-parallel group, for a [`super::Loader`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Shard {
    /// This rank, `0..world_size`.
    pub rank: usize,
    /// Ranks in the group.
    pub world_size: usize,
    /// Drop the tail of the order that does not fill a round of `world_size` instead
    /// of padding it (`DistributedSampler(drop_last=True)`).
    pub drop_last: bool,
}

impl Default for Shard {
    /// The whole dataset (a world of one).
    fn default() -> Self {
        Shard {
            rank: 0,
            world_size: 1,
            drop_last: false,
        }
    }
}

impl Shard {
    /// Rank `rank` of `world_size`, padding the last round.
    pub fn new(rank: usize, world_size: usize) -> Result<Shard> {
        if world_size == 0 || rank >= world_size {
            return Err(Error::invalid(
                "Shard",
                format!("rank {rank} of a world of {world_size}"),
            ));
        }
        Ok(Shard {
            rank,
            world_size,
            drop_last: false,
        })
    }

    /// Samples each rank reads per epoch from a dataset of `n`.
    pub fn len(&self, n: usize) -> usize {
        if self.drop_last {
            n / self.world_size
        } else {
            n.div_ceil(self.world_size)
        }
    }

    /// Whether a rank reads nothing from a dataset of `n`.
    pub fn is_empty(&self, n: usize) -> bool {
        self.len(n) == 0
    }

    /// This rank's indices, given the epoch's `order` of the whole dataset.
    pub fn select(&self, order: &[usize]) -> Vec<usize> {
        let total = self.len(order.len()) * self.world_size;
        if order.is_empty() {
            return Vec::new();
        }
        // Padding repeats the order from its start, cycling when the padding is longer
        // than the dataset (torch: `indices += (indices * ceil(pad / n))[:pad]`).
        (0..total)
            .skip(self.rank)
            .step_by(self.world_size)
            .map(|i| order[i % order.len()])
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Expected shards written out by hand from torch.utils.data.DistributedSampler
    // (shuffle=False): n = 10, 4 replicas -> total 12, padded with indices 0, 1.
    #[test]
    fn pads_and_strides_like_torch() {
        let order: Vec<usize> = (0..10).collect();
        let shard = |r| Shard::new(r, 4).unwrap().select(&order);
        assert_eq!(shard(0), vec![0, 4, 8]);
        assert_eq!(shard(1), vec![1, 5, 9]);
        assert_eq!(shard(2), vec![2, 6, 0]);
        assert_eq!(shard(3), vec![3, 7, 1]);
        let dl = Shard {
            drop_last: true,
            ..Shard::new(3, 4).unwrap()
        };
        assert_eq!(dl.select(&order), vec![3, 7]);
        // Padding longer than the dataset cycles: n = 2, 5 replicas.
        let tiny = [7usize, 9];
        let all: Vec<usize> = (0..5)
            .flat_map(|r| Shard::new(r, 5).unwrap().select(&tiny))
            .collect();
        assert_eq!(all, vec![7, 9, 7, 9, 7]);
    }

    #[test]
    fn rejects_rank_outside_world() {
        assert!(matches!(
            Shard::new(2, 2),
            Err(Error::InvalidArgument { .. })
        ));
        assert!(Shard::new(0, 0).is_err());
    }
}
