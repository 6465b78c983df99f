//! Every kernel entry is launched on the emulated device by some test of the suite.
//!
//! The emulator records each kernel it launches (one file per kernel under
//! `kestrel::device::emu::record_dir()`, written by whichever test binary launched
//! it). Cargo runs test binaries in name order, so this one (`zz_...`) runs after the
//! others of a `cargo test` and sees the records of that run: a record counts when it
//! is newer than this test binary.

use kestrel::device::{emu, kernels};

#[test]
fn every_kernel_entry_has_an_emulated_test() {
    assert!(
        emu::available(),
        "the emulated CUDA device is not in this build (no C++ compiler, or KESTREL_EMU=0)"
    );
    let exe = std::env::current_exe().unwrap();
    let built = std::fs::metadata(&exe)
        .and_then(|m| m.modified())
        .expect("test binary mtime");
    let records = emu::recorded_launches();
    let mut missing = Vec::new();
    let mut total = 0;
    for f in kernels::files() {
        for e in f.entries {
            total += 1;
            match records.get(*e) {
                Some((_, when)) if *when >= built => {}
                _ => missing.push(format!("{e} ({})", f.file)),
            }
        }
    }
    assert!(
        missing.is_empty(),
        "{} of {total} kernel entries were not launched on the emulated device by this test run \
         (records in {}):\n  {}\nGive each a parity test that runs it on \
         `kestrel::device::emu::device()`, and run the whole suite (`cargo test`): this check \
         runs last and reads the records the other test binaries wrote.",
        missing.len(),
        emu::record_dir().display(),
        missing.join("\n  ")
    );
}
