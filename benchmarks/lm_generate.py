"""Language-model generation speed against context length, with and without the KV cache.

    python benchmarks/lm_generate.py                         # contexts 64, 128, 256, 512
    python benchmarks/lm_generate.py --lengths 256 --new-tokens 64 --threads 1
    python benchmarks/lm_generate.py --quick                 # seconds: checks that it works
    python benchmarks/lm_generate.py --threads 1 --clock cpu # on a busy machine: CPU seconds

The model has the shape of the `shakespeare` preset (6 layers, 6 heads, d_model 384, 69 characters;
random weights: speed does not depend on them), with max_len = the context length L, in fp32 as
`aiayn generate` runs it. For each L, a prompt of L - n tokens is continued by n tokens (greedy), so
every timed step attends to between L - n and L positions:
  cached     aiayn.decode.sampling.generate: the prompt is read once (prefill, timed apart), then
             each step feeds one token and reuses the keys and values of the earlier ones
  no cache   each step re-runs the whole forward pass over the context (nanoGPT's sample.py)
  prefill ms the cached path's one forward pass over the prompt
"""

from __future__ import annotations

import argparse
import time

import torch

from aiayn.decode.sampling import generate
from aiayn.model import LanguageModel
from aiayn.tasks.lm import PRESETS


clock = time.perf_counter


def cached(model, prompt: list[int], n: int) -> tuple[float, float]:
    """-> (prefill seconds, seconds for the n steps after it)."""
    t0 = clock()
    steps = generate(model, prompt, n + 1, temperature=0)
    next(steps)  # the prefill, and the first token drawn from its logits
    t1 = clock()
    for _ in steps:
        pass
    return t1 - t0, clock() - t1


@torch.no_grad()
def uncached(model, prompt: list[int], n: int) -> float:
    L = model.cfg.max_len
    context = torch.tensor([prompt])
    t0 = clock()
    for _ in range(n):
        nxt = model(context[:, -L:])[:, -1].argmax(-1, keepdim=True)  # (1, 1)
        context = torch.cat([context, nxt], dim=1)
    return clock() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[64, 128, 256, 512])
    p.add_argument("--new-tokens", type=int, default=32, help="timed steps per context length")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's, one per core)")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="cpu: CPU seconds of this process (steadier on a busy machine; use one thread)")
    p.add_argument("--quick", action="store_true", help="contexts 64 and 128, 8 tokens, a 2-layer model")
    args = p.parse_args()
    global clock
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    if args.threads:
        torch.set_num_threads(args.threads)
    model_cfg = PRESETS["shakespeare"][0].replace(vocab_size=69)
    if args.quick:
        args.lengths, args.new_tokens = [64, 128], 8
        model_cfg = model_cfg.replace(n_decoder_layers=2)
    n = args.new_tokens
    print(f"LanguageModel {model_cfg.n_decoder_layers} layers, d_model {model_cfg.d_model}, fp32, "
          f"{torch.get_num_threads()} threads, {args.clock} clock; {n} greedy tokens after a prompt of L - {n}",
          flush=True)
    head = ("context L", "cached tok/s", "no cache tok/s", "speed-up", "prefill ms")
    print("  ".join(f"{h:>14}" for h in head))
    g = torch.Generator().manual_seed(0)
    for L in args.lengths:
        if L <= n:
            raise SystemExit(f"context {L} must be longer than --new-tokens {n}")
        torch.manual_seed(0)
        model = LanguageModel(model_cfg.replace(max_len=L)).eval()
        prompt = torch.randint(4, model_cfg.vocab_size, (L - n,), generator=g).tolist()
        cached(model, prompt[-8:], 4), uncached(model, prompt[-8:], 2)  # warm-up
        prefill, t_cached = cached(model, prompt, n)
        t_plain = uncached(model, prompt, n)
        row = (L, f"{n / t_cached:,.0f}", f"{n / t_plain:,.0f}", f"{t_plain / t_cached:.1f}x",
               f"{prefill * 1e3:.1f}")
        print("  ".join(f"{c:>14}" for c in row), flush=True)


if __name__ == "__main__":
    main()
