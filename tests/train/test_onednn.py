import pytest
import torch
from torch import nn

from aiayn.config import preset
from aiayn.inference import onednn_available, inference_model, quantize_int8
from aiayn.model import Transformer
from aiayn.train.onednn import OneDNNTrainingLinear, use_onednn_linears

pytestmark = pytest.mark.skipif(not onednn_available(), reason="this torch build has no oneDNN linears")


@pytest.mark.parametrize("bias", [True, False])
def test_forward_and_gradients_equal_nn_linear(bias):
    torch.manual_seed(0)
    ref = nn.Linear(24, 40, bias=bias)
    ours = nn.Linear(24, 40, bias=bias)
    ours.load_state_dict(ref.state_dict())
    ours.__class__ = OneDNNTrainingLinear
    x = torch.randn(3, 7, 24, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    g = torch.randn(3, 7, 40)
    y_ref, y = ref(x), ours(x2)
    y_ref.backward(g)
    y.backward(g)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(x2.grad, x.grad)
    for a, b in zip(ours.parameters(), ref.parameters()):
        torch.testing.assert_close(a.grad, b.grad)


def test_only_fp32_on_a_cpu_is_converted_and_copies_are_plain():
    torch.manual_seed(0)
    model = Transformer(preset("tiny", vocab_size=32))
    use_onednn_linears(model, "bf16", "cpu")
    assert not any(isinstance(m, OneDNNTrainingLinear) for m in model.modules())
    keys = set(model.state_dict())
    use_onednn_linears(model, "fp32", "cpu")
    assert any(isinstance(m, OneDNNTrainingLinear) for m in model.modules())
    assert set(model.state_dict()) == keys
    with torch.autocast("cpu", dtype=torch.bfloat16):  # falls back to nn.Linear under autocast
        assert model(torch.tensor([[5, 6]]), torch.tensor([[2]])).dtype == torch.bfloat16
    src = torch.tensor([[5, 6, 7]])
    for fast in (inference_model(model, "fp32"), quantize_int8(model)):
        assert not any(isinstance(m, OneDNNTrainingLinear) for m in fast.modules())
        assert fast(src, torch.tensor([[2]])).shape == (1, 1, 32)
