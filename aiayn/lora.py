"""LoRA (Hu et al. 2021): fine-tune a few low-rank matrices beside frozen weights.

A targeted linear layer y = x W^T + b becomes y = x W^T + b + (alpha / r) x A^T B^T, with A (r, in)
drawn at random and B (out, r) zero, so that a fresh adapter leaves the model's outputs exactly as
they were. Only A and B train. `merge` folds (alpha / r) B A into W: the plain model again, at the
base model's speed.

Targets, by the paper's names: q, k, v (rows of the fused in_proj of every attention, self and
cross: one A and B per projection, as if W_q, W_k, W_v were separate matrices), o (out_proj), ff
(both linears of the feed-forward). The layers are wrapped in place, after the model is built
(`add_lora`): a wrapped layer is still an nn.Linear with the same `weight` and `bias`, plus
`lora_A` (k, r, in) and `lora_B` (k, L, r) for its k targeted row blocks of L rows.

An adapter file is a safetensors file of those tensors whose metadata holds its config: rank,
alpha, targets, the task, and the SHA-256 of the base model's weights (`weights_digest`), checked
when the adapter is loaded.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from aiayn.errors import InputError


TARGETS = ("q", "k", "v", "o", "ff")
DEFAULT_TARGETS = ("q", "k", "v", "o")
ADAPTER_FILE = "adapter.safetensors"
FORMAT = "aiayn-lora-1"


class AdapterError(InputError):
    """An adapter that cannot be used with this model: the message says why, in one line."""


@dataclass(frozen=True)
class LoRAConfig:
    rank: int = 8
    alpha: float | None = None             # None = rank: a scaling of 1
    targets: tuple[str, ...] = DEFAULT_TARGETS
    base_sha256: str = ""                  # the base model's weights (weights_digest)
    task: str = ""
    extra: dict = field(default_factory=dict)  # what the fine-tuned model says of itself (src, tgt)

    def __post_init__(self):
        if not isinstance(self.rank, int) or self.rank < 1:
            raise AdapterError(f"LoRA rank must be an integer >= 1, not {self.rank!r}")
        if self.alpha is not None and not self.alpha > 0:
            raise AdapterError(f"LoRA alpha must be > 0, not {self.alpha!r}")
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown or not self.targets:
            raise AdapterError(f"unknown LoRA target(s) {', '.join(unknown) or '(none)'}: choose from {','.join(TARGETS)}")
        object.__setattr__(self, "targets", tuple(t for t in TARGETS if t in self.targets))  # canonical order

    @property
    def scaling(self) -> float:
        return (self.alpha if self.alpha is not None else self.rank) / self.rank

    def to_dict(self) -> dict:
        return {**asdict(self), "targets": list(self.targets)}

    @classmethod
    def from_dict(cls, d: dict) -> "LoRAConfig":
        return cls(**{**d, "targets": tuple(d.get("targets", DEFAULT_TARGETS))})


def parse_targets(text: str) -> tuple[str, ...]:
    """'q,v' -> ('q', 'v'); unknown names are an AdapterError."""
    return LoRAConfig(targets=tuple(t.strip() for t in text.split(",") if t.strip())).targets


# ------------------------------------------------------------------------------------ the layer
class LoRALinear(nn.Linear):
    """nn.Linear plus a low-rank update of some of its row blocks (an nn.Linear is made one in place
    by `add_lora`, so its weight, bias and state-dict keys stay where they were)."""

    lora_A: nn.Parameter     # (k, r, in)
    lora_B: nn.Parameter     # (k, L, r)
    lora_rows: list[int]     # the first row of each of the k blocks of L rows
    lora_scaling: float

    def lora_delta(self, x: Tensor) -> Tensor:
        """(..., in) -> the update of all `out_features` outputs (..., out): zero outside the blocks."""
        k, L, _ = self.lora_B.shape
        h = torch.einsum("...i,kri->...kr", x, self.lora_A)            # (..., k, r)
        d = torch.einsum("...kr,klr->...kl", h, self.lora_B) * self.lora_scaling  # (..., k, L)
        if k * L == self.out_features and self.lora_rows == list(range(0, self.out_features, L)):
            return d.flatten(-2)                                        # the blocks tile the rows
        pieces, at = [], 0
        for i, start in enumerate(self.lora_rows):  # zeros between the blocks (rows kept in order)
            if start > at:
                pieces.append(d.new_zeros(*d.shape[:-2], start - at))
            pieces.append(d[..., i, :])
            at = start + L
        if at < self.out_features:
            pieces.append(d.new_zeros(*d.shape[:-2], self.out_features - at))
        return torch.cat(pieces, dim=-1)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias) + self.lora_delta(x)

    def forward_rows(self, x: Tensor, rows: slice) -> Tensor:
        """The outputs `rows` only (aiayn.model.attention.linear_rows: cross-attention's query or
        key/value part of in_proj), with their share of the update."""
        base = F.linear(x, self.weight[rows], self.bias[rows] if self.bias is not None else None)
        return base + self.lora_delta(x)[..., rows]

    @torch.no_grad()
    def delta_weight(self) -> Tensor:
        """(out, in): what `merge` adds to the weight, (alpha / r) B A in each block."""
        dw = torch.zeros_like(self.weight, dtype=torch.float32)
        L = self.lora_B.size(1)
        for i, start in enumerate(self.lora_rows):
            dw[start:start + L] = self.lora_B[i].float() @ self.lora_A[i].float() * self.lora_scaling
        return dw

    def extra_repr(self) -> str:
        k, L, r = self.lora_B.shape
        return f"{super().extra_repr()}, lora_rank={r}, lora_blocks={k}x{L}"


def _target_layers(model: nn.Module, targets: tuple[str, ...]) -> list[tuple[str, nn.Linear, list[int], int]]:
    """(name, linear, first rows of the targeted blocks, block height) for every layer to adapt."""
    from aiayn.model.attention import MultiHeadAttention
    from aiayn.model.layers import FeedForward

    found = []
    for name, m in model.named_modules():
        if isinstance(m, MultiHeadAttention):
            D = m.d_model
            rows = [i * D for i, t in enumerate("qkv") if t in targets]
            if rows:
                found.append((f"{name}.in_proj", m.in_proj, rows, D))
            if "o" in targets:
                found.append((f"{name}.out_proj", m.out_proj, [0], m.out_proj.out_features))
        elif isinstance(m, FeedForward) and "ff" in targets:
            found.append((f"{name}.w1", m.w1, [0], m.w1.out_features))
            found.append((f"{name}.w2", m.w2, [0], m.w2.out_features))
    return found


def add_lora(model: nn.Module, cfg: LoRAConfig, seed: int | None = None) -> list[str]:
    """In place: freeze every parameter of `model` and give the targeted linears trainable
    low-rank updates (A: Kaiming-uniform as nn.Linear's own init, B: zeros). -> the adapted layers' names."""
    layers = _target_layers(model, cfg.targets)
    if not layers:
        raise AdapterError(f"this model has no layer to adapt for targets {','.join(cfg.targets)}")
    for p in model.parameters():
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    for name, linear, rows, L in layers:
        if isinstance(linear, LoRALinear):
            raise AdapterError(f"{name} already has a LoRA adapter")
        if type(linear) is not nn.Linear:  # e.g. an inference copy's packed or quantized layer
            raise AdapterError(f"{name} is a {type(linear).__name__}: add LoRA to the trained model itself")
        w = linear.weight
        a = torch.empty(len(rows), cfg.rank, linear.in_features)
        bound = 1 / math.sqrt(linear.in_features)  # kaiming_uniform_(a=sqrt(5)), nn.Linear's and the paper's code's
        a.uniform_(-bound, bound, generator=g)
        linear.__class__ = LoRALinear
        linear.lora_A = nn.Parameter(a.to(w.device, w.dtype))
        linear.lora_B = nn.Parameter(torch.zeros(len(rows), L, cfg.rank, device=w.device, dtype=w.dtype))
        linear.lora_rows, linear.lora_scaling = list(rows), cfg.scaling
    return [name for name, *_ in layers]


def lora_layers(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


@torch.no_grad()
def merge(model: nn.Module) -> nn.Module:
    """In place: fold every adapter into its weight; the layers become plain nn.Linear again."""
    for _, m in lora_layers(model):
        m.weight.add_(m.delta_weight().to(m.weight.dtype))
        del m.lora_A, m.lora_B, m.lora_rows, m.lora_scaling
        m.__class__ = nn.Linear
    return model


def adapter_state(model: nn.Module) -> dict[str, Tensor]:
    """The adapter's tensors: `<layer>.lora_A` and `<layer>.lora_B` of every adapted layer."""
    return {k: v.detach().contiguous() for k, v in model.state_dict().items() if k.endswith((".lora_A", ".lora_B"))}


# ------------------------------------------------------------------------------- base identity
@torch.no_grad()
def weights_digest(model: nn.Module) -> str:
    """SHA-256 of a model's own weights (names, dtypes, shapes and values; adapters left out): which
    base model an adapter was trained on. It ignores the file's metadata, so the same weights saved
    again (aiayn average --alpha) keep their digest."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        if name.endswith((".lora_A", ".lora_B")):
            continue
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


# --------------------------------------------------------------------------------- adapter files
def save_adapter(path: Path, model: nn.Module, cfg: LoRAConfig) -> Path:
    """Write the adapter of `model` to `path` (a file, or a directory: its adapter.safetensors),
    atomically: a kill leaves the old file or the new one, never half of one."""
    path = Path(path)
    if path.is_dir() or not path.suffix:
        path.mkdir(parents=True, exist_ok=True)
        path = path / ADAPTER_FILE
    tensors = adapter_state(model)
    if not tensors:
        raise AdapterError("this model has no LoRA adapter to save")
    _write(path, tensors, cfg)
    return path


def _write(path: Path, tensors: dict[str, Tensor], cfg: LoRAConfig) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": FORMAT, "lora": json.dumps(cfg.to_dict())})
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def adapter_path(path: Path | str) -> Path:
    """An adapter file, a directory holding adapter.safetensors, or a LoRA run directory: its
    adapter.safetensors, else (a run killed before it wrote one) its best checkpoint."""
    from aiayn.checkpoint import best_checkpoint

    path = Path(path)
    if path.is_dir() and (path / ADAPTER_FILE).is_file():
        return path / ADAPTER_FILE
    if path.is_file():
        return path
    best = best_checkpoint(path) if path.is_dir() else None
    if best is not None:
        return best
    raise AdapterError(f"{path}: no such adapter (an {ADAPTER_FILE} file, or a directory holding one)")


def read_adapter(path: Path | str) -> tuple[LoRAConfig, dict[str, Tensor]]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    path = adapter_path(path)
    if path.is_dir():  # a LoRA run's checkpoint
        return _checkpoint_adapter(path)
    try:
        with safe_open(str(path), "pt") as f:
            meta = dict(f.metadata() or {})
        if meta.get("format") != FORMAT:
            raise KeyError("format")
        cfg = LoRAConfig.from_dict(json.loads(meta["lora"]))
        tensors = load_file(str(path))
    except (SafetensorError, OSError, KeyError, ValueError, TypeError) as e:
        raise AdapterError(f"{path}: corrupt or not an aiayn LoRA adapter ({str(e).splitlines()[0][:120] if str(e) else type(e).__name__})") from None
    return cfg, tensors


def load_adapter(model: nn.Module, path: Path | str, task: str | None = None, merged: bool = True,
                 digest: str | None = None) -> LoRAConfig:
    """Put the adapter at `path` on `model` (in place): merged into its weights (the default: the
    base model's speed) or as LoRA layers. Refuses, with one line, an adapter trained on another
    base model or for another task. `digest`: the model's weights_digest, if already known."""
    cfg, tensors = read_adapter(path)
    if task is not None and cfg.task and cfg.task != task:
        raise AdapterError(f"{path}: an adapter for a {cfg.task} model, not a {task} model")
    digest = digest or weights_digest(model)
    if cfg.base_sha256 != digest:
        raise AdapterError(f"{path}: this adapter was trained on another base model (weights "
                           f"{cfg.base_sha256[:12]}, not {digest[:12]}): give the model it was trained from")
    add_lora(model, cfg)
    try:
        state = adapter_state(model)
        if set(state) != set(tensors) or any(state[k].shape != tensors[k].shape for k in state):
            raise AdapterError(f"{path}: its tensors do not fit this model's layers")
        with torch.no_grad():
            for name, m in lora_layers(model):
                m.lora_A.copy_(tensors[f"{name}.lora_A"])
                m.lora_B.copy_(tensors[f"{name}.lora_B"])
    except AdapterError:
        remove_lora(model)
        raise
    for p in model.parameters():
        p.requires_grad_(True)  # what load_model_dir gives: an ordinary model
    if merged:
        merge(model)
    return cfg


def remove_lora(model: nn.Module) -> nn.Module:
    """In place: drop every adapter unmerged (the base model again)."""
    for _, m in lora_layers(model):
        del m.lora_A, m.lora_B, m.lora_rows, m.lora_scaling
        m.__class__ = nn.Linear
    return model


def _checkpoint_adapter(checkpoint: Path) -> tuple[LoRAConfig, dict[str, Tensor]]:
    """The adapter in a LoRA run's checkpoint (its model.safetensors holds base and adapter)."""
    from safetensors import SafetensorError
    from safetensors.torch import safe_open

    from aiayn.checkpoint import MODEL_FILE

    try:
        with safe_open(str(Path(checkpoint) / MODEL_FILE), "pt") as f:
            meta = json.loads((f.metadata() or {}).get("extra", "{}"))
            tensors = {k: f.get_tensor(k) for k in f.keys() if k.endswith((".lora_A", ".lora_B"))}
    except (SafetensorError, OSError, ValueError) as e:
        raise AdapterError(f"{checkpoint}: unreadable ({str(e).splitlines()[0][:120] if str(e) else type(e).__name__})") from None
    if "lora" not in meta or not tensors:
        raise AdapterError(f"{checkpoint}: not a checkpoint of a LoRA run (no adapter)")
    return LoRAConfig.from_dict(meta["lora"]), tensors


def export_run_adapter(checkpoint: Path, out: Path) -> Path:
    """The adapter of a LoRA run's checkpoint -> `out` (an adapter file)."""
    cfg, tensors = _checkpoint_adapter(checkpoint)
    _write(Path(out), tensors, cfg)
    return Path(out)
