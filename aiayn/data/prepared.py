"""Pre-tokenized corpora on disk, memory-mapped: `aiayn prepare` writes them once, training streams
them without reading the corpus into memory.

The format is a directory of NumPy `.npy` files (a documented, versioned standard:
https://numpy.org/doc/stable/reference/generated/numpy.lib.format.html), which
`np.load(path, mmap_mode="r")` maps without reading, plus one JSON file:

    prepared.json                  {"format": "aiayn-prepared", "version": 1, "task": "translation" | "lm",
                                    "tokenizer": "bpe" | "char", "dtype": "uint16" | "uint32",
                                    "splits": {"train": {"shards": [...], "examples": N, "tokens": T}, ...},
                                    "sources": {...}}
    tokenizer.model | .json        the tokenizer, as in a model directory
  translation, per shard of training pairs (at most SHARD_PAIRS each; "train.00000", "train.00001", ...):
    <shard>.src.npy, <shard>.tgt.npy   every sentence's token ids, concatenated (no BOS/EOS)
    <shard>.src.idx.npy, ...tgt.idx.npy  int64 offsets, one more than sentences: sentence i of the
                                         shard is tokens[idx[i]:idx[i + 1]]
    val.src.txt, val.tgt.txt       the validation sentences as text (BLEU needs the references)
  lm:
    train.npy, val.npy             the text's token ids (the first 90% of its tokens train)

Token ids are uint16 when the vocabulary fits (< 65,536 types), else uint32. Lines are read one at a
time and shards written one at a time, so preparing takes memory for one shard, not the corpus.
"""

from __future__ import annotations

import gzip
import itertools
import json
import os
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from aiayn.data.corpus import DataError

FORMAT, VERSION = "aiayn-prepared", 1
META = "prepared.json"
SHARD_PAIRS = 1_000_000   # sentence pairs per translation shard
CHUNK = 10_000            # lines encoded at a time
LM_TRAIN_FRACTION = 0.9   # as aiayn.tasks.lm.TRAIN_FRACTION


# ------------------------------------------------------------------------------------ reading text
def iter_lines(path: Path | str) -> Iterator[str]:
    """The lines of a UTF-8 text file, plain or gzipped, one at a time, without their newlines."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    with open(path, "rb") as raw:
        gz = raw.read(2) == b"\x1f\x8b"
    n = 0
    with gzip.open(path, "rb") if gz else open(path, "rb") as stream:
        try:
            for n, raw in enumerate(stream, 1):  # decoded line by line: an error names its line
                yield raw.decode("utf-8").rstrip("\n")
        except UnicodeDecodeError:
            raise DataError(f"{path}, line {n}: invalid UTF-8") from None
        except (OSError, EOFError) as e:
            raise DataError(f"{path}: corrupt gzip file ({e})") from None


def iter_pairs(src: Path | str, tgt: Path | str) -> Iterator[tuple[str, str]]:
    """Aligned sentence pairs of two files, one at a time; files of different lengths are an error."""
    for n, (s, t) in enumerate(itertools.zip_longest(iter_lines(src), iter_lines(tgt)), 1):
        if s is None or t is None:
            longer, shorter = (tgt, src) if s is None else (src, tgt)
            raise DataError(f"{longer} has more lines than {shorter} (line {n}): a parallel corpus "
                            "needs one line per sentence in both")
        yield s, t


def _dtype(vocab_size: int):
    return np.uint16 if vocab_size <= 1 << 16 else np.uint32


def _flat(ids: list[list[int]], dtype) -> tuple[np.ndarray, np.ndarray]:
    """Token lists -> (their concatenation, their lengths)."""
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    tokens = np.fromiter(itertools.chain.from_iterable(ids), dtype=dtype, count=int(lengths.sum()))
    return tokens, lengths


def _offsets(lengths: np.ndarray) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)


class _Staging:
    """An output directory written under a temporary name and renamed when complete."""

    def __init__(self, out: Path | str):
        self.out = Path(out)
        if self.out.exists() and (not self.out.is_dir() or any(self.out.iterdir())):
            raise DataError(f"{self.out} already exists and is not empty; choose another --out")
        self.tmp = self.out.with_name(self.out.name + ".tmp-prepare")
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True)

    def finish(self, meta: dict) -> Path:
        (self.tmp / META).write_text(json.dumps(meta, indent=2))
        if self.out.exists():
            self.out.rmdir()
        os.replace(self.tmp, self.out)
        return self.out

    def abandon(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


# ------------------------------------------------------------------------------------- preparing
def prepare_translation(out: Path | str, train_src, train_tgt, val_src, val_tgt, tokenizer,
                        shard_pairs: int = SHARD_PAIRS) -> Path:
    """Encode a parallel corpus with `tokenizer` into shards in `out` (see the module's docstring);
    the validation pairs are copied as text. Every pair is kept (the model's maximum length is
    applied when training reads them)."""
    stage = _Staging(out)
    try:
        dtype = _dtype(tokenizer.vocab_size)
        encode_target = getattr(tokenizer, "encode_target_batch", tokenizer.encode_batch)
        shards, examples, tokens = [], 0, [0, 0]
        pairs = iter_pairs(train_src, train_tgt)
        while block := list(itertools.islice(pairs, shard_pairs)):
            name = f"train.{len(shards):05d}"
            for side, encode, k in (("src", tokenizer.encode_batch, 0), ("tgt", encode_target, 1)):
                parts = [_flat(encode([p[k] for p in block[i:i + CHUNK]]), dtype)
                         for i in range(0, len(block), CHUNK)]
                flat = np.concatenate([t for t, _ in parts])
                np.save(stage.tmp / f"{name}.{side}.npy", flat)
                np.save(stage.tmp / f"{name}.{side}.idx.npy", _offsets(np.concatenate([n for _, n in parts])))
                tokens[k] += len(flat)
            shards.append(name)
            examples += len(block)
        if not examples:
            raise DataError(f"{train_src}: empty file")
        n_val = 0  # the validation pairs as text: validation encodes them, and BLEU needs the references
        with open(stage.tmp / "val.src.txt", "w", encoding="utf-8") as fs, \
                open(stage.tmp / "val.tgt.txt", "w", encoding="utf-8") as ft:
            for s, t in iter_pairs(val_src, val_tgt):
                fs.write(s + "\n")
                ft.write(t + "\n")
                n_val += 1
        if not n_val:
            raise DataError(f"{val_src}: empty file")
        splits = {"train": {"shards": shards, "examples": examples, "tokens": tokens}, "val": {"examples": n_val}}
        tokenizer.save(stage.tmp)
        return stage.finish({"format": FORMAT, "version": VERSION, "task": "translation",
                             "tokenizer": type(tokenizer).__name__, "dtype": np.dtype(dtype).name,
                             "vocab_size": tokenizer.vocab_size, "splits": splits,
                             "sources": {k: str(Path(v).resolve()) for k, v in (
                                 ("train_src", train_src), ("train_tgt", train_tgt),
                                 ("val_src", val_src), ("val_tgt", val_tgt))}})
    except BaseException:
        stage.abandon()
        raise


def prepare_lm(out: Path | str, data, tokenizer, train_fraction: float = LM_TRAIN_FRACTION) -> Path:
    """Encode a text file line by line into train.npy and val.npy (the first `train_fraction` of its
    tokens train). Each line is encoded with its newline."""
    stage = _Staging(out)
    try:
        dtype = _dtype(tokenizer.vocab_size)
        raw = stage.tmp / "all.bin"
        n = 0
        with open(raw, "wb") as f:
            lines = iter_lines(data)
            while block := list(itertools.islice(lines, CHUNK)):
                flat, _ = _flat(tokenizer.encode_batch([line + "\n" for line in block]), dtype)
                f.write(flat.tobytes())
                n += len(flat)
        if n < 2:
            raise DataError(f"{data}: too little text")
        ids = np.memmap(raw, dtype=dtype, mode="r", shape=(n,))
        cut = int(n * train_fraction)
        for split, part in (("train", ids[:cut]), ("val", ids[cut:])):
            arr = np.lib.format.open_memmap(stage.tmp / f"{split}.npy", mode="w+", dtype=dtype, shape=part.shape)
            for i in range(0, len(part), 1 << 24):  # 16M tokens at a time
                arr[i:i + (1 << 24)] = part[i:i + (1 << 24)]
            arr.flush()
            del arr
        del ids
        raw.unlink()
        tokenizer.save(stage.tmp)
        return stage.finish({"format": FORMAT, "version": VERSION, "task": "lm",
                             "tokenizer": type(tokenizer).__name__, "dtype": np.dtype(dtype).name,
                             "vocab_size": tokenizer.vocab_size,
                             "splits": {"train": {"tokens": cut}, "val": {"tokens": n - cut}},
                             "sources": {"data": str(Path(data).resolve())}})
    except BaseException:
        stage.abandon()
        raise


# --------------------------------------------------------------------------------------- reading
class Prepared:
    """A directory written by `aiayn prepare`, opened for reading (nothing read until used)."""

    def __init__(self, directory: Path | str, task: str | None = None):
        self.dir = Path(directory)
        try:
            self.meta = json.loads((self.dir / META).read_text())
        except FileNotFoundError:
            raise DataError(f"{self.dir}: not a prepared corpus (no {META}); make one with `aiayn prepare`") from None
        except (OSError, ValueError) as e:
            raise DataError(f"{self.dir}/{META}: unreadable ({e})") from None
        if not isinstance(self.meta, dict) or self.meta.get("format") != FORMAT:
            raise DataError(f"{self.dir}: not a prepared corpus ({META} is not aiayn's)")
        if self.meta.get("version") != VERSION:
            raise DataError(f"{self.dir}: prepared with format version {self.meta.get('version')}; "
                            f"this aiayn reads version {VERSION}: prepare it again")
        if task is not None and self.meta.get("task") != task:
            raise DataError(f"{self.dir}: prepared for {self.meta.get('task')}, not {task}")

    def tokenizer(self):
        from aiayn.data.tokenizer import load_tokenizer

        return load_tokenizer(self.dir)

    def _load(self, name: str) -> np.ndarray:
        try:
            return np.load(self.dir / name, mmap_mode="r")
        except (OSError, ValueError) as e:
            raise DataError(f"{self.dir / name}: missing or corrupt ({e})") from None

    def pairs(self, split: str) -> "MappedPairs":
        return MappedPairs([tuple(self._load(f"{s}.{side}{ext}") for side in ("src", "tgt") for ext in (".npy", ".idx.npy"))
                            for s in self.meta["splits"][split]["shards"]])

    def val_text(self) -> list[tuple[str, str]]:
        from aiayn.data.corpus import read_parallel

        return read_parallel(self.dir / "val.src.txt", self.dir / "val.tgt.txt")

    def tokens(self, split: str) -> "TokenArray":
        return TokenArray(self._load(f"{split}.npy"))


class MappedPairs(Sequence):
    """Sentence pairs of memory-mapped shards: pairs[i] -> (source ids, target ids) as lists; the
    lengths of all pairs (int32) are the only arrays held in memory."""

    def __init__(self, shards: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]):
        self.shards = shards
        counts = [len(src_idx) - 1 for _, src_idx, _, _ in shards]
        self.starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        for (_, si, _, ti), n in zip(shards, counts):
            if len(ti) - 1 != n:
                raise DataError("a prepared shard has different numbers of source and target sentences")
        self.src_len = np.concatenate([np.diff(si).astype(np.int32) for _, si, _, _ in shards])
        self.tgt_len = np.concatenate([np.diff(ti).astype(np.int32) for _, _, _, ti in shards])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, i):
        k = int(np.searchsorted(self.starts, i, side="right")) - 1
        j = int(i) - int(self.starts[k])
        src, si, tgt, ti = self.shards[k]
        return src[si[j]:si[j + 1]].tolist(), tgt[ti[j]:ti[j + 1]].tolist()


class TokenArray:
    """A memory-mapped 1-D array of token ids that indexes like a LongTensor (what LMTask reads)."""

    def __init__(self, array: np.ndarray):
        self.array = array

    def __len__(self) -> int:
        return len(self.array)

    def __getitem__(self, index: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.array[index.numpy()].astype(np.int64))


# -------------------------------------------------------------------------------------- batching
class EpochBatches(Sequence):
    """An epoch's batches as two arrays (example ids in batch order, batch boundaries) instead of
    millions of Python lists; batches[b] is a NumPy array of example ids."""

    def __init__(self, ids: np.ndarray, bounds: np.ndarray, order: np.ndarray):
        self.ids, self.bounds, self.order = ids, bounds, order

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, b: int) -> np.ndarray:
        k = int(self.order[b])
        return self.ids[self.bounds[k]:self.bounds[k + 1]]


def length_batches(src_len: np.ndarray, tgt_len: np.ndarray, max_tokens: int, keep: np.ndarray | None = None,
                   seed: int = 0, epoch: int = 0, shuffle: bool = True) -> EpochBatches:
    """aiayn.data.batching.token_batches over length arrays: the same batches for the same pairs
    (sorted by target then source length, ties broken by the same random draw, cut greedily at
    `max_tokens` padded positions, then shuffled), for millions of pairs. `keep`: a boolean mask of
    the pairs to use; batches hold indices into the full arrays."""
    ids = np.arange(len(src_len), dtype=np.int64) if keep is None else np.flatnonzero(keep)
    s, t = src_len[ids], tgt_len[ids]
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    noise = torch.rand(len(ids), generator=g).numpy() if shuffle else np.zeros(len(ids), np.float32)
    order = np.lexsort((noise, s, t))  # the last key sorts first
    del noise
    ids = ids[order]
    width = np.maximum(s[order], t[order] + 1).tolist()  # small ints: a list of shared objects
    del s, t, order
    starts, longest, count = [0], 0, 0
    for k, w in enumerate(width):
        if count and max(longest, w) * (count + 1) > max_tokens:
            starts.append(k)
            longest, count = 0, 0
        count += 1
        longest = max(longest, w)
    if not width:
        starts = []
    bounds = np.array(starts + [len(width)], dtype=np.int64)
    n = len(starts)
    perm = torch.randperm(n, generator=g).numpy() if shuffle else np.arange(n)
    return EpochBatches(ids, bounds, perm)
