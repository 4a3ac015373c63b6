"""Text to image with a text-conditional LDM (upstream ``scripts/txt2img.py``): :func:`run` does what ``ldm txt2img``
does, from Python.

    from ldmcli.pipelines import txt2img
    result = txt2img.run(txt2img.Txt2ImgRequest(prompts=["a red cube"], n_samples=2, seed=1, outdir=Path("out")))
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from ldmcli.errors import RequestError, UsageError
from ldmcli.output import check_output_folder
from ldmcli.pipelines import generation as gen
from ldmcli.pipelines.events import EventHandler, ignore
from ldmcli.sampling import SamplerSettings

DEFAULT_MODEL = "txt2img-f8-large"


@dataclass(frozen=True, kw_only=True)
class Txt2ImgRequest(gen.RunOptions):
    """One run. ``prompts``: one prompt rendered ``n_samples`` times, or (``from_file``) every prompt once per
    iteration, batched by ``n_samples``. ``model`` is anything :func:`ldmcli.loading.resolve` takes; ``config`` +
    ``ckpt`` name the files instead."""

    prompts: Sequence[str]
    outdir: Path = Path("outputs/txt2img-samples")
    from_file: bool = False
    model: str = DEFAULT_MODEL
    config: Path | None = None
    ckpt: Path | None = None
    settings: SamplerSettings = SamplerSettings("ddim", 50, 0.0, 5.0)
    n_samples: int = 4
    n_iter: int = 1
    height: int = 256
    width: int = 256


def check_text_model(cfg: Any, name: str) -> None:
    """A UsageError unless ``cfg`` is a text-to-image LDM (a BERT conditioner with its tokenizer)."""
    gen.require_diffusion(cfg, name)
    cond = cfg.ldm.cond_stage
    if cond.type != "bert" or not getattr(cond.params, "use_tokenizer", True):
        what = {"class": "class-conditional", "unconditional": "unconditional"}.get(cond.type, f"a {cond.type} model")
        raise UsageError(f"{name} is not a text-to-image model ({what}); use 'ldm sample' for unconditional and "
                         f"class-conditional models")


def check(request: Txt2ImgRequest) -> Any:
    """Every check that needs no weights (bad values, unknown model, wrong kind of model, image size, an output
    folder that can be written); returns the resolved :class:`ldmcli.loading.ModelSource`."""
    from ldmcli.loading import resolve

    gen.check_counts((("n_samples", request.n_samples), ("n_iter", request.n_iter)), request.n_rows, request.seed)
    if not request.prompts:
        raise RequestError("prompts", "prompts: none given")
    if not request.from_file and not request.prompts[0].strip():
        raise RequestError("prompts", "the prompt is empty")
    gen.check_settings(request.settings)
    source = resolve(request.model, config=request.config, ckpt=request.ckpt)
    if source.config is not None:
        check_text_model(source.config, source.name)
        gen.check_image_size(source.config, request.height, request.width, source.name)
        gen.check_settings(request.settings, source.config.ldm.timesteps)
    check_output_folder(request.outdir)
    return source


def run(request: Txt2ImgRequest, on_event: EventHandler = ignore) -> gen.GenerationResult:
    """Check (then, before loading: the memory the size needs), load, then sample, decode and write every image
    (``OUTDIR/samples/NNNNN.png`` and a grid); under ``torchrun`` the batches are dealt to the ranks."""
    from ldmcli.devices import pick_device, resolve_precision
    from ldmcli.fastpath import DEFAULT_TILE

    source = check(request)
    dev = pick_device(request.device)
    dtype = resolve_precision(request.precision, dev)
    items = list(request.prompts) if request.from_file else [request.prompts[0]] * request.n_samples
    if source.config is not None:
        gen.check_memory(source.config, request.height, request.width, min(request.n_samples, len(items)),
                         guidance=request.settings.scale != 1.0, dtype=dtype, device=dev,
                         tile_decode=request.tile_decode)
    with gen.distributed(dev) as env:
        loaded = gen.load_for_sampling(source, gen.rank_device(dev, env), dtype, on_event, compile=request.compile)
        cfg, net = loaded.config, loaded.model
        check_text_model(cfg, source.name)
        shape = gen.check_image_size(cfg, request.height, request.width, source.name)
        gen.check_settings(request.settings, net.num_timesteps)
        run_seed = gen.shared_seed(request.seed, env)
        jobs = gen.rank_jobs(gen.plan_jobs(items, request.n_samples, request.n_iter, run_seed), env.rank,
                             env.world_size)
        base = {"command": "txt2img", **gen.base_metadata(loaded, request.settings, dtype),
                "height": request.height, "width": request.width, "base_seed": run_seed}

        def metadata(job: gen.Job, k: int) -> dict[str, Any]:
            return {**base, "prompt": job.items[k], "seed": job.seeds[k],
                    "prompt_index": job.item_indices[k] if request.from_file else 0, "iteration": job.iteration}

        grid_meta = {**base, "prompts": sorted(set(request.prompts)), "seeds": [s for j in jobs for s in j.seeds]}
        return gen.run_images(loaded, jobs, conditioner=gen.TextConditioner(net, request.settings.scale),
                              shape=shape, settings=request.settings, outdir=request.outdir, metadata=metadata,
                              grid_metadata=grid_meta,
                              grid_per_row=None if request.skip_grid else (request.n_rows or request.n_samples),
                              decode_tile=DEFAULT_TILE if request.tile_decode else None, on_event=on_event,
                              seed=run_seed)
