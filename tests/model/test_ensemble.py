import math

import pytest
import torch

from aiayn.config import preset
from aiayn.decode import beam_search, greedy
from aiayn.fast.inference import inference_model
from aiayn.model import Transformer
from aiayn.model.ensemble import Ensemble

TOL = dict(rtol=1e-10, atol=1e-10)


def _model(seed: int, **changes) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(preset("tiny", vocab_size=40, dropout=0.0, **changes)).double().eval()


def _src() -> torch.Tensor:
    src = torch.randint(4, 40, (3, 6), generator=torch.Generator().manual_seed(0))
    src[1, 4:] = 0  # padding
    return src


@torch.no_grad()
def test_decode_steps_give_the_log_of_the_members_mean_probability():
    a, b = _model(1), _model(2)
    src, tgt = _src(), torch.randint(4, 40, (3, 5), generator=torch.Generator().manual_seed(1))
    ens = Ensemble([a, b])
    cache = ens.init_cache(*ens.encode(src), max_len=8)
    steps = torch.cat([ens.decode_step(tgt[:, t:t + 1], cache) for t in range(5)], dim=1)
    mean = (a(src, tgt).softmax(-1) + b(src, tgt).softmax(-1)) / 2
    torch.testing.assert_close(steps, mean.log(), **TOL)
    torch.testing.assert_close(ens(src, tgt), mean.log(), **TOL)


@torch.no_grad()
def test_an_ensemble_of_one_model_or_of_copies_searches_like_the_model():
    a = _model(1)
    src = _src()
    for ens in (Ensemble([a]), Ensemble([a, a])):
        assert greedy(ens, src, 1, 2) == greedy(a, src, 1, 2)
        got, ref = beam_search(ens, src, 1, 2, beam_size=3, n_best=2), beam_search(a, src, 1, 2, beam_size=3, n_best=2)
        assert [[t for t, _ in h] for h in got] == [[t for t, _ in h] for h in ref]
        for g, r in zip(got, ref):
            assert [s for _, s in g] == pytest.approx([s for _, s in r], abs=1e-5)  # search works in float32


@torch.no_grad()
def test_beam_search_reorders_every_members_cache():
    a, b = _model(1), _model(2)
    src = _src()
    ens = Ensemble([a, b])
    hyps = beam_search(ens, src, 1, 2, beam_size=3, max_extra=4)
    for (tokens, score), s in zip((h[0] for h in hyps), src):
        # the reported score is the ensemble's own log-probability of the output, length-normalised
        tgt = torch.tensor([[1, *tokens, 2]])
        lp = ens(s[None], tgt[:, :-1]).gather(-1, tgt[:, 1:, None]).sum().item()
        assert score == pytest.approx(lp / ((5 + len(tokens) + 1) / 6) ** 0.6, abs=1e-4)  # float32 search


def test_members_of_other_vocabularies_are_refused():
    with pytest.raises(ValueError, match="one vocabulary"):
        Ensemble([_model(1), Transformer(preset("tiny", vocab_size=41))])
    with pytest.raises(ValueError):
        Ensemble([])


@torch.no_grad()
def test_the_shortest_maximum_length_holds_and_inference_copies_keep_members():
    a, b = _model(1).float(), _model(2, max_len=32).float()
    ens = Ensemble([a, b])
    assert ens.cfg.max_len == min(a.cfg.max_len, 32)
    fast = inference_model(ens, "fp32")
    assert isinstance(fast, Ensemble) and len(fast.members) == 2
    assert math.isfinite(float(fast.decode_step(torch.tensor([[1]]),
                                                fast.init_cache(*fast.encode(_src()[:1]), 4))[0, 0, 5]))
