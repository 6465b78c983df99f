//! A synthetic detection dataset: random rectangles, ellipses and triangles of several
//! sizes and colours, some overlapping, on solid, gradient or radial backgrounds with
//! pixel noise. Deterministic by seed: image `i` depends only on `(seed, i)` and the
//! settings, so a smaller `count` gives a prefix of a larger one.
//!
//! Labels are exact: every pixel belongs to the last shape painted on it, and each
//! object's box and area are those of the pixels it still shows (as COCO's `area` is
//! the area of the visible segmentation). A shape that would hide too much of an
//! earlier one is placed elsewhere.

use std::path::{Path, PathBuf};

use rayon::prelude::*;

use super::coco::{CocoJson, JsonAnnotation, JsonCategory, JsonImage};
use super::image_io::save_png;
use super::loader::Dataset;
use super::{io_error, Sample};
use crate::error::{Error, Result};
use crate::eval::GroundTruth;
use crate::rng::Rng;

/// Class names; category id = label = index + 1.
pub const SHAPE_CLASSES: [&str; 3] = ["rectangle", "ellipse", "triangle"];

/// Largest side of a generated shapes image, pixels. Images are rendered in memory
/// (3 bytes a pixel, one per thread at a time): 4096 takes 48 MiB, where an
/// unbounded size would abort the process on allocation.
pub const MAX_SHAPES_IMAGE_SIZE: usize = 4096;

/// Settings of the generator.
#[derive(Clone, Debug, PartialEq)]
pub struct ShapesConfig {
    /// Seed of the generator; image `i` depends only on `(seed, i)` and the other settings.
    pub seed: u64,
    /// Number of images.
    pub count: usize,
    /// Images are `image_size x image_size` pixels.
    pub image_size: usize,
    /// Objects per image, drawn uniformly in `min_objects..=max_objects`.
    pub min_objects: usize,
    /// Upper bound of the objects per image (inclusive).
    pub max_objects: usize,
    /// Object size (geometric mean of box width and height, pixels), log-uniform in
    /// `[min_object_size, max_object_fraction * image_size]`.
    pub min_object_size: f64,
    /// Upper bound of the object size as a fraction of `image_size`.
    pub max_object_fraction: f64,
    /// Standard deviation of the per-pixel Gaussian noise (0..255 scale).
    pub noise: f64,
    /// A shape may hide at most this fraction of an earlier shape's pixels.
    pub max_hidden: f64,
}

impl Default for ShapesConfig {
    fn default() -> Self {
        ShapesConfig {
            seed: 0,
            count: 100,
            image_size: 128,
            min_objects: 1,
            max_objects: 5,
            min_object_size: 12.0,
            max_object_fraction: 0.75,
            noise: 6.0,
            max_hidden: 0.35,
        }
    }
}

impl ShapesConfig {
    /// Defaults with the given seed, count and image size.
    pub fn new(seed: u64, count: usize, image_size: usize) -> Self {
        ShapesConfig {
            seed,
            count,
            image_size,
            ..Default::default()
        }
    }

    fn check(&self) -> Result<()> {
        let op = "generate_shapes";
        if self.image_size < 16 || self.image_size > MAX_SHAPES_IMAGE_SIZE {
            return Err(Error::invalid(
                op,
                format!(
                    "image_size {} outside 16..={MAX_SHAPES_IMAGE_SIZE} pixels",
                    self.image_size
                ),
            ));
        }
        if self.min_objects == 0 || self.min_objects > self.max_objects {
            return Err(Error::invalid(
                op,
                format!(
                    "objects per image {}..={}",
                    self.min_objects, self.max_objects
                ),
            ));
        }
        let max = self.max_object_fraction * self.image_size as f64;
        if !(self.min_object_size >= 2.0 && self.min_object_size <= max) {
            return Err(Error::invalid(
                op,
                format!("object sizes {}..{max} pixels", self.min_object_size),
            ));
        }
        if !(self.noise >= 0.0 && (0.0..=1.0).contains(&self.max_hidden)) {
            return Err(Error::invalid(
                op,
                "noise must be >= 0 and max_hidden in [0, 1]",
            ));
        }
        Ok(())
    }
}

/// One generated object: COCO box `[x, y, w, h]` (pixels), visible area, label.
#[derive(Clone, Debug, PartialEq)]
pub struct ShapeObject {
    /// COCO box `[x, y, w, h]` in pixels: the tight box of the pixels the object still shows.
    pub bbox: [f64; 4],
    /// Number of pixels the object still shows (its visible area, pixels²).
    pub area: f64,
    /// Label `1..=3`, an index + 1 into [`SHAPE_CLASSES`].
    pub label: i64,
}

/// One generated image: `[3, S, S]` RGB and its objects.
#[derive(Clone, Debug, PartialEq)]
pub struct ShapeImage {
    /// RGB pixels, `[3, S, S]` row-major (channel, row, column), 0..255.
    pub image: Vec<u8>,
    /// Side `S` of the square image, pixels.
    pub size: usize,
    /// The objects, in painting order.
    pub objects: Vec<ShapeObject>,
}

/// A generated dataset held in memory.
#[derive(Clone, Debug)]
pub struct ShapesData {
    /// One sample per image; image ids are `1..=count`.
    pub samples: Vec<Sample>,
    /// The same in COCO form (annotation ids from 1), e.g. to write or evaluate.
    pub coco: CocoJson,
}

impl ShapesData {
    /// Ground truth for COCO evaluation.
    pub fn ground_truth(&self) -> GroundTruth {
        let p = Path::new("<shapes>");
        // Generated JSON is well-formed by construction.
        GroundTruth::from_json(&self.coco, p).expect("generated COCO JSON is valid")
    }
}

impl Dataset for ShapesData {
    fn len(&self) -> usize {
        self.samples.len()
    }
    fn get(&self, index: usize) -> Result<Sample> {
        self.samples.get(index).cloned().ok_or_else(|| {
            Error::invalid(
                "ShapesData::get",
                format!("index {index} of {}", self.samples.len()),
            )
        })
    }
}

/// Generate image `index` (0-based) of the dataset `cfg` describes.
pub fn render_shape_image(cfg: &ShapesConfig, index: usize) -> ShapeImage {
    let mut rng = image_rng(cfg.seed, index);
    let s = cfg.image_size;
    let mut canvas = Canvas::new(s, &mut rng);
    let n = cfg.min_objects + rng.below((cfg.max_objects - cfg.min_objects + 1) as u64) as usize;
    for _ in 0..n {
        // A few tries to place each shape; a crowded image just gets fewer objects.
        for _ in 0..30 {
            let shape = Shape::random(cfg, &mut rng);
            if canvas.try_paint(&shape, cfg.max_hidden, &mut rng) {
                break;
            }
        }
    }
    let objects = canvas.objects();
    let image = canvas.finish(cfg.noise, &mut rng);
    ShapeImage {
        image,
        size: s,
        objects,
    }
}

/// Generate the whole dataset in memory (no files).
pub fn generate_shapes_in_memory(cfg: &ShapesConfig) -> Result<ShapesData> {
    cfg.check()?;
    let images: Vec<ShapeImage> = (0..cfg.count)
        .into_par_iter()
        .map(|i| render_shape_image(cfg, i))
        .collect();
    let coco = to_coco(cfg, &images);
    let samples = images
        .into_iter()
        .enumerate()
        .map(|(i, im)| to_sample(im, i as i64 + 1))
        .collect();
    Ok(ShapesData { samples, coco })
}

/// Where [`generate_shapes`] wrote a dataset.
#[derive(Clone, Debug)]
pub struct ShapesSummary {
    /// `out_dir/annotations.json`.
    pub json_path: PathBuf,
    /// `out_dir/images/`, PNG files `000001.png`, ...
    pub image_dir: PathBuf,
    /// Number of images written.
    pub images: usize,
    /// Number of objects (annotations) written, over all images.
    pub objects: usize,
}

/// Write `count` images of `image_size` pixels to `out_dir/images/` (PNG) and their
/// annotations to `out_dir/annotations.json`, with the default settings otherwise.
/// Open the result with [`crate::data::CocoDataset::open_dir`].
pub fn generate_shapes(
    out_dir: &Path,
    seed: u64,
    count: usize,
    image_size: usize,
) -> Result<ShapesSummary> {
    generate_shapes_with(out_dir, &ShapesConfig::new(seed, count, image_size))
}

/// [`generate_shapes`] with every setting.
pub fn generate_shapes_with(out_dir: &Path, cfg: &ShapesConfig) -> Result<ShapesSummary> {
    cfg.check()?;
    let image_dir = out_dir.join("images");
    std::fs::create_dir_all(&image_dir).map_err(|e| io_error(&image_dir, e))?;
    // Images are written as they are made, so memory stays flat for large counts.
    let objects: Vec<Vec<ShapeObject>> = (0..cfg.count)
        .into_par_iter()
        .map(|i| {
            let im = render_shape_image(cfg, i);
            save_png(&image_dir.join(file_name(i)), &im.image, im.size, im.size)?;
            Ok(im.objects)
        })
        .collect::<Result<_>>()?;
    let images: Vec<ShapeImage> = objects
        .into_iter()
        .map(|objects| ShapeImage {
            image: Vec::new(),
            size: cfg.image_size,
            objects,
        })
        .collect();
    let coco = to_coco(cfg, &images);
    let json_path = out_dir.join("annotations.json");
    coco.write(&json_path)?;
    Ok(ShapesSummary {
        json_path,
        image_dir,
        images: cfg.count,
        objects: coco.annotations.len(),
    })
}

fn file_name(index: usize) -> String {
    format!("{:06}.png", index + 1)
}

/// An independent, well-mixed stream per image.
fn image_rng(seed: u64, index: usize) -> Rng {
    let mut r = Rng::new(seed ^ (index as u64).wrapping_mul(0xD1B5_4A32_D192_ED03));
    Rng::new(r.next_u64())
}

fn to_coco(cfg: &ShapesConfig, images: &[ShapeImage]) -> CocoJson {
    let mut coco = CocoJson {
        categories: SHAPE_CLASSES
            .iter()
            .enumerate()
            .map(|(k, name)| JsonCategory {
                id: k as i64 + 1,
                name: name.to_string(),
            })
            .collect(),
        ..Default::default()
    };
    for (i, im) in images.iter().enumerate() {
        let image_id = i as i64 + 1;
        coco.images.push(JsonImage {
            id: image_id,
            file_name: Some(file_name(i)),
            width: Some(cfg.image_size as u64),
            height: Some(cfg.image_size as u64),
        });
        for o in &im.objects {
            coco.annotations.push(JsonAnnotation {
                id: coco.annotations.len() as i64 + 1,
                image_id,
                category_id: o.label,
                bbox: Some(o.bbox.to_vec()),
                area: Some(o.area),
                iscrowd: Some(serde_json::Value::from(0)),
            });
        }
    }
    coco
}

fn to_sample(im: ShapeImage, image_id: i64) -> Sample {
    let boxes = im
        .objects
        .iter()
        .map(|o| {
            let [x, y, w, h] = o.bbox;
            [x as f32, y as f32, (x + w) as f32, (y + h) as f32]
        })
        .collect();
    Sample {
        labels: im.objects.iter().map(|o| o.label).collect(),
        boxes,
        image: im.image,
        height: im.size,
        width: im.size,
        image_id,
    }
}

// ---------------------------------------------------------------------------------
// Rendering.
// ---------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug)]
enum Kind {
    Rectangle,
    Ellipse,
    /// Apex on the top (or bottom when `flip`) edge at fraction `apex` of the width.
    Triangle {
        apex: f64,
        flip: bool,
    },
}

/// A shape in its box `[x0, y0, x0 + w, y0 + h]` (pixels, continuous).
struct Shape {
    kind: Kind,
    label: i64,
    x0: f64,
    y0: f64,
    w: f64,
    h: f64,
}

impl Shape {
    fn random(cfg: &ShapesConfig, rng: &mut Rng) -> Shape {
        let s = cfg.image_size as f64;
        let label = rng.below(SHAPE_CLASSES.len() as u64) as i64 + 1;
        let kind = match label {
            1 => Kind::Rectangle,
            2 => Kind::Ellipse,
            _ => Kind::Triangle {
                apex: rng.range(0.0, 1.0),
                flip: rng.uniform() < 0.5,
            },
        };
        // Log-uniform size: as many small as large objects per octave.
        let (lo, hi) = (cfg.min_object_size, cfg.max_object_fraction * s);
        let size = (rng.range(lo.ln(), hi.ln())).exp();
        let aspect = rng.range(0.5f64.ln(), 2.0f64.ln()).exp().sqrt();
        let w = (size * aspect).clamp(lo.min(s - 2.0), s - 2.0);
        let h = (size / aspect).clamp(lo.min(s - 2.0), s - 2.0);
        Shape {
            kind,
            label,
            x0: rng.range(0.0, s - w),
            y0: rng.range(0.0, s - h),
            w,
            h,
        }
    }

    /// Whether the pixel whose centre is `(px, py)` lies inside the shape.
    fn contains(&self, px: f64, py: f64) -> bool {
        let (u, v) = ((px - self.x0) / self.w, (py - self.y0) / self.h);
        if !(0.0..1.0).contains(&u) || !(0.0..1.0).contains(&v) {
            return false;
        }
        match self.kind {
            Kind::Rectangle => true,
            Kind::Ellipse => (2.0 * u - 1.0).powi(2) + (2.0 * v - 1.0).powi(2) <= 1.0,
            Kind::Triangle { apex, flip } => {
                // Apex at (apex, 0), base from (0, 1) to (1, 1): at height v the row
                // spans [apex * (1 - v), apex + (1 - apex) * v].
                let v = if flip { 1.0 - v } else { v };
                u >= apex * (1.0 - v) && u <= apex + (1.0 - apex) * v
            }
        }
    }

    /// Pixel indices (row-major) the shape covers.
    fn pixels(&self, size: usize) -> Vec<usize> {
        let (c0, c1) = (
            self.x0.floor() as usize,
            ((self.x0 + self.w).ceil() as usize).min(size),
        );
        let (r0, r1) = (
            self.y0.floor() as usize,
            ((self.y0 + self.h).ceil() as usize).min(size),
        );
        let mut out = Vec::new();
        for y in r0..r1 {
            for x in c0..c1 {
                if self.contains(x as f64 + 0.5, y as f64 + 0.5) {
                    out.push(y * size + x);
                }
            }
        }
        out
    }
}

/// The image being painted: colours in f32 and, per pixel, the object shown there.
struct Canvas {
    size: usize,
    rgb: Vec<[f32; 3]>,
    owner: Vec<u16>, // 0 = background, k = objects[k - 1]
    labels: Vec<i64>,
    /// Pixels each object covered when painted.
    painted: Vec<usize>,
}

impl Canvas {
    fn new(size: usize, rng: &mut Rng) -> Canvas {
        let c0 = random_colour(rng);
        let c1 = random_colour(rng);
        let kind = rng.below(3);
        let angle = rng.range(0.0, std::f64::consts::TAU);
        let (cx, cy) = (rng.range(0.0, size as f64), rng.range(0.0, size as f64));
        let (dx, dy) = (angle.cos(), angle.sin());
        let s = size as f64;
        let mut rgb = Vec::with_capacity(size * size);
        for y in 0..size {
            for x in 0..size {
                let (fx, fy) = (x as f64 + 0.5, y as f64 + 0.5);
                // t in [0, 1]: how far from colour c0 towards c1.
                let t = match kind {
                    0 => 0.0,
                    1 => (((fx - s / 2.0) * dx + (fy - s / 2.0) * dy) / s + 0.5).clamp(0.0, 1.0),
                    _ => (((fx - cx).powi(2) + (fy - cy).powi(2)).sqrt() / s).clamp(0.0, 1.0),
                };
                rgb.push(std::array::from_fn(|c| {
                    (c0[c] + t * (c1[c] - c0[c])) as f32
                }));
            }
        }
        Canvas {
            size,
            rgb,
            owner: vec![0; size * size],
            labels: Vec::new(),
            painted: Vec::new(),
        }
    }

    /// Paint `shape` unless it would hide more than `max_hidden` of an earlier object,
    /// or is too small to see; returns whether it was painted.
    fn try_paint(&mut self, shape: &Shape, max_hidden: f64, rng: &mut Rng) -> bool {
        let px = shape.pixels(self.size);
        if px.len() < 16 {
            return false;
        }
        let k = self.labels.len();
        let mut hidden = vec![0usize; k];
        for &p in &px {
            if self.owner[p] > 0 {
                hidden[self.owner[p] as usize - 1] += 1;
            }
        }
        let visible = self.visible_counts();
        for j in 0..k {
            if (visible[j] - hidden[j]) as f64 <= (1.0 - max_hidden) * self.painted[j] as f64 {
                return false;
            }
        }
        let colour = self.contrasting_colour(&px, rng);
        let id = (k + 1) as u16;
        for &p in &px {
            self.rgb[p] = colour;
            self.owner[p] = id;
        }
        self.labels.push(shape.label);
        self.painted.push(px.len());
        true
    }

    fn visible_counts(&self) -> Vec<usize> {
        let mut v = vec![0usize; self.labels.len()];
        for &o in &self.owner {
            if o > 0 {
                v[o as usize - 1] += 1;
            }
        }
        v
    }

    /// A random colour far from the mean colour under the shape, so it stands out.
    fn contrasting_colour(&self, px: &[usize], rng: &mut Rng) -> [f32; 3] {
        let mut mean = [0.0f64; 3];
        for &p in px {
            for (m, &v) in mean.iter_mut().zip(&self.rgb[p]) {
                *m += v as f64;
            }
        }
        mean.iter_mut().for_each(|m| *m /= px.len() as f64);
        let dist = |c: &[f64; 3]| {
            c.iter()
                .zip(&mean)
                .map(|(a, b)| (a - b).powi(2))
                .sum::<f64>()
                .sqrt()
        };
        let mut best = random_colour(rng);
        for _ in 0..20 {
            if dist(&best) >= 110.0 {
                break;
            }
            let c = random_colour(rng);
            if dist(&c) > dist(&best) {
                best = c;
            }
        }
        best.map(|v| v as f32)
    }

    /// Each object's tight box and area over the pixels it still shows.
    fn objects(&self) -> Vec<ShapeObject> {
        let k = self.labels.len();
        let mut bounds = vec![[usize::MAX, usize::MAX, 0usize, 0usize]; k];
        let mut area = vec![0usize; k];
        for (p, &o) in self.owner.iter().enumerate() {
            if o == 0 {
                continue;
            }
            let j = o as usize - 1;
            let (y, x) = (p / self.size, p % self.size);
            let b = &mut bounds[j];
            b[0] = b[0].min(x);
            b[1] = b[1].min(y);
            b[2] = b[2].max(x + 1);
            b[3] = b[3].max(y + 1);
            area[j] += 1;
        }
        (0..k)
            .filter(|&j| area[j] > 0)
            .map(|j| {
                let [x0, y0, x1, y1] = bounds[j];
                ShapeObject {
                    bbox: [x0 as f64, y0 as f64, (x1 - x0) as f64, (y1 - y0) as f64],
                    area: area[j] as f64,
                    label: self.labels[j],
                }
            })
            .collect()
    }

    /// Add noise, round to `u8` and lay out as `[3, S, S]`.
    fn finish(self, noise: f64, rng: &mut Rng) -> Vec<u8> {
        let plane = self.size * self.size;
        let mut out = vec![0u8; 3 * plane];
        for (p, px) in self.rgb.iter().enumerate() {
            for c in 0..3 {
                let v = px[c] as f64 + noise * rng.normal();
                out[c * plane + p] = v.round().clamp(0.0, 255.0) as u8;
            }
        }
        out
    }
}

fn random_colour(rng: &mut Rng) -> [f64; 3] {
    std::array::from_fn(|_| rng.range(0.0, 255.0))
}
