"""Attention (§3.2): parity with torch.nn.MultiheadAttention, fast path vs explicit path, masks, cache."""

import pytest
import torch
from torch import nn

from aiayn.model.attention import (KVCache, MultiHeadAttention, attend, attend_to_source, causal_mask,
                                   padding_mask)

pytestmark = pytest.mark.usefixtures("both_paths")  # tests/conftest.py

D, H = 16, 4


def _pair(dtype=torch.float64, seed=0):
    """Our attention and PyTorch's, with the same random weights (biases included)."""
    torch.manual_seed(seed)
    ours = MultiHeadAttention(D, H).to(dtype).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0.0, 0.3)
    ref = nn.MultiheadAttention(D, H, batch_first=True, dtype=dtype).eval()
    with torch.no_grad():
        ref.in_proj_weight.copy_(ours.in_proj.weight)
        ref.in_proj_bias.copy_(ours.in_proj.bias)
        ref.out_proj.weight.copy_(ours.out_proj.weight)
        ref.out_proj.bias.copy_(ours.out_proj.bias)
    return ours, ref


def _tokens_with_padding(lengths, pad_id=0):
    """(B, max(lengths)) ids in 1..9 with right padding: a padding mask source."""
    tokens = torch.randint(1, 10, (len(lengths), max(lengths)))
    for i, n in enumerate(lengths):
        tokens[i, n:] = pad_id
    return tokens


# ------------------------------------------------------------------------------------ masks
def test_causal_mask_is_lower_triangular_with_offset():
    m = causal_mask(3)
    assert m.shape == (1, 1, 3, 3) and m.dtype == torch.bool
    assert torch.equal(m[0, 0], torch.tensor([[1, 0, 0], [1, 1, 0], [1, 1, 1]], dtype=torch.bool))
    # Two new queries at absolute positions 4 and 5 over 6 keys.
    m = causal_mask(2, offset=4)
    assert m.shape == (1, 1, 2, 6)
    assert torch.equal(m[0, 0], torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool))


def test_padding_mask_true_at_real_tokens():
    tokens = torch.tensor([[5, 6, 0], [7, 0, 0]])
    m = padding_mask(tokens, pad_id=0)
    assert m.shape == (2, 1, 1, 3)
    assert torch.equal(m[:, 0, 0], torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool))


# ---------------------------------------------------------------- parity with nn.MultiheadAttention
def test_self_attention_matches_torch():
    ours, ref = _pair()
    x = torch.randn(3, 5, D, dtype=torch.float64)
    out, w = ours(x, need_weights=True)
    ref_out, ref_w = ref(x, x, x, need_weights=True, average_attn_weights=False)
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(w, ref_w, rtol=1e-10, atol=1e-10)
    fast, none = ours(x)
    assert none is None
    torch.testing.assert_close(fast, ref_out, rtol=1e-10, atol=1e-10)


def test_self_attention_with_padding_mask_matches_torch():
    ours, ref = _pair(seed=1)
    tokens = _tokens_with_padding([5, 3, 1])
    x = torch.randn(3, 5, D, dtype=torch.float64)
    mask = padding_mask(tokens, 0)
    out, w = ours(x, mask, need_weights=True)
    ref_out, ref_w = ref(x, x, x, key_padding_mask=~mask[:, 0, 0], need_weights=True,
                         average_attn_weights=False)
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(w, ref_w, rtol=1e-10, atol=1e-10)
    assert torch.all(w[2, :, :, 1:] == 0)  # nothing attends to padding
    torch.testing.assert_close(ours(x, mask)[0], ref_out, rtol=1e-10, atol=1e-10)


def test_causal_self_attention_matches_torch():
    ours, ref = _pair(seed=2)
    x = torch.randn(2, 6, D, dtype=torch.float64)
    mask = causal_mask(6)
    out, w = ours(x, mask, need_weights=True)
    ref_out, ref_w = ref(x, x, x, attn_mask=~mask[0, 0], need_weights=True, average_attn_weights=False)
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(w, ref_w, rtol=1e-10, atol=1e-10)
    assert torch.all(w.triu(diagonal=1) == 0)
    torch.testing.assert_close(ours(x, mask)[0], ref_out, rtol=1e-10, atol=1e-10)


def test_cross_attention_with_padding_mask_matches_torch():
    ours, ref = _pair(seed=3)
    x = torch.randn(3, 4, D, dtype=torch.float64)          # queries: the decoder side
    memory = torch.randn(3, 7, D, dtype=torch.float64)     # keys and values: the encoder output
    mask = padding_mask(_tokens_with_padding([7, 2, 5]), 0)
    kv = ours.project_kv(memory)
    assert kv[0].shape == kv[1].shape == (3, H, 7, D // H)
    out, w = ours(x, mask, kv=kv, need_weights=True)
    ref_out, ref_w = ref(x, memory, memory, key_padding_mask=~mask[:, 0, 0], need_weights=True,
                         average_attn_weights=False)
    assert w.shape == (3, H, 4, 7)
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(w, ref_w, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ours(x, mask, kv=kv)[0], ref_out, rtol=1e-10, atol=1e-10)


# ------------------------------------------------------------------- fast path vs explicit path
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("masked", ["none", "causal", "padding"])
def test_fast_path_equals_explicit_path(dtype, tol, masked):
    torch.manual_seed(4)
    q, k, v = (torch.randn(2, H, 6, 8, dtype=dtype) for _ in range(3))
    mask = {"none": None, "causal": causal_mask(6),
            "padding": padding_mask(_tokens_with_padding([6, 3]), 0)}[masked]
    fast, no_weights = attend(q, k, v, mask)
    slow, weights = attend(q, k, v, mask, need_weights=True)
    assert no_weights is None and weights.shape == (2, H, 6, 6)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, H, 6, dtype=dtype), rtol=tol, atol=tol)
    torch.testing.assert_close(fast, slow, rtol=tol, atol=tol)


def test_bf16_takes_the_fused_kernel_from_long_keys_on_and_it_agrees():
    """bf16 on a CPU: the explicit path below FUSED_FROM_KEYS keys, PyTorch's fused kernel from there
    (told the mask is causal when it is the square causal mask); both match the float64 reference."""
    from aiayn.model import attention

    torch.manual_seed(3)
    for T in (8, attention.FUSED_FROM_KEYS):
        q, k, v = (torch.randn(2, H, T, 8, dtype=torch.float64) for _ in range(3))
        mask = causal_mask(T)
        assert mask is causal_mask(T)  # the square causal mask is one tensor, recognised by identity
        ref, _ = attend(q, k, v, mask, need_weights=True)
        out, weights = attend(*(t.bfloat16() for t in (q, k, v)), mask)
        assert (weights is None) == (T >= attention.FUSED_FROM_KEYS)  # the fused kernel returns no weights
        torch.testing.assert_close(out.double(), ref, rtol=0.05, atol=0.03)


def test_fast_path_equals_explicit_path_when_a_row_is_fully_masked():
    """A source that is all padding (an empty sentence in a batch): no key may be attended.

    The two paths must still agree, and neither may produce NaN, which would flow through that
    sentence's later layers. (PyTorch's fused kernel returns zeros for such a row.)
    """
    torch.manual_seed(7)
    q, k, v = (torch.randn(2, H, 3, 8, dtype=torch.float64) for _ in range(3))
    mask = padding_mask(torch.tensor([[4, 5, 0], [0, 0, 0]]), 0)  # second row: nothing to attend to
    fast, _ = attend(q, k, v, mask)
    slow, weights = attend(q, k, v, mask, need_weights=True)
    assert torch.isfinite(fast).all()
    assert torch.isfinite(slow).all() and torch.isfinite(weights).all()
    torch.testing.assert_close(fast, slow, rtol=1e-12, atol=1e-12)


def test_attention_weights_are_softmax_of_scaled_scores():
    """Eq. (1) written out by hand for one head: weights = softmax(q k^T / sqrt(d_k))."""
    torch.manual_seed(5)
    q, k, v = (torch.randn(1, 1, 3, 4, dtype=torch.float64) for _ in range(3))
    _, w = attend(q, k, v, need_weights=True)
    scores = (q[0, 0] @ k[0, 0].T) / 2.0  # sqrt(4)
    expected = scores.exp() / scores.exp().sum(-1, keepdim=True)
    torch.testing.assert_close(w[0, 0], expected, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------ cache
def test_cached_self_attention_equals_full_causal_attention():
    ours, _ = _pair(seed=6)
    x = torch.randn(2, 5, D, dtype=torch.float64)
    full, _ = ours(x, causal_mask(5))
    k_buf = torch.zeros(2, H, 8, D // H, dtype=torch.float64)
    v_buf = torch.zeros_like(k_buf)
    first, _ = ours(x[:, :2], causal_mask(2), cache=(k_buf, v_buf, 0))       # two at once
    steps = [ours(x[:, t:t + 1], None, cache=(k_buf, v_buf, t))[0] for t in range(2, 5)]  # one by one
    torch.testing.assert_close(torch.cat([first, *steps], dim=1), full, rtol=1e-12, atol=1e-12)
    assert torch.all(k_buf[:, :, 5:] == 0)  # nothing written past the filled length


def test_kv_cache_reorders_not_yet_applied_compose():
    B, L = 4, 5
    self_k = [torch.arange(B, dtype=torch.float64).view(B, 1, 1, 1).expand(B, 2, L, 2).clone()]
    cache = KVCache(self_k, [t.clone() for t in self_k], [], [], length=3)
    cache.reorder(torch.tensor([3, 1, 2, 0]))
    cache.reorder(torch.tensor([1, 1, 0]))  # before any layer has read its buffers
    k_buf, v_buf, length = cache.layer(0, new=2)
    assert cache.batch_size == 3 and length == 3 and k_buf.size(2) >= 5
    assert k_buf[:, 0, :3, 0].tolist() == [[1.0] * 3, [1.0] * 3, [3.0] * 3]
    assert cache.layer(0)[0] is k_buf  # applied once


def test_kv_cache_offers_a_reorder_to_apply_in_place_only_where_it_fits():
    """pending_order: the one order every layer waits for, where the buffers hold its rows and one
    more position (a caller that applies it says so: order_applied); else None and `layer` applies it."""
    B, L = 4, 5
    self_k = [torch.zeros(B, 2, L, 2) for _ in range(2)]
    cache = KVCache(self_k, [t.clone() for t in self_k], [], [], length=3)
    assert cache.pending_order() is None  # nothing pending
    order = torch.tensor([3, 1, 2, 0])
    cache.reorder(order)
    assert cache.pending_order() is order
    cache.order_applied()
    assert cache.pending_order() is None and cache.layer(0)[0] is self_k[0]  # nothing left to apply
    cache.reorder(torch.tensor([1, 0]))
    assert cache.pending_order() is None  # fewer rows than the buffers hold
    cache.layer(0)
    cache.reorder(torch.tensor([1, 0]))
    assert cache.pending_order() is None  # layers wait for different orders
    full = KVCache([torch.zeros(B, 2, 3, 2)], [torch.zeros(B, 2, 3, 2)], [], [], length=3)
    full.reorder(order)
    assert full.pending_order() is None  # no room for the next position


def test_kv_cache_reorder_permutes_and_shrinks():
    B, L = 3, 4
    self_k = [torch.arange(B, dtype=torch.float64).view(B, 1, 1, 1).expand(B, 2, L, 2).clone()]
    cross = [torch.arange(B, dtype=torch.float64).view(B, 1, 1, 1).expand(B, 2, 5, 2).clone()]
    cache = KVCache(self_k, [t.clone() for t in self_k], cross, [t.clone() for t in cross],
                    memory_mask=torch.tensor([[True], [False], [True]]).view(B, 1, 1, 1), length=2)
    cache.reorder(torch.tensor([2, 0, 1]))
    assert cache.batch_size == 3
    k_buf, v_buf, length = cache.layer(0)
    assert length == 2 and k_buf.size(2) >= 3  # room for the next position
    assert k_buf[:, 0, 0, 0].tolist() == [2.0, 0.0, 1.0]
    assert v_buf[:, 0, 1, 0].tolist() == [2.0, 0.0, 1.0]
    assert cache.cross_k[0][:, 0, 0, 0].tolist() == [2.0, 0.0, 1.0]
    assert cache.memory_mask.flatten().tolist() == [True, True, False]
    cache.reorder(torch.tensor([2, 2]))  # shrink, with a repeated row (two beams from one parent)
    assert cache.batch_size == 2 and cache.capacity == L
    assert cache.layer(0)[0][:, 0, 0, 0].tolist() == [1.0, 1.0]
    assert cache.cross_v[0][:, 0, 0, 0].tolist() == [1.0, 1.0]
    assert cache.memory_mask.flatten().tolist() == [False, False]


@pytest.mark.parametrize("need_weights", [False, True])
def test_attend_to_source_shared_by_groups_of_rows_equals_one_source_per_row(need_weights):
    torch.manual_seed(7)
    b, g, T, S, Dh = 3, 4, 2, 5, D // H
    q = torch.randn(b * g, H, T, Dh, dtype=torch.float64)
    k, v = torch.randn(b, H, S, Dh, dtype=torch.float64), torch.randn(b, H, S, Dh, dtype=torch.float64)
    mask = padding_mask(_tokens_with_padding([5, 2, 4]), 0)  # (b, 1, 1, S)
    rows = torch.arange(b).repeat_interleave(g)  # each source repeated for its g rows
    ours, w = attend_to_source(q, k, v, mask, need_weights=need_weights)
    ref, ref_w = attend(q, k[rows], v[rows], mask[rows], need_weights=need_weights)
    torch.testing.assert_close(ours, ref.transpose(1, 2).reshape(b * g, T, D), rtol=1e-12, atol=1e-12)
    if need_weights:
        torch.testing.assert_close(w, ref_w, rtol=1e-12, atol=1e-12)


def test_kv_cache_keeps_one_source_row_per_group_of_beams():
    B, L, g = 3, 4, 2
    rows = torch.arange(B, dtype=torch.float64).view(B, 1, 1, 1)
    self_k = [rows.expand(B, 2, L, 2).clone()]
    cross = [rows.expand(B, 2, 5, 2).clone()]
    cache = KVCache(self_k, [t.clone() for t in self_k], cross, [t.clone() for t in cross],
                    memory_mask=torch.tensor([True, False, True]).view(B, 1, 1, 1), length=2, rows_per_source=g)
    cache.reorder(torch.tensor([2, 2, 0, 0]))  # grow to g beams for sources 2 and 0
    assert cache.batch_size == 4 and cache.n_sources == 2
    assert cache.layer(0)[0][:, 0, 0, 0].tolist() == [2.0, 2.0, 0.0, 0.0]
    assert cache.cross_k[0][:, 0, 0, 0].tolist() == [2.0, 0.0]
    assert cache.memory_mask.flatten().tolist() == [True, True]
    kept = cache.cross_k[0]
    cache.reorder(torch.tensor([1, 0, 2, 2]))  # beams reordered within their sentences: no copy
    assert cache.cross_k[0] is kept
    cache.reorder(torch.tensor([3, 2]))  # the first sentence finished
    assert cache.n_sources == 1 and cache.cross_v[0][:, 0, 0, 0].tolist() == [0.0]
    cache.reorder(torch.tensor([1]))  # a single row left: one source per row again
    assert cache.batch_size == 1 and cache.n_sources == 1
