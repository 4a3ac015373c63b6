"""The data directory: where models, databases and searchers live.

Resolved on every call (never at import) so ``LDM_HOME`` and ``--data-dir`` always take effect:
``--data-dir`` (set by the CLI for the current invocation) > ``$LDM_HOME`` > platformdirs' user data dir.
The layout under it follows the upstream repository so people recognise it::

    models/first_stage_models/<name>/   models/ldm/<name>/   models/rdm/<name>/
    data/rdm/retrieval_databases/<db>/  data/rdm/searchers/<db>/
    assets/<name>/                      (BERT vocab, CLIP ViT-L/14, LPIPS weights)
    manifest.json                       (sha256 of every completed download)
"""

from __future__ import annotations

import contextvars
import os
from pathlib import Path

import platformdirs

from ldmcli.errors import UsageError

_override: contextvars.ContextVar[Path | None] = contextvars.ContextVar("ldm_data_dir", default=None)
_offline: contextvars.ContextVar[bool] = contextvars.ContextVar("ldm_offline", default=False)


def set_data_dir(path: str | os.PathLike | None) -> None:
    """Override the data directory for the rest of this invocation (the CLI's ``--data-dir``)."""
    _override.set(Path(path).expanduser().resolve() if path is not None else None)


def data_dir() -> Path:
    """The data directory, resolved now: ``--data-dir`` > ``$LDM_HOME`` > the platform's user data dir."""
    override = _override.get()
    if override is not None:
        return override
    env = os.environ.get("LDM_HOME")
    if env:
        return Path(env).expanduser().resolve()
    return Path(platformdirs.user_data_dir("ldmcli", appauthor=False))


def data_dir_source() -> str:
    """Where the data directory comes from, for messages: ``--data-dir``, ``LDM_HOME`` or ``the default``."""
    if _override.get() is not None:
        return "--data-dir"
    return "LDM_HOME" if os.environ.get("LDM_HOME") else "the default"


def require_data_dir() -> Path:
    """The data directory, after checking that it is (or can become) a folder: a :class:`UsageError` names the file
    standing in the way. Only what reads or writes the data directory calls this; the built-in models never do."""
    folder = data_dir()
    probe = folder
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir():
        where = "" if probe == folder else f" ({probe} is a file)"
        source = data_dir_source()
        fix = f"point {source} at a folder" if source != "the default" else "set LDM_HOME or --data-dir to a folder"
        raise UsageError(f"the data directory {folder} is not a folder{where}: {fix} (it is created if missing)")
    return folder


def models_dir() -> Path:
    return data_dir() / "models"


def first_stage_dir(name: str) -> Path:
    return models_dir() / "first_stage_models" / name


def ldm_dir(name: str) -> Path:
    return models_dir() / "ldm" / name


def rdm_dir(name: str) -> Path:
    return models_dir() / "rdm" / name


def databases_dir() -> Path:
    return data_dir() / "data" / "rdm" / "retrieval_databases"


def searchers_dir() -> Path:
    return data_dir() / "data" / "rdm" / "searchers"


def assets_dir() -> Path:
    return data_dir() / "assets"


def cache_dir() -> Path:
    """Caches that can be deleted at any time (e.g. the torch.compile cache)."""
    return data_dir() / "cache"


def set_offline(value: bool) -> None:
    """Forbid network use for the rest of this invocation (the CLI's ``--offline``)."""
    _offline.set(bool(value))


def offline() -> bool:
    """True when network use is forbidden (``LDM_OFFLINE=1`` or the CLI's ``--offline``)."""
    if _offline.get():
        return True
    return os.environ.get("LDM_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}
