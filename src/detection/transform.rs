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

/// The batch's (height, width): the largest resized sides, rounded up to a multiple
/// of `size_divisible`.
fn padded_size(sizes: &[(usize, usize)], cfg: &TransformConfig) -> (usize, usize) {
    let d = cfg.size_divisible.max(1);
    let ph = sizes.iter().map(|s| s.0).max().unwrap_or(0).div_ceil(d) * d;
    let pw = sizes.iter().map(|s| s.1).max().unwrap_or(0).div_ceil(d) * d;
    (ph, pw)
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
    let (ph, pw) = padded_size(&sizes, cfg);
    let n = images.len();
    let tensors = match device {
        Device::Cpu => {
            let pixels = images
                .iter()
                .map(|im| {
                    Ok((
                        CpuPixels::F32(im.cpu_slice::<f32>()?),
                        im.dims()[1],
                        im.dims()[2],
                    ))
                })
                .collect::<Result<Vec<_>>>()?;
            Tensor::from_vec(transform_cpu(&pixels, &sizes, ph, pw, cfg), [n, 3, ph, pw])?
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

/// Where one image's pixels come from on the CPU: f32 in 0..1, or 8-bit bytes whose
/// value is `v / 255` (what [`image_from_u8`] makes).
#[derive(Clone, Copy)]
enum CpuPixels<'a> {
    F32(&'a [f32]),
    U8(&'a [u8]),
}

/// Bilinear taps of one output column or row, as PyTorch's upsample_bilinear2d
/// computes them (source clamped at 0, no "+1" past the edge): the two source
/// indices and their weights.
#[derive(Clone, Copy)]
struct Tap {
    i0: usize,
    i1: usize,
    l0: f32,
    l1: f32,
}

fn tap(scale: f32, o: usize, len: usize) -> Tap {
    let f = (scale * (o as f32 + 0.5) - 0.5).max(0.0);
    let i0 = f as usize;
    let i1 = i0 + usize::from(i0 < len - 1);
    let l1 = f - i0 as f32;
    Tap {
        i0,
        i1,
        l0: 1.0 - l1,
        l1,
    }
}

/// Output rows written per parallel task: enough to amortise the one or two source
/// rows a task blends again at its start, small enough to share 3 x 800 rows evenly
/// between threads.
const ROWS_PER_TASK: usize = 16;

/// The horizontal taps of every output column, by field (so that the blend over
/// contiguous columns vectorises).
struct Columns {
    i0: Vec<usize>,
    i1: Vec<usize>,
    l0: Vec<f32>,
    l1: Vec<f32>,
    /// Column x reads source columns x and x + 1 (x at the last one): the output
    /// is as wide as the source and the scale is 1.
    unit: bool,
}

impl Columns {
    fn new(w: usize, ow: usize) -> Columns {
        let sw = w as f32 / ow as f32;
        let taps: Vec<Tap> = (0..ow).map(|x| tap(sw, x, w)).collect();
        let unit = ow == w
            && taps
                .iter()
                .enumerate()
                .all(|(x, t)| t.i0 == x && t.i1 == (x + 1).min(w - 1));
        Columns {
            i0: taps.iter().map(|t| t.i0).collect(),
            i1: taps.iter().map(|t| t.i1).collect(),
            l0: taps.iter().map(|t| t.l0).collect(),
            l1: taps.iter().map(|t| t.l1).collect(),
            unit,
        }
    }

    /// `dst[x] = l0[x] * src[i0[x]] + l1[x] * src[i1[x]]` for every output column.
    fn blend(&self, src: &[f32], dst: &mut [f32]) {
        let w = src.len();
        if self.unit && w > 1 {
            let (body, last) = dst.split_at_mut(w - 1);
            for ((((o, &l0), &l1), &a), &b) in body
                .iter_mut()
                .zip(&self.l0)
                .zip(&self.l1)
                .zip(src)
                .zip(&src[1..])
            {
                *o = l0 * a + l1 * b;
            }
            last[0] = self.l0[w - 1] * src[w - 1] + self.l1[w - 1] * src[w - 1];
        } else {
            for (x, o) in dst.iter_mut().enumerate() {
                *o = self.l0[x] * src[self.i0[x]] + self.l1[x] * src[self.i1[x]];
            }
        }
    }
}

/// One image's source rows, normalised and blended horizontally on demand; the two
/// most recent are kept (consecutive output rows share source rows).
struct RowCache<'a> {
    px: CpuPixels<'a>,
    h: usize,
    w: usize,
    cfg: &'a TransformConfig,
    luts: &'a [[f32; 256]; 3],
    cols: &'a Columns,
    norm: Vec<f32>,
    /// (channel * h + row, blended row) per slot; `usize::MAX`: empty.
    rows: [(usize, Vec<f32>); 2],
}

impl RowCache<'_> {
    /// The slot holding source row `y` of channel `c` blended horizontally; when it
    /// is not there, it is made in slot `slot`.
    fn get(&mut self, c: usize, y: usize, slot: usize) -> usize {
        let key = c * self.h + y;
        if let Some(k) = self.rows.iter().position(|e| e.0 == key) {
            return k;
        }
        let (w, at) = (self.w, (c * self.h + y) * self.w);
        match self.px {
            CpuPixels::F32(p) => {
                let (mean, std) = (self.cfg.mean[c], self.cfg.std[c]);
                for (n, &v) in self.norm.iter_mut().zip(&p[at..at + w]) {
                    *n = (v - mean) / std;
                }
            }
            CpuPixels::U8(p) => {
                let lut = &self.luts[c];
                for (n, &v) in self.norm.iter_mut().zip(&p[at..at + w]) {
                    *n = lut[v as usize];
                }
            }
        }
        self.cols.blend(&self.norm, &mut self.rows[slot].1);
        self.rows[slot].0 = key;
        slot
    }
}

/// The padded batch `[N, 3, PH, PW]` on the CPU: every image normalised, resized to
/// its size in `sizes` and written into its slab, the padding written as zeros (no
/// separate zero fill). The twin of `resize_normalize_f32` / `transform_batch_u8`,
/// with the same float operations in the same order (checked bit for bit against
/// the per-pixel formula in tests/transform.rs), only arranged to be fast:
///
/// - each source pixel is normalised once (the per-pixel formula normalises each
///   of its four taps: four subtractions and divisions per output pixel), and an
///   8-bit pixel through a 256-entry table per channel (`(v / 255 - mean) / std`,
///   the same value);
/// - bilinear interpolation is separable in exactly these operations:
///   `ly0 * (lx0 * a + lx1 * b) + ly1 * (lx0 * c + lx1 * d)` is the vertical blend of
///   two horizontally blended source rows, so each source row is blended
///   horizontally once per task and reused by the output rows that read it;
/// - rows are written in parallel, straight into the batch buffer.
fn transform_cpu(
    images: &[(CpuPixels, usize, usize)],
    sizes: &[(usize, usize)],
    ph: usize,
    pw: usize,
    cfg: &TransformConfig,
) -> Vec<f32> {
    use rayon::prelude::*;
    let mut out = crate::tensor::pool::take::<f32>(images.len() * 3 * ph * pw);
    if out.is_empty() {
        return out;
    }
    let luts: [[f32; 256]; 3] = std::array::from_fn(|c| {
        std::array::from_fn(|v| (v as f32 / 255.0 - cfg.mean[c]) / cfg.std[c])
    });
    for (slab, (&(px, h, w), &(oh, ow))) in
        out.chunks_mut(3 * ph * pw).zip(images.iter().zip(sizes))
    {
        let sh = h as f32 / oh as f32;
        let cols = Columns::new(w, ow);
        slab.par_chunks_mut(ROWS_PER_TASK * pw)
            .enumerate()
            .for_each(|(t, rows)| {
                let mut cache = RowCache {
                    px,
                    h,
                    w,
                    cfg,
                    luts: &luts,
                    cols: &cols,
                    norm: vec![0.0; w],
                    rows: [(usize::MAX, vec![0.0; ow]), (usize::MAX, vec![0.0; ow])],
                };
                for (k, orow) in rows.chunks_mut(pw).enumerate() {
                    let r = t * ROWS_PER_TASK + k;
                    let (c, oy) = (r / ph, r % ph);
                    if oy >= oh {
                        orow.fill(0.0);
                        continue;
                    }
                    let ty = tap(sh, oy, h);
                    let a = cache.get(c, ty.i0, 0);
                    // The other slot for the second row, so that the first stays.
                    let b = cache.get(c, ty.i1, 1 - a);
                    let (top, bot) = (&cache.rows[a].1, &cache.rows[b].1);
                    let (img, pad) = orow.split_at_mut(ow);
                    for ((o, &u), &v) in img.iter_mut().zip(top).zip(bot) {
                        *o = ty.l0 * u + ty.l1 * v;
                    }
                    pad.fill(0.0);
                }
            });
    }
    out
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
/// the CPU the bytes are read where they lie, with the result of `image_from_u8`
/// then [`transform`]. Both give the same bits (the kernel does the CPU's float
/// operations in the same order, none contracted).
pub fn transform_uploaded(batch: &UploadedBatch) -> Result<ImageList> {
    let cfg = &batch.cfg;
    let sizes: Vec<(usize, usize)> = batch
        .sizes
        .iter()
        .map(|&(h, w)| resized_size(h, w, cfg.min_size, cfg.max_size))
        .collect();
    let (ph, pw) = padded_size(&sizes, cfg);
    let n = sizes.len();
    let Some((dev, buf)) = &batch.gpu else {
        let pixels: Vec<_> = batch
            .sizes
            .iter()
            .enumerate()
            .map(|(i, &(h, w))| {
                let off = read_offset(&batch.packed, i);
                (CpuPixels::U8(&batch.packed[off..off + 3 * h * w]), h, w)
            })
            .collect();
        let out = transform_cpu(&pixels, &sizes, ph, pw, cfg);
        return Ok(ImageList {
            tensors: Tensor::from_vec(out, [n, 3, ph, pw])?,
            image_sizes: sizes,
        });
    };
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
