//! Faster R-CNN as a [`runner::Model`] and the data loader the runner drives: the
//! glue between the detector and the training loop.

use crate::data::{Loader, LoaderState, Sample};
use crate::detection::graphed_train::GraphedTrainer;
use crate::detection::transform::{image_from_u8, upload_u8, ImageU8};
use crate::detection::{FasterRcnn, Target};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::rng::Rng;
use crate::runner::{self, DataLoader};
use crate::tensor::Tensor;

/// One training or validation batch: images as the loader gives them (u8 pixels)
/// or as f32 tensors, and their ground truth in pixels.
#[derive(Clone, Debug)]
pub struct DetBatch {
    /// Images `[3, H, W]` in 0..1 (host), for batches built from tensors; empty when
    /// the batch holds [`DetBatch::pixels`] (see [`DetBatch::host_images`]).
    pub images: Vec<Tensor>,
    /// Images as u8 pixels (`3 * H * W` bytes, channel-major, then H and W), as the
    /// loader yields them after its augmentation: a step uploads them to the model's
    /// device in one pinned copy and normalises them there. Used instead of
    /// [`DetBatch::images`] when not empty.
    pub pixels: Vec<(Vec<u8>, usize, usize)>,
    /// Ground truth per image, pixels.
    pub targets: Vec<Target>,
    /// COCO image id per image.
    pub image_ids: Vec<i64>,
}

impl DetBatch {
    /// [`DetBatch::pixels`] as 8-bit image views (what [`upload_u8`] takes).
    pub fn u8_views(&self) -> Vec<ImageU8<'_>> {
        self.pixels
            .iter()
            .map(|(data, height, width)| ImageU8 {
                data,
                height: *height,
                width: *width,
            })
            .collect()
    }

    /// A batch from loader samples.
    pub fn from_samples(samples: &[Sample]) -> Result<DetBatch> {
        Ok(DetBatch {
            images: Vec::new(),
            pixels: samples
                .iter()
                .map(|s| (s.image.clone(), s.height, s.width))
                .collect(),
            targets: samples
                .iter()
                .map(|s| Target {
                    boxes: s.boxes.clone(),
                    labels: s.labels.clone(),
                })
                .collect(),
            image_ids: samples.iter().map(|s| s.image_id).collect(),
        })
    }

    /// Number of images.
    pub fn len(&self) -> usize {
        self.images.len().max(self.pixels.len())
    }

    /// True when the batch holds no image.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The images as f32 `[3, H, W]` host tensors in 0..1 (converted from
    /// [`DetBatch::pixels`] when the batch holds those).
    pub fn host_images(&self) -> Result<Vec<Tensor>> {
        if !self.images.is_empty() || self.pixels.is_empty() {
            return Ok(self.images.clone());
        }
        self.pixels
            .iter()
            .map(|(d, h, w)| image_from_u8(d, *h, *w))
            .collect()
    }
}

/// Faster R-CNN wrapped for the [`runner::Runner`]: parameters in
/// `params.trainable_names()` order, every other tensor (BatchNorm running statistics,
/// frozen affine) a buffer. A training step applies the BatchNorm running-statistic
/// updates of its forward pass.
///
/// With [`DetectorModel::with_graphs`] (`runtime.graph`) a training step of a batch
/// of u8 pixels replays captured device graphs ([`GraphedTrainer`]): the first
/// batch of each geometry (the images' sizes, in order) is captured, up to
/// [`GRAPH_GEOMETRIES`] geometries are kept (the least recently used one is dropped
/// for a new one), and each step logs nothing unless it captures. What the graphs
/// cannot run trains eagerly, with one log line saying why: a model on the CPU, in
/// bf16 or with BatchNorm keeping running statistics, and batches of f32 images.
/// Parameters that left the buffers the graphs read (weights loaded or replaced
/// between steps) drop the captured graphs; the next step captures again.
pub struct DetectorModel {
    /// The detector.
    pub model: FasterRcnn,
    /// Where batches are moved before the forward pass.
    pub device: Device,
    names: Vec<String>,
    buffer_names: Vec<String>,
    graphs: Option<GraphCache>,
}

/// Most batch geometries whose captured training steps a [`DetectorModel`] keeps.
pub const GRAPH_GEOMETRIES: usize = 4;

/// The captured training steps of a [`DetectorModel`], least recently used first.
#[derive(Default)]
struct GraphCache {
    trainers: Vec<GraphedTrainer>,
    /// Whether the eager fallback for an unsupported model was logged.
    noted_unsupported: bool,
    /// Whether the eager fallback for f32 image batches was logged.
    noted_f32: bool,
}

impl DetectorModel {
    /// Wrap `model` (already on `device`).
    pub fn new(model: FasterRcnn, device: Device) -> DetectorModel {
        let names = model.params.trainable_names();
        let buffer_names = model
            .params
            .iter()
            .map(|(n, _)| n.clone())
            .filter(|n| !names.contains(n))
            .collect();
        DetectorModel {
            model,
            device,
            names,
            buffer_names,
            graphs: None,
        }
    }

    /// Train through captured graphs when `on` (see the type's docs); off by default.
    pub fn with_graphs(mut self, on: bool) -> DetectorModel {
        self.graphs = on.then(GraphCache::default);
        self
    }

    /// Number of batch geometries captured now.
    pub fn captured_geometries(&self) -> usize {
        self.graphs.as_ref().map_or(0, |g| g.trainers.len())
    }

    /// The captured training steps, least recently used first.
    pub fn graphed_trainers(&self) -> &[GraphedTrainer] {
        self.graphs.as_ref().map_or(&[], |g| &g.trainers)
    }

    fn images_on_device(&self, batch: &DetBatch) -> Result<Vec<Tensor>> {
        batch
            .images
            .iter()
            .map(|t| t.to_device(self.device))
            .collect()
    }

    /// The losses of `batch`: u8 pixels go up in one pinned copy
    /// (`upload_u8`) and are normalised on the device; f32 images are moved one by
    /// one. On the CPU both give the same bits.
    fn batch_losses(
        &self,
        ctx: &crate::nn::Ctx,
        batch: &DetBatch,
        rng: &mut Rng,
    ) -> Result<Vec<(String, Tensor)>> {
        if batch.pixels.is_empty() {
            let images = self.images_on_device(batch)?;
            return self.model.losses(ctx, &images, &batch.targets, rng);
        }
        let images = batch.u8_views();
        let up = upload_u8(&images, &self.model.config.transform, self.device)?;
        self.model.losses_uploaded(ctx, &up, &batch.targets, rng)
    }

    fn set_named(&mut self, names: &[String], values: Vec<Tensor>) -> Result<()> {
        if names.len() != values.len() {
            return Err(Error::invalid(
                "DetectorModel",
                format!("{} tensors for {} names", values.len(), names.len()),
            ));
        }
        for (n, t) in names.iter().zip(values) {
            self.model.params.put(n, t)?;
        }
        Ok(())
    }
}

impl runner::Model for DetectorModel {
    type Batch = DetBatch;

    fn params(&self) -> Vec<(String, Tensor)> {
        self.names
            .iter()
            .map(|n| {
                (
                    n.clone(),
                    self.model.params.get(n).cloned().expect("own name"),
                )
            })
            .collect()
    }

    fn set_params(&mut self, params: Vec<Tensor>) -> Result<()> {
        let names = self.names.clone();
        self.set_named(&names, params)
    }

    fn take_params(&mut self) -> Vec<Tensor> {
        self.names
            .iter()
            .map(|n| self.model.params.take(n).expect("own name"))
            .collect()
    }

    fn buffers(&self) -> Vec<(String, Tensor)> {
        self.buffer_names
            .iter()
            .map(|n| {
                (
                    n.clone(),
                    self.model.params.get(n).cloned().expect("own name"),
                )
            })
            .collect()
    }

    fn set_buffers(&mut self, buffers: Vec<Tensor>) -> Result<()> {
        let names = self.buffer_names.clone();
        self.set_named(&names, buffers)
    }

    fn train_step(&mut self, batch: &DetBatch, rng: &mut Rng) -> Result<Vec<(String, Tensor)>> {
        let (losses, updates) = {
            let ctx = self.model.ctx(true);
            let losses = self.batch_losses(&ctx, batch, rng)?;
            (losses, ctx.take_buffer_updates())
        };
        for (n, t) in updates {
            // Running statistics are state, not part of the graph.
            self.model.params.set(&n, t.detach())?;
        }
        Ok(losses)
    }

    fn val_step(&mut self, batch: &DetBatch, rng: &mut Rng) -> Result<Vec<(String, Tensor)>> {
        crate::autograd::no_grad(|| {
            let ctx = self.model.ctx(false);
            self.batch_losses(&ctx, batch, rng)
        })
    }

    fn num_samples(&self, batch: &DetBatch) -> usize {
        batch.len()
    }

    fn trains_through_graphs(&self) -> bool {
        self.graphs.is_some() && GraphedTrainer::unsupported(&self.model).is_none()
    }

    fn graphed_train_step(
        &mut self,
        batch: &DetBatch,
        rng: &mut Rng,
        log: &mut dyn FnMut(&str),
    ) -> Result<Option<runner::GraphedStep>> {
        let Some(cache) = self.graphs.as_mut() else {
            return Ok(None);
        };
        if let Some(why) = GraphedTrainer::unsupported(&self.model) {
            if !cache.noted_unsupported {
                log(&format!("runtime.graph: training eagerly: {why}"));
                cache.noted_unsupported = true;
            }
            return Ok(None);
        }
        if batch.pixels.is_empty() {
            if !cache.noted_f32 {
                log(
                    "runtime.graph: batches of f32 images train eagerly (the graphs take the \
                     loader's u8 pixels)",
                );
                cache.noted_f32 = true;
            }
            return Ok(None);
        }
        let images = batch.u8_views();
        let sizes: Vec<(usize, usize)> = images.iter().map(|i| (i.height, i.width)).collect();
        if cache
            .trainers
            .iter()
            .any(|t| !t.reads_params_of(&self.model))
        {
            log(&format!(
                "runtime.graph: the parameters left the buffers the graphs read (weights \
                 loaded or replaced): dropping {} captured geometr{}",
                cache.trainers.len(),
                if cache.trainers.len() == 1 {
                    "y"
                } else {
                    "ies"
                }
            ));
            cache.trainers.clear();
        }
        let mut trainer = match cache.trainers.iter().position(|t| t.image_sizes() == sizes) {
            Some(i) => cache.trainers.remove(i),
            None => {
                if cache.trainers.len() >= GRAPH_GEOMETRIES {
                    let old = cache.trainers.remove(0);
                    log(&format!(
                        "runtime.graph: dropping the least recently used geometry {:?} \
                         (keeping {GRAPH_GEOMETRIES})",
                        old.image_sizes()
                    ));
                }
                log(&format!(
                    "runtime.graph: capturing the training step of {} images of sizes {sizes:?}",
                    sizes.len()
                ));
                GraphedTrainer::new(&self.model, &images, &batch.targets)?
            }
        };
        let step = trainer.forward_backward(&self.model, &images, &batch.targets, rng);
        cache.trainers.push(trainer);
        let step = step?;
        Ok(Some(runner::GraphedStep {
            values: step.losses,
            grads: step.grads,
            fixed: step.fixed,
        }))
    }
}

/// The threaded, resumable [`Loader`] as a runner [`DataLoader`] of [`DetBatch`]es.
pub struct DetLoader {
    loader: Loader,
    batches: Option<crate::data::Batches>,
    skipped: Vec<String>,
}

impl DetLoader {
    /// Over `loader`.
    pub fn new(loader: Loader) -> DetLoader {
        DetLoader {
            loader,
            batches: None,
            skipped: Vec::new(),
        }
    }
}

impl DataLoader for DetLoader {
    type Batch = DetBatch;

    fn len(&self) -> usize {
        self.loader.batches_per_epoch()
    }

    fn start(&mut self, epoch: u64, position: usize) -> Result<()> {
        // Stop the previous workers before starting new ones.
        self.batches = None;
        self.batches = Some(self.loader.resume_epoch(LoaderState {
            epoch,
            batch: position,
        }));
        Ok(())
    }

    fn next_batch(&mut self) -> Option<Result<DetBatch>> {
        let b = self.batches.as_mut()?.next()?;
        Some(b.and_then(|mut b| {
            self.skipped.append(&mut b.skipped);
            DetBatch::from_samples(&b.samples)
        }))
    }

    fn take_skipped(&mut self) -> Vec<String> {
        std::mem::take(&mut self.skipped)
    }
}
