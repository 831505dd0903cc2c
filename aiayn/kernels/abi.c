/* What the library says about its boundary (abi.h): its version, its limits, each status's meaning,
 * and each argument struct's fields, for aiayn/kernels/__init__.py to compare with its ctypes mirrors
 * when it loads the library. */
#include <stddef.h>
#include <string.h>

#include "abi.h"

int aiayn_abi_version(void) { return AIAYN_ABI_VERSION; }
int64_t aiayn_max_keys(void) { return AIAYN_MAX_KEYS; }
int64_t aiayn_max_head_dim(void) { return AIAYN_MAX_HEAD_DIM; }
int64_t aiayn_max_row(void) { return AIAYN_MAX_ROW; }
int64_t aiayn_int8_head(void) { return AIAYN_INT8_HEAD; }
int64_t aiayn_int8_max_k(void) { return AIAYN_INT8_MAX_K; }

const char *aiayn_status_name(int status) {
    switch (status) {
    case AIAYN_OK: return "OK";
    case AIAYN_NULL_POINTER: return "NULL_POINTER";
    case AIAYN_BAD_SIZE: return "BAD_SIZE";
    case AIAYN_OVER_LIMIT: return "OVER_LIMIT";
    case AIAYN_BAD_STRIDE: return "BAD_STRIDE";
    case AIAYN_BAD_INDEX: return "BAD_INDEX";
    case AIAYN_NO_MEMORY: return "NO_MEMORY";
    default: return "";
    }
}

const char *aiayn_status_message(int status) {
    switch (status) {
    case AIAYN_OK: return "done";
    case AIAYN_NULL_POINTER: return "a pointer it needs is NULL";
    case AIAYN_BAD_SIZE: return "a size is negative, zero or inconsistent";
    case AIAYN_OVER_LIMIT: return "a size is over the kernels' limits";
    case AIAYN_BAD_STRIDE: return "a stride is negative or shorter than its row";
    case AIAYN_BAD_INDEX: return "an id is out of range";
    case AIAYN_NO_MEMORY: return "out of memory for its scratch";
    default: return "an unknown status";
    }
}

/* Each struct's table, from the same list as its typedef: {name, type, offset, size}, then {NULL}. */
#define FIELD_INFO(type, name) {#name, #type, (int64_t)offsetof(ARGS_T, name), (int64_t)sizeof(((ARGS_T *)0)->name)},
#define TABLE(kernel, ARGS) static const aiayn_field kernel##_fields[] = {ARGS(FIELD_INFO) {NULL, NULL, 0, 0}};

#define ARGS_T attend_args
TABLE(attend, AIAYN_ATTEND_ARGS)
#undef ARGS_T
#define ARGS_T add_norm_args
TABLE(add_norm, AIAYN_ADD_NORM_ARGS)
#undef ARGS_T
#define ARGS_T argmax_args
TABLE(argmax, AIAYN_ARGMAX_ARGS)
#undef ARGS_T
#define ARGS_T embed_args
TABLE(embed, AIAYN_EMBED_ARGS)
#undef ARGS_T
#define ARGS_T beam_args
TABLE(beam, AIAYN_BEAM_ARGS)
#undef ARGS_T
#define ARGS_T linear_args
TABLE(linear, AIAYN_LINEAR_ARGS)
#undef ARGS_T
#define ARGS_T quantize_args
TABLE(quantize, AIAYN_QUANTIZE_ARGS)
#undef ARGS_T
#define ARGS_T decoder_layer_args
TABLE(decoder_layer, AIAYN_DECODER_LAYER_ARGS)
#undef ARGS_T
#define ARGS_T decoder_step_args
TABLE(decoder_step, AIAYN_DECODER_STEP_ARGS)
#undef ARGS_T
#define ARGS_T search_args
TABLE(search, AIAYN_SEARCH_ARGS)
#undef ARGS_T
#define ARGS_T greedy_args
TABLE(greedy, AIAYN_GREEDY_ARGS)
#undef ARGS_T
#define ARGS_T attention_forward_args
TABLE(attention_forward, AIAYN_ATTENTION_FORWARD_ARGS)
#undef ARGS_T
#define ARGS_T attention_backward_args
TABLE(attention_backward, AIAYN_ATTENTION_BACKWARD_ARGS)
#undef ARGS_T
#define ARGS_T dropout_mask_args
TABLE(dropout_mask, AIAYN_DROPOUT_MASK_ARGS)
#undef ARGS_T
#define ARGS_T residual_norm_forward_args
TABLE(residual_norm_forward, AIAYN_RESIDUAL_NORM_FORWARD_ARGS)
#undef ARGS_T
#define ARGS_T residual_norm_backward_args
TABLE(residual_norm_backward, AIAYN_RESIDUAL_NORM_BACKWARD_ARGS)
#undef ARGS_T
#define ARGS_T cross_entropy_args
TABLE(cross_entropy, AIAYN_CROSS_ENTROPY_ARGS)
#undef ARGS_T
#define ARGS_T bias_gelu_forward_args
TABLE(bias_gelu_forward, AIAYN_BIAS_GELU_FORWARD_ARGS)
#undef ARGS_T
#define ARGS_T bias_gelu_backward_args
TABLE(bias_gelu_backward, AIAYN_BIAS_GELU_BACKWARD_ARGS)
#undef ARGS_T

const aiayn_field *aiayn_abi_fields(const char *kernel, int64_t *size) {
#define LOOKUP(name)                                                                                  \
    if (kernel && strcmp(kernel, #name) == 0) {                                                       \
        if (size) *size = (int64_t)sizeof(name##_args);                                               \
        return name##_fields;                                                                         \
    }
    AIAYN_KERNELS(LOOKUP)
#undef LOOKUP
    return NULL;
}
