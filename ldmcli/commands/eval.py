"""``ldm eval samples|ae|model``: FID/IS/KID/precision-recall, reconstruction metrics, and sample-then-measure."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import typer

from ldmcli.commands import _common as opts

app = typer.Typer(help="Measure quality: FID, IS, KID, precision/recall (torch-fidelity's Inception), and "
                  "rFID, PSNR, SSIM, LPIPS of autoencoders.", no_args_is_help=True)

BatchOption = typer.Option(50, "--batch-size", help="Images per Inception batch.")
JsonOption = typer.Option(False, "--json", help="Print the result as JSON on stdout.")
RefOption = typer.Option(None, "--ref", help="Reference: a folder of real images, an .npz of images (arr_0, as "
                         "ADM's reference batches) or of statistics (mu, sigma).", show_default=False)


class Display:
    """Progress bars on a terminal (stderr); the result as a table, or one JSON object on stdout with --json."""

    def __init__(self, quiet: bool) -> None:
        self.console = opts.stderr_console()
        self.show = not quiet and opts.is_interactive()
        self.progress: Any = None
        self.tasks: dict[str, Any] = {}

    def __enter__(self) -> "Display":
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.progress is not None:
            self.progress.stop()

    def event(self, ev: Any) -> None:
        if not self.show:
            return
        if ev.kind in ("stage", "message") and ev.message and ev.stage != "result":
            self.console.print(f"ldm: {ev.message}", style="dim", markup=False, soft_wrap=True)
        if ev.kind not in ("progress", "download"):
            return
        if self.progress is None:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TimeRemainingColumn(), console=self.console, transient=True)
            self.progress.start()
        label = f"downloading {ev.stage}" if ev.kind == "download" else ev.stage
        if label not in self.tasks:
            self.tasks[label] = self.progress.add_task(label, total=ev.total)
        self.progress.update(self.tasks[label], completed=ev.done, total=ev.total)


def _render(record: Any, as_json: bool, quiet: bool) -> None:
    from ldmcli.eval.metrics import summary_lines

    if as_json:
        typer.echo(json.dumps(record, sort_keys=True))
    elif not quiet:
        for line in summary_lines(record):
            typer.echo(line)


@app.command("samples")
def samples_command(
    samples: Path = typer.Argument(..., metavar="DIR", help="Generated images: a folder (an ldm sample output folder "
                                   "means its samples/) or an .npz with arr_0."),
    ref: Optional[Path] = RefOption,
    batch_size: int = BatchOption,
    device: opts.DeviceOption = None,
    as_json: bool = JsonOption,
    quiet: opts.QuietOption = False,
) -> None:
    """FID, Inception Score, KID and precision/recall (k=3) of DIR against --ref (IS only without one)."""
    from ldmcli.devices import pick_device
    from ldmcli.eval import evaluate_samples

    with Display(quiet) as display:
        result = evaluate_samples(samples, ref, batch_size=batch_size, device=pick_device(device),
                                  on_event=display.event)
    _render(result.record(), as_json, quiet)


@app.command("ae")
def ae_command(
    model: str = typer.Argument(..., metavar="MODEL", help="A first stage (zoo name such as kl-f8), or a train-ae "
                                "run folder / checkpoint; an LDM's first stage is measured too."),
    data: Path = typer.Option(..., "--data", help="Folder (or .npz) of real images; resized and centre-cropped to "
                              "the model's resolution."),
    limit: Optional[int] = typer.Option(None, "-n", "--limit", help="Use at most this many images.",
                                        show_default=False),
    batch_size: int = typer.Option(8, "--batch-size", help="Images per autoencoder batch."),
    no_rfid: bool = typer.Option(False, "--no-rfid", help="Skip rFID (no Inception)."),
    no_lpips: bool = typer.Option(False, "--no-lpips", help="Skip LPIPS (no VGG weights)."),
    device: opts.DeviceOption = None,
    as_json: bool = JsonOption,
    quiet: opts.QuietOption = False,
) -> None:
    """rFID, PSNR, SSIM and LPIPS of MODEL's reconstructions of the images in --data."""
    from ldmcli.devices import pick_device
    from ldmcli.eval import evaluate_autoencoder

    with Display(quiet) as display:
        result = evaluate_autoencoder(model, data, batch_size=batch_size, device=pick_device(device), limit=limit,
                                      rfid=not no_rfid, lpips=not no_lpips, on_event=display.event)
    _render(result.record(), as_json, quiet)


@app.command("model")
def model_command(
    model: str = typer.Argument(..., metavar="MODEL", help="Zoo name (cin256-v2, celeba256, digits, ...) or a "
                                "train-ldm run folder / checkpoint."),
    n: int = typer.Option(..., "-n", "--n-samples", help="Images to sample per setting (existing ones count)."),
    ref: Optional[Path] = RefOption,
    outdir: Optional[Path] = typer.Option(None, "--outdir", help="Where samples and eval.json/csv/png go "
                                          "(default: outputs/<model>-eval).", show_default=False),
    scale: str = typer.Option("1", "--scale", help="Guidance scale(s), comma-separated: 1,2,3,5 sweeps."),
    steps: str = typer.Option("50", "--steps", help="Sampler step count(s), comma-separated."),
    sampler: str = typer.Option("ddim", "--sampler", help="Sampler(s), comma-separated: ddim, plms, dpmpp, ddpm."),
    eta: Optional[float] = typer.Option(None, "--eta", help="DDIM eta (default 1.0 for DDIM as ldm sample, else 0).",
                                        show_default=False),
    seed: int = typer.Option(0, "--seed", help="Image i uses seed + i."),
    sample_batch: int = typer.Option(16, "--sample-batch-size", help="Images per sampler batch."),
    batch_size: int = BatchOption,
    precision: str = typer.Option("fp32", "--precision", help="Sampling precision: fp32, bf16, fp16 or auto."),
    device: opts.DeviceOption = None,
    as_json: bool = JsonOption,
    quiet: opts.QuietOption = False,
) -> None:
    """Sample N images of MODEL (resumable) and measure them against --ref; lists of settings sweep."""
    from ldmcli.devices import pick_device
    from ldmcli.eval import evaluate_model
    from ldmcli.eval.sweep import parse_list

    scales = parse_list(scale, float, "--scale")
    step_counts = parse_list(steps, int, "--steps")
    samplers = parse_list(sampler, str.strip, "--sampler")
    out = outdir if outdir is not None else Path("outputs") / f"{Path(model).name or 'model'}-eval"
    with Display(quiet) as display:
        result = evaluate_model(model, n, out, ref=ref, scales=scales, steps=step_counts, samplers=samplers, eta=eta,
                                seed=seed, batch_size=sample_batch, eval_batch_size=batch_size,
                                device=pick_device(device), precision=precision, on_event=display.event)
    _render(result.rows, as_json, quiet)
    if not quiet and not as_json:
        opts.stderr_console().print(f"ldm: wrote {', '.join(str(p) for p in result.files)}", markup=False)


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="eval")
