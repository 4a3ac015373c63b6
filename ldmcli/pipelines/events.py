"""The typed events a pipeline reports while it runs. Pipelines never print: they call ``on_event(event)`` with one of
these, and whoever called them decides what to show (``ldm`` renders them with rich on a terminal, plain lines in a
log, JSON records with ``--json``; a Python caller may ignore them or collect them).

Generation runs (txt2img, sample, knn2img) report :class:`Started`, :class:`Step` and :class:`FileWritten`; runs
over input files (inpaint, upscale) report one :class:`ItemStarted` / :class:`ItemStep` (and :class:`ItemPatches`
when patch-wise) / :class:`ItemDone` | :class:`ItemSkipped` | :class:`ItemFailed` sequence per input. Any stage may
report :class:`Message` lines (loading, converting) and :class:`DownloadProgress`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Union

from ldmcli.output import WrittenFile


@dataclass(frozen=True)
class Message:
    """A stage line: "loading txt2img-f8-large", "writing model.safetensors", a conversion note. ``always``: worth
    showing in a log too (a download retry), not only on a terminal."""

    text: str
    always: bool = False


@dataclass(frozen=True)
class DownloadProgress:
    """The store's download progress: ``done`` of ``total`` bytes (None: unknown) of ``label``."""

    done: int
    total: int | None
    label: str


@dataclass(frozen=True)
class Started:
    """A generation run begins: how many sampler steps and images it will take (this process's share), and the
    run's seed (recorded in every image)."""

    steps_total: int
    images_total: int
    seed: int = 0


@dataclass(frozen=True)
class Step:
    """After every sampler step of a generation run."""

    steps_done: int
    steps_total: int
    images_done: int
    images_total: int


@dataclass(frozen=True)
class FileWritten:
    """A file is complete under its final name (a sample or a grid)."""

    file: WrittenFile
    steps_done: int
    steps_total: int
    images_done: int
    images_total: int


@dataclass(frozen=True)
class ItemStarted:
    """Input ``index`` (0-based) of ``total`` of a batch run begins."""

    index: int
    total: int
    name: str


@dataclass(frozen=True)
class ItemStep:
    """Sampler step ``step`` of ``steps`` of the current input."""

    index: int
    total: int
    step: int
    steps: int


@dataclass(frozen=True)
class ItemPatches:
    """Patch-wise runs (``ldm upscale`` of large inputs): ``done`` of ``patches`` patches of ``stage`` of input
    ``index`` (``"unet"``: within the current sampler step; ``"encode"``, ``"decode"``)."""

    index: int
    total: int
    stage: str
    done: int
    patches: int


@dataclass(frozen=True)
class ItemDone:
    """The output of input ``index`` is written (``record``: what ``--json`` reports for it)."""

    index: int
    total: int
    output: Path
    seconds: float
    record: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ItemSkipped:
    """Input ``index`` was not run: its output exists (resumable batches)."""

    index: int
    total: int
    output: Path
    reason: str


@dataclass(frozen=True)
class ItemFailed:
    """Input ``index`` failed; the batch goes on. ``message`` is one line naming the file."""

    index: int
    total: int
    path: Path
    message: str


Event = Union[Message, DownloadProgress, Started, Step, FileWritten, ItemStarted, ItemStep, ItemPatches, ItemDone,
              ItemSkipped, ItemFailed]
EventHandler = Callable[[Event], None]


def ignore(event: Event) -> None:
    """The default handler: report nothing."""


def messages(on_event: EventHandler) -> Callable[[str], None]:
    """A ``callback(text)`` (what :func:`ldmcli.loading.load` takes) that reports :class:`Message` events."""
    return lambda text: on_event(Message(text))


class _Downloads:
    """What the store takes as ``progress``: ``progress(done, total, label)`` and ``progress.notice(notice)`` (retries,
    waiting for another process), reported as :class:`DownloadProgress` and :class:`Message` events."""

    def __init__(self, on_event: EventHandler) -> None:
        self.on_event = on_event

    def __call__(self, done: int, total: int | None, label: str) -> None:
        self.on_event(DownloadProgress(done, total, label))

    def notice(self, notice: Any) -> None:
        self.on_event(Message(str(notice), always=True))


def downloads(on_event: EventHandler) -> _Downloads:
    """The store's ``progress`` argument, reporting through ``on_event``."""
    return _Downloads(on_event)
