"""Saving and loading, in one place: model directories and training checkpoints.

A model directory holds `model.safetensors` (weights; its metadata carries the config, the task and
a fingerprint of the tokenizer) and the tokenizer. A training checkpoint is a model directory plus
`trainer.safetensors` (optimizer tensors, RNG states) and `trainer.json` (step, epoch, data position,
optimizer hyper-parameters, GradScaler state...). Nothing is ever unpickled.

Crash safety. A checkpoint `X` is written to `X.tmp`, fsynced, then renamed to `X`: the rename is
the commit. Overwriting an existing `X` goes through `X.old`:

    write X.tmp, fsync  ->  rename X -> X.old  ->  rename X.tmp -> X  ->  delete X.old

`X.old` exists only once `X.tmp` is complete, so `recover()` can finish any interrupted swap: with
no `X`, a complete `X.tmp` is promoted (else `X.old` is restored); a leftover `X.old` beside `X`, a
partial `X.tmp` and a half-deleted `X.del` are removed.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file, save_model
from safetensors.torch import load_model as load_safetensors_into

from aiayn.config import ModelConfig, ViTConfig
from aiayn.errors import InputError

MODEL_FILE, TRAINER_TENSORS, TRAINER_JSON = "model.safetensors", "trainer.safetensors", "trainer.json"
TMP, OLD, DEL = ".tmp", ".old", ".del"
CKPT_PREFIX = "step-"  # a run directory's checkpoints: step-00001000, ...
SHIPPED = {"translation": "en-de", "lm": "shakespeare-char", "vit": "mnist-vit", "image-gpt": "mnist-pixels"}


class CheckpointError(InputError):
    """A checkpoint or model directory that cannot be used: the message says why, in one line."""


def _first_line(e: BaseException, n: int = 160) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:n] if text else type(e).__name__


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    for f in path.iterdir():
        if f.is_dir():
            _fsync_tree(f)
            continue
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    _fsync_dir(path)


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + TMP)
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def remove_tree(path: Path) -> None:
    """Delete a directory so that a crash midway never leaves a half-deleted one under its name."""
    path = Path(path)
    doomed = path.with_name(path.name + DEL)
    if doomed.exists():
        shutil.rmtree(doomed)
    os.replace(path, doomed)
    shutil.rmtree(doomed)


# --------------------------------------------------------------------------------- model dirs
def tokenizer_digest(directory: Path, tokenizer) -> str:
    """The SHA-256 of the tokenizer file(s) in `directory`: which vocabulary a model was trained with."""
    h = hashlib.sha256()
    for name in getattr(tokenizer, "files", (tokenizer.filename,)):
        h.update((Path(directory) / name).read_bytes())
    return h.hexdigest()


def write_model(directory: Path, model: torch.nn.Module, tokenizer, task: str, extra: dict | None = None) -> None:
    """Write weights (+ config, task, tokenizer fingerprint) and tokenizer into an existing, empty directory."""
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            raise CheckpointError(f"refusing to save non-finite weights ({name})")
    tokenizer.save(directory)
    meta = {"config": json.dumps(model.cfg.to_dict()), "task": task, "extra": json.dumps(extra or {}),
            "tokenizer_sha256": tokenizer_digest(directory, tokenizer)}
    save_model(model, str(directory / MODEL_FILE), metadata=meta)


def _read_meta(directory: Path) -> dict:
    directory = Path(directory)
    path = directory / MODEL_FILE
    if not directory.exists():
        raise CheckpointError(f"{directory}: no such model directory")
    if not path.is_file():
        raise CheckpointError(f"{directory}: not a model directory (no {MODEL_FILE})")
    try:
        with safe_open(str(path), "pt") as f:
            meta = dict(f.metadata() or {})
        config = json.loads(meta["config"])
        kind = ViTConfig if isinstance(config, dict) and config.get("kind") == "vit" else ModelConfig
        meta["config"] = kind.from_dict(config)
        meta["extra"] = json.loads(meta.get("extra", "{}"))
        if "task" not in meta:
            raise KeyError("task")
    except (SafetensorError, OSError, KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: corrupt or not an aiayn model ({_first_line(e, 120)})") from None
    return meta


def read_model_meta(directory: Path) -> tuple[ModelConfig | ViTConfig, str, dict]:
    meta = _read_meta(directory)
    return meta["config"], meta["task"], meta["extra"]


def load_model_dir(directory: Path | str, device="cpu"):
    """-> (model in eval mode, tokenizer, task name, extra metadata)."""
    from aiayn.data.images import Labels
    from aiayn.data.pixels import PixelTokenizer
    from aiayn.data.tokenizer import load_tokenizer
    from aiayn.model import build_model
    from aiayn.model.vit import VisionTransformer

    directory = Path(directory)
    meta = _read_meta(directory)
    cfg = meta["config"]
    try:  # a ViT keeps its class names, an image model its palette, a text model its tokenizer
        if isinstance(cfg, ViTConfig):
            tokenizer = Labels.load(directory)
        elif (directory / PixelTokenizer.filename).is_file():
            tokenizer = PixelTokenizer.load(directory)
        else:
            tokenizer = load_tokenizer(directory)
    except (FileNotFoundError, OSError, RuntimeError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{directory}: unreadable tokenizer ({_first_line(e, 120)})") from None
    expected = cfg.n_classes if isinstance(cfg, ViTConfig) else cfg.target_vocab
    if tokenizer.vocab_size != expected:
        raise CheckpointError(f"{directory}: tokenizer has {tokenizer.vocab_size} tokens but the model "
                              f"was built for {expected}")
    digest = meta.get("tokenizer_sha256")  # absent in models written before it was recorded
    if digest and digest != tokenizer_digest(directory, tokenizer):
        raise CheckpointError(f"{directory}: the tokenizer is not the one these weights were trained with")
    model = VisionTransformer(cfg) if isinstance(cfg, ViTConfig) else build_model(cfg)
    if "lora" in meta["extra"]:  # a LoRA run's checkpoint: base + adapter, merged here (aiayn.lora)
        from aiayn.lora import LoRAConfig, add_lora, merge

        add_lora(model, LoRAConfig.from_dict(meta["extra"].pop("lora")))
        load_weights(model, directory / MODEL_FILE)
        merge(model).requires_grad_(True)  # a plain model now (its metadata no longer says "lora")
    else:
        load_weights(model, directory / MODEL_FILE)
    return model.to(device).eval(), tokenizer, meta["task"], meta["extra"]


def load_weights(model: torch.nn.Module, path: Path) -> None:
    try:
        missing, unexpected = load_safetensors_into(model, str(path), strict=False)
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"{path}: weights do not fit this model ({_first_line(e)})") from None
    if missing or unexpected:
        raise CheckpointError(f"{path}: weights do not fit this model (missing {sorted(missing)[:3]}, "
                              f"unexpected {sorted(unexpected)[:3]})")


# ------------------------------------------------------------------------- training checkpoints
def _flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer state dict -> (tensors for safetensors, the rest for JSON)."""
    tensors, scalars, groups = {}, {}, []
    for idx, s in state["state"].items():
        for k, v in s.items():
            if torch.is_tensor(v):
                tensors[f"optim.{idx}.{k}"] = v.contiguous()
            else:
                scalars[f"{idx}.{k}"] = v
    for i, g in enumerate(state["param_groups"]):  # e.g. a tensor lr (capturable optimizers)
        groups.append({k: v for k, v in g.items() if not torch.is_tensor(v)})
        tensors.update({f"group.{i}.{k}": v.contiguous() for k, v in g.items() if torch.is_tensor(v)})
    return tensors, {"param_groups": groups, "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict, current: list[dict]) -> dict:
    state: dict[int, dict] = {}
    groups = [dict(g) for g in meta["param_groups"]]
    for key, v in tensors.items():
        if key.startswith("optim."):
            _, idx, k = key.split(".", 2)
            state.setdefault(int(idx), {})[k] = v
        elif key.startswith("group."):
            _, i, k = key.split(".", 2)
            groups[int(i)][k] = v
    for key, v in meta["scalars"].items():
        idx, k = key.split(".", 1)
        state.setdefault(int(idx), {})[k] = v
    for saved, now in zip(groups, current):  # JSON has no tuples: betas=(0.9, 0.98) came back a list
        for k, v in saved.items():
            if isinstance(now.get(k), tuple) and isinstance(v, list):
                saved[k] = tuple(v)
    return {"state": state, "param_groups": groups}


def _rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    """Every random number generator a run may draw from: torch (CPU, CUDA), Python, NumPy."""
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    meta: dict = {"python": random.getstate()}
    try:
        import numpy as np
    except ImportError:  # pragma: no cover
        return tensors, meta
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    tensors["rng.numpy"] = torch.from_numpy(keys.astype(np.int64))
    meta["numpy"] = [kind, int(pos), int(has_gauss), float(gauss)]
    return tensors, meta


def _set_rng_state(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[f"rng.cuda.{i}"] for i in range(sum(k.startswith("rng.cuda.") for k in tensors))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    if "python" in meta:
        version, internal, gauss = meta["python"]
        random.setstate((version, tuple(internal), gauss))
    if "numpy" in meta and "rng.numpy" in tensors:
        import numpy as np

        kind, pos, has_gauss, gauss = meta["numpy"]
        np.random.set_state((kind, tensors["rng.numpy"].numpy().astype(np.uint32), pos, has_gauss, gauss))


def save_checkpoint(directory: Path, model, tokenizer, task: str, optimizer, trainer_state: dict,
                    extra: dict | None = None, scaler=None) -> None:
    """Atomically write a full training checkpoint to `directory` (replacing any old one).

    On any error (a full disk, non-finite weights) the partial copy is removed and whatever was
    saved before is left as it was.
    """
    def write(tmp: Path) -> None:
        write_model(tmp, model, tokenizer, task, extra)
        tensors, optim_meta = _flatten_optimizer(optimizer.state_dict())
        rng_tensors, rng_meta = _rng_state()
        save_file({**tensors, **rng_tensors}, str(tmp / TRAINER_TENSORS))
        state = {**trainer_state, "optimizer": optim_meta, "rng": rng_meta,
                 "scaler": scaler.state_dict() if scaler is not None else {}}
        (tmp / TRAINER_JSON).write_text(json.dumps(state))

    replace_directory(directory, write)


def replace_directory(directory: Path, write) -> None:
    """(Re)write `directory` atomically: write(tmp) fills `directory.tmp`, which is fsynced, then
    swapped in (through `directory.old` when there is an old one, removed last). A crash at any point
    leaves the old directory or the new one (`recover` finishes an interrupted swap); an error in
    write() removes the partial copy and leaves the old one as it was."""
    directory = Path(directory)
    _recover_one(directory)
    tmp = directory.with_name(directory.name + TMP)
    tmp.mkdir(parents=True)
    try:
        write(tmp)
        _fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if directory.exists():  # never delete the old one before the new one is complete
        old = directory.with_name(directory.name + OLD)
        os.replace(directory, old)
        os.replace(tmp, directory)  # killed just before this line? recover() promotes a complete tmp
        _fsync_dir(directory.parent)
        shutil.rmtree(old)
    else:
        os.replace(tmp, directory)
        _fsync_dir(directory.parent)


def _complete(directory: Path) -> bool:
    return all((directory / f).is_file() for f in (MODEL_FILE, TRAINER_TENSORS, TRAINER_JSON))


def load_checkpoint(directory: Path, model, optimizer, scaler=None) -> dict:
    """Restore weights, optimizer, GradScaler and RNG states in place; return the trainer state.

    All files are read, and the model config checked, before anything is changed.
    """
    directory = Path(directory)
    meta = _read_meta(directory)
    if meta["config"] != model.cfg:
        diff = sorted(k for k, v in meta["config"].to_dict().items() if getattr(model.cfg, k) != v)
        raise CheckpointError(f"{directory}: saved for a different model (differs in {', '.join(diff)})")
    try:
        tensors = load_file(str(directory / TRAINER_TENSORS))
        state = json.loads((directory / TRAINER_JSON).read_text())
        optim_state = _unflatten_optimizer(tensors, state.pop("optimizer"), optimizer.param_groups)
        rng, scaler_state = state.pop("rng", {}), state.pop("scaler", {})
        if "rng.torch" not in tensors:
            raise KeyError("rng.torch")
    except (SafetensorError, OSError, ValueError, KeyError, IndexError, TypeError) as e:
        raise CheckpointError(f"{directory}: corrupt training state ({_first_line(e, 120)})") from None
    load_weights(model, directory / MODEL_FILE)
    try:
        optimizer.load_state_dict(optim_state)
    except (ValueError, KeyError, RuntimeError) as e:
        raise CheckpointError(f"{directory}: optimizer state does not fit ({_first_line(e)})") from None
    if scaler is not None and scaler_state:
        scaler.load_state_dict(scaler_state)
    _set_rng_state(tensors, rng)
    return state


def _recover_one(final: Path) -> None:
    """Bring `final` (and its .tmp/.old/.del companions) back to a consistent state."""
    tmp, old, doomed = (final.with_name(final.name + s) for s in (TMP, OLD, DEL))
    if old.exists() and not final.exists():
        # killed between the two renames: tmp is complete (old exists only after tmp was fsynced)
        os.replace(tmp if tmp.is_dir() and _complete(tmp) else old, final)
    for leftover in (old, tmp, doomed):
        if leftover.is_dir():
            shutil.rmtree(leftover)
        elif leftover.exists():
            leftover.unlink()


def recover(run_dir: Path) -> None:
    """Finish or undo every checkpoint write, swap or deletion that a crash interrupted."""
    run_dir = Path(run_dir)
    finals = {p.with_suffix("") for s in (TMP, OLD, DEL) for p in run_dir.glob("*" + s)}
    for final in sorted(finals):
        _recover_one(final)


# ------------------------------------------------------------------------- runs and models
def checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (a partial one is never under its final name)."""
    found = [p for p in Path(run_dir).glob(CKPT_PREFIX + "*")
             if p.is_dir() and p.suffix == "" and p.name[len(CKPT_PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(CKPT_PREFIX):]))


def best_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint with the best validation score, as the newest checkpoint records it.

    The record lives in the newest checkpoint's trainer.json (no separate pointer file that a crash
    could leave out of step); without one, the newest checkpoint.
    """
    found = checkpoints(run_dir)
    if not found:
        return None
    try:
        best = json.loads((found[-1] / TRAINER_JSON).read_text()).get("best")
    except (OSError, ValueError, AttributeError):
        best = None
    if isinstance(best, dict) and (Path(run_dir) / str(best.get("checkpoint"))).is_dir():
        return Path(run_dir) / best["checkpoint"]
    return found[-1]


def model_dir(path: str | Path | None, task: str = "translation") -> Path:
    """The model directory a user means: `path` (a model directory, or a run directory: its best
    checkpoint), or, without one, the model of `task` shipped with aiayn. CheckpointError if none."""
    if path is None:
        from aiayn.data.corpus import ASSETS

        shipped = ASSETS / "models" / SHIPPED[task]
        if not shipped.is_dir():
            kind = "language" if task == "lm" else task
            raise CheckpointError(f"no shipped {kind} model in this install; train one (aiayn train ...) "
                                  "and pass its run directory")
        return shipped
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such model or run directory")
    if (path / MODEL_FILE).is_file():
        return path
    best = best_checkpoint(path)
    if best is None:
        raise CheckpointError(f"{path}: neither a model directory nor a run directory with checkpoints")
    return best


def load_model(path: str | Path | None, task: str, device="cpu"):
    """`model_dir(path, task)` loaded: -> (model in eval mode, tokenizer, extra metadata, its directory).
    CheckpointError if it holds a model of another task."""
    directory = model_dir(path, task)
    model, tokenizer, found, extra = load_model_dir(directory, device)
    if found != task:
        raise CheckpointError(f"{directory} holds a {found} model, not a {task} model")
    return model, tokenizer, extra, directory


def load_translation_models(paths: list, device="cpu"):
    """One translation model (paths empty: the shipped one), or several as an Ensemble (the mean of
    their probabilities), which needs one vocabulary. -> (model, tokenizer, extra, directories)."""
    from aiayn.model.ensemble import Ensemble

    loaded = [load_model(p, "translation", device) for p in (paths or [None])]
    model, tokenizer, extra, first = loaded[0]
    if len(loaded) > 1:
        digest = tokenizer_digest(first, tokenizer)
        for _, other, _, directory in loaded[1:]:
            if tokenizer_digest(directory, other) != digest:
                raise CheckpointError(f"{directory}: its tokenizer is not {first}'s; an ensemble needs models "
                                      "of one vocabulary")
        model = Ensemble([m for m, _, _, _ in loaded])
    return model, tokenizer, extra, [d for _, _, _, d in loaded]
