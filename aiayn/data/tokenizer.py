"""Tokenizers: a joint BPE vocabulary (sentencepiece) for translation, characters for small LMs.

Both reserve the same special ids -- pad 0, unk 1, bos 2, eos 3 -- and save beside the model.
Imported models (aiayn.interop) bring their own: Marian's sentencepiece pair with its vocab.json,
and GPT-2's byte-level BPE, each with the special ids of the model it came with.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Iterable

from aiayn.errors import InputError

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
            raise InputError(f"cannot build a {vocab_size}-token BPE vocabulary from this text: {reason}") from None
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
        proto = (Path(directory) / cls.filename).read_bytes()
        if not proto:  # (sentencepiece would log its complaint in several lines of its own, then load nothing)
            raise InputError(f"{Path(directory) / cls.filename}: empty file")
        return cls(proto)


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
            raise InputError("characters outside the model's vocabulary: "
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


class MarianTokenizer:
    """An OPUS-MT (Marian) model's tokenizer, as transformers' MarianTokenizer: the source text is cut
    into pieces by source.spm, the target's pieces joined by target.spm, and pieces are mapped to ids by
    vocab.json (not by the sentencepiece models' own ids). A source ends with EOS; decoding starts from
    the pad id (decoder_start_token_id), so bos_id is pad_id. A leading language code (">>de<<") of a
    multilingual model is one token. `vocab_size` is the target vocabulary's (target_vocab.json's
    where the model has two vocabularies)."""

    filename = "marian.vocab.json"  # the ids; plus the two sentencepiece models
    files = (filename, "source.spm", "target.spm")

    def __init__(self, source_spm: bytes, target_spm: bytes, vocab: dict[str, int],
                 target_vocab: dict[str, int] | None = None, unk: str = "<unk>", eos: str = "</s>",
                 pad: str = "<pad>", decoder_start: int | None = None):
        import sentencepiece as spm

        self.source_proto, self.target_proto = source_spm, target_spm
        self.vocab, self.target_vocab = vocab, target_vocab
        self.source_sp = spm.SentencePieceProcessor(model_proto=source_spm)
        self.target_sp = spm.SentencePieceProcessor(model_proto=target_spm)
        target = target_vocab if target_vocab is not None else vocab
        for name, token in (("unk", unk), ("eos", eos), ("pad", pad)):
            if token not in vocab or token not in target:
                raise InputError(f"vocab.json has no {name} token {token!r}")
        self.unk_id, self.eos_id, self.pad_id = vocab[unk], vocab[eos], vocab[pad]
        if (target[unk], target[eos], target[pad]) != (self.unk_id, self.eos_id, self.pad_id):
            raise InputError("the source and target vocabularies give the special tokens different ids")
        self.bos_id = self.pad_id if decoder_start is None else int(decoder_start)  # Marian's: <pad>
        self.tokens = {"unk": unk, "eos": eos, "pad": pad}
        self.id_to_piece = {i: p for p, i in target.items()}
        self.special = {self.unk_id, self.eos_id, self.pad_id}
        self.codes = {p for p in vocab if p.startswith(">>") and p.endswith("<<")}

    @property
    def vocab_size(self) -> int:
        return len(self.target_vocab if self.target_vocab is not None else self.vocab)

    def encode(self, text: str) -> list[int]:
        code = []
        if text.startswith(">>") and (end := text.find("<<")) != -1:  # a target-language code
            code, text = [text[:end + 2]], text[end + 2:]
        pieces = code + self.source_sp.encode(text, out_type=str)
        return [self.vocab.get(p, self.unk_id) for p in pieces] + [self.eos_id]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def encode_target_batch(self, texts: list[str]) -> list[list[int]]:
        """Training targets: cut by target.spm, numbered by the target vocabulary, without EOS (the
        batching adds it), as transformers' MarianTokenizer(text_target=...) less its EOS."""
        target = self.target_vocab if self.target_vocab is not None else self.vocab
        return [[target.get(p, self.unk_id) for p in self.target_sp.encode(t, out_type=str)] for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        pieces = [self.id_to_piece[i] for i in map(int, ids)
                  if i not in self.special and i in self.id_to_piece and self.id_to_piece[i] not in self.codes]
        return self.target_sp.decode_pieces(pieces).replace("\u2581", " ").strip()

    def pieces(self, ids: Iterable[int]) -> list[str]:
        return [self.id_to_piece.get(int(i), "<unk>") for i in ids]

    def save(self, directory: Path) -> None:
        directory = Path(directory)
        ids = {"vocab": self.vocab, "target_vocab": self.target_vocab, "decoder_start": self.bos_id, **self.tokens}
        (directory / self.filename).write_text(json.dumps(ids, ensure_ascii=False), encoding="utf-8")
        (directory / "source.spm").write_bytes(self.source_proto)
        (directory / "target.spm").write_bytes(self.target_proto)

    @classmethod
    def load(cls, directory: Path) -> "MarianTokenizer":
        directory = Path(directory)
        ids = json.loads((directory / cls.filename).read_text(encoding="utf-8"))
        return cls((directory / "source.spm").read_bytes(), (directory / "target.spm").read_bytes(),
                   ids["vocab"], ids.get("target_vocab"), ids.get("unk", "<unk>"), ids.get("eos", "</s>"),
                   ids.get("pad", "<pad>"), ids.get("decoder_start"))


class ByteBPETokenizer:
    """GPT-2's byte-level BPE (vocab.json + merges.txt), run by the `tokenizers` library: any text
    round-trips. <|endoftext|> is GPT-2's one special token: BOS, EOS, and here also pad and unk."""

    filename = "bpe.json"  # the `tokenizers` library's own serialization

    def __init__(self, tokenizer, eos: str = "<|endoftext|>"):
        self.tk = tokenizer
        eos_id = tokenizer.token_to_id(eos)
        if eos_id is None:
            raise InputError(f"the vocabulary has no {eos!r} token")
        self.pad_id = self.unk_id = self.bos_id = self.eos_id = eos_id

    @classmethod
    def from_files(cls, vocab_json: Path, merges_txt: Path) -> "ByteBPETokenizer":
        """A GPT-2 tokenizer from its vocab.json and merges.txt (as transformers' GPT2Tokenizer)."""
        from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

        tk = Tokenizer(models.BPE.from_file(str(vocab_json), str(merges_txt)))
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tk.decoder = decoders.ByteLevel()
        tk.add_special_tokens([AddedToken("<|endoftext|>", special=True)])  # one token, never split
        return cls(tk)

    @property
    def vocab_size(self) -> int:
        return self.tk.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.tk.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tk.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.tk.decode([int(i) for i in ids if i != self.eos_id], skip_special_tokens=False)

    def pieces(self, ids: Iterable[int]) -> list[str]:
        return [self.tk.id_to_token(int(i)) or "<unk>" for i in ids]

    def save(self, directory: Path) -> None:
        (Path(directory) / self.filename).write_text(self.tk.to_str(), encoding="utf-8")

    @classmethod
    def load(cls, directory: Path) -> "ByteBPETokenizer":
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_file(str(Path(directory) / cls.filename)))


def load_tokenizer(directory: Path) -> BPETokenizer | CharTokenizer | MarianTokenizer | ByteBPETokenizer:
    directory = Path(directory)
    for cls in (BPETokenizer, CharTokenizer, MarianTokenizer, ByteBPETokenizer):
        if (directory / cls.filename).is_file():
            return cls.load(directory)
    raise FileNotFoundError(f"no tokenizer ({BPETokenizer.filename} or {CharTokenizer.filename}) in {directory}")
