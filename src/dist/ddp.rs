//! Turning a [`Runner`] into one rank of a data-parallel group.

use std::sync::{Arc, Mutex};

use serde_json::json;

use super::{set_sync_bn_group, BucketLaunch, Comm, CommStream, GradReducer, DEFAULT_BUCKET_BYTES};
use crate::error::{Error, Result};
use crate::rng::Rng;
use crate::runner::hooks::NanGuardHook;
use crate::runner::{Hook, Model, Priority, Runner};
use crate::tensor::Tensor;

/// Settings of [`distribute_runner`].
#[derive(Clone, Debug)]
pub struct DistOptions {
    /// Gradient bucket capacity in bytes (PyTorch DDP's `bucket_cap_mb`, 25 MiB).
    pub bucket_bytes: usize,
    /// Copy rank 0's parameters and buffers to every rank first, so all ranks start
    /// from the same weights whatever their initialisation (DDP does this).
    pub broadcast_weights: bool,
}

impl Default for DistOptions {
    fn default() -> Self {
        DistOptions {
            bucket_bytes: DEFAULT_BUCKET_BYTES,
            broadcast_weights: true,
        }
    }
}

/// The key of [`Runner::meta`] under which a data-parallel run keeps its world size
/// and every rank's random state (so that a resume continues every rank's stream).
pub const META_KEY: &str = "data_parallel";

/// Make `runner` rank `comm.rank()` of a data-parallel group: gradients are averaged
/// across ranks in buckets during backward ([`GradReducer`]), rank 0's weights are
/// broadcast (with `opts.broadcast_weights`), and only rank 0 writes: the other ranks
/// lose their `CheckpointHook` and `LoggerHook`, their `NanGuardHook` stops without a
/// checkpoint, and they write no `log.txt`. (An `EvalHook` with `save_best` should be
/// registered on rank 0 only.) Call it after
/// registering the hooks and after any resume: a checkpoint saved by a run with
/// another world size is an error (its data position and random streams describe that
/// world), and a resumed rank takes back its own random stream.
///
/// The train loader of each rank must read that rank's shard
/// ([`crate::data::Loader::sharded`]). Returns the record of bucket launches.
pub fn distribute_runner<M: Model + 'static>(
    runner: &mut Runner<M>,
    comm: Comm,
    opts: &DistOptions,
) -> Result<Arc<Mutex<Vec<BucketLaunch>>>> {
    let (rank, world) = (comm.rank(), comm.world_size());
    if let Some(saved) = runner.meta.get(META_KEY) {
        let saved_world = saved.get("world_size").and_then(|v| v.as_u64());
        if saved_world != Some(world as u64) {
            return Err(Error::Distributed(format!(
                "the checkpoint was saved by a world of {saved_world:?} ranks; this one has \
                 {world} (resume with the same number of ranks)"
            )));
        }
        let state = saved
            .get("rng")
            .and_then(|v| v.get(rank))
            .and_then(|v| v.as_u64())
            .ok_or_else(|| {
                Error::Distributed(format!(
                    "the checkpoint has no random state for rank {rank}"
                ))
            })?;
        runner.rng = Rng::new(state);
        if saved.get("unsynced_grads").and_then(|v| v.as_bool()) == Some(true) && world > 1 {
            return Err(Error::Distributed(
                "the checkpoint was taken in the middle of a gradient accumulation whose \
                 micro-steps are reduced only at the last one (no_sync): it holds rank 0's \
                 unreduced gradients only; resume from a checkpoint at a step boundary \
                 (a checkpoint interval that is a multiple of cumulative_iters)"
                    .into(),
            ));
        }
    }
    if opts.broadcast_weights && world > 1 {
        let params = broadcast_all(&comm, runner.model.params())?;
        runner.model.set_params(params)?;
        let buffers = broadcast_all(&comm, runner.model.buffers())?;
        runner.model.set_buffers(buffers)?;
    }
    if rank != 0 {
        runner.main_process = false;
        runner.log.quiet = true;
        // Without its logger this rank would read its losses back every iteration:
        // keep rank 0's read-out interval (the NaN guard checks at those reads).
        if let Some(n) = runner.hooks_readout_interval() {
            runner.set_readout_interval(n);
        }
        runner.remove_hooks("CheckpointHook");
        runner.remove_hooks("LoggerHook");
        // The NaN guard still stops this rank (and so the world), without writing.
        if runner.remove_hooks("NanGuardHook") > 0 {
            runner.register_hook(NanGuardHook {
                no_checkpoint: true,
            });
        }
    }
    // One communication stream for the gradient buckets and SyncBatchNorm, so both
    // issue their collectives in one order on every rank.
    let stream = CommStream::new(comm.clone());
    let reducer = GradReducer::on_stream(stream.clone(), opts.bucket_bytes);
    let log = reducer.launch_log();
    runner.set_grad_sync(Some(Box::new(reducer)));
    runner.register_hook(DistStateHook { comm, stream });
    Ok(log)
}

fn broadcast_all(comm: &Comm, named: Vec<(String, Tensor)>) -> Result<Vec<Tensor>> {
    named
        .into_iter()
        .map(|(_, t)| {
            if t.dtype() == crate::DType::F32 {
                comm.broadcast_tensor(&t, 0)
            } else {
                Ok(t)
            }
        })
        .collect()
}

/// After each update (before the checkpoint hook): gathers every rank's random state
/// into [`Runner::meta`] so that rank 0's checkpoint resumes the whole world.
struct DistStateHook {
    comm: Comm,
    stream: Arc<CommStream>,
}

impl<M: Model> Hook<M> for DistStateHook {
    fn priority(&self) -> Priority {
        // After the optimizer hook (40), before the checkpoint hook (50).
        Priority(45)
    }

    fn before_run(&mut self, runner: &mut Runner<M>) -> Result<()> {
        // The thread that runs the hooks runs the model: its SyncBatchNorm layers
        // reduce over this group.
        set_sync_bn_group(Some(self.stream.clone()));
        self.record(runner)
    }

    fn after_run(&mut self, _runner: &mut Runner<M>) -> Result<()> {
        set_sync_bn_group(None);
        Ok(())
    }

    fn after_train_iter(&mut self, runner: &mut Runner<M>) -> Result<()> {
        self.record(runner)
    }
}

impl DistStateHook {
    fn record<M: Model>(&self, runner: &mut Runner<M>) -> Result<()> {
        let states = self
            .comm
            .all_gather_bytes(&runner.rng.state().to_le_bytes())?;
        let rng: Vec<u64> = states
            .iter()
            .map(|b| {
                let a: [u8; 8] = b.as_slice().try_into().map_err(|_| {
                    Error::Distributed(format!("a random state of {} bytes", b.len()))
                })?;
                Ok(u64::from_le_bytes(a))
            })
            .collect::<Result<_>>()?;
        runner.meta.insert(
            META_KEY.into(),
            json!({
                "world_size": self.comm.world_size(),
                "rng": rng,
                "unsynced_grads": runner.has_unsynced_grads(),
            }),
        );
        Ok(())
    }
}
