"""Upstream's sampler classes, ``DDIMSampler`` and ``PLMSSampler``, as thin adapters over the sampler functions.

Notebooks written for CompVis/latent-diffusion port over unchanged::

    sampler = DDIMSampler(model)
    samples, intermediates = sampler.sample(S=50, batch_size=4, shape=[4, 32, 32], conditioning=c, eta=0.0,
                                            unconditional_guidance_scale=5.0, unconditional_conditioning=uc)

``callback(i)`` and ``img_callback(pred_x0, i)`` are called after each step as upstream; nothing is printed.
Options upstream accepts but these samplers do not implement (masking, codebook quantisation of x0, score
correctors, temperature, noise dropout) raise ``ValueError`` when set instead of being silently ignored.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from ldmcli.sampling.guidance import model_denoiser
from ldmcli.sampling.registry import SAMPLERS
from ldmcli.sampling.samplers import (
    DiscreteSchedule,
    SamplerStep,
    ddim_parameters,
    ddim_sqrt_one_minus_alphas,
    ddim_timesteps,
)


def _model_device(model: Any) -> torch.device:
    for name in ("betas", "alphas_cumprod"):
        buffer = getattr(model, name, None)
        if isinstance(buffer, Tensor):
            return buffer.device
    if hasattr(model, "parameters"):
        return next(model.parameters()).device
    return torch.device("cpu")


class _UpstreamSampler:
    sampler = "ddim"  # the registry entry (ldmcli.sampling.registry.SAMPLERS) this class runs

    def __init__(self, model: Any, schedule: str = "linear", **kwargs: Any) -> None:
        self.model = model
        self.ddpm_num_timesteps = int(model.num_timesteps)
        self.schedule = schedule

    def make_schedule(
        self, ddim_num_steps: int, ddim_discretize: str = "uniform", ddim_eta: float = 0.0, verbose: bool = True
    ) -> None:
        """Compute upstream's attributes for a grid of ``ddim_num_steps`` (``ddim_timesteps``, ``ddim_alphas``, ...)."""
        if ddim_discretize != "uniform":
            raise ValueError(f"only the 'uniform' DDIM discretization is supported, got {ddim_discretize!r}")
        self._schedule = DiscreteSchedule.from_model(self.model)
        self._grid = ddim_timesteps(ddim_num_steps, self.ddpm_num_timesteps)  # descending, as the samplers walk it
        sigmas, alphas, alphas_prev = ddim_parameters(self._schedule.alphas_cumprod, self._grid, ddim_eta)
        # upstream's attributes hold the same numbers in ascending timestep order
        self.ddim_timesteps = np.flip(self._grid[:-1]).copy()
        self.ddim_sigmas, self.ddim_alphas = sigmas.flip(0), alphas.flip(0)
        self.ddim_alphas_prev = np.flip(alphas_prev).copy()
        self.ddim_sqrt_one_minus_alphas = ddim_sqrt_one_minus_alphas(alphas).flip(0)
        self.ddim_eta = ddim_eta

    @torch.no_grad()
    def sample(
        self,
        S: int,
        batch_size: int,
        shape: Sequence[int],
        conditioning: Any = None,
        callback: Callable[[int], None] | None = None,
        normals_sequence: Any = None,
        img_callback: Callable[[Tensor, int], None] | None = None,
        quantize_x0: bool = False,
        eta: float = 0.0,
        mask: Tensor | None = None,
        x0: Tensor | None = None,
        temperature: float = 1.0,
        noise_dropout: float = 0.0,
        score_corrector: Any = None,
        corrector_kwargs: dict | None = None,
        verbose: bool = True,
        x_T: Tensor | None = None,
        log_every_t: int = 100,
        unconditional_guidance_scale: float = 1.0,
        unconditional_conditioning: Any = None,
        generator: torch.Generator | None = None,
        **kwargs: Any,
    ) -> tuple[Tensor, dict[str, list[Tensor]]]:
        """Sample ``batch_size`` latents of ``shape`` (C, H, W) in ``S`` steps; returns ``(samples, intermediates)``
        with ``intermediates = {"x_inter": [...], "pred_x0": [...]}`` logged every ``log_every_t`` steps as upstream."""
        unsupported = {
            "mask": mask is not None,
            "x0": x0 is not None,
            "quantize_x0": bool(quantize_x0),
            "score_corrector": score_corrector is not None,
            "temperature": temperature != 1.0,
            "noise_dropout": noise_dropout != 0.0,
        }
        used = [name for name, is_set in unsupported.items() if is_set]
        if used:
            raise ValueError(f"{type(self).__name__}.sample does not support {', '.join(used)}")
        self.make_schedule(ddim_num_steps=S, ddim_eta=eta, verbose=verbose)
        size = (batch_size, *shape)
        device = _model_device(self.model)
        if x_T is None:  # upstream draws from the global RNG on the model's device; a generator draws on its own
            source = generator.device if generator is not None else device
            x_T = torch.randn(size, generator=generator, device=source).to(device)
        eps = model_denoiser(
            self.model, conditioning, unconditional_conditioning, unconditional_guidance_scale, schedule=self._schedule
        )
        intermediates: dict[str, list[Tensor]] = {"x_inter": [x_T], "pred_x0": [x_T]}

        def on_step(step: SamplerStep) -> None:
            index = step.total - step.i - 1
            if index % log_every_t == 0 or index == step.total - 1:
                intermediates["x_inter"].append(step.x)
                intermediates["pred_x0"].append(step.pred_x0)
            if callback is not None:
                callback(step.i)
            if img_callback is not None:
                img_callback(step.pred_x0, step.i)

        spec = SAMPLERS[self.sampler]
        options: dict[str, Any] = {"callback": on_step}
        if spec.stochastic:
            options.update(eta=eta, generator=generator)
        samples = spec.sample_fn(eps, x_T, self._schedule, self._grid, **options)
        return samples, intermediates


class DDIMSampler(_UpstreamSampler):
    """Upstream's ``DDIMSampler(model).sample(...)`` over the registry's ``ddim`` (:func:`sample_ddim`)."""

    sampler = "ddim"


class PLMSSampler(_UpstreamSampler):
    """Upstream's ``PLMSSampler(model).sample(...)`` over the registry's ``plms`` (:func:`sample_plms`)."""

    sampler = "plms"

    def make_schedule(self, ddim_num_steps: int, ddim_discretize: str = "uniform", ddim_eta: float = 0.0,
                      verbose: bool = True) -> None:
        if ddim_eta != 0:
            raise ValueError("ddim_eta must be 0 for PLMS")
        super().make_schedule(ddim_num_steps, ddim_discretize, ddim_eta, verbose)


__all__ = ["DDIMSampler", "PLMSSampler"]
