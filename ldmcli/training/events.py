"""What a training run reports while it runs: one event type, rendered by the commands (nothing here prints)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class TrainEvent:
    """One report of a training run. ``kind`` says which fields are set:

    * ``run_dir``: ``path`` (the run folder), ``learning_rate``, ``examples``, ``val_examples``, ``resumed_from``;
    * ``message`` / ``warning``: ``text`` (one line);
    * ``start``: ``step`` (where training starts), ``total`` (``max_steps`` or None);
    * ``step``: ``step``, ``total``, ``epoch``, ``loss``, ``steps_per_s`` after every optimizer step (rank 0);
    * ``checkpoint``: ``path``, ``step``, ``interrupted`` (Ctrl-C);
    * ``images``: ``path`` (the folder), ``step``;
    * ``validation``: ``step``, ``metrics`` (``val/...`` means), ``monitor``, ``best``, ``best_step``, and ``path``
      of ``best.ckpt`` when this evaluation improved on the best;
    * ``evaluation``: ``step``, ``metrics`` (``val/fid``, ``val/kid``, ...), ``examples`` (images sampled),
      ``seconds``, ``path`` (the folder of the samples);
    * ``download``: ``path`` (the file), ``done`` and ``total`` bytes (the Inception weights of FID evaluations);
    * ``extract``: ``path`` of an archive being unpacked (ImageNet preparation).
    """

    kind: str
    step: int | None = None
    total: int | None = None
    text: str | None = None
    path: str | None = None
    epoch: int | None = None
    loss: float | None = None
    steps_per_s: float | None = None
    learning_rate: float | None = None
    examples: int | None = None
    val_examples: int | None = None
    resumed_from: str | None = None
    interrupted: bool = False
    metrics: Mapping[str, float] | None = None
    monitor: str | None = None
    best: float | None = None
    best_step: int | None = None
    seconds: float | None = None
    done: int | None = None


Progress = Callable[[TrainEvent], None]
