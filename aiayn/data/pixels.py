"""Images as sequences of pixel tokens (Image GPT, Chen et al. 2020; Image Transformer, Parmar et al.
2018): intensities quantized to a small gray palette, raster order, a class token first.

Vocabulary: ids 0 .. levels-1 are the palette's gray levels (0 = black), then one token per class,
then one "any class" token for an image whose class is not given.
Shape legend: N images, H x W image, L = 1 + H * W tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from aiayn.errors import InputError


class PixelTokenizer:
    """Uniform gray levels: level i stands for intensity round(255 i / (levels - 1)).

    Saved beside a model as `pixels.json` (as a text model keeps its tokenizer), so that a model
    directory says how its tokens map to pixels and which class each class token is."""

    filename = "pixels.json"

    def __init__(self, levels: int, classes: list[str], image_size: int):
        if not 2 <= levels <= 256:
            raise InputError(f"a palette needs 2 to 256 gray levels, got {levels}")
        if not classes:
            raise InputError("a pixel tokenizer needs at least one class")
        self.levels, self.classes, self.image_size = levels, list(classes), image_size

    @property
    def vocab_size(self) -> int:
        return self.levels + len(self.classes) + 1

    @property
    def any_class_id(self) -> int:
        return self.levels + len(self.classes)

    @property
    def seq_len(self) -> int:
        return 1 + self.image_size ** 2

    def class_id(self, label: int | None) -> int:
        """The token that starts an image of class `label` (None: any class)."""
        if label is None:
            return self.any_class_id
        if not 0 <= label < len(self.classes):
            raise InputError(f"class {label} outside 0..{len(self.classes) - 1}")
        return self.levels + label

    def palette(self) -> Tensor:
        """(levels,) uint8: the intensity each level stands for."""
        return torch.round(torch.arange(self.levels, dtype=torch.float64) * 255 / (self.levels - 1)).to(torch.uint8)

    def quantize(self, images: Tensor) -> Tensor:
        """uint8 intensities (...) -> the nearest level's id (...), int64."""
        return torch.round(images.to(torch.float64) * (self.levels - 1) / 255).long()

    def dequantize(self, ids: Tensor) -> Tensor:
        """Level ids (...) -> uint8 intensities (...)."""
        if bool(((ids < 0) | (ids >= self.levels)).any()):
            raise InputError("ids outside the palette")
        return self.palette()[ids]

    def encode(self, images: Tensor, labels: Tensor | None) -> Tensor:
        """(N, H, W) uint8 and (N,) class indices (None or -1: any class) -> (N, L) token ids."""
        n = images.size(0)
        if labels is None:
            labels = torch.full((n,), -1, dtype=torch.long)
        first = torch.where(labels >= 0, self.levels + labels, torch.full_like(labels, self.any_class_id))
        return torch.cat([first[:, None], self.quantize(images).reshape(n, -1)], dim=1)

    def decode(self, pixels: Tensor) -> Tensor:
        """(N, H * W) level ids (no class token) -> (N, H, W) uint8 images."""
        return self.dequantize(pixels).reshape(-1, self.image_size, self.image_size)

    def save(self, directory: Path) -> None:
        (Path(directory) / self.filename).write_text(json.dumps(
            {"levels": self.levels, "classes": self.classes, "image_size": self.image_size}) + "\n")

    @classmethod
    def load(cls, directory: Path) -> "PixelTokenizer":
        d = json.loads((Path(directory) / cls.filename).read_text())
        if not isinstance(d, dict):
            raise InputError(f"{cls.filename} is not a JSON object")
        return cls(int(d["levels"]), [str(c) for c in d["classes"]], int(d["image_size"]))
