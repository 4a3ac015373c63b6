"""``ldm inpaint``: fill the white region of a mask with the inpainting_big model (upstream's scripts/inpaint.py).

Forms: ``ldm inpaint IMAGE MASK -o OUT.png`` (one pair), ``ldm inpaint --indir DIR --outdir DIR`` (upstream's
batch: ``NAME.png`` with ``NAME_mask.png``; resumable), ``ldm inpaint --examples DIR`` (write example pairs).
"""

from __future__ import annotations

import json
import secrets
import time
from pathlib import Path
from typing import Optional

import typer

from ldmcli.commands._common import is_interactive, stderr_console
from ldmcli.errors import LdmError, UsageError

DEFAULT_MODEL = "inpainting_big"


class _Progress:
    """Renders model loading, downloads and ``InpaintEvent``s on stderr: rich bars on a terminal (images done, steps
    of the current image), one line per image otherwise (cron logs)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.console = stderr_console()
        self.progress = None
        self.images = self.steps = self.download_task = None
        self.started = 0.0

    def __enter__(self) -> "_Progress":
        if self.enabled and is_interactive():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
                TimeRemainingColumn

            self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TimeElapsedColumn(), TimeRemainingColumn(), console=self.console,
                                     transient=False)
            self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None:
            self.progress.stop()

    def line(self, text: str) -> None:
        """A message line (also above a live progress bar)."""
        if self.progress is not None:
            self.progress.console.print(text, markup=False, highlight=False, soft_wrap=True)
        else:
            self.console.print(text, markup=False, highlight=False, soft_wrap=True)

    def message(self, text: str) -> None:
        if self.enabled:
            self.line(f"ldm: {text}")

    def download(self, done: int, total: int | None, name: str) -> None:
        if not self.enabled:
            return
        if self.progress is None:
            if total is not None and done >= total:
                self.line(f"ldm: downloaded {name}")
            return
        if self.download_task is None:
            self.download_task = self.progress.add_task(f"downloading {name}", total=total)
        self.progress.update(self.download_task, completed=done, total=total)

    def start(self, total: int) -> None:
        if self.progress is not None and self.enabled:
            self.images = self.progress.add_task("images", total=total)
            self.steps = self.progress.add_task("steps", total=None, visible=False)

    def __call__(self, event) -> None:  # an ldmcli.inpaint.InpaintEvent
        if event.kind == "failed":
            self.line(f"ldm: error: {event.message}")  # always shown, even with --quiet
        if not self.enabled:
            return
        where = f"[{event.index + 1}/{event.total}]"
        if self.progress is not None:
            if event.kind == "start":
                self.progress.update(self.steps, description=event.pair.image.name, completed=0, total=None,
                                     visible=True)
            elif event.kind == "step":
                self.progress.update(self.steps, completed=event.step, total=event.steps)
            elif event.kind in ("done", "skipped", "failed"):
                self.progress.advance(self.images)
                if event.kind == "skipped":
                    self.line(f"ldm: {where} skipped {event.pair.output} (exists; --overwrite replaces it)")
            return
        if event.kind == "start":
            self.started = time.monotonic()
        elif event.kind == "done":
            self.line(f"ldm: {where} wrote {event.pair.output} ({time.monotonic() - self.started:.1f} s)")
        elif event.kind == "skipped":
            self.line(f"ldm: {where} skipped {event.pair.output} (exists; --overwrite replaces it)")


def _model_source(model: Optional[str], config: Optional[Path], ckpt: Optional[Path]) -> tuple[str, Optional[Path]]:
    if config is not None:
        if model is not None:
            raise UsageError("give either --model or --config, not both")
        if ckpt is None:
            raise UsageError("--config needs --ckpt (the checkpoint of that config)")
        if not config.is_file():
            raise UsageError(f"{config}: no such config file")
        return str(config), ckpt
    if ckpt is not None and not ckpt.is_file():
        raise UsageError(f"{ckpt}: no such checkpoint")
    return model or DEFAULT_MODEL, ckpt


def _single_pair(image: Path, mask: Optional[Path], output: Optional[Path], overwrite: bool):
    from ldmcli.inpaint import InpaintPair, check_pair

    if mask is None:
        raise UsageError(f"{image}: no mask given (ldm inpaint IMAGE MASK -o OUT.png)")
    if output is None:
        raise UsageError("give the output file with -o OUT.png")
    if output.suffix.lower() != ".png":
        raise UsageError(f"{output}: the output must be a .png file (lossless, so pixels outside the mask stay "
                         f"exactly the input's)")
    if output.exists() and output.is_dir():
        raise UsageError(f"{output}: is a folder; -o names the output file")
    pair = InpaintPair(image, mask, output)
    check_pair(pair)
    if output.exists() and output.resolve() in (image.resolve(), mask.resolve()):
        raise UsageError(f"{output}: the output would overwrite an input")
    if output.exists() and not overwrite:
        raise UsageError(f"{output}: exists (pass --overwrite to replace it)")
    return pair


def _batch_pairs(indir: Path, outdir: Path, overwrite: bool):
    """Pairs to run, pairs whose output exists (skipped by the library) and problems found without the model."""
    from ldmcli.inpaint import PairProblem, check_pair, find_pairs

    pairs, problems = find_pairs(indir, outdir)
    todo = []
    for pair in pairs:
        if pair.output.exists() and not overwrite:
            todo.append(pair)  # skipped (and reported) by inpaint_pairs
            continue
        try:
            check_pair(pair)
        except LdmError as e:
            problems.append(PairProblem(pair.image, str(e)))
            continue
        todo.append(pair)
    return todo, problems


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
    config: Optional[Path] = typer.Option(None, "--config", help="A config file (ours or upstream's YAML) instead of "
                                          "--model; needs --ckpt.", show_default=False),
    ckpt: Optional[Path] = typer.Option(None, "--ckpt", help="A checkpoint file (.ckpt or .safetensors).",
                                        show_default=False),
    steps: int = typer.Option(50, "--steps", help="Sampler steps (upstream: 50 DDIM steps)."),
    sampler: str = typer.Option("ddim", "--sampler", help="ddim (upstream's), plms or dpmpp."),
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

    from ldmcli.devices import pick_device, resolve_precision
    from ldmcli.inpaint import InpaintSettings, check_sampler

    if image is not None and indir is not None:
        raise UsageError("give either IMAGE MASK -o OUT.png or --indir DIR --outdir DIR, not both")
    if image is None and indir is None:
        raise UsageError("nothing to inpaint: give IMAGE MASK -o OUT.png, --indir DIR --outdir DIR, or --examples DIR")
    check_sampler(sampler, steps, eta)
    source, ckpt_path = _model_source(model, config, ckpt)
    dev = pick_device(device)
    dtype = resolve_precision(precision, dev)

    problems = []
    if image is not None:
        if outdir is not None:
            raise UsageError("--outdir belongs to the batch form (--indir); the single-pair form takes -o OUT.png")
        pairs = [_single_pair(image, mask, output, overwrite)]
    else:
        if outdir is None:
            raise UsageError("--indir needs --outdir (the results keep the input file names)")
        if output is not None:
            raise UsageError("-o belongs to the single-pair form; the batch form writes into --outdir")
        pairs, problems = _batch_pairs(indir, outdir, overwrite)

    seed = secrets.randbelow(2**31) if seed is None else seed
    settings = InpaintSettings(steps=steps, sampler=sampler, eta=eta, seed=seed)
    failed = list(problems)
    with _Progress(enabled=not quiet) as progress:
        for problem in problems:
            progress.line(f"ldm: error: {problem.message}")
        report = None
        if pairs:
            report = _run(pairs, settings, source, ckpt_path, dev, dtype, overwrite, progress)
            failed += report.failed

    if as_json:
        typer.echo(json.dumps({
            "written": report.written if report else [],
            "skipped": [str(p.output) for p in report.skipped] if report else [],
            "failed": [{"path": str(p.path), "error": p.message} for p in failed],
            "seed": seed,
        }, indent=2))
    elif report is not None and not quiet:
        summary = f"ldm: {len(report.written)} written, {len(report.skipped)} skipped"
        stderr_console().print(summary + (f", {len(failed)} failed" if failed else "") + f" (seed {seed})",
                               markup=False, highlight=False, soft_wrap=True)
    if failed:
        total = len(pairs) + len(problems)
        raise LdmError(f"{len(failed)} of {total} pair{'s' if total != 1 else ''} failed (reported above)")


def _run(pairs, settings, source, ckpt_path, dev, dtype, overwrite, progress):
    from ldmcli.inpaint import check_inpainting_model, inpaint_pairs
    from ldmcli.loading import load_model

    metadata = {"command": "inpaint", "model": source if ckpt_path is None else f"{source} ({ckpt_path.name})",
                "precision": str(dtype).replace("torch.", "")}
    model = None
    if overwrite or not all(pair.output.exists() for pair in pairs):  # a fully done batch needs no model
        model = load_model(source, ckpt=ckpt_path, device=dev, dtype=dtype, callback=progress.message,
                           progress=progress.download)
        check_inpainting_model(model)
        if getattr(model, "ckpt_sha256", None):
            metadata["ckpt_sha256"] = model.ckpt_sha256
    progress.start(len(pairs))
    return inpaint_pairs(model, pairs, settings, overwrite=overwrite, metadata=metadata, callback=progress)


def register(app: typer.Typer) -> None:
    app.command("inpaint")(inpaint_command)
