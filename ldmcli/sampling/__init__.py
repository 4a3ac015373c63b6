"""Diffusion samplers (DDPM, DDIM, PLMS, DPM-Solver++(2M)) as functions over an eps callable, guidance wrappers, and
upstream-compatible ``DDIMSampler``/``PLMSSampler`` classes (:mod:`ldmcli.sampling.compat`)."""

from ldmcli.sampling.accuracy import solver_errors
from ldmcli.sampling.guidance import classifier_free_guidance, eps_from_x0, model_denoiser
from ldmcli.sampling.samplers import (
    SAMPLERS,
    DiscreteSchedule,
    SamplerStep,
    ddim_timesteps,
    dpmpp_timesteps,
    noise_like,
    sample_ddim,
    sample_ddpm,
    sample_dpmpp_2m,
    sample_plms,
)
from ldmcli.sampling.settings import SamplerSettings, sample_latents

__all__ = [
    "SamplerSettings",
    "sample_latents",
    "SAMPLERS",
    "DiscreteSchedule",
    "SamplerStep",
    "classifier_free_guidance",
    "ddim_timesteps",
    "dpmpp_timesteps",
    "eps_from_x0",
    "model_denoiser",
    "noise_like",
    "sample_ddim",
    "sample_ddpm",
    "sample_dpmpp_2m",
    "sample_plms",
    "solver_errors",
]
