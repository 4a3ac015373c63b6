"""What a run samples with (:class:`SamplerSettings`) and the one entry point that runs it (:func:`sample_latents`)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ldmcli.errors import UsageError
from ldmcli.sampling.auto import auto_choice
from ldmcli.sampling.guidance import model_denoiser
from ldmcli.sampling.registry import SAMPLERS, SPACINGS, SamplerSpec
from ldmcli.sampling.samplers import DiscreteSchedule, SamplerStep

AUTO = "auto"


class InvalidSamplerSettings(ValueError, UsageError):
    """Settings no sampler can run: a ``ValueError`` for library callers, and a usage error (exit code 2) when it
    reaches the command line. Messages name the setting, not a command-line flag."""


@dataclass(frozen=True)
class SamplerSettings:
    """Which sampler, how many steps, DDIM's eta, the classifier-free guidance scale and (optionally) the timestep
    spacing (a name in :data:`ldmcli.sampling.registry.SPACINGS`; None: the sampler's default grid).

    ``sampler="auto"`` stands for the sampler, step count and spacing that reach the accuracy of 50 DDIM steps with
    the fewest model calls at this guidance scale (:mod:`ldmcli.sampling.auto`); :meth:`resolve` returns those concrete
    settings (``steps`` is then the table's, not this object's). :meth:`timesteps`, :meth:`num_steps` and
    :func:`sample_latents` resolve by themselves; record ``resolve()``'s fields to say what actually ran.
    """

    sampler: str = "ddim"
    steps: int = 50
    eta: float = 0.0
    scale: float = 1.0
    spacing: str | None = None

    def validate(self, num_timesteps: int = 1000) -> None:
        """Raise :class:`InvalidSamplerSettings` (a ValueError) for an unknown sampler or spacing, steps out of range
        for a model with ``num_timesteps`` timesteps, or an eta or guidance scale the sampler cannot take."""
        if self.sampler != AUTO and self.sampler not in SAMPLERS:
            raise InvalidSamplerSettings(
                f"unknown sampler {self.sampler!r}: choose one of {', '.join([AUTO, *SAMPLERS])}"
            )
        fixed = self.sampler != AUTO and SAMPLERS[self.sampler].fixed_steps
        if not fixed and not 1 <= self.steps <= num_timesteps:
            raise InvalidSamplerSettings(f"steps must be between 1 and {num_timesteps}, got {self.steps}")
        if not np.isfinite(self.eta) or self.eta < 0:
            raise InvalidSamplerSettings(f"eta must be >= 0, got {self.eta}")
        if self.eta != 0 and (self.sampler == AUTO or not SAMPLERS[self.sampler].takes_eta):
            raise InvalidSamplerSettings(
                f"eta applies to DDIM only: {self.sampler.upper()} needs eta 0, got {self.eta}"
            )
        if not np.isfinite(self.scale):
            raise InvalidSamplerSettings(f"the guidance scale must be a number, got {self.scale}")
        if self.spacing is not None:
            allowed = () if self.sampler == AUTO else SAMPLERS[self.sampler].spacings
            if self.spacing not in allowed:
                choices = f"choose one of {', '.join(allowed)}" if allowed else "auto chooses its own"
                raise InvalidSamplerSettings(f"spacing {self.spacing!r} does not apply to {self.sampler}: {choices}")

    def resolve(self) -> "SamplerSettings":
        """The concrete settings: ``auto`` replaced by the measured choice for this guidance scale (sampler, steps,
        spacing; eta 0); any other sampler as given."""
        if self.sampler != AUTO:
            return self
        sampler, steps, spacing = auto_choice(self.scale)
        return replace(self, sampler=sampler, steps=steps, spacing=spacing, eta=0.0)

    @property
    def spec(self) -> SamplerSpec:
        """The registry entry of the (resolved) sampler."""
        return SAMPLERS[self.resolve().sampler]

    def timesteps(self, schedule: DiscreteSchedule) -> np.ndarray:
        """The sampler's grid, descending (the order it walks; the last point is where it ends)."""
        chosen = self.resolve()
        grid_fn = SPACINGS[chosen.spacing] if chosen.spacing is not None else SAMPLERS[chosen.sampler].grid_fn
        return grid_fn(schedule, chosen.steps)

    def num_steps(self, schedule: DiscreteSchedule) -> int:
        """Sampler steps per batch (upstream's DDIM grid can have more points than ``steps``)."""
        return len(self.timesteps(schedule)) - 1

    def model_calls(self, schedule: DiscreteSchedule) -> int:
        """Network evaluations per batch (PLMS evaluates its first step twice)."""
        return self.spec.model_calls(self.timesteps(schedule))


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
    """Run the chosen sampler on ``model`` from ``x_T`` with guidance ``scale`` (``uncond`` first, as upstream).

    ``cond`` is whatever ``model.apply_model`` takes (a tensor, a list, or ``{"c_concat": ..., "c_crossattn": ...}``:
    inpainting's concat conditioning works as is, with ``uncond=None``); ``generator`` feeds stochastic samplers only.
    """
    schedule = schedule or DiscreteSchedule.from_model(model)
    chosen = settings.resolve()
    spec = SAMPLERS[chosen.sampler]
    eps = model_denoiser(model, cond, uncond, chosen.scale, schedule=schedule)
    options: dict[str, Any] = {"callback": callback}
    if spec.stochastic:
        options["generator"] = generator
    if spec.takes_eta:
        options["eta"] = chosen.eta
    return spec.sample_fn(eps, x_T, schedule, chosen.timesteps(schedule), **options)
