"""Upstream's learning-rate multipliers (``ldm.lr_scheduler``), used through ``torch.optim.lr_scheduler.LambdaLR``.

Each returns a factor of the base learning rate for optimizer step ``n``: a linear warm-up from ``f_start`` to
``f_max`` over ``warm_up_steps``, then a linear (``LambdaLinearScheduler``, the LDM configs') or cosine decay to
``f_min`` over the cycle. The ``...2`` variants take lists, one entry per cycle.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from ldmcli.errors import UsageError


def _cycle(cum_cycles: np.ndarray, n: int) -> int:
    for k, end in enumerate(cum_cycles[1:]):
        if n <= end:
            return k
    return len(cum_cycles) - 2


def warm_up_cosine(warm_up_steps: int, lr_min: float, lr_max: float, lr_start: float, max_decay_steps: int,
                   verbosity_interval: int = 0) -> Callable[[int], float]:
    """``LambdaWarmUpCosineScheduler``: linear warm-up, then a half cosine from lr_max to lr_min."""

    def schedule(n: int) -> float:
        if n < warm_up_steps:
            return (lr_max - lr_start) / warm_up_steps * n + lr_start
        t = min((n - warm_up_steps) / (max_decay_steps - warm_up_steps), 1.0)
        return lr_min + 0.5 * (lr_max - lr_min) * (1 + math.cos(t * math.pi))

    return schedule


def _lists(warm_up_steps: Sequence[int], f_min: Sequence[float], f_max: Sequence[float], f_start: Sequence[float],
           cycle_lengths: Sequence[int]) -> np.ndarray:
    if not len(warm_up_steps) == len(f_min) == len(f_max) == len(f_start) == len(cycle_lengths):
        raise UsageError("scheduler_config: warm_up_steps, f_min, f_max, f_start and cycle_lengths need equal lengths")
    return np.cumsum([0] + list(cycle_lengths))


def warm_up_cosine_cycles(warm_up_steps: Sequence[int], f_min: Sequence[float], f_max: Sequence[float],
                          f_start: Sequence[float], cycle_lengths: Sequence[int],
                          verbosity_interval: int = 0) -> Callable[[int], float]:
    """``LambdaWarmUpCosineScheduler2``: per cycle, linear warm-up then cosine decay."""
    cum = _lists(warm_up_steps, f_min, f_max, f_start, cycle_lengths)

    def schedule(n: int) -> float:
        c = _cycle(cum, n)
        n = n - cum[c]
        if n < warm_up_steps[c]:
            return (f_max[c] - f_start[c]) / warm_up_steps[c] * n + f_start[c]
        t = min((n - warm_up_steps[c]) / (cycle_lengths[c] - warm_up_steps[c]), 1.0)
        return f_min[c] + 0.5 * (f_max[c] - f_min[c]) * (1 + math.cos(t * math.pi))

    return schedule


def warm_up_linear(warm_up_steps: Sequence[int], f_min: Sequence[float], f_max: Sequence[float],
                   f_start: Sequence[float], cycle_lengths: Sequence[int],
                   verbosity_interval: int = 0) -> Callable[[int], float]:
    """``LambdaLinearScheduler`` (lsun_churches, txt2img): per cycle, linear warm-up then a linear ramp from f_max
    to f_min over the cycle length."""
    cum = _lists(warm_up_steps, f_min, f_max, f_start, cycle_lengths)

    def schedule(n: int) -> float:
        c = _cycle(cum, n)
        n = n - cum[c]
        if n < warm_up_steps[c]:
            return float((f_max[c] - f_start[c]) / warm_up_steps[c] * n + f_start[c])
        return float(f_min[c] + (f_max[c] - f_min[c]) * (cycle_lengths[c] - n) / cycle_lengths[c])

    return schedule


SCHEDULERS: dict[str, Callable[..., Callable[[int], float]]] = {
    "ldm.lr_scheduler.LambdaWarmUpCosineScheduler": warm_up_cosine,
    "ldm.lr_scheduler.LambdaWarmUpCosineScheduler2": warm_up_cosine_cycles,
    "ldm.lr_scheduler.LambdaLinearScheduler": warm_up_linear,
}


def build_schedule(config: Mapping[str, Any]) -> Callable[[int], float]:
    """The multiplier function of a ``scheduler_config`` (``target`` + ``params``)."""
    if not isinstance(config, Mapping) or "target" not in config:
        raise UsageError("scheduler_config needs a target (e.g. ldm.lr_scheduler.LambdaLinearScheduler)")
    target = config["target"]
    if target not in SCHEDULERS:
        raise UsageError(f"unknown scheduler {target!r}; known: {', '.join(SCHEDULERS)}")
    try:
        return SCHEDULERS[target](**dict(config.get("params") or {}))
    except TypeError as e:
        raise UsageError(f"scheduler_config {target}: {e}") from e
