"""The training kernels (aiayn/kernels/train_step.c) against PyTorch's operators on the same inputs:
attention (causal, and over every key), the label-smoothed loss, the post-norm residual, dropout's
mask, the feed-forward's bias + GELU, forward and backward, each in fp32 and in bf16 where this CPU
computes it natively. CPU ms a call, the fastest of --reps, kernels and PyTorch taken in turn.

    taskset -c 1 python benchmarks/train_kernels.py --threads 1
    python benchmarks/train_kernels.py --quick                      # seconds: that it runs

Every kernel runs here whether or not it won this machine's timing (AIAYN_KERNELS=all); the last
column says whether `aiayn` uses it (aiayn.kernels.tuning: for attention, up to which length).
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from typing import NamedTuple

import torch

from aiayn import bench, capability, kernels
from aiayn.kernels import tuning
from aiayn.model.attention import attend, causal_mask


def cpu_ms(fn: Callable[[], object], reps: int) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        t = time.process_time()
        fn()
        best = min(best, time.process_time() - t)
    return best * 1e3


def attention(dtype, B, T, heads, head_dim, causal):
    D = heads * head_dim
    qkv = torch.randn(B, T, 3 * D, dtype=dtype, requires_grad=True)  # a fused projection [q | k | v]
    mask = causal_mask(T) if causal else torch.ones(B, 1, 1, T, dtype=torch.bool)
    grad = torch.randn(B, T, D, dtype=dtype)

    def step():
        out = kernels.training_attention(qkv, qkv, mask, heads, D, D)
        if out is None:
            q, k, v = (t.view(B, T, heads, head_dim).transpose(1, 2) for t in qkv.chunk(3, dim=-1))
            out = attend(q, k, v, mask)[0].transpose(1, 2).reshape(B, T, D)
        out.backward(grad)
    return step


class Case(NamedTuple):
    kernel: str
    shape: str
    family: str  # (aiayn.kernels.tuning's)
    make: Callable[[torch.dtype], Callable[[], object]]  # dtype -> a step
    head_dim: int = 0  # attention: the decision's head size, length, and mask
    length: int = 0
    causal: bool = False


def cases(quick: bool):
    n = 4 if quick else 1  # (quick: a quarter of attention's rows)
    yield Case("attention, causal", f"{12 // n} x 64, 4 heads of 32 (the LM preset)", "attention",
               lambda dt: attention(dt, 12 // n, 64, 4, 32, True), 32, 64, True)
    for T in (32, 64, 256) if not quick else (32,):  # (256: the shakespeare preset's context, 6 heads of 64 there)
        for causal in (True, False):
            yield Case(f"attention, {'causal' if causal else 'every key'}",
                       f"{2048 // T // n} x {T}, 4 heads of 64" + (" (small)" if T <= 64 else ""), "attention",
                       lambda dt, T=T, causal=causal: attention(dt, 2048 // T // n, T, 4, 64, causal), 64, T, causal)
    if not quick:  # a pixel model's image (image-gpt: 785 tokens, 2 heads of 32)
        yield Case("attention, causal", "2 x 785, 2 heads of 32 (image-gpt)", "attention",
                   lambda dt: attention(dt, 2, 785, 2, 32, True), 32, 785, True)
    # the other families: the steps their timing takes (aiayn.kernels.tuning)
    yield Case("loss", "512 x 8,000", "loss", tuning.MEASURES["loss"])
    yield Case("residual + LayerNorm", "2048 x 256, dropout 0.1", "residual", tuning.MEASURES["residual"])
    yield Case("residual + LayerNorm", "2048 x 256, no dropout", "residual-nodrop", tuning.MEASURES["residual-nodrop"])
    yield Case("dropout mask", "2048 x 1,024", "dropout", tuning.MEASURES["dropout"])
    yield Case("bias + GELU", "2048 x 16 -> 1,024", "gelu", tuning.MEASURES["gelu"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, help="torch threads (default: torch's, one per core)")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--quick", action="store_true", help="smaller inputs, few repetitions")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    reps = 3 if args.quick else args.reps
    print(bench.header("The training kernels against PyTorch's operators"))
    if not kernels.available():
        print("\nthe C kernels are not built here (no C compiler?, AIAYN_KERNELS=0?): nothing to compare")
        return
    machine = capability.probe("cpu")
    dtypes = [torch.float32] + ([torch.bfloat16] if machine.bf16 else [])
    print(f"{torch.get_num_threads()} thread(s); CPU ms a call (forward and backward), the fastest of {reps}\n")
    print("| kernel | shape | dtype | kernel ms | PyTorch ms | speed-up | used here |")
    print("|---|---|---|---|---|---|---|")
    torch.manual_seed(0)
    for case in cases(args.quick):
        for dtype in dtypes:
            step = case.make(dtype)
            times = {"all": float("inf"), "0": float("inf")}
            for _ in range(2):  # in turn, against drift
                for switch in times:
                    os.environ["AIAYN_KERNELS"] = switch
                    times[switch] = min(times[switch], cpu_ms(step, reps))
            os.environ["AIAYN_KERNELS"] = "1"
            decision = kernels._wins(case.family, dtype, case.head_dim, case.causal)
            used = (f"yes (up to {decision})" if decision >= case.length else "no") if case.family == "attention" \
                else ("yes" if decision else "no")
            print(f"| {case.kernel} | {case.shape} | {str(dtype)[6:]} | {times['all']:.3f} | {times['0']:.3f} | "
                  f"{times['0'] / times['all']:.2f}x | {used} |", flush=True)


if __name__ == "__main__":
    main()
