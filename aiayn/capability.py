"""What this machine computes natively, and the precision each command runs in.

One probe per device, cached per process (`probe`). `choose_precision` turns what a user asked for
("auto" by default) into a precision this machine runs at full speed, and refuses, in one line that
says what is missing and what to use instead, a precision it would only emulate: bf16 on a CPU
without bf16 instructions runs PyTorch's generic loops (~300x slower than fp32 there) and oneDNN
refuses it; fp16 on a CPU; int8 where PyTorch has no quantized engine.

    auto   bf16 where the device computes it natively (CUDA with bf16; x86 CPUs with AVX512_BF16 or
           AMX; ARM CPUs with BF16 where this torch's bf16 GEMM is measured faster than its fp32
           one), otherwise fp32. int8 is never chosen for you (decoding only).

The CPU's instruction sets come from /proc/cpuinfo (Linux) or sysctl (macOS), capped as oneDNN's and
PyTorch's own dispatch are by ONEDNN_MAX_CPU_ISA and ATEN_CPU_CAPABILITY: with
`ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2`, an AVX-512 machine is probed (and aiayn's C
kernels are built) as the AVX2 machine it then behaves like.
"""

from __future__ import annotations

import functools
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass

import torch

from aiayn.errors import InputError

# x86 instruction-set levels, lowest first: what decides bf16 and the kernels' build flags
X86_LEVELS = ("sse", "avx2", "avx512", "avx512_bf16", "amx")
# ONEDNN_MAX_CPU_ISA values (oneDNN's names, upper case) and ATEN_CPU_CAPABILITY values -> a level
_ONEDNN_CAPS = {"SSE41": "sse", "AVX": "sse", "AVX2": "avx2", "AVX2_VNNI": "avx2", "AVX2_VNNI_2": "avx2",
                "AVX512_CORE": "avx512", "AVX512_CORE_VNNI": "avx512", "AVX512_CORE_BF16": "avx512_bf16",
                "AVX10_1_512": "avx512_bf16", "AVX512_CORE_FP16": "avx512_bf16"}
_ATEN_CAPS = {"default": "sse", "avx2": "avx2"}
# ARM: bf16 only where a bf16 GEMM here runs at least this many times as fast as an fp32 one
ARM_BF16_MIN_SPEEDUP = 1.3
TRAIN_PRECISIONS = ("auto", "fp32", "bf16", "bf16-model", "fp16")
DECODE_PRECISIONS = ("auto", "fp32", "bf16", "fp16", "int8")


class PrecisionError(InputError):
    """A precision this machine cannot run natively: the message says what is missing and what to use."""


@dataclass(frozen=True)
class Machine:
    device: str      # "cpu" or "cuda"
    isa: str         # CPU: one of X86_LEVELS, "arm", "arm_bf16" or "other"; CUDA: "sm_XY"
    name: str        # the CPU's model name or the GPU's name
    bf16: bool       # bf16 matrix products in hardware, faster than fp32
    fp16: bool       # fp16 matrix products in hardware (CUDA)
    int8: bool       # a quantized engine for int8 linears (CPU)
    capped: str = ""  # the environment variable that lowered `isa`, if any
    bf16_speedup: float | None = None  # ARM with BF16: a bf16 GEMM's speed over fp32's, measured here

    def describe(self) -> str:
        """One line: what this device is and has, for logs and benchmark headers."""
        has = [p for p, ok in (("bf16", self.bf16), ("fp16", self.fp16), ("int8", self.int8)) if ok]
        cap = f", capped by {self.capped}" if self.capped else ""
        if self.bf16_speedup is not None:
            cap += f"; a bf16 GEMM {self.bf16_speedup:.2g}x fp32's here"
        return f"{self.device}: {self.name} ({_isa_label(self.isa)}{cap}); native: fp32, {', '.join(has) or 'nothing else'}"


def _isa_label(isa: str) -> str:
    return {"sse": "no AVX2", "avx2": "AVX2", "avx512": "AVX-512, no bf16", "avx512_bf16": "AVX512_BF16",
            "amx": "AMX", "arm": "ARM, no BF16", "arm_bf16": "ARM BF16"}.get(isa, isa)


@functools.cache
def probe(device: str = "cpu") -> Machine:
    """This process's device: what it computes natively (cached)."""
    if torch.device(device).type == "cuda":
        return _probe_cuda()
    return _probe_cpu()


def _probe_cuda() -> Machine:
    if not torch.cuda.is_available():
        return Machine("cuda", "none", "no CUDA GPU", bf16=False, fp16=False, int8=False)
    major, minor = torch.cuda.get_device_capability()
    return Machine("cuda", f"sm_{major}{minor}", torch.cuda.get_device_name(), bf16=major >= 8, fp16=major >= 6,
                   int8=False)


def _probe_cpu() -> Machine:
    machine, flags, name = platform.machine().lower(), cpu_flags(), cpu_name()
    int8 = any(e in torch.backends.quantized.supported_engines for e in ("x86", "fbgemm", "qnnpack"))
    if machine in ("x86_64", "amd64", "i686", "x86"):
        isa, capped = x86_level(flags)
        int8 = int8 and X86_LEVELS.index(isa) >= X86_LEVELS.index("avx2")  # fbgemm needs AVX2
        bf16 = isa in ("avx512_bf16", "amx") and torch.backends.mkldnn.is_available()  # (oneDNN runs bf16)
        return Machine("cpu", isa, name, bf16=bf16, fp16=False, int8=int8, capped=capped)
    if machine in ("arm64", "aarch64"):
        # BF16 instructions are not enough: a torch build without Arm Compute Library computes bf16
        # products in generic loops, far below its fp32 GEMM (OpenBLAS, Accelerate). So measure.
        isa = "arm_bf16" if "bf16" in flags else "arm"
        speedup = bf16_gemm_speedup() if isa == "arm_bf16" and torch.backends.mkldnn.is_available() else None
        bf16 = speedup is not None and speedup >= ARM_BF16_MIN_SPEEDUP
        return Machine("cpu", isa, name, bf16=bf16, fp16=False, int8=int8, bf16_speedup=speedup)
    return Machine("cpu", "other", name, bf16=False, fp16=False, int8=int8)


def bf16_gemm_speedup(n: int = 256, tries: int = 5) -> float:
    """fp32's time over bf16's for an (n, n) @ (n, n) product on this CPU (best of `tries` each, after
    one call each to warm up; this process's threads): > 1 where this torch's bf16 GEMM is the faster.
    A few milliseconds; where bf16 is far slower (generic loops: ~0.1 s a call at n = 256) it stops
    after one timed call. 0.0 if the bf16 product fails."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a16, b16 = a.bfloat16(), b.bfloat16()

    def best(x: torch.Tensor, y: torch.Tensor, calls: int) -> float:
        times = []
        for _ in range(calls):
            start = time.perf_counter()
            torch.mm(x, y)
            times.append(time.perf_counter() - start)
        return min(times)

    try:
        best(a, b, 1)  # (oneDNN builds its primitives on a first call)
        best(a16, b16, 1)
        fp32, bf16 = best(a, b, tries), best(a16, b16, 1)
        if bf16 < 10 * fp32:
            bf16 = min(bf16, best(a16, b16, tries - 1))
    except RuntimeError:  # (oneDNN refusing bf16 on this CPU)
        return 0.0
    return fp32 / bf16


def x86_level(flags: frozenset[str]) -> tuple[str, str]:
    """-> (the highest level of X86_LEVELS these CPU flags reach, lowered by ONEDNN_MAX_CPU_ISA and
    ATEN_CPU_CAPABILITY; the variable that lowered it, or "")."""
    if {"amx_bf16", "amx_tile"} <= flags:
        level = "amx"
    elif "avx512_bf16" in flags:
        level = "avx512_bf16"
    elif {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
        level = "avx512"
    elif {"avx2", "fma"} <= flags:
        level = "avx2"
    else:
        level = "sse"
    capped = ""
    for var, caps in (("ONEDNN_MAX_CPU_ISA", _ONEDNN_CAPS), ("ATEN_CPU_CAPABILITY", _ATEN_CAPS)):
        value = os.environ.get(var, "")
        cap = caps.get(value.upper() if var.startswith("ONEDNN") else value.lower())
        if cap and X86_LEVELS.index(cap) < X86_LEVELS.index(level):
            level, capped = cap, f"{var}={value}"
    return level, capped


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags, lower case: /proc/cpuinfo's `flags` (x86) or `Features` (ARM) line on
    Linux; on macOS, sysctl's hw.optional.arm.FEAT_* names (FEAT_BF16 -> "bf16") and x86 features."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return frozenset(line.split(":", 1)[1].lower().split())
    except OSError:
        pass
    if sys.platform == "darwin":
        out = _sysctl("-a")
        feats = {line.split(":")[0].rsplit("FEAT_", 1)[1].lower() for line in out.splitlines()
                 if "hw.optional.arm.FEAT_" in line and line.rstrip().endswith(": 1")}
        feats |= set(_sysctl("-n", "machdep.cpu.features").lower().split())
        feats |= set(_sysctl("-n", "machdep.cpu.leaf7_features").lower().split())
        return frozenset(f.replace(".", "_") for f in feats)
    return frozenset()


@functools.cache
def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "Model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    if sys.platform == "darwin":
        return _sysctl("-n", "machdep.cpu.brand_string").strip() or platform.machine()
    return platform.processor() or platform.machine()


def _sysctl(*args: str) -> str:
    try:
        return subprocess.run(["sysctl", *args], capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


# ------------------------------------------------------------------------------------ choosing
def choose_precision(requested: str | None, device: str = "cpu", purpose: str = "decode") -> tuple[str, str]:
    """-> (the precision to run, why: one line when "auto" chose it, else "").

    purpose "train" takes fp32, bf16 (autocast), bf16-model, fp16 (CUDA); "decode" takes fp32, bf16,
    fp16 (CUDA), int8 (CPU). "auto" (or None) picks bf16 where `device` computes it natively, else
    fp32; an explicit precision the device lacks raises PrecisionError."""
    allowed = TRAIN_PRECISIONS if purpose == "train" else DECODE_PRECISIONS
    if requested not in (None, *allowed):
        raise PrecisionError(f"unknown precision {requested!r}: choose from {', '.join(allowed)}")
    m = probe(device)
    if requested in (None, "auto"):
        if m.bf16:
            return "bf16", f"precision bf16: {_where(m)} computes bf16 natively ({_isa_label(m.isa)})"
        return "fp32", f"precision fp32: {_where(m)} {_lacks_bf16(m)}"
    check_precision(requested, device)
    return requested, ""


def check_precision(precision: str, device: str = "cpu") -> None:
    """PrecisionError (one line) if `device` cannot run `precision` natively."""
    m = probe(device)
    gpu = m.device == "cuda"
    if precision in ("bf16", "bf16-model") and not m.bf16:
        needs = "bf16 products faster than fp32's" if m.bf16_speedup is not None else "bf16 in hardware"
        raise PrecisionError(f"precision {precision} needs {needs}, and {_where(m)} {_lacks_bf16(m)}: "
                             "use --precision fp32 (or auto)" + ("" if gpu else ", or int8 to decode"))
    if precision == "fp16" and not (gpu and m.fp16):
        if gpu:
            raise PrecisionError(f"precision fp16 needs fp16 in hardware, and {m.name} ({m.isa}) lacks it: use fp32")
        bf16 = ", bf16" if m.bf16 else ""
        raise PrecisionError(f"precision fp16 needs a GPU (--device cuda): on a CPU use auto, fp32{bf16} or int8 "
                             "(decoding)")
    if precision == "int8":
        if gpu:
            raise PrecisionError("precision int8 runs on a CPU only; on a GPU use bf16 or fp16")
        if not m.int8:
            raise PrecisionError(f"precision int8 needs a quantized engine (x86 with AVX2, or ARM), and this "
                                 f"CPU ({_isa_label(m.isa)}) has none in this torch build: use fp32")


def _where(m: Machine) -> str:
    return "this GPU" if m.device == "cuda" else "this CPU"


def _lacks_bf16(m: Machine) -> str:
    if m.device == "cuda":
        return f"({m.name}, {m.isa}) has no bf16 (it needs sm_80 or newer)"
    if m.capped:
        return f"is capped below bf16 by {m.capped}"
    if m.bf16_speedup is not None:
        return (f"has BF16 instructions, but this torch build's bf16 GEMM runs at {m.bf16_speedup:.2g}x its fp32 "
                f"speed here (measured; {ARM_BF16_MIN_SPEEDUP:g}x needed)")
    return f"has no bf16 instructions ({_isa_label(m.isa)})"
