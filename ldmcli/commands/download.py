"""``ldm download NAME [NAME...]``: fetch zoo entries (resumable, verified), list the zoo, re-verify downloads."""

from __future__ import annotations

import json
import time
from typing import Optional

import typer

from ldmcli import download, store, zoo
from ldmcli.commands._common import is_interactive, stderr_console, stdout_console
from ldmcli.errors import LdmError, UsageError

HELP = "Download zoo models, databases and assets (resumable, verified); --list shows the zoo."


class _PlainProgress:
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

    def stop(self) -> None:
        self.flush()


class _RichProgress:
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

    def stop(self) -> None:
        self.progress.stop()


def _entries_with_assets(entries: list[zoo.ZooEntry]) -> list[zoo.ZooEntry]:
    out: dict[str, zoo.ZooEntry] = {}
    for entry in entries:
        for asset in entry.assets:
            out.setdefault(asset, zoo.get(asset))
        out.setdefault(entry.name, entry)
    return list(out.values())


def _rows(entries: list[zoo.ZooEntry]) -> list[dict]:
    rows = []
    for e in entries:
        complete = store.is_complete(e.name)
        rows.append({
            "name": e.name,
            "kind": e.kind,
            "size": e.approx_size,
            "size_is_approximate": True,
            "downloaded": complete,
            "partial_bytes": 0 if complete else store.partial_bytes(e.name),
            "path": str(e.local_dir()),
            "checkpoint": e.checkpoint,
            "arch": e.arch,
            "assets": list(e.assets),
            "description": e.description,
        })
    return rows


def _list(entries: list[zoo.ZooEntry], as_json: bool) -> None:
    rows = _rows(entries)
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    from rich.table import Table

    table = Table(box=None, pad_edge=False)
    for column in ("name", "kind", "size", "downloaded", "description"):
        table.add_column(column, justify="right" if column == "size" else "left", no_wrap=True,
                         overflow="ellipsis")
    for r in rows:
        state = "yes" if r["downloaded"] else (f"partial ({download.human(r['partial_bytes'])})"
                                              if r["partial_bytes"] else "no")
        size = f"~{download.human(r['size'])}" if r["size"] is not None else "?"
        table.add_row(r["name"], r["kind"].replace("_", " "), size, state, r["description"])
    console = stdout_console()
    if not console.is_terminal:
        console.width = max(console.width, 160)  # pipes and files get whole lines, not wrapped cells
    console.print(table)


def _verify(entries: list[zoo.ZooEntry], explicit: bool, quiet: bool) -> None:
    console = stderr_console()
    recorded = download.read_manifest()["files"]
    failures: list[str] = []
    checked = 0
    for e in entries:
        if not explicit and not any(v.get("entry") == e.name for v in recorded.values()):
            continue
        bar = _RichProgress(console) if is_interactive() and not quiet else None
        try:
            if bar is not None:
                bar.start(f"verifying {e.name}")
            report = store.verify(e.name, progress=bar)
        finally:
            if bar is not None:
                bar.stop()
        checked += 1
        for f in report.bad:
            failures.append(f"{e.name}: {f.path} {f.status}")
        if not quiet:
            good = sum(f.status == "ok" for f in report.files)
            extra = "".join(f"\n  {f.status.upper()}: {f.path}" for f in report.bad)
            unrecorded = sum(f.status == "unrecorded" for f in report.files)
            note = f", {unrecorded} not in the manifest" if unrecorded else ""
            console.print(f"{e.name}: {'ok' if report.ok else 'FAILED'} ({good} file(s) match{note}){extra}",
                          markup=False, soft_wrap=True)
    if failures:
        names = " ".join(sorted({f.split(':')[0] for f in failures}))
        raise LdmError(f"{len(failures)} file(s) failed verification ({failures[0]}); "
                       f"run 'ldm download --force {names}'")
    if not quiet and checked == 0:
        console.print("nothing downloaded yet", markup=False, soft_wrap=True)


def download_command(
    names: Optional[list[str]] = typer.Argument(
        None, metavar="NAME", show_default=False,
        help="Zoo names (see --list) or groups: first-stages, ldms, all.",
    ),
    list_: bool = typer.Option(False, "--list", help="Show the zoo: name, kind, size, downloaded or not."),
    as_json: bool = typer.Option(False, "--json", help="Print the --list table as JSON on stdout (for scripts)."),
    force: bool = typer.Option(False, "--force", help="Download again even if complete."),
    verify: bool = typer.Option(False, "--verify", help="Re-check the sha256 of downloaded files; exit 1 on mismatch."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output."),
) -> None:
    """Download zoo entries into the data directory (resumes interrupted transfers; safe to run from cron)."""
    names = list(names or [])
    if verify and force:
        raise UsageError("--verify and --force cannot be combined (verify first, then --force what failed)")
    if (list_ or as_json) and (verify or force):
        raise UsageError("--list/--json cannot be combined with --verify or --force")
    entries = zoo.expand(names) if names else zoo.entries()  # unknown names fail here, before any work
    if list_ or as_json:
        _list(entries, as_json)
        return
    if verify:
        _verify(entries, explicit=bool(names), quiet=quiet)
        return
    if not names:
        raise UsageError("name at least one model or group to download (see 'ldm download --list')")

    console = stderr_console()
    todo = _entries_with_assets(entries)
    renderer = None
    if not quiet:
        renderer = _RichProgress(console) if is_interactive() else _PlainProgress(console)
    try:
        for entry in todo:
            if not force and store.is_complete(entry.name):
                if renderer is not None:
                    renderer.start(entry.name)
                    console.print(f"{entry.name}: already complete ({entry.local_dir()})", markup=False,
                                  soft_wrap=True)
                continue
            if renderer is not None:
                renderer.start(entry.name)
            store.ensure(entry.name, force=force, progress=renderer, with_assets=False)
            if isinstance(renderer, _PlainProgress):
                renderer.flush()
            if renderer is not None:
                console.print(f"{entry.name}: complete ({entry.local_dir()})", markup=False, soft_wrap=True)
    except KeyboardInterrupt:
        console.print("download interrupted: the partial file is kept, rerun the same command to resume",
                      markup=False, soft_wrap=True)
        raise
    finally:
        if renderer is not None:
            renderer.stop()


def register(app: typer.Typer) -> None:
    app.command("download", help=HELP)(download_command)
