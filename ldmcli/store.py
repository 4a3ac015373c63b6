"""The model store: what other commands call to get zoo files onto disk (auto-download on first use).

``ensure(name)`` returns the entry's complete local folder, fetching whatever is missing through
:mod:`ldmcli.download` (and the assets the entry needs); ``checkpoint_path``/``asset_path`` are the usual shortcuts.
With ``--offline`` / ``LDM_OFFLINE=1`` a missing file is an :class:`~ldmcli.errors.OfflineError` naming it and the
``ldm download`` command that fetches it. Every completed file's sha256 is in ``<data dir>/manifest.json``;
:func:`verify` re-hashes against it.

inpainting_big: upstream ships two downloads (``inpainting_big.zip`` with unverified contents, and the ``last.ckpt``
that the upstream README and ``scripts/inpaint.py`` use); the store fetches ``last.ckpt`` and
``checkpoint_path("inpainting_big")`` returns ``models/ldm/inpainting_big/last.ckpt``.
"""

from __future__ import annotations

import datetime as _dt
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ldmcli import download, paths, zoo
from ldmcli.download import ProgressCallback, RetryPolicy
from ldmcli.errors import DownloadError, LdmError, OfflineError
from ldmcli.fileio import sha256_file


def local_dir(name: str) -> Path:
    """The entry's folder under the current data dir (no network, nothing created)."""
    return zoo.get(name).local_dir()


def _relkey(path: Path) -> str:
    """A manifest key: the path relative to the data dir, with forward slashes."""
    try:
        return path.relative_to(paths.data_dir()).as_posix()
    except ValueError:
        return path.as_posix()


def missing_files(name: str) -> list[Path]:
    """Paths the entry still lacks (empty when complete). A recorded file whose size changed counts as missing."""
    entry = zoo.get(name)
    dest = entry.local_dir()
    recorded = download.read_manifest()["files"]
    out = []
    for rel in entry.contents:
        path = dest.joinpath(*rel.split("/"))
        if not path.exists():
            out.append(path)
            continue
        record = recorded.get(_relkey(path))
        if record is not None and path.is_file() and path.stat().st_size != record.get("size"):
            out.append(path)
    return out


def is_complete(name: str) -> bool:
    """True when every file the entry needs is in place (its own files, not its assets)."""
    return not missing_files(name)


def _record(entry: zoo.ZooEntry, url: str, files: dict[Path, dict]) -> None:
    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    download.update_manifest({
        _relkey(path): {"sha256": info["sha256"], "size": info["size"], "entry": entry.name, "url": url,
                        "downloaded": now, **({"archive": info["archive"]} if "archive" in info else {})}
        for path, info in files.items()
    })


def _fetch_file(entry: zoo.ZooEntry, spec: zoo.ZooFile, *, force: bool, progress: ProgressCallback | None,
                policy: RetryPolicy | None) -> None:
    dest = entry.local_dir()
    target = dest / spec.filename
    produced = entry.contents if spec.archive else (spec.filename,)
    with download.locked(target):
        if not force and all(dest.joinpath(*p.split("/")).exists() for p in produced):
            return  # another process finished it while we waited for the lock
        if force:
            download.discard_partial(target)
        url = download.mirror_url(spec.url)
        size = spec.size or 0
        result = download.fetch(url, target, md5=spec.md5, sha256=spec.sha256, size_hint=spec.size,
                                extra_space=size if spec.archive else 0, progress=progress, policy=policy, lock=False)
        if not spec.archive:
            _record(entry, url, {target: {"sha256": result.sha256, "size": result.size}})
            return
        download.remove_stale_extractions(dest)
        try:
            records = download.extract_zip(target, dest, required=entry.contents, progress=progress)
        finally:
            target.unlink(missing_ok=True)  # a bad archive is not kept: the next call fetches a fresh one
        archive = {"name": spec.filename, "sha256": result.sha256, "size": result.size}
        _record(entry, url, {dest.joinpath(*rel.split("/")): {**info, "archive": archive}
                             for rel, info in records.items()})


def ensure(name: str, *, force: bool = False, progress: ProgressCallback | None = None,
           with_assets: bool = True, policy: RetryPolicy | None = None) -> Path:
    """The complete local folder of zoo entry ``name``, downloading whatever is missing (and its assets).

    ``force`` re-downloads even complete files. Raises :class:`OfflineError` when something is missing and network
    use is forbidden, :class:`DownloadError` when a download fails, ``UnknownModelError`` for a bad name.
    """
    entry = zoo.get(name)
    if with_assets:
        for asset in entry.assets:
            ensure(asset, progress=progress, with_assets=False, policy=policy)
    dest = entry.local_dir()
    missing = missing_files(entry.name)
    if not missing and not force:
        return dest
    if entry.packaged:  # built into the package: there is nothing to download
        if not missing:
            return dest
        raise LdmError(f"{missing[0]} is missing from the ldmcli installation ({entry.name} ships with the "
                       "package): reinstall ldmcli")
    if paths.offline():
        if not missing:
            raise OfflineError(f"cannot download {entry.name} again: network use is off (--offline / LDM_OFFLINE)")
        raise OfflineError(f"{missing[0]} is missing and network use is off (--offline / LDM_OFFLINE); "
                           f"run 'ldm download {entry.name}' first")
    dest.mkdir(parents=True, exist_ok=True)
    for spec in entry.files:
        _fetch_file(entry, spec, force=force, progress=progress, policy=policy)
    still = missing_files(entry.name)
    if still:
        raise DownloadError(f"{entry.name}: {still[0]} is still missing after the download")
    return dest


def checkpoint_path(name: str, *, progress: ProgressCallback | None = None) -> Path:
    """The checkpoint file of model entry ``name`` (downloaded on first use), e.g. ``.../kl-f8/model.ckpt``."""
    entry = zoo.get(name)
    if entry.checkpoint is None:
        raise LdmError(f"{entry.name} is a {entry.kind.replace('_', ' ')}, not a model with a checkpoint")
    return ensure(entry.name, progress=progress) / entry.checkpoint


def asset_path(name: str, *, progress: ProgressCallback | None = None) -> Path:
    """The folder of asset ``name`` (downloaded on first use): ``asset_path("bert-base-uncased") / "vocab.txt"``."""
    entry = zoo.get(name)
    if entry.kind != "asset":
        raise LdmError(f"{entry.name} is a {entry.kind.replace('_', ' ')}, not an asset")
    return ensure(entry.name, progress=progress)


FileStatus = Literal["ok", "mismatch", "missing", "unrecorded"]


@dataclass
class FileCheck:
    """One file's verification: ``ok``, ``mismatch`` (sha256 differs), ``missing`` or ``unrecorded`` (no manifest)."""

    path: Path
    status: FileStatus
    expected: str | None = None
    actual: str | None = None


@dataclass
class VerifyReport:
    """The result of :func:`verify` for one entry; ``ok`` is False when any file is missing or mismatched."""

    name: str
    files: list[FileCheck] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(f.status in ("ok", "unrecorded") for f in self.files)

    @property
    def bad(self) -> list[FileCheck]:
        return [f for f in self.files if f.status in ("mismatch", "missing")]


def verify(name: str, *, progress: ProgressCallback | None = None) -> VerifyReport:
    """Re-hash the entry's files (sha256) and compare with the manifest; files placed by hand are ``unrecorded``."""
    entry = zoo.get(name)
    dest = entry.local_dir()
    prefix = _relkey(dest).rstrip("/") + "/"
    recorded = {k: v for k, v in download.read_manifest()["files"].items()
                if k.startswith(prefix) and v.get("entry") == entry.name}
    report = VerifyReport(entry.name)
    for key, record in recorded.items():
        path = paths.data_dir().joinpath(*key.split("/"))
        if not path.is_file():
            report.files.append(FileCheck(path, "missing", record.get("sha256")))
            continue
        actual = sha256_file(path, progress)
        status: FileStatus = "ok" if actual == record.get("sha256") else "mismatch"
        report.files.append(FileCheck(path, status, record.get("sha256"), actual))
    for rel in entry.contents:
        path = dest.joinpath(*rel.split("/"))
        if _relkey(path) in recorded or any(k.startswith(_relkey(path) + "/") for k in recorded):
            continue
        report.files.append(FileCheck(path, "unrecorded" if path.exists() else "missing"))
    return report


def downloaded_entries() -> list[str]:
    """Names of the entries that are complete in the current data dir."""
    return [e.name for e in zoo.entries() if is_complete(e.name)]


def partial_bytes(name: str) -> int:
    """Bytes already sitting in ``.part`` files for this entry (a download that will resume)."""
    entry = zoo.get(name)
    dest = entry.local_dir()
    total = 0
    for spec in entry.files:
        part = download.part_path(dest / spec.filename)
        if part.exists():
            total += os.path.getsize(part)
    return total
