// Matcher (torchvision's detection/_utils.py) on an IoU matrix iou [g, a] (gt rows,
// anchor columns): per-gt maxima, then per-anchor best gt, thresholds and the
// low-quality restore.
#include "detection.cuh"

// max with NaN winning (torch's max: the first NaN is the maximum).
__device__ __forceinline__ float matcher_nan_max(float a, float b) {
    if (a != a) return a;
    if (b != b) return b;
    return a < b ? b : a;
}

// rowmax[r] = max over anchors of iou[r, :] (NaN if any NaN). One block per gt row;
// blockDim.x a multiple of 32.
extern "C" __global__ void matcher_gt_max_f32(const float* __restrict__ iou, long long a,
                                              float* __restrict__ rowmax) {
    __shared__ float part[32];
    const float* row = iou + (long long)blockIdx.x * a;
    float m = -__int_as_float(0x7f800000);  // -inf
    for (long long j = threadIdx.x; j < a; j += blockDim.x) m = matcher_nan_max(m, row[j]);
    for (int o = 16; o > 0; o >>= 1) m = matcher_nan_max(m, __shfl_xor_sync(0xffffffffu, m, o));
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) part[warp] = m;
    __syncthreads();
    if (threadIdx.x == 0) {
        float t = part[0];
        for (int w = 1; w < (int)(blockDim.x >> 5); ++w) t = matcher_nan_max(t, part[w]);
        rowmax[blockIdx.x] = t;
    }
}

// matches[j] for every anchor j: the first gt of maximal IoU (the first NaN if any),
// -1 below `low`, -2 in [low, high); with `allow_low_quality`, anchors that reach
// some gt's maximum (ties included) get their best gt back.
extern "C" __global__ void matcher_assign_f32(const float* __restrict__ iou, long long g, long long a,
                                              const float* __restrict__ rowmax, float high, float low,
                                              int allow_low_quality, long long* __restrict__ matches) {
    KESTREL_LOOP(j, a) {
        float best = iou[j];
        long long arg = 0;
        for (long long r = 0; r < g; ++r) {
            float v = iou[r * a + j];
            if (!(v <= best)) {
                best = v;
                arg = r;
                if (v != v) break;
            }
        }
        long long m = arg;
        if (best < low) {
            m = -1;
        } else if (best >= low && best < high) {
            m = -2;
        }
        if (allow_low_quality) {
            for (long long r = 0; r < g; ++r) {
                if (iou[r * a + j] == rowmax[r]) {
                    m = arg;
                    break;
                }
            }
        }
        matches[j] = m;
    }
}
