"""Translation: sentence pairs -> token-budget batches -> label-smoothed cross-entropy; BLEU on val."""

from __future__ import annotations

import torch

from aiayn.config import TrainConfig
from aiayn.data.batching import Batch, collate, token_batches
from aiayn.errors import InputError
from aiayn.evaluate import bleu
from aiayn.train.loss import label_smoothed_cross_entropy, symmetric_kl


def translation_loss(model, batch: Batch, label_smoothing: float = 0.0, reduction: str = "mean",
                     rdrop: float = 0.0):
    """Label-smoothed cross-entropy (§5.4) over the real target tokens only.

    The output projection runs on the non-padding positions alone: no work is spent on padding.
    rdrop > 0 adds R-Drop (Liang et al., 2021): the batch runs twice in one pass (two dropout masks)
    and the loss is the mean cross-entropy of both copies + rdrop / 4 * the mean symmetric KL between
    their output distributions, the weighting of the authors' fairseq criterion (their alpha).
    """
    if rdrop:
        if reduction != "mean":
            raise InputError("R-Drop trains with the mean loss")
        batch = Batch(batch.src.repeat(2, 1), batch.tgt_in.repeat(2, 1), batch.tgt_out.repeat(2, 1), batch.pad_id)
    memory, memory_mask = model.encode(batch.src)
    h = model.decode(batch.tgt_in, memory, memory_mask)   # (B, T, D)
    keep = batch.tgt_out != batch.pad_id
    logits = model.logits(h[keep])                          # (N, V)
    # the gradient takes the logits' memory, except where R-Drop reads them again
    loss = label_smoothed_cross_entropy(logits, batch.tgt_out[keep], label_smoothing, reduction,
                                        overwrite_logits=not rdrop)
    if rdrop:  # row-major masking keeps the two copies' tokens in two halves, in the same order
        loss = loss + rdrop / 4 * symmetric_kl(logits).mean()
    return loss


class TranslationTask:
    name = "translation"

    def __init__(self, tokenizer, train_pairs: list[tuple[str, str]], val_pairs: list[tuple[str, str]],
                 max_tokens: int, max_len: int, device: str = "cpu", eval_bleu: bool = True):
        self.tokenizer, self.max_tokens, self.device = tokenizer, max_tokens, device
        self.train = self._encode(train_pairs, max_len)
        self.val = self._encode(val_pairs, max_len)
        self.val_refs = [t for _, t in val_pairs]
        self.val_src = [s for s, _ in val_pairs]
        self.eval_bleu = eval_bleu
        self.best_metric = ("val_bleu", "max") if eval_bleu else ("val_loss", "min")
        self._padding = [0, 0]  # target padding positions, all target positions

    def _encode(self, pairs, max_len):
        src = self.tokenizer.encode_batch([s for s, _ in pairs])
        # a target without EOS (collate adds it); Marian's tokenizer cuts targets with its own model
        encode_target = getattr(self.tokenizer, "encode_target_batch", self.tokenizer.encode_batch)
        tgt = encode_target([t for _, t in pairs])
        return [(s, t) for s, t in zip(src, tgt) if s and t and len(s) <= max_len and len(t) < max_len]

    def _collate(self, pairs):
        t = self.tokenizer
        return collate(pairs, t.pad_id, t.bos_id, t.eos_id)

    def epoch_batches(self, epoch: int, seed: int) -> list[list[int]]:
        """The epoch's batches as indices of training pairs; `loss` pads each one when it is taken, so
        that an epoch of a large corpus is never held padded in memory all at once."""
        return token_batches(self.train, self.max_tokens, seed=seed, epoch=epoch)

    def loss(self, model, indices: list[int], cfg: TrainConfig):
        batch = self._collate([self.train[i] for i in indices])
        n = batch.n_tokens  # counted before the batch goes to a GPU: no wait for it
        batch = batch.to(self.device)
        self._padding[0] += batch.tgt_out.numel() - n
        self._padding[1] += batch.tgt_out.numel()
        return translation_loss(model, batch, cfg.label_smoothing, rdrop=cfg.rdrop), n

    def log_extra(self) -> dict:
        pad, total = self._padding
        self._padding = [0, 0]
        return {"padding": round(pad / max(total, 1), 4)}

    @torch.no_grad()
    def validate(self, model, cfg: TrainConfig) -> dict[str, float]:
        nll, n = 0.0, 0
        for idx in token_batches(self.val, self.max_tokens, shuffle=False):
            batch = self._collate([self.val[i] for i in idx]).to(self.device)
            nll += translation_loss(model, batch, reduction="sum").item()
            n += batch.n_tokens
        result = {"val_loss": nll / n}
        if self.eval_bleu:
            from aiayn.translate import translate

            hyps = translate(model, self.tokenizer, self.val_src, beam=1, device=self.device)
            result["val_bleu"] = bleu(hyps, self.val_refs).score
        return result


class PreparedTranslationTask(TranslationTask):
    """TranslationTask over a corpus prepared by `aiayn prepare` (aiayn.data.prepared): the training
    pairs stay in memory-mapped shards, read as each batch is taken; only their lengths are held
    (for the length-bucketed batches). The validation pairs are small and held as usual."""

    def __init__(self, prepared, tokenizer, max_tokens: int, max_len: int, device: str = "cpu",
                 eval_bleu: bool = True):
        from aiayn.data.prepared import MappedPairs

        super().__init__(tokenizer, [], prepared.val_text(), max_tokens, max_len, device, eval_bleu)
        self.train: MappedPairs = prepared.pairs("train")
        src, tgt = self.train.src_len, self.train.tgt_len
        self.keep = (src > 0) & (tgt > 0) & (src <= max_len) & (tgt < max_len)  # as TranslationTask's filter

    def epoch_batches(self, epoch: int, seed: int):
        from aiayn.data.prepared import length_batches

        return length_batches(self.train.src_len, self.train.tgt_len, self.max_tokens, self.keep, seed, epoch)
