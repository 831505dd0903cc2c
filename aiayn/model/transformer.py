"""The encoder-decoder Transformer (§3, Figure 1) and the decoder-only language model built from it.

Shape legend: B batch, S source length, T target length, D d_model, V vocabulary, H heads.
Both models offer the same incremental-decoding interface -- `init_cache` and `decode_step` --
so that greedy, beam and sampling search (aiayn.decode) work with either.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from aiayn.config import ModelConfig
from aiayn.errors import InputError
from aiayn.model.attention import KVCache, causal_mask, padding_mask
from aiayn.model.layers import Embedding, Stack


def _init_weights(module: nn.Module, d_model: int) -> None:
    for name, p in module.named_parameters():
        if name.endswith("tokens.weight"):
            nn.init.normal_(p, 0.0, d_model ** -0.5)  # unit variance once scaled by sqrt(d_model)
        elif p.dim() > 1:
            nn.init.xavier_uniform_(p)
        elif name.endswith(".bias"):
            nn.init.zeros_(p)


class _Decoding(nn.Module):
    """What the encoder-decoder and the language model share: the decoder stack and its output."""

    cfg: ModelConfig
    tgt_embed: Embedding
    decoder: Stack
    generator: nn.Linear

    def logits(self, hidden: Tensor) -> Tensor:
        """(..., D) -> (..., V): the pre-softmax linear transformation (§3.4)."""
        return self.generator(hidden)

    def _new_cache(self, batch: int, max_len: int, device, dtype, cross_k=(), cross_v=(), memory_mask=None):
        H, Dh = self.cfg.n_heads, self.cfg.head_dim
        n = len(self.decoder.layers)
        shape = (batch, H, max_len, Dh)
        # not zeroed: a cache reads only the positions it has written (zeroing a batch of 64's caches
        # faulted in every page of them, the positions never reached too: greedy int8 7% slower)
        return KVCache([torch.empty(shape, device=device, dtype=dtype) for _ in range(n)],
                       [torch.empty(shape, device=device, dtype=dtype) for _ in range(n)],
                       list(cross_k), list(cross_v), memory_mask)

    def decode_step(self, tokens: Tensor, cache: KVCache) -> Tensor:
        """Feed the next T tokens (B, T) (usually T = 1) and return their logits (B, T, V).

        Keys and values of the new positions are appended to `cache`; earlier ones are reused.
        """
        start, T = cache.length, tokens.size(1)
        if start + T > cache.capacity:
            raise InputError(f"KV cache holds {cache.capacity} positions; {start + T} needed")
        x = self.tgt_embed(tokens, start=start)
        mask = None if T == 1 else causal_mask(T, tokens.device, offset=start)  # one new token sees all
        h, _ = self.decoder(x, mask, memory_mask=cache.memory_mask, cache=cache)
        cache.length += T
        return self.logits(h)


class Transformer(_Decoding):
    """The encoder-decoder of Figure 1."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.n_encoder_layers < 1:
            raise InputError("an encoder-decoder needs n_encoder_layers >= 1")
        self.cfg = cfg
        self.src_embed = Embedding(cfg.vocab_size, cfg)
        shared = self.src_embed.tokens if cfg.tie_embeddings else None  # §3.4: one matrix, three uses
        self.tgt_embed = Embedding(cfg.target_vocab, cfg, tokens=shared)
        self.encoder = Stack(cfg, cfg.n_encoder_layers)
        self.decoder = Stack(cfg, cfg.n_decoder_layers, cross_attention=True)
        self.generator = nn.Linear(cfg.d_model, cfg.target_vocab, bias=cfg.output_bias)
        _init_weights(self, cfg.d_model)
        if cfg.tie_embeddings:
            self.generator.weight = self.tgt_embed.tokens.weight

    def encode(self, src: Tensor, need_weights: bool = False):
        """src (B, S) -> memory (B, S, D) and its padding mask (B, 1, 1, S) [, weights per layer]."""
        mask = padding_mask(src, self.cfg.pad_id)
        memory, weights = self.encoder(self.src_embed(src), mask, need_weights=need_weights)
        return (memory, mask, weights) if need_weights else (memory, mask)

    def decode(self, tgt: Tensor, memory: Tensor, memory_mask: Tensor, need_weights: bool = False):
        """Teacher-forced decoder over the whole target (B, T) -> hidden states (B, T, D).

        Targets are right-padded, so the causal mask alone keeps every real position off padding.
        """
        mask = causal_mask(tgt.size(1), tgt.device)
        h, weights = self.decoder(self.tgt_embed(tgt), mask, memory=memory, memory_mask=memory_mask,
                                  need_weights=need_weights)
        return (h, weights) if need_weights else h

    def forward(self, src: Tensor, tgt: Tensor) -> Tensor:
        """src (B, S), shifted target (B, T) -> logits (B, T, V)."""
        memory, memory_mask = self.encode(src)
        return self.logits(self.decode(tgt, memory, memory_mask))

    def init_cache(self, memory: Tensor, memory_mask: Tensor, max_len: int) -> KVCache:
        """A cache for `max_len` target positions; cross-attention keys/values computed once here."""
        # contiguous: (B, H, S, Dh) views of one projection would be copied by every step's matmul
        kvs = [layer.cross_attn.project_kv(memory) for layer in self.decoder.layers]
        return self._new_cache(memory.size(0), max_len, memory.device, memory.dtype,
                               [k.contiguous() for k, _ in kvs], [v.contiguous() for _, v in kvs], memory_mask)


class LanguageModel(_Decoding):
    """A decoder-only (GPT-style) model: the decoder stack without cross-attention, causal mask."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tgt_embed = Embedding(cfg.target_vocab, cfg)
        self.decoder = Stack(cfg, cfg.n_decoder_layers)
        self.generator = nn.Linear(cfg.d_model, cfg.target_vocab, bias=cfg.output_bias)
        _init_weights(self, cfg.d_model)
        if cfg.tie_embeddings:
            self.generator.weight = self.tgt_embed.tokens.weight

    def hidden(self, tokens: Tensor, need_weights: bool = False):
        """tokens (B, T) -> hidden states (B, T, D) [, attention weights per layer]."""
        h, weights = self.decoder(self.tgt_embed(tokens), causal_mask(tokens.size(1), tokens.device),
                                  need_weights=need_weights)
        return (h, weights) if need_weights else h

    def forward(self, tokens: Tensor) -> Tensor:
        return self.logits(self.hidden(tokens))

    def init_cache(self, batch: int, max_len: int, device=None, dtype=None) -> KVCache:
        p = self.generator.weight
        return self._new_cache(batch, max_len, device or p.device, dtype or p.dtype)


def build_model(cfg: ModelConfig) -> Transformer | LanguageModel:
    return Transformer(cfg) if cfg.n_encoder_layers else LanguageModel(cfg)
