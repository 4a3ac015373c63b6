"""Training configs: a model config (upstream YAML or ldmcli's format, read by :mod:`ldmcli.config`) plus how to
train it, all validated before any work starts.

Accepted documents:

* an upstream training YAML (``model:``, ``data: {target: main.DataModuleFromConfig, params: {...}}``,
  ``lightning: {trainer: {...}, callbacks: {image_logger: {params: {...}}}}``);
* ldmcli's format (``ldmcli_config: 1`` ...) with two more sections, ``data:`` (upstream's ``data.params``) and
  ``training:`` (the :class:`TrainSettings` fields);
* the name of a training preset shipped in ``ldmcli/presets/train/`` (``ldm train-ae --config digits-kl``).

Command-line options override the file.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from ldmcli import config as model_config
from ldmcli.errors import UsageError

PRECISIONS = ("32", "32-true", "16-mixed", "bf16-mixed", "bf16-true", "64", "64-true")
STRATEGIES = ("auto", "ddp", "ddp_spawn", "fsdp")
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")
_TRAINER_KEYS = {  # upstream lightning.trainer keys → TrainSettings fields
    "max_steps": "max_steps", "max_epochs": "max_epochs", "accumulate_grad_batches": "accumulate",
    "precision": "precision", "num_nodes": "num_nodes", "devices": "devices", "accelerator": "accelerator",
    "strategy": "strategy", "log_every_n_steps": "log_every",
}
_TRAINER_IGNORED = {"benchmark", "num_sanity_val_steps", "val_check_interval", "check_val_every_n_epoch",
                    "limit_val_batches", "gradient_clip_val"}


@dataclass(frozen=True)
class DatasetConfig:
    target: str
    params: Mapping[str, Any]


@dataclass(frozen=True)
class DataConfig:
    """Upstream's ``DataModuleFromConfig`` parameters (the validation set is evaluated every ``val_every`` steps;
    a test set is accepted and not used)."""

    batch_size: int
    train: DatasetConfig
    num_workers: int | None = None
    wrap: bool = False
    validation: DatasetConfig | None = None
    test: Mapping[str, Any] | None = None
    use_worker_init_fn: bool = False
    shuffle_val_dataloader: bool = False
    shuffle_test_loader: bool = False


@dataclass(frozen=True)
class TrainSettings:
    """How to train: steps, devices, precision, logging and checkpoint cadence, seed, condition dropping."""

    max_steps: int | None = None
    max_epochs: int | None = None
    accumulate: int = 1
    precision: str = "32"
    accelerator: str = "auto"
    devices: Any = 1
    num_nodes: int = 1
    strategy: str = "auto"
    seed: int = 23
    scale_lr: bool = True
    cond_drop: float = 0.0
    checkpoint_every: int = 500
    keep_every: int = 0
    log_images_every: int = 1000
    max_images: int = 8
    increase_log_steps: bool = False
    log_every: int = 50
    sample_steps: int = 50
    record_examples: bool = False
    val_every: int = 500
    val_fraction: float = 0.0
    eval_every: int = 0
    eval_samples: int = 0
    eval_ref: str | None = None
    eval_sampler: str = "ddim"
    eval_steps: int = 50
    eval_scale: float = 1.0


@dataclass(frozen=True)
class TrainConfig:
    """Everything a run needs; ``model_doc`` is the model part as written (for first-stage ``ckpt_path`` hints)."""

    model: model_config.ModelConfig
    data: DataConfig | None
    settings: TrainSettings
    name: str
    model_doc: Mapping[str, Any] = dataclasses.field(default_factory=dict, compare=False)


def preset_names() -> list[str]:
    """The shipped training presets (``ldmcli/presets/train``)."""
    return model_config.preset_names("train")


def _reader(source: str) -> model_config.Reader:
    return model_config.Reader(source)  # the model configs' validator: same messages, same rules


def _check_settings(r: Any, s: TrainSettings, where: str) -> TrainSettings:
    def bad(field: str, msg: str) -> UsageError:
        return r.fail(f"{where}.{field}" if where else field, msg)

    for name in ("max_steps", "max_epochs"):
        v = getattr(s, name)
        if v is not None and v <= 0:
            raise bad(name, "must be a positive integer")
    for name in ("accumulate", "num_nodes", "max_images", "log_every", "sample_steps", "val_every"):
        if getattr(s, name) < 1:
            raise bad(name, "must be at least 1")
    for name in ("checkpoint_every", "keep_every", "log_images_every"):
        if getattr(s, name) < 0:
            raise bad(name, "must be 0 (off) or a positive integer")
    if str(s.precision) not in PRECISIONS:
        raise bad("precision", f"must be one of {', '.join(PRECISIONS)}, not {s.precision!r}")
    if s.strategy not in STRATEGIES:
        raise bad("strategy", f"must be one of {', '.join(STRATEGIES)}, not {s.strategy!r}")
    if s.accelerator not in ACCELERATORS:
        raise bad("accelerator", f"must be one of {', '.join(ACCELERATORS)}, not {s.accelerator!r}")
    if not 0.0 <= s.val_fraction < 1.0:
        raise bad("val_fraction", f"must be in [0, 1), not {s.val_fraction}")
    if not 0.0 <= s.cond_drop < 1.0:
        raise bad("cond_drop", f"must be in [0, 1), not {s.cond_drop}")
    _check_eval(s, bad)
    devices = s.devices
    if isinstance(devices, bool) or not (
        (isinstance(devices, int) and devices >= 1) or devices == "auto"
        or (isinstance(devices, (list, tuple)) and devices and all(isinstance(d, int) and d >= 0 for d in devices))
    ):
        raise bad("devices", f"must be a positive number, a list of device indices or 'auto', not {devices!r}")
    return dataclasses.replace(s, precision=str(s.precision),
                               devices=list(devices) if isinstance(devices, tuple) else devices)


def _check_eval(s: TrainSettings, bad: Any) -> None:
    """FID during training: both of ``eval_every`` (steps) and ``eval_samples`` (images, at least 2), or neither."""
    if s.eval_every < 0:
        raise bad("eval_every", "must be 0 (off) or a positive integer")
    if s.eval_samples < 0:
        raise bad("eval_samples", "must be 0 (off) or at least 2")
    if s.eval_every and not s.eval_samples:
        raise bad("eval_every", "needs eval_samples too (how many images to sample for FID)")
    if s.eval_samples and not s.eval_every:
        raise bad("eval_samples", "needs eval_every too (how many steps between FID evaluations)")
    if s.eval_samples == 1:
        raise bad("eval_samples", "must be at least 2 (FID compares two sets' covariances)")
    if s.eval_steps < 1:
        raise bad("eval_steps", "must be at least 1")
    if not math.isfinite(s.eval_scale):
        raise bad("eval_scale", f"must be a number, not {s.eval_scale}")


def parse_settings(value: Any, source: str, where: str = "training", base: TrainSettings | None = None) -> TrainSettings:
    r = _reader(source)
    data = r.mapping(value or {}, where)
    if "precision" in data and isinstance(data["precision"], int):
        data["precision"] = str(data["precision"])
    if data.get("precision") in ("16", "bf16"):  # Lightning 1.x spellings
        data["precision"] = f"{data['precision']}-mixed"
    devices = data.pop("devices", None)
    s = r.dataclass(TrainSettings, data, where, exclude={"devices"})
    if base is not None:
        s = dataclasses.replace(base, **{k: getattr(s, k) for k in data})
    if devices is not None:
        s = dataclasses.replace(s, devices=devices)
    return _check_settings(r, s, where)


def parse_data(value: Any, source: str, where: str = "data") -> DataConfig:
    r = _reader(source)
    data = r.mapping(value, where)
    if "target" in data:  # upstream: {target: main.DataModuleFromConfig, params: {...}}
        target, params = r.target_block(data, where)
        if target not in ("main.DataModuleFromConfig", "ldmcli.DataModule"):
            raise r.fail(f"{where}.target", f"unknown data module {target!r} (expected main.DataModuleFromConfig)")
        data, where = params, f"{where}.params"

    def dataset(v: Any, w: str) -> DatasetConfig:
        t, p = r.target_block(v, w)
        if not isinstance(t, str):
            raise r.fail(f"{w}.target", "must be a string")
        from ldmcli.training.data import DATASETS

        if t not in DATASETS:
            raise r.fail(f"{w}.target", f"unknown dataset {t!r}{model_config.did_you_mean(t, list(DATASETS))} "
                                        f"(known: {', '.join(sorted(DATASETS))})")
        return DatasetConfig(t, p)

    if "train" not in data:
        raise r.fail(f"{where}.train", "missing required key (the training dataset)")
    passthrough = {"validation": dataset, "test": lambda v, w: r.mapping(v, w)}
    cfg = r.dataclass(DataConfig, data, where, nested={"train": dataset, **passthrough}, ignored={"predict"})
    if cfg.batch_size < 1:
        raise r.fail(f"{where}.batch_size", "must be at least 1")
    if cfg.num_workers is not None and cfg.num_workers < 0:
        raise r.fail(f"{where}.num_workers", "must be 0 or more")
    return cfg


def _upstream_lightning(r: Any, value: Any) -> dict[str, Any]:
    """Map upstream's ``lightning:`` section to :class:`TrainSettings` fields."""
    top = r.mapping(value or {}, "lightning")
    out: dict[str, Any] = {}
    trainer = r.mapping(top.get("trainer") or {}, "lightning.trainer")
    for key, val in trainer.items():
        if key == "gpus":  # Lightning 1.x: "0,1" or a count
            ids = [g for g in str(val).split(",") if g.strip()]
            if not ids or not all(g.strip().isdigit() for g in ids):
                raise r.fail("lightning.trainer.gpus", f"expected device indices like '0,1', got {val!r}")
            out["accelerator"] = "gpu"
            out["devices"] = [int(g) for g in ids] if "," in str(val) else int(ids[0])
        elif key in _TRAINER_KEYS:
            out[_TRAINER_KEYS[key]] = val
        elif key not in _TRAINER_IGNORED:
            raise r.fail(f"lightning.trainer.{key}", f"unsupported trainer option "
                                                     f"(known: {', '.join(sorted(_TRAINER_KEYS))})")
    callbacks = r.mapping(top.get("callbacks") or {}, "lightning.callbacks")
    logger = callbacks.get("image_logger")
    if logger is not None:
        params = r.mapping(r.mapping(logger, "lightning.callbacks.image_logger").get("params") or {},
                           "lightning.callbacks.image_logger.params")
        mapping = {"batch_frequency": "log_images_every", "max_images": "max_images",
                   "increase_log_steps": "increase_log_steps"}
        for key, val in params.items():
            if key in mapping:
                out[mapping[key]] = val
    return out


def parse_train_config(doc: Any, source: str, name: str) -> TrainConfig:
    """A parsed training document (either format) → :class:`TrainConfig`."""
    r = _reader(source)
    top = r.mapping(doc, "")
    if model_config.FORMAT_KEY in top:
        model_doc = {k: v for k, v in top.items() if k not in ("data", "training", "lightning")}
        model = model_config.config_from_dict(model_doc, source, name=model_doc.get("name"))
        settings_doc = dict(_upstream_lightning(r, top.get("lightning")))
        settings_doc.update(r.mapping(top.get("training") or {}, "training"))
        settings = parse_settings(settings_doc, source)
        data = parse_data(top["data"], source) if top.get("data") is not None else None
    else:
        if "training" in top:
            extra = r.mapping(top["training"], "training")
        else:
            extra = {}
        model_doc = {k: v for k, v in top.items() if k not in ("training",)}
        model = model_config.from_upstream(model_doc, source)
        settings_doc = _upstream_lightning(r, top.get("lightning"))
        settings_doc.update(extra)
        settings = parse_settings(settings_doc, source, where="lightning.trainer")
        data = parse_data(top["data"], source) if top.get("data") is not None else None
    return TrainConfig(model=model, data=data, settings=settings, name=name, model_doc=model_doc)


def load_train_config(name_or_path: str | os.PathLike) -> TrainConfig:
    """A training preset name, or a training config file (YAML/JSON, either format)."""
    text = os.fspath(name_or_path)
    path = Path(text).expanduser()
    if not path.is_file() and text in preset_names():
        return parse_train_config(model_config.read_preset(text, "train"), f"preset {text}", text)
    if not path.is_file():
        known = preset_names()
        raise UsageError(f"training config not found: {text}"
                         + (f" (a file, or a preset: {', '.join(known)})" if known else ""))
    return parse_train_config(model_config.read_config_file(path), str(path), path.stem)


def settings_to_dict(s: TrainSettings) -> dict[str, Any]:
    return {f.name: getattr(s, f.name) for f in dataclasses.fields(s)}


def data_to_dict(d: DataConfig) -> dict[str, Any]:
    out = {"batch_size": d.batch_size, "train": {"target": d.train.target, "params": dict(d.train.params)}}
    if d.num_workers is not None:
        out["num_workers"] = d.num_workers
    if d.validation is not None:
        out["validation"] = {"target": d.validation.target, "params": dict(d.validation.params)}
    return out


def train_config_to_dict(cfg: TrainConfig) -> dict[str, Any]:
    """The resolved run config in ldmcli's format (model, data, training): what ``--resume`` reads back."""
    out = model_config.config_to_dict(cfg.model)
    if cfg.data is not None:
        out["data"] = data_to_dict(cfg.data)
    out["training"] = settings_to_dict(cfg.settings)
    return out
