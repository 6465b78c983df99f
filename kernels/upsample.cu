// upsample_nearest_add: y = lateral + nearest_upsample(top) (the FPN top-down step).
// PyTorch's nearest rule: src = min(floor(dst * (in / out)), in - 1), in f32.
// f32, NCHW contiguous.
#include "common.cuh"

__device__ __forceinline__ int upsample_nearest_src(int dst, int in, int out) {
    float scale = (float)in / (float)out;
    return min((int)floorf((float)dst * scale), in - 1);
}

// Smallest output index whose source is >= s (out when none). The source index is
// non-decreasing in the output index; start from the exact-arithmetic guess and step
// to where the f32 rule really crosses, so the result agrees with the forward.
__device__ __forceinline__ int upsample_nearest_first_dst(int s, int in, int out) {
    int d = (int)min((long long)s * out / in, (long long)out);
    while (d > 0 && upsample_nearest_src(d - 1, in, out) >= s) --d;
    while (d < out && upsample_nearest_src(d, in, out) < s) ++d;
    return d;
}

// One thread per output element: y [planes, H, W] = lateral + top [planes, h, w] at
// the nearest source pixel.
extern "C" __global__ void upsample_nearest_add_fwd_f32(const float* __restrict__ lateral,
                                                        const float* __restrict__ top,
                                                        float* __restrict__ y, long long planes,
                                                        int H, int W, int h, int w) {
    long long hw = (long long)H * W;
    KESTREL_LOOP(i, planes * hw) {
        long long plane = i / hw;
        int r = (int)(i - plane * hw);
        int sr = upsample_nearest_src(r / W, h, H), sc = upsample_nearest_src(r % W, w, W);
        y[i] = lateral[i] + top[plane * h * (long long)w + sr * w + sc];
    }
}

// One thread per top pixel: gtop [planes, h, w] gathers gy [planes, H, W] over the
// output rectangle copied from it (no atomics; deterministic).
extern "C" __global__ void upsample_nearest_bwd_f32(const float* __restrict__ gy,
                                                    float* __restrict__ gtop, long long planes,
                                                    int H, int W, int h, int w) {
    long long thw = (long long)h * w;
    KESTREL_LOOP(i, planes * thw) {
        long long plane = i / thw;
        int r = (int)(i - plane * thw);
        int sr = r / w, sc = r % w;
        int r0 = upsample_nearest_first_dst(sr, h, H), r1 = upsample_nearest_first_dst(sr + 1, h, H);
        int c0 = upsample_nearest_first_dst(sc, w, W), c1 = upsample_nearest_first_dst(sc + 1, w, W);
        const float* g = gy + plane * H * (long long)W;
        float acc = 0.f;
        for (int dr = r0; dr < r1; ++dr)
            for (int dc = c0; dc < c1; ++dc) acc += g[dr * W + dc];
        gtop[i] = acc;
    }
}
