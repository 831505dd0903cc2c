"""Checkpoint averaging (§6.1: "averaging the last 5 checkpoints, written at 10-minute intervals")."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from aiayn.checkpoint import (MODEL_FILE, TRAINER_JSON, CheckpointError, checkpoints, load_model_dir,
                              read_model_meta, replace_directory, write_model)
from aiayn.decode.beam import MAX_ALPHA


def average_checkpoints(run_dir: Path, last: int, out: Path, alpha: float | None = None) -> list[Path]:
    """Average the weights of the `last` newest checkpoints of `run_dir` into a model directory `out`
    -> the checkpoints averaged (fewer than `last` where the run has fewer).

    alpha: a length penalty to record as the model's own default for `aiayn translate` and
    `aiayn evaluate` (the one chosen on validation data; without it, theirs: 0.6)."""
    found = checkpoints(run_dir)
    if not found:
        raise CheckpointError(f"{run_dir}: no checkpoints to average")
    if last < 1:
        raise CheckpointError("--last must be >= 1")
    if alpha is not None and not 0 <= alpha <= MAX_ALPHA:  # (translate would overflow with the recorded one)
        raise CheckpointError(f"--alpha must be >= 0 and <= {MAX_ALPHA:g}, got {alpha:g}")
    _check_out(Path(out), Path(run_dir))
    chosen = found[-last:]
    model, tokenizer, task, extra = load_model_dir(chosen[-1])
    total: dict[str, torch.Tensor] = {}
    lora = "lora" in read_model_meta(chosen[-1])[2]  # a LoRA run: average the merged weights
    for path in chosen:
        weights = load_model_dir(path)[0].state_dict() if lora else load_file(str(path / MODEL_FILE))
        for name, t in weights.items():
            total[name] = total.get(name, 0) + t.double()
    state = model.state_dict()
    for name, t in total.items():
        if name not in state or state[name].shape != t.shape:
            raise CheckpointError(f"{path}: checkpoints of different models cannot be averaged ({name})")
        state[name].copy_(t / len(chosen))
    extra = {**extra, "averaged": [p.name for p in chosen], **({"alpha": alpha} if alpha is not None else {})}
    replace_directory(out, lambda tmp: write_model(tmp, model, tokenizer, task, extra))
    return chosen


def _check_out(out: Path, run_dir: Path) -> None:
    """`out` may be new, an empty directory, or a model directory to replace (an earlier average);
    never the run itself or anything inside it, a checkpoint, a file, or a directory of other things."""
    run = run_dir.resolve()
    if out.resolve() == run or run in out.resolve().parents:
        raise CheckpointError(f"--out {out} is inside the run directory {run_dir}: write the average elsewhere")
    if not out.exists():
        return
    if not out.is_dir():
        raise CheckpointError(f"--out {out}: exists and is not a directory")
    if any(out.iterdir()) and (not (out / MODEL_FILE).is_file() or (out / TRAINER_JSON).exists()):
        raise CheckpointError(f"--out {out}: exists and is not an empty directory or an averaged model: "
                              "nothing was written")
