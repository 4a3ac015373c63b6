"""Lightning callbacks of a training run: EMA, data order, checkpoints, image logs and progress reports.

Callbacks run in list order at the end of each batch: EMA update, then data-order bookkeeping, then the checkpoint,
so a checkpoint holds the state after the whole batch. Checkpoints are written through :class:`AtomicCheckpointIO`
(a temporary file in the same folder, then ``os.replace``), so a kill during a write leaves the previous file valid.
"""

from __future__ import annotations

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
from PIL import Image

from ldmcli.fileio import atomic_path
from ldmcli.training.data import ResumableSampler

Progress = Callable[[dict[str, Any]], None]


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

    def __init__(self, ckpt_dir: Path, every: int, keep_every: int = 0, callback: Progress | None = None) -> None:
        self.ckpt_dir = ckpt_dir
        self.every = every
        self.keep_every = keep_every
        self.callback = callback
        self.saved_step = -1

    def _save(self, trainer: L.Trainer, step: int, name: str = "last.ckpt") -> None:
        trainer.save_checkpoint(self.ckpt_dir / name)
        if self.callback and trainer.is_global_zero:
            self.callback({"event": "checkpoint", "path": str(self.ckpt_dir / name), "step": step})

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = pl_module.step
        if step == 0 or step == self.saved_step:  # still accumulating: no optimizer step since the last save
            return
        if self.keep_every and step % self.keep_every == 0:
            self._save(trainer, step, f"step-{step:07d}.ckpt")
        if self.every and step % self.every == 0:
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
                self.callback({"event": "checkpoint", "path": str(self.ckpt_dir / "last.ckpt"),
                               "step": pl_module.step, "interrupted": True})


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
            self.callback({"event": "images", "step": step, "folder": str(self.folder)})


class ProgressReporter(L.Callback):
    """Reports ``{"event": "step", "step", "total", "loss", "steps_per_s"}`` to the library callback (rank 0)."""

    def __init__(self, callback: Progress, total: int | None, every: int = 1) -> None:
        self.callback = callback
        self.total = total
        self.every = max(1, every)
        self._t0 = time.perf_counter()
        self._s0 = 0

    def on_train_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        self._t0, self._s0 = time.perf_counter(), pl_module.step
        if trainer.is_global_zero:
            self.callback({"event": "start", "step": self._s0, "total": self.total})

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = pl_module.step
        if not trainer.is_global_zero or step % self.every:
            return
        elapsed = time.perf_counter() - self._t0
        rate = (step - self._s0) / elapsed if elapsed > 0 else 0.0
        self.callback({"event": "step", "step": step, "total": self.total, "epoch": trainer.current_epoch,
                       "loss": pl_module.last_loss, "steps_per_s": rate})
