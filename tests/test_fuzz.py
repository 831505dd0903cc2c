"""Random Unicode -- control characters, emoji, combining marks, whitespace runs, very long
strings -- through the BPE tokenizer (a lossless round trip), `translate` and the `aiayn` command
(never a crash)."""

import warnings

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import aiayn.checkpoint as ckpt
from aiayn.checkpoint import load_model_dir
from aiayn.cli import build_parser, main
from aiayn.model import build_model
from aiayn.translate import translate

from train import tiny

# Any code point but surrogates (not text) and U+2581, sentencepiece's own space mark, which
# comes back as a space (the one documented exception).
CHARS = st.characters(blacklist_categories=("Cs",), blacklist_characters="\u2581")
TEXT = st.one_of(
    st.text(CHARS, max_size=40),
    st.text(st.sampled_from(" \t\n\r\x00\x1b\x7f\u00a0\u200b\u3000e\u0301😀👩‍👩‍👧"), max_size=40),
    st.text(CHARS, min_size=500, max_size=3000),  # past the model's maximum length
)
FUZZ = settings(max_examples=25, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
# capsys is read (and so emptied) after every example
FUZZ_CLI = settings(FUZZ, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """Untrained tiny models, saved and loaded as a user's would be: translation and (if `aiayn
    generate` is built) a language model."""
    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    dirs = {"translation": root / "translation", "lm": root / "lm"}
    for task, cfg in (("translation", tiny.model_config()),
                      ("lm", tiny.model_config(n_encoder_layers=0, max_len=32, norm_first=True))):
        dirs[task].mkdir()
        ckpt.write_model(dirs[task], build_model(cfg), tiny.tokenizer(), task)
    return dirs


@FUZZ
@given(st.lists(TEXT, min_size=1, max_size=3))
def test_bpe_round_trip_is_lossless(texts):
    tok = tiny.tokenizer()
    for text in texts:
        ids = tok.encode(text)
        assert all(3 < i < tok.vocab_size for i in ids)  # never a special token, never unknown
        assert tok.decode(ids) == text
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]


@FUZZ
@given(st.lists(TEXT, min_size=1, max_size=3), st.sampled_from([1, 2]))
def test_translate_never_crashes(model_dirs, sentences, beam):
    model, tokenizer, _, _ = load_model_dir(model_dirs["translation"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the truncation warning; its text is tested in test_cli_errors
        out = translate(model, tokenizer, sentences, beam=beam)
    assert len(out) == len(sentences) and all(isinstance(s, str) for s in out)


def _assert_no_crash(rc, err):
    assert "Traceback" not in err
    if rc != 0:  # a refusal, said in one line (e.g. an input of blanks only)
        assert rc == 2 and len([x for x in err.splitlines() if x.startswith("aiayn: error: ")]) == 1, err


@FUZZ_CLI
@given(st.lists(TEXT, min_size=1, max_size=2))
def test_translate_command_never_crashes(model_dirs, capsys, sentences):
    sentences = [s.replace("\x00", "") for s in sentences]  # a command line cannot hold NUL
    rc = main(["translate", "--model", str(model_dirs["translation"]), "--beam", "1", "--", *sentences])
    captured = capsys.readouterr()
    _assert_no_crash(rc, captured.err)
    if rc == 0:
        assert len(captured.out.splitlines()) >= len(sentences)


@FUZZ_CLI
@given(TEXT, st.integers(0, 40))
@example("-:", 0)  # a prompt that looks like an option
def test_generate_command_never_crashes(model_dirs, capsys, prompt, n):
    parser = build_parser()
    if "generate" not in parser._subparsers._group_actions[0].choices:
        pytest.skip("aiayn generate is not built")
    prompt = prompt.replace("\x00", "")
    # --prompt=TEXT: a prompt may start with "-" (as the --prompt help says)
    rc = main(["generate", "--model", str(model_dirs["lm"]), f"--prompt={prompt}", "-n", str(n), "--seed", "0"])
    captured = capsys.readouterr()
    _assert_no_crash(rc, captured.err)
    if rc == 0:
        assert captured.out.startswith(prompt)
