//! The caching allocator behind every GPU backend (src/device/alloc.rs), on the
//! emulated device: reuse without the driver, size classes, poisoned fresh memory,
//! zero-filling only on request, memory statistics.
//!
//! Every test here takes LOCK: the cache and the memory figures are per device, and
//! a block freed by one test could be taken by another running in parallel.

mod common;

use std::sync::Mutex;

use kestrel::device::alloc::size_class;
use kestrel::device::emu;
use kestrel::device::gpu::GpuDevice;
use kestrel::Tensor;

static LOCK: Mutex<()> = Mutex::new(());

fn dev() -> GpuDevice {
    emu::gpu_device().unwrap_or_else(|e| panic!("emulated CUDA device unavailable: {e}"))
}

fn bytes_of(dev: &GpuDevice, buf: &kestrel::device::gpu::GpuBuffer) -> Vec<u8> {
    let mut host = vec![0u8; buf.bytes()];
    dev.backend.copy_dtoh(buf, &mut host).unwrap();
    host
}

#[test]
fn a_freed_block_is_reused_without_the_driver() {
    let _l = LOCK.lock().unwrap_or_else(|p| p.into_inner());
    let d = dev();
    let size = 3 * 1024 * 1024 + 12; // a class no other test here uses
    let first = d.alloc(size).unwrap();
    let ptr = first.ptr();
    drop(first);
    let c = d.counters();
    let again = d.alloc(size).unwrap();
    let delta = c.delta();
    assert_eq!(delta.driver_allocs, 0, "{delta}");
    assert_eq!(delta.cached_allocs, 1, "{delta}");
    assert_eq!(again.ptr(), ptr, "the same block, at the same offset");
    // A slightly smaller request of the same class (3.5 MiB) takes the same block
    // too.
    drop(again);
    let c = d.counters();
    let smaller = d.alloc(size - 8).unwrap();
    assert_eq!(c.delta().driver_allocs, 0, "{}", c.delta());
    assert_eq!(smaller.ptr(), ptr);
    drop(smaller);
    // A request of the class below (3 MiB) gets a block of its own class, not
    // the cached larger one (src/device/alloc.rs: a request takes only its own
    // class while the driver has memory).
    let c = d.counters();
    let below = d.alloc(size - 1000).unwrap();
    assert_eq!(c.delta().driver_allocs, 1, "{}", c.delta());
    assert_ne!(below.ptr(), ptr);
    drop(below);
}

#[test]
fn a_block_in_use_is_never_handed_out_twice() {
    let _l = LOCK.lock().unwrap_or_else(|p| p.into_inner());
    let d = dev();
    let bufs: Vec<_> = (0..8).map(|_| d.alloc(4096).unwrap()).collect();
    let mut ranges: Vec<(u64, u64)> = bufs.iter().map(|b| (b.ptr(), b.ptr() + 4096)).collect();
    ranges.sort();
    for w in ranges.windows(2) {
        assert!(w[0].1 <= w[1].0, "overlapping blocks {:?}", w);
    }
}

#[test]
fn fresh_memory_is_poisoned_and_zeroed_only_on_request() {
    let _l = LOCK.lock().unwrap_or_else(|p| p.into_inner());
    let d = dev();
    // Write zeros into a block, free it: the next owner must not see them.
    let b = d.alloc(1000).unwrap();
    d.backend.copy_htod(&[0u8; 1000], &b).unwrap();
    drop(b);
    let c = d.counters();
    let b = d.alloc(1000).unwrap();
    assert!(
        bytes_of(&d, &b).iter().all(|&x| x == emu::POISON),
        "fresh block not poisoned"
    );
    assert_eq!(c.delta().memsets, 0, "alloc must not zero-fill");
    let t = Tensor::gpu_empty(&d, [10]).unwrap();
    assert!(t.to_vec::<f32>().unwrap().iter().all(|v| v.is_nan()));
    let i = Tensor::gpu_empty_i64(&d, [3]).unwrap();
    assert_eq!(i.to_vec_i64().unwrap(), vec![-1, -1, -1]);

    let c = d.counters();
    let z = Tensor::gpu_zeros(&d, [10]).unwrap();
    assert_eq!(c.delta().memsets, 1, "{}", c.delta());
    assert_eq!(z.to_vec::<f32>().unwrap(), vec![0.0; 10]);
}

#[test]
fn memory_statistics_follow_the_blocks() {
    let _l = LOCK.lock().unwrap_or_else(|p| p.into_inner());
    let d = dev();
    let size: usize = 5 * 1024 * 1024 + 7;
    let class = size_class(size.next_multiple_of(16)) as u64;
    d.reset_peak_memory();
    let before = d.memory();
    let b = d.alloc(size).unwrap();
    let during = d.memory();
    assert_eq!(during.allocated, before.allocated + class);
    assert!(during.peak_allocated >= during.allocated);
    assert!(during.reserved >= during.allocated);
    drop(b);
    let after = d.memory();
    assert_eq!(after.allocated, before.allocated);
    assert_eq!(
        after.peak_allocated, during.peak_allocated,
        "the peak stays"
    );
    assert_eq!(after.reserved, during.reserved, "the block stays cached");
    d.reset_peak_memory();
    assert_eq!(d.memory().peak_allocated, after.allocated);

    // Emptying the cache gives the block back to the driver, and counts it.
    let c = d.counters();
    d.empty_cache();
    let delta = c.delta();
    assert!(delta.driver_frees >= 1, "{delta}");
    assert!(delta.driver_free_bytes >= class, "{delta}");
    assert!(d.memory().reserved <= after.reserved - class);
}

#[test]
fn size_classes_bound_the_waste() {
    for bytes in [
        1usize,
        100,
        512,
        513,
        4096,
        4097,
        1 << 20,
        (1 << 20) + 1,
        123_456_789,
    ] {
        let c = size_class(bytes);
        assert!(c >= bytes);
        assert!(c == 512 || (c - bytes) * 5 < c, "{bytes} -> {c}");
    }
}
