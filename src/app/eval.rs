//! COCO evaluation of a detector: detections of a whole dataset as COCO results,
//! pycocotools' numbers, and the runner's evaluation hook.

use std::sync::Arc;

use super::model::{DetBatch, DetectorModel};
use crate::data::Dataset;
use crate::detection::{Detections, FasterRcnn};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::eval::{evaluate_with, CocoEvaluation, DetBox, EvalParams, GroundTruth};
use crate::runner;

/// COCO results of `model` on every image of `dataset`, `batch_size` images per
/// forward pass; `category_id` maps a label `1..=K` to its COCO category id.
pub fn detect_dataset(
    model: &FasterRcnn,
    dataset: &dyn Dataset,
    batch_size: usize,
    device: Device,
    category_id: &dyn Fn(i64) -> Option<i64>,
) -> Result<Vec<(i64, Detections, Vec<DetBox>)>> {
    let all: Vec<usize> = (0..dataset.len()).collect();
    Ok(
        detect_samples(model, dataset, &all, batch_size, device, category_id)?
            .into_iter()
            .map(|(_, id, d, coco)| (id, d, coco))
            .collect(),
    )
}

/// One sample's detections: its index in the dataset, its image id, the detections
/// and the same as COCO results.
pub type SampleDetections = (usize, i64, Detections, Vec<DetBox>);

/// Detections of the samples `indices` of `dataset`, in that order, `batch_size` per
/// forward pass.
pub fn detect_samples(
    model: &FasterRcnn,
    dataset: &dyn Dataset,
    indices: &[usize],
    batch_size: usize,
    device: Device,
    category_id: &dyn Fn(i64) -> Option<i64>,
) -> Result<Vec<SampleDetections>> {
    let mut out = Vec::with_capacity(indices.len());
    for chunk in indices.chunks(batch_size.max(1)) {
        let samples = chunk
            .iter()
            .map(|&i| dataset.get(i))
            .collect::<Result<Vec<_>>>()?;
        let batch = DetBatch::from_samples(&samples)?;
        let images = batch
            .host_images()?
            .iter()
            .map(|t| t.to_device(device))
            .collect::<Result<Vec<_>>>()?;
        let dets = crate::autograd::no_grad(|| model.detect(&images))?;
        for ((d, id), &i) in dets.into_iter().zip(&batch.image_ids).zip(chunk) {
            let coco = to_coco(&d, *id, category_id)?;
            out.push((i, *id, d, coco));
        }
    }
    Ok(out)
}

/// Detections of one image as COCO results (`[x, y, w, h]`, category ids).
pub fn to_coco(
    d: &Detections,
    image_id: i64,
    category_id: &dyn Fn(i64) -> Option<i64>,
) -> Result<Vec<DetBox>> {
    d.boxes
        .iter()
        .zip(&d.scores)
        .zip(&d.labels)
        .map(|((b, &s), &l)| {
            let cat = category_id(l).ok_or_else(|| {
                Error::invalid("to_coco", format!("label {l} has no category id"))
            })?;
            Ok(DetBox {
                image_id,
                category_id: cat,
                bbox: [
                    b[0] as f64,
                    b[1] as f64,
                    (b[2] - b[0]) as f64,
                    (b[3] - b[1]) as f64,
                ],
                score: s as f64,
            })
        })
        .collect()
}

/// Evaluate `model` on `dataset` against `gt` (pycocotools' numbers with `params`,
/// e.g. [`crate::eval::EvalConfig::params`]).
pub fn evaluate_model(
    model: &FasterRcnn,
    dataset: &dyn Dataset,
    gt: &GroundTruth,
    batch_size: usize,
    device: Device,
    category_id: &dyn Fn(i64) -> Option<i64>,
    params: &EvalParams,
) -> Result<CocoEvaluation> {
    let res = detect_dataset(model, dataset, batch_size, device, category_id)?;
    let dets: Vec<DetBox> = res.into_iter().flat_map(|(_, _, c)| c).collect();
    evaluate_with(gt, &dets, params)
}

/// An [`runner::hooks::EvalHook`] function: COCO metrics of the runner's model on
/// `dataset`, as `bbox_mAP`, `bbox_mAP_50`, `bbox_mAP_75`, ... (mmdetection's names),
/// and the pycocotools summary printed to the runner's log.
pub fn coco_eval_fn(
    dataset: Arc<dyn Dataset>,
    gt: GroundTruth,
    batch_size: usize,
    params: EvalParams,
    category_id: Arc<dyn Fn(i64) -> Option<i64>>,
) -> impl FnMut(&mut runner::Runner<DetectorModel>) -> Result<Vec<(String, f64)>> {
    move |r| {
        let ev = evaluate_model(
            &r.model.model,
            dataset.as_ref(),
            &gt,
            batch_size,
            r.model.device,
            category_id.as_ref(),
            &params,
        )?;
        r.log.line(&format!(
            "Evaluating bbox on {} images (maxDets {:?}):\n{}",
            dataset.len(),
            params.max_dets,
            ev.summary().trim_end()
        ));
        Ok(metrics(&ev))
    }
}

/// mmdetection's metric names for the 12 numbers.
pub fn metrics(ev: &CocoEvaluation) -> Vec<(String, f64)> {
    const NAMES: [&str; 6] = [
        "bbox_mAP",
        "bbox_mAP_50",
        "bbox_mAP_75",
        "bbox_mAP_s",
        "bbox_mAP_m",
        "bbox_mAP_l",
    ];
    NAMES
        .iter()
        .zip(ev.stats)
        .map(|(n, v)| (n.to_string(), v))
        .collect()
}
