"""``ldm knn2img``: images from the Retrieval-Augmented Diffusion Model (upstream ``scripts/knn2img.py``),
conditioned on the CLIP embedding of a prompt (or, beyond upstream, of an image) and optionally on its nearest
neighbours in a retrieval database; the work is :func:`ldmcli.pipelines.knn2img.run`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ldmcli.commands import _common as opts
from ldmcli.commands._render import Renderer
from ldmcli.commands._run import options, rank_prefix, run_generation
from ldmcli.errors import UsageError

DEFAULT_MODEL = "rdm768x768"
FLAGS = {"n_samples": "--n_samples", "n_iter": "--n_iter", "n_rows": "--n_rows", "seed": "--seed",
         "size": "--H and --W", "from_file": "--from-file", "steps": "--ddim_steps", "eta": "--ddim_eta",
         "scale": "--scale", "sampler": "--sampler", "knn": "--knn"}


def knn2img_command(
    prompt_arg: Optional[str] = typer.Argument(None, metavar="[PROMPT]", help="The prompt to render.",
                                               show_default=False),
    prompt_opt: opts.PromptOption = None,
    from_file: opts.FromFileOption = None,
    image: Optional[Path] = typer.Option(None, "--image", help="Use this image's CLIP embedding as the query and "
                                         "conditioning instead of a prompt (image variations).", show_default=False),
    use_neighbors: bool = typer.Option(False, "--use-neighbors", "--use_neighbors",
                                       help="Add the query's nearest neighbours in --database to the conditioning."),
    knn: int = typer.Option(10, "--knn", help="Neighbours to add (1 to 20), with --use-neighbors."),
    database: str = typer.Option("artbench-surrealism", "--database", help="Retrieval database (openimages, "
                                 "artbench-<style>, a database name or a folder of .npz), with --use-neighbors."),
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m", help="Zoo name of a retrieval-augmented model."),
    config: opts.ConfigOption = None,
    ckpt: opts.CkptOption = None,
    outdir: opts.OutdirOption = Path("outputs/knn2img-samples"),
    ddim_steps: opts.StepsOption = 50,
    plms: opts.PlmsOption = False,
    sampler: Optional[str] = typer.Option(None, "--sampler", help=opts.SAMPLER_HELP, show_default=False),
    ddim_eta: opts.EtaOption = 0.0,
    n_iter: opts.NIterOption = 1,
    height: int = typer.Option(768, "--H", help="Image height in pixels (the latent is [16, H/16, W/16])."),
    width: int = typer.Option(768, "--W", help="Image width in pixels."),
    n_samples: opts.NSamplesOption = 3,
    n_rows: int = typer.Option(0, "--n_rows", "--n-rows", help="Images per grid row (default: n_samples).",
                                show_default=False),
    scale: float = typer.Option(5.0, "--scale", help="Classifier-free guidance scale against a zero context "
                                "(upstream's unconditional input); 1 disables guidance."),
    seed: opts.PromptSeedOption = None,
    skip_grid: opts.SkipGridOption = False,
    clip_path: Optional[Path] = typer.Option(None, "--clip", help="A transformers CLIP folder (default: the store's "
                                             "clip-vit-large-patch14).", show_default=False),
    device: opts.DeviceOption = None,
    precision: str = typer.Option("auto", "--precision", help="fp32, bf16, fp16 or auto for the diffusion model "
                                  "(CLIP always runs in fp32)."),
    as_json: opts.JsonOption = False,
    quiet: opts.QuietOption = False,
) -> None:
    """Generate images with the retrieval-augmented diffusion model (rdm768x768), as upstream's scripts/knn2img.py.

    The conditioning is the prompt's CLIP ViT-L/14 text embedding (or --image's image embedding), with
    --use-neighbors followed by its --knn nearest neighbours in --database. Writes OUTDIR/samples/00000.png, ...
    and OUTDIR/grid-0000.png; numbering continues after existing files and every PNG records its settings.
    """
    from ldmcli.pipelines import knn2img
    from ldmcli.pipelines.generation import read_prompt_file
    from ldmcli.sampling import SamplerSettings

    given = [n for n, v in (("PROMPT", prompt_arg), ("--prompt", prompt_opt), ("--from-file", from_file),
                            ("--image", image)) if v is not None]
    if len(given) > 1:
        raise UsageError(f"give one of PROMPT, --prompt, --from-file and --image, not {' and '.join(given)}")
    if not given:
        raise UsageError("give a PROMPT (or --prompt TEXT, --from-file FILE, or --image PATH)")
    opts.check_config_ckpt(config, ckpt)
    with options(FLAGS):
        if from_file is not None:
            prompts = read_prompt_file(from_file)
        else:
            prompts = [] if image is not None else [prompt_arg if prompt_arg is not None else prompt_opt]
        request = knn2img.Knn2ImgRequest(
            prompts=prompts, image=image, from_file=from_file is not None, use_neighbors=use_neighbors, knn=knn,
            database=database, model=model, config=config, ckpt=ckpt, outdir=outdir,
            settings=SamplerSettings(opts.pick_sampler(sampler, plms), ddim_steps, ddim_eta, scale),
            n_samples=n_samples, n_iter=n_iter, height=height, width=width, n_rows=n_rows, seed=seed,
            skip_grid=skip_grid, clip=clip_path, device=device, precision=precision, quiet=quiet)
        with Renderer(as_json=as_json, quiet=quiet, prefix=rank_prefix()) as renderer:
            run_generation(renderer, outdir, lambda: knn2img.run(request, renderer))


def register(app: typer.Typer) -> None:
    app.command("knn2img")(knn2img_command)
