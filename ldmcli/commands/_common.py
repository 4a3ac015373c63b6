"""Pieces shared by the commands: consoles, progress rendering, shared option types. Rich lives here, not in the library."""

from __future__ import annotations

import sys

from rich.console import Console


def stderr_console() -> Console:
    """Progress and messages go to stderr so stdout stays clean for ``--json``."""
    return Console(stderr=True, highlight=False)


def stdout_console() -> Console:
    return Console(highlight=False)


def is_interactive() -> bool:
    """True when stderr is a terminal: rich progress bars then; plain lines for cron logs otherwise."""
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False
