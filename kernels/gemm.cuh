// Tiled SGEMM with register blocking, shared by the matmul.cu entries.
//
// One block computes a BM x BN tile of C = A @ B over the reduction range [k0, k1):
// each step stages a BK-deep slice of A and B in shared memory, and each of the
// (BM/TM) x (BN/TN) threads accumulates a TM x TN sub-tile in registers. A thread's
// rows and columns are strided by the thread-grid size (not contiguous), so that the
// shared-memory reads of a warp hit distinct banks and the stores to C coalesce.
//
// Operands are addressed through leading dimensions, transposed by template flag:
//   A(i, k) = TA ? A[k * lda + i] : A[i * lda + k]
//   B(k, j) = TB ? B[j * ldb + k] : B[k * ldb + j]
// Any M, N, K: loads outside the matrices read zero, stores outside are skipped.
#pragma once

// Padding of a shared-memory row: keeps the transposed writes of the A/B staging
// free of bank conflicts.
#define KESTREL_GEMM_PAD 4

template <int BM, int BN, int BK, int TM, int TN, bool TA, bool TB>
__device__ __forceinline__ void kestrel_gemm_tile(
    const float* __restrict__ A, const float* __restrict__ B, float* __restrict__ C,
    int M, int N, int lda, int ldb, int ldc, int k0, int k1, float beta,
    float* As, float* Bs) {
    const int TX = BN / TN;  // threads along N
    const int TY = BM / TM;  // threads along M
    const int NT = TX * TY;
    const int tid = threadIdx.x;
    const int tx = tid % TX, ty = tid / TX;
    const int bm = blockIdx.y * BM, bn = blockIdx.x * BN;

    float acc[TM][TN];
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
        for (int j = 0; j < TN; ++j) acc[i][j] = 0.f;

    for (int kt = k0; kt < k1; kt += BK) {
        // Stage A[bm.., kt..] as As[kk][i]. Consecutive threads walk the operand's
        // contiguous axis so the global loads coalesce.
        for (int e = tid; e < BM * BK; e += NT) {
            int i = TA ? e % BM : e / BK;
            int kk = TA ? e / BM : e % BK;
            int gi = bm + i, gk = kt + kk;
            float v = 0.f;
            if (gi < M && gk < k1)
                v = TA ? A[(long long)gk * lda + gi] : A[(long long)gi * lda + gk];
            As[kk * (BM + KESTREL_GEMM_PAD) + i] = v;
        }
        // Stage B[kt.., bn..] as Bs[kk][j].
        for (int e = tid; e < BK * BN; e += NT) {
            int j = TB ? e / BK : e % BN;
            int kk = TB ? e % BK : e / BN;
            int gj = bn + j, gk = kt + kk;
            float v = 0.f;
            if (gj < N && gk < k1)
                v = TB ? B[(long long)gj * ldb + gk] : B[(long long)gk * ldb + gj];
            Bs[kk * (BN + KESTREL_GEMM_PAD) + j] = v;
        }
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < BK; ++kk) {
            float a[TM], b[TN];
#pragma unroll
            for (int i = 0; i < TM; ++i) a[i] = As[kk * (BM + KESTREL_GEMM_PAD) + ty + i * TY];
#pragma unroll
            for (int j = 0; j < TN; ++j) b[j] = Bs[kk * (BN + KESTREL_GEMM_PAD) + tx + j * TX];
#pragma unroll
            for (int i = 0; i < TM; ++i)
#pragma unroll
                for (int j = 0; j < TN; ++j) acc[i][j] += a[i] * b[j];
        }
        __syncthreads();
    }

#pragma unroll
    for (int i = 0; i < TM; ++i) {
        int gi = bm + ty + i * TY;
        if (gi >= M) continue;
#pragma unroll
        for (int j = 0; j < TN; ++j) {
            int gj = bn + tx + j * TX;
            if (gj >= N) continue;
            float* c = C + (long long)gi * ldc + gj;
            // beta == 0 must not read C: it may hold garbage (or NaN) by contract.
            *c = beta != 0.f ? acc[i][j] + beta * *c : acc[i][j];
        }
    }
}
