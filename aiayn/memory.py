"""Process-wide memory settings that make training and decoding steps on a CPU faster."""

from __future__ import annotations

import ctypes
import functools
import os
import sys


@functools.cache  # once a process
def keep_freed_memory() -> None:
    """Make glibc's malloc keep the memory a training step frees, for the next step to reuse.

    By default every block over the mmap threshold (at most 32 MB) is its own mapping, unmapped on
    free, and the heap's top is trimmed back to the OS: each step then faults its large temporaries
    (logits, activations, gradients) in again, page by page, each page zeroed by the kernel. Small
    bf16 training step here: ~40k page faults and ~60 ms of kernel time a step, 9-18% of the step
    (120k faults in fp32). With mmap off and no trimming, ~10k. Beam search gains 12-26% the same
    way. The CLI calls this for every command (library code does not: the setting is process-wide
    and lasts; a program of its own calls it if it wants it). Elsewhere than glibc, nothing happens.

    The price is memory: freed blocks stay in the heap, which fragments as big temporaries change
    size from batch to batch. A `multi30k`-preset R-Drop run held 7.3 GB after 300 updates with it,
    3.7 GB without, at 7.1k against 5.2k target tokens/s (docs/perf-log/2026-11.md, "Memory").
    AIAYN_KEEP_FREED_MEMORY=0 in the environment leaves malloc alone, for a machine short of memory.
    """
    if not sys.platform.startswith("linux") or os.environ.get("AIAYN_KEEP_FREED_MEMORY") == "0":
        return
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # musl and others: leave malloc alone
        return
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
    mallopt(M_MMAP_MAX, 0)  # (a thread's arena still maps a block it cannot serve otherwise)
    mallopt(M_TRIM_THRESHOLD, 2**31 - 1)
