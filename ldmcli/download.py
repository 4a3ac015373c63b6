"""The download engine: resumable, retrying, locked, atomic HTTP downloads and safe zip extraction.

A transfer writes ``<final>.part`` under the file lock ``<final>.lock``; the partial survives Ctrl-C, a dropped
connection or a killed process, and the next call continues it with an HTTP Range request (a server that answers 200
instead of 206 restarts it from zero). Connection errors, timeouts and 5xx are retried with exponential backoff; a 4xx
fails at once. The size is checked against Content-Length / Content-Range, the sha256 is computed incrementally
(including a resumed prefix), md5/sha256 are checked where known, and only then is the file renamed to its final name.
Zip archives are extracted entry by entry into a temporary folder next to the target, rejecting ``..``, absolute
paths, links and special files, and renamed into place only when everything extracted cleanly.

A host that cannot be reached at all (the name does not resolve, the connection is refused) is not retried: that is
the state of the network, not a hiccup, and the error says so at once, naming the URL, ``LDM_MIRROR`` and
``--offline``. ``LDM_DOWNLOAD_RETRIES=N`` allows N retries after the first attempt (N + 1 attempts in a row without
progress; a retry that moves bytes resets the count).

Library code: progress goes through ``progress(done_bytes, total_bytes_or_None, file_name)``; what is retried and
when (and waiting for another process's lock) goes to ``notice(Notice)`` (or ``progress.notice`` when ``progress`` is
an object with that method); nothing is printed.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import socket
import stat
import tempfile
import time
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterator, Literal
from urllib.parse import urlsplit, urlunsplit

from filelock import FileLock

from ldmcli import paths
from ldmcli.errors import DownloadError, UsageError
from ldmcli.fileio import atomic_write_text

ProgressCallback = Callable[[int, "int | None", str], None]


@dataclass(frozen=True)
class Notice:
    """Something the user should hear about while a download waits: a ``retry`` (after ``delay`` seconds, attempt
    ``attempt`` of ``attempts``) or ``waiting`` for another process that holds the file's lock. ``str()`` is the line
    to show."""

    kind: Literal["retry", "waiting"]
    file: str
    message: str
    delay: float | None = None
    attempt: int | None = None
    attempts: int | None = None

    def __str__(self) -> str:
        return self.message


NoticeCallback = Callable[[Notice], None]


def notice_sink(progress: Any, notice: NoticeCallback | None = None) -> NoticeCallback | None:
    """``notice`` if given, else ``progress.notice`` when the progress object has one (renderers that show both)."""
    if notice is not None:
        return notice
    method = getattr(progress, "notice", None)
    return method if callable(method) else None

CHUNK = 1 << 20
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class RetryPolicy:
    """How hard to try: ``attempts`` tries without progress, sleeping ``backoff * factor**k`` (capped) in between."""

    attempts: int = 6
    backoff: float = 1.0
    factor: float = 2.0
    max_backoff: float = 60.0
    connect_timeout: float = 20.0
    read_timeout: float = 60.0

    def delay(self, failures: int) -> float:
        return min(self.max_backoff, self.backoff * self.factor ** max(0, failures - 1))


def default_policy() -> RetryPolicy:
    """The policy from the environment: ``LDM_DOWNLOAD_RETRIES``, ``LDM_DOWNLOAD_BACKOFF``, ``LDM_DOWNLOAD_TIMEOUT``."""
    env = os.environ

    def number(var: str, default: float, cast: type = float) -> Any:
        raw = env.get(var, "").strip()
        if not raw:
            return default
        try:
            value = cast(raw)
        except ValueError:
            raise UsageError(f"{var}={raw!r} is not a number") from None
        if value < 0:
            raise UsageError(f"{var}={raw!r} must not be negative")
        return value

    timeout = number("LDM_DOWNLOAD_TIMEOUT", 60.0)
    # LDM_DOWNLOAD_RETRIES counts retries, as the name says: 0 = one attempt only, 5 (default) = up to 6 attempts
    return RetryPolicy(
        attempts=1 + number("LDM_DOWNLOAD_RETRIES", 5, int),
        backoff=number("LDM_DOWNLOAD_BACKOFF", 1.0),
        connect_timeout=min(timeout, 20.0) if timeout else 20.0,
        read_timeout=timeout,
    )


def mirror_url(url: str, mirror: str | None = None) -> str:
    """Apply ``LDM_MIRROR`` (or ``mirror``): replace scheme and host of ``url``, keep its path and query.

    A mirror with a path prefix (``http://host/prefix``) puts that prefix in front of the original path.
    """
    mirror = os.environ.get("LDM_MIRROR", "").strip() if mirror is None else mirror.strip()
    if not mirror:
        return url
    m = urlsplit(mirror)
    if m.scheme not in {"http", "https"} or not m.netloc:
        raise UsageError(f"LDM_MIRROR={mirror!r} is not an http(s) base URL")
    u = urlsplit(url)
    return urlunsplit((m.scheme, m.netloc, m.path.rstrip("/") + u.path, u.query, ""))


def free_bytes(path: Path) -> int:
    """Free disk space at ``path`` (or its nearest existing parent), in bytes."""
    path = Path(path)
    while not path.exists() and path.parent != path:
        path = path.parent
    return shutil.disk_usage(path).free


def human(n: int | None) -> str:
    """``1234567`` -> ``'1.2 MB'`` (decimal units, like the upstream README's sizes)."""
    if n is None:
        return "?"
    value = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{n} B"


def check_space(folder: Path, needed: int) -> None:
    """Raise :class:`DownloadError` naming the needed and free sizes when ``folder`` cannot hold ``needed`` bytes."""
    free = free_bytes(folder)
    if needed > free:
        raise DownloadError(f"not enough disk space in {folder}: need {human(needed)}, {human(free)} free")


@contextlib.contextmanager
def lock_file(path: Path, notice: NoticeCallback | None = None, what: str = "") -> Iterator[None]:
    """Hold the OS lock on ``path`` (released even if the process is killed) and delete ``path`` when done.

    Deleting a lock file is safe only if a waiter that locked the old (deleted) file notices: after locking, the
    descriptor must still be the file at ``path``, else it is closed and the lock taken again on the new file.
    ``notice`` hears once when another process holds the lock (``what`` names the file it is for).
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: filelock deletes its lock files there itself
        with FileLock(str(path)):
            yield
        return
    told = False
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if notice is not None and not told:
                    told = True
                    name = what or path.name.removesuffix(".lock")
                    notice(Notice("waiting", name, f"{name}: waiting for another process that is downloading it"))
                fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                current = os.stat(path)
            except FileNotFoundError:
                current = None
            if current is not None and os.path.samestat(os.fstat(fd), current):
                break
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)  # the holder deleted the file we locked: lock the new one
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)


@contextlib.contextmanager
def locked(target: Path, notice: NoticeCallback | None = None) -> Iterator[None]:
    """Hold the per-target lock ``<target>.lock``; the lock file is removed when released."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with lock_file(Path(str(target) + ".lock"), notice, target.name):
        yield


def part_path(target: Path) -> Path:
    """Where the partial download of ``target`` lives until it is complete."""
    return target.with_name(target.name + ".part")


def _meta_path(target: Path) -> Path:
    """The partial's validators (ETag / Last-Modified / total size), so a resume never splices two versions."""
    return target.with_name(target.name + ".part.json")


def _read_meta(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def discard_partial(target: Path) -> None:
    """Forget a partial download of ``target`` (the next fetch starts from zero)."""
    part_path(target).unlink(missing_ok=True)
    _meta_path(target).unlink(missing_ok=True)


@dataclass(frozen=True)
class FetchResult:
    """A completed download: its final path, sha256, size, the offset it resumed from and the URL used."""

    path: Path
    sha256: str
    size: int
    resumed_from: int
    url: str


class _Transient(Exception):
    """A failure worth retrying (5xx, a connection closed early)."""


def _causes(e: BaseException) -> Iterator[BaseException]:
    """``e`` and every exception it wraps (``reason``, exception arguments, ``__cause__``, ``__context__``)."""
    seen: set[int] = set()
    stack = [e]
    while stack:
        x = stack.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        yield x
        stack.extend(a for a in getattr(x, "args", ()) if isinstance(a, BaseException))
        reason = getattr(x, "reason", None)
        if isinstance(reason, BaseException):
            stack.append(reason)
        stack.extend((x.__cause__, x.__context__))


def unreachable_reason(e: BaseException) -> str | None:
    """Why the host cannot be reached at all (DNS failure, connection refused), or None for other errors."""
    for x in _causes(e):
        if isinstance(x, socket.gaierror) or type(x).__name__ == "NameResolutionError":
            return "its name does not resolve: no network?"
        if isinstance(x, ConnectionRefusedError) or (isinstance(x, OSError) and x.errno == errno.ECONNREFUSED):
            return "connection refused"
        if isinstance(x, OSError) and x.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH):
            return "network unreachable"
    return None


def _unreachable_error(url: str, why: str) -> DownloadError:
    host = urlsplit(url).netloc or url
    return DownloadError(f"cannot reach {host} ({why}) for {url}; set LDM_MIRROR to a reachable mirror, or use "
                         "--offline to work with downloaded files only")


def _hash_file(path: Path, algorithms: tuple[str, ...], limit: int | None = None) -> dict[str, Any]:
    hashers = {a: hashlib.new(a) for a in algorithms}
    remaining = limit
    with open(path, "rb") as f:
        while remaining is None or remaining > 0:
            block = f.read(CHUNK if remaining is None else min(CHUNK, remaining))
            if not block:
                break
            for h in hashers.values():
                h.update(block)
            if remaining is not None:
                remaining -= len(block)
    return hashers


def _content_range(value: str | None) -> tuple[int, int | None] | None:
    """``'bytes 100-199/200'`` -> ``(100, 200)``; None when it cannot be parsed."""
    if not value:
        return None
    try:
        unit, rest = value.strip().split(" ", 1)
        span, total = rest.split("/", 1)
        start = int(span.split("-", 1)[0])
        return start, (None if total.strip() == "*" else int(total))
    except ValueError:
        return None


def _retryable() -> tuple[type[BaseException], ...]:
    import requests
    import urllib3

    return (
        requests.ConnectionError,
        requests.Timeout,
        requests.exceptions.ChunkedEncodingError,
        requests.exceptions.ContentDecodingError,
        urllib3.exceptions.HTTPError,
        _Transient,
    )


def fetch(
    url: str,
    target: Path,
    *,
    md5: str | None = None,
    sha256: str | None = None,
    extra_space: int = 0,
    size_hint: int | None = None,
    policy: RetryPolicy | None = None,
    progress: ProgressCallback | None = None,
    lock: bool = True,
    sleep: Callable[[float], None] = time.sleep,
    notice: NoticeCallback | None = None,
) -> FetchResult:
    """Download ``url`` to ``target``: resumable (``<target>.part``), retried, size- and checksum-checked, atomic.

    ``extra_space`` is added to the free-space requirement (e.g. room to extract an archive); ``size_hint`` is used
    for that check when the server sends no length. ``lock=False`` when the caller already holds :func:`locked`.
    ``notice`` hears each retry before its wait (see :class:`Notice`). A host that does not resolve or refuses the
    connection fails at once with a :class:`DownloadError` (no retries).
    """
    notice = notice_sink(progress, notice)
    if lock:
        with locked(target, notice):
            return fetch(url, target, md5=md5, sha256=sha256, extra_space=extra_space, size_hint=size_hint,
                         policy=policy, progress=progress, lock=False, sleep=sleep, notice=notice)
    import requests

    policy = policy or default_policy()
    target.parent.mkdir(parents=True, exist_ok=True)
    part = part_path(target)
    meta_file = _meta_path(target)
    algorithms = ("sha256", "md5") if md5 else ("sha256",)
    name = target.name
    retryable = _retryable()
    failures = 0
    first_offset: int | None = None
    hashed: tuple[int, dict[str, Any]] | None = None  # (bytes hashed, hashers) carried across retries
    restarted = False  # the partial was thrown away once because it did not belong to the remote file
    moved = False  # bytes arrived in this call: a later DNS/refused error is a dropped link, retried as usual

    with requests.Session() as session:
        while True:
            offset = part.stat().st_size if part.exists() else 0
            if first_offset is None:
                first_offset = offset
            headers = {"Accept-Encoding": "identity"}
            meta = _read_meta(meta_file) if offset else {}
            if offset:
                headers["Range"] = f"bytes={offset}-"
                etag = meta.get("etag") or ""
                validator = etag if etag and not etag.startswith("W/") else meta.get("last_modified")
                if validator:
                    headers["If-Range"] = validator  # a changed file comes back whole (200), not spliced
            received = 0
            try:
                with session.get(url, headers=headers, stream=True, allow_redirects=True,
                                 timeout=(policy.connect_timeout, policy.read_timeout or None)) as resp:
                    status = resp.status_code
                    if status == 416 and offset and not restarted:
                        discard_partial(target)  # the partial is not a prefix of this file: start over once
                        restarted = True
                        hashed = None
                        continue
                    if 400 <= status < 500:
                        raise DownloadError(f"{url}: HTTP {status} {resp.reason or ''}".rstrip())
                    if status >= 500:
                        raise _Transient(f"HTTP {status} {resp.reason or ''}".rstrip())
                    if status == 206:
                        rng = _content_range(resp.headers.get("Content-Range"))
                        if rng is None or rng[0] != offset:
                            raise _Transient(f"bad Content-Range {resp.headers.get('Content-Range')!r}")
                        total = rng[1]
                        if meta.get("total") is not None and total is not None and meta["total"] != total \
                                and not restarted:
                            discard_partial(target)  # the remote file changed size: start over once
                            restarted = True
                            hashed = None
                            continue
                        mode = "ab"
                    elif status == 200:
                        offset = 0  # the server ignored Range (or none was sent): start from zero
                        hashed = None
                        length = resp.headers.get("Content-Length")
                        total = int(length) if length and length.isdigit() else None
                        mode = "wb"
                    else:
                        raise DownloadError(f"{url}: unexpected HTTP {status} {resp.reason or ''}".rstrip())

                    needed = (total - offset if total is not None else max(0, (size_hint or 0) - offset))
                    check_space(target.parent, needed + extra_space)
                    if mode == "wb":
                        meta_file.write_text(json.dumps({
                            "url": url, "etag": resp.headers.get("ETag"),
                            "last_modified": resp.headers.get("Last-Modified"), "total": total,
                        }), encoding="utf-8")

                    if hashed is None or hashed[0] != offset:
                        hashers = _hash_file(part, algorithms, offset) if offset else \
                            {a: hashlib.new(a) for a in algorithms}
                    else:
                        hashers = hashed[1]
                    done = offset
                    if progress is not None:
                        progress(done, total, name)
                    with open(part, mode) as f:
                        try:
                            while block := _read_some(resp.raw):
                                f.write(block)
                                for h in hashers.values():
                                    h.update(block)
                                done += len(block)
                                received += len(block)
                                if progress is not None:
                                    progress(done, total, name)
                        finally:
                            f.flush()
                            os.fsync(f.fileno())
                            hashed = (done, hashers)
                    if total is not None and done < total:
                        raise _Transient(f"connection closed after {done} of {total} bytes")
                    if total is not None and done > total:
                        discard_partial(target)
                        raise DownloadError(f"{url}: received {done} bytes, expected {total}")
            except retryable as e:
                moved = moved or received > 0
                why = unreachable_reason(e)
                if why is not None and not moved:  # unreachable from the start: the network, not a hiccup
                    if part.exists() and not part.stat().st_size:
                        discard_partial(target)
                    raise _unreachable_error(url, why) from None
                failures = 1 if received else failures + 1  # progress resets the count: a flaky link still finishes
                have = part.stat().st_size if part.exists() else 0
                if failures >= policy.attempts:
                    if not have:
                        discard_partial(target)  # an empty .part (and its validators) would only mislead
                    kept = f"{human(have)} kept in {part.name}, rerun to resume" if have else "rerun to try again"
                    raise DownloadError(
                        f"{url}: {_describe(e)} (gave up after {failures} attempt(s); {kept})"
                    ) from None
                delay = policy.delay(failures)
                if notice is not None:
                    at = f" at {human(have)}" if have else ""
                    notice(Notice("retry", name, f"{name}: {_describe(e)}; retrying{at} in {delay:.3g} s "
                                  f"(attempt {failures + 1} of {policy.attempts})", delay, failures + 1,
                                  policy.attempts))
                sleep(delay)
                continue
            break

    digests = {a: h.hexdigest() for a, h in hashers.items()}
    for algorithm, expected in (("md5", md5), ("sha256", sha256)):
        if expected and not digests[algorithm].startswith(expected.lower()):
            discard_partial(target)
            raise DownloadError(f"{url}: {algorithm} mismatch (got {digests[algorithm]}, expected {expected}); "
                                "the partial file was deleted")
    os.replace(part, target)
    meta_file.unlink(missing_ok=True)
    return FetchResult(path=target, sha256=digests["sha256"], size=done, resumed_from=first_offset or 0, url=url)


def _read_some(raw: Any) -> bytes:
    """The next bytes of a streamed body. ``read1`` (urllib3 >= 2.3) returns whatever arrived, so a dropped
    connection keeps every byte it delivered; older urllib3 falls back to small reads (at most 64 KiB lost)."""
    read1 = getattr(raw, "read1", None)
    if read1 is not None:
        return read1(CHUNK)
    return raw.read(64 * 1024)


_OBJECT_PREFIX = re.compile(r"^<[^>]*>: |^\w*Connection(?:Pool)?\(host=[^)]*\): ")


def _describe(e: BaseException) -> str:
    """A short reason for ``e``: the innermost cause of a requests/urllib3 error, not its 400-character wrapping."""
    import requests

    if isinstance(e, _Transient):
        return str(e)
    if isinstance(e, requests.Timeout):
        return "the server stopped answering (timeout)"
    inner = e
    for x in _causes(e):
        if x is not e and not isinstance(x, (requests.RequestException,)) and type(x).__name__ != "MaxRetryError":
            inner = x
            break
    text = str(inner).strip().splitlines()[0] if str(inner).strip() else ""
    text = _OBJECT_PREFIX.sub("", text)
    if len(text) > 160:
        text = text[:157] + "..."
    kind = type(inner).__name__
    return text if text.startswith(kind) else f"{kind}: {text}" if text else kind


# ---------------------------------------------------------------------------------------------------- archives


def _safe_member(info: zipfile.ZipInfo) -> PurePosixPath | None:
    """The member's relative path, or raise for anything that could escape or is not a plain file/folder."""
    raw = info.filename
    if "\\" in raw:
        raise DownloadError(f"archive entry {raw!r} uses backslashes")
    path = PurePosixPath(raw)
    if raw.startswith("/") or path.is_absolute() or (path.parts and ":" in path.parts[0]):
        raise DownloadError(f"archive entry {raw!r} is an absolute path")
    if any(part == ".." for part in path.parts):
        raise DownloadError(f"archive entry {raw!r} points outside the target folder")
    mode = (info.external_attr >> 16) & 0xFFFF
    kind = stat.S_IFMT(mode)
    if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
        raise DownloadError(f"archive entry {raw!r} is a link or special file")
    parts = [p for p in path.parts if p not in ("", ".")]
    return PurePosixPath(*parts) if parts else None


def extract_zip(
    archive: Path,
    dest: Path,
    *,
    required: tuple[str, ...] = (),
    progress: ProgressCallback | None = None,
) -> dict[str, dict[str, Any]]:
    """Safely extract the zip ``archive`` into ``dest``; return ``{relative path: {sha256, size}}`` of its files.

    Everything is extracted into a temporary folder next to ``dest`` first (checking each entry, CRCs and
    ``required`` paths), then each top-level item is renamed into ``dest``; on any failure nothing is left behind.
    """
    dest.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.extract-", dir=dest.parent))
    records: dict[str, dict[str, Any]] = {}
    try:
        try:
            with zipfile.ZipFile(archive) as zf:
                infos = zf.infolist()
                members = [(info, _safe_member(info)) for info in infos]
                total = sum(info.file_size for info in infos)
                check_space(dest.parent, total)
                seen: set[PurePosixPath] = set()
                done = 0
                if progress is not None:
                    progress(0, total, f"extracting {archive.name}")
                for info, rel in members:
                    if rel is None:
                        continue
                    if rel in seen:
                        raise DownloadError(f"archive entry {info.filename!r} appears twice")
                    seen.add(rel)
                    out = tmp.joinpath(*rel.parts)
                    if info.is_dir():
                        out.mkdir(parents=True, exist_ok=True)
                        continue
                    out.parent.mkdir(parents=True, exist_ok=True)
                    h = hashlib.sha256()
                    size = 0
                    with zf.open(info) as src, open(out, "wb") as dst:
                        while block := src.read(CHUNK):
                            dst.write(block)
                            h.update(block)
                            size += len(block)
                            done += len(block)
                            if progress is not None:
                                progress(done, total, f"extracting {archive.name}")
                    records[rel.as_posix()] = {"sha256": h.hexdigest(), "size": size}
        except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, ValueError) as e:
            raise DownloadError(f"{archive.name} is not a valid zip archive ({_describe(e)})") from e
        missing = [r for r in required if not tmp.joinpath(*r.split("/")).exists()]
        if missing:
            found = sorted(p.name for p in tmp.iterdir())
            raise DownloadError(f"{archive.name} does not contain {', '.join(missing)} "
                                f"(top level: {', '.join(found) or 'nothing'})")
        for item in sorted(tmp.iterdir()):
            target = dest / item.name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            elif target.exists() or target.is_symlink():
                target.unlink()
            os.replace(item, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return records


def remove_stale_extractions(dest: Path) -> None:
    """Delete temporary extraction folders a killed process left next to ``dest``."""
    if dest.parent.is_dir():
        for stale in dest.parent.glob(f".{dest.name}.extract-*"):
            shutil.rmtree(stale, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------- manifest


def manifest_path() -> Path:
    """``<data dir>/manifest.json``: the sha256 and size of every completed download, by path under the data dir."""
    return paths.data_dir() / MANIFEST


def read_manifest() -> dict[str, Any]:
    """The manifest (``{"version": 1, "files": {relpath: {...}}}``); empty when there is none yet."""
    path = manifest_path()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        data = {}
    except NotADirectoryError:
        paths.require_data_dir()  # names the file that stands where a folder should be
        raise
    except json.JSONDecodeError as e:
        raise DownloadError(f"cannot read {path}: {_describe(e)} (delete it to start a new manifest)") from e
    except OSError as e:
        raise DownloadError(f"cannot read {path}: {e.strerror or _describe(e)}") from e
    data.setdefault("version", 1)
    data.setdefault("files", {})
    return data


def update_manifest(records: dict[str, dict[str, Any]] | None = None,
                    remove: list[str] | tuple[str, ...] = ()) -> None:
    """Add/replace ``records`` and drop ``remove`` keys, atomically (temp file + rename) under ``manifest.json.lock``."""
    paths.require_data_dir()
    path = manifest_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    with lock_file(Path(str(path) + ".lock")):
        data = read_manifest()
        for key in remove:
            data["files"].pop(key, None)
        data["files"].update(records or {})
        data["files"] = dict(sorted(data["files"].items()))
        atomic_write_text(path, json.dumps(data, indent=1) + "\n")
