"""The sampler registry: one :class:`SamplerSpec` per sampler name, and the named timestep spacings.

A spec pairs a sampler function with the grid function it runs on by default; everything that runs a sampler by name
(:func:`ldmcli.sampling.sample_latents`, the compatibility classes, training's sample images, the accuracy harness)
goes through :data:`SAMPLERS`, so adding a sampler is adding one entry here. Every grid is descending, in the order
the sampler walks it (see :mod:`ldmcli.sampling.samplers` for the contract).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

import numpy as np
from torch import Tensor

from ldmcli.sampling.samplers import (
    DiscreteSchedule,
    ddim_timesteps,
    dpmpp_timesteps,
    full_timesteps,
    sample_ddim,
    sample_ddpm,
    sample_dpmpp_2m,
    sample_plms,
)
from ldmcli.sampling.multistep import karras_timesteps, sample_dpmpp_3m, sample_unipc, trailing_timesteps

GridFn = Callable[[DiscreteSchedule, int], np.ndarray]
"""``grid_fn(schedule, steps) -> descending grid`` (its length is the number of steps plus one)."""

SampleFn = Callable[..., Tensor]
"""``sample_fn(eps_model, x_T, schedule, grid, *, callback, [eta,] [generator]) -> x``."""


def _ddim_grid(schedule: DiscreteSchedule, steps: int) -> np.ndarray:
    return ddim_timesteps(steps, schedule.num_timesteps)


def _full_grid(schedule: DiscreteSchedule, steps: int) -> np.ndarray:
    return full_timesteps(schedule.num_timesteps)


def _solver_grid(schedule: DiscreteSchedule, steps: int, spacing: str = "logsnr") -> np.ndarray:
    # at most one step per trained timestep
    return dpmpp_timesteps(schedule, min(steps, schedule.num_timesteps - 1), spacing=spacing)


SPACINGS: dict[str, GridFn] = {
    "ddim": _ddim_grid,
    "full": _full_grid,
    "logsnr": partial(_solver_grid, spacing="logsnr"),
    "time": partial(_solver_grid, spacing="time"),
    "karras": karras_timesteps,
    "trailing": trailing_timesteps,
}
"""Named grids: ``ddim`` (upstream's DDIM/PLMS grid, evaluated at ``1 + k * (N // S)``, ending at timestep 0's level),
``full`` (every timestep to the clean sample: ancestral sampling), ``logsnr`` (uniform in log-SNR from N-1 to 0),
``time`` (uniform in t from N-1 to 0), ``karras`` (Karras et al.'s sigma spacing from N-1 to 0, then a denoising step
to the clean sample), ``trailing`` (uniform in t from N-1, the last step denoising to the clean sample)."""

SOLVER_SPACINGS = ("logsnr", "time", "karras", "trailing")


@dataclass(frozen=True)
class SamplerSpec:
    """A sampler by name: its function and default grid, and what it takes.

    ``stochastic``: draws noise (takes ``generator``); ``takes_eta``: DDIM's eta applies; ``extra_calls``: model
    evaluations beyond one per step (PLMS' first step evaluates twice); ``fixed_steps``: the grid ignores the step count
    (ancestral sampling walks every timestep); ``spacings``: the named grids it may run on, the default first.
    """

    sample_fn: SampleFn
    grid_fn: GridFn
    title: str
    spacings: tuple[str, ...]
    stochastic: bool = False
    takes_eta: bool = False
    extra_calls: int = 0
    fixed_steps: bool = False

    def model_calls(self, grid: np.ndarray) -> int:
        """Network evaluations for one batch on ``grid`` (a guided evaluation is one batched call)."""
        return len(grid) - 1 + self.extra_calls


SAMPLERS: dict[str, SamplerSpec] = {
    "ddim": SamplerSpec(sample_ddim, SPACINGS["ddim"], "DDIM (Song et al. 2021)", ("ddim", *SOLVER_SPACINGS),
                        stochastic=True, takes_eta=True),
    "plms": SamplerSpec(sample_plms, SPACINGS["ddim"], "PLMS (Liu et al. 2022)", ("ddim",), extra_calls=1),
    "dpmpp": SamplerSpec(sample_dpmpp_2m, SPACINGS["logsnr"], "DPM-Solver++(2M) (Lu et al. 2022)", SOLVER_SPACINGS),
    "dpmpp3m": SamplerSpec(sample_dpmpp_3m, SPACINGS["logsnr"], "DPM-Solver++(3M) (Lu et al. 2022)", SOLVER_SPACINGS),
    "unipc": SamplerSpec(partial(sample_unipc, variant="bh2", order=2), SPACINGS["logsnr"],
                         "UniPC-2, B(h) = e^h - 1 (Zhao et al. 2023; their choice for guided sampling)",
                         SOLVER_SPACINGS),
    "unipc-bh1": SamplerSpec(partial(sample_unipc, variant="bh1", order=3), SPACINGS["logsnr"],
                             "UniPC-3, B(h) = h (Zhao et al. 2023; their choice without guidance)", SOLVER_SPACINGS),
    "ddpm": SamplerSpec(sample_ddpm, SPACINGS["full"], "DDPM ancestral sampling (Ho et al. 2020)", ("full",),
                        stochastic=True, fixed_steps=True),
}
"""Every sampler ``ldm`` runs, by the name ``--sampler`` takes (``auto`` is resolved by
:meth:`ldmcli.sampling.SamplerSettings.resolve` to one of these)."""
