"""Our CPU dropout: the keep rate, the 1 / (1 - p) scale, gradients, and the fused residual form."""

import pytest
import torch

from aiayn.fast.modules import FastDropout as Dropout, add_dropout, dropout


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_keeps_one_minus_p_scaled_and_zeroes_the_rest(dtype):
    torch.manual_seed(0)
    x = torch.ones(200_000, dtype=dtype)
    y = dropout(x, 0.3)
    assert y.dtype == dtype and y.shape == x.shape
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.7) < 0.005
    torch.testing.assert_close(y[kept].float(), torch.full((int(kept.sum()),), 1 / 0.7), rtol=1e-2, atol=0)


def test_the_gradient_is_the_same_scaled_mask():
    torch.manual_seed(1)
    x = torch.randn(50, 40, dtype=torch.float64, requires_grad=True)
    y = dropout(x, 0.25)
    y.sum().backward()
    mask = y.detach() / x.detach()  # 0 or 1 / 0.75 at every element (x is nowhere 0)
    assert ((mask == 0) | ((mask - 1 / 0.75).abs() < 1e-12)).all()
    torch.testing.assert_close(x.grad, mask)


def test_add_dropout_is_x_plus_dropout_of_y_with_gradients_to_both():
    x = torch.randn(30, 20, dtype=torch.float64, requires_grad=True)
    y = torch.randn(30, 20, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(2)
    fused = add_dropout(x, y, 0.4)
    torch.manual_seed(2)
    plain = x + dropout(y, 0.4)
    torch.testing.assert_close(fused, plain)
    g = torch.randn_like(plain)
    assert all(torch.equal(a, b) for a, b in zip(torch.autograd.grad(fused, (x, y), g),
                                                  torch.autograd.grad(plain, (x, y), g)))


def test_identity_when_not_training_or_p_zero():
    x, y = torch.randn(4, 5), torch.randn(4, 5)
    assert dropout(x, 0.5, training=False) is x and dropout(x, 0.0) is x
    assert torch.equal(add_dropout(x, y, 0.5, training=False), x + y)
    assert torch.equal(add_dropout(x, y, 0.0), x + y)
    module = Dropout(0.5).eval()
    assert module(x) is x
    with pytest.raises(ValueError, match="dropout"):
        Dropout(1.5)
