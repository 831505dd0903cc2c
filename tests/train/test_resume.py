"""Exact resume: N steps straight == N/2 steps, stop, resume to N -- losses, learning rates and
final weights equal bit for bit -- through the Trainer and through `aiayn train translation`.
And determinism: the same seed and settings give the same checkpoint."""

import json

import pytest
import torch

from aiayn.cli import main
from aiayn.tasks.translation import TranslationTask
from aiayn.checkpoint import checkpoints

from train import tiny


class _RandomValidation(TranslationTask):
    """Validation that draws random numbers (as sampling from a language model would)."""

    def validate(self, model, cfg):
        return {**super().validate(model, cfg), "noise": torch.rand(()).item()}


@pytest.mark.parametrize("task", [TranslationTask, _RandomValidation])
def test_resume_through_the_trainer_is_exact(tmp_path, task):
    # eval_every=4 does not divide 5: the stopped run validates and saves where the straight one did not
    straight = tiny.trainer(tmp_path / "straight", task, max_steps=10)
    straight.run(progress=False)
    first = tiny.trainer(tmp_path / "resumed", task, max_steps=5)
    first.run(progress=False)
    second = tiny.trainer(tmp_path / "resumed", task, max_steps=10)  # a new process would build exactly this
    summary = second.run(resume=True, progress=False)

    assert summary["step"] == 10
    rows = tiny.train_rows(tmp_path / "straight")
    assert [r[0] for r in rows] == list(range(1, 11))
    assert tiny.train_rows(tmp_path / "resumed") == rows  # losses and learning rates, bit for bit
    tiny.assert_same_weights(tiny.weights(checkpoints(tmp_path / "resumed")[-1]),
                             tiny.weights(checkpoints(tmp_path / "straight")[-1]))
    assert second.state["tokens"] == straight.state["tokens"]
    assert (second.state["epoch"], second.state["batch"]) == (straight.state["epoch"], straight.state["batch"])
    # the optimizer's moments too, not only the weights
    for p, q in zip(second.model.parameters(), straight.model.parameters(), strict=True):
        a, b = second.optimizer.state[p], straight.optimizer.state[q]
        assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


def test_resume_through_the_cli_is_exact(tmp_path, capsys):
    assert main(tiny.cli_train_args(tmp_path, tmp_path / "straight", "--max-steps", "8", "--eval-every", "4")) == 0
    assert main(tiny.cli_train_args(tmp_path, tmp_path / "resumed", "--max-steps", "4", "--eval-every", "4")) == 0
    # the run's own data files come from run.json: resuming needs only --out and the new stopping point
    assert main(["train", "translation", "--resume", "--out", str(tmp_path / "resumed"), "--max-steps", "8",
                 "--quiet"]) == 0
    capsys.readouterr()

    straight, resumed = (tiny.train_rows(tmp_path / d) for d in ("straight", "resumed"))
    assert [r[0] for r in straight] == list(range(1, 9)) and resumed == straight
    val = [[json.loads(r)["val_loss"] for r in (tmp_path / d / "metrics.jsonl").read_text().splitlines()
            if "val_loss" in r] for d in ("straight", "resumed")]
    assert val[0] == val[1]  # at steps 4 and 8
    tiny.assert_same_weights(tiny.weights(tmp_path / "resumed" / "step-00000008"),
                             tiny.weights(tmp_path / "straight" / "step-00000008"))
    run = json.loads((tmp_path / "resumed" / "run.json").read_text())
    assert run["train"]["max_steps"] == 8 and run["train"]["eval_every"] == 4  # the run's own settings kept


def _header_and_data(path):
    """A safetensors file -> (its JSON header, parsed; the tensor bytes)."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def test_same_seed_same_checkpoint(tmp_path):
    for name in ("a", "b", "c"):
        tiny.trainer(tmp_path / name, max_steps=3, eval_every=3, seed=2 if name == "c" else 1).run(progress=False)
    a, b, c = (_header_and_data(tmp_path / name / "step-00000003" / "model.safetensors") for name in "abc")
    # byte for byte, but for the order of the header's keys, which safetensors does not fix
    assert a[0] == b[0] and a[1] == b[1]
    assert a[1] != c[1]  # and the seed does matter
