"""Fine-tuning a trained model: full (`--init-from`, optionally `--freeze`) or LoRA (aiayn.lora).

What the `train` commands and the serving/decoding commands call; the CLI only parses the options.
A run records its fine-tuning in run.json and in every checkpoint's metadata ("init_from", "freeze",
"lora"), so that --resume rebuilds the same trainable model. A LoRA run's checkpoints hold the whole
model (base + adapter, unmerged), so resuming needs nothing else; at its end (and on request) the
best checkpoint's adapter is written alone to RUN_DIR/adapter.safetensors.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from torch import nn

from aiayn import lora
from aiayn.errors import InputError
from aiayn.lora import AdapterError, LoRAConfig


FREEZABLE = ("embeddings", "encoder", "decoder")


class FinetuneError(InputError):
    """A fine-tuning request that cannot be met: one line."""


def load_base(path: Path | str, task: str):
    """The model to start from: a model directory, or a run directory (its best checkpoint).
    -> (model, tokenizer, extra)."""
    from aiayn.checkpoint import load_model

    model, tokenizer, extra, _ = load_model(path, task)
    return model.train(), tokenizer, extra


def parse_freeze(text: str | None) -> tuple[str, ...]:
    parts = tuple(p.strip() for p in (text or "").split(",") if p.strip())
    unknown = [p for p in parts if p not in FREEZABLE]
    if unknown:
        raise FinetuneError(f"--freeze: unknown part(s) {', '.join(unknown)}: choose from {','.join(FREEZABLE)}")
    return parts


def _part(name: str) -> str | None:
    """The freezable part a parameter belongs to, by its name: embeddings (a text model's token and
    position embeddings, a ViT's patch embedding, class token and positions), encoder, decoder."""
    top = name.split(".")[0]
    if top in ("src_embed", "tgt_embed", "patches", "cls_token", "pos"):
        return "embeddings"
    return top if top in ("encoder", "decoder") else None


def freeze(model: nn.Module, parts: tuple[str, ...]) -> None:
    """In place: stop the gradients of whole parts. embeddings: the token and position embeddings (and
    so a tied output projection, which is the same matrix; a ViT's patch embedding, class token and
    positions); encoder, decoder: their layer stacks. A ViT with embeddings and encoder frozen trains
    its head alone (a linear probe)."""
    found = set()
    for name, p in model.named_parameters():
        part = _part(name)
        if part in parts:
            p.requires_grad_(False)
            found.add(part)
    for part in parts:
        if part not in found:
            raise FinetuneError(f"--freeze {part}: this model has no {part}")
    if not any(p.requires_grad for p in model.parameters()):
        raise FinetuneError("--freeze leaves nothing to train")


def prepare(model: nn.Module, task: str, *, init_from: str | None, freeze_parts: tuple[str, ...] = (),
            lora_cfg: LoRAConfig | None = None, extra: dict | None = None, seed: int = 1) -> dict:
    """Make a freshly loaded base model the model a fine-tuning run trains (in place): frozen parts,
    or LoRA layers on frozen weights. -> what run.json and the checkpoints record of it."""
    meta: dict = {}
    if init_from is None:
        if lora_cfg is not None or freeze_parts:
            raise FinetuneError("--lora-rank and --freeze fine-tune a trained model: give --init-from MODEL")
        return meta
    meta["init_from"] = str(Path(init_from).resolve())
    if lora_cfg is not None:
        if freeze_parts:
            raise FinetuneError("LoRA trains its adapters only (everything else is frozen): drop --freeze")
        lora_cfg = LoRAConfig(rank=lora_cfg.rank, alpha=lora_cfg.alpha, targets=lora_cfg.targets,
                              base_sha256=lora.weights_digest(model), task=task, extra=dict(extra or {}))
        lora.add_lora(model, lora_cfg, seed=seed)
        meta["lora"] = lora_cfg.to_dict()
    elif freeze_parts:
        freeze(model, freeze_parts)
        meta["freeze"] = list(freeze_parts)
    return meta


def prepare_resumed(model: nn.Module, previous: dict) -> None:
    """The trainable model of a run being resumed, from what its run.json recorded (the weights come
    from its checkpoint, which holds the whole model)."""
    if "lora" in previous:
        lora.add_lora(model, LoRAConfig.from_dict(previous["lora"]))
    elif previous.get("freeze"):
        freeze(model, tuple(previous["freeze"]))


def describe(model: nn.Module) -> str:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return f"{trainable:,} of {total:,} parameters trainable ({100 * trainable / total:.2f}%)"


def finish(run_dir: Path) -> Path | None:
    """After a LoRA run: its best checkpoint's adapter alone, as RUN_DIR/adapter.safetensors."""
    from aiayn.checkpoint import best_checkpoint

    best = best_checkpoint(Path(run_dir))
    if best is None:
        return None
    try:
        return lora.export_run_adapter(best, Path(run_dir) / lora.ADAPTER_FILE)
    except AdapterError:
        return None  # not a LoRA run


def fit_text(text: str, tokenizer) -> str:
    """A text for a model's own character vocabulary: lines with characters outside it are left out
    (said on stderr). Other tokenizers encode anything (or fail on their own)."""
    from aiayn.data.tokenizer import CharTokenizer

    if not isinstance(tokenizer, CharTokenizer):
        return text
    known = set(tokenizer.chars)
    lines = text.split("\n")
    kept = [line for line in lines if set(line) <= known]
    if len(kept) < len(lines):
        unknown = sorted({c for line in lines for c in line if c not in known})
        shown = " ".join(repr(c) for c in unknown[:12]) + (" ..." if len(unknown) > 12 else "")
        warnings.warn(f"{len(lines) - len(kept):,} of {len(lines):,} lines have characters outside the "
                      f"model's vocabulary ({shown}) and are left out", UserWarning, stacklevel=2)
    if not any(line.strip() for line in kept):
        raise FinetuneError("no line of this text is written in the model's characters")
    return "\n".join(kept)


# ------------------------------------------------------------------------------ using adapters
def apply_adapter(model: nn.Module, extra: dict, path: str | Path, task: str, merged: bool = True) -> dict:
    """Put an adapter on a loaded model (in place; merged: at the base model's speed). -> the
    model's metadata as the fine-tuned model's (e.g. its target language)."""
    cfg = lora.load_adapter(model, path, task=task, merged=merged)
    return {**extra, **cfg.extra, "adapter": str(Path(path).resolve())}


def merge_to_directory(model_dir: Path | str, adapter: Path | str, out: Path | str) -> Path:
    """`aiayn merge`: MODEL + adapter -> a plain model directory `out` (new or empty)."""
    from aiayn.checkpoint import load_model_dir, write_model
    from aiayn.interop.hf import write_directory

    model, tokenizer, task, extra = load_model_dir(model_dir)
    extra = apply_adapter(model, extra, adapter, task)
    write_directory(Path(out), lambda d: write_model(d, model, tokenizer, task, extra))
    return Path(out)

