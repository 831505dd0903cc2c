"""R-Drop (Liang et al., 2021): the batch runs twice and a symmetric KL term ties the two outputs;
and fine-tuning a trained model (`--init-from`), with R-Drop as the showcase."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from aiayn.cli import main
from aiayn.config import TrainConfig, preset
from aiayn.data.batching import collate
from aiayn.model import Transformer
from aiayn.tasks.translation import translation_loss
from aiayn.train import loss as loss_mod
from aiayn.train.loss import symmetric_kl
from train import tiny


def reference_kl(p, q):
    lp, lq = p.log_softmax(-1), q.log_softmax(-1)
    return (F.kl_div(lq, lp, log_target=True, reduction="none").sum(-1)     # KL(p || q)
            + F.kl_div(lp, lq, log_target=True, reduction="none").sum(-1))  # KL(q || p)


def test_symmetric_kl_and_its_gradient_match_torch_kl_div_in_float64(monkeypatch):
    monkeypatch.setattr(loss_mod, "ROWS", 4)  # several blocks, the last one partial
    torch.manual_seed(0)
    logits = (3 * torch.randn(18, 11, dtype=torch.float64)).requires_grad_()
    ours = symmetric_kl(logits)
    ref = reference_kl(*logits.chunk(2))
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(ref)
    torch.testing.assert_close(torch.autograd.grad(ours, logits, g)[0], torch.autograd.grad(ref, logits, g)[0],
                               rtol=1e-12, atol=1e-12)
    same = torch.randn(3, 5).repeat(2, 1)
    assert torch.all(symmetric_kl(same).abs() < 1e-6)


def test_gradcheck_and_bf16():
    logits = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(symmetric_kl, (logits,))
    x = torch.randn(40, 30).bfloat16().requires_grad_()
    symmetric_kl(x).sum().backward()
    ref_x = x.detach().float().requires_grad_()
    reference_kl(*ref_x.chunk(2)).sum().backward()
    assert x.grad.dtype == torch.bfloat16
    torch.testing.assert_close(symmetric_kl(x.detach()), reference_kl(*ref_x.detach().chunk(2)), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.float(), ref_x.grad, rtol=2e-2, atol=1e-4)
    with pytest.raises(ValueError, match="2N"):
        symmetric_kl(torch.zeros(3, 4))


def batch():
    pairs = [([5, 6, 7, 2], [8, 9, 2]), ([5, 9, 2], [10, 11, 12, 13, 2]), ([4, 2], [7, 2])]
    return collate(pairs)


def test_without_dropout_the_two_copies_agree_and_the_loss_is_the_plain_one():
    torch.manual_seed(0)
    model = Transformer(preset("tiny", vocab_size=16, dropout=0.0)).double()
    plain = translation_loss(model, batch(), 0.1)
    torch.testing.assert_close(translation_loss(model, batch(), 0.1, rdrop=5.0), plain)


def test_with_dropout_the_kl_term_adds_a_positive_loss_and_gradients():
    model = Transformer(preset("tiny", vocab_size=16, dropout=0.3)).double().train()
    torch.manual_seed(1)
    with_kl = translation_loss(model, batch(), 0.1, rdrop=5.0)
    torch.manual_seed(1)
    without = translation_loss(model, batch(), 0.1, rdrop=1e-30)  # same two passes, same masks
    assert with_kl.item() > without.item()
    with_kl.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


def test_negative_alpha_is_refused():
    with pytest.raises(ValueError, match="rdrop"):
        TrainConfig(max_steps=1, rdrop=-1.0)


def test_the_cli_trains_with_rdrop_and_records_it(tmp_path):

    out = tmp_path / "run"
    assert main(tiny.cli_train_args(tmp_path, out, "--rdrop", "5", "--max-steps", "6")) == 0
    assert json.loads((out / "run.json").read_text())["train"]["rdrop"] == 5.0
    losses = [loss for _, loss, _ in tiny.train_rows(out)]
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses)


def test_a_negative_rdrop_is_a_one_line_error(tmp_path, capsys):
    assert main(tiny.cli_train_args(tmp_path, tmp_path / "run", "--rdrop", "-1", "--max-steps", "1")) != 0
    err = capsys.readouterr().err.strip()
    assert "rdrop" in err and len(err.splitlines()) == 1


def test_init_from_fine_tunes_a_trained_model_with_rdrop(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    assert main(tiny.cli_train_args(tmp_path, first, "--max-steps", "8", "--lr", "1e-2")) == 0
    checkpoint = sorted(first.glob("step-*"))[-1]
    assert main(tiny.cli_train_args(tmp_path, second, "--init-from", str(checkpoint), "--rdrop", "1",
                                    "--max-steps", "2", "--preset", "small")) == 0  # the preset does not apply
    run = json.loads((second / "run.json").read_text())
    assert run["train"]["rdrop"] == 1.0 and run["init_from"] == str(checkpoint.resolve())
    assert run["model"] == json.loads((first / "run.json").read_text())["model"]
    start_losses = [loss for _, loss, _ in tiny.train_rows(first)]
    fine_tuned = [loss for _, loss, _ in tiny.train_rows(second)]
    assert fine_tuned[0] < start_losses[0] - 1.0  # it starts from the trained weights


@pytest.mark.parametrize("extra, message", [(("--init-from", "nowhere"), "nowhere"),
                                            (("--init-from", "x", "--resume"), "--resume")])
def test_init_from_errors_are_one_line(tmp_path, capsys, extra, message):
    assert main(tiny.cli_train_args(tmp_path, tmp_path / "run", "--max-steps", "1", *extra)) != 0
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
