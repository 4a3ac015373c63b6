"""``ldm sample``: images from unconditional and class-conditional LDMs (upstream ``scripts/sample_diffusion.py``
and the cin256 notebook), from the zoo or from a checkpoint trained with ``ldm train-ldm``; the work is
:func:`ldmcli.pipelines.sample.run`."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from ldmcli.commands import _common as opts
from ldmcli.commands._render import Renderer
from ldmcli.commands._run import options, rank_prefix, run_generation
from ldmcli.errors import UsageError

FLAGS = {"n_samples": "--n_samples", "batch_size": "--batch_size", "n_rows": "--n_rows", "seed": "--seed",
         "steps": "--custom_steps", "eta": "--eta", "scale": "--scale", "sampler": "--sampler", "classes": "--class",
         "null_class": "--null-class"}


def sample_command(
    model: Optional[str] = typer.Argument(None, metavar="MODEL", help="Zoo name (digits: built in, no "
                                          "download; celeba256, ffhq256, lsun_churches256, lsun_beds256, cin256, "
                                          "cin256-v2), or a run folder / checkpoint as with -r.", show_default=False),
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
    sampler: Optional[str] = typer.Option(None, "--sampler", help=opts.SAMPLER_HELP, show_default=False),
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
    from ldmcli.pipelines import sample
    from ldmcli.sampling import SamplerSettings

    if model is not None and resume is not None:
        raise UsageError("give MODEL or -r/--resume, not both")
    if model is None and resume is None:
        raise UsageError("give a MODEL (zoo name) or -r/--resume CHECKPOINT_OR_LOGDIR")
    chosen = opts.pick_sampler(sampler, False, vanilla_sample)
    with options(FLAGS):
        settings = SamplerSettings(chosen, custom_steps, (1.0 if chosen == "ddim" else 0.0) if eta is None else eta,
                                   scale)
        request = sample.SampleRequest(
            model=str(resume) if resume is not None else model, outdir=logdir, settings=settings,
            classes=tuple(classes or ()), null_class=null_class, n_samples=n_samples, batch_size=batch_size,
            n_rows=n_rows, seed=seed, skip_grid=skip_grid, device=device, precision=precision, compile=compile_unet,
            tile_decode=tile_decode)
        source = sample.check(request)
        outdir = logdir if logdir is not None else sample.default_outdir(source.name)
        with Renderer(as_json=as_json, quiet=quiet, prefix=rank_prefix()) as renderer:
            run_generation(renderer, outdir, lambda: sample.run(request, renderer))


def register(app: typer.Typer) -> None:
    app.command("sample")(sample_command)
