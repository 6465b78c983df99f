//! Matching anchors (or proposals) to ground-truth boxes by IoU, with torchvision's
//! `Matcher` semantics.
//!
//! For each anchor (column of the `[G, A]` quality matrix) the best gt is the first
//! row of maximal IoU (torch's `max(dim=0)`; a NaN counts as the maximum, the first
//! NaN wins). Its match is that gt if the IoU is `>= high`, [`BETWEEN_THRESHOLDS`]
//! (-2) if in `[low, high)`, [`BELOW_LOW_THRESHOLD`] (-1) if `< low`; thresholds are
//! compared in the matrix's float type, as torch compares a tensor with a Python
//! float. A NaN best IoU is neither below nor between, so it keeps its gt index.
//! With `allow_low_quality_matches`, every anchor whose IoU with some gt equals that
//! gt's maximum over all anchors (ties included; a NaN maximum equals nothing) gets
//! its best gt back, even below `low` — torchvision's exact rule, which restores the
//! anchor's own best gt, not necessarily the gt it tied for.
//!
//! No gt rows (G = 0): torchvision raises; here every anchor is -1. Not
//! differentiable (integer output).

use crate::device::gpu::{KernelArg, LaunchCfg};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::ops::{arg, gpu_dev, launch_elems};
use crate::tensor::{DType, Element, Tensor};
use crate::with_dtype;

/// Match value of an anchor whose best IoU is below the low threshold.
pub const BELOW_LOW_THRESHOLD: i64 = -1;
/// Match value of an anchor whose best IoU is in `[low, high)`.
pub const BETWEEN_THRESHOLDS: i64 = -2;

/// IoU thresholds and the low-quality rule: (0.7, 0.3, true) for the RPN, (0.5,
/// 0.5, false) for the box head.
#[derive(Clone, Debug, PartialEq)]
pub struct Matcher {
    /// IoU at or above which a match is foreground.
    pub high_threshold: f64,
    /// IoU below which a prediction is background.
    pub low_threshold: f64,
    /// Also match each ground truth to its best predictions.
    pub allow_low_quality_matches: bool,
}

impl Matcher {
    /// Errors unless `low <= high` (both numbers).
    pub fn new(
        high_threshold: f64,
        low_threshold: f64,
        allow_low_quality_matches: bool,
    ) -> Result<Self> {
        if low_threshold.is_nan() || high_threshold.is_nan() || low_threshold > high_threshold {
            return Err(Error::invalid(
                "Matcher",
                format!("low threshold {low_threshold} must be <= high threshold {high_threshold}"),
            ));
        }
        Ok(Matcher {
            high_threshold,
            low_threshold,
            allow_low_quality_matches,
        })
    }

    /// Matches `[A]` (i64: gt index, -1 or -2) for the quality matrix `[G, A]`.
    pub fn matches(&self, match_quality: &Tensor) -> Result<Tensor> {
        let (g, a) = match match_quality.dims() {
            [g, a] => (*g, *a),
            d => {
                return Err(Error::shape(
                    "Matcher",
                    format!("quality matrix must be [G, A], got {d:?}"),
                ))
            }
        };
        let (low, high) = (self.low_threshold, self.high_threshold);
        if low.is_nan() || high.is_nan() || low > high {
            return Err(Error::invalid("Matcher", format!("thresholds {self:?}")));
        }
        if match_quality.dtype() == DType::I64 {
            return Err(Error::DType {
                op: "Matcher",
                dtype: "i64".into(),
                msg: "the quality matrix must be a float tensor".into(),
            });
        }
        if g == 0 || a == 0 {
            return Tensor::full(
                [a],
                BELOW_LOW_THRESHOLD as f64,
                DType::I64,
                match_quality.device(),
            );
        }
        match match_quality.device() {
            Device::Cpu => with_dtype!(match_quality.dtype(), T => {
                let m = self.matches_cpu(match_quality.cpu_slice::<T>()?, g, a);
                Tensor::from_vec_i64(m, [a])
            }),
            Device::Cuda(_) => self.matches_cuda(match_quality, g, a),
        }
    }

    fn matches_cpu<T: Element>(&self, iou: &[T], g: usize, a: usize) -> Vec<i64> {
        let (high, low) = (T::of(self.high_threshold), T::of(self.low_threshold));
        let rowmax: Vec<T> = if self.allow_low_quality_matches {
            iou.chunks_exact(a)
                .map(|row| row.iter().copied().fold(row[0], nan_max))
                .collect()
        } else {
            Vec::new()
        };
        (0..a)
            .map(|j| {
                let (best, arg) = best_gt(iou, g, a, j);
                let mut m = arg as i64;
                if best < low {
                    m = BELOW_LOW_THRESHOLD;
                } else if best >= low && best < high {
                    m = BETWEEN_THRESHOLDS;
                }
                if self.allow_low_quality_matches && (0..g).any(|r| iou[r * a + j] == rowmax[r]) {
                    m = arg as i64;
                }
                m
            })
            .collect()
    }

    fn matches_cuda(&self, iou: &Tensor, g: usize, a: usize) -> Result<Tensor> {
        let dev = gpu_dev("Matcher", iou)?;
        let rowmax = Tensor::gpu_empty(&dev, [g])?;
        if self.allow_low_quality_matches {
            dev.launch(
                "matcher_gt_max_f32",
                LaunchCfg {
                    grid: (g as u32, 1, 1),
                    block: (256, 1, 1),
                    shared_bytes: 0,
                },
                &[arg(iou)?, KernelArg::I64(a as i64), arg(&rowmax)?],
            )?;
        }
        let out = Tensor::gpu_empty_i64(&dev, [a])?;
        launch_elems(
            &dev,
            "matcher_assign_f32",
            a,
            &[
                arg(iou)?,
                KernelArg::I64(g as i64),
                KernelArg::I64(a as i64),
                arg(&rowmax)?,
                KernelArg::F32(self.high_threshold as f32),
                KernelArg::F32(self.low_threshold as f32),
                KernelArg::I32(self.allow_low_quality_matches as i32),
                out.gpu()?.buf.arg(),
            ],
        )?;
        Ok(out)
    }
}

/// torch's `max` with NaN winning.
fn nan_max<T: Element>(m: T, v: T) -> T {
    if m.is_nan() {
        m
    } else if v.is_nan() || m < v {
        v
    } else {
        m
    }
}

/// torch's `max(dim=0)` for column `j`: the first maximum, or the first NaN.
fn best_gt<T: Element>(iou: &[T], g: usize, a: usize, j: usize) -> (T, usize) {
    let (mut best, mut arg) = (iou[j], 0);
    for r in 0..g {
        let v = iou[r * a + j];
        // torch's `!(v <= best)`: also true when either is NaN.
        if v > best || v.is_nan() || best.is_nan() {
            best = v;
            arg = r;
            if v.is_nan() {
                break;
            }
        }
    }
    (best, arg)
}
