"""Layers (§3.1, §3.3-3.5): positional encoding, embeddings, feed-forward, post-norm vs pre-norm."""

import math

import pytest
import torch
from torch import nn

from aiayn.config import preset
from aiayn.model.attention import causal_mask
from aiayn.model.layers import Embedding, FeedForward, Stack, TransformerLayer, sinusoidal_encoding

pytestmark = pytest.mark.usefixtures("both_paths")  # tests/conftest.py


# --------------------------------------------------------------------------- §3.5 positional encoding
@pytest.mark.parametrize("d_model", [8, 512])
def test_sinusoidal_encoding_matches_the_formula(d_model):
    pe = sinusoidal_encoding(100, d_model)
    assert pe.shape == (100, d_model)
    for pos in (0, 1, 7, 50, 99):
        for i in (0, 1, d_model // 4, d_model // 2 - 1):
            angle = pos / 10000 ** (2 * i / d_model)
            assert pe[pos, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-6)
            assert pe[pos, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-6)


def test_sinusoidal_encoding_odd_width():
    pe = sinusoidal_encoding(10, 7)
    assert pe.shape == (10, 7)
    assert pe[3, 6].item() == pytest.approx(math.sin(3 / 10000 ** (6 / 7)), abs=1e-6)
    assert pe[3, 5].item() == pytest.approx(math.cos(3 / 10000 ** (4 / 7)), abs=1e-6)


# ------------------------------------------------------------------------------- §3.4 embeddings
def test_embedding_scales_by_sqrt_d_model_and_adds_positions():
    cfg = preset("tiny")
    emb = Embedding(cfg.vocab_size, cfg).eval()
    tokens = torch.tensor([[3, 4, 5]])
    out = emb(tokens, start=2)
    positions = sinusoidal_encoding(cfg.max_len, cfg.d_model)[2:5]
    expected = emb.tokens(tokens) * math.sqrt(cfg.d_model) + positions
    torch.testing.assert_close(out, expected)


def test_embedding_shares_a_given_token_table():
    cfg = preset("tiny")
    table = nn.Embedding(cfg.vocab_size, cfg.d_model)
    assert Embedding(cfg.vocab_size, cfg, tokens=table).tokens.weight is table.weight


def test_embedding_rejects_positions_past_max_len():
    cfg = preset("tiny", max_len=4)
    emb = Embedding(cfg.vocab_size, cfg)
    emb(torch.ones(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="maximum length"):
        emb(torch.ones(1, 2, dtype=torch.long), start=3)


def test_learned_positions():
    cfg = preset("tiny", positional="learned")
    emb = Embedding(cfg.vocab_size, cfg).eval()
    tokens = torch.tensor([[3, 4]])
    expected = emb.tokens(tokens) * math.sqrt(cfg.d_model) + emb.learned.weight[1:3]
    torch.testing.assert_close(emb(tokens, start=1), expected)


# ------------------------------------------------------------------------------ §3.3 feed-forward
def test_feed_forward_is_two_linear_maps_around_relu():
    cfg = preset("tiny")
    ff = FeedForward(cfg)
    x = torch.randn(2, 3, cfg.d_model)
    expected = torch.relu(x @ ff.w1.weight.T + ff.w1.bias) @ ff.w2.weight.T + ff.w2.bias
    torch.testing.assert_close(ff(x), expected)
    assert ff.w1.weight.shape == (cfg.d_ff, cfg.d_model)


# ------------------------------------------------------------------------ post-norm vs pre-norm
def _layer(norm_first, cross=False):
    torch.manual_seed(0)
    layer = TransformerLayer(preset("tiny", norm_first=norm_first), cross_attention=cross).double().eval()
    with torch.no_grad():  # non-trivial LayerNorm parameters, so a swapped norm cannot hide
        for norm in (layer.self_norm, layer.ff_norm):
            norm.weight.normal_(1.0, 0.2)
            norm.bias.normal_(0.0, 0.2)
    return layer


def test_post_norm_layer_is_layernorm_of_x_plus_sublayer():
    """The paper's §5.4 form: LayerNorm(x + Sublayer(x))."""
    layer = _layer(norm_first=False)
    x = torch.randn(2, 5, 32, dtype=torch.float64)
    mask = causal_mask(5)
    h = layer.self_norm(x + layer.self_attn(x, mask)[0])
    expected = layer.ff_norm(h + layer.ff(h))
    torch.testing.assert_close(layer(x, mask)[0], expected, rtol=1e-12, atol=1e-12)


def test_pre_norm_layer_is_x_plus_sublayer_of_layernorm():
    layer = _layer(norm_first=True)
    x = torch.randn(2, 5, 32, dtype=torch.float64)
    h = x + layer.self_attn(layer.self_norm(x), None)[0]
    expected = h + layer.ff(layer.ff_norm(h))
    torch.testing.assert_close(layer(x, None)[0], expected, rtol=1e-12, atol=1e-12)


def test_only_pre_norm_stack_has_a_final_layernorm():
    post = Stack(preset("tiny"), 2)
    pre = Stack(preset("tiny", norm_first=True), 2)
    assert isinstance(post.norm, nn.Identity)
    assert isinstance(pre.norm, nn.LayerNorm)
    assert sum(isinstance(m, nn.LayerNorm) for m in pre.modules()) == \
        sum(isinstance(m, nn.LayerNorm) for m in post.modules()) + 1
    assert all(not layer.norm_first for layer in post.layers)
    assert all(layer.norm_first for layer in pre.layers)


def test_decoder_stack_returns_weights_per_layer():
    cfg = preset("tiny")
    stack = Stack(cfg, 2, cross_attention=True).eval()
    x, memory = torch.randn(2, 3, cfg.d_model), torch.randn(2, 4, cfg.d_model)
    h, weights = stack(x, causal_mask(3), memory=memory, need_weights=True)
    assert h.shape == x.shape and len(weights) == 2
    assert weights[0]["self"].shape == (2, cfg.n_heads, 3, 3)
    assert weights[0]["cross"].shape == (2, cfg.n_heads, 3, 4)
    _, no_weights = stack(x, causal_mask(3), memory=memory)
    assert all(w["self"] is None and w["cross"] is None for w in no_weights)


def test_split_sinusoids_are_the_papers_values_in_marians_layout():
    """positional="sinusoidal-split": every sine, then every cosine (Marian); the same values as §3.5's
    interleaved table, whose layout is unchanged."""
    import numpy as np

    from aiayn.model.layers import sinusoidal_encoding

    for d in (8, 9):
        pe, split = sinusoidal_encoding(20, d), sinusoidal_encoding(20, d, split=True)
        assert torch.equal(split, torch.cat([pe[:, 0::2], pe[:, 1::2]], dim=1))
        # transformers' MarianSinusoidalPositionalEmbedding, in numpy
        enc = np.array([[pos / np.power(10000, 2 * (j // 2) / d) for j in range(d)] for pos in range(20)])
        ref = np.concatenate([np.sin(enc[:, 0::2]), np.cos(enc[:, 1::2])], axis=1)
        assert split.shape == ref.shape == (20, d) and np.abs(split.numpy() - ref).max() < 1e-6
        assert torch.allclose(pe[:, 1], torch.cos(torch.arange(20.0)), atol=1e-6)  # the paper's PE(pos, 1)
