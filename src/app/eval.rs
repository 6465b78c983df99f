//! COCO evaluation of a detector: detections of a whole dataset as COCO results,
//! pycocotools' numbers, and the runner's evaluation hook.

use std::sync::Arc;

use super::model::{DetBatch, DetectorModel};
use crate::data::Dataset;
use crate::detection::{Detections, FasterRcnn};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::eval::{evaluate, CocoEvaluation, DetBox, GroundTruth};
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
    let mut out = Vec::with_capacity(dataset.len());
    let idx: Vec<usize> = (0..dataset.len()).collect();
    for chunk in idx.chunks(batch_size.max(1)) {
        let samples = chunk
            .iter()
            .map(|&i| dataset.get(i))
            .collect::<Result<Vec<_>>>()?;
        let batch = DetBatch::from_samples(&samples)?;
        let images = batch
            .images
            .iter()
            .map(|t| t.to_device(device))
            .collect::<Result<Vec<_>>>()?;
        let dets = crate::autograd::no_grad(|| model.detect(&images))?;
        for (d, id) in dets.into_iter().zip(&batch.image_ids) {
            let coco = to_coco(&d, *id, category_id)?;
            out.push((*id, d, coco));
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

/// Evaluate `model` on `dataset` against `gt` (pycocotools' numbers).
pub fn evaluate_model(
    model: &FasterRcnn,
    dataset: &dyn Dataset,
    gt: &GroundTruth,
    batch_size: usize,
    device: Device,
    category_id: &dyn Fn(i64) -> Option<i64>,
) -> Result<CocoEvaluation> {
    let res = detect_dataset(model, dataset, batch_size, device, category_id)?;
    let dets: Vec<DetBox> = res.into_iter().flat_map(|(_, _, c)| c).collect();
    evaluate(gt, &dets)
}

/// An [`runner::hooks::EvalHook`] function: COCO metrics of the runner's model on
/// `dataset`, as `bbox_mAP`, `bbox_mAP_50`, `bbox_mAP_75`, ... (mmdetection's names),
/// and the pycocotools summary printed to the runner's log.
pub fn coco_eval_fn(
    dataset: Arc<dyn Dataset>,
    gt: GroundTruth,
    batch_size: usize,
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
        )?;
        r.log.line(&format!(
            "Evaluating bbox on {} images:\n{}",
            dataset.len(),
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
