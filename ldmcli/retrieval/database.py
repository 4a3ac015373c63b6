"""Retrieval databases of the Retrieval-Augmented Diffusion Models (Blattmann et al. 2022): CLIP embeddings of image
patches in upstream's ``.npz`` format.

Each ``.npz`` holds ``embedding`` ``[N, D]``, ``img_id`` ``[N]`` and ``patch_coords`` ``[N, ...]``; a database is one
file or a folder of shards, concatenated in sorted file order. Nothing is held twice in memory: an uncompressed
member is memory-mapped straight out of the zip archive (compressed ones are read whole, one shard at a time), and a
folder of shards is one row-indexable view over the shards' arrays (:class:`ShardedRows`), not a concatenated copy.
Embeddings keep their stored dtype (float16 stays float16); passes over the whole database (:func:`normalize_to_file`)
convert one chunk at a time.
"""

from __future__ import annotations

import mmap
import os
import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ldmcli import paths
from ldmcli.errors import LdmError, UsageError
from ldmcli.fileio import atomic_path

#: The databases upstream published (``data/rdm/retrieval_databases/<name>``).
ARTBENCH_STYLES = ("art_nouveau", "baroque", "expressionism", "impressionism", "post_impressionism", "realism",
                   "romanticism", "renaissance", "surrealism", "ukiyo_e")
KNOWN_DATABASES = ("openimages", *(f"artbench-{s}" for s in ARTBENCH_STYLES))
KEYS = ("embedding", "img_id", "patch_coords")
#: the store entry whose download holds each of them
ZOO_ENTRIES = {"openimages": "openimages-database", **{f"artbench-{s}": "artbench-databases" for s in ARTBENCH_STYLES}}

#: ``callback(phase, done, total)``: progress of a long operation, reported by the library, rendered by commands.
Progress = Callable[[str, int, int], None]


class DatabaseError(LdmError):
    """A database file that cannot be used (corrupt archive, missing key, inconsistent shapes)."""


@dataclass(frozen=True)
class _Member:
    """One array inside an ``.npz``: where its data starts, its shape and dtype, whether it can be memory-mapped."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    fortran: bool
    offset: int | None  # absolute byte offset of the raw data when the member is stored uncompressed


def _read_members(path: Path) -> dict[str, _Member]:
    """Headers of the arrays in an ``.npz`` (no data read). Corrupt archives raise DatabaseError."""
    try:
        with zipfile.ZipFile(path) as zf, open(path, "rb") as raw:
            members = {}
            for info in zf.infolist():
                if not info.filename.endswith(".npy"):
                    continue
                key = info.filename[: -len(".npy")]
                with zf.open(info) as f:
                    version = np.lib.format.read_magic(f)
                    if version == (1, 0):
                        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
                    else:
                        shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
                    header_len = f.tell()
                offset = None
                if info.compress_type == zipfile.ZIP_STORED and not dtype.hasobject:
                    raw.seek(info.header_offset)
                    local = raw.read(30)
                    sig, *_, name_len, extra_len = struct.unpack("<4s5H3I2H", local)
                    if sig != b"PK\x03\x04":
                        raise zipfile.BadZipFile("bad local file header")
                    offset = info.header_offset + 30 + name_len + extra_len + header_len
                members[key] = _Member(key, tuple(shape), dtype, bool(fortran), offset)
            return members
    except (zipfile.BadZipFile, ValueError, OSError, struct.error, EOFError) as e:
        raise DatabaseError(f"{path} is not a readable .npz file ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None


def _load_member(path: Path, member: _Member, *, mmap: bool) -> np.ndarray:
    """One array of an ``.npz``: memory-mapped when stored uncompressed (and ``mmap``), else read."""
    try:
        if mmap and member.offset is not None:
            return np.memmap(path, dtype=member.dtype, mode="r", offset=member.offset, shape=member.shape,
                             order="F" if member.fortran else "C")
        with np.load(path, allow_pickle=False) as z:
            return z[member.name]
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
        raise DatabaseError(f"cannot read '{member.name}' from {path}: {str(e).splitlines()[0]}") from None


def database_files(folder: str | os.PathLike) -> list[Path]:
    """The ``.npz`` files of a database (a folder of shards, or one file), in sorted order."""
    folder = Path(folder)
    if folder.is_file():
        return [folder]
    files = sorted(p for p in folder.glob("*.npz") if p.is_file())
    if not files:
        raise UsageError(f"no .npz files in {folder}")
    return files


@dataclass
class Database:
    """A retrieval database: ``embedding`` ``[N, D]`` (memory-mapped or one in-memory array) and lazily read
    per-shard metadata (``img_id``, ``patch_coords``)."""

    name: str
    files: list[Path]
    embedding: np.ndarray
    _shard_sizes: list[int] = field(default_factory=list)
    _meta: dict[str, np.ndarray | None] = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return int(self.embedding.shape[0])

    @property
    def dim(self) -> int:
        return int(self.embedding.shape[1])

    def metadata(self, key: str, indices: np.ndarray) -> np.ndarray | None:
        """``img_id`` or ``patch_coords`` of the given rows (any shape of indices); None when the stored arrays
        cannot be read without unpickling."""
        if key not in self._meta:
            arrays = []
            for path in self.files:
                try:
                    with np.load(path, allow_pickle=False) as z:
                        arrays.append(z[key])
                except (ValueError, OSError, zipfile.BadZipFile):  # object arrays: never unpickle data files
                    self._meta[key] = None
                    break
            else:
                self._meta[key] = arrays[0] if len(arrays) == 1 else np.concatenate(arrays)
        full = self._meta[key]
        return None if full is None else full[np.asarray(indices)]


@dataclass(frozen=True)
class DatabaseInfo:
    """What the headers of a database's files say (no data read)."""

    name: str
    files: list[Path]
    sizes: list[int]
    dim: int
    headers: list[dict] = field(repr=False)

    def __len__(self) -> int:
        return sum(self.sizes)


def inspect_database(source: str | os.PathLike, *, name: str | None = None,
                     expected_dim: int | None = None) -> DatabaseInfo:
    """Check every shard's headers without reading data: keys present, ``embedding`` 2-D floating point, equal
    lengths across keys, one dimension across shards, ``expected_dim`` when given."""
    files = database_files(source)
    name = name or Path(source).name
    headers = []
    for path in files:
        members = _read_members(path)
        missing = [k for k in KEYS if k not in members]
        if missing:
            raise DatabaseError(f"{path} has no '{missing[0]}' array (a database .npz holds {', '.join(KEYS)})")
        emb = members["embedding"]
        if len(emb.shape) != 2 or emb.dtype.kind != "f":
            raise DatabaseError(f"'embedding' in {path} must be a 2-D float array, got shape {list(emb.shape)} "
                                f"dtype {emb.dtype}")
        for key in KEYS[1:]:
            if not members[key].shape or members[key].shape[0] != emb.shape[0]:
                raise DatabaseError(f"'{key}' in {path} has {members[key].shape[:1] or 'no'} rows, "
                                    f"'embedding' has {emb.shape[0]}")
        headers.append(members)
    dims = {h["embedding"].shape[1] for h in headers}
    if len(dims) > 1:
        raise DatabaseError(f"the shards of {source} disagree on the embedding dimension ({sorted(dims)})")
    dim = dims.pop()
    if expected_dim is not None and dim != expected_dim:
        raise UsageError(f"database '{name}' holds {dim}-d embeddings but the CLIP model gives {expected_dim}-d")
    sizes = [h["embedding"].shape[0] for h in headers]
    if sum(sizes) == 0:
        raise DatabaseError(f"database '{name}' is empty")
    return DatabaseInfo(name, files, sizes, dim, headers)


class ShardedRows:
    """The ``embedding`` arrays of several shards seen as one ``[N, D]`` array without concatenating them: ``len``,
    ``shape``, ``dtype``, rows by int, slice or integer array (any shape), and ``np.asarray`` (which does copy)."""

    def __init__(self, parts: list[np.ndarray]) -> None:
        self.parts = parts
        self.starts = np.cumsum([0] + [p.shape[0] for p in parts])
        self.dtype = np.result_type(*(p.dtype for p in parts))
        self.shape = (int(self.starts[-1]), int(parts[0].shape[1]))
        self.ndim = 2

    def __len__(self) -> int:
        return self.shape[0]

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = np.concatenate([np.asarray(p) for p in self.parts]).astype(self.dtype, copy=False)
        return out if dtype is None else out.astype(dtype, copy=False)

    def _take(self, rows: np.ndarray) -> np.ndarray:
        rows = np.where(rows < 0, rows + len(self), rows)
        if rows.size and (rows.min() < 0 or rows.max() >= len(self)):
            raise IndexError(f"row index out of range for {len(self)} rows")
        flat = rows.reshape(-1)
        out = np.empty((flat.size, self.shape[1]), dtype=self.dtype)
        which = np.searchsorted(self.starts, flat, side="right") - 1
        for i in np.unique(which):
            sel = np.nonzero(which == i)[0]
            out[sel] = self.parts[i][flat[sel] - self.starts[i]]
        return out.reshape(*rows.shape, self.shape[1])

    def __getitem__(self, key):
        if isinstance(key, tuple):
            rows = self[key[0]]
            return rows[(Ellipsis, *key[1:])]
        if isinstance(key, slice):
            a, b, step = key.indices(len(self))
            if step == 1:  # contiguous rows: copy shard by shard, no index array
                parts = []
                for i, part in enumerate(self.parts):
                    lo, hi = max(a, self.starts[i]), min(b, self.starts[i + 1])
                    if lo < hi:
                        parts.append(np.asarray(part[lo - self.starts[i]: hi - self.starts[i]], dtype=self.dtype))
                return np.concatenate(parts) if parts else np.empty((0, self.shape[1]), self.dtype)
            return self._take(np.arange(a, b, step))
        if np.isscalar(key):
            return self._take(np.asarray([key]))[0]
        return self._take(np.asarray(key, dtype=np.int64))


def iter_rows(embedding, chunk: int = 65536):
    """``(start, float32 block)`` over the rows of an embedding array (memmap, array or :class:`ShardedRows`), one
    chunk at a time: at most ``chunk`` rows are converted to float32 at once (a float16 database is never copied
    whole to float32)."""
    for start in range(0, embedding.shape[0], chunk):
        block = np.array(embedding[start: start + chunk], dtype=np.float32)
        release_pages(embedding)
        yield start, block


def release_pages(array) -> None:
    """Drop the pages of a memory-mapped array (or of each part of a :class:`ShardedRows`) from this process's
    resident memory; the data stays in the page cache and is read back on the next access. Without this, a pass
    over a large memory-mapped database leaves all of it counted in the resident set."""
    for part in getattr(array, "parts", [array]):
        mm = getattr(part, "_mmap", None)
        if mm is not None and hasattr(mm, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
            try:
                mm.madvise(mmap.MADV_DONTNEED)
            except (OSError, ValueError):
                pass


def load_database(source: str | os.PathLike, *, name: str | None = None, expected_dim: int | None = None,
                  mmap: bool = True, callback: Progress | None = None) -> Database:
    """Load a database folder (or one ``.npz``) without holding two copies of the embeddings.

    The headers of every shard are checked first (:func:`inspect_database`), so a bad file fails before any data
    is read. One file gives its (memory-mapped) array; several give a :class:`ShardedRows` view over theirs.
    """
    info = inspect_database(source, name=name, expected_dim=expected_dim)
    files, headers, sizes, name = info.files, info.headers, info.sizes, info.name
    parts = []
    for i, (path, members) in enumerate(zip(files, headers)):
        if callback is not None:
            callback("load", i, len(files))
        parts.append(_load_member(path, members["embedding"], mmap=mmap))
    if callback is not None:
        callback("load", len(files), len(files))
    embedding = parts[0] if len(parts) == 1 else ShardedRows(parts)
    return Database(name=name, files=files, embedding=embedding, _shard_sizes=sizes)


def _nonfinite_message(rows: list[int], count: int, total: int, name: str) -> str:
    shown = ", ".join(str(r) for r in rows) + (", ..." if count > len(rows) else "")
    return (f"database '{name}' has {count} of {total} embedding rows with NaN or infinite values (row {shown}); "
            f"remove or re-embed them")


def _bad_rows(block: np.ndarray, start: int, found: list[int]) -> int:
    rows = np.nonzero(~np.isfinite(block).all(axis=1))[0]
    found.extend((rows[: max(0, 5 - len(found))] + start).tolist())
    return len(rows)


def check_finite(embedding, *, name: str = "database", chunk: int = 65536) -> None:
    """UsageError naming the rows that hold NaN or infinity (one pass, one float32 chunk at a time)."""
    found: list[int] = []
    count = sum(_bad_rows(block, start, found) for start, block in iter_rows(embedding, chunk))
    if count:
        raise UsageError(_nonfinite_message(found, count, embedding.shape[0], name))


def _normalize_block(block: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    norms = np.linalg.norm(block, axis=1, keepdims=True)
    return np.divide(block, np.where(norms > 0, norms, 1.0), out=block if out is None else out)


def normalized(embedding, *, chunk: int = 65536) -> np.ndarray:
    """Rows divided by their L2 norm, as one new in-memory float32 array filled chunk by chunk (for small
    databases; :func:`normalize_to_file` bounds memory for large ones)."""
    out = np.empty(embedding.shape, dtype=np.float32)
    for start, block in iter_rows(embedding, chunk):
        _normalize_block(block, out=out[start: start + chunk])
    return out


def normalize_to_file(embedding, path: str | os.PathLike, *, name: str = "database", chunk: int = 65536,
                      callback: Progress | None = None) -> np.memmap:
    """Write the rows divided by their L2 norm as a raw float32 file at ``path``, one chunk at a time (at most
    ``chunk`` rows in float32 in memory), and return it memory-mapped read-only; equal to :func:`normalized`.
    Rows with NaN or infinity are a UsageError naming them, raised after the pass; the partial file is removed."""
    path = Path(path)
    n, dim = embedding.shape
    found: list[int] = []
    count = 0
    try:
        with open(path, "wb") as f:
            for start, block in iter_rows(embedding, chunk):
                count += _bad_rows(block, start, found)
                if not count:
                    f.write(_normalize_block(block).tobytes())
                if callback is not None:
                    callback("normalize", min(start + chunk, n), n)
        if count:
            raise UsageError(_nonfinite_message(found, count, n, name))
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return np.memmap(path, dtype=np.float32, mode="r", shape=(n, dim))


class RowFile:
    """Rows ``[start, start + N)`` of a raw float32 ``[*, D]`` file, read by plain file reads (the page cache holds
    them, not this process's resident memory): ``shape``, ``len`` and contiguous slices, for passes over a large file
    such as exact search."""

    def __init__(self, path: str | os.PathLike, shape: tuple[int, int], start: int = 0) -> None:
        self.path = Path(path)
        self.shape = (int(shape[0]), int(shape[1]))
        self.start = int(start)
        self.dtype = np.dtype(np.float32)

    def __len__(self) -> int:
        return self.shape[0]

    def rows(self, start: int, stop: int) -> "RowFile":
        """The rows ``[start, stop)`` of this view."""
        return RowFile(self.path, (stop - start, self.shape[1]), self.start + start)

    def __getitem__(self, key: slice) -> np.ndarray:
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError("RowFile reads contiguous row slices only")
        a, b, _ = key.indices(len(self))
        with open(self.path, "rb") as f:
            f.seek((self.start + a) * self.shape[1] * 4)
            return np.fromfile(f, dtype=np.float32, count=max(0, b - a) * self.shape[1]).reshape(-1, self.shape[1])


def resolve_database(spec: str | os.PathLike, *, fetch: bool = True, progress=None) -> tuple[str, Path]:
    """A database argument to ``(name, folder)``: a path to a folder (or ``.npz``), a database already under
    ``data/rdm/retrieval_databases/``, or one of upstream's databases (fetched through the store when ``fetch``;
    ``progress`` is the store's download callback)."""
    text = str(spec)
    candidate = Path(text).expanduser()
    if os.sep in text or text.startswith(".") or text.endswith(".npz"):
        if not candidate.exists():
            raise UsageError(f"no database at {candidate}")
        return candidate.resolve().stem if candidate.is_file() else candidate.resolve().name, candidate.resolve()
    folder = paths.databases_dir() / text
    if folder.is_dir():
        return text, folder
    if text in KNOWN_DATABASES:
        if not fetch:
            raise UsageError(f"database '{text}' is not downloaded (run 'ldm download {ZOO_ENTRIES[text]}')")
        from ldmcli import store  # imported late: the store pulls in the download machinery

        store.ensure(ZOO_ENTRIES[text], progress=progress)
        return text, paths.databases_dir() / text
    if candidate.is_dir():
        return candidate.resolve().name, candidate.resolve()
    raise UsageError(f"unknown database '{text}' (known: {', '.join(KNOWN_DATABASES)}; or a folder of .npz files; "
                     f"or build one with 'ldm build-index NAME --from-images DIR')")


def write_shard(path: Path, embedding: np.ndarray, img_id: np.ndarray, patch_coords: np.ndarray) -> None:
    """Write one database shard (uncompressed, so it can be memory-mapped) atomically: temp name, then rename."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, embedding=embedding, img_id=img_id, patch_coords=patch_coords)
