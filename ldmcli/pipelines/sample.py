"""Unconditional and class-conditional sampling (upstream ``scripts/sample_diffusion.py`` and the cin256 notebook):
:func:`run` does what ``ldm sample`` does, from Python."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ldmcli.errors import RequestError, UsageError
from ldmcli.output import check_output_folder
from ldmcli.pipelines import generation as gen
from ldmcli.pipelines.events import EventHandler, ignore
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


def check_sample_model(cfg: Any, name: str, classes: Sequence[int], scale: float, null_class: int | None) -> Any:
    """Validate classes and guidance against the model; return the null class id used for guidance (or None)."""
    gen.require_diffusion(cfg, name)
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


def check(request: SampleRequest) -> Any:
    """Every check that needs no weights (the output folder can be written, too); returns the resolved
    :class:`ldmcli.loading.ModelSource`."""
    from ldmcli.loading import resolve

    gen.check_counts((("n_samples", request.n_samples), ("batch_size", request.batch_size)), request.n_rows,
                     request.seed)
    gen.check_settings(request.settings)
    source = resolve(request.model)
    if source.config is not None:
        check_sample_model(source.config, source.name, request.classes, request.settings.scale, request.null_class)
        gen.check_settings(request.settings, source.config.ldm.timesteps)
    check_output_folder(request.outdir if request.outdir is not None else default_outdir(source.name))
    return source


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
        null = check_sample_model(cfg, source.name, classes, settings.scale, request.null_class)
        gen.check_settings(settings, net.num_timesteps)
        shape = (cfg.ldm.channels, cfg.ldm.image_size, cfg.ldm.image_size)
        if classes:
            items: list[Any] = [c for c in classes for _ in range(request.n_samples)]
            conditioner: gen.Conditioner = gen.ClassConditioner(net, settings.scale, null)
        elif null is not None:  # a class-conditional model with a null class, sampled unconditionally
            items = [null] * request.n_samples
            conditioner = gen.ClassConditioner(net, 1.0, null)
        else:
            items = [None] * request.n_samples
            conditioner = gen.Conditioner()
        run_seed = gen.shared_seed(request.seed, env)
        jobs = gen.rank_jobs(gen.plan_jobs(items, request.batch_size, 1, run_seed), env.rank, env.world_size)
        base = {"command": "sample", **gen.base_metadata(loaded, settings, dtype),
                "height": shape[1] * cfg.downsampling_factor, "width": shape[2] * cfg.downsampling_factor,
                "base_seed": run_seed}

        def metadata(job: gen.Job, k: int) -> dict[str, Any]:
            extra = {"class": job.items[k], "null_class": null} if null is not None or classes else {}
            return {**base, **extra, "seed": job.seeds[k], "index": job.item_indices[k]}

        per_row = request.n_rows or (request.n_samples if classes else min(request.batch_size, request.n_samples))
        grid_meta = {**base, "classes": classes, "seeds": [s for j in jobs for s in j.seeds]}
        return gen.run_images(loaded, jobs, conditioner=conditioner, shape=shape, settings=settings, outdir=outdir,
                              metadata=metadata, grid_metadata=grid_meta,
                              grid_per_row=None if request.skip_grid else per_row,
                              decode_tile=DEFAULT_TILE if request.tile_decode else None, on_event=on_event,
                              seed=run_seed)
