"""The model store: what other commands call to get zoo files onto disk (auto-download on first use).

``ensure(name)`` returns the entry's complete local folder, fetching whatever is missing through
:mod:`ldmcli.download` (and the assets the entry needs); ``checkpoint_path``/``asset_path`` are the usual shortcuts.
With ``--offline`` / ``LDM_OFFLINE=1`` missing files are one :class:`~ldmcli.errors.OfflineError` naming every one
of them (the entry's and its assets') and the ``ldm download`` command that fetches them; :func:`require` checks that
for several entries at once before any work. :func:`download_entries` fetches a list of entries, going on past
failures, and reports each step as a typed event. Every completed file's sha256 is in ``<data dir>/manifest.json``;
:func:`verify` re-hashes against it.

inpainting_big: upstream ships two downloads (``inpainting_big.zip`` with unverified contents, and the ``last.ckpt``
that the upstream README and ``scripts/inpaint.py`` use); the store fetches ``last.ckpt`` and
``checkpoint_path("inpainting_big")`` returns ``models/ldm/inpainting_big/last.ckpt``.
"""

from __future__ import annotations

import datetime as _dt
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ldmcli import download, paths, zoo
from ldmcli.download import NoticeCallback, ProgressCallback, RetryPolicy
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
    if entry.packaged:  # inside the installed package: no data dir, no manifest
        return [p for p in (dest.joinpath(*rel.split("/")) for rel in entry.contents) if not p.exists()]
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


def with_assets(names: Iterable[str]) -> list[zoo.ZooEntry]:
    """The entries called ``names`` with the assets they need, each once, every asset before its first user."""
    out: dict[str, zoo.ZooEntry] = {}
    for name in names:
        entry = zoo.get(name)
        for asset in entry.assets:
            out.setdefault(asset, zoo.get(asset))
        out.setdefault(entry.name, entry)
    return list(out.values())


def missing(names: Iterable[str]) -> dict[str, list[Path]]:
    """``{entry name: paths it lacks}`` for ``names`` and their assets (complete entries are left out)."""
    out = {}
    for entry in with_assets(names):
        lacking = missing_files(entry.name)
        if lacking:
            out[entry.name] = lacking
    return out


def _offline_error(names: list[str], lacking: dict[str, list[Path]]) -> OfflineError:
    files = [str(p) for group in lacking.values() for p in group]
    commands = " ".join(zoo.get(n).name for n in names)
    return OfflineError(f"network use is off (--offline / LDM_OFFLINE) and {len(files)} file(s) are missing: "
                        f"{', '.join(files)}; run 'ldm download {commands}' first")


def require(names: Iterable[str]) -> None:
    """With network use off, raise one :class:`OfflineError` naming every file that ``names`` and their assets
    lack (and the ``ldm download`` command that fetches them); otherwise (or when nothing lacks) do nothing.
    Call it before expensive work, with every entry a command will need."""
    names = [zoo.get(n).name for n in names]
    if not paths.offline():
        return
    lacking = missing(names)
    if lacking:
        raise _offline_error(names, lacking)


def _record(entry: zoo.ZooEntry, url: str, files: dict[Path, dict]) -> None:
    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    download.update_manifest({
        _relkey(path): {"sha256": info["sha256"], "size": info["size"], "entry": entry.name, "url": url,
                        "downloaded": now, **({"archive": info["archive"]} if "archive" in info else {})}
        for path, info in files.items()
    })


def _fetch_file(entry: zoo.ZooEntry, spec: zoo.ZooFile, *, force: bool, progress: ProgressCallback | None,
                policy: RetryPolicy | None, notice: NoticeCallback | None) -> None:
    dest = entry.local_dir()
    target = dest / spec.filename
    produced = entry.contents if spec.archive else (spec.filename,)
    with download.locked(target, notice):
        if not force and all(dest.joinpath(*p.split("/")).exists() for p in produced):
            return  # another process finished it while we waited for the lock
        if force:
            download.discard_partial(target)
        url = download.mirror_url(spec.url)
        size = spec.size or 0
        result = download.fetch(url, target, md5=spec.md5, sha256=spec.sha256, size_hint=spec.size,
                                extra_space=size if spec.archive else 0, progress=progress, policy=policy, lock=False,
                                notice=notice)
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
           with_assets: bool = True, policy: RetryPolicy | None = None, notice: NoticeCallback | None = None) -> Path:
    """The complete local folder of zoo entry ``name``, downloading whatever is missing (and its assets).

    ``force`` re-downloads even complete files. Raises :class:`OfflineError` when something is missing and network
    use is forbidden (naming every missing file of the entry and its assets at once), :class:`DownloadError` when a
    download fails, ``UnknownModelError`` for a bad name. ``notice`` hears retries and waits (see
    :class:`ldmcli.download.Notice`); by default ``progress.notice`` when ``progress`` has one.
    """
    entry = zoo.get(name)
    notice = download.notice_sink(progress, notice)
    if not entry.packaged:
        paths.require_data_dir()
    if with_assets:
        if paths.offline() and not force:
            require([entry.name])
        for asset in entry.assets:
            ensure(asset, progress=progress, with_assets=False, policy=policy, notice=notice)
    dest = entry.local_dir()
    lacking = missing_files(entry.name)
    if not lacking and not force:
        return dest
    if entry.packaged:  # built into the package: there is nothing to download
        if not lacking:
            return dest
        raise LdmError(f"{lacking[0]} is missing from the ldmcli installation ({entry.name} ships with the "
                       "package): reinstall ldmcli")
    if paths.offline():
        if not lacking:
            raise OfflineError(f"cannot download {entry.name} again: network use is off (--offline / LDM_OFFLINE)")
        raise _offline_error([entry.name], {entry.name: lacking})
    dest.mkdir(parents=True, exist_ok=True)
    for spec in entry.files:
        _fetch_file(entry, spec, force=force, progress=progress, policy=policy, notice=notice)
    still = missing_files(entry.name)
    if still:
        raise DownloadError(f"{entry.name}: {still[0]} is still missing after the download")
    return dest


def checkpoint_path(name: str, *, progress: ProgressCallback | None = None,
                    notice: NoticeCallback | None = None) -> Path:
    """The checkpoint file of model entry ``name`` (downloaded on first use), e.g. ``.../kl-f8/model.ckpt``."""
    entry = zoo.get(name)
    if entry.checkpoint is None:
        raise LdmError(f"{entry.name} is a {entry.kind.replace('_', ' ')}, not a model with a checkpoint")
    return ensure(entry.name, progress=progress, notice=notice) / entry.checkpoint


def asset_path(name: str, *, progress: ProgressCallback | None = None, notice: NoticeCallback | None = None) -> Path:
    """The folder of asset ``name`` (downloaded on first use): ``asset_path("bert-base-uncased") / "vocab.txt"``."""
    entry = zoo.get(name)
    if entry.kind != "asset":
        raise LdmError(f"{entry.name} is a {entry.kind.replace('_', ' ')}, not an asset")
    return ensure(entry.name, progress=progress, notice=notice)


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


def listing(entries: Iterable[zoo.ZooEntry]) -> list[dict[str, Any]]:
    """One row per entry for ``ldm download --list`` / ``--json``: name, kind, approximate size, downloaded or not,
    bytes already in ``.part`` files, folder, checkpoint, preset, assets, description."""
    rows = []
    for e in entries:
        complete = is_complete(e.name)
        rows.append({
            "name": e.name,
            "kind": e.kind,
            "size": e.approx_size,
            "size_is_approximate": True,
            "downloaded": complete,
            "partial_bytes": 0 if complete else partial_bytes(e.name),
            "path": str(e.local_dir()),
            "checkpoint": e.checkpoint,
            "arch": e.arch,
            "assets": list(e.assets),
            "description": e.description,
        })
    return rows


# ------------------------------------------------------------------------------------------ several entries


@dataclass(frozen=True)
class EntryEvent:
    """A step of :func:`download_entries`: ``start`` (about to fetch), ``skipped`` (already complete), ``done``
    (now complete) or ``failed`` (``error`` says why; the other entries go on)."""

    kind: Literal["start", "skipped", "done", "failed"]
    name: str
    path: Path
    error: LdmError | None = None


@dataclass
class DownloadSummary:
    """What :func:`download_entries` did: entries fetched, already complete, and ``(name, error)`` failures."""

    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[tuple[str, LdmError]] = field(default_factory=list)

    def error(self) -> LdmError | None:
        """One error naming every failure (the single error itself when only one entry was asked for), or None."""
        if not self.failed:
            return None
        total = len(self.done) + len(self.skipped) + len(self.failed)
        if total == 1:
            return self.failed[0][1]
        names = [name for name, _ in self.failed]
        first_name, first = self.failed[0]
        others = "; the others are complete" if len(self.failed) < total else ""
        return DownloadError(f"{len(self.failed)} of {total} entries failed: {', '.join(names)} (first: {first_name}: "
                             f"{first}){others}; rerun 'ldm download {' '.join(names)}' to retry")


def download_entries(names: Iterable[str], *, force: bool = False, progress: ProgressCallback | None = None,
                     notice: NoticeCallback | None = None, on_event: Callable[[EntryEvent], None] | None = None,
                     policy: RetryPolicy | None = None) -> DownloadSummary:
    """Fetch ``names`` and their assets (assets first), going on past a failed entry; return what happened.

    Settings that would fail every entry (the data dir, ``LDM_MIRROR``, the retry variables) are checked first and
    raise; with network use off, every missing file is named in one :class:`OfflineError` before anything starts.
    A failure of one entry is reported through ``on_event`` and collected in the summary (see
    :meth:`DownloadSummary.error`); Ctrl-C stops at once, keeping partial files.
    """
    names = [zoo.get(n).name for n in names]
    todo = with_assets(names)
    if any(not e.packaged for e in todo):
        paths.require_data_dir()
    download.mirror_url("http://example.invalid/")  # a bad LDM_MIRROR fails here, once
    policy = policy or download.default_policy()
    if not force:
        require(names)
    summary = DownloadSummary()
    emit = on_event or (lambda event: None)
    for entry in todo:
        dest = entry.local_dir()
        if not force and is_complete(entry.name):
            summary.skipped.append(entry.name)
            emit(EntryEvent("skipped", entry.name, dest))
            continue
        emit(EntryEvent("start", entry.name, dest))
        try:
            ensure(entry.name, force=force, progress=progress, with_assets=False, policy=policy, notice=notice)
        except LdmError as e:
            summary.failed.append((entry.name, e))
            emit(EntryEvent("failed", entry.name, dest, e))
            continue
        summary.done.append(entry.name)
        emit(EntryEvent("done", entry.name, dest))
    return summary


def verify_entries(entries: Iterable[zoo.ZooEntry], *, only_recorded: bool,
                   progress: Callable[[str], ProgressCallback | None] | None = None,
                   on_report: Callable[[VerifyReport], None] | None = None) -> list[VerifyReport]:
    """:func:`verify` each entry (``only_recorded``: only those with files in the manifest, for a bare ``--verify``).

    ``progress(name)`` may return a hashing progress callback for that entry; ``on_report`` hears each report.
    """
    recorded = download.read_manifest()["files"]
    reports = []
    for e in entries:
        if only_recorded and not any(v.get("entry") == e.name for v in recorded.values()):
            continue
        report = verify(e.name, progress=progress(e.name) if progress is not None else None)
        reports.append(report)
        if on_report is not None:
            on_report(report)
    return reports


def verification_error(reports: list[VerifyReport]) -> LdmError | None:
    """One error naming the first bad file and the ``ldm download --force`` that repairs all of them, or None."""
    failures = [(r.name, f) for r in reports for f in r.bad]
    if not failures:
        return None
    name, first = failures[0]
    names = " ".join(sorted({n for n, _ in failures}))
    return LdmError(f"{len(failures)} file(s) failed verification ({name}: {first.path} {first.status}); "
                    f"run 'ldm download --force {names}'")
