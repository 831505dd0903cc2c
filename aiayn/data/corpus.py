"""Reading text: parallel corpora (two aligned files), plain text, and the shipped data sets."""

from __future__ import annotations

import gzip
from importlib import resources
from pathlib import Path

from aiayn.errors import InputError

ASSETS = Path(str(resources.files("aiayn") / "assets"))
MULTI30K = ASSETS / "multi30k"
MULTI30K_SPLITS = ("train", "val", "test_2016_flickr")
SHAKESPEARE = ASSETS / "tinyshakespeare" / "input.txt"


class DataError(InputError):
    """Bad data given by a user: the message names the file (and line)."""


def read_lines(path: Path | str) -> list[str]:
    """Lines of a UTF-8 text file, plain or gzipped, without their newlines (or a byte-order mark)."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path}: a directory, not a text file")
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise DataError(f"{path}: corrupt gzip file ({e})") from None
    try:
        text = raw.decode("utf-8-sig")  # (a byte-order mark, as some Windows editors write, is not text)
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(f"{path}, line {line}: invalid UTF-8") from None
    if not text.strip():
        raise DataError(f"{path}: empty file")
    return text.rstrip("\n").split("\n")


def read_parallel(src_path: Path | str, tgt_path: Path | str) -> list[tuple[str, str]]:
    """Aligned sentence pairs from two files (line i of one translates line i of the other)."""
    src, tgt = read_lines(src_path), read_lines(tgt_path)
    if len(src) != len(tgt):
        raise DataError(f"{src_path} has {len(src)} lines but {tgt_path} has {len(tgt)}: "
                        "a parallel corpus needs one line per sentence in both")
    return list(zip(src, tgt))


def multi30k_path(split: str, lang: str) -> Path:
    if split not in MULTI30K_SPLITS:
        raise DataError(f"unknown Multi30k split {split!r}; choose from {', '.join(MULTI30K_SPLITS)}")
    if lang not in ("en", "de", "fr"):
        raise DataError(f"Multi30k has en, de and fr, not {lang!r}")
    return MULTI30K / f"{split}.{lang}.gz"


def multi30k(split: str, src: str = "en", tgt: str = "de") -> list[tuple[str, str]]:
    return read_parallel(multi30k_path(split, src), multi30k_path(split, tgt))


def multi30k_tok_reference(split: str, lang: str) -> list[str]:
    """The lowercased, normalized, tokenized reference that Multi30k papers score against."""
    return read_lines(MULTI30K / "tok" / f"{split}.lc.norm.tok.{lang}.gz")


def read_text(path: Path | str) -> str:
    return "\n".join(read_lines(path)) + "\n"
