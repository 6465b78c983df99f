//! The `kestrel` command line.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use clap::{Parser, Subcommand};
use kestrel::device::{emu, kernels};

#[path = "cli/app.rs"]
mod app;

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
        out: std::path::PathBuf,
        /// auto, cpu or cuda:N.
        #[arg(long, default_value = "auto")]
        device: String,
        /// Training iterations (default: the tuned demo schedule).
        #[arg(long)]
        iters: Option<usize>,
    },
    /// Train with a TOML config (see configs/).
    Train {
        config: std::path::PathBuf,
        /// Continue from work_dir/latest.
        #[arg(long)]
        resume: bool,
        /// auto, cpu or cuda:N (default: the config's runtime.device).
        #[arg(long)]
        device: Option<String>,
    },
    /// Evaluate a checkpoint on a config's validation set (pycocotools summary).
    Eval {
        config: std::path::PathBuf,
        checkpoint: std::path::PathBuf,
        /// auto, cpu or cuda:N (default: the config's runtime.device).
        #[arg(long)]
        device: Option<String>,
        /// Also write the COCO results (detections) to this JSON file.
        #[arg(long)]
        results: Option<std::path::PathBuf>,
    },
    /// Detect objects in images with a checkpoint; writes boxes as JSON and drawn PNGs.
    Infer {
        checkpoint: std::path::PathBuf,
        #[arg(required = true)]
        images: Vec<std::path::PathBuf>,
        /// Output directory.
        #[arg(long, default_value = "kestrel-infer")]
        out: std::path::PathBuf,
        /// The config the checkpoint was trained with (default: the one saved next to
        /// it, else the demo model).
        #[arg(long)]
        config: Option<std::path::PathBuf>,
        /// Draw detections scoring at least this.
        #[arg(long, default_value_t = 0.5)]
        min_score: f32,
        /// auto, cpu or cuda:N.
        #[arg(long, default_value = "auto")]
        device: String,
    },
}

/// Which tests and bench exercise each kernel file: (file, test target, test name
/// filter, bench target, bench name filter). A file not listed here runs
/// `tests/<stem>.rs` whole and no bench.
const KERNEL_LOOP: &[(&str, &str, &str, &str, &str)] = &[
    (
        "elementwise.cu",
        "emulator",
        "elementwise_and_reduce",
        "ops",
        "relu/",
    ),
    (
        "reduce.cu",
        "emulator",
        "elementwise_and_reduce",
        "ops",
        "sum/",
    ),
    ("emu_selftest.cu", "emulator", "", "", ""),
];

fn main() {
    let cli = Cli::parse();
    let res = match cli.cmd {
        Cmd::Kernels => {
            list_kernels();
            Ok(())
        }
        Cmd::Devices => {
            println!("cpu: {} threads", rayon::current_num_threads());
            match kestrel::device::gpu::device(0) {
                Ok(d) => println!("cuda:0: {}", d.backend.name()),
                Err(e) => println!("cuda: {e}"),
            }
            match emu::gpu_device() {
                Ok(d) => println!("emu: {}", d.backend.name()),
                Err(e) => println!("emu: {e}"),
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
        Cmd::KernelCheck { name, no_bench } => kernel_check(&name, !no_bench),
        Cmd::Demo { out, device, iters } => app::demo(&out, &device, iters),
        Cmd::Train {
            config,
            resume,
            device,
        } => app::train(&config, resume, device.as_deref()),
        Cmd::Eval {
            config,
            checkpoint,
            device,
            results,
        } => app::eval(&config, &checkpoint, device.as_deref(), results.as_deref()),
        Cmd::Infer {
            checkpoint,
            images,
            out,
            config,
            min_score,
            device,
        } => app::infer(
            &checkpoint,
            &images,
            &out,
            config.as_deref(),
            min_score,
            &device,
        ),
    };
    if let Err(e) = res {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

/// `emulator-1a2b3c4d5e6f7a8b` -> `emulator`: test binaries carry a hash suffix.
fn program_name(p: &str) -> &str {
    match p.rsplit_once('-') {
        Some((stem, hash)) if hash.len() == 16 && hash.chars().all(|c| c.is_ascii_hexdigit()) => {
            stem
        }
        _ => p,
    }
}

fn list_kernels() {
    let records = emu::recorded_launches();
    println!(
        "{:<34} {:<22} {:<15} emulated test",
        "kernel", "file", "code"
    );
    for f in kernels::files() {
        for e in f.entries {
            let emulated = match records.get(*e) {
                Some((progs, _)) => {
                    let mut names: Vec<&str> = progs.iter().map(|p| program_name(p)).collect();
                    names.dedup();
                    format!("yes ({})", names.join(", "))
                }
                None => "no".into(),
            };
            println!(
                "{:<34} {:<22} {:<15} {}",
                e,
                f.file,
                kernels::origin(f),
                emulated
            );
        }
    }
    if records.is_empty() {
        println!(
            "(no emulated launches recorded in {}: run `cargo test` first)",
            emu::record_dir().display()
        );
    }
}

/// One row of the kernel-check table.
struct Step {
    what: String,
    result: String,
    secs: f64,
}

fn kernel_check(name: &str, bench: bool) -> kestrel::Result<()> {
    let file = kernels::files()
        .iter()
        .find(|f| {
            f.entries.contains(&name) || f.file == name || f.file.strip_suffix(".cu") == Some(name)
        })
        .ok_or_else(|| kestrel::Error::UnknownKernel(name.to_string()))?;
    let stem = file.file.trim_end_matches(".cu");
    let (test, filter, bench_target, bench_filter) = KERNEL_LOOP
        .iter()
        .find(|r| r.0 == file.file)
        .map(|r| {
            (
                r.1.to_string(),
                r.2.to_string(),
                r.3.to_string(),
                r.4.to_string(),
            )
        })
        .unwrap_or_else(|| {
            (
                stem.to_string(),
                String::new(),
                String::new(),
                String::new(),
            )
        });
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    if !root.join("Cargo.toml").is_file() {
        return Err(kestrel::Error::invalid(
            "kernel-check",
            format!("needs the source tree at {}", root.display()),
        ));
    }
    let gpu = kestrel::device::gpu::device(0).is_ok();
    println!(
        "kernel-check {name}: file {}, tests `{test}` {filter:?}, bench {}",
        file.file,
        if bench_target.is_empty() {
            "none".to_string()
        } else {
            format!("`{bench_target}` {bench_filter:?}")
        }
    );

    let mut steps = Vec::new();
    let mut args: Vec<String> = vec!["test".into(), "--test".into(), test.clone()];
    args.push("--".into());
    if !filter.is_empty() {
        args.push(filter.clone());
    }
    if gpu {
        args.push("--include-ignored".into()); // the real-GPU parity tests too
    }
    let what = if gpu {
        "tests (emulated + cuda:0)"
    } else {
        "tests (emulated; no GPU here)"
    };
    steps.push(run_cargo(root, what, &args, summarize_tests));
    if bench && !bench_target.is_empty() {
        let mut args: Vec<String> = vec![
            "bench".into(),
            "--bench".into(),
            bench_target.clone(),
            "--".into(),
        ];
        if !bench_filter.is_empty() {
            args.push(bench_filter.clone());
        }
        args.extend(["--warm-up-time", "1", "--measurement-time", "2"].map(String::from));
        steps.push(run_cargo(root, "bench", &args, summarize_bench));
    }

    println!("\n{:<32} {:>8}  result", "step", "seconds");
    for s in &steps {
        let mut lines = s.result.lines();
        println!(
            "{:<32} {:>8.1}  {}",
            s.what,
            s.secs,
            lines.next().unwrap_or("")
        );
        for l in lines {
            println!("{:<32} {:>8}  {}", "", "", l);
        }
    }
    if steps.iter().any(|s| s.result.starts_with("FAILED")) {
        return Err(kestrel::Error::invalid(
            "kernel-check",
            format!("{name}: a step failed (output above)"),
        ));
    }
    Ok(())
}

fn run_cargo(root: &Path, what: &str, args: &[String], summarize: fn(&str) -> String) -> Step {
    println!("$ cargo {}", args.join(" "));
    let t = Instant::now();
    let out = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(args)
        .current_dir(root)
        .output();
    let secs = t.elapsed().as_secs_f64();
    let result = match out {
        Err(e) => format!("FAILED: cannot run cargo: {e}"),
        Ok(o) => {
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
            if o.status.success() {
                summarize(&text)
            } else {
                eprintln!("{text}");
                format!("FAILED ({})", o.status)
            }
        }
    };
    Step {
        what: what.to_string(),
        result,
        secs,
    }
}

/// The `test result:` line(s) of libtest's output.
fn summarize_tests(text: &str) -> String {
    let lines: Vec<&str> = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("test result: "))
        .collect();
    if lines.is_empty() {
        "ran no test".into()
    } else {
        lines.join("\n")
    }
}

/// `name  time: [lo mid hi]` lines of criterion's output, as `name: mid`.
fn summarize_bench(text: &str) -> String {
    let mut rows = Vec::new();
    let mut last_name = "";
    for l in text.lines() {
        let t = l.trim();
        if let Some((head, rest)) = t.split_once("time:") {
            let name = if head.trim().is_empty() {
                last_name
            } else {
                head.trim()
            };
            let vals: Vec<&str> = rest
                .trim()
                .trim_matches(['[', ']'])
                .split_whitespace()
                .collect();
            let mid = if vals.len() >= 4 {
                format!("{} {}", vals[2], vals[3])
            } else {
                rest.trim().to_string()
            };
            rows.push(format!("{name}: {mid}"));
        } else if !t.is_empty() && !t.contains(' ') {
            last_name = t; // criterion prints long names on their own line
        }
    }
    if rows.is_empty() {
        "no bench matched".into()
    } else {
        rows.join("\n")
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
