/* Kernels for a training step on a CPU (aiayn/kernels/__init__.py calls them and names each one's
 * PyTorch reference; tests/model/test_train_kernels.py holds them to it):
 *
 *   attention_forward_*, attention_backward_*        multi-head attention (below)
 *   dropout_mask_*                                   dropout's scaled mask
 *   residual_norm_forward_*, residual_norm_backward_*  LayerNorm(x + dropout(y)), the post-norm residual
 *   cross_entropy_*                                  label-smoothed cross-entropy and its gradient
 *   bias_gelu_*                                      the feed-forward's bias + GELU, forward and backward
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
 * the forward pass, read by the backward pass; or NULL, and the backward pass computes it again by
 * the forward pass's own operations (the same values, O(T) memory for O(T²): at long lengths the
 * kept softmax outweighed everything else a layer keeps). Work is split over (row, head) pairs
 * between `threads` threads: each pair's outputs are its own, so no two threads write one place.
 */
#include <pthread.h>
#include <stdlib.h>

#include "common.h"

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

/* ---------------------------------------------------------------- one (row, head), on fp32 rows
 * Each (row, head) is loaded into fp32 rows of dhp = dh rounded up to 16 floats (zeros past dh), its
 * keys and values into `padded` = S rounded up to 16 rows (zeros past S). Two small GEMM kernels do
 * the products, on 4 rows at a time with their accumulators in registers (a broadcast value times a
 * loaded vector: no horizontal sums):
 *
 *     rows_times_cols: C (4 x n) = A (4 x dh) Bᵀ, B given transposed (dh x n)    scores, dP = G vᵀ
 *     weighted_rows:   C (4 x dhp) = W (4 x n) X (n x dhp)                     P v, dq, dk, dv
 *
 * A query's keys end at its last unmasked one (`hi`; causal attention: its own position): each block
 * of 4 queries computes only up to its last query's end, so a causal layer does about half the
 * products. Past that end the weights are zeros (masked keys' are anyway). */

/* Dropout's draw (dropout_mask below): element i is dropped where lane i % 4 of splitmix64's word
 * i / 4 (at counter seed + i / 4) is below threshold. */
INLINE uint64_t splitmix64(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}
#define DROP_WORD(seed, w) splitmix64((seed) + (uint64_t)(w) * 0x9E3779B97F4A7C15ull)

/* w[0:n] *= the dropout mask's elements first .. first + n - 1 (keep where kept, else 0): attention's
 * dropout on its weights, the same mask as dropout_mask's over (B, H, nt, ns) with the same seed. */
INLINE void drop_weights(float *w, int64_t n, uint64_t seed, uint64_t threshold, float keep, int64_t first) {
    for (int64_t i = first; i < first + n;) {
        const uint64_t r = DROP_WORD(seed, i / 4);
        for (int j = (int)(i % 4); j < 4 && i < first + n; j++, i++)
            w[i - first] *= ((r >> (16 * j)) & 0xFFFF) >= threshold ? keep : 0.f;
    }
}

/* The GEMM kernels' accumulators: 4 rows x PANEL vectors, with a row of B, in the registers. */
#if LANES == 4
#define PANEL 4
#else
#define PANEL 2
#endif
enum { WIDE = LANES * PANEL };  /* the columns a panel computes: 32 (AVX-512) or 16 */
INLINE int64_t round16(int64_t n) { return (n + 15) / 16 * 16; }
INLINE int64_t round4(int64_t n) { return (n + 3) / 4 * 4; }  /* the GEMM kernels' rows */

/* c[r, 0:w LANES] = sum_j a[r, j] bt[j, 0:w LANES], r < 4 (c's rows at cs, a's at as, bt's at bs) */
INLINE void rows_times_cols_panel(float *c, int64_t cs, const float *a, int64_t as, const float *bt, int64_t bs,
                                  int64_t dh, const int w) {
    vec acc[4][PANEL];
    for (int r = 0; r < 4; r++)
        for (int x = 0; x < w; x++) acc[r][x] = (vec){0};
    for (int64_t j = 0; j < dh; j++) {
        vec b[PANEL];
        for (int x = 0; x < w; x++) { b[x] = loadv_f32(bt + j * bs + LANES * x); IN_REGISTER(b[x]); }
        for (int r = 0; r < 4; r++) {
            const float ar = a[r * as + j];
            for (int x = 0; x < w; x++) acc[r][x] += ar * b[x];
        }
    }
    for (int r = 0; r < 4; r++)
        for (int x = 0; x < w; x++) storev_f32(c + r * cs + LANES * x, acc[r][x]);
}

/* c[r, 0:n] = a[r] . b[0:n] for 4 rows, n a multiple of 16 */
INLINE void rows_times_cols(float *c, int64_t cs, const float *a, int64_t as, const float *bt, int64_t bs,
                            int64_t n, int64_t dh) {
    int64_t s = 0;
    for (; s + WIDE <= n; s += WIDE) rows_times_cols_panel(c + s, cs, a, as, bt + s, bs, dh, PANEL);
    for (; s < n; s += 16) rows_times_cols_panel(c + s, cs, a, as, bt + s, bs, dh, 16 / LANES);
}

/* out[r, 0:w LANES] = sum_{lo <= i < hi} w[r * wr + i * wi] x[i, 0:w LANES], r < 4 (out's rows at
 * os, x's at xs) */
INLINE void weighted_rows_panel(float *out, int64_t os, const float *w, int64_t wr, int64_t wi, const float *x,
                                int64_t xs, int64_t lo, int64_t hi, const int width) {
    vec acc[4][PANEL];
    for (int r = 0; r < 4; r++)
        for (int c = 0; c < width; c++) acc[r][c] = (vec){0};
    for (int64_t i = lo; i < hi; i++) {
        vec xi[PANEL];
        for (int c = 0; c < width; c++) { xi[c] = loadv_f32(x + i * xs + LANES * c); IN_REGISTER(xi[c]); }
        for (int r = 0; r < 4; r++) {
            const float wri = w[r * wr + i * wi];
            for (int c = 0; c < width; c++) acc[r][c] += wri * xi[c];
        }
    }
    for (int r = 0; r < 4; r++)
        for (int c = 0; c < width; c++) storev_f32(out + r * os + LANES * c, acc[r][c]);
}

/* out[r, 0:dhp] = sum_{lo <= i < hi} w[r * wr + i * wi] x[i, 0:dhp] for 4 rows (zeros if lo >= hi) */
INLINE void weighted_rows(float *out, const float *w, int64_t wr, int64_t wi, const float *x, int64_t lo,
                          int64_t hi, int64_t dhp) {
    int64_t c = 0;
    for (; c + WIDE <= dhp; c += WIDE) weighted_rows_panel(out + c, dhp, w, wr, wi, x + c, dhp, lo, hi, PANEL);
    for (; c < dhp; c += 16) weighted_rows_panel(out + c, dhp, w, wr, wi, x + c, dhp, lo, hi, 16 / LANES);
}

/* xt (dhp x padded) = x (padded x dhp) transposed, both multiples of 16: in blocks of LANES x LANES,
 * each transposed in registers by rounds of shuffles (round b swaps bit b of the row and the lane
 * index), where element by element it cost as much as the products. */
#ifdef HAVE_SHUFFLE  /* (common.h) */
#define SWAP_BIT(BIT, LO, HI)                                                                         \
    for (int r = 0; r < LANES; r++)                                                                   \
        if (!(r & BIT)) {                                                                             \
            const vec a = v[r], b = v[r | BIT];                                                       \
            v[r] = __builtin_shufflevector(a, b, LO);                                                 \
            v[r | BIT] = __builtin_shufflevector(a, b, HI);                                           \
        }
#define INDICES(...) __VA_ARGS__
INLINE void transpose_block(float *dst, int64_t ds, const float *src, int64_t ss) {
    vec v[LANES];
    for (int r = 0; r < LANES; r++) v[r] = loadv_f32(src + r * ss);
#if LANES == 16
    SWAP_BIT(1, INDICES(0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30),
                INDICES(1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31))
    SWAP_BIT(2, INDICES(0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29),
                INDICES(2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31))
    SWAP_BIT(4, INDICES(0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27),
                INDICES(4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31))
    SWAP_BIT(8, INDICES(0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23),
                INDICES(8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31))
#elif LANES == 8
    SWAP_BIT(1, INDICES(0, 8, 2, 10, 4, 12, 6, 14), INDICES(1, 9, 3, 11, 5, 13, 7, 15))
    SWAP_BIT(2, INDICES(0, 1, 8, 9, 4, 5, 12, 13), INDICES(2, 3, 10, 11, 6, 7, 14, 15))
    SWAP_BIT(4, INDICES(0, 1, 2, 3, 8, 9, 10, 11), INDICES(4, 5, 6, 7, 12, 13, 14, 15))
#else
    SWAP_BIT(1, INDICES(0, 4, 2, 6), INDICES(1, 5, 3, 7))
    SWAP_BIT(2, INDICES(0, 1, 4, 5), INDICES(2, 3, 6, 7))
#endif
    for (int r = 0; r < LANES; r++) storev_f32(dst + r * ds, v[r]);
}
#else
INLINE void transpose_block(float *dst, int64_t ds, const float *src, int64_t ss) {
    for (int r = 0; r < LANES; r++)
        for (int c = 0; c < LANES; c++) dst[c * ds + r] = src[r * ss + c];
}
#endif

INLINE void transpose(float *xt, const float *x, int64_t padded, int64_t dhp) {
    for (int64_t s = 0; s < padded; s += LANES)
        for (int64_t j = 0; j < dhp; j += LANES) transpose_block(xt + j * padded + s, padded, x + s * dhp + j, dhp);
}

/* The end of each query's keys: 1 + its last unmasked key (ns without a mask, and where every key
 * is masked: those rows are computed whole, so that a NaN score still gives NaN), 0 for the rows
 * that pad nt to a multiple of 4; of row b, unless `hi` holds row b's already (*of: whose it holds;
 * the heads of a row share its mask). */
INLINE void key_ends(int32_t *hi, int64_t *of, int64_t b, const uint8_t *mask, int64_t ms_t, int64_t nt, int64_t ns) {
    if (*of == b) return;
    *of = b;
    for (int64_t t = 0; t < round4(nt); t++) {
        int32_t end = t < nt ? (int32_t)ns : 0;
        if (mask && t < nt) {
            const uint8_t *m = mask + t * ms_t;
            end = 0;
            _Pragma("omp simd reduction(max:end)")
            for (int32_t s = 0; s < (int32_t)ns; s++) {
                const int32_t here = m[s] ? s + 1 : 0;
                end = here > end ? here : end;
            }
            if (end == 0) end = (int32_t)ns;
        }
        hi[t] = end;
    }
}

/* e[s] = -inf where m[s] == 0, for s < n */
INLINE void apply_mask(float *e, const uint8_t *m, int64_t n) {
    int64_t s = 0;
    for (; s + LANES <= n; s += LANES) {
        bvec bytes;
        memcpy(&bytes, m + s, sizeof bytes);
        const ivec keep = __builtin_convertvector(bytes, ivec) != 0;
        storev_f32(e + s, pickv(keep, loadv_f32(e + s), (vec){0} - INFINITY));
    }
    for (; s < n; s++) e[s] = m[s] ? e[s] : -INFINITY;
}

/* The keys a block of 4 queries computes: up to its furthest end, rounded up to 16. */
INLINE int64_t block_end(const int32_t *hi) {
    int64_t end = 0;
    for (int r = 0; r < 4; r++) end = hi[r] > end ? hi[r] : end;
    return round16(end);
}

/* Dropout on one (row, head)'s weights: their mask's seed, threshold (0: none), kept factor, and the
 * index of its first weight in (B, H, nt, ns). */
typedef struct { uint64_t seed, threshold; float keep; int64_t first; } drop;

/* The softmax of queries t0 .. t0 + 3 over their keys into e's rows t0 .. t0 + 3 (nt4 x padded floats,
 * zeros past each block's `end`, and in rows past nt): q (nt4 x dhp, already scaled), kt (dhp x
 * padded: the keys transposed), the mask's rows (at ms_t) or NULL, `end` = block_end of its key ends.
 * The forward pass computes it, and the backward pass again where the forward pass kept no copy:
 * the same operations, so the same values. */
INLINE void softmax_block(float *e, const float *q, const float *kt, const uint8_t *mask, int64_t ms_t,
                          int64_t t0, int64_t end, int64_t nt, int64_t ns, int64_t dh, int64_t dhp) {
    const int64_t padded = round16(ns);
    rows_times_cols(e + t0 * padded, padded, q + t0 * dhp, dhp, kt, padded, end, dh);
    for (int64_t t = t0; t < t0 + 4; t++) {
        float *et = e + t * padded;
        if (t >= nt) {  /* a row that pads the block: no weights */
            memset(et, 0, sizeof(float) * padded);
            continue;
        }
        const uint8_t *m = mask ? mask + t * ms_t : NULL;
        const int64_t known = end < ns ? end : ns;
        if (m) apply_mask(et, m, known);
        for (int64_t s = known; s < end; s++) et[s] = -INFINITY;
        vec top = loadv_f32(et);
        for (int64_t s = LANES; s < end; s += LANES) top = maxv(loadv_f32(et + s), top);
        const float most = max_of(top);
        if (most == -INFINITY) {  /* nothing to attend to: zeros, and no weights (NaN if a score is) */
            const float fill = any_nan(et, ns) ? NAN : 0.f;
            for (int64_t s = 0; s < padded; s++) et[s] = s < ns ? fill : 0.f;
        } else {
            vec sum = {0};
            for (int64_t s = 0; s < end; s += LANES) {
                const vec x = expv_nonpositive(loadv_f32(et + s) - most);
                sum += x;
                storev_f32(et + s, x);
            }
            const float inv = 1.f / sum_of(sum);
            for (int64_t s = 0; s < end; s += LANES) storev_f32(et + s, inv * loadv_f32(et + s));
            memset(et + end, 0, sizeof(float) * (padded - end));
        }
    }
}

/* q (nt4 x dhp, already scaled), kt (dhp x padded: the keys transposed), v (padded x dhp) -> out
 * (nt4 x dhp), and the softmax into p (nt x ns) unless p is NULL; out from the weights after dropout
 * `d`; e: nt4 x padded floats; hi: the mask's key_ends. nt4 = nt rounded up to 4. */
INLINE void forward_one(const float *q, const float *kt, const float *v, const uint8_t *mask, int64_t ms_t,
                        float *out, float *p, float *e, const int32_t *hi, int64_t nt, int64_t ns, int64_t dh,
                        int64_t dhp, const drop *d) {
    const int64_t padded = round16(ns);
    for (int64_t t0 = 0; t0 < nt; t0 += 4) {
        const int64_t end = block_end(hi + t0);
        softmax_block(e, q, kt, mask, ms_t, t0, end, nt, ns, dh, dhp);
        for (int64_t t = t0; t < t0 + 4 && t < nt; t++) {
            float *et = e + t * padded;
            if (p) memcpy(p + t * ns, et, sizeof(float) * ns);
            if (d->threshold) drop_weights(et, end < ns ? end : ns, d->seed, d->threshold, d->keep, d->first + t * ns);
        }
        weighted_rows(out + t0 * dhp, e + t0 * padded, padded, 1, v, 0, end < ns ? end : ns, dhp);
    }
}

/* The gradients of one (row, head): with P the softmax and G = dout,
 *     dP = G vᵀ,   dS = P * (dP - rowsum(P * dP)) * scale,   dq = dS k,   dk = dSᵀ q,   dv = Pᵀ G
 * for q (nt4 x dhp, unscaled), g (nt4 x dhp), k (padded x dhp), vt (dhp x padded: v transposed);
 * P: the forward pass's copy p (nt x ns), or where p is NULL computed again as the forward pass did,
 * from qs (q scaled), kt (k transposed), the mask and its key ends `ends`; either way into pp (nt4 x
 * padded, zeros around it). dq (nt4 x dhp), dk, dv (padded x dhp) are written whole; ds: nt4 x padded
 * floats, hi: nt4. A query's keys end after its last nonzero weight: past it dS is 0. */
INLINE void backward_one(const float *q, const float *k, const float *vt, const float *g, const float *p,
                         const float *qs, const float *kt, const uint8_t *mask, int64_t ms_t, const int32_t *ends,
                         float *pp, float *dq, float *dk, float *dv, float *ds, int32_t *hi,
                         int64_t nt, int64_t ns, int64_t dh, int64_t dhp, float scale, const drop *d) {
    const int64_t padded = round16(ns), nt4 = round4(nt);
    if (p) {
        for (int64_t t = 0; t < nt4; t++) {
            const int64_t copied = t < nt ? ns : 0;
            memcpy(pp + t * padded, p + t * ns, sizeof(float) * copied);
            memset(pp + t * padded + copied, 0, sizeof(float) * (padded - copied));
        }
    } else {
        for (int64_t t0 = 0; t0 < nt; t0 += 4)
            softmax_block(pp, qs, kt, mask, ms_t, t0, block_end(ends + t0), nt, ns, dh, dhp);
    }
    for (int64_t t = 0; t < nt4; t++) {
        const float *pt = pp + t * padded;
        int32_t end = 0;
        _Pragma("omp simd reduction(max:end)")
        for (int32_t s = 0; s < (int32_t)(t < nt ? ns : 0); s++) {
            const int32_t here = pt[s] != 0.f ? s + 1 : 0;  /* (NaN counts: != 0) */
            end = here > end ? here : end;
        }
        hi[t] = end;
    }
    for (int64_t t0 = 0; t0 < nt4; t0 += 4) {
        const int64_t end = block_end(hi + t0);
        rows_times_cols(ds + t0 * padded, padded, g + t0 * dhp, dhp, vt, padded, end, dh);  /* dP */
        for (int64_t t = t0; t < t0 + 4; t++) {
            const float *pt = pp + t * padded;
            float *dst = ds + t * padded, rowdot = 0.f;
            if (d->threshold && t < nt)  /* the gradient of the weights before their dropout */
                drop_weights(dst, end < ns ? end : ns, d->seed, d->threshold, d->keep, d->first + t * ns);
            _Pragma("omp simd reduction(+:rowdot)")
            for (int64_t s = 0; s < end; s++) rowdot += pt[s] * dst[s];  /* masked keys: pt[s] = 0 */
            _Pragma("omp simd")
            for (int64_t s = 0; s < end; s++) dst[s] = pt[s] * (dst[s] - rowdot) * scale;
            memset(dst + end, 0, sizeof(float) * (padded - end));
        }
        weighted_rows(dq + t0 * dhp, ds + t0 * padded, padded, 1, k, 0, end < ns ? end : ns, dhp);
    }
    if (d->threshold)  /* dv = (P after dropout)ᵀ G */
        for (int64_t t = 0; t < nt; t++) drop_weights(pp + t * padded, ns, d->seed, d->threshold, d->keep, d->first + t * ns);
    for (int64_t s0 = 0; s0 < ns; s0 += 4) {  /* keys s0..s0+3: from the first query that reaches them */
        int64_t first = 0;
        while (first < nt && hi[first] <= s0) first++;
        weighted_rows(dk + s0 * dhp, ds + s0, 1, padded, q, first, nt, dhp);
        weighted_rows(dv + s0 * dhp, pp + s0, 1, padded, g, first, nt, dhp);
    }
}

/* ------------------------------------------------------------------ the entry points, per type */
/* rows of dh values at `stride` -> fp32 rows of dhp (zeros past dh), times scale; `to` rows in all
 * (zero rows past `rows`) */
#define DEFINE_ROWS(T, LOAD, LOADV, STORE, STOREV)                                                    \
INLINE void load_rows_##T(float *dst, const T *src, int64_t rows, int64_t to, int64_t stride, int64_t dh, \
                          int64_t dhp, float scale) {                                                 \
    for (int64_t r = 0; r < rows; r++) {                                                              \
        const T *x = src + r * stride; float *y = dst + r * dhp; int64_t j = 0;                        \
        for (; j + LANES <= dh; j += LANES) storev_f32(y + j, scale * LOADV(x + j));                  \
        for (; j < dh; j++) y[j] = scale * LOAD(x[j]);                                                \
        for (; j < dhp; j++) y[j] = 0.f;                                                              \
    }                                                                                                 \
    memset(dst + rows * dhp, 0, sizeof(float) * (size_t)((to - rows) * dhp));                         \
}                                                                                                     \
INLINE void store_rows_##T(T *dst, const float *src, int64_t rows, int64_t stride, int64_t dh, int64_t dhp) { \
    for (int64_t r = 0; r < rows; r++) {                                                              \
        T *y = dst + r * stride; const float *x = src + r * dhp; int64_t j = 0;                        \
        for (; j + LANES <= dh; j += LANES) STOREV(y + j, loadv_f32(x + j));                          \
        for (; j < dh; j++) STORE(y + j, x[j]);                                                       \
    }                                                                                                 \
}

DEFINE_ROWS(f32, from_f32, loadv_f32, to_f32, storev_f32)
DEFINE_ROWS(bf16, from_bf16, loadv_bf16, to_bf16, storev_bf16)

/* The head size as a constant where it is a common one: the loops over it then unroll. */
#define WITH_HEAD_SIZE(dh, CALL)                                                                      \
    switch (dh) {                                                                                     \
    case 64: CALL(64, 64); break;                                                                     \
    case 32: CALL(32, 32); break;                                                                     \
    case 128: CALL(128, 128); break;                                                                  \
    default: CALL(dh, round16(dh));                                                                   \
    }

/* The checks both passes make: sizes within the limits (they bound the scratch), strides not
 * negative (a stride 0 broadcasts the mask). */
static int attention_check(int64_t B, int64_t H, int64_t T, int64_t S, int64_t dh, int64_t strides,
                           int64_t threshold) {
    AIAYN_REQUIRE(B >= 0 && H >= 1 && T >= 1 && S >= 1 && dh >= 1, AIAYN_BAD_SIZE);
    AIAYN_REQUIRE(threshold >= 0 && threshold < 65536, AIAYN_BAD_SIZE);  /* (65536: every weight dropped) */
    AIAYN_REQUIRE(T <= AIAYN_MAX_KEYS && S <= AIAYN_MAX_KEYS && dh <= AIAYN_MAX_HEAD_DIM, AIAYN_OVER_LIMIT);
    AIAYN_REQUIRE(strides >= 0, AIAYN_BAD_STRIDE);  /* the strides' OR: negative if any is */
    return AIAYN_OK;
}

/* Scratch per thread, in floats: nt4 = nt rounded up to 4, padded = ns rounded up to 16, dhp = dh
 * rounded up to 16; the key ends (int32) take a float each. */
static int64_t forward_scratch(int64_t nt, int64_t ns, int64_t dh) {
    const int64_t nt4 = round4(nt), padded = round16(ns), dhp = round16(dh);
    return 2 * nt4 * dhp + 3 * padded * dhp + nt4 * padded + nt4;  /* q, out; k, kᵀ, v; e; hi */
}
static int64_t backward_scratch(int64_t nt, int64_t ns, int64_t dh) {
    const int64_t nt4 = round4(nt), padded = round16(ns), dhp = round16(dh);
    /* q, g, dq, q scaled; k, v, vᵀ, dk, dv, kᵀ; P, dS; hi, the key ends */
    return 4 * nt4 * dhp + 6 * padded * dhp + 2 * nt4 * padded + 2 * nt4;
}

/* Forward arguments: attention_forward_args (abi.h). */
#define DEFINE_FORWARD(T)                                                                             \
static void forward_part_##T(const void *args, int64_t lo, int64_t hi, float *scratch, int64_t index) { \
    (void)index;                                                                                      \
    const attention_forward_args *a = args;                                                           \
    const T *q = a->q, *k = a->k, *v = a->v;                                                          \
    const uint8_t *mask = a->mask; T *out = a->out; float *probs = a->probs;                          \
    const int64_t H = a->H, nt = a->nt, ns = a->ns, dh = a->dh;                                         \
    const int64_t qs_b = a->qs_b, qs_t = a->qs_t, ks_b = a->ks_b, ks_s = a->ks_s, vs_b = a->vs_b, vs_s = a->vs_s; \
    const int64_t ms_b = a->ms_b, ms_t = a->ms_t, os_b = a->os_b, os_t = a->os_t;                     \
    const int64_t nt4 = round4(nt), padded = round16(ns), dhp = round16(dh);                           \
    const float scale = a->scale;                                                                     \
    float *qf = scratch, *of = qf + nt4 * dhp, *kf = of + nt4 * dhp, *kt = kf + padded * dhp;          \
    float *vf = kt + padded * dhp, *e = vf + padded * dhp;                                            \
    int32_t *ends = (int32_t *)(e + nt4 * padded);                                                    \
    for (int64_t i = lo, ends_of = -1; i < hi; i++) {                                                 \
        const int64_t b = i / H, h = i % H, nb = (i + 1) / H, nh = (i + 1) % H;                       \
        if (i + 1 < hi) {  /* the next pair's rows, while this one computes */                        \
            prefetch_rows(q + nb * qs_b + nh * dh, nt, qs_t * (int64_t)sizeof(T), dh * (int64_t)sizeof(T)); \
            prefetch_rows(k + nb * ks_b + nh * dh, ns, ks_s * (int64_t)sizeof(T), dh * (int64_t)sizeof(T)); \
            prefetch_rows(v + nb * vs_b + nh * dh, ns, vs_s * (int64_t)sizeof(T), dh * (int64_t)sizeof(T)); \
        }                                                                                             \
        load_rows_##T(qf, q + b * qs_b + h * dh, nt, nt4, qs_t, dh, dhp, scale);                      \
        load_rows_##T(kf, k + b * ks_b + h * dh, ns, padded, ks_s, dh, dhp, 1.f);                     \
        load_rows_##T(vf, v + b * vs_b + h * dh, ns, padded, vs_s, dh, dhp, 1.f);                     \
        transpose(kt, kf, padded, dhp);                                                               \
        const uint8_t *m = mask ? mask + b * ms_b : NULL;                                             \
        key_ends(ends, &ends_of, b, m, ms_t, nt, ns);                                                 \
        float *p = probs ? probs + i * nt * ns : NULL;                                                \
        const drop d = {(uint64_t)a->seed, (uint64_t)a->threshold, a->keep, i * nt * ns};              \
        WITH_HEAD_SIZE(dh, FORWARD_ONE)                                                               \
        store_rows_##T(out + b * os_b + h * dh, of, nt, os_t, dh, dhp);                               \
    }                                                                                                 \
}                                                                                                     \
int attention_forward_##T(const attention_forward_args *a) {                                         \
    AIAYN_REQUIRE(a->q && a->k && a->v && a->out, AIAYN_NULL_POINTER);                                \
    const int status = attention_check(a->B, a->H, a->nt, a->ns, a->dh, a->qs_b | a->qs_t | a->ks_b     \
                                       | a->ks_s | a->vs_b | a->vs_s | a->ms_b | a->ms_t | a->os_b | a->os_t, a->threshold); \
    if (status != AIAYN_OK) return status;                                                            \
    return parallel(forward_part_##T, a, a->B * a->H, a->threads, forward_scratch(a->nt, a->ns, a->dh)); \
}
#define FORWARD_ONE(DH, DHP) forward_one(qf, kt, vf, m, ms_t, of, p, e, ends, nt, ns, DH, DHP, &d)

/* Backward arguments: attention_backward_args (abi.h). */
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
    const int64_t nt4 = round4(nt), padded = round16(ns), dhp = round16(dh);                           \
    const float scale = a->scale;                                                                     \
    float *qf = scratch, *gf = qf + nt4 * dhp, *dqf = gf + nt4 * dhp, *kf = dqf + nt4 * dhp;           \
    float *vf = kf + padded * dhp, *vt = vf + padded * dhp, *dkf = vt + padded * dhp;                 \
    float *dvf = dkf + padded * dhp, *pp = dvf + padded * dhp, *ds = pp + nt4 * padded;               \
    float *qsf = ds + nt4 * padded, *kt = qsf + nt4 * dhp;  /* (where P is computed again) */          \
    int32_t *nonzero = (int32_t *)(kt + padded * dhp), *ends = nonzero + nt4;                         \
    const uint8_t *mask = a->mask;                                                                    \
    const int64_t ms_b = a->ms_b, ms_t = a->ms_t;                                                     \
    for (int64_t i = lo, ends_of = -1; i < hi; i++) {                                                 \
        const int64_t b = i / H, h = i % H, nb = (i + 1) / H, nh = (i + 1) % H;                       \
        if (i + 1 < hi) {                                                                             \
            prefetch_rows(q + nb * qs_b + nh * dh, nt, qs_t * (int64_t)sizeof(T), dh * (int64_t)sizeof(T)); \
            prefetch_rows(k + nb * ks_b + nh * dh, ns, ks_s * (int64_t)sizeof(T), dh * (int64_t)sizeof(T)); \
            prefetch_rows(v + nb * vs_b + nh * dh, ns, vs_s * (int64_t)sizeof(T), dh * (int64_t)sizeof(T)); \
            prefetch_rows(dout + nb * gs_b + nh * dh, nt, gs_t * (int64_t)sizeof(T), dh * (int64_t)sizeof(T)); \
        }                                                                                             \
        load_rows_##T(qf, q + b * qs_b + h * dh, nt, nt4, qs_t, dh, dhp, 1.f);                        \
        load_rows_##T(kf, k + b * ks_b + h * dh, ns, padded, ks_s, dh, dhp, 1.f);                     \
        load_rows_##T(vf, v + b * vs_b + h * dh, ns, padded, vs_s, dh, dhp, 1.f);                     \
        load_rows_##T(gf, dout + b * gs_b + h * dh, nt, nt4, gs_t, dh, dhp, 1.f);                     \
        transpose(vt, vf, padded, dhp);                                                               \
        const uint8_t *m = mask ? mask + b * ms_b : NULL;                                             \
        if (!probs) {  /* P computed again: q scaled and kᵀ as in the forward pass, and its key ends */ \
            load_rows_##T(qsf, q + b * qs_b + h * dh, nt, nt4, qs_t, dh, dhp, scale);                 \
            transpose(kt, kf, padded, dhp);                                                           \
            key_ends(ends, &ends_of, b, m, ms_t, nt, ns);                                             \
        }                                                                                             \
        const float *p = probs ? probs + i * nt * ns : NULL;                                          \
        const drop d = {(uint64_t)a->seed, (uint64_t)a->threshold, a->keep, i * nt * ns};              \
        WITH_HEAD_SIZE(dh, BACKWARD_ONE)                                                              \
        store_rows_##T(dq + b * dqs_b + h * dh, dqf, nt, dqs_t, dh, dhp);                             \
        store_rows_##T(dk + b * dks_b + h * dh, dkf, ns, dks_s, dh, dhp);                             \
        store_rows_##T(dv + b * dvs_b + h * dh, dvf, ns, dvs_s, dh, dhp);                             \
    }                                                                                                 \
}                                                                                                     \
int attention_backward_##T(const attention_backward_args *a) {                                       \
    AIAYN_REQUIRE(a->q && a->k && a->v && a->dout && a->dq && a->dk && a->dv, AIAYN_NULL_POINTER);     \
    const int status = attention_check(a->B, a->H, a->nt, a->ns, a->dh, a->qs_b | a->qs_t | a->ks_b     \
                                       | a->ks_s | a->vs_b | a->vs_s | a->ms_b | a->ms_t | a->gs_b | a->gs_t | a->dqs_b | a->dqs_t \
                                       | a->dks_b | a->dks_s | a->dvs_b | a->dvs_s, a->threshold);     \
    if (status != AIAYN_OK) return status;                                                            \
    return parallel(backward_part_##T, a, a->B * a->H, a->threads, backward_scratch(a->nt, a->ns, a->dh)); \
}
#define BACKWARD_ONE(DH, DHP) backward_one(qf, kf, vt, gf, p, qsf, kt, m, ms_t, ends, pp, dqf, dkf, dvf, ds, nonzero, \
                                          nt, ns, DH, DHP, scale, &d)

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
        const uint64_t r = DROP_WORD(seed, w);                                                        \
        for (int j = 0; j < 4; j++) mask[4 * w + j] = ((r >> (16 * j)) & 0xFFFF) >= threshold ? keep : drop; \
    }                                                                                                 \
    for (int64_t w = full > lo ? full : lo; w < hi; w++) {  /* the last, partial word */             \
        const uint64_t r = DROP_WORD(seed, w);                                                        \
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
 *     dz = (g - mean(g) - xhat mean(g xhat)) / std,   dx = dz,   dy = dz mask (dy NULL: dx is it),
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
            if (dy) STOREY(dy + r * n + j, mr ? dz * LOADY(mr[j]) : dz);                              \
        }                                                                                             \
    }                                                                                                 \
}                                                                                                     \
int residual_norm_backward_##NAME(const residual_norm_backward_args *a) {                               \
    AIAYN_REQUIRE(a->dout && a->z && a->w && a->stats && a->dx && a->partial, AIAYN_NULL_POINTER);        \
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
#define DEFINE_CROSS_ENTROPY(T, LOAD, LOADV, STORE, STOREV)                                           \
static void cross_entropy_part_##T(const void *args, int64_t lo, int64_t hi, float *row, int64_t index) { \
    (void)index;                                                                                      \
    const cross_entropy_args *a = args;                                                               \
    const T *logits = a->logits; const int64_t stride = a->stride;                                    \
    const int64_t *target = a->target; float *losses = a->losses;                                     \
    T *grad = a->grad; const int64_t V = a->V;                                                        \
    const float eps = a->eps, scale = a->scale;                                                       \
    const int64_t body = V / LANES * LANES;                                                           \
    for (int64_t r = lo; r < hi; r++) {                                                               \
        const T *z = logits + r * stride;                                                             \
        const int64_t t = target[r];                                                                  \
        vec sum = {0}, top = sum - INFINITY;                                                          \
        for (int64_t j = 0; j < body; j += LANES) {                                                   \
            const vec x = LOADV(z + j);                                                               \
            storev_f32(row + j, x);                                                                   \
            sum += x;                                                                                 \
            top = maxv(x, top);                                                                       \
        }                                                                                             \
        float most = max_of(top), total_z = sum_of(sum);                                              \
        for (int64_t j = body; j < V; j++) {                                                          \
            row[j] = LOAD(z[j]); total_z += row[j]; most = row[j] > most ? row[j] : most;             \
        }                                                                                             \
        vec esum = {0};                                                                               \
        for (int64_t j = 0; j < body; j += LANES) {                                                   \
            const vec e = expv_nonpositive(loadv_f32(row + j) - most);                                \
            storev_f32(row + j, e);                                                                   \
            esum += e;                                                                                \
        }                                                                                             \
        float total = sum_of(esum);                                                                   \
        for (int64_t j = body; j < V; j++) { row[j] = exp_nonpositive(row[j] - most); total += row[j]; } \
        losses[r] = logf(total) + most - (1.f - eps) * LOAD(z[t]) - eps * total_z / V;               \
        if (!grad) continue;                                                                          \
        T *g = grad + r * V;                                                                          \
        const float p_scale = scale / total, shift = scale * eps / V;                                 \
        for (int64_t j = 0; j < body; j += LANES) STOREV(g + j, p_scale * loadv_f32(row + j) - shift); \
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

DEFINE_CROSS_ENTROPY(f32, from_f32, loadv_f32, to_f32, storev_f32)
DEFINE_CROSS_ENTROPY(bf16, from_bf16, loadv_bf16, to_bf16, storev_bf16)

/* ------------------------------------------------------------ the feed-forward's bias + GELU (§3.3)
 * Forward: out = gelu(h + bias), where h = x W1ᵀ is the first linear layer's product without its
 * bias and gelu(u) = u Φ(u), Φ the standard normal's CDF (GELU's exact form, F.gelu's default); and,
 * for the backward pass, grad = gelu'(h + bias) = Φ + u φ, φ the normal's density. Backward:
 * dh = dout grad and the bias's gradient, the sum of dh over rows, as one row of partial sums per
 * part (`partial`: parts x n fp32, summed by the caller). PyTorch: the bias added in the GEMM, gelu,
 * then gelu_backward (which computes erf and exp again) and the bias's sum, another pass. Φ from erf
 * by Abramowitz and Stegun's 7.1.26 (|error| < 1.5e-7), whose exp(-u²/2) is also φ's: one exp an
 * element,
 *     Φ(u) = 1 - q (u >= 0), q (u < 0),   q = exp(-u²/2) t (a1 + t (a2 + ... + t a5)) / 2,
 *     t = 1 / (1 + p |u| / sqrt 2).
 * Rows are computed in vectors of LANES, each row's tail (n % LANES) through copies padded with
 * zeros. Arguments: bias_gelu_forward_args, bias_gelu_backward_args (abi.h). */
INLINE vec gelu_cdf(vec u, vec *pdf) {  /* Φ(u), and φ(u) into *pdf */
    const vec zero = {0};
    const vec a = pickv(u < 0.f, zero - u, u) * 0.70710678f;  /* |u| / sqrt 2 */
    const vec t = 1.f / (1.f + 0.3275911f * a);
    const vec e = expv_nonpositive(zero - a * a);
    const vec q = 0.5f * e * t * (0.254829592f + t * (-0.284496736f + t * (1.421413741f
                  + t * (-1.453152027f + t * 1.061405429f))));
    *pdf = e * 0.39894228f;  /* exp(-u²/2) / sqrt(2 pi) */
    return pickv(u < 0.f, q, 1.f - q);
}

#define DEFINE_BIAS_GELU(T, LOADV, STOREV)                                                            \
static void bias_gelu_part_##T(const void *args, int64_t lo, int64_t hi, float *scratch, int64_t index) { \
    (void)scratch; (void)index;                                                                       \
    const bias_gelu_forward_args *a = args;                                                           \
    const T *h = a->h; const float *bias = a->bias; T *out = a->out, *grad = a->grad;                 \
    const int64_t n = a->n, m = n % LANES;                                                            \
    for (int64_t r = lo; r < hi; r++) {                                                               \
        const T *hr = h + r * n; T *o = out + r * n, *g = grad ? grad + r * n : NULL;                 \
        T ht[LANES] = {0}, ot[LANES], gt[LANES]; float bt[LANES] = {0};  /* the tail's */             \
        if (m) { memcpy(ht, hr + n - m, m * sizeof(T)); memcpy(bt, bias + n - m, m * sizeof(float)); } \
        for (int64_t j = 0; j < n; j += LANES) {                                                      \
            const int whole = j + LANES <= n;                                                         \
            const vec u = LOADV(whole ? hr + j : ht) + loadv_f32(whole ? bias + j : bt);              \
            vec pdf;                                                                                  \
            const vec cdf = gelu_cdf(u, &pdf);                                                        \
            STOREV(whole ? o + j : ot, u * cdf);                                                      \
            if (g) STOREV(whole ? g + j : gt, cdf + u * pdf);                                         \
        }                                                                                             \
        if (m) { memcpy(o + n - m, ot, m * sizeof(T)); if (g) memcpy(g + n - m, gt, m * sizeof(T)); } \
    }                                                                                                 \
}                                                                                                     \
int bias_gelu_forward_##T(const bias_gelu_forward_args *a) {                                          \
    AIAYN_REQUIRE(a->h && a->bias && a->out, AIAYN_NULL_POINTER);                                     \
    AIAYN_REQUIRE(a->rows >= 0 && a->n >= 1, AIAYN_BAD_SIZE);                                         \
    return parallel(bias_gelu_part_##T, a, a->rows, a->threads, 0);                                   \
}                                                                                                     \
static void bias_gelu_back_part_##T(const void *args, int64_t lo, int64_t hi, float *scratch, int64_t index) { \
    (void)scratch;                                                                                    \
    const bias_gelu_backward_args *a = args;                                                          \
    const T *dout = a->dout, *grad = a->grad; T *dh = a->dh;                                          \
    const int64_t n = a->n, m = n % LANES;                                                            \
    float *db = a->partial + index * n;                                                               \
    for (int64_t r = lo; r < hi; r++) {                                                               \
        const T *dr = dout + r * n, *gr = grad + r * n; T *o = dh + r * n;                            \
        T dt[LANES] = {0}, gt[LANES] = {0}, ot[LANES]; float bt[LANES] = {0};  /* the tail's */       \
        if (m) {                                                                                      \
            memcpy(dt, dr + n - m, m * sizeof(T)); memcpy(gt, gr + n - m, m * sizeof(T));             \
            memcpy(bt, db + n - m, m * sizeof(float));                                                \
        }                                                                                             \
        for (int64_t j = 0; j < n; j += LANES) {                                                      \
            const int whole = j + LANES <= n;                                                         \
            const vec d = LOADV(whole ? dr + j : dt) * LOADV(whole ? gr + j : gt);                    \
            STOREV(whole ? o + j : ot, d);                                                            \
            float *dbj = whole ? db + j : bt;                                                         \
            storev_f32(dbj, loadv_f32(dbj) + d);                                                      \
        }                                                                                             \
        if (m) { memcpy(o + n - m, ot, m * sizeof(T)); memcpy(db + n - m, bt, m * sizeof(float)); }   \
    }                                                                                                 \
}                                                                                                     \
int bias_gelu_backward_##T(const bias_gelu_backward_args *a) {                                        \
    AIAYN_REQUIRE(a->dout && a->grad && a->dh && a->partial, AIAYN_NULL_POINTER);                     \
    AIAYN_REQUIRE(a->rows >= 0 && a->n >= 1, AIAYN_BAD_SIZE);                                         \
    return parallel(bias_gelu_back_part_##T, a, a->rows, a->threads, 0);                              \
}

DEFINE_BIAS_GELU(f32, loadv_f32, storev_f32)
DEFINE_BIAS_GELU(bf16, loadv_bf16, storev_bf16)
