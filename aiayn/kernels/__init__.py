"""Optional C kernels for a CPU, built on first use for the machine they run on.

PyTorch's operators cover everything aiayn does; a kernel here does several of them in one call where
measurement showed that to pay. decode_step.c serves a decoding step: less time, and fewer
operators, each of which hands the GIL over between decoding threads. train_step.c serves a training
step: attention and the post-norm residual (dropout + LayerNorm), forward and backward, dropout
masks and the loss, on PyTorch's own OpenMP threads. The kernels are plain C (no PyTorch headers),
compiled with the system's C compiler for this CPU (-march=native, capped like oneDNN by
ONEDNN_MAX_CPU_ISA / ATEN_CPU_CAPABILITY) into a cache directory, and called through ctypes, which
releases the GIL.

Whether a kernel pays depends on the CPU (on an AVX2-only one the training attention and the loss
lose to PyTorch), so each family is timed against PyTorch's operators on this machine the first
time it is needed, and used only where it won (tuning.py; AIAYN_KERNELS=all: every kernel, 0:
none). Without a compiler, on a failed build (remembered, warned about once), on a platform other
than Linux/macOS, or where a kernel lost, its function here returns None and the caller uses
PyTorch's operators: the same results to rounding (tests/model/test_kernels.py,
test_train_kernels.py).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import math
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
import warnings
from array import array as _array
from pathlib import Path

import torch
from torch import Tensor, nn

from aiayn import capability
from aiayn.kernels import tuning

log = logging.getLogger(__name__)
_ARGS = threading.local()  # each thread's last argument array

HERE = Path(__file__).parent
SOURCES = (HERE / "decode_step.c", HERE / "train_step.c")  # one library; both include common.h
MAX_KEYS, MAX_HEAD_DIM = 4096, 1024  # the C side's buffers
MAX_QUERIES = 8  # queries per row up to which the kernel beats PyTorch's fused attention
MAX_ROW = 16384  # add_layer_norm's widest row
_FLAG_SETS = (  # the first that builds wins: tuned for this CPU with OpenMP (train_step.c), then portable
    ["-O3", "-march=native", "-fopenmp", "-fno-math-errno"],
    ["-O3", "-march=native", "-fopenmp-simd", "-fno-math-errno"],
    ["-O3", "-mcpu=native", "-fopenmp-simd", "-fno-math-errno"],  # Apple clang on arm64
    ["-O2"],
)
_FUNCTIONS = {torch.float32: "f32", torch.bfloat16: "bf16"}  # dtype -> the C functions' suffix


def enabled() -> bool:
    """AIAYN_KERNELS: 1 (default) the kernels that win on this machine (aiayn.kernels.tuning), all:
    every kernel wherever it takes the inputs, 0: none."""
    return os.environ.get("AIAYN_KERNELS", "1") != "0"


def _wins(family: str, dtype: torch.dtype, head_dim: int = 0) -> bool | int:
    """Whether a kernel family beat PyTorch on this machine (tuning.py; for "attention", the longest
    length at which it did, for this head size). Cheap after the first call of a process."""
    forced = tuning.forced(family)  # (these lookups are cheap enough for every call)
    if forced is None and os.environ.get("AIAYN_KERNELS") == "all":
        forced = True
    if forced is not None:
        return (MAX_TRAIN_LENGTH if family == "attention" else True) if forced else False
    key = f"{family}_{_FUNCTIONS[dtype]}" + (f"_dh{head_dim}" if family == "attention" else "")
    return tuning.decide(key, Path(_library()._name))  # (called once the library is known to be there)


def cache_dir() -> Path:
    root = os.environ.get("AIAYN_CACHE") or os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "aiayn" / "kernels"


def _compiler() -> str | None:
    for cc in (os.environ.get("CC"), sysconfig.get_config_var("CC"), "cc", "gcc", "clang"):
        if cc and shutil.which(cc.split()[0]):
            return cc
    return None


def _machine_key() -> str:
    """What a library built with -march=native depends on (a shared home directory may see several
    CPUs): the architecture, the CPU's name and feature flags (Linux: /proc/cpuinfo; macOS: sysctl),
    and the instruction-set level after ONEDNN_MAX_CPU_ISA / ATEN_CPU_CAPABILITY caps."""
    m = capability.probe("cpu")
    return f"{platform.machine()} {m.name} {m.isa} {' '.join(sorted(capability.cpu_flags()))}"


def _flag_sets() -> list[list[str]]:
    """The compiler flags to try, best first. Where the probe's level is capped below what the CPU
    has (ONEDNN_MAX_CPU_ISA=AVX2, say), -march=native is capped the same way, so that the kernels
    run (and are measured) as on a CPU of that level."""
    m = capability.probe("cpu")
    cap = []
    if m.capped and m.isa in ("avx2", "sse"):
        cap = ["-mno-avx512f"] if m.isa == "avx2" else ["-mno-avx"]
    return [[*flags, *cap] if "-march=native" in flags else flags for flags in _FLAG_SETS]


def _build(sources: tuple[Path, ...]) -> Path | None:
    """The library built for this machine (cached by sources, compiler, flags and machine), or None.
    A failed build is remembered beside where the library would be (`.failed`, with the compiler's
    message) and warned about once, when it fails: later processes do not try it again."""
    cc = _compiler()
    if cc is None:
        log.info("no C compiler found: aiayn uses PyTorch's operators only")
        return None
    texts = [p.read_bytes() for p in (*sources, HERE / "common.h")]
    machine = _machine_key().encode()
    failed = []  # this process's failed builds
    for flags in _flag_sets():
        key = hashlib.sha256(b"\0".join([*texts, cc.encode(), " ".join(flags).encode(), machine])).hexdigest()[:16]
        target = cache_dir() / f"kernels-{key}.so"
        if target.exists():
            return target
        marker = target.with_suffix(".failed")
        if marker.exists():
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        if not failed:
            print("aiayn: building the C kernels for this CPU (once: 5-10 s)", file=sys.stderr, flush=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            built = Path(tmp) / target.name
            cmd = [*cc.split(), *flags, "-shared", "-fPIC", *map(str, sources), "-o", str(built), "-lm", "-pthread"]
            result = subprocess.run(cmd, capture_output=True, text=True)
            if result.returncode == 0:
                os.replace(built, target)  # atomic: another process may be building the same file
                return target
            marker.write_text(f"{' '.join(cmd)}\n{result.stderr}")
            failed.append(marker)
    if failed:
        warnings.warn(f"aiayn's C kernels did not build with {cc} (see {failed[-1]}): PyTorch's operators are "
                      "used, slower on a CPU", RuntimeWarning, stacklevel=2)
    return None


@functools.cache
def _library() -> ctypes.CDLL | None:
    if not sys.platform.startswith(("linux", "darwin")):
        return None
    try:
        path = _build(SOURCES)
        library = ctypes.CDLL(str(path)) if path is not None else None  # CDLL calls release the GIL
    except OSError as e:  # a read-only home, a broken compiler, a library that will not load
        log.info("aiayn's kernels are unavailable (%s): PyTorch's operators are used", e)
        return None
    if library is not None:
        ptr, f32 = ctypes.c_void_p, ctypes.c_float  # every function takes its int64 arguments as one array
        i64 = ctypes.c_int64
        signatures = {"attend": (None, [ptr, f32]), "add_norm": (None, [ptr, f32]), "argmax": (i64, [ptr]),
                      "embed": (i64, [ptr, f32]), "beam": (None, [ptr]),
                      "attention_forward": (i64, [ptr, f32]), "attention_backward": (i64, [ptr, f32]),
                      "dropout_mask": (i64, [ptr, f32]), "residual_norm_forward": (i64, [ptr, f32]),
                      "residual_norm_backward": (i64, [ptr, f32]), "cross_entropy": (i64, [ptr, f32])}
        for kind, (restype, argtypes) in signatures.items():
            for suffix in (*_FUNCTIONS.values(), *(("f32_bf16",) if kind.startswith("residual_norm") else ())):
                fn = getattr(library, f"{kind}_{suffix}")
                fn.restype, fn.argtypes = restype, argtypes
    return library


def available() -> bool:
    """Whether the kernels are built and enabled."""
    return enabled() and _library() is not None


def usable(*tensors: Tensor, family: str = "decode") -> bool:
    """Whether a decoding kernel is built, enabled and faster here, and takes these tensors: on a CPU,
    fp32 or bf16 (all one dtype), no gradient wanted (it has no backward). Cheap: it runs a few times
    a decoding step."""
    return (_on_cpu(*tensors) and (not torch.is_grad_enabled() or not any(t.requires_grad for t in tensors))
            and _wins(family, tensors[0].dtype))


def _on_cpu(*tensors: Tensor) -> bool:
    """Whether the kernels are built and enabled and these are CPU tensors of one dtype they have."""
    dtype = tensors[0].dtype
    return dtype in _FUNCTIONS and available() and all(t.is_cpu and t.dtype == dtype for t in tensors)


def _call(function: str, *values: int, scalar: float = 0.0) -> int:
    """Runs a train_step.c entry point on its int64 arguments; its status, 0 when all went well
    (-1, its scratch could not be allocated, raises MemoryError)."""
    status = getattr(_library(), function)(_args(*values), scalar)
    if status == -1:
        raise MemoryError(f"out of memory for aiayn's {function} kernel")
    return status


def _args(*values: int) -> int:
    """The address of an int64 array holding `values`: the C functions' one argument besides a float
    (kept alive until the next call from this thread, which is after the C call returns)."""
    array = _ARGS.array = _array("q", values)
    return array.buffer_info()[0]


def _takes(B: int, H: int, Dh: int, k: Tensor, v: Tensor, mask: Tensor | None) -> bool:
    """Whether the kernel takes keys/values k, v (b, H, S, Dh) and a mask for B rows of queries."""
    b, S = k.size(0), k.size(2)
    return (k.shape == v.shape and k.size(1) == H and k.size(3) == Dh and b > 0 and B % b == 0
            and 0 < S <= MAX_KEYS and Dh <= MAX_HEAD_DIM and k.stride(3) == 1 and v.stride(3) == 1
            and (mask is None or (mask.dtype == torch.bool and mask.shape == (b, 1, 1, S))))


def supports(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> bool:
    """Whether `decode_attention` takes these inputs (else use PyTorch's attention)."""
    B, H, _, Dh = q.shape
    return q.stride(3) == 1 and usable(q, k, v) and _takes(B, H, Dh, k, v, mask)


def _run(q: Tensor, q_strides, k: Tensor, v: Tensor, mask: Tensor | None, out: Tensor, out_strides,
         B: int, H: int, T: int, S: int, Dh: int, new: tuple[int, int] | None = None, new_strides=(0,) * 4) -> None:
    """The C function: q's (row, head, query) strides and out's (row, query, head), in elements;
    `new`: addresses of the keys and values to append at position S - 1."""
    if mask is not None and mask.stride(3) != 1:
        mask = mask.contiguous()
    getattr(_library(), "attend_" + _FUNCTIONS[q.dtype])(_args(
        q.data_ptr(), k.data_ptr(), v.data_ptr(), mask.data_ptr() if mask is not None else 0, out.data_ptr(),
        *(new or (0, 0)), B, H, T, S, Dh, B // k.size(0), *q_strides, *k.stride()[:3], *v.stride()[:3],
        mask.stride(0) if mask is not None else 0, *out_strides, *new_strides), 1.0 / math.sqrt(Dh))


def decode_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
    """softmax(q k^T / sqrt(Dh) + mask) v for q (B, H, T, Dh) and k, v (b, H, S, Dh), where each
    group of B / b consecutive rows of q attends to one row of k and v; mask (b, 1, 1, S) boolean,
    True = may attend. Returns (B, H, T, Dh), a view of a (B, T, H, Dh) tensor: merging the heads
    after it is free. No gradient; the caller checks `supports` first."""
    B, H, T, Dh = q.shape
    out = q.new_empty(B, T, H, Dh)
    _run(q, q.stride()[:3], k, v, mask, out, out.stride()[:3], B, H, T, k.size(2), Dh)
    return out.transpose(1, 2)


def self_attention_step(qkv: Tensor, k_buf: Tensor, v_buf: Tensor, start: int, n_heads: int) -> Tensor | None:
    """One new position per row of a causal self-attention with a cache: qkv (B, 1, 3D) is the fused
    projection [q | k | v] of the new tokens. Their keys and values are written at position `start`
    of the (B, H, L, Dh) buffers, then the queries attend to positions 0..start. -> (B, 1, D), heads
    merged: in one call what PyTorch does in ~25 (split, head views, cache writes, attention, merge).
    None if the kernel does not take these inputs (the caller then uses PyTorch's operators)."""
    B, T, D3 = qkv.shape
    D = D3 // 3
    Dh = D // n_heads
    if not (T == 1 and D3 == 3 * n_heads * Dh and qkv.stride(2) == 1 and 0 <= start < k_buf.size(2) and k_buf.size(0) == B
            and usable(qkv, k_buf, v_buf) and _takes(B, n_heads, Dh, k_buf, v_buf, None)):
        return None
    out = qkv.new_empty(B, 1, D)
    rows, ptr, size = qkv.stride(0), qkv.data_ptr(), qkv.element_size()
    _run(qkv, (rows, Dh, 0), k_buf, v_buf, None, out, (D, D, Dh), B, n_heads, 1, start + 1, Dh,
         new=(ptr + D * size, ptr + 2 * D * size), new_strides=(rows, Dh, rows, Dh))
    return out


def cross_attention_step(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor | None:
    """Queries q (B, T, D), heads not yet split, attending to the source's keys and values
    (b, H, S, Dh), each group of B / b rows to one source row, with mask (b, 1, 1, S) or None.
    -> (B, T, D), heads merged. None if the kernel does not take these inputs."""
    B, T, D = q.shape
    H, Dh = k.size(1), k.size(3)
    if not (H * Dh == D and T <= MAX_QUERIES and q.stride(2) == 1 and usable(q, k, v) and _takes(B, H, Dh, k, v, mask)):
        return None
    out = q.new_empty(B, T, D)
    _run(q, (q.stride(0), Dh, q.stride(1)), k, v, mask, out, (T * D, D, Dh), B, H, T, k.size(2), Dh)
    return out


def add_layer_norm(x: Tensor, y: Tensor, norm: nn.LayerNorm, out: Tensor | None = None) -> Tensor | None:
    """norm(x + y) for x, y (..., D) in one pass: the post-norm residual of an inference step (PyTorch:
    two ops), into `out` if given (it may be x or y: each row is read before it is written). None if
    the kernel does not take these inputs."""
    D = x.size(-1)
    w, b = norm.weight, norm.bias
    if not (x.shape == y.shape and norm.normalized_shape == (D,) and w is not None and b is not None
            and D <= MAX_ROW and x.is_contiguous() and y.is_contiguous() and usable(x, y, w, b)
            and (out is None or (out.shape == x.shape and out.is_contiguous() and out.dtype == x.dtype))):
        return None
    if out is None:
        out = x.new_empty(x.shape)
    rows = x.numel() // D
    getattr(_library(), "add_norm_" + _FUNCTIONS[x.dtype])(_args(
        x.data_ptr(), y.data_ptr(), w.data_ptr(), b.data_ptr(), out.data_ptr(), rows, D, D, D, D), norm.eps)
    return out


def greedy_step(logits: Tensor, banned: Tensor, tokens: Tensor, record: Tensor, rows_of: Tensor, column: int,
                eos: int, limits: Tensor) -> int | None:
    """One step of greedy search in one call: the next token of each row of logits (b, 1, V) into
    tokens (b, 1) (never an id of `banned`), also written at record[rows_of[r], column] (the outputs
    (B, L)), and the number of rows done: ended with `eos`, or at limits[r] tokens (limits: (b,) the
    rows' longest outputs). None if the kernel does not take these inputs."""
    b, T, V = logits.shape
    if not (T == 1 and logits.stride(2) == 1 and usable(logits) and _takes_ids(banned, tokens, record, rows_of, limits)
            and tokens.shape == (b, 1) and tokens.is_contiguous() and record.stride(1) == 1 and 0 <= column < record.size(1)
            and rows_of.shape == limits.shape == (b,) and rows_of.is_contiguous() and limits.is_contiguous()):
        return None
    return getattr(_library(), "argmax_" + _FUNCTIONS[logits.dtype])(_args(
        logits.data_ptr(), b, V, logits.stride(0), banned.data_ptr(), banned.numel(), tokens.data_ptr(),
        record.data_ptr(), record.stride(0), rows_of.data_ptr(), column, eos, limits.data_ptr(), column + 1,
        record.size(0)))


def _takes_ids(*ids: Tensor) -> bool:
    return all(t.dtype == torch.int64 and t.is_cpu for t in ids) and ids[0].is_contiguous()


def embed(tokens: Tensor, table: Tensor, scale: float, positions: Tensor) -> Tensor | None:
    """table[tokens] * scale + positions for tokens (B, T) and this call's positions (T, D): the input
    of a decoding step in one call. None if the kernel does not take these inputs or a token is out
    of the table's range (PyTorch's embedding then says which)."""
    B, T = tokens.shape
    D = table.size(1)
    if not (tokens.dtype == torch.int64 and tokens.is_contiguous() and tokens.is_cpu and table.is_contiguous()
            and positions.shape == (T, D) and positions.is_contiguous() and usable(table, positions)):
        return None
    out = table.new_empty(B, T, D)
    status = getattr(_library(), "embed_" + _FUNCTIONS[table.dtype])(_args(
        tokens.data_ptr(), B * T, T, table.data_ptr(), table.size(0), positions.data_ptr(), out.data_ptr(), D), scale)
    return out if status == 0 else None


def beam_candidates(logits: Tensor, scores: Tensor, n: int, forbid: Tensor, eos: int, eos_banned: bool,
                    at_limit: Tensor | None) -> tuple[Tensor, Tensor, Tensor] | None:
    """Beam search's step in one pass (aiayn.decode.beam.search, where `beam_step` is the reference):
    logits (b * r, 1, V) of r beams of b sentences, scores (b, r) their log-probabilities so far ->
    the n best extensions of each sentence (scores (b, n), tokens, beams), best first, by
    scores + log_softmax(logits), never a token of `forbid`, nor EOS if eos_banned, and only EOS for
    a sentence with at_limit set (b,). Missing candidates are -inf (token 0, beam 0). None if the
    kernel does not take these inputs."""
    b, r = scores.shape
    N, T, V = logits.shape
    if not (N == b * r and T == 1 and logits.stride(2) == 1 and 0 <= eos < V and usable(logits, family="beam")
            and scores.dtype == torch.float32 and scores.is_contiguous() and _takes_ids(forbid)
            and (at_limit is None or (at_limit.dtype == torch.bool and at_limit.shape == (b,) and at_limit.is_contiguous()))):
        return None
    out = torch.empty(b, n, dtype=torch.float32)
    ids = torch.empty(2, b, n, dtype=torch.int64)  # tokens, beams
    getattr(_library(), "beam_" + _FUNCTIONS[logits.dtype])(_args(
        logits.data_ptr(), b, r, V, logits.stride(0), scores.data_ptr(), n, forbid.data_ptr(), forbid.numel(),
        eos, int(eos_banned), at_limit.data_ptr() if at_limit is not None else 0,
        out.data_ptr(), ids.data_ptr(), ids.data_ptr() + b * n * 8))
    return (out, *ids.unbind(0))


# ------------------------------------------------------------------------------------ training
# longest queries/keys training_attention takes on any machine (tuning.py measures up to which
# length it wins on this one). It keeps the (B, H, T, S) fp32 softmax, and its loops are quadratic
# in the length without GEMM blocking: on a Zen 5, causal fwd+bwd, 2 threads, kernel vs PyTorch:
# T 128 bf16 15.4 / 14.3 ms, fp32 16.5 / 35.1; T 256 bf16 41.5 / 23.0, fp32 40.3 / 52.1
MAX_TRAIN_LENGTH = 128


def training_attention(x_q: Tensor, x_kv: Tensor, mask: Tensor | None, n_heads: int, d_model: int,
                       k_col: int) -> Tensor | None:
    """Multi-head attention with a backward pass (train_step.c), heads split and merged in place:
    queries are x_q[..., :D] (B, T, >= D), keys x_kv[..., k_col:k_col + D] and values the next D
    columns (B, S, ...), D = d_model; mask None or boolean, broadcastable to (B, 1, T, S) with a
    1 for heads, True = may attend. -> (B, T, D), softmax(q kᵀ / sqrt(Dh) + mask) v per head.

    Self-attention passes its fused projection [q | k | v] as both x_q and x_kv (k_col = D), and
    gets its gradient back in one tensor; cross-attention passes q and the source's [k | v]. Same
    results as PyTorch's attention to rounding (tests/model/test_kernels.py, float64 reference).
    None if the kernel does not take these inputs (the caller then uses PyTorch's operators)."""
    if x_q.dim() != 3 or x_kv.dim() != 3:
        return None
    (B, T, _), S = x_q.shape, x_kv.size(1)
    if not (x_kv.size(0) == B and 0 < T <= MAX_TRAIN_LENGTH
            and 0 < S <= MAX_TRAIN_LENGTH and B > 0 and d_model % n_heads == 0 and x_q.size(2) >= d_model
            and x_kv.size(2) >= k_col + 2 * d_model and x_q.stride(2) == 1 and x_kv.stride(2) == 1
            and _on_cpu(x_q, x_kv) and _mask_strides(mask, B, T, S) is not None
            and max(T, S) <= _wins("attention", x_q.dtype, d_model // n_heads)):
        return None
    return _TrainingAttention.apply(x_q, x_kv, mask, n_heads, d_model, k_col)


def _mask_strides(mask: Tensor | None, B: int, T: int, S: int) -> tuple[int, int] | None:
    """The (row, query) strides of a mask broadcastable to (B, 1, T, S), 0 where it broadcasts; None
    if the kernel does not take it."""
    if mask is None:
        return 0, 0
    if not (mask.dtype == torch.bool and mask.dim() == 4 and mask.is_cpu and mask.size(0) in (1, B)
            and mask.size(1) == 1 and mask.size(2) in (1, T) and mask.size(3) == S and mask.stride(3) == 1):
        return None
    return (mask.stride(0) if mask.size(0) > 1 else 0), (mask.stride(2) if mask.size(2) > 1 else 0)


class _TrainingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_q: Tensor, x_kv: Tensor, mask: Tensor | None, n_heads: int, d_model: int, k_col: int):
        B, T, S, Dh = x_q.size(0), x_q.size(1), x_kv.size(1), d_model // n_heads
        out = x_q.new_empty(B, T, d_model)
        probs = torch.empty(B, n_heads, T, S, dtype=torch.float32)
        k, v = _column(x_kv, k_col), _column(x_kv, k_col + d_model)
        _call("attention_forward_" + _FUNCTIONS[x_q.dtype],
              x_q.data_ptr(), k, v, mask.data_ptr() if mask is not None else 0, out.data_ptr(), probs.data_ptr(),
              B, n_heads, T, S, Dh, *x_q.stride()[:2], *x_kv.stride()[:2], *x_kv.stride()[:2],
              *_mask_strides(mask, B, T, S), *out.stride()[:2], torch.get_num_threads(), scalar=1.0 / math.sqrt(Dh))
        ctx.save_for_backward(x_q, x_kv, probs)
        ctx.same, ctx.n_heads, ctx.d_model, ctx.k_col = x_q is x_kv, n_heads, d_model, k_col
        return out

    @staticmethod
    def backward(ctx, d_out: Tensor):
        x_q, x_kv, probs = ctx.saved_tensors
        D, k_col = ctx.d_model, ctx.k_col
        B, H, T, S = probs.shape
        if d_out.stride(2) != 1:
            d_out = d_out.contiguous()
        if ctx.same:  # one gradient for the fused projection, every column of it written if [q | k | v]
            d_kv = d_q = x_kv.new_empty(x_kv.shape) if (k_col, x_kv.size(2)) == (D, 3 * D) else x_kv.new_zeros(x_kv.shape)
        else:
            d_q = x_q.new_empty(x_q.shape) if x_q.size(2) == D else x_q.new_zeros(x_q.shape)
            d_kv = x_kv.new_empty(x_kv.shape) if (k_col, x_kv.size(2)) == (0, 2 * D) else x_kv.new_zeros(x_kv.shape)
        _call("attention_backward_" + _FUNCTIONS[x_q.dtype],
              x_q.data_ptr(), _column(x_kv, k_col), _column(x_kv, k_col + D), d_out.data_ptr(), probs.data_ptr(),
              d_q.data_ptr(), _column(d_kv, k_col), _column(d_kv, k_col + D), B, H, T, S, D // H,
              *x_q.stride()[:2], *x_kv.stride()[:2], *x_kv.stride()[:2], *d_out.stride()[:2], *d_q.stride()[:2],
              *d_kv.stride()[:2], *d_kv.stride()[:2], torch.get_num_threads(), scalar=1.0 / math.sqrt(D // H))
        return d_q, None if ctx.same else d_kv, None, None, None, None


def _column(x: Tensor, col: int) -> int:
    """The address of x[0, 0, col]."""
    return x.data_ptr() + col * x.element_size()


def dropout_mask(like: Tensor, p: float) -> Tensor | None:
    """A tensor of like's shape and dtype holding 1 / (1 - p) where an element is kept (probability
    1 - p, exact to 2^-16) and 0 where it is dropped (train_step.c; the seed comes from torch's
    generator, so torch.manual_seed makes it reproducible). None if the kernel does not take it."""
    if not (0.0 < p < 1.0 and like.numel() > 0 and _on_cpu(like) and _wins("dropout", like.dtype)):
        return None
    return _dropout_mask(like, p)


def _dropout_mask(like: Tensor, p: float) -> Tensor:
    mask = torch.empty(like.shape, dtype=like.dtype)
    seed = int(torch.randint(-2**63, 2**63 - 1, (), dtype=torch.int64))
    _call("dropout_mask_" + _FUNCTIONS[like.dtype], mask.data_ptr(), mask.numel(), seed, round(p * 65536),
          torch.get_num_threads(), scalar=1.0 / (1.0 - p))
    return mask


def residual_layer_norm(x: Tensor, y: Tensor, norm: nn.LayerNorm, p: float) -> Tensor | None:
    """norm(x + dropout(y, p)) for x, y (..., D), with a backward pass: training's post-norm residual
    (§3.1, §5.4) in one pass forward and one backward (train_step.c), where PyTorch makes four
    (addcmul, layer_norm, its backward, the dropout mask's product). The mask is `dropout_mask`'s.
    None if the kernel does not take these inputs: contiguous x and y of the norm's dtype, or under
    autocast an fp32 x (the residual stream) and norm with a bf16 y (the sublayer's output)."""
    D = x.size(-1)
    w, b = norm.weight, norm.bias
    if not (x.shape == y.shape and x.numel() > 0 and norm.normalized_shape == (D,) and w is not None
            and b is not None and 0.0 <= p < 1.0 and x.is_contiguous() and y.is_contiguous() and _on_cpu(x, w, b)
            and (y.dtype == x.dtype or (x.dtype, y.dtype) == (torch.float32, torch.bfloat16)) and _on_cpu(y)
            and _wins("residual", y.dtype)):
        return None
    mask = _dropout_mask(y, p) if p > 0 else None
    return _ResidualNorm.apply(x, y, w, b, mask, norm.eps)


class _ResidualNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, y: Tensor, w: Tensor, b: Tensor, mask: Tensor | None, eps: float):
        D = x.size(-1)
        rows = x.numel() // D
        out, z = torch.empty_like(x), torch.empty_like(x)
        stats = torch.empty(rows, 2, dtype=torch.float32)
        _call("residual_norm_forward_" + _suffix(x, y),
              x.data_ptr(), y.data_ptr(), mask.data_ptr() if mask is not None else 0, w.data_ptr(), b.data_ptr(),
              out.data_ptr(), z.data_ptr(), stats.data_ptr(), rows, D, torch.get_num_threads(), scalar=eps)
        ctx.save_for_backward(z, mask, w, stats)
        ctx.y_dtype = y.dtype
        return out

    @staticmethod
    def backward(ctx, d_out: Tensor):
        z, mask, w, stats = ctx.saved_tensors
        d_out = d_out.contiguous()
        D = z.size(-1)
        rows = z.numel() // D
        threads = torch.get_num_threads()
        dx, dy = torch.empty_like(z), torch.empty_like(z, dtype=ctx.y_dtype)
        partial = torch.zeros(threads, 2, D, dtype=torch.float32)  # each part's sums of dw and db
        _call("residual_norm_backward_" + _suffix(dx, dy),
              d_out.data_ptr(), z.data_ptr(), mask.data_ptr() if mask is not None else 0, w.data_ptr(), stats.data_ptr(),
              dx.data_ptr(), dy.data_ptr(), partial.data_ptr(), rows, D, threads)
        dw, db = partial.sum(0).to(w.dtype).unbind(0)
        return dx, dy, dw, db, None, None


def _suffix(x: Tensor, y: Tensor) -> str:
    """The residual kernels' variant for the stream x and the sublayer output y."""
    return _FUNCTIONS[x.dtype] if x.dtype == y.dtype else f"{_FUNCTIONS[x.dtype]}_{_FUNCTIONS[y.dtype]}"


def cross_entropy(logits: Tensor, target: Tensor, eps: float, scale: float,
                  want_grad: bool) -> tuple[Tensor, Tensor | None] | None:
    """Label-smoothed cross-entropy of each row of logits (N, V) against target (N,) -> fp32 losses
    (N,), and with want_grad the gradient scale * (softmax - (1 - eps) onehot - eps / V) in logits'
    dtype: aiayn.train.loss._LabelSmoothedCE's forward pass in one multithreaded kernel
    (train_step.c). None if the kernel does not take these inputs."""
    if not (logits.dim() == 2 and logits.size(0) > 0 and logits.stride(1) == 1 and target.dtype == torch.int64
            and target.shape == logits.shape[:1] and target.is_contiguous() and target.is_cpu and _on_cpu(logits)
            and _wins("loss", logits.dtype)):
        return None
    n, V = logits.shape
    losses = torch.empty(n, dtype=torch.float32)
    grad = torch.empty(n, V, dtype=logits.dtype) if want_grad else None
    floats = _array("f", [eps, scale])
    status = _call("cross_entropy_" + _FUNCTIONS[logits.dtype], logits.data_ptr(), logits.stride(0), target.data_ptr(),
                   losses.data_ptr(), grad.data_ptr() if grad is not None else 0, n, V, torch.get_num_threads(),
                   floats.buffer_info()[0])
    if status == -2:
        raise IndexError(f"target id out of range for {V} classes")
    return losses, grad
