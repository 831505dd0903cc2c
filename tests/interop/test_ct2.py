"""aiayn models -> CTranslate2 directories (aiayn.interop.ct2): CT2 computes aiayn's log-probabilities
and finds aiayn's greedy and beam outputs, for the shipped models and each ModelConfig variant."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from aiayn.checkpoint import load_model_dir
from aiayn.cli import main
from aiayn.config import ModelConfig
from aiayn.data.batching import pad
from aiayn.data.corpus import ASSETS, multi30k
from aiayn.decode import beam_search, greedy
from aiayn.decode.greedy import max_output_lengths
from aiayn.interop import InteropError, export_ct2
from aiayn.interop.ct2 import build_spec, vocabularies
from aiayn.model import build_model
from aiayn.model.layers import sinusoidal_encoding
from tests.interop import hf_models as H

ctranslate2 = pytest.importorskip("ctranslate2")
EN_DE, CHAR_LM = ASSETS / "models" / "en-de", ASSETS / "models" / "shakespeare-char"
# aiayn ends a sentence once it holds beam-size finished hypotheses; CT2 does so only under a length
# penalty (at 0 it stops when the best beam ends): a penalty this small ranks as 0 does
NO_PENALTY = 1e-9


@pytest.fixture(scope="module")
def bpe():
    from aiayn.data.tokenizer import BPETokenizer

    return BPETokenizer.train(H.lines("train.en") + H.lines("train.de"), 400)


def tiny_translation(tok, **changes):
    """A random model whose every weight matters: LayerNorms and biases drawn too."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=tok.vocab_size, d_model=32, n_heads=4, d_ff=64, n_encoder_layers=2,
                                    n_decoder_layers=2, max_len=96, dropout=0.0, **changes)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias") or "learned" in name:
                p.normal_(1.0 if name.endswith("norm.weight") else 0.0, 0.3)
    return model


def aiayn_log_probs(model, tok, src: list[int], tgt: list[int]) -> torch.Tensor:
    """log P(y_t | y_<t, x) of tgt + </s>, pad banned as the export bans it (before the softmax)."""
    with torch.no_grad():
        logits = model(torch.tensor([src]), torch.tensor([[tok.bos_id] + tgt]))[0]  # (T + 1, V)
    logits[:, model.cfg.pad_id] = float("-inf")
    return logits.log_softmax(-1).gather(1, torch.tensor(tgt + [tok.eos_id])[:, None])[:, 0]


def assert_translator_is_aiayn(model, tok, out, sources: list[str], targets: list[str], beam: bool = True):
    """CT2's scores of the targets are aiayn's; its greedy (and beam-4) outputs are aiayn's, token for token."""
    tr = ctranslate2.Translator(str(out), device="cpu", intra_threads=1)
    src = [tok.encode(s) for s in sources]
    tgt = [tok.encode(t) for t in targets]
    scored = tr.score_batch([tok.pieces(s) for s in src], [tok.pieces(t) for t in tgt])
    for s, t, res in zip(src, tgt, scored):
        ref = aiayn_log_probs(model, tok, s, t)
        assert res.tokens == tok.pieces(t + [tok.eos_id])
        assert (torch.tensor(res.log_probs) - ref).abs().max() < 1e-4
    batch = pad(src, tok.pad_id)
    limits = max_output_lengths(batch, tok.pad_id, 50, model.cfg.max_len).tolist()  # aiayn's §6.1 limits
    ours = greedy(model, batch, tok.bos_id, tok.eos_id)
    theirs = [tr.translate_batch([tok.pieces(s)], beam_size=1, max_decoding_length=n, min_decoding_length=0)[0]
              for s, n in zip(src, limits)]
    assert [r.hypotheses[0] for r in theirs] == [tok.pieces(o) for o in ours]
    if beam:
        ours = beam_search(model, batch, tok.bos_id, tok.eos_id, beam_size=4, alpha=0.0)
        theirs = tr.translate_batch([tok.pieces(s) for s in src], beam_size=4, max_decoding_length=max(limits),
                                    min_decoding_length=0, length_penalty=NO_PENALTY, return_scores=True)
        assert [r.hypotheses[0] for r in theirs] == [tok.pieces(o[0][0]) for o in ours]
        # the hypothesis' score: its log-probability (aiayn's own score leaves pad's share in the softmax)
        for s, r, o in zip(src, theirs, ours):
            assert abs(r.scores[0] - float(aiayn_log_probs(model, tok, s, o[0][0]).sum())) < 1e-3


# ------------------------------------------------------------------------------ the subtle parts
@pytest.mark.parametrize("layout", ["sinusoidal", "sinusoidal-split"])
def test_position_table_is_written_in_aiayns_layout(bpe, layout):
    """CT2's built-in sinusoids are not §3.5's (positions from 1, other frequencies, sines first):
    the table is written as weights, in the model's own layout."""
    model = tiny_translation(bpe, positional=layout)
    spec = build_spec(model, bpe, "translation")
    want = sinusoidal_encoding(96, 32, split=layout == "sinusoidal-split")
    for stack in (spec.encoder, spec.decoder):
        assert torch.equal(stack.position_encodings.encodings, want)
    assert want[0, 1] == (1.0 if layout == "sinusoidal" else 0.0)  # position 0: cos 0 = 1 at dimension 1


def test_decoder_starts_from_aiayns_learned_bos(bpe, tmp_path):
    model = tiny_translation(bpe)
    export_ct2(model, bpe, "translation", tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["decoder_start_token"] == "<s>" and config["eos_token"] == "</s>"
    assert not config["add_source_eos"] and not config["add_source_bos"]  # aiayn's sources: pieces only
    assert not build_spec(model, bpe, "translation").decoder.start_from_zero_embedding
    assert (tmp_path / "tokenizer.model").read_bytes() == bpe.proto  # the tokenizer beside the model


@pytest.mark.parametrize("changes", [
    dict(),                                                       # the paper: post-norm, relu, tied
    dict(norm_first=True, activation="gelu"),                     # pre-norm: a final LayerNorm per stack
    dict(positional="sinusoidal-split", activation="swish", tie_embeddings=False, scale_embedding=False,
         output_bias=True),                                       # Marian's departures
    dict(positional="learned", activation="gelu-tanh", norm_first=True, norm_eps=1e-6),
])
def test_variants_score_and_decode_as_aiayn(bpe, tmp_path, changes):
    model = tiny_translation(bpe, **changes)
    with torch.no_grad():
        if model.cfg.output_bias:  # and sentences that end: beam search compared before any length limit
            model.generator.bias[bpe.eos_id] += 4.0
    export_ct2(model, bpe, "translation", tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["layer_norm_epsilon"] == pytest.approx(model.cfg.norm_eps)
    assert_translator_is_aiayn(model, bpe, tmp_path, H.lines("val.en", 4), H.lines("val.de", 4),
                               beam=model.cfg.output_bias)


def test_shipped_translation_model(tmp_path):
    """The shipped EN->DE model on 50 test sentences: scores, greedy and beam 4 (alpha 0)."""
    model, tok, task, _ = load_model_dir(EN_DE)
    assert export_ct2(model, tok, task, tmp_path) == "TransformerSpec"
    pairs = multi30k("test_2016_flickr", "en", "de")[:50]
    assert_translator_is_aiayn(model, tok, tmp_path, [s for s, _ in pairs], [t for _, t in pairs])


def test_quantized_export_translates(tmp_path):
    model, tok, task, _ = load_model_dir(EN_DE)
    export_ct2(model, tok, task, tmp_path, quantization="int8")
    tr = ctranslate2.Translator(str(tmp_path), device="cpu", compute_type="int8", intra_threads=1)
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))  # as docs/INTEROP.md
    out = tr.translate_batch([sp.encode("A dog runs in the park.", out_type=str)], beam_size=4)
    assert "Hund" in sp.decode(out[0].hypotheses[0])


def test_imported_opus_mt_model(tmp_path):
    """An imported OPUS-MT model (Marian tokenizer: <pad> last and the decoder's start, sources ending
    with </s>, which CT2 appends itself): CT2 scores and decodes its sources' pieces as aiayn does."""
    from aiayn.interop import import_marian

    d = tmp_path / "opus"
    H.marian(d, H.marian_tokenizer_files(d))
    model, tok, _ = import_marian(d)
    out = tmp_path / "ct2"
    out.mkdir()
    export_ct2(model, tok, "translation", out)
    config = json.loads((out / "config.json").read_text())
    assert config["add_source_eos"] and config["decoder_start_token"] == "<pad>"
    assert {"source.spm", "target.spm"} <= {p.name for p in out.iterdir()}
    tr = ctranslate2.Translator(str(out), device="cpu", intra_threads=1)
    for s, t in zip(H.lines("val.en", 3), H.lines("val.de", 3)):
        src, tgt = tok.encode(s), tok.encode_target_batch([t])[0]
        res = tr.score_batch([tok.source_sp.encode(s, out_type=str)], [tok.pieces(tgt)])[0]
        assert (torch.tensor(res.log_probs) - aiayn_log_probs(model, tok, src, tgt)).abs().max() < 1e-4
        ours = greedy(model, torch.tensor([src]), tok.bos_id, tok.eos_id)[0]
        theirs = tr.translate_batch([tok.source_sp.encode(s, out_type=str)], beam_size=1, min_decoding_length=0,
                                    max_decoding_length=len(src) + 50)[0].hypotheses[0]
        assert theirs == tok.pieces(ours)


# --------------------------------------------------------------------------- language models
def test_language_models_score_and_generate_as_aiayn(tmp_path):
    """The shipped character LM (pre-norm, GELU, learned positions) and a post-norm sinusoidal one."""
    from aiayn.decode import generate

    char_lm, tok, _, _ = load_model_dir(CHAR_LM)
    torch.manual_seed(0)
    post = build_model(ModelConfig(vocab_size=tok.vocab_size, d_model=32, n_heads=4, d_ff=64, n_encoder_layers=0,
                                   n_decoder_layers=2, max_len=64, dropout=0.0, tie_embeddings=False,
                                   output_bias=True)).eval()
    text = "ROMEO:\nWhat light through yonder window"
    ids = tok.encode(text)
    for i, model in enumerate((char_lm, post)):
        out = tmp_path / str(i)
        out.mkdir()
        assert export_ct2(model, tok, "lm", out) == "TransformerDecoderSpec"
        gen = ctranslate2.Generator(str(out), device="cpu", intra_threads=1)
        with torch.no_grad():
            ref = model(torch.tensor([ids]))[0].log_softmax(-1)[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
        assert (torch.tensor(gen.score_batch([tok.pieces(ids)])[0].log_probs) - ref).abs().max() < 1e-4
        ours = [t[0] for t in generate(model, ids, 20, temperature=0.0)]
        theirs = gen.generate_batch([tok.pieces(ids)], max_length=20, sampling_topk=1, end_token=[],
                                    include_prompt_in_result=False)[0].sequences[0]
        assert theirs == tok.pieces(ours)


# ------------------------------------------------------------------------------------- refusals
def test_refusals(bpe, tmp_path, monkeypatch):
    model = tiny_translation(bpe)
    with pytest.raises(InteropError, match="quantization 'int3'"):
        export_ct2(model, bpe, "translation", tmp_path, quantization="int3")
    with pytest.raises(InteropError, match="a vit model has no CTranslate2 export"):
        export_ct2(model, bpe, "vit", tmp_path)

    class Twice:  # a vocabulary CT2 cannot index: two ids with one text
        vocab_size = bpe.vocab_size

        def pieces(self, ids):
            return ["<x>" if i in (5, 6) else f"t{i}" for i in ids]
    with pytest.raises(InteropError, match="token '<x>' twice"):
        vocabularies(Twice(), model.cfg)
    for name in ("ctranslate2", "ctranslate2.specs"):  # not installed
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(InteropError, match="pip install ctranslate2"):
        export_ct2(model, bpe, "translation", tmp_path)
    assert not any(tmp_path.iterdir())


def test_cli_export_ct2(tmp_path, capsys):
    from aiayn.checkpoint import write_model
    from aiayn.config import ViTConfig
    from aiayn.data.images import Labels
    from aiayn.model.vit import VisionTransformer

    out = tmp_path / "ct2"
    assert main(["export", "ct2", str(EN_DE), "--out", str(out), "--quantization", "int8"]) == 0
    assert "TransformerSpec (int8)" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.bin", "shared_vocabulary.json",
                                                     "tokenizer.model"]
    vit = tmp_path / "vit"
    vit.mkdir()
    cfg = ViTConfig(d_model=16, n_heads=2, d_ff=32, n_layers=1)
    write_model(vit, VisionTransformer(cfg), Labels([str(i) for i in range(10)]), "vit")
    bad = [(["export", "ct2", str(EN_DE), "--out", str(out)], "not an empty directory"),
           (["export", "ct2", str(tmp_path / "none"), "--out", str(tmp_path / "a")], "no such model"),
           (["export", "ct2", str(vit), "--out", str(tmp_path / "b")], "no CTranslate2 export"),
           (["export", "ct2", str(EN_DE), "--out", str(tmp_path / "c"), "--quantization", "int3"], "int3"),
           (["export", "hf", str(EN_DE), "--out", str(tmp_path / "d"), "--quantization", "int8"], "export ct2")]
    for argv, fragment in bad:
        assert main(argv) != 0
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("aiayn: error: ") and fragment in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct2", "vit"]  # nothing half-written
