// Elementwise ops: relu, add, mul, scale. f32, contiguous, grid-stride.
#include "common.cuh"

extern "C" __global__ void relu_fwd_f32(const float* __restrict__ x, float* __restrict__ y, long long n) {
    KESTREL_LOOP(i, n) { float v = x[i]; y[i] = v > 0.f ? v : 0.f; }
}

// dx = dy where y > 0 (torch's threshold_backward uses the output).
extern "C" __global__ void relu_bwd_f32(const float* __restrict__ y, const float* __restrict__ gy, float* __restrict__ gx, long long n) {
    KESTREL_LOOP(i, n) { gx[i] = y[i] > 0.f ? gy[i] : 0.f; }
}

extern "C" __global__ void add_f32(const float* __restrict__ a, const float* __restrict__ b, float* __restrict__ y, long long n) {
    KESTREL_LOOP(i, n) { y[i] = a[i] + b[i]; }
}

extern "C" __global__ void mul_f32(const float* __restrict__ a, const float* __restrict__ b, float* __restrict__ y, long long n) {
    KESTREL_LOOP(i, n) { y[i] = a[i] * b[i]; }
}

extern "C" __global__ void scale_f32(const float* __restrict__ x, float s, float* __restrict__ y, long long n) {
    KESTREL_LOOP(i, n) { y[i] = x[i] * s; }
}

// y[i] = *s * x[i]: scale by a device scalar (backward of reductions).
extern "C" __global__ void scale_by_dev_f32(const float* __restrict__ x, const float* __restrict__ s, float* __restrict__ y, long long n) {
    float k = s[0];
    KESTREL_LOOP(i, n) { y[i] = x[i] * k; }
}

extern "C" __global__ void fill_from_dev_f32(const float* __restrict__ s, float k, float* __restrict__ y, long long n) {
    float v = s[0] * k;
    KESTREL_LOOP(i, n) { y[i] = v; }
}
