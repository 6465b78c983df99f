// conv2d by im2col + GEMM (the GEMM lives in matmul.cu). f32, NCHW, groups = 1.
//
// The im2col matrix of one image is [Cin * kh * kw, OH * OW], row r = (c * kh + ki) * kw + kj,
// column p = oh * OW + ow, holding x[c, oh * sh - ph + ki * dh, ow * sw - pw + kj * dw]
// (zero where that falls in the padding). Both kernels work on `images` consecutive
// images at once: x holds [images, Cin, H, W] and col [images, K, OH * OW].
#include "common.cuh"

// col[img, r, p] from x (one thread per column element, grid-stride).
extern "C" __global__ void conv2d_im2col_f32(
        const float* __restrict__ x, float* __restrict__ col, int Cin, int H, int W, int kh,
        int kw, int sh, int sw, int ph, int pw, int dh, int dw, int OH, int OW, int images) {
    long long ohw = (long long)OH * OW;
    long long K = (long long)Cin * kh * kw;
    KESTREL_LOOP(i, K * ohw * images) {
        long long p = i % ohw;
        long long r = (i / ohw) % K;
        long long img = i / (ohw * K);
        int kj = (int)(r % kw), ki = (int)((r / kw) % kh), c = (int)(r / ((long long)kw * kh));
        int oh = (int)(p / OW), ow = (int)(p % OW);
        int ih = oh * sh - ph + ki * dh, iw = ow * sw - pw + kj * dw;
        float v = 0.f;
        if (ih >= 0 && ih < H && iw >= 0 && iw < W)
            v = x[((img * Cin + c) * H + ih) * (long long)W + iw];
        col[i] = v;
    }
}

// x[img, c, ih, iw] = sum of the col entries that im2col copied from it: a gather
// over the kernel taps (each input element is written by one thread, so no atomics
// and a deterministic sum).
extern "C" __global__ void conv2d_col2im_f32(
        const float* __restrict__ col, float* __restrict__ x, int Cin, int H, int W, int kh,
        int kw, int sh, int sw, int ph, int pw, int dh, int dw, int OH, int OW, int images) {
    long long ohw = (long long)OH * OW;
    long long K = (long long)Cin * kh * kw;
    KESTREL_LOOP(i, (long long)images * Cin * H * W) {
        int iw = (int)(i % W);
        int ih = (int)((i / W) % H);
        int c = (int)((i / ((long long)W * H)) % Cin);
        long long img = i / ((long long)W * H * Cin);
        const float* cimg = col + img * K * ohw;
        float acc = 0.f;
        for (int ki = 0; ki < kh; ++ki) {
            int th = ih + ph - ki * dh;  // = oh * sh when this tap reads (ih, .)
            if (th < 0 || th % sh != 0) continue;
            int oh = th / sh;
            if (oh >= OH) continue;
            for (int kj = 0; kj < kw; ++kj) {
                int tw = iw + pw - kj * dw;
                if (tw < 0 || tw % sw != 0) continue;
                int ow = tw / sw;
                if (ow >= OW) continue;
                long long r = ((long long)c * kh + ki) * kw + kj;
                acc += cimg[r * ohw + (long long)oh * OW + ow];
            }
        }
        x[i] = acc;
    }
}
