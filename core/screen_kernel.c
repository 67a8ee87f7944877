/* The bfloat16 screen's work after its matmul, one pass per row (see screened_topk.py for the math).

   Inputs are the torch tensors' buffers, contiguous, row-major: `mm (N, F)` bfloat16, the product
   bf16(x) @ bf16(W); `x (N, d)` float32 and `x_lo (N, d)` bfloat16, its rounding; `b (F)`, `per_norm (2, F)`,
   `per_bias (F)` float32; `w_t (F, d)` float32, the encoder's columns as rows. Per row r and feature j:

       a_j = mm_rj + b_j,  s_j = per_bias_j + |x_r| per_norm_0j + |x_r - x_lo_r| per_norm_1j + sc |a_j|

   a_j + s_j bounds the true pre-activation from above, a_j - s_j from below. Rows run in parallel on
   `threads` OpenMP threads (torch's own runtime where it is loaded: the same thread pool). */

#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static inline float bf16(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* |x_r| and |x_r - x_lo_r|; 0 when either is not finite (an inf or NaN in the row). */
static int norms(const float *x, const uint16_t *x_lo, int64_t d, float *n0, float *n1) {
    float s0 = 0.0f, s1 = 0.0f;
#pragma omp simd reduction(+ : s0, s1)
    for (int64_t t = 0; t < d; t++) {
        float e = x[t] - bf16(x_lo[t]);
        s0 += x[t] * x[t];
        s1 += e * e;
    }
    *n0 = sqrtf(s0);
    *n1 = sqrtf(s1);
    return isfinite(*n0) && isfinite(*n1);
}

/* s_j into `slack` and a_j into `approx` for one row; 0 when a bound is not finite (an inf or NaN in
   the weights: the torch ops' top-k ranks a NaN first, so their certificate fails there too). */
static int bounds(const uint16_t *mm, const float *b, const float *per_norm, const float *per_bias, float sc,
                  int64_t F, float n0, float n1, float *approx, float *slack) {
    int64_t bad = 0;
#pragma omp simd reduction(+ : bad)
    for (int64_t j = 0; j < F; j++) {
        float a = bf16(mm[j]) + b[j];
        float s = per_bias[j] + n0 * per_norm[j] + n1 * per_norm[F + j] + sc * fabsf(a);
        approx[j] = a;
        slack[j] = s;
        bad += !(fabsf(a) + s <= FLT_MAX); /* not "> FLT_MAX": a NaN must count */
    }
    return bad == 0;
}

/* x . w over d, float32 summation (the order every caller here shares) */
static inline float dot(const float *x, const float *w, int64_t d) {
    float e = 0.0f;
#pragma omp simd reduction(+ : e)
    for (int64_t t = 0; t < d; t++) e += x[t] * w[t];
    return e;
}

static void sift_down(float *v, int32_t *id, int64_t size, int64_t i) { /* a min-heap of (value, id) */
    for (;;) {
        int64_t l = 2 * i + 1, r = l + 1, s = i;
        if (l < size && v[l] < v[s]) s = l;
        if (r < size && v[r] < v[s]) s = r;
        if (s == i) return;
        float tv = v[i];
        v[i] = v[s];
        v[s] = tv;
        int32_t ti = id[i];
        id[i] = id[s];
        id[s] = ti;
        i = s;
    }
}

/* One row's certified top n, from its upper bounds `upper (F)` (destroyed): the n largest exact
   pre-activations among the m features with the largest upper bounds, largest first, into `v, id (n)`;
   returns 1 where the n-th is not above the (m+1)-th largest upper bound (which bounds every feature
   outside the candidates). The candidates are read in the order of their bounds, and only until the
   n-th exact value beats the next one's bound (which then bounds every feature not read): the same
   answer from fewer float32 columns. `heap, heap_id` hold m + 1 entries. Needs n <= m < F. */
static int row_top(const float *upper, const float *xr, const float *w_t, const float *b, int64_t F, int64_t d,
                   int64_t n, int64_t m, float *heap, int32_t *heap_id, float *v, int64_t *id) {
    const int64_t k = m + 1;
    /* the k largest upper bounds; the heap's root is the smallest of them */
    for (int64_t j = 0; j < k; j++) heap[j] = upper[j], heap_id[j] = (int32_t)j;
    for (int64_t i = k / 2 - 1; i >= 0; i--) sift_down(heap, heap_id, k, i);
    for (int64_t j = k; j < F; j++)
        if (upper[j] > heap[0]) heap[0] = upper[j], heap_id[0] = (int32_t)j, sift_down(heap, heap_id, k, 0);
    /* the candidates by upper bound, largest first; heap[0], the smallest of the k, bounds the rest */
    for (int64_t size = k - 1; size > 0; size--) { /* heap sort: the root to the end, descending */
        float tv = heap[0];
        int32_t ti = heap_id[0];
        heap[0] = heap[size], heap_id[0] = heap_id[size];
        heap[size] = tv, heap_id[size] = ti;
        sift_down(heap, heap_id, size, 0);
    }
    /* now heap[0] >= heap[1] >= ... >= heap[m]: heap[m] is the (m+1)-th largest upper bound */
    int64_t filled = 0;
    float bound = heap[m];
    for (int64_t c = 0; c < m; c++) { /* exact values in that order, until the n-th beats the next bound */
        if (c + 1 < m)
            for (int64_t o = 0; o < d; o += 16) __builtin_prefetch(w_t + (int64_t)heap_id[c + 1] * d + o);
        float e = dot(xr, w_t + (int64_t)heap_id[c] * d, d) + b[heap_id[c]];
        if (filled < n || e > v[n - 1]) { /* insertion into the n largest so far, largest first */
            int64_t p = filled < n ? filled++ : n - 1;
            for (; p > 0 && e > v[p - 1]; p--) v[p] = v[p - 1], id[p] = id[p - 1];
            v[p] = e, id[p] = heap_id[c];
        }
        /* every feature not yet read is bounded by the next candidate's upper bound */
        if (filled == n && v[n - 1] > heap[c + 1]) {
            bound = heap[c + 1];
            break;
        }
    }
    return !(v[n - 1] > bound); /* not "<=": a NaN must fail */
}

/* The certified top n of every row (`row_top`), into `values, ids (N, n)`; `failed[r]` = 1 where the
   certificate fails or the row is not finite. Returns the number of failed rows. */
int64_t rudder_screen_top(int64_t N, int64_t F, int64_t d, const uint16_t *mm, const float *x,
                          const uint16_t *x_lo, const float *b, const float *per_norm, const float *per_bias,
                          float sc, const float *w_t, int64_t n, int64_t m, int threads, float *values,
                          int64_t *ids, uint8_t *failed) {
    int64_t nfailed = 0;
#pragma omp parallel num_threads(threads) reduction(+ : nfailed)
    {
        float *approx = malloc(sizeof(float) * (2 * F + m + 1));
        int32_t *heap_id = malloc(sizeof(int32_t) * (m + 1));
        float *upper = approx ? approx + F : NULL, *heap = approx ? upper + F : NULL;
#pragma omp for schedule(static)
        for (int64_t r = 0; r < N; r++) {
            float n0, n1;
            failed[r] = 1;
            if (!approx || !heap_id || !norms(x + r * d, x_lo + r * d, d, &n0, &n1) || /* no memory: failed, */
                !bounds(mm + r * F, b, per_norm, per_bias, sc, F, n0, n1, approx, upper)) { /* encoded in full */
                nfailed++;
                continue;
            }
            for (int64_t j = 0; j < F; j++) upper[j] += approx[j];
            failed[r] = (uint8_t)row_top(upper, x + r * d, w_t, b, F, d, n, m, heap, heap_id, values + r * n,
                                         ids + r * n);
            nfailed += failed[r];
        }
        free(approx);
        free(heap_id);
    }
    return nfailed;
}

/* For one row's bounds: whether each of its features `feat (M)` with float32 pre-activations `pre (M)`
   is among the k largest (`inside[i]`: fewer than k other features' upper bounds exceed it); returns 1
   where for some feature k or more might and fewer than k surely do (their lower bounds). */
static int row_member(const float *approx, const float *slack, int64_t F, int64_t k, int64_t M,
                      const int64_t *feat, const float *pre, uint8_t *inside) {
    int undecided = 0;
    for (int64_t i = 0; i < M; i++) {
        const float p = pre[i];
        const int64_t f = feat[i];
        int64_t maybe = 0, surely = 0;
#pragma omp simd reduction(+ : maybe, surely)
        for (int64_t j = 0; j < F; j++) {
            maybe += approx[j] + slack[j] > p;
            surely += approx[j] - slack[j] > p;
        }
        maybe -= approx[f] + slack[f] > p; /* others only */
        surely -= approx[f] - slack[f] > p;
        inside[i] = maybe < k;
        undecided |= maybe >= k && surely < k;
    }
    return undecided;
}

/* Whether each of the features `feat (N, M)` (int64) with float32 pre-activations `pre (N, M)` is
   among its row's k largest (`inside (N, M)`, `row_member`); `undecided[r]` = 1 where some feature
   is undecided, or the row is not finite. */
void rudder_screen_member(int64_t N, int64_t F, int64_t d, const uint16_t *mm, const float *x, const uint16_t *x_lo,
                          const float *b, const float *per_norm, const float *per_bias, float sc, int64_t k,
                          int64_t M, const int64_t *feat, const float *pre, int threads, uint8_t *inside,
                          uint8_t *undecided) {
#pragma omp parallel num_threads(threads)
    {
        float *approx = malloc(sizeof(float) * 2 * F);
        float *slack = approx ? approx + F : NULL;
#pragma omp for schedule(static)
        for (int64_t r = 0; r < N; r++) {
            float n0, n1;
            memset(inside + r * M, 0, (size_t)M);
            undecided[r] = 1;
            if (!approx || !norms(x + r * d, x_lo + r * d, d, &n0, &n1) ||
                !bounds(mm + r * F, b, per_norm, per_bias, sc, F, n0, n1, approx, slack))
                continue;
            undecided[r] = (uint8_t)row_member(approx, slack, F, k, M, feat + r * M, pre + r * M, inside + r * M);
        }
        free(approx);
    }
}

/* Zero a row's activations of its M edited features `fr`; 1 where an id is outside [0, F). */
static int row_ids_bad(const int64_t *fr, int64_t M, int64_t F, float *ar) {
    int row_bad = 0;
    for (int64_t i = 0; i < M; i++) {
        ar[i] = 0.0f;
        row_bad |= fr[i] < 0 || fr[i] >= F;
    }
    return row_bad;
}

/* Each edited feature's exact pre-activation at row `xr` into `pre (M)`; 1 where one is above 0 or NaN
   (at or below 0, TopK's ReLU makes it 0 whether or not it is among the k). */
static int row_pre(const float *xr, const float *w_t, const float *b, int64_t d, int64_t M, const int64_t *fr,
                   float *pre) {
    int any = 0;
    for (int64_t i = 0; i < M; i++) {
        pre[i] = dot(xr, w_t + fr[i] * d, d) + b[fr[i]];
        any |= !(pre[i] <= 0.0f);
    }
    return any;
}

/* The activations `ar (M)`: each pre-activation ReLU'd as torch.relu (a NaN stays NaN) where it is
   among the k (`inside`), else 0. */
static void row_acts(const float *pre, const uint8_t *inside, int64_t M, float *ar) {
    for (int64_t i = 0; i < M; i++) ar[i] = inside[i] ? (pre[i] > 0.0f || pre[i] != pre[i] ? pre[i] : 0.0f) : 0.0f;
}

/* One row of `rudder_screen_active`: its activations of `fr (M)` into `ar (M)`; returns 0 where decided,
   1 where the bounds cannot tell or the row is not finite, 2 where an id is outside [0, F) (nothing of the
   row is read). Scratch: `approx (2 F + M)`, `inside (M)`. */
static int row_active(const uint16_t *mmr, const float *xr, const uint16_t *x_lor, const float *b,
                      const float *per_norm, const float *per_bias, float sc, const float *w_t, int64_t F, int64_t d,
                      int64_t k, int64_t M, const int64_t *fr, float *approx, uint8_t *inside, float *ar) {
    float *slack = approx + F, *pre = slack + F, n0, n1;
    if (row_ids_bad(fr, M, F, ar)) return 2;
    if (!row_pre(xr, w_t, b, d, M, fr, pre)) return 0; /* every edited feature at or below 0: 0 */
    if (!norms(xr, x_lor, d, &n0, &n1) || !bounds(mmr, b, per_norm, per_bias, sc, F, n0, n1, approx, slack))
        return 1;
    int undecided = row_member(approx, slack, F, k, M, fr, pre, inside);
    row_acts(pre, inside, M, ar);
    return undecided;
}

/* A TopK SAE's activations of the features `feat (N, M)` at every row, in one call: `acts[r, i]` is the
   feature's exact pre-activation (`w_t`'s row, float32), ReLU'd, where it is among the row's k largest
   (`row_member`), else 0. A row whose features are all at or below 0 reads 0 without its bounds (TopK
   ReLUs its values). `undecided[r]` = 1 where the bounds cannot tell or the row is not finite (its acts
   are left 0: the caller answers from the top k). Returns the number of ids outside [0, F). */
int64_t rudder_screen_active(int64_t N, int64_t F, int64_t d, const uint16_t *mm, const float *x,
                             const uint16_t *x_lo, const float *b, const float *per_norm, const float *per_bias,
                             float sc, const float *w_t, int64_t k, int64_t M, const int64_t *feat, int threads,
                             float *acts, uint8_t *undecided) {
    int64_t bad = 0;
#pragma omp parallel num_threads(threads) reduction(+ : bad)
    {
        float *approx = malloc(sizeof(float) * (2 * F + M));
        uint8_t *inside = malloc((size_t)M + 1);
#pragma omp for schedule(static)
        for (int64_t r = 0; r < N; r++) {
            const int64_t *fr = feat + r * M;
            float *ar = acts + r * M;
            const int got = approx && inside ? row_active(mm + r * F, x + r * d, x_lo + r * d, b, per_norm, per_bias,
                                                          sc, w_t, F, d, k, M, fr, approx, inside, ar)
                                             : (row_ids_bad(fr, M, F, ar) ? 2 : 1);
            undecided[r] = got != 0;
            bad += got == 2; /* nothing of this row is read: the caller raises */
        }
        free(approx);
        free(inside);
    }
    return bad;
}

/* One row of `rudder_screen_read`: its acts of `fr (M)` into `ar (M)` and its certified top n into `v, id
   (n)`; 1 where the row needs the general path (`*row_bad` = 1 where an id is outside [0, F): nothing of
   the row is read). Scratch: `approx (2 F + M + m + 1)`, `inside (M)`, `heap_id (m + 1)`. */
static int row_read(const uint16_t *mmr, const float *xr, const uint16_t *x_lor, const float *b, const float *per_norm,
                    const float *per_bias, float sc, const float *w_t, int64_t F, int64_t d, int64_t k, int64_t n,
                    int64_t m, int64_t M, const int64_t *fr, float *approx, uint8_t *inside, int32_t *heap_id,
                    float *v, int64_t *id, float *ar, int *row_bad) {
    float *slack = approx + F, *pre = slack + F, *heap = pre + M, n0, n1;
    if (row_ids_bad(fr, M, F, ar)) {
        *row_bad = 1;
        return 1;
    }
    if (!norms(xr, x_lor, d, &n0, &n1) || !bounds(mmr, b, per_norm, per_bias, sc, F, n0, n1, approx, slack))
        return 1;
    int undecided = 0;
    if (row_pre(xr, w_t, b, d, M, fr, pre)) { /* else every edited feature reads 0 */
        undecided = row_member(approx, slack, F, k, M, fr, pre, inside);
        row_acts(pre, inside, M, ar);
    }
    for (int64_t j = 0; j < F; j++) slack[j] += approx[j];
    int top_failed = row_top(slack, xr, w_t, b, F, d, n, m, heap, heap_id, v, id);
    return undecided || top_failed || !(v[n - 1] > 0.0f);
}

/* A TopK SAE's readout step in one call, for rows that read the top n (n <= k) of its activations and
   edit the features `feat (N, M)` (int64): from one set of bounds per row, `acts (N, M)` as
   `rudder_screen_active` gives them (each feature's exact pre-activation, ReLU'd, where it is among the
   row's k largest, else 0) and the row's certified top n (`row_top`) into `values, ids (N, n)`.
   `failed[r]` = 1 where the row needs the caller's general path: the certificate or the membership
   test cannot decide, the row is not finite, or the n-th value is not above 0 (TopK ReLUs its values:
   the top n are then not all active). Returns the number of failed rows; `*bad` gets the number of
   rows with a feature id outside [0, F) (left unread: the caller raises). */
int64_t rudder_screen_read(int64_t N, int64_t F, int64_t d, const uint16_t *mm, const float *x,
                           const uint16_t *x_lo, const float *b, const float *per_norm, const float *per_bias,
                           float sc, const float *w_t, int64_t k, int64_t n, int64_t m, int64_t M,
                           const int64_t *feat, int threads, float *values, int64_t *ids, float *acts,
                           uint8_t *failed, int64_t *bad) {
    int64_t nfailed = 0, nbad = 0;
#pragma omp parallel num_threads(threads) reduction(+ : nfailed, nbad)
    {
        float *approx = malloc(sizeof(float) * (2 * F + M + m + 1));
        int32_t *heap_id = malloc(sizeof(int32_t) * (m + 1));
        uint8_t *inside = malloc((size_t)M + 1);
#pragma omp for schedule(static)
        for (int64_t r = 0; r < N; r++) {
            int row_bad = 0;
            failed[r] = (uint8_t)(!approx || !heap_id || !inside ||
                                  row_read(mm + r * F, x + r * d, x_lo + r * d, b, per_norm, per_bias, sc, w_t, F, d, k,
                                           n, m, M, feat + r * M, approx, inside, heap_id, values + r * n, ids + r * n,
                                           acts + r * M, &row_bad));
            nfailed += failed[r];
            nbad += row_bad;
        }
        free(approx);
        free(heap_id);
        free(inside);
    }
    *bad = nbad;
    return nfailed;
}

static inline int above(float a, float b) { return a > b || (a != a && b == b); } /* a NaN ranks first, as in torch.topk */

/* One row of `rudder_edited_top`. */
static void row_edited_top(int64_t n, int64_t M, int64_t top_k, const float *vr, const int64_t *ir, const int64_t *fr,
                           const float *gr, const uint8_t *lr, float *ov, int64_t *oi) {
    int64_t filled = 0;
    for (int64_t c = 0; c < n + M; c++) {
        float e;
        int64_t id;
        if (c < n) {
            e = vr[c], id = ir[c];
            for (int64_t m = 0; m < M; m++)
                if (lr[m] && fr[m] == id) e = gr[m];
        } else {
            const int64_t m = c - n;
            int among = 0;
            for (int64_t j = 0; j < n && lr[m]; j++) among |= ir[j] == fr[m];
            if (!lr[m] || among) continue;
            e = gr[m], id = fr[m];
        }
        if (filled < top_k || above(e, ov[top_k - 1])) { /* insertion into the top_k so far */
            int64_t p = filled < top_k ? filled++ : top_k - 1;
            for (; p > 0 && above(e, ov[p - 1]); p--) ov[p] = ov[p - 1], oi[p] = oi[p - 1];
            ov[p] = e, oi[p] = id;
        }
    }
}

/* The readout's top `top_k` of each row once its edits are written in: row r's candidates are its top
   n activations `values, ids (N, n)` with each edited feature's final value (`f1 (N, M)` where `last`)
   written over its entry, or beside them when it is not among them (an edited feature can enter the
   top); the `top_k` largest, largest first (ties: the earlier candidate), into `out_values, out_ids`.
   Needs top_k <= n (the edits never remove a candidate). */
void rudder_edited_top(int64_t N, int64_t n, int64_t M, int64_t top_k, const float *values, const int64_t *ids,
                       const int64_t *feat, const float *f1, const uint8_t *last, float *out_values,
                       int64_t *out_ids) {
    for (int64_t r = 0; r < N; r++)
        row_edited_top(n, M, top_k, values + r * n, ids + r * n, feat + r * M, f1 + r * M, last + r * M,
                       out_values + r * top_k, out_ids + r * top_k);
}

/* `out[r, i]` = x_r . w_t[ids[r, i]] + b[ids[r, i]] for `x (N, d)`, `ids (N, M)` (int64), `out (N, M)`:
   each row's own M encoder columns (the rows of `w_t (F, d)`), float32 summation. Returns the number of
   ids outside [0, F) (their entries are left unwritten: the caller raises). */
int64_t rudder_dots_at(int64_t N, int64_t M, int64_t d, int64_t F, const float *x, const float *w_t, const float *b,
                       const int64_t *ids, int threads, float *out) {
    int64_t bad = 0;
#pragma omp parallel for num_threads(threads) schedule(static) reduction(+ : bad) if (N * M * d >= (1 << 16))
    for (int64_t r = 0; r < N; r++) {
        const float *xr = x + r * d;
        for (int64_t i = 0; i < M; i++) {
            const int64_t f = ids[r * M + i];
            if (f < 0 || f >= F) {
                bad++;
                continue;
            }
            out[r * M + i] = dot(xr, w_t + f * d, d) + b[f];
        }
    }
    return bad;
}

/* Whether op i of the tables applies at position p (its slot's op, valid, p in its scope). */
static inline int op_applies(const uint8_t *valid, const int64_t *start, const int64_t *end, int64_t i, int64_t p) {
    return valid[i] && start[i] <= p && p < end[i];
}

/* One row's feature edits (`rudder_feature_edits` for row r of slot s at position p): f1 into `g (M)`,
   last into `lr (M)`, the delta into `out (d)`; 1 where an active op's feature id is outside [0, F)
   (the delta is left 0). */
static int row_edit(int64_t s, int64_t p, int64_t S, int64_t M, int64_t F, int64_t d, const uint8_t *valid,
                    const int64_t *start, const int64_t *end, const int64_t *feature, const float *scale,
                    const float *shift, const float *fr, const float *w_dec, float *g, uint8_t *lr, float *out) {
    memset(out, 0, sizeof(float) * (size_t)d);
    if (s < 0 || s >= S) { /* no slot: nothing applies */
        for (int64_t m = 0; m < M; m++) g[m] = fr[m], lr[m] = 0;
        return 0;
    }
    const int64_t *feat = feature + s * M;
    int row_bad = 0;
    for (int64_t m = 0; m < M; m++) {
        const int64_t i = s * M + m;
        lr[m] = op_applies(valid, start, end, i, p); /* active, for now */
        float cur = fr[m];
        for (int64_t j = 0; j < m; j++) /* the newest earlier active op on this feature set its value */
            if (lr[j] && feat[j] == feat[m]) cur = g[j];
        g[m] = lr[m] ? (scale[i] == 0.0f ? shift[i] : cur * scale[i] + shift[i]) : cur;
        row_bad |= lr[m] && (feat[m] < 0 || feat[m] >= F);
    }
    if (row_bad) return 1;
    for (int64_t m = 0; m < M; m++) /* a later active op on the same feature: not its final value */
        for (int64_t j = m + 1; j < M && lr[m]; j++) /* lr[j], j > m, still says "active" */
            if (lr[j] && feat[j] == feat[m]) lr[m] = 0;
    for (int64_t m = 0; m < M; m++) {
        if (!lr[m]) continue;
        const float c = g[m] - fr[m];
        const float *w = w_dec + feat[m] * d;
#pragma omp simd
        for (int64_t t = 0; t < d; t++) out[t] += c * w[t];
    }
    return 0;
}

/* One step's feature edits of one SAE, every row in one pass: the C form of `steering._feature_edits`
   and `_edit_delta` together. Row r is of slot `slot[r]` (-1: no slot, nothing edited) at token position
   `pos[r]`; the tables are the SAE's `SaeTable`: `valid (S, M)` uint8, `start, end, feature (S, M)` int64,
   `scale, shift (S, M)` float32 (each op as f' = f scale + shift, exactly the shift where scale is 0).
   `f0 (N, M)` is each row's activation of its slot's M features before any edit. Writes, per column m:
   `f1[r, m]`, the feature's value after ops 0..m (an op applies where valid and start <= pos < end; ops
   apply in order, and an op on a feature an earlier active op set starts from that value); `last[r, m]`,
   whether the op is active and no later active op edits the same feature; and `delta (N, d)`, the sum
   over those of (f1 - f0) W_dec[feature], `w_dec (F, d)` float32 (zero for rows without an active op).
   Returns the number of rows with an active op on a feature id outside [0, F) (their delta is left 0:
   the caller raises). float32 arithmetic in the torch ops' order: f1 is theirs bit for bit (a fused
   multiply-add rounds f scale + shift as they do, as scale is 1 or shift is 0 unless scale is 0);
   delta is up to float32 rounding. */
int64_t rudder_feature_edits(int64_t N, int64_t S, int64_t M, int64_t F, int64_t d, const int64_t *slot,
                             const int64_t *pos, const uint8_t *valid, const int64_t *start, const int64_t *end,
                             const int64_t *feature, const float *scale, const float *shift, const float *f0,
                             const float *w_dec, int threads, float *f1, uint8_t *last, float *delta) {
    int64_t bad = 0;
#pragma omp parallel for num_threads(threads) schedule(static) reduction(+ : bad) if (N * d >= (1 << 15))
    for (int64_t r = 0; r < N; r++)
        bad += row_edit(slot[r], pos[r], S, M, F, d, valid, start, end, feature, scale, shift, f0 + r * M, w_dec,
                        f1 + r * M, last + r * M, delta + r * d);
    return bad;
}

static inline uint16_t to_bf16(float f) { /* round to nearest even, as torch's .to(torch.bfloat16) */
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if (f != f) return (uint16_t)((u >> 16) | 0x40); /* a NaN stays a NaN */
    return (uint16_t)((u + 0x7fff + ((u >> 16) & 1)) >> 16);
}

/* y's row r = the stream's, float32 or (`bf16`) bfloat16. */
static void row_copy(const void *stream, void *y, int64_t r, int64_t d, int bf16) {
    const size_t size = bf16 ? sizeof(uint16_t) : sizeof(float);
    memcpy((char *)y + (size_t)(r * d) * size, (const char *)stream + (size_t)(r * d) * size, size * (size_t)d);
}

/* y's row r (a copy of the stream's) += delta as the torch ops add it: float32, or (`bf16`) the delta rounded
   to bfloat16, added in float32 and rounded once. */
static void row_add(void *y, int64_t r, int64_t d, const float *delta, int bf16_out) {
    if (bf16_out) {
        uint16_t *yr = (uint16_t *)y + r * d;
        for (int64_t t = 0; t < d; t++) yr[t] = to_bf16(bf16(yr[t]) + bf16(to_bf16(delta[t])));
    } else {
        float *yr = (float *)y + r * d;
        for (int64_t t = 0; t < d; t++) yr[t] += delta[t];
    }
}

/* A TopK SAE's edit-only step in one call: `rudder_screen_active` and `rudder_feature_edits` per row, and
   the edited stream written out. Row r is of slot `slot[r]` at position `pos[r]` (the tables as in
   `rudder_feature_edits`); its edited features are its slot's M (`feature`), their activations `f0` as
   `rudder_screen_active` gives them, from the screen's `mm, x, x_lo` (`x`: the SAE's input, float32).
   `stream (N, d)` is the site's activation, float32 or (`stream_bf16`) bfloat16; `y` gets, in its dtype,
   stream + delta as the torch ops give it (the delta rounded to the stream's dtype, then added in float32
   and rounded once), and exactly the stream row where no op applies. Returns the number of rows whose
   bounds cannot tell whether an edited feature is among the k, or that are not finite (their y is the
   stream row: the caller answers such a step on its general path); `*bad`
   gets the number of rows whose slot holds a feature id outside [0, F) (the caller raises). */
int64_t rudder_screen_edit(int64_t N, int64_t F, int64_t d, const uint16_t *mm, const float *x,
                           const uint16_t *x_lo, const float *b, const float *per_norm, const float *per_bias,
                           float sc, const float *w_t, int64_t k, int64_t S, int64_t M, const int64_t *slot,
                           const int64_t *pos, const uint8_t *valid, const int64_t *start, const int64_t *end,
                           const int64_t *feature, const float *scale, const float *shift, const float *w_dec,
                           const void *stream, int stream_bf16, int threads, void *y, int64_t *bad) {
    int64_t nundecided = 0, nbad = 0;
#pragma omp parallel num_threads(threads) reduction(+ : nundecided, nbad)
    {
        float *approx = malloc(sizeof(float) * (2 * F + 3 * M + d)); /* row_active's scratch, then f0, g, delta */
        uint8_t *inside = malloc(2 * (size_t)M + 1);
        float *f0 = approx ? approx + 2 * F + M : NULL, *g = f0 ? f0 + M : NULL, *delta = g ? g + M : NULL;
        uint8_t *lr = inside ? inside + M : NULL;
#pragma omp for schedule(static)
        for (int64_t r = 0; r < N; r++) {
            const int64_t s = slot[r], p = pos[r];
            int applies = 0;
            row_copy(stream, y, r, d, stream_bf16);
            if (s < 0 || s >= S) continue;
            for (int64_t m = 0; m < M; m++) {
                const int64_t i = s * M + m;
                applies |= op_applies(valid, start, end, i, p);
            }
            if (!applies) continue; /* no op at this position: the row goes on as it came */
            const int got = approx && inside ? row_active(mm + r * F, x + r * d, x_lo + r * d, b, per_norm, per_bias,
                                                          sc, w_t, F, d, k, M, feature + s * M, approx, inside, f0)
                                             : 1;
            if (got) {
                nundecided += got == 1;
                nbad += got == 2;
                continue;
            }
            row_edit(s, p, S, M, F, d, valid, start, end, feature, scale, shift, f0, w_dec, g, lr, delta);
            row_add(y, r, d, delta, stream_bf16);
        }
        free(approx);
        free(inside);
    }
    *bad = nbad;
    return nundecided;
}

/* A TopK SAE's readout decode step in one call, for rows that all read the top `top_k` of its activations
   and edit it (`rudder_screen_read`, `rudder_feature_edits`, `rudder_edited_top` per row, and the stream
   written out as `rudder_screen_edit` does): row r of slot `slot[r]` at `pos[r]`, its slot's M features
   `feature`; its certified top n = top_k + M (from m candidates) with the edits written in, the top
   `top_k` into `top_values, top_ids (N, top_k)`; the edited stream into `y`. Returns the number of rows
   that need the caller's general path (as `rudder_screen_read`'s `failed`, or a row of no slot); `*bad`
   gets the number of rows whose slot holds a feature id outside [0, F). */
int64_t rudder_screen_read_edit(int64_t N, int64_t F, int64_t d, const uint16_t *mm, const float *x,
                                const uint16_t *x_lo, const float *b, const float *per_norm, const float *per_bias,
                                float sc, const float *w_t, int64_t k, int64_t n, int64_t m, int64_t S, int64_t M,
                                const int64_t *slot, const int64_t *pos, const uint8_t *valid, const int64_t *start,
                                const int64_t *end, const int64_t *feature, const float *scale, const float *shift,
                                const float *w_dec, const void *stream, int stream_bf16, int64_t top_k, int threads,
                                void *y, float *top_values, int64_t *top_ids, int64_t *bad) {
    int64_t nfailed = 0, nbad = 0;
#pragma omp parallel num_threads(threads) reduction(+ : nfailed, nbad)
    {
        float *approx = malloc(sizeof(float) * (2 * F + M + m + 1 + 2 * M + n + d)); /* row_read's scratch, f0, g, v, delta */
        int32_t *heap_id = malloc(sizeof(int32_t) * (m + 1));
        int64_t *id = malloc(sizeof(int64_t) * (n + 1));
        uint8_t *inside = malloc(2 * (size_t)M + 1);
        float *f0 = approx ? approx + 2 * F + M + m + 1 : NULL, *g = f0 ? f0 + M : NULL, *v = g ? g + M : NULL;
        float *delta = v ? v + n : NULL;
        uint8_t *lr = inside ? inside + M : NULL;
#pragma omp for schedule(static)
        for (int64_t r = 0; r < N; r++) {
            const int64_t s = slot[r];
            int row_bad = 0;
            row_copy(stream, y, r, d, stream_bf16);
            if (!approx || !heap_id || !id || !inside || s < 0 || s >= S ||
                row_read(mm + r * F, x + r * d, x_lo + r * d, b, per_norm, per_bias, sc, w_t, F, d, k, n, m, M,
                         feature + s * M, approx, inside, heap_id, v, id, f0, &row_bad)) {
                nfailed++;
                nbad += row_bad;
                continue;
            }
            row_edit(s, pos[r], S, M, F, d, valid, start, end, feature, scale, shift, f0, w_dec, g, lr, delta);
            row_edited_top(n, M, top_k, v, id, feature + s * M, g, lr, top_values + r * top_k, top_ids + r * top_k);
            int applies = 0;
            for (int64_t i = 0; i < M; i++) applies |= lr[i];
            if (applies) row_add(y, r, d, delta, stream_bf16); /* else the row goes on exactly as it came */
        }
        free(approx);
        free(heap_id);
        free(id);
        free(inside);
    }
    *bad = nbad;
    return nfailed;
}
