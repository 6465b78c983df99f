//! Saving checkpoints at an interval, keeping the newest few, and the best one by a
//! metric (mmcv's `CheckpointHook` and EvalHook's `save_best`).

use std::path::PathBuf;

use serde_json::{json, Value};

use crate::error::{Error, Result};
use crate::runner::{Hook, Model, Priority, Runner};

/// Saves `epoch_{n}.safetensors` every `interval` epochs (or `iter_{n}.safetensors`
/// every `interval` iterations), `n` 1-based, and at the end of training; points
/// `work_dir/latest` at it; removes the older interval checkpoints beyond
/// `max_keep_ckpts`; records the path in `meta.hook_msgs.last_ckpt`. Priority NORMAL.
#[derive(Clone, Debug)]
pub struct CheckpointHook {
    /// Save every this many epochs (iterations when not `by_epoch`).
    pub interval: usize,
    /// Count epochs (true) or iterations.
    pub by_epoch: bool,
    /// Include optimizer state (needed to resume exactly).
    pub save_optimizer: bool,
    /// Keep at most this many interval checkpoints (None: all).
    pub max_keep_ckpts: Option<usize>,
    /// Also save after the last epoch or iteration when it is off the interval.
    pub save_last: bool,
    /// Directory (default: the runner's work_dir).
    pub out_dir: Option<PathBuf>,
}

impl CheckpointHook {
    /// Every `interval` epochs (`by_epoch`) or iterations, with optimizer state, all
    /// kept, and the last one saved.
    pub fn new(interval: usize, by_epoch: bool) -> Self {
        CheckpointHook {
            interval,
            by_epoch,
            save_optimizer: true,
            max_keep_ckpts: None,
            save_last: true,
            out_dir: None,
        }
    }

    /// Keep the newest `n` only.
    pub fn max_keep(mut self, n: usize) -> Self {
        self.max_keep_ckpts = Some(n);
        self
    }

    fn file_name(&self, step: usize) -> String {
        if self.by_epoch {
            format!("epoch_{step}.safetensors")
        } else {
            format!("iter_{step}.safetensors")
        }
    }

    fn save<M: Model>(&self, runner: &mut Runner<M>) -> Result<()> {
        // Losses on a GPU are read only on logging iterations: read the pending ones
        // first, so a step that went NaN is never saved as a good checkpoint.
        runner.verify_finite()?;
        let dir = self
            .out_dir
            .clone()
            .unwrap_or_else(|| runner.work_dir.clone());
        std::fs::create_dir_all(&dir).map_err(|source| Error::Io {
            path: dir.clone(),
            source,
        })?;
        let step = if self.by_epoch {
            runner.epoch() + 1
        } else {
            runner.iter() + 1
        };
        let path = dir.join(self.file_name(step));
        set_hook_msg(runner, "last_ckpt", json!(path.to_string_lossy()));
        // Order matters for crash safety: the checkpoint is complete on disk before
        // `latest` names it, and older ones go only after that.
        runner.save_checkpoint(&path, self.save_optimizer)?;
        if dir == runner.work_dir {
            runner.update_latest(&path)?;
        }
        if let Some(keep) = self.max_keep_ckpts {
            self.remove_old(&dir, step, keep);
        }
        Ok(())
    }

    /// mmcv's rule: walk back from `step - keep * interval` by `interval`, removing
    /// files until one is missing.
    fn remove_old(&self, dir: &std::path::Path, step: usize, keep: usize) {
        let interval = self.interval.max(1);
        let mut s = step as i64 - (keep * interval) as i64;
        while s > 0 {
            let p = dir.join(self.file_name(s as usize));
            if !p.is_file() || std::fs::remove_file(&p).is_err() {
                break;
            }
            s -= interval as i64;
        }
    }
}

impl<M: Model> Hook<M> for CheckpointHook {
    fn priority(&self) -> Priority {
        Priority::NORMAL
    }

    fn before_run(&mut self, _runner: &mut Runner<M>) -> Result<()> {
        if self.interval == 0 {
            return Err(Error::invalid(
                "CheckpointHook",
                "interval must be positive",
            ));
        }
        Ok(())
    }

    fn after_train_epoch(&mut self, runner: &mut Runner<M>) -> Result<()> {
        if !self.by_epoch || !runner.by_epoch() {
            return Ok(());
        }
        if runner.every_n_epochs(self.interval) || (self.save_last && runner.is_last_epoch()) {
            self.save(runner)?;
        }
        Ok(())
    }

    fn after_train_iter(&mut self, runner: &mut Runner<M>) -> Result<()> {
        if self.by_epoch {
            return Ok(());
        }
        if runner.every_n_iters(self.interval) || (self.save_last && runner.is_last_iter()) {
            self.save(runner)?;
        }
        Ok(())
    }
}

/// Set `meta.hook_msgs.<key>` (mmcv keeps last/best checkpoint and best score there).
pub fn set_hook_msg<M: Model>(runner: &mut Runner<M>, key: &str, value: Value) {
    let msgs = runner
        .meta
        .entry("hook_msgs")
        .or_insert_with(|| Value::Object(Default::default()));
    if !msgs.is_object() {
        *msgs = Value::Object(Default::default());
    }
    if let Value::Object(m) = msgs {
        m.insert(key.to_string(), value);
    }
}

/// `meta.hook_msgs.<key>`.
pub fn hook_msg<'a, M: Model>(runner: &'a Runner<M>, key: &str) -> Option<&'a Value> {
    runner.meta.get("hook_msgs")?.get(key)
}

/// Whether a larger or a smaller value of a metric is better.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rule {
    /// A larger value is better (AP, AR, accuracy).
    Greater,
    /// A smaller value is better (losses).
    Less,
}

impl Rule {
    /// mmcv's inference from the metric's name: `Less` for losses, `Greater` for the
    /// rest (AP, AR, accuracy).
    pub fn infer(metric: &str) -> Rule {
        if metric.to_ascii_lowercase().contains("loss") {
            Rule::Less
        } else {
            Rule::Greater
        }
    }

    fn better(self, a: f64, b: f64) -> bool {
        match self {
            Rule::Greater => a > b,
            Rule::Less => a < b,
        }
    }
}

/// If `score` of `metric` beats `meta.hook_msgs.best_score`, save
/// `best_{metric}_{epoch|iter}_{n}.safetensors` (weights and counters, no optimizer),
/// remove the previous best file and record both in `meta.hook_msgs`. Returns whether
/// it saved.
pub fn save_best<M: Model>(
    runner: &mut Runner<M>,
    metric: &str,
    rule: Rule,
    score: f64,
    by_epoch: bool,
) -> Result<bool> {
    if !score.is_finite() {
        return Ok(false);
    }
    let best = hook_msg(runner, "best_score").and_then(Value::as_f64);
    if best.is_some_and(|b| !rule.better(score, b)) {
        return Ok(false);
    }
    runner.verify_finite()?;
    let previous = hook_msg(runner, "best_ckpt")
        .and_then(Value::as_str)
        .map(PathBuf::from);
    let (unit, n) = if by_epoch {
        ("epoch", runner.epoch() + 1)
    } else {
        ("iter", runner.iter() + 1)
    };
    let safe: String = metric
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    let path = runner.work_path(format!("best_{safe}_{unit}_{n}.safetensors"));
    set_hook_msg(runner, "best_score", json!(score));
    set_hook_msg(runner, "best_ckpt", json!(path.to_string_lossy()));
    runner.save_checkpoint(&path, false)?;
    if let Some(prev) = previous.filter(|p| *p != path) {
        let _ = std::fs::remove_file(prev);
    }
    runner.log.line(&format!(
        "Best {metric} is {score:.4} at {unit} {n}; saved {}",
        path.display()
    ));
    Ok(true)
}
