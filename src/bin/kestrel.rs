//! The `kestrel` command line.

use clap::{Parser, Subcommand};
use kestrel::device::kernels;

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

#[derive(Subcommand)]
enum Cmd {
    /// List every kernel entry point, its file, and whether it is nvcc PTX or NVRTC source.
    Kernels,
    /// Say which devices are usable here.
    Devices,
    /// Evaluate COCO results against COCO ground truth (boxes) and print the 12-line
    /// summary in pycocotools' format.
    CocoEval {
        /// Ground truth: a COCO annotation file.
        gt: std::path::PathBuf,
        /// Detections: a COCO results file (list of image_id, category_id, bbox, score).
        results: std::path::PathBuf,
        /// Also write the 12 numbers, unrounded, as a JSON object to this file.
        #[arg(long)]
        stats_json: Option<std::path::PathBuf>,
    },
    /// Write a synthetic shapes dataset (PNG images + COCO annotations.json).
    Shapes {
        /// Output directory (gets annotations.json and images/).
        #[arg(long)]
        out: std::path::PathBuf,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Number of images.
        #[arg(long, default_value_t = 1000)]
        count: usize,
        /// Image side in pixels.
        #[arg(long, default_value_t = 128)]
        size: usize,
    },
}

fn main() {
    let cli = Cli::parse();
    let res = match cli.cmd {
        Cmd::Kernels => {
            println!("{:<32} {:<22} code", "kernel", "file");
            for f in kernels::files() {
                for e in f.entries {
                    println!("{:<32} {:<22} {}", e, f.file, kernels::origin(f));
                }
            }
            Ok(())
        }
        Cmd::Devices => {
            println!("cpu: {} threads", rayon::current_num_threads());
            match kestrel::device::gpu::device(0) {
                Ok(d) => println!("cuda:0: {}", d.backend.name()),
                Err(e) => println!("cuda: {e}"),
            }
            Ok::<(), kestrel::Error>(())
        }
        Cmd::CocoEval {
            gt,
            results,
            stats_json,
        } => coco_eval(&gt, &results, stats_json.as_deref()),
        Cmd::Shapes {
            out,
            seed,
            count,
            size,
        } => shapes(&out, seed, count, size),
    };
    if let Err(e) = res {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

/// `kestrel coco-eval GT RESULTS`.
fn coco_eval(
    gt: &std::path::Path,
    results: &std::path::Path,
    stats_json: Option<&std::path::Path>,
) -> kestrel::Result<()> {
    let gt = kestrel::eval::GroundTruth::from_json_file(gt)?;
    let dets = kestrel::eval::load_results(results, &gt)?;
    let ev = kestrel::eval::evaluate(&gt, &dets)?;
    print!("{}", ev.summary());
    if let Some(path) = stats_json {
        let map: serde_json::Map<String, serde_json::Value> = kestrel::eval::STAT_NAMES
            .iter()
            .zip(ev.stats)
            .map(|(k, v)| (k.to_string(), v.into()))
            .collect();
        let text = serde_json::to_string_pretty(&map).expect("numbers serialise");
        std::fs::write(path, text).map_err(|source| kestrel::Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
    }
    Ok(())
}

/// `kestrel shapes --out DIR --seed S --count N --size PX`.
fn shapes(out: &std::path::Path, seed: u64, count: usize, size: usize) -> kestrel::Result<()> {
    let t = std::time::Instant::now();
    let s = kestrel::data::generate_shapes(out, seed, count, size)?;
    println!(
        "wrote {} images ({} objects) to {} and {} in {:.1} s",
        s.images,
        s.objects,
        s.image_dir.display(),
        s.json_path.display(),
        t.elapsed().as_secs_f64()
    );
    Ok(())
}
