//! Chains of tensor-core convolutions on bf16 channels-last activations, so that a
//! ResNet bottleneck block in inference is three conv launches and nothing else.
//!
//! [`conv2d_tc`](super::conv2d_tc) takes NCHW and packs it to the kernels' bf16 NHWC
//! layout (one launch) before every conv, and writes NCHW. A [`TcActivation`] is the
//! kernels' own layout kept between layers: the forward kernel's epilogue writes it
//! directly (channels padded to a multiple of 8, the padding written as zeros, which
//! the next conv multiplies by its zero weight padding: poisoned memory there would
//! turn into NaN) and reads a residual in it. Only the entry of a chain
//! ([`TcActivation::from_nchw`], one launch) and its exit ([`TcActivation::to_nchw`],
//! one launch, or a consumer that reads [`TcActivation::nhwc`]) cost a launch besides
//! the convolutions.
//!
//! Results equal those of the NCHW path with bf16 outputs bit for bit: the same kernel
//! accumulates in the same order and rounds once to bf16; only the addresses differ.
//! On the CPU the same types run the bf16 reference, and a chained activation is
//! kept as the reference's f32 product reads it: NCHW f32 holding bf16 values (no
//! layout change, no widening per conv; the weights are rounded once, when packed),
//! each conv the f32 convolution with its epilogue in its output tiles and one pass
//! that applies ReLU and rounds (bit for bit the reference's separate passes; see
//! `conv2d_rounded_cpu`). [`TcActivation::nhwc`] lays it out channels-last on demand.

use super::{
    alloc_bf16, conv2d_rounded_cpu_f32, dims4, epilogue_args, float_input, fwd_kernel,
    fwd_output_size, gpu_of, i32_of, launch_1d, pack_nhwc, pad8, round_to_bf16, TcConvWeight, NHWC,
};
use crate::device::gpu::KernelArg;
use crate::device::Device;
use crate::error::{Error, Result};
use crate::ops::conv2d::Conv2dParams;
use crate::ops::fused::Epilogue;
use crate::tensor::{DType, Tensor};

/// An activation `[N, C, H, W]` stored as bf16 NHWC `[N, H, W, Cp]`, `Cp` = C rounded
/// up to 8 with zeros in the padding: the layout the tensor-core convolutions read
/// and, in a chain, write. On the CPU: f32 `[N, C, H, W]` holding bf16 values, what
/// the CPU reference's f32 product reads.
#[derive(Clone, Debug)]
pub struct TcActivation {
    data: Tensor,
    channels: usize,
}

impl TcActivation {
    /// Enter a chain: `x` `[N, C, H, W]` (f32 or bf16) rounded to bf16 and laid out
    /// channels-last (one launch on CUDA).
    pub fn from_nchw(x: &Tensor) -> Result<Self> {
        const OP: &str = "TcActivation::from_nchw";
        float_input(OP, x)?;
        let [_, c, _, _] = dims4(OP, x)?;
        let cp = pad8(c);
        let data = match x.device() {
            Device::Cuda(_) => pack_nhwc(OP, x, cp)?,
            Device::Cpu => round_to_bf16(x)?,
        };
        Ok(TcActivation { data, channels: c })
    }

    /// Leave a chain: the activation as NCHW `[N, C, H, W]` in `dtype` (f32 or bf16;
    /// one launch on CUDA).
    pub fn to_nchw(&self, dtype: DType) -> Result<Tensor> {
        const OP: &str = "TcActivation::to_nchw";
        let [n, c, h, w] = self.dims();
        let cp = self.channels_padded();
        if !matches!(dtype, DType::F32 | DType::BF16) {
            return Err(Error::DType {
                op: OP,
                dtype: dtype.to_string(),
                msg: "a chain leaves as f32 or bf16".into(),
            });
        }
        match self.device() {
            Device::Cuda(_) => {
                let dev = gpu_of(OP, &self.data)?;
                let numel = n * c * h * w;
                let buf = dev.alloc(numel.max(1) * dtype.size())?;
                let out = Tensor::from_gpu_typed(dev.clone(), buf, vec![n, c, h, w], dtype);
                launch_1d(
                    &dev,
                    "tc_unpack_nhwc_bf16",
                    numel,
                    &[
                        self.data.gpu()?.buf.arg(),
                        out.gpu()?.buf.arg(),
                        KernelArg::I32(i32_of(OP, "N", n)?),
                        KernelArg::I32(i32_of(OP, "C", c)?),
                        KernelArg::I32(i32_of(OP, "H", h)?),
                        KernelArg::I32(i32_of(OP, "W", w)?),
                        KernelArg::I32(i32_of(OP, "Cp", cp)?),
                        KernelArg::I32((dtype == DType::BF16) as i32),
                    ],
                )?;
                Ok(out)
            }
            // Already the values; bf16 is an exact rounding of them.
            Device::Cpu => self.data.to_dtype(dtype),
        }
    }

    /// `[N, C, H, W]` of the activation (logical channels, not padded).
    pub fn dims(&self) -> [usize; 4] {
        let d = self.data.dims();
        match self.device() {
            Device::Cpu => [d[0], d[1], d[2], d[3]],
            Device::Cuda(_) => [d[0], self.channels, d[1], d[2]],
        }
    }

    /// `Cp`: the stored channel count (C rounded up to 8).
    pub fn channels_padded(&self) -> usize {
        pad8(self.channels)
    }

    /// The activation as the kernels store it: bf16 `[N, H, W, Cp]`, channels past C
    /// zero. For consumers that read channels-last directly (on CUDA the storage
    /// itself; on the CPU laid out on demand).
    pub fn nhwc(&self) -> Result<Tensor> {
        match self.device() {
            Device::Cuda(_) => Ok(self.data.clone()),
            Device::Cpu => {
                let [n, c, h, w] = self.dims();
                let cp = self.channels_padded();
                let v = self.data.to_dtype(DType::BF16)?.to_vec_bf16()?;
                let mut out = vec![half::bf16::ZERO; n * h * w * cp];
                for ni in 0..n {
                    for ci in 0..c {
                        for p in 0..h * w {
                            out[(ni * h * w + p) * cp + ci] = v[(ni * c + ci) * h * w + p];
                        }
                    }
                }
                Tensor::from_vec_bf16(out, [n, h, w, cp])
            }
        }
    }

    /// The device the activation lives on.
    pub fn device(&self) -> Device {
        self.data.device()
    }
}

/// The fused epilogue of a chained convolution: `act(acc * scale + shift + residual)`,
/// output bf16 channels-last.
#[derive(Clone, Copy, Debug, Default)]
pub struct ChainEpilogue<'a> {
    /// Per-output-channel multiplier `[Cout]` f32 (a folded frozen BN's scale).
    pub scale: Option<&'a Tensor>,
    /// Per-output-channel offset `[Cout]` f32 (a bias, or a folded BN's shift).
    pub shift: Option<&'a Tensor>,
    /// Added after the affine part; dims of the output.
    pub residual: Option<&'a TcActivation>,
    /// Apply ReLU last.
    pub relu: bool,
}

/// One convolution of a chain: `x` channels-last in, the output channels-last out,
/// epilogue fused (CUDA: exactly one launch; CPU: the bf16 reference). Equal bit for
/// bit to [`conv2d_tc_packed`](super::conv2d_tc_packed) with a bf16 output on the same
/// values.
pub fn conv2d_tc_nhwc(
    x: &TcActivation,
    w: &TcConvWeight,
    p: &Conv2dParams,
    ep: &ChainEpilogue,
) -> Result<TcActivation> {
    const OP: &str = "conv2d_tc_nhwc";
    let xd = x.dims();
    let (oh, ow) = fwd_output_size(OP, xd, w, p)?;
    let cout = w.dims()[0];
    let y_dims = [xd[0], cout, oh, ow];
    let dev = x.device();
    if w.device() != dev {
        return Err(Error::invalid(
            OP,
            format!("x on {dev:?} with packed weights on {:?}", w.device()),
        ));
    }
    if let Some(r) = ep.residual {
        if r.dims() != y_dims || r.device() != dev {
            return Err(Error::shape(
                OP,
                format!(
                    "residual {:?} on {:?} for an output {y_dims:?} on {dev:?}",
                    r.dims(),
                    r.device()
                ),
            ));
        }
    }
    let flat = Epilogue {
        scale: ep.scale,
        shift: ep.shift,
        residual: None,
        relu: ep.relu,
        out_dtype: Some(DType::BF16),
    };
    flat.check(OP, cout, &y_dims, dev)?;
    match dev {
        Device::Cpu => {
            let ep = Epilogue {
                residual: ep.residual.map(|r| &r.data),
                out_dtype: None,
                ..flat
            };
            let data = conv2d_rounded_cpu_f32(&x.data, &w.packed, p, &ep)?;
            Ok(TcActivation {
                data,
                channels: cout,
            })
        }
        Device::Cuda(_) => {
            let gdev = gpu_of(OP, &x.data)?;
            let y = alloc_bf16(&gdev, &[xd[0], oh, ow, pad8(cout)])?;
            let ep = Epilogue {
                residual: ep.residual.map(|r| &r.data),
                ..flat
            };
            let (ep_args, flags) = epilogue_args(OP, &ep, DType::BF16, &x.data)?;
            fwd_kernel(
                OP,
                "tc_conv_fwd_bf16",
                &x.data,
                xd,
                w,
                p,
                &y,
                ep_args,
                flags | NHWC,
                None,
            )?;
            Ok(TcActivation {
                data: y,
                channels: cout,
            })
        }
    }
}

/// A convolution with its folded frozen BatchNorm (or bias), packed once: the unit of
/// a chain. Build it when the weights change, not per call.
#[derive(Clone, Debug)]
pub struct TcConv {
    /// The packed weights `[Cout, Cin, kh, kw]`.
    pub weight: TcConvWeight,
    /// Per-channel scale `[Cout]` f32 (`ops::fold_frozen_bn`'s first output).
    pub scale: Option<Tensor>,
    /// Per-channel shift `[Cout]` f32 (a folded BN's shift or a bias).
    pub shift: Option<Tensor>,
    /// Stride, padding, dilation.
    pub params: Conv2dParams,
}

impl TcConv {
    /// Pack `w` `[Cout, Cin, kh, kw]` and keep the epilogue's `scale`/`shift` (on the
    /// weights' device).
    pub fn new(
        w: &Tensor,
        scale: Option<Tensor>,
        shift: Option<Tensor>,
        params: Conv2dParams,
    ) -> Result<Self> {
        Ok(TcConv {
            weight: TcConvWeight::new(w)?,
            scale,
            shift,
            params,
        })
    }

    /// `act(conv(x) * scale + shift + residual)`, channels-last (one launch on CUDA).
    pub fn forward(
        &self,
        x: &TcActivation,
        residual: Option<&TcActivation>,
        relu: bool,
    ) -> Result<TcActivation> {
        conv2d_tc_nhwc(
            x,
            &self.weight,
            &self.params,
            &ChainEpilogue {
                scale: self.scale.as_ref(),
                shift: self.shift.as_ref(),
                residual,
                relu,
            },
        )
    }
}

/// A ResNet bottleneck block in inference (frozen BN folded into each conv):
/// `relu(conv3(relu(conv2(relu(conv1(x))))) + identity)`, identity = `downsample(x)`
/// or `x`. Three launches on CUDA (four with a downsample), nothing else.
#[derive(Clone, Debug)]
pub struct TcBottleneck {
    /// 1x1 reduce.
    pub conv1: TcConv,
    /// 3x3 (carries the block's stride in torchvision's ResNet v1.5).
    pub conv2: TcConv,
    /// 1x1 expand.
    pub conv3: TcConv,
    /// 1x1 projection of the identity when shape changes.
    pub downsample: Option<TcConv>,
}

impl TcBottleneck {
    /// The block on a channels-last activation.
    pub fn forward(&self, x: &TcActivation) -> Result<TcActivation> {
        let y = self.conv1.forward(x, None, true)?;
        let y = self.conv2.forward(&y, None, true)?;
        let id = self
            .downsample
            .as_ref()
            .map(|d| d.forward(x, None, false))
            .transpose()?;
        self.conv3.forward(&y, Some(id.as_ref().unwrap_or(x)), true)
    }
}

/// A ResNet basic block (ResNet-18/34) in inference:
/// `relu(conv2(relu(conv1(x))) + identity)`. Two launches on CUDA (three with a
/// downsample).
#[derive(Clone, Debug)]
pub struct TcBasicBlock {
    /// 3x3 (carries the block's stride).
    pub conv1: TcConv,
    /// 3x3.
    pub conv2: TcConv,
    /// 1x1 projection of the identity when shape changes.
    pub downsample: Option<TcConv>,
}

impl TcBasicBlock {
    /// The block on a channels-last activation.
    pub fn forward(&self, x: &TcActivation) -> Result<TcActivation> {
        let y = self.conv1.forward(x, None, true)?;
        let id = self
            .downsample
            .as_ref()
            .map(|d| d.forward(x, None, false))
            .transpose()?;
        self.conv2.forward(&y, Some(id.as_ref().unwrap_or(x)), true)
    }
}
