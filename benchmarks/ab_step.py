"""A/B of two source trees: the same decoding or training step, timed from each tree in turn.

    python benchmarks/ab_step.py decode --base HEAD~1                  # int8 greedy, small, 3 pairs
    python benchmarks/ab_step.py decode --base main --precision fp32 --beam 4 --pairs 5
    python benchmarks/ab_step.py train --base HEAD~1 --precision fp32 --config base
    python benchmarks/ab_step.py decode --base HEAD --quick            # a tiny model: checks it works

How every "A/B" figure in docs/perf-log/2026-11.md was measured. The base revision is checked out into
a temporary git worktree; the head is this working tree (or --head DIR). Each measurement is a fresh
process that imports aiayn and the benchmark engines (decode_throughput.py, train_throughput.py)
from its own tree, runs on one thread and is timed by its own CPU clock (other load on the machine
matters less than for wall time), best of --rounds rounds. Base and head alternate, --pairs times:
on a machine whose speed drifts, a change is real when head wins pair after pair.

decode: 4 batches of 64 random sources of 20 tokens, outputs forced to 20 tokens (as
decode_throughput.py); target tok/s. train: --steps training steps on Multi30k-like batches of
~4k target tokens (as train_throughput.py) after --warmup steps; target tok/s.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def measure(tree: str, args: argparse.Namespace) -> float:
    """In a child process: target tokens per CPU second of `args.mode` with aiayn from `tree`."""
    # an editable install's import hook would find the installed tree first: drop it
    sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f)]
    sys.path[:0] = [tree, os.path.join(tree, "benchmarks")]
    import torch

    import aiayn
    if not Path(aiayn.__file__).resolve().is_relative_to(Path(tree).resolve()):
        raise SystemExit(f"ab_step: imported aiayn from {aiayn.__file__}, not from {tree}")
    torch.set_num_threads(1)
    best = 0.0
    if args.mode == "decode":
        import decode_throughput as dt

        cfg = dt.model_config(args.config)
        decode, _ = dt.aiayn_engine(cfg, args.precision, 20)
        g = torch.Generator().manual_seed(0)
        srcs = [torch.randint(4, cfg.vocab_size, (64, 20), generator=g) for _ in range(args.batches)]
        decode(srcs[0], args.beam)  # warm-up
        for _ in range(args.rounds):
            t = time.process_time()
            for src in srcs:
                decode(src, args.beam)
            best = max(best, len(srcs) * 64 * 20 / (time.process_time() - t))
    else:
        import train_throughput as tt

        cfg = tt.model_config(args.config)
        batches = tt.make_batches(cfg, 20000, 4096, args.warmup + args.steps, 0)
        step, _ = tt.aiayn_step(cfg, args.precision)
        for b in batches[:args.warmup]:
            step(b)
        timed = batches[args.warmup:]
        for _ in range(args.rounds):
            t = time.process_time()
            for b in timed:
                step(b)
            best = max(best, sum(b.n_tokens for b in timed) / (time.process_time() - t))
    return best


def run_child(tree: Path, argv: list[str]) -> float:
    out = subprocess.run([sys.executable, __file__, *argv, "--child", str(tree)], capture_output=True, text=True)
    if out.returncode:
        last = (out.stderr.strip().splitlines() or ["no message"])[-1]
        raise SystemExit(f"ab_step: the run from {tree} failed: {last}")
    return float(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=("decode", "train"))
    p.add_argument("--base", default="HEAD", help="git revision to compare against (default HEAD)")
    p.add_argument("--head", type=Path, default=HERE.parent, help="source tree to measure (default: this one)")
    p.add_argument("--config", default="small", help="model size: small, base, tiny (default small)")
    p.add_argument("--precision", help="decode: fp32, bf16, int8 (default int8); train: fp32, bf16, bf16-model "
                                       "(default: bf16 where the CPU computes it natively, else fp32)")
    p.add_argument("--beam", type=int, default=1, help="decode: beam size (1 = greedy)")
    p.add_argument("--batches", type=int, default=4, help="decode: batches of 64 sentences per round")
    p.add_argument("--steps", type=int, default=10, help="train: timed steps per round")
    p.add_argument("--warmup", type=int, default=24, help="train: untimed steps first")
    p.add_argument("--rounds", type=int, default=3, help="rounds per measurement; the best counts")
    p.add_argument("--pairs", type=int, default=3, help="base/head measurements, alternating")
    p.add_argument("--quick", action="store_true", help="a tiny model, one pair: checks that it runs")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if not args.precision:
        from aiayn.capability import choose_precision

        args.precision = "int8" if args.mode == "decode" else choose_precision("auto", "cpu", "train")[0]
    if args.quick:
        args.config, args.pairs, args.rounds, args.batches, args.steps, args.warmup = "tiny", 1, 1, 1, 2, 1
    if min(args.beam, args.batches, args.steps, args.rounds, args.pairs) < 1 or args.warmup < 0:
        p.error("--beam, --batches, --steps, --rounds and --pairs must be >= 1, --warmup >= 0")
    if args.child:
        print(measure(args.child, args))
        return 0
    child_argv = [args.mode, "--config", args.config, "--precision", args.precision, "--beam", str(args.beam),
                  "--batches", str(args.batches), "--steps", str(args.steps), "--warmup", str(args.warmup),
                  "--rounds", str(args.rounds)]
    try:
        root = subprocess.run(["git", "-C", str(HERE), "rev-parse", "--show-toplevel"], capture_output=True, text=True)
    except OSError:
        p.error("needs git (the base revision is checked out with it)")
    if root.returncode:
        p.error("needs a git checkout (the base revision is checked out from it)")
    with tempfile.TemporaryDirectory() as tmp:
        base_tree = Path(tmp) / "base"
        add = subprocess.run(["git", "-C", root.stdout.strip(), "worktree", "add", "--detach", str(base_tree), args.base],
                             capture_output=True, text=True)
        if add.returncode:
            p.error(f"cannot check out {args.base!r}: {(add.stderr.strip().splitlines() or ['?'])[-1]}")
        try:
            what = f"{args.mode} {args.config} {args.precision}" + (f" beam {args.beam}" if args.mode == "decode" else "")
            print(f"# A/B: {what}, 1 thread, target tok/s per CPU second, best of {args.rounds} round(s)")
            print(f"base {args.base} (worktree), head {args.head}\n")
            print("| pair | base | head | head / base |\n|---|---|---|---|")
            for i in range(args.pairs):
                a, b = run_child(base_tree, child_argv), run_child(args.head, child_argv)
                print(f"| {i + 1} | {a:,.0f} | {b:,.0f} | {b / a:.3f} |", flush=True)
        finally:
            subprocess.run(["git", "-C", root.stdout.strip(), "worktree", "remove", "--force", str(base_tree)],
                           capture_output=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
