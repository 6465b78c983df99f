//! `kestrel train CONFIG --gpus 2` on the CPU: worker processes, the TCP rendezvous,
//! rank-0 writes, sharded evaluation; and workers started the way torchrun starts them
//! (environment variables) where a rank never arrives or is killed mid-run.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kestrel::app::train::small_config;
use kestrel::config::{Config, DatasetKind};
use kestrel::nn::NormKind;
use kestrel::runner::{Mode, Schedule};

fn exe() -> &'static str {
    env!("CARGO_BIN_EXE_kestrel")
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("kestrel-dcli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A tiny shapes config: 48x48 images, 2 images per iteration (1 per rank).
fn write_config(dir: &Path, iters: usize, eval_interval: usize) -> PathBuf {
    let mut c = Config {
        model: small_config(4, 48),
        ..Config::default()
    };
    c.model.backbone.norm = NormKind::Frozen { eps: 1e-5 };
    c.model.rpn.pre_nms_top_n_train = 100;
    c.model.rpn.post_nms_top_n_train = 50;
    c.model.rpn.pre_nms_top_n_test = 100;
    c.model.rpn.post_nms_top_n_test = 50;
    c.model.roi.batch_size_per_image = 16;
    c.data.dataset = DatasetKind::Shapes;
    c.data.shapes.root = dir.join("data");
    c.data.shapes.train_count = 8;
    c.data.shapes.val_count = 5;
    c.data.shapes.image_size = 48;
    c.data.batch_size = 2;
    c.data.num_workers = 0;
    c.schedule.max = Schedule::Iters(iters);
    c.schedule.warmup_iters = 1;
    c.schedule.steps = vec![iters];
    c.runtime.work_dir = dir.join("work");
    c.runtime.device = "cpu".into();
    c.runtime.workflow = vec![(Mode::Train, 1)];
    c.runtime.checkpoint_interval = 2;
    c.runtime.log_interval = 1;
    c.runtime.eval_interval = eval_interval;
    c.runtime.progress_bar = false;
    let p = dir.join("cfg.toml");
    std::fs::write(&p, c.to_toml_string().unwrap()).unwrap();
    p
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn gpus_2_on_cpu_trains_and_rank0_writes_once() {
    let dir = tmp("gpus2");
    let cfg = write_config(&dir, 4, 4);
    let out = Command::new(exe())
        .args([
            "train",
            cfg.to_str().unwrap(),
            "--gpus",
            "2",
            "--device",
            "cpu",
        ])
        .args(["--master-port", &free_port().to_string()])
        .env("KESTREL_DIST_TIMEOUT", "60")
        .output()
        .unwrap();
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    let work = dir.join("work");
    assert_eq!(
        names(&work),
        vec![
            "config.toml",
            "iter_2.safetensors",
            "iter_4.safetensors",
            "latest",
            "log.jsonl",
            "log.txt"
        ],
        "{text}"
    );
    let log = std::fs::read_to_string(work.join("log.txt")).unwrap();
    assert_eq!(log.matches("Start running").count(), 1, "{log}");
    // The sharded evaluation ran once (on 2 ranks) and was logged once.
    assert_eq!(
        log.matches("Evaluating bbox on 5 images (2 ranks)").count(),
        1,
        "{log}"
    );
    let jsonl = std::fs::read_to_string(work.join("log.jsonl")).unwrap();
    assert_eq!(
        jsonl.lines().filter(|l| l.contains("\"train\"")).count(),
        4,
        "{jsonl}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

fn worker(cfg: &Path, world: usize, rank: usize, port: u16, timeout: &str) -> std::process::Child {
    Command::new(exe())
        .args(["train", cfg.to_str().unwrap(), "--device", "cpu"])
        .env("WORLD_SIZE", world.to_string())
        .env("RANK", rank.to_string())
        .env("LOCAL_RANK", rank.to_string())
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", port.to_string())
        .env("KESTREL_DIST_TIMEOUT", timeout)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn stderr_of(c: std::process::Child) -> (bool, String) {
    let o = c.wait_with_output().unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn rank_that_never_arrives_is_named_by_the_others() {
    let dir = tmp("missing");
    let cfg = write_config(&dir, 2, 0);
    let port = free_port();
    let t0 = Instant::now();
    let ws: Vec<_> = (0..2).map(|r| worker(&cfg, 3, r, port, "3")).collect();
    for (r, w) in ws.into_iter().enumerate() {
        let (ok, err) = stderr_of(w);
        assert!(!ok, "rank {r} succeeded without rank 2");
        assert!(
            err.contains("rank 2 did not arrive within 3.0 s"),
            "rank {r}: {err}"
        );
    }
    assert!(t0.elapsed() < Duration::from_secs(30), "{:?}", t0.elapsed());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn killed_rank_stops_rank0_with_its_name_and_complete_checkpoints() {
    let dir = tmp("killed");
    let cfg = write_config(&dir, 10_000, 0);
    let port = free_port();
    let r0 = worker(&cfg, 2, 0, port, "120");
    let mut r1 = worker(&cfg, 2, 1, port, "120");
    // Wait until training is under way (a checkpoint exists), then kill rank 1.
    let work = dir.join("work");
    let t0 = Instant::now();
    while !work.join("iter_2.safetensors").is_file() {
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "training did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    r1.kill().unwrap();
    let killed_at = Instant::now();
    let _ = r1.wait();
    let (ok, err) = stderr_of(r0);
    let took = killed_at.elapsed();
    assert!(!ok);
    assert!(err.contains("rank 1 closed its connection"), "{err}");
    // Stopped by the closed connection, not by the 120 s timeout.
    assert!(
        took < Duration::from_secs(30),
        "rank 0 took {took:?} to stop"
    );
    for n in names(&work) {
        if n.ends_with(".safetensors") {
            let f = kestrel::io::TensorFile::open(work.join(&n)).unwrap();
            kestrel::runner::read_checkpoint_meta(&f).unwrap();
        } else {
            assert!(!n.contains("tmp"), "left behind: {n}");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
