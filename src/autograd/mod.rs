//! A reverse-mode tape.
//!
//! While a [`Tape`] is active on a thread ([`Tape::activate`]), every differentiable op
//! run on that thread whose inputs include a watched tensor (a parameter given to
//! [`Tape::watch`], or the output of an op already recorded) records a backward
//! closure. With no active tape, ops record nothing and cost nothing extra: that is
//! inference. [`Tape::backward`] runs the closures in reverse order and accumulates
//! gradients keyed by [`TensorId`].

mod gradcheck;

pub use gradcheck::{gradcheck, GradcheckReport};

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use crate::error::{Error, Result};
use crate::tensor::{DType, Tensor, TensorId};

/// Backward of one op: given dL/d(output) and which inputs need a gradient, returns
/// dL/d(input) for each input (`None` where not needed).
pub type BackwardFn = Box<dyn FnOnce(&Tensor, &[bool]) -> Result<Vec<Option<Tensor>>> + Send>;

struct Node {
    op: &'static str,
    inputs: Vec<TensorId>,
    output: TensorId,
    backward: BackwardFn,
}

#[derive(Default)]
struct TapeInner {
    nodes: Vec<Node>,
    /// Watched tensors and the outputs of recorded ops.
    tracked: HashSet<TensorId>,
    /// The tensors given to [`Tape::watch`]: the gradients `backward` returns.
    watched: HashSet<TensorId>,
    grad_hook: Option<GradHook>,
}

/// A watched tensor's gradient has become final during [`Tape::backward`]: no op still
/// to be backpropagated uses the tensor. Data-parallel training starts averaging a
/// bucket of gradients across devices as soon as all of its gradients are final.
pub struct GradReady<'a> {
    /// The watched tensor.
    pub id: TensorId,
    /// dL/d(tensor), final.
    pub grad: &'a Tensor,
    /// Backward closures run so far, including the one that completed this gradient.
    pub ops_done: usize,
    /// Backward closures the pass runs in all (recorded ops).
    pub ops_total: usize,
    /// The op whose backward completed it.
    pub op: &'static str,
}

/// Called for each watched tensor when its gradient is final (see [`GradReady`]); an
/// error stops the backward pass and is returned by it.
pub type GradHook = Box<dyn FnMut(GradReady<'_>) -> Result<()> + Send>;

/// Records backward closures of the ops run while it is active.
#[derive(Clone, Default)]
pub struct Tape(Arc<Mutex<TapeInner>>);

thread_local! {
    static ACTIVE: RefCell<Option<Tape>> = const { RefCell::new(None) };
}

/// Deactivates the tape (restoring the previous one) when dropped.
pub struct TapeGuard {
    previous: Option<Tape>,
}

impl Drop for TapeGuard {
    fn drop(&mut self) {
        let prev = self.previous.take();
        ACTIVE.with(|a| *a.borrow_mut() = prev);
    }
}

/// Run `f` with no tape active (used inside backward passes).
pub fn no_grad<R>(f: impl FnOnce() -> R) -> R {
    let previous = ACTIVE.with(|a| a.borrow_mut().take());
    let _guard = TapeGuard { previous };
    f()
}

/// Whether an op run now on this thread could be recorded.
pub fn is_recording() -> bool {
    ACTIVE.with(|a| a.borrow().is_some())
}

static OP_TIMING: AtomicBool = AtomicBool::new(false);
static OP_TIMES: Mutex<Vec<(&'static str, usize, f64)>> = Mutex::new(Vec::new());

/// Turns on (or off) the timing of backward passes by op, for every thread:
/// [`Tape::backward`] then times each op's backward closure (and the accumulation
/// of gradients, as `grad_accumulate`), and [`timed`] the parts ops mark inside.
pub fn set_op_timing(on: bool) {
    OP_TIMING.store(on, Ordering::Relaxed);
}

/// The backward time by op since the last call, as `(op, calls, seconds)` in the
/// order first seen. Parts named `op.part` (e.g. `conv2d.wgrad`) are included in
/// their op's own row.
pub fn take_op_times() -> Vec<(&'static str, usize, f64)> {
    std::mem::take(&mut *OP_TIMES.lock().unwrap_or_else(|p| p.into_inner()))
}

/// Runs `f`, adding its wall time to `name`'s row of [`take_op_times`] while op
/// timing is on ([`set_op_timing`]); otherwise just runs it.
pub fn timed<R>(name: &'static str, f: impl FnOnce() -> R) -> R {
    if !OP_TIMING.load(Ordering::Relaxed) {
        return f();
    }
    let t0 = std::time::Instant::now();
    let r = f();
    let dt = t0.elapsed().as_secs_f64();
    let mut v = OP_TIMES.lock().unwrap_or_else(|p| p.into_inner());
    match v.iter_mut().find(|e| e.0 == name) {
        Some(e) => {
            e.1 += 1;
            e.2 += dt;
        }
        None => v.push((name, 1, dt)),
    }
    r
}

/// Whether an op reading `t` now would be recorded: a tape is active on this thread
/// and `t` is watched or the output of a recorded op. A layer whose inputs and
/// tensors are all untracked (a frozen stage below the first trainable one) records
/// nothing and may run its inference path.
pub fn is_tracked(t: &Tensor) -> bool {
    ACTIVE.with(|a| {
        a.borrow().as_ref().is_some_and(|tape| {
            let inner = tape.0.lock().unwrap_or_else(|p| p.into_inner());
            inner.tracked.contains(&t.id())
        })
    })
}

/// Record `backward` for an op with these inputs and output, if a tape is active
/// and some input is tracked. Ops call this after computing their output.
pub fn record<F>(op: &'static str, inputs: &[&Tensor], output: &Tensor, backward: F)
where
    F: FnOnce(&Tensor, &[bool]) -> Result<Vec<Option<Tensor>>> + Send + 'static,
{
    ACTIVE.with(|a| {
        if let Some(tape) = a.borrow().as_ref() {
            let mut inner = tape.0.lock().unwrap_or_else(|p| p.into_inner());
            if inputs.iter().any(|t| inner.tracked.contains(&t.id())) {
                inner.tracked.insert(output.id());
                inner.nodes.push(Node {
                    op,
                    inputs: inputs.iter().map(|t| t.id()).collect(),
                    output: output.id(),
                    backward: Box::new(backward),
                });
            }
        }
    });
}

impl Tape {
    /// An empty tape.
    pub fn new() -> Tape {
        Tape::default()
    }

    /// Make `t` a leaf whose gradient [`Tape::backward`] will return.
    pub fn watch(&self, t: &Tensor) {
        let mut inner = self.0.lock().unwrap_or_else(|p| p.into_inner());
        inner.tracked.insert(t.id());
        inner.watched.insert(t.id());
    }

    /// Call `hook` during the next backward pass for each watched tensor as soon as
    /// its gradient is final (after the backward of the earliest recorded op that
    /// uses it), before the rest of the pass runs. A watched tensor no recorded op
    /// uses gets no call.
    pub fn on_grad_ready(&self, hook: GradHook) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).grad_hook = Some(hook);
    }

    /// Make this the active tape of the current thread until the guard drops.
    pub fn activate(&self) -> TapeGuard {
        let previous = ACTIVE.with(|a| a.borrow_mut().replace(self.clone()));
        TapeGuard { previous }
    }

    /// Number of recorded ops.
    pub fn len(&self) -> usize {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).nodes.len()
    }

    /// True when nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Gradients of the scalar `loss` with respect to every watched tensor. Consumes
    /// the recorded ops (a tape is backpropagated once).
    ///
    /// Memory is freed as the pass goes: an op's saved tensors (held by its backward
    /// closure) are dropped as soon as that backward has run, and the gradient of an
    /// intermediate tensor as soon as the op that produced it has read it (every
    /// consumer of a tensor was recorded after its producer, so all of them have
    /// added their part by then). Only the gradients of watched tensors are kept.
    pub fn backward(&self, loss: &Tensor) -> Result<Gradients> {
        if loss.numel() != 1 {
            return Err(Error::Autograd(format!(
                "backward needs a scalar loss, got shape {}",
                loss.shape()
            )));
        }
        self.backward_with(loss, seed_like(loss, 1.0)?)
    }

    /// Gradients given dL/d(output) = `grad` for a non-scalar `output`.
    pub fn backward_with(&self, output: &Tensor, grad: Tensor) -> Result<Gradients> {
        self.backward_seeded(vec![(output, grad)])
    }

    /// Gradients given dL/d(output) = `grad` for several outputs at once, each pair
    /// an output of a recorded op (or a watched tensor) and its seed gradient of the
    /// same shape: the pass a split step runs on the part of the graph that feeds a
    /// later part (whose own backward gave these seeds). A gradient of an output
    /// that another recorded op also uses starts from its seed and adds the other
    /// contributions in the order a single pass over both parts would (the later
    /// part's ops were all recorded after this tape's), so the result equals that
    /// pass bit for bit.
    pub fn backward_seeded(&self, seeds: Vec<(&Tensor, Tensor)>) -> Result<Gradients> {
        for (output, grad) in &seeds {
            if grad.shape() != output.shape() {
                return Err(Error::Autograd(format!(
                    "seed gradient {} for output {}",
                    grad.shape(),
                    output.shape()
                )));
            }
        }
        let (nodes, tracked, watched, mut hook) = {
            let mut inner = self.0.lock().unwrap_or_else(|p| p.into_inner());
            (
                std::mem::take(&mut inner.nodes),
                inner.tracked.clone(),
                inner.watched.clone(),
                inner.grad_hook.take(),
            )
        };
        // For the hook: node index -> the leaves whose earliest use is that node (their
        // gradient is final once its backward has run).
        let mut finals: HashMap<usize, Vec<TensorId>> = HashMap::new();
        if hook.is_some() {
            let mut first_use: HashMap<TensorId, usize> = HashMap::new();
            for (i, node) in nodes.iter().enumerate() {
                for id in &node.inputs {
                    if watched.contains(id) {
                        first_use.entry(*id).or_insert(i);
                    }
                }
            }
            for (id, i) in first_use {
                finals.entry(i).or_default().push(id);
            }
        }
        let ops_total = nodes.len();
        if seeds.is_empty() || seeds.iter().any(|(o, _)| !tracked.contains(&o.id())) {
            return Err(Error::Autograd(
                "the output does not depend on any watched tensor through recorded ops".into(),
            ));
        }
        no_grad(|| {
            let mut grads: HashMap<TensorId, Tensor> = HashMap::new();
            for (output, grad) in seeds {
                let acc = match grads.remove(&output.id()) {
                    Some(prev) => crate::ops::add(&prev, &grad)?,
                    None => grad,
                };
                grads.insert(output.id(), acc);
            }
            for (done, (index, node)) in nodes.into_iter().enumerate().rev().enumerate() {
                let op = node.op;
                // A gradient nobody watches is dropped once its producer has read it.
                let g = if watched.contains(&node.output) {
                    grads.get(&node.output).cloned()
                } else {
                    grads.remove(&node.output)
                };
                if let Some(g) = g {
                    let needs: Vec<bool> =
                        node.inputs.iter().map(|i| tracked.contains(i)).collect();
                    let gin = timed(op, || (node.backward)(&g, &needs))?;
                    if gin.len() != node.inputs.len() {
                        return Err(Error::Autograd(format!(
                            "{op} backward returned {} gradients for {} inputs",
                            gin.len(),
                            node.inputs.len()
                        )));
                    }
                    for ((id, gi), need) in node.inputs.iter().zip(gin).zip(needs) {
                        let Some(gi) = gi else { continue };
                        if !need {
                            continue;
                        }
                        let acc = match grads.remove(id) {
                            Some(prev) => timed("grad_accumulate", || {
                                crate::ops::elementwise::add_into(prev, &gi)
                            })?,
                            None => gi,
                        };
                        grads.insert(*id, acc);
                    }
                }
                if let (Some(hook), Some(ids)) = (hook.as_mut(), finals.get(&index)) {
                    for id in ids {
                        if let Some(grad) = grads.get(id) {
                            hook(GradReady {
                                id: *id,
                                grad,
                                ops_done: done + 1,
                                ops_total,
                                op,
                            })?;
                        }
                    }
                }
                // `g` and the node's closure (its saved tensors) drop here.
            }
            grads.retain(|id, _| watched.contains(id));
            Ok(Gradients(grads))
        })
    }
}

/// The seed gradient of a backward pass from the scalar (or small) `output`: every
/// element `value`, on `output`'s device and dtype. On a GPU an f32 seed is a cached
/// device constant ([`crate::device::gpu::GpuDevice::constant`]), so a training
/// step does not upload it every time (the table is keyed by content: one upload
/// per distinct value and size, e.g. 1 or a gradient-accumulation 1/n). Nothing
/// writes to a seed: tensors are values, and the optimizer only updates storage no
/// one else holds.
pub fn seed_like(output: &Tensor, value: f64) -> Result<Tensor> {
    const MAX_CONSTANT_ELEMS: usize = 64;
    if let (crate::tensor::Storage::Cuda(g), DType::F32) = (output.storage(), output.dtype()) {
        if (1..=MAX_CONSTANT_ELEMS).contains(&output.numel()) {
            let bytes: Vec<u8> = std::iter::repeat_n((value as f32).to_le_bytes(), output.numel())
                .flatten()
                .collect();
            let buf = g.dev.constant(&bytes)?;
            return Ok(Tensor::from_gpu(g.dev.clone(), buf, output.shape().clone()));
        }
    }
    Tensor::full(
        output.shape().clone(),
        value,
        output.dtype(),
        output.device(),
    )
}

/// Gradients keyed by tensor id.
#[derive(Clone, Default)]
pub struct Gradients(HashMap<TensorId, Tensor>);

impl Gradients {
    /// dL/dt, if `t` was watched (or recorded) and the loss depends on it.
    pub fn get(&self, t: &Tensor) -> Option<&Tensor> {
        self.0.get(&t.id())
    }
    /// dL/dt, or an error naming the tensor when the loss does not depend on it.
    pub fn expect(&self, t: &Tensor) -> Result<&Tensor> {
        self.get(t).ok_or_else(|| {
            Error::Autograd(format!(
                "no gradient for tensor {:?} of shape {}",
                t.id(),
                t.shape()
            ))
        })
    }
    /// Take dL/dt out.
    pub fn remove(&mut self, t: &Tensor) -> Option<Tensor> {
        self.0.remove(&t.id())
    }
    /// Number of gradients held.
    pub fn len(&self) -> usize {
        self.0.len()
    }
    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}
