// Fused log-softmax normaliser + top-k per (row, head) of (B, H, V) logits. See csrc/NOTES.md.
//
// Kernels (extern "C", launched by dynamo_sampling/kernels.py):
//   topk_softmax_partial_{f32,bf16,f16}  grid (B*H, S), S <= kMaxLists splits of the vocabulary
//   topk_softmax_merge                   grid (B*H), only when S > 1; blockDim.x >= S
//
// Per element x = logit / temperature (IEEE division, as torch does on the CPU; a NaN result
// counts as -inf, so every list entry is a real index < V and NaN never reaches the step). Each
// lane keeps the running maximum and the sum of exp(x - max) of its elements (in double), and
// optionally the Gumbel-max draw argmax_i x_i - log(E_i), E_i ~ Exp(1) from Philox (head 1 only:
// the n = 1 sampler over the whole vocabulary). Each warp keeps a sorted list of the k best
// (x, index) pairs it has seen, under "larger x first, then lower index", in registers (WarpScan).
// The block then merges its warps' lists by rank (merge_lists). With S == 1 the block writes the
// final outputs itself; otherwise it writes per-split partials that topk_softmax_merge combines
// (the same rank merge over the S lists).
//
// Final outputs, per row r = b * H + h:
//   out_prob[r, j] = exp((x_j - max) - log(sumexp))  (float32; 0 where x_j = -inf, and 0 for a
//                    row that is entirely -inf, where torch gives NaN)
//   out_id[r, j]   = index of x_j (int64), j = 0..k-1 in descending order
//   out_val[r, j]  = x_j (float32), optional (nullptr: not written)
//   out_sample[b]  = the Gumbel-max draw of head 1 (int64), optional
#include "common.cuh"

namespace dyn {

// Most lists one block merges: the warps of a partial block (1024 threads) or the splits of a row
// (kernels.MAX_SPLITS). Two shared buffers of kMaxLists and kMaxLists / 2 lists: 24 KB.
constexpr int kMaxLists = 32;

struct LoadF32 {
  typedef float T;
  static __device__ __forceinline__ float cvt(float raw) { return raw; }
};

struct LoadBF16 {  // raw bfloat16 bits
  typedef unsigned short T;
  static __device__ __forceinline__ float cvt(unsigned short raw) {
    return __uint_as_float(static_cast<u32>(raw) << 16);
  }
};

struct LoadF16 {  // raw IEEE binary16 bits, converted exactly
  typedef unsigned short T;
  static __device__ __forceinline__ float cvt(unsigned short raw) {
    const u32 h = raw;
    const u32 sign = (h & 0x8000u) << 16;
    const u32 expo = (h >> 10) & 0x1fu;
    const u32 mant = h & 0x3ffu;
    if (expo == 0x1fu) return __uint_as_float(sign | 0x7f800000u | (mant << 13));  // inf / nan
    if (expo == 0u) {                                                               // zero / subnormal
      const float mag = static_cast<float>(mant) * 5.9604644775390625e-8f;          // mant * 2^-24
      return sign ? -mag : mag;
    }
    return __uint_as_float(sign | ((expo + 112u) << 23) | (mant << 13));
  }
};

// 16 bytes of elements, read with one 16-byte load.
template <typename T>
struct alignas(16) Pack16 {
  T v[16 / sizeof(T)];
};

// ------------------------------------------------------------------ one warp's scan

// x - log(E), E ~ Exp(1) the variate of token i of batch row b. Not inlined: the Philox rounds and the
// float64 logarithm would otherwise take registers from the whole scan (the kernel then fits 64
// registers, so 1024-thread blocks launch, without spilling).
__device__ __noinline__ double gumbel_score(float x, u64 seed, u64 offset, u32 i, u32 b) {
  return static_cast<double>(x) - log(exp1(seed, offset, i, b, kTagFullVocab));
}

// The scan state of one warp.
// Per lane: the running maximum m and s = sum of exp(x - m) over the lane's elements (float64,
// online rescaling), and the lane's Gumbel-max candidate (gs, gi).
// Per warp: the sorted list of the k best (x, index) pairs seen so far, in registers: entry j lives
// in lane j % 32, in register a (j < 32) or b (j >= 32; unused when k <= 32). Empty entries are
// (-inf, kNoIndex) and lose to every real element. (tv, ti), the list's k-th entry, is the filter.
// offer, insert, sort64 and refresh_threshold must be called by all 32 lanes together (full-mask warp
// intrinsics) under warp-uniform control flow; the list is exchanged by shuffles, never through
// memory, so no __syncwarp is needed.
struct WarpScan {
  int k, lane;
  float av, bv, tv;
  int ai, bi, ti;
  float m;
  double s;
  u64 seed, offset;
  u32 b;  // batch row: the Philox counter of the vocabulary draw
  double gs;
  int gi;

  __device__ void init(int k_, u64 seed_, u64 offset_, u32 b_) {
    k = k_;
    lane = static_cast<int>(threadIdx.x) % kWarp;
    av = bv = tv = neg_inf_f();
    ai = bi = ti = kNoIndex;
    m = neg_inf_f();
    s = 0.0;
    seed = seed_;
    offset = offset_;
    b = b_;
    gs = neg_inf_d();
    gi = kNoIndex;
  }

  // Softmax normaliser of this lane's elements: one more element x.
  __device__ __forceinline__ void account(float x) {
    if (x > m) {
      s = s * static_cast<double>(expf(m - x)) + 1.0;
      m = x;
    } else if (x > neg_inf_f()) {
      s += static_cast<double>(expf(x - m));
    }
  }

  // Gumbel-max candidate of this lane's elements: one more element (x, i).
  __device__ __forceinline__ void account_gumbel(float x, int i) {
    const double g = gumbel_score(x, seed, offset, static_cast<u32>(i), b);
    if (better(g, i, gs, gi)) {
      gs = g;
      gi = i;
    }
  }

  // (tv, ti) = entry k - 1.
  __device__ __forceinline__ void refresh_threshold() {
    const bool in_b = k > kWarp;
    tv = __shfl_sync(kFullMask, in_b ? bv : av, (k - 1) % kWarp);
    ti = __shfl_sync(kFullMask, in_b ? bi : ai, (k - 1) % kWarp);
  }

  // Insert (cv, ci) at its place: pos = the number of entries better than it; entries from pos on move
  // one slot down (each lane takes its predecessor's entry; the last one falls off). pos >= k leaves
  // the first k entries as they were, so a candidate that no longer beats the k-th entry is harmless.
  __device__ __forceinline__ void insert(float cv, int ci) {
    const int from = (lane + kWarp - 1) % kWarp;  // the lane holding this lane's predecessor entries
    const float av_up = __shfl_sync(kFullMask, av, from);
    const int ai_up = __shfl_sync(kFullMask, ai, from);
    int pos = __popc(__ballot_sync(kFullMask, better(av, ai, cv, ci)));
    if (k > kWarp) {
      const float bv_up = __shfl_sync(kFullMask, bv, from);
      const int bi_up = __shfl_sync(kFullMask, bi, from);
      pos += __popc(__ballot_sync(kFullMask, better(bv, bi, cv, ci)));
      const int j = lane + kWarp;
      if (j > pos) {  // entry 32's predecessor is entry 31 (register a of lane 31)
        bv = lane == 0 ? av_up : bv_up;
        bi = lane == 0 ? ai_up : bi_up;
      } else if (j == pos) {
        bv = cv;
        bi = ci;
      }
    }
    if (lane > pos) {
      av = av_up;
      ai = ai_up;
    } else if (lane == pos) {
      av = cv;
      ai = ci;
    }
  }

  // One element per lane (valid: whether this lane has one): the elements that beat the k-th entry
  // are inserted one after another, in lane order.
  __device__ __forceinline__ void offer(float x, int i, bool valid) {
    u32 pass = __ballot_sync(kFullMask, valid && better(x, i, tv, ti));
    if (pass == 0u) return;
    do {
      const int src = __ffs(static_cast<int>(pass)) - 1;
      pass &= pass - 1u;
      insert(__shfl_sync(kFullMask, x, src), __shfl_sync(kFullMask, i, src));
    } while (pass != 0u);
    refresh_threshold();
  }

  // Compare-exchange of the bitonic network on entry e (this lane's a or b) with entry e ^ stride of
  // lane ^ stride: the first entry of the pair keeps the better one in a descending run.
  __device__ __forceinline__ void bitonic_step(float& v, int& i, int e, int size, int stride) {
    const float pv = __shfl_xor_sync(kFullMask, v, stride);
    const int pi = __shfl_xor_sync(kFullMask, i, stride);
    const bool keep_better = ((e & stride) == 0) == ((e & size) == 0);
    if (better(pv, pi, v, i) == keep_better) {
      v = pv;
      i = pi;
    }
  }

  // The list from scratch: (av, ai), (bv, bi) hold any 64 entries (the warp's first 64 elements,
  // unsorted); sort them (bitonic network, descending under `better`) and set the threshold.
  __device__ void sort64() {
    for (int size = 2; size <= 2 * kWarp; size *= 2) {
      for (int stride = size / 2; stride > 0; stride /= 2) {
        if (stride == kWarp) {  // entry lane against entry lane + 32: both in this lane
          if (better(bv, bi, av, ai)) {
            const float v = av;
            const int i = ai;
            av = bv;
            ai = bi;
            bv = v;
            bi = i;
          }
        } else {
          bitonic_step(av, ai, lane, size, stride);
          bitonic_step(bv, bi, lane + kWarp, size, stride);
        }
      }
    }
    refresh_threshold();
  }

  // The first k entries to v[0..k), i[0..k) (shared memory).
  __device__ void store(float* v, int* i) const {
    if (lane < k) {
      v[lane] = av;
      i[lane] = ai;
    }
    if (lane + kWarp < k) {
      v[lane + kWarp] = bv;
      i[lane + kWarp] = bi;
    }
  }
};

// ------------------------------------------------------------------ merging sorted lists

struct Lists {  // list w: v[w * kMaxK + j], i[w * kMaxK + j], j < k (shared memory)
  float* v;
  int* i;
};

// The number of entries of the sorted list (v, i)[0..k) that come before (x, xi): those better than
// it, or (or_equal) better than or equal to it. Binary search: the entries before form a prefix.
__device__ __forceinline__ int count_before(const float* v, const int* i, int k, float x, int xi, bool or_equal) {
  int lo = 0, hi = k;
  while (lo < hi) {
    const int mid = (lo + hi) / 2;
    const bool before = or_equal ? !better(x, xi, v[mid], i[mid]) : better(v[mid], i[mid], x, xi);
    if (before) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return lo;
}

// Merge the n sorted lists of k entries in `a` into one, the k best: rounds of pairwise merges
// (lists 2w and 2w + 1 -> list w of the other buffer; `b` holds (n + 1) / 2 lists), no sorting. In a
// pair, every entry goes straight to its rank in the merged list: its own position plus the number
// of entries of the other list before it. Ties are broken by list (the left one's entries first); only
// empty entries (-inf, kNoIndex) can be equal (real indices are unique), so the ranks of a pair are a
// permutation of 0 .. 2k - 1 and slots 0 .. k - 1 are all written. A list without a partner is copied.
// Every thread of the block calls it after a barrier that published `a`; returns the buffer that
// holds the result (list 0), published by the last round's barrier.
__device__ Lists merge_lists(Lists a, Lists b, int n, int k) {
  while (n > 1) {
    for (int e = threadIdx.x; e < n * k; e += blockDim.x) {
      const int w = e / k, j = e - w * k;
      const float v = a.v[w * kMaxK + j];
      const int i = a.i[w * kMaxK + j];
      const int other = w ^ 1;
      int rank = j;
      if (other < n) rank += count_before(a.v + other * kMaxK, a.i + other * kMaxK, k, v, i, (w & 1) != 0);
      if (rank < k) {
        b.v[(w / 2) * kMaxK + rank] = v;
        b.i[(w / 2) * kMaxK + rank] = i;
      }
    }
    __syncthreads();
    const Lists t = a;
    a = b;
    b = t;
    n = (n + 1) / 2;
  }
  return a;
}

// Final outputs of one row from the merged list s_v/s_i (shared) and (row max, sumexp).
__device__ void write_final(int row, int k, float row_max, double row_sum, const float* s_v, const int* s_i,
                            float* out_prob, i64* out_id, float* out_val) {
  const bool finite = row_max > neg_inf_f();
  const float log_sum = finite ? static_cast<float>(log(row_sum)) : 0.0f;
  for (int j = threadIdx.x; j < k; j += blockDim.x) {
    const float v = s_v[j];
    const i64 o = static_cast<i64>(row) * k + j;
    out_prob[o] = finite ? expf((v - row_max) - log_sum) : 0.0f;
    out_id[o] = s_i[j];
    if (out_val != nullptr) out_val[o] = v;
  }
}

template <class L>
__device__ void topk_partial(const typename L::T* __restrict__ logits, i64 stride_b, i64 stride_h, int H, int V,
                             int k, int chunk, float temperature, int gumbel, const i64* seed_ptr, i64 seed_arg,
                             i64 offset_arg, float* __restrict__ part_val, int* __restrict__ part_idx,
                             float* __restrict__ part_max, double* __restrict__ part_sum,
                             double* __restrict__ part_gscore, int* __restrict__ part_gidx,
                             float* __restrict__ out_prob, i64* __restrict__ out_id, float* __restrict__ out_val,
                             i64* __restrict__ out_sample) {
  typedef typename L::T T;
  constexpr int kVec = 16 / sizeof(T);    // elements of one 16-byte load
  constexpr int kTile = kWarp * kVec;     // elements of one warp-wide load
  __shared__ float s_av[kMaxLists * kMaxK];
  __shared__ int s_ai[kMaxLists * kMaxK];
  __shared__ float s_bv[kMaxLists / 2 * kMaxK];
  __shared__ int s_bi[kMaxLists / 2 * kMaxK];
  const int row = blockIdx.x, split = blockIdx.y, S = gridDim.y;
  const int b = row / H, h = row - b * H;
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp, nwarps = blockDim.x / kWarp;
  const T* x = logits + b * stride_b + h * stride_h;
  const int lo = split * chunk;
  const int hi = imin(V, lo + chunk);
  const bool do_gumbel = gumbel != 0 && h == 0;
  u64 seed = 0, offset = 0;
  if (do_gumbel) load_seed(seed_ptr, seed_arg, offset_arg, &seed, &offset);

  WarpScan ws;
  ws.init(k, seed, offset, static_cast<u32>(b));
  const auto scaled = [temperature](T raw) { return nan_to_neg_inf(L::cvt(raw) / temperature); };

  // 1. one pass over the slice [lo, hi). [a0, a1): whole tiles of 16-byte loads from 16-byte aligned
  // addresses, tile t to warp t % nwarps, lane l reading elements l * kVec .. l * kVec + kVec - 1;
  // [lo, a0) (fewer than kVec elements) and [a1, hi): groups of 32 consecutive elements, one per lane.
  const u32 skip_bytes = (0u - static_cast<u32>(reinterpret_cast<u64>(x + lo))) % 16u;  // to a 16-byte boundary
  const int a0 = imin(hi, lo + static_cast<int>(skip_bytes / sizeof(T)));
  const int tiles = (hi - a0) / kTile;
  const int a1 = a0 + tiles * kTile;
  Pack16<T> next = {};
  if (warp < tiles) next = *reinterpret_cast<const Pack16<T>*>(x + a0 + warp * kTile + lane * kVec);
  for (int t = warp; t < tiles; t += nwarps) {
    const Pack16<T> p = next;  // the next tile's load is in flight while this one is processed
    if (t + nwarps < tiles) {
      next = *reinterpret_cast<const Pack16<T>*>(x + a0 + (t + nwarps) * kTile + lane * kVec);
    }
    const int i0 = a0 + t * kTile + lane * kVec;
    const bool first = t == warp;
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      const float v = scaled(p.v[e]);
      ws.account(v);
      if (do_gumbel) ws.account_gumbel(v, i0 + e);
      if (first && e == 0) {  // the warp's first 64 elements are sorted at once (elements 0 and 1 of
        ws.av = v;            // each lane's first load)
        ws.ai = i0;
      } else if (first && e == 1) {
        ws.bv = v;
        ws.bi = i0 + 1;
        ws.sort64();
      } else {
        ws.offer(v, i0 + e, true);
      }
    }
  }
  for (int g = warp * kWarp; g < (a0 - lo) + (hi - a1); g += nwarps * kWarp) {
    const int j = g + lane;  // the j-th element of [lo, a0) followed by [a1, hi)
    const bool valid = j < (a0 - lo) + (hi - a1);
    const int i = j < a0 - lo ? lo + j : a1 + (j - (a0 - lo));
    const float v = valid ? scaled(x[i]) : 0.0f;
    if (valid) {
      ws.account(v);
      if (do_gumbel) ws.account_gumbel(v, i);
    }
    ws.offer(v, i, valid);
  }
  ws.store(s_av + warp * kMaxK, s_ai + warp * kMaxK);

  // 2. block max and sum of exp(x - max)
  float bmax;
  const double bsum = block_sumexp(ws.m, ws.s, &bmax);

  // 3. the warps' lists merged by rank (block_sumexp's barriers published them already; this one
  // does not rely on that)
  __syncthreads();
  const Lists top = merge_lists(Lists{s_av, s_ai}, Lists{s_bv, s_bi}, nwarps, k);
  Best<double> g;
  g.v = ws.gs;
  g.i = ws.gi;
  if (do_gumbel) g = block_best(g);  // uniform branch: do_gumbel depends on the block only

  // 4. outputs
  if (S == 1) {
    write_final(row, k, bmax, bsum, top.v, top.i, out_prob, out_id, out_val);
    if (do_gumbel && threadIdx.x == 0) out_sample[b] = g.i;
  } else {
    const i64 ps = static_cast<i64>(row) * S + split;
    for (int j = threadIdx.x; j < k; j += blockDim.x) {
      part_val[ps * k + j] = top.v[j];
      part_idx[ps * k + j] = top.i[j];
    }
    if (threadIdx.x == 0) {
      part_max[ps] = bmax;
      part_sum[ps] = bsum;
      if (do_gumbel) {
        part_gscore[ps] = g.v;
        part_gidx[ps] = g.i;
      }
    }
  }
}

}  // namespace dyn

// 1024: the most threads a block may have; ptxas then keeps the kernel within 64 registers.
#define DYN_TOPK_PARTIAL(NAME, LOADER)                                                                              \
  extern "C" __global__ void __launch_bounds__(1024)                                                               \
      NAME(const LOADER::T* __restrict__ logits, long long stride_b, long long stride_h, int H, int V, int k,      \
           int chunk, float temperature, int gumbel, const long long* seed_ptr, long long seed_arg,                \
           long long offset_arg, float* part_val, int* part_idx, float* part_max, double* part_sum,                \
           double* part_gscore, int* part_gidx, float* out_prob, long long* out_id, float* out_val,                \
           long long* out_sample) {                                                                                \
    dyn::topk_partial<LOADER>(logits, stride_b, stride_h, H, V, k, chunk, temperature, gumbel, seed_ptr, seed_arg, \
                              offset_arg, part_val, part_idx, part_max, part_sum, part_gscore, part_gidx,          \
                              out_prob, out_id, out_val, out_sample);                                              \
  }

DYN_TOPK_PARTIAL(topk_softmax_partial_f32, dyn::LoadF32)
DYN_TOPK_PARTIAL(topk_softmax_partial_bf16, dyn::LoadBF16)
DYN_TOPK_PARTIAL(topk_softmax_partial_f16, dyn::LoadF16)

#undef DYN_TOPK_PARTIAL

// Combine the S <= kMaxLists partial results of each row (one block per row, blockDim.x >= S, a
// multiple of 32): the S lists merged by rank as in the partial kernel.
extern "C" __global__ void topk_softmax_merge(int H, int S, int k, int gumbel, const float* __restrict__ part_val,
                                              const int* __restrict__ part_idx, const float* __restrict__ part_max,
                                              const double* __restrict__ part_sum,
                                              const double* __restrict__ part_gscore,
                                              const int* __restrict__ part_gidx, float* __restrict__ out_prob,
                                              long long* __restrict__ out_id, float* __restrict__ out_val,
                                              long long* __restrict__ out_sample) {
  using namespace dyn;
  __shared__ float s_av[kMaxLists * kMaxK];
  __shared__ int s_ai[kMaxLists * kMaxK];
  __shared__ float s_bv[kMaxLists / 2 * kMaxK];
  __shared__ int s_bi[kMaxLists / 2 * kMaxK];
  const int row = blockIdx.x, b = row / H, h = row - b * H;
  const int t = threadIdx.x;
  const bool owner = t < S;  // thread t owns split t's max, sum and Gumbel candidate
  const i64 ps = static_cast<i64>(row) * S + t;

  for (int e = t; e < S * k; e += blockDim.x) {
    const int w = e / k, j = e - w * k;
    s_av[w * kMaxK + j] = part_val[static_cast<i64>(row) * S * k + e];
    s_ai[w * kMaxK + j] = part_idx[static_cast<i64>(row) * S * k + e];
  }
  const float m = owner ? part_max[ps] : neg_inf_f();
  const double s = owner ? part_sum[ps] : 0.0;
  float bmax;
  const double bsum = block_sumexp(m, s, &bmax);

  __syncthreads();
  const Lists top = merge_lists(Lists{s_av, s_ai}, Lists{s_bv, s_bi}, S, k);
  const bool do_gumbel = gumbel != 0 && h == 0;
  Best<double> g;
  g.v = neg_inf_d();
  g.i = kNoIndex;
  if (do_gumbel) {
    if (owner) {
      g.v = part_gscore[ps];
      g.i = part_gidx[ps];
    }
    g = block_best(g);
  }
  write_final(row, k, bmax, bsum, top.v, top.i, out_prob, out_id, out_val);
  if (do_gumbel && t == 0) out_sample[b] = g.i;
}
