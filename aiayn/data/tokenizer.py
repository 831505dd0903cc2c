"""Tokenizers: a joint BPE vocabulary (sentencepiece) for translation, characters for small LMs.

Both reserve the same special ids -- pad 0, unk 1, bos 2, eos 3 -- and save beside the model.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Iterable

PAD, UNK, BOS, EOS = 0, 1, 2, 3
SPECIALS = ["<pad>", "<unk>", "<s>", "</s>"]


class BPETokenizer:
    """Sentencepiece BPE with byte fallback: any Unicode text round-trips losslessly, whitespace
    included, except U+2581 (sentencepiece's own space mark), which comes back as a space."""

    filename = "tokenizer.model"
    pad_id, unk_id, bos_id, eos_id = PAD, UNK, BOS, EOS

    def __init__(self, model_proto: bytes):
        import sentencepiece as spm

        self.proto = model_proto
        self.sp = spm.SentencePieceProcessor(model_proto=model_proto)

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> "BPETokenizer":
        import sentencepiece as spm

        out = io.BytesIO()
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(texts), model_writer=out, model_type="bpe", vocab_size=vocab_size,
                character_coverage=1.0, byte_fallback=True, normalization_rule_name="identity",
                remove_extra_whitespaces=False,
                pad_id=PAD, unk_id=UNK, bos_id=BOS, eos_id=EOS, minloglevel=2, num_threads=2,
                input_sentence_size=2_000_000, shuffle_input_sentence=True)
        except RuntimeError as e:  # e.g. "Vocabulary size too high (8000). Please set it to a value <= 294."
            reason = str(e).splitlines()[0].rsplit("] ", 1)[-1]
            raise ValueError(f"cannot build a {vocab_size}-token BPE vocabulary from this text: {reason}") from None
        return cls(out.getvalue())

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.sp.encode(texts)

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.decode([i for i in ids if i > EOS])

    def pieces(self, ids: Iterable[int]) -> list[str]:
        return [self.sp.id_to_piece(int(i)) for i in ids]

    def save(self, directory: Path) -> None:
        (Path(directory) / self.filename).write_bytes(self.proto)

    @classmethod
    def load(cls, directory: Path) -> "BPETokenizer":
        return cls((Path(directory) / cls.filename).read_bytes())


class CharTokenizer:
    """One id per character seen in the training text (nanoGPT's shakespeare_char), after the specials."""

    filename = "tokenizer.json"
    pad_id, unk_id, bos_id, eos_id = PAD, UNK, BOS, EOS

    def __init__(self, chars: Iterable[str]):
        self.chars = list(chars)
        self.index = {c: i + len(SPECIALS) for i, c in enumerate(self.chars)}

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int | None = None) -> "CharTokenizer":
        return cls(sorted(set().union(*(set(t) for t in texts))))

    @property
    def vocab_size(self) -> int:
        return len(SPECIALS) + len(self.chars)

    def encode(self, text: str) -> list[int]:
        try:
            return [self.index[c] for c in text]
        except KeyError:
            unknown = sorted({c for c in text if c not in self.index})
            raise ValueError("characters outside the model's vocabulary: "
                             + " ".join(repr(c) for c in unknown)) from None

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        n = len(SPECIALS)
        return "".join(self.chars[i - n] for i in ids if n <= i < self.vocab_size)

    def pieces(self, ids: Iterable[int]) -> list[str]:
        return [self.chars[i - len(SPECIALS)] if i >= len(SPECIALS) else SPECIALS[i] for i in ids]

    def save(self, directory: Path) -> None:
        (Path(directory) / self.filename).write_text(json.dumps({"chars": self.chars}, ensure_ascii=False))

    @classmethod
    def load(cls, directory: Path) -> "CharTokenizer":
        return cls(json.loads((Path(directory) / cls.filename).read_text(encoding="utf-8"))["chars"])


def load_tokenizer(directory: Path) -> BPETokenizer | CharTokenizer:
    directory = Path(directory)
    for cls in (BPETokenizer, CharTokenizer):
        if (directory / cls.filename).is_file():
            return cls.load(directory)
    raise FileNotFoundError(f"no tokenizer ({BPETokenizer.filename} or {CharTokenizer.filename}) in {directory}")
