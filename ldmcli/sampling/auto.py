"""``--sampler auto``: the sampler, step count and spacing that reach 50 DDIM steps' accuracy with the fewest model
calls, per guidance scale.

The table is measured on the built-in ``digits`` LDM: per guidance scale, the registered sampler, grid and step count
with the fewest model calls whose final latent AND decoded image are as close to the 1000-step DDIM solution as 50
DDIM steps' (``python benchmarks/sampler_accuracy.py --models digits --write-auto`` regenerates it; README,
"Choosing a sampler"). A scale between two rows takes the row of the next larger scale (more guidance needs more
accuracy); a scale above the last row takes the last row.
"""

from __future__ import annotations

AUTO_TABLE: tuple[tuple[float, str, int, str], ...] = (
    # (guidance scale up to, sampler, steps, spacing): written by benchmarks/sampler_accuracy.py
    (1.0, 'unipc', 10, 'logsnr'),  # measured at scale 1.0: 10 calls
    (3.0, 'unipc', 12, 'logsnr'),  # measured at scale 3.0: 12 calls
    (5.0, 'unipc', 12, 'logsnr'),  # measured at scale 5.0: 12 calls
    (float("inf"), 'unipc', 12, 'logsnr'),  # measured at scale 7.5: 12 calls
)


def auto_choice(scale: float) -> tuple[str, int, str]:
    """``(sampler, steps, spacing)`` for guidance ``scale``."""
    for up_to, sampler, steps, spacing in AUTO_TABLE:
        if scale <= up_to:
            return sampler, steps, spacing
    _, sampler, steps, spacing = AUTO_TABLE[-1]
    return sampler, steps, spacing
