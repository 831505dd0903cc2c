"""`aiayn train lm` and `aiayn generate` end to end, on a tiny model: the same seed gives the same
text, resume is exact, and every bad input ends in one line on stderr and a non-zero exit."""

import pytest
import torch
from safetensors.torch import load_file

from aiayn.cli import main

TEXT = "".join(f"{w} is a word of the text, line {i % 7}.\n" for i, w in enumerate(["ROMEO", "JULIET", "NURSE"] * 40))
TINY = ["--n-layers", "1", "--d-model", "32", "--n-heads", "2", "--context", "16", "--batch-size", "4",
        "--quiet", "--precision", "fp32"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "text.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def run_dir(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("lm") / "run"
    assert main(["train", "lm", "--data", str(data), "--max-steps", "20", "--eval-every", "10", "--out", str(out),
                 *TINY]) == 0
    return out


def _generate(capsys, *args) -> str:
    capsys.readouterr()
    assert main(["generate", *args]) == 0
    return capsys.readouterr().out


def test_train_lm_writes_a_run_and_reports_validation(run_dir, capsys):
    assert (run_dir / "run.json").is_file() and (run_dir / "metrics.jsonl").is_file()
    assert (run_dir / "step-00000020" / "model.safetensors").is_file()
    assert '"val_loss"' in (run_dir / "metrics.jsonl").read_text()


def test_same_seed_same_text(run_dir, capsys):
    args = ["--model", str(run_dir), "--prompt", "ROMEO", "--seed", "1", "-n", "40"]
    first, second = _generate(capsys, *args), _generate(capsys, *args)
    assert first == second and first.startswith("ROMEO")
    assert _generate(capsys, *args[:-4], "--seed", "2", "-n", "40") != first
    greedy = ["--model", str(run_dir), "--prompt", "JULIET", "--temperature", "0", "-n", "30"]
    assert _generate(capsys, *greedy) == _generate(capsys, *greedy)


def test_generate_options(run_dir, capsys):
    base = ["--model", str(run_dir), "--seed", "3", "-n", "30"]
    out = _generate(capsys, *base, "--num-samples", "2", "--top-k", "5", "--top-p", "0.9")
    assert out.count("-" * 15) == 1
    assert _generate(capsys, *base, "--prompt", "").strip()  # an empty prompt is allowed
    stopped = _generate(capsys, *base, "--prompt", "NURSE", "--temperature", "0", "--stop", " ")
    assert stopped.startswith("NURSE") and " " not in stopped


def test_resume_is_exact(data, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    common = ["train", "lm", "--data", str(data), "--eval-every", "5", "--dropout", "0.1", *TINY]
    assert main([*common, "--max-steps", "10", "--out", str(straight)]) == 0
    assert main([*common, "--max-steps", "5", "--out", str(resumed)]) == 0
    assert main(["train", "lm", "--resume", "--max-steps", "10", "--out", str(resumed), "--quiet"]) == 0
    a = load_file(str(straight / "step-00000010" / "model.safetensors"))
    b = load_file(str(resumed / "step-00000010" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_finds_moved_text_with_data(data, tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text(TEXT, encoding="utf-8")
    run = tmp_path / "run"
    assert main(["train", "lm", "--data", str(text), "--max-steps", "5", "--eval-every", "5", "--out", str(run),
                 *TINY]) == 0
    moved = text.rename(tmp_path / "moved.txt")
    capsys.readouterr()
    assert main(["train", "lm", "--resume", "--max-steps", "10", "--out", str(run), "--quiet"]) == 2
    assert "give its new place with --data" in capsys.readouterr().err
    assert main(["train", "lm", "--resume", "--data", str(moved), "--max-steps", "10", "--out", str(run),
                 "--quiet"]) == 0
    assert (run / "step-00000010").is_dir()


def test_bpe_tokenizer(data, tmp_path, capsys):
    out = tmp_path / "bpe"
    assert main(["train", "lm", "--data", str(data), "--tokenizer", "bpe", "--vocab-size", "300",
                 "--max-steps", "3", "--out", str(out), *TINY]) == 0
    assert _generate(capsys, "--model", str(out), "--prompt", "ROMEO is", "--seed", "1", "-n", "10").startswith("ROMEO is")


@pytest.mark.parametrize("args, message", [
    (["--temperature", "-1"], "--temperature must be >= 0"),
    (["--top-p", "0"], "--top-p must be in (0, 1]"),
    (["--top-p", "1.5"], "--top-p must be in (0, 1]"),
    (["--top-k", "0"], "--top-k must be >= 1"),
    (["--max-new-tokens", "-1"], "--max-new-tokens must be >= 0"),
    (["--num-samples", "0"], "--num-samples must be >= 1"),
    (["--prompt", "ROMEO é ☃"], "characters outside the model's vocabulary: 'é' '☃'"),
])
def test_bad_generate_input_is_one_line(run_dir, capsys, args, message):
    _bad(capsys, ["generate", "--model", str(run_dir), *args], message)


def test_generate_without_a_model(tmp_path, capsys, monkeypatch):
    _bad(capsys, ["generate", "--model", str(tmp_path / "nowhere")], "no such model or run directory")
    monkeypatch.setattr("aiayn.data.corpus.ASSETS", tmp_path)
    _bad(capsys, ["generate", "--prompt", "ROMEO"], "no shipped language model")


def test_bad_train_input_is_one_line(data, tmp_path, capsys):
    train = ["train", "lm", "--max-steps", "1", "--out", str(tmp_path / "run"), *TINY]
    _bad(capsys, [*train, "--data", str(tmp_path / "missing.txt")], "no such file")
    short = tmp_path / "short.txt"
    short.write_text("ROMEO: hello\n" * 5)
    _bad(capsys, [*train, "--data", str(short)], "validation part of the text has 7 tokens")
    _bad(capsys, [*train, "--data", str(data), "--n-heads", "3"], "divisible by n_heads")


def _bad(capsys, argv, message):
    capsys.readouterr()
    assert main(argv) != 0
    captured = capsys.readouterr()
    assert message in captured.err
    assert len(captured.err.strip().splitlines()) == 1 and "Traceback" not in captured.err
    assert captured.out == ""


def test_resuming_an_lm_run_as_translation_names_the_run_kind(run_dir, capsys):
    """(it said "characters outside the model's vocabulary")"""
    _bad(capsys, ["train", "translation", "--resume", "--out", str(run_dir), "--max-steps", "9"],
         "holds a lm run, not a translation run: resume it with aiayn train lm")
