"""``--sampler auto``: the sampler, step count and spacing that reach 50 DDIM steps' accuracy with the fewest model
calls, per guidance scale.

The table is measured (``python benchmarks/sampler_accuracy.py`` regenerates it); a scale between two rows takes the
row of the next larger scale (more guidance needs more accuracy), a scale above the last row takes the last row.
"""

from __future__ import annotations

AUTO_TABLE: tuple[tuple[float, str, int, str], ...] = (
    # (guidance scale up to, sampler, steps, spacing): issue 4's measurement (DPM-Solver++(2M) with 20 logSNR-uniform
    # steps closer to the exact ODE solution than 50 DDIM steps on the test model and on digits)
    (float("inf"), "dpmpp", 20, "logsnr"),
)


def auto_choice(scale: float) -> tuple[str, int, str]:
    """``(sampler, steps, spacing)`` for guidance ``scale``."""
    for up_to, sampler, steps, spacing in AUTO_TABLE:
        if scale <= up_to:
            return sampler, steps, spacing
    _, sampler, steps, spacing = AUTO_TABLE[-1]
    return sampler, steps, spacing
