"""Diffusion samplers as functions over an eps callable, one registry of them, guidance wrappers, and
upstream-compatible ``DDIMSampler``/``PLMSSampler`` classes (:mod:`ldmcli.sampling.compat`).

Run a sampler by name with :func:`sample_latents` and :class:`SamplerSettings`; :data:`SAMPLERS` maps each name to
its function and default grid (:class:`SamplerSpec`). Every grid is descending, in the order the sampler walks it.
"""

from ldmcli.sampling.accuracy import solver_errors
from ldmcli.sampling.guidance import classifier_free_guidance, eps_from_x0, model_denoiser
from ldmcli.sampling.registry import SAMPLERS, SPACINGS, SamplerSpec
from ldmcli.sampling.samplers import (
    CLEAN,
    DiscreteSchedule,
    SamplerStep,
    ddim_timesteps,
    dpmpp_timesteps,
    full_timesteps,
    noise_like,
    sample_ddim,
    sample_ddpm,
    sample_dpmpp_2m,
    sample_plms,
)
from ldmcli.sampling.settings import InvalidSamplerSettings, SamplerSettings, sample_latents

__all__ = [
    "CLEAN",
    "InvalidSamplerSettings",
    "SamplerSettings",
    "SamplerSpec",
    "sample_latents",
    "SAMPLERS",
    "SPACINGS",
    "DiscreteSchedule",
    "SamplerStep",
    "classifier_free_guidance",
    "ddim_timesteps",
    "dpmpp_timesteps",
    "eps_from_x0",
    "full_timesteps",
    "model_denoiser",
    "noise_like",
    "sample_ddim",
    "sample_ddpm",
    "sample_dpmpp_2m",
    "sample_plms",
    "solver_errors",
]
