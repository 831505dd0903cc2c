/* Attention for a decoding step: a few queries per row, keys and values read once.
 *
 * For every row b, head h and query i < n_queries:
 *     out[b, i, h, :] = softmax(scale * k[b / group, h, :t, :] q[b, h, i, :] + mask) v[b / group, h, :t, :]
 * where mask[b / group, s] == 0 excludes key s (a row with every key excluded gets zeros, as
 * PyTorch's scaled_dot_product_attention gives). `group` consecutive rows share one source (beam
 * search's beams of a sentence); arithmetic in fp32 whatever the storage type.
 *
 * Why: PyTorch's fused attention, for one query, runs two tiny GEMMs per (row, head) and reads
 * keys and values with little memory-level parallelism: 200-300 us for 64 rows x 4 heads x 20 keys
 * in a decoding step, where reading them takes ~30-100 us. Here each (row, head) is two streaming
 * passes (scores, then weighted values), and the next (row, head)'s keys and values are fetched
 * while this one computes. Plain C, vectorized by the compiler (aiayn/kernels/__init__.py builds it
 * for the machine it runs on); aiayn.model.attention.attend is the reference it is tested against.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

typedef uint16_t bf16;

static inline float from_f32(float x) { return x; }
static inline float from_bf16(bf16 x) { uint32_t u = (uint32_t)x << 16; float f; memcpy(&f, &u, 4); return f; }
static inline void to_f32(float *p, float x) { *p = x; }
static inline void to_bf16(bf16 *p, float x) {  /* round to nearest even, as PyTorch does */
    uint32_t u; memcpy(&u, &x, 4);
    *p = x != x ? 0x7FC0 : (bf16)((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
}

enum { MAX_KEYS = 4096, MAX_HEAD_DIM = 1024 };  /* the Python side checks both before calling */

static inline void prefetch_block(const char *p, int64_t rows, int64_t row_stride, int64_t row_bytes) {
    for (int64_t s = 0; s < rows; s++)
        for (int64_t c = 0; c < row_bytes; c += 64) __builtin_prefetch(p + s * row_stride + c);
}

/* Strides are in elements; q is (B, H, n_queries, Dh), k and v (B / group, H, t, Dh), mask
 * (B / group, t) bytes or NULL, out (B, n_queries, H, Dh), each with its last dimension contiguous. */
#define DEFINE_ATTEND(NAME, QT, KT, LOAD_Q, LOAD_KV, STORE)                                            \
void NAME(const QT *q, const KT *k, const KT *v, const uint8_t *mask, QT *out,                       \
          int64_t B, int64_t H, int64_t n_queries, int64_t t, int64_t dh, int64_t group,              \
          int64_t qs_b, int64_t qs_h, int64_t qs_i, int64_t ks_b, int64_t ks_h, int64_t ks_t,          \
          int64_t vs_b, int64_t vs_h, int64_t vs_t, int64_t ms_b,                                     \
          int64_t os_b, int64_t os_i, int64_t os_h, float scale)                                      \
{                                                                                                     \
    float scores[MAX_KEYS], query[MAX_HEAD_DIM], acc[MAX_HEAD_DIM];                                   \
    for (int64_t b = 0; b < B; b++) {                                                                 \
        const int64_t src = b / group;                                                                \
        const uint8_t *m = mask ? mask + src * ms_b : 0;                                              \
        for (int64_t h = 0; h < H; h++) {                                                             \
            const KT *kb = k + src * ks_b + h * ks_h, *vb = v + src * vs_b + h * vs_h;                \
            const int64_t nb = h + 1 < H ? b : b + 1, nh = h + 1 < H ? h + 1 : 0;                     \
            if (nb < B && (nb / group != src || nh != h)) {                                           \
                prefetch_block((const char *)(k + nb / group * ks_b + nh * ks_h), t,                   \
                               ks_t * (int64_t)sizeof(KT), dh * (int64_t)sizeof(KT));                  \
                prefetch_block((const char *)(v + nb / group * vs_b + nh * vs_h), t,                   \
                               vs_t * (int64_t)sizeof(KT), dh * (int64_t)sizeof(KT));                  \
            }                                                                                         \
            for (int64_t i = 0; i < n_queries; i++) {                                                 \
                const QT *qi = q + b * qs_b + h * qs_h + i * qs_i;                                    \
                QT *o = out + b * os_b + i * os_i + h * os_h;                                         \
                for (int64_t j = 0; j < dh; j++) query[j] = LOAD_Q(qi[j]) * scale;                    \
                float top = -INFINITY;                                                                \
                for (int64_t s = 0; s < t; s++) {                                                     \
                    const KT *ks = kb + s * ks_t;                                                     \
                    float d = 0.f;                                                                    \
                    _Pragma("omp simd reduction(+:d)")                                                \
                    for (int64_t j = 0; j < dh; j++) d += query[j] * LOAD_KV(ks[j]);                  \
                    if (m && !m[s]) d = -INFINITY;                                                    \
                    scores[s] = d;                                                                    \
                    top = d > top ? d : top;                                                          \
                }                                                                                     \
                if (top == -INFINITY) {  /* nothing to attend to */                                   \
                    for (int64_t j = 0; j < dh; j++) STORE(o + j, 0.f);                               \
                    continue;                                                                         \
                }                                                                                     \
                float total = 0.f;                                                                    \
                for (int64_t s = 0; s < t; s++) { scores[s] = expf(scores[s] - top); total += scores[s]; } \
                const float inv = 1.f / total;                                                        \
                for (int64_t j = 0; j < dh; j++) acc[j] = 0.f;                                        \
                for (int64_t s = 0; s < t; s++) {                                                     \
                    const KT *vs = vb + s * vs_t;                                                     \
                    const float p = scores[s] * inv;                                                  \
                    _Pragma("omp simd")                                                               \
                    for (int64_t j = 0; j < dh; j++) acc[j] += p * LOAD_KV(vs[j]);                    \
                }                                                                                     \
                for (int64_t j = 0; j < dh; j++) STORE(o + j, acc[j]);                                \
            }                                                                                         \
        }                                                                                             \
    }                                                                                                 \
}

DEFINE_ATTEND(attend_f32, float, float, from_f32, from_f32, to_f32)
DEFINE_ATTEND(attend_bf16, bf16, bf16, from_bf16, from_bf16, to_bf16)
DEFINE_ATTEND(attend_f32_bf16kv, float, bf16, from_f32, from_bf16, to_f32)
