"""Wall time of ``ldm sample digits --class 7 -n 16`` (issue 8: under 10 s for 16 samples on a 2-core CPU).

Runs the real executable in a fresh process each time (Python start-up, imports, model load, 50 DDIM steps, decode,
PNG writing: what a person waits for), offline, into a temporary folder, under three thread settings:

* ``default``: torch's own choice (one OpenMP thread per core, libgomp's default active spin-waiting);
* ``threads1``: ``OMP_NUM_THREADS=1``;
* ``passive``: ``OMP_WAIT_POLICY=PASSIVE`` (threads sleep instead of spinning while they wait for each other).

On a 2-core box shared with other jobs, a descheduled second thread makes the other spin at every small op of this
tiny model; the last two settings show how much of the time that is. Prints each run, the medians as fractions of the
10-second budget, and each setting's speed-up over ``default``.

    python benchmarks/digits_speed.py [--repeats 3] [--settings default,threads1,passive] [-- --scale 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BUDGET_S = 10.0
SETTINGS = {
    "default": {},
    "threads1": {"OMP_NUM_THREADS": "1"},
    "passive": {"OMP_WAIT_POLICY": "PASSIVE"},
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--settings", default="default,threads1,passive", help=f"from {', '.join(SETTINGS)}")
    p.add_argument("extra", nargs="*", help="more ldm sample options (after --)")
    args = p.parse_args()
    chosen = [s.strip() for s in args.settings.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in SETTINGS]
    if unknown:
        sys.exit(f"unknown setting {unknown[0]!r}; choose from {', '.join(SETTINGS)}")
    exe = shutil.which("ldm") or str(Path(sys.executable).with_name("ldm"))
    medians: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        base = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
        base.update(LDM_OFFLINE="1", LDM_HOME=str(Path(tmp) / "home"))
        for name in chosen:
            times = []
            for k in range(args.repeats):
                out = Path(tmp) / f"{name}{k}"
                cmd = [exe, "sample", "digits", "--class", "7", "-n", "16", "--seed", str(k), "--outdir", str(out),
                       "--quiet", *args.extra]
                t0 = time.perf_counter()
                done = subprocess.run(cmd, env={**base, **SETTINGS[name]}, capture_output=True, text=True)
                dt = time.perf_counter() - t0
                if done.returncode != 0:
                    sys.exit(f"ldm sample failed ({done.returncode}): {done.stderr.strip()}")
                n = len(list((out / "samples").glob("*.png")))
                grids = len(list(out.glob("grid-*.png")))
                times.append(dt)
                print(f"{name:9s} run {k}: {dt:6.2f} s ({n} samples, {grids} grid)", flush=True)
            medians[name] = statistics.median(times)
    print(f"ldm sample digits --class 7 -n 16 (cpus {os.cpu_count()}, load average {os.getloadavg()[0]:.1f}):")
    for name, med in medians.items():
        speedup = f", {medians['default'] / med:5.1f}x faster than default" if "default" in medians else ""
        print(f"  {name:9s} median {med:6.2f} s = {med / BUDGET_S:5.2f} x the {BUDGET_S:.0f} s budget "
              f"({'within' if med < BUDGET_S else 'OVER'}){speedup}")


if __name__ == "__main__":
    main()
