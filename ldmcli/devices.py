"""Choosing the device and the precision for inference. Nothing here (or anywhere) assumes CUDA.

``pick_device``: CUDA, then Apple MPS, then CPU, unless ``--device`` names one. ``resolve_precision``: ``auto`` picks
bfloat16 where the hardware computes it natively (CUDA with bf16 support; CPUs with AVX512-BF16 or AMX), float32
otherwise, so results stay comparable with upstream's float32 code where bf16 would only be emulated.
``cpu_kind``: what the CPU computes natively as torch and oneDNN will use it (the environment variables
``ATEN_CPU_CAPABILITY`` and ``ONEDNN_MAX_CPU_ISA`` can lower it, e.g. to emulate an AVX2-only machine), in one line
for the benchmarks and the fast path's per-capability choices.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
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


#: oneDNN ISAs (``ONEDNN_MAX_CPU_ISA`` values) that compute bfloat16 natively; lower ones (AVX2, AVX512_CORE, ...)
#: leave torch's bf16 matrix products to a reference kernel ~100x slower than float32
_ONEDNN_BF16_ISAS = frozenset({
    "AVX2_VNNI_2", "AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX10_1_512", "AVX512_CORE_AMX", "AVX512_CORE_AMX_FP16",
    "AVX10_2_512", "AVX10_2_512_AMX_2", "ALL", "DEFAULT",
})
_ONEDNN_AMX_ISAS = frozenset({"AVX512_CORE_AMX", "AVX512_CORE_AMX_FP16", "AVX10_2_512_AMX_2", "ALL", "DEFAULT"})


def onednn_isa_limit(environ: dict[str, str] | None = None) -> str | None:
    """``ONEDNN_MAX_CPU_ISA`` (or its old name ``DNNL_MAX_CPU_ISA``), upper-cased; None when unset."""
    env = os.environ if environ is None else environ
    value = env.get("ONEDNN_MAX_CPU_ISA") or env.get("DNNL_MAX_CPU_ISA")
    return value.strip().upper() if value and value.strip() else None


def cpu_has_native_bf16(flags: frozenset[str] | None = None, *, environ: dict[str, str] | None = None) -> bool:
    """True when the CPU computes bfloat16 natively (AVX512-BF16 or AMX-BF16) and ``ONEDNN_MAX_CPU_ISA`` does not
    hold oneDNN below it; otherwise bf16 is emulated, slowly."""
    flags = cpu_flags() if flags is None else flags
    limit = onednn_isa_limit(environ)
    if limit is not None and limit not in _ONEDNN_BF16_ISAS:
        return False
    return bool({"avx512_bf16", "amx_bf16"} & flags)


@dataclass(frozen=True)
class CpuKind:
    """What this CPU computes natively, as torch and oneDNN use it (environment limits applied)."""

    capability: str  # torch's vectorised kernels: "AVX512", "AVX2", "DEFAULT", ... (ATEN_CPU_CAPABILITY lowers it)
    native_bf16: bool
    amx: bool
    onednn_limit: str | None  # ONEDNN_MAX_CPU_ISA, when set
    emulated: bool  # True when an environment variable holds torch or oneDNN below the hardware
    model: str = ""

    @property
    def key(self) -> str:
        """A short name for per-capability choices and tables: ``avx512-bf16``, ``avx512``, ``avx2``, ``amx`` ..."""
        if self.amx:
            return "amx"
        base = self.capability.lower()
        return f"{base}-bf16" if self.native_bf16 else base

    def describe(self) -> str:
        """One line: e.g. ``AVX512, native bf16 (AVX512-BF16), no AMX`` or ``AVX2 (emulated: ...), no native bf16``."""
        parts = [self.capability]
        if self.emulated:
            held = [f"ATEN_CPU_CAPABILITY={os.environ.get('ATEN_CPU_CAPABILITY')}"] if os.environ.get(
                "ATEN_CPU_CAPABILITY") else []
            held += [f"ONEDNN_MAX_CPU_ISA={self.onednn_limit}"] if self.onednn_limit else []
            held += [f"MKL_ENABLE_INSTRUCTIONS={os.environ['MKL_ENABLE_INSTRUCTIONS']}"] if os.environ.get(
                "MKL_ENABLE_INSTRUCTIONS") else []
            parts[0] += f" (emulated on a bigger CPU: {', '.join(held)})"
        parts.append("native bf16" if self.native_bf16 else "no native bf16 (bf16 is emulated, slow)")
        parts.append("AMX" if self.amx else "no AMX")
        text = ", ".join(parts)
        return f"{self.model}: {text}" if self.model else text


def _cpu_model(cpuinfo: str | Path = "/proc/cpuinfo") -> str:
    try:
        for line in Path(cpuinfo).read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                return " ".join(value.split())
    except OSError:
        pass
    return ""


def cpu_kind(flags: frozenset[str] | None = None, *, environ: dict[str, str] | None = None) -> CpuKind:
    """This CPU as torch and oneDNN will use it: torch's kernel capability, native bf16, AMX, emulation."""
    import torch.backends.cpu

    hw_flags = cpu_flags() if flags is None else flags
    env = os.environ if environ is None else environ
    capability = torch.backends.cpu.get_cpu_capability()
    limit = onednn_isa_limit(env)
    native = cpu_has_native_bf16(hw_flags, environ=env)
    amx = "amx_bf16" in hw_flags and (limit is None or limit in _ONEDNN_AMX_ISAS)
    hw_bf16 = bool({"avx512_bf16", "amx_bf16"} & hw_flags)
    emulated = bool(env.get("ATEN_CPU_CAPABILITY")) or (limit is not None and (hw_bf16 and not native))
    return CpuKind(capability, native, amx, limit, emulated, _cpu_model() if flags is None else "")


_WARNED: set[str] = set()


def warn_once(key: str, message: str) -> None:
    """``warnings.warn(message)`` the first time ``key`` is seen in this process."""
    if key in _WARNED:
        return
    _WARNED.add(key)
    warnings.warn(message, RuntimeWarning, stacklevel=3)


def resolve_precision(
    name: str | None, device: torch.device, *, cpu_flags_override: frozenset[str] | None = None
) -> torch.dtype:
    """The weight/compute dtype for ``--precision fp32|bf16|fp16|auto`` on ``device``.

    ``auto`` (the default): bf16 on CUDA GPUs that support it and on CPUs with native bf16, fp32 otherwise.
    fp16 on the CPU is a UsageError (unsupported by many CPU kernels and slower than fp32 there). bf16 asked for
    on a CPU without native bf16 is honoured with a warning (once per process): its matrix products fall back to a
    reference kernel about 100x slower than float32 there.
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
    if dtype == torch.bfloat16 and device.type == "cpu" and not cpu_has_native_bf16(cpu_flags_override):
        warn_once("bf16-emulated", "bfloat16 is not native on this CPU (no AVX512-BF16 or AMX): its matrix products "
                  "run about 100x slower than in float32; use precision fp32 (or auto, which picks fp32 here)")
    return dtype
