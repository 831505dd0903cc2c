/* The C kernels on fixed inputs, every output printed: built for another instruction set (aarch64
 * under qemu, x86 without AVX-512 or AVX), its lines are compared with the host's, whose kernels
 * the Python tests check against PyTorch (tests/model/test_kernel_isa.py). Lines: "<name> <value>";
 * bf16 outputs are named bf16_*, their last bit may differ where fp32 sums differ in order. */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "abi.h"

typedef uint16_t bf16;

static uint64_t state = 88172645463325252ull;
static float uniform(void) {  /* xorshift64: in [-1, 1) */
    state ^= state << 13; state ^= state >> 7; state ^= state << 17;
    return (float)((state >> 40) / 8388608.0 - 1.0);
}
static float *randoms(int64_t n, float scale) {
    float *x = malloc(sizeof(float) * (size_t)n);
    for (int64_t i = 0; i < n; i++) x[i] = scale * uniform();
    return x;
}
static bf16 to_bf16(float x) { uint32_t u; memcpy(&u, &x, 4); return (bf16)((u + 0x7FFF + ((u >> 16) & 1)) >> 16); }
static float from_bf16(bf16 h) { uint32_t u = (uint32_t)h << 16; float x; memcpy(&x, &u, 4); return x; }
static bf16 *bf16s(const float *x, int64_t n) {
    bf16 *h = malloc(sizeof(bf16) * (size_t)n);
    for (int64_t i = 0; i < n; i++) h[i] = to_bf16(x[i]);
    return h;
}

static void show(const char *name, const float *x, int64_t n) {
    for (int64_t i = 0; i < n; i++) printf("%s %.9g\n", name, x[i]);
}
static void show_bf16(const char *name, const bf16 *x, int64_t n) {
    for (int64_t i = 0; i < n; i++) printf("%s %.9g\n", name, from_bf16(x[i]));
}
static void check(const char *what, int status) {
    if (status != AIAYN_OK) { fprintf(stderr, "%s: status %d\n", what, status); exit(1); }
}

/* a weight (n, k) in linear's fp32 tiles (ceil(n / 16), k, 16) and bf16 tiles (ceil(n / 16), ceil(k / 2), 16, 2) */
static float *tiles_f32(const float *w, int64_t n, int64_t k) {
    const int64_t t = (n + 15) / 16;
    float *out = calloc((size_t)(t * k * 16), sizeof(float));
    for (int64_t o = 0; o < n; o++)
        for (int64_t i = 0; i < k; i++) out[(o / 16) * k * 16 + i * 16 + o % 16] = w[o * k + i];
    return out;
}
static bf16 *tiles_bf16(const float *w, int64_t n, int64_t k) {
    const int64_t t = (n + 15) / 16, pairs = (k + 1) / 2;
    bf16 *out = calloc((size_t)(t * pairs * 32), sizeof(bf16));
    for (int64_t o = 0; o < n; o++)
        for (int64_t i = 0; i < k; i++) out[(o / 16) * pairs * 32 + (i / 2) * 32 + (o % 16) * 2 + i % 2] = to_bf16(w[o * k + i]);
    return out;
}

static void linears(void) {
    enum { N = 40, K = 37, ROWS = 13 };
    float *w = randoms(N * K, 0.3f), *b = randoms(N, 1.f), *x = randoms(ROWS * K, 1.f);
    float *wt = tiles_f32(w, N, K), out[ROWS * N];
    bf16 *wb = tiles_bf16(w, N, K), *xb = bf16s(x, ROWS * K), *bb = bf16s(b, N), outb[ROWS * N];
    for (int relu = 0; relu <= 1; relu++)
        for (int64_t rows = 1; rows <= ROWS; rows += 3) {  /* 1, 4, 7, 10, 13: every row count's kernels */
            check("linear_f32", linear_f32(&(linear_args){.x = x, .w = wt, .bias = b, .out = out, .rows = rows,
                                                          .n = N, .k = K, .xs = K, .os = N, .relu = relu}));
            show("linear_f32", out, rows * N);
            check("linear_bf16", linear_bf16(&(linear_args){.x = xb, .w = wb, .bias = bb, .out = outb, .rows = rows,
                                                            .n = N, .k = K, .xs = K, .os = N, .relu = relu}));
            show_bf16("bf16_linear", outb, rows * N);
        }
}

static void decoding_attention(void) {
    enum { B = 3, H = 2, T = 9 };
    const int64_t sizes[] = {64, 20};  /* the vector path and the scalar one */
    for (int d = 0; d < 2; d++) {
        const int64_t dh = sizes[d];
        float *q = randoms(B * H * dh, 1.f), *k = randoms(B * H * T * dh, 1.f), *v = randoms(B * H * T * dh, 1.f);
        float *out = malloc(sizeof(float) * (size_t)(B * H * dh));
        uint8_t mask[B * T];
        for (int i = 0; i < B * T; i++) mask[i] = (i % 4) != 1;
        for (int masked = 0; masked <= 1; masked++) {
            check("attend_f32", attend_f32(&(attend_args){
                .q = q, .k = k, .v = v, .mask = masked ? mask : NULL, .out = out, .B = B, .H = H, .n_queries = 1,
                .t = T, .dh = dh, .group = 1, .qs_b = H * dh, .qs_h = dh, .qs_i = dh, .ks_b = H * T * dh,
                .ks_h = T * dh, .ks_t = dh, .vs_b = H * T * dh, .vs_h = T * dh, .vs_t = dh, .ms_b = T,
                .os_b = H * dh, .os_i = H * dh, .os_h = dh, .scale = 0.125f}));
            show("attend_f32", out, B * H * dh);
        }
    }
}

static void rows(void) {
    enum { R = 5, N = 43, V = 37 };
    float *x = randoms(R * N, 2.f), *y = randoms(R * N, 2.f), *w = randoms(N, 1.f), *b = randoms(N, 1.f), out[R * N];
    check("add_norm_f32", add_norm_f32(&(add_norm_args){.x = x, .y = y, .weight = w, .bias = b, .out = out,
                                                        .rows = R, .n = N, .xs = N, .ys = N, .os = N, .eps = 1e-5f}));
    show("add_norm_f32", out, R * N);

    float *logits = randoms(R * V, 4.f), losses[R], grad[R * V];
    int64_t target[R] = {0, 36, 5, 17, 3}, banned[1] = {0}, best[R];
    check("argmax_f32", argmax_f32(&(argmax_args){.x = logits, .banned = banned, .out = best, .rows = R, .n = V,
                                                  .xs = V, .n_banned = 1}));
    for (int r = 0; r < R; r++) printf("argmax %lld\n", (long long)best[r]);
    check("cross_entropy_f32", cross_entropy_f32(&(cross_entropy_args){
        .logits = logits, .target = target, .losses = losses, .grad = grad, .stride = V, .rows = R, .V = V,
        .threads = 2, .eps = 0.1f, .scale = 0.2f}));
    show("cross_entropy_f32_loss", losses, R);
    show("cross_entropy_f32_grad", grad, R * V);
    bf16 *lb = bf16s(logits, R * V), gb[R * V];
    check("cross_entropy_bf16", cross_entropy_bf16(&(cross_entropy_args){
        .logits = lb, .target = target, .losses = losses, .grad = gb, .stride = V, .rows = R, .V = V,
        .threads = 1, .eps = 0.1f, .scale = 0.2f}));
    show("cross_entropy_bf16_loss", losses, R);
    show_bf16("bf16_cross_entropy_grad", gb, R * V);

    float scores[2] = {-1.5f, -0.25f}, out_scores[2 * 4];
    int64_t tokens[2 * 4], beams[2 * 4], forbid[1] = {0};
    check("beam_f32", beam_f32(&(beam_args){.x = logits, .scores = scores, .forbid = forbid, .out_scores = out_scores,
                                            .out_tokens = tokens, .out_beams = beams, .sentences = 1, .r = 2, .V = V,
                                            .xs = V, .n = 4, .n_forbid = 1, .eos = 2, .keep = 2}));
    show("beam_f32_scores", out_scores, 4);
    for (int i = 0; i < 4; i++) printf("beam %lld %lld\n", (long long)tokens[i], (long long)beams[i]);
}

static void training(void) {
    enum { B = 2, H = 2, T = 7, DH = 32, D = H * DH, N = 41 };
    float *q = randoms(B * T * D, 1.f), *k = randoms(B * T * D, 1.f), *v = randoms(B * T * D, 1.f);
    float *dout = randoms(B * T * D, 1.f), out[B * T * D], probs[B * H * T * T];
    float dq[B * T * D], dk[B * T * D], dv[B * T * D];
    uint8_t causal[T * T];
    for (int t = 0; t < T; t++)
        for (int s = 0; s < T; s++) causal[t * T + s] = s <= t;
    for (int masked = 0; masked <= 1; masked++) {
        check("attention_forward_f32", attention_forward_f32(&(attention_forward_args){
            .q = q, .k = k, .v = v, .mask = masked ? causal : NULL, .out = out, .probs = probs, .B = B, .H = H,
            .nt = T, .ns = T, .dh = DH, .qs_b = T * D, .qs_t = D, .ks_b = T * D, .ks_s = D, .vs_b = T * D, .vs_s = D,
            .ms_b = 0, .ms_t = T, .os_b = T * D, .os_t = D, .threads = 2, .scale = 0.17f, .keep = 1.f}));
        show("attention_forward_f32", out, B * T * D);
        check("attention_backward_f32", attention_backward_f32(&(attention_backward_args){
            .q = q, .k = k, .v = v, .dout = dout, .probs = probs, .dq = dq, .dk = dk, .dv = dv, .B = B, .H = H,
            .nt = T, .ns = T, .dh = DH, .qs_b = T * D, .qs_t = D, .ks_b = T * D, .ks_s = D, .vs_b = T * D, .vs_s = D,
            .gs_b = T * D, .gs_t = D, .dqs_b = T * D, .dqs_t = D, .dks_b = T * D, .dks_s = D, .dvs_b = T * D,
            .dvs_s = D, .threads = 2, .scale = 0.17f, .keep = 1.f}));
        show("attention_backward_f32_dq", dq, B * T * D);
        show("attention_backward_f32_dk", dk, B * T * D);
        show("attention_backward_f32_dv", dv, B * T * D);
        check("attention_backward_f32 (softmax again)", attention_backward_f32(&(attention_backward_args){
            .q = q, .k = k, .v = v, .dout = dout, .mask = masked ? causal : NULL, .dq = dq, .dk = dk, .dv = dv,
            .B = B, .H = H, .nt = T, .ns = T, .dh = DH, .qs_b = T * D, .qs_t = D, .ks_b = T * D, .ks_s = D,
            .vs_b = T * D, .vs_s = D, .ms_b = 0, .ms_t = T, .gs_b = T * D, .gs_t = D, .dqs_b = T * D, .dqs_t = D,
            .dks_b = T * D, .dks_s = D, .dvs_b = T * D, .dvs_s = D, .threads = 2, .scale = 0.17f, .keep = 1.f}));
        show("attention_backward_f32_again_dq", dq, B * T * D);
        show("attention_backward_f32_again_dk", dk, B * T * D);
        show("attention_backward_f32_again_dv", dv, B * T * D);
    }

    float *x = randoms(3 * N, 1.f), *y = randoms(3 * N, 1.f), *w = randoms(N, 1.f), *b = randoms(N, 1.f);
    float *g = randoms(3 * N, 1.f), o[3 * N], z[3 * N], stats[6], dx[3 * N], dy[3 * N], partial[2 * 2 * N] = {0};
    check("residual_norm_forward_f32", residual_norm_forward_f32(&(residual_norm_forward_args){
        .x = x, .y = y, .w = w, .b = b, .out = o, .z = z, .stats = stats, .rows = 3, .n = N, .threads = 2, .eps = 1e-5f}));
    show("residual_norm_forward_f32", o, 3 * N);
    check("residual_norm_backward_f32", residual_norm_backward_f32(&(residual_norm_backward_args){
        .dout = g, .z = z, .w = w, .stats = stats, .dx = dx, .dy = dy, .partial = partial, .rows = 3, .n = N,
        .threads = 2}));
    show("residual_norm_backward_f32_dx", dx, 3 * N);
    show("residual_norm_backward_f32_partial", partial, 2 * 2 * N);
    float dx_alone[3 * N], partial_alone[2 * 2 * N] = {0};  /* no dy: it is dx */
    check("residual_norm_backward_f32 (dy = dx)", residual_norm_backward_f32(&(residual_norm_backward_args){
        .dout = g, .z = z, .w = w, .stats = stats, .dx = dx_alone, .partial = partial_alone, .rows = 3, .n = N,
        .threads = 2}));
    check("residual_norm_backward_f32: dx the same without dy", memcmp(dx, dx_alone, sizeof dx_alone) ? -1 : AIAYN_OK);

    float *h = randoms(3 * N, 3.f), gelu[3 * N], slope[3 * N], dh[3 * N], bias_grad[2 * N] = {0};
    check("bias_gelu_forward_f32", bias_gelu_forward_f32(&(bias_gelu_forward_args){
        .h = h, .bias = b, .out = gelu, .grad = slope, .rows = 3, .n = N, .threads = 2}));
    show("bias_gelu_forward_f32", gelu, 3 * N);
    check("bias_gelu_backward_f32", bias_gelu_backward_f32(&(bias_gelu_backward_args){
        .dout = g, .grad = slope, .dh = dh, .partial = bias_grad, .rows = 3, .n = N, .threads = 2}));
    show("bias_gelu_backward_f32_dh", dh, 3 * N);
    show("bias_gelu_backward_f32_partial", bias_grad, 2 * N);
    bf16 *hb = bf16s(h, 3 * N), *gb = bf16s(g, 3 * N), gelu_b[3 * N], slope_b[3 * N], dh_b[3 * N];
    float bias_grad_b[2 * N] = {0};
    check("bias_gelu_forward_bf16", bias_gelu_forward_bf16(&(bias_gelu_forward_args){
        .h = hb, .bias = b, .out = gelu_b, .grad = slope_b, .rows = 3, .n = N, .threads = 1}));
    show_bf16("bf16_bias_gelu_forward", gelu_b, 3 * N);
    check("bias_gelu_backward_bf16", bias_gelu_backward_bf16(&(bias_gelu_backward_args){
        .dout = gb, .grad = slope_b, .dh = dh_b, .partial = bias_grad_b, .rows = 3, .n = N, .threads = 1}));
    show_bf16("bf16_bias_gelu_backward_dh", dh_b, 3 * N);
}

/* A random 2-layer post-norm decoder (D 32, 2 heads of 16, d_ff 48, vocab 37) over a source of 5
 * positions: one sentence's greedy decoding and its beam search (3 beams), each in one call: the
 * decoder layers, the whole step, its in-place reorder of the caches, argmax and the beam step. */
enum { DD = 32, DH = 2, DF = 48, DV = 37, DS = 5, DL = 2, DMAX = 8 };
static float *weight_tiles(int64_t n, int64_t k) { return tiles_f32(randoms(n * k, 1.f / sqrtf((float)k)), n, k); }

static void decoding(void) {
    const float *table = randoms(DV * DD, 1.f), *positions = randoms((DMAX + 1) * DD, 0.5f);
    const float *source_k = randoms(DH * DS * (DD / DH), 1.f), *source_v = randoms(DH * DS * (DD / DH), 1.f);
    const uint8_t mask[DS] = {1, 1, 1, 1, 0};
    const float *out_w = weight_tiles(DV, DD), *out_b = randoms(DV, 0.1f);
    decoder_layer_args layers[DL];
    for (int l = 0; l < DL; l++) {
        float *ones = malloc(sizeof(float) * DD);
        for (int j = 0; j < DD; j++) ones[j] = 1.f + 0.1f * uniform();
        layers[l] = (decoder_layer_args){
            .qkv_w = weight_tiles(3 * DD, DD), .qkv_b = randoms(3 * DD, 0.1f), .self_w = weight_tiles(DD, DD),
            .self_b = randoms(DD, 0.1f), .norm1_w = ones, .norm1_b = randoms(DD, 0.1f), .q_w = weight_tiles(DD, DD),
            .q_b = randoms(DD, 0.1f), .cross_w = weight_tiles(DD, DD), .cross_b = randoms(DD, 0.1f), .norm2_w = ones,
            .norm2_b = randoms(DD, 0.1f), .ff1_w = weight_tiles(DF, DD), .ff1_b = randoms(DF, 0.1f),
            .ff2_w = weight_tiles(DD, DF), .ff2_b = randoms(DD, 0.1f), .norm3_w = ones, .norm3_b = randoms(DD, 0.1f),
            .source_k = source_k, .source_v = source_v, .mask = mask, .D = DD, .H = DH, .d_ff = DF, .S = DS,
            .sks_b = DH * DS * (DD / DH), .sks_h = DS * (DD / DH), .sks_t = DD / DH,
            .svs_b = DH * DS * (DD / DH), .svs_h = DS * (DD / DH), .svs_t = DD / DH, .ms_b = DS, .eps = 1e-5f};
    }
    for (int beams = 1; beams <= 3; beams += 2) {
        const int64_t cap = DMAX + 1, dh = DD / DH;  /* caches (beams, H, cap, dh) */
        for (int l = 0; l < DL; l++) {
            layers[l].k_cache = calloc((size_t)(beams * DH * cap * dh), sizeof(float));
            layers[l].v_cache = calloc((size_t)(beams * DH * cap * dh), sizeof(float));
            layers[l].group = beams;
            layers[l].ks_b = layers[l].vs_b = DH * cap * dh;
            layers[l].ks_h = layers[l].vs_h = cap * dh;
            layers[l].ks_t = layers[l].vs_t = dh;
        }
        decoder_step_args step = {.table = table, .layers = layers, .out_w = out_w, .out_b = out_b, .B = beams,
                                  .n_layers = DL, .vocab = DV, .D = DD, .V = DV, .scale = sqrtf((float)DD)};
        const int64_t forbid[1] = {0};
        int64_t tokens[3 * (DMAX + 1)], lengths[3];
        if (beams == 1) {
            greedy_args g = {.step = &step, .positions = positions, .forbid = forbid, .out_tokens = tokens,
                             .bos = 1, .eos = 2, .max_len = DMAX, .min_len = 2, .n_forbid = 1};
            check("greedy_f32", greedy_f32(&g));
            for (int64_t i = 0; i < g.length; i++) printf("greedy %lld\n", (long long)tokens[i]);
        } else {
            float penalties[DMAX + 1], scores[3];
            for (int i = 0; i <= DMAX; i++) penalties[i] = powf((5.f + (float)(i + 1)) / 6.f, 0.6f);
            search_args b = {.step = &step, .positions = positions, .penalties = penalties, .forbid = forbid,
                             .out_tokens = tokens, .out_scores = scores, .out_lengths = lengths, .k = beams,
                             .bos = 1, .eos = 2, .max_len = DMAX, .min_len = 1, .n_forbid = 1};
            check("search_f32", search_f32(&b));
            for (int64_t h = 0; h < b.finished; h++) {
                printf("search_f32_score %.9g\n", scores[h]);
                for (int64_t i = 0; i < lengths[h]; i++) printf("search %lld\n", (long long)tokens[h * (DMAX + 1) + i]);
            }
        }
    }
}

int main(void) {
    linears();
    decoding_attention();
    rows();
    training();
    decoding();
    return 0;
}
