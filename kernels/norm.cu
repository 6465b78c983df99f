// Batch normalisation over channels of [N, C, *] (frozen, eval and training).
// f32, contiguous; a "plane" is one (n, c) pair of hw values. Channel reductions run
// in two stages, per-block partials then one thread per channel merging them in a
// fixed order, so results are deterministic for a given shape.
#include "common.cuh"

// ---- helpers -------------------------------------------------------------------

// Chan et al.'s merge of Welford states (count, mean, M2): b into a.
__device__ __forceinline__ void norm_welford_merge(float& n, float& mean, float& m2, float nb,
                                                   float meanb, float m2b) {
    if (nb == 0.f) return;
    float nt = n + nb;
    float d = meanb - mean, f = nb / nt;
    mean += d * f;
    m2 += m2b + d * d * n * f;
    n = nt;
}

// Merge the Welford states of the whole block into thread 0's. `sh` holds 3 * 32
// floats of shared memory; blockDim.x must be a multiple of 32.
__device__ __forceinline__ void norm_welford_block(float& n, float& mean, float& m2, float* sh) {
    for (int o = 16; o > 0; o >>= 1) {
        float nb = __shfl_xor_sync(0xffffffffu, n, o);
        float mb = __shfl_xor_sync(0xffffffffu, mean, o);
        float qb = __shfl_xor_sync(0xffffffffu, m2, o);
        norm_welford_merge(n, mean, m2, nb, mb, qb);
    }
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    if (lane == 0) { sh[warp] = n; sh[32 + warp] = mean; sh[64 + warp] = m2; }
    __syncthreads();
    if (threadIdx.x == 0) {
        n = sh[0]; mean = sh[32]; m2 = sh[64];
        for (int w = 1; w < nwarps; ++w) norm_welford_merge(n, mean, m2, sh[w], sh[32 + w], sh[64 + w]);
    }
}

// ---- forward -------------------------------------------------------------------

// Per channel: invstd = 1 / sqrt(var + eps), scale = w / sqrt(var + eps),
// shift = b - mean * scale (torchvision's FrozenBatchNorm2d order).
extern "C" __global__ void norm_scale_shift_f32(const float* __restrict__ w, const float* __restrict__ b,
                                                const float* __restrict__ mean, const float* __restrict__ var,
                                                float* __restrict__ invstd, float* __restrict__ scale,
                                                float* __restrict__ shift, float eps, int C) {
    KESTREL_LOOP(c, C) {
        float s = sqrtf(var[c] + eps);
        float a = w[c] / s;
        invstd[c] = 1.f / s;
        scale[c] = a;
        shift[c] = b[c] - mean[c] * a;
    }
}

// y = x * scale[c] + shift[c]. Grid: y walks planes, x and threads walk a plane.
extern "C" __global__ void channel_affine_f32(const float* __restrict__ x, const float* __restrict__ scale,
                                              const float* __restrict__ shift, float* __restrict__ y,
                                              long long planes, int C, long long hw) {
    for (long long p = blockIdx.y; p < planes; p += gridDim.y) {
        int c = (int)(p % C);
        float a = scale[c], b = shift[c];
        const float* xp = x + p * hw;
        float* yp = y + p * hw;
        for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < hw;
             i += (long long)blockDim.x * gridDim.x)
            yp[i] = xp[i] * a + b;
    }
}

// Stage 1 of the batch statistics. Grid (C, parts): block (c, k) takes, in every
// batch item, the values k * blockDim.x + t, stepping parts * blockDim.x; it writes
// its Welford state (count, mean, M2) to partial[(c * parts + k) * 3 ..].
extern "C" __global__ void batch_norm_stats_partial_f32(const float* __restrict__ x, float* __restrict__ partial,
                                                        long long N, int C, long long hw, int parts) {
    __shared__ float sh[96];
    int c = blockIdx.x, k = blockIdx.y;
    float n = 0.f, mean = 0.f, m2 = 0.f;
    for (long long b = 0; b < N; ++b) {
        const float* xp = x + (b * C + c) * hw;
        for (long long i = (long long)k * blockDim.x + threadIdx.x; i < hw; i += (long long)parts * blockDim.x) {
            float v = xp[i];
            n += 1.f;
            float d = v - mean;
            mean += d / n;
            m2 += d * (v - mean);
        }
    }
    norm_welford_block(n, mean, m2, sh);
    if (threadIdx.x == 0) {
        float* out = partial + ((long long)c * parts + k) * 3;
        out[0] = n; out[1] = mean; out[2] = m2;
    }
}

// Stage 2: one thread per channel merges its partials (in double, in order) into the
// batch mean and biased variance, and updates the running statistics with the
// unbiased variance: r' = momentum * batch + (1 - momentum) * r.
extern "C" __global__ void batch_norm_stats_final_f32(const float* __restrict__ partial,
                                                      const float* __restrict__ rm, const float* __restrict__ rv,
                                                      float* __restrict__ mean_out, float* __restrict__ var_out,
                                                      float* __restrict__ rm_out, float* __restrict__ rv_out,
                                                      float momentum, long long M, int C, int parts) {
    KESTREL_LOOP(c, C) {
        double n = 0.0, mean = 0.0, m2 = 0.0;
        for (int k = 0; k < parts; ++k) {
            const float* p = partial + ((long long)c * parts + k) * 3;
            double nb = p[0];
            if (nb == 0.0) continue;
            double nt = n + nb, d = (double)p[1] - mean, f = nb / nt;
            mean += d * f;
            m2 += (double)p[2] + d * d * n * f;
            n = nt;
        }
        float bm = (float)mean;
        mean_out[c] = bm;
        var_out[c] = (float)(m2 / (double)M);
        float unbiased = (float)(m2 / (double)(M - 1));
        rm_out[c] = momentum * bm + (1.f - momentum) * rm[c];
        rv_out[c] = momentum * unbiased + (1.f - momentum) * rv[c];
    }
}

// ---- backward ------------------------------------------------------------------

// Stage 1 of the gradient sums: block (c, k) as in batch_norm_stats_partial_f32
// writes (sum gy, sum gy * (x - mean[c])) to partial[(c * parts + k) * 2 ..].
extern "C" __global__ void batch_norm_grad_partial_f32(const float* __restrict__ x, const float* __restrict__ gy,
                                                       const float* __restrict__ mean, float* __restrict__ partial,
                                                       long long N, int C, long long hw, int parts) {
    __shared__ float scratch[2][32];
    int c = blockIdx.x, k = blockIdx.y;
    float mu = mean[c], s1 = 0.f, s2 = 0.f;
    for (long long b = 0; b < N; ++b) {
        long long base = (b * C + c) * hw;
        for (long long i = (long long)k * blockDim.x + threadIdx.x; i < hw; i += (long long)parts * blockDim.x) {
            float g = gy[base + i];
            s1 += g;
            s2 += g * (x[base + i] - mu);
        }
    }
    s1 = kestrel_block_sum(s1, scratch[0]);
    s2 = kestrel_block_sum(s2, scratch[1]);
    if (threadIdx.x == 0) {
        float* out = partial + ((long long)c * parts + k) * 2;
        out[0] = s1; out[1] = s2;
    }
}

// Stage 2: per channel, gw = S2 * invstd, gb = S1, k1 = S1 / M,
// k2 = S2 * invstd^2 / M (S1 = sum gy, S2 = sum gy * (x - mean)).
extern "C" __global__ void batch_norm_grad_final_f32(const float* __restrict__ partial, const float* __restrict__ invstd,
                                                     float* __restrict__ gw, float* __restrict__ gb,
                                                     float* __restrict__ k1, float* __restrict__ k2,
                                                     long long M, int C, int parts) {
    KESTREL_LOOP(c, C) {
        double s1 = 0.0, s2 = 0.0;
        for (int k = 0; k < parts; ++k) {
            const float* p = partial + ((long long)c * parts + k) * 2;
            s1 += p[0];
            s2 += p[1];
        }
        double inv = invstd[c];
        gw[c] = (float)(s2 * inv);
        gb[c] = (float)s1;
        k1[c] = (float)(s1 / (double)M);
        k2[c] = (float)(s2 * inv * inv / (double)M);
    }
}

// gx = scale[c] * (gy - k1[c] - (x - mean[c]) * k2[c]): the backward through the
// batch statistics. Grid as channel_affine_f32.
extern "C" __global__ void batch_norm_bwd_x_f32(const float* __restrict__ x, const float* __restrict__ gy,
                                                const float* __restrict__ mean, const float* __restrict__ scale,
                                                const float* __restrict__ k1, const float* __restrict__ k2,
                                                float* __restrict__ gx, long long planes, int C, long long hw) {
    for (long long p = blockIdx.y; p < planes; p += gridDim.y) {
        int c = (int)(p % C);
        float mu = mean[c], a = scale[c], t1 = k1[c], t2 = k2[c];
        const float* xp = x + p * hw;
        const float* gp = gy + p * hw;
        float* op = gx + p * hw;
        for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < hw;
             i += (long long)blockDim.x * gridDim.x)
            op[i] = a * (gp[i] - t1 - (xp[i] - mu) * t2);
    }
}
