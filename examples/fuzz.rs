//! The long fuzzing run (issue 15, part 5): every parser of user files (COCO
//! annotations and results, TOML configs, safetensors, PNG/JPEG images) on seeded
//! mutations of valid files, round robin, until the time is up. Prints the cases run
//! and accepted per target and every panic with the seed and case that reproduce it;
//! exits 1 if there was any.
//!
//! ```sh
//! cargo run --release --example fuzz -- --minutes 10            # the documented run
//! cargo run --release --example fuzz -- --target toml --seed 3 --cases 5000
//! ```

#[path = "../tests/common/fuzz.rs"]
mod fuzz;

use std::time::{Duration, Instant};

struct Args {
    minutes: f64,
    seed: u64,
    cases: Option<u64>,
    target: Option<String>,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        minutes: 10.0,
        seed: 1,
        cases: None,
        target: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--minutes" => a.minutes = value()?.parse().map_err(|e| format!("--minutes: {e}"))?,
            "--seed" => a.seed = value()?.parse().map_err(|e| format!("--seed: {e}"))?,
            "--cases" => a.cases = Some(value()?.parse().map_err(|e| format!("--cases: {e}"))?),
            "--target" => a.target = Some(value()?),
            "-h" | "--help" => {
                return Err(
                    "usage: fuzz [--minutes M] [--seed S] [--cases N] [--target \
                            coco|results|toml|safetensors|image]"
                        .into(),
                )
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if !(a.minutes.is_finite() && a.minutes > 0.0) {
        return Err(format!("--minutes {}: a positive number", a.minutes));
    }
    Ok(a)
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    let targets: Vec<fuzz::Target> = fuzz::targets()
        .into_iter()
        .filter(|t| args.target.as_deref().is_none_or(|n| n == t.name))
        .collect();
    if targets.is_empty() {
        eprintln!("no target named {:?}", args.target);
        std::process::exit(2);
    }
    let deadline = Duration::from_secs_f64(args.minutes * 60.0);
    let start = Instant::now();
    const CHUNK: u64 = 250;
    let mut totals: Vec<fuzz::Report> = vec![fuzz::Report::default(); targets.len()];
    let mut next = vec![0u64; targets.len()];
    println!(
        "fuzzing {} target(s), seed {}, {} ...",
        targets.len(),
        args.seed,
        match args.cases {
            Some(n) => format!("{n} cases each"),
            None => format!("{} minutes", args.minutes),
        }
    );
    loop {
        let mut ran = false;
        for (k, t) in targets.iter().enumerate() {
            let left = start.elapsed() < deadline;
            let end = match args.cases {
                Some(n) => (next[k] + CHUNK).min(n),
                None => next[k] + CHUNK,
            };
            if !left || end <= next[k] {
                continue;
            }
            let r = fuzz::run_range(t, args.seed, next[k]..end, Some(deadline - start.elapsed()));
            next[k] += r.cases;
            for f in &r.findings {
                println!("{f}");
            }
            totals[k].cases += r.cases;
            totals[k].accepted += r.accepted;
            totals[k].findings.extend(r.findings);
            ran = ran || r.cases > 0;
        }
        if !ran {
            break;
        }
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "\n{:<12} {:>10} {:>10} {:>8}",
        "target", "cases", "accepted", "panics"
    );
    for (t, r) in targets.iter().zip(&totals) {
        println!(
            "{:<12} {:>10} {:>10} {:>8}",
            t.name,
            r.cases,
            r.accepted,
            r.findings.len()
        );
    }
    let panics: usize = totals.iter().map(|r| r.findings.len()).sum();
    let cases: u64 = totals.iter().map(|r| r.cases).sum();
    println!("{cases} cases in {secs:.0} s, {panics} panics (an abort would have ended the run)");
    if panics > 0 {
        std::process::exit(1);
    }
}
