// Probes of single tensor-core / async-copy instructions, for tests/mma_isa.rs: they
// move raw registers between global memory and one instruction, so a test can check
// the instruction's fragment layout against the PTX ISA's tables written out in Rust.
// One warp (32 threads), one block.
#include "mma.cuh"

// d[lane][0..4] = mma.m16n8k16(a[lane][0..4], b[lane][0..2], c[lane][0..4]).
extern "C" __global__ void tc_probe_mma(const unsigned* a, const unsigned* b, const float* c, float* d) {
    int l = threadIdx.x;
    unsigned ra[4], rb[2];
    float rc[4], rd[4];
    for (int i = 0; i < 4; ++i) ra[i] = a[l * 4 + i];
    for (int i = 0; i < 2; ++i) rb[i] = b[l * 2 + i];
    for (int i = 0; i < 4; ++i) rc[i] = c[l * 4 + i];
    kestrel_mma_bf16_16816(rd, ra, rb, rc);
    for (int i = 0; i < 4; ++i) d[l * 4 + i] = rd[i];
}

// src: 32 rows of 8 bf16 (16 bytes each), copied to shared memory with cp.async.
// Lane l hands ldmatrix the address of shared row rows[l]. out[lane][0..4] receives
// the registers of ldmatrix.x{count}{.trans if trans} (unused registers stay 0).
extern "C" __global__ void tc_probe_ldmatrix(const unsigned short* src, const int* rows, unsigned* out, int count,
                                             int trans) {
    __shared__ __align__(16) unsigned short s[32 * 8];
    int l = threadIdx.x;
    kestrel_cp_async16(s + l * 8, src + l * 8, 16);
    kestrel_cp_async_commit();
    kestrel_cp_async_wait<0>();
    __syncthreads();
    unsigned r[4] = {0, 0, 0, 0};
    const unsigned short* p = s + rows[l] * 8;
    if (count == 1 && !trans) kestrel_ldmatrix<1, false>(r, p);
    if (count == 1 && trans) kestrel_ldmatrix<1, true>(r, p);
    if (count == 2 && !trans) kestrel_ldmatrix<2, false>(r, p);
    if (count == 2 && trans) kestrel_ldmatrix<2, true>(r, p);
    if (count == 4 && !trans) kestrel_ldmatrix<4, false>(r, p);
    if (count == 4 && trans) kestrel_ldmatrix<4, true>(r, p);
    for (int i = 0; i < 4; ++i) out[l * 4 + i] = r[i];
}

// cp.async groups: lane l copies src row l (16 bytes, `src_bytes` of them from src,
// the rest zero-filled) in group l % 2, commits both groups, waits with
// wait_group<wait_n> and then reads its own rows back with plain loads into out
// (64 rows: its group-0 and group-1 destinations). With wait_n = 1 the second group may
// still be in flight: the emulator shows garbage there. `skip_wait` leaves out the
// wait entirely.
extern "C" __global__ void tc_probe_cp_async(const unsigned short* src, unsigned short* out, int src_bytes,
                                             int wait_n) {
    __shared__ __align__(16) unsigned short s[64 * 8];
    int l = threadIdx.x;
    kestrel_cp_async16(s + l * 8, src + l * 8, src_bytes);
    kestrel_cp_async_commit();
    kestrel_cp_async16(s + (32 + l) * 8, src + ((l + 1) % 32) * 8, src_bytes);
    kestrel_cp_async_commit();
    if (wait_n == 0) kestrel_cp_async_wait<0>();
    if (wait_n == 1) kestrel_cp_async_wait<1>();
    for (int i = 0; i < 8; ++i) {
        out[l * 8 + i] = s[l * 8 + i];
        out[(32 + l) * 8 + i] = s[(32 + l) * 8 + i];
    }
}

// f32 -> bf16 conversion of n values (cvt.rn.bf16.f32 on a GPU).
extern "C" __global__ void tc_probe_cvt_bf16(const float* x, unsigned short* y, int n) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += blockDim.x * gridDim.x)
        y[i] = kestrel_f32_to_bf16(x[i]);
}
