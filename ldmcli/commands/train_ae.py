"""``ldm train-ae``: train a first-stage autoencoder (KL or VQ, with LPIPS + PatchGAN losses) with Lightning.

The command body shared with ``ldm train-ldm`` and the progress rendering live here too (the options they share are
declared in ``_common``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from ldmcli.commands import _common as opts
from ldmcli.commands._common import is_interactive, stderr_console
from ldmcli.errors import UsageError

HELP_EPILOG = "Configs: a training preset (digits-kl, digits-ldm) or a YAML file, upstream's or ours."


def parse_devices(text: str | None) -> Any:
    """``--devices 2`` / ``auto`` / ``0,1`` → Lightning's ``devices``."""
    if text is None:
        return None
    text = text.strip()
    if text == "auto":
        return "auto"
    try:
        if "," in text:
            return [int(t) for t in text.split(",") if t.strip()]
        value = int(text)
    except ValueError:
        raise UsageError(f"--devices takes a number, 'auto' or indices like 0,1 (got {text!r})") from None
    if value < 1:
        raise UsageError("--devices must be at least 1")
    return value


class Renderer:
    """Turns the library's progress events into a rich progress bar (terminal) or plain lines (logs)."""

    def __init__(self) -> None:
        self.console = stderr_console()
        self.interactive = is_interactive()
        self.progress = None
        self.task = None
        self.last_line = -1

    def __call__(self, event: dict[str, Any]) -> None:
        kind = event.get("event")
        if kind == "run_dir":
            lr = event.get("learning_rate")
            resumed = f", resuming {event['resumed_from']}" if event.get("resumed_from") else ""
            self._print(f"run folder {event['path']} ({event['examples']} examples, lr {lr:.3g}{resumed})")
        elif kind in ("warning", "message"):
            prefix = "warning: " if kind == "warning" else ""
            self._print(f"{prefix}{event['text']}")
        elif kind == "checkpoint":
            if event.get("interrupted"):
                self._print(f"interrupted: saved {event['path']} at step {event['step']}")
        elif kind == "start":
            if self.interactive:
                from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

                self.progress = Progress(TextColumn("training"), BarColumn(), MofNCompleteColumn(),
                                         TextColumn("{task.fields[info]}"), TimeRemainingColumn(),
                                         console=self.console, transient=False)
                self.progress.start()
                self.task = self.progress.add_task("train", total=event.get("total"), completed=event["step"],
                                                   info="")
        elif kind == "step":
            loss = event.get("loss")
            info = f"loss {loss:.4f}  {event['steps_per_s']:.2f} steps/s" if loss is not None else ""
            if self.progress is not None:
                self.progress.update(self.task, completed=event["step"], info=info)
            elif event["step"] // 50 != self.last_line // 50 or event["step"] == event.get("total"):
                self.last_line = event["step"]
                total = f"/{event['total']}" if event.get("total") else ""
                self._print(f"step {event['step']}{total}  {info}")

    def _print(self, text: str) -> None:
        console = self.progress.console if self.progress is not None else self.console
        console.print(text, soft_wrap=True, markup=False)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


def run_training_command(kind: str, *, config: Optional[str], resume: Optional[Path], data: Optional[Path],
                         first_stage: Optional[str] = None, cond_drop: Optional[float] = None,
                         max_steps: Optional[int], max_epochs: Optional[int], batch_size: Optional[int],
                         num_workers: Optional[int], accumulate: Optional[int], precision: Optional[str],
                         accelerator: Optional[str], devices: Optional[str], gpus: Optional[str],
                         num_nodes: Optional[int], strategy: Optional[str], seed: Optional[int],
                         scale_lr: Optional[bool], checkpoint_every: Optional[int], keep_every: Optional[int],
                         log_images_every: Optional[int], record_examples: bool, logdir: Path,
                         name: Optional[str]) -> None:
    from ldmcli.training.run import train

    if gpus is not None and devices is not None:
        raise UsageError("--gpus and --devices both choose devices: give one")
    overrides = {k: v for k, v in dict(
        max_steps=max_steps, max_epochs=max_epochs, accumulate=accumulate, precision=precision,
        accelerator=accelerator, devices=parse_devices(devices), num_nodes=num_nodes, strategy=strategy, seed=seed,
        scale_lr=scale_lr, checkpoint_every=checkpoint_every, keep_every=keep_every,
        log_images_every=log_images_every, cond_drop=cond_drop).items() if v is not None}
    if record_examples:
        overrides["record_examples"] = True
    render = Renderer()
    try:
        result = train(kind, config, resume=resume, overrides=overrides, data_root=data, batch_size=batch_size,
                       num_workers=num_workers, first_stage=first_stage, gpus=gpus, logdir=logdir, name=name,
                       callback=render)
    finally:
        render.close()
    if result.model_checkpoint is not None:
        stderr_console().print(f"done: step {result.global_step}, {result.model_checkpoint} "
                               f"(checkpoints in {result.checkpoint.parent})", soft_wrap=True, markup=False)
        typer.echo(str(result.run_dir))


def register(app: typer.Typer) -> None:
    @app.command("train-ae", epilog=HELP_EPILOG)
    def train_ae(
        config: opts.TrainConfigOption = None,
        resume: opts.ResumeOption = None,
        data: opts.DataOption = None,
        max_steps: opts.MaxStepsOption = None,
        max_epochs: opts.MaxEpochsOption = None,
        batch_size: opts.BatchSizeOption = None,
        num_workers: opts.NumWorkersOption = None,
        accumulate: opts.AccumulateOption = None,
        precision: opts.TrainPrecisionOption = None,
        accelerator: opts.AcceleratorOption = None,
        devices: opts.DevicesOption = None,
        gpus: opts.GpusOption = None,
        num_nodes: opts.NumNodesOption = None,
        strategy: opts.StrategyOption = None,
        seed: opts.TrainSeedOption = None,
        scale_lr: opts.ScaleLrOption = None,
        checkpoint_every: opts.CheckpointEveryOption = None,
        keep_every: opts.KeepEveryOption = None,
        log_images_every: opts.LogImagesEveryOption = None,
        record_examples: opts.RecordExamplesOption = False,
        logdir: opts.LogdirOption = Path("logs"),
        name: opts.RunNameOption = None,
    ) -> None:
        """Train a first-stage autoencoder (AutoencoderKL or VQModel) on images."""
        run_training_command("autoencoder", **locals())
