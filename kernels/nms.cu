// Greedy NMS entirely on the device, torchvision's CPU result exactly:
//   1. nms_keys_f32: 64-bit sort keys (descending score, NaN first, ties by index).
//   2. nms_sort_*_f32: bitonic sort of the keys (unique keys, so the order is the
//      stable descending order).
//   3. nms_gather_f32: boxes, areas, classes and original indices in sorted order.
//   4. nms_mask_f32 / nms_mask_batched_f32: IoU bitmask, 64-bit words, blocks of 64
//      boxes; bit j of mask[i][cb] says sorted box i suppresses box cb*64+j (j > i).
//   5. nms_reduce_f32: one block walks the mask in score order and writes the kept
//      original indices and their count; the mask never leaves the device.
//
// Grouped NMS (nms_group_*): groups never compare with each other, and memory stays
// O(n) (no n x n mask):
//   1. nms_group_keys_f32: 128-bit keys (group, descending score, index); candidates
//      of a negative group are left out (they sort last).
//   2. nms_sort128_*_f32: the same bitonic network on the 128-bit keys: group-major,
//      each group in NMS visiting order.
//   3. nms_group_segments_f32: one block finds where each group starts (ordered
//      compaction) and how many candidates take part.
//   4. nms_group_walk_f32: one block per group (grid-stride over the groups, all in
//      parallel) runs torchvision's greedy loop over its segment: each kept box
//      marks the later boxes it suppresses, the block's threads sharing the marks.
//   5. nms_group_final_keys_f32 + nms_sort_*_f32 + nms_keep_from_keys_f32: the kept
//      candidates of every group in global descending score order (ties by index),
//      as a keep list padded with -1 and a count.
#include "bitonic.cuh"
#include "compact.cuh"
#include "detection.cuh"

#define NMS_TILE 2048          // keys sorted per block in shared memory
#define NMS_BLOCK 64           // boxes per mask word
#define NMS_SMEM_WORDS 4096    // removed-words kept in shared memory up to this many

// keys[i] = (desc_key(score[i]) << 32) | i for i < n; padding sorts last.
extern "C" __global__ void nms_keys_f32(const float* __restrict__ scores, long long n,
                                        kestrel_u64* __restrict__ keys, long long padded) {
    KESTREL_LOOP(i, padded) {
        keys[i] = (i < n) ? (((kestrel_u64)det_desc_key(scores[i]) << 32) | (kestrel_u64)i)
                          : ~0ull;
    }
}

// Sort each tile of `tile` keys (a power of two <= NMS_TILE; blockDim.x = tile / 2)
// through every bitonic stage k <= tile.
extern "C" __global__ void nms_sort_tile_f32(kestrel_u64* __restrict__ keys, int tile) {
    __shared__ kestrel_u64 s[NMS_TILE];
    bitonic_sort_tile(keys, s, (long long)blockIdx.x * tile, tile);
}

// One global compare-exchange step (stage k, distance j >= NMS_TILE) over `padded` keys.
extern "C" __global__ void nms_sort_step_f32(kestrel_u64* __restrict__ keys, long long padded,
                                             long long k, long long j) {
    bitonic_global_step(keys, padded, k, j);
}

// The steps j = NMS_TILE / 2 .. 1 of stage k (k > NMS_TILE) for each tile, in shared
// memory. blockDim.x = NMS_TILE / 2.
extern "C" __global__ void nms_sort_merge_f32(kestrel_u64* __restrict__ keys, long long k) {
    __shared__ kestrel_u64 s[NMS_TILE];
    bitonic_merge_tile(keys, s, (long long)blockIdx.x * NMS_TILE, NMS_TILE, k);
}

// Sorted boxes [n, 4], areas [n], original indices [n]; classes too when `has_cls`.
extern "C" __global__ void nms_gather_f32(const float* __restrict__ boxes, const kestrel_u64* __restrict__ keys,
                                          long long n, float* __restrict__ sboxes, float* __restrict__ areas,
                                          long long* __restrict__ order, const long long* __restrict__ cls,
                                          long long* __restrict__ scls, int has_cls) {
    KESTREL_LOOP(p, n) {
        long long i = (long long)(keys[p] & 0xffffffffull);
        const float* b = boxes + 4 * i;
        float x1 = b[0], y1 = b[1], x2 = b[2], y2 = b[3];
        sboxes[4 * p + 0] = x1;
        sboxes[4 * p + 1] = y1;
        sboxes[4 * p + 2] = x2;
        sboxes[4 * p + 3] = y2;
        areas[p] = det_mul(det_sub(x2, x1), det_sub(y2, y1));
        order[p] = i;
        if (has_cls) scls[p] = cls[i];
    }
}

// torchvision's CPU test `ovr > iou_threshold` for kept box a and candidate b,
// operation by operation (std::max / std::min NaN behaviour, comparison in double).
__device__ __forceinline__ bool nms_suppresses(float ax1, float ay1, float ax2, float ay2, float aarea,
                                               float bx1, float by1, float bx2, float by2, float barea,
                                               double thr) {
    float xx1 = det_std_max(ax1, bx1), yy1 = det_std_max(ay1, by1);
    float xx2 = det_std_min(ax2, bx2), yy2 = det_std_min(ay2, by2);
    float w = det_std_max(0.f, det_sub(xx2, xx1));
    float h = det_std_max(0.f, det_sub(yy2, yy1));
    float inter = det_mul(w, h);
    float ovr = inter / det_sub(det_add(aarea, barea), inter);
    return (double)ovr > thr;
}

// Block (cb, rb) of the mask: thread t handles sorted row rb*64+t against the 64
// column boxes of block cb. Only blocks with rb <= cb are computed (and read).
__device__ __forceinline__ void nms_mask_block(const float* sboxes, const float* areas, const long long* scls,
                                               long long n, long long col_blocks, double thr,
                                               kestrel_u64* mask) {
    long long rb = blockIdx.y, cb = blockIdx.x;
    if (rb > cb) return;
    __shared__ float cx1[NMS_BLOCK], cy1[NMS_BLOCK], cx2[NMS_BLOCK], cy2[NMS_BLOCK], ca[NMS_BLOCK];
    __shared__ long long ccls[NMS_BLOCK];
    long long rows = n - rb * NMS_BLOCK, cols = n - cb * NMS_BLOCK;
    if (rows > NMS_BLOCK) rows = NMS_BLOCK;
    if (cols > NMS_BLOCK) cols = NMS_BLOCK;
    int t = threadIdx.x;
    if (t < cols) {
        long long j = cb * NMS_BLOCK + t;
        cx1[t] = sboxes[4 * j + 0];
        cy1[t] = sboxes[4 * j + 1];
        cx2[t] = sboxes[4 * j + 2];
        cy2[t] = sboxes[4 * j + 3];
        ca[t] = areas[j];
        ccls[t] = scls ? scls[j] : 0;
    }
    __syncthreads();
    if (t < rows) {
        long long i = rb * NMS_BLOCK + t;
        float x1 = sboxes[4 * i + 0], y1 = sboxes[4 * i + 1], x2 = sboxes[4 * i + 2], y2 = sboxes[4 * i + 3];
        float a = areas[i];
        long long c = scls ? scls[i] : 0;
        kestrel_u64 bits = 0;
        for (int j = (rb == cb) ? t + 1 : 0; j < cols; ++j) {
            if (ccls[j] == c && nms_suppresses(x1, y1, x2, y2, a, cx1[j], cy1[j], cx2[j], cy2[j], ca[j], thr))
                bits |= 1ull << j;
        }
        mask[i * col_blocks + cb] = bits;
    }
}

// grid (col_blocks, col_blocks), block NMS_BLOCK.
extern "C" __global__ void nms_mask_f32(const float* __restrict__ sboxes, const float* __restrict__ areas,
                                        long long n, long long col_blocks, double thr,
                                        kestrel_u64* __restrict__ mask) {
    nms_mask_block(sboxes, areas, 0, n, col_blocks, thr, mask);
}

// As nms_mask_f32, suppressing only within equal classes (batched NMS).
extern "C" __global__ void nms_mask_batched_f32(const float* __restrict__ sboxes, const float* __restrict__ areas,
                                                const long long* __restrict__ scls, long long n,
                                                long long col_blocks, double thr,
                                                kestrel_u64* __restrict__ mask) {
    nms_mask_block(sboxes, areas, scls, n, col_blocks, thr, mask);
}

// One block walks the mask in score order, 64 boxes at a time: warp 0 resolves the
// block against the boxes removed so far and its own diagonal word, writes the kept
// original indices, then all threads OR the kept rows into the removed words of the
// later blocks. `removed_g` (col_blocks zeroed words) is used when the words do not
// fit in shared memory. keep[count..n) is filled with -1.
extern "C" __global__ void nms_reduce_f32(const kestrel_u64* __restrict__ mask, const long long* __restrict__ order,
                                          long long n, long long col_blocks, kestrel_u64* __restrict__ removed_g,
                                          long long* __restrict__ keep, long long* __restrict__ count) {
    __shared__ kestrel_u64 removed_s[NMS_SMEM_WORDS];
    __shared__ kestrel_u64 kept_s;
    kestrel_u64* removed = (col_blocks <= NMS_SMEM_WORDS) ? removed_s : removed_g;
    if (col_blocks <= NMS_SMEM_WORDS)
        for (long long w = threadIdx.x; w < col_blocks; w += blockDim.x) removed_s[w] = 0;
    __syncthreads();
    long long total = 0;
    for (long long nb = 0; nb < col_blocks; ++nb) {
        long long base = nb * NMS_BLOCK;
        long long rows = n - base;
        if (rows > NMS_BLOCK) rows = NMS_BLOCK;
        if (threadIdx.x < 32) {
            int lane = threadIdx.x;
            kestrel_u64 d0 = (lane < rows) ? mask[(base + lane) * col_blocks + nb] : 0ull;
            kestrel_u64 d1 = (lane + 32 < rows) ? mask[(base + lane + 32) * col_blocks + nb] : 0ull;
            kestrel_u64 valid = (rows == NMS_BLOCK) ? ~0ull : ((1ull << rows) - 1ull);
            kestrel_u64 rem = removed[nb];
            kestrel_u64 kept = 0;
            kestrel_u64 cand = ~rem & valid;
            while (cand) {  // uniform across the warp: every lane holds the same rem
                int t = __ffsll((long long)cand) - 1;
                kept |= 1ull << t;
                kestrel_u64 lo = det_shfl_u64(d0, t & 31);
                kestrel_u64 hi = det_shfl_u64(d1, t & 31);
                rem |= (t < 32) ? lo : hi;
                kestrel_u64 above = (t == 63) ? 0ull : (~0ull << (t + 1));
                cand = ~rem & valid & above;
            }
            if (lane == 0) kept_s = kept;
            for (int r = lane; r < rows; r += 32) {
                if ((kept >> r) & 1ull) {
                    kestrel_u64 below = (r == 0) ? 0ull : (kept & (~0ull >> (64 - r)));
                    keep[total + __popcll((long long)below)] = order[base + r];
                }
            }
        }
        __syncthreads();
        kestrel_u64 kept = kept_s;
        if (kept) {
            for (long long w = nb + 1 + threadIdx.x; w < col_blocks; w += blockDim.x) {
                kestrel_u64 acc = removed[w];
                kestrel_u64 kk = kept;
                while (kk) {
                    int t = __ffsll((long long)kk) - 1;
                    kk &= kk - 1ull;
                    acc |= mask[(base + t) * col_blocks + w];
                }
                removed[w] = acc;
            }
        }
        total += __popcll((long long)kept);
        __syncthreads();
    }
    for (long long p = total + threadIdx.x; p < n; p += blockDim.x) keep[p] = -1;
    if (threadIdx.x == 0) count[0] = total;
}

// ------------------------------------------------------------------ grouped NMS

// 128-bit sort key: group first, then the 64-bit (descending score, index) key.
struct nms_key128 {
    kestrel_u64 hi, lo;
};
__device__ __forceinline__ bool operator<(const nms_key128& a, const nms_key128& b) {
    return a.hi < b.hi || (a.hi == b.hi && a.lo < b.lo);
}

// keys[i] = (groups[i], desc_key(score[i]) << 32 | i), or all ones (sorting last)
// for a negative group and for the padding up to `padded`. `keys` holds 2 * padded
// u64 (hi, lo pairs).
extern "C" __global__ void nms_group_keys_f32(const float* __restrict__ scores, const long long* __restrict__ groups,
                                              long long n, kestrel_u64* __restrict__ keys, long long padded) {
    nms_key128* k = reinterpret_cast<nms_key128*>(keys);
    KESTREL_LOOP(i, padded) {
        nms_key128 v;
        if (i < n && groups[i] >= 0) {
            v.hi = (kestrel_u64)groups[i];
            v.lo = ((kestrel_u64)det_desc_key(scores[i]) << 32) | (kestrel_u64)i;
        } else {
            v.hi = ~0ull;
            v.lo = ~0ull;
        }
        k[i] = v;
    }
}

// As nms_sort_tile_f32 for 128-bit keys (tile <= NMS_TILE; blockDim.x = tile / 2).
extern "C" __global__ void nms_sort128_tile_f32(kestrel_u64* __restrict__ keys, int tile) {
    __shared__ nms_key128 s[NMS_TILE];
    bitonic_sort_tile(reinterpret_cast<nms_key128*>(keys), s, (long long)blockIdx.x * tile, tile);
}

// As nms_sort_step_f32 for 128-bit keys.
extern "C" __global__ void nms_sort128_step_f32(kestrel_u64* __restrict__ keys, long long padded,
                                                long long k, long long j) {
    bitonic_global_step(reinterpret_cast<nms_key128*>(keys), padded, k, j);
}

// As nms_sort_merge_f32 for 128-bit keys.
extern "C" __global__ void nms_sort128_merge_f32(kestrel_u64* __restrict__ keys, long long k) {
    __shared__ nms_key128 s[NMS_TILE];
    bitonic_merge_tile(reinterpret_cast<nms_key128*>(keys), s, (long long)blockIdx.x * NMS_TILE, NMS_TILE, k);
}

// One block over the n sorted keys: seg_start[0..nseg) = the first position of each
// group, nvalid = candidates taking part (the left-out ones sort last).
extern "C" __global__ void nms_group_segments_f32(const kestrel_u64* __restrict__ keys, long long n,
                                                  long long* __restrict__ seg_start, long long* __restrict__ nseg,
                                                  long long* __restrict__ nvalid) {
    const nms_key128* k = reinterpret_cast<const nms_key128*>(keys);
    __shared__ BlockCompact heads, valid;
    block_compact_init(heads);
    block_compact_init(valid);
    for (long long start = 0; start < n; start += blockDim.x) {
        long long q = start + threadIdx.x;
        bool in = q < n && k[q].hi != ~0ull;
        bool head = in && (q == 0 || k[q - 1].hi != k[q].hi);
        long long pos = block_compact_step(heads, head);
        if (head) seg_start[pos] = q;
        block_compact_step(valid, in);
    }
    if (threadIdx.x == 0) {
        nseg[0] = heads.base;
        nvalid[0] = valid.base;
    }
}

// Greedy NMS of each group (block per group, grid-stride): the segment [s, e) of the
// sorted keys is visited in order; a box not yet removed is kept and the block's
// threads remove the later boxes it suppresses (torchvision's test, nms_suppresses).
// kept[i] = 1 or 0 for every candidate i taking part; `removed` is scratch, n ints.
extern "C" __global__ void nms_group_walk_f32(const float* __restrict__ boxes, const kestrel_u64* __restrict__ keys,
                                              const long long* __restrict__ seg_start,
                                              const long long* __restrict__ nseg,
                                              const long long* __restrict__ nvalid, double thr,
                                              int* __restrict__ removed, int* __restrict__ kept) {
    const nms_key128* k = reinterpret_cast<const nms_key128*>(keys);
    long long groups = nseg[0], total = nvalid[0];
    for (long long g = blockIdx.x; g < groups; g += gridDim.x) {
        long long s = seg_start[g], e = (g + 1 < groups) ? seg_start[g + 1] : total;
        for (long long q = s + threadIdx.x; q < e; q += blockDim.x) removed[q] = 0;
        for (long long p = s; p < e; ++p) {
            __syncthreads();  // the marks of the previous kept box are visible
            long long ip = (long long)(k[p].lo & 0xffffffffull);
            if (removed[p]) {
                if (threadIdx.x == 0) kept[ip] = 0;
                continue;
            }
            if (threadIdx.x == 0) kept[ip] = 1;
            const float* a = boxes + 4 * ip;
            float ax1 = a[0], ay1 = a[1], ax2 = a[2], ay2 = a[3];
            float aarea = det_mul(det_sub(ax2, ax1), det_sub(ay2, ay1));
            for (long long q = p + 1 + threadIdx.x; q < e; q += blockDim.x) {
                if (removed[q]) continue;
                const float* b = boxes + 4 * (long long)(k[q].lo & 0xffffffffull);
                float bx1 = b[0], by1 = b[1], bx2 = b[2], by2 = b[3];
                float barea = det_mul(det_sub(bx2, bx1), det_sub(by2, by1));
                if (nms_suppresses(ax1, ay1, ax2, ay2, aarea, bx1, by1, bx2, by2, barea, thr)) removed[q] = 1;
            }
        }
        __syncthreads();
    }
}

// keys[i] = desc_key(score[i]) << 32 | i for the kept candidates, all ones (sorting
// last) for the others and the padding.
extern "C" __global__ void nms_group_final_keys_f32(const float* __restrict__ scores,
                                                    const long long* __restrict__ groups,
                                                    const int* __restrict__ kept, long long n,
                                                    kestrel_u64* __restrict__ keys, long long padded) {
    KESTREL_LOOP(i, padded) {
        bool keep = i < n && groups[i] >= 0 && kept[i];
        keys[i] = keep ? (((kestrel_u64)det_desc_key(scores[i]) << 32) | (kestrel_u64)i) : ~0ull;
    }
}

// keep[q] = the index in sorted key q (-1 for all-ones keys); count = kept keys.
extern "C" __global__ void nms_keep_from_keys_f32(const kestrel_u64* __restrict__ keys, long long n,
                                                  long long* __restrict__ keep, long long* __restrict__ count) {
    KESTREL_LOOP(q, n) {
        kestrel_u64 v = keys[q];
        bool in = v != ~0ull;
        keep[q] = in ? (long long)(v & 0xffffffffull) : -1;
        bool last = in && (q + 1 == n || keys[q + 1] == ~0ull);
        if (last) count[0] = q + 1;
        if (q == 0 && !in) count[0] = 0;
    }
}

// Grouped NMS with each image's first `top` kept candidates (nms_groups_top): the
// candidates are image-major in equal chunks, so a pass takes whole images and its
// scratch is that of the pass, not of the batch. After the walk of a pass:
//   6. nms_group_top_keys_f32: 128-bit keys (image in the pass, descending score,
//      index) of the kept candidates, all ones for the others;
//   7. nms_sort128_*_f32, then nms_group_top_f32: one block appends each image's
//      first `top` sorted keys to the keep list at count[0] and advances it.

// keys[i] = (i / chunk, desc_key(score[i]) << 32 | i) for the kept candidates of
// the pass (i < n), all ones for the others and the padding up to `padded`.
extern "C" __global__ void nms_group_top_keys_f32(const float* __restrict__ scores,
                                                  const long long* __restrict__ groups,
                                                  const int* __restrict__ kept, long long n,
                                                  long long chunk, kestrel_u64* __restrict__ keys,
                                                  long long padded) {
    nms_key128* k = reinterpret_cast<nms_key128*>(keys);
    KESTREL_LOOP(i, padded) {
        nms_key128 v;
        if (i < n && groups[i] >= 0 && kept[i]) {
            v.hi = (kestrel_u64)(i / chunk);
            v.lo = ((kestrel_u64)det_desc_key(scores[i]) << 32) | (kestrel_u64)i;
        } else {
            v.hi = ~0ull;
            v.lo = ~0ull;
        }
        k[i] = v;
    }
}

// First position in keys[0, n) whose image (hi) is >= img (keys sorted, all ones last).
__device__ __forceinline__ long long nms_image_start(const nms_key128* k, long long n, kestrel_u64 img) {
    long long lo = 0, hi = n;
    while (lo < hi) {
        long long mid = lo + (hi - lo) / 2;
        if (k[mid].hi < img) lo = mid + 1;
        else hi = mid;
    }
    return lo;
}

// One block: for each image j < images of the pass, its first min(kept, top) sorted
// keys go to keep[count[0] ...] as base + index, and count[0] advances; so keep holds
// every image's selection in image order, each in NMS visiting order.
extern "C" __global__ void nms_group_top_f32(const kestrel_u64* __restrict__ keys, long long n,
                                             long long images, long long top, long long base,
                                             long long* __restrict__ keep, long long* __restrict__ count) {
    const nms_key128* k = reinterpret_cast<const nms_key128*>(keys);
    __shared__ long long s_start, s_take, s_at;
    if (threadIdx.x == 0) s_at = count[0];
    for (long long j = 0; j < images; ++j) {
        if (threadIdx.x == 0) {
            long long st = nms_image_start(k, n, (kestrel_u64)j);
            long long en = nms_image_start(k, n, (kestrel_u64)j + 1);
            s_start = st;
            s_take = (en - st) < top ? (en - st) : top;
        }
        __syncthreads();
        for (long long q = threadIdx.x; q < s_take; q += blockDim.x)
            keep[s_at + q] = base + (long long)(k[s_start + q].lo & 0xffffffffull);
        __syncthreads();
        if (threadIdx.x == 0) s_at += s_take;
        __syncthreads();
    }
    if (threadIdx.x == 0) count[0] = s_at;
}
