//! The kernel build: every declared entry is in the PTX; NVRTC compiles every file;
//! failures are clear errors; no CUDA driver is an error, not a panic.

use kestrel::device::kernels;

fn required(var: &str) -> bool {
    std::env::var(var).is_ok_and(|v| v == "1")
}

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
fn embedded_ptx_has_every_declared_entry() {
    let with_ptx: Vec<_> = kernels::files()
        .iter()
        .filter(|f| f.ptx.is_some())
        .collect();
    if with_ptx.is_empty() {
        assert!(
            !required("KESTREL_REQUIRE_NVCC"),
            "KESTREL_REQUIRE_NVCC=1 but the build embedded no PTX"
        );
        eprintln!("note: built without nvcc; PTX entries checked only where nvcc ran");
        return;
    }
    assert_eq!(
        with_ptx.len(),
        kernels::files().len(),
        "nvcc compiled only some kernel files"
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
fn nvrtc_compiles_every_kernel_file() {
    if !kernels::nvrtc_present() {
        assert!(
            !required("KESTREL_REQUIRE_NVRTC"),
            "KESTREL_REQUIRE_NVRTC=1 but libnvrtc cannot be loaded (LD_LIBRARY_PATH?)"
        );
        eprintln!("note: no libnvrtc here; NVRTC compile not checked");
        return;
    }
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

#[test]
fn nvrtc_failure_names_file_kernel_and_log() {
    let err = kernels::compile_source(
        "broken.cu",
        "extern \"C\" __global__ void k(float* x) { x[0] = undefined_name; }",
        "k",
    )
    .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("broken.cu") && msg.contains("`k`"),
        "error lacks file or kernel: {msg}"
    );
    if kernels::nvrtc_present() {
        assert!(
            msg.contains("undefined_name"),
            "NVRTC log missing from error: {msg}"
        );
    }
}

#[test]
fn unknown_kernel_is_an_error() {
    assert!(matches!(
        kernels::file_of("no_such_kernel_f32"),
        Err(kestrel::Error::UnknownKernel(_))
    ));
}

#[test]
fn cuda_without_driver_is_an_error_not_a_panic() {
    if kestrel::device::cuda::driver_present() {
        return; // on a GPU machine the CUDA tests cover this path
    }
    let t = kestrel::Tensor::from_vec(vec![1.0f32], [1]).unwrap();
    let err = t.to_device(kestrel::Device::Cuda(0)).unwrap_err();
    assert!(matches!(err, kestrel::Error::CudaUnavailable(_)), "{err}");
    assert_eq!(kestrel::Device::best(), kestrel::Device::Cpu);
}
