// GeneralizedRCNNTransform on the device: normalise, bilinear resize
// (align_corners=False, scale = in/out as PyTorch recomputes it) and write into the
// zero-padded batch, in one pass. Normalising each source pixel before
// interpolating keeps torchvision's order of operations (normalise, then resize).
#include "common.cuh"

// src: [3, H, W] in 0..1; dst: batch [N, 3, PH, PW], image written at index `b`.
extern "C" __global__ void resize_normalize_f32(const float* __restrict__ src, int H, int W,
                                                float* __restrict__ dst, int b, int OH, int OW, int PH, int PW,
                                                float m0, float m1, float m2, float s0, float s1, float s2) {
    const float sh = (float)H / (float)OH, sw = (float)W / (float)OW;
    const long long n = 3LL * OH * OW;
    KESTREL_LOOP(i, n) {
        int ox = (int)(i % OW), oy = (int)((i / OW) % OH), c = (int)(i / ((long long)OW * OH));
        float mean = c == 0 ? m0 : (c == 1 ? m1 : m2);
        float std = c == 0 ? s0 : (c == 1 ? s1 : s2);
        float fy = sh * (oy + 0.5f) - 0.5f; if (fy < 0.f) fy = 0.f;
        float fx = sw * (ox + 0.5f) - 0.5f; if (fx < 0.f) fx = 0.f;
        int y0 = (int)fy, x0 = (int)fx;
        int y1 = y0 + (y0 < H - 1 ? 1 : 0), x1 = x0 + (x0 < W - 1 ? 1 : 0);
        float ly1 = fy - y0, ly0 = 1.f - ly1, lx1 = fx - x0, lx0 = 1.f - lx1;
        const float* p = src + (long long)c * H * W;
        float v00 = (p[(long long)y0 * W + x0] - mean) / std, v01 = (p[(long long)y0 * W + x1] - mean) / std;
        float v10 = (p[(long long)y1 * W + x0] - mean) / std, v11 = (p[(long long)y1 * W + x1] - mean) / std;
        float v = ly0 * (lx0 * v00 + lx1 * v01) + ly1 * (lx0 * v10 + lx1 * v11);
        dst[(((long long)b * 3 + c) * PH + oy) * PW + ox] = v;
    }
}
