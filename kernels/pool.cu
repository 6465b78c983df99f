// max_pool2d (PyTorch semantics: -inf padding, floor output size, first maximum in
// row-major window order wins, a NaN always wins). f32, NCHW contiguous.
#include "common.cuh"

// Max over the window of output (oh, ow) in one input plane; writes the winner's
// flat plane index ih * W + iw to *arg.
__device__ __forceinline__ float max_pool2d_window(const float* __restrict__ xp, int H, int W,
                                                   int oh, int ow, int kh, int kw, int sh, int sw,
                                                   int ph, int pw, int* arg) {
    int h0 = oh * sh - ph, w0 = ow * sw - pw;
    int h1 = min(h0 + kh, H), w1 = min(w0 + kw, W);
    h0 = max(h0, 0);
    w0 = max(w0, 0);
    // Starting from the window's first value equals PyTorch's start from -inf (the
    // window is never empty: padding is at most half the kernel).
    int a = h0 * W + w0;
    float best = xp[a];
    for (int ih = h0; ih < h1; ++ih) {
        for (int iw = w0; iw < w1; ++iw) {
            float v = xp[ih * W + iw];
            if (v > best || v != v) { best = v; a = ih * W + iw; }
        }
    }
    *arg = a;
    return best;
}

// One thread per output element: y [planes, OH, OW] from x [planes, H, W].
extern "C" __global__ void max_pool2d_fwd_f32(const float* __restrict__ x, float* __restrict__ y,
                                              long long planes, int H, int W, int OH, int OW,
                                              int kh, int kw, int sh, int sw, int ph, int pw) {
    long long ohw = (long long)OH * OW;
    KESTREL_LOOP(i, planes * ohw) {
        long long plane = i / ohw;
        int r = (int)(i - plane * ohw);
        int a;
        y[i] = max_pool2d_window(x + plane * H * (long long)W, H, W, r / OW, r % OW, kh, kw, sh,
                                 sw, ph, pw, &a);
    }
}

// As max_pool2d_fwd_f32, also storing the argmax (plane index, i64) for the backward.
extern "C" __global__ void max_pool2d_fwd_idx_f32(const float* __restrict__ x, float* __restrict__ y,
                                                  long long* __restrict__ idx, long long planes,
                                                  int H, int W, int OH, int OW, int kh, int kw,
                                                  int sh, int sw, int ph, int pw) {
    long long ohw = (long long)OH * OW;
    KESTREL_LOOP(i, planes * ohw) {
        long long plane = i / ohw;
        int r = (int)(i - plane * ohw);
        int a;
        y[i] = max_pool2d_window(x + plane * H * (long long)W, H, W, r / OW, r % OW, kh, kw, sh,
                                 sw, ph, pw, &a);
        idx[i] = a;
    }
}

// One thread per input element: gathers gy from every window that covers it and
// chose it as argmax (no atomics; deterministic).
extern "C" __global__ void max_pool2d_bwd_f32(const float* __restrict__ gy,
                                              const long long* __restrict__ idx,
                                              float* __restrict__ gx, long long planes, int H,
                                              int W, int OH, int OW, int kh, int kw, int sh,
                                              int sw, int ph, int pw) {
    long long hw = (long long)H * W, ohw = (long long)OH * OW;
    KESTREL_LOOP(i, planes * hw) {
        long long plane = i / hw;
        int r = (int)(i - plane * hw);
        int ih = r / W, iw = r % W;
        // Outputs whose window [o * s - p, o * s - p + k) contains ih.
        int oh0 = ih + ph < kh ? 0 : (ih + ph - kh) / sh + 1;
        int oh1 = min((ih + ph) / sh + 1, OH);
        int ow0 = iw + pw < kw ? 0 : (iw + pw - kw) / sw + 1;
        int ow1 = min((iw + pw) / sw + 1, OW);
        const float* g = gy + plane * ohw;
        const long long* a = idx + plane * ohw;
        float acc = 0.f;
        for (int oh = oh0; oh < oh1; ++oh)
            for (int ow = ow0; ow < ow1; ++ow)
                if (a[oh * OW + ow] == r) acc += g[oh * OW + ow];
        gx[i] = acc;
    }
}
