//! Detection building blocks (anchors, box coding, matching, sampling, RPN, RoI
//! heads, transform) and the Faster R-CNN model.

pub mod box_utils;
pub mod poolers;
pub mod transform;
// Wired in once the ops they use (conv2d, norms, pooling, NMS, RoIAlign) are merged:
// pub mod faster_rcnn; pub mod roi_heads; pub mod rpn;
// pub use faster_rcnn::{FasterRcnn, FasterRcnnConfig};

/// Detections of one image: boxes (x1, y1, x2, y2, pixels), scores, labels (1..).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Detections {
    pub boxes: Vec<[f32; 4]>,
    pub scores: Vec<f32>,
    pub labels: Vec<i64>,
}

/// Ground truth of one image: boxes (x1, y1, x2, y2, pixels) and labels (1..).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Target {
    pub boxes: Vec<[f32; 4]>,
    pub labels: Vec<i64>,
}
