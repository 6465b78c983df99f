// The emulated CUDA device's runtime: runs a kernel's grid on the host.
//
// A launch is split into blocks that a pool of worker OS threads take in turn. A
// worker runs one block at a time; the block's threads run on fibers (small stacks
// of their own, switched by a few instructions of assembly on x86-64, ucontext
// elsewhere). A fiber runs the block's threads one after the other until one waits
// at a barrier; that thread keeps the fiber and another fiber goes on with the next
// thread. Then every runnable thread is resumed in order, each running until it
// returns or waits again. When no thread can run, the barriers whose threads have
// all arrived are released (warp barriers first, then the block barrier); when none
// can be released the block is deadlocked and the launch fails with a message
// naming the kernel and block.
//
// Device memory comes from kemu_alloc. Normally every buffer ends exactly at a
// PROT_NONE guard page, so a read or write past its end faults and the SIGSEGV
// handler names the kernel, block and thread (under ThreadSanitizer, TSan's own SEGV
// report does, with the kernel's line). Built with AddressSanitizer
// (KESTREL_EMU_SANITIZE=address) buffers come from malloc, whose redzones ASan
// checks, and ASan's report carries the kernel's file and line. With
// ThreadSanitizer (=thread) fibers are TSan fibers that synchronise only at barriers,
// so two threads of a block touching the same shared memory between barriers are
// reported as a race. This file itself is never instrumented: its own bookkeeping is
// ordered by the fiber switches, which the sanitizers are told about explicitly.

#include <errno.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <map>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "shim.h"

#if defined(KEMU_ASAN)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif
#if defined(KEMU_TSAN)
#include <sanitizer/tsan_interface.h>
#endif

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

thread_local uint3 threadIdx;
thread_local uint3 blockIdx;
thread_local dim3 blockDim;
thread_local dim3 gridDim;

// The first code a fiber runs (its argument is the Fiber).
extern "C" void kemu_fiber_main(void* fiber);

namespace {

// ------------------------------------------------------------------------------
// Context switching
// ------------------------------------------------------------------------------
struct Fiber;

#if defined(__x86_64__)
struct Ctx {
    void* sp = nullptr;
};
extern "C" void kemu_ctx_switch(void** save_sp, void* new_sp);
extern "C" void kemu_fiber_entry();
// Saves the callee-saved registers on the current stack, stores the stack pointer in
// *save_sp, and restores the same from new_sp. MXCSR and the x87 control word are not
// switched: fibers never leave the worker thread that made them, and kernels cannot
// change the floating-point environment.
asm(R"(
    .text
    .p2align 4
    .globl kemu_ctx_switch
    .hidden kemu_ctx_switch
    .type kemu_ctx_switch,@function
kemu_ctx_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size kemu_ctx_switch,.-kemu_ctx_switch

    .p2align 4
    .globl kemu_fiber_entry
    .hidden kemu_fiber_entry
    .type kemu_fiber_entry,@function
kemu_fiber_entry:
    movq %r12, %rdi
    call kemu_fiber_main
    ud2
    .size kemu_fiber_entry,.-kemu_fiber_entry
)");

void ctx_init(Ctx& c, char* stack_lo, size_t bytes, Fiber* f) {
    uintptr_t top = ((uintptr_t)(stack_lo + bytes)) & ~(uintptr_t)15;
    uintptr_t x = top - 16;  // rsp after the first `ret`: 16-aligned, as the ABI wants
    uint64_t* frame = (uint64_t*)(x - 56);
    frame[0] = 0;                            // r15
    frame[1] = 0;                            // r14
    frame[2] = 0;                            // r13
    frame[3] = (uint64_t)f;                  // r12: the fiber, handed to kemu_fiber_main
    frame[4] = 0;                            // rbx
    frame[5] = 0;                            // rbp
    frame[6] = (uint64_t)&kemu_fiber_entry;  // return address
    c.sp = frame;
}
inline void ctx_switch(Ctx& from, Ctx& to) { kemu_ctx_switch(&from.sp, to.sp); }
#else
struct Ctx {
    ucontext_t uc;
};
void ctx_trampoline(unsigned hi, unsigned lo) {
    kemu_fiber_main((void*)(((uintptr_t)hi << 32) | (uintptr_t)lo));
    abort();
}
void ctx_init(Ctx& c, char* stack_lo, size_t bytes, Fiber* f) {
    getcontext(&c.uc);
    c.uc.uc_stack.ss_sp = stack_lo;
    c.uc.uc_stack.ss_size = bytes;
    c.uc.uc_link = nullptr;
    uintptr_t p = (uintptr_t)f;
    makecontext(&c.uc, (void (*)())ctx_trampoline, 2, (unsigned)(p >> 32), (unsigned)p);
}
inline void ctx_switch(Ctx& from, Ctx& to) { swapcontext(&from.uc, &to.uc); }
#endif

// ------------------------------------------------------------------------------
// Fibers, workers and the block scheduler
// ------------------------------------------------------------------------------

const size_t PAGE = (size_t)sysconf(_SC_PAGESIZE);

size_t env_size(const char* name, size_t dflt) {
    const char* v = getenv(name);
    if (!v || !*v) return dflt;
    char* end = nullptr;
    unsigned long long x = strtoull(v, &end, 10);
    return (end && *end == 0 && x > 0) ? (size_t)x : dflt;
}

#if defined(KEMU_ASAN) || defined(KEMU_TSAN)
const size_t DEFAULT_STACK_KB = 1024;  // sanitizers make frames larger
#else
const size_t DEFAULT_STACK_KB = 256;
#endif

// Below each fiber stack: large enough that a frame with a big local array lands in
// it rather than in the next stack.
const size_t STACK_GUARD = 64 * 1024;

size_t stack_bytes() {
    static size_t b = (env_size("KESTREL_EMU_STACK_KB", DEFAULT_STACK_KB) * 1024 + PAGE - 1) / PAGE * PAGE;
    return b;
}

struct Fiber {
    Ctx ctx;
    char* map = nullptr;  // guard page, then the stack
    size_t map_bytes = 0;
    char* stack_lo = nullptr;
    size_t stack_size = 0;
    int thread = -1;  // the CUDA thread it runs, -1 when idle
    void* asan_fake = nullptr;
    void* tsan = nullptr;
};

// NEW: not started yet. A fiber picks up NEW threads one after the other (plain
// calls, no switch) until one of them waits at a barrier; that thread keeps the
// fiber and another fiber carries on. Kernels without barriers so cost one fiber
// switch per block, and the order of execution is the same as one fiber per thread.
enum State : uint8_t { NEW, RUNNABLE, AT_BLOCK, AT_WARP, AT_ACTIVE, DONE };

struct Thread {
    uint3 tid;
    State state;
    unsigned wait_mask;
    Fiber* fiber;
};

struct Worker {
    Ctx sched;
    std::vector<Fiber*> all;   // every fiber of this worker
    std::vector<Fiber*> idle;  // fibers without a thread
    std::vector<Thread> threads;
    unsigned cur = 0;  // the running CUDA thread (linear index in the block)
    Fiber* cur_fiber = nullptr;
    unsigned started = 0;
    bool reverse = false;
    // ThreadSanitizer must see every thread of a block on its own fiber, or it
    // would take the threads run one after the other on a fiber as ordered.
    bool one_per_fiber = false;
    // The launch being run.
    void (*fn)(void**) = nullptr;
    void** args = nullptr;
    const char* name = "";
    unsigned nthreads = 0;
    unsigned nwarps = 0;
    unsigned char* dyn = nullptr;
    size_t dyn_bytes = 0;
    volatile bool in_kernel = false;
    std::string error;
    // Exchange slots of the warp primitives, one per lane: written before a warp
    // barrier, copied to `published` when it is released, read from there (so a lane
    // that runs ahead into its next exchange cannot overwrite a value not yet read).
    unsigned long long slots[32][32];
    unsigned long long published[32][32];
    // __activemask(): the lanes of each warp that met at the last one.
    unsigned active_bits[32];
    // __syncthreads_count/and/or.
    int red_true = 0, red_arrived = 0;
    unsigned red_gen = 0;
    // AddressSanitizer's view of the scheduler's own stack.
    const void* sched_bottom = nullptr;
    size_t sched_size = 0;
    void* sched_fake = nullptr;
    // ThreadSanitizer: the worker's own fiber and the synchronisation objects.
    void* tsan_sched = nullptr;
    char tsan_block_start, tsan_block_end, tsan_block_bar, tsan_warp_bar[32];
};

thread_local Worker* t_worker = nullptr;

Fiber* fiber_new() {
    Fiber* f = new Fiber();
    f->stack_size = stack_bytes();
    f->map_bytes = f->stack_size + STACK_GUARD;
    void* m = mmap(nullptr, f->map_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (m == MAP_FAILED) {
        delete f;
        return nullptr;
    }
    f->map = (char*)m;
    mprotect(f->map, STACK_GUARD, PROT_NONE);  // a stack overflow faults instead of corrupting
    f->stack_lo = f->map + STACK_GUARD;
    ctx_init(f->ctx, f->stack_lo, f->stack_size, f);
#if defined(KEMU_TSAN)
    f->tsan = __tsan_create_fiber(0);
#endif
    return f;
}

void fiber_free(Fiber* f) {
#if defined(KEMU_ASAN)
    __asan_unpoison_memory_region(f->stack_lo, f->stack_size);
#endif
#if defined(KEMU_TSAN)
    __tsan_destroy_fiber(f->tsan);
#endif
    munmap(f->map, f->map_bytes);
    delete f;
}

// Scheduler -> fiber.
void resume(Worker* w, Fiber* f) {
    w->cur_fiber = f;
    if (f->thread >= 0) {
        w->cur = (unsigned)f->thread;
        threadIdx = w->threads[w->cur].tid;
    }
#if defined(KEMU_ASAN)
    __sanitizer_start_switch_fiber(&w->sched_fake, f->stack_lo, f->stack_size);
#endif
#if defined(KEMU_TSAN)
    __tsan_switch_to_fiber(f->tsan, __tsan_switch_to_fiber_no_sync);
#endif
    ctx_switch(w->sched, f->ctx);
#if defined(KEMU_ASAN)
    __sanitizer_finish_switch_fiber(w->sched_fake, nullptr, nullptr);
#endif
    w->cur_fiber = nullptr;
}

// Fiber -> scheduler; returns when the scheduler resumes this fiber.
void yield(Worker* w, Fiber* f) {
#if defined(KEMU_ASAN)
    __sanitizer_start_switch_fiber(&f->asan_fake, w->sched_bottom, w->sched_size);
#endif
#if defined(KEMU_TSAN)
    __tsan_switch_to_fiber(w->tsan_sched, __tsan_switch_to_fiber_no_sync);
#endif
    ctx_switch(f->ctx, w->sched);
#if defined(KEMU_ASAN)
    __sanitizer_finish_switch_fiber(f->asan_fake, &w->sched_bottom, &w->sched_size);
#endif
}

inline void tsan_acquire(void* p) {
#if defined(KEMU_TSAN)
    __tsan_acquire(p);
#else
    (void)p;
#endif
}
inline void tsan_release(void* p) {
#if defined(KEMU_TSAN)
    __tsan_release(p);
#else
    (void)p;
#endif
}

// 0 forward, 1 reverse: the order in which runnable threads run between barriers.
std::atomic<int> g_schedule{-1};

int schedule() {
    int s = g_schedule.load(std::memory_order_relaxed);
    if (s < 0) {
        const char* v = getenv("KESTREL_EMU_SCHEDULE");
        s = (v && strcmp(v, "reverse") == 0) ? 1 : 0;
        g_schedule.store(s, std::memory_order_relaxed);
    }
    return s;
}

void fmt(std::string& out, const char* f, ...) {
    char buf[512];
    va_list ap;
    va_start(ap, f);
    vsnprintf(buf, sizeof buf, f, ap);
    va_end(ap);
    out += buf;
}

// Release every barrier whose threads have all arrived. False: none could be
// released (deadlock, or lanes that exited are awaited); w->error says why.
bool release_barriers(Worker* w) {
    bool any = false;
    for (unsigned warp = 0; warp < w->nwarps; ++warp) {
        unsigned lo = warp * 32, cnt = w->nthreads - lo < 32 ? w->nthreads - lo : 32;
        unsigned exists = cnt == 32 ? 0xffffffffu : ((1u << cnt) - 1);
        unsigned waiting = 0, done = 0, need = 0;
        for (unsigned l = 0; l < cnt; ++l) {
            const Thread& t = w->threads[lo + l];
            if (t.state == AT_WARP) {
                waiting |= 1u << l;
                need |= t.wait_mask | (1u << l);
            } else if (t.state == DONE) {
                done |= 1u << l;
            }
        }
        if (!waiting) continue;
        need &= exists;
        if (need & done) {
            fmt(w->error,
                "block (%u,%u,%u) warp %u: lanes 0x%08x wait in a warp-synchronous op "
                "(__shfl*_sync/__syncwarp/vote, mask 0x%08x) for lanes 0x%08x that already exited",
                blockIdx.x, blockIdx.y, blockIdx.z, warp, waiting, need, need & done);
            return false;
        }
        if ((need & ~waiting) == 0) {
            for (unsigned l = 0; l < cnt; ++l)
                if (waiting & (1u << l)) {
                    w->threads[lo + l].state = RUNNABLE;
                    w->published[warp][l] = w->slots[warp][l];
                }
            any = true;
        }
    }
    if (any) return true;
    // __activemask(): once nothing can run, the lanes of a warp waiting in it are the
    // ones that converged there (the others exited or wait at another barrier).
    for (unsigned warp = 0; warp < w->nwarps; ++warp) {
        unsigned lo = warp * 32, cnt = w->nthreads - lo < 32 ? w->nthreads - lo : 32, bits = 0;
        for (unsigned l = 0; l < cnt; ++l)
            if (w->threads[lo + l].state == AT_ACTIVE) bits |= 1u << l;
        if (!bits) continue;
        w->active_bits[warp] = bits;
        for (unsigned l = 0; l < cnt; ++l)
            if (bits & (1u << l)) w->threads[lo + l].state = RUNNABLE;
        any = true;
    }
    if (any) return true;
    unsigned at_block = 0, live = 0;
    for (unsigned i = 0; i < w->nthreads; ++i) {
        State s = w->threads[i].state;
        live += s != DONE;
        at_block += s == AT_BLOCK;
    }
    if (live > 0 && at_block == live) {
        for (unsigned i = 0; i < w->nthreads; ++i)
            if (w->threads[i].state == AT_BLOCK) w->threads[i].state = RUNNABLE;
        return true;
    }
    fmt(w->error,
        "barrier deadlock in block (%u,%u,%u): %u of %u live threads wait at __syncthreads, "
        "the others at warp barriers that cannot complete (a barrier in divergent code?)",
        blockIdx.x, blockIdx.y, blockIdx.z, at_block, live);
    return false;
}

// A fiber for the next NEW thread: any idle one, or (one_per_fiber) the k-th.
Fiber* fiber_for_start(Worker* w) {
    if (w->one_per_fiber) {
        while (w->all.size() <= w->started) {
            Fiber* f = fiber_new();
            if (!f) return nullptr;
            w->all.push_back(f);
        }
        return w->all[w->started];
    }
    if (!w->idle.empty()) {
        Fiber* f = w->idle.back();
        w->idle.pop_back();
        return f;
    }
    Fiber* f = fiber_new();
    if (f) w->all.push_back(f);
    return f;
}

void drop_fibers(Worker* w) {
    // Some fibers are stuck inside the kernel: drop them all (their frames leak).
    for (Fiber* f : w->all) fiber_free(f);
    w->all.clear();
    w->idle.clear();
}

void tc_block_start(Worker* w);  // kernels/emu/tensorcore.inc

// Runs one block to completion. False on an error (w->error; fibers are dropped).
bool run_block(Worker* w, uint3 bid) {
    blockIdx = bid;
    tc_block_start(w);
    if (w->dyn_bytes) memset(w->dyn, 0xff, w->dyn_bytes);
    w->red_true = w->red_arrived = 0;
    unsigned n = w->nthreads, bx = blockDim.x, by = blockDim.y;
    w->threads.resize(n);
    // threadIdx of thread i = (i % bx, (i / bx) % by, i / (bx * by)), counted up
    // instead of divided (three divisions per thread per block showed in profiles).
    for (unsigned i = 0, x = 0, y = 0, z = 0; i < n; ++i) {
        w->threads[i] = Thread{uint3{x, y, z}, NEW, 0, nullptr};
        if (++x == bx) {
            x = 0;
            if (++y == by) y = 0, ++z;
        }
    }
    w->started = 0;
    w->reverse = schedule() == 1;
    tsan_release(&w->tsan_block_start);
    for (;;) {
        while (w->started < n) {
            Fiber* f = fiber_for_start(w);
            if (!f) {
                fmt(w->error, "cannot map a %zu KiB fiber stack (KESTREL_EMU_STACK_KB)", stack_bytes() / 1024);
                drop_fibers(w);
                return false;
            }
            resume(w, f);
            if (f->thread < 0 && !w->one_per_fiber) w->idle.push_back(f);
        }
        for (unsigned k = 0; k < n; ++k) {
            unsigned i = w->reverse ? n - 1 - k : k;
            if (w->threads[i].state != RUNNABLE) continue;
            Fiber* f = w->threads[i].fiber;
            resume(w, f);
            if (f->thread < 0 && !w->one_per_fiber) w->idle.push_back(f);
        }
        bool all_done = true;
        for (unsigned i = 0; i < n && all_done; ++i) all_done = w->threads[i].state == DONE;
        if (all_done) break;
        if (!release_barriers(w)) {
            drop_fibers(w);
            return false;
        }
    }
    tsan_acquire(&w->tsan_block_end);
    // The tensor-core model reports misuse (a read before cp.async.wait_group, a
    // missing barrier) in w->error and lets the block finish.
    return w->error.empty();
}

Worker* cur_worker() { return t_worker; }

void wait_at(Worker* w, State s, unsigned mask) {
    Thread& t = w->threads[w->cur];
    t.state = s;
    t.wait_mask = mask;
    yield(w, w->cur_fiber);
}

}  // namespace

extern "C" void kemu_fiber_main(void* fiber) {
    Fiber* f = (Fiber*)fiber;
    Worker* w = t_worker;
#if defined(KEMU_ASAN)
    __sanitizer_finish_switch_fiber(nullptr, &w->sched_bottom, &w->sched_size);
#endif
    for (;;) {
        bool ran = false;
        while (w->started < w->nthreads && !(ran && w->one_per_fiber)) {
            unsigned i = w->reverse ? w->nthreads - 1 - w->started : w->started;
            w->started++;
            Thread& t = w->threads[i];
            t.state = RUNNABLE;
            t.fiber = f;
            f->thread = (int)i;
            w->cur = i;
            threadIdx = t.tid;
            tsan_acquire(&w->tsan_block_start);
            w->fn(w->args);
            tsan_release(&w->tsan_block_end);
            w->threads[i].state = DONE;
            w->threads[i].fiber = nullptr;
            f->thread = -1;
            ran = true;
        }
        yield(w, f);
    }
}

// ------------------------------------------------------------------------------
// What the shim calls
// ------------------------------------------------------------------------------
namespace kemu {

void syncthreads() {
    Worker* w = cur_worker();
    tsan_release(&w->tsan_block_bar);
    wait_at(w, AT_BLOCK, 0);
    tsan_acquire(&w->tsan_block_bar);
}

int syncthreads_reduce(int pred, int op) {
    Worker* w = cur_worker();
    w->red_true += pred != 0;
    w->red_arrived += 1;
    syncthreads();
    int t = w->red_true, a = w->red_arrived;
    unsigned g = w->red_gen;
    syncthreads();
    if (w->red_gen == g) {  // the first thread past the second barrier resets
        w->red_gen++;
        w->red_true = w->red_arrived = 0;
    }
    return op == 0 ? t : op == 1 ? (t == a) : (t > 0);
}

static void warp_barrier(Worker* w, unsigned mask) {
    char* sync = &w->tsan_warp_bar[w->cur / 32];
    tsan_release(sync);
    wait_at(w, AT_WARP, mask);
    tsan_acquire(sync);
}

void syncwarp(unsigned mask) { warp_barrier(cur_worker(), mask); }

// One barrier per exchange: every released lane reads `published` before any
// barrier of its warp can be released again (releases wait until nothing can run).
unsigned long long warp_exchange(unsigned mask, unsigned long long v, int src) {
    Worker* w = cur_worker();
    unsigned me = w->cur, warp = me / 32;
    w->slots[warp][me % 32] = v;
    warp_barrier(w, mask);
    return w->published[warp][(unsigned)src % 32];
}

unsigned warp_ballot(unsigned mask, int pred) {
    Worker* w = cur_worker();
    unsigned me = w->cur, warp = me / 32;
    w->slots[warp][me % 32] = pred != 0;
    warp_barrier(w, mask);
    unsigned lo = warp * 32, bits = 0;
    for (unsigned l = 0; l < 32 && lo + l < w->nthreads; ++l)
        if ((mask & (1u << l)) && w->published[warp][l]) bits |= 1u << l;
    return bits;
}

int warp_all(unsigned mask, int pred) {
    unsigned bits = warp_ballot(mask, pred);
    Worker* w = cur_worker();
    unsigned lo = w->cur / 32 * 32, cnt = w->nthreads - lo < 32 ? w->nthreads - lo : 32;
    unsigned exists = cnt == 32 ? 0xffffffffu : ((1u << cnt) - 1);
    return (bits & mask & exists) == (mask & exists);
}

unsigned active_mask() {
    Worker* w = cur_worker();
    wait_at(w, AT_ACTIVE, 0);
    return w->active_bits[w->cur / 32];
}

unsigned lane_id() { return cur_worker()->cur % 32; }

unsigned char* dynamic_shared() { return cur_worker()->dyn; }

long long clock_ticks() {
    return (long long)std::chrono::steady_clock::now().time_since_epoch().count();
}

}  // namespace kemu

#include "tensorcore.inc"

// ------------------------------------------------------------------------------
// Device memory
// ------------------------------------------------------------------------------
namespace {

std::mutex g_alloc_mu;
std::map<uintptr_t, size_t> g_allocs;  // start -> bytes, for fault reports

#if !defined(KEMU_ASAN)
// A buffer of `bytes` (rounded up to 16) that ends at a PROT_NONE page.
size_t guarded_span(size_t bytes) { return (((bytes + 15) & ~(size_t)15) + PAGE - 1) / PAGE * PAGE + PAGE; }
void* guarded_alloc(size_t bytes) {
    size_t padded = (bytes + 15) & ~(size_t)15, span = guarded_span(bytes);
    void* m = mmap(nullptr, span, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (m == MAP_FAILED) return nullptr;
    char* guard = (char*)m + span - PAGE;
    mprotect(guard, PAGE, PROT_NONE);
    return guard - padded;
}
void guarded_free(void* p, size_t bytes) {
    size_t padded = (bytes + 15) & ~(size_t)15, span = guarded_span(bytes);
    char* guard = (char*)p + padded;
    munmap(guard + PAGE - span, span);
}
#endif

void* raw_alloc(size_t bytes) {
#if defined(KEMU_ASAN)
    // malloc's redzones (ASan) are exact: one byte past `bytes` is reported.
    void* p = nullptr;
    if (posix_memalign(&p, 256, bytes ? bytes : 1) != 0) return nullptr;
    memset(p, 0, bytes);
    return p;
#else
    return guarded_alloc(bytes);
#endif
}
void raw_free(void* p, size_t bytes) {
#if defined(KEMU_ASAN)
    (void)bytes;
    free(p);
#else
    guarded_free(p, bytes);
#endif
}

// ------------------------------------------------------------------------------
// Fault reports (guard-page builds)
// ------------------------------------------------------------------------------
#if !defined(KEMU_ASAN) && !defined(KEMU_TSAN)
struct sigaction g_old_segv, g_old_bus;

void on_fault(int sig, siginfo_t* si, void* uc) {
    (void)uc;
    Worker* w = t_worker;
    if (!w || !w->in_kernel || !w->cur_fiber) {
        // Not a kernel's access: hand the signal to whoever had it (Rust's stack
        // overflow handler, or the default action) by re-faulting without us.
        sigaction(sig, sig == SIGSEGV ? &g_old_segv : &g_old_bus, nullptr);
        return;
    }
    uintptr_t a = (uintptr_t)si->si_addr;
    char msg[768];
    int len = snprintf(msg, sizeof msg,
                       "kestrel emulator: invalid memory access in kernel `%s`, block (%u,%u,%u), "
                       "thread (%u,%u,%u): address 0x%lx",
                       w->name, blockIdx.x, blockIdx.y, blockIdx.z, threadIdx.x, threadIdx.y, threadIdx.z,
                       (unsigned long)a);
    const char* what = " (not in any device buffer)";
    char detail[256];
    Fiber* f = w->cur_fiber;
    if (a < (uintptr_t)f->stack_lo && a + (16u << 20) >= (uintptr_t)f->stack_lo) {
        snprintf(detail, sizeof detail,
                 " is below the thread's stack: stack overflow (large local arrays? raise "
                 "KESTREL_EMU_STACK_KB, now %zu)",
                 stack_bytes() / 1024);
        what = detail;
    }
    if (g_alloc_mu.try_lock()) {
        auto it = g_allocs.upper_bound(a);
        if (it != g_allocs.begin()) {
            --it;
            uintptr_t end = it->first + it->second;
            if (a >= end && a < end + 16 + PAGE) {
                snprintf(detail, sizeof detail, " is %lu bytes past the end of a %zu-byte device buffer at 0x%lx",
                         (unsigned long)(a - end), it->second, (unsigned long)it->first);
                what = detail;
            }
        }
        g_alloc_mu.unlock();
    }
    if (w->dyn && a >= (uintptr_t)w->dyn + w->dyn_bytes && a < (uintptr_t)w->dyn + w->dyn_bytes + 16 + PAGE) {
        snprintf(detail, sizeof detail, " is %lu bytes past the end of the block's %zu bytes of dynamic shared memory",
                 (unsigned long)(a - ((uintptr_t)w->dyn + w->dyn_bytes)), w->dyn_bytes);
        what = detail;
    }
    len += snprintf(msg + len, sizeof msg - len, "%s\n", what);
    if (write(2, msg, len) < 0) {
    }
    _exit(134);
}

void install_fault_handler() {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_fault;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGSEGV, &sa, &g_old_segv);
    sigaction(SIGBUS, &sa, &g_old_bus);
}
#endif

// ------------------------------------------------------------------------------
// The worker pool
// ------------------------------------------------------------------------------
struct Launch {
    void (*fn)(void**);
    void** args;
    const char* name;
    dim3 grid, block;
    size_t shmem;
    uint64_t nblocks;
    std::atomic<uint64_t> next{0};
    std::atomic<bool> failed{false};
    int participants = 0;
    bool removed = false;
    bool done = false;
    std::string error;
};

struct Pool {
    std::mutex mu;
    std::condition_variable work_cv, done_cv;
    std::deque<Launch*> queue;
};

Pool& pool();
unsigned g_nworkers = 0;

void run_launch(Worker* w, Launch* L) {
    w->fn = L->fn;
    w->args = L->args;
    w->name = L->name;
    w->nthreads = L->block.x * L->block.y * L->block.z;
    w->nwarps = (w->nthreads + 31) / 32;
    blockDim = L->block;
    gridDim = L->grid;
    w->dyn_bytes = L->shmem;
    w->dyn = (unsigned char*)raw_alloc(L->shmem);
    if (!w->dyn) {
        std::lock_guard<std::mutex> g(pool().mu);
        if (!L->failed.exchange(true)) L->error = "cannot allocate dynamic shared memory";
        return;
    }
    uint64_t gx = L->grid.x, gy = L->grid.y;
    for (;;) {
        uint64_t b = L->next.fetch_add(1, std::memory_order_relaxed);
        if (b >= L->nblocks || L->failed.load(std::memory_order_relaxed)) break;
        uint3 bid{(unsigned)(b % gx), (unsigned)((b / gx) % gy), (unsigned)(b / (gx * gy))};
        w->in_kernel = true;
        w->error.clear();
        bool ok = run_block(w, bid);
        w->in_kernel = false;
        if (!ok) {
            std::lock_guard<std::mutex> g(pool().mu);
            if (!L->failed.exchange(true)) L->error = w->error;
        }
    }
    raw_free(w->dyn, w->dyn_bytes);
    w->dyn = nullptr;
    w->dyn_bytes = 0;
}

void worker_loop() {
    Worker* w = new Worker();
    t_worker = w;
#if !defined(KEMU_ASAN) && !defined(KEMU_TSAN)
    // The fault handler runs here, and a fiber's own stack may be what overflowed.
    stack_t ss;
    ss.ss_size = 64 * 1024;
    ss.ss_sp = malloc(ss.ss_size);
    ss.ss_flags = 0;
    sigaltstack(&ss, nullptr);
#endif
#if defined(KEMU_TSAN)
    w->tsan_sched = __tsan_get_current_fiber();
    w->one_per_fiber = true;
#endif
    Pool& p = pool();
    for (;;) {
        Launch* L;
        {
            std::unique_lock<std::mutex> g(p.mu);
            p.work_cv.wait(g, [&] { return !p.queue.empty(); });
            L = p.queue.front();
            L->participants++;
        }
        run_launch(w, L);
        std::lock_guard<std::mutex> g(p.mu);
        // Whoever leaves first has seen every block handed out: stop new joiners.
        if (!L->removed) {
            for (auto it = p.queue.begin(); it != p.queue.end(); ++it)
                if (*it == L) {
                    p.queue.erase(it);
                    break;
                }
            L->removed = true;
        }
        if (--L->participants == 0) {
            L->done = true;
            p.done_cv.notify_all();
        }
    }
}

Pool& pool() {
    // Leaked on purpose: workers run until the process exits.
    static Pool* p = [] {
        Pool* p = new Pool();
        // At most 8 by default: every fiber is two memory mappings (stack and guard),
        // and 1024-thread blocks with barriers need 1024 fibers per worker.
        unsigned hw = std::thread::hardware_concurrency();
        g_nworkers = (unsigned)env_size("KESTREL_EMU_THREADS", hw == 0 ? 1 : (hw > 8 ? 8 : hw));
#if !defined(KEMU_ASAN) && !defined(KEMU_TSAN)
        install_fault_handler();
#endif
        for (unsigned i = 0; i < g_nworkers; ++i) std::thread(worker_loop).detach();
        return p;
    }();
    return *p;
}

}  // namespace

// ------------------------------------------------------------------------------
// C interface for src/device/emu.rs
// ------------------------------------------------------------------------------
extern "C" {

void* kemu_alloc(size_t bytes) {
    void* p = raw_alloc(bytes);
    if (p) {
        std::lock_guard<std::mutex> g(g_alloc_mu);
        g_allocs[(uintptr_t)p] = bytes;
    }
    return p;
}

void kemu_free(void* p, size_t bytes) {
    {
        std::lock_guard<std::mutex> g(g_alloc_mu);
        g_allocs.erase((uintptr_t)p);
    }
    raw_free(p, bytes);
}

// Runs the grid; returns 0, or 1 with a message in err.
int kemu_launch(const char* name, void (*fn)(void**), void** args, unsigned gx, unsigned gy, unsigned gz,
                unsigned bx, unsigned by, unsigned bz, unsigned shmem, char* err, size_t errlen) {
    Launch L;
    L.fn = fn;
    L.args = args;
    L.name = name;
    L.grid = dim3(gx, gy, gz);
    L.block = dim3(bx, by, bz);
    L.shmem = shmem;
    L.nblocks = (uint64_t)gx * gy * gz;
    Pool& p = pool();
    std::unique_lock<std::mutex> g(p.mu);
    p.queue.push_back(&L);
    p.work_cv.notify_all();
    p.done_cv.wait(g, [&] { return L.done; });
    if (L.failed.load()) {
        snprintf(err, errlen, "%s", L.error.c_str());
        return 1;
    }
    return 0;
}

// 0 forward, 1 reverse (see KESTREL_EMU_SCHEDULE).
void kemu_set_schedule(int s) { g_schedule.store(s ? 1 : 0, std::memory_order_relaxed); }

unsigned kemu_workers() {
    pool();
    return g_nworkers;
}

const char* kemu_sanitizer() {
#if defined(KEMU_ASAN)
    return "address";
#elif defined(KEMU_TSAN)
    return "thread";
#else
    return "none";
#endif
}

#if defined(KEMU_TSAN)
// Rust's own synchronisation (futexes, atomics in uninstrumented code) is invisible
// to TSan, so its intercepted memcpy/free calls would be reported as races between
// Rust threads. Kernel code is instrumented directly and still fully checked.
const char* __tsan_default_options() { return "ignore_interceptors_accesses=1"; }
#endif

#if defined(KEMU_ASAN)
// The Rust test binary does not start with the ASan runtime first in its library
// list; the runtime is linked statically, so that check does not apply.
const char* __asan_default_options() { return "detect_leaks=0:verify_asan_link_order=0"; }
#endif
}
