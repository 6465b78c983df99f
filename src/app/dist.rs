//! Data-parallel training from a config: `kestrel train CONFIG --gpus N` (one worker
//! process per local GPU, this process waiting for them), and the worker itself,
//! started by that launcher or by torchrun / srun / mpirun with `WORLD_SIZE`, `RANK`,
//! `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT` (or the flags of the same names).
//!
//! A worker joins the rendezvous over TCP, builds the config's runner on
//! `cuda:LOCAL_RANK` (or the CPU when the config says so), reads its shard of each
//! epoch, averages gradients with NCCL (feature `nccl`, when libnccl is present) or
//! over the TCP links, evaluates its shard of the validation set, and leaves logs,
//! checkpoints and evaluation output to rank 0. A failure on any rank stops every
//! rank with an error naming it.

use std::path::Path;
use std::process::{Child, Command};
use std::sync::Arc;

use super::model::{DetLoader, DetectorModel};
use super::train::{config_datasets, config_runner};
use crate::config::Config;
use crate::data::{Dataset, Loader, LoaderConfig, Shard};
use crate::detection::FasterRcnn;
use crate::dist::{
    default_timeout, distribute_runner, gather_detections, Collective, Comm, DistOptions,
    Rendezvous, TcpComm,
};
use crate::error::{Error, Result};
use crate::eval::{CocoEvaluation, DetBox, GroundTruth};
use crate::runner::hooks::EvalHook;
use crate::runner::{Runner, Schedule};
use crate::Device;

/// The rendezvous flags of `kestrel train` (each overrides the variable of the same
/// name) and `--gpus`.
#[derive(Clone, Debug, Default)]
pub struct DistArgs {
    /// Start this many worker processes, one per local GPU.
    pub gpus: Option<usize>,
    /// With `--gpus`: nodes in the run and this node's index (torchrun's `--nnodes`,
    /// `--node-rank`); world = nnodes x gpus, ranks node_rank x gpus + local rank.
    pub nnodes: usize,
    /// This node's index among `nnodes` (with `--gpus`).
    pub node_rank: usize,
    /// `WORLD_SIZE`: processes in the run (a worker's flag or environment).
    pub world_size: Option<usize>,
    /// `RANK`: this process's global rank.
    pub rank: Option<usize>,
    /// `LOCAL_RANK`: this process's rank on its node (its GPU index).
    pub local_rank: Option<usize>,
    /// `MASTER_ADDR`: where rank 0 listens for the rendezvous.
    pub master_addr: Option<String>,
    /// `MASTER_PORT`: the rendezvous port.
    pub master_port: Option<u16>,
}

impl DistArgs {
    /// The rendezvous of a worker: the flags over the environment; `None` when
    /// neither names a world size (a single-process run).
    pub fn rendezvous(&self) -> Result<Option<Rendezvous>> {
        let env = Rendezvous::from_env()?;
        let world_size = match self.world_size.or(env.as_ref().map(|r| r.world_size)) {
            Some(w) => w,
            None => return Ok(None),
        };
        let rank = self
            .rank
            .or(env.as_ref().map(|r| r.rank))
            .ok_or_else(|| Error::invalid("rendezvous", "a world size but no RANK"))?;
        let r = Rendezvous {
            world_size,
            rank,
            local_rank: self
                .local_rank
                .or(env.as_ref().map(|r| r.local_rank))
                .unwrap_or(rank),
            master_addr: self
                .master_addr
                .clone()
                .or(env.as_ref().map(|r| r.master_addr.clone()))
                .unwrap_or_else(|| "127.0.0.1".into()),
            master_port: self
                .master_port
                .or(env.as_ref().map(|r| r.master_port))
                .unwrap_or(29500),
        };
        r.validate()?;
        Ok(Some(r))
    }
}

/// `kestrel train CONFIG --gpus N`: start N workers of this executable with the same
/// arguments (minus `--gpus`) and the rendezvous variables set, wait for all of them,
/// and fail naming the ranks that failed.
pub fn launch_local(args: &DistArgs, forwarded: &[String]) -> Result<()> {
    let n = args.gpus.unwrap_or(1);
    if n == 0 || args.nnodes == 0 || args.node_rank >= args.nnodes {
        return Err(Error::invalid(
            "--gpus",
            format!("{n} GPUs on node {} of {}", args.node_rank, args.nnodes),
        ));
    }
    let exe = std::env::current_exe().map_err(|source| Error::Io {
        path: "current executable".into(),
        source,
    })?;
    let world = n * args.nnodes;
    let port = args
        .master_port
        .or_else(|| std::env::var("MASTER_PORT").ok()?.parse().ok())
        .unwrap_or(29500);
    let addr = args
        .master_addr
        .clone()
        .or_else(|| std::env::var("MASTER_ADDR").ok())
        .unwrap_or_else(|| "127.0.0.1".into());
    let mut children: Vec<(usize, Child)> = Vec::new();
    for local in 0..n {
        let rdv = Rendezvous {
            world_size: world,
            rank: args.node_rank * n + local,
            local_rank: local,
            master_addr: addr.clone(),
            master_port: port,
        };
        let mut cmd = Command::new(&exe);
        cmd.args(forwarded);
        for (k, v) in rdv.env() {
            cmd.env(k, v);
        }
        let child = cmd.spawn().map_err(|source| Error::Io {
            path: exe.clone(),
            source,
        })?;
        children.push((rdv.rank, child));
    }
    println!(
        "launched ranks {}..{} of a world of {world} (rendezvous {addr}:{port})",
        args.node_rank * n,
        args.node_rank * n + n - 1
    );
    let mut failed = Vec::new();
    for (rank, mut c) in children {
        match c.wait() {
            Ok(s) if s.success() => {}
            Ok(s) => failed.push(format!("rank {rank} ({s})")),
            Err(e) => failed.push(format!("rank {rank} ({e})")),
        }
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(Error::Distributed(format!(
            "workers failed: {}",
            failed.join(", ")
        )))
    }
}

/// The communicator of a worker on `dev`: NCCL on a GPU when built with the `nccl`
/// feature and libnccl loads, else the TCP links (CPU, or a GPU through host copies).
fn communicator(rdv: &Rendezvous, dev: Device) -> Result<Comm> {
    let tcp = TcpComm::connect(rdv, default_timeout())?;
    #[cfg(feature = "nccl")]
    if let Device::Cuda(ordinal) = dev {
        if crate::dist::nccl_available() {
            println!("rank {}: NCCL collective on cuda:{ordinal}", rdv.rank);
            return Ok(Arc::new(crate::dist::NcclComm::new(tcp, ordinal)?));
        }
        eprintln!("warning: libnccl not found: averaging gradients over TCP");
    }
    println!("rank {}: TCP collective, model on {dev:?}", rdv.rank);
    Ok(Arc::new(tcp))
}

/// One worker of `kestrel train`: joins the world `rdv`, trains its shard, and on
/// failure tells the others before returning the error.
pub fn train_worker(
    config: &Path,
    resume: bool,
    device_flag: Option<&str>,
    precision: Option<crate::nn::Precision>,
    flush_denormals: bool,
    rdv: &Rendezvous,
) -> Result<()> {
    let mut cfg = Config::from_file(config)?;
    if let Some(p) = precision {
        cfg.runtime.precision = p;
    }
    cfg.runtime.flush_denormals |= flush_denormals;
    super::commands::flush_denormals_if(cfg.runtime.flush_denormals)?;
    let dev = match Device::parse(device_flag.unwrap_or(&cfg.runtime.device))? {
        // One GPU per local rank.
        Device::Cuda(_) => Device::Cuda(rdv.local_rank),
        d => d,
    };
    let comm = communicator(rdv, dev)?;
    let result = run_worker(&cfg, resume, dev, comm.clone());
    if let Err(e) = &result {
        comm.abort(&e.to_string());
    }
    result
}

fn run_worker(cfg: &Config, resume: bool, dev: Device, comm: Comm) -> Result<()> {
    let rank = comm.rank();
    // Rank 0 prepares what is shared on disk (generated datasets, config.toml) before
    // the others look at it.
    let built = if rank == 0 {
        Some(config_runner(cfg, dev)?)
    } else {
        None
    };
    comm.barrier()?;
    let mut runner = match built {
        Some(b) => b,
        None => config_runner(cfg, dev)?,
    };
    let (train, val) = config_datasets(cfg)?;
    // `data.batch_size` counts the images of one iteration on all ranks together.
    let world = comm.world_size();
    if cfg.data.batch_size % world != 0 {
        return Err(Error::Config {
            origin: "data.batch_size".into(),
            msg: format!(
                "{} images per iteration do not split over {world} ranks",
                cfg.data.batch_size
            ),
        });
    }
    let per_rank = cfg.data.batch_size / world;
    runner.set_train_loader(Box::new(DetLoader::new(
        train_loader(cfg, per_rank, train)?.sharded(Shard::new(rank, world)?)?,
    )));
    if runner.remove_hooks("EvalHook") > 0 {
        let by_epoch = matches!(cfg.schedule.max, Schedule::Epochs(_));
        let c = comm.clone();
        let gt = val.ground_truth();
        let bs = per_rank;
        let cats = val.clone();
        let params = cfg.eval.params();
        let mut hook = EvalHook::new(
            move |r: &mut Runner<DetectorModel>| {
                let ev = evaluate_sharded(
                    c.as_ref(),
                    &r.model.model,
                    val.as_ref(),
                    &gt,
                    bs,
                    r.model.device,
                    &|l| cats.category_id(l),
                    &params,
                )?;
                r.log.line(&format!(
                    "Evaluating bbox on {} images ({} ranks):\n{}",
                    val.len(),
                    c.world_size(),
                    ev.summary().trim_end()
                ));
                Ok(super::metrics(&ev))
            },
            cfg.runtime.eval_interval,
            by_epoch,
        );
        if let (0, Some(m)) = (rank, &cfg.runtime.save_best) {
            hook = hook.save_best(m);
        }
        runner.register_hook(hook);
    }
    if resume || cfg.runtime.resume {
        runner.resume_latest()?;
    }
    distribute_runner(&mut runner, comm.clone(), &DistOptions::default())?;
    runner.run(&cfg.runtime.workflow)?;
    // Nobody leaves before everyone is done (rank 0 may still be writing).
    comm.barrier()
}

fn train_loader(cfg: &Config, batch_size: usize, set: Arc<dyn Dataset>) -> Result<Loader> {
    Loader::new(
        set,
        LoaderConfig {
            batch_size,
            shuffle: cfg.data.shuffle,
            seed: cfg.runtime.seed,
            drop_last: true,
            hflip_prob: cfg.data.hflip_prob,
            workers: cfg.data.num_workers,
            prefetch: 2 * cfg.data.num_workers.max(1),
        },
    )
}

/// COCO evaluation of `model` on `dataset`, sharded over the ranks of `comm`: rank
/// `r` detects images `r, r + W, ...` in batches of `batch_size`, the detections are
/// gathered in dataset order and every rank evaluates them (the same numbers on every
/// rank). Equal to [`super::evaluate_model`] on one device whenever an image's
/// detections do not depend on which images share its batch (batch size 1, or images
/// of one size).
#[allow(clippy::too_many_arguments)] // evaluate_model's arguments plus the group
pub fn evaluate_sharded(
    comm: &dyn Collective,
    model: &FasterRcnn,
    dataset: &dyn Dataset,
    gt: &GroundTruth,
    batch_size: usize,
    device: Device,
    category_id: &dyn Fn(i64) -> Option<i64>,
    params: &crate::eval::EvalParams,
) -> Result<CocoEvaluation> {
    // DistributedSampler's stride without its padding: padded copies would be
    // detected twice for nothing.
    let mine: Vec<usize> = (comm.rank()..dataset.len())
        .step_by(comm.world_size())
        .collect();
    let local: Vec<(usize, Vec<DetBox>)> =
        super::eval::detect_samples(model, dataset, &mine, batch_size, device, category_id)?
            .into_iter()
            .map(|(i, _, _, coco)| (i, coco))
            .collect();
    let gathered = gather_detections(comm, &local)?;
    let dets: Vec<DetBox> = gathered.into_iter().flat_map(|(_, d)| d).collect();
    crate::eval::evaluate_with(gt, &dets, params)
}
