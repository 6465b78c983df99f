// BoxCoder encode / decode (torchvision's detection/_utils.py), operation by
// operation in f32 with no FMA contraction. (x1, y1, x2, y2) boxes in pixels.
#include "detection.cuh"

// out[i] = (dx, dy, dw, dh) of gt[i] relative to proposals[i], weights (wx, wy, ww, wh).
extern "C" __global__ void box_encode_f32(const float* __restrict__ gt, const float* __restrict__ prop,
                                          float* __restrict__ out, long long n,
                                          float wx, float wy, float ww, float wh) {
    KESTREL_LOOP(i, n) {
        const float* p = prop + 4 * i;
        const float* g = gt + 4 * i;
        float ew = det_sub(p[2], p[0]), eh = det_sub(p[3], p[1]);
        float ecx = det_add(p[0], det_mul(0.5f, ew)), ecy = det_add(p[1], det_mul(0.5f, eh));
        float gw = det_sub(g[2], g[0]), gh = det_sub(g[3], g[1]);
        float gcx = det_add(g[0], det_mul(0.5f, gw)), gcy = det_add(g[1], det_mul(0.5f, gh));
        float* o = out + 4 * i;
        o[0] = det_mul(wx, det_sub(gcx, ecx)) / ew;
        o[1] = det_mul(wy, det_sub(gcy, ecy)) / eh;
        o[2] = det_mul(ww, logf(gw / ew));
        o[3] = det_mul(wh, logf(gh / eh));
    }
}

// Boxes from codes [n, 4k] relative to boxes [n, 4]: out [n, 4k]. dw and dh are
// clamped above at `clip` (NaN stays NaN, as torch.clamp).
extern "C" __global__ void box_decode_f32(const float* __restrict__ codes, const float* __restrict__ boxes,
                                          float* __restrict__ out, long long n, long long k,
                                          float wx, float wy, float ww, float wh, float clip) {
    KESTREL_LOOP(e, n * k) {
        long long i = e / k;
        const float* b = boxes + 4 * i;
        const float* r = codes + 4 * e;
        float w = det_sub(b[2], b[0]), h = det_sub(b[3], b[1]);
        float cx = det_add(b[0], det_mul(0.5f, w)), cy = det_add(b[1], det_mul(0.5f, h));
        float dx = r[0] / wx, dy = r[1] / wy, dw = r[2] / ww, dh = r[3] / wh;
        dw = (clip < dw) ? clip : dw;
        dh = (clip < dh) ? clip : dh;
        float pcx = det_add(det_mul(dx, w), cx), pcy = det_add(det_mul(dy, h), cy);
        float pw = det_mul(expf(dw), w), ph = det_mul(expf(dh), h);
        float hw = det_mul(0.5f, pw), hh = det_mul(0.5f, ph);
        float* o = out + 4 * e;
        o[0] = det_sub(pcx, hw);
        o[1] = det_sub(pcy, hh);
        o[2] = det_add(pcx, hw);
        o[3] = det_add(pcy, hh);
    }
}
