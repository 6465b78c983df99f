//! Every kernel entry is launched on the emulated device, in this `cargo test` run, by
//! a test target that `kestrel kernel-check` maps its file to.
//!
//! The emulator records each kernel's first launch per process under
//! `kestrel::device::emu::record_dir()`, with the program and the run id
//! (`emu::run_id()`: the parent process, i.e. the `cargo test` invocation that started
//! the test binaries, or `KESTREL_TEST_RUN`). Only records of this process's run count:
//! records of earlier runs never do, whatever their file times. Cargo runs the test
//! targets of one invocation in name order, so this one (`zz_...`) runs after the
//! others; should it run alone, or first, it finds no records of its run and fails
//! with that reason rather than passing.

use std::collections::{BTreeMap, BTreeSet};

use kestrel::device::{emu, kernels};

/// `nms-1a2b3c4d5e6f7a8b` -> `nms`: test binaries carry a hash suffix.
fn target_of(program: &str) -> &str {
    match program.rsplit_once('-') {
        Some((stem, hash)) if hash.len() == 16 && hash.chars().all(|c| c.is_ascii_hexdigit()) => {
            stem
        }
        _ => program,
    }
}

#[test]
fn every_kernel_entry_is_launched_by_its_mapped_tests_in_this_run() {
    assert!(
        emu::available(),
        "the emulated CUDA device is not in this build (no C++ compiler, or KESTREL_EMU=0)"
    );
    let run = emu::run_id();
    // kernel -> test targets that launched it in this run.
    let mut by: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for r in emu::launch_records().into_iter().filter(|r| r.run == run) {
        by.entry(r.kernel)
            .or_default()
            .insert(target_of(&r.program).to_string());
    }
    assert!(
        !by.is_empty(),
        "no emulated launch recorded by run {run} in {}: run the whole suite (`cargo test`); \
         this check reads the records the other test binaries of the same run wrote",
        emu::record_dir().display()
    );
    let mut missing = Vec::new();
    let mut total = 0;
    for f in kernels::files() {
        let (_, tests) = kernels::tests_for(f.file).unwrap_or_else(|e| panic!("{e}"));
        let mapped: BTreeSet<&str> = tests.tests.iter().map(|t| t.target).collect();
        for e in f.entries {
            total += 1;
            let launched_by = by.get(*e).cloned().unwrap_or_default();
            if !launched_by.iter().any(|t| mapped.contains(t.as_str())) {
                missing.push(format!(
                    "{e} ({}): mapped to {mapped:?}, launched in this run by {launched_by:?}",
                    f.file
                ));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "{} of {total} kernel entries were not launched on the emulated device by their \
         kernel-check test targets in run {run}:\n  {}\nGive each a test in its target that \
         runs it on the emulated device (`device_tests!`), or fix \
         kestrel::device::kernels::KERNEL_TESTS.",
        missing.len(),
        missing.join("\n  ")
    );
}
