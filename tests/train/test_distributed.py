"""Training on two gloo ranks under torchrun, against one process, through the `aiayn` command.

- 2 ranks (DDP) give the same losses, step by step, and the same weights as 1 process with the
  same (global) batch, for translation and for language modelling with --update-freq 2;
- FSDP resumes a 1-process checkpoint on 2 ranks, matches the 1-process run, and writes
  checkpoints that one process loads (translate); a 2-rank checkpoint resumes in 1 process;
- a 2-rank run killed with SIGKILL (the whole process group, as a dead machine) resumes exactly.

Weights are compared with one exception: the key part of each attention's in_proj.bias. Softmax
is unchanged when a constant is added to every score of a query, so those biases' true gradient is
0 and what they get is rounding noise, which Adam (eps 1e-9) turns into steps of +-lr: they differ
between any two summation orders, one process against itself included.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from aiayn import cli
from aiayn.checkpoint import best_checkpoint, load_model_dir

from train import tiny

ROOT = Path(__file__).resolve().parents[2]
TESTS = ROOT / "tests"
STEPS = ["--max-steps", "4", "--eval-every", "2", "--keep-last", "5"]

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def torchrun(*args: str, script: str | None = None, wait: bool = True, timeout: float = 120):
    """`torchrun --standalone --nproc-per-node 2 -m aiayn ARGS` (or a driver script) on one thread."""
    target = [script, str(TESTS)] if script else ["-m", "aiayn"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *target, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), str(TESTS)])}
    if not wait:  # its own process group: the test kills torchrun and both ranks at once
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def losses(run: Path) -> list[tuple[int, float]]:
    rows = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "lr" in r]


def assert_close_losses(a: Path, b: Path) -> None:
    la, lb = losses(a), losses(b)
    assert [s for s, _ in la] == [s for s, _ in lb] and la
    for (_, x), (_, y) in zip(la, lb):
        assert x == pytest.approx(y, rel=1e-5)


def assert_close_weights(a: Path, b: Path, atol: float = 1e-5) -> None:
    wa, wb = tiny.weights(a), tiny.weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        x, y = wa[name], wb[name]
        if name.endswith("in_proj.bias"):  # (see the module's docstring) the queries' and values' parts
            d = x.numel() // 3
            x, y = torch.cat([x[:d], x[2 * d:]]), torch.cat([y[:d], y[2 * d:]])
        torch.testing.assert_close(x, y, atol=atol, rtol=0, msg=lambda m: f"{name}: {m}")


def truncated_copy(run: Path, dest: Path, step: int) -> Path:
    """A copy of a run as if it had stopped after the checkpoint of `step`."""
    shutil.copytree(run, dest)
    for ckpt in dest.glob("step-*"):
        if int(ckpt.name[5:]) > step:
            shutil.rmtree(ckpt)
    return dest


# ----------------------------------------------------------------------------------- translation
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same tiny translation run (no dropout), in one process and on two DDP ranks."""
    d = tmp_path_factory.mktemp("translation")
    one, two = d / "one", d / "two"
    assert cli.main(tiny.cli_train_args(d, one, "--dropout", "0", *STEPS)) == 0
    torchrun(*tiny.cli_train_args(d, two, "--dropout", "0", *STEPS))
    return d, one, two


def test_two_ddp_ranks_train_as_one_process(runs):
    _, one, two = runs
    assert_close_losses(one, two)
    for step in (2, 4):
        assert_close_weights(one / f"step-{step:08d}", two / f"step-{step:08d}")


def test_a_two_rank_checkpoint_resumes_in_one_process(runs, tmp_path):
    d, one, two = runs
    resumed = truncated_copy(two, tmp_path / "resumed", 2)
    assert cli.main(tiny.cli_train_args(d, resumed, "--resume", "--max-steps", "4")) == 0
    assert_close_losses(one, resumed)
    assert_close_weights(one / "step-00000004", resumed / "step-00000004")


def test_fsdp_resumes_a_one_process_run_and_its_checkpoints_load_in_one_process(runs, tmp_path):
    d, one, _ = runs
    resumed = truncated_copy(one, tmp_path / "fsdp", 2)
    torchrun(*tiny.cli_train_args(d, resumed, "--resume", "--max-steps", "4", "--distributed", "fsdp"))
    assert_close_losses(one, resumed)
    assert_close_weights(one / "step-00000004", resumed / "step-00000004")
    ckpt = json.loads((resumed / "step-00000004" / "trainer.json").read_text())
    reference = json.loads((one / "step-00000004" / "trainer.json").read_text())
    assert ckpt["optimizer"]["param_groups"] == reference["optimizer"]["param_groups"]
    model, tokenizer, task, _ = load_model_dir(best_checkpoint(resumed))  # as `aiayn translate -m RUN` does
    assert task == "translation" and not any(type(p).__name__ == "DTensor" for p in model.parameters())
    from aiayn.translate import translate

    assert translate(model, tokenizer, ["the red man runs"], beam=1) == translate(
        load_model_dir(best_checkpoint(one))[0], tokenizer, ["the red man runs"], beam=1)


# Trains as the CLI does; after the first checkpoint every step is slow, so that the test can kill
# the run (torchrun and both ranks) between two checkpoints. The product code has no hooks.
DRIVER = r"""
import sys, time
sys.path.insert(0, sys.argv[1])
from aiayn import cli
from aiayn.tasks.translation import TranslationTask

real_loss = TranslationTask.loss
def loss(self, *args):
    time.sleep(0.15)
    return real_loss(self, *args)
if "--slow" in sys.argv:
    sys.argv.remove("--slow")
    TranslationTask.loss = loss
sys.exit(cli.main(sys.argv[2:]))
"""


def test_a_killed_two_rank_run_resumes_exactly(tmp_path):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    steps = STEPS  # and dropout 0.1: the masks must be the same
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    torchrun(*tiny.cli_train_args(tmp_path, straight, *steps), script=str(driver))
    child = torchrun(*tiny.cli_train_args(tmp_path, killed, *steps), "--slow", script=str(driver), wait=False)
    try:
        deadline = time.monotonic() + 90
        while not (killed / "step-00000002").is_dir():
            assert child.poll() is None and time.monotonic() < deadline, child.stdout.read().decode()[-3000:]
            time.sleep(0.05)
        time.sleep(0.3)  # a step or two past the checkpoint
    finally:
        os.killpg(child.pid, signal.SIGKILL)
        child.wait()
    assert not (killed / "step-00000004").exists()
    torchrun(*tiny.cli_train_args(tmp_path, killed, "--resume", *steps), script=str(driver))
    assert losses(killed) == losses(straight)
    for step in (2, 4):
        tiny.assert_same_weights(tiny.weights(straight / f"step-{step:08d}"),
                                 tiny.weights(killed / f"step-{step:08d}"))


# ---------------------------------------------------------------------------- language modelling
def test_two_ddp_ranks_with_update_freq_train_an_lm_as_one_process(tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("".join(f"{s} {t}\n" for s, t in tiny.TRAIN[:120]), encoding="utf-8")
    args = ["train", "lm", "--data", str(text), "--n-layers", "1", "--d-model", "32", "--n-heads", "2",
            "--context", "16", "--batch-size", "4", "--update-freq", "2", "--precision", "fp32", "--quiet",
            "--log-every", "1", *STEPS]
    one, two = tmp_path / "one", tmp_path / "two"
    assert cli.main([*args, "--out", str(one)]) == 0
    torchrun(*args, "--out", str(two))
    assert_close_losses(one, two)
    for step in (2, 4):
        assert_close_weights(one / f"step-{step:08d}", two / f"step-{step:08d}")


def test_vision_training_refuses_several_ranks(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert cli.main(["train", "vit", "--out", str(tmp_path / "run")]) == 2
    assert "train vit runs in one process" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_each_rank_takes_every_nth_example_and_an_empty_share_weighs_nothing():
    from aiayn.train.distributed import Parallel

    ranks = []
    for rank in range(3):
        p = Parallel.__new__(Parallel)  # no process group: shard() is pure
        p.rank, p.world = rank, 3
        ranks.append(p)
    batch = list(range(7))
    assert [p.shard(batch) for p in ranks] == [([0, 3, 6], True), ([1, 4], True), ([2, 5], True)]
    assert ranks[2].shard([9, 8]) == ([9], False)  # a copy of one example, with weight 0
    assert ranks[1].shard(torch.tensor([5, 6]))[0].tolist() == [6]  # LM batches are tensors
