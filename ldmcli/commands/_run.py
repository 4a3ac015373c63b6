"""Running a pipeline from a command: request errors shown with option names, the torchrun rank prefix, and the
closing line of a generation run (also after Ctrl-C)."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any, Iterator, Mapping

from ldmcli.commands._render import Renderer
from ldmcli.errors import RequestError, UsageError


@contextlib.contextmanager
def options(flags: Mapping[str, str]) -> Iterator[None]:
    """Show request errors with the option that sets the field (``n_samples`` -> ``--n_samples``)."""
    try:
        yield
    except RequestError as e:
        if e.field in flags:
            raise UsageError(e.for_option(flags[e.field])) from None
        raise


def rank_prefix() -> str:
    """``[rank R] `` under torchrun with more than one process."""
    from ldmcli.pipelines.generation import torchrun_env

    env = torchrun_env()
    return f"[rank {env.rank}] " if env.world_size > 1 else ""


def summary(r: Renderer, outdir: Path, seconds: float | None = None, seed: int | None = None,
            interrupted: bool = False) -> None:
    """The closing line of a generation run (also after Ctrl-C, with what was kept)."""
    r.stop()
    if r.quiet and not interrupted:
        return
    seconds = time.perf_counter() - r.started if seconds is None else seconds
    seed = r.seed if seed is None else seed
    rate = f", {r.images / seconds:.2f} images/s" if seconds > 0 and r.images else ""
    grids = f" and {r.grids} grid{'s' if r.grids != 1 else ''}" if r.grids else ""
    what = "interrupted: kept" if interrupted else "wrote"
    seed_text = f"; seed {seed}" if seed is not None else ""
    r.console.print(f"ldm: {r.prefix}{what} {r.images} image{'s' if r.images != 1 else ''}{grids} in {outdir} "
                    f"({seconds:.1f} s{rate}{seed_text})", soft_wrap=True, markup=False)


def run_generation(renderer: Renderer, outdir: Path, work: Any) -> Any:
    """Run a generation pipeline with its renderer; on Ctrl-C say how many images were kept, then let the CLI exit
    130."""
    try:
        result = work()
    except KeyboardInterrupt:
        summary(renderer, outdir, interrupted=True)
        raise
    summary(renderer, outdir, result.seconds, result.seed)
    return result


def finish_batch(report: Any, *, noun: str, as_json: bool, quiet: bool) -> None:
    """The end of a batch run over input files (inpaint, upscale): the ``--json`` report or a summary line, then
    exit 1 naming how many inputs failed (each was reported as it happened)."""
    import json

    import typer

    from ldmcli.commands._common import stderr_console
    from ldmcli.errors import LdmError

    if as_json:
        typer.echo(json.dumps({
            "written": report.written,
            "skipped": [str(item.output) for item in report.skipped],
            "failed": [{"path": str(p.path), "error": p.message} for p in report.failed],
            "seed": report.seed,
        }, indent=2))
    elif not quiet and (report.written or report.skipped or report.failed):
        summary = f"ldm: {len(report.written)} written, {len(report.skipped)} skipped"
        stderr_console().print(summary + (f", {len(report.failed)} failed" if report.failed else "") +
                               f" (seed {report.seed})", markup=False, highlight=False, soft_wrap=True)
    if report.failed:
        total = report.total
        raise LdmError(f"{len(report.failed)} of {total} {noun}{'s' if total != 1 else ''} failed (reported above)")
