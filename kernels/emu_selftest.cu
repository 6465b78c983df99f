// Test kernels of the emulated CUDA device (tests/emulator.rs): barriers, warp
// shuffles and votes, atomics, dynamic shared memory, and two planted bugs that the
// emulator must expose. They are ordinary kernels: nvcc and NVRTC compile them too,
// so the same tests can run on a real GPU.
#include "common.cuh"

// Each block reverses its blockDim.x elements of x through shared memory.
extern "C" __global__ void emutest_block_reverse_f32(const float* __restrict__ x, float* __restrict__ y, long long n) {
    __shared__ float s[1024];
    long long base = (long long)blockIdx.x * blockDim.x;
    int t = threadIdx.x, m = blockDim.x;
    if (base + m > n) m = (int)(n - base);
    if (t < m) s[t] = x[base + t];
    __syncthreads();
    if (t < m) y[base + t] = s[m - 1 - t];
}

// PLANTED BUG (kept on purpose): the same reverse without the barrier, so threads
// read shared memory that other threads have not written yet.
extern "C" __global__ void emutest_block_reverse_nosync_f32(const float* __restrict__ x, float* __restrict__ y, long long n) {
    __shared__ float s[1024];
    long long base = (long long)blockIdx.x * blockDim.x;
    int t = threadIdx.x, m = blockDim.x;
    if (base + m > n) m = (int)(n - base);
    if (t < m) s[t] = x[base + t];
    if (t < m) y[base + t] = s[m - 1 - t];  // PLANTED: missing __syncthreads() above
}

// PLANTED BUG (kept on purpose): forward difference whose last element reads one past
// the end of x (the bounds check should be i + 1 < n).
extern "C" __global__ void emutest_offbyone_diff_f32(const float* __restrict__ x, float* __restrict__ y, long long n) {
    KESTREL_LOOP(i, n) {
        y[i] = x[i + 1] - x[i];  // PLANTED: off-by-one read of x[n]
    }
}

// Per warp of x (blockDim.x a multiple of 32): the warp's sum by xor-butterfly and by
// shift-down reduction, its inclusive prefix sums by shift-up scan, lane 7's value
// broadcast, and the vote results.
//   y_xor[i] = y_down[i / 32 * 32] = sum over the warp (y_down only at lane 0)
//   y_scan[i] = x[warp start] + ... + x[i]
//   y_bcast[i] = x[warp start + 7]
//   votes[warp] = {ballot(x > 0), any(x > 0), all(x > 0)}
extern "C" __global__ void emutest_warp_ops_f32(const float* __restrict__ x, float* __restrict__ y_xor,
                                                float* __restrict__ y_down, float* __restrict__ y_scan,
                                                float* __restrict__ y_bcast, unsigned* __restrict__ votes) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    int lane = threadIdx.x & 31;
    float v = x[i];

    float a = v;
    for (int o = 16; o > 0; o >>= 1) a += __shfl_xor_sync(0xffffffffu, a, o);
    y_xor[i] = a;

    float d = v;
    for (int o = 16; o > 0; o >>= 1) d += __shfl_down_sync(0xffffffffu, d, o);
    y_down[i] = lane == 0 ? d : 0.f;

    float s = v;
    for (int o = 1; o < 32; o <<= 1) {
        float u = __shfl_up_sync(0xffffffffu, s, o);
        if (lane >= o) s += u;
    }
    y_scan[i] = s;

    y_bcast[i] = __shfl_sync(0xffffffffu, v, 7);

    unsigned b = __ballot_sync(0xffffffffu, v > 0.f);
    int any = __any_sync(0xffffffffu, v > 0.f);
    int all = __all_sync(0xffffffffu, v > 0.f);
    if (lane == 0) {
        long long w = i / 32;
        votes[3 * w] = b;
        votes[3 * w + 1] = (unsigned)any;
        votes[3 * w + 2] = (unsigned)all;
    }
}

// Every thread of the grid hits the same counters: count, max of thread ids, a float
// sum of ones, a CAS-built increment, and a bitwise OR of 1 << (id % 32).
extern "C" __global__ void emutest_atomics(unsigned long long* __restrict__ count, int* __restrict__ max_id,
                                           float* __restrict__ fsum, int* __restrict__ cas_count,
                                           unsigned* __restrict__ bits, int* __restrict__ min_id) {
    int id = blockIdx.x * blockDim.x + threadIdx.x;
    atomicAdd(count, 1ull);
    atomicMax(max_id, id);
    atomicMin(min_id, id);
    atomicAdd(fsum, 1.0f);
    int old = atomicAdd(cas_count, 0), seen;
    do {
        seen = old;
        old = atomicCAS(cas_count, seen, seen + 1);
    } while (old != seen);
    atomicOr(bits, 1u << (id % 32));
}

// Dynamic shared memory of m floats: the block fills it (strided), then each thread
// sums it all: y[blockIdx.x] = sum_{k<m} (k + blockIdx.x), written by thread 0;
// y_count[blockIdx.x] = __syncthreads_count(thread id even).
extern "C" __global__ void emutest_dynamic_shared_f32(float* __restrict__ y, int* __restrict__ y_count, int m) {
    extern __shared__ float dsm[];
    for (int k = threadIdx.x; k < m; k += blockDim.x) dsm[k] = (float)(k + (int)blockIdx.x);
    __syncthreads();
    float acc = 0.f;
    for (int k = 0; k < m; ++k) acc += dsm[k];
    int c = __syncthreads_count((threadIdx.x & 1) == 0);
    if (threadIdx.x == 0) {
        y[blockIdx.x] = acc;
        y_count[blockIdx.x] = c;
    }
}

// out[linear global thread] = the thread's 3-D thread and block indices, packed.
extern "C" __global__ void emutest_index3d(unsigned* __restrict__ out) {
    unsigned tpb = blockDim.x * blockDim.y * blockDim.z;
    unsigned t = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
    unsigned b = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
    out[b * tpb + t] = threadIdx.x | (threadIdx.y << 4) | (threadIdx.z << 8) | (blockIdx.x << 12) |
                       (blockIdx.y << 16) | (blockIdx.z << 20);
}

// Divergent barriers (undefined on a GPU, reported by the emulator): mode 0, lane 0
// shuffles with a full mask while the other lanes return; mode 1, lane 0 waits at
// __syncwarp while the rest of the block waits at __syncthreads.
extern "C" __global__ void emutest_divergent_barrier(float* __restrict__ y, int mode) {
    if (mode == 0) {
        if (threadIdx.x == 0) y[0] = __shfl_sync(0xffffffffu, 1.0f, 1);
        return;
    }
    if (threadIdx.x == 0) {
        __syncwarp();
    } else {
        __syncthreads();
    }
    y[threadIdx.x] = 1.0f;
}

// Lanes with i < n meet in __activemask() and reduce over exactly those lanes:
// masks[w] = the warp's active mask, sums[w] = sum of its x (lane 0 writes both).
extern "C" __global__ void emutest_activemask_f32(const float* __restrict__ x, unsigned* __restrict__ masks,
                                                  float* __restrict__ sums, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) {
        unsigned m = __activemask();
        int lane = threadIdx.x & 31;
        float v = x[i];
        for (int o = 16; o > 0; o >>= 1) {
            float u = __shfl_down_sync(m, v, o);
            if (lane + o < 32 && ((m >> (lane + o)) & 1u)) v += u;
        }
        if (lane == 0) {
            masks[i / 32] = m;
            sums[i / 32] = v;
        }
    }
}
