"""Multi-head scaled dot-product attention (§3.2), its masks, and the KV cache.

Shape legend: B batch, T query length, S key length, D d_model, H heads, Dh = D // H.
Mask convention, everywhere in aiayn: a boolean tensor broadcastable to (B, H, T, S),
True = may attend. Masks are built here, once per batch, and never inside layers.
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel


# ---------------------------------------------------------------------------------------- masks
def padding_mask(tokens: Tensor, pad_id: int) -> Tensor:
    """(B, S) token ids -> (B, 1, 1, S): True at real tokens, so no query attends to padding."""
    return (tokens != pad_id)[:, None, None, :]


def causal_mask(length: int, device=None, offset: int = 0) -> Tensor:
    """(1, 1, T, offset + T): query t (at absolute position offset + t) may attend keys <= offset + t.
    The same (read-only) tensor for the same square mask, which `attend` recognises."""
    if offset == 0:
        return _square_causal_mask(length, torch.device(device or "cpu"))
    q = torch.arange(offset, offset + length, device=device)[:, None]
    k = torch.arange(offset + length, device=device)[None, :]
    return (k <= q)[None, None]


@functools.lru_cache(maxsize=8)
def _square_causal_mask(length: int, device: torch.device) -> Tensor:
    return torch.ones(length, length, dtype=torch.bool, device=device).tril()[None, None]


# ------------------------------------------------------------------------------------ attention
# keys from which PyTorch's fused attention beats the explicit path in bf16 on a CPU, fwd+bwd, at a
# batch of 8,192 tokens, 4 heads of 32 or 64 (Xeon with AMX, torch 2.13): 192 keys 0.68-0.83x,
# 256 0.97-1.43x, 384 1.8-2.0x, 785 (a pixel model's image) 3.6x; forward alone 2.5-7x at 256-785
FUSED_FROM_KEYS = 256
# On a GPU, every fused kernel but cuDNN's: cuDNN builds a graph for each new shape (~0.6 s more for
# a step of new shapes below), and token-budget batches bring a new shape nearly every step. H200,
# torch 2.11, base model in bf16, batches of 25k tokens, ten steps of new shapes: 33k target tokens/s
# with cuDNN's, 221k without (HF Marian, which keeps it: 58k / 370k); the same ten shapes again, once
# built: 249k / 248k.
GPU_ATTENTION = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, dropout: nn.Module | None = None,
           need_weights: bool = False) -> tuple[Tensor, Tensor | None]:
    """softmax(q k^T / sqrt(Dh)) v, eq. (1). q (B, H, T, Dh), k and v (B, H, S, Dh); `dropout` (a
    Dropout module, in training mode or not) on the weights.

    The fast path is PyTorch's fused kernel; the explicit path also returns the weights (B, H, T, S).
    On a CPU in bf16/fp16 the explicit path is also the faster one at Multi30k lengths (3-8x,
    fwd+bwd, torch 2.13: docs/perf-log/2026-11.md), and the fused kernel, blocked where the explicit
    path writes out all S scores a query, from FUSED_FROM_KEYS keys on.
    """
    dropping = dropout is not None and dropout.training and dropout.p > 0
    if not need_weights and (q.is_cuda or q.dtype in (torch.float32, torch.float64) or k.size(-2) >= FUSED_FROM_KEYS):
        # told it is causal, the fused kernel skips the blocks above the diagonal (785 tokens: 1.4x fwd+bwd)
        T = q.size(-2)
        causal = mask is not None and mask.shape == (1, 1, T, T) and mask is causal_mask(T, mask.device)
        with sdpa_kernel(GPU_ATTENTION) if q.is_cuda else contextlib.nullcontext():
            return F.scaled_dot_product_attention(q, k, v, attn_mask=None if causal else mask, is_causal=causal,
                                                  dropout_p=dropout.p if dropping else 0.0), None
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))  # (B, H, T, S)
    if mask is not None:  # a -inf bias at the mask's own (broadcast) size: cheaper than masked_fill on scores
        bias = torch.zeros(mask.shape, dtype=scores.dtype, device=mask.device).masked_fill_(~mask, float("-inf"))
        scores = scores + bias
    if scores.dtype in (torch.bfloat16, torch.float16):  # PyTorch's own bf16 softmax is ~2.3x slower on a CPU
        weights = scores.softmax(dim=-1, dtype=torch.float32).to(scores.dtype)
    else:
        weights = scores.softmax(dim=-1)
    if mask is not None and not bool(mask.any(dim=-1).all()):
        # a row with nothing to attend to (an all-padding source): zeros, as SDPA gives
        weights = weights.masked_fill(~mask, 0.0)
    out = (dropout(weights) if dropping else weights) @ v
    return out, weights


def attend_to_source(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, dropout: nn.Module | None = None,
                     need_weights: bool = False) -> tuple[Tensor, Tensor | None]:
    """Cross-attention with the heads merged: q (B, H, T, Dh) -> (B, T, H * Dh) [, weights (B, H, T, S)].

    k, v (b, H, S, Dh) and mask (b, 1, 1, S) may hold one source for each group of g = B // b
    consecutive query rows (beam search's k beams of a sentence). The group's g * T queries then
    attend together, as one row of g * T queries: the source's keys and values are neither copied
    for each beam nor read once per beam, and the attention kernel gets g * T queries instead of T.
    """
    B, H, T, Dh = q.shape
    b = k.size(0)
    g = B // b
    if g > 1:  # (b * g, H, T, Dh) -> (b, H, g * T, Dh)
        q = q.view(b, g, H, T, Dh).transpose(1, 2).reshape(b, H, g * T, Dh)
    out, weights = attend(q, k, v, mask, dropout, need_weights)
    if weights is not None and g > 1:
        weights = weights.view(b, H, g, T, -1).transpose(1, 2).reshape(B, H, T, -1)
    return out.view(b, H, g, T, Dh).permute(0, 2, 3, 1, 4).reshape(B, T, H * Dh), weights


def split_kv(kv: Tensor, n_heads: int) -> tuple[Tensor, Tensor]:
    """A source's [keys | values] projection (B, S, 2D) -> keys and values, heads split: (B, H, S, Dh) each."""
    B, S, _ = kv.shape
    k, v = kv.chunk(2, dim=-1)
    return k.view(B, S, n_heads, -1).transpose(1, 2), v.view(B, S, n_heads, -1).transpose(1, 2)


def linear_rows(linear: nn.Linear, x: Tensor, rows: slice) -> Tensor:
    """The outputs `rows` of linear(x): cross-attention's query or key/value part of the fused in_proj.
    A linear layer with a faster product for its own weight (aiayn.fast.onednn) computes it too."""
    own = getattr(linear, "forward_rows", None)
    if own is not None:
        return own(x, rows)
    return F.linear(x, linear.weight[rows], linear.bias[rows] if linear.bias is not None else None)


class MultiHeadAttention(nn.Module):
    """§3.2.2. Projections are fused: one (3D, D) matrix in the layout of nn.MultiheadAttention."""

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0):
        super().__init__()
        self.d_model, self.n_heads = d_model, n_heads
        self.in_proj = nn.Linear(d_model, 3 * d_model)   # rows: W_q, W_k, W_v
        self.out_proj = nn.Linear(d_model, d_model)      # W_o
        self.dropout = nn.Dropout(dropout)               # on the attention weights (not in the paper)

    def _heads(self, x: Tensor) -> Tensor:
        B, T, _ = x.shape
        return x.view(B, T, self.n_heads, -1).transpose(1, 2)  # (B, T, D) -> (B, H, T, Dh)

    def kv_projection(self, source: Tensor) -> Tensor:
        """[keys | values] of a source (B, S, D) -> (B, S, 2D): what cross-attention computes once per sentence."""
        return linear_rows(self.in_proj, source, slice(self.d_model, None))

    def project_kv(self, source: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values of a source (B, S, D), heads split: (B, H, S, Dh) each."""
        return split_kv(self.kv_projection(source), self.n_heads)

    def forward(self, x: Tensor, mask: Tensor | None = None, *,
                kv: Tensor | tuple[Tensor, Tensor] | None = None,
                cache: tuple[Tensor, Tensor, int] | None = None,
                need_weights: bool = False) -> tuple[Tensor, Tensor | None]:
        """Self-attention over x (B, T, D), or cross-attention to precomputed keys and values `kv`:
        a source's `kv_projection` (B, S, 2D), or `project_kv`'s heads (b, H, S, Dh), which may hold
        one source for each group of consecutive rows of x (`attend_to_source`).

        cache=(k_buf, v_buf, start) for incremental self-attention: this call's keys and values are
        written at positions start..start+T of the (B, H, L, Dh) buffers and the queries attend to
        everything up to there.
        """
        if kv is None:
            out, weights = self.self_attention(self.in_proj(x), mask, cache, need_weights)
        else:
            q = linear_rows(self.in_proj, x, slice(None, self.d_model))
            out, weights = self.cross_attention(q, kv, mask, need_weights)
        return self.out_proj(out), weights

    def self_attention(self, qkv: Tensor, mask: Tensor | None, cache: tuple[Tensor, Tensor, int] | None,
                       need_weights: bool) -> tuple[Tensor, Tensor | None]:
        """The fused projection [q | k | v] (B, T, 3D) -> the heads' outputs merged (B, T, D) [, weights]."""
        q, k, v = (self._heads(t) for t in qkv.chunk(3, dim=-1))
        if cache is not None:
            k_buf, v_buf, start = cache
            end = start + qkv.size(1)
            k_buf[:, :, start:end] = k
            v_buf[:, :, start:end] = v
            k, v = k_buf[:, :, :end], v_buf[:, :, :end]
        out, weights = self.attend(q, k, v, mask, need_weights)
        B, H, T, Dh = out.shape
        return out.transpose(1, 2).reshape(B, T, H * Dh), weights  # (B, H, T, Dh) -> (B, T, D)

    def cross_attention(self, q: Tensor, kv: Tensor | tuple[Tensor, Tensor], mask: Tensor | None,
                        need_weights: bool) -> tuple[Tensor, Tensor | None]:
        """Queries (B, T, D), heads not yet split, and a source's keys and values -> (B, T, D) [, weights]."""
        if isinstance(kv, Tensor):
            kv = split_kv(kv, self.n_heads)
        return attend_to_source(self._heads(q), *kv, mask, self.dropout, need_weights)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None,
               need_weights: bool) -> tuple[Tensor, Tensor | None]:
        """Eq. (1) for the heads q (B, H, T, Dh), k and v (B, H, S, Dh)."""
        return attend(q, k, v, mask, self.dropout, need_weights)


# ------------------------------------------------------------------------------------ KV cache
@dataclass(eq=False)  # (compared, and hashed, by identity: a cache is one decoding's state)
class KVCache:
    """Everything incremental decoding keeps between steps, as explicit tensors (one per layer).

    self_k, self_v: (B, H, L, Dh) buffers for the longest output (`capacity`), filled up to `length`;
    after a `reorder`, read them through `layer`.
    cross_k, cross_v: (b, H, S, Dh) keys/values of the encoder output, computed once per source
    (empty lists for a decoder-only model). memory_mask: (b, 1, 1, S) or None. b is B, one source
    per row, or B / g where each group of g consecutive rows shares one source (beam search).
    rows_per_source: the g that `reorder` keeps the sources at when the new rows allow it (beam
    search sets its beam size; 1 keeps one source row per row).
    """

    self_k: list[Tensor]
    self_v: list[Tensor]
    cross_k: list[Tensor]
    cross_v: list[Tensor]
    memory_mask: Tensor | None = None
    length: int = 0
    rows_per_source: int = 1

    def __post_init__(self) -> None:
        self._capacity = self.self_k[0].size(2) if self.self_k else 0
        self._rows = self.self_k[0].size(0) if self.self_k else 0
        self._pending: list[Tensor | None] = [None] * len(self.self_k)  # a row order not yet applied

    def layer(self, i: int, new: int = 1) -> tuple[Tensor, Tensor, int]:
        """Layer i's self-attention buffers and length (k_buf, v_buf, length), for
        `MultiHeadAttention`: its rows in the current order, with room for `new` more positions.

        A pending `reorder` is applied here, just before the layer's attention reads the buffers:
        one index_select of the filled part into a fresh buffer with room for exactly `new` more
        positions. The attention then reads rows that are contiguous and still in the CPU's caches
        (beam search, small model, 1 thread: fp32 3-10%, int8 12-16% more tokens/s than copying
        every layer's rows into full-length buffers at `reorder`). A buffer too short for the next
        positions grows back to the full capacity.
        """
        indices, L = self._pending[i], self.length
        if indices is None and self.self_k[i].size(2) >= L + new:
            return self.self_k[i], self.self_v[i], L
        rows = self._rows
        room = L + new if indices is not None else self._capacity
        for bufs in (self.self_k, self.self_v):
            buf = bufs[i]
            fresh = buf.new_empty((rows, buf.size(1), room, buf.size(3)))
            if indices is None:
                fresh[:, :, :L] = buf[:, :, :L]
            else:
                torch.index_select(buf[:, :, :L], 0, indices, out=fresh[:, :, :L])
            bufs[i] = fresh
        self._pending[i] = None
        return self.self_k[i], self.self_v[i], L

    def pending_order(self) -> Tensor | None:
        """The row order that every layer's buffers still wait for (one order, none applied yet), if
        it can be applied in place: as many rows as the buffers hold and room for one more position.
        A caller that applies it itself (aiayn's one-call decoding step gathers the rows in C) then
        calls `order_applied`. None otherwise (`layer` applies it)."""
        order = self._pending[0] if self._pending else None
        if order is None or any(p is not order for p in self._pending):
            return None
        L, rows = self.length, self._rows
        if any(b.size(0) != rows or b.size(2) <= L for b in (*self.self_k, *self.self_v)):
            return None
        return order

    def order_applied(self) -> None:
        """The pending row order was applied to every layer's buffers (see `pending_order`)."""
        self._pending = [None] * len(self._pending)

    @property
    def capacity(self) -> int:
        """The most positions the cache holds."""
        return self._capacity

    @property
    def batch_size(self) -> int:
        return self._rows

    @property
    def n_sources(self) -> int:
        """Rows of the cross-attention keys/values (0 without any)."""
        if self.cross_k:
            return self.cross_k[0].size(0)
        return 0 if self.memory_mask is None else self.memory_mask.size(0)

    def reorder(self, indices: Tensor) -> None:
        """Keep rows `indices` of the batch, in that order (beam search's one hook).

        It may also shrink the batch (finished sentences dropped) or grow it (a row repeated for each
        beam). The self-attention rows are copied later, layer by layer (`layer`). The sources' keys,
        values and mask are kept at one row per group of `rows_per_source` new rows where every row of a
        group comes from the same source (else one per row), and copied only when that changes which
        sources are kept: not when beams are merely reordered among the rows of their sentence.
        """
        n = indices.numel()
        n_sources = self.n_sources
        rows_per_old_source = self.batch_size // n_sources if n_sources else 1
        for i, pending in enumerate(self._pending):  # compose with a reorder not yet applied
            self._pending[i] = indices if pending is None else pending[indices]
        self._rows = n
        g = self.rows_per_source
        if not n_sources or (n_sources == 1 and n == g):  # (one sentence's beams: its one source stays)
            return
        sources = indices // rows_per_old_source  # (n,) the source of each new row
        if g > 1 and n % g == 0:
            groups = sources.view(-1, g)
            if bool((groups == groups[:, :1]).all()):
                sources = groups[:, 0]
        if sources.numel() == n_sources and torch.equal(sources, torch.arange(n_sources, device=sources.device)):
            return
        for bufs in (self.cross_k, self.cross_v):
            for i, t in enumerate(bufs):
                bufs[i] = t.index_select(0, sources)
        if self.memory_mask is not None:
            self.memory_mask = self.memory_mask.index_select(0, sources)
