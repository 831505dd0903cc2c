/* Kernels for one decoding step on a CPU: each does in one call, reading its data once, what
 * PyTorch does in several operators (aiayn/kernels/__init__.py calls them through ctypes, and is
 * where each one's PyTorch reference is named; tests/model/test_kernels.py holds them to it).
 *
 *   attend_*     attention of a few queries per row (a decoding step), with the self-attention
 *                cache write folded in
 *   add_norm_*   LayerNorm(x + y): the post-norm residual
 *   argmax_*     greedy search's next tokens, their outputs and the rows done
 *   embed_*      token embedding x sqrt(d_model) + position
 *   beam_*       beam search's log-softmax, bans and each sentence's best extensions
 *   linear_*     x W^T + b (and ReLU) for the few rows of a decoding step
 *
 * Each comes for fp32 and bf16 tensors (`_f32`, `_bf16`, one type for all of a call's tensors);
 * arithmetic is fp32. Plain C with GCC/Clang vector extensions, built for the machine it runs on.
 *
 * Attention, for every row b, head h and query i < n_queries:
 *     out[b, i, h, :] = softmax(scale * k[b / group, h, :t, :] q[b, h, i, :] + mask) v[b / group, h, :t, :]
 * where mask[b / group, s] == 0 excludes key s, which is then not read at all (a row with every
 * key excluded gets zeros, as PyTorch's scaled_dot_product_attention gives). `group` consecutive
 * rows share one source (beam search's beams of a sentence). A self-attention step first appends
 * its own key and value: with k_new != NULL, k_new[b, h, :] and v_new[b, h, :] are written at
 * position t - 1 of k and v (group 1).
 * Why: PyTorch's fused attention, for one query, runs two tiny GEMMs per (row, head) and reads
 * keys and values with little memory-level parallelism: 200-300 us for 64 rows x 4 heads x 20 keys
 * in a decoding step, where reading them takes ~30-100 us. Here each (row, head) is two streaming
 * passes (scores, then weighted values), and the next (row, head)'s keys and values are fetched
 * while this one computes.
 */
#include <stdlib.h>

#include "common.h"

/* One (row, head, query). `dh` is a constant where the caller inlines it for a common head size
 * (a multiple of 16: the vector path, its loops unrolled into registers of the CPU's width); any
 * other size takes the scalar path. */
#define DEFINE_ONE(NAME, T, LOAD, LOADV, STORE)                                   \
static inline __attribute__((always_inline)) void NAME(                                             \
        const T *qi, const T *kb, const T *vb, const uint8_t *m, T *o,   int64_t t, int64_t dh,    \
        int64_t ks_t, int64_t vs_t, float scale, float *scores, float *query, float *acc)            \
{                                                                                                     \
    for (int64_t j = 0; j < dh; j++) query[j] = LOAD(qi[j]) * scale;                                \
    const int vector = dh % 16 == 0 && dh <= 256;                                                     \
    vec qv[256 / LANES], av[256 / LANES];                                                             \
    if (vector) for (int64_t c = 0; c < dh / LANES; c++) qv[c] = loadv_f32(query + LANES * c);         \
    float top = -INFINITY;                                                                            \
    for (int64_t s = 0; s < t; s++) {                                                                 \
        if (m && !m[s]) { scores[s] = -INFINITY; continue; }  /* excluded: not even read */          \
        const T *ks = kb + s * ks_t;                                                                 \
        float d = 0.f;                                                                                \
        if (vector) {                                                                                 \
            vec even = qv[0] * LOADV(ks), odd = {0};  /* two chains of FMAs */                       \
            for (int64_t c = 1; c < dh / LANES; c++) {                                                \
                if (c & 1) odd += qv[c] * LOADV(ks + LANES * c);                                      \
                else even += qv[c] * LOADV(ks + LANES * c);                                           \
            }                                                                                         \
            d = sum_of(even + odd);                                                                   \
        } else {                                                                                      \
            for (int64_t j = 0; j < dh; j++) d += query[j] * LOAD(ks[j]);                          \
        }                                                                                             \
        scores[s] = d;                                                                                \
        top = d > top ? d : top;                                                                      \
    }                                                                                                 \
    if (top == -INFINITY) {  /* nothing to attend to: zeros (NaN if a score is) */                    \
        const float zero = any_nan(scores, t) ? NAN : 0.f;                                            \
        for (int64_t j = 0; j < dh; j++) STORE(o + j, zero);                                          \
        return;                                                                                       \
    }                                                                                                 \
    float total = 0.f;                                                                                \
    _Pragma("omp simd reduction(+:total)")                                                            \
    for (int64_t s = 0; s < t; s++) { scores[s] = exp_nonpositive(scores[s] - top); total += scores[s]; } \
    const float inv = 1.f / total;                                                                    \
    if (vector) {                                                                                     \
        for (int64_t c = 0; c < dh / LANES; c++) av[c] = (vec){0};                                    \
        for (int64_t s = 0; s < t; s++) {                                                             \
            if (m && !m[s]) continue;  /* a weight of 0 */                                            \
            const T *vs = vb + s * vs_t;                                                             \
            const float p = scores[s] * inv;                                                          \
            for (int64_t c = 0; c < dh / LANES; c++) av[c] += p * LOADV(vs + LANES * c);              \
        }                                                                                             \
        for (int64_t c = 0; c < dh / LANES; c++) storev_f32(acc + LANES * c, av[c]);                  \
    } else {                                                                                          \
        for (int64_t j = 0; j < dh; j++) acc[j] = 0.f;                                                \
        for (int64_t s = 0; s < t; s++) {                                                             \
            if (m && !m[s]) continue;                                                                 \
            const T *vs = vb + s * vs_t;                                                             \
            const float p = scores[s] * inv;                                                          \
            for (int64_t j = 0; j < dh; j++) acc[j] += p * LOAD(vs[j]);                            \
        }                                                                                             \
    }                                                                                                 \
    for (int64_t j = 0; j < dh; j++) STORE(o + j, acc[j]);                                            \
}

/* Arguments: attend_args (abi.h), one struct (ctypes converts each argument of a call separately,
 * ~1 us apiece). Every last dimension is contiguous. */
static int attend_check(const attend_args *a) {
    AIAYN_REQUIRE(a->q && a->k && a->v && a->out && !a->k_new == !a->v_new, AIAYN_NULL_POINTER);
    AIAYN_REQUIRE(a->B >= 0 && a->H >= 1 && a->n_queries >= 1 && a->t >= 1 && a->dh >= 1 && a->group >= 1
                  && a->B % a->group == 0 && (!a->k_new || a->group == 1), AIAYN_BAD_SIZE);
    AIAYN_REQUIRE(a->t <= AIAYN_MAX_KEYS && a->dh <= AIAYN_MAX_HEAD_DIM, AIAYN_OVER_LIMIT);
    AIAYN_REQUIRE((a->qs_b | a->qs_h | a->qs_i | a->ks_b | a->ks_h | a->ks_t | a->vs_b | a->vs_h | a->vs_t
                   | a->ms_b | a->os_b | a->os_i | a->os_h | a->kn_b | a->kn_h | a->vn_b | a->vn_h) >= 0,
                  AIAYN_BAD_STRIDE);  /* (the OR of int64s is negative if any is) */
    return AIAYN_OK;
}

#define DEFINE_ATTEND(NAME, ONE, T)                                                                   \
HOT int NAME(const attend_args *a)                                                                    \
{                                                                                                     \
    const int status = attend_check(a);                                                               \
    if (status != AIAYN_OK) return status;                                                            \
    const T *q = a->q; T *k = a->k, *v = a->v;                                                        \
    const uint8_t *mask = a->mask; T *out = a->out;                                                   \
    const T *k_new = a->k_new, *v_new = a->v_new;                                                     \
    const int64_t B = a->B, H = a->H, n_queries = a->n_queries, t = a->t, dh = a->dh, group = a->group; \
    const int64_t qs_b = a->qs_b, qs_h = a->qs_h, qs_i = a->qs_i, ks_b = a->ks_b, ks_h = a->ks_h, ks_t = a->ks_t; \
    const int64_t vs_b = a->vs_b, vs_h = a->vs_h, vs_t = a->vs_t, ms_b = a->ms_b;                     \
    const int64_t os_b = a->os_b, os_i = a->os_i, os_h = a->os_h, kn_b = a->kn_b, kn_h = a->kn_h;     \
    const int64_t vn_b = a->vn_b, vn_h = a->vn_h; const float scale = a->scale;                       \
    float scores[AIAYN_MAX_KEYS], query[AIAYN_MAX_HEAD_DIM], acc[AIAYN_MAX_HEAD_DIM];                 \
    const int64_t sources = B / group;                                                                \
    for (int64_t src = 0; src < sources; src++) {                                                     \
        const uint8_t *m = mask ? mask + src * ms_b : 0;                                              \
        for (int64_t h = 0; h < H; h++) {                                                             \
            T *kb = k + src * ks_b + h * ks_h, *vb = v + src * vs_b + h * vs_h;                       \
            if (k_new) {  /* group 1: row b is source src */                                          \
                memcpy(kb + (t - 1) * ks_t, k_new + src * kn_b + h * kn_h, dh * sizeof(T));           \
                memcpy(vb + (t - 1) * vs_t, v_new + src * vn_b + h * vn_h, dh * sizeof(T));           \
            }                                                                                         \
            const int64_t ns = h + 1 < H ? src : src + 1, nh = h + 1 < H ? h + 1 : 0;                 \
            if (ns < sources) {  /* the next keys and values, while these are used */                 \
                prefetch_rows(k + ns * ks_b + nh * ks_h, t, ks_t * (int64_t)sizeof(T), dh * (int64_t)sizeof(T)); \
                prefetch_rows(v + ns * vs_b + nh * vs_h, t, vs_t * (int64_t)sizeof(T), dh * (int64_t)sizeof(T)); \
            }                                                                                         \
            for (int64_t b = src * group; b < (src + 1) * group; b++)  /* the rows of this source */  \
            for (int64_t i = 0; i < n_queries; i++) {                                                 \
                const T *qi = q + b * qs_b + h * qs_h + i * qs_i;                                     \
                T *o = out + b * os_b + i * os_i + h * os_h;                                          \
                switch (dh) {  /* the paper's 64, and its neighbours, as constants */                 \
                case 32: ONE(qi, kb, vb, m, o, t, 32, ks_t, vs_t, scale, scores, query, acc); break;  \
                case 64: ONE(qi, kb, vb, m, o, t, 64, ks_t, vs_t, scale, scores, query, acc); break;  \
                case 128: ONE(qi, kb, vb, m, o, t, 128, ks_t, vs_t, scale, scores, query, acc); break; \
                default: ONE(qi, kb, vb, m, o, t, dh, ks_t, vs_t, scale, scores, query, acc);         \
                }                                                                                     \
            }                                                                                         \
        }                                                                                             \
    }                                                                                                 \
    return AIAYN_OK;                                                                                  \
}

DEFINE_ONE(one_f32, float, from_f32, loadv_f32, to_f32)
DEFINE_ONE(one_bf16, bf16, from_bf16, loadv_bf16, to_bf16)
DEFINE_ATTEND(attend_f32, one_f32, float)
DEFINE_ATTEND(attend_bf16, one_bf16, bf16)

/* ------------------------------------------------------------------ the rest of a decoding step
 * out[r] = LayerNorm(x[r] + y[r]) * weight + bias for rows of n: the post-norm residual of §3.1 in
 * one pass (PyTorch: an add, then layer_norm), statistics in fp32 as PyTorch computes them. */
static int add_norm_check(const add_norm_args *a) {
    AIAYN_REQUIRE(a->x && a->y && a->weight && a->bias && a->out, AIAYN_NULL_POINTER);
    AIAYN_REQUIRE(a->rows >= 0 && a->n >= 1, AIAYN_BAD_SIZE);
    AIAYN_REQUIRE(a->n <= AIAYN_MAX_ROW, AIAYN_OVER_LIMIT);
    AIAYN_REQUIRE(a->xs >= a->n && a->ys >= a->n && a->os >= a->n, AIAYN_BAD_STRIDE);
    return AIAYN_OK;
}

#define DEFINE_ADD_NORM(NAME, T, LOAD, STORE)                                                         \
HOT int NAME(const add_norm_args *a)                                                                  \
{                                                                                                     \
    const int status = add_norm_check(a);                                                             \
    if (status != AIAYN_OK) return status;                                                            \
    const T *x = a->x, *y = a->y, *weight = a->weight, *bias = a->bias; T *out = a->out;              \
    const int64_t rows = a->rows, n = a->n, xs = a->xs, ys = a->ys, os = a->os;                       \
    const float eps = a->eps;                                                                         \
    float sum_row[AIAYN_MAX_ROW];                                                                     \
    for (int64_t r = 0; r < rows; r++) {                                                              \
        const T *xr = x + r * xs, *yr = y + r * ys;                                                   \
        T *o = out + r * os;                                                                          \
        float mean = 0.f, var = 0.f;                                                                  \
        _Pragma("omp simd reduction(+:mean)")                                                         \
        for (int64_t j = 0; j < n; j++) { sum_row[j] = LOAD(xr[j]) + LOAD(yr[j]); mean += sum_row[j]; } \
        mean /= n;                                                                                    \
        _Pragma("omp simd reduction(+:var)")                                                          \
        for (int64_t j = 0; j < n; j++) { float d = sum_row[j] - mean; var += d * d; }                \
        const float inv = 1.f / sqrtf(var / n + eps);                                                 \
        for (int64_t j = 0; j < n; j++)                                                               \
            STORE(o + j, (sum_row[j] - mean) * inv * LOAD(weight[j]) + LOAD(bias[j]));                \
    }                                                                                                 \
    return AIAYN_OK;                                                                                  \
}

DEFINE_ADD_NORM(add_norm_f32, float, from_f32, to_f32)
DEFINE_ADD_NORM(add_norm_bf16, bf16, from_bf16, to_bf16)

/* Greedy search's next tokens: out[r] = the first index of row r's maximum, never one of the
 * n_banned ids in `banned` (padding; EOS before a minimum length). PyTorch's argmax over (64, 8000)
 * rows takes ~290 us on one core, this ~40. A NaN is never chosen (PyTorch's argmax takes the first
 * NaN, which would cost this scan a second test per logit, 10-20% of its time): a row of NaN and
 * -inf gets its first allowed id, a row with every id banned -1. With record != NULL, it also writes
 * the token at record[rows_of[r] * record_stride + column] (the sentence's output; rows_of[r]
 * outside [0, record_rows): not written) and sets `done` to how many rows are done: their token is
 * `eos` or their output reached limits[r] tokens with this one (step_len). Arguments: argmax_args
 * (abi.h). */
static int argmax_check(const argmax_args *a) {
    AIAYN_REQUIRE(a->x && a->out && (a->banned || a->n_banned == 0) && (!a->record || (a->rows_of && a->limits)),
                  AIAYN_NULL_POINTER);
    AIAYN_REQUIRE(a->rows >= 0 && a->n >= 1 && a->n_banned >= 0 && a->record_rows >= 0, AIAYN_BAD_SIZE);
    AIAYN_REQUIRE(a->xs >= a->n && a->record_stride >= 0, AIAYN_BAD_STRIDE);
    AIAYN_REQUIRE(!a->record || (a->column >= 0 && (a->record_rows <= 1 || a->column < a->record_stride)),
                  AIAYN_BAD_INDEX);
    return AIAYN_OK;
}

#define DEFINE_ARGMAX(NAME, T, LOAD)                                                                  \
HOT int NAME(argmax_args *a)                                                                          \
{                                                                                                     \
    const int status = argmax_check(a);                                                               \
    if (status != AIAYN_OK) return status;                                                            \
    const T *x = a->x; const int64_t rows = a->rows, n = a->n, xs = a->xs;                            \
    const int64_t *banned = a->banned, n_banned = a->n_banned; int64_t *out = a->out;                 \
    int64_t *record = a->record; const int64_t record_stride = a->record_stride;                      \
    const int64_t *rows_of = a->rows_of, column = a->column, eos = a->eos;                            \
    const int64_t *limits = a->limits, step_len = a->step_len, record_rows = a->record_rows;          \
    int64_t done = 0;                                                                                 \
    for (int64_t r = 0; r < rows; r++) {                                                              \
        const T *xr = x + r * xs;                                                                     \
        float best = -INFINITY; int64_t at = -1;                                                      \
        for (int64_t j0 = 0; j0 < n; j0 += 256) {  /* a block's maximum, then where it is */          \
            const int64_t j1 = j0 + 256 < n ? j0 + 256 : n;                                           \
            float top = -INFINITY;                                                                    \
            _Pragma("omp simd reduction(max:top)")                                                    \
            for (int64_t j = j0; j < j1; j++) top = LOAD(xr[j]) > top ? LOAD(xr[j]) : top;            \
            if (top > best || (at < 0 && top == best))                                                \
                for (int64_t j = j0; j < j1; j++) {                                                   \
                    const float v = LOAD(xr[j]);                                                      \
                    if (v > best || at < 0) {                                                         \
                        int skip = 0;                                                                 \
                        for (int64_t i = 0; i < n_banned; i++) skip |= banned[i] == j;                \
                        if (!skip) { best = v == v ? v : best; at = j; }  /* best is never NaN */     \
                    }                                                                                 \
                }                                                                                     \
        }                                                                                             \
        out[r] = at;                                                                                  \
        if (record) {                                                                                 \
            if (rows_of[r] >= 0 && rows_of[r] < record_rows)                                          \
                record[rows_of[r] * record_stride + column] = at;                                     \
            done += at == eos || limits[r] <= step_len;                                               \
        }                                                                                             \
    }                                                                                                 \
    a->done = done;                                                                                   \
    return AIAYN_OK;                                                                                  \
}

DEFINE_ARGMAX(argmax_f32, float, from_f32)
DEFINE_ARGMAX(argmax_bf16, bf16, from_bf16)

/* out[r] = table[tokens[r]] * scale + positions[r % length]: token embeddings and their positions
 * (§3.4, §3.5) for rows of n, one call (PyTorch: lookup, scale, slice, add). AIAYN_BAD_INDEX, having
 * written nothing, if a token is outside [0, vocab). Arguments: embed_args (abi.h). */
static int embed_check(const embed_args *a) {
    AIAYN_REQUIRE(a->tokens && a->table && a->positions && a->out, AIAYN_NULL_POINTER);
    AIAYN_REQUIRE(a->rows >= 0 && a->length >= 1 && a->vocab >= 1 && a->n >= 1, AIAYN_BAD_SIZE);
    for (int64_t r = 0; r < a->rows; r++)
        AIAYN_REQUIRE(a->tokens[r] >= 0 && a->tokens[r] < a->vocab, AIAYN_BAD_INDEX);
    return AIAYN_OK;
}

#define DEFINE_EMBED(NAME, T, LOAD, STORE)                                                            \
HOT int NAME(const embed_args *a)                                                                     \
{                                                                                                     \
    const int status = embed_check(a);                                                                \
    if (status != AIAYN_OK) return status;                                                            \
    const int64_t *tokens = a->tokens; const int64_t rows = a->rows, length = a->length;              \
    const T *table = a->table, *positions = a->positions; T *out = a->out;                            \
    const int64_t n = a->n; const float scale = a->scale;                                             \
    for (int64_t r = 0; r < rows; r++) {                                                              \
        const T *e = table + tokens[r] * n, *p = positions + (r % length) * n;                        \
        T *o = out + r * n;                                                                           \
        for (int64_t j = 0; j < n; j++) STORE(o + j, LOAD(e[j]) * scale + LOAD(p[j]));                \
    }                                                                                                 \
    return AIAYN_OK;                                                                                  \
}

DEFINE_EMBED(embed_f32, float, from_f32, to_f32)
DEFINE_EMBED(embed_bf16, bf16, from_bf16, to_bf16)

/* Beam search's candidates in one pass over the logits: for each sentence i (rows i*r .. i*r+r-1,
 * one per beam), the n best scores[row] + log_softmax(x[row])[token], best first, as (score, token,
 * beam). Tokens in `forbid` are never candidates, nor EOS where eos_banned (a minimum length); a
 * sentence with at_limit[i] set gets EOS only. The log-softmax is taken before these bans (they do
 * not renormalize). Slots beyond the finite candidates get -inf, token 0, beam 0 (dead beams).
 * Into *unsettled (where given): how many sentences have EOS among their `keep` best candidates or
 * no finite candidate at all, the sentences whose beams do not simply go on as their keep best (a
 * search's step where none does needs no more bookkeeping).
 * Each row's 64-logit blocks are searched only where the block's best could enter the n best, so
 * the pass is mostly a maximum per block. A row with a NaN logit (its log-softmax is NaN) gives no
 * candidates. Arguments: beam_args (abi.h). */
static int beam_check(const beam_args *a) {
    AIAYN_REQUIRE(a->x && a->scores && a->out_scores && a->out_tokens && a->out_beams
                  && (a->forbid || a->n_forbid == 0), AIAYN_NULL_POINTER);
    AIAYN_REQUIRE(a->sentences >= 0 && a->r >= 1 && a->V >= 1 && a->n >= 1 && a->n_forbid >= 0
                  && a->keep >= 0 && a->keep <= a->n, AIAYN_BAD_SIZE);
    AIAYN_REQUIRE(a->xs >= a->V, AIAYN_BAD_STRIDE);
    AIAYN_REQUIRE(a->eos >= 0 && a->eos < a->V, AIAYN_BAD_INDEX);
    return AIAYN_OK;
}

#define DEFINE_BEAM(NAME, T, LOAD, LOADV)                                                             \
HOT int NAME(const beam_args *a)                                                                      \
{                                                                                                     \
    const int status = beam_check(a);                                                                 \
    if (status != AIAYN_OK) return status;                                                            \
    const T *x = a->x; const int64_t sentences = a->sentences, r = a->r, V = a->V, xs = a->xs;        \
    const float *scores = a->scores; const int64_t n = a->n;                                          \
    const int64_t *forbid = a->forbid, n_forbid = a->n_forbid, eos = a->eos, eos_banned = a->eos_banned; \
    const uint8_t *at_limit = a->at_limit;                                                            \
    float *out_scores = a->out_scores; int64_t *out_tokens = a->out_tokens, *out_beams = a->out_beams; \
    int64_t unsettled = 0;                                                                            \
    for (int64_t i = 0; i < sentences; i++) {                                                         \
        float *best = out_scores + i * n; int64_t *tok = out_tokens + i * n, *beam = out_beams + i * n; \
        for (int64_t c = 0; c < n; c++) { best[c] = -INFINITY; tok[c] = 0; beam[c] = 0; }            \
        const int only_eos = at_limit && at_limit[i];                                                 \
        for (int64_t b = 0; b < r; b++) {                                                             \
            const T *row = x + (i * r + b) * xs;                                                      \
            const float base = scores[i * r + b];                                                     \
            const int64_t body = V / LANES * LANES;  /* (the compiler vectorized the exp for AVX-512 \
                                                         only: AVX2 ran 2.8x slower, 0.63x PyTorch's) */ \
            vec tops = (vec){0} - INFINITY, sums = {0};                                               \
            for (int64_t j = 0; j < body; j += LANES) tops = maxv(LOADV(row + j), tops);              \
            float top = max_of(tops);                                                                 \
            for (int64_t j = body; j < V; j++) top = LOAD(row[j]) > top ? LOAD(row[j]) : top;         \
            if (top == -INFINITY || base == -INFINITY) continue;  /* no live candidate here */        \
            for (int64_t j = 0; j < body; j += LANES) sums += expv_nonpositive(LOADV(row + j) - top); \
            float total = sum_of(sums);                                                               \
            for (int64_t j = body; j < V; j++) total += exp_nonpositive(LOAD(row[j]) - top);          \
            const float lse = top + logf(total);                                                      \
            const int64_t j0 = only_eos ? eos : 0, j1 = only_eos ? eos + 1 : V;                       \
            for (int64_t s = j0; s < j1; s += 64) {                                                   \
                const int64_t e = s + 64 < j1 ? s + 64 : j1;                                          \
                float block = -INFINITY;                                                              \
                _Pragma("omp simd reduction(max:block)")                                              \
                for (int64_t j = s; j < e; j++) block = LOAD(row[j]) > block ? LOAD(row[j]) : block;  \
                if (!(base + (block - lse) > best[n - 1])) continue;                                  \
                for (int64_t j = s; j < e; j++) {                                                     \
                    const float c = base + (LOAD(row[j]) - lse);                                      \
                    if (!(c > best[n - 1])) continue;                                                 \
                    int banned = eos_banned && !only_eos && j == eos;                                 \
                    for (int64_t f = 0; f < n_forbid; f++) banned |= forbid[f] == j;                  \
                    if (banned) continue;                                                             \
                    int64_t p = n - 1;  /* insert, keeping the earlier of equal scores first */       \
                    while (p > 0 && c > best[p - 1]) {                                                \
                        best[p] = best[p - 1]; tok[p] = tok[p - 1]; beam[p] = beam[p - 1]; p--;       \
                    }                                                                                 \
                    best[p] = c; tok[p] = j; beam[p] = b;                                             \
                }                                                                                     \
            }                                                                                         \
        }                                                                                             \
        int ends = best[0] == -INFINITY;                                                              \
        for (int64_t c = 0; c < a->keep; c++) ends |= tok[c] == eos && best[c] > -INFINITY;           \
        unsettled += ends;                                                                            \
    }                                                                                                 \
    if (a->unsettled) *a->unsettled = unsettled;                                                      \
    return AIAYN_OK;                                                                                  \
}

DEFINE_BEAM(beam_f32, float, from_f32, loadv_f32)
DEFINE_BEAM(beam_bf16, bf16, from_bf16, loadv_bf16)

/* ------------------------------------------------------------------------ a few rows' linear layer
 * out[r, j] = relu?(sum_i x[r, i] w[j, i] + bias[j]) for a few rows r: the projections of a decoding
 * step (one row a sentence, or a beam). oneDNN's GEMM is built for many rows: at one row it reads a
 * small model's weights at ~15 GB/s (fp32: 5 GFLOP/s). Here the weight, in tiles of 16 outputs
 * (abi.h: fp32 (tiles, k, 16); bf16 (tiles, ceil(k / 2), 16, 2), pairs of inputs side by side, as
 * AVX512_BF16's dot product takes them), is read once per MR rows: a panel of 2 of the CPU's vectors
 * (2 tiles with AVX-512, one tile with 8-float vectors: AVX2, NEON) times up to MR rows of
 * accumulators held in registers (8 rows with AVX-512's 32 registers; 6 with AVX2's 16: 12
 * accumulators, 2 weight vectors and a broadcast input: 6-8% faster than 4 rows at 64-256 rows of
 * the small model's layers; NEON's 32 take the 6 rows' 24 halves too). Arithmetic
 * in fp32; bf16 pairs by the CPU's bf16 dot product where it has one (vdpbf16ps: inputs below
 * 2^-126 count as zero), else widened. Arguments: linear_args (abi.h). */
#if defined(__AVX512F__)
#define LIN_VW 16
#define LIN_MR 8
#else
#define LIN_VW 8
#define LIN_MR 6
#endif
typedef float lin_vec __attribute__((vector_size(4 * LIN_VW)));  /* the CPU's vector of floats (NEON, SSE: two) */
typedef int32_t lin_ivec __attribute__((vector_size(4 * LIN_VW)));
typedef uint32_t lin_uvec __attribute__((vector_size(4 * LIN_VW)));
#define LIN_PW (2 * LIN_VW)  /* outputs per panel */
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif
#if defined(__AVX512BF16__) && defined(__AVX512F__)
#define BF16_DOT 1
#else
#define BF16_DOT 0
#endif

static int linear_check(const linear_args *a) {
    AIAYN_REQUIRE(a->x && a->w && a->out, AIAYN_NULL_POINTER);
    AIAYN_REQUIRE(a->rows >= 0 && a->n >= 1 && a->k >= 1 && (a->relu == 0 || a->relu == 1), AIAYN_BAD_SIZE);
    AIAYN_REQUIRE(a->xs >= a->k && a->os >= a->n, AIAYN_BAD_STRIDE);
    return AIAYN_OK;
}

static inline f32x16 relu16(f32x16 v) {  /* max(0, v), NaN kept (as torch.relu) */
    i32x16 bits; memcpy(&bits, &v, 64);
    bits &= ~(v <= (f32x16){0});
    memcpy(&v, &bits, 64);
    return v;
}
static inline lin_vec lin_relu(lin_vec v) {  /* the same on a lin_vec */
    lin_ivec bits; memcpy(&bits, &v, sizeof v);
    bits &= ~(v <= (lin_vec){0});
    memcpy(&v, &bits, sizeof v);
    return v;
}
#if LIN_VW == LANES  /* x86 with AVX: the CPU's vectors, common.h's */
#define lin_load_f32 loadv_f32
#define lin_store_f32 storev_f32
#define lin_store_bf16 storev_bf16
#else  /* NEON, SSE: two of common.h's vectors */
static inline lin_vec lin_load_f32(const float *p) { lin_vec v; memcpy(&v, p, sizeof v); return v; }
static inline void lin_store_f32(float *p, lin_vec v) { memcpy(p, &v, sizeof v); }
static inline void lin_store_bf16(bf16 *p, lin_vec v) {
    vec half[2]; memcpy(half, &v, sizeof half);
    storev_bf16(p, half[0]);
    storev_bf16(p + LANES, half[1]);
}
#endif

/* Where vector c (0, 1) of the panel that starts at tile t reads its weights: its tile (the last
 * tile again past the end: computed, never stored) and its first output in that tile. */
static inline int64_t lin_tile(int64_t t, int c, int64_t tiles) {
    const int64_t u = t + (c * LIN_VW) / 16;
    return u < tiles ? u : tiles - 1;
}
#define LIN_LANE(c) (((c) * LIN_VW) % 16)

/* fp32: acc[m][c] += x[m, i] * (the panel's weights of input i) */
#define F32_PRODUCTS(MR)                                                                              \
    const float *w0 = w + lin_tile(t, 0, tiles) * k * 16 + LIN_LANE(0);                               \
    const float *w1 = w + lin_tile(t, 1, tiles) * k * 16 + LIN_LANE(1);                               \
    for (int64_t i = 0; i < k; i++) {                                                                 \
        lin_vec v0, v1;                                                                               \
        memcpy(&v0, w0 + i * 16, sizeof v0); memcpy(&v1, w1 + i * 16, sizeof v1);                     \
        IN_REGISTER(v0); IN_REGISTER(v1);                                                             \
        for (int m = 0; m < MR; m++) {                                                                \
            const float s = x[m * xs + i];                                                            \
            acc[m][0] += s * v0;                                                                      \
            acc[m][1] += s * v1;                                                                      \
        }                                                                                             \
    }

/* bf16: the same over pairs p of inputs (2p, 2p + 1); the last pair of an odd k is (x, 0) */
static inline uint32_t bf16_pair(const bf16 *x, int64_t i, int64_t k) {
    uint32_t pair = x[i];
    if (i + 1 < k) pair |= (uint32_t)x[i + 1] << 16;
    return pair;
}
#if BF16_DOT
#define BF16_PRODUCTS(MR)                                                                             \
    const bf16 *w0 = w + lin_tile(t, 0, tiles) * pairs * 32, *w1 = w + lin_tile(t, 1, tiles) * pairs * 32; \
    for (int64_t p = 0; p < pairs; p++) {                                                             \
        const __m512bh v0 = (__m512bh)_mm512_loadu_si512(w0 + p * 32), v1 = (__m512bh)_mm512_loadu_si512(w1 + p * 32); \
        for (int m = 0; m < MR; m++) {                                                                \
            const __m512bh xv = (__m512bh)_mm512_set1_epi32((int)bf16_pair(x + m * xs, 2 * p, k));   \
            acc[m][0] = (lin_vec)_mm512_dpbf16_ps((__m512)acc[m][0], xv, v0);                         \
            acc[m][1] = (lin_vec)_mm512_dpbf16_ps((__m512)acc[m][1], xv, v1);                         \
        }                                                                                             \
    }
#else
#define BF16_PRODUCTS(MR)                                                                             \
    const bf16 *w0 = w + lin_tile(t, 0, tiles) * pairs * 32 + 2 * LIN_LANE(0);                        \
    const bf16 *w1 = w + lin_tile(t, 1, tiles) * pairs * 32 + 2 * LIN_LANE(1);                        \
    for (int64_t p = 0; p < pairs; p++) {                                                             \
        lin_uvec u0, u1; memcpy(&u0, w0 + p * 32, sizeof u0); memcpy(&u1, w1 + p * 32, sizeof u1);    \
        const lin_uvec e0 = u0 << 16, o0 = u0 & 0xFFFF0000u, e1 = u1 << 16, o1 = u1 & 0xFFFF0000u;     \
        lin_vec ve0, vo0, ve1, vo1;                                                                   \
        memcpy(&ve0, &e0, sizeof ve0); memcpy(&vo0, &o0, sizeof vo0);                                 \
        memcpy(&ve1, &e1, sizeof ve1); memcpy(&vo1, &o1, sizeof vo1);                                 \
        for (int m = 0; m < MR; m++) {                                                                \
            const uint32_t pair = bf16_pair(x + m * xs, 2 * p, k);                                    \
            const float se = from_bf16((bf16)(pair & 0xFFFF)), so = from_bf16((bf16)(pair >> 16));    \
            acc[m][0] += se * ve0 + so * vo0;                                                         \
            acc[m][1] += se * ve1 + so * vo1;                                                         \
        }                                                                                             \
    }
#endif

/* The weight is read in chunks of LIN_CHUNK_BYTES, every row against one chunk before the next: a
 * large weight (a generator's 8 MB) comes from memory once a call, not once per MR rows, and a
 * chunk stays in L2 while the rows pass. In tiles, a whole number of panels, at least one. */
#define LIN_CHUNK_BYTES (256 * 1024)
static inline int64_t lin_chunk(int64_t tile_bytes, int64_t panel) {
    const int64_t panels = LIN_CHUNK_BYTES / (tile_bytes * panel);
    return (panels > 1 ? panels : 1) * panel;
}

/* MR rows (a constant: the accumulators stay in registers) against the panels of tiles
 * [first_tile, end_tile) of the weight, then, straight from the accumulators, scale (int8), bias,
 * ReLU and the store of each of the panel's vectors (LIN_VW outputs of one tile each) */
#define DEFINE_LINEAR_ROWS(NAME, T, WT, PRODUCTS, SCALE, LOAD, STOREV, STORE, MR)                     \
static inline __attribute__((always_inline)) void NAME##_##MR(const linear_args *a, const T *x, T *out, \
                                                                 int64_t first_tile, int64_t end_tile) \
{                                                                                                     \
    const WT *w = a->w; const T *bias = a->bias;                                                      \
    const int64_t n = a->n, k = a->k, xs = a->xs, os = a->os, tiles = (n + 15) / 16;                  \
    const int64_t pairs = (k + 1) / 2;                                                                \
    (void)pairs;                                                                                      \
    for (int64_t t = first_tile; t < end_tile; t += LIN_PW / 16) {                                    \
        lin_vec acc[MR][2];                                                                           \
        for (int m = 0; m < MR; m++) acc[m][0] = acc[m][1] = (lin_vec){0};                            \
        PRODUCTS(MR)                                                                                  \
        for (int c = 0; c < 2; c++) {                                                                 \
            const int64_t u = t + (c * LIN_VW) / 16, first = u * 16 + LIN_LANE(c);                   \
            if (u >= tiles || first >= n) break;  /* (past the last output: computed, never stored) */ \
            const int64_t width = n - first < LIN_VW ? n - first : LIN_VW;                            \
            float b[LIN_VW] = {0};                                                                    \
            if (bias) for (int64_t j = 0; j < width; j++) b[j] = LOAD(bias[first + j]);               \
            const lin_vec bv = lin_load_f32(b);                                                       \
            for (int m = 0; m < MR; m++) {                                                            \
                lin_vec r = SCALE(acc[m][c], u, LIN_LANE(c)) + bv;                                    \
                if (a->relu) r = lin_relu(r);                                                         \
                T *o = out + m * os + first;                                                          \
                if (width == LIN_VW) STOREV(o, r);                                                    \
                else for (int64_t j = 0; j < width; j++) STORE(o + j, r[j]);                           \
            }                                                                                         \
        }                                                                                             \
    }                                                                                                 \
}

#define DEFINE_LINEAR(NAME, T, WT, PRODUCTS, SCALE, LOAD, STOREV, STORE)                              \
DEFINE_LINEAR_ROWS(NAME, T, WT, PRODUCTS, SCALE, LOAD, STOREV, STORE, LIN_MR)  /* NAME_LIN_MR */      \
DEFINE_LINEAR_ROWS(NAME, T, WT, PRODUCTS, SCALE, LOAD, STOREV, STORE, 4)                              \
DEFINE_LINEAR_ROWS(NAME, T, WT, PRODUCTS, SCALE, LOAD, STOREV, STORE, 2)                              \
DEFINE_LINEAR_ROWS(NAME, T, WT, PRODUCTS, SCALE, LOAD, STOREV, STORE, 1)                              \
HOT int NAME(const linear_args *a)                                                                    \
{                                                                                                     \
    const int status = linear_check(a);                                                               \
    if (status != AIAYN_OK) return status;                                                            \
    const T *x = a->x; T *out = a->out;                                                               \
    const int64_t tiles = (a->n + 15) / 16;                                                           \
    const int64_t chunk = lin_chunk(a->k * 16 * (int64_t)sizeof(WT), LIN_PW / 16);                    \
    for (int64_t t0 = 0; t0 < tiles; t0 += chunk) {                                                   \
        const int64_t t1 = t0 + chunk < tiles ? t0 + chunk : tiles;                                   \
        int64_t r = 0;                                                                                \
        for (; r + LIN_MR <= a->rows; r += LIN_MR) NAME##_LIN_MR(a, x + r * a->xs, out + r * a->os, t0, t1); \
        if (r + 4 <= a->rows) { NAME##_4(a, x + r * a->xs, out + r * a->os, t0, t1); r += 4; }        \
        for (; r + 2 <= a->rows; r += 2) NAME##_2(a, x + r * a->xs, out + r * a->os, t0, t1);         \
        if (r < a->rows) NAME##_1(a, x + r * a->xs, out + r * a->os, t0, t1);                         \
    }                                                                                                 \
    return AIAYN_OK;                                                                                  \
}

/* int8 weights, fp32 inputs (an int8 inference copy's decoding steps). Each tile: a head of 128
 * bytes (its 16 outputs' fp32 scales s_j, then the int32 sums of their weights), then the weights
 * in groups of I8_GROUP inputs: (ceil(k / I8_GROUP), 16, I8_GROUP) int8, zeros past k.
 * Where the CPU multiplies bytes (I8_LEVELS > 0), each row of x is rounded to I8_LEVELS levels a
 * sign, q = round(x L / max|x|), and stored as q + O, O = L + 1 (unsigned, as the instructions take
 * it): AVX512_VNNI (L 127, O 128) sums 4 products a lane an instruction (vpdpbusd); AVX2 (L 63,
 * O 64: vpmaddubsw saturates pairs of products at 2^15, which 2 * 127 * 128 stays under, as
 * PyTorch's fbgemm does with reduce_range) pairs, then fours (vpmaddwd). Then
 * y_j = (max|x| / L) s_j (sum (q + O) w_j - O sum w_j) + b_j; a row with a NaN or an infinity
 * gives NaN. Elsewhere (I8_LEVELS 0, groups of 1) the weights are widened to fp32 (exactly) and x
 * stays fp32: y_j = s_j (x . w_j) + b_j. */
#if defined(__AVX512VNNI__) && defined(__AVX512F__)
#define I8_LEVELS 127
#define I8_SHIFT 7  /* O = 1 << I8_SHIFT */
#elif defined(__AVX2__)
#define I8_LEVELS 63
#define I8_SHIFT 6
#else
#define I8_LEVELS 0
#endif
#define I8_GROUP (I8_LEVELS ? 4 : 1)

int64_t aiayn_int8_levels(void) { return I8_LEVELS; }

static inline int64_t i8_groups(int64_t k) { return (k + I8_GROUP - 1) / I8_GROUP; }
static inline const int8_t *i8_tile(const int8_t *w, int64_t tile, int64_t k) {
    return w + tile * (AIAYN_INT8_HEAD + 16 * I8_GROUP * i8_groups(k));
}

#if I8_LEVELS
/* x (k) -> q (4 * groups bytes: q + O, O past k) and its scale max|x| / L (NaN for a row with a NaN
 * or an infinity; 0 for a row of zeros). Rounding to nearest, ties to even (the default mode). */
static void i8_quantize(const float *x, int64_t k, int64_t groups, uint8_t *q, float *scale) {
    float m = 0.f;
    int bad = 0;
    int64_t i = 0;
#if I8_LEVELS == 127  /* (AVX-512: 16 at a time, the same operations) */
    __m512 top = _mm512_setzero_ps();
    for (; i + 16 <= k; i += 16) {
        const __m512 a = _mm512_abs_ps(_mm512_loadu_ps(x + i));
        bad |= _mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q) != 0;
        top = _mm512_max_ps(top, a);
    }
    m = _mm512_reduce_max_ps(top);
#elif I8_LEVELS == 63  /* (AVX2: 8 at a time) */
    __m256 top = _mm256_setzero_ps();
    const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
    for (; i + 8 <= k; i += 8) {
        const __m256 a = _mm256_and_ps(_mm256_loadu_ps(x + i), magnitude);
        bad |= _mm256_movemask_ps(_mm256_cmp_ps(a, a, _CMP_UNORD_Q)) != 0;
        top = _mm256_max_ps(top, a);
    }
    float lanes[8];
    _mm256_storeu_ps(lanes, top);
    for (int j = 0; j < 8; j++) m = lanes[j] > m ? lanes[j] : m;
#endif
    for (; i < k; i++) {
        const float a = fabsf(x[i]);
        bad |= a != a;
        m = a > m ? a : m;
    }
    memset(q, 1 << I8_SHIFT, (size_t)(4 * groups));
    if (bad || m == INFINITY) { *scale = NAN; return; }
    if (m == 0.f) { *scale = 0.f; return; }
    const float inv = (float)I8_LEVELS / m;
    *scale = m / (float)I8_LEVELS;
    i = 0;
#if I8_LEVELS == 127  /* round(x inv) to nearest, ties to even (the default mode, as nearbyintf), + O */
    for (; i + 16 <= k; i += 16) {
        const __m512i r = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x + i), _mm512_set1_ps(inv)));
        const __m512i shifted = _mm512_add_epi32(r, _mm512_set1_epi32(1 << I8_SHIFT));
        _mm_storeu_si128((__m128i *)(q + i), _mm512_cvtepi32_epi8(shifted));
    }
#elif I8_LEVELS == 63
    for (; i + 8 <= k; i += 8) {
        const __m256i r = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + i), _mm256_set1_ps(inv)));
        const __m256i shifted = _mm256_add_epi32(r, _mm256_set1_epi32(1 << I8_SHIFT));  /* in [1, 127] */
        const __m128i words = _mm_packs_epi32(_mm256_castsi256_si128(shifted), _mm256_extracti128_si256(shifted, 1));
        _mm_storel_epi64((__m128i *)(q + i), _mm_packus_epi16(words, words));
    }
#endif
    for (; i < k; i++) q[i] = (uint8_t)((1 << I8_SHIFT) + (int)nearbyintf(x[i] * inv));
}

/* acc (16 int32, one tile's outputs) += the tile's weights of group p times row q's 4 bytes */
#if I8_LEVELS == 127
typedef __m512i i8_acc;
#define I8_ZERO() _mm512_setzero_si512()
#define I8_DOT(acc, four, w) _mm512_dpbusd_epi32((acc), _mm512_set1_epi32(four), _mm512_loadu_si512(w))
static inline __m512 i8_float(i8_acc acc, const int8_t *head) {  /* sum (q + O) w - O sum w, as fp32 */
    return _mm512_cvtepi32_ps(_mm512_sub_epi32(acc, _mm512_slli_epi32(_mm512_loadu_si512(head + 64), I8_SHIFT)));
}
#define I8_MR 8
#define I8_PANEL 2
#else
typedef struct { __m256i lo, hi; } i8_acc;  /* outputs 0-7, 8-15 */
static inline i8_acc I8_ZERO(void) { return (i8_acc){_mm256_setzero_si256(), _mm256_setzero_si256()}; }
static inline i8_acc I8_DOT(i8_acc acc, int32_t four, const int8_t *w) {
    const __m256i x = _mm256_set1_epi32(four), ones = _mm256_set1_epi16(1);
    const __m256i lo = _mm256_madd_epi16(_mm256_maddubs_epi16(x, _mm256_loadu_si256((const __m256i *)w)), ones);
    const __m256i hi = _mm256_madd_epi16(_mm256_maddubs_epi16(x, _mm256_loadu_si256((const __m256i *)(w + 32))), ones);
    return (i8_acc){_mm256_add_epi32(acc.lo, lo), _mm256_add_epi32(acc.hi, hi)};
}
static inline f32x16 i8_float(i8_acc acc, const int8_t *head) {
    const __m256i s_lo = _mm256_slli_epi32(_mm256_loadu_si256((const __m256i *)(head + 64)), I8_SHIFT);
    const __m256i s_hi = _mm256_slli_epi32(_mm256_loadu_si256((const __m256i *)(head + 96)), I8_SHIFT);
    float f[16];
    _mm256_storeu_ps(f, _mm256_cvtepi32_ps(_mm256_sub_epi32(acc.lo, s_lo)));
    _mm256_storeu_ps(f + 8, _mm256_cvtepi32_ps(_mm256_sub_epi32(acc.hi, s_hi)));
    return load16_f32(f);
}
#define I8_MR 4
#define I8_PANEL 1  /* (its two halves are two chains) */
#endif

/* MR rows (q at stride qs, their scales sx) against the panels of I8_PANEL tiles in [first_tile,
 * end_tile) (two chains of dependent instructions or more, at one row too) */
#define DEFINE_I8_ROWS(MR)                                                                            \
static inline __attribute__((always_inline)) void i8_rows_##MR(const linear_args *a, const uint8_t *q, int64_t qs, \
                                                             const float *sx, float *out,             \
                                                             int64_t first_tile, int64_t end_tile)    \
{                                                                                                     \
    const int8_t *w = a->w; const float *bias = a->bias;                                              \
    const int64_t n = a->n, k = a->k, os = a->os, tiles = (n + 15) / 16, groups = i8_groups(k);       \
    for (int64_t t = first_tile; t < end_tile; t += I8_PANEL) {                                       \
        i8_acc acc[MR][I8_PANEL];                                                                     \
        const int8_t *wt[I8_PANEL];                                                                   \
        for (int c = 0; c < I8_PANEL; c++) {  /* past the last tile: the last again, never stored */  \
            wt[c] = i8_tile(w, t + c < tiles ? t + c : tiles - 1, k) + AIAYN_INT8_HEAD;               \
            for (int m = 0; m < MR; m++) acc[m][c] = I8_ZERO();                                       \
        }                                                                                             \
        for (int64_t p = 0; p < groups; p++)                                                          \
            for (int m = 0; m < MR; m++) {                                                            \
                int32_t four; memcpy(&four, q + m * qs + 4 * p, 4);                                   \
                for (int c = 0; c < I8_PANEL; c++) acc[m][c] = I8_DOT(acc[m][c], four, wt[c] + p * 64); \
            }                                                                                         \
        for (int c = 0; c < I8_PANEL && t + c < tiles; c++) {                                         \
            const int8_t *head = i8_tile(w, t + c, k);                                                \
            float b[16] = {0};                                                                        \
            const int64_t first = (t + c) * 16, width = n - first < 16 ? n - first : 16;              \
            if (bias) for (int64_t j = 0; j < width; j++) b[j] = bias[first + j];                     \
            const f32x16 s = load16_f32((const float *)head), bv = load16_f32(b);                     \
            for (int m = 0; m < MR; m++) {                                                            \
                f32x16 r = (f32x16)i8_float(acc[m][c], head) * (s * sx[m]) + bv;                      \
                if (a->relu) r = relu16(r);                                                           \
                float *o = out + m * os + first;                                                      \
                if (width == 16) store16_f32(o, r);                                                   \
                else for (int64_t j = 0; j < width; j++) o[j] = r[j];                                 \
            }                                                                                         \
        }                                                                                             \
    }                                                                                                 \
}
#define DEFINE_I8_ROWS_(MR) DEFINE_I8_ROWS(MR)  /* (MR expanded first) */
DEFINE_I8_ROWS_(I8_MR)
#if I8_MR == 8
DEFINE_I8_ROWS(4)
#endif
DEFINE_I8_ROWS(2)
DEFINE_I8_ROWS(1)
#define I8_ROWS_(MR) i8_rows_##MR
#define I8_ROWS(MR) I8_ROWS_(MR)

#if I8_LEVELS == 127 && defined(__AMX_TILE__) && defined(__AMX_INT8__) && defined(__linux__) && !defined(AIAYN_NO_AMX)
/* AMX's tiles (Xeon Sapphire Rapids and later): 16 rows at a time, the same bytes and the same
 * integer sums as vpdpbusd's (TDPBUSD multiplies unsigned inputs by signed weights, in groups of 4:
 * a weight tile's 16 groups of 16 outputs x 4 inputs are a B tile's 16 rows of 64 bytes), then the
 * same output stage: the same results, bit for bit, ~8x the multiply-adds a cycle. Linux lends a
 * thread the tiles' state once asked (arch_prctl); where it refuses, the vpdpbusd path (also where
 * ONEDNN_MAX_CPU_ISA caps the machine below AMX: AIAYN_NO_AMX). */
#include <sys/syscall.h>
#include <unistd.h>
#define I8_AMX 1
static int amx_granted(void) {
    static int granted = -1;  /* (a race only asks twice) */
    if (granted < 0)
        granted = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
    return granted;
}
typedef struct { uint8_t palette, start_row, reserved[14]; uint16_t colsb[16]; uint8_t rows[16]; } amx_config;

/* 16 x `blocks` rows (1 to 4 blocks of 16) of q (stride qs) against output tiles [first_tile,
 * end_tile): each weight
 * tile is read once for all of them (tiles 0-3 the blocks' sums, 4 their inputs, 5 the weights) */
#define I8_AMX_BLOCK(b)                                                                               \
    if (blocks > (b)) { _tile_loadd(4, q + (b) * 16 * qs + 4 * p, qs); _tile_dpbusd(b, 4, 5); }
#define I8_AMX_STORE(b) if (blocks > (b)) _tile_stored(b, acc[b], 64)
static void i8_amx_rows(const linear_args *a, const uint8_t *q, int64_t qs, const float *sx, float *out, int blocks,
                        int64_t first_tile, int64_t end_tile) {
    const int8_t *w = a->w; const float *bias = a->bias;
    const int64_t n = a->n, k = a->k, os = a->os, groups = i8_groups(k);
    int32_t acc[4][16][16];
    for (int64_t t = first_tile; t < end_tile; t++) {
        const int8_t *wt = i8_tile(w, t, k) + AIAYN_INT8_HEAD;
        _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
        for (int64_t p = 0; p < groups; p += 16) {
            _tile_loadd(5, wt + p * 64, 64);
            I8_AMX_BLOCK(0) I8_AMX_BLOCK(1) I8_AMX_BLOCK(2) I8_AMX_BLOCK(3)
        }
        I8_AMX_STORE(0); I8_AMX_STORE(1); I8_AMX_STORE(2); I8_AMX_STORE(3);
        const int8_t *head = i8_tile(w, t, k);
        float b[16] = {0};
        const int64_t first = t * 16, width = n - first < 16 ? n - first : 16;
        if (bias) for (int64_t j = 0; j < width; j++) b[j] = bias[first + j];
        const f32x16 s = load16_f32((const float *)head), bv = load16_f32(b);
        for (int m = 0; m < 16 * blocks; m++) {
            f32x16 r = (f32x16)i8_float(_mm512_loadu_si512(acc[m / 16][m % 16]), head) * (s * sx[m]) + bv;
            if (a->relu) r = relu16(r);
            float *o = out + m * os + first;
            if (width == 16) store16_f32(o, r);
            else for (int64_t j = 0; j < width; j++) o[j] = r[j];
        }
    }
}
#else
#define I8_AMX 0
#endif

HOT int linear_f32_i8(const linear_args *a) {
    const int status = linear_check(a);
    if (status != AIAYN_OK) return status;
    AIAYN_REQUIRE(a->k <= AIAYN_INT8_MAX_K, AIAYN_OVER_LIMIT);
    if (a->rows == 0) return AIAYN_OK;
    const int64_t rows = a->rows, groups = i8_groups(a->k), qs = 4 * groups;
    uint8_t *q = malloc((size_t)(rows * qs) + (size_t)rows * sizeof(float));
    if (!q) return AIAYN_NO_MEMORY;
    float *sx = (float *)(q + rows * qs);  /* (rows * qs is a multiple of 4) */
    const float *x = a->x; float *out = a->out;
    for (int64_t r = 0; r < rows; r++) i8_quantize(x + r * a->xs, a->k, groups, q + r * qs, sx + r);
    const int64_t tiles = (a->n + 15) / 16, chunk = lin_chunk(AIAYN_INT8_HEAD + 16 * 4 * groups, I8_PANEL);
#if I8_AMX
    const int amx = rows >= 16 && groups % 16 == 0 && qs <= 65535 && amx_granted();
    if (amx) {
        amx_config config = {.palette = 1};
        for (int tile = 0; tile < 6; tile++) {  /* 0-3: 16 rows x 16 int32 sums; 4: 16 rows x 64 input bytes; */
            config.colsb[tile] = 64;            /* 5: 16 groups x 16 outputs x 4 weight bytes */
            config.rows[tile] = 16;
        }
        _tile_loadconfig(&config);
    }
#endif
    for (int64_t t0 = 0; t0 < tiles; t0 += chunk) {  /* the weight a chunk at a time, as linear_*'s */
        const int64_t t1 = t0 + chunk < tiles ? t0 + chunk : tiles;
        int64_t r = 0;
#if I8_AMX
        while (amx && rows - r >= 16) {
            const int blocks = (int)((rows - r) / 16 < 4 ? (rows - r) / 16 : 4);
            i8_amx_rows(a, q + r * qs, qs, sx + r, out + r * a->os, blocks, t0, t1);
            r += 16 * blocks;
        }
#endif
        for (; r + I8_MR <= rows; r += I8_MR) I8_ROWS(I8_MR)(a, q + r * qs, qs, sx + r, out + r * a->os, t0, t1);
        if (r + 4 <= rows) { i8_rows_4(a, q + r * qs, qs, sx + r, out + r * a->os, t0, t1); r += 4; }
        for (; r + 2 <= rows; r += 2) i8_rows_2(a, q + r * qs, qs, sx + r, out + r * a->os, t0, t1);
        if (r < rows) i8_rows_1(a, q + r * qs, qs, sx + r, out + r * a->os, t0, t1);
    }
#if I8_AMX
    if (amx) _tile_release();
#endif
    free(q);
    return AIAYN_OK;
}
#else
/* LIN_VW int8 weights at p, widened to fp32 (exactly) */
#if defined(__AVX512F__)
static inline lin_vec i8_widen(const int8_t *p) {
    return (lin_vec)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
}
#elif defined(__AVX2__)
static inline lin_vec i8_widen(const int8_t *p) {
    return (lin_vec)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}
#else
static inline lin_vec i8_widen(const int8_t *p) {
    lin_vec v;
    for (int j = 0; j < LIN_VW; j++) v[j] = p[j];
    return v;
}
#endif
#define I8_PRODUCTS(MR)                                                                               \
    const int8_t *w0 = i8_tile(w, lin_tile(t, 0, tiles), k) + AIAYN_INT8_HEAD + LIN_LANE(0);          \
    const int8_t *w1 = i8_tile(w, lin_tile(t, 1, tiles), k) + AIAYN_INT8_HEAD + LIN_LANE(1);          \
    for (int64_t i = 0; i < k; i++) {                                                                 \
        const lin_vec v0 = i8_widen(w0 + i * 16), v1 = i8_widen(w1 + i * 16);                        \
        for (int m = 0; m < MR; m++) {                                                                \
            const float s = x[m * xs + i];                                                            \
            acc[m][0] += s * v0;                                                                      \
            acc[m][1] += s * v1;                                                                      \
        }                                                                                             \
    }
#define I8_SCALE(r, u, lane) ((r) * lin_load_f32((const float *)i8_tile(w, u, k) + (lane)))
DEFINE_LINEAR(linear_f32_i8_widened, float, int8_t, I8_PRODUCTS, I8_SCALE, from_f32, lin_store_f32, to_f32)
HOT int linear_f32_i8(const linear_args *a) {
    AIAYN_REQUIRE(a->k <= AIAYN_INT8_MAX_K, AIAYN_OVER_LIMIT);
    return linear_f32_i8_widened(a);
}
#endif
#define NO_SCALE(r, u, lane) (r)

DEFINE_LINEAR(linear_f32, float, float, F32_PRODUCTS, NO_SCALE, from_f32, lin_store_f32, to_f32)
DEFINE_LINEAR(linear_bf16, bf16, bf16, BF16_PRODUCTS, NO_SCALE, from_bf16, lin_store_bf16, to_bf16)

/* ---------------------------------------------------------------- the inputs of a many-row int8 GEMM
 * x -> bytes q = round(x / scale) + zero, one scale and zero point for the whole tensor, from the range
 * of x and 0 (x = (q - zero) scale, 0 exactly): the inputs of oneDNN's int8 linear, which an int8
 * inference copy calls for many rows (aiayn.fast.inference.Int8Linear; PyTorch's own quantization is
 * three passes and a copy, 3x this one's time at (900, 1024)). Rounding to nearest, ties to even. A
 * value that is NaN or infinite: scale NaN and nothing written (the caller then computes the layer
 * another way). Arguments: quantize_args (abi.h). */
typedef uint8_t u8x16 __attribute__((vector_size(16)));

/* lo, hi: the least and greatest of 16 lanes and 0; bad: all ones in a lane that met NaN or an infinity */
static inline void range16(f32x16 v, f32x16 *lo, f32x16 *hi, i32x16 *bad) {
    *lo = pick16(v < *lo, v, *lo);
    *hi = pick16(v > *hi, v, *hi);
    *bad |= (v - v) != (v - v);  /* NaN - itself and inf - itself are NaN */
}
/* round(v * inv) + zero, in [0, 255]: to nearest, ties to even (1.5 * 2^23 added and taken away; |v * inv| <= 255) */
static inline u8x16 quantize16(f32x16 v, float inv, float zero) {
    f32x16 q = (v * inv + 12582912.f) - 12582912.f + zero;
    const f32x16 low = {0}, high = low + 255.f;
    q = pick16(q < low, low, pick16(q > high, high, q));
    return __builtin_convertvector(__builtin_convertvector(q, i32x16), u8x16);
}

#define DEFINE_QUANTIZE(NAME, T, LOAD16)                                                              \
HOT int NAME(quantize_args *a)                                                                        \
{                                                                                                     \
    AIAYN_REQUIRE(a->x && a->out, AIAYN_NULL_POINTER);                                                \
    AIAYN_REQUIRE(a->rows >= 0 && a->k >= 1, AIAYN_BAD_SIZE);                                         \
    AIAYN_REQUIRE(a->xs >= a->k, AIAYN_BAD_STRIDE);                                                   \
    const T *x = a->x; uint8_t *out = a->out;                                                         \
    const int64_t rows = a->rows, k = a->k, xs = a->xs, tail = k % 16;                                \
    f32x16 lo = {0}, hi = {0};                                                                        \
    i32x16 bad = {0};                                                                                 \
    for (int64_t r = 0; r < rows; r++) {                                                              \
        const T *row = x + r * xs;                                                                    \
        for (int64_t i = 0; i + 16 <= k; i += 16) range16(LOAD16(row + i), &lo, &hi, &bad);          \
        if (tail) {  /* the last 16 again, overlapping: the range is the same */                      \
            T last[16];                                                                               \
            for (int64_t j = 0; j < 16; j++) last[j] = row[j < tail ? k - tail + j : k - 1];          \
            range16(LOAD16(last), &lo, &hi, &bad);                                                    \
        }                                                                                             \
    }                                                                                                 \
    float l = 0.f, h = 0.f; int any_bad = 0;                                                          \
    for (int j = 0; j < 16; j++) { l = lo[j] < l ? lo[j] : l; h = hi[j] > h ? hi[j] : h; any_bad |= bad[j]; } \
    const float range = h - l;                                                                        \
    if (any_bad || !(range < INFINITY)) { a->scale = NAN; a->zero = 0; return AIAYN_OK; }             \
    if (range == 0.f) {  /* all zeros */                                                              \
        a->scale = 1.f; a->zero = 0;                                                                  \
        memset(out, 0, (size_t)(rows * k));                                                           \
        return AIAYN_OK;                                                                              \
    }                                                                                                 \
    const float inv = 255.f / range, zero = nearbyintf(-l * inv);                                     \
    a->scale = range / 255.f; a->zero = (int64_t)zero;                                                \
    for (int64_t r = 0; r < rows; r++) {                                                              \
        const T *row = x + r * xs; uint8_t *o = out + r * k;                                          \
        int64_t i = 0;                                                                                \
        for (; i + 16 <= k; i += 16) {                                                                \
            const u8x16 q = quantize16(LOAD16(row + i), inv, zero);                                   \
            memcpy(o + i, &q, 16);                                                                    \
        }                                                                                             \
        if (i < k) {                                                                                  \
            T last[16] = {0};                                                                         \
            memcpy(last, row + i, (size_t)(k - i) * sizeof(T));                                       \
            const u8x16 q = quantize16(LOAD16(last), inv, zero);                                      \
            memcpy(o + i, &q, (size_t)(k - i));                                                       \
        }                                                                                             \
    }                                                                                                 \
    return AIAYN_OK;                                                                                  \
}

DEFINE_QUANTIZE(quantize_f32, float, load16_f32)
DEFINE_QUANTIZE(quantize_bf16, bf16, load16_bf16)

/* ------------------------------------------------------------------ a decoder layer's step
 * One new position of each of B rows through a post-norm decoder layer (§3.1): self-attention over
 * the cache (the new key and value written at t), cross-attention to the source, the ReLU
 * feed-forward, each sublayer followed by LayerNorm(x + sublayer(x)). The same kernels, in the same
 * order and precision, as an inference copy's modules call one by one from Python (linear, attend,
 * add_norm: the same results, bit for bit); in one call it saves ~40 Python-side calls a layer, which
 * at a few rows cost more than the arithmetic. All checks before any write (the scratch is
 * allocated here: B (5 D + d_ff) elements). Arguments: decoder_layer_args (abi.h). */
static int decoder_layer_check(const decoder_layer_args *a) {
    AIAYN_REQUIRE(a->x && a->out && a->qkv_w && a->self_w && a->norm1_w && a->norm1_b && a->k_cache && a->v_cache
                  && a->q_w && a->source_k && a->source_v && a->cross_w && a->norm2_w && a->norm2_b && a->ff1_w
                  && a->ff2_w && a->norm3_w && a->norm3_b, AIAYN_NULL_POINTER);
    AIAYN_REQUIRE(a->B >= 0 && a->D >= 1 && a->H >= 1 && a->D % a->H == 0 && a->d_ff >= 1 && a->t >= 0 && a->S >= 1
                  && a->group >= 1 && a->B % a->group == 0, AIAYN_BAD_SIZE);
    AIAYN_REQUIRE(a->t < AIAYN_MAX_KEYS && a->S <= AIAYN_MAX_KEYS && a->D / a->H <= AIAYN_MAX_HEAD_DIM
                  && a->D <= AIAYN_MAX_ROW, AIAYN_OVER_LIMIT);
    AIAYN_REQUIRE((a->ks_b | a->ks_h | a->ks_t | a->vs_b | a->vs_h | a->vs_t | a->sks_b | a->sks_h | a->sks_t
                   | a->svs_b | a->svs_h | a->svs_t | a->ms_b) >= 0, AIAYN_BAD_STRIDE);
    return AIAYN_OK;
}

#define STEP(call) do { if ((failed = (call)) != AIAYN_OK) goto done; } while (0)
#define DEFINE_DECODER_LAYER(NAME, T, LINEAR, ATTEND, ADD_NORM)                                       \
HOT int NAME(const decoder_layer_args *a)                                                             \
{                                                                                                     \
    const int status = decoder_layer_check(a);                                                        \
    if (status != AIAYN_OK || a->B == 0) return status;                                               \
    const int64_t B = a->B, D = a->D, H = a->H, F = a->d_ff, dh = D / H;                              \
    T *scratch = malloc((size_t)(B * (5 * D + F)) * sizeof(T));                                       \
    if (!scratch) return AIAYN_NO_MEMORY;                                                             \
    T *qkv = scratch, *heads = qkv + B * 3 * D, *y = heads + B * D, *hidden = y + B * D;              \
    const float scale = (float)(1.0 / sqrt((double)dh));  /* as Python computes it */                 \
    int failed = AIAYN_OK;  /* a sub-call's refusal (only an int8 linear's scratch can fail): passed on */ \
    /* self-attention: [q | k | v], the new keys and values into the cache, the heads, projected */   \
    STEP(LINEAR(&(linear_args){.x = a->x, .w = a->qkv_w, .bias = a->qkv_b, .out = qkv, .rows = B, .n = 3 * D, \
                          .k = D, .xs = D, .os = 3 * D}));                                             \
    STEP(ATTEND(&(attend_args){.q = qkv, .k = a->k_cache, .v = a->v_cache, .out = heads, .k_new = qkv + D,  \
                          .v_new = qkv + 2 * D, .B = B, .H = H, .n_queries = 1, .t = a->t + 1, .dh = dh, \
                          .group = 1, .qs_b = 3 * D, .qs_h = dh, .ks_b = a->ks_b, .ks_h = a->ks_h,     \
                          .ks_t = a->ks_t, .vs_b = a->vs_b, .vs_h = a->vs_h, .vs_t = a->vs_t, .os_b = D, \
                          .os_i = D, .os_h = dh, .kn_b = 3 * D, .kn_h = dh, .vn_b = 3 * D, .vn_h = dh,   \
                          .scale = scale}));                                                           \
    STEP(LINEAR(&(linear_args){.x = heads, .w = a->self_w, .bias = a->self_b, .out = y, .rows = B, .n = D,  \
                          .k = D, .xs = D, .os = D}));                                                 \
    STEP(ADD_NORM(&(add_norm_args){.x = a->x, .y = y, .weight = a->norm1_w, .bias = a->norm1_b, .out = y,   \
                              .rows = B, .n = D, .xs = D, .ys = D, .os = D, .eps = a->eps}));          \
    /* cross-attention from y: queries (in qkv's first B D), the heads, projected into qkv */        \
    STEP(LINEAR(&(linear_args){.x = y, .w = a->q_w, .bias = a->q_b, .out = qkv, .rows = B, .n = D, .k = D,  \
                          .xs = D, .os = D}));                                                         \
    STEP(ATTEND(&(attend_args){.q = qkv, .k = (void *)a->source_k, .v = (void *)a->source_v, .mask = a->mask, \
                          .out = heads, .B = B, .H = H, .n_queries = 1, .t = a->S, .dh = dh,          \
                          .group = a->group, .qs_b = D, .qs_h = dh, .qs_i = D, .ks_b = a->sks_b,       \
                          .ks_h = a->sks_h, .ks_t = a->sks_t, .vs_b = a->svs_b, .vs_h = a->svs_h,      \
                          .vs_t = a->svs_t, .ms_b = a->ms_b, .os_b = D, .os_i = D, .os_h = dh,         \
                          .scale = scale}));                                                           \
    STEP(LINEAR(&(linear_args){.x = heads, .w = a->cross_w, .bias = a->cross_b, .out = qkv, .rows = B,      \
                          .n = D, .k = D, .xs = D, .os = D}));                                         \
    STEP(ADD_NORM(&(add_norm_args){.x = y, .y = qkv, .weight = a->norm2_w, .bias = a->norm2_b, .out = qkv,  \
                              .rows = B, .n = D, .xs = D, .ys = D, .os = D, .eps = a->eps}));          \
    /* feed-forward from qkv's first B D */                                                           \
    STEP(LINEAR(&(linear_args){.x = qkv, .w = a->ff1_w, .bias = a->ff1_b, .out = hidden, .rows = B, .n = F, \
                          .k = D, .xs = D, .os = F, .relu = 1}));                                      \
    STEP(LINEAR(&(linear_args){.x = hidden, .w = a->ff2_w, .bias = a->ff2_b, .out = heads, .rows = B,       \
                          .n = D, .k = F, .xs = F, .os = D}));                                         \
    STEP(ADD_NORM(&(add_norm_args){.x = qkv, .y = heads, .weight = a->norm3_w, .bias = a->norm3_b,          \
                              .out = a->out, .rows = B, .n = D, .xs = D, .ys = D, .os = D, .eps = a->eps})); \
done:                                                                                                 \
    free(scratch);                                                                                    \
    return failed;                                                                                    \
}

DEFINE_DECODER_LAYER(decoder_layer_f32, float, linear_f32, attend_f32, add_norm_f32)
DEFINE_DECODER_LAYER(decoder_layer_bf16, bf16, linear_bf16, attend_bf16, add_norm_bf16)
DEFINE_DECODER_LAYER(decoder_layer_f32_i8, float, linear_f32_i8, attend_f32, add_norm_f32)

/* ------------------------------------------------------------------ a whole decoding step
 * One new token of each of B rows through the decoder of an encoder-decoder: its embedding and
 * position (embed), every post-norm decoder layer (decoder_layer), and the generator (linear): the
 * logits; without a generator (out_w NULL), the decoder's output, for oneDNN's GEMM to finish where
 * it is faster than `linear` (many rows). The kernels, order and precision of the one-call-per-layer path, so the same results, bit
 * for bit; in one call it also saves the Python between the layers (module calls, checks, new
 * tensors: ~120 us a step of the small model, more than its arithmetic at one sentence in int8).
 * With an `order` it first reorders every layer's cache rows in place (beam search's reorder,
 * which in Python copied them into new buffers). Every argument is checked before anything is
 * written: a token or an order out of range returns AIAYN_BAD_INDEX with the caches untouched.
 * Arguments: decoder_step_args (abi.h). */
static decoder_layer_args step_layer(const decoder_step_args *a, int64_t l, void *x) {
    decoder_layer_args layer = a->layers[l];
    layer.x = x; layer.out = x; layer.B = a->B; layer.t = a->t;
    return layer;
}

static int decoder_step_check(const decoder_step_args *a) {
    AIAYN_REQUIRE(a->tokens && a->table && a->positions && a->layers && a->logits, AIAYN_NULL_POINTER);
    AIAYN_REQUIRE(a->B >= 0 && a->t >= 0 && a->n_layers >= 1 && a->vocab >= 1 && a->D >= 1 && a->V >= 1, AIAYN_BAD_SIZE);
    AIAYN_REQUIRE(a->out_w || a->V == a->D, AIAYN_BAD_SIZE);  /* no generator: the decoder's output */
    AIAYN_REQUIRE(a->D <= AIAYN_MAX_ROW, AIAYN_OVER_LIMIT);
    if (a->order)
        for (int64_t b = 0; b < a->B; b++) AIAYN_REQUIRE(a->order[b] >= 0 && a->order[b] < a->B, AIAYN_BAD_INDEX);
    static const char here;  /* a stand-in for the scratch, which is allocated after the checks */
    for (int64_t l = 0; l < a->n_layers; l++) {
        const decoder_layer_args layer = step_layer(a, l, (void *)&here);
        AIAYN_REQUIRE(layer.D == a->D, AIAYN_BAD_SIZE);
        const int64_t dh = layer.D / layer.H;  /* (a reorder copies each head's positions as one span) */
        AIAYN_REQUIRE(!a->order || (layer.ks_t == dh && layer.vs_t == dh), AIAYN_BAD_STRIDE);
        const int status = decoder_layer_check(&layer);
        if (status != AIAYN_OK) return status;
    }
    return AIAYN_OK;
}

/* Each layer's self-attention cache rows in `order`, in place: row b takes row order[b]'s positions
 * 0..t-1, as beam search's reorder of its beams. Only the rows that change are written (most of a
 * beam search's rows continue their own beam: 58% on the shipped model's test_2016), and only
 * the rows that are read before they change are saved first (17%). */
static int step_reorder(const decoder_step_args *a, size_t size) {
    const int64_t B = a->B, t = a->t, *order = a->order;
    if (t == 0) return AIAYN_OK;
    int64_t *slot = malloc((size_t)B * sizeof(int64_t)), saved = 0;  /* row -> its copy's slot, or -1 */
    if (!slot) return AIAYN_NO_MEMORY;
    for (int64_t b = 0; b < B; b++) slot[b] = -1;
    for (int64_t b = 0; b < B; b++) {
        const int64_t s = order[b];
        if (s != b && order[s] != s && slot[s] < 0) slot[s] = saved++;  /* read by b, then changed */
    }
    int failed = AIAYN_OK;
    for (int64_t l = 0; l < a->n_layers && failed == AIAYN_OK; l++) {
        const decoder_layer_args *layer = &a->layers[l];
        const int64_t H = layer->H, span = t * (layer->D / H) * (int64_t)size;  /* one head's filled bytes */
        char *scratch = saved ? malloc((size_t)(saved * H * span)) : NULL;
        if (saved && !scratch) { failed = AIAYN_NO_MEMORY; break; }
        char *caches[2] = {layer->k_cache, layer->v_cache};
        const int64_t strides[2][2] = {{layer->ks_b, layer->ks_h}, {layer->vs_b, layer->vs_h}};  /* ks_t is dh */
        for (int c = 0; c < 2; c++) {
            const int64_t sb = strides[c][0] * (int64_t)size, sh = strides[c][1] * (int64_t)size;
            for (int64_t b = 0; b < B; b++)
                if (slot[b] >= 0)
                    for (int64_t h = 0; h < H; h++)
                        memcpy(scratch + (slot[b] * H + h) * span, caches[c] + b * sb + h * sh, (size_t)span);
            for (int64_t b = 0; b < B; b++) {
                const int64_t s = order[b];
                if (s == b) continue;
                for (int64_t h = 0; h < H; h++) {
                    const char *from = slot[s] >= 0 ? scratch + (slot[s] * H + h) * span : caches[c] + s * sb + h * sh;
                    memcpy(caches[c] + b * sb + h * sh, from, (size_t)span);
                }
            }
        }
        free(scratch);
    }
    free(slot);
    return failed;
}

#define DEFINE_DECODER_STEP(NAME, T, EMBED, LAYER, LINEAR)                                            \
HOT int NAME(const decoder_step_args *a)                                                              \
{                                                                                                     \
    const int status = decoder_step_check(a);                                                         \
    if (status != AIAYN_OK || a->B == 0) return status;                                               \
    const int64_t B = a->B, D = a->D;                                                                 \
    T *x = malloc((size_t)(B * D) * sizeof(T));                                                       \
    if (!x) return AIAYN_NO_MEMORY;                                                                   \
    int failed = AIAYN_OK;                                                                            \
    STEP(EMBED(&(embed_args){.tokens = a->tokens, .table = a->table, .positions = a->positions, .out = x, \
                        .rows = B, .length = 1, .vocab = a->vocab, .n = D, .scale = a->scale}));     \
    if (a->order) STEP(step_reorder(a, sizeof(T)));                                                   \
    for (int64_t l = 0; l < a->n_layers; l++) {                                                       \
        const decoder_layer_args layer = step_layer(a, l, x);                                         \
        STEP(LAYER(&layer));                                                                          \
    }                                                                                                 \
    if (a->out_w)                                                                                     \
        STEP(LINEAR(&(linear_args){.x = x, .w = a->out_w, .bias = a->out_b, .out = a->logits, .rows = B, \
                              .n = a->V, .k = D, .xs = D, .os = a->V}));                               \
    else                                                                                              \
        memcpy(a->logits, x, (size_t)(B * D) * sizeof(T));                                            \
done:                                                                                                 \
    free(x);                                                                                          \
    return failed;                                                                                    \
}

DEFINE_DECODER_STEP(decoder_step_f32, float, embed_f32, decoder_layer_f32, linear_f32)
DEFINE_DECODER_STEP(decoder_step_bf16, bf16, embed_bf16, decoder_layer_bf16, linear_bf16)
DEFINE_DECODER_STEP(decoder_step_f32_i8, float, embed_f32, decoder_layer_f32_i8, linear_f32_i8)

/* ------------------------------------------------------------------ one sentence's beam search
 * aiayn.decode.beam.search for one sentence, every step in C: the decoding step (decoder_step's, for
 * k rows of caches), the k best candidates (beam's), hypotheses ending with EOS, the beams reordered.
 * The same rules, so the same hypotheses, as the Python loop (its reference): the first step decodes
 * BOS in all k rows (identical rows; the Python loop runs one) and takes the 2k best of the first;
 * EOS among a step's k best candidates ends a hypothesis (its score divided by penalties[step]); the
 * k best that do not end go on (then, if fewer, the best that did, as the Python loop's ranks do);
 * the search ends with k finished hypotheses, no live beam, or after step max_len, where only EOS
 * may follow. Never a token of `forbid`, nor EOS before step min_len (unless at max_len). The point
 * is the ~200 us a step of Python between the kernels at one sentence (beam 4, small model: more
 * than a third of its time). An error of the step (a token outside the embeddings) is returned as
 * is, with the caches partly written: the caller searches again from a new cache. Arguments:
 * search_args (abi.h). */
#define DEFINE_SEARCH(NAME, T, STEP_FN, BEAM_FN)                                                      \
HOT int NAME(search_args *a)                                                                          \
{                                                                                                     \
    AIAYN_REQUIRE(a->step && a->positions && a->penalties && a->out_tokens && a->out_scores          \
                  && a->out_lengths && (a->forbid || a->n_forbid == 0), AIAYN_NULL_POINTER);          \
    AIAYN_REQUIRE(a->step->out_w, AIAYN_NULL_POINTER);  /* (its step makes logits) */                 \
    const int64_t k = a->k, L = a->max_len + 1, V = a->step->V, D = a->step->D, eos = a->eos;        \
    AIAYN_REQUIRE(k >= 1 && a->max_len >= 0 && a->min_len >= 0 && a->n_forbid >= 0                   \
                  && a->step->B == k, AIAYN_BAD_SIZE);                                                 \
    AIAYN_REQUIRE(eos >= 0 && eos < V && a->bos >= 0 && a->bos < a->step->vocab, AIAYN_BAD_INDEX);   \
    a->finished = a->steps = 0;                                                                       \
    const size_t n = (size_t)(2 * k);                                                                 \
    char *scratch = malloc((size_t)(k * V) * sizeof(T) + n * (sizeof(float) + 2 * sizeof(int64_t))   \
                           + (size_t)k * (sizeof(float) + 3 * sizeof(int64_t))                        \
                           + (size_t)(2 * k * L) * sizeof(int64_t));                                   \
    if (!scratch) return AIAYN_NO_MEMORY;                                                             \
    int64_t *cand_tokens = (int64_t *)scratch, *cand_beams = cand_tokens + n;  /* (the widest first) */ \
    int64_t *last = cand_beams + n, *order = last + k, *pick = order + k;                             \
    int64_t *hyps = pick + k, *next = hyps + k * L;  /* (k, L) each: each beam's tokens so far */    \
    float *cand_scores = (float *)(next + k * L), *scores = cand_scores + n;                          \
    T *logits = (T *)(scores + k);                                                                    \
    for (int64_t j = 0; j < k; j++) { last[j] = a->bos; scores[j] = 0.f; }                            \
    int64_t n_finished = 0;                                                                           \
    int failed = AIAYN_OK;                                                                            \
    for (int64_t t = 0; t < L; t++) {                                                                 \
        decoder_step_args step = *a->step;                                                            \
        step.tokens = last; step.positions = (const T *)a->positions + t * D; step.logits = logits;   \
        step.t = t; step.order = t > 1 ? order : NULL;  /* (after the first step all rows are alike) */ \
        if ((failed = STEP_FN(&step)) != AIAYN_OK) break;                                             \
        a->steps = t + 1;                                                                             \
        const uint8_t at_limit = t == a->max_len;                                                     \
        int64_t unsettled = 0;                                                                        \
        const beam_args beam = {.x = logits, .scores = scores, .forbid = a->forbid, .at_limit = &at_limit, \
                                .out_scores = cand_scores, .out_tokens = cand_tokens, .out_beams = cand_beams, \
                                .unsettled = &unsettled, .sentences = 1, .r = t == 0 ? 1 : k, .V = V, .xs = V, \
                                .n = (int64_t)n, .n_forbid = a->n_forbid, .eos = eos,                 \
                                .eos_banned = t < a->min_len, .keep = k};                              \
        if ((failed = BEAM_FN(&beam)) != AIAYN_OK) break;                                             \
        for (int64_t c = 0; c < k; c++)  /* EOS among the k best ends a hypothesis */                 \
            if (cand_tokens[c] == eos && cand_scores[c] > -INFINITY) {                                \
                if (a->finished < k) {                                                                \
                    const int64_t f = a->finished++;                                                  \
                    memcpy(a->out_tokens + f * L, hyps + cand_beams[c] * L, (size_t)t * sizeof(int64_t)); \
                    a->out_lengths[f] = t;                                                            \
                    a->out_scores[f] = cand_scores[c] / a->penalties[t];                              \
                }                                                                                     \
                n_finished++;                                                                         \
            }                                                                                         \
        int64_t picked = 0;  /* the k best that do not end, then (if fewer) the best that did */      \
        for (int64_t c = 0; c < (int64_t)n && picked < k; c++) if (cand_tokens[c] != eos) pick[picked++] = c; \
        for (int64_t c = 0; c < (int64_t)n && picked < k; c++) if (cand_tokens[c] == eos) pick[picked++] = c; \
        if (n_finished >= k || cand_scores[pick[0]] == -INFINITY || at_limit) break;                  \
        for (int64_t j = 0; j < k; j++) {                                                             \
            const int64_t c = pick[j];                                                                \
            order[j] = cand_beams[c]; last[j] = cand_tokens[c]; scores[j] = cand_scores[c];           \
            memcpy(next + j * L, hyps + order[j] * L, (size_t)t * sizeof(int64_t));                   \
            next[j * L + t] = last[j];                                                                \
        }                                                                                             \
        int64_t *swap = hyps; hyps = next; next = swap;                                               \
    }                                                                                                 \
    free(scratch);                                                                                    \
    return failed;                                                                                    \
}

DEFINE_SEARCH(search_f32, float, decoder_step_f32, beam_f32)
DEFINE_SEARCH(search_bf16, bf16, decoder_step_bf16, beam_bf16)
DEFINE_SEARCH(search_f32_i8, float, decoder_step_f32_i8, beam_f32)

/* ------------------------------------------------------------------ one sentence's greedy search
 * aiayn.decode.greedy for one sentence, every step in C: the decoding step (decoder_step's, one row),
 * then the best token (argmax's: never one of `forbid`, nor EOS before min_len tokens), until EOS or
 * max_len tokens. The same kernels in the same order as the Python loop, so the same tokens, without
 * its Python between them. An error of the step (a token outside the embeddings) is returned as is,
 * the cache partly written: the caller decodes again from a new cache. Arguments: greedy_args (abi.h). */
#define DEFINE_GREEDY(NAME, T, STEP_FN, ARGMAX_FN)                                                    \
HOT int NAME(greedy_args *a)                                                                          \
{                                                                                                     \
    AIAYN_REQUIRE(a->step && a->positions && a->out_tokens && (a->forbid || a->n_forbid == 0),        \
                  AIAYN_NULL_POINTER);                                                                \
    AIAYN_REQUIRE(a->step->out_w, AIAYN_NULL_POINTER);  /* (its step makes logits) */                 \
    const int64_t V = a->step->V, D = a->step->D, eos = a->eos, n_forbid = a->n_forbid;              \
    AIAYN_REQUIRE(a->max_len >= 0 && a->min_len >= 0 && n_forbid >= 0 && a->step->B == 1, AIAYN_BAD_SIZE); \
    AIAYN_REQUIRE(eos >= 0 && eos < V && a->bos >= 0 && a->bos < a->step->vocab, AIAYN_BAD_INDEX);   \
    a->length = 0;                                                                                    \
    int64_t *banned = malloc((size_t)(n_forbid + 1) * sizeof(int64_t) + (size_t)V * sizeof(T));      \
    if (!banned) return AIAYN_NO_MEMORY;                                                              \
    T *logits = (T *)(banned + n_forbid + 1);  /* banned: forbid, then EOS (banned before min_len) */ \
    memcpy(banned, a->forbid, (size_t)n_forbid * sizeof(int64_t));                                    \
    banned[n_forbid] = eos;                                                                           \
    int64_t last = a->bos;                                                                            \
    int failed = AIAYN_OK;                                                                            \
    for (int64_t t = 0; t < a->max_len; t++) {                                                        \
        decoder_step_args step = *a->step;                                                            \
        step.tokens = &last; step.positions = (const T *)a->positions + t * D; step.logits = logits;  \
        step.t = t; step.order = NULL;                                                                \
        if ((failed = STEP_FN(&step)) != AIAYN_OK) break;                                             \
        argmax_args best = {.x = logits, .banned = banned, .out = &last, .rows = 1, .n = V, .xs = V,  \
                            .n_banned = n_forbid + (t < a->min_len)};                                 \
        if ((failed = ARGMAX_FN(&best)) != AIAYN_OK || last == eos) break;                            \
        a->out_tokens[a->length++] = last;                                                            \
    }                                                                                                 \
    free(banned);                                                                                     \
    return failed;                                                                                    \
}

DEFINE_GREEDY(greedy_f32, float, decoder_step_f32, argmax_f32)
DEFINE_GREEDY(greedy_bf16, bf16, decoder_step_bf16, argmax_bf16)
DEFINE_GREEDY(greedy_f32_i8, float, decoder_step_f32_i8, argmax_f32)
