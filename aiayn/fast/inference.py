"""Fast inference copies of a trained model, for decoding on a CPU.

`inference_model(model, precision)` returns the fastest form found for a precision (measured in
docs/perf-log/2026-11.md): fp32 with the linear layers on oneDNN (torch's CPU build sends fp32 GEMMs to
MKL, which is 2x slower on AMD CPUs), bf16 weights on oneDNN, or int8 dynamic quantization. Each is
a copy: the model itself is left as it is, so a training run can decode its validation set on one.
"""

from __future__ import annotations

import copy
import functools
import os
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from aiayn import capability, kernels
from aiayn.capability import PrecisionError
from aiayn.fast import accelerate


class _SplitCrossAttention(nn.Module):
    """Cross-attention of an inference copy (int8, oneDNN): aiayn's fused in_proj is cut into a query
    and a key/value projection, because a quantized or packed Linear cannot be sliced by rows the way
    MultiHeadAttention slices its float weight (queries use rows :D, keys and values rows D:)."""

    def __init__(self, mha):
        super().__init__()
        D = mha.d_model
        self.d_model, self.n_heads = D, mha.n_heads
        w = mha.in_proj.weight
        self.q_proj = nn.Linear(D, D, device=w.device, dtype=w.dtype)
        self.kv_proj = nn.Linear(D, 2 * D, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            self.q_proj.weight.copy_(mha.in_proj.weight[:D])
            self.q_proj.bias.copy_(mha.in_proj.bias[:D])
            self.kv_proj.weight.copy_(mha.in_proj.weight[D:])
            self.kv_proj.bias.copy_(mha.in_proj.bias[D:])
        self.out_proj = mha.out_proj

    def _heads(self, x: Tensor) -> Tensor:
        B, T, _ = x.shape
        return x.view(B, T, self.n_heads, -1).transpose(1, 2)  # (B, T, D) -> (B, H, T, Dh)

    def kv_projection(self, source: Tensor) -> Tensor:
        return self.kv_proj(source)

    def project_kv(self, source: Tensor) -> tuple[Tensor, Tensor]:
        from aiayn.model.attention import split_kv

        return split_kv(self.kv_projection(source), self.n_heads)

    def forward(self, x, mask=None, *, kv=None, cache=None, need_weights=False):
        from aiayn.model.attention import attend_to_source, split_kv

        if kv is None:
            kv = self.kv_projection(x)
        if isinstance(kv, Tensor):  # MultiHeadAttention.forward's kv: a (B, S, 2D) projection or heads
            kv = split_kv(kv, self.n_heads)
        q = self.q_proj(x)
        if not need_weights:
            out = kernels.cross_attention_step(q, *kv, mask)
            if out is not None:
                return self.out_proj(out), None
        out, weights = attend_to_source(self._heads(q), *kv, mask, None, need_weights)
        return self.out_proj(out), weights


def quantize_int8(model: nn.Module) -> nn.Module:
    """An inference-only copy of an aiayn model with every nn.Linear dynamically quantized to int8
    (torch.ao.quantization.quantize_dynamic: int8 weights, activations quantized per call).

    A tied generator needs nothing special: only nn.Linear modules are swapped, so the generator gets
    an int8 copy of the shared matrix and the embeddings keep the float one. The fused in_proj of
    cross-attention does need care: MultiHeadAttention slices its float weight by rows, which a
    quantized Linear cannot do (TypeError: 'method' object is not subscriptable), so the copy gets
    split projections (_SplitCrossAttention). Self-attention uses in_proj whole and quantizes as is.
    A feed-forward layer's ReLU is done by its first linear (_relu_feed_forwards).

    Weights are quantized with one scale per matrix, the generator's with one per output row: its
    rows (the shared embeddings) differ in norm, and one scale costs the shipped model 0.2-0.3 BLEU
    where one per row costs ~0.1 (41.84-41.89 against fp32's 42.03); the generator's GEMM is ~9%
    slower that way, the others would be 2-10% slower for no measurable gain.
    """
    import torch.ao.nn.quantized.dynamic as nnqd

    q = _inference_copy(model)
    with warnings.catch_warnings():  # torch 2.13 marks torch.ao quantization deprecated
        warnings.simplefilter("ignore")
        qconfig = {nn.Linear: torch.ao.quantization.default_dynamic_qconfig,
                   "generator": torch.ao.quantization.per_channel_dynamic_qconfig}
        q = torch.ao.quantization.quantize_dynamic(q, qconfig, dtype=torch.qint8)
    feed_forwards = _relu_feed_forwards(q)
    relu = {id(ff.w1) for ff in feed_forwards}
    for ff in feed_forwards:
        ff.act = nn.Identity()
    few_rows = kernels.step_tiles(torch.int8)
    for parent_name, parent in list(q.named_modules()):
        for name, child in parent.named_children():
            if isinstance(child, nnqd.Linear):
                setattr(parent, name, Int8Linear(child, relu=id(child) in relu,
                                                 tiles=few_rows and _steps(f"{parent_name}.{name}".lstrip("."))))
    return q


class Int8Linear(nn.Module):
    """torch.ao's dynamically quantized Linear (same packed weights, same op, same results) without its
    per-call Python: no dtype branches, no `.to(x.dtype)` op after the GEMM. A decoding step calls
    16 of them (small model): each op less is also one GIL hand-over less between decoding threads.
    relu=True computes max(0, y) in the GEMM's output stage (fbgemm's linear_relu_dynamic).

    tiles=True (a decoding step's layers, where the few-rows kernel or the one-call decoder layer win):
    also the same int8 weights and scales in kernels.linear's tiles, used for a few rows. There each
    row of inputs is rounded to 8 bits with its own scale (7 on AVX2, as fbgemm's reduce_range), where
    fbgemm takes one scale for all rows; on a CPU without AVX2 the inputs are not rounded.

    On a CPU with AMX (onednn_int8()), products of ONEDNN_INT8_MACS multiply-adds or more (an encoder's
    layers, the generator of a batch) go to oneDNN's int8 GEMM instead, which computes on AMX's tiles
    where fbgemm has no AMX path: the same int8 weights, the inputs rounded to 8 bits (fbgemm: 7) with
    one scale and zero point for the call (kernels.quantize)."""

    tiles: Tensor | None = None
    bias: Tensor | None = None
    onednn: tuple[Tensor, Tensor, Tensor] | None = None  # oneDNN's packed weight, its scales, zero points
    onednn_rows: int = 0  # the fewest rows sent to oneDNN

    def __init__(self, linear, relu: bool = False, tiles: bool = False):
        super().__init__()
        self.in_features, self.out_features, self.relu = linear.in_features, linear.out_features, relu
        self.packed = linear._packed_params._packed_params
        self.op = torch.ops.quantized.linear_relu_dynamic if relu else torch.ops.quantized.linear_dynamic
        onednn = onednn_int8()
        if not (tiles or onednn):
            return
        w, bias = self.packed.unpack()
        self.bias = None if bias is None else bias.detach()
        per_row = w.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric)
        scales = (w.q_per_channel_scales() if per_row else torch.full((w.size(0),), w.q_scale(), dtype=torch.float64))
        if tiles:
            self.tiles = kernels.linear_tiles(w.int_repr(), scales.float())
        zero = w.q_per_channel_zero_points() if per_row else torch.full((w.size(0),), w.q_zero_point())
        if onednn and not zero.any():  # (oneDNN takes symmetric weights: torch.ao's observers make them)
            self.onednn = (torch.ops.onednn.qlinear_prepack(w.int_repr(), None), scales.float(),
                           torch.zeros(w.size(0), dtype=torch.long))
            self.onednn_rows = -(-ONEDNN_INT8_MACS // (self.in_features * self.out_features))

    def forward(self, x: Tensor) -> Tensor:
        if self.tiles is not None:
            y = kernels.linear(x, self.tiles, self.bias, self.out_features, self.relu)
            if y is not None:
                return y
        if self.onednn is not None and x.numel() >= self.onednn_rows * self.in_features:
            quantized = kernels.quantize(x)
            if quantized is not None:
                q, scale, zero = quantized
                y = torch.ops.onednn.qlinear_pointwise(q, scale, zero, *self.onednn, self.bias, 1.0, 0, torch.float32,
                                                       "relu" if self.relu else "none", [], "")
                return y.view(*x.shape[:-1], self.out_features)
        return self.op(x, self.packed, True)  # reduce_range=True: what torch.ao's Linear (version 4) passes

    def weight(self) -> Tensor:
        return self.packed.unpack()[0]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, relu={self.relu}"


# From this many multiply-adds a call (rows x in x out), oneDNN's int8 GEMM on AMX beat fbgemm's on a
# Xeon with AMX (1 thread, the small model's shapes, fbgemm / oneDNN time: 64 rows 256 -> 1024 0.66,
# 256 -> 256 1.17; 32 rows 256 -> 8000 0.60; 900 rows 0.44-0.55): below, the ~30 us of its call's
# quantization and set-up outweigh the faster product.
ONEDNN_INT8_MACS = 1 << 23


@functools.cache
def onednn_int8() -> bool:
    """Whether int8 copies send their larger products to oneDNN's int8 GEMM (Int8Linear): on a CPU
    with AMX's int8 tiles (not capped below AMX by ONEDNN_MAX_CPU_ISA), and a torch whose oneDNN int8
    linear runs. (Each call also needs aiayn's kernels, which quantize its inputs: else fbgemm's.)"""
    if capability.probe().isa != "amx" or "amx_int8" not in capability.cpu_flags():
        return False
    try:
        w = torch.ops.onednn.qlinear_prepack(torch.ones(16, 16, dtype=torch.int8), None)
        y = torch.ops.onednn.qlinear_pointwise(torch.full((2, 16), 3, dtype=torch.uint8), 0.5, 1, w, torch.ones(16),
                                               torch.zeros(16, dtype=torch.long), None, 1.0, 0, torch.float32, "none",
                                               [], "")
        return bool((y == 16.0).all())  # (3 - 1) * 0.5 * 16 ones
    except (AttributeError, RuntimeError):  # an op this torch lacks, or refuses
        return False


class OneDNNLinear(nn.Linear):
    """nn.Linear whose forward runs oneDNN's fp32 (or bf16) GEMM instead of the BLAS that torch's CPU
    build uses for fp32 (MKL). On AMD CPUs MKL takes an AVX2 path: ~100 GFLOP/s a core on the Zen 5
    these benchmarks run on, against ~230 for oneDNN at the same shapes, same IEEE fp32 arithmetic.
    Inference only: the op has no autograd formula. Weights stay ordinary Parameters, so ties and
    row slices (cross-attention's in_proj.weight[:D]) keep working.
    """

    packed: Tensor | None = None  # the weight in oneDNN's blocked layout (set by onednn_linears)
    tiles: Tensor | None = None   # the weight as aiayn's kernel for a few rows reads it (kernels.linear)
    post_op: str = "none"  # "relu": max(0, x W^T + b) in the GEMM's output stage

    def forward(self, x: Tensor) -> Tensor:
        if self.tiles is not None:  # a decoding step's few rows, where the kernel beats oneDNN here
            y = kernels.linear(x, self.tiles, self.bias, self.out_features, self.post_op == "relu")
            if y is not None:
                return y
        w = self.packed if self.packed is not None else self.weight
        return torch.ops.mkldnn._linear_pointwise(x, w, self.bias, self.post_op, [], "")


def onednn_linears(model: nn.Module, pack: bool = True, dtype: torch.dtype | None = None) -> nn.Module:
    """An inference copy of `model` (cast to `dtype` if given) whose nn.Linear layers (cross-attention's
    split in two, see _SplitCrossAttention) compute with oneDNN: OneDNNLinear. Where torch was built
    without oneDNN or the model is not on a CPU: a copy (cast to `dtype`) with only the fast modules."""
    if not onednn_available() or any(p.device.type != "cpu" for p in model.parameters()):
        return accelerate(copy.deepcopy(model).to(dtype).eval())
    q = _inference_copy(model)
    if dtype:
        q.to(dtype)  # in place
    few_rows = kernels.step_tiles(next(q.parameters()).dtype)
    for name, m in q.named_modules():
        if type(m) is nn.Linear:
            m.__class__ = OneDNNLinear
            if pack:  # 4-10% faster GEMMs at decoding shapes; the batch-size hint hardly matters
                m.packed = torch.ops.mkldnn._reorder_linear_weight(m.weight.detach(), 64)
            if few_rows and _steps(name):  # one more copy of the weight: for steps of a few sentences
                m.tiles = kernels.linear_tiles(m.weight)
    for ff in _relu_feed_forwards(q):  # (its w1 is a OneDNNLinear now, as every nn.Linear)
        ff.w1.post_op, ff.act = "relu", nn.Identity()
    return q


def _steps(name: str) -> bool:
    """Whether the linear layer `name` runs in decoding steps, one row per sentence (or beam), where
    kernels.linear beats oneDNN's GEMM: not the encoder's, nor cross-attention's keys and values (a
    row per source token), which see many rows."""
    return not name.startswith("encoder.") and not name.endswith("kv_proj")


def _relu_feed_forwards(model: nn.Module) -> list[nn.Module]:
    """The feed-forward layers of `model` with a ReLU, which an inference copy computes in the first
    linear's kernel (its output stage: the same float operations, one pass fewer over the (N, d_ff)
    hidden layer). Small model, 1 thread: int8 greedy decoding 2-5% more tokens/s; oneDNN's fp32 and
    bf16 GEMM with the ReLU, (64 to 1280, 256) x (256, 1024), 3-10% faster than GEMM then ReLU."""
    from aiayn.model.layers import FeedForward

    return [m for m in model.modules() if isinstance(m, FeedForward) and m.act is F.relu]


TRAINING_PRIMITIVES = 32  # oneDNN primitives a training process keeps (bound_primitive_caches)


def bound_primitive_caches(capacity: int = 128) -> None:
    """Keep at most `capacity` oneDNN primitives (and as many of ideep's cached computations).

    oneDNN builds and caches a primitive for every GEMM shape it meets, ~0.65 MB each for a
    (rows, 512) x (512, 512) one, up to 1,024 per cache: decoding batches of every size (a server's
    requests) grew a process from 330 to 976 MB in 200 batches (fp32 copy; bf16: 1,093 MB) and on.
    With 128 it levels off at ~505 MB (600 batches) for the same CPU time; 64 saves another 100 MB
    but rebuilds primitives within a batch (+16% CPU in fp32). Sorted batches (translate, evaluate)
    meet few shapes. Training meets a new shape nearly every batch (token-budget batches), and its
    primitives are large: the `small` model's training grew a process by ~35 MB a step, to 2.8 GB
    after 40 steps in fp32 (HF Marian's levels off at 1.7); with TRAINING_PRIMITIVES (32) it stays
    at 1.6 GB (bf16: 2.3 -> 1.0 GB), fp32 at the same speed, bf16 ~4% slower (16: 1.4 GB, but bf16
    ~10% slower: it rebuilds primitives within a step). AMX Xeon, one thread, 2026-12-04. For
    long-lived processes (aiayn serve: 128) and training (`aiayn train`: TRAINING_PRIMITIVES); it
    must run before the process's first oneDNN op, and a value already in the environment wins."""
    for var in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY"):  # oneDNN's, ideep's
        os.environ.setdefault(var, str(capacity))


@functools.cache
def onednn_available() -> bool:
    """Whether this torch build runs oneDNN linears (probed once: an internal op, absent on some builds)."""
    try:
        w = torch.ops.mkldnn._reorder_linear_weight(torch.ones(2, 3), 4)
        y = torch.ops.mkldnn._linear_pointwise(torch.ones(4, 3), w, torch.zeros(2), "none", [], "")
        return torch.backends.mkldnn.is_available() and bool(y.eq(3).all())
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


def _inference_copy(model: nn.Module) -> nn.Module:
    """A copy in eval mode whose linear layers are plain nn.Linear (a model being trained in fp32 has
    aiayn.fast.onednn's subclass, one being fine-tuned aiayn.lora's) and whose cross-attention
    projections are split."""
    from aiayn.lora import merge

    q = accelerate(merge(copy.deepcopy(model).eval()))  # an unmerged LoRA adapter is folded in, never dropped
    for m in q.modules():
        if isinstance(m, nn.Linear):
            m.__class__ = nn.Linear
    return _split_cross_attention(q)


def _split_cross_attention(model: nn.Module) -> nn.Module:
    from aiayn.model.attention import MultiHeadAttention

    for layer in getattr(getattr(model, "decoder", None), "layers", []):
        if isinstance(layer.cross_attn, MultiHeadAttention):
            layer.cross_attn = _SplitCrossAttention(layer.cross_attn)
    return model


PRECISIONS = ("plain", "fp32", "bf16", "fp16", "int8")


def check_precision(precision: str, device: str | torch.device) -> None:
    """Refuse a precision that cannot decode natively on `device` (capability.PrecisionError, a
    ValueError of one line): the CLI asks before it loads a model, inference_model when it makes the copy."""
    if precision not in PRECISIONS:
        raise PrecisionError(f"unknown precision {precision!r}: {', '.join(PRECISIONS)}")
    if precision != "plain":
        capability.check_precision(precision, str(torch.device(device).type))


def inference_model(model: nn.Module, precision: str = "fp32") -> nn.Module:
    """The fastest inference form of `model` for a precision, in eval mode:

    - plain: the model itself (as it is: the reference model unless aiayn.fast.accelerate was run on it);
    - fp32: on a CPU, a copy with oneDNN linears (1.65-2x faster decoding, the same IEEE results);
    - bf16 / fp16: a copy with its weights cast (and oneDNN linears on a CPU); fp16 on CUDA only;
    - int8: a copy with dynamically quantized linears (CPU only).
    Every copy has the fast modules (aiayn.fast.accelerate). An Ensemble gets an Ensemble of its
    members' inference forms. The model itself is never changed (except for eval mode)."""
    from aiayn.model.ensemble import Ensemble

    if isinstance(model, Ensemble):
        return Ensemble([inference_model(m, precision) for m in model.members])
    if precision == "plain":  # (a server's copy, once a batch: no walk over the modules when in eval mode)
        return model.eval() if model.training else model
    on_cpu = all(p.device.type == "cpu" for p in model.parameters())
    check_precision(precision, "cpu" if on_cpu else "cuda")
    if precision == "fp32" and not on_cpu:
        return model.eval()
    if precision == "fp32":
        return onednn_linears(model)
    if precision in ("bf16", "fp16"):  # one copy, cast (with oneDNN linears on a CPU)
        return onednn_linears(model, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
    return quantize_int8(model)  # int8
