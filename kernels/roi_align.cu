// RoIAlign forward and backward (torchvision's semantics, see src/ops/roi_align.rs),
// on one feature map and across up to four FPN levels (MultiScaleRoIAlign) in one
// launch. f32; one thread per output element (forward). The backward is
// deterministic, unlike torchvision's (whose CUDA kernel scatters with atomicAdd, in
// an order that changes from run to run): one thread per gradient plane (image,
// channel, level) accumulates every contribution to it in a fixed order (RoIs by
// index, bins and samples row-major, the four taps), with no atomics, so two runs
// give the same bits.
#include "common.cuh"

// Most samples per axis per bin (MAX_GRID in src/ops/roi_align.rs).
#define ROI_ALIGN_MAX_GRID 4096

// ----------------------------------------------------------------------------------
// Device helpers
// ----------------------------------------------------------------------------------

// One RoI in feature-map coordinates. `valid` is false for a non-finite box or a
// batch index outside [0, n): such a RoI pools zeros and gets no gradient (the CPU
// path reports the bad batch index as an error; here that would need a host sync).
struct RoiGeom {
    int batch;
    float start_h, start_w, bin_h, bin_w;
    int grid_h, grid_w;
    float count;
    bool valid;
};

__device__ __forceinline__ bool roi_finite(float v) { return v - v == 0.f; }

// Samples per axis: the explicit ratio, or ceil(roi_size / bins) clamped to [0, MAX].
__device__ __forceinline__ int roi_grid(int ratio, float roi_size, int bins) {
    if (ratio > 0) return ratio;
    float g = ceilf(roi_size / (float)bins);
    if (g >= (float)ROI_ALIGN_MAX_GRID) return ROI_ALIGN_MAX_GRID;
    return g > 0.f ? (int)g : 0;  // NaN -> 0
}

__device__ RoiGeom roi_geom(const float* roi, int n, float scale, int ph, int pw,
                            int sampling_ratio, int aligned) {
    RoiGeom g;
    g.valid = false;
    float b = roi[0];
    if (!(b - b == 0.f)) return g;  // NaN or infinite batch index
    float bt = truncf(b);
    if (bt < 0.f || bt >= (float)n) return g;
    g.batch = (int)bt;
    float offset = aligned ? 0.5f : 0.f;
    g.start_w = roi[1] * scale - offset;
    g.start_h = roi[2] * scale - offset;
    float end_w = roi[3] * scale - offset;
    float end_h = roi[4] * scale - offset;
    if (!(roi_finite(g.start_w) && roi_finite(g.start_h) && roi_finite(end_w) && roi_finite(end_h)))
        return g;
    float roi_w = end_w - g.start_w;
    float roi_h = end_h - g.start_h;
    if (!aligned) {  // force malformed RoIs to be 1x1
        roi_w = fmaxf(roi_w, 1.f);
        roi_h = fmaxf(roi_h, 1.f);
    }
    g.bin_h = roi_h / (float)ph;
    g.bin_w = roi_w / (float)pw;
    g.grid_h = roi_grid(sampling_ratio, roi_h, ph);
    g.grid_w = roi_grid(sampling_ratio, roi_w, pw);
    int cnt = g.grid_h * g.grid_w;  // <= MAX^2 = 2^24: no overflow
    g.count = (float)(cnt > 1 ? cnt : 1);
    g.valid = true;
    return g;
}

// Bilinear taps of one sample (torchvision's bilinear_interpolate[_gradient]).
// Returns false when the sample lies outside [-1, H] x [-1, W] (it then contributes 0).
__device__ __forceinline__ bool roi_taps(int H, int W, float y, float x, int& y_low, int& y_high,
                                         int& x_low, int& x_high, float& w1, float& w2,
                                         float& w3, float& w4) {
    // Written as !(inside) so that NaN takes this branch.
    if (!(y >= -1.f && y <= (float)H && x >= -1.f && x <= (float)W)) return false;
    if (y <= 0.f) y = 0.f;
    if (x <= 0.f) x = 0.f;
    y_low = (int)y;
    x_low = (int)x;
    if (y_low >= H - 1) {
        y_high = y_low = H - 1;
        y = (float)y_low;
    } else {
        y_high = y_low + 1;
    }
    if (x_low >= W - 1) {
        x_high = x_low = W - 1;
        x = (float)x_low;
    } else {
        x_high = x_low + 1;
    }
    float ly = y - (float)y_low, lx = x - (float)x_low;
    float hy = 1.f - ly, hx = 1.f - lx;
    w1 = hy * hx;
    w2 = hy * lx;
    w3 = ly * hx;
    w4 = ly * lx;
    return true;
}

// Average of the bin (ph_i, pw_i) of RoI `g` over `plane` [H, W].
__device__ float roi_pool_bin(const float* __restrict__ plane, int H, int W, const RoiGeom& g,
                              int ph_i, int pw_i) {
    float acc = 0.f;
    for (int iy = 0; iy < g.grid_h; ++iy) {
        float y = g.start_h + ph_i * g.bin_h + ((float)iy + .5f) * g.bin_h / (float)g.grid_h;
        for (int ix = 0; ix < g.grid_w; ++ix) {
            float x = g.start_w + pw_i * g.bin_w + ((float)ix + .5f) * g.bin_w / (float)g.grid_w;
            int yl, yh, xl, xh;
            float w1, w2, w3, w4;
            if (!roi_taps(H, W, y, x, yl, yh, xl, xh, w1, w2, w3, w4)) continue;
            acc += w1 * plane[(long long)yl * W + xl] + w2 * plane[(long long)yl * W + xh] +
                   w3 * plane[(long long)yh * W + xl] + w4 * plane[(long long)yh * W + xh];
        }
    }
    return acc / g.count;
}

// Add dL/d(bin) `grad` of bin (ph_i, pw_i) of RoI `g` into `plane` [H, W], which
// only the calling thread writes.
__device__ void roi_scatter_bin(float* plane, int H, int W, const RoiGeom& g, int ph_i, int pw_i,
                                float grad) {
    for (int iy = 0; iy < g.grid_h; ++iy) {
        float y = g.start_h + ph_i * g.bin_h + ((float)iy + .5f) * g.bin_h / (float)g.grid_h;
        for (int ix = 0; ix < g.grid_w; ++ix) {
            float x = g.start_w + pw_i * g.bin_w + ((float)ix + .5f) * g.bin_w / (float)g.grid_w;
            int yl, yh, xl, xh;
            float w1, w2, w3, w4;
            if (!roi_taps(H, W, y, x, yl, yh, xl, xh, w1, w2, w3, w4)) continue;
            plane[(long long)yl * W + xl] += grad * w1 / g.count;
            plane[(long long)yl * W + xh] += grad * w2 / g.count;
            plane[(long long)yh * W + xl] += grad * w3 / g.count;
            plane[(long long)yh * W + xh] += grad * w4 / g.count;
        }
    }
}

// torchvision's LevelMapper: floor(lvl0 + log2(sqrt(area) / s0) + 1e-6) clamped to
// [k_min, k_max], minus k_min. -1 (no level: the RoI pools zeros) when that is NaN,
// e.g. for an inverted box (negative area).
__device__ __forceinline__ int roi_level(const float* roi, int k_min, int k_max,
                                         float canonical_scale, float canonical_level) {
    float area = (roi[3] - roi[1]) * (roi[4] - roi[2]);
    float lvl = floorf(canonical_level + log2f(sqrtf(area) / canonical_scale) + 1e-6f);
    if (lvl != lvl) return -1;
    lvl = fminf(fmaxf(lvl, (float)k_min), (float)k_max);
    return (int)lvl - k_min;
}

// ----------------------------------------------------------------------------------
// One feature map: input [N, C, H, W], rois [K, 5], y [K, C, ph, pw]
// ----------------------------------------------------------------------------------

extern "C" __global__ void roi_align_fwd_f32(const float* __restrict__ input,
                                             const float* __restrict__ rois, long long K, int N,
                                             int C, int H, int W, int ph, int pw,
                                             float spatial_scale, int sampling_ratio,
                                             int aligned, float* __restrict__ y,
                                             long long total) {
    KESTREL_LOOP(i, total) {
        int pw_i = (int)(i % pw);
        int ph_i = (int)((i / pw) % ph);
        int c = (int)((i / ((long long)pw * ph)) % C);
        long long k = i / ((long long)pw * ph * C);
        RoiGeom g = roi_geom(rois + k * 5, N, spatial_scale, ph, pw, sampling_ratio, aligned);
        float v = 0.f;
        if (g.valid) {
            const float* plane = input + ((long long)g.batch * C + c) * H * W;
            v = roi_pool_bin(plane, H, W, g, ph_i, pw_i);
        }
        y[i] = v;
    }
}

// All bins of RoI `g` for channel `c` from gy [K, C, ph, pw] into `plane`.
__device__ void roi_scatter_roi(float* plane, int H, int W, const RoiGeom& g, const float* __restrict__ gy,
                                long long k, int C, int c, int ph, int pw) {
    const float* gk = gy + ((long long)k * C + c) * ph * pw;
    for (int ph_i = 0; ph_i < ph; ++ph_i)
        for (int pw_i = 0; pw_i < pw; ++pw_i) roi_scatter_bin(plane, H, W, g, ph_i, pw_i, gk[ph_i * pw + pw_i]);
}

// gin [N, C, H, W] must be zero-filled. One thread per plane (n, c), `planes` = N * C.
extern "C" __global__ void roi_align_bwd_f32(const float* __restrict__ gy,
                                             const float* __restrict__ rois, long long K, int N,
                                             int C, int H, int W, int ph, int pw,
                                             float spatial_scale, int sampling_ratio,
                                             int aligned, float* __restrict__ gin, long long planes) {
    KESTREL_LOOP(pl, planes) {
        int n = (int)(pl / C), c = (int)(pl % C);
        float* plane = gin + pl * H * W;
        for (long long k = 0; k < K; ++k) {
            RoiGeom g = roi_geom(rois + k * 5, N, spatial_scale, ph, pw, sampling_ratio, aligned);
            if (!g.valid || g.batch != n) continue;
            roi_scatter_roi(plane, H, W, g, gy, k, C, c, ph, pw);
        }
    }
}

// ----------------------------------------------------------------------------------
// MultiScaleRoIAlign: up to four levels f0..f3 [N, C, H_l, W_l] with scales s0..s3
// (levels past `levels` are ignored). Each RoI's level comes from its box (roi_level).
// ----------------------------------------------------------------------------------

// Rows [n, 5] of `rois` from `boxes` [n, 4] with batch index `batch` (one launch per
// image; `rois` points at the first row of that image).
extern "C" __global__ void roi_align_pack_rois_f32(const float* __restrict__ boxes, long long n,
                                                   float batch, float* __restrict__ rois) {
    KESTREL_LOOP(i, n * 5) {
        long long r = i / 5;
        int j = (int)(i % 5);
        rois[i] = j == 0 ? batch : boxes[r * 4 + j - 1];
    }
}

__device__ __forceinline__ void roi_pick_level(int l, const float* f0, const float* f1,
                                               const float* f2, const float* f3, int H0, int H1,
                                               int H2, int H3, int W0, int W1, int W2, int W3,
                                               float s0, float s1, float s2, float s3,
                                               const float*& f, int& H, int& W, float& s) {
    f = l == 0 ? f0 : l == 1 ? f1 : l == 2 ? f2 : f3;
    H = l == 0 ? H0 : l == 1 ? H1 : l == 2 ? H2 : H3;
    W = l == 0 ? W0 : l == 1 ? W1 : l == 2 ? W2 : W3;
    s = l == 0 ? s0 : l == 1 ? s1 : l == 2 ? s2 : s3;
}

extern "C" __global__ void multiscale_roi_align_fwd_f32(
    const float* __restrict__ f0, const float* __restrict__ f1, const float* __restrict__ f2,
    const float* __restrict__ f3, int H0, int H1, int H2, int H3, int W0, int W1, int W2, int W3,
    float s0, float s1, float s2, float s3, int levels, int k_min, float canonical_scale,
    float canonical_level, const float* __restrict__ rois, long long K, int N, int C, int ph,
    int pw, int sampling_ratio, int aligned, float* __restrict__ y, long long total) {
    KESTREL_LOOP(i, total) {
        int pw_i = (int)(i % pw);
        int ph_i = (int)((i / pw) % ph);
        int c = (int)((i / ((long long)pw * ph)) % C);
        long long k = i / ((long long)pw * ph * C);
        const float* roi = rois + k * 5;
        int l = roi_level(roi, k_min, k_min + levels - 1, canonical_scale, canonical_level);
        float v = 0.f;
        if (l >= 0) {
            const float* f;
            int H, W;
            float s;
            roi_pick_level(l, f0, f1, f2, f3, H0, H1, H2, H3, W0, W1, W2, W3, s0, s1, s2, s3, f,
                           H, W, s);
            RoiGeom g = roi_geom(roi, N, s, ph, pw, sampling_ratio, aligned);
            if (g.valid) v = roi_pool_bin(f + ((long long)g.batch * C + c) * H * W, H, W, g, ph_i, pw_i);
        }
        y[i] = v;
    }
}

// g0..g3 (shaped like f0..f3) must be zero-filled. One thread per plane (level,
// n, c), `planes` = levels * N * C.
extern "C" __global__ void multiscale_roi_align_bwd_f32(
    const float* __restrict__ gy, float* g0, float* g1, float* g2, float* g3, int H0, int H1,
    int H2, int H3, int W0, int W1, int W2, int W3, float s0, float s1, float s2, float s3,
    int levels, int k_min, float canonical_scale, float canonical_level,
    const float* __restrict__ rois, long long K, int N, int C, int ph, int pw, int sampling_ratio,
    int aligned, long long planes) {
    KESTREL_LOOP(pl, planes) {
        int l = (int)(pl / ((long long)N * C));
        int n = (int)((pl / C) % N), c = (int)(pl % C);
        const float* gf;
        int H, W;
        float s;
        roi_pick_level(l, g0, g1, g2, g3, H0, H1, H2, H3, W0, W1, W2, W3, s0, s1, s2, s3, gf, H,
                       W, s);
        float* plane = (float*)gf + ((long long)n * C + c) * H * W;
        for (long long k = 0; k < K; ++k) {
            const float* roi = rois + k * 5;
            if (roi_level(roi, k_min, k_min + levels - 1, canonical_scale, canonical_level) != l) continue;
            RoiGeom g = roi_geom(roi, N, s, ph, pw, sampling_ratio, aligned);
            if (!g.valid || g.batch != n) continue;
            roi_scatter_roi(plane, H, W, g, gy, k, C, c, ph, pw);
        }
    }
}
