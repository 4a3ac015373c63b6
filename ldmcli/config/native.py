"""ldmcli's own config format (``ldmcli_config: 1``): :func:`config_to_dict` and :func:`config_from_dict`."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from ldmcli.config.registry import COND_TYPES, FIRST_STAGE_TYPES, FORMAT_KEY, FORMAT_VERSION, LOSS_TYPES
from ldmcli.config.schema import (
    CondStageConfig, DDConfig, FirstStageConfig, LatentDiffusionConfig, LossConfig, ModelConfig, SchedulerConfig,
    UNetConfig, _COND_PARAMS, _LDM_NESTED, _LOSS_PARAMS, _SCHEDULER_PARAMS, _VQ_ONLY,
)
from ldmcli.config.reader import Reader, _show, did_you_mean
from ldmcli.config.checks import _check_cond, _check_ddconfig, _check_first_stage, _check_ldm, _check_loss, _check_unet
from ldmcli.config.upstream import _scheduler

# ------------------------------------------------------------------------------------------ our format ↔ config


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return value


def _typed_block(obj: Any) -> Any:
    """``{type: ..., **params}`` for loss, conditioner and scheduler configs (a bare type name when no params)."""
    if obj is None:
        return None
    if obj.params is None:
        return obj.type
    return {"type": obj.type, **_plain(obj.params)}


def config_to_dict(cfg: ModelConfig) -> dict[str, Any]:
    """The config in ldmcli's own format as plain JSON/YAML values (every field explicit), e.g. to store next to
    the weights. ``config_from_dict`` reads it back to an equal config."""

    def first_stage(fs: FirstStageConfig) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(fs):
            if fs.type == "kl" and f.name in _VQ_ONLY:
                continue
            value = getattr(fs, f.name)
            out[f.name] = _typed_block(value) if f.name in ("loss", "scheduler") else _plain(value)
        return out

    out: dict[str, Any] = {FORMAT_KEY: FORMAT_VERSION, "kind": cfg.kind}
    if cfg.name is not None:
        out["name"] = cfg.name
    if cfg.base_learning_rate is not None:
        out["base_learning_rate"] = cfg.base_learning_rate
    ldm = cfg.ldm
    if ldm is None:
        out["first_stage"] = first_stage(cfg.first_stage)
        return out
    out["first_stage"] = first_stage(ldm.first_stage)
    out["unet"] = _plain(ldm.unet)
    out["cond_stage"] = _typed_block(ldm.cond_stage)
    out["diffusion"] = {f.name: _plain(getattr(ldm, f.name)) for f in dataclasses.fields(ldm)
                        if f.name not in _LDM_NESTED}
    out["diffusion"]["scheduler"] = _typed_block(ldm.scheduler)
    return out


def _ours_typed(r: Reader, value: Any, where: str, kinds: tuple[str, ...], params: Mapping[str, type],
                what: str) -> tuple[str, Any]:
    """Read ``{type: ..., **params}`` or a bare type name."""
    if isinstance(value, str):
        kind = r.choice(value, kinds, where, what)
        if kind in params and any(f.default is dataclasses.MISSING for f in dataclasses.fields(params[kind])):
            raise r.fail(where, f"{what} {kind!r} needs parameters: write it as a mapping with type: {kind}")
        return kind, (r.dataclass(params[kind], {}, where) if kind in params else None)
    data = r.mapping(value, where)
    if "type" not in data:
        raise r.fail(f"{where}.type", "missing required key")
    kind = r.choice(data.pop("type"), kinds, f"{where}.type", what)
    if kind not in params:
        if data:
            raise r.fail(f"{where}.{sorted(data)[0]}", f"{what} {kind!r} takes no parameters")
        return kind, None
    return kind, r.dataclass(params[kind], data, where)


def _ours_first_stage(r: Reader, value: Any, where: str, *, inside_ldm: bool) -> FirstStageConfig:
    if isinstance(value, str):
        if not inside_ldm:
            raise r.fail(where, "a first-stage model must spell out its architecture (a mapping)")
        from ldmcli.config.files import load_config  # a first stage named by preset (files imports this module)

        base = load_config(value, _via=f"{r.source}: {where}")
        if base.kind != "first_stage":
            raise r.fail(where, f"{value!r} is not a first-stage model")
        fs = base.first_stage
        # inside an LDM: no training loss or its bookkeeping, and a VQ model encodes to its pre-quantisation latent
        return dataclasses.replace(fs, type="vq_interface" if fs.is_vq else fs.type, loss=LossConfig("none"),
                                   monitor=None, scheduler=None)
    data = r.mapping(value, where)
    if "type" not in data:
        raise r.fail(f"{where}.type", "missing required key")
    kind = r.choice(data.pop("type"), FIRST_STAGE_TYPES, f"{where}.type", "first-stage type")
    exclude = _VQ_ONLY if kind == "kl" else frozenset()
    fs = r.dataclass(
        FirstStageConfig, data, where, exclude=exclude | {"type"}, extra={"type": kind},
        nested={"ddconfig": lambda v, w: _check_ddconfig(r, r.dataclass(DDConfig, v, w), w),
                "loss": lambda v, w: _check_loss(r, LossConfig(*_ours_typed(r, v, w, LOSS_TYPES, _LOSS_PARAMS,
                                                                            "loss type")), w),
                "scheduler": lambda v, w: _ours_scheduler(r, v, w)})
    return _check_first_stage(r, fs, where)


def _ours_scheduler(r: Reader, value: Any, where: str) -> SchedulerConfig | None:
    if value is None:
        return None
    data = r.mapping(value, where)
    if "type" not in data:
        raise r.fail(f"{where}.type", "missing required key")
    kind = r.choice(data.pop("type"), tuple(_SCHEDULER_PARAMS), f"{where}.type", "scheduler type")
    return _scheduler(r, kind, data, where)


def config_from_dict(data: Any, source: str = "<config>", name: str | None = None) -> ModelConfig:
    """ldmcli's own format (a preset file, or what ``config_to_dict`` wrote) → :class:`ModelConfig`."""
    r = Reader(source)
    top = r.mapping(data, "")
    version = top.pop(FORMAT_KEY, None)
    if version != FORMAT_VERSION:
        raise r.fail(FORMAT_KEY, f"unsupported format version {_show(version)} (this ldmcli reads {FORMAT_VERSION})")
    kind = r.choice(top.pop("kind", None), ("first_stage", "ldm"), "kind", "model kind")
    name = top.pop("name", name)
    if name is not None:
        name = r.coerce(name, str, "name")
    lr = top.pop("base_learning_rate", None)
    lr = r.coerce(lr, float, "base_learning_rate") if lr is not None else None
    allowed = ("first_stage",) if kind == "first_stage" else ("first_stage", "unet", "cond_stage", "diffusion")
    for key in top:
        if key not in allowed:
            raise r.fail(key, f"unknown key{did_you_mean(key, allowed)} (a {kind} config has {', '.join(allowed)})")
    for key in allowed:
        if key not in top:
            raise r.fail(key, "missing required key")
    if kind == "first_stage":
        return ModelConfig("first_stage", _ours_first_stage(r, top["first_stage"], "first_stage", inside_ldm=False),
                           lr, name=name, source=source)
    fs = _ours_first_stage(r, top["first_stage"], "first_stage", inside_ldm=True)
    unet = _check_unet(r, r.dataclass(UNetConfig, top["unet"], "unet"), "unet")
    cond = _check_cond(r, CondStageConfig(*_ours_typed(r, top["cond_stage"], "cond_stage", COND_TYPES, _COND_PARAMS,
                                                       "conditioner")), "cond_stage")
    d = r.dataclass(LatentDiffusionConfig, top["diffusion"], "diffusion", exclude=set(_LDM_NESTED) - {"scheduler"},
                    extra={"unet": unet, "first_stage": fs, "cond_stage": cond},
                    nested={"scheduler": lambda v, w: _ours_scheduler(r, v, w)})
    return ModelConfig("ldm", _check_ldm(r, d, "diffusion", "unet"), lr, name=name, source=source)
