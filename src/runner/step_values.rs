//! The read-back of a training step's logged values: the losses, the NaN flag and the
//! device's deferred kernel errors (see [`crate::device::error_flags`]) in one
//! device-to-host copy, made only on logging iterations.

use crate::device::error_flags;
use crate::device::gpu::{KernelArg, LaunchCfg};
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
