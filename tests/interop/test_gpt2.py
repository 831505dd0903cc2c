"""Importing GPT2LMHeadModel directories: tokenizer, logits and greedy generation equal to transformers'."""

from __future__ import annotations

import shutil

import pytest
import torch

from aiayn.data.batching import pad
from aiayn.decode.sampling import generate
from aiayn.fast.inference import inference_model
from aiayn.interop import import_gpt2
from tests.interop import hf_models as H

transformers = pytest.importorskip("transformers")

VARIANTS = {  # name -> (GPT2Config changes, saved as safetensors)
    "gelu-tanh-tied": ({}, True),
    "relu-untied-eps": (dict(activation_function="relu", tie_word_embeddings=False, layer_norm_epsilon=1e-6), False),
    "swish-n-inner": (dict(activation_function="silu", n_inner=48), True),
}
TEXTS = ["First Citizen:\nBefore we proceed any further, hear me speak.",
         "You are all resolved rather to die than to famish?<|endoftext|>  Résolu ☃",
         "Speak, speak."]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("gpt2-tok")
    return d, H.gpt2_tokenizer_files(d)


@pytest.fixture(scope="module", params=list(VARIANTS))
def imported(request, tmp_path_factory, tokenizer_dir):
    tok_dir, V = tokenizer_dir
    d = tmp_path_factory.mktemp(request.param)
    for f in tok_dir.iterdir():
        shutil.copy(f, d / f.name)
    changes, safetensors = VARIANTS[request.param]
    hf = H.gpt2(d, V, seed=len(request.param), **changes)
    if not safetensors:
        torch.save(hf.state_dict(), d / "pytorch_model.bin")
        (d / "model.safetensors").unlink()
    model, tok, _ = import_gpt2(d)
    return d, hf, model, tok


def test_tokenizer_equals_transformers(imported):
    from transformers import GPT2Tokenizer

    d, hf, model, tok = imported
    ht = GPT2Tokenizer.from_pretrained(d)
    for text in TEXTS:
        assert tok.encode(text) == ht(text).input_ids
        assert tok.decode(tok.encode(text)) == text.replace("<|endoftext|>", "")


def test_logits_equal_on_padded_batches(imported):
    d, hf, model, tok = imported
    ids = [tok.encode(t) for t in TEXTS]
    x = pad(ids, tok.pad_id)
    real = torch.tensor([[i < len(s) for i in range(x.size(1))] for s in ids])
    with torch.no_grad():
        ref = hf(input_ids=x, attention_mask=real.long()).logits
        ours = model(x)
    assert (ours - ref)[real].abs().max() < 1e-4
    assert not real.all()


def test_greedy_generation_equals_generate(imported):
    d, hf, model, tok = imported
    prompt = tok.encode(TEXTS[0])
    ref = hf.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False, eos_token_id=None,
                      pad_token_id=tok.pad_id)[0, len(prompt):].tolist()
    for precision in ("plain", "fp32"):
        ours = [step[0] for step in generate(inference_model(model, precision), prompt, 20, temperature=0)]
        assert ours == ref, precision


def test_unsupported_variants_and_broken_files(imported, tmp_path):
    d = imported[0]

    def broken(edit):
        return H.import_error(import_gpt2, d, tmp_path, edit)

    config = H.config_edit

    assert "not gpt2" in broken(config(model_type="llama", architectures=["LlamaForCausalLM"]))
    assert "scale_attn_by_inverse_layer_idx" in broken(config(scale_attn_by_inverse_layer_idx=True))
    assert "vocab.json has 400 tokens" in broken(config(vocab_size=500))
    assert "missing tokenizer file merges.txt" in broken(lambda b: (b / "merges.txt").unlink())
    weights = next(p.name for p in d.iterdir() if p.name in ("model.safetensors", "pytorch_model.bin"))
    assert "corrupt" in broken(lambda b: (b / weights).write_bytes(b"PK\x03\x04 not a zip"))
    assert "has shape" in broken(config(n_positions=32))


def test_export_back_to_gpt2(imported, tmp_path):
    """import -> export: transformers loads the model and its tokenizer files again, same logits."""
    from transformers import GPT2LMHeadModel, GPT2Tokenizer

    from aiayn.interop import export_gpt2

    d, hf, model, tok = imported
    export_gpt2(model, tok, tmp_path)
    again, ht = GPT2LMHeadModel.from_pretrained(tmp_path).eval(), GPT2Tokenizer.from_pretrained(tmp_path)
    x = torch.tensor([ht(TEXTS[0]).input_ids])
    assert x[0].tolist() == tok.encode(TEXTS[0])
    with torch.no_grad():
        assert (again(x).logits - hf(x).logits).abs().max() < 1e-4
