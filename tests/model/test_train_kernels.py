"""aiayn/kernels/train_step.c: training attention and the post-norm residual (forward and backward)
against PyTorch in float64, dropout's mask, and a model's training step with and without the kernels."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from aiayn import kernels
from aiayn.config import ModelConfig
from aiayn.fast import accelerate
from aiayn.model import build_model
from aiayn.model.attention import causal_mask

DTYPES = {"fp32": (torch.float32, 2e-5), "bf16": (torch.bfloat16, 2e-2)}  # dtype, tolerance relative to the largest value


@pytest.fixture(scope="module", autouse=True)
def built():
    if not kernels.available():
        pytest.skip("the kernels are not built here (no C compiler?)")


def _reference(x_q, x_kv, mask, H, D, k_col):
    """float64 attention with the heads split and merged as MultiHeadAttention does; queries that may
    attend to nothing get zeros."""
    B, T, S = x_q.size(0), x_q.size(1), x_kv.size(1)
    heads = lambda t, n: t.reshape(B, n, H, -1).transpose(1, 2)
    q, k, v = heads(x_q[..., :D], T), heads(x_kv[..., k_col:k_col + D], S), heads(x_kv[..., k_col + D:k_col + 2 * D], S)
    scores = q @ k.transpose(-1, -2) / math.sqrt(D // H)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = scores.softmax(-1).nan_to_num(0.0)  # a row of -inf: NaN -> 0
    return (weights @ v).transpose(1, 2).reshape(B, T, D)


def _close(ours, reference, tol, floor=1e-6):
    scale = reference.abs().max().clamp_min(floor)
    assert ((ours.double() - reference).abs().max() / scale).item() < tol


@settings(deadline=None, max_examples=60)
@given(B=st.integers(1, 4), T=st.integers(1, 20), S=st.integers(1, 20), H=st.integers(1, 3),
       head_dim=st.sampled_from([1, 5, 16, 64]), kind=st.sampled_from(["self", "causal", "cross"]),
       masking=st.sampled_from(["none", "padding", "general"]), dtype=st.sampled_from(sorted(DTYPES)),
       spread=st.sampled_from([0.1, 1.0, 10.0]), seed=st.integers(0, 2**16))
def test_training_attention_matches_pytorch_in_float64(B, T, S, H, head_dim, kind, masking, dtype, spread, seed):
    g = torch.Generator().manual_seed(seed)
    dt, tol = DTYPES[dtype]
    D = H * head_dim
    if kind != "cross":
        S = T
    x_q = spread * torch.randn(B, T, 3 * D if kind != "cross" else D, generator=g, dtype=torch.float64)
    x_kv = x_q if kind != "cross" else spread * torch.randn(B, S, 2 * D, generator=g, dtype=torch.float64)
    k_col = D if kind != "cross" else 0
    mask = causal_mask(T) if kind == "causal" else None
    if masking == "padding":  # (B, 1, 1, S), one row of nothing but padding
        padding = torch.rand(B, 1, 1, S, generator=g) < 0.7
        padding[0] = False
        mask = padding if mask is None else mask & padding
    elif masking == "general":  # (B, 1, T, S): any pattern, whole rows of False included
        mask = torch.rand(B, 1, T, S, generator=g) < 0.6
    grad = torch.randn(B, T, D, generator=g, dtype=torch.float64)

    a = x_q.clone().requires_grad_()
    b = a if kind != "cross" else x_kv.clone().requires_grad_()
    expected = _reference(a, b, mask, H, D, k_col)
    expected.backward(grad)

    ours_q = x_q.to(dt).requires_grad_()
    ours_kv = ours_q if kind != "cross" else x_kv.to(dt).requires_grad_()
    out = kernels.training_attention(ours_q, ours_kv, mask, H, D, k_col)
    assert out is not None and out.shape == (B, T, D) and out.dtype == dt
    out.backward(grad.to(dt))
    _close(out, expected, tol)
    _close(ours_q.grad, a.grad, tol)
    if kind == "cross":
        _close(ours_kv.grad, b.grad, tol)


@pytest.mark.parametrize("kind", ["causal", "cross"])
@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("T, S, head_dim", [(7, 7, 16), (19, 13, 5)])
def test_training_attention_with_dropout_matches_pytorch_given_its_mask(kind, dtype, T, S, head_dim):
    """Dropout on the weights (attn_dropout): the kernel's mask is dropout_mask's over (B, H, T, S)
    from the same seed, so the float64 reference can apply it; forward and every gradient agree."""
    dt, tol = DTYPES[dtype]
    B, H, p = 3, 2, 0.3
    D = H * head_dim
    S = T if kind == "causal" else S
    g = torch.Generator().manual_seed(T * 100 + S)
    x_q = torch.randn(B, T, 3 * D if kind == "causal" else D, generator=g, dtype=torch.float64)
    x_kv = x_q if kind == "causal" else torch.randn(B, S, 2 * D, generator=g, dtype=torch.float64)
    k_col = D if kind == "causal" else 0
    mask = causal_mask(T) if kind == "causal" else torch.rand(B, 1, 1, S, generator=g) < 0.8
    grad = torch.randn(B, T, D, generator=g, dtype=torch.float64)

    ours_q = x_q.to(dt).requires_grad_()
    ours_kv = ours_q if kind == "causal" else x_kv.to(dt).requires_grad_()
    torch.manual_seed(5)
    out = kernels.training_attention(ours_q, ours_kv, mask, H, D, k_col, dropout=p)
    assert out is not None
    out.backward(grad.to(dt))
    torch.manual_seed(5)  # the same seed: the same mask
    keep = kernels._dropout_mask(torch.empty(B, H, T, S), p).double()
    assert 0.5 < (keep > 0).double().mean().item() < 0.9  # (1 - p = 0.7 of them kept)

    a = x_q.clone().requires_grad_()
    b = a if kind == "causal" else x_kv.clone().requires_grad_()
    heads = lambda t, n: t.reshape(B, n, H, -1).transpose(1, 2)
    q, k, v = heads(a[..., :D], T), heads(b[..., k_col:k_col + D], S), heads(b[..., k_col + D:k_col + 2 * D], S)
    weights = (q @ k.transpose(-1, -2) / math.sqrt(head_dim)).masked_fill(~mask, float("-inf")).softmax(-1)
    expected = ((weights.nan_to_num(0.0) * keep) @ v).transpose(1, 2).reshape(B, T, D)
    expected.backward(grad)
    _close(out, expected, tol)
    _close(ours_q.grad, a.grad, tol)
    if kind == "cross":
        _close(ours_kv.grad, b.grad, tol)


@settings(deadline=None, max_examples=40)
@given(B=st.integers(1, 3), T=st.integers(1, 40), S=st.integers(1, 40), H=st.integers(1, 3),
       head_dim=st.sampled_from([3, 16, 32, 64]), kind=st.sampled_from(["self", "causal", "cross"]),
       masking=st.sampled_from(["none", "padding", "general"]), dtype=st.sampled_from(sorted(DTYPES)),
       dropout=st.sampled_from([0.0, 0.3]), nan=st.booleans(), seed=st.integers(0, 2**16))
def test_training_attention_computes_the_softmax_again_to_the_bit(B, T, S, H, head_dim, kind, masking, dtype, dropout,
                                                                   nan, seed):
    """Above KEEP_SOFTMAX_BYTES the backward pass computes the softmax again instead of reading the
    forward pass's copy: outputs and gradients the same to the bit, NaN where they are NaN (a NaN
    input, rows with nothing to attend to), dropout's mask included."""
    g = torch.Generator().manual_seed(seed)
    dt = DTYPES[dtype][0]
    D = H * head_dim
    S = T if kind != "cross" else S
    x_q = torch.randn(B, T, 3 * D if kind != "cross" else D, generator=g).to(dt)
    x_kv = x_q if kind != "cross" else torch.randn(B, S, 2 * D, generator=g).to(dt)
    if nan:
        x_kv.view(-1)[torch.randint(0, x_kv.numel(), (1,), generator=g)] = float("nan")
    k_col = D if kind != "cross" else 0
    mask = causal_mask(T) if kind == "causal" else None
    if masking == "padding":
        padding = torch.rand(B, 1, 1, S, generator=g) < 0.7
        padding[0] = False  # a row with nothing to attend to
        mask = padding if mask is None else mask & padding
    elif masking == "general":
        mask = torch.rand(B, 1, T, S, generator=g) < 0.6
    grad = torch.randn(B, T, D, generator=g).to(dt)

    results = []
    for keep in (True, False):
        a = x_q.clone().requires_grad_()
        b = a if kind != "cross" else x_kv.clone().requires_grad_()
        torch.manual_seed(seed)  # dropout's seed
        with pytest.MonkeyPatch.context() as patch:  # (hypothesis: no function-scoped fixture)
            patch.setattr(kernels, "KEEP_SOFTMAX_BYTES", 2**40 if keep else 0)
            out = kernels.training_attention(a, b, mask, H, D, k_col, dropout=dropout)
            assert out is not None
            out.backward(grad)
        results.append((out, a.grad) + ((b.grad,) if kind == "cross" else ()))
    for kept, again in zip(*results):
        assert torch.equal(kept.nan_to_num(7.0), again.nan_to_num(7.0)) and torch.equal(kept.isnan(), again.isnan())


def test_training_attention_keeps_the_softmax_up_to_its_budget(monkeypatch):
    monkeypatch.setattr(kernels, "KEEP_SOFTMAX_BYTES", 4 * 2 * 4 * 64 * 64)
    assert kernels.keeps_softmax(2, 4, 64, 64) and not kernels.keeps_softmax(2, 4, 65, 64)


def test_attention_layers_in_training_take_the_kernel_with_attention_dropout(record):
    """attn_dropout > 0 (the small preset's 0.1) no longer sends training to PyTorch's attention."""
    from aiayn.config import preset

    calls = record(kernels, "training_attention")
    model = accelerate(build_model(preset("tiny", vocab_size=40).replace(attn_dropout=0.1))).train()
    model(torch.randint(4, 40, (2, 6)), torch.randint(4, 40, (2, 5))).sum().backward()
    assert len(calls) == 6 and all(out is not None for out in calls)  # 2 encoder, 2 + 2 decoder attentions


def test_training_attention_declines_what_it_does_not_take():
    x = torch.randn(2, 3, 24)
    assert kernels.training_attention(x.double(), x.double(), None, 2, 8, 8) is None  # float64
    assert kernels.training_attention(x, x.bfloat16(), None, 2, 8, 8) is None         # mixed dtypes
    assert kernels.training_attention(x, x, torch.ones(2, 2, 3, 3, dtype=torch.bool), 2, 8, 8) is None  # a mask per head
    assert kernels.training_attention(x, x, torch.ones(2, 1, 3, 3), 2, 8, 8) is None  # not boolean
    long = torch.randn(1, kernels.MAX_TRAIN_LENGTH + 1, 24)
    assert kernels.training_attention(long, long, None, 2, 8, 8) is None              # too long
    assert kernels.training_attention(x, x, None, 2, 8, 8) is not None


def test_aiayn_kernels_0_turns_training_kernels_off(monkeypatch):
    monkeypatch.setenv("AIAYN_KERNELS", "0")
    x = torch.randn(2, 3, 24)
    assert kernels.training_attention(x, x, None, 2, 8, 8) is None
    assert kernels.dropout_mask(x, 0.1) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dropout_mask_keeps_one_minus_p_scaled(dtype):
    x = torch.empty(1000, 1001, dtype=dtype)  # not a multiple of 4 elements: a partial last word
    for p in (0.1, 0.5):
        mask = kernels.dropout_mask(x, p)
        assert mask.shape == x.shape and mask.dtype == dtype
        kept = mask != 0
        assert torch.equal(mask[kept], torch.full_like(mask[kept], 1 / (1 - p)))
        n, rate = x.numel(), kept.double().mean().item()
        assert abs(rate - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n)  # 5 standard deviations
        # neighbours within a 64-bit word, and rows, are not correlated: pairs (i, i + 1) both kept
        both = (kept[:, :-1] & kept[:, 1:]).double().mean().item()
        assert abs(both - (1 - p) ** 2) < 0.01
    assert kernels.dropout_mask(x, 0.0) is None and kernels.dropout_mask(x, 1.0) is None  # the callers' cases


def test_dropout_mask_follows_torch_seed_not_thread_count():
    x = torch.empty(333, 77)
    threads = torch.get_num_threads()
    try:
        torch.manual_seed(5)
        first = kernels.dropout_mask(x, 0.3)
        torch.set_num_threads(1)
        torch.manual_seed(5)
        again = kernels.dropout_mask(x, 0.3)
        other = kernels.dropout_mask(x, 0.3)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(first, again)
    assert not torch.equal(again, other)


def test_a_training_step_gives_the_same_gradients_with_and_without_kernels(monkeypatch):
    from aiayn.data.batching import Batch
    from aiayn.tasks.translation import translation_loss

    cfg = ModelConfig(vocab_size=60, d_model=32, n_heads=4, d_ff=64, n_encoder_layers=2, n_decoder_layers=2,
                      dropout=0.0, max_len=64)
    torch.manual_seed(0)
    model = accelerate(build_model(cfg)).train()
    src = torch.randint(4, 60, (6, 11))
    src[2, 7:] = cfg.pad_id
    tgt = torch.randint(4, 60, (6, 9))
    tgt[3, 5:] = cfg.pad_id
    batch = Batch(src, tgt[:, :-1], tgt[:, 1:])
    calls = []
    real = kernels.training_attention
    monkeypatch.setattr(kernels, "training_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    grads = {}
    for setting in ("all", "0"):
        monkeypatch.setenv("AIAYN_KERNELS", setting)
        model.zero_grad()
        translation_loss(model, batch, 0.1).backward()
        grads[setting] = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert len(calls) == 2 * 6  # each run: 2 encoder self-attentions, 2 decoder self- and 2 cross-attentions
    for name, grad in grads["all"].items():
        torch.testing.assert_close(grad, grads["0"][name], rtol=1e-4, atol=1e-6, msg=name)


@settings(deadline=None, max_examples=40)
@given(rows=st.integers(1, 40), width=st.sampled_from([1, 7, 64, 96]), p=st.sampled_from([0.0, 0.1, 0.5]),
       dtype=st.sampled_from([*sorted(DTYPES), "autocast"]), seed=st.integers(0, 2**16))
def test_residual_layer_norm_matches_pytorch_in_float64(rows, width, p, dtype, seed):
    # autocast: an fp32 residual stream and norm, a bf16 sublayer output (its gradient bf16 too)
    g = torch.Generator().manual_seed(seed)
    dt, tol = DTYPES["fp32" if dtype == "autocast" else dtype]
    y_dt, y_tol = DTYPES["bf16" if dtype == "autocast" else dtype]
    norm = torch.nn.LayerNorm(width).to(dt)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(width, generator=g) + 0.5)
        norm.bias.copy_(torch.randn(width, generator=g))
    x, y, grad = (3 * torch.randn(rows, width, generator=g, dtype=torch.float64) for _ in range(3))
    ours_x, ours_y = x.to(dt).requires_grad_(), y.to(y_dt).requires_grad_()
    torch.manual_seed(seed)
    out = kernels.residual_layer_norm(ours_x, ours_y, norm, p)
    out.backward(grad.to(dt))
    torch.manual_seed(seed)  # the same mask again
    mask = kernels.dropout_mask(ours_y, p).double() if p else torch.ones_like(y)
    ref_x, ref_y = x.to(dt).double().requires_grad_(), y.to(y_dt).double().requires_grad_()
    w, b = (t.detach().double().requires_grad_() for t in (norm.weight, norm.bias))
    expected = torch.nn.functional.layer_norm(ref_x + ref_y * mask, (width,), w, b, norm.eps)
    expected.backward(grad.to(dt).double())  # the gradient ours got, rounded: sums over rows cancel
    _close(out, expected, tol)
    _close(ours_x.grad, ref_x.grad, tol)
    assert out.dtype == dt and ours_y.grad.dtype == y_dt
    _close(ours_y.grad, ref_y.grad, y_tol)
    _close(norm.weight.grad, w.grad, tol)
    _close(norm.bias.grad, b.grad, tol)


def test_residual_layer_norm_declines_what_it_does_not_take():
    x = torch.randn(4, 8)
    norm = torch.nn.LayerNorm(8)
    assert kernels.residual_layer_norm(x.bfloat16(), x, norm, 0.1) is None                     # a bf16 stream, fp32 sublayer
    assert kernels.residual_layer_norm(x, torch.randn(8, 4).t(), norm, 0.1) is None           # not contiguous
    assert kernels.residual_layer_norm(x, x, torch.nn.LayerNorm(8, bias=False), 0.1) is None  # no bias
    assert kernels.residual_layer_norm(x, x, norm, 1.0) is None                               # everything dropped
    assert kernels.residual_layer_norm(x, x, norm, 0.1) is not None


@settings(deadline=None, max_examples=40)
@given(rows=st.integers(1, 30), vocab=st.sampled_from([1, 5, 16, 37, 300]), eps=st.sampled_from([0.0, 0.1]),
       dtype=st.sampled_from(sorted(DTYPES)), spread=st.sampled_from([0.1, 3.0, 30.0]), seed=st.integers(0, 2**16))
def test_cross_entropy_matches_pytorch_in_float64(rows, vocab, eps, dtype, spread, seed):
    g = torch.Generator().manual_seed(seed)
    dt, tol = DTYPES[dtype]
    logits = (spread * torch.randn(rows, vocab, generator=g)).to(dt)
    target = torch.randint(0, vocab, (rows,), generator=g)
    losses, grad = kernels.cross_entropy(logits, target, eps, 0.5, want_grad=True)
    z = logits.double().requires_grad_()
    expected = torch.nn.functional.cross_entropy(z, target, label_smoothing=eps, reduction="none")
    expected.sum().mul(0.5).backward()
    assert losses.dtype == torch.float32 and grad.dtype == dt
    # the losses are fp32 sums from the same (rounded) logits in either dtype
    torch.testing.assert_close(losses.double(), expected.detach(), rtol=1e-5, atol=1e-5)
    _close(grad, z.grad, tol)
    assert kernels.cross_entropy(logits, target, eps, 0.5, want_grad=False)[1] is None


def test_cross_entropy_kernel_rejects_a_target_out_of_range():
    with pytest.raises(IndexError):
        kernels.cross_entropy(torch.randn(3, 5), torch.tensor([0, 5, 1]), 0.1, 1.0, want_grad=True)


def test_without_openmp_the_kernels_use_their_own_threads_and_agree(monkeypatch, tmp_path):
    # the first flag set that builds wins; with OpenMP left out, parts run on POSIX threads
    x = torch.randn(3, 9, 3 * 32)
    g = torch.randn(3, 9, 32)
    norm = torch.nn.LayerNorm(32)
    logits, target = torch.randn(5, 40), torch.randint(0, 40, (5,))

    def run():
        torch.manual_seed(0)
        qkv = x.clone().requires_grad_()
        out = kernels.training_attention(qkv, qkv, causal_mask(9), 4, 32, 32)
        out.backward(g)
        y = torch.randn(3, 9, 32, requires_grad=True)
        z = kernels.residual_layer_norm(out.detach(), y, norm, 0.1)
        return out, qkv.grad, z, kernels.dropout_mask(x, 0.3), kernels.cross_entropy(logits, target, 0.1, 1.0, True)

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with_openmp = run()
        monkeypatch.setenv("AIAYN_CACHE", str(tmp_path))
        monkeypatch.setattr(kernels, "_FLAG_SETS", tuple(f for f in kernels._FLAG_SETS if "-fopenmp" not in f))
        kernels._library.cache_clear()
        assert kernels.available()
        without = run()
    finally:
        torch.set_num_threads(threads)
        kernels._library.cache_clear()
    for a, b in zip(with_openmp[:4], without[:4]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, b in zip(with_openmp[4], without[4]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@settings(deadline=None, max_examples=40)
@given(rows=st.integers(1, 30), width=st.sampled_from([1, 7, 16, 33, 512]), spread=st.sampled_from([0.1, 3.0, 30.0]),
       dtype=st.sampled_from([*sorted(DTYPES), "autocast"]), seed=st.integers(0, 2**16))
def test_bias_gelu_matches_pytorch_in_float64(rows, width, spread, dtype, seed):
    # autocast: a bf16 product and an fp32 bias (the parameter), whose gradient stays fp32
    g = torch.Generator().manual_seed(seed)
    dt, tol = DTYPES["bf16" if dtype == "autocast" else dtype]
    b_dt = torch.float32 if dtype == "autocast" else dt
    h, b, grad = spread * torch.randn(rows, width, generator=g), torch.randn(width, generator=g), torch.randn(rows, width, generator=g)
    ours_h, ours_b = h.to(dt).requires_grad_(), b.to(b_dt).requires_grad_()
    out = kernels.bias_gelu(ours_h, ours_b)
    out.backward(grad.to(dt))
    ref_h, ref_b = ours_h.detach().double().requires_grad_(), ours_b.detach().double().requires_grad_()
    expected = torch.nn.functional.gelu(ref_h + ref_b)
    expected.backward(grad.to(dt).double())
    assert out.dtype == dt and ours_h.grad.dtype == dt and ours_b.grad.dtype == b_dt
    # to the tolerance of values of 1 at least: GELU's negative tail, -u Φ(u), is small, and 1 + erf
    # there loses the same digits in PyTorch's fp32 as in ours (~1e-7 of |u|, absolute)
    _close(out, expected, tol, floor=1.0)
    _close(ours_h.grad, ref_h.grad, tol, floor=1.0)
    _close(ours_b.grad, ref_b.grad, tol, floor=1.0)


def test_bias_gelu_is_exact_to_fp32_at_the_extremes():
    u = torch.tensor([[0.0, -0.0, 1e-30, -1e-3, 1e-3, -5.0, 5.0, -12.0, 12.0, -50.0, 50.0, -3e38, 3e38]]).requires_grad_()
    out = kernels.bias_gelu(u, torch.zeros(u.size(1)))
    out.sum().backward()
    ref = u.detach().double().requires_grad_()
    torch.nn.functional.gelu(ref).sum().backward()
    torch.testing.assert_close(out.double(), torch.nn.functional.gelu(ref.detach()), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(u.grad.double(), ref.grad, rtol=1e-6, atol=1e-7)
    assert kernels.bias_gelu(torch.tensor([[float("nan")]]), torch.zeros(1)).isnan().all()


def test_bias_gelu_takes_what_it_computes():
    x, bias = torch.randn(4, 8), torch.randn(16)
    assert kernels.bias_gelu_takes(x, bias)
    assert not kernels.bias_gelu_takes(x.double(), bias)      # float64
    assert not kernels.bias_gelu_takes(x, None)               # no bias
    with torch.autocast("cpu", dtype=torch.bfloat16):        # its product will be bf16
        assert kernels.bias_gelu_takes(x, bias) == bool(kernels._wins("gelu", torch.bfloat16))
        assert not kernels.bias_gelu_takes(x.double(), bias)  # autocast leaves float64 as it is


def _gelu_lm():
    return ModelConfig(vocab_size=50, d_model=32, n_heads=4, d_ff=72, n_encoder_layers=0, n_decoder_layers=2,
                       dropout=0.0, max_len=16, norm_first=True, activation="gelu", positional="learned")


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_gelu_model_trains_through_the_kernel_with_pytorchs_gradients(monkeypatch, record, precision):
    from aiayn.fast import for_training
    from aiayn.fast.inference import onednn_available
    from aiayn.fast.onednn import OneDNNTrainingLinear
    from aiayn.lora import LoRAConfig, add_lora
    from aiayn.tasks.lm import lm_loss

    torch.manual_seed(0)
    monkeypatch.setenv("AIAYN_KERNELS", "all")  # fp32: the linear layers on oneDNN, where torch has it
    model = for_training(build_model(_gelu_lm()), precision, "cpu").train()
    on_onednn = precision == "fp32" and onednn_available()
    assert all((type(m.ff.w1) is OneDNNTrainingLinear) == on_onednn for m in model.decoder.layers)
    x, y = torch.randint(0, 50, (3, 16)), torch.randint(0, 50, (3, 16))
    calls = record(kernels, "bias_gelu")
    grads = {}
    for setting in ("all", "0"):
        monkeypatch.setenv("AIAYN_KERNELS", setting)
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = lm_loss(model, x, y)
        loss.backward()
        grads[setting] = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert len(calls) == 2  # AIAYN_KERNELS=all: each layer's feed-forward; =0: none
    tol = dict(rtol=1e-4, atol=1e-6) if precision == "fp32" else dict(rtol=0.05, atol=2e-3)
    for name, grad in grads["all"].items():
        torch.testing.assert_close(grad, grads["0"][name], **tol, msg=name)
    monkeypatch.setenv("AIAYN_KERNELS", "all")
    adapted = accelerate(build_model(_gelu_lm())).train()
    add_lora(adapted, LoRAConfig(rank=2, targets=("ff",)))  # an adapter's product is its own: PyTorch's path
    lm_loss(adapted, x, y).backward()
    assert len(calls) == 2
