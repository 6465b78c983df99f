// The one read-back of a training step's logging iteration: the loss values, the
// device's kernel-error table (src/device/error_flags.rs) and a NaN flag packed into
// one buffer, so the host copies them with a single device-to-host transfer.
#include "common.cuh"

// out[0..k) = vals; out[k..k+slots) = the error table's ints (bit patterns); out[k +
// slots] = 1 if any value is NaN or infinite, else 0. One block of 32 threads.
extern "C" __global__ void step_readout_f32(const float* __restrict__ vals, long long k,
                                            const int* __restrict__ table, int has_table,
                                            long long slots, float* __restrict__ out) {
    int bad = 0;
    for (long long i = threadIdx.x; i < k; i += blockDim.x) {
        float v = vals[i];
        out[i] = v;
        // v - v is 0 for finite v, NaN for NaN and +-inf.
        bad |= (v - v) != 0.0f;
    }
    for (long long i = threadIdx.x; i < slots; i += blockDim.x)
        out[k + i] = __int_as_float(has_table ? table[i] : 0);
    bad = __syncthreads_or(bad);
    if (threadIdx.x == 0) out[k + slots] = bad ? 1.0f : 0.0f;
}
