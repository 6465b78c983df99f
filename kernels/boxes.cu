// Box ops on (x1, y1, x2, y2) boxes, torchvision semantics (no "+1"): area, pairwise
// IoU, clipping to the image and the small-box filter. f32, contiguous.
#include "compact.cuh"
#include "detection.cuh"

// area[i] = (x2 - x1) * (y2 - y1) for boxes [n, 4].
extern "C" __global__ void box_area_f32(const float* __restrict__ b, float* __restrict__ area, long long n) {
    KESTREL_LOOP(i, n) {
        const float* p = b + 4 * i;
        area[i] = det_mul(det_sub(p[2], p[0]), det_sub(p[3], p[1]));
    }
}

// iou[i, j] for boxes a [n, 4] and b [m, 4]: torchvision's box_iou, step by step
// (torch.maximum / minimum propagate NaN; clamp(min=0) keeps NaN).
extern "C" __global__ void box_iou_f32(const float* __restrict__ a, const float* __restrict__ b,
                                       float* __restrict__ iou, long long n, long long m) {
    KESTREL_LOOP(e, n * m) {
        long long i = e / m, j = e % m;
        const float* p = a + 4 * i;
        const float* q = b + 4 * j;
        float area1 = det_mul(det_sub(p[2], p[0]), det_sub(p[3], p[1]));
        float area2 = det_mul(det_sub(q[2], q[0]), det_sub(q[3], q[1]));
        float ltx = det_nan_max(p[0], q[0]), lty = det_nan_max(p[1], q[1]);
        float rbx = det_nan_min(p[2], q[2]), rby = det_nan_min(p[3], q[3]);
        float w = det_sub(rbx, ltx), h = det_sub(rby, lty);
        w = (w < 0.f) ? 0.f : w;
        h = (h < 0.f) ? 0.f : h;
        float inter = det_mul(w, h);
        float uni = det_sub(det_add(area1, area2), inter);
        iou[e] = inter / uni;
    }
}

// Clamp x to [0, width] and y to [0, height] for `n` boxes; NaN stays NaN.
extern "C" __global__ void box_clip_f32(const float* __restrict__ b, float* __restrict__ out, long long n,
                                        float height, float width) {
    KESTREL_LOOP(e, 4 * n) {
        float v = b[e];
        float hi = (e & 1) ? height : width;
        v = (v < 0.f) ? 0.f : v;
        v = (hi < v) ? hi : v;
        out[e] = v;
    }
}

// Indices (ascending) of boxes with both sides >= min_size, written to keep[0..count);
// count[0] = how many. One block: an ordered compaction over chunks of blockDim.x
// boxes (blockDim.x a multiple of 32, at most 1024).
extern "C" __global__ void box_remove_small_f32(const float* __restrict__ b, long long n, float min_size,
                                                long long* __restrict__ keep, long long* __restrict__ count) {
    __shared__ BlockCompact placed;
    block_compact_init(placed);
    for (long long start = 0; start < n; start += blockDim.x) {
        long long i = start + threadIdx.x;
        bool ok = false;
        if (i < n) {
            const float* p = b + 4 * i;
            float ws = det_sub(p[2], p[0]), hs = det_sub(p[3], p[1]);
            ok = (ws >= min_size) && (hs >= min_size);
        }
        long long pos = block_compact_step(placed, ok);
        if (ok) keep[pos] = i;
    }
    if (threadIdx.x == 0) count[0] = placed.base;
}
