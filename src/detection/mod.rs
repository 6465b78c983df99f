//! Detection building blocks with torchvision's semantics: anchors, box coding,
//! matching, sampling. Boxes are `(x1, y1, x2, y2)` in pixels.

pub mod anchors;
pub mod box_coder;
pub mod matcher;
pub mod sampler;
