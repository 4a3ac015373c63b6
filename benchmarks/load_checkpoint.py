"""Load time and peak memory of ``load_model`` for a checkpoint the size of txt2img-f8-large (1.45B parameters).

Writes random weights of the txt2img-f8-large preset's exact keys and shapes (no zeros, so nothing compresses or
dedupes) as a Lightning-style ``.ckpt`` and as ``.safetensors`` into a temporary folder (about 12.3 GB; the free
space is checked first), then loads each in a fresh subprocess and prints:

* ``load``: ``load_model(...)`` wall time (tensors are memory-mapped, so pages are read lazily),
* ``load+touch``: plus reading every weight once (what the first sampling step does anyway),
* ``peak RSS``: growth of the process's peak resident set over its size after imports, in GB and as a multiple of
  the weights' size (1.0 = one copy of the weights; a load that reads the file and then copies it is >= 2).

The files are evicted from the page cache (``posix_fadvise(DONTNEED)`` on our own files only) before each cold run;
a warm run follows. Usage: ``python benchmarks/load_checkpoint.py [--dir DIR] [--keep]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

PRESET = "txt2img-f8-large"

_CHILD = textwrap.dedent("""
    import json, sys, time
    import torch
    from ldmcli.loading import load_model
    import ldmcli.config, ldmcli.models.ddpm, ldmcli.models.unet, ldmcli.models.encoders, safetensors

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024

    base = status("VmRSS")
    t0 = time.perf_counter()
    model = load_model(sys.argv[1], ckpt=sys.argv[2])
    t1 = time.perf_counter()
    peak_load = status("VmHWM") - base
    checksum = 0.0
    for p in model.parameters():
        checksum += float(p.sum())
    t2 = time.perf_counter()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    print(json.dumps({"load_s": t1 - t0, "touch_s": t2 - t1, "peak_after_load": peak_load,
                      "peak_after_touch": status("VmHWM") - base, "weights": weights,
                      "params": sum(p.numel() for p in model.parameters())}))
""")


def _evict(path: Path) -> None:
    """Drop our own file from the page cache so the next read is cold (no effect on other files)."""
    if hasattr(os, "posix_fadvise"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def write_checkpoints(folder: Path, seed: int = 0) -> tuple[Path, Path, int]:
    """Random weights of the preset's state_dict, as ``model.ckpt`` (Lightning layout) and ``model.safetensors``."""
    import torch

    from ldmcli import checkpoint as ckpt_io
    from ldmcli import config

    with torch.device("meta"):
        skeleton = config.build_model(config.load_config(PRESET))
    shapes = {k: (tuple(v.shape), v.dtype) for k, v in skeleton.state_dict().items()}
    del skeleton
    g = torch.Generator().manual_seed(seed)
    state_dict = {}
    for key, (shape, dtype) in shapes.items():
        t = torch.empty(shape, dtype=dtype)
        if dtype.is_floating_point:
            t.normal_(0.0, 0.02, generator=g)
        else:
            t.zero_()
        state_dict[key] = t
    nbytes = sum(t.numel() * t.element_size() for t in state_dict.values())
    ckpt = folder / "model.ckpt"
    t0 = time.perf_counter()
    torch.save({"epoch": 0, "global_step": 470000, "pytorch-lightning_version": "1.4.2", "state_dict": state_dict},
               ckpt)
    t1 = time.perf_counter()
    st = ckpt_io.save_safetensors(folder / "model.safetensors", state_dict, global_step=470000)
    t2 = time.perf_counter()
    print(f"wrote {len(state_dict)} tensors, {nbytes / 1e9:.2f} GB each: .ckpt in {t1 - t0:.1f} s, "
          f".safetensors in {t2 - t1:.1f} s (ldmcli's streaming writer)")
    return ckpt, st, nbytes


def measure(ckpt: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", _CHILD, PRESET, str(ckpt)], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1])
    if out.returncode != 0:
        raise SystemExit(f"load of {ckpt.name} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=None, help="where to write the checkpoints (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the files afterwards")
    args = parser.parse_args()
    base = args.dir or Path(tempfile.gettempdir())
    base.mkdir(parents=True, exist_ok=True)
    need = 12.6e9
    free = shutil.disk_usage(base).free
    if free < need:
        raise SystemExit(f"needs {need / 1e9:.1f} GB free in {base}, only {free / 1e9:.1f} GB there (use --dir)")
    folder = Path(tempfile.mkdtemp(prefix="ldm-load-bench-", dir=base))
    try:
        ckpt, st, nbytes = write_checkpoints(folder)
        print(f"{'file':<18}{'cache':<7}{'load s':>8}{'load+touch s':>14}{'peak RSS GB':>13}{'x weights':>11}")
        for path in (ckpt, st):
            for cache in ("cold", "warm"):
                if cache == "cold":
                    _evict(path)
                r = measure(path)
                peak = r["peak_after_touch"]
                print(f"{path.name:<18}{cache:<7}{r['load_s']:>8.2f}{r['load_s'] + r['touch_s']:>14.2f}"
                      f"{peak / 1e9:>13.2f}{peak / r['weights']:>11.2f}")
        print(f"weights: {r['params'] / 1e9:.3f} B parameters, {r['weights'] / 1e9:.2f} GB in float32")
    finally:
        if args.keep:
            print(f"kept {folder}")
        else:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
