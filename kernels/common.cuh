// Shared device helpers for every kernels/*.cu file. Self-contained (no CUDA
// headers) so that NVRTC needs no include paths and the host shim can compile it.
#pragma once

// Grid-stride loop over [0, n).
#define KESTREL_LOOP(i, n) \
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < (long long)(n); \
         i += (long long)blockDim.x * gridDim.x)

// Sum of `v` over the block; every thread gets the result. `scratch` holds
// blockDim.x / 32 floats of shared memory. blockDim.x must be a multiple of 32.
__device__ __forceinline__ float kestrel_block_sum(float v, float* scratch) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float t = 0.f;
    for (int w = 0; w < nwarps; ++w) t += scratch[w];
    return t;
}
