// Bitonic sorting network pieces shared by the key sorts of kernels/nms.cu (one
// compare-exchange, written once). Keys are unique (they carry their index), so
// the network's ascending order is a stable order of whatever the key ranks first.
#pragma once
#include "common.cuh"

typedef unsigned long long kestrel_u64;

// Lower position of compare-exchange pair `t` at distance `j` (a power of two).
__device__ __forceinline__ long long bitonic_lower(long long t, long long j) {
    return 2 * t - (t & (j - 1));
}

// Order keys[i] and keys[i + j] ascending when `up`, descending otherwise.
template <typename K>
__device__ __forceinline__ void bitonic_cmpx(K* keys, long long i, long long j, bool up) {
    K a = keys[i], b = keys[i + j];
    if ((b < a) == up) {
        keys[i] = b;
        keys[i + j] = a;
    }
}

// Every stage k <= tile of the network over one tile of `tile` keys starting at
// global position `base`, in shared memory `s`; directions follow the global index
// so the tiles form the first stages of the whole network. blockDim.x = tile / 2.
template <typename K>
__device__ __forceinline__ void bitonic_sort_tile(K* keys, K* s, long long base, int tile) {
    for (int t = threadIdx.x; t < tile; t += blockDim.x) s[t] = keys[base + t];
    for (int k = 2; k <= tile; k <<= 1) {
        for (int j = k >> 1; j > 0; j >>= 1) {
            __syncthreads();
            for (int t = threadIdx.x; t < (tile >> 1); t += blockDim.x) {
                long long i = bitonic_lower(t, j);
                bitonic_cmpx(s, i, j, ((base + i) & k) == 0);
            }
        }
    }
    __syncthreads();
    for (int t = threadIdx.x; t < tile; t += blockDim.x) keys[base + t] = s[t];
}

// The steps j = tile / 2 .. 1 of stage k (k > tile) over one tile, in shared memory.
template <typename K>
__device__ __forceinline__ void bitonic_merge_tile(K* keys, K* s, long long base, int tile, long long k) {
    for (int t = threadIdx.x; t < tile; t += blockDim.x) s[t] = keys[base + t];
    for (int j = tile >> 1; j > 0; j >>= 1) {
        __syncthreads();
        for (int t = threadIdx.x; t < (tile >> 1); t += blockDim.x) {
            long long i = bitonic_lower(t, j);
            bitonic_cmpx(s, i, j, ((base + i) & k) == 0);
        }
    }
    __syncthreads();
    for (int t = threadIdx.x; t < tile; t += blockDim.x) keys[base + t] = s[t];
}

// One global step (stage k, distance j) over `padded` keys, grid-stride.
template <typename K>
__device__ __forceinline__ void bitonic_global_step(K* keys, long long padded, long long k, long long j) {
    KESTREL_LOOP(t, padded >> 1) {
        long long i = bitonic_lower(t, j);
        bitonic_cmpx(keys, i, j, (i & k) == 0);
    }
}
