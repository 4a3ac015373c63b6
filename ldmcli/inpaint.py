"""Inpainting with a latent diffusion model (Rombach et al., CVPR 2022, Sec. 4.5; the ``inpainting_big`` model).

The pipeline is upstream's ``scripts/inpaint.py``, op for op (so the same weights, image, mask and ``x_T`` give the
same result to float32 rounding):

1. image ``/ 255`` (float32); mask (greyscale at full precision: 8-bit ``/ 255``, 16-bit ``/ 65535``) binarised
   at 0.5 (white = region to fill);
   ``masked_image = (1 - mask) * image``; all three mapped to [-1, 1] (``* 2 - 1``; the mask channel is thus ±1);
2. ``c = first_stage.encode(masked_image)`` (VQ: before quantisation) concatenated with the mask resized to the
   latent size (nearest); DDIM (eta 0 by default) over latents of shape ``[c.channels - 1, h, w]``;
3. decode (a VQ first stage quantises first), ``clamp((x + 1) / 2, 0, 1)``, and compose
   ``(1 - mask) * image + mask * predicted``; ``* 255`` truncated to uint8.

Beyond upstream: any image size (reflect padding to the model's factor, cropped back), pixels outside the mask
copied from the input byte for byte (upstream's float round trip can move them by one), other samplers, seeded
noise, reduced precision for the networks, and resumable batches written atomically.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange

from ldmcli.errors import UsageError
from ldmcli.images import read_mask, read_rgb
from ldmcli.sampling import SamplerSettings

MASK_SUFFIX = "_mask"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


# ------------------------------------------------------------------------------------------------------ inputs


@dataclass(frozen=True)
class InpaintPair:
    """An image, its mask (white = fill) and where the result goes."""

    image: Path
    mask: Path
    output: Path


@dataclass(frozen=True)
class PairProblem:
    """A pair that cannot be processed, with a one-line reason that names the file."""

    path: Path
    message: str


def _read(path: Path, reader: Callable[[Path], np.ndarray]) -> np.ndarray:
    """``reader(path)`` with every failure as a one-line UsageError naming the file."""
    from ldmcli.images import ImageReadError

    if not path.exists():
        raise UsageError(f"{path}: no such file")
    if path.is_dir():
        raise UsageError(f"{path}: is a folder, not an image")
    try:
        return reader(path)
    except ImageReadError as e:
        raise UsageError(str(e)) from None


def read_image(path: str | os.PathLike) -> np.ndarray:
    """An image file as ``[h, w, 3]`` uint8 RGB through :func:`ldmcli.images.read_rgb`: 8-bit files exactly as
    upstream reads them (``convert("RGB")``), 16-bit and float ones scaled (never clipped), transparency composited
    over white; a pixel format that cannot be converted faithfully is a UsageError naming the file."""
    return _read(Path(path), read_rgb)


def read_fill_mask(path: str | os.PathLike) -> np.ndarray:
    """A mask file as ``[h, w]`` uint8, 255 where it is filled: upstream's binarisation (grey value >= 0.5) on
    :func:`ldmcli.images.read_mask`'s full-precision grey (16-bit: ``v / 65535``; 8-bit: ``v / 255``, so 128 fills
    and 127 keeps, as upstream; colour: luminance after transparency over white)."""
    grey = _read(Path(path), read_mask)
    return np.where(grey >= 0.5, 255, 0).astype(np.uint8)


def load_pair(image_path: str | os.PathLike, mask_path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """The image (``[h, w, 3]`` uint8) and its binarised mask (``[h, w]`` uint8, 0 keep / 255 fill); a size
    mismatch is a UsageError."""
    image = read_image(image_path)
    mask = read_fill_mask(mask_path)
    if image.shape[:2] != mask.shape:
        raise UsageError(
            f"{mask_path}: mask is {mask.shape[1]}x{mask.shape[0]} but its image {Path(image_path).name} is "
            f"{image.shape[1]}x{image.shape[0]}"
        )
    return image, mask


def check_pair(pair: InpaintPair, config: Any = None, name: str = "the model") -> None:
    """Checks before any model is loaded: both files are images whose pixels convert faithfully (they are decoded
    here, so a 16-bit mask or an unsupported format fails now, not after loading), of the same size, and (given the
    model's ``config``) large enough for the model (:func:`check_min_size`)."""
    for path in (pair.image, pair.mask):
        if path.exists() and not path.is_file():
            raise UsageError(f"{path}: not a file")
    image, _ = load_pair(pair.image, pair.mask)
    if config is not None:
        check_min_size(config, image.shape[0], image.shape[1], pair.image, name)


GROUPS = 32  # every normalisation layer of the first stage and the UNet is GroupNorm(32, channels)


def _level_mults(mults: Any) -> list[int]:
    """The fewest channels (as multipliers) normalised at each resolution level: level i's own and, in the first
    block after the downsampling, level i - 1's."""
    return [min(mults[max(i - 1, 0)], m) for i, m in enumerate(mults)]


def _too_small(config: Any, height: int, width: int) -> str | None:
    """Why a ``height`` x ``width`` image cannot go through ``config``'s inpainting model (None if it can): after
    padding to the model's factor, some normalisation group would hold a single value (GroupNorm cannot normalise
    that), at the encoder's or the UNet's coarsest resolution."""
    ldm = config.ldm
    dd = ldm.first_stage.ddconfig
    f = 2 ** (len(dd.ch_mult) - 1)
    factor = f * 2 ** (len(ldm.unet.channel_mult) - 1)
    ph, pw = -(-height // factor) * factor, -(-width // factor) * factor
    stages = [("first stage", dd.ch * m, ph >> i, pw >> i) for i, m in enumerate(_level_mults(dd.ch_mult))]
    stages += [("UNet", ldm.unet.model_channels * m, (ph // f) >> i, (pw // f) >> i)
               for i, m in enumerate(_level_mults(ldm.unet.channel_mult))]
    for where, channels, h, w in stages:
        if max(channels // GROUPS, 1) * h * w <= 1:
            return f"its {where} would work on {w}x{h} pixels with one value per normalisation group"
    return None


def check_min_size(config: Any, height: int, width: int, path: str | os.PathLike, name: str = "the model") -> None:
    """A UsageError naming ``path`` if a ``height`` x ``width`` image is smaller than ``config``'s inpainting model
    can take (computed from the config: the first stage's and the UNet's downsampling and channel counts)."""
    why = _too_small(config, height, width)
    if why is None:
        return
    side = next((s for s in range(1, 4096) if _too_small(config, 1, s) is None), None)
    need = f"; it needs an image with at least one side of {side} pixels" if side is not None else ""
    raise UsageError(f"{path}: {width}x{height} is too small for {name} ({why}){need}")


def _is_image_name(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def find_pairs(indir: str | os.PathLike, outdir: str | os.PathLike) -> tuple[list[InpaintPair], list[PairProblem]]:
    """The pairs of an upstream-style input folder: ``NAME.png`` with ``NAME_mask.png`` (other image formats are
    accepted too; the result is always ``OUTDIR/NAME.png``, so a PNG keeps its file name).

    Returns the pairs (sorted by name) and the problems: an image without a mask, a mask without an image, two
    candidate masks, two images that would write the same output. A missing or empty folder, or ``outdir`` equal
    to ``indir``, is a UsageError.
    """
    indir, outdir = Path(indir), Path(outdir)
    if not indir.exists():
        raise UsageError(f"{indir}: no such folder")
    if not indir.is_dir():
        raise UsageError(f"{indir}: not a folder")
    if outdir.exists() and not outdir.is_dir():
        raise UsageError(f"{outdir}: exists and is not a folder")
    if outdir.resolve() == indir.resolve():
        raise UsageError(f"{outdir}: the output folder must differ from the input folder (results would be mixed "
                         f"with, or overwrite, the inputs)")
    files = sorted(p for p in indir.iterdir() if p.is_file() and _is_image_name(p))
    masks: dict[str, list[Path]] = {}
    images: list[Path] = []
    for p in files:
        if p.stem.endswith(MASK_SUFFIX) and len(p.stem) > len(MASK_SUFFIX):
            masks.setdefault(p.stem[: -len(MASK_SUFFIX)], []).append(p)
        else:
            images.append(p)
    if not images and not masks:
        raise UsageError(f"{indir}: no images found (expected NAME.png with its mask NAME{MASK_SUFFIX}.png)")
    pairs: list[InpaintPair] = []
    problems: list[PairProblem] = []
    claimed: dict[str, Path] = {}
    stems = {p.stem for p in images}
    for image in images:
        candidates = masks.get(image.stem, [])
        output = outdir / f"{image.stem}.png"
        if not candidates:
            problems.append(PairProblem(image, f"{image}: no mask (expected {image.stem}{MASK_SUFFIX}.png)"))
        elif len(candidates) > 1:
            names = ", ".join(c.name for c in candidates)
            problems.append(PairProblem(image, f"{image}: more than one mask ({names})"))
        elif image.stem in claimed:
            problems.append(PairProblem(image, f"{image}: {claimed[image.stem].name} already writes {output.name}"))
        else:
            claimed[image.stem] = image
            pairs.append(InpaintPair(image, candidates[0], output))
    for stem, found in sorted(masks.items()):
        if stem not in stems:
            for mask in found:
                problems.append(PairProblem(mask, f"{mask}: mask without an image (expected {stem}.png)"))
    return pairs, problems


# ------------------------------------------------------------------------------------------------------- model


NOT_INPAINTING = ("{} is not an inpainting model (it needs concat conditioning on its first stage's encoding plus a "
                  "mask channel, like inpainting_big)")


def check_inpainting_config(cfg: Any, name: str) -> None:
    """:func:`check_inpainting_model` on a config, before any weights are loaded."""
    ldm = getattr(cfg, "ldm", None)
    if (ldm is None or ldm.conditioning_key != "concat" or ldm.cond_stage.type != "first_stage"
            or ldm.unet.in_channels != 2 * int(ldm.channels) + 1):
        raise UsageError(NOT_INPAINTING.format(name))


def check_inpainting_model(model: Any, name: str = "the model") -> None:
    """A UsageError unless ``model`` is an inpainting LDM: concat conditioning on its own first stage's encoding
    plus one mask channel (``unet.in_channels == 2 * latent channels + 1``)."""
    wrapper = getattr(model, "model", None)
    unet = getattr(wrapper, "diffusion_model", None)
    first = getattr(model, "first_stage_model", None)
    if (
        getattr(wrapper, "conditioning_key", None) != "concat"
        or first is None
        or getattr(model, "cond_stage_model", None) is not first
        or getattr(unet, "in_channels", None) != 2 * int(getattr(model, "channels", 0)) + 1
    ):
        raise UsageError(NOT_INPAINTING.format(name))


def model_factor(model: Any) -> int:
    """How many pixels one step of the UNet's coarsest latent spans: the first stage's downsampling times the
    UNet's. Images are padded to a multiple of it (inpainting_big: 4 * 8 = 32)."""
    first = 2 ** (int(model.first_stage_model.encoder.num_resolutions) - 1)
    unet = 2 ** (len(model.model.diffusion_model.channel_mult) - 1)
    return first * unet


def pad_to_multiple(array: np.ndarray, factor: int) -> np.ndarray:
    """Reflect-pad the bottom and right of an ``[h, w, ...]`` array so both sides are multiples of ``factor``
    (numpy's reflection, which repeats for pads larger than the image)."""
    h, w = array.shape[:2]
    pad_h, pad_w = (-h) % factor, (-w) % factor
    if pad_h == 0 and pad_w == 0:
        return array
    widths = [(0, pad_h), (0, pad_w)] + [(0, 0)] * (array.ndim - 2)
    mode = "reflect" if min(h, w) > 1 else "edge"  # a 1-pixel side cannot be reflected
    return np.pad(array, widths, mode=mode)


def make_batch(image: np.ndarray, mask: np.ndarray, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Upstream's ``make_batch`` from arrays: ``image``, ``mask`` (binarised at 0.5) and ``masked_image``, each
    ``[1, c, h, w]`` float32 in [-1, 1]."""
    image_t = torch.from_numpy(rearrange(image.astype(np.float32) / 255.0, "h w c -> 1 c h w").copy())
    mask_f = mask.astype(np.float32) / 255.0
    mask_f = mask_f[None, None]
    mask_f[mask_f < 0.5] = 0
    mask_f[mask_f >= 0.5] = 1
    mask_t = torch.from_numpy(mask_f)
    masked_image = (1 - mask_t) * image_t
    batch = {"image": image_t, "mask": mask_t, "masked_image": masked_image}
    return {key: value.to(device=device) * 2.0 - 1.0 for key, value in batch.items()}


def _model_device(model: Any) -> torch.device:
    return next(model.first_stage_model.parameters()).device


def _first_stage_dtype(model: Any) -> torch.dtype:
    return next(model.first_stage_model.parameters()).dtype


def conditioning(model: Any, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The concat conditioning: the first-stage encoding of the masked image and the mask resized to its size."""
    dtype = _first_stage_dtype(model)
    c = model.cond_stage_model.encode(batch["masked_image"].to(dtype)).float()
    cc = F.interpolate(batch["mask"], size=c.shape[-2:])
    return torch.cat((c, cc), dim=1)


@torch.no_grad()
def inpaint_batch(
    model: Any,
    batch: Mapping[str, torch.Tensor],
    *,
    settings: SamplerSettings = SamplerSettings("ddim", 50, 0.0, 1.0),
    x_T: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    callback: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Upstream's pipeline on a :func:`make_batch` batch (sides multiples of :func:`model_factor`): returns
    ``inpainted = (1 - mask) * image + mask * predicted``, ``[b, 3, h, w]`` float32 in [0, 1], before the uint8
    conversion. ``x_T`` (else standard normal noise from ``generator``, drawn on its device) is the initial latent;
    ``settings`` the sampler (no guidance: upstream's inpainting has no unconditional input); ``callback(step,
    total)`` after each sampler step.
    """
    from ldmcli.sampling import noise_like, sample_latents

    c = conditioning(model, batch)
    shape = (c.shape[0], c.shape[1] - 1, *c.shape[2:])
    if x_T is None:
        x_T = noise_like(torch.empty(shape, device=c.device), generator)
    elif tuple(x_T.shape) != shape:
        raise ValueError(f"x_T has shape {list(x_T.shape)} but this image needs {list(shape)}")
    step_cb = (lambda s: callback(s.i + 1, s.total)) if callback is not None else None
    samples = sample_latents(model, x_T.to(c.device, torch.float32), c, None, settings, generator=generator,
                             callback=step_cb)
    x_samples = model.decode_first_stage(samples.to(_first_stage_dtype(model))).float()

    image = torch.clamp((batch["image"] + 1.0) / 2.0, min=0.0, max=1.0)
    mask = torch.clamp((batch["mask"] + 1.0) / 2.0, min=0.0, max=1.0)
    predicted_image = torch.clamp((x_samples + 1.0) / 2.0, min=0.0, max=1.0)
    return (1 - mask) * image + mask * predicted_image


def inpaint_array(
    model: Any,
    image: np.ndarray,
    mask: np.ndarray,
    *,
    settings: SamplerSettings = SamplerSettings("ddim", 50, 0.0, 1.0),
    generator: torch.Generator | None = None,
    x_T: torch.Tensor | None = None,
    callback: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    """Inpaint one image of any size: ``image`` ``[h, w, 3]`` uint8, ``mask`` ``[h, w]`` uint8 (>= 128 = fill).

    The pair is reflect-padded to a multiple of :func:`model_factor`, run through :func:`inpaint_batch`, cropped
    back and converted as upstream (``* 255`` truncated); pixels outside the mask are the input's bytes exactly. A
    mask with nothing to fill returns the image without running the model.
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"the image must be [h, w, 3] uint8, got {list(image.shape)} {image.dtype}")
    if mask.shape != image.shape[:2] or mask.dtype != np.uint8:
        raise ValueError(f"the mask must be [h, w] uint8 of the image's size, got {list(mask.shape)} {mask.dtype}")
    fill = (mask.astype(np.float32) / 255.0) >= 0.5  # upstream's binarisation
    if not fill.any():
        return image.copy()
    h, w = mask.shape
    factor = model_factor(model)
    batch = make_batch(pad_to_multiple(image, factor), pad_to_multiple(mask, factor), _model_device(model))
    inpainted = inpaint_batch(model, batch, settings=settings, x_T=x_T, generator=generator, callback=callback)
    predicted = (rearrange(inpainted[0, :, :h, :w], "c h w -> h w c").cpu().numpy() * 255).astype(np.uint8)
    return np.where(fill[..., None], predicted, image)
