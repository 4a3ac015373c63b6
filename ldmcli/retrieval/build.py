"""``ldm build-index`` as a library call: resolve (or embed) a database, then build its searcher, reporting progress as
typed events that a command renders.

    report = run_build_index(IndexRequest("artbench-baroque"), on_event=print)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Union

from ldmcli.errors import UsageError
from ldmcli.retrieval.searcher import REORDER_DTYPES, BuildReport, SearcherOptions

#: what each phase of a build (or of loading a database for ``knn2img``) is called on screen
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
NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


@dataclass(frozen=True)
class Phase:
    """Progress of one phase (a key of :data:`PHASES`): ``done`` of ``total`` units."""

    name: str
    done: int
    total: int


@dataclass(frozen=True)
class Message:
    """A line for the user; ``warning`` ones say something went less well than asked."""

    text: str
    warning: bool = False


Event = Union[Phase, Message]


@dataclass
class IndexRequest:
    """One ``ldm build-index``: the database (a name, a folder, or with ``from_images`` the name of a new one embedded
    from that folder of images) and the searcher's options."""

    database: str
    options: SearcherOptions = field(default_factory=SearcherOptions)
    from_images: Path | None = None
    clip_path: Path | None = None  # a transformers CLIP folder (default: the store's)
    device: str | None = None
    batch_size: int = 16
    shard_size: int = 1024
    out_dir: Path | None = None  # default data/rdm/searchers/<name>


def validate(request: IndexRequest) -> None:
    """The checks that need no data: UsageError before anything is loaded."""
    o = request.options
    if not 0.0 < o.target_recall <= 1.0:
        raise UsageError("--target-recall must be in (0, 1]")
    if not 0.0 <= o.anisotropic_threshold or o.anisotropic_threshold != o.anisotropic_threshold:
        raise UsageError("--anisotropic-threshold must be a number >= 0")
    if o.leaves_to_search is not None and o.num_leaves is not None and o.leaves_to_search > o.num_leaves:
        raise UsageError("--leaves-to-search cannot exceed --num-leaves")
    if o.reorder_dtype not in ("auto", *REORDER_DTYPES):
        raise UsageError(f"--reorder-type must be auto, {', '.join(REORDER_DTYPES)}; got '{o.reorder_dtype}'")
    if o.shard_rows is not None and o.shard_rows < 1:
        raise UsageError("--shard-rows must be at least 1")
    if request.from_images is not None and (not request.database or request.database[0] in "._-"
                                            or not set(request.database) <= NAME_CHARS):
        raise UsageError(f"--from-images: '{request.database}' is not a valid database name (letters, digits, . _ -)")


def run_build_index(request: IndexRequest, on_event: Callable[[Event], None] | None = None) -> tuple[BuildReport, Path]:
    """Build the searcher of ``request.database`` (embedding it first with ``from_images``); returns the report and
    the database folder. Progress arrives as :class:`Phase` events, remarks as :class:`Message` events."""
    from ldmcli.retrieval.database import inspect_database, load_database, resolve_database
    from ldmcli.retrieval.searcher import build_index, check_memory

    emit = on_event or (lambda event: None)

    def progress(name: str, done: int, total: int) -> None:
        emit(Phase(name, done, total))

    def download(done: int, total: int | None, label: str) -> None:
        emit(Phase("download", done, total or max(done, 1)))

    validate(request)
    if request.from_images is not None:
        from ldmcli.devices import pick_device
        from ldmcli.models.clip import CLIP_ASSET, ClipEncoder
        from ldmcli.retrieval.embed import embed_image_folder, list_images

        list_images(request.from_images)  # fails fast on a missing or empty folder
        dev = pick_device(request.device)
        clip_dir = request.clip_path
        if clip_dir is None:
            from ldmcli import store

            clip_dir = store.ensure(CLIP_ASSET, progress=download)
        clip = ClipEncoder.from_pretrained(clip_dir, device=dev)
        folder = embed_image_folder(request.from_images, request.database, clip, batch_size=request.batch_size,
                                    shard_size=request.shard_size, callback=progress)
        name = request.database
    else:
        name, folder = resolve_database(request.database, progress=download)
    info = inspect_database(folder, name=name)  # headers only
    check_memory(len(info), info.dim, request.options)  # refuses before any data is read
    db = load_database(folder, name=name, callback=progress)
    report = build_index(db, options=request.options, out_dir=request.out_dir, callback=progress)
    if not report.met:
        emit(Message(f"could not reach recall@{report.recall_k} {report.target_recall:g}; the searcher keeps the best "
                     f"setting found ({report.recall:.3f}). Try a larger --max-reorder or --num-leaves.",
                     warning=True))
    return report, folder
