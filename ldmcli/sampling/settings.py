"""What a run samples with (:class:`SamplerSettings`) and the one entry point that runs it (:func:`sample_latents`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ldmcli.errors import UsageError
from ldmcli.sampling.guidance import model_denoiser
from ldmcli.sampling.samplers import (
    SAMPLERS,
    DiscreteSchedule,
    SamplerStep,
    ddim_timesteps,
    dpmpp_timesteps,
    sample_ddim,
    sample_ddpm,
    sample_dpmpp_2m,
    sample_plms,
)


@dataclass(frozen=True)
class SamplerSettings:
    """Which sampler, how many steps, DDIM's eta and the classifier-free guidance scale."""

    sampler: str = "ddim"
    steps: int = 50
    eta: float = 0.0
    scale: float = 1.0

    def validate(self, num_timesteps: int = 1000) -> None:
        """Raise a one-line :class:`UsageError` for an unknown sampler, steps out of range, or a bad eta."""
        if self.sampler not in SAMPLERS:
            raise UsageError(f"unknown sampler {self.sampler!r}: choose one of {', '.join(SAMPLERS)}")
        if self.sampler != "ddpm" and not 1 <= self.steps <= num_timesteps:
            raise UsageError(f"steps must be between 1 and {num_timesteps}, got {self.steps}")
        if not np.isfinite(self.eta) or self.eta < 0:
            raise UsageError(f"eta must be >= 0, got {self.eta}")
        if self.eta != 0 and self.sampler != "ddim":
            raise UsageError(f"eta applies to DDIM only: {self.sampler.upper()} needs eta 0, got {self.eta}")
        if not np.isfinite(self.scale):
            raise UsageError(f"the guidance scale must be a number, got {self.scale}")

    def timesteps(self, schedule: DiscreteSchedule) -> np.ndarray:
        """The sampler's grid (ascending for DDIM/PLMS/DDPM, descending for DPM-Solver++)."""
        if self.sampler in ("ddim", "plms"):
            return ddim_timesteps(self.steps, schedule.num_timesteps)
        if self.sampler == "dpmpp":
            return dpmpp_timesteps(schedule, min(self.steps, schedule.num_timesteps - 1))
        return np.arange(schedule.num_timesteps)

    def num_steps(self, schedule: DiscreteSchedule) -> int:
        """Sampler steps per batch (upstream's DDIM grid can have more points than ``steps``)."""
        grid = self.timesteps(schedule)
        return len(grid) - 1 if self.sampler == "dpmpp" else len(grid)


def sample_latents(
    model: Any,
    x_T: torch.Tensor,
    cond: Any,
    uncond: Any,
    settings: SamplerSettings,
    *,
    schedule: DiscreteSchedule | None = None,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    callback: Callable[[SamplerStep], None] | None = None,
) -> torch.Tensor:
    """Run the chosen sampler on ``model`` from ``x_T`` with guidance ``scale`` (``uncond`` first, as upstream)."""
    schedule = schedule or DiscreteSchedule.from_model(model)
    eps = model_denoiser(model, cond, uncond, settings.scale, schedule=schedule)
    grid = settings.timesteps(schedule)
    if settings.sampler == "ddim":
        return sample_ddim(eps, x_T, schedule, grid, eta=settings.eta, generator=generator, callback=callback)
    if settings.sampler == "plms":
        return sample_plms(eps, x_T, schedule, grid, callback=callback)
    if settings.sampler == "dpmpp":
        return sample_dpmpp_2m(eps, x_T, schedule, grid, callback=callback)
    return sample_ddpm(eps, x_T, schedule, generator=generator, callback=callback)
