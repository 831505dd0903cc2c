"""Importing MarianMTModel directories: logits, greedy and beam outputs equal to transformers'."""

from __future__ import annotations

import shutil

import pytest
import torch

from aiayn.data.batching import pad
from aiayn.decode import beam_search, greedy
from aiayn.fast.inference import inference_model
from aiayn.interop import InteropError, import_marian
from tests.interop import hf_models as H

transformers = pytest.importorskip("transformers")

VARIANTS = {  # name -> (MarianConfig changes, saved as safetensors); ReLU: test_export's round trips
    "swish-scaled-tied": ({}, True),
    "gelu-unscaled-untied-output": (dict(activation_function="gelu", scale_embedding=False, init_std=0.1,
                                         tie_word_embeddings=False), False),
    "gelu-tanh-nothing-shared": (dict(activation_function="gelu_new", share_encoder_decoder_embeddings=False,
                                      tie_word_embeddings=False, init_std=0.1), True),
}


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("marian-tok")
    return d, H.marian_tokenizer_files(d)


def _make(tmp_path_factory, tokenizer_dir, name):
    tok_dir, V = tokenizer_dir
    d = tmp_path_factory.mktemp(name)
    for f in tok_dir.iterdir():
        shutil.copy(f, d / f.name)
    changes, safetensors = VARIANTS[name]
    hf = H.marian(d, V, seed=len(name), **changes)
    if not safetensors:  # the older format: a pickle-free torch.load(weights_only=True) reads it
        torch.save(hf.state_dict(), d / "pytorch_model.bin")
        (d / "model.safetensors").unlink()
    return d, hf


@pytest.fixture(scope="module", params=list(VARIANTS))
def imported(request, tmp_path_factory, tokenizer_dir):
    d, hf = _make(tmp_path_factory, tokenizer_dir, request.param)
    model, tok, extra = import_marian(d)
    return d, hf, model, tok


def _sources(tok, n=6):
    ids = [tok.encode(s) for s in H.lines("val.en", n)]
    return pad(ids, tok.pad_id)


def test_logits_equal_on_padded_batches(imported):
    d, hf, model, tok = imported
    src = _sources(tok)
    tgt = pad([[tok.bos_id] + tok.encode(s)[:-1] for s in H.lines("val.de", 6)], tok.pad_id)
    with torch.no_grad():
        ref = hf(input_ids=src, attention_mask=(src != tok.pad_id).long(), decoder_input_ids=tgt).logits
        ours = model(src, tgt)
    real = torch.ones_like(tgt, dtype=torch.bool)
    real[:, 1:] = tgt[:, 1:] != tok.pad_id
    assert (ours - ref)[real].abs().max() < 1e-4
    assert (src == tok.pad_id).any()  # the batch is padded


def _hf_generate(hf, src, pad_id, **kw):
    out = hf.generate(input_ids=src, attention_mask=(src != pad_id).long(), bad_words_ids=[[pad_id]],
                      max_new_tokens=120, **kw)
    results = []
    for row in out[:, 1:].tolist():  # without the decoder start; cut at EOS (then padding)
        results.append(row[:row.index(hf.config.eos_token_id)] if hf.config.eos_token_id in row else row)
    return results


def test_greedy_and_beam_equal_generate(imported):
    """With the plain model and its fast inference copy (oneDNN linears, C decoding kernels).
    aiayn's alpha=0 and HF's length_penalty=0 both rank by log-probability; early_stopping=True is
    aiayn's (fairseq's) rule: a sentence ends once it holds beam-size finished hypotheses."""
    d, hf, model, tok = imported
    src = _sources(tok)
    ref_greedy = _hf_generate(hf, src, tok.pad_id, num_beams=1, do_sample=False)
    ref_beam = _hf_generate(hf, src, tok.pad_id, num_beams=4, length_penalty=0.0, early_stopping=True,
                            do_sample=False)
    limits = (src != tok.pad_id).sum(1) + 50  # aiayn: source length + 50; HF: 120
    for precision in ("plain", "fp32"):
        fast = inference_model(model, precision)
        ours_greedy = greedy(fast, src, tok.bos_id, tok.eos_id)
        for ours, ref, limit in zip(ours_greedy, ref_greedy, limits.tolist()):
            assert ours == (ref[:limit] if len(ours) == limit else ref), (precision, len(ours), len(ref), limit)
        ours_beam = [h[0][0] for h in beam_search(fast, src, tok.bos_id, tok.eos_id, beam_size=4, alpha=0.0)]
        assert ours_beam == ref_beam, precision
    assert 2 <= max(map(len, ref_beam)) < 30  # ended by EOS (hf_models.marian), not by a length limit


def test_translate_matches_hf_tokenizer_and_generate(imported):
    from transformers import MarianTokenizer

    from aiayn.translate import translate

    d, hf, model, tok = imported
    sentences = H.lines("val.en", 6)
    ht = MarianTokenizer.from_pretrained(d)
    batch = ht(sentences, return_tensors="pt", padding=True)
    assert batch.input_ids.tolist() == _sources(tok, 6).tolist()
    out = hf.generate(**batch, num_beams=4, length_penalty=0.0, early_stopping=True, max_new_tokens=100,
                      bad_words_ids=[[tok.pad_id]])
    # (transformers decodes with the source's sentencepiece model unless told otherwise; aiayn, as
    # Marian itself, joins target pieces with the target's)
    ref = ht.batch_decode(out, skip_special_tokens=True, use_source_tokenizer=False)
    assert translate(model, tok, sentences, beam=4, alpha=0.0) == ref
    assert any(ref)


def test_reimport_is_the_same_model(imported, tmp_path):
    """import -> export -> import gives back the same weights."""
    from aiayn.interop import export_marian

    d, hf, model, tok = imported
    export_marian(model, tok, tmp_path, {"src": "en", "tgt": "de"})
    again, tok2, _ = import_marian(tmp_path)
    assert again.cfg == model.cfg
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name
    assert tok2.encode("A dog runs.") == tok.encode("A dog runs.")


def test_unsupported_variants_and_broken_files(tmp_path_factory, tokenizer_dir, tmp_path):
    d, _ = _make(tmp_path_factory, tokenizer_dir, "swish-scaled-tied")

    def broken(edit):
        return H.import_error(import_marian, d, tmp_path, edit)

    config = H.config_edit

    assert "not marian" in broken(config(model_type="bart"))
    assert "normalize_before" in broken(config(normalize_before=True))
    assert "activation 'tanh'" in broken(config(activation_function="tanh"))
    assert "d_ff" in broken(config(decoder_ffn_dim=128))
    assert "not a whole number: 16.5" in broken(config(d_model=16.5))  # (it was truncated to 16)
    assert "max_len must be positive" in broken(config(max_position_embeddings=0))  # (it imported, then failed)
    assert "vocab.json has" in broken(config(vocab_size=500, decoder_vocab_size=500))
    assert "missing tokenizer file source.spm" in broken(lambda b: (b / "source.spm").unlink())
    assert "no weights" in broken(lambda b: (b / "model.safetensors").unlink())
    assert "corrupt weights" in broken(lambda b: (b / "model.safetensors").write_bytes(b"\x00" * 100))
    assert "corrupt config.json" in broken(lambda b: (b / "config.json").write_text("{"))
    assert "no config.json" in broken(lambda b: (b / "config.json").unlink())
    with pytest.raises(InteropError, match="no such directory"):
        import_marian(tmp_path / "nowhere")


def test_fine_tuning_loss_equals_transformers(imported):
    """The training batches of an imported model (its pad, decoder-start and EOS ids; targets cut by
    target.spm) give transformers' loss for the same pairs (labels from text_target=...)."""
    from transformers import MarianTokenizer

    from aiayn.tasks.translation import TranslationTask, translation_loss

    d, hf, model, tok = imported
    pairs = list(zip(H.lines("val.en", 4), H.lines("val.de", 4)))
    task = TranslationTask(tok, pairs, pairs, max_tokens=4096, max_len=128, eval_bleu=False)
    batch = task._collate(task.train)
    ht = MarianTokenizer.from_pretrained(d)
    ref = ht([s for s, _ in pairs], text_target=[t for _, t in pairs], return_tensors="pt", padding=True)
    labels = ref["labels"].masked_fill(ref["labels"] == tok.pad_id, -100)
    assert batch.src.tolist() == ref.input_ids.tolist()
    assert batch.tgt_out.masked_fill(batch.tgt_out == tok.pad_id, -100).tolist() == labels.tolist()
    with torch.no_grad():
        hf_loss = hf(input_ids=ref.input_ids, attention_mask=ref.attention_mask, labels=labels).loss
        ours = translation_loss(model, batch)
    assert abs(ours.item() - hf_loss.item()) < 1e-5
