"""The fast path (aiayn.fast: its modules and the C kernels) computes what the reference model computes.

Each test runs the reference (aiayn/model as built, AIAYN_KERNELS=0) and the fast form of the same
weights (aiayn.fast.accelerate, every kernel that takes the inputs) and compares them.
"""

import copy
from pathlib import Path

import pytest
import torch

import aiayn.model
from aiayn.config import ModelConfig
from aiayn.data.batching import Batch
from aiayn.decode import beam_search, generate, greedy
from aiayn.fast import accelerate, for_training
from aiayn.fast.inference import onednn_available
from aiayn.fast.modules import FAST
from aiayn.fast.onednn import OneDNNTrainingLinear
from aiayn.model import build_model
from aiayn.tasks.translation import translation_loss

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def tiny(decoder_only: bool = False, **changes) -> torch.nn.Module:
    torch.manual_seed(0)
    settings = dict(vocab_size=60, d_model=32, n_heads=4, d_ff=64, n_encoder_layers=0 if decoder_only else 2,
                    n_decoder_layers=2, dropout=0.0, max_len=64)
    cfg = ModelConfig(**{**settings, **changes})
    return build_model(cfg)


def both(model: torch.nn.Module, run, monkeypatch):
    """run(model) on the reference and on the fast form of a copy of it."""
    monkeypatch.setenv("AIAYN_KERNELS", "0")
    reference = run(model)
    monkeypatch.setenv("AIAYN_KERNELS", "all")
    fast = run(accelerate(copy.deepcopy(model)))
    return reference, fast


def test_accelerate_swaps_classes_in_place_and_keeps_the_state_dict():
    model = tiny()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert accelerate(model) is model
    kinds = {type(m) for m in model.modules()}
    assert set(FAST.values()) <= kinds and not kinds & set(FAST)
    assert state.keys() == model.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    accelerate(model)  # twice: nothing more
    assert {type(m) for m in model.modules()} == kinds


def test_the_model_code_has_no_fast_path():
    """aiayn/model reads like the paper: the kernels are called from aiayn/fast only."""
    model_dir = Path(aiayn.model.__file__).parent
    assert [p.name for p in model_dir.glob("*.py") if "kernels" in p.read_text()] == []


@pytest.mark.parametrize("beam", [1, 3])
def test_translation_decodes_the_same(beam, monkeypatch):
    model = tiny().eval()
    src = torch.randint(4, 60, (5, 9))
    src[1, 6:] = 0  # padding

    def run(m):
        with torch.no_grad():
            if beam == 1:
                return greedy(m, src, 1, 2, max_extra=8)
            return beam_search(m, src, 1, 2, beam_size=beam, max_extra=8)

    reference, fast = both(model, run, monkeypatch)
    if beam == 1:
        assert reference == fast
    else:
        for ours, theirs in zip(fast, reference):
            assert [tokens for tokens, _ in ours] == [tokens for tokens, _ in theirs]
            assert [s for _, s in ours] == pytest.approx([s for _, s in theirs], rel=1e-5)


def test_language_model_generates_the_same(monkeypatch):
    model = tiny(decoder_only=True).eval()
    prompt = [1, 17, 23, 5]

    def run(m):
        return (list(generate(m, prompt, 12, temperature=0)),
                list(generate(m, prompt, 12, temperature=0.8, top_k=20, seed=3, num_samples=3)))

    reference, fast = both(model, run, monkeypatch)
    assert reference == fast


@pytest.mark.parametrize("norm_first", [False, True])
def test_a_training_step_gives_the_same_loss_and_gradients(norm_first, monkeypatch):
    model = tiny(norm_first=norm_first).train()
    src, tgt = torch.randint(4, 60, (6, 11)), torch.randint(4, 60, (6, 9))
    tgt[3, 5:] = 0
    batch = Batch(src, tgt[:, :-1], tgt[:, 1:])

    def run(m):
        m.zero_grad()
        loss = translation_loss(m, batch, 0.1)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}

    (loss_r, grads_r), (loss_f, grads_f) = both(model, run, monkeypatch)
    torch.testing.assert_close(loss_f, loss_r, rtol=1e-5, atol=1e-6)
    for name, g in grads_r.items():
        torch.testing.assert_close(grads_f[name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_for_training_keeps_the_model_and_trains_with_dropout():
    model = tiny(dropout=0.3).train()
    assert for_training(model, "fp32", "cpu") is model
    src, tgt = torch.randint(4, 60, (4, 7)), torch.randint(4, 60, (4, 6))
    loss = translation_loss(model, Batch(src, tgt[:, :-1], tgt[:, 1:]), 0.1)
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in model.parameters() if p.requires_grad)
    if onednn_available():  # fp32 on a CPU: the linear layers on oneDNN too
        assert any(isinstance(m, OneDNNTrainingLinear) for m in model.modules())
