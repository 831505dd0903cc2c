"""Batched beam search (§6.1: beam size 4, length penalty alpha = 0.6), over the KV-cache interface.

As in fairseq, the search strategy -- `beam_step`, which picks the best extensions of the beams -- is
kept apart from the loop that calls the model and collects finished hypotheses (`search`), so each can
be tested on its own, `search` on a fake decoder.

Shape legend: B sentences, b sentences still decoding, k beam size, V vocabulary, t tokens so far.
The cache holds b * k rows, sentence-major: rows i*k .. i*k + k-1 are the beams of sentence i -- after
the first step. Before it, the k beams of a sentence would all be the same BOS, so the first step
runs one row per sentence (b * 1) and its 2k best tokens start the k beams (as CTranslate2 does).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from aiayn import kernels
from aiayn.decode.greedy import evaluating, max_output_lengths
from aiayn.errors import InputError

NEG_INF = float("-inf")
Hypothesis = tuple[list[int], float]  # tokens without BOS and EOS, length-normalised log-probability


# alpha at most this: ((5 + |Y|) / 6) ** alpha overflows a float past ~300 (the CLI, `aiayn average` and the
# server hold to it; the paper's 0.6 and the values tuned on validation data are well below)
MAX_ALPHA = 5.0


def length_penalty(length, alpha: float):
    """lp(Y) = ((5 + |Y|) / 6) ** alpha, of GNMT (Wu et al., 2016), which §6.1 uses with alpha = 0.6."""
    return ((5.0 + length) / 6.0) ** alpha


def beam_step(lprobs: Tensor, scores: Tensor, k: int, block: int = 64) -> tuple[Tensor, Tensor, Tensor]:
    """The search strategy: the 2k best one-token extensions of k beams.

    lprobs (b, r, V): log-probabilities of the next token after each of r beams (r = 1 on the first
    step, then k); scores (b, r): log-probabilities of the beams so far. Returns the candidates'
    scores, tokens and beams, each (b, 2k), best first. Twice the beam is kept so that k candidates
    remain even when k of them end with EOS; where r * V < 2k, the missing ones are -inf (dead).

    The 2k best of a sentence's r * V candidates lie in the 2k blocks of `block` tokens whose best
    candidates are best, so only those (and each row's partial last block) are searched: torch.topk
    on a CPU spends ~1 us a row, and searching (256, 8000) rows, then sentences, took 1.0 ms where
    the 64 sentences' blocks take ~0.35. Ties may pick other candidates of equal score. On a GPU, where
    topk is one kernel and the blocks' search a dozen, all candidates are searched at once.
    """
    b, r, V = lprobs.shape
    n = 2 * k
    n_blocks = V // block
    if r * n_blocks < 2 * n or not lprobs.is_cpu:  # too few blocks to pay: all r * V candidates at once
        cand = (scores[:, :, None] + lprobs).view(b, r * V)  # (b, r*V)
        top, idx = cand.topk(min(n, r * V), dim=1)  # (b, 2k)
        if top.size(1) < n:
            missing = n - top.size(1)
            top = torch.cat([top, top.new_full((b, missing), float("-inf"))], dim=1)
            idx = torch.cat([idx, idx.new_zeros(b, missing)], dim=1)
        return top, idx % V, idx // V
    full, arange = n_blocks * block, functools.partial(torch.arange, device=lprobs.device)
    maxima = lprobs[:, :, :full].unflatten(-1, (n_blocks, block)).amax(-1) + scores[:, :, None]  # (b, r, nb)
    best = maxima.view(b, r * n_blocks).topk(n, dim=1).indices  # (b, 2k): beam * nb + block
    beam = best // n_blocks
    # the blocks' candidates, by their flat index in the r * V candidates of their sentence
    ids = ((beam * V + best % n_blocks * block)[:, :, None] + arange(block)).view(b, n * block)
    cand = lprobs.reshape(-1).index_select(0, (arange(b)[:, None] * (r * V) + ids).view(-1))
    cand = (cand.view(b, n, block) + scores.gather(1, beam)[:, :, None]).view(b, n * block)
    if full < V:  # + each row's partial last block
        cand = torch.cat([cand, (scores[:, :, None] + lprobs[:, :, full:]).reshape(b, -1)], dim=1)
        tail_ids = (arange(r)[:, None] * V + arange(full, V)).view(1, -1)  # (1, r * (V - full))
        ids = torch.cat([ids, tail_ids.expand(b, -1)], dim=1)
    top, pos = cand.topk(n, dim=1)
    idx = ids.gather(1, pos)
    return top, idx % V, idx // V


def candidates(logits: Tensor, scores: Tensor, k: int, forbid: Tensor, eos_id: int, eos_banned: bool,
               at_limit: Tensor | None) -> tuple[Tensor, Tensor, Tensor, bool]:
    """One step's 2k best candidates of each sentence (scores, tokens, beams, each (b, 2k), best first):
    logits (b * r, 1, V) of r beams a sentence (changed in place), scores (b, r) so far; never a token
    of `forbid`, nor EOS if eos_banned, and only EOS for a sentence with at_limit (b,) set (None: for
    none). And whether the step is known to be quiet: no sentence has EOS among its k best or no
    finite candidate, so that every sentence's k best simply go on (False: not known)."""
    # aiayn.kernels: all of it in one pass over the logits (the operators below are its reference)
    cand = kernels.beam_candidates(logits, scores, 2 * k, forbid, eos_id, eos_banned, at_limit, keep=k)
    if cand is not None:
        *cand, unsettled = cand
        return (*cand, unsettled == 0)
    # in place: one fused kernel, ~2x faster on a CPU than logsumexp's passes and temporaries,
    # and (256, 8000) in 0.9 ms against 1.4 into a new tensor, whose 8 MB are not in the caches
    width = scores.size(1)
    lp = logits[:, -1].float()
    torch.log_softmax(lp, -1, out=lp)
    V = lp.size(-1)
    # the bans below come after the softmax: they do not renormalize
    if forbid.numel():
        lp.index_fill_(1, forbid, NEG_INF)
    if at_limit is None:
        at_limit = torch.zeros(scores.size(0), dtype=torch.bool, device=scores.device)
    row_at_limit = at_limit.repeat_interleave(width)  # (b*width,)
    if at_limit.any():  # (a full pass, so only on the steps that need it): nothing but EOS
        eos_lp = lp[:, eos_id].clone()
        lp.masked_fill_(row_at_limit[:, None], NEG_INF)
        lp[:, eos_id] = eos_lp
    if eos_banned:  # no EOS yet, except where the length limit forces it
        lp[:, eos_id].masked_fill_(~row_at_limit, NEG_INF)
    return (*beam_step(lp.view(-1, width, V), scores, k), False)


def search(decode_step: Callable[[Tensor, object], Tensor], cache, bos_id: int, eos_id: int,
           max_lens: Tensor, beam_size: int = 4, alpha: float = 0.6, n_best: int = 1,
           forbid: Sequence[int] = (), min_len: int = 0) -> list[list[Hypothesis]]:
    """Beam search over any `decode_step(tokens (N, 1), cache) -> logits (N, 1, V)`, which returns a
    fresh tensor at each call (search changes it in place).

    cache: empty, with one row per sentence (B rows), and a `reorder` that may grow it.
    max_lens (B,): the longest output of each sentence, EOS not counted; beams still alive at that
    length are ended with EOS. Token ids in `forbid` are never generated, nor EOS before min_len
    tokens (unless max_lens ends the beam first).

    A hypothesis ends when EOS is among the k best candidates of its sentence, and a sentence ends
    once it holds k finished hypotheses (fairseq's rule) or reaches its maximum length; it then leaves
    the batch. Hypotheses are ranked by log P(Y) / lp(|Y|), |Y| counting EOS (§6.1). Returns, for each
    sentence, its n_best hypotheses, best first.
    """
    k, B, device = beam_size, max_lens.numel(), max_lens.device
    width = 1  # cache rows per sentence: one until the first step has chosen k different beams
    scores = torch.zeros(B, width, device=device)
    hyps = torch.empty(B * width, 0, dtype=torch.long, device=device)  # (b * width, t): each cache row's tokens
    last = torch.full((B, width), bos_id, dtype=torch.long, device=device)
    alive = torch.arange(B, device=device)  # (b,) sentence of each group of cache rows
    n_finished = torch.zeros(B, dtype=torch.long, device=device)
    finished: list[list[Hypothesis]] = [[] for _ in range(B)]
    forbid = torch.tensor(list(forbid), dtype=torch.long, device=device)
    ranks = torch.arange(2 * k, device=device)  # the candidates' ranks; EOS ones pushed behind by + 2k
    lens = max_lens  # (b,) the longest output of each sentence still decoding
    first_limit = int(lens.min())  # no sentence must end before this step
    full = torch.zeros(B, dtype=torch.bool, device=device)  # (b,) sentences with k finished hypotheses
    starts = torch.arange(B, device=device)[:, None]  # (b, 1) each sentence's first cache row
    for step in range(int(max_lens.max()) + 1):
        logits = decode_step(last.reshape(-1, 1), cache)  # (b*width, 1, V), a fresh tensor
        regroup = width != k  # (the first step: from one cache row a sentence to k)
        at_limit = lens == step if step >= first_limit else None  # (b,) beams that must end now
        cand_scores, cand_tokens, cand_beams, quiet = candidates(logits, scores, k, forbid, eos_id, step < min_len,
                                                                 at_limit)  # (b, 2k) each
        if quiet and at_limit is None:  # (most steps) every sentence's k best go on: no EOS, none ends
            beams, last, scores = cand_beams[:, :k], cand_tokens[:, :k], cand_scores[:, :k].contiguous()
        else:
            # EOS among the k best candidates ends a hypothesis; -inf candidates are beams that never
            # lived (scores are log-probabilities, never +inf; `> -inf` is one operator, isfinite several)
            is_eos = cand_tokens == eos_id
            if is_eos[:, :k].any():
                ends = is_eos[:, :k] & (cand_scores[:, :k] > NEG_INF)
                rows, cols = ends.nonzero().unbind(1)  # row-major, so best first within a sentence
                final = (cand_scores[rows, cols] / length_penalty(step + 1, alpha)).tolist()
                tokens = hyps[starts[rows, 0] + cand_beams[rows, cols]].tolist()
                for s, toks, score in zip(alive[rows].tolist(), tokens, final):
                    if len(finished[s]) < k:
                        finished[s].append((toks, score))
                n_finished.index_add_(0, alive, ends.sum(1))
                full = n_finished[alive] >= k

            # the k best candidates that do not end with EOS go on
            pick = (ranks + is_eos * ranks.numel()).topk(k, dim=1, largest=False).indices  # (b, k), in rank order
            beams, last = cand_beams.gather(1, pick), cand_tokens.gather(1, pick)  # (b, k)
            scores = cand_scores.gather(1, pick)  # (best first: a sentence whose best is -inf has no live beam)

            done = full | (scores[:, 0] == NEG_INF)  # (b,)
            if at_limit is not None:
                done |= at_limit
            if done.any():  # sentences leave the batch
                keep = (~done).nonzero().squeeze(1)  # (b',)
                if keep.numel() == 0:
                    break
                beams, scores, last, alive = beams[keep], scores[keep], last[keep], alive[keep]
                lens, full, starts = lens[keep], full[keep], starts[keep]
                first_limit, regroup = int(lens.min()), True
        # one row order per step both follows the chosen beams and drops finished sentences
        order = (starts + beams).view(-1)  # (b' * k,) the cache row (and hyps row) each new row continues
        cache.reorder(order)
        hyps = torch.cat([hyps.index_select(0, order), last.reshape(-1, 1)], dim=1)  # (b' * k, t + 1)
        if regroup:  # the cache now holds k rows for each sentence still decoding, sentence-major
            width, starts = k, torch.arange(0, beams.size(0) * k, k, device=device)[:, None]
    return [sorted(f, key=lambda h: -h[1])[:n_best] for f in finished]


@torch.no_grad()
def beam_search(model, src: Tensor, bos_id: int, eos_id: int, beam_size: int = 4, alpha: float = 0.6,
                n_best: int = 1, max_extra: int = 50, min_len: int = 0) -> list[list[Hypothesis]]:
    """Beam search for the encoder-decoder: a padded batch of sources (B, S) -> for each sentence
    its n_best (tokens, score) pairs, best first; tokens without BOS and EOS.

    Outputs are at most source length + max_extra tokens (§6.1), capped by the model's max_len. The
    pad id is never generated, nor EOS before min_len tokens. One sentence through an inference copy
    (aiayn.fast) is searched in one kernel call where the kernels take it (FastTransformer.search_one:
    every step in C, the same hypotheses as `search`).
    """
    if beam_size < 1:
        raise InputError(f"beam_size must be >= 1, got {beam_size}")
    if not 1 <= n_best <= beam_size:
        raise InputError(f"n_best must be between 1 and beam_size ({beam_size}), got {n_best}")
    cfg = model.cfg
    max_lens = max_output_lengths(src, cfg.pad_id, max_extra, cfg.max_len)  # (B,)
    with evaluating(model):
        memory, memory_mask = model.encode(src)  # (B, S, D), (B, 1, 1, S)
        if src.size(0) == 1 and hasattr(model, "search_one"):  # an inference copy: the whole search in C
            found = model.search_one(memory, memory_mask, int(max_lens[0]), beam_size, alpha, (cfg.pad_id,),
                                     min_len, bos_id, eos_id)
            if found is not None:
                return [sorted(found, key=lambda h: -h[1])[:n_best]]
        # one row per sentence (cross-attention keys/values computed once); search grows it to k beams
        cache = model.init_cache(memory, memory_mask, int(max_lens.max()) + 1)  # + 1: the final EOS
        cache.rows_per_source = beam_size  # beams of one sentence share its cross-attention keys/values
        return search(model.decode_step, cache, bos_id, eos_id, max_lens, beam_size, alpha, n_best,
                      forbid=(cfg.pad_id,), min_len=min_len)
