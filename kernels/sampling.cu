// Training-target selection on the device, for every image of a batch in one launch
// per stage (torchvision's Matcher + BalancedPositiveNegativeSampler +
// select_training_samples): match candidates to ground truth, sample positives and
// negatives with Philox keys, and gather what the losses read. The CPU twin is
// src/detection/targets.rs; integer outputs (labels, picks, counts) agree exactly.
//
// Ground truth of the batch arrives packed in ONE f32 buffer `tg` (one upload per
// batch): boxes [G, 4], then labels [G], then image offsets [N + 1] (labels and
// offsets are integers below 2^24, exact in f32). Candidates of image n are `P` slots
// at `cand + n * cand_stride` (stride 0: the anchors every image shares), of which
// the first `counts[n]` are real when `has_counts`; with `append_gt` the image's own
// gt boxes follow as slots P .. P + G_n (torchvision appends them to the proposals).
// L = P + (append_gt ? Gmax : 0) slots per image.
#include "detection.cuh"
#include "philox.cuh"
#include "compact.cuh"

__device__ __forceinline__ long long smp_off(const float* tg, long long G, long long n) {
    return (long long)tg[5 * G + n];
}

// Box of slot j of image n, or null if the slot holds no candidate.
__device__ __forceinline__ const float* smp_cand(const float* cand, long long stride,
                                                 const long long* counts, int has_counts,
                                                 long long P, int append_gt, const float* tg,
                                                 long long G, long long n, long long j) {
    if (j < P) {
        if (has_counts && j >= counts[n]) return 0;
        return cand + n * stride + 4 * j;
    }
    if (!append_gt) return 0;
    long long g0 = smp_off(tg, G, n), k = j - P;
    if (k >= smp_off(tg, G, n + 1) - g0) return 0;
    return tg + 4 * (g0 + k);
}

// box_iou_f32's arithmetic for one (gt p, candidate q) pair.
__device__ __forceinline__ float smp_iou(const float* p, const float* q) {
    float area1 = det_mul(det_sub(p[2], p[0]), det_sub(p[3], p[1]));
    float area2 = det_mul(det_sub(q[2], q[0]), det_sub(q[3], q[1]));
    float ltx = det_nan_max(p[0], q[0]), lty = det_nan_max(p[1], q[1]);
    float rbx = det_nan_min(p[2], q[2]), rby = det_nan_min(p[3], q[3]);
    float w = det_sub(rbx, ltx), h = det_sub(rby, lty);
    w = (w < 0.f) ? 0.f : w;
    h = (h < 0.f) ? 0.f : h;
    float inter = det_mul(w, h);
    float uni = det_sub(det_add(area1, area2), inter);
    return inter / uni;
}

__device__ __forceinline__ float smp_nan_max(float a, float b) {
    if (a != a) return a;
    if (b != b) return b;
    return a < b ? b : a;
}

// rowmax[g] = max IoU of gt g over its image's candidates (NaN wins), for the
// low-quality rule. One block per gt; blockDim.x a multiple of 32.
extern "C" __global__ void sample_gt_max_f32(const float* __restrict__ tg, long long G, long long N,
                                             const float* __restrict__ cand, long long stride,
                                             const long long* __restrict__ counts, int has_counts,
                                             long long P, int append_gt, long long L,
                                             float* __restrict__ rowmax) {
    __shared__ float part[32];
    long long g = blockIdx.x, n = 0;
    while (n + 1 < N && smp_off(tg, G, n + 1) <= g) ++n;
    float m = -__int_as_float(0x7f800000);
    for (long long j = threadIdx.x; j < L; j += blockDim.x) {
        const float* q = smp_cand(cand, stride, counts, has_counts, P, append_gt, tg, G, n, j);
        if (q) m = smp_nan_max(m, smp_iou(tg + 4 * g, q));
    }
    for (int o = 16; o > 0; o >>= 1) m = smp_nan_max(m, __shfl_xor_sync(0xffffffffu, m, o));
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) part[warp] = m;
    __syncthreads();
    if (threadIdx.x == 0) {
        float t = part[0];
        for (int w = 1; w < (int)(blockDim.x >> 5); ++w) t = smp_nan_max(t, part[w]);
        rowmax[g] = t;
    }
}

// Per slot e = n * L + j: the Matcher (matcher_assign_f32's rules) against image n's
// gt, then the label: mode 0 (RPN) 1 / 0 / -1 for foreground / background / between;
// mode 1 (RoI) the gt's class / 0 / -1. Empty slots are -1 (never sampled).
// match[e] is the global gt index the targets use: the best gt for foreground,
// torchvision's clamp(min=0) (the image's first gt) otherwise, -1 without gt.
extern "C" __global__ void sample_match_f32(const float* __restrict__ tg, long long G, long long N,
                                            const float* __restrict__ cand, long long stride,
                                            const long long* __restrict__ counts, int has_counts,
                                            long long P, int append_gt, long long L,
                                            const float* __restrict__ rowmax, float high, float low,
                                            int allow_low_quality, int mode,
                                            long long* __restrict__ labels,
                                            long long* __restrict__ match) {
    KESTREL_LOOP(e, N * L) {
        long long n = e / L, j = e % L;
        const float* q = smp_cand(cand, stride, counts, has_counts, P, append_gt, tg, G, n, j);
        if (!q) {
            labels[e] = -1;
            match[e] = -1;
            continue;
        }
        long long g0 = smp_off(tg, G, n), gn = smp_off(tg, G, n + 1) - g0;
        long long m = -1;
        if (gn > 0) {
            float best = smp_iou(tg + 4 * g0, q);
            long long arg = 0;
            for (long long r = 0; r < gn; ++r) {
                float v = smp_iou(tg + 4 * (g0 + r), q);
                if (!(v <= best)) {
                    best = v;
                    arg = r;
                    if (v != v) break;
                }
            }
            m = arg;
            if (best < low) {
                m = -1;
            } else if (best >= low && best < high) {
                m = -2;
            }
            if (allow_low_quality) {
                for (long long r = 0; r < gn; ++r) {
                    if (smp_iou(tg + 4 * (g0 + r), q) == rowmax[g0 + r]) {
                        m = arg;
                        break;
                    }
                }
            }
        }
        long long lab;
        if (m >= 0) {
            lab = mode == 0 ? 1 : (long long)tg[4 * G + g0 + m];
        } else {
            lab = m == -1 ? 0 : -1;
        }
        labels[e] = lab;
        match[e] = gn > 0 ? g0 + (m > 0 ? m : 0) : -1;
    }
}

// Composite key of slot j: Philox key above, index below, so keys are distinct and
// the k smallest are a uniform draw of k without replacement.
__device__ __forceinline__ unsigned long long smp_key(unsigned long long seed, long long n,
                                                      int stage, long long j) {
    return ((unsigned long long)philox_sample_key(seed, (unsigned int)n, (unsigned int)stage,
                                                  (unsigned int)j)
            << 32) |
           (unsigned long long)(unsigned int)j;
}

// Balanced sampling of image blockIdx.x: up to want_pos positives (label >= 1), then
// negatives (label 0) up to batch in all. sel[e] = 1 sampled positive, 0 sampled
// negative, -1 not sampled; counts[2n], counts[2n + 1] the numbers taken. A class
// with at most as many members as wanted is taken whole and draws no key; otherwise
// the members with the k smallest composite keys, found by an 8-bit radix select.
// blockDim.x = 256.
extern "C" __global__ void sample_balanced(const long long* __restrict__ labels, long long L,
                                           long long want_pos, long long batch,
                                           long long seed_bits, int stage,
                                           long long* __restrict__ sel,
                                           long long* __restrict__ counts) {
    __shared__ unsigned int hist[256];
    __shared__ unsigned long long s_prefix, s_mask;
    __shared__ long long s_rank, s_count, s_taken_pos;
    const unsigned long long seed = (unsigned long long)seed_bits;
    long long n = blockIdx.x;
    const long long* lab = labels + n * L;
    long long* out = sel + n * L;
    for (int cls = 0; cls < 2; ++cls) {  // 0: positives, 1: negatives
        if (threadIdx.x == 0) s_count = 0;
        __syncthreads();
        long long mine = 0;
        for (long long j = threadIdx.x; j < L; j += blockDim.x) {
            long long l = lab[j];
            mine += cls == 0 ? (l >= 1) : (l == 0);
        }
        atomicAdd((unsigned long long*)&s_count, (unsigned long long)mine);
        __syncthreads();
        long long c = s_count;
        long long want = cls == 0 ? want_pos : batch - s_taken_pos;
        long long k = want < c ? want : c;
        // Threshold: members with key <= t are taken (all if k == c, none if k == 0).
        unsigned long long t = ~0ull;
        bool none = k <= 0;
        if (k > 0 && k < c) {
            if (threadIdx.x == 0) {
                s_prefix = 0;
                s_mask = 0;
                s_rank = k;
            }
            __syncthreads();
            for (int shift = 56; shift >= 0; shift -= 8) {
                hist[threadIdx.x] = 0;
                __syncthreads();
                unsigned long long prefix = s_prefix, mask = s_mask;
                for (long long j = threadIdx.x; j < L; j += blockDim.x) {
                    long long l = lab[j];
                    if (cls == 0 ? (l >= 1) : (l == 0)) {
                        unsigned long long key = smp_key(seed, n, stage, j);
                        if ((key & mask) == prefix) atomicAdd(&hist[(key >> shift) & 255u], 1u);
                    }
                }
                __syncthreads();
                if (threadIdx.x == 0) {
                    long long cum = 0, rank = s_rank;
                    int b = 0;
                    for (; b < 255; ++b) {
                        if (cum + (long long)hist[b] >= rank) break;
                        cum += hist[b];
                    }
                    s_rank = rank - cum;
                    s_prefix = prefix | ((unsigned long long)b << shift);
                    s_mask = mask | (255ull << shift);
                }
                __syncthreads();
            }
            t = s_prefix;  // the k-th smallest key itself: keys are distinct
        }
        for (long long j = threadIdx.x; j < L; j += blockDim.x) {
            long long l = lab[j];
            bool member = cls == 0 ? (l >= 1) : (l == 0);
            bool take = member && !none && (k == c || smp_key(seed, n, stage, j) <= t);
            if (cls == 0) {
                out[j] = take ? 1 : -1;
            } else if (take) {
                out[j] = 0;
            }
        }
        if (threadIdx.x == 0) {
            if (cls == 0) s_taken_pos = k > 0 ? k : 0;
            counts[2 * n + cls] = k > 0 ? k : 0;
        }
        __syncthreads();
    }
}

// What the RPN losses read, per anchor e of the batch [N * A]: objectness target y,
// weights 1 / (anchors sampled in the batch) for the BCE (sampled) and the box loss
// (positives), and the (gt, anchor) pair to encode: the matched gt and the anchor for
// positives, a unit box twice elsewhere (its code is 0, so no inf reaches the loss).
extern "C" __global__ void sample_rpn_targets_f32(const float* __restrict__ tg, long long N,
                                                  long long A, const float* __restrict__ anchors,
                                                  const long long* __restrict__ sel,
                                                  const long long* __restrict__ match,
                                                  const long long* __restrict__ counts,
                                                  float* __restrict__ y, float* __restrict__ w_obj,
                                                  float* __restrict__ w_box, float* __restrict__ gt,
                                                  float* __restrict__ anc) {
    KESTREL_LOOP(e, N * A) {
        long long total = 0;
        for (long long i = 0; i < 2 * N; ++i) total += counts[i];
        float w = total > 0 ? 1.0f / (float)total : 0.0f;
        long long s = sel[e];
        bool pos = s == 1;
        y[e] = pos ? 1.0f : 0.0f;
        w_obj[e] = s >= 0 ? w : 0.0f;
        const float* a = anchors + 4 * (e % A);
        const float* g = pos ? tg + 4 * match[e] : 0;
        const float unit[4] = {0.f, 0.f, 1.f, 1.f};
        for (int c = 0; c < 4; ++c) {
            w_box[4 * e + c] = pos ? w : 0.0f;
            gt[4 * e + c] = pos ? g[c] : unit[c];
            anc[4 * e + c] = pos ? a[c] : unit[c];
        }
    }
}

// The sampled RoIs of image blockIdx.x packed in slot order into `cap` rows:
// candidate box, matched gt box (zeros without gt, as torchvision), class label;
// rows past the image's count hold a unit box twice and label 0. nsamp[n] = count.
// blockDim.x = 256.
extern "C" __global__ void sample_roi_gather_f32(const float* __restrict__ tg, long long G,
                                                 const float* __restrict__ cand, long long stride,
                                                 const long long* __restrict__ counts,
                                                 long long P, long long L, long long cap,
                                                 const long long* __restrict__ sel,
                                                 const long long* __restrict__ labels,
                                                 const long long* __restrict__ match,
                                                 float* __restrict__ rois, float* __restrict__ gt,
                                                 long long* __restrict__ out_labels,
                                                 long long* __restrict__ nsamp) {
    __shared__ BlockCompact s;
    long long n = blockIdx.x;
    block_compact_init(s);
    for (long long j0 = 0; j0 < L; j0 += blockDim.x) {
        long long j = j0 + threadIdx.x;
        bool ok = j < L && sel[n * L + j] >= 0;
        long long pos = block_compact_step(s, ok);
        if (ok && pos < cap) {
            long long o = n * cap + pos, e = n * L + j;
            const float* q = smp_cand(cand, stride, counts, 1, P, 1, tg, G, n, j);
            long long m = match[e];
            for (int c = 0; c < 4; ++c) {
                rois[4 * o + c] = q[c];
                gt[4 * o + c] = m >= 0 ? tg[4 * m + c] : 0.0f;
            }
            out_labels[o] = labels[e];
        }
    }
    long long k = s.base < cap ? s.base : cap;
    const float unit[4] = {0.f, 0.f, 1.f, 1.f};
    for (long long p = k + threadIdx.x; p < cap; p += blockDim.x) {
        long long o = n * cap + p;
        for (int c = 0; c < 4; ++c) {
            rois[4 * o + c] = unit[c];
            gt[4 * o + c] = unit[c];
        }
        out_labels[o] = 0;
    }
    if (threadIdx.x == 0) nsamp[n] = k;
}

// What the box-head losses read, per row e of [N * cap]: cross-entropy weight
// 1 / (RoIs sampled in the batch) on real rows; the row of the label's class in the
// [N * cap * C, 4] regression (`rows`); box weight and the target the loss compares
// with on foreground rows, zeros elsewhere (so a background row's inf code is never
// read).
extern "C" __global__ void sample_roi_weights_f32(long long N, long long cap, long long C,
                                                  const long long* __restrict__ nsamp,
                                                  const long long* __restrict__ labels,
                                                  const float* __restrict__ targets,
                                                  float* __restrict__ w_cls,
                                                  long long* __restrict__ rows,
                                                  float* __restrict__ w_box,
                                                  float* __restrict__ loss_tgt) {
    KESTREL_LOOP(e, N * cap) {
        long long total = 0;
        for (long long i = 0; i < N; ++i) total += nsamp[i];
        float w = total > 0 ? 1.0f / (float)total : 0.0f;
        bool real = (e % cap) < nsamp[e / cap];
        long long lab = labels[e];
        bool fg = real && lab > 0;
        w_cls[e] = real ? w : 0.0f;
        rows[e] = e * C + lab;
        for (int c = 0; c < 4; ++c) {
            w_box[4 * e + c] = fg ? w : 0.0f;
            loss_tgt[4 * e + c] = fg ? targets[4 * e + c] : 0.0f;
        }
    }
}
