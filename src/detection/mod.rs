//! Detection building blocks: anchors, box coding, matching, sampling.
pub mod poolers;
