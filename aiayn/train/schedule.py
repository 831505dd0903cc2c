"""Learning-rate schedules, as functions of the update number (1-based)."""

from __future__ import annotations

import math

from aiayn.errors import InputError


def inverse_sqrt(step: int, peak: float, warmup: int) -> float:
    """§5.3's lrate = d_model^-0.5 * min(step^-0.5, step * warmup^-1.5), parametrized by its peak
    (reached at step = warmup): the paper's schedule is peak = 1 / sqrt(d_model * warmup)."""
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
            raise InputError("the cosine schedule needs max_steps")
        return cosine(step, cfg.lr, cfg.warmup, total, cfg.min_lr)
    return cfg.lr
