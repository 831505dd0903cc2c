"""aiayn models -> HF directories that transformers loads: equal logits; the CLI's import and export."""

from __future__ import annotations

import pytest
import torch

from aiayn.checkpoint import load_model_dir
from aiayn.cli import main
from aiayn.config import ModelConfig
from aiayn.data.batching import pad
from aiayn.data.corpus import ASSETS
from aiayn.interop import InteropError, export_hf, import_marian
from aiayn.model import build_model
from tests.interop import hf_models as H

transformers = pytest.importorskip("transformers")
EN_DE, CHAR_LM = ASSETS / "models" / "en-de", ASSETS / "models" / "shakespeare-char"


def _translation_logits_equal(model, tok, out):
    from transformers import MarianMTModel

    hf = MarianMTModel.from_pretrained(out).eval()
    src = pad([tok.encode(s) for s in H.lines("val.en", 4)], tok.pad_id)
    tgt = pad([[tok.bos_id] + tok.encode(s) for s in H.lines("val.de", 4)], tok.pad_id)
    with torch.no_grad():
        ref = hf(input_ids=src, attention_mask=(src != tok.pad_id).long(), decoder_input_ids=tgt).logits
        ours = model(src, tgt)
    real = tgt != tok.pad_id
    assert (ours - ref)[real].abs().max() < 1e-4
    return hf


def test_shipped_translation_model_loads_in_transformers(tmp_path):
    """The shipped EN->DE model (interleaved sinusoids: exported with its dimensions permuted)."""
    from transformers import MarianTokenizer

    model, tok, task, extra = load_model_dir(EN_DE)
    assert export_hf(model, tok, task, tmp_path, extra) == "MarianMTModel"
    hf = _translation_logits_equal(model, tok, tmp_path)
    ht = MarianTokenizer.from_pretrained(tmp_path)
    sentence = "A man in an orange hat starring at something."
    assert ht(sentence).input_ids == tok.encode(sentence) + [tok.eos_id]  # Marian ends a source with EOS
    out = hf.generate(torch.tensor([tok.encode(sentence)]), num_beams=1, do_sample=False, max_new_tokens=40)
    from aiayn.translate import translate

    assert ht.decode(out[0], skip_special_tokens=True) == translate(model, tok, [sentence])[0]


@pytest.mark.parametrize("changes", [dict(tie_embeddings=False, activation="gelu-tanh", scale_embedding=False,
                                          output_bias=True),
                                     dict(activation="swish", positional="sinusoidal-split")])
def test_translation_variants_round_trip(tmp_path, changes):
    from aiayn.data.tokenizer import BPETokenizer

    tok = BPETokenizer.train(H.lines("train.en") + H.lines("train.de"), 400)
    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=400, d_model=32, n_heads=4, d_ff=64, n_encoder_layers=2,
                                    n_decoder_layers=2, max_len=128, **changes)).eval()
    with torch.no_grad():
        if model.cfg.output_bias:
            model.generator.bias.normal_()
    export_hf(model, tok, "translation", tmp_path, {})
    _translation_logits_equal(model, tok, tmp_path)
    again, _, _ = import_marian(tmp_path)  # and back
    src = pad([tok.encode(s) for s in H.lines("val.en", 3)])
    with torch.no_grad():
        assert (again(src, src) - model(src, src)).abs().max() < 1e-4


def test_lm_export_gpt2(tmp_path):
    """The shipped character LM (scaled, tied embeddings: folded into wte and ln_f), and an untied
    sinusoidal one (its table becomes wpe)."""
    from transformers import GPT2LMHeadModel

    for i, model in enumerate([load_model_dir(CHAR_LM)[0],
                               build_model(ModelConfig(vocab_size=70, d_model=32, n_heads=4, d_ff=64,
                                                       n_encoder_layers=0, n_decoder_layers=2, max_len=64,
                                                       norm_first=True, tie_embeddings=False)).eval()]):
        tok = load_model_dir(CHAR_LM)[1]
        out = tmp_path / str(i)
        out.mkdir()
        assert export_hf(model, tok, "lm", out) == "GPT2LMHeadModel"
        assert (out / "aiayn-tokenizer" / "tokenizer.json").is_file()  # characters: aiayn's own tokenizer
        hf = GPT2LMHeadModel.from_pretrained(out).eval()
        x = torch.tensor([tok.encode("ROMEO:\nWhat light through yonder window breaks?")])
        with torch.no_grad():
            assert (hf(x).logits - model(x)).abs().max() < 1e-4


def test_export_refusals(tmp_path):
    tok = load_model_dir(CHAR_LM)[1]
    cfg = ModelConfig(vocab_size=70, d_model=32, n_heads=4, d_ff=64, n_encoder_layers=0, n_decoder_layers=1,
                      max_len=16)
    with pytest.raises(InteropError, match="post-norm"):
        export_hf(build_model(cfg), tok, "lm", tmp_path)
    enc = build_model(cfg.replace(n_encoder_layers=1, positional="learned"))
    with pytest.raises(InteropError, match="sinusoidal"):
        export_hf(enc, tok, "translation", tmp_path, {})
    with pytest.raises(InteropError, match="pre-norm"):
        export_hf(build_model(cfg.replace(n_encoder_layers=1, norm_first=True)), tok, "translation", tmp_path, {})


def test_cli_import_translate_export(tmp_path, capsys):
    d = tmp_path / "opus"
    V = H.marian_tokenizer_files(d)
    H.marian(d, V)
    assert main(["import", "marian", str(d), "--out", str(tmp_path / "m")]) == 0
    assert main(["translate", "--model", str(tmp_path / "m"), "--beam", "2", "A dog runs."]) == 0
    assert main(["explain", "--model", str(tmp_path / "m"), "--out", str(tmp_path / "x"), "A dog."]) == 0
    assert main(["export", "hf", str(tmp_path / "m"), "--out", str(tmp_path / "hf")]) == 0
    for name, lang, n in (("tr", "train", 32), ("va", "val", 8)):  # fine-tuning the imported model
        for side in ("en", "de"):
            (tmp_path / f"{name}.{side}").write_text("\n".join(H.lines(f"{lang}.{side}", n)) + "\n")
    assert main(["train", "translation", "--init-from", str(tmp_path / "m"), "--out", str(tmp_path / "run"),
                 f"--train-src={tmp_path / 'tr.en'}", f"--train-tgt={tmp_path / 'tr.de'}",
                 f"--val-src={tmp_path / 'va.en'}", f"--val-tgt={tmp_path / 'va.de'}",
                 "--max-steps", "2", "--eval-every", "2", "--precision", "fp32", "--quiet"]) == 0
    assert main(["translate", "--model", str(tmp_path / "run"), "A dog runs."]) == 0
    capsys.readouterr()
    # errors: one line each, nothing half-written
    assert main(["import", "marian", str(d), "--out", str(tmp_path / "m")]) == 1  # exists
    assert main(["import", "gpt2", str(d), "--out", str(tmp_path / "g")]) == 1  # a marian directory
    assert main(["import", "marian", str(tmp_path / "none"), "--out", str(tmp_path / "g")]) == 1
    (d / "vocab.json").unlink()
    assert main(["import", "marian", str(d), "--out", str(tmp_path / "g")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 4 and all(line.startswith("aiayn: error: ") for line in err), err
    assert "not an empty directory" in err[0] and "not gpt2" in err[1] and "no such directory" in err[2]
    assert "missing tokenizer file vocab.json" in err[3]
    assert not (tmp_path / "g").exists()


def test_cli_import_gpt2_generate(tmp_path, capsys):
    d = tmp_path / "gpt2"
    H.gpt2(d, H.gpt2_tokenizer_files(d))
    assert main(["import", "gpt2", str(d), "--out", str(tmp_path / "m")]) == 0
    assert main(["generate", "--model", str(tmp_path / "m"), "--prompt", "ROMEO:", "--max-new-tokens", "5",
                 "--temperature", "0"]) == 0
    out = capsys.readouterr().out
    assert "ROMEO:" in out
    model, tok, task, _ = load_model_dir(tmp_path / "m")
    assert task == "lm" and type(tok).__name__ == "ByteBPETokenizer"


def test_cli_exports_the_shipped_lm_with_its_tokenizer_folder(tmp_path, capsys):
    """The character LM's export holds a folder (aiayn-tokenizer/): the atomic write syncs it too."""
    from transformers import GPT2LMHeadModel

    out = tmp_path / "lm-hf"
    assert main(["export", "hf", str(CHAR_LM), "--out", str(out)]) == 0
    assert "GPT2LMHeadModel" in capsys.readouterr().out
    assert (out / "aiayn-tokenizer" / "tokenizer.json").is_file() and not (tmp_path / "lm-hf.tmp").exists()
    GPT2LMHeadModel.from_pretrained(out)
