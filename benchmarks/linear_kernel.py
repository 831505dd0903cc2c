"""The few-rows kernels of a decoding step (aiayn/kernels/decode_step.c): the same inference copy of the
shipped EN->DE model with its kernel tiles (the linear kernel `linear_*`, and each decoder layer in one
call, `decoder_layer_*`) and without them (oneDNN's GEMM, or fbgemm's for int8, module by module),
greedy, rounds interleaved (kernel first, then oneDNN first), CPU ms a sentence: random batches of
test_2016 sentences, and translate() over all of them (its own sorted batches).

    taskset -c 1 env OMP_NUM_THREADS=1 python benchmarks/linear_kernel.py           # fp32, bf16 where native, int8
    python benchmarks/linear_kernel.py --quick                                       # seconds: that it runs

The kernels run for as many rows as this machine's tuning chose (aiayn.kernels.linear_rows,
layer_rows); where both chose none, the copy has no tiles and there is nothing to compare.
"""

from __future__ import annotations

import argparse
import random
import time

import torch

from aiayn import bench, capability, kernels
from aiayn.checkpoint import load_model_dir
from aiayn.data.corpus import ASSETS, multi30k
from aiayn.fast.inference import inference_model
from aiayn.translate import translate


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--precisions", default="fp32,bf16,int8", help="of fp32, bf16, int8 (those this machine lacks are skipped)")
    p.add_argument("--batches", default="1,4,8,16,32", help="random batch sizes")
    p.add_argument("--sentences", type=int, default=128, help="sentences per random-batch measurement")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    bad = set(args.precisions.split(",")) - {"fp32", "bf16", "int8"}
    if bad:
        p.error(f"--precisions takes fp32, bf16 and int8 (the kernels' types), not {', '.join(sorted(bad))}")
    if args.quick:
        args.batches, args.sentences, args.rounds = "1,4", 8, 2
    texts = [s for s, _ in multi30k("test_2016_flickr", "en", "de")][:64 if args.quick else 1000]
    model, tok, _, _ = load_model_dir(ASSETS / "models" / "en-de")
    print(bench.header("The few-rows kernels in greedy decoding: with and without them"))
    print("| precision | batch | rows: linear / layer | kernels CPU ms/sentence | GEMM CPU ms/sentence | speed-up |")
    print("|---|---|---|---|---|---|")
    machine = capability.probe("cpu")
    for precision in args.precisions.split(","):
        if (precision == "bf16" and not machine.bf16) or (precision == "int8" and not machine.int8):
            print(f"| {precision} | - | - | - | - | not native on this CPU ({machine.isa}) |")
            continue
        copy = inference_model(model, precision)
        layers = [m for m in copy.modules() if getattr(m, "tiles", None) is not None]
        dtype = torch.int8 if precision == "int8" else next(copy.parameters()).dtype
        rows = f"{kernels.linear_rows(dtype)} / {kernels.layer_rows(dtype)}"
        if not layers:
            print(f"| {precision} | - | {rows} | - | - | the kernels lost their timing here: not used |")
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
