// Shared device helpers of the DynaMo kernels (see csrc/NOTES.md).
//
// Deliberately header free: NVRTC (cupy.RawModule) compiles this without any #include, and
// `nvcc -c` compiles it too. The Python loader (dynamo_sampling/kernels.py) pastes this file
// in place of `#include "common.cuh"`, so the module text it hands to NVRTC is self-contained.
//
// Block-level helpers below must be called by every thread of the block (they contain
// __syncthreads) and assume blockDim.x is a multiple of 32 and at most 1024.
#ifndef DYNAMO_SAMPLING_COMMON_CUH
#define DYNAMO_SAMPLING_COMMON_CUH

namespace dyn {

typedef unsigned int u32;
typedef unsigned long long u64;
typedef long long i64;

constexpr int kWarp = 32;
constexpr int kMaxWarps = 32;          // 1024 threads
constexpr int kMaxK = 64;              // longest top-k list
constexpr int kNoIndex = 0x7fffffff;   // index of an empty list slot: loses every tie
constexpr u32 kFullMask = 0xffffffffu;

// Philox stream tags: every random number is Philox(counter = (a, b, offset_lo + tag, offset_hi),
// key = seed), so streams with different tags never share a counter.
constexpr u32 kTagFullVocab = 1u;   // n = 1 sampler over the whole vocabulary (a = token, b = row)
constexpr u32 kTagList = 2u;        // n = 1 sampler over head 1's top-k list (a = list slot, b = row)
constexpr u32 kTagJoint = 16u;      // + n: joint draw of order n (a = cell, b = row)

__device__ __forceinline__ float neg_inf_f() { return __uint_as_float(0xff800000u); }
__device__ __forceinline__ float pos_inf_f() { return __uint_as_float(0x7f800000u); }
__device__ __forceinline__ double neg_inf_d() {
  return __longlong_as_double(static_cast<long long>(0xfff0000000000000ull));
}

__device__ __forceinline__ int imin(int a, int b) { return a < b ? a : b; }

// NaN -> -inf (x != x holds only for NaN, with or without -ftz); other values unchanged.
__device__ __forceinline__ float nan_to_neg_inf(float x) { return x != x ? neg_inf_f() : x; }

// Integer power for small exponents (cell counts k**n).
__device__ __forceinline__ i64 ipow(i64 base, int e) {
  i64 r = 1;
  for (int i = 0; i < e; ++i) r *= base;
  return r;
}

// The one ordering used everywhere: larger value first, then lower index. Values are never NaN:
// topk_softmax reads a NaN logit as -inf (see nan_to_neg_inf), and everything downstream is
// computed from its lists.
template <typename T>
__device__ __forceinline__ bool better(T va, int ia, T vb, int ib) {
  return va > vb || (va == vb && ia < ib);
}

template <typename T>
struct Best {
  T v;
  int i;
};

// ------------------------------------------------------------------ reductions

template <typename T>
__device__ __forceinline__ Best<T> warp_best(Best<T> b) {
  for (int o = kWarp / 2; o > 0; o >>= 1) {
    T v = __shfl_xor_sync(kFullMask, b.v, o);
    int i = __shfl_xor_sync(kFullMask, b.i, o);
    if (better(v, i, b.v, b.i)) {
      b.v = v;
      b.i = i;
    }
  }
  return b;
}

// Best (value, index) of the block under `better`; every thread gets the same answer.
template <typename T>
__device__ Best<T> block_best(Best<T> b) {
  __shared__ T s_v[kMaxWarps];
  __shared__ int s_i[kMaxWarps];
  const int lane = threadIdx.x & (kWarp - 1), warp = threadIdx.x / kWarp;
  const int nwarps = blockDim.x / kWarp;
  b = warp_best(b);
  if (lane == 0) {
    s_v[warp] = b.v;
    s_i[warp] = b.i;
  }
  __syncthreads();
  Best<T> r = {s_v[0], s_i[0]};
  for (int w = 1; w < nwarps; ++w) {
    if (better(s_v[w], s_i[w], r.v, r.i)) {
      r.v = s_v[w];
      r.i = s_i[w];
    }
  }
  __syncthreads();
  return r;
}

struct OpSum {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const { return a + b; }
};
struct OpMin {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const { return b < a ? b : a; }
};
struct OpMax {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const { return b > a ? b : a; }
};
struct OpOr {
  __device__ __forceinline__ int operator()(int a, int b) const { return a | b; }
};

// Reduction over the block; every thread gets the same value (lane 0 of each warp publishes its
// warp's result, then every thread folds the published values in the same order).
template <typename T, typename Op>
__device__ T block_reduce(T v, Op op) {
  __shared__ T s[kMaxWarps];
  const int lane = threadIdx.x & (kWarp - 1), warp = threadIdx.x / kWarp;
  const int nwarps = blockDim.x / kWarp;
  for (int o = kWarp / 2; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(kFullMask, v, o));
  if (lane == 0) s[warp] = v;
  __syncthreads();
  T r = s[0];
  for (int w = 1; w < nwarps; ++w) r = op(r, s[w]);
  __syncthreads();
  return r;
}

__device__ __forceinline__ double block_sum(double v) { return block_reduce(v, OpSum()); }
__device__ __forceinline__ float block_min(float v) { return block_reduce(v, OpMin()); }
__device__ __forceinline__ float block_max(float v) { return block_reduce(v, OpMax()); }

// Softmax normaliser of a block from per-thread (max m, sum of exp(x - m) s): the block max and
// the sum rescaled to it (float64). Every thread of the block must call it.
__device__ __forceinline__ double block_sumexp(float m, double s, float* bmax_out) {
  const float bmax = block_max(m);
  *bmax_out = bmax;
  return block_sum(s > 0.0 ? s * exp(static_cast<double>(m) - static_cast<double>(bmax)) : 0.0);
}
__device__ __forceinline__ int block_or(int v) { return block_reduce(v, OpOr()); }

// ------------------------------------------------------------------ Philox4x32-10

struct U32x4 {
  u32 v[4];
};

// Philox4x32 with 10 rounds (Salmon et al. 2011, Random123's philox4x32_R(10, ctr, key)).
__device__ __forceinline__ U32x4 philox4x32_10(U32x4 c, u32 k0, u32 k1) {
  const u32 M0 = 0xD2511F53u, M1 = 0xCD9E8D57u, W0 = 0x9E3779B9u, W1 = 0xBB67AE85u;
  for (int r = 0; r < 10; ++r) {
    if (r > 0) {
      k0 += W0;
      k1 += W1;
    }
    const u32 hi0 = __umulhi(M0, c.v[0]), lo0 = M0 * c.v[0];
    const u32 hi1 = __umulhi(M1, c.v[2]), lo1 = M1 * c.v[2];
    U32x4 n;
    n.v[0] = hi1 ^ c.v[1] ^ k0;
    n.v[1] = lo1;
    n.v[2] = hi0 ^ c.v[3] ^ k1;
    n.v[3] = lo0;
    c = n;
  }
  return c;
}

// Uniform in the open interval (0, 1) from two random words: (m + 1/2) * 2^-52 with m the top 52
// bits. Every step is exact in float64 (m + 1/2 needs 53 significant bits), so the result lies in
// [2^-53, 1 - 2^-53]: never 0 and never 1. (With 53 bits, (2^53 - 1/2) rounds to 2^53 and u = 1.)
__device__ __forceinline__ double uniform_from_bits(u32 hi, u32 lo) {
  const u64 m = (static_cast<u64>(hi >> 6) << 26) | static_cast<u64>(lo >> 6);  // 52 bits
  return (static_cast<double>(m) + 0.5) * 0x1p-52;
}

__device__ __forceinline__ double uniform_open(u64 seed, u64 offset, u32 a, u32 b, u32 tag) {
  U32x4 c;
  c.v[0] = a;
  c.v[1] = b;
  c.v[2] = static_cast<u32>(offset) + tag;
  c.v[3] = static_cast<u32>(offset >> 32);
  const U32x4 r = philox4x32_10(c, static_cast<u32>(seed), static_cast<u32>(seed >> 32));
  return uniform_from_bits(r.v[0], r.v[1]);
}

// Exp(1) variate from a uniform of uniform_open: -log1p(-u) as in policy.draw; strictly positive
// and finite (at most 53 ln 2 ~ 36.7), so J / E is always a finite score.
__device__ __forceinline__ double exp1_from_uniform(double u) { return -log1p(-u); }

__device__ __forceinline__ double exp1(u64 seed, u64 offset, u32 a, u32 b, u32 tag) {
  return exp1_from_uniform(uniform_open(seed, offset, a, b, tag));
}

__device__ __forceinline__ void load_seed(const i64* seed_ptr, i64 seed_arg, i64 offset_arg, u64* seed,
                                          u64* offset) {
  if (seed_ptr != nullptr) {
    *seed = static_cast<u64>(seed_ptr[0]);
    *offset = static_cast<u64>(seed_ptr[1]);
  } else {
    *seed = static_cast<u64>(seed_arg);
    *offset = static_cast<u64>(offset_arg);
  }
}

}  // namespace dyn

#endif  // DYNAMO_SAMPLING_COMMON_CUH
