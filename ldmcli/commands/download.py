"""``ldm download NAME [NAME...]``: fetch zoo entries (resumable, verified), list the zoo, re-verify downloads."""

from __future__ import annotations

import json
from typing import Optional

import typer

from ldmcli import download, store, zoo
from ldmcli.commands._download_progress import PlainProgress, RichProgress
from ldmcli.commands._common import is_interactive, stderr_console, stdout_console
from ldmcli.errors import UsageError

HELP = "Download zoo models, databases and assets (resumable, verified); --list shows the zoo."


def _list(entries: list[zoo.ZooEntry], as_json: bool) -> None:
    rows = store.listing(entries)
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
    bar = RichProgress(console) if is_interactive() and not quiet else None

    def progress(name: str) -> RichProgress | None:
        if bar is not None:
            bar.start(f"verifying {name}")
        return bar

    def show(report: store.VerifyReport) -> None:
        good = sum(f.status == "ok" for f in report.files)
        extra = "".join(f"\n  {f.status.upper()}: {f.path}" for f in report.bad)
        unrecorded = sum(f.status == "unrecorded" for f in report.files)
        note = f", {unrecorded} not in the manifest" if unrecorded else ""
        console.print(f"{report.name}: {'ok' if report.ok else 'FAILED'} ({good} file(s) match{note}){extra}",
                      markup=False, soft_wrap=True)

    try:
        reports = store.verify_entries(entries, only_recorded=not explicit, progress=progress,
                                       on_report=None if quiet else show)
    finally:
        if bar is not None:
            bar.stop()
    error = store.verification_error(reports)
    if error is not None:
        raise error
    if not quiet and not reports:
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
    renderer = None
    if not quiet:
        renderer = RichProgress(console) if is_interactive() else PlainProgress(console)
    several = len(store.with_assets(e.name for e in entries)) > 1

    def show(event: store.EntryEvent) -> None:
        if renderer is None:
            return
        renderer.start(event.name)
        if isinstance(renderer, PlainProgress):
            renderer.drop() if event.kind == "failed" else renderer.flush()
        if event.kind == "skipped":
            console.print(f"{event.name}: already complete ({event.path})", markup=False, soft_wrap=True)
        elif event.kind == "done":
            console.print(f"{event.name}: complete ({event.path})", markup=False, soft_wrap=True)
        elif event.kind == "failed" and several:
            console.print(f"{event.name}: FAILED: {event.error}", markup=False, soft_wrap=True)

    try:
        summary = store.download_entries([e.name for e in entries], force=force, progress=renderer, on_event=show)
    except KeyboardInterrupt:
        console.print("download interrupted: the partial file is kept, rerun the same command to resume",
                      markup=False, soft_wrap=True)
        raise
    finally:
        if renderer is not None:
            renderer.stop()
    error = summary.error()
    if error is not None:
        raise error


def register(app: typer.Typer) -> None:
    app.command("download", help=HELP)(download_command)
