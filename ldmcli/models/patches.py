"""Patch-wise ("split input") evaluation of a LatentDiffusion, as upstream's LDSR notebook runs it.

Setting ``model.split_input_params = {...}`` (upstream's spelling, see :class:`SplitInputParams`) makes
``apply_model``, ``encode_first_stage`` and ``decode_first_stage`` cut their input into overlapping ``ks`` patches
``stride`` apart, run each patch on its own, and blend the results with upstream's border weighting
(``LatentDiffusion.get_fold_unfold`` / ``delta_border`` / ``get_weighting``):

* a pixel's weight in a patch of ``h x w`` is its normalised distance to the patch border,
  ``min(y / (h - 1), x / (w - 1), 1 - y / (h - 1), 1 - x / (w - 1))`` (0 at the border, 0.5 at the centre),
  clipped to ``[clip_min_weight, clip_max_weight]``; with ``tie_braker`` it is further multiplied by the same
  distance of the patch in the ``Ly x Lx`` grid of patches, clipped to ``[clip_min_tie_weight, clip_max_tie_weight]``;
* the output is ``sum(weight * patch output) / sum(weight)`` over the patches covering a pixel (``Fold`` of the
  weighted patches divided by ``Fold`` of the weights, upstream's ``normalization``).

Weights live at the *output* resolution of a patch: ``ks`` for the UNet, ``ks * vqf`` for the decoder (latent patch
``ks`` -> image patch ``ks * vqf``), ``ks / vqf`` for the encoder (image patch ``ks`` -> latent patch ``ks / vqf``).

Where upstream's numbers exist they are reproduced; where upstream fails, this module does the natural thing:

* a patch larger than the input shrinks to the input (upstream does this in encode/decode but crashes in
  ``apply_model``); a patch as big as the input gives the whole-input result;
* when ``(size - ks)`` is not a multiple of ``stride`` upstream's ``Fold`` leaves the last rows/columns uncovered
  (0 / 0 = NaN); here one more patch is placed flush with the far edge;
* patches are evaluated ``patch_batch`` at a time (upstream: one at a time) and accumulated into the output as they
  come, so memory holds one batch of patches plus the output, never all patches at once.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import torch
from torch import Tensor

PatchProgress = Callable[[str, int, int], None]
"""``progress(stage, done_patches, total_patches)``; stage is ``"unet"``, ``"encode"`` or ``"decode"``."""

#: upstream's LDSR notebook values (notebook_helpers.run)
NOTEBOOK_SPLIT = {
    "ks": (128, 128),
    "stride": (64, 64),
    "vqf": 4,
    "patch_distributed_vq": True,
    "tie_braker": False,
    "clip_max_weight": 0.5,
    "clip_min_weight": 0.01,
    "clip_max_tie_weight": 0.5,
    "clip_min_tie_weight": 0.01,
}
_EXTRA_KEYS = ("patch_batch", "decode_patch_batch", "progress", "original_image_size")


def _pair(value: Any, name: str) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value)
    if not (isinstance(value, Sequence) and len(value) == 2 and all(isinstance(v, int) and v > 0 for v in value)):
        raise ValueError(f"split_input_params[{name!r}] must be a positive int or a pair of them, not {value!r}")
    return int(value[0]), int(value[1])


@dataclass(frozen=True)
class SplitInputParams:
    """The validated form of upstream's ``split_input_params`` dict (missing keys take the notebook's values).

    ``ks``/``stride``: patch size and step, in the units of the tensor being cut (latent pixels for the UNet and
    the decoder, image pixels for the encoder). ``vqf``: the first stage's downsampling factor.
    ``patch_distributed_vq``: also cut encoder/decoder inputs. Ours: ``patch_batch``, patches per UNet/encoder
    pass (default 1); ``decode_patch_batch``, patches per decoder pass (default 1: a bsr_sr decoder patch of 512x512
    peaks at about 2.5 GB); ``progress``, a :data:`PatchProgress` callable.
    """

    ks: tuple[int, int]
    stride: tuple[int, int]
    vqf: int
    patch_distributed_vq: bool
    tie_braker: bool
    clip_max_weight: float
    clip_min_weight: float
    clip_max_tie_weight: float
    clip_min_tie_weight: float
    patch_batch: int = 1
    decode_patch_batch: int = 1
    progress: PatchProgress | None = None

    @classmethod
    def from_dict(cls, params: Mapping[str, Any]) -> SplitInputParams:
        if not isinstance(params, Mapping):
            raise TypeError(f"split_input_params must be a dict, not {type(params).__name__}")
        unknown = sorted(set(params) - set(NOTEBOOK_SPLIT) - set(_EXTRA_KEYS))
        if unknown:
            raise ValueError(f"unknown split_input_params key(s) {unknown}; known: {[*NOTEBOOK_SPLIT, *_EXTRA_KEYS]}")
        merged = {**NOTEBOOK_SPLIT, **params}
        vqf = merged["vqf"]
        if not isinstance(vqf, int) or isinstance(vqf, bool) or vqf < 1:
            raise ValueError(f"split_input_params['vqf'] must be a positive int, not {vqf!r}")
        batches = {}
        for key in ("patch_batch", "decode_patch_batch"):
            batch = merged.get(key, 1)
            if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
                raise ValueError(f"split_input_params[{key!r}] must be a positive int, not {batch!r}")
            batches[key] = batch
        clips = {}
        for key in ("clip_max_weight", "clip_min_weight", "clip_max_tie_weight", "clip_min_tie_weight"):
            value = merged[key]
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise ValueError(f"split_input_params[{key!r}] must be a number, not {value!r}")
            clips[key] = float(value)
        for kind in ("", "_tie"):
            if not 0 < clips[f"clip_min{kind}_weight"] <= clips[f"clip_max{kind}_weight"]:
                raise ValueError(f"split_input_params needs 0 < clip_min{kind}_weight <= clip_max{kind}_weight")
        progress = merged.get("progress")
        if progress is not None and not callable(progress):
            raise TypeError("split_input_params['progress'] must be callable")
        return cls(
            ks=_pair(merged["ks"], "ks"),
            stride=_pair(merged["stride"], "stride"),
            vqf=vqf,
            patch_distributed_vq=bool(merged["patch_distributed_vq"]),
            tie_braker=bool(merged["tie_braker"]),
            progress=progress,
            **batches,
            **clips,
        )


def delta_border(h: int, w: int) -> Tensor:
    """Normalised distance of each pixel of an ``h x w`` patch to its border: 0 on the border, 0.5 at the centre
    (float32, shape ``(h, w)``). A side of length 1 counts as all border (upstream divides 0 by 0 there)."""
    y = torch.arange(h, dtype=torch.float32).view(h, 1) / max(h - 1, 1)
    x = torch.arange(w, dtype=torch.float32).view(1, w) / max(w - 1, 1)
    y, x = y.expand(h, w), x.expand(h, w)
    edge = torch.minimum(torch.minimum(y, x), torch.minimum(1 - y, 1 - x))
    if h == 1 or w == 1:
        edge = torch.zeros_like(edge)
    return edge


def patch_weighting(h: int, w: int, p: SplitInputParams) -> Tensor:
    """Upstream's per-pixel weight of an ``h x w`` output patch (float32, ``(h, w)``)."""
    return torch.clip(delta_border(h, w), p.clip_min_weight, p.clip_max_weight)


def tie_weighting(ly: int, lx: int, p: SplitInputParams) -> Tensor | None:
    """Upstream's per-patch factor for a ``ly x lx`` grid of patches in row-major order, or None without
    ``tie_braker``."""
    if not p.tie_braker:
        return None
    return torch.clip(delta_border(ly, lx), p.clip_min_tie_weight, p.clip_max_tie_weight).reshape(-1)


def patch_starts(size: int, kernel: int, stride: int) -> list[int]:
    """Start offsets of the patches along one side: upstream's ``(size - kernel) // stride + 1`` patches, plus one
    flush with the far edge when those leave the end uncovered."""
    if kernel > size:
        raise ValueError(f"patch {kernel} is larger than the input side {size}")
    starts = list(range(0, size - kernel + 1, stride))
    if starts[-1] != size - kernel:
        starts.append(size - kernel)
    return starts


def clamp_patch(ks: tuple[int, int], stride: tuple[int, int], h: int, w: int) -> tuple[tuple[int, int], ...]:
    """Shrink a patch (and stride) larger than the ``h x w`` input to the input, as upstream's encode/decode do."""
    return (min(ks[0], h), min(ks[1], w)), (min(stride[0], h), min(stride[1], w))


def run_patchwise(
    fn: Callable[[list[Tensor], int], Tensor],
    inputs: Sequence[Tensor],
    ks: tuple[int, int],
    stride: tuple[int, int],
    scale: Fraction,
    p: SplitInputParams,
    stage: str,
    batch: int | None = None,
) -> Tensor:
    """Evaluate ``fn`` patch by patch over ``inputs`` (tensors ``[b, c_i, H, W]`` cut identically) and blend.

    ``fn(patches, n)`` gets one tensor per input holding ``n`` patches stacked along the batch axis (patch-major:
    rows ``[patch0 sample0, patch0 sample1, ..., patch1 sample0, ...]``) and returns ``[n * b, c_out, kh * scale,
    kw * scale]``. The result is ``[b, c_out, H * scale, W * scale]`` in the dtype of ``fn``'s output. ``batch``
    patches go through ``fn`` at a time (default ``p.patch_batch``).
    """
    batch = batch or p.patch_batch
    x = inputs[0]
    b, _, h, w = x.shape
    kh, kw = ks
    ys, xs = patch_starts(h, kh, stride[0]), patch_starts(w, kw, stride[1])
    for size, name in ((kh, "patch"), (kw, "patch"), (h, "input"), (w, "input"), *((s, "offset") for s in ys + xs)):
        if (size * scale).denominator != 1:
            raise ValueError(f"{name} size {size} does not map to whole pixels at scale {scale}; use sizes that are "
                             f"multiples of {scale.denominator}")
    oh, ow = int(kh * scale), int(kw * scale)
    weight = patch_weighting(oh, ow, p).to(x.device)
    ties = tie_weighting(len(ys), len(xs), p)
    grid = [(y0, x0) for y0 in ys for x0 in xs]
    total = len(grid)
    out: Tensor | None = None
    norm = torch.zeros(1, 1, int(h * scale), int(w * scale), device=x.device)
    out_dtype = x.dtype
    for first in range(0, total, batch):
        chunk = grid[first : first + batch]
        parts = [torch.cat([t[:, :, y0 : y0 + kh, x0 : x0 + kw] for y0, x0 in chunk]) for t in inputs]
        result = fn(parts, len(chunk))
        if result.shape[0] != len(chunk) * b or tuple(result.shape[-2:]) != (oh, ow):
            raise ValueError(f"a {stage} patch gave shape {tuple(result.shape)}, expected [{len(chunk) * b}, c, {oh}, "
                             f"{ow}]")
        if out is None:
            out_dtype = result.dtype
            out = torch.zeros(b, result.shape[1], norm.shape[2], norm.shape[3], device=x.device)
        result = result.float().view(len(chunk), b, *result.shape[1:])
        for i, (y0, x0) in enumerate(chunk):
            wgt = weight if ties is None else weight * ties[first + i]
            oy, ox = int(y0 * scale), int(x0 * scale)
            out[:, :, oy : oy + oh, ox : ox + ow] += result[i] * wgt
            norm[:, :, oy : oy + oh, ox : ox + ow] += wgt
        if p.progress is not None:
            p.progress(stage, first + len(chunk), total)
    assert out is not None
    return (out / norm).to(out_dtype)


def repeat_batch(value: Any, n: int) -> Any:
    """``value`` (a tensor, or a list of them) repeated ``n`` times along the batch axis (patch-major order)."""
    if isinstance(value, Tensor):
        return value.repeat(n, *([1] * (value.dim() - 1)))
    if isinstance(value, list):
        return [repeat_batch(v, n) for v in value]
    return value
