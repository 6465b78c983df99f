//! The emulator's model of the tensor-core instructions (kernels/emu/tensorcore.inc),
//! checked against the PTX ISA's own tables, transcribed here from the ISA text (PTX
//! ISA 9.x, "Matrix Fragments for mma.m16n8k16 with floating point type" and
//! "ldmatrix"), not from the emulator's code. Probe kernels (kernels/tc_probe.cu) move
//! raw registers between memory and one instruction.
//!
//! Each check is a function returning the first mismatch, so a planted bug (a
//! transposed fragment, a wrong ldmatrix table) can be shown to fail.
//!
//! `cargo test --test mma_isa`

mod common;

use half::bf16;
use kestrel::device::gpu::{self, GpuBuffer, GpuDevice, KernelArg, LaunchCfg};
use kestrel::Device;

fn dev() -> GpuDevice {
    let Device::Cuda(n) = common::emulated() else {
        unreachable!("emulated() is a CUDA ordinal")
    };
    gpu::device(n).expect("emulated device")
}

fn upload<T: bytemuck::Pod>(d: &GpuDevice, v: &[T]) -> GpuBuffer {
    let bytes: &[u8] = bytemuck::cast_slice(v);
    let b = d.alloc(bytes.len().max(4)).unwrap();
    d.backend.copy_htod(bytes, &b).unwrap();
    b
}

fn download<T: bytemuck::Pod + Default>(d: &GpuDevice, b: &GpuBuffer, n: usize) -> Vec<T> {
    let mut v = vec![T::default(); n];
    d.backend
        .copy_dtoh(b, bytemuck::cast_slice_mut(&mut v))
        .unwrap();
    v
}

fn one_warp() -> LaunchCfg {
    LaunchCfg {
        grid: (1, 1, 1),
        block: (32, 1, 1),
        shared_bytes: 0,
    }
}

// ---------------------------------------------------------------------------------
// The ISA's tables for mma.m16n8k16 with .bf16 inputs and .f32 accumulators.
// groupID = laneid >> 2, threadID_in_group = laneid % 4. Fragment element i (0-based)
// sits in register i / 2, in its low half for even i.
// ---------------------------------------------------------------------------------

/// (row, col) of A element `i` (0..8) held by `lane`. ISA: row = groupID for a0, a1,
/// a4, a5 and groupID + 8 for a2, a3, a6, a7; col = threadID_in_group * 2 + (i & 1)
/// for i < 4 and threadID_in_group * 2 + 8 + (i & 1) for i >= 4.
fn isa_a(lane: usize, i: usize) -> (usize, usize) {
    let (group, tig) = (lane >> 2, lane % 4);
    let row = if matches!(i, 0 | 1 | 4 | 5) {
        group
    } else {
        group + 8
    };
    let col = if i < 4 {
        tig * 2 + (i & 1)
    } else {
        tig * 2 + 8 + (i & 1)
    };
    (row, col)
}

/// (row k, col n) of B element `i` (0..4). ISA: row = threadID_in_group * 2 + (i & 1)
/// for i < 2, threadID_in_group * 2 + 8 + (i & 1) for i >= 2; col = groupID.
fn isa_b(lane: usize, i: usize) -> (usize, usize) {
    let (group, tig) = (lane >> 2, lane % 4);
    let row = if i < 2 {
        tig * 2 + (i & 1)
    } else {
        tig * 2 + 8 + (i & 1)
    };
    (row, group)
}

/// (row, col) of C/D element `i` (0..4). ISA: row = groupID for c0, c1 and groupID + 8
/// for c2, c3; col = threadID_in_group * 2 + (i & 1).
fn isa_c(lane: usize, i: usize) -> (usize, usize) {
    let (group, tig) = (lane >> 2, lane % 4);
    let row = if i < 2 { group } else { group + 8 };
    (row, tig * 2 + (i & 1))
}

type Layout = fn(usize, usize) -> (usize, usize);

/// A planted bug: the A fragment read as its transpose.
fn transposed_a(lane: usize, i: usize) -> (usize, usize) {
    let (r, c) = isa_a(lane, i);
    (c, r)
}

fn pack(lo: bf16, hi: bf16) -> u32 {
    lo.to_bits() as u32 | ((hi.to_bits() as u32) << 16)
}

/// Runs the mma probe with fragments built by `a_layout` (the B and C/D layouts are
/// the ISA's) and compares D with A @ B + C computed here in f64. Err: the first
/// element off by more than the f32 rounding of the sum allows.
fn check_mma(d: &GpuDevice, seed: u64, a_layout: Layout) -> Result<(), String> {
    let r = common::randn(seed, 16 * 16 + 16 * 8 + 16 * 8);
    let a: Vec<bf16> = r[..256].iter().map(|&v| bf16::from_f64(v * 4.0)).collect();
    let b: Vec<bf16> = r[256..384].iter().map(|&v| bf16::from_f64(v)).collect();
    let c: Vec<f32> = r[384..].iter().map(|&v| v as f32).collect();
    let (mut ra, mut rb, mut rc) = (vec![0u32; 128], vec![0u32; 64], vec![0f32; 128]);
    for lane in 0..32 {
        for reg in 0..4 {
            let e = |i| {
                let (row, col) = a_layout(lane, i);
                a[row * 16 + col]
            };
            ra[lane * 4 + reg] = pack(e(2 * reg), e(2 * reg + 1));
        }
        for reg in 0..2 {
            let e = |i| {
                let (k, n) = isa_b(lane, i);
                b[k * 8 + n]
            };
            rb[lane * 2 + reg] = pack(e(2 * reg), e(2 * reg + 1));
        }
        for i in 0..4 {
            let (row, col) = isa_c(lane, i);
            rc[lane * 4 + i] = c[row * 8 + col];
        }
    }
    let (ba, bb, bc) = (upload(d, &ra), upload(d, &rb), upload(d, &rc));
    let bd = d.alloc(128 * 4).unwrap();
    d.launch(
        "tc_probe_mma",
        one_warp(),
        &[ba.arg(), bb.arg(), bc.arg(), bd.arg()],
    )
    .map_err(|e| e.to_string())?;
    let got: Vec<f32> = download(d, &bd, 128);
    for lane in 0..32 {
        for i in 0..4 {
            let (row, col) = isa_c(lane, i);
            let mut want = c[row * 8 + col] as f64;
            let mut mag = want.abs();
            for k in 0..16 {
                let p = a[row * 16 + k].to_f64() * b[k * 8 + col].to_f64();
                want += p;
                mag += p.abs();
            }
            let g = got[lane * 4 + i] as f64;
            // Products of bf16 are exact in f32; a hardware sum of 17 terms in f32 may
            // round at every step: 17 * 2^-24 of the magnitude bounds it.
            if (g - want).abs() > 17.0 * mag * 2f64.powi(-24) {
                return Err(format!(
                    "D({row},{col}) in lane {lane} reg {i}: got {g}, want {want}"
                ));
            }
        }
    }
    Ok(())
}

#[test]
fn mma_m16n8k16_matches_the_isa_fragment_tables_emulated() {
    let d = dev();
    for seed in 0..4 {
        check_mma(&d, seed, isa_a).unwrap();
    }
}

/// On a GPU the same check tests the transcription itself against the hardware.
#[test]
#[ignore = "needs a CUDA device"]
fn mma_m16n8k16_matches_the_isa_fragment_tables_cuda() {
    let Device::Cuda(n) = common::cuda() else {
        unreachable!()
    };
    let d = gpu::device(n).unwrap();
    for seed in 0..4 {
        check_mma(&d, seed, isa_a).unwrap();
    }
    assert!(check_mma(&d, 7, transposed_a).is_err());
}

#[test]
fn mma_with_a_transposed_a_fragment_fails() {
    let d = dev();
    let e = check_mma(&d, 7, transposed_a).unwrap_err();
    assert!(e.contains("got"), "{e}");
}

#[test]
fn mma_accumulates_exact_bf16_products_in_f32() {
    // x = 1 + 2^-7 (a bf16): x * x = 1 + 2^-6 + 2^-14 is exact in f32 but not in bf16,
    // so an accumulator that rounded products to bf16 would give 1 + 2^-6.
    let d = dev();
    let x = bf16::from_f64(1.0 + 2f64.powi(-7)); // representable: 7 fraction bits
    let one = 1.0 + 2f64.powi(-7);
    let (mut ra, mut rb) = (vec![0u32; 128], vec![0u32; 64]);
    // A = x at (g, 0) for every row; B = x at (0, n) for every column; rest 0.
    for lane in 0..32 {
        for reg in 0..4 {
            let e = |i| {
                let (_, col) = isa_a(lane, i);
                if col == 0 {
                    x
                } else {
                    bf16::ZERO
                }
            };
            ra[lane * 4 + reg] = pack(e(2 * reg), e(2 * reg + 1));
        }
        for reg in 0..2 {
            let e = |i| {
                let (k, _) = isa_b(lane, i);
                if k == 0 {
                    x
                } else {
                    bf16::ZERO
                }
            };
            rb[lane * 2 + reg] = pack(e(2 * reg), e(2 * reg + 1));
        }
    }
    let (ba, bb, bc) = (upload(&d, &ra), upload(&d, &rb), upload(&d, &[0f32; 128]));
    let bd = d.alloc(512).unwrap();
    d.launch(
        "tc_probe_mma",
        one_warp(),
        &[ba.arg(), bb.arg(), bc.arg(), bd.arg()],
    )
    .unwrap();
    let got: Vec<f32> = download(&d, &bd, 128);
    let want = (one * one) as f32;
    assert_eq!(want as f64, one * one, "the product is exact in f32");
    assert!(got.iter().all(|&g| g == want), "{:?} vs {want}", &got[..4]);
}

// ---------------------------------------------------------------------------------
// ldmatrix. ISA: for .x1 threads 0-7 supply the row addresses of the matrix, for .x2
// threads 0-15 (rows of matrix 0, then matrix 1), for .x4 all 32 (matrix j's rows from
// threads 8j..8j+7). Each row is 8 16-bit elements. Thread i receives in register j
// the elements of matrix j at row i / 4, columns 2 (i % 4) and 2 (i % 4) + 1; with
// .trans the matrix is delivered transposed: row 2 (i % 4) and 2 (i % 4) + 1, column
// i / 4.
// ---------------------------------------------------------------------------------

/// The two (matrix row, column) pairs lane `i` receives in each register.
fn isa_ldmatrix(i: usize, trans: bool) -> [(usize, usize); 2] {
    if trans {
        [(2 * (i % 4), i / 4), (2 * (i % 4) + 1, i / 4)]
    } else {
        [(i / 4, 2 * (i % 4)), (i / 4, 2 * (i % 4) + 1)]
    }
}

fn check_ldmatrix(
    d: &GpuDevice,
    count: usize,
    trans: bool,
    table: fn(usize, bool) -> [(usize, usize); 2],
) -> Result<(), String> {
    // 32 shared rows with distinct element values; lanes point at them in a shuffled
    // order so that row addresses, not lane numbers, decide what is loaded.
    let src: Vec<u16> = (0..256u16).map(|v| v * 3 + 1).collect();
    let rows: Vec<i32> = (0..32).map(|l| (l * 13 + 5) % 32).collect();
    let (bs, br) = (upload(d, &src), upload(d, &rows));
    let bo = d.alloc(32 * 16).unwrap();
    d.launch(
        "tc_probe_ldmatrix",
        one_warp(),
        &[
            bs.arg(),
            br.arg(),
            bo.arg(),
            KernelArg::I32(count as i32),
            KernelArg::I32(trans as i32),
        ],
    )
    .map_err(|e| e.to_string())?;
    let got: Vec<u32> = download(d, &bo, 128);
    for lane in 0..32 {
        for j in 0..4 {
            let want = if j < count {
                let [(r0, c0), (r1, c1)] = table(lane, trans);
                let at = |r: usize, c: usize| src[rows[8 * j + r] as usize * 8 + c] as u32;
                at(r0, c0) | (at(r1, c1) << 16)
            } else {
                0
            };
            if got[lane * 4 + j] != want {
                return Err(format!(
                    "x{count}{} lane {lane} reg {j}: got {:#010x}, want {want:#010x}",
                    if trans { ".trans" } else { "" },
                    got[lane * 4 + j]
                ));
            }
        }
    }
    Ok(())
}

#[test]
fn ldmatrix_x1_x2_x4_and_trans_match_the_isa_emulated() {
    let d = dev();
    for count in [1, 2, 4] {
        for trans in [false, true] {
            check_ldmatrix(&d, count, trans, isa_ldmatrix).unwrap();
        }
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn ldmatrix_x1_x2_x4_and_trans_match_the_isa_cuda() {
    let Device::Cuda(n) = common::cuda() else {
        unreachable!()
    };
    let d = gpu::device(n).unwrap();
    for count in [1, 2, 4] {
        for trans in [false, true] {
            check_ldmatrix(&d, count, trans, isa_ldmatrix).unwrap();
        }
    }
}

#[test]
fn ldmatrix_with_the_trans_table_swapped_fails() {
    let d = dev();
    let swapped = |i: usize, trans: bool| isa_ldmatrix(i, !trans);
    assert!(check_ldmatrix(&d, 4, false, swapped).is_err());
    assert!(check_ldmatrix(&d, 2, true, swapped).is_err());
}

// ---------------------------------------------------------------------------------
// cp.async: zero-fill past src-size, and garbage until the group is waited for.
// ---------------------------------------------------------------------------------

fn run_cp_async(d: &GpuDevice, src_bytes: i32, wait_n: i32) -> (Vec<u16>, Vec<u16>) {
    let src: Vec<u16> = (0..256u16).map(|v| v + 100).collect();
    let bs = upload(d, &src);
    let bo = d.alloc(64 * 16).unwrap();
    d.launch(
        "tc_probe_cp_async",
        one_warp(),
        &[
            bs.arg(),
            bo.arg(),
            KernelArg::I32(src_bytes),
            KernelArg::I32(wait_n),
        ],
    )
    .unwrap();
    (src, download(d, &bo, 512))
}

#[test]
fn cp_async_copies_after_wait_and_zero_fills_past_src_size() {
    let d = dev();
    for src_bytes in [16, 8, 0] {
        let (src, out) = run_cp_async(&d, src_bytes, 0);
        for l in 0..32 {
            for i in 0..8 {
                let keep = (2 * i as i32) < src_bytes;
                let w0 = if keep { src[l * 8 + i] } else { 0 };
                let w1 = if keep { src[((l + 1) % 32) * 8 + i] } else { 0 };
                assert_eq!(
                    out[l * 8 + i],
                    w0,
                    "group 0 lane {l} elem {i} src_bytes {src_bytes}"
                );
                assert_eq!(out[(32 + l) * 8 + i], w1, "group 1 lane {l} elem {i}");
            }
        }
    }
}

#[test]
fn cp_async_destination_is_garbage_until_its_group_is_waited_for() {
    let d = dev();
    // wait_group 1: the older group has landed, the newer one has not.
    let (src, out) = run_cp_async(&d, 16, 1);
    assert_eq!(&out[..256], &src[..], "group 0 after wait_group 1");
    assert!(
        out[256..].iter().all(|&v| v == 0xffff),
        "group 1 must still be poison"
    );
    // No wait at all: everything is poison (a kernel reading it computes NaN).
    let (_, out) = run_cp_async(&d, 16, 2);
    assert!(out.iter().all(|&v| v == 0xffff));
}

// ---------------------------------------------------------------------------------
// cvt.rn.bf16.f32: round to nearest, ties to even, NaN stays NaN.
// ---------------------------------------------------------------------------------

#[test]
fn bf16_conversion_rounds_to_nearest_even_like_half() {
    let d = dev();
    let mut xs: Vec<f32> = vec![
        0.0,
        -0.0,
        1.0,
        f32::from_bits(0x3f80_8000), // tie between 1.0 and 1.0078125: even is 1.0
        f32::from_bits(0x3f81_8000), // tie: even is up
        f32::from_bits(0x3f80_8001), // just above the tie: up
        f32::MAX,                    // rounds to inf
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::MIN_POSITIVE,
        1e-40, // subnormal
        f32::NAN,
    ];
    xs.extend(common::randn(3, 1000).iter().map(|&v| (v * 1e3) as f32));
    let bx = upload(&d, &xs);
    let by = d.alloc(xs.len() * 2).unwrap();
    d.launch(
        "tc_probe_cvt_bf16",
        LaunchCfg::for_elems(xs.len()),
        &[bx.arg(), by.arg(), KernelArg::I32(xs.len() as i32)],
    )
    .unwrap();
    let got: Vec<u16> = download(&d, &by, xs.len());
    for (x, g) in xs.iter().zip(&got) {
        let want = bf16::from_f32(*x);
        if x.is_nan() {
            assert!(bf16::from_bits(*g).is_nan(), "NaN -> {g:#06x}");
        } else {
            assert_eq!(*g, want.to_bits(), "{x:e} ({:#010x})", x.to_bits());
        }
    }
}
