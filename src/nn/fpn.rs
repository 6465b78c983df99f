//! torchvision's FeaturePyramidNetwork with LastLevelMaxPool.

use super::fold::{conv_fused, fusable_plain};
use super::{Conv2d, Ctx, Init, ParamSpec};
use crate::error::{Error, Result};
use crate::ops::pool::max_pool2d;
use crate::ops::upsample::upsample_nearest_add;
use crate::tensor::Tensor;

/// FPN over C2..C5 giving P2..P5 and P6 ("pool": a stride-2 max pool of P5).
pub struct Fpn {
    inner: Vec<Conv2d>,
    layer: Vec<Conv2d>,
    /// Channels of every output level.
    pub out_channels: usize,
}

impl Fpn {
    /// Tensors named `{prefix}inner_blocks.{i}.0.*` and `{prefix}layer_blocks.{i}.0.*`.
    pub fn new(prefix: &str, in_channels: &[usize], out_channels: usize) -> Fpn {
        // torchvision: kaiming_uniform_(a=1) => bound sqrt(3 / fan_in); bias 0.
        let conv = |name: String, cin: usize, k: usize, p: usize| {
            let bound = (3.0 / (cin * k * k) as f32).sqrt();
            Conv2d::new(name, cin, out_channels, k, 1, p, true).with_init(Init::Uniform(bound))
        };
        let inner = in_channels
            .iter()
            .enumerate()
            .map(|(i, &c)| conv(format!("{prefix}inner_blocks.{i}.0"), c, 1, 0))
            .collect();
        let layer = (0..in_channels.len())
            .map(|i| conv(format!("{prefix}layer_blocks.{i}.0"), out_channels, 3, 1))
            .collect();
        Fpn {
            inner,
            layer,
            out_channels,
        }
    }

    /// The tensors of the FPN (biases start at zero, as torchvision's).
    pub fn specs(&self, out: &mut Vec<ParamSpec>) {
        for c in self.inner.iter().chain(&self.layer) {
            let start = out.len();
            c.specs(out);
            for s in &mut out[start..] {
                if s.name.ends_with(".bias") {
                    s.init = Init::Const(0.0);
                }
            }
        }
    }

    /// [C2..C5] to [P2, P3, P4, P5, P6].
    pub fn forward(&self, ctx: &Ctx, feats: &[Tensor]) -> Result<Vec<Tensor>> {
        self.forward_owned(ctx, feats.to_vec())
    }

    /// [`Fpn::forward`] taking the backbone's maps: without other holders, each
    /// C_i is freed once its lateral conv has read it, and each lateral once it
    /// is added. At 800x1216, batch 1, the P2 step otherwise held C2..C5
    /// (116 MiB) and the P2 lateral (62 MiB) beside the merged map and P2: by the
    /// map sizes, the 320 MiB the host pool counted live at inference's peak.
    pub fn forward_owned(&self, ctx: &Ctx, mut feats: Vec<Tensor>) -> Result<Vec<Tensor>> {
        if feats.len() != self.inner.len() {
            return Err(Error::invalid(
                "fpn",
                format!(
                    "{} feature maps for {} levels",
                    feats.len(),
                    self.inner.len()
                ),
            ));
        }
        let n = feats.len();
        // Without a tape the bias rides in the conv's epilogue (no extra pass).
        let fused = fusable_plain();
        let conv = |c: &Conv2d, x: &Tensor| {
            if fused {
                conv_fused(ctx, c, x, false)
            } else {
                c.forward(ctx, x)
            }
        };
        let missing = || Error::invalid("fpn", "no feature maps");
        let top = feats.pop().ok_or_else(missing)?;
        let mut last_inner = conv(&self.inner[n - 1], &top)?;
        drop(top);
        let mut results = vec![conv(&self.layer[n - 1], &last_inner)?];
        for i in (0..n - 1).rev() {
            let c = feats.pop().ok_or_else(missing)?;
            let lateral = conv(&self.inner[i], &c)?;
            drop(c);
            last_inner = upsample_nearest_add(&lateral, &last_inner)?;
            drop(lateral);
            results.insert(0, conv(&self.layer[i], &last_inner)?);
        }
        let pool = max_pool2d(&results[n - 1], 1, 2, 0)?;
        results.push(pool);
        Ok(results)
    }
}
