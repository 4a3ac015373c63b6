"""What a batch run over input files (inpaint, upscale) reports when it ends."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class BatchReport:
    """Outputs written (with their records), inputs skipped (their output exists: resumable runs), inputs failed
    (each with a one-line reason naming the file), the run's seed and how many inputs it was given."""

    written: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[Any] = field(default_factory=list)
    failed: list[Any] = field(default_factory=list)
    seed: int = 0
    total: int = 0
