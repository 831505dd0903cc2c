"""Optional C kernels for a CPU, built on first use for the machine they run on.

PyTorch's operators cover everything aiayn does; a kernel here does several of them in one call where
measurement showed that to pay. decode_step.c serves a decoding step: less time, and fewer
operators, each of which hands the GIL over between decoding threads. train_step.c serves a training
step: attention, the post-norm residual (dropout + LayerNorm) and the feed-forward's bias + GELU,
forward and backward, dropout masks and the loss, on PyTorch's own OpenMP threads. The kernels are
plain C (no PyTorch headers), compiled with the system's C compiler for this CPU (-march=native,
capped like oneDNN by ONEDNN_MAX_CPU_ISA / ATEN_CPU_CAPABILITY) into a cache directory, and called
through ctypes, which releases the GIL. Each kernel takes one struct of named, typed arguments and
returns a status (abi.h states the contract); the structs' ctypes mirrors are below, compared field
by field with the library's own table when it loads, and the kernels' limits are read from it.

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
import warnings
from enum import IntEnum
from pathlib import Path

import torch
from torch import Tensor, nn

from aiayn import capability
from aiayn.kernels import tuning

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
SOURCES = (HERE / "decode_step.c", HERE / "train_step.c", HERE / "abi.c")  # one library
HEADERS = (HERE / "common.h", HERE / "abi.h")
MAX_QUERIES = 8  # queries per row up to which the kernel beats PyTorch's fused attention
# MAX_KEYS, MAX_HEAD_DIM, MAX_ROW, INT8_HEAD, INT8_MAX_K: abi.h's, read from the library when it loads
# (and INT8_LEVELS: the levels a sign its int8 kernel rounds inputs to, 127 with AVX512_VNNI, 63 with
# AVX2, 0 where it does not (then its tiles hold groups of 1 input, else 4))
_LIMITS: dict[str, int] = {}
_FLAG_SETS = (  # the first that builds wins: tuned for this CPU with OpenMP (train_step.c), then portable
    ["-O3", "-march=native", "-fopenmp", "-fno-math-errno"],
    ["-O3", "-march=native", "-fopenmp-simd", "-fno-math-errno"],
    ["-O3", "-mcpu=native", "-fopenmp-simd", "-fno-math-errno"],  # Apple clang on arm64
    ["-O2"],
)
_FUNCTIONS = {torch.float32: "f32", torch.bfloat16: "bf16"}  # dtype -> the C functions' suffix
_MIXED = {  # kernel -> its entry points of mixed types: an fp32 stream and a bf16 sublayer; fp32 inputs, int8 weights
    "residual_norm_forward": ("f32_bf16",), "residual_norm_backward": ("f32_bf16",),
    "linear": ("f32_i8",), "decoder_layer": ("f32_i8",), "decoder_step": ("f32_i8",), "search": ("f32_i8",),
    "greedy": ("f32_i8",)}


def __getattr__(name: str) -> int:
    """MAX_KEYS (keys per attention row), MAX_HEAD_DIM, MAX_ROW (add_layer_norm's row): the C side's
    limits (abi.h), read from the library; an AttributeError where it is not built."""
    if name in ("MAX_KEYS", "MAX_HEAD_DIM", "MAX_ROW"):
        if _library() is None:
            raise AttributeError(f"{name}: aiayn's C kernels are not built here")
        return _LIMITS[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ------------------------------------------------------------------------------- the boundary
ABI_VERSION = 9  # abi.h's AIAYN_ABI_VERSION


class Status(IntEnum):
    """What a kernel returns (abi.h's aiayn_status; the names are checked against the library's)."""
    OK = 0
    NULL_POINTER = 1  # a pointer it needs is NULL
    BAD_SIZE = 2      # a size is negative, zero or inconsistent
    OVER_LIMIT = 3    # a size is over MAX_KEYS, MAX_HEAD_DIM or MAX_ROW
    BAD_STRIDE = 4    # a stride is negative or shorter than its row
    BAD_INDEX = 5     # an id (token, target, EOS) is out of range
    NO_MEMORY = 6     # its scratch could not be allocated


class KernelError(RuntimeError):
    """A kernel refused its arguments: this module broke abi.h's contract (a bug), caught by the kernel
    before it touched any memory."""


def _struct(kernel: str, pointers: str, sizes: str, floats: str = "") -> type[ctypes.Structure]:
    """The ctypes mirror of abi.h's `<kernel>_args`: its pointers, int64 sizes and strides, and floats,
    by name and in order. A misspelt keyword raises (__slots__); the fields are compared with the
    library's table of the C struct when it loads."""
    fields = ([(n, ctypes.c_void_p) for n in pointers.split()] + [(n, ctypes.c_int64) for n in sizes.split()]
              + [(n, ctypes.c_float) for n in floats.split()])
    return type(f"{kernel}_args", (ctypes.Structure,), {"__slots__": (), "_fields_": fields})


_ATTENTION_STRIDES = "qs_b qs_t ks_b ks_s vs_b vs_s"
LAYER_WEIGHTS = ("qkv_w qkv_b self_w self_b norm1_w norm1_b q_w q_b cross_w cross_b norm2_w norm2_b "
                 "ff1_w ff1_b ff2_w ff2_b norm3_w norm3_b").split()  # decoder_layer's, in its order
_STRUCTS = {  # kernel -> its argument struct (decode_step.c, then train_step.c)
    "attend": _struct("attend", "q k v mask out k_new v_new",
                      "B H n_queries t dh group qs_b qs_h qs_i ks_b ks_h ks_t vs_b vs_h vs_t ms_b os_b os_i os_h "
                      "kn_b kn_h vn_b vn_h", "scale"),
    "add_norm": _struct("add_norm", "x y weight bias out", "rows n xs ys os", "eps"),
    "argmax": _struct("argmax", "x banned out record rows_of limits",
                      "rows n xs n_banned record_stride record_rows column eos step_len done"),
    "embed": _struct("embed", "tokens table positions out", "rows length vocab n", "scale"),
    "beam": _struct("beam", "x scores forbid at_limit out_scores out_tokens out_beams unsettled",
                    "sentences r V xs n n_forbid eos eos_banned keep"),
    "linear": _struct("linear", "x w bias out", "rows n k xs os relu"),
    "quantize": _struct("quantize", "x out", "rows k xs zero", "scale"),
    "decoder_layer": _struct("decoder_layer", f"x out {' '.join(LAYER_WEIGHTS)} k_cache v_cache source_k source_v mask",
                             "B D H d_ff t S group ks_b ks_h ks_t vs_b vs_h vs_t sks_b sks_h sks_t svs_b svs_h svs_t "
                             "ms_b", "eps"),
    "decoder_step": _struct("decoder_step", "tokens table positions layers out_w out_b logits order",
                            "B t n_layers vocab D V", "scale"),
    "search": _struct("search", "step positions penalties forbid out_tokens out_scores out_lengths",
                      "k bos eos max_len min_len n_forbid finished steps"),
    "greedy": _struct("greedy", "step positions forbid out_tokens", "bos eos max_len min_len n_forbid length"),
    "attention_forward": _struct("attention_forward", "q k v mask out probs",
                                 f"B H nt ns dh {_ATTENTION_STRIDES} ms_b ms_t os_b os_t threads seed threshold",
                                 "scale keep"),
    "attention_backward": _struct("attention_backward", "q k v dout probs mask dq dk dv",
                                  f"B H nt ns dh {_ATTENTION_STRIDES} ms_b ms_t gs_b gs_t dqs_b dqs_t dks_b dks_s dvs_b dvs_s "
                                  "threads seed threshold", "scale keep"),
    "dropout_mask": _struct("dropout_mask", "mask", "n seed threshold threads", "scale"),
    "residual_norm_forward": _struct("residual_norm_forward", "x y mask w b out z stats", "rows n threads", "eps"),
    "residual_norm_backward": _struct("residual_norm_backward", "dout z mask w stats dx dy partial", "rows n threads"),
    "cross_entropy": _struct("cross_entropy", "logits target losses grad", "stride rows V threads", "eps scale"),
    "bias_gelu_forward": _struct("bias_gelu_forward", "h bias out grad", "rows n threads"),
    "bias_gelu_backward": _struct("bias_gelu_backward", "dout grad dh partial", "rows n threads"),
}


class _Field(ctypes.Structure):  # abi.h's aiayn_field
    _fields_ = [("name", ctypes.c_char_p), ("type", ctypes.c_char_p), ("offset", ctypes.c_int64),
                ("size", ctypes.c_int64)]


_KINDS = {ctypes.c_void_p: "pointer", ctypes.c_int64: "int64", ctypes.c_float: "float"}  # a field's ctypes type


def _c_kind(c_type: str) -> str:
    """pointer, int64 or float: the kind of a C type as abi.h spells it ("const void *", "int64_t", "float")."""
    return "pointer" if c_type.endswith("*") else {"int64_t": "int64", "float": "float"}.get(c_type, c_type)


def _abi_mismatch(library: ctypes.CDLL) -> str | None:
    """Where the library's boundary differs from this module's view of it (version, statuses, every
    field of every struct: name, kind, offset, size), or None."""
    library.aiayn_abi_version.restype = ctypes.c_int
    if (version := library.aiayn_abi_version()) != ABI_VERSION:
        return f"its ABI version is {version}, this module's {ABI_VERSION}"
    library.aiayn_status_name.restype = ctypes.c_char_p
    library.aiayn_status_name.argtypes = [ctypes.c_int]
    for status in Status:
        if library.aiayn_status_name(status) != status.name.encode():
            return f"its status {int(status)} is {library.aiayn_status_name(status)!r}, not {status.name}"
    fields = library.aiayn_abi_fields
    fields.restype, fields.argtypes = ctypes.POINTER(_Field), [ctypes.c_char_p, ctypes.POINTER(ctypes.c_int64)]
    for kernel, struct in _STRUCTS.items():
        size = ctypes.c_int64()
        table = fields(kernel.encode(), ctypes.byref(size))
        if not table:
            return f"it has no {kernel}_args"
        theirs = []
        while table[len(theirs)].name is not None:
            f = table[len(theirs)]
            theirs.append((f.name.decode(), _c_kind(f.type.decode()), f.offset, f.size))
        ours = [(name, _KINDS[ctype], getattr(struct, name).offset, getattr(struct, name).size)
                for name, ctype in struct._fields_]
        if theirs != ours or size.value != ctypes.sizeof(struct):
            diff = next((f"{t} against {o}" for t, o in zip(theirs, ours) if t != o),
                        f"{len(theirs)} fields, {size.value} bytes against {len(ours)}, {ctypes.sizeof(struct)}")
            return f"{kernel}_args differs: (name, kind, offset, size) {diff}"
    return None


def enabled() -> bool:
    """AIAYN_KERNELS: 1 (default) the kernels that win on this machine (aiayn.kernels.tuning), all:
    every kernel wherever it takes the inputs, 0: none."""
    return os.environ.get("AIAYN_KERNELS", "1") != "0"


def _wins(family: str, dtype: torch.dtype, head_dim: int = 0, causal: bool = False) -> bool | int:
    """Whether a kernel family beat PyTorch on this machine (tuning.py; for "attention", the longest
    length at which it did, for this head size, with a causal mask or over every key). Cheap after the
    first call of a process."""
    forced = _forced(family)  # (these lookups are cheap enough for every call)
    if forced is not None:
        return {"attention": MAX_TRAIN_LENGTH, "linear": MAX_LINEAR_ROWS, "layer": MAX_LINEAR_ROWS,
                "beam": tuning.BEAM_SENTENCES[-1]}.get(family, True) if forced else False
    # (called once the library is known to be there)
    return tuning.decide(_key(family, dtype, head_dim, causal), _library()._name)


def _key(family: str, dtype: torch.dtype, head_dim: int = 0, causal: bool = False) -> str:
    """A decision's key in tuning's tables: "<family>_<f32|bf16|i8>", "_dh<head size>[_causal]" for
    attention."""
    key = f"{family}_{_FUNCTIONS.get(dtype, 'i8')}"
    if family == "attention":
        key += f"_dh{head_dim}" + ("_causal" if causal else "")
    return key


def _forced(family: str) -> bool | None:
    """True / False: every kernel of `family` on / off whatever this machine's timing says (while a
    family is timed, or AIAYN_KERNELS=all); None: the timing decides."""
    forced = tuning.forced(family)
    return True if forced is None and os.environ.get("AIAYN_KERNELS") == "all" else forced


def cache_dir() -> Path:
    root = os.environ.get("AIAYN_CACHE") or os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "aiayn" / "kernels"


def _compiler() -> str | None:
    for cc in (os.environ.get("CC"), sysconfig.get_config_var("CC"), "cc", "gcc", "clang"):
        if cc and shutil.which(cc.split()[0]):
            return cc
    return None


def machine_key() -> str:
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
    if m.capped:  # (below AMX: its tiles are not used either)
        cap.append("-DAIAYN_NO_AMX")
    return [[*flags, *cap] if "-march=native" in flags else flags for flags in _FLAG_SETS]


def _build(sources: tuple[Path, ...]) -> Path | None:
    """The library built for this machine (cached by sources, compiler, flags and machine), or None.
    A failed build is remembered beside where the library would be (`.failed`, with the compiler's
    message) and warned about once, when it fails: later processes do not try it again."""
    cc = _compiler()
    if cc is None:
        log.info("no C compiler found: aiayn uses PyTorch's operators only")
        return None
    texts = [p.read_bytes() for p in (*sources, *HEADERS)]
    machine = machine_key().encode()
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
            print("aiayn: building the C kernels for this CPU (once: 5-20 s)", file=sys.stderr, flush=True)
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
    if library is None:
        return None
    try:
        mismatch = _abi_mismatch(library)
    except AttributeError as e:  # a function missing
        mismatch = str(e)
    if mismatch is not None:
        warnings.warn(f"aiayn's C kernels ({path}) do not match this aiayn: {mismatch}. PyTorch's operators are "
                      "used, slower on a CPU", RuntimeWarning, stacklevel=2)
        return None
    for kernel, struct in _STRUCTS.items():  # every function: int f(const <kernel>_args *)
        for suffix in (*_FUNCTIONS.values(), *_MIXED.get(kernel, ())):
            fn = getattr(library, f"{kernel}_{suffix}")
            fn.restype, fn.argtypes = ctypes.c_int, [ctypes.POINTER(struct)]
    library.aiayn_status_message.restype, library.aiayn_status_message.argtypes = ctypes.c_char_p, [ctypes.c_int]
    for name in ("MAX_KEYS", "MAX_HEAD_DIM", "MAX_ROW", "INT8_HEAD", "INT8_MAX_K", "INT8_LEVELS"):
        getter = getattr(library, f"aiayn_{name.lower()}")
        getter.restype = ctypes.c_int64
        _LIMITS[name] = getter()
    return library


def available() -> bool:
    """Whether the kernels are built and enabled."""
    return enabled() and _library() is not None


def library_path() -> Path | None:
    """The kernels' library built for this machine (built now if it is not yet), or None where
    there is none (no compiler, a failed build, not Linux or macOS)."""
    library = _library()
    return None if library is None else Path(library._name)


def usable(*tensors: Tensor, family: str = "decode") -> bool | int:
    """Whether a decoding kernel is built, enabled and faster here, and takes these tensors: on a CPU,
    fp32 or bf16 (all one dtype), no gradient wanted (it has no backward): False, or the family's
    decision (True, or for a family decided by size, the most it won at). Cheap: it runs a few times
    a decoding step."""
    return (_on_cpu(*tensors) and (not torch.is_grad_enabled() or not any(t.requires_grad for t in tensors))
            and _wins(family, tensors[0].dtype))


def _on_cpu(*tensors: Tensor) -> bool:
    """Whether the kernels are built and enabled and these are CPU tensors of one dtype they have."""
    dtype = tensors[0].dtype
    return dtype in _FUNCTIONS and available() and all(t.is_cpu and t.dtype == dtype for t in tensors)


def _call(function: str, args: ctypes.Structure, declines: tuple[Status, ...] = ()) -> bool:
    """Runs the C function `function` (<kernel>_<f32|bf16>) on its argument struct: True when it ran,
    False when it refused with one of `declines` (the caller then uses PyTorch's operators). Any other
    refusal raises: MemoryError for its scratch, else KernelError (nothing was touched)."""
    status = getattr(_library(), function)(args)
    if status == Status.OK:
        return True
    if status in declines:
        return False
    if status == Status.NO_MEMORY:
        raise MemoryError(f"out of memory for aiayn's {function} kernel")
    message = _library().aiayn_status_message(status).decode()
    raise KernelError(f"aiayn's {function} kernel refused its arguments: {message} (status {status})")


def _takes(B: int, H: int, Dh: int, k: Tensor, v: Tensor, mask: Tensor | None) -> bool:
    """Whether the kernel takes keys/values k, v (b, H, S, Dh) and a mask for B rows of queries (the
    library is loaded: its limits are known)."""
    b, S = k.size(0), k.size(2)
    return (k.shape == v.shape and k.size(1) == H and k.size(3) == Dh and b > 0 and B % b == 0
            and 0 < S <= _LIMITS["MAX_KEYS"] and 0 < Dh <= _LIMITS["MAX_HEAD_DIM"] and k.stride(3) == 1
            and v.stride(3) == 1 and (mask is None or (mask.dtype == torch.bool and mask.shape == (b, 1, 1, S))))


def supports(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> bool:
    """Whether `decode_attention` takes these inputs (else use PyTorch's attention)."""
    B, H, _, Dh = q.shape
    return q.stride(3) == 1 and usable(q, k, v) and _takes(B, H, Dh, k, v, mask)


def _run(q: Tensor, q_strides, k: Tensor, v: Tensor, mask: Tensor | None, out: Tensor, out_strides,
         B: int, H: int, T: int, S: int, Dh: int, new: tuple[int, int] | None = None, new_strides=(0,) * 4,
         declines: tuple[Status, ...] = ()) -> bool:
    """The C function: q's (row, head, query) strides and out's (row, query, head), in elements;
    `new`: addresses of the keys and values to append at position S - 1. False if it declined."""
    if mask is not None and mask.stride(3) != 1:
        mask = mask.contiguous()
    (k_new, v_new), (kn_b, kn_h, vn_b, vn_h) = new or (0, 0), new_strides
    (qs_b, qs_h, qs_i), (os_b, os_i, os_h) = q_strides, out_strides
    (ks_b, ks_h, ks_t), (vs_b, vs_h, vs_t) = k.stride()[:3], v.stride()[:3]
    return _call("attend_" + _FUNCTIONS[q.dtype], _STRUCTS["attend"](
        q=q.data_ptr(), k=k.data_ptr(), v=v.data_ptr(), mask=mask.data_ptr() if mask is not None else 0,
        out=out.data_ptr(), k_new=k_new, v_new=v_new, B=B, H=H, n_queries=T, t=S, dh=Dh, group=B // k.size(0),
        qs_b=qs_b, qs_h=qs_h, qs_i=qs_i, ks_b=ks_b, ks_h=ks_h, ks_t=ks_t, vs_b=vs_b, vs_h=vs_h, vs_t=vs_t,
        ms_b=mask.stride(0) if mask is not None else 0, os_b=os_b, os_i=os_i, os_h=os_h,
        kn_b=kn_b, kn_h=kn_h, vn_b=vn_b, vn_h=vn_h, scale=1.0 / math.sqrt(Dh)), declines)


def decode_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
    """softmax(q k^T / sqrt(Dh) + mask) v for q (B, H, T, Dh) and k, v (b, H, S, Dh), where each
    group of B / b consecutive rows of q attends to one row of k and v; mask (b, 1, 1, S) boolean,
    True = may attend. Returns (B, H, T, Dh), a view of a (B, T, H, Dh) tensor: merging the heads
    after it is free. No gradient; the caller checks `supports` first (else KernelError, nothing written)."""
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
    ran = _run(qkv, (rows, Dh, 0), k_buf, v_buf, None, out, (D, D, Dh), B, n_heads, 1, start + 1, Dh,
               new=(ptr + D * size, ptr + 2 * D * size), new_strides=(rows, Dh, rows, Dh), declines=(Status.OVER_LIMIT,))
    return out if ran else None


def cross_attention_step(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor | None:
    """Queries q (B, T, D), heads not yet split, attending to the source's keys and values
    (b, H, S, Dh), each group of B / b rows to one source row, with mask (b, 1, 1, S) or None.
    -> (B, T, D), heads merged. None if the kernel does not take these inputs."""
    B, T, D = q.shape
    H, Dh = k.size(1), k.size(3)
    if not (H * Dh == D and T <= MAX_QUERIES and q.stride(2) == 1 and usable(q, k, v) and _takes(B, H, Dh, k, v, mask)):
        return None
    out = q.new_empty(B, T, D)
    ran = _run(q, (q.stride(0), Dh, q.stride(1)), k, v, mask, out, (T * D, D, Dh), B, H, T, k.size(2), Dh,
               declines=(Status.OVER_LIMIT,))
    return out if ran else None


def add_layer_norm(x: Tensor, y: Tensor, norm: nn.LayerNorm, out: Tensor | None = None) -> Tensor | None:
    """norm(x + y) for x, y (..., D) in one pass: the post-norm residual of an inference step (PyTorch:
    two ops), into `out` if given (it may be x or y: each row is read before it is written). None if
    the kernel does not take these inputs."""
    D = x.size(-1)
    w, b = norm.weight, norm.bias
    if not (x.shape == y.shape and norm.normalized_shape == (D,) and w is not None and b is not None
            and x.is_contiguous() and y.is_contiguous() and usable(x, y, w, b) and 0 < D <= _LIMITS["MAX_ROW"]
            and (out is None or (out.shape == x.shape and out.is_contiguous() and out.dtype == x.dtype))):
        return None
    if out is None:
        out = x.new_empty(x.shape)
    args = _STRUCTS["add_norm"](x=x.data_ptr(), y=y.data_ptr(), weight=w.data_ptr(), bias=b.data_ptr(),
                                out=out.data_ptr(), rows=x.numel() // D, n=D, xs=D, ys=D, os=D, eps=norm.eps)
    return out if _call("add_norm_" + _FUNCTIONS[x.dtype], args, declines=(Status.OVER_LIMIT,)) else None


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
    args = _STRUCTS["argmax"](x=logits.data_ptr(), banned=banned.data_ptr(), out=tokens.data_ptr(),
                              record=record.data_ptr(), rows_of=rows_of.data_ptr(), limits=limits.data_ptr(),
                              rows=b, n=V, xs=logits.stride(0), n_banned=banned.numel(), record_stride=record.stride(0),
                              record_rows=record.size(0), column=column, eos=eos, step_len=column + 1)
    _call("argmax_" + _FUNCTIONS[logits.dtype], args)
    return args.done


def quantize(x: Tensor) -> tuple[Tensor, float, int] | None:
    """x (..., k), fp32 or bf16 -> (q, scale, zero): bytes q (rows, k), x = (q - zero) * scale to
    rounding, one scale for the whole tensor (decode_step.c's quantize: the inputs of oneDNN's int8
    linear). None where the kernels are not here or a value of x is not finite."""
    x2 = x.reshape(-1, x.size(-1))
    if not (x2.numel() and x2.stride(1) == 1 and _on_cpu(x2)):
        return None
    q = torch.empty(x2.shape, dtype=torch.uint8)
    args = _STRUCTS["quantize"](x=x2.data_ptr(), out=q.data_ptr(), rows=x2.size(0), k=x2.size(1), xs=x2.stride(0))
    _call("quantize_" + _FUNCTIONS[x.dtype], args)
    return None if math.isnan(args.scale) else (q, args.scale, args.zero)


MAX_LINEAR_ROWS = 256  # the most rows `linear` is timed at (tuning.LINEAR_ROWS), and takes under AIAYN_KERNELS=all


def linear_rows(dtype: torch.dtype) -> int:
    """Up to how many rows `linear` beats oneDNN's GEMM on this machine, for weights of `dtype` (int8:
    PyTorch's dynamically quantized GEMM) (tuning.py; 0: never, or the kernels are not here)."""
    return _rows("linear", dtype)


def generator_rows(dtype: torch.dtype) -> int:
    """Up to how many rows the whole decoding step in one call (`decoder_step_plan`) takes the
    generator on `linear`: up to `linear_rows`, and past them while the kernel alone was not slower
    than oneDNN's or fbgemm's GEMM beyond timing noise (tuning.rows_not_slower). The step layer by
    layer keeps LINEAR_MARGIN's 10% (a step's other work shares the caches), but in one call the
    step also saves the Python between its layers and the generator, and one sentence's beam search
    runs in one call (`search`) only with the generator in its step. (A Zen 4, one sentence, beam 4:
    capped to AVX2, int8, one thread, the kernel alone 1.07x fbgemm at 4 rows, so `linear_rows` 2;
    with the generator in the step up to 4 rows the search was 1.3x faster. Uncapped, bf16, two
    threads, the kernel alone 1.02x oneDNN at 4 rows, a tie: 1.17x.)"""
    rows = linear_rows(dtype)
    if not _takes_rows(dtype) or _forced("linear") is not None:
        return rows
    return max(rows, tuning.rows_not_slower(_key("linear", dtype), _library()._name))


def layer_rows(dtype: torch.dtype) -> int:
    """Up to how many rows `decoder_layer` (with linear layers of `dtype`, int8 included) beats the
    layer's modules on this machine (tuning.py; 0: never, or the kernels are not here)."""
    return _rows("layer", dtype)


def _rows(family: str, dtype: torch.dtype) -> int:
    return int(_wins(family, dtype)) if _takes_rows(dtype) else 0


def _takes_rows(dtype: torch.dtype) -> bool:
    """Whether the few-rows kernels are built and enabled here and have weights of `dtype`."""
    return (dtype in _FUNCTIONS or dtype == torch.int8) and available()


def step_tiles(dtype: torch.dtype) -> bool:
    """Whether an inference copy's decoding-step linear layers (weights of `dtype`) should hold the
    kernel's tiles: where the linear kernel or the one-call decoder layer wins for some rows."""
    return linear_rows(dtype) > 0 or layer_rows(dtype) > 0


def linear_tiles(weight: Tensor, scales: Tensor | None = None) -> Tensor:
    """A linear layer's weight (n, k) in the tiles `linear` reads, 16 output rows side by side, zeros
    past row n: fp32 (ceil(n / 16), k, 16); bf16 (ceil(n / 16), ceil(k / 2), 16, 2), pairs of inputs
    side by side (zeros past column k), as a CPU's bf16 dot product takes them; int8 weights with
    their outputs' fp32 `scales` (n,) (the weight is scales[:, None] * weight): (ceil(n / 16), 128 +
    16 g ceil(k / g)) bytes, each tile its 16 scales, its outputs' int32 weight sums, then
    (ceil(k / g), 16, g) int8, g = 4 where the kernel multiplies bytes (AVX512_VNNI, AVX2), else 1.
    A copy."""
    n, k = weight.shape
    if weight.dtype == torch.int8:
        if _library() is None:
            raise RuntimeError("int8 tiles are for aiayn's C kernels, which are not built here")
        g = _int8_group()
        padded = weight.new_zeros(-(-n // 16) * 16, -(-k // g) * g)
        padded[:n, :k] = weight
        s = torch.ones(padded.size(0), dtype=torch.float32)
        s[:n] = scales
        sums = padded.sum(1, dtype=torch.int32)
        weights = padded.view(-1, 16, padded.size(1) // g, g).transpose(1, 2).reshape(-1, 16 * padded.size(1))
        return torch.cat([s.view(-1, 16).view(torch.int8), sums.view(-1, 16).view(torch.int8), weights], 1)
    pair = 2 if weight.dtype == torch.bfloat16 else 1
    padded = weight.detach().new_zeros(-(-n // 16) * 16, -(-k // pair) * pair)
    padded[:n, :k] = weight.detach()
    tiles = padded.view(-1, 16, padded.size(1) // pair, pair).transpose(1, 2).contiguous()
    return tiles if pair == 2 else tiles.view(-1, k, 16)


def linear(x: Tensor, tiles: Tensor, bias: Tensor | None, n: int, relu: bool = False) -> Tensor | None:
    """x W^T + b (then ReLU if `relu`) for x (..., k), W in `linear_tiles`' form, n outputs: where x
    has few rows (up to `linear_rows`) of W's dtype and no gradient is wanted. None otherwise (the
    caller uses oneDNN or PyTorch)."""
    k = x.size(-1)
    rows = x.numel() // k if k else 0
    if not (_tiles_fit(tiles, n, k, x.dtype) and x.is_contiguous() and 0 < rows
            and (bias is None or (bias.shape == (n,) and bias.is_contiguous()))
            and _on_cpu(x, *(() if bias is None else (bias,))) and tiles.is_cpu
            and (not torch.is_grad_enabled() or not any(t is not None and t.requires_grad for t in (x, tiles, bias)))
            and rows <= _wins("linear", tiles.dtype)):
        return None
    out = x.new_empty(*x.shape[:-1], n)
    _call("linear_" + _variant(x, tiles), _STRUCTS["linear"](
        x=x.data_ptr(), w=tiles.data_ptr(), bias=0 if bias is None else bias.data_ptr(), out=out.data_ptr(),
        rows=rows, n=n, k=k, xs=k, os=n, relu=int(relu)))
    return out


def _tiles_fit(tiles: Tensor, n: int, k: int, dtype: torch.dtype) -> bool:
    """Whether `tiles` is the `linear_tiles` form of an (n, k) weight for inputs of `dtype`: of that
    dtype, or int8 for fp32 inputs."""
    if tiles.dtype == torch.int8:
        g = _int8_group()  # (None: no library)
        return (g is not None and dtype == torch.float32 and k <= _LIMITS["INT8_MAX_K"] and tiles.is_contiguous()
                and tiles.shape == (-(-n // 16), _LIMITS["INT8_HEAD"] + 16 * g * -(-k // g)))
    pairs = dtype == torch.bfloat16
    return (tiles.dtype == dtype and tiles.dim() == (4 if pairs else 3) and tiles.size(2) == 16
            and tiles.size(0) == -(-n // 16) and tiles.size(1) == (-(-k // 2) if pairs else k) and tiles.is_contiguous())


def _int8_group() -> int | None:
    """Inputs per group in the library's int8 tiles (None before it is loaded)."""
    levels = _LIMITS.get("INT8_LEVELS")
    return None if levels is None else 4 if levels else 1


def _variant(x: Tensor, tiles: Tensor) -> str:
    """The C functions' suffix for inputs x and weights in `tiles`: f32, bf16, or f32_i8 (int8 weights)."""
    return _FUNCTIONS[x.dtype] + ("_i8" if tiles.dtype == torch.int8 else "")


def decoder_layer_plan(weights: list[Tensor | None], n_heads: int, d_ff: int, eps: float) -> tuple | None:
    """What `decoder_layer` needs of one layer, checked once: `weights` as LAYER_WEIGHTS names them
    (the linear layers' in `linear_tiles` form and their biases, or None; the norms' weights and
    biases), its head count, feed-forward width and the norms' eps. None if the kernel does not take
    them (or is not built)."""
    if len(weights) != len(LAYER_WEIGHTS) or weights[0] is None or weights[4] is None or not available():
        return None
    tiles_dtype, D = weights[0].dtype, weights[4].numel()  # (qkv_w, norm1_w)
    dtype = torch.float32 if tiles_dtype == torch.int8 else tiles_dtype  # the inputs'
    if dtype not in _FUNCTIONS or n_heads < 1 or D % n_heads or not 0 < D <= _LIMITS["MAX_ROW"]:
        return None
    shapes = {"qkv": (3 * D, D), "self": (D, D), "q": (D, D), "cross": (D, D), "ff1": (d_ff, D), "ff2": (D, d_ff)}
    for name, w in zip(LAYER_WEIGHTS, weights):
        part, kind = name.split("_")
        if w is None and kind == "b" and part in shapes:  # a linear layer without a bias
            continue
        if w is None or not w.is_cpu:
            return None
        n, k = shapes.get(part, (D, 0))
        if not (_tiles_fit(w, n, k, dtype) and w.dtype == tiles_dtype if kind == "w" and part in shapes
                else w.dtype == dtype and w.shape == (n,) and w.is_contiguous()):
            return None
    args = _STRUCTS["decoder_layer"](D=D, H=n_heads, d_ff=d_ff, eps=eps,
                                     **{name: 0 if w is None else w.data_ptr() for name, w in zip(LAYER_WEIGHTS, weights)})
    function = "decoder_layer_" + _FUNCTIONS[dtype] + ("_i8" if tiles_dtype == torch.int8 else "")
    grad = any(w is not None and w.requires_grad for w in weights)  # (then it runs only without autograd)
    return args, function, dtype, tiles_dtype, grad, list(weights)  # (the weights kept alive with their addresses)


def decoder_layer(x: Tensor, plan: tuple, k_buf: Tensor, v_buf: Tensor, start: int, source_k: Tensor,
                  source_v: Tensor, mask: Tensor | None) -> Tensor | None:
    """One new position of each row of x (B, 1, D) through a post-norm decoder layer with a ReLU
    feed-forward, in one call (decode_step.c's decoder_layer) -> (B, 1, D). `plan`: the layer's
    weights, from `decoder_layer_plan`. Self-attention's cache k_buf, v_buf (B, H, L, Dh) holds `start`
    positions (the new one is written at `start`); the source's keys and values (b, H, S, Dh), each
    group of B / b rows attending to one, mask (b, 1, 1, S) boolean or None. The same results, bit
    for bit, as the layer's kernels called one by one (`linear`, the attention steps,
    `add_layer_norm`); taken up to as many rows as it beat the layer's modules on this machine
    (`layer_rows`). None otherwise."""
    B, T, D = x.shape
    dtype = plan[2]
    if not (T == 1 and x.dtype == dtype and x.is_contiguous() and usable(x)):
        return None
    args = _layer_args(plan, B, start, k_buf, v_buf, source_k, source_v, mask)
    if args is None or args.D != D:
        return None
    out = x.new_empty(B, 1, D)
    args.x, args.out, args.t = x.data_ptr(), out.data_ptr(), start
    _call(plan[1], args)
    return out


def _layer_args(plan: tuple, B: int, start: int, k_buf: Tensor, v_buf: Tensor, source_k: Tensor, source_v: Tensor,
                mask: Tensor | None) -> ctypes.Structure | None:
    """A decoder layer's arguments for B rows (a copy of its plan's, with the caches, the source and
    their strides), or None where the kernel does not take them (`decoder_layer`'s conditions)."""
    layer, _, dtype, tiles_dtype, grad, _ = plan
    H, Dh = layer.H, layer.D // layer.H
    b, S = source_k.size(0), source_k.size(2)
    if not (0 < B <= _wins("layer", tiles_dtype) and not (grad and torch.is_grad_enabled())
            and _on_cpu(source_k, source_v) and source_k.dtype == dtype and _takes(B, H, Dh, source_k, source_v, mask)
            and (mask is None or mask.stride(3) == 1)):
        return None
    args = type(layer).from_buffer_copy(layer)  # (a plan may serve several decoding threads at once)
    if not _self_cache(args, B, start, k_buf, v_buf, dtype):
        return None
    args.source_k, args.source_v, args.mask = source_k.data_ptr(), source_v.data_ptr(), mask.data_ptr() if mask is not None else 0
    args.B, args.S, args.group = B, S, B // b
    args.sks_b, args.sks_h, args.sks_t = source_k.stride()[:3]
    args.svs_b, args.svs_h, args.svs_t = source_v.stride()[:3]
    args.ms_b = mask.stride(0) if mask is not None else 0
    return args


def _self_cache(args: ctypes.Structure, B: int, start: int, k_buf: Tensor, v_buf: Tensor, dtype: torch.dtype) -> bool:
    """Into a decoder layer's arguments: its self-attention cache k_buf, v_buf (B, H, > start, Dh) of
    `dtype`, addresses and strides. False (nothing set) where the kernel does not take them."""
    H, Dh = args.H, args.D // args.H
    if not (k_buf.size(0) == B and 0 <= start < min(k_buf.size(2), v_buf.size(2)) and _on_cpu(k_buf, v_buf)
            and k_buf.dtype == dtype and _takes(B, H, Dh, k_buf, v_buf, None)):
        return False
    args.k_cache, args.v_cache = k_buf.data_ptr(), v_buf.data_ptr()
    args.ks_b, args.ks_h, args.ks_t = k_buf.stride()[:3]
    args.vs_b, args.vs_h, args.vs_t = v_buf.stride()[:3]
    return True


def _room(caches: list[tuple[Tensor, Tensor]]) -> int:
    """The positions every self-attention cache holds: a step may write at any position below it."""
    return min(min(k.size(2), v.size(2)) for k, v in caches)


def decoder_step_plan(table: Tensor, scale: float, plans: list[tuple], caches: list[tuple[Tensor, Tensor]],
                      start: int, sources: list[tuple[Tensor, Tensor]], mask: Tensor | None, out_tiles: Tensor | None,
                      out_bias: Tensor | None, V: int) -> tuple | None:
    """What `decoder_step` needs of an encoder-decoder's decoder and one decoding's buffers, checked
    once: the embedding table (vocab, D) and its scale; every post-norm decoder layer's plan (from
    `decoder_layer_plan`), self-attention cache (k_buf, v_buf) (B, H, >= start + 1, Dh), source keys
    and values (b, H, S, Dh) and the source mask (b, 1, 1, S) or None; the generator (out_tiles in
    `linear_tiles`' form, its bias or None, V outputs), or out_tiles None: a step without it, whose
    result is the decoder's output (B, 1, D) (`step_makes_logits` says which). Good for as long as
    these buffers are the cache's: the caller keeps them, and with them the plan. None where the
    kernel does not take them: where `embed` or `decoder_layer` would not, or the generator past
    `generator_rows`."""
    dtype, tiles_dtype, function = plans[0][2], plans[0][3], plans[0][1].replace("layer", "step")
    B, D = caches[0][0].size(0), table.size(1)
    if out_tiles is None:
        out_bias, V = None, D
    if not (table.dtype == dtype and table.is_contiguous() and usable(table)
            and all(p[1] == plans[0][1] for p in plans) and len(plans) == len(caches) == len(sources)
            and (out_tiles is None or (_tiles_fit(out_tiles, V, D, dtype) and out_tiles.is_cpu
                                       and out_tiles.dtype == tiles_dtype and B <= generator_rows(tiles_dtype)))
            and (out_bias is None or (out_bias.shape == (V,) and out_bias.is_contiguous() and out_bias.dtype == dtype))):
        return None
    layers = (_STRUCTS["decoder_layer"] * len(plans))()
    for i, (plan, (k_buf, v_buf), (source_k, source_v)) in enumerate(zip(plans, caches, sources)):
        args = _layer_args(plan, B, start, k_buf, v_buf, source_k, source_v, mask)
        if args is None or args.D != D:
            return None
        layers[i] = args
    grad = (any(p[4] for p in plans) or (out_tiles is not None and out_tiles.requires_grad)
            or (out_bias is not None and out_bias.requires_grad))
    args = _STRUCTS["decoder_step"](
        table=table.data_ptr(), layers=ctypes.addressof(layers), out_w=0 if out_tiles is None else out_tiles.data_ptr(),
        out_b=0 if out_bias is None else out_bias.data_ptr(), B=B, n_layers=len(plans), vocab=table.size(0), D=D, V=V,
        scale=scale)
    return args, function, dtype, _room(caches), grad, (layers, table, out_tiles, out_bias, plans)  # (kept alive)


def step_makes_logits(plan: tuple) -> bool:
    """Whether `decoder_step` with this plan ends with the generator (logits), or without it (the
    decoder's output, for the generator's module to finish)."""
    return bool(plan[0].out_w)


def decoder_step_recache(plan: tuple, caches: list[tuple[Tensor, Tensor]], start: int) -> tuple | None:
    """`plan` (from `decoder_step_plan`) for new self-attention caches (k_buf, v_buf) of the same rows,
    everything else the same: what a reorder of beam search's rows changes, every step. Only these
    buffers are checked (~10x cheaper than a new plan). None where the kernel does not take them."""
    base, function, dtype, _, grad, keep = plan
    layers = type(keep[0]).from_buffer_copy(keep[0])
    if not all(_self_cache(args, base.B, start, k_buf, v_buf, dtype) for args, (k_buf, v_buf) in zip(layers, caches)):
        return None
    base = type(base).from_buffer_copy(base)
    base.layers = ctypes.addressof(layers)
    return base, function, dtype, _room(caches), grad, (layers, *keep[1:])


def decoder_step(tokens: Tensor, positions: Tensor, start: int, plan: tuple, order: Tensor | None = None) -> Tensor | None:
    """A whole decoding step of an encoder-decoder in one call (decode_step.c's decoder_step): the
    newest tokens (B, 1) embedded with their positions (1, D) (position `start`), through every
    decoder layer (writing each cache's keys and values at `start`), then the generator -> logits
    (B, 1, V) (a plan without one: the decoder's output (B, 1, D)). `plan`: from `decoder_step_plan`,
    for these caches. `order` (B,): first each cache's rows reordered in place, row b taking row
    order[b]'s positions (beam search's reorder). The same
    results, bit for bit, as `embed`, `decoder_layer` and `linear` called in turn. None where the
    kernel does not take them, or if a token (or an order) is out of range: then nothing is written."""
    base, function, dtype, room, grad, _ = plan
    B, T = tokens.shape
    if not (T == 1 and B == base.B and 0 <= start < room and _takes_ids(tokens) and positions.shape == (1, base.D)
            and positions.dtype == dtype and positions.is_contiguous() and positions.is_cpu
            and not (grad and torch.is_grad_enabled()) and (order is None or (order.shape == (B,) and _takes_ids(order)))):
        return None
    logits = positions.new_empty(B, 1, base.V)
    args = type(base).from_buffer_copy(base)  # (a plan may serve several decoding threads at once)
    args.tokens, args.positions, args.logits, args.t = tokens.data_ptr(), positions.data_ptr(), logits.data_ptr(), start
    args.order = 0 if order is None else order.data_ptr()
    return logits if _call(function, args, declines=(Status.BAD_INDEX,)) else None


def search(plan: tuple, positions: Tensor, penalties: Tensor, forbid: Tensor, bos: int, eos: int, max_len: int,
           min_len: int) -> list[tuple[list[int], float]] | None:
    """One sentence's beam search in one call (decode_step.c's search; aiayn.decode.beam.search is its
    reference): k beams (the plan's rows: `decoder_step_plan`'s, for caches of k rows sharing one
    source) from BOS, `decoder_step` and `beam_candidates` each step, up to max_len tokens. positions
    (max_len + 1, D): the decoder's; penalties (max_len + 1,) float32: the length penalty of a
    hypothesis ending at each step; never a token of `forbid`, nor EOS before min_len tokens. -> the
    finished hypotheses (tokens without BOS and EOS, score), in the order they finished. None where
    the kernels do not take these, or the beam step does not win here (the caller then runs the
    reference), or a token was outside the embeddings (the caches are then spent)."""
    base, function, dtype, room, grad, _ = plan
    L = max_len + 1
    if not (step_makes_logits(plan) and 0 <= max_len and L <= room and positions.shape == (L, base.D)
            and positions.dtype == dtype
            and positions.is_contiguous() and positions.is_cpu and penalties.shape == (L,)
            and penalties.dtype == torch.float32 and penalties.is_contiguous() and penalties.is_cpu
            and _takes_ids(forbid) and 0 <= min_len and not (grad and torch.is_grad_enabled()) and available()
            and _beam_takes(1, _wins("beam", dtype))):
        return None
    k = base.B
    tokens, lengths = torch.empty(k, L, dtype=torch.int64), torch.empty(k, dtype=torch.int64)
    scores = torch.empty(k, dtype=torch.float32)
    args = _STRUCTS["search"](
        step=ctypes.addressof(base), positions=positions.data_ptr(), penalties=penalties.data_ptr(),
        forbid=forbid.data_ptr(), out_tokens=tokens.data_ptr(), out_scores=scores.data_ptr(),
        out_lengths=lengths.data_ptr(), k=k, bos=bos, eos=eos, max_len=max_len, min_len=min_len,
        n_forbid=forbid.numel())
    if not _call(function.replace("decoder_step", "search"), args, declines=(Status.BAD_INDEX,)):
        return None
    return [(tokens[i, :n].tolist(), score) for i, (n, score) in enumerate(zip(lengths[:args.finished].tolist(),
                                                                            scores[:args.finished].tolist()))]


def greedy(plan: tuple, positions: Tensor, forbid: Tensor, bos: int, eos: int, max_len: int,
           min_len: int) -> list[int] | None:
    """One sentence's greedy decoding in one call (decode_step.c's greedy; aiayn.decode.greedy is its
    reference): from BOS, `decoder_step` (the plan's: caches of one row) and the best token each step,
    never one of `forbid`, nor EOS before min_len tokens, until EOS or max_len tokens. positions
    (max_len, D): the decoder's. -> the tokens, without BOS and EOS. None where the kernels do not
    take these or do not win here (the caller then runs the reference), or a token was outside the
    embeddings (the cache is then spent)."""
    base, function, dtype, room, grad, _ = plan
    if not (step_makes_logits(plan) and base.B == 1 and 0 <= max_len <= room and positions.shape == (max_len, base.D)
            and positions.dtype == dtype
            and positions.is_contiguous() and positions.is_cpu and _takes_ids(forbid) and 0 <= min_len
            and not (grad and torch.is_grad_enabled()) and available() and _wins("decode", dtype)):
        return None
    tokens = torch.empty(max_len, dtype=torch.int64)
    args = _STRUCTS["greedy"](step=ctypes.addressof(base), positions=positions.data_ptr(), forbid=forbid.data_ptr(),
                              out_tokens=tokens.data_ptr(), bos=bos, eos=eos, max_len=max_len, min_len=min_len,
                              n_forbid=forbid.numel())
    if not _call(function.replace("decoder_step", "greedy"), args, declines=(Status.BAD_INDEX,)):
        return None
    return tokens[:args.length].tolist()


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
    args = _STRUCTS["embed"](tokens=tokens.data_ptr(), table=table.data_ptr(), positions=positions.data_ptr(),
                             out=out.data_ptr(), rows=B * T, length=T, vocab=table.size(0), n=D, scale=scale)
    return out if _call("embed_" + _FUNCTIONS[table.dtype], args, declines=(Status.BAD_INDEX,)) else None


def _beam_takes(sentences: int, most: int) -> bool:
    """Whether the beam step kernel runs for this many sentences: up to the most at which it won
    here (tuning's BEAM_SENTENCES), and at any number once it won at the largest measured."""
    return 0 < sentences <= most or most >= tuning.BEAM_SENTENCES[-1]


def beam_candidates(logits: Tensor, scores: Tensor, n: int, forbid: Tensor, eos: int, eos_banned: bool,
                    at_limit: Tensor | None, keep: int = 0) -> tuple[Tensor, Tensor, Tensor, int] | None:
    """Beam search's step in one pass (aiayn.decode.beam.search, where `beam_step` is the reference):
    logits (b * r, 1, V) of r beams of b sentences, scores (b, r) their log-probabilities so far ->
    the n best extensions of each sentence (scores (b, n), tokens, beams), best first, by
    scores + log_softmax(logits), never a token of `forbid`, nor EOS if eos_banned, and only EOS for
    a sentence with at_limit set (b,). Missing candidates are -inf (token 0, beam 0). And how many
    sentences have EOS among their `keep` best or no finite candidate (0 <= keep <= n). None if the
    kernel does not take these inputs."""
    b, r = scores.shape
    N, T, V = logits.shape
    if not (N == b * r and T == 1 and logits.stride(2) == 1 and 0 <= eos < V and 0 <= keep <= n
            and _beam_takes(b, usable(logits, family="beam"))
            and scores.dtype == torch.float32 and scores.is_contiguous() and _takes_ids(forbid)
            and (at_limit is None or (at_limit.dtype == torch.bool and at_limit.shape == (b,) and at_limit.is_contiguous()))):
        return None
    out = torch.empty(b, n, dtype=torch.float32)
    ids = torch.empty(2, b, n, dtype=torch.int64)  # tokens, beams
    unsettled = ctypes.c_int64()
    _call("beam_" + _FUNCTIONS[logits.dtype], _STRUCTS["beam"](
        x=logits.data_ptr(), scores=scores.data_ptr(), forbid=forbid.data_ptr(),
        at_limit=at_limit.data_ptr() if at_limit is not None else 0, out_scores=out.data_ptr(),
        out_tokens=ids.data_ptr(), out_beams=ids.data_ptr() + b * n * 8, unsettled=ctypes.addressof(unsettled),
        sentences=b, r=r, V=V, xs=logits.stride(0), n=n, n_forbid=forbid.numel(), eos=eos,
        eos_banned=int(eos_banned), keep=keep))
    return out, ids[0], ids[1], unsettled.value


# ------------------------------------------------------------------------------------ training
# longest queries/keys training_attention takes (the longest length tuning.py times: it measures up
# to which one the kernel wins on this machine). Its loops are quadratic in the length without GEMM
# blocking, so where it stops winning differs by CPU:
# causal fwd+bwd, 2 threads, kernel vs PyTorch, on a Zen 5: T 128 bf16 15.4 / 14.3 ms, T 256 bf16
# 41.5 / 23.0, fp32 40.3 / 52.1; on a Zen 4 (2,048 tokens, 4 heads of 64, against SDPA): bf16 T 256
# 6.4 / 17.8, T 512 12.1 / 29.0, T 1024 27.0 / 34.7; capped to AVX2, fp32 T 512 14.7 / 32.8.
MAX_TRAIN_LENGTH = 1024
# The forward pass keeps the softmax for the backward pass (B, H, T, S fp32) up to this many bytes a
# call; above it the backward pass computes it again (the same values). Computing it again costs
# 6-19% of the kernel's fwd + bwd time (most at short lengths, where the softmax is small: LM shape
# 12 x 64, 4 heads, 0.8 MB kept, 1.19x; 64 x 256, 6 heads, 96 MB kept, 1.06x; Zen 4, bf16) and
# saves its memory: the shakespeare LM preset (batch 64 x 256, no dropout) peaked at 3.03 GiB
# keeping it, 2.31 computing it again, 2.42 on PyTorch's fused attention.
KEEP_SOFTMAX_BYTES = 64 * 2**20


def keeps_softmax(B: int, H: int, T: int, S: int) -> bool:
    """Whether training_attention's forward pass keeps its (B, H, T, S) fp32 softmax for the backward
    pass (KEEP_SOFTMAX_BYTES), rather than the backward pass computing it again."""
    return B * H * T * S * 4 <= KEEP_SOFTMAX_BYTES


def training_attention(x_q: Tensor, x_kv: Tensor, mask: Tensor | None, n_heads: int, d_model: int,
                       k_col: int, dropout: float = 0.0) -> Tensor | None:
    """Multi-head attention with a backward pass (train_step.c), heads split and merged in place:
    queries are x_q[..., :D] (B, T, >= D), keys x_kv[..., k_col:k_col + D] and values the next D
    columns (B, S, ...), D = d_model; mask None or boolean, broadcastable to (B, 1, T, S) with a
    1 for heads, True = may attend. -> (B, T, D), softmax(q kᵀ / sqrt(Dh) + mask) v per head, the
    weights through dropout with probability `dropout` (their mask is `dropout_mask`'s over (B, H,
    T, S), its seed drawn from torch's generator).

    Self-attention passes its fused projection [q | k | v] as both x_q and x_kv (k_col = D), and
    gets its gradient back in one tensor; cross-attention passes q and the source's [k | v]. Same
    results as PyTorch's attention to rounding (tests/model/test_kernels.py, float64 reference).
    None if the kernel does not take these inputs (the caller then uses PyTorch's operators)."""
    if x_q.dim() != 3 or x_kv.dim() != 3 or not 0.0 <= dropout < 1.0:
        return None
    (B, T, _), S = x_q.shape, x_kv.size(1)
    if not (x_kv.size(0) == B and 0 < T <= MAX_TRAIN_LENGTH and 0 < S <= MAX_TRAIN_LENGTH and B > 0
            and n_heads > 0 and d_model % n_heads == 0 and x_q.size(2) >= d_model
            and x_kv.size(2) >= k_col + 2 * d_model and x_q.stride(2) == 1 and x_kv.stride(2) == 1
            and _on_cpu(x_q, x_kv) and 0 < d_model // n_heads <= _LIMITS["MAX_HEAD_DIM"]
            and _mask_strides(mask, B, T, S) is not None
            and max(T, S) <= _wins("attention", x_q.dtype, d_model // n_heads,
                                   causal=mask is not None and mask.size(2) > 1)):  # (a row per query)
        return None
    return _TrainingAttention.apply(x_q, x_kv, mask, n_heads, d_model, k_col, dropout)


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
    def forward(ctx, x_q: Tensor, x_kv: Tensor, mask: Tensor | None, n_heads: int, d_model: int, k_col: int,
                dropout: float):
        B, T, S, Dh = x_q.size(0), x_q.size(1), x_kv.size(1), d_model // n_heads
        seed = int(torch.randint(-2**63, 2**63 - 1, (), dtype=torch.int64)) if dropout > 0 else 0
        ctx.drop = dict(seed=seed, threshold=round(dropout * 65536), keep=1.0 / (1.0 - dropout))
        out = x_q.new_empty(B, T, d_model)
        probs = torch.empty(B, n_heads, T, S, dtype=torch.float32) if keeps_softmax(B, n_heads, T, S) else None
        (qs_b, qs_t), (kv_b, kv_s), (ms_b, ms_t) = x_q.stride()[:2], x_kv.stride()[:2], _mask_strides(mask, B, T, S)
        _call("attention_forward_" + _FUNCTIONS[x_q.dtype], _STRUCTS["attention_forward"](
            q=x_q.data_ptr(), k=_column(x_kv, k_col), v=_column(x_kv, k_col + d_model),
            mask=mask.data_ptr() if mask is not None else 0, out=out.data_ptr(),
            probs=probs.data_ptr() if probs is not None else 0,
            B=B, H=n_heads, nt=T, ns=S, dh=Dh, qs_b=qs_b, qs_t=qs_t, ks_b=kv_b, ks_s=kv_s, vs_b=kv_b, vs_s=kv_s,
            ms_b=ms_b, ms_t=ms_t, os_b=out.stride(0), os_t=out.stride(1), threads=torch.get_num_threads(),
            scale=1.0 / math.sqrt(Dh), **ctx.drop))
        ctx.save_for_backward(x_q, x_kv, probs, mask)
        ctx.same, ctx.n_heads, ctx.d_model, ctx.k_col = x_q is x_kv, n_heads, d_model, k_col
        ctx.mask_strides = ms_b, ms_t
        return out

    @staticmethod
    def backward(ctx, d_out: Tensor):
        x_q, x_kv, probs, mask = ctx.saved_tensors
        D, k_col, H = ctx.d_model, ctx.k_col, ctx.n_heads
        B, T, S = x_q.size(0), x_q.size(1), x_kv.size(1)
        if d_out.stride(2) != 1:
            d_out = d_out.contiguous()
        if ctx.same:  # one gradient for the fused projection, every column of it written if [q | k | v]
            d_kv = d_q = x_kv.new_empty(x_kv.shape) if (k_col, x_kv.size(2)) == (D, 3 * D) else x_kv.new_zeros(x_kv.shape)
        else:
            d_q = x_q.new_empty(x_q.shape) if x_q.size(2) == D else x_q.new_zeros(x_q.shape)
            d_kv = x_kv.new_empty(x_kv.shape) if (k_col, x_kv.size(2)) == (0, 2 * D) else x_kv.new_zeros(x_kv.shape)
        (qs_b, qs_t), (kv_b, kv_s), (gs_b, gs_t) = x_q.stride()[:2], x_kv.stride()[:2], d_out.stride()[:2]
        (dqs_b, dqs_t), (dkv_b, dkv_s), (ms_b, ms_t) = d_q.stride()[:2], d_kv.stride()[:2], ctx.mask_strides
        _call("attention_backward_" + _FUNCTIONS[x_q.dtype], _STRUCTS["attention_backward"](
            q=x_q.data_ptr(), k=_column(x_kv, k_col), v=_column(x_kv, k_col + D), dout=d_out.data_ptr(),
            probs=probs.data_ptr() if probs is not None else 0, mask=mask.data_ptr() if mask is not None else 0,
            dq=d_q.data_ptr(), dk=_column(d_kv, k_col), dv=_column(d_kv, k_col + D),
            B=B, H=H, nt=T, ns=S, dh=D // H, qs_b=qs_b, qs_t=qs_t, ks_b=kv_b, ks_s=kv_s, vs_b=kv_b, vs_s=kv_s,
            ms_b=ms_b, ms_t=ms_t, gs_b=gs_b, gs_t=gs_t, dqs_b=dqs_b, dqs_t=dqs_t, dks_b=dkv_b, dks_s=dkv_s,
            dvs_b=dkv_b, dvs_s=dkv_s,
            threads=torch.get_num_threads(), scale=1.0 / math.sqrt(D // H), **ctx.drop))
        return d_q, None if ctx.same else d_kv, None, None, None, None, None


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
    _call("dropout_mask_" + _FUNCTIONS[like.dtype], _STRUCTS["dropout_mask"](
        mask=mask.data_ptr(), n=mask.numel(), seed=seed, threshold=round(p * 65536), threads=torch.get_num_threads(),
        scale=1.0 / (1.0 - p)))
    return mask


def residual_layer_norm(x: Tensor, y: Tensor, norm: nn.LayerNorm, p: float) -> Tensor | None:
    """norm(x + dropout(y, p)) for x, y (..., D), with a backward pass: training's post-norm residual
    (§3.1, §5.4) in one pass forward and one backward (train_step.c), where PyTorch makes four
    (addcmul, layer_norm, its backward, the dropout mask's product). The mask is `dropout_mask`'s.
    None if the kernel does not take these inputs: contiguous x and y of the norm's dtype, or under
    autocast an fp32 x (the residual stream) and norm with a bf16 y (the sublayer's output); or is
    not faster here, with dropout or without it (timed apart: tuning's residual, residual-nodrop)."""
    D = x.size(-1)
    w, b = norm.weight, norm.bias
    if not (x.shape == y.shape and x.numel() > 0 and norm.normalized_shape == (D,) and w is not None
            and b is not None and 0.0 <= p < 1.0 and x.is_contiguous() and y.is_contiguous() and _on_cpu(x, w, b)
            and (y.dtype == x.dtype or (x.dtype, y.dtype) == (torch.float32, torch.bfloat16)) and _on_cpu(y)
            and _wins("residual" if p > 0 else "residual-nodrop", y.dtype)):
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
        _call("residual_norm_forward_" + _suffix(x, y), _STRUCTS["residual_norm_forward"](
            x=x.data_ptr(), y=y.data_ptr(), mask=mask.data_ptr() if mask is not None else 0, w=w.data_ptr(),
            b=b.data_ptr(), out=out.data_ptr(), z=z.data_ptr(), stats=stats.data_ptr(), rows=rows, n=D,
            threads=torch.get_num_threads(), eps=eps))
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
        dx = torch.empty_like(z)
        # without a mask, in one dtype, dy is dx (as PyTorch's add passes one gradient to both)
        dy = dx if mask is None and ctx.y_dtype == z.dtype else torch.empty_like(z, dtype=ctx.y_dtype)
        partial = torch.zeros(threads, 2, D, dtype=torch.float32)  # each part's sums of dw and db
        _call("residual_norm_backward_" + _suffix(dx, dy), _STRUCTS["residual_norm_backward"](
            dout=d_out.data_ptr(), z=z.data_ptr(), mask=mask.data_ptr() if mask is not None else 0, w=w.data_ptr(),
            stats=stats.data_ptr(), dx=dx.data_ptr(), dy=dy.data_ptr() if dy is not dx else 0,
            partial=partial.data_ptr(), rows=rows, n=D, threads=threads))
        dw, db = partial.sum(0).to(w.dtype).unbind(0)
        return dx, dy, dw, db, None, None


def _suffix(x: Tensor, y: Tensor) -> str:
    """The residual kernels' variant for the stream x and the sublayer output y."""
    return _FUNCTIONS[x.dtype] if x.dtype == y.dtype else f"{_FUNCTIONS[x.dtype]}_{_FUNCTIONS[y.dtype]}"


def cross_entropy(logits: Tensor, target: Tensor, eps: float, scale: float,
                  want_grad: bool, overwrite: bool = False) -> tuple[Tensor, Tensor | None] | None:
    """Label-smoothed cross-entropy of each row of logits (N, V) against target (N,) -> fp32 losses
    (N,), and with want_grad the gradient scale * (softmax - (1 - eps) onehot - eps / V) in logits'
    dtype: aiayn.train.loss._LabelSmoothedCE's forward pass in one multithreaded kernel
    (train_step.c). overwrite (contiguous logits): the gradient is written over the logits, each
    row once it is read. None if the kernel does not take these inputs."""
    if not (logits.dim() == 2 and logits.size(0) > 0 and logits.stride(1) == 1 and target.dtype == torch.int64
            and target.shape == logits.shape[:1] and target.is_contiguous() and target.is_cpu and _on_cpu(logits)
            and _wins("loss", logits.dtype)):
        return None
    n, V = logits.shape
    losses = torch.empty(n, dtype=torch.float32)
    grad = None
    if want_grad:
        grad = logits if overwrite and logits.is_contiguous() else torch.empty(n, V, dtype=logits.dtype)
    args = _STRUCTS["cross_entropy"](logits=logits.data_ptr(), target=target.data_ptr(), losses=losses.data_ptr(),
                                     grad=grad.data_ptr() if grad is not None else 0, stride=logits.stride(0), rows=n,
                                     V=V, threads=torch.get_num_threads(), eps=eps, scale=scale)
    if not _call("cross_entropy_" + _FUNCTIONS[logits.dtype], args, declines=(Status.BAD_INDEX,)):
        raise IndexError(f"target id out of range for {V} classes")
    return losses, grad


def bias_gelu_takes(x: Tensor, bias: Tensor | None) -> bool:
    """Whether `bias_gelu` will take the product of x (..., in) and a linear layer's weight, with
    this bias: CPU tensors, its product in a dtype the kernels have (that of autocast where it is
    on), and the kernel faster on this machine. Asked before the product, which it is made without
    the bias."""
    if bias is None or bias.dim() != 1 or not (x.is_cpu and bias.is_cpu and available()):
        return False
    autocast = torch.is_autocast_enabled("cpu") and x.dtype == torch.float32  # (it casts fp32 only)
    dtype = torch.get_autocast_dtype("cpu") if autocast else x.dtype
    return dtype in _FUNCTIONS and bias.dtype in _FUNCTIONS and _wins("gelu", dtype)


def bias_gelu(h: Tensor, bias: Tensor) -> Tensor:
    """gelu(h + bias) (GELU's exact form) for the product h (..., n) of a linear layer made without
    its bias (n,), with a backward pass: one pass each way (train_step.c), the bias's gradient summed
    in the backward one, where PyTorch makes three (gelu, gelu_backward, the bias's sum). Only where
    `bias_gelu_takes` said so. Same results as F.gelu(h + bias) to ~1e-7 (fp32) or rounding (bf16)
    (tests/model/test_train_kernels.py)."""
    return _BiasGelu.apply(h, bias)


class _BiasGelu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: Tensor, bias: Tensor) -> Tensor:
        h = h.contiguous()
        b = bias.detach().float().contiguous()
        out = torch.empty_like(h)
        grad = torch.empty_like(h) if any(ctx.needs_input_grad) else None  # gelu'(h + bias), for backward
        n = h.size(-1)
        _call("bias_gelu_forward_" + _FUNCTIONS[h.dtype], _STRUCTS["bias_gelu_forward"](
            h=h.data_ptr(), bias=b.data_ptr(), out=out.data_ptr(), grad=grad.data_ptr() if grad is not None else 0,
            rows=h.numel() // n, n=n, threads=torch.get_num_threads()))
        ctx.save_for_backward(grad)
        ctx.bias_dtype = bias.dtype
        return out

    @staticmethod
    def backward(ctx, d_out: Tensor):
        (grad,) = ctx.saved_tensors
        d_out = d_out.to(grad.dtype).contiguous()
        n, threads = grad.size(-1), torch.get_num_threads()
        dh = torch.empty_like(grad)
        partial = torch.zeros(threads, n, dtype=torch.float32)  # each part's sums of the bias's gradient
        _call("bias_gelu_backward_" + _FUNCTIONS[grad.dtype], _STRUCTS["bias_gelu_backward"](
            dout=d_out.data_ptr(), grad=grad.data_ptr(), dh=dh.data_ptr(), partial=partial.data_ptr(),
            rows=grad.numel() // n, n=n, threads=threads))
        return dh, partial.sum(0).to(ctx.bias_dtype)
