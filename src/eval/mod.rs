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
