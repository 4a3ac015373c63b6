"""``ldm upscale``: 4x super-resolution with LDSR (``bsr_sr``), upstream's notebook pipeline, patch-wise for large
inputs; the work is :func:`ldmcli.pipelines.upscale.run`.

Forms: ``ldm upscale IMAGE -o OUT.png``, ``ldm upscale IMAGE... --outdir DIR`` and ``ldm upscale --indir DIR --outdir
DIR`` (resumable: outputs that exist are skipped unless ``--overwrite``).
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from ldmcli.commands import _common as opts
from ldmcli.commands._render import Renderer
from ldmcli.commands._run import finish_batch, options
from ldmcli.errors import UsageError
from ldmcli.pipelines import events as ev

DEFAULT_MODEL = "bsr_sr"
FLAGS = {"steps": "--steps", "eta": "--eta", "sampler": "--sampler", "seed": "--seed", "output": "-o",
         "outdir": "--outdir", "indir": "--indir", "overwrite": "--overwrite", "scale": "--scale",
         "pre_downsample": "--pre-downsample", "patch_batch": "--patch-batch"}


class UpscaleRenderer(Renderer):
    """The batch renderer plus patch progress: a bar over the current stage's patches on a terminal, one line per
    sampler step of a patch-wise image in a log (a step can take minutes there)."""

    patchwise = False

    def _on_ItemStarted(self, e: ev.ItemStarted) -> None:
        self.patchwise = False
        super()._on_ItemStarted(e)

    def _on_ItemPatches(self, e: ev.ItemPatches) -> None:
        self.patchwise = True
        if self.interactive:
            self._bar("patches", "patches", e.patches)
            self._update("patches", description=f"{e.stage} patches", completed=e.done, total=e.patches)
        elif e.stage != "unet" and e.done == e.patches:
            self.line(f"ldm: {self._where(e.index, e.total)}{e.stage}: {e.patches} patches done")

    def _on_ItemStep(self, e: ev.ItemStep) -> None:
        super()._on_ItemStep(e)
        if self.patchwise and not self.interactive:
            self.line(f"ldm: {self._where(e.index, e.total)}step {e.step}/{e.steps}")


def upscale_command(
    images: Optional[List[Path]] = typer.Argument(None, metavar="IMAGE", help="Images to upscale (any size; "
                                                  "RGBA, greyscale and 16-bit are converted).", show_default=False),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Where the result of one IMAGE goes (.png).",
                                          show_default=False),
    indir: Optional[Path] = typer.Option(None, "--indir", help="Upscale every image in this folder.",
                                         show_default=False),
    outdir: Optional[Path] = typer.Option(None, "--outdir", help="Results as OUTDIR/NAME.png; existing ones are "
                                          "skipped (resumable). Default: outputs/upscale.", show_default=False),
    model: Optional[str] = typer.Option(None, "--model", "-m", help=f"Zoo model (default: {DEFAULT_MODEL}).",
                                        show_default=False),
    config: opts.BatchConfigOption = None,
    ckpt: opts.BatchCkptOption = None,
    steps: int = typer.Option(100, "--steps", help="Sampler steps (upstream's notebook: 100 DDIM steps)."),
    sampler: str = typer.Option("ddim", "--sampler", help="ddim (upstream's), plms, dpmpp or auto."),
    eta: Optional[float] = typer.Option(None, "--eta", help="DDIM eta (default 1.0 for DDIM as upstream, else 0).",
                                        show_default=False),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed of the noise, the same for every image (default: "
                                       "random, recorded in each PNG).", show_default=False),
    pre_downsample: int = typer.Option(1, "--pre-downsample", help="Shrink the input by 2 or 4 first: the output is "
                                       "then 2x or 1x the input."),
    patch_batch: int = typer.Option(1, "--patch-batch", help="UNet patches per forward pass for large inputs (more: "
                                    "faster on a GPU, more memory)."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:N or mps (default: the best "
                                         "available).", show_default=False),
    precision: str = typer.Option("auto", "--precision", help="auto, fp32, bf16 or fp16 (networks only; the sampler "
                                  "runs in float32)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace outputs that exist."),
    as_json: bool = typer.Option(False, "--json", help="Print what was written, skipped and failed as JSON on stdout."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress on stderr (errors are still shown)."),
) -> None:
    """Upscale images 4x with the LDSR super-resolution model (bsr_sr), patch-wise for large images."""
    from ldmcli.pipelines import upscale
    from ldmcli.sampling import SamplerSettings

    if config is not None and model is not None:
        raise UsageError("give either --model or --config, not both")
    if config is not None and ckpt is None:
        raise UsageError("--config needs --ckpt (the checkpoint of that config)")
    with options(FLAGS):
        settings = SamplerSettings(sampler, steps, (1.0 if sampler == "ddim" else 0.0) if eta is None else eta, 1.0)
        request = upscale.UpscaleRequest(
            images=tuple(images or ()), output=output, indir=indir, outdir=outdir, model=model or DEFAULT_MODEL,
            config=config, ckpt=ckpt, settings=settings, seed=seed, pre_downsample=pre_downsample,
            patch_batch=patch_batch, device=device, precision=precision, overwrite=overwrite)
        with UpscaleRenderer(quiet=quiet) as renderer:
            report = upscale.run(request, renderer)
    finish_batch(report, noun="image", as_json=as_json, quiet=quiet)

def register(app: typer.Typer) -> None:
    app.command("upscale")(upscale_command)
