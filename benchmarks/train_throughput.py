"""Training throughput: aiayn against HF MarianMTModel, same shapes, same batches, one run.

    python benchmarks/train_throughput.py                     # small and base, fp32 and bf16
    python benchmarks/train_throughput.py --configs small --precisions bf16 --rounds 3
    python benchmarks/train_throughput.py --quick             # a tiny model, seconds: checks it works
    python benchmarks/train_throughput.py --device cuda --configs base --max-tokens 25000   # on a GPU
    python benchmarks/train_throughput.py --threads 1 --clock cpu   # per CPU-second, on a busy machine
    python benchmarks/train_throughput.py --configs small --precisions bf16 --engines aiayn --profile
                                                              # + where the time goes, op by op

Batches: random sentence pairs of Multi30k's shape (aiayn.bench.multi30k_like_pairs: ~13 source and
~15 target tokens), length-bucketed into ~4k-token batches by aiayn's own token_batches, the same
batches for both engines (Marian gets them re-padded with its pad id, labels -100 at padding).

aiayn runs its real training step: translation_loss with label smoothing 0.1, the fused Adam of
make_optimizer, aiayn's autocast for bf16 (fp32 master weights); bf16-model is the Trainer's bf16
copy of the model with fp32 masters in the optimizer (aiayn.train.loop.Bf16Twin), compared with
HF's bf16 cell. HF runs what its Trainer runs:
MarianMTModel forward under the same autocast, the label-smoothed loss on its logits (Trainer's
LabelSmoother, here F.cross_entropy(label_smoothing=0.1)), fused AdamW (Trainer's default for
torch >= 2.8), weight decay 1e-4.

Each cell is a fresh process, run `--rounds` times, the fastest round kept. In it, after `--warmup`
steps, the timed steps run `--passes` times and the fastest pass counts: a fresh process's first
steps are slowed by the memory allocator growing its heap (small bf16 step, 1 thread: 25k page
faults a step over the first ten steps, ~6-9k a step for the next sixty, 4-90 ms of kernel time each;
a run at its thousandth step: ~800), and a second pass over the same batches finds the heap already
grown to their sizes, as a real run's steps do. Both engines get the same passes.
Reported per cell:
  target tok/s   real target tokens (EOS included, padding not) per second of training steps
  GFLOP/s, MFU   model FLOPs per second, and that against the peak matmul rate of the precision,
                 measured in this run ((n, n) @ (n, n), best of 5)
  peak RSS       the cell process's peak resident memory (model, optimizer, activations, libraries);
                 with --device cuda, the GPU memory its tensors took at most (torch.cuda.max_memory_allocated)

FLOPs are counted analytically, on real tokens only, the same count for both engines (so padding and
any work an engine spends on it lowers its MFU): a multiply-add is 2 FLOPs and a training step is
3x the forward pass (backward = 2x forward). Per sentence with s source and n target tokens, D
d_model, F d_ff, V vocabulary:
  encoder layer   2s(4D^2 + 2DF)                   Q,K,V,O projections and the FFN
                  + 4 s^2 D                        q k^T and (attention) v
  decoder layer   2n(4D^2 + 2D^2 + 2DF)            self Q,K,V,O; cross Q,O; FFN
                  + 2s(2D^2)                       cross K,V of the source
                  + 4D n(n+1)/2 + 4 n s D          causal self-attention (keys seen), cross-attention
  generator       2nDV
i.e. 6 x (parameters a token passes through) x tokens, plus attention. Embedding lookups count 0.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from pathlib import Path

import torch

from aiayn import bench
from aiayn.config import ModelConfig, TrainConfig, preset
from aiayn.data.batching import Batch, collate, token_batches
from aiayn.data.tokenizer import PAD

CONFIGS = {"small": dict(vocab_size=8000), "base": dict(vocab_size=8000), "multi30k": dict(vocab_size=8000),
           "tiny": dict(vocab_size=64)}
PRECISIONS = ("fp32", "bf16", "bf16-model")
HF_PRECISION = {"bf16-model": "bf16"}  # the HF cell a bf16-model row is compared with
ENGINES = ("aiayn", "aiayn-nokernels", "hf")  # aiayn-nokernels: AIAYN_KERNELS=0 (not run by default)
ENGINE_NAMES = {"aiayn": "aiayn", "aiayn-nokernels": "aiayn, no C kernels", "hf": "HF Marian"}


def model_config(name: str) -> ModelConfig:
    return preset(name, **CONFIGS[name])


def make_batches(cfg: ModelConfig, n_pairs: int, max_tokens: int, n_batches: int, seed: int) -> list[Batch]:
    pairs = bench.multi30k_like_pairs(n_pairs, cfg.vocab_size, seed)
    groups = token_batches(pairs, max_tokens, seed=seed)[:n_batches]
    return [collate([pairs[i] for i in g]) for g in groups]


def train_flops(cfg: ModelConfig, batch: Batch) -> float:
    """Model FLOPs of one training step on `batch`, real tokens only (see the module docstring)."""
    D, F, V = cfg.d_model, cfg.d_ff, cfg.target_vocab
    s = (batch.src != PAD).sum(1).double()      # (B,) source lengths
    n = (batch.tgt_out != PAD).sum(1).double()  # (B,) target lengths, EOS included
    enc = cfg.n_encoder_layers * (2 * s * (4 * D * D + 2 * D * F) + 4 * s * s * D)
    dec = cfg.n_decoder_layers * (2 * n * (6 * D * D + 2 * D * F) + 2 * s * 2 * D * D
                                  + 4 * D * n * (n + 1) / 2 + 4 * n * s * D)
    return 3.0 * float((enc + dec + 2 * n * D * V).sum())


# ------------------------------------------------------------------------------- the engines
def aiayn_step(cfg: ModelConfig, precision: str, device: str = "cpu"):
    from aiayn.model import build_model
    from aiayn.tasks.translation import translation_loss
    from aiayn.memory import keep_freed_memory
    from aiayn.train.loop import Bf16Twin, autocast, make_optimizer
    from aiayn.fast import for_training

    if device == "cpu":
        keep_freed_memory()  # as `aiayn train` does on a CPU
    tcfg = TrainConfig(max_steps=1, precision=precision, label_smoothing=0.1, device=device)
    torch.manual_seed(0)
    model = for_training(build_model(cfg).to(device).train(), precision, device)  # as the Trainer does
    optimizer = make_optimizer(model, tcfg)
    twin = Bf16Twin(model) if precision == "bf16-model" else None

    def step(batch: Batch) -> float:  # as Trainer.train_step, for one micro-batch
        optimizer.zero_grad(set_to_none=True)
        with autocast(tcfg) if twin is None else contextlib.nullcontext():
            loss = translation_loss(model if twin is None else twin.model, batch, tcfg.label_smoothing)
        loss.backward()
        if twin is not None:
            twin.collect_grads()
        value = loss.item()
        optimizer.step()
        if twin is not None:
            twin.sync()
        return value

    return step, lambda b: b.to(device)


def hf_step(cfg: ModelConfig, precision: str, device: str = "cpu"):
    import peers

    from aiayn.train.loop import autocast

    tcfg = TrainConfig(max_steps=1, precision=precision, device=device)
    model = peers.hf_marian(cfg).to(device).train()
    pad = model.config.pad_token_id
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.98), eps=1e-9,
                                  weight_decay=1e-4, fused=True)

    def convert(b: Batch):
        b = b.to(device)
        return (b.src.masked_fill(b.src == PAD, pad), (b.src != PAD).long(),
                b.tgt_in.masked_fill(b.tgt_in == PAD, pad), b.tgt_out.masked_fill(b.tgt_out == PAD, -100))

    def step(batch) -> float:
        src, src_mask, tgt_in, labels = batch
        optimizer.zero_grad(set_to_none=True)
        with autocast(tcfg):
            logits = model(input_ids=src, attention_mask=src_mask, decoder_input_ids=tgt_in).logits
            loss = bench.cross_entropy(logits, labels, 0.1)
        loss.backward()
        value = loss.item()
        optimizer.step()
        return value

    return step, convert


def run_cell(spec: dict) -> dict:
    if spec["engine"].startswith("aiayn"):  # as `aiayn train` runs (HF as its own users run it)
        from aiayn.fast.inference import TRAINING_PRIMITIVES, bound_primitive_caches

        bound_primitive_caches(TRAINING_PRIMITIVES)
    bench.set_threads(spec.get("threads"))
    cfg = model_config(spec["config"])
    n_batches = spec["warmup"] + spec["steps"]
    batches = make_batches(cfg, spec["pairs"], spec["max_tokens"], n_batches, spec["seed"])
    device = spec.get("device", "cpu")
    step, convert = (aiayn_step if spec["engine"].startswith("aiayn") else hf_step)(cfg, spec["precision"], device)
    inputs = [convert(b) for b in batches]
    for i in range(spec["warmup"]):
        step(inputs[i % len(inputs)])
    timed = [spec["warmup"] + i for i in range(spec["steps"])]
    clock = time.process_time if spec["clock"] == "cpu" else time.perf_counter
    seconds = float("inf")
    for _ in range(spec.get("passes", 1)):  # the fastest pass over the timed steps
        t0 = clock()
        for i in timed:
            loss = step(inputs[i % len(inputs)])
        seconds = min(seconds, clock() - t0)
    tokens = sum(batches[i % len(batches)].n_tokens for i in timed)
    flops = sum(train_flops(cfg, batches[i % len(batches)]) for i in timed)
    # (each step's loss.item() waits for the GPU: the clock stops after the last one's work)
    result = {"tok_s": tokens / seconds, "flops_s": flops / seconds, "seconds": seconds, "tokens": tokens,
              "loss": loss, "rss_gib": bench.peak_memory_gib(device)}
    if spec.get("profile"):  # the same steps again, under torch.profiler: self time per op
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for i in timed:
                step(inputs[i % len(inputs)])
        result["profile"] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
    return result


# ------------------------------------------------------------------------------------ driver
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--configs", default="small,base", help="comma-separated: small, base, multi30k, tiny")
    p.add_argument("--precisions", default="fp32,bf16")
    p.add_argument("--engines", default="aiayn,hf", help="aiayn, aiayn-nokernels (AIAYN_KERNELS=0), hf")
    p.add_argument("--steps", type=int, default=20, help="timed training steps per cell")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--max-tokens", type=int, default=4096, help="padded positions per batch")
    p.add_argument("--pairs", type=int, default=29_000, help="sentence pairs to draw batches from")
    p.add_argument("--passes", type=int, default=2,
                   help="passes over the timed steps in each cell's process, the fastest kept (default 2)")
    p.add_argument("--rounds", type=int, default=1, help="measure every cell this many times, keep the fastest")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's own choice)")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="cpu: per second of process CPU time (all threads), for a busy machine with --threads 1")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", action="store_true",
                   help="after the table, each cell's ops by self CPU time (torch.profiler, the timed steps again)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (peak memory is then the GPU's, allocated)")
    p.add_argument("--quick", action="store_true", help="tiny model, few steps: a check that it runs")
    args = p.parse_args(argv)
    if args.quick:
        args.configs, args.steps, args.warmup, args.max_tokens, args.pairs = "tiny", 2, 1, 256, 200
    if args.passes < 1 or args.steps < 1:
        p.error("--passes and --steps must be at least 1")
    configs, precisions = args.configs.split(","), args.precisions.split(",")
    engines = args.engines.split(",")
    for name in configs:
        if name not in CONFIGS:
            p.error(f"unknown config {name!r}")
    for pr in precisions:
        if pr not in PRECISIONS:
            p.error(f"unknown precision {pr!r}")
    for e in engines:
        if e not in ENGINES:
            p.error(f"unknown engine {e!r}")

    bench.set_threads(args.threads)
    gpu = args.device != "cpu"
    if error := bench.device_error(args.device, args.clock):
        p.error(error)
    print(bench.header("Training throughput: aiayn vs HF MarianMTModel", args.device))
    n = 256 if args.quick else 8192 if gpu else 2048
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    peak = bench.matmul_peaks(precisions, n, clock=clock, device=args.device)
    peaks = ", ".join(f"{p} {v / 1e9:,.0f} GFLOP/s" for p, v in peak.items() if v and p != "bf16-model")
    print(f"rates per {args.clock} second; matmul peak ({n}x{n}): {peaks or 'none measured'}")
    for name in configs:
        cfg = model_config(name)
        bs = make_batches(cfg, args.pairs, args.max_tokens, args.warmup + args.steps, args.seed)
        tok = sum(b.n_tokens for b in bs) / len(bs)
        src = sum(int((b.src != PAD).sum()) for b in bs) / sum(b.src.size(0) for b in bs)
        pad = sum(b.tgt_out.numel() - b.n_tokens for b in bs) / sum(b.tgt_out.numel() for b in bs)
        print(f"{name}: d_model {cfg.d_model}, d_ff {cfg.d_ff}, {cfg.n_heads} heads, "
              f"{cfg.n_encoder_layers}+{cfg.n_decoder_layers} layers, vocab {cfg.vocab_size}; batches: "
              f"{tok:,.0f} target tokens, {sum(b.src.size(0) for b in bs) / len(bs):.0f} sentences, "
              f"{src:.1f} source tokens a sentence, {pad:.1%} target padding")

    # HF has no bf16-model mode: those rows compare with HF's bf16 (autocast) cell
    cells = [dict(config=c, precision=HF_PRECISION.get(pr, pr) if e == "hf" else pr, engine=e)
             for c in configs for pr in precisions for e in engines if not bench.lacks(pr, args.device)]
    cells = [dict(t) for t in dict.fromkeys(tuple(cell.items()) for cell in cells)]
    results: dict[tuple, list[dict]] = {}
    script = Path(__file__).resolve()
    for r in range(args.rounds):
        for cell in (cells if r % 2 == 0 else cells[::-1]):  # alternate the order against drift
            spec = {**cell, "steps": args.steps, "warmup": args.warmup, "passes": args.passes,
                    "max_tokens": args.max_tokens, "pairs": args.pairs, "seed": args.seed,
                    "threads": args.threads, "clock": args.clock, "profile": args.profile, "device": args.device}
            results.setdefault(tuple(cell.values()), []).append(bench.run_cell(script, spec))

    rows = []
    for c in configs:
        for pr in precisions:
            hf = bench.best_of(results.get((c, HF_PRECISION.get(pr, pr), "hf"), [{"error": "not run"}]), "tok_s")
            if bench.lacks(pr, args.device):
                rows.append([c, pr, "all", f"not run: {bench.lacks(pr, args.device)}", "", "", "", ""])
                continue
            for e in engines:
                if (c, pr, e) not in results:  # HF in a bf16-model row
                    continue
                res = bench.best_of(results[(c, pr, e)], "tok_s")
                if "error" in res:
                    rows.append([c, pr, ENGINE_NAMES[e], "failed: " + res["error"], "", "", "", ""])
                    continue
                ratio = f"{res['tok_s'] / hf['tok_s']:.2f}x" if "error" not in hf else ""
                rows.append([c, pr, ENGINE_NAMES[e], bench.fmt(res["tok_s"]), bench.fmt(res["flops_s"] / 1e9),
                             f"{100 * res['flops_s'] / peak[pr]:.3g}%", f"{res['rss_gib']:.2f}", ratio])
    print()
    memory = "peak GPU GiB" if gpu else "peak RSS GiB"
    print(bench.table(["config", "precision", "engine", "target tok/s", "GFLOP/s", "MFU", memory, "vs HF"], rows))
    for cell, runs in results.items():
        res = bench.best_of(runs, "tok_s")
        if "profile" in res:
            print(f"\nprofile of {' '.join(map(str, cell))} ({args.steps} steps):\n{res['profile']}")
    return 0


if __name__ == "__main__":
    bench.script_main(main, run_cell)
