"""MarianMTModel (OPUS-MT) <-> aiayn's encoder-decoder.

Marian is the paper's post-norm Transformer with these departures, each a ModelConfig option:
sinusoidal positions with all sines before all cosines (positional="sinusoidal-split"), embeddings
scaled or not (scale_embedding), a bias on the output logits (final_logits_bias: output_bias),
swish/GELU/ReLU feed-forwards (activation), and ties that may be partial (vocabularies shared or not).
Its q, k and v projections are aiayn's fused in_proj, row blocks in that order.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from aiayn.config import ModelConfig
from aiayn.interop.hf import (ACTIVATION_TO_HF, InteropError, Weights, activation_from_hf, read_config,
                              read_json, read_weights, whole)

TOKENIZER_FILES = ("source.spm", "target.spm", "vocab.json")


def _marian_config(hf: dict, where: Path) -> tuple[ModelConfig, bool, bool]:
    """-> (aiayn config less output_bias and ties, share_encoder_decoder_embeddings, tie_word_embeddings)."""
    for key, bad in (("normalize_before", True), ("normalize_embedding", True), ("add_final_layer_norm", True),
                     ("static_position_embeddings", False), ("add_bias_logits", True)):
        if hf.get(key, not bad) == bad:
            raise InteropError(f"{where}: unsupported Marian variant {key}={json.dumps(bad)} "
                               "(transformers' MarianMTModel has no such layers either)")
    try:
        d = whole(hf.get("d_model", 1024))
        heads, dec_heads = whole(hf.get("encoder_attention_heads", 16)), whole(hf.get("decoder_attention_heads", 16))
        d_ff, dec_ff = whole(hf.get("encoder_ffn_dim", 4096)), whole(hf.get("decoder_ffn_dim", 4096))
        vocab = whole(hf.get("vocab_size", 58101))
        tgt_vocab = whole(hf.get("decoder_vocab_size") or vocab)
        pad = whole(hf["pad_token_id"])
        share = bool(hf.get("share_encoder_decoder_embeddings", True))
        tie = bool(hf.get("tie_word_embeddings", True))
        fields = dict(d_model=d, n_heads=heads, d_ff=d_ff, n_encoder_layers=whole(hf.get("encoder_layers", 12)),
                      n_decoder_layers=whole(hf.get("decoder_layers", 12)), dropout=float(hf.get("dropout", 0.1)),
                      attn_dropout=float(hf.get("attention_dropout", 0.0)),
                      max_len=whole(hf.get("max_position_embeddings", 1024)))
    except (KeyError, TypeError, ValueError) as e:
        raise InteropError(f"{where}: config.json lacks or garbles {_name(e)}") from None
    if (heads, d_ff) != (dec_heads, dec_ff):
        raise InteropError(f"{where}: encoder and decoder differ in heads or d_ff ({heads}/{dec_heads}, "
                           f"{d_ff}/{dec_ff}); aiayn's layers share one shape")
    if share and tgt_vocab != vocab:
        raise InteropError(f"{where}: shared embeddings but vocab_size {vocab} != decoder_vocab_size {tgt_vocab}")
    if not 0 <= pad < tgt_vocab:
        raise InteropError(f"{where}: pad_token_id {pad} is outside the vocabulary of {tgt_vocab}")
    try:
        cfg = ModelConfig(vocab_size=vocab, tgt_vocab_size=tgt_vocab if tgt_vocab != vocab else None,
                          norm_first=False, positional="sinusoidal-split", tie_embeddings=False, pad_id=pad,
                          activation=activation_from_hf(hf.get("activation_function", "gelu"), where),
                          scale_embedding=bool(hf.get("scale_embedding", False)), **fields)
    except ValueError as e:
        raise InteropError(f"{where}: {e}") from None
    return cfg, share, tie


def _name(e: BaseException) -> str:
    return str(e.args[0]) if isinstance(e, KeyError) else str(e).splitlines()[0][:80]


def read_marian_tokenizer(directory: Path, hf: dict):
    """The tokenizer of a Marian directory (source.spm, target.spm, vocab.json), checked against config.json."""
    from aiayn.data.tokenizer import MarianTokenizer

    directory = Path(directory)
    missing = [f for f in TOKENIZER_FILES if not (directory / f).is_file()]
    if missing:
        raise InteropError(f"{directory}: missing tokenizer file {', '.join(missing)}")
    tcfg = read_json(directory / "tokenizer_config.json") if (directory / "tokenizer_config.json").is_file() else {}
    vocab = read_json(directory / "vocab.json")
    target_vocab = None
    if tcfg.get("separate_vocabs"):
        if not (directory / "target_vocab.json").is_file():
            raise InteropError(f"{directory}: separate_vocabs but no target_vocab.json")
        target_vocab = read_json(directory / "target_vocab.json")
    try:
        tok = MarianTokenizer((directory / "source.spm").read_bytes(), (directory / "target.spm").read_bytes(),
                              vocab, target_vocab, unk=_token(tcfg, "unk_token", "<unk>"),
                              eos=_token(tcfg, "eos_token", "</s>"), pad=_token(tcfg, "pad_token", "<pad>"),
                              decoder_start=hf.get("decoder_start_token_id"))
    except (RuntimeError, OSError, ValueError, TypeError) as e:
        raise InteropError(f"{directory}: unreadable tokenizer ({str(e).splitlines()[0][:120]})") from None
    for name, ids, size in (("vocab.json", vocab, hf.get("vocab_size")),
                            ("target_vocab.json", target_vocab, hf.get("decoder_vocab_size") or hf.get("vocab_size"))):
        if ids is None:
            continue
        if len(ids) != size:
            raise InteropError(f"{directory}: {name} has {len(ids)} tokens but config.json's vocabulary has {size}")
        if sorted(ids.values()) != list(range(size)):
            raise InteropError(f"{directory}: {name} does not number its tokens 0..{size - 1}")
    if tok.pad_id != hf.get("pad_token_id") or tok.eos_id != _first(hf.get("eos_token_id")):
        raise InteropError(f"{directory}: the tokenizer's pad/eos ids ({tok.pad_id}, {tok.eos_id}) are not "
                           f"config.json's ({hf.get('pad_token_id')}, {hf.get('eos_token_id')})")
    return tok


def _token(tcfg: dict, key: str, default: str) -> str:
    v = tcfg.get(key, default)
    return v.get("content", default) if isinstance(v, dict) else (v or default)


def _first(x):
    return x[0] if isinstance(x, list) and x else x


def import_marian(directory: Path | str):
    """An HF MarianMTModel directory -> (aiayn Transformer in eval mode, tokenizer, extra metadata)."""
    from aiayn.model import build_model

    directory = Path(directory)
    hf = read_config(directory, ("marian",))
    cfg, share, tie = _marian_config(hf, directory)
    tokenizer = read_marian_tokenizer(directory, hf)
    w = Weights(read_weights(directory), directory)
    D, V, Vt = cfg.d_model, cfg.vocab_size, cfg.target_vocab
    # a checkpoint keeps one name of each tied matrix, which may be any of them; transformers 5 ties
    # them only with tie_word_embeddings (else the encoder's and decoder's are two matrices, read here)
    shared = ("model.shared.weight",) if share else ()
    src = w.get("model.encoder.embed_tokens.weight", *shared, shape=(V, D))
    tgt = w.get("model.decoder.embed_tokens.weight", *shared, shape=(Vt, D))
    out = tgt if tie else w.get("lm_head.weight", shape=(Vt, D))
    bias = w.get("final_logits_bias", shape=(1, Vt)).view(Vt) if w.has("final_logits_bias") else torch.zeros(Vt)
    tied = share and tie and torch.equal(src, tgt)
    cfg = cfg.replace(tie_embeddings=tied, output_bias=bool(bias.any()))
    sd = {"src_embed.tokens.weight": src, "tgt_embed.tokens.weight": tgt, "generator.weight": out}
    if cfg.output_bias:
        sd["generator.bias"] = bias
    for stack, n in (("encoder", cfg.n_encoder_layers), ("decoder", cfg.n_decoder_layers)):
        for i in range(n):
            sd.update(_layer_from_hf(w, f"model.{stack}.layers.{i}.", f"{stack}.layers.{i}.", D, cfg.d_ff,
                                     cross=stack == "decoder"))
    model = build_model(cfg)
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise InteropError(f"{directory}: weights do not fit ({str(e).splitlines()[0][:160]})") from None
    tcfg = read_json(directory / "tokenizer_config.json") if (directory / "tokenizer_config.json").is_file() else {}
    extra = {"imported_from": "marian", "source": str(directory)}
    extra.update({ours: tcfg[theirs] for theirs, ours in (("source_lang", "src"), ("target_lang", "tgt"))
                  if isinstance(tcfg.get(theirs), str)})
    return model.eval(), tokenizer, extra


_SUBLAYERS = (("self_attn", "self_attn", "self_attn_layer_norm", "self_norm"),
              ("encoder_attn", "cross_attn", "encoder_attn_layer_norm", "cross_norm"))


def _layer_from_hf(w: Weights, hf: str, ours: str, D: int, d_ff: int, cross: bool) -> dict:
    sd = {}
    for theirs, mine, their_norm, my_norm in _SUBLAYERS[:2 if cross else 1]:
        a = hf + theirs + "."
        sd[ours + mine + ".in_proj.weight"] = torch.cat([w.get(a + p + "_proj.weight", shape=(D, D)) for p in "qkv"])
        sd[ours + mine + ".in_proj.bias"] = torch.cat([w.get(a + p + "_proj.bias", shape=(D,)) for p in "qkv"])
        sd[ours + mine + ".out_proj.weight"] = w.get(a + "out_proj.weight", shape=(D, D))
        sd[ours + mine + ".out_proj.bias"] = w.get(a + "out_proj.bias", shape=(D,))
        sd[ours + my_norm + ".weight"] = w.get(hf + their_norm + ".weight", shape=(D,))
        sd[ours + my_norm + ".bias"] = w.get(hf + their_norm + ".bias", shape=(D,))
    sd[ours + "ff.w1.weight"] = w.get(hf + "fc1.weight", shape=(d_ff, D))
    sd[ours + "ff.w1.bias"] = w.get(hf + "fc1.bias", shape=(d_ff,))
    sd[ours + "ff.w2.weight"] = w.get(hf + "fc2.weight", shape=(D, d_ff))
    sd[ours + "ff.w2.bias"] = w.get(hf + "fc2.bias", shape=(D,))
    sd[ours + "ff_norm.weight"] = w.get(hf + "final_layer_norm.weight", shape=(D,))
    sd[ours + "ff_norm.bias"] = w.get(hf + "final_layer_norm.bias", shape=(D,))
    return sd


# ------------------------------------------------------------------------------------------ export
def split_layout(d_model: int) -> torch.Tensor:
    """The permutation of model dimensions that turns §3.5's interleaved sin/cos positions into
    Marian's layout (sines first): new dimension j holds old dimension perm[j]."""
    return torch.cat([torch.arange(0, d_model, 2), torch.arange(1, d_model, 2)])


def _permuted(sd: dict[str, torch.Tensor], perm: torch.Tensor) -> dict[str, torch.Tensor]:
    """The same function with the model dimensions (the residual stream) reordered by `perm`:
    matrices reading the stream permute their columns, those writing it their rows; LayerNorm (over
    all dimensions) and embeddings follow. Attention's heads and the d_ff units are left as they are."""
    out = {}
    for name, t in sd.items():
        if name.endswith(("in_proj.weight", "w1.weight")) or name == "generator.weight" or "tokens" in name:
            out[name] = t[:, perm]
        elif name.endswith(("out_proj.weight", "w2.weight")):
            out[name] = t[perm]
        elif name.endswith(("out_proj.bias", "w2.bias")) or "norm." in name:
            out[name] = t[perm]
        else:  # in_proj.bias, w1.bias, generator.bias
            out[name] = t
    return out


def export_marian(model, tokenizer, out: Path, extra: dict) -> None:
    """Write an aiayn encoder-decoder into an empty directory `out` as an HF MarianMTModel."""
    from safetensors.torch import save_file

    from aiayn.data.tokenizer import BPETokenizer, MarianTokenizer

    cfg = model.cfg
    if cfg.norm_first:
        raise InteropError("MarianMTModel is post-norm; this model is pre-norm (norm_first): no Marian export")
    if cfg.positional == "learned":
        raise InteropError("MarianMTModel has sinusoidal positions; this model learned its own: no Marian export")
    if cfg.norm_eps != 1e-5:
        raise InteropError(f"MarianMTModel's LayerNorm epsilon is 1e-5; this model's is {cfg.norm_eps}")
    if not isinstance(tokenizer, (BPETokenizer, MarianTokenizer)):
        raise InteropError(f"a {type(tokenizer).__name__} has no Marian form (sentencepiece tokenizers do)")
    sd = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    if cfg.positional == "sinusoidal":
        sd = _permuted(sd, split_layout(cfg.d_model))
    D, Vt = cfg.d_model, cfg.target_vocab
    hf = {"model.encoder.embed_tokens.weight": sd["src_embed.tokens.weight"],
          "model.decoder.embed_tokens.weight": sd["tgt_embed.tokens.weight"],
          "lm_head.weight": sd["generator.weight"],
          "final_logits_bias": sd.get("generator.bias", torch.zeros(Vt)).view(1, Vt)}
    if cfg.tie_embeddings:
        hf["model.shared.weight"] = sd["src_embed.tokens.weight"]
    for stack, n in (("encoder", cfg.n_encoder_layers), ("decoder", cfg.n_decoder_layers)):
        for i in range(n):
            ours, theirs = f"{stack}.layers.{i}.", f"model.{stack}.layers.{i}."
            for their_attn, mine, their_norm, my_norm in _SUBLAYERS[:2 if stack == "decoder" else 1]:
                wq, wk, wv = sd[ours + mine + ".in_proj.weight"].split(D)
                bq, bk, bv = sd[ours + mine + ".in_proj.bias"].split(D)
                for p, wt, b in (("q", wq, bq), ("k", wk, bk), ("v", wv, bv)):
                    hf[f"{theirs}{their_attn}.{p}_proj.weight"], hf[f"{theirs}{their_attn}.{p}_proj.bias"] = wt, b
                for part in ("weight", "bias"):
                    hf[f"{theirs}{their_attn}.out_proj.{part}"] = sd[f"{ours}{mine}.out_proj.{part}"]
                    hf[f"{theirs}{their_norm}.{part}"] = sd[f"{ours}{my_norm}.{part}"]
            for part in ("weight", "bias"):
                hf[f"{theirs}fc1.{part}"] = sd[f"{ours}ff.w1.{part}"]
                hf[f"{theirs}fc2.{part}"] = sd[f"{ours}ff.w2.{part}"]
                hf[f"{theirs}final_layer_norm.{part}"] = sd[f"{ours}ff_norm.{part}"]
    out = Path(out)
    save_file({k: v.contiguous().clone() for k, v in hf.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    pad, eos, start = cfg.pad_id, tokenizer.eos_id, tokenizer.bos_id
    config = {
        "architectures": ["MarianMTModel"], "model_type": "marian", "vocab_size": cfg.vocab_size,
        "decoder_vocab_size": Vt, "d_model": D, "encoder_layers": cfg.n_encoder_layers,
        "decoder_layers": cfg.n_decoder_layers, "encoder_attention_heads": cfg.n_heads,
        "decoder_attention_heads": cfg.n_heads, "encoder_ffn_dim": cfg.d_ff, "decoder_ffn_dim": cfg.d_ff,
        "activation_function": ACTIVATION_TO_HF[cfg.activation], "max_position_embeddings": cfg.max_len,
        "scale_embedding": cfg.scale_embedding, "dropout": cfg.dropout, "attention_dropout": cfg.attn_dropout,
        "activation_dropout": 0.0, "pad_token_id": pad, "eos_token_id": eos, "forced_eos_token_id": eos,
        "decoder_start_token_id": start, "share_encoder_decoder_embeddings": cfg.tie_embeddings,
        "tie_word_embeddings": cfg.tie_embeddings, "is_encoder_decoder": True, "torch_dtype": "float32"}
    generation = {"decoder_start_token_id": start, "eos_token_id": eos, "pad_token_id": pad,
                  "forced_eos_token_id": eos, "bad_words_ids": [[pad]], "max_length": cfg.max_len}
    _write_json(out / "config.json", config)
    _write_json(out / "generation_config.json", generation)
    _write_marian_tokenizer(out, tokenizer, cfg, extra)


def _write_marian_tokenizer(out: Path, tokenizer, cfg: ModelConfig, extra: dict) -> None:
    from aiayn.data.tokenizer import BPETokenizer

    separate = False
    if isinstance(tokenizer, BPETokenizer):
        vocab = {tokenizer.sp.id_to_piece(i): i for i in range(tokenizer.vocab_size)}
        source = target = tokenizer.proto
    else:
        vocab, source, target = tokenizer.vocab, tokenizer.source_proto, tokenizer.target_proto
        if tokenizer.target_vocab is not None:
            separate = True
            _write_json(out / "target_vocab.json", tokenizer.target_vocab)
    _write_json(out / "vocab.json", vocab)
    (out / "source.spm").write_bytes(source)
    (out / "target.spm").write_bytes(target)
    pieces = tokenizer.pieces([tokenizer.unk_id, tokenizer.eos_id, cfg.pad_id])
    tcfg = {"tokenizer_class": "MarianTokenizer", "model_max_length": cfg.max_len, "separate_vocabs": separate,
            "unk_token": pieces[0], "eos_token": pieces[1], "pad_token": pieces[2],
            "source_lang": extra.get("src"), "target_lang": extra.get("tgt")}
    _write_json(out / "tokenizer_config.json", tcfg)


def _write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, ensure_ascii=False, indent=1), encoding="utf-8")
