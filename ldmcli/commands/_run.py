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
