"""``ldm build-index``: a ScaNN searcher for a retrieval database, tuned to a recall target; optionally the database
itself, embedded with CLIP from a folder of images. The work is :func:`ldmcli.retrieval.build.run_build_index`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from ldmcli.commands._common import is_interactive, stderr_console
from ldmcli.retrieval.build import PHASES, Message, Phase  # PHASES is imported from here by commands/knn2img.py

__all__ = ["PHASES", "PhaseProgress", "build_index_command", "register"]


class PhaseProgress:
    """Renders build events on stderr: rich bars on a terminal, one line per phase otherwise (bars are refreshed
    only from events, so nothing is drawn while native code runs). Also callable as ``(phase, done, total)``."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled, self.console, self.progress = enabled, stderr_console(), None
        self.tasks: dict[str, int] = {}
        self.announced: set[str] = set()

    def __enter__(self) -> "PhaseProgress":
        if self.enabled and is_interactive():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TimeElapsedColumn(), console=self.console, auto_refresh=False, transient=False)
            self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.progress is not None:
            self.progress.refresh()
            self.progress.stop()

    def event(self, event: Phase | Message) -> None:
        if isinstance(event, Message):
            if event.warning or self.enabled:
                self.console.print(f"ldm: {'warning: ' if event.warning else ''}{event.text}")
        else:
            self(event.name, event.done, event.total)

    def __call__(self, phase: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        label = PHASES.get(phase, phase)
        if self.progress is not None:
            if phase not in self.tasks:
                self.tasks[phase] = self.progress.add_task(label, total=total)
            self.progress.update(self.tasks[phase], completed=done, total=total)
            self.progress.refresh()
        elif phase not in self.announced:
            self.announced.add(phase)
            self.console.print(f"ldm: {label}" + (f" ({total})" if total > 1 else ""))


def build_index_command(
    database: str = typer.Argument(..., help="openimages, artbench-<style>, a database name, or a folder of .npz "
                                             "files; with --from-images, the name of the new database."),
    from_images: Optional[Path] = typer.Option(None, "--from-images", help="Embed this folder of images with CLIP "
                                               "into a new database NAME first (resumable).", show_default=False),
    knn: int = typer.Option(20, "--knn", min=1, help="Default number of neighbours the searcher returns."),
    target_recall: float = typer.Option(0.95, "--target-recall", help="Raise reordering depth and leaves searched "
                                        "until recall@k against exact search reaches this."),
    recall_k: int = typer.Option(10, "--recall-k", min=1, help="k of the recall@k measurement."),
    queries: int = typer.Option(1000, "--queries", min=1, help="Held-out queries for the recall measurement."),
    max_reorder: int = typer.Option(2048, "--max-reorder", min=1, help="Deepest reordering tried while tuning."),
    tune: bool = typer.Option(True, "--tune/--no-tune", help="Tune toward --target-recall (else upstream's values)."),
    reorder_type: str = typer.Option("auto", "--reorder-type", help="Reordering data: int8, bfloat16, float32, or "
                                     "auto (the smallest that reaches --target-recall)."),
    shard_rows: int = typer.Option(1_000_000, "--shard-rows", min=1, help="Build in shards of at most this many "
                                   "rows (bounds memory; queries merge the shards' top k exactly)."),
    max_memory: Optional[float] = typer.Option(None, "--max-memory", show_default=False, help="GB the build may "
                                               "use (default: the RAM available); a larger estimate is refused."),
    brute_force_below: int = typer.Option(20_000, "--brute-force-below", min=1,
                                          help="Brute-force search under this many points."),
    tree_from: int = typer.Option(100_000, "--tree-from", min=1,
                                  help="Tree partitioning from this many points (AH + reordering below)."),
    num_leaves: Optional[int] = typer.Option(None, "--num-leaves", min=1, help="Tree leaves (default: sqrt(N)).",
                                             show_default=False),
    leaves_to_search: Optional[int] = typer.Option(None, "--leaves-to-search", min=1,
                                                   help="Leaves searched (default: num_leaves/20).", show_default=False),
    training_sample_size: Optional[int] = typer.Option(None, "--training-sample-size", min=1,
                                                       help="Tree training sample (default: N/10).", show_default=False),
    reorder: Optional[int] = typer.Option(None, "--reorder", min=1, help="Reordering depth (default: 2*knn).",
                                          show_default=False),
    anisotropic_threshold: float = typer.Option(0.2, "--anisotropic-threshold",
                                                help="Anisotropic quantization threshold of AH."),
    dims_per_block: int = typer.Option(2, "--dims-per-block", min=1, help="Dimensions per AH block."),
    spherical: bool = typer.Option(True, "--spherical/--no-spherical", help="Spherical k-means for the tree "
                                   "(--no-spherical: upstream's plain k-means)."),
    seed: int = typer.Option(0, "--seed", help="Seed for choosing held-out queries."),
    batch_size: int = typer.Option(16, "--batch-size", min=1, help="Images per CLIP batch (--from-images)."),
    shard_size: int = typer.Option(1024, "--shard-size", min=1, help="Images per .npz shard (--from-images)."),
    clip_path: Optional[Path] = typer.Option(None, "--clip", help="A transformers CLIP folder (default: the store's "
                                             "clip-vit-large-patch14).", show_default=False),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:N or mps (default: best available).",
                                         show_default=False),
    as_json: bool = typer.Option(False, "--json", help="Print the build report as JSON on stdout."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress on stderr."),
) -> None:
    """Build the ScaNN searcher of a retrieval database and report its recall@k against exact search."""
    from ldmcli.errors import UsageError
    from ldmcli.retrieval.build import IndexRequest, run_build_index
    from ldmcli.retrieval.searcher import SearcherOptions

    if max_memory is not None and not max_memory > 0:
        raise UsageError("--max-memory must be a number of GB above 0")
    options = SearcherOptions(
        knn=knn, brute_force_below=brute_force_below, tree_from=tree_from, num_leaves=num_leaves,
        leaves_to_search=leaves_to_search, training_sample_size=training_sample_size, reorder=reorder,
        anisotropic_threshold=anisotropic_threshold, dims_per_block=dims_per_block, spherical=spherical,
        target_recall=target_recall, recall_k=recall_k, n_queries=queries, max_reorder=max_reorder, tune=tune,
        seed=seed, reorder_dtype=reorder_type, shard_rows=shard_rows,
        memory_limit=None if max_memory is None else int(max_memory * 1e9))
    request = IndexRequest(database, options, from_images=from_images, clip_path=clip_path, device=device,
                           batch_size=batch_size, shard_size=shard_size)
    with PhaseProgress(enabled=not quiet) as progress:
        report, folder = run_build_index(request, on_event=progress.event)

    if as_json:
        typer.echo(json.dumps({**report.to_json(), "database_path": str(folder)}, indent=2))
        return
    where = {"brute_force": "brute force", "ah": "asymmetric hashing + reordering",
             "tree_ah": "tree + asymmetric hashing + reordering"}[report.plan["kind"]]
    settings = [f"{report.reorder_dtype} reordering {report.pre_reorder_num_neighbors}"] \
        if report.pre_reorder_num_neighbors is not None else []
    if report.leaves_to_search is not None:
        settings.append(f"{report.leaves_to_search} of {report.plan['num_leaves']} leaves searched")
    shards = f", {len(report.shards)} shards" if len(report.shards) > 1 else ""
    typer.echo(f"searcher for '{report.database}' ({report.n} points, {report.dim}-d, {where}{shards}) saved to "
               f"{report.path} ({report.searcher_bytes / 1e9:.2f} GB, about the RAM it takes to query)")
    typer.echo(f"recall@{report.recall_k} against exact search on {report.n_queries} held-out queries: "
               f"{report.recall:.3f} (target {report.target_recall:g})"
               + (f" with {', '.join(settings)}" if settings else ""))


def register(app: typer.Typer) -> None:
    app.command("build-index")(build_index_command)
