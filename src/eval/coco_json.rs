//! Reading COCO ground truth and COCO results files for evaluation, and writing
//! results. Lenient like pycocotools: only the fields evaluation uses are required.

use std::collections::HashSet;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::coco_eval::{DetBox, GroundTruth, GtBox};
use crate::data::coco::CocoJson;
use crate::data::{invalid_data, io_error};
use crate::error::Result;

impl GroundTruth {
    /// Read a COCO ground-truth file. Images and categories come from `images` and
    /// `categories`; an annotation without `area` gets `w * h`, without `iscrowd` 0.
    pub fn from_json_file(path: &Path) -> Result<GroundTruth> {
        let json = CocoJson::read(path)?;
        Self::from_json(&json, path)
    }

    /// Ground truth from parsed COCO JSON (`path` names the file in errors).
    pub fn from_json(json: &CocoJson, path: &Path) -> Result<GroundTruth> {
        let annotations = json
            .annotations
            .iter()
            .map(|a| {
                let bbox = a.xywh(path)?;
                Ok(GtBox {
                    id: a.id,
                    image_id: a.image_id,
                    category_id: a.category_id,
                    bbox,
                    area: a.area.unwrap_or(bbox[2] * bbox[3]),
                    iscrowd: a.is_crowd(),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(GroundTruth {
            image_ids: json.images.iter().map(|im| im.id).collect(),
            category_ids: json.categories.iter().map(|c| c.id).collect(),
            annotations,
        })
    }
}

/// One detection in the COCO results format.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct JsonResult {
    /// The image it is in.
    pub image_id: i64,
    /// Its category.
    pub category_id: i64,
    /// `[x, y, w, h]` in pixels.
    pub bbox: Vec<f64>,
    /// Confidence.
    pub score: f64,
}

/// Read a COCO results file (a JSON list of `{image_id, category_id, bbox, score}`).
/// As pycocotools' `loadRes`, results on images that are not in the ground truth are
/// an error. An empty list is allowed (every AP is then 0).
pub fn load_results(path: &Path, gt: &GroundTruth) -> Result<Vec<DetBox>> {
    let text = std::fs::read_to_string(path).map_err(|e| io_error(path, e))?;
    let list: Vec<JsonResult> = serde_json::from_str(&text)
        .map_err(|e| invalid_data(path, format!("malformed COCO results JSON: {e}")))?;
    let images: HashSet<i64> = gt.image_ids.iter().copied().collect();
    list.iter()
        .enumerate()
        .map(|(i, r)| {
            if !images.contains(&r.image_id) {
                return Err(invalid_data(
                    path,
                    format!(
                        "result {i} is on image id {}, which is not in the ground truth",
                        r.image_id
                    ),
                ));
            }
            let bbox = match r.bbox.as_slice() {
                [x, y, w, h] if r.bbox.iter().all(|v| v.is_finite()) => [*x, *y, *w, *h],
                b => {
                    return Err(invalid_data(
                        path,
                        format!("result {i}: bbox {b:?} is not 4 finite numbers [x, y, w, h]"),
                    ))
                }
            };
            if !r.score.is_finite() {
                return Err(invalid_data(
                    path,
                    format!("result {i}: score {} is not finite", r.score),
                ));
            }
            Ok(DetBox {
                image_id: r.image_id,
                category_id: r.category_id,
                bbox,
                score: r.score,
            })
        })
        .collect()
}

/// Write detections as a COCO results file.
pub fn write_results(path: &Path, dets: &[DetBox]) -> Result<()> {
    let list: Vec<JsonResult> = dets
        .iter()
        .map(|d| JsonResult {
            image_id: d.image_id,
            category_id: d.category_id,
            bbox: d.bbox.to_vec(),
            score: d.score,
        })
        .collect();
    let text = serde_json::to_string(&list)
        .map_err(|e| invalid_data(path, format!("cannot serialise results: {e}")))?;
    std::fs::write(path, text).map_err(|e| io_error(path, e))
}
