"""aiayn models -> CTranslate2 model directories, written from aiayn's weights with CT2's spec API.

CT2's own converters cannot take an aiayn model: its Marian loader assumes OPUS-MT's conventions
(<pad> is the last id, dropped; the decoder starts from a zero embedding), while aiayn's decoder
starts from a learned <s>. Here the spec is filled directly, as CT2's OpenNMT-py converter does:

    aiayn                                  CT2 spec
    in_proj rows q, k, v (self-attention)  self_attention.linear[0] (fused qkv), linear[1] = out_proj
    in_proj (cross-attention)              attention.linear[0] = q rows, linear[1] = k and v rows
    self_norm / cross_norm / ff_norm       self_attention / attention / ffn .layer_norm
    ff.w1, ff.w2                           ffn.linear_0, ffn.linear_1
    Stack.norm (pre-norm only)             encoder / decoder .layer_norm (pre_norm=True)
    Embedding.pe or .learned               position_encodings.encodings: the table itself, always
    scale_embedding                        scale_embeddings (a flag: sqrt(d_model) or none)
    generator (+ output_bias)              decoder.projection
    norm_eps                               config.layer_norm_epsilon
    tokenizer.bos_id                       config.decoder_start_token (aiayn's <s>, learned)

The position table is written out because CT2's built-in sinusoids are not §3.5's: they start at
position 1 and space the frequencies by log(10000) / (d/2 - 1), all sines before all cosines.

aiayn never generates the pad id (aiayn.decode bans it); a translation export writes that ban into
the output bias (pad's logit = float32's lowest, what CT2's own token bans use), so a CT2 user gets
aiayn's outputs without passing options. CT2 bans a token before its softmax, aiayn after it: the
probabilities of the other tokens differ by the pad's (tiny) share.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from aiayn.interop.hf import InteropError

QUANTIZATIONS = ("float32", "float16", "bfloat16", "int8", "int8_float32", "int8_float16", "int8_bfloat16",
                 "int16")
PAD_BAN = float(np.finfo(np.float32).min)


def _ctranslate2():
    try:
        from ctranslate2.specs import common_spec, transformer_spec
    except ImportError:
        raise InteropError("exporting to CTranslate2 needs the ctranslate2 package: pip install ctranslate2") from None
    return common_spec, transformer_spec


def vocabularies(tokenizer, cfg) -> tuple[list[str], list[str]]:
    """(source tokens, target tokens), each numbered as the model's ids: CT2 maps tokens to ids by
    position in these lists, so each token must be distinct."""
    from aiayn.data.tokenizer import MarianTokenizer

    if isinstance(tokenizer, MarianTokenizer):
        source = {i: p for p, i in tokenizer.vocab.items()}
        source = [source.get(i) for i in range(len(source))]
        target = tokenizer.pieces(range(tokenizer.vocab_size))
    else:
        source = target = tokenizer.pieces(range(tokenizer.vocab_size))
    for name, tokens, size in (("source", source, cfg.vocab_size), ("target", target, cfg.target_vocab)):
        if len(tokens) != size or None in tokens:
            raise InteropError(f"the tokenizer's {name} vocabulary ({len(tokens)} tokens) does not number the "
                               f"model's {size} ids")
        if len(set(tokens)) != len(tokens):
            twice = next(t for t in tokens if tokens.count(t) > 1)
            raise InteropError(f"the {name} vocabulary holds the token {twice!r} twice: CT2 maps tokens to ids "
                               "by their text")
    return source, target


def positions(embedding, cfg) -> torch.Tensor:
    """The (max_len, D) table that an aiayn Embedding adds: §3.5's sinusoids (either layout) or learned."""
    return embedding.positions(0, cfg.max_len).detach().float()


def _linear(spec, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    spec.weight = weight
    if bias is not None:
        spec.bias = bias


def _norm(spec, norm) -> None:
    spec.gamma, spec.beta = norm.weight.detach().float(), norm.bias.detach().float()


def _attention(spec, attn, d_model: int, self_attention: bool) -> None:
    w, b = attn.in_proj.weight.detach().float(), attn.in_proj.bias.detach().float()
    if self_attention:
        _linear(spec.linear[0], w, b)  # rows q, k, v: CT2's fused layout
    else:  # CT2 projects the query from the decoder and keys + values from the memory
        _linear(spec.linear[0], w[:d_model], b[:d_model])
        _linear(spec.linear[1], w[d_model:], b[d_model:])
    _linear(spec.linear[-1], attn.out_proj.weight.detach().float(), attn.out_proj.bias.detach().float())


def _layers(spec, stack, cfg) -> None:
    for layer_spec, layer in zip(spec.layer, stack.layers):
        _attention(layer_spec.self_attention, layer.self_attn, cfg.d_model, self_attention=True)
        _norm(layer_spec.self_attention.layer_norm, layer.self_norm)
        if layer.cross_attn is not None:
            _attention(layer_spec.attention, layer.cross_attn, cfg.d_model, self_attention=False)
            _norm(layer_spec.attention.layer_norm, layer.cross_norm)
        _linear(layer_spec.ffn.linear_0, layer.ff.w1.weight.detach().float(), layer.ff.w1.bias.detach().float())
        _linear(layer_spec.ffn.linear_1, layer.ff.w2.weight.detach().float(), layer.ff.w2.bias.detach().float())
        _norm(layer_spec.ffn.layer_norm, layer.ff_norm)
    if cfg.norm_first:  # pre-norm: the stack's final LayerNorm
        _norm(spec.layer_norm, stack.norm)


def _inputs(spec, embedding, cfg) -> None:
    tokens = spec.embeddings[0] if isinstance(spec.embeddings, list) else spec.embeddings
    tokens.weight = embedding.tokens.weight.detach().float()
    spec.scale_embeddings = cfg.scale_embedding  # True: CT2 multiplies by sqrt(d_model), as §3.4
    spec.position_encodings.encodings = positions(embedding, cfg)


def _output(spec, model, ban: int | None) -> None:
    bias = model.generator.bias
    bias = bias.detach().float().clone() if bias is not None else None
    if ban is not None:
        bias = torch.zeros(model.cfg.target_vocab) if bias is None else bias
        bias[ban] = PAD_BAN
    _linear(spec.projection, model.generator.weight.detach().float(), bias)


def build_spec(model, tokenizer, task: str):
    """The CT2 spec of an aiayn translation model (TransformerSpec) or language model
    (TransformerDecoderModelSpec), weights set, vocabularies and special tokens registered."""
    from aiayn.data.tokenizer import MarianTokenizer

    common_spec, transformer_spec = _ctranslate2()
    if task not in ("translation", "lm"):
        raise InteropError(f"a {task} model has no CTranslate2 export (translation and lm models do)")
    cfg = model.cfg
    activation = {"relu": common_spec.Activation.RELU, "gelu": common_spec.Activation.GELU,
                  "gelu-tanh": common_spec.Activation.GELUTanh, "swish": common_spec.Activation.SWISH}
    source, target = vocabularies(tokenizer, cfg)
    start, eos, unk = tokenizer.pieces([tokenizer.bos_id, tokenizer.eos_id, tokenizer.unk_id])
    if task == "translation":
        spec = transformer_spec.TransformerSpec.from_config(
            (cfg.n_encoder_layers, cfg.n_decoder_layers), cfg.n_heads, pre_norm=cfg.norm_first,
            activation=activation[cfg.activation])
        _inputs(spec.encoder, model.src_embed, cfg)
        _layers(spec.encoder, model.encoder, cfg)
        decoder = spec.decoder
        spec.register_source_vocabulary(source)
        spec.register_target_vocabulary(target)
        spec.config.decoder_start_token = start  # aiayn's learned <s>, not CT2-Marian's zero vector
        # a Marian tokenizer ends a source with </s>; a CT2 user passes sentencepiece's pieces only
        spec.config.add_source_eos = isinstance(tokenizer, MarianTokenizer)
    else:
        spec = transformer_spec.TransformerDecoderModelSpec.from_config(
            cfg.n_decoder_layers, cfg.n_heads, pre_norm=cfg.norm_first, activation=activation[cfg.activation])
        decoder = spec.decoder
        spec.register_vocabulary(target)
    _inputs(decoder, model.tgt_embed, cfg)
    _layers(decoder, model.decoder, cfg)
    _output(decoder, model, cfg.pad_id if task == "translation" else None)
    spec.config.bos_token, spec.config.eos_token, spec.config.unk_token = start, eos, unk
    spec.config.layer_norm_epsilon = cfg.norm_eps
    return spec


def export_ct2(model, tokenizer, task: str, out: Path, quantization: str | None = None) -> str:
    """Write an aiayn model into the empty directory `out` as a CTranslate2 model (model.bin,
    config.json, vocabularies), with aiayn's tokenizer file(s) beside it. -> the spec's name."""
    if quantization is not None and quantization not in QUANTIZATIONS:
        raise InteropError(f"unknown quantization {quantization!r}; choose from {', '.join(QUANTIZATIONS)}")
    spec = build_spec(model, tokenizer, task)
    try:
        spec.validate()
        spec.optimize(quantization=quantization)
    except ValueError as e:
        raise InteropError(f"CTranslate2 refuses the model: {str(e).strip().splitlines()[0][:160]}") from None
    out = Path(out)
    spec.save(str(out))
    tokenizer.save(out)  # tokenizer.model, source.spm + target.spm, ...: none of CT2's file names
    return spec.name
