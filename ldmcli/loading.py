"""``load_model``: the one way to get a ready-to-sample latent diffusion model (Rombach et al., 2022).

The module is built with its parameters on the ``meta`` device (no memory, no random init), then the checkpoint's
tensors, memory-mapped from the file, are *assigned* as its parameters (``load_state_dict(assign=True)``), so loading
holds about one copy of the weights. Matching is strict (see :func:`ldmcli.checkpoint.match_state_dict`).

EMA: when the config trains with EMA (``use_ema``, upstream's default) the sampling scripts run inside
``model.ema_scope()``. ``load_model`` makes that the default state: the EMA shadows become the weights of
``model.model`` at load time (the shadows and the weights are then the same tensors, so this costs no memory), and
``ema_scope()`` is a no-op. ``load_model(..., ema=False)`` gives the raw (non-EMA) weights instead.

The first load of a zoo ``.ckpt`` writes a ``.safetensors`` copy next to it (atomically), holding the resolved config
and ``global_step`` in its metadata; later loads use that copy: no pickle, faster.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ldmcli import checkpoint as ckpt_io
from ldmcli.errors import CheckpointError, LdmError, UsageError
from ldmcli.fileio import sha256_file

Callback = Callable[[str], None]

META_CONFIG = "ldmcli.config"
META_SOURCE_SHA256 = "ldmcli.source_sha256"
CONFIG_SUFFIXES = (".yaml", ".yml", ".json")


@contextlib.contextmanager
def params_on_meta() -> Iterator[None]:
    """Build modules with every *parameter* on the meta device; buffers stay real (they are small).

    Non-persistent buffers (never in a checkpoint, e.g. CLIP's normalisation constants) thus keep their values, and
    the weights take no memory until the checkpoint's tensors are assigned. The same technique as accelerate's
    ``init_empty_weights(include_buffers=False)``; it patches ``nn.Module.register_parameter`` while building (so
    do not build other modules in other threads meanwhile).
    """
    original = nn.Module.register_parameter

    def register_parameter(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            kwargs = dict(param.__dict__)
            module._parameters[name] = type(param)(param.to("meta"), requires_grad=param.requires_grad)
            module._parameters[name].__dict__.update(kwargs)

    nn.Module.register_parameter = register_parameter  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def _ema_map(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> dict[str, str]:
    """``model.<param>`` -> ``model_ema.<param without dots>`` for the diffusion network (upstream LitEma naming)."""
    inner = getattr(model, "model", None)
    if not isinstance(inner, nn.Module):
        return {}
    return {
        f"model.{name}": f"model_ema.{name.replace('.', '')}"
        for name, p in inner.named_parameters(remove_duplicate=False)
        if p.requires_grad
    }


def _uses_ema(model: nn.Module, cfg: Any) -> bool:
    for source in (model, cfg, getattr(cfg, "model", None)):
        value = getattr(source, "use_ema", None)
        if isinstance(value, bool):
            return value
    return False


def _apply_ema(model: nn.Module, state_dict: dict[str, torch.Tensor], *, source: str) -> dict[str, torch.Tensor]:
    """Put the EMA shadows in place of the network's weights (what upstream's ``ema_scope`` does while sampling)."""
    mapping = _ema_map(model, state_dict)
    missing = [s for s in mapping.values() if s not in state_dict]
    if missing and len(missing) == len(mapping):
        raise CheckpointError(
            f"{source} has no EMA weights (model_ema.*) although the config uses EMA; "
            f"load it with ema=False (or set use_ema: false in the config)"
        )
    if missing:
        raise CheckpointError(f"{source} lacks {len(missing)} EMA weights, e.g. {missing[0]}")
    out = dict(state_dict)
    for key, shadow in mapping.items():
        if key in out and tuple(out[key].shape) != tuple(state_dict[shadow].shape):
            raise CheckpointError(
                f"{source}: EMA weight {shadow} has shape {list(state_dict[shadow].shape)} but {key} has "
                f"{list(out[key].shape)}"
            )
        out[key] = state_dict[shadow]
    return out


def _expected(model: nn.Module) -> dict[str, torch.Tensor]:
    return dict(model.state_dict(keep_vars=True))


def _cast_like(state_dict: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Floating tensors stored in another precision (fp16 checkpoints) become the model's dtype; others stay views."""
    out = {}
    for key, want in expected.items():
        have = state_dict[key]
        if have.is_floating_point() and want.is_floating_point() and have.dtype != want.dtype:
            have = have.to(want.dtype)
        out[key] = have
    return out


def assign_weights(
    model: nn.Module, state_dict: dict[str, torch.Tensor], *, ema: bool = True, uses_ema: bool | None = None,
    source: str = "checkpoint",
) -> None:
    """Strictly match ``state_dict`` against ``model`` and assign its tensors as the model's weights (no copy)."""
    if uses_ema is None:
        uses_ema = _uses_ema(model, None)
    if uses_ema and ema:
        state_dict = _apply_ema(model, state_dict, source=source)
    expected = _expected(model)
    matched = ckpt_io.match_state_dict(expected, state_dict, source=source)
    model.load_state_dict(_cast_like(matched, expected), strict=True, assign=True)
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    if leftover:
        raise CheckpointError(f"{source} left {len(leftover)} weights unset, e.g. {leftover[0]}")


def _config_to_json(cfg: Any) -> str | None:
    from ldmcli.config import config_to_dict

    try:
        return json.dumps(config_to_dict(cfg), sort_keys=True)
    except (TypeError, ValueError, AttributeError):
        return None


def _config_from_json(text: str) -> Any:
    from ldmcli.config import config_from_dict

    return config_from_dict(json.loads(text))


def _manifest_sha256(path: Path) -> str | None:
    try:
        from ldmcli import download, paths

        rel = path.resolve().relative_to(paths.data_dir()).as_posix()
        record = download.read_manifest().get("files", {}).get(rel)
    except (ValueError, LdmError, OSError, ImportError):
        return None
    return record.get("sha256") if isinstance(record, dict) else None


def _read_sidecar(sidecar: Path, source: Path | None) -> ckpt_io.Checkpoint | None:
    """The ``.safetensors`` copy of ``source`` when it exists and still belongs to it, else None."""
    if not sidecar.is_file():
        return None
    try:
        loaded = ckpt_io.load_safetensors(sidecar)
    except CheckpointError:
        return None  # damaged: it is rewritten from the .ckpt
    if source is not None and source.is_file():
        if loaded.metadata.get(ckpt_io.META_SOURCE) != ckpt_io.source_fingerprint(source):
            return None  # the .ckpt was replaced since the copy was made
    return loaded


def _write_sidecar(
    loaded: ckpt_io.Checkpoint, cfg: Any, sha256: str | None, callback: Callback | None
) -> Path | None:
    """Write the ``.safetensors`` copy of a downloaded ``.ckpt``; a failure (full disk, read-only dir) is not fatal."""
    sidecar = ckpt_io.safetensors_sidecar(loaded.path)
    metadata = {ckpt_io.META_SOURCE: ckpt_io.source_fingerprint(loaded.path)}
    config_json = _config_to_json(cfg)
    if config_json is not None:
        metadata[META_CONFIG] = config_json
    if sha256:
        metadata[META_SOURCE_SHA256] = sha256
    if callback:
        callback(f"writing {sidecar.name} (a pickle-free copy used from now on)")
    try:
        return ckpt_io.save_safetensors(sidecar, loaded.state_dict, metadata=metadata, global_step=loaded.global_step)
    except (OSError, CheckpointError) as e:
        if callback:
            callback(f"could not write {sidecar.name}: {e}")
        return None


# ------------------------------------------------------------------------------------------------------ resolving


@dataclass(frozen=True)
class ModelSource:
    """What to load, found without loading anything: a ``name`` for records, the ``config`` (None when a
    ``.safetensors`` written by ldmcli carries it), the checkpoint file (None: the zoo ``entry``'s, from the store)."""

    name: str
    config: Any
    ckpt: Path | None
    entry: Any = None


def _existing(ckpt: str | os.PathLike) -> Path:
    path = Path(ckpt).expanduser()
    if not path.is_file():
        raise UsageError(f"checkpoint not found: {path}" if path.parent.is_dir() or path.exists()
                         else f"cannot find {path} (checkpoint not found)")
    return path


def _run_folder_checkpoint(folder: Path) -> Path:
    candidates = [folder / n for n in ("model.safetensors", "model.ckpt", "last.ckpt")]
    candidates.append(folder / "checkpoints" / "last.ckpt")
    found = next((c for c in candidates if c.is_file()), None)
    if found is None:
        raise UsageError(f"{folder} holds no model.ckpt (nor model.safetensors or checkpoints/last.ckpt)")
    return found


def _config_beside(ckpt: Path) -> Path | None:
    """``config.yaml`` next to a checkpoint or one folder up (``ldm train-*`` runs: ``run/checkpoints/last.ckpt``)."""
    return next((c for c in (ckpt.parent / "config.yaml", ckpt.parent.parent / "config.yaml") if c.is_file()), None)


def resolve(
    target: str | os.PathLike | Any, *, config: str | os.PathLike | None = None, ckpt: str | os.PathLike | None = None,
) -> ModelSource:
    """The one model resolver: what ``target`` names, reading configs but no weights.

    ``target`` is a zoo name (or an entry added with :func:`ldmcli.zoo.register`), a run folder (``config.yaml`` with
    ``model.safetensors``/``model.ckpt``/``last.ckpt``/``checkpoints/last.ckpt``, as upstream's
    ``sample_diffusion.py -r`` and ``ldm train-*`` write them), a checkpoint file (its config beside it or one folder
    up; a ``.safetensors`` written by ldmcli carries its own), a config file (with ``ckpt``), or an already-built
    config object (with ``ckpt``). ``config`` + ``ckpt`` name both files explicitly. Unknown names, missing files and
    invalid configs raise :class:`UsageError` here, before any loading.
    """
    from ldmcli.config import load_config

    if config is not None:
        if not Path(config).is_file():
            raise UsageError(f"config file not found: {config}")
        if ckpt is None:
            raise UsageError(f"a config file needs a checkpoint (config {config})")
        return ModelSource(str(ckpt), load_config(Path(config)), _existing(ckpt))
    if not isinstance(target, (str, os.PathLike)):  # an already-built config object
        if ckpt is None:
            raise UsageError("a config object needs a checkpoint")
        return ModelSource(str(ckpt), target, _existing(ckpt))

    name = os.fspath(target)
    path = Path(name).expanduser()
    if path.is_dir():
        found = _run_folder_checkpoint(path) if ckpt is None else _existing(ckpt)
        config_file = path / "config.yaml" if (path / "config.yaml").is_file() else _config_beside(found)
        if config_file is None:
            if found.suffix == ckpt_io.SAFETENSORS_SUFFIX:
                return ModelSource(name, None, found)
            raise UsageError(f"{path} holds no config.yaml")
        return ModelSource(name, load_config(config_file), found)
    if path.suffix.lower() in CONFIG_SUFFIXES:
        if not path.is_file():
            raise UsageError(f"config file not found: {path}")
        if ckpt is None:
            raise UsageError(f"{path} is a config: it needs a checkpoint too")
        return ModelSource(str(ckpt), load_config(path), _existing(ckpt))
    if path.is_file() or path.suffix.lower() in (".ckpt", ckpt_io.SAFETENSORS_SUFFIX) or os.sep in name:
        if not path.exists():
            raise UsageError(f"cannot find {path} (checkpoint not found)")
        found = _existing(path)
        config_file = _config_beside(found)
        if config_file is None:
            if found.suffix == ckpt_io.SAFETENSORS_SUFFIX:
                return ModelSource(name, None, found)
            raise UsageError(f"no config.yaml next to {found} (or one folder up)")
        return ModelSource(name, load_config(config_file), found)

    from ldmcli import zoo

    entry = zoo.get(name)  # UnknownModelError (a UsageError) for a bad name
    if entry.checkpoint is None:
        raise UsageError(f"{entry.name} is a {entry.kind.replace('_', ' ')}, not a model")
    return ModelSource(entry.name, zoo.entry_config(entry), _existing(ckpt) if ckpt is not None else None, entry)


def _open_checkpoint(source: ModelSource, progress: Any) -> tuple[Any, ckpt_io.Checkpoint, bool, str | None]:
    """Config, checkpoint, whether the checkpoint is a fresh download (then a ``.safetensors`` copy is written) and
    its sha256 when known."""
    if source.ckpt is not None:
        if source.ckpt.suffix.lower() == ckpt_io.SAFETENSORS_SUFFIX:
            loaded = ckpt_io.load_safetensors(source.ckpt)
            cfg = source.config
            if cfg is None:
                if META_CONFIG not in loaded.metadata:
                    raise UsageError(f"{source.ckpt.name} holds no config: pass the config file with it")
                cfg = _config_from_json(loaded.metadata[META_CONFIG])
            return cfg, loaded, False, loaded.metadata.get(META_SOURCE_SHA256)
        return source.config, ckpt_io.load_checkpoint(source.ckpt), False, None

    from ldmcli import store

    entry = source.entry
    ckpt_file = entry.local_dir() / entry.checkpoint
    if ckpt_file.suffix != ckpt_io.SAFETENSORS_SUFFIX:
        loaded = _read_sidecar(ckpt_io.safetensors_sidecar(ckpt_file), ckpt_file)
        if loaded is not None:
            for asset in entry.assets:
                store.ensure(asset)
            return source.config, loaded, False, loaded.metadata.get(META_SOURCE_SHA256) or _manifest_sha256(ckpt_file)
    ckpt_file = store.checkpoint_path(entry.name, progress=progress)
    return source.config, ckpt_io.load_checkpoint(ckpt_file), True, _manifest_sha256(ckpt_file)


def release_checkpoint(model: nn.Module) -> None:
    """Copy the float32 CPU tensors left after a cast, so the checkpoint's memory map can be released.

    Loaded weights are views of one memory-mapped file, and the map lives as long as any view does. After the
    networks are cast to bf16/fp16 (or moved to a GPU), the views that remain are small float32 buffers (the noise
    schedule, ``scale_factor``), yet they kept every page of the float32 file resident: 9.1 GB RSS instead of 3.2 GB
    for txt2img-f8-large in bf16. A float32 model on the CPU needs none of this: the map *is* its one copy.
    """
    for module in model.modules():
        for table in (module._parameters, module._buffers):
            for key, tensor in table.items():
                if tensor is not None and tensor.device.type == "cpu" and tensor.dtype == torch.float32:
                    copy = tensor.detach().clone()
                    table[key] = nn.Parameter(copy, tensor.requires_grad) if isinstance(tensor, nn.Parameter) else copy


def _to_device_dtype(model: nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Move to ``device``; cast the networks to ``dtype`` but keep the LDM's own buffers (schedules) in float32.

    Each child is moved and cast in one step, so a GPU never holds a float32 copy of a bf16 model.
    """
    if dtype != torch.float32:
        for child in model.children():
            child.to(device=device, dtype=dtype)
    if device.type != "cpu":
        model.to(device)
    if dtype != torch.float32 or device.type != "cpu":
        release_checkpoint(model)


def bert_vocab_for(cfg: Any, progress: Any = None) -> Path | None:
    """The store's bert-base-uncased vocab (downloaded on first use) when ``cfg``'s conditioner tokenises text, else
    None: what :func:`ldmcli.config.build_model` takes as ``bert_vocab`` (the networks themselves never download)."""
    ldm = getattr(cfg, "ldm", None)
    cond = getattr(ldm, "cond_stage", None)
    if getattr(cond, "type", None) != "bert" or not getattr(cond.params, "use_tokenizer", True):
        return None
    from ldmcli import store

    return store.asset_path("bert-base-uncased", progress=progress) / "vocab.txt"


@dataclass
class Loaded:
    """A loaded model and what is known about it: ``config`` (:class:`ldmcli.config.ModelConfig`), the checkpoint
    file it came from, its sha256 (None until known; see :meth:`sha256`), the training step the checkpoint records,
    and whether the weights are the EMA ones."""

    model: nn.Module
    config: Any
    name: str
    ckpt_path: Path
    ckpt_sha256: str | None = None
    global_step: int | None = None
    uses_ema_weights: bool = False

    def sha256(self) -> str | None:
        """The checkpoint's sha256, hashed (once) when not known from the store's manifest."""
        if self.ckpt_sha256 is None and self.ckpt_path.is_file():
            self.ckpt_sha256 = sha256_file(self.ckpt_path)
        return self.ckpt_sha256


def load(
    source: ModelSource | str | os.PathLike | Any,
    ckpt: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    *,
    ema: bool = True,
    callback: Callback | None = None,
    progress: Any = None,
) -> Loaded:
    """Resolve (see :func:`resolve`) and load a model; returns a :class:`Loaded`. ``load_model`` is the same, returning
    the module alone."""
    from ldmcli.config import build_model
    from ldmcli.devices import pick_device

    target_device = torch.device(device) if isinstance(device, torch.device) else (
        torch.device("cpu") if device is None else pick_device(device)
    )
    if dtype is not None and not dtype.is_floating_point:
        raise UsageError(f"dtype must be a floating point type, not {dtype}")
    if not isinstance(source, ModelSource):
        source = resolve(source, ckpt=ckpt)
    cfg, loaded, downloaded, sha = _open_checkpoint(source, progress)
    vocab = bert_vocab_for(cfg, progress)
    if callback:
        callback(f"building the model from {loaded.path.name}")
    with params_on_meta():
        model = build_model(cfg, bert_vocab=vocab)
    uses_ema = _uses_ema(model, cfg)
    has_shadows = isinstance(getattr(model, "model_ema", None), nn.Module)
    if uses_ema and not ema and has_shadows and not any(k.startswith(ckpt_io.EMA_PREFIX) for k in loaded.state_dict):
        del model.model_ema  # raw weights asked for and the checkpoint has no EMA: nothing to keep beside them
        model.use_ema = uses_ema = False
    assign_weights(model, loaded.state_dict, ema=ema, uses_ema=uses_ema, source=loaded.path.name)
    if uses_ema and ema and isinstance(getattr(model, "model_ema", None), nn.Module):
        # The network now holds the EMA weights: the shadows are redundant and ema_scope() must not swap (or clone)
        del model.model_ema
        model.use_ema = False
    if downloaded and loaded.format == "pickle":
        if sha is None:
            sha = sha256_file(loaded.path)
        _write_sidecar(loaded, cfg, sha, callback)
    model.eval()
    if isinstance(getattr(model, "model_ema", None), nn.Module):
        # LitEma (upstream and ours) swaps only parameters that require grad: keep ema_scope() working as upstream
        for name, p in model.named_parameters():
            if not name.startswith("model."):
                p.requires_grad_(False)
    else:
        model.requires_grad_(False)
    _to_device_dtype(model, target_device, dtype or torch.float32)
    return Loaded(model, cfg, source.name, loaded.path, sha, loaded.global_step, bool(uses_ema and ema))


def load_model(
    name_or_config: str | os.PathLike | Any,
    ckpt: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    *,
    ema: bool = True,
    callback: Callback | None = None,
    progress: Any = None,
) -> nn.Module:
    """Load a zoo model by name, or a config file (ours or upstream's YAML) with ``ckpt=`` its checkpoint.

    Also accepted: an upstream model folder (``config.yaml`` beside ``model.ckpt``, as ``sample_diffusion.py -r``
    takes), and a ``.safetensors`` written by ldmcli, which carries its config.

    Returns the model in eval mode without gradients, float32 unless ``dtype`` says otherwise, on ``device``
    (``None``: CPU; use :func:`ldmcli.devices.pick_device` for the automatic choice). With ``ema=True`` (default)
    a config that uses EMA samples with the EMA weights, as upstream's scripts do (``model.model_ema`` is then
    dropped and ``ema_scope()`` does nothing); ``ema=False`` keeps the raw weights and ``model_ema`` as upstream.
    ``progress`` is passed to the store's download (see :mod:`ldmcli.download`); ``callback(message)`` gets a line
    per stage. :func:`load` returns the same model with its config, checkpoint path, sha256 and training step.
    """
    return load(name_or_config, ckpt, device, dtype, ema=ema, callback=callback, progress=progress).model
