"""How accurately a few-step solver follows the diffusion ODE: RMS distance of its final latent to the "1000-step
DDIM" solution from the same x_T (issue 4's measure, issue 16's table).

All solvers start from the same ``x_T`` at timestep N-1, so they solve the same ODE. The reference is DDIM (eta 0)
through every integer timestep down to timestep 0's level (N-1 steps, "1000-step DDIM"); grids that end on the clean
sample (:data:`~ldmcli.sampling.samplers.CLEAN`: ``karras``, ``trailing``) are compared with that reference taken one
denoising step further, so each result is measured against the exact solution of its own problem. DDIM with S steps
here walks S evenly spaced steps over the same span (the ``time`` spacing; upstream's grid starts at
1 + (N // S) * (S - 1) instead of N-1, a different ODE problem).

* :func:`reference_solutions`: the two references (timestep 0's level and the clean sample).
* :func:`measure`: one sampler on one grid: its model calls, its RMS and relative RMS error (and of the decoded
  images, given a decoder).
* :func:`fewest_calls`: from measured rows, the configuration that reaches a target error with the fewest calls.
* :class:`ToyDenoiser` / :func:`train_toy_denoiser`: a small eps-MLP on 2-d mixtures, optionally conditioned on a
  prompt (a bag of learned word embeddings, "" the unconditional prompt), trained in seconds: the tests' and the
  benchmark's trained text-conditional model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
from torch import Tensor

from ldmcli.sampling.samplers import (
    CLEAN,
    DiscreteSchedule,
    EpsModel,
    dpmpp_timesteps,
    sample_ddim,
    sample_dpmpp_2m,
)


def even_ddim_grid(steps: int, num_timesteps: int) -> np.ndarray:
    """A DDIM grid of ``steps`` steps evenly spaced from timestep N-1 down to the level of timestep 0 (descending)."""
    evaluated = np.unique(np.round(np.linspace(0, num_timesteps - 1, steps + 1)).astype(np.int64)[1:])
    return np.append(np.flip(evaluated), 0)


def _rms(a: Tensor) -> float:
    return a.double().pow(2).mean().sqrt().item()


@torch.no_grad()
def solver_errors(
    model: EpsModel,
    x_T: Tensor,
    schedule: DiscreteSchedule,
    *,
    dpmpp_steps: int = 20,
    ddim_steps: int = 50,
    spacing: str = "logsnr",
) -> dict[str, float]:
    """RMS distance to the every-timestep DDIM solution of DPM-Solver++(2M) with ``dpmpp_steps`` and of DDIM with
    ``ddim_steps`` (keys ``dpmpp``, ``ddim``), plus the reference's RMS size (``reference_rms``)."""
    n = schedule.num_timesteps
    reference = sample_ddim(model, x_T, schedule, np.arange(n - 1, -1, -1))
    ddim = sample_ddim(model, x_T, schedule, even_ddim_grid(ddim_steps, n))
    dpmpp = sample_dpmpp_2m(model, x_T, schedule, dpmpp_timesteps(schedule, dpmpp_steps, spacing=spacing))
    return {"dpmpp": _rms(dpmpp - reference), "ddim": _rms(ddim - reference), "reference_rms": _rms(reference)}


# ------------------------------------------------------------------------------------------------- the harness


@dataclass(frozen=True)
class References:
    """The every-timestep DDIM solution at timestep 0's level and, one denoising step further, at the clean sample."""

    level0: Tensor
    clean: Tensor

    def at(self, end: int) -> Tensor:
        return self.clean if end == CLEAN else self.level0


@torch.no_grad()
def reference_solutions(model: EpsModel, x_T: Tensor, schedule: DiscreteSchedule) -> References:
    """DDIM (eta 0) through every timestep N-1, ..., 1 to timestep 0's level (N-1 model calls), then the data
    prediction there (one more call) for the clean end."""
    n = schedule.num_timesteps
    level0 = sample_ddim(model, x_T, schedule, np.arange(n - 1, -1, -1))
    clean = sample_ddim(model, level0, schedule, [0, CLEAN])
    return References(level0, clean)


@dataclass(frozen=True)
class Measurement:
    """One sampler on one grid: ``calls`` model evaluations; ``rms`` and ``rel`` (RMS error / RMS of the reference)
    of the final latent, ``pixels_rel`` of the decoded image (None without a decoder)."""

    sampler: str
    spacing: str
    steps: int
    calls: int
    rms: float
    rel: float
    pixels_rel: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return dict(vars(self))


@torch.no_grad()
def measure(
    sample_fn: Callable[..., Tensor],
    grid: np.ndarray,
    model: EpsModel,
    x_T: Tensor,
    schedule: DiscreteSchedule,
    references: References,
    *,
    name: tuple[str, str, int],
    extra_calls: int = 0,
    decode: Callable[[Tensor], Tensor] | None = None,
    reference_pixels: dict[int, Tensor] | None = None,
) -> Measurement:
    """Run ``sample_fn(model, x_T, schedule, grid)`` (counting its model calls) and measure it against the reference
    for its end point. ``decode`` (with ``reference_pixels``, the decoded references keyed by end point) adds the
    image error."""
    calls = 0

    def counting(x: Tensor, t: Tensor) -> Tensor:
        nonlocal calls
        calls += 1
        return model(x, t)

    out = sample_fn(counting, x_T, schedule, grid)
    ref = references.at(int(grid[-1]))
    rms = _rms(out - ref)
    pixels = None
    if decode is not None and reference_pixels is not None:
        ref_px = reference_pixels[int(grid[-1])]
        pixels = _rms(decode(out) - ref_px) / _rms(ref_px)
    sampler, spacing, steps = name
    return Measurement(sampler, spacing, steps, calls, rms, rms / _rms(ref), pixels)


def fewest_calls(rows: Iterable[dict[str, Any]], target: float, key: str = "rel") -> dict[str, Any] | None:
    """The row with the fewest calls whose ``key`` error is at most ``target`` (ties: the smaller error)."""
    ok = [r for r in rows if r[key] is not None and r[key] <= target]
    return min(ok, key=lambda r: (r["calls"], r[key])) if ok else None


# ------------------------------------------------------------------------------------------------ a toy model


MIXTURES: dict[str, list[tuple[float, float]]] = {
    "two dots": [(-1.0, 0.0), (1.0, 0.0)],
    "a ring": [(math.cos(a), math.sin(a)) for a in np.linspace(0, 2 * math.pi, 8, endpoint=False)],
    "a line": [(x, 0.5 * x) for x in np.linspace(-1.5, 1.5, 5)],
    "three dots": [(1.0, 1.0), (-1.0, 0.5), (0.3, -1.2)],
}
"""The prompts of the text-conditional toy and the component centres of the 2-d mixture each stands for."""


class ToyDenoiser(torch.nn.Module):
    """An eps-MLP on 2-d points with a sinusoidal embedding of t / 1000 and, when ``vocab`` is given, a prompt
    embedding: the mean of learned word embeddings (the empty prompt: a learned null embedding)."""

    def __init__(self, vocab: Sequence[str] = (), width: int = 96, context: int = 16):
        super().__init__()
        self.vocab = {w: i for i, w in enumerate(vocab)}
        self.freqs = torch.exp(torch.linspace(0, math.log(30), 8))
        self.words = torch.nn.Embedding(len(self.vocab) + 1, context) if self.vocab else None
        extra = context if self.vocab else 0
        self.net = torch.nn.Sequential(
            torch.nn.Linear(2 + 16 + extra, width), torch.nn.SiLU(), torch.nn.Linear(width, width), torch.nn.SiLU(),
            torch.nn.Linear(width, 2),
        )

    def encode(self, prompts: Sequence[str]) -> Tensor:
        """The conditioning of each prompt (``""``: the unconditional one): its words' mean embedding."""
        null = len(self.vocab)
        unique = list(dict.fromkeys(prompts))
        means = torch.stack([self.words(torch.tensor([self.vocab[w] for w in p.split()] or [null])).mean(0)
                             for p in unique])
        index = {p: k for k, p in enumerate(unique)}
        return means[torch.tensor([index[p] for p in prompts])]

    def forward(self, x: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        angles = (t.float() / 1000)[:, None] * self.freqs[None]
        parts = [x, torch.cos(angles), torch.sin(angles)]
        if self.words is not None:
            parts.append(cond)
        return self.net(torch.cat(parts, dim=1))


def train_toy_denoiser(
    schedule: DiscreteSchedule, *, text: bool = True, steps: int = 1500, seed: int = 0, cond_drop: float = 0.15
) -> ToyDenoiser:
    """Train a :class:`ToyDenoiser` on the :data:`MIXTURES` (std 0.15 around each centre; ``text``: conditioned on
    the mixture's prompt, dropped to "" with probability ``cond_drop`` for classifier-free guidance; else the
    unconditional "three dots"). A few seconds on one core."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    prompts = list(MIXTURES) if text else ["three dots"]
    vocab = sorted({w for p in prompts for w in p.split()}) if text else ()
    net = ToyDenoiser(vocab)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    ac = schedule.alphas_cumprod
    counts = torch.tensor([len(MIXTURES[p]) for p in prompts])
    centres = torch.zeros(len(prompts), int(counts.max()), 2)
    for k, p in enumerate(prompts):
        centres[k, : counts[k]] = torch.tensor(MIXTURES[p])
    for _ in range(steps):
        which = torch.randint(0, len(prompts), (256,), generator=gen)
        pick = (torch.rand(256, generator=gen) * counts[which]).long()
        x0 = centres[which, pick] + 0.15 * torch.randn(256, 2, generator=gen)
        t = torch.randint(0, len(ac), (256,), generator=gen)
        noise = torch.randn(256, 2, generator=gen)
        a = ac[t][:, None]
        cond = None
        if text:  # row len(prompts) of the table is the empty prompt
            keep = torch.rand(256, generator=gen) >= cond_drop
            cond = net.encode([*prompts, ""])[torch.where(keep, which, len(prompts))]
        loss = torch.nn.functional.mse_loss(net(a.sqrt() * x0 + (1 - a).sqrt() * noise, t, cond), noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return net.eval()


def toy_eps(net: ToyDenoiser, prompts: Sequence[str] | None = None, scale: float = 1.0) -> EpsModel:
    """The guided eps callable of a trained toy: ``eps("") + scale * (eps(prompt) - eps(""))`` (the prompt alone at
    scale 1; unconditional toys take no prompts)."""
    from ldmcli.sampling.guidance import classifier_free_guidance

    if prompts is None:
        return lambda x, t: net(x, t)
    with torch.no_grad():
        cond, uncond = net.encode(prompts), net.encode([""] * len(prompts))
    return classifier_free_guidance(lambda x, t, c: net(x, t, c), cond, uncond, scale)
