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
//          (oh = (ih + ph - ki*dh) / sh when that divides exactly and lies in range).
//          With a stride, the taps that divide depend only on (ih mod sh, iw mod sw):
//          grid.z runs over those sh*sw phases, each block's rows are the pixels of
//          one phase and its K axis only the phase's live taps (a 3x3/2 conv reduces
//          over 9/4 taps on average instead of loading 9 and zero-filling most).
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

// A mixed-radix position (hi, mid, lo) with lo < rlo, mid < rmid: a K index or a
// pixel index split into its coordinates once per thread, then advanced by TC_BK per
// tile with carries, so the gather does no division per chunk.
struct TcDigits {
    int hi, mid, lo;
};

__device__ __forceinline__ TcDigits tc_digits(long long v, int rmid, int rlo) {
    long long t = v / rlo;
    return TcDigits{(int)(t / rmid), (int)(t % rmid), (int)(v % rlo)};
}

// d += s (s = tc_digits(TC_BK)): each digit carries at most once, both addends (plus
// the carry in) being below twice the radix.
__device__ __forceinline__ void tc_advance(TcDigits& d, const TcDigits& s, int rmid, int rlo) {
    d.lo += s.lo;
    int c = d.lo >= rlo;
    d.lo -= c ? rlo : 0;
    d.mid += s.mid + c;
    c = d.mid >= rmid;
    d.mid -= c ? rmid : 0;
    d.hi += s.hi + c;
}

// The taps of one stride phase along one axis of the input gradient. Input
// coordinate i = q s + r receives from tap t only when i + p - t d is a multiple of the
// stride s, i.e. t = first + j step (step = s / gcd(s, d)); its output coordinate is
// then (i + p - t d) / s = q + a - j b. Every other tap is structurally zero: the
// DGRAD kernel reduces over the `count` live taps of its phase only.
struct TcTaps {
    int first, step, count, a, b;
};

__device__ __forceinline__ TcTaps tc_taps(int r, int p, int k, int s, int d) {
    TcTaps t;
    t.first = 0;
    while (t.first < k && ((r + p - t.first * d) % s + s) % s != 0) ++t.first;
    int g = s, e = d;
    while (e) {
        int m = g % e;
        g = e;
        e = m;
    }
    t.step = s / g;
    t.count = t.first < k ? (k - 1 - t.first) / t.step + 1 : 0;
    t.a = (r + p - t.first * d) / s;  // exact when count > 0
    t.b = t.step * d / s;             // exact: step d = s (d / g)
    return t;
}

// Per-thread gather state: the rows (FWD, DGRAD) or columns (WGRAD) a thread copies
// are fixed for the whole K loop, so their coordinates are computed once; the K
// coordinates advance by TC_BK per tile.
struct TcGather {
    // FWD / DGRAD: this thread's two A rows and two B rows (rows tid/4 and tid/4 + 32),
    // K chunk (tid % 4) * 8.
    const kbf16* arow[2];  // image base of the A row; null past M
    int ay[2], ax[2];      // FWD: oh sh - ph, ow sw - pw; DGRAD: output coords before taps
    const kbf16* brow[2];  // weight row; null past NN
    // WGRAD: row chunk (tid % 8) * 8 of A (Cout) and B ((ki, kj, c)); pixels tid/8, +16.
    bool aok, bok;
    int wki, wkj, wc;
    TcDigits pd[2];  // (n, oh, ow) of the two pixels
    long long k[2];  // linear K index of each chunk (FWD/DGRAD use k[0])
    TcDigits kd;     // FWD (ki, kj, c); DGRAD (jh, jw, co) of the live taps
    TcDigits step;   // TC_BK in the same radices
    int rmid, rlo;
};

// Issue the cp.async copies of the next K tile into stage buffers sa/sb and advance.
template <int MODE>
__device__ __forceinline__ void tc_load_tile(kbf16* sa, kbf16* sb, const kbf16* a, const kbf16* b, const TcGeom& g,
                                             const TcTaps& th, const TcTaps& tw, TcGather& s, long long kend) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        const kbf16* pa = nullptr;
        const kbf16* pb = nullptr;
        int so;
        if (MODE == TC_FWD) {
            so = (threadIdx.x / 4 + 32 * i) * TC_LDK + (threadIdx.x % 4) * 8;
            if (s.k[0] < kend) {
                int ih = s.ay[i] + s.kd.hi * g.dh, iw = s.ax[i] + s.kd.mid * g.dw;
                if (s.arow[i] && ih >= 0 && ih < g.H && iw >= 0 && iw < g.W)
                    pa = s.arow[i] + ((long long)ih * g.W + iw) * g.Cp + s.kd.lo;
                if (s.brow[i]) pb = s.brow[i] + s.k[0];
            }
        } else if (MODE == TC_DGRAD) {
            so = (threadIdx.x / 4 + 32 * i) * TC_LDK + (threadIdx.x % 4) * 8;
            if (s.k[0] < kend) {
                int oh = s.ay[i] - s.kd.hi * th.b, ow = s.ax[i] - s.kd.mid * tw.b;
                if (s.arow[i] && oh >= 0 && oh < g.OH && ow >= 0 && ow < g.OW)
                    pa = s.arow[i] + ((long long)oh * g.OW + ow) * g.Coutp + s.kd.lo;
                int ki = th.first + s.kd.hi * th.step, kj = tw.first + s.kd.mid * tw.step;
                if (s.brow[i]) pb = s.brow[i] + (ki * g.kw + kj) * g.Coutp + s.kd.lo;
            }
        } else {
            so = (threadIdx.x / 8 + 16 * i) * TC_LDR + (threadIdx.x % 8) * 8;
            if (s.k[i] < kend) {
                if (s.aok) pa = a + s.k[i] * g.Coutp + (long long)(blockIdx.x * TC_BM + (threadIdx.x % 8) * 8);
                int ih = s.pd[i].mid * g.sh - g.ph + s.wki * g.dh, iw = s.pd[i].lo * g.sw - g.pw + s.wkj * g.dw;
                if (s.bok && ih >= 0 && ih < g.H && iw >= 0 && iw < g.W)
                    pb = b + (((long long)s.pd[i].hi * g.H + ih) * g.W + iw) * g.Cp + s.wc;
            }
        }
        // A zero-filled chunk still needs a valid source address: the matrix's start.
        kestrel_cp_async16(sa + so, pa ? pa : a, pa ? 16 : 0);
        kestrel_cp_async16(sb + so, pb ? pb : b, pb ? 16 : 0);
    }
    if (MODE == TC_WGRAD) {
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            s.k[i] += TC_BK;
            tc_advance(s.pd[i], s.step, g.OH, g.OW);
        }
    } else {
        s.k[0] += TC_BK;
        tc_advance(s.kd, s.step, s.rmid, s.rlo);
    }
}

template <int MODE, int BUG>
__device__ __forceinline__ void tc_conv_gemm(const kbf16* a, const kbf16* b, void* out, const float* scale,
                                             const float* shift, const void* res, const TcGeom g, int flags,
                                             kbf16* smem) {
    long long M, NN, K;
    // DGRAD: blockIdx.z is the stride phase (rh, rw) of the input pixels this block
    // computes; its rows are the pixels (n, q_h sh + rh, q_w sw + rw).
    const int rh = MODE == TC_DGRAD ? (int)blockIdx.z / g.sw : 0, rw = MODE == TC_DGRAD ? (int)blockIdx.z % g.sw : 0;
    const int hq = MODE == TC_DGRAD ? (g.H - rh + g.sh - 1) / g.sh : 1, wq = MODE == TC_DGRAD ? (g.W - rw + g.sw - 1) / g.sw : 1;
    TcTaps th{}, tw{};
    if (MODE == TC_FWD) {
        M = (long long)g.N * g.OH * g.OW, NN = g.Cout, K = (long long)g.kh * g.kw * g.Cp;
    } else if (MODE == TC_DGRAD) {
        th = tc_taps(rh, g.ph, g.kh, g.sh, g.dh);
        tw = tc_taps(rw, g.pw, g.kw, g.sw, g.dw);
        M = (long long)g.N * hq * wq, NN = g.Cin, K = (long long)th.count * tw.count * g.Coutp;
    } else {
        M = g.Cout, NN = (long long)g.kh * g.kw * g.Cp, K = (long long)g.N * g.OH * g.OW;
    }
    const long long bm = (long long)blockIdx.x * TC_BM, bn = (long long)blockIdx.y * TC_BN;
    if (bm >= M) return;  // whole block: a DGRAD phase with fewer rows than the grid
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
    const long long nsplit = MODE == TC_WGRAD ? gridDim.z : 1, z = MODE == TC_WGRAD ? blockIdx.z : 0;
    const long long per = (all_tiles + nsplit - 1) / nsplit;
    const long long t0 = min(all_tiles, z * per);
    const long long ktiles = min(all_tiles, t0 + per) - t0;
    const long long k0 = t0 * TC_BK, kend = min(K, (t0 + ktiles) * TC_BK);
    if (nsplit > 1) out = (float*)out + z * g.Cout * g.Cin * g.kh * g.kw;

    TcGather st;
    if (MODE == TC_WGRAD) {
        int r = (threadIdx.x % 8) * 8;
        st.aok = bm + r < g.Coutp;
        long long col = bn + r;
        st.bok = col < NN;
        int tap = (int)(col / g.Cp);
        st.wc = (int)(col % g.Cp), st.wki = tap / g.kw, st.wkj = tap % g.kw;
        st.step = tc_digits(TC_BK, g.OH, g.OW);
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            st.k[i] = k0 + threadIdx.x / 8 + 16 * i;
            st.pd[i] = tc_digits(st.k[i], g.OH, g.OW);
        }
    } else if (MODE != TC_WGRAD && K > 0) {
        st.k[0] = k0 + (threadIdx.x % 4) * 8;
        st.rmid = MODE == TC_FWD ? g.kw : tw.count;
        st.rlo = MODE == TC_FWD ? g.Cp : g.Coutp;
        st.kd = tc_digits(st.k[0], st.rmid, st.rlo);
        st.step = tc_digits(TC_BK, st.rmid, st.rlo);
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            long long row = bm + threadIdx.x / 4 + 32 * i, col = bn + threadIdx.x / 4 + 32 * i;
            st.arow[i] = nullptr;
            st.ay[i] = st.ax[i] = 0;
            if (row < M && MODE == TC_FWD) {
                long long ohw = (long long)g.OH * g.OW;
                int n = (int)(row / ohw), p = (int)(row % ohw);
                st.arow[i] = a + (long long)n * g.H * g.W * g.Cp;
                st.ay[i] = p / g.OW * g.sh - g.ph;
                st.ax[i] = p % g.OW * g.sw - g.pw;
            } else if (row < M) {
                long long hwq = (long long)hq * wq;
                int n = (int)(row / hwq), q = (int)(row % hwq);
                st.arow[i] = a + (long long)n * g.OH * g.OW * g.Coutp;
                st.ay[i] = q / wq + th.a;
                st.ax[i] = q % wq + tw.a;
            }
            long long kfull = (long long)g.kh * g.kw * (MODE == TC_FWD ? g.Cp : g.Coutp);
            st.brow[i] = col < NN ? b + col * kfull : nullptr;
        }
    }

    // Prologue: STAGES-1 tiles in flight. Every iteration commits a group (possibly
    // empty) so that wait_group<STAGES-2> always means "tile kt has landed".
#pragma unroll
    for (int s = 0; s < TC_STAGES - 1; ++s) {
        if (s < ktiles)
            tc_load_tile<MODE>(smem + s * 2 * TC_TILE, smem + s * 2 * TC_TILE + TC_TILE, a, b, g, th, tw, st,
                               kend);
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
            tc_load_tile<MODE>(smem + s * 2 * TC_TILE, smem + s * 2 * TC_TILE + TC_TILE, a, b, g, th, tw, st,
                               kend);
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
                    long long hwq = (long long)hq * wq;
                    int q = (int)(row % hwq), ih = q / wq * g.sh + rh, iw = q % wq * g.sw + rw;
                    idx = ((row / hwq * g.Cin + col) * g.H + ih) * g.W + iw;
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
// [Cin][kh][kw][Coutp] bf16. Grid (ceil(N*ceil(H/sh)*ceil(W/sw) / 64), ceil(Cin / 64),
// sh*sw): one z per stride phase.
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
