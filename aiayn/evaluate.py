"""Scores: sacreBLEU and chrF, and the Multi30k papers' lowercased tokenized BLEU."""

from __future__ import annotations

import sacrebleu


def bleu(hypotheses: list[str], references: list[str]):
    """sacreBLEU on detokenized text (its default 13a tokenization); .score and the signature."""
    return sacrebleu.metrics.BLEU().corpus_score(hypotheses, [references])


def bleu_signature(hypotheses: list[str], references: list[str]) -> str:
    metric = sacrebleu.metrics.BLEU()
    metric.corpus_score(hypotheses, [references])
    return str(metric.get_signature())


def chrf(hypotheses: list[str], references: list[str]) -> float:
    return sacrebleu.metrics.CHRF().corpus_score(hypotheses, [references]).score


def moses_lc_tok(lines: list[str], lang: str) -> list[str]:
    """Lowercase, Moses punctuation normalization, Moses tokenization with escaping: the pipeline
    that made Multi30k's `*.lc.norm.tok.*` references (sacremoses reproduces each step)."""
    from sacremoses import MosesPunctNormalizer, MosesTokenizer

    norm, tok = MosesPunctNormalizer(lang=lang), MosesTokenizer(lang=lang)
    return [tok.tokenize(norm.normalize(line.lower()), escape=True, return_str=True) for line in lines]


def lc_tok_bleu(hypotheses: list[str], tokenized_references: list[str], lang: str) -> float:
    """BLEU the way Multi30k papers report it (multi-bleu on lowercased tokenized text)."""
    hyps = moses_lc_tok(hypotheses, lang)
    return sacrebleu.metrics.BLEU(tokenize="none", force=True).corpus_score(hyps, [tokenized_references]).score

