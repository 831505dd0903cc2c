"""The C kernels built for other instruction sets give the host's results.

The rest of the suite checks the kernels against PyTorch on this machine's instruction set only. Here
tests/model/isa_harness.c runs the kernels on fixed inputs and prints every output; it is built for
the host (-march=native, as aiayn builds its kernels) and for the other vector widths the kernels
have: x86 without AVX-512 (8-float vectors, the AVX2 linear kernel's 6 rows), x86 without AVX
(4-float vectors), and aarch64 (NEON), run under qemu-aarch64 where it is installed (.ci/run installs
it on x86-64 Linux). Every line must match the host's: integers exactly, fp32 values to 1e-4
relative (sums in another order), bf16 values to one bf16 rounding step.
"""

from __future__ import annotations

import platform
import shutil
import subprocess
from pathlib import Path

import pytest

from aiayn import capability

HERE = Path(__file__).parent
KERNELS = HERE.parent.parent / "aiayn" / "kernels"
SOURCES = [HERE / "isa_harness.c", KERNELS / "decode_step.c", KERNELS / "train_step.c", KERNELS / "abi.c"]
FLAGS = ["-O3", "-fopenmp", "-fno-math-errno", f"-I{KERNELS}"]
X86 = platform.machine() in ("x86_64", "AMD64") and shutil.which("gcc") is not None
ARM = X86 and platform.system() == "Linux" and shutil.which("aarch64-linux-gnu-gcc") and shutil.which("qemu-aarch64")

pytestmark = pytest.mark.skipif(not X86, reason="the instruction-set variants are built on an x86-64 host with gcc")


def _flags() -> set[str]:
    return set(capability.cpu_flags())


# (name, compiler, its -m flags, how to run the program, why it may not run here)
VARIANTS = {
    "avx2": ("gcc", ["-march=native", "-mno-avx512f", "-DAIAYN_NO_AMX"], [],
             None if "avx2" in _flags() and "avx512f" in _flags() else "needs a host with AVX-512 (else it is the host's build)"),
    "sse": ("gcc", ["-march=native", "-mno-avx", "-DAIAYN_NO_AMX"], [], None if "avx" in _flags() else "the host has no AVX"),
    "aarch64": ("aarch64-linux-gnu-gcc", ["-march=armv8.2-a+bf16"], ["qemu-aarch64", "-L", "/usr/aarch64-linux-gnu"],
                None if ARM else "no aarch64-linux-gnu-gcc and qemu-aarch64 here"),
}


def _build(tmp: Path, name: str, cc: str, march: list[str]) -> subprocess.Popen:
    return subprocess.Popen([cc, *FLAGS, *march, *map(str, SOURCES), "-o", str(tmp / name), "-lm"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def programs(tmp_path_factory) -> dict[str, Path]:
    """Every variant this host can build and run, built at once (~10 s each)."""
    tmp = tmp_path_factory.mktemp("isa")
    builds = {"host": _build(tmp, "host", "gcc", ["-march=native"])}
    for name, (cc, march, _, why_not) in VARIANTS.items():
        if why_not is None:
            builds[name] = _build(tmp, name, cc, march)
    for name, proc in builds.items():
        _, err = proc.communicate()
        assert proc.returncode == 0, f"{name} build failed:\n{err}"
    return {name: tmp / name for name in builds}


def _lines(cmd: list[str]) -> list[tuple[str, str]]:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True).stdout
    return [tuple(line.split(" ", 1)) for line in out.splitlines()]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_kernels_give_the_hosts_results(programs, variant):
    cc, march, runner, why_not = VARIANTS[variant]
    if why_not is not None:
        pytest.skip(why_not)
    want, got = _lines([str(programs["host"])]), _lines([*runner, str(programs[variant])])
    assert [name for name, _ in got] == [name for name, _ in want]
    bad = []
    for (name, a), (_, b) in zip(want, got):
        if name in ("argmax", "beam", "greedy", "search"):  # ids
            ok = a == b
        else:
            a, b = float(a), float(b)
            ok = abs(a - b) <= (2 ** -7 if name.startswith("bf16") else 1e-4) * max(abs(a), 1e-2)
        if not ok:
            bad.append(f"{name}: {a} (host) vs {b}")
    assert not bad, f"{len(bad)} of {len(want)} values differ on {variant}, e.g. " + "; ".join(bad[:5])
