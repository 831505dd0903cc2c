"""Small random HF models with real tokenizers, built here (nothing downloaded): the test inputs of
aiayn.interop. Tokenizers are trained on a few hundred lines of the shipped Multi30k and Tiny
Shakespeare text."""

from __future__ import annotations

import gzip
import io
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from aiayn.data.corpus import ASSETS

N_LINES = 300


def lines(name: str, n: int = N_LINES) -> list[str]:
    with gzip.open(ASSETS / "multi30k" / f"{name}.gz", "rt", encoding="utf-8") as f:
        return [next(f).strip() for _ in range(n)]


def _spm(texts: list[str], vocab_size: int) -> bytes:
    import sentencepiece as spm

    out = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_writer=out, model_type="unigram",
                                   vocab_size=vocab_size, eos_id=0, unk_id=1, bos_id=-1, pad_id=-1,
                                   minloglevel=2, num_threads=1, character_coverage=1.0)
    return out.getvalue()


def marian_tokenizer_files(directory: Path) -> int:
    """OPUS-MT's tokenizer layout: source.spm (English), target.spm (German), one joint vocab.json
    with </s> 0, <unk> 1 and <pad> last. -> the vocabulary size."""
    import sentencepiece as spm

    src, tgt = _spm(lines("train.en"), 200), _spm(lines("train.de"), 220)
    pieces = []
    for proto in (src, tgt):
        sp = spm.SentencePieceProcessor(model_proto=proto)
        pieces += [sp.id_to_piece(i) for i in range(2, sp.get_piece_size())]
    vocab = ["</s>", "<unk>", *sorted(set(pieces)), "<pad>"]
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "source.spm").write_bytes(src)
    (directory / "target.spm").write_bytes(tgt)
    (directory / "vocab.json").write_text(json.dumps({p: i for i, p in enumerate(vocab)}))
    (directory / "tokenizer_config.json").write_text(json.dumps({"source_lang": "en", "target_lang": "de"}))
    return len(vocab)


def marian(directory: Path, vocab_size: int, seed: int = 0, safetensors: bool = True, **changes):
    """A random MarianMTModel saved in `directory` (beside its tokenizer files). final_logits_bias is
    random too, EOS's raised just enough for the greedy outputs of a few sentences to end by EOS at
    varied lengths (a random model otherwise repeats itself to the length limit): then greedy and
    beam search can be compared without their length limits."""
    from transformers import MarianConfig, MarianMTModel

    torch.manual_seed(seed)
    fields = dict(vocab_size=vocab_size, decoder_vocab_size=vocab_size, d_model=32, encoder_layers=2,
                  decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                  decoder_ffn_dim=64, max_position_embeddings=128, pad_token_id=vocab_size - 1,
                  decoder_start_token_id=vocab_size - 1, eos_token_id=0, forced_eos_token_id=0,
                  activation_function="swish", scale_embedding=True, init_std=0.15, dropout=0.1)
    fields.update(changes)
    model = MarianMTModel(MarianConfig(**fields)).eval()
    src = marian_sources(directory)
    base = torch.randn(model.final_logits_bias.shape) * 0.5
    for eos_bias in torch.arange(0.0, 8.0, 0.5).tolist():
        with torch.no_grad():
            bias = base.clone()
            bias[0, 0] += eos_bias
            model.final_logits_bias.copy_(bias)
            out = model.generate(input_ids=src, attention_mask=(src != vocab_size - 1).long(), max_new_tokens=30,
                                 num_beams=4, length_penalty=0.0, early_stopping=True, bad_words_ids=[[vocab_size - 1]])
        lengths = [row.index(0) if 0 in row else 99 for row in out[:, 1:].tolist()]
        if max(lengths) < 29 and len(set(lengths)) > 1 and max(lengths) >= 2:
            break
    model.save_pretrained(directory, safe_serialization=safetensors)
    return model


def marian_sources(directory: Path, n: int = 6) -> torch.Tensor:
    """The first n Multi30k validation sentences, tokenized by transformers' MarianTokenizer, padded."""
    from transformers import MarianTokenizer

    return MarianTokenizer.from_pretrained(directory)(lines("val.en", n), return_tensors="pt", padding=True).input_ids


def gpt2_tokenizer_files(directory: Path, vocab_size: int = 400) -> int:
    """GPT-2's byte-level BPE (vocab.json + merges.txt) trained on Tiny Shakespeare's first lines."""
    from tokenizers import ByteLevelBPETokenizer

    text = (ASSETS / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8").splitlines()[:N_LINES]
    tk = ByteLevelBPETokenizer()
    tk.train_from_iterator(text, vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False)
    directory.mkdir(parents=True, exist_ok=True)
    tk.save_model(str(directory))
    return tk.get_vocab_size()


def gpt2(directory: Path, vocab_size: int, seed: int = 0, safetensors: bool = True, **changes):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    fields = dict(vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0,
                  eos_token_id=0, initializer_range=0.2)
    fields.update(changes)
    model = GPT2LMHeadModel(GPT2Config(**fields)).eval()
    model.save_pretrained(directory, safe_serialization=safetensors)
    return model


def import_error(importer: Callable[[Path], object], good: Path, scratch: Path, edit: Callable[[Path], None]) -> str:
    """The one-line error `importer` gives for a copy of the model directory `good` (made in a new
    folder under `scratch`) after `edit` broke it. Fails the test if the import does not refuse it."""
    import pytest

    from aiayn.interop import InteropError

    broken = scratch / f"broken{len(list(scratch.iterdir()))}"
    shutil.copytree(good, broken)
    edit(broken)
    with pytest.raises(InteropError) as e:
        importer(broken)
    return str(e.value)


def config_edit(**changes) -> Callable[[Path], None]:
    """An `edit` for import_error: these changes written into config.json."""
    def edit(directory: Path) -> None:
        cfg = json.loads((directory / "config.json").read_text())
        cfg.update(changes)
        (directory / "config.json").write_text(json.dumps(cfg))
    return edit
