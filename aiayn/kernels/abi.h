/* The boundary between aiayn's Python (aiayn/kernels/__init__.py, through ctypes) and its C kernels.
 *
 * - Every kernel takes one argument, a pointer to its own struct below, and returns an aiayn_status:
 *   AIAYN_OK, or why it refused the call. Each checks its sizes, limits, strides and required
 *   pointers once per call, before any work: a refused call has written nothing. (Python falls back
 *   to PyTorch's operators where a wrapper may decline, raises MemoryError or KernelError elsewhere.)
 * - Each struct is declared once, as a list of (type, name): AIAYN_<KERNEL>_ARGS below (an X-macro).
 *   From it come the C typedef and a table of every field's name, type, offset and size (abi.c,
 *   aiayn_abi_fields). When Python loads the library it compares that table, field by field, the
 *   status names and AIAYN_ABI_VERSION with its own (ctypes.Structure mirrors): any difference, and
 *   the library is not used (one RuntimeWarning; PyTorch's operators run, as after a failed build).
 * - Fields come in this order: pointers (typed where the kernel's element type is fixed, `void *`
 *   where it is the variant's: fp32 for `_f32`, bf16 for `_bf16`), int64 sizes and strides (in
 *   elements), floats. NULL is 0. What a kernel cannot check (that a pointer addresses as many
 *   elements as the sizes say; which buffers may alias) is the caller's promise, stated by each field.
 * - The limits (AIAYN_MAX_*) size the kernels' stack buffers and bound their scratch. They are defined
 *   here only: Python reads them from the library (aiayn_max_keys() ...).
 * - No value is undefined behaviour: NaN and infinities in the inputs give NaN or the result each
 *   kernel documents, never an out-of-range float-to-int conversion (common.h, exp_nonpositive).
 * Change a struct, a status or a limit's meaning: bump AIAYN_ABI_VERSION and ABI_VERSION in Python.
 */
#ifndef AIAYN_KERNELS_ABI_H
#define AIAYN_KERNELS_ABI_H

#include <stdint.h>

#define AIAYN_ABI_VERSION 9

typedef enum {
    AIAYN_OK = 0,
    AIAYN_NULL_POINTER = 1,  /* a pointer the call needs is NULL */
    AIAYN_BAD_SIZE = 2,      /* a size is negative, zero where it must not be, or inconsistent with another */
    AIAYN_OVER_LIMIT = 3,    /* a size is over one of the limits below */
    AIAYN_BAD_STRIDE = 4,    /* a stride is negative, or shorter than the row it steps over */
    AIAYN_BAD_INDEX = 5,     /* an id (a token, a target, EOS) is outside its range */
    AIAYN_NO_MEMORY = 6,     /* the call's scratch could not be allocated */
} aiayn_status;

enum {
    AIAYN_MAX_KEYS = 4096,      /* keys per attention row (training: queries too) */
    AIAYN_MAX_HEAD_DIM = 1024,  /* an attention head's size */
    AIAYN_MAX_ROW = 16384,      /* add_norm's row */
    AIAYN_INT8_HEAD = 128,      /* bytes at the head of an int8 tile: 16 fp32 scales, 16 int32 weight sums */
    AIAYN_INT8_MAX_K = 65536,   /* an int8 linear's inputs: int32 sums of 4 products of <= 255 * 128 a group */
};

/* --------------------------------------------------------------------- decode_step.c's kernels */
#define AIAYN_ATTEND_ARGS(X)                                                                          \
    X(const void *, q)        /* (B, H, n_queries, dh) at strides qs_b, qs_h, qs_i */                 \
    X(void *, k)              /* (B / group, H, >= t, dh) at ks_b, ks_h, ks_t */                      \
    X(void *, v)              /* as k, at vs_b, vs_h, vs_t */                                         \
    X(const uint8_t *, mask)  /* (B / group, t) at ms_b, 0 = excluded; or NULL */                     \
    X(void *, out)            /* (B, n_queries, H, dh) at os_b, os_i, os_h */                          \
    X(const void *, k_new)    /* (B, H, dh) at kn_b, kn_h, written at position t - 1 of k; or NULL */ \
    X(const void *, v_new)    /* as k_new, into v (both or neither; group 1) */                       \
    X(int64_t, B) X(int64_t, H) X(int64_t, n_queries) X(int64_t, t) X(int64_t, dh) X(int64_t, group)   \
    X(int64_t, qs_b) X(int64_t, qs_h) X(int64_t, qs_i)                                                \
    X(int64_t, ks_b) X(int64_t, ks_h) X(int64_t, ks_t)                                                \
    X(int64_t, vs_b) X(int64_t, vs_h) X(int64_t, vs_t) X(int64_t, ms_b)                               \
    X(int64_t, os_b) X(int64_t, os_i) X(int64_t, os_h)                                                \
    X(int64_t, kn_b) X(int64_t, kn_h) X(int64_t, vn_b) X(int64_t, vn_h)                               \
    X(float, scale)           /* multiplies q . k */

#define AIAYN_ADD_NORM_ARGS(X)                                                                        \
    X(const void *, x) X(const void *, y)  /* rows of n at strides xs, ys */                          \
    X(const void *, weight) X(const void *, bias)  /* n each */                                       \
    X(void *, out)            /* rows of n at os; may be x or y */                                    \
    X(int64_t, rows) X(int64_t, n) X(int64_t, xs) X(int64_t, ys) X(int64_t, os)                       \
    X(float, eps)

#define AIAYN_ARGMAX_ARGS(X)                                                                          \
    X(const void *, x)          /* rows of n logits at stride xs */                                   \
    X(const int64_t *, banned)  /* n_banned ids never chosen */                                       \
    X(int64_t *, out)           /* rows: the chosen ids */                                            \
    X(int64_t *, record)        /* (record_rows, record_stride): out[r] also at [rows_of[r], column]; or NULL */ \
    X(const int64_t *, rows_of) /* rows (with record) */                                              \
    X(const int64_t *, limits)  /* rows (with record): a row is done once limits[r] <= step_len */    \
    X(int64_t, rows) X(int64_t, n) X(int64_t, xs) X(int64_t, n_banned)                                \
    X(int64_t, record_stride) X(int64_t, record_rows) X(int64_t, column) X(int64_t, eos)              \
    X(int64_t, step_len)                                                                              \
    X(int64_t, done)            /* written: the rows done (with record) */

#define AIAYN_EMBED_ARGS(X)                                                                           \
    X(const int64_t *, tokens)  /* rows ids in [0, vocab) */                                          \
    X(const void *, table)      /* (vocab, n) */                                                      \
    X(const void *, positions)  /* (length, n): row r takes positions[r % length] */                  \
    X(void *, out)              /* (rows, n) */                                                       \
    X(int64_t, rows) X(int64_t, length) X(int64_t, vocab) X(int64_t, n)                               \
    X(float, scale)

#define AIAYN_BEAM_ARGS(X)                                                                            \
    X(const void *, x)            /* sentences * r rows of V logits at stride xs */                   \
    X(const float *, scores)      /* sentences * r: each beam's score so far */                       \
    X(const int64_t *, forbid)    /* n_forbid ids never candidates */                                 \
    X(const uint8_t *, at_limit)  /* sentences bytes: EOS only where set; or NULL */                  \
    X(float *, out_scores) X(int64_t *, out_tokens) X(int64_t *, out_beams)  /* sentences x n each */ \
    X(int64_t *, unsettled)       /* 1: sentences with EOS among their `keep` best or a -inf best; or NULL */ \
    X(int64_t, sentences) X(int64_t, r) X(int64_t, V) X(int64_t, xs) X(int64_t, n)                    \
    X(int64_t, n_forbid) X(int64_t, eos) X(int64_t, eos_banned) X(int64_t, keep)

#define AIAYN_LINEAR_ARGS(X)                                                                          \
    X(const void *, x)          /* rows of k at stride xs */                                          \
    X(const void *, w)          /* the weight (n, k) in tiles, zero past row n (and column k): fp32 \
                                   (ceil(n / 16), k, 16); bf16 (ceil(n / 16), ceil(k / 2), 16, 2); \
                                   int8 (ceil(n / 16), 128 + 16 g ceil(k / g)) bytes, g 4 where     \
                                   aiayn_int8_levels() > 0, else 1: 16 fp32 scales, 16 int32 sums   \
                                   of each output's weights, then (ceil(k / g), 16, g) int8 */       \
    X(const void *, bias)       /* n; or NULL */                                                      \
    X(void *, out)              /* rows of n at stride os; not overlapping x */                       \
    X(int64_t, rows) X(int64_t, n) X(int64_t, k) X(int64_t, xs) X(int64_t, os)                        \
    X(int64_t, relu)            /* 1: max(0, .) of each output (NaN stays NaN) */

#define AIAYN_QUANTIZE_ARGS(X)                                                                        \
    X(const void *, x)          /* rows of k at stride xs */                                          \
    X(uint8_t *, out)           /* (rows, k) contiguous, written: round(x / scale) + zero, in [0, 255] */ \
    X(int64_t, rows) X(int64_t, k) X(int64_t, xs)                                                     \
    X(int64_t, zero)            /* written: round(-min(x, 0) / scale) */                              \
    X(float, scale)             /* written: (max(x, 0) - min(x, 0)) / 255 (1 if that is 0); NaN, out \
                                   not written, if a value is not finite */

#define AIAYN_DECODER_LAYER_ARGS(X)                                                                   \
    X(const void *, x)          /* (B, D) contiguous: the layer's input, one new position a row */    \
    X(void *, out)              /* (B, D) contiguous: its output; may be x */                         \
    /* the weights, in `linear`'s tiles, and biases (or NULL); norms' weights and biases, D each */   \
    X(const void *, qkv_w) X(const void *, qkv_b)      /* self-attention's [q | k | v] (3D, D) */     \
    X(const void *, self_w) X(const void *, self_b)    /* its output projection (D, D) */             \
    X(const void *, norm1_w) X(const void *, norm1_b)                                                 \
    X(const void *, q_w) X(const void *, q_b)          /* cross-attention's queries (D, D) */         \
    X(const void *, cross_w) X(const void *, cross_b)  /* its output projection (D, D) */             \
    X(const void *, norm2_w) X(const void *, norm2_b)                                                 \
    X(const void *, ff1_w) X(const void *, ff1_b)      /* (d_ff, D), then ReLU */                     \
    X(const void *, ff2_w) X(const void *, ff2_b)      /* (D, d_ff) */                                \
    X(const void *, norm3_w) X(const void *, norm3_b)                                                 \
    X(void *, k_cache) X(void *, v_cache)  /* (B, H, > t, dh) at ks_* / vs_*: positions 0..t-1 read, \
                                              the new keys and values written at t */                 \
    X(const void *, source_k) X(const void *, source_v)  /* (B / group, H, S, dh) at sks_* / svs_* */ \
    X(const uint8_t *, mask)    /* (B / group, S) at ms_b, 0 = excluded; or NULL */                   \
    X(int64_t, B) X(int64_t, D) X(int64_t, H) X(int64_t, d_ff) X(int64_t, t) X(int64_t, S)            \
    X(int64_t, group)           /* rows per source row (beam search) */                               \
    X(int64_t, ks_b) X(int64_t, ks_h) X(int64_t, ks_t) X(int64_t, vs_b) X(int64_t, vs_h) X(int64_t, vs_t) \
    X(int64_t, sks_b) X(int64_t, sks_h) X(int64_t, sks_t) X(int64_t, svs_b) X(int64_t, svs_h) X(int64_t, svs_t) \
    X(int64_t, ms_b)                                                                                  \
    X(float, eps)               /* the three LayerNorms' */

#define AIAYN_DECODER_STEP_ARGS(X)                                                                    \
    X(const int64_t *, tokens)  /* B ids in [0, vocab): each row's newest token */                    \
    X(const void *, table) X(const void *, positions)  /* (vocab, D) embeddings; D: position t's */   \
    X(const decoder_layer_args *, layers)  /* n_layers, each a layer's decoder_layer_args but its x, \
                                              out, B and t (this call's) */                           \
    X(const void *, out_w) X(const void *, out_b)  /* the generator (V, D) in `linear`'s tiles; its   \
                                                      bias or NULL. out_w NULL: no generator (V = D) */ \
    X(void *, logits)           /* (B, V) contiguous, written: the logits, or the decoder's output */ \
    X(const int64_t *, order)   /* B ids in [0, B), or NULL: first each layer's cache rows reordered in \
                                   place, row b taking row order[b]'s positions 0..t-1 (beam search) */ \
    X(int64_t, B) X(int64_t, t) X(int64_t, n_layers) X(int64_t, vocab) X(int64_t, D) X(int64_t, V)    \
    X(float, scale)             /* multiplies the embeddings */

#define AIAYN_SEARCH_ARGS(X)                                                                          \
    X(const decoder_step_args *, step)  /* the decoding step for k rows of caches (its tokens, positions, \
                                           logits, order, B and t are the search's) */                \
    X(const void *, positions)  /* (max_len + 1, D): position t's in row t */                         \
    X(const float *, penalties) /* max_len + 1: lp(t + 1), which divides a hypothesis ending at step t */ \
    X(const int64_t *, forbid)  /* n_forbid ids never generated */                                    \
    X(int64_t *, out_tokens)    /* (k, max_len + 1) written: the finished hypotheses' tokens, in the   \
                                   order they finished, without BOS and EOS */                        \
    X(float *, out_scores)      /* k written: their log-probabilities divided by lp(|Y|) */           \
    X(int64_t *, out_lengths)   /* k written: their lengths */                                        \
    X(int64_t, k) X(int64_t, bos) X(int64_t, eos) X(int64_t, max_len) X(int64_t, min_len)             \
    X(int64_t, n_forbid)                                                                              \
    X(int64_t, finished)        /* written: how many hypotheses finished (<= k) */                    \
    X(int64_t, steps)           /* written: how many decoding steps ran */

#define AIAYN_GREEDY_ARGS(X)                                                                          \
    X(const decoder_step_args *, step)  /* the decoding step for one row of caches (its tokens,        \
                                           positions, logits and t are the search's) */               \
    X(const void *, positions)  /* (max_len, D): position t's in row t */                             \
    X(const int64_t *, forbid)  /* n_forbid ids never generated */                                    \
    X(int64_t *, out_tokens)    /* max_len written: the tokens, without BOS and EOS */                \
    X(int64_t, bos) X(int64_t, eos) X(int64_t, max_len) X(int64_t, min_len) X(int64_t, n_forbid)      \
    X(int64_t, length)          /* written: how many tokens */

/* ---------------------------------------------------------------------- train_step.c's kernels */
#define AIAYN_ATTENTION_FORWARD_ARGS(X)                                                               \
    X(const void *, q)         /* (B, nt, >= H dh) at qs_b, qs_t: nt queries per row */                                    \
    X(const void *, k) X(const void *, v)  /* (B, ns, >= H dh) at ks_b, ks_s and vs_b, vs_s: ns keys */         \
    X(const uint8_t *, mask)   /* (B, nt, ns) at ms_b, ms_t, 1; a stride 0 broadcasts; or NULL */       \
    X(void *, out)             /* (B, nt, >= H dh) at os_b, os_t */                                    \
    X(float *, probs)          /* written: the softmax, (B, H, nt, ns) contiguous; or NULL (not kept) */ \
    X(int64_t, B) X(int64_t, H) X(int64_t, nt) X(int64_t, ns) X(int64_t, dh)                            \
    X(int64_t, qs_b) X(int64_t, qs_t) X(int64_t, ks_b) X(int64_t, ks_s) X(int64_t, vs_b) X(int64_t, vs_s) \
    X(int64_t, ms_b) X(int64_t, ms_t) X(int64_t, os_b) X(int64_t, os_t)                               \
    X(int64_t, threads)                                                                               \
    X(int64_t, seed) X(int64_t, threshold)  /* dropout on the weights: dropout_mask's over (B, H, nt, ns) */ \
    X(float, scale)                                                                                   \
    X(float, keep)             /* a kept weight's factor, 1 / (1 - p) (threshold 0: no dropout) */

#define AIAYN_ATTENTION_BACKWARD_ARGS(X)                                                              \
    X(const void *, q) X(const void *, k) X(const void *, v)  /* as in the forward pass */            \
    X(const void *, dout)      /* (B, nt, >= H dh) at gs_b, gs_t */                                    \
    X(const float *, probs)    /* the forward pass's; or NULL: the softmax is computed again */       \
    X(const uint8_t *, mask)   /* as in the forward pass */                                           \
    X(void *, dq) X(void *, dk) X(void *, dv)  /* written, at dqs_*, dks_*, dvs_* */                  \
    X(int64_t, B) X(int64_t, H) X(int64_t, nt) X(int64_t, ns) X(int64_t, dh)                            \
    X(int64_t, qs_b) X(int64_t, qs_t) X(int64_t, ks_b) X(int64_t, ks_s) X(int64_t, vs_b) X(int64_t, vs_s) \
    X(int64_t, ms_b) X(int64_t, ms_t)                                                                 \
    X(int64_t, gs_b) X(int64_t, gs_t) X(int64_t, dqs_b) X(int64_t, dqs_t)                             \
    X(int64_t, dks_b) X(int64_t, dks_s) X(int64_t, dvs_b) X(int64_t, dvs_s)                           \
    X(int64_t, threads)                                                                               \
    X(int64_t, seed) X(int64_t, threshold)  /* the forward pass's */                                  \
    X(float, scale) X(float, keep)

#define AIAYN_DROPOUT_MASK_ARGS(X)                                                                    \
    X(void *, mask)            /* n, written */                                                       \
    X(int64_t, n) X(int64_t, seed)                                                                    \
    X(int64_t, threshold)      /* in [0, 65536]: an element is dropped with probability threshold / 65536 */ \
    X(int64_t, threads)                                                                               \
    X(float, scale)            /* a kept element's value */

#define AIAYN_RESIDUAL_NORM_FORWARD_ARGS(X)                                                           \
    X(const void *, x) X(const void *, y)  /* (rows, n) contiguous; y (and mask) of the y type */     \
    X(const void *, mask)      /* (rows, n) dropout's scaled mask; or NULL */                         \
    X(const void *, w) X(const void *, b)  /* n each */                                               \
    X(void *, out) X(void *, z)  /* written: (rows, n) each */                                        \
    X(float *, stats)          /* written: (rows, 2) mean, 1 / std */                                 \
    X(int64_t, rows) X(int64_t, n) X(int64_t, threads)                                                \
    X(float, eps)

#define AIAYN_RESIDUAL_NORM_BACKWARD_ARGS(X)                                                          \
    X(const void *, dout) X(const void *, z) X(const void *, mask) X(const void *, w)                 \
    X(const float *, stats)                                                                           \
    X(void *, dx) X(void *, dy)  /* written: (rows, n) each, dy of the y type; dy NULL: dy = dx */    \
    X(float *, partial)        /* (threads, 2, n) zeros: each part's sums of dw and db */             \
    X(int64_t, rows) X(int64_t, n) X(int64_t, threads)

#define AIAYN_CROSS_ENTROPY_ARGS(X)                                                                   \
    X(const void *, logits)    /* rows of V at stride */                                              \
    X(const int64_t *, target) /* rows ids in [0, V) */                                               \
    X(float *, losses)         /* written: rows */                                                    \
    X(void *, grad)            /* written: (rows, V) contiguous; or NULL */                           \
    X(int64_t, stride) X(int64_t, rows) X(int64_t, V) X(int64_t, threads)                             \
    X(float, eps) X(float, scale)

#define AIAYN_BIAS_GELU_FORWARD_ARGS(X)                                                               \
    X(const void *, h)         /* (rows, n) contiguous: the first linear layer's product, no bias */  \
    X(const float *, bias)     /* n */                                                                \
    X(void *, out)             /* written: (rows, n), gelu(h + bias) */                               \
    X(void *, grad)            /* written: (rows, n), gelu'(h + bias), for the backward pass; or NULL */ \
    X(int64_t, rows) X(int64_t, n) X(int64_t, threads)

#define AIAYN_BIAS_GELU_BACKWARD_ARGS(X)                                                              \
    X(const void *, dout) X(const void *, grad)  /* (rows, n) contiguous each: grad the forward pass's */ \
    X(void *, dh)              /* written: (rows, n), dout grad */                                    \
    X(float *, partial)        /* (threads, n) zeros: each part's sums of dh (the bias's gradient) */ \
    X(int64_t, rows) X(int64_t, n) X(int64_t, threads)

/* Every kernel, with its entry points' variants (suffixes). */
#define AIAYN_KERNELS(K)                                                                              \
    K(attend) K(add_norm) K(argmax) K(embed) K(beam) K(linear) K(quantize) K(decoder_layer)        \
    K(decoder_step) K(search) K(greedy)                                                               \
    K(attention_forward) K(attention_backward) K(dropout_mask)                                        \
    K(residual_norm_forward) K(residual_norm_backward) K(cross_entropy)                              \
    K(bias_gelu_forward) K(bias_gelu_backward)

#define AIAYN_FIELD(type, name) type name;
#define AIAYN_STRUCT(kernel, ARGS) typedef struct { ARGS(AIAYN_FIELD) } kernel##_args;
AIAYN_STRUCT(attend, AIAYN_ATTEND_ARGS)
AIAYN_STRUCT(add_norm, AIAYN_ADD_NORM_ARGS)
AIAYN_STRUCT(argmax, AIAYN_ARGMAX_ARGS)
AIAYN_STRUCT(embed, AIAYN_EMBED_ARGS)
AIAYN_STRUCT(beam, AIAYN_BEAM_ARGS)
AIAYN_STRUCT(linear, AIAYN_LINEAR_ARGS)
AIAYN_STRUCT(quantize, AIAYN_QUANTIZE_ARGS)
AIAYN_STRUCT(decoder_layer, AIAYN_DECODER_LAYER_ARGS)
AIAYN_STRUCT(decoder_step, AIAYN_DECODER_STEP_ARGS)
AIAYN_STRUCT(search, AIAYN_SEARCH_ARGS)
AIAYN_STRUCT(greedy, AIAYN_GREEDY_ARGS)
AIAYN_STRUCT(attention_forward, AIAYN_ATTENTION_FORWARD_ARGS)
AIAYN_STRUCT(attention_backward, AIAYN_ATTENTION_BACKWARD_ARGS)
AIAYN_STRUCT(dropout_mask, AIAYN_DROPOUT_MASK_ARGS)
AIAYN_STRUCT(residual_norm_forward, AIAYN_RESIDUAL_NORM_FORWARD_ARGS)
AIAYN_STRUCT(residual_norm_backward, AIAYN_RESIDUAL_NORM_BACKWARD_ARGS)
AIAYN_STRUCT(cross_entropy, AIAYN_CROSS_ENTROPY_ARGS)
AIAYN_STRUCT(bias_gelu_forward, AIAYN_BIAS_GELU_FORWARD_ARGS)
AIAYN_STRUCT(bias_gelu_backward, AIAYN_BIAS_GELU_BACKWARD_ARGS)

/* The entry points: <kernel>_f32 and <kernel>_bf16 (the residual norm also _f32_bf16: an fp32 stream,
 * a bf16 sublayer output, as under autocast). argmax writes its `done`, quantize its `zero` and `scale`,
 * search and greedy what they found: their structs are not const. */
#define AIAYN_ENTRY(kernel, qualifier) int kernel##_f32(qualifier kernel##_args *); int kernel##_bf16(qualifier kernel##_args *);
AIAYN_ENTRY(attend, const) AIAYN_ENTRY(add_norm, const) AIAYN_ENTRY(argmax, ) AIAYN_ENTRY(embed, const)
AIAYN_ENTRY(beam, const) AIAYN_ENTRY(linear, const) AIAYN_ENTRY(quantize, ) AIAYN_ENTRY(decoder_layer, const)
AIAYN_ENTRY(decoder_step, const) AIAYN_ENTRY(search, ) AIAYN_ENTRY(greedy, )
AIAYN_ENTRY(attention_forward, const) AIAYN_ENTRY(attention_backward, const)
AIAYN_ENTRY(dropout_mask, const) AIAYN_ENTRY(residual_norm_forward, const)
AIAYN_ENTRY(residual_norm_backward, const) AIAYN_ENTRY(cross_entropy, const)
AIAYN_ENTRY(bias_gelu_forward, const) AIAYN_ENTRY(bias_gelu_backward, const)
int linear_f32_i8(const linear_args *);  /* int8 weights (tiles with their scales), fp32 inputs */
int decoder_layer_f32_i8(const decoder_layer_args *);
int decoder_step_f32_i8(const decoder_step_args *);
int search_f32_i8(search_args *);
int greedy_f32_i8(greedy_args *);
int residual_norm_forward_f32_bf16(const residual_norm_forward_args *);
int residual_norm_backward_f32_bf16(const residual_norm_backward_args *);

/* What the library says about itself (abi.c). */
typedef struct { const char *name, *type; int64_t offset, size; } aiayn_field;
int aiayn_abi_version(void);
const aiayn_field *aiayn_abi_fields(const char *kernel, int64_t *size);  /* NULL-named last; NULL if unknown */
const char *aiayn_status_name(int status);     /* "OVER_LIMIT" for AIAYN_OVER_LIMIT ...; "" if unknown */
const char *aiayn_status_message(int status);  /* what it means, in words */
int64_t aiayn_max_keys(void);
int64_t aiayn_max_head_dim(void);
int64_t aiayn_max_row(void);
int64_t aiayn_int8_head(void);
int64_t aiayn_int8_max_k(void);
int64_t aiayn_int8_levels(void);  /* int8 kernel: inputs rounded to 127 (AVX512_VNNI) or 63 (AVX2) levels
                                    a sign, in tiles of groups of 4; 0: not rounded, groups of 1 */

/* Checks at the top of a kernel: the call returns `status` unless `condition` holds. */
#define AIAYN_REQUIRE(condition, status) do { if (!(condition)) return (status); } while (0)

#endif
