// Anchor grids (torchvision's AnchorGenerator.grid_anchors): for every location of
// one level, row-major, every cell anchor shifted by (x * stride_w, y * stride_h).
#include "detection.cuh"

// out[out_off + e] for e < gh * gw * a: location e / a, cell anchor
// cells[cell_off + e % a]. Shifts are f32 products of integers, as in torchvision.
extern "C" __global__ void anchors_grid_f32(const float* __restrict__ cells, long long cell_off, long long a,
                                            long long gh, long long gw, long long stride_h, long long stride_w,
                                            float* __restrict__ out, long long out_off) {
    KESTREL_LOOP(e, gh * gw * a) {
        long long loc = e / a, c = e % a;
        long long y = loc / gw, x = loc % gw;
        float sx = det_mul((float)x, (float)stride_w);
        float sy = det_mul((float)y, (float)stride_h);
        const float* b = cells + 4 * (cell_off + c);
        float* o = out + 4 * (out_off + e);
        o[0] = det_add(sx, b[0]);
        o[1] = det_add(sy, b[1]);
        o[2] = det_add(sx, b[2]);
        o[3] = det_add(sy, b[3]);
    }
}
