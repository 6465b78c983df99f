//! Inference of a whole batch captured as one device graph.
//!
//! At a fixed batch shape (the same image sizes every batch, hence the same padded
//! size) nothing of inference has a data-dependent shape once the tail is padded
//! ([`FasterRcnn::detect_packed`]: proposals padded to `post_nms_top_n_test` rows
//! with their counts on the device, the box head on every row, padding masked out of
//! the detection selection, the result packed into one buffer). [`GraphedDetector`]
//! runs the pass once eagerly (which fills the caching allocator and the device's
//! constant tables), captures everything from the uploaded 8-bit images to the
//! packed detections as one [`Graph`], and for every later batch does exactly:
//! one pinned host-to-device copy into the captured input buffer, one graph launch,
//! one device-to-host copy of the packed detections.

use crate::autograd::no_grad;
use crate::device::graph::{capture, Graph};
use crate::error::{Error, Result};

use super::faster_rcnn::PackedPass;
use super::transform::{transform_uploaded, upload_u8, ImageList, ImageU8, UploadedBatch};
use super::{Detections, FasterRcnn};

/// What the captured region produces; each replay rewrites these tensors in place.
pub struct CapturedOutputs {
    /// The normalised, resized, padded batch.
    pub images: ImageList,
    /// Features, padded proposals and the packed detections.
    pub pass: PackedPass,
}

/// A detector whose whole inference replays as one graph (see the module docs).
pub struct GraphedDetector<'m> {
    input: UploadedBatch,
    graph: Graph,
    outputs: CapturedOutputs,
    _model: std::marker::PhantomData<&'m FasterRcnn>,
}

fn whole(model: &FasterRcnn, input: &UploadedBatch) -> Result<CapturedOutputs> {
    let images = transform_uploaded(input)?;
    let pass = model.detect_packed(&images)?;
    Ok(CapturedOutputs { images, pass })
}

impl<'m> GraphedDetector<'m> {
    /// Capture the inference of batches shaped like `images` (8-bit CHW), on the
    /// model's device: one eager run (which warms the allocator's cache and uploads
    /// the batch geometry's constant tables), then the capture. The graph keeps
    /// reading the model's weights: they must not be replaced while it lives (the
    /// borrow of `model` sees to that).
    pub fn new(model: &'m FasterRcnn, images: &[ImageU8]) -> Result<Self> {
        let device = model
            .params
            .iter()
            .next()
            .map(|(_, t)| t.device())
            .ok_or_else(|| Error::invalid("GraphedDetector", "the model has no parameters"))?;
        let input = upload_u8(images, &model.config.transform, device)?;
        no_grad(|| {
            drop(whole(model, &input)?);
            let (graph, outputs) = capture(device, || whole(model, &input))?;
            Ok(GraphedDetector {
                input,
                graph,
                outputs,
                _model: std::marker::PhantomData,
            })
        })
    }

    /// Number of operations in the captured graph.
    pub fn graph_nodes(&self) -> usize {
        self.graph.nodes()
    }

    /// Run the captured inference on `images` (same sizes as at capture): one copy
    /// into the captured input buffer and one replay, nothing read back. The
    /// results are in [`Self::outputs`].
    pub fn replay(&mut self, images: &[ImageU8]) -> Result<&CapturedOutputs> {
        self.input.refill(images)?;
        self.graph.replay()?;
        Ok(&self.outputs)
    }

    /// The outputs of the last replay (before the first replay they hold nothing
    /// computed: a capture records the work without running it).
    pub fn outputs(&self) -> &CapturedOutputs {
        &self.outputs
    }

    /// Detections for `images` (same sizes as at capture), in original image
    /// pixels: [`Self::replay`], then one read of the packed detections. The result
    /// is [`FasterRcnn::detect_u8`]'s bit for bit (the same kernels on the same
    /// shapes).
    pub fn detect(&mut self, images: &[ImageU8]) -> Result<Vec<Detections>> {
        self.replay(images)?;
        let read = self.outputs.pass.packed.read()?;
        read.detections
            .into_iter()
            .zip(self.input.original_sizes())
            .zip(&self.outputs.images.image_sizes)
            .map(|((d, &orig), &size)| d.resized(size, orig))
            .collect()
    }
}
