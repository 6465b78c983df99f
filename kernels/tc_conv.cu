// Convolution (forward, input gradient, weight gradient) and linear layers as
// implicit GEMM on tensor cores: bf16 operands, f32 accumulation, fused epilogue.
//
// Operands live in device memory as bf16 NHWC with the channel count padded to a
// multiple of 8 (`Cp`, zeros in the padding; tc_pack_* below build them), so every
// 8 consecutive elements of the reduction axis are one aligned 16-byte chunk: a
// chunk is either copied by one cp.async or zero-filled (src-size 0) when it falls in
// the convolution's padding or past the end of a matrix. No im2col matrix exists:
// each block gathers its A and B tiles from the activations as it goes.
//
// The GEMM, per mode (M x NN output, K reduction):
//   FWD    y[m=(n,oh,ow), co]     = sum_{k=(ki,kj,c)}  x[n, ih, iw, c] * w[co, ki, kj, c]
//   DGRAD  dx[m=(n,ih,iw), c]     = sum_{k=(ki,kj,co)} gy[n, oh, ow, co] * w[co, ki, kj, c]
//          (oh = (ih + ph - ki*dh) / sh when that divides exactly and lies in range)
//   WGRAD  dw[co, (ki,kj,c)]      = sum_{k=(n,oh,ow)}  gy[n, oh, ow, co] * x[n, ih, iw, c]
// FWD and DGRAD tiles are contiguous along K (smem [rows][K], plain ldmatrix); WGRAD
// tiles are contiguous along M or N (smem [K][rows], ldmatrix .trans), so both
// ldmatrix forms are on the main path. A linear layer is the 1x1 case on 1x1 maps.
//
// Block: 128 threads (4 warps, 2 x 2), tile BM x BN = 64 x 64, BK = 32, STAGES = 3
// cp.async stages; each warp owns 32 x 32 (2 x 4 mma tiles of 16 x 8). Shared rows
// are padded by 16 bytes so the 8 row addresses of an ldmatrix phase fall in distinct
// bank groups (row strides of 80 and 144 bytes).
//
// Epilogue (every mode): v = acc * scale[col] + shift[col] + residual, then ReLU,
// written as f32 or bf16 (round to nearest even) straight into the NCHW output (FWD,
// DGRAD) or the [Cout, Cin, kh, kw] weight gradient (WGRAD).
#include "mma.cuh"

#define TC_BM 64
#define TC_BN 64
#define TC_BK 32
#define TC_STAGES 3
#define TC_THREADS 128
#define TC_LDK (TC_BK + 8)  // row stride of a [rows][K] tile
#define TC_LDR (TC_BM + 8)  // row stride of a [K][rows] tile (BM == BN)
#define TC_TILE 2560        // bf16 per operand per stage: max(64 * 40, 32 * 72)
#define TC_SMEM (TC_STAGES * 2 * TC_TILE)  // 30 KiB: static, under the 48 KiB limit

enum { TC_FWD = 0, TC_DGRAD = 1, TC_WGRAD = 2 };
// Planted bugs for the emulator's own tests (tests/tensor_core.rs): each must fail.
enum { TC_OK = 0, TC_BUG_NO_WAIT = 1, TC_BUG_NO_BARRIER = 2, TC_BUG_TRANSPOSED_B = 3 };
enum {
    TC_RELU = 1,
    TC_OUT_BF16 = 2,
    TC_RES_BF16 = 4,
    TC_HAS_SCALE = 8,
    TC_HAS_SHIFT = 16,
    TC_HAS_RES = 32,
    // FWD only: y and the residual are bf16 NHWC with Coutp channels (the layout the
    // next conv gathers from), the padding channels written as zeros, so a chain of
    // convs needs no pack or unpack launch between layers.
    TC_NHWC = 64
};

struct TcGeom {
    int N, H, W, Cin, Cp;     // input (NHWC, Cp = Cin rounded up to 8)
    int Cout, Coutp, OH, OW;  // output (gy NHWC has Coutp channels)
    int kh, kw, sh, sw, ph, pw, dh, dw;
};

// The global address of the 16-byte chunk at (row, k) of operand A (IS_B false) or
// B, or null when the chunk is zeros (padding, past the end).
template <int MODE, bool IS_B>
__device__ __forceinline__ const kbf16* tc_chunk(const kbf16* src, const TcGeom& g, long long row, long long k,
                                                 long long M, long long NN, long long K, long long kend) {
    if (k >= kend) return nullptr;
    if (MODE == TC_FWD && !IS_B) {  // x gathered at output pixel `row`, tap/channel k
        if (row >= M) return nullptr;
        long long ohw = (long long)g.OH * g.OW;
        int n = (int)(row / ohw), p = (int)(row % ohw), oh = p / g.OW, ow = p % g.OW;
        int tap = (int)(k / g.Cp), c = (int)(k % g.Cp), ki = tap / g.kw, kj = tap % g.kw;
        int ih = oh * g.sh - g.ph + ki * g.dh, iw = ow * g.sw - g.pw + kj * g.dw;
        if (ih < 0 || ih >= g.H || iw < 0 || iw >= g.W) return nullptr;
        return src + (((long long)n * g.H + ih) * g.W + iw) * g.Cp + c;
    } else if (MODE == TC_FWD && IS_B) {  // w[co][ki][kj][Cp]
        if (row >= NN) return nullptr;
        return src + row * K + k;
    } else if (MODE == TC_DGRAD && !IS_B) {  // gy gathered at input pixel `row`
        if (row >= M) return nullptr;
        long long hw = (long long)g.H * g.W;
        int n = (int)(row / hw), p = (int)(row % hw), ih = p / g.W, iw = p % g.W;
        int tap = (int)(k / g.Coutp), co = (int)(k % g.Coutp), ki = tap / g.kw, kj = tap % g.kw;
        int th = ih + g.ph - ki * g.dh, tw = iw + g.pw - kj * g.dw;
        if (th < 0 || tw < 0 || th % g.sh != 0 || tw % g.sw != 0) return nullptr;
        int oh = th / g.sh, ow = tw / g.sw;
        if (oh >= g.OH || ow >= g.OW) return nullptr;
        return src + (((long long)n * g.OH + oh) * g.OW + ow) * g.Coutp + co;
    } else if (MODE == TC_DGRAD && IS_B) {  // wt[c][ki][kj][Coutp]
        if (row >= NN) return nullptr;
        return src + row * K + k;
    } else if (MODE == TC_WGRAD && !IS_B) {  // gy[pixel k][co = row]
        if (row >= g.Coutp) return nullptr;
        return src + k * g.Coutp + row;
    } else {  // WGRAD B: x gathered at output pixel k, column row = (ki, kj, c)
        if (row >= NN) return nullptr;
        long long ohw = (long long)g.OH * g.OW;
        int n = (int)(k / ohw), p = (int)(k % ohw), oh = p / g.OW, ow = p % g.OW;
        int tap = (int)(row / g.Cp), c = (int)(row % g.Cp), ki = tap / g.kw, kj = tap % g.kw;
        int ih = oh * g.sh - g.ph + ki * g.dh, iw = ow * g.sw - g.pw + kj * g.dw;
        if (ih < 0 || ih >= g.H || iw < 0 || iw >= g.W) return nullptr;
        return src + (((long long)n * g.H + ih) * g.W + iw) * g.Cp + c;
    }
}

// Issue the cp.async copies of K-tile `kt` into stage buffers sa/sb.
template <int MODE>
__device__ __forceinline__ void tc_load_tile(kbf16* sa, kbf16* sb, const kbf16* a, const kbf16* b,
                                             const TcGeom& g, long long bm, long long bn, long long kt,
                                             long long M, long long NN, long long K, long long kend) {
    const bool kmajor = MODE != TC_WGRAD;
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        int e = threadIdx.x + i * TC_THREADS;  // 256 chunks per operand tile
        // [rows][K] tiles: row e/4, k chunk e%4; [K][rows] tiles: k e/8, row chunk e%8.
        int r = kmajor ? e / 4 : (e % 8) * 8, kk = kmajor ? (e % 4) * 8 : e / 8;
        int so = kmajor ? r * TC_LDK + kk : kk * TC_LDR + r;
        const kbf16* pa = tc_chunk<MODE, false>(a, g, bm + r, kt + kk, M, NN, K, kend);
        const kbf16* pb = tc_chunk<MODE, true>(b, g, bn + r, kt + kk, M, NN, K, kend);
        // A zero-filled chunk still needs a valid source address: the matrix's start.
        kestrel_cp_async16(sa + so, pa ? pa : a, pa ? 16 : 0);
        kestrel_cp_async16(sb + so, pb ? pb : b, pb ? 16 : 0);
    }
}

template <int MODE, int BUG>
__device__ __forceinline__ void tc_conv_gemm(const kbf16* a, const kbf16* b, void* out, const float* scale,
                                             const float* shift, const void* res, const TcGeom g, int flags,
                                             kbf16* smem) {
    long long M, NN, K;
    if (MODE == TC_FWD) {
        M = (long long)g.N * g.OH * g.OW, NN = g.Cout, K = (long long)g.kh * g.kw * g.Cp;
    } else if (MODE == TC_DGRAD) {
        M = (long long)g.N * g.H * g.W, NN = g.Cin, K = (long long)g.kh * g.kw * g.Coutp;
    } else {
        M = g.Cout, NN = (long long)g.kh * g.kw * g.Cp, K = (long long)g.N * g.OH * g.OW;
    }
    const long long bm = (long long)blockIdx.x * TC_BM, bn = (long long)blockIdx.y * TC_BN;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int wm = (warp / 2) * 32, wn = (warp % 2) * 32;
    const bool kmajor = MODE != TC_WGRAD;

    float acc[2][4][4];
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
            for (int q = 0; q < 4; ++q) acc[i][j][q] = 0.f;

    // Split-K (WGRAD, gridDim.z > 1): slice z reduces K tiles [z per, (z + 1) per) and
    // writes its partial sums to its own slab of `out`; tc_splitk_reduce_f32 then adds
    // the slabs in z order, so the result does not depend on scheduling.
    const long long all_tiles = (K + TC_BK - 1) / TC_BK;
    const long long per = (all_tiles + gridDim.z - 1) / gridDim.z;
    const long long t0 = min(all_tiles, (long long)blockIdx.z * per);
    const long long ktiles = min(all_tiles, t0 + per) - t0;
    const long long k0 = t0 * TC_BK, kend = min(K, (t0 + ktiles) * TC_BK);
    if (gridDim.z > 1) out = (float*)out + (long long)blockIdx.z * g.Cout * g.Cin * g.kh * g.kw;
    // Prologue: STAGES-1 tiles in flight. Every iteration commits a group (possibly
    // empty) so that wait_group<STAGES-2> always means "tile kt has landed".
#pragma unroll
    for (int s = 0; s < TC_STAGES - 1; ++s) {
        if (s < ktiles)
            tc_load_tile<MODE>(smem + s * 2 * TC_TILE, smem + s * 2 * TC_TILE + TC_TILE, a, b, g, bm, bn,
                               k0 + (long long)s * TC_BK, M, NN, K, kend);
        kestrel_cp_async_commit();
    }
    for (long long kt = 0; kt < ktiles; ++kt) {
        if (BUG != TC_BUG_NO_WAIT) kestrel_cp_async_wait<TC_STAGES - 2>();
        // Tile kt is visible to every warp, and every warp is done with tile kt-1,
        // whose stage the copy below overwrites.
        if (BUG != TC_BUG_NO_BARRIER) __syncthreads();
        long long nk = kt + TC_STAGES - 1;
        if (nk < ktiles) {
            int s = (int)(nk % TC_STAGES);
            tc_load_tile<MODE>(smem + s * 2 * TC_TILE, smem + s * 2 * TC_TILE + TC_TILE, a, b, g, bm, bn,
                               k0 + nk * TC_BK, M, NN, K, kend);
        }
        kestrel_cp_async_commit();

        const kbf16* sa = smem + (int)(kt % TC_STAGES) * 2 * TC_TILE;
        const kbf16* sb = sa + TC_TILE;
#pragma unroll
        for (int kk = 0; kk < TC_BK; kk += 16) {
            unsigned af[2][4], bfr[2][4];
#pragma unroll
            for (int mi = 0; mi < 2; ++mi) {
                int r0 = wm + mi * 16;
                if (kmajor) {
                    // Matrices (rows 0-7, k 0-7), (8-15, 0-7), (0-7, 8-15), (8-15, 8-15) = a0..a3.
                    kestrel_ldmatrix<4, false>(af[mi], sa + (r0 + lane % 16) * TC_LDK + kk + (lane / 16) * 8);
                } else {
                    int j = lane / 8, r = lane % 8;
                    kestrel_ldmatrix<4, true>(af[mi], sa + (kk + r + (j / 2) * 8) * TC_LDR + r0 + (j % 2) * 8);
                }
            }
#pragma unroll
            for (int nj = 0; nj < 2; ++nj) {
                int c0 = wn + nj * 16;
                if (kmajor) {
                    // Matrices (n 0-7, k 0-7), (0-7, 8-15), (8-15, 0-7), (8-15, 8-15): b0, b1 of
                    // two n8 tiles.
                    const kbf16* p = sb + (c0 + lane % 8 + (lane / 16) * 8) * TC_LDK + kk + ((lane / 8) % 2) * 8;
                    if (BUG == TC_BUG_TRANSPOSED_B)
                        kestrel_ldmatrix<4, true>(bfr[nj], p);
                    else
                        kestrel_ldmatrix<4, false>(bfr[nj], p);
                } else {
                    int j = lane / 8, r = lane % 8;
                    kestrel_ldmatrix<4, true>(bfr[nj], sb + (kk + r + (j % 2) * 8) * TC_LDR + c0 + (j / 2) * 8);
                }
            }
#pragma unroll
            for (int mi = 0; mi < 2; ++mi)
#pragma unroll
                for (int ni = 0; ni < 4; ++ni)
                    kestrel_mma_bf16_16816(acc[mi][ni], af[mi], &bfr[ni / 2][(ni % 2) * 2], acc[mi][ni]);
        }
    }
    kestrel_cp_async_wait<0>();

    // Epilogue straight from the accumulator fragments: c0..c3 of tile (mi, ni) sit at
    // rows g, g, g+8, g+8 and columns 2t, 2t+1, 2t, 2t+1.
    const int gq = lane / 4, tq = lane % 4;
#pragma unroll
    for (int mi = 0; mi < 2; ++mi)
#pragma unroll
        for (int ni = 0; ni < 4; ++ni)
#pragma unroll
            for (int q = 0; q < 4; ++q) {
                long long row = bm + wm + mi * 16 + gq + (q >= 2 ? 8 : 0);
                long long col = bn + wn + ni * 8 + 2 * tq + (q & 1);
                if (row >= M) continue;
                long long idx;
                if (MODE == TC_FWD && (flags & TC_NHWC)) {
                    if (col >= g.Coutp) continue;
                    idx = row * g.Coutp + col;
                    if (col >= NN) {  // channel padding: zeros, the next conv multiplies them
                        ((kbf16*)out)[idx] = 0;
                        continue;
                    }
                } else if (col >= NN) {
                    continue;
                } else if (MODE == TC_FWD) {
                    long long ohw = (long long)g.OH * g.OW;
                    idx = (row / ohw * g.Cout + col) * ohw + row % ohw;
                } else if (MODE == TC_DGRAD) {
                    long long hw = (long long)g.H * g.W;
                    idx = (row / hw * g.Cin + col) * hw + row % hw;
                } else {
                    int tap = (int)(col / g.Cp), c = (int)(col % g.Cp);
                    if (c >= g.Cin) continue;  // channel padding
                    idx = ((row * g.Cin + c) * g.kh + tap / g.kw) * g.kw + tap % g.kw;
                }
                float v = acc[mi][ni][q];
                if (flags & TC_HAS_SCALE) v *= scale[col];
                if (flags & TC_HAS_SHIFT) v += shift[col];
                if (flags & TC_HAS_RES)
                    v += (flags & TC_RES_BF16) ? kestrel_bf16_to_f32(((const kbf16*)res)[idx]) : ((const float*)res)[idx];
                if (flags & TC_RELU) v = v > 0.f ? v : 0.f;
                if (flags & TC_OUT_BF16)
                    ((kbf16*)out)[idx] = kestrel_f32_to_bf16(v);
                else
                    ((float*)out)[idx] = v;
            }
}

#define TC_GEOM_PARAMS                                                                                        \
    int N, int H, int W, int Cin, int Cp, int Cout, int Coutp, int OH, int OW, int kh, int kw, int sh, int sw, \
        int ph, int pw, int dh, int dw
#define TC_GEOM TcGeom{N, H, W, Cin, Cp, Cout, Coutp, OH, OW, kh, kw, sh, sw, ph, pw, dh, dw}

// y [N, Cout, OH, OW] (f32 or bf16) = epilogue(conv(x, w)); x NHWC-Cp bf16, w
// [Cout][kh][kw][Cp] bf16. Grid (ceil(N*OH*OW / 64), ceil(Cout / 64)), 128 threads.
extern "C" __global__ void __launch_bounds__(TC_THREADS) tc_conv_fwd_bf16(
        const kbf16* x, const kbf16* w, void* y, const float* scale, const float* shift, const void* res,
        TC_GEOM_PARAMS, int flags) {
    __shared__ __align__(16) kbf16 smem[TC_SMEM];
    tc_conv_gemm<TC_FWD, TC_OK>(x, w, y, scale, shift, res, TC_GEOM, flags, smem);
}

// dx [N, Cin, H, W] = epilogue(conv_transpose(gy, w)); gy NHWC-Coutp bf16, wt
// [Cin][kh][kw][Coutp] bf16. Grid (ceil(N*H*W / 64), ceil(Cin / 64)).
extern "C" __global__ void __launch_bounds__(TC_THREADS) tc_conv_dgrad_bf16(
        const kbf16* gy, const kbf16* wt, void* dx, const float* scale, const float* shift, const void* res,
        TC_GEOM_PARAMS, int flags) {
    __shared__ __align__(16) kbf16 smem[TC_SMEM];
    tc_conv_gemm<TC_DGRAD, TC_OK>(gy, wt, dx, scale, shift, res, TC_GEOM, flags, smem);
}

// dw [Cout, Cin, kh, kw] = epilogue(sum over pixels of gy x^T); gy NHWC-Coutp, x
// NHWC-Cp. Grid (ceil(Cout / 64), ceil(kh*kw*Cp / 64), splits): with splits > 1, gw is
// an f32 workspace of `splits` partial weight gradients (no epilogue flags), summed
// by tc_splitk_reduce_f32.
extern "C" __global__ void __launch_bounds__(TC_THREADS) tc_conv_wgrad_bf16(
        const kbf16* gy, const kbf16* x, void* gw, const float* scale, const float* shift, const void* res,
        TC_GEOM_PARAMS, int flags) {
    __shared__ __align__(16) kbf16 smem[TC_SMEM];
    tc_conv_gemm<TC_WGRAD, TC_OK>(gy, x, gw, scale, shift, res, TC_GEOM, flags, smem);
}

// The forward kernel with one planted bug (`bug`: TC_BUG_*), for the emulator's tests.
extern "C" __global__ void __launch_bounds__(TC_THREADS) tc_conv_fwd_planted_bf16(
        const kbf16* x, const kbf16* w, void* y, const float* scale, const float* shift, const void* res,
        TC_GEOM_PARAMS, int flags, int bug) {
    __shared__ __align__(16) kbf16 smem[TC_SMEM];
    if (bug == TC_BUG_NO_WAIT)
        tc_conv_gemm<TC_FWD, TC_BUG_NO_WAIT>(x, w, y, scale, shift, res, TC_GEOM, flags, smem);
    else if (bug == TC_BUG_NO_BARRIER)
        tc_conv_gemm<TC_FWD, TC_BUG_NO_BARRIER>(x, w, y, scale, shift, res, TC_GEOM, flags, smem);
    else
        tc_conv_gemm<TC_FWD, TC_BUG_TRANSPOSED_B>(x, w, y, scale, shift, res, TC_GEOM, flags, smem);
}

// ---------------------------------------------------------------------------------
// Packing: NCHW (f32 or bf16) -> NHWC bf16 with C padded to Cp, and the two weight
// layouts. One thread per output element.
// ---------------------------------------------------------------------------------
__device__ __forceinline__ kbf16 tc_load_bf16(const void* p, long long i, int src_bf16) {
    return src_bf16 ? ((const kbf16*)p)[i] : kestrel_f32_to_bf16(((const float*)p)[i]);
}

// out[n, h, w, c] = x[n, c, h, w] (0 for c >= C).
extern "C" __global__ void tc_pack_nhwc_bf16(const void* x, kbf16* out, int N, int C, int H, int W, int Cp,
                                             int src_bf16) {
    long long total = (long long)N * H * W * Cp;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (long long)blockDim.x * gridDim.x) {
        int c = (int)(i % Cp);
        long long p = i / Cp;  // (n, h, w)
        int w = (int)(p % W), h = (int)((p / W) % H);
        long long n = p / ((long long)W * H);
        out[i] = c < C ? tc_load_bf16(x, ((n * C + c) * H + h) * W + w, src_bf16) : (kbf16)0;
    }
}

// w [Cout, Cin, kh, kw] -> FWD layout out[co][ki][kj][Cp] (transpose = 0) or DGRAD
// layout out[c][ki][kj][Coutp] (transpose = 1).
extern "C" __global__ void tc_pack_weight_bf16(const void* w, kbf16* out, int Cout, int Cin, int kh, int kw,
                                               int Cpad, int transpose, int src_bf16) {
    int rows = transpose ? Cin : Cout, cols = transpose ? Cout : Cin;
    long long total = (long long)rows * kh * kw * Cpad;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (long long)blockDim.x * gridDim.x) {
        int c = (int)(i % Cpad);
        long long rest = i / Cpad;
        int kj = (int)(rest % kw), ki = (int)((rest / kw) % kh);
        int r = (int)(rest / ((long long)kw * kh));
        kbf16 v = 0;
        if (c < cols) {
            int co = transpose ? c : r, ci = transpose ? r : c;
            v = tc_load_bf16(w, (((long long)co * Cin + ci) * kh + ki) * kw + kj, src_bf16);
        }
        out[i] = v;
    }
}

// out [N, C, H, W] (f32, or bf16 when out_bf16) = x[n, h, w, c]: leaves a chain of
// NHWC convs. Channels past C are dropped.
extern "C" __global__ void tc_unpack_nhwc_bf16(const kbf16* x, void* out, int N, int C, int H, int W, int Cp,
                                               int out_bf16) {
    long long total = (long long)N * C * H * W;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (long long)blockDim.x * gridDim.x) {
        long long hw = (long long)H * W, p = i % hw;
        int c = (int)((i / hw) % C);
        long long n = i / (hw * C);
        kbf16 v = x[(n * hw + p) * Cp + c];
        if (out_bf16)
            ((kbf16*)out)[i] = v;
        else
            ((float*)out)[i] = kestrel_bf16_to_f32(v);
    }
}

// out[i] = sum over z = 0, 1, ..., splits - 1 of ws[z n + i]: the split-K partial
// weight gradients added in a fixed order (deterministic, no float atomics).
extern "C" __global__ void tc_splitk_reduce_f32(const float* ws, float* out, long long n, int splits) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)blockDim.x * gridDim.x) {
        float s = ws[i];
        for (int z = 1; z < splits; ++z) s += ws[(long long)z * n + i];
        out[i] = s;
    }
}

// Element-wise casts for DType::BF16 tensors on the device.
extern "C" __global__ void cast_f32_to_bf16(const float* x, kbf16* y, long long n) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)blockDim.x * gridDim.x)
        y[i] = kestrel_f32_to_bf16(x[i]);
}
extern "C" __global__ void cast_bf16_to_f32(const kbf16* x, float* y, long long n) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)blockDim.x * gridDim.x)
        y[i] = kestrel_bf16_to_f32(x[i]);
}
