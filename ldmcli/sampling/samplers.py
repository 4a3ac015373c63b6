"""Samplers for discrete-time diffusion models, as small functions over an eps-predicting callable.

The contract every sampler follows (the registry in :mod:`ldmcli.sampling.registry` lists them)::

    sample_x(model, x, schedule, timesteps, *, [eta=..., generator=...,] callback=None) -> x at timesteps[-1]

* ``model(x, t) -> eps`` takes the current state and a ``long`` tensor of timesteps (one per batch element) and
  returns the predicted noise. Classifier-free guidance and the x0 parameterisation are wrappers that build such a
  callable (:mod:`ldmcli.sampling.guidance`); the samplers never branch on them.
* ``timesteps`` is the grid **in the order the sampler walks it: strictly descending**, e.g. ``[901, 801, ..., 1,
  0]``. The model is evaluated at every point but the last; the last point is the noise level the result is at.
  :data:`CLEAN` (-1) as the last point means the clean sample itself (alpha_bar = 1, sigma = 0): the last step is
  then a denoising step that returns the model's prediction of x0. ``len(timesteps) - 1`` is the number of steps.
* Only stochastic samplers take ``generator``, only DDIM takes ``eta``: no sampler accepts an argument it ignores.

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

Grid = Union[np.ndarray, Sequence[int]]
"""A strictly descending timestep grid; the last point is where the sampler ends (:data:`CLEAN`: the clean sample)."""

CLEAN = -1
"""The grid point past timestep 0: alpha_bar = 1, sigma = 0, i.e. the clean sample (a final denoising step)."""


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

    def alpha_sigma(self, t: int) -> tuple[float, float]:
        """``(alpha_t, sigma_t) = (sqrt(alpha_bar_t), sqrt(1 - alpha_bar_t))`` in float64; ``(1, 0)`` at
        :data:`CLEAN`."""
        if t == CLEAN:
            return 1.0, 0.0
        a = float(self.alphas_cumprod[t].double())
        return math.sqrt(a), math.sqrt(1.0 - a)

    def log_snr(self, t: int) -> float:
        """lambda_t = log(alpha_t / sigma_t) (Lu et al.'s half log-SNR); +inf at :data:`CLEAN`."""
        alpha, sigma = self.alpha_sigma(t)
        return math.inf if sigma == 0.0 else math.log(alpha) - math.log(sigma)


# --------------------------------------------------------------------------------------------------------- helpers


def noise_like(x: Tensor, generator: Generators = None) -> Tensor:
    """Standard normal noise shaped like ``x`` (the one noise helper: samplers and training draw through it).

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


def check_grid(timesteps: Grid, schedule: DiscreteSchedule) -> list[int]:
    """``timesteps`` as a list of ints, or a ValueError unless it is a grid of the contract: at least two points,
    strictly descending, within ``[CLEAN, N - 1]``."""
    grid = [int(t) for t in np.asarray(timesteps, dtype=np.int64).reshape(-1)]
    if len(grid) < 2:
        raise ValueError(f"a timestep grid needs at least two points (start and end), got {grid}")
    if any(b >= a for a, b in zip(grid, grid[1:])):
        raise ValueError("a timestep grid must be strictly descending (the order the sampler walks it)")
    if grid[0] >= schedule.num_timesteps or grid[-1] < CLEAN:
        raise ValueError(f"grid points must lie in [{CLEAN}, {schedule.num_timesteps - 1}], got {grid[0]}..{grid[-1]}")
    return grid


def _full_t(x: Tensor, step: int) -> Tensor:
    return torch.full((x.shape[0],), int(step), device=x.device, dtype=torch.long)


def _scalar(value: float | Tensor, like: Tensor) -> Tensor:
    """A per-sample coefficient shaped ``[batch, 1, ...]`` in float32, made as upstream's ``torch.full`` makes it.

    (The shape matters for bit-equality: dividing by a 0-d tensor takes a different CPU kernel path.)
    """
    shape = (like.shape[0],) + (1,) * (like.ndim - 1)
    return torch.full(shape, float(value), dtype=torch.float32, device=like.device).to(like.dtype)


# ----------------------------------------------------------------------------------------------------------- grids


def ddim_timesteps(steps: int, num_timesteps: int = 1000) -> np.ndarray:
    """Upstream's "uniform" DDIM grid, descending, ending at timestep 0's noise level where upstream ends: S=10 gives
    ``[901, 801, ..., 101, 1, 0]`` (upstream evaluates ``range(0, N, N // S) + 1``, and its last step goes to
    ``alphas_cumprod[0]``).

    When ``N // steps`` does not divide ``N`` the grid has more than ``steps`` steps, exactly as upstream. Where
    upstream's grid would reach timestep ``N`` itself (more than N/2 steps, or N-1 divisible by N // steps) upstream
    fails with an IndexError; here that one out-of-range point is dropped.
    """
    if steps < 1:
        raise ValueError(f"the number of steps must be at least 1, got {steps}")
    stride = num_timesteps // steps
    if stride < 1:
        raise ValueError(f"at most {num_timesteps} steps for a model with {num_timesteps} timesteps, got {steps}")
    evaluated = np.asarray(list(range(0, num_timesteps, stride))) + 1
    evaluated = evaluated[evaluated < num_timesteps]
    return np.append(np.flip(evaluated), 0).astype(np.int64)


def full_timesteps(num_timesteps: int) -> np.ndarray:
    """Every timestep, ``N-1, ..., 0``, then :data:`CLEAN`: the chain ancestral (DDPM) sampling walks."""
    return np.arange(num_timesteps - 1, CLEAN - 1, -1, dtype=np.int64)


def dpmpp_timesteps(
    schedule: DiscreteSchedule, steps: int, spacing: str = "logsnr", t_start: int | None = None, t_end: int = 0
) -> np.ndarray:
    """A descending integer grid ``t_start = t_0 > ... > t_steps = t_end`` for the multistep solvers.

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


# ---------------------------------------------------------------------------------------------------------- DDIM


def ddim_parameters(alphas_cumprod: Tensor, timesteps: Grid, eta: float) -> tuple[Tensor, Tensor, np.ndarray]:
    """``(sigmas, alphas, alphas_prev)`` for each step of a descending grid, in walk order, with upstream's dtypes.

    ``alphas`` are the float32 ``alphas_cumprod`` at the evaluated points; ``alphas_prev`` (float64) at the point
    each step goes to (1.0 for :data:`CLEAN`); ``sigmas`` (float64) follow Song et al.'s eq. (16) scaled by ``eta``.
    (Upstream stores the same numbers in ascending order; :class:`ldmcli.sampling.compat.DDIMSampler` flips them.)
    """
    alphacums = alphas_cumprod.detach().to("cpu", torch.float32)
    grid = np.asarray(timesteps, dtype=np.int64)
    alphas = alphacums[grid[:-1]]
    alphas_prev = np.asarray([1.0 if t == CLEAN else float(alphacums[t]) for t in grid[1:]], dtype=np.float64)
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
    timesteps: Grid,
    *,
    eta: float = 0.0,
    generator: Generators = None,
    callback: Callback | None = None,
) -> Tensor:
    """DDIM (Song et al. 2021, "Denoising Diffusion Implicit Models", eq. (12)), upstream's ``p_sample_ddim`` step
    for step.

    ``timesteps`` is descending (e.g. :func:`ddim_timesteps`: upstream's grid, ending at timestep 0's level as
    upstream does). ``eta=0`` is the deterministic sampler, ``eta=1`` has DDPM-like variance (eq. (16)).
    """
    grid = check_grid(timesteps, schedule)
    sigmas, alphas, alphas_prev = ddim_parameters(schedule.alphas_cumprod, grid, eta)
    sqrt_one_minus_alphas = ddim_sqrt_one_minus_alphas(alphas)
    total = len(grid) - 1
    for i in range(total):
        a_t = _scalar(alphas[i], x)
        a_prev = _scalar(alphas_prev[i], x)
        sigma_t = _scalar(sigmas[i], x)
        sqrt_one_minus_at = _scalar(sqrt_one_minus_alphas[i], x)

        e_t = model(x, _full_t(x, grid[i]))
        pred_x0 = (x - sqrt_one_minus_at * e_t) / a_t.sqrt()
        dir_xt = (1.0 - a_prev - sigma_t**2).sqrt() * e_t
        x = a_prev.sqrt() * pred_x0 + dir_xt
        if float(sigmas[i]) != 0.0:
            x = x + sigma_t * noise_like(x, generator)
        if callback is not None:
            callback(SamplerStep(i, total, grid[i], x, pred_x0))
    return x


# ---------------------------------------------------------------------------------------------------------- PLMS


@torch.no_grad()
def sample_plms(
    model: EpsModel,
    x: Tensor,
    schedule: DiscreteSchedule,
    timesteps: Grid,
    *,
    callback: Callback | None = None,
) -> Tensor:
    """Pseudo linear multistep sampling (Liu et al. 2022, "Pseudo Numerical Methods for Diffusion Models", eqs. (11)
    and (12)), as upstream's ``plms.py``: a pseudo improved-Euler first step (two model evaluations), then
    Adams-Bashforth of order 2, 3 and 4 on the eps history, each applied through the DDIM (eta 0) update. The eps
    history assumes equal steps: use it on :func:`ddim_timesteps`.
    """
    grid = check_grid(timesteps, schedule)
    _, alphas, alphas_prev = ddim_parameters(schedule.alphas_cumprod, grid, 0.0)
    sqrt_one_minus_alphas = ddim_sqrt_one_minus_alphas(alphas)
    total = len(grid) - 1
    old_eps: list[Tensor] = []

    for i in range(total):
        step = grid[i]
        a_t = _scalar(alphas[i], x)
        a_prev = _scalar(alphas_prev[i], x)
        sqrt_one_minus_at = _scalar(sqrt_one_minus_alphas[i], x)
        sigma_t = _scalar(0.0, x)

        def update(e: Tensor, x: Tensor = x) -> tuple[Tensor, Tensor]:
            pred_x0 = (x - sqrt_one_minus_at * e) / a_t.sqrt()
            dir_xt = (1.0 - a_prev - sigma_t**2).sqrt() * e
            return a_prev.sqrt() * pred_x0 + dir_xt, pred_x0

        e_t = model(x, _full_t(x, step))
        if len(old_eps) == 0:
            # pseudo improved Euler (2nd order): evaluate again at the next evaluated grid point (upstream's choice)
            x_next, _ = update(e_t)
            t_next = grid[min(i + 1, total - 1)]
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
            callback(SamplerStep(i, total, step, x, pred_x0))
    return x


# ---------------------------------------------------------------------------------------------------------- DDPM


@torch.no_grad()
def sample_ddpm(
    model: EpsModel,
    x: Tensor,
    schedule: DiscreteSchedule,
    timesteps: Grid,
    *,
    generator: Generators = None,
    callback: Callback | None = None,
    clip_denoised: bool = False,
) -> Tensor:
    """Ancestral sampling (Ho et al. 2020, "Denoising Diffusion Probabilistic Models", Algorithm 2) as upstream's
    ``LatentDiffusion.p_sample_loop``: x0 from eps, the posterior mean (eq. (7)), the clipped posterior log-variance,
    no noise at t = 0. ``timesteps`` is the chain :func:`full_timesteps` (or its tail ``k, k-1, ..., 0, CLEAN``):
    every step goes one timestep down and the last one to the clean sample. ``clip_denoised`` is False for latent
    models (upstream sets it so).
    """
    grid = check_grid(timesteps, schedule)
    if grid[-1] != CLEAN or grid[0] - grid[-1] != len(grid) - 1:
        raise ValueError("ancestral sampling steps one timestep at a time to the clean sample: the grid must be "
                         "t, t-1, ..., 0, CLEAN")
    dev = x.device
    sqrt_recip = schedule.sqrt_recip_alphas_cumprod.to(dev)
    sqrt_recipm1 = schedule.sqrt_recipm1_alphas_cumprod.to(dev)
    coef1 = schedule.posterior_mean_coef1.to(dev)
    coef2 = schedule.posterior_mean_coef2.to(dev)
    log_var = schedule.posterior_log_variance_clipped.to(dev)
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)

    def at(buf: Tensor, t: Tensor) -> Tensor:
        return buf.gather(-1, t).reshape(shape).to(x.dtype)

    total = len(grid) - 1
    for i, step in enumerate(grid[:-1]):
        t = _full_t(x, step)
        eps = model(x, t)
        pred_x0 = at(sqrt_recip, t) * x - at(sqrt_recipm1, t) * eps
        if clip_denoised:
            pred_x0 = pred_x0.clamp(-1.0, 1.0)
        mean = at(coef1, t) * pred_x0 + at(coef2, t) * x
        if step == 0:
            x = mean
        else:
            x = mean + (0.5 * at(log_var, t)).exp() * noise_like(x, generator)
        if callback is not None:
            callback(SamplerStep(i, total, step, x, pred_x0))
    return x


# --------------------------------------------------------------------------------------------------- DPM-Solver++


@torch.no_grad()
def sample_dpmpp_2m(
    model: EpsModel,
    x: Tensor,
    schedule: DiscreteSchedule,
    timesteps: Grid,
    *,
    callback: Callback | None = None,
    lower_order_final: bool = True,
) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic
    Models", Algorithm 2): the second-order multistep solver of the diffusion ODE in data-prediction form, on the
    model's discrete alphas.

    ``timesteps`` is descending (:func:`dpmpp_timesteps`). The first step is first order (DDIM); with fewer than 10
    steps the last one is too (Lu et al.'s ``lower_order_final``), and a last step to :data:`CLEAN` always is (it
    returns the denoised prediction).
    """
    grid = check_grid(timesteps, schedule)
    alpha, sigma = zip(*(schedule.alpha_sigma(t) for t in grid))
    lam = [schedule.log_snr(t) for t in grid]
    total = len(grid) - 1
    prev_x0: Tensor | None = None
    prev_h = 0.0
    for i in range(total):
        eps = model(x, _full_t(x, grid[i]))
        pred_x0 = (x - sigma[i] * eps) / alpha[i]
        h = lam[i + 1] - lam[i]
        first_order = (
            prev_x0 is None or sigma[i + 1] == 0.0 or (lower_order_final and total < 10 and i == total - 1)
        )
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
