"""Sampling: the filters keep what they promise, seeds reproduce, and cached generation equals
re-running the whole model at every step (also across the sliding window)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from aiayn.config import preset
from aiayn.decode import apply_temperature, generate, sample_next, top_k_filter, top_p_filter
from aiayn.model import LanguageModel

pytestmark = pytest.mark.usefixtures("both_paths")  # tests/conftest.py

INF = float("-inf")


def kept(logits: torch.Tensor) -> list[int]:
    return torch.isfinite(logits).nonzero().view(-1).tolist()


def test_apply_temperature_scales_logits():
    logits = torch.tensor([1.0, -2.0, 4.0])
    assert torch.equal(apply_temperature(logits, 0.5), torch.tensor([2.0, -4.0, 8.0]))
    with pytest.raises(ValueError, match="temperature"):
        apply_temperature(logits, 0.0)


def test_top_k_keeps_the_k_largest_per_row():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0], [5.0, -1.0, 4.0, 6.0]])
    out = top_k_filter(logits, 2)
    assert out.tolist() == [[INF, 3.0, 2.0, INF], [5.0, INF, INF, 6.0]]
    assert torch.equal(top_k_filter(logits, 4), logits)


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([0.15, 0.5, 0.05, 0.3])  # sorted: .5 (1), .3 (3), .15 (0), .05 (2)
    logits = probs.log()
    assert kept(top_p_filter(logits, 0.4)) == [1]
    assert kept(top_p_filter(logits, 0.75)) == [1, 3]
    assert kept(top_p_filter(logits, 0.85)) == [0, 1, 3]
    assert kept(top_p_filter(logits, 0.97)) == [0, 1, 2, 3]
    assert torch.equal(top_p_filter(logits, 1.0), logits)
    # kept logits are unchanged; rows are filtered independently
    both = top_p_filter(torch.stack([logits, logits.flip(0)]), 0.75)
    assert both[0, 1] == logits[1] and kept(both[1]) == [0, 2]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(-8, 8), min_size=2, max_size=20), st.floats(0.01, 0.99))
def test_top_p_set_is_minimal_and_reaches_p(values, p):
    logits = torch.tensor(values)
    probs = logits.double().softmax(-1)
    keep = torch.isfinite(top_p_filter(logits, p))
    mass, smallest = probs[keep].sum().item(), probs[keep].min().item()
    assert mass >= p - 1e-5  # reaches p
    assert mass - smallest < p + 1e-5  # without its least likely token it would not
    assert probs[keep].min() >= probs[~keep].max() if (~keep).any() else True  # the most likely ones


def test_temperature_zero_and_top_k_one_are_argmax():
    torch.manual_seed(0)
    logits = torch.randn(8, 50)
    best = logits.argmax(-1)
    assert torch.equal(sample_next(logits, temperature=0), best)
    for seed in range(5):
        g = torch.Generator().manual_seed(seed)
        assert torch.equal(sample_next(logits, temperature=2.0, top_k=1, generator=g), best)


def test_same_seed_same_tokens_and_draws_follow_the_distribution():
    logits = torch.tensor([0.0, 1.0, 2.0]).expand(20000, 3)
    a = sample_next(logits, generator=torch.Generator().manual_seed(7))
    b = sample_next(logits, generator=torch.Generator().manual_seed(7))
    c = sample_next(logits, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    freq = torch.bincount(a, minlength=3).double() / len(a)
    assert torch.allclose(freq, logits[0].double().softmax(-1), atol=0.015)
    hot = sample_next(logits, temperature=0.25, generator=torch.Generator().manual_seed(7))
    assert (hot == 2).double().mean() > 0.95  # exp(8) : exp(4) : 1


def test_top_p_sampling_stays_in_the_nucleus():
    logits = torch.tensor([0.15, 0.5, 0.05, 0.3]).log().expand(5000, 4)
    draws = sample_next(logits, top_p=0.75, generator=torch.Generator().manual_seed(0))
    assert set(draws.tolist()) == {1, 3}


@pytest.mark.parametrize("kwargs, message", [
    ({"temperature": -0.5}, "temperature must be >= 0"),
    ({"top_k": 0}, "top_k must be >= 1"),
    ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
    ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
])
def test_bad_arguments_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        sample_next(torch.zeros(2, 5), **kwargs)
    with pytest.raises(ValueError, match=message):
        generate(tiny_lm(), [1], 3, **kwargs)  # raised at the call, not at the first step


def test_generate_checks_its_own_arguments():
    lm = tiny_lm()
    with pytest.raises(ValueError, match="prompt"):
        generate(lm, [], 3)
    with pytest.raises(ValueError, match="num_samples"):
        generate(lm, [1], 3, num_samples=0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(lm, [1], -1)


# ------------------------------------------------------------------------------------ generate
def tiny_lm(max_len: int = 16) -> LanguageModel:
    torch.manual_seed(0)
    # untied embeddings: a random tied model mostly repeats its input token, which would test little
    return LanguageModel(preset("tiny", n_encoder_layers=0, tie_embeddings=False, max_len=max_len)).eval()


def reference_generate(model, prompt: list[int], n: int) -> list[int]:
    """Argmax with the whole model re-run at every step, and the same window rule as `generate`:
    at most max_len tokens; past that, the last max_len // 2."""
    L = model.cfg.max_len
    context, start, out = list(prompt), max(0, len(prompt) - L), []
    with torch.no_grad():
        for _ in range(n):
            token = int(model(torch.tensor([context[start:]]))[0, -1].argmax())
            out.append(token)
            context.append(token)
            if len(context) - start > L:
                start = len(context) - L // 2
    return out


@pytest.mark.parametrize("prompt, n", [
    ([1, 5, 6], 10),          # inside the context
    ([1, 5, 6], 40),          # slides twice
    (list(range(3, 23)), 12),  # a prompt longer than the context keeps its end
])
def test_cached_generation_equals_full_forward(prompt, n):
    lm = tiny_lm()
    steps = list(generate(lm, prompt, n, temperature=0))
    assert all(len(s) == 1 for s in steps)
    out = [s[0] for s in steps]
    assert out == reference_generate(lm, prompt, n)
    assert len(set(out)) > 1  # the model does not just repeat one token


def test_generate_seeded_samples_reproduce_and_stream():
    lm = tiny_lm()
    run = lambda seed: list(generate(lm, torch.tensor([1, 5]), 30, top_k=10, top_p=0.9, seed=seed,
                                     num_samples=3))
    first = run(11)
    assert len(first) == 30 and all(len(step) == 3 for step in first)
    assert run(11) == first and run(12) != first
    assert len({tuple(col) for col in zip(*first)}) == 3  # the samples differ from each other


def test_generate_stops_at_stop_id():
    lm = tiny_lm()
    free = [s[0] for s in generate(lm, [1, 5, 6], 12, temperature=0)]
    stop = next(t for t in free if free.index(t) > 2)  # a token that first comes a few steps in
    cut = [s[0] for s in generate(lm, [1, 5, 6], 12, temperature=0, stop_id=stop)]
    assert cut == free[:free.index(stop) + 1]
    assert list(generate(lm, [1], 0)) == []
    # several samples: one that has stopped yields pad until all have stopped
    stop = free[0]
    steps = list(generate(lm, [1, 5, 6], 12, seed=3, num_samples=4, stop_id=stop, temperature=1.5))
    columns = list(zip(*steps))
    assert any(stop in col for col in columns)
    for col in columns:
        if stop in col:
            assert all(t == lm.cfg.pad_id for t in col[col.index(stop) + 1:])
    assert len(steps) == 12 or all(stop in col for col in columns)


def test_a_tiny_temperature_is_argmax_not_nan():
    from aiayn.decode.sampling import sample_next

    logits = torch.tensor([[1.0, 3.0, 2.0], [0.5, -1.0, 0.25]])
    for t in (1e-30, 1e-300, 5e-324):
        assert sample_next(logits, temperature=t).tolist() == [1, 0]


def test_a_tiny_top_p_keeps_the_most_likely_token():
    logits = torch.tensor([[1.0, 3.0, 2.0]])
    kept = top_p_filter(logits, 5e-324)
    assert torch.isfinite(kept).tolist() == [[False, True, False]]
