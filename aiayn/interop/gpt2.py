"""GPT2LMHeadModel <-> aiayn's decoder-only LanguageModel.

GPT-2 is the decoder stack without cross-attention, pre-norm with a final LayerNorm (norm_first),
learned positions, unscaled embeddings (scale_embedding=False), GELU in its tanh form, and the
output layer tied to the token embeddings. Its Conv1D layers store weights as (in, out): the
transpose of nn.Linear's; c_attn's columns are [q | k | v], aiayn's in_proj rows in that order.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from aiayn.config import ModelConfig
from aiayn.interop.hf import (ACTIVATION_TO_HF, InteropError, Weights, activation_from_hf, read_config,
                              read_weights, whole)


def _gpt2_config(hf: dict, where: Path) -> ModelConfig:
    for key, bad in (("scale_attn_by_inverse_layer_idx", True), ("add_cross_attention", True),
                     ("scale_attn_weights", False)):
        if hf.get(key, not bad) == bad:
            raise InteropError(f"{where}: unsupported GPT-2 variant {key}={json.dumps(bad)}")
    try:
        d = whole(hf.get("n_embd", 768))
        cfg = ModelConfig(
            vocab_size=whole(hf.get("vocab_size", 50257)), d_model=d, n_heads=whole(hf.get("n_head", 12)),
            d_ff=whole(hf.get("n_inner") or 4 * d), n_encoder_layers=0, n_decoder_layers=whole(hf.get("n_layer", 12)),
            dropout=float(hf.get("resid_pdrop", 0.1)), attn_dropout=float(hf.get("attn_pdrop", 0.1)),
            max_len=whole(hf.get("n_positions", 1024)), norm_first=True, positional="learned",
            activation=activation_from_hf(hf.get("activation_function", "gelu_new"), where),
            tie_embeddings=bool(hf.get("tie_word_embeddings", True)), scale_embedding=False,
            norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)))
    except (TypeError, ValueError) as e:
        if isinstance(e, InteropError):
            raise
        raise InteropError(f"{where}: config.json: {str(e).splitlines()[0][:120]}") from None
    return cfg


def read_gpt2_tokenizer(directory: Path, vocab_size: int):
    from aiayn.data.tokenizer import ByteBPETokenizer

    directory = Path(directory)
    missing = [f for f in ("vocab.json", "merges.txt") if not (directory / f).is_file()]
    if missing:
        raise InteropError(f"{directory}: missing tokenizer file {', '.join(missing)}")
    try:
        tok = ByteBPETokenizer.from_files(directory / "vocab.json", directory / "merges.txt")
    except Exception as e:  # the tokenizers library raises its own exception types
        raise InteropError(f"{directory}: unreadable tokenizer ({str(e).splitlines()[0][:120]})") from None
    if tok.vocab_size != vocab_size:
        raise InteropError(f"{directory}: vocab.json has {tok.vocab_size} tokens but config.json's "
                           f"vocab_size is {vocab_size}")
    return tok


def import_gpt2(directory: Path | str):
    """An HF GPT2LMHeadModel directory -> (aiayn LanguageModel in eval mode, tokenizer, extra metadata)."""
    from aiayn.model import build_model

    directory = Path(directory)
    hf = read_config(directory, ("gpt2",))
    cfg = _gpt2_config(hf, directory)
    tokenizer = read_gpt2_tokenizer(directory, cfg.vocab_size)
    cfg = cfg.replace(pad_id=tokenizer.pad_id)
    # the original checkpoints name weights without the "transformer." prefix and keep the causal
    # mask buffers (attn.bias, attn.masked_bias); neither matters here
    state = {k.removeprefix("transformer."): v for k, v in read_weights(directory).items()}
    w = Weights(state, directory)
    D, F, V = cfg.d_model, cfg.d_ff, cfg.vocab_size
    wte = w.get("wte.weight", shape=(V, D))
    sd = {"tgt_embed.tokens.weight": wte, "tgt_embed.learned.weight": w.get("wpe.weight", shape=(cfg.max_len, D)),
          "generator.weight": wte if cfg.tie_embeddings else w.get("lm_head.weight", shape=(V, D)),
          "decoder.norm.weight": w.get("ln_f.weight", shape=(D,)), "decoder.norm.bias": w.get("ln_f.bias", shape=(D,))}
    for i in range(cfg.n_decoder_layers):
        h, ours = f"h.{i}.", f"decoder.layers.{i}."
        for theirs, mine, shape in (("attn.c_attn", "self_attn.in_proj", (D, 3 * D)),
                                    ("attn.c_proj", "self_attn.out_proj", (D, D)),
                                    ("mlp.c_fc", "ff.w1", (D, F)), ("mlp.c_proj", "ff.w2", (F, D))):
            sd[ours + mine + ".weight"] = w.get(h + theirs + ".weight", shape=shape).t().contiguous()  # Conv1D
            sd[ours + mine + ".bias"] = w.get(h + theirs + ".bias", shape=shape[1:])
        for theirs, mine in (("ln_1", "self_norm"), ("ln_2", "ff_norm")):
            for part in ("weight", "bias"):
                sd[f"{ours}{mine}.{part}"] = w.get(f"{h}{theirs}.{part}", shape=(D,))
    model = build_model(cfg)
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise InteropError(f"{directory}: weights do not fit ({str(e).splitlines()[0][:160]})") from None
    return model.eval(), tokenizer, {"imported_from": "gpt2", "source": str(directory), "tokenizer": "gpt2"}


def export_gpt2(model, tokenizer, out: Path) -> None:
    """Write an aiayn language model into an empty directory `out` as an HF GPT2LMHeadModel.

    GPT-2 adds unscaled token embeddings to learned positions: an aiayn model's scaled embeddings
    become wte = sqrt(d_model) * E and its sinusoidal table becomes wpe. Where the output layer is
    tied to E, the final LayerNorm is divided by the same factor, so logits are unchanged."""
    from safetensors.torch import save_file

    from aiayn.data.tokenizer import ByteBPETokenizer

    cfg = model.cfg
    if cfg.n_encoder_layers:
        raise InteropError("an encoder-decoder has no GPT-2 form (a translation model exports as MarianMTModel)")
    if not cfg.norm_first:
        raise InteropError("GPT-2 is pre-norm; this language model is post-norm: no GPT-2 export")
    if cfg.output_bias:
        raise InteropError("GPT-2's output layer has no bias; this model's has: no GPT-2 export")
    sd = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    D = cfg.d_model
    scale = math.sqrt(D) if cfg.scale_embedding else 1.0
    wte = sd["tgt_embed.tokens.weight"] * scale
    wpe = sd["tgt_embed.learned.weight"] if cfg.positional == "learned" else model.tgt_embed.pe.float().cpu()
    ln_w, ln_b = sd["decoder.norm.weight"], sd["decoder.norm.bias"]
    if cfg.tie_embeddings and scale != 1.0:
        ln_w, ln_b = ln_w / scale, ln_b / scale
    hf = {"transformer.wte.weight": wte, "transformer.wpe.weight": wpe,
          "transformer.ln_f.weight": ln_w, "transformer.ln_f.bias": ln_b,
          "lm_head.weight": wte if cfg.tie_embeddings else sd["generator.weight"]}
    for i in range(cfg.n_decoder_layers):
        h, ours = f"transformer.h.{i}.", f"decoder.layers.{i}."
        for theirs, mine in (("attn.c_attn", "self_attn.in_proj"), ("attn.c_proj", "self_attn.out_proj"),
                             ("mlp.c_fc", "ff.w1"), ("mlp.c_proj", "ff.w2")):
            hf[h + theirs + ".weight"] = sd[ours + mine + ".weight"].t()
            hf[h + theirs + ".bias"] = sd[ours + mine + ".bias"]
        for theirs, mine in (("ln_1", "self_norm"), ("ln_2", "ff_norm")):
            for part in ("weight", "bias"):
                hf[f"{h}{theirs}.{part}"] = sd[f"{ours}{mine}.{part}"]
    out = Path(out)
    save_file({k: v.contiguous().clone() for k, v in hf.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    eos = tokenizer.eos_id
    config = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": cfg.vocab_size,
              "n_embd": D, "n_head": cfg.n_heads, "n_layer": cfg.n_decoder_layers, "n_inner": cfg.d_ff,
              "n_positions": cfg.max_len, "activation_function": ACTIVATION_TO_HF[cfg.activation],
              "layer_norm_epsilon": cfg.norm_eps, "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout,
              "attn_pdrop": cfg.attn_dropout, "bos_token_id": tokenizer.bos_id, "eos_token_id": eos,
              "tie_word_embeddings": cfg.tie_embeddings, "torch_dtype": "float32"}
    (out / "config.json").write_text(json.dumps(config, indent=1), encoding="utf-8")
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": tokenizer.bos_id, "eos_token_id": eos, "max_length": cfg.max_len}, indent=1))
    if isinstance(tokenizer, ByteBPETokenizer):  # GPT-2's own files, and the fast tokenizer's
        _write_byte_bpe(out, tokenizer, cfg.max_len)
    else:  # a character or sentencepiece vocabulary has no GPT-2 form: aiayn's, in a folder of its own
        (out / "aiayn-tokenizer").mkdir()  # (its tokenizer.json is not the `tokenizers` format HF would read)
        tokenizer.save(out / "aiayn-tokenizer")


def _write_byte_bpe(out: Path, tokenizer, max_len: int) -> None:
    tk = json.loads(tokenizer.tk.to_str())
    model = tk["model"]
    (out / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False), encoding="utf-8")
    merges = [" ".join(m) if isinstance(m, list) else m for m in model["merges"]]
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    eos = tokenizer.tk.id_to_token(tokenizer.eos_id)
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "GPT2Tokenizer", "model_max_length": max_len, "bos_token": eos, "eos_token": eos,
         "unk_token": eos, "add_prefix_space": False}, indent=1), encoding="utf-8")
