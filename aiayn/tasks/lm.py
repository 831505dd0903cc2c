"""Language modelling: text -> random windows -> cross-entropy; validation loss and perplexity.

A decoder-only model (aiayn.model.LanguageModel: the decoder stack without cross-attention) learns
to predict each token of a window of `context` tokens from the ones before it, as in nanoGPT.
Shape legend: B windows per batch, T context, V vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from aiayn.config import ModelConfig, TrainConfig
from aiayn.data.corpus import DataError
from aiayn.data.tokenizer import BPETokenizer, CharTokenizer
from aiayn.errors import InputError
from aiayn.train.loss import label_smoothed_cross_entropy

TRAIN_FRACTION = 0.9     # the first 90% of the text trains, the last 10% validates (nanoGPT's split)
MAX_VAL_BATCHES = 200    # validation reads at most this many batches of windows
VAL_TOKENS = 8192        # validation's forward passes: up to this many tokens each,
VAL_LOGITS = 2 ** 25     # and up to this many logits (tokens x vocabulary), never fewer than a batch


# ---------------------------------------------------------------------------------------- presets
def lm_config(**changes) -> ModelConfig:
    """A GPT-style decoder-only model. Departures from the paper's base model, all visible here:
    pre-norm (`norm_first`, which trains without warm-up tricks; `--post-norm` restores §3.1's),
    GELU, learned positions. vocab_size and max_len are set from the tokenizer and the context."""
    return ModelConfig(**{"vocab_size": 256, "n_encoder_layers": 0, "norm_first": True, "activation": "gelu",
                          "positional": "learned", "tie_embeddings": True, **changes})


def _lm_train(**changes) -> TrainConfig:
    """nanoGPT's recipe: AdamW (0.9, 0.99), weight decay 0.1, lr warmed up over 100 steps then
    cosine-decayed to a tenth, gradients clipped at 1, no label smoothing; bf16 autocast where the
    machine computes bf16 natively, else fp32 (precision "auto")."""
    return TrainConfig(**{"lr": 1e-3, "min_lr": 1e-4, "warmup": 100, "schedule": "cosine",
                          "optimizer": "adamw", "betas": (0.9, 0.99), "eps": 1e-8, "weight_decay": 0.1,
                          "label_smoothing": 0.0, "clip_norm": 1.0, "precision": "auto",
                          "eval_bleu": False, "log_every": 50, **changes})


# name -> (model, recipe). The recipe's batch_size and context are the LM's batch shape.
PRESETS: dict[str, tuple[ModelConfig, TrainConfig]] = {
    # nanoGPT's README configuration for a CPU (0.8M parameters): val loss 1.886 there in 2000 steps.
    "shakespeare-cpu": (lm_config(n_decoder_layers=4, n_heads=4, d_model=128, d_ff=512, dropout=0.0),
                        _lm_train(max_steps=2000, batch_size=12, context=64, eval_every=500)),
    # nanoGPT's GPU configuration for Tiny Shakespeare (10.7M parameters): val loss ~1.47 there.
    "shakespeare": (lm_config(n_decoder_layers=6, n_heads=6, d_model=384, d_ff=1536, dropout=0.2,
                              attn_dropout=0.2),
                    _lm_train(max_steps=5000, batch_size=64, context=256, eval_every=250)),
}


# ------------------------------------------------------------------------------------------ text
def train_tokenizer(kind: str, text: str, vocab_size: int | None = None) -> CharTokenizer | BPETokenizer:
    """char: one id per character of the whole text (nanoGPT's shakespeare_char), so that the
    validation text is always encodable. bpe: sentencepiece BPE learned on the training part only
    (byte fallback encodes anything), which may normalize some runs of spaces."""
    if kind == "char":
        return CharTokenizer.train([text])
    if kind == "bpe":
        if not vocab_size:
            raise InputError("a BPE tokenizer needs --vocab-size")
        lines = text[: int(len(text) * TRAIN_FRACTION)].split("\n")
        try:
            return BPETokenizer.train((line for line in lines if line.strip()), vocab_size)
        except RuntimeError as e:  # sentencepiece: e.g. a vocabulary too large for the text
            raise InputError(f"cannot learn a {vocab_size}-token BPE vocabulary from this text "
                             f"({str(e).splitlines()[-1][:160]})") from None
    raise InputError(f"unknown tokenizer {kind!r}: use char or bpe")


def encode_text(tokenizer, text: str) -> Tensor:
    """The whole text as one (N,) tensor of token ids."""
    return torch.tensor(tokenizer.encode(text), dtype=torch.long)


def split_ids(ids: Tensor, train_fraction: float = TRAIN_FRACTION) -> tuple[Tensor, Tensor]:
    n = int(len(ids) * train_fraction)
    return ids[:n], ids[n:]


# ------------------------------------------------------------------------------------------ task
def lm_loss(model, x: Tensor, y: Tensor, reduction: str = "mean") -> Tensor:
    """Cross-entropy of next-token prediction: inputs x (B, T), targets y = x shifted by one (B, T)."""
    logits = model(x)  # (B, T, V)
    return label_smoothed_cross_entropy(logits.flatten(0, 1), y.flatten(), reduction=reduction)


class LMTask:
    """Batches of `batch_size` random windows of `context` tokens from the training ids.

    A batch is the (B,) tensor of its windows' start positions; `windows` turns it into inputs and
    targets. An epoch is len(train) // (batch_size * context) batches (about one pass over the
    tokens), and its batches are a pure function of (seed, epoch), so a resumed run is exact.
    Validation reads the validation ids tiled by non-overlapping windows (no randomness): the exact
    value that nanoGPT's estimate over random windows approximates.
    """

    name = "lm"
    best_metric = ("val_loss", "min")

    def __init__(self, train_ids: Tensor, val_ids: Tensor, batch_size: int, context: int,
                 device: str = "cpu", max_val_batches: int = MAX_VAL_BATCHES):
        for part, ids in (("training", train_ids), ("validation", val_ids)):
            if len(ids) <= context:
                raise DataError(f"the {part} part of the text has {len(ids)} tokens; a window of "
                                f"context {context} needs {context + 1}: use a longer text or a "
                                "smaller --context")
        self.train, self.val = train_ids, val_ids
        self.batch_size, self.context, self.device = batch_size, context, device
        self.batches_per_epoch = max(1, len(train_ids) // (batch_size * context))
        self._offsets = torch.arange(context + 1)  # (T + 1,)
        n_val = min((len(val_ids) - 1) // context, max_val_batches * batch_size)
        self.val_starts = torch.arange(n_val) * context  # (n_val,)

    @classmethod
    def from_text(cls, text: str, tokenizer, batch_size: int, context: int, device: str = "cpu") -> "LMTask":
        return cls(*split_ids(encode_text(tokenizer, text)), batch_size, context, device)

    def epoch_batches(self, epoch: int, seed: int) -> list[Tensor]:
        g = torch.Generator().manual_seed(seed * 100_003 + epoch)
        starts = torch.randint(0, len(self.train) - self.context, (self.batches_per_epoch, self.batch_size),
                               generator=g)  # a window reads context + 1 tokens: x and y shifted by one
        return list(starts.unbind(0))

    def windows(self, starts: Tensor, ids: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(B,) start positions -> inputs x (B, T) and targets y (B, T), y[:, t] = x[:, t + 1]."""
        w = (self.train if ids is None else ids)[starts[:, None] + self._offsets]  # (B, T + 1)
        return w[:, :-1].to(self.device), w[:, 1:].to(self.device)

    def loss(self, model, batch: Tensor, cfg: TrainConfig) -> tuple[Tensor, int]:
        x, y = self.windows(batch)
        return lm_loss(model, x, y), y.numel()  # no label smoothing: we want the true perplexity

    @torch.no_grad()
    def validate(self, model, cfg: TrainConfig) -> dict[str, float]:
        """The mean loss over the validation windows, in forward passes of several batches each
        (fewer, larger products: faster on a CPU)."""
        tokens = min(VAL_TOKENS, VAL_LOGITS // model.cfg.vocab_size)
        nll, n = 0.0, 0
        for starts in self.val_starts.split(max(self.batch_size, tokens // self.context)):
            x, y = self.windows(starts, self.val)
            nll += lm_loss(model, x, y, reduction="sum").item()
            n += y.numel()
        return {"val_loss": nll / n, "val_ppl": math.exp(nll / n)}


# ------------------------------------------------------------------------------------ generation
def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """The prompt's token ids. An empty prompt starts from a newline, like the start of a line in
    the training text (as nanoGPT's sample.py does); the newline itself is not part of the output."""
    ids = tokenizer.encode(prompt or "\n")
    if not ids:  # a BPE prompt of spaces only
        ids = tokenizer.encode("\n")
    return ids


def stream_text(model, tokenizer, prompt: str, max_new_tokens: int, temperature: float = 1.0,
                top_k: int | None = None, top_p: float | None = None,
                stop: Sequence[str] = ()) -> Iterator[str]:
    """The continuation of `prompt`, yielded as text pieces as soon as they are final.

    Draws come from torch's global RNG (seed it with torch.manual_seed for repeatable text).
    Generation ends after max_new_tokens or at the first of the `stop` strings, which is not
    output; text that could still turn into a stop string is held back until it cannot.
    """
    from aiayn.decode.sampling import generate

    stop = [s for s in stop if s]
    ids = prompt_ids(tokenizer, prompt)
    steps = generate(model, ids, max_new_tokens, temperature, top_k, top_p)
    longest = max((len(s) for s in stop), default=0)
    text, shown = "", 0                 # the continuation decoded so far; how much of it was yielded
    prefix, read = len(ids) - 1, len(ids)  # ids[prefix:read] decode to what precedes the new tokens
    for step in steps:
        ids.append(step[0])
        # Decode only a short tail, with left context: a BPE piece drops its leading space at the
        # start of a decode, and a character split into bytes decodes only once complete.
        before = tokenizer.decode(ids[prefix:read])
        after = tokenizer.decode(ids[prefix:])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            continue
        text += after[len(before):]
        prefix, read = read, len(ids)
        hits = [i for i in (text.find(s, max(0, shown - longest)) for s in stop) if i >= 0]
        if hits:
            yield text[shown:min(hits)]
            return
        safe = len(text) - _held_back(text, stop)
        if safe > shown:
            yield text[shown:safe]
            shown = safe
    if shown < len(text):
        yield text[shown:]


def _held_back(text: str, stop: Sequence[str]) -> int:
    """Length of the longest end of `text` that begins some stop string."""
    return max((n for s in stop for n in range(min(len(s) - 1, len(text)), 0, -1)
                if s.startswith(text[-n:])), default=0)


@dataclass(frozen=True)
class Token:
    """One generated token, as an HTTP client sees it (text-generation-inference's shape)."""
    id: int
    text: str                 # what it adds to the text (may be "" while a character is incomplete)
    logprob: float            # its log-probability under the model (temperature 1)
    top: list[tuple[int, str, float]]  # the most likely tokens of this step: (id, text, logprob)
    finish_reason: str | None = None   # on the last token: "length", "eos" or "stop"


def stream_tokens(model, tokenizer, prompt: str, max_new_tokens: int, temperature: float = 1.0,
                  top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                  stop: Sequence[str] = (), top_n: int = 0) -> Iterator[Token]:
    """The continuation of `prompt`, token by token, with each token's log-probability and the
    `top_n` most likely tokens of its step. The last token carries the finish reason: "stop" once
    the text holds one of the `stop` strings, "eos" at the end-of-sequence token, else "length"."""
    from aiayn.decode.sampling import generate

    stop = [s for s in stop if s]
    ids = prompt_ids(tokenizer, prompt)
    steps = generate(model, ids, max_new_tokens, temperature, top_k, top_p, seed=seed,
                     stop_id=tokenizer.eos_id, with_logits=True)
    context, new, text = ids[-1:], [], ""  # decode with one token of left context (BPE spaces)
    base = tokenizer.decode(context)
    for i, (nxt, logits) in enumerate(steps):
        token = int(nxt[0])
        new.append(token)
        logprobs = logits[0].float().log_softmax(-1)  # (V,)
        top = []
        if top_n:
            values, indices = logprobs.topk(min(top_n, logprobs.numel()))
            top = [(int(j), tokenizer.decode([int(j)]), float(v)) for v, j in zip(values, indices)]
        full = tokenizer.decode(context + new)[len(base):]
        piece = "" if full.endswith("\ufffd") or not full.startswith(text) else full[len(text):]
        text += piece
        finish = None
        if token == tokenizer.eos_id:
            finish = "eos"
        elif any(s in text for s in stop):
            finish = "stop"
        elif i == max_new_tokens - 1:
            finish = "length"
        yield Token(token, piece, float(logprobs[token]), top, finish)
        if finish:
            return


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """`text` up to the first of the stop strings."""
    hits = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    return text[:min(hits)] if hits else text
