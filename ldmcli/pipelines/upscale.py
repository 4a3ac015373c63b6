"""4x super-resolution with LDSR (``bsr_sr``), upstream's notebook pipeline (``notebook_helpers.get_cond`` +
``make_convolutional_sample``): :func:`run` does what ``ldm upscale`` does, from Python; :func:`upscale_array`
upscales one image held in memory.

The low-resolution image in [-1, 1] is the concat conditioning (the cond stage is the identity), the latent has the
shape of the first-stage encoding of the 4x image, DDIM with eta 1.0 and 100 steps by default, EMA weights (as
:func:`ldmcli.loading.load` puts them in place). Inputs whose 4x size is at least 128 px a side run patch-wise with
the notebook's ``split_input_params`` (UNet and decoder), see :mod:`ldmcli.conditioning.superres`. Any size: padded to
what the UNet needs and cropped back.

Forms: images (``images``) written to ``output`` (one image) or ``outdir/NAME.png``, or a folder (``indir`` ->
``outdir``). Outputs that exist are skipped unless ``overwrite`` (resumable); each image is seeded with ``seed``, so a
result does not depend on which other images ran before it.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from ldmcli.conditioning import superres as sr
from ldmcli.conditioning.images import image_size
from ldmcli.errors import LdmError, RequestError, UsageError
from ldmcli.fileio import atomic_write_bytes, sha256_file
from ldmcli.output import encode_png, to_uint8
from ldmcli.pipelines import generation as gen
from ldmcli.pipelines.batch import BatchReport
from ldmcli.pipelines.events import (EventHandler, ItemDone, ItemFailed, ItemPatches, ItemSkipped, ItemStarted,
                                     ItemStep, Message, ignore)
from ldmcli.sampling import SamplerSettings, sample_latents

DEFAULT_MODEL = "bsr_sr"
DEFAULT_OUTDIR = Path("outputs/upscale")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


@dataclass(frozen=True)
class UpscaleRequest:
    """One run: ``images`` -> ``output`` (one image, a .png) or ``outdir/NAME.png``; or ``indir`` -> ``outdir``.
    ``pre_downsample`` 2 or 4 shrinks the input first (output 2x or 1x the input); ``patch_batch``: UNet patches
    per forward pass."""

    images: Sequence[Path] = ()
    output: Path | None = None
    indir: Path | None = None
    outdir: Path | None = None
    model: str = DEFAULT_MODEL
    config: Path | None = None
    ckpt: Path | None = None
    settings: SamplerSettings = SamplerSettings("ddim", 100, 1.0, 1.0)
    seed: int | None = None
    pre_downsample: int = 1
    patch_batch: int = 1
    device: str | None = None
    precision: str = "auto"
    overwrite: bool = False


@dataclass(frozen=True)
class UpscaleJob:
    image: Path
    output: Path


@dataclass(frozen=True)
class InputProblem:
    """An input that cannot be processed, with a one-line reason naming the file."""

    path: Path
    message: str


UpscaleReport = BatchReport  # skipped: UpscaleJob, failed: InputProblem


# --------------------------------------------------------------------------------------------------------- checks


def check_superres_config(cfg: Any, name: str) -> None:
    """A UsageError unless ``cfg`` is an LDSR-like model: the identity conditioner concatenated to the latent, with
    an f4 first stage (so the low-resolution image has the latent's size)."""
    gen.require_diffusion(cfg, name)
    if cfg.ldm.cond_stage.type != "identity" or cfg.ldm.conditioning_key != "concat":
        raise UsageError(f"{name} is not a super-resolution model (LDSR concatenates the low-resolution image to the "
                         f"latent; this one is conditioned on {cfg.ldm.cond_stage.type})")
    if cfg.downsampling_factor != sr.UPSCALE or cfg.ldm.unet.in_channels != cfg.latent_channels + 3:
        raise UsageError(f"{name}: a 4x super-resolution model needs an f4 first stage and a UNet taking the latent "
                         f"plus 3 image channels")


def check_settings(settings: SamplerSettings, num_timesteps: int = 1000) -> None:
    if settings.scale != 1.0:
        raise RequestError("scale", "scale: LDSR has no unconditional input to guide against (use 1)")
    if settings.sampler == "ddpm":
        raise RequestError("sampler", "sampler ddpm runs the full 1000-step chain: use ddim, plms or dpmpp")
    gen.check_settings(settings, num_timesteps)


def plan_for(path: Path, pre_downsample: int, multiple: int = 8) -> sr.UpscalePlan:
    """The plan of one input from its header (cheap): a missing/unreadable file or a too small image is a
    UsageError naming the file."""
    width, height = image_size(path)
    try:
        return sr.plan_upscale(height, width, pre_downsample_factor=pre_downsample, multiple=multiple)
    except UsageError as e:
        raise UsageError(f"{path}: {e}") from None


def _input_files(indir: Path) -> list[Path]:
    if not indir.is_dir():
        raise RequestError("indir", f"indir: {indir} is not a folder" if indir.exists() else f"indir: no such folder "
                           f"{indir}")
    files = sorted(p for p in indir.iterdir() if p.is_file() and not p.name.startswith(".")
                   and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise RequestError("indir", f"indir: {indir} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return files


def plan(request: UpscaleRequest) -> tuple[list[UpscaleJob], list[InputProblem]]:
    """The inputs to run and the problems found without any model: named images are checked here (a bad one is an
    error); in the folder form bad files are problems reported at the end, and the others run."""
    images = [Path(p) for p in request.images]
    if images and request.indir is not None:
        raise UsageError("give either images or an input folder, not both")
    if not images and request.indir is None:
        raise UsageError("nothing to upscale: give images, or an input folder")
    if request.output is not None:
        if request.indir is not None or len(images) != 1:
            raise RequestError("output", "output names the result of one image; use outdir for several")
        if request.outdir is not None:
            raise RequestError("output", "output and outdir: give one of them")
        if request.output.suffix.lower() != ".png":
            raise RequestError("output", f"{request.output}: the output must be a .png file (lossless, with the "
                               "settings in it)")
        if request.output.is_dir():
            raise RequestError("output", f"{request.output}: is a folder, not an output file")
    if request.indir is not None and request.outdir is None:
        raise RequestError("outdir", "outdir: an input folder needs an output folder (results keep the input names)")
    outdir = request.outdir if request.outdir is not None else DEFAULT_OUTDIR
    if outdir.exists() and not outdir.is_dir():
        raise RequestError("outdir", f"outdir: {outdir} is not a folder")
    if request.indir is not None and outdir.resolve() == request.indir.resolve():
        raise RequestError("outdir", "outdir must differ from indir (results keep the input names)")
    inputs = images or _input_files(request.indir)
    jobs, problems, seen = [], [], {}
    for image in inputs:
        output = request.output if request.output is not None else outdir / f"{image.stem}.png"
        if output in seen:
            raise UsageError(f"{image} and {seen[output]} would both be written to {output}")
        seen[output] = image
        if output.exists() and output.resolve() == image.resolve():
            raise UsageError(f"{output}: the output would overwrite its input")
        if output.exists() and not request.overwrite:
            if request.output is not None:
                raise RequestError("overwrite", f"{output}: exists (overwrite replaces it)")
            jobs.append(UpscaleJob(image, output))  # skipped (and reported) when the run reaches it
            continue
        try:
            plan_for(image, request.pre_downsample)
        except UsageError as e:
            if images:
                raise
            problems.append(InputProblem(image, str(e)))
            continue
        jobs.append(UpscaleJob(image, output))
    return jobs, problems


def check(request: UpscaleRequest) -> tuple[Any, list[UpscaleJob], list[InputProblem]]:
    """Every check that needs no weights; returns the model source, the jobs and the problems found."""
    from ldmcli.loading import resolve

    check_settings(request.settings)
    gen.check_counts((("patch_batch", request.patch_batch),), 0, request.seed)
    if request.pre_downsample not in sr.PRE_DOWNSAMPLE:
        raise RequestError("pre_downsample", f"pre_downsample must be 1, 2 or 4, got {request.pre_downsample}")
    if request.config is not None and request.model not in (None, DEFAULT_MODEL):
        raise UsageError("give either a model or a config file, not both")
    source = resolve(request.model, config=request.config, ckpt=request.ckpt)
    if source.config is not None:
        check_superres_config(source.config, source.name)
        check_settings(request.settings, source.config.ldm.timesteps)
    jobs, problems = plan(request)
    return source, jobs, problems


# ------------------------------------------------------------------------------------------------------ upscaling


def upscale_array(
    model: Any,
    image: np.ndarray,
    settings: SamplerSettings = SamplerSettings("ddim", 100, 1.0, 1.0),
    *,
    seed: int = 0,
    pre_downsample: int = 1,
    patch_batch: int = 1,
    on_step: Callable[[int, int], None] | None = None,
    on_patches: Callable[[str, int, int], None] | None = None,
) -> tuple[np.ndarray, sr.UpscalePlan]:
    """Upscale ``image`` (``[h, w, 3]`` uint8 RGB) 4x with a loaded LDSR ``model``; returns the ``[4h', 4w', 3]``
    uint8 result (``h', w'`` after ``pre_downsample``) and the plan. The initial noise and every later draw come from
    a CPU generator seeded with ``seed``. ``on_step(done, steps)`` after each sampler step, ``on_patches(stage, done,
    total)`` as patches finish (patch-wise runs only). The model's own ``split_input_params`` are replaced by the
    plan's for the call and restored afterwards."""
    from ldmcli.fastpath import inference_context, network_dtype
    from ldmcli.sampling import DiscreteSchedule

    h, w = image.shape[:2]
    multiple = sr.unet_multiple(model)
    the_plan = sr.plan_upscale(h, w, pre_downsample_factor=pre_downsample, multiple=multiple,
                               z_channels=int(model.channels), patch_batch=patch_batch)
    lowres = sr.pre_downsample(image, pre_downsample)
    device = gen.model_device(model)
    c = sr.pad_to_multiple(sr.lowres_condition(lowres), multiple).to(device)
    split = the_plan.split_input_params
    previous = getattr(model, "split_input_params", None)
    model.split_input_params = None if split is None else {**split, **({"progress": on_patches} if on_patches else {})}
    schedule = DiscreteSchedule.from_model(model)
    steps = settings.num_steps(schedule)
    generator = torch.Generator("cpu").manual_seed(seed)
    try:
        with inference_context():
            x_T = torch.randn((1, *the_plan.latent_shape), generator=generator).to(device)
            z = sample_latents(model, x_T, c, None, settings, schedule=schedule, generator=[generator],
                               callback=None if on_step is None else lambda step: on_step(step.i + 1, steps))
            decoded = model.decode_first_stage(z.to(network_dtype(model.first_stage_model))).float()
            pixels = to_uint8(sr.crop_output(decoded, the_plan))[0]
    finally:
        model.split_input_params = previous  # the caller's setting back (None: none)
    return pixels, the_plan


def upscale_files(
    model: Any,
    jobs: Sequence[UpscaleJob],
    settings: SamplerSettings,
    *,
    seed: int,
    pre_downsample: int = 1,
    patch_batch: int = 1,
    overwrite: bool = False,
    metadata: Mapping[str, Any] | None = None,
    on_event: EventHandler = ignore,
    report: UpscaleReport | None = None,
) -> UpscaleReport:
    """Upscale each job's image and write its output (PNG, atomically, the settings and the input's sha256 in its
    ``ldmcli`` text chunk). Outputs that exist are skipped unless ``overwrite``; an input that cannot be read is
    recorded in ``report.failed`` and the others go on."""
    report = report if report is not None else UpscaleReport(seed=seed)
    total = len(jobs)
    for index, job in enumerate(jobs):
        if job.output.exists() and not overwrite:
            report.skipped.append(job)
            on_event(ItemSkipped(index, total, job.output, f"{job.output} exists"))
            continue
        on_event(ItemStarted(index, total, job.image.name))
        started = time.monotonic()
        try:
            image, notes = sr.read_lowres(job.image)
            sr.plan_upscale(*image.shape[:2], pre_downsample_factor=pre_downsample)
        except LdmError as e:
            message = str(e) if str(job.image) in str(e) else f"{job.image}: {e}"
            report.failed.append(InputProblem(job.image, message))
            on_event(ItemFailed(index, total, job.image, message))
            continue
        for note in notes:
            on_event(Message(f"{job.image.name}: {note}", always=True))
        pixels, the_plan = upscale_array(
            model, image, settings, seed=seed, pre_downsample=pre_downsample, patch_batch=patch_batch,
            on_step=lambda i, n, index=index: on_event(ItemStep(index, total, i, n)),
            on_patches=lambda stage, done, n, index=index: on_event(ItemPatches(index, total, stage, done, n)))
        record = {**(dict(metadata) if metadata else {}), "image": job.image.name,
                  "image_sha256": sha256_file(job.image), "input_width": int(image.shape[1]),
                  "input_height": int(image.shape[0]), "width": int(pixels.shape[1]), "height": int(pixels.shape[0]),
                  "pre_downsample": pre_downsample, "patches": the_plan.patches, "seed": seed}
        if notes:
            record["conversions"] = list(notes)
        try:
            atomic_write_bytes(job.output, encode_png(pixels, record))
        except OSError as e:
            problem = InputProblem(job.output, f"{job.output}: cannot write ({e.strerror or e})")
            report.failed.append(problem)
            on_event(ItemFailed(index, total, job.output, problem.message))
            continue
        report.written.append({"path": str(job.output), **record})
        on_event(ItemDone(index, total, job.output, time.monotonic() - started, record))
    return report


def run(request: UpscaleRequest, on_event: EventHandler = ignore) -> UpscaleReport:
    """Check, then load the model (only when some output is still missing) and upscale every input. Problems found
    before loading are reported as :class:`ItemFailed` events and in ``report.failed``."""
    from ldmcli.devices import pick_device, resolve_precision

    source, jobs, problems = check(request)
    dev = pick_device(request.device)
    dtype = resolve_precision(request.precision, dev)
    seed = secrets.randbelow(2**31) if request.seed is None else request.seed
    report = UpscaleReport(seed=seed, total=len(jobs) + len(problems))
    for problem in problems:
        report.failed.append(problem)
        on_event(ItemFailed(-1, len(jobs), problem.path, problem.message))
    if not request.overwrite and all(job.output.exists() for job in jobs):  # a finished batch needs no model
        return upscale_files(None, jobs, request.settings, seed=seed, on_event=on_event, report=report)
    loaded = gen.load_for_sampling(source, dev, dtype, on_event)
    check_superres_config(loaded.config, source.name)
    check_settings(request.settings, loaded.model.num_timesteps)
    metadata = {"command": "upscale", **gen.base_metadata(loaded, request.settings, dtype)}
    return upscale_files(loaded.model, jobs, request.settings, seed=seed, pre_downsample=request.pre_downsample,
                         patch_batch=request.patch_batch, overwrite=request.overwrite, metadata=metadata,
                         on_event=on_event, report=report)
