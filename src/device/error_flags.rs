//! Errors found by kernels (an index outside its tensor, a label outside the
//! classes), reported without a read-back per op.
//!
//! Eagerly (the default), an op that can find such an error gives its kernel a fresh
//! zeroed flag and reads it back after the launch: the error comes from the op
//! itself, at the price of one synchronisation per op. Inside a [`defer`] scope (a
//! training step) the kernel raises a slot of the device's flag table instead, one
//! slot per op, and nothing is read: [`check`] reads the whole table at a
//! synchronisation the step already has (the runner's logging read, the end of a
//! test step) and turns a raised slot into the op's error. A flag holds
//! (largest failing row) + 1, as the kernels write it.

use std::cell::Cell;
use std::sync::{Arc, Mutex};

use super::gpu::{GpuBuffer, GpuDevice, KernelArg};
use crate::error::{Error, Result};

/// Slots of a device's table: one per op that reports through it.
pub const SLOTS: usize = 16;

thread_local! {
    static DEFER_DEPTH: Cell<usize> = const { Cell::new(0) };
}

/// While alive, kernel errors on this thread go to the device's flag table instead
/// of being read back per op.
pub struct DeferGuard(());

impl Drop for DeferGuard {
    fn drop(&mut self) {
        DEFER_DEPTH.with(|d| d.set(d.get() - 1));
    }
}

/// Defer kernel error checks on this thread until [`check`] (scopes nest).
pub fn defer() -> DeferGuard {
    DEFER_DEPTH.with(|d| d.set(d.get() + 1));
    DeferGuard(())
}

/// Whether kernel errors are deferred on this thread.
pub fn deferred() -> bool {
    DEFER_DEPTH.with(|d| d.get() > 0)
}

struct Table {
    /// The backend the table lives on (compared by address).
    backend: usize,
    buf: GpuBuffer,
    /// Op and what a raised flag means, per slot in use.
    slots: Vec<(&'static str, &'static str)>,
}

static TABLES: Mutex<Vec<Table>> = Mutex::new(Vec::new());

fn backend_key(dev: &GpuDevice) -> usize {
    Arc::as_ptr(&dev.backend) as *const u8 as usize
}

fn with_table<R>(dev: &GpuDevice, f: impl FnOnce(&mut Table) -> Result<R>) -> Result<R> {
    let key = backend_key(dev);
    let mut tables = TABLES.lock().unwrap_or_else(|p| p.into_inner());
    if !tables.iter().any(|t| t.backend == key) {
        // Zeroed once; `check` clears the slots it reports.
        let buf = {
            let _long = super::alloc::long_lived();
            dev.alloc_zeroed(4 * SLOTS)?
        };
        tables.push(Table {
            backend: key,
            buf,
            slots: Vec::new(),
        });
    }
    // Invariant: the table of `key` was pushed above if missing.
    let t = tables.iter_mut().find(|t| t.backend == key).unwrap();
    f(t)
}

/// A kernel's error flag for `op`: a fresh zeroed `int` checked by [`Flag::finish`]
/// (eager), or the op's slot of the device's table (deferred). `what` says what a
/// raised flag means, with `{}` standing for the failing row.
pub fn flag(dev: &GpuDevice, op: &'static str, what: &'static str) -> Result<Flag> {
    if !deferred() {
        return Ok(Flag::Eager(dev.alloc_zeroed(4)?));
    }
    with_table(dev, |t| {
        let slot = match t.slots.iter().position(|s| s.0 == op) {
            Some(s) => s,
            None if t.slots.len() < SLOTS => {
                t.slots.push((op, what));
                t.slots.len() - 1
            }
            None => {
                return Err(Error::invalid(
                    "error_flags",
                    format!("more than {SLOTS} ops report through the flag table"),
                ))
            }
        };
        Ok(Flag::Deferred(KernelArg::Ptr {
            ptr: t.buf.ptr() + 4 * slot as u64,
            bytes: 4,
        }))
    })
}

/// One launch's error flag (see [`flag`]).
pub enum Flag {
    /// A buffer of its own, read back by [`Flag::finish`].
    Eager(GpuBuffer),
    /// A slot of the device's table, read by [`check`].
    Deferred(KernelArg),
}

impl Flag {
    /// The `int*` kernel argument.
    pub fn arg(&self) -> KernelArg {
        match self {
            Flag::Eager(b) => b.arg(),
            Flag::Deferred(a) => *a,
        }
    }

    /// Eager: read the flag back (one synchronisation) and give `err(row)` if it was
    /// raised. Deferred: nothing now; [`check`] reports it.
    pub fn finish(self, dev: &GpuDevice, err: impl FnOnce(usize) -> Error) -> Result<()> {
        if let Flag::Eager(b) = self {
            let mut v = [0i32];
            dev.backend
                .copy_dtoh(&b, bytemuck::cast_slice_mut(&mut v))?;
            if v[0] != 0 {
                return Err(err(v[0] as usize - 1));
            }
        }
        Ok(())
    }
}

/// The device's flag table as a kernel argument (`SLOTS` ints), for a read-out that
/// copies it back together with other values; `None` before any deferred flag.
pub fn table_arg(dev: &GpuDevice) -> Option<KernelArg> {
    let key = backend_key(dev);
    let tables = TABLES.lock().unwrap_or_else(|p| p.into_inner());
    tables
        .iter()
        .find(|t| t.backend == key)
        .map(|t| t.buf.arg())
}

/// Turn table values read back (by [`check`] or a combined read-out) into the first
/// raised op's error, naming the op; clears the table when one was raised.
pub fn report(dev: &GpuDevice, values: &[i32]) -> Result<()> {
    let Some((slot, &v)) = values.iter().enumerate().find(|(_, &v)| v != 0) else {
        return Ok(());
    };
    with_table(dev, |t| {
        t.buf_clear(dev)?;
        let (op, what) = t.slots.get(slot).copied().unwrap_or(("?", "flag {}"));
        Err(Error::invalid(
            op,
            format!(
                "{} (found by the kernel during the step, reported at the next check)",
                what.replace("{}", &(v as usize - 1).to_string())
            ),
        ))
    })
}

impl Table {
    fn buf_clear(&self, dev: &GpuDevice) -> Result<()> {
        dev.backend.memset(&self.buf, 0)
    }
}

/// Read the device's flag table (one device-to-host copy; nothing if no deferred
/// flag was ever handed out) and report the first raised op.
pub fn check(dev: &GpuDevice) -> Result<()> {
    let buf = {
        let key = backend_key(dev);
        let tables = TABLES.lock().unwrap_or_else(|p| p.into_inner());
        match tables.iter().find(|t| t.backend == key) {
            Some(t) => t.buf.clone(),
            None => return Ok(()),
        }
    };
    let mut v = [0i32; SLOTS];
    dev.backend
        .copy_dtoh(&buf, bytemuck::cast_slice_mut(&mut v))?;
    report(dev, &v)
}
