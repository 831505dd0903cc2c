"""The building blocks of §3: embeddings, positional encoding, feed-forward, and the layer itself.

Shape legend: B batch, T length, D d_model, V vocabulary.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from aiayn.config import ModelConfig
from aiayn.errors import InputError
from aiayn.model.attention import MultiHeadAttention


def sinusoidal_encoding(max_len: int, d_model: int, split: bool = False) -> Tensor:
    """§3.5: PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(pos / 10000^(2i/d)). (L, D)

    split: the same values with the sines in the first half of each vector and the cosines in the
    second, PE(pos, i) = sin(...), PE(pos, ceil(d/2) + i) = cos(...) (Marian's layout)."""
    pos = torch.arange(max_len, dtype=torch.float64)[:, None]
    inv_freq = 10000.0 ** (-torch.arange(0, d_model, 2, dtype=torch.float64) / d_model)
    pe = torch.zeros(max_len, d_model, dtype=torch.float64)
    half = (d_model + 1) // 2
    sines, cosines = (slice(0, half), slice(half, None)) if split else (slice(0, None, 2), slice(1, None, 2))
    pe[:, sines] = torch.sin(pos * inv_freq)
    pe[:, cosines] = torch.cos(pos * inv_freq[: d_model // 2])
    return pe.float()


def _gelu_tanh(x: Tensor) -> Tensor:
    return F.gelu(x, approximate="tanh")


ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "gelu-tanh": _gelu_tanh, "swish": F.silu}


class Embedding(nn.Module):
    """Token embedding scaled by sqrt(d_model) (§3.4) plus positions (§3.5), then dropout (§5.4)."""

    def __init__(self, vocab_size: int, cfg: ModelConfig, tokens: nn.Embedding | None = None):
        super().__init__()
        self.tokens = tokens if tokens is not None else nn.Embedding(vocab_size, cfg.d_model)
        self.scale = math.sqrt(cfg.d_model) if cfg.scale_embedding else 1.0
        if cfg.positional != "learned":
            pe = sinusoidal_encoding(cfg.max_len, cfg.d_model, split=cfg.positional == "sinusoidal-split")
            self.register_buffer("pe", pe, persistent=False)
            self.learned = None
        else:
            self.learned = nn.Embedding(cfg.max_len, cfg.d_model)
        self.dropout = nn.Dropout(cfg.dropout)
        self.max_len = cfg.max_len

    def positions(self, start: int, length: int) -> Tensor:
        if start + length > self.max_len:
            raise InputError(f"sequence of {start + length} positions is longer than the model's "
                             f"maximum length {self.max_len}")
        if self.learned is not None:
            return self.learned.weight[start:start + length]
        return self.pe[start:start + length]

    def forward(self, tokens: Tensor, start: int = 0) -> Tensor:
        positions = self.positions(start, tokens.size(1))
        x = self.tokens(tokens) * self.scale  # (B, T, D)
        return self.dropout(x + positions.to(x.dtype))


class FeedForward(nn.Module):
    """§3.3: FFN(x) = max(0, x W1 + b1) W2 + b2 (or another activation: GELU, its tanh form, swish)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.d_model, cfg.d_ff)
        self.w2 = nn.Linear(cfg.d_ff, cfg.d_model)
        self.act = ACTIVATIONS[cfg.activation]

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(self.act(self.w1(x)))


class TransformerLayer(nn.Module):
    """One layer of §3.1: self-attention, optional cross-attention, feed-forward.

    Each sub-layer is wrapped as LayerNorm(x + Dropout(Sublayer(x))) -- the paper's post-norm -- or,
    with cfg.norm_first, x + Dropout(Sublayer(LayerNorm(x))). Without cross-attention this is an
    encoder layer (or, with a causal mask, a GPT block); with it, a decoder layer.
    """

    def __init__(self, cfg: ModelConfig, cross_attention: bool = False):
        super().__init__()
        self.norm_first = cfg.norm_first
        self.self_attn = MultiHeadAttention(cfg.d_model, cfg.n_heads, cfg.attn_dropout)
        self.self_norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.cross_attn = MultiHeadAttention(cfg.d_model, cfg.n_heads, cfg.attn_dropout) if cross_attention else None
        self.cross_norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps) if cross_attention else None
        self.ff = FeedForward(cfg)
        self.ff_norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)

    def _residual(self, x: Tensor, norm: nn.LayerNorm, sublayer) -> tuple[Tensor, Tensor | None]:
        if self.norm_first:
            y, w = sublayer(norm(x))
            return self.add(x, y), w
        y, w = sublayer(x)
        return self.add_norm(x, y, norm), w

    def add(self, x: Tensor, y: Tensor) -> Tensor:
        """The residual connection of §5.4: x + Dropout(y)."""
        return x + self.dropout(y)

    def add_norm(self, x: Tensor, y: Tensor, norm: nn.LayerNorm) -> Tensor:
        """The post-norm residual of §3.1: LayerNorm(x + Dropout(y))."""
        return norm(self.add(x, y))

    def forward(self, x: Tensor, mask: Tensor | None, *,
                memory_kv: Tensor | tuple[Tensor, Tensor] | None = None, memory_mask: Tensor | None = None,
                cache: tuple[Tensor, Tensor, int] | None = None,
                need_weights: bool = False) -> tuple[Tensor, dict[str, Tensor]]:
        """x (B, T, D) -> (B, T, D), and the attention weights {"self": ..., "cross": ...} if asked."""
        weights = {}
        x, weights["self"] = self._residual(
            x, self.self_norm, lambda h: self.self_attn(h, mask, cache=cache, need_weights=need_weights))
        if self.cross_attn is not None:
            x, weights["cross"] = self._residual(
                x, self.cross_norm,
                lambda h: self.cross_attn(h, memory_mask, kv=memory_kv, need_weights=need_weights))
        x, _ = self._residual(x, self.ff_norm, lambda h: (self.ff(h), None))
        return x, weights


class Stack(nn.Module):
    """N identical layers (§3.1), with a final LayerNorm when the layers are pre-norm."""

    def __init__(self, cfg: ModelConfig, n_layers: int, cross_attention: bool = False):
        super().__init__()
        self.layers = nn.ModuleList(TransformerLayer(cfg, cross_attention) for _ in range(n_layers))
        self.norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps) if cfg.norm_first else nn.Identity()

    def forward(self, x: Tensor, mask: Tensor | None, *, memory: Tensor | None = None,
                memory_mask: Tensor | None = None, cache=None,
                need_weights: bool = False) -> tuple[Tensor, list[dict[str, Tensor]]]:
        """cache: a KVCache for incremental decoding; without one, `memory` is the encoder output."""
        all_weights = []
        for i, layer in enumerate(self.layers):
            memory_kv = layer_cache = None
            if cache is not None:
                layer_cache = cache.layer(i, x.size(1))
                if layer.cross_attn is not None:
                    memory_kv = (cache.cross_k[i], cache.cross_v[i])
            elif layer.cross_attn is not None:
                memory_kv = layer.cross_attn.kv_projection(memory)
            x, weights = layer(x, mask, memory_kv=memory_kv, memory_mask=memory_mask,
                               cache=layer_cache, need_weights=need_weights)
            all_weights.append(weights)
        return self.norm(x), all_weights
