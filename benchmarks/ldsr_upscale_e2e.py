"""``ldm upscale`` end to end on CPU with a random-weight model of bsr_sr's size: time per sampler step, decode time,
peak RSS, and the estimate for a 1024x1024 input.

The model folder (``config.yaml`` = ``ldmcli/presets/bsr_sr.yaml``, ``model.safetensors`` with seeded random
weights, 0.7 GB) is written by a separate process first, so the measured process only loads, samples, decodes and
writes, exactly as the command does: it runs :func:`ldmcli.pipelines.upscale.run` (what ``ldm upscale`` calls) with
an event handler that timestamps every step and patch. Peak RSS is this process's (the whole run).

    flock /tmp/ldm-bigmem.lock python benchmarks/ldsr_upscale_e2e.py --size 256 --steps 1     # 256 -> 1024
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from _bench import REPO, fill_zero_layers, peak_rss_gb


def build_folder(folder: Path) -> None:
    """config.yaml + model.safetensors of a random-weight bsr_sr (run in a child process)."""
    import shutil

    from ldmcli import config
    from ldmcli.checkpoint import save_safetensors

    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(REPO / "ldmcli" / "presets" / "bsr_sr.yaml", folder / "config.yaml")
    model = fill_zero_layers(config.build_model(config.load_config(folder / "config.yaml")))
    save_safetensors(folder / "model.safetensors", model.state_dict())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=256, help="low-resolution side (the output is 4x)")
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--patch-batch", type=int, default=1)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/ldsr-bench"))
    ap.add_argument("--build", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    folder = args.workdir / "bsr_sr-random"
    if args.build:
        build_folder(folder)
        return
    if not (folder / "model.safetensors").is_file():
        subprocess.run([sys.executable, __file__, "--build", "--workdir", str(args.workdir)], check=True)

    import numpy as np
    import torch
    from PIL import Image

    from ldmcli.devices import cpu_flags
    from ldmcli.models.patches import patch_starts
    from ldmcli.pipelines import events as ev
    from ldmcli.pipelines import upscale
    from ldmcli.sampling import SamplerSettings

    flags = cpu_flags()
    caps = [name for name, flag in (("AVX2", "avx2"), ("AVX-512", "avx512f"), ("AVX512-BF16", "avx512_bf16"),
                                    ("AMX", "amx_bf16")) if flag in flags]
    print(f"CPU: {', '.join(caps) or 'no AVX2'}; torch {torch.__version__}, {torch.get_num_threads()} threads",
          flush=True)
    s = args.size
    image = args.workdir / f"input{s}.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (s, s, 3), dtype=np.uint8)).save(image)
    out = args.workdir / f"output{s}.png"
    out.unlink(missing_ok=True)
    marks: dict[str, float] = {}
    steps: list[float] = []
    last = [time.perf_counter()]

    def on_event(e: ev.Event) -> None:
        now = time.perf_counter()
        if isinstance(e, ev.ItemStarted):
            marks["started"] = last[0] = now
        elif isinstance(e, ev.ItemStep):
            steps.append(now - last[0])
            last[0] = now
            print(f"  step {e.step}/{e.steps}: {steps[-1]:.1f}s, peak RSS {peak_rss_gb():.2f} GB", flush=True)
        elif isinstance(e, ev.ItemPatches) and e.stage == "decode" and e.done == e.patches:
            marks["decoded"] = now
        elif isinstance(e, ev.ItemPatches) and (e.done == e.patches or e.stage == "decode"):
            print(f"    {e.stage} {e.done}/{e.patches} patches, {now - last[0]:.1f}s into the stage", flush=True)
        elif isinstance(e, ev.ItemDone):
            marks["done"] = now
        elif isinstance(e, ev.Message):
            print(f"  {e.text}", flush=True)

    request = upscale.UpscaleRequest(images=(image,), output=out, model=str(folder), precision=args.precision,
                                     device="cpu", seed=0, patch_batch=args.patch_batch,
                                     settings=SamplerSettings("ddim", args.steps, 1.0, 1.0))
    t0 = time.perf_counter()
    report = upscale.run(request, on_event)
    total = time.perf_counter() - t0
    assert report.written, report.failed
    record = report.written[0]
    decode = marks["decoded"] - marks["started"] - sum(steps)
    n = len(patch_starts(s, min(128, s), 64)) ** 2
    n1024 = len(patch_starts(1024, 128, 64)) ** 2
    per_patch, per_decode_patch = sum(steps) / len(steps) / n, decode / n
    result = {
        "cpu": caps, "threads": torch.get_num_threads(), "input": s, "output": record["width"],
        "precision": record["precision"], "unet_patches_per_step": n, "seconds_per_step": sum(steps) / len(steps),
        "decode_seconds": decode, "total_seconds": total, "peak_rss_gb": peak_rss_gb(),
        "estimate_1024_seconds_per_step": per_patch * n1024, "estimate_1024_decode_seconds": per_decode_patch * n1024,
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
