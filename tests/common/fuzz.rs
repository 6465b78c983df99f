//! A mutation fuzzer for the parsers of user files, on stable Rust: seeded mutations
//! of valid files (bit flips, truncations, splices, inserted and deleted runs, numeric
//! edge values in text), each parse run under `catch_unwind`. A panic is a finding:
//! it is reported with the target, the seed and case that reproduce it and the input
//! (also written under `target/fuzz-findings/`).
//!
//! Shared by `tests/fuzz.rs` (a short run in `cargo test`) and `examples/fuzz.rs`
//! (long runs: `cargo run --release --example fuzz -- --minutes 10`).
#![allow(dead_code)]

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use kestrel::config::Config;
use kestrel::data::coco::{CocoDataset, CocoJson, CocoOptions};
use kestrel::data::image_io::{decode_dims, decode_rgb, save_png};
use kestrel::eval::{evaluate, load_results, GroundTruth};
use kestrel::io::{save_safetensors, TensorFile};
use kestrel::runner::read_checkpoint_meta;
use kestrel::Tensor;

/// The call under test: parse the input, use what it gives; returns whether the input
/// was accepted (parsed without error).
pub type Parse = Box<dyn Fn(&[u8]) -> bool>;

/// One parser under test: valid seed inputs and the call that must not panic.
pub struct Target {
    pub name: &'static str,
    pub seeds: Vec<Vec<u8>>,
    /// Text formats also get numeric edge values spliced in.
    pub text: bool,
    pub run: Parse,
}

/// A panic found: where, how to reproduce, what.
#[derive(Clone, Debug)]
pub struct Finding {
    pub target: &'static str,
    pub seed: u64,
    pub case: u64,
    pub message: String,
    pub input: Vec<u8>,
    pub saved: Option<PathBuf>,
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let shown = &self.input[..self.input.len().min(600)];
        write!(
            f,
            "PANIC in {} (seed {}, case {}): {}\n  reproduce: cargo run --release --example \
             fuzz -- --target {} --seed {} --cases {}\n  input ({} bytes{}): {:?}",
            self.target,
            self.seed,
            self.case,
            self.message,
            self.target,
            self.seed,
            self.case + 1,
            self.input.len(),
            self.saved
                .as_ref()
                .map_or(String::new(), |p| format!(", saved to {}", p.display())),
            String::from_utf8_lossy(shown)
        )
    }
}

/// What a run did.
#[derive(Clone, Debug, Default)]
pub struct Report {
    pub cases: u64,
    /// Inputs the parser accepted (the rest were refused with an error).
    pub accepted: u64,
    pub findings: Vec<Finding>,
}

/// Numeric edge values spliced into text formats in place of a number.
const EDGE_NUMBERS: &[&str] = &[
    "0",
    "-0",
    "-1",
    "1e309",
    "-1e309",
    "1e-320",
    "NaN",
    "nan",
    "inf",
    "-inf",
    "4294967296",
    "18446744073709551615",
    "18446744073709551616",
    "9223372036854775807",
    "-9223372036854775808",
    "-9223372036854775809",
    "2147483648",
    "100000",
    "1000000000",
    "0.0000001",
    "1.5",
    "\"x\"",
    "[]",
    "{}",
    "null",
    "true",
];

/// A mutated copy of `input` (with `other` as a source of splices).
pub fn mutate(rng: &mut StdRng, input: &[u8], other: &[u8], text: bool) -> Vec<u8> {
    let mut v = input.to_vec();
    let rounds = 1 + rng.random_range(0..4);
    for _ in 0..rounds {
        let kinds = if text { 9 } else { 8 };
        match rng.random_range(0..kinds) {
            // Flip one bit.
            0 if !v.is_empty() => {
                let i = rng.random_range(0..v.len());
                v[i] ^= 1 << rng.random_range(0..8);
            }
            // Set a byte to an interesting value.
            1 if !v.is_empty() => {
                let i = rng.random_range(0..v.len());
                v[i] = [0u8, 0xff, 0x7f, 0x80, b'{', b'"', b'[', b'\n'][rng.random_range(0..8)];
            }
            // Truncate.
            2 if !v.is_empty() => {
                let n = rng.random_range(0..v.len());
                v.truncate(n);
            }
            // Delete a run.
            3 if !v.is_empty() => {
                let i = rng.random_range(0..v.len());
                let n = rng.random_range(1..=(v.len() - i).min(64));
                v.drain(i..i + n);
            }
            // Splice: a run of the other input over a run of this one.
            4 if !v.is_empty() && !other.is_empty() => {
                let i = rng.random_range(0..v.len());
                let j = rng.random_range(0..other.len());
                let n = rng.random_range(1..=(other.len() - j).min(256));
                let end = (i + n).min(v.len());
                v.splice(i..end, other[j..j + n].iter().copied());
            }
            // Duplicate a run (grows nesting and repeated keys).
            5 if !v.is_empty() => {
                let i = rng.random_range(0..v.len());
                let n = rng.random_range(1..=(v.len() - i).min(128));
                let run: Vec<u8> = v[i..i + n].to_vec();
                v.splice(i..i, run);
            }
            // Insert random bytes.
            6 => {
                let i = rng.random_range(0..=v.len());
                let n = rng.random_range(1..16);
                let bytes: Vec<u8> = (0..n).map(|_| rng.random()).collect();
                v.splice(i..i, bytes);
            }
            // Overwrite 4 or 8 bytes with an edge integer (binary lengths, offsets).
            7 if v.len() >= 8 => {
                let i = rng.random_range(0..=v.len() - 8);
                let x: u64 = [
                    0,
                    1,
                    u32::MAX as u64,
                    u64::MAX,
                    1 << 31,
                    1 << 63,
                    0x7fff_ffff,
                ][rng.random_range(0..7)];
                let n = if rng.random_bool(0.5) { 4 } else { 8 };
                v[i..i + n].copy_from_slice(&x.to_le_bytes()[..n]);
            }
            // Text: replace a number with an edge value.
            8 => replace_number(rng, &mut v),
            _ => {}
        }
    }
    v
}

/// Replace one run of digits (with sign, point, exponent) by an edge value.
fn replace_number(rng: &mut StdRng, v: &mut Vec<u8>) {
    let starts: Vec<usize> = (0..v.len())
        .filter(|&i| v[i].is_ascii_digit() && (i == 0 || !v[i - 1].is_ascii_alphanumeric()))
        .collect();
    if starts.is_empty() {
        return;
    }
    let mut i = starts[rng.random_range(0..starts.len())];
    if i > 0 && v[i - 1] == b'-' {
        i -= 1;
    }
    let mut j = i + 1;
    while j < v.len() && (v[j].is_ascii_digit() || b".eE+-".contains(&v[j])) {
        j += 1;
    }
    let edge = EDGE_NUMBERS[rng.random_range(0..EDGE_NUMBERS.len())];
    v.splice(i..j, edge.bytes());
}

/// The panic message of a caught panic.
fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "(non-string panic payload)".into()
    }
}

/// Run `target` on mutated seeds: `cases` inputs, or until `time` has passed,
/// whichever comes first. Inputs depend only on (`seed`, case number).
pub fn run(target: &Target, seed: u64, cases: u64, time: Option<Duration>) -> Report {
    run_range(target, seed, 0..cases, time)
}

/// [`run`] over the case numbers `cases` (long runs go on in chunks).
pub fn run_range(
    target: &Target,
    seed: u64,
    cases: std::ops::Range<u64>,
    time: Option<Duration>,
) -> Report {
    let start = Instant::now();
    let mut report = Report::default();
    quiet_panics();
    for case in cases {
        if time.is_some_and(|t| start.elapsed() >= t) {
            break;
        }
        let mut rng = StdRng::seed_from_u64(seed ^ case.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let a = &target.seeds[rng.random_range(0..target.seeds.len())];
        let b = &target.seeds[rng.random_range(0..target.seeds.len())];
        let input = if case == 0 {
            a.clone()
        } else {
            mutate(&mut rng, a, b, target.text)
        };
        report.cases += 1;
        FUZZING.with(|f| f.set(true));
        let outcome = catch_unwind(AssertUnwindSafe(|| (target.run)(&input)));
        FUZZING.with(|f| f.set(false));
        match outcome {
            Ok(accepted) => report.accepted += accepted as u64,
            Err(p) => {
                let at = LAST_PANIC_AT.with(|l| l.borrow().clone());
                let mut f = Finding {
                    target: target.name,
                    seed,
                    case,
                    message: format!("{} at {at}", panic_message(p.as_ref())),
                    input,
                    saved: None,
                };
                f.saved = save_finding(&f);
                report.findings.push(f);
            }
        }
    }
    report
}

thread_local! {
    /// Where the last panic on this thread happened (set by the quiet hook).
    static LAST_PANIC_AT: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
    /// Whether this thread is inside a fuzzed call.
    static FUZZING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Keep panics quiet while fuzzing (each is reported as a finding, with the place it
/// happened, which the hook records per thread). Installed once per process.
fn quiet_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if FUZZING.with(|f| f.get()) {
                let at = info.location().map(|l| l.to_string()).unwrap_or_default();
                LAST_PANIC_AT.with(|l| *l.borrow_mut() = at);
            } else {
                default(info); // a test's own assertion: shown as usual
            }
        }));
    });
}

fn save_finding(f: &Finding) -> Option<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/fuzz-findings");
    std::fs::create_dir_all(&dir).ok()?;
    let p = dir.join(format!("{}-{}-{}.bin", f.target, f.seed, f.case));
    std::fs::write(&p, &f.input).ok()?;
    Some(p)
}

/// Run one input through a target, as `run` does for a finding (to reproduce one).
pub fn run_input(target: &Target, input: &[u8]) -> Result<(), String> {
    quiet_panics();
    FUZZING.with(|f| f.set(true));
    let outcome = catch_unwind(AssertUnwindSafe(|| (target.run)(input)));
    FUZZING.with(|f| f.set(false));
    outcome.map(|_| ()).map_err(|p| panic_message(p.as_ref()))
}

// ---- the targets ------------------------------------------------------------------

/// A scratch directory with three small images for the COCO target.
fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("kestrel-fuzz-{}-{name}", std::process::id()));
    let _ = std::fs::create_dir_all(&d);
    d
}

fn png_bytes(w: u32, h: u32, color: image::ColorType) -> Vec<u8> {
    let n = (w * h) as usize * color.bytes_per_pixel() as usize;
    let data: Vec<u8> = (0..n).map(|i| (i * 37 % 251) as u8).collect();
    let mut out = std::io::Cursor::new(Vec::new());
    image::write_buffer_with_format(&mut out, &data, w, h, color, image::ImageFormat::Png)
        .expect("encode png");
    out.into_inner()
}

fn jpeg_bytes(w: u32, h: u32) -> Vec<u8> {
    let data: Vec<u8> = (0..(w * h * 3) as usize)
        .map(|i| (i * 13 % 256) as u8)
        .collect();
    let mut out = std::io::Cursor::new(Vec::new());
    image::write_buffer_with_format(
        &mut out,
        &data,
        w,
        h,
        image::ColorType::Rgb8,
        image::ImageFormat::Jpeg,
    )
    .expect("encode jpeg");
    out.into_inner()
}

/// COCO annotation files: parsed, validated against three real images (headers
/// read), used as ground truth with a results file, evaluated.
pub fn coco_target() -> Target {
    let dir = scratch("coco");
    let images = dir.join("images");
    std::fs::create_dir_all(images.join("sub")).expect("scratch dir");
    save_png(&images.join("a.png"), &[50u8; 3 * 24 * 32], 24, 32).expect("png");
    save_png(&images.join("sub/b.png"), &[90u8; 3 * 16 * 16], 16, 16).expect("png");
    std::fs::write(images.join("c.jpg"), jpeg_bytes(20, 12)).expect("jpg");
    let seed1 = br#"{"images": [{"id": 1, "file_name": "a.png", "width": 32, "height": 24},
 {"id": 2, "file_name": "sub/b.png", "width": 16, "height": 16},
 {"id": 7, "file_name": "c.jpg"}],
 "annotations": [
 {"id": 1, "image_id": 1, "category_id": 3, "bbox": [1.5, 2.0, 10.0, 8.25], "area": 80.0, "iscrowd": 0},
 {"id": 2, "image_id": 1, "category_id": 5, "bbox": [0, 0, 32, 24], "iscrowd": true},
 {"id": 3, "image_id": 2, "category_id": 3, "bbox": [4, 4, 6, 6]},
 {"id": 4, "image_id": 7, "category_id": 5, "bbox": [2, 1, 5, 9], "segmentation": [[1, 2, 3, 4]]}],
 "categories": [{"id": 3, "name": "cat"}, {"id": 5, "name": "dog", "supercategory": "animal"}],
 "info": {"year": 2017}}"#
        .to_vec();
    let seed2 = br#"{"images":[{"id":1,"file_name":"a.png"}],"annotations":[],"categories":[{"id":1,"name":"x"}]}"#.to_vec();
    let results = dir.join("results.json");
    std::fs::write(
        &results,
        br#"[{"image_id": 1, "category_id": 3, "bbox": [1, 2, 10, 8], "score": 0.9},
            {"image_id": 2, "category_id": 3, "bbox": [4, 4, 6, 6], "score": 0.5},
            {"image_id": 1, "category_id": 5, "bbox": [0, 0, 30, 20], "score": 0.7}]"#,
    )
    .expect("results");
    let json_path = dir.join("annotations.json");
    Target {
        name: "coco",
        seeds: vec![seed1, seed2],
        text: true,
        run: Box::new(move |bytes| {
            let Ok(json) = CocoJson::parse(bytes, &json_path) else {
                return false;
            };
            if let Ok(gt) = GroundTruth::from_json(&json, &json_path) {
                if let Ok(dets) = load_results(&results, &gt) {
                    let _ = evaluate(&gt, &dets);
                }
            }
            for skip in [false, true] {
                let opts = CocoOptions {
                    skip_bad_images: skip,
                    ..CocoOptions::default()
                };
                if let Ok(ds) = CocoDataset::from_json(json.clone(), &json_path, &images, opts) {
                    for i in 0..ds.len() {
                        let _ = ds.target(i);
                        let _ = ds.load(i);
                    }
                    let _ = evaluate(&ds.ground_truth(), &[]);
                    let _ = ds.check_num_classes(3);
                }
            }
            true
        }),
    }
}

/// COCO results files (`kestrel coco-eval`): parsed against fixed ground truth and
/// evaluated.
pub fn results_target() -> Target {
    let dir = scratch("results");
    let gt_json = br#"{"images": [{"id": 1}, {"id": 2}],
 "annotations": [{"id": 1, "image_id": 1, "category_id": 3, "bbox": [1, 2, 10, 8]},
 {"id": 2, "image_id": 2, "category_id": 3, "bbox": [4, 4, 6, 6], "iscrowd": 1}],
 "categories": [{"id": 3}]}"#;
    let gt = GroundTruth::from_json(
        &CocoJson::parse(gt_json, Path::new("gt.json")).expect("gt"),
        Path::new("gt.json"),
    )
    .expect("gt");
    let seed = br#"[{"image_id": 1, "category_id": 3, "bbox": [1, 2, 10, 8], "score": 0.9},
 {"image_id": 2, "category_id": 3, "bbox": [4.5, 4, 6, 6.5], "score": 0.25},
 {"image_id": 1, "category_id": 4, "bbox": [0, 0, 1e3, 1e-3], "score": 1}]"#
        .to_vec();
    // Files named per thread: the test harness may run targets in parallel.
    let path = dir.join(format!("{:?}.json", std::thread::current().id()).replace(['(', ')'], ""));
    Target {
        name: "results",
        seeds: vec![seed],
        text: true,
        run: Box::new(move |bytes| {
            if std::fs::write(&path, bytes).is_err() {
                return false;
            }
            match load_results(&path, &gt) {
                Ok(dets) => {
                    let _ = evaluate(&gt, &dets);
                    true
                }
                Err(_) => false,
            }
        }),
    }
}

/// TOML configs: the shipped ones and the default, every key written out.
pub fn toml_target() -> Target {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs");
    let mut seeds: Vec<Vec<u8>> = std::fs::read_dir(&root)
        .map(|d| {
            d.flatten()
                .filter(|e| e.path().extension().is_some_and(|x| x == "toml"))
                .filter_map(|e| std::fs::read(e.path()).ok())
                .collect()
        })
        .unwrap_or_default();
    seeds.push(
        Config::default()
            .to_toml_string()
            .expect("default config")
            .into_bytes(),
    );
    Target {
        name: "toml",
        seeds,
        text: true,
        run: Box::new(|bytes| {
            let Ok(text) = std::str::from_utf8(bytes) else {
                return false;
            };
            match Config::from_toml_str(text, "fuzz.toml") {
                Ok(c) => {
                    // What train does next with a valid config.
                    let _ = c.to_toml_string();
                    let _ = c.model.validate();
                    let _ = c.lr_updater_hook();
                    let _ = c.checkpoint_hook();
                    true
                }
                Err(_) => false,
            }
        }),
    }
}

/// safetensors files: a checkpoint-like file (f32, f64, i64, metadata) and a plain
/// state_dict; every tensor read as float and as integer, the checkpoint metadata
/// parsed.
pub fn safetensors_target() -> Target {
    let dir = scratch("st");
    let path = dir.join("seed.safetensors");
    let mut seeds = Vec::new();
    let a = Tensor::from_vec(vec![1.0f32, -2.0, 3.5, 0.0, 1e-3, 7.0], [2, 3]).expect("t");
    let b = Tensor::from_vec(vec![0.25f64, 0.5], [2]).expect("t");
    let c = Tensor::from_vec_i64(vec![1, -1, i64::MAX], [3]).expect("t");
    let s = Tensor::from_vec(vec![4.0f32], Vec::<usize>::new()).expect("t");
    let meta = std::collections::HashMap::from([
        (
            "kestrel_checkpoint".to_string(),
            r#"{"format":1,"point":{"epoch":0,"iter":3,"data_epoch":0,"data_position":3},"schedule":{"Iters":10},"rng":5,"lr":0.02,"lr_bits":4580160821035794432,"initial_lr":0.02,"initial_lr_bits":4580160821035794432,"has_optimizer":true,"params":["w"],"buffers":[],"meta":{}}"#.to_string(),
        ),
        ("params".to_string(), r#"{"case0": {"k": 3}}"#.to_string()),
    ]);
    save_safetensors(
        &path,
        &[("w", &a), ("optimizer/w", &b), ("step", &c), ("scalar", &s)],
        Some(meta),
    )
    .expect("seed file");
    seeds.push(std::fs::read(&path).expect("seed"));
    save_safetensors(&path, &[("fc.weight", &a)], None).expect("seed file");
    seeds.push(std::fs::read(&path).expect("seed"));
    Target {
        name: "safetensors",
        seeds,
        text: false,
        run: Box::new(|bytes| {
            let Ok(f) = TensorFile::from_bytes("fuzz.safetensors", bytes.to_vec()) else {
                return false;
            };
            let _ = f.params();
            let _ = read_checkpoint_meta(&f);
            for n in f.names() {
                let _ = f.contains(&n);
                if let Ok(t) = f.tensor(&n) {
                    let _ = f.tensor_shaped(&n, t.shape());
                }
                let _ = f.int_tensor(&n);
            }
            true
        }),
    }
}

/// Images: PNG (RGB, grey, RGBA, 16-bit) and JPEG, header and full decode.
pub fn image_target() -> Target {
    use image::ColorType;
    Target {
        name: "image",
        seeds: vec![
            png_bytes(7, 5, ColorType::Rgb8),
            png_bytes(4, 9, ColorType::L8),
            png_bytes(6, 6, ColorType::Rgba8),
            png_bytes(3, 2, ColorType::Rgb16),
            jpeg_bytes(16, 8),
            jpeg_bytes(9, 13),
        ],
        text: false,
        run: Box::new(|bytes| {
            let name = Path::new("fuzz-image");
            let _ = decode_dims(bytes, name);
            match decode_rgb(bytes, name) {
                Ok(img) => {
                    assert_eq!(img.data.len(), 3 * img.height * img.width);
                    true
                }
                Err(_) => false,
            }
        }),
    }
}

/// Every target.
pub fn targets() -> Vec<Target> {
    vec![
        coco_target(),
        results_target(),
        toml_target(),
        safetensors_target(),
        image_target(),
    ]
}
