"""What a model does with one input: attention maps, its positional encoding, next-token distributions.

Every attention weight comes from the model's explicit attention path (need_weights=True); nothing
is stored in modules. `explain_translation` and `explain_lm` return the data as tensors in an
`Explanation`; `save_figures` draws it (matplotlib, Agg) and `summary` writes it as text.

Shape legend: B batch, H heads, S source length, T decoder positions, N output steps,
k top tokens, P positions, D d_model, V vocabulary.

Conventions. Decoder position t reads `dec_pieces[t]`; the output steps are the positions
`first_step .. first_step + N - 1`, and step i produced `out_pieces[i]`. For a translation the
decoder reads <s> y1 .. yn and produces y1 .. yn </s> (first_step = 0); for a language model it
reads the prompt and its greedy continuation, and the steps start at the prompt's last token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from aiayn.decode import apply_temperature, generate, greedy, max_output_lengths
from aiayn.decode.greedy import evaluating
from aiayn.errors import InputError

TEMPERATURES = (0.5, 1.0, 1.5)
PE_MIN_POSITIONS = 64  # the positional-encoding picture shows at least this many positions
KINDS = {"encoder": "encoder self-attention", "decoder": "decoder self-attention (causal)",
         "cross": "encoder-decoder attention"}


@dataclass(frozen=True)
class Explanation:
    task: str                          # "translation" or "lm"
    src_pieces: list[str]              # the source (translation) or the prompt (lm), as BPE pieces/characters
    dec_pieces: list[str]              # what the decoder reads, position by position (T)
    out_pieces: list[str]              # the token produced at each step (N)
    output: str                        # the translation, or the prompt's continuation, as text
    first_step: int                    # the decoder position of step 0
    positional: dict[str, Tensor]      # "encoder" / "decoder" -> (P, D): what is added at positions 0..P-1
    positional_kind: str               # "sinusoidal" or "learned"
    attention: dict[str, list[Tensor]]  # "encoder" (H, S, S), "decoder" (H, T, T), "cross" (H, T, S); one per layer
    alignment: Tensor                  # (N, S) translation / (N, T) lm: last layer's attention, mean over heads
    temperatures: tuple[float, ...]
    top_ids: Tensor                    # (N, k): the most likely next tokens (the same at every temperature)
    top_pieces: list[list[str]]        # (N, k)
    top_probs: Tensor                  # (len(temperatures), N, k): their probabilities at each temperature
    truncated: bool = False            # the input was cut to fit the model's maximum length

    @property
    def alignment_keys(self) -> list[str]:
        """The tokens that `alignment`'s columns stand for."""
        return self.src_pieces if self.task == "translation" else self.dec_pieces

    @property
    def attended(self) -> list[tuple[str, str, float]]:
        """Per step: (token produced, the key token it attends to most, that weight)."""
        weight, idx = self.alignment.max(dim=-1)  # (N,)
        keys = self.alignment_keys
        return [(o, keys[int(i)], float(w)) for o, i, w in zip(self.out_pieces, idx, weight)]


# ------------------------------------------------------------------------------------- tensors
@torch.no_grad()
def attention_weights(model, src: Tensor | None, dec_in: Tensor) -> tuple[Tensor, dict[str, list[Tensor]]]:
    """One teacher-forced pass over a batch through the explicit attention path.

    src (B, S) right-padded source ids (None for a language model), dec_in (B, T) decoder input ->
    logits (B, T, V) and {"encoder": [(B, H, S, S)], "decoder": [(B, H, T, T)], "cross": [(B, H, T, S)]},
    one tensor per layer (only "decoder" for a language model).
    """
    with evaluating(model):
        if src is None:
            h, layers = model.hidden(dec_in, need_weights=True)
            return model.logits(h).float(), {"decoder": [w["self"].float() for w in layers]}
        memory, memory_mask, enc = model.encode(src, need_weights=True)
        h, dec = model.decode(dec_in, memory, memory_mask, need_weights=True)
    return model.logits(h).float(), {"encoder": [w["self"].float() for w in enc],
                                     "decoder": [w["self"].float() for w in dec],
                                     "cross": [w["cross"].float() for w in dec]}


def next_token_distributions(logits: Tensor, top_k: int, temperatures=TEMPERATURES) -> tuple[Tensor, Tensor]:
    """logits (N, V) -> top ids (N, k) and their probabilities softmax(logits / t) at each t: (n_t, N, k).

    Temperature never reorders tokens, so one top-k list serves every temperature.
    """
    top_ids = logits.topk(min(top_k, logits.size(-1)), dim=-1).indices  # (N, k)
    probs = torch.stack([apply_temperature(logits, t).softmax(-1).gather(-1, top_ids) for t in temperatures])
    return top_ids, probs


def _check(text: str, top_k: int, temperatures) -> None:
    if not text.strip():
        raise InputError("nothing to explain: the input is empty")
    if top_k < 1:
        raise InputError(f"top_k must be >= 1, got {top_k}")
    if not temperatures or min(temperatures) <= 0:
        raise InputError("temperatures must be > 0")


def _positional(model, used: int) -> dict[str, Tensor]:
    n = min(model.cfg.max_len, max(used, PE_MIN_POSITIONS))
    embeds = {"decoder": model.tgt_embed}
    if hasattr(model, "src_embed"):
        embeds = {"encoder": model.src_embed, **embeds}
    return {name: e.positions(0, n).detach().float().cpu() for name, e in embeds.items()}


def _explanation(model, tokenizer, task: str, src_ids: list[int], dec_ids: list[int], out_ids: list[int],
                 first_step: int, output: str, truncated: bool, src: Tensor | None, top_k: int,
                 temperatures) -> Explanation:
    device = next(model.parameters()).device
    logits, attn = attention_weights(model, src, torch.tensor([dec_ids], device=device))
    attn = {kind: [w[0].cpu() for w in layers] for kind, layers in attn.items()}  # batch of one: (H, T, S)
    steps = slice(first_step, first_step + len(out_ids))
    if task == "translation":  # greedy search never picks padding: neither do these distributions
        logits[..., model.cfg.pad_id] = float("-inf")
    last = attn["cross" if task == "translation" else "decoder"][-1]  # (H, T, S) or (H, T, T)
    top_ids, top_probs = next_token_distributions(logits[0, steps].cpu(), top_k, temperatures)
    return Explanation(
        task=task, src_pieces=tokenizer.pieces(src_ids), dec_pieces=tokenizer.pieces(dec_ids),
        out_pieces=tokenizer.pieces(out_ids), output=output, first_step=first_step,
        positional=_positional(model, max(len(src_ids), len(dec_ids))), positional_kind=model.cfg.positional,
        attention=attn, alignment=last.mean(0)[steps], temperatures=tuple(temperatures), top_ids=top_ids,
        top_pieces=[tokenizer.pieces(row) for row in top_ids.tolist()], top_probs=top_probs, truncated=truncated)


def explain_translation(model, tokenizer, sentence: str, top_k: int = 5, temperatures=TEMPERATURES,
                        max_new_tokens: int | None = None) -> Explanation:
    """Greedy-translate one sentence, then rerun it teacher-forced with the attention weights.

    The output is at most `max_new_tokens` tokens (default: source length + 50, §6.1), plus </s>
    when the search ended there. A source longer than the model's maximum length is truncated.
    """
    _check(sentence, top_k, temperatures)
    if max_new_tokens is not None and max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    cfg = model.cfg
    ids = tokenizer.encode(sentence) or [tokenizer.unk_id]
    truncated = len(ids) > cfg.max_len - 1
    ids = ids[:cfg.max_len - 1]
    src = torch.tensor([ids], device=next(model.parameters()).device)  # (1, S)
    max_extra = 50 if max_new_tokens is None else max(0, max_new_tokens - len(ids))
    limit = int(max_output_lengths(src, cfg.pad_id, max_extra, cfg.max_len)[0])
    out = greedy(model, src, tokenizer.bos_id, tokenizer.eos_id, max_extra)[0]
    if max_new_tokens is not None:
        limit = min(limit, max_new_tokens)
        out = out[:limit]
    produced = out + [tokenizer.eos_id] if len(out) < limit else out  # stopped at </s>, or at the limit
    # as in training: the decoder reads <s> y1 .. y(n-1) and produces y1 .. yn
    return _explanation(model, tokenizer, "translation", ids, [tokenizer.bos_id] + produced[:-1], produced, 0,
                        tokenizer.decode(out), truncated, src, top_k, temperatures)


def explain_lm(model, tokenizer, prompt: str, top_k: int = 5, temperatures=TEMPERATURES,
               max_new_tokens: int = 10) -> Explanation:
    """Continue a prompt greedily by `max_new_tokens` tokens, then rerun prompt + continuation with
    the attention weights. The prompt keeps its last tokens if the whole does not fit the model."""
    _check(prompt, top_k, temperatures)
    if not 1 <= max_new_tokens < model.cfg.max_len:
        raise InputError(f"max_new_tokens must be in 1..{model.cfg.max_len - 1}, got {max_new_tokens}")
    ids = tokenizer.encode(prompt)  # a character model rejects unknown characters here
    keep = model.cfg.max_len - max_new_tokens
    truncated, ids = len(ids) > keep, ids[-keep:]
    new = []
    for (token,) in generate(model, ids, max_new_tokens, temperature=0, stop_id=tokenizer.eos_id):
        new.append(token)
    # the last prompt token predicts the first new token; the last new token is read, not predicted from
    return _explanation(model, tokenizer, "lm", ids, ids + new, new, len(ids) - 1,
                        tokenizer.decode(new), truncated, None, top_k, temperatures)


# ---------------------------------------------------------------------------------------- text
def _show(piece: str) -> str:
    """A token as a label: whitespace made visible."""
    return piece.replace(" ", "␣").replace("\n", "⏎").replace("\t", "⇥") or "∅"


def _row(pieces: list[str]) -> str:
    return " ".join(_show(p) for p in pieces)


def summary(ex: Explanation) -> str:
    """The explanation as a short text: tokens, alignment, and a table of next-token probabilities."""
    n_layers = {k: len(v) for k, v in ex.attention.items()}
    heads = ex.attention["decoder"][0].size(0)
    lines = []
    if ex.task == "translation":
        lines += [f"source tokens ({len(ex.src_pieces)}): {_row(ex.src_pieces)}",
                  f"output tokens ({len(ex.out_pieces)}): {_row(ex.out_pieces)}",
                  f"translation: {ex.output}"]
        what = f"source token it attends to most (last decoder layer's cross-attention, mean of {heads} heads)"
    else:
        lines += [f"prompt tokens ({len(ex.src_pieces)}): {_row(ex.src_pieces)}",
                  f"output tokens ({len(ex.dec_pieces)}, prompt + {len(ex.out_pieces)} greedy): "
                  f"{_row(ex.dec_pieces)}",
                  f"continuation: {ex.output!r}"]
        what = f"token it attends to most when predicted (last layer's self-attention, mean of {heads} heads)"
    if ex.truncated:
        lines.append("(the input was truncated to fit the model's maximum length)")
    layers = ", ".join(f"{k} {n}" for k, n in n_layers.items())
    lines.append(f"attention: {heads} heads; layers: {layers}; {ex.positional_kind} positional encoding")
    width = max((len(_show(p)) for p in ex.out_pieces), default=1)
    lines.append(f"per output token, the {what}:")
    for i, (out, key, w) in enumerate(ex.attended, 1):
        lines.append(f"  {i:3d}  {_show(out):<{width}}  <- {_show(key)} ({w:.2f})")
    temps = " / ".join(f"{t:g}" for t in ex.temperatures)
    lines.append(f"next-token distributions, top {ex.top_ids.size(1)} (probability at T = {temps}):")
    for i, out in enumerate(ex.out_pieces):
        cells = [f"{_show(p)} " + "/".join(f"{float(ex.top_probs[j, i, r]):.2f}" for j in range(len(ex.temperatures)))
                 for r, p in enumerate(ex.top_pieces[i])]
        lines.append(f"  {i + 1:3d}  {_show(out):<{width}}  " + " | ".join(cells))
    return "\n".join(lines)


# -------------------------------------------------------------------------------------- images
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _label_axes(ax, rows: list[str], cols: list[str]) -> None:
    """Tokens as tick labels (rows and cols already shown with `_show`)."""
    size = 7 if max(len(rows), len(cols)) <= 30 else 5
    ax.set_xticks(range(len(cols)), cols, rotation=90, fontsize=size)
    ax.set_yticks(range(len(rows)), rows, fontsize=size)
    ax.tick_params(length=0, pad=1)


def _grid_figure(plt, maps: list[Tensor], rows: list[str], cols: list[str], title: str):
    """One panel per (layer, head): rows = layers, columns = heads."""
    n_layers, n_heads = len(maps), maps[0].size(0)
    T, S = maps[0].shape[-2:]
    label = 0.07 * max(len(p) for p in rows + cols) + 0.3  # inches that the tick labels take
    cell = 0.17 if max(T, S) <= 30 else 0.1
    w, h = max(1.6, cell * S) + 0.15, max(1.6, cell * T) + 0.35
    fig, axes = plt.subplots(n_layers, n_heads, figsize=(w * n_heads + label + 1.2, h * n_layers + label + 0.6),
                             squeeze=False, sharex=True, sharey=True, layout="constrained")
    for l, layer in enumerate(maps):
        for j in range(n_heads):
            ax = axes[l][j]
            image = ax.imshow(layer[j].numpy(), vmin=0.0, vmax=1.0, cmap="viridis", interpolation="nearest")
            ax.set_title(f"layer {l + 1}, head {j + 1}", fontsize=8)
            _label_axes(ax, [_show(p) for p in rows], [_show(p) for p in cols])
            ax.label_outer()  # token labels on the left column and the bottom row only
    fig.colorbar(image, ax=axes, shrink=min(1.0, 4 / n_layers + 0.2), label="attention weight")
    fig.suptitle(title)
    return fig


def _positional_figure(plt, ex: Explanation):
    tables = ex.positional
    if len(tables) == 2 and torch.equal(tables["encoder"], tables["decoder"]):
        tables = {"encoder = decoder": tables["encoder"]}
    used = {"encoder": len(ex.src_pieces), "decoder": len(ex.dec_pieces), "encoder = decoder":
            max(len(ex.src_pieces), len(ex.dec_pieces))}
    fig, axes = plt.subplots(1, len(tables), figsize=(7 * len(tables), 4.5), squeeze=False, layout="constrained")
    for ax, (name, pe) in zip(axes[0], tables.items()):
        top = float(pe.abs().max()) or 1.0
        image = ax.imshow(pe.numpy(), aspect="auto", cmap="RdBu_r", vmin=-top, vmax=top, interpolation="nearest")
        ax.axhline(used[name] - 0.5, color="black", linestyle="--", linewidth=1)
        ax.text(pe.size(1) - 1, used[name] - 1, f"this input: {used[name]} positions", ha="right",
                va="bottom", fontsize=8, bbox=dict(facecolor="white", alpha=0.85, linewidth=0))
        ax.set_xlabel("dimension"), ax.set_ylabel("position")
        ax.set_title(f"{ex.positional_kind} positional encoding ({name})")
        fig.colorbar(image, ax=ax)
    return fig


def _alignment_figure(plt, ex: Explanation):
    keys, heads = ex.alignment_keys, ex.attention["decoder"][0].size(0)
    N, K = ex.alignment.shape
    label = 0.07 * max(len(p) for p in keys + ex.out_pieces) + 0.5
    fig, ax = plt.subplots(figsize=(max(3.0, 0.3 * K) + label + 1.2, max(2.5, 0.3 * N) + label + 0.6),
                           layout="constrained")
    image = ax.imshow(ex.alignment.numpy(), vmin=0.0, vmax=1.0, cmap="viridis", interpolation="nearest")
    _label_axes(ax, [f"{_show(p)} ({i})" for i, p in enumerate(ex.out_pieces, 1)], [_show(p) for p in keys])
    best = ex.alignment.argmax(-1)
    ax.scatter(best.numpy(), range(N), marker="o", s=12, facecolors="none", edgecolors="red", linewidths=1)
    if ex.task == "translation":
        ax.set_xlabel("source token"), ax.set_ylabel("output token (step)")
        ax.set_title(f"alignment: last decoder layer's cross-attention, mean of {heads} heads\n"
                     "(red circle: the most-attended source token)", fontsize=9)
    else:
        ax.set_xlabel("context token"), ax.set_ylabel("predicted token (step)")
        ax.set_title(f"last layer's self-attention when predicting each new token, mean of {heads} heads\n"
                     "(red circle: the most-attended token)", fontsize=9)
    fig.colorbar(image, ax=ax, shrink=0.8, label="attention weight")
    return fig


def _next_token_figure(plt, ex: Explanation):
    N, k = ex.top_ids.shape
    cols = min(4, N)
    rows = math.ceil(N / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.3 * cols, (0.28 * k + 0.9) * rows + 0.6),
                             squeeze=False, layout="constrained")
    width = 0.8 / len(ex.temperatures)
    n_t = len(ex.temperatures)
    colors = plt.get_cmap("plasma")([0.1 + 0.65 * i / max(1, n_t - 1) for i in range(n_t)])  # cool to hot
    for i in range(rows * cols):
        ax = axes[i // cols][i % cols]
        if i >= N:
            ax.axis("off")
            continue
        for j, t in enumerate(ex.temperatures):
            ax.barh([r + (j - (len(ex.temperatures) - 1) / 2) * width for r in range(k)],
                    ex.top_probs[j, i].numpy(), height=width, color=colors[j], label=f"T = {t:g}")
        ax.set_yticks(range(k), [_show(p) for p in ex.top_pieces[i]], fontsize=8)
        ax.invert_yaxis()
        ax.set_xlim(0, 1)
        ax.tick_params(axis="x", labelsize=7)
        ax.set_title(f"step {i + 1} -> {_show(ex.out_pieces[i])}", fontsize=9)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside upper right", ncols=len(labels), fontsize=8)
    fig.suptitle(f"top-{k} next tokens at each step, probability under each temperature", fontsize=10)
    return fig


def figure_names(task: str) -> list[str]:
    """The files that `save_figures` writes for a task."""
    kinds = ["encoder", "decoder", "cross"] if task == "translation" else ["decoder"]
    mean = "alignment.png" if task == "translation" else "attention_mean.png"
    return ["positional_encoding.png", *(f"attention_{k}.png" for k in kinds), mean, "next_tokens.png"]


def save_figures(ex: Explanation, out_dir: Path | str, dpi: int = 100) -> list[Path]:
    """Write the PNGs of `figure_names(ex.task)` into out_dir (created if needed); return their paths."""
    plt = _pyplot()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # rows and columns of each kind of map: decoder positions are labelled by the token they read, but
    # cross-attention rows by the token produced at that step, as in an alignment
    axes = {"encoder": (ex.src_pieces, ex.src_pieces), "decoder": (ex.dec_pieces, ex.dec_pieces),
            "cross": (ex.out_pieces, ex.src_pieces)}
    figures = [_positional_figure(plt, ex)]
    for kind, maps in ex.attention.items():
        rows, cols = axes[kind]
        title = KINDS[kind] + (" (rows: output token produced at that step)" if kind == "cross" else "")
        figures.append(_grid_figure(plt, maps, rows, cols, title))
    figures += [_alignment_figure(plt, ex), _next_token_figure(plt, ex)]
    paths = [out_dir / name for name in figure_names(ex.task)]
    for fig, path in zip(figures, paths):
        fig.savefig(path, dpi=dpi)
        plt.close(fig)
    return paths
