"""One training run: validate everything, set up the run folder, build model and data, run the Lightning Trainer.

Run folder (upstream main.py's layout)::

    logs/<YYYY-MM-DDTHH-MM-SS>_<config name>/
        config.yaml            the model config (ldmcli format): ldm sample / load_model read it
        train.yaml             model + data + training settings as resolved: what --resume reads
        checkpoints/last.ckpt  (+ step-NNNNNNN.ckpt), checkpoints/config.yaml (a copy, for -r <ckpt>)
        model.ckpt             weights and config only, written when training ends
        metrics.csv            (+ TensorBoard event files when tensorboard is installed)
        images/train/*.png     reconstructions (autoencoders) or samples (LDMs)

DDP runs relaunch the command once per extra process (Lightning's subprocess launcher); those processes find the
run folder in ``LDMCLI_RUN_DIR`` and write nothing but their share of checkpoints' collective calls.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import logging
import os
import re
import signal
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ldmcli import config as model_config
from ldmcli.errors import CheckpointError, UsageError
from ldmcli.fileio import atomic_write_text
from ldmcli.training import data as data_mod
from ldmcli.training.config import (
    TrainConfig,
    TrainSettings,
    load_train_config,
    parse_train_config,
    train_config_to_dict,
)

Progress = Callable[[dict[str, Any]], None]
RUN_DIR_ENV = "LDMCLI_RUN_DIR"
KINDS = ("autoencoder", "ldm")


@dataclass
class RunResult:
    """Where the run wrote its files, and where it stopped."""

    run_dir: Path
    checkpoint: Path
    model_checkpoint: Path | None
    global_step: int
    skipped_images: int = 0


def _emit(callback: Progress | None, event: dict[str, Any]) -> None:
    if callback is not None:
        callback(event)


# ----------------------------------------------------------------------------------------------- resume paths

def resolve_resume(resume: str | os.PathLike) -> tuple[Path, Path]:
    """``--resume LOGDIR_OR_CKPT`` → (run folder, checkpoint), as upstream: a file inside ``<logdir>/checkpoints/``
    or a run folder (its ``checkpoints/last.ckpt``)."""
    path = Path(resume).expanduser()
    if not path.exists():
        raise UsageError(f"cannot resume: {path} does not exist")
    if path.is_file():
        run_dir = path.parent.parent if path.parent.name == "checkpoints" else path.parent
        ckpt = path
    else:
        run_dir, ckpt = path, path / "checkpoints" / "last.ckpt"
        if not ckpt.is_file():
            raise UsageError(f"cannot resume: {run_dir} has no checkpoints/last.ckpt")
    if not (run_dir / "train.yaml").is_file():
        raise UsageError(f"cannot resume: {run_dir} has no train.yaml (is it a run folder of ldm train-ae/train-ldm?)")
    return run_dir, ckpt


def new_run_dir(logdir: str | os.PathLike, name: str, now: _dt.datetime | None = None) -> Path:
    """``<logdir>/<YYYY-MM-DDTHH-MM-SS>_<name>`` (a numeric suffix if two runs start in the same second)."""
    stamp = (now or _dt.datetime.now()).strftime("%Y-%m-%dT%H-%M-%S")
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "run"
    base = Path(logdir).expanduser() / f"{stamp}_{safe}"
    path, k = base, 1
    while path.exists():
        k += 1
        path = base.with_name(f"{base.name}-{k}")
    return path


def _write_yaml(path: Path, doc: Any) -> None:
    import yaml

    atomic_write_text(path, yaml.safe_dump(doc, sort_keys=False))


# ------------------------------------------------------------------------------------------- first stage weights

def _read_own_checkpoint(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return {}


def _first_stage_from(spec: str, callback: Progress | None) -> tuple[model_config.FirstStageConfig, dict[str, Any]]:
    """A zoo first stage name, a train-ae checkpoint, or a train-ae run folder → (config, weights)."""
    from ldmcli import checkpoint as ckpt_io

    path = Path(spec).expanduser()
    if path.is_dir():
        for candidate in (path / "model.ckpt", path / "checkpoints" / "last.ckpt"):
            if candidate.is_file():
                path = candidate
                break
        else:
            raise UsageError(f"first stage {spec}: no model.ckpt or checkpoints/last.ckpt in that folder")
    if path.is_file():
        own = _read_own_checkpoint(path)
        cfg_doc = own.get("ldmcli_config") if isinstance(own, dict) else None
        if cfg_doc is None:
            for cfg_path in (path.parent / "config.yaml", path.parent.parent / "config.yaml"):
                if cfg_path.is_file():
                    cfg = model_config.load_config(cfg_path)
                    break
            else:
                raise UsageError(f"first stage {path}: no config stored with it (expected a train-ae checkpoint or "
                                 "a config.yaml next to it)")
        else:
            cfg = model_config.config_from_dict(dict(cfg_doc), str(path))
        state = own.get("state_dict") if own else None
        if state is None:
            state = ckpt_io.load_checkpoint(path).state_dict
    else:
        from ldmcli import store, zoo

        entry = zoo.get(spec)  # UnknownModelError for a bad name
        if entry.kind != "first_stage":
            raise UsageError(f"{spec} is not a first-stage model (see ldm download --list)")
        cfg = model_config.load_config(entry.arch or entry.name)
        _emit(callback, {"event": "message", "text": f"first stage {entry.name}: using the zoo checkpoint"})
        state = ckpt_io.load_checkpoint(store.checkpoint_path(entry.name)).state_dict
    if cfg.kind != "first_stage":
        raise UsageError(f"{spec} is not a first-stage model (its config describes an LDM)")
    fs = cfg.first_stage
    fs = dataclasses.replace(fs, type="vq_interface" if fs.is_vq else fs.type, loss=model_config.LossConfig("none"))
    return fs, {k: v for k, v in state.items() if not k.startswith("loss.")}


_ZOO_HINT = re.compile(r"first_stage_models/([A-Za-z0-9_.-]+)/")


def _first_stage_hint(cfg: TrainConfig) -> str | None:
    """An upstream config's ``first_stage_config.params.ckpt_path`` (e.g. models/first_stage_models/kl-f8/...),
    as an existing file or the zoo name it points at."""
    try:
        ckpt = cfg.model_doc["model"]["params"]["first_stage_config"]["params"]["ckpt_path"]
    except (KeyError, TypeError):
        return None
    if not isinstance(ckpt, str):
        return None
    if Path(ckpt).expanduser().is_file():
        return ckpt
    m = _ZOO_HINT.search(ckpt)
    return m.group(1) if m else None


def _with_first_stage(cfg: model_config.ModelConfig, fs: model_config.FirstStageConfig) -> model_config.ModelConfig:
    ldm = dataclasses.replace(cfg.ldm, first_stage=fs)
    new = dataclasses.replace(cfg, model=ldm)
    # a round trip re-runs the model config's consistency checks (latent channels vs the UNet, ...)
    return model_config.config_from_dict(model_config.config_to_dict(new), f"{cfg.source} with that first stage",
                                         name=cfg.name)


# ----------------------------------------------------------------------------------------------- conditioning

def _null_class(n_classes: int, key: str) -> Callable[[Any, torch.Tensor], Any]:
    def null(batch: Any, drop: torch.Tensor) -> Any:
        labels = batch[key].clone()
        labels[drop.to(labels.device)] = n_classes - 1
        return {**batch, key: labels}

    return null


def _null_text(captions: Any, drop: torch.Tensor) -> Any:
    return ["" if d else c for c, d in zip(captions, drop.tolist())]


def _null_condition(cfg: model_config.ModelConfig) -> Callable[[Any, torch.Tensor], Any]:
    cond = cfg.ldm.cond_stage
    if cond.type == "class":
        if cfg.ldm.cond_stage_key != "class_label":
            raise UsageError("--cond-drop with class conditioning needs cond_stage_key: class_label")
        return _null_class(cond.params.n_classes, cond.params.key)
    if cond.type == "bert" and cfg.ldm.cond_stage_key == "caption":
        return _null_text
    raise UsageError(f"--cond-drop needs class or text conditioning; this model's conditioner is {cond.type!r}")


# ---------------------------------------------------------------------------------------------------- trainer

def _devices_and_accelerator(s: TrainSettings, gpus: str | None) -> tuple[str, Any]:
    if gpus is not None:
        ids = [g for g in gpus.split(",") if g.strip()]
        try:
            devices = [int(g) for g in ids]
        except ValueError:
            raise UsageError(f"--gpus takes device indices like 0,1 (got {gpus!r})") from None
        if not devices:
            raise UsageError("--gpus needs at least one device index, e.g. --gpus 0,")
        return "gpu", devices
    return s.accelerator, s.devices


def _num_devices(devices: Any) -> int:
    if isinstance(devices, list):
        return len(devices)
    return devices if isinstance(devices, int) else 1


def _strategy(name: str, kind: str) -> Any:
    if name == "ddp" and kind == "autoencoder":
        from lightning.pytorch.strategies import DDPStrategy

        # the two optimizers take turns, so each backward leaves the other network's parameters without gradients
        return DDPStrategy(find_unused_parameters=True)
    return name


@contextlib.contextmanager
def _quiet_lightning() -> Iterator[None]:
    """Lightning's info logs and hints stay out of the CLI's output for the duration of the run."""
    loggers = [logging.getLogger(n) for n in ("lightning.pytorch", "lightning.fabric", "lightning")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module="lightning")
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*_pytree.*")
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)


@contextlib.contextmanager
def _env(name: str, value: str) -> Iterator[None]:
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def _lpips_weights(net: Any, callback: Progress | None) -> None:
    loss = getattr(net, "loss", None)
    if loss is None or getattr(loss, "perceptual_weight", 0) <= 0:
        return
    from ldmcli import store

    folder = store.asset_path("lpips")
    loss.perceptual_loss.load_pretrained(folder / "vgg16-397923af.pth", folder / "vgg.pth")
    _emit(callback, {"event": "message", "text": f"LPIPS weights from {folder}"})


def _check_kind(cfg: model_config.ModelConfig, kind: str) -> None:
    if kind == "autoencoder":
        if cfg.kind != "first_stage":
            raise UsageError("train-ae trains a first stage: this config describes a latent diffusion model "
                             "(use ldm train-ldm)")
        if cfg.first_stage.loss.type not in ("lpips_kl", "vqlpips"):
            raise UsageError("train-ae needs a training loss in the config (lossconfig LPIPSWithDiscriminator or "
                             "VQLPIPSWithDiscriminator), not " + repr(cfg.first_stage.loss.type))
        if cfg.first_stage.type == "vq_interface":
            raise UsageError("train-ae trains VQModel, not VQModelInterface (the LDM-side view)")
    elif cfg.kind != "ldm":
        raise UsageError("train-ldm trains a latent diffusion model: this config describes a first stage "
                         "(use ldm train-ae)")


def _check_labels(cfg: model_config.ModelConfig, dataset: Any, cond_drop: float) -> None:
    ldm = cfg.ldm
    if ldm is None or ldm.conditioning_key is None:
        return
    if ldm.cond_stage.type == "class":
        labels = getattr(dataset, "labels", None)
        if labels is None:
            raise data_mod.DataError("class-conditional training needs class labels: put the images in one "
                                     "sub-folder per class")
        n = ldm.cond_stage.params.n_classes - (1 if cond_drop > 0 else 0)
        if max(labels) >= n:
            raise UsageError(f"the data has {max(labels) + 1} classes but the conditioner has n_classes "
                             f"{ldm.cond_stage.params.n_classes}" + (" (one is reserved as the null class of "
                                                                     "--cond-drop)" if cond_drop > 0 else ""))
    if ldm.cond_stage_key == "caption" and getattr(dataset, "captions", None) is None:
        raise data_mod.DataError("text-conditional training needs captions: a .txt next to each image")


@dataclass
class _Plan:
    """A validated run: config (first stage resolved), where it resumes from, devices."""

    cfg: TrainConfig
    run_dir: Path | None
    ckpt_path: Path | None
    fs_state: dict[str, Any] | None
    null_condition: Callable[[Any, torch.Tensor], Any] | None
    accelerator: str
    devices: Any


def _plan(kind: str, config: str | os.PathLike | None, resume: str | os.PathLike | None,
          overrides: dict[str, Any] | None, data_root: str | os.PathLike | None, batch_size: int | None,
          num_workers: int | None, first_stage: str | None, gpus: str | None, callback: Progress | None) -> _Plan:
    """Read and check the config, the command-line overrides, the data settings and the first stage."""
    ckpt_path: Path | None = None
    if resume is not None:
        if config is not None:
            raise UsageError("--resume takes the run's own config: drop --config")
        run_dir, ckpt_path = resolve_resume(resume)
        import yaml

        doc = yaml.safe_load((run_dir / "train.yaml").read_text(encoding="utf-8"))
        cfg = parse_train_config(doc, str(run_dir / "train.yaml"), run_dir.name.split("_", 1)[-1])
    else:
        if config is None:
            raise UsageError("--config is required (a training preset or a config file), or --resume a run")
        cfg = load_train_config(config)
        run_dir = None
    _check_kind(cfg.model, kind)
    settings = cfg.settings
    if overrides:
        unknown = set(overrides) - {f.name for f in dataclasses.fields(TrainSettings)}
        if unknown:
            raise ValueError(f"unknown training settings {sorted(unknown)}")
        from ldmcli.training.config import _check_settings, _reader

        settings = _check_settings(_reader("the command line"), dataclasses.replace(settings, **overrides), "")
    if settings.max_steps is None and settings.max_epochs is None:
        raise UsageError("set how long to train: --max-steps or --max-epochs (or max_steps in the config)")
    if cfg.data is None and data_root is None:
        raise UsageError("no training data: give --data FOLDER or a data: section in the config")
    data_cfg = cfg.data
    if data_root is not None:
        size = cfg.model.pixel_size
        params = {"root": str(Path(data_root).expanduser().resolve()), "size": size}  # absolute: --resume anywhere
        if data_cfg is not None and data_cfg.train.target == "folder":
            params = {**dict(data_cfg.train.params), **params}
        from ldmcli.training.config import DataConfig, DatasetConfig

        base = data_cfg or DataConfig(batch_size=batch_size or 8, train=DatasetConfig("folder", {}))
        data_cfg = dataclasses.replace(base, train=DatasetConfig("folder", params))
    if batch_size is not None:
        if batch_size < 1:
            raise UsageError("--batch-size must be at least 1")
        data_cfg = dataclasses.replace(data_cfg, batch_size=batch_size)
    if num_workers is not None:
        if num_workers < 0:
            raise UsageError("--num-workers must be 0 or more")
        data_cfg = dataclasses.replace(data_cfg, num_workers=num_workers)
    accelerator, devices = _devices_and_accelerator(settings, gpus)
    null_condition = None
    if kind == "ldm" and settings.cond_drop > 0:
        null_condition = _null_condition(cfg.model)
    model_cfg = cfg.model
    fs_state: dict[str, Any] | None = None
    if kind == "ldm" and ckpt_path is None:
        spec = first_stage or _first_stage_hint(cfg)
        if spec is None:
            raise UsageError("train-ldm needs a trained first stage: --first-stage NAME_OR_PATH (a zoo first stage "
                             "such as kl-f8, or a train-ae checkpoint or run folder)")
        fs_cfg, fs_state = _first_stage_from(spec, callback)
        model_cfg = _with_first_stage(model_cfg, fs_cfg)
    elif first_stage is not None and ckpt_path is not None:
        raise UsageError("--first-stage cannot change a resumed run (its checkpoint holds the first stage)")
    cfg = dataclasses.replace(cfg, model=model_cfg, data=data_cfg, settings=settings)
    return _Plan(cfg, run_dir, ckpt_path, fs_state, null_condition, accelerator, devices)


def train(
    kind: str,
    config: str | os.PathLike | None = None,
    *,
    resume: str | os.PathLike | None = None,
    overrides: dict[str, Any] | None = None,
    data_root: str | os.PathLike | None = None,
    batch_size: int | None = None,
    num_workers: int | None = None,
    first_stage: str | None = None,
    gpus: str | None = None,
    logdir: str | os.PathLike = "logs",
    name: str | None = None,
    callback: Progress | None = None,
) -> RunResult:
    """Train an autoencoder (``kind="autoencoder"``) or a latent diffusion model (``kind="ldm"``).

    ``config`` is a training preset name or a config file; ``resume`` a run folder or one of its checkpoints
    (the run's own ``train.yaml`` is then the config). ``overrides`` are :class:`TrainSettings` fields. Every
    value is checked before the run folder is created or anything heavy is loaded."""
    import lightning as L

    from ldmcli.training import callbacks as cb
    from ldmcli.training.modules import AutoencoderModule, LatentDiffusionModule

    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}")
    plan = _plan(kind, config, resume, overrides, data_root, batch_size, num_workers, first_stage, gpus, callback)
    cfg, run_dir, ckpt_path, fs_state = plan.cfg, plan.run_dir, plan.ckpt_path, plan.fs_state
    null_condition, accelerator, devices = plan.null_condition, plan.accelerator, plan.devices
    model_cfg, data_cfg, settings = cfg.model, cfg.data, cfg.settings

    # ---- data (built before any folder is written: a missing or empty dataset fails here)
    dataset = data_mod.build_dataset(data_cfg.train.target, data_cfg.train.params, callback)
    report = getattr(dataset, "report", None)
    if report is not None and report.skipped:
        _emit(callback, {"event": "warning", "text": f"skipped {len(report.skipped)} unreadable image(s), e.g. "
                                                     f"{report.skipped[0][0]} ({report.skipped[0][1]})",
                         "skipped": len(report.skipped)})
    if report is not None and model_cfg.ldm is not None and model_cfg.ldm.cond_stage_key == "caption" \
            and report.missing_captions:
        _emit(callback, {"event": "warning", "text": f"{report.missing_captions} image(s) have no caption .txt: "
                                                     "they train with the empty caption"})
    _check_labels(model_cfg, dataset, settings.cond_drop)

    # ---- trainer (validates devices, precision and strategy before the model is built)
    env_run_dir = os.environ.get(RUN_DIR_ENV)
    # processes the launcher started (LOCAL_RANK > 0) and other nodes' processes write no run files
    is_child = (bool(env_run_dir) and os.environ.get("LOCAL_RANK", "0") != "0") or \
        os.environ.get("NODE_RANK", "0") != "0"
    if is_child and env_run_dir:
        run_dir = Path(env_run_dir)
    elif run_dir is None:
        run_dir = new_run_dir(logdir, name or cfg.name)
    ckpt_dir = run_dir / "checkpoints"
    n_dev = _num_devices(devices)
    lr_base = cfg.model.base_learning_rate
    if lr_base is None:
        raise UsageError("the config has no base_learning_rate")
    lr = settings.accumulate * n_dev * data_cfg.batch_size * lr_base if settings.scale_lr else lr_base
    max_steps = settings.max_steps
    trainer_steps = -1 if max_steps is None else (2 * max_steps if kind == "autoencoder" else max_steps)

    progress_cb = callback or (lambda event: None)
    total = settings.max_steps
    callbacks: list[L.Callback] = []
    if kind == "ldm":
        callbacks.append(cb.EMAUpdate())
    loggers: list[Any] = []
    from lightning.pytorch.loggers import CSVLogger

    loggers.append(CSVLogger(save_dir=str(run_dir), name="", version=""))
    try:
        from lightning.pytorch.loggers import TensorBoardLogger
        import tensorboard  # noqa: F401

        loggers.append(TensorBoardLogger(save_dir=str(run_dir), name="tensorboard", version=""))
    except ImportError:
        pass
    try:
        with _quiet_lightning():
            trainer = L.Trainer(
                accelerator=accelerator, devices=devices, num_nodes=settings.num_nodes,
                strategy=_strategy(settings.strategy, kind), precision=settings.precision,
                max_steps=trainer_steps, max_epochs=settings.max_epochs if settings.max_epochs is not None else -1,
                accumulate_grad_batches=settings.accumulate if kind == "ldm" else 1,
                logger=loggers, callbacks=[], plugins=[cb.AtomicCheckpointIO()],
                enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                use_distributed_sampler=False, log_every_n_steps=settings.log_every, num_sanity_val_steps=0,
                limit_val_batches=0, default_root_dir=str(run_dir),
            )
    except (ValueError, TypeError, RuntimeError) as e:
        raise UsageError(f"cannot set up training: {e}") from None
    except Exception as e:  # Lightning's MisconfigurationException and friends
        raise UsageError(f"cannot set up training: {e}") from None
    rank, world = trainer.global_rank, trainer.world_size
    sampler = data_mod.ResumableSampler(len(dataset), seed=settings.seed, shuffle=True, rank=rank, world_size=world)
    workers = data_cfg.num_workers if data_cfg.num_workers is not None else min(2 * data_cfg.batch_size,
                                                                                os.cpu_count() or 1)
    loader = torch.utils.data.DataLoader(dataset, batch_size=data_cfg.batch_size, sampler=sampler,
                                         num_workers=workers, collate_fn=data_mod.collate,
                                         persistent_workers=False, drop_last=False)
    callbacks.append(cb.DataOrder(sampler, data_cfg.batch_size))
    if settings.record_examples:
        callbacks.append(cb.SeenExamples(run_dir / "examples"))
    callbacks.append(cb.ImageLogger(run_dir / "images" / "train", settings.log_images_every,
                                    settings.increase_log_steps, callback))
    callbacks.append(cb.ProgressReporter(progress_cb, total, every=1))
    callbacks.append(cb.Checkpointer(ckpt_dir, settings.checkpoint_every, settings.keep_every, callback))
    trainer.callbacks.extend(callbacks)  # in this order: EMA, data order, logs, then the checkpoint

    # ---- model
    L.seed_everything(settings.seed, verbose=False)
    net = model_config.build_model(model_cfg)
    if kind == "autoencoder":
        _lpips_weights(net, callback)
        module: Any = AutoencoderModule(net, lr, seed=settings.seed, accumulate=settings.accumulate,
                                        image_logger_images=settings.max_images)
    else:
        if fs_state is not None:
            missing, unexpected = net.first_stage_model.load_state_dict(fs_state, strict=False)
            if missing or unexpected:
                raise CheckpointError(f"the first stage's weights do not match its config (missing "
                                      f"{missing[:2]}, unexpected {unexpected[:2]})")
        module = LatentDiffusionModule(net, lr, seed=settings.seed, cond_drop=settings.cond_drop,
                                       null_condition=null_condition, restarted=ckpt_path is not None,
                                       image_logger_images=settings.max_images, sample_steps=settings.sample_steps,
                                       scheduler_config=model_config.scheduler_dict(model_cfg.ldm.scheduler))
    module.extra_checkpoint = {"ldmcli_config": model_config.config_to_dict(model_cfg)}

    if not is_child:
        run_dir.mkdir(parents=True, exist_ok=True)
        model_doc = model_config.config_to_dict(model_cfg)
        _write_yaml(run_dir / "config.yaml", model_doc)
        _write_yaml(ckpt_dir / "config.yaml", model_doc)
        _write_yaml(run_dir / "train.yaml", train_config_to_dict(cfg))
        _emit(callback, {"event": "run_dir", "path": str(run_dir), "learning_rate": lr,
                         "examples": len(dataset), "resumed_from": str(ckpt_path) if ckpt_path else None})

    sigint = signal.getsignal(signal.SIGINT)
    interrupted = False
    try:
        with _quiet_lightning(), _env(RUN_DIR_ENV, str(run_dir)):
            try:
                trainer.fit(module, train_dataloaders=loader, ckpt_path=str(ckpt_path) if ckpt_path else None)
            except SystemExit:
                # Lightning turns Ctrl-C into sys.exit(1) after its on_exception hooks (our checkpoint) ran
                interrupted = True
    finally:
        if signal.getsignal(signal.SIGINT) != sigint:
            signal.signal(signal.SIGINT, sigint)
    if interrupted or trainer.interrupted:
        raise KeyboardInterrupt
    step = module.step
    model_ckpt = None
    if trainer.is_global_zero:
        model_ckpt = run_dir / "model.ckpt"
        cb.atomic_torch_save({"state_dict": {k: v for k, v in torch.load(ckpt_dir / "last.ckpt", map_location="cpu",
                                                                         weights_only=True)["state_dict"].items()},
                              "global_step": step, "ldmcli_config": model_config.config_to_dict(model_cfg)},
                             model_ckpt)
    return RunResult(run_dir=run_dir, checkpoint=ckpt_dir / "last.ckpt", model_checkpoint=model_ckpt,
                     global_step=step, skipped_images=len(report.skipped) if report is not None else 0)
