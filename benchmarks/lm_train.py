"""Language-model training: aiayn at nanoGPT's CPU configuration on Tiny Shakespeare, beside nanoGPT.

    python benchmarks/lm_train.py                   # the full run (2000 steps): target < 38 s
    python benchmarks/lm_train.py --precision fp32  # the same in fp32
    python benchmarks/lm_train.py --quick           # 50 steps: checks that it works

The configuration is the `shakespeare-cpu` preset (aiayn/tasks/lm.py), i.e. nanoGPT's README command
for a CPU: 4 layers, 4 heads, d_model 128, context 64, batch 12, 2000 steps, dropout 0, AdamW
(0.9, 0.99), weight decay 0.1, lr 1e-3 warmed up over 100 steps then cosine-decayed to 1e-4,
gradients clipped at 1. Characters are tokens; the first 90% of the text trains, the last 10%
validates. The run is the one `aiayn train lm` makes: the shared Trainer, into a temporary run
directory, validating and checkpointing once, at the end.

Reported:
  wall s         the whole Trainer.run: 2000 steps, the final validation, the checkpoint and plot
  cpu s          the CPU time of the same (all threads): on a busy machine, the steadier figure
  tokens/s       training tokens (steps x 12 x 64) per wall second
  val loss       nanoGPT's estimate: mean loss over --eval-iters random batches of 12 x 64 from the
                 validation text (nanoGPT's train.py default is 200; its README CPU command uses 20),
                 +- its standard error (that of a 20-batch estimate is sqrt(10) times larger)
  val loss, all  the loss over the whole validation text tiled by windows (what the CLI reports):
                 the value such estimates scatter around, so the target (val loss <= 1.89 in under
                 half nanoGPT's wall time) is judged on it
The nanoGPT figures are those of /work/shared/PEERS.md, measured on this kind of machine (2 cores):
its run validated every 250 steps (20 batches of train and val each), ours validates once.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from aiayn.data.corpus import SHAKESPEARE, read_text
from aiayn.model import build_model
from aiayn.tasks.lm import PRESETS, LMTask, lm_loss, train_tokenizer
from aiayn.train.loop import Trainer, autocast

NANOGPT = {"wall_s": 77.0, "val_loss": 1.8857, "tok_s": 24_000}  # PEERS.md: 68-77 s, ~24k tok/s
TARGET_LOSS, TARGET_WALL = 1.89, NANOGPT["wall_s"] / 2


@torch.no_grad()
def nanogpt_val_loss(model, task: LMTask, cfg, eval_iters: int, seed: int = 1337) -> tuple[float, float]:
    """nanoGPT's estimate_loss() on the val split: the mean of eval_iters batch losses, each batch
    batch_size random windows (here from a fixed seed, so that runs compare); and its standard error."""
    g = torch.Generator().manual_seed(seed)
    model.eval()
    losses = []
    with autocast(cfg):
        for _ in range(eval_iters):
            starts = torch.randint(0, len(task.val) - task.context, (task.batch_size,), generator=g)
            x, y = task.windows(starts, task.val)
            losses.append(lm_loss(model, x, y).item())
    losses = torch.tensor(losses, dtype=torch.float64)
    return losses.mean().item(), (losses.std() / len(losses) ** 0.5).item() if len(losses) > 1 else 0.0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--precision", choices=["fp32", "bf16"], help="default: the preset's (bf16)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's, one per core)")
    p.add_argument("--eval-iters", type=int, default=200)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="50 steps, 20 eval batches")
    args = p.parse_args()
    if args.quick:
        args.steps, args.eval_iters = 50, 20
    if args.threads:
        torch.set_num_threads(args.threads)

    model_cfg, train_cfg = PRESETS["shakespeare-cpu"]
    changes = {"max_steps": args.steps, "eval_every": args.steps, "seed": args.seed}
    if args.precision:
        changes["precision"] = args.precision
    train_cfg = train_cfg.replace(**changes)
    text = read_text(SHAKESPEARE)
    tokenizer = train_tokenizer("char", text)
    model_cfg = model_cfg.replace(vocab_size=tokenizer.vocab_size, max_len=train_cfg.context)
    task = LMTask.from_text(text, tokenizer, train_cfg.batch_size, train_cfg.context)
    torch.manual_seed(train_cfg.seed)
    model = build_model(model_cfg)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"aiayn shakespeare-cpu: {n_params / 1e6:.2f}M parameters, {train_cfg.precision}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"{len(task.train):,} train / {len(task.val):,} val characters", flush=True)

    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(task, model, tokenizer, train_cfg, run_dir)
        t0, c0 = time.perf_counter(), time.process_time()
        summary = trainer.run(progress=False)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    tokens = summary["step"] * train_cfg.batch_size * train_cfg.context
    est, err = nanogpt_val_loss(model, task, train_cfg, args.eval_iters)

    rows = [("aiayn", f"{wall:.1f}", f"{cpu:.1f}", f"{summary['step']}", f"{tokens / wall:,.0f}", f"{est:.4f} +- {err:.4f}",
             f"{summary['val_loss']:.4f}"),
            ("nanoGPT (PEERS.md)", f"{NANOGPT['wall_s']:.0f}", "-", "2000", f"~{NANOGPT['tok_s']:,}",
             f"{NANOGPT['val_loss']:.4f}", "-")]
    head = ("", "wall s", "cpu s", "iters", "tokens/s", f"val loss ({args.eval_iters} batches)", "val loss, all")
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]
    for r in [head] + rows:
        print("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))))
    if args.steps == 2000:  # judged on the exact loss, which the estimates (nanoGPT's too) scatter around
        ok = summary["val_loss"] <= TARGET_LOSS and wall < TARGET_WALL
        print(f"target: val loss <= {TARGET_LOSS} in under {TARGET_WALL:.1f} s (half nanoGPT's wall): "
              f"{'met' if ok else 'NOT met'}")


if __name__ == "__main__":
    main()
