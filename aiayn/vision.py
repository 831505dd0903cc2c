"""Using the image models: classify image files with a ViT, and show what its class token attends to.

Shape legend: N images, H x W image, K classes, L layers, h heads, T = 1 + G * G tokens (class token
first), G patches per side.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from aiayn.data.corpus import DataError
from aiayn.data.images import read_image
from aiayn.errors import InputError
from aiayn.tasks.vision import predict


@dataclass
class Classified:
    path: str
    top: list[tuple[str, float]] | None  # (label, probability), most likely first
    error: str | None = None


def classify_files(model, labels, paths: list[str], top_k: int = 1) -> list[Classified]:
    """Classify image files; a file that cannot be read (not an image, empty, the wrong size) gets
    its error, the others are still classified."""
    size = (model.cfg.image_size, model.cfg.image_size)
    results, images = [], []
    for p in paths:
        try:
            images.append(read_image(p, size))
            results.append(Classified(p, None))
        except DataError as e:
            results.append(Classified(p, None, str(e)))
    if images:
        probs = predict(model, torch.stack(images))  # (N, K)
        top = probs.topk(min(top_k, probs.size(1)), dim=-1)
        ok = iter(zip(top.values.tolist(), top.indices.tolist()))
        for r in results:
            if r.error is None:
                values, indices = next(ok)
                r.top = [(labels.classes[i], v) for v, i in zip(values, indices)]
    return results


# ------------------------------------------------------------------------------------- explain
@torch.no_grad()
def vit_attention(model, image: Tensor) -> tuple[Tensor, list[Tensor]]:
    """(H, W) uint8 -> class probabilities (K,) and each layer's attention (h, T, T)."""
    from aiayn.decode.greedy import evaluating
    from aiayn.model.vit import images_to_input

    if model.cfg.pool != "cls":
        raise InputError("this ViT pools the mean of its patches: it has no class token to explain")
    with evaluating(model):
        x = images_to_input(image[None]).to(next(model.parameters()).device)
        pooled, weights = model.features(x, need_weights=True)
        probs = model.head(pooled).float().softmax(-1)[0]
    return probs.cpu(), [w[0].float().cpu() for w in weights]


def attention_rollout(weights: list[Tensor]) -> Tensor:
    """Attention rollout (Abnar & Zuidema 2020): average the heads, add the residual connection as
    the identity (A + I, rows renormalized), and multiply through the layers. -> (T, T): how much
    each output token draws on each input token."""
    T = weights[0].size(-1)
    rollout = torch.eye(T)
    for w in weights:
        a = w.mean(0) + torch.eye(T)  # (T, T)
        rollout = (a / a.sum(-1, keepdim=True)) @ rollout
    return rollout


def cls_maps(model, weights: list[Tensor]) -> tuple[Tensor, Tensor]:
    """The class token's attention over the patches: per layer and head (L, h, G, G) and rolled out
    (G, G), each map summing to at most 1 (what the class token gives itself is left out)."""
    G = model.cfg.grid
    per_head = torch.stack([w[:, 0, 1:] for w in weights]).reshape(len(weights), -1, G, G)
    return per_head, attention_rollout(weights)[0, 1:].reshape(G, G)


def explain_image(model, labels, image: Tensor, out_dir: Path | str, dpi: int = 100) -> tuple[str, list[Path]]:
    """Write attention_layer{i}.png (each head's class-token map over the image) and rollout.png to
    out_dir; -> (a text summary, the paths)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    probs, weights = vit_attention(model, image)
    per_head, rollout = cls_maps(model, weights)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    size = model.cfg.image_size
    extent = (-0.5, size - 0.5, size - 0.5, -0.5)  # patch maps stretched over the pixels they cover
    paths = []
    L, H = per_head.shape[:2]
    for layer in range(L):
        fig, axes = plt.subplots(1, H + 1, figsize=(2.2 * (H + 1), 2.5), squeeze=False)
        axes[0, 0].imshow(image.numpy(), cmap="gray", vmin=0, vmax=255)
        axes[0, 0].set_title("image", fontsize=9)
        for h in range(H):
            ax = axes[0, h + 1]
            ax.imshow(image.numpy(), cmap="gray", vmin=0, vmax=255)
            ax.imshow(per_head[layer, h].numpy(), cmap="inferno", alpha=0.6, extent=extent, interpolation="nearest")
            ax.set_title(f"head {h}", fontsize=9)
        for ax in axes[0]:
            ax.set_xticks([])
            ax.set_yticks([])
        fig.suptitle(f"layer {layer}: class token's attention over the patches", fontsize=10)
        fig.tight_layout()
        paths.append(out_dir / f"attention_layer{layer}.png")
        fig.savefig(paths[-1], dpi=dpi)
        plt.close(fig)
    fig, axes = plt.subplots(1, 2, figsize=(5, 2.8))
    axes[0].imshow(image.numpy(), cmap="gray", vmin=0, vmax=255)
    axes[0].set_title("image", fontsize=9)
    axes[1].imshow(image.numpy(), cmap="gray", vmin=0, vmax=255)
    axes[1].imshow(rollout.numpy(), cmap="inferno", alpha=0.6, extent=extent, interpolation="bilinear")
    best = int(probs.argmax())
    axes[1].set_title(f"rollout: {labels.classes[best]} ({probs[best]:.2f})", fontsize=9)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    paths.append(out_dir / "rollout.png")
    fig.savefig(paths[-1], dpi=dpi)
    plt.close(fig)
    top = probs.topk(min(3, len(probs)))
    lines = ["prediction: " + ", ".join(f"{labels.classes[i]} {p:.3f}" for p, i in zip(top.values.tolist(),
                                                                                       top.indices.tolist()))]
    G = model.cfg.grid
    for layer in range(L):
        flat = per_head[layer].mean(0).flatten()
        r, c = divmod(int(flat.argmax()), G)
        lines.append(f"layer {layer}: class token attends most to patch row {r}, column {c} "
                     f"({flat.max():.2f} of its attention, heads averaged; {weights[layer][:, 0, 0].mean():.2f} to itself)")
    r, c = divmod(int(rollout.flatten().argmax()), G)
    lines.append(f"rollout: most weight on patch row {r}, column {c}")
    return "\n".join(lines), paths
