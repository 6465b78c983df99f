//! Checkpoints: everything a run needs to continue bit for bit, in one safetensors
//! file written atomically.
//!
//! Tensors: the model's parameters and buffers under their own names (so a checkpoint
//! is also a state_dict), `optimizer/<name>` for the optimizer's state, `grad/<param>`
//! for gradients accumulated but not yet applied, `extra/<name>` for
//! [`Runner::extra_tensors`] (EMA weights). Metadata `kestrel_checkpoint`: JSON with
//! the counters, the data position, the RNG state, the learning rates (as f64 bits,
//! so they round-trip exactly) and [`Runner::meta`].
//!
//! The `latest` file in the work_dir names the newest regular checkpoint; it is
//! replaced atomically after the checkpoint itself is in place, so it never names a
//! file that is missing or half written.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{Model, ResumePoint, Runner, Schedule};
use crate::error::{Error, Result};
use crate::io::{save_safetensors, write_atomic, TensorFile};
use crate::rng::Rng;
use crate::tensor::{DType, Tensor};

/// Metadata key of a Kestrel checkpoint.
pub const CHECKPOINT_KEY: &str = "kestrel_checkpoint";
/// Name of the pointer file in the work_dir.
pub const LATEST: &str = "latest";

const OPTIM: &str = "optimizer/";
const GRAD: &str = "grad/";
const EXTRA: &str = "extra/";

/// The metadata of a checkpoint.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CheckpointMeta {
    /// Format version (1).
    pub format: u32,
    /// Where a resumed run starts.
    pub point: ResumePoint,
    /// The schedule of the run that saved it.
    pub schedule: Schedule,
    /// RNG state (SplitMix64).
    pub rng: u64,
    /// Learning rate at save time, and its f64 bits (exact).
    pub lr: f64,
    /// The bits of `lr` (`f64::to_bits`), restored exactly.
    pub lr_bits: u64,
    /// Base learning rate of the schedule, and its bits.
    pub initial_lr: f64,
    /// The bits of `initial_lr` (`f64::to_bits`), restored exactly.
    pub initial_lr_bits: u64,
    /// Whether optimizer state (and pending gradients) are in the file.
    pub has_optimizer: bool,
    /// Parameter and buffer names, in model order.
    pub params: Vec<String>,
    /// Buffer names (non-trained tensors, e.g. frozen batch-norm statistics), in model order.
    pub buffers: Vec<String>,
    /// [`Runner::meta`].
    pub meta: serde_json::Map<String, serde_json::Value>,
}

/// Read the metadata of a checkpoint file.
pub fn read_checkpoint_meta(f: &TensorFile) -> Result<CheckpointMeta> {
    let bad = |msg: String| Error::Safetensors {
        path: f.path().to_path_buf(),
        msg,
    };
    let s = f.metadata().get(CHECKPOINT_KEY).ok_or_else(|| {
        bad(format!(
            "not a Kestrel checkpoint (no `{CHECKPOINT_KEY}` metadata)"
        ))
    })?;
    let m: CheckpointMeta = serde_json::from_str(s)
        .map_err(|e| bad(format!("bad `{CHECKPOINT_KEY}` metadata: {e}")))?;
    if m.format != 1 {
        return Err(bad(format!(
            "checkpoint format {} (this build reads 1)",
            m.format
        )));
    }
    Ok(m)
}

impl<M: Model> Runner<M> {
    /// Save a checkpoint to `path` (atomically) that resumes at
    /// [`Runner::resume_point`]. Without `save_optimizer` it holds the weights, the
    /// extra tensors and the counters only.
    pub fn save_checkpoint(&self, path: impl AsRef<Path>, save_optimizer: bool) -> Result<()> {
        self.save_checkpoint_at(path, save_optimizer, self.resume_point())
    }

    /// Save a checkpoint that resumes at `point`.
    pub fn save_checkpoint_at(
        &self,
        path: impl AsRef<Path>,
        save_optimizer: bool,
        point: ResumePoint,
    ) -> Result<()> {
        let params = self.model.params();
        let buffers = self.model.buffers();
        let mut tensors: Vec<(String, Tensor)> = Vec::new();
        tensors.extend(params.iter().cloned());
        tensors.extend(buffers.iter().cloned());
        if save_optimizer {
            for (n, t) in self.optimizer.state() {
                tensors.push((format!("{OPTIM}{n}"), t));
            }
            for ((n, _), g) in params.iter().zip(&self.grads) {
                if let Some(g) = g {
                    tensors.push((format!("{GRAD}{n}"), g.clone()));
                }
            }
        }
        for (n, t) in &self.extra_tensors {
            tensors.push((format!("{EXTRA}{n}"), t.clone()));
        }
        let mut seen = std::collections::HashSet::new();
        if let Some((dup, _)) = tensors.iter().find(|(n, _)| !seen.insert(n.as_str())) {
            return Err(Error::Training(format!(
                "two tensors named `{dup}` in a checkpoint (model parameters, buffers and \
                 optimizer state need distinct names)"
            )));
        }
        let lr = self.optimizer.lr();
        let meta = CheckpointMeta {
            format: 1,
            point,
            schedule: self.schedule(),
            rng: self.rng.state(),
            lr,
            lr_bits: lr.to_bits(),
            initial_lr: self.initial_lr(),
            initial_lr_bits: self.initial_lr().to_bits(),
            has_optimizer: save_optimizer,
            params: params.iter().map(|(n, _)| n.clone()).collect(),
            buffers: buffers.iter().map(|(n, _)| n.clone()).collect(),
            meta: self.meta.clone(),
        };
        let json = serde_json::to_string(&meta).map_err(|e| Error::Training(e.to_string()))?;
        let refs: Vec<(&str, &Tensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
        save_safetensors(
            path,
            &refs,
            Some(HashMap::from([(CHECKPOINT_KEY.to_string(), json)])),
        )
    }

    /// Point `work_dir/latest` at `checkpoint` (a file in the work_dir), atomically.
    pub fn update_latest(&self, checkpoint: &Path) -> Result<()> {
        let name = checkpoint
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| Error::invalid("update_latest", format!("{}", checkpoint.display())))?;
        write_atomic(self.work_path(LATEST), format!("{name}\n").as_bytes())
    }

    /// The checkpoint `work_dir/latest` names, if there is one.
    pub fn latest_checkpoint(&self) -> Result<Option<PathBuf>> {
        latest_checkpoint(&self.work_dir)
    }

    /// Resume from `work_dir/latest` if it exists; returns the checkpoint used.
    pub fn resume_latest(&mut self) -> Result<Option<PathBuf>> {
        match self.latest_checkpoint()? {
            Some(p) => {
                self.resume(&p)?;
                Ok(Some(p))
            }
            None => Ok(None),
        }
    }

    /// Restore weights, optimizer state, pending gradients, extra tensors, counters,
    /// data position, RNG state, learning rates and meta from a checkpoint, so that
    /// [`Runner::run`] continues exactly where the saving run was.
    pub fn resume(&mut self, path: impl AsRef<Path>) -> Result<()> {
        let f = TensorFile::open(path.as_ref())?;
        let m = read_checkpoint_meta(&f)?;
        if std::mem::discriminant(&m.schedule) != std::mem::discriminant(&self.schedule()) {
            return Err(Error::Training(format!(
                "{}: saved by a run with schedule {:?}, this one is {:?}",
                f.path().display(),
                m.schedule,
                self.schedule()
            )));
        }
        self.load_weights_from(&f)?;
        let device = self
            .model
            .params()
            .first()
            .map_or(crate::Device::Cpu, |(_, t)| t.device());
        if m.has_optimizer {
            let state = on_device(prefixed(&f, OPTIM)?, device)?;
            self.optimizer.load_state(state)?;
            let params = self.model.params();
            self.grads = params
                .iter()
                .map(|(n, t)| {
                    let name = format!("{GRAD}{n}");
                    f.contains(&name)
                        .then(|| load_like(&f, &name, t))
                        .transpose()
                })
                .collect::<Result<_>>()?;
        } else {
            self.log.line(&format!(
                "warning: {} has no optimizer state; momentum starts from zero",
                f.path().display()
            ));
            self.grads.clear();
        }
        self.clear_fixed_grads();
        self.extra_tensors = on_device(prefixed(&f, EXTRA)?, device)?
            .into_iter()
            .collect();
        self.rng = Rng::new(m.rng);
        self.optimizer.set_lr(f64::from_bits(m.lr_bits));
        self.set_initial_lr(f64::from_bits(m.initial_lr_bits));
        self.meta = m.meta;
        self.set_resume_point(m.point);
        self.log.line(&format!(
            "resumed from {}: epoch {}, iter {}",
            f.path().display(),
            m.point.epoch,
            m.point.iter
        ));
        self.mark_resume_in_json_log(f.path(), m.point);
        Ok(())
    }

    /// Append `{"mode": "resume", ...}` to `work_dir/log.jsonl` when the run logs
    /// there: the iterations after it repeat numbers already logged before the
    /// interruption, and a reader of the log must know the later lines replace them.
    fn mark_resume_in_json_log(&self, checkpoint: &Path, point: ResumePoint) {
        let path = self.work_path("log.jsonl");
        let line = serde_json::json!({
            "mode": "resume",
            "epoch": point.epoch,
            "iter": point.iter,
            "checkpoint": checkpoint.display().to_string(),
        });
        // Like every log write: a full disk must not stop the run here (the next
        // checkpoint write reports it).
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
        {
            use std::io::Write;
            let _ = writeln!(f, "{line}");
        }
    }

    /// Load only the model's parameters and buffers from a checkpoint or any
    /// safetensors state_dict holding them under their names.
    pub fn load_weights(&mut self, path: impl AsRef<Path>) -> Result<()> {
        let f = TensorFile::open(path.as_ref())?;
        self.load_weights_from(&f)
    }

    fn load_weights_from(&mut self, f: &TensorFile) -> Result<()> {
        let params = self
            .model
            .params()
            .iter()
            .map(|(n, t)| load_like(f, n, t))
            .collect::<Result<Vec<_>>>()?;
        let buffers = self
            .model
            .buffers()
            .iter()
            .map(|(n, t)| load_like(f, n, t))
            .collect::<Result<Vec<_>>>()?;
        self.model.set_params(params)?;
        self.model.set_buffers(buffers)
    }
}

/// The checkpoint `dir/latest` names; without a `latest` (lost, or the run was killed
/// before writing it) the newest `iter_N` / `epoch_N` checkpoint in `dir`
/// ([`newest_numbered_checkpoint`]); `None` when there is neither.
pub fn latest_checkpoint(dir: &Path) -> Result<Option<PathBuf>> {
    let p = dir.join(LATEST);
    match std::fs::read_to_string(&p) {
        Ok(s) => {
            let name = s.trim();
            if name.is_empty() || name.contains('/') || name.contains('\\') {
                return Err(Error::Training(format!(
                    "{}: expected a checkpoint file name, found {s:?}",
                    p.display()
                )));
            }
            Ok(Some(dir.join(name)))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(newest_numbered_checkpoint(dir)),
        Err(source) => Err(Error::Io { path: p, source }),
    }
}

/// The interval checkpoint (`iter_N.safetensors` or `epoch_N.safetensors`) of `dir`
/// with the largest `N`. Checkpoints are written atomically, so the newest one is
/// complete. `best_*` files are not interval checkpoints and are left out.
pub fn newest_numbered_checkpoint(dir: &Path) -> Option<PathBuf> {
    std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_str()?.to_string();
            let stem = name.strip_suffix(".safetensors")?;
            let n = stem
                .strip_prefix("iter_")
                .or_else(|| stem.strip_prefix("epoch_"))?
                .parse::<u64>()
                .ok()?;
            e.path().is_file().then(|| (n, e.path()))
        })
        .max()
        .map(|(_, p)| p)
}

/// Tensor `name` of `f`, checked against and converted to the shape, dtype and device
/// of `like`.
fn load_like(f: &TensorFile, name: &str, like: &Tensor) -> Result<Tensor> {
    let t = if like.dtype() == DType::I64 {
        f.int_tensor(name)?
    } else {
        f.tensor_shaped(name, like.shape())?
            .to_dtype(like.dtype())?
    };
    if t.shape() != like.shape() {
        return Err(Error::Tensor {
            name: name.into(),
            msg: format!(
                "shape {} in {}, the model has {}",
                t.shape(),
                f.path().display(),
                like.shape()
            ),
        });
    }
    t.to_device(like.device())
}

/// Every tensor of `f` whose name starts with `prefix`, with the prefix removed.
fn prefixed(f: &TensorFile, prefix: &str) -> Result<Vec<(String, Tensor)>> {
    f.names()
        .into_iter()
        .filter_map(|n| n.strip_prefix(prefix).map(|s| (s.to_string(), n.clone())))
        .map(|(short, full)| {
            let t = match f.tensor(&full) {
                Ok(t) => t,
                Err(_) => f.int_tensor(&full)?,
            };
            Ok((short, t))
        })
        .collect()
}

/// Move f32 and i64 tensors to `device` (f64 tensors live on the CPU only).
fn on_device(ts: Vec<(String, Tensor)>, device: crate::Device) -> Result<Vec<(String, Tensor)>> {
    ts.into_iter()
        .map(|(n, t)| {
            let t = if t.dtype() == DType::F64 {
                t
            } else {
                t.to_device(device)?
            };
            Ok((n, t))
        })
        .collect()
}
