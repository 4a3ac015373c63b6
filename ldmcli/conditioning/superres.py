"""LDSR (``bsr_sr``) inputs: the low-resolution image as upstream's notebook feeds it, padding, and the patch plan.

Upstream's pipeline (``notebook_helpers.get_cond`` + ``make_convolutional_sample``): the low-resolution image
``c`` in [-1, 1] is the concat conditioning (the cond stage is ``torch.nn.Identity``), and the diffusion latent has the
shape of the first-stage encoding of the 4x-resized image, i.e. ``(z_channels, 4h / f, 4w / f)``; for ``bsr_sr``
(a VQ f4 first stage) that is ``(3, h, w)``, the size of the low-resolution image itself. Inputs whose 4x size is
at least 128 px a side run patch-wise (:data:`ldmcli.models.patches.NOTEBOOK_SPLIT`).

Padding rule (:func:`plan_upscale`): the UNet halves the latent ``len(channel_mult) - 1`` times (3 for ``bsr_sr``),
so the low-resolution image is padded on the right and bottom, by repeating its last row/column, to the next
multiple of ``2 ** (len(channel_mult) - 1)`` (8), and the 4x output is cropped back to ``4h x 4w``. Patch-wise runs
need nothing more (a last patch is placed flush with the far edge when the stride does not divide the size).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ldmcli.conditioning.images import open_image
from ldmcli.errors import UsageError
from ldmcli.models.patches import NOTEBOOK_SPLIT

UPSCALE = 4
"""LDSR's magnification."""
MIN_SIDE = 8
"""Smallest low-resolution side (after any pre-downsampling): one latent cell of the UNet's coarsest level."""
SPLIT_FROM = 128
"""Upstream's notebook runs patch-wise when the 4x image is at least this many pixels on both sides."""
PRE_DOWNSAMPLE = (1, 2, 4)


def to_rgb(image: Image.Image) -> tuple[Image.Image, list[str]]:
    """``image`` as 8-bit RGB, with a note for each conversion that changes what the user gave: an alpha channel
    composited over white, greyscale expanded to RGB, 16/32-bit or float samples scaled to 8 bits."""
    notes: list[str] = []
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(image, dtype=np.float64)
        top = 65535.0 if mode != "F" else (1.0 if arr.max() <= 1.0 else 255.0)  # float images: [0, 1] or [0, 255]
        arr = np.clip(np.round(arr / top * 255.0), 0, 255).astype(np.uint8)
        image = Image.fromarray(arr)
        notes.append(f"{mode} samples scaled to 8 bits")
        mode = "L"
    if mode == "RGB":
        return image, notes
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        if rgba.getextrema()[3][0] < 255:
            notes.append("transparent pixels composited over white")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB"), notes
    if mode in ("L", "1"):
        notes.append("greyscale converted to RGB")
    elif mode != "P":
        notes.append(f"{mode} converted to RGB")
    return image.convert("RGB"), notes


def read_lowres(path: str | os.PathLike) -> tuple[np.ndarray, list[str]]:
    """The image at ``path`` as ``[h, w, 3]`` uint8 RGB plus conversion notes (see :func:`to_rgb`)."""
    image, notes = to_rgb(open_image(path))
    return np.asarray(image, dtype=np.uint8).copy(), notes


def pre_downsample(image: np.ndarray, factor: int) -> np.ndarray:
    """``image`` (``[h, w, 3]`` uint8) shrunk by ``factor`` (1, 2 or 4) with Pillow's antialiased bicubic filter to
    ``round(w / factor) x round(h / factor)``, so that the 4x output is 2x (factor 2) or 1x (factor 4) the input."""
    if factor not in PRE_DOWNSAMPLE:
        raise UsageError(f"pre-downsampling factor must be one of {PRE_DOWNSAMPLE}, not {factor}")
    if factor == 1:
        return image
    h, w = image.shape[:2]
    size = (max(1, round(w / factor)), max(1, round(h / factor)))
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BICUBIC), dtype=np.uint8).copy()


def lowres_condition(image: np.ndarray | Image.Image) -> torch.Tensor:
    """The concat conditioning ``[1, 3, h, w]`` float32 in [-1, 1] from a uint8 RGB image, as upstream's notebook
    (``ToTensor`` then ``2c - 1``)."""
    arr = np.asarray(image)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise TypeError(f"lowres_condition takes [h, w, 3] uint8 RGB, not {arr.dtype} {tuple(arr.shape)}")
    c = torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous().float().div(255)
    return (2.0 * c - 1.0).unsqueeze(0)


def latent_shape(h: int, w: int, *, first_stage_factor: int = 4, z_channels: int = 3) -> tuple[int, int, int]:
    """The diffusion latent ``(c, H, W)`` for an ``h x w`` low-resolution image: the first-stage encoding of the
    ``4h x 4w`` image."""
    big_h, big_w = UPSCALE * h, UPSCALE * w
    if big_h % first_stage_factor or big_w % first_stage_factor:
        raise ValueError(f"a {big_w}x{big_h} image does not encode to whole latent pixels at f{first_stage_factor}")
    return z_channels, big_h // first_stage_factor, big_w // first_stage_factor


def pad_to_multiple(c: torch.Tensor, multiple: int) -> torch.Tensor:
    """``c`` (``[b, ch, h, w]``) padded on the right and bottom by repeating its edge, to multiples of ``multiple``."""
    h, w = c.shape[-2:]
    ph, pw = -h % multiple, -w % multiple
    if not ph and not pw:
        return c
    return F.pad(c, (0, pw, 0, ph), mode="replicate")


def unet_multiple(model: Any) -> int:
    """How many latent pixels the model's UNet needs a side to be a multiple of: 2 ** (levels - 1)."""
    return 2 ** (len(model.model.diffusion_model.channel_mult) - 1)


@dataclass(frozen=True)
class UpscalePlan:
    """What an upscale of one image does: sizes are ``(height, width)``."""

    input_size: tuple[int, int]  # the user's image
    lowres_size: tuple[int, int]  # after pre-downsampling: the conditioning before padding
    padded_size: tuple[int, int]  # the conditioning the model sees
    latent_shape: tuple[int, int, int]  # (c, H, W) of the sampled latent
    output_size: tuple[int, int]  # the cropped result: 4x lowres_size
    split_input_params: dict[str, Any] | None  # upstream's patch-wise settings, or None for a whole-image run

    @property
    def patches(self) -> int:
        """UNet patches per step (1 for a whole-image run)."""
        if self.split_input_params is None:
            return 1
        from ldmcli.models.patches import patch_starts

        _, h, w = self.latent_shape
        ks, st = self.split_input_params["ks"], self.split_input_params["stride"]
        return len(patch_starts(h, min(ks[0], h), min(st[0], h))) * len(patch_starts(w, min(ks[1], w), min(st[1], w)))


def plan_upscale(
    height: int,
    width: int,
    *,
    pre_downsample_factor: int = 1,
    multiple: int = 8,
    first_stage_factor: int = 4,
    z_channels: int = 3,
    patch_batch: int = 1,
    decode_patch_batch: int = 1,
) -> UpscalePlan:
    """The sizes and patch settings for upscaling a ``height x width`` image (see the module docstring for the
    padding rule). A low-resolution side under :data:`MIN_SIDE` is a UsageError."""
    if pre_downsample_factor not in PRE_DOWNSAMPLE:
        raise UsageError(f"pre-downsampling factor must be one of {PRE_DOWNSAMPLE}, not {pre_downsample_factor}")
    f = pre_downsample_factor
    lh, lw = (height, width) if f == 1 else (max(1, round(height / f)), max(1, round(width / f)))
    if min(lh, lw) < MIN_SIDE:
        after = "" if f == 1 else f" after downsampling by {f}"
        raise UsageError(f"image too small: {lw}x{lh} px{after}; LDSR needs at least {MIN_SIDE} px a side")
    ph, pw = lh + -lh % multiple, lw + -lw % multiple
    split = None
    if UPSCALE * ph >= SPLIT_FROM and UPSCALE * pw >= SPLIT_FROM:
        split = {**NOTEBOOK_SPLIT, "patch_batch": patch_batch, "decode_patch_batch": decode_patch_batch}
    return UpscalePlan(
        input_size=(height, width),
        lowres_size=(lh, lw),
        padded_size=(ph, pw),
        latent_shape=latent_shape(ph, pw, first_stage_factor=first_stage_factor, z_channels=z_channels),
        output_size=(UPSCALE * lh, UPSCALE * lw),
        split_input_params=split,
    )


def crop_output(images: torch.Tensor, plan: UpscalePlan) -> torch.Tensor:
    """Decoded images ``[b, 3, 4 * padded_h, 4 * padded_w]`` cropped to the plan's output size."""
    oh, ow = plan.output_size
    return images[..., :oh, :ow]
