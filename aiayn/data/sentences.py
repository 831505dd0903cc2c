"""Sentence splitting (pysbd, rule-based, per language) so that a paragraph is translated sentence by
sentence instead of being truncated at the model's maximum length.

`segments(text)` cuts a text into lines and each line into sentences, keeping every character that
is not part of a sentence (newlines, the spaces between sentences) as a separator, so that
`join(translate(sentences), separators)` keeps the layout of the original.
"""

from __future__ import annotations

import functools
import re

_LINE = re.compile(r"(\r\n|\r|\n)")
# the characters that end a sentence in pysbd's rules for any of its languages (and the ellipsis):
# a line with none of them before its last character is one sentence, and skips pysbd (~0.5 ms a
# line; a server splits every request's text)
_ENDS = re.compile("[.!?;:|\u2026\u3002\uff0e\uff01\uff1f\u0589\u055c\u061f\u060c\u06d4\u0964\u104b\u104f\u1362\u1367]")


@functools.lru_cache(maxsize=8)
def _segmenter(lang: str):
    import pysbd

    try:
        return pysbd.Segmenter(language=lang, clean=False)
    except ValueError:  # a language pysbd has no rules for: English rules are the closest general ones
        return pysbd.Segmenter(language="en", clean=False)


def split_sentences(line: str, lang: str = "en") -> list[tuple[str, str]]:
    """One line (no newline) -> [(sentence, the whitespace after it)], the line's leading whitespace
    on an empty first sentence. Joined back, the pairs give the line exactly."""
    body = line.lstrip()
    out = [("", line[: len(line) - len(body)])] if len(body) < len(line) else []
    if not body:
        return out or [("", "")]
    if _ENDS.search(body, 0, len(body.rstrip()) - 1) is None:
        pieces = [body]
    else:
        pieces = _segmenter(lang).segment(body)  # clean=False: the pieces are the text cut, spaces kept
        if "".join(pieces) != body:  # never seen; but a splitter must not lose or change text
            pieces = [body]
    for piece in pieces:
        sentence = piece.rstrip()
        out.append((sentence, piece[len(sentence):]))
    return out


def segments(text: str, lang: str = "en") -> list[tuple[str, str]]:
    """A text -> [(sentence, separator after it)] over all its lines; newlines are separators."""
    out: list[tuple[str, str]] = []
    parts = _LINE.split(text)  # line, newline, line, newline, ..., line
    for i in range(0, len(parts), 2):
        pairs = split_sentences(parts[i], lang)
        if i + 1 < len(parts):
            sentence, space = pairs[-1]
            pairs[-1] = (sentence, space + parts[i + 1])
        out += pairs
    return out


def join(translations: list[str], separators: list[str]) -> str:
    """The translated sentences with the original separators between them."""
    return "".join(t + s for t, s in zip(translations, separators))
