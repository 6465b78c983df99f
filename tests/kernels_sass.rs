//! The sm_90 SASS of the tensor-core conv/GEMM kernels (scripts/sass_report.py): no
//! spills, and HMMA inside the main loop. Needs nvcc (KESTREL_NVCC) and cuobjdump
//! beside it; CI (KESTREL_REQUIRE_NVCC=1) installs both, so there a missing tool is a
//! failure, not a skip.

use std::process::Command;

fn tools_present() -> bool {
    let Ok(nvcc) = std::env::var("KESTREL_NVCC") else {
        return false;
    };
    let nvcc = std::path::PathBuf::from(nvcc);
    let present = nvcc.is_file() && nvcc.with_file_name("cuobjdump").is_file();
    if !present {
        assert!(
            !std::env::var("KESTREL_REQUIRE_NVCC").is_ok_and(|v| v == "1"),
            "KESTREL_REQUIRE_NVCC=1 but nvcc or cuobjdump is missing beside {}",
            nvcc.display()
        );
    }
    present
}

fn report(args: &[&str]) -> (bool, String) {
    let out = Command::new("python3")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/scripts/sass_report.py"
        ))
        .args(args)
        .output()
        .expect("python3 runs");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn tensor_core_kernels_have_hmma_in_the_main_loop_and_no_spills() {
    if !tools_present() {
        eprintln!("note: no nvcc/cuobjdump (KESTREL_NVCC): SASS not checked");
        return;
    }
    let (ok, text) = report(&["--check", "tc_conv"]);
    assert!(ok, "{text}");
    for k in [
        "tc_conv_fwd_bf16",
        "tc_conv_dgrad_bf16",
        "tc_conv_wgrad_bf16",
    ] {
        let line = text
            .lines()
            .find(|l| l.split_whitespace().nth(1) == Some(k))
            .unwrap_or_else(|| panic!("{k} missing from the report:\n{text}"));
        let cols: Vec<&str> = line.split_whitespace().collect();
        // file kernel regs spill smem block occ blk HMMA in-loop LDSM LDGSTS FFMA
        assert_eq!(cols[3], "0", "{k} spills: {line}");
        assert!(cols[9].parse::<u32>().unwrap() > 0, "{k}: {line}");
        assert!(
            cols[10].parse::<u32>().unwrap() > 0,
            "{k} has no LDSM: {line}"
        );
        assert!(
            cols[11].parse::<u32>().unwrap() > 0,
            "{k} has no LDGSTS: {line}"
        );
    }
}

#[test]
fn the_check_fails_on_a_kernel_without_tensor_cores() {
    if !tools_present() {
        eprintln!("note: no nvcc/cuobjdump (KESTREL_NVCC): SASS not checked");
        return;
    }
    // The f32 SIMT GEMM has FFMA only: held to the tensor-core rule, it must fail.
    let (ok, text) = report(&["--check", "--check-prefix=matmul_nn_f32", "matmul"]);
    assert!(!ok, "the check passed an FFMA-only kernel:\n{text}");
    assert!(text.contains("matmul_nn_f32: no HMMA in a loop"), "{text}");
}
