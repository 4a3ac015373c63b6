"""Writing generated images: upstream's layout, names claimed atomically, settings stored in every PNG.

Layout (as the upstream scripts)::

    OUTDIR/samples/00000.png, 00001.png, ...     one file per image
    OUTDIR/grid-0000.png, grid-0001.png, ...     one grid per run

Numbering continues after the highest number already in the folder and nothing is ever overwritten. Each file is
encoded completely into a hidden temporary file in the same folder, then *hard-linked* to its final name:
``os.link`` fails if the name exists, so two processes writing into one folder at the same time (two cron jobs,
torchrun ranks) can never take the same name, and a final name never shows a partial file. The temporary file is
removed afterwards (also on Ctrl-C). On file systems without hard links the claim falls back to a lock file in the
folder around "check the name is free, then ``os.replace``".

Every PNG carries its settings as JSON in the ``ldmcli`` text chunk (:func:`read_metadata`), so an image can be
reproduced from itself.

Output problems surface before any work: :func:`check_output_folder` writes and removes a probe file in the folder
(or where it will be created; the pipelines call it before loading or downloading a model). Every OS error while
writing is an :class:`OutputError` naming the path (``no space left on device writing out/samples/00003.png``).
"""

from __future__ import annotations

import errno
import io
import json
import math
import os
import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from ldmcli.errors import LdmError, UsageError

METADATA_KEY = "ldmcli"
SAMPLE_PATTERN = "{:05d}.png"
GRID_PATTERN = "grid-{:04d}.png"

_NO_HARDLINKS = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV, errno.EMLINK, errno.ENOSYS}


class OutputError(LdmError):
    """A file or folder for the results that cannot be created or written (exit code 1); the message names it."""


#: errors after which no later file can be written either (a batch stops instead of failing each item in turn)
FATAL_WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})


def describe_os_error(error: OSError, path: str | os.PathLike, doing: str = "writing") -> str:
    """One line for an OS error on ``path``: ``no space left on device writing PATH``, ``permission denied writing
    PATH``, ``read-only file system writing PATH``."""
    reason = error.strerror or str(error) or type(error).__name__
    return f"{reason[:1].lower()}{reason[1:]} {doing} {os.fspath(path)}"


def _nearest_existing(folder: Path) -> Path:
    """``folder`` if it exists, else the nearest folder above it that does (where it would be created)."""
    for part in [folder, *folder.parents]:
        if part.exists():
            return part
    return Path.cwd()


def check_output_folder(folder: str | os.PathLike) -> Path:
    """Make sure results can be written into ``folder`` before any work, without leaving anything behind: write and
    remove a hidden probe file in it, or, while it does not exist yet, in the nearest existing folder above it (where
    it will be created). A path that is (or runs through) a file is a UsageError; a folder that cannot be written
    (permissions, a read-only or full file system) an :class:`OutputError`; both name it."""
    folder = Path(folder)
    base = _nearest_existing(folder)
    if not base.is_dir():
        what = "exists and is not a folder" if base == folder else f"cannot be created: {base} is a file"
        raise UsageError(f"{folder}: {what}")
    probe = base / f".ldmcli-probe-{uuid.uuid4().hex[:12]}.tmp"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, b"ldmcli")
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:
        doing = "writing into" if base == folder else f"creating {folder} in"
        raise OutputError(describe_os_error(e, base, doing)) from None
    finally:
        try:
            os.unlink(probe)
        except OSError:
            pass
    return folder


@dataclass(frozen=True)
class WrittenFile:
    """One file that is complete under its final name, with the settings stored in it."""

    path: Path
    kind: str  # "sample" or "grid"
    metadata: Mapping[str, Any] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        """The ``--json`` record: path, kind and every setting in the PNG."""
        return {"path": str(self.path), "kind": self.kind, **self.metadata}


def to_uint8(images: Any) -> np.ndarray:
    """Decoder output in [-1, 1], shaped ``[batch, channels, height, width]``, to ``[batch, height, width, 3]``
    uint8, as upstream: ``clamp((x + 1) / 2, 0, 1) * 255`` truncated to integers."""
    import torch
    from einops import rearrange

    x = torch.clamp((images.detach().float().cpu() + 1.0) / 2.0, min=0.0, max=1.0)
    array = (255.0 * rearrange(x, "b c h w -> b h w c")).numpy().astype(np.uint8)
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    return array


def make_grid(images: np.ndarray, per_row: int, padding: int = 2) -> np.ndarray:
    """Tile ``[n, h, w, c]`` uint8 images, ``per_row`` to a row, with black ``padding`` as torchvision's
    ``make_grid`` does (which upstream uses; a single image is returned without a border, as there)."""
    n, h, w, c = images.shape
    if n == 1:
        return images[0]
    cols = max(1, min(per_row, n))
    rows = int(math.ceil(n / cols))
    cell_h, cell_w = h + padding, w + padding
    grid = np.zeros((rows * cell_h + padding, cols * cell_w + padding, c), dtype=np.uint8)
    for k in range(n):
        r, col = divmod(k, cols)
        top, left = r * cell_h + padding, col * cell_w + padding
        grid[top : top + h, left : left + w] = images[k]
    return grid


def encode_png(image: np.ndarray, metadata: Mapping[str, Any] | None = None) -> bytes:
    """PNG bytes of an ``[h, w, 3]`` uint8 image, with ``metadata`` as JSON in the ``ldmcli`` text chunk."""
    info = PngInfo()
    if metadata:
        info.add_text(METADATA_KEY, json.dumps(dict(metadata), sort_keys=True))
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The settings stored in a PNG written by ldmcli (empty if it has none)."""
    with Image.open(path) as image:
        image.load()
        text = getattr(image, "text", {}) or {}
        raw = text.get(METADATA_KEY)
    return json.loads(raw) if raw else {}


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    prefix, rest = pattern.split("{", 1)
    suffix = rest.split("}", 1)[1]
    return re.compile("^" + re.escape(prefix) + r"(\d+)" + re.escape(suffix) + "$")


def next_free_number(folder: Path, pattern: str) -> int:
    """One past the highest number of a file named by ``pattern`` in ``folder`` (0 for an empty folder)."""
    regex = _pattern_regex(pattern)
    highest = -1
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return 0
    for name in names:
        match = regex.match(name)
        if match:
            highest = max(highest, int(match.group(1)))
    return highest + 1


class NumberedWriter:
    """Writes files named ``pattern.format(n)`` into ``folder`` with n continuing after the existing files.

    Each name is claimed atomically (see the module docstring), so concurrent writers never collide; a writer that
    loses a race simply takes the next number.
    """

    def __init__(self, folder: str | os.PathLike, pattern: str = SAMPLE_PATTERN) -> None:
        self.folder = Path(folder)
        self.pattern = pattern
        self._next: int | None = None

    def write(self, data: bytes) -> Path:
        """Store ``data`` under the next free name and return that path; an OS error is an :class:`OutputError`
        naming the file (or the folder, when it failed before a name was chosen)."""
        try:
            return self._write(data)
        except OSError as e:
            try:
                where: Path = self.folder / self.pattern.format(
                    self._next if self._next is not None else next_free_number(self.folder, self.pattern))
            except OSError:
                where = self.folder
            raise OutputError(describe_os_error(e, where)) from None

    def _write(self, data: bytes) -> Path:
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / f".{uuid.uuid4().hex}.tmp"
        try:
            with open(tmp, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            if self._next is None:
                self._next = next_free_number(self.folder, self.pattern)
            while True:
                target = self.folder / self.pattern.format(self._next)
                if self._claim(tmp, target):
                    self._next += 1
                    return target
                # taken (by another process, or a file that appeared since we listed): rescan and go on
                self._next = max(self._next + 1, next_free_number(self.folder, self.pattern))
        finally:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass

    def _claim(self, tmp: Path, target: Path) -> bool:
        try:
            os.link(tmp, target)
            return True
        except FileExistsError:
            return False
        except OSError as e:
            if e.errno not in _NO_HARDLINKS:
                raise
        from filelock import FileLock

        with FileLock(str(self.folder / ".ldmcli-names.lock")):
            if target.exists():
                return False
            os.replace(tmp, target)
            return True


class ImageWriter:
    """Upstream's output layout under ``outdir``: samples in ``outdir/samples``, grids next to that folder."""

    def __init__(self, outdir: str | os.PathLike) -> None:
        self.outdir = Path(outdir)
        self.samples = NumberedWriter(self.outdir / "samples", SAMPLE_PATTERN)
        self.grids = NumberedWriter(self.outdir, GRID_PATTERN)

    def write_sample(self, image: np.ndarray, metadata: Mapping[str, Any]) -> WrittenFile:
        """Write one ``[h, w, 3]`` uint8 image as the next ``samples/NNNNN.png``."""
        path = self.samples.write(encode_png(image, metadata))
        return WrittenFile(path, "sample", dict(metadata))

    def write_grid(self, images: np.ndarray, per_row: int, metadata: Mapping[str, Any]) -> WrittenFile:
        """Write ``[n, h, w, 3]`` uint8 images as the next ``grid-NNNN.png``, ``per_row`` images to a row."""
        path = self.grids.write(encode_png(make_grid(images, per_row), metadata))
        return WrittenFile(path, "grid", dict(metadata))
