// The discrete steps of Faster R-CNN's proposal and detection selection that the
// detection ops do not cover: gathering the top-k anchors' deltas, the clip / score /
// size filter that turns decoded boxes into NMS candidates (RPN and box head), and the
// per-image selection of the first kept boxes from one batched NMS over the batch.
// Candidates that fail a filter get the score -inf and the group -1, so that the
// NMS of the whole batch runs on fixed-size inputs and nothing is read back.
// Arithmetic as torchvision's, operation by operation in f32 (see detection.cuh).
#include "compact.cuh"
#include "detection.cuh"

#define PROPOSALS_MAX_LEVELS 8

__device__ __forceinline__ float prop_neg_inf() { return __int_as_float((int)0xff800000u); }

// torch.clamp(v, 0, hi) with NaN passing through (std::min(std::max(v, 0), hi)).
__device__ __forceinline__ float prop_clamp(float v, float hi) {
    v = (v < 0.f) ? 0.f : v;
    return (hi < v) ? hi : v;
}

// For the selected anchors idx [n_img, k] (columns of the flattened head), their
// deltas rows of deltas [n_img, a, 4] and anchors rows of anchors [a, 4], both
// written as [n_img * k, 4] for the box decoder.
extern "C" __global__ void proposals_gather_f32(const long long* __restrict__ idx,
                                                const float* __restrict__ deltas,
                                                const float* __restrict__ anchors, long long n_img,
                                                long long k, long long a, float* __restrict__ codes,
                                                float* __restrict__ refs) {
    KESTREL_LOOP(e, n_img * k) {
        long long n = e / k;
        long long j = idx[e];
        const float* d = deltas + 4 * (n * a + j);
        const float* r = anchors + 4 * j;
        for (int c = 0; c < 4; ++c) {
            codes[4 * e + c] = d[c];
            refs[4 * e + c] = r[c];
        }
    }
}

// RPN candidates from decoded boxes [n_img * k, 4] and their logits [n_img * k]:
// clip to image n's (h, w) = sizes[2n], sizes[2n + 1]; score = sigmoid(logit); kept
// when both sides >= min_size and score >= score_thresh. Column j of an image lies in
// level l when ends[l - 1] <= j < ends[l]; a kept box's group is n * levels + l.
extern "C" __global__ void proposals_filter_f32(const float* __restrict__ decoded,
                                                const float* __restrict__ logits,
                                                const float* __restrict__ sizes, long long n_img,
                                                long long k, int levels, long long end0,
                                                long long end1, long long end2, long long end3,
                                                long long end4, long long end5, long long end6,
                                                long long end7, float min_size, float score_thresh,
                                                float* __restrict__ boxes, float* __restrict__ scores,
                                                long long* __restrict__ groups) {
    long long ends[PROPOSALS_MAX_LEVELS] = {end0, end1, end2, end3, end4, end5, end6, end7};
    KESTREL_LOOP(e, n_img * k) {
        long long n = e / k, j = e % k;
        int level = 0;
        while (level + 1 < levels && j >= ends[level]) ++level;
        float h = sizes[2 * n], w = sizes[2 * n + 1];
        const float* b = decoded + 4 * e;
        float x1 = prop_clamp(b[0], w), y1 = prop_clamp(b[1], h);
        float x2 = prop_clamp(b[2], w), y2 = prop_clamp(b[3], h);
        float s = 1.f / det_add(1.f, expf(-logits[e]));
        bool ok = det_sub(x2, x1) >= min_size && det_sub(y2, y1) >= min_size && s >= score_thresh;
        float* o = boxes + 4 * e;
        o[0] = x1;
        o[1] = y1;
        o[2] = x2;
        o[3] = y2;
        scores[e] = ok ? s : prop_neg_inf();
        groups[e] = ok ? n * levels + level : -1;
    }
}

// One box-head candidate: the softmax probability of class j (max-shifted, summed in
// class order) in logits row x [c], and the box decoded for class j (b [4]) clipped
// to an image of (h, w); kept when p > score_thresh and both sides >= min_size.
// Writes the clipped box to o [4] and returns the score (-inf when rejected).
__device__ __forceinline__ float prop_roi_candidate(const float* x, long long c, long long j,
                                                    const float* b, float h, float w,
                                                    float score_thresh, float min_size, float* o,
                                                    bool* kept) {
    float m = prop_neg_inf();
    for (long long q = 0; q < c; ++q) m = (x[q] > m) ? x[q] : m;
    float sum = 0.f;
    for (long long q = 0; q < c; ++q) sum = det_add(sum, expf(det_sub(x[q], m)));
    float p = expf(det_sub(x[j], m)) / sum;
    float x1 = prop_clamp(b[0], w), y1 = prop_clamp(b[1], h);
    float x2 = prop_clamp(b[2], w), y2 = prop_clamp(b[3], h);
    bool ok = p > score_thresh && det_sub(x2, x1) >= min_size && det_sub(y2, y1) >= min_size;
    o[0] = x1;
    o[1] = y1;
    o[2] = x2;
    o[3] = y2;
    *kept = ok;
    return ok ? p : prop_neg_inf();
}

// Box-head candidates: for row r of logits [rows, c] and class j in 1..c, the
// candidate of prop_roi_candidate for the box decoded [rows, 4c] for class j, clipped
// to its image (row_image[r]). Output e = r * (c - 1) + j - 1, group image * c + j.
extern "C" __global__ void proposals_roi_filter_f32(const float* __restrict__ logits,
                                                    const float* __restrict__ decoded,
                                                    const long long* __restrict__ row_image,
                                                    const float* __restrict__ sizes, long long rows,
                                                    long long c, float score_thresh, float min_size,
                                                    float* __restrict__ boxes,
                                                    float* __restrict__ scores,
                                                    long long* __restrict__ groups) {
    KESTREL_LOOP(e, rows * (c - 1)) {
        long long r = e / (c - 1), j = e % (c - 1) + 1;
        long long img = row_image[r];
        bool ok;
        scores[e] = prop_roi_candidate(logits + r * c, c, j, decoded + 4 * (r * c + j),
                                       sizes[2 * img], sizes[2 * img + 1], score_thresh,
                                       min_size, boxes + 4 * e, &ok);
        groups[e] = ok ? img * c + j : -1;
    }
}

// proposals_roi_filter_f32 on padded rows: image n owns rows n * per_image ..
// (n + 1) * per_image, of which the first counts[n] are real. A padding row's
// candidates are rejected whatever their values (its box is written, clipped, so the
// output holds no stale memory), so padding never reaches NMS or the selection.
extern "C" __global__ void proposals_roi_filter_padded_f32(
    const float* __restrict__ logits, const float* __restrict__ decoded,
    const long long* __restrict__ counts, const float* __restrict__ sizes, long long n_img,
    long long per_image, long long c, float score_thresh, float min_size,
    float* __restrict__ boxes, float* __restrict__ scores, long long* __restrict__ groups) {
    KESTREL_LOOP(e, n_img * per_image * (c - 1)) {
        long long r = e / (c - 1), j = e % (c - 1) + 1;
        long long img = r / per_image;
        bool ok;
        float s = prop_roi_candidate(logits + r * c, c, j, decoded + 4 * (r * c + j),
                                     sizes[2 * img], sizes[2 * img + 1], score_thresh, min_size,
                                     boxes + 4 * e, &ok);
        ok = ok && r - img * per_image < counts[img];
        scores[e] = ok ? s : prop_neg_inf();
        groups[e] = ok ? img * c + j : -1;
    }
}

// Per image (one block each, blockDim.x a multiple of 32), the first `top` entries of
// the NMS keep list keep[0 .. count[0]) whose group belongs to the image (group /
// groups_per_image; group -1 is no image), in keep order: their boxes, scores and
// candidate indices into out_* [n_img, top] (padding: zeros and index -1), and how
// many in out_counts[image].
extern "C" __global__ void proposals_select_f32(const long long* __restrict__ keep,
                                                const long long* __restrict__ count,
                                                const long long* __restrict__ groups,
                                                long long groups_per_image,
                                                const float* __restrict__ boxes,
                                                const float* __restrict__ scores, long long top,
                                                float* __restrict__ out_boxes,
                                                float* __restrict__ out_scores,
                                                long long* __restrict__ out_idx,
                                                long long* __restrict__ out_counts) {
    __shared__ BlockCompact placed;
    long long img = blockIdx.x;
    long long n = count[0];
    block_compact_init(placed);
    float* ob = out_boxes + 4 * img * top;
    float* os = out_scores + img * top;
    long long* oi = out_idx + img * top;
    for (long long start = 0; start < n; start += blockDim.x) {
        if (placed.base >= top) break;  // the same for the whole block here
        long long i = start + threadIdx.x;
        long long src = -1;
        bool ok = false;
        if (i < n) {
            src = keep[i];
            long long g = groups[src];
            ok = g >= 0 && g / groups_per_image == img;
        }
        long long pos = block_compact_step(placed, ok);
        if (ok && pos < top) {
            for (int c = 0; c < 4; ++c) ob[4 * pos + c] = boxes[4 * src + c];
            os[pos] = scores[src];
            oi[pos] = src;
        }
    }
    long long got = placed.base < top ? placed.base : top;
    for (long long p = got + threadIdx.x; p < top; p += blockDim.x) {
        for (int c = 0; c < 4; ++c) ob[4 * p + c] = 0.f;
        os[p] = 0.f;
        oi[p] = -1;
    }
    if (threadIdx.x == 0) out_counts[img] = got;
}

// Everything the host needs from an inference pass, in one buffer of 32-bit words
// (so one device-to-host copy reads it), layout documented at
// `detection::proposals::PackedDetections`:
//   words [0, n_img)                  detections per image (i32)
//   words [n_img, 2 n_img)            proposals per image (i32)
//   then per image n and slot s < top, 6 words at 2 n_img + 6 (n top + s):
//     x1, y1, x2, y2, score (f32 bits), label (i32) = index % (c - 1) + 1;
//   slots at or past the count are zeros (label 0), so the buffer is the same bytes
//   for the same result whatever the allocator handed out.
// det_* are the selection's outputs (counts, boxes [n_img, top, 4], scores and
// candidate indices [n_img, top]); prop_counts [n_img] the proposals'.
extern "C" __global__ void proposals_pack_detections_f32(
    const long long* __restrict__ det_counts, const float* __restrict__ det_boxes,
    const float* __restrict__ det_scores, const long long* __restrict__ det_idx,
    const long long* __restrict__ prop_counts, long long n_img, long long top,
    long long classes_minus_bg, unsigned int* __restrict__ out) {
    KESTREL_LOOP(e, n_img * (top + 2)) {
        if (e < 2 * n_img) {
            out[e] = (unsigned int)(int)(e < n_img ? det_counts[e] : prop_counts[e - n_img]);
            continue;
        }
        long long slot = e - 2 * n_img;  // n * top + s
        long long n = slot / top, s = slot % top;
        unsigned int* o = out + 2 * n_img + 6 * slot;
        if (s < det_counts[n]) {
            for (int q = 0; q < 4; ++q) o[q] = __float_as_uint(det_boxes[4 * slot + q]);
            o[4] = __float_as_uint(det_scores[slot]);
            o[5] = (unsigned int)(int)(det_idx[slot] % classes_minus_bg + 1);
        } else {
            for (int q = 0; q < 6; ++q) o[q] = 0u;
        }
    }
}
