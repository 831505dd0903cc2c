"""The encoder-decoder and the language model: causality, padding, cached decoding, the copy task."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from aiayn.config import ModelConfig, preset
from aiayn.model import LanguageModel, Transformer, build_model

PAD = 0
TOL = dict(rtol=1e-10, atol=1e-10)  # float64: equal up to summation order


pytestmark = pytest.mark.usefixtures("one_thread", "both_paths")  # tests/conftest.py


def _seq2seq(seed=0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(preset("tiny")).double().eval()


def _lm(seed=0) -> LanguageModel:
    torch.manual_seed(seed)
    return LanguageModel(preset("tiny", n_encoder_layers=0, tie_embeddings=True)).double().eval()


def _tokens(batch, length, vocab=64, generator=None):
    """Random ids with no padding (3..vocab-1)."""
    return torch.randint(3, vocab, (batch, length), generator=generator)


def _right_pad(tokens, lengths):
    tokens = tokens.clone()
    for i, n in enumerate(lengths):
        tokens[i, n:] = PAD
    return tokens


# ------------------------------------------------------------------------------------ structure
def test_three_way_tied_embeddings():
    model = _seq2seq()
    assert model.src_embed.tokens.weight is model.tgt_embed.tokens.weight is model.generator.weight
    lm = _lm()
    assert lm.tgt_embed.tokens.weight is lm.generator.weight


def test_build_model_picks_the_architecture():
    assert isinstance(build_model(preset("tiny")), Transformer)
    assert isinstance(build_model(preset("tiny", n_encoder_layers=0)), LanguageModel)
    with pytest.raises(ValueError):
        Transformer(preset("tiny", n_encoder_layers=0))


@torch.no_grad()
def test_returning_weights_does_not_change_outputs():
    """need_weights=True takes the explicit attention path; in float32 it matches the fused one."""
    torch.manual_seed(0)
    model = Transformer(preset("tiny")).eval()
    src, tgt = _right_pad(_tokens(2, 6), [6, 3]), _tokens(2, 5)
    memory, mask = model.encode(src)
    memory_w, mask_w, enc_weights = model.encode(src, need_weights=True)
    torch.testing.assert_close(memory_w, memory, rtol=1e-5, atol=1e-5)
    assert len(enc_weights) == 2 and enc_weights[0]["self"].shape == (2, 4, 6, 6)
    assert torch.all(enc_weights[1]["self"][1, :, :, 3:] == 0)  # padding receives no attention
    h, dec_weights = model.decode(tgt, memory, mask, need_weights=True)
    torch.testing.assert_close(h, model.decode(tgt, memory, mask), rtol=1e-5, atol=1e-5)
    assert dec_weights[0]["cross"].shape == (2, 4, 5, 6)


# ------------------------------------------------------------------------------------ causality
@torch.no_grad()
def test_seq2seq_future_targets_do_not_change_earlier_outputs():
    model = _seq2seq()
    src, tgt = _tokens(2, 7), _tokens(2, 6)
    full = model(src, tgt)
    for t in range(tgt.size(1) - 1):
        changed = tgt.clone()
        changed[:, t + 1:] = _tokens(2, tgt.size(1) - t - 1)
        assert not torch.equal(changed, tgt)
        out = model(src, changed)
        torch.testing.assert_close(out[:, :t + 1], full[:, :t + 1], **TOL)
        assert not torch.allclose(out[:, t + 1:], full[:, t + 1:])  # the change did reach the future


@torch.no_grad()
def test_lm_future_tokens_do_not_change_earlier_outputs():
    model = _lm()
    tokens = _tokens(2, 8)
    full = model(tokens)
    for t in range(tokens.size(1) - 1):
        changed = tokens.clone()
        changed[:, t + 1:] = _tokens(2, tokens.size(1) - t - 1)
        out = model(changed)
        torch.testing.assert_close(out[:, :t + 1], full[:, :t + 1], **TOL)
        assert not torch.allclose(out[:, t + 1:], full[:, t + 1:])


# ------------------------------------------------------------------------------------ padding
@settings(max_examples=20, deadline=None)
@given(src_len=st.integers(1, 10), extra=st.integers(1, 6), tgt_len=st.integers(1, 8),
       seed=st.integers(0, 2**16))
@torch.no_grad()
def test_source_padding_changes_no_real_position(src_len, extra, tgt_len, seed):
    model = _seq2seq()
    g = torch.Generator().manual_seed(seed)
    src, tgt = _tokens(2, src_len, generator=g), _tokens(2, tgt_len, generator=g)
    padded = torch.cat([src, torch.full((2, extra), PAD)], dim=1)
    memory, mask = model.encode(src)
    padded_memory, padded_mask = model.encode(padded)
    assert padded_mask.shape == (2, 1, 1, src_len + extra) and not padded_mask[..., src_len:].any()
    torch.testing.assert_close(padded_memory[:, :src_len], memory, **TOL)
    torch.testing.assert_close(model(padded, tgt), model(src, tgt), **TOL)


@settings(max_examples=20, deadline=None)
@given(lengths=st.lists(st.integers(1, 9), min_size=2, max_size=4), seed=st.integers(0, 2**16))
@torch.no_grad()
def test_batched_padded_sources_equal_each_sentence_alone(lengths, seed):
    """A batch of sources of different lengths gives, row by row, what each gives unbatched."""
    model = _seq2seq()
    g = torch.Generator().manual_seed(seed)
    src = _right_pad(_tokens(len(lengths), max(lengths), generator=g), lengths)
    tgt = _tokens(len(lengths), 4, generator=g)
    memory, _ = model.encode(src)
    logits = model(src, tgt)
    for i, n in enumerate(lengths):
        alone, _ = model.encode(src[i:i + 1, :n])
        torch.testing.assert_close(memory[i:i + 1, :n], alone, **TOL)
        torch.testing.assert_close(logits[i:i + 1], model(src[i:i + 1, :n], tgt[i:i + 1]), **TOL)


@settings(max_examples=20, deadline=None)
@given(tgt_len=st.integers(1, 8), extra=st.integers(1, 6), seed=st.integers(0, 2**16))
@torch.no_grad()
def test_target_padding_changes_no_real_position(tgt_len, extra, seed):
    model, lm = _seq2seq(), _lm()
    g = torch.Generator().manual_seed(seed)
    src = _right_pad(_tokens(2, 6, generator=g), [6, 3])
    tgt = _tokens(2, tgt_len, generator=g)
    padded = torch.cat([tgt, torch.full((2, extra), PAD)], dim=1)
    torch.testing.assert_close(model(src, padded)[:, :tgt_len], model(src, tgt), **TOL)
    torch.testing.assert_close(lm(padded)[:, :tgt_len], lm(tgt), **TOL)


# ------------------------------------------------------------------------- incremental decoding
CHUNKS = [[1] * 7, [3, 1, 2, 1], [7]]  # one token at a time, several at once, all at once


def _poison(cache) -> None:
    """NaN in every self-attention position: a new cache is not zeroed, and nothing may read a position
    before it is written."""
    for buf in (*cache.self_k, *cache.self_v):
        buf.fill_(float("nan"))


@pytest.mark.parametrize("chunks", CHUNKS)
@torch.no_grad()
def test_seq2seq_cached_decoding_equals_full_forward(chunks):
    model = _seq2seq()
    src = _right_pad(_tokens(3, 6), [6, 2, 4])
    tgt = _tokens(3, sum(chunks))
    full = model(src, tgt)
    memory, memory_mask = model.encode(src)
    cache = model.init_cache(memory, memory_mask, max_len=10)
    _poison(cache)
    start = 0
    for n in chunks:
        step = model.decode_step(tgt[:, start:start + n], cache)
        assert step.shape == (3, n, model.cfg.target_vocab)
        torch.testing.assert_close(step, full[:, start:start + n], **TOL)
        start += n
        assert cache.length == start


@pytest.mark.parametrize("chunks", CHUNKS)
@torch.no_grad()
def test_lm_cached_decoding_equals_full_forward(chunks):
    model = _lm()
    tokens = _tokens(3, sum(chunks))
    full = model(tokens)
    cache = model.init_cache(3, max_len=10, dtype=torch.float64)
    _poison(cache)
    start = 0
    for n in chunks:
        torch.testing.assert_close(model.decode_step(tokens[:, start:start + n], cache),
                                   full[:, start:start + n], **TOL)
        start += n
    assert cache.length == 7


@torch.no_grad()
def test_decode_step_refuses_to_overflow_the_cache():
    model = _lm()
    cache = model.init_cache(1, max_len=3, dtype=torch.float64)
    model.decode_step(_tokens(1, 3), cache)
    with pytest.raises(ValueError, match="KV cache"):
        model.decode_step(_tokens(1, 1), cache)


# A permutation, a shrinking subset (finished sentences dropped), a repeated row (two beams, one parent).
REORDERS = [torch.tensor([2, 0, 3, 1]), torch.tensor([3, 1]), torch.tensor([1, 1, 2])]


@pytest.mark.parametrize("indices", REORDERS, ids=["permutation", "subset", "repeat"])
@torch.no_grad()
def test_seq2seq_reordered_cache_continues_like_the_reordered_batch(indices):
    model = _seq2seq()
    src = _right_pad(_tokens(4, 6), [6, 2, 4, 5])
    tgt = _tokens(4, 6)
    memory, memory_mask = model.encode(src)
    cache = model.init_cache(memory, memory_mask, max_len=6)
    model.decode_step(tgt[:, :2], cache)
    model.decode_step(tgt[:, 2:3], cache)
    cache.reorder(indices)
    assert cache.batch_size == len(indices)
    expected = model(src[indices], tgt[indices])
    torch.testing.assert_close(model.decode_step(tgt[indices, 3:4], cache), expected[:, 3:4], **TOL)
    torch.testing.assert_close(model.decode_step(tgt[indices, 4:6], cache), expected[:, 4:6], **TOL)


@torch.no_grad()
def test_seq2seq_cache_with_beams_sharing_a_source_continues_like_the_reordered_batch():
    model = _seq2seq()
    src = _right_pad(_tokens(4, 6), [6, 2, 4, 5])
    tgt = _tokens(4, 6)
    memory, memory_mask = model.encode(src)
    cache = model.init_cache(memory, memory_mask, max_len=6)
    cache.rows_per_source = 2
    model.decode_step(tgt[:, :2], cache)
    rows = torch.arange(4)
    for step, indices in enumerate([torch.tensor([3, 3, 1, 1]), torch.tensor([1, 0, 3, 2]), torch.tensor([2, 3])]):
        cache.reorder(indices)
        rows = rows[indices]  # the original sentence of each row
        expected = model(src[rows], tgt[rows])
        t = 2 + step
        torch.testing.assert_close(model.decode_step(tgt[rows, t:t + 1], cache), expected[:, t:t + 1], **TOL)
    assert cache.n_sources == 1


@pytest.mark.parametrize("indices", REORDERS, ids=["permutation", "subset", "repeat"])
@torch.no_grad()
def test_lm_reordered_cache_continues_like_the_reordered_batch(indices):
    model = _lm()
    tokens = _tokens(4, 6)
    cache = model.init_cache(4, max_len=6, dtype=torch.float64)
    for t in range(3):
        model.decode_step(tokens[:, t:t + 1], cache)
    cache.reorder(indices)
    expected = model(tokens[indices])
    for t in range(3, 6):
        torch.testing.assert_close(model.decode_step(tokens[indices, t:t + 1], cache),
                                   expected[:, t:t + 1], **TOL)


# ------------------------------------------------------------------------------------ copy task
BOS, EOS, VOCAB = 1, 2, 20


def _copy_batch(n: int, generator: torch.Generator):
    """Random sequences of 5..10 symbols (3..19): source = seq EOS, target = BOS seq -> seq EOS."""
    lengths = torch.randint(5, 11, (n,), generator=generator)
    seq = torch.randint(3, VOCAB, (n, 10), generator=generator)
    seq = seq.masked_fill(torch.arange(10)[None] >= lengths[:, None], PAD)
    src = torch.cat([seq, torch.full((n, 1), PAD)], dim=1)
    src[torch.arange(n), lengths] = EOS
    tgt_in = torch.cat([torch.full((n, 1), BOS), seq], dim=1)
    return src, tgt_in, src.clone()


def test_tiny_model_learns_to_copy():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    cfg = ModelConfig(vocab_size=VOCAB, d_model=64, n_heads=4, d_ff=128, n_encoder_layers=2,
                      n_decoder_layers=2, dropout=0.0, max_len=16, pad_id=PAD)
    model = Transformer(cfg)
    steps = 300
    opt = torch.optim.Adam(model.parameters(), lr=3e-3, betas=(0.9, 0.98))
    # §5.3 in miniature: linear warmup, then (unlike the paper) linear decay to zero.
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 30) * (1 - s / steps))
    for _ in range(steps):
        src, tgt_in, tgt_out = _copy_batch(64, g)
        loss = F.cross_entropy(model(src, tgt_in).flatten(0, 1), tgt_out.flatten(), ignore_index=PAD)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    with torch.no_grad():
        src, tgt_in, tgt_out = _copy_batch(500, torch.Generator().manual_seed(1))  # fresh sequences
        predicted = model(src, tgt_in).argmax(-1)
    real = tgt_out != PAD
    accuracy = (predicted == tgt_out)[real].float().mean().item()
    assert accuracy >= 0.99, f"copy-task accuracy {accuracy:.4f}"
