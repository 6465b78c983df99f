//! Helpers shared by the criterion benches (each bench is its own crate and includes
//! this module; not every bench uses every helper).
#![allow(dead_code)]

use kestrel::Device;

/// The CPU, and CUDA device 0 when one is usable here.
pub fn devices() -> Vec<Device> {
    let mut d = vec![Device::Cpu];
    if kestrel::device::gpu::device(0).is_ok() {
        d.push(Device::Cuda(0));
    }
    d
}

/// [`devices`] with the name a bench id uses (`cpu`, `cuda`).
pub fn named_devices() -> Vec<(Device, &'static str)> {
    devices()
        .into_iter()
        .map(|d| (d, if d.is_cuda() { "cuda" } else { "cpu" }))
        .collect()
}

/// Wait for queued device work, so a CUDA iteration times the work and not the
/// launch (a no-op on the CPU).
pub fn sync(device: Device) {
    if let Device::Cuda(n) = device {
        kestrel::device::gpu::device(n)
            .and_then(|d| d.backend.synchronize())
            .expect("synchronize a device opened before");
    }
}
