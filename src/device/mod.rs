//! Where tensors live and kernels run.
//!
//! `Device::Cpu` always works. `Device::Cuda(n)` is resolved at run time through
//! [`gpu::device`]: every CUDA code path talks to a [`gpu::GpuBackend`], the one small
//! interface (load a kernel by name, allocate, copy, launch), so an emulated device can
//! stand in for a real one.

pub mod alloc;
pub mod cpu;
pub mod cuda;
pub mod emu;
pub mod error_flags;
pub mod gpu;
pub mod graph;
pub mod kernels;
pub mod op_memory;

use std::fmt;

use crate::error::{Error, Result};

/// A place where tensors are stored and ops run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Device {
    /// Host memory; ops run on the rayon thread pool.
    #[default]
    Cpu,
    /// CUDA device with this ordinal.
    Cuda(usize),
}

impl Device {
    /// Parse `cpu`, `cuda`, `cuda:N`, `emu` (the emulated CUDA device, see
    /// [`emu::device`]) or `auto` (best device present).
    pub fn parse(s: &str) -> Result<Device> {
        match s {
            "cpu" => Ok(Device::Cpu),
            "emu" => emu::device(),
            "cuda" => Ok(Device::Cuda(0)),
            "auto" => Ok(Device::best()),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Device::Cuda)
                .ok_or_else(|| {
                    Error::invalid(
                        "device",
                        format!("`{s}`: expected cpu, cuda, cuda:N, emu or auto"),
                    )
                }),
        }
    }

    /// CUDA device 0 if it can be opened, else the CPU.
    pub fn best() -> Device {
        if gpu::device(0).is_ok() {
            Device::Cuda(0)
        } else {
            Device::Cpu
        }
    }

    /// A scoped reader of this thread's device counters (launches, copies,
    /// driver allocations, syncs): `let c = device.counters(); ...; c.delta()`.
    /// Always zero on the CPU and on a device that cannot be opened.
    pub fn counters(self) -> gpu::CounterScope {
        match self {
            Device::Cpu => gpu::CounterScope::none(),
            Device::Cuda(n) => gpu::device(n)
                .map(|d| d.counters())
                .unwrap_or_else(|_| gpu::CounterScope::none()),
        }
    }

    /// Device memory held by the caching allocator (zero on the CPU).
    pub fn memory(self) -> gpu::MemoryStats {
        match self {
            Device::Cpu => gpu::MemoryStats::default(),
            Device::Cuda(n) => gpu::device(n).map(|d| d.memory()).unwrap_or_default(),
        }
    }

    /// Restart the peaks of [`Device::memory`] (nothing on the CPU).
    pub fn reset_peak_memory(self) {
        if let Device::Cuda(n) = self {
            if let Ok(d) = gpu::device(n) {
                d.reset_peak_memory();
            }
        }
    }

    /// True for `Device::Cuda(_)`.
    pub fn is_cuda(self) -> bool {
        matches!(self, Device::Cuda(_))
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(emu::EMU_ORDINAL) => f.write_str("emu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}
