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


def cosine_by_fraction(step: int, fraction: float, peak: float, warmup: int, floor: float = 0.0) -> float:
    """A half cosine from `peak` down to `floor` over the fraction of a time budget spent (0 -> 1),
    times a linear warm-up over the first `warmup` steps: the schedule ends where the budget does,
    however many steps the machine manages in it."""
    ramp = min(1.0, (step + 1) / (warmup + 1))
    fraction = min(max(fraction, 0.0), 1.0)
    return ramp * (floor + 0.5 * (1.0 + math.cos(math.pi * fraction)) * (peak - floor))


def budget_fraction(cfg, state: dict) -> float | None:
    """Without max_steps, the part of the time budget (max_cpu_minutes, else max_minutes) spent so
    far; None when the run is sized in steps or epochs."""
    if cfg.max_steps is not None:
        return None
    if cfg.max_cpu_minutes is not None:
        return state.get("cpu_s", 0.0) / (60 * cfg.max_cpu_minutes)
    if cfg.max_minutes is not None:
        return state.get("elapsed", 0.0) / (60 * cfg.max_minutes)
    return None


def learning_rate(cfg, step: int, total: int | None, fraction: float | None = None) -> float:
    """The rate of update `step`; a cosine schedule runs over `total` steps, or, without them, over
    `fraction`, the part of a time budget spent (budget_fraction)."""
    if cfg.schedule == "inverse_sqrt":
        return inverse_sqrt(step, cfg.lr, cfg.warmup)
    if cfg.schedule == "cosine":
        if total is not None:
            return cosine(step, cfg.lr, cfg.warmup, total, cfg.min_lr)
        if fraction is None:
            raise InputError("the cosine schedule needs max_steps, or a time budget (max_cpu_minutes or max_minutes)")
        return cosine_by_fraction(step, fraction, cfg.lr, cfg.warmup, cfg.min_lr)
    return cfg.lr
