"""The validator: :class:`Reader` turns plain YAML/JSON values into typed configs, one-line errors naming the file and field."""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, Callable, Mapping

from ldmcli.errors import UsageError

# ------------------------------------------------------------------------------------------------ validation core


class Reader:
    """Validates plain YAML/JSON values into the dataclasses, naming ``source`` and the field path in errors."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, where: str, message: str) -> UsageError:
        return UsageError(f"invalid config {self.source}: {where}: {message}" if where else
                          f"invalid config {self.source}: {message}")

    def mapping(self, value: Any, where: str) -> dict[str, Any]:
        if not isinstance(value, Mapping):
            raise self.fail(where, f"expected a mapping, got {_show(value)}")
        for key in value:
            if not isinstance(key, str):
                raise self.fail(where, f"keys must be strings, got {key!r}")
        return dict(value)

    def choice(self, value: Any, choices: typing.Iterable[str], where: str, what: str = "value") -> str:
        choices = list(choices)
        if not isinstance(value, str) or value not in choices:
            hint = did_you_mean(value, choices) if isinstance(value, str) else ""
            raise self.fail(where, f"unknown {what} {_show(value)}{hint} (expected one of {', '.join(choices)})")
        return value

    def coerce(self, value: Any, tp: Any, where: str) -> Any:
        origin = typing.get_origin(tp)
        if origin in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            if value is None:
                return None
            if len(args) == 1:
                return self.coerce(value, args[0], where)
            raise TypeError(f"no coercion for {tp}")  # nested configs are read by their own functions
        if origin is tuple:
            (item,) = (a for a in typing.get_args(tp) if a is not Ellipsis)
            if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
                raise self.fail(where, f"expected a list, got {_show(value)}")
            return tuple(self.coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value))
        if tp is bool:
            if not isinstance(value, bool):
                raise self.fail(where, f"expected true or false, got {_show(value)}")
            return value
        if tp is int:
            if isinstance(value, bool) or not isinstance(value, int):
                if isinstance(value, float) and value.is_integer():
                    return int(value)
                raise self.fail(where, f"expected an integer, got {_show(value)}")
            return value
        if tp is float:
            if isinstance(value, bool):
                raise self.fail(where, f"expected a number, got {_show(value)}")
            if isinstance(value, (int, float)):
                return float(value)
            if isinstance(value, str):  # YAML 1.1 reads "1e-6" (no dot) as a string
                try:
                    return float(value)
                except ValueError:
                    pass
            raise self.fail(where, f"expected a number, got {_show(value)}")
        if tp is str:
            if not isinstance(value, str):
                raise self.fail(where, f"expected a string, got {_show(value)}")
            return value
        raise TypeError(f"no coercion for {tp}")

    def dataclass(self, cls: type, value: Any, where: str, *, nested: Mapping[str, Callable[[Any, str], Any]] = {},
                  ignored: typing.AbstractSet[str] = frozenset(), exclude: typing.AbstractSet[str] = frozenset(),
                  extra: Mapping[str, Any] = {}, aliases: Mapping[str, str] = {}) -> Any:
        """Build ``cls`` from the mapping ``value``: unknown keys, missing required keys and wrong types are errors;
        ``nested`` fields are read by their own function (given the value and its path); ``ignored`` keys are
        dropped; ``exclude`` fields are not allowed here; ``extra`` supplies already-read fields; ``aliases`` maps a
        key as written (``lossconfig``) to its field (``loss``)."""
        data = self.mapping(value, where)
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls) if f.init and f.name not in exclude}
        spelled = {name: key for key, name in aliases.items()}
        allowed = sorted(spelled.get(name, name) for name in set(fields) - set(extra))
        kwargs: dict[str, Any] = dict(extra)
        for key, item in data.items():
            if key in ignored:
                continue
            path = f"{where}.{key}" if where else key
            name = aliases.get(key, key)
            if key not in allowed:
                raise self.fail(path, f"unknown key{did_you_mean(key, allowed)}")
            kwargs[name] = nested[name](item, path) if name in nested else self.coerce(item, hints[name], path)
        for name, f in fields.items():
            if name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                key = spelled.get(name, name)
                raise self.fail(f"{where}.{key}" if where else key, "missing required key")
        return cls(**kwargs)

    def target(self, value: Any, registry: Mapping[str, str], where: str, what: str) -> str:
        if not isinstance(value, str):
            raise self.fail(where, f"target must be a string, got {_show(value)}")
        if value not in registry:
            raise self.fail(where, f"unknown {what} target {value!r}{did_you_mean(value, list(registry))} "
                                   f"(known: {', '.join(sorted(registry))})")
        return registry[value]

    def target_block(self, value: Any, where: str) -> tuple[Any, dict[str, Any]]:
        """An upstream ``{target: ..., params: {...}}`` block → (target, params)."""
        block = self.mapping(value, where)
        unknown = set(block) - {"target", "params"}
        if unknown:
            key = sorted(unknown)[0]
            raise self.fail(f"{where}.{key}", "unknown key (expected only target and params)")
        if "target" not in block:
            raise self.fail(f"{where}.target", "missing required key")
        params = block.get("params")
        return block["target"], (self.mapping(params, f"{where}.params") if params is not None else {})


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def did_you_mean(word: Any, candidates: typing.Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest candidate, or ``""``."""
    if not isinstance(word, str):
        return ""
    matches = difflib.get_close_matches(word, list(candidates), n=1)
    return f" (did you mean {matches[0]!r}?)" if matches else ""
