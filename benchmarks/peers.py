"""The peers, built offline at aiayn's sizes: HF MarianMTModel from a MarianConfig (random weights) and
its CTranslate2 conversion. Imported by the benchmark scripts (`python benchmarks/x.py` puts this
directory on sys.path); needs `pip install -e .[bench]`.

Marian and aiayn differ in their special ids, which is harmless for speed: inputs are re-padded with
Marian's pad id, and output lengths are forced. What the CTranslate2 converter needs (PEERS.md):
a local tokenizer in the model directory (a tiny sentencepiece model and a vocab.json are enough), and
the pad id being the last vocabulary id (Marian's converter drops it; it also starts the decoder).
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import torch  # noqa: E402

from aiayn.config import ModelConfig  # noqa: E402

EOS_ID, UNK_ID = 0, 1  # Marian's order: </s>, <unk>, ..., <pad> last


def marian_config(cfg: ModelConfig):
    """A MarianConfig of the same shape as an aiayn ModelConfig (post-norm, ReLU, sinusoidal positions,
    scaled and tied embeddings, shared vocabulary, the same dropouts)."""
    from transformers import MarianConfig

    V = cfg.vocab_size
    return MarianConfig(
        vocab_size=V, d_model=cfg.d_model, encoder_layers=cfg.n_encoder_layers,
        decoder_layers=cfg.n_decoder_layers, encoder_attention_heads=cfg.n_heads,
        decoder_attention_heads=cfg.n_heads, encoder_ffn_dim=cfg.d_ff, decoder_ffn_dim=cfg.d_ff,
        activation_function=cfg.activation, dropout=cfg.dropout, attention_dropout=cfg.attn_dropout,
        activation_dropout=0.0, max_position_embeddings=cfg.max_len, scale_embedding=True,
        share_encoder_decoder_embeddings=True, tie_word_embeddings=True, pad_token_id=V - 1,
        eos_token_id=EOS_ID, decoder_start_token_id=V - 1, forced_eos_token_id=None)


def hf_marian(cfg: ModelConfig, seed: int = 0):
    from transformers import MarianMTModel
    from transformers.utils import logging

    logging.disable_progress_bar()
    torch.manual_seed(seed)
    return MarianMTModel(marian_config(cfg))


def token(i: int) -> str:
    """The vocabulary entry of id i (CTranslate2 takes tokens as strings)."""
    return f"t{i}"


def save_with_tokenizer(model, directory: Path) -> Path:
    """save_pretrained plus the tokenizer files the converter loads with AutoTokenizer."""
    import sentencepiece as spm

    directory = Path(directory)
    model.save_pretrained(directory)
    V = model.config.vocab_size
    vocab = {"</s>": EOS_ID, "<unk>": UNK_ID, **{token(i): i for i in range(2, V - 1)}, "<pad>": V - 1}
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "MarianTokenizer"}))
    spm_model = io.BytesIO()  # only its presence matters: tokens are given to CTranslate2 as strings
    spm.SentencePieceTrainer.train(sentence_iterator=iter(["a b c d e f g h"] * 50), model_writer=spm_model,
                                   vocab_size=11, model_type="word", minloglevel=2)
    for name in ("source.spm", "target.spm"):
        (directory / name).write_bytes(spm_model.getvalue())
    return directory


def ct2_translator(model, directory: Path, compute_type: str, inter_threads: int = 2, intra_threads: int = 1):
    """Convert an HF Marian model (offline) and load it. compute_type: float32 or int8."""
    import ctranslate2
    from ctranslate2.converters import TransformersConverter

    directory = Path(directory)
    hf_dir = save_with_tokenizer(model, directory / "hf")
    out = directory / f"ct2-{compute_type}"
    quantization = None if compute_type == "float32" else compute_type
    TransformersConverter(str(hf_dir)).convert(str(out), quantization=quantization, force=True)
    return ctranslate2.Translator(str(out), device="cpu", compute_type=compute_type,
                                  inter_threads=inter_threads, intra_threads=intra_threads)
