"""Continuous batching: each sentence that joins a running batch, at whatever step, gets what greedy
search gives it alone, while rows leave, slots are reused and the cache is compacted."""

import random

import pytest
import torch

from aiayn.decode import greedy
from aiayn.decode.continuous import ContinuousGreedy
from aiayn.errors import InputError
from tests.decode.test_greedy import BOS, PAD, pick_eos, tiny_model

pytestmark = pytest.mark.usefixtures("both_paths")  # tests/conftest.py


def random_sources(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 16) for _ in range(rng.randrange(1, 9))] for _ in range(n)]


def alone(model, source, eos, max_extra):
    return greedy(model, torch.tensor([source]), BOS, eos, max_extra=max_extra)[0]


def run_stream(stream: ContinuousGreedy, sources, seed: int = 0, steps_between=(0, 3), most: int = 3):
    """Feed `sources` in random groups of up to `most`, a random number of steps apart -> {index:
    output}, steps run."""
    rng, pending, handles, results, steps = random.Random(seed), list(range(len(sources))), {}, {}, 0
    while pending or len(stream):
        n = min(rng.randrange(0, most + 1), stream.free, len(pending))
        for h, i in zip(stream.add([sources[i] for i in pending[:n]]), pending[:n]):
            handles[h] = i
        pending = pending[n:]
        for _ in range(rng.randrange(*steps_between) if pending else 1):
            steps += 1
            for h, tokens in stream.step():
                results[handles.pop(h)] = tokens
    assert not handles
    return results, steps


@pytest.mark.parametrize("initial", [4, 64])  # a cache that grows; one of max_len from the start
def test_sentences_joining_at_any_step_get_greedys_output_alone(initial, monkeypatch):
    monkeypatch.setattr("aiayn.decode.continuous.INITIAL_POSITIONS", initial)
    model = tiny_model(seed=2, max_len=24)  # a short cache: a long stream is compacted many times
    sources = random_sources(40)
    eos = pick_eos(model, torch.tensor([s + [PAD] * (8 - len(s)) for s in sources]), max_extra=6)
    stream = ContinuousGreedy(model, BOS, eos, max_rows=5, max_extra=6)
    compactions, compact = [], stream._compact

    def counting():
        before = stream._cache.length
        compact()
        compactions.append(stream._cache.length < before)

    stream._compact = counting
    results, steps = run_stream(stream, sources)
    assert steps > 3 * model.cfg.max_len and sum(compactions) > 3  # it ran past its cache, many times over
    assert [results[i] for i in range(len(sources))] == [alone(model, s, eos, 6) for s in sources]
    assert len({len(r) for r in results.values()}) > 2  # sentences ended at different steps
    assert len(stream) == 0 and stream.step() == []
    assert stream._cache.capacity == (16 if initial == 4 else 24)  # grown from 4 to what its rows needed


def test_outputs_stop_at_the_length_limit_and_never_hold_the_pad_id():
    model = tiny_model(seed=3, max_len=16)
    sources = random_sources(12, seed=4)
    stream = ContinuousGreedy(model, BOS, eos_id=-1, max_rows=4, max_extra=3)  # -1: never ends early
    results, _ = run_stream(stream, sources, seed=1)
    for i, s in enumerate(sources):
        assert len(results[i]) == min(len(s) + 3, model.cfg.max_len - 1) and PAD not in results[i]


def test_dropped_rows_leave_and_the_others_go_on():
    model = tiny_model(seed=2)
    sources = random_sources(6, seed=5)
    stream = ContinuousGreedy(model, BOS, eos_id=-1, max_rows=6, max_extra=4)
    handles = stream.add(sources)
    stream.step()
    stream.drop(handles[1:3])
    assert len(stream) == 4 and stream.free == 2
    results = {}
    while len(stream):
        results.update(stream.step())
    assert sorted(results) == sorted(handles[:1] + handles[3:])
    for h, s in zip(handles, sources):
        if h in results:
            assert results[h] == alone(model, s, -1, 4)


def test_what_the_stream_refuses():
    model = tiny_model()
    stream = ContinuousGreedy(model, BOS, 2, max_rows=2)
    with pytest.raises(InputError, match="room for 2"):
        stream.add([[3], [4], [5]])
    with pytest.raises(InputError, match="1 to"):
        stream.add([[]])
    with pytest.raises(InputError, match="1 to"):
        stream.add([[3] * model.cfg.max_len])
    with pytest.raises(InputError):
        ContinuousGreedy(model, BOS, 2, max_rows=0)
    assert stream.add([]) == [] and len(stream) == 0


@pytest.mark.parametrize("precision", ["fp32", pytest.param("bf16", marks=pytest.mark.bf16), "int8"])
def test_an_inference_copy_streams_like_it_decodes_alone(precision, both_paths, monkeypatch):
    """The inference copies' decoding steps (the one-call decoder layer, the attention kernels) with
    each row's own positions and mask: the same outputs as greedy on each sentence alone. (int8:
    sentences join one at a time: the encoder's int8 linears round a call's inputs with one scale,
    where the decoding steps' kernel rounds each row with its own.)"""
    from aiayn import capability, kernels
    from aiayn.config import ModelConfig
    from aiayn.fast.inference import inference_model
    from aiayn.model import build_model

    if precision == "int8" and not (capability.probe("cpu").int8 and both_paths == "fast" and kernels.available()):
        pytest.skip("int8 without the few-rows kernel: fbgemm rounds a call's rows with one scale, so "
                    "a sentence's output depends on its batch (as in translate())")
    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=40, d_model=32, n_heads=4, d_ff=64, n_encoder_layers=1,
                                    n_decoder_layers=2, max_len=20, dropout=0.0)).eval()
    if both_paths == "fast":
        monkeypatch.setenv("AIAYN_KERNELS", "all")  # every kernel that takes the inputs, won or not
    copy = inference_model(model, precision)
    masked, layer = [], kernels.decoder_layer
    monkeypatch.setattr(kernels, "decoder_layer", lambda *a: masked.append(a[-1] is not None) or layer(*a))
    sources = [[(7 * i + j) % 36 + 4 for j in range(i % 7 + 1)] for i in range(24)]
    stream = ContinuousGreedy(copy, BOS, 2, max_rows=6, max_extra=5)
    with torch.inference_mode():
        results, _ = run_stream(stream, sources, seed=3, most=1 if precision == "int8" else 3)
        expected = [greedy(copy, torch.tensor([s]), BOS, 2, max_extra=5)[0] for s in sources]
    assert [results[i] for i in range(len(sources))] == expected
    if both_paths == "fast" and kernels.available() and copy.decoder.layers[0].self_attn.in_proj.__dict__.get("tiles") is not None:
        assert any(masked)  # the one-call layer ran with the rows' masks
