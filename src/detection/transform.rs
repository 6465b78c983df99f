//! torchvision's GeneralizedRCNNTransform: normalise, resize, batch with padding; and
//! the mapping of boxes between original and resized image coordinates.

use crate::device::gpu::{GpuBuffer, GpuDevice, KernelArg, LaunchCfg};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::ops::{arg, gpu_dev, launch_elems};
use crate::tensor::{DType, Tensor};

/// Settings of the transform (torchvision defaults: ImageNet mean/std, divisible by
/// 32): the `[model.transform]` section of a config.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TransformConfig {
    /// Target length of the shorter side, pixels.
    pub min_size: usize,
    /// Upper bound on the longer side, pixels.
    pub max_size: usize,
    /// Per-channel mean of 0..1 RGB.
    #[serde(rename = "image_mean")]
    pub mean: [f32; 3],
    /// Per-channel std of 0..1 RGB.
    #[serde(rename = "image_std")]
    pub std: [f32; 3],
    /// Batch height and width are rounded up to a multiple of this.
    pub size_divisible: usize,
}

impl Default for TransformConfig {
    /// torchvision's: 800 / 1333, ImageNet mean and std, padding to 32.
    fn default() -> Self {
        TransformConfig::new(800, 1333)
    }
}

impl TransformConfig {
    /// Check what types cannot; the error names the key (`max_size`).
    pub fn validate(&self) -> Result<()> {
        if self.min_size == 0 || self.max_size < self.min_size {
            return Err(crate::config::invalid(
                "max_size",
                format!(
                    "min_size {} max_size {} (need 0 < min_size <= max_size)",
                    self.min_size, self.max_size
                ),
            ));
        }
        if self.std.iter().any(|s| !(s.is_finite() && *s > 0.0)) {
            return Err(crate::config::invalid(
                "image_std",
                format!("{:?}: positive values", self.std),
            ));
        }
        if let Some(i) = self.mean.iter().position(|m| !m.is_finite()) {
            return Err(crate::config::invalid(
                "image_mean",
                format!("{:?}: entry {i} is not a finite number", self.mean),
            ));
        }
        crate::config::positive("size_divisible", self.size_divisible)
    }

    /// torchvision's settings for the given sizes.
    pub fn new(min_size: usize, max_size: usize) -> Self {
        TransformConfig {
            min_size,
            max_size,
            mean: [0.485, 0.456, 0.406],
            std: [0.229, 0.224, 0.225],
            size_divisible: 32,
        }
    }
}

/// A padded batch and the size of each image inside it (after resizing).
#[derive(Clone, Debug)]
pub struct ImageList {
    /// `[N, 3, H, W]`, H and W multiples of `size_divisible`.
    pub tensors: Tensor,
    /// (height, width) of each resized image, pixels.
    pub image_sizes: Vec<(usize, usize)>,
}

/// Size after resizing an `h` x `w` image, exactly as torchvision computes it: the
/// scale as a Python float (f64), the size as floor(in * scale) (`interpolate` with
/// `recompute_scale_factor=True`). The rounding matters: 451 * (480 / 451) is just
/// under 480 in f64, so the side becomes 479.
pub fn resized_size(h: usize, w: usize, min_size: usize, max_size: usize) -> (usize, usize) {
    let (short, long) = (h.min(w) as f64, h.max(w) as f64);
    let scale = (min_size as f64 / short).min(max_size as f64 / long);
    (
        (h as f64 * scale).floor() as usize,
        (w as f64 * scale).floor() as usize,
    )
}

/// An image tensor `[3, H, W]` in 0..1 from 8-bit RGB in CHW order.
pub fn image_from_u8(data: &[u8], h: usize, w: usize) -> Result<Tensor> {
    if data.len() != 3 * h * w {
        return Err(Error::shape(
            "image_from_u8",
            format!("{} bytes for a 3x{h}x{w} image", data.len()),
        ));
    }
    Tensor::from_vec(
        data.iter().map(|&v| v as f32 / 255.0).collect::<Vec<f32>>(),
        [3, h, w],
    )
}

/// Normalise, resize and batch `images` (each f32 `[3, H, W]` in 0..1, all on one
/// device) into an [`ImageList`] on that device.
pub fn transform(images: &[Tensor], cfg: &TransformConfig) -> Result<ImageList> {
    if images.is_empty() {
        return Err(Error::invalid("transform", "no images"));
    }
    let device = crate::tensor::same_device("transform", &images.iter().collect::<Vec<_>>())?;
    let mut sizes = Vec::with_capacity(images.len());
    for (i, im) in images.iter().enumerate() {
        if im.dims().len() != 3 || im.dims()[0] != 3 || im.dims()[1] == 0 || im.dims()[2] == 0 {
            return Err(Error::shape(
                "transform",
                format!("image {i} has shape {}, expected [3, H, W]", im.shape()),
            ));
        }
        if im.dtype() != DType::F32 {
            return Err(Error::DType {
                op: "transform",
                dtype: im.dtype().to_string(),
                msg: format!("image {i} must be f32"),
            });
        }
        sizes.push(resized_size(
            im.dims()[1],
            im.dims()[2],
            cfg.min_size,
            cfg.max_size,
        ));
    }
    let d = cfg.size_divisible.max(1);
    let ph = sizes.iter().map(|s| s.0).max().unwrap_or(0).div_ceil(d) * d;
    let pw = sizes.iter().map(|s| s.1).max().unwrap_or(0).div_ceil(d) * d;
    let n = images.len();
    let tensors = match device {
        Device::Cpu => {
            let mut out = crate::tensor::pool::take_zeroed::<f32>(n * 3 * ph * pw);
            for (b, (im, &(oh, ow))) in images.iter().zip(&sizes).enumerate() {
                let src = im.cpu_slice::<f32>()?;
                let dst = &mut out[b * 3 * ph * pw..(b + 1) * 3 * ph * pw];
                resize_normalize_cpu(src, im.dims()[1], im.dims()[2], dst, oh, ow, ph, pw, cfg);
            }
            Tensor::from_vec(out, [n, 3, ph, pw])?
        }
        Device::Cuda(_) => {
            let dev = gpu_dev("transform", &images[0])?;
            // The kernel writes the resized image only: the padding stays zero.
            let out = Tensor::gpu_zeros(&dev, [n, 3, ph, pw])?;
            for (b, (im, &(oh, ow))) in images.iter().zip(&sizes).enumerate() {
                let (h, w) = (im.dims()[1] as i32, im.dims()[2] as i32);
                let (m, s) = (cfg.mean, cfg.std);
                let args = [
                    arg(im)?,
                    KernelArg::I32(h),
                    KernelArg::I32(w),
                    arg(&out)?,
                    KernelArg::I32(b as i32),
                    KernelArg::I32(oh as i32),
                    KernelArg::I32(ow as i32),
                    KernelArg::I32(ph as i32),
                    KernelArg::I32(pw as i32),
                    KernelArg::F32(m[0]),
                    KernelArg::F32(m[1]),
                    KernelArg::F32(m[2]),
                    KernelArg::F32(s[0]),
                    KernelArg::F32(s[1]),
                    KernelArg::F32(s[2]),
                ];
                launch_elems(&dev, "resize_normalize_f32", 3 * oh * ow, &args)?;
            }
            out
        }
    };
    Ok(ImageList {
        tensors,
        image_sizes: sizes,
    })
}

/// CPU twin of `resize_normalize_f32`: same float operations in the same order.
#[allow(clippy::too_many_arguments)]
fn resize_normalize_cpu(
    src: &[f32],
    h: usize,
    w: usize,
    dst: &mut [f32],
    oh: usize,
    ow: usize,
    ph: usize,
    pw: usize,
    cfg: &TransformConfig,
) {
    let (sh, sw) = (h as f32 / oh as f32, w as f32 / ow as f32);
    // Source index pairs and weights per output column and row, as PyTorch's
    // upsample_bilinear2d computes them (source clamped at 0, no "+1" past the edge).
    let taps = |scale: f32, o: usize, len: usize| {
        let f = (scale * (o as f32 + 0.5) - 0.5).max(0.0);
        let i0 = f as usize;
        let i1 = i0 + usize::from(i0 < len - 1);
        let l1 = f - i0 as f32;
        (i0, i1, 1.0 - l1, l1)
    };
    let cols: Vec<_> = (0..ow).map(|x| taps(sw, x, w)).collect();
    for c in 0..3 {
        let (mean, std) = (cfg.mean[c], cfg.std[c]);
        let p = &src[c * h * w..(c + 1) * h * w];
        let norm = |y: usize, x: usize| (p[y * w + x] - mean) / std;
        for oy in 0..oh {
            let (y0, y1, ly0, ly1) = taps(sh, oy, h);
            let row = &mut dst[(c * ph + oy) * pw..(c * ph + oy) * pw + ow];
            for (ox, o) in row.iter_mut().enumerate() {
                let (x0, x1, lx0, lx1) = cols[ox];
                *o = ly0 * (lx0 * norm(y0, x0) + lx1 * norm(y0, x1))
                    + ly1 * (lx0 * norm(y1, x0) + lx1 * norm(y1, x1));
            }
        }
    }
}

/// An 8-bit RGB image in CHW order (what decoding a PNG or JPEG gives), borrowed.
#[derive(Clone, Copy, Debug)]
pub struct ImageU8<'a> {
    /// `3 * height * width` bytes, channel-major.
    pub data: &'a [u8],
    /// Height, pixels.
    pub height: usize,
    /// Width, pixels.
    pub width: usize,
}

/// Bytes of the per-image header of an uploaded batch (8 `i32`s, see
/// `transform_batch_u8` in kernels/transform.cu).
const HEADER_BYTES: usize = 32;

/// A batch of 8-bit images on a device, uploaded in one host-to-device copy through
/// pinned memory: one buffer holding a small header per image (offset and sizes)
/// and then every image's bytes. [`transform_uploaded`] turns it into the
/// normalised, resized, padded batch with one kernel launch. On the CPU the bytes
/// stay on the host.
pub struct UploadedBatch {
    device: Device,
    cfg: TransformConfig,
    /// The packed bytes (header, then pixels); on a GPU, also the device buffer.
    packed: Vec<u8>,
    gpu: Option<(GpuDevice, GpuBuffer)>,
    sizes: Vec<(usize, usize)>,
}

impl std::fmt::Debug for UploadedBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "UploadedBatch({} images on {}, {} bytes)",
            self.sizes.len(),
            self.device,
            self.packed.len()
        )
    }
}

/// (height, width) per image, pixels.
type Sizes = Vec<(usize, usize)>;

/// Check `images` and pack them as the kernel reads them: per image the header
/// `{offset lo, offset hi, H, W, OH, OW, 0, 0}` (OH, OW: the size after resizing
/// with `cfg`), then the pixels, each image at a 16-byte boundary.
fn pack_u8(images: &[ImageU8], cfg: &TransformConfig) -> Result<(Vec<u8>, Sizes)> {
    cfg.validate()?;
    if images.is_empty() {
        return Err(Error::invalid("upload_u8", "no images"));
    }
    let mut sizes = Vec::with_capacity(images.len());
    let mut total = images.len() * HEADER_BYTES;
    let mut offsets = Vec::with_capacity(images.len());
    for (i, im) in images.iter().enumerate() {
        if im.height == 0 || im.width == 0 || im.data.len() != 3 * im.height * im.width {
            return Err(Error::shape(
                "upload_u8",
                format!(
                    "image {i}: {} bytes for a 3x{}x{} image",
                    im.data.len(),
                    im.height,
                    im.width
                ),
            ));
        }
        if im.height > i32::MAX as usize || im.width > i32::MAX as usize {
            return Err(Error::shape(
                "upload_u8",
                format!("image {i}: {}x{} is too large", im.height, im.width),
            ));
        }
        total = total.next_multiple_of(16);
        offsets.push(total);
        total += im.data.len();
        sizes.push((im.height, im.width));
    }
    let mut packed = vec![0u8; total];
    for (i, (im, &off)) in images.iter().zip(&offsets).enumerate() {
        let (oh, ow) = resized_size(im.height, im.width, cfg.min_size, cfg.max_size);
        let hdr = [
            off as u32 as i32,
            (off as u64 >> 32) as i32,
            im.height as i32,
            im.width as i32,
            oh as i32,
            ow as i32,
        ];
        for (k, v) in hdr.iter().enumerate() {
            let at = i * HEADER_BYTES + 4 * k;
            packed[at..at + 4].copy_from_slice(&v.to_le_bytes());
        }
        packed[off..off + im.data.len()].copy_from_slice(im.data);
    }
    Ok((packed, sizes))
}

/// Upload `images` to `device` in one host-to-device copy (pinned, asynchronous on
/// CUDA; see [`UploadedBatch`]), to be transformed with `cfg`.
pub fn upload_u8(
    images: &[ImageU8],
    cfg: &TransformConfig,
    device: Device,
) -> Result<UploadedBatch> {
    let (packed, sizes) = pack_u8(images, cfg)?;
    let gpu = match device {
        Device::Cpu => None,
        Device::Cuda(n) => {
            let dev = crate::device::gpu::device(n)?;
            let buf = dev.alloc(packed.len())?;
            dev.backend.copy_htod_pinned(&packed, &buf)?;
            Some((dev, buf))
        }
    };
    Ok(UploadedBatch {
        device,
        cfg: cfg.clone(),
        packed,
        gpu,
        sizes,
    })
}

impl UploadedBatch {
    /// Original (height, width) of each image, pixels.
    pub fn original_sizes(&self) -> &[(usize, usize)] {
        &self.sizes
    }

    /// The device the batch is on.
    pub fn device(&self) -> Device {
        self.device
    }

    /// Replace the images with `images` of the same sizes, in the same buffer (one
    /// host-to-device copy): how a captured graph that reads this buffer is fed its
    /// next batch.
    pub fn refill(&mut self, images: &[ImageU8]) -> Result<()> {
        let (packed, sizes) = pack_u8(images, &self.cfg)?;
        if sizes != self.sizes {
            return Err(Error::shape(
                "UploadedBatch::refill",
                format!(
                    "image sizes {sizes:?} differ from the batch's {:?}",
                    self.sizes
                ),
            ));
        }
        if let Some((dev, buf)) = &self.gpu {
            dev.backend.copy_htod_pinned(&packed, buf)?;
        }
        self.packed = packed;
        Ok(())
    }
}

/// Normalise, resize and batch an uploaded batch into an [`ImageList`] on its
/// device, with the config it was uploaded for: on a GPU one launch of
/// `transform_batch_u8` for every image, writing the padding too (no memset); on
/// the CPU `image_from_u8` then [`transform`]. Both give the same bits (the kernel
/// does the CPU's float operations in the same order, none contracted).
pub fn transform_uploaded(batch: &UploadedBatch) -> Result<ImageList> {
    let cfg = &batch.cfg;
    let Some((dev, buf)) = &batch.gpu else {
        let images = batch
            .sizes
            .iter()
            .enumerate()
            .map(|(i, &(h, w))| {
                let off = read_offset(&batch.packed, i);
                image_from_u8(&batch.packed[off..off + 3 * h * w], h, w)
            })
            .collect::<Result<Vec<_>>>()?;
        return transform(&images, cfg);
    };
    let sizes: Vec<(usize, usize)> = batch
        .sizes
        .iter()
        .map(|&(h, w)| resized_size(h, w, cfg.min_size, cfg.max_size))
        .collect();
    let d = cfg.size_divisible.max(1);
    let ph = sizes.iter().map(|s| s.0).max().unwrap_or(0).div_ceil(d) * d;
    let pw = sizes.iter().map(|s| s.1).max().unwrap_or(0).div_ceil(d) * d;
    let n = sizes.len();
    if n > 65535 {
        return Err(Error::invalid(
            "transform_uploaded",
            format!("{n} images in one batch (at most 65535)"),
        ));
    }
    let out = Tensor::gpu_empty(dev, [n, 3, ph, pw])?;
    let (m, s) = (cfg.mean, cfg.std);
    let per_image = 3 * ph * pw;
    let mut lc = LaunchCfg::for_elems(per_image);
    lc.grid.1 = n as u32;
    let args = [
        buf.arg(),
        KernelArg::I32(n as i32),
        crate::ops::arg(&out)?,
        KernelArg::I32(ph as i32),
        KernelArg::I32(pw as i32),
        KernelArg::F32(m[0]),
        KernelArg::F32(m[1]),
        KernelArg::F32(m[2]),
        KernelArg::F32(s[0]),
        KernelArg::F32(s[1]),
        KernelArg::F32(s[2]),
    ];
    dev.launch("transform_batch_u8", lc, &args)?;
    Ok(ImageList {
        tensors: out,
        image_sizes: sizes,
    })
}

/// The offset of image `i`'s pixels in a packed batch.
fn read_offset(packed: &[u8], i: usize) -> usize {
    let at = i * HEADER_BYTES;
    let word = |k: usize| {
        let b = &packed[at + 4 * k..at + 4 * k + 4];
        u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as u64
    };
    (word(0) | (word(1) << 32)) as usize
}

/// [`upload_u8`] then [`transform_uploaded`]: 8-bit images to the model's input
/// batch with one host-to-device copy and one kernel launch.
pub fn transform_u8(
    images: &[ImageU8],
    cfg: &TransformConfig,
    device: Device,
) -> Result<ImageList> {
    transform_uploaded(&upload_u8(images, cfg, device)?)
}

/// Scale boxes `[K, 4]` (x1, y1, x2, y2) from an image of size `from` to size `to`
/// (height, width), with torchvision's f32 ratios `to / from`.
pub fn resize_boxes(boxes: &Tensor, from: (usize, usize), to: (usize, usize)) -> Result<Tensor> {
    if boxes.dims().len() != 2 || boxes.dims()[1] != 4 {
        return Err(Error::shape(
            "resize_boxes",
            format!("boxes of shape {}, expected [K, 4]", boxes.shape()),
        ));
    }
    let device = boxes.device();
    let v: Vec<[f32; 4]> = boxes
        .to_vec::<f32>()?
        .chunks_exact(4)
        .map(|b| [b[0], b[1], b[2], b[3]])
        .collect();
    let flat: Vec<f32> = resize_box_list(&v, from, to)
        .into_iter()
        .flatten()
        .collect();
    Tensor::from_vec(flat, boxes.shape().clone())?.to_device(device)
}

/// [`resize_boxes`] on host boxes: x scaled by `to.1 / from.1`, y by `to.0 / from.0`,
/// both ratios in f32 as torchvision computes them.
pub fn resize_box_list(
    boxes: &[[f32; 4]],
    from: (usize, usize),
    to: (usize, usize),
) -> Vec<[f32; 4]> {
    let rh = to.0 as f32 / from.0 as f32;
    let rw = to.1 as f32 / from.1 as f32;
    boxes
        .iter()
        .map(|b| [b[0] * rw, b[1] * rh, b[2] * rw, b[3] * rh])
        .collect()
}
