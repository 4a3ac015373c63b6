"""One training run: validate everything, set up the run folder, build model and data, run the Lightning Trainer.

Run folder (upstream main.py's layout)::

    logs/<YYYY-MM-DDTHH-MM-SS>_<config name>/
        config.yaml            the model config (ldmcli format): ldm sample / load_model read it
        train.yaml             model + data + training settings as resolved: what --resume reads
        checkpoints/last.ckpt  (+ step-NNNNNNN.ckpt), checkpoints/config.yaml (a copy, for -r <ckpt>)
        model.ckpt             weights and config only, written when training ends
        metrics.csv            (+ TensorBoard event files when tensorboard is installed)
        images/train/*.png     reconstructions (autoencoders) or samples (LDMs)
        eval/samples/*.png     with --eval-every: the latest FID evaluation's samples (eval/latest.json: its numbers)

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
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ldmcli import config as model_config
from ldmcli.errors import CheckpointError, UsageError
from ldmcli.fileio import atomic_write_text
from ldmcli.training import data as data_mod
from ldmcli.training.events import Progress, TrainEvent
from ldmcli.training.config import (
    TrainConfig,
    TrainSettings,
    load_train_config,
    parse_train_config,
    train_config_to_dict,
)

if TYPE_CHECKING:
    import torch

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
    best_checkpoint: Path | None = None


def _emit(callback: Progress | None, event: TrainEvent) -> None:
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


def claim_run_dir(logdir: str | os.PathLike, name: str, now: _dt.datetime | None = None) -> Path:
    """Create and return ``<logdir>/<YYYY-MM-DDTHH-MM-SS>_<name>``, or ``..._<name>-2``, ``-3``, ... when that
    folder exists. The folder is claimed by ``mkdir`` itself (which fails if it exists), so two runs started in the
    same second, even in two processes, never share a folder."""
    stamp = (now or _dt.datetime.now()).strftime("%Y-%m-%dT%H-%M-%S")
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "run"
    base = Path(logdir).expanduser() / f"{stamp}_{safe}"
    try:
        base.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot create the log folder {base.parent}: {e.strerror or e}") from None
    k = 1
    while True:
        path = base if k == 1 else base.with_name(f"{base.name}-{k}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            k += 1
        except OSError as e:
            raise UsageError(f"cannot create the run folder {path}: {e.strerror or e}") from None


def checkpoint_step(ckpt: Path) -> int:
    """The optimizer step a checkpoint was saved at (read without loading its tensors)."""
    import torch

    try:
        state = torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch raises many types for broken files
        raise CheckpointError(f"cannot read {ckpt}: not a checkpoint (truncated or corrupt)") from e
    step = state.get("global_step") if isinstance(state, dict) else None
    if not isinstance(step, int):
        raise CheckpointError(f"{ckpt} has no global_step: not a checkpoint of ldm train-ae/train-ldm")
    return step


def _write_yaml(path: Path, doc: Any) -> None:
    import yaml

    atomic_write_text(path, yaml.safe_dump(doc, sort_keys=False))


# ------------------------------------------------------------------------------------------- first stage weights

def _read_own_checkpoint(path: Path) -> dict[str, Any]:
    import torch

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
        _emit(callback, TrainEvent("message", text=f"first stage {entry.name}: using the zoo checkpoint"))
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
    _emit(callback, TrainEvent("message", text=f"LPIPS weights from {folder}"))


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


def parse_devices(text: str | None) -> Any:
    """``2`` / ``auto`` / ``0,1`` → Lightning's ``devices`` (None stays None)."""
    if text is None:
        return None
    text = text.strip()
    if text == "auto":
        return "auto"
    try:
        if "," in text:
            return [int(t) for t in text.split(",") if t.strip()]
        value = int(text)
    except ValueError:
        raise UsageError(f"--devices takes a number, 'auto' or indices like 0,1 (got {text!r})") from None
    if value < 1:
        raise UsageError("--devices must be at least 1")
    return value


@dataclass(frozen=True)
class TrainRequest:
    """One training run as asked for. ``config``: a training preset or file; ``resume``: a run folder or one of
    its checkpoints (its ``train.yaml`` is then the config). ``overrides``: :class:`TrainSettings` fields (the
    command line's). ``data_root`` replaces the config's training folder, ``val_data`` names a validation folder.
    ``devices`` is ``--devices``' text (``2``, ``auto``, ``0,1``); ``gpus`` upstream's ``--gpus 0,1``."""

    kind: str
    config: str | os.PathLike | None = None
    resume: str | os.PathLike | None = None
    overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    data_root: str | os.PathLike | None = None
    val_data: str | os.PathLike | None = None
    batch_size: int | None = None
    num_workers: int | None = None
    first_stage: str | None = None
    devices: str | None = None
    gpus: str | None = None
    logdir: str | os.PathLike = "logs"
    name: str | None = None


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


def _folder_dataset(root: str | os.PathLike, size: int, base: Any = None) -> Any:
    from ldmcli.training.config import DatasetConfig

    params = {"root": str(Path(root).expanduser().resolve()), "size": size}  # absolute: --resume anywhere
    if base is not None and base.target == "folder":
        params = {**dict(base.params), **params}
    return DatasetConfig("folder", params)


def _plan(req: TrainRequest, callback: Progress | None) -> _Plan:
    """Read and check the config, the command-line overrides, the data settings and the first stage."""
    kind, overrides = req.kind, dict(req.overrides)
    if req.gpus is not None and req.devices is not None:
        raise UsageError("--gpus and --devices both choose devices: give one")
    if req.devices is not None:
        overrides["devices"] = parse_devices(req.devices)
    ckpt_path: Path | None = None
    if req.resume is not None:
        if req.config is not None:
            raise UsageError("--resume takes the run's own config: drop --config")
        run_dir, ckpt_path = resolve_resume(req.resume)
        import yaml

        doc = yaml.safe_load((run_dir / "train.yaml").read_text(encoding="utf-8"))
        cfg = parse_train_config(doc, str(run_dir / "train.yaml"), run_dir.name.split("_", 1)[-1])
    else:
        if req.config is None:
            raise UsageError("--config is required (a training preset or a config file), or --resume a run")
        cfg = load_train_config(req.config)
        run_dir = None
    _check_kind(cfg.model, kind)
    settings = cfg.settings
    if overrides:
        unknown = set(overrides) - {f.name for f in dataclasses.fields(TrainSettings)}
        if unknown:
            raise ValueError(f"unknown training settings {sorted(unknown)}")
        from ldmcli.training.config import _check_settings, _reader

        settings = _check_settings(_reader("the command line"), dataclasses.replace(settings, **overrides), "")
    if settings.eval_ref is not None:  # absolute: train.yaml is read back by --resume from anywhere
        settings = dataclasses.replace(settings, eval_ref=str(Path(settings.eval_ref).expanduser().resolve()))
    if settings.max_steps is None and settings.max_epochs is None:
        raise UsageError("set how long to train: --max-steps or --max-epochs (or max_steps in the config)")
    if ckpt_path is not None and settings.max_steps is not None:
        at = checkpoint_step(ckpt_path)
        if at >= settings.max_steps:
            raise UsageError(f"nothing to train: {ckpt_path} is at step {at} and the run stops at max_steps "
                             f"{settings.max_steps}; give --max-steps above {at} to train longer")
    for what, folder in (("data", req.data_root), ("validation data", req.val_data)):
        if folder is not None and not Path(folder).expanduser().is_dir():
            state = "is not a folder" if Path(folder).expanduser().exists() else "does not exist"
            raise data_mod.DataError(f"{what} folder {folder} {state}")
    if cfg.data is None and req.data_root is None:
        raise UsageError("no training data: give --data FOLDER or a data: section in the config")
    data_cfg = cfg.data
    size = cfg.model.pixel_size
    if req.data_root is not None:
        from ldmcli.training.config import DataConfig

        base = data_cfg or DataConfig(batch_size=req.batch_size or 8, train=_folder_dataset(req.data_root, size))
        validation = base.validation if base.validation is not None and base.validation.target == "folder" else None
        data_cfg = dataclasses.replace(base, train=_folder_dataset(req.data_root, size, base.train),
                                       validation=validation)  # the config's own dataset's validation goes too
    if req.val_data is not None:
        data_cfg = dataclasses.replace(data_cfg, validation=_folder_dataset(req.val_data, size, data_cfg.validation))
    if data_cfg.validation is not None and settings.val_fraction > 0:
        raise UsageError("validation data is given twice: a validation folder and a held-out fraction; give one")
    if req.batch_size is not None:
        if req.batch_size < 1:
            raise UsageError("--batch-size must be at least 1")
        data_cfg = dataclasses.replace(data_cfg, batch_size=req.batch_size)
    if req.num_workers is not None:
        if req.num_workers < 0:
            raise UsageError("--num-workers must be 0 or more")
        data_cfg = dataclasses.replace(data_cfg, num_workers=req.num_workers)
    accelerator, devices = _devices_and_accelerator(settings, req.gpus)
    null_condition = None
    if kind == "ldm" and settings.cond_drop > 0:
        null_condition = _null_condition(cfg.model)
    model_cfg = cfg.model
    fs_state: dict[str, Any] | None = None
    if kind == "ldm" and ckpt_path is None:
        spec = req.first_stage or _first_stage_hint(cfg)
        if spec is None:
            raise UsageError("train-ldm needs a trained first stage: --first-stage NAME_OR_PATH (a zoo first stage "
                             "such as kl-f8, or a train-ae checkpoint or run folder)")
        fs_cfg, fs_state = _first_stage_from(spec, callback)
        model_cfg = _with_first_stage(model_cfg, fs_cfg)
    elif req.first_stage is not None and ckpt_path is not None:
        raise UsageError("--first-stage cannot change a resumed run (its checkpoint holds the first stage)")
    cfg = dataclasses.replace(cfg, model=model_cfg, data=data_cfg, settings=settings)
    return _Plan(cfg, run_dir, ckpt_path, fs_state, null_condition, accelerator, devices)


def _cpu_precision_warning(accelerator: str, precision: str) -> str | None:
    """float16 has no fast CPU kernels: Lightning's 16-mixed runs on a CPU, about 13x slower than float32."""
    if not precision.startswith("16"):
        return None
    import torch

    mps = getattr(torch.backends, "mps", None)
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available()
                                      and not (mps is not None and mps.is_available()))
    if not on_cpu:
        return None
    return (f"precision {precision} on the CPU is much slower than 32 (float16 has no fast CPU kernels; measured "
            "13x): use --precision 32, or bf16-mixed on a CPU with native bf16")


def _datasets(plan: _Plan, callback: Progress | None) -> tuple[Any, Any]:
    """The training set and the validation set (None without one), checked; warnings reported."""
    cfg = plan.cfg
    data_cfg, settings, model_cfg = cfg.data, cfg.settings, cfg.model
    adapt = None if callback is None else (lambda e: callback(e if isinstance(e, TrainEvent) else
                                                              TrainEvent(str(e.get("event")), path=e.get("path"))))
    dataset = data_mod.build_dataset(data_cfg.train.target, data_cfg.train.params, adapt)
    report = getattr(dataset, "report", None)
    if report is not None and report.skipped:
        _emit(callback, TrainEvent("warning", text=f"skipped {len(report.skipped)} unreadable image(s), e.g. "
                                                   f"{report.skipped[0][0]} ({report.skipped[0][1]})"))
    if report is not None and model_cfg.ldm is not None and model_cfg.ldm.cond_stage_key == "caption" \
            and report.missing_captions:
        _emit(callback, TrainEvent("warning", text=f"{report.missing_captions} image(s) have no caption .txt: "
                                                   "they train with the empty caption"))
    val = None
    if data_cfg.validation is not None:
        val = data_mod.build_dataset(data_cfg.validation.target, data_cfg.validation.params, adapt)
        vreport = getattr(val, "report", None)
        if vreport is not None and vreport.skipped:
            _emit(callback, TrainEvent("warning", text=f"validation data: skipped {len(vreport.skipped)} unreadable "
                                                       f"image(s), e.g. {vreport.skipped[0][0]}"))
        _same_classes(dataset, val)
    elif settings.val_fraction > 0:
        dataset, val = data_mod.hold_out(dataset, settings.val_fraction)
    _check_labels(model_cfg, dataset, settings.cond_drop)
    if val is not None:
        _check_labels(model_cfg, val, settings.cond_drop)
    return dataset, val


def _same_classes(train_set: Any, val_set: Any) -> None:
    """A validation folder's class sub-folders get the training folder's class ids, by name (a validation folder
    with only some of the classes would otherwise number them from 0)."""
    names, val_names = getattr(train_set, "class_names", None), getattr(val_set, "class_names", None)
    if not names or not val_names or getattr(val_set, "labels", None) is None:
        return
    index = {n: k for k, n in enumerate(names)}
    unknown = [n for n in val_names if n not in index]
    if unknown:
        raise data_mod.DataError(f"the validation data has class folders the training data lacks: "
                                 f"{', '.join(unknown[:5])}")
    val_set.labels = [index[val_names[k]] for k in val_set.labels]


def _monitor(kind: str, net: Any) -> str:
    """The validation loss that picks ``best.ckpt``, as upstream's configs monitor it."""
    if kind == "autoencoder":
        return "val/rec_loss"
    return "val/loss_simple_ema" if getattr(net, "use_ema", False) else "val/loss_simple"


def sampling_config(cfg: model_config.ModelConfig) -> model_config.ModelConfig:
    """The config a trained model samples with: a first stage without its training loss (LPIPS, discriminator),
    so ``model.ckpt`` and ``config.yaml`` need none of those weights. ``train.yaml`` keeps the full config."""
    if cfg.kind != "first_stage" or cfg.first_stage.loss.type == "none":
        return cfg
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.first_stage, loss=model_config.LossConfig("none")))


def _release(run_dir: Path) -> None:
    """Give back a run folder claimed by a run that failed before writing anything into it."""
    with contextlib.suppress(OSError):
        run_dir.rmdir()


def run_training(req: TrainRequest, callback: Progress | None = None) -> RunResult:
    """Train an autoencoder (``req.kind == "autoencoder"``) or a latent diffusion model (``"ldm"``).

    Every value is checked, and the data read, before Lightning is imported, the run folder is claimed or anything
    heavy is loaded. Progress comes as :class:`TrainEvent` s through ``callback``."""
    if req.kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}")
    plan = _plan(req, callback)
    cfg, run_dir = plan.cfg, plan.run_dir
    lr_base = cfg.model.base_learning_rate
    if lr_base is None:
        raise UsageError("the config has no base_learning_rate")

    # ---- FID during training: settings, reference and Inception weights checked before the data is scanned
    from ldmcli.training import quality

    checked = quality.check(req.kind, cfg.settings, cfg.model, callback)
    # ---- data (built before any folder is written: a missing or empty dataset fails here)
    dataset, val_dataset = _datasets(plan, callback)
    warning = _cpu_precision_warning(plan.accelerator, cfg.settings.precision)
    quality_plan = quality.prepare(checked, cfg.settings, cfg.model, dataset, val_dataset, cfg.data.batch_size)

    # ---- Lightning only from here on (_fit): a bad config or data folder fails in about a second
    env_run_dir = os.environ.get(RUN_DIR_ENV)
    # processes the launcher started (LOCAL_RANK > 0) and other nodes' processes write no run files
    is_child = (bool(env_run_dir) and os.environ.get("LOCAL_RANK", "0") != "0") or \
        os.environ.get("NODE_RANK", "0") != "0"
    claimed = False
    if is_child and env_run_dir:
        run_dir = Path(env_run_dir)
    elif run_dir is None:
        run_dir = claim_run_dir(req.logdir, req.name or cfg.name)
        claimed = True
    try:
        return _fit(req, plan, run_dir, is_child, dataset, val_dataset, warning, lr_base, callback, quality_plan)
    except BaseException:
        if claimed:
            _release(run_dir)  # only when still empty: a run that started keeps its checkpoints
        raise


def _fit(req: TrainRequest, plan: _Plan, run_dir: Path, is_child: bool, dataset: Any, val_dataset: Any,
         warning: str | None, lr_base: float, callback: Progress | None, quality_plan: Any = None) -> RunResult:
    """Build the Trainer, the loaders, the callbacks and the module in ``run_dir``, then train."""
    import lightning as L
    import torch

    from ldmcli.training import callbacks as cb
    from ldmcli.training.modules import AutoencoderModule, LatentDiffusionModule

    kind, cfg = req.kind, plan.cfg
    ckpt_path, fs_state, null_condition = plan.ckpt_path, plan.fs_state, plan.null_condition
    accelerator, devices = plan.accelerator, plan.devices
    model_cfg, data_cfg, settings = cfg.model, cfg.data, cfg.settings
    ckpt_dir = run_dir / "checkpoints"
    n_dev = _num_devices(devices)
    lr = settings.accumulate * n_dev * data_cfg.batch_size * lr_base if settings.scale_lr else lr_base
    max_steps = settings.max_steps
    trainer_steps = -1 if max_steps is None else (2 * max_steps if kind == "autoencoder" else max_steps)

    progress_cb = callback or (lambda event: None)
    callbacks: list[Any] = []
    if kind == "ldm":
        callbacks.append(cb.EMAUpdate())
    metrics = cb.MetricsCsv(run_dir / "metrics.csv")
    loggers: list[Any] = [metrics]
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
    except Exception as e:  # ValueError, TypeError, Lightning's MisconfigurationException and friends
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
    callbacks.append(cb.ProgressReporter(progress_cb, settings.max_steps, every=1))
    callbacks.append(cb.FinalMetrics(metrics))

    # ---- model
    L.seed_everything(settings.seed, verbose=False)
    from ldmcli.loading import bert_vocab_for

    net = model_config.build_model(model_cfg, bert_vocab=bert_vocab_for(model_cfg))
    if val_dataset is not None:
        val_loader = torch.utils.data.DataLoader(val_dataset, batch_size=data_cfg.batch_size, shuffle=False,
                                                 num_workers=min(workers, 2), collate_fn=data_mod.collate)
        callbacks.append(cb.Validation(val_loader, settings.val_every, _monitor(kind, net), ckpt_dir, settings.seed,
                                       callback, final_step=max_steps))
    if quality_plan is not None:
        from ldmcli.training.quality import SampleEvaluator

        callbacks.append(cb.SampleQuality(SampleEvaluator(quality_plan, run_dir, callback), quality_plan.every,
                                          callback, final_step=max_steps))
    callbacks.append(cb.Checkpointer(ckpt_dir, settings.checkpoint_every, settings.keep_every, callback,
                                     final_step=max_steps))
    trainer.callbacks.extend(callbacks)  # in this order: EMA, data order, logs, validation, FID, the checkpoint
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
        model_doc = model_config.config_to_dict(sampling_config(model_cfg))
        _write_yaml(run_dir / "config.yaml", model_doc)
        _write_yaml(ckpt_dir / "config.yaml", model_doc)
        _write_yaml(run_dir / "train.yaml", train_config_to_dict(cfg))
        _emit(callback, TrainEvent("run_dir", path=str(run_dir), learning_rate=lr, examples=len(dataset),
                                   val_examples=len(val_dataset) if val_dataset is not None else None,
                                   resumed_from=str(ckpt_path) if ckpt_path else None))
        if warning:
            _emit(callback, TrainEvent("warning", text=warning))

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
        drop = tuple(module.TRAINING_ONLY_PREFIXES)
        state = torch.load(ckpt_dir / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
        cb.atomic_torch_save({"state_dict": {k: v for k, v in state.items() if not (drop and k.startswith(drop))},
                              "global_step": step,
                              "ldmcli_config": model_config.config_to_dict(sampling_config(model_cfg))},
                             model_ckpt)
    report = getattr(dataset, "report", None)
    best = ckpt_dir / "best.ckpt"
    return RunResult(run_dir=run_dir, checkpoint=ckpt_dir / "last.ckpt", model_checkpoint=model_ckpt,
                     global_step=step, skipped_images=len(report.skipped) if report is not None else 0,
                     best_checkpoint=best if best.is_file() else None)


def train(kind: str, config: str | os.PathLike | None = None, *, callback: Progress | None = None,
          **fields: Any) -> RunResult:
    """``run_training(TrainRequest(kind, config, **fields), callback)``: the keyword form, e.g.
    ``train("ldm", "digits-ldm", data_root="data/digits", first_stage="logs/...", overrides={"max_steps": 2000})``."""
    if fields.get("overrides") is None:
        fields.pop("overrides", None)
    return run_training(TrainRequest(kind, config, **fields), callback)
