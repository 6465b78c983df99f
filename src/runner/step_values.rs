//! The read-back of a training step's logged values: the losses, the NaN flag and the
//! device's deferred kernel errors (see [`crate::device::error_flags`]) in one
//! device-to-host copy, made only on logging iterations.
//!
//! Between read-outs the values wait in a [`StagedValues`] buffer that lives across
//! steps, not in the steps' own scalar tensors: were those kept, the blocks held
//! would grow with the position in the logging interval, each step would meet the
//! caching allocator in another state, and some steps after warm-up would still
//! reach the driver (measured: iterations 4 and 6 of a run logging every 3).

use crate::device::error_flags;
use crate::device::gpu::{GpuBuffer, GpuDevice, KernelArg, LaunchCfg};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::ops;
use crate::tensor::Tensor;

/// Values of a step read back from its device.
#[derive(Clone, Debug, PartialEq)]
pub struct StepValues {
    /// The scalars, in the order given.
    pub values: Vec<f64>,
    /// Some value is NaN or infinite (computed where the values live).
    pub non_finite: bool,
}

/// Read the scalar tensors `values` (e.g. the losses and their total) together with
/// the NaN flag and the device's kernel-error table: one concat, one packing launch
/// and ONE device-to-host copy on a GPU. A raised kernel-error flag gives that op's
/// error. On the CPU the values are read directly.
pub fn read_step_values(values: &[Tensor]) -> Result<StepValues> {
    let Some(first) = values.first() else {
        return Ok(StepValues {
            values: Vec::new(),
            non_finite: false,
        });
    };
    let flat: Vec<Tensor> = values
        .iter()
        .map(|v| {
            if v.numel() != 1 {
                return Err(Error::shape(
                    "read_step_values",
                    format!("values must be scalars, got {:?}", v.dims()),
                ));
            }
            v.reshape_detached([1])
        })
        .collect::<Result<_>>()?;
    let k = flat.len();
    let vals = crate::autograd::no_grad(|| ops::concat(&flat.iter().collect::<Vec<_>>(), 0))?;
    match first.device() {
        Device::Cpu => {
            let v = vals.to_vec::<f64>()?;
            let non_finite = v.iter().any(|x| !x.is_finite());
            Ok(StepValues {
                values: v,
                non_finite,
            })
        }
        Device::Cuda(_) => {
            let dev = vals.gpu()?.dev.clone();
            let slots = error_flags::SLOTS;
            let out = Tensor::gpu_empty(&dev, [k + slots + 1])?;
            let table = error_flags::table_arg(&dev);
            dev.launch(
                "step_readout_f32",
                LaunchCfg {
                    grid: (1, 1, 1),
                    block: (32, 1, 1),
                    shared_bytes: 0,
                },
                &[
                    vals.gpu()?.buf.arg(),
                    KernelArg::I64(k as i64),
                    // Without a table the kernel never reads this pointer.
                    table.unwrap_or(out.gpu()?.buf.arg()),
                    KernelArg::I32(table.is_some() as i32),
                    KernelArg::I64(slots as i64),
                    out.gpu()?.buf.arg(),
                ],
            )?;
            // The end-of-step read-out: values that decide nothing on the device,
            // so the emulator's plan mode may let it through.
            let host = {
                let _r = crate::device::emu::allow_readout("read_step_values");
                out.to_vec::<f32>()?
            };
            let flags: Vec<i32> = host[k..k + slots]
                .iter()
                .map(|f| f.to_bits() as i32)
                .collect();
            error_flags::report(&dev, &flags)?;
            Ok(StepValues {
                values: host[..k].iter().map(|&v| v as f64).collect(),
                non_finite: host[k + slots] != 0.0,
            })
        }
    }
}

/// The logged values of the steps not yet read, on their device: each step's
/// scalars are copied into one buffer that outlives the steps (device-to-device,
/// 4 bytes each), and [`StagedValues::read`] packs them with the NaN flag and the
/// kernel-error table into a second persistent buffer and reads that in ONE copy.
/// Once the buffers hold an interval's values, neither staging nor reading
/// allocates, so every step makes the same allocations whatever its place in the
/// interval.
#[derive(Default)]
pub struct StagedValues {
    /// The device, the values `[cap]` f32 and the packed read-out `[cap + SLOTS + 1]`.
    bufs: Option<(GpuDevice, GpuBuffer, GpuBuffer)>,
    cap: usize,
    len: usize,
}

impl StagedValues {
    /// Nothing staged, no buffer yet.
    pub fn new() -> StagedValues {
        StagedValues::default()
    }

    /// Values staged and not yet read.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is staged.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Stage the scalar tensors `values` (one GPU device; f32, or widened to f32
    /// exactly) after those staged before. The buffers grow (doubling) only when an
    /// interval holds more values than ever before.
    pub fn push(&mut self, values: &[Tensor]) -> Result<()> {
        let Some(first) = values.first() else {
            return Ok(());
        };
        let dev = first.gpu()?.dev.clone();
        for v in values {
            if v.numel() != 1 || v.device() != first.device() {
                return Err(Error::shape(
                    "StagedValues::push",
                    format!(
                        "values must be scalars on one device, got {:?} on {} and {}",
                        v.dims(),
                        v.device(),
                        first.device()
                    ),
                ));
            }
        }
        if let Some((d, _, _)) = &self.bufs {
            if d.ordinal != dev.ordinal && self.len > 0 {
                return Err(Error::invalid(
                    "StagedValues::push",
                    "values of another device are staged: read them first",
                ));
            }
        }
        let need = self.len + values.len();
        let fits =
            matches!(&self.bufs, Some((d, _, _)) if d.ordinal == dev.ordinal) && need <= self.cap;
        if !fits {
            let cap = need.max(2 * self.cap).max(64);
            let _long = crate::device::alloc::long_lived();
            let vals = dev.alloc(4 * cap)?;
            let out = dev.alloc(4 * (cap + error_flags::SLOTS + 1))?;
            if let Some((_, old, _)) = &self.bufs {
                if self.len > 0 {
                    dev.backend.copy_dtod(old, &vals, 4 * self.len)?;
                }
            }
            self.bufs = Some((dev.clone(), vals, out));
            self.cap = cap;
        }
        // Invariant: set just above when missing.
        let (dev, vals, _) = self.bufs.as_ref().expect("staging buffers");
        for v in values {
            let v = match v.dtype() {
                crate::tensor::DType::F32 => v.clone(),
                _ => crate::autograd::no_grad(|| ops::mixed::cast(v, crate::tensor::DType::F32))?,
            };
            // A 4-byte view of the value's slot; it keeps the buffer alive.
            let slot = GpuBuffer::new(
                vals.ptr() + 4 * self.len as u64,
                4,
                std::sync::Arc::new(vals.clone()),
            );
            dev.backend.copy_dtod(&v.gpu()?.buf, &slot, 4)?;
            self.len += 1;
        }
        Ok(())
    }

    /// Read every staged value, in staging order, with the NaN flag and the
    /// device's kernel-error table: one packing launch and ONE device-to-host copy
    /// of `len + SLOTS + 1` floats. A raised kernel-error flag gives that op's
    /// error. Empties the stage; nothing staged: no copy.
    pub fn read(&mut self) -> Result<StepValues> {
        let k = std::mem::take(&mut self.len);
        let Some((dev, vals, out)) = self.bufs.as_ref().filter(|_| k > 0) else {
            return Ok(StepValues {
                values: Vec::new(),
                non_finite: false,
            });
        };
        let slots = error_flags::SLOTS;
        let table = error_flags::table_arg(dev);
        dev.launch(
            "step_readout_f32",
            LaunchCfg {
                grid: (1, 1, 1),
                block: (32, 1, 1),
                shared_bytes: 0,
            },
            &[
                vals.arg(),
                KernelArg::I64(k as i64),
                // Without a table the kernel never reads this pointer.
                table.unwrap_or(out.arg()),
                KernelArg::I32(table.is_some() as i32),
                KernelArg::I64(slots as i64),
                out.arg(),
            ],
        )?;
        let mut host = vec![0f32; k + slots + 1];
        {
            let _r = crate::device::emu::allow_readout("StagedValues::read");
            dev.backend
                .copy_dtoh(out, bytemuck::cast_slice_mut(&mut host))?;
        }
        let flags: Vec<i32> = host[k..k + slots]
            .iter()
            .map(|f| f.to_bits() as i32)
            .collect();
        error_flags::report(dev, &flags)?;
        Ok(StepValues {
            values: host[..k].iter().map(|&v| v as f64).collect(),
            non_finite: host[k + slots] != 0.0,
        })
    }
}
