//! The communication "stream": one thread per rank that runs the rank's collectives
//! one after another in the order they were issued.
//!
//! Every collective of a group must be called in the same order on every rank. During
//! backward two users issue collectives from the training thread: the gradient buckets
//! ([`super::GradReducer`]) and SyncBatchNorm's gradient sums
//! ([`super::sync_batch_norm`]). The backward pass issues both in the same order on
//! every rank (the graph is the same), so queueing them on one thread in issue order
//! keeps the sequence identical across ranks, as NCCL does with one communication
//! stream. Calling the communicator directly from the training thread while buckets are
//! in flight would race with the bucket thread and could pair different collectives
//! across ranks.

use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};

use super::{Collective, Comm};
use crate::error::{Error, Result};

type Task = Box<dyn FnOnce(&dyn Collective) + Send>;

/// A rank's communication thread over `comm`: collectives submitted to it run in
/// submission order while the submitting thread goes on.
pub struct CommStream {
    comm: Comm,
    tasks: Mutex<Option<Sender<Task>>>,
}

/// The result of a submitted collective, to be waited for with [`Pending::wait`].
pub struct Pending<R>(Receiver<Result<R>>);

impl<R> Pending<R> {
    /// Block until the collective has run; its result.
    pub fn wait(self) -> Result<R> {
        self.0
            .recv()
            .map_err(|_| Error::Distributed("the communication thread stopped".into()))?
    }
}

impl CommStream {
    /// Start the communication thread of `comm`.
    pub fn new(comm: Comm) -> Arc<CommStream> {
        let (tx, rx) = channel::<Task>();
        let c = comm.clone();
        // Not joined on drop: a task may wait for a rank that is gone until the group's
        // timeout, and the training thread should not wait for it. Closing the channel
        // ends the thread after its current task.
        std::thread::spawn(move || {
            for task in rx {
                task(c.as_ref());
            }
        });
        Arc::new(CommStream {
            comm,
            tasks: Mutex::new(Some(tx)),
        })
    }

    /// This rank.
    pub fn rank(&self) -> usize {
        self.comm.rank()
    }

    /// Number of ranks.
    pub fn world_size(&self) -> usize {
        self.comm.world_size()
    }

    /// The communicator the thread drives.
    pub fn comm(&self) -> &Comm {
        &self.comm
    }

    /// Queue `f` behind every collective submitted before it; returns at once.
    pub fn submit<R, F>(&self, f: F) -> Result<Pending<R>>
    where
        R: Send + 'static,
        F: FnOnce(&dyn Collective) -> Result<R> + Send + 'static,
    {
        let (tx, rx) = channel();
        let task: Task = Box::new(move |c| {
            // The receiver may be gone (its pass was abandoned); nothing to tell then.
            let _ = tx.send(f(c));
        });
        let guard = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
        guard
            .as_ref()
            .ok_or_else(|| Error::Distributed("the communication thread stopped".into()))?
            .send(task)
            .map_err(|_| Error::Distributed("the communication thread stopped".into()))?;
        Ok(Pending(rx))
    }

    /// [`CommStream::submit`] and wait for the result.
    pub fn run<R, F>(&self, f: F) -> Result<R>
    where
        R: Send + 'static,
        F: FnOnce(&dyn Collective) -> Result<R> + Send + 'static,
    {
        self.submit(f)?.wait()
    }
}

impl Drop for CommStream {
    fn drop(&mut self) {
        self.tasks.lock().unwrap_or_else(|p| p.into_inner()).take();
    }
}
