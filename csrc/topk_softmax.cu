// Fused log-softmax normaliser + top-k per (row, head) of (B, H, V) logits. See csrc/NOTES.md.
//
// Kernels (extern "C", launched by dynamo_sampling/kernels.py):
//   topk_softmax_partial_{f32,bf16,f16}  grid (B*H, S), S splits of the vocabulary
//   topk_softmax_merge                   grid (B*H), only when S > 1
//
// Per element x = logit / temperature (IEEE division, as torch does on the CPU; a NaN result
// counts as -inf, so every list entry is a real index < V and NaN never reaches the step). A block keeps
// the running maximum and the sum of exp(x - max) (accumulated in double), the k best
// (x, index) pairs under "larger x first, then lower index", and optionally the Gumbel-max draw
// argmax_i x_i - log(E_i), E_i ~ Exp(1) from Philox (head 1 only: the n = 1 sampler over the
// whole vocabulary). With S == 1 the block writes the final outputs itself; otherwise it writes
// per-split partials that topk_softmax_merge combines.
//
// Final outputs, per row r = b * H + h:
//   out_prob[r, j] = exp((x_j - max) - log(sumexp))  (float32; 0 where x_j = -inf, and 0 for a
//                    row that is entirely -inf, where torch gives NaN)
//   out_id[r, j]   = index of x_j (int64), j = 0..k-1 in descending order
//   out_val[r, j]  = x_j (float32), optional (nullptr: not written)
//   out_sample[b]  = the Gumbel-max draw of head 1 (int64), optional
#include "common.cuh"

namespace dyn {

struct LoadF32 {
  typedef float T;
  static __device__ __forceinline__ float get(const float* p, int i) { return p[i]; }
};

struct LoadBF16 {  // raw bfloat16 bits
  typedef unsigned short T;
  static __device__ __forceinline__ float get(const unsigned short* p, int i) {
    return __uint_as_float(static_cast<u32>(p[i]) << 16);
  }
};

struct LoadF16 {  // raw IEEE binary16 bits, converted exactly
  typedef unsigned short T;
  static __device__ __forceinline__ float get(const unsigned short* p, int i) {
    const u32 h = p[i];
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

// Insert (v, i), known to beat the last entry, into the sorted list tv/ti of length k.
__device__ __forceinline__ void list_insert(float* tv, int* ti, int k, float v, int i) {
  int j = k - 1;
  while (j > 0 && better(v, i, tv[j - 1], ti[j - 1])) {
    tv[j] = tv[j - 1];
    ti[j] = ti[j - 1];
    --j;
  }
  tv[j] = v;
  ti[j] = i;
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
  __shared__ float s_v[kMaxK];
  __shared__ int s_i[kMaxK];
  const int row = blockIdx.x, split = blockIdx.y, S = gridDim.y;
  const int b = row / H, h = row - b * H;
  const typename L::T* x = logits + b * stride_b + h * stride_h;
  const int lo = split * chunk;
  const int hi = imin(V, lo + chunk);
  const bool do_gumbel = gumbel != 0 && h == 0;
  u64 seed = 0, offset = 0;
  if (do_gumbel) load_seed(seed_ptr, seed_arg, offset_arg, &seed, &offset);

  // 1. one pass over this thread's elements
  float tv[kMaxK];
  int ti[kMaxK];
  for (int j = 0; j < k; ++j) {
    tv[j] = neg_inf_f();
    ti[j] = kNoIndex;
  }
  float last_v = neg_inf_f();  // the list's last entry, kept in registers
  int last_i = kNoIndex;
  float m = neg_inf_f();
  double s = 0.0;
  double gs = neg_inf_d();
  int gi = kNoIndex;
  for (int i = lo + static_cast<int>(threadIdx.x); i < hi; i += blockDim.x) {
    const float v = nan_to_neg_inf(L::get(x, i) / temperature);
    if (v > m) {
      s = s * static_cast<double>(expf(m - v)) + 1.0;
      m = v;
    } else if (v > neg_inf_f()) {
      s += static_cast<double>(expf(v - m));
    }
    if (better(v, i, last_v, last_i)) {
      list_insert(tv, ti, k, v, i);
      last_v = tv[k - 1];
      last_i = ti[k - 1];
    }
    if (do_gumbel) {
      const double g = static_cast<double>(v) - log(exp1(seed, offset, static_cast<u32>(i), static_cast<u32>(b),
                                                          kTagFullVocab));
      if (better(g, i, gs, gi)) {
        gs = g;
        gi = i;
      }
    }
  }

  // 2. block max and sum of exp(x - max)
  float bmax;
  const double bsum = block_sumexp(m, s, &bmax);

  // 3. merge the per-thread lists: k rounds of "best head wins, its owner advances"
  int ptr = 0;
  for (int r = 0; r < k; ++r) {
    Best<float> c;
    c.v = ptr < k ? tv[ptr] : neg_inf_f();
    c.i = ptr < k ? ti[ptr] : kNoIndex;
    const Best<float> w = block_best(c);
    if (w.i != kNoIndex && ptr < k && ti[ptr] == w.i) ++ptr;
    if (threadIdx.x == 0) {
      s_v[r] = w.v;
      s_i[r] = w.i;
    }
  }
  Best<double> g;
  g.v = gs;
  g.i = gi;
  if (do_gumbel) g = block_best(g);  // uniform branch: do_gumbel depends on the block only
  __syncthreads();

  // 4. outputs
  if (S == 1) {
    write_final(row, k, bmax, bsum, s_v, s_i, out_prob, out_id, out_val);
    if (do_gumbel && threadIdx.x == 0) out_sample[b] = g.i;
  } else {
    const i64 ps = static_cast<i64>(row) * S + split;
    for (int j = threadIdx.x; j < k; j += blockDim.x) {
      part_val[ps * k + j] = s_v[j];
      part_idx[ps * k + j] = s_i[j];
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

#define DYN_TOPK_PARTIAL(NAME, LOADER)                                                                              \
  extern "C" __global__ void NAME(const LOADER::T* __restrict__ logits, long long stride_b, long long stride_h,    \
                                  int H, int V, int k, int chunk, float temperature, int gumbel,                   \
                                  const long long* seed_ptr, long long seed_arg, long long offset_arg,             \
                                  float* part_val, int* part_idx, float* part_max, double* part_sum,               \
                                  double* part_gscore, int* part_gidx, float* out_prob, long long* out_id,         \
                                  float* out_val, long long* out_sample) {                                         \
    dyn::topk_partial<LOADER>(logits, stride_b, stride_h, H, V, k, chunk, temperature, gumbel, seed_ptr, seed_arg, \
                              offset_arg, part_val, part_idx, part_max, part_sum, part_gscore, part_gidx,          \
                              out_prob, out_id, out_val, out_sample);                                              \
  }

DYN_TOPK_PARTIAL(topk_softmax_partial_f32, dyn::LoadF32)
DYN_TOPK_PARTIAL(topk_softmax_partial_bf16, dyn::LoadBF16)
DYN_TOPK_PARTIAL(topk_softmax_partial_f16, dyn::LoadF16)

#undef DYN_TOPK_PARTIAL

// Combine the S partial results of each row (one block per row, blockDim.x >= S, multiple of 32).
extern "C" __global__ void topk_softmax_merge(int H, int S, int k, int gumbel, const float* __restrict__ part_val,
                                              const int* __restrict__ part_idx, const float* __restrict__ part_max,
                                              const double* __restrict__ part_sum,
                                              const double* __restrict__ part_gscore,
                                              const int* __restrict__ part_gidx, float* __restrict__ out_prob,
                                              long long* __restrict__ out_id, float* __restrict__ out_val,
                                              long long* __restrict__ out_sample) {
  using namespace dyn;
  __shared__ float s_v[kMaxK];
  __shared__ int s_i[kMaxK];
  const int row = blockIdx.x, b = row / H, h = row - b * H;
  const int t = threadIdx.x;
  const bool owner = t < S;  // thread t owns split t's list
  const i64 ps = static_cast<i64>(row) * S + t;

  const float m = owner ? part_max[ps] : neg_inf_f();
  const double s = owner ? part_sum[ps] : 0.0;
  float bmax;
  const double bsum = block_sumexp(m, s, &bmax);

  int ptr = 0;
  for (int r = 0; r < k; ++r) {
    Best<float> c;
    c.v = neg_inf_f();
    c.i = kNoIndex;
    if (owner && ptr < k) {
      c.v = part_val[ps * k + ptr];
      c.i = part_idx[ps * k + ptr];
    }
    const Best<float> w = block_best(c);
    if (w.i != kNoIndex && owner && ptr < k && part_idx[ps * k + ptr] == w.i) ++ptr;
    if (t == 0) {
      s_v[r] = w.v;
      s_i[r] = w.i;
    }
  }
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
  __syncthreads();
  write_final(row, k, bmax, bsum, s_v, s_i, out_prob, out_id, out_val);
  if (do_gumbel && t == 0) out_sample[b] = g.i;
}
