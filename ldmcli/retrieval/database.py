"""Retrieval databases of the Retrieval-Augmented Diffusion Models (Blattmann et al. 2022): CLIP embeddings of image
patches in upstream's ``.npz`` format.

Each ``.npz`` holds ``embedding`` ``[N, D]``, ``img_id`` ``[N]`` and ``patch_coords`` ``[N, ...]``; a database is one
file or a folder of shards, concatenated in sorted file order. Nothing is held twice in memory: a single uncompressed
file is memory-mapped straight out of the zip archive; shards are streamed one by one into one preallocated array.
"""

from __future__ import annotations

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


def load_database(source: str | os.PathLike, *, name: str | None = None, expected_dim: int | None = None,
                  mmap: bool = True, callback: Progress | None = None) -> Database:
    """Load a database folder (or one ``.npz``) without holding two copies of the embeddings.

    The headers of every shard are checked first (:func:`inspect_database`), so a bad file fails before any data
    is read.
    """
    info = inspect_database(source, name=name, expected_dim=expected_dim)
    files, headers, sizes, dim, name = info.files, info.headers, info.sizes, info.dim, info.name
    total = sum(sizes)
    if len(files) == 1:
        if callback is not None:
            callback("load", 0, 1)
        embedding = _load_member(files[0], headers[0]["embedding"], mmap=mmap)
        if callback is not None:
            callback("load", 1, 1)
    else:
        dtype = np.result_type(*(h["embedding"].dtype for h in headers))
        embedding = np.empty((total, dim), dtype=dtype)
        row = 0
        for i, (path, members) in enumerate(zip(files, headers)):
            if callback is not None:
                callback("load", i, len(files))
            shard = _load_member(path, members["embedding"], mmap=True)
            embedding[row: row + shard.shape[0]] = shard
            row += shard.shape[0]
            del shard
        if callback is not None:
            callback("load", len(files), len(files))
    return Database(name=name, files=files, embedding=embedding, _shard_sizes=sizes)


def normalized(embedding: np.ndarray, *, chunk: int = 65536) -> np.ndarray:
    """Rows divided by their L2 norm, as float32 (one new array, filled chunk by chunk)."""
    out = np.empty(embedding.shape, dtype=np.float32)
    for start in range(0, embedding.shape[0], chunk):
        block = np.asarray(embedding[start: start + chunk], dtype=np.float32)
        norms = np.linalg.norm(block, axis=1, keepdims=True)
        np.divide(block, np.where(norms > 0, norms, 1.0), out=out[start: start + chunk])
    return out


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
