/* What aiayn's C kernels share (decode_step.c, train_step.c): their argument structs and limits
 * (abi.h), bf16 <-> fp32, a vectorizable exp, vectors of the CPU's own width and of 16 floats,
 * prefetching. */
#ifndef AIAYN_KERNELS_COMMON_H
#define AIAYN_KERNELS_COMMON_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "abi.h"

typedef uint16_t bf16;

#define INLINE static inline __attribute__((always_inline))

static inline float from_f32(float x) { return x; }
static inline float from_bf16(bf16 x) { uint32_t u = (uint32_t)x << 16; float f; memcpy(&f, &u, 4); return f; }
static inline void to_f32(float *p, float x) { *p = x; }
static inline void to_bf16(bf16 *p, float x) {  /* round to nearest even, as PyTorch does */
    uint32_t u; memcpy(&u, &x, 4);
    *p = x != x ? 0x7FC0 : (bf16)((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
}

/* exp(x) for x <= 0, as a loop the compiler vectorizes (libm's expf is a call per element: a third
 * of this kernel's time with it): 2^n p(r) with x = n ln2 + r, |r| <= ln2 / 2, p the degree-7 Taylor
 * polynomial (relative error < 1e-7 before rounding); 0 below -87 (exp(-87) < 2e-38), and for -inf;
 * NaN for NaN (and for +inf, outside its domain). n is rounded by adding 1.5 * 2^23 + 127, whose float
 * then holds 0x4B400000 + n + 127 in its bits, the low 9 of them n + 127: shifted left by 23, 2^n. So
 * the bits are read as an unsigned integer (defined for any float; p is NaN for NaN) where converting
 * n to an int would be undefined for NaN, and one instruction longer. */
static inline float exp_nonpositive(float x) {
    const float xc = x < -87.f ? -87.f : x;
    const float big = xc * 1.44269504f + 12583039.f;           /* 1.5 * 2^23 + 127 + round(x / ln 2) */
    const float n = big - 12583039.f;
    const float r = xc - n * 0.693145752f - n * 1.42860677e-6f;  /* ln 2 in two parts */
    const float p = 1.f + r * (1.f + r * (1.f / 2 + r * (1.f / 6 + r * (1.f / 24 + r * (1.f / 120
                    + r * (1.f / 720 + r * (1.f / 5040)))))));
    uint32_t bits; memcpy(&bits, &big, 4);
    bits <<= 23;  /* (n + 127) << 23, n in [-126, 0] */
    float two_n; memcpy(&two_n, &bits, 4);
    return x < -87.f ? 0.f : p * two_n;
}

/* 16 floats as one value: GCC/Clang vector extensions, lowered to whatever the CPU has (one AVX-512
 * register, two AVX2 ones, four NEON ones). Loads and stores go through memcpy: any alignment.
 * For the int8 kernels' tiles of 16 outputs and the int8 inputs' quantization (decode_step.c);
 * loops that can run in the CPU's own width use `vec` (below). */
typedef float f32x16 __attribute__((vector_size(64)));
typedef uint16_t u16x16 __attribute__((vector_size(32)));
typedef uint32_t u32x16 __attribute__((vector_size(64)));

static inline f32x16 load16_f32(const float *p) { f32x16 v; memcpy(&v, p, 64); return v; }
static inline f32x16 load16_bf16(const bf16 *p) {
    u16x16 h; memcpy(&h, p, 32);
    u32x16 w = __builtin_convertvector(h, u32x16) << 16;
    f32x16 v; memcpy(&v, &w, 64); return v;
}
static inline void store16_f32(float *p, f32x16 v) { memcpy(p, &v, 64); }

/* the lanes of yes where mask is all ones, of no where it is zero (a vector comparison's result) */
typedef int32_t i32x16 __attribute__((vector_size(64)));
static inline f32x16 pick16(i32x16 mask, f32x16 yes, f32x16 no) {
    i32x16 y, n; memcpy(&y, &yes, 64); memcpy(&n, &no, 64);
    y = (y & mask) | (n & ~mask);
    f32x16 v; memcpy(&v, &y, 64); return v;
}

/* Vectors of the CPU's own width, `vec` (LANES floats): a wider vector type is split into these by
 * the compiler, and its temporaries spilled to memory (with the 16-float vectors above, training's
 * attention ran 2.5x and its loss 3.6x slower on AVX2 than on AVX-512, not 2x). */
#if defined(__AVX512F__)
#define LANES 16     /* 32 registers */
#elif defined(__AVX__)
#define LANES 8      /* 16 registers */
#else
#define LANES 4      /* NEON: 32 registers; SSE: 16 */
#endif
typedef float vec __attribute__((vector_size(4 * LANES)));
typedef int32_t ivec __attribute__((vector_size(4 * LANES)));
typedef uint32_t uvec __attribute__((vector_size(4 * LANES)));
typedef uint16_t hvec __attribute__((vector_size(2 * LANES)));
typedef uint8_t bvec __attribute__((vector_size(LANES)));

INLINE vec loadv_f32(const float *p) { vec v; memcpy(&v, p, sizeof v); return v; }
INLINE void storev_f32(float *p, vec v) { memcpy(p, &v, sizeof v); }
INLINE vec loadv_bf16(const bf16 *p) {
    hvec h; memcpy(&h, p, sizeof h);
    const uvec w = __builtin_convertvector(h, uvec) << 16;
    vec v; memcpy(&v, &w, sizeof v); return v;
}
#if defined(__AVX512BF16__) && LANES == 16
/* AVX512_BF16's conversion: to_bf16 on every lane in one instruction, except that it flushes
 * subnormal values (below 2^-126) to zero, where to_bf16 rounds them. With the integer rounding
 * below, the bias + GELU kernel's bf16 forward pass took 478 us a call on a Zen 4 (768 x 512, one
 * thread; 259 in fp32), with this 324. */
#include <immintrin.h>
INLINE void storev_bf16(bf16 *p, vec v) { const __m256bh h = _mm512_cvtneps_pbh((__m512)v); memcpy(p, &h, sizeof h); }
#else
INLINE void storev_bf16(bf16 *p, vec v) {  /* to_bf16 on every lane */
    uvec u; memcpy(&u, &v, sizeof u);
    const uvec nan = (uvec)((u & 0x7FFFFFFF) > 0x7F800000);  /* all ones where NaN */
    u = (((u + 0x7FFF + ((u >> 16) & 1)) >> 16) & ~nan) | (0x7FC0 & nan);
    const hvec h = __builtin_convertvector(u, hvec);
    memcpy(p, &h, sizeof h);
}
#endif
/* the lanes of yes where mask is all ones, of no where it is zero (a comparison's result) */
INLINE vec pickv(ivec mask, vec yes, vec no) {
    ivec y, n; memcpy(&y, &yes, sizeof y); memcpy(&n, &no, sizeof n);
    y = (y & mask) | (n & ~mask);
    vec v; memcpy(&v, &y, sizeof v); return v;
}
INLINE vec maxv(vec a, vec b) { return pickv(a > b, a, b); }
INLINE float max_of(vec v) {
    float m = v[0];
    for (int j = 1; j < LANES; j++) m = v[j] > m ? v[j] : m;
    return m;
}
/* The sum of the lanes pairwise, as a tree: lane j += lane j + n for n = LANES / 2, ..., 1. With
 * shuffles the same additions in the same order, in registers: as a loop over an array they went
 * through the stack, ~10% of the training attention's forward pass on a Zen 4. */
#if defined(__has_builtin)
#if __has_builtin(__builtin_shufflevector)
#define HAVE_SHUFFLE 1
#endif
#endif
INLINE float sum_of(vec v) {
#if defined(HAVE_SHUFFLE) && LANES == 16
    v += __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15, 8, 9, 10, 11, 12, 13, 14, 15);
    v += __builtin_shufflevector(v, v, 4, 5, 6, 7, 4, 5, 6, 7, 4, 5, 6, 7, 4, 5, 6, 7);
    v += __builtin_shufflevector(v, v, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3);
    v += __builtin_shufflevector(v, v, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1);
    return v[0];
#elif defined(HAVE_SHUFFLE) && LANES == 8
    v += __builtin_shufflevector(v, v, 4, 5, 6, 7, 4, 5, 6, 7);
    v += __builtin_shufflevector(v, v, 2, 3, 2, 3, 2, 3, 2, 3);
    v += __builtin_shufflevector(v, v, 1, 1, 1, 1, 1, 1, 1, 1);
    return v[0];
#elif defined(HAVE_SHUFFLE) && LANES == 4
    v += __builtin_shufflevector(v, v, 2, 3, 2, 3);
    v += __builtin_shufflevector(v, v, 1, 1, 1, 1);
    return v[0];
#else
    float t[LANES];
    memcpy(t, &v, sizeof t);
    for (int n = LANES / 2; n >= 1; n /= 2)
        for (int j = 0; j < n; j++) t[j] += t[j + n];
    return t[0];
#endif
}

/* exp_nonpositive (above) on every lane (the compiler does not vectorize the scalar one's loop),
 * 2^n from the rounded float's bits as there (a conversion to integers is undefined for NaN). */
INLINE vec expv_nonpositive(vec x) {
    const vec zero = {0};
    const ivec low = x < -87.f;  /* all ones where exp(x) is 0 in fp32 (and for -inf) */
    const vec xc = pickv(low, zero - 87.f, x);
    const vec big = xc * 1.44269504f + 12583039.f, n = big - 12583039.f;
    const vec r = xc - n * 0.693145752f - n * 1.42860677e-6f;
    const vec p = 1.f + r * (1.f + r * (1.f / 2 + r * (1.f / 6 + r * (1.f / 24 + r * (1.f / 120
                  + r * (1.f / 720 + r * (1.f / 5040)))))));
    uvec two_n;
    memcpy(&two_n, &big, sizeof two_n);
    two_n <<= 23;
    vec scale;
    memcpy(&scale, &two_n, sizeof scale);
    return pickv(low, zero, p * scale);  /* NaN where x is: r and p are */
}

/* v kept in a register from here on (an empty asm that says it changes v), for a loaded vector that
 * several FMAs use: otherwise GCC may fold each use into its FMA as a memory operand, one load per
 * FMA instead of one, and the products run load-bound. The training attention's products (4 uses a
 * vector) took 1.10-1.29x as long without it on a Zen 4 (AVX-512; capped to AVX2 1.14-1.18x), fwd +
 * bwd, fp32 and bf16; the linear kernel's fp32 products (LIN_MR uses) 1.01-1.05x on AVX2 there. */
#if defined(__x86_64__) && defined(__AVX__) && defined(__GNUC__)  /* (a vector of 8 floats or more) */
#define IN_REGISTER(v) __asm__("" : "+v"(v))
#else
#define IN_REGISTER(v) (void)0
#endif

/* Whether any of n floats is NaN: a softmax whose largest score is -inf (nothing to attend to, zeros)
 * asks, so that scores of NaN give NaN, as the arithmetic (and PyTorch's math attention) does, not
 * zeros (PyTorch's fused CPU attention gives zeros there). A rare path: the maximum skips NaN. */
static inline int any_nan(const float *x, int64_t n) {
    int nan = 0;
    for (int64_t i = 0; i < n; i++) nan |= x[i] != x[i];
    return nan;
}

/* On an entry point whose loops are its own: it starts on a 64-byte boundary, so that where its hot
 * loops fall against the instruction fetch's 32/64-byte windows depends on its own code only, not on
 * the size of what precedes it in the library (greedy's argmax ran 15% slower, or not, with an edit
 * elsewhere in decode_step.c). */
#define HOT __attribute__((aligned(64)))

/* Asks for n rows of `bytes` at a stride of `stride` bytes to be brought into the caches. */
static inline void prefetch_rows(const void *p, int64_t n, int64_t stride, int64_t bytes) {
    for (int64_t r = 0; r < n; r++)
        for (int64_t c = 0; c < bytes; c += 64) __builtin_prefetch((const char *)p + r * stride + c);
}

#endif
