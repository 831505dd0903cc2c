"""Translating sentences with a trained encoder-decoder: tokenize, batch by length, search, detokenize."""

from __future__ import annotations

import re
import warnings
from concurrent.futures import ThreadPoolExecutor

import torch

from aiayn.data.batching import pad
from aiayn.decode.greedy import evaluating
from aiayn.fast.inference import inference_model


def default_workers(device: str = "cpu") -> int:
    """Decoding workers for a device: on a CPU one per torch thread (each worker decodes whole
    batches with one thread: small-model decoding is too fine-grained to share out op by op), on a
    GPU one."""
    return max(1, torch.get_num_threads()) if torch.device(device).type == "cpu" else 1


def map_in_workers(fn, items: list, workers: int) -> list:
    """[fn(item) for item in items], in `workers` threads of one torch thread each: torch ops release
    the GIL, so the threads overlap except in the Python between ops. The caller's thread setting is
    restored (a worker's torch.set_num_threads also becomes the default of threads started later)."""
    threads = torch.get_num_threads()
    try:
        with ThreadPoolExecutor(workers, initializer=torch.set_num_threads, initargs=(1,)) as pool:
            return list(pool.map(fn, items))
    finally:
        torch.set_num_threads(threads)


def _length_sorted_batches(ids: list[list[int]], beam: int, max_tokens: int) -> list[list[int]]:
    """Indices of `ids`, sorted by length and cut into batches of as many sentences as fit in the
    token budget, counting each output at its longest (source + 50) and beam hypotheses as sentences."""
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    batches, start = [], 0
    while start < len(order):
        longest, end = 0, start
        while end < len(order) and max(longest, len(ids[order[end]]) + 50) * (end - start + 1) * beam <= max_tokens:
            longest = max(longest, len(ids[order[end]]) + 50)
            end += 1
        end = max(end, start + 1)
        batches.append(order[start:end])
        start = end
    return batches


# control characters (but tab and line ends) are not text: as spaces (a NUL byte changed the translation)
CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def translate(model, tokenizer, sentences: list[str], beam: int = 1, alpha: float = 0.6,
              max_tokens: int = 8192, device: str = "cpu", precision: str = "fp32",
              n_best: int = 1, workers: int | None = None) -> list[str] | list[list[tuple[str, float]]]:
    """Translate `sentences` (in order). With n_best > 1, each item is a best-first list of
    (translation, score). Sources longer than the model's maximum length are truncated.

    precision: fp32, bf16, int8 (CPU) or fp16 (GPU); decoding runs on an inference copy of the
    model (aiayn.fast.inference: oneDNN linears, cast or quantized weights), the model is left as it is.
    workers: batches decoded at once, each in a thread of one torch thread (CPU only; default
    `default_workers`: one per torch thread). On 2 cores, 2 workers decode 15-25% more tokens/s than
    one batch at a time on 2 threads (docs/perf-log/2026-11.md)."""
    max_src = model.cfg.max_len - 1
    ids = [tokenizer.encode(CONTROL.sub(" ", s)) for s in sentences]
    too_long = [i for i, x in enumerate(ids) if len(x) > max_src]
    if too_long:
        warnings.warn(f"{len(too_long)} input(s) longer than the model's maximum of {max_src} tokens were "
                      f"truncated (the first is input {too_long[0] + 1})", stacklevel=2)
    ids = [x[:max_src] or [tokenizer.unk_id] for x in ids]
    chunks = _length_sorted_batches(ids, beam, max_tokens)
    with evaluating(model):  # inference_model may decode on the model itself (fp32 on a GPU)
        outs = _decode_chunks(inference_model(model, precision), tokenizer, ids, chunks, beam, alpha, n_best,
                              device, workers)
    results: list = [None] * len(ids)
    for chunk, out in zip(chunks, outs):
        for i, hyps in zip(chunk, out):
            results[i] = [(tokenizer.decode(toks), float(score)) for toks, score in hyps]
    return [r[0][0] for r in results] if n_best == 1 else results


def _decode_chunks(fast, tokenizer, ids, chunks, beam, alpha, n_best, device, workers) -> list:
    """Each chunk of `ids` (indices) decoded on the inference copy `fast`: per chunk, per sentence,
    its best-first (token ids, score) hypotheses."""
    from aiayn.decode import beam_search, greedy

    def decode(chunk: list[int]) -> list[list[tuple[list[int], float]]]:
        # no autocast: the inference copy has its precision (a training run validates inside one);
        # both modes are per thread, so each worker enters them itself
        with torch.inference_mode(), torch.autocast(torch.device(device).type, enabled=False):
            src = pad([ids[i] for i in chunk], tokenizer.pad_id).to(device)  # an imported model's pad id
            if beam == 1 and n_best == 1:
                return [[(toks, 0.0)] for toks in greedy(fast, src, tokenizer.bos_id, tokenizer.eos_id)]
            return beam_search(fast, src, tokenizer.bos_id, tokenizer.eos_id, beam_size=beam, alpha=alpha,
                               n_best=n_best)

    workers = min(default_workers(device) if workers is None else workers, len(chunks))
    if workers > 1 and torch.device(device).type == "cpu":
        return map_in_workers(decode, chunks, workers)
    return [decode(chunk) for chunk in chunks]


def split_texts(texts: list[str], lang: str = "en") -> tuple[list[list[tuple[str, str]]], list[str]]:
    """Texts -> each cut into (sentence, separator) pairs (aiayn.data.sentences), and the distinct
    non-empty sentences of all of them, to translate once each."""
    from aiayn.data.sentences import segments

    cut = [segments(text, lang) for text in texts]
    return cut, list(dict.fromkeys(s for pairs in cut for s, _ in pairs if s))


def join_texts(cut: list[list[tuple[str, str]]], translated: dict[str, str]) -> list[str]:
    """The texts of `split_texts` again, each sentence replaced by its translation."""
    from aiayn.data.sentences import join

    return [join([translated.get(s, "") for s, _ in pairs], [w for _, w in pairs]) for pairs in cut]


def translate_text(model, tokenizer, texts: list[str], lang: str = "en", **options) -> list[str]:
    """Translate texts of any length: each is cut into lines and sentences, the sentences of all
    texts are translated together by `translate` (**options: beam, alpha, ...), and each text is
    joined back with its own newlines and spacing. Repeated sentences are translated once."""
    cut, unique = split_texts(texts, lang)
    return join_texts(cut, dict(zip(unique, translate(model, tokenizer, unique, **options))) if unique else {})
