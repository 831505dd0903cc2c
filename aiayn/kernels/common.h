/* What aiayn's C kernels share (decode_step.c, train_step.c): their argument structs and limits
 * (abi.h), bf16 <-> fp32, a vectorizable exp, 16-float vectors, prefetching. */
#ifndef AIAYN_KERNELS_COMMON_H
#define AIAYN_KERNELS_COMMON_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "abi.h"

typedef uint16_t bf16;

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
 * register, two AVX2 ones, four NEON ones). Loads and stores go through memcpy: any alignment. */
typedef float f32x16 __attribute__((vector_size(64)));
typedef float f32x8 __attribute__((vector_size(32)));
typedef float f32x4 __attribute__((vector_size(16)));
typedef uint16_t u16x16 __attribute__((vector_size(32)));
typedef uint32_t u32x16 __attribute__((vector_size(64)));

static inline f32x16 load16_f32(const float *p) { f32x16 v; memcpy(&v, p, 64); return v; }
static inline f32x16 load16_bf16(const bf16 *p) {
    u16x16 h; memcpy(&h, p, 32);
    u32x16 w = __builtin_convertvector(h, u32x16) << 16;
    f32x16 v; memcpy(&v, &w, 64); return v;
}
static inline float sum16(f32x16 v) {  /* a tree, not 15 additions in a row */
    f32x8 a, b; memcpy(&a, &v, 32); memcpy(&b, (char *)&v + 32, 32); a += b;
    f32x4 c, d; memcpy(&c, &a, 16); memcpy(&d, (char *)&a + 16, 16); c += d;
    return (c[0] + c[2]) + (c[1] + c[3]);
}
static inline void store16_f32(float *p, f32x16 v) { memcpy(p, &v, 64); }
static inline void store16_bf16(bf16 *p, f32x16 v) {  /* to_bf16 on 16 lanes */
    u32x16 u; memcpy(&u, &v, 64);
    const u32x16 nan = (u & 0x7FFFFFFF) > 0x7F800000;  /* all ones where NaN */
    u = (((u + 0x7FFF + ((u >> 16) & 1)) >> 16) & ~nan) | (0x7FC0 & nan);
    const u16x16 h = __builtin_convertvector(u, u16x16);
    memcpy(p, &h, 32);
}

/* the lanes of yes where mask is all ones, of no where it is zero (a vector comparison's result) */
typedef int32_t i32x16 __attribute__((vector_size(64)));
static inline f32x16 pick16(i32x16 mask, f32x16 yes, f32x16 no) {
    i32x16 y, n; memcpy(&y, &yes, 64); memcpy(&n, &no, 64);
    y = (y & mask) | (n & ~mask);
    f32x16 v; memcpy(&v, &y, 64); return v;
}

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
