"""The few-rows linear-layer kernel (aiayn/kernels/decode_step.c, linear_*) in a decoding step: the
same inference copy of the shipped EN->DE model with its kernel tiles and without them (oneDNN's
GEMM), greedy, rounds interleaved (kernel first, then oneDNN first), CPU ms a sentence: random batches
of test_2016 sentences, and translate() over all of them (its own sorted batches).

    taskset -c 1 env OMP_NUM_THREADS=1 python benchmarks/linear_kernel.py           # fp32 and bf16 where native
    python benchmarks/linear_kernel.py --quick                                       # seconds: that it runs

The kernel runs for as many rows as this machine's tuning chose (aiayn.kernels.linear_rows); where
it chose none, the copy has no tiles and there is nothing to compare.
"""

from __future__ import annotations

import argparse
import random
import time

from aiayn import bench, capability, kernels
from aiayn.checkpoint import load_model_dir
from aiayn.data.corpus import ASSETS, multi30k
from aiayn.fast.inference import OneDNNLinear, inference_model
from aiayn.translate import translate


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--precisions", default="fp32,bf16", help="of fp32, bf16 (those this machine lacks are skipped)")
    p.add_argument("--batches", default="1,4,8,16,32", help="random batch sizes")
    p.add_argument("--sentences", type=int, default=128, help="sentences per random-batch measurement")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    bad = set(args.precisions.split(",")) - {"fp32", "bf16"}
    if bad:
        p.error(f"--precisions takes fp32 and bf16 (the kernel's types), not {', '.join(sorted(bad))}")
    if args.quick:
        args.batches, args.sentences, args.rounds = "1,4", 8, 2
    texts = [s for s, _ in multi30k("test_2016_flickr", "en", "de")][:64 if args.quick else 1000]
    model, tok, _, _ = load_model_dir(ASSETS / "models" / "en-de")
    print(bench.header("The few-rows linear kernel in greedy decoding: with and without it"))
    print("| precision | batch | rows the kernel takes | kernel CPU ms/sentence | oneDNN CPU ms/sentence | speed-up |")
    print("|---|---|---|---|---|---|")
    machine = capability.probe("cpu")
    for precision in args.precisions.split(","):
        if precision == "bf16" and not machine.bf16:
            print(f"| bf16 | - | - | - | - | not native on this CPU ({machine.isa}) |")
            continue
        copy = inference_model(model, precision)
        layers = [m for m in copy.modules() if isinstance(m, OneDNNLinear) and m.tiles is not None]
        rows = kernels.linear_rows(next(copy.parameters()).dtype)
        if not layers:
            print(f"| {precision} | - | 0 | - | - | the kernel lost its timing here: not used |")
            continue
        tiles = [m.tiles for m in layers]

        def use(kernel: bool) -> None:
            for m, t in zip(layers, tiles):
                m.tiles = t if kernel else None

        for kernel in (True, False):  # every oneDNN primitive and shape made before timing
            use(kernel)
            translate(copy, tok, texts, beam=1, precision="plain")
        for batch in [*map(int, args.batches.split(",")), 0]:
            best = {True: float("inf"), False: float("inf")}
            for r in range(args.rounds):
                for kernel in ((True, False) if r % 2 == 0 else (False, True)):
                    use(kernel)
                    random.seed(r)
                    n, t0 = 0, time.process_time()
                    if batch == 0:
                        translate(copy, tok, texts, beam=1, precision="plain")
                        n = len(texts)
                    while 0 < batch and n < args.sentences:
                        translate(copy, tok, random.sample(texts, batch), beam=1, precision="plain")
                        n += batch
                    best[kernel] = min(best[kernel], 1000 * (time.process_time() - t0) / n)
            use(True)
            name = batch if batch else f"all {len(texts)} (sorted)"
            print(f"| {precision} | {name} | {rows} | {best[True]:.2f} | {best[False]:.2f} | "
                  f"{best[False] / best[True]:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
