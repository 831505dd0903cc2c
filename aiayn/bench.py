"""What the speed benchmarks (benchmarks/*.py) share, and the runner behind `aiayn bench`.

Every benchmark compares aiayn with its peers in one run, side by side, because these machines are
noisy (±10–20% from one step to the next). Each measured cell runs in a fresh process (`run_cell`), so
that its peak memory is its own and no engine inherits another's thread pools or allocator state.
Only torch is needed here; the peers (transformers, ctranslate2) are imported by the scripts.
"""

from __future__ import annotations

import datetime
import json
import os
import random
import resource
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from aiayn import capability

BENCH_DIR = Path(__file__).resolve().parents[1] / "benchmarks"
PARTS = {"train": ["train_throughput.py"], "decode": ["decode_throughput.py"],
         "lm": ["lm_train.py", "lm_generate.py"]}
CELL_FLAG = "--cell"
NO_KERNELS = "-nokernels"  # an aiayn engine's name with this suffix: the same, AIAYN_KERNELS=0


# ------------------------------------------------------------------------------- the machine
def machine(device: str = "cpu") -> str:
    """Two lines: CPU, cores, torch and its thread count, the load when we started; then what the
    capability probe found on `device` (the precisions it runs natively)."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{capability.cpu_name()}, {os.cpu_count()} logical cores, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), load average {load:.2f} at start\n"
            f"{capability.probe(device).describe()}")


def lacks(precision: str, device: str = "cpu") -> str | None:
    """Why `device` cannot run `precision` natively (the benchmark's row says so instead of a crash or
    a crawl), or None. Peers' names for precisions (float32, int8) are understood too."""
    name = {"float32": "fp32", "float16": "fp16", "int8_float32": "int8"}.get(precision, precision)
    try:
        capability.check_precision(name, device)
    except capability.PrecisionError as e:
        return str(e).split(": use ")[0]
    return None


def header(title: str, device: str = "cpu") -> str:
    now = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    cmd = " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])
    return f"# {title}\n{now} | {machine(device)}\ncommand: {cmd}"


def peak_rss_gib() -> float:
    """Peak resident memory of this process so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def peak_memory_gib(device: str = "cpu") -> float:
    """On a GPU, the most memory this process's tensors took there; on a CPU, peak_rss_gib()."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return peak_rss_gib()


def synchronize(device: str = "cpu") -> None:
    """Wait for the work queued on `device` (a GPU's), so that a clock read next counts it."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def device_error(device: str, clock: str) -> str | None:
    """Why a benchmark cannot measure on `device` by `clock` ("wall" or "cpu"), or None."""
    if device != "cpu" and not torch.cuda.is_available():
        return "--device cuda: no CUDA GPU here"
    if device != "cpu" and clock == "cpu":
        return "--clock cpu measures a CPU's work: on a GPU use wall time"
    return None


def matmul_peaks(precisions: Sequence[str], n: int = 2048, clock=time.perf_counter,
                 device: str = "cpu") -> dict[str, float | None]:
    """The matmul peak (FLOP/s) of each precision `device` runs natively; None for the others
    (their GEMM would crawl or be refused). bf16-model's peak is bf16's."""
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "bf16-model": torch.bfloat16, "fp16": torch.float16}
    return {p: None if lacks(p, device) else matmul_peak(dtypes[p], n, clock=clock, device=device) for p in precisions}


def matmul_peak(dtype: torch.dtype, n: int = 2048, reps: int = 5, clock=time.perf_counter,
                device: str = "cpu") -> float:
    """FLOP/s of the best of `reps` (n, n) @ (n, n) products: the peak that MFU is measured against.

    On a CPU both of torch's GEMM back ends are tried -- its default (MKL for fp32) and oneDNN, which
    aiayn's fp32 training and inference use (2x MKL on AMD CPUs) -- and the faster one is the peak.
    On a GPU, fp32 is IEEE fp32 (TF32 as the process has it set: off unless asked for)."""
    from aiayn.fast.inference import onednn_available

    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    products = [lambda: a @ b]
    if torch.device(device).type == "cpu" and onednn_available():
        products.append(lambda: torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], ""))
    best = float("inf")
    for product in products:
        for _ in range(2):
            product()
        synchronize(device)
        for _ in range(reps):
            t = clock()
            product()
            synchronize(device)
            best = min(best, clock() - t)
    return 2 * n**3 / best


# --------------------------------------------------------------------------------- the data
def multi30k_like_pairs(n: int, vocab: int, seed: int = 0, first_id: int = 4,
                        avg_src: float = 13.0, avg_tgt: float = 15.0) -> list[tuple[list[int], list[int]]]:
    """n random sentence pairs with Multi30k's shape under an 8k joint BPE: sources ~13 tokens, targets
    ~15 (spread ~4), 3 to 60 tokens. Ids are drawn from [first_id, vocab - 1): the specials (ids below
    first_id) and the last id (a peer's padding) never occur."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        s = min(60, max(3, round(rng.gauss(avg_src, 4.0))))
        t = min(60, max(3, round(s * avg_tgt / avg_src + rng.gauss(0.0, 1.5))))
        pairs.append(([rng.randrange(first_id, vocab - 1) for _ in range(s)],
                      [rng.randrange(first_id, vocab - 1) for _ in range(t)]))
    return pairs


def random_sources(n: int, length: int, vocab: int, seed: int = 0, first_id: int = 4) -> Tensor:
    """(n, length) random source ids in [first_id, vocab - 1), no padding."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(first_id, vocab - 1, (n, length), generator=g)


# ------------------------------------------------------------------------------ cells, tables
def run_cell(script: str | Path, spec: dict, timeout: float | None = None) -> dict:
    """Run one measurement in a fresh process: `python script --cell JSON` must print one JSON line
    (its last line of output). A failure is returned as {"error": ...}, not raised, so one broken
    peer does not lose the other rows."""
    cmd = [sys.executable, str(script), CELL_FLAG, json.dumps(spec)]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    if str(spec.get("engine", "")).endswith(NO_KERNELS):  # aiayn with PyTorch's operators only
        env["AIAYN_KERNELS"] = "0"
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"exit {proc.returncode}: {tail[:200]}"}
    return json.loads(lines[-1])


def cell_spec(argv: Sequence[str] | None = None) -> dict | None:
    """The spec if this process was started by run_cell, else None."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if CELL_FLAG in argv:
        return json.loads(argv[argv.index(CELL_FLAG) + 1])
    return None


def emit(result: dict) -> None:
    """A cell's result: the last line of its output."""
    print(json.dumps(result), flush=True)


def script_main(main, run_cell) -> None:
    """A benchmark script's entry point: one measured cell when run_cell started it, else the table."""
    spec = cell_spec()
    if spec is not None:
        emit(run_cell(spec))
    else:
        sys.exit(main())


def best_of(results: list[dict], key: str) -> dict:
    """Of repeated measurements of one cell, the one with the highest `key` (the least disturbed)."""
    ok = [r for r in results if "error" not in r]
    return max(ok, key=lambda r: r[key]) if ok else results[-1]


def table(columns: list[str], rows: list[list]) -> str:
    """A Markdown table; numbers are formatted by the caller."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt(x: float, digits: int = 0) -> str:
    return f"{x:,.{digits}f}"


def set_threads(n: int | None) -> None:
    if n:
        torch.set_num_threads(n)


def cross_entropy(logits: Tensor, labels: Tensor, label_smoothing: float) -> Tensor:
    """Label-smoothed cross-entropy over positions whose label is not -100 (HF's convention)."""
    return F.cross_entropy(logits.flatten(0, -2).float(), labels.flatten(), ignore_index=-100,
                           label_smoothing=label_smoothing)


# --------------------------------------------------------------------------------- the suite
def scripts_for(part: str) -> list[Path]:
    if part not in (*PARTS, "all"):
        raise ValueError(f"unknown benchmark {part!r}; choose from {', '.join([*PARTS, 'all'])}")
    names = [n for p in PARTS for n in PARTS[p]] if part == "all" else PARTS[part]
    return [BENCH_DIR / n for n in names]


def run_suite(part: str, quick: bool = False, extra: Sequence[str] = ()) -> int:
    """Run benchmarks/ scripts one after another, their tables going straight to stdout.

    extra: options for the translation scripts (train, decode), not the LM ones. A script
    that does not exist (yet) is reported and skipped. Returns the worst exit status.
    """
    if not BENCH_DIR.is_dir():
        raise FileNotFoundError(f"{BENCH_DIR}: no benchmarks directory (run from a source checkout)")
    worst = 0
    for script in scripts_for(part):
        if not script.is_file():
            print(f"({script.name}: not written yet, skipped)", flush=True)
            continue
        args = [*(["--quick"] if quick else []), *(() if script.name.startswith("lm_") else extra)]
        print(f"\n$ python benchmarks/{script.name} {' '.join(args)}".rstrip(), flush=True)
        worst = max(worst, subprocess.run([sys.executable, str(script), *args]).returncode)
    return worst
