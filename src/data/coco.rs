//! COCO JSON datasets: images (PNG, JPEG), annotations, categories.
//!
//! Category ids (any integers, e.g. COCO's 1..90 with gaps) map to contiguous labels
//! `1..=K` in ascending id order; label 0 is the background. Images without
//! annotations are kept (they are negatives). Crowd regions stay in the annotations
//! (evaluation needs them) but are left out of training targets, as torchvision's
//! reference scripts do.
//!
//! Every problem in the input is an error that names the file and the item (annotation
//! id, image id, category id); nothing panics on bad input.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::image_io::{image_dims, load_rgb};
use super::{invalid_data, io_error, Sample};
use crate::error::{Error, Result};

/// A box may overshoot the image by this much (pixels) and is then clamped: COCO's own
/// annotations overshoot by fractions of a pixel. Beyond it the box is an error.
pub const BOX_TOLERANCE: f64 = 1.0;

/// The narrowest box side (pixels, after clamping to the image) a training
/// annotation may have. Thinner boxes are annotation errors that break training far
/// from their cause (the box coder's log of the width diverges), so they are refused
/// when the dataset is opened, naming the annotation. Zero-area boxes are refused too;
/// crowd regions are not training targets and are not checked.
pub const MIN_BOX_SIDE: f64 = 1e-2;

// ---------------------------------------------------------------------------------
// The file format, as read (lenient: only what is needed is required).
// ---------------------------------------------------------------------------------

/// A COCO JSON file: `images`, `annotations`, `categories` (other keys are ignored).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct CocoJson {
    /// The `images` list.
    #[serde(default)]
    pub images: Vec<JsonImage>,
    /// The `annotations` list.
    #[serde(default)]
    pub annotations: Vec<JsonAnnotation>,
    /// The `categories` list.
    #[serde(default)]
    pub categories: Vec<JsonCategory>,
}

/// One entry of `images`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct JsonImage {
    /// The image id that annotations refer to.
    pub id: i64,
    /// Path relative to the image directory; required on load.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file_name: Option<String>,
    /// Width in pixels; read from the image when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub width: Option<u64>,
    /// Height in pixels; read from the image when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub height: Option<u64>,
}

/// One entry of `annotations`; `bbox` is `[x, y, w, h]` in pixels.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct JsonAnnotation {
    /// The annotation's id, unique in the file.
    pub id: i64,
    /// The `id` of the image the object is in.
    pub image_id: i64,
    /// The `id` of the object's category.
    pub category_id: i64,
    /// `[x, y, w, h]` in pixels, `(x, y)` the top-left corner; required on load.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bbox: Option<Vec<f64>>,
    /// Object area in pixels² (COCO: the segmentation's area); `w * h` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub area: Option<f64>,
    /// 0/1 (or a JSON bool); 0 when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iscrowd: Option<serde_json::Value>,
}

/// One entry of `categories`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct JsonCategory {
    /// The category id that annotations refer to (not necessarily contiguous).
    pub id: i64,
    /// The category's name, e.g. `person`.
    #[serde(default)]
    pub name: String,
}

impl JsonAnnotation {
    /// Whether the annotation is a crowd region (`iscrowd` nonzero or true).
    pub fn is_crowd(&self) -> bool {
        match &self.iscrowd {
            Some(serde_json::Value::Bool(b)) => *b,
            Some(serde_json::Value::Number(n)) => n.as_f64().is_some_and(|v| v != 0.0),
            _ => false,
        }
    }

    /// The `[x, y, w, h]` box, or an error naming the annotation when it is missing,
    /// not 4 numbers, or not finite.
    pub fn xywh(&self, path: &Path) -> Result<[f64; 4]> {
        let b = self
            .bbox
            .as_deref()
            .ok_or_else(|| invalid_data(path, format!("annotation id {} has no bbox", self.id)))?;
        match b {
            [x, y, w, h] if b.iter().all(|v| v.is_finite()) => Ok([*x, *y, *w, *h]),
            _ => Err(invalid_data(
                path,
                format!(
                    "annotation id {}: bbox {b:?} is not 4 finite numbers [x, y, w, h]",
                    self.id
                ),
            )),
        }
    }
}

impl CocoJson {
    /// Read and parse a COCO JSON file. Malformed or truncated JSON is an error naming
    /// the file with the line and column.
    pub fn read(path: &Path) -> Result<CocoJson> {
        let bytes = std::fs::read(path).map_err(|e| io_error(path, e))?;
        Self::parse(&bytes, path)
    }

    /// Parse COCO JSON from bytes (UTF-8 checked by the parser); `path` names the
    /// source in errors.
    pub fn parse(bytes: &[u8], path: &Path) -> Result<CocoJson> {
        serde_json::from_slice(bytes)
            .map_err(|e| invalid_data(path, format!("malformed COCO JSON: {e}")))
    }

    /// Write as JSON.
    pub fn write(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_string(self)
            .map_err(|e| invalid_data(path, format!("cannot serialise COCO JSON: {e}")))?;
        std::fs::write(path, text).map_err(|e| io_error(path, e))
    }
}

// ---------------------------------------------------------------------------------
// The validated dataset.
// ---------------------------------------------------------------------------------

/// How much of each image file [`CocoDataset::open`] checks up front.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum VerifyImages {
    /// Only that the file exists.
    Exists,
    /// That the file exists and its header gives a size (cheap; the default).
    #[default]
    Header,
    /// Decode every image once (in parallel): finds truncated or corrupt pixel data.
    Decode,
}

/// Options for [`CocoDataset::open`].
#[derive(Clone, Copy, Debug, Default)]
pub struct CocoOptions {
    /// Drop images that fail the check of [`CocoOptions::verify`] (with a warning on
    /// stderr) instead of failing.
    pub skip_bad_images: bool,
    /// How far to check images when opening.
    pub verify: VerifyImages,
    /// Accept `file_name`s that leave the image directory (absolute paths or `..`
    /// components). Off by default: an annotation file should not make the engine
    /// read arbitrary files.
    pub allow_outside_image_dir: bool,
}

/// An image of the dataset.
#[derive(Clone, Debug, PartialEq)]
pub struct CocoImage {
    /// The COCO image id.
    pub id: i64,
    /// Path relative to the image directory.
    pub file_name: String,
    /// Width in pixels.
    pub width: usize,
    /// Height in pixels.
    pub height: usize,
}

/// A category: its COCO id, name and contiguous label (`1..=K`).
#[derive(Clone, Debug, PartialEq)]
pub struct CocoCategory {
    /// The COCO category id, as in the file.
    pub id: i64,
    /// The category's name.
    pub name: String,
    /// Contiguous label `1..=K` (0 is background), in ascending COCO id order.
    pub label: i64,
}

/// A validated annotation.
#[derive(Clone, Debug, PartialEq)]
pub struct CocoAnnotation {
    /// The COCO annotation id.
    pub id: i64,
    /// The COCO id of the image the object is in.
    pub image_id: i64,
    /// The COCO id of the object's category.
    pub category_id: i64,
    /// Contiguous label `1..=K`.
    pub label: i64,
    /// `[x, y, w, h]` in pixels, as in the file.
    pub bbox: [f64; 4],
    /// Area in pixels² (`area` of the file, else `w * h`).
    pub area: f64,
    /// A crowd region (`iscrowd` nonzero): left out of training targets; in COCO eval never
    /// a false negative, and a detection on it is ignored.
    pub iscrowd: bool,
}

/// A COCO dataset, checked on opening (see the module docs).
#[derive(Clone, Debug)]
pub struct CocoDataset {
    json_path: PathBuf,
    image_dir: PathBuf,
    images: Vec<CocoImage>,
    /// Annotations of `images[i]`, in file order.
    anns: Vec<Vec<CocoAnnotation>>,
    /// Sorted by id; `categories[k].label == k + 1`.
    categories: Vec<CocoCategory>,
    /// Whether a loader skips images that fail to decode (`skip_bad_images`).
    skip_bad_images: bool,
}

impl CocoDataset {
    /// Open `json_path`, with image files under `image_dir`.
    pub fn open(json_path: &Path, image_dir: &Path, opts: CocoOptions) -> Result<Self> {
        let json = CocoJson::read(json_path)?;
        Self::from_json(json, json_path, image_dir, opts)
    }

    /// Open a dataset laid out as `dir/annotations.json` + `dir/images/` (what
    /// [`crate::data::generate_shapes`] writes).
    pub fn open_dir(dir: &Path, opts: CocoOptions) -> Result<Self> {
        Self::open(&dir.join("annotations.json"), &dir.join("images"), opts)
    }

    /// Validate parsed JSON. `json_path` names the file in errors.
    pub fn from_json(
        json: CocoJson,
        json_path: &Path,
        image_dir: &Path,
        opts: CocoOptions,
    ) -> Result<Self> {
        let p = json_path;
        let categories = contiguous_categories(&json.categories, p)?;
        if json.images.is_empty() {
            return Err(invalid_data(p, "empty dataset: no images"));
        }
        let label_of: HashMap<i64, i64> = categories.iter().map(|c| (c.id, c.label)).collect();
        let mut index_of: HashMap<i64, usize> = HashMap::new();
        for (i, im) in json.images.iter().enumerate() {
            if index_of.insert(im.id, i).is_some() {
                return Err(invalid_data(p, format!("image id {} appears twice", im.id)));
            }
        }
        let images = check_images(&json.images, p, image_dir, opts)?;
        let mut anns: Vec<Vec<CocoAnnotation>> = vec![Vec::new(); json.images.len()];
        for a in &json.annotations {
            let i = *index_of.get(&a.image_id).ok_or_else(|| {
                invalid_data(
                    p,
                    format!(
                        "annotation id {} points at image id {}, which is not in `images`",
                        a.id, a.image_id
                    ),
                )
            })?;
            let label = *label_of.get(&a.category_id).ok_or_else(|| {
                invalid_data(
                    p,
                    format!(
                        "annotation id {} has unknown category id {} (categories: {:?})",
                        a.id,
                        a.category_id,
                        categories.iter().map(|c| c.id).collect::<Vec<_>>()
                    ),
                )
            })?;
            // An annotation of a skipped image goes with it.
            let Some(im) = &images[i] else { continue };
            let bbox = a.xywh(p)?;
            check_box(&bbox, a.id, im, p)?;
            if !a.is_crowd() {
                check_box_size(&bbox, a.id, im, p)?;
            }
            anns[i].push(CocoAnnotation {
                id: a.id,
                image_id: a.image_id,
                category_id: a.category_id,
                label,
                bbox,
                area: a.area.unwrap_or(bbox[2] * bbox[3]),
                iscrowd: a.is_crowd(),
            });
        }
        let (images, anns): (Vec<CocoImage>, Vec<Vec<CocoAnnotation>>) = images
            .into_iter()
            .zip(anns)
            .filter_map(|(im, a)| im.map(|im| (im, a)))
            .unzip();
        if images.is_empty() {
            return Err(invalid_data(
                p,
                "empty dataset: every image was skipped as unreadable",
            ));
        }
        Ok(CocoDataset {
            json_path: p.to_path_buf(),
            image_dir: image_dir.to_path_buf(),
            images,
            anns,
            categories,
            skip_bad_images: opts.skip_bad_images,
        })
    }

    /// Check that a model with `num_classes` classes (background included, as in
    /// torchvision) can learn every category: labels run `1..=K`, so it needs
    /// `num_classes >= K + 1`. The error names the first category left out.
    pub fn check_num_classes(&self, num_classes: usize) -> Result<()> {
        match self
            .categories
            .iter()
            .find(|c| c.label as usize >= num_classes)
        {
            Some(c) => Err(invalid_data(
                &self.json_path,
                format!(
                    "category id {} ({:?}) gets label {}, but the model has num_classes = \
                     {num_classes} (labels 1..{num_classes} after the background 0): the \
                     {} categories need num_classes = {}",
                    c.id,
                    c.name,
                    c.label,
                    self.categories.len(),
                    self.categories.len() + 1
                ),
            )),
            None => Ok(()),
        }
    }

    /// Number of images.
    pub fn len(&self) -> usize {
        self.images.len()
    }

    /// Whether there are no images (never true for an opened dataset).
    pub fn is_empty(&self) -> bool {
        self.images.is_empty()
    }

    /// The annotation file.
    pub fn json_path(&self) -> &Path {
        &self.json_path
    }

    /// The images, in file order (skipped ones removed).
    pub fn images(&self) -> &[CocoImage] {
        &self.images
    }

    /// The categories sorted by id; `categories()[k]` has label `k + 1`.
    pub fn categories(&self) -> &[CocoCategory] {
        &self.categories
    }

    /// Number of object classes K (labels `1..=K`; the model has K + 1 with background).
    pub fn num_classes(&self) -> usize {
        self.categories.len()
    }

    /// The contiguous label of a COCO category id.
    pub fn label_of(&self, category_id: i64) -> Option<i64> {
        self.categories
            .iter()
            .find(|c| c.id == category_id)
            .map(|c| c.label)
    }

    /// The COCO category id of a contiguous label `1..=K`.
    pub fn category_id(&self, label: i64) -> Option<i64> {
        usize::try_from(label - 1)
            .ok()
            .and_then(|k| self.categories.get(k))
            .map(|c| c.id)
    }

    /// The annotations of image `index` (crowd included).
    pub fn annotations(&self, index: usize) -> &[CocoAnnotation] {
        &self.anns[index]
    }

    /// The path of image `index`'s file.
    pub fn image_path(&self, index: usize) -> PathBuf {
        self.image_dir.join(&self.images[index].file_name)
    }

    /// Training targets of image `index`: boxes `[x1, y1, x2, y2]` clamped to the
    /// image, and labels; crowd regions and boxes of zero width or height left out.
    pub fn target(&self, index: usize) -> (Vec<[f32; 4]>, Vec<i64>) {
        let im = &self.images[index];
        let (w, h) = (im.width as f64, im.height as f64);
        let mut boxes = Vec::new();
        let mut labels = Vec::new();
        for a in self.anns[index].iter().filter(|a| !a.iscrowd) {
            let [x, y, bw, bh] = a.bbox;
            let b = [
                x.clamp(0.0, w),
                y.clamp(0.0, h),
                (x + bw).clamp(0.0, w),
                (y + bh).clamp(0.0, h),
            ];
            if b[2] > b[0] && b[3] > b[1] {
                boxes.push(b.map(|v| v as f32));
                labels.push(a.label);
            }
        }
        (boxes, labels)
    }

    /// Load image `index` and its targets. A missing or corrupt file is an error
    /// naming it.
    pub fn load(&self, index: usize) -> Result<Sample> {
        let im = self.images.get(index).ok_or_else(|| {
            Error::invalid(
                "CocoDataset::load",
                format!("index {index} out of range for {} images", self.len()),
            )
        })?;
        let path = self.image_path(index);
        let rgb = load_rgb(&path)?;
        if (rgb.width, rgb.height) != (im.width, im.height) {
            return Err(size_mismatch(&path, im, rgb.width, rgb.height));
        }
        let (boxes, labels) = self.target(index);
        Ok(Sample {
            image: rgb.data,
            height: rgb.height,
            width: rgb.width,
            boxes,
            labels,
            image_id: im.id,
        })
    }

    /// The ground truth for COCO evaluation (every annotation, crowd included, with
    /// its original box and area).
    pub fn ground_truth(&self) -> crate::eval::GroundTruth {
        crate::eval::GroundTruth {
            image_ids: self.images.iter().map(|im| im.id).collect(),
            category_ids: self.categories.iter().map(|c| c.id).collect(),
            annotations: self
                .anns
                .iter()
                .flatten()
                .map(|a| crate::eval::GtBox {
                    id: a.id,
                    image_id: a.image_id,
                    category_id: a.category_id,
                    bbox: a.bbox,
                    area: a.area,
                    iscrowd: a.iscrowd,
                })
                .collect(),
        }
    }
}

impl super::loader::Dataset for CocoDataset {
    fn len(&self) -> usize {
        self.images.len()
    }
    fn get(&self, index: usize) -> Result<Sample> {
        self.load(index)
    }
    fn skips_bad_samples(&self) -> bool {
        self.skip_bad_images
    }
}

/// Categories sorted by id with labels `1..=K`; duplicates and an empty list are errors.
fn contiguous_categories(cats: &[JsonCategory], p: &Path) -> Result<Vec<CocoCategory>> {
    if cats.is_empty() {
        return Err(invalid_data(p, "empty dataset: no categories"));
    }
    let mut by_id = BTreeMap::new();
    for c in cats {
        if by_id.insert(c.id, c.name.clone()).is_some() {
            return Err(invalid_data(
                p,
                format!("category id {} appears twice", c.id),
            ));
        }
    }
    Ok(by_id
        .into_iter()
        .enumerate()
        .map(|(k, (id, name))| CocoCategory {
            id,
            name,
            label: k as i64 + 1,
        })
        .collect())
}

/// Check every image file (in parallel). `None` marks an image skipped under
/// `skip_bad_images`; otherwise the first bad image (in file order) is the error.
fn check_images(
    images: &[JsonImage],
    p: &Path,
    image_dir: &Path,
    opts: CocoOptions,
) -> Result<Vec<Option<CocoImage>>> {
    let checked: Vec<Result<CocoImage>> = images
        .par_iter()
        .map(|im| check_image(im, p, image_dir, opts))
        .collect();
    let mut out = Vec::with_capacity(images.len());
    for r in checked {
        match r {
            Ok(im) => out.push(Some(im)),
            // A path that leaves the image directory is not an unreadable image: it is
            // refused even under skip_bad_images.
            Err(e) if opts.skip_bad_images && !is_escape(&e) => {
                eprintln!("warning: skipping image: {e}");
                out.push(None);
            }
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

/// Marks the error of a `file_name` that leaves the image directory.
const ESCAPE: &str = "leaves the image directory";

fn is_escape(e: &Error) -> bool {
    e.to_string().contains(ESCAPE)
}

fn check_image(im: &JsonImage, p: &Path, dir: &Path, opts: CocoOptions) -> Result<CocoImage> {
    let verify = opts.verify;
    let name = im
        .file_name
        .clone()
        .ok_or_else(|| invalid_data(p, format!("image id {} has no file_name", im.id)))?;
    let escapes = Path::new(&name).components().any(|c| {
        matches!(
            c,
            std::path::Component::ParentDir
                | std::path::Component::RootDir
                | std::path::Component::Prefix(_)
        )
    });
    if name.is_empty() || (escapes && !opts.allow_outside_image_dir) {
        return Err(invalid_data(
            p,
            format!(
                "image id {}: file_name {name:?} {} (absolute, `..` or empty); set \
                 data.allow_outside_image_dir = true to allow absolute and `..` paths",
                im.id,
                if name.is_empty() {
                    "is empty and"
                } else {
                    ESCAPE
                }
            ),
        ));
    }
    let path = dir.join(&name);
    let with_size = |w: usize, h: usize| CocoImage {
        id: im.id,
        file_name: name.clone(),
        width: w,
        height: h,
    };
    let (w, h) = match (verify, im.width, im.height) {
        (VerifyImages::Exists, Some(w), Some(h)) => {
            std::fs::metadata(&path).map_err(|e| io_error(&path, e))?;
            (w as usize, h as usize)
        }
        // Without a size in the JSON the header is the only source of it.
        (VerifyImages::Exists | VerifyImages::Header, _, _) => image_dims(&path)?,
        (VerifyImages::Decode, _, _) => {
            let rgb = load_rgb(&path)?;
            (rgb.width, rgb.height)
        }
    };
    match (im.width, im.height) {
        (Some(jw), Some(jh)) if (jw as usize, jh as usize) != (w, h) => {
            let want = with_size(jw as usize, jh as usize);
            Err(size_mismatch(&path, &want, w, h))
        }
        _ => Ok(with_size(w, h)),
    }
}

fn size_mismatch(path: &Path, im: &CocoImage, w: usize, h: usize) -> Error {
    invalid_data(
        path,
        format!(
            "image id {} is {w}x{h} pixels but the annotation file says {}x{}",
            im.id, im.width, im.height
        ),
    )
}

/// A training box, clamped to the image, must be at least [`MIN_BOX_SIDE`] wide and
/// high.
fn check_box_size(b: &[f64; 4], ann_id: i64, im: &CocoImage, p: &Path) -> Result<()> {
    let [x, y, w, h] = *b;
    let (iw, ih) = (im.width as f64, im.height as f64);
    let cw = (x + w).clamp(0.0, iw) - x.clamp(0.0, iw);
    let ch = (y + h).clamp(0.0, ih) - y.clamp(0.0, ih);
    if cw < MIN_BOX_SIDE || ch < MIN_BOX_SIDE {
        return Err(invalid_data(
            p,
            format!(
                "annotation id {ann_id} (image id {}): bbox {b:?} is {cw}x{ch} pixels inside \
                 the image, below the {MIN_BOX_SIDE}-pixel minimum (a degenerate box; mark \
                 it iscrowd or remove it)",
                im.id
            ),
        ));
    }
    Ok(())
}

/// A box must have non-negative width and height and lie inside the image (within
/// [`BOX_TOLERANCE`]).
fn check_box(b: &[f64; 4], ann_id: i64, im: &CocoImage, p: &Path) -> Result<()> {
    let [x, y, w, h] = *b;
    if w < 0.0 || h < 0.0 {
        return Err(invalid_data(
            p,
            format!("annotation id {ann_id}: bbox {b:?} has a negative width or height"),
        ));
    }
    let t = BOX_TOLERANCE;
    let (iw, ih) = (im.width as f64, im.height as f64);
    if x < -t || y < -t || x + w > iw + t || y + h > ih + t {
        return Err(invalid_data(
            p,
            format!(
                "annotation id {ann_id}: bbox {b:?} lies outside image id {} ({}x{})",
                im.id, im.width, im.height
            ),
        ));
    }
    Ok(())
}
