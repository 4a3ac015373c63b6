"""Samplers for discrete-time diffusion models, as small functions over an eps-predicting callable.

Every sampler has the shape ``sample_*(model, x, schedule, timesteps, *, ..., callback=None) -> x_0`` where
``model(x, t) -> eps`` takes the current state and a ``long`` tensor of timesteps (one per batch element) and returns
the predicted noise. Classifier-free guidance and the x0 parameterisation are wrappers that build such a callable
(:mod:`ldmcli.sampling.guidance`); the samplers never branch on them.

* :func:`sample_ddpm`: ancestral sampling over the full chain (Ho et al. 2020), upstream's "vanilla" ``p_sample_loop``.
* :func:`sample_ddim`: DDIM (Song et al. 2021) with ``eta``, on upstream's timestep grid (:func:`ddim_timesteps`).
* :func:`sample_plms`: pseudo linear multistep (Liu et al. 2022, PNDM) as upstream's ``plms.py``.
* :func:`sample_dpmpp_2m`: DPM-Solver++(2M) (Lu et al. 2022), the data-prediction multistep solver.

DDPM, DDIM and PLMS follow the upstream latent-diffusion code's arithmetic and dtypes step for step (float32 state,
coefficients taken from the float32 ``alphas_cumprod`` buffer the way upstream derives them), so the same ``x_T``
gives the same result to float32 rounding. Progress goes through ``callback(SamplerStep)``; nothing here prints.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from ldmcli.models.schedule import schedule_buffers

EpsModel = Callable[[Tensor, Tensor], Tensor]
"""``model(x, t) -> eps``: the noise prediction for state ``x`` at integer timesteps ``t`` (shape ``[batch]``)."""

Generators = Union[torch.Generator, Sequence[torch.Generator], None]
"""Where sampler noise comes from: the global RNG (None), one generator, or one generator per batch element."""

SAMPLERS = ("ddim", "plms", "dpmpp", "ddpm")


@dataclass(frozen=True)
class SamplerStep:
    """What a sampler reports after each step: ``i`` of ``total`` (0-based), the timestep evaluated, the new state
    and the current prediction of the clean sample."""

    i: int
    total: int
    t: int
    x: Tensor
    pred_x0: Tensor


Callback = Callable[[SamplerStep], None]


@dataclass(frozen=True)
class DiscreteSchedule:
    """The float32 schedule buffers the samplers read (upstream names), one value per training timestep."""

    alphas_cumprod: Tensor
    sqrt_recip_alphas_cumprod: Tensor
    sqrt_recipm1_alphas_cumprod: Tensor
    posterior_mean_coef1: Tensor
    posterior_mean_coef2: Tensor
    posterior_log_variance_clipped: Tensor

    @property
    def num_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    @classmethod
    def from_betas(cls, betas: np.ndarray | Tensor) -> "DiscreteSchedule":
        """Derive every buffer from float64 betas with upstream's formulas (see :mod:`ldmcli.models.schedule`)."""
        betas = np.asarray(betas.detach().cpu().double() if isinstance(betas, Tensor) else betas, dtype=np.float64)
        buffers = schedule_buffers(betas)
        return cls(**{name: buffers[name] for name in cls.__dataclass_fields__})

    @classmethod
    def from_model(cls, model: object) -> "DiscreteSchedule":
        """The buffers of a ``LatentDiffusion`` (as stored in its checkpoint), on the CPU in float32."""
        values = {}
        for name in cls.__dataclass_fields__:
            value = getattr(model, name, None)
            if not isinstance(value, Tensor):
                # A model that only carries betas: recompute the rest the upstream way.
                return cls.from_betas(getattr(model, "betas"))
            values[name] = value.detach().to("cpu", torch.float32)
        return cls(**values)


# --------------------------------------------------------------------------------------------------------- helpers


def noise_like(x: Tensor, generator: Generators = None) -> Tensor:
    """Standard normal noise shaped like ``x``.

    With one generator the noise is drawn on the generator's device and moved to ``x``'s (so a CPU generator gives
    the same numbers whatever device samples); with a list of generators each batch element draws its own, so an
    image does not depend on what else is in its batch.
    """
    if generator is None:
        return torch.randn(x.shape, device=x.device, dtype=x.dtype)
    if isinstance(generator, torch.Generator):
        return torch.randn(x.shape, generator=generator, device=generator.device, dtype=x.dtype).to(x.device)
    generators = list(generator)
    if len(generators) != x.shape[0]:
        raise ValueError(f"got {len(generators)} generators for a batch of {x.shape[0]}")
    return torch.stack(
        [torch.randn(x.shape[1:], generator=g, device=g.device, dtype=x.dtype).to(x.device) for g in generators]
    )


def _full_t(x: Tensor, step: int) -> Tensor:
    return torch.full((x.shape[0],), int(step), device=x.device, dtype=torch.long)


def _scalar(value: float | Tensor, like: Tensor) -> Tensor:
    """A per-sample coefficient shaped ``[batch, 1, ...]`` in float32, made as upstream's ``torch.full`` makes it.

    (The shape matters for bit-equality: dividing by a 0-d tensor takes a different CPU kernel path.)
    """
    shape = (like.shape[0],) + (1,) * (like.ndim - 1)
    return torch.full(shape, float(value), dtype=torch.float32, device=like.device).to(like.dtype)


# ---------------------------------------------------------------------------------------------------------- DDIM


def ddim_timesteps(steps: int, num_timesteps: int = 1000) -> np.ndarray:
    """Upstream's "uniform" DDIM grid: ``range(0, N, N // steps) + 1``, ascending (S=10 gives 1, 101, ..., 901).

    When ``N // steps`` does not divide ``N`` the grid has more than ``steps`` points, exactly as upstream. Where
    upstream's grid would reach timestep ``N`` itself (more than N/2 steps, or N-1 divisible by N // steps) upstream
    fails with an IndexError; here that one out-of-range point is dropped.
    """
    if steps < 1:
        raise ValueError(f"the number of steps must be at least 1, got {steps}")
    stride = num_timesteps // steps
    if stride < 1:
        raise ValueError(f"at most {num_timesteps} steps for a model with {num_timesteps} timesteps, got {steps}")
    grid = np.asarray(list(range(0, num_timesteps, stride))) + 1
    return grid[grid < num_timesteps]


def ddim_parameters(
    alphas_cumprod: Tensor, timesteps: np.ndarray, eta: float, final_alpha_cumprod: float | None = None
) -> tuple[Tensor, Tensor, np.ndarray]:
    """``(sigmas, alphas, alphas_prev)`` for a DDIM grid, with upstream's dtypes and order of operations.

    ``alphas`` are the float32 ``alphas_cumprod[timesteps]``; ``alphas_prev`` (float64) starts with
    ``alphas_cumprod[0]``
    (upstream's choice; ``final_alpha_cumprod`` overrides it, e.g. 1.0 to end on the clean sample); ``sigmas``
    (float64) follow Song et al.'s eq. (16) scaled by ``eta``.
    """
    alphacums = alphas_cumprod.detach().to("cpu", torch.float32)
    timesteps = np.asarray(timesteps, dtype=np.int64)
    alphas = alphacums[timesteps]
    first = float(alphacums[0]) if final_alpha_cumprod is None else float(final_alpha_cumprod)
    alphas_prev = np.asarray([first] + alphacums[timesteps[:-1]].tolist(), dtype=np.float64)
    # Upstream mixes a numpy float64 array with the float32 tensor: the division by (1 - alphas) becomes a float32
    # reciprocal times the float64 numerator, the rest is float64.
    ratio = torch.reciprocal(1 - alphas) * torch.from_numpy(1 - alphas_prev)
    sigmas = eta * _np_sqrt(ratio * (1 - alphas / torch.from_numpy(alphas_prev)))
    return sigmas, alphas, alphas_prev


def _np_sqrt(value: Tensor) -> Tensor:
    """Square root through numpy, as upstream computes these buffers: numpy's float32 sqrt is correctly rounded,
    torch's CPU kernel can differ from it in the last bit, and that bit shows after a hundred steps."""
    return torch.from_numpy(np.sqrt(value.numpy()))


def ddim_sqrt_one_minus_alphas(alphas: Tensor) -> Tensor:
    """``sqrt(1 - alphas)`` for the DDIM grid (float32, numpy's sqrt as upstream)."""
    return _np_sqrt(1.0 - alphas)


@torch.no_grad()
def sample_ddim(
    model: EpsModel,
    x: Tensor,
    schedule: DiscreteSchedule,
    timesteps: np.ndarray | Sequence[int],
    *,
    eta: float = 0.0,
    generator: Generators = None,
    callback: Callback | None = None,
    final_alpha_cumprod: float | None = None,
) -> Tensor:
    """DDIM (Song et al. 2021, "Denoising Diffusion Implicit Models"), upstream's ``p_sample_ddim`` step for step.

    ``timesteps`` is the ascending grid (e.g. :func:`ddim_timesteps`); sampling walks it from the top. ``eta=0`` is
    the deterministic sampler, ``eta=1`` has DDPM-like variance. Returns the state after the last step (at the noise
    level of ``alphas_cumprod[0]`` as upstream, unless ``final_alpha_cumprod`` says otherwise).
    """
    timesteps = np.asarray(timesteps, dtype=np.int64)
    sigmas, alphas, alphas_prev = ddim_parameters(schedule.alphas_cumprod, timesteps, eta, final_alpha_cumprod)
    sqrt_one_minus_alphas = ddim_sqrt_one_minus_alphas(alphas)
    total = len(timesteps)
    for i, step in enumerate(np.flip(timesteps)):
        index = total - i - 1
        a_t = _scalar(alphas[index], x)
        a_prev = _scalar(alphas_prev[index], x)
        sigma_t = _scalar(sigmas[index], x)
        sqrt_one_minus_at = _scalar(sqrt_one_minus_alphas[index], x)

        e_t = model(x, _full_t(x, step))
        pred_x0 = (x - sqrt_one_minus_at * e_t) / a_t.sqrt()
        dir_xt = (1.0 - a_prev - sigma_t**2).sqrt() * e_t
        x = a_prev.sqrt() * pred_x0 + dir_xt
        if float(sigmas[index]) != 0.0:
            x = x + sigma_t * noise_like(x, generator)
        if callback is not None:
            callback(SamplerStep(i, total, int(step), x, pred_x0))
    return x


# ---------------------------------------------------------------------------------------------------------- PLMS


@torch.no_grad()
def sample_plms(
    model: EpsModel,
    x: Tensor,
    schedule: DiscreteSchedule,
    timesteps: np.ndarray | Sequence[int],
    *,
    eta: float = 0.0,
    callback: Callback | None = None,
) -> Tensor:
    """Pseudo linear multistep sampling (Liu et al. 2022, "Pseudo Numerical Methods for Diffusion Models"), as
    upstream's ``plms.py``: a pseudo improved-Euler first step (two model evaluations), then Adams-Bashforth of order
    2, 3 and 4 on the eps history, each applied through the DDIM (eta 0) update. ``eta`` must be 0.
    """
    if eta != 0:
        raise ValueError("PLMS is deterministic: eta must be 0")
    timesteps = np.asarray(timesteps, dtype=np.int64)
    _, alphas, alphas_prev = ddim_parameters(schedule.alphas_cumprod, timesteps, 0.0)
    sqrt_one_minus_alphas = ddim_sqrt_one_minus_alphas(alphas)
    time_range = np.flip(timesteps)
    total = len(timesteps)
    old_eps: list[Tensor] = []

    for i, step in enumerate(time_range):
        index = total - i - 1
        a_t = _scalar(alphas[index], x)
        a_prev = _scalar(alphas_prev[index], x)
        sqrt_one_minus_at = _scalar(sqrt_one_minus_alphas[index], x)
        sigma_t = _scalar(0.0, x)

        def update(e: Tensor, x: Tensor = x) -> tuple[Tensor, Tensor]:
            pred_x0 = (x - sqrt_one_minus_at * e) / a_t.sqrt()
            dir_xt = (1.0 - a_prev - sigma_t**2).sqrt() * e
            return a_prev.sqrt() * pred_x0 + dir_xt, pred_x0

        e_t = model(x, _full_t(x, step))
        if len(old_eps) == 0:
            # pseudo improved Euler (2nd order): evaluate again at the next grid point
            x_next, _ = update(e_t)
            t_next = time_range[min(i + 1, total - 1)]
            e_t_next = model(x_next, _full_t(x, t_next))
            e_prime = (e_t + e_t_next) / 2
        elif len(old_eps) == 1:
            e_prime = (3 * e_t - old_eps[-1]) / 2
        elif len(old_eps) == 2:
            e_prime = (23 * e_t - 16 * old_eps[-1] + 5 * old_eps[-2]) / 12
        else:
            e_prime = (55 * e_t - 59 * old_eps[-1] + 37 * old_eps[-2] - 9 * old_eps[-3]) / 24
        x, pred_x0 = update(e_prime)
        old_eps.append(e_t)
        if len(old_eps) >= 4:
            old_eps.pop(0)
        if callback is not None:
            callback(SamplerStep(i, total, int(step), x, pred_x0))
    return x


# ---------------------------------------------------------------------------------------------------------- DDPM


@torch.no_grad()
def sample_ddpm(
    model: EpsModel,
    x: Tensor,
    schedule: DiscreteSchedule,
    timesteps: np.ndarray | Sequence[int] | None = None,
    *,
    clip_denoised: bool = False,
    generator: Generators = None,
    callback: Callback | None = None,
) -> Tensor:
    """Ancestral sampling (Ho et al. 2020, "Denoising Diffusion Probabilistic Models") over the full chain, as
    upstream's ``LatentDiffusion.p_sample_loop``: x0 from eps, the posterior mean, the clipped posterior log-variance,
    no noise at t = 0. ``clip_denoised`` is False for latent models (upstream sets it so). ``timesteps`` defaults to
    every step ``N-1, ..., 0``; pass an ascending subset ending at 0 only for pixel-exact chains of your own.
    """
    n = schedule.num_timesteps
    steps = np.arange(n) if timesteps is None else np.asarray(timesteps, dtype=np.int64)
    dev = x.device
    sqrt_recip = schedule.sqrt_recip_alphas_cumprod.to(dev)
    sqrt_recipm1 = schedule.sqrt_recipm1_alphas_cumprod.to(dev)
    coef1 = schedule.posterior_mean_coef1.to(dev)
    coef2 = schedule.posterior_mean_coef2.to(dev)
    log_var = schedule.posterior_log_variance_clipped.to(dev)
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)

    def at(buf: Tensor, t: Tensor) -> Tensor:
        return buf.gather(-1, t).reshape(shape).to(x.dtype)

    total = len(steps)
    for i, step in enumerate(np.flip(steps)):
        t = _full_t(x, step)
        eps = model(x, t)
        pred_x0 = at(sqrt_recip, t) * x - at(sqrt_recipm1, t) * eps
        if clip_denoised:
            pred_x0 = pred_x0.clamp(-1.0, 1.0)
        mean = at(coef1, t) * pred_x0 + at(coef2, t) * x
        if int(step) == 0:
            x = mean
        else:
            x = mean + (0.5 * at(log_var, t)).exp() * noise_like(x, generator)
        if callback is not None:
            callback(SamplerStep(i, total, int(step), x, pred_x0))
    return x


# --------------------------------------------------------------------------------------------------- DPM-Solver++


def dpmpp_timesteps(
    schedule: DiscreteSchedule, steps: int, spacing: str = "logsnr", t_start: int | None = None, t_end: int = 0
) -> np.ndarray:
    """A descending integer grid ``t_start = t_0 > ... > t_steps = t_end`` for :func:`sample_dpmpp_2m`.

    ``logsnr`` (default) spaces the points uniformly in lambda = log(alpha / sigma) between the model's first and last
    timestep (Lu et al.'s recommendation for few-step sampling), ``time`` uniformly in t; each point is rounded to the
    nearest integer timestep the model was trained on (duplicates, possible only for very many steps, are dropped).
    """
    n = schedule.num_timesteps
    t_start = n - 1 if t_start is None else int(t_start)
    if steps < 1:
        raise ValueError(f"the number of steps must be at least 1, got {steps}")
    if not 0 <= t_end < t_start < n:
        raise ValueError(f"need 0 <= t_end < t_start < {n}, got {t_end} and {t_start}")
    if spacing == "time":
        grid = np.linspace(t_start, t_end, steps + 1)
    elif spacing == "logsnr":
        ac = schedule.alphas_cumprod.double().cpu().numpy()
        lam = 0.5 * (np.log(ac) - np.log1p(-ac))
        targets = np.linspace(lam[t_start], lam[t_end], steps + 1)
        # lambda decreases with t: interpolate t as a function of lambda on the reversed (increasing) arrays
        grid = np.interp(targets, lam[::-1], np.arange(n)[::-1].astype(np.float64))
    else:
        raise ValueError(f"unknown spacing {spacing!r}; expected 'logsnr' or 'time'")
    grid = np.round(grid).astype(np.int64)
    grid[0], grid[-1] = t_start, t_end
    _, first = np.unique(grid, return_index=True)
    return grid[np.sort(first)]


@torch.no_grad()
def sample_dpmpp_2m(
    model: EpsModel,
    x: Tensor,
    schedule: DiscreteSchedule,
    timesteps: np.ndarray | Sequence[int],
    *,
    callback: Callback | None = None,
    lower_order_final: bool = True,
) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic
    Models", Algorithm 2): the second-order multistep solver of the diffusion ODE in data-prediction form, on the
    model's discrete alphas.

    ``timesteps`` is descending (:func:`dpmpp_timesteps`): the model is evaluated at all but the last point and the
    result is the state at the last one (timestep 0, the same level upstream's DDIM ends at). The first step is first
    order (DDIM); with fewer than 10 steps the last one is too (Lu et al.'s ``lower_order_final``).
    """
    grid = [int(t) for t in np.asarray(timesteps, dtype=np.int64)]
    if len(grid) < 2 or any(b >= a for a, b in zip(grid, grid[1:])):
        raise ValueError("DPM-Solver++ needs a strictly descending grid of at least two timesteps")
    ac = schedule.alphas_cumprod.double().cpu()
    alpha = [math.sqrt(float(ac[t])) for t in grid]
    sigma = [math.sqrt(1.0 - float(ac[t])) for t in grid]
    lam = [math.log(a) - math.log(s) for a, s in zip(alpha, sigma)]
    total = len(grid) - 1
    prev_x0: Tensor | None = None
    prev_h = 0.0
    for i in range(total):
        eps = model(x, _full_t(x, grid[i]))
        pred_x0 = (x - sigma[i] * eps) / alpha[i]
        h = lam[i + 1] - lam[i]
        first_order = prev_x0 is None or (lower_order_final and total < 10 and i == total - 1)
        if first_order:
            d = pred_x0
        else:
            r = prev_h / h
            d = (1 + 1 / (2 * r)) * pred_x0 - (1 / (2 * r)) * prev_x0
        x = (sigma[i + 1] / sigma[i]) * x - (alpha[i + 1] * math.expm1(-h)) * d
        prev_x0, prev_h = pred_x0, h
        if callback is not None:
            callback(SamplerStep(i, total, grid[i], x, pred_x0))
    return x
