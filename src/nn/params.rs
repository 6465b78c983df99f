//! Named parameters and buffers, checked against what the model expects.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use crate::device::Device;
use crate::error::{Error, Result};
use crate::io::{save_safetensors, TensorFile};
use crate::rng::Rng;
use crate::tensor::{DType, Shape, Tensor};

/// Whether a tensor is learned or a buffer (running statistics).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParamKind {
    /// Learned by the optimizer (weights, biases).
    Trainable,
    /// Saved and loaded with the model but not learned (e.g. running statistics).
    Buffer,
}

/// How a fresh parameter is initialised (PyTorch's initialisers).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Init {
    /// Every element equal to the value.
    Const(f32),
    /// U(-bound, bound).
    Uniform(f32),
    /// N(0, std²).
    Normal(f32),
}

/// A tensor the model expects: name, shape, kind, initialiser.
#[derive(Clone, Debug)]
pub struct ParamSpec {
    /// Full name, e.g. `backbone.conv1.weight`.
    pub name: String,
    /// Shape the tensor must have.
    pub shape: Shape,
    /// Trainable parameter or buffer.
    pub kind: ParamKind,
    /// Initialiser for training from scratch.
    pub init: Init,
}

impl ParamSpec {
    /// A trainable parameter.
    pub fn param(name: impl Into<String>, shape: impl Into<Shape>, init: Init) -> Self {
        ParamSpec {
            name: name.into(),
            shape: shape.into(),
            kind: ParamKind::Trainable,
            init,
        }
    }
    /// A buffer.
    pub fn buffer(name: impl Into<String>, shape: impl Into<Shape>, init: Init) -> Self {
        ParamSpec {
            name: name.into(),
            shape: shape.into(),
            kind: ParamKind::Buffer,
            init,
        }
    }
}

/// Parameters and buffers by name, in name order.
#[derive(Clone, Default)]
pub struct ParamStore {
    map: BTreeMap<String, (Tensor, ParamKind)>,
    frozen: Vec<String>,
}

impl ParamStore {
    /// Fresh tensors for `specs`, drawn from `seed` (deterministic).
    pub fn init(specs: &[ParamSpec], seed: u64) -> Result<ParamStore> {
        let mut rng = Rng::new(seed);
        let mut map = BTreeMap::new();
        for s in specs {
            let n = s.shape.numel();
            let v: Vec<f32> = match s.init {
                Init::Const(c) => vec![c; n],
                Init::Uniform(b) => (0..n)
                    .map(|_| rng.range(-(b as f64), b as f64) as f32)
                    .collect(),
                Init::Normal(std) => (0..n).map(|_| (rng.normal() * std as f64) as f32).collect(),
            };
            if map
                .insert(
                    s.name.clone(),
                    (Tensor::from_vec(v, s.shape.clone())?, s.kind),
                )
                .is_some()
            {
                return Err(Error::Tensor {
                    name: s.name.clone(),
                    msg: "declared twice by the model".into(),
                });
            }
        }
        Ok(ParamStore {
            map,
            frozen: Vec::new(),
        })
    }

    /// Load `specs` from a safetensors file by name. A missing, unexpected or
    /// mis-shaped tensor is an error naming it (all of them, in one message).
    pub fn load(file: &TensorFile, specs: &[ParamSpec]) -> Result<ParamStore> {
        Self::load_from(file, specs, true)
    }

    /// [`ParamStore::load`] ignoring tensors the model does not have (a training
    /// checkpoint's optimizer state and gradients); missing or mis-shaped ones are
    /// still errors.
    pub fn load_lenient(file: &TensorFile, specs: &[ParamSpec]) -> Result<ParamStore> {
        Self::load_from(file, specs, false)
    }

    fn load_from(file: &TensorFile, specs: &[ParamSpec], strict: bool) -> Result<ParamStore> {
        let mut map = BTreeMap::new();
        let mut problems = Vec::new();
        for s in specs {
            if !file.contains(&s.name) {
                problems.push(format!("missing `{}` (expected shape {})", s.name, s.shape));
                continue;
            }
            match file.tensor(&s.name) {
                Ok(t) if t.shape() == &s.shape => {
                    map.insert(s.name.clone(), (t.to_dtype(DType::F32)?, s.kind));
                }
                Ok(t) => problems.push(format!(
                    "`{}` has shape {}, the model expects {}",
                    s.name,
                    t.shape(),
                    s.shape
                )),
                Err(e) => problems.push(e.to_string()),
            }
        }
        let expected: std::collections::HashSet<&str> =
            specs.iter().map(|s| s.name.as_str()).collect();
        for name in file.names().iter().filter(|_| strict) {
            // torchvision's FrozenBatchNorm2d has no num_batches_tracked; BatchNorm2d does.
            if !expected.contains(name.as_str()) && !name.ends_with("num_batches_tracked") {
                problems.push(format!("unexpected `{name}`"));
            }
        }
        if !problems.is_empty() {
            return Err(Error::Tensor {
                name: file.path().display().to_string(),
                msg: summarize_problems(&problems),
            });
        }
        Ok(ParamStore {
            map,
            frozen: Vec::new(),
        })
    }

    /// The tensor called `name`.
    pub fn get(&self, name: &str) -> Result<&Tensor> {
        self.map
            .get(name)
            .map(|e| &e.0)
            .ok_or_else(|| Error::Tensor {
                name: name.into(),
                msg: "not in the parameter store".into(),
            })
    }

    /// Replace `name` with a tensor of the same shape.
    pub fn set(&mut self, name: &str, t: Tensor) -> Result<()> {
        let e = self.map.get_mut(name).ok_or_else(|| Error::Tensor {
            name: name.into(),
            msg: "not in the parameter store".into(),
        })?;
        if e.0.shape() != t.shape() {
            return Err(Error::Tensor {
                name: name.into(),
                msg: format!(
                    "new value has shape {}, expected {}",
                    t.shape(),
                    e.0.shape()
                ),
            });
        }
        e.0 = t;
        Ok(())
    }

    /// Move the tensor called `name` out, leaving an empty placeholder (shape `[0]`)
    /// until [`ParamStore::put`] gives it back: for updates in place, which need the
    /// only handle on a tensor.
    pub fn take(&mut self, name: &str) -> Result<Tensor> {
        let e = self.map.get_mut(name).ok_or_else(|| Error::Tensor {
            name: name.into(),
            msg: "not in the parameter store".into(),
        })?;
        Ok(std::mem::replace(&mut e.0, Tensor::placeholder()))
    }

    /// Give back a tensor moved out by [`ParamStore::take`] (or replace `name` by a
    /// tensor of its shape, as [`ParamStore::set`]).
    pub fn put(&mut self, name: &str, t: Tensor) -> Result<()> {
        let e = self.map.get_mut(name).ok_or_else(|| Error::Tensor {
            name: name.into(),
            msg: "not in the parameter store".into(),
        })?;
        if e.0.numel() == 0 && e.0.dims() == [0] && t.numel() != 0 {
            e.0 = t;
            return Ok(());
        }
        self.set(name, t)
    }

    /// Mark parameters whose name starts with one of `prefixes` as not trained.
    pub fn freeze(&mut self, prefixes: &[String]) {
        self.frozen.extend(prefixes.iter().cloned());
    }

    /// Names of the trainable (and not frozen) parameters, in name order.
    pub fn trainable_names(&self) -> Vec<String> {
        self.map
            .iter()
            .filter(|(n, (_, k))| {
                *k == ParamKind::Trainable && !self.frozen.iter().any(|p| n.starts_with(p.as_str()))
            })
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// Every (name, tensor), in name order.
    pub fn iter(&self) -> impl Iterator<Item = (&String, &Tensor)> {
        self.map.iter().map(|(n, (t, _))| (n, t))
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Total elements of the trainable parameters.
    pub fn num_trainable(&self) -> usize {
        self.trainable_names()
            .iter()
            .map(|n| self.map[n].0.numel())
            .sum()
    }

    /// The same store with every tensor on `device`.
    pub fn to_device(&self, device: Device) -> Result<ParamStore> {
        let mut map = BTreeMap::new();
        for (n, (t, k)) in &self.map {
            map.insert(n.clone(), (t.to_device(device)?, *k));
        }
        Ok(ParamStore {
            map,
            frozen: self.frozen.clone(),
        })
    }

    /// Save every tensor under its name (atomically), with `metadata`.
    pub fn save(
        &self,
        path: impl AsRef<Path>,
        metadata: Option<HashMap<String, String>>,
    ) -> Result<()> {
        let named: Vec<(&str, &Tensor)> =
            self.map.iter().map(|(n, (t, _))| (n.as_str(), t)).collect();
        save_safetensors(path, &named, metadata)
    }
}

/// The first few of `problems` and how many more: a checkpoint of another model can
/// have hundreds, and a 10 KB message hides the point.
fn summarize_problems(problems: &[String]) -> String {
    const SHOWN: usize = 4;
    let mut msg = problems[..problems.len().min(SHOWN)].join("; ");
    if problems.len() > SHOWN {
        msg.push_str(&format!("; and {} more", problems.len() - SHOWN));
    }
    msg
}
