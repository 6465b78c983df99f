//! The `kestrel` command line: parses arguments and calls the command bodies in
//! [`kestrel::app`].

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use kestrel::app::{bench, commands, kernel_check};
use kestrel::nn::Precision;

#[derive(Parser)]
#[command(
    name = "kestrel",
    version,
    about = "CUDA-kernel-centric Faster R-CNN engine"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

/// Data-parallel flags of `kestrel train` (see README, "Many GPUs").
#[derive(clap::Args, Clone, Debug, Default)]
struct DistFlags {
    /// Start one worker process per local GPU (N of them) and wait for them.
    #[arg(long)]
    gpus: Option<usize>,
    /// With --gpus: number of nodes (each runs the same command).
    #[arg(long, default_value_t = 1)]
    nnodes: usize,
    /// With --gpus: this node's index, 0..nnodes.
    #[arg(long, default_value_t = 0)]
    node_rank: usize,
    /// Ranks in the world (overrides WORLD_SIZE).
    #[arg(long, alias = "WORLD_SIZE")]
    world_size: Option<usize>,
    /// This worker's rank (overrides RANK).
    #[arg(long, alias = "RANK")]
    rank: Option<usize>,
    /// This worker's GPU on its node (overrides LOCAL_RANK).
    #[arg(long, alias = "LOCAL_RANK")]
    local_rank: Option<usize>,
    /// Host of rank 0 (overrides MASTER_ADDR).
    #[arg(long, alias = "MASTER_ADDR")]
    master_addr: Option<String>,
    /// Rendezvous port of rank 0 (overrides MASTER_PORT).
    #[arg(long, alias = "MASTER_PORT")]
    master_port: Option<u16>,
}

/// `kestrel train`: the launcher with --gpus, a worker when a world is given (flags or
/// torchrun/SLURM variables), else a single-process run.
// The train command's flags, one argument each.
#[allow(clippy::too_many_arguments)]
fn train(
    config: &std::path::Path,
    resume: bool,
    overwrite: bool,
    device: Option<&str>,
    precision: Option<Precision>,
    flush_denormals: bool,
    graph: bool,
    f: DistFlags,
) -> kestrel::Result<()> {
    let args = kestrel::app::dist::DistArgs {
        gpus: f.gpus,
        nnodes: f.nnodes,
        node_rank: f.node_rank,
        world_size: f.world_size,
        rank: f.rank,
        local_rank: f.local_rank,
        master_addr: f.master_addr,
        master_port: f.master_port,
    };
    if args.gpus.is_some() {
        let mut fwd = vec!["train".to_string(), config.display().to_string()];
        if resume {
            fwd.push("--resume".into());
        }
        if overwrite {
            fwd.push("--overwrite".into());
        }
        if let Some(d) = device {
            fwd.extend(["--device".to_string(), d.to_string()]);
        }
        if let Some(p) = precision {
            fwd.extend(["--precision".to_string(), p.to_string()]);
        }
        if flush_denormals {
            fwd.push("--flush-denormals".into());
        }
        if graph {
            fwd.push("--graph".into());
        }
        return kestrel::app::dist::launch_local(&args, &fwd);
    }
    match args.rendezvous()? {
        Some(_) if graph => Err(kestrel::Error::invalid(
            "kestrel train --graph",
            "a graphed step cannot reduce gradients across data-parallel ranks: train \
             data-parallel without --graph",
        )),
        Some(rdv) => kestrel::app::dist::train_worker(
            config,
            resume,
            device,
            precision,
            flush_denormals,
            &rdv,
        ),
        None => commands::train(
            config,
            resume,
            overwrite,
            device,
            precision,
            flush_denormals,
            graph,
        ),
    }
}

#[derive(Subcommand)]
enum Cmd {
    /// List every kernel entry point, its file, whether it is nvcc PTX or NVRTC
    /// source, and which test binaries ran it on the emulated device (recorded by the
    /// last test run).
    Kernels,
    /// Say which devices are usable here.
    Devices,
    /// Evaluate COCO results against COCO ground truth (boxes) and print the 12-line
    /// summary in pycocotools' format.
    CocoEval {
        /// Ground truth: a COCO annotation file.
        gt: PathBuf,
        /// Detections: a COCO results file (list of image_id, category_id, bbox, score).
        results: PathBuf,
        /// Also write the 12 numbers, unrounded, as a JSON object to this file.
        #[arg(long)]
        stats_json: Option<PathBuf>,
    },
    /// Write a synthetic shapes dataset (PNG images + COCO annotations.json).
    Shapes {
        /// Output directory (gets annotations.json and images/).
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Number of images.
        #[arg(long, default_value_t = 1000)]
        count: usize,
        /// Image side in pixels.
        #[arg(long, default_value_t = 128)]
        size: usize,
    },
    /// The kernel loop: run a kernel's parity tests on the emulated device (and on a
    /// real GPU when one is present), then its bench, and print a short table. NAME is
    /// an entry (`relu_fwd_f32`) or a kernel file (`elementwise`, `elementwise.cu`).
    /// Runs `cargo` in the source tree this binary was built from.
    KernelCheck {
        name: String,
        /// Skip the bench.
        #[arg(long)]
        no_bench: bool,
    },
    /// Generate shapes, train a small ResNet-FPN Faster R-CNN on them, evaluate it and
    /// draw detections of a few validation images (everything under --out).
    Demo {
        /// Where everything goes.
        #[arg(long, default_value = "kestrel-demo")]
        out: PathBuf,
        /// auto, cpu or cuda:N.
        #[arg(long, default_value = "auto")]
        device: String,
        /// Training iterations (default: the tuned demo schedule).
        #[arg(long)]
        iters: Option<usize>,
        /// f32 or bf16: the dtype of the conv and linear layers.
        #[arg(long, default_value = "f32")]
        precision: Precision,
        /// CPU: flush denormal floats to zero (FTZ/DAZ, as torch.set_flush_denormal).
        #[arg(long)]
        flush_denormals: bool,
    },
    /// Train with a TOML config (see configs/).
    Train {
        config: PathBuf,
        /// Continue from work_dir/latest (or its newest iter_N / epoch_N checkpoint).
        #[arg(long)]
        resume: bool,
        /// Delete an earlier run's checkpoints, config and logs in the work_dir and
        /// start afresh (without it or --resume, a used work_dir is refused).
        #[arg(long, conflicts_with = "resume")]
        overwrite: bool,
        /// auto, cpu or cuda:N (default: the config's runtime.device).
        #[arg(long)]
        device: Option<String>,
        /// f32 or bf16 (default: the config's runtime.precision).
        #[arg(long)]
        precision: Option<Precision>,
        /// CPU: flush denormal floats to zero (FTZ/DAZ, as torch.set_flush_denormal);
        /// default: the config's runtime.flush_denormals.
        #[arg(long)]
        flush_denormals: bool,
        /// Train through captured device graphs (as `[runtime] graph = true`).
        #[arg(long)]
        graph: bool,
        #[command(flatten)]
        dist: DistFlags,
    },
    /// Evaluate a checkpoint on a config's validation set (pycocotools summary).
    Eval {
        config: PathBuf,
        checkpoint: PathBuf,
        /// auto, cpu or cuda:N (default: the config's runtime.device).
        #[arg(long)]
        device: Option<String>,
        /// Also write the COCO results (detections) to this JSON file.
        #[arg(long)]
        results: Option<PathBuf>,
        /// f32 or bf16 (default: the config's runtime.precision).
        #[arg(long)]
        precision: Option<Precision>,
        /// CPU: flush denormal floats to zero (FTZ/DAZ, as torch.set_flush_denormal);
        /// default: the config's runtime.flush_denormals.
        #[arg(long)]
        flush_denormals: bool,
    },
    /// Detect objects in images with a checkpoint; writes boxes as JSON and drawn PNGs.
    Infer {
        checkpoint: PathBuf,
        #[arg(required = true)]
        images: Vec<PathBuf>,
        /// Output directory.
        #[arg(long, default_value = "kestrel-infer")]
        out: PathBuf,
        /// The config the checkpoint was trained with (default: the one saved next to
        /// it, else the demo model).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Draw detections scoring at least this.
        #[arg(long, default_value_t = 0.5)]
        min_score: f32,
        /// auto, cpu or cuda:N.
        #[arg(long, default_value = "auto")]
        device: String,
        /// f32 or bf16: the dtype of the conv and linear layers.
        #[arg(long, default_value = "f32")]
        precision: Precision,
        /// CPU: flush denormal floats to zero (FTZ/DAZ, as torch.set_flush_denormal).
        #[arg(long)]
        flush_denormals: bool,
    },
    /// Time full-size ResNet-50-FPN Faster R-CNN per stage (inference, and with
    /// --train one training step): ms per stage, images/s, peak memory.
    Bench(BenchArgs),
}

/// Options of `kestrel bench`.
#[derive(clap::Args, Debug, Clone)]
struct BenchArgs {
    /// cpu, cuda, cuda:N, emu or auto.
    #[arg(long, default_value = "auto")]
    device: String,
    /// Images per batch; repeat or separate by commas to time several (1,2).
    #[arg(long, value_delimiter = ',', default_value = "1")]
    batch: Vec<usize>,
    /// Image size HxW in pixels (the transform keeps 800x1216 as it is).
    #[arg(long, default_value = "800x1216")]
    size: String,
    /// Timed iterations per configuration (the median is reported).
    #[arg(long, default_value_t = 3)]
    iters: usize,
    /// Untimed warm-up iterations per configuration.
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// Also time one training step (forward, losses, backward, SGD step).
    #[arg(long)]
    train: bool,
    /// Skip inference (with --train: time training only).
    #[arg(long)]
    no_infer: bool,
    /// With --train on a device: also time the graphed training step (transform,
    /// backbone, FPN and RPN head forward and backward replayed as two device graphs).
    #[arg(long)]
    graph: bool,
    /// Seed of the weights, the image and the targets.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Precisions to time side by side: f32, bf16 or f32,bf16.
    #[arg(long, value_delimiter = ',', default_value = "f32")]
    precision: Vec<Precision>,
    /// CPU: also print each ResNet-50-FPN conv shape beside the square GEMM of the
    /// same FLOPs, and one SGD step's time.
    #[arg(long)]
    ops: bool,
    /// r50 (ResNet-50-FPN, torchvision's) or small (the demo's model, 91 classes,
    /// images kept at the larger side of --size: fast enough for the emulated device).
    #[arg(long, default_value = "r50")]
    model: String,
    /// With --device emu: plan mode, device memory and counters without computing
    /// the kernels (exact; times are not kernel times).
    #[arg(long)]
    plan: bool,
    /// CPU: flush denormal floats to zero (FTZ/DAZ, as torch.set_flush_denormal):
    /// avoids the slow microcode path denormal operands take on Intel CPUs.
    #[arg(long)]
    flush_denormals: bool,
    /// With --train: also print the last step's backward time by op (to stderr).
    #[arg(long)]
    op_times: bool,
}

impl From<BenchArgs> for bench::BenchOptions {
    fn from(a: BenchArgs) -> Self {
        bench::BenchOptions {
            device: a.device,
            batch: a.batch,
            size: a.size,
            iters: a.iters,
            warmup: a.warmup,
            train: a.train,
            no_infer: a.no_infer,
            graph: a.graph,
            seed: a.seed,
            json: a.json,
            precision: a.precision,
            ops: a.ops,
            model: a.model,
            plan: a.plan,
            flush_denormals: a.flush_denormals,
            op_times: a.op_times,
        }
    }
}

fn main() {
    let cli = Cli::parse();
    let res = match cli.cmd {
        Cmd::Kernels => {
            kernel_check::list_kernels();
            Ok(())
        }
        Cmd::Devices => commands::devices(),
        Cmd::CocoEval {
            gt,
            results,
            stats_json,
        } => commands::coco_eval(&gt, &results, stats_json.as_deref()),
        Cmd::Shapes {
            out,
            seed,
            count,
            size,
        } => commands::shapes(&out, seed, count, size),
        Cmd::KernelCheck { name, no_bench } => kernel_check::kernel_check(&name, !no_bench),
        Cmd::Demo {
            out,
            device,
            iters,
            precision,
            flush_denormals,
        } => commands::demo(&out, &device, iters, precision, flush_denormals),
        Cmd::Train {
            config,
            resume,
            overwrite,
            device,
            precision,
            flush_denormals,
            graph,
            dist,
        } => train(
            &config,
            resume,
            overwrite,
            device.as_deref(),
            precision,
            flush_denormals,
            graph,
            dist,
        ),
        Cmd::Eval {
            config,
            checkpoint,
            device,
            results,
            precision,
            flush_denormals,
        } => commands::eval(
            &config,
            &checkpoint,
            device.as_deref(),
            results.as_deref(),
            precision,
            flush_denormals,
        ),
        Cmd::Infer {
            checkpoint,
            images,
            out,
            config,
            min_score,
            device,
            precision,
            flush_denormals,
        } => commands::infer(
            &checkpoint,
            &images,
            &out,
            config.as_deref(),
            min_score,
            &device,
            precision,
            flush_denormals,
        ),
        Cmd::Bench(args) => bench::run(&args.into()),
    };
    if let Err(e) = res {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
