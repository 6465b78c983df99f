//! A [`Runner`] of the fixture model (batch 2, u8 pixels) whose device counters are
//! taken per training iteration: a hook at the highest priority opens a counter
//! scope before every other hook of the iteration, one at the lowest reads it after
//! all of them (and then, when asked, the step's values as bits: after the counters,
//! so the reading is not counted).

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use kestrel::app::model::DetBatch;
use kestrel::device::gpu::{CounterScope, Counters};
use kestrel::runner::{DataLoader, Hook, Model, Priority, Runner};
use kestrel::Device;

/// The fixture's training batch as the loader gives it: u8 pixels and targets.
pub fn fixture_batch() -> DetBatch {
    let (pixels, targets) = super::fixture_training_pixels();
    batch_of(pixels, targets)
}

/// A batch of `pixels` with `targets` (image ids 0..).
pub fn batch_of(pixels: Vec<super::Pixels>, targets: Vec<kestrel::detection::Target>) -> DetBatch {
    let n = pixels.len();
    DetBatch {
        images: Vec::new(),
        pixels,
        targets,
        image_ids: (0..n as i64).collect(),
    }
}

/// `batches` in turn, `len` per epoch (resumable: batch `k` of any epoch is
/// `batches[k % batches.len()]`).
pub struct Cycle {
    /// The batches.
    pub batches: Vec<DetBatch>,
    /// Batches per epoch.
    pub len: usize,
    at: usize,
}

impl Cycle {
    /// Over `batches`, `len` per epoch.
    pub fn new(batches: Vec<DetBatch>, len: usize) -> Cycle {
        Cycle {
            batches,
            len,
            at: 0,
        }
    }
}

impl DataLoader for Cycle {
    type Batch = DetBatch;
    fn len(&self) -> usize {
        self.len
    }
    fn start(&mut self, _epoch: u64, position: usize) -> kestrel::Result<()> {
        self.at = position;
        Ok(())
    }
    fn next_batch(&mut self) -> Option<kestrel::Result<DetBatch>> {
        (self.at < self.len).then(|| {
            let b = self.batches[self.at % self.batches.len()].clone();
            self.at += 1;
            Ok(b)
        })
    }
}

/// One training iteration as the counting hooks saw it.
#[derive(Clone, Debug)]
pub struct Iteration {
    /// The device's counters over the whole iteration, every hook included.
    pub counters: Counters,
    /// `runner.outputs.log_vars` after all hooks (empty when nothing was read).
    pub log_vars: Vec<(String, f64)>,
    /// The step's values (`StepOutputs::values`, the total `loss` last) as f32
    /// bits, read after the counters; empty unless asked for.
    pub value_bits: Vec<(String, u32)>,
}

/// What the counting hooks record, in iteration order.
pub type IterationLog = Arc<Mutex<Vec<Iteration>>>;

struct Open {
    device: Device,
    scope: Arc<Mutex<Option<CounterScope>>>,
}

impl<M: Model> Hook<M> for Open {
    fn before_train_iter(&mut self, _r: &mut Runner<M>) -> kestrel::Result<()> {
        *self.scope.lock().unwrap() = Some(self.device.counters());
        Ok(())
    }
}

struct Close {
    scope: Arc<Mutex<Option<CounterScope>>>,
    log: IterationLog,
    values: bool,
}

impl<M: Model> Hook<M> for Close {
    fn after_train_iter(&mut self, r: &mut Runner<M>) -> kestrel::Result<()> {
        let counters = self.scope.lock().unwrap().take().unwrap().delta();
        let out = r.outputs.as_ref();
        let log_vars = out.map(|o| o.log_vars.clone()).unwrap_or_default();
        let mut value_bits = Vec::new();
        if self.values {
            for (n, t) in out.map(|o| o.values.as_slice()).unwrap_or_default() {
                value_bits.push((n.clone(), (t.item()? as f32).to_bits()));
            }
        }
        self.log.lock().unwrap().push(Iteration {
            counters,
            log_vars,
            value_bits,
        });
        Ok(())
    }
}

/// Register the counting hooks on `r` (counters of `device`); with `values`, each
/// iteration's values are read as bits after its counters.
pub fn count_iterations<M: Model + 'static>(
    r: &mut Runner<M>,
    device: Device,
    values: bool,
) -> IterationLog {
    let scope = Arc::new(Mutex::new(None));
    let log: IterationLog = Arc::new(Mutex::new(Vec::new()));
    r.register_hook_with_priority(
        Open {
            device,
            scope: scope.clone(),
        },
        Priority::HIGHEST,
    );
    r.register_hook_with_priority(
        Close {
            scope,
            log: log.clone(),
            values,
        },
        Priority::LOWEST,
    );
    log
}

/// The iterations recorded so far (the log emptied).
pub fn take(log: &IterationLog) -> Vec<Iteration> {
    std::mem::take(&mut *log.lock().unwrap())
}

/// A fresh directory under the system's temp dir for `test` (removed first).
pub fn tmp_dir(test: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("kestrel_{test}_{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}
