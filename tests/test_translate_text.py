"""`aiayn translate`: a line of several sentences is translated sentence by sentence, one line out."""

import pytest

from aiayn.cli import main
from aiayn.data.corpus import ASSETS
from aiayn.translate import translate, translate_text

pytestmark = pytest.mark.usefixtures("one_thread")
ONE, TWO = "A dog runs in the snow.", "Two men play football."


@pytest.fixture(scope="module")
def shipped():
    from aiayn.checkpoint import load_model_dir

    model, tokenizer, _, _ = load_model_dir(ASSETS / "models" / "en-de")
    return model, tokenizer


def test_translate_text_joins_sentence_translations(shipped):
    a, b = translate(*shipped, [ONE, TWO], beam=1)
    got = translate_text(*shipped, [f"{ONE} {TWO}", ONE, "", f"{ONE}\n{TWO}"], beam=1)
    assert got == [f"{a} {b}", a, "", f"{a}\n{b}"]


def test_cli_keeps_one_line_per_line(capsys, shipped):
    a, b = translate(*shipped, [ONE, TWO], beam=1)
    assert main(["translate", "--beam", "1", f"{ONE} {TWO}", TWO]) == 0
    assert capsys.readouterr().out == f"{a} {b}\n{b}\n"


def test_control_characters_are_not_translated(shipped):
    """(a NUL byte in the input turned "rides" into "enthält")"""
    model, tok = shipped
    clean, nul, bell = translate(model, tok, ["A man rides a bike.", "A man\0 rides a bike.", "A man\x07rides a bike."])
    assert nul == clean and bell == clean
