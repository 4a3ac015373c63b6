"""Wall time of ``ldm sample digits --class 7 -n 16`` (issue 8: under 10 s for 16 samples on a 2-core CPU).

Runs the real executable in a fresh process each time (Python start-up, imports, model load, 50 DDIM steps, decode,
PNG writing: what a person waits for), offline, into a temporary folder; prints each run and the median as a
fraction of the 10-second budget.

    python benchmarks/digits_speed.py [--repeats 3] [-- extra ldm sample options, e.g. --scale 3]
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("extra", nargs="*", help="more ldm sample options (after --)")
    args = p.parse_args()
    exe = shutil.which("ldm") or str(Path(sys.executable).with_name("ldm"))
    times = []
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "LDM_OFFLINE": "1", "LDM_HOME": str(Path(tmp) / "home")}
        for k in range(args.repeats):
            out = Path(tmp) / f"run{k}"
            cmd = [exe, "sample", "digits", "--class", "7", "-n", "16", "--seed", str(k), "--outdir", str(out),
                   "--quiet", *args.extra]
            t0 = time.perf_counter()
            done = subprocess.run(cmd, env=env, capture_output=True, text=True)
            dt = time.perf_counter() - t0
            if done.returncode != 0:
                sys.exit(f"ldm sample failed ({done.returncode}): {done.stderr.strip()}")
            n = len(list((out / "samples").glob("*.png")))
            grids = len(list(out.glob("grid-*.png")))
            times.append(dt)
            print(f"run {k}: {dt:.2f} s ({n} samples, {grids} grid)")
    med = statistics.median(times)
    print(f"ldm sample digits --class 7 -n 16: median {med:.2f} s = {med / BUDGET_S:.2f} x the {BUDGET_S:.0f} s "
          f"budget ({'within' if med < BUDGET_S else 'OVER'}), cpus {os.cpu_count()}, "
          f"load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
