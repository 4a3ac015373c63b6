"""Lightning callbacks of a training run: EMA, data order, checkpoints, image logs and progress reports.

Callbacks run in list order at the end of each batch: EMA update, then data-order bookkeeping, then the checkpoint,
so a checkpoint holds the state after the whole batch. Checkpoints are written through :class:`AtomicCheckpointIO`
(a temporary file in the same folder, then ``os.replace``), so a kill during a write leaves the previous file valid.
"""

from __future__ import annotations

import csv
import io
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.fabric.plugins import CheckpointIO
from lightning.pytorch.loggers.logger import Logger
from lightning.pytorch.utilities import rank_zero_only
from PIL import Image

from ldmcli.fileio import atomic_path
from ldmcli.training.data import ResumableSampler
from ldmcli.training.events import Progress, TrainEvent


def _plain(value: Any) -> Any:
    """Only what ``torch.load(weights_only=True)`` reads back: tensors, numbers, strings, containers."""
    if isinstance(value, torch.Tensor) or value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, dict):
        return {(k if isinstance(k, (str, int)) else str(k)): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value) if isinstance(value, list) else tuple(_plain(v) for v in value)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return str(value)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file next to ``path``, flushed to disk, then renamed over it."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)


class AtomicCheckpointIO(CheckpointIO):
    """Lightning checkpoint I/O that writes atomically and only plain values (loadable with ``weights_only``)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        atomic_torch_save(_plain(checkpoint), path)

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict:
        return torch.load(path, map_location=map_location or "cpu", weights_only=True)

    def remove_checkpoint(self, path: Any) -> None:
        if os.path.exists(path):
            os.unlink(path)


class EMAUpdate(L.Callback):
    """Upstream's ``on_train_batch_end``: one LitEma step of ``net.model_ema`` after every batch."""

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        net = pl_module.net
        if getattr(net, "use_ema", False):
            net.model_ema(net.model)


class DataOrder(L.Callback):
    """Checkpoints how far into its epoch the sampler got, so a resumed run continues with the next example."""

    def __init__(self, sampler: ResumableSampler, batch_size: int) -> None:
        self.sampler = sampler
        self.batch_size = batch_size
        self.epoch = 0
        self.batches = 0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        if trainer.current_epoch != self.epoch:
            self.epoch, self.batches = trainer.current_epoch, 0

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.epoch, self.batches = trainer.current_epoch, batch_idx + 1

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "batches": self.batches, "seed": self.sampler.seed,
                "world_size": self.sampler.world_size}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        epoch, batches = int(state_dict["epoch"]), int(state_dict["batches"])
        consumed = batches * self.batch_size
        if consumed >= len(self.sampler):
            epoch, consumed = epoch + 1, 0
        self.epoch, self.batches = epoch, consumed // self.batch_size
        self.sampler.resume_at(epoch, consumed)


class SeenExamples(L.Callback):
    """Appends ``step index`` lines of the examples this rank trained on to ``<folder>/rank<r>.txt``."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if "index" not in batch:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        step = getattr(pl_module, "step", trainer.global_step)
        with open(self.folder / f"rank{trainer.global_rank}.txt", "a", encoding="utf-8") as f:
            f.writelines(f"{step} {int(i)}\n" for i in batch["index"])


class Checkpointer(L.Callback):
    """``checkpoints/last.ckpt`` every ``every`` steps and at the end, ``step-NNNNNNN.ckpt`` kept every ``keep_every``
    steps, and ``last.ckpt`` on Ctrl-C (upstream's "Summoning checkpoint"). A run that fails (a NaN loss, an error)
    keeps its last good checkpoint untouched."""

    def __init__(self, ckpt_dir: Path, every: int, keep_every: int = 0, callback: Progress | None = None,
                 final_step: int | None = None) -> None:
        self.ckpt_dir = ckpt_dir
        self.every = every
        self.final_step = final_step
        self.keep_every = keep_every
        self.callback = callback
        self.saved_step = -1

    def _save(self, trainer: L.Trainer, step: int, name: str = "last.ckpt") -> None:
        trainer.save_checkpoint(self.ckpt_dir / name)
        if self.callback and trainer.is_global_zero:
            self.callback(TrainEvent("checkpoint", path=str(self.ckpt_dir / name), step=step))

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = pl_module.step
        if step == 0 or step == self.saved_step:  # still accumulating: no optimizer step since the last save
            return
        if self.keep_every and step % self.keep_every == 0:
            self._save(trainer, step, f"step-{step:07d}.ckpt")
        if (self.every and step % self.every == 0) or step == self.final_step:
            # the last step's checkpoint is written here too, not when training ends: by then Lightning has counted
            # the next epoch, and a run resumed from such a file would start that epoch's data afresh
            self._save(trainer, step)
            self.saved_step = step

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        if pl_module.step != self.saved_step:
            self._save(trainer, pl_module.step)
            self.saved_step = pl_module.step

    def on_exception(self, trainer: L.Trainer, pl_module: Any, exception: BaseException) -> None:
        if isinstance(exception, KeyboardInterrupt) and trainer.is_global_zero:
            # no barrier: the other ranks are being interrupted too
            checkpoint = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
            AtomicCheckpointIO().save_checkpoint(checkpoint, self.ckpt_dir / "last.ckpt")
            if self.callback:
                self.callback(TrainEvent("checkpoint", path=str(self.ckpt_dir / "last.ckpt"), step=pl_module.step,
                                         interrupted=True))


def save_grid(images: torch.Tensor, path: Path, nrow: int = 4) -> None:
    """A PNG grid of ``b c h w`` images in [-1, 1] (clamped), ``nrow`` per row, 2-pixel black padding."""
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    x = x[:, :3]
    b, c, h, w = x.shape
    ncol = min(nrow, b)
    nrows = math.ceil(b / ncol)
    pad = 2
    grid = torch.zeros(c, nrows * (h + pad) + pad, ncol * (w + pad) + pad, dtype=torch.uint8)
    for k in range(b):
        r, q = divmod(k, ncol)
        grid[:, pad + r * (h + pad): pad + r * (h + pad) + h, pad + q * (w + pad): pad + q * (w + pad) + w] = x[k]
    with atomic_path(path) as tmp:
        Image.fromarray(grid.permute(1, 2, 0).numpy()).save(tmp, format="PNG")


class ImageLogger(L.Callback):
    """Upstream's ImageLogger: every ``every`` steps (and at 1, 2, 4, ... when ``increase_log_steps``), the module's
    ``log_images`` as PNG grids ``images/train/<key>_gs-NNNNNN_e-NNNNNN_b-NNNNNN.png`` (rank 0 only)."""

    def __init__(self, folder: Path, every: int, increase_log_steps: bool = False,
                 callback: Progress | None = None) -> None:
        self.folder = folder
        self.every = every
        self.log_steps = {2**n for n in range(int(math.log2(every)) + 1)} if increase_log_steps and every > 0 else set()
        self.callback = callback
        self.logged_step = -1

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = pl_module.step
        if not trainer.is_global_zero or self.every <= 0 or step == 0 or step == self.logged_step:
            return
        if step % self.every and step not in self.log_steps:
            return
        self.logged_step = step
        was_training = pl_module.training
        pl_module.eval()
        rng = torch.get_rng_state()
        try:
            with torch.no_grad():
                images = pl_module.log_images(batch)
        finally:
            torch.set_rng_state(rng)  # image logs must not change the training's random stream
            if was_training:
                pl_module.train()
        for key, value in images.items():
            path = self.folder / f"{key}_gs-{step:06d}_e-{trainer.current_epoch:06d}_b-{batch_idx:06d}.png"
            save_grid(value, path)
        if self.callback:
            self.callback(TrainEvent("images", step=step, path=str(self.folder)))


class ProgressReporter(L.Callback):
    """Reports ``start`` and ``step`` :class:`TrainEvent` s to the library callback (rank 0)."""

    def __init__(self, callback: Progress, total: int | None, every: int = 1) -> None:
        self.callback = callback
        self.total = total
        self.every = max(1, every)
        self._t0 = time.perf_counter()
        self._s0 = 0

    def on_train_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        self._t0, self._s0 = time.perf_counter(), pl_module.step
        if trainer.is_global_zero:
            self.callback(TrainEvent("start", step=self._s0, total=self.total))

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = pl_module.step
        if not trainer.is_global_zero or step % self.every:
            return
        elapsed = time.perf_counter() - self._t0
        rate = (step - self._s0) / elapsed if elapsed > 0 else 0.0
        self.callback(TrainEvent("step", step=step, total=self.total, epoch=trainer.current_epoch,
                                 loss=pl_module.last_loss, steps_per_s=rate))


def _number(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        value = value.detach().float().cpu().item() if value.numel() == 1 else value.tolist()
    return value


class MetricsCsv(Logger):
    """``metrics.csv``: one row per logged step (``step``, then the metrics), appended as it goes.

    A resumed run appends to the file its earlier segments wrote (Lightning's CSVLogger starts it afresh); a metric
    that first appears later (validation losses, the discriminator's from ``disc_start``) widens the header, the file
    being rewritten once, atomically, with the earlier rows kept. Rows are written when logged, so nothing waits in
    memory for a crash to lose."""

    def __init__(self, path: str | os.PathLike) -> None:
        super().__init__()
        self.path = Path(path)
        self.last_step: int | None = None

    @property
    def name(self) -> str:
        return "metrics"

    @property
    def version(self) -> str:
        return ""

    @property
    def save_dir(self) -> str:
        return str(self.path.parent)

    @rank_zero_only
    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass  # train.yaml holds them

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        row = {"step": step, **{k: _number(v) for k, v in metrics.items()}}
        self.write_row(row)
        if step is not None and any(k != "epoch" and not k.startswith("val/") for k in metrics):
            self.last_step = step  # of the training metrics

    def _header(self) -> list[str]:
        if not self.path.is_file():
            return []
        with open(self.path, newline="", encoding="utf-8") as f:
            return next(csv.reader(f), [])

    def write_row(self, row: dict[str, Any]) -> None:
        header = self._header()
        new = [k for k in row if k not in header]
        if not header or new:
            rows: list[dict[str, Any]] = []
            if header:
                with open(self.path, newline="", encoding="utf-8") as f:
                    rows = list(csv.DictReader(f))
            header = header + new if header else list(row)
            buf = io.StringIO()
            writer = csv.DictWriter(buf, fieldnames=header, lineterminator="\n")
            writer.writeheader()
            writer.writerows([*rows, row])
            with atomic_path(self.path, fsync=False) as tmp:
                tmp.write_text(buf.getvalue(), encoding="utf-8")
            return
        with open(self.path, "a", newline="", encoding="utf-8") as f:
            csv.DictWriter(f, fieldnames=header, lineterminator="\n").writerow(row)


class FinalMetrics(L.Callback):
    """Logs the metrics of the run's last step when Lightning's ``log_every_n_steps`` cadence skipped it, so a run
    shorter than the cadence still writes its losses to ``metrics.csv``."""

    def __init__(self, logger: MetricsCsv) -> None:
        self.logger = logger

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        step = log_step(trainer, ended=True)
        if step < 0 or self.logger.last_step == step:
            return
        metrics = {k: v for k, v in trainer.callback_metrics.items() if not k.startswith("val/")}
        if metrics:
            for logger in trainer.loggers:
                logger.log_metrics({**metrics, "epoch": trainer.current_epoch}, step)


class EveryNSteps(L.Callback):
    """Calls ``fn(trainer, pl_module, step)`` after every ``every``-th optimizer step, and once more when training
    ends on a step it was not called at (``at_end``). The hook for periodic work: validation, FID, ..."""

    def __init__(self, every: int, fn: Callable[[L.Trainer, Any, int], None], *, at_end: bool = True,
                 final_step: int | None = None) -> None:
        self.every = every
        self.fn = fn
        self.at_end = at_end
        self.final_step = final_step  # max_steps: the end is done at that batch (before its checkpoint)
        self.done_step = -1
        self.ended = False

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = pl_module.step
        last = self.at_end and step == self.final_step
        if self.every <= 0 or step == 0 or step == self.done_step or (step % self.every and not last):
            return
        self.done_step = step
        self.fn(trainer, pl_module, step)

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        step = pl_module.step
        if self.at_end and self.every > 0 and step > 0 and step != self.done_step:
            self.done_step, self.ended = step, True
            self.fn(trainer, pl_module, step)


def log_step(trainer: L.Trainer, ended: bool) -> int:
    """The ``step`` Lightning's own logs give the batch that just ended: its counter moves after the callbacks'
    ``on_train_batch_end``, and has moved once training has ended (``ended``)."""
    counter = trainer.fit_loop.epoch_loop._batches_that_stepped
    return counter - 1 if ended else counter


class Validation(EveryNSteps):
    """Upstream's validation: the module's ``validation_metrics`` averaged over the validation loader, logged to
    every logger (``val/...``), reported as a ``validation`` event, and ``checkpoints/best.ckpt`` written whenever
    ``monitor`` (lower is better) improves. Every rank evaluates the whole set with the same fixed random draws
    (seeded), so the numbers are comparable from one evaluation to the next and every rank agrees on the best; the
    training's random streams are left as they were. The best value so far is checkpointed, so a resumed run keeps
    comparing against it."""

    def __init__(self, loader: Any, every: int, monitor: str, ckpt_dir: Path, seed: int,
                 callback: Progress | None = None, final_step: int | None = None) -> None:
        super().__init__(every, self._validate, final_step=final_step)
        self.loader = loader
        self.monitor = monitor
        self.ckpt_dir = ckpt_dir
        self.seed = seed
        self.callback = callback
        self.best: float | None = None
        self.best_step: int | None = None

    def _validate(self, trainer: L.Trainer, pl_module: Any, step: int) -> None:
        was_training = pl_module.training
        pl_module.eval()
        rng = torch.get_rng_state()
        gen = torch.Generator().manual_seed(self.seed)
        sums: dict[str, float] = {}
        count = 0
        try:
            for batch in self.loader:
                batch = {k: v.to(pl_module.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
                n = len(next(iter(batch.values())))
                for k, v in pl_module.validation_metrics(batch, gen).items():
                    sums[k] = sums.get(k, 0.0) + v * n
                count += n
        finally:
            torch.set_rng_state(rng)
            if was_training:
                pl_module.train()
        metrics = {k: v / max(count, 1) for k, v in sums.items()}
        for logger in trainer.loggers:
            logger.log_metrics({**metrics, "epoch": trainer.current_epoch}, log_step(trainer, self.ended))
        value = metrics.get(self.monitor)
        improved = value is not None and math.isfinite(value) and (self.best is None or value < self.best)
        if improved:
            self.best, self.best_step = value, step
            trainer.save_checkpoint(self.ckpt_dir / "best.ckpt")
        if self.callback and trainer.is_global_zero:
            self.callback(TrainEvent("validation", step=step, metrics=metrics, monitor=self.monitor, best=self.best,
                                     best_step=self.best_step,
                                     path=str(self.ckpt_dir / "best.ckpt") if improved else None))

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_step": self.best_step, "monitor": self.monitor}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("monitor") == self.monitor:
            self.best, self.best_step = state_dict.get("best"), state_dict.get("best_step")


class SampleQuality(EveryNSteps):
    """FID (and KID, IS, precision/recall) of samples every ``every`` steps and at the end, on global rank zero:
    ``evaluator`` (:class:`ldmcli.training.quality.SampleEvaluator`) samples with fixed seeds, with the EMA weights, in
    eval mode, without gradients; the training's mode, weights and random streams are restored. The numbers are
    logged to every logger (``val/fid``, ...) and reported as an ``evaluation`` event."""

    def __init__(self, evaluator: Any, every: int, callback: Progress | None = None,
                 final_step: int | None = None) -> None:
        super().__init__(every, self._evaluate, final_step=final_step)
        self.evaluator = evaluator
        self.callback = callback

    def _evaluate(self, trainer: L.Trainer, pl_module: Any, step: int) -> None:
        if not trainer.is_global_zero:
            return
        from ldmcli.training.quality import evaluation_mode

        with evaluation_mode(pl_module, pl_module.net):
            result = self.evaluator(pl_module.net, step)
        for logger in trainer.loggers:
            logger.log_metrics({**result.metrics, "epoch": trainer.current_epoch}, log_step(trainer, self.ended))
        if self.callback:
            self.callback(TrainEvent("evaluation", step=step, metrics=result.metrics, examples=result.samples,
                                     seconds=result.seconds, path=str(result.folder)))
