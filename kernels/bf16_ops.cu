// Native bf16 paths of the ops the bf16 model runs between its convolutions: relu
// (forward and backward), add, the per-channel affine of frozen batch norm, the FPN's
// nearest-upsample + add and max pooling. Activations are read and written as bf16,
// arithmetic is f32 and each result is rounded once to nearest even: the same values
// as widening the inputs to f32, running the f32 kernel and rounding its output (the
// reference rule of src/ops/mixed.rs), without the f32 copies. Gradients stay f32.
// Every expression below mirrors its f32 kernel's (elementwise.cu, norm.cu,
// upsample.cu, pool.cu) so that the rounding is all that differs.
#include "common.cuh"
#include "mma.cuh"

// relu keeps the bits of a positive value, else +0 (a NaN gives 0, as the f32 kernel's
// `v > 0`).
extern "C" __global__ void relu_fwd_bf16(const kbf16* __restrict__ x, kbf16* __restrict__ y, long long n) {
    KESTREL_LOOP(i, n) { y[i] = kestrel_bf16_to_f32(x[i]) > 0.f ? x[i] : (kbf16)0; }
}

// dx (f32) = dy (f32) where the saved bf16 output y > 0.
extern "C" __global__ void relu_bwd_bf16(const kbf16* __restrict__ y, const float* __restrict__ gy,
                                         float* __restrict__ gx, long long n) {
    KESTREL_LOOP(i, n) { gx[i] = kestrel_bf16_to_f32(y[i]) > 0.f ? gy[i] : 0.f; }
}

extern "C" __global__ void add_bf16(const kbf16* __restrict__ a, const kbf16* __restrict__ b,
                                    kbf16* __restrict__ y, long long n) {
    KESTREL_LOOP(i, n) { y[i] = kestrel_f32_to_bf16(kestrel_bf16_to_f32(a[i]) + kestrel_bf16_to_f32(b[i])); }
}

// y = x * scale[c] + shift[c] with f32 scale and shift. Grid as channel_affine_f32.
extern "C" __global__ void channel_affine_bf16(const kbf16* __restrict__ x, const float* __restrict__ scale,
                                               const float* __restrict__ shift, kbf16* __restrict__ y,
                                               long long planes, int C, long long hw) {
    for (long long p = blockIdx.y; p < planes; p += gridDim.y) {
        int c = (int)(p % C);
        float a = scale[c], b = shift[c];
        const kbf16* xp = x + p * hw;
        kbf16* yp = y + p * hw;
        for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < hw;
             i += (long long)blockDim.x * gridDim.x)
            yp[i] = kestrel_f32_to_bf16(kestrel_bf16_to_f32(xp[i]) * a + b);
    }
}

// PyTorch's nearest rule, as upsample.cu's upsample_nearest_src.
__device__ __forceinline__ int bf16_nearest_src(int dst, int in, int out) {
    float scale = (float)in / (float)out;
    return min((int)floorf((float)dst * scale), in - 1);
}

extern "C" __global__ void upsample_nearest_add_fwd_bf16(const kbf16* __restrict__ lateral,
                                                         const kbf16* __restrict__ top,
                                                         kbf16* __restrict__ y, long long planes,
                                                         int H, int W, int h, int w) {
    long long hw = (long long)H * W;
    KESTREL_LOOP(i, planes * hw) {
        long long plane = i / hw;
        int r = (int)(i - plane * hw);
        int sr = bf16_nearest_src(r / W, h, H), sc = bf16_nearest_src(r % W, w, W);
        y[i] = kestrel_f32_to_bf16(kestrel_bf16_to_f32(lateral[i]) +
                                   kestrel_bf16_to_f32(top[plane * h * (long long)w + sr * w + sc]));
    }
}

// As pool.cu's max_pool2d_window on bf16 values (the maximum of bf16 values is one of
// them, so no rounding happens).
__device__ __forceinline__ kbf16 bf16_max_window(const kbf16* __restrict__ xp, int H, int W, int oh,
                                                 int ow, int kh, int kw, int sh, int sw, int ph,
                                                 int pw, int* arg) {
    int h0 = oh * sh - ph, w0 = ow * sw - pw;
    int h1 = min(h0 + kh, H), w1 = min(w0 + kw, W);
    h0 = max(h0, 0);
    w0 = max(w0, 0);
    int a = h0 * W + w0;
    float best = kestrel_bf16_to_f32(xp[a]);
    for (int ih = h0; ih < h1; ++ih) {
        for (int iw = w0; iw < w1; ++iw) {
            float v = kestrel_bf16_to_f32(xp[ih * W + iw]);
            if (v > best || v != v) { best = v; a = ih * W + iw; }
        }
    }
    *arg = a;
    return xp[a];
}

extern "C" __global__ void max_pool2d_fwd_bf16(const kbf16* __restrict__ x, kbf16* __restrict__ y,
                                               long long planes, int H, int W, int OH, int OW,
                                               int kh, int kw, int sh, int sw, int ph, int pw) {
    long long ohw = (long long)OH * OW;
    KESTREL_LOOP(i, planes * ohw) {
        long long plane = i / ohw;
        int r = (int)(i - plane * ohw);
        int a;
        y[i] = bf16_max_window(x + plane * H * (long long)W, H, W, r / OW, r % OW, kh, kw, sh, sw,
                               ph, pw, &a);
    }
}

// Also stores the argmax (plane index, i64): the backward is pool.cu's f32 one.
extern "C" __global__ void max_pool2d_fwd_idx_bf16(const kbf16* __restrict__ x, kbf16* __restrict__ y,
                                                   long long* __restrict__ idx, long long planes,
                                                   int H, int W, int OH, int OW, int kh, int kw,
                                                   int sh, int sw, int ph, int pw) {
    long long ohw = (long long)OH * OW;
    KESTREL_LOOP(i, planes * ohw) {
        long long plane = i / ohw;
        int r = (int)(i - plane * ohw);
        int a;
        y[i] = bf16_max_window(x + plane * H * (long long)W, H, W, r / OW, r % OW, kh, kw, sh, sw,
                               ph, pw, &a);
        idx[i] = a;
    }
}
