//! `linear` (y = x wᵀ + b) and `matmul`, forward and backward, plus the GEMM helpers
//! that conv2d shares: [`gemm_into`] on the CPU (the `gemm` crate) and [`gpu_gemm`]
//! (kernels/matmul.cu) on CUDA.

use gemm::Parallelism;
use num_traits::Zero;

use crate::autograd::record;
use crate::device::gpu::{GpuDevice, KernelArg, LaunchCfg};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::tensor::{same_device, same_dtype, Element, Tensor};
use crate::with_dtype;

use super::{arg, gpu_dev, launch_elems};

// ---------------------------------------------------------------------------------
// CPU GEMM
// ---------------------------------------------------------------------------------

/// A strided read-only matrix in a slice: element (i, j) is `data[i * rs + j * cs]`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct MatRef<'a, T> {
    pub data: &'a [T],
    pub rows: usize,
    pub cols: usize,
    pub rs: usize,
    pub cs: usize,
}

impl<'a, T> MatRef<'a, T> {
    /// A row-major `[rows, cols]` matrix whose rows are `ld` elements apart.
    pub fn rows_ld(data: &'a [T], rows: usize, cols: usize, ld: usize) -> Self {
        MatRef {
            data,
            rows,
            cols,
            rs: ld,
            cs: 1,
        }
    }
    /// A dense row-major `[rows, cols]` matrix.
    pub fn row_major(data: &'a [T], rows: usize, cols: usize) -> Self {
        Self::rows_ld(data, rows, cols, cols)
    }
    /// The transpose (a view, nothing moves).
    pub fn t(self) -> Self {
        MatRef {
            data: self.data,
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
        }
    }
    /// Elements from the first to one past the last one addressed.
    fn span(&self) -> usize {
        if self.rows == 0 || self.cols == 0 {
            0
        } else {
            (self.rows - 1) * self.rs + (self.cols - 1) * self.cs + 1
        }
    }
}

/// Rayon parallelism for one GEMM of `flops` floating-point operations: below a few
/// MFLOP the thread hand-off costs more than it saves.
pub(crate) fn gemm_parallelism(flops: usize) -> Parallelism {
    let threads = rayon::current_num_threads();
    if threads > 1 && flops >= 1 << 22 {
        Parallelism::Rayon(threads)
    } else {
        Parallelism::None
    }
}

/// `dst = a @ b`, or `dst += a @ b` when `accumulate`; `dst` is row-major
/// `[a.rows, b.cols]` with rows `dst_rs` elements apart.
///
/// Panics if a view reaches outside its slice (a bug in the caller, not user input).
pub(crate) fn gemm_into<T: Element>(
    dst: &mut [T],
    dst_rs: usize,
    accumulate: bool,
    a: MatRef<'_, T>,
    b: MatRef<'_, T>,
    par: Parallelism,
) {
    let dst_span = MatRef::rows_ld(&*dst, a.rows, b.cols, dst_rs).span();
    assert!(dst_span <= dst.len(), "gemm_into: destination too small");
    // SAFETY: the destination span was checked above; `dst` is borrowed mutably.
    unsafe { gemm_ptr(dst.as_mut_ptr(), dst_rs, accumulate, a, b, par) }
}

/// [`gemm_into`] through a raw destination, for parallel tasks that write disjoint
/// columns of one matrix.
///
/// # Safety
/// `dst` must be valid for reads and writes of `(a.rows - 1) * dst_rs + b.cols`
/// elements, and no other thread may access the elements this call writes.
pub(crate) unsafe fn gemm_ptr<T: Element>(
    dst: *mut T,
    dst_rs: usize,
    accumulate: bool,
    a: MatRef<'_, T>,
    b: MatRef<'_, T>,
    par: Parallelism,
) {
    assert_eq!(a.cols, b.rows, "gemm: inner dimensions differ");
    assert!(
        a.span() <= a.data.len() && b.span() <= b.data.len(),
        "gemm: view out of bounds"
    );
    let (m, n, k) = (a.rows, b.cols, a.cols);
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        // An empty sum: the gemm crate is not asked to handle it.
        if !accumulate {
            for i in 0..m {
                std::ptr::write_bytes(dst.add(i * dst_rs), 0, n);
            }
        }
        return;
    }
    // gemm computes dst = alpha * dst + beta * lhs @ rhs (dst read only if read_dst),
    // with strides as (column stride, row stride).
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_rs as isize,
        accumulate,
        a.data.as_ptr(),
        a.cs as isize,
        a.rs as isize,
        b.data.as_ptr(),
        b.cs as isize,
        b.rs as isize,
        T::one(),
        T::one(),
        false,
        false,
        false,
        par,
    );
}

// ---------------------------------------------------------------------------------
// CUDA GEMM
// ---------------------------------------------------------------------------------

/// One operand of [`gpu_gemm`]: a row-major matrix inside a device tensor, at element
/// `offset`, rows `ld` apart, used transposed when `trans`; batch item `b` starts
/// `b * stride` elements further on.
#[derive(Clone, Copy)]
pub(crate) struct GpuMat<'a> {
    pub t: &'a Tensor,
    pub offset: usize,
    pub ld: usize,
    pub trans: bool,
    pub stride: usize,
}

impl<'a> GpuMat<'a> {
    /// A dense row-major matrix with `cols` columns starting at the tensor's start.
    pub fn dense(t: &'a Tensor, cols: usize) -> Self {
        GpuMat {
            t,
            offset: 0,
            ld: cols,
            trans: false,
            stride: 0,
        }
    }
    /// The same matrix, used transposed.
    pub fn t(self) -> Self {
        GpuMat {
            trans: !self.trans,
            ..self
        }
    }
    /// The same matrix starting `offset` elements in, batch items `stride` apart.
    pub fn at(self, offset: usize, stride: usize) -> Self {
        GpuMat {
            offset,
            stride,
            ..self
        }
    }
}

/// A kernel argument pointing `offset` f32 elements into a device tensor.
pub(crate) fn arg_at(t: &Tensor, offset: usize) -> Result<KernelArg> {
    let buf = &t.gpu()?.buf;
    let off = offset * 4;
    if off > buf.bytes() {
        return Err(Error::invalid(
            "gpu_gemm",
            format!("offset {offset} beyond a buffer of {} bytes", buf.bytes()),
        ));
    }
    Ok(KernelArg::Ptr {
        ptr: buf.ptr() + off as u64,
        bytes: buf.bytes() - off,
    })
}

/// How a batched product's results are combined.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum BatchMode {
    /// `C_b = A_b @ B_b` for each batch item (C items `c.stride` apart).
    Each,
    /// `C = sum_b A_b @ B_b` (C dense).
    Sum,
}

/// Blocks that keep every SM of a large GPU busy (132 SMs on an H100, ~2 blocks each).
const GPU_TARGET_BLOCKS: usize = 264;

fn ceil_div(a: usize, b: usize) -> usize {
    a.div_ceil(b)
}

fn to_i32(op: &'static str, what: &str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| Error::invalid(op, format!("{what} = {v} exceeds i32")))
}

/// `C (+)= op(A) @ op(B)` on a CUDA device for `batch` items: `[m, k] @ [k, n]`, with
/// `C` row-major `[m, n]` at `c_off`, rows `ldc` apart, items `c_stride` apart. With
/// `accumulate` the product is added to C. Thin products split the reduction over
/// several blocks (partial sums then [`matmul_reduce_f32`]), so a GEMM with few output
/// tiles but a long reduction (a conv weight gradient) still fills the GPU.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gpu_gemm(
    dev: &GpuDevice,
    (m, n, k): (usize, usize, usize),
    a: GpuMat<'_>,
    b: GpuMat<'_>,
    c: &Tensor,
    (c_off, ldc, c_stride): (usize, usize, usize),
    batch: usize,
    mode: BatchMode,
    accumulate: bool,
) -> Result<()> {
    const OP: &str = "gpu_gemm";
    if m == 0 || n == 0 || batch == 0 {
        return Ok(());
    }
    let small = m <= 64 || n <= 64;
    let (bm, bn) = if small { (64, 64) } else { (128, 128) };
    let kernel = match (a.trans, b.trans, small) {
        (false, false, false) => "matmul_nn_f32",
        (false, true, false) => "matmul_nt_f32",
        (true, false, false) => "matmul_tn_f32",
        (false, false, true) => "matmul_nn_small_f32",
        (false, true, true) => "matmul_nt_small_f32",
        (true, false, true) => "matmul_tn_small_f32",
        (true, true, _) => return Err(Error::invalid(OP, "no kernel for Aᵀ @ Bᵀ")),
    };
    let tiles = ceil_div(m, bm) * ceil_div(n, bn);
    let splits = if k >= 1024 && tiles * batch < GPU_TARGET_BLOCKS {
        ceil_div(GPU_TARGET_BLOCKS, tiles * batch)
            .min(k / 512)
            .max(1)
    } else {
        1
    };
    // Whole 16-deep steps per split, so no split starts mid-tile.
    let kchunk = ceil_div(ceil_div(k.max(1), splits), 16) * 16;
    let splits = ceil_div(k.max(1), kchunk);
    let partials = splits > 1 || (mode == BatchMode::Sum && batch > 1);
    if partials && ldc != n {
        return Err(Error::invalid(OP, "split products need a dense C"));
    }
    let z = batch * splits;
    let cfg = LaunchCfg {
        grid: (
            to_i32(OP, "grid x", ceil_div(n, bn))? as u32,
            to_i32(OP, "grid y", ceil_div(m, bm))? as u32,
            to_i32(OP, "grid z", z)? as u32,
        ),
        block: (256, 1, 1),
        shared_bytes: 0,
    };
    let mut args = vec![
        arg_at(a.t, a.offset)?,
        arg_at(b.t, b.offset)?,
        KernelArg::Ptr { ptr: 0, bytes: 0 }, // C, filled below
        KernelArg::I32(to_i32(OP, "m", m)?),
        KernelArg::I32(to_i32(OP, "n", n)?),
        KernelArg::I32(to_i32(OP, "k", k)?),
        KernelArg::I32(to_i32(OP, "lda", a.ld)?),
        KernelArg::I32(to_i32(OP, "ldb", b.ld)?),
        KernelArg::I32(to_i32(OP, "ldc", ldc)?),
        KernelArg::I64(a.stride as i64),
        KernelArg::I64(b.stride as i64),
        KernelArg::I64(0), // C stride, filled below
        KernelArg::I32(splits as i32),
        KernelArg::I32(to_i32(OP, "kchunk", kchunk)?),
    ];
    if !partials {
        args[2] = arg_at(c, c_off)?;
        args[11] = KernelArg::I64(c_stride as i64);
        args.push(KernelArg::F32(if accumulate { 1.0 } else { 0.0 }));
        return dev.launch(kernel, cfg, &args);
    }
    let len = m * n;
    let work = Tensor::gpu_empty(dev, [z * len])?;
    args[2] = arg(&work)?;
    args[11] = KernelArg::I64(len as i64);
    args.push(KernelArg::F32(0.0));
    dev.launch(kernel, cfg, &args)?;
    let (groups, slices) = match mode {
        BatchMode::Sum => (1, z),
        BatchMode::Each => (batch, splits),
    };
    if mode == BatchMode::Each && batch > 1 && c_stride != len {
        return Err(Error::invalid(OP, "split products need dense C items"));
    }
    launch_elems(
        dev,
        "matmul_reduce_f32",
        groups * len,
        &[
            arg(&work)?,
            arg_at(c, c_off)?,
            KernelArg::I64(len as i64),
            KernelArg::I32(groups as i32),
            KernelArg::I32(slices as i32),
            KernelArg::F32(if accumulate { 1.0 } else { 0.0 }),
        ],
    )
}

/// `y[o, c, q] += b[c]` on a CUDA `[outer, C, inner]` tensor.
pub(crate) fn gpu_bias_add(dev: &GpuDevice, y: &Tensor, b: &Tensor, inner: usize) -> Result<()> {
    let c = b.numel();
    launch_elems(
        dev,
        "matmul_bias_add_f32",
        y.numel(),
        &[
            arg(y)?,
            arg(b)?,
            KernelArg::I32(to_i32("bias_add", "channels", c)?),
            KernelArg::I64(inner as i64),
            KernelArg::I64(y.numel() as i64),
        ],
    )
}

/// `gb[c] = sum over o, q of gy[o, c, q]` for a CUDA `[outer, C, inner]` gradient.
pub(crate) fn gpu_bias_grad(
    dev: &GpuDevice,
    gy: &Tensor,
    (outer, c, inner): (usize, usize, usize),
) -> Result<Tensor> {
    let gb = Tensor::gpu_empty(dev, [c])?;
    if c == 0 {
        return Ok(gb);
    }
    let cfg = LaunchCfg {
        grid: (to_i32("bias_grad", "channels", c)? as u32, 1, 1),
        block: (256, 1, 1),
        shared_bytes: 0,
    };
    dev.launch(
        "matmul_bias_grad_f32",
        cfg,
        &[
            arg(gy)?,
            arg(&gb)?,
            KernelArg::I64(outer as i64),
            KernelArg::I32(c as i32),
            KernelArg::I64(inner as i64),
        ],
    )?;
    Ok(gb)
}

// ---------------------------------------------------------------------------------
// matmul
// ---------------------------------------------------------------------------------

fn check_rank2(op: &'static str, name: &str, t: &Tensor) -> Result<(usize, usize)> {
    match t.dims() {
        &[r, c] => Ok((r, c)),
        _ => Err(Error::shape(
            op,
            format!("{name} must be a matrix, got shape {}", t.shape()),
        )),
    }
}

/// Which operands of a product are transposed.
#[derive(Clone, Copy)]
pub(crate) enum Trans {
    /// `a @ b`
    NN,
    /// `a @ bᵀ`
    NT,
    /// `aᵀ @ b`
    TN,
}

/// `op(a) @ op(b)` without recording, on the operands' device. Shapes are the stored
/// ones: `a` is `[m, k]` (`[k, m]` for TN), `b` is `[k, n]` (`[n, k]` for NT).
pub(crate) fn product(op: &'static str, a: &Tensor, b: &Tensor, tr: Trans) -> Result<Tensor> {
    let (ar, ac) = check_rank2(op, "a", a)?;
    let (br, bc) = check_rank2(op, "b", b)?;
    let (m, ka) = match tr {
        Trans::TN => (ac, ar),
        _ => (ar, ac),
    };
    let (kb, n) = match tr {
        Trans::NT => (bc, br),
        _ => (br, bc),
    };
    if ka != kb {
        return Err(Error::shape(
            op,
            format!("{} and {} do not chain", a.shape(), b.shape()),
        ));
    }
    let k = ka;
    match same_device(op, &[a, b])? {
        Device::Cpu => with_dtype!(same_dtype(op, &[a, b])?, T => {
            let (xa, xb) = (a.cpu_slice::<T>()?, b.cpu_slice::<T>()?);
            let va = MatRef::row_major(xa, ar, ac);
            let vb = MatRef::row_major(xb, br, bc);
            let (va, vb) = match tr {
                Trans::NN => (va, vb),
                Trans::NT => (va, vb.t()),
                Trans::TN => (va.t(), vb),
            };
            let mut y = crate::tensor::pool::take::<T>(m * n);
            gemm_into(&mut y, n, false, va, vb, gemm_parallelism(2 * m * n * k));
            Tensor::from_vec(y, [m, n])
        }),
        Device::Cuda(_) => {
            let dev = gpu_dev(op, a)?;
            gpu_dev(op, b)?;
            let y = Tensor::gpu_empty(&dev, [m, n])?;
            let ga = GpuMat::dense(a, ac);
            let gb = GpuMat::dense(b, bc);
            let (ga, gb) = match tr {
                Trans::NN => (ga, gb),
                Trans::NT => (ga, gb.t()),
                Trans::TN => (ga.t(), gb),
            };
            gpu_gemm(
                &dev,
                (m, n, k),
                ga,
                gb,
                &y,
                (0, n, 0),
                1,
                BatchMode::Each,
                false,
            )?;
            Ok(y)
        }
    }
}

/// Matrix product `a @ b` of `a: [M, K]` and `b: [K, N]`, giving `[M, N]`; records
/// `ga = gy @ bᵀ`, `gb = aᵀ @ gy`.
pub fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let y = product("matmul", a, b, Trans::NN)?;
    let (ac, bc) = (a.clone(), b.clone());
    record("matmul", &[a, b], &y, move |gy, needs| {
        let ga = if needs[0] {
            Some(product("matmul_backward", gy, &bc, Trans::NT)?)
        } else {
            None
        };
        let gb = if needs[1] {
            Some(product("matmul_backward", &ac, gy, Trans::TN)?)
        } else {
            None
        };
        Ok(vec![ga, gb])
    });
    Ok(y)
}

// ---------------------------------------------------------------------------------
// linear
// ---------------------------------------------------------------------------------

/// The sizes `(N, in, out)` of a linear layer, checked.
fn linear_dims(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<(usize, usize, usize)> {
    const OP: &str = "linear";
    let (n, fin) = check_rank2(OP, "input", x)?;
    let (fout, win) = check_rank2(OP, "weight", w)?;
    if fin != win {
        return Err(Error::shape(
            OP,
            format!(
                "input {} has {fin} features but weight {} expects {win}",
                x.shape(),
                w.shape()
            ),
        ));
    }
    if let Some(b) = b {
        if b.dims() != [fout] {
            return Err(Error::shape(
                OP,
                format!(
                    "bias {} for weight {} (expected [{fout}])",
                    b.shape(),
                    w.shape()
                ),
            ));
        }
    }
    let mut all = vec![x, w];
    all.extend(b);
    same_device(OP, &all)?;
    same_dtype(OP, &all)?;
    Ok((n, fin, fout))
}

/// Fully connected layer: `y = x wᵀ + b` for `x: [N, in]`, `w: [out, in]` (PyTorch's
/// layout) and optional `b: [out]`, giving `[N, out]`. Records gx, gw and gb.
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let (n, _, fout) = linear_dims(x, w, b)?;
    let y = match (x.device(), b) {
        // The bias is added to each output row while it is hot (no second pass).
        (Device::Cpu, _) => linear_cpu_fused(x, w, None, b, None, false)?,
        (_, Some(b)) => add_bias_rows(&product("linear", x, w, Trans::NT)?, b, n, fout)?,
        (_, None) => product("linear", x, w, Trans::NT)?,
    };
    let (xc, wc) = (x.clone(), w.clone());
    let has_bias = b.is_some();
    let mut inputs = vec![x, w];
    inputs.extend(b);
    record("linear", &inputs, &y, move |gy, needs| {
        let (gx, gw, gb) = linear_backward(&xc, &wc, gy, has_bias, needs)?;
        let mut out = vec![gx, gw];
        if has_bias {
            out.push(gb);
        }
        Ok(out)
    });
    Ok(y)
}

/// The CPU `relu?((x wᵀ) * scale + shift + residual)` for `x: [N, in]`,
/// `w: [out, in]`, per-output-feature `scale`/`shift` `[out]` and a residual
/// `[N, out]`: one GEMM into a pooled buffer, then the epilogue over the rows in
/// parallel. Records nothing; shapes are checked here.
pub(crate) fn linear_cpu_fused(
    x: &Tensor,
    w: &Tensor,
    scale: Option<&Tensor>,
    shift: Option<&Tensor>,
    residual: Option<&Tensor>,
    relu: bool,
) -> Result<Tensor> {
    const OP: &str = "linear";
    let (n, fin) = check_rank2(OP, "input", x)?;
    let (fout, win) = check_rank2(OP, "weight", w)?;
    let vec_ok = |t: Option<&Tensor>| t.is_none_or(|t| t.dims() == [fout]);
    if fin != win
        || !vec_ok(scale)
        || !vec_ok(shift)
        || residual.is_some_and(|r| r.dims() != [n, fout])
    {
        return Err(Error::shape(
            OP,
            format!(
                "input {}, weight {}, epilogue vectors for {fout} features",
                x.shape(),
                w.shape()
            ),
        ));
    }
    let mut all = vec![x, w];
    all.extend(scale);
    all.extend(shift);
    all.extend(residual);
    if same_device(OP, &all)? != Device::Cpu {
        return Err(Error::invalid(OP, "the CPU path got device tensors"));
    }
    with_dtype!(same_dtype(OP, &all)?, T => {
        use rayon::prelude::*;
        let (xs, ws) = (x.cpu_slice::<T>()?, w.cpu_slice::<T>()?);
        let mut y = product_wt(xs, ws, n, fin, fout);
        let sc = scale.map(|t| t.cpu_slice::<T>()).transpose()?;
        let sh = shift.map(|t| t.cpu_slice::<T>()).transpose()?;
        let res = residual.map(|t| t.cpu_slice::<T>()).transpose()?;
        if sc.is_some() || sh.is_some() || res.is_some() || relu {
            let zero = T::zero();
            y.par_chunks_mut(fout.max(1)).enumerate().for_each(|(i, row)| {
                for (j, v) in row.iter_mut().enumerate() {
                    let mut t = *v;
                    if let Some(sc) = sc {
                        t *= sc[j];
                    }
                    if let Some(sh) = sh {
                        t += sh[j];
                    }
                    if let Some(r) = res {
                        t += r[i * fout + j];
                    }
                    *v = if relu && t < zero { zero } else { t };
                }
            });
        }
        Tensor::from_vec(y, [n, fout])
    })
}

/// f32 lanes of an AVX-512 register (see [`product_wt`]).
const LANES: usize = 16;

/// `x wᵀ` for `x: [n, fin]`, `w: [fout, fin]`, into a pooled `[n, fout]` buffer.
///
/// Why the copy: handed `w` as it is (rows `fin` apart), the gemm crate packs all of
/// it into a fresh allocation on every call (51 MB for the box head's fc6). `wᵀ`
/// copied into a pooled `[fin, fout']` buffer (fout' = fout rounded up to whole
/// vector lanes, zero columns after fout) is read in place instead: the same copy,
/// no allocation. A ragged fout goes through a pooled `[n, fout']` product too.
fn product_wt<T: Element>(xs: &[T], ws: &[T], n: usize, fin: usize, fout: usize) -> Vec<T> {
    use crate::tensor::pool;
    use rayon::prelude::*;
    let foutp = fout.next_multiple_of(LANES);
    let mut wt = pool::take::<T>(fin * foutp);
    // Blocks of rows of wᵀ: each reads a short contiguous run of every row of w,
    // and writes a block of wᵀ small enough to stay in L1.
    const ROWS: usize = 64;
    wt.par_chunks_mut((ROWS * foutp).max(1))
        .enumerate()
        .for_each(|(blk, rows)| {
            let i0 = blk * ROWS;
            let nr = rows.len() / foutp.max(1);
            for j in 0..fout {
                let src = &ws[j * fin + i0..j * fin + i0 + nr];
                for (r, &v) in src.iter().enumerate() {
                    rows[r * foutp + j] = v;
                }
            }
            for row in rows.chunks_exact_mut(foutp.max(1)) {
                row[fout..].fill(T::zero());
            }
        });
    let a = MatRef::row_major(xs, n, fin);
    let b = MatRef::row_major(&wt[..], fin, foutp);
    let par = gemm_parallelism(2 * n * foutp * fin);
    let y = if foutp == fout {
        let mut y = pool::take::<T>(n * fout);
        gemm_into(&mut y, fout, false, a, b, par);
        y
    } else {
        let mut yp = pool::take::<T>(n * foutp);
        gemm_into(&mut yp, foutp, false, a, b, par);
        let mut y = pool::take::<T>(n * fout);
        y.par_chunks_mut(fout.max(1))
            .zip(yp.par_chunks(foutp.max(1)))
            .for_each(|(d, s)| d.copy_from_slice(&s[..fout]));
        pool::give(yp);
        y
    };
    pool::give(wt);
    y
}

fn add_bias_rows(y: &Tensor, b: &Tensor, n: usize, fout: usize) -> Result<Tensor> {
    match y.device() {
        Device::Cpu => with_dtype!(y.dtype(), T => {
            let mut v = y.cpu_slice::<T>()?.to_vec();
            let bs = b.cpu_slice::<T>()?;
            for row in v.chunks_exact_mut(fout.max(1)).take(n) {
                row.iter_mut().zip(bs).for_each(|(o, &bv)| *o += bv);
            }
            Tensor::from_vec(v, y.shape().clone())
        }),
        Device::Cuda(_) => {
            let dev = gpu_dev("linear", y)?;
            gpu_dev("linear", b)?;
            gpu_bias_add(&dev, y, b, 1)?;
            Ok(y.clone())
        }
    }
}

/// Gradients of [`linear`] for upstream `gy: [N, out]`: `gx = gy w` `[N, in]`,
/// `gw = gyᵀ x` `[out, in]`, `gb = sum_rows gy` `[out]`; each only where `needs`
/// (indexed x, w, b) asks for it. Records nothing.
#[allow(clippy::type_complexity)]
pub fn linear_backward(
    x: &Tensor,
    w: &Tensor,
    gy: &Tensor,
    has_bias: bool,
    needs: &[bool],
) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
    let (n, _, fout) = linear_dims(x, w, None)?;
    if gy.dims() != [n, fout] {
        return Err(Error::shape(
            "linear_backward",
            format!("gradient {} for output [{n}, {fout}]", gy.shape()),
        ));
    }
    let need = |i: usize| needs.get(i).copied().unwrap_or(true);
    let gx = if need(0) {
        Some(product("linear_backward", gy, w, Trans::NN)?)
    } else {
        None
    };
    let gw = if need(1) {
        Some(product("linear_backward", gy, x, Trans::TN)?)
    } else {
        None
    };
    let gb = if has_bias && need(2) {
        Some(bias_grad_rows(gy, n, fout)?)
    } else {
        None
    };
    Ok((gx, gw, gb))
}

/// Column sums of `gy: [n, fout]`.
fn bias_grad_rows(gy: &Tensor, n: usize, fout: usize) -> Result<Tensor> {
    match gy.device() {
        Device::Cpu => with_dtype!(gy.dtype(), T => {
            let g = gy.cpu_slice::<T>()?;
            let mut gb = vec![T::zero(); fout];
            for row in g.chunks_exact(fout.max(1)).take(n) {
                gb.iter_mut().zip(row).for_each(|(o, &v)| *o += v);
            }
            Tensor::from_vec(gb, [fout])
        }),
        Device::Cuda(_) => {
            let dev = gpu_dev("linear_backward", gy)?;
            gpu_bias_grad(&dev, gy, (n, fout, 1))
        }
    }
}
