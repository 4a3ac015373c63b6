"""Inpainting with a latent diffusion model (Rombach et al., CVPR 2022, Sec. 4.5; the ``inpainting_big`` model).

The pipeline is upstream's ``scripts/inpaint.py``, op for op (so the same weights, image, mask and ``x_T`` give the
same result to float32 rounding):

1. image ``/ 255`` (float32); mask (greyscale) ``/ 255`` binarised at 0.5 (white = region to fill);
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from PIL import Image

from ldmcli.errors import LdmError, UsageError
from ldmcli.fileio import atomic_write_bytes
from ldmcli.output import encode_png

MASK_SUFFIX = "_mask"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
SAMPLERS = ("ddim", "plms", "dpmpp")


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


def read_image(path: str | os.PathLike, mode: str) -> np.ndarray:
    """An image file as a uint8 array in PIL ``mode`` (``RGB``: ``[h, w, 3]``, ``L``: ``[h, w]``), as upstream reads
    it (``Image.open(path).convert(mode)``). Anything unreadable is a UsageError naming the file."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"{path}: no such file")
    if path.is_dir():
        raise UsageError(f"{path}: is a folder, not an image")
    try:
        with Image.open(path) as image:
            image.load()
            converted = image.convert(mode)
    except Image.DecompressionBombError as e:
        raise UsageError(f"{path}: image too large ({e})") from None
    except (OSError, ValueError, SyntaxError, Image.UnidentifiedImageError) as e:
        reason = "not an image" if isinstance(e, Image.UnidentifiedImageError) else f"unreadable image ({e})"
        raise UsageError(f"{path}: {reason}") from None
    return np.asarray(converted, dtype=np.uint8).copy()


def load_pair(image_path: str | os.PathLike, mask_path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """The image (``[h, w, 3]`` uint8) and its mask (``[h, w]`` uint8); a size mismatch is a UsageError."""
    image = read_image(image_path, "RGB")
    mask = read_image(mask_path, "L")
    if image.shape[:2] != mask.shape:
        raise UsageError(
            f"{mask_path}: mask is {mask.shape[1]}x{mask.shape[0]} but its image {Path(image_path).name} is "
            f"{image.shape[1]}x{image.shape[0]}"
        )
    return image, mask


def check_pair(pair: InpaintPair) -> None:
    """Cheap checks before any model is loaded: both files are images (headers only) of the same size."""
    sizes = []
    for path in (pair.image, pair.mask):
        if not path.is_file():
            raise UsageError(f"{path}: no such file" if not path.exists() else f"{path}: not a file")
        try:
            with Image.open(path) as image:
                sizes.append(image.size)
        except Image.DecompressionBombError as e:
            raise UsageError(f"{path}: image too large ({e})") from None
        except (OSError, ValueError, SyntaxError) as e:
            reason = "not an image" if isinstance(e, Image.UnidentifiedImageError) else f"unreadable image ({e})"
            raise UsageError(f"{path}: {reason}") from None
    if sizes[0] != sizes[1]:
        raise UsageError(f"{pair.mask}: mask is {sizes[1][0]}x{sizes[1][1]} but its image {pair.image.name} is "
                         f"{sizes[0][0]}x{sizes[0][1]}")


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


def check_inpainting_model(model: Any) -> None:
    """A UsageError unless ``model`` is an inpainting LDM: concat conditioning on its own first stage's encoding
    plus one mask channel (``unet.in_channels == 2 * latent channels + 1``)."""
    wrapper = getattr(model, "model", None)
    unet = getattr(wrapper, "diffusion_model", None)
    first = getattr(model, "first_stage_model", None)
    name = Path(str(getattr(model, "ckpt_path", "the model"))).name
    if (
        getattr(wrapper, "conditioning_key", None) != "concat"
        or first is None
        or getattr(model, "cond_stage_model", None) is not first
        or getattr(unet, "in_channels", None) != 2 * int(getattr(model, "channels", 0)) + 1
    ):
        raise UsageError(f"{name} is not an inpainting model (it needs concat conditioning on its first stage's "
                         f"encoding plus a mask channel, like inpainting_big)")


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


def _sample(
    model: Any,
    c: torch.Tensor,
    x_T: torch.Tensor,
    *,
    sampler: str,
    steps: int,
    eta: float,
    generator: torch.Generator | None,
    callback: Callable[[int, int], None] | None,
) -> torch.Tensor:
    from ldmcli.sampling import (DiscreteSchedule, ddim_timesteps, dpmpp_timesteps, model_denoiser, sample_ddim,
                                 sample_dpmpp_2m, sample_plms)

    if sampler not in SAMPLERS:
        raise UsageError(f"unknown sampler {sampler!r}: choose one of {', '.join(SAMPLERS)}")
    schedule = DiscreteSchedule.from_model(model)
    try:
        grid = dpmpp_timesteps(schedule, steps) if sampler == "dpmpp" else ddim_timesteps(steps, schedule.num_timesteps)
    except ValueError as e:
        raise UsageError(f"--steps {steps}: {e}") from None
    eps = model_denoiser(model, c, schedule=schedule)
    step_cb = (lambda s: callback(s.i + 1, s.total)) if callback is not None else None
    if sampler == "ddim":
        return sample_ddim(eps, x_T, schedule, grid, eta=eta, generator=generator, callback=step_cb)
    if sampler == "plms":
        return sample_plms(eps, x_T, schedule, grid, callback=step_cb)
    return sample_dpmpp_2m(eps, x_T, schedule, grid, callback=step_cb)


def check_sampler(sampler: str, steps: int, eta: float) -> None:
    """UsageErrors for settings the samplers refuse, raised before any model is loaded."""
    if sampler not in SAMPLERS:
        raise UsageError(f"unknown sampler {sampler!r}: choose one of {', '.join(SAMPLERS)}")
    if steps < 1:
        raise UsageError(f"--steps must be at least 1, got {steps}")
    if steps > 1000:
        raise UsageError(f"--steps must be at most 1000 (the published models' timesteps), got {steps}")
    if not eta >= 0.0:
        raise UsageError(f"--eta must be >= 0, got {eta}")
    if eta != 0.0 and sampler != "ddim":
        raise UsageError(f"--eta applies to the ddim sampler only ({sampler} is deterministic)")


@torch.no_grad()
def inpaint_batch(
    model: Any,
    batch: Mapping[str, torch.Tensor],
    *,
    steps: int = 50,
    sampler: str = "ddim",
    eta: float = 0.0,
    x_T: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    callback: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Upstream's pipeline on a :func:`make_batch` batch (sides multiples of :func:`model_factor`): returns
    ``inpainted = (1 - mask) * image + mask * predicted``, ``[b, 3, h, w]`` float32 in [0, 1], before the uint8
    conversion. ``x_T`` (else standard normal noise from ``generator``, drawn on its device) is the initial latent;
    ``callback(step, total)`` after each sampler step.
    """
    from ldmcli.sampling import noise_like

    c = conditioning(model, batch)
    shape = (c.shape[0], c.shape[1] - 1, *c.shape[2:])
    if x_T is None:
        x_T = noise_like(torch.empty(shape, device=c.device), generator)
    elif tuple(x_T.shape) != shape:
        raise UsageError(f"x_T has shape {list(x_T.shape)} but this image needs {list(shape)}")
    samples = _sample(model, c, x_T.to(c.device, torch.float32), sampler=sampler, steps=steps, eta=eta,
                      generator=generator, callback=callback)
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
    steps: int = 50,
    sampler: str = "ddim",
    eta: float = 0.0,
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
        raise UsageError(f"the image must be [h, w, 3] uint8, got {list(image.shape)} {image.dtype}")
    if mask.shape != image.shape[:2] or mask.dtype != np.uint8:
        raise UsageError(f"the mask must be [h, w] uint8 of the image's size, got {list(mask.shape)} {mask.dtype}")
    fill = (mask.astype(np.float32) / 255.0) >= 0.5  # upstream's binarisation
    if not fill.any():
        return image.copy()
    h, w = mask.shape
    factor = model_factor(model)
    batch = make_batch(pad_to_multiple(image, factor), pad_to_multiple(mask, factor), _model_device(model))
    inpainted = inpaint_batch(model, batch, steps=steps, sampler=sampler, eta=eta, x_T=x_T, generator=generator,
                              callback=callback)
    predicted = (rearrange(inpainted[0, :, :h, :w], "c h w -> h w c").cpu().numpy() * 255).astype(np.uint8)
    return np.where(fill[..., None], predicted, image)


# ------------------------------------------------------------------------------------------------------- batch


@dataclass(frozen=True)
class InpaintSettings:
    """What a run uses for every pair (each pair gets its own generator seeded with ``seed``, so a result does not
    depend on which other pairs ran before it: resumed batches give the same images)."""

    steps: int = 50
    sampler: str = "ddim"
    eta: float = 0.0
    seed: int = 0


@dataclass(frozen=True)
class InpaintEvent:
    """Progress of :func:`inpaint_pairs`: ``kind`` is ``start``, ``step``, ``done``, ``skipped`` or ``failed``;
    ``index`` counts pairs from 0 of ``total``; ``step``/``steps`` the sampler's progress within the pair."""

    kind: str
    index: int
    total: int
    pair: InpaintPair
    step: int = 0
    steps: int = 0
    message: str = ""


@dataclass
class InpaintReport:
    """What a batch did: outputs written (with their records), pairs skipped (output present), pairs failed."""

    written: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[InpaintPair] = field(default_factory=list)
    failed: list[PairProblem] = field(default_factory=list)


def inpaint_pairs(
    model: Any,
    pairs: Iterable[InpaintPair],
    settings: InpaintSettings,
    *,
    overwrite: bool = False,
    metadata: Mapping[str, Any] | None = None,
    callback: Callable[[InpaintEvent], None] | None = None,
) -> InpaintReport:
    """Inpaint each pair and write ``pair.output`` (PNG, atomically, the settings in its ``ldmcli`` text chunk).

    An output that already exists is skipped unless ``overwrite`` (resumable batches); a pair that cannot be read
    is recorded in ``report.failed`` and the others go on. ``metadata`` is added to every PNG and record.
    """
    pairs = list(pairs)
    report = InpaintReport()
    total = len(pairs)
    for index, pair in enumerate(pairs):
        def emit(kind: str, step: int = 0, steps: int = 0, message: str = "") -> None:
            if callback is not None:
                callback(InpaintEvent(kind, index, total, pair, step, steps, message))

        if pair.output.exists() and not overwrite:
            report.skipped.append(pair)
            emit("skipped", message=f"{pair.output} exists")
            continue
        emit("start")
        try:
            image, mask = load_pair(pair.image, pair.mask)
        except LdmError as e:
            report.failed.append(PairProblem(pair.image, str(e)))
            emit("failed", message=str(e))
            continue
        generator = torch.Generator().manual_seed(settings.seed)
        result = inpaint_array(model, image, mask, steps=settings.steps, sampler=settings.sampler, eta=settings.eta,
                               generator=generator, callback=lambda i, n: emit("step", i, n))
        record = {
            **(dict(metadata) if metadata else {}),
            "image": pair.image.name,
            "mask": pair.mask.name,
            "width": int(image.shape[1]),
            "height": int(image.shape[0]),
            "steps": settings.steps,
            "sampler": settings.sampler,
            "eta": settings.eta,
            "seed": settings.seed,
        }
        try:
            atomic_write_bytes(pair.output, encode_png(result, record))
        except OSError as e:
            problem = PairProblem(pair.output, f"{pair.output}: cannot write ({e.strerror or e})")
            report.failed.append(problem)
            emit("failed", message=problem.message)
            continue
        report.written.append({"path": str(pair.output), **record})
        emit("done")
    return report
