"""Batched greedy search for the encoder-decoder, over `encode` / `init_cache` / `decode_step`.

Shape legend: B sentences, b sentences still decoding, S source length, L longest output, V vocabulary.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from aiayn import kernels
from aiayn.errors import InputError


@contextlib.contextmanager
def evaluating(model) -> Iterator[None]:
    """Run the block with `model` in eval mode (no dropout) and restore its mode afterwards."""
    was_training = isinstance(model, nn.Module) and model.training
    if was_training:
        model.eval()
    try:
        yield
    finally:
        if was_training:
            model.train()


def max_output_lengths(src: Tensor, pad_id: int, max_extra: int, max_len: int) -> Tensor:
    """(B, S) source -> (B,) longest output per sentence, EOS not counted.

    §6.1: "maximum output length to input length + 50". It is capped at max_len - 1 because the
    decoder reads BOS + y, as in training, where |y| + 1 <= max_len.
    """
    if max_extra < 0:
        raise InputError(f"max_extra must be >= 0, got {max_extra}")
    return ((src != pad_id).sum(1) + max_extra).clamp(1, max_len - 1)


def row_argmax(x: Tensor, block: int = 64) -> Tensor:
    """x.argmax(-1) for (N, V) rows much longer than `block`: the first index of each row's maximum.

    torch's argmax over rows of (64, 8000) takes ~290 us on this CPU (1 thread), amax 24 us: so the
    block with the largest maximum is found first, then the maximum within it (~60 us). Rows in
    bf16/fp16 are searched as fp32: bf16's amax is ~9x slower than its conversion plus fp32's. A CPU's
    trick: on a GPU argmax is one kernel, the blocks would be eight."""
    n, V = x.shape
    if not x.is_cpu:
        return x.argmax(-1)
    if x.dtype in (torch.bfloat16, torch.float16):
        x = x.float()
    n_blocks = -(-V // block)
    if n_blocks < 4:
        return x.argmax(-1)
    full = V // block * block
    maxima = x[:, :full].view(n, -1, block).amax(-1)  # (N, V // block)
    if full < V:  # the partial last block
        maxima = torch.cat([maxima, x[:, full:].amax(-1, keepdim=True)], dim=1)
    first = maxima.argmax(-1, keepdim=True) * block  # (N, 1) start of the first block holding it
    # a partial last block repeats its last entry, which argmax's first-index rule never prefers
    idx = (first + torch.arange(block, device=x.device)).clamp_(max=V - 1)  # (N, block)
    return idx.gather(1, x.gather(1, idx).argmax(-1, keepdim=True)).squeeze(1)


@torch.no_grad()
def greedy(model, src: Tensor, bos_id: int, eos_id: int, max_extra: int = 50,
           min_len: int = 0) -> list[list[int]]:
    """Greedy decoding of a padded batch of sources (B, S) -> B token lists, without BOS and EOS.

    Each sentence ends at EOS or after `max_output_lengths` tokens. Finished sentences leave the
    batch (cache.reorder), so later steps only compute the sentences still going. The pad id is
    never generated, nor EOS before min_len tokens (benchmarks force output lengths with it). One
    sentence through an inference copy (aiayn.fast) is decoded in one kernel call where the kernels
    take it (FastTransformer.greedy_one: every step in C, the same tokens).
    """
    cfg = model.cfg
    B = src.size(0)
    limits = max_output_lengths(src, cfg.pad_id, max_extra, cfg.max_len)  # (B,)
    L = int(limits.max())
    with evaluating(model):
        memory, memory_mask = model.encode(src)
        if B == 1 and hasattr(model, "greedy_one"):  # an inference copy: the whole loop in C
            found = model.greedy_one(memory, memory_mask, L, (cfg.pad_id,), min_len, bos_id, eos_id)
            if found is not None:
                return [found]
        cache = model.init_cache(memory, memory_mask, L)
        out = torch.full((B, L), eos_id, dtype=torch.long, device=src.device)  # EOS-filled: cut there
        alive = torch.arange(B, device=src.device)  # (b,) sentence of each cache row
        row_limits = limits.clone()  # (b,) longest output of each cache row's sentence
        tokens = torch.full((B, 1), bos_id, dtype=torch.long, device=src.device)
        pad = torch.tensor([cfg.pad_id], device=src.device)
        pad_eos = torch.tensor([cfg.pad_id, eos_id], device=src.device)
        for t in range(L):
            logits = model.decode_step(tokens, cache)  # (b, 1, V), a fresh tensor: changed in place
            banned = pad_eos if t < min_len else pad
            nxt = torch.empty_like(tokens)  # (b, 1)
            # aiayn.kernels: the next tokens, their outputs and the count of rows done in one call
            n_done = kernels.greedy_step(logits, banned, nxt, out, alive, t, eos_id, row_limits)
            if n_done is None:  # the same with PyTorch's ops
                nxt = row_argmax(logits[:, -1].index_fill_(-1, banned, float("-inf")))[:, None]
                out[alive, t] = nxt[:, 0]
                n_done = int(((nxt[:, 0] == eos_id) | (row_limits <= t + 1)).sum())
            if n_done == nxt.size(0):
                break
            if n_done:
                keep = ((nxt[:, 0] != eos_id) & (row_limits > t + 1)).nonzero().squeeze(1)
                cache.reorder(keep)
                alive, nxt, row_limits = alive[keep], nxt[keep], row_limits[keep]
            tokens = nxt  # (b, 1)
    results = []
    for row in out.tolist():
        results.append(row[:row.index(eos_id)] if eos_id in row else row)
    return results
