//! The emulated CUDA device: the real kernels/*.cu code, compiled as host C++ with
//! a small shim (kernels/emu/shim.h) by build.rs, run on the CPU behind the same
//! [`GpuBackend`] interface as a GPU. Every CUDA code path of the ops can so be
//! tested without a GPU:
//!
//! ```
//! # fn main() -> kestrel::Result<()> {
//! # if !kestrel::device::emu::available() { return Ok(()); }
//! let dev = kestrel::device::emu::device()?; // Device::Cuda(EMU_ORDINAL)
//! let x = kestrel::Tensor::from_vec(vec![-1.0f32, 2.0], [2])?.to_device(dev)?;
//! let y = kestrel::ops::relu(&x)?; // runs kernels/elementwise.cu: relu_fwd_f32
//! assert_eq!(y.to_vec::<f32>()?, vec![0.0, 2.0]);
//! # Ok(()) }
//! ```
//!
//! Device memory is host memory; a launch runs every block of the grid (blocks in
//! parallel on a pool of worker threads, `KESTREL_EMU_THREADS`), the threads of a
//! block as fibers that meet at each barrier, so kernels that synchronise behave as
//! on a GPU. A launch is checked as a GPU would check it (block size, shared memory,
//! argument count and types, null pointers, pointers that are not live buffers of
//! this device or smaller than one element), and a read or write past the end of a
//! buffer stops the process with the kernel's name, block and thread (a guard page
//! after every buffer), or, in a build with `KESTREL_EMU_SANITIZE=address`, with
//! AddressSanitizer's report naming the kernel's file and line.
//!
//! Slow (a CUDA thread costs a function call, plus a fiber switch per barrier it
//! waits at): use small shapes.
//!
//! # Modes and knobs
//!
//! - `KESTREL_EMU_SANITIZE=address cargo test --test <file>`: the emulated kernels are
//!   built with AddressSanitizer (device buffers and dynamic shared memory are
//!   checked; the report names the kernel's file and line). Run it on test targets
//!   only (doc tests are not linked with the sanitizer runtime).
//! - `KESTREL_EMU_SANITIZE=thread ...`: ThreadSanitizer. Every thread of a block is a
//!   TSan fiber that synchronises with the others only at barriers, so a missing
//!   `__syncthreads` before reading shared memory is reported as a data race.
//! - `KESTREL_EMU=0` at build time leaves the emulator out.
//! - `KESTREL_EMU_THREADS` (worker threads, default: the cores, at most 8),
//!   `KESTREL_EMU_STACK_KB` (per-thread stack, default 256, 1024 with sanitizers),
//!   `KESTREL_EMU_SCHEDULE=reverse` (thread order, see [`set_schedule`]).
//! - Coverage: every launch is recorded under [`record_dir`] with the program and the
//!   [`run_id`]; `kestrel kernels` shows which test binaries ran each kernel here, and
//!   tests/zz_emu_coverage.rs fails when a kernel entry was not launched on the
//!   emulated device, by a test target that `kestrel kernel-check` maps it to, in the
//!   same `cargo test` run.
//! - `kestrel kernel-check NAME`: the kernel's parity tests (emulated, and on a real
//!   GPU when present) and its bench, in one command.
//! - Plan mode (`KESTREL_EMU_PLAN=1` for the process, [`set_plan_mode`] for the
//!   calling thread): memory and launch accounting of a pass without computing it.
//!   See [`set_plan_mode`].
//!
//! What the shim supports and its limits: kernels/emu/shim.h.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::ThreadId;

use super::gpu::{self, validate_launch, GpuBackend, GpuBuffer, GraphExec, KernelArg, LaunchCfg};
use super::Device;
use crate::error::{Error, Result};

/// The `Device::Cuda` ordinal reserved for the emulated device; real devices keep
/// their own ordinals, so both can be used in one process.
pub const EMU_ORDINAL: usize = 1000;

/// Dynamic shared memory a launch may ask for. 48 KiB is what a GPU grants without
/// the per-kernel opt-in (`cuFuncSetAttribute`), which the CUDA backend does not do.
pub const DYNAMIC_SHARED_LIMIT: u32 = 48 * 1024;

/// Whether this build contains the emulator (a C++ compiler was found at build time
/// and `KESTREL_EMU=0` was not set).
pub fn available() -> bool {
    cfg!(kestrel_emu)
}

/// The emulated device as a [`Device`] (`Device::Cuda(EMU_ORDINAL)`): move tensors
/// there with `tensor.to_device(dev)` and every op runs its CUDA code path.
pub fn device() -> Result<Device> {
    gpu_device().map(|d| Device::Cuda(d.ordinal))
}

/// The emulated device's [`gpu::GpuDevice`] handle, registered on first use.
pub fn gpu_device() -> Result<gpu::GpuDevice> {
    if !available() {
        return Err(Error::CudaUnavailable(
            "the emulated CUDA device is not in this build (no C++ compiler at build time, or KESTREL_EMU=0)".into(),
        ));
    }
    static BACKEND: OnceLock<Arc<EmuBackend>> = OnceLock::new();
    Ok(gpu::register_backend_once(EMU_ORDINAL, || {
        BACKEND.get_or_init(|| Arc::new(EmuBackend::new())).clone()
    }))
}

/// Which sanitizer the emulated kernels were built with: `"none"`, `"address"` or
/// `"thread"` (`KESTREL_EMU_SANITIZE` at build time).
pub fn sanitizer() -> &'static str {
    imp::sanitizer()
}

/// Order in which the runnable threads of a block run between two barriers. A kernel
/// that is missing a barrier gives different results under the two orders.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Schedule {
    /// Thread 0 first (the default; `KESTREL_EMU_SCHEDULE=forward`).
    Forward,
    /// The last thread first (`KESTREL_EMU_SCHEDULE=reverse`).
    Reverse,
}

/// Set the thread order for every later launch in this process.
pub fn set_schedule(s: Schedule) {
    imp::set_schedule(s == Schedule::Reverse);
}

/// Kernels launched on the emulated device by this process, sorted.
pub fn launched() -> Vec<String> {
    let set = launched_set().lock().unwrap_or_else(|p| p.into_inner());
    let mut v: Vec<String> = set.iter().cloned().collect();
    v.sort();
    v
}

/// Where emulated launches are recorded across processes: one file per kernel,
/// holding the names of the test binaries that launched it. `KESTREL_EMU_RECORD`
/// overrides the default (`<target>/kestrel-emu-launches`).
pub fn record_dir() -> PathBuf {
    match std::env::var_os("KESTREL_EMU_RECORD") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(env!("KESTREL_EMU_RECORD_DIR")),
    }
}

/// The recorded launches: kernel -> programs that launched it on the emulated device,
/// with the record's modification time.
pub fn recorded_launches() -> BTreeMap<String, (Vec<String>, std::time::SystemTime)> {
    let mut out = BTreeMap::new();
    let Ok(dir) = std::fs::read_dir(record_dir()) else {
        return out;
    };
    for e in dir.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let who = std::fs::read_to_string(e.path()).unwrap_or_default();
        let mut progs: Vec<String> = who
            .lines()
            .filter_map(|l| l.split('\t').next())
            .filter(|p| !p.is_empty())
            .map(str::to_string)
            .collect();
        progs.sort();
        progs.dedup();
        let time = e
            .metadata()
            .and_then(|m| m.modified())
            .unwrap_or(std::time::UNIX_EPOCH);
        out.insert(name, (progs, time));
    }
    out
}

/// One recorded first launch of a kernel by a process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LaunchRecord {
    /// Kernel entry, e.g. `nms_mask_f32`.
    pub kernel: String,
    /// File name of the program that launched it (a test binary carries a hash suffix).
    pub program: String,
    /// The run it belongs to, see [`run_id`] (empty in records written before run ids).
    pub run: String,
}

/// The run this process belongs to: `KESTREL_TEST_RUN` when set, else the id of the
/// parent process. `cargo test` starts every test binary of one invocation as its
/// own child, so the records of one `cargo test` share the run id and a later (or
/// earlier) invocation's records do not: coverage is judged on one run, never on
/// file times.
pub fn run_id() -> String {
    match std::env::var("KESTREL_TEST_RUN") {
        Ok(r) if !r.is_empty() => r,
        _ => format!("ppid-{}", std::os::unix::process::parent_id()),
    }
}

/// Every record under [`record_dir`], in file order per kernel.
pub fn launch_records() -> Vec<LaunchRecord> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir(record_dir()) else {
        return out;
    };
    for e in dir.flatten() {
        let kernel = e.file_name().to_string_lossy().into_owned();
        let text = std::fs::read_to_string(e.path()).unwrap_or_default();
        for l in text.lines().filter(|l| !l.is_empty()) {
            let (program, run) = l.split_once('\t').unwrap_or((l, ""));
            out.push(LaunchRecord {
                kernel: kernel.clone(),
                program: program.to_string(),
                run: run.to_string(),
            });
        }
    }
    out
}

fn launched_set() -> &'static Mutex<HashSet<String>> {
    static SET: OnceLock<Mutex<HashSet<String>>> = OnceLock::new();
    SET.get_or_init(|| Mutex::new(HashSet::new()))
}

thread_local! {
    /// Kernels launched on the emulated device from this thread (see [`thread_launches`]).
    static THREAD_LAUNCHES: std::cell::RefCell<Vec<String>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Kernels launched on the emulated device from the calling thread since the last
/// call, in launch order, and clears the list. Tests run in parallel threads, so this
/// (unlike [`launched`]) tells a test which kernels *it* reached.
pub fn take_thread_launches() -> Vec<String> {
    THREAD_LAUNCHES.with(|l| std::mem::take(&mut *l.borrow_mut()))
}

/// Note the first launch of `kernel` in this process, here and in [`record_dir`].
fn record_launch(kernel: &str) {
    THREAD_LAUNCHES.with(|l| l.borrow_mut().push(kernel.to_string()));
    let mut set = launched_set().lock().unwrap_or_else(|p| p.into_inner());
    if !set.insert(kernel.to_string()) {
        return;
    }
    let prog = std::env::current_exe()
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "unknown".into());
    // Best effort: a read-only target dir only loses the coverage record.
    let dir = record_dir();
    if std::fs::create_dir_all(&dir).is_ok() {
        use std::io::Write;
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join(kernel))
        {
            let _ = writeln!(f, "{prog}\t{}", run_id());
        }
    }
}

thread_local! {
    /// This thread's plan-mode override (see [`set_plan_mode`]); `None`: the process
    /// default (`KESTREL_EMU_PLAN`).
    static PLAN: std::cell::Cell<Option<bool>> = const { std::cell::Cell::new(None) };
    /// Read-outs allowed in plan mode on this thread, innermost last (see [`allow_readout`]).
    static READOUTS: std::cell::RefCell<Vec<&'static str>> = const { std::cell::RefCell::new(Vec::new()) };
    /// The last kernel launched from this thread, to say where a refused read-back came from.
    static LAST_KERNEL: std::cell::RefCell<Option<String>> = const { std::cell::RefCell::new(None) };
}

/// Turn plan mode on or off for the calling thread (overriding `KESTREL_EMU_PLAN=1`,
/// which turns it on for every thread of the process).
///
/// In plan mode the emulated device does everything a pass does to the device
/// except compute: launches are checked exactly as always (grid, block, shared
/// memory, argument kinds, live buffers) and counted, but their bodies do not run;
/// blocks are not poisoned and device-to-device copies are counted but not
/// performed, so untouched pages of a block are never mapped (a batch-16 R50-FPN
/// pass may reserve many GB). Host-to-device copies and memsets still write: they
/// are cheap, and state that outlives the pass (the kernel-error flag table, zeroed
/// once) stays valid for real runs later in the same process.
///
/// Why it is exact: the caching allocator's decisions (which block, which size
/// class, when to ask the driver) depend only on the sequence of allocation sizes
/// and frees, and those depend on data only where the host reads device data back
/// (a count that sizes the next buffer). So plan mode refuses every device-to-host
/// copy outside an [`allow_readout`] scope (an end-of-step read-out whose values
/// decide nothing): with no refusal, the plan made exactly the allocations, frees,
/// launches and copies of a real run, and the allocator's peak is the real peak.
/// tests/emu_plan.rs checks this against real runs. An allowed read-out reads zeros
/// (nothing was computed).
pub fn set_plan_mode(on: bool) {
    PLAN.with(|p| p.set(Some(on)));
}

/// Whether plan mode is on for the calling thread (see [`set_plan_mode`]).
pub fn plan_mode() -> bool {
    static PROCESS: OnceLock<bool> = OnceLock::new();
    PLAN.with(|p| p.get()).unwrap_or_else(|| {
        *PROCESS.get_or_init(|| {
            std::env::var("KESTREL_EMU_PLAN").is_ok_and(|v| !v.is_empty() && v != "0")
        })
    })
}

/// While the returned guard lives, device-to-host copies of the calling thread are
/// allowed in plan mode: an end-of-step read-out named `what` (the losses read on a
/// logging iteration, the final detections). Its values are not computed in plan
/// mode: the copy yields zeros (whatever a block held before would be stale data of
/// another op; zeros keep the read-out's flag checks quiet and make the plan
/// deterministic), so the caller must not let them size or steer later device work.
/// Outside plan mode (and on other backends) the guard does nothing.
pub fn allow_readout(what: &'static str) -> ReadoutGuard {
    READOUTS.with(|r| r.borrow_mut().push(what));
    ReadoutGuard {
        _not_send: std::marker::PhantomData,
    }
}

/// See [`allow_readout`]; ends the scope when dropped.
pub struct ReadoutGuard {
    /// The scope belongs to the thread that opened it.
    _not_send: std::marker::PhantomData<*const ()>,
}

impl Drop for ReadoutGuard {
    fn drop(&mut self) {
        READOUTS.with(|r| r.borrow_mut().pop());
    }
}

/// The first function of the caller's stack in Kestrel's source outside the device
/// and tensor layers (the op that read back), with its file and line, or `None`
/// when the build has no line tables.
fn reading_op() -> Option<String> {
    let bt = std::backtrace::Backtrace::force_capture().to_string();
    // Lines are `  N: name`, `      name` (a frame inlined into the one above) or
    // `at file:line:col` for the name above; names may lack their module path (line
    // tables only), so the file says whose code it is.
    let mut name = "";
    for l in bt.lines().map(str::trim) {
        if let Some(at) = l.strip_prefix("at ") {
            let ours = at.contains("src/")
                && !at.contains(".cargo")
                && !at.contains("/rustc/")
                && !at.contains("src/device/")
                && !at.contains("src/tensor/");
            if ours {
                let at = at.rsplit_once(':').map_or(at, |(f, _col)| f);
                let at = at.find("src/").map_or(at, |i| &at[i..]);
                return Some(format!("{name} ({at})"));
            }
        } else {
            name = match l.split_once(": ") {
                Some((n, f)) if n.chars().all(|c| c.is_ascii_digit()) => f.trim(),
                _ => l,
            };
        }
    }
    None
}

/// In plan mode, refuse a device-to-host copy outside an allowed read-out.
fn check_plan_readback(bytes: usize) -> Result<()> {
    if !plan_mode() || READOUTS.with(|r| !r.borrow().is_empty()) {
        return Ok(());
    }
    let op = reading_op().unwrap_or_else(|| "an unnamed caller (no line tables)".into());
    let last = LAST_KERNEL.with(|k| k.borrow().clone());
    Err(Error::invalid(
        "emulated device plan mode",
        format!(
            "{op} read {bytes} bytes back from the device (after kernel {}): in plan mode kernels do not compute, so a value read back could size or steer later work differently from a real run; only an end-of-step read-out (emu::allow_readout) may read back",
            last.as_deref().unwrap_or("none")
        ),
    ))
}

/// The byte every block handed out by the caching allocator is filled with: all
/// bits set is NaN as f32 and f64 and -1 as i64, so a kernel that relied on fresh
/// memory being zero gives visibly wrong results.
pub const POISON: u8 = 0xFF;

/// Live allocations of the emulated device: start address -> bytes.
type Allocs = Arc<Mutex<BTreeMap<u64, usize>>>;

/// One recorded operation of a graph capture (raw addresses, as a CUDA graph holds).
#[derive(Clone, Debug)]
enum Node {
    Launch {
        kernel: String,
        cfg: LaunchCfg,
        args: Vec<KernelArg>,
    },
    Memset {
        ptr: u64,
        bytes: usize,
        value: u8,
    },
    Dtod {
        src: u64,
        dst: u64,
        bytes: usize,
    },
}

/// The emulated device (see the module docs). Use [`device`] rather than creating one.
pub struct EmuBackend {
    allocs: Allocs,
    /// Graph captures in progress, per capturing thread: what they recorded so far.
    captures: Mutex<HashMap<ThreadId, Vec<Node>>>,
}

impl EmuBackend {
    fn new() -> Self {
        EmuBackend {
            allocs: Arc::new(Mutex::new(BTreeMap::new())),
            captures: Mutex::new(HashMap::new()),
        }
    }

    /// Record `node` if the calling thread is capturing; true when recorded.
    fn capture(&self, node: impl FnOnce() -> Node) -> bool {
        let mut caps = self.captures.lock().unwrap_or_else(|p| p.into_inner());
        match caps.get_mut(&std::thread::current().id()) {
            Some(nodes) => {
                nodes.push(node());
                true
            }
            None => false,
        }
    }

    /// The live allocation holding `bytes` bytes at `ptr`, checked for `op`.
    fn check_range(&self, op: &str, ptr: u64, bytes: usize) -> Result<()> {
        let allocs = self.allocs.lock().unwrap_or_else(|p| p.into_inner());
        match allocs.range(..=ptr).next_back() {
            Some((&start, &len)) if ptr + bytes as u64 <= start + len as u64 => Ok(()),
            _ => Err(Error::invalid(
                "graph replay",
                format!(
                    "{op}: {bytes} bytes at {ptr:#x} are not (all) a live buffer: a buffer the graph uses was freed"
                ),
            )),
        }
    }

    /// Run one node now.
    fn run_node(&self, n: &Node) -> Result<()> {
        match n {
            Node::Launch { kernel, cfg, args } => {
                let entry = imp::entry(kernel)?;
                self.check_launch(kernel, cfg, args, entry.params())?;
                run_launch(kernel, entry, cfg, args)
            }
            Node::Memset { ptr, bytes, value } => {
                self.check_range("memset", *ptr, *bytes)?;
                // SAFETY: checked above: a live emulated allocation (host memory).
                unsafe { std::ptr::write_bytes(*ptr as *mut u8, *value, *bytes) };
                Ok(())
            }
            Node::Dtod { src, dst, bytes } => {
                self.check_range("copy_dtod source", *src, *bytes)?;
                self.check_range("copy_dtod destination", *dst, *bytes)?;
                if plan_mode() {
                    return Ok(());
                }
                // SAFETY: both ranges checked live above; `copy` allows overlap.
                unsafe { std::ptr::copy(*src as *const u8, *dst as *mut u8, *bytes) };
                Ok(())
            }
        }
    }

    /// Check one pointer argument against the live allocations.
    fn check_ptr(&self, kernel: &str, i: usize, ptr: u64, bytes: usize, elem: usize) -> Result<()> {
        let fail = |msg: String| {
            Err(Error::Launch {
                kernel: kernel.to_string(),
                msg: format!("argument {i}: {msg}"),
            })
        };
        if ptr == 0 {
            return fail("null pointer".into());
        }
        if bytes < elem {
            return fail(format!(
                "buffer of {bytes} bytes is smaller than one {elem}-byte element"
            ));
        }
        let allocs = self.allocs.lock().unwrap_or_else(|p| p.into_inner());
        match allocs.range(..=ptr).next_back() {
            Some((&start, &len)) if ptr + bytes as u64 <= start + len as u64 => Ok(()),
            Some((&start, &len)) if ptr < start + len as u64 => fail(format!(
                "{bytes} bytes at {ptr:#x} run past the end of the {len}-byte buffer at {start:#x}"
            )),
            _ => fail(format!(
                "{ptr:#x} is not a live buffer of the emulated device"
            )),
        }
    }

    /// Check `args` against the kernel's signature and launch limits.
    fn check_launch(
        &self,
        kernel: &str,
        cfg: &LaunchCfg,
        args: &[KernelArg],
        sig: &[imp::Param],
    ) -> Result<()> {
        validate_launch(kernel, cfg)?;
        let fail = |msg: String| {
            Err(Error::Launch {
                kernel: kernel.to_string(),
                msg,
            })
        };
        if cfg.shared_bytes > DYNAMIC_SHARED_LIMIT {
            return fail(format!(
                "{} bytes of dynamic shared memory exceed the {} bytes a GPU grants without opt-in",
                cfg.shared_bytes, DYNAMIC_SHARED_LIMIT
            ));
        }
        if args.len() != sig.len() {
            return fail(format!(
                "{} arguments passed, the kernel takes {}",
                args.len(),
                sig.len()
            ));
        }
        for (i, (a, p)) in args.iter().zip(sig).enumerate() {
            let ok = match (a, p.kind) {
                (KernelArg::Ptr { ptr, bytes }, imp::P_PTR) => {
                    self.check_ptr(kernel, i, *ptr, *bytes, p.elem_size.max(1) as usize)?;
                    true
                }
                // Signedness does not change what a GPU reads; size and kind do.
                (KernelArg::I32(_) | KernelArg::U32(_), imp::P_I32 | imp::P_U32) => true,
                (KernelArg::I64(_), imp::P_I64 | imp::P_U64) => true,
                (KernelArg::F32(_), imp::P_F32) => true,
                (KernelArg::F64(_), imp::P_F64) => true,
                _ => false,
            };
            if !ok {
                return fail(format!(
                    "argument {i}: {a:?} passed for a parameter of kind {} ({} bytes)",
                    imp::kind_name(p.kind),
                    p.size
                ));
            }
        }
        Ok(())
    }
}

/// One emulated allocation; freed when the last [`GpuBuffer`] clone drops.
struct EmuAlloc {
    ptr: u64,
    bytes: usize,
    allocs: Allocs,
}

impl Drop for EmuAlloc {
    fn drop(&mut self) {
        self.allocs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.ptr);
        imp::free(self.ptr, self.bytes);
    }
}

/// Run a checked launch: in plan mode only note it (not in the coverage records of
/// [`record_dir`]: its code did not run).
fn run_launch(
    kernel: &str,
    entry: &imp::EntryInfo,
    cfg: &LaunchCfg,
    args: &[KernelArg],
) -> Result<()> {
    LAST_KERNEL.with(|k| *k.borrow_mut() = Some(kernel.to_string()));
    if plan_mode() {
        THREAD_LAUNCHES.with(|l| l.borrow_mut().push(kernel.to_string()));
        return Ok(());
    }
    record_launch(kernel);
    imp::launch(kernel, entry, cfg, args)
}

fn check_copy(op: &'static str, len: usize, cap: usize) -> Result<()> {
    if len > cap {
        return Err(Error::invalid(
            op,
            format!("{len} bytes with a {cap}-byte buffer"),
        ));
    }
    Ok(())
}

impl GpuBackend for EmuBackend {
    fn name(&self) -> String {
        let san = match sanitizer() {
            "none" => String::new(),
            s => format!(", {s} sanitizer"),
        };
        format!(
            "emulated CUDA device (kernels as host C++, {} worker threads{san})",
            imp::workers()
        )
    }

    fn alloc(&self, bytes: usize) -> Result<GpuBuffer> {
        let ptr = imp::alloc(bytes)?;
        self.allocs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(ptr, bytes);
        let owner = EmuAlloc {
            ptr,
            bytes,
            allocs: self.allocs.clone(),
        };
        Ok(GpuBuffer::new(ptr, bytes, Arc::new(owner)))
    }

    fn copy_htod(&self, src: &[u8], dst: &GpuBuffer) -> Result<()> {
        check_copy("copy_htod", src.len(), dst.bytes())?;
        // SAFETY: dst is a live emulated allocation (host memory) of at least
        // src.len() bytes, kept alive by the borrowed GpuBuffer; launches are
        // synchronous, so no kernel is using it.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst.ptr() as *mut u8, src.len()) };
        Ok(())
    }

    fn copy_dtoh(&self, src: &GpuBuffer, dst: &mut [u8]) -> Result<()> {
        check_copy("copy_dtoh", dst.len(), src.bytes())?;
        check_plan_readback(dst.len())?;
        if plan_mode() {
            dst.fill(0);
            return Ok(());
        }
        // SAFETY: as in copy_htod, with the roles swapped.
        unsafe {
            std::ptr::copy_nonoverlapping(src.ptr() as *const u8, dst.as_mut_ptr(), dst.len())
        };
        Ok(())
    }

    fn copy_dtod(&self, src: &GpuBuffer, dst: &GpuBuffer, bytes: usize) -> Result<()> {
        check_copy("copy_dtod", bytes, src.bytes().min(dst.bytes()))?;
        if self.capture(|| Node::Dtod {
            src: src.ptr(),
            dst: dst.ptr(),
            bytes,
        }) {
            return Ok(());
        }
        if plan_mode() {
            return Ok(());
        }
        // SAFETY: both are live allocations of at least `bytes` bytes; `copy` allows
        // overlap, as cuMemcpyDtoD does not promise anything either way.
        unsafe { std::ptr::copy(src.ptr() as *const u8, dst.ptr() as *mut u8, bytes) };
        Ok(())
    }

    fn memset(&self, dst: &GpuBuffer, value: u8) -> Result<()> {
        if self.capture(|| Node::Memset {
            ptr: dst.ptr(),
            bytes: dst.bytes(),
            value,
        }) {
            return Ok(());
        }
        // SAFETY: dst is a live emulated allocation (host memory) of dst.bytes()
        // bytes; launches are synchronous, so no kernel is using it.
        unsafe { std::ptr::write_bytes(dst.ptr() as *mut u8, value, dst.bytes()) };
        Ok(())
    }

    fn alignment(&self) -> usize {
        // The guard page sits right after the (16-byte padded) end of a buffer.
        16
    }

    fn poison(&self, buf: &GpuBuffer) -> Result<()> {
        // Written at once even during a capture: the allocator hands the block out
        // now (a replay reuses the captured blocks without poisoning them again).
        // SAFETY: as in memset.
        unsafe { std::ptr::write_bytes(buf.ptr() as *mut u8, POISON, buf.bytes()) };
        Ok(())
    }

    fn launch(&self, kernel: &str, cfg: &LaunchCfg, args: &[KernelArg]) -> Result<()> {
        let entry = imp::entry(kernel)?;
        self.check_launch(kernel, cfg, args, entry.params())?;
        if self.capture(|| Node::Launch {
            kernel: kernel.to_string(),
            cfg: *cfg,
            args: args.to_vec(),
        }) {
            return Ok(());
        }
        run_launch(kernel, entry, cfg, args)
    }

    fn synchronize(&self) -> Result<()> {
        Ok(()) // launches run to completion before they return
    }

    fn begin_capture(&self) -> Result<()> {
        let mut caps = self.captures.lock().unwrap_or_else(|p| p.into_inner());
        let id = std::thread::current().id();
        if caps.contains_key(&id) {
            return Err(Error::invalid(
                "begin_capture",
                "this thread is already capturing on the emulated device",
            ));
        }
        caps.insert(id, Vec::new());
        Ok(())
    }

    fn end_capture(&self) -> Result<Box<dyn GraphExec>> {
        let nodes = self
            .captures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&std::thread::current().id())
            .ok_or_else(|| Error::invalid("end_capture", "this thread is not capturing"))?;
        Ok(Box::new(EmuGraph {
            nodes,
            device: EmuBackend {
                allocs: self.allocs.clone(),
                captures: Mutex::new(HashMap::new()),
            },
        }))
    }

    fn is_capturing(&self) -> bool {
        self.captures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(&std::thread::current().id())
    }
}

/// A graph captured on the emulated device: its nodes, replayed in capture order on
/// the same addresses (each launch checked again against the live buffers, so a
/// graph whose buffers were freed fails with a message instead of writing freed
/// memory).
struct EmuGraph {
    nodes: Vec<Node>,
    /// Shares the device's allocation table; never captures.
    device: EmuBackend,
}

impl GraphExec for EmuGraph {
    fn replay(&self) -> Result<()> {
        self.nodes.iter().try_for_each(|n| self.device.run_node(n))
    }
    fn nodes(&self) -> usize {
        self.nodes.len()
    }
}

/// The C++ side (kernels/emu/runtime.cpp and the generated trampolines).
#[cfg(kestrel_emu)]
mod imp {
    use std::collections::HashMap;
    use std::ffi::{c_char, c_int, c_uint, c_ulong, c_void, CStr, CString};
    use std::sync::OnceLock;

    use crate::device::gpu::{KernelArg, LaunchCfg};
    use crate::error::{Error, Result};

    pub const P_PTR: c_int = 1;
    pub const P_I32: c_int = 2;
    pub const P_U32: c_int = 3;
    pub const P_I64: c_int = 4;
    pub const P_U64: c_int = 5;
    pub const P_F32: c_int = 6;
    pub const P_F64: c_int = 7;

    pub fn kind_name(k: c_int) -> &'static str {
        match k {
            P_PTR => "pointer",
            P_I32 => "int",
            P_U32 => "unsigned",
            P_I64 => "long long",
            P_U64 => "unsigned long long",
            P_F32 => "float",
            P_F64 => "double",
            _ => "unsupported by value",
        }
    }

    /// `kemu::Param` of shim.h.
    #[repr(C)]
    pub struct Param {
        pub kind: c_int,
        pub size: c_int,
        pub elem_size: c_int,
    }

    /// `kemu::EntryInfo` of shim.h: one kernel's trampoline and signature.
    #[repr(C)]
    pub struct EntryInfo {
        name: *const c_char,
        call: *const c_void,
        nparams: c_int,
        params: *const Param,
    }

    impl EntryInfo {
        pub fn params(&self) -> &[Param] {
            // SAFETY: the generated table points at `nparams` (+1 sentinel) static
            // Params that live for the whole program.
            unsafe { std::slice::from_raw_parts(self.params, self.nparams as usize) }
        }
    }

    struct Table(HashMap<String, &'static EntryInfo>);
    // SAFETY: the table only holds pointers to immutable static data.
    unsafe impl Send for Table {}
    unsafe impl Sync for Table {}

    extern "C" {
        static kemu_entries: [*const EntryInfo; 0];
        static kemu_entry_count: c_ulong;
        fn kemu_alloc(bytes: usize) -> *mut c_void;
        fn kemu_free(p: *mut c_void, bytes: usize);
        #[allow(clippy::too_many_arguments)]
        fn kemu_launch(
            name: *const c_char,
            call: *const c_void,
            args: *mut *mut c_void,
            gx: c_uint,
            gy: c_uint,
            gz: c_uint,
            bx: c_uint,
            by: c_uint,
            bz: c_uint,
            shmem: c_uint,
            err: *mut c_char,
            errlen: usize,
        ) -> c_int;
        fn kemu_set_schedule(reverse: c_int);
        fn kemu_workers() -> c_uint;
        fn kemu_sanitizer() -> *const c_char;
    }

    fn table() -> &'static Table {
        static T: OnceLock<Table> = OnceLock::new();
        T.get_or_init(|| {
            let mut m = HashMap::new();
            // SAFETY: kemu_entries is a static array of kemu_entry_count pointers to
            // static EntryInfo, generated by build.rs.
            unsafe {
                let base = std::ptr::addr_of!(kemu_entries) as *const *const EntryInfo;
                for i in 0..kemu_entry_count as usize {
                    let e: &'static EntryInfo = &**base.add(i);
                    let name = CStr::from_ptr(e.name).to_string_lossy().into_owned();
                    m.insert(name, e);
                }
            }
            Table(m)
        })
    }

    pub fn entry(kernel: &str) -> Result<&'static EntryInfo> {
        table()
            .0
            .get(kernel)
            .copied()
            .ok_or_else(|| Error::UnknownKernel(kernel.to_string()))
    }

    pub fn alloc(bytes: usize) -> Result<u64> {
        // SAFETY: plain allocation; freed by `free` with the same size.
        let p = unsafe { kemu_alloc(bytes) };
        if p.is_null() {
            return Err(Error::cuda(
                format!("emulated alloc of {bytes} bytes"),
                "out of host memory",
            ));
        }
        Ok(p as u64)
    }

    pub fn free(ptr: u64, bytes: usize) {
        // SAFETY: ptr came from kemu_alloc(bytes) and is freed once (EmuAlloc::drop).
        unsafe { kemu_free(ptr as *mut c_void, bytes) }
    }

    pub fn launch(kernel: &str, e: &EntryInfo, cfg: &LaunchCfg, args: &[KernelArg]) -> Result<()> {
        // Each value in its own 8-byte slot; the trampoline reads the parameter's
        // type from the start of the slot (little-endian), as cuLaunchKernel does.
        let mut vals: Vec<u64> = args
            .iter()
            .map(|a| match *a {
                KernelArg::Ptr { ptr, .. } => ptr,
                KernelArg::I32(v) => v as u32 as u64,
                KernelArg::U32(v) => v as u64,
                KernelArg::I64(v) => v as u64,
                KernelArg::F32(v) => v.to_bits() as u64,
                KernelArg::F64(v) => v.to_bits(),
            })
            .collect();
        let mut ptrs: Vec<*mut c_void> = vals
            .iter_mut()
            .map(|v| v as *mut u64 as *mut c_void)
            .collect();
        let name = CString::new(kernel).map_err(|_| Error::UnknownKernel(kernel.into()))?;
        let mut err = vec![0 as c_char; 1024];
        // SAFETY: the arguments were checked against the kernel's signature (count,
        // kinds, live buffers); `vals` and `ptrs` outlive the synchronous launch.
        let rc = unsafe {
            kemu_launch(
                name.as_ptr(),
                e.call,
                ptrs.as_mut_ptr(),
                cfg.grid.0,
                cfg.grid.1,
                cfg.grid.2,
                cfg.block.0,
                cfg.block.1,
                cfg.block.2,
                cfg.shared_bytes,
                err.as_mut_ptr(),
                err.len(),
            )
        };
        if rc != 0 {
            // SAFETY: kemu_launch wrote a NUL-terminated message into `err`.
            let msg = unsafe { CStr::from_ptr(err.as_ptr()) }
                .to_string_lossy()
                .into_owned();
            return Err(Error::Launch {
                kernel: kernel.to_string(),
                msg,
            });
        }
        Ok(())
    }

    pub fn set_schedule(reverse: bool) {
        // SAFETY: sets an atomic.
        unsafe { kemu_set_schedule(reverse as c_int) }
    }

    pub fn workers() -> u32 {
        // SAFETY: starts the worker pool if needed and returns its size.
        unsafe { kemu_workers() }
    }

    pub fn sanitizer() -> &'static str {
        // SAFETY: returns a static string literal.
        let s = unsafe { CStr::from_ptr(kemu_sanitizer()) };
        match s.to_str() {
            Ok("address") => "address",
            Ok("thread") => "thread",
            _ => "none",
        }
    }
}

/// Stand-ins when the emulator is not built: [`device`] errors before any is used.
#[cfg(not(kestrel_emu))]
mod imp {
    use crate::device::gpu::{KernelArg, LaunchCfg};
    use crate::error::{Error, Result};

    pub const P_PTR: i32 = 1;
    pub const P_I32: i32 = 2;
    pub const P_U32: i32 = 3;
    pub const P_I64: i32 = 4;
    pub const P_U64: i32 = 5;
    pub const P_F32: i32 = 6;
    pub const P_F64: i32 = 7;

    pub struct Param {
        pub kind: i32,
        pub size: i32,
        pub elem_size: i32,
    }
    pub struct EntryInfo;
    impl EntryInfo {
        pub fn params(&self) -> &[Param] {
            &[]
        }
    }
    pub fn kind_name(_: i32) -> &'static str {
        "?"
    }
    fn missing() -> Error {
        Error::CudaUnavailable("the emulated CUDA device is not in this build".into())
    }
    pub fn entry(_: &str) -> Result<&'static EntryInfo> {
        Err(missing())
    }
    pub fn alloc(_: usize) -> Result<u64> {
        Err(missing())
    }
    pub fn free(_: u64, _: usize) {}
    pub fn launch(_: &str, _: &EntryInfo, _: &LaunchCfg, _: &[KernelArg]) -> Result<()> {
        Err(missing())
    }
    pub fn set_schedule(_: bool) {}
    pub fn workers() -> u32 {
        0
    }
    pub fn sanitizer() -> &'static str {
        "none"
    }
}

/// Kernels that [`recorded_launches`] shows launched, among `entries` (helper for
/// `kestrel kernels` and the coverage test).
pub fn covered(entries: &[&str]) -> BTreeSet<String> {
    let rec = recorded_launches();
    entries
        .iter()
        .filter(|e| rec.contains_key(**e))
        .map(|e| e.to_string())
        .collect()
}
