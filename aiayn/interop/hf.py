"""Reading and writing the files of an HF-format model directory, with one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from aiayn.checkpoint import replace_directory
from aiayn.errors import InputError


class InteropError(InputError):
    """An HF directory or aiayn model that cannot be converted: the message says why, in one line."""


def _first_line(e: BaseException, n: int = 160) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:n] if text else type(e).__name__


def read_config(directory: Path, model_types: tuple[str, ...]) -> dict:
    """config.json of an HF directory, checked to be of one of `model_types`."""
    directory = Path(directory)
    if not directory.is_dir():
        raise InteropError(f"{directory}: no such directory")
    path = directory / "config.json"
    if not path.is_file():
        raise InteropError(f"{directory}: not an HF model directory (no config.json)")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(cfg, dict):
            raise InputError("not a JSON object")
    except (ValueError, UnicodeDecodeError) as e:
        raise InteropError(f"{path}: corrupt config.json ({_first_line(e, 100)})") from None
    kind = cfg.get("model_type")
    if kind not in model_types:
        arch = ", ".join(cfg.get("architectures") or []) or "unknown architecture"
        raise InteropError(f"{directory}: a {kind or 'model of no model_type'} ({arch}), "
                           f"not {' or '.join(model_types)}")
    return cfg


def read_weights(directory: Path) -> dict[str, torch.Tensor]:
    """The state dict of an HF directory: model.safetensors (or its shards), else pytorch_model.bin
    read with torch.load(weights_only=True): tensors only, never arbitrary pickled objects."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    single, index, pt = (directory / n for n in ("model.safetensors", "model.safetensors.index.json",
                                                  "pytorch_model.bin"))
    if single.is_file():
        paths = [single]
    elif index.is_file():
        try:
            paths = [directory / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise InteropError(f"{index}: corrupt index ({_first_line(e, 100)})") from None
    elif pt.is_file():
        try:
            state = torch.load(pt, map_location="cpu", weights_only=True)
        except Exception as e:  # pickle/zip errors of many kinds, or a forbidden global
            raise InteropError(f"{pt}: corrupt or not a plain weights file ({_first_line(e, 120)})") from None
        if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
            raise InteropError(f"{pt}: not a state dict of tensors")
        return state
    else:
        raise InteropError(f"{directory}: no weights (model.safetensors or pytorch_model.bin)")
    state = {}
    for path in paths:
        try:
            state.update(load_file(str(path)))
        except (SafetensorError, OSError, ValueError) as e:
            raise InteropError(f"{path}: corrupt weights file ({_first_line(e, 120)})") from None
    return state


class Weights:
    """An HF state dict read by name, with one-line errors for what is missing or misshapen."""

    def __init__(self, state: dict[str, torch.Tensor], source: Path):
        self.state, self.source = state, source

    def has(self, *names: str) -> bool:
        return any(n in self.state for n in names)

    def get(self, *names: str, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        """The first of `names` present (alternative spellings of one weight), as fp32."""
        for n in names:
            if n in self.state:
                t = self.state[n]
                if shape is not None and tuple(t.shape) != shape:
                    raise InteropError(f"{self.source}: {n} has shape {tuple(t.shape)}, the config says {shape}")
                return t.float()
        raise InteropError(f"{self.source}: weight {names[0]} missing")


def whole(value) -> int:
    """A config.json count: a whole number (256 or 256.0), else ValueError (256.5 is not truncated)."""
    if isinstance(value, bool) or not (isinstance(value, int) or isinstance(value, float) and value.is_integer()):
        raise ValueError(f"not a whole number: {value!r}")
    return int(value)


def read_json(path: Path) -> dict:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise InteropError(f"{path}: corrupt JSON ({_first_line(e, 100)})") from None
    if not isinstance(data, dict):
        raise InteropError(f"{path}: not a JSON object")
    return data


def write_directory(out: Path, write) -> None:
    """Run write(tmp) on a fresh temporary directory beside `out`, then rename it to `out`, which must
    not exist or be empty: a failed import or export leaves nothing behind."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InteropError(f"{out}: exists and is not an empty directory")
    replace_directory(out, write)


def activation_from_hf(name: str, where: Path) -> str:
    """An HF activation_function -> aiayn's ModelConfig.activation."""
    table = {"relu": "relu", "gelu": "gelu", "gelu_new": "gelu-tanh", "gelu_pytorch_tanh": "gelu-tanh",
             "gelu_fast": "gelu-tanh", "swish": "swish", "silu": "swish"}
    if name not in table:
        raise InteropError(f"{where}: activation {name!r} is not supported ({', '.join(table)})")
    return table[name]


ACTIVATION_TO_HF = {"relu": "relu", "gelu": "gelu", "gelu-tanh": "gelu_new", "swish": "swish"}
