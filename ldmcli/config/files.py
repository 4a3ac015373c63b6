"""Config files and presets: reading YAML, telling the two formats apart, :func:`load_config` by preset name or path."""

from __future__ import annotations

import dataclasses
import os
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

from ldmcli.errors import UnknownModelError, UsageError
from ldmcli.config.registry import FORMAT_KEY, FORMAT_VERSION
from ldmcli.config.schema import ModelConfig
from ldmcli.config.reader import did_you_mean
from ldmcli.config.upstream import from_upstream
from ldmcli.config.native import config_from_dict

# ------------------------------------------------------------------------------------------------------ loading


def preset_names(folder: str = "") -> list[str]:
    """Every preset shipped with the package: one per zoo model, or those of ``presets/<folder>`` (``train``)."""
    root = resources.files("ldmcli") / "presets"
    root = root / folder if folder else root
    if not root.is_dir():
        return []
    return sorted(p.name[: -len(".yaml")] for p in root.iterdir() if p.name.endswith(".yaml"))


def read_preset(name: str, folder: str = "") -> Any:
    """The YAML document of the shipped preset ``name`` (in ``presets/<folder>`` if given)."""
    root = resources.files("ldmcli") / "presets"
    root = root / folder if folder else root
    return read_yaml((root / f"{name}.yaml").read_text(encoding="utf-8"), f"preset {name}")


def read_config_file(path: Path) -> Any:
    """The document in a config file: JSON for ``.json``, YAML otherwise (unreadable or invalid: UsageError)."""
    try:
        content = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read config {path}: {e}") from None
    if path.suffix == ".json":
        import json

        try:
            return json.loads(content)
        except json.JSONDecodeError as e:
            raise UsageError(f"invalid config {path}: not valid JSON: {e}") from None
    return read_yaml(content, str(path))


def read_yaml(text: str, source: str) -> Any:
    """Parse YAML text (``source`` names it in the one-line UsageError for invalid YAML)."""
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        problem = getattr(e, "problem", None) or type(e).__name__
        raise UsageError(f"invalid config {source}: not valid YAML{where}: {problem}") from None


def parse_config(doc: Any, source: str = "<config>", name: str | None = None) -> ModelConfig:
    """A parsed document in either format → :class:`ModelConfig` (upstream if it has ``model:``)."""
    if isinstance(doc, Mapping) and FORMAT_KEY in doc:
        return config_from_dict(doc, source, name=name)
    if isinstance(doc, Mapping) and "model" in doc:
        cfg = from_upstream(doc, source)
        return dataclasses.replace(cfg, name=name) if name is not None else cfg
    raise UsageError(f"invalid config {source}: neither an upstream config (top-level 'model:') nor an ldmcli "
                     f"config (top-level '{FORMAT_KEY}: {FORMAT_VERSION}')")


def _looks_like_path(text: str) -> bool:
    return (os.sep in text or "/" in text or (os.altsep is not None and os.altsep in text)
            or text.endswith((".yaml", ".yml", ".json")))


def load_config(name_or_path: str | os.PathLike, _via: str | None = None) -> ModelConfig:
    """A zoo preset name (``txt2img-f8-large``), an ldmcli config file, or an upstream YAML (a file, or a folder
    holding ``config.yaml`` as upstream's ``models/ldm/<name>/``) → a validated :class:`ModelConfig`."""
    text = os.fspath(name_or_path)
    names = preset_names()
    if not isinstance(name_or_path, os.PathLike) and not _looks_like_path(text) and text in names:
        return parse_config(read_preset(text), f"preset {text}", name=text)
    path = Path(text).expanduser()
    if path.is_dir() and (path / "config.yaml").is_file():
        path = path / "config.yaml"
    if path.is_file():
        return parse_config(read_config_file(path), str(path))
    if _looks_like_path(text) or isinstance(name_or_path, os.PathLike):
        raise UsageError(f"config file not found: {path}")
    prefix = f"{_via}: " if _via else ""
    raise UnknownModelError(f"{prefix}unknown model {text!r}{did_you_mean(text, names)} "
                            f"(a zoo name such as {', '.join(names[:3])}, ... or a config file path)")
