"""aiayn.explain and `aiayn explain`: attention maps that are distributions and respect the masks,
temperatures that sharpen and flatten, pictures that are drawn, and one-line errors."""

import pytest
import torch

from aiayn import cli
from aiayn.checkpoint import write_model
from aiayn.config import preset
from aiayn.data.batching import pad
from aiayn.data.corpus import multi30k
from aiayn.data.tokenizer import BPETokenizer, CharTokenizer
from aiayn.decode import greedy
from aiayn.explain import (TEMPERATURES, attention_weights, explain_lm, explain_translation, figure_names,
                           next_token_distributions, summary)
from aiayn.model import build_model, sinusoidal_encoding

SENTENCE = "A dog runs on the beach."


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def mt():
    """An untrained tiny translation model with a BPE vocabulary from a few hundred Multi30k pairs."""
    pairs = multi30k("train")[:300]
    tokenizer = BPETokenizer.train([x for pair in pairs for x in pair], 400)
    torch.manual_seed(0)
    return build_model(preset("tiny", vocab_size=tokenizer.vocab_size)).eval(), tokenizer


@pytest.fixture(scope="module")
def lm():
    """An untrained tiny character language model with learned positions."""
    tokenizer = CharTokenizer.train(["the quick brown fox jumps over the lazy dog."])
    torch.manual_seed(0)
    cfg = preset("tiny", vocab_size=tokenizer.vocab_size, n_encoder_layers=0, positional="learned", max_len=32)
    return build_model(cfg).eval(), tokenizer


@pytest.fixture(scope="module")
def mt_ex(mt):
    return explain_translation(*mt, SENTENCE, top_k=4, max_new_tokens=6)


@pytest.fixture(scope="module")
def lm_ex(lm):
    return explain_lm(*lm, "the lazy", top_k=4, max_new_tokens=5)


# ------------------------------------------------------------------------------------- tensors
def test_translation_shapes_and_tokens(mt, mt_ex):
    model, tokenizer = mt
    ids = tokenizer.encode(SENTENCE)
    out = greedy(model, torch.tensor([ids]), tokenizer.bos_id, tokenizer.eos_id)[0][:6]
    S, N, H, L = len(ids), len(mt_ex.out_pieces), model.cfg.n_heads, model.cfg.n_decoder_layers
    assert mt_ex.src_pieces == tokenizer.pieces(ids)
    assert mt_ex.out_pieces[:len(out)] == tokenizer.pieces(out)  # the greedy translation
    assert mt_ex.dec_pieces == ["<s>"] + mt_ex.out_pieces[:-1]   # reads <s> y1 .. y(n-1), produces y1 .. yn
    assert [w.shape for w in mt_ex.attention["encoder"]] == [(H, S, S)] * model.cfg.n_encoder_layers
    assert [w.shape for w in mt_ex.attention["decoder"]] == [(H, N, N)] * L
    assert [w.shape for w in mt_ex.attention["cross"]] == [(H, N, S)] * L
    assert torch.equal(mt_ex.alignment, mt_ex.attention["cross"][-1].mean(0))
    # each step's most likely token is the one greedy search produced
    assert tokenizer.pieces(mt_ex.top_ids[:, 0].tolist()) == mt_ex.out_pieces
    assert mt_ex.top_probs.shape == (len(TEMPERATURES), N, 4)


def test_lm_steps_continue_the_prompt(lm, lm_ex):
    model, tokenizer = lm
    P = len("the lazy")
    assert lm_ex.src_pieces == list("the lazy") and lm_ex.first_step == P - 1
    assert lm_ex.dec_pieces == list("the lazy") + lm_ex.out_pieces and len(lm_ex.out_pieces) == 5
    assert lm_ex.output == "".join(lm_ex.out_pieces)
    assert list(lm_ex.attention) == ["decoder"]
    assert lm_ex.attention["decoder"][0].shape == (model.cfg.n_heads, P + 5, P + 5)
    assert tokenizer.pieces(lm_ex.top_ids[:, 0].tolist()) == lm_ex.out_pieces
    assert torch.equal(lm_ex.alignment, lm_ex.attention["decoder"][-1].mean(0)[P - 1:P + 4])


def test_attention_rows_sum_to_one(mt_ex, lm_ex):
    for ex in (mt_ex, lm_ex):
        for kind, layers in ex.attention.items():
            for w in layers:
                torch.testing.assert_close(w.sum(-1), torch.ones(w.shape[:-1]), msg=kind)
        torch.testing.assert_close(ex.alignment.sum(-1), torch.ones(ex.alignment.size(0)))


def test_decoder_self_attention_is_lower_triangular(mt_ex, lm_ex):
    for ex in (mt_ex, lm_ex):
        for w in ex.attention["decoder"]:
            assert torch.all(w.triu(diagonal=1) == 0)
            assert torch.all(w.diagonal(dim1=-2, dim2=-1) > 0)


def test_padding_gets_zero_weight_and_changes_nothing(mt):
    model, tokenizer = mt
    short, long = tokenizer.encode("A dog."), tokenizer.encode(SENTENCE)
    src = pad([short, long])                                          # (2, S): row 0 right-padded
    dec = torch.tensor([[tokenizer.bos_id, 50, 60]] * 2)
    _, batch = attention_weights(model, src, dec)
    _, alone = attention_weights(model, torch.tensor([short]), dec[:1])
    n = len(short)
    for kind in ("encoder", "cross"):
        for w, w1 in zip(batch[kind], alone[kind]):
            assert torch.all(w[0, :, :, n:] == 0), kind               # no query looks at padding
            assert w[1].min() > 0                                      # the full row has none
            torch.testing.assert_close(w[0, :, :w1.size(2), :n], w1[0])  # padding changes no real weight


def test_lower_temperature_sharpens():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    ids, probs = next_token_distributions(logits, top_k=2, temperatures=(0.5, 1.0, 1.5))
    assert ids.tolist() == [[0, 1]]
    torch.testing.assert_close(probs[1], logits.softmax(-1)[:, :2])
    torch.testing.assert_close(probs[0], (logits / 0.5).softmax(-1)[:, :2])
    assert probs[0, 0, 0] > probs[1, 0, 0] > probs[2, 0, 0]           # top-1: more likely when colder
    assert probs[0, 0, 1] < probs[1, 0, 1] < probs[2, 0, 1]           # the runner-up: less likely


def test_temperatures_in_explanations(mt_ex, lm_ex):
    for ex in (mt_ex, lm_ex):
        top1 = ex.top_probs[:, :, 0]                                    # (n_temperatures, N)
        assert ex.temperatures == (0.5, 1.0, 1.5)
        assert torch.all(top1[0] > top1[1]) and torch.all(top1[1] > top1[2])


def test_positional_encoding_is_the_models(mt, mt_ex, lm, lm_ex):
    P = mt_ex.positional["encoder"].size(0)
    assert P >= len(mt_ex.src_pieces)
    assert torch.equal(mt_ex.positional["encoder"], sinusoidal_encoding(P, mt[0].cfg.d_model))
    assert torch.equal(mt_ex.positional["decoder"], mt_ex.positional["encoder"])
    assert lm_ex.positional_kind == "learned" and list(lm_ex.positional) == ["decoder"]
    assert torch.equal(lm_ex.positional["decoder"], lm[0].tgt_embed.learned.weight.detach())  # all 32 positions


def test_nothing_is_stored_in_the_model(mt):
    model, tokenizer = mt
    before = {n for n, _ in model.named_buffers()} | set(vars(model.decoder.layers[0].self_attn))
    explain_translation(model, tokenizer, "Two men.", max_new_tokens=2)
    assert before == {n for n, _ in model.named_buffers()} | set(vars(model.decoder.layers[0].self_attn))


def test_summary_text(mt_ex):
    text = summary(mt_ex)
    assert "source tokens (" in text and "output tokens (" in text and "translation:" in text
    assert text.count(" <- ") == len(mt_ex.out_pieces)                 # one line per output token
    assert "T = 0.5 / 1 / 1.5" in text


# --------------------------------------------------------------------------------------- input
@pytest.mark.parametrize("text", ["", "   "])
def test_empty_input_is_an_error(mt, lm, text):
    with pytest.raises(ValueError, match="nothing to explain"):
        explain_translation(*mt, text)
    with pytest.raises(ValueError, match="nothing to explain"):
        explain_lm(*lm, text)


def test_bad_arguments(mt, lm):
    with pytest.raises(ValueError, match="top_k"):
        explain_translation(*mt, SENTENCE, top_k=0)
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        explain_lm(*lm, "Zebra!")
    with pytest.raises(ValueError, match="max_new_tokens"):
        explain_lm(*lm, "the", max_new_tokens=32)


def test_a_long_prompt_keeps_its_end(lm):
    ex = explain_lm(*lm, "the quick brown fox jumps over the lazy dog", max_new_tokens=4)
    assert ex.truncated and len(ex.dec_pieces) == 32 and "".join(ex.src_pieces).endswith("lazy dog")


# -------------------------------------------------------------------------------- images + CLI
def _not_blank(path) -> bool:
    """Not one color: the pixels vary, in more than a handful of colors."""
    import matplotlib.image as mpimg
    import numpy as np

    rgb = (mpimg.imread(path)[..., :3] * 255).astype(np.uint32)  # (height, width, 3)
    colors = np.unique(rgb[..., 0] << 16 | rgb[..., 1] << 8 | rgb[..., 2])
    return rgb.std() > 10 and len(colors) > 20


@pytest.fixture(scope="module")
def saved(tmp_path_factory, mt, lm):
    root = tmp_path_factory.mktemp("models")
    for name, (model, tokenizer), task in (("mt", mt, "translation"), ("lm", lm, "lm")):
        (root / name).mkdir()
        write_model(root / name, model, tokenizer, task)
    return root


def test_cli_translation_writes_images_and_summary(saved, tmp_path, capsys):
    out = tmp_path / "pictures"
    assert cli.main(["explain", SENTENCE, "--model", str(saved / "mt"), "--out", str(out),
                     "--max-new-tokens", "4", "--top-k", "3"]) == 0
    stdout = capsys.readouterr().out
    names = figure_names("translation")
    assert sorted(p.name for p in out.iterdir()) == sorted(names)
    assert set(names) == {"positional_encoding.png", "attention_encoder.png", "attention_decoder.png",
                          "attention_cross.png", "alignment.png", "next_tokens.png"}
    assert all(_not_blank(out / n) for n in names)
    assert stdout.startswith(f"model: {saved / 'mt'} (translation)\n")
    assert "source tokens (" in stdout and "next-token distributions, top 3" in stdout
    assert f"wrote 6 images to {out}" in stdout


def test_cli_language_model(saved, tmp_path, capsys):
    assert cli.main(["explain", "the", "lazy", "--model", str(saved / "lm"), "--out", str(tmp_path),
                     "--max-new-tokens", "3"]) == 0
    stdout = capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(figure_names("lm"))
    assert all(_not_blank(tmp_path / n) for n in figure_names("lm"))
    assert "prompt tokens (8): t h e ␣ l a z y" in stdout


@pytest.mark.parametrize("argv, rc, message", [
    (["explain", ""], 2, "nothing to explain"),
    (["explain"], 2, "nothing to explain"),
    (["explain", "A dog.", "--model", "/no/such/model"], 1, "no such model or run directory"),
    (["explain", "Zebra!", "--model", "{saved}/lm"], 1, "outside the model's vocabulary"),
    (["explain", "A dog.", "--model", "{saved}/mt", "--top-k", "0"], 2, "--top-k must be from 1 to 50"),
])
def test_cli_bad_input_is_one_line(saved, tmp_path, capsys, argv, rc, message):
    argv = [a.format(saved=saved) for a in argv] + ["--out", str(tmp_path / "x")]
    assert cli.main(argv) == rc
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "x").exists()


def test_a_blank_image_is_noticed(tmp_path):
    from aiayn.explain import _pyplot

    plt = _pyplot()
    fig = plt.figure(figsize=(2, 2))
    fig.savefig(tmp_path / "blank.png")
    plt.close(fig)
    assert not _not_blank(tmp_path / "blank.png")
