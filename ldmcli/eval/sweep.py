"""``ldm eval model``: sample N images of a diffusion model and measure them (:mod:`ldmcli.eval.metrics`), for
one setting or a sweep over guidance scales, step counts and samplers.

Each setting gets its own folder ``OUTDIR/<sampler>-<steps>steps-scale<scale>/samples`` (resumable, see
:mod:`ldmcli.eval.sampling`); the table of every setting's numbers is written as ``OUTDIR/eval.json`` and
``OUTDIR/eval.csv``, and ``OUTDIR/eval.png`` plots FID and IS (and precision/recall when measured) against the
setting that varies. Files appear under their final names only when complete.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from ldmcli.errors import UsageError
from ldmcli.eval import fidelity
from ldmcli.eval.metrics import EventFn, _emit, download_progress, evaluate_samples, open_reference
from ldmcli.fileio import atomic_path, atomic_write_text

COLUMNS = ("sampler", "steps", "scale", "n_samples", "fid", "is_mean", "is_std", "kid_mean", "kid_std", "precision",
           "recall", "folder")


@dataclass
class SweepResult:
    rows: list[dict[str, Any]] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)


def parse_list(text: str, cast: Any, what: str) -> list[Any]:
    """``"1,2,3"`` → ``[1.0, 2.0, 3.0]`` with ``cast``; a bad or empty list is a UsageError naming ``what``."""
    try:
        values = [cast(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UsageError(f"{what} must be a comma-separated list, got {text!r}") from None
    if not values:
        raise UsageError(f"{what} is empty")
    return values


def setting_folder(outdir: Path, sampler: str, steps: int, scale: float) -> Path:
    return Path(outdir) / f"{sampler}-{steps}steps-scale{scale:g}"


def write_table(rows: Sequence[dict[str, Any]], outdir: Path) -> list[Path]:
    """``eval.json`` (every field) and ``eval.csv`` (:data:`COLUMNS`) in ``outdir``."""
    json_path = atomic_write_text(outdir / "eval.json", json.dumps(list(rows), indent=2, sort_keys=True) + "\n")
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in COLUMNS})
    return [json_path, atomic_write_text(outdir / "eval.csv", buffer.getvalue())]


def _varying(rows: Sequence[dict[str, Any]]) -> list[str]:
    return [k for k in ("scale", "steps", "sampler") if len({r[k] for r in rows}) > 1]


def plot(rows: Sequence[dict[str, Any]], path: Path) -> Path | None:
    """A PNG of each measured metric against the varying setting (the scale when none varies, so the picture
    always shows the table beside it); None when no metric was measured."""
    varying = _varying(rows) or ["scale"]
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    metrics = [m for m in ("fid", "is_mean", "precision", "recall") if any(r.get(m) is not None for r in rows)]
    if not metrics:
        return None
    numeric = len(varying) == 1 and varying[0] != "sampler"
    x_name = varying[0] if numeric else "setting"
    labels = [", ".join(f"{k}={r[k]}" for k in varying) for r in rows]
    fig = Figure(figsize=(4.0 * len(metrics), 3.4), dpi=100)
    for i, metric in enumerate(metrics, start=1):
        ax = fig.add_subplot(1, len(metrics), i)
        points = [(r[varying[0]] if numeric else j, r.get(metric)) for j, r in enumerate(rows)]
        points = sorted((x, y) for x, y in points if y is not None)
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o")
        if not numeric:
            ax.set_xticks(range(len(rows)), labels, rotation=45, ha="right", fontsize=7)
        ax.set_xlabel(x_name)
        ax.set_title({"is_mean": "IS"}.get(metric, metric.upper() if metric == "fid" else metric))
        ax.grid(alpha=0.3)
    fig.suptitle(f"{rows[0].get('model', '')}: {rows[0]['n_samples']} samples", fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


def evaluate_model(model: str, n: int, outdir: str | Path, *, ref: str | Path | None = None,
                   scales: Sequence[float] = (1.0,), steps: Sequence[int] = (50,), samplers: Sequence[str] = ("ddim",),
                   eta: float | None = None, seed: int = 0, batch_size: int = 16, eval_batch_size: int = 50,
                   device: torch.device | str = "cpu", precision: str = "fp32",
                   inception_weights: str | Path | None = None, on_event: EventFn | None = None) -> SweepResult:
    """Sample ``n`` images per setting (every combination of ``scales`` x ``steps`` x ``samplers``), measure each
    setting against ``ref`` and write the table (and plot) into ``outdir``. ``inception_weights``: as for
    :func:`~ldmcli.eval.metrics.evaluate_samples` (default: the store's)."""
    from ldmcli.eval.sampling import load_for_eval, sample_images, sample_settings

    if n < 1:
        raise UsageError(f"the number of samples must be at least 1, got {n}")
    if not scales or not steps or not samplers:
        raise UsageError("give at least one scale, step count and sampler")
    settings = list(itertools.product(samplers, steps, scales))
    for sampler, step, scale in settings:
        sample_settings(sampler, step, scale, eta)  # a bad sampler or step count fails before loading
    if ref is not None:
        open_reference(ref)
    fidelity.library()
    outdir = Path(outdir)
    loaded = load_for_eval(model, device, precision, progress=download_progress(on_event),
                           message=lambda text: _emit(on_event, "message", "model", message=text))
    result = SweepResult()
    for sampler, step, scale in settings:
        folder = setting_folder(outdir, sampler, step, scale)
        label = f"{sampler}, {step} steps, scale {scale:g}"
        _emit(on_event, "stage", "sampling", 0, n, message=f"sampling {n} images ({label}) into {folder}")
        sample_images(loaded, n, folder, scale=scale, steps=step, sampler=sampler, eta=eta, seed=seed,
                      batch_size=batch_size,
                      on_event=lambda done, total: _emit(on_event, "progress", "sampling", done, total))
        metrics = evaluate_samples(folder, ref, batch_size=eval_batch_size, device=device, limit=n,
                                   inception_weights=inception_weights, on_event=on_event)
        row = {"model": loaded.name, "sampler": sampler, "steps": step, "scale": scale, "folder": str(folder),
               **metrics.record()}
        result.rows.append(row)
        _emit(on_event, "message", "result", message=json.dumps(row, sort_keys=True))
    outdir.mkdir(parents=True, exist_ok=True)
    result.files = write_table(result.rows, outdir)
    picture = plot(result.rows, outdir / "eval.png")
    if picture is not None:
        result.files.append(picture)
    return result
