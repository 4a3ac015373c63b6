"""``ldm sample``: images from unconditional and class-conditional LDMs (upstream ``scripts/sample_diffusion.py``
and the cin256 notebook), label maps (semantic_synthesis256/512) and layouts (layout2img-openimages256), from the
zoo or from a checkpoint trained with ``ldm train-ldm``; the work is :func:`ldmcli.pipelines.sample.run`."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import json

import typer

from ldmcli.commands import _common as opts
from ldmcli.commands._render import Renderer
from ldmcli.commands._run import options, rank_prefix, run_generation
from ldmcli.errors import UsageError

FLAGS = {"n_samples": "--n_samples", "batch_size": "--batch_size", "n_rows": "--n_rows", "seed": "--seed",
         "steps": "--custom_steps", "eta": "--eta", "scale": "--scale", "sampler": "--sampler", "classes": "--class",
         "null_class": "--null-class", "segmentation": "--segmentation", "layout": "--layout", "size": "--H/--W",
         "plot_layout": "--plot-layout"}


def sample_command(
    model: Optional[str] = typer.Argument(None, metavar="MODEL", help="Zoo name (digits: built in, no "
                                          "download; celeba256, ffhq256, lsun_churches256, lsun_beds256, cin256, "
                                          "cin256-v2, semantic_synthesis256/512, layout2img-openimages256), or a run "
                                          "folder / checkpoint as with -r.", show_default=False),
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
    segmentation: Optional[Path] = typer.Option(None, "--segmentation", help="Label map for semantic_synthesis: a "
                                                "PNG of COCO-Stuff ids 0-181, or painted in the palette (see "
                                                "--list-classes).", show_default=False),
    layout: Optional[Path] = typer.Option(None, "--layout", help="Layout JSON for layout2img-openimages256: "
                                          '[{"class": "Dog", "bbox": [x, y, w, h]}, ...].', show_default=False),
    height: Optional[int] = typer.Option(None, "--H", help="Image height (default: the label map's, else the "
                                         "model's).", show_default=False),
    width: Optional[int] = typer.Option(None, "--W", help="Image width (a label map is resized nearest-neighbour).",
                                        show_default=False),
    list_classes: bool = typer.Option(False, "--list-classes", help="Print the class names of a label-map or layout "
                                      "model (and the palette colours) and exit."),
    legend: Optional[Path] = typer.Option(None, "--legend", help="Write a legend PNG of the palette (of the classes "
                                          "in --segmentation when given).", show_default=False),
    plot_layout: bool = typer.Option(False, "--plot-layout", help="Also write the --layout boxes as drawn for the "
                                     "model (OUTDIR/layout-0000.png)."),
    examples: Optional[Path] = typer.Option(None, "--examples", help="Write the model's example label maps or layout "
                                            "into this folder and exit.", show_default=False),
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
    """Sample an unconditional, class-conditional, label-map (--segmentation) or layout (--layout) LDM.

    Writes OUTDIR/samples/00000.png, ... and OUTDIR/grid-0000.png, never overwriting, settings in every PNG.
    """
    from ldmcli.pipelines import sample
    from ldmcli.sampling import SamplerSettings

    if model is not None and resume is not None:
        raise UsageError("give MODEL or -r/--resume, not both")
    if model is None and resume is None:
        raise UsageError("give a MODEL (zoo name) or -r/--resume CHECKPOINT_OR_LOGDIR")
    if list_classes or examples is not None or (legend is not None and segmentation is None):
        _extras(str(resume) if resume is not None else model, list_classes, examples, legend, as_json, quiet)
        return
    if legend is not None and legend.exists():
        raise UsageError(f"--legend: {legend} exists")
    chosen = opts.pick_sampler(sampler, False, vanilla_sample)
    with options(FLAGS):
        settings = SamplerSettings(chosen, custom_steps, (1.0 if chosen == "ddim" else 0.0) if eta is None else eta,
                                   scale)
        request = sample.SampleRequest(
            model=str(resume) if resume is not None else model, outdir=logdir, settings=settings,
            classes=tuple(classes or ()), null_class=null_class, n_samples=n_samples, batch_size=batch_size,
            n_rows=n_rows, seed=seed, skip_grid=skip_grid, device=device, precision=precision, compile=compile_unet,
            tile_decode=tile_decode, segmentation=segmentation, layout=layout, height=height, width=width,
            plot_layout=plot_layout)
        source = sample.check(request)
        if legend is not None:
            from ldmcli.conditioning.segmentation import legend_png, read_label_map

            legend_png(legend, read_label_map(segmentation))
        outdir = logdir if logdir is not None else sample.default_outdir(source.name)
        with Renderer(as_json=as_json, quiet=quiet, prefix=rank_prefix()) as renderer:
            run_generation(renderer, outdir, lambda: sample.run(request, renderer))


def _extras(model: str, list_classes: bool, examples: Optional[Path], legend: Optional[Path], as_json: bool,
            quiet: bool) -> None:
    """--list-classes, --examples DIR and --legend PATH without a label map: print or write, then exit."""
    from ldmcli.pipelines import sample

    if sum((list_classes, examples is not None, legend is not None)) > 1:
        raise UsageError("--list-classes, --examples and --legend (without --segmentation) each run alone")
    if legend is not None:
        from ldmcli.conditioning.segmentation import legend_png

        if legend.exists():
            raise UsageError(f"--legend: {legend} exists")
        written = [legend_png(legend)]
    elif examples is not None:
        written = sample.write_examples(model, examples)
    else:
        table = sample.class_table(model)
        for row in table:
            typer.echo(json.dumps(row) if as_json else "\t".join(str(v) for v in row.values()))
        return
    if as_json:
        typer.echo(json.dumps({"written": [str(p) for p in written]}))
    elif not quiet:
        opts.stderr_console().print(f"ldm: wrote {', '.join(str(p) for p in written) or 'nothing (files exist)'}",
                                    markup=False, highlight=False, soft_wrap=True)


def register(app: typer.Typer) -> None:
    app.command("sample")(sample_command)
