"""The one place ``ldm eval model`` draws images: :func:`sample_images`, on the generation library.

Resumable: the images already in ``outdir/samples`` count (image ``i`` always has seed ``seed + i`` and, for a
class-conditional model, class ``i mod classes``), so a run stopped at 600 of 1,000 draws the other 400 next time.
Samples of other settings in the same folder are refused rather than mixed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

from ldmcli.errors import UsageError
from ldmcli.output import SAMPLE_PATTERN, read_metadata

#: settings an existing sample must share with the run that continues it
_SAME = ("model", "sampler", "steps", "scale", "eta", "base_seed")


def existing_samples(outdir: Path) -> list[Path]:
    """The numbered samples already in ``outdir/samples`` (``00000.png`` ...), in order."""
    folder = Path(outdir) / "samples"
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob("*.png") if p.stem.isdigit() and len(p.name) == len(SAMPLE_PATTERN.format(0)))


def sample_settings(sampler: str, steps: int, scale: float, eta: float | None = None) -> Any:
    """The run's :class:`SamplerSettings` (DDIM's eta 1.0 by default, as ``ldm sample`` and upstream; 0 otherwise)."""
    from ldmcli.sampling import SamplerSettings

    settings = SamplerSettings(sampler, steps, (1.0 if sampler == "ddim" else 0.0) if eta is None else eta, scale)
    settings.validate()
    return settings


def class_plan(cfg: Any, scale: float) -> tuple[int | None, int | None]:
    """(number of classes to cycle through or None for an unconditional model, null class for guidance)."""
    from ldmcli.pipelines.generation import class_range

    if cfg.ldm is None:
        raise UsageError("a first stage (autoencoder) draws no samples: use 'ldm eval ae'")
    kind = cfg.ldm.cond_stage.type
    if kind == "unconditional":
        if scale != 1.0:
            raise UsageError("an unconditional model takes no guidance scale (use 1)")
        return None, None
    if kind != "class":
        raise UsageError(f"ldm eval model samples unconditional and class-conditional models; this one is "
                         f"conditioned on {kind} input")
    n_real, null = class_range(cfg)
    if scale != 1.0 and null is None:
        raise UsageError("this model has no null class to guide against: use scale 1")
    return n_real, null


def sample_images(loaded: Any, n: int, outdir: str | Path, *, scale: float = 1.0, steps: int = 50,
                  sampler: str = "ddim", eta: float | None = None, seed: int = 0, batch_size: int = 16,
                  on_event: Callable[[int, int], None] | None = None) -> int:
    """Make ``outdir/samples`` hold ``n`` images of ``loaded`` (an :class:`ldmcli.loading.Loaded`), drawing only the
    missing ones; returns how many were drawn now. ``on_event(done, total)`` after each image."""
    from ldmcli.pipelines import generation as gen
    from ldmcli.pipelines.events import FileWritten

    if n < 1 or batch_size < 1:
        raise UsageError(f"need n >= 1 and batch size >= 1, got {n} and {batch_size}")
    outdir = Path(outdir)
    model, cfg = loaded.model, loaded.config
    settings = sample_settings(sampler, steps, scale, eta)
    settings.validate(model.num_timesteps)
    n_classes, null = class_plan(cfg, scale)
    dtype = next(model.model.parameters()).dtype
    base = {"command": "eval", **gen.base_metadata(loaded, settings, dtype), "base_seed": seed}
    have = existing_samples(outdir)
    if have:
        first = read_metadata(have[0])
        differs = [k for k in _SAME if k in first and first[k] != base.get(k)]
        if differs:
            raise UsageError(f"{outdir / 'samples'} holds samples of other settings ({', '.join(differs)}): "
                             "choose another output folder")
    if len(have) >= n:
        return 0
    items: list[Any] = [i % n_classes if n_classes else None for i in range(len(have), n)]
    jobs = gen.plan_jobs(items, batch_size, 1, seed + len(have))
    conditioner = gen.ClassConditioner(model, scale, null) if n_classes else gen.Conditioner()
    shape = (cfg.ldm.channels, cfg.ldm.image_size, cfg.ldm.image_size)
    start = len(have)

    def metadata(job: Any, k: int) -> dict[str, Any]:
        extra = {"class": job.items[k], "null_class": null} if n_classes else {}
        return {**base, **extra, "seed": job.seeds[k], "index": start + job.item_indices[k]}

    def progress(event: Any) -> None:
        if on_event is not None and isinstance(event, FileWritten):
            on_event(start + event.images_done, n)

    result = gen.generate(model, jobs, conditioner=conditioner, shape=shape, settings=settings,
                          writer=gen.ImageWriter(outdir), metadata=metadata, grid_per_row=None,
                          device=gen.model_device(model), on_event=progress, seed=seed)
    return result.images


def load_for_eval(target: str, device: torch.device | str = "cpu", precision: str = "fp32",
                  progress: Any = None, message: Callable[[str], None] | None = None) -> Any:
    """Load a diffusion model (zoo name, run folder or checkpoint) for sampling; returns the
    :class:`ldmcli.loading.Loaded` (its ``name`` for the records)."""
    from ldmcli.devices import resolve_precision
    from ldmcli.fastpath import prepare_for_inference
    from ldmcli.loading import load, resolve

    source = resolve(target)
    if source.config is not None:
        class_plan(source.config, 1.0)  # a first stage or a text model fails here, before loading
    device = torch.device(device)
    dtype = resolve_precision(precision, device)
    loaded = load(source, callback=message, progress=progress)
    prepare_for_inference(loaded.model, dtype=dtype, device=device, callback=message)
    class_plan(loaded.config, 1.0)
    return loaded
