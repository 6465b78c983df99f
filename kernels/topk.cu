// Segmented top-k: for every row of x [rows, row_len] and every level segment of
// the row (up to 8 consecutive segments, e.g. FPN levels), the min(k, len) largest
// values in descending order, NaN first, ties by lower index (unique 64-bit keys
// (desc_key << 32) | index, so the result is deterministic). One block per segment,
// all segments in one launch.
//
// Per segment: segments of at most TOPK_CAP elements are sorted whole. Longer ones
// take a sample, pick a key threshold that should keep a little more than k
// elements, and gather the elements at or below it (one pass); if that does not
// give between k and TOPK_CAP candidates, an exact radix select (11 + 11 + 10 bits)
// finds the k-th key instead. The candidates are then sorted in shared memory.
#include "detection.cuh"

#define TOPK_CAP 4096      // candidates held in shared memory (k <= TOPK_CAP)
#define TOPK_SAMPLE 2048   // sampled keys for the threshold
#define TOPK_THREADS 1024
#define TOPK_MAX_LEVELS 8

// Exclusive prefix sum of v over the block in thread order; *total gets the sum.
// Every thread must call it; blockDim.x a multiple of 32.
__device__ __forceinline__ unsigned int topk_block_scan(unsigned int v, unsigned int* warp_sums,
                                                        unsigned int* total) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    unsigned int x = v;
    for (int o = 1; o < 32; o <<= 1) {
        unsigned int y = __shfl_up_sync(0xffffffffu, x, o);
        if (lane >= o) x += y;
    }
    __syncthreads();
    if (lane == 31) warp_sums[warp] = x;
    __syncthreads();
    unsigned int before = 0, tot = 0;
    for (int w = 0; w < nw; ++w) {
        unsigned int s = warp_sums[w];
        if (w < warp) before += s;
        tot += s;
    }
    *total = tot;
    return before + x - v;
}

// Append (key << 32 | i) to sel when `take`, at a position from a warp-aggregated
// atomic on *count; positions past TOPK_CAP are counted but not stored.
__device__ __forceinline__ void topk_append(bool take, unsigned int key, long long i, kestrel_u64* sel,
                                            unsigned int* count) {
    unsigned int bal = __ballot_sync(0xffffffffu, take);
    int lane = threadIdx.x & 31;
    unsigned int base = 0;
    if (lane == 0 && bal) base = atomicAdd(count, (unsigned int)__popc(bal));
    base = __shfl_sync(0xffffffffu, base, 0);
    if (take) {
        unsigned int pos = base + __popc(bal & ((1u << lane) - 1u));
        if (pos < TOPK_CAP) sel[pos] = ((kestrel_u64)key << 32) | (kestrel_u64)i;
    }
}

extern "C" __global__ void __launch_bounds__(TOPK_THREADS)
topk_segments_f32(const float* __restrict__ x, long long row_len, int levels,
                  long long len0, long long len1, long long len2, long long len3,
                  long long len4, long long len5, long long len6, long long len7,
                  long long k, long long out_row, float* __restrict__ values,
                  long long* __restrict__ indices) {
    __shared__ kestrel_u64 sel[TOPK_CAP];
    __shared__ unsigned int hist[2048];
    __shared__ unsigned int warp_sums[32];
    __shared__ unsigned int s_count, s_bucket, s_before, s_bucket_count;

    long long lens[TOPK_MAX_LEVELS] = {len0, len1, len2, len3, len4, len5, len6, len7};
    long long b = blockIdx.x / levels;
    int l = (int)(blockIdx.x % levels);
    long long seg_off = 0, out_off = b * out_row;
    for (int m = 0; m < l; ++m) {
        seg_off += lens[m];
        out_off += (lens[m] < k) ? lens[m] : k;
    }
    long long len = lens[l];
    long long kk = (len < k) ? len : k;
    if (kk <= 0) return;
    const float* seg = x + b * row_len + seg_off;

    if (threadIdx.x == 0) s_count = 0;
    __syncthreads();
    bool gathered = false;
    unsigned int n_sel = 0;
    if (len <= TOPK_CAP) {
        for (long long i = threadIdx.x; i < len; i += blockDim.x)
            sel[i] = ((kestrel_u64)det_desc_key(seg[i]) << 32) | (kestrel_u64)i;
        n_sel = (unsigned int)len;
        gathered = true;
    } else {
        // Threshold from a sorted sample: keep about twice the expected share.
        long long stride = len / TOPK_SAMPLE;
        for (int t = threadIdx.x; t < TOPK_SAMPLE; t += blockDim.x)
            sel[t] = ((kestrel_u64)det_desc_key(seg[(long long)t * stride]) << 32) | (kestrel_u64)t;
        det_block_bitonic_sort(sel, TOPK_SAMPLE);
        long long r = (2 * kk * TOPK_SAMPLE + len - 1) / len + 16;
        if (r > TOPK_SAMPLE - 1) r = TOPK_SAMPLE - 1;
        unsigned int thr = (unsigned int)(sel[r] >> 32);
        __syncthreads();
        for (long long start = 0; start < len; start += blockDim.x) {
            long long i = start + threadIdx.x;
            unsigned int key = (i < len) ? det_desc_key(seg[i]) : 0xffffffffu;
            topk_append(i < len && key <= thr, key, i, sel, &s_count);
        }
        __syncthreads();
        n_sel = s_count;
        gathered = (n_sel >= (unsigned int)kk && n_sel <= TOPK_CAP);
    }

    if (!gathered) {
        // Exact radix select of the kk-th smallest key: prefix/mask narrow down the
        // key bits, need = how many of the keys matching the prefix to take.
        unsigned int prefix = 0, mask = 0, need = (unsigned int)kk, eq = 0;
        const int shifts[3] = {21, 10, 0}, widths[3] = {11, 11, 10};
        for (int p = 0; p < 3; ++p) {
            int nbins = 1 << widths[p];
            for (int t = threadIdx.x; t < nbins; t += blockDim.x) hist[t] = 0;
            __syncthreads();
            for (long long i = threadIdx.x; i < len; i += blockDim.x) {
                unsigned int key = det_desc_key(seg[i]);
                if ((key & mask) == prefix) atomicAdd(&hist[(key >> shifts[p]) & (nbins - 1)], 1u);
            }
            __syncthreads();
            int per = nbins / blockDim.x;  // bins per thread (blockDim.x divides nbins)
            unsigned int mine = 0;
            for (int q = 0; q < per; ++q) mine += hist[threadIdx.x * per + q];
            unsigned int total;
            unsigned int before = topk_block_scan(mine, warp_sums, &total);
            for (int q = 0; q < per; ++q) {
                unsigned int c = hist[threadIdx.x * per + q];
                if (before < need && need <= before + c) {
                    s_bucket = threadIdx.x * per + q;
                    s_before = before;
                    s_bucket_count = c;
                }
                before += c;
            }
            __syncthreads();
            prefix |= s_bucket << shifts[p];
            mask |= (unsigned int)(nbins - 1) << shifts[p];
            need -= s_before;
            eq = s_bucket_count;
            __syncthreads();
            if (eq == need) break;
        }
        // Take every key below the prefix and the first `need` equal ones by index.
        if (threadIdx.x == 0) s_count = 0;
        __syncthreads();
        unsigned int eq_base = 0;
        for (long long start = 0; start < len; start += blockDim.x) {
            long long i = start + threadIdx.x;
            unsigned int key = (i < len) ? det_desc_key(seg[i]) : 0xffffffffu;
            bool less = i < len && (key & mask) < prefix;
            bool is_eq = i < len && (key & mask) == prefix;
            unsigned int eq_total;
            unsigned int rank = eq_base + topk_block_scan(is_eq ? 1u : 0u, warp_sums, &eq_total);
            topk_append(less || (is_eq && rank < need), key, i, sel, &s_count);
            eq_base += eq_total;
        }
        __syncthreads();
        n_sel = s_count;
    }

    // Sort the candidates (padding sorts last) and write the first kk.
    int padded = 64;
    while (padded < (int)n_sel) padded <<= 1;
    for (int t = threadIdx.x + n_sel; t < padded; t += blockDim.x) sel[t] = ~0ull;
    det_block_bitonic_sort(sel, padded);
    for (long long p = threadIdx.x; p < kk; p += blockDim.x) {
        long long local = (long long)(sel[p] & 0xffffffffull);
        indices[out_off + p] = seg_off + local;
        values[out_off + p] = seg[local];
    }
}
