"""Checkpoints: an exact round trip (weights, optimizer, GradScaler, every RNG, trainer state), and
crash safety -- every moment a save can be interrupted leaves a checkpoint that loads."""

import errno
import json
import math
import random
import shutil

import numpy as np
import pytest
import torch

import aiayn.checkpoint as ckpt
from aiayn.checkpoint import (CheckpointError, checkpoints, load_checkpoint, load_model_dir, recover,
                              save_checkpoint)
from aiayn.model import build_model
from aiayn.train.loop import make_optimizer

from train import tiny


def _trained(seed: int = 0, steps: int = 2, **model_changes):
    """A tiny model and Adam after a few real updates (so the optimizer has state)."""
    torch.manual_seed(seed)
    model = build_model(tiny.model_config(**model_changes))
    cfg = tiny.train_config()
    opt = make_optimizer(model, cfg)
    src = torch.randint(4, 300, (3, 7))
    for _ in range(steps):
        opt.zero_grad()
        model(src, src).float().pow(2).mean().backward()
        opt.step()
    return model, opt


def _save(path, model, opt, state=None, scaler=None):
    save_checkpoint(path, model, tiny.tokenizer(), "translation", opt, state or {"step": 1}, scaler=scaler)


def _files(path):
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def test_round_trip_is_exact(tmp_path):
    model, opt = _trained()
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=3)
    scaler._lazy_init_scale_growth_tracker(torch.device("cpu"))
    scaler._scale.fill_(256.0), scaler._growth_tracker.fill_(2)
    state = {"step": 7, "epoch": 1, "batch": 3, "elapsed": 0.1 + 0.2, "tokens": 123,
             "best": {"step": 4, "value": 1 / 3, "checkpoint": "step-00000004"}, "nonfinite": 0}
    torch.manual_seed(5), random.seed(5), np.random.seed(5)
    _save(tmp_path / "c", model, opt, state, scaler)
    expected_draws = torch.rand(3), random.random(), np.random.rand()

    model2, opt2 = _trained(seed=1, steps=1)  # other weights, other optimizer state
    scaler2 = torch.amp.GradScaler("cpu")
    loaded = load_checkpoint(tmp_path / "c", model2, opt2, scaler2)

    assert loaded == state  # floats survive JSON exactly
    for (n, a), (_, b) in zip(model.state_dict().items(), model2.state_dict().items()):
        assert torch.equal(a, b), n
    sd, sd2 = opt.state_dict(), opt2.state_dict()
    assert sd["param_groups"] == sd2["param_groups"]  # betas still a tuple, lr the same float
    assert type(sd2["param_groups"][0]["betas"]) is tuple
    for i in sd["state"]:
        assert sd["state"][i].keys() == sd2["state"][i].keys()
        assert all(torch.equal(sd["state"][i][k], sd2["state"][i][k]) for k in sd["state"][i])
    assert scaler2.state_dict() == scaler.state_dict() and scaler2.get_scale() == 256.0
    draws = torch.rand(3), random.random(), np.random.rand()
    assert torch.equal(draws[0], expected_draws[0]) and draws[1:] == expected_draws[1:]


def test_checkpoint_of_an_older_version_still_loads(tmp_path):
    model, opt = _trained()
    _save(tmp_path / "c", model, opt, {"step": 3})
    meta = json.loads((tmp_path / "c" / "trainer.json").read_text())
    del meta["rng"], meta["scaler"]  # what the first version wrote
    (tmp_path / "c" / "trainer.json").write_text(json.dumps(meta))
    assert load_checkpoint(tmp_path / "c", *_trained(seed=1))["step"] == 3


class Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs, not even `except Exception` handlers."""


def test_killed_between_the_two_renames_keeps_the_new_checkpoint(tmp_path, monkeypatch):
    model, opt = _trained()
    _save(tmp_path / "step-00000002", model, opt, {"step": 2})
    old_files = _files(tmp_path / "step-00000002")
    model2, opt2 = _trained(seed=1)
    real_replace, calls = ckpt.os.replace, []

    def replace(a, b):
        calls.append((a, b))
        if len(calls) == 2:
            raise Killed
        real_replace(a, b)

    monkeypatch.setattr(ckpt.os, "replace", replace)
    with pytest.raises(Killed):
        _save(tmp_path / "step-00000002", model2, opt2, {"step": 2, "new": True})
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000002.old", "step-00000002.tmp"]
    assert checkpoints(tmp_path) == []

    recover(tmp_path)  # the new copy was complete: it wins
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000002"]
    assert load_checkpoint(tmp_path / "step-00000002", *_trained(seed=2))["new"] is True
    assert _files(tmp_path / "step-00000002") != old_files


@pytest.mark.parametrize("moment", ["writing", "pruning", "after the swap"])
def test_recover_after_a_crash(tmp_path, moment):
    model, opt = _trained()
    _save(tmp_path / "step-00000002", model, opt, {"step": 2})
    good = _files(tmp_path / "step-00000002")
    if moment == "writing":  # a partial copy: weights written, trainer state not yet
        partial = tmp_path / "step-00000004.tmp"
        partial.mkdir()
        (partial / "model.safetensors").write_bytes(good["model.safetensors"][:100])
    elif moment == "pruning":  # a deletion cut short: never listed as a checkpoint
        shutil.copytree(tmp_path / "step-00000002", tmp_path / "step-00000001.del")
        (tmp_path / "step-00000001.del" / "trainer.json").unlink()
    else:  # the old copy not yet deleted
        (tmp_path / "step-00000002.old").mkdir()
        (tmp_path / "step-00000002.old" / "model.safetensors").write_bytes(b"stale")
    assert checkpoints(tmp_path) == [tmp_path / "step-00000002"]
    recover(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000002"]
    assert _files(tmp_path / "step-00000002") == good


@pytest.mark.parametrize("existing", [False, True])
def test_full_disk_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch, existing):
    model, opt = _trained()
    _save(tmp_path / "step-00000002", model, opt, {"step": 2})
    good = _files(tmp_path / "step-00000002")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt, "save_file", full)  # the trainer state, after the weights were written
    target = tmp_path / ("step-00000002" if existing else "step-00000004")
    with pytest.raises(OSError, match="No space left"):
        _save(target, *_trained(seed=1), {"step": 4})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000002"]  # no partial copy left
    assert _files(tmp_path / "step-00000002") == good


def test_non_finite_weights_are_never_saved(tmp_path):
    model, opt = _trained()
    _save(tmp_path / "step-00000002", model, opt, {"step": 2})
    good = _files(tmp_path / "step-00000002")
    with torch.no_grad():
        next(model.parameters())[0] = math.nan
    for target in ("step-00000002", "step-00000003"):
        with pytest.raises(CheckpointError, match="non-finite"):
            _save(tmp_path / target, model, opt, {"step": 3})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000002"]
    assert _files(tmp_path / "step-00000002") == good


def test_a_checkpoint_of_another_model_is_refused_before_anything_changes(tmp_path):
    _save(tmp_path / "c", *_trained())
    model, opt = _trained(seed=1, d_ff=48)
    before = [p.clone() for p in model.parameters()]
    with pytest.raises(CheckpointError, match="different model.*d_ff"):
        load_checkpoint(tmp_path / "c", model, opt)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_model_dir_checks_its_tokenizer(tmp_path):
    from aiayn.data.tokenizer import BPETokenizer

    model, _ = _trained()
    (tmp_path / "m").mkdir()
    ckpt.write_model(tmp_path / "m", model, tiny.tokenizer(), "translation")
    assert load_model_dir(tmp_path / "m")[2] == "translation"
    # same size, other text: only the fingerprint tells them apart
    other = BPETokenizer.train([s.upper() for pair in tiny.TRAIN for s in pair], tiny.VOCAB_SIZE)
    assert other.vocab_size == tiny.tokenizer().vocab_size
    other.save(tmp_path / "m")
    with pytest.raises(CheckpointError, match="not the one these weights were trained with"):
        load_model_dir(tmp_path / "m")
