//! Detections drawn on images: a box per detection in its class colour and a label
//! with the class name (the dataset's category names; the number when none is
//! known) and score, in a built-in 3x5 bitmap font, saved as PNG. Images smaller
//! than [`MIN_DRAWN_SIDE`] are enlarged by an integer factor (nearest neighbour) so
//! the labels stay readable.

use std::path::Path;

use super::Detections;
use crate::error::{Error, Result};

/// Class colours (label 1 takes the first); background is never drawn.
const PALETTE: [[u8; 3]; 8] = [
    [230, 25, 75],
    [60, 180, 75],
    [0, 130, 200],
    [245, 130, 48],
    [145, 30, 180],
    [70, 240, 240],
    [240, 50, 230],
    [210, 245, 60],
];

/// The colour of class `label` (1..).
pub fn class_colour(label: i64) -> [u8; 3] {
    PALETTE[(label.max(1) as usize - 1) % PALETTE.len()]
}

/// 3x5 glyphs: five rows of three bits, bit 2 the left column.
fn glyph(c: char) -> Option<[u8; 5]> {
    Some(match c {
        '0' => [7, 5, 5, 5, 7],
        '1' => [2, 6, 2, 2, 7],
        '2' => [7, 1, 7, 4, 7],
        '3' => [7, 1, 7, 1, 7],
        '4' => [5, 5, 7, 1, 1],
        '5' => [7, 4, 7, 1, 7],
        '6' => [7, 4, 7, 5, 7],
        '7' => [7, 1, 1, 2, 2],
        '8' => [7, 5, 7, 5, 7],
        '9' => [7, 5, 7, 1, 7],
        '.' => [0, 0, 0, 0, 2],
        ':' => [0, 2, 0, 2, 0],
        '-' => [0, 0, 7, 0, 0],
        '_' => [0, 0, 0, 0, 7],
        ' ' => [0, 0, 0, 0, 0],
        c if c.is_ascii_alphabetic() => LETTERS[(c.to_ascii_uppercase() as u8 - b'A') as usize],
        _ => return None,
    })
}

/// 3x5 capitals A..Z (labels are drawn in capitals).
const LETTERS: [[u8; 5]; 26] = [
    [2, 5, 7, 5, 5], // A
    [6, 5, 6, 5, 6], // B
    [3, 4, 4, 4, 3], // C
    [6, 5, 5, 5, 6], // D
    [7, 4, 6, 4, 7], // E
    [7, 4, 6, 4, 4], // F
    [3, 4, 5, 5, 3], // G
    [5, 5, 7, 5, 5], // H
    [7, 2, 2, 2, 7], // I
    [1, 1, 1, 5, 2], // J
    [5, 5, 6, 5, 5], // K
    [4, 4, 4, 4, 7], // L
    [5, 7, 7, 5, 5], // M
    [6, 5, 5, 5, 5], // N
    [2, 5, 5, 5, 2], // O
    [6, 5, 6, 4, 4], // P
    [2, 5, 5, 6, 3], // Q
    [6, 5, 6, 5, 5], // R
    [3, 4, 2, 1, 6], // S
    [7, 2, 2, 2, 2], // T
    [5, 5, 5, 5, 7], // U
    [5, 5, 5, 5, 2], // V
    [5, 5, 7, 7, 5], // W
    [5, 5, 2, 5, 5], // X
    [5, 5, 2, 2, 2], // Y
    [7, 1, 2, 4, 7], // Z
];

/// Images whose longer side is below this are drawn enlarged, pixels.
pub const MIN_DRAWN_SIDE: usize = 512;

/// The enlargement [`save_detections_png`] uses for an image of this size: the
/// largest integer factor (at most 8) that keeps the longer side at most
/// [`MIN_DRAWN_SIDE`], and 1 for images already that large.
pub fn draw_scale(height: usize, width: usize) -> usize {
    let side = height.max(width).max(1);
    (MIN_DRAWN_SIDE / side).clamp(1, 8)
}

/// The label of a detection: the class name (`names[label - 1]`) or, without one,
/// the class number, then the score.
pub fn label_text(label: i64, score: f32, names: &[String]) -> String {
    let name = usize::try_from(label - 1)
        .ok()
        .and_then(|i| names.get(i))
        .map_or_else(|| label.to_string(), |n| n.to_uppercase());
    format!("{name} {score:.2}")
}

/// An RGB image being drawn on, row-major HWC.
pub struct Canvas {
    /// Width, pixels.
    pub width: usize,
    /// Height, pixels.
    pub height: usize,
    /// Pixels, row-major HWC.
    pub rgb: Vec<u8>,
}

impl Canvas {
    /// From CHW `u8` pixels (a [`crate::data::Sample`]'s layout).
    pub fn from_chw(chw: &[u8], height: usize, width: usize) -> Result<Canvas> {
        if chw.len() != 3 * height * width {
            return Err(Error::shape(
                "Canvas::from_chw",
                format!("{} bytes for 3x{height}x{width}", chw.len()),
            ));
        }
        Ok(Canvas {
            width,
            height,
            rgb: crate::data::image_io::chw_to_hwc(chw, height, width),
        })
    }

    fn put(&mut self, x: i64, y: i64, c: [u8; 3]) {
        if x >= 0 && y >= 0 && (x as usize) < self.width && (y as usize) < self.height {
            let i = 3 * (y as usize * self.width + x as usize);
            self.rgb[i..i + 3].copy_from_slice(&c);
        }
    }

    fn fill(&mut self, x0: i64, y0: i64, x1: i64, y1: i64, c: [u8; 3]) {
        for y in y0..y1 {
            for x in x0..x1 {
                self.put(x, y, c);
            }
        }
    }

    /// A rectangle outline `thickness` pixels wide, inside `[x1, y1, x2, y2]`.
    pub fn rect(&mut self, b: [f32; 4], c: [u8; 3], thickness: i64) {
        let [x0, y0, x1, y1] = b.map(|v| v.round() as i64);
        let t = thickness.max(1);
        self.fill(x0, y0, x1, y0 + t, c);
        self.fill(x0, y1 - t, x1, y1, c);
        self.fill(x0, y0, x0 + t, y1, c);
        self.fill(x1 - t, y0, x1, y1, c);
    }

    /// The same image `k` times larger (nearest neighbour).
    pub fn enlarged(&self, k: usize) -> Canvas {
        let (h, w) = (self.height * k, self.width * k);
        let mut rgb = Vec::with_capacity(3 * h * w);
        for y in 0..h {
            for x in 0..w {
                let i = 3 * ((y / k) * self.width + x / k);
                rgb.extend_from_slice(&self.rgb[i..i + 3]);
            }
        }
        Canvas {
            width: w,
            height: h,
            rgb,
        }
    }

    /// `text` (letters, digits, `.`, `:`, `-`, `_`, space) in `fg` on a `bg` box
    /// whose top-left is `(x, y)`, each font pixel `scale` pixels wide.
    pub fn text(&mut self, x: i64, y: i64, text: &str, fg: [u8; 3], bg: [u8; 3]) {
        self.text_scaled(x, y, text, fg, bg, 1);
    }

    /// [`Canvas::text`] with font pixels `scale` x `scale`.
    pub fn text_scaled(
        &mut self,
        x: i64,
        y: i64,
        text: &str,
        fg: [u8; 3],
        bg: [u8; 3],
        scale: i64,
    ) {
        let s = scale.max(1);
        let w = (4 * text.chars().count() as i64 + 1) * s;
        self.fill(x, y, x + w, y + 7 * s, bg);
        for (k, ch) in text.chars().enumerate() {
            let Some(g) = glyph(ch) else { continue };
            for (row, bits) in g.iter().enumerate() {
                for col in 0..3 {
                    if bits & (4 >> col) != 0 {
                        let px = x + (1 + 4 * k as i64 + col) * s;
                        let py = y + (1 + row as i64) * s;
                        self.fill(px, py, px + s, py + s, fg);
                    }
                }
            }
        }
    }

    /// Save as PNG.
    pub fn save_png(&self, path: &Path) -> Result<()> {
        let chw = crate::data::image_io::hwc_to_chw(&self.rgb, self.height, self.width);
        crate::data::image_io::save_png(path, &chw, self.height, self.width)
    }
}

/// Draw every detection scoring at least `min_score` on `canvas`: its box in the class
/// colour and `NAME score` above it (inside the image), the name from `names`
/// (`names[label - 1]`, the dataset's categories) or the class number without one.
/// Boxes are in `canvas` pixels.
pub fn draw_detections(canvas: &mut Canvas, d: &Detections, min_score: f32, names: &[String]) {
    // Lowest score first, so the best boxes end up on top.
    let mut order: Vec<usize> = (0..d.boxes.len())
        .filter(|&i| d.scores[i] >= min_score)
        .collect();
    order.sort_by(|&a, &b| d.scores[a].total_cmp(&d.scores[b]));
    let side = canvas.width.max(canvas.height);
    let thickness = if side > 400 { 2 } else { 1 };
    let font = if side >= 400 { 2 } else { 1 };
    for i in order {
        let c = class_colour(d.labels[i]);
        canvas.rect(d.boxes[i], c, thickness);
        let label = label_text(d.labels[i], d.scores[i], names);
        let x = d.boxes[i][0].round() as i64;
        let y = (d.boxes[i][1].round() as i64 - 7 * font).max(0);
        let text_w = (4 * label.chars().count() as i64 + 1) * font;
        let x = x.min(canvas.width as i64 - text_w).max(0);
        canvas.text_scaled(x, y, &label, [255, 255, 255], c, font);
    }
}

/// Draw `d` (boxes in image pixels) on the CHW image, enlarged by
/// [`draw_scale`] when small, and write it to `path` as PNG; `names` as in
/// [`draw_detections`].
pub fn save_detections_png(
    path: &Path,
    chw: &[u8],
    height: usize,
    width: usize,
    d: &Detections,
    min_score: f32,
    names: &[String],
) -> Result<()> {
    let k = draw_scale(height, width);
    let mut canvas = Canvas::from_chw(chw, height, width)?.enlarged(k);
    let scaled = Detections {
        boxes: d.boxes.iter().map(|b| b.map(|v| v * k as f32)).collect(),
        ..d.clone()
    };
    draw_detections(&mut canvas, &scaled, min_score, names);
    canvas.save_png(path)
}
