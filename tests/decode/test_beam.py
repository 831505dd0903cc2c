"""Beam search: exact hypotheses and scores on a hand-written fake decoder; on a real model, beam 1 is
greedy, scores are the model's log-probabilities, and batching changes nothing."""

import math
from types import SimpleNamespace

import pytest
import torch

from aiayn.config import preset
from aiayn.decode import beam_search, beam_step, greedy, length_penalty, max_output_lengths
from aiayn.model import Transformer

pytestmark = pytest.mark.usefixtures("both_paths")  # tests/conftest.py

PAD, BOS, EOS, A, B = 0, 1, 2, 3, 4
V = 5

# Next-token probabilities (EOS, A, B) of each fake sentence after each prefix (tokens after BOS);
# a prefix not listed ends for sure: (1, 0, 0). PAD and BOS have probability 0.
TABLES = {
    1: {(): (.1, .6, .3), (A,): (.5, .3, .2), (B,): (.2, .1, .7),
        (A, A): (.9, .05, .05), (B, B): (.6, .2, .2)},
    # [A] has the best log-probability, [B, B, B] the best once normalised by length (alpha = 1)
    2: {(): (.05, .55, .40), (A,): (.55, .25, .20), (B,): (.05, .05, .90),
        (A, A): (.1, .5, .4), (B, B): (.04, .06, .90), (B, B, B): (.9, .06, .04)},
}


class FakeCache:
    """What the fake decoder remembers: the tokens fed so far and which table each row reads."""

    def __init__(self, table_ids: torch.Tensor, capacity: int):
        self.table_ids, self.capacity = table_ids, capacity
        self.fed = torch.empty(len(table_ids), 0, dtype=torch.long)
        self.length = 0
        self.batch_sizes = []  # rows fed at each step

    def reorder(self, indices: torch.Tensor) -> None:
        self.table_ids, self.fed = self.table_ids[indices], self.fed[indices]


class FakeDecoder:
    """The encode / init_cache / decode_step interface of Transformer, reading fixed probabilities.

    A source is [table id, filler...], so its length sets the maximum output length.
    """

    cfg = SimpleNamespace(pad_id=PAD, max_len=64)

    def __init__(self):
        self.caches = []

    def encode(self, src):
        return src[:, :1, None].float(), None  # "memory" (B, 1, 1): the table id

    def init_cache(self, memory, memory_mask, max_len):
        cache = FakeCache(memory[:, 0, 0].long(), max_len)
        self.caches.append(cache)
        return cache

    def decode_step(self, tokens, cache):
        assert tokens.shape == (len(cache.fed), 1) and cache.length < cache.capacity
        cache.batch_sizes.append(tokens.size(0))
        cache.fed = torch.cat([cache.fed, tokens], dim=1)
        cache.length += 1
        assert (cache.fed[:, 0] == BOS).all()
        logprobs = torch.full((tokens.size(0), 1, V), float("-inf"))
        for row, (table, fed) in enumerate(zip(cache.table_ids.tolist(), cache.fed.tolist())):
            probs = TABLES[table].get(tuple(fed[1:]), (1.0, 0.0, 0.0))
            logprobs[row, 0, [EOS, A, B]] = torch.tensor(probs).log()
        return logprobs


def fake_source(table: int, length: int) -> list[int]:
    return [table] + [7] * (length - 1)


def run_fake(rows, **kwargs):
    width = max(len(r) for r in rows)
    src = torch.tensor([r + [PAD] * (width - len(r)) for r in rows])
    model = FakeDecoder()
    return beam_search(model, src, BOS, EOS, **kwargs), model.caches[0]


def close(hyps, expected):
    """Tokens equal, scores equal to float32 precision."""
    return [t for t, _ in hyps] == [t for t, _ in expected] and \
        all(math.isclose(s, e, rel_tol=1e-6) for (_, s), (_, e) in zip(hyps, expected))


def test_length_penalty_is_gnmt():
    assert length_penalty(1, 0.0) == 1.0
    assert length_penalty(1, 1.0) == 1.0
    assert math.isclose(length_penalty(7, 0.6), 2.0 ** 0.6)


def test_beam_step_picks_the_2k_best_extensions():
    lprobs = torch.tensor([[[-1.0, -2.0, -3.0], [-0.5, -4.0, -0.1]]])  # (b=1, k=2, V=3)
    scores = torch.tensor([[0.0, -1.0]])
    top, tokens, beams = beam_step(lprobs, scores, 2)
    # candidate totals: beam 0: -1, -2, -3; beam 1: -1.5, -5, -1.1
    assert top.tolist() == [[-1.0, -1.100000023841858, -1.5, -2.0]]
    assert tokens.tolist() == [[0, 2, 0, 1]] and beams.tolist() == [[0, 1, 1, 0]]


def test_first_beam_step_from_one_row_pads_missing_candidates_as_dead():
    lprobs = torch.tensor([[[-1.0, -0.5, -3.0]]])  # (b=1, one row: the first step, V=3)
    top, tokens, beams = beam_step(lprobs, torch.zeros(1, 1), 2)  # 2k = 4 > 3 candidates
    assert top.tolist() == [[-0.5, -1.0, -3.0, float("-inf")]]
    assert tokens[0, :3].tolist() == [1, 0, 2] and beams.tolist() == [[0, 0, 0, 0]]


def test_fake_decoder_exact_hypotheses():
    (hyps,), _ = run_fake([fake_source(1, 5)], beam_size=2, alpha=0.0, n_best=2)
    # step 0: A .6, B .3 go on (EOS .1 is not among the 2 best, so [] never ends)
    # step 1: [A]+EOS .30 ends; BB .21 and AA .18 go on (AB .12 dropped)
    # step 2: AA+EOS .162 ends: the sentence holds 2 hypotheses and stops (BB+EOS .126 is not kept)
    assert close(hyps, [([A], math.log(.6 * .5)), ([A, A], math.log(.6 * .3 * .9))])


def test_length_penalty_reranks_exactly():
    # steps: A .55, B .40 | [A]+EOS .3025 ends; BB .36, AA .1375 | BBB .324, AAA .06875 |
    # BBB+EOS .2916 ends (AAA+EOS .06875 comes second of the two EOS: not kept)
    src = [fake_source(2, 10)]
    (plain,), _ = run_fake(src, beam_size=2, alpha=0.0, n_best=2)
    assert close(plain, [([A], math.log(.3025)), ([B, B, B], math.log(.2916))])
    (normalised,), _ = run_fake(src, beam_size=2, alpha=1.0, n_best=2)
    # |Y| counts EOS: lp = (5 + 4) / 6 for [B, B, B], (5 + 2) / 6 for [A]
    assert close(normalised, [([B, B, B], math.log(.2916) / 1.5), ([A], math.log(.3025) / (7 / 6))])
    (best,), _ = run_fake(src, beam_size=2, alpha=1.0)
    assert close(best, normalised[:1])


def test_maximum_length_ends_beams_with_the_models_eos_probability():
    # source length 1 + max_extra 1: at most 2 tokens. Step 2 allows only EOS: BB+EOS .36 * .04 and
    # AA+EOS .1375 * .1 end; the first completes the 2 hypotheses.
    (hyps,), cache = run_fake([fake_source(2, 1)], beam_size=2, alpha=0.0, n_best=2, max_extra=1)
    assert close(hyps, [([A], math.log(.3025)), ([B, B], math.log(.36 * .04))])
    assert cache.capacity == 3 and cache.batch_sizes == [1, 2, 2]  # the first step: one row


def test_fake_batch_drops_finished_sentences_without_changing_results():
    rows = [fake_source(2, 10), fake_source(1, 3), fake_source(2, 1)]
    batched, cache = run_fake(rows, beam_size=2, alpha=0.6, n_best=2, max_extra=1)
    alone = [run_fake([r], beam_size=2, alpha=0.6, n_best=2, max_extra=1)[0][0] for r in rows]
    assert all(close(b, a) for b, a in zip(batched, alone))
    # one row per sentence on the first step; then sentence 1 ends at step 2, sentence 2 at its limit
    # at step 2, sentence 0 at step 3
    assert cache.batch_sizes == [3, 6, 6, 2]


def test_beam_arguments_are_checked():
    src = torch.tensor([fake_source(1, 3)])
    with pytest.raises(ValueError, match="beam_size"):
        beam_search(FakeDecoder(), src, BOS, EOS, beam_size=0)
    with pytest.raises(ValueError, match="n_best"):
        beam_search(FakeDecoder(), src, BOS, EOS, beam_size=2, n_best=3)


# ------------------------------------------------------------------------------------- real model
def tiny_model(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    # untied embeddings: a random tied model mostly copies its input token, which would test little
    return Transformer(preset("tiny", vocab_size=16, tie_embeddings=False)).eval()


def sources() -> torch.Tensor:
    torch.manual_seed(1)
    src = torch.randint(3, 16, (5, 7))
    for row, n in enumerate([7, 3, 5, 2, 6]):
        src[row, n:] = PAD
    return src


def test_beam_one_is_greedy():
    model, src = tiny_model(), sources()
    for eos in (5, 9, 13):
        beams = beam_search(model, src, BOS, eos, beam_size=1, max_extra=5)
        assert [h[0][0] for h in beams] == greedy(model, src, BOS, eos, max_extra=5)


def teacher_forced_score(model, src_row, tokens, eos, alpha):
    src = src_row[src_row != PAD][None]
    with torch.no_grad():
        logits = model(src, torch.tensor([[BOS] + tokens]))[0]  # (T, V)
    logp = logits.log_softmax(-1).gather(1, torch.tensor([tokens + [eos]]).T).sum()
    return float(logp) / length_penalty(len(tokens) + 1, alpha)


@pytest.mark.parametrize("seed", [3, 4])  # 3: hypotheses end by EOS; 4: mostly at the length limit
def test_scores_are_the_models_normalised_log_probabilities(seed):
    model, src = tiny_model(seed), sources()
    results = beam_search(model, src, BOS, 9, beam_size=4, alpha=0.6, n_best=4, max_extra=4)
    limits = max_output_lengths(src, PAD, 4, model.cfg.max_len).tolist()
    for row, hyps, limit in zip(src, results, limits):
        assert len(hyps) == 4
        assert [s for _, s in hyps] == sorted((s for _, s in hyps), reverse=True)
        assert len({tuple(t) for t, _ in hyps}) == 4  # distinct hypotheses
        for tokens, score in hyps:
            assert len(tokens) <= limit and PAD not in tokens
            assert math.isclose(score, teacher_forced_score(model, row, tokens, 9, 0.6), abs_tol=1e-4)


def test_real_batch_equals_one_sentence_at_a_time():
    model, src = tiny_model(seed=4), sources()
    batched = beam_search(model, src, BOS, 9, beam_size=3, n_best=2, max_extra=4)
    alone = [beam_search(model, r[r != PAD][None], BOS, 9, beam_size=3, n_best=2, max_extra=4)[0]
             for r in src]
    assert len({len(b[0][0]) for b in batched}) > 2  # sentences leave the batch at different steps
    for b, a in zip(batched, alone):
        assert [t for t, _ in b] == [t for t, _ in a]
        assert all(math.isclose(x, y, abs_tol=1e-5) for (_, x), (_, y) in zip(b, a))


def test_the_step_kernels_quiet_steps_change_no_hypothesis(every_kernel, record, monkeypatch):
    """Where the beam step kernel says no sentence's k best hold an EOS (nor lack a live candidate),
    search takes them as they are, without its bookkeeping: the same hypotheses and scores as the
    search that does it all (PyTorch's reference step), in a batch whose sentences end apart."""
    from aiayn.decode import beam

    model, src = tiny_model(seed=5), sources()  # (seed 5: hypotheses end at 6 different steps)
    steps = record(beam, "candidates")  # (scores, tokens, beams, quiet) a step
    fast = beam_search(model, src, BOS, 9, beam_size=3, n_best=3, max_extra=4)
    assert any(step[3] for step in steps) and not all(step[3] for step in steps)
    monkeypatch.setenv("AIAYN_KERNELS", "0")
    steps.clear()
    reference = beam_search(model, src, BOS, 9, beam_size=3, n_best=3, max_extra=4)
    assert not any(step[3] for step in steps)
    for f, r in zip(fast, reference):
        assert [t for t, _ in f] == [t for t, _ in r]
        assert all(math.isclose(x, y, abs_tol=1e-5) for (_, x), (_, y) in zip(f, r))


@pytest.mark.parametrize("precision", ["fp32", pytest.param("bf16", marks=pytest.mark.bf16), "int8"])
@pytest.mark.parametrize("alpha, n_best, min_len, max_extra", [(0.6, 1, 0, 5), (0.0, 3, 0, 5), (1.0, 3, 4, 2),
                                                               (0.6, 2, 0, 0)])
def test_one_sentence_searched_in_one_call_finds_the_references_hypotheses(precision, alpha, n_best, min_len,
                                                                            max_extra, every_kernel, record,
                                                                            monkeypatch):
    """An inference copy searches one sentence in one kernel call (kernels.search: every step in C):
    the hypotheses and scores of the Python loop over the same copy's kernels, with a length penalty
    or none, a minimum length, outputs cut at the length limit (max_extra 0: EOS forced after as
    many tokens as the source has), sources with padding."""
    from aiayn import capability
    from aiayn.fast.inference import inference_model

    if precision == "int8" and not capability.probe().int8:
        pytest.skip("no int8 engine here")
    fast = inference_model(tiny_model(seed=5), precision)
    found = record(every_kernel, "search")
    for row in sources():
        kwargs = dict(beam_size=3, alpha=alpha, n_best=n_best, min_len=min_len, max_extra=max_extra)
        ours = beam_search(fast, row[None], BOS, 9, **kwargs)
        with monkeypatch.context() as m:  # the Python loop (aiayn.decode.beam.search), the same steps' kernels
            m.setattr(type(fast), "search_one", lambda *args: None)
            reference = beam_search(fast, row[None], BOS, 9, **kwargs)
        assert [t for t, _ in ours[0]] == [t for t, _ in reference[0]]
        assert [s for _, s in ours[0]] == pytest.approx([s for _, s in reference[0]], abs=1e-6)
    assert len(found) == 5 and all(f is not None for f in found)  # (it ran, and was not declined)
    with torch.inference_mode():
        assert every_kernel.search.__name__ == "recorded" and len(beam_search(fast, sources()[:2], BOS, 9)) == 2
    assert len(found) == 5  # (a batch of two: the Python loop)


@pytest.mark.parametrize("V, r, k", [(8000, 4, 4), (8001, 4, 4), (8000, 1, 4), (1000, 8, 8), (130, 4, 2),
                                     (100, 4, 8), (7, 3, 3), (200, 1, 1)])
def test_beam_step_by_blocks_equals_one_topk_over_all_candidates(V, r, k):
    g = torch.Generator().manual_seed(V + r)
    b = 9
    lprobs = torch.randn(b, r, V, generator=g).log_softmax(-1)
    scores = -torch.rand(b, r, generator=g) * 10
    lprobs[1] = float("-inf")  # nothing allowed (a row at its limit is all -inf but EOS: row 2)
    lprobs[2, :, :] = float("-inf")
    lprobs[2, :, V - 1] = -1.0  # only the last (partial-block) token alive
    lprobs[3, :, : V // 2] = float("-inf")
    scores[4, r // 2:] = float("-inf")  # dead beams
    lprobs[5, 0, :] += 50.0  # one beam holds every best candidate
    top, tokens, beams = beam_step(lprobs, scores, k)
    cand = (scores[:, :, None] + lprobs).view(b, r * V)
    ref_top, ref_idx = cand.topk(min(2 * k, r * V), dim=1)
    n = ref_top.size(1)
    torch.testing.assert_close(top[:, :n], ref_top)
    alive = ref_top.isfinite()  # random values: no ties among the finite ones
    assert torch.equal(tokens[:, :n][alive], (ref_idx % V)[alive])
    assert torch.equal(beams[:, :n][alive], (ref_idx // V)[alive])
    finite = top.isfinite()
    picked = scores.gather(1, beams) + lprobs[torch.arange(b)[:, None], beams, tokens]
    torch.testing.assert_close(picked[finite], top[finite])
