"""The Vision Transformer (Dosovitskiy et al. 2021, "An Image is Worth 16x16 Words"): an image cut
into patches is a sequence of tokens for the encoder layers of §3.1 (aiayn.model.layers.Stack,
pre-norm); a class token (or the mean of the patch tokens) feeds a linear head.

Shape legend: B batch, C channels, H x W image, P patch side, N = (H/P)(W/P) patches,
T = N (+ 1 with a class token), D d_model, K classes.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from aiayn.config import ViTConfig
from aiayn.model.layers import Stack, sinusoidal_encoding


def sincos_2d(grid: int, d_model: int) -> Tensor:
    """2-D sinusoidal positions (ViT §D.4, MAE): half of the dimensions encode the row with §3.5's
    sinusoids, the other half the column. (grid * grid, D), row-major like the patches."""
    half = sinusoidal_encoding(grid, d_model // 2)  # (grid, D/2)
    rows = half[:, None, :].expand(grid, grid, -1)  # (grid, grid, D/2): row r
    cols = half[None, :, :].expand(grid, grid, -1)  # column c
    return torch.cat([rows, cols], dim=-1).reshape(grid * grid, d_model)


class PatchEmbedding(nn.Module):
    """Cut (B, C, H, W) into P x P patches and map each, flattened, linearly to D: (B, N, D).
    A convolution with kernel = stride = P is exactly that linear map, applied patch by patch."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.proj = nn.Conv2d(cfg.channels, cfg.d_model, kernel_size=cfg.patch_size, stride=cfg.patch_size)

    def forward(self, images: Tensor) -> Tensor:
        x = self.proj(images.to(self.proj.weight.dtype))  # a bf16 model (bf16-model) takes fp32 images
        return x.flatten(2).transpose(1, 2)  # (B, D, H/P, W/P) -> (B, N, D)


class VisionTransformer(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        self.patches = PatchEmbedding(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.d_model)) if cfg.pool == "cls" else None
        if cfg.positional == "learned":
            self.pos = nn.Parameter(torch.randn(1, cfg.n_patches, cfg.d_model) * 0.02)
        else:
            self.register_buffer("pos", sincos_2d(cfg.grid, cfg.d_model)[None], persistent=False)
        self.dropout = nn.Dropout(cfg.dropout)
        self.encoder = Stack(cfg.encoder(), cfg.n_layers)  # the same layers as translation and the LMs
        self.head = nn.Linear(cfg.d_model, cfg.n_classes)
        for name, p in self.encoder.named_parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        nn.init.zeros_(self.head.weight)  # ViT: a zero head starts from uniform predictions
        nn.init.zeros_(self.head.bias)

    def tokens(self, images: Tensor) -> Tensor:
        """(B, C, H, W) in [0, 1] -> the encoder's input (B, T, D): patches + positions [, class token]."""
        x = self.patches(images * 2 - 1)  # centred intensities; (B, N, D)
        # the weights' type: a bf16 model (bf16-model) keeps its sinusoidal buffer in fp32; under
        # autocast the fp32 positions keep the residual stream in fp32 (the patches come out bf16)
        x = x + self.pos.to(self.patches.proj.weight.dtype)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.size(0), -1, -1), x], dim=1)  # (B, 1 + N, D)
        return self.dropout(x)

    def features(self, images: Tensor, need_weights: bool = False):
        """-> the pooled representation (B, D) [, attention weights per layer, each (B, H, T, T)]."""
        h, weights = self.encoder(self.tokens(images), None, need_weights=need_weights)  # no mask: all see all
        pooled = h[:, 0] if self.cls_token is not None else h.mean(dim=1)
        return (pooled, [w["self"] for w in weights]) if need_weights else pooled

    def forward(self, images: Tensor) -> Tensor:
        """(B, C, H, W) with intensities in [0, 1] -> logits (B, K)."""
        return self.head(self.features(images))


def images_to_input(images: Tensor) -> Tensor:
    """uint8 (B, H, W) or (B, C, H, W) -> float (B, C, H, W) in [0, 1]."""
    x = images.float() / 255.0
    return x[:, None] if x.dim() == 3 else x
