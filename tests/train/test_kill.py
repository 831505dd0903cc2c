"""SIGKILL a training run at several moments -- between checkpoints, while a checkpoint is being
written, when it is complete but not yet renamed, while an old one is being pruned -- and check
that the run directory still resumes, loses at most the steps since its last checkpoint, and then
finishes exactly as an uninterrupted run does."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from aiayn.checkpoint import checkpoints, recover

from train import tiny

# log_every=3 does not divide save_every: a resumed run must still log the very same rows
SETTINGS = dict(max_steps=8, save_every=2, eval_every=100, keep_last=1, log_every=3)
TESTS = Path(__file__).resolve().parents[1]

# The child trains exactly as tiny.trainer() does; a hook, patched in the child only, holds it at
# (or kills it at) a chosen moment. The product code has no hooks.
DRIVER = r"""
import json, os, signal, sys, time
sys.path.insert(0, sys.argv[1])
import aiayn.checkpoint as ckpt
from aiayn.tasks.translation import TranslationTask
from train import tiny

run_dir, hook, settings = sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
calls = []

def die():
    os.kill(os.getpid(), signal.SIGKILL)

if hook == "between-checkpoints":  # slow steps: room for the parent to kill it mid-step
    real_loss = TranslationTask.loss
    def loss(self, *args):
        time.sleep(0.05)
        return real_loss(self, *args)
    TranslationTask.loss = loss
elif hook == "while-writing":  # the 2nd checkpoint's trainer state takes a minute to write
    real_save_file = ckpt.save_file
    def save_file(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            time.sleep(60)
        return real_save_file(*args, **kwargs)
    ckpt.save_file = save_file
elif hook == "before-rename":  # the 2nd checkpoint is complete and fsynced in .tmp
    real_fsync_tree = ckpt._fsync_tree
    def fsync_tree(path):
        real_fsync_tree(path)
        calls.append(path)
        if len(calls) == 2:
            die()
    ckpt._fsync_tree = fsync_tree
elif hook == "while-pruning":  # the 1st checkpoint renamed to .del, half deleted
    real_rmtree = ckpt.shutil.rmtree
    def rmtree(path, *args, **kwargs):
        if str(path).endswith(".del"):
            os.remove(os.path.join(path, "trainer.json"))
            die()
        real_rmtree(path, *args, **kwargs)
    ckpt.shutil.rmtree = rmtree
tiny.trainer(run_dir, **settings).run(progress=False)
"""


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("straight")
    tiny.trainer(run_dir, **SETTINGS).run(progress=False)
    return tiny.train_rows(run_dir), tiny.weights(checkpoints(run_dir)[-1])


def _last_logged_step(run_dir: Path) -> int:
    """The newest step in metrics.jsonl; 0 while the file is still empty (opened, no row yet)."""
    steps = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        try:
            steps.append(json.loads(line)["step"])
        except ValueError:  # a row the kill cut short
            pass
    return max(steps, default=0)


def _wait_for(condition, child, timeout=120.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert child.poll() is None, f"the child ended early: {child.stderr.read().decode()[-2000:]}"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


@pytest.mark.parametrize("moment", ["between-checkpoints", "while-writing", "before-rename", "while-pruning"])
def test_killed_run_resumes_exactly(tmp_path, straight, moment):
    run_dir = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen([sys.executable, "-c", DRIVER, str(TESTS), str(run_dir), moment, json.dumps(SETTINGS)],
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        if moment == "between-checkpoints":
            _wait_for(lambda: (run_dir / "metrics.jsonl").is_file() and _last_logged_step(run_dir) >= 5, child)
            child.send_signal(signal.SIGKILL)
        elif moment == "while-writing":
            _wait_for(lambda: (run_dir / "step-00000004.tmp" / "model.safetensors").is_file(), child)
            child.send_signal(signal.SIGKILL)
        child.wait(timeout=120)
    finally:
        if child.poll() is None:  # only ever the child this test started
            child.kill()
            child.wait()
    assert child.returncode == -signal.SIGKILL

    leftovers = sorted(p.name for p in run_dir.iterdir() if p.suffix in (".tmp", ".old", ".del"))
    recover(run_dir)
    newest = int(checkpoints(run_dir)[-1].name.split("-")[1])
    lost = _last_logged_step(run_dir) - newest
    assert 0 <= lost <= SETTINGS["save_every"], (leftovers, newest, lost)
    if moment in ("while-writing", "before-rename"):  # a .tmp copy is never trusted: step 4 is redone
        assert leftovers == ["step-00000004.tmp"] and newest == 2
    elif moment == "while-pruning":
        assert leftovers == ["step-00000002.del"] and newest == 4

    resumed = tiny.trainer(run_dir, **SETTINGS)
    resumed.run(resume=True, progress=False)
    rows, weights = straight
    assert tiny.train_rows(run_dir) == rows
    tiny.assert_same_weights(tiny.weights(checkpoints(run_dir)[-1]), weights)
    assert [p.name for p in checkpoints(run_dir)] == ["step-00000008"]  # keep_last=1
