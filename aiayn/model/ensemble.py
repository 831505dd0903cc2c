"""Several encoder-decoders of one vocabulary decoding as one model (an ensemble).

The next-token distribution is the mean of the members' distributions, p(y) = (1/n) sum_i p_i(y),
returned as its logarithm: greedy and beam search (aiayn.decode) take an `Ensemble` wherever they
take a `Transformer`, through the same `encode` / `init_cache` / `decode_step` interface. Each member
keeps its own encoder output and KV cache; `EnsembleCache` forwards beam search's reorders to all.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from aiayn.errors import InputError


class EnsembleCache:
    """The members' KV caches, reordered together."""

    def __init__(self, caches: list):
        self.caches = caches

    @property
    def rows_per_source(self) -> int:
        return self.caches[0].rows_per_source

    @rows_per_source.setter
    def rows_per_source(self, g: int) -> None:
        for cache in self.caches:
            cache.rows_per_source = g

    def reorder(self, indices: Tensor) -> None:
        for cache in self.caches:
            cache.reorder(indices)


class Ensemble(nn.Module):
    """Encoder-decoders sharing one vocabulary (the same tokenizer), averaged in probability."""

    def __init__(self, models: Sequence[nn.Module]):
        super().__init__()
        if not models:
            raise InputError("an ensemble needs at least one model")
        first = models[0].cfg
        for m in models[1:]:
            c = m.cfg
            if (c.target_vocab, c.pad_id) != (first.target_vocab, first.pad_id):
                raise InputError(f"ensemble members must share one vocabulary: {first.target_vocab} tokens "
                                 f"(pad {first.pad_id}) against {c.target_vocab} (pad {c.pad_id})")
        self.members = nn.ModuleList(models)
        # the shortest maximum length holds for all (decoding caps outputs at cfg.max_len)
        self.cfg = first.replace(max_len=min(m.cfg.max_len for m in models))

    def encode(self, src: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """-> each member's (memory, memory_mask), as two lists."""
        outs = [m.encode(src) for m in self.members]
        return [memory for memory, _ in outs], [mask for _, mask in outs]

    def init_cache(self, memories: list[Tensor], masks: list[Tensor], max_len: int) -> EnsembleCache:
        return EnsembleCache([m.init_cache(mem, mask, max_len)
                              for m, mem, mask in zip(self.members, memories, masks)])

    def decode_step(self, tokens: Tensor, cache: EnsembleCache) -> Tensor:
        """(B, T) -> (B, T, V): log of the members' mean next-token probability (a fresh tensor)."""
        return _mean_probability([m.decode_step(tokens, c) for m, c in zip(self.members, cache.caches)])

    def forward(self, src: Tensor, tgt: Tensor) -> Tensor:
        """src (B, S), shifted target (B, T) -> (B, T, V) log-probabilities, as decode_step gives."""
        return _mean_probability([m(src, tgt) for m in self.members])


def _mean_probability(logits: list[Tensor]) -> Tensor:
    """log((1/n) sum_i softmax(logits_i)), in at least fp32."""
    lps = [torch.log_softmax(x, -1, dtype=torch.promote_types(x.dtype, torch.float32)) for x in logits]
    if len(lps) == 1:
        return lps[0]
    return torch.stack(lps).logsumexp(0) - math.log(len(lps))
