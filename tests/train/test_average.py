"""Checkpoint averaging (§6.1) and `aiayn average`: the mean of the last N checkpoints' weights, a
length penalty recorded for translate/evaluate, and one-line errors."""

import json

import pytest
import torch

from aiayn.average import average_checkpoints
from aiayn.checkpoint import CheckpointError, checkpoints, load_model_dir
from aiayn.cli import main

from train import tiny


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run = tmp_path_factory.mktemp("avg") / "run"
    tiny.trainer(run, max_steps=6, eval_every=2, keep_last=5).run(progress=False)
    return run


def test_the_average_is_the_mean_of_the_last_checkpoints(run_dir, tmp_path):
    found = checkpoints(run_dir)
    assert len(found) == 3
    out = tmp_path / "avg"
    assert average_checkpoints(run_dir, 2, out) == found[-2:]
    model, _, task, extra = load_model_dir(out)
    got = model.state_dict()
    last_two = [tiny.weights(p) for p in found[-2:]]
    assert task == "translation" and extra["averaged"] == [p.name for p in found[-2:]]
    for name, a in last_two[0].items():
        torch.testing.assert_close(got[name], ((a.double() + last_two[1][name].double()) / 2).float(),
                                   rtol=0, atol=1e-7)
    assert not torch.equal(got["generator.weight"], last_two[1]["generator.weight"])  # not just the last one


def test_a_recorded_length_penalty_is_the_default_of_evaluate(run_dir, tmp_path, capsys):
    src, ref = tiny.write_corpus(tmp_path, tiny.VAL, "test")
    assert main(["average", str(run_dir), "--last", "2", "--out", str(tmp_path / "avg"), "--alpha", "1.3"]) == 0
    common = ["evaluate", "--model", str(tmp_path / "avg"), "--src-file", str(src), "--ref-file", str(ref)]
    capsys.readouterr()
    assert main(common) == 0
    assert json.loads(capsys.readouterr().out)["alpha"] == 1.3
    assert main([*common, "--alpha", "0.2"]) == 0  # given on the command line, it wins
    assert json.loads(capsys.readouterr().out)["alpha"] == 0.2
    assert main(["average", str(run_dir), "--last", "2", "--out", str(tmp_path / "plain")]) == 0
    capsys.readouterr()
    assert main(["evaluate", "--model", str(tmp_path / "plain"), "--src-file", str(src), "--ref-file", str(ref)]) == 0
    assert json.loads(capsys.readouterr().out)["alpha"] == 0.6


@pytest.mark.parametrize("args, message", [
    (["--last", "0"], "--last must be >= 1"),
    (["--alpha", "-1"], "--alpha must be >= 0"),
    (["--alpha", "300"], "--alpha must be >= 0 and <= 5"),  # (recorded, it overflowed every translation)
])
def test_bad_arguments_are_one_line_errors(run_dir, tmp_path, capsys, args, message):
    assert main(["average", str(run_dir), "--out", str(tmp_path / "x"), *args]) != 0
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_a_run_without_checkpoints_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoints"):
        average_checkpoints(tmp_path, 2, tmp_path / "avg")


def test_the_command_says_how_many_it_averaged(run_dir, tmp_path, capsys):
    assert main(["average", str(run_dir), "--last", "2", "--out", str(tmp_path / "two")]) == 0
    assert capsys.readouterr().out.startswith("averaged the last 2 checkpoints of ")
    assert main(["average", str(run_dir), "--last", "5", "--out", str(tmp_path / "all")]) == 0  # the run has 3
    out = capsys.readouterr().out
    assert out.startswith("averaged the last 3 checkpoints of ") and "--last asked for 5" in out


def test_the_output_never_replaces_the_run_or_other_files(run_dir, tmp_path, capsys):
    """(--out was replaced whatever it held: a folder of the user's files, a file, the run itself)"""
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "notes.txt").write_text("precious")
    text = tmp_path / "good.txt"
    text.write_text("GOOD")
    before = sorted(p.name for p in run_dir.iterdir())
    for out, message in ((notes, "not an empty directory or an averaged model"), (text, "not a directory"),
                         (run_dir, "inside the run directory"), (checkpoints(run_dir)[0], "inside the run directory")):
        assert main(["average", str(run_dir), "--last", "2", "--out", str(out)]) != 0
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    assert (notes / "notes.txt").read_text() == "precious" and text.read_text() == "GOOD"
    assert sorted(p.name for p in run_dir.iterdir()) == before
    avg = tmp_path / "avg"  # an earlier average is replaced
    for _ in range(2):
        assert main(["average", str(run_dir), "--last", "2", "--out", str(avg)]) == 0
