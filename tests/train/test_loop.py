"""The training loop's guards: non-finite losses and gradients, checkpoint pruning, the best
checkpoint, epoch boundaries, and run directories left behind by a killed run."""

import json
import math
import os
import subprocess
import sys
import warnings

import pytest
import torch

from aiayn.checkpoint import load_checkpoint
from aiayn.tasks.translation import TranslationTask
from aiayn.checkpoint import best_checkpoint, checkpoints
from aiayn.train.loop import TrainingError

from train import tiny


class _InfGrad(torch.autograd.Function):
    """Identity forward; infinite gradient backward: a finite loss whose backward pass overflows."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * math.inf


def failing_task(nan_steps=(), inf_grad_steps=(), nan_from=None):
    """TranslationTask whose loss is NaN (or whose gradient is infinite) on the chosen steps."""

    class Failing(TranslationTask):
        calls = 0

        def loss(self, model, batch, cfg):
            loss, n = super().loss(model, batch, cfg)
            self.calls += 1
            if self.calls in nan_steps or (nan_from is not None and self.calls >= nan_from):
                loss = loss * math.nan
            if self.calls in inf_grad_steps:
                loss = _InfGrad.apply(loss)
            return loss, n

    return Failing


def _all_finite(checkpoint):
    return all(torch.isfinite(t).all() for t in tiny.weights(checkpoint).values())


@pytest.mark.parametrize("kind", ["loss", "gradient"])
def test_a_non_finite_step_is_skipped_with_a_warning(tmp_path, kind):
    task = failing_task(nan_steps={3}) if kind == "loss" else failing_task(inf_grad_steps={3})
    with pytest.warns(RuntimeWarning, match=f"non-finite {kind} at step 3: update skipped"):
        tiny.trainer(tmp_path / "skip", task, max_steps=3, plot=True).run(progress=False)
    rows = tiny.train_rows(tmp_path / "skip")
    assert [r[1] is None for r in rows] == [False, False, True]
    assert (tmp_path / "skip" / "curves.png").is_file()  # a gap in the curve, not an error
    assert json.loads((tmp_path / "skip" / "metrics.jsonl").read_text().splitlines()[-2])["skipped"] == 1
    # skipping step 3 left the weights where two clean steps put them
    tiny.trainer(tmp_path / "two", max_steps=2).run(progress=False)
    tiny.assert_same_weights(tiny.weights(tmp_path / "skip" / "step-00000003"),
                             tiny.weights(tmp_path / "two" / "step-00000002"))


def test_repeated_non_finite_steps_stop_the_run(tmp_path):
    trainer = tiny.trainer(tmp_path, failing_task(nan_from=2), max_steps=10, max_nonfinite=3, save_every=1)
    with warnings.catch_warnings(), pytest.raises(TrainingError) as err:
        warnings.simplefilter("ignore")
        trainer.run(progress=False)
    message = str(err.value)
    assert "3 non-finite losses or gradients in a row (last at step 4)" in message and "\n" not in message
    assert [p.name for p in checkpoints(tmp_path)][-1] == "step-00000003"  # nothing saved after the error
    assert all(_all_finite(p) for p in checkpoints(tmp_path))
    tiny.assert_same_weights(tiny.weights(tmp_path / "step-00000003"), tiny.weights(tmp_path / "step-00000001"))


class _WorseEachTime(TranslationTask):
    """Validation gets worse every time, so the best checkpoint is the first one evaluated."""

    evaluations = 0

    def validate(self, model, cfg):
        self.evaluations += 1
        return {"val_loss": float(self.evaluations)}


@pytest.mark.parametrize("keep_last, kept", [(2, [2, 6, 7]), (0, [2, 7])])
def test_pruning_keeps_the_best_and_the_newest(tmp_path, keep_last, kept):
    trainer = tiny.trainer(tmp_path, _WorseEachTime, max_steps=7, eval_every=2, save_every=1, keep_last=keep_last)
    trainer.run(progress=False)
    assert [int(p.name.split("-")[1]) for p in checkpoints(tmp_path)] == kept
    assert best_checkpoint(tmp_path) == tmp_path / "step-00000002"
    assert trainer.state["best"] == {"step": 2, "value": 1.0, "checkpoint": "step-00000002"}


def test_an_epoch_ends_with_its_last_batch(tmp_path):
    trainer = tiny.trainer(tmp_path, max_steps=None, max_epochs=1, max_tokens=2048, eval_every=100)
    n_batches = len(trainer.task.epoch_batches(0, trainer.cfg.seed))
    summary = trainer.run(progress=False)
    assert summary["step"] == n_batches  # not one step of the next epoch
    assert (trainer.state["epoch"], trainer.state["batch"]) == (1, 0)


def test_no_training_data_is_a_clear_error(tmp_path):
    trainer = tiny.trainer(tmp_path, model_changes={"max_len": 4}, max_steps=2)  # every pair too long
    with pytest.raises(TrainingError, match="no training batches"):
        trainer.run(progress=False)


def test_resume_survives_a_torn_metrics_line(tmp_path):
    tiny.trainer(tmp_path, max_steps=4).run(progress=False)
    with open(tmp_path / "metrics.jsonl", "a") as f:  # killed at step 5, while writing its row
        f.write('{"step": 5, "epoch": 0, "loss": 1.0, "lr": 0.001}\n{"step": 6, "lo')
    tiny.trainer(tmp_path, max_steps=6).run(resume=True, progress=False)
    assert [r[0] for r in tiny.train_rows(tmp_path)] == [1, 2, 3, 4, 5, 6]
    assert load_checkpoint(tmp_path / "step-00000006", tiny.trainer(tmp_path).model,
                           tiny.trainer(tmp_path).optimizer)["step"] == 6


def test_a_fresh_run_drops_the_metrics_of_a_run_killed_before_its_first_checkpoint(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0, "lr": 1.0}\n{"step": 2, "lo')
    tiny.trainer(tmp_path, max_steps=2).run(progress=False)
    assert [r[0] for r in tiny.train_rows(tmp_path)] == [1, 2]
    assert tiny.train_rows(tmp_path)[0][1] != 9.0


_FAULTS = """
import resource, torch
from aiayn.memory import keep_freed_memory

def faults_of_big_temporaries():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        torch.ones(16 << 20).sum()  # 64 MB, freed at once
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

torch.ones(16 << 20)
default = faults_of_big_temporaries()
keep_freed_memory()
faults_of_big_temporaries()  # the first ones after the change may still be new memory
# the heap may still grow once more (a small block left above a freed big one): the best of three
print(default, min(faults_of_big_temporaries() for _ in range(3)))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_freed_memory_is_reused_not_faulted_in_again():
    # a fresh interpreter: the setting is process-wide and would outlive this test
    out = subprocess.run([sys.executable, "-c", _FAULTS], capture_output=True, text=True, check=True).stdout
    default, kept = map(int, out.split())
    assert default > 5 * 16_000  # 5 x 64 MB of 4 KB pages, faulted in each time
    assert kept < default / 4


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_the_malloc_setting_can_be_turned_off_for_a_machine_short_of_memory():
    env = {**os.environ, "AIAYN_KEEP_FREED_MEMORY": "0"}
    out = subprocess.run([sys.executable, "-c", _FAULTS], capture_output=True, text=True, check=True, env=env).stdout
    default, after = map(int, out.split())
    assert after > default / 2  # still faulted in each time: malloc was left alone
