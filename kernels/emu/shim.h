// Kestrel's CUDA emulation shim: makes kernels/*.cu compile as host C++17 (g++ or
// clang++) so that the real kernel code runs on the CPU behind the engine's launch
// interface (src/device/emu.rs). build.rs compiles each kernel file as
//
//     #include "shim.h"                      (this file)
//     namespace kemu_file_<stem> {           (helpers of two files never clash)
//     #line 1 "kernels/<stem>.cu"
//     <the file, `extern __shared__` declarations rewritten, see below>
//     }
//     <one trampoline per extern "C" __global__ entry, taking void** args>
//
// How a launch runs (kernels/emu/runtime.cpp): every block of the grid runs on one
// worker OS thread (blocks in parallel across workers); the threads of a block are
// fibers (user-space coroutines, one small stack each) on that worker. A fiber runs
// until it reaches a barrier (__syncthreads, __syncwarp, a shuffle or a vote) or
// returns; when every thread the barrier waits for has arrived they all continue.
// So `__shared__` variables are `thread_local`: all fibers of a block share them, and a
// worker runs one block at a time.
//
// Supported: __global__/__device__/__host__/__forceinline__/__noinline__/__restrict__/
// __launch_bounds__/__align__/__constant__, static and dynamic (`extern __shared__`)
// shared memory, threadIdx/blockIdx/blockDim/gridDim/warpSize, __syncthreads (and
// _count/_and/_or), __syncwarp, __shfl_sync/_up/_down/_xor (any width), __ballot_sync,
// __any_sync, __all_sync, __activemask, atomics (Add/Sub/Exch/Min/Max/Inc/Dec/CAS/
// And/Or/Xor on the usual types), __threadfence*, __ldg, the float intrinsics
// (__expf, __fdividef, rsqrtf, __saturatef, __float_as_int, __float2int_rn, ...),
// the integer intrinsics (__popc, __clz, __ffs, __brev, __umulhi, ...), CUDA's
// global min/max overloads, vector types (float2/float4/int2/...), __half (_Float16)
// and __nv_bfloat16 with their conversions, device printf and assert.
//
// Limitations (by design or not yet needed):
// - Warps do not run in lockstep. Code that relies on implicit warp synchrony
//   without __syncwarp (pre-Volta "warp-synchronous" reductions over volatile shared
//   memory) is wrong on modern GPUs too, and gives wrong results here.
// - __activemask() waits until no thread of the block can run, then returns the
//   lanes of the warp that are waiting in __activemask() (the others exited or wait
//   at another barrier): the lanes that converged there, as on a GPU.
// - A lane that exits while others of its warp wait in a shuffle/vote/__syncwarp
//   that names it in the mask is reported as an error (undefined on a GPU).
//   Threads that exit before a __syncthreads count as arrived, as on sm_70+.
// - Static `__shared__` memory is not bounds-checked (thread_local storage is not
//   instrumented by AddressSanitizer); dynamic shared memory and device buffers are.
//   Shared memory is not zeroed: dynamic shared memory is filled with 0xFF bytes
//   (NaN floats) at the start of every block so that reads of unwritten shared memory
//   show up; static shared memory keeps whatever the worker's previous block left.
// - `extern __shared__ T name[];` must be on one line of its own (build.rs rewrites it
//   to a macro naming the block's dynamic shared memory).
// - Tensor cores and cp.async only through kernels/mma.cuh (mma.sync m16n8k16 bf16,
//   ldmatrix, cp.async with commit/wait groups), modelled in kernels/emu/tensorcore.inc.
// - No other inline PTX, no cooperative groups, no texture/surface
//   objects, no dynamic parallelism, no __constant__ writes from the host, no
//   clock-accurate timing. Kernels keep such paths under `#if __CUDA_ARCH__ >= ...`
//   (undefined here, so the portable path is compiled); `KESTREL_EMULATED` is 1.
// - Memory model: blocks on different workers see each other's writes only through
//   atomics, as on a GPU; within a block every barrier is a full fence.
// - Floating point is the host's: __expf and friends are exact libm functions, and
//   FMA contraction differs, so results match a GPU to float tolerance, not bitwise.
#pragma once

#include <assert.h>
#include <float.h>
#include <limits.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <type_traits>

// ---------------------------------------------------------------------------------
// Qualifiers
// ---------------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
// Dropped: fibers of one block write through pointers that other fibers read after a
// barrier, and the barrier is an ordinary call, so no-alias promises must not let the
// compiler keep values in registers across it.
#define __restrict__
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __constant__
#define __managed__
// Block-scope `thread_local` is implicitly static: one instance per worker thread, and
// a worker runs the fibers of one block at a time.
#define __shared__ thread_local
#define KESTREL_EMULATED 1

// ---------------------------------------------------------------------------------
// Built-in variables
// ---------------------------------------------------------------------------------
struct uint3 {
    unsigned x, y, z;
};
struct dim3 {
    unsigned x, y, z;
    constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
    constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
};

// Set by the scheduler before it resumes a fiber (threadIdx) or starts a block.
extern thread_local uint3 threadIdx;
extern thread_local uint3 blockIdx;
extern thread_local dim3 blockDim;
extern thread_local dim3 gridDim;
static constexpr int warpSize = 32;

// ---------------------------------------------------------------------------------
// The runtime's entry points (kernels/emu/runtime.cpp)
// ---------------------------------------------------------------------------------
namespace kemu {
void syncthreads();
int syncthreads_reduce(int pred, int op);  // op: 0 count, 1 and, 2 or
void syncwarp(unsigned mask);
// Every lane named in `mask` publishes `v`; returns the value lane `src` published.
unsigned long long warp_exchange(unsigned mask, unsigned long long v, int src);
unsigned warp_ballot(unsigned mask, int pred);
int warp_all(unsigned mask, int pred);  // every existing lane of `mask` has pred != 0
unsigned active_mask();
unsigned lane_id();
unsigned char* dynamic_shared();

// Tensor cores and cp.async (kernels/emu/tensorcore.inc; the device side is
// kernels/mma.cuh). Warp-collective: every lane of the warp calls them together.
void tc_mma_bf16_16816(float d[4], const unsigned a[4], const unsigned b[2], const float c[4]);
void tc_ldmatrix(unsigned* r, int count, bool trans, const void* row);
void tc_cp_async(void* dst, const void* src, int bytes, int src_bytes);
void tc_cp_async_commit();
void tc_cp_async_wait(int n);
unsigned short tc_f32_to_bf16(float f);
// Called after every block barrier: shared-memory accesses tracked by the tensor-core
// model are ordered by these epochs (a missing barrier between pipeline stages shows
// up as two warps touching one 16-byte chunk in the same epoch).
void tc_block_barrier();

template <class T>
inline unsigned long long to_bits(T v) {
    static_assert(sizeof(T) <= 8, "shuffles move at most 8 bytes");
    unsigned long long b = 0;
    memcpy(&b, &v, sizeof(T));
    return b;
}
template <class T>
inline T from_bits(unsigned long long b) {
    T v;
    memcpy(&v, &b, sizeof(T));
    return v;
}

// Parameter descriptions for the generated trampolines (see build.rs).
enum ParamKind : int { P_OTHER = 0, P_PTR = 1, P_I32 = 2, P_U32 = 3, P_I64 = 4, P_U64 = 5, P_F32 = 6, P_F64 = 7 };
struct Param {
    int kind;
    int size;       // bytes of the parameter
    int elem_size;  // bytes of the pointee for pointers (1 for void*)
};
struct EntryInfo {
    const char* name;
    void (*call)(void** args);
    int nparams;
    const Param* params;
};

template <class T>
constexpr Param param_of() {
    using U = std::remove_cv_t<T>;
    if constexpr (std::is_pointer_v<U>) {
        using E = std::remove_cv_t<std::remove_pointer_t<U>>;
        if constexpr (std::is_void_v<E>) {
            return Param{P_PTR, (int)sizeof(U), 1};
        } else {
            return Param{P_PTR, (int)sizeof(U), (int)sizeof(E)};
        }
    } else if constexpr (std::is_same_v<U, float>) {
        return Param{P_F32, 4, 0};
    } else if constexpr (std::is_same_v<U, double>) {
        return Param{P_F64, 8, 0};
    } else if constexpr (std::is_integral_v<U> && sizeof(U) == 4) {
        return Param{std::is_signed_v<U> ? P_I32 : P_U32, 4, 0};
    } else if constexpr (std::is_integral_v<U> && sizeof(U) == 8) {
        return Param{std::is_signed_v<U> ? P_I64 : P_U64, 8, 0};
    } else {
        return Param{P_OTHER, (int)sizeof(U), 0};
    }
}

template <class F>
struct Sig;
template <class... A>
struct Sig<void(A...)> {
    static constexpr int n = sizeof...(A);
    static constexpr Param params[sizeof...(A) + 1] = {param_of<A>()..., Param{0, 0, 0}};
    template <class Fn, size_t... I>
    static void call_impl(Fn f, void** args, std::index_sequence<I...>) {
        f(*static_cast<std::remove_cv_t<A>*>(args[I])...);
    }
    template <class Fn>
    static void call(Fn f, void** args) {
        call_impl(f, args, std::index_sequence_for<A...>{});
    }
};
}  // namespace kemu

// ---------------------------------------------------------------------------------
// Synchronisation
// ---------------------------------------------------------------------------------
inline void __syncthreads() {
    kemu::syncthreads();
    kemu::tc_block_barrier();
}
inline int __syncthreads_count(int p) {
    int r = kemu::syncthreads_reduce(p, 0);
    kemu::tc_block_barrier();
    return r;
}
inline int __syncthreads_and(int p) {
    int r = kemu::syncthreads_reduce(p, 1);
    kemu::tc_block_barrier();
    return r;
}
inline int __syncthreads_or(int p) {
    int r = kemu::syncthreads_reduce(p, 2);
    kemu::tc_block_barrier();
    return r;
}
inline void __syncwarp(unsigned mask = 0xffffffffu) { kemu::syncwarp(mask); }
inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence_block() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence_system() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline unsigned __activemask() { return kemu::active_mask(); }
inline void __nanosleep(unsigned) {}
namespace kemu {
long long clock_ticks();
}
inline long long clock64() { return kemu::clock_ticks(); }

// ---------------------------------------------------------------------------------
// Warp shuffles and votes. `width` splits the warp into segments as on a GPU.
// ---------------------------------------------------------------------------------
template <class T>
inline T __shfl_sync(unsigned mask, T v, int src, int width = warpSize) {
    int lane = (int)kemu::lane_id();
    int base = lane & ~(width - 1);
    int s = base + (src & (width - 1));
    return kemu::from_bits<T>(kemu::warp_exchange(mask, kemu::to_bits(v), s));
}
template <class T>
inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = warpSize) {
    int lane = (int)kemu::lane_id();
    int s = ((lane & (width - 1)) >= (int)delta) ? lane - (int)delta : lane;
    return kemu::from_bits<T>(kemu::warp_exchange(mask, kemu::to_bits(v), s));
}
template <class T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = warpSize) {
    int lane = (int)kemu::lane_id();
    int s = ((lane & (width - 1)) + (int)delta < width) ? lane + (int)delta : lane;
    return kemu::from_bits<T>(kemu::warp_exchange(mask, kemu::to_bits(v), s));
}
template <class T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = warpSize) {
    int lane = (int)kemu::lane_id();
    int s = lane ^ lane_mask;
    // A GPU returns the caller's own value when the source is in a later segment.
    if (s >= (lane & ~(width - 1)) + width) s = lane;
    return kemu::from_bits<T>(kemu::warp_exchange(mask, kemu::to_bits(v), s));
}
inline unsigned __ballot_sync(unsigned mask, int pred) { return kemu::warp_ballot(mask, pred); }
inline int __any_sync(unsigned mask, int pred) { return kemu::warp_ballot(mask, pred) != 0; }
inline int __all_sync(unsigned mask, int pred) { return kemu::warp_all(mask, pred); }

// ---------------------------------------------------------------------------------
// Atomics: device-wide, on plain memory (GCC/Clang __atomic builtins, which the
// thread sanitizer understands). Relaxed ordering, as CUDA's atomic* functions.
// ---------------------------------------------------------------------------------
namespace kemu {
template <class T>
inline T atomic_update(T* p, T (*f)(T, T), T v) {
    using B = std::conditional_t<sizeof(T) == 8, unsigned long long, unsigned>;
    static_assert(sizeof(T) == sizeof(B), "atomics on 4- or 8-byte values");
    B* bp = reinterpret_cast<B*>(p);
    B old_b = __atomic_load_n(bp, __ATOMIC_RELAXED);
    for (;;) {
        T old_v = from_bits<T>(old_b);
        B new_b = (B)to_bits(f(old_v, v));
        if (__atomic_compare_exchange_n(bp, &old_b, new_b, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED))
            return old_v;
    }
}
}  // namespace kemu

#define KEMU_INT_ATOMICS(T)                                                                               \
    inline T atomicAdd(T* p, T v) { return __atomic_fetch_add(p, v, __ATOMIC_RELAXED); }                  \
    inline T atomicSub(T* p, T v) { return __atomic_fetch_sub(p, v, __ATOMIC_RELAXED); }                  \
    inline T atomicExch(T* p, T v) { return __atomic_exchange_n(p, v, __ATOMIC_RELAXED); }                \
    inline T atomicAnd(T* p, T v) { return __atomic_fetch_and(p, v, __ATOMIC_RELAXED); }                  \
    inline T atomicOr(T* p, T v) { return __atomic_fetch_or(p, v, __ATOMIC_RELAXED); }                    \
    inline T atomicXor(T* p, T v) { return __atomic_fetch_xor(p, v, __ATOMIC_RELAXED); }                  \
    inline T atomicMax(T* p, T v) {                                                                       \
        return kemu::atomic_update<T>(p, [](T a, T b) { return a > b ? a : b; }, v);                      \
    }                                                                                                     \
    inline T atomicMin(T* p, T v) {                                                                       \
        return kemu::atomic_update<T>(p, [](T a, T b) { return a < b ? a : b; }, v);                      \
    }                                                                                                     \
    inline T atomicCAS(T* p, T cmp, T v) {                                                                \
        __atomic_compare_exchange_n(p, &cmp, v, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED);               \
        return cmp;                                                                                       \
    }
KEMU_INT_ATOMICS(int)
KEMU_INT_ATOMICS(unsigned)
KEMU_INT_ATOMICS(long long)
KEMU_INT_ATOMICS(unsigned long long)
#undef KEMU_INT_ATOMICS

inline float atomicAdd(float* p, float v) {
    return kemu::atomic_update<float>(p, [](float a, float b) { return a + b; }, v);
}
inline double atomicAdd(double* p, double v) {
    return kemu::atomic_update<double>(p, [](double a, double b) { return a + b; }, v);
}
inline float atomicExch(float* p, float v) {
    return kemu::atomic_update<float>(p, [](float, float b) { return b; }, v);
}
// CUDA 12+ has float atomicMax/atomicMin (sm_90); kernels for sm_80 use the int trick,
// but both work here.
inline float atomicMax(float* p, float v) {
    return kemu::atomic_update<float>(p, [](float a, float b) { return fmaxf(a, b); }, v);
}
inline float atomicMin(float* p, float v) {
    return kemu::atomic_update<float>(p, [](float a, float b) { return fminf(a, b); }, v);
}
inline unsigned atomicInc(unsigned* p, unsigned lim) {
    return kemu::atomic_update<unsigned>(p, [](unsigned a, unsigned b) { return a >= b ? 0u : a + 1; }, lim);
}
inline unsigned atomicDec(unsigned* p, unsigned lim) {
    return kemu::atomic_update<unsigned>(
        p, [](unsigned a, unsigned b) { return (a == 0 || a > b) ? b : a - 1; }, lim);
}
#define atomicAdd_block atomicAdd
#define atomicMax_block atomicMax
#define atomicMin_block atomicMin

// ---------------------------------------------------------------------------------
// Loads/stores with cache hints: plain accesses here.
// ---------------------------------------------------------------------------------
template <class T>
inline T __ldg(const T* p) { return *p; }
template <class T>
inline T __ldcg(const T* p) { return *p; }
template <class T>
inline T __ldca(const T* p) { return *p; }
template <class T>
inline T __ldcs(const T* p) { return *p; }
template <class T>
inline T __ldlu(const T* p) { return *p; }
template <class T>
inline void __stcg(T* p, T v) { *p = v; }
template <class T>
inline void __stcs(T* p, T v) { *p = v; }
template <class T>
inline void __stwt(T* p, T v) { *p = v; }

// ---------------------------------------------------------------------------------
// Math: <math.h> gives expf, logf, sqrtf, fmaxf, log1pf, INFINITY, ... and the C++
// float overloads of exp/log/... in the global namespace. Below: CUDA's extras.
// ---------------------------------------------------------------------------------
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline double rsqrt(double x) { return 1.0 / sqrt(x); }
inline float __expf(float x) { return expf(x); }
inline float __exp10f(float x) { return powf(10.0f, x); }
inline float __logf(float x) { return logf(x); }
inline float __log2f(float x) { return log2f(x); }
inline float __log10f(float x) { return log10f(x); }
inline float __powf(float x, float y) { return powf(x, y); }
inline float __sinf(float x) { return sinf(x); }
inline float __cosf(float x) { return cosf(x); }
inline float __tanf(float x) { return tanf(x); }
inline void __sincosf(float x, float* s, float* c) { *s = sinf(x); *c = cosf(x); }
inline float __fdividef(float x, float y) { return x / y; }
inline float fdividef(float x, float y) { return x / y; }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __fsqrt_rn(float x) { return sqrtf(x); }
inline float __frsqrt_rn(float x) { return 1.0f / sqrtf(x); }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
inline double __fma_rn(double a, double b, double c) { return fma(a, b, c); }
inline float __saturatef(float x) { return x < 0.f ? 0.f : (x > 1.f ? 1.f : (x == x ? x : 0.f)); }
inline float exp10f(float x) { return powf(10.0f, x); }
inline float normcdff(float x) { return 0.5f * erfcf(-x * 0.70710678118654752f); }

inline int __float_as_int(float x) { return kemu::from_bits<int>(kemu::to_bits(x)); }
inline unsigned __float_as_uint(float x) { return kemu::from_bits<unsigned>(kemu::to_bits(x)); }
inline float __int_as_float(int x) { return kemu::from_bits<float>(kemu::to_bits(x)); }
inline float __uint_as_float(unsigned x) { return kemu::from_bits<float>(kemu::to_bits(x)); }
inline long long __double_as_longlong(double x) { return kemu::from_bits<long long>(kemu::to_bits(x)); }
inline double __longlong_as_double(long long x) { return kemu::from_bits<double>(kemu::to_bits(x)); }
inline int __float2int_rn(float x) { return (int)nearbyintf(x); }
inline int __float2int_rz(float x) { return (int)truncf(x); }
inline int __float2int_rd(float x) { return (int)floorf(x); }
inline int __float2int_ru(float x) { return (int)ceilf(x); }
inline unsigned __float2uint_rn(float x) { return (unsigned)nearbyintf(x); }
inline long long __float2ll_rn(float x) { return (long long)nearbyintf(x); }
inline long long __float2ll_rz(float x) { return (long long)truncf(x); }
inline long long __float2ll_rd(float x) { return (long long)floorf(x); }
inline float __int2float_rn(int x) { return (float)x; }
inline float __uint2float_rn(unsigned x) { return (float)x; }
inline float __ll2float_rn(long long x) { return (float)x; }
inline int __double2int_rn(double x) { return (int)nearbyint(x); }
inline float __double2float_rn(double x) { return (float)x; }

// CUDA's global min/max overloads (fmaxf semantics for floats: NaN-ignoring).
inline float max(float a, float b) { return fmaxf(a, b); }
inline float min(float a, float b) { return fminf(a, b); }
inline double max(double a, double b) { return fmax(a, b); }
inline double min(double a, double b) { return fmin(a, b); }
template <class A, class B, class = std::enable_if_t<std::is_integral_v<A> && std::is_integral_v<B>>>
inline std::common_type_t<A, B> max(A a, B b) {
    using R = std::common_type_t<A, B>;
    return (R)a > (R)b ? (R)a : (R)b;
}
template <class A, class B, class = std::enable_if_t<std::is_integral_v<A> && std::is_integral_v<B>>>
inline std::common_type_t<A, B> min(A a, B b) {
    using R = std::common_type_t<A, B>;
    return (R)a < (R)b ? (R)a : (R)b;
}

// Integer intrinsics.
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz((unsigned)x); }
inline int __clzll(long long x) { return x == 0 ? 64 : __builtin_clzll((unsigned long long)x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline unsigned __brev(unsigned x) {
    x = ((x >> 1) & 0x55555555u) | ((x & 0x55555555u) << 1);
    x = ((x >> 2) & 0x33333333u) | ((x & 0x33333333u) << 2);
    x = ((x >> 4) & 0x0f0f0f0fu) | ((x & 0x0f0f0f0fu) << 4);
    x = ((x >> 8) & 0x00ff00ffu) | ((x & 0x00ff00ffu) << 8);
    return (x >> 16) | (x << 16);
}
inline int __mul24(int a, int b) { return a * b; }
inline unsigned __umul24(unsigned a, unsigned b) { return a * b; }
inline int __mulhi(int a, int b) { return (int)(((long long)a * b) >> 32); }
inline unsigned __umulhi(unsigned a, unsigned b) { return (unsigned)(((unsigned long long)a * b) >> 32); }
inline unsigned long long __umul64hi(unsigned long long a, unsigned long long b) {
    return (unsigned long long)(((unsigned __int128)a * b) >> 64);
}
inline long long __mul64hi(long long a, long long b) { return (long long)(((__int128)a * b) >> 64); }
inline unsigned __sad(int a, int b, unsigned c) { return c + (unsigned)(a > b ? a - b : b - a); }

// ---------------------------------------------------------------------------------
// Vector types
// ---------------------------------------------------------------------------------
#define KEMU_VEC2(T, N, A)                                     \
    struct __attribute__((aligned(A))) N##2 { T x, y; };       \
    inline N##2 make_##N##2(T x, T y) { return N##2{x, y}; }
#define KEMU_VEC3(T, N)                                        \
    struct N##3 { T x, y, z; };                                \
    inline N##3 make_##N##3(T x, T y, T z) { return N##3{x, y, z}; }
#define KEMU_VEC4(T, N, A)                                     \
    struct __attribute__((aligned(A))) N##4 { T x, y, z, w; }; \
    inline N##4 make_##N##4(T x, T y, T z, T w) { return N##4{x, y, z, w}; }
KEMU_VEC2(float, float, 8)
KEMU_VEC3(float, float)
KEMU_VEC4(float, float, 16)
KEMU_VEC2(int, int, 8)
KEMU_VEC3(int, int)
KEMU_VEC4(int, int, 16)
KEMU_VEC2(unsigned, uint, 8)
KEMU_VEC4(unsigned, uint, 16)
KEMU_VEC2(double, double, 16)
KEMU_VEC2(long long, longlong, 16)
inline uint3 make_uint3(unsigned x, unsigned y, unsigned z) { return uint3{x, y, z}; }
#undef KEMU_VEC2
#undef KEMU_VEC3
#undef KEMU_VEC4

// ---------------------------------------------------------------------------------
// Half precision
// ---------------------------------------------------------------------------------
typedef _Float16 __half;
struct __half2 {
    __half x, y;
};
inline __half __float2half(float f) { return (__half)f; }
inline __half __float2half_rn(float f) { return (__half)f; }
inline float __half2float(__half h) { return (float)h; }
inline __half2 __floats2half2_rn(float a, float b) { return __half2{(__half)a, (__half)b}; }

struct __nv_bfloat16 {
    unsigned short bits;
    __nv_bfloat16() = default;
    __nv_bfloat16(float f) {
        // Round to nearest even; NaN stays NaN.
        unsigned u = __float_as_uint(f);
        if ((u & 0x7fffffffu) > 0x7f800000u) {
            bits = (unsigned short)((u >> 16) | 0x40);
        } else {
            bits = (unsigned short)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
        }
    }
    operator float() const { return __uint_as_float((unsigned)bits << 16); }
};
inline __nv_bfloat16 __float2bfloat16(float f) { return __nv_bfloat16(f); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16(f); }
inline float __bfloat162float(__nv_bfloat16 h) { return (float)h; }
