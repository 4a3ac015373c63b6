"""``ldm sample``: images from unconditional and class-conditional LDMs (upstream ``scripts/sample_diffusion.py``
and the cin256 notebook), from the zoo or from a checkpoint trained with ``ldm train-ldm``."""

from __future__ import annotations

from pathlib import Path
from typing import Any, List, Optional

import typer

from ldmcli.commands import _common as opts
from ldmcli.commands.txt2img import (RunDisplay, check_counts, load_for_sampling, net_device, pick_sampler,
                                     run_generation)
from ldmcli.errors import UsageError


def sample_command(
    model: Optional[str] = typer.Argument(None, metavar="MODEL", help="Zoo name (celeba256, ffhq256, "
                                          "lsun_churches256, lsun_beds256, cin256, cin256-v2), or a run folder / "
                                          "checkpoint as with -r.", show_default=False),
    resume: Optional[Path] = typer.Option(None, "--resume", "-r", help="A checkpoint, or a log dir holding "
                                          "config.yaml and model.ckpt (as upstream; also ldm train-ldm runs).",
                                          show_default=False),
    logdir: Optional[Path] = typer.Option(None, "--logdir", "-l", "--outdir", help="Where samples/ and grids go "
                                          "(default: outputs/<model>-samples).", show_default=False),
    n_samples: int = typer.Option(4, "--n_samples", "-n", "--n-samples", help="Images to draw (per class with "
                                  "--class)."),
    batch_size: int = typer.Option(10, "--batch_size", "--batch-size", help="Images per sampler batch."),
    custom_steps: int = typer.Option(50, "--custom_steps", "-c", "--steps", help="Sampler steps (DDIM, PLMS, "
                                     "DPM-Solver++)."),
    eta: Optional[float] = typer.Option(None, "--eta", "-e", help="DDIM eta (default: 1.0 for DDIM as upstream, 0 "
                                        "for the other samplers).", show_default=False),
    vanilla_sample: bool = typer.Option(False, "--vanilla_sample", "-v", "--vanilla-sample", help="Ancestral DDPM "
                                        "sampling over the full chain (shorthand for --sampler ddpm)."),
    sampler: Optional[str] = typer.Option(None, "--sampler", help="ddim, plms, dpmpp or ddpm (default: ddim).",
                                          show_default=False),
    classes: Optional[List[int]] = typer.Option(None, "--class", help="Class id for class-conditional models "
                                                "(repeatable; 0-999 for cin256/cin256-v2).", show_default=False),
    scale: float = typer.Option(1.0, "--scale", help="Classifier-free guidance scale for class-conditional models "
                                "with a null class (cin256-v2: class 1000; the notebook uses 3.0)."),
    null_class: Optional[int] = typer.Option(None, "--null-class", help="The unconditional class id (default: the "
                                             "last class, except for 1000-class models such as cin256).",
                                             show_default=False),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed: image i uses seed + i (default: random).",
                                       show_default=False),
    n_rows: int = typer.Option(0, "--n_rows", "--n-rows", help="Images per grid row (default: n_samples per class, "
                               "else the batch size).", show_default=False),
    skip_grid: opts.SkipGridOption = False,
    device: opts.DeviceOption = None,
    precision: str = typer.Option("auto", "--precision", help="fp32, bf16, fp16 or auto."),
    compile_unet: opts.CompileOption = False,
    tile_decode: opts.TileDecodeOption = False,
    as_json: opts.JsonOption = False,
    quiet: opts.QuietOption = False,
) -> None:
    """Sample an unconditional or class-conditional LDM, as upstream's scripts/sample_diffusion.py.

    Writes OUTDIR/samples/00000.png, ... and OUTDIR/grid-0000.png, never overwriting, settings in every PNG.
    """
    from ldmcli import generate as gen
    from ldmcli.devices import pick_device, resolve_precision
    from ldmcli.fastpath import DEFAULT_TILE

    if model is not None and resume is not None:
        raise UsageError("give MODEL or -r/--resume, not both")
    if model is None and resume is None:
        raise UsageError("give a MODEL (zoo name) or -r/--resume CHECKPOINT_OR_LOGDIR")
    check_counts((("--n_samples", n_samples), ("--batch_size", batch_size)), n_rows, seed)
    chosen = pick_sampler(sampler, False, vanilla_sample)
    settings = gen.SamplerSettings(chosen, custom_steps, (1.0 if chosen == "ddim" else 0.0) if eta is None else eta,
                                   scale)
    settings.validate()
    source = gen.resolve_run(resume) if resume is not None else gen.resolve_model(model)
    classes = list(classes or [])
    if source.config is not None:
        null = _check_sample_model(source.config, source.name, classes, scale, null_class)
        settings.validate(source.config.ldm.timesteps)
    dev = pick_device(device)
    dtype = resolve_precision(precision, dev)
    outdir = logdir if logdir is not None else Path("outputs") / f"{Path(source.name).name or 'model'}-samples"

    with gen.distributed(dev) as env:
        prefix = f"[rank {env.rank}] " if env.world_size > 1 else ""
        with RunDisplay(as_json=as_json, quiet=quiet, rank_prefix=prefix) as display:
            net = load_for_sampling(source, gen.rank_device(dev, env), dtype, display, compile=compile_unet)
            cfg = net.ldm_config
            null = _check_sample_model(cfg, source.name, classes, scale, null_class)
            settings.validate(net.num_timesteps)
            shape = (cfg.ldm.channels, cfg.ldm.image_size, cfg.ldm.image_size)
            if classes:
                items: list[Any] = [c for c in classes for _ in range(n_samples)]
                conditioner: gen.Conditioner = gen.ClassConditioner(net, scale, null)
            else:
                items = [None] * n_samples
                conditioner = gen.Conditioner()
            run_seed = gen.shared_seed(seed, env)
            jobs = gen.rank_jobs(gen.plan_jobs(items, batch_size, 1, run_seed), env.rank, env.world_size)
            base = {"command": "sample", **gen.base_metadata(net, source.name, settings, dtype),
                    "height": shape[1] * cfg.downsampling_factor, "width": shape[2] * cfg.downsampling_factor,
                    "base_seed": run_seed}

            def metadata(job: gen.Job, k: int) -> dict[str, Any]:
                extra = {"class": job.items[k], "null_class": null} if classes else {}
                return {**base, **extra, "seed": job.seeds[k], "index": job.item_indices[k]}

            per_row = n_rows or (n_samples if classes else min(batch_size, n_samples))
            grid_meta = {**base, "classes": classes, "seeds": [s for j in jobs for s in j.seeds]}
            run_generation(display, outdir, run_seed, lambda: gen.generate(
                net, jobs, conditioner=conditioner, shape=shape, settings=settings, writer=gen.ImageWriter(outdir),
                metadata=metadata, grid_metadata=grid_meta, grid_per_row=None if skip_grid else per_row,
                device=net_device(net), decode_tile=DEFAULT_TILE if tile_decode else None, callback=display.event))


def _check_sample_model(cfg: Any, name: str, classes: list[int], scale: float, null_class: Optional[int]) -> Any:
    """Validate --class/--scale against the model; return the null class id used for guidance (or None)."""
    from ldmcli.generate import class_range

    if cfg.ldm is None:
        raise UsageError(f"{name} is a first stage (autoencoder), not a diffusion model")
    kind = cfg.ldm.cond_stage.type
    if kind == "unconditional":
        if classes:
            raise UsageError(f"{name} is unconditional: --class does not apply")
        if scale != 1.0:
            raise UsageError(f"{name} is unconditional: --scale (guidance) does not apply")
        return None
    if kind != "class":
        hint = "use 'ldm txt2img'" if kind == "bert" else "see 'ldm --help'"
        raise UsageError(f"{name} is conditioned on {kind} input, not classes: {hint}")
    n_real, null = class_range(cfg)
    if null_class is not None:
        n_total = int(cfg.ldm.cond_stage.params.n_classes)
        if not 0 <= null_class < n_total:
            raise UsageError(f"--null-class must be between 0 and {n_total - 1}, got {null_class}")
        null, n_real = null_class, n_total
    if not classes:
        raise UsageError(f"{name} is class-conditional: pass --class ID (0-{n_real - 1}), repeatable")
    bad = [c for c in classes if not 0 <= c < n_real or c == null]
    if bad:
        raise UsageError(f"class id {bad[0]} is out of range for {name} (0-{n_real - 1})")
    if scale != 1.0 and null is None:
        raise UsageError(f"{name} has no null class to guide against: use --scale 1 (or cin256-v2, or "
                         f"--null-class ID)")
    return null


def register(app: typer.Typer) -> None:
    app.command("sample")(sample_command)
