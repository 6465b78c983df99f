// Matrix products for linear, matmul and conv2d (after im2col), plus the bias kernels
// that go with them. f32, row-major operands addressed by leading dimension.
//
// Every matmul_* entry computes, for z = blockIdx.z in [0, batch * splits):
//   b = z / splits, s = z % splits, k in [s * kchunk, min(K, (s + 1) * kchunk))
//   C_z = op(A_b) @ op(B_b) over that k range (+ beta * C_z)
// with A_b = A + b * strideA, B_b = B + b * strideB, C_z = C + z * strideC.
// splits == 1 is a plain (batched) product; splits > 1 or a batch to be summed writes
// partial products that matmul_reduce_f32 adds up in a fixed order (deterministic,
// unlike atomics). Grid: (ceil(N / BN), ceil(M / BM), batch * splits), 256 threads.
// Names: nn = A @ B, nt = A @ B^T, tn = A^T @ B; *_small use 64x64 tiles for thin
// products (few rows or columns), the others 128x128.
#include "common.cuh"
#include "gemm.cuh"

#define KESTREL_MATMUL_BODY(BM, BN, BK, TM, TN, TA, TB)                                \
    __shared__ float As[(BK) * ((BM) + KESTREL_GEMM_PAD)];                               \
    __shared__ float Bs[(BK) * ((BN) + KESTREL_GEMM_PAD)];                               \
    int z = blockIdx.z, b = z / splits, s = z % splits;                                \
    int k0 = s * kchunk;                                                               \
    int k1 = K - k0 < kchunk ? K : k0 + kchunk;                                        \
    kestrel_gemm_tile<BM, BN, BK, TM, TN, TA, TB>(A + b * strideA, B + b * strideB,    \
                                                  C + z * strideC, M, N, lda, ldb, ldc, \
                                                  k0, k1, beta, As, Bs);

extern "C" __global__ void matmul_nn_f32(
        const float* __restrict__ A, const float* __restrict__ B, float* __restrict__ C,
        int M, int N, int K, int lda, int ldb, int ldc, long long strideA, long long strideB,
        long long strideC, int splits, int kchunk, float beta) {
    KESTREL_MATMUL_BODY(128, 128, 8, 8, 8, false, false)
}
extern "C" __global__ void matmul_nt_f32(
        const float* __restrict__ A, const float* __restrict__ B, float* __restrict__ C,
        int M, int N, int K, int lda, int ldb, int ldc, long long strideA, long long strideB,
        long long strideC, int splits, int kchunk, float beta) {
    KESTREL_MATMUL_BODY(128, 128, 8, 8, 8, false, true)
}
extern "C" __global__ void matmul_tn_f32(
        const float* __restrict__ A, const float* __restrict__ B, float* __restrict__ C,
        int M, int N, int K, int lda, int ldb, int ldc, long long strideA, long long strideB,
        long long strideC, int splits, int kchunk, float beta) {
    KESTREL_MATMUL_BODY(128, 128, 8, 8, 8, true, false)
}
extern "C" __global__ void matmul_nn_small_f32(
        const float* __restrict__ A, const float* __restrict__ B, float* __restrict__ C,
        int M, int N, int K, int lda, int ldb, int ldc, long long strideA, long long strideB,
        long long strideC, int splits, int kchunk, float beta) {
    KESTREL_MATMUL_BODY(64, 64, 16, 4, 4, false, false)
}
extern "C" __global__ void matmul_nt_small_f32(
        const float* __restrict__ A, const float* __restrict__ B, float* __restrict__ C,
        int M, int N, int K, int lda, int ldb, int ldc, long long strideA, long long strideB,
        long long strideC, int splits, int kchunk, float beta) {
    KESTREL_MATMUL_BODY(64, 64, 16, 4, 4, false, true)
}
extern "C" __global__ void matmul_tn_small_f32(
        const float* __restrict__ A, const float* __restrict__ B, float* __restrict__ C,
        int M, int N, int K, int lda, int ldb, int ldc, long long strideA, long long strideB,
        long long strideC, int splits, int kchunk, float beta) {
    KESTREL_MATMUL_BODY(64, 64, 16, 4, 4, true, false)
}

// C[g * len + e] = sum_{s < slices} P[(g * slices + s) * len + e] (+ beta * C[...]),
// for g < groups: sums split-K (and batch) partial products in a fixed order.
extern "C" __global__ void matmul_reduce_f32(const float* __restrict__ P, float* __restrict__ C,
                                             long long len, int groups, int slices, float beta) {
    KESTREL_LOOP(i, len * groups) {
        long long g = i / len, e = i % len;
        const float* p = P + g * slices * len + e;
        float acc = 0.f;
        for (int s = 0; s < slices; ++s) acc += p[s * len];
        C[i] = beta != 0.f ? acc + beta * C[i] : acc;
    }
}

// y[(o * C + c) * inner + q] += b[c]: bias over the channel axis of [outer, C, inner]
// (linear: inner = 1; conv2d: inner = H * W).
extern "C" __global__ void matmul_bias_add_f32(float* __restrict__ y, const float* __restrict__ b,
                                               int C, long long inner, long long total) {
    KESTREL_LOOP(i, total) { y[i] += b[(i / inner) % C]; }
}

// gb[c] = sum over o, q of gy[(o * C + c) * inner + q]. One block per channel
// (gridDim.x = C), blockDim.x a multiple of 32 up to 1024.
extern "C" __global__ void matmul_bias_grad_f32(const float* __restrict__ gy, float* __restrict__ gb,
                                                long long outer, int C, long long inner) {
    __shared__ float scratch[32];
    int c = blockIdx.x;
    float acc = 0.f;
    for (long long e = threadIdx.x; e < outer * inner; e += blockDim.x) {
        long long o = e / inner, q = e % inner;
        acc += gy[(o * C + c) * inner + q];
    }
    float t = kestrel_block_sum(acc, scratch);
    if (threadIdx.x == 0) gb[c] = t;
}
