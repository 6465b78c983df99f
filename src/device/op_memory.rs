//! The device memory one op needs on its own, inside a larger stage: an op opens an
//! [`OpScope`] around its work, and while this thread records ([`record`]) the scope
//! books what was in use when the op began and the highest use while it ran (the
//! caching allocator's bytes, as [`super::gpu::MemoryStats::allocated`]). The stage
//! profiler (`kestrel bench`) shows these as sub-rows of its stages, e.g. the
//! detection NMS inside post-processing.
//!
//! A scope restarts the device's peak at its start and, when it ends, raises the
//! peak back to what it was before if that was higher, so the enclosing stage's peak
//! is the same with or without the scope. Not recording (the default), a scope costs
//! nothing and books nothing.

use std::cell::{Cell, RefCell};

use super::gpu::GpuDevice;

thread_local! {
    static RECORDING: Cell<bool> = const { Cell::new(false) };
    static RECORDS: RefCell<Vec<OpMemory>> = const { RefCell::new(Vec::new()) };
}

/// Bytes in use around one op.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OpMemory {
    /// The op's name.
    pub op: &'static str,
    /// Bytes in use when the op began.
    pub before: u64,
    /// Highest bytes in use while it ran.
    pub peak: u64,
    /// Bytes in use when it ended (its outputs still live).
    pub after: u64,
}

impl OpMemory {
    /// What the op allocated above what was in use when it began (its scratch and its
    /// outputs at their highest).
    pub fn added(&self) -> u64 {
        self.peak.saturating_sub(self.before)
    }
}

/// Start (or stop) booking op scopes on this thread; stopping drops what was booked.
pub fn record(on: bool) {
    RECORDING.with(|r| r.set(on));
    if !on {
        RECORDS.with(|r| r.borrow_mut().clear());
    }
}

/// The scopes booked on this thread since the last call, in the order they ended.
pub fn take() -> Vec<OpMemory> {
    RECORDS.with(|r| std::mem::take(&mut *r.borrow_mut()))
}

/// Measures one op while alive (see the module docs); `None` inside when not
/// recording.
pub struct OpScope(Option<Open>);

struct Open {
    dev: GpuDevice,
    op: &'static str,
    before: u64,
    outer_peak: u64,
    outer_peak_reserved: u64,
}

/// Open a scope for `op` on `dev`.
pub fn scope(dev: &GpuDevice, op: &'static str) -> OpScope {
    if !RECORDING.with(Cell::get) {
        return OpScope(None);
    }
    let m = dev.memory();
    dev.reset_peak_memory();
    OpScope(Some(Open {
        dev: dev.clone(),
        op,
        before: m.allocated,
        outer_peak: m.peak_allocated,
        outer_peak_reserved: m.peak_reserved,
    }))
}

impl Drop for OpScope {
    fn drop(&mut self) {
        if let Some(o) = self.0.take() {
            let m = o.dev.memory();
            RECORDS.with(|r| {
                r.borrow_mut().push(OpMemory {
                    op: o.op,
                    before: o.before,
                    peak: m.peak_allocated,
                    after: m.allocated,
                })
            });
            o.dev
                .backend
                .raise_peak_memory(o.outer_peak, o.outer_peak_reserved);
        }
    }
}
