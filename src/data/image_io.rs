//! Reading and writing images (PNG, JPEG) as RGB `u8` in CHW layout.

use std::path::Path;

use image::{ExtendedColorType, ImageReader};

use super::{invalid_data, io_error};
use crate::error::Result;

/// An RGB image: `[3, height, width]` `u8` pixels, row-major.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RgbImage {
    /// Pixels `[3, H, W]`.
    pub data: Vec<u8>,
    /// Height in pixels.
    pub height: usize,
    /// Width in pixels.
    pub width: usize,
}

fn open(path: &Path) -> Result<ImageReader<std::io::BufReader<std::fs::File>>> {
    let reader = ImageReader::open(path).map_err(|e| io_error(path, e))?;
    // The content decides the format, not the extension: a PNG named .jpg still loads.
    reader.with_guessed_format().map_err(|e| io_error(path, e))
}

/// The `(width, height)` of an image file, from its header only (cheap).
pub fn image_dims(path: &Path) -> Result<(usize, usize)> {
    let (w, h) = open(path)?
        .into_dimensions()
        .map_err(|e| invalid_data(path, format!("unreadable image: {e}")))?;
    Ok((w as usize, h as usize))
}

/// Decode a PNG or JPEG file into RGB (grey and RGBA images are converted; alpha is
/// dropped; 16-bit PNGs are scaled to 8 bits).
pub fn load_rgb(path: &Path) -> Result<RgbImage> {
    let img = open(path)?
        .decode()
        .map_err(|e| invalid_data(path, format!("corrupt or unsupported image: {e}")))?;
    Ok(to_rgb(img))
}

/// [`load_rgb`] on the bytes of an image file held in memory; `name` names it in
/// errors.
pub fn decode_rgb(bytes: &[u8], name: &Path) -> Result<RgbImage> {
    let img = ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| io_error(name, e))?
        .decode()
        .map_err(|e| invalid_data(name, format!("corrupt or unsupported image: {e}")))?;
    Ok(to_rgb(img))
}

/// [`image_dims`] on the bytes of an image file held in memory.
pub fn decode_dims(bytes: &[u8], name: &Path) -> Result<(usize, usize)> {
    let (w, h) = ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| io_error(name, e))?
        .into_dimensions()
        .map_err(|e| invalid_data(name, format!("unreadable image: {e}")))?;
    Ok((w as usize, h as usize))
}

fn to_rgb(img: image::DynamicImage) -> RgbImage {
    let img = img.into_rgb8();
    let (w, h) = (img.width() as usize, img.height() as usize);
    RgbImage {
        data: hwc_to_chw(img.as_raw(), h, w),
        height: h,
        width: w,
    }
}

/// Write `[3, H, W]` RGB pixels as a PNG file.
pub fn save_png(path: &Path, chw: &[u8], height: usize, width: usize) -> Result<()> {
    if chw.len() != 3 * height * width {
        return Err(invalid_data(
            path,
            format!(
                "save_png: {} bytes for a 3x{height}x{width} image",
                chw.len()
            ),
        ));
    }
    let hwc = chw_to_hwc(chw, height, width);
    image::save_buffer_with_format(
        path,
        &hwc,
        width as u32,
        height as u32,
        ExtendedColorType::Rgb8,
        image::ImageFormat::Png,
    )
    .map_err(|e| invalid_data(path, format!("cannot write PNG: {e}")))
}

/// Interleaved `[H, W, 3]` to planar `[3, H, W]`.
pub fn hwc_to_chw(hwc: &[u8], height: usize, width: usize) -> Vec<u8> {
    let plane = height * width;
    let mut out = vec![0u8; 3 * plane];
    for (p, px) in hwc.chunks_exact(3).enumerate() {
        out[p] = px[0];
        out[plane + p] = px[1];
        out[2 * plane + p] = px[2];
    }
    out
}

/// Planar `[3, H, W]` to interleaved `[H, W, 3]`.
pub fn chw_to_hwc(chw: &[u8], height: usize, width: usize) -> Vec<u8> {
    let plane = height * width;
    let mut out = vec![0u8; 3 * plane];
    for p in 0..plane {
        out[3 * p] = chw[p];
        out[3 * p + 1] = chw[plane + p];
        out[3 * p + 2] = chw[2 * plane + p];
    }
    out
}
