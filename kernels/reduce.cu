// Reductions to a scalar. Two passes: per-block partial sums, then one block sums
// the partials, so the result is deterministic for a given launch shape.
#include "common.cuh"

extern "C" __global__ void sum_partial_f32(const float* __restrict__ x, float* __restrict__ partial, long long n) {
    __shared__ float scratch[32];
    float acc = 0.f;
    KESTREL_LOOP(i, n) { acc += x[i]; }
    float t = kestrel_block_sum(acc, scratch);
    if (threadIdx.x == 0) partial[blockIdx.x] = t;
}

// One block: y[0] = scale * sum(partial[0..m]).
extern "C" __global__ void sum_final_f32(const float* __restrict__ partial, float* __restrict__ y, int m, float scale) {
    __shared__ float scratch[32];
    float acc = 0.f;
    for (int i = threadIdx.x; i < m; i += blockDim.x) acc += partial[i];
    float t = kestrel_block_sum(acc, scratch);
    if (threadIdx.x == 0) y[0] = t * scale;
}
