// Tensor-core and asynchronous-copy primitives: one source for the GPU and the
// emulated device.
//
// On the GPU (__CUDA_ARCH__) each helper is one inline PTX instruction for compute_80:
//   mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32   (warp-wide, f32 accumulate)
//   ldmatrix.sync.aligned.m8n8.{x1,x2,x4}[.trans].shared.b16
//   cp.async.cg.shared.global (16 bytes, zero-fill beyond src-size), commit_group,
//   wait_group N
//   cvt.rn.bf16.f32                                       (round to nearest even)
// On the host (the emulator, kernels/emu/) the same helpers call kemu::tc_*, which
// model each instruction per warp from the PTX ISA's fragment tables
// (kernels/emu/tensorcore.inc): the kernel source the emulator runs is the one the
// GPU runs, with no portable fallback in between.
//
// bf16 values travel as their 16 bits (`unsigned short`), two to a 32-bit register
// (lower half = lower index), as the ISA packs them; this avoids depending on
// cuda_bf16.h, which NVRTC cannot find without include paths.
#pragma once

typedef unsigned short kbf16;

// f32 -> bf16, round to nearest even (NaN stays NaN).
__device__ __forceinline__ kbf16 kestrel_f32_to_bf16(float f) {
#if defined(__CUDA_ARCH__)
    unsigned short r;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(f));
    return r;
#else
    return kemu::tc_f32_to_bf16(f);
#endif
}

__device__ __forceinline__ float kestrel_bf16_to_f32(kbf16 b) { return __uint_as_float((unsigned)b << 16); }

// The 32-bit shared-memory address ldmatrix and cp.async take.
__device__ __forceinline__ unsigned kestrel_smem_addr(const void* p) {
#if defined(__CUDA_ARCH__)
    unsigned r;
    asm("{ .reg .u64 a; cvta.to.shared.u64 a, %1; cvt.u32.u64 %0, a; }" : "=r"(r) : "l"(p));
    return r;
#else
    (void)p;
    return 0;
#endif
}

// D = A * B + C for one m16n8k16 tile held by the whole warp (every lane must call).
// a: A fragment (4 regs, 8 bf16), b: B fragment (2 regs), c/d: C/D fragment (4 f32).
__device__ __forceinline__ void kestrel_mma_bf16_16816(float d[4], const unsigned a[4], const unsigned b[2],
                                                       const float c[4]) {
#if defined(__CUDA_ARCH__)
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%10,%11,%12,%13};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
          "f"(c[3]));
#else
    kemu::tc_mma_bf16_16816(d, a, b, c);
#endif
}

// ldmatrix: lane l supplies the address of one 16-byte row (lanes 0-7 for x1, 0-15
// for x2, all for x4; row r of matrix j comes from lane 8j + r). Register j of lane i
// receives matrix j's elements (i/4, 2(i%4)) and (i/4, 2(i%4)+1), or with .trans
// (2(i%4), i/4) and (2(i%4)+1, i/4).
template <int COUNT, bool TRANS>
__device__ __forceinline__ void kestrel_ldmatrix(unsigned* r, const void* row) {
#if defined(__CUDA_ARCH__)
    unsigned a = kestrel_smem_addr(row);
    if constexpr (COUNT == 1 && !TRANS)
        asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(a));
    else if constexpr (COUNT == 1 && TRANS)
        asm volatile("ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(a));
    else if constexpr (COUNT == 2 && !TRANS)
        asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n" : "=r"(r[0]), "=r"(r[1]) : "r"(a));
    else if constexpr (COUNT == 2 && TRANS)
        asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n"
                     : "=r"(r[0]), "=r"(r[1])
                     : "r"(a));
    else if constexpr (COUNT == 4 && !TRANS)
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                     : "r"(a));
    else
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                     : "r"(a));
#else
    static_assert(COUNT == 1 || COUNT == 2 || COUNT == 4, "ldmatrix loads 1, 2 or 4 matrices");
    kemu::tc_ldmatrix(r, COUNT, TRANS, row);
#endif
}

// Asynchronous 16-byte copy global -> shared. Bytes past `src_bytes` (0..16) are
// zero-filled, so out-of-range and padding chunks cost no branch around the copy.
// `dst` holds garbage until a wait_group covering this copy's group returns.
__device__ __forceinline__ void kestrel_cp_async16(void* dst, const void* src, int src_bytes) {
#if defined(__CUDA_ARCH__)
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(kestrel_smem_addr(dst)), "l"(src),
                 "r"(src_bytes));
#else
    kemu::tc_cp_async(dst, src, 16, src_bytes);
#endif
}

// Close the current group of cp.async copies issued by this thread.
__device__ __forceinline__ void kestrel_cp_async_commit() {
#if defined(__CUDA_ARCH__)
    asm volatile("cp.async.commit_group;\n" ::);
#else
    kemu::tc_cp_async_commit();
#endif
}

// Wait until at most N of this thread's committed groups are still in flight.
template <int N>
__device__ __forceinline__ void kestrel_cp_async_wait() {
#if defined(__CUDA_ARCH__)
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#else
    kemu::tc_cp_async_wait(N);
#endif
}
