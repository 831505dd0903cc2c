/* Attention for training on a CPU: the forward and backward passes of multi-head attention (§3.2),
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
 * `threads` POSIX threads: each pair's outputs are its own, so no two threads write one place.
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
#ifdef _OPENMP
#include <omp.h>
#endif

typedef void (*part_fn)(const int64_t *a, float scale, int64_t lo, int64_t hi, float *scratch);
typedef struct { part_fn fn; const int64_t *a; float scale; int64_t lo, hi; float *scratch; } part;

static void *run_part(void *p) {
    part *w = p;
    w->fn(w->a, w->scale, w->lo, w->hi, w->scratch);
    return NULL;
}

/* fn over [0, n) in `threads` contiguous parts, each with `floats` of scratch. Returns -1, having
 * run nothing, if the scratch cannot be allocated. */
static int64_t parallel(part_fn fn, const int64_t *a, float scale, int64_t n, int64_t threads, int64_t floats) {
    enum { MAX_THREADS = 256 };
    threads = threads < 1 ? 1 : threads > MAX_THREADS ? MAX_THREADS : threads;
    if (threads > n) threads = n > 0 ? n : 1;
    float *scratch = malloc(sizeof(float) * (size_t)(floats * threads + 16));
    if (!scratch) return -1;
    part parts[MAX_THREADS];
    for (int64_t i = 0; i < threads; i++)
        parts[i] = (part){fn, a, scale, n * i / threads, n * (i + 1) / threads, scratch + i * floats};
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
    return 0;
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

/* exp_nonpositive on 16 lanes (the compiler does not vectorize the scalar one's loop). */
typedef int32_t i32x16 __attribute__((vector_size(64)));
INLINE f32x16 exp16_nonpositive(f32x16 x) {
    const i32x16 low = x < -87.f;  /* all ones where exp(x) is 0 in fp32 (and for -inf) */
    i32x16 bits;
    memcpy(&bits, &x, 64);
    const f32x16 floor = {-87.f, -87.f, -87.f, -87.f, -87.f, -87.f, -87.f, -87.f,
                          -87.f, -87.f, -87.f, -87.f, -87.f, -87.f, -87.f, -87.f};
    i32x16 floor_bits;
    memcpy(&floor_bits, &floor, 64);
    bits = (bits & ~low) | (floor_bits & low);
    f32x16 xc;
    memcpy(&xc, &bits, 64);
    const f32x16 n = (xc * 1.44269504f + 12582912.f) - 12582912.f;
    const f32x16 r = xc - n * 0.693145752f - n * 1.42860677e-6f;
    const f32x16 p = 1.f + r * (1.f + r * (1.f / 2 + r * (1.f / 6 + r * (1.f / 24 + r * (1.f / 120
                     + r * (1.f / 720 + r * (1.f / 5040)))))));
    i32x16 two_n = (__builtin_convertvector(n, i32x16) + 127) << 23;
    f32x16 scale;
    memcpy(&scale, &two_n, 64);
    f32x16 e = p * scale;
    memcpy(&bits, &e, 64);
    bits &= ~low;
    memcpy(&e, &bits, 64);
    return e;
}

/* q (nt x dh, already scaled), k, v (ns x dh) -> out (nt x dh) and the softmax p (nt x ns);
 * e: a row of ns rounded up to 16 floats. */
INLINE void forward_one(const float *q, const float *k, const float *v, const uint8_t *mask, int64_t ms_t,
                        float *out, float *p, float *e, int64_t nt, int64_t ns, int64_t dh) {
    const int64_t padded = (ns + 15) / 16 * 16;
    for (int64_t t = 0; t < nt; t++) {
        const uint8_t *m = mask ? mask + t * ms_t : NULL;
        float top = -INFINITY;
        for (int64_t s = 0; s < ns; s++) {
            e[s] = m && !m[s] ? -INFINITY : dot(q + t * dh, k + s * dh, dh);
            top = e[s] > top ? e[s] : top;
        }
        float *pt = p + t * ns;
        if (top == -INFINITY) {  /* nothing to attend to */
            memset(pt, 0, sizeof(float) * ns);
            memset(out + t * dh, 0, sizeof(float) * dh);
            continue;
        }
        for (int64_t s = ns; s < padded; s++) e[s] = -INFINITY;
        f32x16 sum = {0};
        for (int64_t s = 0; s < padded; s += 16) {
            const f32x16 x = exp16_nonpositive(load16_f32(e + s) - top);
            store16_f32(e + s, x);
            sum += x;
        }
        const float inv = 1.f / sum16(sum);
        for (int64_t s = 0; s < ns; s++) pt[s] = e[s] * inv;
        weighted_sum(out + t * dh, e, 1, v, ns, dh, inv);
    }
}

/* The gradients of one (row, head): with P the softmax and G = dout,
 *     dP = G vᵀ,   dS = P * (dP - rowsum(P * dP)) * scale,   dq = dS k,   dk = dSᵀ q,   dv = Pᵀ G
 * for q unscaled (nt x dh); dq (nt x dh), dk, dv (ns x dh) are written whole; ds: nt x ns floats. */
INLINE void backward_one(const float *q, const float *k, const float *v, const float *g, const float *p,
                         float *dq, float *dk, float *dv, float *ds, int64_t nt, int64_t ns, int64_t dh,
                         float scale) {
    for (int64_t t = 0; t < nt; t++) {
        const float *pt = p + t * ns;
        float *dst = ds + t * ns, rowdot = 0.f;
        for (int64_t s = 0; s < ns; s++) {
            dst[s] = pt[s] == 0.f ? 0.f : dot(g + t * dh, v + s * dh, dh);  /* masked: contributes nothing */
            rowdot += pt[s] * dst[s];
        }
        for (int64_t s = 0; s < ns; s++) dst[s] = pt[s] * (dst[s] - rowdot) * scale;
        weighted_sum(dq + t * dh, dst, 1, k, ns, dh, 1.f);
    }
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

/* Forward arguments: q, k, v, mask, out, probs, B, H, T, S, dh, then the strides q (b, t), k (b, s),
 * v (b, s), mask (b, t), out (b, t), then threads. Scratch per thread: (2T + 2S) dh + S + 16 floats. */
#define DEFINE_FORWARD(T)                                                                             \
static void forward_part_##T(const int64_t *a, float scale, int64_t lo, int64_t hi, float *scratch) { \
    const T *q = PTR(const T, a[0]), *k = PTR(const T, a[1]), *v = PTR(const T, a[2]);                \
    const uint8_t *mask = PTR(const uint8_t, a[3]); T *out = PTR(T, a[4]); float *probs = PTR(float, a[5]); \
    const int64_t H = a[7], nt = a[8], ns = a[9], dh = a[10];                                         \
    const int64_t qs_b = a[11], qs_t = a[12], ks_b = a[13], ks_s = a[14], vs_b = a[15], vs_s = a[16]; \
    const int64_t ms_b = a[17], ms_t = a[18], os_b = a[19], os_t = a[20];                             \
    float *qf = scratch, *kf = qf + nt * dh, *vf = kf + ns * dh, *of = vf + ns * dh, *e = of + nt * dh; \
    for (int64_t i = lo; i < hi; i++) {                                                               \
        const int64_t b = i / H, h = i % H;                                                           \
        load_rows_##T(qf, q + b * qs_b + h * dh, nt, qs_t, dh, scale);                                \
        load_rows_##T(kf, k + b * ks_b + h * dh, ns, ks_s, dh, 1.f);                                  \
        load_rows_##T(vf, v + b * vs_b + h * dh, ns, vs_s, dh, 1.f);                                  \
        const uint8_t *m = mask ? mask + b * ms_b : NULL;                                             \
        float *p = probs + i * nt * ns;                                                               \
        WITH_HEAD_SIZE(dh, FORWARD_ONE)                                                               \
        store_rows_##T(out + b * os_b + h * dh, of, nt, os_t, dh);                                    \
    }                                                                                                 \
}                                                                                                     \
int64_t attention_forward_##T(const int64_t *a, float scale) {                                        \
    const int64_t nt = a[8], ns = a[9], dh = a[10];                                                   \
    return parallel(forward_part_##T, a, scale, a[6] * a[7], a[21], (2 * nt + 2 * ns) * dh + ns + 16); \
}
#define FORWARD_ONE(DH) forward_one(qf, kf, vf, m, ms_t, of, p, e, nt, ns, DH)

/* Backward arguments: q, k, v, dout, probs, dq, dk, dv, B, H, T, S, dh, then the strides q (b, t),
 * k (b, s), v (b, s), dout (b, t), dq (b, t), dk (b, s), dv (b, s), then threads. Scratch per
 * thread: (3T + 4S) dh + TS floats. */
#define DEFINE_BACKWARD(T)                                                                            \
static void backward_part_##T(const int64_t *a, float scale, int64_t lo, int64_t hi, float *scratch) { \
    const T *q = PTR(const T, a[0]), *k = PTR(const T, a[1]), *v = PTR(const T, a[2]);                \
    const T *dout = PTR(const T, a[3]); const float *probs = PTR(const float, a[4]);                  \
    T *dq = PTR(T, a[5]), *dk = PTR(T, a[6]), *dv = PTR(T, a[7]);                                     \
    const int64_t H = a[9], nt = a[10], ns = a[11], dh = a[12];                                       \
    const int64_t qs_b = a[13], qs_t = a[14], ks_b = a[15], ks_s = a[16], vs_b = a[17], vs_s = a[18]; \
    const int64_t gs_b = a[19], gs_t = a[20], dqs_b = a[21], dqs_t = a[22];                           \
    const int64_t dks_b = a[23], dks_s = a[24], dvs_b = a[25], dvs_s = a[26];                         \
    float *qf = scratch, *kf = qf + nt * dh, *vf = kf + ns * dh, *gf = vf + ns * dh;                  \
    float *dqf = gf + nt * dh, *dkf = dqf + nt * dh, *dvf = dkf + ns * dh, *ds = dvf + ns * dh;        \
    for (int64_t i = lo; i < hi; i++) {                                                               \
        const int64_t b = i / H, h = i % H;                                                           \
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
int64_t attention_backward_##T(const int64_t *a, float scale) {                                       \
    const int64_t nt = a[10], ns = a[11], dh = a[12];                                                 \
    return parallel(backward_part_##T, a, scale, a[8] * a[9], a[27], (3 * nt + 4 * ns) * dh + nt * ns); \
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
 * Arguments: mask, n, seed, threshold, threads. */
INLINE uint64_t splitmix64(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

#define DEFINE_DROPOUT(T, STORE)                                                                      \
static void dropout_part_##T(const int64_t *a, float scale, int64_t lo, int64_t hi, float *scratch) { \
    (void)scratch;                                                                                    \
    T *mask = PTR(T, a[0]); const int64_t n = a[1]; const uint64_t seed = (uint64_t)a[2];             \
    const uint64_t threshold = (uint64_t)a[3];                                                        \
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
int64_t dropout_mask_##T(const int64_t *a, float scale) {                                             \
    return parallel(dropout_part_##T, a, scale, (a[1] + 3) / 4, a[4], 0);                            \
}

DEFINE_DROPOUT(f32, to_f32)
DEFINE_DROPOUT(bf16, to_bf16)
