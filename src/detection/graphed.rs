//! Inference with the dense part of the detector captured as a device graph.
//!
//! At a fixed batch shape (the same image sizes every batch, hence the same padded
//! size) the transform, the backbone, the FPN and the RPN head have no
//! data-dependent shape: [`GraphedDetector`] runs them once eagerly (which also
//! fills the caching allocator), captures them as a [`Graph`], and for every later
//! batch copies the 8-bit images into the captured input buffer (one pinned
//! host-to-device copy) and replays the graph (one launch). Proposal selection, the
//! box head and postprocessing follow eagerly on the graph's outputs: their shapes
//! depend on the data.

use crate::autograd::no_grad;
use crate::device::graph::{capture, Graph};
use crate::error::{Error, Result};
use crate::nn::Ctx;
use crate::tensor::Tensor;

use super::rpn::RpnHeadOutput;
use super::transform::{transform_uploaded, upload_u8, ImageList, ImageU8, UploadedBatch};
use super::{Detections, FasterRcnn};

/// What the captured region produces; each replay rewrites these tensors in place.
pub struct DenseOutputs {
    /// The normalised, resized, padded batch.
    pub images: ImageList,
    /// P2..P6.
    pub features: Vec<Tensor>,
    /// RPN objectness and deltas per level.
    pub head: RpnHeadOutput,
}

/// A detector whose transform, backbone, FPN and RPN head replay as one graph
/// (see the module docs).
pub struct GraphedDetector<'m> {
    model: &'m FasterRcnn,
    input: UploadedBatch,
    graph: Graph,
    outputs: DenseOutputs,
}

fn dense(model: &FasterRcnn, input: &UploadedBatch) -> Result<DenseOutputs> {
    let ctx = Ctx::new(&model.params, false);
    let images = transform_uploaded(input)?;
    let c = model.body.forward(&ctx, &images.tensors)?;
    let features = model.fpn.forward(&ctx, &c)?;
    drop(c);
    let head = model.rpn.head(&ctx, &features)?;
    Ok(DenseOutputs {
        images,
        features,
        head,
    })
}

impl<'m> GraphedDetector<'m> {
    /// Capture the dense part for batches shaped like `images` (8-bit CHW), on the
    /// model's device: one eager run (which warms the allocator's cache), then the
    /// capture.
    pub fn new(model: &'m FasterRcnn, images: &[ImageU8]) -> Result<Self> {
        let device = model
            .params
            .iter()
            .next()
            .map(|(_, t)| t.device())
            .ok_or_else(|| Error::invalid("GraphedDetector", "the model has no parameters"))?;
        let input = upload_u8(images, &model.config.transform, device)?;
        no_grad(|| {
            drop(dense(model, &input)?);
            let (graph, outputs) = capture(device, || dense(model, &input))?;
            Ok(GraphedDetector {
                model,
                input,
                graph,
                outputs,
            })
        })
    }

    /// Number of operations in the captured graph.
    pub fn graph_nodes(&self) -> usize {
        self.graph.nodes()
    }

    /// Run the dense part on `images` (same sizes as at capture): one copy into the
    /// captured input buffer and one replay. The results are in [`Self::outputs`].
    pub fn run_dense(&mut self, images: &[ImageU8]) -> Result<&DenseOutputs> {
        self.input.refill(images)?;
        self.graph.replay()?;
        Ok(&self.outputs)
    }

    /// The outputs of the last replay (before the first replay they hold nothing
    /// computed: a capture records the work without running it).
    pub fn outputs(&self) -> &DenseOutputs {
        &self.outputs
    }

    /// Detections for `images` (same sizes as at capture), in original image
    /// pixels: the dense part by replay, the rest eagerly as
    /// [`FasterRcnn::detect`] does it, so the result is `detect`'s bit for bit.
    pub fn detect(&mut self, images: &[ImageU8]) -> Result<Vec<Detections>> {
        self.run_dense(images)?;
        let m = self.model;
        let o = &self.outputs;
        no_grad(|| {
            let ctx = Ctx::new(&m.params, false);
            let il = &o.images;
            let anchors = m.anchors_tensor(il, &o.features)?;
            let proposals = m.rpn.proposals(&o.head, &anchors, &il.image_sizes, false)?;
            let pooled = m
                .roi_heads
                .pool(&o.features[..4], &proposals, &il.image_sizes)?;
            let x = m.roi_heads.box_head(&ctx, &pooled)?;
            let (logits, regs) = m.roi_heads.predictor(&ctx, &x)?;
            let dets = m
                .roi_heads
                .postprocess(&logits, &regs, &proposals, &il.image_sizes)?;
            dets.into_iter()
                .zip(self.input.original_sizes())
                .zip(&il.image_sizes)
                .map(|((d, &orig), &size)| d.resized(size, orig))
                .collect()
        })
    }
}
