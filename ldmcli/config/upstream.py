"""Upstream latent-diffusion YAML (``model: {target: ..., params: ...}``) to a typed :class:`ModelConfig`."""

from __future__ import annotations

from typing import Any

from ldmcli.config.registry import (
    COND_SENTINELS, COND_TARGETS, LOSS_TARGETS, MODEL_TARGETS, SCHEDULER_TARGETS, UNET_TARGETS, _IGNORED_IO_KEYS,
)
from ldmcli.config.schema import (
    CondStageConfig, CyclesParams, DDConfig, FirstStageConfig, LatentDiffusionConfig, LossConfig, ModelConfig,
    SchedulerConfig, UNetConfig, _COND_PARAMS, _LOSS_PARAMS, _SCHEDULER_PARAMS, _VQ_ONLY,
)
from ldmcli.config.reader import Reader
from ldmcli.config.checks import _check_cond, _check_ddconfig, _check_first_stage, _check_ldm, _check_loss, _check_unet

# ------------------------------------------------------------------------------------- upstream YAML → config


def _upstream_loss(r: Reader, value: Any, where: str) -> LossConfig:
    target, params = r.target_block(value, where)
    kind = r.target(target, LOSS_TARGETS, f"{where}.target", "loss")
    if kind in ("none", "dummy"):
        if params:
            raise r.fail(f"{where}.params", f"{target} takes no parameters")
        return LossConfig(kind)
    return _check_loss(r, LossConfig(kind, r.dataclass(_LOSS_PARAMS[kind], params, f"{where}.params")),
                       f"{where}.params")


def _upstream_scheduler(r: Reader, value: Any, where: str) -> SchedulerConfig:
    target, params = r.target_block(value, where)
    kind = r.target(target, SCHEDULER_TARGETS, f"{where}.target", "learning-rate scheduler")
    return _scheduler(r, kind, params, f"{where}.params")


def _scheduler(r: Reader, kind: str, params: Any, where: str) -> SchedulerConfig:
    p = r.dataclass(_SCHEDULER_PARAMS[kind], params, where)
    if isinstance(p, CyclesParams):
        lengths = {len(p.warm_up_steps), len(p.f_min), len(p.f_max), len(p.f_start), len(p.cycle_lengths)}
        if len(lengths) != 1:
            raise r.fail(where, "warm_up_steps, f_min, f_max, f_start and cycle_lengths need one entry per cycle")
    return SchedulerConfig(kind, p)


def _upstream_first_stage(r: Reader, kind: str, params: Any, where: str) -> FirstStageConfig:
    data = r.mapping(params, where)
    if kind != "kl" and "use_ema" in data:  # upstream VQModel's EMA of the whole autoencoder: unused by the zoo
        if r.coerce(data.pop("use_ema"), bool, f"{where}.use_ema"):
            raise r.fail(f"{where}.use_ema", "an EMA of the first stage is not supported")
    exclude = _VQ_ONLY if kind == "kl" else frozenset()
    fs = r.dataclass(
        FirstStageConfig, data, where, ignored=_IGNORED_IO_KEYS, exclude=exclude | {"type"}, extra={"type": kind},
        aliases={"lossconfig": "loss", "scheduler_config": "scheduler"},
        nested={"ddconfig": lambda v, w: _check_ddconfig(r, r.dataclass(DDConfig, v, w), w),
                "loss": lambda v, w: _upstream_loss(r, v, w),
                "scheduler": lambda v, w: _upstream_scheduler(r, v, w)})
    if "lossconfig" not in data:
        raise r.fail(f"{where}.lossconfig", "missing required key")
    return _check_first_stage(r, fs, where)


def _upstream_cond(r: Reader, value: Any, where: str) -> CondStageConfig:
    if isinstance(value, str):
        if value not in COND_SENTINELS:
            raise r.fail(where, f"unknown conditioner {value!r} (expected a target block or one of "
                                f"{', '.join(COND_SENTINELS)})")
        return CondStageConfig(COND_SENTINELS[value])
    target, params = r.target_block(value, where)
    kind = r.target(target, COND_TARGETS, f"{where}.target", "conditioner")
    if kind == "identity":
        if params:
            raise r.fail(f"{where}.params", "torch.nn.Identity takes no parameters")
        return CondStageConfig("identity")
    ignored = frozenset({"device"})  # upstream's device keyword: the module follows its parameters instead
    return _check_cond(r, CondStageConfig(kind, r.dataclass(_COND_PARAMS[kind], params, f"{where}.params",
                                                             ignored=ignored)), f"{where}.params")


def _upstream_ldm(r: Reader, params: Any, where: str) -> LatentDiffusionConfig:
    data = r.mapping(params, where)
    for key in ("unet_config", "first_stage_config", "cond_stage_config"):
        if key not in data:
            raise r.fail(f"{where}.{key}", "missing required key")
    concat_mode = r.coerce(data.pop("concat_mode", True), bool, f"{where}.concat_mode")
    r.coerce(data.pop("load_only_unet", False), bool, f"{where}.load_only_unet")  # checkpoint I/O, like ckpt_path

    def unet(v: Any, w: str) -> UNetConfig:
        target, p = r.target_block(v, w)
        r.target(target, UNET_TARGETS, f"{w}.target", "UNet")
        return _check_unet(r, r.dataclass(UNetConfig, p, f"{w}.params"), f"{w}.params")

    def first_stage(v: Any, w: str) -> FirstStageConfig:
        target, p = r.target_block(v, w)
        kind = r.target(target, MODEL_TARGETS, f"{w}.target", "first-stage")
        if kind == "ldm":
            raise r.fail(f"{w}.target", "a first stage must be an autoencoder")
        return _upstream_first_stage(r, kind, p, f"{w}.params")

    cond = _upstream_cond(r, data.pop("cond_stage_config"), f"{where}.cond_stage_config")
    # upstream: an explicit conditioning_key wins, else concat_mode picks concat or crossattn; unconditional → None
    key = data.pop("conditioning_key", None)
    if key is None:
        key = "concat" if concat_mode else "crossattn"
    if cond.type == "unconditional":
        key = None
    d = r.dataclass(
        LatentDiffusionConfig, data, where, ignored=_IGNORED_IO_KEYS,
        extra={"conditioning_key": key, "cond_stage": cond},
        aliases={"unet_config": "unet", "first_stage_config": "first_stage", "scheduler_config": "scheduler"},
        nested={"unet": unet, "first_stage": first_stage, "scheduler": lambda v, w: _upstream_scheduler(r, v, w)})
    return _check_ldm(r, d, where, f"{where}.unet_config.params")


def from_upstream(doc: Any, source: str = "<config>") -> ModelConfig:
    """An upstream latent-diffusion YAML document (already parsed) → :class:`ModelConfig`."""
    r = Reader(source)
    top = r.mapping(doc, "")
    for key in top:
        if key not in ("model", "data", "lightning"):
            raise r.fail(key, "unknown top-level key (expected model, data, lightning)")
    if "model" not in top:
        raise r.fail("model", "missing required key")
    model = r.mapping(top["model"], "model")
    unknown = set(model) - {"target", "params", "base_learning_rate"}
    if unknown:
        raise r.fail(f"model.{sorted(unknown)[0]}", "unknown key (expected target, params, base_learning_rate)")
    target, params = r.target_block({k: v for k, v in model.items() if k != "base_learning_rate"}, "model")
    kind = r.target(target, MODEL_TARGETS, "model.target", "model")
    lr = model.get("base_learning_rate")
    lr = r.coerce(lr, float, "model.base_learning_rate") if lr is not None else None
    if kind == "ldm":
        return ModelConfig("ldm", _upstream_ldm(r, params, "model.params"), lr, source=source)
    return ModelConfig("first_stage", _upstream_first_stage(r, kind, params, "model.params"), lr, source=source)
