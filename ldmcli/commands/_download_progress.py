"""Renderers of download progress for ``ldm download``: one plain line per finished file (pipes, cron logs) or a
rich bar per file on a terminal; both show the store's notices (retries, waiting for a lock) as lines."""

from __future__ import annotations

import time

from ldmcli import download


class PlainProgress:
    """One line per finished file on stderr (for cron logs): name, size, time, speed."""

    def __init__(self, console) -> None:
        self.console = console
        self.label = ""
        self.current: str | None = None
        self.first = 0
        self.done = 0
        self.total: int | None = None
        self.started = 0.0

    def start(self, label: str) -> None:
        self.label = label

    def __call__(self, done: int, total: int | None, name: str) -> None:
        if name != self.current or done < self.done:
            self.flush()
            self.current, self.first, self.started = name, done, time.monotonic()
        self.done, self.total = done, total
        if total is not None and done >= total:
            self.flush()

    def drop(self) -> None:
        """Forget the file in progress (its transfer failed: the error says what is kept)."""
        self.current = None

    def flush(self) -> None:
        if self.current is None:
            return
        seconds = max(time.monotonic() - self.started, 1e-6)
        moved = self.done - self.first
        resumed = f", resumed at {download.human(self.first)}" if self.first else ""
        extracting = self.current.startswith("extracting ")
        what = f"extracted {self.current.removeprefix('extracting ')}" if extracting else f"downloaded {self.current}"
        speed = download.human(int(moved / seconds))
        self.console.print(f"{self.label}: {what} {download.human(self.done)} in {seconds:.1f} s "
                           f"({speed}/s{resumed})", markup=False, soft_wrap=True)
        self.current = None

    def notice(self, notice: download.Notice) -> None:
        self.console.print(f"{self.label}: {notice}", markup=False, highlight=False, soft_wrap=True)

    def stop(self) -> None:
        self.flush()


class RichProgress:
    """A rich progress bar per file (bytes, speed, ETA) on a terminal."""

    def __init__(self, console) -> None:
        from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                                   TransferSpeedColumn)

        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                                 TransferSpeedColumn(), TimeRemainingColumn(), console=console, transient=False)
        self.label = ""
        self.tasks: dict[str, int] = {}
        self.progress.start()

    def start(self, label: str) -> None:
        self.label = label

    def __call__(self, done: int, total: int | None, name: str) -> None:
        key = f"{self.label}: {name}"
        if key not in self.tasks:
            self.tasks[key] = self.progress.add_task(key, total=total, completed=done)
        self.progress.update(self.tasks[key], completed=done, total=total)

    def notice(self, notice: download.Notice) -> None:
        self.progress.console.print(f"{self.label}: {notice}", markup=False, highlight=False, soft_wrap=True)

    def stop(self) -> None:
        self.progress.stop()
