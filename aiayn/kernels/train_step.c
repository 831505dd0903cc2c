/* Kernels for a training step on a CPU (aiayn/kernels/__init__.py calls them and names each one's
 * PyTorch reference; tests/model/test_train_kernels.py holds them to it):
 *
 *   attention_forward_*, attention_backward_*        multi-head attention (below)
 *   dropout_mask_*                                   dropout's scaled mask
 *   residual_norm_forward_*, residual_norm_backward_*  LayerNorm(x + dropout(y)), the post-norm residual
 *   cross_entropy_*                                  label-smoothed cross-entropy and its gradient
 *
 * Attention: the forward and backward passes of multi-head attention (§3.2),
 *
 *     out[b, t, h] = softmax_s(scale * q[b, t, h] . k[b, s, h] + mask[b, t, s]) v[b, s, h]
 *
 * where q[b, t, h] is the h-th slice of dh values of query t of row (sentence) b; k and v likewise.
 * mask[b, t, s] == 0 excludes key s (-inf before the softmax); a query with every key excluded gets
 * zeros, and passes no gradient, as PyTorch's scaled_dot_product_attention does.
 *
 * Why: PyTorch runs this as ~15 operators per layer (head transposes that copy, two batched GEMMs of
 * (T x 64)(64 x S) that run far below the matrix units' peak at Multi30k's lengths, a mask bias, the
 * softmax, and backward their gradients and a concatenation into the fused projection's gradient):
 * ~10% of a base model's training step. Here each (row, head) is converted once into fp32 rows that
 * stay in L1, and everything else happens there; the results are written straight into the layouts
 * the projections use (out (B, T, D) with heads merged; dq, dk, dv into the fused projection's
 * gradient).
 *
 * Layouts, in elements, every last dimension contiguous: q[b, t, h] starts at q + b*qs_b + t*qs_t +
 * h*dh; k, v (over positions s), out, dout, dq, dk, dv likewise. mask: bytes at mask + b*ms_b +
 * t*ms_t + s (a stride 0 broadcasts), or NULL. probs: the softmax, (B, H, T, S) fp32, written by
 * the forward pass, read by the backward pass. Work is split over (row, head) pairs between
 * `threads` threads: each pair's outputs are its own, so no two threads write one place.
 */
#include <pthread.h>
#include <stdlib.h>

#include "common.h"

#define INLINE static inline __attribute__((always_inline))
typedef float f32;  /* the entry points' suffixes: _f32, _bf16 */

/* ------------------------------------------------------------------------ threads and scratch
 * Built with -fopenmp, the parts run on an OpenMP team: with PyTorch's wheels that is PyTorch's own
 * pool (the library needs libgomp.so.1 by name, and the loader hands it the copy torch has already
 * loaded), whose threads are awake right after PyTorch's last parallel operator. Without OpenMP,
 * POSIX threads are started for each call. */
typedef void (*part_fn)(const void *args, int64_t lo, int64_t hi, float *scratch, int64_t index);
typedef struct { part_fn fn; const void *args; int64_t lo, hi; float *scratch; int64_t index; } part;

static void *run_part(void *p) {
    part *w = p;
    w->fn(w->args, w->lo, w->hi, w->scratch, w->index);
    return NULL;
}

/* fn over [0, n) in `threads` contiguous parts (index 0, 1, ... in order), each with `floats` of
 * scratch. AIAYN_NO_MEMORY, having run nothing, if the scratch cannot be allocated. */
static int parallel(part_fn fn, const void *args, int64_t n, int64_t threads, int64_t floats) {
    enum { MAX_THREADS = 256 };
    threads = threads < 1 ? 1 : threads > MAX_THREADS ? MAX_THREADS : threads;
    if (threads > n) threads = n > 0 ? n : 1;
    float *scratch = malloc(sizeof(float) * (size_t)(floats * threads + 16));
    if (!scratch) return AIAYN_NO_MEMORY;
    part parts[MAX_THREADS];
    for (int64_t i = 0; i < threads; i++)
        parts[i] = (part){fn, args, n * i / threads, n * (i + 1) / threads, scratch + i * floats, i};
#ifdef _OPENMP
    #pragma omp parallel for num_threads(threads) schedule(static, 1)
    for (int64_t i = 0; i < threads; i++) run_part(&parts[i]);
#else
    pthread_t ids[MAX_THREADS];
    int started[MAX_THREADS];
    for (int64_t i = 1; i < threads; i++) started[i] = pthread_create(&ids[i], NULL, run_part, &parts[i]) == 0;
    run_part(&parts[0]);  /* the calling thread takes the first part */
    for (int64_t i = 1; i < threads; i++) {
        if (started[i]) pthread_join(ids[i], NULL);
        else run_part(&parts[i]);  /* no thread to be had: this one does it */
    }
#endif
    free(scratch);
    return AIAYN_OK;
}

/* ---------------------------------------------------------------- one (row, head), on fp32 rows */
INLINE float dot(const float *x, const float *y, int64_t n) {
    f32x16 even = {0}, odd = {0};  /* two chains of FMAs */
    int64_t j = 0;
    for (; j + 32 <= n; j += 32) {
        even += load16_f32(x + j) * load16_f32(y + j);
        odd += load16_f32(x + j + 16) * load16_f32(y + j + 16);
    }
    for (; j + 16 <= n; j += 16) even += load16_f32(x + j) * load16_f32(y + j);
    float d = sum16(even + odd);
    for (; j < n; j++) d += x[j] * y[j];
    return d;
}

enum { MAX_CHUNKS = 8 };  /* head sizes up to 8 x 16 take the vector paths */

/* out[s] = x . rows[s] for n <= 16 rows of dh: one vector of partial sums per row, then the 16
 * vectors folded into one whose lane s is row s's total (a transposing tree of 15 folds, each two
 * shuffles and an add, where a horizontal sum per row takes ~8 operations of its own). */
#if defined(__has_builtin)
#if __has_builtin(__builtin_shufflevector)
#define HAVE_SHUFFLE 1
#endif
#endif
#ifdef HAVE_SHUFFLE
#define FOLD(a, b, ...) (__builtin_shufflevector(a, b, __VA_ARGS__))
INLINE f32x16 fold8(f32x16 a, f32x16 b) {  /* [a's 8 pair sums, b's] */
    return FOLD(a, b, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23)
         + FOLD(a, b, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
}
INLINE f32x16 fold4(f32x16 a, f32x16 b) {  /* 8-lane halves -> 4-lane quarters */
    return FOLD(a, b, 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27)
         + FOLD(a, b, 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
}
INLINE f32x16 fold2(f32x16 a, f32x16 b) {
    return FOLD(a, b, 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29)
         + FOLD(a, b, 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
}
INLINE f32x16 fold1(f32x16 a, f32x16 b) {
    return FOLD(a, b, 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30)
         + FOLD(a, b, 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
}

/* Four rows' dot products with x, 4 partial sums a row: [r0 x4, r1 x4, r2 x4, r3 x4]. Straight-line
 * code, so that the accumulators stay in registers. */
INLINE f32x16 dots4(const float *x, const float *r0, const float *r1, const float *r2, const float *r3, int64_t dh) {
    f32x16 a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
    for (int64_t c = 0; c < dh; c += 16) {
        const f32x16 xc = load16_f32(x + c);
        a0 += xc * load16_f32(r0 + c);
        a1 += xc * load16_f32(r1 + c);
        a2 += xc * load16_f32(r2 + c);
        a3 += xc * load16_f32(r3 + c);
    }
    return fold4(fold8(a0, a1), fold8(a2, a3));
}
#endif

INLINE void dots16(const float *x, const float *rows, int64_t n, int64_t dh, float *out) {
#ifdef HAVE_SHUFFLE
    if (dh % 16 == 0) {
        const float *r[16];  /* rows past n repeat row 0: computed, never written out */
        for (int64_t s = 0; s < 16; s++) r[s] = rows + (s < n ? s : 0) * dh;
        const f32x16 q0 = dots4(x, r[0], r[1], r[2], r[3], dh), q1 = dots4(x, r[4], r[5], r[6], r[7], dh);
        const f32x16 q2 = dots4(x, r[8], r[9], r[10], r[11], dh), q3 = dots4(x, r[12], r[13], r[14], r[15], dh);
        float lanes[16];
        store16_f32(lanes, fold1(fold2(q0, q1), fold2(q2, q3)));
        for (int64_t s = 0; s < n; s++) out[s] = lanes[s];
        return;
    }
#endif
    for (int64_t s = 0; s < n; s++) out[s] = dot(x, rows + s * dh, dh);
}

/* out[0:dh] = scale * sum_i w[i * ws] rows[i, 0:dh] for rows (n x dh), skipping zero weights (masked
 * keys): the sum stays in registers, the rows stream through. */
INLINE void weighted_sum(float *out, const float *w, int64_t ws, const float *rows, int64_t n, int64_t dh,
                         float scale) {
    if (dh % 16 == 0 && dh <= 16 * MAX_CHUNKS) {
        f32x16 acc[MAX_CHUNKS];
        for (int64_t c = 0; c < dh / 16; c++) acc[c] = (f32x16){0};
        for (int64_t i = 0; i < n; i++) {
            const float x = w[i * ws];
            if (x == 0.f) continue;
            for (int64_t c = 0; c < dh / 16; c++) acc[c] += x * load16_f32(rows + i * dh + 16 * c);
        }
        for (int64_t c = 0; c < dh / 16; c++) store16_f32(out + 16 * c, scale * acc[c]);
        return;
    }
    for (int64_t j = 0; j < dh; j++) out[j] = 0.f;
    for (int64_t i = 0; i < n; i++)
        for (int64_t j = 0; j < dh; j++) out[j] += w[i * ws] * rows[i * dh + j];
    for (int64_t j = 0; j < dh; j++) out[j] *= scale;
}

/* exp_nonpositive on 16 lanes (the compiler does not vectorize the scalar one's loop), 2^n from the
 * rounded float's bits as there (a conversion to integers is undefined for NaN). */
INLINE f32x16 exp16_nonpositive(f32x16 x) {
    const f32x16 zero = {0};
    const i32x16 low = x < -87.f;  /* all ones where exp(x) is 0 in fp32 (and for -inf) */
    const f32x16 xc = pick16(low, zero - 87.f, x);
    const f32x16 big = xc * 1.44269504f + 12583039.f, n = big - 12583039.f;
    const f32x16 r = xc - n * 0.693145752f - n * 1.42860677e-6f;
    const f32x16 p = 1.f + r * (1.f + r * (1.f / 2 + r * (1.f / 6 + r * (1.f / 24 + r * (1.f / 120
                     + r * (1.f / 720 + r * (1.f / 5040)))))));
    u32x16 two_n;
    memcpy(&two_n, &big, 64);
    two_n <<= 23;
    f32x16 scale;
    memcpy(&scale, &two_n, 64);
    return pick16(low, zero, p * scale);  /* NaN where x is: r and p are */
}

INLINE f32x16 max16v(f32x16 a, f32x16 b) { return pick16(a > b, a, b); }

INLINE float max16(f32x16 v) {
    f32x8 a, b; memcpy(&a, &v, 32); memcpy(&b, (char *)&v + 32, 32);
    for (int j = 0; j < 8; j++) a[j] = a[j] > b[j] ? a[j] : b[j];
    float m = a[0];
    for (int j = 1; j < 8; j++) m = a[j] > m ? a[j] : m;
    return m;
}

/* q (nt x dh, already scaled), k, v (ns x dh) -> out (nt x dh) and the softmax p (nt x ns);
 * e: nt rows of ns rounded up to 16 floats. In phases over all queries (scores, softmax, weighted
 * values), so that the processor works on several queries at once: one query's chain of dependent
 * steps is longer than its work. */
INLINE void forward_one(const float *q, const float *k, const float *v, const uint8_t *mask, int64_t ms_t,
                        float *out, float *p, float *e, int64_t nt, int64_t ns, int64_t dh) {
    const int64_t padded = (ns + 15) / 16 * 16;
    for (int64_t t = 0; t < nt; t++) {
        float *et = e + t * padded;
        for (int64_t s = 0; s < ns; s += 16) dots16(q + t * dh, k + s * dh, ns - s < 16 ? ns - s : 16, dh, et + s);
        const uint8_t *m = mask ? mask + t * ms_t : NULL;
        if (m)
            for (int64_t s = 0; s < ns; s++) et[s] = m[s] ? et[s] : -INFINITY;
        for (int64_t s = ns; s < padded; s++) et[s] = -INFINITY;
    }
    for (int64_t t = 0; t < nt; t++) {
        float *et = e + t * padded, *pt = p + t * ns;
        f32x16 top = load16_f32(et);
        for (int64_t s = 16; s < padded; s += 16) top = max16v(load16_f32(et + s), top);
        const float most = max16(top);
        if (most == -INFINITY) {  /* nothing to attend to: zeros, and no weights (NaN if a score is) */
            const float fill = any_nan(et, ns) ? NAN : 0.f;
            for (int64_t s = 0; s < padded; s++) et[s] = s < ns ? fill : 0.f;
            memcpy(pt, et, sizeof(float) * ns);
            continue;
        }
        f32x16 sum = {0};
        for (int64_t s = 0; s < padded; s += 16) {
            const f32x16 x = exp16_nonpositive(load16_f32(et + s) - most);
            sum += x;
            store16_f32(et + s, x);
        }
        const f32x16 inv = (f32x16){0} + 1.f / sum16(sum);
        for (int64_t s = 0; s < padded; s += 16) store16_f32(et + s, inv * load16_f32(et + s));
        memcpy(pt, et, sizeof(float) * ns);
    }
    for (int64_t t = 0; t < nt; t++) weighted_sum(out + t * dh, e + t * padded, 1, v, ns, dh, 1.f);
}

/* The gradients of one (row, head): with P the softmax and G = dout,
 *     dP = G vᵀ,   dS = P * (dP - rowsum(P * dP)) * scale,   dq = dS k,   dk = dSᵀ q,   dv = Pᵀ G
 * for q unscaled (nt x dh); dq (nt x dh), dk, dv (ns x dh) are written whole; ds: nt x ns floats. */
INLINE void backward_one(const float *q, const float *k, const float *v, const float *g, const float *p,
                         float *dq, float *dk, float *dv, float *ds, int64_t nt, int64_t ns, int64_t dh,
                         float scale) {
    for (int64_t t = 0; t < nt; t++)  /* phases over all queries, as in forward_one */
        for (int64_t s = 0; s < ns; s += 16) dots16(g + t * dh, v + s * dh, ns - s < 16 ? ns - s : 16, dh, ds + t * ns + s);
    for (int64_t t = 0; t < nt; t++) {
        const float *pt = p + t * ns;
        float *dst = ds + t * ns, rowdot = 0.f;
        _Pragma("omp simd reduction(+:rowdot)")
        for (int64_t s = 0; s < ns; s++) rowdot += pt[s] * dst[s];  /* masked keys: pt[s] = 0 */
        _Pragma("omp simd")
        for (int64_t s = 0; s < ns; s++) dst[s] = pt[s] * (dst[s] - rowdot) * scale;
    }
    for (int64_t t = 0; t < nt; t++) weighted_sum(dq + t * dh, ds + t * ns, 1, k, ns, dh, 1.f);
    for (int64_t s = 0; s < ns; s++) {
        weighted_sum(dk + s * dh, ds + s, ns, q, nt, dh, 1.f);
        weighted_sum(dv + s * dh, p + s, ns, g, nt, dh, 1.f);
    }
}

/* ------------------------------------------------------------------ the entry points, per type */
#define DEFINE_ROWS(T, LOAD, LOAD16, STORE, STORE16)                                                  \
INLINE void load_rows_##T(float *dst, const T *src, int64_t rows, int64_t stride, int64_t dh, float scale) { \
    for (int64_t r = 0; r < rows; r++) {                                                              \
        const T *x = src + r * stride; float *y = dst + r * dh; int64_t j = 0;                         \
        for (; j + 16 <= dh; j += 16) store16_f32(y + j, scale * LOAD16(x + j));                      \
        for (; j < dh; j++) y[j] = scale * LOAD(x[j]);                                                \
    }                                                                                                 \
}                                                                                                     \
INLINE void store_rows_##T(T *dst, const float *src, int64_t rows, int64_t stride, int64_t dh) {      \
    for (int64_t r = 0; r < rows; r++) {                                                              \
        T *y = dst + r * stride; const float *x = src + r * dh; int64_t j = 0;                         \
        for (; j + 16 <= dh; j += 16) STORE16(y + j, load16_f32(x + j));                              \
        for (; j < dh; j++) STORE(y + j, x[j]);                                                       \
    }                                                                                                 \
}

DEFINE_ROWS(f32, from_f32, load16_f32, to_f32, store16_f32)
DEFINE_ROWS(bf16, from_bf16, load16_bf16, to_bf16, store16_bf16)

/* The head size as a constant where it is a common one: the vector loops then unroll into registers. */
#define WITH_HEAD_SIZE(dh, CALL)                                                                      \
    switch (dh) {                                                                                     \
    case 64: CALL(64); break;                                                                         \
    case 32: CALL(32); break;                                                                         \
    case 128: CALL(128); break;                                                                       \
    default: CALL(dh);                                                                                \
    }

/* The checks both passes make: sizes within the limits (they bound the scratch), strides not
 * negative (a stride 0 broadcasts the mask). */
static int attention_check(int64_t B, int64_t H, int64_t T, int64_t S, int64_t dh, int64_t strides) {
    AIAYN_REQUIRE(B >= 0 && H >= 1 && T >= 1 && S >= 1 && dh >= 1, AIAYN_BAD_SIZE);
    AIAYN_REQUIRE(T <= AIAYN_MAX_KEYS && S <= AIAYN_MAX_KEYS && dh <= AIAYN_MAX_HEAD_DIM, AIAYN_OVER_LIMIT);
    AIAYN_REQUIRE(strides >= 0, AIAYN_BAD_STRIDE);  /* the strides' OR: negative if any is */
    return AIAYN_OK;
}

/* Forward arguments: attention_forward_args (abi.h). Scratch per thread: (2T + 2S) dh + T (S + 16) floats. */
#define DEFINE_FORWARD(T)                                                                             \
static void forward_part_##T(const void *args, int64_t lo, int64_t hi, float *scratch, int64_t index) { \
    (void)index;                                                                                      \
    const attention_forward_args *a = args;                                                           \
    const T *q = a->q, *k = a->k, *v = a->v;                                                          \
    const uint8_t *mask = a->mask; T *out = a->out; float *probs = a->probs;                          \
    const int64_t H = a->H, nt = a->nt, ns = a->ns, dh = a->dh;                                         \
    const int64_t qs_b = a->qs_b, qs_t = a->qs_t, ks_b = a->ks_b, ks_s = a->ks_s, vs_b = a->vs_b, vs_s = a->vs_s; \
    const int64_t ms_b = a->ms_b, ms_t = a->ms_t, os_b = a->os_b, os_t = a->os_t;                     \
    const float scale = a->scale;                                                                     \
    float *qf = scratch, *kf = qf + nt * dh, *vf = kf + ns * dh, *of = vf + ns * dh, *e = of + nt * dh; \
    for (int64_t i = lo; i < hi; i++) {                                                               \
        const int64_t b = i / H, h = i % H, nb = (i + 1) / H, nh = (i + 1) % H;                       \
        if (i + 1 < hi) {  /* the next pair's rows, while this one computes */                        \
            prefetch_rows(q + nb * qs_b + nh * dh, nt, qs_t * (int64_t)sizeof(T), dh * (int64_t)sizeof(T)); \
            prefetch_rows(k + nb * ks_b + nh * dh, ns, ks_s * (int64_t)sizeof(T), dh * (int64_t)sizeof(T)); \
            prefetch_rows(v + nb * vs_b + nh * dh, ns, vs_s * (int64_t)sizeof(T), dh * (int64_t)sizeof(T)); \
        }                                                                                             \
        load_rows_##T(qf, q + b * qs_b + h * dh, nt, qs_t, dh, scale);                                \
        load_rows_##T(kf, k + b * ks_b + h * dh, ns, ks_s, dh, 1.f);                                  \
        load_rows_##T(vf, v + b * vs_b + h * dh, ns, vs_s, dh, 1.f);                                  \
        const uint8_t *m = mask ? mask + b * ms_b : NULL;                                             \
        float *p = probs + i * nt * ns;                                                               \
        WITH_HEAD_SIZE(dh, FORWARD_ONE)                                                               \
        store_rows_##T(out + b * os_b + h * dh, of, nt, os_t, dh);                                    \
    }                                                                                                 \
}                                                                                                     \
int attention_forward_##T(const attention_forward_args *a) {                                         \
    AIAYN_REQUIRE(a->q && a->k && a->v && a->out && a->probs, AIAYN_NULL_POINTER);                    \
    const int status = attention_check(a->B, a->H, a->nt, a->ns, a->dh, a->qs_b | a->qs_t | a->ks_b     \
                                       | a->ks_s | a->vs_b | a->vs_s | a->ms_b | a->ms_t | a->os_b | a->os_t); \
    if (status != AIAYN_OK) return status;                                                            \
    const int64_t nt = a->nt, ns = a->ns, dh = a->dh;                                                   \
    return parallel(forward_part_##T, a, a->B * a->H, a->threads, (2 * nt + 2 * ns) * dh + nt * (ns + 16)); \
}
#define FORWARD_ONE(DH) forward_one(qf, kf, vf, m, ms_t, of, p, e, nt, ns, DH)

/* Backward arguments: attention_backward_args (abi.h). Scratch per thread: (3T + 4S) dh + TS floats. */
#define DEFINE_BACKWARD(T)                                                                            \
static void backward_part_##T(const void *args, int64_t lo, int64_t hi, float *scratch, int64_t index) { \
    (void)index;                                                                                      \
    const attention_backward_args *a = args;                                                          \
    const T *q = a->q, *k = a->k, *v = a->v, *dout = a->dout; const float *probs = a->probs;          \
    T *dq = a->dq, *dk = a->dk, *dv = a->dv;                                                          \
    const int64_t H = a->H, nt = a->nt, ns = a->ns, dh = a->dh;                                         \
    const int64_t qs_b = a->qs_b, qs_t = a->qs_t, ks_b = a->ks_b, ks_s = a->ks_s, vs_b = a->vs_b, vs_s = a->vs_s; \
    const int64_t gs_b = a->gs_b, gs_t = a->gs_t, dqs_b = a->dqs_b, dqs_t = a->dqs_t;                 \
    const int64_t dks_b = a->dks_b, dks_s = a->dks_s, dvs_b = a->dvs_b, dvs_s = a->dvs_s;             \
    const float scale = a->scale;                                                                     \
    float *qf = scratch, *kf = qf + nt * dh, *vf = kf + ns * dh, *gf = vf + ns * dh;                  \
    float *dqf = gf + nt * dh, *dkf = dqf + nt * dh, *dvf = dkf + ns * dh, *ds = dvf + ns * dh;        \
    for (int64_t i = lo; i < hi; i++) {                                                               \
        const int64_t b = i / H, h = i % H, nb = (i + 1) / H, nh = (i + 1) % H;                       \
        if (i + 1 < hi) {                                                                             \
            prefetch_rows(q + nb * qs_b + nh * dh, nt, qs_t * (int64_t)sizeof(T), dh * (int64_t)sizeof(T)); \
            prefetch_rows(k + nb * ks_b + nh * dh, ns, ks_s * (int64_t)sizeof(T), dh * (int64_t)sizeof(T)); \
            prefetch_rows(v + nb * vs_b + nh * dh, ns, vs_s * (int64_t)sizeof(T), dh * (int64_t)sizeof(T)); \
            prefetch_rows(dout + nb * gs_b + nh * dh, nt, gs_t * (int64_t)sizeof(T), dh * (int64_t)sizeof(T)); \
        }                                                                                             \
        load_rows_##T(qf, q + b * qs_b + h * dh, nt, qs_t, dh, 1.f);                                  \
        load_rows_##T(kf, k + b * ks_b + h * dh, ns, ks_s, dh, 1.f);                                  \
        load_rows_##T(vf, v + b * vs_b + h * dh, ns, vs_s, dh, 1.f);                                  \
        load_rows_##T(gf, dout + b * gs_b + h * dh, nt, gs_t, dh, 1.f);                               \
        const float *p = probs + i * nt * ns;                                                         \
        WITH_HEAD_SIZE(dh, BACKWARD_ONE)                                                              \
        store_rows_##T(dq + b * dqs_b + h * dh, dqf, nt, dqs_t, dh);                                  \
        store_rows_##T(dk + b * dks_b + h * dh, dkf, ns, dks_s, dh);                                  \
        store_rows_##T(dv + b * dvs_b + h * dh, dvf, ns, dvs_s, dh);                                  \
    }                                                                                                 \
}                                                                                                     \
int attention_backward_##T(const attention_backward_args *a) {                                       \
    AIAYN_REQUIRE(a->q && a->k && a->v && a->dout && a->probs && a->dq && a->dk && a->dv, AIAYN_NULL_POINTER); \
    const int status = attention_check(a->B, a->H, a->nt, a->ns, a->dh, a->qs_b | a->qs_t | a->ks_b     \
                                       | a->ks_s | a->vs_b | a->vs_s | a->gs_b | a->gs_t | a->dqs_b | a->dqs_t \
                                       | a->dks_b | a->dks_s | a->dvs_b | a->dvs_s);                  \
    if (status != AIAYN_OK) return status;                                                            \
    const int64_t nt = a->nt, ns = a->ns, dh = a->dh;                                                   \
    return parallel(backward_part_##T, a, a->B * a->H, a->threads, (3 * nt + 4 * ns) * dh + nt * ns); \
}
#define BACKWARD_ONE(DH) backward_one(qf, kf, vf, gf, p, dqf, dkf, dvf, ds, nt, ns, DH, scale)

DEFINE_FORWARD(f32)
DEFINE_FORWARD(bf16)
DEFINE_BACKWARD(f32)
DEFINE_BACKWARD(bf16)

/* ------------------------------------------------------------------------------ dropout's mask
 * mask[i] = scale where element i is kept, with probability 1 - threshold / 65536, else 0: each
 * 64-bit word of splitmix64 (Steele et al., 2014) at counter seed + w gives four 16-bit lanes,
 * lane i % 4 of word i / 4 deciding element i, so the mask depends on the seed alone, not on how the
 * work is split. PyTorch draws one random number per element on one thread (~50 ms of a base
 * model's bf16 step); this is a few multiplies per four elements, on every thread.
 * Arguments: dropout_mask_args (abi.h). */
INLINE uint64_t splitmix64(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

#define DEFINE_DROPOUT(T, STORE)                                                                      \
static void dropout_part_##T(const void *args, int64_t lo, int64_t hi, float *scratch, int64_t index) { \
    (void)scratch; (void)index;                                                                       \
    const dropout_mask_args *a = args;                                                                \
    T *mask = a->mask; const int64_t n = a->n; const uint64_t seed = (uint64_t)a->seed;               \
    const uint64_t threshold = (uint64_t)a->threshold; const float scale = a->scale;                  \
    T keep, drop;                                                                                     \
    STORE(&keep, scale); STORE(&drop, 0.f);                                                           \
    const int64_t full = n / 4 < hi ? n / 4 : hi;  /* words whose four elements all exist */         \
    _Pragma("omp simd")                                                                               \
    for (int64_t w = lo; w < full; w++) {                                                            \
        const uint64_t r = splitmix64(seed + (uint64_t)w * 0x9E3779B97F4A7C15ull);                    \
        for (int j = 0; j < 4; j++) mask[4 * w + j] = ((r >> (16 * j)) & 0xFFFF) >= threshold ? keep : drop; \
    }                                                                                                 \
    for (int64_t w = full > lo ? full : lo; w < hi; w++) {  /* the last, partial word */             \
        const uint64_t r = splitmix64(seed + (uint64_t)w * 0x9E3779B97F4A7C15ull);                    \
        for (int j = 0; j < 4 && 4 * w + j < n; j++)                                                  \
            mask[4 * w + j] = ((r >> (16 * j)) & 0xFFFF) >= threshold ? keep : drop;                  \
    }                                                                                                 \
}                                                                                                     \
int dropout_mask_##T(const dropout_mask_args *a) {                                                   \
    AIAYN_REQUIRE(a->mask || a->n == 0, AIAYN_NULL_POINTER);                                          \
    AIAYN_REQUIRE(a->n >= 0 && a->threshold >= 0 && a->threshold <= 65536, AIAYN_BAD_SIZE);           \
    return parallel(dropout_part_##T, a, (a->n + 3) / 4, a->threads, 0);                             \
}

DEFINE_DROPOUT(f32, to_f32)
DEFINE_DROPOUT(bf16, to_bf16)

/* ----------------------------------------------------------- the post-norm residual, training
 * Forward: z = x + y * mask (mask: dropout's scaled mask, or none), out = LayerNorm(z) w + b, z kept
 * (rounded to the tensors' type, as PyTorch's addcmul would leave it) with each row's mean and
 * 1 / std; backward from dout: with xhat = (z - mean) / std and g = dout w,
 *     dz = (g - mean(g) - xhat mean(g xhat)) / std,   dx = dz,   dy = dz mask,
 *     dw = sum over rows of dout xhat,   db = sum of dout,
 * the sums as one row of partial sums per part (`partial`: parts x 2n fp32, summed by the caller).
 * PyTorch: addcmul, layer_norm, its backward and a product, each a pass over the (rows, n) tensors.
 * Arguments: residual_norm_forward_args, residual_norm_backward_args (abi.h). y, mask and dy have
 * their own type (`_f32_bf16`: bf16 ones, the rest fp32, as under autocast). Scratch: a row of n floats. */
#define DEFINE_RESIDUAL_NORM(NAME, T, LOAD, STORE, Y, LOADY, STOREY)                                                          \
static void residual_norm_part_##NAME(const void *args, int64_t lo, int64_t hi, float *row, int64_t index) { \
    (void)index;                                                                                      \
    const residual_norm_forward_args *a = args;                                                       \
    const T *x = a->x; const Y *y = a->y, *mask = a->mask; const T *w = a->w, *b = a->b;              \
    T *out = a->out, *z = a->z; float *stats = a->stats; const int64_t n = a->n; const float eps = a->eps; \
    for (int64_t r = lo; r < hi; r++) {                                                               \
        const T *xr = x + r * n; const Y *yr = y + r * n, *mr = mask ? mask + r * n : NULL;             \
        T *zr = z + r * n, *o = out + r * n;                                                          \
        float mean = 0.f, var = 0.f;                                                                  \
        for (int64_t j = 0; j < n; j++) {                                                             \
            STORE(zr + j, LOAD(xr[j]) + LOADY(yr[j]) * (mr ? LOADY(mr[j]) : 1.f));                    \
            row[j] = LOAD(zr[j]);                                                                     \
        }                                                                                             \
        _Pragma("omp simd reduction(+:mean)")                                                         \
        for (int64_t j = 0; j < n; j++) mean += row[j];                                               \
        mean /= n;                                                                                    \
        _Pragma("omp simd reduction(+:var)")                                                          \
        for (int64_t j = 0; j < n; j++) { const float d = row[j] - mean; var += d * d; }              \
        const float rstd = 1.f / sqrtf(var / n + eps);                                                \
        for (int64_t j = 0; j < n; j++) STORE(o + j, (row[j] - mean) * rstd * LOAD(w[j]) + LOAD(b[j])); \
        stats[2 * r] = mean; stats[2 * r + 1] = rstd;                                                 \
    }                                                                                                 \
}                                                                                                     \
int residual_norm_forward_##NAME(const residual_norm_forward_args *a) {                                 \
    AIAYN_REQUIRE(a->x && a->y && a->w && a->b && a->out && a->z && a->stats, AIAYN_NULL_POINTER);       \
    AIAYN_REQUIRE(a->rows >= 0 && a->n >= 1, AIAYN_BAD_SIZE);                                            \
    return parallel(residual_norm_part_##NAME, a, a->rows, a->threads, a->n);                            \
}                                                                                                     \
static void residual_norm_back_part_##NAME(const void *args, int64_t lo, int64_t hi, float *row, int64_t index) { \
    const residual_norm_backward_args *a = args;                                                      \
    const T *dout = a->dout, *z = a->z; const Y *mask = a->mask;                                      \
    const T *w = a->w; const float *stats = a->stats;                                                 \
    T *dx = a->dx; Y *dy = a->dy; const int64_t n = a->n;                                             \
    float *dw = a->partial + index * 2 * n, *db = dw + n;                                             \
    for (int64_t r = lo; r < hi; r++) {                                                               \
        const T *gr = dout + r * n, *zr = z + r * n; const Y *mr = mask ? mask + r * n : NULL;         \
        const float mean = stats[2 * r], rstd = stats[2 * r + 1];                                     \
        float c1 = 0.f, c2 = 0.f;                                                                     \
        _Pragma("omp simd reduction(+:c1, c2)")                                                       \
        for (int64_t j = 0; j < n; j++) {                                                             \
            const float xhat = (LOAD(zr[j]) - mean) * rstd, d = LOAD(gr[j]);                          \
            const float g = d * LOAD(w[j]);                                                           \
            row[j] = g; c1 += g; c2 += g * xhat;                                                      \
            dw[j] += d * xhat; db[j] += d;                                                            \
        }                                                                                             \
        c1 /= n; c2 /= n;                                                                             \
        for (int64_t j = 0; j < n; j++) {                                                             \
            const float xhat = (LOAD(zr[j]) - mean) * rstd;                                           \
            const float dz = (row[j] - c1 - xhat * c2) * rstd;                                        \
            STORE(dx + r * n + j, dz);                                                                \
            STOREY(dy + r * n + j, mr ? dz * LOADY(mr[j]) : dz);                                      \
        }                                                                                             \
    }                                                                                                 \
}                                                                                                     \
int residual_norm_backward_##NAME(const residual_norm_backward_args *a) {                               \
    AIAYN_REQUIRE(a->dout && a->z && a->w && a->stats && a->dx && a->dy && a->partial, AIAYN_NULL_POINTER); \
    AIAYN_REQUIRE(a->rows >= 0 && a->n >= 1, AIAYN_BAD_SIZE);                                            \
    return parallel(residual_norm_back_part_##NAME, a, a->rows, a->threads, a->n);                       \
}

DEFINE_RESIDUAL_NORM(f32, f32, from_f32, to_f32, f32, from_f32, to_f32)
DEFINE_RESIDUAL_NORM(bf16, bf16, from_bf16, to_bf16, bf16, from_bf16, to_bf16)
DEFINE_RESIDUAL_NORM(f32_bf16, f32, from_f32, to_f32, bf16, from_bf16, to_bf16)  /* autocast: an fp32 stream, a bf16 sublayer */

/* --------------------------------------------------------- label-smoothed cross-entropy (§5.4)
 * For each row r of logits z (V columns) and its target t:
 *     loss[r] = logsumexp(z) - (1 - eps) z[t] - eps mean(z)
 *     grad[r] = scale * (softmax(z) - (1 - eps) onehot(t) - eps / V)       (if grad != NULL)
 * aiayn/train/loss.py's _LabelSmoothedCE is the reference (and the fallback); here each row is read
 * once into fp32 scratch that stays in the caches for its other passes, and rows are split between
 * threads. A row with a NaN logit gets a NaN loss and gradient, as in PyTorch. Arguments:
 * cross_entropy_args (abi.h). AIAYN_BAD_INDEX, having written nothing, if a target is outside [0, V). */
#define DEFINE_CROSS_ENTROPY(T, LOAD, LOAD16, STORE, STORE16)                                         \
static void cross_entropy_part_##T(const void *args, int64_t lo, int64_t hi, float *row, int64_t index) { \
    (void)index;                                                                                      \
    const cross_entropy_args *a = args;                                                               \
    const T *logits = a->logits; const int64_t stride = a->stride;                                    \
    const int64_t *target = a->target; float *losses = a->losses;                                     \
    T *grad = a->grad; const int64_t V = a->V;                                                        \
    const float eps = a->eps, scale = a->scale;                                                       \
    const int64_t body = V / 16 * 16;                                                                 \
    for (int64_t r = lo; r < hi; r++) {                                                               \
        const T *z = logits + r * stride;                                                             \
        const int64_t t = target[r];                                                                  \
        f32x16 sum = {0}, top = sum - INFINITY;                                                       \
        for (int64_t j = 0; j < body; j += 16) {                                                      \
            const f32x16 x = LOAD16(z + j);                                                           \
            store16_f32(row + j, x);                                                                  \
            sum += x;                                                                                 \
            top = max16v(x, top);                                                                     \
        }                                                                                             \
        float most = max16(top), total_z = sum16(sum);                                                \
        for (int64_t j = body; j < V; j++) {                                                          \
            row[j] = LOAD(z[j]); total_z += row[j]; most = row[j] > most ? row[j] : most;             \
        }                                                                                             \
        f32x16 esum = {0};                                                                            \
        for (int64_t j = 0; j < body; j += 16) {                                                      \
            const f32x16 e = exp16_nonpositive(load16_f32(row + j) - most);                           \
            store16_f32(row + j, e);                                                                  \
            esum += e;                                                                                \
        }                                                                                             \
        float total = sum16(esum);                                                                    \
        for (int64_t j = body; j < V; j++) { row[j] = exp_nonpositive(row[j] - most); total += row[j]; } \
        losses[r] = logf(total) + most - (1.f - eps) * LOAD(z[t]) - eps * total_z / V;               \
        if (!grad) continue;                                                                          \
        T *g = grad + r * V;                                                                          \
        const float p_scale = scale / total, shift = scale * eps / V;                                 \
        for (int64_t j = 0; j < body; j += 16) STORE16(g + j, p_scale * load16_f32(row + j) - shift); \
        for (int64_t j = body; j < V; j++) STORE(g + j, p_scale * row[j] - shift);                    \
        STORE(g + t, p_scale * row[t] - shift - scale * (1.f - eps));                                 \
    }                                                                                                 \
}                                                                                                     \
int cross_entropy_##T(const cross_entropy_args *a) {                                                  \
    AIAYN_REQUIRE(a->logits && a->target && a->losses, AIAYN_NULL_POINTER);                           \
    AIAYN_REQUIRE(a->rows >= 0 && a->V >= 1, AIAYN_BAD_SIZE);                                         \
    AIAYN_REQUIRE(a->stride >= a->V, AIAYN_BAD_STRIDE);                                               \
    for (int64_t r = 0; r < a->rows; r++)                                                             \
        AIAYN_REQUIRE(a->target[r] >= 0 && a->target[r] < a->V, AIAYN_BAD_INDEX);                     \
    return parallel(cross_entropy_part_##T, a, a->rows, a->threads, a->V);                            \
}

DEFINE_CROSS_ENTROPY(f32, from_f32, load16_f32, to_f32, store16_f32)
DEFINE_CROSS_ENTROPY(bf16, from_bf16, load16_bf16, to_bf16, store16_bf16)
