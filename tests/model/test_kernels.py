"""aiayn/kernels: the decoding-step attention kernel against PyTorch's attention in float64, and the
fallback to PyTorch when the kernel cannot be built."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st

from aiayn import capability, kernels
from aiayn.model.attention import attend


@pytest.fixture(scope="module")
def kernel():
    if not kernels.available():
        pytest.skip("the kernels are not built here (no C compiler?)")
    return kernels.decode_attention


def _reference(q, k, v, mask):
    """float64 SDPA with every group of rows given its source's keys, values and mask; rows that
    may attend to nothing get zeros."""
    group = q.size(0) // k.size(0)
    q, k, v = q.double(), k.double().repeat_interleave(group, 0), v.double().repeat_interleave(group, 0)
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v)
    mask = mask.repeat_interleave(group, 0)
    safe = mask | ~mask.any(-1, keepdim=True)  # SDPA's all-masked rows are NaN in some versions
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=safe)
    return out.masked_fill(~mask.any(-1, keepdim=True).transpose(-1, -2), 0.0)


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@settings(deadline=None, max_examples=150)
@given(sources=st.integers(1, 4), group=st.integers(1, 4), heads=st.integers(1, 4), queries=st.integers(1, 5),
       keys=st.integers(1, 40), room=st.integers(0, 5), head_dim=st.sampled_from([1, 3, 16, 64, 80]),
       masked=st.booleans(), dtype=st.sampled_from(sorted(DTYPES)), spread=st.sampled_from([0.1, 1.0, 30.0]),
       seed=st.integers(0, 2**16))
def test_kernel_matches_pytorch_attention(kernel, sources, group, heads, queries, keys, room, head_dim,
                                          masked, dtype, spread, seed):
    # spread: scores from nearly uniform weights to nearly one-hot ones (the kernel's own exp)
    g = torch.Generator().manual_seed(seed)
    qt = kt = DTYPES[dtype]
    B = sources * group
    q = (spread * torch.randn(B, queries, heads, head_dim, generator=g)).to(qt).transpose(1, 2)  # heads split from (B, T, D)
    # keys and values: the first `keys` positions of a longer cache buffer, as in decoding
    k = torch.randn(sources, heads, keys + room, head_dim, generator=g).to(kt)[:, :, :keys]
    v = torch.randn(sources, heads, keys + room, head_dim, generator=g).to(kt)[:, :, :keys]
    mask = None
    if masked:
        mask = torch.rand(sources, 1, 1, keys, generator=g) < 0.7
        mask[0] = False  # a source of nothing but padding: zeros
    assert kernels.supports(q, k, v, mask)
    out = kernel(q, k, v, mask)
    assert out.shape == (B, heads, queries, head_dim) and out.dtype == qt
    tol = 1e-5 if qt == torch.float32 else 3e-2
    torch.testing.assert_close(out.double(), _reference(q, k, v, mask), rtol=tol, atol=tol)


@settings(deadline=None, max_examples=60)
@given(rows=st.integers(1, 6), heads=st.sampled_from([1, 2, 4]), head_dim=st.sampled_from([3, 16, 64]),
       start=st.integers(0, 9), dtype=st.sampled_from(sorted(DTYPES)), seed=st.integers(0, 2**16))
def test_self_attention_step_writes_the_cache_and_attends(kernel, rows, heads, head_dim, start, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    dt = DTYPES[dtype]
    D, L = heads * head_dim, 10
    qkv = torch.randn(rows, 1, 3 * D, generator=g).to(dt)
    k_buf, v_buf = (torch.randn(rows, heads, L, head_dim, generator=g).to(dt) for _ in range(2))
    k_ref, v_ref = k_buf.clone(), v_buf.clone()
    out = kernels.self_attention_step(qkv, k_buf, v_buf, start, heads)
    # PyTorch's way, as MultiHeadAttention does it without the kernel
    q, k, v = (t.view(rows, 1, heads, head_dim).transpose(1, 2) for t in qkv.chunk(3, dim=-1))
    k_ref[:, :, start:start + 1], v_ref[:, :, start:start + 1] = k, v
    assert torch.equal(k_buf, k_ref) and torch.equal(v_buf, v_ref)  # the new position, nothing else
    ref = _reference(q, k_ref[:, :, :start + 1], v_ref[:, :, :start + 1], None)
    tol = 1e-5 if dt == torch.float32 else 3e-2
    torch.testing.assert_close(out.double(), ref.transpose(1, 2).reshape(rows, 1, D), rtol=tol, atol=tol)


@settings(deadline=None, max_examples=60)
@given(sources=st.integers(1, 4), group=st.integers(1, 4), queries=st.integers(1, 3), keys=st.integers(1, 25),
       masked=st.booleans(), seed=st.integers(0, 2**16))
def test_cross_attention_step_matches_attend_to_source(kernel, sources, group, queries, keys, masked, seed):
    from aiayn.model.attention import attend_to_source

    g = torch.Generator().manual_seed(seed)
    H, Dh = 4, 16
    q = torch.randn(sources * group, queries, H * Dh, generator=g)
    k, v = (torch.randn(sources, H, keys, Dh, generator=g) for _ in range(2))
    mask = (torch.rand(sources, 1, 1, keys, generator=g) < 0.7) | (torch.arange(keys) == 0) if masked else None
    out = kernels.cross_attention_step(q, k, v, mask)
    heads = q.double().view(sources * group, queries, H, Dh).transpose(1, 2)
    ref, _ = attend_to_source(heads, k.double(), v.double(), mask)  # float64: PyTorch's kernel
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


def test_steps_decline_what_they_do_not_take(kernel):
    qkv, buf = torch.randn(2, 1, 24), torch.randn(2, 2, 5, 4)
    assert kernels.self_attention_step(qkv, buf, buf.clone(), 5, 2) is None          # the cache is full
    assert kernels.self_attention_step(qkv.double(), buf.double(), buf.double(), 0, 2) is None  # float64
    assert kernels.self_attention_step(torch.randn(2, 2, 24), buf, buf.clone(), 0, 2) is None  # two new tokens
    q = torch.randn(2, 1, 8, requires_grad=True)
    assert kernels.cross_attention_step(q, buf, buf.clone(), None) is None           # a gradient is wanted
    with torch.no_grad():
        assert kernels.cross_attention_step(q, buf, buf.clone(), None) is not None
        assert kernels.cross_attention_step(torch.randn(2, 9, 8), buf, buf.clone(), None) is None  # 9 queries


def test_merging_heads_after_the_kernel_is_a_view(kernel):
    q, k, v = torch.randn(3, 2, 1, 8), torch.randn(3, 2, 5, 8), torch.randn(3, 2, 5, 8)
    out = kernel(q, k, v)
    merged = out.transpose(1, 2).reshape(3, 1, 16)
    assert merged.data_ptr() == out.data_ptr()


def test_fast_attention_takes_the_kernel_only_for_decoding_steps(kernel, monkeypatch):
    from aiayn.fast import accelerate
    from aiayn.model.attention import MultiHeadAttention

    calls = []
    monkeypatch.setattr(kernels, "decode_attention", lambda *a: calls.append(1) or kernel(*a))
    mha = accelerate(MultiHeadAttention(16, 2)).eval()
    q, k, v = torch.randn(2, 2, 1, 8), torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 8)
    with torch.no_grad():
        out, _ = mha.attend(q, k, v, None, False)
        assert len(calls) == 1
        torch.testing.assert_close(out, attend(q, k, v)[0])  # the reference's result
        mha.attend(q, k, v, None, True)                         # the weights: explicit path
        mha.attend(torch.randn(2, 2, 9, 8), k, v, None, False)  # a whole sequence of queries: PyTorch's kernel
        mha.attend(q.double(), k.double(), v.double(), None, False)  # float64: PyTorch
        mha.attend(q, k, v, torch.ones(1, 1, 1, 6, dtype=torch.bool), False)  # a mask shape it does not take
    q.requires_grad_(True)
    out, _ = mha.attend(q, k, v, None, False)                  # training: PyTorch, with a gradient
    out.sum().backward()
    assert len(calls) == 1 and q.grad is not None
    with torch.no_grad():
        attend(q, k, v)                                         # the reference never takes it
    assert len(calls) == 1


def test_kernel_and_pytorch_decode_the_same_tokens(monkeypatch):
    from aiayn.config import ModelConfig
    from aiayn.decode import beam_search, greedy
    from aiayn.model import build_model

    if not kernels.available():
        pytest.skip("the kernels are not built here")
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=50, d_model=32, n_heads=4, d_ff=64, n_encoder_layers=2, n_decoder_layers=2,
                      dropout=0.0, max_len=64)
    model = build_model(cfg).eval()
    src = torch.randint(4, 50, (5, 9))
    src[1, 6:] = cfg.pad_id
    results = {}
    for setting in ("all", "0"):
        monkeypatch.setenv("AIAYN_KERNELS", setting)
        with torch.no_grad():
            results[setting] = (greedy(model, src, 1, 2, max_extra=8),
                                beam_search(model, src, 1, 2, beam_size=3, max_extra=8))
    (greedy_k, beams_k), (greedy_t, beams_t) = results["all"], results["0"]
    assert greedy_k == greedy_t
    for ours, theirs in zip(beams_k, beams_t):
        assert [tokens for tokens, _ in ours] == [tokens for tokens, _ in theirs]
        assert [score for _, score in ours] == pytest.approx([score for _, score in theirs], rel=1e-5)


def test_without_a_compiler_attention_falls_back_to_pytorch(monkeypatch, tmp_path):
    monkeypatch.setenv("AIAYN_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "a-compiler-that-is-not-there")
    monkeypatch.setattr(kernels, "_compiler", lambda: None)
    kernels._library.cache_clear()
    try:
        assert not kernels.available()
        q, k, v = torch.randn(2, 2, 1, 8), torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 8)
        with torch.no_grad():
            out, _ = attend(q, k, v)
        torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v))
    finally:
        kernels._library.cache_clear()


def test_a_compiler_that_fails_leaves_pytorch_in_charge(monkeypatch, tmp_path):
    monkeypatch.setenv("AIAYN_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "false")  # exists, and fails every build
    kernels._library.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="did not build"):  # said once, as the user sees it
            assert not kernels.available()
        assert not list(tmp_path.rglob("*.so"))
    finally:
        kernels._library.cache_clear()


def test_aiayn_kernels_0_turns_the_kernel_off(monkeypatch):
    monkeypatch.setenv("AIAYN_KERNELS", "0")
    assert not kernels.available()
    q = torch.randn(2, 1, 8)
    with torch.no_grad():
        assert kernels.cross_attention_step(q, torch.randn(2, 2, 3, 4), torch.randn(2, 2, 3, 4), None) is None


def test_kernel_scale_is_one_over_sqrt_head_dim(kernel):
    # two keys, one query: the weight of the first is sigmoid((s0 - s1) / sqrt(Dh))
    Dh = 16
    q = torch.zeros(1, 1, 1, Dh)
    q[..., 0] = 1.0
    k = torch.zeros(1, 1, 2, Dh)
    k[0, 0, 0, 0] = 4.0
    v = torch.tensor([1.0, 0.0]).view(1, 1, 2, 1).expand(1, 1, 2, Dh).contiguous()
    out = kernel(q, k, v)
    assert out[0, 0, 0, 0].item() == pytest.approx(1 / (1 + math.exp(-4.0 / math.sqrt(Dh))), rel=1e-6)


@settings(deadline=None, max_examples=60)
@given(rows=st.integers(1, 70), width=st.sampled_from([1, 7, 16, 256, 300]), dtype=st.sampled_from(sorted(DTYPES)),
       seed=st.integers(0, 2**16))
def test_add_layer_norm_matches_pytorch(kernel, rows, width, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    dt = DTYPES[dtype]
    norm = torch.nn.LayerNorm(width).to(dt)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.5, generator=g)
        norm.bias.normal_(0.0, 0.5, generator=g)
        x, y = (3 * torch.randn(rows, 1, width, generator=g) + 2).to(dt), torch.randn(rows, 1, width, generator=g).to(dt)
        out = kernels.add_layer_norm(x, y, norm)
    ref = F.layer_norm(x.double() + y.double(), (width,), norm.weight.double(), norm.bias.double(), norm.eps)
    tol = 1e-5 if dt == torch.float32 else 3e-2
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)
    with torch.no_grad():
        assert kernels.add_layer_norm(x, y, norm, out=y) is y  # in place, as TransformerLayer does
    assert torch.equal(y, out)


def test_add_layer_norm_declines_training_and_odd_layouts(kernel):
    norm = torch.nn.LayerNorm(8)
    x, y = torch.randn(4, 8), torch.randn(4, 8)
    assert kernels.add_layer_norm(x, y, norm) is None                 # grad enabled: its weight wants one
    with torch.no_grad():
        assert kernels.add_layer_norm(x, y, norm) is not None
        assert kernels.add_layer_norm(x, y.t().contiguous().t(), norm) is None  # not contiguous
        assert kernels.add_layer_norm(x, y, torch.nn.LayerNorm(8, bias=False)) is None


def _next_tokens(x, banned):
    """greedy_step's tokens for logits x (N, V), recording nothing that matters."""
    n = x.size(0)
    tokens, record = torch.empty(n, 1, dtype=torch.long), torch.zeros(n, 1, dtype=torch.long)
    done = kernels.greedy_step(x[:, None], banned, tokens, record, torch.arange(n), 0, -1, torch.full((n,), 9))
    assert done == 0 and torch.equal(record, tokens)
    return tokens[:, 0]


@settings(deadline=None, max_examples=60)
@given(rows=st.integers(1, 9), vocab=st.integers(1, 1100), n_banned=st.integers(0, 3), ties=st.booleans(),
       dtype=st.sampled_from(sorted(DTYPES)), seed=st.integers(0, 2**16))
def test_greedy_step_takes_pytorchs_argmax(kernel, rows, vocab, n_banned, ties, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, vocab, generator=g)
    if ties:  # few distinct values: the first index of the maximum must win
        x = x.round()
    x = x.to(DTYPES[dtype])
    banned = torch.randint(0, vocab, (n_banned,), generator=g)
    if n_banned >= vocab:
        banned = banned[:vocab - 1]
    ref = x.float().index_fill(-1, banned, float("-inf")).argmax(-1)
    assert torch.equal(_next_tokens(x, banned), ref)


def test_greedy_step_with_everything_but_one_id_at_minus_infinity(kernel):
    x = torch.full((2, 600), float("-inf"))
    x[0, 599] = 0.0
    assert _next_tokens(x, torch.tensor([0, 1])).tolist() == [599, 2]  # an all -inf row: the first allowed id


def test_greedy_step_records_outputs_and_counts_rows_done(kernel):
    x = torch.zeros(3, 1, 5)
    x[0, 0, 4], x[1, 0, 2], x[2, 0, 3] = 1.0, 1.0, 1.0  # tokens 4, 2 (EOS), 3
    tokens, out = torch.empty(3, 1, dtype=torch.long), torch.full((6, 4), -1)
    rows_of = torch.tensor([5, 0, 2])  # the sentences of the three rows
    limits = torch.tensor([9, 9, 3])  # the third row's sentence ends at 3 tokens: this step's
    assert kernels.greedy_step(x, torch.tensor([0]), tokens, out, rows_of, 2, 2, limits) == 2
    assert tokens[:, 0].tolist() == [4, 2, 3]
    assert out[5, 2] == 4 and out[0, 2] == 2 and out[2, 2] == 3 and (out == -1).sum() == 21


@pytest.mark.parametrize("dtype", sorted(DTYPES))
def test_embed_matches_the_embedding_layer(kernel, dtype):
    from aiayn.config import ModelConfig
    from aiayn.fast import accelerate
    from aiayn.model.layers import Embedding

    torch.manual_seed(0)
    emb = Embedding(50, ModelConfig(vocab_size=50, d_model=32, n_heads=4, d_ff=64, max_len=40)).to(DTYPES[dtype]).eval()
    accelerate(emb)
    tokens = torch.randint(0, 50, (3, 5))
    with torch.no_grad():
        out = kernels.embed(tokens, emb.tokens.weight, emb.scale, emb.positions(7, 5))
        ref = emb.tokens(tokens).double() * emb.scale + emb.positions(7, 5).double()
        torch.testing.assert_close(out.double(), ref, rtol=1e-2 if dtype == "bf16" else 1e-6, atol=1e-2 if dtype == "bf16" else 1e-6)
        assert torch.equal(emb(tokens, start=7), out)  # the layer takes the kernel in eval mode
        assert kernels.embed(torch.tensor([[3, 50]]), emb.tokens.weight, emb.scale, emb.positions(0, 2)) is None
        with pytest.raises(IndexError):  # and an unknown id still gets PyTorch's error
            emb(torch.tensor([[3, 50]]))


@settings(deadline=None, max_examples=80)
@given(sentences=st.integers(1, 4), r=st.sampled_from([1, 2, 4]), k=st.sampled_from([1, 2, 4]),
       vocab=st.sampled_from([3, 7, 64, 200, 1000]), eos_banned=st.booleans(), limits=st.booleans(),
       dead=st.booleans(), dtype=st.sampled_from(sorted(DTYPES)), seed=st.integers(0, 2**16))
def test_beam_candidates_match_beam_step(kernel, sentences, r, k, vocab, eos_banned, limits, dead, dtype, seed):
    from aiayn.decode import beam_step

    g = torch.Generator().manual_seed(seed)
    eos, forbid = 2, torch.tensor([0])
    logits = (3 * torch.randn(sentences * r, 1, vocab, generator=g)).to(DTYPES[dtype])
    scores = -torch.rand(sentences, r, generator=g) * 5
    if dead:
        scores[0, -1] = float("-inf")  # a beam that never lived
    at_limit = (torch.rand(sentences, generator=g) < 0.5) if limits else torch.zeros(sentences, dtype=torch.bool)
    got = kernels.beam_candidates(logits, scores, 2 * k, forbid, eos, eos_banned, at_limit, keep=k)
    # the reference: what search() does without the kernel
    lp = torch.log_softmax(logits[:, -1].double(), -1)
    lp[:, forbid] = float("-inf")
    rows_at_limit = at_limit.repeat_interleave(r)
    eos_lp = lp[:, eos].clone()
    lp[rows_at_limit] = float("-inf")
    lp[:, eos] = eos_lp
    if eos_banned:
        lp[~rows_at_limit, eos] = float("-inf")
    ref = beam_step(lp.view(sentences, r, vocab), scores.double(), k)
    torch.testing.assert_close(got[0].double(), ref[0], rtol=1e-5, atol=1e-5)  # the n best scores
    # each live candidate is a real, allowed extension with that score, and none twice (where scores
    # tie, as bf16 logits often do, either may be taken)
    every = scores.double()[:, :, None] + lp.view(sentences, r, vocab)
    live = got[0].isfinite()
    rows = torch.arange(sentences)[:, None].expand_as(live)[live]
    torch.testing.assert_close(every[rows, got[2][live], got[1][live]], got[0][live].double(), rtol=1e-5, atol=1e-5)
    pairs = (rows * r + got[2][live]) * vocab + got[1][live]
    assert pairs.unique().numel() == pairs.numel()
    # the sentences whose k best do not simply go on: an EOS among them, or no live candidate
    unsettled = ((got[1][:, :k] == eos) & live[:, :k]).any(1) | ~live[:, 0]
    assert got[3] == int(unsettled.sum())


@settings(deadline=None, max_examples=80)
@given(rows=st.integers(1, kernels.MAX_LINEAR_ROWS), k=st.sampled_from([1, 7, 16, 256, 1024]),
       n=st.sampled_from([1, 15, 16, 17, 40, 256, 1000]), bias=st.booleans(), relu=st.booleans(),
       dtype=st.sampled_from(sorted(DTYPES)), seed=st.integers(0, 2**16))
@example(rows=37, k=1024, n=1000, bias=True, relu=False, dtype="fp32", seed=0)  # the weight in several chunks
def test_linear_matches_float64(kernel, rows, k, n, bias, relu, dtype, seed):
    """Any row count (tiles of 8, 4, 2, 1 rows), outputs not a multiple of 16 (a zero-padded last tile,
    an odd number of tiles), with and without bias and ReLU: x W^T + b to fp32 rounding; in bf16,
    the float64 result rounded to bf16, within one bf16 step."""
    g = torch.Generator().manual_seed(seed)
    dt = DTYPES[dtype]
    x, w = torch.randn(rows, 1, k, generator=g).to(dt), torch.randn(n, k, generator=g).to(dt)
    b = torch.randn(n, generator=g).to(dt) if bias else None
    out = kernels.linear(x, kernels.linear_tiles(w), b, n, relu)
    ref = F.linear(x.double(), w.double(), None if b is None else b.double())
    ref = ref.relu() if relu else ref
    assert out.shape == (rows, 1, n) and out.dtype == dt
    tol = 2e-6 * math.sqrt(k) * max(1.0, ref.abs().max().item()) if dt == torch.float32 else 1e-2
    torch.testing.assert_close(out.double(), ref.to(dt).double() if dt != torch.float32 else ref, rtol=tol, atol=tol)


def _int8_reference(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor, bias) -> torch.Tensor:
    """What linear_f32_i8 computes, in float64: where the kernel multiplies bytes each row of x rounded
    to L levels a sign (q = round(x * (L / max|x|)) in fp32, as the kernel rounds), else x as it is."""
    levels = kernels._LIMITS["INT8_LEVELS"]
    if levels:
        amax = x.abs().amax(-1, keepdim=True)
        x = torch.round(x * (torch.tensor(float(levels)) / amax)).double() * (amax / levels).double()
    out = x.double() @ (w.double() * scales.double()[:, None]).t()
    return out if bias is None else out + bias.double()


@settings(deadline=None, max_examples=60)
@given(rows=st.integers(1, kernels.MAX_LINEAR_ROWS), k=st.sampled_from([1, 3, 7, 16, 257, 1024]),
       n=st.sampled_from([1, 15, 16, 17, 40, 1000]), bias=st.booleans(), relu=st.booleans(), seed=st.integers(0, 2**16))
@example(rows=37, k=1024, n=1000, bias=True, relu=False, seed=0)  # the weight in several chunks
def test_linear_int8_matches_its_float64_reference(kernel, rows, k, n, bias, relu, seed):
    """int8 weights with per-output scales, fp32 inputs (k not a multiple of 4: the last group padded),
    against the same arithmetic in float64."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, 1, k, generator=g)
    w = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    scales, b = torch.rand(n, generator=g) / 64, torch.randn(n, generator=g) if bias else None
    out = kernels.linear(x, kernels.linear_tiles(w, scales), b, n, relu)
    ref = _int8_reference(x, w, scales, b)
    ref = ref.relu() if relu else ref
    assert out.shape == (rows, 1, n) and out.dtype == torch.float32
    tol = 1e-5 * max(1.0, ref.abs().max().item())
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("rows, k, n", [(16, 256, 768), (64, 1024, 256), (37, 64, 17), (48, 257, 40), (80, 1024, 1000)])
def test_linear_int8_gives_each_row_the_same_bits_in_any_company(kernel, monkeypatch, rows, k, n):
    """Rows computed 16 at a time (on AMX's tiles where the CPU has them) and 8, 4, 2 or 1 at a time
    (vpdpbusd, or the fp32 widening): the same integer sums and output stage, the same bits."""
    monkeypatch.setenv("AIAYN_KERNELS", "all")  # (every row count, up to MAX_LINEAR_ROWS)
    g = torch.Generator().manual_seed(rows + k)
    w = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    tiles, bias = kernels.linear_tiles(w, torch.rand(n, generator=g) / 64), torch.randn(n, generator=g)
    x = torch.randn(rows, k, generator=g)
    for relu in (False, True):
        together = kernels.linear(x, tiles, bias, n, relu)
        apart = torch.cat([kernels.linear(x[i:i + 7], tiles, bias, n, relu) for i in range(0, rows, 7)])
        assert torch.equal(together, apart)


def test_linear_int8_rows_of_zeros_nan_and_infinity(kernel):
    w, scales = torch.randint(-127, 128, (20, 8), dtype=torch.int8), torch.rand(20)
    bias = torch.randn(20)
    x = torch.stack([torch.zeros(8), torch.full((8,), 1.0), torch.full((8,), 1.0), torch.ones(8)])
    x[1, 3], x[2, 5] = float("nan"), float("inf")
    out = kernels.linear(x, kernels.linear_tiles(w, scales), bias, 20)
    assert torch.equal(out[0], bias) and out[1].isnan().all()
    assert not out[2].isfinite().any()  # NaN (VNNI: the row's scale) or +-inf / NaN (fp32 products)
    torch.testing.assert_close(out[3].double(), _int8_reference(x[3:], w, scales, bias)[0])


@settings(deadline=None, max_examples=60)
@given(rows=st.integers(1, 40), k=st.sampled_from([1, 5, 16, 17, 256, 300]), pad=st.sampled_from([0, 3]),
       dtype=st.sampled_from(sorted(DTYPES)), shift=st.sampled_from([-2.0, 0.0, 3.0]), seed=st.integers(0, 2**16))
def test_quantize_rounds_to_the_nearest_of_256_levels_over_the_range_and_zero(kernel, rows, k, pad, dtype, shift,
                                                                              seed):
    """The inputs of oneDNN's int8 linear: rows at a stride (pad), all negative, around zero or all positive
    (shift): bytes q with x = (q - zero) * scale to half a level, zero exactly representable, the levels
    spanning min(x, 0) .. max(x, 0); q is round(x * 255 / range) + zero (to one level: the kernel may round
    the product in an FMA)."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, k + pad, generator=g) + shift).to(DTYPES[dtype])[:, :k]
    q, scale, zero = kernels.quantize(x)
    xf = x.float()
    lo, hi = min(xf.min().item(), 0.0), max(xf.max().item(), 0.0)
    assert q.shape == (rows, k) and q.dtype == torch.uint8 and 0 <= zero <= 255
    assert scale == pytest.approx((hi - lo) / 255, rel=1e-6)
    torch.testing.assert_close((q.double() - zero) * scale, xf.double(), rtol=0, atol=scale * 0.5001)
    inv = torch.tensor(255.0) / torch.tensor(hi - lo)
    ref = (torch.round(xf * inv) + zero).clamp(0, 255)
    assert (q.float() - ref).abs().max() <= 1


def test_quantize_zeros_and_values_that_are_not_finite(kernel):
    q, scale, zero = kernels.quantize(torch.zeros(3, 5))
    assert not q.any() and (scale, zero) == (1.0, 0)
    assert kernels.quantize(torch.tensor([[1.0, float("nan")]])) is None  # (the caller takes fbgemm's linear)
    assert kernels.quantize(torch.tensor([[float("-inf"), 1.0]])) is None
    assert kernels.quantize(torch.tensor([[3e38, -3e38]])) is None  # a range past fp32's
    assert kernels.quantize(torch.randn(4, 6)[:, ::2]) is None  # not contiguous in a row


def test_linear_relu_keeps_nan_and_declines_what_it_does_not_take(kernel):
    w = torch.eye(16)
    tiles = kernels.linear_tiles(w)
    x = torch.tensor([[float("nan")] + [1.0] * 15, [-1.0] + [2.0] * 15])
    out = kernels.linear(x, tiles, None, 16, relu=True)
    assert out[0].isnan().all()  # NaN * 0 is NaN: the whole row, as in the arithmetic (and torch.relu keeps it)
    assert out[1, 0] == 0 and torch.equal(out[1, 1:], torch.full((15,), 2.0))
    assert kernels.linear(torch.randn(kernels.MAX_LINEAR_ROWS + 1, 16), tiles, None, 16) is None  # oneDNN's
    assert kernels.linear(torch.randn(16, 2).t(), tiles, None, 16) is None  # not contiguous
    assert kernels.linear(torch.randn(2, 16, dtype=torch.bfloat16), tiles, None, 16) is None  # dtypes differ
    assert kernels.linear(torch.randn(2, 16, requires_grad=True), tiles, None, 16) is None  # it has no backward
    assert kernels.linear(torch.randn(2, 8), tiles, None, 16) is None  # k differs


def test_the_inference_copy_uses_the_linear_kernel_for_a_few_rows_only(kernel, monkeypatch):
    from aiayn.config import ModelConfig
    from aiayn.fast.inference import OneDNNLinear, inference_model, onednn_available
    from aiayn.model import build_model

    if not onednn_available():
        pytest.skip("no oneDNN here: the inference copy keeps PyTorch's linear layers")
    model = build_model(ModelConfig(vocab_size=50, d_model=32, n_heads=2, d_ff=64, n_encoder_layers=1,
                                    n_decoder_layers=1, max_len=32, dropout=0.0))
    monkeypatch.setenv("AIAYN_KERNELS", "all")  # (the decision itself: tests/model/test_tuning.py)
    copy = inference_model(model, "fp32")
    tiled = {name for name, m in copy.named_modules() if isinstance(m, OneDNNLinear) and m.tiles is not None}
    assert tiled and not any(name.startswith("encoder.") or name.endswith("kv_proj") for name in tiled)
    layer = copy.decoder.layers[0].ff.w1
    calls = []
    real = kernels.linear
    monkeypatch.setattr(kernels, "linear", lambda *a, **kw: calls.append(a[0].numel() // a[0].size(-1)) or real(*a, **kw))
    with torch.no_grad():
        few, many = torch.randn(3, 1, 32), torch.randn(kernels.MAX_LINEAR_ROWS + 1, 32)
        torch.testing.assert_close(layer(few), F.relu(F.linear(few, layer.weight, layer.bias)))
        torch.testing.assert_close(layer(many), F.relu(F.linear(many, layer.weight, layer.bias)))
    assert calls == [3, kernels.MAX_LINEAR_ROWS + 1]  # asked both times; the second declined (oneDNN's GEMM)


def _tiled_copy(monkeypatch, precision: str, d_model: int = 32, heads: int = 4):
    """A small 1+2-layer encoder-decoder's inference copy of `precision` with the kernels' tiles (every
    kernel on), and a batch of 3 sources, one padded (the one-call steps' tests); skips where there
    are no tiles to be had."""
    from aiayn.config import ModelConfig
    from aiayn.fast.inference import inference_model, onednn_available
    from aiayn.model import build_model

    if not onednn_available() and precision != "int8":
        pytest.skip("no oneDNN here: the inference copy has no kernel tiles")
    if precision == "int8" and not capability.probe("cpu").int8:
        pytest.skip("no int8 engine here")
    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=60, d_model=d_model, n_heads=heads, d_ff=96, n_encoder_layers=1,
                                    n_decoder_layers=2, max_len=64, dropout=0.0)).eval()
    monkeypatch.setenv("AIAYN_KERNELS", "all")  # (whether it wins here: the linear family's tuning)
    src = torch.randint(4, 60, (3, 9))
    src[1, 5:] = 0
    return inference_model(model, precision), src


def _decodes(copy, src: torch.Tensor) -> tuple:
    """What the one-call steps' tests compare between paths: six steps from BOS (each step's argmax
    fed back: logits), greedy decoding and beam search (3 beams) of src."""
    from aiayn.decode import beam_search, greedy

    with torch.inference_mode():
        memory, mask = copy.encode(src)
        cache = copy.init_cache(memory, mask, 12)
        tokens, out = torch.full((src.size(0), 1), 1), []
        for _ in range(6):
            out.append(copy.decode_step(tokens, cache))
            tokens = out[-1].argmax(-1)
        return torch.cat(out, 1), greedy(copy, src, 1, 2, max_extra=8), beam_search(copy, src, 1, 2, beam_size=3,
                                                                                      max_extra=8)


@pytest.mark.parametrize("precision", ["fp32", pytest.param("bf16", marks=pytest.mark.bf16), "int8"])
@pytest.mark.parametrize("d_model, heads", [(32, 4), (64, 2)])  # heads of 8 (the scalar path) and 32
def test_one_call_steps_are_the_kernels_called_one_by_one(kernel, monkeypatch, precision, d_model, heads):
    """A decoding step in one call (embedding, every decoder layer and the generator: decoder_step)
    and through the one-call decoder layer give the same logits, bit for bit, as the same kernels
    called module by module (embed, linear, attention steps, add_layer_norm): greedy and beam search
    (rows reordered and dropped), a padded source, a source shared by beams (group > 1); int8: int8
    weights, fp32 inputs."""
    from aiayn.fast.modules import FastTransformer, FastTransformerLayer

    copy, src = _tiled_copy(monkeypatch, precision, d_model, heads)
    whole, layer, calls, results = FastTransformer._whole_step, FastTransformerLayer._decoder_step, [], {}
    recache, one_step = kernels.decoder_step_recache, kernels.decoder_step  # (beam search's reorders: a new
    monkeypatch.setattr(kernels, "decoder_step_recache",  # sentence's rows, or the rows' order, in the call)
                        lambda *a: calls.append("recache") or recache(*a))
    monkeypatch.setattr(kernels, "decoder_step",
                        lambda *a: (calls.append("in place") if a[-1] is not None else None) or one_step(*a))
    for path in ("step", "layer", "modules"):
        monkeypatch.setattr(FastTransformer, "_whole_step",
                            (lambda self, *a: calls.append(path) or whole(self, *a)) if path == "step" else (lambda self, *a: None))
        monkeypatch.setattr(FastTransformerLayer, "_decoder_step",
                            (lambda self, *a: calls.append(path) or layer(self, *a)) if path == "layer" else (lambda self, *a: None))
        results[path] = _decodes(copy, src)
    assert {"step", "layer", "recache", "in place"} <= set(calls)  # each ran
    for path in ("step", "layer"):
        assert torch.equal(results[path][0], results["modules"][0]), path
        assert results[path][1:] == results["modules"][1:], path


@pytest.mark.parametrize("precision", ["fp32", pytest.param("bf16", marks=pytest.mark.bf16), "int8"])
def test_one_call_step_without_the_generator(kernel, monkeypatch, precision):
    """Where the few-rows kernel does not take the generator's rows (the linear family lost there),
    the one-call step runs the embedding and the decoder layers (beam search's reorders in place)
    and the generator's own module finishes it: the same logits and searches, bit for bit, as the
    one-call decoder layers called one by one with the same generator."""
    from aiayn.fast.modules import FastTransformer

    copy, src = _tiled_copy(monkeypatch, precision)
    wins = kernels._wins
    monkeypatch.setattr(kernels, "_wins", lambda family, *a: 0 if family == "linear" else wins(family, *a))
    whole, one_step, results, kinds = FastTransformer._whole_step, kernels.decoder_step, {}, []
    monkeypatch.setattr(kernels, "decoder_step", lambda *a: kinds.append(kernels.step_makes_logits(a[3])) or one_step(*a))
    for path in ("step", "layer"):
        monkeypatch.setattr(FastTransformer, "_whole_step", whole if path == "step" else (lambda self, *a: None))
        results[path] = _decodes(copy, src)
    assert kinds and set(kinds) == {False}  # the one-call step ran, without the generator
    assert torch.equal(results["step"][0], results["layer"][0])
    assert results["step"][1:] == results["layer"][1:]


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_the_one_call_step_takes_the_generator_up_to_generator_rows(kernel, monkeypatch, precision):
    """Past the linear kernel's own rows (linear_rows: won by 10%) the whole step still takes the
    generator, up to generator_rows; one sentence's beam search (4 rows) then runs in one call
    (kernels.search), and past them through the reference loop."""
    from aiayn.decode import beam_search

    copy, src = _tiled_copy(monkeypatch, precision)
    wins, search, found = kernels._wins, kernels.search, []
    monkeypatch.setattr(kernels, "_wins", lambda family, *a: 2 if family == "linear" else wins(family, *a))
    monkeypatch.setattr(kernels, "search", lambda *a: found.append(search(*a)) or found[-1])
    for generator_rows, in_one_call in ((2, False), (4, True)):
        monkeypatch.setattr(kernels, "generator_rows", lambda dtype, rows=generator_rows: rows)
        found.clear()
        with torch.inference_mode():
            hypotheses = beam_search(copy, src[:1], 1, 2, beam_size=4, max_extra=8)
        assert hypotheses and found and (found[-1] is not None) == in_one_call, generator_rows


def _small_copy(monkeypatch):
    """A small encoder-decoder's fp32 inference copy, every kernel on (the one-call step's tests)."""
    from aiayn.config import ModelConfig
    from aiayn.fast.inference import inference_model
    from aiayn.model import build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=40, d_model=32, n_heads=4, d_ff=64, n_encoder_layers=1,
                                    n_decoder_layers=2, max_len=32, dropout=0.0)).eval()
    monkeypatch.setenv("AIAYN_KERNELS", "all")
    return inference_model(model, "fp32")


def test_decoder_step_declines_what_it_does_not_take(kernel, monkeypatch):
    """The one-call step declines, having written nothing, where one of its kernels would: a token
    out of the table's range, a position past the cache's room, two new tokens a row, a gradient."""
    from aiayn.fast.modules import _STEPS

    copy = _small_copy(monkeypatch)
    with torch.inference_mode():
        memory, mask = copy.encode(torch.randint(4, 40, (2, 5)))
        cache = copy.init_cache(memory, mask, 4)
        copy.decode_step(torch.full((2, 1), 1), cache)
        plan = _STEPS[cache][1]
        assert plan is not None and cache.length == 1  # the first step ran in one call
        tokens, positions = torch.full((2, 1), 3), copy.tgt_embed.positions(1, 1)
        before = [t.clone() for t in cache.self_k]
        assert kernels.decoder_step(torch.tensor([[3], [40]]), positions, 1, plan) is None  # out of range
        # nothing written (compared bit for bit: a new cache's unwritten positions hold whatever, NaN too)
        assert all(torch.equal(a.view(torch.int32), b.view(torch.int32)) for a, b in zip(before, cache.self_k))
        assert kernels.decoder_step(tokens, positions, 4, plan) is None  # past the cache's room
        assert kernels.decoder_step(torch.full((2, 2), 3), positions, 1, plan) is None  # two tokens a row
        assert kernels.decoder_step(torch.full((3, 1), 3), positions, 1, plan) is None  # not the cache's rows
        assert kernels.decoder_step(tokens, positions.double(), 1, plan) is None
        assert kernels.decoder_step(tokens, positions, 1, plan, torch.tensor([0, 2])) is None  # a row not there
        assert kernels.decoder_step(tokens, positions, 1, plan, torch.tensor([0])) is None  # not one per row
        # nothing written (compared bit for bit: a new cache's unwritten positions hold whatever, NaN too)
        assert all(torch.equal(a.view(torch.int32), b.view(torch.int32)) for a, b in zip(before, cache.self_k))
        assert kernels.decoder_step(tokens, positions, 1, plan) is not None
        buffers = list(zip(cache.self_k, cache.self_v))
        assert kernels.decoder_step_recache(plan, buffers, 2) is not None  # the same buffers: taken
        assert kernels.decoder_step_recache(plan, [(k[:1], v[:1]) for k, v in buffers], 2) is None  # other rows
        assert kernels.decoder_step_recache(plan, [(k.double(), v) for k, v in buffers], 2) is None  # other dtype
        assert kernels.decoder_step_recache(plan, [(k[:, :, :2], v[:, :, :2]) for k, v in buffers], 2) is None  # no room
    with pytest.raises(IndexError):  # the module path says what is wrong
        with torch.inference_mode():
            copy.decode_step(torch.tensor([[3], [40]]), cache)


# beam search's row orders: none moved, a cycle and a swap, one row to many (its own row kept or
# not), a reversal, a shift (each row read just before it changes), pairs
@pytest.mark.parametrize("order", [[0, 1, 2, 3, 4, 5], [1, 2, 0, 3, 5, 4], [1, 1, 1, 0, 5, 5], [3, 3, 3, 3, 0, 0],
                                   [5, 4, 3, 2, 1, 0], [0, 0, 1, 2, 3, 4], [2, 2, 0, 0, 4, 4]])
def test_the_one_call_step_reorders_the_caches_in_place_as_index_select(kernel, monkeypatch, order):
    from aiayn.fast.modules import _STEPS

    copy = _small_copy(monkeypatch)
    with torch.inference_mode():
        memory, mask = copy.encode(torch.randint(4, 40, (6, 5)))
        cache = copy.init_cache(memory, mask, 8)
        for _ in range(3):
            copy.decode_step(torch.randint(4, 40, (6, 1)), cache)
        plan = _STEPS[cache][1]
        assert plan is not None
        before = [(k[:, :, :3].clone(), v[:, :, :3].clone()) for k, v in zip(cache.self_k, cache.self_v)]
        order = torch.tensor(order)
        assert kernels.decoder_step(torch.full((6, 1), 5), copy.tgt_embed.positions(3, 1), 3, plan, order) is not None
        for (k, v), (k0, v0) in zip(zip(cache.self_k, cache.self_v), before):
            assert torch.equal(k[:, :, :3], k0[order]) and torch.equal(v[:, :, :3], v0[order])


def test_decoder_layer_declines_what_it_does_not_take(kernel, monkeypatch):
    monkeypatch.setenv("AIAYN_KERNELS", "all")
    D, H, F_ = 16, 2, 32
    tiles = {"qkv_w": (3 * D, D), "self_w": (D, D), "q_w": (D, D), "cross_w": (D, D), "ff1_w": (F_, D), "ff2_w": (D, F_)}
    weights = [kernels.linear_tiles(torch.randn(*tiles[n])) if n in tiles else
               torch.randn(tiles[n.replace("_b", "_w")][0]) if n.replace("_b", "_w") in tiles else torch.ones(D)
               for n in kernels.LAYER_WEIGHTS]
    k_buf, v_buf, sk, sv = torch.zeros(2, H, 5, D // H), torch.zeros(2, H, 5, D // H), torch.randn(2, H, 3, D // H), torch.randn(2, H, 3, D // H)
    x = torch.randn(2, 1, D)

    def plan(weights=weights, d_ff=F_):
        return kernels.decoder_layer_plan(weights, H, d_ff, 1e-5)

    def call(x=x, plan=plan(), start=0, mask=None):
        return kernels.decoder_layer(x, plan, k_buf, v_buf, start, sk, sv, mask)

    assert call() is not None and k_buf[:, :, 0].any()  # it runs, and writes the new keys
    assert call(x=torch.randn(2, 2, D)) is None                     # two new positions a row
    assert call(x=torch.randn(kernels.MAX_LINEAR_ROWS + 1, 1, D)) is None  # many rows: oneDNN's
    assert call(x=torch.randn(2, 1, D).bfloat16()) is None          # not the weights' dtype
    assert call(start=5) is None                                    # no room left in the cache
    assert call(mask=torch.ones(2, 1, 1, 4, dtype=torch.bool)) is None  # the mask is not the source's
    assert plan(d_ff=24) is None                                    # the tiles are not (d_ff, D)
    assert plan(weights=weights[:-1]) is None
    assert plan(weights=[w.bfloat16() if i == 4 else w for i, w in enumerate(weights)]) is None  # dtypes differ
    no_bias = [None if n.endswith("_b") and not n.startswith("norm") else w for n, w in zip(kernels.LAYER_WEIGHTS, weights)]
    assert call(plan=plan(no_bias)) is not None                     # linear layers without biases
    graded = plan([w.requires_grad_() if i == 4 else w for i, w in enumerate(weights)])
    assert call(plan=graded) is None                                # it has no backward
    with torch.no_grad():
        assert call(plan=graded) is not None
