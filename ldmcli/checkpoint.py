"""Reading and writing checkpoints of latent diffusion models (Rombach et al., 2022) without running pickled code.

Upstream checkpoints are PyTorch Lightning 1.x pickles (``model.ckpt``). They are read with
``torch.load(weights_only=True)`` and the smallest allow-list these files need:

* ``pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint``: Lightning < 1.5 keys its ``callbacks`` dict by the
  callback *class*; it is mapped to an inert stub class here, so Lightning is never imported;
* ``numpy`` scalars and dtypes (and ``_codecs.encode``) from the scheduler states' ``numpy.float64`` values.

Anything else in a pickle is refused with a :class:`~ldmcli.errors.CheckpointError` naming the global.
``.safetensors`` files are memory-mapped. :func:`save_safetensors` writes one tensor at a time (no second copy of the
weights in memory) under a temporary name and moves it into place when complete.
"""

from __future__ import annotations

import codecs
import errno
import json
import os
import pickle
import re
import struct
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ldmcli.errors import CheckpointError
from ldmcli.fileio import atomic_path

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
SAFETENSORS_SUFFIX = ".safetensors"
LIGHTNING_MODEL_CHECKPOINT = "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"

# Keys in the safetensors metadata written by :func:`save_safetensors`.
META_GLOBAL_STEP = "global_step"
META_ALIASES = "ldmcli.aliases"
META_SOURCE = "ldmcli.source"


class LightningModelCheckpointStub:
    """Stands in for Lightning's ``ModelCheckpoint`` class, which Lightning < 1.5 pickles as a dict key.

    Only the class object itself is ever referenced by those files; it is never instantiated and does nothing.
    """


@dataclass
class Checkpoint:
    """The weights of a checkpoint and the little else inference needs.

    ``state_dict`` tensors are memory-mapped from the file where the format allows it (zip pickles, safetensors).
    """

    path: Path
    format: str  # "pickle" or "safetensors"
    state_dict: dict[str, torch.Tensor]
    global_step: int | None = None
    metadata: dict[str, str] = field(default_factory=dict)


def _allowed_globals() -> list[tuple[object, str]]:
    """Every global a Lightning 1.x ``.ckpt`` of the model zoo may reference beyond torch's own defaults."""
    import numpy as np

    try:
        from numpy._core import multiarray  # numpy 2
    except ImportError:  # pragma: no cover - numpy 1
        from numpy.core import multiarray  # type: ignore[no-redef]

    allowed: list[tuple[object, str]] = [
        (LightningModelCheckpointStub, LIGHTNING_MODEL_CHECKPOINT),
        (multiarray.scalar, "numpy.core.multiarray.scalar"),
        (multiarray.scalar, "numpy._core.multiarray.scalar"),
        (np.dtype, "numpy.dtype"),
        (codecs.encode, "_codecs.encode"),
    ]
    # numpy >= 1.25 has one class per dtype (numpy.dtypes.Float64DType, ...); torch's unpickler checks them too.
    for scalar_type in (np.float64, np.float32, np.float16, np.int64, np.int32, np.int16, np.int8, np.uint8, np.bool_):
        dtype_class = type(np.dtype(scalar_type))
        allowed.append((dtype_class, f"numpy.dtypes.{dtype_class.__name__}"))
    return allowed


_GLOBAL_RE = re.compile(r"GLOBAL\s+([\w.]+)")


def corrupt_error(path: Path) -> CheckpointError:
    """The one-line error for a file that is not a readable checkpoint at all (cut short, garbage, an HTML page)."""
    return CheckpointError(f"{path}: not a checkpoint (truncated or corrupt)")


def _unreadable(path: Path, error: BaseException) -> CheckpointError:
    """A read error: permission and I/O problems say so; anything else means the bytes are not a checkpoint."""
    if isinstance(error, PermissionError):
        return CheckpointError(f"cannot read {path}: permission denied")
    if isinstance(error, OSError) and error.errno == errno.EIO:
        return CheckpointError(f"cannot read {path}: input/output error (a failing disk?)")
    return corrupt_error(path)


def _refused_global(error: Exception, path: Path) -> str | None:
    """The global that made ``torch.load(weights_only=True)`` refuse ``path``; None when the file is no well-formed
    pickle at all (random bytes and truncated files also end up in torch's "unsupported global" error)."""
    match = _GLOBAL_RE.search(str(error))
    if match:
        return match.group(1)
    try:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception:  # noqa: BLE001 - a file this cannot even scan is corrupt
        return None
    allowed = {name for _, name in _allowed_globals()}
    unsafe = [name for name in unsafe if name not in allowed]
    return unsafe[0] if unsafe else None


def _load_pickle(path: Path) -> dict:
    if path.stat().st_size == 0:
        raise corrupt_error(path)
    mmap = zipfile.is_zipfile(path)  # the legacy (pre-1.6) tar format cannot be memory-mapped
    try:
        with torch.serialization.safe_globals(_allowed_globals()):
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        name = _refused_global(e, path)
        if name is None:
            raise corrupt_error(path) from None
        raise CheckpointError(
            f"refusing to load {path.name}: it needs the Python global {name}, which is not on the allow-list of "
            f"safe checkpoint contents (loading it could run arbitrary code)"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, UnicodeDecodeError, struct.error) as e:
        raise _unreadable(path, e) from None
    return obj


def _is_state_dict(obj: object) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    )


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read a Lightning ``.ckpt`` (or a bare pickled state_dict) or a ``.safetensors`` file without running code."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.suffix == SAFETENSORS_SUFFIX:
        return load_safetensors(path)
    obj = _load_pickle(path)
    if isinstance(obj, Mapping) and "state_dict" in obj:
        state_dict = obj["state_dict"]
        global_step = obj.get("global_step")
    else:
        state_dict, global_step = obj, None
    if not _is_state_dict(state_dict):
        raise CheckpointError(f"{path.name} holds no state_dict of tensors (is it a model checkpoint?)")
    try:
        step = int(global_step) if global_step is not None else None
    except (TypeError, ValueError):
        step = None
    return Checkpoint(path=path, format="pickle", state_dict=dict(state_dict), global_step=step)


def load_safetensors(path: str | os.PathLike) -> Checkpoint:
    """Memory-map a ``.safetensors`` file: tensors are views of the file; pages are read when first touched."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            state_dict = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise _unreadable(path, e) from None
    aliases = json.loads(metadata.get(META_ALIASES, "{}"))
    for alias, canonical in aliases.items():
        if canonical not in state_dict:
            raise CheckpointError(f"{path.name} is damaged: alias {alias} points to missing {canonical}")
        state_dict[alias] = state_dict[canonical]
    step = metadata.get(META_GLOBAL_STEP)
    return Checkpoint(
        path=path,
        format="safetensors",
        state_dict=state_dict,
        global_step=int(step) if step not in (None, "", "None") else None,
        metadata=metadata,
    )


_SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def _storage_key(t: torch.Tensor) -> tuple:
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)


def save_safetensors(
    path: str | os.PathLike,
    state_dict: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
    global_step: int | None = None,
) -> Path:
    """Write ``state_dict`` as ``.safetensors`` atomically (temp file in the same folder, then ``os.replace``).

    Tensors are streamed one at a time, so no second copy of the weights is held in memory. Entries that are the
    same tensor (e.g. ``cond_stage_model.*`` = ``first_stage_model.*`` for ``__is_first_stage__``) are stored once
    and recorded as aliases in the metadata, which :func:`load_safetensors` restores.
    """
    path = Path(path)
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    if global_step is not None:
        meta[META_GLOBAL_STEP] = str(int(global_step))
    header: dict[str, object] = {}
    order: list[tuple[str, torch.Tensor]] = []
    seen: dict[tuple, str] = {}
    aliases: dict[str, str] = {}
    offset = 0
    for key, tensor in state_dict.items():
        if tensor.dtype not in _SAFETENSORS_DTYPES:
            raise CheckpointError(f"cannot store {key} of dtype {tensor.dtype} in safetensors")
        tensor = tensor.detach()
        if tensor.device.type != "meta" and tensor.numel() > 0:
            ident = _storage_key(tensor)
            if ident in seen:
                aliases[key] = seen[ident]
                continue
            seen[ident] = key
        nbytes = tensor.numel() * tensor.element_size()
        header[key] = {
            "dtype": _SAFETENSORS_DTYPES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        order.append((key, tensor))
        offset += nbytes
    if aliases:
        meta[META_ALIASES] = json.dumps(aliases, sort_keys=True)
    if meta:
        header["__metadata__"] = meta
    header_bytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
    header_bytes += b" " * (-len(header_bytes) % 8)  # the data section starts 8-byte aligned

    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(header_bytes)))
        f.write(header_bytes)
        for _, tensor in order:
            if tensor.numel() == 0:
                continue
            flat = tensor.to("cpu").contiguous().reshape(-1).view(torch.uint8)
            f.write(memoryview(flat.numpy()))
    return path


def safetensors_sidecar(ckpt_path: str | os.PathLike) -> Path:
    """Where the ``.safetensors`` copy of a downloaded ``.ckpt`` lives: next to it, same stem."""
    return Path(ckpt_path).with_suffix(SAFETENSORS_SUFFIX)


def source_fingerprint(path: str | os.PathLike) -> str:
    """Size and mtime of a file, recorded in a sidecar so a replaced ``.ckpt`` is converted again."""
    st = Path(path).stat()
    return f"{st.st_size}:{st.st_mtime_ns}"


# Unexpected keys that are dropped without a word: they only matter for training or come from upstream's sampler.
TRAINING_ONLY_PREFIXES = ("loss.",)
SAMPLER_BUFFERS = frozenset({"ddim_sigmas", "ddim_alphas", "ddim_alphas_prev", "ddim_sqrt_one_minus_alphas"})
EMA_PREFIX = "model_ema."


def _preview(keys: Iterable[str], n: int = 3) -> str:
    keys = list(keys)
    shown = ", ".join(keys[:n])
    return shown + (f" (and {len(keys) - n} more)" if len(keys) > n else "")


def match_state_dict(
    expected: Mapping[str, torch.Tensor | torch.Size | tuple[int, ...]],
    state_dict: Mapping[str, torch.Tensor],
    *,
    source: str = "checkpoint",
) -> dict[str, torch.Tensor]:
    """Strict key/shape matching of a checkpoint against a model's ``state_dict`` (tensors or shapes).

    Returns the entries to load. Missing keys, shape mismatches and unknown extra keys raise CheckpointError; the
    known training-only groups (``model_ema.*`` when the model has no EMA, ``loss.*``, upstream's ``ddim_*`` sampler
    buffers) are dropped silently.
    """
    missing = [k for k in expected if k not in state_dict]
    if missing:
        raise CheckpointError(
            f"{source} lacks {len(missing)} of the model's {len(expected)} weights: {_preview(missing)}; "
            f"the checkpoint probably belongs to a different config"
        )
    model_has_ema = any(k.startswith(EMA_PREFIX) for k in expected)
    unexpected = []
    for key in state_dict:
        if key in expected:
            continue
        if key.startswith(TRAINING_ONLY_PREFIXES) or key in SAMPLER_BUFFERS:
            continue
        if key.startswith(EMA_PREFIX) and not model_has_ema:
            continue
        unexpected.append(key)
    if unexpected:
        raise CheckpointError(
            f"{source} has {len(unexpected)} weights the model does not: {_preview(unexpected)}; "
            f"the checkpoint probably belongs to a different config"
        )
    out: dict[str, torch.Tensor] = {}
    for key, want in expected.items():
        have = state_dict[key]
        want_shape = tuple(want.shape) if isinstance(want, torch.Tensor) else tuple(want)
        if tuple(have.shape) != want_shape:
            raise CheckpointError(
                f"{source}: {key} has shape {list(have.shape)} but the config builds {list(want_shape)}; "
                f"the checkpoint probably belongs to a different config"
            )
        out[key] = have
    return out
