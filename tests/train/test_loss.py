import pytest
import torch
import torch.nn.functional as F

from aiayn.train import loss as loss_mod
from aiayn.train.loss import label_smoothed_cross_entropy

pytestmark = pytest.mark.usefixtures("both_paths")  # tests/conftest.py


@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_equals_torch_cross_entropy_in_float64(monkeypatch, eps, reduction):
    monkeypatch.setattr(loss_mod, "ROWS", 7)  # several blocks, the last one partial
    torch.manual_seed(0)
    logits = (3 * torch.randn(30, 11, dtype=torch.float64)).requires_grad_()
    target = torch.randint(0, 11, (30,))
    ours = label_smoothed_cross_entropy(logits, target, eps, reduction)
    ref = F.cross_entropy(logits, target, label_smoothing=eps, reduction=reduction)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(ref)
    (got,) = torch.autograd.grad(ours, logits, g)
    (want,) = torch.autograd.grad(ref, logits, g)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_a_unit_upstream_gradient_in_float64(monkeypatch, reduction):
    # the case training meets: loss.backward() on the reduced loss, whose gradient comes untouched
    monkeypatch.setattr(loss_mod, "ROWS", 4)
    torch.manual_seed(3)
    logits = torch.randn(10, 9, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 9, (10,))
    label_smoothed_cross_entropy(logits, target, 0.1, reduction).backward()
    ref_logits = logits.detach().clone().requires_grad_()
    F.cross_entropy(ref_logits, target, label_smoothing=0.1, reduction=reduction).backward()
    torch.testing.assert_close(logits.grad, ref_logits.grad, rtol=1e-12, atol=1e-12)


def test_no_rows_give_nan_mean_and_zero_sum_like_torch():
    logits, target = torch.zeros(0, 5, requires_grad=True), torch.zeros(0, dtype=torch.long)
    assert torch.isnan(label_smoothed_cross_entropy(logits, target, 0.1))
    assert label_smoothed_cross_entropy(logits, target, 0.1, "sum").item() == 0.0


def test_gradcheck():
    logits = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([0, 5, 2, 2, 1])
    for reduction in ("none", "mean", "sum"):
        assert torch.autograd.gradcheck(lambda z: label_smoothed_cross_entropy(z, target, 0.1, reduction), (logits,))


def test_bf16_logits_get_bf16_gradients_close_to_fp32():
    torch.manual_seed(1)
    logits = torch.randn(300, 50).bfloat16().requires_grad_()
    target = torch.randint(0, 50, (300,))
    ours = label_smoothed_cross_entropy(logits, target, 0.1)
    ours.backward()
    ref_logits = logits.detach().float().requires_grad_()
    ref = F.cross_entropy(ref_logits, target, label_smoothing=0.1)
    ref.backward()
    assert ours.dtype == torch.float32 and logits.grad.dtype == torch.bfloat16
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(logits.grad.float(), ref_logits.grad, rtol=1e-2, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_overwriting_the_logits_gives_the_same_loss_and_gradients(monkeypatch, dtype, reduction):
    # the training case: the logits are a linear layer's output, which its backward does not need
    monkeypatch.setattr(loss_mod, "ROWS", 7)  # several blocks, the last one partial
    torch.manual_seed(2)
    x, target = torch.randn(30, 16, dtype=dtype), torch.randint(0, 40, (30,))
    w, b = torch.randn(40, 16, dtype=dtype), torch.randn(40, dtype=dtype)
    results = []
    for overwrite in (False, True):
        leaves = [t.clone().requires_grad_() for t in (x, w, b)]
        logits = F.linear(*leaves)
        loss = label_smoothed_cross_entropy(logits, target, 0.1, reduction, overwrite_logits=overwrite)
        grads = torch.autograd.grad(loss.sum(), leaves)
        results.append((loss, grads, logits.detach()))
    (loss, grads, logits), (loss_o, grads_o, logits_o) = results
    assert torch.equal(loss, loss_o)
    for a, b in zip(grads, grads_o):
        assert torch.equal(a, b)
    assert not torch.equal(logits_o, logits)  # their memory now holds the gradient (and no copy was made)
    if reduction == "sum":
        want = torch.softmax(logits.double(), 1) - 0.9 * F.one_hot(target, 40) - 0.1 / 40
        torch.testing.assert_close(logits_o.double(), want, rtol=0, atol=1e-2 if dtype == torch.bfloat16 else 1e-6)


def test_no_gradient_wanted_leaves_the_logits_alone():
    logits, target = torch.randn(6, 9), torch.randint(0, 9, (6,))
    before = logits.clone()
    label_smoothed_cross_entropy(logits, target, 0.1, overwrite_logits=True)
    assert torch.equal(logits, before)


def test_bad_shapes_and_reduction():
    with pytest.raises(ValueError, match="expected"):
        label_smoothed_cross_entropy(torch.zeros(2, 3, 4), torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="reduction"):
        label_smoothed_cross_entropy(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), reduction="max")
