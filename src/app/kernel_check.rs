//! `kestrel kernels` and `kestrel kernel-check`: the kernel-development loop. Lists
//! every kernel entry with its file, code origin and the test binaries that ran it on
//! the emulated device; runs a kernel's parity tests (emulated, and on a real GPU when
//! one is present) and its bench, and prints a short table.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use crate::device::{emu, kernels};

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

/// `emulator-1a2b3c4d5e6f7a8b` -> `emulator`: test binaries carry a hash suffix.
fn program_name(p: &str) -> &str {
    match p.rsplit_once('-') {
        Some((stem, hash)) if hash.len() == 16 && hash.chars().all(|c| c.is_ascii_hexdigit()) => {
            stem
        }
        _ => p,
    }
}

/// `kestrel kernels`: every kernel entry, its file, PTX or NVRTC, and the emulated
/// test binaries that launched it (recorded by the last test run).
pub fn list_kernels() {
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

/// `kestrel kernel-check NAME`: the tests of the kernel file that holds `name` (an
/// entry or a file), then its bench unless `bench` is false. Runs `cargo` in the
/// source tree this crate was built from.
pub fn kernel_check(name: &str, bench: bool) -> crate::Result<()> {
    let file = kernels::files()
        .iter()
        .find(|f| {
            f.entries.contains(&name) || f.file == name || f.file.strip_suffix(".cu") == Some(name)
        })
        .ok_or_else(|| crate::Error::UnknownKernel(name.to_string()))?;
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
        return Err(crate::Error::invalid(
            "kernel-check",
            format!("needs the source tree at {}", root.display()),
        ));
    }
    let gpu = crate::device::gpu::device(0).is_ok();
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
        return Err(crate::Error::invalid(
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
