// Ordered block-wide stream compaction (warp ballots), shared by the kernels that
// pack flagged elements in input order with one block: box_remove_small_f32,
// proposals_select_f32, nms_groups_*.
#pragma once

// Shared state of one compaction: per-warp totals of the current chunk and the
// number of elements already placed.
struct BlockCompact {
    int warp_tot[32];
    long long base;
};

// Zero the count; call with the whole block before the first step.
__device__ __forceinline__ void block_compact_init(BlockCompact& s) {
    if (threadIdx.x == 0) s.base = 0;
    __syncthreads();
}

// One chunk of blockDim.x elements (a multiple of 32), every thread of the block
// calling with its flag: returns the output position of a flagged thread (elements
// placed before the chunk + flagged threads before it in the chunk) and advances the
// count by the chunk's flagged elements. Ends with a barrier, so `s.base` is the
// block-wide count after the call.
__device__ __forceinline__ long long block_compact_step(BlockCompact& s, bool ok) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    unsigned int bal = __ballot_sync(0xffffffffu, ok);
    if (lane == 0) s.warp_tot[warp] = __popc(bal);
    __syncthreads();
    long long pos = s.base;
    for (int w = 0; w < warp; ++w) pos += s.warp_tot[w];
    pos += __popc(bal & ((1u << lane) - 1u));
    __syncthreads();
    if (threadIdx.x == 0) {
        long long t = 0;
        for (int w = 0; w < nwarps; ++w) t += s.warp_tot[w];
        s.base += t;
    }
    __syncthreads();
    return pos;
}
