//! Data: COCO JSON datasets, the synthetic shapes dataset, transforms and a batching
//! loader that prepares the next batches on other threads.
//!
//! Everything here works on [`Sample`]s: an RGB `u8` image in CHW layout with its boxes
//! in pixels. Resizing, normalising and padding into a batch tensor are the model
//! transform's job (`detection::transform`), so that training and inference share it.

pub mod coco;
pub mod image_io;
pub mod loader;
pub mod sampler;
pub mod shapes;
pub mod transforms;

use std::path::Path;

use crate::error::Error;

pub use coco::{CocoDataset, CocoOptions, VerifyImages};
pub use loader::{Batch, Batches, Dataset, InMemory, Loader, LoaderConfig, LoaderState};
pub use sampler::Shard;
pub use shapes::{generate_shapes, generate_shapes_in_memory, ShapesConfig, ShapesData};
pub use transforms::hflip;

/// An image with its ground-truth objects.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    /// RGB pixels, `[3, H, W]` row-major (channel, row, column), 0..255.
    pub image: Vec<u8>,
    /// Image height in pixels.
    pub height: usize,
    /// Image width in pixels.
    pub width: usize,
    /// Boxes `[x1, y1, x2, y2]` in pixels (corners, not COCO's `[x, y, w, h]`), one per
    /// object; crowd regions are not included.
    pub boxes: Vec<[f32; 4]>,
    /// Contiguous class labels `1..=K` (0 is the background), one per box.
    pub labels: Vec<i64>,
    /// The COCO image id.
    pub image_id: i64,
}

impl Sample {
    /// The pixel at channel `c`, row `y`, column `x`.
    pub fn pixel(&self, c: usize, y: usize, x: usize) -> u8 {
        self.image[(c * self.height + y) * self.width + x]
    }
}

/// An error about the content of a data file: formats as "`path`: `msg`", so the
/// message names the file, and `msg` names the item (annotation id, image id, ...).
pub(crate) fn invalid_data(path: &Path, msg: impl Into<String>) -> Error {
    Error::Io {
        path: path.to_path_buf(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, msg.into()),
    }
}

/// An I/O error on `path`.
pub(crate) fn io_error(path: &Path, source: std::io::Error) -> Error {
    Error::Io {
        path: path.to_path_buf(),
        source,
    }
}
