/* The DynaMo step policy after the top-k lists, for CPU tensors: one C call per step instead of
 * ~130 small torch ops (dynamo_sampling/policy.py is the reference; cpu_policy.py compiles this file
 * at run time with the system C compiler and calls it through ctypes).
 *
 * Input: each head's top-k probabilities p (B, H, k) float32 and ids (B, H, k) int64, exactly as
 * policy.dynamo_step computes them. Per row, for n = H .. 2 until the row emits:
 *   cells (i_0 .. i_{n-1}) in row-major order with J = ((p_0 * p_1) * ...) > tau_n (float32, as torch),
 *   grown head by head (a prefix whose product is <= tau_n cannot pass: every factor is <= 1);
 *   with statistics, every prefix carries the key range of the n-gram table that starts with it (a
 *   first-token index, then binary searches inside the parent's range, a rank-map scan at the last
 *   head), an empty range drops it, and the full n-gram's count gives the weight;
 *   optional 3-tap blur (dense grid or binary search among the row's cells, as the reference picks),
 *   Otsu threshold (float64 histogram sums), repetition penalty, then the first maximum of J
 *   (greedy) or of J / E, E ~ Exp(1) from a counter-based hash of (seed, row, n, cell) (sampled), and
 *   the draft conditionals along the chosen cell (speculative).
 * Everything in float32 is computed in the reference's order, so without blur the cells, J, the
 * thresholds and greedy choices are bit-identical; the blur's 27-term sums may round differently
 * from torch's vectorised sums (last bit). Compile with -ffp-contract=off (no fused multiply-add).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    int64_t *cell;  /* row-major flat index of the cell's top-k indices */
    int64_t *key;   /* packed token prefix ((x0 * V + x1) * V + ...) */
    int64_t *lo, *hi;  /* statistics: the prefix's key range in the n-gram table (last head: the entry) */
    float *val;     /* J */
    int64_t n, cap;
} Level;

static int grow(void **ptr, int64_t cap, size_t size) {
    void *q = realloc(*ptr, (size_t)cap * size);
    if (!q) return -1;
    *ptr = q;
    return 0;
}

static int level_reserve(Level *l, int64_t need) {
    if (need <= l->cap) return 0;
    int64_t cap = l->cap ? l->cap : 256;
    while (cap < need) cap *= 2;
    if (grow((void **)&l->cell, cap, sizeof(int64_t)) || grow((void **)&l->key, cap, sizeof(int64_t))
        || grow((void **)&l->lo, cap, sizeof(int64_t)) || grow((void **)&l->hi, cap, sizeof(int64_t))
        || grow((void **)&l->val, cap, sizeof(float)))
        return -1;
    l->cap = cap;
    return 0;
}

static void level_free(Level *l) { free(l->cell); free(l->key); free(l->lo); free(l->hi); free(l->val); }

/* first index in [lo, hi) with keys[i] >= x */
static int64_t lower_bound(const int64_t *keys, int64_t lo, int64_t hi, int64_t x) {
    while (lo < hi) {
        int64_t mid = lo + (hi - lo) / 2;
        if (keys[mid] < x) lo = mid + 1; else hi = mid;
    }
    return lo;
}

/* first index in [lo, hi) with keys[i] > x */
static int64_t upper_bound(const int64_t *keys, int64_t lo, int64_t hi, int64_t x) {
    while (lo < hi) {
        int64_t mid = lo + (hi - lo) / 2;
        if (keys[mid] <= x) lo = mid + 1; else hi = mid;
    }
    return lo;
}

static uint64_t mix64(uint64_t x) {  /* splitmix64's finaliser */
    x ^= x >> 30; x *= 0xbf58476d1ce4e5b9ULL;
    x ^= x >> 27; x *= 0x94d049bb133111ebULL;
    return x ^ (x >> 31);
}

/* Exp(1) in (0, inf) from a counter: uniform in the open interval (0, 1), 53 bits */
static double exp1(uint64_t seed, int64_t row, int64_t n, int64_t cell) {
    uint64_t x = mix64(seed + 0x9e3779b97f4a7c15ULL * (uint64_t)(row + 1));
    x = mix64(x ^ (0xd1b54a32d192ed03ULL * (uint64_t)n));
    x = mix64(x ^ (uint64_t)cell);
    double u = ((double)(x >> 11) + 0.5) * (1.0 / 9007199254740992.0);
    return -log1p(-u);
}

static int64_t find_cell(const int64_t *cells, int64_t m, int64_t c) {
    int64_t i = lower_bound(cells, 0, m, c);
    return (i < m && cells[i] == c) ? i : -1;
}

/* Per-row Otsu threshold of score[0..m) (policy.otsu_threshold for one row). */
static float otsu(const float *score, int64_t m, int bins, double *hist) {
    float lo = INFINITY, hi = -INFINITY;
    for (int64_t i = 0; i < m; i++) { if (score[i] < lo) lo = score[i]; if (score[i] > hi) hi = score[i]; }
    float width = hi - lo;
    if (!(width >= 1e-30f)) width = 1e-30f;
    memset(hist, 0, (size_t)bins * sizeof(double));
    for (int64_t i = 0; i < m; i++) {
        float t = ((score[i] - lo) / width) * (float)bins;
        int64_t b = (int64_t)t;
        if (b < 0) b = 0;
        if (b > bins - 1) b = bins - 1;
        hist[b] += 1.0;
    }
    double W = 0.0, Mt = 0.0;
    for (int b = 0; b < bins; b++) { W += hist[b]; Mt += hist[b] * ((double)b + 0.5); }
    /* W and Mt as the last entries of the cumulative sums (same order, same values) */
    double w0 = 0.0, m0 = 0.0, best = -INFINITY;
    int t = 0;
    for (int b = 0; b < bins; b++) {
        w0 += hist[b];
        m0 += hist[b] * ((double)b + 0.5);
        double w1 = W - w0;
        double gap = m0 / (w0 > 1e-30 ? w0 : 1e-30) - (Mt - m0) / (w1 > 1e-30 ? w1 : 1e-30);
        double between = (w0 > 0 && w1 > 0) ? w0 * w1 * (gap * gap) : -1.0;
        if (between > best) { best = between; t = b; }
    }
    float thr = lo + ((float)(t + 1) * width) / (float)bins;
    return (best <= 0 || !(hi > lo)) ? lo : thr;
}

/* 3-tap blur of J at each of the row's m cells (sorted), zero outside them (policy.blur_candidates).
 * tap: the 3**n products of the per-axis taps t0 (centre) and ts (sides). */
static void blur(const int64_t *cells, const float *J, int64_t m, int n, int64_t k, const float *tap, float t0,
                 float ts, float *out, float *grid, int use_grid, int64_t *digits) {
    int64_t K = 1;
    for (int h = 0; h < n; h++) K *= k;
    if (use_grid) {
        /* the reference's "grid" method: scatter, then one separable pass per axis, then read */
        memset(grid, 0, (size_t)K * sizeof(float));
        for (int64_t i = 0; i < m; i++) grid[cells[i]] = J[i];
        float *tmp = grid + K;
        int64_t inner = K;
        for (int a = 0; a < n; a++) {
            inner /= k;  /* cells per step along axis a; cell = (o * k + d) * inner + i */
            for (int64_t o = 0; o < K / (inner * k); o++) {
                for (int64_t d = 0; d < k; d++) {
                    const float *x = grid + (o * k + d) * inner;
                    float *y = tmp + (o * k + d) * inner;
                    const float *l = d > 0 ? x - inner : NULL, *r = d < k - 1 ? x + inner : NULL;
                    for (int64_t i = 0; i < inner; i++)
                        y[i] = t0 * x[i] + ts * ((l ? l[i] : 0.0f) + (r ? r[i] : 0.0f));
                }
            }
            float *t = grid; grid = tmp; tmp = t;
        }
        for (int64_t i = 0; i < m; i++) out[i] = grid[cells[i]];
        return;
    }
    int64_t n3 = 1;
    for (int h = 0; h < n; h++) n3 *= 3;
    for (int64_t i = 0; i < m; i++) {
        int64_t c = cells[i];
        for (int h = n - 1; h >= 0; h--) { digits[h] = c % k; c /= k; }
        float acc = 0.0f;
        for (int64_t o = 0; o < n3; o++) {  /* offsets in itertools.product((-1, 0, 1), repeat=n) order */
            int64_t rest = o, nb = 0, pw = 1, inside = 1;
            for (int h = n - 1; h >= 0; h--) {
                int64_t d = digits[h] + (rest % 3) - 1;
                rest /= 3;
                if (d < 0 || d >= k) { inside = 0; break; }
                nb += d * pw;
                pw *= k;
            }
            if (!inside) continue;
            int64_t j = find_cell(cells, m, nb);
            if (j >= 0) acc += J[j] * tap[o];
        }
        out[i] = acc;
    }
}

typedef struct {
    int64_t B, H, k, V;
    const float *p;          /* (B, H, k) */
    const int64_t *ids;      /* (B, H, k) */
    const float *penal;      /* (B, H, k) or NULL */
    const int64_t *first_idx;/* (B,) or NULL */
    const int64_t *max_tokens;/* (B,) or NULL */
    const uint8_t *active;   /* (B,) rows still deciding */
    const double *tau;       /* (H + 1,) tau_n */
    /* statistics (use_stats = 0: weight 1, no mask) */
    int use_stats;
    const int64_t *const *keys;   /* per order n (index n), sorted */
    const int64_t *const *counts;
    const int64_t *nkeys;
    const int64_t *const *first_start;  /* per order n: (V + 1,) where the keys of each first token start */
    const double *p1;        /* (V,) unigram frequencies */
    const double *totals;    /* per order n: T_n */
    double alpha_c;
    int adaptive, use_blur, bins;
    double blur_sigma;
    int do_sample;
    uint64_t seed;
    int64_t *tokens;         /* (B, H), -1 filled by the caller */
    int64_t *n_out;          /* (B,), 1 filled by the caller */
    float *draft;            /* (B, H, k) zeros, or NULL */
} Args;

static int row_step(const Args *a, int64_t b, int n, Level *lv, Level *nx, Level *sc, double *hist,
                    float *grid, int64_t grid_cap, const float *tap, float t0, float ts, int64_t *digits,
                    float *mass, int32_t *rank, int64_t *slot) {
    const int64_t H = a->H, k = a->k, V = a->V;
    const float *p = a->p + b * H * k;
    const int64_t *ids = a->ids + b * H * k;
    const float tau = (float)a->tau[n];
    lv->n = 0;
    int64_t first = a->first_idx ? a->first_idx[b] : -1;
    /* with statistics every prefix carries its key range in the n-gram table (keys of the n-grams
     * that start with it: contiguous, since keys are packed first token first); an empty range means
     * no seen n-gram starts with it. stride[h]: V ** (n - 1 - h), the keys per value of token h. */
    const int64_t *keys = a->use_stats ? a->keys[n] : NULL;
    int64_t stride[16];
    stride[n - 1] = 1;
    for (int h = n - 2; h >= 0; h--) stride[h] = stride[h + 1] * V;
    for (int64_t i = 0; i < k; i++) {
        if (first >= 0 && i != first) continue;
        if (!(p[i] > tau)) continue;
        int64_t lo = 0, hi = 0;
        if (keys) {  /* keys in [x0 * stride, (x0 + 1) * stride): from the first-token index */
            lo = a->first_start[n][ids[i]];
            hi = a->first_start[n][ids[i] + 1];
            if (lo == hi) continue;
        }
        if (level_reserve(lv, lv->n + 1)) return -1;
        lv->cell[lv->n] = i; lv->key[lv->n] = ids[i]; lv->val[lv->n] = p[i];
        lv->lo[lv->n] = lo; lv->hi[lv->n] = hi;
        lv->n++;
    }
    for (int h = 1; h < n && lv->n; h++) {
        nx->n = 0;
        const int64_t *tok = ids + h * k;
        const float *ph = p + h * k;
        int last = h == n - 1;
        if (keys && last) {  /* head h's top-k ranks by token, for scanning short ranges */
            for (int64_t j = 0; j < k; j++) rank[tok[j]] = (int32_t)(j + 1);
        }
        for (int64_t q = 0; q < lv->n; q++) {
            int64_t base = lv->key[q] * V, lo = lv->lo[q], hi = lv->hi[q];
            if (keys && last && hi - lo <= 4 * k) {
                /* scan the seen continuations, mark the top-k ranks they hit, then go by rank */
                for (int64_t j = 0; j < k; j++) slot[j] = -1;
                for (int64_t e = lo; e < hi; e++) {
                    int32_t r = rank[keys[e] - base];
                    if (r) slot[r - 1] = e;
                }
                for (int64_t j = 0; j < k; j++) {
                    if (slot[j] < 0) continue;
                    float ext = lv->val[q] * ph[j];
                    if (!(ext > tau)) continue;
                    if (level_reserve(nx, nx->n + 1)) return -1;
                    nx->cell[nx->n] = lv->cell[q] * k + j; nx->key[nx->n] = base + tok[j]; nx->val[nx->n] = ext;
                    nx->lo[nx->n] = slot[j]; nx->hi[nx->n] = slot[j] + 1;
                    nx->n++;
                }
                continue;
            }
            for (int64_t j = 0; j < k; j++) {
                float ext = lv->val[q] * ph[j];
                if (!(ext > tau)) continue;
                int64_t nk = base + tok[j], clo = 0, chi = 0;
                if (keys) {
                    clo = lower_bound(keys, lo, hi, nk * stride[h]);
                    chi = upper_bound(keys, clo, hi, nk * stride[h] + (stride[h] - 1));
                    if (clo == chi) continue;
                }
                if (level_reserve(nx, nx->n + 1)) return -1;
                nx->cell[nx->n] = lv->cell[q] * k + j; nx->key[nx->n] = nk; nx->val[nx->n] = ext;
                nx->lo[nx->n] = clo; nx->hi[nx->n] = chi;
                nx->n++;
            }
        }
        if (keys && last) {
            for (int64_t j = 0; j < k; j++) rank[tok[j]] = 0;
        }
        Level t = *lv; *lv = *nx; *nx = t;
    }
    int64_t m = lv->n;
    if (m == 0) return 0;
    float *J = lv->val;
    if (a->use_stats) {  /* J *= (p(x1..xn) / prod p(x_i)) ** alpha_c, float64 then float32 */
        int64_t w_out = 0;
        for (int64_t i = 0; i < m; i++) {
            float w;
            if (a->alpha_c == 0.0) {
                w = 1.0f;
            } else {
                double wd = (double)a->counts[n][lv->lo[i]] / a->totals[n];
                int64_t c = lv->cell[i];
                double prod = 1.0;
                int64_t dg[16];
                for (int h = n - 1; h >= 0; h--) { dg[h] = c % k; c /= k; }
                for (int h = 0; h < n; h++) prod *= a->p1[ids[h * k + dg[h]]];
                wd /= prod;
                if (a->alpha_c != 1.0) wd = pow(wd, a->alpha_c);
                w = (float)wd;
            }
            float v = J[i] * w;
            if (!(w > 0)) continue;
            lv->cell[w_out] = lv->cell[i];
            J[w_out] = v;
            w_out++;
        }
        m = w_out;
        if (m == 0) return 0;
    }
    int64_t *cells = lv->cell;
    if (a->adaptive) {
        const float *s = J;
        if (a->use_blur) {
            int64_t Kn = 1, n3 = 1;
            for (int h = 0; h < n; h++) { Kn *= k; n3 *= 3; }
            int use_grid = (double)m * (double)n3 * 16.0 > (double)Kn && 2 * Kn <= grid_cap;
            if (level_reserve(sc, m)) return -1;
            blur(cells, J, m, n, k, tap, t0, ts, sc->val, grid, use_grid, digits);
            s = sc->val;
        }
        float thr = otsu(s, m, a->bins, hist);
        int64_t w_out = 0;
        for (int64_t i = 0; i < m; i++) {
            if (!(s[i] >= thr)) continue;
            cells[w_out] = cells[i];
            J[w_out] = J[i];
            w_out++;
        }
        m = w_out;
    }
    if (a->penal) {
        const float *pen = a->penal + b * H * k;
        for (int64_t i = 0; i < m; i++) {
            int64_t c = cells[i], dg[16];
            for (int h = n - 1; h >= 0; h--) { dg[h] = c % k; c /= k; }
            float v = J[i];
            for (int h = 0; h < n; h++) v = v * pen[h * k + dg[h]];
            J[i] = v;
        }
    }
    int64_t best = -1;
    if (a->do_sample) {
        double top = -INFINITY;
        for (int64_t i = 0; i < m; i++) {
            double sc = (double)J[i] / exp1(a->seed, b, n, cells[i]);
            if (sc > top) { top = sc; best = i; }
        }
    } else {
        float top = -INFINITY;
        for (int64_t i = 0; i < m; i++) if (J[i] > top) { top = J[i]; best = i; }
    }
    if (best < 0) return 0;
    int64_t chosen[16], c = cells[best];
    for (int h = n - 1; h >= 0; h--) { chosen[h] = c % k; c /= k; }
    for (int h = 0; h < n; h++) a->tokens[b * H + h] = ids[h * k + chosen[h]];
    a->n_out[b] = n;
    if (a->draft) {  /* q(x_j | x_1..x_{j-1}) along the chosen cell: mass of the cells under each prefix */
        for (int j = 1; j < n; j++) {
            memset(mass, 0, (size_t)k * sizeof(float));
            int64_t span = 1;
            for (int h = j + 1; h < n; h++) span *= k;  /* cells per value of index j */
            for (int64_t i = 0; i < m; i++) {
                int64_t pre = cells[i] / (span * k), want = 0;
                for (int h = 0; h < j; h++) want = want * k + chosen[h];
                if (pre != want) continue;
                mass[(cells[i] / span) % k] += J[i];
            }
            float tot = 0.0f;
            for (int64_t i = 0; i < k; i++) tot += mass[i];
            if (!(tot >= 1e-30f)) tot = 1e-30f;
            float *q = a->draft + (b * H + j) * k;
            for (int64_t i = 0; i < k; i++) q[i] = mass[i] / tot;
        }
    }
    return 1;
}

/* The whole policy for a batch. Returns 0, or -1 when memory ran out. */
int dynamo_policy(int64_t B, int64_t H, int64_t k, int64_t V, const float *p, const int64_t *ids,
                  const float *penal, const int64_t *first_idx, const int64_t *max_tokens,
                  const uint8_t *active_in, const double *tau, int use_stats, const int64_t *const *keys,
                  const int64_t *const *counts, const int64_t *nkeys, const int64_t *const *first_start,
                  const double *p1, const double *totals,
                  double alpha_c, int adaptive, int use_blur, double blur_sigma, int bins, int do_sample,
                  uint64_t seed, int64_t *tokens, int64_t *n_out, float *draft) {
    Args a = {B, H, k, V, p, ids, penal, first_idx, max_tokens, active_in, tau, use_stats, keys, counts, nkeys,
              first_start, p1, totals, alpha_c, adaptive, use_blur, bins, blur_sigma, do_sample, seed, tokens, n_out, draft};
    if (H > 16) return -2;
    Level lv = {0}, nx = {0}, sc = {0};
    double side = exp(-1.0 / (2.0 * blur_sigma * blur_sigma));
    double taps3[3] = {side / (1 + 2 * side), 1.0 / (1 + 2 * side), side / (1 + 2 * side)};
    int64_t n3 = 1, KH = 1;
    for (int64_t h = 0; h < H; h++) { n3 *= 3; KH *= k; }
    /* the dense blur grid (and its copy) only while it stays small; else the binary-search blur */
    int64_t grid_cap = use_blur && adaptive && 2 * KH <= (1 << 24) ? 2 * KH : 0;
    float *tap = (float *)malloc((size_t)n3 * sizeof(float));
    float *grid = grid_cap ? (float *)malloc((size_t)grid_cap * sizeof(float)) : NULL;
    double *hist = (double *)malloc((size_t)bins * sizeof(double));
    float *mass = (float *)malloc((size_t)k * sizeof(float));
    int64_t digits[16];
    uint8_t *undecided = (uint8_t *)malloc((size_t)B);
    int32_t *rank = use_stats ? (int32_t *)calloc((size_t)V, sizeof(int32_t)) : NULL;  /* 0: not in the top-k */
    int64_t *slot = (int64_t *)malloc((size_t)k * sizeof(int64_t));
    int rc = 0;
    if (!tap || (grid_cap && !grid) || !hist || !mass || !undecided || (use_stats && !rank) || !slot) {
        rc = -1;
        goto done;
    }
    memcpy(undecided, active_in, (size_t)B);
    for (int n = (int)H; n >= 2; n--) {
        int64_t m3 = 1;
        for (int h = 0; h < n; h++) m3 *= 3;
        for (int64_t o = 0; o < m3; o++) {  /* products of the per-axis taps, first axis slowest */
            double t = 1.0;
            int64_t rest = o, dg[16];
            for (int h = n - 1; h >= 0; h--) { dg[h] = rest % 3; rest /= 3; }
            for (int h = 0; h < n; h++) t *= taps3[dg[h]];
            tap[o] = (float)t;
        }
        for (int64_t b = 0; b < B; b++) {
            if (!undecided[b] || (max_tokens && max_tokens[b] < n)) continue;
            int r = row_step(&a, b, n, &lv, &nx, &sc, hist, grid, grid_cap, tap, (float)taps3[1],
                             (float)taps3[0], digits, mass, rank, slot);
            if (r < 0) { rc = -1; goto done; }
            if (r > 0) undecided[b] = 0;
        }
    }
done:
    free(tap); free(grid); free(hist); free(mass); free(undecided); free(rank); free(slot);
    level_free(&lv); level_free(&nx); level_free(&sc);
    return rc;
}
