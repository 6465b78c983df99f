//! The [`Runner`]: mmcv's epoch- and iteration-based runners in one, made resumable.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::hook::{dispatch, Hook, Stage};
use super::log_buffer::LogBuffer;
use super::log_sink::LogSink;
use super::{DataLoader, GradSync, Model, Optimizer, Priority};
use crate::autograd::Tape;
use crate::device::Device;
use crate::error::{Error, Result};
use crate::ops;
use crate::rng::Rng;
use crate::tensor::Tensor;

/// The phase of a workflow entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// A training phase: forward, backward and optimizer steps.
    Train,
    /// A validation phase: forward only, no parameter updates.
    Val,
}

/// How long training lasts: a number of epochs (mmcv's EpochBasedRunner) or of
/// iterations (IterBasedRunner, the loader cycling through epochs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    /// Train for this many epochs.
    Epochs(usize),
    /// Train for this many iterations.
    Iters(usize),
}

/// What the last step produced (mmcv's `runner.outputs`).
pub struct StepOutputs {
    /// The total loss (sum of the entries named `*loss*`), scalar, on the tape; `None`
    /// for a validation step that returned no loss.
    pub loss: Option<Tensor>,
    /// Every returned value as f64, then `loss`, the total — filled when the values
    /// were read: always on the CPU, on a GPU only on read-out (logging) iterations
    /// (empty otherwise; see [`Runner::read_out`]).
    pub log_vars: Vec<(String, f64)>,
    /// The same values as scalar tensors where the model computed them (on a GPU they
    /// stay there until a read-out), detached from the tape.
    pub values: Vec<(String, Tensor)>,
    /// Samples in the batch (the weight in the log's averages).
    pub num_samples: usize,
    tape: Option<Tape>,
    params: Vec<Tensor>,
    /// A graphed step's gradients and fixed flags ([`Model::graphed_train_step`]),
    /// until [`Runner::backward`] takes them (instead of a tape).
    graphed_grads: Option<(Vec<Option<Tensor>>, Vec<bool>)>,
}

/// Counters a checkpoint restores: where a resumed run starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResumePoint {
    /// Epoch the run is in (0-based); in iteration mode the loader's epoch.
    pub epoch: usize,
    /// Training iterations completed.
    pub iter: usize,
    /// Epoch of the train loader's order.
    pub data_epoch: u64,
    /// Batches of that epoch already consumed.
    pub data_position: usize,
}

/// A step whose values wait on the device for the next read-out.
struct PendingValues {
    iter: usize,
    num_samples: usize,
    names: Vec<String>,
    /// Host values (read at once); empty when the values were staged on their
    /// device ([`super::StagedValues`]).
    values: Vec<Tensor>,
}

/// A NaN or infinite logged value found by a read-out ([`Runner::non_finite`]).
#[derive(Clone, Debug, PartialEq)]
pub struct NonFinite {
    /// The first value found non-finite, by name (`loss` is the total).
    pub name: String,
    /// Its value (NaN or ±inf).
    pub value: f64,
    /// The iteration (1-based, as the log counts) that produced it.
    pub iter: usize,
    /// The first iteration (1-based) of the read-out that found it: the read-out
    /// covered iterations `first_read..=read_at`, read in one copy.
    pub first_read: usize,
    /// The iteration (1-based) during which the read-out ran.
    pub read_at: usize,
}

struct HookEntry<M: Model> {
    hook: Box<dyn Hook<M>>,
    priority: Priority,
    name: String,
}

/// Drives a [`Model`] with an [`Optimizer`] over data loaders, calling [`Hook`]s at
/// every stage. Everything hooks share lives here.
///
/// Counters follow mmcv: during `after_train_iter`, `iter` is the index of the
/// iteration just run (0-based) and is incremented after the hooks; `epoch` likewise
/// after `after_train_epoch`; `inner_iter` is the index within the epoch (iteration
/// mode: within the current workflow phase).
pub struct Runner<M: Model> {
    /// The model trained.
    pub model: M,
    /// Its optimizer.
    pub optimizer: Box<dyn Optimizer>,
    /// Where checkpoints and logs go.
    pub work_dir: PathBuf,
    /// Free-form run information saved in checkpoints (mmcv's `meta`; hooks keep
    /// `hook_msgs` here: last and best checkpoints, best score).
    pub meta: serde_json::Map<String, serde_json::Value>,
    /// Running averages of logged values.
    pub log_buffer: LogBuffer,
    /// The training random stream, handed to [`Model::train_step`]; checkpointed.
    pub rng: Rng,
    /// Named tensors hooks keep across a resume (the EMA weights, `ema.<param>`).
    pub extra_tensors: BTreeMap<String, Tensor>,
    /// The last step's outputs, until the step's hooks have run.
    pub outputs: Option<StepOutputs>,
    /// Accumulated dL/d(param), in [`Model::params`] order (`param.grad`); empty or
    /// `None` entries mean zero.
    pub grads: Vec<Option<Tensor>>,
    /// Per entry of [`Runner::grads`]: whether it is a graphed step's gradient still
    /// in its fixed buffer (see [`super::GraphedStep::fixed`]); false once a gradient
    /// is accumulated into, clipped or replaced.
    grads_fixed: Vec<bool>,
    /// The latest evaluation metrics (set by the eval hook).
    pub metrics: Vec<(String, f64)>,
    /// Text output: stdout (or above the progress bar) and `work_dir/log.txt`.
    pub log: LogSink,
    /// False on the ranks of a data-parallel group other than rank 0: [`Runner::run`]
    /// then writes no `log.txt` (rank 0 writes logs and checkpoints for the world).
    pub main_process: bool,
    grad_sync: Option<Box<dyn GradSync>>,
    /// Whether [`Runner::grads`] hold gradients not yet reduced across ranks.
    unsynced: bool,
    train_loader: Option<Box<dyn DataLoader<Batch = M::Batch>>>,
    val_loader: Option<Box<dyn DataLoader<Batch = M::Batch>>>,
    schedule: Schedule,
    mode: Mode,
    epoch: usize,
    iter: usize,
    inner_iter: usize,
    data_epoch: u64,
    data_position: usize,
    train_started: bool,
    stage: Option<Stage>,
    hooks: Vec<HookEntry<M>>,
    initial_lr: f64,
    seed: u64,
    work_dir_lock: Option<super::WorkDirLock>,
    /// Steps whose values are not read yet, oldest first.
    pending: Vec<PendingValues>,
    /// Their values on the device, in one buffer that outlives the steps.
    staged: super::StagedValues,
    /// Read the values every this many iterations (the log interval).
    readout_interval: usize,
    /// The first non-finite value any read-out found (sticky).
    non_finite: Option<NonFinite>,
}

impl<M: Model> Runner<M> {
    /// A runner at epoch 0, iteration 0. `seed` seeds the training random stream
    /// ([`Runner::rng`]); the loaders have their own seeds. The optimizer's learning
    /// rate now is the base rate the LR schedule scales.
    pub fn new(
        model: M,
        optimizer: Box<dyn Optimizer>,
        work_dir: impl Into<PathBuf>,
        schedule: Schedule,
        seed: u64,
    ) -> Self {
        let initial_lr = optimizer.lr();
        Runner {
            model,
            optimizer,
            work_dir: work_dir.into(),
            meta: serde_json::Map::new(),
            log_buffer: LogBuffer::new(),
            rng: Rng::new(seed),
            extra_tensors: BTreeMap::new(),
            outputs: None,
            grads: Vec::new(),
            grads_fixed: Vec::new(),
            metrics: Vec::new(),
            log: LogSink::default(),
            main_process: true,
            grad_sync: None,
            unsynced: false,
            train_loader: None,
            val_loader: None,
            schedule,
            mode: Mode::Train,
            epoch: 0,
            iter: 0,
            inner_iter: 0,
            data_epoch: 0,
            data_position: 0,
            train_started: false,
            stage: None,
            hooks: Vec::new(),
            pending: Vec::new(),
            staged: super::StagedValues::new(),
            readout_interval: 1,
            non_finite: None,
            initial_lr,
            seed,
            work_dir_lock: None,
        }
    }

    /// Hold `lock` (from [`super::prepare_work_dir`] on this runner's work_dir) for as
    /// long as the runner lives, so that [`Runner::run`] does not take it again.
    pub fn hold_work_dir_lock(&mut self, lock: super::WorkDirLock) {
        self.work_dir_lock = Some(lock);
    }

    /// Set the training loader.
    pub fn set_train_loader(&mut self, loader: Box<dyn DataLoader<Batch = M::Batch>>) {
        self.train_loader = Some(loader);
        self.train_started = false;
    }

    /// Average gradients across data-parallel ranks in every [`Runner::backward`]
    /// (see `kestrel::dist::distribute_runner`).
    pub fn set_grad_sync(&mut self, sync: Option<Box<dyn GradSync>>) {
        self.grad_sync = sync;
    }

    /// Remove the hooks named `name` (e.g. `CheckpointHook` on ranks other than 0);
    /// returns how many were removed.
    pub fn remove_hooks(&mut self, name: &str) -> usize {
        let before = self.hooks.len();
        self.hooks.retain(|h| h.name != name);
        before - self.hooks.len()
    }

    /// The smallest read-out interval the registered hooks ask for
    /// ([`Hook::readout_interval`]), if any does.
    pub fn hooks_readout_interval(&self) -> Option<usize> {
        self.hooks
            .iter()
            .filter_map(|h| h.hook.readout_interval())
            .min()
    }

    /// Set the validation loader (used by `Val` workflow phases).
    pub fn set_val_loader(&mut self, loader: Box<dyn DataLoader<Batch = M::Batch>>) {
        self.val_loader = Some(loader);
    }

    // ---- counters -------------------------------------------------------------------

    /// Current epoch, 0-based.
    pub fn epoch(&self) -> usize {
        self.epoch
    }
    /// Training iterations completed before the current one.
    pub fn iter(&self) -> usize {
        self.iter
    }
    /// Index of the current iteration within its epoch (or workflow phase).
    pub fn inner_iter(&self) -> usize {
        self.inner_iter
    }
    /// The schedule.
    pub fn schedule(&self) -> Schedule {
        self.schedule
    }
    /// True for an epoch-based schedule.
    pub fn by_epoch(&self) -> bool {
        matches!(self.schedule, Schedule::Epochs(_))
    }
    /// Number of epochs of an epoch-based schedule.
    pub fn max_epochs(&self) -> Option<usize> {
        match self.schedule {
            Schedule::Epochs(n) => Some(n),
            Schedule::Iters(_) => None,
        }
    }
    /// Total training iterations (epochs times batches per epoch when epoch-based).
    pub fn max_iters(&self) -> usize {
        match self.schedule {
            Schedule::Epochs(n) => n * self.train_len(),
            Schedule::Iters(n) => n,
        }
    }
    /// Batches per training epoch (0 without a loader).
    pub fn train_len(&self) -> usize {
        self.train_loader.as_ref().map_or(0, |l| l.len())
    }
    /// Batches per validation epoch (0 without a loader).
    pub fn val_len(&self) -> usize {
        self.val_loader.as_ref().map_or(0, |l| l.len())
    }
    /// Train or Val, the phase running now.
    pub fn mode(&self) -> Mode {
        self.mode
    }
    /// The stage whose hooks are running (or ran last).
    pub fn stage(&self) -> Option<Stage> {
        self.stage
    }
    /// The optimizer's learning rate now.
    pub fn current_lr(&self) -> f64 {
        self.optimizer.lr()
    }
    /// The base learning rate the schedule scales (the optimizer's at creation,
    /// restored on resume).
    pub fn initial_lr(&self) -> f64 {
        self.initial_lr
    }
    /// The seed given to [`Runner::new`].
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// mmcv's `every_n_epochs`: whether `epoch + 1` is a multiple of `n` (n > 0).
    pub fn every_n_epochs(&self, n: usize) -> bool {
        n > 0 && (self.epoch + 1) % n == 0
    }
    /// Whether `iter + 1` is a multiple of `n` (n > 0).
    pub fn every_n_iters(&self, n: usize) -> bool {
        n > 0 && (self.iter + 1) % n == 0
    }
    /// Whether `inner_iter + 1` is a multiple of `n` (n > 0).
    pub fn every_n_inner_iters(&self, n: usize) -> bool {
        n > 0 && (self.inner_iter + 1) % n == 0
    }
    /// Whether the current iteration is the last of its epoch.
    pub fn end_of_epoch(&self) -> bool {
        self.inner_iter + 1 == self.train_len()
    }
    /// Whether the current epoch is the last.
    pub fn is_last_epoch(&self) -> bool {
        self.max_epochs() == Some(self.epoch + 1)
    }
    /// Whether the current iteration is the last.
    pub fn is_last_iter(&self) -> bool {
        self.iter + 1 == self.max_iters()
    }

    // ---- hooks ----------------------------------------------------------------------

    /// Register `hook` at its own [`Hook::priority`].
    pub fn register_hook(&mut self, hook: impl Hook<M> + 'static) {
        let p = hook.priority();
        self.register_boxed_hook(Box::new(hook), p);
    }

    /// Register `hook` at `priority`: after every hook of lower or equal priority.
    pub fn register_hook_with_priority(
        &mut self,
        hook: impl Hook<M> + 'static,
        priority: Priority,
    ) {
        self.register_boxed_hook(Box::new(hook), priority);
    }

    /// Register a boxed hook at `priority`.
    pub fn register_boxed_hook(&mut self, hook: Box<dyn Hook<M>>, priority: Priority) {
        let name = hook.name();
        let at = self.hooks.partition_point(|h| h.priority <= priority);
        self.hooks.insert(
            at,
            HookEntry {
                hook,
                priority,
                name,
            },
        );
    }

    /// Names and priorities of the hooks, in the order they run.
    pub fn hook_order(&self) -> Vec<(String, Priority)> {
        self.hooks
            .iter()
            .map(|h| (h.name.clone(), h.priority))
            .collect()
    }

    /// The hook order as printed at the start of a run, one `(PRIORITY   ) Name` line
    /// per hook.
    pub fn hook_order_text(&self) -> String {
        let mut s = String::from("Hooks, in the order they run:");
        for (name, p) in self.hook_order() {
            s.push_str(&format!("\n({:<12}) {name}", p.to_string()));
        }
        s
    }

    /// Call every hook's method for `stage`, in priority order; the first error stops
    /// the stage and is returned.
    pub fn call_hook(&mut self, stage: Stage) -> Result<()> {
        self.stage = Some(stage);
        let mut hooks = std::mem::take(&mut self.hooks);
        let mut result = Ok(());
        for h in hooks.iter_mut() {
            result = dispatch(h.hook.as_mut(), stage, self);
            if result.is_err() {
                break;
            }
        }
        // Hooks registered by a hook during the stage join the list in priority order.
        let added = std::mem::replace(&mut self.hooks, hooks);
        for h in added {
            self.register_boxed_hook(h.hook, h.priority);
        }
        result
    }

    // ---- the run --------------------------------------------------------------------

    /// Run `workflow`, e.g. `[(Train, 2), (Val, 1)]`: train 2 epochs (iterations when
    /// iteration-based), validate one epoch, and so on until the schedule ends. Phases
    /// after the last training phase still run in the final cycle, as in mmcv. A
    /// resumed runner starts where the checkpoint left it, also within the workflow.
    pub fn run(&mut self, workflow: &[(Mode, usize)]) -> Result<()> {
        self.check_workflow(workflow)?;
        std::fs::create_dir_all(&self.work_dir).map_err(|source| Error::Io {
            path: self.work_dir.clone(),
            source,
        })?;
        // One run per work_dir at a time: a second one would mix checkpoints and logs.
        // In a data-parallel run rank 0 holds it (the other ranks write nothing there).
        let held = self
            .work_dir_lock
            .as_ref()
            .is_some_and(|l| l.path().parent() == Some(self.work_dir.as_path()));
        let _lock = if held || !self.main_process {
            None
        } else {
            Some(super::WorkDirLock::acquire(&self.work_dir)?)
        };
        if self.main_process {
            // Temporary files of checkpoint writes an earlier run did not finish
            // (killed, disk full): with the lock held, nobody else is writing them.
            let removed = super::remove_temp_files(&self.work_dir)?;
            self.log.set_file(Some(self.work_dir.join("log.txt")));
            for p in removed {
                self.log.line(&format!(
                    "removed {} (left by an interrupted checkpoint write)",
                    p.display()
                ));
            }
        }
        self.log.line(&format!(
            "Start running: work_dir {}, workflow {:?}, {}, from epoch {} iter {}",
            self.work_dir.display(),
            workflow,
            match self.schedule {
                Schedule::Epochs(n) => format!("max_epochs {n}"),
                Schedule::Iters(n) => format!("max_iters {n}"),
            },
            self.epoch,
            self.iter
        ));
        self.log.line(&self.hook_order_text());
        let result = self.run_stages(workflow);
        if result.is_err() {
            // after_run hooks did not run: take the progress bar down for the error.
            self.log.set_progress_bar(None);
        }
        result
    }

    fn run_stages(&mut self, workflow: &[(Mode, usize)]) -> Result<()> {
        self.call_hook(Stage::BeforeRun)?;
        if !self.by_epoch() {
            // mmcv's IterBasedRunner wraps the whole run in one "epoch".
            self.mode = Mode::Train;
            self.call_hook(Stage::BeforeTrainEpoch)?;
        }
        self.run_workflow(workflow)?;
        self.finish_readout()?;
        if !self.by_epoch() {
            self.mode = Mode::Train;
            self.call_hook(Stage::AfterTrainEpoch)?;
        }
        self.call_hook(Stage::AfterRun)
    }

    fn check_workflow(&self, workflow: &[(Mode, usize)]) -> Result<()> {
        let train: usize = workflow
            .iter()
            .filter(|(m, _)| *m == Mode::Train)
            .map(|(_, n)| n)
            .sum();
        if train == 0 {
            return Err(Error::invalid(
                "Runner::run",
                format!("workflow {workflow:?} has no training phase of positive length"),
            ));
        }
        if self.train_loader.is_none() {
            return Err(Error::invalid("Runner::run", "no training data loader set"));
        }
        if self.train_len() == 0 {
            return Err(Error::invalid(
                "Runner::run",
                "the training loader has no batch",
            ));
        }
        if self.model.trains_through_graphs() && self.grad_sync.is_some() {
            return Err(Error::invalid(
                "Runner::run",
                "runtime.graph: a graphed training step cannot reduce gradients across \
                 data-parallel ranks during its backward; train with graph = false",
            ));
        }
        if workflow.iter().any(|(m, _)| *m == Mode::Val) && self.val_loader.is_none() {
            return Err(Error::invalid(
                "Runner::run",
                "the workflow has a val phase but no validation loader is set",
            ));
        }
        Ok(())
    }

    /// Training units (epochs or iterations) completed, and the schedule's total.
    fn units(&self) -> (usize, usize) {
        match self.schedule {
            Schedule::Epochs(n) => (self.epoch, n),
            Schedule::Iters(n) => (self.iter, n),
        }
    }

    fn run_workflow(&mut self, workflow: &[(Mode, usize)]) -> Result<()> {
        let (done, _) = self.units();
        // Resumed inside an epoch: that epoch's training phase comes first.
        let mid_epoch = self.by_epoch() && self.data_position > 0;
        let (mut phase, mut first_count) = workflow_cursor(workflow, done, mid_epoch);
        loop {
            let (done, max) = self.units();
            if done >= max && phase == 0 {
                return Ok(());
            }
            let (mode, count) = workflow[phase];
            let count = first_count.take().unwrap_or(count);
            self.inner_iter = 0;
            for _ in 0..count {
                match mode {
                    Mode::Train => {
                        let (done, max) = self.units();
                        if done >= max {
                            break;
                        }
                        if self.by_epoch() {
                            self.train_epoch()?;
                        } else {
                            self.train_iter_cycled()?;
                            self.inner_iter += 1;
                        }
                    }
                    Mode::Val => self.val_epoch()?,
                }
            }
            phase = (phase + 1) % workflow.len();
        }
    }

    /// One epoch of training (epoch-based), from the resumed position if any.
    fn train_epoch(&mut self) -> Result<()> {
        self.mode = Mode::Train;
        if self.data_epoch != self.epoch as u64 {
            self.data_epoch = self.epoch as u64;
            self.data_position = 0;
        }
        self.start_train_loader()?;
        self.call_hook(Stage::BeforeTrainEpoch)?;
        let len = self.train_len();
        while self.data_position < len {
            self.inner_iter = self.data_position;
            let batch = self.next_train_batch()?;
            self.train_iter(batch)?;
        }
        self.mode = Mode::Train;
        self.call_hook(Stage::AfterTrainEpoch)?;
        self.epoch += 1;
        self.data_epoch = self.epoch as u64;
        self.data_position = 0;
        self.train_started = false;
        Ok(())
    }

    /// One training iteration of an iteration-based run, the loader cycling epochs.
    fn train_iter_cycled(&mut self) -> Result<()> {
        self.mode = Mode::Train;
        if self.data_position >= self.train_len() {
            self.data_epoch += 1;
            self.data_position = 0;
            self.train_started = false;
        }
        self.epoch = self.data_epoch as usize;
        self.start_train_loader()?;
        let batch = self.next_train_batch()?;
        self.train_iter(batch)
    }

    fn start_train_loader(&mut self) -> Result<()> {
        if !self.train_started {
            let loader = self
                .train_loader
                .as_mut()
                .ok_or_else(|| Error::invalid("Runner", "no training data loader set"))?;
            loader.start(self.data_epoch, self.data_position)?;
            self.train_started = true;
        }
        Ok(())
    }

    fn next_train_batch(&mut self) -> Result<M::Batch> {
        let len = self.train_len();
        let loader = self
            .train_loader
            .as_mut()
            .ok_or_else(|| Error::invalid("Runner", "no training data loader set"))?;
        let batch = loader.next_batch().ok_or_else(|| {
            Error::Training(format!(
                "the training loader ended after {} of its {len} batches (epoch {})",
                self.data_position, self.data_epoch
            ))
        })??;
        let skipped = loader.take_skipped();
        self.data_position += 1;
        self.log_skipped(skipped);
        Ok(batch)
    }

    /// Log each sample the loader skipped, with the run's count so far (kept in
    /// `meta.skipped_samples`, so it survives a resume).
    fn log_skipped(&mut self, skipped: Vec<String>) {
        if skipped.is_empty() {
            return;
        }
        let count = self
            .meta
            .get("skipped_samples")
            .and_then(serde_json::Value::as_u64)
            .unwrap_or(0)
            + skipped.len() as u64;
        self.meta
            .insert("skipped_samples".into(), serde_json::json!(count));
        for e in skipped {
            self.log.line(&format!(
                "warning: skipped a sample that failed to load ({count} so far): {e}"
            ));
        }
    }

    fn train_iter(&mut self, batch: M::Batch) -> Result<()> {
        // Kernel errors (a bad index, a label outside the classes) raise the device's
        // flag table instead of a read-back per op; the next read-out reports them.
        let _defer = crate::device::error_flags::defer();
        self.mode = Mode::Train;
        self.call_hook(Stage::BeforeTrainIter)?;
        self.train_step(&batch)?;
        self.call_hook(Stage::AfterTrainIter)?;
        self.outputs = None;
        self.iter += 1;
        Ok(())
    }

    /// The forward pass of a training step: watch the parameters, run the model under
    /// the tape, parse its losses, log them. The backward pass and the update are the
    /// optimizer hook's ([`Runner::backward`], [`Runner::optimizer_step`]).
    ///
    /// The values stay where the model computed them: on the CPU they are read at
    /// once; on a GPU they wait for the next read-out ([`Runner::read_out`]), which
    /// runs here on logging iterations (see [`Runner::set_readout_interval`]), so a
    /// non-logging iteration copies nothing back.
    ///
    /// A model that trains through graphs ([`Model::trains_through_graphs`]) computes
    /// the step's gradients with its forward ([`Model::graphed_train_step`]); the
    /// optimizer hook's [`Runner::backward`] then only takes them.
    fn train_step(&mut self, batch: &M::Batch) -> Result<()> {
        let num_samples = self.model.num_samples(batch);
        let log = &mut self.log;
        let graphed = self
            .model
            .graphed_train_step(batch, &mut self.rng, &mut |l| log.line(l))?;
        let (loss, values, tape, params, graphed_grads) = match graphed {
            Some(step) => {
                let n = self.model.params().len();
                if step.grads.len() != n || step.fixed.len() != n {
                    return Err(Error::Training(format!(
                        "a graphed step gave {} gradients ({} flags) for {n} parameters",
                        step.grads.len(),
                        step.fixed.len()
                    )));
                }
                let (loss, values) = parse_tensors(step.values, true)?;
                (
                    loss,
                    values,
                    None,
                    Vec::new(),
                    Some((step.grads, step.fixed)),
                )
            }
            None => {
                let params: Vec<Tensor> = self.model.params().into_iter().map(|(_, t)| t).collect();
                let tape = Tape::new();
                for p in &params {
                    tape.watch(p);
                }
                let (loss, values) = {
                    let _active = tape.activate();
                    let losses = self.model.train_step(batch, &mut self.rng)?;
                    parse_tensors(losses, true)?
                };
                (loss, values, Some(tape), params, None)
            }
        };
        let on_host = values.iter().all(|(_, t)| t.device() == Device::Cpu);
        let kept = if on_host {
            values.iter().map(|(_, t)| t.clone()).collect()
        } else {
            // Copied into the staging buffer, so no block of this step is held
            // past it (see super::step_values).
            let ts: Vec<Tensor> = values.iter().map(|(_, t)| t.clone()).collect();
            self.staged.push(&ts)?;
            Vec::new()
        };
        self.pending.push(PendingValues {
            iter: self.iter,
            num_samples,
            names: values.iter().map(|(n, _)| n.clone()).collect(),
            values: kept,
        });
        self.outputs = Some(StepOutputs {
            loss,
            log_vars: Vec::new(),
            values,
            num_samples,
            tape,
            params,
            graphed_grads,
        });
        if on_host || self.readout_due() {
            self.read_out()?;
        }
        Ok(())
    }

    /// Read the logged values every `n` iterations (and at the end of an epoch and of
    /// the run). The [`hooks::LoggerHook`](super::hooks::LoggerHook) sets its interval
    /// here; without a logger the values are read every iteration. Values on the CPU
    /// are always read at once.
    pub fn set_readout_interval(&mut self, n: usize) {
        self.readout_interval = n.max(1);
    }

    /// The read-out interval ([`Runner::set_readout_interval`]).
    pub fn readout_interval(&self) -> usize {
        self.readout_interval
    }

    /// Whether the current training iteration reads its values out.
    fn readout_due(&self) -> bool {
        let n = self.readout_interval;
        if self.by_epoch() {
            self.every_n_inner_iters(n) || self.end_of_epoch()
        } else {
            self.every_n_iters(n) || self.is_last_iter()
        }
    }

    /// Read the values of every training step not yet read, in ONE device-to-host
    /// copy (with the device's deferred kernel-error flags and a NaN flag: see
    /// [`super::read_step_values`]), add them to the [`LogBuffer`] in iteration order
    /// (the averages equal those of a read every iteration) and fill the current
    /// step's [`StepOutputs::log_vars`]. A raised kernel-error flag is returned as
    /// that op's error. Returns the first non-finite value any read-out has found
    /// ([`Runner::non_finite`]). Nothing to read: no copy.
    pub fn read_out(&mut self) -> Result<Option<NonFinite>> {
        if self.pending.is_empty() {
            return Ok(self.non_finite.clone());
        }
        let pending = std::mem::take(&mut self.pending);
        // The staged device values in one copy (if any), then each step's in order:
        // staged ones from that copy, host ones (any dtype, no copy) one by one.
        let mut from_device = self.staged.read()?.values.into_iter();
        let mut read: Vec<f64> = Vec::new();
        for p in &pending {
            if p.values.is_empty() {
                read.extend(from_device.by_ref().take(p.names.len()));
            } else {
                for t in &p.values {
                    read.push(t.item()?);
                }
            }
        }
        if read.len() != pending.iter().map(|p| p.names.len()).sum::<usize>() {
            return Err(Error::Training(
                "the staged step values do not match the steps read".into(),
            ));
        }
        let first_read = pending[0].iter + 1;
        let mut at = 0;
        for p in &pending {
            let vars: Vec<(String, f64)> = p
                .names
                .iter()
                .cloned()
                .zip(read[at..at + p.names.len()].iter().copied())
                .collect();
            at += p.names.len();
            self.log_buffer.update(&vars, p.num_samples);
            if self.non_finite.is_none() {
                if let Some((name, value)) = vars.iter().find(|(_, v)| !v.is_finite()) {
                    self.non_finite = Some(NonFinite {
                        name: name.clone(),
                        value: *value,
                        iter: p.iter + 1,
                        first_read,
                        read_at: self.iter + 1,
                    });
                }
            }
            if p.iter == self.iter && self.mode == Mode::Train {
                if let Some(out) = self.outputs.as_mut() {
                    out.log_vars = vars;
                }
            }
        }
        Ok(self.non_finite.clone())
    }

    /// The first NaN or infinite logged value a read-out has found, if any: on a GPU
    /// it is known only from the read-out after the iteration that produced it.
    pub fn non_finite(&self) -> Option<&NonFinite> {
        self.non_finite.as_ref()
    }

    /// Force a read-out and fail if any value read so far was NaN or infinite: a
    /// checkpoint is saved only after this, so the state of a NaN step is never
    /// saved as good (the checkpoint hooks call it).
    pub fn verify_finite(&mut self) -> Result<()> {
        match self.read_out()? {
            None => Ok(()),
            Some(nf) => Err(Error::Training(format!(
                "not saving a checkpoint: `{}` was {} at iteration {} (found by the \
                 read-out at iteration {}), so the weights are not known to be good",
                nf.name, nf.value, nf.iter, nf.read_at
            ))),
        }
    }

    /// The end of the training: read what is left and check the kernel-error flags
    /// raised after the last read-out (by the last backward passes and updates).
    fn finish_readout(&mut self) -> Result<()> {
        self.read_out()?;
        if let Some((_, p)) = self.model.params().first() {
            if let Ok(g) = p.gpu() {
                crate::device::error_flags::check(&g.dev)?;
            }
        }
        Ok(())
    }

    /// One pass over the validation loader (mmcv's `runner.val`): the model's
    /// [`Model::val_step`] on each batch, without a tape, its values logged.
    pub fn val_epoch(&mut self) -> Result<()> {
        self.mode = Mode::Val;
        let loader = self
            .val_loader
            .as_mut()
            .ok_or_else(|| Error::invalid("Runner::val_epoch", "no validation loader set"))?;
        loader.start(0, 0)?;
        self.call_hook(Stage::BeforeValEpoch)?;
        // A stream of its own, so validation never shifts the training stream.
        let mut rng =
            Rng::new(self.seed ^ (self.iter as u64 + 1).wrapping_mul(0xA076_1D64_78BD_642F));
        let mut i = 0;
        loop {
            let next = match self.val_loader.as_mut() {
                Some(l) => l.next_batch(),
                None => None,
            };
            let Some(batch) = next else { break };
            let batch = batch?;
            self.inner_iter = i;
            self.mode = Mode::Val;
            self.call_hook(Stage::BeforeValIter)?;
            let num_samples = self.model.num_samples(&batch);
            let values = self.model.val_step(&batch, &mut rng)?;
            let (loss, values) = parse_tensors(values, false)?;
            let log_vars = read_now(&values)?;
            self.log_buffer.update(&log_vars, num_samples);
            self.outputs = Some(StepOutputs {
                loss,
                log_vars,
                values,
                num_samples,
                tape: None,
                params: Vec::new(),
                graphed_grads: None,
            });
            self.call_hook(Stage::AfterValIter)?;
            self.outputs = None;
            i += 1;
        }
        self.mode = Mode::Val;
        self.call_hook(Stage::AfterValEpoch)
    }

    // ---- what the optimizer hook does -------------------------------------------------

    fn ensure_grads(&mut self, n: usize) -> Result<()> {
        if self.grads.len() != n {
            if self.grads.iter().any(Option::is_some) {
                return Err(Error::Training(format!(
                    "{} accumulated gradients for a model with {n} parameters",
                    self.grads.len()
                )));
            }
            self.grads = vec![None; n];
        }
        self.grads_fixed.resize(n, false);
        Ok(())
    }

    /// Forget the accumulated gradients (`optimizer.zero_grad()`).
    pub fn zero_grad(&mut self) {
        self.grads.iter_mut().for_each(|g| *g = None);
        self.grads_fixed.iter_mut().for_each(|f| *f = false);
        self.unsynced = false;
    }

    /// Forget which gradients lie in a graph's fixed buffers (after
    /// [`Runner::grads`] were replaced wholesale, e.g. by a resume).
    pub(crate) fn clear_fixed_grads(&mut self) {
        self.grads_fixed.clear();
    }

    /// Whether [`Runner::grads`] hold this rank's gradients not yet reduced across
    /// data-parallel ranks (micro-steps run with [`Runner::backward_sync`]`(_, false)`).
    pub fn has_unsynced_grads(&self) -> bool {
        self.unsynced
    }

    /// Backpropagate `loss_scale * loss` of the current step and add the gradients to
    /// [`Runner::grads`] (`(loss * loss_scale).backward()`). Once per step.
    pub fn backward(&mut self, loss_scale: f64) -> Result<()> {
        self.backward_sync(loss_scale, true)
    }

    /// [`Runner::backward`], reducing across data-parallel ranks only when `sync`:
    /// with `sync == false` the gradients add up locally, unreduced (DDP's `no_sync`),
    /// and the next step with `sync` reduces the accumulated totals during its
    /// backward. Without a [`GradSync`] installed `sync` changes nothing.
    pub fn backward_sync(&mut self, loss_scale: f64, sync: bool) -> Result<()> {
        let out = self
            .outputs
            .as_mut()
            .ok_or_else(|| Error::Autograd("backward outside a training step".into()))?;
        if let Some((grads, fixed)) = out.graphed_grads.take() {
            return self.take_graphed_grads(grads, fixed, loss_scale, sync);
        }
        let loss = out
            .loss
            .clone()
            .ok_or_else(|| Error::Autograd("the step has no loss".into()))?;
        let tape = out
            .tape
            .take()
            .ok_or_else(|| Error::Autograd("this step's loss was already backpropagated".into()))?;
        let params = out.params.clone();
        let seed = crate::autograd::seed_like(&loss, loss_scale)?;
        self.ensure_grads(params.len())?;
        let reducer = self.grad_sync.as_mut().filter(|_| sync);
        // Unreduced gradients of earlier micro-steps join this step's reduction.
        let carried = reducer.is_some() && self.unsynced;
        if let Some(r) = reducer {
            r.attach(&tape, &params)?;
            if carried {
                r.attach_accumulated(&self.grads)?;
            }
        }
        let grads = tape.backward_with(&loss, seed)?;
        let mut step: Vec<Option<Tensor>> = params.iter().map(|p| grads.get(p).cloned()).collect();
        if let Some(r) = self.grad_sync.as_mut().filter(|_| sync) {
            r.finish(&mut step)?;
            if carried {
                // `step` already holds the accumulated totals, averaged.
                self.grads = step;
                self.unsynced = false;
                return Ok(());
            }
        } else if self.grad_sync.is_some() {
            self.unsynced = true;
        }
        for ((slot, f), g) in self.grads.iter_mut().zip(&mut self.grads_fixed).zip(step) {
            if let Some(g) = g {
                *f = false;
                *slot = Some(match slot.take() {
                    Some(prev) => ops::add(&prev, &g)?,
                    None => g,
                });
            }
        }
        Ok(())
    }

    /// [`Runner::backward_sync`] for a graphed step: its gradients (of the loss
    /// unscaled, reduced nowhere) join [`Runner::grads`], the fixed ones flagged.
    fn take_graphed_grads(
        &mut self,
        grads: Vec<Option<Tensor>>,
        fixed: Vec<bool>,
        loss_scale: f64,
        sync: bool,
    ) -> Result<()> {
        if loss_scale != 1.0 {
            return Err(Error::Training(format!(
                "runtime.graph: a graphed step's gradients are those of the loss itself; \
                 it cannot backpropagate the loss scaled by {loss_scale} (gradient \
                 accumulation): train with graph = false"
            )));
        }
        if sync && self.grad_sync.is_some() {
            return Err(Error::Training(
                "runtime.graph: a graphed step cannot reduce gradients across ranks".into(),
            ));
        }
        self.ensure_grads(grads.len())?;
        for ((slot, f), (g, fx)) in self
            .grads
            .iter_mut()
            .zip(&mut self.grads_fixed)
            .zip(grads.into_iter().zip(fixed))
        {
            if let Some(g) = g {
                match slot.take() {
                    Some(prev) => {
                        *slot = Some(ops::add(&prev, &g)?);
                        *f = false;
                    }
                    None => {
                        *slot = Some(g);
                        *f = fx;
                    }
                }
            }
        }
        Ok(())
    }

    /// Scale the gradients so that their total `norm_type`-norm is at most `max_norm`,
    /// as `torch.nn.utils.clip_grad_norm_` does (coefficient `max_norm / (total +
    /// 1e-6)`, clamped to 1). `norm_type` may be `f64::INFINITY`. Returns the total norm
    /// before clipping.
    pub fn clip_grad_norm(&mut self, max_norm: f64, norm_type: f64) -> Result<f64> {
        let mut norms = Vec::new();
        for g in self.grads.iter().flatten() {
            norms.push(vector_norm(&g.to_vec::<f64>()?, norm_type));
        }
        if norms.is_empty() {
            return Ok(0.0);
        }
        let total = vector_norm(&norms, norm_type);
        let coef = (max_norm / (total + 1e-6)).min(1.0);
        if coef < 1.0 {
            for g in self.grads.iter_mut().flatten() {
                *g = ops::scale(g, coef)?;
            }
            // New tensors, no longer in a graph's fixed buffers.
            self.grads_fixed.iter_mut().for_each(|f| *f = false);
        }
        Ok(total)
    }

    /// Apply the optimizer to the model's parameters with [`Runner::grads`].
    pub fn optimizer_step(&mut self) -> Result<()> {
        // The step's own clones of the parameters (watched by its tape) are no
        // longer needed after backward; dropping them lets the optimizer update the
        // parameters' buffers in place instead of copying them.
        if let Some(out) = self.outputs.as_mut() {
            out.params.clear();
        }
        let n = self.model.params().len();
        self.ensure_grads(n)?;
        if self.grads_fixed.len() != n {
            self.grads_fixed = vec![false; n];
        }
        let mut params = self.model.take_params();
        let stepped = self
            .optimizer
            .step_fixed(&mut params, &self.grads, &self.grads_fixed);
        // Given back even when the step failed (then unchanged).
        self.model.set_params(params)?;
        stepped
    }

    // ---- checkpoint counters ----------------------------------------------------------

    /// Where a run resumed from a checkpoint saved now should start: after the
    /// iteration whose `after_train_iter` hooks are running, after the epoch whose
    /// `after_train_epoch` hooks are running, else at the current counters.
    pub fn resume_point(&self) -> ResumePoint {
        let here = ResumePoint {
            epoch: self.epoch,
            iter: self.iter,
            data_epoch: self.data_epoch,
            data_position: self.data_position,
        };
        match (self.stage, self.mode) {
            (Some(Stage::AfterTrainIter), Mode::Train) => ResumePoint {
                iter: self.iter + 1,
                ..here
            },
            (Some(Stage::BeforeTrainIter), Mode::Train) => self.point_before_current_iter(),
            (Some(Stage::AfterTrainEpoch), _) if self.by_epoch() => ResumePoint {
                epoch: self.epoch + 1,
                data_epoch: self.epoch as u64 + 1,
                data_position: 0,
                ..here
            },
            _ => here,
        }
    }

    /// The point just before the current training iteration: resuming there runs it
    /// again (the NaN guard saves this).
    pub fn point_before_current_iter(&self) -> ResumePoint {
        ResumePoint {
            epoch: self.epoch,
            iter: self.iter,
            data_epoch: self.data_epoch,
            data_position: self.data_position.saturating_sub(1),
        }
    }

    pub(crate) fn set_resume_point(&mut self, p: ResumePoint) {
        self.epoch = p.epoch;
        self.iter = p.iter;
        self.data_epoch = p.data_epoch;
        self.data_position = p.data_position;
        self.inner_iter = p.data_position;
        self.train_started = false;
        self.outputs = None;
    }

    pub(crate) fn set_initial_lr(&mut self, lr: f64) {
        self.initial_lr = lr;
    }

    /// `work_dir/name`.
    pub fn work_path(&self, name: impl AsRef<Path>) -> PathBuf {
        self.work_dir.join(name)
    }
}

/// mmcv's `parse_losses`: each entry is averaged to a scalar; the entries whose name
/// contains `loss` are summed, in order, into the total `loss`; every value (f64) is
/// kept for the log, followed by `loss`. Errors when no entry is a loss, on duplicate
/// names, and on an entry named `loss` (it would be overwritten by the total).
pub fn parse_losses(losses: Vec<(String, Tensor)>) -> Result<(Tensor, Vec<(String, f64)>)> {
    let (loss, values) = parse_tensors(losses, true)?;
    let vars = read_now(&values)?;
    // parse_tensors(.., true) returns a loss or an error.
    Ok((loss.expect("parse_tensors requires a loss"), vars))
}

/// The total loss (if any) and every value as a scalar tensor, then the total as
/// `loss` (detached: the log's copies).
type Parsed = (Option<Tensor>, Vec<(String, Tensor)>);

fn parse_tensors(losses: Vec<(String, Tensor)>, require_loss: bool) -> Result<Parsed> {
    let mut total: Option<Tensor> = None;
    let mut vars: Vec<(String, Tensor)> = Vec::with_capacity(losses.len() + 1);
    for (name, value) in losses {
        if name == "loss" || vars.iter().any(|(n, _)| *n == name) {
            return Err(Error::invalid(
                "parse_losses",
                format!("the model returned `{name}` twice or as the reserved name `loss`"),
            ));
        }
        let scalar = if value.numel() == 1 {
            ops::reshape(&value, Vec::<usize>::new())?
        } else {
            ops::mean(&value)?
        };
        vars.push((name.clone(), scalar.detach()));
        if name.contains("loss") {
            total = Some(match total {
                Some(t) => ops::add(&t, &scalar)?,
                None => scalar,
            });
        }
    }
    match &total {
        Some(t) => vars.push(("loss".into(), t.detach())),
        None if require_loss => {
            let names: Vec<&str> = vars.iter().map(|(n, _)| n.as_str()).collect();
            return Err(Error::invalid(
                "parse_losses",
                format!("no value named `*loss*` among {names:?}"),
            ));
        }
        None => {}
    }
    Ok((total, vars))
}

/// The values as f64, read now (one copy per value on a GPU: validation only).
fn read_now(values: &[(String, Tensor)]) -> Result<Vec<(String, f64)>> {
    values
        .iter()
        .map(|(n, t)| Ok((n.clone(), t.item()?)))
        .collect()
}

/// ‖v‖ₚ, with p = ∞ the largest magnitude.
fn vector_norm(v: &[f64], p: f64) -> f64 {
    if p.is_infinite() {
        v.iter().fold(0.0f64, |m, x| m.max(x.abs()))
    } else if p == 2.0 {
        v.iter().map(|x| x * x).sum::<f64>().sqrt()
    } else {
        v.iter().map(|x| x.abs().powf(p)).sum::<f64>().powf(1.0 / p)
    }
}

/// Where to start in `workflow` after `done` training units: the phase and, for a
/// phase entered midway, how many of its units remain (the unit in progress
/// included when `in_unit`). Val phases that directly follow the point are run (an
/// uninterrupted run would run them next).
fn workflow_cursor(
    workflow: &[(Mode, usize)],
    done: usize,
    in_unit: bool,
) -> (usize, Option<usize>) {
    let per_cycle: usize = workflow
        .iter()
        .filter(|(m, _)| *m == Mode::Train)
        .map(|(_, n)| n)
        .sum();
    if per_cycle == 0 || (done == 0 && !in_unit) {
        return (0, None);
    }
    let mut offset = done % per_cycle;
    if in_unit {
        for (i, (mode, n)) in workflow.iter().enumerate() {
            if *mode == Mode::Train {
                if offset < *n {
                    return (i, Some(n - offset));
                }
                offset -= n;
            }
        }
    }
    if offset == 0 {
        // A whole cycle done: continue after its last training phase.
        let last_train = workflow
            .iter()
            .rposition(|(m, _)| *m == Mode::Train)
            .unwrap_or(0);
        return ((last_train + 1) % workflow.len(), None);
    }
    for (i, (mode, n)) in workflow.iter().enumerate() {
        if *mode != Mode::Train {
            continue;
        }
        if offset < *n {
            return (i, Some(n - offset));
        }
        offset -= n;
        if offset == 0 {
            return ((i + 1) % workflow.len(), None);
        }
    }
    (0, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workflow_cursor_resumes_mid_cycle() {
        let wf = [(Mode::Train, 2), (Mode::Val, 1)];
        assert_eq!(workflow_cursor(&wf, 0, false), (0, None));
        assert_eq!(workflow_cursor(&wf, 1, false), (0, Some(1)));
        // Two epochs done: the val phase after them runs next.
        assert_eq!(workflow_cursor(&wf, 2, false), (1, None));
        assert_eq!(workflow_cursor(&wf, 3, false), (0, Some(1)));
        // Inside epoch 2 (0-based): the training phase, both epochs of it left.
        assert_eq!(workflow_cursor(&wf, 2, true), (0, Some(2)));
        assert_eq!(workflow_cursor(&wf, 0, true), (0, Some(2)));
        assert_eq!(workflow_cursor(&wf, 1, true), (0, Some(1)));
        let wf2 = [(Mode::Train, 1), (Mode::Val, 1), (Mode::Train, 2)];
        assert_eq!(workflow_cursor(&wf2, 1, false), (1, None));
        assert_eq!(workflow_cursor(&wf2, 2, false), (2, Some(1)));
        assert_eq!(workflow_cursor(&wf2, 3, false), (0, None));
        assert_eq!(workflow_cursor(&wf2, 1, true), (2, Some(2)));
    }

    #[test]
    fn vector_norms() {
        assert_eq!(vector_norm(&[3.0, -4.0], 2.0), 5.0);
        assert_eq!(vector_norm(&[3.0, -4.0], f64::INFINITY), 4.0);
        assert!((vector_norm(&[3.0, -4.0], 1.0) - 7.0).abs() < 1e-12);
    }
}
