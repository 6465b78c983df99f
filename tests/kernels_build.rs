//! The kernel build: every declared entry is in the PTX; NVRTC compiles every file;
//! failures are clear errors; no CUDA driver is an error, not a panic.
//!
//! What a build cannot check is not passed silently: build.rs sets `cfg(kestrel_ptx)`
//! when nvcc compiled the kernels and `cfg(kestrel_nvrtc)` when it found a libnvrtc,
//! and without them the PTX and NVRTC tests are *ignored* with the reason (so the
//! summary shows them as not run); `--include-ignored` runs them and they fail.

use kestrel::device::kernels;

/// Names of `.entry` directives in PTX text.
fn ptx_entries(ptx: &str) -> Vec<String> {
    ptx.lines()
        .filter_map(|l| l.split(".entry").nth(1))
        .map(|rest| rest.trim().trim_end_matches('(').trim().to_string())
        .collect()
}

#[test]
fn every_kernel_file_declares_entries() {
    assert!(!kernels::files().is_empty(), "no kernels/*.cu embedded");
    for f in kernels::files() {
        assert!(
            !f.entries.is_empty(),
            "{} declares no extern \"C\" __global__ entry",
            f.file
        );
        for e in f.entries {
            assert!(
                f.source.contains(e),
                "{}: entry {e} not in embedded source",
                f.file
            );
        }
    }
}

#[test]
#[cfg_attr(
    not(kestrel_ptx),
    ignore = "built without nvcc: no PTX embedded (set KESTREL_NVCC, CUDA_HOME or PATH)"
)]
fn embedded_ptx_has_every_declared_entry() {
    let with_ptx: Vec<_> = kernels::files()
        .iter()
        .filter(|f| f.ptx.is_some())
        .collect();
    assert_eq!(
        with_ptx.len(),
        kernels::files().len(),
        "nvcc compiled {} of {} kernel files (none: this build has no nvcc)",
        with_ptx.len(),
        kernels::files().len()
    );
    for f in with_ptx {
        let entries = ptx_entries(f.ptx.unwrap());
        for e in f.entries {
            assert!(
                entries.iter().any(|x| x == e),
                "{}: PTX lacks entry {e} (has {entries:?})",
                f.file
            );
        }
        assert!(
            f.ptx.unwrap().contains(".target sm_80"),
            "{}: PTX not for compute_80",
            f.file
        );
    }
}

#[test]
#[cfg_attr(
    not(kestrel_nvrtc),
    ignore = "no libnvrtc found at build time (put the CUDA 13.0 NVRTC library on LD_LIBRARY_PATH)"
)]
fn nvrtc_compiles_every_kernel_file() {
    assert!(
        kernels::nvrtc_present(),
        "libnvrtc cannot be loaded (LD_LIBRARY_PATH?)"
    );
    for f in kernels::files() {
        let ptx = kernels::compile_source(f.file, f.source, f.entries[0])
            .unwrap_or_else(|e| panic!("{e}"));
        let entries = ptx_entries(&ptx);
        for e in f.entries {
            assert!(
                entries.iter().any(|x| x == e),
                "{}: NVRTC PTX lacks entry {e}",
                f.file
            );
        }
    }
}

fn broken_kernel_error() -> String {
    kernels::compile_source(
        "broken.cu",
        "extern \"C\" __global__ void k(float* x) { x[0] = undefined_name; }",
        "k",
    )
    .unwrap_err()
    .to_string()
}

/// With or without NVRTC, a kernel that cannot be compiled is an error naming the file
/// and the kernel.
#[test]
fn nvrtc_failure_names_file_and_kernel() {
    let msg = broken_kernel_error();
    assert!(
        msg.contains("broken.cu") && msg.contains("`k`"),
        "error lacks file or kernel: {msg}"
    );
}

#[test]
#[cfg_attr(
    not(kestrel_nvrtc),
    ignore = "no libnvrtc found at build time (put the CUDA 13.0 NVRTC library on LD_LIBRARY_PATH)"
)]
fn nvrtc_failure_carries_the_compiler_log() {
    assert!(kernels::nvrtc_present(), "libnvrtc cannot be loaded");
    let msg = broken_kernel_error();
    assert!(
        msg.contains("undefined_name"),
        "NVRTC log missing from error: {msg}"
    );
}

#[test]
fn unknown_kernel_is_an_error() {
    assert!(matches!(
        kernels::file_of("no_such_kernel_f32"),
        Err(kestrel::Error::UnknownKernel(_))
    ));
}

/// Asking for cuda:0 either works (a driver and a GPU) or is a `CudaUnavailable`
/// error; without a driver library it is always the error, and `Device::best()` is
/// the CPU. Never a panic.
#[test]
fn cuda_without_driver_is_an_error_not_a_panic() {
    let t = kestrel::Tensor::from_vec(vec![1.0f32], [1]).unwrap();
    match t.to_device(kestrel::Device::Cuda(0)) {
        Ok(g) => {
            assert!(kestrel::device::cuda::driver_present());
            assert_eq!(g.to_vec::<f32>().unwrap(), [1.0]);
        }
        Err(err) => {
            assert!(matches!(err, kestrel::Error::CudaUnavailable(_)), "{err}");
            if !kestrel::device::cuda::driver_present() {
                assert_eq!(kestrel::Device::best(), kestrel::Device::Cpu);
            }
        }
    }
}
