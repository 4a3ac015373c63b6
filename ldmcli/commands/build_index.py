"""``ldm build-index``: a ScaNN searcher for a retrieval database, tuned to a recall target; optionally the database
itself, embedded with CLIP from a folder of images."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional

import typer

from ldmcli.commands._common import is_interactive, stderr_console
from ldmcli.errors import UsageError

PHASES = {
    "download": "downloading",
    "load": "loading database",
    "embed": "embedding images with CLIP",
    "normalize": "normalising embeddings",
    "train": "training ScaNN searcher",
    "exact": "exact search for held-out queries",
    "tune": "tuning recall",
    "save": "saving searcher",
    "sample": "sampling",
}
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class PhaseProgress:
    """Renders ``callback(phase, done, total)`` on stderr: rich bars on a terminal, one line per phase otherwise.

    Bars are refreshed only from the callback (no background thread), so nothing is drawn while native code runs."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.console = stderr_console()
        self.interactive = is_interactive()
        self.progress = None
        self.tasks: dict[str, int] = {}
        self.announced: set[str] = set()

    def __enter__(self) -> "PhaseProgress":
        if self.enabled and self.interactive:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TimeElapsedColumn(), console=self.console, auto_refresh=False, transient=False)
            self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.progress is not None:
            self.progress.refresh()
            self.progress.stop()

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

    def download(self, done: int, total: int | None, label: str) -> None:
        """Adapter for the store's download progress ``(done, total, label)``."""
        self("download", done, total or max(done, 1))


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
    from ldmcli.retrieval.database import load_database, resolve_database
    from ldmcli.retrieval.searcher import SearcherOptions, build_index

    if not 0.0 < target_recall <= 1.0:
        raise UsageError("--target-recall must be in (0, 1]")
    if not 0.0 <= anisotropic_threshold or anisotropic_threshold != anisotropic_threshold:
        raise UsageError("--anisotropic-threshold must be a number >= 0")
    if leaves_to_search is not None and num_leaves is not None and leaves_to_search > num_leaves:
        raise UsageError("--leaves-to-search cannot exceed --num-leaves")
    options = SearcherOptions(knn=knn, brute_force_below=brute_force_below, tree_from=tree_from, num_leaves=num_leaves,
                              leaves_to_search=leaves_to_search, training_sample_size=training_sample_size,
                              reorder=reorder, anisotropic_threshold=anisotropic_threshold,
                              dims_per_block=dims_per_block, spherical=spherical, target_recall=target_recall, recall_k=recall_k,
                              n_queries=queries, max_reorder=max_reorder, tune=tune, seed=seed)
    with PhaseProgress(enabled=not quiet) as progress:
        if from_images is not None:
            from ldmcli.devices import pick_device
            from ldmcli.models.clip import ClipEncoder
            from ldmcli.retrieval.embed import embed_image_folder, list_images

            if not NAME_RE.match(database):
                raise UsageError(f"--from-images: '{database}' is not a valid database name (letters, digits, . _ -)")
            list_images(from_images)  # fails fast on a missing or empty folder
            dev = pick_device(device)
            clip = ClipEncoder.from_pretrained(clip_path, device=dev) if clip_path is not None else \
                ClipEncoder.from_pretrained(_store_clip(progress), device=dev)
            folder = embed_image_folder(from_images, database, clip, batch_size=batch_size, shard_size=shard_size,
                                        callback=progress)
            name = database
        else:
            name, folder = resolve_database(database, progress=progress.download)
        db = load_database(folder, name=name, callback=progress)
        report = build_index(db, options=options, callback=progress)

    if as_json:
        typer.echo(json.dumps({**report.to_json(), "database_path": str(folder)}, indent=2))
        return
    where = {"brute_force": "brute force", "ah": "asymmetric hashing + reordering",
             "tree_ah": "tree + asymmetric hashing + reordering"}[report.plan["kind"]]
    settings = []
    if report.pre_reorder_num_neighbors is not None:
        settings.append(f"reordering {report.pre_reorder_num_neighbors}")
    if report.leaves_to_search is not None:
        settings.append(f"{report.leaves_to_search} of {report.plan['num_leaves']} leaves searched")
    typer.echo(f"searcher for '{report.database}' ({report.n} points, {report.dim}-d, {where}) saved to {report.path}")
    typer.echo(f"recall@{report.recall_k} against exact search on {report.n_queries} held-out queries: "
              f"{report.recall:.3f} (target {report.target_recall:g})"
              + (f" with {', '.join(settings)}" if settings else ""))
    if not report.met:
        stderr_console().print(
            f"ldm: warning: could not reach recall@{report.recall_k} {report.target_recall:g}; the searcher keeps the "
            f"best setting found ({report.recall:.3f}). Try a larger --max-reorder or --num-leaves.")


def _store_clip(progress: PhaseProgress) -> Path:
    from ldmcli import store
    from ldmcli.models.clip import CLIP_ASSET

    return store.ensure(CLIP_ASSET, progress=progress.download)


def register(app: typer.Typer) -> None:
    app.command("build-index")(build_index_command)
