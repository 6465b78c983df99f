//! The precision policy: which dtype each layer of the model computes and writes.
//!
//! In [`Precision::Bf16`] the conv and linear layers of the backbone, FPN, RPN head
//! and box head run on the tensor-core kernels (bf16 operands, f32 accumulation,
//! fused epilogue) and pass bf16 activations to each other; the layers whose outputs
//! feed box coding, proposal scores, softmax and the losses (the RPN's objectness and
//! delta convs, the box predictor) write f32 ([`LayerOut::Head`]). Everything after
//! them (anchors, box coding, proposal selection and NMS, RoIAlign, softmax, losses)
//! runs in f32. Parameters stay f32 (the masters the optimizer updates, the tensors
//! checkpoints hold); the layers read bf16 copies made once per weight version
//! ([`Bf16Weights`]). Gradients are f32. No loss scaling: bf16 keeps f32's 8-bit
//! exponent, so gradients that f32 represents do not underflow.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::ops::mixed::Bf16Weight;
use crate::tensor::{DType, Tensor, TensorId};

/// The dtype the model's conv and linear layers compute in.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// Everything in f32 (the reference).
    #[default]
    F32,
    /// Conv and linear layers in bf16 with f32 accumulation; see the module doc.
    Bf16,
}

/// What a layer's output feeds, which decides its dtype under the policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayerOut {
    /// Another layer of the network (bf16 under [`Precision::Bf16`]).
    Activation,
    /// Box coding, scores, softmax or a loss: always f32.
    Head,
}

impl Precision {
    /// Whether conv and linear layers run on the bf16 tensor-core path.
    pub fn is_bf16(self) -> bool {
        self == Precision::Bf16
    }

    /// The dtype of a layer's output: the one place the policy is decided.
    pub fn out_dtype(self, out: LayerOut) -> DType {
        match (self, out) {
            (Precision::Bf16, LayerOut::Activation) => DType::BF16,
            _ => DType::F32,
        }
    }

    /// The name used in configs and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
        }
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Precision {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "f32" => Ok(Precision::F32),
            "bf16" => Ok(Precision::Bf16),
            other => Err(Error::invalid(
                "precision",
                format!("{other:?} is not a precision (expected \"f32\" or \"bf16\")"),
            )),
        }
    }
}

/// bf16 copies of the f32 master weights, by parameter name, each valid for the
/// master tensor it was made from. The optimizer replaces a master each step (a new
/// [`TensorId`]), so a copy is refreshed at most once per step however often the
/// layer runs (the RPN head runs once per pyramid level); frozen weights are copied
/// once. [`Bf16Weights::refreshes`] counts the copies made.
#[derive(Default)]
pub struct Bf16Weights {
    map: Mutex<HashMap<String, (TensorId, Arc<Bf16Weight>)>>,
    refreshes: AtomicUsize,
}

impl Clone for Bf16Weights {
    /// An empty cache: copies are tied to one parameter store.
    fn clone(&self) -> Self {
        Bf16Weights::default()
    }
}

impl std::fmt::Debug for Bf16Weights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Bf16Weights({} refreshes)", self.refreshes())
    }
}

impl Bf16Weights {
    /// The bf16 copy of master `w` named `name` (packed for the forward kernel when
    /// `conv`), made now if `w` is not the tensor the cached copy came from.
    pub fn get(&self, name: &str, w: &Tensor, conv: bool) -> Result<Arc<Bf16Weight>> {
        let mut m = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((id, c)) = m.get(name) {
            if *id == w.id() {
                return Ok(c.clone());
            }
        }
        let c = Arc::new(Bf16Weight::new(w, conv)?);
        self.refreshes.fetch_add(1, Ordering::Relaxed);
        m.insert(name.to_string(), (w.id(), c.clone()));
        Ok(c)
    }

    /// Copies made so far.
    pub fn refreshes(&self) -> usize {
        self.refreshes.load(Ordering::Relaxed)
    }

    /// Copies held.
    pub fn len(&self) -> usize {
        self.map.lock().map(|m| m.len()).unwrap_or(0)
    }

    /// True when no copy is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
