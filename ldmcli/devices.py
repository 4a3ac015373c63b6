"""Choosing the device and the precision for inference. Nothing here (or anywhere) assumes CUDA.

``pick_device``: CUDA, then Apple MPS, then CPU, unless ``--device`` names one. ``resolve_precision``: ``auto`` picks
bfloat16 where the hardware computes it natively (CUDA with bf16 support; CPUs with AVX512-BF16 or AMX), float32
otherwise, so results stay comparable with upstream's float32 code where bf16 would only be emulated.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ldmcli.errors import UsageError

PRECISIONS: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PRECISION_CHOICES = ("auto", *PRECISIONS)
_ALIASES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "half": "fp16", "full": "fp32"}


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def pick_device(name: str | None = None) -> torch.device:
    """The device to run on: ``name`` if given (``cpu``, ``cuda``, ``cuda:1``, ``mps``), else CUDA > MPS > CPU.

    A named device that is not usable here is a UsageError.
    """
    if name is None or name.strip().lower() in ("", "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name.strip().lower())
    except (RuntimeError, ValueError):
        raise UsageError(f"unknown device {name!r}: use cpu, cuda, cuda:N or mps") from None
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"device {name!r} is not available: this torch build or machine has no usable CUDA GPU")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"device {name!r} is not available: only {torch.cuda.device_count()} CUDA device(s)")
        return device
    if device.type == "mps":
        if not _mps_available():
            raise UsageError(f"device {name!r} is not available on this machine")
        return device
    raise UsageError(f"unsupported device {name!r}: use cpu, cuda, cuda:N or mps")


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> frozenset[str]:
    """The CPU feature flags from ``/proc/cpuinfo`` (empty where there is no such file, e.g. macOS, Windows)."""
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def cpu_has_native_bf16(flags: frozenset[str] | None = None) -> bool:
    """True when the CPU computes bfloat16 natively (AVX512-BF16 or AMX-BF16); otherwise bf16 is emulated, slowly."""
    flags = cpu_flags() if flags is None else flags
    return bool({"avx512_bf16", "amx_bf16"} & flags)


def resolve_precision(
    name: str | None, device: torch.device, *, cpu_flags_override: frozenset[str] | None = None
) -> torch.dtype:
    """The weight/compute dtype for ``--precision fp32|bf16|fp16|auto`` on ``device``.

    ``auto`` (the default): bf16 on CUDA GPUs that support it and on CPUs with native bf16, fp32 otherwise.
    fp16 on the CPU is a UsageError (unsupported by many CPU kernels and slower than fp32 there).
    """
    key = (name or "auto").strip().lower()
    key = _ALIASES.get(key, key)
    if key not in PRECISION_CHOICES:
        raise UsageError(f"unknown precision {name!r}: choose one of {', '.join(PRECISION_CHOICES)}")
    device = torch.device(device)
    if key == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
        if device.type == "cpu":
            return torch.bfloat16 if cpu_has_native_bf16(cpu_flags_override) else torch.float32
        return torch.float32
    dtype = PRECISIONS[key]
    if dtype == torch.float16 and device.type == "cpu":
        raise UsageError("--precision fp16 is not supported on the CPU: use bf16 or fp32")
    return dtype
