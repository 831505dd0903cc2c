"""A run directory's settings (run.json) and how a resumed run takes them up again.

A run directory holds run.json (the model and training configs and the run's own data settings,
written by the Trainer), metrics.jsonl and its checkpoints (aiayn.checkpoint). `--resume` continues
the run with its own settings: only the stopping point may move, and the precision where this
machine cannot run the run's own.
"""

from __future__ import annotations

import json
from pathlib import Path

from aiayn.capability import PrecisionError, check_precision, choose_precision
from aiayn.checkpoint import CheckpointError, checkpoints, recover
from aiayn.config import ModelConfig, TrainConfig, ViTConfig

STOPS = ("max_steps", "max_epochs", "max_minutes", "max_cpu_minutes")  # what a resumed run may change


def read_settings(run_dir: Path | str) -> dict:
    """The settings of the run in `run_dir` (its run.json), after finishing or undoing a checkpoint
    swap that a crash interrupted. Several ranks: rank 0 repairs, the others then read."""
    from aiayn.train.distributed import main_first

    run_dir = Path(run_dir)
    run_json = run_dir / "run.json"
    if not run_json.is_file():
        raise CheckpointError(f"{run_dir}: nothing to resume (no run.json)")
    with main_first():
        recover(run_dir)
    try:
        return json.loads(run_json.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{run_json}: not a run's settings ({e})") from None


def resumed(run_dir: Path | str, settings: dict, stop: dict, precision: str | None = None):
    """The run to continue: -> (its model config, TrainConfig, a note for the user or None).

    `stop` holds new stopping points (STOPS). The run keeps its precision where this machine runs it
    natively; `precision` (not None or "auto") changes it (every precision keeps fp32 master weights,
    so a run may change it between legs); a precision this machine lacks (a run started on another
    machine) gives way to auto's choice, and the note says so."""
    if not checkpoints(run_dir):
        raise CheckpointError(f"{run_dir}: nothing to resume (no checkpoint)")
    tcfg = TrainConfig(**{**settings["train"], "betas": tuple(settings["train"]["betas"]),
                          **{k: v for k, v in stop.items() if k in STOPS and v is not None}})
    note = None
    if precision not in (None, "auto"):
        tcfg = tcfg.replace(precision=choose_precision(precision, tcfg.device, "train")[0])
    else:
        try:
            check_precision(tcfg.precision, tcfg.device)
        except PrecisionError as e:
            chosen = choose_precision("auto", tcfg.device, "train")[0]
            note = f"resuming in {chosen}, not the run's {tcfg.precision} ({e})"
            tcfg = tcfg.replace(precision=chosen)
    kind = ViTConfig if settings.get("task") == "vit" else ModelConfig
    return kind.from_dict(settings["model"]), tcfg, note


def newest_tokenizer(run_dir: Path | str):
    """The tokenizer of the run's newest checkpoint (a text task's: its vocabulary never changes)."""
    from aiayn.data.tokenizer import load_tokenizer

    return load_tokenizer(checkpoints(run_dir)[-1])
