"""``ldm txt2img``: images from text with a text-conditional LDM (upstream ``scripts/txt2img.py``); the work is
:func:`ldmcli.pipelines.txt2img.run`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ldmcli.commands import _common as opts
from ldmcli.commands._render import Renderer
from ldmcli.commands._run import options, rank_prefix, run_generation
from ldmcli.errors import UsageError

DEFAULT_MODEL = "txt2img-f8-large"
FLAGS = {"n_samples": "--n_samples", "n_iter": "--n_iter", "n_rows": "--n_rows", "seed": "--seed",
         "size": "--H and --W", "from_file": "--from-file", "steps": "--ddim_steps", "eta": "--ddim_eta",
         "scale": "--scale", "sampler": "--sampler"}


def txt2img_command(
    prompt_arg: Optional[str] = typer.Argument(None, metavar="PROMPT", help="The prompt to render.",
                                               show_default=False),
    prompt_opt: opts.PromptOption = None,
    from_file: opts.FromFileOption = None,
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m", help="Zoo name of a text-to-image LDM."),
    config: opts.ConfigOption = None,
    ckpt: opts.CkptOption = None,
    outdir: opts.OutdirOption = Path("outputs/txt2img-samples"),
    ddim_steps: opts.StepsOption = 50,
    plms: opts.PlmsOption = False,
    sampler: Optional[str] = typer.Option(None, "--sampler", help=opts.SAMPLER_HELP, show_default=False),
    ddim_eta: opts.EtaOption = 0.0,
    n_iter: opts.NIterOption = 1,
    height: int = typer.Option(256, "--H", help="Image height in pixels (larger than 256 runs convolutionally)."),
    width: int = typer.Option(256, "--W", help="Image width in pixels."),
    n_samples: opts.NSamplesOption = 4,
    n_rows: int = typer.Option(0, "--n_rows", "--n-rows", help="Images per grid row (default: n_samples).",
                                show_default=False),
    scale: float = typer.Option(5.0, "--scale", help="Classifier-free guidance scale: eps(x, '') + scale * "
                                "(eps(x, prompt) - eps(x, '')); 1 disables guidance."),
    seed: opts.PromptSeedOption = None,
    skip_grid: opts.SkipGridOption = False,
    device: opts.DeviceOption = None,
    precision: str = typer.Option("auto", "--precision", help="fp32, bf16, fp16 or auto (bf16 where the hardware "
                                  "has it natively)."),
    compile_unet: opts.CompileOption = False,
    tile_decode: opts.TileDecodeOption = False,
    as_json: opts.JsonOption = False,
    quiet: opts.QuietOption = False,
) -> None:
    """Generate images from text (txt2img-f8-large by default), as upstream's scripts/txt2img.py.

    Writes OUTDIR/samples/00000.png, ... and OUTDIR/grid-0000.png; numbering continues after existing files and
    every PNG records its settings. Under torchrun, --from-file prompts are split across the ranks.
    """
    from ldmcli.pipelines import txt2img
    from ldmcli.pipelines.generation import read_prompt_file
    from ldmcli.sampling import SamplerSettings

    sources = (("PROMPT", prompt_arg), ("--prompt", prompt_opt), ("--from-file", from_file))
    given = [name for name, value in sources if value is not None]
    if len(given) > 1:
        raise UsageError(f"give one of PROMPT, --prompt and --from-file, not {' and '.join(given)}")
    if not given:
        raise UsageError("give a PROMPT (or --prompt TEXT, or --from-file FILE)")
    opts.check_config_ckpt(config, ckpt)
    with options(FLAGS):
        prompts = read_prompt_file(from_file) if from_file is not None else [
            prompt_arg if prompt_arg is not None else prompt_opt]
        settings = SamplerSettings(opts.pick_sampler(sampler, plms), ddim_steps, ddim_eta, scale)
        request = txt2img.Txt2ImgRequest(
            prompts=prompts, from_file=from_file is not None, outdir=outdir, model=model, config=config, ckpt=ckpt,
            settings=settings, n_samples=n_samples, n_iter=n_iter, height=height, width=width, n_rows=n_rows,
            seed=seed, skip_grid=skip_grid, device=device, precision=precision, compile=compile_unet,
            tile_decode=tile_decode)
        with Renderer(as_json=as_json, quiet=quiet, prefix=rank_prefix()) as renderer:
            run_generation(renderer, outdir, lambda: txt2img.run(request, renderer))


def register(app: typer.Typer) -> None:
    app.command("txt2img")(txt2img_command)
