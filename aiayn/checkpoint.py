"""Saving and loading, in one place: model directories and training checkpoints.

A model directory holds `model.safetensors` (weights; its metadata carries the config and the
task) and the tokenizer. A training checkpoint is a model directory plus `trainer.safetensors`
(optimizer tensors, RNG states) and `trainer.json` (step, epoch, data position, schedule...).
Everything is written to a temporary directory, fsynced, then renamed into place, so a crash at
any moment leaves the previous checkpoint intact. Nothing is ever unpickled.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, safe_open, save_file, save_model

from aiayn.config import ModelConfig

MODEL_FILE, TRAINER_TENSORS, TRAINER_JSON = "model.safetensors", "trainer.safetensors", "trainer.json"


class CheckpointError(ValueError):
    """A checkpoint or model directory that cannot be used: the message says why, in one line."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    for f in path.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    _fsync_dir(path)


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


# --------------------------------------------------------------------------------- model dirs
def write_model(directory: Path, model: torch.nn.Module, tokenizer, task: str, extra: dict | None = None) -> None:
    """Write weights (+ config, task) and tokenizer into an existing, empty directory."""
    meta = {"config": json.dumps(model.cfg.to_dict()), "task": task, "extra": json.dumps(extra or {})}
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            raise CheckpointError(f"refusing to save non-finite weights ({name})")
    save_model(model, str(directory / MODEL_FILE), metadata=meta)
    tokenizer.save(directory)


def read_model_meta(directory: Path) -> tuple[ModelConfig, str, dict]:
    path = Path(directory) / MODEL_FILE
    if not Path(directory).exists():
        raise CheckpointError(f"{directory}: no such model directory")
    if not path.is_file():
        raise CheckpointError(f"{directory}: not a model directory (no {MODEL_FILE})")
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        return ModelConfig.from_dict(json.loads(meta["config"])), meta["task"], json.loads(meta.get("extra", "{}"))
    except (SafetensorError, OSError, KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: corrupt or not an aiayn model ({str(e).splitlines()[0][:120]})") from None


def load_model_dir(directory: Path | str, device="cpu"):
    """-> (model in eval mode, tokenizer, task name, extra metadata)."""
    from aiayn.data.tokenizer import load_tokenizer
    from aiayn.model import build_model

    directory = Path(directory)
    cfg, task, extra = read_model_meta(directory)
    model = build_model(cfg)
    load_weights(model, directory / MODEL_FILE)
    try:
        tokenizer = load_tokenizer(directory)
    except (FileNotFoundError, OSError, RuntimeError) as e:
        raise CheckpointError(f"{directory}: unreadable tokenizer ({str(e).splitlines()[0][:120]})") from None
    if tokenizer.vocab_size != cfg.target_vocab:
        raise CheckpointError(f"{directory}: tokenizer has {tokenizer.vocab_size} tokens but the model "
                              f"was built for {cfg.target_vocab}")
    return model.to(device).eval(), tokenizer, task, extra


def load_weights(model: torch.nn.Module, path: Path) -> None:
    try:
        missing, unexpected = load_model(model, str(path), strict=False)
    except (SafetensorError, OSError, RuntimeError) as e:
        raise CheckpointError(f"{path}: weights do not fit this model "
                              f"({str(e).splitlines()[0][:160]})") from None
    if missing or unexpected:
        raise CheckpointError(f"{path}: weights do not fit this model (missing {sorted(missing)[:3]}, "
                              f"unexpected {sorted(unexpected)[:3]})")


# ------------------------------------------------------------------------- training checkpoints
def _flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for idx, s in state["state"].items():
        for k, v in s.items():
            if torch.is_tensor(v):
                tensors[f"optim.{idx}.{k}"] = v.contiguous()
            else:
                scalars[f"{idx}.{k}"] = v
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        if key.startswith("optim."):
            _, idx, k = key.split(".", 2)
            state.setdefault(int(idx), {})[k] = v
    for key, v in meta["scalars"].items():
        idx, k = key.split(".", 1)
        state.setdefault(int(idx), {})[k] = v
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(directory: Path, model, tokenizer, task: str, optimizer, trainer_state: dict,
                    extra: dict | None = None) -> None:
    """Atomically write a full training checkpoint to `directory` (replacing any old one)."""
    directory = Path(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    write_model(tmp, model, tokenizer, task, extra)
    tensors, optim_meta = _flatten_optimizer(optimizer.state_dict())
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    save_file(tensors, str(tmp / TRAINER_TENSORS))
    (tmp / TRAINER_JSON).write_text(json.dumps({**trainer_state, "optimizer": optim_meta}))
    _fsync_tree(tmp)
    if directory.exists():  # never delete the old one before the new one is complete
        old = directory.with_name(directory.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(directory, old)
        os.replace(tmp, directory)
        shutil.rmtree(old)
    else:
        os.replace(tmp, directory)
    _fsync_dir(directory.parent)


def load_checkpoint(directory: Path, model, optimizer) -> dict:
    """Restore weights, optimizer and RNG states in place; return the trainer state."""
    directory = Path(directory)
    load_weights(model, directory / MODEL_FILE)
    try:
        tensors = load_file(str(directory / TRAINER_TENSORS))
        state = json.loads((directory / TRAINER_JSON).read_text())
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{directory}: corrupt training state ({str(e).splitlines()[0][:120]})") from None
    try:
        optimizer.load_state_dict(_unflatten_optimizer(tensors, state.pop("optimizer")))
    except (ValueError, KeyError, RuntimeError) as e:
        raise CheckpointError(f"{directory}: optimizer state does not fit ({e})") from None
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    return state


def recover(run_dir: Path) -> None:
    """Finish or undo a checkpoint swap that a crash interrupted (see save_checkpoint)."""
    for old in Path(run_dir).glob("*.old"):
        final = old.with_name(old.name[: -len(".old")])
        if final.exists():
            shutil.rmtree(old)
        else:
            os.replace(old, final)
    for tmp in Path(run_dir).glob("*.tmp"):
        shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()
