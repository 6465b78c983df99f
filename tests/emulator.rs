//! The emulated CUDA device (src/device/emu.rs, kernels/emu/): barrier semantics,
//! warp shuffles and votes, atomics under contention, dynamic shared memory, 3-D
//! indices, the launch-time checks a GPU makes, and planted kernel bugs that it
//! must expose. (The ops' CUDA paths are checked on it by each op's tests: tests/<op>.rs.)
//!
//! The correct self-test kernels also run on a real GPU (tests ignored with "needs a CUDA device"), which
//! checks that the expectations here are a GPU's and not the emulator's.

mod common;

use kestrel::device::emu;
use kestrel::device::gpu::{self, GpuBuffer, GpuDevice, KernelArg, LaunchCfg};
use kestrel::{ops, Device, Error, Tensor};

/// The emulated device; every test here needs it.
fn emu_dev() -> GpuDevice {
    emu::gpu_device().unwrap_or_else(|e| panic!("emulated device: {e}"))
}

fn real_dev() -> GpuDevice {
    match common::cuda() {
        Device::Cuda(n) => gpu::device(n).unwrap(),
        Device::Cpu => unreachable!("common::cuda returns a CUDA device or panics"),
    }
}

fn upload<T: bytemuck::Pod>(dev: &GpuDevice, v: &[T]) -> GpuBuffer {
    let bytes: &[u8] = bytemuck::cast_slice(v);
    let b = dev.alloc(bytes.len()).unwrap();
    dev.backend.copy_htod(bytes, &b).unwrap();
    b
}

fn download<T: bytemuck::Pod + Default + Clone>(
    dev: &GpuDevice,
    b: &GpuBuffer,
    n: usize,
) -> Vec<T> {
    let mut v = vec![T::default(); n];
    dev.backend
        .copy_dtoh(b, bytemuck::cast_slice_mut(&mut v))
        .unwrap();
    v
}

fn cfg(grid: (u32, u32, u32), block: (u32, u32, u32), shared: u32) -> LaunchCfg {
    LaunchCfg {
        grid,
        block,
        shared_bytes: shared,
    }
}

fn randf(seed: u64, n: usize) -> Vec<f32> {
    common::randn(seed, n)
        .into_iter()
        .map(|v| v as f32)
        .collect()
}

/// y = x reversed within each chunk of `block` elements.
fn reversed_in_blocks(x: &[f32], block: usize) -> Vec<f32> {
    x.chunks(block)
        .flat_map(|c| c.iter().rev().copied())
        .collect()
}

fn run_reverse(dev: &GpuDevice, kernel: &str, x: &[f32], block: u32) -> Vec<f32> {
    let n = x.len();
    let xb = upload(dev, x);
    let yb = dev.alloc(n * 4).unwrap();
    let grid = n.div_ceil(block as usize) as u32;
    dev.launch(
        kernel,
        cfg((grid, 1, 1), (block, 1, 1), 0),
        &[xb.arg(), yb.arg(), KernelArg::I64(n as i64)],
    )
    .unwrap();
    download(dev, &yb, n)
}

fn check_block_reverse_on(dev: &GpuDevice) {
    for (n, block) in [(1000usize, 256u32), (2048, 1024), (77, 32), (5, 64)] {
        let x = randf(n as u64, n);
        let y = run_reverse(dev, "emutest_block_reverse_f32", &x, block);
        assert_eq!(
            y,
            reversed_in_blocks(&x, block as usize),
            "n={n} block={block}"
        );
    }
}

#[test]
fn block_reverse_through_shared_memory_meets_at_the_barrier() {
    check_block_reverse_on(&emu_dev());
}

#[test]
fn correct_kernels_agree_under_both_thread_orders() {
    let dev = emu_dev();
    emu::set_schedule(emu::Schedule::Reverse);
    check_block_reverse_on(&dev);
    check_warp_ops_on(&dev);
    emu::set_schedule(emu::Schedule::Forward);
    check_block_reverse_on(&dev);
}

#[test]
fn planted_missing_barrier_gives_a_wrong_result() {
    let check = || {
        let dev = emu_dev();
        let n = 4096;
        let x = randf(7, n);
        let want = reversed_in_blocks(&x, 256);
        let y = run_reverse(&dev, "emutest_block_reverse_nosync_f32", &x, 256);
        let wrong = y.iter().zip(&want).filter(|(a, b)| a != b).count();
        assert!(
            wrong >= n / 4,
            "the kernel without __syncthreads gave only {wrong} of {n} wrong values: the emulator did not expose the missing barrier"
        );
    };
    if emu::sanitizer() != "thread" {
        return check();
    }
    // Under ThreadSanitizer the race report would fail this whole test binary: run
    // it in a child that does not report (the test below checks the report).
    let test = "planted_missing_barrier_gives_a_wrong_result";
    let opts = [(
        "TSAN_OPTIONS",
        "report_bugs=0:ignore_interceptors_accesses=1",
    )];
    if let Some((status, err)) = in_child(test, &opts, check) {
        assert!(status.success(), "{err}");
    }
}

/// Run this test's body in a child process (the same test binary, this test only),
/// for kernels that must kill the process; returns the child's stderr and status.
fn in_child(
    test: &str,
    env: &[(&str, &str)],
    body: impl FnOnce(),
) -> Option<(std::process::ExitStatus, String)> {
    if std::env::var("KESTREL_EMU_CHILD").as_deref() == Ok(test) {
        body();
        return None;
    }
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([test, "--exact", "--nocapture", "--test-threads=1"])
        .env("KESTREL_EMU_CHILD", test)
        // The child's launches belong to this test run (zz_emu_coverage).
        .env("KESTREL_TEST_RUN", emu::run_id())
        .envs(env.iter().copied())
        .output()
        .expect("re-running the test binary");
    Some((
        out.status,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// The line of kernels/emu_selftest.cu holding `marker`.
fn selftest_line(marker: &str) -> usize {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/kernels/emu_selftest.cu");
    let src = std::fs::read_to_string(path).unwrap();
    src.lines()
        .position(|l| l.contains(marker))
        .expect("marker in emu_selftest.cu")
        + 1
}

#[test]
fn planted_off_by_one_read_is_reported_with_the_kernel_name() {
    let child = in_child(
        "planted_off_by_one_read_is_reported_with_the_kernel_name",
        &[],
        || {
            let dev = emu_dev();
            let n = 1024; // 4096 bytes: the buffer ends exactly at a guard page
            let x = upload(&dev, &randf(3, n));
            let y = dev.alloc(n * 4).unwrap();
            let r = dev.launch(
                "emutest_offbyone_diff_f32",
                LaunchCfg::for_elems(n),
                &[x.arg(), y.arg(), KernelArg::I64(n as i64)],
            );
            panic!("the out-of-bounds read went unnoticed (launch returned {r:?})");
        },
    );
    let Some((status, err)) = child else { return };
    assert!(!status.success(), "child should have died: {err}");
    assert!(
        err.contains("emutest_offbyone_diff_f32"),
        "report lacks the kernel name:\n{err}"
    );
    match emu::sanitizer() {
        "address" => {
            let line = selftest_line("PLANTED: off-by-one read");
            assert!(
                err.contains("AddressSanitizer: heap-buffer-overflow"),
                "no ASan report:\n{err}"
            );
            assert!(
                err.contains(&format!("emu_selftest.cu:{line}")),
                "ASan report lacks kernels/emu_selftest.cu:{line}:\n{err}"
            );
        }
        "thread" => assert!(err.contains("SEGV"), "no SEGV report:\n{err}"),
        _ => assert!(
            err.contains("0 bytes past the end of a 4096-byte device buffer"),
            "report does not locate the access:\n{err}"
        ),
    }
}

#[test]
fn planted_missing_barrier_is_a_data_race_under_thread_sanitizer() {
    if emu::sanitizer() != "thread" {
        // Without TSan the wrong result is the evidence (the test above).
        let dev = emu_dev();
        let x = randf(9, 512);
        let y = run_reverse(&dev, "emutest_block_reverse_nosync_f32", &x, 256);
        assert_ne!(y, reversed_in_blocks(&x, 256));
        return;
    }
    let child = in_child(
        "planted_missing_barrier_is_a_data_race_under_thread_sanitizer",
        &[],
        || {
            let dev = emu_dev();
            let x = randf(9, 512);
            run_reverse(&dev, "emutest_block_reverse_nosync_f32", &x, 256);
        },
    );
    let Some((status, err)) = child else { return };
    assert!(
        err.contains("ThreadSanitizer: data race")
            && err.contains("emutest_block_reverse_nosync_f32"),
        "no race reported ({status}):\n{err}"
    );
}

fn check_warp_ops_on(dev: &GpuDevice) {
    let (block, grid) = (64usize, 3usize);
    let n = block * grid;
    let mut x = randf(11, n);
    for v in &mut x[32..64] {
        *v = v.abs() + 0.5; // one all-positive warp
    }
    for v in &mut x[64..96] {
        *v = -v.abs() - 0.5; // one all-negative warp
    }
    let xb = upload(dev, &x);
    let outs: Vec<GpuBuffer> = (0..4).map(|_| dev.alloc(n * 4).unwrap()).collect();
    let votes = dev.alloc(n / 32 * 3 * 4).unwrap();
    dev.launch(
        "emutest_warp_ops_f32",
        cfg((grid as u32, 1, 1), (block as u32, 1, 1), 0),
        &[
            xb.arg(),
            outs[0].arg(),
            outs[1].arg(),
            outs[2].arg(),
            outs[3].arg(),
            votes.arg(),
        ],
    )
    .unwrap();
    let (xor, down, scan, bcast): (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>) = (
        download(dev, &outs[0], n),
        download(dev, &outs[1], n),
        download(dev, &outs[2], n),
        download(dev, &outs[3], n),
    );
    let votes: Vec<u32> = download(dev, &votes, n / 32 * 3);
    for w in 0..n / 32 {
        let xs = &x[w * 32..w * 32 + 32];
        let sum: f64 = xs.iter().map(|&v| v as f64).sum();
        for l in 0..32 {
            let i = w * 32 + l;
            assert!(
                (xor[i] as f64 - sum).abs() < 1e-5,
                "xor warp {w} lane {l}: {} vs {sum}",
                xor[i]
            );
            let prefix: f64 = xs[..=l].iter().map(|&v| v as f64).sum();
            assert!(
                (scan[i] as f64 - prefix).abs() < 1e-5,
                "scan warp {w} lane {l}: {} vs {prefix}",
                scan[i]
            );
            assert_eq!(bcast[i], xs[7], "broadcast warp {w} lane {l}");
            if l == 0 {
                assert!(
                    (down[i] as f64 - sum).abs() < 1e-5,
                    "down warp {w}: {} vs {sum}",
                    down[i]
                );
            }
        }
        let ballot = xs
            .iter()
            .enumerate()
            .fold(0u32, |b, (l, &v)| if v > 0.0 { b | 1 << l } else { b });
        assert_eq!(votes[3 * w], ballot, "ballot warp {w}");
        assert_eq!(votes[3 * w + 1], (ballot != 0) as u32, "any warp {w}");
        assert_eq!(
            votes[3 * w + 2],
            (ballot == u32::MAX) as u32,
            "all warp {w}"
        );
    }
}

#[test]
fn warp_shuffles_reduce_scan_broadcast_and_vote_within_a_warp() {
    check_warp_ops_on(&emu_dev());
}

fn check_activemask_on(dev: &GpuDevice) {
    let n = 100; // warps 0..2 full, warp 3 has lanes 0..3
    let x = randf(13, n);
    let xb = upload(dev, &x);
    let masks = dev.alloc(4 * 4).unwrap();
    let sums = dev.alloc(4 * 4).unwrap();
    dev.launch(
        "emutest_activemask_f32",
        cfg((2, 1, 1), (64, 1, 1), 0),
        &[xb.arg(), masks.arg(), sums.arg(), KernelArg::I32(n as i32)],
    )
    .unwrap();
    let masks: Vec<u32> = download(dev, &masks, 4);
    let sums: Vec<f32> = download(dev, &sums, 4);
    assert_eq!(masks, vec![u32::MAX, u32::MAX, u32::MAX, 0xf]);
    for (w, s) in sums.iter().enumerate() {
        let want: f64 = x[w * 32..(w * 32 + 32).min(n)]
            .iter()
            .map(|&v| v as f64)
            .sum();
        assert!((*s as f64 - want).abs() < 1e-5, "warp {w}: {s} vs {want}");
    }
}

#[test]
fn activemask_is_the_set_of_lanes_that_converged() {
    check_activemask_on(&emu_dev());
}

fn check_atomics_on(dev: &GpuDevice) {
    let (grid, block) = (64u32, 256u32);
    let threads = (grid * block) as u64;
    let count = upload(dev, &[0u64]);
    let max_id = upload(dev, &[-1i32]);
    let fsum = upload(dev, &[0f32]);
    let cas = upload(dev, &[0i32]);
    let bits = upload(dev, &[0u32]);
    let min_id = upload(dev, &[i32::MAX]);
    dev.launch(
        "emutest_atomics",
        cfg((grid, 1, 1), (block, 1, 1), 0),
        &[
            count.arg(),
            max_id.arg(),
            fsum.arg(),
            cas.arg(),
            bits.arg(),
            min_id.arg(),
        ],
    )
    .unwrap();
    assert_eq!(
        download::<u64>(dev, &count, 1)[0],
        threads,
        "atomicAdd count"
    );
    assert_eq!(
        download::<i32>(dev, &max_id, 1)[0],
        threads as i32 - 1,
        "atomicMax"
    );
    assert_eq!(download::<i32>(dev, &min_id, 1)[0], 0, "atomicMin");
    assert_eq!(
        download::<f32>(dev, &fsum, 1)[0],
        threads as f32,
        "float atomicAdd"
    );
    assert_eq!(
        download::<i32>(dev, &cas, 1)[0],
        threads as i32,
        "atomicCAS loop"
    );
    assert_eq!(download::<u32>(dev, &bits, 1)[0], u32::MAX, "atomicOr");
}

#[test]
fn atomics_are_exact_under_contention_from_many_blocks() {
    check_atomics_on(&emu_dev());
}

fn check_dynamic_shared_on(dev: &GpuDevice) {
    let (grid, block) = (3usize, 128u32);
    for m in [1usize, 100, 1024, 12 * 1024] {
        let y = dev.alloc(grid * 4).unwrap();
        let c = dev.alloc(grid * 4).unwrap();
        dev.launch(
            "emutest_dynamic_shared_f32",
            cfg((grid as u32, 1, 1), (block, 1, 1), (m * 4) as u32),
            &[y.arg(), c.arg(), KernelArg::I32(m as i32)],
        )
        .unwrap();
        let y: Vec<f32> = download(dev, &y, grid);
        let c: Vec<i32> = download(dev, &c, grid);
        for b in 0..grid {
            let want = (0..m).fold(0f32, |acc, k| acc + (k + b) as f32);
            assert_eq!(y[b], want, "m={m} block {b}");
            assert_eq!(
                c[b],
                block as i32 / 2,
                "__syncthreads_count m={m} block {b}"
            );
        }
    }
}

#[test]
fn dynamic_shared_memory_of_several_sizes() {
    check_dynamic_shared_on(&emu_dev());
}

fn check_index3d_on(dev: &GpuDevice) {
    let (grid, block) = ((3u32, 2u32, 2u32), (4u32, 3u32, 2u32));
    let tpb = (block.0 * block.1 * block.2) as usize;
    let n = tpb * (grid.0 * grid.1 * grid.2) as usize;
    let out = dev.alloc(n * 4).unwrap();
    dev.launch("emutest_index3d", cfg(grid, block, 0), &[out.arg()])
        .unwrap();
    let got: Vec<u32> = download(dev, &out, n);
    let mut want = Vec::with_capacity(n);
    for bz in 0..grid.2 {
        for by in 0..grid.1 {
            for bx in 0..grid.0 {
                for tz in 0..block.2 {
                    for ty in 0..block.1 {
                        for tx in 0..block.0 {
                            want.push(tx | ty << 4 | tz << 8 | bx << 12 | by << 16 | bz << 20);
                        }
                    }
                }
            }
        }
    }
    assert_eq!(got, want);
}

#[test]
fn thread_and_block_indices_in_three_dimensions() {
    check_index3d_on(&emu_dev());
}

fn launch_err(dev: &GpuDevice, kernel: &str, c: LaunchCfg, args: &[KernelArg]) -> String {
    match dev.launch(kernel, c, args) {
        Err(e @ Error::Launch { .. }) => e.to_string(),
        other => panic!("{kernel}: expected a launch error, got {other:?}"),
    }
}

#[test]
fn launch_errors_that_a_gpu_would_report() {
    let dev = emu_dev();
    let x = upload(&dev, &[1f32; 64]);
    let y = dev.alloc(64 * 4).unwrap();
    let n = KernelArg::I64(64);
    let one = cfg((1, 1, 1), (64, 1, 1), 0);

    let e = launch_err(
        &dev,
        "relu_fwd_f32",
        cfg((1, 1, 1), (1025, 1, 1), 0),
        &[x.arg(), y.arg(), n],
    );
    assert!(
        e.contains("1025 threads") && e.contains("relu_fwd_f32"),
        "{e}"
    );

    let e = launch_err(
        &dev,
        "relu_fwd_f32",
        one,
        &[KernelArg::Ptr { ptr: 0, bytes: 256 }, y.arg(), n],
    );
    assert!(e.contains("argument 0") && e.contains("null"), "{e}");

    let tiny = KernelArg::Ptr {
        ptr: x.ptr(),
        bytes: 2,
    };
    let e = launch_err(&dev, "relu_fwd_f32", one, &[tiny, y.arg(), n]);
    assert!(e.contains("smaller than one 4-byte element"), "{e}");

    let past = KernelArg::Ptr {
        ptr: x.ptr() + 8,
        bytes: 256,
    };
    let e = launch_err(&dev, "relu_fwd_f32", one, &[past, y.arg(), n]);
    assert!(e.contains("run past the end of the 256-byte buffer"), "{e}");

    let host = [0f32; 4];
    let foreign = KernelArg::Ptr {
        ptr: host.as_ptr() as u64,
        bytes: 16,
    };
    let e = launch_err(&dev, "relu_fwd_f32", one, &[x.arg(), foreign, n]);
    assert!(
        e.contains("argument 1") && e.contains("not a live buffer"),
        "{e}"
    );

    let e = launch_err(&dev, "relu_fwd_f32", one, &[x.arg(), y.arg()]);
    assert!(e.contains("2 arguments passed, the kernel takes 3"), "{e}");

    let e = launch_err(
        &dev,
        "relu_fwd_f32",
        one,
        &[x.arg(), y.arg(), KernelArg::F32(64.0)],
    );
    assert!(e.contains("argument 2") && e.contains("long long"), "{e}");

    let e = launch_err(&dev, "relu_fwd_f32", one, &[x.arg(), KernelArg::I64(0), n]);
    assert!(e.contains("argument 1") && e.contains("pointer"), "{e}");

    let c = dev.alloc(4).unwrap();
    let too_much = cfg((1, 1, 1), (32, 1, 1), emu::DYNAMIC_SHARED_LIMIT + 4);
    let e = launch_err(
        &dev,
        "emutest_dynamic_shared_f32",
        too_much,
        &[y.arg(), c.arg(), KernelArg::I32(1)],
    );
    assert!(e.contains("dynamic shared memory"), "{e}");

    assert!(matches!(
        dev.launch("no_such_kernel_f32", one, &[]),
        Err(Error::UnknownKernel(_))
    ));
}

#[test]
fn divergent_barriers_are_reported_and_the_device_keeps_working() {
    let dev = emu_dev();
    let y = dev.alloc(64 * 4).unwrap();
    let c = cfg((2, 1, 1), (64, 1, 1), 0);
    let e = launch_err(
        &dev,
        "emutest_divergent_barrier",
        c,
        &[y.arg(), KernelArg::I32(0)],
    );
    assert!(e.contains("already exited"), "{e}");
    let e = launch_err(
        &dev,
        "emutest_divergent_barrier",
        c,
        &[y.arg(), KernelArg::I32(1)],
    );
    assert!(e.contains("barrier deadlock"), "{e}");
    check_block_reverse_on(&dev);
}

#[test]
fn every_kernel_entry_has_an_emulated_trampoline() {
    let dev = emu_dev();
    for f in kestrel::device::kernels::files() {
        for e in f.entries {
            // Launching with no arguments reaches the signature check, which needs
            // the entry: an unknown kernel fails earlier, with UnknownKernel.
            match dev.launch(e, LaunchCfg::linear(1, 32), &[]) {
                Err(Error::Launch { msg, .. }) if msg.contains("arguments passed") => {}
                Ok(()) => {} // a kernel without parameters ran
                other => panic!("{}: {e}: {other:?}", f.file),
            }
        }
    }
}

#[test]
fn device_parses_and_prints_as_emu() {
    let d = Device::parse("emu").unwrap();
    assert_eq!(d, emu::device().unwrap());
    assert_eq!(d.to_string(), "emu");
    let name = emu_dev().backend.name();
    assert!(name.contains("emulated"), "{name}");
}

#[test]
#[ignore = "needs a CUDA device"]
fn selftest_kernels_behave_the_same_on_a_real_gpu() {
    let dev = real_dev();
    check_block_reverse_on(&dev);
    check_warp_ops_on(&dev);
    check_activemask_on(&dev);
    check_atomics_on(&dev);
    check_dynamic_shared_on(&dev);
    check_index3d_on(&dev);
}

#[test]
fn emulated_and_cpu_devices_coexist_with_real_ordinals() {
    // The emulator takes a reserved ordinal; asking for cuda:0 still means a real GPU
    // (an error here, without one), and the emulated device stays usable.
    let d = emu::device().unwrap();
    assert_eq!(d, Device::Cuda(emu::EMU_ORDINAL));
    if !kestrel::device::cuda::driver_present() {
        assert!(gpu::device(0).is_err());
    }
    let x = Tensor::from_vec(vec![-1f32, 3.0], [2]).unwrap();
    assert_eq!(
        ops::relu(&x.to_device(d).unwrap())
            .unwrap()
            .to_vec::<f32>()
            .unwrap(),
        vec![0.0, 3.0]
    );
}
