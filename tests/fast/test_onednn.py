import pytest
import torch
from torch import nn

from aiayn.config import preset
from aiayn.fast.inference import onednn_available, inference_model, quantize_int8
from aiayn.model import Transformer
from aiayn.fast.onednn import OneDNNTrainingLinear, use_onednn_linears

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


@pytest.mark.parametrize("needs", ["weight", "bias", "input"])
def test_gradients_of_some_inputs_only(needs):
    torch.manual_seed(0)
    ref = nn.Linear(24, 40)
    ours = nn.Linear(24, 40)
    ours.load_state_dict(ref.state_dict())
    ours.__class__ = OneDNNTrainingLinear
    for m in (ref, ours):
        m.weight.requires_grad_(needs == "weight")
        m.bias.requires_grad_(needs == "bias")
    x = torch.randn(50, 24, requires_grad=needs == "input")
    x2 = x.detach().clone().requires_grad_(needs == "input")
    g = torch.randn(50, 40)
    ref(x).backward(g)
    ours(x2).backward(g)
    for a, b in ((x2, x), (ours.weight, ref.weight), (ours.bias, ref.bias)):
        assert (a.grad is None) == (b.grad is None)
        if b.grad is not None:
            torch.testing.assert_close(a.grad, b.grad)


def test_cross_attention_projections_of_part_of_the_rows_run_on_onednn_with_gradients():
    from aiayn.model.attention import linear_rows

    torch.manual_seed(0)
    ref = nn.Linear(16, 48)
    ours = nn.Linear(16, 48)
    ours.load_state_dict(ref.state_dict())
    ours.__class__ = OneDNNTrainingLinear
    x = torch.randn(5, 16)
    for rows in (slice(None, 16), slice(16, None)):
        out = linear_rows(ours, x, rows)
        assert "_LinearFn" in out.grad_fn.name()  # oneDNN's product, not F.linear's
        torch.testing.assert_close(out, linear_rows(ref, x, rows))
        (out.sum() * 2).backward()
        (linear_rows(ref, x, rows).sum() * 2).backward()
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad)
    torch.testing.assert_close(ours.bias.grad, ref.bias.grad)


@pytest.mark.parametrize("n_in, n_out", [(24, 40), (40, 24), (32, 32)])  # x or dy copied, or either
def test_weight_gradient_equals_float64(n_in, n_out):
    from aiayn.fast.onednn import _weight_grads

    torch.manual_seed(0)
    dy, x = torch.randn(300, n_out), torch.randn(300, n_in)
    dw, db = _weight_grads(dy, x, True)
    assert dw.shape == (n_out, n_in)
    torch.testing.assert_close(dw.double(), dy.double().t() @ x.double(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(db.double(), dy.double().sum(0), rtol=1e-5, atol=1e-5)
    assert _weight_grads(dy, x, False)[1] is None


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


@pytest.fixture
def tuned(monkeypatch, tmp_path):
    """Decisions made afresh in a cache of this test's own (AIAYN_KERNELS=1: only what wins)."""
    from aiayn.kernels import tuning

    monkeypatch.setenv("AIAYN_KERNELS", "1")
    monkeypatch.setenv("AIAYN_CACHE", str(tmp_path))
    tuning.forget()
    yield tuning
    tuning.forget()


@pytest.mark.parametrize("wins", [True, False])
def test_oneDNN_trains_the_linears_only_where_it_was_measured_faster(tuned, monkeypatch, tmp_path, wins):
    """The gemm family's decision (stubbed both ways) picks the class; it is kept per CPU and torch
    version in the cache, with or without the C kernels."""
    measured = []
    monkeypatch.setattr(tuned, "_measure", lambda key: measured.append(key) or (wins, [1.2 if wins else 0.9]))
    model = use_onednn_linears(Transformer(preset("tiny", vocab_size=32)), "fp32", "cpu")
    assert any(isinstance(m, OneDNNTrainingLinear) for m in model.modules()) == wins
    assert any(type(m) is nn.Linear for m in model.modules()) != wins
    assert measured == ["gemm_f32"]
    (table,) = tmp_path.rglob("torch-*.tuning-*t.json")
    tuned.forget()  # a new process: read, not measured again
    use_onednn_linears(Transformer(preset("tiny", vocab_size=32)), "fp32", "cpu")
    assert measured == ["gemm_f32"] and f'"gemm_f32": {str(wins).lower()}' in table.read_text()


@pytest.mark.parametrize("switch, onednn", [("all", True), ("0", False)])
def test_AIAYN_KERNELS_all_and_0_decide_without_measuring(tuned, monkeypatch, switch, onednn):
    monkeypatch.setenv("AIAYN_KERNELS", switch)
    monkeypatch.setattr(tuned, "_measure", lambda key: pytest.fail(f"measured {key}"))
    model = use_onednn_linears(Transformer(preset("tiny", vocab_size=32)), "fp32", "cpu")
    assert any(isinstance(m, OneDNNTrainingLinear) for m in model.modules()) == onednn


def test_the_gemm_measurement_runs_from_under_no_grad_into_a_table_of_its_own(tuned):
    from aiayn.fast.onednn import faster_here

    with torch.no_grad():  # (asked from anywhere: measured with gradients all the same)
        assert isinstance(faster_here(), bool) and not torch.is_grad_enabled()
    (table,) = (t for (path, _), t in tuned._tables.items() if tuned.Path(path).name.startswith("torch-"))
    assert set(table) == {"version", "threads", "gemm_f32", "gemm_f32_speedups", "gemm_f32_busy"}
    assert table["gemm_f32_speedups"][0] > 0
