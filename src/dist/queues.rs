//! The two device queues a rank's gradient buckets move through, ordered by events.
//!
//! On a GPU a bucket's all-reduce runs on a communication stream next to the compute
//! stream, and only events order the two (no host wait, no host copy):
//!
//! 1. compute stream: the bucket's gradients are concatenated into one device buffer,
//!    then a *ready* event is recorded ([`BucketQueues::record_ready`]);
//! 2. communication stream: wait for the ready event, all-reduce the buffer in place
//!    (average), record a *done* event ([`BucketQueues::reduce_after`]);
//! 3. compute stream: wait for the done event ([`BucketQueues::compute_wait`]), so the
//!    slicing of the averages and the optimizer, queued after it, read reduced values.
//!
//! [`super::GradReducer`] drives every device bucket through this interface. NCCL
//! implements it with CUDA events and `ncclAllReduce` on its own stream (`NcclComm`,
//! `nccl` feature). The in-process group over emulated devices implements it with
//! [`EmuQueues`]: the emulated device runs each launch when it is queued, so its
//! compute "stream" is the training thread's program order, and the communication
//! stream is the rank's communication thread ([`super::CommStream`]); an event is a
//! flag that the waiting side blocks on. Every step is written to a [`QueueLog`], so a
//! test can check the order the GPU relies on: no all-reduce starts before its
//! bucket's ready event, and nothing after [`BucketQueues::compute_wait`] (the
//! optimizer) runs before every done event.

use std::any::Any;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use super::{Collective, ReduceOp};
use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// An event recorded on one of a rank's queues (a CUDA event on a GPU, a flag on an
/// emulated device). Only the [`BucketQueues`] that made it can use it.
pub struct QueueEvent(Box<dyn Any + Send + Sync>);

impl QueueEvent {
    /// Wrap an implementation's event.
    pub fn new<E: Any + Send + Sync>(e: E) -> QueueEvent {
        QueueEvent(Box::new(e))
    }

    /// The implementation's event, if it is an `E`.
    pub fn get<E: Any>(&self) -> Option<&E> {
        self.0.downcast_ref()
    }
}

/// The stream/event ordering of device gradient buckets (see the module docs).
pub trait BucketQueues: Send + Sync {
    /// On the compute queue, after the work queued so far (the concatenation into
    /// `buf` included): record and return bucket `bucket`'s ready event.
    fn record_ready(&self, bucket: usize, buf: &Tensor) -> Result<QueueEvent>;

    /// On the communication queue (called from the rank's communication thread, in
    /// bucket order, the same on every rank): wait for `ready`, average `buf` across
    /// the ranks of `comm`, record the done event. Returns the buffer holding the
    /// averages (`buf` itself where the reduction is in place) and the done event.
    /// Queues the work and may return before it has run.
    fn reduce_after(
        &self,
        comm: &dyn Collective,
        bucket: usize,
        ready: QueueEvent,
        buf: Tensor,
    ) -> Result<(Tensor, QueueEvent)>;

    /// On the compute queue: everything queued after this call waits for `done`.
    fn compute_wait(&self, bucket: usize, done: QueueEvent) -> Result<()>;
}

/// Which queue a [`QueueEntry`] happened on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Queue {
    /// The compute stream (the training thread on an emulated device).
    Compute,
    /// The communication stream (the rank's communication thread).
    Comm,
}

/// One step of a bucket's trip through the queues, as logged by [`EmuQueues`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum QueueStep {
    /// The ready event was recorded on the compute queue.
    ReadyRecorded,
    /// The communication queue passed its wait on the ready event.
    ReadyWaited,
    /// The all-reduce started.
    ReduceStart,
    /// The all-reduce ended.
    ReduceEnd,
    /// The done event was recorded on the communication queue.
    DoneRecorded,
    /// The compute queue passed its wait on the done event.
    DoneWaited,
    /// A mark set by the caller ([`QueueLog::mark`]), e.g. where the optimizer ran.
    Mark(String),
}

/// One logged step.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueueEntry {
    /// The rank.
    pub rank: usize,
    /// The queue it happened on.
    pub queue: Queue,
    /// The bucket (`None` for marks).
    pub bucket: Option<usize>,
    /// What happened.
    pub step: QueueStep,
}

/// The steps of every rank's queues in the order they happened (one log per group:
/// entries of different ranks interleave as they ran).
#[derive(Clone, Default)]
pub struct QueueLog(Arc<Mutex<Vec<QueueEntry>>>);

impl QueueLog {
    /// An empty log.
    pub fn new() -> QueueLog {
        QueueLog::default()
    }

    fn push(&self, rank: usize, queue: Queue, bucket: Option<usize>, step: QueueStep) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(QueueEntry {
                rank,
                queue,
                bucket,
                step,
            });
    }

    /// Append a mark for `rank` on its compute queue (what a test wants ordered
    /// against the buckets, such as the optimizer step).
    pub fn mark(&self, rank: usize, what: &str) {
        self.push(rank, Queue::Compute, None, QueueStep::Mark(what.into()));
    }

    /// A copy of the entries so far.
    pub fn entries(&self) -> Vec<QueueEntry> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Forget the entries so far.
    pub fn clear(&self) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }
}

/// An emulated event: set once, waited for by the other queue.
#[derive(Default)]
struct Flag {
    set: Mutex<bool>,
    wake: Condvar,
}

impl Flag {
    fn set(&self) {
        *self.set.lock().unwrap_or_else(|p| p.into_inner()) = true;
        self.wake.notify_all();
    }

    fn wait(&self, timeout: Duration) -> Result<()> {
        let g = self.set.lock().unwrap_or_else(|p| p.into_inner());
        let (g, _) = self
            .wake
            .wait_timeout_while(g, timeout, |s| !*s)
            .unwrap_or_else(|p| p.into_inner());
        if *g {
            Ok(())
        } else {
            Err(Error::Distributed(format!(
                "an emulated queue event was not reached within {timeout:?}"
            )))
        }
    }
}

/// [`BucketQueues`] of one rank of the in-process group over emulated devices (see
/// the module docs): every step is logged to the group's [`QueueLog`]; an optional
/// delay before each all-reduce makes a missing wait visible in the results.
pub struct EmuQueues {
    rank: usize,
    log: QueueLog,
    delay: Mutex<Duration>,
    timeout: Duration,
}

impl EmuQueues {
    /// The queues of `rank`, logging to `log`; an event not reached within `timeout`
    /// is an error.
    pub fn new(rank: usize, log: QueueLog, timeout: Duration) -> EmuQueues {
        EmuQueues {
            rank,
            log,
            delay: Mutex::new(Duration::ZERO),
            timeout,
        }
    }

    /// The log the steps go to.
    pub fn log(&self) -> QueueLog {
        self.log.clone()
    }

    /// Hold each all-reduce back by `d` (a slow network): if the compute side did
    /// not wait for the done event, it would read unreduced gradients.
    pub fn set_delay(&self, d: Duration) {
        *self.delay.lock().unwrap_or_else(|p| p.into_inner()) = d;
    }

    fn flag(e: &QueueEvent) -> Result<Arc<Flag>> {
        e.get::<Arc<Flag>>()
            .cloned()
            .ok_or_else(|| Error::Distributed("an event from another kind of queue".into()))
    }
}

impl BucketQueues for EmuQueues {
    fn record_ready(&self, bucket: usize, _buf: &Tensor) -> Result<QueueEvent> {
        // The emulated device ran the concatenation when it was queued: the event is
        // reached as soon as it is recorded.
        let f = Arc::new(Flag::default());
        self.log.push(
            self.rank,
            Queue::Compute,
            Some(bucket),
            QueueStep::ReadyRecorded,
        );
        f.set();
        Ok(QueueEvent::new(f))
    }

    fn reduce_after(
        &self,
        comm: &dyn Collective,
        bucket: usize,
        ready: QueueEvent,
        buf: Tensor,
    ) -> Result<(Tensor, QueueEvent)> {
        let b = Some(bucket);
        Self::flag(&ready)?.wait(self.timeout)?;
        self.log
            .push(self.rank, Queue::Comm, b, QueueStep::ReadyWaited);
        self.log
            .push(self.rank, Queue::Comm, b, QueueStep::ReduceStart);
        let delay = *self.delay.lock().unwrap_or_else(|p| p.into_inner());
        if !delay.is_zero() {
            std::thread::sleep(delay);
        }
        let out = comm.all_reduce_tensor(&buf, ReduceOp::Avg)?;
        self.log
            .push(self.rank, Queue::Comm, b, QueueStep::ReduceEnd);
        let done = Arc::new(Flag::default());
        done.set();
        self.log
            .push(self.rank, Queue::Comm, b, QueueStep::DoneRecorded);
        Ok((out, QueueEvent::new(done)))
    }

    fn compute_wait(&self, bucket: usize, done: QueueEvent) -> Result<()> {
        Self::flag(&done)?.wait(self.timeout)?;
        self.log.push(
            self.rank,
            Queue::Compute,
            Some(bucket),
            QueueStep::DoneWaited,
        );
        Ok(())
    }
}
