//! Detections drawn on images: a box per detection in its class colour and a label
//! with the class number and score (a built-in 3x5 bitmap font), saved as PNG.

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
        _ => return None,
    })
}

/// An RGB image being drawn on, row-major HWC.
pub struct Canvas {
    pub width: usize,
    pub height: usize,
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

    /// `text` (digits, `.`, `:`) in `fg` on a `bg` box whose top-left is `(x, y)`.
    pub fn text(&mut self, x: i64, y: i64, text: &str, fg: [u8; 3], bg: [u8; 3]) {
        let w = 4 * text.chars().count() as i64 + 1;
        self.fill(x, y, x + w, y + 7, bg);
        for (k, ch) in text.chars().enumerate() {
            let Some(g) = glyph(ch) else { continue };
            for (row, bits) in g.iter().enumerate() {
                for col in 0..3 {
                    if bits & (4 >> col) != 0 {
                        self.put(x + 1 + 4 * k as i64 + col, y + 1 + row as i64, fg);
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
/// colour and `label:score` above it (inside the image).
pub fn draw_detections(canvas: &mut Canvas, d: &Detections, min_score: f32) {
    // Lowest score first, so the best boxes end up on top.
    let mut order: Vec<usize> = (0..d.boxes.len())
        .filter(|&i| d.scores[i] >= min_score)
        .collect();
    order.sort_by(|&a, &b| d.scores[a].total_cmp(&d.scores[b]));
    let thickness = if canvas.width.max(canvas.height) > 400 {
        2
    } else {
        1
    };
    for i in order {
        let c = class_colour(d.labels[i]);
        canvas.rect(d.boxes[i], c, thickness);
        let label = format!("{}:{:.2}", d.labels[i], d.scores[i]);
        let x = d.boxes[i][0].round() as i64;
        let y = (d.boxes[i][1].round() as i64 - 7).max(0);
        let text_w = 4 * label.len() as i64 + 1;
        let x = x.min(canvas.width as i64 - text_w).max(0);
        canvas.text(x, y, &label, [255, 255, 255], c);
    }
}

/// Draw `d` on the CHW image and write it to `path` as PNG.
pub fn save_detections_png(
    path: &Path,
    chw: &[u8],
    height: usize,
    width: usize,
    d: &Detections,
    min_score: f32,
) -> Result<()> {
    let mut canvas = Canvas::from_chw(chw, height, width)?;
    draw_detections(&mut canvas, d, min_score);
    canvas.save_png(path)
}
