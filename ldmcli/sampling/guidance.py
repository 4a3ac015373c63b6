"""Wrappers that turn a diffusion network into the ``model(x, t) -> eps`` callable the samplers take.

* :func:`classifier_free_guidance` (Ho & Salimans 2021): ``eps = eps(x, uncond) + scale * (eps(x, cond) -
  eps(x, uncond))``, with both halves from ONE batched call, unconditional first (upstream's order); ``scale == 1``
  (or no unconditional input) evaluates the conditional half alone.
* :func:`eps_from_x0`: adapts an x0-predicting network (``parameterization: x0``) to eps, with upstream's
  ``_predict_eps_from_xstart``.
* :func:`model_denoiser`: both of the above for a ``LatentDiffusion``-like model (``apply_model``, ``parameterization``
  and the schedule buffers), plus running the network in a reduced precision while the sampler stays in float32.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from ldmcli.sampling.samplers import DiscreteSchedule, EpsModel

ApplyModel = Callable[[Tensor, Tensor, Any], Tensor]
"""``apply(x, t, cond) -> output``, e.g. ``LatentDiffusion.apply_model``."""


def concat_conditioning(first: Any, second: Any) -> Any:
    """Concatenate two conditionings along the batch axis: tensors, lists of tensors, or dicts of either."""
    if isinstance(first, Tensor):
        return torch.cat([first, second])
    if isinstance(first, dict):
        return {key: concat_conditioning(first[key], second[key]) for key in first}
    if isinstance(first, (list, tuple)):
        return type(first)(concat_conditioning(a, b) for a, b in zip(first, second))
    raise TypeError(f"cannot batch conditioning of type {type(first).__name__}")


def classifier_free_guidance(apply: ApplyModel, cond: Any, uncond: Any = None, scale: float = 1.0) -> EpsModel:
    """Classifier-free guidance (Ho & Salimans, 2021) around ``apply(x, t, cond)``.

    The unconditional and conditional halves run as one batch ``[uncond, cond]``; ``scale == 1`` or ``uncond is
    None`` skips the unconditional half entirely.
    """
    if uncond is None or scale == 1.0:

        def conditional(x: Tensor, t: Tensor) -> Tensor:
            return apply(x, t, cond)

        return conditional

    both = concat_conditioning(uncond, cond)

    def guided(x: Tensor, t: Tensor) -> Tensor:
        e_uncond, e_cond = apply(torch.cat([x] * 2), torch.cat([t] * 2), both).chunk(2)
        return e_uncond + scale * (e_cond - e_uncond)

    return guided


def eps_from_x0(model: EpsModel, schedule: DiscreteSchedule) -> EpsModel:
    """Adapt an x0-predicting callable to eps: ``eps = (sqrt(1/a_t) x - x0) / sqrt(1/a_t - 1)`` (upstream's formula)."""

    def eps(x: Tensor, t: Tensor) -> Tensor:
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        recip = schedule.sqrt_recip_alphas_cumprod.to(x.device).gather(-1, t).reshape(shape).to(x.dtype)
        recipm1 = schedule.sqrt_recipm1_alphas_cumprod.to(x.device).gather(-1, t).reshape(shape).to(x.dtype)
        return (recip * x - model(x, t)) / recipm1

    return eps


def _cast(value: Any, dtype: torch.dtype) -> Any:
    if isinstance(value, Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, dict):
        return {key: _cast(v, dtype) for key, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_cast(v, dtype) for v in value)
    return value


def _network_dtype(model: Any) -> torch.dtype | None:
    network = getattr(model, "model", model)  # a LatentDiffusion's UNet wrapper; the conditioner may differ
    if not hasattr(network, "parameters"):
        return None
    return next((p.dtype for p in network.parameters() if p.is_floating_point()), None)


def model_denoiser(
    model: Any,
    cond: Any = None,
    uncond: Any = None,
    scale: float = 1.0,
    *,
    schedule: DiscreteSchedule | None = None,
    dtype: torch.dtype | None = None,
    channels_last: bool | None = None,
) -> EpsModel:
    """The eps callable for a ``LatentDiffusion``: guidance around ``model.apply_model``, x0 models adapted to eps.

    ``dtype`` (default: the UNet's parameter dtype) is what the network runs in; inputs and conditioning are cast to
    it and its output back to the sampler state's dtype (float32), so only the network runs in reduced precision.
    ``channels_last`` (default: what :func:`ldmcli.fastpath.prepare_for_inference` recorded on the model) feeds the
    network channels_last inputs so no convolution re-lays out its weights.
    """
    if dtype is None:
        dtype = _network_dtype(model)
    if channels_last is None:
        channels_last = bool(getattr(model, "fast_path", {}).get("channels_last", False))
    cast = dtype is not None and dtype != torch.float32
    if cast:
        cond, uncond = _cast(cond, dtype), _cast(uncond, dtype)
    if cast or channels_last:

        def apply(x: Tensor, t: Tensor, c: Any) -> Tensor:
            x_in = x.to(dtype) if cast else x
            if channels_last and x_in.dim() == 4:
                x_in = x_in.contiguous(memory_format=torch.channels_last)
            return model.apply_model(x_in, t, c).to(x.dtype)

    else:
        apply = model.apply_model
    eps = classifier_free_guidance(apply, cond, uncond, scale)
    parameterization = getattr(model, "parameterization", "eps")
    if parameterization == "x0":
        eps = eps_from_x0(eps, schedule if schedule is not None else DiscreteSchedule.from_model(model))
    elif parameterization != "eps":
        raise ValueError(f"cannot sample a model with parameterization {parameterization!r}")
    return eps
