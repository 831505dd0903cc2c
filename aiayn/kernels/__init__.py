"""Optional C kernels for CPU decoding, built on first use for the machine they run on.

PyTorch's operators cover everything aiayn does; a kernel here only does one of those things
faster where measurement showed PyTorch's way to be slow (docs/PERFORMANCE.md). Each one is
plain C (no PyTorch headers: it builds in well under a second), compiled with the system's C compiler
into a cache directory and called through ctypes, which releases the GIL. Without a compiler, on
a failed build, on a platform other than Linux/macOS, or with AIAYN_KERNELS=0 in the environment,
`attention_kernel()` returns None and callers use PyTorch's operators: same results to rounding.
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
from pathlib import Path

import torch
from torch import Tensor

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("attention.c")
MAX_KEYS, MAX_HEAD_DIM = 4096, 1024  # the C side's buffers
_FLAG_SETS = (  # the first that builds wins: tuned for this CPU, then portable
    ["-O3", "-march=native", "-fopenmp-simd", "-fno-math-errno"],
    ["-O3", "-mcpu=native", "-fopenmp-simd", "-fno-math-errno"],  # Apple clang on arm64
    ["-O2"],
)
_FUNCTIONS = {  # (query/output dtype, key/value dtype) -> symbol
    (torch.float32, torch.float32): "attend_f32",
    (torch.bfloat16, torch.bfloat16): "attend_bf16",
    (torch.float32, torch.bfloat16): "attend_f32_bf16kv",
}


def enabled() -> bool:
    return os.environ.get("AIAYN_KERNELS", "1") != "0"


def cache_dir() -> Path:
    root = os.environ.get("AIAYN_CACHE") or os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "aiayn" / "kernels"


def _compiler() -> str | None:
    for cc in (os.environ.get("CC"), sysconfig.get_config_var("CC"), "cc", "gcc", "clang"):
        if cc and shutil.which(cc.split()[0]):
            return cc
    return None


def _machine_key() -> str:
    """What a library built with -march=native depends on: a shared home directory may see several CPUs."""
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line for line in f if line.startswith("flags")), cpu)
    except OSError:
        pass
    return f"{platform.machine()} {cpu}"


def _build(source: Path) -> Path | None:
    cc = _compiler()
    if cc is None:
        log.info("no C compiler found: PyTorch's attention is used for decoding")
        return None
    text = source.read_bytes()
    for flags in _FLAG_SETS:
        key = hashlib.sha256(b"\0".join([text, cc.encode(), " ".join(flags).encode(),
                                         _machine_key().encode()])).hexdigest()[:16]
        target = cache_dir() / f"{source.stem}-{key}.so"
        if target.exists():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            built = Path(tmp) / target.name
            cmd = [*cc.split(), *flags, "-shared", "-fPIC", str(source), "-o", str(built), "-lm"]
            result = subprocess.run(cmd, capture_output=True, text=True)
            if result.returncode == 0:
                os.replace(built, target)  # atomic: another process may be building the same file
                return target
            log.info("%s failed: %s", " ".join(cmd), result.stderr.strip()[-500:])
    return None


@functools.cache
def _library() -> ctypes.CDLL | None:
    if not sys.platform.startswith(("linux", "darwin")):
        return None
    try:
        path = _build(SOURCE)
        library = ctypes.CDLL(str(path)) if path is not None else None  # CDLL calls release the GIL
    except OSError as e:  # a read-only home, a broken compiler, a library that will not load
        log.info("attention kernel unavailable (%s): PyTorch's attention is used", e)
        return None
    if library is not None:
        for name in _FUNCTIONS.values():
            fn = getattr(library, name)
            fn.restype = None
            fn.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 19 + [ctypes.c_float]
    return library


def attention_kernel():
    """`decode_attention` when the kernel is built and enabled, else None."""
    return decode_attention if enabled() and _library() is not None else None


def supports(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> bool:
    """Whether `decode_attention` takes these inputs (else use PyTorch's attention)."""
    B, H, T, Dh = q.shape
    b, S = k.size(0), k.size(2)
    return (q.device.type == "cpu" and (q.dtype, k.dtype) in _FUNCTIONS and v.dtype == k.dtype
            and k.shape == v.shape and k.size(1) == H and k.size(3) == Dh and b > 0 and B % b == 0
            and 0 < S <= MAX_KEYS and Dh <= MAX_HEAD_DIM
            and q.stride(3) == 1 and k.stride(3) == 1 and v.stride(3) == 1
            and (mask is None or (mask.dtype == torch.bool and mask.shape == (b, 1, 1, S))))


def decode_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
    """softmax(q k^T / sqrt(Dh) + mask) v for q (B, H, T, Dh) and k, v (b, H, S, Dh), where each
    group of B / b consecutive rows of q attends to one row of k and v; mask (b, 1, 1, S) boolean,
    True = may attend. Returns (B, H, T, Dh), a view of a (B, T, H, Dh) tensor: merging the heads
    after it is free. No gradient; the caller checks `supports` first."""
    B, H, T, Dh = q.shape
    b, _, S, _ = k.shape
    out = q.new_empty(B, T, H, Dh)
    if mask is not None:
        mask = mask.reshape(b, S)
        if mask.stride(1) != 1:
            mask = mask.contiguous()
    fn = getattr(_library(), _FUNCTIONS[q.dtype, k.dtype])
    fn(q.data_ptr(), k.data_ptr(), v.data_ptr(), mask.data_ptr() if mask is not None else None, out.data_ptr(),
       B, H, T, S, Dh, B // b, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
       mask.stride(0) if mask is not None else 0, *out.stride()[:3], 1.0 / math.sqrt(Dh))
    return out.transpose(1, 2)
