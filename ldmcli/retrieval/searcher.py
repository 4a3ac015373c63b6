"""ScaNN searchers over retrieval databases (Guo et al. 2020, "Accelerating Large-Scale Inference with Anisotropic
Vector Quantization"), chosen by database size as upstream's ``scripts/train_searcher.py`` does, then tuned until
recall@k against exact search reaches a target.

A saved searcher is ScaNN's own serialisation (relative paths, so the folder can move) plus ``ldm_searcher.json``:
the plan it was built with, the query-time defaults the tuning chose (reordering depth, leaves searched) and the
recall they reached. Searches made through :class:`Retriever` use those defaults.
"""

from __future__ import annotations

import contextlib
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
from ldmcli.retrieval.database import Database, Progress, load_database, normalized, resolve_database

#: upstream train_searcher's size thresholds
BRUTE_FORCE_BELOW = 20_000
TREE_FROM = 100_000
SEARCHER_JSON = "ldm_searcher.json"
FORMAT_VERSION = 1


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


def build_scann(data: np.ndarray, plan: SearcherPlan):
    """Build a ScaNN searcher (dot product) over unit-norm rows ``data`` following ``plan``."""
    import scann

    builder = scann.scann_ops_pybind.builder(data, plan.knn, "dot_product")
    if plan.kind == "brute_force":
        builder = builder.score_brute_force()
    else:
        if plan.kind == "tree_ah":
            builder = builder.tree(num_leaves=plan.num_leaves, num_leaves_to_search=plan.leaves_to_search,
                                   training_sample_size=plan.training_sample_size, spherical=bool(plan.spherical))
        builder = builder.score_ah(plan.dims_per_block,
                                   anisotropic_quantization_threshold=plan.anisotropic_threshold).reorder(plan.reorder)
    with quiet_native_logs():
        return builder.build()


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

    def to_json(self) -> dict:
        return asdict(self)


def searcher_dir(name: str) -> Path:
    """Where the searcher of database ``name`` lives: ``data/rdm/searchers/<name>``."""
    return paths.searchers_dir() / name


def _install_folder(tmp: Path, final: Path) -> None:
    """Move a complete folder into place, replacing an older one (moved aside first, deleted after)."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def build_index(database: Database, *, options: SearcherOptions | None = None, out_dir: Path | None = None,
                callback: Progress | None = None) -> BuildReport:
    """Build, tune and save the ScaNN searcher of ``database`` (upstream ``train_searcher`` plus a recall target).

    Phases reported through ``callback(phase, done, total)``: ``normalize``, ``train``, ``exact``, ``tune``, ``save``.
    The searcher is written to a temporary folder next to ``out_dir`` (default ``data/rdm/searchers/<name>``) and
    renamed into place only when complete.
    """
    o = options or SearcherOptions()
    if not 0.0 < o.target_recall <= 1.0:
        raise UsageError("--target-recall must be in (0, 1]")
    if o.recall_k < 1 or o.n_queries < 1:
        raise UsageError("--recall-k and --queries must be at least 1")
    n = len(database)
    plan = plan_searcher(n, o)
    out_dir = Path(out_dir) if out_dir is not None else searcher_dir(database.name)
    t0 = time.perf_counter()

    def report(phase: str, done: int, total: int) -> None:
        if callback is not None:
            callback(phase, done, total)

    report("normalize", 0, 1)
    data = normalized(database.embedding)
    report("normalize", 1, 1)
    report("train", 0, 1)
    searcher = build_scann(data, plan)
    report("train", 1, 1)

    rng = np.random.default_rng(o.seed)
    n_queries = min(o.n_queries, n)
    k = min(o.recall_k, n - 1) if n > 1 else 1
    self_index = np.sort(rng.choice(n, size=n_queries, replace=False))
    queries = data[self_index]
    report("exact", 0, 1)
    exact = _drop_self(exact_search(data, queries, k + 1), self_index, k)
    report("exact", 1, 1)
    if o.tune:
        result = tune_searcher(searcher, plan, n, queries, exact, k=k, target=o.target_recall,
                               max_reorder=o.max_reorder, self_index=self_index, callback=callback)
    else:
        r = measure_recall(searcher, queries, exact, k, self_index=self_index, pre_reorder=plan.reorder,
                           leaves=plan.leaves_to_search)
        result = TuneResult(plan.reorder, plan.leaves_to_search, r, r >= o.target_recall,
                            [TuneStep(plan.reorder, plan.leaves_to_search, r)])
    build_seconds = time.perf_counter() - t0

    report("save", 0, 1)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        with quiet_native_logs():
            searcher.serialize(str(tmp), relative_path=True)
        result_report = BuildReport(
            database=database.name, path=str(out_dir), n=n, dim=database.dim, plan=asdict(plan),
            pre_reorder_num_neighbors=result.pre_reorder, leaves_to_search=result.leaves, recall_k=k,
            recall=result.recall, target_recall=o.target_recall, met=result.met, n_queries=n_queries,
            build_seconds=build_seconds, tune_steps=[asdict(s) for s in result.steps])
        meta = {"format": FORMAT_VERSION, **result_report.to_json(), "path": None,
                "database_files": [f.name for f in database.files]}
        (tmp / SEARCHER_JSON).write_text(json.dumps(meta, indent=2) + "\n")
        _install_folder(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    report("save", 1, 1)
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
        if (folder / "scann_config.pb").is_file() or (folder / "scann_assets.pbtxt").is_file():
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
    """A saved ScaNN searcher and its stored query defaults (empty for searchers built elsewhere, e.g. upstream's)."""
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
    try:
        with quiet_native_logs(), contextlib.redirect_stdout(None):
            searcher = scann.scann_ops_pybind.load_searcher(str(folder))
    except (RuntimeError, ValueError, OSError) as e:
        raise SearcherError(f"cannot load the searcher in {folder}: {str(e).splitlines()[0] if str(e) else e!r} "
                            f"(rebuild it with 'ldm build-index {folder.name}')") from None
    return searcher, defaults
