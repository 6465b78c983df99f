//! Anchor generation with torchvision's `AnchorGenerator` semantics.
//!
//! Per level, the cell anchors are `round([-w, -h, w, h] / 2)` (round half to even)
//! with, in f32, `h_ratio = sqrt(ratio)`, `w_ratio = 1 / h_ratio`, `w = w_ratio *
//! size`, `h = h_ratio * size`, ordered ratio-major then size. A level's anchors are
//! those cell anchors shifted by `(x * stride_w, y * stride_h)` for every location of
//! its grid, locations row-major and cell anchors innermost; `stride = image_size /
//! grid_size` with integer division per axis (so P6 of an 800-high image has stride
//! 61, not 64). Levels are concatenated in order.
//!
//! On CUDA the anchors are generated on the device by one kernel launch per level;
//! only the few cell anchors are uploaded, once per device (cached here), never the
//! anchors themselves.

use std::collections::HashMap;
use std::sync::Mutex;

use crate::device::gpu::KernelArg;
use crate::device::Device;
use crate::error::{Error, Result};
use crate::ops::{arg, launch_elems};
use crate::tensor::Tensor;

/// Anchors for FPN levels: `sizes[l]` and `aspect_ratios[l]` (height / width) give
/// `sizes[l].len() * aspect_ratios[l].len()` anchors per location of level `l`.
pub struct AnchorGenerator {
    sizes: Vec<Vec<f64>>,
    aspect_ratios: Vec<Vec<f64>>,
    cells: Vec<Vec<[f32; 4]>>,
    device_cells: Mutex<HashMap<usize, Tensor>>,
}

impl Clone for AnchorGenerator {
    fn clone(&self) -> Self {
        AnchorGenerator {
            sizes: self.sizes.clone(),
            aspect_ratios: self.aspect_ratios.clone(),
            cells: self.cells.clone(),
            device_cells: Mutex::new(HashMap::new()),
        }
    }
}

impl std::fmt::Debug for AnchorGenerator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AnchorGenerator")
            .field("sizes", &self.sizes)
            .field("aspect_ratios", &self.aspect_ratios)
            .finish()
    }
}

impl AnchorGenerator {
    /// A generator with the given sizes (pixels) and aspect ratios per level; errors
    /// when the level counts differ or a size or ratio is not positive and finite.
    pub fn new(sizes: Vec<Vec<f64>>, aspect_ratios: Vec<Vec<f64>>) -> Result<Self> {
        if sizes.len() != aspect_ratios.len() {
            return Err(Error::invalid(
                "AnchorGenerator",
                format!(
                    "{} levels of sizes and {} of aspect ratios",
                    sizes.len(),
                    aspect_ratios.len()
                ),
            ));
        }
        let bad = |v: &f64| !(v.is_finite() && *v > 0.0);
        if sizes
            .iter()
            .chain(&aspect_ratios)
            .any(|l| l.is_empty() || l.iter().any(bad))
        {
            return Err(Error::invalid(
                "AnchorGenerator",
                format!("sizes {sizes:?} and aspect ratios {aspect_ratios:?} must be non-empty, positive and finite"),
            ));
        }
        let cells = sizes
            .iter()
            .zip(&aspect_ratios)
            .map(|(s, r)| cell_anchors(s, r))
            .collect();
        Ok(AnchorGenerator {
            sizes,
            aspect_ratios,
            cells,
            device_cells: Mutex::new(HashMap::new()),
        })
    }

    /// torchvision's FPN default: sizes 32, 64, 128, 256, 512 (one per level), ratios
    /// (0.5, 1, 2) on every level.
    pub fn fpn_default() -> Self {
        let sizes = [32.0, 64.0, 128.0, 256.0, 512.0]
            .iter()
            .map(|&s| vec![s])
            .collect();
        Self::new(sizes, vec![vec![0.5, 1.0, 2.0]; 5]).expect("the defaults are valid")
    }

    /// Number of levels.
    pub fn num_levels(&self) -> usize {
        self.cells.len()
    }

    /// Anchors per location of each level.
    pub fn num_anchors_per_location(&self) -> Vec<usize> {
        self.cells.iter().map(Vec::len).collect()
    }

    /// The cell anchors of each level, `[x1, y1, x2, y2]` centred on 0 (pixels).
    pub fn cell_anchors(&self) -> &[Vec<[f32; 4]>] {
        &self.cells
    }

    /// Strides `(image_h / grid_h, image_w / grid_w)` (integer division) per level.
    pub fn strides(
        image_size: (usize, usize),
        grid_sizes: &[(usize, usize)],
    ) -> Result<Vec<(usize, usize)>> {
        grid_sizes
            .iter()
            .map(|&(gh, gw)| {
                if gh == 0 || gw == 0 {
                    return Err(Error::invalid(
                        "AnchorGenerator",
                        format!("grid size ({gh}, {gw}) is empty"),
                    ));
                }
                Ok((image_size.0 / gh, image_size.1 / gw))
            })
            .collect()
    }

    /// All anchors `[A, 4]` (f32, pixels) of one image of the padded batch size
    /// `image_size = (height, width)` with feature grids `grid_sizes[l] = (h, w)`,
    /// levels concatenated; `A = sum_l h_l * w_l * anchors_per_location_l`.
    pub fn anchors(
        &self,
        image_size: (usize, usize),
        grid_sizes: &[(usize, usize)],
        device: Device,
    ) -> Result<Tensor> {
        if grid_sizes.len() != self.num_levels() {
            return Err(Error::invalid(
                "AnchorGenerator::anchors",
                format!(
                    "{} grids for {} levels",
                    grid_sizes.len(),
                    self.num_levels()
                ),
            ));
        }
        let strides = Self::strides(image_size, grid_sizes)?;
        let total: usize = grid_sizes
            .iter()
            .zip(&self.cells)
            .map(|(&(gh, gw), c)| gh * gw * c.len())
            .sum();
        match device {
            Device::Cpu => {
                // Every element is written (each level's rows, each row's cells).
                let mut out = crate::tensor::pool::take::<f32>(4 * total);
                let mut rest = &mut out[..];
                for ((&(gh, gw), &(sh, sw)), cells) in
                    grid_sizes.iter().zip(&strides).zip(&self.cells)
                {
                    let (level, tail) = rest.split_at_mut(4 * gh * gw * cells.len());
                    rest = tail;
                    // One grid row per task: 4 * gw * cells f32 values.
                    crate::device::cpu::for_chunks(level, 4 * gw * cells.len(), |y, row| {
                        let sy = y as f32 * sh as f32;
                        for (x, loc) in row.chunks_exact_mut(4 * cells.len()).enumerate() {
                            let sx = x as f32 * sw as f32;
                            for (b, o) in cells.iter().zip(loc.chunks_exact_mut(4)) {
                                o.copy_from_slice(&[sx + b[0], sy + b[1], sx + b[2], sy + b[3]]);
                            }
                        }
                    });
                }
                Tensor::from_vec(out, [total, 4])
            }
            Device::Cuda(n) => {
                let dev = crate::device::gpu::device(n)?;
                let cells = self.device_cells(device)?;
                let out = Tensor::gpu_empty(&dev, [total, 4])?;
                let (mut out_off, mut cell_off) = (0usize, 0usize);
                for ((&(gh, gw), &(sh, sw)), c) in grid_sizes.iter().zip(&strides).zip(&self.cells)
                {
                    let count = gh * gw * c.len();
                    launch_elems(
                        &dev,
                        "anchors_grid_f32",
                        count,
                        &[
                            arg(&cells)?,
                            KernelArg::I64(cell_off as i64),
                            KernelArg::I64(c.len() as i64),
                            KernelArg::I64(gh as i64),
                            KernelArg::I64(gw as i64),
                            KernelArg::I64(sh as i64),
                            KernelArg::I64(sw as i64),
                            arg(&out)?,
                            KernelArg::I64(out_off as i64),
                        ],
                    )?;
                    out_off += count;
                    cell_off += c.len();
                }
                Ok(out)
            }
        }
    }

    /// The cell anchors of all levels on `device` (uploaded on first use).
    fn device_cells(&self, device: Device) -> Result<Tensor> {
        let Device::Cuda(n) = device else {
            return Err(Error::invalid(
                "AnchorGenerator",
                "device cells are for CUDA",
            ));
        };
        let mut cache = self.device_cells.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(t) = cache.get(&n) {
            return Ok(t.clone());
        }
        let flat: Vec<f32> = self.cells.iter().flatten().flatten().copied().collect();
        let count = flat.len() / 4;
        let t = {
            let _long = crate::device::alloc::long_lived();
            Tensor::from_vec(flat, [count, 4])?.to_device(device)?
        };
        cache.insert(n, t.clone());
        Ok(t)
    }
}

/// torchvision's `generate_anchors` in f32: ratio-major, then size.
fn cell_anchors(sizes: &[f64], ratios: &[f64]) -> Vec<[f32; 4]> {
    let mut out = Vec::with_capacity(sizes.len() * ratios.len());
    for &r in ratios {
        let h_ratio = (r as f32).sqrt();
        let w_ratio = 1.0f32 / h_ratio;
        for &s in sizes {
            let (w, h) = (w_ratio * s as f32, h_ratio * s as f32);
            out.push([-w, -h, w, h].map(|v| (v / 2.0).round_ties_even()));
        }
    }
    out
}
