"""``ldm txt2img`` end to end with the default sampler (``auto``) against upstream's 50 DDIM steps, both at
``--precision auto``, on a random-weight txt2img-f8-large (issue 16's acceptance number).

Each variant is a fresh ``ldm txt2img`` process (load, BERT, sampling, decode, PNG written), alternated ``--rounds``
times on the same prompt and seed; the wall times' medians and their ratio are printed with the CPU kind. The random
checkpoint (6.2 GB, shared with ``txt2img_e2e.py``) is written once to ``--workdir``. Run from the repository root::

    python benchmarks/txt2img_auto_vs_ddim.py --rounds 2     # after one untimed warm-up run
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import _bench  # noqa: F401  (puts the repository on sys.path)
from _bench import REPO, device_label
from txt2img_e2e import VOCAB, _setup_home, write_checkpoint

VARIANTS = {"auto": ["--sampler", "auto"], "ddim50": ["--sampler", "ddim", "--ddim_steps", "50"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="/tmp/ldmcli_e2e")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1, help="untimed runs first (the first read of the 6 GB "
                    "checkpoint from disk costs minutes)")
    ap.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for the ldm processes")
    ap.add_argument("--quick", action="store_true", help="a tiny model of the same layout: a smoke run")
    args = ap.parse_args()
    workdir = Path(args.workdir) / ("quick" if args.quick else "full")
    workdir.mkdir(parents=True, exist_ok=True)
    _setup_home(workdir, VOCAB)
    ckpt = workdir / "txt2img-f8-large-random.safetensors"
    if not ckpt.is_file():
        write_checkpoint(ckpt, args.quick)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    records: dict[str, dict] = {}
    for round_ in range(-args.warmup, args.rounds):
        for name, extra in VARIANTS.items():
            if round_ < 0 and name != "auto":
                continue
            out = workdir / f"out-{name}"
            cmd = [sys.executable, "-m", "ldmcli", "txt2img", "a painting of a virus monster playing guitar",
                   "--model", str(ckpt), "--n_samples", "1", "--seed", "0", "--skip-grid", "--scale", "5",
                   "--precision", "auto", "--device", "cpu", "--outdir", str(out), "--json", "--quiet", *extra]
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if round_ >= 0:
                times[name].append(time.perf_counter() - t0)
            if proc.returncode != 0:
                sys.exit(f"{name} failed: {proc.stderr[-2000:]}")
            records[name] = json.loads(proc.stdout.splitlines()[0])
    torch.set_num_threads(args.threads or torch.get_num_threads())
    print(f"CPU: {device_label(torch.device('cpu'))}")
    for name in VARIANTS:
        r = records[name]
        print(f"{name:7s} {r['sampler']} {r['steps']} steps ({r['sampler_steps']} sampler steps, {r['precision']}): "
              f"median {statistics.median(times[name]):.1f} s over {len(times[name])} run(s) {times[name]}")
    ratio = statistics.median(times["auto"]) / statistics.median(times["ddim50"])
    print(f"auto / ddim50 wall time: {ratio:.3f}")


if __name__ == "__main__":
    main()
