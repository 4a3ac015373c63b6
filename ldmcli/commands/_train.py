"""What ``ldm train-ae`` and ``ldm train-ldm`` share: their own options, the request they build, and the rendering
of the library's :class:`~ldmcli.training.events.TrainEvent` s (a rich progress bar, or plain lines for logs)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from ldmcli.commands._common import is_interactive, stderr_console

HELP_EPILOG = "Configs: a training preset (digits-kl, digits-ldm) or a YAML file, upstream's or ours."

ValDataOption = Annotated[Optional[Path], typer.Option("--val-data", help="Folder of validation images: val/ losses "
                                                       "every --val-every steps, best.ckpt kept by them.")]
ValFractionOption = Annotated[Optional[float], typer.Option("--val-fraction", help="Hold out this fraction of --data "
                                                            "for validation (a fixed split, by file name).")]
ValEveryOption = Annotated[Optional[int], typer.Option("--val-every", help="Steps between validations (default "
                                                       "500, and at the end).")]

EvalEveryOption = Annotated[Optional[int], typer.Option("--eval-every", help="Steps between FID evaluations (and at "
                                                        "the end) of --eval-samples images: val/fid (LDMs), val/rfid "
                                                        "(autoencoders).")]
EvalSamplesOption = Annotated[Optional[int], typer.Option("--eval-samples", help="Images per FID evaluation: sampled "
                                                          "with seeds 0..K-1 (LDMs), or K validation images "
                                                          "reconstructed (autoencoders); at least 2.")]
EvalRefOption = Annotated[Optional[Path], typer.Option("--eval-ref", help="FID reference: a folder of images, an .npz "
                                                       "of images or statistics (default: the validation data, else "
                                                       "the training data).")]
EvalSamplerOption = Annotated[Optional[str], typer.Option("--eval-sampler", help="Sampler of the FID samples (default "
                                                          "ddim, eta 1, as ldm eval model; auto: fewest steps).")]
EvalStepsOption = Annotated[Optional[int], typer.Option("--eval-steps", help="Sampler steps of the FID samples "
                                                        "(default 50).")]
EvalScaleOption = Annotated[Optional[float], typer.Option("--eval-scale", help="Guidance scale of the FID samples "
                                                          "(default 1).")]


class Renderer:
    """Turns the library's progress events into a rich progress bar (terminal) or plain lines (logs)."""

    def __init__(self) -> None:
        self.console = stderr_console()
        self.interactive = is_interactive()
        self.progress = None
        self.task = None
        self.last_line = -1
        self.downloads: set[str] = set()

    def __call__(self, event: Any) -> None:
        kind = event.kind
        if kind == "run_dir":
            resumed = f", resuming {event.resumed_from}" if event.resumed_from else ""
            val = f", {event.val_examples} for validation" if event.val_examples else ""
            self._print(f"run folder {event.path} ({event.examples} examples{val}, lr {event.learning_rate:.3g}"
                        f"{resumed})")
        elif kind in ("warning", "message"):
            self._print(f"{'warning: ' if kind == 'warning' else ''}{event.text}")
        elif kind == "checkpoint" and event.interrupted:
            self._print(f"interrupted: saved {event.path} at step {event.step}")
        elif kind == "validation":
            shown = {k: v for k, v in event.metrics.items() if k in (event.monitor, "val/loss_simple")}
            values = "  ".join(f"{k} {v:.4f}" for k, v in shown.items())
            best = f"  (new best: {event.path})" if event.path else f"  (best {event.best:.4f} at step " \
                f"{event.best_step})" if event.best is not None else ""
            self._print(f"validation at step {event.step}: {values}{best}")
        elif kind == "evaluation":
            shown = ("val/fid", "val/kid", "val/rfid", "val/psnr")
            values = "  ".join(f"{k} {v:.4g}" for k, v in event.metrics.items() if k in shown)
            what = ("rFID", "reconstructions") if "val/rfid" in event.metrics else ("FID", "samples")
            self._print(f"{what[0]} at step {event.step}: {values}  ({event.examples} {what[1]} in "
                        f"{event.seconds:.1f} s, kept in {event.path})")
        elif kind == "download":
            if event.path not in self.downloads:
                self.downloads.add(event.path)
                self._print(f"downloading {event.path} (Inception weights for FID; ldm download inception)")
            if event.total and event.done == event.total:
                self._print(f"downloaded {event.path} ({event.total / 1e6:.1f} MB)")
        elif kind == "start" and self.interactive:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(TextColumn("training"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("{task.fields[info]}"), TimeRemainingColumn(),
                                     console=self.console, transient=False)
            self.progress.start()
            self.task = self.progress.add_task("train", total=event.total, completed=event.step, info="")
        elif kind == "step":
            info = f"loss {event.loss:.4f}  {event.steps_per_s:.2f} steps/s" if event.loss is not None else ""
            if self.progress is not None:
                self.progress.update(self.task, completed=event.step, info=info)
            elif event.step // 50 != self.last_line // 50 or event.step == event.total:
                self.last_line = event.step
                total = f"/{event.total}" if event.total else ""
                self._print(f"step {event.step}{total}  {info}")

    def _print(self, text: str) -> None:
        console = self.progress.console if self.progress is not None else self.console
        console.print(text, soft_wrap=True, markup=False)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


def run_command(kind: str, *, config: Optional[str], resume: Optional[Path], data: Optional[Path],
                val_data: Optional[Path] = None, val_fraction: Optional[float] = None,
                val_every: Optional[int] = None, first_stage: Optional[str] = None,
                cond_drop: Optional[float] = None, batch_size: Optional[int], num_workers: Optional[int],
                devices: Optional[str], gpus: Optional[str], record_examples: bool, logdir: Path,
                name: Optional[str], **settings: Any) -> None:
    """Parse nothing more: build the request from the options, run it, render its events, print the run folder."""
    from ldmcli.training.run import TrainRequest, run_training

    overrides = {k: str(v) if isinstance(v, Path) else v for k, v in dict(
        settings, cond_drop=cond_drop, val_fraction=val_fraction, val_every=val_every).items() if v is not None}
    if record_examples:
        overrides["record_examples"] = True
    request = TrainRequest(kind, config, resume=resume, overrides=overrides, data_root=data, val_data=val_data,
                           batch_size=batch_size, num_workers=num_workers, first_stage=first_stage, devices=devices,
                           gpus=gpus, logdir=logdir, name=name)
    render = Renderer()
    try:
        result = run_training(request, callback=render)
    finally:
        render.close()
    if result.model_checkpoint is not None:
        best = f", best {result.best_checkpoint.name}" if result.best_checkpoint else ""
        stderr_console().print(f"done: step {result.global_step}, {result.model_checkpoint} "
                               f"(checkpoints in {result.checkpoint.parent}{best})", soft_wrap=True, markup=False)
        typer.echo(str(result.run_dir))
