// Shape ops: concat / narrow (block copies), permute, index_select and its backward.
//
// The copies move 32-bit words, not floats, so one kernel serves every dtype the
// device holds: an f32 element is one word, an i64 element two (the launcher scales
// strides and lengths). Moving words never touches the bits (no NaN canonicalisation).
#include "common.cuh"

// dst[r * dst_stride + dst_off + j] = src[r * src_stride + src_off + j]
// for r < rows, j < len (all in words). Concat, narrow and their backwards.
extern "C" __global__ void block_copy_u32(const unsigned int* __restrict__ src, long long src_stride, long long src_off,
                                          unsigned int* __restrict__ dst, long long dst_stride, long long dst_off,
                                          long long rows, long long len) {
    KESTREL_LOOP(i, rows * len) {
        long long r = i / len, j = i - r * len;
        dst[r * dst_stride + dst_off + j] = src[r * src_stride + src_off + j];
    }
}

// Largest rank permute_u32 takes (after the host merges contiguous axes).
#define KESTREL_PERMUTE_MAX_RANK 16

// dst (contiguous, dims meta[0..rank]) gathers src with the source stride of each
// output axis in meta[rank..2 rank]: dst[i] = src[sum_d coord_d(i) * stride_d].
extern "C" __global__ void permute_u32(const unsigned int* __restrict__ src, unsigned int* __restrict__ dst,
                                       const long long* __restrict__ meta, int rank, long long n) {
    __shared__ long long dims[KESTREL_PERMUTE_MAX_RANK];
    __shared__ long long strides[KESTREL_PERMUTE_MAX_RANK];
    for (int d = threadIdx.x; d < rank; d += blockDim.x) {
        dims[d] = meta[d];
        strides[d] = meta[rank + d];
    }
    __syncthreads();
    KESTREL_LOOP(i, n) {
        long long rem = i, off = 0;
        for (int d = rank - 1; d > 0; --d) {
            long long q = rem / dims[d];
            off += (rem - q * dims[d]) * strides[d];
            rem = q;
        }
        off += rem * strides[0];
        dst[i] = src[off];
    }
}

// dst[o, r, j] = src[o, idx[r], j] for src [outer, src_rows, inner] and idx [k]
// (inner in words). An index outside [0, src_rows) writes 0 and raises *bad to
// (largest such r) + 1, which the host turns into an error.
extern "C" __global__ void index_select_u32(const unsigned int* __restrict__ src, const long long* __restrict__ idx,
                                            unsigned int* __restrict__ dst, int* __restrict__ bad,
                                            long long outer, long long src_rows, long long k, long long inner) {
    KESTREL_LOOP(i, outer * k * inner) {
        long long j = i % inner, rest = i / inner;
        long long r = rest % k, o = rest / k;
        long long s = idx[r];
        if (s < 0 || s >= src_rows) {
            atomicMax(bad, (int)(r + 1 < 2147483647LL ? r + 1 : 2147483647LL));
            dst[i] = 0u;
        } else {
            dst[i] = src[(o * src_rows + s) * inner + j];
        }
    }
}

// Backward of index_select: gx[o, idx[r], j] += gy[o, r, j] (gx zero-filled, indices
// already checked by the forward). One thread per column (o, j), adding the rows r
// in ascending order: repeated indices accumulate in a fixed order, without atomics,
// so every run gives the same bits (and the CPU's sums).
extern "C" __global__ void index_add_f32(const float* __restrict__ gy, const long long* __restrict__ idx,
                                         float* __restrict__ gx, long long outer, long long dst_rows,
                                         long long k, long long inner) {
    KESTREL_LOOP(i, outer * inner) {
        long long j = i % inner, o = i / inner;
        for (long long r = 0; r < k; ++r) gx[(o * dst_rows + idx[r]) * inner + j] += gy[(o * k + r) * inner + j];
    }
}
