"""Token-budget batches (§5.1): sentences of similar length batched together, so padding stays low.

A batch holds as many sentence pairs as fit in `max_tokens` padded positions (source or target,
whichever is longer). The order is a pure function of (seed, epoch), so a resumed run sees exactly
the batches it would have seen.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from aiayn.data.tokenizer import BOS, EOS, PAD


@dataclass
class Batch:
    src: Tensor      # (B, S) source ids, right-padded
    tgt_in: Tensor   # (B, T) <s> y1 .. yn, right-padded
    tgt_out: Tensor  # (B, T) y1 .. yn </s>, right-padded
    pad_id: int = PAD  # an imported model's tokenizer may pad with another id

    @property
    def n_tokens(self) -> int:
        return int((self.tgt_out != self.pad_id).sum())

    def to(self, device) -> "Batch":
        return Batch(self.src.to(device), self.tgt_in.to(device), self.tgt_out.to(device), self.pad_id)


def pad(seqs: list[list[int]], value: int = PAD) -> Tensor:
    out = torch.full((len(seqs), max(map(len, seqs))), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    return out


def collate(pairs: list[tuple[list[int], list[int]]], pad_id: int = PAD, bos_id: int = BOS,
            eos_id: int = EOS) -> Batch:
    """Sentence pairs -> a padded Batch; the special ids are the tokenizer's (aiayn's own by default)."""
    src = pad([s for s, _ in pairs], pad_id)
    tgt_in = pad([[bos_id] + t for _, t in pairs], pad_id)
    tgt_out = pad([t + [eos_id] for _, t in pairs], pad_id)
    return Batch(src, tgt_in, tgt_out, pad_id)


def token_batches(pairs: list[tuple[list[int], list[int]]], max_tokens: int, seed: int = 0,
                  epoch: int = 0, shuffle: bool = True) -> list[list[int]]:
    """Indices of `pairs` grouped into batches of at most `max_tokens` padded positions.

    Pairs are sorted by (target length, source length), ties broken at random, then cut into
    batches greedily; the batches themselves are shuffled.
    """
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    noise = torch.rand(len(pairs), generator=g).tolist() if shuffle else [0.0] * len(pairs)
    order = sorted(range(len(pairs)), key=lambda i: (len(pairs[i][1]), len(pairs[i][0]), noise[i]))
    batches, current, longest = [], [], 0
    for i in order:
        n = max(len(pairs[i][0]), len(pairs[i][1]) + 1)
        if current and max(longest, n) * (len(current) + 1) > max_tokens:
            batches.append(current)
            current, longest = [], 0
        current.append(i)
        longest = max(longest, n)
    if current:
        batches.append(current)
    if shuffle:
        perm = torch.randperm(len(batches), generator=g).tolist()
        batches = [batches[j] for j in perm]
    return batches
