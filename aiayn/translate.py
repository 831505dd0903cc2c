"""Translating sentences with a trained encoder-decoder: tokenize, batch by length, search, detokenize."""

from __future__ import annotations

import contextlib
import warnings

import torch

from aiayn.data.batching import pad


def translate(model, tokenizer, sentences: list[str], beam: int = 1, alpha: float = 0.6,
              max_tokens: int = 8192, device: str = "cpu", precision: str = "fp32",
              n_best: int = 1) -> list[str] | list[list[tuple[str, float]]]:
    """Translate `sentences` (in order). With n_best > 1, each item is a best-first list of
    (translation, score). Sources longer than the model's maximum length are truncated."""
    from aiayn.decode import beam_search, greedy

    max_src = model.cfg.max_len - 1
    ids = [tokenizer.encode(s) for s in sentences]
    too_long = [i for i, x in enumerate(ids) if len(x) > max_src]
    if too_long:
        warnings.warn(f"{len(too_long)} input(s) longer than the model's maximum of {max_src} tokens were "
                      f"truncated (the first is input {too_long[0] + 1})", stacklevel=2)
    ids = [x[:max_src] or [tokenizer.unk_id] for x in ids]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    results: list = [None] * len(ids)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    cast = torch.autocast(torch.device(device).type, dtype=dtype) if dtype else contextlib.nullcontext()
    start = 0
    with torch.inference_mode(), cast:
        while start < len(order):
            # as many sentences as fit in the token budget (beam hypotheses count as sentences)
            longest, end = 0, start
            while end < len(order) and max(longest, len(ids[order[end]]) + 50) * (end - start + 1) * beam <= max_tokens:
                longest = max(longest, len(ids[order[end]]) + 50)
                end += 1
            end = max(end, start + 1)
            chunk = order[start:end]
            src = pad([ids[i] for i in chunk]).to(device)
            if beam == 1 and n_best == 1:
                out = [[(toks, 0.0)] for toks in greedy(model, src, tokenizer.bos_id, tokenizer.eos_id)]
            else:
                out = beam_search(model, src, tokenizer.bos_id, tokenizer.eos_id, beam_size=beam, alpha=alpha,
                                  n_best=n_best)
            for i, hyps in zip(chunk, out):
                results[i] = [(tokenizer.decode(toks), float(score)) for toks, score in hyps]
            start = end
    return [r[0][0] for r in results] if n_best == 1 else results
