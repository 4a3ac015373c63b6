"""Unconditional, class-conditional, label-map and layout sampling (upstream ``scripts/sample_diffusion.py``, the
cin256 notebook; ``semantic_synthesis256/512`` and ``layout2img-openimages256``, for which upstream shipped no
script): :func:`run` does what ``ldm sample`` does, from Python.

Label maps (:mod:`ldmcli.conditioning.segmentation`) are one-hot to 182 channels and go through the model's
``SpatialRescaler``, concatenated to the latent; the image size is the map's (or ``height`` x ``width``, the map
resized nearest-neighbour). Layouts (:mod:`ldmcli.conditioning.layout`) become taming's 92 bounding-box tokens
through the model's BERTEmbedder (cross-attention). Both are read and checked before any model loads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from ldmcli.conditioning import layout as lay
from ldmcli.conditioning import segmentation as seg
from ldmcli.errors import RequestError, UsageError
from ldmcli.output import check_output_folder
from ldmcli.fileio import sha256_file
from ldmcli.pipelines import generation as gen
from ldmcli.pipelines.events import EventHandler, Message, ignore
from ldmcli.sampling import SamplerSettings


@dataclass(frozen=True, kw_only=True)
class SampleRequest(gen.RunOptions):
    """One run: ``n_samples`` images (per class with ``classes``) of ``model`` (a zoo name, run folder or checkpoint:
    anything :func:`ldmcli.loading.resolve` takes). ``outdir`` None: ``outputs/<model>-samples``."""

    model: str
    outdir: Path | None = None
    settings: SamplerSettings = SamplerSettings("ddim", 50, 1.0, 1.0)
    classes: Sequence[int] = field(default_factory=tuple)
    null_class: int | None = None
    n_samples: int = 4
    batch_size: int = 10
    segmentation: Path | None = None
    layout: Path | None = None
    height: int | None = None
    width: int | None = None
    plot_layout: bool = False


def condition_kind(cfg: Any) -> str | None:
    """``"segmentation"`` (a SpatialRescaler over one-hot label maps), ``"layout"`` (a BERTEmbedder over layout tokens,
    no tokenizer), or None for the other models."""
    cond = cfg.ldm.cond_stage
    if cond.type == "spatial_rescaler":
        return "segmentation"
    if cond.type == "bert" and not getattr(cond.params, "use_tokenizer", True):
        return "layout"
    return None


_WHAT = {"segmentation": "a label map", "layout": "a bounding-box layout"}
_MODELS = {"segmentation": "semantic_synthesis256", "layout": "layout2img-openimages256"}


def check_sample_model(cfg: Any, name: str, classes: Sequence[int], scale: float, null_class: int | None, *,
                       segmentation: Path | None = None, layout: Path | None = None) -> Any:
    """Validate classes, label map/layout and guidance against the model; return the null class id used for guidance
    (or None)."""
    gen.require_diffusion(cfg, name)
    given = "segmentation" if segmentation is not None else "layout" if layout is not None else None
    wanted = condition_kind(cfg)
    if wanted is not None:
        if given != wanted:
            raise RequestError(wanted, f"{wanted}: {name} draws images from {_WHAT[wanted]}: give one")
        if classes:
            raise RequestError("classes", f"{name} takes {_WHAT[wanted]}, not classes")
        if scale != 1.0:
            raise RequestError("scale", f"scale: {name} has no unconditional input to guide against (use 1)")
        return None
    if given is not None:
        raise RequestError(given, f"{given}: {name} does not take {_WHAT[given]} (e.g. {_MODELS[given]} does)")
    kind = cfg.ldm.cond_stage.type
    if kind == "unconditional":
        if classes:
            raise RequestError("classes", f"{name} is unconditional: classes do not apply")
        if scale != 1.0:
            raise RequestError("scale", f"{name} is unconditional: scale (guidance) does not apply")
        return None
    if kind != "class":
        hint = "use 'ldm txt2img'" if kind == "bert" else "see 'ldm --help'"
        raise UsageError(f"{name} is conditioned on {kind} input, not classes: {hint}")
    n_real, null = gen.class_range(cfg)
    if null_class is not None:
        n_total = int(cfg.ldm.cond_stage.params.n_classes)
        if not 0 <= null_class < n_total:
            raise RequestError("null_class", f"null_class must be between 0 and {n_total - 1}, got {null_class}")
        null, n_real = null_class, n_total
    if not classes:
        if null is None:
            raise RequestError("classes", f"classes: {name} is class-conditional: give a class id (0-{n_real - 1}), "
                               f"repeatable")
        if scale != 1.0:
            raise RequestError("scale", f"{name}: unconditional samples (no class given) take no guidance scale")
        return null  # no class: unconditional samples, conditioned on the null class the model was trained with
    bad = [c for c in classes if not 0 <= c < n_real or c == null]
    if bad:
        raise RequestError("classes", f"class id {bad[0]} is out of range for {name} (0-{n_real - 1})")
    if scale != 1.0 and null is None:
        raise RequestError("scale", f"{name} has no null class to guide against: use scale 1 (or cin256-v2, or "
                           f"name a null class)")
    return null


def default_outdir(name: str) -> Path:
    return Path("outputs") / f"{Path(name).name or 'model'}-samples"


def image_size(cfg: Any, name: str, request: SampleRequest,
               map_shape: tuple[int, int] | None = None) -> tuple[int, int]:
    """``(height, width)`` of the images: ``request.height``/``width``, else the label map's size, else the model's
    training size. A label map whose own size the model cannot take is an error naming the nearest valid size."""
    f = cfg.downsampling_factor
    multiple = f * 2 ** (len(cfg.ldm.unet.channel_mult) - 1)
    default = map_shape if map_shape is not None else (cfg.pixel_size, cfg.pixel_size)
    height = request.height if request.height is not None else default[0]
    width = request.width if request.width is not None else default[1]
    if map_shape is not None and (height, width) == map_shape and (height % multiple or width % multiple):
        near_h, near_w = (max(multiple, round(v / multiple) * multiple) for v in (height, width))
        raise RequestError("segmentation", f"segmentation: {request.segmentation} is {width}x{height} px; {name} "
                           f"needs multiples of {multiple}: nearest valid size {near_w}x{near_h} (give that height "
                           f"and width to resize the map, nearest-neighbour)")
    gen.check_image_size(cfg, height, width, name)
    return height, width


def read_condition(request: SampleRequest) -> Any:
    """The label map (class ids, ``[h, w]`` uint8) or the layout objects of the request (one-line errors)."""
    if request.segmentation is not None and request.layout is not None:
        raise UsageError("give either a label map or a layout, not both")
    if request.segmentation is not None:
        return seg.read_label_map(request.segmentation)
    if request.layout is not None:
        return lay.read_layout(request.layout)
    return None


def check(request: SampleRequest) -> Any:
    """Every check that needs no weights (the output folder can be written; the label map or layout is read here);
    returns the resolved :class:`ldmcli.loading.ModelSource`."""
    from ldmcli.loading import resolve

    gen.check_counts((("n_samples", request.n_samples), ("batch_size", request.batch_size)), request.n_rows,
                     request.seed)
    gen.check_settings(request.settings)
    condition = read_condition(request)
    source = resolve(request.model)
    if source.config is not None:
        check_sample_model(source.config, source.name, request.classes, request.settings.scale, request.null_class,
                           segmentation=request.segmentation, layout=request.layout)
        gen.check_settings(request.settings, source.config.ldm.timesteps)
        image_size(source.config, source.name, request, condition.shape if request.segmentation else None)
    if request.plot_layout and request.layout is None:
        raise RequestError("plot_layout", "plot_layout draws a layout: give one")
    check_output_folder(request.outdir if request.outdir is not None else default_outdir(source.name))
    return source


def class_table(model: str) -> list[dict[str, Any]]:
    """The class names a label-map or layout model knows (``id``, ``name``, and ``colour`` for label maps)."""
    from ldmcli.loading import resolve

    source = resolve(model)
    kind = condition_kind(source.config) if source.config is not None and source.config.ldm is not None else None
    if kind == "segmentation":
        return [{"id": c.id, "name": c.name, "colour": c.hex} for c in seg.list_classes()]
    if kind == "layout":
        return [{"id": i, "name": name} for i, name in enumerate(lay.list_classes())]
    raise UsageError(f"{source.name} has no class names to list (semantic_synthesis256/512 and "
                     f"layout2img-openimages256 do)")


EXAMPLES = {"segmentation": ("semantic", ("landscape.png", "landscape_painted.png", "README.txt")),
            "layout": ("layout", ("example.json", "README.txt"))}
"""Per kind: the asset folder and the files copied (``README.txt`` is written as ``README-<folder>.txt``)."""


def write_examples(model: str, folder: str | Path, *, overwrite: bool = False) -> list[Path]:
    """Copy the shipped example inputs of a label-map or layout model into ``folder``; existing files are kept
    unless ``overwrite``. Returns the paths written."""
    from importlib import resources

    from ldmcli.fileio import atomic_write_bytes
    from ldmcli.loading import resolve

    source = resolve(model)
    kind = condition_kind(source.config) if source.config is not None and source.config.ldm is not None else None
    if kind is None:
        raise UsageError(f"{source.name} has no example inputs (semantic_synthesis256/512 and "
                         f"layout2img-openimages256 do)")
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"{folder} exists and is not a folder")
    asset_dir, names = EXAMPLES[kind]
    written = []
    for name in names:
        path = folder / (f"README-{asset_dir}.txt" if name == "README.txt" else name)
        if path.exists() and not overwrite:
            continue
        atomic_write_bytes(path, resources.files("ldmcli").joinpath("assets", asset_dir, name).read_bytes())
        written.append(path)
    return written


def run(request: SampleRequest, on_event: EventHandler = ignore) -> gen.GenerationResult:
    """Check (then, before loading: the memory the batch needs), load, then sample, decode and write every image."""
    from ldmcli.devices import pick_device, resolve_precision
    from ldmcli.fastpath import DEFAULT_TILE

    source = check(request)
    dev = pick_device(request.device)
    dtype = resolve_precision(request.precision, dev)
    outdir = request.outdir if request.outdir is not None else default_outdir(source.name)
    classes = list(request.classes)
    settings = request.settings
    if source.config is not None and source.config.ldm is not None:
        size = source.config.ldm.image_size * source.config.downsampling_factor
        images = request.n_samples * max(len(classes), 1)
        gen.check_memory(source.config, size, size, min(request.batch_size, images),
                         guidance=settings.scale != 1.0, dtype=dtype, device=dev, tile_decode=request.tile_decode)
    with gen.distributed(dev) as env:
        loaded = gen.load_for_sampling(source, gen.rank_device(dev, env), dtype, on_event, compile=request.compile)
        cfg, net = loaded.config, loaded.model
        null = check_sample_model(cfg, source.name, classes, settings.scale, request.null_class,
                                  segmentation=request.segmentation, layout=request.layout)
        gen.check_settings(settings, net.num_timesteps)
        condition = read_condition(request)
        height, width = image_size(cfg, source.name, request, condition.shape if request.segmentation else None)
        shape = gen.check_image_size(cfg, height, width, source.name)
        extra: dict[str, Any] = {}
        if request.segmentation is not None:
            ids = condition if condition.shape == (height, width) else seg.resize_labels(condition, height, width)
            items: list[Any] = [None] * request.n_samples
            conditioner: gen.Conditioner = gen.FixedConditioner(net, seg.one_hot(ids))
            extra = {"segmentation": str(request.segmentation),
                     "segmentation_sha256": sha256_file(request.segmentation)}
        elif request.layout is not None:
            items = [None] * request.n_samples
            conditioner = gen.FixedConditioner(net, lay.layout_tokens(condition)[None])
            extra = {"layout": str(request.layout), "layout_sha256": sha256_file(request.layout),
                     "objects": len(condition)}
            if request.plot_layout and env.rank == 0:
                from ldmcli.output import NumberedWriter, encode_png

                plot = np.asarray(lay.plot_layout(condition, size=(width, height)))
                path = NumberedWriter(outdir, "layout-{:04d}.png").write(encode_png(plot, extra))
                on_event(Message(f"wrote the layout plot {path}", always=True))
        elif classes:
            items = [c for c in classes for _ in range(request.n_samples)]
            conditioner = gen.ClassConditioner(net, settings.scale, null)
        elif null is not None:  # a class-conditional model with a null class, sampled unconditionally
            items = [null] * request.n_samples
            conditioner = gen.ClassConditioner(net, 1.0, null)
        else:
            items = [None] * request.n_samples
            conditioner = gen.Conditioner()
        run_seed = gen.shared_seed(request.seed, env)
        jobs = gen.rank_jobs(gen.plan_jobs(items, request.batch_size, 1, run_seed), env.rank, env.world_size)
        base = {"command": "sample", **gen.base_metadata(loaded, settings, dtype), "height": height, "width": width,
                "base_seed": run_seed, **extra}

        def metadata(job: gen.Job, k: int) -> dict[str, Any]:
            labels = {"class": job.items[k], "null_class": null} if null is not None or classes else {}
            return {**base, **labels, "seed": job.seeds[k], "index": job.item_indices[k]}

        per_row = request.n_rows or (request.n_samples if classes else min(request.batch_size, request.n_samples))
        grid_meta = {**base, "classes": classes, "seeds": [s for j in jobs for s in j.seeds]}
        return gen.run_images(loaded, jobs, conditioner=conditioner, shape=shape, settings=settings, outdir=outdir,
                              metadata=metadata, grid_metadata=grid_meta,
                              grid_per_row=None if request.skip_grid else per_row,
                              decode_tile=DEFAULT_TILE if request.tile_decode else None, on_event=on_event,
                              seed=run_seed)
