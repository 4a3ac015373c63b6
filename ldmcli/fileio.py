"""Atomic file writes and file hashing, shared by every module that writes or checks files.

A file appears under its final name only when it is complete: it is written to a hidden temporary name in the same
folder (same filesystem, so the rename is atomic), flushed to disk, then ``os.replace``-d over the target. A crash,
Ctrl-C or exception during the write leaves the previous file (if any) untouched and removes the temporary file.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

CHUNK = 1 << 20

HashProgress = Callable[[int, "int | None", str], None]
"""``progress(done_bytes, total_bytes, file_name)``, called after each block."""


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDWR)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, fsync: bool = True) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; when the block ends without an exception the file written there is
    flushed to disk (``fsync``) and renamed to ``path``, otherwise it is removed. Creates the parent folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        yield tmp
        if fsync:
            _fsync(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, fsync: bool = True) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_path`); returns ``path``."""
    with atomic_path(path, fsync=fsync) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str, *, encoding: str = "utf-8", fsync: bool = True) -> Path:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_path`); returns ``path``."""
    with atomic_path(path, fsync=fsync) as tmp:
        tmp.write_text(text, encoding=encoding)
    return Path(path)


def sha256_file(path: str | os.PathLike, progress: HashProgress | None = None) -> str:
    """The sha256 hex digest of a file, read in 1 MiB blocks (``progress`` called after each block)."""
    path = Path(path)
    digest = hashlib.sha256()
    total = path.stat().st_size if progress is not None else None
    done = 0
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
            done += len(block)
            if progress is not None:
                progress(done, total, path.name)
    return digest.hexdigest()
