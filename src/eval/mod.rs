//! COCO box evaluation (AP@[.5:.95], AP50, AP75, APs/m/l, AR1/10/100, ARs/m/l),
//! computed exactly as pycocotools' `COCOeval(gt, dt, "bbox")` does.
//!
//! ```no_run
//! use kestrel::eval::{evaluate, format_summary, load_results, GroundTruth};
//! let gt = GroundTruth::from_json_file("gt.json".as_ref())?;
//! let dets = load_results("results.json".as_ref(), &gt)?;
//! let ev = evaluate(&gt, &dets)?;
//! print!("{}", format_summary(&ev.stats));
//! # Ok::<(), kestrel::Error>(())
//! ```

pub mod coco_eval;
pub mod coco_json;

pub use coco_eval::{
    evaluate, evaluate_with, format_summary, CocoEvaluation, DetBox, EvalParams, GroundTruth,
    GtBox, STAT_NAMES,
};
pub use coco_json::{load_results, write_results};

/// The `[eval]` section of a config.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EvalConfig {
    /// Detections per image the evaluation counts (pycocotools' maxDets, the third of
    /// `[1, 10, max_dets]`): 100 by default, as pycocotools; raise it with
    /// `roi.detections_per_img` for dense scenes, or AP undercounts the detector.
    pub max_dets: usize,
}

impl Default for EvalConfig {
    fn default() -> Self {
        EvalConfig { max_dets: 100 }
    }
}

impl EvalConfig {
    /// pycocotools' parameters with maxDets `[1, 10, max_dets]`.
    pub fn params(&self) -> EvalParams {
        EvalParams {
            max_dets: vec![1, 10, self.max_dets],
            ..EvalParams::default()
        }
    }
}
