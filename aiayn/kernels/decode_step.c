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
 *
 * Each comes for fp32 and bf16 tensors (`_f32`, `_bf16`, one type for all of a call's tensors);
 * arithmetic is fp32. Plain C with GCC/Clang vector extensions, built for the machine it runs on.
 *
 * Attention, for every row b, head h and query i < n_queries:
 *     out[b, i, h, :] = softmax(scale * k[b / group, h, :t, :] q[b, h, i, :] + mask) v[b / group, h, :t, :]
 * where mask[b / group, s] == 0 excludes key s (a row with every key excluded gets zeros, as
 * PyTorch's scaled_dot_product_attention gives). `group` consecutive rows share one source (beam
 * search's beams of a sentence). A self-attention step first appends its own key and value: with
 * k_new != NULL, k_new[b, h, :] and v_new[b, h, :] are written at position t - 1 of k and v (group 1).
 * Why: PyTorch's fused attention, for one query, runs two tiny GEMMs per (row, head) and reads
 * keys and values with little memory-level parallelism: 200-300 us for 64 rows x 4 heads x 20 keys
 * in a decoding step, where reading them takes ~30-100 us. Here each (row, head) is two streaming
 * passes (scores, then weighted values), and the next (row, head)'s keys and values are fetched
 * while this one computes.
 */
#include "common.h"

enum { MAX_KEYS = 4096, MAX_HEAD_DIM = 1024, MAX_ROW = 16384 };  /* the Python side checks them */

/* One (row, head, query). `dh` is a constant where the caller inlines it for a common head size
 * (a multiple of 16: the vector path, its loops unrolled into registers); any other size takes the
 * scalar path. */
#define DEFINE_ONE(NAME, T, LOAD, LOAD16, STORE)                                   \
static inline __attribute__((always_inline)) void NAME(                                             \
        const T *qi, const T *kb, const T *vb, const uint8_t *m, T *o,   int64_t t, int64_t dh,    \
        int64_t ks_t, int64_t vs_t, float scale, float *scores, float *query, float *acc)            \
{                                                                                                     \
    for (int64_t j = 0; j < dh; j++) query[j] = LOAD(qi[j]) * scale;                                \
    const int vector = dh % 16 == 0 && dh <= 256;                                                     \
    f32x16 qv[16], av[16];                                                                            \
    if (vector) for (int64_t c = 0; c < dh / 16; c++) qv[c] = load16_f32(query + 16 * c);             \
    float top = -INFINITY;                                                                            \
    for (int64_t s = 0; s < t; s++) {                                                                 \
        const T *ks = kb + s * ks_t;                                                                 \
        float d = 0.f;                                                                                \
        if (vector) {                                                                                 \
            f32x16 even = qv[0] * LOAD16(ks), odd = {0};  /* two chains of FMAs */                 \
            for (int64_t c = 1; c < dh / 16; c++) {                                                   \
                if (c & 1) odd += qv[c] * LOAD16(ks + 16 * c);                                     \
                else even += qv[c] * LOAD16(ks + 16 * c);                                          \
            }                                                                                         \
            d = sum16(even + odd);                                                                    \
        } else {                                                                                      \
            for (int64_t j = 0; j < dh; j++) d += query[j] * LOAD(ks[j]);                          \
        }                                                                                             \
        if (m && !m[s]) d = -INFINITY;                                                                \
        scores[s] = d;                                                                                \
        top = d > top ? d : top;                                                                      \
    }                                                                                                 \
    if (top == -INFINITY) {  /* nothing to attend to */                                               \
        for (int64_t j = 0; j < dh; j++) STORE(o + j, 0.f);                                           \
        return;                                                                                       \
    }                                                                                                 \
    float total = 0.f;                                                                                \
    _Pragma("omp simd reduction(+:total)")                                                            \
    for (int64_t s = 0; s < t; s++) { scores[s] = exp_nonpositive(scores[s] - top); total += scores[s]; } \
    const float inv = 1.f / total;                                                                    \
    if (vector) {                                                                                     \
        for (int64_t c = 0; c < dh / 16; c++) av[c] = (f32x16){0};                                    \
        for (int64_t s = 0; s < t; s++) {                                                             \
            const T *vs = vb + s * vs_t;                                                             \
            const float p = scores[s] * inv;                                                          \
            for (int64_t c = 0; c < dh / 16; c++) av[c] += p * LOAD16(vs + 16 * c);                \
        }                                                                                             \
        for (int64_t c = 0; c < dh / 16; c++) memcpy(acc + 16 * c, &av[c], 64);                       \
    } else {                                                                                          \
        for (int64_t j = 0; j < dh; j++) acc[j] = 0.f;                                                \
        for (int64_t s = 0; s < t; s++) {                                                             \
            const T *vs = vb + s * vs_t;                                                             \
            const float p = scores[s] * inv;                                                          \
            for (int64_t j = 0; j < dh; j++) acc[j] += p * LOAD(vs[j]);                            \
        }                                                                                             \
    }                                                                                                 \
    for (int64_t j = 0; j < dh; j++) STORE(o + j, acc[j]);                                            \
}

/* Arguments come as one array of int64 (ctypes converts each argument of a call separately, ~1 us
 * apiece): addresses q, k, v, mask, out, k_new, v_new, then B, H, n_queries, t, Dh, group, and the
 * strides, in elements: q (row, head, query), k and v (row, head, position), mask (row), out (row,
 * query, head), k_new and v_new (row, head). q is (B, H, n_queries, Dh), k and v (B / group, H, >= t,
 * Dh), mask (B / group, t) bytes or NULL, out (B, n_queries, H, Dh), k_new and v_new (B, H, Dh) or
 * NULL, each with its last dimension contiguous. */
#define DEFINE_ATTEND(NAME, ONE, T)                                                                   \
void NAME(const int64_t *a, float scale)                                                              \
{                                                                                                     \
    const T *q = PTR(const T, a[0]); T *k = PTR(T, a[1]), *v = PTR(T, a[2]);                          \
    const uint8_t *mask = PTR(const uint8_t, a[3]); T *out = PTR(T, a[4]);                            \
    const T *k_new = PTR(const T, a[5]), *v_new = PTR(const T, a[6]);                                 \
    const int64_t B = a[7], H = a[8], n_queries = a[9], t = a[10], dh = a[11], group = a[12];         \
    const int64_t qs_b = a[13], qs_h = a[14], qs_i = a[15], ks_b = a[16], ks_h = a[17], ks_t = a[18]; \
    const int64_t vs_b = a[19], vs_h = a[20], vs_t = a[21], ms_b = a[22];                             \
    const int64_t os_b = a[23], os_i = a[24], os_h = a[25], kn_b = a[26], kn_h = a[27];               \
    const int64_t vn_b = a[28], vn_h = a[29];                                                         \
    float scores[MAX_KEYS], query[MAX_HEAD_DIM], acc[MAX_HEAD_DIM];                                   \
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
}

DEFINE_ONE(one_f32, float, from_f32, load16_f32, to_f32)
DEFINE_ONE(one_bf16, bf16, from_bf16, load16_bf16, to_bf16)
DEFINE_ATTEND(attend_f32, one_f32, float)
DEFINE_ATTEND(attend_bf16, one_bf16, bf16)

/* ------------------------------------------------------------------ the rest of a decoding step
 * out[r] = LayerNorm(x[r] + y[r]) * weight + bias for rows of n: the post-norm residual of §3.1 in
 * one pass (PyTorch: an add, then layer_norm), statistics in fp32 as PyTorch computes them. */
#define DEFINE_ADD_NORM(NAME, T, LOAD, STORE)                                                         \
void NAME(const int64_t *a, float eps)  /* x, y, weight, bias, out, rows, n, row strides of x, y, out */ \
{                                                                                                     \
    const T *x = PTR(const T, a[0]), *y = PTR(const T, a[1]);                                         \
    const T *weight = PTR(const T, a[2]), *bias = PTR(const T, a[3]); T *out = PTR(T, a[4]);          \
    const int64_t rows = a[5], n = a[6], xs = a[7], ys = a[8], os = a[9];                             \
    float sum_row[MAX_ROW];                                                                           \
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
}

DEFINE_ADD_NORM(add_norm_f32, float, from_f32, to_f32)
DEFINE_ADD_NORM(add_norm_bf16, bf16, from_bf16, to_bf16)

/* Greedy search's next tokens: out[r] = the first index of row r's maximum, never one of the
 * n_banned ids in `banned` (padding; EOS before a minimum length). PyTorch's argmax over (64, 8000)
 * rows takes ~290 us on one core, this ~40. With record != NULL, it also writes the token at
 * record[rows_of[r] * record_stride + column] (the sentence's output) and returns how many rows are
 * done: their token is `eos` or their output reached limits[r] tokens with this one (step_len).
 * Arguments: x, rows, n, row stride of x, banned, n_banned, out, record, record_stride, rows_of,
 * column, eos, limits, step_len, record's rows. */
#define DEFINE_ARGMAX(NAME, T, LOAD)                                                                  \
int64_t NAME(const int64_t *a)                                                                        \
{                                                                                                     \
    const T *x = PTR(const T, a[0]); const int64_t rows = a[1], n = a[2], xs = a[3];                  \
    const int64_t *banned = PTR(const int64_t, a[4]), n_banned = a[5]; int64_t *out = PTR(int64_t, a[6]); \
    int64_t *record = PTR(int64_t, a[7]); const int64_t record_stride = a[8];                         \
    const int64_t *rows_of = PTR(const int64_t, a[9]), column = a[10], eos = a[11];                   \
    const int64_t *limits = PTR(const int64_t, a[12]), step_len = a[13], record_rows = a[14];         \
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
                        if (!skip) { best = v; at = j; }                                              \
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
    return done;                                                                                      \
}

DEFINE_ARGMAX(argmax_f32, float, from_f32)
DEFINE_ARGMAX(argmax_bf16, bf16, from_bf16)

/* out[r] = table[tokens[r]] * scale + positions[r % length]: token embeddings and their positions
 * (§3.4, §3.5) for rows of n, one call (PyTorch: lookup, scale, slice, add). Returns -1, having
 * written nothing, if a token is outside [0, vocab). Arguments: tokens, rows, length, table, vocab,
 * positions (the rows of this call's positions, contiguous), out, n. */
#define DEFINE_EMBED(NAME, T, LOAD, STORE)                                                            \
int64_t NAME(const int64_t *a, float scale)                                                           \
{                                                                                                     \
    const int64_t *tokens = PTR(const int64_t, a[0]); const int64_t rows = a[1], length = a[2];       \
    const T *table = PTR(const T, a[3]); const int64_t vocab = a[4];                                  \
    const T *positions = PTR(const T, a[5]); T *out = PTR(T, a[6]); const int64_t n = a[7];           \
    for (int64_t r = 0; r < rows; r++)                                                                \
        if (tokens[r] < 0 || tokens[r] >= vocab) return -1;                                           \
    for (int64_t r = 0; r < rows; r++) {                                                              \
        const T *e = table + tokens[r] * n, *p = positions + (r % length) * n;                        \
        T *o = out + r * n;                                                                           \
        for (int64_t j = 0; j < n; j++) STORE(o + j, LOAD(e[j]) * scale + LOAD(p[j]));                \
    }                                                                                                 \
    return 0;                                                                                         \
}

DEFINE_EMBED(embed_f32, float, from_f32, to_f32)
DEFINE_EMBED(embed_bf16, bf16, from_bf16, to_bf16)

/* Beam search's candidates in one pass over the logits: for each sentence i (rows i*r .. i*r+r-1,
 * one per beam), the n best scores[row] + log_softmax(x[row])[token], best first, as (score, token,
 * beam). Tokens in `forbid` are never candidates, nor EOS where eos_banned (a minimum length); a
 * sentence with at_limit[i] set gets EOS only. The log-softmax is taken before these bans (they do
 * not renormalize). Slots beyond the finite candidates get -inf, token 0, beam 0 (dead beams).
 * Each row's 64-logit blocks are searched only where the block's best could enter the n best, so
 * the pass is mostly a maximum per block. Arguments: x, sentences, r, n_vocab, row stride of x,
 * scores (fp32, one per row), n, forbid, n_forbid, eos, eos_banned, at_limit (bytes per sentence or
 * NULL), out_scores (fp32), out_tokens, out_beams (sentences x n each). */
#define DEFINE_BEAM(NAME, T, LOAD)                                                                    \
void NAME(const int64_t *a)                                                                           \
{                                                                                                     \
    const T *x = PTR(const T, a[0]); const int64_t sentences = a[1], r = a[2], V = a[3], xs = a[4];   \
    const float *scores = PTR(const float, a[5]); const int64_t n = a[6];                             \
    const int64_t *forbid = PTR(const int64_t, a[7]), n_forbid = a[8], eos = a[9], eos_banned = a[10]; \
    const uint8_t *at_limit = PTR(const uint8_t, a[11]);                                              \
    float *out_scores = PTR(float, a[12]); int64_t *out_tokens = PTR(int64_t, a[13]);                 \
    int64_t *out_beams = PTR(int64_t, a[14]);                                                         \
    for (int64_t i = 0; i < sentences; i++) {                                                         \
        float *best = out_scores + i * n; int64_t *tok = out_tokens + i * n, *beam = out_beams + i * n; \
        for (int64_t c = 0; c < n; c++) { best[c] = -INFINITY; tok[c] = 0; beam[c] = 0; }            \
        const int only_eos = at_limit && at_limit[i];                                                 \
        for (int64_t b = 0; b < r; b++) {                                                             \
            const T *row = x + (i * r + b) * xs;                                                      \
            const float base = scores[i * r + b];                                                     \
            float top = -INFINITY, total = 0.f;                                                       \
            _Pragma("omp simd reduction(max:top)")                                                    \
            for (int64_t j = 0; j < V; j++) top = LOAD(row[j]) > top ? LOAD(row[j]) : top;            \
            if (top == -INFINITY || base == -INFINITY) continue;  /* no live candidate here */        \
            _Pragma("omp simd reduction(+:total)")                                                    \
            for (int64_t j = 0; j < V; j++) total += exp_nonpositive(LOAD(row[j]) - top);             \
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
    }                                                                                                 \
}

DEFINE_BEAM(beam_f32, float, from_f32)
DEFINE_BEAM(beam_bf16, bf16, from_bf16)
