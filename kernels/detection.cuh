// Device helpers shared by the detection kernels (boxes, nms, topk, box_coder,
// matcher, anchors). Self-contained: no CUDA headers.
#pragma once
#include "common.cuh"

typedef unsigned long long kestrel_u64;

// Exactly rounded f32 multiply and add that the compiler may not contract into an
// FMA: the CPU twins (and torchvision's CPU ops) round after every operation, and
// integer outputs such as NMS keep lists must not depend on an FMA.
__device__ __forceinline__ float det_mul(float a, float b) {
#ifdef __CUDA_ARCH__
    return __fmul_rn(a, b);
#else
    return a * b;
#endif
}
__device__ __forceinline__ float det_add(float a, float b) {
#ifdef __CUDA_ARCH__
    return __fadd_rn(a, b);
#else
    return a + b;
#endif
}
__device__ __forceinline__ float det_sub(float a, float b) {
#ifdef __CUDA_ARCH__
    return __fsub_rn(a, b);
#else
    return a - b;
#endif
}

// C++ std::max / std::min, NaN behaviour included (torchvision's CPU NMS uses them):
// std::max(a, b) = a < b ? b : a, std::min(a, b) = b < a ? b : a.
__device__ __forceinline__ float det_std_max(float a, float b) { return a < b ? b : a; }
__device__ __forceinline__ float det_std_min(float a, float b) { return b < a ? b : a; }

// torch.maximum / torch.minimum: NaN in either operand gives NaN.
__device__ __forceinline__ float det_nan_max(float a, float b) {
    if (a != a) return a;
    if (b != b) return b;
    return a > b ? a : b;
}
__device__ __forceinline__ float det_nan_min(float a, float b) {
    if (a != a) return a;
    if (b != b) return b;
    return a < b ? a : b;
}

// 32-bit key whose ascending order is torch's descending sort of scores: NaN first
// (torch ranks NaN above +inf), then +inf .. -inf; -0.0 and +0.0 are equal.
__device__ __forceinline__ unsigned int det_desc_key(float s) {
    unsigned int b;
    if (s != s) {
        b = 0x7fc00000u;
    } else if (s == 0.0f) {
        b = 0u;
    } else {
        b = __float_as_uint(s);
    }
    unsigned int ord = (b & 0x80000000u) ? ~b : (b | 0x80000000u);
    return ~ord;
}

// 64-bit shuffle as two 32-bit shuffles (the whole warp must take part).
__device__ __forceinline__ kestrel_u64 det_shfl_u64(kestrel_u64 v, int src) {
    unsigned int lo = (unsigned int)(v & 0xffffffffull);
    unsigned int hi = (unsigned int)(v >> 32);
    lo = __shfl_sync(0xffffffffu, lo, src);
    hi = __shfl_sync(0xffffffffu, hi, src);
    return ((kestrel_u64)hi << 32) | (kestrel_u64)lo;
}

// Ascending bitonic sort of `n` (a power of two, <= 2 * blockDim.x * 64) keys in
// shared memory by the whole block. Every thread must call it.
__device__ __forceinline__ void det_block_bitonic_sort(kestrel_u64* keys, int n) {
    for (int k = 2; k <= n; k <<= 1) {
        for (int j = k >> 1; j > 0; j >>= 1) {
            __syncthreads();
            for (int t = threadIdx.x; t < (n >> 1); t += blockDim.x) {
                int i = 2 * t - (t & (j - 1));
                int l = i + j;
                bool up = (i & k) == 0;
                kestrel_u64 a = keys[i], b = keys[l];
                if ((a > b) == up) {
                    keys[i] = b;
                    keys[l] = a;
                }
            }
        }
    }
    __syncthreads();
}
