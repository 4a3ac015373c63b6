"""Helpers shared by the speed benchmarks (not a test, not part of the package): timing, matmul peak, RSS, weights."""

from __future__ import annotations

import gc
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def device_label(device: torch.device) -> str:
    """What the numbers were measured on, to print beside every one of them: the CPU's capability (torch's kernels,
    native bf16, AMX, emulation by ATEN_CPU_CAPABILITY/ONEDNN_MAX_CPU_ISA) and the threads, or the GPU's name."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    from ldmcli.devices import cpu_kind

    return f"{cpu_kind().describe()}, {torch.get_num_threads()} threads"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds one call of ``fn`` takes (the device synchronised before and after)."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def alternate(fns: dict[str, Callable[[], object]], device: torch.device, repeats: int,
              warmup: int = 1, log: Callable[[str], None] | None = None) -> dict[str, float]:
    """Median seconds per call of each function, measured in rounds that alternate them (A, B, C, A, B, C, ...)
    so that load changes on a shared machine hit all of them alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(repeats):
        for name, fn in fns.items():
            times[name].append(timed(fn, device))
        if log:
            log(f"  round {r + 1}/{repeats}: " + ", ".join(f"{n} {t[-1]:.3f}s" for n, t in times.items()))
    return {name: statistics.median(t) for name, t in times.items()}


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int | None = None, repeats: int = 5) -> float:
    """Measured GFLOP/s of a square matrix product in ``dtype`` (the best of ``repeats``): the achievable peak."""
    n = n or (8192 if device.type == "cuda" else 2048)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    torch.mm(a, b)
    best = min(timed(lambda: torch.mm(a, b), device) for _ in range(repeats))
    return 2 * n**3 / best / 1e9


def peak_rss_gb() -> float:
    """Peak resident set size of this process so far, in GB.

    On Linux this is ``VmHWM`` from ``/proc/self/status``, the high-water mark of this program's own memory:
    ``ru_maxrss`` is not, since the kernel carries it over ``exec`` from the process that forked, so a worker started
    by a parent that had just built a 6 GB checkpoint reported the parent's 6 GB peak as its own. Elsewhere
    ``ru_maxrss`` (macOS reports bytes)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024 / 1e9
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1e9 if sys.platform == "darwin" else 1e6)


def current_rss_gb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e9
    except OSError:
        return float("nan")


@torch.no_grad()
def fill_zero_layers(model: nn.Module, seed: int = 0) -> nn.Module:
    """Re-initialise layers that upstream zero-initialises (UNet output projections), so a random-weight model
    predicts non-zero noise and precision drift is measurable. Other weights keep PyTorch's default init."""
    torch.manual_seed(seed)
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.dim() >= 2 and not weight.is_meta and not weight.any():
            module.reset_parameters()
    return model


def params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm())


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of images in [-1, 1] (clamped), peak-to-peak 2."""
    a, b = a.detach().double().cpu().clamp(-1, 1), b.detach().double().cpu().clamp(-1, 1)
    mse = float(((a - b) ** 2).mean())
    return float("inf") if mse == 0 else 10 * torch.log10(torch.tensor(4.0 / mse)).item()


def collect() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
