"""Pictures: training curves (matplotlib is imported only here and in explain)."""

from __future__ import annotations

import json
from pathlib import Path


def plot_metrics(metrics_path: Path, png_path: Path) -> None:
    """Training loss (and validation metrics, each in its own panel) against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(r) for r in Path(metrics_path).read_text().splitlines() if r.strip()]
    train = [r for r in rows if "loss" in r]
    val_keys = sorted({k for r in rows for k in r if k.startswith("val_")})
    fig, axes = plt.subplots(1, 1 + len(val_keys), figsize=(5 * (1 + len(val_keys)), 3.5), squeeze=False)
    ax = axes[0][0]
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss")
    ax.set_xlabel("step"), ax.set_title("training loss"), ax.grid(alpha=0.3)
    for ax, key in zip(axes[0][1:], val_keys):
        pts = [(r["step"], r[key]) for r in rows if key in r]
        ax.plot(*zip(*pts), marker="o", color="tab:orange")
        ax.set_xlabel("step"), ax.set_title(key.replace("_", " ")), ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
