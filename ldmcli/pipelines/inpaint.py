"""Inpainting of image/mask pairs (upstream ``scripts/inpaint.py``): :func:`run` does what ``ldm inpaint`` does, from
Python. The operations themselves (upstream's pipeline, op for op) are in :mod:`ldmcli.inpaint`.

Forms: one pair (``image``, ``mask``, ``output``) or a folder (``indir`` of ``NAME.png`` + ``NAME_mask.png``,
``outdir``: resumable, outputs that exist are skipped unless ``overwrite``). Each pair is seeded with ``seed``, so a
result does not depend on which other pairs ran before it.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from ldmcli.errors import LdmError, RequestError, UsageError
from ldmcli.fileio import atomic_write_bytes
from ldmcli.inpaint import (InpaintPair, PairProblem, check_inpainting_config, check_inpainting_model, check_pair,
                            find_pairs, inpaint_array, load_pair)
from ldmcli.output import FATAL_WRITE_ERRNOS, OutputError, check_output_folder, describe_os_error, encode_png
from ldmcli.pipelines import generation as gen
from ldmcli.pipelines.batch import BatchReport
from ldmcli.pipelines.events import (EventHandler, ItemDone, ItemFailed, ItemSkipped, ItemStarted, ItemStep, downloads,
                                     ignore, messages)
from ldmcli.sampling import SamplerSettings

DEFAULT_MODEL = "inpainting_big"
SAMPLERS = ("auto", "ddim", "plms", "dpmpp", "dpmpp3m", "unipc", "unipc-bh1")  # ddpm: 1000 steps, no use here


@dataclass(frozen=True)
class InpaintRequest:
    """One run: ``image`` + ``mask`` -> ``output`` (a .png), or ``indir`` -> ``outdir``."""

    image: Path | None = None
    mask: Path | None = None
    output: Path | None = None
    indir: Path | None = None
    outdir: Path | None = None
    model: str = DEFAULT_MODEL
    config: Path | None = None
    ckpt: Path | None = None
    settings: SamplerSettings = SamplerSettings("auto", 50, 0.0, 1.0)
    seed: int | None = None
    device: str | None = None
    precision: str = "auto"
    overwrite: bool = False


InpaintReport = BatchReport  # skipped: InpaintPair, failed: PairProblem


def check_settings(settings: SamplerSettings) -> None:
    if settings.sampler not in SAMPLERS:
        raise RequestError("sampler", f"unknown sampler {settings.sampler!r}: choose one of {', '.join(SAMPLERS)}")
    gen.check_settings(settings)


def _single_pair(request: InpaintRequest, config: Any = None, name: str = "the model") -> InpaintPair:
    image, mask, output = request.image, request.mask, request.output
    if mask is None:
        raise RequestError("mask", f"{image}: no mask given")
    if output is None:
        raise RequestError("output", "output: no output file given")
    if output.suffix.lower() != ".png":
        raise RequestError("output", f"{output}: the output must be a .png file (lossless, so pixels outside the mask "
                           f"stay exactly the input's)")
    if output.exists() and output.is_dir():
        raise RequestError("output", f"{output}: is a folder, not an output file")
    pair = InpaintPair(image, mask, output)
    check_pair(pair, config, name)
    if output.exists() and output.resolve() in (image.resolve(), mask.resolve()):
        raise RequestError("output", f"{output}: the output would overwrite an input")
    if output.exists() and not request.overwrite:
        raise RequestError("overwrite", f"{output}: exists (overwrite replaces it)")
    return pair


def plan(request: InpaintRequest, config: Any = None,
         name: str = "the model") -> tuple[list[InpaintPair], list[PairProblem]]:
    """The pairs to run and the problems found without any model (bad files, images too small for ``config``'s
    model, are problems in a batch, errors for a single pair). Every pair still to do is decoded here once, so a
    file that cannot be read faithfully fails before any model is loaded."""
    if request.image is not None and request.indir is not None:
        raise UsageError("give either one image with its mask or an input folder, not both")
    if request.image is None and request.indir is None:
        raise UsageError("nothing to inpaint: give an image with its mask, or an input folder")
    if request.image is not None:
        if request.outdir is not None:
            raise RequestError("outdir", "outdir belongs to the folder form; one pair takes an output file")
        return [_single_pair(request, config, name)], []
    if request.outdir is None:
        raise RequestError("outdir", "outdir: an input folder needs an output folder (results keep the input names)")
    if request.output is not None:
        raise RequestError("output", "output belongs to the one-pair form; the folder form writes into outdir")
    pairs, problems = find_pairs(request.indir, request.outdir)
    todo = []
    for pair in pairs:
        if pair.output.exists() and not request.overwrite:
            todo.append(pair)  # skipped (and reported) when the run reaches it
            continue
        try:
            check_pair(pair, config, name)
        except LdmError as e:
            problems.append(PairProblem(pair.image, str(e)))
            continue
        todo.append(pair)
    return todo, problems


def check(request: InpaintRequest) -> tuple[Any, list[InpaintPair], list[PairProblem]]:
    """Every check that needs no weights (settings, model kind, every input pair, an output folder that can be
    written); returns the model source, the pairs and the problems found."""
    from ldmcli.loading import resolve

    check_settings(request.settings)
    gen.check_counts((), 0, request.seed)
    if request.config is not None and request.model not in (None, DEFAULT_MODEL):
        raise UsageError("give either a model or a config file, not both")
    source = resolve(request.model, config=request.config, ckpt=request.ckpt)
    if source.config is not None:
        check_inpainting_config(source.config, source.name)
    pairs, problems = plan(request, source.config, source.name)
    if pairs:
        check_output_folder(request.outdir if request.outdir is not None else pairs[0].output.parent)
    return source, pairs, problems


def fitting_pairs(config: Any, pairs: list[InpaintPair], problems: list[PairProblem], *, dtype: torch.dtype,
                  device: Any, single: bool = False, overwrite: bool = False) -> list[InpaintPair]:
    """The pairs whose image (padded to the model's factor) fits in memory (:func:`generation.check_memory`); the
    others are added to ``problems`` (or, for a ``single`` pair, raised). Pairs that will be skipped are kept."""
    from PIL import Image

    f = config.downsampling_factor
    factor = f * 2 ** (len(config.ldm.unet.channel_mult) - 1)
    fitting = []
    for pair in pairs:
        if pair.output.exists() and not overwrite:
            fitting.append(pair)
            continue
        with Image.open(pair.image) as im:
            width, height = im.size
        try:
            gen.check_memory(config, -(-height // factor) * factor, -(-width // factor) * factor, 1, guidance=False,
                             dtype=dtype, device=device, tiling=False)
        except RequestError as e:
            if single:
                raise RequestError(e.field, f"{pair.image}: {e.detail}") from None
            problems.append(PairProblem(pair.image, f"{pair.image}: {e.detail}"))
            continue
        fitting.append(pair)
    return fitting


def inpaint_pairs(
    model: Any,
    pairs: list[InpaintPair],
    settings: SamplerSettings,
    *,
    seed: int,
    overwrite: bool = False,
    metadata: Mapping[str, Any] | None = None,
    on_event: EventHandler = ignore,
    report: InpaintReport | None = None,
) -> InpaintReport:
    """Inpaint each pair and write ``pair.output`` (PNG, atomically, the settings in its ``ldmcli`` text chunk).

    An output that already exists is skipped unless ``overwrite`` (resumable batches); a pair that cannot be read
    is recorded in ``report.failed`` and the others go on. ``metadata`` is added to every PNG and record.
    """
    report = report if report is not None else InpaintReport(seed=seed)
    total = len(pairs)
    ran = settings.resolve()
    for index, pair in enumerate(pairs):
        if pair.output.exists() and not overwrite:
            report.skipped.append(pair)
            on_event(ItemSkipped(index, total, pair.output, f"{pair.output} exists"))
            continue
        on_event(ItemStarted(index, total, pair.image.name))
        started = time.monotonic()
        try:
            image, mask = load_pair(pair.image, pair.mask)
        except LdmError as e:
            report.failed.append(PairProblem(pair.image, str(e)))
            on_event(ItemFailed(index, total, pair.image, str(e)))
            continue
        generator = torch.Generator().manual_seed(seed)
        result = inpaint_array(model, image, mask, settings=settings, generator=generator,
                               callback=lambda i, n, index=index: on_event(ItemStep(index, total, i, n)))
        record = {**(dict(metadata) if metadata else {}), "image": pair.image.name, "mask": pair.mask.name,
                  "width": int(image.shape[1]), "height": int(image.shape[0]), "steps": ran.steps,
                  "sampler": ran.sampler, "sampler_requested": settings.sampler, "spacing": ran.spacing,
                  "eta": ran.eta, "seed": seed}
        try:
            atomic_write_bytes(pair.output, encode_png(result, record))
        except OSError as e:
            if e.errno in FATAL_WRITE_ERRNOS:  # no later pair could be written either
                raise OutputError(describe_os_error(e, pair.output)) from None
            problem = PairProblem(pair.output, describe_os_error(e, pair.output))
            report.failed.append(problem)
            on_event(ItemFailed(index, total, pair.output, problem.message))
            continue
        report.written.append({"path": str(pair.output), **record})
        on_event(ItemDone(index, total, pair.output, time.monotonic() - started, record))
    return report


def run(request: InpaintRequest, on_event: EventHandler = ignore) -> InpaintReport:
    """Check, then load the model (only when some output
    is still missing) and inpaint every pair. Problems found before loading are reported as :class:`ItemFailed`
    events and in ``report.failed``."""
    from ldmcli.devices import pick_device, resolve_precision
    from ldmcli.loading import load

    source, pairs, problems = check(request)
    dev = pick_device(request.device)
    dtype = resolve_precision(request.precision, dev)
    if source.config is not None:
        pairs = fitting_pairs(source.config, pairs, problems, dtype=dtype, device=dev, single=request.image is not None,
                              overwrite=request.overwrite)
    seed = secrets.randbelow(2**31) if request.seed is None else request.seed
    report = InpaintReport(seed=seed, total=len(pairs) + len(problems))
    for problem in problems:
        report.failed.append(problem)
        on_event(ItemFailed(-1, len(pairs), problem.path, problem.message))
    if not pairs:
        return report
    label = str(request.config) if request.config is not None else request.model
    metadata = {"command": "inpaint", "model": label if request.ckpt is None else f"{label} ({Path(request.ckpt).name})",
                "precision": str(dtype).replace("torch.", "")}
    model = None
    if request.overwrite or not all(pair.output.exists() for pair in pairs):  # a fully done batch needs no model
        loaded = load(source, device=dev, dtype=dtype, callback=messages(on_event), progress=downloads(on_event))
        model = loaded.model
        check_inpainting_model(model, source.name)
        if loaded.ckpt_sha256:
            metadata["ckpt_sha256"] = loaded.ckpt_sha256
    return inpaint_pairs(model, pairs, request.settings, seed=seed, overwrite=request.overwrite, metadata=metadata,
                         on_event=on_event, report=report)
