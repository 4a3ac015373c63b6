"""Image sets for ``ldm eval``: a folder of images (recursive), or an ``.npz`` whose ``arr_0`` is ``[n, h, w, 3]``
uint8 (ADM's sample and reference batches), read in batches of equal-sized images, and the content hash that keys
the reference cache.

A folder written by ``ldm sample`` / ``ldm txt2img`` (``samples/`` beside ``grid-NNNN.png``) means its ``samples/``
folder: grids are never counted as samples. Hidden files are skipped.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

from ldmcli.errors import UsageError
from ldmcli.fileio import sha256_file

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
_GRID = re.compile(r"^grid-\d+\.png$")


@dataclass(frozen=True)
class ImageSet:
    """Where a set of images lies: ``files`` of a folder, or the ``arr_0`` array of ``npz``."""

    source: Path
    files: tuple[Path, ...] = ()
    npz: Path | None = None
    count: int = 0

    def __len__(self) -> int:
        return self.count

    def first(self, n: int) -> "ImageSet":
        """The set's first ``n`` images (a folder's, in name order)."""
        if n >= self.count:
            return self
        if self.npz is not None:
            raise UsageError(f"{self.source}: cannot take the first {n} images of an .npz")
        return ImageSet(self.source, self.files[:n], None, n)

    def images(self) -> Iterator[np.ndarray]:
        """Every image as ``[h, w, 3]`` uint8, in order."""
        if self.npz is not None:
            for batch in self.batches(64):
                yield from batch
            return
        for path in self.files:
            yield read_rgb(path)

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        """``[b, h, w, 3]`` uint8 batches of at most ``batch_size`` images (a new batch starts where the size
        changes, so sets of mixed sizes work; each image is resized by Inception itself)."""
        if self.npz is not None:
            with np.load(self.npz, mmap_mode="r") as data:
                arr = data["arr_0"]
                for start in range(0, len(arr), batch_size):
                    yield _rgb_array(np.asarray(arr[start:start + batch_size]), self.npz)
            return
        pending: list[np.ndarray] = []
        for path in self.files:
            image = read_rgb(path)
            if pending and (image.shape != pending[0].shape or len(pending) == batch_size):
                yield np.stack(pending)
                pending = []
            pending.append(image)
        if pending:
            yield np.stack(pending)


def read_rgb(path: Path) -> np.ndarray:
    """One image as ``[h, w, 3]`` uint8 (grey and RGBA converted as PIL does); an unreadable file is a UsageError."""
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"), dtype=np.uint8)
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot read image {path}: {e}") from None


def _rgb_array(arr: np.ndarray, where: Path) -> np.ndarray:
    if arr.ndim == 3:
        arr = arr[..., None]
    if arr.ndim != 4 or arr.shape[-1] not in (1, 3):
        raise UsageError(f"{where}: arr_0 must be [n, h, w, 3] images, got shape {arr.shape}")
    if arr.dtype != np.uint8:
        raise UsageError(f"{where}: arr_0 must be uint8 images (0-255), got {arr.dtype}")
    return np.repeat(arr, 3, axis=-1) if arr.shape[-1] == 1 else arr


def find_images(folder: Path) -> list[Path]:
    """Every image file under ``folder`` (recursive, sorted, hidden files and ``grid-NNNN.png`` skipped)."""
    out = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            if name.startswith(".") or _GRID.match(name):
                continue
            if name.lower().endswith(IMAGE_SUFFIXES):
                out.append(Path(root) / name)
    return out


def open_images(path: str | os.PathLike, what: str = "images") -> ImageSet:
    """The image set at ``path`` (a folder, or an ``.npz`` with ``arr_0``); a missing or empty one is a UsageError."""
    path = Path(path).expanduser()
    if not path.exists():
        raise UsageError(f"{what}: {path} does not exist")
    if path.is_dir():
        folder = path / "samples" if (path / "samples").is_dir() else path
        files = find_images(folder)
        if not files:
            raise UsageError(f"{what}: no images ({', '.join(IMAGE_SUFFIXES)}) under {folder}")
        return ImageSet(path, tuple(files), None, len(files))
    if path.suffix.lower() == ".npz":
        try:
            with np.load(path, mmap_mode="r") as data:
                if "arr_0" not in data.files:
                    raise UsageError(f"{what}: {path} holds no arr_0 images (keys: {', '.join(data.files)})")
                shape = data["arr_0"].shape
        except (OSError, ValueError) as e:
            raise UsageError(f"{what}: cannot read {path}: {e}") from None
        if len(shape) not in (3, 4) or shape[0] == 0:
            raise UsageError(f"{what}: {path}: arr_0 must be [n, h, w, 3] images, got shape {shape}")
        return ImageSet(path, (), path, int(shape[0]))
    raise UsageError(f"{what}: {path} is neither a folder of images nor an .npz")


def content_hash(images: ImageSet) -> str:
    """sha256 over the set's content: the ``.npz`` file's bytes, or every image's relative path and sha256."""
    if images.npz is not None:
        return sha256_file(images.npz)
    digest = hashlib.sha256()
    base = images.files[0].parent if images.source.is_file() else images.source
    for path in images.files:
        rel = os.path.relpath(path, base).replace(os.sep, "/")
        digest.update(f"{rel}\0{sha256_file(path)}\n".encode())
    return digest.hexdigest()
