"""The "bf16-model" precision: a bf16 copy of the model runs the passes, the fp32 model keeps the
master weights (what the optimizer updates and checkpoints hold), gradients accumulate in fp32, and
a resumed run is still exact."""

import pytest
import torch

from aiayn.model import build_model
from aiayn.checkpoint import checkpoints
from aiayn.train.loop import Bf16Twin

from train import tiny


def test_the_copy_is_the_masters_rounded_with_ties_kept():
    torch.manual_seed(0)
    master = build_model(tiny.model_config())
    twin = Bf16Twin(master)
    pairs = list(zip(master.parameters(), twin.model.parameters(), strict=True))
    assert all(p.dtype == torch.float32 and q.dtype == torch.bfloat16 for p, q in pairs)
    assert all(torch.equal(p.to(torch.bfloat16), q) for p, q in pairs)
    tied = [name for name, _ in master.named_parameters(remove_duplicate=False)]
    assert len(tied) > len(pairs)  # the tiny preset ties its embeddings: the copy must too
    assert len(list(twin.model.named_parameters(remove_duplicate=False))) == len(tied)

    with torch.no_grad():
        for p in master.parameters():
            p.add_(0.25)
    twin.sync()
    assert all(torch.equal(p.to(torch.bfloat16), q) for p, q in pairs)


def test_gradients_are_added_into_fp32_masters_and_cleared():
    torch.manual_seed(0)
    master = build_model(tiny.model_config())
    twin = Bf16Twin(master)
    grads = []
    for _ in range(2):  # two micro-batches
        for q in twin.model.parameters():
            q.grad = torch.randn_like(q)
        grads.append([q.grad.float() for q in twin.model.parameters()])
        twin.collect_grads()
        assert all(q.grad is None for q in twin.model.parameters())
    for p, g1, g2 in zip(master.parameters(), *grads, strict=True):
        assert p.grad.dtype == torch.float32
        torch.testing.assert_close(p.grad, g1 + g2, rtol=0, atol=0)
    master.zero_grad(set_to_none=True)  # the next update (its fp32 buffers are the last update's)
    for q in twin.model.parameters():
        q.grad = torch.randn_like(q)
    new = [q.grad.float() for q in twin.model.parameters()]
    twin.collect_grads()
    for p, g in zip(master.parameters(), new, strict=True):
        torch.testing.assert_close(p.grad, g, rtol=0, atol=0)


@pytest.mark.bf16
def test_training_learns_like_autocast_and_checkpoints_fp32_weights(tmp_path):
    runs = {}
    for precision in ("bf16", "bf16-model"):
        tiny.trainer(tmp_path / precision, precision=precision, max_steps=12).run(progress=False)
        runs[precision] = [loss for _, loss, _ in tiny.train_rows(tmp_path / precision)]
    autocast, model = runs["bf16"], runs["bf16-model"]
    assert abs(model[0] - autocast[0]) < 0.02 * autocast[0]  # same start, different roundings
    assert model[-1] < 0.8 * model[0]
    assert abs(model[-1] - autocast[-1]) < 0.1 * autocast[-1]
    weights = tiny.weights(checkpoints(tmp_path / "bf16-model")[-1])
    assert {w.dtype for w in weights.values()} == {torch.float32}


@pytest.mark.bf16
def test_resume_is_exact(tmp_path):
    straight = tiny.trainer(tmp_path / "straight", precision="bf16-model", max_steps=10)
    straight.run(progress=False)
    tiny.trainer(tmp_path / "resumed", precision="bf16-model", max_steps=5).run(progress=False)
    tiny.trainer(tmp_path / "resumed", precision="bf16-model", max_steps=10).run(resume=True, progress=False)
    assert tiny.train_rows(tmp_path / "resumed") == tiny.train_rows(tmp_path / "straight")
    tiny.assert_same_weights(tiny.weights(checkpoints(tmp_path / "resumed")[-1]),
                             tiny.weights(checkpoints(tmp_path / "straight")[-1]))
