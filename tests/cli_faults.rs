//! Bad input and faults through the `kestrel` binary (issue 15, part 4): a used
//! work_dir, two runs at once, num_classes against the dataset, size limits, bad
//! config values, `--min-score NaN`, `infer` with clashing names and a bad image.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use kestrel::app::train::small_config;
use kestrel::config::{Config, DatasetKind};
use kestrel::data::image_io::save_png;
use kestrel::runner::{Mode, Schedule};

fn tmp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("kestrel-cli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn kestrel(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kestrel"))
        .args(args)
        .output()
        .expect("the kestrel binary runs")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A failure: exit code 1 (an error, not a panic's 101 or an abort's 134) whose
/// output contains every one of `needles`.
fn assert_refused(what: &str, o: &Output, needles: &[&str]) {
    let t = text(o);
    assert_eq!(o.status.code(), Some(1), "{what}: {t}");
    assert!(!t.contains("panicked"), "{what}: {t}");
    for n in needles {
        assert!(t.contains(n), "{what}: no {n:?} in {t}");
    }
}

/// A config that trains the demo's small model on 8 shapes of 64 pixels (3
/// categories) for `iters` iterations on the CPU, writing into `dir/work`.
fn tiny_config(dir: &Path, iters: usize, edit: impl FnOnce(&mut Config)) -> PathBuf {
    let mut c = Config {
        model: small_config(4, 64),
        ..Config::default()
    };
    c.data.dataset = DatasetKind::Shapes;
    c.data.shapes.root = dir.join("shapes");
    c.data.shapes.train_count = 8;
    c.data.shapes.val_count = 4;
    c.data.shapes.image_size = 64;
    c.data.batch_size = 2;
    c.data.num_workers = 0;
    c.schedule.max = Schedule::Iters(iters);
    c.schedule.warmup_iters = 1;
    c.runtime.work_dir = dir.join("work");
    c.runtime.device = "cpu".into();
    c.runtime.workflow = vec![(Mode::Train, 1)];
    c.runtime.checkpoint_interval = 1;
    c.runtime.log_interval = 1;
    c.runtime.eval_interval = 0;
    c.runtime.progress_bar = false;
    edit(&mut c);
    std::fs::create_dir_all(dir).unwrap();
    let p = dir.join("config.toml");
    std::fs::write(&p, c.to_toml_string().unwrap()).unwrap();
    p
}

/// A checkpoint of a 2-iteration run, trained once per test binary.
fn trained_checkpoint() -> &'static Path {
    static CKPT: OnceLock<PathBuf> = OnceLock::new();
    CKPT.get_or_init(|| {
        let dir = tmp_dir("trained");
        let cfg = tiny_config(&dir, 2, |_| {});
        let o = kestrel(&["train", cfg.to_str().unwrap()]);
        assert!(o.status.success(), "{}", text(&o));
        dir.join("work/iter_2.safetensors")
    })
}

#[test]
fn a_fresh_train_over_a_used_work_dir_needs_resume_or_overwrite() {
    let dir = tmp_dir("used");
    let cfg = tiny_config(&dir, 2, |_| {});
    let cfg = cfg.to_str().unwrap();
    let o = kestrel(&["train", cfg]);
    assert!(o.status.success(), "{}", text(&o));
    let work = dir.join("work");
    let latest = std::fs::read_to_string(work.join("latest")).unwrap();
    let config_before = std::fs::read_to_string(work.join("config.toml")).unwrap();

    // Again without a flag: refused, nothing touched.
    let o = kestrel(&["train", cfg]);
    assert_refused("fresh over used", &o, &["--resume", "--overwrite"]);
    assert_eq!(
        std::fs::read_to_string(work.join("latest")).unwrap(),
        latest
    );
    assert_eq!(
        std::fs::read_to_string(work.join("config.toml")).unwrap(),
        config_before
    );
    assert!(
        !work.join(".lock").exists(),
        "the refusal released the lock"
    );

    // --resume continues to a longer schedule.
    let cfg4 = tiny_config(&dir.join("c4"), 4, |c| {
        c.runtime.work_dir = dir.join("work");
        c.data.shapes.root = dir.join("shapes");
    });
    let o = kestrel(&["train", cfg4.to_str().unwrap(), "--resume"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("resuming from"), "{}", text(&o));
    assert!(work.join("iter_4.safetensors").is_file());

    // --overwrite starts afresh: the old checkpoints are gone.
    let o = kestrel(&["train", cfg, "--overwrite"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(!work.join("iter_4.safetensors").exists());
    assert!(work.join("iter_2.safetensors").is_file());
    assert_eq!(
        std::fs::read_to_string(work.join("latest")).unwrap().trim(),
        "iter_2.safetensors"
    );
}

#[test]
fn two_trains_into_one_work_dir_the_second_is_refused() {
    let dir = tmp_dir("two");
    let cfg = tiny_config(&dir, 400, |_| {});
    // Generate the shapes first, so the first run reaches training quickly.
    let pre = tiny_config(&dir.join("pre"), 1, |c| {
        c.data.shapes.root = dir.join("shapes")
    });
    assert!(kestrel(&["train", pre.to_str().unwrap()]).status.success());
    let mut first = Command::new(env!("CARGO_BIN_EXE_kestrel"))
        .args(["train", cfg.to_str().unwrap()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let lock = dir.join("work/.lock");
    let t = std::time::Instant::now();
    while !lock.exists() {
        assert!(t.elapsed().as_secs() < 120, "the first run never locked");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let o = kestrel(&["train", cfg.to_str().unwrap(), "--resume"]);
    let _ = first.kill();
    let _ = first.wait();
    assert_refused("second run", &o, &["in use", &first.id().to_string()]);
    // The first run was killed (kill -9 leaves its lock): a resume takes it over.
    assert!(lock.exists());
    let short = tiny_config(&dir.join("short"), 1, |c| {
        c.runtime.work_dir = dir.join("work");
        c.data.shapes.root = dir.join("shapes");
    });
    let o = kestrel(&["train", short.to_str().unwrap(), "--overwrite"]);
    assert!(o.status.success(), "{}", text(&o));
}

#[test]
fn num_classes_below_the_categories_is_refused_at_start_naming_one() {
    let dir = tmp_dir("num-classes");
    // Shapes have 3 categories: 4 classes with the background; 3 is one short.
    let cfg = tiny_config(&dir, 2, |c| c.model.roi.num_classes = 3);
    let o = kestrel(&["train", cfg.to_str().unwrap()]);
    assert_refused("num_classes 3", &o, &["category id", "num_classes = 4"]);
    assert!(!dir.join("work/iter_1.safetensors").exists());
}

#[test]
fn sizes_beyond_their_limits_are_refused_naming_the_limit() {
    let dir = tmp_dir("limits");
    let out = dir.join("shapes");
    let o = kestrel(&["shapes", "--out", out.to_str().unwrap(), "--size", "100000"]);
    assert_refused("shapes --size", &o, &["4096"]);
    let o = kestrel(&["bench", "--device", "cpu", "--size", "100000x100000"]);
    assert_refused("bench --size", &o, &["4096"]);
    let o = kestrel(&["bench", "--device", "cpu", "--batch", "100000"]);
    assert_refused("bench --batch", &o, &["32"]);
    let cfg = tiny_config(&dir, 2, |c| c.data.num_workers = 100_000);
    let o = kestrel(&["train", cfg.to_str().unwrap()]);
    assert_refused("num_workers", &o, &["data.num_workers", "256"]);
}

#[test]
fn image_std_zeros_are_refused() {
    let dir = tmp_dir("std");
    let cfg = tiny_config(&dir, 2, |c| c.model.transform.std = [0.0; 3]);
    let o = kestrel(&["train", cfg.to_str().unwrap()]);
    assert_refused("image_std", &o, &["model.transform.image_std"]);
}

#[test]
fn infer_refuses_a_nan_min_score() {
    let ckpt = trained_checkpoint();
    let dir = tmp_dir("nan");
    let img = dir.join("x.png");
    save_png(&img, &[100u8; 3 * 64 * 64], 64, 64).unwrap();
    let o = kestrel(&[
        "infer",
        ckpt.to_str().unwrap(),
        img.to_str().unwrap(),
        "--out",
        dir.join("out").to_str().unwrap(),
        "--min-score",
        "NaN",
        "--device",
        "cpu",
    ]);
    assert_refused("NaN", &o, &["--min-score NaN"]);
}

#[test]
fn infer_keeps_same_named_images_apart_and_survives_a_bad_one() {
    let ckpt = trained_checkpoint();
    let dir = tmp_dir("infer");
    let (a, b) = (dir.join("a/x.png"), dir.join("b/x.png"));
    for (p, v) in [(&a, 30u8), (&b, 200u8)] {
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        save_png(p, &[v; 3 * 64 * 48], 64, 48).unwrap();
    }
    let bad = dir.join("bad.png");
    std::fs::write(&bad, b"not an image").unwrap();
    let out = dir.join("out");
    let o = kestrel(&[
        "infer",
        ckpt.to_str().unwrap(),
        a.to_str().unwrap(),
        bad.to_str().unwrap(),
        b.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--device",
        "cpu",
    ]);
    // The bad image makes the command fail, naming it, after the others are done.
    assert_refused("bad image", &o, &["1 of 3 images failed", "bad.png"]);
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("detections.json")).unwrap())
            .unwrap();
    let entries = json.as_array().unwrap();
    assert_eq!(entries.len(), 3);
    let drawn: Vec<&str> = [0, 2]
        .iter()
        .map(|&i| entries[i]["drawn"].as_str().unwrap())
        .collect();
    assert_ne!(drawn[0], drawn[1], "two inputs named x.png, two drawings");
    for (d, flat) in drawn.iter().zip([30u8, 200u8]) {
        // Each drawing is of its own image: most pixels keep that image's flat value
        // (boxes drawn over it change a few).
        let img = kestrel::data::image_io::load_rgb(Path::new(d)).unwrap();
        // Small images are drawn enlarged by a whole factor.
        let k = kestrel::detection::draw::draw_scale(64, 48);
        assert_eq!((img.height, img.width), (64 * k, 48 * k));
        let same = img.data.iter().filter(|&&v| v == flat).count();
        assert!(
            same * 2 > img.data.len(),
            "{d}: {same} of {} pixels are {flat}",
            img.data.len()
        );
    }
    assert!(entries[1]["error"].as_str().unwrap().contains("bad.png"));
    assert_eq!(entries[0]["image"], a.display().to_string());
    assert_eq!(entries[2]["image"], b.display().to_string());
}
