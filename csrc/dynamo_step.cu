// The DynaMo step on per-head top-k lists, one block per row (grid-stride over rows).
// Mirrors dynamo_sampling/policy.py::dynamo_step (the dense candidate reference) step by step, on a
// compacted list of the candidate cells instead of all k**n cells; see csrc/NOTES.md for the
// correspondence and the tolerance rules.
//
// Inputs per row b (lists come from topk_softmax, KL >= k entries per head, the first k are used
// for the joint): probs (B, H, KL) float32 under the full softmax, ids (B, H, KL) int64, vals
// (B, H, KL) float32 scaled logits (only head 1's, only for the n = 1 list sampler).
//
// Scratch per block (4-byte words, `scratch_per_block` of them, sized by kernels.py), room for every
// cell of order H: [cells: int32 k**H] [J: float32 k**H] [blurred J: float32 k**H, only with the blur].
// The list holds the cells whose unweighted product passes the static threshold, ascending; J is
// the candidate's value (>= 0), or -1 once the statistics or the adaptive threshold dropped it.
//
// Outputs (every element written): tokens (B, H) int64, -1 after n; n_out (B,) int64;
// draft (B, H, k) float32 or nullptr.
#include "common.cuh"

namespace dyn {

constexpr int kMaxH = 4;
constexpr int kMaxBins = 4096;
constexpr int kMaxOffsets = 81;  // 3 ** kMaxH blur neighbours
constexpr float kNotCand = -1.0f;

struct StatsView {
  const i64* keys[kMaxH + 1];
  const i64* counts[kMaxH + 1];
  const i64* starts[kMaxH + 1];  // (V + 1,): keys of n-grams starting with token x are [starts[x], starts[x + 1])
  i64 nkeys[kMaxH + 1];
  double total[kMaxH + 1];
  const i64* uni;
  i64 V;
  double alpha;
};

// Corpus count of a packed key whose first token is x0: lower_bound in the sorted key table of order
// m, within the keys that start with x0 (a few hundred, not the whole table: each step of the search
// is a dependent global load, so the first-token index halves the latency of a lookup).
__device__ __forceinline__ i64 lookup_count(const StatsView& st, int m, i64 key, i64 x0) {
  const i64* keys = st.keys[m];
  i64 lo = st.starts[m][x0], hi = st.starts[m][x0 + 1];
  const i64 end = hi;
  while (lo < hi) {
    const i64 mid = lo + ((hi - lo) >> 1);
    if (keys[mid] < key) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return (lo < end && keys[lo] == key) ? st.counts[m][lo] : 0;
}

// CooccurrenceStats.weight of one n-gram: float64 as there, rounded to float32; 0 if unseen.
__device__ float ngram_weight(const StatsView& st, int m, const i64* x) {
  i64 key = x[0];
  for (int j = 1; j < m; ++j) key = key * st.V + x[j];
  const i64 c = lookup_count(st, m, key, x[0]);
  if (c <= 0) return 0.0f;
  double w = static_cast<double>(c) / st.total[m];
  double prod = static_cast<double>(st.uni[x[0]]) / st.total[1];
  for (int j = 1; j < m; ++j) prod = prod * (static_cast<double>(st.uni[x[j]]) / st.total[1]);
  w = w / prod;
  if (st.alpha != 1.0) w = pow(w, st.alpha);
  return static_cast<float>(w);
}

// Digits of a flat cell, d[0] most significant (row-major cells, as policy.dense_candidates). Cells
// fit in 32 bits (k**H <= 2**24, kernels.MAX_CELLS): 32-bit division is several times cheaper.
__device__ __forceinline__ void decode_cell(int c, int n, int k, int* d) {
  for (int j = n - 1; j >= 0; --j) {
    d[j] = static_cast<int>(c % k);
    c /= k;
  }
}

// Exclusive prefix sum over the block in thread order, and the block's total (every thread must
// call it). Within a warp a butterfly of xor shuffles: at distance o, a lane in the upper half of
// its 2o-group adds the lower half's sum. Exact for integers, and for the Otsu sums below.
template <typename T>
__device__ T block_exclusive_scan(T v, T* total) {
  __shared__ T s_w[kMaxWarps];
  const int lane = threadIdx.x & (kWarp - 1), warp = threadIdx.x / kWarp;
  const int nwarps = blockDim.x / kWarp;
  T pre = 0, tot = v;
  for (int o = 1; o < kWarp; o <<= 1) {
    const T other = __shfl_xor_sync(kFullMask, tot, o);
    if (lane & o) pre += other;
    tot += other;
  }
  if (lane == 0) s_w[warp] = tot;
  __syncthreads();
  T base = 0, all = 0;
  for (int w = 0; w < nwarps; ++w) {
    if (w < warp) base += s_w[w];
    all += s_w[w];
  }
  __syncthreads();
  *total = all;
  return base + pre;
}

// First position in the ascending array a[0..n) whose value is >= key.
__device__ __forceinline__ int lower_bound_int(const int* a, int n, i64 key) {
  int lo = 0, hi = n;
  while (lo < hi) {
    const int mid = (lo + hi) >> 1;
    if (a[mid] < key) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return lo;
}

// Cells of order n whose product of the heads' probabilities exceeds tau, from this thread's
// contiguous range [u_lo, u_hi) of units (a unit is the first n - 1 digits; its cells are the last
// head's entries), in row-major cell order. Returns how many; with `cells` non-null also writes the
// cells and their products ((p0 * p1) * p2 in float32, the reference's order). The lists are sorted
// descending and float32 rounding is monotone, so the loop over the last digit stops at the first
// failure, and a prefix whose product with the best remaining entries is <= tau skips every unit
// under it. In speculative mode (first_idx >= 0) only units with d0 == first_idx count.
__device__ int enumerate_cells(const float* s_p, int k, int n, float tau, int first_idx, int u_lo, int u_hi,
                               int* cells, float* prods) {
  int count = 0;
  int u = u_lo;
  while (u < u_hi) {
    int d[kMaxH];
    decode_cell(u, n - 1, k, d);
    int block = static_cast<int>(ipow(k, n - 2));  // units under the prefix d[0..j]
    float v = 0.0f;
    bool skip = false;
    for (int j = 0; j < n - 1 && !skip; ++j) {
      v = j == 0 ? s_p[d[0]] : __fmul_rn(v, s_p[j * k + d[j]]);
      float bound = v;  // the prefix times the best entry of every later head
      for (int h = j + 1; h < n; ++h) bound = __fmul_rn(bound, s_p[h * k]);
      if (!(bound > tau) || (j == 0 && first_idx >= 0 && d[0] != first_idx)) {
        u = (u / block + 1) * block;
        skip = true;
      }
      block /= k;
    }
    if (skip) continue;
    const float* last = s_p + (n - 1) * k;
    for (int dl = 0; dl < k; ++dl) {
      const float x = __fmul_rn(v, last[dl]);
      if (!(x > tau)) break;
      if (cells != nullptr) {
        cells[count] = u * k + dl;
        prods[count] = x;
      }
      ++count;
    }
    ++u;
  }
  return count;
}

// policy.otsu_threshold from the histogram, in parallel: each thread takes a contiguous range of
// bins; the cumulative weights and moments are sums of integers and half-integers below 2^53, so
// exact in any order, and the between-class variance of every bin is the reference's float64
// value. The first maximum wins (block_best: larger value, then lower bin).
__device__ float otsu_from_hist(const u32* hist, int bins, float lo, float hi, float width) {
  const int per = (bins + blockDim.x - 1) / blockDim.x;
  const int t0 = imin(bins, threadIdx.x * per), t1 = imin(bins, t0 + per);
  double cw = 0.0, cm = 0.0;
  for (int t = t0; t < t1; ++t) {
    const double c = static_cast<double>(hist[t]);
    cw += c;
    cm += c * (static_cast<double>(t) + 0.5);
  }
  double total, mtotal;
  double w0 = block_exclusive_scan(cw, &total);
  double m0 = block_exclusive_scan(cm, &mtotal);
  Best<double> best;
  best.v = neg_inf_d();
  best.i = kNoIndex;
  for (int t = t0; t < t1; ++t) {
    const double c = static_cast<double>(hist[t]);
    w0 += c;
    m0 += c * (static_cast<double>(t) + 0.5);
    const double w1 = total - w0;
    double between = -1.0;
    if (w0 > 0.0 && w1 > 0.0) {
      const double dd = m0 / w0 - (mtotal - m0) / w1;
      between = w0 * w1 * (dd * dd);
    }
    if (between > best.v) {
      best.v = between;
      best.i = t;
    }
  }
  best = block_best(best);
  if (best.v <= 0.0 || !(hi > lo)) return lo;
  return lo + (static_cast<float>(best.i + 1) * width) / static_cast<float>(bins);
}

}  // namespace dyn

extern "C" __global__ void __launch_bounds__(512, 1) dynamo_step_kernel(
    int B, int H, int k, int KL, const float* __restrict__ probs, const long long* __restrict__ ids,
    const float* __restrict__ vals, const long long* __restrict__ sample_full,
    // co-occurrence statistics (use_stats = 0: none)
    int use_stats, double alpha_c, long long stats_vocab, const long long* keys2, const long long* counts2,
    const long long* starts2, long long nkeys2, const long long* keys3, const long long* counts3,
    const long long* starts3, long long nkeys3, const long long* keys4, const long long* counts4,
    const long long* starts4, long long nkeys4, double total1, double total2, double total3, double total4,
    const long long* __restrict__ unigrams,
    // thresholds: tau_n = eps_b ** (n - 1) as float32; blur taps as float64 (policy.blur_candidates)
    float tau2, float tau3, float tau4, int adaptive, int blur, double tap_side, double tap_center, int bins,
    // repetition penalty, speculative mode, length caps
    const unsigned char* __restrict__ seen, long long seen_stride, int use_penalty, float inv_penalty,
    const long long* __restrict__ first_tokens, const long long* __restrict__ max_tokens,
    // sampler
    int do_sample, int top_k_n1, const long long* seed_ptr, long long seed_arg, long long offset_arg,
    // scratch and outputs
    float* __restrict__ scratch, long long scratch_per_block, long long* __restrict__ tokens_out,
    long long* __restrict__ n_out, float* __restrict__ draft_out) {
  using namespace dyn;
  __shared__ float s_p[kMaxH * kMaxK];
  __shared__ i64 s_id[kMaxH * kMaxK];
  __shared__ float s_pen[kMaxH * kMaxK];
  __shared__ u32 s_hist[kMaxBins];
  __shared__ float s_wt[kMaxOffsets];
  __shared__ float s_mass[kMaxK];

  StatsView st;
  st.keys[0] = st.keys[1] = nullptr;
  st.counts[0] = st.counts[1] = nullptr;
  st.nkeys[0] = st.nkeys[1] = 0;
  st.starts[0] = st.starts[1] = nullptr;
  st.keys[2] = keys2;
  st.counts[2] = counts2;
  st.nkeys[2] = nkeys2;
  st.starts[2] = starts2;
  st.keys[3] = keys3;
  st.counts[3] = counts3;
  st.nkeys[3] = nkeys3;
  st.starts[3] = starts3;
  st.keys[4] = keys4;
  st.counts[4] = counts4;
  st.nkeys[4] = nkeys4;
  st.starts[4] = starts4;
  st.total[0] = 0.0;
  st.total[1] = total1;
  st.total[2] = total2;
  st.total[3] = total3;
  st.total[4] = total4;
  st.uni = unigrams;
  st.V = stats_vocab;
  st.alpha = alpha_c;

  const int tid = threadIdx.x, nt = blockDim.x;
  const i64 kH = ipow(k, H);
  // the row's candidate list: cells ascending, their J (-1: not a candidate), blurred scores
  int* const Cc = reinterpret_cast<int*>(scratch + static_cast<i64>(blockIdx.x) * scratch_per_block);
  float* const Cj = reinterpret_cast<float*>(Cc + kH);
  float* const Cs = Cj + kH;  // only with the blur
  u64 seed = 0, offset = 0;
  if (do_sample) load_seed(seed_ptr, seed_arg, offset_arg, &seed, &offset);

  for (int b = blockIdx.x; b < B; b += gridDim.x) {
    // ---- the row's lists and penalty factors
    for (int t = tid; t < H * k; t += nt) {
      const int h = t / k, j = t - h * k;
      const i64 src = (static_cast<i64>(b) * H + h) * KL + j;
      const i64 id = ids[src];
      s_p[t] = probs[src];
      s_id[t] = id;
      s_pen[t] = (use_penalty && seen[static_cast<i64>(b) * seen_stride + id]) ? inv_penalty : 1.0f;
    }
    __syncthreads();

    int first_idx = -1;
    bool undecided = true, emitted = false;
    if (first_tokens != nullptr) {
      const i64 ft = first_tokens[b];
      for (int j = 0; j < k; ++j) {
        if (s_id[j] == ft) {
          first_idx = j;
          break;
        }
      }
      undecided = first_idx >= 0;  // first token outside head 1's top-k: no draft
    }
    int top = H;  // highest order this row may emit (max_tokens)
    if (max_tokens != nullptr) {
      const i64 mt = max_tokens[b];
      if (mt < top) top = mt < 1 ? 1 : static_cast<int>(mt);
    }

    for (int n = top; n >= 2 && undecided; --n) {
      const i64 cells = ipow(k, n), units = cells / k;
      const float tau = n == 2 ? tau2 : (n == 3 ? tau3 : tau4);

      // 1. candidates, compacted in cell order: J = prod_h p_h > tau_n (first token restricted), counted
      //    per thread over a contiguous range of units, offsets by a block scan, then written
      const int n_units = static_cast<int>(units), per = (n_units + nt - 1) / nt;
      const int u_lo = imin(tid * per, n_units), u_hi = imin(u_lo + per, n_units);
      int M;
      const int at = block_exclusive_scan(enumerate_cells(s_p, k, n, tau, first_idx, u_lo, u_hi, nullptr, nullptr),
                                          &M);
      enumerate_cells(s_p, k, n, tau, first_idx, u_lo, u_hi, Cc + at, Cj + at);
      __syncthreads();
      //    then weighted by the statistics; unseen n-grams drop out
      int any = 0;
      for (int m = tid; m < M; m += nt) {
        bool cand = true;
        if (use_stats) {
          int d[kMaxH];
          decode_cell(Cc[m], n, k, d);
          i64 x[kMaxH];
          for (int h = 0; h < n; ++h) x[h] = s_id[h * k + d[h]];
          const float w = ngram_weight(st, n, x);
          cand = w > 0.0f;
          Cj[m] = cand ? __fmul_rn(Cj[m], w) : kNotCand;
        }
        any |= cand ? 1 : 0;
      }
      any = block_or(any);
      if (!any) continue;  // back off to n - 1

      // 2. adaptive threshold: blur over the candidates (others count 0), Otsu, keep score >= thr
      if (adaptive) {
        const float* score = Cj;
        if (blur) {
          int n_off = 1;
          for (int h = 0; h < n; ++h) n_off *= 3;
          for (int o = tid; o < n_off; o += nt) {  // math.prod(taps[offset]) in float64, to float32
            double w = 1.0;
            int rem = o;
            int digit[kMaxH];
            for (int h = n - 1; h >= 0; --h) {
              digit[h] = rem % 3;
              rem /= 3;
            }
            for (int h = 0; h < n; ++h) w = w * (digit[h] == 1 ? tap_center : tap_side);
            s_wt[o] = static_cast<float>(w);
          }
          __syncthreads();
          const bool dense = M == cells;  // every cell listed: a cell's position is the cell
          for (int m = tid; m < M; m += nt) {
            if (!(Cj[m] >= 0.0f)) continue;
            int d[kMaxH];
            decode_cell(Cc[m], n, k, d);
            float acc = 0.0f;
            for (int o = 0; o < n_off; ++o) {  // itertools.product((-1, 0, 1), repeat=n) order
              int rem = o;
              i64 nb = 0;
              bool inside = true;
              int od[kMaxH];
              for (int h = n - 1; h >= 0; --h) {
                od[h] = rem % 3 - 1;
                rem /= 3;
              }
              for (int h = 0; h < n; ++h) {
                const int e = d[h] + od[h];
                inside = inside && e >= 0 && e < k;
                nb = nb * k + e;
              }
              if (!inside) continue;
              const int pos = dense ? static_cast<int>(nb) : lower_bound_int(Cc, M, nb);
              if (pos < M && Cc[pos] == nb) {
                const float jn = Cj[pos];
                if (jn >= 0.0f) acc = __fadd_rn(acc, __fmul_rn(jn, s_wt[o]));
              }
            }
            Cs[m] = acc;
          }
          __syncthreads();
          score = Cs;
        }
        float lo = pos_inf_f(), hi = neg_inf_f();
        for (int m = tid; m < M; m += nt) {
          if (Cj[m] >= 0.0f) {
            const float v = score[m];
            lo = v < lo ? v : lo;
            hi = v > hi ? v : hi;
          }
        }
        lo = block_min(lo);
        hi = block_max(hi);
        const float width = fmaxf(hi - lo, 1e-30f);
        for (int t = tid; t < bins; t += nt) s_hist[t] = 0u;
        __syncthreads();
        for (int m = tid; m < M; m += nt) {
          if (Cj[m] >= 0.0f) {
            i64 bin = static_cast<i64>(((score[m] - lo) / width) * static_cast<float>(bins));
            bin = bin < 0 ? 0 : (bin > bins - 1 ? bins - 1 : bin);
            atomicAdd(&s_hist[bin], 1u);
          }
        }
        __syncthreads();
        const float thr = otsu_from_hist(s_hist, bins, lo, hi, width);
        for (int m = tid; m < M; m += nt) {
          if (Cj[m] >= 0.0f && !(score[m] >= thr)) Cj[m] = kNotCand;
        }
        // the candidate with the largest score always remains: no need to re-check `any`
      }

      // 3. repetition penalty (head by head), then the choice among the candidates
      Best<double> bb;
      bb.v = neg_inf_d();
      bb.i = kNoIndex;
      for (int m = tid; m < M; m += nt) {
        float v = Cj[m];
        if (!(v >= 0.0f)) continue;
        const int c = Cc[m];
        if (use_penalty) {
          int d[kMaxH];
          decode_cell(c, n, k, d);
          for (int h = 0; h < n; ++h) v = __fmul_rn(v, s_pen[h * k + d[h]]);
          Cj[m] = v;
        }
        const double sc = do_sample ? static_cast<double>(v) / exp1(seed, offset, static_cast<u32>(c),
                                                                     static_cast<u32>(b),
                                                                     kTagJoint + static_cast<u32>(n))
                                    : static_cast<double>(v);
        if (better(sc, c, bb.v, bb.i)) {
          bb.v = sc;
          bb.i = c;
        }
      }
      const int cell = block_best(bb).i;  // its barriers also publish the penalised Cj

      int d[kMaxH];
      decode_cell(cell, n, k, d);
      if (tid == 0) {
        for (int h = 0; h < H; ++h) tokens_out[static_cast<i64>(b) * H + h] = h < n ? s_id[h * k + d[h]] : -1;
        n_out[b] = n;
      }
      if (draft_out != nullptr) {
        // q(x_j | x_1..x_{j-1}) along the chosen cell over the candidates (policy._fill_draft): the cells
        // under the chosen prefix with d_j = i are one contiguous run of the list, summed in cell order
        float* dr = draft_out + static_cast<i64>(b) * H * k;
        for (int t = tid; t < H * k; t += nt) {
          const int h = t / k;
          if (h == 0 || h >= n) dr[t] = 0.0f;
        }
        i64 prefix = 0;
        for (int j = 1; j < n; ++j) {
          prefix = prefix * k + d[j - 1];
          const i64 inner = ipow(k, n - j - 1);
          const i64 base = prefix * ipow(k, n - j);
          for (int i = tid; i < k; i += nt) {
            const int r0 = lower_bound_int(Cc, M, base + i * inner);
            const int r1 = lower_bound_int(Cc, M, base + (i + 1) * inner);
            double sm = 0.0;
            for (int r = r0; r < r1; ++r) {
              const float v = Cj[r];
              if (v >= 0.0f) sm += static_cast<double>(v);
            }
            s_mass[i] = static_cast<float>(sm);
          }
          __syncthreads();
          double tot = 0.0;
          for (int i = 0; i < k; ++i) tot += static_cast<double>(s_mass[i]);
          const float den = fmaxf(static_cast<float>(tot), 1e-30f);
          for (int i = tid; i < k; i += nt) dr[j * k + i] = s_mass[i] / den;
          __syncthreads();
        }
      }
      undecided = false;
      emitted = true;
    }

    // ---- n = 1: head 1 alone (rows that emitted no n-gram)
    if (!emitted) {
      if (tid == 0) {
        i64 tok;
        if (first_tokens != nullptr) {
          tok = first_tokens[b];
        } else if (!do_sample) {
          tok = s_id[0];  // argmax of head 1, lowest index on ties
        } else if (top_k_n1 > 0) {
          // head 1's sampler restricted to logits >= its top_k-th largest, drawn from the list
          const i64 row0 = static_cast<i64>(b) * H * KL;
          const float kth = vals[row0 + top_k_n1 - 1];
          double best = neg_inf_d();
          int bj = 0;
          for (int j = 0; j < KL; ++j) {
            const float v = vals[row0 + j];
            if (v >= kth) {
              const double g = static_cast<double>(v) -
                               log(exp1(seed, offset, static_cast<u32>(j), static_cast<u32>(b), kTagList));
              if (g > best) {
                best = g;
                bj = j;
              }
            }
          }
          tok = ids[row0 + bj];
        } else {
          tok = sample_full[b];  // Gumbel-max draw over the whole vocabulary (topk_softmax)
        }
        tokens_out[static_cast<i64>(b) * H] = tok;
        for (int h = 1; h < H; ++h) tokens_out[static_cast<i64>(b) * H + h] = -1;
        n_out[b] = 1;
      }
      if (draft_out != nullptr) {
        float* dr = draft_out + static_cast<i64>(b) * H * k;
        for (int t = tid; t < H * k; t += nt) dr[t] = 0.0f;
      }
    }
    __syncthreads();  // shared lists are reloaded for the next row
  }
}
