"""Rendering of pipeline events (:mod:`ldmcli.pipelines.events`) for every command: a rich progress bar on a terminal
(stderr), plain lines for logs, ``--json`` records on stdout."""

from __future__ import annotations

import json
import time
from typing import Any

import typer

from ldmcli.commands._common import is_interactive, stderr_console
from ldmcli.pipelines import events as ev


class Renderer:
    """Renders one command's events. Generation runs: one bar over all sampler steps with images/s, ``--json``
    records as files appear, a summary line at the end. Batch runs: a bar over inputs and one over the current
    input's steps on a terminal, one line per input otherwise; failures are always shown."""

    def __init__(self, *, as_json: bool = False, quiet: bool = False, prefix: str = "") -> None:
        self.as_json = as_json
        self.quiet = quiet
        self.prefix = prefix
        self.console = stderr_console()
        self.interactive = is_interactive() and not quiet
        self.progress: Any = None
        self.tasks: dict[str, Any] = {}
        self.started = time.perf_counter()
        self.images = 0
        self.grids = 0
        self.seed: int | None = None

    def __enter__(self) -> "Renderer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.refresh()
            self.progress.stop()
            self.progress = None

    # ------------------------------------------------------------------------------------------------ plumbing

    def line(self, text: str, *, always: bool = False) -> None:
        """A line on stderr (above a live bar); shown unless ``--quiet`` (``always``: errors)."""
        if self.quiet and not always:
            return
        console = self.progress.console if self.progress is not None else self.console
        console.print(text, markup=False, highlight=False, soft_wrap=True)

    def _bar(self, key: str, description: str, total: int | None) -> Any:
        if self.progress is None:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                       TimeRemainingColumn)

            self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                                     console=self.console, auto_refresh=False, transient=False)
            self.progress.start()
        if key not in self.tasks:
            self.tasks[key] = self.progress.add_task(description, total=total, rate="")
        return self.tasks[key]

    def _update(self, key: str, **fields: Any) -> None:
        self.progress.update(self.tasks[key], **fields)
        self.progress.refresh()

    # -------------------------------------------------------------------------------------------------- events

    def __call__(self, event: ev.Event) -> None:
        handler = getattr(self, f"_on_{type(event).__name__}", None)
        if handler is not None:
            handler(event)

    def _on_Message(self, e: ev.Message) -> None:
        if e.always:
            self.line(f"ldm: {self.prefix}{e.text}")
        elif self.interactive and self.progress is None:
            self.console.print(f"ldm: {self.prefix}{e.text}", style="dim", soft_wrap=True, markup=False)

    def _on_DownloadProgress(self, e: ev.DownloadProgress) -> None:
        if not self.interactive:
            return
        self._bar(f"download:{e.label}", f"downloading {e.label}", e.total or None)
        self._update(f"download:{e.label}", completed=e.done, total=e.total or None)

    def _on_Started(self, e: ev.Started) -> None:
        self.seed = e.seed
        self.started = time.perf_counter()
        if self.interactive:
            self._bar("sampling", f"{self.prefix}sampling", e.steps_total)
            self.progress.refresh()

    def _on_Step(self, e: ev.Step) -> None:
        if self.interactive:
            elapsed = max(time.perf_counter() - self.started, 1e-9)
            rate = f"{e.images_done / elapsed:.2f} images/s" if e.images_done else ""
            self._bar("sampling", f"{self.prefix}sampling", e.steps_total)
            self._update("sampling", completed=e.steps_done, total=e.steps_total, rate=rate)

    def _on_FileWritten(self, e: ev.FileWritten) -> None:
        if e.file.kind == "grid":
            self.grids += 1
        else:
            self.images += 1
        if self.as_json:
            typer.echo(json.dumps(e.file.record(), sort_keys=True))
        self._on_Step(ev.Step(e.steps_done, e.steps_total, e.images_done, e.images_total))

    def _on_ItemStarted(self, e: ev.ItemStarted) -> None:
        self.started = time.perf_counter()
        if self.interactive:
            self._bar("items", "images", e.total)
            self._bar("steps", e.name, None)
            self._update("steps", description=e.name, completed=0, total=None)

    def _on_ItemStep(self, e: ev.ItemStep) -> None:
        if self.interactive:
            self._bar("steps", "steps", e.steps)
            self._update("steps", completed=e.step, total=e.steps)

    def _where(self, index: int, total: int) -> str:
        return f"[{index + 1}/{total}] " if index >= 0 else ""

    def _advance(self, total: int) -> None:
        if self.interactive:
            self._bar("items", "images", total)
            self.progress.advance(self.tasks["items"])
            self.progress.refresh()

    def _on_ItemDone(self, e: ev.ItemDone) -> None:
        self._advance(e.total)
        if not self.interactive:
            self.line(f"ldm: {self._where(e.index, e.total)}wrote {e.output} ({e.seconds:.1f} s)")

    def _on_ItemSkipped(self, e: ev.ItemSkipped) -> None:
        self._advance(e.total)
        self.line(f"ldm: {self._where(e.index, e.total)}skipped {e.output} (exists; --overwrite replaces it)")

    def _on_ItemFailed(self, e: ev.ItemFailed) -> None:
        if e.index >= 0:
            self._advance(e.total)
        self.line(f"ldm: error: {e.message}", always=True)
