"""Bad input through the `aiayn` command: every case ends in one line on stderr that says what is
wrong, a non-zero exit, no traceback -- and nothing already saved is lost."""

import contextlib
import errno
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import aiayn.checkpoint as ckpt
from aiayn.checkpoint import checkpoints, load_checkpoint
from aiayn.cli import main
from aiayn.model import build_model
from aiayn.tasks.translation import TranslationTask
from aiayn.train.loop import make_optimizer

from train import tiny


def run(capsys, *argv) -> tuple[int, str, str]:
    """-> exit status, stdout, stderr without the line that says which precision "auto" chose."""
    rc = main([str(a) for a in argv])
    captured = capsys.readouterr()
    err = "".join(line for line in captured.err.splitlines(keepends=True) if not line.startswith("aiayn: precision "))
    return rc, captured.out, err


def assert_one_line_error(result: tuple[int, str, str], *fragments: str) -> str:
    """`result` (exit status, stdout, stderr) is a failure told in one line holding every fragment."""
    rc, _, err = result
    assert rc != 0
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("aiayn: error: ")]
    assert len(errors) == 1, err
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def tree_digest(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def write_model_dir(directory: Path, tokenizer=None, **model_changes) -> Path:
    """An untrained tiny translation model directory."""
    torch.manual_seed(0)
    directory.mkdir(parents=True)
    ckpt.write_model(directory, build_model(tiny.model_config(**model_changes)), tokenizer or tiny.tokenizer(),
                     "translation")
    return directory


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_model_dir(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A two-step run directory made by the command itself (copy it before changing it)."""
    root = tmp_path_factory.mktemp("run")
    assert main(tiny.cli_train_args(root, root / "run", "--max-steps", "2", "--eval-every", "2")) == 0
    return root / "run"


def train_args(tmp_path, out=None, src=None, tgt=None):
    """`aiayn train translation` on the tiny corpus (written to tmp_path/data), with --train-src or
    --train-tgt replaced."""
    (tmp_path / "data").mkdir(exist_ok=True)
    args = tiny.cli_train_args(tmp_path / "data", out or tmp_path / "run", "--max-steps", "2")
    if src:
        args[args.index("--train-src") + 1] = str(src)
    if tgt:
        args[args.index("--train-tgt") + 1] = str(tgt)
    return args


# ------------------------------------------------------------------------------------ input files
def test_empty_input_file(tmp_path, capsys, model_dir):
    empty = tmp_path / "empty.en"
    empty.write_text("\n\n")
    assert_one_line_error(run(capsys, *train_args(tmp_path, src=empty)), str(empty), "empty file")
    assert_one_line_error(run(capsys, "translate", "--model", model_dir, "--input", empty), "empty")


def test_line_count_mismatch_names_both_files(tmp_path, capsys):
    src, tgt = tiny.write_corpus(tmp_path)
    tgt.write_text("".join(t + "\n" for _, t in tiny.TRAIN[:-3]))
    assert_one_line_error(run(capsys, *train_args(tmp_path, src=src, tgt=tgt)),
                          f"{src} has 240 lines but {tgt} has 237")


def test_invalid_utf8_names_file_and_line(tmp_path, capsys, model_dir):
    bad = tmp_path / "bad.en"
    bad.write_bytes("".join(s + "\n" for s, _ in tiny.TRAIN[:4]).encode() + b"caf\xe9 latin-1\n" * 236)
    assert_one_line_error(run(capsys, *train_args(tmp_path, src=bad)), f"{bad}, line 5: invalid UTF-8")
    assert_one_line_error(run(capsys, "translate", "--model", model_dir, "--input", bad),
                          f"{bad}, line 5: invalid UTF-8")


def test_missing_files(tmp_path, capsys):
    missing = tmp_path / "nope.en"
    assert_one_line_error(run(capsys, *train_args(tmp_path, src=missing)), str(missing), "no such file")
    assert_one_line_error(run(capsys, "translate", "--model", tmp_path / "nope", "hello"),
                          "no such model or run directory")


def test_vocabulary_too_big_for_the_data(tmp_path, capsys):
    args = train_args(tmp_path)
    args[args.index("--vocab-size") + 1] = "8000"
    assert_one_line_error(run(capsys, *args), "cannot build a 8000-token BPE vocabulary", "<= ")


# ------------------------------------------------------------------------------- models and runs
@pytest.mark.parametrize("damage", ["truncated", "header only", "garbage", "empty"])
def test_corrupt_model_file(tmp_path, capsys, model_dir, damage):
    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    weights = broken / "model.safetensors"
    raw = weights.read_bytes()
    header = 8 + int.from_bytes(raw[:8], "little")
    weights.write_bytes({"truncated": raw[: len(raw) // 2], "header only": raw[:header],
                         "garbage": os.urandom(len(raw)), "empty": b""}[damage])
    assert_one_line_error(run(capsys, "translate", "--model", broken, "hello"), str(weights))


def test_corrupt_tokenizer_file(tmp_path, capsys, model_dir):
    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    (broken / "tokenizer.model").write_bytes(os.urandom(500))
    assert_one_line_error(run(capsys, "translate", "--model", broken, "hello"), f"{broken}: unreadable tokenizer")
    (broken / "tokenizer.model").write_bytes(b"")  # (sentencepiece logged several lines of its own first)
    assert_one_line_error(run(capsys, "translate", "--model", broken, "hello"), "tokenizer.model: empty file")


def test_weights_with_another_runs_tokenizer(tmp_path, capsys, model_dir):
    from aiayn.data.tokenizer import BPETokenizer

    mixed = tmp_path / "mixed"
    shutil.copytree(model_dir, mixed)
    # the same size, trained on other text: only the fingerprint tells them apart
    BPETokenizer.train([s.title() for pair in tiny.TRAIN for s in pair], tiny.VOCAB_SIZE).save(mixed)
    assert_one_line_error(run(capsys, "translate", "--model", mixed, "hello"),
                          "not the one these weights were trained with")
    smaller = tmp_path / "smaller"
    shutil.copytree(model_dir, smaller)
    BPETokenizer.train([s for pair in tiny.TRAIN for s in pair], 300).save(smaller)
    assert_one_line_error(run(capsys, "translate", "--model", smaller, "hello"),
                          "tokenizer has 300 tokens but the model was built for 320")


def test_resume_with_weights_of_another_preset(tmp_path, capsys, trained_run):
    run_dir = tmp_path / "run"
    shutil.copytree(trained_run, run_dir)
    other = write_model_dir(tmp_path / "other", d_model=16, d_ff=32)
    shutil.copy(other / "model.safetensors", run_dir / "step-00000002" / "model.safetensors")
    before = tree_digest(run_dir)
    resume = tiny.cli_train_args(tmp_path, run_dir, "--max-steps", "4", "--resume")
    assert_one_line_error(run(capsys, *resume), "step-00000002: saved for a different model (differs in d_ff, d_model)")
    assert tree_digest(run_dir) == before


def test_a_fresh_run_never_overwrites_a_run(tmp_path, capsys, trained_run):
    run_dir = tmp_path / "run"
    shutil.copytree(trained_run, run_dir)
    before = tree_digest(run_dir)
    assert_one_line_error(run(capsys, *tiny.cli_train_args(tmp_path, run_dir, "--max-steps", "2")),
                          "already holds a run; use --resume")
    assert tree_digest(run_dir) == before


@contextlib.contextmanager
def read_only(directory: Path):
    """No file may be created in `directory` -- by root neither, with chattr +i, as chmod does not
    stop root."""
    if os.geteuid() != 0:
        directory.chmod(0o500)
        try:
            yield
        finally:
            directory.chmod(0o700)
        return
    if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(directory)],
                                                        capture_output=True).returncode:
        pytest.skip("running as root, where chmod does not stop writes, and `chattr +i` is not available here")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(directory)], check=True)


def test_read_only_parent_directory(tmp_path, capsys):
    parent = tmp_path / "locked"
    parent.mkdir()
    with read_only(parent):
        result = run(capsys, *tiny.cli_train_args(tmp_path, parent / "run", "--max-steps", "2"))
    assert_one_line_error(result, str(parent / "run"))
    assert list(parent.iterdir()) == []


def test_read_only_run_directory_on_resume(tmp_path, capsys, trained_run):
    run_dir = tmp_path / "run"
    shutil.copytree(trained_run, run_dir)
    before = tree_digest(run_dir)
    with read_only(run_dir):
        result = run(capsys, *tiny.cli_train_args(tmp_path, run_dir, "--max-steps", "4", "--resume"))
    assert_one_line_error(result, str(run_dir))
    assert tree_digest(run_dir) == before


def test_disk_full_during_a_save(tmp_path, capsys, monkeypatch):
    real_save_model, calls = ckpt.save_model, []

    def save_model(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the second checkpoint, after the first was saved
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save_model(*args, **kwargs)

    monkeypatch.setattr(ckpt, "save_model", save_model)
    run_dir = tmp_path / "run"
    assert_one_line_error(run(capsys, *tiny.cli_train_args(tmp_path, run_dir, "--max-steps", "4", "--eval-every", "2")),
                          "No space left on device")
    assert sorted(p.name for p in run_dir.iterdir() if p.name.startswith("step-")) == ["step-00000002"]
    torch.manual_seed(0)
    model = build_model(tiny.model_config())
    optimizer = make_optimizer(model, tiny.train_config())
    assert load_checkpoint(run_dir / "step-00000002", model, optimizer)["step"] == 2  # loads, complete
    monkeypatch.undo()  # the disk has room again: the run goes on from its checkpoint
    assert run(capsys, *tiny.cli_train_args(tmp_path, run_dir, "--max-steps", "4", "--resume"))[0] == 0
    assert [p.name for p in checkpoints(run_dir)][-1] == "step-00000004"


def test_training_that_only_produces_nan_stops_with_one_line(tmp_path, capsys, monkeypatch):
    real_loss = TranslationTask.loss

    def nan_loss(self, model, batch, cfg):
        loss, n = real_loss(self, model, batch, cfg)
        return loss * float("nan"), n

    monkeypatch.setattr(TranslationTask, "loss", nan_loss)
    result = run(capsys, *tiny.cli_train_args(tmp_path, tmp_path / "run", "--max-steps", "20", "--eval-every", "5"))
    assert_one_line_error(result, "10 non-finite losses or gradients in a row", "last checkpoint is intact")
    err = result[2]
    warnings = [line for line in err.splitlines() if "non-finite loss at step" in line]
    assert len(warnings) == 9 and all(w.startswith("aiayn: warning: ") for w in warnings)


def test_input_longer_than_the_model_is_truncated_with_a_warning(capsys, model_dir):
    rc, out, err = run(capsys, "translate", "--model", model_dir, "--beam", "1", "the big dog " * 200, "a cat")
    assert rc == 0 and len(out.splitlines()) == 2
    assert err.splitlines() == ["aiayn: warning: 1 input(s) longer than the model's maximum of 127 tokens "
                                "were truncated (the first is input 1)"]


def test_fp16_translation_is_refused_on_a_cpu(capsys):
    assert main(["translate", "A dog.", "--precision", "fp16"]) == 2
    err = capsys.readouterr().err
    assert "needs a GPU (--device cuda)" in err and "Traceback" not in err


@pytest.mark.parametrize("device, message", [("gpu", "unknown device 'gpu'"), ("cuda:x", "unknown device 'cuda:x'"),
                                             ("cpu:1", "unknown device 'cpu:1'"), ("mps", "unknown device 'mps'")])
def test_an_unknown_device_is_refused_in_one_line(capsys, device, message):
    assert_one_line_error(run(capsys, "translate", "A dog.", "--device", device), message, "use cpu, cuda or cuda:N")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU (tests/test_cuda.py covers it)")
def test_a_gpu_asked_for_without_one_is_refused_in_one_line(capsys, tmp_path):
    assert_one_line_error(run(capsys, "translate", "A dog.", "--device", "cuda:1"), "no CUDA GPU is available")
    assert_one_line_error(run(capsys, "train", "lm", "--out", tmp_path / "r", "--device", "cuda", "--max-steps", "1"),
                          "no CUDA GPU is available")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("task", ["translation", "lm", "vit", "image-gpt"])
def test_a_negative_learning_rate_is_refused_before_training(capsys, tmp_path, task):
    out = tmp_path / "run"
    assert_one_line_error(run(capsys, "train", task, "--out", out, "--lr", "-1", "--max-steps", "1", "--quiet"),
                          "the learning rate must be > 0, got -1")
    assert not out.exists()


@pytest.mark.parametrize("command", ["translate", "evaluate"])
def test_zero_decoding_workers_are_refused(capsys, command):
    args = ["A dog."] if command == "translate" else []
    assert_one_line_error(run(capsys, command, *args, "--workers", "0"), "--workers must be >= 1")


def test_translate_with_two_workers(capsys, model_dir):
    rc, out, _ = run(capsys, "translate", "--model", model_dir, "--beam", "1", "--workers", "2", "a cat", "the dog")
    assert rc == 0 and len(out.splitlines()) == 2


@pytest.mark.parametrize("command", ["translate", "evaluate"])
@pytest.mark.parametrize("alpha", ["-1", "300", "nan"])
def test_a_length_penalty_out_of_range_is_refused(capsys, command, alpha):
    """(300 overflowed GNMT's penalty, a traceback)"""
    args = ["A dog."] if command == "translate" else []
    assert_one_line_error(run(capsys, command, *args, "--alpha", alpha), "--alpha must be from 0 to 5")


@pytest.mark.parametrize("args, message", [
    (["translate", "--beam", "100000", "A dog."], "--beam must be from 1 to 64"),
    (["evaluate", "--beam", "0"], "--beam must be from 1 to 64"),
    (["translate", "--n-best", "0", "A dog."], "--n-best must be from 1 to --beam (4)"),
    (["translate", "--n-best", "10", "--beam", "2", "A dog."], "--n-best must be from 1 to --beam (2)"),
    (["explain", "--top-k", "100000", "A dog."], "--top-k must be from 1 to 50"),
    (["evaluate", "--ref-file", "ref.txt"], "--src-file and --ref-file go together"),
    (["generate-image", "--guidance", "2", "--out", "x.png"], "--guidance needs --label"),
    (["generate", "--stop", ""], "--stop needs a text"),
    (["bench", "decode", "--rounds", "0"], "--rounds must be >= 1"),
    (["prepare", "lm", "--tokenizer", "bpe", "--tokenizer-from", "x", "--out", "never"], "not both"),
])
def test_values_out_of_range_are_one_line_before_any_work(capsys, args, message):
    assert_one_line_error(run(capsys, *args), message)


def test_evaluate_will_not_write_its_translations_over_an_input(tmp_path, capsys):
    src, ref = tmp_path / "src.txt", tmp_path / "ref.txt"
    src.write_text("A dog runs.\n")
    ref.write_text("Ein Hund rennt.\n")
    for target in (src, ref):
        assert_one_line_error(run(capsys, "evaluate", "--src-file", str(src), "--ref-file", str(ref),
                                  "--hyp-out", str(target)), "would overwrite an input file")
    assert src.read_text() == "A dog runs.\n" and ref.read_text() == "Ein Hund rennt.\n"


@pytest.mark.parametrize("args", [["generate", "--seed", "99999999999999999999999"],
                                  ["generate-image", "--seed", "-1", "--out", "x.png"],
                                  ["generate", "--temperature", "nan"],
                                  ["generate-image", "--temperature", "inf", "--out", "x.png"]])
def test_seeds_and_temperatures_out_of_range_are_argument_errors(capsys, args):
    """(a seed past 2^63 was a traceback from torch.manual_seed; nan sampled text)"""
    with pytest.raises(SystemExit) as e:
        main(args)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith(f"aiayn {args[0]}: error: argument --")


def test_an_ensemble_translates_and_needs_one_tokenizer(tmp_path, capsys, model_dir):
    from aiayn.data.tokenizer import BPETokenizer

    other = write_model_dir(tmp_path / "other", d_model=48)  # another architecture, the same tokenizer
    rc, out, _ = run(capsys, "translate", "--model", model_dir, "--model", other, "--beam", "2", "a cat", "the dog")
    assert rc == 0 and len(out.splitlines()) == 2
    retok = write_model_dir(tmp_path / "retok", tokenizer=BPETokenizer.train(
        [s.title() for pair in tiny.TRAIN for s in pair], tiny.VOCAB_SIZE))
    assert_one_line_error(run(capsys, "translate", "--model", model_dir, "--model", retok, "hello"),
                          "an ensemble needs models of one vocabulary")


def test_aiayn_debug_shows_the_traceback(capsys, monkeypatch):
    """A one-line error hides where it came from; AIAYN_DEBUG=1 lets it through, for a bug report."""
    assert main(["translate", "--model", "/no/such/model", "x"]) == 1
    monkeypatch.setenv("AIAYN_DEBUG", "1")
    with pytest.raises(Exception, match="no such model"):
        main(["translate", "--model", "/no/such/model", "x"])


def test_a_reader_that_goes_away_stops_the_command_quietly():
    """`aiayn ... | head`: once head has what it wants, aiayn stops without a word (no "Broken
    pipe" error, no traceback), with a SIGPIPE's exit status."""
    import sys

    read, write = os.pipe()
    proc = subprocess.Popen([sys.executable, "-m", "aiayn", "machine"], stdout=write, stderr=subprocess.PIPE)
    os.close(write)
    os.close(read)  # the reader is gone before aiayn writes its first line
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 141 and err.decode() == ""


@pytest.mark.parametrize("task, option, value, message", [
    ("lm", "--context", "0", "context must be >= 1"),
    ("lm", "--batch-size", "0", "batch_size must be >= 1"),
    ("lm", "--dropout", "2", "dropout is a probability"),
    ("lm", "--dropout", "nan", "dropout is a probability"),
    ("lm", "--eval-every", "0", "eval_every must be >= 1"),
    ("lm", "--log-every", "0", "log_every must be >= 1"),
    ("lm", "--max-steps", "-1", "max_steps must be >= 1"),
    ("lm", "--max-minutes", "nan", "max_minutes must be a number > 0"),
    ("lm", "--n-layers", "0", "at least one layer"),
    ("lm", "--warmup", "-5", "warmup and keep_last must be >= 0"),
    ("lm", "--weight-decay", "-1", "weight_decay must be >= 0"),
    ("lm", "--clip-norm", "nan", "clip_norm must be a number > 0"),
    ("translation", "--label-smoothing", "2", "label_smoothing must be from 0 to below 1"),
    ("translation", "--max-tokens", "0", "max_tokens must be >= 1"),
    ("vit", "--batch-size", "0", "batch_size must be >= 1"),
    ("image-gpt", "--shift", "100", "would move 28-pixel images out of sight"),
])
def test_training_values_out_of_range_are_one_line_before_a_run_starts(tmp_path, capsys, task, option, value,
                                                                        message):
    """(each was a traceback at the first step, or a run that trained nothing, or trained on NaN)"""
    out = tmp_path / "run"
    assert_one_line_error(run(capsys, "train", task, "--out", str(out), option, value), message)
    assert not out.exists()


def test_a_byte_order_mark_is_not_translated_and_a_directory_is_named_as_one(tmp_path, capsys):
    """(a UTF-8 BOM reached the model: "A man rides." came out as "Verschiedener Mann fährt Reisen.")"""
    plain, marked = tmp_path / "plain.txt", tmp_path / "marked.txt"
    plain.write_text("A man rides.\n", encoding="utf-8")
    marked.write_text("A man rides.\n", encoding="utf-8-sig")
    outputs = []
    for path in (plain, marked):
        rc, out, _ = run(capsys, "translate", "--beam", "1", "--input", str(path))
        assert rc == 0
        outputs.append(out)
    assert outputs[0] == outputs[1]
    assert_one_line_error(run(capsys, "translate", "--input", str(tmp_path)), "a directory, not a text file")
