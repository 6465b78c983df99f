//! The in-process group: `world_size` communicators sharing memory, one per thread
//! (each thread a rank with its own model on the CPU or an emulated device). The
//! tests run the whole data-parallel path on it.
//!
//! Every collective is one exchange round: each rank deposits its message, the last
//! to arrive publishes the round's messages and wakes the others. A rank waiting for
//! a round checks, each time it wakes, whether a missing rank has left the group (its
//! communicator was dropped or aborted before it deposited) or the timeout passed.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::queues::{BucketQueues, EmuQueues, QueueLog};
use super::{exchange_all_reduce, exchange_broadcast, Collective, Exchange, ReduceOp};
use crate::error::{Error, Result};
use crate::tensor::Tensor;
use crate::Device;

/// What a rank deposits in a round: bytes (host collectives) or a device tensor
/// (device all-reduce: the ranks read each other's device buffers, no host staging).
#[derive(Clone)]
enum Payload {
    Bytes(Vec<u8>),
    Tensor(Tensor),
}

struct Round {
    /// Round number (collectives completed so far by the group).
    number: u64,
    /// Each rank's message and collective description for this round.
    slots: Vec<Option<(String, Payload)>>,
    /// The last completed round's messages.
    published: Option<(u64, Arc<Vec<Payload>>)>,
    /// Ranks that left, with why.
    departed: Vec<Option<String>>,
    /// Set when the group is broken (a timeout, a mismatch): every call fails with it.
    broken: Option<String>,
}

struct Shared {
    world: usize,
    timeout: Duration,
    round: Mutex<Round>,
    wake: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Round> {
        // A rank that panicked while holding the lock leaves consistent data (every
        // update is a single assignment); carry on so the others can report it.
        self.round.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// One rank of an in-process group (see [`local_group`]).
pub struct LocalComm {
    rank: usize,
    shared: Arc<Shared>,
    /// The emulated compute/communication queues of this rank's device buckets.
    queues: Arc<EmuQueues>,
}

/// `world_size` communicators of one in-process group, rank `i` at index `i`; hand
/// each to its own thread. A collective waits at most `timeout` for the others.
pub fn local_group(world_size: usize, timeout: Duration) -> Result<Vec<LocalComm>> {
    if world_size == 0 {
        return Err(Error::invalid("local_group", "world_size must be > 0"));
    }
    let shared = Arc::new(Shared {
        world: world_size,
        timeout,
        round: Mutex::new(Round {
            number: 0,
            slots: vec![None; world_size],
            published: None,
            departed: vec![None; world_size],
            broken: None,
        }),
        wake: Condvar::new(),
    });
    let log = QueueLog::new();
    Ok((0..world_size)
        .map(|rank| LocalComm {
            rank,
            shared: shared.clone(),
            queues: Arc::new(EmuQueues::new(rank, log.clone(), timeout)),
        })
        .collect())
}

fn list(ranks: &[usize]) -> String {
    let v: Vec<String> = ranks.iter().map(|r| r.to_string()).collect();
    let s = if ranks.len() == 1 { "" } else { "s" };
    format!("rank{s} {}", v.join(", "))
}

impl Exchange for LocalComm {
    fn exchange(&self, what: &str, data: Vec<u8>) -> Result<Arc<Vec<Vec<u8>>>> {
        let parts = self.exchange_payload(what, Payload::Bytes(data))?;
        let bytes = parts
            .iter()
            .map(|p| match p {
                Payload::Bytes(b) => Ok(b.clone()),
                Payload::Tensor(_) => Err(Error::Distributed(format!(
                    "{what}: a rank sent a tensor where bytes were expected"
                ))),
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Arc::new(bytes))
    }
}

impl LocalComm {
    /// This rank's emulated bucket queues (their log is shared by the whole group).
    pub fn queues(&self) -> Arc<EmuQueues> {
        self.queues.clone()
    }

    fn exchange_payload(&self, what: &str, data: Payload) -> Result<Arc<Vec<Payload>>> {
        let sh = &self.shared;
        let mut st = sh.lock();
        if let Some(b) = &st.broken {
            return Err(Error::Distributed(b.clone()));
        }
        let my_round = st.number;
        st.slots[self.rank] = Some((what.to_string(), data));
        if st.slots.iter().all(Option::is_some) {
            let slots: Vec<(String, Payload)> =
                st.slots.iter_mut().filter_map(Option::take).collect();
            if let Some((r, (w, _))) = slots
                .iter()
                .enumerate()
                .find(|(_, (w, _))| w != &slots[0].0)
            {
                let msg = format!(
                    "collective #{my_round}: rank {r} called {w} while rank 0 called {}",
                    slots[0].0
                );
                st.broken = Some(msg.clone());
                sh.wake.notify_all();
                return Err(Error::Distributed(msg));
            }
            let msgs = Arc::new(slots.into_iter().map(|(_, d)| d).collect::<Vec<_>>());
            st.published = Some((my_round, msgs.clone()));
            st.number += 1;
            sh.wake.notify_all();
            return Ok(msgs);
        }
        let deadline = Instant::now() + sh.timeout;
        loop {
            if let Some((n, msgs)) = &st.published {
                if *n == my_round {
                    return Ok(msgs.clone());
                }
            }
            if let Some(b) = &st.broken {
                return Err(Error::Distributed(b.clone()));
            }
            if let Some(why) = &st.departed[self.rank] {
                return Err(Error::Distributed(format!(
                    "this rank ({}) {why}",
                    self.rank
                )));
            }
            let missing: Vec<usize> = (0..sh.world).filter(|&r| st.slots[r].is_none()).collect();
            let gone: Vec<String> = missing
                .iter()
                .filter_map(|&r| st.departed[r].as_ref().map(|why| format!("rank {r} {why}")))
                .collect();
            if !gone.is_empty() {
                let msg = format!("collective #{my_round} ({what}): {}", gone.join("; "));
                st.broken = Some(msg.clone());
                sh.wake.notify_all();
                return Err(Error::Distributed(msg));
            }
            let now = Instant::now();
            if now >= deadline {
                let msg = format!(
                    "collective #{my_round} ({what}): {} did not arrive within {:.1} s",
                    list(&missing),
                    sh.timeout.as_secs_f64()
                );
                st.broken = Some(msg.clone());
                sh.wake.notify_all();
                return Err(Error::Distributed(msg));
            }
            st = sh
                .wake
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

impl Collective for LocalComm {
    fn rank(&self) -> usize {
        self.rank
    }
    fn bucket_queues(&self) -> Option<Arc<dyn BucketQueues>> {
        Some(self.queues.clone())
    }
    fn world_size(&self) -> usize {
        self.shared.world
    }
    fn all_reduce(&self, buf: &mut [f32], op: ReduceOp) -> Result<()> {
        exchange_all_reduce(self, buf, op)
    }
    fn broadcast(&self, buf: &mut [f32], root: usize) -> Result<()> {
        exchange_broadcast(self, buf, root, self.shared.world)
    }
    fn all_gather_bytes(&self, data: &[u8]) -> Result<Vec<Vec<u8>>> {
        Ok(self.exchange("all_gather", data.to_vec())?.as_ref().clone())
    }
    fn barrier(&self) -> Result<()> {
        self.exchange("barrier", Vec::new()).map(|_| ())
    }
    /// On a CUDA (or emulated) device the ranks exchange their device tensors and
    /// each adds them on its own device in rank order (then scales by `1 / W` for
    /// [`ReduceOp::Avg`]): no host copy. The sum order is the host reduction's, so
    /// the result equals it bit for bit when `1 / W` is exact (W a power of two).
    fn all_reduce_tensor(&self, t: &Tensor, op: ReduceOp) -> Result<Tensor> {
        if t.device() == Device::Cpu {
            let mut v = t.to_vec::<f32>()?;
            self.all_reduce(&mut v, op)?;
            return Tensor::from_vec(v, t.shape().clone());
        }
        let what = format!("all_reduce({op:?}) of {} device values", t.numel());
        let parts = self.exchange_payload(&what, Payload::Tensor(t.clone()))?;
        let mut acc: Option<Tensor> = None;
        for (r, p) in parts.iter().enumerate() {
            let Payload::Tensor(p) = p else {
                return Err(Error::Distributed(format!(
                    "{what}: rank {r} sent bytes where a tensor was expected"
                )));
            };
            if p.shape() != t.shape() {
                return Err(Error::Distributed(format!(
                    "{what}: rank {r} sent {} where this rank has {}",
                    p.shape(),
                    t.shape()
                )));
            }
            // Ranks on other devices of this process: copied over (peer copy).
            let p = if p.device() == t.device() {
                p.clone()
            } else {
                p.to_device(t.device())?
            };
            acc = Some(match acc {
                None => p,
                Some(a) => crate::ops::add(&a, &p)?,
            });
        }
        let sum = acc.ok_or_else(|| Error::Distributed("all_reduce in an empty group".into()))?;
        match op {
            ReduceOp::Sum => Ok(sum),
            ReduceOp::Avg => crate::ops::scale(&sum, 1.0 / self.shared.world as f64),
        }
    }
    fn abort(&self, reason: &str) {
        let mut st = self.shared.lock();
        if st.departed[self.rank].is_none() {
            st.departed[self.rank] = Some(format!("failed: {reason}"));
        }
        self.shared.wake.notify_all();
    }
}

impl Drop for LocalComm {
    fn drop(&mut self) {
        let mut st = self.shared.lock();
        if st.departed[self.rank].is_none() {
            let why = if std::thread::panicking() {
                "panicked"
            } else {
                "left the group (its communicator was dropped: the rank stopped)"
            };
            st.departed[self.rank] = Some(why.to_string());
        }
        self.shared.wake.notify_all();
    }
}
