// The DynaMo step on per-head top-k lists, one block per row (grid-stride over rows).
// Mirrors dynamo_sampling/policy.py::dynamo_step (the dense candidate reference) step by step;
// see csrc/NOTES.md for the correspondence and the tolerance rules.
//
// Inputs per row b (lists come from topk_softmax, KL >= k entries per head, the first k are used
// for the joint): probs (B, H, KL) float32 under the full softmax, ids (B, H, KL) int64, vals
// (B, H, KL) float32 scaled logits (only head 1's, only for the n = 1 list sampler).
//
// Scratch per block (float32, `scratch_per_block` elements, sized by kernels.py):
//   [J: k**H] [blurred J: k**H, only with the blur]
// J holds the candidate cells' values (>= 0) and -1 for cells that are not candidates.
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
  i64 nkeys[kMaxH + 1];
  double total[kMaxH + 1];
  const i64* uni;
  i64 V;
  double alpha;
};

// Corpus count of a packed key: lower_bound in the sorted key table of order m.
__device__ __forceinline__ i64 lookup_count(const StatsView& st, int m, i64 key) {
  const i64* keys = st.keys[m];
  i64 lo = 0, hi = st.nkeys[m];
  while (lo < hi) {
    const i64 mid = lo + ((hi - lo) >> 1);
    if (keys[mid] < key) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return (lo < st.nkeys[m] && keys[lo] == key) ? st.counts[m][lo] : 0;
}

// CooccurrenceStats.weight of one n-gram: float64 as there, rounded to float32; 0 if unseen.
__device__ float ngram_weight(const StatsView& st, int m, const i64* x) {
  i64 key = x[0];
  for (int j = 1; j < m; ++j) key = key * st.V + x[j];
  const i64 c = lookup_count(st, m, key);
  if (c <= 0) return 0.0f;
  double w = static_cast<double>(c) / st.total[m];
  double prod = static_cast<double>(st.uni[x[0]]) / st.total[1];
  for (int j = 1; j < m; ++j) prod = prod * (static_cast<double>(st.uni[x[j]]) / st.total[1]);
  w = w / prod;
  if (st.alpha != 1.0) w = pow(w, st.alpha);
  return static_cast<float>(w);
}

// Digits of a flat cell, d[0] most significant (row-major cells, as policy.dense_candidates).
__device__ __forceinline__ void decode_cell(i64 c, int n, int k, int* d) {
  for (int j = n - 1; j >= 0; --j) {
    d[j] = static_cast<int>(c % k);
    c /= k;
  }
}

// policy.otsu_threshold from the histogram (float64, the same arithmetic in the same order).
__device__ float otsu_from_hist(const u32* hist, int bins, float lo, float hi, float width) {
  double total = 0.0, mtotal = 0.0;
  for (int t = 0; t < bins; ++t) {
    const double c = static_cast<double>(hist[t]);
    total += c;
    mtotal += c * (static_cast<double>(t) + 0.5);
  }
  double w0 = 0.0, m0 = 0.0, best = neg_inf_d();
  int tbest = 0;
  for (int t = 0; t < bins; ++t) {
    const double c = static_cast<double>(hist[t]);
    w0 += c;
    m0 += c * (static_cast<double>(t) + 0.5);
    const double w1 = total - w0;
    double between = -1.0;
    if (w0 > 0.0 && w1 > 0.0) {
      const double dd = m0 / w0 - (mtotal - m0) / w1;
      between = w0 * w1 * (dd * dd);
    }
    if (between > best) {
      best = between;
      tbest = t;
    }
  }
  if (best <= 0.0 || !(hi > lo)) return lo;
  return lo + (static_cast<float>(tbest + 1) * width) / static_cast<float>(bins);
}

}  // namespace dyn

extern "C" __global__ void dynamo_step_kernel(
    int B, int H, int k, int KL, const float* __restrict__ probs, const long long* __restrict__ ids,
    const float* __restrict__ vals, const long long* __restrict__ sample_full,
    // co-occurrence statistics (use_stats = 0: none)
    int use_stats, double alpha_c, long long stats_vocab, const long long* keys2, const long long* counts2,
    long long nkeys2, const long long* keys3, const long long* counts3, long long nkeys3, const long long* keys4,
    const long long* counts4, long long nkeys4, double total1, double total2, double total3, double total4,
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
  __shared__ float s_thr;

  StatsView st;
  st.keys[0] = st.keys[1] = nullptr;
  st.counts[0] = st.counts[1] = nullptr;
  st.nkeys[0] = st.nkeys[1] = 0;
  st.keys[2] = keys2;
  st.counts[2] = counts2;
  st.nkeys[2] = nkeys2;
  st.keys[3] = keys3;
  st.counts[3] = counts3;
  st.nkeys[3] = nkeys3;
  st.keys[4] = keys4;
  st.counts[4] = counts4;
  st.nkeys[4] = nkeys4;
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
  float* const Jb = scratch + static_cast<i64>(blockIdx.x) * scratch_per_block;
  float* const Sb = Jb + kH;  // blurred J (only with the blur)
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
      const i64 cells = ipow(k, n), sub = cells / k;
      const float tau = n == 2 ? tau2 : (n == 3 ? tau3 : tau4);

      // candidates: J = prod_h p_h > tau_n (first token restricted), then weighted, unseen dropped
      int any = 0;
      for (i64 c = tid; c < cells; c += nt) {
        int d[kMaxH];
        decode_cell(c, n, k, d);
        float v = s_p[d[0]];
        for (int h = 1; h < n; ++h) v = __fmul_rn(v, s_p[h * k + d[h]]);
        bool cand = v > tau && (first_idx < 0 || c / sub == first_idx);
        if (cand && use_stats) {
          i64 x[kMaxH];
          for (int h = 0; h < n; ++h) x[h] = s_id[h * k + d[h]];
          const float w = ngram_weight(st, n, x);
          cand = w > 0.0f;
          v = __fmul_rn(v, w);
        }
        Jb[c] = cand ? v : kNotCand;
        any |= cand ? 1 : 0;
      }
      any = block_or(any);
      if (!any) continue;  // back off to n - 1

      // adaptive threshold: blur over the candidates (others count 0), Otsu, keep score >= thr
      if (adaptive) {
        const float* score = Jb;
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
          for (i64 c = tid; c < cells; c += nt) {
            if (!(Jb[c] >= 0.0f)) continue;
            int d[kMaxH];
            decode_cell(c, n, k, d);
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
              if (inside) {
                const float jn = Jb[nb];
                if (jn >= 0.0f) acc = __fadd_rn(acc, __fmul_rn(jn, s_wt[o]));
              }
            }
            Sb[c] = acc;
          }
          score = Sb;
        }
        float lo = pos_inf_f(), hi = neg_inf_f();
        for (i64 c = tid; c < cells; c += nt) {
          if (Jb[c] >= 0.0f) {
            const float v = score[c];
            lo = v < lo ? v : lo;
            hi = v > hi ? v : hi;
          }
        }
        lo = block_min(lo);
        hi = block_max(hi);
        const float width = fmaxf(hi - lo, 1e-30f);
        for (int t = tid; t < bins; t += nt) s_hist[t] = 0u;
        __syncthreads();
        for (i64 c = tid; c < cells; c += nt) {
          if (Jb[c] >= 0.0f) {
            i64 bin = static_cast<i64>(((score[c] - lo) / width) * static_cast<float>(bins));
            bin = bin < 0 ? 0 : (bin > bins - 1 ? bins - 1 : bin);
            atomicAdd(&s_hist[bin], 1u);
          }
        }
        __syncthreads();
        if (tid == 0) s_thr = otsu_from_hist(s_hist, bins, lo, hi, width);
        __syncthreads();
        const float thr = s_thr;
        for (i64 c = tid; c < cells; c += nt) {
          if (Jb[c] >= 0.0f && !(score[c] >= thr)) Jb[c] = kNotCand;
        }
        // the candidate with the largest score always remains: no need to re-check `any`
      }

      // repetition penalty (head by head), then the choice among the candidates
      Best<double> bb;
      bb.v = neg_inf_d();
      bb.i = kNoIndex;
      for (i64 c = tid; c < cells; c += nt) {
        float v = Jb[c];
        if (!(v >= 0.0f)) continue;
        if (use_penalty) {
          int d[kMaxH];
          decode_cell(c, n, k, d);
          for (int h = 0; h < n; ++h) v = __fmul_rn(v, s_pen[h * k + d[h]]);
          Jb[c] = v;
        }
        const double sc = do_sample ? static_cast<double>(v) / exp1(seed, offset, static_cast<u32>(c),
                                                                     static_cast<u32>(b),
                                                                     kTagJoint + static_cast<u32>(n))
                                    : static_cast<double>(v);
        if (better(sc, static_cast<int>(c), bb.v, bb.i)) {
          bb.v = sc;
          bb.i = static_cast<int>(c);
        }
      }
      const int cell = block_best(bb).i;

      int d[kMaxH];
      decode_cell(cell, n, k, d);
      if (tid == 0) {
        for (int h = 0; h < H; ++h) tokens_out[static_cast<i64>(b) * H + h] = h < n ? s_id[h * k + d[h]] : -1;
        n_out[b] = n;
      }
      if (draft_out != nullptr) {
        // q(x_j | x_1..x_{j-1}) along the chosen cell over the candidates (policy._fill_draft)
        float* dr = draft_out + static_cast<i64>(b) * H * k;
        for (int t = tid; t < H * k; t += nt) {
          const int h = t / k;
          if (h == 0 || h >= n) dr[t] = 0.0f;
        }
        i64 prefix = 0;
        for (int j = 1; j < n; ++j) {
          prefix = prefix * k + d[j - 1];
          const i64 inner = ipow(k, n - j - 1);
          const float* G = Jb + prefix * ipow(k, n - j);
          for (int i = tid; i < k; i += nt) {
            double sm = 0.0;
            for (i64 r = 0; r < inner; ++r) {
              const float v = G[i * inner + r];
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
