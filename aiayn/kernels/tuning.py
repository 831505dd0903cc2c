"""Which of aiayn's C kernels win on this machine: measured once, cached beside the built library.

A kernel that beats PyTorch on one CPU may lose on another (on an AVX2-only CPU the training
attention kernel made a language model's training 1.5x slower, where on a Zen 5 it made it faster),
so no threshold is taken from the machine the kernels were written on. At the first use of a kernel
family (and dtype) in a process, its decision for this library, CPU and thread count is read from
`kernels-<key>.tuning-<threads>t.json` beside the library; if it is not there, the family is timed
against PyTorch's operators on the same inputs (the model's own modules, with the kernels on and
off; a fraction of a second each) and the result is added there. A family is used where it was not
slower; the training attention up to the longest length at which it was not slower, the linear
layers up to the most rows, beam search's step up to the most sentences (at 16, for any number).

    family        what is timed (forward + backward where it trains)
    attention     training self-attention, 4 heads of the model's head size, 2,048 tokens, lengths
                  32-1,024: causal (a mask with a row per query) and over every key, decided apart
    residual      training's post-norm residual x + dropout(y) -> LayerNorm, (2048, 256)
    dropout       dropout masks, (2048, 1024)
    gelu          training's feed-forward bias + GELU after its first product, (2048, 16) -> 1024
                  (bf16: under autocast, as training runs it)
    loss          label-smoothed cross-entropy, (512, 8000)
    decode        greedy decoding of 16 sentences by a 1+2-layer model, vocabulary 8,000 (attention
                  steps, residual + norm, argmax, embedding)
    beam          beam search's step (k = 4) on the logits of 1 and of 16 sentences, vocabulary 8,000
    linear        the linear layers of a decoding step (3 post-norm layers of d_model 256, d_ff 1024,
                  and a generator of 8,000) against oneDNN's GEMM (int8 weights: against PyTorch's
                  dynamically quantized GEMM), at 1, 2, 4, ... 64 rows
    layer         decoding steps of 3 post-norm decoder layers of those shapes: each layer in one
                  call (its linear layers in the kernel above) against the layers' modules (their
                  linear layers where the decision above puts them), at 1, 2, 4, ... 64 rows
    gemm          not a C kernel: fp32 training's linear layers (a post-norm layer of d_model 256,
                  d_ff 1024, 1,024 rows) on oneDNN (aiayn.fast.onednn) against PyTorch's own GEMM
                  (MKL on x86). Kept per CPU and torch version (`for_torch`), with or without the
                  kernels.

Each family is timed with its own kernels on and off and every other kernel on: what it adds.
Timings taken while other work shared the CPU decide wrongly (on a 2-core Zen 4, CI on the other
core made the training attention lose at the shortest length, 0.99x, where it was 1.6-2.4x faster
alone: a language model then trained ~20% slower): on Linux the CPU time other processes (and a
hypervisor's steal) took meanwhile is read from /proc/stat, and a disturbed measurement is taken
again, up to TIMINGS times, the least disturbed kept. How busy other work kept the CPU is saved with
each decision; a later process that finds the CPU quiet measures a disturbed decision again.

AIAYN_KERNELS=all uses every kernel wherever it takes the inputs (tests that compare the kernels with
PyTorch), oneDNN's training GEMMs included; AIAYN_KERNELS=0 none, and PyTorch's own GEMMs.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import ContextManager
from pathlib import Path

import torch

ATTENTION_LENGTHS = (32, 64, 128, 256, 512, 1024)  # (up to kernels.MAX_TRAIN_LENGTH)
BEAM_SENTENCES = (1, 16)  # one sentence: the step's ~15 PyTorch operators cost more than their arithmetic
LINEAR_ROWS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
# The linear layers timed alone win more than in a decoding step (where the rest of the step shares
# the caches): 16 rows in fp32, 1.06x here, were 10% slower in greedy decoding. A row count counts
# as won from 10% faster (the whole step in one call takes its generator at a tie: rows_not_slower).
LINEAR_MARGIN = 1.10
NOISE = 1.02  # a kernel counts as faster from 2% faster: timing noise (at a tie PyTorch's path runs)
VERSION = 12  # a new version measures again (what is measured, how, or the library's boundary, changed)
BUSY = 0.5  # cores' worth of other work, beyond the cores this process's threads leave free, that disturbs a timing
TIMINGS = 3  # a disturbed measurement is taken again, at most this many times in all
_lock = threading.RLock()
_tables: dict[tuple[str, int], dict] = {}  # (library, threads) -> decisions, for this process
_state = threading.local()  # .timing: the family being timed, .off: whether it is off just now,
#                             .measuring: the keys this thread is measuring
_told = False  # whether this process has said that it times the kernels
_told_again = False  # ... and that it times some again, other work having disturbed them
_again: dict[tuple[str, int], set[str]] = {}  # (library, threads) -> decisions measured while other work
#                                              disturbed them, dropped for this process to measure again


def forced(family: str) -> bool | None:
    """While a family is timed (in this thread): every kernel on, except that family in its "off"
    runs. None otherwise (the decisions apply)."""
    timing = getattr(_state, "timing", None)
    if timing is None:
        return None
    return not (_state.off and family == timing)


def decide(key: str, library_path: str | Path) -> bool | int:
    """The decision for `key` ("<family>_<f32|bf16>", and "_dh<head dim>" for attention) on this
    library, CPU and thread count: measured the first time any process asks, then read. A dictionary
    lookup once known (decoding asks a few times a step)."""
    global _told
    table = _tables.get((str(library_path), torch.get_num_threads())) or _table(Path(library_path))
    found = table.get(key)
    if found is None:
        with _lock:
            found = table.get(key)
            if found is None:
                measuring = vars(_state).setdefault("measuring", set())  # this thread's, just now
                if key in measuring:  # (a bug of this module: the measurement would recurse forever)
                    raise RuntimeError(f"aiayn.kernels.tuning: measuring {key} asked for {key}'s own decision")
                measuring.add(key)
                if not _told:
                    print("aiayn: timing its kernels against PyTorch's on this CPU (once: a few seconds)",
                          file=sys.stderr, flush=True)
                    _told = True
                try:
                    (found, table[f"{key}_speedups"]), busy = _measure_undisturbed(key)
                finally:
                    measuring.discard(key)
                table[key], table[f"{key}_busy"] = found, round(busy, 2)
                _save(table, Path(library_path))
    return found


def for_torch(key: str) -> bool | int:
    """The decision for `key` of a family that chooses between PyTorch's own paths (no C kernel, so
    it holds where the kernels are not built): kept in the kernels' cache per CPU, torch version
    (whose oneDNN and MKL it measured) and MKL's ISA cap."""
    return decide(key, torch_table())


def torch_table() -> Path:
    """Where for_torch's decisions are kept (a library's name: the tables are beside it)."""
    import hashlib

    from aiayn import kernels

    mkl = os.environ.get("MKL_ENABLE_INSTRUCTIONS", "")
    machine = hashlib.sha256(f"{kernels.machine_key()} torch {torch.__version__} mkl {mkl}".encode()).hexdigest()[:16]
    return kernels.cache_dir() / f"torch-{machine}"


def saved(library_path: str | Path) -> dict[str, tuple]:
    """The decisions saved for this library and this process's thread count (empty if none yet):
    {key: (decision, [speed-ups], how busy other work kept the CPU while it was timed, or None)}."""
    table = _read(_path(Path(library_path), torch.get_num_threads()))
    keys = [k for k in table if k not in ("version", "threads") and not k.endswith(("_speedups", "_busy"))]
    return {k: (table[k], table.get(f"{k}_speedups", []), table.get(f"{k}_busy")) for k in keys}


FAMILIES = {  # each family in words (aiayn machine)
    "attention": "training attention", "residual": "training residual + LayerNorm",
    "residual-nodrop": "training residual + LayerNorm, no dropout", "dropout": "dropout masks",
    "loss": "training loss", "gelu": "training feed-forward's bias + GELU",
    "decode": "a decoding step's small operators", "beam": "beam search's step",
    "linear": "a decoding step's linear layers", "layer": "a decoder layer's whole step",
    "gemm": "fp32 training's linear layers on oneDNN (else PyTorch's own GEMM)"}


def in_words(key: str, decision: bool | int, speedups: list[float]) -> tuple[str, str, str]:
    """A decision as `aiayn machine` shows it: (what the family is, "on" / "off" / "on up to N
    tokens|rows|sentences", the speed-ups, each at its size where the family is timed at several)."""
    family = key.split("_")[0]
    what = FAMILIES.get(family, "")
    if family == "attention":
        what += ", causal" if key.endswith("_causal") else ", every key"
    unit, sizes = {"attention": ("tokens", ATTENTION_LENGTHS), "linear": ("rows", LINEAR_ROWS),
                   "layer": ("rows", LINEAR_ROWS), "beam": ("sentences", BEAM_SENTENCES)}.get(family, ("", ()))
    if isinstance(decision, bool) or not unit:
        said = "on" if decision else "off"
    else:
        said = f"on up to {decision} {unit}" if decision else "off"
    generator = _rows_not_slower(speedups) if family == "linear" else 0
    if generator > decision:
        said += f" (in the one-call step's generator: {generator})"
    if 1 < len(speedups) <= len(sizes):
        measured = ", ".join(f"{x:.2f}x at {n}" for x, n in zip(speedups, sizes))
    else:
        measured = ", ".join(f"{x:.2f}x" for x in speedups)
    return what, said, measured


def clear(library_path: str | Path) -> list[Path]:
    """Remove the decisions saved for this library (every thread count): the kernels are timed
    again at their next use. -> the tables removed."""
    library_path = Path(library_path)
    removed = []
    for table in library_path.parent.glob(f"{library_path.stem}.tuning-*t.json"):
        table.unlink(missing_ok=True)
        removed.append(table)
    forget()
    return removed


def forget() -> None:
    """Drop this process's decisions (tests)."""
    global _told, _told_again
    _tables.clear()
    _again.clear()
    _told = _told_again = False


def _path(library_path: Path, threads: int) -> Path:
    return library_path.with_name(f"{library_path.stem}.tuning-{threads}t.json")


def _read(path: Path) -> dict:
    """The table saved at `path`: {} if there is none, or it is unreadable or of another version."""
    try:
        table = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return table if isinstance(table, dict) and table.get("version") == VERSION else {}


def _table(library_path: Path) -> dict:
    threads = torch.get_num_threads()
    table = _tables.get((str(library_path), threads))
    if table is None:
        table = _read(_path(library_path, threads)) or {"version": VERSION, "threads": threads}
        disturbed = {k.removesuffix("_busy") for k, v in table.items()
                     if k.endswith("_busy") and isinstance(v, (int, float)) and v > BUSY}
        if disturbed and _quiet_now():  # measured while other work ran, and the CPU is quiet now: again
            for key in disturbed:
                table.pop(key, None)
            _again[(str(library_path), threads)] = disturbed
        table = _tables.setdefault((str(library_path), threads), table)
    return table


def _save(table: dict, library_path: Path) -> None:
    path = _path(library_path, table["threads"])
    on_disk = _read(path)  # merged with what other processes measured meanwhile; written atomically
    # what others measured is this process's too, except the disturbed decisions it measures again
    # (kept on disk until it has)
    again = _again.get((str(library_path), table["threads"]), set())
    table.update({k: v for k, v in on_disk.items() if k not in table and k not in again})
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({**on_disk, **table}, indent=1))
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only cache: measured again by the next process


# ----------------------------------------------------------------------------------- timing
def _best(fn: Callable[[], object], reps: int = 5) -> float:
    fn()  # warm-up: allocations, oneDNN primitives
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


@contextlib.contextmanager
def _every_kernel_on(family: str):
    """While a measurement builds what it will time: every kernel on, as in its timed runs, and no
    decision asked for. (A decision asked for inside another's measurement may need that one: an
    inference copy asks the layer family's, whose measurement decodes, which asks the decode
    family's, whose measurement builds an inference copy.)"""
    _state.timing, _state.off = family, False
    try:
        yield
    finally:
        _state.timing = None


def _on_off(fn: Callable[[], object], family: str, reps: int = 5,
            while_off: Callable[[], ContextManager] = contextlib.nullcontext) -> tuple[float, float]:
    """Seconds of fn with `family`'s kernels on and off (every other kernel on; the off runs inside
    `while_off()`), the best of `reps`, interleaved against drift."""
    on = off = float("inf")
    _state.timing = family
    try:
        for _ in range(2):
            _state.off = False
            on = min(on, _best(fn, reps))
            _state.off = True
            with while_off():
                off = min(off, _best(fn, reps))
    finally:
        _state.timing = None
    return on, off


def _won_at(step: Callable[[], object], family: str, won: Callable[[float, float], bool],
            while_off: Callable[[], ContextManager] = contextlib.nullcontext) -> tuple[bool, float]:
    """Whether `family`'s kernels won on `step` (`won(on, off)`, as _on_off times them), and the
    speed-up: a loss counts once it is timed again (timings here jump), the best of both kept."""
    on, off = _on_off(step, family, 3, while_off)
    if not won(on, off):
        on, off = (min(a, b) for a, b in zip((on, off), _on_off(step, family, 3, while_off)))
    return won(on, off), round(off / on, 3)


def _most(sizes: tuple[int, ...], won_at: Callable[[int], tuple[bool, float]],
          beyond: Callable[[float], bool] = lambda speedup: False) -> tuple[int, list[float]]:
    """The largest of `sizes` (rows, lengths, sentences) up to which the kernels won, timing each
    size in turn (`won_at(size)` -> (won, speed-up)) until the first loss, and past it while
    `beyond(speed-up)` holds (speed-ups for another use: rows_not_slower); 0 if they lost at the first.
    And the speed-ups measured."""
    most, speedups, lost = 0, [], False
    for size in sizes:
        won, speedup = won_at(size)
        speedups.append(speedup)
        lost = lost or not won
        if not lost:
            most = size
        elif not beyond(speedup):
            break
    return most, speedups


def _measurable(dtype: torch.dtype) -> bool:
    """Whether the few-rows kernels have a path to beat here: oneDNN's GEMM (fp32, bf16 where the CPU
    computes bf16 natively: elsewhere oneDNN refuses it), PyTorch's dynamically quantized one (int8).
    Elsewhere there is only PyTorch's own GEMM: not measured."""
    from aiayn import capability
    from aiayn.fast.inference import onednn_available

    machine = capability.probe("cpu")
    if dtype == torch.int8:
        return machine.int8
    return onednn_available() and (dtype != torch.bfloat16 or machine.bf16)


def _measure_undisturbed(key: str) -> tuple[tuple[bool | int, list[float]], float]:
    """_measure(key), taken again while other work disturbed it (up to TIMINGS times): the least
    disturbed result, and how busy other work kept the CPU then (cores, see _others_busy)."""
    global _told_again
    best = None
    for attempt in range(TIMINGS):
        read = _others_busy()
        result = _measure(key)
        busy = read()
        if best is None or busy < best[1]:
            best = result, busy
        if busy <= BUSY:
            break
        if attempt + 1 < TIMINGS and not _told_again:
            print(f"aiayn: timing its kernels once more: other work kept this CPU busy meanwhile ({busy:.1f} "
                  "cores' worth; a quiet CPU times them right)", file=sys.stderr, flush=True)
            _told_again = True
    return best


def _quiet_now(seconds: float = 0.2) -> bool:
    """Whether other work leaves this process's cores free just now (this process idle meanwhile)."""
    read = _others_busy()
    time.sleep(seconds)
    return read() <= BUSY


def _others_busy() -> Callable[[], float]:
    """Starts counting the CPU time that other work (other processes, a hypervisor's steal) takes;
    the function returned says how much it took since, in cores, beyond the cores this process's
    threads leave free. 0.0 where it cannot tell: no /proc/stat (not Linux), or under 0.1 s, too
    short for its 10 ms ticks."""
    start = _cpu_seconds()
    if start is None:
        return lambda: 0.0

    def read() -> float:
        end = _cpu_seconds()
        if end is None or end[0] - start[0] < 0.1:
            return 0.0
        wall = end[0] - start[0]
        others = (end[1] - start[1]) - (end[2] - start[2])  # the machine's busy time less this process's
        free = max((os.cpu_count() or 1) - torch.get_num_threads(), 0)
        return max(others / wall - free, 0.0)

    return read


def _cpu_seconds() -> tuple[float, float, float] | None:
    """(wall clock, CPU seconds the whole machine was busy, stolen included, this process's CPU
    seconds), or None without /proc/stat."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[1:9])
    except (OSError, ValueError):
        return None
    mine = os.times()
    return (time.perf_counter(), (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK"),
            mine.user + mine.system)


def _measure(key: str) -> tuple[bool | int, list[float]]:
    """-> (the decision, the kernels' speed-ups measured: PyTorch's time / the kernels')."""
    family, name, *rest = key.split("_")
    dtype = {"f32": torch.float32, "bf16": torch.bfloat16, "i8": torch.int8}[name]
    # asked from anywhere (an autograd Function's forward, a decoding loop, autocast): measured in
    # plain fp32-default mode with gradients, and without disturbing the caller's random numbers
    with (torch.inference_mode(False), torch.enable_grad(), torch.autocast("cpu", enabled=False),
          torch.random.fork_rng()):
        torch.manual_seed(0)
        if family == "attention":  # attention_<dtype>_dh<head size>[_causal]
            return _attention(dtype, int(rest[0][2:]), causal=rest[1:] == ["causal"])
        if family == "linear":
            return _linear(dtype)
        if family == "layer":
            return _layer(dtype)
        if family == "beam":
            return _beam_sentences(dtype)
        won, speedup = _won_at(MEASURES[family](dtype), family, _faster)
        return won, [speedup]


def _faster(on: float, off: float) -> bool:
    """Whether the kernels' time `on` beats PyTorch's `off` by more than timing noise (NOISE): at a
    tie, PyTorch's operators (the reference) run."""
    return on * NOISE < off


def _attention(dtype: torch.dtype, head_dim: int, causal: bool) -> tuple[int, list[float]]:
    """The longest length (of ATTENTION_LENGTHS) up to which the kernel was never slower, for 4 heads
    of `head_dim`, with a decoder's causal mask (the kernel skips the keys past each query's own) or
    an encoder's padding mask (every key); 0 if it lost at the shortest. And the speed-ups measured.
    The two are decided apart: at long lengths the kernel can win the one and lose the other (a
    Zen 4, bf16, 4 heads of 32, 1,024 tokens: causal 1.3x faster than PyTorch's, every key slower)."""
    from aiayn import kernels
    from aiayn.model.attention import attend, causal_mask

    D = 4 * head_dim

    def won_at(T: int) -> tuple[bool, float]:
        B = 2048 // T
        qkv = torch.randn(B, T, 3 * D, dtype=dtype, requires_grad=True)  # a fused projection [q | k | v]
        mask = causal_mask(T) if causal else torch.ones(B, 1, 1, T, dtype=torch.bool)

        def step():  # what MultiHeadAttention does between its projections
            out = kernels.training_attention(qkv, qkv, mask, 4, D, D)
            if out is None:
                q, k, v = (t.view(B, T, 4, head_dim).transpose(1, 2) for t in qkv.chunk(3, dim=-1))
                out = attend(q, k, v, mask)[0].transpose(1, 2).reshape(B, T, D)
            out.backward(torch.ones_like(out))

        return _won_at(step, "attention", _faster)

    return _most(ATTENTION_LENGTHS, won_at)


def _linear(dtype: torch.dtype) -> tuple[int, list[float]]:
    """The most rows (of LINEAR_ROWS) up to which the linear kernel was never slower than oneDNN's
    GEMM on a decoding step's layers (the inference copy's OneDNNLinear, with and without its
    tiles); 0 if it lost at one row. And the speed-ups measured."""
    from aiayn import kernels
    from aiayn.fast.inference import OneDNNLinear

    if not _measurable(dtype):
        return 0, []
    inputs_dtype = torch.float32 if dtype == torch.int8 else dtype
    shapes = [(256, 768), (256, 256), (256, 256), (256, 256), (256, 1024), (1024, 256)] * 3 + [(256, 8000)]
    layers = []
    for k, n in shapes:
        layer = torch.nn.Linear(k, n).to(inputs_dtype).requires_grad_(False)
        if dtype == torch.int8:  # against fbgemm's dynamically quantized GEMM
            layers.append(_int8_linear(layer))
            continue
        layer.__class__ = OneDNNLinear
        layer.packed = torch.ops.mkldnn._reorder_linear_weight(layer.weight, 64)
        layer.tiles = kernels.linear_tiles(layer.weight)
        layers.append(layer)

    def won_at(rows: int) -> tuple[bool, float]:
        inputs = {k: torch.randn(rows, k, dtype=inputs_dtype) for k in (256, 1024)}

        def step():
            with torch.no_grad():
                for layer in layers:
                    layer(inputs[layer.in_features])

        return _won_at(step, "linear", lambda on, off: on * LINEAR_MARGIN < off)

    return _most(LINEAR_ROWS, won_at, beyond=_not_slower)


def rows_not_slower(key: str, library_path: str | Path) -> int:
    """The most rows (of LINEAR_ROWS) up to which the linear kernel (`key`: "linear_<dtype>") was
    not slower than oneDNN's or fbgemm's GEMM beyond timing noise (a tie counts; LINEAR_MARGIN does
    not apply): what the whole decoding step in one call takes its generator on
    (kernels.generator_rows). Measured first if need be."""
    decide(key, library_path)
    return _rows_not_slower(_table(Path(library_path)).get(f"{key}_speedups", []))


def _not_slower(speedup: float) -> bool:
    return speedup * NOISE >= 1.0


def _rows_not_slower(speedups: list[float]) -> int:
    most = 0
    for rows, speedup in zip(LINEAR_ROWS, speedups):
        if not _not_slower(speedup):
            break
        most = rows
    return most


def _layer(dtype: torch.dtype) -> tuple[int, list[float]]:
    """The most rows (of LINEAR_ROWS) up to which decoding steps with each decoder layer in one call
    (kernels.decoder_layer) were faster than through the layers' modules, whose linear layers run
    where the linear family's decision puts them (the kernel up to its rows, else oneDNN or fbgemm);
    0 if it lost at one row. And the speed-ups measured."""
    from aiayn import kernels
    from aiayn.config import ModelConfig
    from aiayn.fast.inference import inference_model
    from aiayn.model import build_model

    if not _measurable(dtype):
        return 0, []
    linear_rows = kernels.linear_rows(dtype)  # (its own decision, measured first if need be)
    cfg = ModelConfig(vocab_size=8000, d_model=256, n_heads=4, d_ff=1024, n_encoder_layers=1, n_decoder_layers=3,
                      max_len=64, dropout=0.0)
    precision = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.int8: "int8"}[dtype]
    with _every_kernel_on("layer"):  # the copy gets its tiles without asking for this family's decision
        model = inference_model(build_model(cfg), precision)
    step_linears = [m for m in model.decoder.modules() if getattr(m, "tiles", None) is not None]
    if len(step_linears) < 6 * cfg.n_decoder_layers:
        return 0, []  # no tiles here: nothing to run the layer with
    tiles = {m: m.tiles for m in step_linears}

    def won_at(rows: int) -> tuple[bool, float]:
        src = torch.randint(4, 8000, (rows, 12))
        with torch.no_grad():
            memory, mask = model.encode(src)

        def step():
            with torch.no_grad():
                cache = model.init_cache(memory, mask, 8)
                tokens = torch.full((rows, 1), 5)
                for _ in range(8):
                    model.decode_step(tokens, cache)

        @contextlib.contextmanager
        def modules():  # off: the layers' modules, their linear kernel only where its own decision puts it
            for m in step_linears:
                m.tiles = tiles[m] if rows <= linear_rows else None
            try:
                yield
            finally:
                for m in step_linears:
                    m.tiles = tiles[m]

        return _won_at(step, "layer", _faster, modules)

    return _most(LINEAR_ROWS, won_at)


def _int8_linear(layer: torch.nn.Linear) -> torch.nn.Module:
    """An int8 inference copy's form of `layer` (aiayn.fast.inference.Int8Linear), with the kernel's tiles."""
    import warnings

    from aiayn.fast.inference import Int8Linear

    with warnings.catch_warnings():  # torch.ao quantization is marked deprecated
        warnings.simplefilter("ignore")
        q = torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(layer), {torch.nn.Linear}, dtype=torch.qint8)
    return Int8Linear(q[0], tiles=True)


def _residual(dtype, p: float = 0.1):
    """The post-norm residual, with dropout (the kernel applies its mask in the same pass) or, p = 0,
    without: the kernel can win the one and lose the other (a Zen 4, fp32, 2,048 x 256, fwd+bwd: 1.09x
    faster than PyTorch's with dropout 0.1, 0.84x without)."""
    norm = torch.nn.LayerNorm(256).to(dtype)
    x = torch.randn(2048, 256, dtype=dtype, requires_grad=True)
    y = torch.randn(2048, 256, dtype=dtype, requires_grad=True)

    def step():
        from aiayn import kernels
        from aiayn.fast.modules import add_dropout

        out = kernels.residual_layer_norm(x, y, norm, p)
        if out is None:
            out = norm(add_dropout(x, y, p))
        out.sum().backward()
    return step


def _dropout(dtype):
    from aiayn.fast.modules import dropout

    x = torch.randn(2048, 1024, dtype=dtype)
    return lambda: dropout(x, 0.1)


def _gelu(dtype):
    import torch.nn.functional as F

    from aiayn import kernels

    w1 = torch.nn.Linear(16, 1024)  # a narrow input: the products (the same on and off) take little
    x = torch.randn(2048, 16)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)

    def step():
        with autocast:
            if kernels.bias_gelu_takes(x, w1.bias):
                y = kernels.bias_gelu(F.linear(x, w1.weight), w1.bias)
            else:
                y = F.gelu(w1(x))
        y.backward(torch.ones_like(y))
    return step


def _loss(dtype):
    from aiayn.train.loss import label_smoothed_cross_entropy

    logits = torch.randn(512, 8000, dtype=dtype, requires_grad=True)
    target = torch.randint(0, 8000, (512,))
    return lambda: label_smoothed_cross_entropy(logits, target, 0.1).backward()


def _decode(dtype):
    from aiayn.config import ModelConfig
    from aiayn.decode.greedy import greedy
    from aiayn.fast.inference import inference_model
    from aiayn.model import build_model

    cfg = ModelConfig(vocab_size=8000, d_model=256, n_heads=4, d_ff=1024, n_encoder_layers=1, n_decoder_layers=2,
                      max_len=64, dropout=0.0)
    with _every_kernel_on("decode"):
        model = inference_model(build_model(cfg), "fp32" if dtype == torch.float32 else "bf16")
    src = torch.randint(4, 8000, (16, 8))
    return lambda: greedy(model, src, 1, 2, max_extra=0, min_len=8)


def _beam(dtype, sentences: int = 16):
    """Beam search's step (k = 4) on the logits of `sentences` x 4 beams over a vocabulary of 8,000:
    the step alone, whose kernel replaces ~15 operators (a whole search's decoder steps were most of
    its time, and their noise hid the step's)."""
    from aiayn.decode.beam import candidates

    logits = torch.randn(sentences * 4, 1, 8000, dtype=dtype) * 4
    scores = -torch.rand(sentences, 4) * 10
    forbid, at_limit = torch.tensor([0]), torch.zeros(sentences, dtype=torch.bool)

    def steps():  # as many as a short sentence's search
        for _ in range(20):
            candidates(logits.clone(), scores, 4, forbid, 2, False, at_limit)  # (it changes the logits in place)
    return steps


def _beam_sentences(dtype: torch.dtype) -> tuple[int, list[float]]:
    """The most sentences (of BEAM_SENTENCES) up to which beam search's step kernel was
    faster; 0 if it lost at one sentence. And the speed-ups measured."""
    return _most(BEAM_SENTENCES, lambda n: _won_at(_beam(dtype, n), "beam", _faster))


def _gemm(dtype):
    """fp32 training's linear layers, forward and backward, on oneDNN (the step's modules are
    OneDNNTrainingLinear) or on PyTorch's GEMM (nn.Linear): a post-norm layer of the small model's
    shapes, 1,024 rows. (oneDNN's won by 2.3x on a Zen 5, where MKL takes an AVX2 path; PyTorch's
    by 5-25% on an Intel Xeon with AMX.)"""
    from aiayn.fast.onednn import OneDNNTrainingLinear

    shapes = [(256, 768), (256, 256), (256, 1024), (1024, 256)]
    plain = [torch.nn.Linear(k, n, dtype=dtype) for k, n in shapes]
    onednn = [torch.nn.Linear(k, n, dtype=dtype) for k, n in shapes]
    for layer in onednn:
        layer.__class__ = OneDNNTrainingLinear
    inputs = {k: torch.randn(1024, k, dtype=dtype, requires_grad=True) for k in (256, 1024)}
    grads = {n: torch.randn(1024, n, dtype=dtype) for n in (256, 768, 1024)}

    def step():
        for layer in (onednn if forced("gemm") else plain):
            layer(inputs[layer.in_features]).backward(grads[layer.out_features])
    return step


MEASURES = {"residual": _residual, "residual-nodrop": lambda dtype: _residual(dtype, 0.0), "dropout": _dropout,
            "gelu": _gelu, "loss": _loss, "decode": _decode, "beam": _beam, "gemm": _gemm}
