//! Faster R-CNN as a [`runner::Model`] and the data loader the runner drives: the
//! glue between the detector and the training loop.

use crate::data::{Loader, LoaderState, Sample};
use crate::detection::transform::image_from_u8;
use crate::detection::{FasterRcnn, Target};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::rng::Rng;
use crate::runner::{self, DataLoader};
use crate::tensor::Tensor;

/// One training or validation batch: images `[3, H, W]` in 0..1 (CPU) and their
/// ground truth in pixels.
#[derive(Clone, Debug)]
pub struct DetBatch {
    /// Images `[3, H, W]` in 0..1.
    pub images: Vec<Tensor>,
    /// Ground truth per image, pixels.
    pub targets: Vec<Target>,
    /// COCO image id per image.
    pub image_ids: Vec<i64>,
}

impl DetBatch {
    /// A batch from loader samples.
    pub fn from_samples(samples: &[Sample]) -> Result<DetBatch> {
        let images = samples
            .iter()
            .map(|s| image_from_u8(&s.image, s.height, s.width))
            .collect::<Result<_>>()?;
        Ok(DetBatch {
            images,
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
}

/// Faster R-CNN wrapped for the [`runner::Runner`]: parameters in
/// `params.trainable_names()` order, every other tensor (BatchNorm running statistics,
/// frozen affine) a buffer. A training step applies the BatchNorm running-statistic
/// updates of its forward pass.
pub struct DetectorModel {
    /// The detector.
    pub model: FasterRcnn,
    /// Where batches are moved before the forward pass.
    pub device: Device,
    names: Vec<String>,
    buffer_names: Vec<String>,
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
        }
    }

    fn images_on_device(&self, batch: &DetBatch) -> Result<Vec<Tensor>> {
        batch
            .images
            .iter()
            .map(|t| t.to_device(self.device))
            .collect()
    }

    fn set_named(&mut self, names: &[String], values: Vec<Tensor>) -> Result<()> {
        if names.len() != values.len() {
            return Err(Error::invalid(
                "DetectorModel",
                format!("{} tensors for {} names", values.len(), names.len()),
            ));
        }
        for (n, t) in names.iter().zip(values) {
            self.model.params.set(n, t)?;
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
        let images = self.images_on_device(batch)?;
        let (losses, updates) = {
            let ctx = self.model.ctx(true);
            let losses = self.model.losses(&ctx, &images, &batch.targets, rng)?;
            (losses, ctx.take_buffer_updates())
        };
        for (n, t) in updates {
            // Running statistics are state, not part of the graph.
            self.model.params.set(&n, t.detach())?;
        }
        Ok(losses)
    }

    fn val_step(&mut self, batch: &DetBatch, rng: &mut Rng) -> Result<Vec<(String, Tensor)>> {
        let images = self.images_on_device(batch)?;
        crate::autograd::no_grad(|| {
            let ctx = self.model.ctx(false);
            self.model.losses(&ctx, &images, &batch.targets, rng)
        })
    }

    fn num_samples(&self, batch: &DetBatch) -> usize {
        batch.images.len()
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
