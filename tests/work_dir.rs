//! Work_dir faults (issue 15, part 4): one run per work_dir (a lock), no fresh run
//! over an earlier one without `--resume` or `--overwrite`, temporary files of
//! interrupted checkpoint writes cleaned at start and on error, `--resume` without a
//! `latest` file, and a resume marked in log.jsonl.

use std::path::{Path, PathBuf};

use kestrel::io::write_atomic;
use kestrel::ops;
use kestrel::optim::{Sgd, SgdConfig};
use kestrel::rng::Rng;
use kestrel::runner::hooks::{CheckpointHook, OptimizerHook};
use kestrel::runner::{
    prepare_work_dir, Mode, Model, Runner, Schedule, VecLoader, WorkDirLock, WorkDirPolicy, LATEST,
    LOCK_FILE,
};
use kestrel::{Result, Tensor};

fn tmp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("kestrel-wd-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// loss = sum(w * x): the smallest model a runner trains.
struct Dot {
    w: Tensor,
}

impl Model for Dot {
    type Batch = Vec<Vec<f32>>;
    fn params(&self) -> Vec<(String, Tensor)> {
        vec![("w".into(), self.w.clone())]
    }
    fn set_params(&mut self, p: Vec<Tensor>) -> Result<()> {
        self.w = p[0].clone();
        Ok(())
    }
    fn train_step(&mut self, batch: &Self::Batch, _: &mut Rng) -> Result<Vec<(String, Tensor)>> {
        let x = Tensor::from_vec(batch[0].clone(), [2])?;
        Ok(vec![(
            "loss_dot".into(),
            ops::sum(&ops::mul(&self.w, &x)?)?,
        )])
    }
}

fn runner(dir: &Path, iters: usize) -> Runner<Dot> {
    let sgd = Sgd::new(SgdConfig {
        lr: 0.1,
        momentum: 0.9,
        ..SgdConfig::default()
    })
    .unwrap();
    let model = Dot {
        w: Tensor::from_vec(vec![1.0f32, -1.0], [2]).unwrap(),
    };
    let mut r = Runner::new(model, Box::new(sgd), dir, Schedule::Iters(iters), 3);
    r.log.quiet = true;
    let items: Vec<Vec<f32>> = (0..4).map(|i| vec![i as f32, 1.0]).collect();
    r.set_train_loader(Box::new(VecLoader::new(items, 1, true, 3).unwrap()));
    r.register_training_hooks(
        None,
        OptimizerHook::new(),
        Some(CheckpointHook::new(1, false)),
        Some(1),
    );
    r
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    v.sort();
    v
}

#[test]
fn a_locked_work_dir_refuses_a_second_claim_until_released() {
    let dir = tmp_dir("lock");
    let first = WorkDirLock::acquire(&dir).unwrap();
    let err = WorkDirLock::acquire(&dir).unwrap_err().to_string();
    assert!(
        err.contains("in use") && err.contains(&std::process::id().to_string()),
        "{err}"
    );
    drop(first);
    assert!(!dir.join(LOCK_FILE).exists(), "the lock is removed on drop");
    let again = WorkDirLock::acquire(&dir).unwrap();
    drop(again);
}

#[test]
fn a_lock_left_by_a_dead_process_is_taken_over() {
    let dir = tmp_dir("stale");
    // A process that has exited (and been reaped) holds nothing: kill -9's leftover.
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let pid = child.id();
    child.wait().unwrap();
    std::fs::write(dir.join(LOCK_FILE), format!("{pid}\n")).unwrap();
    let lock = WorkDirLock::acquire(&dir).expect("stale lock taken over");
    let text = std::fs::read_to_string(lock.path()).unwrap();
    assert_eq!(text.trim(), std::process::id().to_string());
    // A lock cut short by a crash while it was being written is stale too.
    drop(lock);
    std::fs::write(dir.join(LOCK_FILE), "").unwrap();
    WorkDirLock::acquire(&dir).expect("empty lock file taken over");
}

#[test]
fn two_runs_into_one_work_dir_are_refused() {
    let dir = tmp_dir("two-runs");
    // Another live run (this process, through a claim of its own) holds the dir.
    let other = WorkDirLock::acquire(&dir).unwrap();
    let mut r = runner(&dir, 2);
    let err = r.run(&[(Mode::Train, 1)]).unwrap_err().to_string();
    assert!(err.contains("in use"), "{err}");
    assert_eq!(r.iter(), 0, "nothing ran");
    assert!(
        !names(&dir).iter().any(|n| n.ends_with(".safetensors")),
        "no checkpoint written: {:?}",
        names(&dir)
    );
    drop(other);
    r.run(&[(Mode::Train, 1)]).unwrap();
    assert_eq!(r.iter(), 2);
    assert!(!dir.join(LOCK_FILE).exists(), "released after the run");
}

#[test]
fn a_fresh_run_over_an_earlier_one_needs_resume_or_overwrite() {
    let dir = tmp_dir("fresh");
    runner(&dir, 2).run(&[(Mode::Train, 1)]).unwrap();
    assert!(dir.join(LATEST).is_file());

    let err = prepare_work_dir(&dir, WorkDirPolicy::Fresh)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("--resume") && err.contains("--overwrite"),
        "{err}"
    );
    assert!(!dir.join(LOCK_FILE).exists(), "a refusal releases the lock");
    assert!(dir.join("iter_2.safetensors").is_file(), "nothing deleted");

    let lock = prepare_work_dir(&dir, WorkDirPolicy::Resume).unwrap();
    assert!(dir.join("iter_2.safetensors").is_file());
    drop(lock);

    std::fs::write(dir.join("notes.md"), "mine").unwrap();
    let lock = prepare_work_dir(&dir, WorkDirPolicy::Overwrite).unwrap();
    assert_eq!(
        names(&dir),
        [LOCK_FILE, "notes.md"],
        "only the run's files go"
    );
    drop(lock);
    prepare_work_dir(&dir, WorkDirPolicy::Fresh).expect("now empty of runs");
}

#[test]
fn temp_files_of_interrupted_writes_are_removed_at_start() {
    let dir = tmp_dir("tmp-start");
    // What kill -9 during a checkpoint write leaves, from two earlier processes.
    for f in [".iter_3.safetensors.tmp-4242", ".latest.tmp-777"] {
        std::fs::write(dir.join(f), b"partial").unwrap();
    }
    // Not temp files of ours: kept.
    for f in [".tmp-notes", "iter_3.safetensors.tmp-x"] {
        std::fs::write(dir.join(f), b"keep").unwrap();
    }
    let mut r = runner(&dir, 1);
    r.run(&[(Mode::Train, 1)]).unwrap();
    let left = names(&dir);
    assert!(
        !left
            .iter()
            .any(|n| n.contains(".tmp-") && n.starts_with(".i") || n.starts_with(".latest")),
        "{left:?}"
    );
    assert!(left.contains(&".tmp-notes".to_string()), "{left:?}");
    assert!(left.contains(&"iter_3.safetensors.tmp-x".to_string()));
    let log = std::fs::read_to_string(dir.join("log.txt")).unwrap();
    assert!(log.contains(".iter_3.safetensors.tmp-4242"), "{log}");
}

#[test]
fn a_failed_atomic_write_leaves_no_temp_file() {
    let dir = tmp_dir("tmp-error");
    // The rename fails: the target is a non-empty directory.
    let target = dir.join("iter_1.safetensors");
    std::fs::create_dir_all(target.join("x")).unwrap();
    for _ in 0..3 {
        assert!(write_atomic(&target, b"weights").is_err());
    }
    assert_eq!(names(&dir), ["iter_1.safetensors"], "no temp file left");
}

#[test]
fn resume_without_latest_uses_the_newest_iter_checkpoint() {
    let dir = tmp_dir("no-latest");
    let mut a = runner(&dir, 3);
    a.run(&[(Mode::Train, 1)]).unwrap();
    let want: Vec<Vec<u32>> = a
        .model
        .params()
        .iter()
        .map(|(_, t)| {
            t.to_vec::<f32>()
                .unwrap()
                .iter()
                .map(|v| v.to_bits())
                .collect()
        })
        .collect();
    std::fs::remove_file(dir.join(LATEST)).unwrap();
    // iter_10 sorts before iter_3 as text: the number decides.
    let mut b = runner(&dir, 3);
    let used = b.resume_latest().unwrap().expect("a checkpoint is found");
    assert_eq!(used, dir.join("iter_3.safetensors"));
    assert_eq!(b.iter(), 3);
    let got: Vec<Vec<u32>> = b
        .model
        .params()
        .iter()
        .map(|(_, t)| {
            t.to_vec::<f32>()
                .unwrap()
                .iter()
                .map(|v| v.to_bits())
                .collect()
        })
        .collect();
    assert_eq!(got, want);
    std::fs::copy(
        dir.join("iter_1.safetensors"),
        dir.join("iter_10.safetensors"),
    )
    .unwrap();
    assert_eq!(
        kestrel::runner::latest_checkpoint(&dir).unwrap(),
        Some(dir.join("iter_10.safetensors"))
    );
}

#[test]
fn log_jsonl_marks_a_resume() {
    let dir = tmp_dir("marker");
    runner(&dir, 2).run(&[(Mode::Train, 1)]).unwrap();
    // Resume from iteration 1 and run to 4: iteration 2 is logged twice.
    let mut r = runner(&dir, 4);
    r.resume(dir.join("iter_1.safetensors")).unwrap();
    r.run(&[(Mode::Train, 1)]).unwrap();
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(dir.join("log.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let modes: Vec<(String, u64)> = lines
        .iter()
        .map(|v| {
            (
                v["mode"].as_str().unwrap().to_string(),
                v["iter"].as_u64().unwrap(),
            )
        })
        .collect();
    let want: Vec<(String, u64)> = [
        ("train", 1),
        ("train", 2),
        ("resume", 1),
        ("train", 2),
        ("train", 3),
        ("train", 4),
    ]
    .iter()
    .map(|(m, i)| (m.to_string(), *i))
    .collect();
    assert_eq!(modes, want);
    let marker = &lines[2];
    assert!(marker["checkpoint"]
        .as_str()
        .unwrap()
        .ends_with("iter_1.safetensors"));
}
