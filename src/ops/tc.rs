//! Convolution and linear layers in bf16 on tensor cores (kernels/tc_conv.cu), with
//! the fused epilogue of [`crate::ops::fused`], and their CPU reference.
//!
//! Semantics (both devices): inputs are rounded to bf16 (nearest even), products are
//! accumulated in f32, the epilogue `act(acc * scale + shift + residual)` runs in f32,
//! and the output is rounded to bf16 when bf16 is asked for. The CPU reference does
//! exactly that with the f32 CPU ops on bf16-rounded values; the CUDA kernels gather
//! their tiles from bf16 NHWC copies of the activations (channels padded to a
//! multiple of 8) inside the GEMM, so no im2col matrix is ever allocated. The two
//! differ only in the order of the f32 accumulation (see tests/tensor_core.rs for the
//! tolerance).
//!
//! A linear layer `x [M, K] @ w[N, K]^T` is the 1x1 convolution of `M` images of one
//! pixel, so it runs on the same kernels.

pub mod chain;

use crate::device::gpu::{GpuDevice, KernelArg, LaunchCfg};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::ops::conv2d::{
    conv2d_backward_input, conv2d_backward_weight, conv2d_forward, conv2d_output_size, Conv2dParams,
};
use crate::ops::fused::{apply_unfused, Epilogue};
use crate::tensor::{DType, Tensor};

/// Launch geometry of the tensor-core kernels (kernels/tc_conv.cu): 64 x 64 output
/// tiles, 128 threads.
const TILE: usize = 64;
const THREADS: u32 = 128;

// Epilogue flags, as kernels/tc_conv.cu defines them.
const RELU: i32 = 1;
const OUT_BF16: i32 = 2;
const RES_BF16: i32 = 4;
const HAS_SCALE: i32 = 8;
const HAS_SHIFT: i32 = 16;
const HAS_RES: i32 = 32;
const NHWC: i32 = 64;

/// Whether `x`, `w` and the epilogue ask for the bf16 tensor-core path (any bf16
/// operand or a bf16 output). f32-only calls keep the f32 kernels and their results.
pub fn wants_bf16(x: &Tensor, w: &Tensor, ep: &Epilogue) -> bool {
    x.dtype() == DType::BF16 || w.dtype() == DType::BF16 || ep.out_dtype == Some(DType::BF16)
}

/// `x` rounded to bf16 and widened back to f32, on the CPU. One pass on a CPU
/// tensor (a bf16 one is widened, an f32 one rounded and widened in place of two
/// conversions and a bf16 copy).
pub fn round_to_bf16(x: &Tensor) -> Result<Tensor> {
    let x = x.to_device(Device::Cpu)?;
    match x.dtype() {
        DType::BF16 => x.to_dtype(DType::F32),
        DType::F32 => Tensor::from_vec(
            crate::tensor::bf16::round_f32_vec(x.cpu_slice::<f32>()?),
            x.shape().clone(),
        ),
        _ => x.to_dtype(DType::BF16)?.to_dtype(DType::F32),
    }
}

fn float_input(op: &'static str, t: &Tensor) -> Result<()> {
    match t.dtype() {
        DType::F32 | DType::BF16 => Ok(()),
        d => Err(Error::DType {
            op,
            dtype: d.to_string(),
            msg: "tensor-core ops take f32 or bf16 inputs".into(),
        }),
    }
}

fn out_dtype(op: &'static str, x: &Tensor, ep: &Epilogue) -> Result<DType> {
    match ep.out_dtype.unwrap_or(x.dtype()) {
        d @ (DType::F32 | DType::BF16) => Ok(d),
        d => Err(Error::DType {
            op,
            dtype: d.to_string(),
            msg: "tensor-core ops write f32 or bf16".into(),
        }),
    }
}

fn dims4(op: &'static str, t: &Tensor) -> Result<[usize; 4]> {
    match t.dims() {
        &[a, b, c, d] => Ok([a, b, c, d]),
        _ => Err(Error::shape(op, format!("{} is not 4-D", t.shape()))),
    }
}

// ---------------------------------------------------------------------------------
// CPU reference
// ---------------------------------------------------------------------------------

/// The epilogue in f32 on `acc`, then the output dtype (CPU).
fn cpu_epilogue(acc: Tensor, ep: &Epilogue, out: DType) -> Result<Tensor> {
    let cpu = |t: Option<&Tensor>| -> Result<Option<Tensor>> {
        t.map(|t| t.to_device(Device::Cpu)?.to_dtype(DType::F32))
            .transpose()
    };
    let (scale, shift, res) = (cpu(ep.scale)?, cpu(ep.shift)?, cpu(ep.residual)?);
    let ep32 = Epilogue {
        scale: scale.as_ref(),
        shift: shift.as_ref(),
        residual: res.as_ref(),
        relu: ep.relu,
        out_dtype: None,
    };
    apply_unfused(acc, &ep32)?.to_dtype(out)
}

/// CPU reference of [`conv2d_tc`]: `x`, `w` rounded to bf16, f32 convolution and
/// epilogue, output rounded to `ep.out_dtype` (default: `x`'s dtype).
pub fn conv2d_bf16_reference(
    x: &Tensor,
    w: &Tensor,
    p: &Conv2dParams,
    ep: &Epilogue,
) -> Result<Tensor> {
    let out = out_dtype("conv2d_tc", x, ep)?;
    conv2d_rounded_cpu(&round_to_bf16(x)?, &round_to_bf16(w)?, p, ep, out)
}

/// [`conv2d_bf16_reference`] on operands already rounded (f32 CPU tensors holding
/// bf16 values; rounding them again would change nothing).
///
/// The epilogue `act(acc * scale + shift + residual)` is defined as separate f32
/// passes over the product (`apply_unfused`: the affine, the add, relu), then the
/// rounding. It runs inside the f32 convolution's output tiles instead
/// (`conv2d_cpu_fused`: the same GEMM, then `acc * scale + shift + residual` per
/// element, the same f32 operations in the same order), with ReLU left to the one
/// pass that rounds (the tile epilogue's ReLU keeps -0 and NaN where the relu op
/// gives +0): bit for bit the separate passes, without their three passes over the
/// output. The one combination where a tile would differ (a residual with neither
/// scale, shift nor ReLU: the tile adds a 0 shift, turning -0 into +0) keeps the
/// separate passes.
fn conv2d_rounded_cpu(
    x: &Tensor,
    w: &Tensor,
    p: &Conv2dParams,
    ep: &Epilogue,
    out: DType,
) -> Result<Tensor> {
    match fused_product_cpu(x, w, p, ep)? {
        Some(y) => finish_cpu(y, ep.relu, out),
        None => cpu_epilogue(conv2d_forward(x, w, None, p)?, ep, out),
    }
}

/// The f32 product with `ep`'s scale, shift and residual in its output tiles, ReLU
/// not applied; `None` for the combination the tiles would not reproduce bit for bit
/// (see [`conv2d_rounded_cpu`]).
fn fused_product_cpu(
    x: &Tensor,
    w: &Tensor,
    p: &Conv2dParams,
    ep: &Epilogue,
) -> Result<Option<Tensor>> {
    let ep32 = Epilogue32::of(ep)?;
    if ep32.residual.is_some() && ep32.scale.is_none() && ep32.shift.is_none() && !ep.relu {
        return Ok(None);
    }
    crate::ops::conv2d::conv2d_cpu_fused(
        x,
        w,
        p,
        ep32.scale.as_ref(),
        ep32.shift.as_ref(),
        ep32.residual.as_ref(),
        false,
    )
    .map(Some)
}

/// The f32 CPU copies of an epilogue's scale, shift and residual.
struct Epilogue32 {
    scale: Option<Tensor>,
    shift: Option<Tensor>,
    residual: Option<Tensor>,
}

impl Epilogue32 {
    fn of(ep: &Epilogue) -> Result<Self> {
        let cpu = |t: Option<&Tensor>| -> Result<Option<Tensor>> {
            t.map(|t| t.to_device(Device::Cpu)?.to_dtype(DType::F32))
                .transpose()
        };
        Ok(Epilogue32 {
            scale: cpu(ep.scale)?,
            shift: cpu(ep.shift)?,
            residual: cpu(ep.residual)?,
        })
    }
}

/// ReLU (when `relu`) and the output dtype of an f32 CPU product whose epilogue
/// left ReLU out: one pass.
fn finish_cpu(y: Tensor, relu: bool, out: DType) -> Result<Tensor> {
    match out {
        DType::BF16 => Tensor::from_vec_bf16(
            crate::tensor::bf16::round_relu_vec(y.cpu_slice::<f32>()?, relu),
            y.shape().clone(),
        ),
        _ if relu => crate::ops::relu(&y)?.to_dtype(out),
        _ => y.to_dtype(out),
    }
}

/// The CPU's bf16 activation of a chained convolution ([`chain`]): the product of
/// [`conv2d_rounded_cpu`] with ReLU and the rounding to bf16 values (kept in f32)
/// in one pass, in place.
pub(crate) fn conv2d_rounded_cpu_f32(
    x: &Tensor,
    w: &Tensor,
    p: &Conv2dParams,
    ep: &Epilogue,
) -> Result<Tensor> {
    let (mut y, relu) = match fused_product_cpu(x, w, p, ep)? {
        Some(y) => (y, ep.relu),
        None => (conv2d_rounded_cpu(x, w, p, ep, DType::F32)?, false),
    };
    round_in_place(&mut y, relu)?;
    Ok(y)
}

/// `t` (f32, CPU) after ReLU when `relu`, rounded to bf16 values kept in f32: in
/// place when nobody shares its storage (a fresh output), else into a copy.
fn round_in_place(t: &mut Tensor, relu: bool) -> Result<()> {
    use crate::tensor::{CpuStorage, Storage};
    if let Some(Storage::Cpu(CpuStorage::F32(v))) = t.storage_mut() {
        crate::tensor::bf16::round_in_place(v, relu);
        return Ok(());
    }
    let mut v = t.cpu_slice::<f32>()?.to_vec();
    crate::tensor::bf16::round_in_place(&mut v, relu);
    *t = Tensor::from_vec(v, t.shape().clone())?;
    Ok(())
}

/// The f32 CPU bias when `ep` is at most a bias (no scale, residual or ReLU), for
/// the f32 ops' fused bias; `None` when the epilogue needs [`cpu_epilogue`].
fn bias_only(ep: &Epilogue) -> Result<Option<Tensor>> {
    if ep.scale.is_some() || ep.residual.is_some() || ep.relu {
        return Ok(None);
    }
    ep.shift
        .map(|b| b.to_device(Device::Cpu)?.to_dtype(DType::F32))
        .transpose()
}

/// CPU reference of [`conv2d_tc_backward_input`] (f32 output).
pub fn conv2d_bf16_reference_backward_input(
    gy: &Tensor,
    w: &Tensor,
    x_dims: &[usize],
    p: &Conv2dParams,
) -> Result<Tensor> {
    conv2d_backward_input(&round_to_bf16(gy)?, &round_to_bf16(w)?, x_dims, p)
}

/// CPU reference of [`conv2d_tc_backward_weight`] (f32 output).
pub fn conv2d_bf16_reference_backward_weight(
    x: &Tensor,
    gy: &Tensor,
    w_dims: &[usize],
    p: &Conv2dParams,
) -> Result<Tensor> {
    conv2d_backward_weight(&round_to_bf16(x)?, &round_to_bf16(gy)?, w_dims, p)
}

// ---------------------------------------------------------------------------------
// Public ops (device dispatch)
// ---------------------------------------------------------------------------------

/// `act(conv2d(x, w) * scale + shift + residual)` in bf16 with f32 accumulation: x
/// `[N, Cin, H, W]`, w `[Cout, Cin, kh, kw]` (f32 or bf16), output `[N, Cout, OH, OW]`
/// in `ep.out_dtype` (default `x`'s dtype). CUDA: tensor cores; CPU: the reference.
pub fn conv2d_tc(x: &Tensor, w: &Tensor, p: &Conv2dParams, ep: &Epilogue) -> Result<Tensor> {
    const OP: &str = "conv2d_tc";
    float_input(OP, x)?;
    float_input(OP, w)?;
    match x.device() {
        Device::Cpu => conv2d_bf16_reference(x, w, p, ep),
        Device::Cuda(_) => {
            let packed = TcConvWeight::new(w)?;
            conv2d_tc_packed(x, &packed, p, ep)
        }
    }
}

/// Input gradient of a convolution in bf16 with f32 accumulation: gy
/// `[N, Cout, OH, OW]`, w `[Cout, Cin, kh, kw]`, output f32 `x_dims`.
pub fn conv2d_tc_backward_input(
    gy: &Tensor,
    w: &Tensor,
    x_dims: &[usize],
    p: &Conv2dParams,
) -> Result<Tensor> {
    const OP: &str = "conv2d_tc_backward_input";
    float_input(OP, gy)?;
    float_input(OP, w)?;
    match gy.device() {
        Device::Cpu => conv2d_bf16_reference_backward_input(gy, w, x_dims, p),
        Device::Cuda(_) => cuda_dgrad(gy, w, x_dims, p),
    }
}

/// Weight gradient of a convolution in bf16 with f32 accumulation: x
/// `[N, Cin, H, W]`, gy `[N, Cout, OH, OW]`, output f32 `w_dims` `[Cout, Cin, kh, kw]`.
pub fn conv2d_tc_backward_weight(
    x: &Tensor,
    gy: &Tensor,
    w_dims: &[usize],
    p: &Conv2dParams,
) -> Result<Tensor> {
    const OP: &str = "conv2d_tc_backward_weight";
    float_input(OP, x)?;
    float_input(OP, gy)?;
    match x.device() {
        Device::Cpu => conv2d_bf16_reference_backward_weight(x, gy, w_dims, p),
        Device::Cuda(_) => cuda_wgrad(x, gy, w_dims, p, None),
    }
}

/// [`conv2d_tc_backward_weight`] with `splits` K slices forced (CUDA), for the tests
/// of split-K (at least 1; a slice past the last K tile reduces nothing and adds
/// zeros).
#[doc(hidden)]
pub fn conv2d_tc_backward_weight_split(
    x: &Tensor,
    gy: &Tensor,
    w_dims: &[usize],
    p: &Conv2dParams,
    splits: usize,
) -> Result<Tensor> {
    cuda_wgrad(x, gy, w_dims, p, Some(splits.max(1)))
}

/// How many K slices the weight gradient is split into: its output has few tiles
/// (Cout/64 x kh kw Cin/64: 9 for a 64-channel 3x3 conv) while its reduction runs over
/// every output pixel of the batch, so without splitting most SMs idle. Aim for two
/// blocks per SM of an H100 (132 SMs), each slice reducing at least 8 K tiles (256
/// pixels) so the partial sums and their reduction stay a small cost. A function of
/// the shapes only: the same call always sums in the same order.
pub fn wgrad_splits(w_dims: [usize; 4], pixels: usize) -> usize {
    let [cout, cin, kh, kw] = w_dims;
    let tiles = cout.div_ceil(TILE) * (kh * kw * pad8(cin)).div_ceil(TILE);
    let ktiles = pixels.div_ceil(32);
    (264 / tiles.max(1)).min(ktiles / 8).clamp(1, 64)
}

fn as_pixels(op: &'static str, t: &Tensor) -> Result<Tensor> {
    match t.dims() {
        &[m, k] => t.reshape_detached([m, k, 1, 1]),
        _ => Err(Error::shape(op, format!("{} is not 2-D", t.shape()))),
    }
}

/// `act(x @ w^T * scale + shift + residual)` in bf16 with f32 accumulation: x
/// `[M, K]`, w `[N, K]`, output `[M, N]` in `ep.out_dtype` (default `x`'s dtype).
pub fn linear_tc(x: &Tensor, w: &Tensor, ep: &Epilogue) -> Result<Tensor> {
    const OP: &str = "linear_tc";
    if x.device() == Device::Cpu {
        return linear_bf16_reference(x, w, ep);
    }
    let (x4, w4) = (as_pixels(OP, x)?, as_pixels(OP, w)?);
    let res4 = ep.residual.map(|r| as_pixels(OP, r)).transpose()?;
    let ep4 = Epilogue {
        residual: res4.as_ref(),
        ..*ep
    };
    let y = conv2d_tc(&x4, &w4, &Conv2dParams::default(), &ep4)?;
    let (m, n) = (y.dims()[0], y.dims()[1]);
    y.reshape_detached([m, n])
}

/// CPU reference of [`linear_tc`]: `x`, `w` rounded to bf16, the f32 linear layer
/// (one GEMM over all rows, the bias in its row pass; as M 1x1 convolutions of one
/// pixel each it was a padded GEMM per row), the epilogue in f32, output rounded
/// to `ep.out_dtype` (default: `x`'s dtype).
fn linear_bf16_reference(x: &Tensor, w: &Tensor, ep: &Epilogue) -> Result<Tensor> {
    const OP: &str = "linear_tc";
    float_input(OP, x)?;
    float_input(OP, w)?;
    let out = out_dtype(OP, x, ep)?;
    let (x, w) = (round_to_bf16(x)?, round_to_bf16(w)?);
    if let Some(b) = bias_only(ep)? {
        return crate::ops::linear::linear_cpu_fused(&x, &w, None, Some(&b), None, false)?
            .to_dtype(out);
    }
    let acc = crate::ops::linear::linear_cpu_fused(&x, &w, None, None, None, false)?;
    cpu_epilogue(acc, ep, out)
}

/// `gx = gy @ w` in bf16 with f32 accumulation: gy `[M, N]`, w `[N, K]`, f32 `[M, K]`.
pub fn linear_tc_backward_input(gy: &Tensor, w: &Tensor) -> Result<Tensor> {
    const OP: &str = "linear_tc_backward_input";
    if gy.device() == Device::Cpu {
        float_input(OP, gy)?;
        float_input(OP, w)?;
        let (gy, w) = (round_to_bf16(gy)?, round_to_bf16(w)?);
        return crate::ops::linear::product(OP, &gy, &w, crate::ops::linear::Trans::NN);
    }
    let (gy4, w4) = (as_pixels(OP, gy)?, as_pixels(OP, w)?);
    let (m, k) = (gy.dims()[0], w.dims()[1]);
    conv2d_tc_backward_input(&gy4, &w4, &[m, k, 1, 1], &Conv2dParams::default())?
        .reshape_detached([m, k])
}

/// `gw = gy^T @ x` in bf16 with f32 accumulation: x `[M, K]`, gy `[M, N]`, f32 `[N, K]`.
pub fn linear_tc_backward_weight(x: &Tensor, gy: &Tensor) -> Result<Tensor> {
    const OP: &str = "linear_tc_backward_weight";
    if x.device() == Device::Cpu {
        float_input(OP, x)?;
        float_input(OP, gy)?;
        let (x, gy) = (round_to_bf16(x)?, round_to_bf16(gy)?);
        return crate::ops::linear::product(OP, &gy, &x, crate::ops::linear::Trans::TN);
    }
    let (x4, gy4) = (as_pixels(OP, x)?, as_pixels(OP, gy)?);
    let (n, k) = (gy.dims()[1], x.dims()[1]);
    conv2d_tc_backward_weight(&x4, &gy4, &[n, k, 1, 1], &Conv2dParams::default())?
        .reshape_detached([n, k])
}

// ---------------------------------------------------------------------------------
// CUDA
// ---------------------------------------------------------------------------------

fn pad8(c: usize) -> usize {
    c.div_ceil(8) * 8
}

fn i32_of(op: &'static str, what: &str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| Error::shape(op, format!("{what} = {v} exceeds i32")))
}

fn gpu_of(op: &'static str, t: &Tensor) -> Result<GpuDevice> {
    t.gpu()
        .map(|g| g.dev.clone())
        .map_err(|_| Error::invalid(op, format!("tensor {} is not on a CUDA device", t.shape())))
}

fn src_bf16(t: &Tensor) -> i32 {
    (t.dtype() == DType::BF16) as i32
}

/// A device bf16 buffer of `n` elements wrapped as a tensor.
fn alloc_bf16(dev: &GpuDevice, dims: &[usize]) -> Result<Tensor> {
    let n: usize = dims.iter().product();
    let buf = dev.alloc(n.max(1) * 2)?;
    Ok(Tensor::from_gpu_typed(
        dev.clone(),
        buf,
        dims.to_vec(),
        DType::BF16,
    ))
}

fn launch_1d(dev: &GpuDevice, kernel: &str, n: usize, args: &[KernelArg]) -> Result<()> {
    if n == 0 {
        return Ok(());
    }
    dev.launch(kernel, LaunchCfg::for_elems(n), args)
}

/// `[N, C, H, W]` (f32 or bf16) -> bf16 NHWC with `cp` channels (zeros past C).
fn pack_nhwc(op: &'static str, t: &Tensor, cp: usize) -> Result<Tensor> {
    let dev = gpu_of(op, t)?;
    let [n, c, h, w] = dims4(op, t)?;
    let out = alloc_bf16(&dev, &[n, h, w, cp])?;
    launch_1d(
        &dev,
        "tc_pack_nhwc_bf16",
        n * h * w * cp,
        &[
            t.gpu()?.buf.arg(),
            out.gpu()?.buf.arg(),
            KernelArg::I32(i32_of(op, "N", n)?),
            KernelArg::I32(i32_of(op, "C", c)?),
            KernelArg::I32(i32_of(op, "H", h)?),
            KernelArg::I32(i32_of(op, "W", w)?),
            KernelArg::I32(i32_of(op, "Cp", cp)?),
            KernelArg::I32(src_bf16(t)),
        ],
    )?;
    Ok(out)
}

/// Weights `[Cout, Cin, kh, kw]` -> bf16 `[Cout][kh][kw][Cin8]` (forward) or
/// `[Cin][kh][kw][Cout8]` (`transpose`, input gradient).
fn pack_weight(op: &'static str, w: &Tensor, transpose: bool) -> Result<Tensor> {
    let dev = gpu_of(op, w)?;
    let [cout, cin, kh, kw] = dims4(op, w)?;
    let (rows, cpad) = if transpose {
        (cin, pad8(cout))
    } else {
        (cout, pad8(cin))
    };
    let out = alloc_bf16(&dev, &[rows, kh, kw, cpad])?;
    launch_1d(
        &dev,
        "tc_pack_weight_bf16",
        rows * kh * kw * cpad,
        &[
            w.gpu()?.buf.arg(),
            out.gpu()?.buf.arg(),
            KernelArg::I32(i32_of(op, "Cout", cout)?),
            KernelArg::I32(i32_of(op, "Cin", cin)?),
            KernelArg::I32(i32_of(op, "kh", kh)?),
            KernelArg::I32(i32_of(op, "kw", kw)?),
            KernelArg::I32(i32_of(op, "Cpad", cpad)?),
            KernelArg::I32(transpose as i32),
            KernelArg::I32(src_bf16(w)),
        ],
    )?;
    Ok(out)
}

/// Convolution weights packed once for the forward tensor-core kernel (bf16,
/// `[Cout][kh][kw][Cin rounded up to 8]`). Pack when the weights change (and fold a
/// frozen BatchNorm into the epilogue's scale/shift at the same time), not per call.
/// On the CPU they are kept rounded to bf16 values in f32, the operand of the f32
/// product the reference runs.
#[derive(Clone, Debug)]
pub struct TcConvWeight {
    packed: Tensor,
    dims: [usize; 4],
}

impl TcConvWeight {
    /// Pack `w` `[Cout, Cin, kh, kw]` (f32 or bf16; on a CUDA device one launch, on the
    /// CPU one rounding pass).
    pub fn new(w: &Tensor) -> Result<Self> {
        const OP: &str = "TcConvWeight::new";
        float_input(OP, w)?;
        let dims = dims4(OP, w)?;
        let packed = match w.device() {
            Device::Cpu => round_to_bf16(w)?,
            Device::Cuda(_) => pack_weight(OP, w, false)?,
        };
        Ok(TcConvWeight { packed, dims })
    }
    /// The device the weights live on.
    pub fn device(&self) -> Device {
        self.packed.device()
    }
    /// `[Cout, Cin, kh, kw]` of the unpacked weights.
    pub fn dims(&self) -> [usize; 4] {
        self.dims
    }
}

/// The dims as the kernels' 17 geometry arguments (see `TC_GEOM_PARAMS`).
#[allow(clippy::too_many_arguments)]
fn geom_args(
    op: &'static str,
    [n, cin, h, w]: [usize; 4],
    cout: usize,
    (oh, ow): (usize, usize),
    (kh, kw): (usize, usize),
    p: &Conv2dParams,
) -> Result<Vec<KernelArg>> {
    let vals = [
        ("N", n),
        ("H", h),
        ("W", w),
        ("Cin", cin),
        ("Cp", pad8(cin)),
        ("Cout", cout),
        ("Coutp", pad8(cout)),
        ("OH", oh),
        ("OW", ow),
        ("kh", kh),
        ("kw", kw),
        ("sh", p.stride.0),
        ("sw", p.stride.1),
        ("ph", p.padding.0),
        ("pw", p.padding.1),
        ("dh", p.dilation.0),
        ("dw", p.dilation.1),
    ];
    vals.iter()
        .map(|&(what, v)| Ok(KernelArg::I32(i32_of(op, what, v)?)))
        .collect()
}

fn grid(op: &'static str, m: usize, n: usize) -> Result<LaunchCfg> {
    let gx =
        u32::try_from(m.div_ceil(TILE)).map_err(|_| Error::shape(op, format!("{m} GEMM rows")))?;
    let gy = u32::try_from(n.div_ceil(TILE))
        .ok()
        .filter(|&g| g <= 65535)
        .ok_or_else(|| Error::shape(op, format!("{n} GEMM columns")))?;
    Ok(LaunchCfg {
        grid: (gx, gy, 1),
        block: (THREADS, 1, 1),
        shared_bytes: 0,
    })
}

/// The epilogue's kernel arguments (scale, shift, residual; absent ones point at
/// `dummy` and are not read) and flags.
fn epilogue_args(
    op: &'static str,
    ep: &Epilogue,
    out: DType,
    dummy: &Tensor,
) -> Result<(Vec<KernelArg>, i32)> {
    let mut flags = 0;
    let mut args = Vec::new();
    for (t, flag) in [(ep.scale, HAS_SCALE), (ep.shift, HAS_SHIFT)] {
        match t {
            Some(t) if t.dtype() == DType::F32 => {
                flags |= flag;
                args.push(t.gpu()?.buf.arg());
            }
            Some(t) => {
                return Err(Error::DType {
                    op,
                    dtype: t.dtype().to_string(),
                    msg: "epilogue scale and shift are f32".into(),
                })
            }
            None => args.push(dummy.gpu()?.buf.arg()),
        }
    }
    match ep.residual {
        Some(r) => {
            float_input(op, r)?;
            flags |= HAS_RES;
            if r.dtype() == DType::BF16 {
                flags |= RES_BF16;
            }
            args.push(r.gpu()?.buf.arg());
        }
        None => args.push(dummy.gpu()?.buf.arg()),
    }
    if ep.relu {
        flags |= RELU;
    }
    if out == DType::BF16 {
        flags |= OUT_BF16;
    }
    Ok((args, flags))
}

fn alloc_out(dev: &GpuDevice, dims: &[usize], dtype: DType) -> Result<Tensor> {
    let n: usize = dims.iter().product();
    let buf = dev.alloc(n.max(1) * dtype.size())?;
    Ok(Tensor::from_gpu_typed(
        dev.clone(),
        buf,
        dims.to_vec(),
        dtype,
    ))
}

/// [`conv2d_tc`] with weights packed beforehand (CUDA: one launch to pack `x` to NHWC,
/// one for the convolution; CPU: the reference).
pub fn conv2d_tc_packed(
    x: &Tensor,
    w: &TcConvWeight,
    p: &Conv2dParams,
    ep: &Epilogue,
) -> Result<Tensor> {
    match (x.device(), w.device()) {
        (Device::Cpu, Device::Cpu) => {
            let out = out_dtype("conv2d_tc", x, ep)?;
            conv2d_rounded_cpu(&round_to_bf16(x)?, &w.packed, p, ep, out)
        }
        (Device::Cuda(_), Device::Cuda(_)) => {
            conv_fwd_launch("tc_conv_fwd_bf16", x, w, p, ep, None)
        }
        (a, b) => Err(Error::invalid(
            "conv2d_tc",
            format!("x on {a:?} with packed weights on {b:?}"),
        )),
    }
}

/// The forward kernel with a planted bug (1 no wait_group, 2 no barrier between
/// stages, 3 a transposed B fragment), for the emulator's own tests.
#[doc(hidden)]
pub fn conv2d_tc_planted_bug(x: &Tensor, w: &Tensor, p: &Conv2dParams, bug: i32) -> Result<Tensor> {
    let packed = TcConvWeight::new(w)?;
    conv_fwd_launch(
        "tc_conv_fwd_planted_bf16",
        x,
        &packed,
        p,
        &Epilogue::default(),
        Some(bug),
    )
}

/// The output size of the forward conv of `xd` by `w`, or a shape error.
fn fwd_output_size(
    op: &'static str,
    xd: [usize; 4],
    w: &TcConvWeight,
    p: &Conv2dParams,
) -> Result<(usize, usize)> {
    let [_, wcin, kh, kw] = w.dims;
    if wcin != xd[1] {
        return Err(Error::shape(
            op,
            format!("x {xd:?} with weights {:?}", w.dims),
        ));
    }
    conv2d_output_size((xd[2], xd[3]), (kh, kw), p)
        .ok_or_else(|| Error::shape(op, format!("kernel {kh}x{kw} does not fit input {xd:?}")))
}

/// One launch of a forward kernel: `xp` is x as bf16 NHWC-Cp (dims `xd` of the NCHW
/// view), `y` the output (layout per `flags`), `ep_args` from [`epilogue_args`].
#[allow(clippy::too_many_arguments)]
fn fwd_kernel(
    op: &'static str,
    kernel: &str,
    xp: &Tensor,
    xd: [usize; 4],
    w: &TcConvWeight,
    p: &Conv2dParams,
    y: &Tensor,
    ep_args: Vec<KernelArg>,
    flags: i32,
    bug: Option<i32>,
) -> Result<()> {
    let dev = gpu_of(op, xp)?;
    let [cout, _, kh, kw] = w.dims;
    let (oh, ow) = fwd_output_size(op, xd, w, p)?;
    let m = xd[0] * oh * ow;
    if m == 0 || cout == 0 {
        return Ok(());
    }
    let mut args = vec![
        xp.gpu()?.buf.arg(),
        w.packed.gpu()?.buf.arg(),
        y.gpu()?.buf.arg(),
    ];
    args.extend(ep_args);
    args.extend(geom_args(op, xd, cout, (oh, ow), (kh, kw), p)?);
    args.push(KernelArg::I32(flags));
    if let Some(b) = bug {
        args.push(KernelArg::I32(b));
    }
    dev.launch(kernel, grid(op, m, cout)?, &args)
}

fn conv_fwd_launch(
    kernel: &str,
    x: &Tensor,
    w: &TcConvWeight,
    p: &Conv2dParams,
    ep: &Epilogue,
    bug: Option<i32>,
) -> Result<Tensor> {
    const OP: &str = "conv2d_tc";
    float_input(OP, x)?;
    let dev = gpu_of(OP, x)?;
    let xd = dims4(OP, x)?;
    let (oh, ow) = fwd_output_size(OP, xd, w, p)?;
    let cout = w.dims[0];
    let out = out_dtype(OP, x, ep)?;
    let y_dims = [xd[0], cout, oh, ow];
    ep.check(OP, cout, &y_dims, x.device())?;
    let y = alloc_out(&dev, &y_dims, out)?;
    if xd[0] * oh * ow == 0 || cout == 0 {
        return Ok(y);
    }
    let xp = pack_nhwc(OP, x, pad8(xd[1]))?;
    // The packed input (at least 8 bf16 per pixel) stands in for absent epilogue
    // operands: a one-element bf16 output is too small to pass as a float pointer.
    let (ep_args, flags) = epilogue_args(OP, ep, out, &xp)?;
    fwd_kernel(OP, kernel, &xp, xd, w, p, &y, ep_args, flags, bug)?;
    Ok(y)
}

fn cuda_dgrad(gy: &Tensor, w: &Tensor, x_dims: &[usize], p: &Conv2dParams) -> Result<Tensor> {
    const OP: &str = "conv2d_tc_backward_input";
    let dev = gpu_of(OP, gy)?;
    let [cout, cin, kh, kw] = dims4(OP, w)?;
    let xd: [usize; 4] = x_dims
        .try_into()
        .map_err(|_| Error::shape(OP, format!("x dims {x_dims:?} are not 4-D")))?;
    let (oh, ow) = conv2d_output_size((xd[2], xd[3]), (kh, kw), p)
        .ok_or_else(|| Error::shape(OP, format!("kernel {kh}x{kw} does not fit {x_dims:?}")))?;
    if xd[1] != cin || gy.dims() != [xd[0], cout, oh, ow] {
        return Err(Error::shape(
            OP,
            format!(
                "gy {} with w {} and x {x_dims:?} (expected gy [{}, {cout}, {oh}, {ow}])",
                gy.shape(),
                w.shape(),
                xd[0]
            ),
        ));
    }
    let dx = alloc_out(&dev, &xd, DType::F32)?;
    let m = xd[0] * xd[2] * xd[3];
    if m == 0 || cin == 0 {
        return Ok(dx);
    }
    if cout == 0 {
        return Tensor::zeros(xd.to_vec(), DType::F32, gy.device());
    }
    let gyp = pack_nhwc(OP, gy, pad8(cout))?;
    let wt = pack_weight(OP, w, true)?;
    let (ep_args, flags) = epilogue_args(OP, &Epilogue::default(), DType::F32, &gyp)?;
    let mut args = vec![
        gyp.gpu()?.buf.arg(),
        wt.gpu()?.buf.arg(),
        dx.gpu()?.buf.arg(),
    ];
    args.extend(ep_args);
    args.extend(geom_args(OP, xd, cout, (oh, ow), (kh, kw), p)?);
    args.push(KernelArg::I32(flags));
    // One z per stride phase (ih mod sh, iw mod sw): each phase has its own live taps.
    let (sh, sw) = p.stride;
    let phases = i32_of(OP, "stride phases", sh * sw)?;
    let mut cfg = grid(OP, xd[0] * xd[2].div_ceil(sh) * xd[3].div_ceil(sw), cin)?;
    cfg.grid.2 = phases as u32; // positive: strides are at least 1
    dev.launch("tc_conv_dgrad_bf16", cfg, &args)?;
    Ok(dx)
}

fn cuda_wgrad(
    x: &Tensor,
    gy: &Tensor,
    w_dims: &[usize],
    p: &Conv2dParams,
    splits: Option<usize>,
) -> Result<Tensor> {
    const OP: &str = "conv2d_tc_backward_weight";
    let dev = gpu_of(OP, x)?;
    let xd = dims4(OP, x)?;
    let wd: [usize; 4] = w_dims
        .try_into()
        .map_err(|_| Error::shape(OP, format!("w dims {w_dims:?} are not 4-D")))?;
    let [cout, cin, kh, kw] = wd;
    let (oh, ow) = conv2d_output_size((xd[2], xd[3]), (kh, kw), p)
        .ok_or_else(|| Error::shape(OP, format!("kernel {kh}x{kw} does not fit {}", x.shape())))?;
    if xd[1] != cin || gy.dims() != [xd[0], cout, oh, ow] {
        return Err(Error::shape(
            OP,
            format!("gy {} with x {} and w {w_dims:?}", gy.shape(), x.shape()),
        ));
    }
    let k = xd[0] * oh * ow;
    if k == 0 || cout == 0 || cin == 0 {
        return Tensor::zeros(wd.to_vec(), DType::F32, x.device());
    }
    let dw = alloc_out(&dev, &wd, DType::F32)?;
    let splits = splits.unwrap_or_else(|| wgrad_splits(wd, k));
    let splits_i32 = i32_of(OP, "K slices", splits)?;
    let numel = cout * cin * kh * kw;
    // Each slice writes a whole partial gradient; one slice writes dw itself.
    let target = if splits > 1 {
        alloc_out(&dev, &[splits, numel], DType::F32)?
    } else {
        dw.clone()
    };
    let gyp = pack_nhwc(OP, gy, pad8(cout))?;
    let xp = pack_nhwc(OP, x, pad8(cin))?;
    let (ep_args, flags) = epilogue_args(OP, &Epilogue::default(), DType::F32, &gyp)?;
    let mut args = vec![
        gyp.gpu()?.buf.arg(),
        xp.gpu()?.buf.arg(),
        target.gpu()?.buf.arg(),
    ];
    args.extend(ep_args);
    args.extend(geom_args(OP, xd, cout, (oh, ow), (kh, kw), p)?);
    args.push(KernelArg::I32(flags));
    let mut cfg = grid(OP, cout, kh * kw * pad8(cin))?;
    cfg.grid.2 = splits_i32 as u32; // positive: splits >= 1
    dev.launch("tc_conv_wgrad_bf16", cfg, &args)?;
    if splits > 1 {
        launch_1d(
            &dev,
            "tc_splitk_reduce_f32",
            numel,
            &[
                target.gpu()?.buf.arg(),
                dw.gpu()?.buf.arg(),
                KernelArg::I64(numel as i64),
                KernelArg::I32(splits_i32),
            ],
        )?;
    }
    Ok(dw)
}

/// f32 <-> bf16 on a CUDA device (a kernel); `None` for other conversions.
pub(crate) fn cast_on_device(t: &Tensor, to: DType) -> Result<Option<Tensor>> {
    let kernel = match (t.dtype(), to) {
        (DType::F32, DType::BF16) => "cast_f32_to_bf16",
        (DType::BF16, DType::F32) => "cast_bf16_to_f32",
        _ => return Ok(None),
    };
    let dev = gpu_of("to_dtype", t)?;
    let out = alloc_out(&dev, t.dims(), to)?;
    launch_1d(
        &dev,
        kernel,
        t.numel(),
        &[
            t.gpu()?.buf.arg(),
            out.gpu()?.buf.arg(),
            KernelArg::I64(t.numel() as i64),
        ],
    )?;
    Ok(Some(out))
}
