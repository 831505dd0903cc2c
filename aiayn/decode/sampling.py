"""Sampling from a language model: small pure filters over logits, and a streaming `generate`.

Shape legend: N samples, T tokens, V vocabulary. Filters act on the last dimension of any (..., V)
tensor and return new logits, with the tokens they remove set to -inf.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from aiayn.decode.greedy import evaluating, row_argmax
from aiayn.errors import InputError


def _check(temperature: float, top_k: int | None, top_p: float | None) -> None:
    if temperature < 0:
        raise InputError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise InputError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise InputError(f"top_p must be in (0, 1], got {top_p}")


def apply_temperature(logits: Tensor, temperature: float) -> Tensor:
    """logits / temperature: below 1 sharpens the distribution, above 1 flattens it."""
    if temperature <= 0:
        raise InputError(f"temperature must be > 0 to scale logits, got {temperature}")
    return logits / temperature


def top_k_filter(logits: Tensor, k: int) -> Tensor:
    """Keep the k most likely tokens (more on ties with the k-th)."""
    _check(temperature=1.0, top_k=k, top_p=None)
    if k >= logits.size(-1):
        return logits
    kth = logits.topk(k, dim=-1).values[..., -1:]  # (..., 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: Tensor, p: float) -> Tensor:
    """Nucleus sampling (Holtzman et al., 2020): keep the smallest set of most likely tokens whose
    probabilities add up to at least p. The most likely token is always kept."""
    _check(temperature=1.0, top_k=None, top_p=p)
    if p >= 1:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs  # mass of the more likely tokens
    drop_sorted = before >= p  # the tokens before these already reach p
    drop_sorted[..., 0] = False  # the most likely always stays (a p that is 0 in float32 would drop it)
    drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocabulary order
    return logits.masked_fill(drop, float("-inf"))


def sample_next(logits: Tensor, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> Tensor:
    """One token id per row of logits (..., V) -> (...). Temperature 0 is argmax (greedy).

    Order of operations: temperature, then top-k, then top-p, then a draw from the softmax.
    """
    _check(temperature, top_k, top_p)
    if temperature == 0:
        return row_argmax(logits.reshape(-1, logits.size(-1))).view(logits.shape[:-1])
    logits = logits.float()
    # shifted so that the largest is 0: a tiny temperature then gives -inf, never inf - inf; and
    # 0 / a temperature that is 0 in float32 (below ~1e-45) stays 0
    logits = apply_temperature(logits - logits.amax(dim=-1, keepdim=True), temperature).nan_to_num_(nan=0.0)
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    if top_p is not None:
        logits = top_p_filter(logits, top_p)
    probs = logits.softmax(dim=-1).reshape(-1, logits.size(-1))  # (rows, V)
    return torch.multinomial(probs, 1, generator=generator).view(logits.shape[:-1])


def generate(model, prompt_ids: Sequence[int] | Tensor, max_new_tokens: int, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
             num_samples: int = 1, stop_id: int | None = None,
             with_logits: bool = False) -> Iterator[list[int]] | Iterator[tuple[Tensor, Tensor]]:
    """Continue a prompt with a language model, yielding the new token ids one step at a time:
    a list of num_samples ids per step, so that a caller can stream them.

    The KV cache makes each step cost one token. The model sees at most cfg.max_len tokens (a longer
    prompt keeps its end); when the cache is full, the window slides: the cache is rebuilt from the
    last max_len // 2 tokens, which costs one prefill every max_len // 2 steps (positions restart at
    0, as the model only knows absolute positions below max_len).

    seed makes the draws reproducible (a private torch.Generator); without it the global RNG is used.
    With stop_id, generation ends once every sample has produced it; a sample that has stopped yields
    cfg.pad_id afterwards. The caller may also stop early by leaving the loop. Arguments are checked
    here, before the first step; the model is in eval mode while the generator runs.

    with_logits: yield (ids (N,), the model's logits (N, V) they were drawn from) instead, for
    callers that report probabilities (the HTTP server's logprobs and top tokens).
    """
    _check(temperature, top_k, top_p)
    if max_new_tokens < 0:
        raise InputError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if num_samples < 1:
        raise InputError(f"num_samples must be >= 1, got {num_samples}")
    param = next(model.parameters())
    prompt = torch.as_tensor(prompt_ids, dtype=torch.long, device=param.device).view(-1)  # (T,)
    if prompt.numel() == 0:
        raise InputError("the prompt needs at least one token (e.g. BOS)")
    generator = None
    if seed is not None:
        generator = torch.Generator(device=param.device).manual_seed(seed)
    steps = _generate(model, prompt, max_new_tokens, temperature, top_k, top_p, generator,
                      num_samples, stop_id, param.dtype)
    return steps if with_logits else (nxt.tolist() for nxt, _ in steps)


@torch.no_grad()
def _generate(model, prompt: Tensor, max_new_tokens: int, temperature: float, top_k: int | None,
              top_p: float | None, generator: torch.Generator | None, num_samples: int,
              stop_id: int | None, dtype: torch.dtype) -> Iterator[tuple[Tensor, Tensor]]:
    if max_new_tokens == 0:
        return
    window, device = model.cfg.max_len, prompt.device
    context = prompt[-window:].expand(num_samples, -1)  # (N, T): what the model sees
    stopped = torch.zeros(num_samples, dtype=torch.bool, device=device)
    with evaluating(model):
        cache = model.init_cache(num_samples, window, device, dtype)
        logits = model.decode_step(context, cache)[:, -1]  # (N, V): prefill
        for i in range(max_new_tokens):
            nxt = sample_next(logits, temperature, top_k, top_p, generator)  # (N,)
            if stop_id is not None:
                nxt = nxt.masked_fill(stopped, model.cfg.pad_id)
                stopped |= nxt == stop_id
            yield nxt, logits
            if i == max_new_tokens - 1 or (stop_id is not None and bool(stopped.all())):
                return
            context = torch.cat([context, nxt[:, None]], dim=1)[:, -window:]  # (N, <= window)
            if cache.length == window:  # full: slide, re-reading the last window // 2 tokens
                cache = model.init_cache(num_samples, window, device, dtype)
                logits = model.decode_step(context[:, -(window // 2):], cache)[:, -1]
            else:
                logits = model.decode_step(nxt[:, None], cache)[:, -1]
