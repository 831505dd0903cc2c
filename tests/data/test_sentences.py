"""Sentence splitting: nothing lost or changed, abbreviations kept whole, layout restored."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from aiayn.data.sentences import join, segments, split_sentences


@pytest.mark.parametrize("line, sentences", [
    ("A man is riding a bicycle down the street.", ["A man is riding a bicycle down the street."]),
    ("Dr. Smith arrived at 5 p.m. on Jan. 3rd. He was late, e.g. by an hour! Was he sorry? No.",
     ["Dr. Smith arrived at 5 p.m. on Jan. 3rd.", "He was late, e.g. by an hour!", "Was he sorry?", "No."]),
    ("Version 3.14 costs $4.50 per unit at Acme Inc. in the U.S. today.",
     ["Version 3.14 costs $4.50 per unit at Acme Inc. in the U.S. today."]),
    ('Mr. Jones said: "It is fine." Then he left...  Really.',
     ['Mr. Jones said: "It is fine."', "Then he left...", "Really."]),
])
def test_english_sentences(line, sentences):
    assert [s for s, _ in split_sentences(line) if s] == sentences


def test_layout_is_kept():
    text = "  One dog. Two cats!\n\nThree birds?  \r\nEnd"
    pairs = segments(text)
    assert [s for s, _ in pairs if s] == ["One dog.", "Two cats!", "Three birds?", "End"]
    assert join([s for s, _ in pairs], [w for _, w in pairs]) == text
    assert join([s.upper() for s, _ in pairs], [w for _, w in pairs]) == "  ONE DOG. TWO CATS!\n\nTHREE BIRDS?  \r\nEND"


@given(st.text(alphabet=st.sampled_from("ab .!?\n\r\t\u00a0é漢"), max_size=60))
def test_nothing_is_lost(text):
    pairs = segments(text)
    assert join([s for s, _ in pairs], [w for _, w in pairs]) == text
    assert all(s == s.strip() for s, _ in pairs) and all(not w.strip() for _, w in pairs)


@pytest.mark.parametrize("lang", ["en", "de", "fr"])
def test_one_sentence_lines_skip_the_splitter_and_agree_with_it(lang, monkeypatch):
    """A line with no sentence end before its last character is one sentence without asking pysbd
    (the server's hot path): what pysbd says of the same lines. Lines with an end inside still go to it."""
    from aiayn.data import sentences
    from aiayn.data.corpus import multi30k

    lines = [pair[1 if lang != "en" else 0] for pair in multi30k("test_2016_flickr", "en", lang)][:300]
    expected = {line: [p.rstrip() for p in sentences._segmenter(lang).segment(line.strip())] for line in lines}
    asked = []
    real = sentences._segmenter

    def counting(language):
        asked.append(language)
        return real(language)
    monkeypatch.setattr(sentences, "_segmenter", counting)
    for line in lines:
        assert [s for s, _ in split_sentences(line, lang) if s] == expected[line]
    assert len(asked) < len(lines) // 4  # most Multi30k lines end with their only full stop
    asked.clear()
    assert [s for s, _ in split_sentences("One dog. Two cats", lang) if s] == ["One dog.", "Two cats"]
    assert asked == [lang]
