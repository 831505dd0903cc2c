"""A tiny translation problem for the training tests: synthetic sentence pairs, a joint BPE
vocabulary, the 'tiny' preset with dropout on (so that random state matters), fp32."""

from __future__ import annotations

import functools
import json
import random
from pathlib import Path

import torch
from safetensors.torch import load_file

from aiayn.checkpoint import MODEL_FILE
from aiayn.config import TrainConfig, preset
from aiayn.data.tokenizer import BPETokenizer
from aiayn.model import build_model
from aiayn.tasks.translation import TranslationTask
from aiayn.train.loop import Trainer

# One thread: on a busy CPU, a second intra-op thread only waits (and results must not depend on it).
torch.set_num_threads(1)

VOCAB_SIZE = 320  # sentencepiece's byte fallback alone takes 256 pieces
# a toy language pair: a word-for-word dictionary, and adjectives move after their noun
NOUNS = {"man": "mann", "woman": "frau", "dog": "hund", "cat": "katze", "ball": "balle", "street": "strasse",
         "park": "parko", "child": "kind", "bike": "rad", "house": "haus"}
ADJS = {"red": "rot", "blue": "blau", "big": "gross", "small": "klein", "old": "alt", "young": "jung"}
VERBS = {"runs": "rennt", "jumps": "springt", "sees": "sieht", "likes": "mag", "finds": "findet"}


def synthetic_pairs(n: int, seed: int = 0) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        src, tgt = [], []
        for part in ("subject", "verb", "object"):
            if part == "verb":
                v = rng.choice(list(VERBS))
                src.append(v), tgt.append(VERBS[v])
                continue
            noun, adj = rng.choice(list(NOUNS)), rng.choice(list(ADJS) + [None])
            src += ["the"] + ([adj] if adj else []) + [noun]
            tgt += ["der", NOUNS[noun]] + ([ADJS[adj]] if adj else [])
        pairs.append((" ".join(src), " ".join(tgt)))
    return pairs


TRAIN, VAL = synthetic_pairs(240, seed=0), synthetic_pairs(8, seed=1)


def write_corpus(directory: Path, pairs=None, name: str = "train") -> tuple[Path, Path]:
    pairs = TRAIN if pairs is None else pairs
    src, tgt = Path(directory) / f"{name}.en", Path(directory) / f"{name}.xx"
    src.write_text("".join(s + "\n" for s, _ in pairs), encoding="utf-8")
    tgt.write_text("".join(t + "\n" for _, t in pairs), encoding="utf-8")
    return src, tgt


def cli_train_args(directory: Path, out: Path, *extra: str) -> list[str]:
    """`aiayn train translation` on the synthetic corpus, in the same tiny setting as `trainer()`."""
    train_src, train_tgt = write_corpus(directory, TRAIN, "train")
    val_src, val_tgt = write_corpus(directory, VAL, "val")
    return ["train", "translation", "--train-src", str(train_src), "--train-tgt", str(train_tgt),
            "--val-src", str(val_src), "--val-tgt", str(val_tgt), "--preset", "tiny",
            "--vocab-size", str(VOCAB_SIZE), "--dropout", "0.1", "--precision", "fp32", "--max-tokens", "256",
            "--warmup", "4", "--log-every", "1", "--out", str(out), "--quiet", *extra]


@functools.cache
def tokenizer() -> BPETokenizer:
    return BPETokenizer.train([x for pair in TRAIN for x in pair], VOCAB_SIZE)


def model_config(**changes):
    return preset("tiny", vocab_size=tokenizer().vocab_size, dropout=0.1, **changes)  # as --dropout 0.1 does


def train_config(**changes) -> TrainConfig:
    settings = dict(max_steps=10, lr=3e-3, warmup=4, max_tokens=256, eval_every=4, log_every=1,
                    eval_bleu=False, precision="fp32", seed=1)
    return TrainConfig(**{**settings, **changes})


def trainer(run_dir: Path, task_cls=TranslationTask, model_changes: dict | None = None, plot: bool = False,
            **train_changes) -> Trainer:
    """A fresh Trainer, built exactly as `aiayn train translation` builds one (without curves.png,
    which only costs time, unless `plot`)."""
    cfg = train_config(**train_changes)
    torch.manual_seed(cfg.seed)
    model = build_model(model_config(**(model_changes or {})))
    task = task_cls(tokenizer(), TRAIN, VAL, cfg.max_tokens, model.cfg.max_len, cfg.device, cfg.eval_bleu)
    t = Trainer(task, model, tokenizer(), cfg, run_dir)
    if not plot:
        t.plot = lambda: None
    return t


def train_rows(run_dir: Path) -> list[tuple[int, float | None, float]]:
    """(step, loss, lr) of every training row of metrics.jsonl."""
    rows = [json.loads(r) for r in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["lr"]) for r in rows if "lr" in r]


def weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(checkpoint) / MODEL_FILE))


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs"
