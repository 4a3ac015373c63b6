"""ScaNN searchers over retrieval databases (Guo et al. 2020, "Accelerating Large-Scale Inference with Anisotropic
Vector Quantization"), chosen by database size as upstream's ``scripts/train_searcher.py`` does, then tuned until
recall@k against exact search reaches a target.

A saved searcher is ScaNN's own serialisation (relative paths, so the folder can move) whose config carries the
query-time defaults the tuning chose (reordering depth, leaves searched), so plain ScaNN
(``scann.scann_ops_pybind.load_searcher(path).search_batched(q, final_num_neighbors=k)``) retrieves as well as ldm,
plus ``ldm_searcher.json``: the plan, the report of the build and the recall reached.

Memory is bounded: the rows are normalised chunk by chunk into a temporary float32 file, and a database larger than
``shard_rows`` is built as several shards, one at a time, each its own ScaNN searcher (``shard-000/``, ...) over a
contiguous range of rows; a query searches every shard and the results are merged exactly by score
(:class:`ShardedSearcher`). The reordering data is stored in the smallest type (int8, bfloat16, float32) that reaches
the recall target.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import shutil
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from ldmcli import paths
from ldmcli.errors import LdmError, UsageError
from ldmcli.retrieval.database import (Database, Progress, RowFile, load_database, normalize_to_file, normalized,
                                       resolve_database)

#: upstream train_searcher's size thresholds
BRUTE_FORCE_BELOW = 20_000
TREE_FROM = 100_000
SEARCHER_JSON = "ldm_searcher.json"
FORMAT_VERSION = 2
#: reordering data types, smallest first, and their bytes per value
REORDER_DTYPES = ("int8", "bfloat16", "float32")
REORDER_BYTES = {"int8": 1, "bfloat16": 2, "float32": 4}
#: rows per shard by default: a 1M x 768 shard builds in ~4 GB
DEFAULT_SHARD_ROWS = 1_000_000
#: the memory model of a build (measured, see README "Retrieval"): interpreter and libraries, plus per row of the
#: largest shard this many times its float32 size (ScaNN's copy, the residuals, the serialisation, the mapped rows)
BASE_BYTES = 800_000_000
SHARD_FACTOR = 4.0


class SearcherError(LdmError):
    """A searcher that is missing, stale or unreadable."""


@dataclass
class SearcherOptions:
    """Every choice of the build, ``None`` meaning "as upstream's train_searcher for this size"."""

    knn: int = 20  # the searcher's default number of neighbours (upstream --knn)
    brute_force_below: int = BRUTE_FORCE_BELOW
    tree_from: int = TREE_FROM
    num_leaves: int | None = None  # sqrt(N)
    leaves_to_search: int | None = None  # num_leaves // 20
    training_sample_size: int | None = None  # N // 10
    reorder: int | None = None  # 2 * knn
    anisotropic_threshold: float = 0.2
    dims_per_block: int = 2
    spherical: bool = True  # spherical k-means for the tree (upstream: False); the embeddings are unit vectors
    # tuning
    target_recall: float = 0.95
    recall_k: int = 10
    n_queries: int = 1000
    max_reorder: int = 2048
    tune: bool = True
    seed: int = 0
    # memory
    reorder_dtype: str = "auto"  # the smallest of REORDER_DTYPES meeting target_recall, or one of them
    shard_rows: int | None = None  # DEFAULT_SHARD_ROWS
    trial_rows: int = 200_000  # smaller reordering types are first screened on this many rows of a larger shard
    memory_limit: int | None = None  # bytes a build may use (default: the RAM available now)


@dataclass
class SearcherPlan:
    """The concrete ScaNN configuration for one database size."""

    kind: str  # "brute_force" | "ah" | "tree_ah"
    knn: int
    reorder: int | None = None
    anisotropic_threshold: float | None = None
    dims_per_block: int | None = None
    num_leaves: int | None = None
    leaves_to_search: int | None = None
    training_sample_size: int | None = None
    spherical: bool | None = None


def plan_searcher(n: int, options: SearcherOptions | None = None) -> SearcherPlan:
    """Upstream's choice by size: brute force under ``brute_force_below`` points, asymmetric hashing with reordering
    under ``tree_from``, above that a partitioning tree (√N leaves, 1/20 of them searched, N/10 training points)
    in front of AH (anisotropic threshold 0.2, 2 dimensions per block) and reordering (2k).

    One deliberate difference: the tree's k-means is spherical by default (``spherical=False`` restores upstream's).
    The rows are unit vectors searched by dot product; plain k-means centroids of mixed clusters have small norms and
    lose the dot-product ranking of leaves, which on clustered data costs recall that only searching most leaves
    recovers."""
    o = options or SearcherOptions()
    if o.knn < 1:
        raise UsageError("--knn must be at least 1")
    if n < o.brute_force_below:
        return SearcherPlan("brute_force", o.knn)
    reorder = o.reorder if o.reorder is not None else 2 * o.knn
    if reorder < 1 or o.dims_per_block < 1:
        raise UsageError("--reorder and --dims-per-block must be at least 1")
    if n < o.tree_from:
        return SearcherPlan("ah", o.knn, reorder, o.anisotropic_threshold, o.dims_per_block)
    num_leaves = o.num_leaves if o.num_leaves is not None else int(math.sqrt(n))
    if not 1 <= num_leaves <= n:
        raise UsageError(f"--num-leaves must be between 1 and the database size ({n})")
    leaves = o.leaves_to_search if o.leaves_to_search is not None else max(num_leaves // 20, 1)
    if not 1 <= leaves <= num_leaves:
        raise UsageError(f"--leaves-to-search must be between 1 and --num-leaves ({num_leaves})")
    sample = o.training_sample_size if o.training_sample_size is not None else n // 10
    sample = min(max(sample, num_leaves), n)
    return SearcherPlan("tree_ah", o.knn, reorder, o.anisotropic_threshold, o.dims_per_block, num_leaves, leaves,
                        sample, o.spherical)


@contextlib.contextmanager
def quiet_native_logs() -> Iterator[None]:
    """Send what ScaNN's C++ logging writes to file descriptor 2 to a discarded temp file for the duration."""
    import sys

    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):
        yield
        return
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def build_scann(data: np.ndarray, plan: SearcherPlan, reorder_dtype: str | None = "float32"):
    """Build a ScaNN searcher (dot product) over unit-norm rows ``data`` following ``plan``, its reordering data
    stored as ``reorder_dtype`` (int8, bfloat16 or float32). ScaNN copies ``data`` into its own float32 dataset."""
    import scann
    from scann.scann_ops.py.scann_builder import ReorderType

    builder = scann.scann_ops_pybind.builder(data, plan.knn, "dot_product")
    if plan.kind == "brute_force":
        builder = builder.score_brute_force()
    else:
        if plan.kind == "tree_ah":
            builder = builder.tree(num_leaves=plan.num_leaves, num_leaves_to_search=plan.leaves_to_search,
                                   training_sample_size=plan.training_sample_size, spherical=bool(plan.spherical))
        quantize = {"int8": ReorderType.INT8, "bfloat16": ReorderType.BFLOAT16}.get(reorder_dtype or "float32",
                                                                                      ReorderType.FLOAT32)
        builder = builder.score_ah(plan.dims_per_block, anisotropic_quantization_threshold=plan.anisotropic_threshold)
        builder = builder.reorder(plan.reorder, quantize=quantize)
    try:
        with quiet_native_logs():
            return builder.build()
    finally:
        builder.db = None  # the builder keeps a reference to the rows otherwise


def exact_search(data: np.ndarray, queries: np.ndarray, k: int, *, chunk: int = 16384) -> np.ndarray:
    """Indices ``[Q, k]`` of the k largest dot products, best first, by chunked matrix products."""
    k = min(k, data.shape[0])
    best_scores = np.full((queries.shape[0], 0), -np.inf, dtype=np.float32)
    best_index = np.zeros((queries.shape[0], 0), dtype=np.int64)
    for start in range(0, data.shape[0], chunk):
        block = np.asarray(data[start: start + chunk], dtype=np.float32)
        rows = np.broadcast_to(np.arange(start, start + block.shape[0]), (queries.shape[0], block.shape[0]))
        scores = np.concatenate([best_scores, queries @ block.T], axis=1)
        index = np.concatenate([best_index, rows], axis=1)
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        best_scores = np.take_along_axis(scores, top, axis=1)
        best_index = np.take_along_axis(index, top, axis=1)
    order = np.argsort(-best_scores, axis=1, kind="stable")
    return np.take_along_axis(best_index, order, axis=1)


def _drop_self(neighbours: np.ndarray, self_index: np.ndarray | None, k: int) -> np.ndarray:
    """First k neighbours of each row, the query's own row left out (leave-one-out evaluation)."""
    if self_index is None:
        return neighbours[:, :k]
    rows = []
    for row, own in zip(neighbours, self_index):
        rows.append(row[row != own][:k])
    return np.stack(rows)


def recall_at_k(approx: np.ndarray, exact: np.ndarray) -> float:
    """Mean fraction of the exact k neighbours that the approximate search found."""
    k = exact.shape[1]
    hits = sum(len(set(a.tolist()) & set(e.tolist())) for a, e in zip(approx, exact))
    return hits / (k * exact.shape[0])


def measure_recall(searcher, queries: np.ndarray, exact: np.ndarray, k: int, *, self_index: np.ndarray | None = None,
                   pre_reorder: int | None = None, leaves: int | None = None) -> float:
    """recall@k of ``searcher`` against exact neighbours ``exact`` (``[Q, k]``, self already removed)."""
    extra = 0 if self_index is None else 1
    final = k + extra
    pre = None if pre_reorder is None else max(pre_reorder, final)
    idx, _ = searcher.search_batched(queries, final_num_neighbors=final, pre_reorder_num_neighbors=pre,
                                     leaves_to_search=leaves)
    return recall_at_k(_drop_self(np.asarray(idx), self_index, k), exact)


@dataclass
class TuneStep:
    pre_reorder: int | None
    leaves: int | None
    recall: float


@dataclass
class TuneResult:
    pre_reorder: int | None
    leaves: int | None
    recall: float
    met: bool
    steps: list[TuneStep] = field(default_factory=list)


def _ladder(start: int, stop: int) -> list[int]:
    values = [start]
    while values[-1] < stop:
        values.append(min(values[-1] * 2, stop))
    return values


def tune_searcher(searcher, plan: SearcherPlan, n: int, queries: np.ndarray, exact: np.ndarray, *, k: int,
                  target: float, max_reorder: int, self_index: np.ndarray | None = None, plateau: float = 0.005,
                  callback: Progress | None = None) -> TuneResult:
    """Raise the reordering depth (doubling, up to ``max_reorder``; for a tree only while each doubling still gains
    ``plateau`` recall), then the leaves searched (doubling, up to all leaves), until recall@k reaches ``target``.
    The first setting that does is returned, else the best seen."""
    if plan.kind == "brute_force":
        candidates = [(None, None)]
    else:
        reorders = _ladder(plan.reorder, max(plan.reorder, min(max_reorder, n)))
        leaves = _ladder(plan.leaves_to_search, plan.num_leaves) if plan.kind == "tree_ah" else [None]
        candidates = [(r, l) for l in leaves for r in reorders]
    steps: list[TuneStep] = []
    best = None
    skip_leaves: int | None = None
    for i, (r, l) in enumerate(candidates):
        if l is not None and l == skip_leaves:
            continue  # deeper reordering stopped helping at this many leaves: search more leaves instead
        rec = measure_recall(searcher, queries, exact, k, self_index=self_index, pre_reorder=r, leaves=l)
        previous = steps[-1] if steps and steps[-1].leaves == l else None
        steps.append(TuneStep(r, l, rec))
        if callback is not None:
            callback("tune", i + 1, len(candidates))
        if best is None or rec > best.recall:
            best = steps[-1]
        if rec >= target:
            if callback is not None:
                callback("tune", len(candidates), len(candidates))
            return TuneResult(r, l, rec, True, steps)
        if previous is not None and rec - previous.recall < plateau and l is not None:
            skip_leaves = l
    if callback is not None:
        callback("tune", len(candidates), len(candidates))
    return TuneResult(best.pre_reorder, best.leaves, best.recall, False, steps)


@dataclass
class BuildReport:
    """What ``build_index`` built and how well it retrieves."""

    database: str
    path: str
    n: int
    dim: int
    plan: dict
    pre_reorder_num_neighbors: int | None
    leaves_to_search: int | None
    recall_k: int
    recall: float
    target_recall: float
    met: bool
    n_queries: int
    build_seconds: float
    tune_steps: list[dict]
    reorder_dtype: str | None = None  # the reordering data kept (None: brute force)
    dtype_trials: list[dict] = field(default_factory=list)  # recall each reordering type reached (on shard 0)
    shards: list[dict] = field(default_factory=list)  # [{"path", "start", "rows"}]; one entry: no sharding
    searcher_bytes: int = 0  # size of the saved searcher: about the RAM it takes at query time
    memory_estimate_bytes: int = 0  # the estimated peak of the build
    memory_limit_bytes: int | None = None  # what the build was allowed

    def to_json(self) -> dict:
        return asdict(self)


def searcher_dir(name: str) -> Path:
    """Where the searcher of database ``name`` lives: ``data/rdm/searchers/<name>``."""
    return paths.searchers_dir() / name


def has_searcher(folder: Path) -> bool:
    """True when ``folder`` holds a saved searcher: ScaNN's own files, or the shards listed by ``ldm_searcher.json``."""
    folder = Path(folder)
    return ((folder / "scann_config.pb").is_file() or (folder / "scann_assets.pbtxt").is_file()
            or (folder / SEARCHER_JSON).is_file() and (folder / "shard-000").is_dir())


def _install_folder(tmp: Path, final: Path) -> None:
    """Move a complete folder into place, replacing an older one (moved aside first, deleted after)."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def shard_bounds(n: int, shard_rows: int) -> list[int]:
    """Row boundaries ``[0, ..., n]`` of ``ceil(n / shard_rows)`` shards of (nearly) equal size."""
    if shard_rows < 1:
        raise UsageError("--shard-rows must be at least 1")
    count = max(1, -(-n // shard_rows))
    return [n * i // count for i in range(count + 1)]


def estimate_build_memory(n: int, dim: int, shard_rows: int, *, n_queries: int = 1000) -> int:
    """Estimated peak resident memory (bytes) of building a searcher over ``n`` x ``dim`` rows in shards of at most
    ``shard_rows`` rows: interpreter and libraries, ``SHARD_FACTOR`` times the float32 size of the largest shard, and
    the held-out queries with their exact-search buffers."""
    bounds = shard_bounds(n, shard_rows)
    largest = max(b - a for a, b in zip(bounds, bounds[1:]))
    return int(BASE_BYTES + SHARD_FACTOR * largest * dim * 4 + n_queries * (dim * 4 + 16384 * 12))


def available_memory() -> int | None:
    """Bytes of RAM available to a new allocation now (``MemAvailable``), None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _gb(nbytes: float) -> str:
    return f"{nbytes / 1e9:.1f} GB"


def check_memory(n: int, dim: int, options: SearcherOptions) -> tuple[int, int | None]:
    """``(estimate, limit)`` of a build's memory; a UsageError (with the estimate, and the shard size that would fit)
    when the estimate exceeds the limit (``options.memory_limit``, else the RAM available now)."""
    shard_rows = options.shard_rows or DEFAULT_SHARD_ROWS
    estimate = estimate_build_memory(n, dim, shard_rows, n_queries=min(options.n_queries, n))
    limit = options.memory_limit if options.memory_limit is not None else available_memory()
    if limit is not None and estimate > limit:
        fits = int((limit - estimate_build_memory(1, dim, 1, n_queries=min(options.n_queries, n)))
                   / (SHARD_FACTOR * dim * 4))
        hint = (f"shards of at most {fits:,} rows would fit (--shard-rows)" if fits >= 1000
                else "not even small shards fit; free memory or use a larger machine")
        raise UsageError(f"building the searcher of {n:,} x {dim} rows in shards of {min(shard_rows, n):,} rows needs "
                         f"about {_gb(estimate)} of RAM but {_gb(limit)} is available; {hint}")
    return estimate, limit


def set_query_defaults(folder: Path, *, pre_reorder: int | None, leaves: int | None) -> None:
    """Rewrite the saved ScaNN config in ``folder`` so that its default reordering depth and leaves searched are the
    given ones (what plain ScaNN uses when a search names neither). Atomic: temp file, then rename."""
    from scann.proto import scann_pb2

    from ldmcli.fileio import atomic_write_bytes

    path = Path(folder) / "scann_config.pb"
    config = scann_pb2.ScannConfig()
    config.ParseFromString(path.read_bytes())
    if pre_reorder is not None and config.HasField("exact_reordering"):
        config.exact_reordering.approx_num_neighbors = int(pre_reorder)
    if leaves is not None and config.HasField("partitioning"):
        config.partitioning.query_spilling.max_spill_centers = int(leaves)
    atomic_write_bytes(path, config.SerializeToString(), fsync=False)


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def _shard_rows_of(path: Path, start: int, stop: int, dim: int) -> np.memmap:
    """Rows ``[start, stop)`` of the normalised float32 file, mapped on their own (unmapped when dropped)."""
    return np.memmap(path, dtype=np.float32, mode="r", offset=start * dim * 4, shape=(stop - start, dim))


def _build_shard(path: Path, start: int, stop: int, dim: int, plan: SearcherPlan, reorder_dtype: str | None):
    rows = _shard_rows_of(path, start, stop, dim)
    try:
        return build_scann(rows, plan, reorder_dtype)
    finally:
        del rows
        gc.collect()


def _save(searcher, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with quiet_native_logs():
        searcher.serialize(str(folder), relative_path=True)


def _escalations(pre: int | None, leaves: int | None, plan: SearcherPlan, max_reorder: int) -> list[tuple]:
    """Settings tried on the merged shards, from the one tuned on the first shard upward."""
    if plan.kind == "brute_force":
        return [(None, None)]
    out = []
    for r_mult, l_mult in ((1, 1), (2, 1), (2, 2), (4, 2), (4, 4), (8, 8)):
        r = max(pre, min(pre * r_mult, max_reorder))
        l = None if leaves is None else min(leaves * l_mult, plan.num_leaves)
        if (r, l) not in out:
            out.append((r, l))
    return out


def _tune_merged(shard_dirs: list[Path], starts: list[int], plan: SearcherPlan, first: TuneResult,
                 queries: np.ndarray, exact: np.ndarray, self_index: np.ndarray, k: int, target: float,
                 max_reorder: int, callback: Progress | None) -> TuneResult:
    """Recall of the merged shards for the first shard's tuned setting and a few deeper ones, loading one shard at a
    time; the first that reaches ``target`` (else the best)."""
    import scann

    candidates = _escalations(first.pre_reorder, first.leaves, plan, max_reorder)
    found: list[list[tuple[np.ndarray, np.ndarray]]] = [[] for _ in candidates]
    for i, (folder, start) in enumerate(zip(shard_dirs, starts)):
        if callback is not None:
            callback("tune", i, len(shard_dirs))
        with quiet_native_logs(), contextlib.redirect_stdout(None):
            searcher = scann.scann_ops_pybind.load_searcher(str(folder))
        for j, (r, l) in enumerate(candidates):
            idx, dist = searcher.search_batched(queries, final_num_neighbors=k + 1,
                                                pre_reorder_num_neighbors=None if r is None else max(r, k + 1),
                                                leaves_to_search=l)
            found[j].append((np.asarray(idx, dtype=np.int64) + start, np.asarray(dist)))
        del searcher
        gc.collect()
    steps, best = [], None
    for (r, l), parts in zip(candidates, found):
        idx, _ = merge_top_k(parts, k + 1)
        rec = recall_at_k(_drop_self(idx, self_index, k), exact)
        steps.append(TuneStep(r, l, rec))
        if best is None or rec > best.recall:
            best = steps[-1]
        if rec >= target:
            best = steps[-1]
            break
    if callback is not None:
        callback("tune", len(shard_dirs), len(shard_dirs))
    return TuneResult(best.pre_reorder, best.leaves, best.recall, best.recall >= target, first.steps + steps)


def merge_top_k(parts: list[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by score (larger is better) of several searches' ``(indices, scores)`` ``[Q, k_i]``, already in
    one index space; ties keep the earlier part first."""
    idx = np.concatenate([p[0] for p in parts], axis=1)
    dist = np.concatenate([p[1] for p in parts], axis=1)
    order = np.argsort(-dist, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(idx, order, axis=1), np.take_along_axis(dist, order, axis=1)


class ShardedSearcher:
    """Several saved ScaNN searchers over contiguous row ranges, searched as one: each shard returns its own top k
    and the results are merged exactly by score, so the answer is the top k of the union of the shards' answers."""

    def __init__(self, shards: list[tuple[object, int]], num_neighbors: int = 10) -> None:
        self.shards = shards
        self.num_neighbors = num_neighbors

    def search_batched(self, queries, final_num_neighbors=None, pre_reorder_num_neighbors=None,
                       leaves_to_search=None):
        k = final_num_neighbors or self.num_neighbors
        parts = []
        for searcher, start in self.shards:
            idx, dist = searcher.search_batched(queries, final_num_neighbors=k,
                                                pre_reorder_num_neighbors=pre_reorder_num_neighbors,
                                                leaves_to_search=leaves_to_search)
            parts.append((np.asarray(idx, dtype=np.int64) + start, np.asarray(dist)))
        return merge_top_k(parts, k)


def build_index(database: Database, *, options: SearcherOptions | None = None, out_dir: Path | None = None,
                callback: Progress | None = None) -> BuildReport:
    """Build, tune and save the ScaNN searcher of ``database`` (upstream ``train_searcher`` plus a recall target and
    bounded memory).

    Before any work the memory the build needs is estimated (:func:`check_memory`); a build that will not fit is a
    UsageError. The rows are normalised chunk by chunk into a temporary float32 file (in a temporary folder next to
    ``out_dir``, default ``data/rdm/searchers/<name>``; rows with NaN or infinity are a UsageError naming them), held-
    out queries get their exact neighbours by a chunked pass over that file, then the shards are built one at a time.
    On the first shard each reordering type is tried, smallest first, each tuned (reordering depth, then leaves) to
    the target; the first to reach it is kept for every shard (on a shard larger than ``trial_rows``, the smaller
    types are first screened on that many rows, and those that miss the target there are not built in full).
    Several shards are then tuned together (merged top-k).
    The tuned settings become the defaults of each saved ScaNN config. The folder is renamed into place only when
    complete; the temporary folder is removed whatever happens.

    Phases reported through ``callback(phase, done, total)``: ``normalize``, ``exact``, ``train``, ``tune``, ``save``.
    """
    o = options or SearcherOptions()
    if not 0.0 < o.target_recall <= 1.0:
        raise UsageError("--target-recall must be in (0, 1]")
    if o.recall_k < 1 or o.n_queries < 1:
        raise UsageError("--recall-k and --queries must be at least 1")
    if o.reorder_dtype not in ("auto", *REORDER_DTYPES):
        raise UsageError(f"reordering type must be auto or one of {', '.join(REORDER_DTYPES)}, got {o.reorder_dtype}")
    n, dim = len(database), database.dim
    bounds = shard_bounds(n, o.shard_rows or DEFAULT_SHARD_ROWS)
    plan = plan_searcher(max(b - a for a, b in zip(bounds, bounds[1:])), o)
    estimate, limit = check_memory(n, dim, o)
    out_dir = Path(out_dir) if out_dir is not None else searcher_dir(database.name)
    t0 = time.perf_counter()

    def report(phase: str, done: int, total: int) -> None:
        if callback is not None:
            callback(phase, done, total)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        rows_path = work / "normalized.f32"
        report("normalize", 0, n)
        normalize_to_file(database.embedding, rows_path, name=database.name, callback=callback)
        rows = RowFile(rows_path, (n, dim))

        rng = np.random.default_rng(o.seed)
        n_queries = min(o.n_queries, n)
        k = min(o.recall_k, n - 1) if n > 1 else 1
        self_index = np.sort(rng.choice(n, size=n_queries, replace=False))
        data = np.memmap(rows_path, dtype=np.float32, mode="r", shape=(n, dim))
        queries = np.array(data[self_index])
        del data
        report("exact", 0, 1)
        exact = _drop_self(exact_search(rows, queries, k + 1), self_index, k)
        report("exact", 1, 1)

        searcher_tmp = work / "searcher"
        starts = bounds[:-1]
        shard_dirs = [searcher_tmp] if len(starts) == 1 else \
            [searcher_tmp / f"shard-{i:03d}" for i in range(len(starts))]
        if len(starts) == 1:
            self0, exact0 = self_index, exact
        else:  # the first shard alone: exact neighbours among its rows
            self0 = np.where(self_index < bounds[1], self_index, -1)
            exact0 = _drop_self(exact_search(rows.rows(0, bounds[1]), queries, k + 1), self0, k)
        n0 = bounds[1]
        dtypes: tuple[str | None, ...] = (None,) if plan.kind == "brute_force" else \
            (o.reorder_dtype,) if o.reorder_dtype != "auto" else REORDER_DTYPES if o.tune else ("float32",)
        trials, result, chosen = [], None, None
        if len(dtypes) > 1 and o.tune and n0 > o.trial_rows:
            # screen the smaller types on the first trial_rows rows: one that misses the target there misses it on a
            # whole shard too (recall at a given setting falls as a shard grows), and a screen costs a fraction
            m = o.trial_rows
            sample_plan = plan_searcher(m, o)
            self_m = np.where(self_index < m, self_index, -1)
            exact_m = _drop_self(exact_search(rows.rows(0, m), queries, k + 1), self_m, k)
            kept = []
            for dtype in dtypes[:-1]:
                report("train", 0, len(starts))
                searcher = _build_shard(rows_path, 0, m, dim, sample_plan, dtype)
                screen = tune_searcher(searcher, sample_plan, m, queries, exact_m, k=k, target=o.target_recall,
                                       max_reorder=o.max_reorder, self_index=self_m, callback=callback)
                del searcher
                gc.collect()
                trials.append({"reorder_dtype": dtype, "rows": m, "pre_reorder_num_neighbors": screen.pre_reorder,
                               "leaves_to_search": screen.leaves, "recall": screen.recall, "met": screen.met})
                if screen.met:
                    kept.append(dtype)
            dtypes = (*kept, dtypes[-1])
        for dtype in dtypes:
            report("train", 0, len(starts))
            searcher = _build_shard(rows_path, 0, n0, dim, plan, dtype)
            if o.tune:
                result = tune_searcher(searcher, plan, n0, queries, exact0, k=k, target=o.target_recall,
                                       max_reorder=o.max_reorder, self_index=self0, callback=callback)
            else:
                r = measure_recall(searcher, queries, exact0, k, self_index=self0, pre_reorder=plan.reorder,
                                   leaves=plan.leaves_to_search)
                result = TuneResult(plan.reorder, plan.leaves_to_search, r, r >= o.target_recall,
                                    [TuneStep(plan.reorder, plan.leaves_to_search, r)])
            trials.append({"reorder_dtype": dtype, "rows": n0, "pre_reorder_num_neighbors": result.pre_reorder,
                           "leaves_to_search": result.leaves, "recall": result.recall, "met": result.met})
            if result.met or dtype == dtypes[-1]:
                chosen = dtype
                report("save", 0, len(starts))
                _save(searcher, shard_dirs[0])
                del searcher
                gc.collect()
                break
            del searcher
            gc.collect()
        for i in range(1, len(starts)):
            report("train", i, len(starts))
            searcher = _build_shard(rows_path, bounds[i], bounds[i + 1], dim, plan, chosen)
            report("save", i, len(starts))
            _save(searcher, shard_dirs[i])
            del searcher
            gc.collect()
        report("train", len(starts), len(starts))
        if len(starts) > 1:
            result = _tune_merged(shard_dirs, starts, plan, result, queries, exact, self_index, k, o.target_recall,
                                  o.max_reorder, callback)
        for folder in shard_dirs:
            set_query_defaults(folder, pre_reorder=result.pre_reorder, leaves=result.leaves)
        build_seconds = time.perf_counter() - t0

        shards = [{"path": "." if len(starts) == 1 else folder.name, "start": int(a), "rows": int(b - a)}
                  for folder, a, b in zip(shard_dirs, bounds, bounds[1:])]
        result_report = BuildReport(
            database=database.name, path=str(out_dir), n=n, dim=dim, plan=asdict(plan),
            pre_reorder_num_neighbors=result.pre_reorder, leaves_to_search=result.leaves, recall_k=k,
            recall=result.recall, target_recall=o.target_recall, met=result.met, n_queries=n_queries,
            build_seconds=build_seconds, tune_steps=[asdict(s) for s in result.steps], reorder_dtype=chosen,
            dtype_trials=trials, shards=shards, searcher_bytes=_folder_bytes(searcher_tmp),
            memory_estimate_bytes=estimate, memory_limit_bytes=limit)
        meta = {"format": FORMAT_VERSION, **result_report.to_json(), "path": None,
                "database_files": [f.name for f in database.files]}
        (searcher_tmp / SEARCHER_JSON).write_text(json.dumps(meta, indent=2) + "\n")
        _install_folder(searcher_tmp, out_dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report("save", len(starts), len(starts))
    return result_report


@dataclass
class Neighbours:
    """Result of a retrieval: row indices ``[B, k]``, unit-norm embeddings ``[B, k, D]`` (float32), the normalised
    queries ``[B, D]``, and the metadata of the rows where readable."""

    indices: np.ndarray
    embeddings: np.ndarray
    queries: np.ndarray
    img_ids: np.ndarray | None = None
    patch_coords: np.ndarray | None = None


class Retriever:
    """A database with its searcher: k nearest neighbours of CLIP embeddings, as upstream knn2img's ``Searcher``.

    Queries and returned embeddings are L2-normalised as upstream; searches use the defaults stored by
    ``build_index`` (reordering depth scaled with k, leaves searched)."""

    def __init__(self, database: Database, searcher, defaults: dict | None = None) -> None:
        self.database = database
        self.searcher = searcher
        self.defaults = defaults or {}

    @classmethod
    def open(cls, spec: str | os.PathLike, *, expected_dim: int | None = None, build_below: int = BRUTE_FORCE_BELOW,
             callback: Progress | None = None) -> "Retriever":
        """Load a database and its saved searcher. Without a searcher, one is fitted on the fly (brute force) when
        the database has fewer than ``build_below`` points, as upstream; otherwise a SearcherError names the
        ``ldm build-index`` command to run."""
        name, folder = resolve_database(spec)
        database = load_database(folder, name=name, expected_dim=expected_dim, callback=callback)
        return cls.for_database(database, build_below=build_below, callback=callback)

    @classmethod
    def for_database(cls, database: Database, *, build_below: int = BRUTE_FORCE_BELOW,
                     callback: Progress | None = None) -> "Retriever":
        folder = searcher_dir(database.name)
        if has_searcher(folder):
            return cls(database, *load_searcher(folder, expected_rows=len(database)))
        if len(database) < build_below:
            if callback is not None:
                callback("train", 0, 1)
            searcher = build_scann(normalized(database.embedding), SearcherPlan("brute_force", 20))
            if callback is not None:
                callback("train", 1, 1)
            return cls(database, searcher, {})
        raise SearcherError(f"database '{database.name}' has {len(database)} points and no searcher; "
                            f"build one first with 'ldm build-index {database.name}'")

    def __len__(self) -> int:
        return len(self.database)

    def search(self, queries, k: int) -> Neighbours:
        """The k nearest neighbours (dot product of unit vectors) of each query ``[B, D]`` (or ``[B, 1, D]``)."""
        x = queries.detach().cpu().numpy() if hasattr(queries, "detach") else np.asarray(queries)
        if x.ndim == 3:
            x = x[:, 0]
        x = x.astype(np.float32)
        if not 1 <= k <= len(self.database):
            raise UsageError(f"cannot retrieve {k} neighbours from database '{self.database.name}' "
                             f"of {len(self.database)} points")
        q = x / np.linalg.norm(x, axis=1, keepdims=True)
        pre = self.defaults.get("pre_reorder_num_neighbors")
        recall_k = self.defaults.get("recall_k") or k
        if pre is not None:
            pre = max(int(pre), int(math.ceil(pre * k / recall_k)), k)
        leaves = self.defaults.get("leaves_to_search")
        idx, _ = self.searcher.search_batched(q, final_num_neighbors=k, pre_reorder_num_neighbors=pre,
                                              leaves_to_search=leaves)
        idx = np.asarray(idx, dtype=np.int64)
        emb = np.asarray(self.database.embedding[idx.reshape(-1)], dtype=np.float32).reshape(*idx.shape, -1)
        emb = emb / np.linalg.norm(emb, axis=-1, keepdims=True)
        return Neighbours(idx, emb, q, self.database.metadata("img_id", idx),
                          self.database.metadata("patch_coords", idx))


def load_searcher(folder: Path, *, expected_rows: int | None = None) -> tuple[object, dict]:
    """A saved searcher (a ScaNN searcher, or a :class:`ShardedSearcher` over the shards ``ldm_searcher.json``
    lists) and its stored report (empty for searchers built elsewhere, e.g. by upstream's train_searcher.py)."""
    import scann

    defaults: dict = {}
    meta_path = folder / SEARCHER_JSON
    if meta_path.is_file():
        try:
            defaults = json.loads(meta_path.read_text())
        except (OSError, ValueError) as e:
            raise SearcherError(f"unreadable {meta_path}: {e}") from None
        if expected_rows is not None and defaults.get("n") not in (None, expected_rows):
            raise SearcherError(f"the searcher in {folder} was built for {defaults['n']} points but the database "
                                f"now has {expected_rows}; rebuild it with 'ldm build-index {folder.name}'")
    shards = defaults.get("shards") or [{"path": ".", "start": 0}]
    loaded = []
    for shard in shards:
        path = (folder / shard["path"]).resolve()
        if folder.resolve() not in (path, *path.parents):
            raise SearcherError(f"{meta_path} names a shard outside {folder}")
        try:
            with quiet_native_logs(), contextlib.redirect_stdout(None):
                loaded.append((scann.scann_ops_pybind.load_searcher(str(path)), int(shard["start"])))
        except (RuntimeError, ValueError, OSError) as e:
            raise SearcherError(f"cannot load the searcher in {path}: {str(e).splitlines()[0] if str(e) else e!r} "
                                f"(rebuild it with 'ldm build-index {folder.name}')") from None
    if len(loaded) == 1:
        return loaded[0][0], defaults
    return ShardedSearcher(loaded, num_neighbors=(defaults.get("plan") or {}).get("knn", 10)), defaults
