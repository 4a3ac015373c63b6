"""``ldm eval samples``: FID, Inception Score, KID and precision/recall of a set of images against a reference.

Features come from torch-fidelity's Inception (:mod:`ldmcli.eval.fidelity`), the numbers from torch-fidelity's
metric functions. The reference is a folder of real images, an ``.npz`` of images (``arr_0``, as ADM's reference
batches), or statistics (an ``.npz`` with ``mu`` and ``sigma``, e.g. one from the cache: then only FID can be
computed unless it also holds ``features``). A reference's features and statistics are cached in
``<data dir>/cache/eval/<key>.npz``, the key being the sha256 of the reference's content and of the Inception
weights, so the 50,000 reference images of a benchmark go through Inception once.

Progress and stages go to ``on_event(EvalEvent)``; nothing here prints.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch

from ldmcli import paths
from ldmcli.errors import UsageError
from ldmcli.eval import fidelity
from ldmcli.eval.images import ImageSet, content_hash, open_images
from ldmcli.fileio import atomic_path

CACHE_VERSION = 1
PR_NEIGHBOURS = 3


@dataclass(frozen=True)
class EvalEvent:
    """A stage starting (``kind="stage"``), progress over a stage's images (``"progress"``: ``done`` of ``total``),
    a download's bytes (``"download"``), or a line worth showing (``"message"``)."""

    kind: str
    stage: str
    done: int = 0
    total: int | None = None
    message: str = ""


EventFn = Callable[[EvalEvent], None]


def _emit(on_event: EventFn | None, *args: Any, **kwargs: Any) -> None:
    if on_event is not None:
        on_event(EvalEvent(*args, **kwargs))


def download_progress(on_event: EventFn | None) -> Callable[[int, int | None, str], None]:
    """The store's ``progress(done, total, label)`` as ``download`` events."""
    return lambda done, total, label: _emit(on_event, "download", label, done, total)


@dataclass
class FeatureSet:
    """Inception features of one image set: ``features`` ``[n, 2048]`` (None for statistics-only references),
    ``logits`` ``[n, 1008]`` (samples only, for IS) and the FID statistics."""

    count: int | None  # None: a statistics file that does not say
    stats: dict[str, np.ndarray]
    features: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    key: str | None = None
    cached: bool = False


class Inception:
    """The network, loaded on first use (a cached reference and a statistics file need none). Its weights are the
    store's ``inception`` asset, or ``weights`` (a file in torch-fidelity's format; one without the logits layer
    gives no Inception Score)."""

    def __init__(self, device: torch.device | str = "cpu", on_event: EventFn | None = None,
                 weights: str | Path | None = None) -> None:
        self.device = torch.device(device)
        self.on_event = on_event
        self.from_store = weights is None
        self.path = fidelity.weights_path(download_progress(on_event)) if weights is None else Path(weights)
        if weights is not None:
            fidelity.check_weights(self.path, from_store=False)  # a bad explicit file fails before any work
        self._net: torch.nn.Module | None = None
        self._sha: str | None = None

    @property
    def sha256(self) -> str:
        if self._sha is None:
            from ldmcli.pipelines.generation import cached_sha256

            self._sha = cached_sha256(self.path) or ""
        return self._sha

    def net(self) -> torch.nn.Module:
        if self._net is None:
            _emit(self.on_event, "stage", "inception", message="loading Inception")
            self._net = fidelity.load_inception(self.device, path=self.path, from_store=self.from_store)
        return self._net

    def extract(self, images: ImageSet, batch_size: int, stage: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``[n, 2048]`` features and ``[n, 1008]`` logits (None without a logits layer) of every image of the set."""
        _emit(self.on_event, "stage", stage, 0, len(images), message=f"Inception features of {images.source}")
        return self.extract_batches(images.batches(batch_size), len(images), stage)

    def extract_batches(self, batches: Iterable[np.ndarray], total: int | None,
                        stage: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Features and logits of ``[b, h, w, 3]`` uint8 batches, with ``progress`` events over ``total`` images."""
        net = self.net()
        feats, logits, done = [], [], 0
        for batch in batches:
            out = fidelity.inception_features(net, batch)
            feats.append(out["2048"])
            if fidelity.LOGITS in out:
                logits.append(out[fidelity.LOGITS])
            done += len(batch)
            _emit(self.on_event, "progress", stage, done, total)
        return torch.cat(feats), (torch.cat(logits) if logits else None)


def _save_npz(path: Path, **arrays: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            np.savez(handle, **arrays)


def cache_path(key: str) -> Path:
    return paths.cache_dir() / "eval" / f"{key}.npz"


def _read_stats_npz(path: Path) -> FeatureSet:
    with np.load(path) as data:
        if "mu" not in data.files or "sigma" not in data.files:
            raise UsageError(f"reference {path} holds neither arr_0 images nor mu/sigma statistics")
        mu, sigma = np.asarray(data["mu"], np.float64), np.asarray(data["sigma"], np.float64)
        feats = torch.from_numpy(np.asarray(data["features"], np.float32)) if "features" in data.files else None
        count = int(data["count"]) if "count" in data.files else (len(feats) if feats is not None else None)
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
        raise UsageError(f"reference {path}: mu must be [d] and sigma [d, d], got {mu.shape} and {sigma.shape}")
    return FeatureSet(count, {"mu": mu, "sigma": sigma}, feats, None, None, True)


def open_reference(ref: str | Path) -> ImageSet | Path:
    """Check the reference before any work: an image set, or the path of a statistics ``.npz``."""
    path = Path(ref).expanduser()
    if path.suffix.lower() == ".npz" and path.is_file():
        try:
            with np.load(path, mmap_mode="r") as data:
                if "arr_0" not in data.files:
                    if "mu" not in data.files or "sigma" not in data.files:
                        raise UsageError(f"reference {path} holds neither arr_0 images nor mu/sigma statistics")
                    return path
        except (OSError, ValueError) as e:
            raise UsageError(f"reference: cannot read {path}: {e}") from None
    return open_images(path, "reference")


def _npz_statistics(images: ImageSet) -> dict[str, np.ndarray] | None:
    """``mu``/``sigma`` stored beside ``arr_0`` (ADM's reference batches: statistics over the whole dataset, plus
    10,000 images for precision/recall), or None."""
    if images.npz is None:
        return None
    with np.load(images.npz, mmap_mode="r") as data:
        if "mu" not in data.files or "sigma" not in data.files:
            return None
        mu, sigma = np.asarray(data["mu"], np.float64), np.asarray(data["sigma"], np.float64)
    if mu.shape != (2048,) or sigma.shape != (2048, 2048):
        raise UsageError(f"reference {images.npz}: mu/sigma must be 2048-d Inception pool statistics, got "
                         f"{mu.shape} and {sigma.shape}")
    return {"mu": mu, "sigma": sigma}


def reference_features(ref: ImageSet | Path, inception: Inception, batch_size: int,
                       on_event: EventFn | None = None) -> FeatureSet:
    """The reference's features and statistics: from a statistics file, from the cache, or computed (and cached).
    An ``.npz`` holding both images and ``mu``/``sigma`` (ADM's reference batches) keeps its own statistics for FID,
    as ADM's evaluator does, and its images' features serve KID and precision/recall."""
    if isinstance(ref, Path):
        return _read_stats_npz(ref)
    stored = _npz_statistics(ref)
    found = _reference_features(ref, inception, batch_size, on_event)
    if stored is not None:
        found.stats, found.count = stored, None
    return found


def _reference_features(ref: ImageSet, inception: Inception, batch_size: int,
                        on_event: EventFn | None = None) -> FeatureSet:
    _emit(on_event, "stage", "hash", 0, len(ref), message=f"hashing the reference {ref.source}")
    return cached_reference(content_hash(ref), len(ref), str(ref.source), inception,
                            lambda: inception.extract(ref, batch_size, "reference")[0], on_event)


def cached_reference(content: str, count: int, source: str, inception: Inception,
                     extract: Callable[[], torch.Tensor], on_event: EventFn | None = None) -> FeatureSet:
    """The features of ``count`` reference images whose content hashes to ``content``: from the cache
    (``<data dir>/cache/eval/<key>.npz``, the key hashing ``content`` and the Inception weights), or ``extract()``-ed
    and cached. A damaged cache entry is recomputed; a read-only data dir only costs the cache."""
    digest = hashlib.sha256(f"ldm-eval-v{CACHE_VERSION}|{content}|{inception.sha256}".encode())
    key = digest.hexdigest()[:32]
    cached = cache_path(key)
    if cached.is_file():
        try:
            found = _read_stats_npz(cached)
            if found.features is not None and len(found.features) == count:
                found.key = key
                _emit(on_event, "message", "reference", message=f"reference features from the cache ({cached})")
                return found
        except (OSError, ValueError, UsageError):
            pass  # a damaged cache entry is recomputed and replaced
    feats = extract()
    stats = fidelity.fid_statistics(feats)
    try:
        _save_npz(cached, features=feats.numpy(), mu=stats["mu"], sigma=stats["sigma"], count=np.int64(len(feats)),
                  source=np.array(source))
    except OSError:
        pass
    return FeatureSet(len(feats), stats, feats, None, key, False)


def sample_features(samples: ImageSet, inception: Inception, batch_size: int) -> FeatureSet:
    feats, logits = inception.extract(samples, batch_size, "samples")
    return FeatureSet(len(feats), fidelity.fid_statistics(feats), feats, logits)


@dataclass
class SampleMetrics:
    """The numbers of ``ldm eval samples`` (None where a metric could not be computed; ``skipped`` says why)."""

    n_samples: int
    n_reference: int | None  # images behind the reference's features (None: statistics of unknown size)
    reference: str | None
    fid: float | None = None
    is_mean: float | None = None
    is_std: float | None = None
    kid_mean: float | None = None
    kid_std: float | None = None
    precision: float | None = None
    recall: float | None = None
    reference_key: str | None = None
    inception_sha256: str | None = None
    torch_fidelity: str | None = None
    seconds: float = 0.0
    skipped: dict[str, str] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        return dict(self.__dict__)


def summary_lines(record: dict[str, Any] | list[dict[str, Any]]) -> list[str]:
    """A result (or a sweep's rows) as ``key=value`` lines for people, with the skipped metrics and why."""
    lines = []
    for row in record if isinstance(record, list) else [record]:
        shown = {k: v for k, v in row.items() if v is not None and k != "skipped"}
        lines.append("  ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items()))
        lines.extend(f"  ({name} not computed: {why})" for name, why in (row.get("skipped") or {}).items())
    return lines


def compare(gen: FeatureSet, real: FeatureSet | None, metrics: SampleMetrics, kid_subsets: int = 100) -> None:
    """Fill ``metrics`` from two feature sets with torch-fidelity's functions (IS from ``gen``'s logits)."""
    if gen.logits is not None:
        metrics.is_mean, metrics.is_std = fidelity.inception_score(gen.logits)
    else:
        metrics.skipped["is"] = "the Inception weights have no logits layer"
    if real is None:
        return
    if gen.count < 2 or (real.count is not None and real.count < 2):
        metrics.skipped["fid"] = "needs at least 2 images on each side"
    else:
        metrics.fid = fidelity.fid(gen.stats, real.stats)
    if real.features is None or gen.features is None:
        for name in ("kid", "precision_recall"):
            metrics.skipped[name] = "the reference holds statistics only (no features)"
        return
    if min(len(gen.features), len(real.features)) < 2:
        metrics.skipped["kid"] = "needs at least 2 images on each side"
    else:
        metrics.kid_mean, metrics.kid_std = fidelity.kid(gen.features, real.features, subsets=kid_subsets)
    if min(len(gen.features), len(real.features)) <= PR_NEIGHBOURS:
        metrics.skipped["precision_recall"] = f"needs more than {PR_NEIGHBOURS} images on each side"
    else:
        metrics.precision, metrics.recall = fidelity.precision_recall(gen.features, real.features, PR_NEIGHBOURS)


def evaluate_samples(samples: str | Path, ref: str | Path | None = None, *, batch_size: int = 50,
                     device: torch.device | str = "cpu", kid_subsets: int = 100, limit: int | None = None,
                     inception_weights: str | Path | None = None, on_event: EventFn | None = None) -> SampleMetrics:
    """FID, IS, KID and precision/recall (k=3) of the images at ``samples`` (the first ``limit`` of them) against
    ``ref`` (IS only without one). Inputs are checked before anything is loaded; Inception's weights come from the
    store, or from ``inception_weights`` (a file in torch-fidelity's format; without its logits layer, no IS)."""
    if batch_size < 1:
        raise UsageError(f"batch size must be at least 1, got {batch_size}")
    started = time.perf_counter()
    gen_set = open_images(samples, "samples")
    if limit is not None:
        gen_set = gen_set.first(limit)
    ref_set = open_reference(ref) if ref is not None else None
    fidelity.library()  # a missing torch-fidelity is an error before any download
    inception = Inception(device, on_event, inception_weights)
    real = reference_features(ref_set, inception, batch_size, on_event) if ref_set is not None else None
    gen = sample_features(gen_set, inception, batch_size)
    n_ref = None if real is None else (len(real.features) if real.features is not None else real.count)
    metrics = SampleMetrics(gen.count, n_ref, str(ref) if ref is not None else None,
                            reference_key=real.key if real is not None else None,
                            inception_sha256=inception.sha256 or None, torch_fidelity=fidelity.library()["version"])
    compare(gen, real, metrics, kid_subsets)
    metrics.seconds = time.perf_counter() - started
    return metrics
