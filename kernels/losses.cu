// Losses: binary cross-entropy with logits, smooth-L1 (L1 when beta == 0) and softmax
// cross-entropy. f32, contiguous.
//
// Each pointwise loss has three entries:
//   <loss>_fwd_f32      per-element loss (reduction "none"),
//   <loss>_partial_f32  per-block sums of the loss (reductions "sum"/"mean"; the final
//                       pass is sum_final_f32 in reduce.cu, so the scalar never leaves
//                       the device),
//   <loss>_bwd_f32      gradients. The upstream gradient is read from device memory at
//                       gy[i * gy_stride] * k: gy_stride 0 and k = 1 or 1/n for a scalar
//                       loss, gy_stride 1 and k = 1 for "none". gt (the gradient for the
//                       targets) is written only when want_gt != 0; it may alias gx
//                       otherwise, so it is not __restrict__.
#include "common.cuh"

// Largest finite float: the identity of a max that must not produce inf - inf.
#define KESTREL_LOSS_NEG_MAX (-3.402823466e+38f)

// ---------------------------------------------------------------- pointwise helpers

// max(x, 0) - x t + log(1 + exp(-|x|)): never exponentiates a positive number.
__device__ __forceinline__ float bce_logits_elem(float x, float t) {
    return fmaxf(x, 0.f) - x * t + log1pf(expf(-fabsf(x)));
}

// sigmoid(x) without overflow for large |x|.
__device__ __forceinline__ float stable_sigmoid(float x) {
    if (x >= 0.f) return 1.f / (1.f + expf(-x));
    float e = expf(x);
    return e / (1.f + e);
}

// PyTorch's smooth_l1: 0.5 d^2 / beta where |d| < beta, |d| - 0.5 beta elsewhere.
// beta == 0 never takes the quadratic branch, which is exactly L1.
__device__ __forceinline__ float smooth_l1_elem(float d, float beta) {
    float z = fabsf(d);
    return z < beta ? 0.5f * z * z / beta : z - 0.5f * beta;
}

// d/dd of smooth_l1. beta == 0 is L1, whose gradient is sign(d) with sign(0) = 0 (the
// quadratic branch would divide 0 by 0).
__device__ __forceinline__ float smooth_l1_grad(float d, float beta) {
    if (d < -beta) return -1.f;
    if (d > beta) return 1.f;
    if (beta == 0.f) return 0.f;
    return d / beta;
}

// ---------------------------------------------------------------- bce with logits

extern "C" __global__ void bce_logits_fwd_f32(const float* __restrict__ x, const float* __restrict__ t,
                                              float* __restrict__ y, long long n) {
    KESTREL_LOOP(i, n) { y[i] = bce_logits_elem(x[i], t[i]); }
}

extern "C" __global__ void bce_logits_partial_f32(const float* __restrict__ x, const float* __restrict__ t,
                                                  float* __restrict__ partial, long long n) {
    __shared__ float scratch[32];
    float acc = 0.f;
    KESTREL_LOOP(i, n) { acc += bce_logits_elem(x[i], t[i]); }
    float s = kestrel_block_sum(acc, scratch);
    if (threadIdx.x == 0) partial[blockIdx.x] = s;
}

// dL/dx = (sigmoid(x) - t) g, dL/dt = -x g.
extern "C" __global__ void bce_logits_bwd_f32(const float* __restrict__ x, const float* __restrict__ t,
                                              const float* __restrict__ gy, long long gy_stride, float k,
                                              float* gx, float* gt, int want_gt, long long n) {
    KESTREL_LOOP(i, n) {
        float g = gy[i * gy_stride] * k;
        float xi = x[i];
        gx[i] = (stable_sigmoid(xi) - t[i]) * g;
        if (want_gt) gt[i] = -xi * g;
    }
}

// ---------------------------------------------------------------- smooth L1 / L1

extern "C" __global__ void smooth_l1_fwd_f32(const float* __restrict__ x, const float* __restrict__ t, float beta,
                                             float* __restrict__ y, long long n) {
    KESTREL_LOOP(i, n) { y[i] = smooth_l1_elem(x[i] - t[i], beta); }
}

extern "C" __global__ void smooth_l1_partial_f32(const float* __restrict__ x, const float* __restrict__ t, float beta,
                                                 float* __restrict__ partial, long long n) {
    __shared__ float scratch[32];
    float acc = 0.f;
    KESTREL_LOOP(i, n) { acc += smooth_l1_elem(x[i] - t[i], beta); }
    float s = kestrel_block_sum(acc, scratch);
    if (threadIdx.x == 0) partial[blockIdx.x] = s;
}

// dL/dx = smooth_l1'(x - t) g, dL/dt = -dL/dx.
extern "C" __global__ void smooth_l1_bwd_f32(const float* __restrict__ x, const float* __restrict__ t, float beta,
                                             const float* __restrict__ gy, long long gy_stride, float k,
                                             float* gx, float* gt, int want_gt, long long n) {
    KESTREL_LOOP(i, n) {
        float v = smooth_l1_grad(x[i] - t[i], beta) * (gy[i * gy_stride] * k);
        gx[i] = v;
        if (want_gt) gt[i] = -v;
    }
}

// ---------------------------------------------------------------- cross-entropy

__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// One warp per row of x [n, c]: lse[r] = log(sum_j exp(x[r, j])) (max-shifted) and
// loss[r] = lse[r] - x[r, labels[r]]. A label outside [0, c) leaves loss[r] = 0 and
// raises *bad to (largest such row) + 1, which the host turns into an error.
// blockDim.x must be a multiple of 32 (the row loop is uniform within a warp).
extern "C" __global__ void cross_entropy_fwd_f32(const float* __restrict__ x, const long long* __restrict__ labels,
                                                 float* __restrict__ loss, float* __restrict__ lse,
                                                 int* __restrict__ bad, long long n, long long c) {
    int lane = threadIdx.x & 31;
    long long warp = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    long long nwarps = ((long long)gridDim.x * blockDim.x) >> 5;
    for (long long r = warp; r < n; r += nwarps) {
        const float* row = x + r * c;
        float m = KESTREL_LOSS_NEG_MAX;
        for (long long j = lane; j < c; j += 32) m = fmaxf(m, row[j]);
        m = warp_max(m);
        float s = 0.f;
        for (long long j = lane; j < c; j += 32) s += expf(row[j] - m);
        s = warp_sum(s);
        if (lane == 0) {
            float l = m + logf(s);
            long long lab = labels[r];
            lse[r] = l;
            if (lab < 0 || lab >= c) {
                atomicMax(bad, (int)(r + 1 < 2147483647LL ? r + 1 : 2147483647LL));
                loss[r] = 0.f;
            } else {
                loss[r] = l - row[lab];
            }
        }
    }
}

// dL/dx[r, j] = (exp(x[r, j] - lse[r]) - [j == labels[r]]) * gy[r * gy_stride] * k.
extern "C" __global__ void cross_entropy_bwd_f32(const float* __restrict__ x, const long long* __restrict__ labels,
                                                 const float* __restrict__ lse, const float* __restrict__ gy,
                                                 long long gy_stride, float k, float* __restrict__ gx,
                                                 long long n, long long c) {
    KESTREL_LOOP(i, n * c) {
        long long r = i / c, j = i - r * c;
        float p = expf(x[i] - lse[r]);
        float onehot = labels[r] == j ? 1.f : 0.f;
        gx[i] = (p - onehot) * (gy[r * gy_stride] * k);
    }
}
