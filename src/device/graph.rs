//! Device graphs: capture a region of device work once, replay it many times.
//!
//! [`capture`] runs a closure with the device in capture mode: its kernel launches,
//! memsets and device copies are recorded instead of run (on CUDA through stream
//! capture, cudarc's `CudaStream::begin_capture` / `end_capture`; on the emulated
//! device by the emulator itself). [`Graph::replay`] then queues the whole region
//! again with one call, on the same buffers: refill the input buffers (a copy
//! outside the graph), replay, and read the outputs the closure returned.
//!
//! A region must have no data-dependent shapes and nothing that waits for the
//! device: during the capture a synchronisation, a device-to-host or host-to-device
//! copy, or an allocation the caching allocator could only serve from the driver is
//! an error naming the call (and the last kernel recorded before it). Run the region
//! once eagerly first so the cache holds the blocks it needs. The graph keeps every
//! block it used in a private pool (see [`super::alloc`]), so nothing else reuses
//! them between replays; the caller keeps the inputs alive.
//!
//! Users: [`crate::detection::graphed::GraphedDetector`] (a whole inference pass)
//! and [`crate::detection::graphed_train::GraphedTrainer`] (a training step's dense
//! forward and, from the tape recorded while it was captured, its backward).

use super::gpu::GraphExec;
use super::Device;
use crate::error::{Error, Result};

/// A captured region of device work (see the module docs).
pub struct Graph {
    exec: Box<dyn GraphExec>,
}

impl Graph {
    /// Run the captured work again, queued on the device's stream as one launch.
    pub fn replay(&self) -> Result<()> {
        self.exec.replay()
    }
    /// Number of recorded nodes (kernel launches, memsets, device copies).
    pub fn nodes(&self) -> usize {
        self.exec.nodes()
    }
}

impl std::fmt::Debug for Graph {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Graph({} nodes)", self.nodes())
    }
}

/// Capture the device work `f` does on `device` (see the module docs). Returns the
/// graph and `f`'s value, whose tensors each replay rewrites. If `f` fails, the
/// capture is ended and discarded and `f`'s error returned.
pub fn capture<T>(device: Device, f: impl FnOnce() -> Result<T>) -> Result<(Graph, T)> {
    let Device::Cuda(n) = device else {
        return Err(Error::invalid(
            "graph capture",
            "the CPU has no graphs: capture on a CUDA or emulated device",
        ));
    };
    let dev = super::gpu::device(n)?;
    dev.backend.begin_capture()?;
    let out = f();
    let exec = dev.backend.end_capture();
    let out = out?;
    Ok((Graph { exec: exec? }, out))
}
