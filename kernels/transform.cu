// GeneralizedRCNNTransform on the device: normalise, bilinear resize
// (align_corners=False, scale = in/out as PyTorch recomputes it) and write into the
// zero-padded batch, in one pass. Normalising each source pixel before
// interpolating keeps torchvision's order of operations (normalise, then resize).
#include "common.cuh"
#include "detection.cuh"

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

// The batch path from 8-bit images: one launch for the whole batch, reading the one
// buffer the host uploaded (see `detection::transform::upload_u8`):
//   buf = [header: n_images x 8 ints][pixels of image 0][pixels of image 1]...
//   header of image b: {offset low, offset high, H, W, OH, OW, 0, 0}, the offset in
//   bytes from the start of `buf` to its CHW uint8 pixels.
// grid.y = image, grid-stride over x covers its whole [3, PH, PW] slab of `dst`,
// padding included (written as 0), so `dst` needs no memset first.
// Every float operation is the CPU twin's (image_from_u8, then resize_normalize_cpu)
// in the same order, exactly rounded and never contracted into an FMA (det_*), so
// the batch equals the CPU transform bit for bit.
__device__ __forceinline__ float tr_norm(unsigned char v, float mean, float std) {
    return __fdiv_rn(__fsub_rn(__fdiv_rn((float)v, 255.0f), mean), std);
}

extern "C" __global__ void transform_batch_u8(const unsigned char* __restrict__ buf, int n_images,
                                              float* __restrict__ dst, int PH, int PW,
                                              float m0, float m1, float m2, float s0, float s1, float s2) {
    const int b = blockIdx.y;
    if (b >= n_images) return;
    const int* hdr = (const int*)buf + 8 * b;
    const long long off = (long long)(unsigned)hdr[0] | ((long long)hdr[1] << 32);
    const int H = hdr[2], W = hdr[3], OH = hdr[4], OW = hdr[5];
    const unsigned char* img = buf + off;
    const float sh = __fdiv_rn((float)H, (float)OH), sw = __fdiv_rn((float)W, (float)OW);
    const long long n = 3LL * PH * PW;
    float* out = dst + (long long)b * n;
    KESTREL_LOOP(i, n) {
        int ox = (int)(i % PW), oy = (int)((i / PW) % PH), c = (int)(i / ((long long)PW * PH));
        if (ox >= OW || oy >= OH) {
            out[i] = 0.f;
            continue;
        }
        float mean = c == 0 ? m0 : (c == 1 ? m1 : m2);
        float std = c == 0 ? s0 : (c == 1 ? s1 : s2);
        float fy = det_sub(det_mul(sh, (float)oy + 0.5f), 0.5f); if (fy < 0.f) fy = 0.f;
        float fx = det_sub(det_mul(sw, (float)ox + 0.5f), 0.5f); if (fx < 0.f) fx = 0.f;
        int y0 = (int)fy, x0 = (int)fx;
        int y1 = y0 + (y0 < H - 1 ? 1 : 0), x1 = x0 + (x0 < W - 1 ? 1 : 0);
        float ly1 = det_sub(fy, (float)y0), ly0 = det_sub(1.f, ly1);
        float lx1 = det_sub(fx, (float)x0), lx0 = det_sub(1.f, lx1);
        const unsigned char* p = img + (long long)c * H * W;
        float v00 = tr_norm(p[(long long)y0 * W + x0], mean, std), v01 = tr_norm(p[(long long)y0 * W + x1], mean, std);
        float v10 = tr_norm(p[(long long)y1 * W + x0], mean, std), v11 = tr_norm(p[(long long)y1 * W + x1], mean, std);
        float top = det_add(det_mul(lx0, v00), det_mul(lx1, v01));
        float bot = det_add(det_mul(lx0, v10), det_mul(lx1, v11));
        out[i] = det_add(det_mul(ly0, top), det_mul(ly1, bot));
    }
}
