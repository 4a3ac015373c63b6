"""``ldm inpaint``: fill the white region of a mask with the inpainting_big model (upstream's scripts/inpaint.py); the
work is :func:`ldmcli.pipelines.inpaint.run`.

Forms: ``ldm inpaint IMAGE MASK -o OUT.png`` (one pair), ``ldm inpaint --indir DIR --outdir DIR`` (upstream's
batch: ``NAME.png`` with ``NAME_mask.png``; resumable), ``ldm inpaint --examples DIR`` (write example pairs).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from ldmcli.commands._common import stderr_console
from ldmcli.commands import _common as opts
from ldmcli.commands._render import Renderer
from ldmcli.commands._run import finish_batch, options
from ldmcli.errors import UsageError

DEFAULT_MODEL = "inpainting_big"
FLAGS = {"steps": "--steps", "eta": "--eta", "sampler": "--sampler", "seed": "--seed", "output": "-o",
         "outdir": "--outdir", "mask": "MASK", "overwrite": "--overwrite"}


def inpaint_command(
    image: Optional[Path] = typer.Argument(None, help="The image to inpaint (single-pair form).", show_default=False),
    mask: Optional[Path] = typer.Argument(None, help="Its mask, same size: white = region to fill.",
                                         show_default=False),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Where the result goes (a .png file).",
                                          show_default=False),
    indir: Optional[Path] = typer.Option(None, "--indir", help="Batch form: a folder of NAME.png with NAME_mask.png.",
                                         show_default=False),
    outdir: Optional[Path] = typer.Option(None, "--outdir", help="Batch form: results as OUTDIR/NAME.png; existing "
                                          "ones are skipped (resumable).", show_default=False),
    examples: Optional[Path] = typer.Option(None, "--examples", help="Write example image/mask pairs into this folder "
                                            "and exit (then: --indir that folder).", show_default=False),
    model: Optional[str] = typer.Option(None, "--model", "-m", help=f"Zoo model (default: {DEFAULT_MODEL}).",
                                        show_default=False),
    config: opts.BatchConfigOption = None,
    ckpt: opts.BatchCkptOption = None,
    steps: int = typer.Option(50, "--steps", help="Sampler steps (upstream: 50 DDIM steps)."),
    sampler: str = typer.Option("auto", "--sampler", help="auto (the fewest model calls at 50 DDIM steps' accuracy; "
                                "--steps is then ignored), ddim (upstream's, with --steps 50), plms, dpmpp, dpmpp3m, "
                                "unipc or unipc-bh1."),
    eta: float = typer.Option(0.0, "--eta", help="DDIM eta (0: deterministic, upstream's)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed of the initial noise, the same for every image "
                                       "(default: random, recorded in each PNG).", show_default=False),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:N or mps (default: the best "
                                         "available).", show_default=False),
    precision: str = typer.Option("auto", "--precision", help="auto, fp32, bf16 or fp16 (networks only; the sampler "
                                  "runs in float32)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace outputs that exist."),
    as_json: bool = typer.Option(False, "--json", help="Print what was written, skipped and failed as JSON on stdout."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress on stderr (errors are still shown)."),
) -> None:
    """Fill the masked regions of images with a latent diffusion inpainting model (white = fill)."""
    if examples is not None:
        if image is not None or indir is not None or outdir is not None or output is not None:
            raise UsageError("--examples writes the example pairs and exits: give it alone")
        from ldmcli.examples import write_examples

        written = write_examples(examples, overwrite=overwrite)
        if as_json:
            typer.echo(json.dumps({"folder": str(examples), "written": [str(p) for p in written]}, indent=2))
        elif not quiet:
            stderr_console().print(f"ldm: wrote {len(written)} files to {examples} (next: ldm inpaint --indir "
                                   f"{examples} --outdir OUTDIR)", markup=False, highlight=False, soft_wrap=True)
        return

    from ldmcli.pipelines import inpaint
    from ldmcli.sampling import SamplerSettings

    if image is not None and output is None and indir is None:
        raise UsageError("give the output file with -o OUT.png")
    if indir is not None and outdir is None and image is None:
        raise UsageError("--indir needs --outdir (the results keep the input file names)")
    if config is not None and model is not None:
        raise UsageError("give either --model or --config, not both")
    if config is not None and ckpt is None:
        raise UsageError("--config needs --ckpt (the checkpoint of that config)")
    with options(FLAGS):
        request = inpaint.InpaintRequest(
            image=image, mask=mask, output=output, indir=indir, outdir=outdir, model=model or DEFAULT_MODEL,
            config=config, ckpt=ckpt, settings=SamplerSettings(sampler, steps, eta, 1.0), seed=seed, device=device,
            precision=precision, overwrite=overwrite)
        with Renderer(quiet=quiet) as renderer:
            report = inpaint.run(request, renderer)
    finish_batch(report, noun="pair", as_json=as_json, quiet=quiet)

def register(app: typer.Typer) -> None:
    app.command("inpaint")(inpaint_command)
