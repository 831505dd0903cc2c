"""Greedy search: equal to a from-scratch full-forward greedy, batch-independent, shrinking its batch."""

import pytest
import torch

from aiayn.config import preset
from aiayn.decode import greedy, max_output_lengths
from aiayn.model import Transformer

pytestmark = pytest.mark.usefixtures("both_paths")  # tests/conftest.py

PAD, BOS = 0, 1


def tiny_model(seed: int = 0, **changes) -> Transformer:
    torch.manual_seed(seed)
    # untied embeddings: a random tied model mostly copies its input token, which would test little
    cfg = preset("tiny", vocab_size=16, tie_embeddings=False, **changes)
    return Transformer(cfg).eval()


def sources() -> torch.Tensor:
    torch.manual_seed(1)
    src = torch.randint(3, 16, (6, 8))
    for row, n in enumerate([8, 4, 2, 8, 5, 7]):
        src[row, n:] = PAD
    return src


def reference_greedy(model, src_row: torch.Tensor, eos_id: int, limit: int) -> list[int]:
    """One unpadded sentence, the whole decoder re-run on the full prefix at every step."""
    src = src_row[src_row != PAD][None]  # (1, S)
    out = [BOS]
    with torch.no_grad():
        while len(out) - 1 < limit:
            logits = model(src, torch.tensor([out]))[0, -1]
            logits[PAD] = float("-inf")
            token = int(logits.argmax())
            if token == eos_id:
                break
            out.append(token)
    return out[1:]


def pick_eos(model, src, max_extra) -> int:
    """The token that, as EOS, makes greedy outputs the most varied in length (so that sentences end
    at different steps)."""
    probe = greedy(model, src, BOS, eos_id=-1, max_extra=max_extra)  # -1: never ends

    def n_lengths(tok):
        return len({out.index(tok) if tok in out else len(out) for out in probe})

    return max(sorted(set(sum(probe, []))), key=n_lengths)


def test_max_output_lengths_follow_source_length_and_model_cap():
    src = torch.tensor([[5, 6, 7, PAD], [5, PAD, PAD, PAD], [5, 6, 7, 8]])
    assert max_output_lengths(src, PAD, 50, 512).tolist() == [53, 51, 54]
    assert max_output_lengths(src, PAD, 2, 5).tolist() == [4, 3, 4]  # |y| + 1 <= max_len
    with pytest.raises(ValueError, match="max_extra"):
        max_output_lengths(src, PAD, -1, 512)


def test_greedy_equals_full_forward_reference():
    model, src = tiny_model(), sources()
    eos = pick_eos(model, src, max_extra=6)
    out = greedy(model, src, BOS, eos, max_extra=6)
    limits = max_output_lengths(src, PAD, 6, model.cfg.max_len).tolist()
    expected = [reference_greedy(model, row, eos, lim) for row, lim in zip(src, limits)]
    assert out == expected
    lengths = {len(o) for o in out}
    assert len(lengths) > 2  # sentences really ended at different steps
    assert any(len(o) < lim for o, lim in zip(out, limits))  # and some by EOS, not by the limit
    assert all(eos not in o and PAD not in o for o in out)


def test_batched_equals_one_sentence_at_a_time():
    model, src = tiny_model(seed=2), sources()
    eos = pick_eos(model, src, max_extra=6)
    batched = greedy(model, src, BOS, eos, max_extra=6)
    alone = [greedy(model, row[row != PAD][None], BOS, eos, max_extra=6)[0] for row in src]
    assert batched == alone
    assert len({len(o) for o in batched}) > 2


def test_finished_sentences_leave_the_batch():
    model, src = tiny_model(), sources()
    eos = pick_eos(model, src, max_extra=6)
    sizes = []
    step = model.decode_step

    def recording_step(tokens, cache):
        sizes.append(tokens.size(0))
        return step(tokens, cache)

    model.decode_step = recording_step
    out = greedy(model, src, BOS, eos, max_extra=6)
    del model.decode_step
    assert out == greedy(model, src, BOS, eos, max_extra=6)  # recording changed nothing
    assert sizes[0] == len(src) and sizes[-1] < sizes[0]
    # step t feeds exactly the sentences still going: those that produce a token or EOS at step t
    limits = max_output_lengths(src, PAD, 6, model.cfg.max_len).tolist()
    expected = [sum(t <= len(o) if len(o) < lim else t < len(o) for o, lim in zip(out, limits))
                for t in range(len(sizes))]
    assert sizes == expected


def test_length_is_capped_by_the_model_max_len():
    model = tiny_model(max_len=10)
    src = sources()
    out = greedy(model, src, BOS, eos_id=-1, max_extra=50)  # never ends: every output hits its cap
    assert [len(o) for o in out] == [9] * len(src)
    assert out == [reference_greedy(model, row, -1, 9) for row in src]


def test_training_mode_is_restored_and_dropout_off():
    model = tiny_model(dropout=0.5)
    src = sources()
    expected = greedy(model, src, BOS, 5, max_extra=4)
    model.train()
    assert greedy(model, src, BOS, 5, max_extra=4) == expected
    assert model.training


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("V", [8000, 8001, 1000, 130, 100, 7])
def test_row_argmax_equals_torch_argmax_with_ties_and_dead_entries(V, dtype):
    from aiayn.decode.greedy import row_argmax

    g = torch.Generator().manual_seed(V)
    x = torch.randn(37, V, generator=g).to(dtype)  # bf16: many more ties
    x[3] = float("-inf")  # a row with every entry banned: index 0, as torch.argmax
    x[4, :] = float("-inf")
    x[4, V - 1] = 0.0  # only the last (partial-block) entry alive
    x[5, : V // 2] = float("-inf")
    x[6] = 1.0  # all tied: the first index
    x[7, [V - 1, V // 2, 2]] = 9.0  # tied maxima in different blocks: the first
    x[8] = torch.randint(0, 3, (V,), generator=g).to(dtype)  # many ties within blocks
    assert torch.equal(row_argmax(x), x.argmax(-1))
    assert row_argmax(x)[7] == 2


@pytest.mark.parametrize("precision", ["fp32", pytest.param("bf16", marks=pytest.mark.bf16), "int8"])
@pytest.mark.parametrize("min_len, max_extra", [(0, 5), (3, 5), (0, 0)])
def test_one_sentence_decoded_in_one_call_gives_the_references_tokens(precision, min_len, max_extra, every_kernel,
                                                                      record, monkeypatch):
    """An inference copy decodes one sentence in one kernel call (kernels.greedy: every step in C): the
    tokens of the Python loop over the same copy's kernels, with a minimum length, outputs cut at
    the length limit (max_extra 0), sources with padding; an EOS outside the vocabulary (-1: never
    ends) is the Python loop's."""
    from aiayn import capability
    from aiayn.fast.inference import inference_model

    if precision == "int8" and not capability.probe().int8:
        pytest.skip("no int8 engine here")
    model = tiny_model(seed=3)
    eos = pick_eos(model, sources(), 5)
    fast = inference_model(model, precision)
    found = record(every_kernel, "greedy")
    for row in sources():
        ours = greedy(fast, row[None], BOS, eos, max_extra=max_extra, min_len=min_len)
        with monkeypatch.context() as m:  # the Python loop (aiayn.decode.greedy), the same steps' kernels
            m.setattr(type(fast), "greedy_one", lambda *args: None)
            assert ours == greedy(fast, row[None], BOS, eos, max_extra=max_extra, min_len=min_len)
    assert len(found) == 6 and all(f is not None for f in found)  # (it ran, and was not declined)
    never_ends = greedy(fast, sources()[:1], BOS, -1, max_extra=3)
    assert found[-1] is None and len(never_ends[0]) == 8 + 3  # (declined: EOS outside the logits)
