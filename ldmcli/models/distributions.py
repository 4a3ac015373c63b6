"""The diagonal Gaussian posterior of the KL-regularised autoencoder (Rombach et al. 2022, "LDM-KL", Sec. 3.1)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


class DiagonalGaussianDistribution:
    """N(mean, diag(exp(logvar))) from encoder moments ``[mean, logvar]`` stacked on dim 1.

    ``logvar`` is clamped to [-30, 20] as upstream; ``deterministic`` makes the distribution a point mass.
    """

    def __init__(self, parameters: torch.Tensor, deterministic: bool = False) -> None:
        self.parameters = parameters
        self.mean, logvar = torch.chunk(parameters, 2, dim=1)
        self.logvar = torch.clamp(logvar, -30.0, 20.0)
        self.deterministic = deterministic
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)
        if deterministic:
            self.var = self.std = torch.zeros_like(self.mean)

    def sample(self, generator: torch.Generator | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
        """mean + std * eps. eps is drawn in float32 on the generator's device (CPU by default, as upstream draws
        it; the same numbers whatever the model's device and dtype), or taken from ``noise`` when given, then cast
        to the posterior's dtype so a half-precision decoder gets half-precision latents."""
        if noise is None:
            device = generator.device if generator is not None else torch.device("cpu")
            noise = torch.randn(self.mean.shape, generator=generator, device=device, dtype=torch.float32)
        return self.mean + self.std * noise.to(device=self.mean.device, dtype=self.mean.dtype)

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self, other: DiagonalGaussianDistribution | None = None) -> torch.Tensor:
        """KL(self || other) summed over C, H, W (other defaults to the standard normal)."""
        if self.deterministic:
            return torch.tensor([0.0], device=self.parameters.device)
        if other is None:
            return 0.5 * torch.sum(torch.pow(self.mean, 2) + self.var - 1.0 - self.logvar, dim=[1, 2, 3])
        return 0.5 * torch.sum(
            torch.pow(self.mean - other.mean, 2) / other.var + self.var / other.var - 1.0 - self.logvar + other.logvar,
            dim=[1, 2, 3],
        )

    def nll(self, sample: torch.Tensor, dims: Sequence[int] = (1, 2, 3)) -> torch.Tensor:
        """Negative log-likelihood of ``sample``, summed over ``dims``."""
        if self.deterministic:
            return torch.tensor([0.0], device=self.parameters.device)
        logtwopi = math.log(2.0 * math.pi)
        return 0.5 * torch.sum(logtwopi + self.logvar + torch.pow(sample - self.mean, 2) / self.var, dim=list(dims))
