"""Diffusion noise schedules (Ho et al. 2020, DDPM; Nichol & Dhariwal 2021 for the cosine schedule).

The betas are computed in float64 exactly as the upstream latent-diffusion code does, the derived quantities in
float64 numpy, and everything is stored as float32 buffers under upstream's names, so checkpoints carry identical
values.
"""

from __future__ import annotations

import math

import numpy as np
import torch


BETA_SCHEDULES = ("linear", "cosine", "sqrt_linear", "sqrt")

# The 12 persistent schedule buffers of an upstream DDPM/LatentDiffusion, in registration order.
SCHEDULE_BUFFERS = (
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
)


def make_beta_schedule(
    schedule: str,
    n_timestep: int,
    linear_start: float = 1e-4,
    linear_end: float = 2e-2,
    cosine_s: float = 8e-3,
) -> np.ndarray:
    """Betas in float64 (always computed on the CPU, also under a meta-device context).

    ``linear`` is linear in sqrt(beta) (the LDM schedule); ``cosine`` is Nichol & Dhariwal's.
    """
    if schedule == "linear":
        betas = torch.linspace(linear_start**0.5, linear_end**0.5, n_timestep, dtype=torch.float64, device="cpu") ** 2
    elif schedule == "cosine":
        steps = torch.arange(n_timestep + 1, dtype=torch.float64, device="cpu") / n_timestep + cosine_s
        alphas = steps / (1 + cosine_s) * math.pi / 2
        alphas = torch.cos(alphas).pow(2)
        alphas = alphas / alphas[0]
        betas = 1 - alphas[1:] / alphas[:-1]
        betas = torch.clamp(betas, min=0, max=0.999)
    elif schedule == "sqrt_linear":
        betas = torch.linspace(linear_start, linear_end, n_timestep, dtype=torch.float64, device="cpu")
    elif schedule == "sqrt":
        betas = torch.linspace(linear_start, linear_end, n_timestep, dtype=torch.float64, device="cpu") ** 0.5
    else:
        raise ValueError(f"unknown beta schedule {schedule!r}; expected one of {', '.join(BETA_SCHEDULES)}")
    return betas.numpy()


def schedule_buffers(betas: np.ndarray, v_posterior: float = 0.0) -> dict[str, torch.Tensor]:
    """The 12 derived buffers of DDPM (upstream names and formulas), computed in float64, returned as float32.

    ``v_posterior`` mixes the posterior variance: sigma^2 = (1 - v) * beta_tilde + v * beta.
    """
    betas = np.asarray(betas, dtype=np.float64)
    alphas = 1.0 - betas
    alphas_cumprod = np.cumprod(alphas, axis=0)
    alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
    posterior_variance = (1 - v_posterior) * betas * (1.0 - alphas_cumprod_prev) / (
        1.0 - alphas_cumprod
    ) + v_posterior * betas
    values = {
        "betas": betas,
        "alphas_cumprod": alphas_cumprod,
        "alphas_cumprod_prev": alphas_cumprod_prev,
        "sqrt_alphas_cumprod": np.sqrt(alphas_cumprod),
        "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - alphas_cumprod),
        "log_one_minus_alphas_cumprod": np.log(1.0 - alphas_cumprod),
        "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod),
        "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod - 1),
        "posterior_variance": posterior_variance,
        # clipped because the posterior variance is 0 at the start of the chain
        "posterior_log_variance_clipped": np.log(np.maximum(posterior_variance, 1e-20)),
        "posterior_mean_coef1": betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
        "posterior_mean_coef2": (1.0 - alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - alphas_cumprod),
    }
    return {name: torch.tensor(values[name], dtype=torch.float32) for name in SCHEDULE_BUFFERS}


def lvlb_weights(betas: np.ndarray, buffers: dict[str, torch.Tensor], parameterization: str) -> torch.Tensor:
    """Per-timestep weights of the variational bound term (float32, as upstream; weight[0] := weight[1]).

    ``betas`` are the float64 betas, ``buffers`` the float32 result of :func:`schedule_buffers`.
    """
    alphas_cumprod = buffers["alphas_cumprod"]
    if parameterization == "eps":
        alphas = torch.tensor(1.0 - np.asarray(betas, dtype=np.float64), dtype=torch.float32)
        weights = buffers["betas"] ** 2 / (2 * buffers["posterior_variance"] * alphas * (1 - alphas_cumprod))
    elif parameterization == "x0":
        weights = 0.5 * torch.sqrt(alphas_cumprod) / (2.0 * 1 - alphas_cumprod)
    else:
        raise ValueError(f"unknown parameterization {parameterization!r}; expected 'eps' or 'x0'")
    weights[0] = weights[1]
    return weights


def extract(a: torch.Tensor, t: torch.Tensor, x_shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """Gather ``a[t]`` per batch element, shaped to broadcast against a tensor of ``x_shape``."""
    out = a.gather(-1, t)
    return out.reshape(t.shape[0], *((1,) * (len(x_shape) - 1)))
