"""Learning-rate schedules, as functions of the update number (1-based)."""

from __future__ import annotations

import math


def paper_lrate(step: int, d_model: int, warmup: int, scale: float = 1.0) -> float:
    """§5.3: lrate = d_model^-0.5 * min(step^-0.5, step * warmup^-1.5), times a scale factor."""
    step = max(step, 1)
    return scale * d_model ** -0.5 * min(step ** -0.5, step * warmup ** -1.5)


def inverse_sqrt(step: int, peak: float, warmup: int) -> float:
    """The same curve, parametrized by its peak: paper_lrate(s, d, w, k) = inverse_sqrt(s, k / sqrt(d w), w)."""
    step = max(step, 1)
    return peak * min(step / warmup, math.sqrt(warmup / step))


def cosine(step: int, peak: float, warmup: int, total: int, floor: float = 0.0) -> float:
    """Linear warm-up, then a half cosine from `peak` down to `floor` at step `total` (nanoGPT)."""
    if step < warmup:
        return peak * (step + 1) / (warmup + 1)
    if step >= total:
        return floor
    progress = (step - warmup) / max(1, total - warmup)
    return floor + 0.5 * (1.0 + math.cos(math.pi * progress)) * (peak - floor)


def learning_rate(cfg, step: int, total: int | None) -> float:
    if cfg.schedule == "inverse_sqrt":
        return inverse_sqrt(step, cfg.lr, cfg.warmup)
    if cfg.schedule == "cosine":
        if total is None:
            raise ValueError("the cosine schedule needs max_steps")
        return cosine(step, cfg.lr, cfg.warmup, total, cfg.min_lr)
    return cfg.lr
