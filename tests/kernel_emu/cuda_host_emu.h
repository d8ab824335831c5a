// Host emulation of the small CUDA subset used by csrc/*.cu, for CPU-only tests
// (tests/test_kernels.py compiles tests/kernel_emu/emu_driver.cpp with g++).
//
// Every CUDA thread of a block is a cooperative fiber (ucontext) of one OS thread; blocks run
// one after another. A fiber runs until it reaches a barrier, then the next runnable fiber runs:
//   * __syncthreads() is a barrier over the block;
//   * __shfl_xor_sync, __shfl_sync and __ballot_sync exchange values through a slot per thread
//     between two barriers over the warp (32 consecutive threads), so they need all 32 lanes, as the
//     kernels' full-mask warp intrinsics do (a lane that skips one unbalances the warp's barriers: a
//     deadlock or a wrong result);
//   * __shared__ variables are function-local statics: shared by the fibers of the one block that
//     runs at a time.
// Fibers are scheduled in increasing or (emu_set_reverse(1)) decreasing thread order, so a
// missing barrier shows up as a wrong result under one of the two orders; a barrier that not
// every thread reaches (divergent __syncthreads) is reported as a deadlock instead of hanging.
// Floating point is IEEE binary32/64 (compile with -ffp-contract=off).
#pragma once

#include <setjmp.h>
#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <type_traits>
#include <utility>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __noinline__                // empty: a later __attribute__((__noinline__)) stays valid
#define __launch_bounds__(...)

struct uint3 {
  unsigned x, y, z;
};

namespace emu {

struct Barrier {
  int n = 1, count = 0;
  unsigned long long gen = 0;
};

// A fiber starts through ucontext (makecontext gives it its own stack) and then switches with
// _setjmp/_longjmp, which unlike swapcontext save no signal mask: no system call per switch (the
// warp intrinsics switch every fiber twice per call, so this is most of the emulation's time).
struct Fiber {
  ucontext_t ctx;
  jmp_buf jb;
  bool started = false;
  std::vector<char> stack;
  bool done = false;
  const Barrier* wait = nullptr;
  unsigned long long wait_gen = 0;
};

constexpr std::size_t kStack = 256 * 1024;

inline uint3 g_threadIdx, g_blockIdx, g_blockDim, g_gridDim;
inline std::vector<Fiber> g_fibers;
inline ucontext_t g_sched;
inline jmp_buf g_sched_jb;
inline int g_cur = 0;
inline bool g_reverse = false;
inline Barrier g_block_barrier;
inline Barrier g_warp_barrier[32];
inline unsigned long long g_slots[1024];
inline std::function<void()> g_body;

inline void barrier_wait(Barrier& b) {
  Fiber& f = g_fibers[g_cur];
  f.wait = &b;
  f.wait_gen = b.gen;
  if (++b.count == b.n) {
    b.count = 0;
    ++b.gen;
  }
  if (_setjmp(f.jb) == 0) _longjmp(g_sched_jb, 1);
}

inline void trampoline() {
  g_body();
  g_fibers[g_cur].done = true;
  _longjmp(g_sched_jb, 1);  // never returns: the fiber's stack is reused by the next block
}

// Runs fiber f until it waits at a barrier or ends. The _setjmp lives in this small frame, so the
// scheduler's loop variables never sit between a _setjmp and its _longjmp.
__attribute__((noinline)) inline void resume(Fiber& f) {
  if (_setjmp(g_sched_jb) != 0) return;
  if (!f.started) {
    f.started = true;
    swapcontext(&g_sched, &f.ctx);  // first entry: runs until its first _longjmp back to g_sched_jb
  } else {
    _longjmp(f.jb, 1);
  }
}

// Runs one block; returns 0, or -3 on a deadlock (a barrier not reached by every thread).
inline int run_block(unsigned bx) {
  if (g_fibers.size() < bx) g_fibers.resize(bx);
  g_block_barrier = Barrier{static_cast<int>(bx), 0, 0};
  for (auto& w : g_warp_barrier) w = Barrier{32, 0, 0};
  for (unsigned t = 0; t < bx; ++t) {
    Fiber& f = g_fibers[t];
    if (f.stack.size() < kStack) f.stack.resize(kStack);
    f.done = false;
    f.started = false;
    f.wait = nullptr;
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack.data();
    f.ctx.uc_stack.ss_size = f.stack.size();
    f.ctx.uc_link = &g_sched;
    makecontext(&f.ctx, trampoline, 0);
  }
  unsigned remaining = bx;
  while (remaining > 0) {
    bool progress = false;
    for (unsigned s = 0; s < bx; ++s) {
      const unsigned t = g_reverse ? bx - 1 - s : s;
      Fiber& f = g_fibers[t];
      if (f.done || (f.wait != nullptr && f.wait->gen == f.wait_gen)) continue;
      f.wait = nullptr;
      g_cur = static_cast<int>(t);
      g_threadIdx = {t, 0, 0};
      resume(f);
      progress = true;
      if (f.done) --remaining;
    }
    if (!progress) {
      std::fprintf(stderr, "emu: deadlock in block (%u, %u, %u): a barrier not reached by every thread\n",
                   g_blockIdx.x, g_blockIdx.y, g_blockIdx.z);
      return -3;
    }
  }
  return 0;
}

template <class... A, std::size_t... I>
void call_with(void (*k)(A...), void** args, std::index_sequence<I...>) {
  k(*static_cast<std::remove_reference_t<A>*>(args[I])...);
}

// Runs kernel k over the grid; returns 0, -1 for an invalid block size, -3 on a deadlock.
template <class... A>
int launch(void (*k)(A...), unsigned gx, unsigned gy, unsigned gz, unsigned bx, void** args) {
  if (bx == 0 || bx > 1024 || bx % 32 != 0) return -1;
  g_gridDim = {gx, gy, gz};
  g_blockDim = {bx, 1, 1};
  g_body = [k, args] { call_with(k, args, std::index_sequence_for<A...>{}); };
  for (unsigned z = 0; z < gz; ++z)
    for (unsigned y = 0; y < gy; ++y)
      for (unsigned x = 0; x < gx; ++x) {
        g_blockIdx = {x, y, z};
        const int rc = run_block(bx);
        if (rc != 0) return rc;
      }
  return 0;
}

}  // namespace emu

#define threadIdx (emu::g_threadIdx)
#define blockIdx (emu::g_blockIdx)
#define blockDim (emu::g_blockDim)
#define gridDim (emu::g_gridDim)

inline void __syncthreads() { emu::barrier_wait(emu::g_block_barrier); }

namespace emu {

// Value of lane src_lane of the calling thread's warp: every lane publishes v in its slot, the warp
// meets, reads, and meets again (so no lane overwrites its slot before all have read it).
template <class T>
T warp_exchange(T v, unsigned src_lane) {
  static_assert(sizeof(T) <= 8, "shuffle of at most 8 bytes");
  const unsigned t = g_threadIdx.x, warp = t / 32;
  unsigned long long bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  g_slots[t] = bits;
  barrier_wait(g_warp_barrier[warp]);
  bits = g_slots[(t & ~31u) | (src_lane & 31u)];
  barrier_wait(g_warp_barrier[warp]);
  T r;
  std::memcpy(&r, &bits, sizeof(T));
  return r;
}

}  // namespace emu

template <class T>
T __shfl_xor_sync(unsigned /*mask*/, T v, int lane_mask) {
  return emu::warp_exchange(v, (threadIdx.x & 31u) ^ static_cast<unsigned>(lane_mask));
}

// Full-mask only, like the kernels' calls; width 32. A source lane outside 0..31 wraps as on the GPU.
template <class T>
T __shfl_sync(unsigned /*mask*/, T v, int src_lane) {
  return emu::warp_exchange(v, static_cast<unsigned>(src_lane));
}

inline unsigned __ballot_sync(unsigned /*mask*/, int predicate) {
  const unsigned t = threadIdx.x, warp = t / 32;
  emu::g_slots[t] = predicate != 0 ? 1u : 0u;
  emu::barrier_wait(emu::g_warp_barrier[warp]);
  unsigned bits = 0;
  for (unsigned l = 0; l < 32; ++l) bits |= static_cast<unsigned>(emu::g_slots[warp * 32 + l]) << l;
  emu::barrier_wait(emu::g_warp_barrier[warp]);
  return bits;
}

inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }

inline float __uint_as_float(unsigned u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline double __longlong_as_double(long long u) {
  double f;
  std::memcpy(&f, &u, 8);
  return f;
}
inline unsigned __umulhi(unsigned a, unsigned b) {
  return static_cast<unsigned>((static_cast<unsigned long long>(a) * b) >> 32);
}
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline unsigned atomicAdd(unsigned* p, unsigned v) {
  const unsigned old = *p;  // fibers never interleave inside a call
  *p = old + v;
  return old;
}
