//! Detection with torchvision's semantics: anchors, box coding, matching, sampling,
//! the transform, RPN, RoI heads and the Faster R-CNN model. Boxes are
//! `(x1, y1, x2, y2)` in pixels.

pub mod anchors;
pub mod box_coder;
pub mod draw;
pub mod faster_rcnn;
pub mod graphed;
pub mod graphed_train;
pub mod matcher;
pub mod poolers;
pub mod proposals;
pub mod roi_heads;
pub mod rpn;
pub mod sampler;
pub mod targets;
pub mod transform;

pub use faster_rcnn::{FasterRcnn, FasterRcnnConfig};

/// Detections of one image: boxes (x1, y1, x2, y2, pixels), scores, labels (1..).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Detections {
    /// Boxes `(x1, y1, x2, y2)`, pixels.
    pub boxes: Vec<[f32; 4]>,
    /// Score of each box.
    pub scores: Vec<f32>,
    /// Class of each box (1.., 0 is background).
    pub labels: Vec<i64>,
}

/// Ground truth of one image: boxes (x1, y1, x2, y2, pixels) and labels (1..).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Target {
    /// Boxes `(x1, y1, x2, y2)`, pixels.
    pub boxes: Vec<[f32; 4]>,
    /// Class of each box (1..).
    pub labels: Vec<i64>,
}
