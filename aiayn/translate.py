"""Translating sentences with a trained encoder-decoder: tokenize, batch by length, search, detokenize."""

from __future__ import annotations

import warnings

import torch

from aiayn.data.batching import pad
from aiayn.inference import inference_model


def translate(model, tokenizer, sentences: list[str], beam: int = 1, alpha: float = 0.6,
              max_tokens: int = 8192, device: str = "cpu", precision: str = "fp32",
              n_best: int = 1) -> list[str] | list[list[tuple[str, float]]]:
    """Translate `sentences` (in order). With n_best > 1, each item is a best-first list of
    (translation, score). Sources longer than the model's maximum length are truncated.

    precision: fp32, bf16, int8 (CPU) or fp16 (GPU); decoding runs on an inference copy of the
    model (aiayn.inference: oneDNN linears, cast or quantized weights), the model is left as it is."""
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
    was_training = model.training
    fast = inference_model(model, precision)
    start = 0
    # no autocast: the inference copy has its precision (a training run validates inside one)
    with torch.inference_mode(), torch.autocast(torch.device(device).type, enabled=False):
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
                out = [[(toks, 0.0)] for toks in greedy(fast, src, tokenizer.bos_id, tokenizer.eos_id)]
            else:
                out = beam_search(fast, src, tokenizer.bos_id, tokenizer.eos_id, beam_size=beam, alpha=alpha,
                                  n_best=n_best)
            for i, hyps in zip(chunk, out):
                results[i] = [(tokenizer.decode(toks), float(score)) for toks, score in hyps]
            start = end
    model.train(was_training)  # inference_model may have set eval mode on the model itself (fp32 on a GPU)
    return [r[0][0] for r in results] if n_best == 1 else results
